"""Train the small reasoning Falcon-H1 (trtfalcon/tts/toy_train.py) and write its checkpoint and learning curve.

    python bench/tts/train_toy.py --out tests/data/toy-reasoner --threads 1 --overwrite

(The committed checkpoint was trained with 1 thread: on a 2-core machine shared with other jobs, 2 intra-op
threads ran 3x slower than 1, each waiting on the other at every op; on an idle machine 2 are ~2x faster.)

Every --eval-every steps the model is saved and sampled by trtfalcon's runtime on --eval-problems validation
problems (drawn apart from the held-out test set): greedy and single-trace accuracy at T = 0.6 and 1.0. At the end,
greedy and T = 0.6, 0.8, 1.0 on the held-out set (toy_task.held_out_problems) go to
bench/results/toy_reasoner_train.json and the checkpoint's README.md, with the training wall time, the threads and
the model's size. The checkpoint directory (config.json, model.safetensors, tokenizer files, README.md) is written
atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from trtfalcon.checkpoint.safetensors_io import atomic_output_dir
from trtfalcon.tts.toy_eval import accuracy, sample_traces, toy_engine
from trtfalcon.tts.toy_task import TaskSpec, held_out_problems, save_tokenizer
from trtfalcon.tts.toy_train import TrainConfig, toy_config_dict, train

TEMPERATURES = (0.6, 0.8, 1.0)


def validation_problems(spec: TaskSpec, count: int = 200):  # noqa: ANN201
    """Problems for the learning curve, apart from the held-out test set (and, like it, never trained on)."""
    held = set(held_out_problems(spec=spec))
    return [p for p in held_out_problems(count + 50, spec, seed=777) if p not in held][:count]


def save(model, directory: Path) -> None:  # noqa: ANN001
    model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(directory)


def evaluate(directory: Path, problems, temperatures=TEMPERATURES, seed: int = 0) -> dict[str, float]:  # noqa: ANN001
    engine = toy_engine(directory)
    out = {"greedy": accuracy(sample_traces(engine, problems))}
    for t in temperatures:
        out[f"T={t}"] = accuracy(sample_traces(engine, problems, temperature=t, seed=seed))
    return out


def model_card(result: dict) -> str:
    """README.md of the checkpoint directory: what it is, how it was made, how well it does."""
    held = result["held_out"]
    curve = "\n".join(f"| {r['step']} | {r['greedy']:.2f} | {r['T=0.6']:.2f} | {r['T=1.0']:.2f} |"
                      for r in result["validation_curve"])
    return f"""# toy-reasoner: a small Falcon-H1 trained on long multiplication

Trained from scratch by trtfalcon's `bench/tts/train_toy.py` on the toy task of `trtfalcon/tts/toy_task.py`
({result['parameters']:,} parameters; transformers' FalconH1ForCausalLM, attention and Mamba2 in every layer).
Prompt `<|begin_of_text|>Q:376*82;`, completion `376*2=752;376*80=30080;752+30080=30832;A:30832<|end_of_text|>`.
Character-level tokenizer (AutoTokenizer loads it). A test fixture: right often but not always, so that voting
over sampled traces has something to gain.

    {result['command']}

{result['steps']} steps of {result['batch_size']} problems, seed {result['seed']}, {result['threads']} thread(s):
{result['train_wall_s']:.0f} s of training on a shared 2-core machine.

Held-out accuracy ({held['problems']} problems, one trace each, top_p 1): greedy {held['greedy']:.3f},
T=0.6 {held['T=0.6']:.3f}, T=0.8 {held['T=0.8']:.3f}, T=1.0 {held['T=1.0']:.3f}.

Validation curve (100 other problems):

| step | greedy | T=0.6 | T=1.0 |
|---|---|---|---|
{curve}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--overwrite", action="store_true", help="Replace an existing --out directory.")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-problems", type=int, default=100, help="Validation problems per evaluation.")
    ap.add_argument("--results", type=Path,
                    default=Path(__file__).resolve().parents[1] / "results" / "toy_reasoner_train.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = TaskSpec()
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, spec=spec,
                      model=toy_config_dict(args.hidden, args.layers, args.intermediate))
    val = validation_problems(spec, args.eval_problems)
    curve = []
    eval_s = 0.0
    scratch = Path(tempfile.mkdtemp(prefix="toy-eval-"))

    def on_eval(step: int, model) -> None:  # noqa: ANN001
        nonlocal eval_s
        t = time.perf_counter()
        save(model, scratch)
        row = {"step": step, **evaluate(scratch, val, temperatures=(0.6, 1.0))}
        curve.append(row)
        eval_s += time.perf_counter() - t
        print("eval", json.dumps(row), flush=True)

    t0, c0 = time.perf_counter(), time.process_time()
    model = train(cfg, on_eval, args.eval_every, log=lambda s: print(s, flush=True))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(scratch, ignore_errors=True)
    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        save(model, tmp)
        held = evaluate(tmp, held_out_problems(spec=spec))
        result = {
            "command": "python bench/tts/train_toy.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("results", "overwrite")),
            "threads": args.threads, "cpu_count": os.cpu_count(),
            "train_wall_s": round(wall - eval_s, 1), "eval_wall_s": round(eval_s, 1),
            "cpu_s_incl_eval": round(cpu, 1), "load_average_at_end": os.getloadavg(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
            "task": {"a_digits": spec.a_digits, "b_digits": spec.b_digits},
            "validation_curve": curve, "held_out": {"problems": len(held_out_problems(spec=spec)), **held},
        }
        (tmp / "README.md").write_text(model_card(result))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "validation_curve"}, indent=1))


if __name__ == "__main__":
    main()
