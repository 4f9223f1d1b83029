"""The toy reasoning task of the project's small trained Falcon-H1: long multiplication written out step by step.

A problem multiplies a 2-3 digit number by a 2-digit one. The model writes one partial product per digit of the
multiplier, then adds them up, and ends with a marked final answer:

    prompt      <|begin_of_text|>Q:376*82;
    completion  376*2=752;376*80=30080;752+30080=30832;A:30832<|end_of_text|>

Every answer is checkable; each step is a multi-digit product or sum whose leading digits depend on carries the
model must work out before writing them (digits are written most significant first), and one wrong digit carries
into the final answer. A small model trained for a few minutes gets such steps right often but not always, and
its wrong answers scatter: what majority and confidence-weighted voting need. `TaskSpec` sets the operand sizes.

The tokenizer is character level (tokenizers' WordLevel model over single characters), saved as tokenizer.json +
tokenizer_config.json so that `transformers.AutoTokenizer.from_pretrained` loads it. Its vocabulary has room for
other toy tasks (capital letters, signs) and is larger than DeepConf's top-k of 20, so the top-k is a real cut.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

PAD, BOS, EOS = "<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2: transformers' FalconH1Config defaults (pad 0, bos 1, eos 2)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CHARS = "0123456789+-*/=;:,.()?# " + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARS))}

# The final answer's marker; answers.py's toy extractor reads the last one.
ANSWER_PATTERN = r"A:(\d+)"


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        """The text after BOS that the model continues."""
        return f"Q:{self.a}*{self.b};"

    @property
    def answer(self) -> str:
        return str(self.a * self.b)

    @property
    def solution(self) -> str:
        """The reference completion (without EOS): a * each digit of b in place (units first), the running sum of
        those partial products, then the marked answer."""
        places = [int(d) * 10**i for i, d in enumerate(reversed(str(self.b)))]
        steps = [f"{self.a}*{m}={self.a * m};" for m in places]
        total = self.a * places[0]
        for m in places[1:]:
            steps.append(f"{total}+{self.a * m}={total + self.a * m};")
            total += self.a * m
        return "".join(steps) + f"A:{total}"


@dataclass(frozen=True)
class TaskSpec:
    """Operand sizes: digits of a and of b, each an inclusive range."""

    a_digits: tuple[int, int] = (2, 3)
    b_digits: tuple[int, int] = (2, 2)

    def draw(self, rng: random.Random) -> Problem:
        da, db = rng.randint(*self.a_digits), rng.randint(*self.b_digits)
        return Problem(rng.randint(10 ** (da - 1), 10**da - 1), rng.randint(10 ** (db - 1), 10**db - 1))


HELD_OUT_COUNT = 200  # training excludes exactly held_out_problems(HELD_OUT_COUNT) (toy_train.train)


def held_out_problems(count: int = HELD_OUT_COUNT, spec: TaskSpec = TaskSpec(), seed: int = 12345) -> list[Problem]:
    """The fixed evaluation set (distinct problems); training never draws these (`training_problems`). A prefix of
    a longer list: held_out_problems(n) == held_out_problems(m)[:n] for n <= m."""
    rng = random.Random(seed)
    seen: set[Problem] = set()
    out: list[Problem] = []
    while len(out) < count:
        p = spec.draw(rng)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def training_problems(rng: random.Random, count: int, spec: TaskSpec, exclude: set[Problem]) -> list[Problem]:
    out: list[Problem] = []
    while len(out) < count:
        p = spec.draw(rng)
        if p not in exclude:
            out.append(p)
    return out


def encode(text: str) -> list[int]:
    """Character ids of `text` (no special tokens); an unknown character is an error naming it."""
    try:
        return [VOCAB[c] for c in text]
    except KeyError as e:
        raise ValueError(f"toy task text {text!r}: character {e.args[0]!r} is not in the vocabulary") from None


_ID_TO_TOKEN = {i: t for t, i in VOCAB.items()}


def decode(ids: list[int]) -> str:
    """Text of generated ids; special tokens are dropped (the completion stops at EOS anyway)."""
    return "".join(_ID_TO_TOKEN[i] for i in ids if i >= len(SPECIAL_TOKENS))


def prompt_ids(problem: Problem) -> list[int]:
    return [BOS_ID, *encode(problem.prompt)]


def training_text(problem: Problem) -> str:
    """The sequence the model is trained on, as text: BOS prompt solution EOS (the tokenizer reads the special
    tokens as their ids)."""
    return f"{BOS}{problem.prompt}{problem.solution}{EOS}"


def calibration_records(samples: int = 64, holdout: int = 16, seed: int = 1) -> list[dict[str, str]]:
    """Lines of a calibration JSONL for `trtfalcon quantize --calib-data`: `samples` traces of the training
    distribution (TaskSpec's operands, held-out problems excluded, as in training), then `holdout` held-out
    problems' traces (held_out_problems(holdout)). quantize keeps the file's last --holdout lines out of calibration
    for perplexity: with --holdout <= `holdout` those are held-out problems, never trained or calibrated on."""
    exclude = set(held_out_problems())
    train = training_problems(random.Random(seed), samples, TaskSpec(), exclude)
    return [{"text": training_text(p)} for p in [*train, *held_out_problems(holdout)]]


def write_calibration_jsonl(path: str | Path, samples: int = 64, holdout: int = 16, seed: int = 1) -> Path:
    """calibration_records(...) as a JSONL file (one {"text": ...} per line)."""
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in calibration_records(samples, holdout, seed)))
    return path


def is_correct(problem: Problem, completion: str) -> bool:
    """The completion's last marked answer equals the sum (a completion without one is wrong)."""
    found = re.findall(ANSWER_PATTERN, completion)
    return bool(found) and found[-1] == problem.answer


# ---- tokenizer files --------------------------------------------------------------------------------------------


def build_tokenizer():  # noqa: ANN201 - transformers.PreTrainedTokenizerFast, imported lazily
    """A transformers fast tokenizer over VOCAB: every character is one token; BOS is prepended on encode."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(VOCAB, unk_token=None))
    # Every character its own pre-token (spaces included): WordLevel then maps each to its id.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join without the spaces WordLevel's default decoder puts between
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, BOS_ID)])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="left", clean_up_tokenization_spaces=False)


def save_tokenizer(directory: str | Path) -> None:
    build_tokenizer().save_pretrained(str(directory))
