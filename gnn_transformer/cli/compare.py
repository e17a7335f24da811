"""``gnn-transformer compare``: the main experiment, one model trained under several topologies."""

from __future__ import annotations

import argparse

from ._common import (
    EXIT_OK,
    print_eval_windows,
    UsageError,
    table,
    size_range,
    check_out_dir,
    check_device,
    add_model_args,
    add_train_args,
    check_seed,
    positive_int,
)
from .train import (
    add_run_args,
    add_workload_args,
    check_workload_options,
    full_model_config,
    full_train_config,
    workload_configs,
)

COMPARE_COLUMNS = [
    ("topology", "topology", ""),
    ("edges_per_seq", "edges/seq", ".1f"),
    ("density", "density", ".2f"),
    ("max_dense_error", "max err vs dense", ".1e"),
    ("final_loss", "final loss", ".3f"),
    ("acc_test", "acc (train sizes)", ".3f"),
    ("acc_longer", "acc (longer)", ".3f"),
    ("tokens_per_s", "tokens/s", ",.0f"),
    ("memory_mib", "memory MiB", ".1f"),
]
# the task-specific measures: listops has one test set; lm reports its validation loss
TASK_COLUMNS = {
    "listops": [("acc_test", "acc (test)", ".3f")],
    "lm": [
        ("val_loss", "val loss (nats/char)", ".3f"),
        ("val_bpc", "bits/char", ".3f"),
        ("acc_test", "next-char acc", ".3f"),
    ],
}


def columns(task: str) -> list[tuple[str, str, str]]:
    """The table columns of a comparison of ``task``."""
    if task not in TASK_COLUMNS:
        return COMPARE_COLUMNS
    head = [
        c for c in COMPARE_COLUMNS if c[0] in ("topology", "edges_per_seq", "density", "max_dense_error", "final_loss")
    ]
    tail = [c for c in COMPARE_COLUMNS if c[0] in ("tokens_per_s", "memory_mib")]
    return head + TASK_COLUMNS[task] + tail


def summary_rows(result, task: str) -> list[dict]:
    """The table's rows: one per topology, ``mean ± std`` over the seeds in each cell."""
    from ..experiments.compare import mean_std
    from ..experiments.lm import bits_per_char

    rows = []
    for row in result.summary():
        if row["val_loss"] is not None:
            row["val_bpc"], row["val_bpc_std"] = bits_per_char(row["val_loss"]), bits_per_char(row["val_loss_std"])
        rows.append(
            {
                key: row[key] if key == "topology" else mean_std(row[key], row[f"{key}_std"], fmt)
                for key, _, fmt in columns(task)
            }
        )
    return rows


def add_parser(sub) -> None:
    from ..experiments.compare import COMPARE_TASKS, CompareConfig
    from ..experiments.runs import ALL_TASKS

    d = CompareConfig()
    p = sub.add_parser(
        "compare",
        help="train one model under several topologies and compare them (main job)",
        description="Train the same small transformer (same initial weights, same batches) under "
        "several attention topologies on a built-in task; print a table, save results.json, "
        "results.csv and compare.png (loss curves, accuracies, adjacency pictures) in --out. "
        "With --seeds N each cell is the mean ± standard deviation over N seeds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--task",
        choices=COMPARE_TASKS,
        default=d.task,
        help="sequence task, lm (character-level language model) or listops",
    )
    p.add_argument(
        "--topology",
        dest="topologies",
        action="append",
        metavar="SPEC",
        help="topology spec, repeatable: a builder with arguments such as "
        "'sliding_window:window=3' or a catalogue name (see 'gnn-transformer show "
        f"--list'); default: {' '.join(d.specs)} (lm and listops: their own)",
    )
    p.add_argument("--train-sizes", type=size_range, help="instance sizes to train on, e.g. 6-12")
    p.add_argument("--test-sizes", type=size_range, help="longer sizes to test on, e.g. 13-24")
    p.add_argument(
        "--eval-size",
        type=int,
        default=d.eval_size,
        help="sequences per evaluation set (lm: validation windows; listops: expressions)",
    )
    p.add_argument(
        "--seeds",
        type=positive_int,
        default=d.seeds,
        help="runs per topology (seeds --seed, --seed + 1, ...): mean ± std in the table",
    )
    p.add_argument("--out", default="runs/compare", help="output folder")
    add_model_args(p, d.model)
    add_train_args(p, d.train)
    add_run_args(p)
    add_workload_args(p, sample=False)  # compare generates no text
    p.set_defaults(func=run, all_tasks=ALL_TASKS)


def run(args) -> int:
    from ..experiments.compare import CompareConfig, run_compare, save_compare

    check_workload_options(args)
    if args.topologies and len(set(args.topologies)) != len(args.topologies):
        again = sorted({t for t in args.topologies if args.topologies.count(t) > 1})
        raise UsageError(f"--topology: each topology once (got {', '.join(map(repr, again))} more than once)")
    check_out_dir("--out", args.out)
    check_device("--device", args.device)
    check_seed(args.seed)
    config = CompareConfig(
        task=args.task,
        topologies=tuple(args.topologies) if args.topologies else None,
        train_sizes=args.train_sizes,
        test_sizes=args.test_sizes,
        model=full_model_config(args),
        train=full_train_config(args),
        eval_size=args.eval_size,
        seeds=args.seeds,
        **workload_configs(args),
    )
    print(
        f"compare: task {config.task!r}, {len(config.specs)} topologies, "
        f"{config.train.steps} steps each"
        + (f", {config.seeds} seeds" if config.seeds > 1 else "")
        + f", device {config.train.device}"
    )

    def report(r) -> None:
        seed = f" seed {r.seed}" if config.seeds > 1 else ""
        if config.task == "lm":
            print(f"  {r.topology}{seed}: val loss {r.val_loss:.3f} nats/char, {r.train_seconds:.1f} s", flush=True)
        elif r.acc_longer is None:
            print(f"  {r.topology}{seed}: acc {r.acc_test:.3f}, {r.train_seconds:.1f} s", flush=True)
        else:
            print(
                f"  {r.topology}{seed}: acc {r.acc_test:.3f} (longer {r.acc_longer:.3f}), {r.train_seconds:.1f} s",
                flush=True,
            )

    result = run_compare(config, progress=not args.no_progress, on_result=report)
    windows = [r.val_windows for r in result.results if r.val_windows is not None]
    if windows:
        print_eval_windows(config.eval_size, min(windows), config.text.context)
    print()
    print(table(summary_rows(result, config.task), [(k, h, "") for k, h, _ in columns(config.task)]))
    paths = save_compare(result, args.out)
    print(f"\n{result.seconds:.0f} s in all. Wrote {paths['json']}, {paths['csv']}, {paths['figure']}")
    return EXIT_OK
