"""Does voting gain anything on the toy reasoner? Offline DeepConf on n sampled traces per held-out problem.

    python bench/tts/toy_offline_vote.py --checkpoint tests/data/toy-reasoner --n 8 --temperature 0.8

Samples n traces of each held-out problem with trtfalcon's runtime (SamplingParams(n=..., logprobs=20), one prefill
per problem, top_p 1 so the returned top-20 log-probs are the untruncated tempered distribution DeepConf's
confidence is defined on), scores each trace (trtfalcon.tts.deepconf, window --window tokens), and votes every
offline way (trtfalcon.tts.vote). Prints and writes bench/results/toy_offline_vote.json: single-trace accuracy,
pass@n (some trace right: the ceiling of any vote), each vote's accuracy, and the mean lowest-window confidence
of right and wrong traces.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from trtfalcon.tts.answers import TOY_ANSWER
from trtfalcon.tts.deepconf import DEFAULT_TOP_K, token_confidence, trace_scores
from trtfalcon.tts.toy_eval import sample_traces, toy_engine
from trtfalcon.tts.toy_task import held_out_problems
from trtfalcon.tts.vote import ScoredTrace, offline_votes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("tests/data/toy-reasoner"))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--window", type=int, default=16, help="DeepConf group window, in tokens (2048 for real models).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "toy_offline_vote.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    problems = held_out_problems(args.problems)
    t0 = time.perf_counter()
    traces = sample_traces(toy_engine(args.checkpoint), problems, n=args.n, temperature=args.temperature,
                           seed=args.seed, logprobs=DEFAULT_TOP_K)
    sample_s = time.perf_counter() - t0
    hits: dict[str, int] = {}
    right_conf, wrong_conf = [], []
    single = pass_n = tokens = 0
    for p, per_problem in zip(problems, traces):
        scored = []
        for t in per_problem:
            confs = token_confidence(torch.tensor([lp.top_logprobs for lp in t.output.logprobs]))
            s = trace_scores(confs, window=args.window)
            scored.append(ScoredTrace(TOY_ANSWER(t.text), s))
            (right_conf if t.correct else wrong_conf).append(s.lowest_window)
            tokens += len(t.output.token_ids)
        single += sum(t.correct for t in per_problem)
        pass_n += any(t.correct for t in per_problem)
        for name, result in offline_votes(scored).items():
            hits[name] = hits.get(name, 0) + (result.answer == p.answer)
    n_prob = len(problems)
    report = {
        "command": (f"python bench/tts/toy_offline_vote.py --checkpoint {args.checkpoint} --n {args.n} "
                    f"--temperature {args.temperature} --problems {args.problems} --window {args.window} "
                    f"--seed {args.seed}"),
        "problems": n_prob, "n": args.n, "temperature": args.temperature, "window": args.window,
        "tokens_generated": tokens, "sample_wall_s": round(sample_s, 1),
        "single_trace_accuracy": single / (n_prob * args.n), f"pass@{args.n}": pass_n / n_prob,
        "vote_accuracy": {k: v / n_prob for k, v in hits.items()},
        "mean_lowest_window_conf": {
            "right": statistics.fmean(right_conf) if right_conf else None,
            "wrong": statistics.fmean(wrong_conf) if wrong_conf else None,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
