"""Training as in "Attention Is All You Need" and its successors, for any workload.

Adam or AdamW (``betas=(0.9, 0.98)``, ``eps=1e-9``), a learning rate that warms up linearly and then
decays (cosine, inverse square root or linear, optionally to a floor ``min_lr``) through
:class:`torch.optim.lr_scheduler.LambdaLR`, label smoothing in :class:`torch.nn.CrossEntropyLoss`,
dropout inside the model, gradient clipping with :func:`torch.nn.utils.clip_grad_norm_`, gradient
accumulation over micro-batches (exact: the loss of a step is the mean over all its labels),
bfloat16 autocast and ``torch.compile``. Seeds make runs reproducible; logs go to CSV/JSON.

Checkpoints (:mod:`.checkpoints`) are written atomically and read with ``weights_only=True``:
``last.pt`` every ``checkpoint_every`` steps holds the whole training state, and a run started
with ``resume=`` that checkpoint continues bit for bit (same data order, optimizer, scheduler and
random state); ``best.pt`` holds the weights of the best evaluation on the held-out set.

A *workload* (:class:`Workload`) knows its data: it draws a training batch, runs the model on a
batch and returns logits with their labels, and holds fixed evaluation sets. The loop here knows
nothing of sequences, graphs or images.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from . import checkpoints
from .checkpoints import load_checkpoint, save_checkpoint
from .tasks import IGNORE

SCHEDULES = ("cosine", "inverse_sqrt", "linear", "constant")
OPTIMIZERS = ("adamw", "adam")
PRECISIONS = ("fp32", "bf16")

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Workload",
    "train",
    "evaluate",
    "lr_lambda",
    "make_optimizer",
    "seed_everything",
    "resolve_device",
    "step_memory",
    "write_logs",
    "save_checkpoint",
    "load_checkpoint",
    "SCHEDULES",
    "OPTIMIZERS",
    "PRECISIONS",
]


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
    eval_every: int = 0  # steps between evaluations (0: only at the end); the best is kept (best.pt)
    min_lr: float = 0.0  # learning rate at the end of a cosine or linear decay
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step
    precision: str = "fp32"  # "fp32" or "bf16" (autocast of the forward pass and the loss)
    compile: bool = False  # run the forward pass through torch.compile
    checkpoint_every: int = 0  # steps between training checkpoints (last.pt); 0: only when stopping early
    stop_after: int = 0  # stop after this step, leaving last.pt to resume (0: run all 'steps')

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Expected '{name}' to be a positive int (got {value!r})")
        for name in ("warmup", "eval_every", "checkpoint_every", "stop_after"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Expected '{name}' to be an int >= 0 (got {value!r})")
        if self.stop_after > self.steps:
            raise ValueError(f"Expected 'stop_after' <= 'steps' ({self.steps}) (got {self.stop_after})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"Expected 'lr' to be finite and > 0 (got {self.lr})")
        if not (math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"Expected 'min_lr' in [0, lr={self.lr}] (got {self.min_lr})")
        if self.precision not in PRECISIONS:
            raise ValueError(f"Expected 'precision' in {PRECISIONS} (got {self.precision!r})")
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
        if len(self.betas) != 2:
            raise ValueError(f"Expected 'betas' to be two numbers (got {self.betas!r})")
        beta1, beta2 = self.betas
        self.betas = (float(beta1), float(beta2))
        if not all(0.0 <= b < 1.0 for b in self.betas):  # also refuses nan
            raise ValueError(f"Expected 'betas' in [0, 1) (got {self.betas!r})")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"Expected 'eps' to be finite and >= 0 (got {self.eps!r})")


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

    # optional: ``monitor = ("loss_val", "min")``, the evaluation that picks the best checkpoint
    # (default: accuracy on the first evaluation set, higher is better)


@runtime_checkable
class _NoSync(Protocol):
    """A model that can leave out the gradient all-reduce of a backward pass
    (:class:`~torch.nn.parallel.DistributedDataParallel`)."""

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """A context in which backward passes accumulate gradients locally."""


@dataclass
class TrainResult:
    """What one run returns."""

    history: list[dict[str, float]]  # one row per logged step
    evals: list[dict[str, float]]  # one row per evaluation: step, accuracy and loss per eval set
    final: dict[str, float]  # last evaluation, plus final_loss
    tokens_per_s: float  # training throughput (tokens through forward + backward per second)
    train_seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    best: dict[str, float] | None = None  # the best evaluation (the weights of best.pt), with eval_every
    sample: str | None = None  # language models: text generated after training


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at each step: linear warmup, then the decay (cosine and
    linear decays end at ``min_lr``)."""
    warmup, total, schedule = config.warmup, config.steps, config.schedule
    floor = config.min_lr / config.lr

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
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    return factor


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam/AdamW; no weight decay on biases, norms and embeddings' 1-D parameters."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` to bfloat16 for ``precision="bf16"``, a no-op context for ``"fp32"``."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def evaluate(model: nn.Module, workload: Workload, device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """Accuracy (``acc_<set>``) and mean cross-entropy in nats (``loss_<set>``) on each evaluation
    set of ``workload``, over the labels that are not ``IGNORE``."""
    was_training = model.training
    model.eval()
    out = {}
    for name, batches in workload.eval_sets().items():
        correct = total = 0
        loss = 0.0
        for batch in batches:
            with autocast(device, precision):
                logits, labels = workload.logits(model, batch, device)
            keep = labels != IGNORE
            logits, labels = logits[keep].float(), labels[keep]
            correct += int((logits.argmax(-1) == labels).sum())
            loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            total += int(keep.sum())
        out[f"acc_{name}"] = correct / max(total, 1)
        out[f"loss_{name}"] = loss / max(total, 1)
    model.train(was_training)
    return out


def _monitor(workload: Workload) -> tuple[str, str]:
    """The evaluation key that picks the best checkpoint and whether lower ("min") is better."""
    monitor = getattr(workload, "monitor", None)
    if monitor is not None:
        return monitor
    return f"acc_{next(iter(workload.eval_sets()))}", "max"


def _better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value < best if mode == "min" else value > best)


def _gather(obj: Any, world_size: int) -> list[Any]:
    """``obj`` of every rank, in rank order (this rank's alone without a process group)."""
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            out: list[Any] = [None] * world_size
            dist.all_gather_object(out, obj)
            return out
    return [obj]


def train(
    model: nn.Module,
    workload: Workload,
    config: TrainConfig,
    *,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
    description: str = "train",
    checkpoint_dir: str | Path | None = None,
    resume: str | Path | dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` on ``workload`` for ``config.steps`` steps (or up to ``config.stop_after``).

    The model must already sit on ``config.device`` (and may be wrapped in
    :class:`~torch.nn.parallel.DistributedDataParallel`). Under DDP every rank draws its own batches
    (generator seed ``1000 · seed + rank``) and gradients are averaged, so all ranks keep identical
    weights. One step is ``config.grad_accum`` micro-batches of ``config.batch_size`` on each rank,
    and its loss is the mean over every label of the step, all micro-batches and ranks together:
    the gradient and the logged loss equal those of one batch holding them all, whatever the number
    of labels in each (micro-batches of sequences of different lengths weigh each label alike). The
    token count is the sum over the ranks.

    Args:
        progress: show a tqdm progress bar (rank 0 only).
        rank, world_size: this process and the number of processes.
        checkpoint_dir: rank 0 writes ``last.pt`` (the training state, every
            ``config.checkpoint_every`` steps and when stopping at ``config.stop_after``) and
            ``best.pt`` (the weights of the best evaluation, with ``config.eval_every``) here.
        resume: a ``last.pt`` (its path, or its payload as read by :func:`checkpoints.read`): the run
            continues after its step exactly as the run that wrote it would have.
        meta: plain values stored in the checkpoints (the run's configuration).

    Returns:
        A :class:`TrainResult`; throughput counts the tokens of all ranks.
    """
    device = resolve_device(config.device)
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE, label_smoothing=config.label_smoothing)
    # several micro-batches or ranks: each backward pass takes its micro-batch's summed loss and the
    # step divides the gradients by the labels of all of them
    pooled = config.grad_accum > 1 or world_size > 1
    summed = nn.CrossEntropyLoss(ignore_index=IGNORE, label_smoothing=config.label_smoothing, reduction="sum")
    monitor, mode = _monitor(workload)
    state: dict[str, Any] = {"history": [], "evals": [], "tokens": 0, "train_time": 0.0, "best": None}
    start_step = 0
    if resume is not None:
        payload = resume if isinstance(resume, dict) else checkpoints.read(resume, name="resume")
        checkpoints.check_training_state(payload, "" if isinstance(resume, dict) else resume, world_size=world_size)
        checkpoints.unwrap(model).load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        checkpoints.set_rank_state(payload["ranks"][rank], generator)
        state, start_step = payload["progress"], int(payload["step"])
    last = config.stop_after or config.steps
    forward = _Compiled(model) if config.compile else model
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None

    def save_state(step: int) -> None:
        ranks = _gather(checkpoints.rank_state(generator), world_size)  # a collective: every rank
        if directory is not None and rank == 0:
            checkpoints.atomic_save(
                checkpoints.training_state(
                    model, optimizer, scheduler, step=step, ranks=ranks, progress=state, meta=meta
                ),
                directory / "last.pt",
            )

    def record_eval(row: dict[str, float]) -> None:
        state["evals"].append(row)
        if config.eval_every and monitor in row and _better(row[monitor], (state["best"] or {}).get(monitor), mode):
            state["best"] = dict(row)
            if directory is not None and rank == 0:
                save_checkpoint(
                    directory / "best.pt", model, step=int(row["step"]), meta={**(meta or {}), "eval": dict(row)}
                )

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=last, initial=start_step, desc=description, leave=False, dynamic_ncols=True)

    model.train()
    for step in range(start_step + 1, last + 1):
        batches = [workload.train_batch(generator) for _ in range(config.grad_accum)]
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        step_labels = torch.zeros((), dtype=torch.long, device=device)
        for k, batch in enumerate(batches):
            # every micro-batch but the last skips DDP's gradient all-reduce
            last_micro = k == len(batches) - 1
            with model.no_sync() if not last_micro and isinstance(model, _NoSync) else contextlib.nullcontext():
                with autocast(device, config.precision):
                    logits, labels = workload.logits(forward, batch, device)
                    loss = (summed if pooled else criterion)(logits.float(), labels)
                loss.backward()
            step_loss += loss.detach()
            step_labels += (labels != IGNORE).sum()
        step_tokens = sum(workload.batch_tokens(b) for b in batches)
        if pooled:
            step_tokens, step_loss = _pool_step(model, step_tokens, step_loss, step_labels, world_size)
        grad_norm = (
            nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            if config.clip_grad is not None
            else _grad_norm(model.parameters())
        )
        optimizer.step()
        lr = scheduler.get_last_lr()[0]  # the rate this step took (scheduler.step() sets the next one's)
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        state["train_time"] += time.perf_counter() - start
        last_loss = float(step_loss)
        state["tokens"] += step_tokens
        if not math.isfinite(last_loss):
            raise FloatingPointError(f"Training loss became {last_loss} at step {step}; try a lower learning rate")
        logged = {
            "step": step,
            "loss": last_loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": state["tokens"],
            "seconds": state["train_time"],
        }
        if step % config.log_every == 0 or step == config.steps:  # a stop is not a row of the run's log
            state["history"].append(logged)
        if config.eval_every and step % config.eval_every == 0 and step != config.steps:
            record_eval({"step": step, **evaluate(forward, workload, device, config.precision)})
        if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == config.stop_after:
            save_state(step)
        if bar is not None:
            bar.update(1)
            if step % config.log_every == 0:
                bar.set_postfix(loss=f"{last_loss:.3f}")
    if bar is not None:
        bar.close()
    history = state["history"]
    if last != config.steps and start_step < last and history[-1:] != [logged]:
        history = [*history, logged]  # stopped early: the stop step's row, not kept in last.pt's log
    evals = state["evals"]
    if evals and evals[-1]["step"] == last:  # evaluated at this very step (eval_every divides it)
        final = dict(evals[-1])
    else:
        final = {"step": last, **evaluate(forward, workload, device, config.precision)}
        if last == config.steps:
            record_eval(final)
            evals = state["evals"]
        else:  # stopped early: this evaluation is not part of the run's logs (last.pt holds them)
            evals = [*evals, final]
    final = {**final, "final_loss": _smoothed_loss(history)}
    return TrainResult(
        history,
        evals,
        final,
        state["tokens"] / max(state["train_time"], 1e-9),
        state["train_time"],
        asdict(config),
        state["best"],
    )


class _Compiled(nn.Module):
    """``torch.compile`` of a model whose graph arguments arrive as plain tensors: an ``EdgeIndex``
    (a tensor subclass that the compiler's fake tensors do not trace) is passed as its data."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.compiled = torch.compile(model)

    def forward(self, *args: Any) -> Tensor:
        return self.compiled(*(_plain_graph(a) for a in args))


def _plain_graph(value: Any) -> Any:
    from torch_geometric import EdgeIndex

    if isinstance(value, EdgeIndex):
        return value.as_tensor()
    if isinstance(value, tuple):
        return tuple(_plain_graph(v) for v in value)
    return value


def _pool_step(model: nn.Module, tokens: int, loss_sum: Tensor, labels: Tensor, world_size: int) -> tuple[int, Tensor]:
    """The step's token count over every rank and its mean loss over every label, with the
    gradients (of the summed losses, averaged over the ranks by DDP) divided to the mean's."""
    ranks = 1  # the ranks whose gradients DDP averaged
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # every rank's batches differ
            device = loss_sum.device if dist.get_backend() == "nccl" else torch.device("cpu")
            counts = torch.tensor([float(tokens), float(loss_sum), float(labels)], dtype=torch.float64, device=device)
            dist.all_reduce(counts)
            tokens = int(counts[0])
            loss_sum, labels = counts[1].to(loss_sum), counts[2].to(labels)
            ranks = world_size if isinstance(model, _NoSync) else 1
        else:  # no process group to ask: this rank's count for each rank
            tokens *= world_size
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:  # one multiply for all of them, as clip_grad_norm_ scales them
        torch._foreach_mul_(grads, float(ranks / labels))
    return tokens, loss_sum / labels


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
    path.write_text(
        json.dumps(
            {
                "config": result.config,
                "final": result.final,
                "tokens_per_s": result.tokens_per_s,
                "train_seconds": result.train_seconds,
                "best": result.best,
                "sample": result.sample,
                "history": result.history,
                "evals": result.evals,
            },
            indent=2,
        )
    )
    paths.append(path)
    return paths
