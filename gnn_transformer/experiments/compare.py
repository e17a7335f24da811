"""The main experiment: one small transformer, several attention topologies, one task.

Every topology starts from the same initial weights and sees the same batches in the same order;
only the token graph differs. For each one the comparison records the graph's size, how far the
trained model's attention is from the dense reference, the training curve, the accuracy on unseen
instances of the training sizes and on longer ones, throughput and memory.

The default task is multi-query associative recall (:func:`~.tasks.recall_task`): a query must
fetch the value of its key from anywhere earlier in the sequence. The default topologies give
every token about the same number of keys (7) except ``full``: a sliding window only sees its
neighbourhood, BigBird mixes a window with a global token and random keys, ``random`` draws its
keys uniformly.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .models import EncoderConfig, SequenceModel
from .tasks import SequenceWorkload, check_longer, get_task
from .topologies import graph_edges, graph_to, label, per_length, resolve_topology
from .training import TrainConfig, TrainResult, resolve_device, seed_everything, step_memory, train
from .verify import model_dense_error

DEFAULT_TOPOLOGIES = (
    "full",
    "sliding_window:window=3",
    "bigbird:window=1,num_global=1,num_random=2",
    "random:k=7",
)


@dataclass
class CompareConfig:
    """One comparison: a task, topologies, a model size and the training settings."""
    task: str = "recall"  # a name of tasks.TASKS
    topologies: tuple[str, ...] = DEFAULT_TOPOLOGIES  # topology specs, see topologies.py
    train_sizes: tuple[int, int] | None = None  # override the task's training sizes
    test_sizes: tuple[int, int] | None = None  # override the task's longer test sizes
    model: EncoderConfig = field(default_factory=EncoderConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=800, batch_size=32, lr=2e-3, warmup=80, schedule="cosine"))
    eval_size: int = 256  # sequences per evaluation set

    def __post_init__(self) -> None:
        if self.eval_size < 1:
            raise ValueError(f"Expected 'eval_size' >= 1 (got {self.eval_size})")
        check_longer(get_task(self.task, self.train_sizes, self.test_sizes))


@dataclass
class TopologyResult:
    """The row of one topology."""
    topology: str
    spec: str
    edges_per_seq: float  # mean edges of one sequence of the test set (per head, mean over the layers;
    # with a selector: the allowed graph's)
    density: float  # edges / sum(L^2) on the test set
    max_dense_error: float  # trained model: graph attention vs dense reference, every layer
    final_loss: float
    acc_test: float  # training sizes, unseen instances
    acc_longer: float  # larger sizes than seen in training
    tokens_per_s: float
    memory_mib: float  # one training step, see training.step_memory
    train_seconds: float
    history: list[dict[str, float]] = field(repr=False, default_factory=list)

    def row(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("history")
        return out


@dataclass
class CompareResult:
    config: dict[str, Any]
    results: list[TopologyResult]
    seconds: float
    device: str

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "device": self.device, "seconds": self.seconds,
                "results": [{**r.row(), "history": r.history} for r in self.results]}


def run_topology(config: CompareConfig, spec: str, *, progress: bool = False) -> TopologyResult:
    """Train and measure the model under one topology."""
    device = resolve_device(config.train.device)
    task = get_task(config.task, config.train_sizes, config.test_sizes)
    topo = resolve_topology(spec)
    topo.check_heads(config.model.nhead)
    build = per_length(topo.build)
    workload = SequenceWorkload(task, build, config.train.batch_size, config.eval_size,
                                eval_seed=config.train.seed + 12345)
    model_config = config.model if topo.select is None else replace(config.model, select=topo.select)
    seed_everything(config.train.seed)  # same initial weights for every topology
    model = SequenceModel(task.vocab_size, task.num_classes, model_config).to(device)
    result: TrainResult = train(model, workload, config.train, progress=progress,
                                description=label(spec))

    test = workload.eval_sets()["test"]
    edges = nodes_sq = sequences = 0
    for batch in test:
        # per head, mean over the layers; a selector's allowed edges
        edges += graph_edges(build(batch.lengths), config.model.num_layers, config.model.nhead)
        nodes_sq += sum(L * L for L in batch.lengths)
        sequences += len(batch.lengths)
    model.eval()
    first = test[0].to(device)
    error = model_dense_error(
        model, lambda: model(first.tokens, first.positions, graph_to(build(first.lengths), device)),
        first.lengths)
    memory = step_memory(model, workload, workload.train_batch(torch.Generator().manual_seed(0)),
                         device)
    return TopologyResult(
        topology=label(spec), spec=spec, edges_per_seq=edges / sequences,
        density=edges / nodes_sq, max_dense_error=error, final_loss=result.final["final_loss"],
        acc_test=result.final["acc_test"], acc_longer=result.final["acc_longer"],
        tokens_per_s=result.tokens_per_s, memory_mib=memory / 2**20,
        train_seconds=result.train_seconds, history=result.history)


def run_compare(config: CompareConfig, *, progress: bool = False,
                on_result: Callable[[TopologyResult], None] | None = None) -> CompareResult:
    """Run every topology of ``config``; ``on_result`` sees each row as soon as it exists."""
    if not config.topologies:
        raise ValueError("Expected at least one topology in 'topologies'")
    resolve_device(config.train.device)
    task = get_task(config.task, config.train_sizes, config.test_sizes)
    sizes = (*task.train_sizes, *task.test_sizes)
    extremes = [task.seq_len(min(sizes)), task.seq_len(max(sizes))]  # shortest and longest sequence
    for spec in config.topologies:  # fail early on a bad spec, before any training
        topo = resolve_topology(spec)
        topo.check_heads(config.model.nhead)
        topo.build(extremes)
    start = time.perf_counter()
    results = []
    for spec in config.topologies:
        r = run_topology(config, spec, progress=progress)
        results.append(r)
        if on_result is not None:
            on_result(r)
    return CompareResult(asdict(config), results, time.perf_counter() - start, config.train.device)


def save_compare(result: CompareResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv`` and ``compare.png`` into ``out_dir``."""
    from .figures import compare_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "figure": out / "compare.png"}
    paths["json"].write_text(json.dumps(result.to_json(), indent=2))
    rows = [r.row() for r in result.results]
    with paths["csv"].open("w") as f:
        keys = list(rows[0])
        f.write(",".join(keys) + "\n")
        for row in rows:
            f.write(",".join(_csv(row[k]) for k in keys) + "\n")
    compare_figure(result, paths["figure"])
    return paths


def _csv(value: Any) -> str:
    text = str(value)
    return f'"{text}"' if "," in text else text
