"""``gnn-transformer train``: one training run with all options (under torchrun too)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ._common import (EXIT_OK, UsageError, size_range, Given, check_out_dir, check_device, add_model_args,
                      add_train_args, check_seed, model_config, train_config)


def add_parser(sub) -> None:
    from ..experiments.models import EncoderConfig
    from ..experiments.runs import ALL_TASKS
    from ..experiments.training import TrainConfig

    p = sub.add_parser(
        "train", help="one training run with all options (runs under torchrun too)",
        description="Train one model on a built-in task under one topology. Sequence tasks take "
        "a topology spec; graph tasks (karate, shortest_path) 'graph' or 'full'; digits 'grid' or "
        "'full'. Writes train_log.csv, train_eval.csv, train.json, loss.png and model.pt in --out. "
        "Under 'torchrun --nproc_per_node=K -m gnn_transformer.cli train ...' it trains with "
        "DistributedDataParallel.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=ALL_TASKS, default="recall")
    p.add_argument("--topology", default=None,
                   help="topology spec (default: full; 'graph' for graph tasks, 'grid' for digits)")
    p.add_argument("--train-sizes", type=size_range, help="instance sizes to train on, e.g. 6-12")
    p.add_argument("--test-sizes", type=size_range, help="longer sizes to test on, e.g. 13-24")
    p.add_argument("--pe-dim", type=int, default=4, action=Given,
                   help="graph tasks: Laplacian eigenvector PE size")
    p.add_argument("--virtual-node", action="store_true", help="graph tasks: add a virtual node")
    p.add_argument("--patch", type=int, default=2, action=Given, help="digits: patch side in pixels")
    p.add_argument("--out", default="runs/train", help="output folder")
    p.add_argument("--save-all-ranks", action="store_true",
                   help="under torchrun, every rank also writes model_rank<r>.pt")
    add_model_args(p, EncoderConfig())
    add_train_args(p, TrainConfig())
    p.set_defaults(func=run)


def _check_task_options(args) -> None:
    """Refuse the options given for another task than ``--task`` (their defaults never count)."""
    from ..experiments.runs import GRAPH_TASKS, SIZED_TASKS, VISION_TASKS
    from ..experiments.tasks import TASKS

    given = {*getattr(args, "given", ()),  # options with defaults, see Given
             *(name for name in ("train_sizes", "test_sizes", "virtual_node") if getattr(args, name))}
    for name, tasks in (("train_sizes", SIZED_TASKS), ("test_sizes", SIZED_TASKS),
                        ("pe_dim", GRAPH_TASKS), ("virtual_node", GRAPH_TASKS),
                        ("patch", VISION_TASKS), ("position", tuple(TASKS))):
        if name in given and args.task not in tasks:
            raise UsageError(f"--{name.replace('_', '-')} does not apply to task {args.task!r} "
                             f"(only to {', '.join(tasks)})")


def run(args) -> int:
    from ..experiments.distributed import from_environment
    from ..experiments.figures import loss_figure
    from ..experiments.runs import GRAPH_TASKS, RunConfig, run_training

    _check_task_options(args)
    check_out_dir("--out", args.out)
    check_device("--device", args.device)
    check_seed(args.seed)
    topology = args.topology or ("graph" if args.task in GRAPH_TASKS
                                 else "grid" if args.task == "digits" else "full")
    config = RunConfig(task=args.task, topology=topology, train_sizes=args.train_sizes,
                       test_sizes=args.test_sizes, pe_dim=args.pe_dim,
                       virtual_node=args.virtual_node, patch=args.patch,
                       model=model_config(args), train=train_config(args), out=args.out,
                       save_all_ranks=args.save_all_ranks)
    info = from_environment()
    main = info.is_main
    if main:
        print(f"train: task {config.task!r}, topology {topology!r}, {config.train.steps} steps"
              + (f", {info.world_size} processes" if info.enabled else ""), flush=True)
    start = time.perf_counter()
    result, _ = run_training(config, progress=main and not args.no_progress)
    if main:
        loss_figure(result.history, Path(args.out) / "loss.png", f"{config.task} / {topology}")
        accs = ", ".join(f"{k} {v:.3f}" for k, v in result.final.items() if k.startswith("acc"))
        print(f"final loss {result.final['final_loss']:.4f}, {accs}")
        print(f"{result.tokens_per_s:,.0f} tokens/s, {time.perf_counter() - start:.1f} s; "
              f"wrote {args.out}/model.pt and logs")
    return EXIT_OK
