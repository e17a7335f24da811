"""``gnn-transformer compare``: the main experiment, one model trained under several topologies."""
from __future__ import annotations

import argparse

from ._common import (EXIT_OK, table, size_range, check_out_dir, check_device, add_model_args, add_train_args,
                      check_seed, model_config, train_config)


COMPARE_COLUMNS = [
    ("topology", "topology", ""), ("edges_per_seq", "edges/seq", ".1f"), ("density", "density", ".2f"),
    ("max_dense_error", "max err vs dense", ".1e"), ("final_loss", "final loss", ".3f"),
    ("acc_test", "acc (train sizes)", ".3f"), ("acc_longer", "acc (longer)", ".3f"),
    ("tokens_per_s", "tokens/s", ",.0f"), ("memory_mib", "memory MiB", ".1f"),
]


def add_parser(sub) -> None:
    from ..experiments.compare import CompareConfig
    from ..experiments.runs import ALL_TASKS
    from ..experiments.tasks import TASKS

    d = CompareConfig()
    p = sub.add_parser(
        "compare", help="train one model under several topologies and compare them (main job)",
        description="Train the same small transformer (same initial weights, same batches) under "
        "several attention topologies on a built-in task; print a table, save results.json, "
        "results.csv and compare.png (loss curves, accuracies, adjacency pictures) in --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default=d.task, help="sequence task")
    p.add_argument("--topology", dest="topologies", action="append", metavar="SPEC",
                   help="topology spec, repeatable: a builder with arguments such as "
                   "'sliding_window:window=3' or a catalogue name (see 'gnn-transformer show "
                   f"--list'); default: {' '.join(d.topologies)}")
    p.add_argument("--train-sizes", type=size_range, help="instance sizes to train on, e.g. 6-12")
    p.add_argument("--test-sizes", type=size_range, help="longer sizes to test on, e.g. 13-24")
    p.add_argument("--eval-size", type=int, default=d.eval_size, help="sequences per evaluation set")
    p.add_argument("--out", default="runs/compare", help="output folder")
    add_model_args(p, d.model)
    add_train_args(p, d.train)
    p.set_defaults(func=run, all_tasks=ALL_TASKS)


def run(args) -> int:
    from ..experiments.compare import CompareConfig, run_compare, save_compare

    check_out_dir("--out", args.out)
    check_device("--device", args.device)
    check_seed(args.seed)
    config = CompareConfig(task=args.task, topologies=tuple(args.topologies or CompareConfig().topologies),
                           train_sizes=args.train_sizes, test_sizes=args.test_sizes,
                           model=model_config(args), train=train_config(args),
                           eval_size=args.eval_size)
    print(f"compare: task {config.task!r}, {len(config.topologies)} topologies, "
          f"{config.train.steps} steps each, device {config.train.device}")

    def report(r) -> None:
        print(f"  {r.topology}: acc {r.acc_test:.3f} (longer {r.acc_longer:.3f}), "
              f"{r.train_seconds:.1f} s", flush=True)

    result = run_compare(config, progress=not args.no_progress, on_result=report)
    print()
    print(table([r.row() for r in result.results], COMPARE_COLUMNS))
    paths = save_compare(result, args.out)
    print(f"\n{result.seconds:.0f} s in all. Wrote {paths['json']}, {paths['csv']}, {paths['figure']}")
    return EXIT_OK
