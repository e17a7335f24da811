"""``gnn-transformer train``: one training run with all options (under torchrun too).

The options of the workloads (``--text``, ``--context``, ``--listops-*``), of the longer runs
(``--grad-accum``, ``--precision``, ``--compile``, checkpoints, ``--resume``) and ``--preset`` are
defined here and shared with ``compare``.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

from ._common import (
    EXIT_OK,
    print_eval_windows,
    UsageError,
    nonnegative_int,
    size_range,
    Given,
    check_out_dir,
    check_device,
    add_model_args,
    add_train_args,
    check_seed,
    model_config,
    train_config,
)

# nanoGPT's "CPU" configuration of its README (shakespeare_char): the reference a user knows
PRESETS = {
    "nanogpt-cpu": dict(
        context=64,
        batch_size=12,
        layers=4,
        heads=4,
        d_model=128,
        ff=512,
        steps=2000,
        dropout=0.0,
        lr=1e-3,
        warmup=100,
        schedule="cosine",
        min_lr=1e-4,
        optimizer="adamw",
        betas=(0.9, 0.99),
        eps=1e-8,
        weight_decay=0.1,
        clip_grad=1.0,
        no_bias=True,
        tie_embeddings=True,
        gpt_init=True,
        position="learned",
        eval_size=240,
    )
}


class _Preset(argparse.Action):
    """Set every option of a preset; options after ``--preset`` on the command line override it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        earlier = [d for d in PRESETS[values] if getattr(namespace, d, None) != parser.get_default(d)]
        if earlier:  # the preset would overwrite them without a word
            given = ", ".join(f"--{d.replace('_', '-')}" for d in earlier)
            raise argparse.ArgumentError(self, f"give it before the options it sets ({given} came first)")
        for dest, value in PRESETS[values].items():
            setattr(namespace, dest, value)
        namespace.given = {*getattr(namespace, "given", ()), "position"}
        namespace.preset = values


def add_workload_args(p: argparse.ArgumentParser, sample: bool = True) -> None:
    """Options of the ``lm`` and ``listops`` tasks (``sample``: with ``--sample-chars``, for a
    command that prints the text its language model generates)."""
    from ..experiments.listops import ListOpsConfig
    from ..experiments.lm import TextConfig

    t, lo = TextConfig(), ListOpsConfig()
    g = p.add_argument_group("language modelling (--task lm)")
    g.add_argument(
        "--text",
        metavar="FILE",
        action=Given,
        help="UTF-8 text; its last 10%% of characters are the validation split (default: the "
        "Python standard library's *.py sources, split by file)",
    )
    g.add_argument(
        "--context", type=int, default=t.context, action=Given, help="characters the model reads (default %(default)s)"
    )
    if sample:
        g.add_argument(
            "--sample-chars",
            type=nonnegative_int,
            default=t.sample_chars,
            action=Given,
            help="characters generated and printed after training (default %(default)s)",
        )
    else:
        p.set_defaults(sample_chars=0)  # no text is generated
    g = p.add_argument_group("ListOps (--task listops)")
    g.add_argument(
        "--listops-lengths",
        type=size_range,
        default=lo.lengths,
        action=Given,
        metavar="LO-HI",
        help="expression lengths in tokens (default: the paper's %(default)s)",
    )
    g.add_argument(
        "--listops-depth", type=int, default=lo.max_depth, action=Given, help="maximum depth (default %(default)s)"
    )
    g.add_argument(
        "--listops-args",
        type=int,
        default=lo.max_args,
        action=Given,
        help="maximum arguments of an operator (default %(default)s)",
    )
    g.add_argument(
        "--listops-train",
        type=int,
        default=lo.train_examples,
        action=Given,
        help="training expressions (default %(default)s)",
    )
    g.add_argument(
        "--pool",
        choices=("cls", "mean"),
        default=lo.pool,
        action=Given,
        help="read the answer at a [CLS] token or average the sequence (default %(default)s)",
    )


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Options of the model and optimizer beyond the shared ones, and of long runs."""
    from ..experiments.training import PRECISIONS, TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("model and optimizer (more)")
    g.add_argument("--no-bias", action="store_true", help="no biases in linear layers and norms (GPT-2 style)")
    g.add_argument(
        "--tie-embeddings", action="store_true", help="sequence tasks, lm: the output layer reuses the token embedding"
    )
    g.add_argument(
        "--gpt-init",
        action="store_true",
        help="GPT-2 initialization: normal(0, 0.02), residual projections scaled by the depth",
    )
    g.add_argument(
        "--betas", type=float, nargs=2, default=d.betas, metavar=("B1", "B2"), help="Adam betas (default %(default)s)"
    )
    g.add_argument("--eps", type=float, default=d.eps, help="Adam epsilon (default %(default)s)")
    g.add_argument(
        "--min-lr",
        type=float,
        default=d.min_lr,
        help="learning rate at the end of a cosine or linear decay (default %(default)s)",
    )
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        action=_Preset,
        default=None,
        help="nanogpt-cpu: nanoGPT's CPU configuration (context 64, batch 12, 4 layers, 4 heads, "
        "width 128, 2000 steps, no dropout, lr 1e-3, 100 warmup steps, cosine to 1e-4, betas "
        "0.9 0.99, weight decay 0.1, clip 1.0, no bias); options after it override it",
    )
    g = p.add_argument_group("long runs")
    g.add_argument(
        "--grad-accum",
        type=int,
        default=d.grad_accum,
        help="micro-batches of --batch-size per optimizer step (default %(default)s)",
    )
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="bf16: autocast of forward and loss to bfloat16 (default %(default)s)",
    )
    g.add_argument("--compile", action="store_true", help="run the model through torch.compile")


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    from ..experiments.training import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("checkpoints")
    g.add_argument(
        "--checkpoint-every",
        type=nonnegative_int,
        default=d.checkpoint_every,
        help="steps between training checkpoints (--out/last.pt); 0: only with --stop-after",
    )
    g.add_argument(
        "--stop-after",
        type=nonnegative_int,
        default=d.stop_after,
        help="stop after this step (the schedule still spans --steps), leaving last.pt",
    )
    g.add_argument(
        "--resume",
        metavar="PATH",
        help="continue the run of this last.pt (or a folder holding one) exactly where it stopped",
    )


LISTOPS_OPTIONS = {
    "lengths": "--listops-lengths",
    "max_depth": "--listops-depth",
    "max_args": "--listops-args",
    "train_examples": "--listops-train",
}


def workload_configs(args) -> dict:
    """``text`` and ``listops`` settings of a ``RunConfig`` / ``CompareConfig``; a ListOps length range
    the generator cannot reach is refused here, before any work."""
    from ..experiments.listops import ListOpsConfig, generate
    from ..experiments.lm import TextConfig

    try:
        listops = ListOpsConfig(
            lengths=args.listops_lengths,
            max_depth=args.listops_depth,
            max_args=args.listops_args,
            train_examples=args.listops_train,
            pool=args.pool,
        )
        if args.task == "listops":
            generate(listops, "check")
    except ValueError as err:
        field = str(err).split("'")[1] if str(err).count("'") >= 2 else ""
        raise UsageError(f"{LISTOPS_OPTIONS.get(field, '--listops-lengths')}: {err}") from None
    return dict(text=TextConfig(text=args.text, context=args.context, sample_chars=args.sample_chars), listops=listops)


def full_model_config(args):
    return replace(
        model_config(args), bias=not args.no_bias, tie_embeddings=args.tie_embeddings, gpt_init=args.gpt_init
    )


def full_train_config(args, **more):
    return replace(
        train_config(args),
        betas=tuple(args.betas),
        eps=args.eps,
        min_lr=args.min_lr,
        grad_accum=args.grad_accum,
        precision=args.precision,
        compile=args.compile,
        **more,
    )


def check_workload_options(args) -> None:
    """Refuse the options of a workload given for another task (their defaults never count)."""
    given: set[str] = getattr(args, "given", set())
    for names, task in (
        (("text", "context", "sample_chars"), "lm"),
        (("listops_lengths", "listops_depth", "listops_args", "listops_train", "pool"), "listops"),
    ):
        for name in names:
            if name in given and args.task != task and not (name == "context" and getattr(args, "preset", None)):
                raise UsageError(f"--{name.replace('_', '-')} does not apply to task {args.task!r} (only to {task})")
    if args.text is not None:
        check_text(args.text)


def check_text(path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise UsageError(
            f"--text: {path!r} {'is a directory' if p.is_dir() else 'does not exist'}, expected a UTF-8 text file"
        )


def add_parser(sub) -> None:
    from ..experiments.models import EncoderConfig
    from ..experiments.runs import ALL_TASKS
    from ..experiments.training import TrainConfig

    p = sub.add_parser(
        "train",
        help="one training run with all options (runs under torchrun too)",
        description="Train one model on a built-in task under one topology. Sequence tasks, lm and listops "
        "take a topology spec (lm: intersected with the causal graph); graph tasks (karate, shortest_path) "
        "'graph' or 'full'; digits 'grid' or 'full'. Writes train_log.csv, train_eval.csv, train.json, "
        "loss.png and model.pt in --out, last.pt (training state, see --checkpoint-every, --resume) and "
        "best.pt (best evaluation, see --eval-every). Under 'torchrun --nproc_per_node=K -m "
        "gnn_transformer.cli train ...' it trains with DistributedDataParallel.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", choices=ALL_TASKS, default="recall")
    p.add_argument(
        "--topology",
        default=None,
        help="topology spec (default: full; causal for lm; 'graph' for graph tasks, 'grid' for digits)",
    )
    p.add_argument("--train-sizes", type=size_range, help="instance sizes to train on, e.g. 6-12")
    p.add_argument("--test-sizes", type=size_range, help="longer sizes to test on, e.g. 13-24")
    p.add_argument("--pe-dim", type=int, default=4, action=Given, help="graph tasks: Laplacian eigenvector PE size")
    p.add_argument("--virtual-node", action="store_true", help="graph tasks: add a virtual node")
    p.add_argument("--patch", type=int, default=2, action=Given, help="digits: patch side in pixels")
    p.add_argument(
        "--eval-size",
        type=int,
        default=256,
        action=Given,
        help="sequences per evaluation set (lm: validation windows; listops: expressions; shortest_path: graphs)",
    )
    p.add_argument("--out", default="runs/train", help="output folder")
    p.add_argument(
        "--save-all-ranks", action="store_true", help="under torchrun, every rank also writes model_rank<r>.pt"
    )
    add_model_args(p, EncoderConfig())
    add_train_args(p, TrainConfig())
    add_run_args(p)
    add_workload_args(p)
    add_checkpoint_args(p)
    p.set_defaults(func=run)


def _check_task_options(args) -> None:
    """Refuse the options given for another task than ``--task`` (their defaults never count)."""
    from ..experiments.runs import BATCHED_TASKS, EVAL_SIZE_TASKS, GRAPH_TASKS, SIZED_TASKS, TEXT_TASKS, VISION_TASKS
    from ..experiments.tasks import TASKS

    given = {
        *getattr(args, "given", ()),  # options with defaults, see Given
        *(name for name in ("train_sizes", "test_sizes", "virtual_node", "tie_embeddings") if getattr(args, name)),
    }
    for name, tasks in (
        ("train_sizes", SIZED_TASKS),
        ("test_sizes", SIZED_TASKS),
        ("pe_dim", GRAPH_TASKS),
        ("virtual_node", GRAPH_TASKS),
        ("patch", VISION_TASKS),
        ("eval_size", EVAL_SIZE_TASKS),
        ("batch_size", BATCHED_TASKS),
        ("tie_embeddings", tuple(TASKS) + ("lm",)),  # an output layer over the input vocabulary
        ("position", tuple(TASKS) + TEXT_TASKS),
    ):
        if name in given and args.task not in tasks:
            preset = getattr(args, "preset", None)
            if preset and name in PRESETS[preset]:  # set by the preset, not by an option the user gave
                raise UsageError(
                    f"--preset {preset} does not apply to task {args.task!r}: it sets "
                    f"--{name.replace('_', '-')} (which applies only to {', '.join(tasks)})"
                )
            raise UsageError(
                f"--{name.replace('_', '-')} does not apply to task {args.task!r} (only to {', '.join(tasks)})"
            )
    check_workload_options(args)


def run(args) -> int:
    from ..experiments.distributed import from_environment
    from ..experiments.figures import loss_figure
    from ..experiments.lm import bits_per_char
    from ..experiments.runs import GRAPH_TASKS, RunConfig, resume_path, run_training

    _check_task_options(args)
    check_out_dir("--out", args.out)
    check_device("--device", args.device)
    check_seed(args.seed)
    if args.resume is not None and not resume_path(args.resume).is_file():
        raise UsageError(f"--resume: {args.resume!r} is neither a checkpoint file nor a folder holding last.pt")
    topology = args.topology or (
        "graph"
        if args.task in GRAPH_TASKS
        else "grid"
        if args.task == "digits"
        else "causal"
        if args.task == "lm"
        else "full"
    )
    config = RunConfig(
        task=args.task,
        topology=topology,
        train_sizes=args.train_sizes,
        test_sizes=args.test_sizes,
        pe_dim=args.pe_dim,
        virtual_node=args.virtual_node,
        patch=args.patch,
        model=full_model_config(args),
        train=full_train_config(args, checkpoint_every=args.checkpoint_every, stop_after=args.stop_after),
        eval_size=args.eval_size,
        out=args.out,
        save_all_ranks=args.save_all_ranks,
        resume=args.resume,
        **workload_configs(args),
    )
    info = from_environment()
    main = info.is_main
    if main:
        print(
            f"train: task {config.task!r}, topology {topology!r}, {config.train.steps} steps"
            + (f", {info.world_size} processes" if info.enabled else "")
            + (f", resuming {args.resume}" if args.resume else ""),
            flush=True,
        )
    start = time.perf_counter()
    result, _ = run_training(config, progress=main and not args.no_progress)
    if main:
        loss_figure(result.history, Path(args.out) / "loss.png", f"{config.task} / {topology}")
        final = result.final
        if config.task == "lm":
            print(
                f"final loss {final['final_loss']:.4f}, val_loss {final['val_loss']:.4f} nats/char "
                f"({bits_per_char(final['val_loss']):.3f} bits/char) over {final['val_windows']} windows, "
                f"step {final['step']}"
            )
            print_eval_windows(config.eval_size, int(final["val_windows"]), config.text.context)
            if result.sample is not None:
                print(f"sample:\n{result.sample}")
        else:
            accs = ", ".join(f"{k} {v:.3f}" for k, v in final.items() if k.startswith("acc"))
            print(f"final loss {final['final_loss']:.4f}, {accs}")
        if result.best is not None:
            shown = {k: v for k, v in result.best.items() if k != "step" and math.isfinite(v)}
            print(
                f"best evaluation at step {result.best['step']}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
                + f" (wrote {args.out}/best.pt)"
            )
        print(
            f"{result.tokens_per_s:,.0f} tokens/s, {time.perf_counter() - start:.1f} s; "
            f"wrote {args.out}/model.pt and logs"
        )
    return EXIT_OK
