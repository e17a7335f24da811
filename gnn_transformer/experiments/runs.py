"""One training run of any built-in task: build the workload and model, train, save.

Tasks: the sequence tasks of :mod:`.tasks` (``copy``, ``reverse``, ``sort``, ``parity``,
``addition``, ``recall``), character-level language modelling ``lm`` (:mod:`.lm`), ``listops``
(:mod:`.listops`), the graph tasks of :mod:`.graph_tasks` (``karate``, ``shortest_path``) and
``digits`` (:mod:`.vision_tasks`). Runs under ``torchrun`` with DistributedDataParallel
(:mod:`.distributed`); a run continues from its ``last.pt`` with ``resume``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
import shutil
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn

from . import checkpoints, distributed
from .graph_tasks import GRAPH_TOPOLOGIES, KarateWorkload, ShortestPathWorkload
from .listops import VOCAB as LISTOPS_VOCAB
from .listops import ListOpsConfig, ListOpsWorkload
from .listops import NUM_CLASSES as LISTOPS_CLASSES
from .lm import LMWorkload, TextConfig, bits_per_char, generate, load_corpus
from .models import EncoderConfig, NodeModel, PatchModel, SequenceClassifier, SequenceModel
from .tasks import TASKS, TOKEN_BYTES, SequenceWorkload, check_longer, check_set_fits, get_task, host_memory_budget
from .topologies import per_length, resolve_topology
from .training import TrainConfig, TrainResult, resolve_device, save_checkpoint, seed_everything, train, write_logs
from .vision_tasks import VISION_TOPOLOGIES, DigitsWorkload, check_patch

GRAPH_TASKS = ("karate", "shortest_path")
VISION_TASKS = ("digits",)
TEXT_TASKS = ("lm", "listops")
ALL_TASKS = tuple(TASKS) + TEXT_TASKS + GRAPH_TASKS + VISION_TASKS
SIZED_TASKS = tuple(TASKS) + ("shortest_path",)  # the tasks that take train_sizes / test_sizes
EVAL_SIZE_TASKS = SIZED_TASKS + TEXT_TASKS  # the tasks whose evaluation sets eval_size sizes
BATCHED_TASKS = tuple(t for t in ALL_TASKS if t != "karate")  # karate trains on its one graph
# fields a resumed run may change: they do not alter the trajectory of the weights
RESUME_FREE = frozenset(
    {
        "out",
        "resume",
        "save_all_ranks",
        "train.device",
        "train.log_every",
        "train.eval_every",
        "train.checkpoint_every",
        "train.stop_after",
        "train.compile",
        "text.sample_chars",
    }
)


class _Sizes(TypedDict, total=False):
    """The instance sizes a run sets (the workload's defaults stand for the others)."""

    train_sizes: tuple[int, int]
    test_sizes: tuple[int, int]


@dataclass
class RunConfig:
    """Everything one run needs."""

    task: str = "recall"  # one of ALL_TASKS
    topology: str = "full"  # sequence tasks: a topology spec; graph: graph|full; digits: grid|full
    train_sizes: tuple[int, int] | None = None  # sequence and shortest-path tasks: sizes to train on
    test_sizes: tuple[int, int] | None = None  # ... and the longer sizes to test on
    pe_dim: int = 4  # graph tasks: Laplacian eigenvector PE dimensions (0 = none)
    virtual_node: bool = False  # graph tasks: add a virtual node
    patch: int = 2  # digits: patch side in pixels
    model: EncoderConfig = field(default_factory=EncoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    text: TextConfig = field(default_factory=TextConfig)  # lm: the corpus, context and sample
    listops: ListOpsConfig = field(default_factory=ListOpsConfig)  # listops: lengths, sizes, pooling
    eval_size: int = 256  # sequence tasks: sequences per evaluation set; lm: validation windows;
    # listops: expressions in each of the validation and test sets; shortest_path: graphs per set
    out: str | None = None  # folder for logs and checkpoints (None: save nothing)
    save_all_ranks: bool = False  # under DDP, every rank writes model_rank{r}.pt (to compare them)
    resume: str | None = None  # a last.pt, or a folder holding one: continue that run exactly

    def __post_init__(self) -> None:
        if self.task not in ALL_TASKS:
            raise ValueError(f"Unknown task {self.task!r}: expected one of {list(ALL_TASKS)}")
        for name in ("train_sizes", "test_sizes"):
            if getattr(self, name) is not None and self.task not in SIZED_TASKS:
                raise ValueError(
                    f"Expected '{name}' unset for task {self.task!r}, which has no "
                    f"instance sizes (tasks with sizes: {', '.join(SIZED_TASKS)})"
                )
        if self.task in TASKS:
            check_longer(get_task(self.task, self.train_sizes, self.test_sizes))
        if self.pe_dim < 0:
            raise ValueError(f"Expected 'pe_dim' >= 0 (got {self.pe_dim})")
        if not isinstance(self.eval_size, int) or self.eval_size < 1:
            raise ValueError(f"Expected 'eval_size' to be a positive int (got {self.eval_size!r})")
        check_patch(self.patch)


def build(config: RunConfig) -> tuple[Any, nn.Module]:
    """The workload and a fresh (seeded) model of a run."""
    name = config.task
    if name not in ALL_TASKS:
        raise ValueError(f"Unknown task {name!r}: expected one of {list(ALL_TASKS)}")
    bs = config.train.batch_size
    # seeded before any workload: the graph tasks' Laplacian encodings draw their signs from torch's
    # global generator (PyG's AddLaplacianEigenvectorPE), so a run and its resumption see the same
    seed_everything(config.train.seed)
    workload: LMWorkload | ListOpsWorkload | SequenceWorkload | KarateWorkload | ShortestPathWorkload | DigitsWorkload
    if name in TASKS or name in TEXT_TASKS:
        topo = resolve_topology(config.topology)
        topo.check_heads(config.model.nhead)
        model_config = config.model if topo.select is None else replace(config.model, select=topo.select)
        if name == "lm":
            corpus = load_corpus(config.text)
            workload = LMWorkload(corpus, topo.build, config.text.context, bs, config.eval_size)
            model_config = _room_for(model_config, config.text.context)
            return workload, _fresh(
                config,
                model_config,
                lambda mc: SequenceModel(corpus.vocab_size, corpus.vocab_size, mc),
                config.text.context,
            )
        if name == "listops":
            workload = ListOpsWorkload(config.listops, topo.build, bs, config.eval_size, seed=config.train.seed)
            model_config = _room_for(model_config, config.listops.lengths[1] + 1)
            pool = config.listops.pool
            return workload, _fresh(
                config,
                model_config,
                lambda mc: SequenceClassifier(len(LISTOPS_VOCAB), LISTOPS_CLASSES, mc, pool),
                config.listops.lengths[1] + 1,
            )
        task = get_task(name, config.train_sizes, config.test_sizes)
        workload = SequenceWorkload(
            task, per_length(topo.build), bs, config.eval_size, eval_seed=config.train.seed + 12345
        )
        return workload, _fresh(
            config, model_config, lambda mc: SequenceModel(task.vocab_size, task.num_classes, mc), task.train_sizes[1]
        )
    if name in GRAPH_TASKS:
        if config.topology not in GRAPH_TOPOLOGIES:
            raise ValueError(f"Expected 'topology' in {GRAPH_TOPOLOGIES} for task {name!r} (got {config.topology!r})")
        if name == "karate":
            workload = KarateWorkload(config.topology, config.pe_dim, config.virtual_node)
        else:
            sizes = _Sizes()
            if config.train_sizes:
                sizes["train_sizes"] = (config.train_sizes[0], config.train_sizes[1])
            if config.test_sizes:
                sizes["test_sizes"] = (config.test_sizes[0], config.test_sizes[1])
            workload = ShortestPathWorkload(
                config.topology,
                config.pe_dim,
                config.virtual_node,
                batch_size=bs,
                eval_size=config.eval_size,
                eval_seed=config.train.seed + 12345,
                **sizes,
            )
        nodes = workload
        # the karate club is one fixed graph; shortest paths draw batches of graphs
        nodes_per_example = nodes.train_sizes[1] + 1 if isinstance(nodes, ShortestPathWorkload) else None
        return nodes, _fresh(
            config,
            config.model,
            lambda mc: NodeModel(nodes.in_features, nodes.num_classes, mc, config.pe_dim),
            nodes_per_example,
        )
    if config.topology not in VISION_TOPOLOGIES:
        raise ValueError(f"Expected 'topology' in {VISION_TOPOLOGIES} for task 'digits' (got {config.topology!r})")
    workload = DigitsWorkload(config.topology, config.patch, bs, seed=config.train.seed)
    digits = workload
    return digits, _fresh(
        config,
        config.model,
        lambda mc: PatchModel(digits.patch_dim, digits.num_patches, digits.num_classes, mc),
        digits.num_patches + 1,
    )


# host bytes per parameter of a training run on the CPU: float32 weights, their gradients and
# AdamW's two moments; a GPU run builds the weights on the host and trains on the GPU (where
# running out of memory raises torch.OutOfMemoryError, which the CLI reports)
_TRAINING_BYTES = {"cpu": 4 * 4, "cuda": 4}


def _fresh(
    config: RunConfig, model: EncoderConfig, make: Callable[[EncoderConfig], nn.Module], tokens: int | None
) -> nn.Module:
    """``make(model)`` with the run's seed, once its size is known to fit: its parameters (with
    their gradients and optimizer state on the CPU) must fit in half of the host's memory, else a
    ``ValueError`` names the model's sizes (the one furthest above its default first) before
    anything is allocated. The count comes from one and two layers built on the meta device (no
    memory): every layer of the stack has the same parameters. With ``tokens`` (the longest
    example), a training batch must fit too: its ids, targets and positions, and each layer's
    input that autograd keeps (a lower bound of a training step; on a GPU run only the drawn batch
    is on the host)."""
    on_cpu = not str(config.train.device).startswith("cuda")
    budget = host_memory_budget()
    try:
        with torch.device("meta"):
            one, two = (sum(p.numel() for p in make(replace(model, num_layers=n)).parameters()) for n in (1, 2))
        count = one + (model.num_layers - 1) * (two - one)
    except RuntimeError as err:  # a weight whose byte count overflows 64 bits
        if "overflow" not in str(err):
            raise
        got = "a weight too large for any tensor"
    else:
        need = count * _TRAINING_BYTES["cpu" if on_cpu else "cuda"]
        if need <= budget:
            if tokens is not None:
                kept = TOKEN_BYTES + (4 * model.d_model * model.num_layers if on_cpu else 0)
                held = " with the activations a training step keeps (at least)" if on_cpu else ""
                check_set_fits("batch_size", config.train.batch_size, tokens, kept, held=held)
            seed_everything(config.train.seed)
            return make(model)
        held = " with their gradients and optimizer state" if on_cpu else ""
        got = f"{count:,} parameters: about {need / 2**30:.3g} GiB{held}"
    sizes = {name: getattr(model, name) for name in ("d_model", "num_layers", "dim_feedforward")}
    default = EncoderConfig()
    named = sorted(sizes, key=lambda name: -sizes[name] / getattr(default, name))
    raise ValueError(
        "Expected "
        + ", ".join(f"'{name}' ({sizes[name]})" for name in named)
        + f" of a model that fits in half of this machine's memory, {budget / 2**30:.3g} GiB (got {got})"
    )


def _room_for(model: EncoderConfig, length: int) -> EncoderConfig:
    """Learned positions: a table of at least ``length`` rows."""
    if model.position == "learned" and model.max_positions < length:
        return replace(model, max_positions=length)
    return model


def _carry_best(source: Path, out: Path) -> None:
    """Copy the resumed run's ``best.pt`` into another ``out`` folder (it is written only when a
    better evaluation comes, so without it the resumed run's ``train.json`` names a best step whose
    weights are elsewhere); the copy is replaced if the resumed run finds a better one."""
    best, target = source / "best.pt", out / "best.pt"
    if best.is_file() and best.resolve() != target.resolve():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(best, target)


def resume_path(path: str | Path) -> Path:
    """A checkpoint to resume from: the file, or ``last.pt`` in a folder."""
    p = Path(path)
    return p / "last.pt" if p.is_dir() else p


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def check_resume(config: RunConfig, world_size: int = 1) -> dict[str, Any]:
    """The training state of ``config.resume``, refused unless it was written by a run of the same
    configuration (up to :data:`RESUME_FREE`) on as many processes."""
    if config.resume is None:
        raise ValueError("Expected 'resume' to name a checkpoint or a run's folder (got None)")
    path = resume_path(config.resume)
    payload = checkpoints.read(path, name="resume")
    checkpoints.check_training_state(payload, path, world_size=world_size)
    saved, now = _flat(payload["meta"].get("run", {})), _flat(_plain(asdict(config)))
    differ = [key for key in sorted(set(saved) | set(now)) if key not in RESUME_FREE and saved.get(key) != now.get(key)]
    if differ:
        shown = ", ".join(f"{key}={saved.get(key)!r} (this run: {now.get(key)!r})" for key in differ[:6])
        raise ValueError(
            f"Expected 'resume' to be a checkpoint of this configuration (got {str(path)!r}, "
            f"written with {shown}{', ...' if len(differ) > 6 else ''})"
        )
    return payload


def run_training(config: RunConfig, *, progress: bool = False) -> tuple[TrainResult, nn.Module]:
    """Train one run (on every process of a ``torchrun`` launch); rank 0 writes the outputs.

    Writes into ``config.out``: ``train_log.csv``, ``train_eval.csv``, ``train.json`` and
    ``model.pt`` (state dict, optimizer-free, with the run's config as metadata); ``last.pt`` (the
    training state) every ``train.checkpoint_every`` steps and at ``train.stop_after``; ``best.pt``
    (the best evaluation's weights) with ``train.eval_every``. Language models also report
    ``val_loss`` (nats per character) and ``val_bits_per_char`` in ``final`` and a generated
    ``sample``.
    """
    resolve_device(config.train.device)  # a clear error before anything starts
    info = distributed.from_environment()
    payload = check_resume(config, info.world_size) if config.resume is not None else None
    workload, model = build(config)  # bad data (a missing text, an impossible length range) fails here
    device = distributed.setup(info, config.train.device)
    if payload is not None and config.resume is not None and config.out is not None and info.is_main:
        _carry_best(resume_path(config.resume).parent, Path(config.out))
    train_config = TrainConfig(**{**asdict(config.train), "device": device})
    meta = {"run": _plain(asdict(config)), "world_size": info.world_size}
    if config.task == "lm":  # the characters of the ids: the checkpoint is read without its text
        meta["vocab"] = workload.corpus.chars
    try:
        model = distributed.wrap(model.to(device), info, device)
        result = train(
            model,
            workload,
            train_config,
            progress=progress,
            rank=info.rank,
            world_size=info.world_size,
            description=f"{config.task}/{config.topology}",
            checkpoint_dir=config.out,
            resume=payload,
            meta=meta,
        )
        result.config = {**asdict(config), "world_size": info.world_size}
        if config.task == "lm":
            result.final["val_loss"] = result.final["loss_val"]
            result.final["val_bits_per_char"] = bits_per_char(result.final["loss_val"])
            result.final["val_windows"] = workload.eval_windows
            if config.text.sample_chars and info.is_main:
                result.sample = generate(
                    getattr(model, "module", model),
                    workload,
                    config.text.sample_chars,
                    seed=config.train.seed,
                    device=device,
                    progress=progress,
                )
        if config.out is not None:
            out = Path(config.out)
            step = int(result.final["step"])
            if info.is_main:
                write_logs(result, out)
                save_checkpoint(out / "model.pt", model, step=step, meta=meta)
            if config.save_all_ranks and info.enabled:
                save_checkpoint(out / f"model_rank{info.rank}.pt", model, step=step, meta=meta)
        distributed.barrier(info)
        return result, getattr(model, "module", model)
    finally:
        distributed.teardown(info)


def _plain(value: Any) -> Any:
    """Tuples to lists, so metadata loads with ``weights_only=True`` in any torch version."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
