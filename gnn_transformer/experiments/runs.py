"""One training run of any built-in task: build the workload and model, train, save.

Tasks: the sequence tasks of :mod:`.tasks` (``copy``, ``reverse``, ``sort``, ``parity``,
``addition``, ``recall``), the graph tasks of :mod:`.graph_tasks` (``karate``,
``shortest_path``) and ``digits`` (:mod:`.vision_tasks`). Runs under ``torchrun`` with
DistributedDataParallel (:mod:`.distributed`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from . import distributed
from .graph_tasks import GRAPH_TOPOLOGIES, KarateWorkload, ShortestPathWorkload
from .models import EncoderConfig, NodeModel, PatchModel, SequenceModel
from .tasks import TASKS, SequenceWorkload, check_longer, get_task
from .topologies import per_length, resolve_topology
from .training import (TrainConfig, TrainResult, resolve_device, save_checkpoint, seed_everything,
                       train, write_logs)
from .vision_tasks import VISION_TOPOLOGIES, DigitsWorkload, check_patch

GRAPH_TASKS = ("karate", "shortest_path")
VISION_TASKS = ("digits",)
ALL_TASKS = tuple(TASKS) + GRAPH_TASKS + VISION_TASKS
SIZED_TASKS = tuple(TASKS) + ("shortest_path",)  # the tasks that take train_sizes / test_sizes


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
    out: str | None = None  # folder for logs and the checkpoint (None: save nothing)
    save_all_ranks: bool = False  # under DDP, every rank writes model_rank{r}.pt (to compare them)

    def __post_init__(self) -> None:
        if self.task not in ALL_TASKS:
            raise ValueError(f"Unknown task {self.task!r}: expected one of {list(ALL_TASKS)}")
        for name in ("train_sizes", "test_sizes"):
            if getattr(self, name) is not None and self.task not in SIZED_TASKS:
                raise ValueError(f"Expected '{name}' unset for task {self.task!r}, which has no "
                                 f"instance sizes (tasks with sizes: {', '.join(SIZED_TASKS)})")
        if self.task in TASKS:
            check_longer(get_task(self.task, self.train_sizes, self.test_sizes))
        if self.pe_dim < 0:
            raise ValueError(f"Expected 'pe_dim' >= 0 (got {self.pe_dim})")
        check_patch(self.patch)


def build(config: RunConfig) -> tuple[Any, nn.Module]:
    """The workload and a fresh (seeded) model of a run."""
    name = config.task
    if name not in ALL_TASKS:
        raise ValueError(f"Unknown task {name!r}: expected one of {list(ALL_TASKS)}")
    bs = config.train.batch_size
    if name in TASKS:
        task = get_task(name, config.train_sizes, config.test_sizes)
        topo = resolve_topology(config.topology)
        topo.check_heads(config.model.nhead)
        workload = SequenceWorkload(task, per_length(topo.build), bs, eval_seed=config.train.seed + 12345)
        model_config = config.model if topo.select is None else replace(config.model, select=topo.select)
        seed_everything(config.train.seed)
        return workload, SequenceModel(task.vocab_size, task.num_classes, model_config)
    if name in GRAPH_TASKS:
        if config.topology not in GRAPH_TOPOLOGIES:
            raise ValueError(f"Expected 'topology' in {GRAPH_TOPOLOGIES} for task {name!r} "
                             f"(got {config.topology!r})")
        if name == "karate":
            workload = KarateWorkload(config.topology, config.pe_dim, config.virtual_node)
        else:
            sizes = {k: tuple(v) for k, v in (("train_sizes", config.train_sizes),
                                               ("test_sizes", config.test_sizes)) if v}
            workload = ShortestPathWorkload(config.topology, config.pe_dim, config.virtual_node,
                                            batch_size=bs, eval_seed=config.train.seed + 12345,
                                            **sizes)
        seed_everything(config.train.seed)
        return workload, NodeModel(workload.in_features, workload.num_classes, config.model,
                                   config.pe_dim)
    if config.topology not in VISION_TOPOLOGIES:
        raise ValueError(f"Expected 'topology' in {VISION_TOPOLOGIES} for task 'digits' "
                         f"(got {config.topology!r})")
    workload = DigitsWorkload(config.topology, config.patch, bs, seed=config.train.seed)
    seed_everything(config.train.seed)
    return workload, PatchModel(workload.patch_dim, workload.num_patches, workload.num_classes,
                                config.model)


def run_training(config: RunConfig, *, progress: bool = False) -> tuple[TrainResult, nn.Module]:
    """Train one run (on every process of a ``torchrun`` launch); rank 0 writes the outputs.

    Writes into ``config.out``: ``train_log.csv``, ``train_eval.csv``, ``train.json`` and
    ``model.pt`` (state dict, optimizer-free, with the run's config as metadata).
    """
    resolve_device(config.train.device)  # a clear error before anything starts
    info = distributed.from_environment()
    device = distributed.setup(info, config.train.device)
    train_config = TrainConfig(**{**asdict(config.train), "device": device})
    try:
        workload, model = build(config)
        model = distributed.wrap(model.to(device), info, device)
        result = train(model, workload, train_config, progress=progress, rank=info.rank,
                       world_size=info.world_size, description=f"{config.task}/{config.topology}")
        result.config = {**asdict(config), "world_size": info.world_size}
        if config.out is not None:
            out = Path(config.out)
            meta = {"run": _plain(asdict(config)), "world_size": info.world_size}
            if info.is_main:
                write_logs(result, out)
                save_checkpoint(out / "model.pt", model, step=train_config.steps, meta=meta)
            if config.save_all_ranks and info.enabled:
                save_checkpoint(out / f"model_rank{info.rank}.pt", model, step=train_config.steps,
                                meta=meta)
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
