"""Train the project's small reasoning Falcon-H1 on the toy task (toy_task.py), on a CPU, from a fixed seed.

The model is transformers' FalconH1ForCausalLM itself (the oracle trtfalcon is tested against), so the checkpoint
it saves is an ordinary HF Falcon-H1 checkpoint that every trtfalcon stage reads. Its config exercises what the
real family has: attention and Mamba2 in parallel in every layer, GQA, the gated RMSNorm with
norm_before_gate=false, Mamba heads a different size from attention heads, sequences longer than the SSD chunk,
and non-unit muP multipliers (so that convert's folding is not an identity). Trained from scratch, both mixers
carry signal: zeroing either one's output multiplier ruins the model (tests/tts/test_toy_model.py).

Supervised on the completion only (prompt tokens carry no loss); AdamW with linear warm-up and cosine decay.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from trtfalcon.config import preset_dict
from trtfalcon.tts.toy_task import (
    BOS_ID, EOS_ID, PAD_ID, VOCAB, Problem, TaskSpec, encode, held_out_problems, training_problems,
)

TOY_MULTIPLIERS: dict[str, Any] = {
    # Mild muP-style multipliers: every one non-unit, so folding them (convert) is exercised, none so far from 1
    # that training at this width needs the 7B's learning-rate scaling.
    "embedding_multiplier": 2.0,
    "lm_head_multiplier": 0.5,
    "key_multiplier": 0.5,
    "attention_in_multiplier": 0.75,
    "attention_out_multiplier": 0.5,
    "ssm_in_multiplier": 0.75,
    "ssm_out_multiplier": 0.5,
    "mlp_multipliers": [0.75, 0.5],
    "ssm_multipliers": [1.0, 0.75, 0.5, 0.5, 1.0],
}


def toy_config_dict(hidden_size: int = 128, num_layers: int = 4, intermediate_size: int = 384) -> dict[str, Any]:
    """config.json of the toy reasoner: the tiny preset's family-wide choices (gated RMSNorm after the gate, no
    biases, untied embeddings, RoPE theta 1e4), resized, with the toy vocabulary and TOY_MULTIPLIERS."""
    cfg = preset_dict("tiny")
    cfg.update(
        vocab_size=len(VOCAB), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
        mamba_d_ssm=2 * hidden_size, mamba_n_heads=2 * hidden_size // 16,
        mamba_d_head=16,  # != the attention head_dim
        mamba_n_groups=1,
        mamba_d_state=16,
        mamba_chunk_size=32,  # prompt + trace (up to 59 tokens) cross a chunk boundary
        max_position_embeddings=512, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        **TOY_MULTIPLIERS,
    )
    return cfg


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    spec: TaskSpec = field(default_factory=TaskSpec)
    model: dict[str, Any] = field(default_factory=toy_config_dict)


def make_batch(problems: list[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (B, T) = BOS prompt solution EOS, right-padded; labels (B, T) = next token on completion positions
    (the solution and EOS), -100 elsewhere. Right padding never reaches earlier positions of a causal model."""
    rows, targets = [], []
    for p in problems:
        prompt = [BOS_ID, *encode(p.prompt)]
        completion = [*encode(p.solution), EOS_ID]
        rows.append(prompt + completion)
        targets.append([-100] * len(prompt) + completion)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, targets)):
        ids[i, :len(r)] = torch.tensor(r)
        labels[i, :len(t) - 1] = torch.tensor(t[1:])  # position j predicts token j + 1
    return ids, labels


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(cfg: TrainConfig):  # noqa: ANN201 - transformers.FalconH1ForCausalLM
    from transformers import FalconH1Config, FalconH1ForCausalLM

    d = {k: v for k, v in cfg.model.items() if k not in ("model_type", "architectures")}
    torch.manual_seed(cfg.seed)
    return FalconH1ForCausalLM(FalconH1Config(**d)).float()


def completion_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    logits = model(ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def train(cfg: TrainConfig, on_eval: Callable[[int, Any], None] | None = None, eval_every: int = 0,
          log: Callable[[str], None] = print):  # noqa: ANN201 - the trained model
    """Train from cfg.seed; call on_eval(step, model) every eval_every steps and at the end (model in eval mode)."""
    model = build_model(cfg)
    exclude = set(held_out_problems(spec=cfg.spec))
    rng = random.Random(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    t0 = time.perf_counter()
    tokens = 0
    running = None
    for step in range(cfg.steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        # Both operand sizes in every batch (batches of one size each learned more slowly); rows differ by <= 7
        # tokens, so padding costs little.
        ids, labels = make_batch(training_problems(rng, cfg.batch_size, cfg.spec, exclude))
        loss = completion_loss(model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += int((ids != PAD_ID).sum())
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        done = step + 1
        if done % 50 == 0 or done == cfg.steps:
            dt = time.perf_counter() - t0
            log(f"step {done}/{cfg.steps} loss {running:.4f} lr {lr_at(step, cfg):.2e} "
                f"{tokens / dt:.0f} tok/s {dt:.0f} s")
        if on_eval is not None and ((eval_every and done % eval_every == 0) or done == cfg.steps):
            model.eval()
            on_eval(done, model)
    model.eval()
    return model
