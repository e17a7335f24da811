"""What the commands share: exit codes, usage errors, tables, option types and checks, and the model
and training options of ``compare`` and ``train``."""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with the user's request (exit code 2)."""


def error(message: str) -> None:
    print(f"gnn-transformer: error: {message}", file=sys.stderr)


def warn(message: str) -> None:
    print(f"gnn-transformer: warning: {message}", file=sys.stderr)


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table: columns are (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([format(row[k], f) if f else str(row[k]) for k, _, f in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer (got {text!r})") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low} (got {text!r})")
    return value


def positive_int(text: str) -> int:
    """An option's integer ``>= 1``."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """An option's integer ``>= 0``."""
    return _int_at_least(text, 0)


def size_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size range like 4-8 (got {text!r})") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 1 <= lo <= hi (got {text!r})")
    return lo, hi


# ---------------------------------------------------------------- bad values
# Config objects (TrainConfig, EncoderConfig, ...) raise ValueError("Expected '<field>' ...");
# main() names the option that set the field. Fields whose option has another name:
FIELD_DESTS = {"nhead": "heads", "num_layers": "layers", "dim_feedforward": "ff"}


def name_option(message: str, args: argparse.Namespace) -> str:
    """``"Expected 'nhead' >= 1 (got 0)"`` -> ``"--heads: Expected 'nhead' >= 1 (got 0)"``."""
    match = re.match(r"Expected '(\w+)'", message)
    dest = FIELD_DESTS.get(match[1], match[1]) if match else None
    if dest is None or dest not in vars(args):
        return message
    return f"--{dest.replace('_', '-')}: {message}"


class Given(argparse.Action):
    """Store an option's value and record that it was given: ``train`` refuses an option that
    does not apply to its task only when the user gave it, never for its default."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def _check_writable(option: str, folder: Path, path: str) -> None:
    """Refuse ``path`` when nothing can be created in ``folder`` (its folder or first existing
    parent): one empty folder is made there and removed, before any work."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".gnn-transformer-", dir=folder))
    except OSError as err:
        raise UsageError(f"{option}: cannot write {path!r} ({err.strerror or err} in {str(folder)!r})") from None


def check_out_dir(option: str, path: str) -> None:
    """An output folder (created if missing): refuse it if it or a parent is not a folder, or if
    nothing can be written there."""
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"{option}: {str(p)!r} exists and is not a directory")
            _check_writable(option, p, path)
            return


def check_out_file(option: str, path: str) -> None:
    """An output file: refuse a folder, a file whose folder does not exist, or a folder where
    nothing can be written."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option}: {path!r} is a directory, expected a file path")
    if not p.parent.is_dir():
        raise UsageError(f"{option}: the directory {str(p.parent)!r} of {path!r} does not exist")
    _check_writable(option, p.parent, path)


def check_device(option: str, name: str) -> None:
    """A device the commands run on: ``cpu``, or ``cuda`` / ``cuda:<index>`` of a present GPU."""
    from ..experiments.training import resolve_device

    try:
        resolve_device(name)
    except ValueError as err:
        raise UsageError(f"{option}: {err}") from None


# ---------------------------------------------------------------- shared options
def add_model_args(p: argparse.ArgumentParser, defaults) -> None:
    from ..attention import BACKENDS

    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=int, default=defaults.d_model, help="model width (default %(default)s)")
    g.add_argument("--heads", type=int, default=defaults.nhead, help="attention heads (default %(default)s)")
    g.add_argument("--layers", type=int, default=defaults.num_layers, help="encoder layers (default %(default)s)")
    g.add_argument("--ff", type=int, default=defaults.dim_feedforward, help="feed-forward width (default %(default)s)")
    g.add_argument("--dropout", type=float, default=defaults.dropout, help="dropout (default %(default)s)")
    g.add_argument(
        "--post-norm", action="store_true", help="post-norm layers as in the original paper (default: pre-norm)"
    )
    g.add_argument(
        "--position",
        choices=("rope", "sinusoidal", "learned", "none"),
        action=Given,
        default=defaults.position,
        help="token positions (default %(default)s)",
    )
    g.add_argument(
        "--backend", choices=BACKENDS, default=defaults.backend, help="attention backend (default %(default)s)"
    )


def add_train_args(p: argparse.ArgumentParser, defaults) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (default %(default)s)")
    g.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        action=Given,
        help="sequences/graphs/images per step and process (per micro-batch with --grad-accum; default %(default)s)",
    )
    g.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (default %(default)s)")
    g.add_argument("--optimizer", choices=("adamw", "adam"), default=defaults.optimizer, help="default %(default)s")
    g.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="default %(default)s")
    g.add_argument("--warmup", type=int, default=defaults.warmup, help="warmup steps (default %(default)s)")
    g.add_argument(
        "--schedule",
        choices=("cosine", "inverse_sqrt", "linear", "constant"),
        default=defaults.schedule,
        help="decay after warmup (default %(default)s)",
    )
    g.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing, help="default %(default)s")
    g.add_argument(
        "--clip-grad",
        type=float,
        default=defaults.clip_grad,
        help="max gradient norm, 0 to disable (default %(default)s)",
    )
    g.add_argument("--seed", type=int, default=defaults.seed, help="default %(default)s")
    g.add_argument("--device", default=defaults.device, help="cpu or cuda (default %(default)s)")
    g.add_argument("--log-every", type=int, default=defaults.log_every, help="default %(default)s")
    g.add_argument(
        "--eval-every",
        type=int,
        default=defaults.eval_every,
        help="steps between evaluations, 0 = at the end (default %(default)s)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


SEED_MAX = 2**63 - 1  # as the seeds of topology specs: a torch.Generator seed


def check_seed(seed: int) -> None:
    if not 0 <= seed <= SEED_MAX:
        raise UsageError(f"--seed: expected an integer in [0, 2**63 - 1] (got {seed})")


def print_eval_windows(eval_size: int, windows: int, context: int) -> None:
    """Say that a language model was evaluated on fewer windows than ``--eval-size`` asked for."""
    if windows < eval_size:
        print(f"  (--eval-size {eval_size}: the validation part holds only {windows} windows of {context} characters)")


def model_config(args):
    from ..experiments.models import EncoderConfig
    from ..experiments.runs import TEXT_TASKS
    from ..experiments.tasks import TASKS

    width, heads = args.d_model, args.heads
    sequence = getattr(args, "task", None) in (*TASKS, *TEXT_TASKS)  # the tasks whose models have positions
    if args.position == "rope" and sequence and heads >= 1 and width >= 1 and width % heads == 0 and width // heads % 2:
        raise UsageError(
            f"--position rope rotates pairs of channels: it needs an even head dimension (got --d-model "
            f"{width} / --heads {heads} = {width // heads}); change --d-model or --heads, or give another --position"
        )
    return EncoderConfig(
        d_model=args.d_model,
        nhead=args.heads,
        num_layers=args.layers,
        dim_feedforward=args.ff,
        dropout=args.dropout,
        norm_first=not args.post_norm,
        position=args.position,
        backend=args.backend,
    )


def train_config(args):
    from ..experiments.training import TrainConfig

    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        schedule=args.schedule,
        label_smoothing=args.label_smoothing,
        clip_grad=args.clip_grad or None,
        seed=args.seed,
        device=args.device,
        log_every=args.log_every,
        eval_every=args.eval_every,
    )
