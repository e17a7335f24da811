"""A small sparse-topology experiment: one model, several attention graphs, one task.

Trains the same small transformer (same initial weights, same batches) on associative recall
under full attention, a sliding window, BigBird and random attention, and prints accuracy on the
training sizes and on longer sequences. ``gnn-transformer compare`` is the full version.

Usage:
    python examples/sparse_topologies.py [--steps 300]
"""

from __future__ import annotations

import argparse

from gnn_transformer.experiments.compare import DEFAULT_TOPOLOGIES, CompareConfig, run_compare
from gnn_transformer.experiments.models import EncoderConfig
from gnn_transformer.experiments.training import TrainConfig


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-size", type=int, default=128)
    args = parser.parse_args(argv)
    config = CompareConfig(
        task="recall",
        topologies=DEFAULT_TOPOLOGIES,
        eval_size=args.eval_size,
        model=EncoderConfig(d_model=64, nhead=4, num_layers=2, dim_feedforward=128),
        train=TrainConfig(steps=args.steps, batch_size=32, lr=2e-3, warmup=max(args.steps // 10, 1)),
    )
    result = run_compare(config)
    print(f"{'topology':<46} {'edges/seq':>9} {'acc':>6} {'longer':>7} {'err vs dense':>12}")
    for r in result.results:
        print(
            f"{r.topology:<46} {r.edges_per_seq:>9.1f} {r.acc_test:>6.3f} {r.acc_longer:>7.3f} "
            f"{r.max_dense_error:>12.1e}"
        )
    return result


if __name__ == "__main__":
    main()
