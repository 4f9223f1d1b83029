"""Answer extractors: the final answer of a reasoning trace's text, or None when it gives none.

An extractor is any callable str -> str | None; votes compare the returned strings. Two come with trtfalcon:
`boxed_answer` (LaTeX \\boxed{...}, math benchmarks' convention, nested braces allowed) and `RegexAnswer` (the last
match of a pattern; the toy task's `A:<digits>` is TOY_ANSWER). `get_extractor` turns a name or a regex into one.
"""

from __future__ import annotations

import re
from typing import Callable

from trtfalcon.tts.toy_task import ANSWER_PATTERN

AnswerExtractor = Callable[[str], "str | None"]


class RegexAnswer:
    """The last match of `pattern` in the text: its first group if the pattern has one, else the whole match."""

    def __init__(self, pattern: str) -> None:
        try:
            self.regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"answer pattern {pattern!r}: not a valid regular expression ({e})") from None
        self.pattern = pattern

    def __call__(self, text: str) -> str | None:
        last = None
        for last in self.regex.finditer(text):
            pass
        if last is None:
            return None
        return (last.group(1) if self.regex.groups else last.group(0)).strip()

    def __repr__(self) -> str:
        return f"RegexAnswer({self.pattern!r})"


TOY_ANSWER = RegexAnswer(ANSWER_PATTERN)

_BOXED = re.compile(r"\\boxed\s*")


def boxed_answer(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces nested to any depth), or of `\\boxed X` (up to the next space
    or `$`). A \\boxed{ whose braces never close (a trace cut off mid-answer) gives None: a partial answer is not
    an answer (DeepConf's helper returns the partial text there)."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i = starts[-1]
    if i >= len(text):
        return None
    if text[i] != "{":
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip() or None
    return None


EXTRACTORS: dict[str, AnswerExtractor] = {"toy": TOY_ANSWER, "boxed": boxed_answer}


REGEX_PREFIX = "regex:"


def get_extractor(name_or_pattern: str) -> AnswerExtractor:
    """'toy', 'boxed', 'regex:PATTERN' (the command line's spelling), or a bare regular expression (its first
    group, or the whole match, is the answer)."""
    if name_or_pattern in EXTRACTORS:
        return EXTRACTORS[name_or_pattern]
    if name_or_pattern.startswith(REGEX_PREFIX):
        name_or_pattern = name_or_pattern[len(REGEX_PREFIX):]
        if not name_or_pattern:
            raise ValueError(f"answer extractor {REGEX_PREFIX!r}: expected a regular expression after it, found none")
    return RegexAnswer(name_or_pattern)
