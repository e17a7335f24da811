"""Checkpoints: atomic writes, safe reads, and the training state that makes a resumed run exact.

A checkpoint is a ``dict`` of tensors and plain Python values written with :func:`torch.save` and
read back with ``torch.load(..., weights_only=True)`` (no pickled code). It is written to a
temporary file in the same folder and renamed over the old one (:func:`os.replace`, atomic on
POSIX and Windows), so a process killed at any moment leaves either the previous checkpoint or the
new one, never a torn file.

Two kinds:

- a *model* checkpoint (:func:`save_checkpoint`): ``{"model", "meta", "step"?, "optimizer"?}``;
- a *training state* (:func:`training_state`): a model checkpoint plus everything the loop needs to
  continue bit for bit: optimizer and scheduler state, the data generator of every process, the
  global random state (dropout), the logs so far and the best evaluation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

TRAINING_STATE = 1  # version of the training-state layout


def atomic_save(payload: dict[str, Any], path: str | Path) -> Path:
    """``torch.save(payload, path)`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read(path: str | Path, map_location: str | torch.device = "cpu", *, name: str = "checkpoint") -> dict[str, Any]:
    """A checkpoint written by this module, read with ``weights_only=True``; ``name`` is the
    argument the path came from, for the error of a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"Expected '{name}' to be a checkpoint file (got {str(path)!r}, which "
            f"{'is a directory' if path.is_dir() else 'does not exist'})"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated, not a torch file, or pickled code refused by weights_only
        reason = (str(err).splitlines() or ["empty or truncated file"])[0][:200]  # EOFError has no text
        raise ValueError(
            f"Expected '{name}' to be a checkpoint written by gnn-transformer "
            f"(got {str(path)!r}: {type(err).__name__}: {reason})"
        ) from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise ValueError(f"Expected '{name}' to be a checkpoint written by save_checkpoint (got {str(path)!r})")
    return payload


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    step: int | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Save the model's state dict (unwrapped from DDP and ``torch.compile``) with optional optimizer
    state and metadata, atomically.

    ``meta`` must hold plain Python values (str, int, float, bool, lists, dicts), so that
    :func:`load_checkpoint` can read everything back with ``weights_only=True``.
    """
    payload: dict[str, Any] = {"model": unwrap(model).state_dict(), "meta": meta or {}}
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if step is not None:
        payload["step"] = step
    return atomic_save(payload, path)


def load_checkpoint(
    path: str | Path, model: nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; load its weights into ``model`` if given."""
    payload = read(path, map_location)
    if model is not None:
        unwrap(model).load_state_dict(payload["model"])
    return payload


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def rng_state() -> dict[str, Any]:
    """The global random state: torch's CPU generator and, when present, every CUDA generator."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_state(generator: torch.Generator) -> dict[str, Any]:
    """The random state of one process: its data generator and the global generators (dropout)."""
    return {"data": generator.get_state(), "rng": rng_state()}


def set_rank_state(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["data"])
    set_rng_state(state["rng"])


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    step: int,
    ranks: list[dict[str, Any]],
    progress: dict[str, Any],
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a run needs to continue exactly after ``step``: see the module docstring.

    ``ranks``: :func:`rank_state` of every process, in rank order; ``progress``: the loop's
    plain-valued counters and logs (history, evaluations, best metric).
    """
    return {
        "model": unwrap(model).state_dict(),
        "meta": meta or {},
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "ranks": list(ranks),
        "progress": progress,
        "training_state": TRAINING_STATE,
    }


def check_training_state(
    payload: dict[str, Any], path: str | Path, *, world_size: int = 1, name: str = "resume"
) -> None:
    """Refuse a model-only checkpoint or one written by another number of processes."""
    if payload.get("training_state") != TRAINING_STATE:
        raise ValueError(
            f"Expected '{name}' to be a training checkpoint (last.pt, with optimizer and "
            f"data state) (got {str(path)!r}, which holds only weights)"
        )
    saved = len(payload["ranks"])
    if saved != world_size:
        raise ValueError(
            f"Expected '{name}' to be a checkpoint of a run on {world_size} process(es) "
            f"(got {str(path)!r}, written by {saved})"
        )
