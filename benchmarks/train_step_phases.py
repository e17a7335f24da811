"""Where a ``GraphLM`` training step spends its time beyond the plain PyTorch GPT's, phase by phase.

The models of ``gnn-transformer bench --train-step`` (nanoGPT's CPU configuration by default) take
their steps in a shuffled order each round, so that load from other processes reaches all of them
alike; each step is timed as forward (with the loss), backward and AdamW. The table gives each
model's median phase times and, for the ``GraphLM`` models, the median over rounds of the
difference from the GPT's step of the same round.

``--other DIR`` adds a ``GraphLM`` from another copy of the package (a directory holding the
``gnn_transformer`` package of another commit, renamed, e.g. ``old/gnn_base``; the package's
imports are relative, so it loads side by side), to compare two commits in one process.

Usage:
    python benchmarks/train_step_phases.py                     # context 64, 400 rounds, 2 threads
    python benchmarks/train_step_phases.py --other old/gnn_base
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gnn_transformer
from gnn_transformer.bench.train_step import PlainGPT

PHASES = ("forward", "backward", "adamw", "step")


def _graph_lm(package, vocab: int, context: int, layers: int, heads: int, width: int, seed: int):
    torch.manual_seed(seed)
    config = package.GraphTransformerConfig(
        vocab_size=vocab, d_model=width, nhead=heads, num_layers=layers, bias=False, max_positions=context
    )
    return package.GraphLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--other", type=Path, help="a renamed copy of another commit's gnn_transformer package")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vocab, layers, heads, width, seed = 65, 4, 4, 128, 0
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (args.batch, args.context), generator=gen)
    targets = torch.randint(0, vocab, (args.batch, args.context), generator=gen)
    pos = torch.arange(args.context).repeat(args.batch)

    torch.manual_seed(seed)
    models = {"gpt_sdpa": (PlainGPT(vocab, args.context, layers, heads, width), None)}
    packages = [("graph_lm", gnn_transformer)]
    if args.other is not None:
        sys.path.insert(0, str(args.other.parent))
        packages.append((f"graph_lm ({args.other.name})", importlib.import_module(args.other.name)))
    for name, package in packages:
        lm = _graph_lm(package, vocab, args.context, layers, heads, width, seed)
        models[name] = (lm, package.topology.causal([args.context] * args.batch))

    def loss_of(model, edge_index):
        if edge_index is None:
            return F.cross_entropy(model(idx).view(-1, vocab), targets.view(-1))
        return F.cross_entropy(model(idx.view(-1), edge_index, pos=pos), targets.view(-1))

    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-3) for name, (model, _) in models.items()}
    times: dict[str, list[tuple[float, ...]]] = {name: [] for name in models}
    order = list(models)
    for round_ in range(args.rounds + 3):  # 3 warm-up rounds
        random.shuffle(order)
        for name in order:
            model, edge_index = models[name]
            optimizers[name].zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = loss_of(model, edge_index)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            optimizers[name].step()
            t3 = time.perf_counter()
            if round_ >= 3:
                times[name].append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))

    print(
        f"context {args.context}, batch {args.batch}, {args.rounds} rounds, {args.threads} threads, "
        f"torch {torch.__version__}"
    )
    print("| model | " + " | ".join(f"{p} ms" for p in PHASES) + " |")
    print("|---" * (len(PHASES) + 1) + "|")
    base = times["gpt_sdpa"]
    for name, rows in times.items():
        cells = []
        for i in range(len(PHASES)):
            cell = f"{1e3 * statistics.median(r[i] for r in rows):.2f}"
            if name != "gpt_sdpa":
                cell += f" ({1e3 * statistics.median(r[i] - b[i] for r, b in zip(rows, base)):+.2f})"
            cells.append(cell)
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
