"""Training as in "Attention Is All You Need" and its successors, for any workload.

Adam or AdamW (``betas=(0.9, 0.98)``, ``eps=1e-9``), a learning rate that warms up linearly and then
decays (cosine, inverse square root or linear) through :class:`torch.optim.lr_scheduler.LambdaLR`,
label smoothing in :class:`torch.nn.CrossEntropyLoss`, dropout inside the model, gradient clipping
with :func:`torch.nn.utils.clip_grad_norm_`. Seeds make runs reproducible; logs go to CSV/JSON;
checkpoints are plain state dicts read back with ``torch.load(..., weights_only=True)``.

A *workload* (:class:`Workload`) knows its data: it draws a training batch, runs the model on a
batch and returns logits with their labels, and holds fixed evaluation sets. The loop here knows
nothing of sequences, graphs or images.
"""
from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .tasks import IGNORE

SCHEDULES = ("cosine", "inverse_sqrt", "linear", "constant")
OPTIMIZERS = ("adamw", "adam")


@dataclass
class TrainConfig:
    """Optimization settings of one run."""
    steps: int = 1000  # optimizer steps
    batch_size: int = 32  # sequences / graphs / images per step (per process under DDP)
    lr: float = 1e-3  # peak learning rate, reached at the end of the warmup
    optimizer: str = "adamw"  # "adamw" or "adam"
    betas: tuple[float, float] = (0.9, 0.98)  # as in Vaswani et al. (2017)
    eps: float = 1e-9
    weight_decay: float = 0.01  # decoupled (AdamW); L2 for Adam
    warmup: int = 100  # linear warmup steps
    schedule: str = "cosine"  # decay after warmup: cosine, inverse_sqrt, linear, constant
    label_smoothing: float = 0.0  # 0.1 in the original paper
    clip_grad: float | None = 1.0  # max global gradient norm, None to disable
    seed: int = 0
    device: str = "cpu"  # "cpu" or "cuda"
    log_every: int = 10  # steps between logged training rows
    eval_every: int = 0  # steps between evaluations (0: only at the end)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected '{name}' to be a positive int (got {value!r})")
        for name in ("warmup", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"Expected '{name}' >= 0 (got {getattr(self, name)})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"Expected 'lr' to be finite and > 0 (got {self.lr})")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"Expected 'weight_decay' to be finite and >= 0 (got {self.weight_decay})")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Expected 'optimizer' in {OPTIMIZERS} (got {self.optimizer!r})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Expected 'schedule' in {SCHEDULES} (got {self.schedule!r})")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"Expected 'label_smoothing' in [0, 1) (got {self.label_smoothing})")
        if self.clip_grad is not None and not (math.isfinite(self.clip_grad) and self.clip_grad > 0):
            raise ValueError(f"Expected 'clip_grad' to be finite and > 0, or None (got {self.clip_grad})")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"Expected 'device' to be 'cpu' or 'cuda' (got {self.device!r})")
        self.betas = tuple(self.betas)


class Workload(Protocol):
    """What the training loop needs from a task."""

    def train_batch(self, generator: torch.Generator) -> Any:
        """A fresh training batch drawn with ``generator``."""

    def logits(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(logits [M, C], labels [M])`` of ``batch``; labels ``IGNORE`` are skipped."""

    def eval_sets(self) -> dict[str, list[Any]]:
        """Fixed evaluation sets by name (e.g. ``"test"``, ``"longer"``)."""

    def batch_tokens(self, batch: Any) -> int:
        """Nodes (tokens) in ``batch``, for throughput."""


@dataclass
class TrainResult:
    """What one run returns."""
    history: list[dict[str, float]]  # one row per logged step
    evals: list[dict[str, float]]  # one row per evaluation: step and accuracy per eval set
    final: dict[str, float]  # last evaluation, plus final_loss
    tokens_per_s: float  # training throughput (tokens through forward + backward per second)
    train_seconds: float
    config: dict[str, Any] = field(default_factory=dict)


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at each step: linear warmup, then the decay."""
    warmup, total, schedule = config.warmup, config.steps, config.schedule

    def factor(step: int) -> float:
        s = step + 1
        if warmup and s <= warmup:
            return s / warmup
        if schedule == "constant":
            return 1.0
        if schedule == "inverse_sqrt":  # Vaswani et al.: d^-0.5 min(s^-0.5, s w^-1.5), peak-normalized
            return math.sqrt(max(warmup, 1) / s)
        progress = (s - warmup) / max(total - warmup, 1)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    return factor


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam/AdamW; no weight decay on biases, norms and embeddings' 1-D parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def seed_everything(seed: int) -> None:
    """Seed torch's global generators (model initialization, dropout)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(name: str) -> torch.device:
    """``"cpu"`` or ``"cuda"``, with a clear error for an unknown device or a missing CUDA."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"Expected 'device' to be 'cpu' or 'cuda' (got {name!r})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Expected 'device' to be 'cpu' or 'cuda' (got {name!r})")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Expected 'device' to be 'cpu' (got {name!r}, but CUDA is not available)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"Expected 'device' to name one of the {torch.cuda.device_count()} GPUs (got {name!r})")
    return device


@torch.no_grad()
def evaluate(model: nn.Module, workload: Workload, device: torch.device) -> dict[str, float]:
    """Accuracy on each evaluation set of ``workload`` (labels ``IGNORE`` skipped)."""
    was_training = model.training
    model.eval()
    out = {}
    for name, batches in workload.eval_sets().items():
        correct = total = 0
        for batch in batches:
            logits, labels = workload.logits(model, batch, device)
            keep = labels != IGNORE
            correct += int((logits.argmax(-1)[keep] == labels[keep]).sum())
            total += int(keep.sum())
        out[f"acc_{name}"] = correct / max(total, 1)
    model.train(was_training)
    return out


def train(model: nn.Module, workload: Workload, config: TrainConfig, *, progress: bool = False,
          rank: int = 0, world_size: int = 1, description: str = "train") -> TrainResult:
    """Train ``model`` on ``workload`` for ``config.steps`` steps.

    The model must already sit on ``config.device`` (and may be wrapped in
    :class:`~torch.nn.parallel.DistributedDataParallel`). Under DDP every rank draws its own batches
    (generator seed ``1000 · seed + rank``) and gradients are averaged, so all ranks keep identical
    weights; the logged loss is the mean over the ranks and the token count their sum.

    Args:
        progress: show a tqdm progress bar (rank 0 only).
        rank, world_size: this process and the number of processes.

    Returns:
        A :class:`TrainResult`; throughput counts the tokens of all ranks.
    """
    device = resolve_device(config.device)
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE, label_smoothing=config.label_smoothing)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.steps, desc=description, leave=False, dynamic_ncols=True)

    history, evals = [], []
    tokens, train_time, last_loss = 0, 0.0, float("nan")
    model.train()
    for step in range(1, config.steps + 1):
        batch = workload.train_batch(generator)
        start = time.perf_counter()
        logits, labels = workload.logits(model, batch, device)
        loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = (nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
                     if config.clip_grad is not None else _grad_norm(model.parameters()))
        optimizer.step()
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.perf_counter() - start
        step_tokens, last_loss = workload.batch_tokens(batch), float(loss.detach())
        if world_size > 1:  # every rank's tokens and loss (the ranks' batches differ)
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                both = torch.tensor([float(step_tokens), last_loss], dtype=torch.float64,
                                    device=device if dist.get_backend() == "nccl" else "cpu")
                dist.all_reduce(both)
                step_tokens, last_loss = int(both[0]), float(both[1]) / world_size
            else:  # no process group to ask: this rank's count for each rank
                step_tokens *= world_size
        tokens += step_tokens
        if not math.isfinite(last_loss):
            raise FloatingPointError(f"Training loss became {last_loss} at step {step}; "
                                     "try a lower learning rate")
        if step % config.log_every == 0 or step == config.steps:
            history.append({"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                            "grad_norm": float(grad_norm), "tokens": tokens,
                            "seconds": train_time})
        if config.eval_every and step % config.eval_every == 0 and step != config.steps:
            evals.append({"step": step, **evaluate(model, workload, device)})
        if bar is not None:
            bar.update(1)
            if step % config.log_every == 0:
                bar.set_postfix(loss=f"{last_loss:.3f}")
    if bar is not None:
        bar.close()
    final = {"step": config.steps, **evaluate(model, workload, device)}
    evals.append(final)
    final = {**final, "final_loss": _smoothed_loss(history)}
    return TrainResult(history, evals, final, tokens / max(train_time, 1e-9), train_time,
                       asdict(config))


def _grad_norm(parameters: Iterable[Tensor]) -> Tensor:
    grads = [p.grad.detach().norm() for p in parameters if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


def _smoothed_loss(history: list[dict[str, float]], window: int = 5) -> float:
    """Mean training loss of the last ``window`` logged rows (less noisy than the last step)."""
    rows = history[-window:]
    return sum(r["loss"] for r in rows) / len(rows) if rows else float("nan")


# ---------------------------------------------------------------- memory
def step_memory(model: nn.Module, workload: Workload, batch: Any, device: torch.device) -> int:
    """Bytes one training step needs, measured on ``batch``.

    On CUDA: the peak of ``torch.cuda.max_memory_allocated`` over forward and backward. On CPU
    (no allocator statistics): the bytes of the distinct storages autograd holds for the backward
    pass at the end of the forward pass (activations and the parameters they use), the bulk of a
    step's peak.
    """
    was_training = model.training
    model.train()
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            logits, labels = workload.logits(model, batch, device)
            nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE).backward()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            seen: dict[int, int] = {}

            def pack(t: Tensor) -> Tensor:
                plain = t.as_tensor() if hasattr(t, "as_tensor") else t  # EdgeIndex -> Tensor
                try:
                    storage = plain.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
                except RuntimeError:  # a wrapper subclass without its own storage
                    seen[id(t)] = t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logits, labels = workload.logits(model, batch, device)
                loss = nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE)
            peak = sum(seen.values())
            loss.backward()
        model.zero_grad(set_to_none=True)
        return int(peak)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- logs and checkpoints
def write_logs(result: TrainResult, out_dir: str | Path, prefix: str = "train") -> list[Path]:
    """``<prefix>_log.csv`` (training rows), ``<prefix>_eval.csv`` and ``<prefix>.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in ((f"{prefix}_log.csv", result.history), (f"{prefix}_eval.csv", result.evals)):
        path = out / name
        keys = sorted({k for row in rows for k in row}, key=lambda k: (k != "step", k))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        paths.append(path)
    path = out / f"{prefix}.json"
    path.write_text(json.dumps({"config": result.config, "final": result.final,
                                "tokens_per_s": result.tokens_per_s,
                                "train_seconds": result.train_seconds,
                                "history": result.history, "evals": result.evals}, indent=2))
    paths.append(path)
    return paths


def save_checkpoint(path: str | Path, model: nn.Module, *, optimizer: torch.optim.Optimizer | None = None,
                    step: int | None = None, meta: dict[str, Any] | None = None) -> Path:
    """Save the model's state dict (unwrapped from DDP) with optional optimizer state and metadata.

    ``meta`` must hold plain Python values (str, int, float, bool, lists, dicts), so that
    :func:`load_checkpoint` can read everything back with ``weights_only=True``.
    """
    model = getattr(model, "module", model)
    payload: dict[str, Any] = {"model": model.state_dict(), "meta": meta or {}}
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if step is not None:
        payload["step"] = step
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def load_checkpoint(path: str | Path, model: nn.Module | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; load its weights into ``model`` if given."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or "model" not in payload:
        raise ValueError(f"Expected a checkpoint written by save_checkpoint in {str(path)!r}")
    if model is not None:
        getattr(model, "module", model).load_state_dict(payload["model"])
    return payload
