"""nanoGPT's own training recipe on a plain PyTorch GPT: the reference for ``train --preset nanogpt-cpu``.

The model is :class:`gnn_transformer.bench.train_step.PlainGPT` (nanoGPT's GPT without dropout or
biases, attention through ``scaled_dot_product_attention(is_causal=True)``) with nanoGPT's GPT-2
initialization, trained by nanoGPT's loop (``train.py``) at its README's CPU configuration: context
64, batch 12, 4 layers, 4 heads, width 128, 2000 iterations, learning rate 1e-3 with 100 linear
warmup steps and cosine decay to 1e-4, AdamW betas (0.9, 0.99), weight decay 0.1 on the matrices
and embeddings, gradient clipping at 1.0. Batches are drawn at uniform random offsets of the first
90% of the characters; validation is the last 10%.

Validation loss (nats per character) after the last step is reported two ways:

- ``full``: the mean over every non-overlapping window of the validation split, the measure of
  ``gnn-transformer train --task lm --eval-size 100000`` (every window);
- ``nanogpt``: nanoGPT's estimate with ``--eval_iters=20``, 20 random batches of 12 windows.

Usage:
    python benchmarks/nanogpt_reference.py TEXT [--seeds 0 1 2] [--threads 2] [--steps 2000]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gnn_transformer.bench.train_step import PlainGPT

CONTEXT, BATCH, LAYERS, HEADS, WIDTH = 64, 12, 4, 4, 128
STEPS, LR, MIN_LR, WARMUP = 2000, 1e-3, 1e-4, 100


def gpt2_init(model: nn.Module, layers: int) -> None:
    """nanoGPT's ``_init_weights``: linear and embedding weights normal(0, 0.02); the projections
    back into the residual stream normal(0, 0.02 / sqrt(2 layers))."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            residual = name.endswith(("attn.c_proj", "mlp.2"))
            nn.init.normal_(module.weight, 0.0, 0.02 / math.sqrt(2 * layers) if residual else 0.02)


def lr_at(step: int, steps: int = STEPS) -> float:
    """nanoGPT's ``get_lr``: linear warmup, then cosine from ``LR`` to ``MIN_LR`` over ``steps``
    (its ``lr_decay_iters``, the run's length)."""
    if step < WARMUP:
        return LR * (step + 1) / (WARMUP + 1)
    ratio = (step - WARMUP) / max(steps - WARMUP, 1)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def windows(data: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
    """Inputs and next-character targets ``[B, CONTEXT]`` at ``starts``."""
    index = starts[:, None] + torch.arange(CONTEXT)  # [B, T]
    return data[index], data[index + 1]


@torch.no_grad()
def mean_loss(model: nn.Module, data: Tensor, starts: Tensor, chunk: int = 256) -> float:
    total = 0.0
    for i in range(0, starts.numel(), chunk):
        x, y = windows(data, starts[i : i + chunk])
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
    return total / (starts.numel() * CONTEXT)


def run(train: Tensor, val: Tensor, vocab: int, seed: int, steps: int = STEPS) -> dict:
    torch.manual_seed(seed)
    model = PlainGPT(vocab, CONTEXT, LAYERS, HEADS, WIDTH)
    gpt2_init(model, LAYERS)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=LR,
        betas=(0.9, 0.99),
    )
    t0 = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps)
        x, y = windows(train, torch.randint(train.numel() - CONTEXT, (BATCH,)))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    seconds = time.perf_counter() - t0
    model.eval()
    every = torch.arange((val.numel() - 1) // CONTEXT) * CONTEXT  # every non-overlapping window
    estimate = [mean_loss(model, val, torch.randint(val.numel() - CONTEXT, (BATCH,))) for _ in range(20)]
    return dict(seed=seed, full=mean_loss(model, val, every), nanogpt=statistics.mean(estimate), seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("text", help="UTF-8 text file (e.g. tinyshakespeare)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS}, nanoGPT's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    cut = int(0.9 * data.numel())
    train, val = data[:cut], data[cut:]
    print("| seed | val loss, every window | val loss, nanoGPT's 20 batches | training s |")
    print("| --- | --- | --- | --- |")
    rows = []
    for seed in args.seeds:
        row = run(train, val, len(chars), seed, args.steps)
        rows.append(row)
        print(f"| {seed} | {row['full']:.4f} | {row['nanogpt']:.4f} | {row['seconds']:.0f} |", flush=True)
    if len(rows) > 1:
        full = [r["full"] for r in rows]
        print(f"mean {statistics.mean(full):.4f} ± {statistics.stdev(full):.4f} (every window, {len(rows)} seeds)")


if __name__ == "__main__":
    main()
