"""Accuracy against tokens generated on the toy reasoner: one trace, majority@N, DeepConf offline and online@N.

    python bench/tts/toy_tts_pareto.py --checkpoint tests/data/toy-reasoner --problems 100 --budgets 8 32 64 \
        --temperature 0.8 --window 16 --top-k 20 --warmup-cap 16 --seed 0

For each held-out problem (toy_task.held_out_problems) the runtime samples max(budgets) traces to their end
(tts.run.run_tts_many, mode offline: every problem in flight, one prefill per request of n samples; trace k of every
problem seeded with seed + k, as run_tts seeds them) with DeepConf's confidence recorded per token
(ConfidenceParams(top_k, window), no threshold). The offline methods at a budget N use the first N of those traces
(same seeds, so the same traces an N-trace run draws): single-trace accuracy (the mean over the traces), pass@N (some
trace right: the ceiling of any vote), majority@N, and DeepConf-low / -high offline@N (eta 10 / 90: the top-eta% of
traces by lowest-window confidence, vote weighted by it); their tokens are all N traces' tokens.

DeepConf online@N runs in the engine: W warm-up traces to their end set the threshold (warmup_threshold of their
lowest groups, eta 10 = low, 90 = high), then the other N - W traces run with it and the scheduler stops a trace
the step its full window's mean falls below it (finish_reason "confidence"); tokens = the warm-up's plus every
later trace's up to its stop. W = min(--warmup-cap, N // 2): DeepConf's 16 warm-up traces where the budget allows
it, but never more than half the budget, so at N = 8 (W = 4) half the traces can still be stopped early; fewer
than 4 warm-up traces would put the 90th percentile (DeepConf-low's threshold) on one or two traces. The same
online protocol is also replayed from the offline traces' recorded confidences (trtfalcon.tts.online_sim) and
compared trace by trace (`compare`): with the same logits to the last bit the two are equal
(tests/tts/test_online_replay.py); in flight a trace's fp32 logits change in their last bits with what shares its
steps, so a stop, a voter or a winner that sits on its boundary (a tie) may go either way, and the table counts
those and anything else that differs.

Settings: temperature 0.8 (the middle of the range the model was evaluated at; toy_offline_vote's), top_p 1 and no
sampling top-k, so the distribution DeepConf's confidence is taken from (the tempered one before truncation:
deepconf.py's docstring) is the one the tokens are drawn from; confidence top-k 20 (DeepConf's;
the vocabulary has 53 tokens); window 16 tokens, not DeepConf's 2048: the toy traces are ~43 tokens, and a window
longer than the trace is never full, so online would never stop and min_conf would be the trace mean; 16 tokens
is one to two written steps (e.g. "376*80=30080;"), local enough to catch one uncertain step. --threads 1 on the
shared 2-core machine.

Prints the table and writes bench/results/toy_tts_pareto.json, .md (the table) and .png (accuracy against tokens
generated per problem: one point per (method, N), a line per method).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from trtfalcon.tts.answers import TOY_ANSWER
from trtfalcon.tts.deepconf import DEEPCONF_HIGH_ETA, DEEPCONF_LOW_ETA
from trtfalcon.tts.online_sim import SimulatedOnline, group_confidences, simulate_online
from trtfalcon.tts.run import TraceResult, TTSConfig, TTSResult, run_tts_many
from trtfalcon.tts.toy_eval import MAX_COMPLETION_TOKENS, toy_engine
from trtfalcon.tts.toy_task import Problem, decode, held_out_problems, prompt_ids
from trtfalcon.tts.vote import VoteResult, offline_votes

ETAS = {"low": DEEPCONF_LOW_ETA, "high": DEEPCONF_HIGH_ETA}
RESULTS = Path(__file__).resolve().parents[1] / "results"
# A window mean this close to the threshold (confidences here are ~10-20, their fp32 rounding ~1e-6) is a tie that
# the last bits of the logits decide (compare); the replay is also run with ties stopped / ties running on.
TIE = 1e-4


def warmup_for(budget: int, cap: int) -> int:
    """DeepConf's warm-up (16 traces) capped at half the budget, so that half the traces at least can stop early."""
    return max(1, min(cap, budget // 2))


def config(args: argparse.Namespace, budget: int, mode: str, eta: float = DEEPCONF_LOW_ETA,
           warmup: int = 1) -> TTSConfig:
    return TTSConfig(budget=budget, warmup=warmup, mode=mode, eta=eta, top_k=args.top_k, window=args.window,
                     temperature=args.temperature, top_p=1.0, max_new_tokens=MAX_COMPLETION_TOKENS, seed=args.seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("tests/data/toy-reasoner"))
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--budgets", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--window", type=int, default=16, help="DeepConf group window, tokens (2048 for real models).")
    ap.add_argument("--top-k", type=int, default=20, help="log-probs per token in DeepConf's confidence.")
    ap.add_argument("--warmup-cap", type=int, default=16, help="online warm-up W = min(cap, N // 2).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=256)
    ap.add_argument("--out", type=Path, default=RESULTS / "toy_tts_pareto.json",
                    help="the JSON; the .md table and the .png plot go beside it.")
    ap.add_argument("--from-json", action="store_true",
                    help="measure nothing: write the table and the plot again from the --out JSON.")
    args = ap.parse_args()
    args.budgets = sorted(set(args.budgets))
    torch.set_num_threads(args.threads)
    report = json.loads(args.out.read_text()) if args.from_json else measure(args)
    table = markdown(report)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.from_json:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table)
    plot(report, args.out.with_suffix(".png"))
    written = [] if args.from_json else [args.out]
    print("wrote " + ", ".join(map(str, [*written, args.out.with_suffix(".md"), args.out.with_suffix(".png")])),
          file=sys.stderr)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    problems = held_out_problems(args.problems)
    prompts = [prompt_ids(p) for p in problems]
    engine = toy_engine(args.checkpoint, max_batch_size=args.max_batch_size)
    n_prob, top = len(problems), max(args.budgets)

    t0 = time.perf_counter()
    full = [r.traces for r in run_tts_many(engine, prompts, config(args, top, "offline"), TOY_ANSWER, decode=decode)]
    offline_s = time.perf_counter() - t0
    right = [[t.answer == p.answer for t in ts] for p, ts in zip(problems, full)]
    tokens = [[t.num_tokens for t in ts] for ts in full]

    budgets = []
    for n in args.budgets:
        w = warmup_for(n, args.warmup_cap)
        toks = sum(sum(x[:n]) for x in tokens)
        votes = [offline_votes([t.scored for t in ts[:n]]) for ts in full]
        acc = {k: sum(v[k].answer == p.answer for v, p in zip(votes, problems)) / n_prob for k in votes[0]}
        rows = {
            "single trace": (sum(sum(r[:n]) for r in right) / (n_prob * n), toks / n),
            f"majority@{n}": (acc["majority"], toks),
            f"DeepConf-low offline@{n}": (acc["top10_lowest_window"], toks),
            f"DeepConf-high offline@{n}": (acc["top90_lowest_window"], toks),
        }
        online = {}
        for level, eta in ETAS.items():
            t1 = time.perf_counter()
            eng = run_tts_many(engine, prompts, config(args, n, "online", eta, w), TOY_ANSWER, decode=decode)
            wall = time.perf_counter() - t1
            replays = {margin: [simulate_online([t.output.confidences for t in ts[:n]], [t.answer for t in ts[:n]],
                                                warmup=w, eta=eta, window=args.window, stop_margin=margin)
                                for ts in full] for margin in (0.0, TIE, -TIE)}
            sims = replays[0.0]
            e_acc = correct(eng, problems)
            e_tok = sum(r.tokens_generated for r in eng)
            rows[f"DeepConf-{level} online@{n}"] = (e_acc, e_tok)
            online[level] = {
                "eta": eta, "warmup": w,
                "engine": {"accuracy": e_acc, "tokens_generated": e_tok, "wall_s": round(wall, 1),
                           "traces_stopped": sum(r.num_stopped for r in eng), "no_answer": sum(
                               r.answer is None for r in eng)},
                **{name: {"accuracy": correct(r, problems), "tokens_generated": sum(s.tokens_generated for s in r),
                          "traces_stopped": sum(sum(s.stopped) for s in r)}
                   for name, r in (("simulation", sims), ("simulation_ties_stop", replays[TIE]),
                                   ("simulation_ties_run_on", replays[-TIE]))},
                "traces_stoppable": n_prob * (n - w),
                "tokens_saved_vs_all_traces": 1 - e_tok / toks,
                "mean_threshold": statistics.fmean(r.threshold for r in eng),
                "engine_vs_simulation": compare(eng, sims, full, n, args.window),
            }
        rows[f"pass@{n}"] = (sum(any(r[:n]) for r in right) / n_prob, toks)
        budgets.append({
            "n": n, "warmup": w, "tokens_all_traces": toks,
            "rows": [{"method": k, "accuracy": a, "tokens_generated": t, "tokens_per_problem": t / n_prob}
                     for k, (a, t) in rows.items()],
            "online": online, "offline_vote_accuracy": acc,
        })
    return {
        "command": (f"python bench/tts/toy_tts_pareto.py --checkpoint {args.checkpoint} --problems {args.problems} "
                    f"--budgets {' '.join(map(str, args.budgets))} --temperature {args.temperature} --window "
                    f"{args.window} --top-k {args.top_k} --warmup-cap {args.warmup_cap} --seed {args.seed} "
                    f"--threads {args.threads}"),
        "problems": n_prob, "temperature": args.temperature, "top_p": 1.0, "confidence_top_k": args.top_k,
        "window": args.window, "warmup_cap": args.warmup_cap, "seed": args.seed,
        "offline_traces": n_prob * top, "offline_wall_s": round(offline_s, 1),
        "mean_trace_tokens": statistics.fmean(x for xs in tokens for x in xs),
        "traces": trace_facts(full, right, args.window),
        "budgets": budgets,
    }


def correct(results: Sequence[TTSResult | SimulatedOnline], problems: Sequence[Problem]) -> float:
    return sum((r.answer if isinstance(r, TTSResult) else r.vote.answer) == p.answer
               for r, p in zip(results, problems)) / len(problems)


def trace_facts(full: list[list[TraceResult]], right: list[list[bool]], window: int) -> dict[str, Any]:
    """What explains the votes: how far min_conf separates right from wrong traces, where the lowest window sits,
    how often a trace is a token-for-token twin of an earlier one of its problem (twins share confidences, so
    their lowest windows tie and a threshold set from one sits exactly on the others)."""
    lw = {True: [], False: []}
    ends = []
    twins = 0
    for ts, rs in zip(full, right):
        seen = set()
        for t, r in zip(ts, rs):
            lw[r].append(t.scores.lowest_window)
            g = group_confidences(t.output.confidences, window)
            if len(g) >= window:
                ends.append(min(range(window - 1, len(g)), key=g.__getitem__) + 1)
            key = tuple(t.output.token_ids)
            twins += key in seen
            seen.add(key)
    n = sum(map(len, full))
    # AUROC of min_conf for right vs wrong: P(a right trace scores above a wrong one), ties half
    pos, neg = sorted(lw[True]), sorted(lw[False])
    auc = None
    if pos and neg:
        import bisect

        auc = sum(bisect.bisect_left(neg, x) + 0.5 * (bisect.bisect_right(neg, x) - bisect.bisect_left(neg, x))
                  for x in pos) / (len(pos) * len(neg))
    return {
        "mean_lowest_window": {"right": statistics.fmean(pos) if pos else None,
                               "wrong": statistics.fmean(neg) if neg else None},
        "lowest_window_auroc_right_vs_wrong": auc,
        "lowest_window_ends_at_token_median": statistics.median(ends) if ends else None,
        "lowest_window_ends_within_first_window_plus_8": sum(e <= window + 8 for e in ends) / len(ends) if ends
        else None,
        "twin_traces": twins / n,
    }


def votes_equal(a: VoteResult, b: VoteResult) -> bool:
    """The same winner, and every answer with the same votes and weight to rounding (the order of answers whose
    weights tie below the winner is rounding's too, and decides nothing)."""
    wa, wb = {x: (k, w) for x, k, w in a.table}, {x: (k, w) for x, k, w in b.table}
    return a.answer == b.answer and wa.keys() == wb.keys() and all(
        wa[x][0] == wb[x][0] and abs(wa[x][1] - wb[x][1]) <= TIE * max(1.0, abs(wa[x][1])) for x in wa)


def x_tokens(t: TraceResult, full: list[TraceResult]) -> list[int]:
    """The offline trace's tokens over the online trace's length (the same seed: trace index t.index)."""
    return full[t.index].output.token_ids[:t.num_tokens]


def compare(engine: list[TTSResult], sims: list[SimulatedOnline], full: list[list[TraceResult]], n: int,
            window: int) -> dict[str, Any]:
    """The engine's online run against its replay from the offline traces, trace by trace.

    The two draw the same random numbers (same seeds) but not from the same fp32 logits to the last bit: a
    trace's logits change with what shares its steps (the CPU ops' decode attention reduces over the step's longest
    context, plugins/torch_batched.py; matmuls of fewer than 4 rows take another kernel), and the online run's steps
    hold other traces than the offline run's. That decides only what sits on a boundary to rounding:
    - a stop: a window mean that ties the threshold (the toy model writes most traces more than once, and a twin of
      the warm-up trace that set the threshold sits exactly on it): stop_decisions_differ, of_which_ties;
    - a voter: a trace whose lowest window ties the threshold votes in one run and not in the other
      (online_vote keeps lowest >= threshold): voters_differ, of_which_lowest_window_ties;
    - a vote: two answers whose weights tie (twins again): of_which_weight_ties;
    - a token: a draw within rounding of a boundary of the sampling CDF (token_ids_not_prefix; the rest of such a
      trace is another trace).
    Every differing stop is checked to be a tie; a problem's tokens must be equal, and its vote too unless its
    weights tie, where none of these happened."""
    d = {"threshold_max_abs_diff": 0.0, "confidence_max_abs_diff": 0.0, "traces_confidences_bitwise_equal": 0,
         "traces_same_tokens": 0, "token_ids_not_prefix": 0, "stop_decisions_differ": 0, "of_which_ties": 0,
         "voters_differ": 0, "of_which_lowest_window_ties": 0, "votes_differ": 0, "of_which_weight_ties": 0, "votes_differ_without_a_tie": 0,
         "tokens_generated_differ_without_a_tie": 0}
    for r, s, ts in zip(engine, sims, full):
        d["threshold_max_abs_diff"] = max(d["threshold_max_abs_diff"], abs(r.threshold - s.threshold))
        ties_here = 0
        for t, stopped, kept, f in zip(r.traces, s.stopped, s.kept_tokens, ts[:n]):
            if t.output.token_ids != f.output.token_ids[:t.num_tokens]:
                d["token_ids_not_prefix"] += 1
                ties_here += 1
                continue
            mine, theirs = t.output.confidences, f.output.confidences[:t.num_tokens]
            d["traces_same_tokens"] += 1
            d["traces_confidences_bitwise_equal"] += mine == theirs
            d["confidence_max_abs_diff"] = max(d["confidence_max_abs_diff"],
                                               max(abs(a - b) for a, b in zip(mine, theirs)))
            if t.stopped != stopped or t.num_tokens != kept:
                d["stop_decisions_differ"] += 1
                at = min(t.num_tokens, kept) - 1  # the token where one of the two stopped
                g = group_confidences(f.output.confidences, window)[at]
                d["of_which_ties"] += abs(g - s.threshold) <= TIE
                ties_here += 1
        # who votes: online_vote keeps traces with lowest window >= threshold; a twin of the threshold's trace sits on it
        for t, x, stopped in zip(r.traces, s.traces, s.stopped):
            if t.stopped != stopped or t.output.token_ids != x_tokens(t, ts):
                continue  # counted above
            votes_eng = bool(t.answer) and not t.stopped and t.scores.lowest_window >= r.threshold
            votes_sim = bool(x.answer) and not x.stopped and x.scores.lowest_window >= s.threshold
            if votes_eng != votes_sim:
                d["voters_differ"] += 1
                d["of_which_lowest_window_ties"] += abs(x.scores.lowest_window - s.threshold) <= TIE
                ties_here += 1
        if not votes_equal(r.vote, s.vote):
            d["votes_differ"] += 1
            w = sorted((x for _, _, x in s.vote.table), reverse=True)
            weight_tie = len(w) > 1 and w[0] - w[1] <= TIE
            d["of_which_weight_ties"] += weight_tie and not ties_here
            d["votes_differ_without_a_tie"] += not ties_here and not weight_tie
        if r.tokens_generated != s.tokens_generated and not ties_here:
            d["tokens_generated_differ_without_a_tie"] += 1
    d["equal"] = d["stop_decisions_differ"] == 0 and d["votes_differ"] == 0 and d["token_ids_not_prefix"] == 0
    d["equal_up_to_ties"] = (d["of_which_ties"] == d["stop_decisions_differ"] and d["votes_differ_without_a_tie"]
                             == 0 and d["tokens_generated_differ_without_a_tie"] == 0
                             and d["of_which_lowest_window_ties"] == d["voters_differ"])
    return d


def markdown(report: dict[str, Any]) -> str:
    f = report["traces"]
    lines = [
        f"# Test-time scaling on the toy reasoner: accuracy against tokens generated ({report['problems']} held-out "
        "problems)",
        "",
        f"`{report['command']}`",
        "",
        f"Temperature {report['temperature']}, top_p 1, DeepConf confidence top-{report['confidence_top_k']}, window "
        f"{report['window']} tokens; traces average {report['mean_trace_tokens']:.1f} tokens. Offline methods at N "
        f"use the first N of the {max(b['n'] for b in report['budgets'])} traces per problem (trace k has seed "
        f"{report['seed']} + k, for every N); online runs in the engine (the scheduler stops a trace: finish_reason "
        f"\"confidence\"), its W warm-up traces (W = min({report['warmup_cap']}, N/2)) counted in its tokens. "
        "\"Tokens\" are generated tokens over all problems (prompts not counted).",
        "",
        "| N | method | accuracy | tokens generated | tokens / problem | vs all N traces |",
        "|---|---|---|---|---|---|",
    ]
    for b in report["budgets"]:
        for row in b["rows"]:
            saved = 1 - row["tokens_generated"] / b["tokens_all_traces"]
            vs = "1 trace" if row["method"] == "single trace" else ("=" if saved == 0 else f"-{100 * saved:.1f} %")
            method = row["method"] + (f" (W={b['warmup']})" if "online" in row["method"] else "")
            lines.append(f"| {b['n']} | {method} | {100 * row['accuracy']:.1f} % | {row['tokens_generated']:,.0f} | "
                         f"{row['tokens_per_problem']:.0f} | {vs} |")
    lines += ["", "DeepConf online: the engine against its replay from the offline traces' confidences "
              "(trtfalcon.tts.online_sim; same seeds, same protocol):", "",
              "| N | W | eta | engine: accuracy / tokens / stopped | replay | replay, ties stop | replay, ties run on "
              "| stoppable | mean threshold | stops differ (of which ties) | tokens flipped | voters differ (ties) "
              "| votes differ (weight ties) | equal |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cmp = [o["engine_vs_simulation"] for b in report["budgets"] for o in b["online"].values()]
    for b in report["budgets"]:
        for o in b["online"].values():
            e, s, c = o["engine"], o["simulation"], o["engine_vs_simulation"]
            eq = "yes" if c["equal"] else ("up to ties" if c["equal_up_to_ties"] else "NO")
            cells = " | ".join(f"{100 * x['accuracy']:.1f} % / {x['tokens_generated']:,} / {x['traces_stopped']}"
                               for x in (e, s, o["simulation_ties_stop"], o["simulation_ties_run_on"]))
            lines.append(f"| {b['n']} | {o['warmup']} | {o['eta']:g} | {cells} | {o['traces_stoppable']} | "
                         f"{o['mean_threshold']:.3f} | {c['stop_decisions_differ']} ({c['of_which_ties']}) | "
                         f"{c['token_ids_not_prefix']} | {c['voters_differ']} ({c['of_which_lowest_window_ties']}) | "
                         f"{c['votes_differ']} ({c['of_which_weight_ties']}) | {eq} |")
    cmp = [o["engine_vs_simulation"] for b in report["budgets"] for o in b["online"].values()]
    lines += ["", "Stopped traces in the engine are finish_reason \"confidence\"; \"replay\" replays the protocol from "
              "the offline traces' recorded confidences; \"ties stop\" / \"ties run on\" replay it with the stop "
              f"threshold moved by +/-{TIE:g}. Same seeds, but not the same logits to the last bit: the confidences "
              f"of {sum(c['traces_same_tokens'] - c['traces_confidences_bitwise_equal'] for c in cmp):,} of "
              f"{sum(c['traces_same_tokens'] for c in cmp):,} online traces with the offline trace's tokens differ "
              f"from the offline run's (max {max(c['confidence_max_abs_diff'] for c in cmp):.1e}): a trace's fp32 "
              "logits change with what shares its steps (decode attention over the step's longest context, "
              "small-row matmuls). That decides what sits on a boundary: a window mean on the threshold (a stop "
              f"counted as a tie when the replay's window mean is within {TIE:g} of it), a lowest window on the "
              "threshold (the trace votes in one run and not in the other), two answers' equal weights "
              "(a weight tie), a random draw on a CDF boundary (a flipped token: the trace goes on differently). "
              "\"up to ties\": nothing else differs. One trace at a time (batch 1) the engine equals the replay "
              "exactly (tests/tts/test_online_replay.py)."]
    m = f["mean_lowest_window"]
    lines += ["", f"Lowest-window confidence (min_conf) of right traces {m['right']:.3f} on average, wrong "
              f"{m['wrong']:.3f}; AUROC right vs wrong {f['lowest_window_auroc_right_vs_wrong']:.3f}. The lowest "
              f"window ends at token {f['lowest_window_ends_at_token_median']:g} (median); "
              f"{100 * f['twin_traces']:.1f} % of traces are token-for-token twins of an earlier trace of their "
              "problem.", ""]
    return "\n".join(lines)


STYLE = {  # method (without @N) -> matplotlib style
    "majority": dict(color="tab:blue", marker="o"),
    "DeepConf-low offline": dict(color="tab:red", marker="s"),
    "DeepConf-high offline": dict(color="tab:green", marker="s"),
    "DeepConf-low online": dict(color="tab:red", marker="^", linestyle="--"),
    "DeepConf-high online": dict(color="tab:green", marker="^", linestyle="--"),
    "pass": dict(color="gray", marker=".", linestyle=":"),
}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method, style in STYLE.items():
        pts = [(r["tokens_per_problem"], 100 * r["accuracy"], b["n"]) for b in report["budgets"] for r in b["rows"]
               if r["method"].rsplit("@", 1)[0] == method]
        label = "pass@N (any trace right: the ceiling)" if method == "pass" else f"{method}@N"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
        if method == "majority":
            for x, y, n in pts:
                ax.annotate(f"N={n}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    # how much of online's figure is rounding: its replay with every tie stopped ... every tie running on
    labelled = False
    for b in report["budgets"]:
        for level, o in b["online"].items():
            ends = [o[k] for k in ("simulation_ties_stop", "simulation_ties_run_on")]
            ax.plot([e["tokens_generated"] / report["problems"] for e in ends], [100 * e["accuracy"] for e in ends],
                    color=STYLE[f"DeepConf-{level} online"]["color"], alpha=0.35, linewidth=4, solid_capstyle="round",
                    label=None if labelled else "online replayed: ties stop ... ties run on")
            labelled = True
    single = [(r["tokens_per_problem"], 100 * r["accuracy"]) for b in report["budgets"] for r in b["rows"]
              if r["method"] == "single trace"]
    ax.plot([statistics.fmean(x for x, _ in single)], [statistics.fmean(y for _, y in single)], "k*", markersize=12,
            label="single trace")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens generated per problem (log scale)")
    ax.set_ylabel(f"accuracy on {report['problems']} held-out problems (%)")
    ax.set_title(f"toy reasoner (1.2 M parameters), T={report['temperature']}, window {report['window']}: accuracy "
                 "vs tokens", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
