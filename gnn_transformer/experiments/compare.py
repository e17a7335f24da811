"""The main experiment: one small transformer, several attention topologies, one task.

Every topology starts from the same initial weights and sees the same batches in the same order;
only the token graph differs. For each one the comparison records the graph's size, how far the
trained model's attention is from the dense reference, the training curve, the accuracy on unseen
instances of the training sizes and on longer ones (ListOps: on its test set; language modelling:
the validation loss), throughput and memory. With ``seeds > 1`` every topology is trained once per
seed (``train.seed``, ``train.seed + 1``, ...) and :meth:`CompareResult.summary` gives the mean and
standard deviation of every measure.

The default task is multi-query associative recall (:func:`~.tasks.recall_task`): a query must
fetch the value of its key from anywhere earlier in the sequence. The default topologies give
every token about the same number of keys (7) except ``full``: a sliding window only sees its
neighbourhood, BigBird mixes a window with a global token and random keys, ``random`` draws its
keys uniformly. ``lm`` and ``listops`` have their own defaults (:func:`default_topologies`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .listops import ListOpsBatch, ListOpsConfig
from .lm import TextConfig, causal_build, load_corpus
from .models import EncoderConfig
from .runs import RunConfig, build
from .tasks import TASKS, check_longer, get_task
from .topologies import graph_edges, label, resolve_topology
from .training import TrainConfig, TrainResult, resolve_device, step_memory, train
from .verify import model_dense_error

DEFAULT_TOPOLOGIES = ("full", "sliding_window:window=3", "bigbird:window=1,num_global=1,num_random=2", "random:k=7")
# language modelling (every graph intersected with the causal one): about 8-9 keys per token for context 64
LM_TOPOLOGIES = (
    "causal",
    "sliding_window:window=8",
    "dilated:window=4,dilation=4,causal=true",
    "bigbird:block=4,window=1,num_global=1,num_random=1",
)
LISTOPS_TOPOLOGIES = ("full", "sliding_window:window=8", "bigbird:window=3,num_global=1,num_random=3")
COMPARE_TASKS = tuple(TASKS) + ("lm", "listops")
METRICS = (
    "edges_per_seq",
    "density",
    "max_dense_error",
    "final_loss",
    "acc_test",
    "acc_longer",
    "val_loss",
    "tokens_per_s",
    "memory_mib",
    "train_seconds",
)


def default_topologies(task: str) -> tuple[str, ...]:
    """The topologies a comparison of ``task`` runs when none are given."""
    return LM_TOPOLOGIES if task == "lm" else LISTOPS_TOPOLOGIES if task == "listops" else DEFAULT_TOPOLOGIES


@dataclass
class CompareConfig:
    """One comparison: a task, topologies, a model size and the training settings."""

    task: str = "recall"  # a name of tasks.TASKS, "lm" or "listops"
    topologies: tuple[str, ...] | None = None  # topology specs, see topologies.py (None: default_topologies)
    train_sizes: tuple[int, int] | None = None  # override the task's training sizes
    test_sizes: tuple[int, int] | None = None  # override the task's longer test sizes
    model: EncoderConfig = field(default_factory=EncoderConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=800, batch_size=32, lr=2e-3, warmup=80, schedule="cosine")
    )
    eval_size: int = 256  # sequences per evaluation set (lm: validation windows)
    text: TextConfig = field(default_factory=TextConfig)  # lm: the corpus and context (no sample is generated)
    listops: ListOpsConfig = field(default_factory=ListOpsConfig)  # listops: the data
    seeds: int = 1  # runs per topology, seeds train.seed, train.seed + 1, ...

    def __post_init__(self) -> None:
        if self.task not in COMPARE_TASKS:
            raise ValueError(f"Unknown task {self.task!r}: expected one of {list(COMPARE_TASKS)}")
        if self.topologies is None:
            self.topologies = default_topologies(self.task)
        self.topologies = tuple(self.topologies)
        if self.eval_size < 1:
            raise ValueError(f"Expected 'eval_size' >= 1 (got {self.eval_size})")
        if not isinstance(self.seeds, int) or isinstance(self.seeds, bool) or self.seeds < 1:
            raise ValueError(f"Expected 'seeds' to be a positive int (got {self.seeds!r})")
        if self.task in TASKS:
            check_longer(get_task(self.task, self.train_sizes, self.test_sizes))
        elif self.train_sizes is not None or self.test_sizes is not None:
            raise ValueError(
                f"Expected 'train_sizes' and 'test_sizes' unset for task {self.task!r} "
                "(lm: context; listops: listops.lengths)"
            )

    @property
    def specs(self) -> tuple[str, ...]:
        """The topology specs that run: ``topologies``, or the task's defaults where it is None."""
        return self.topologies if self.topologies is not None else default_topologies(self.task)

    def run_config(self, spec: str, seed: int) -> RunConfig:
        """The single run of one topology and seed."""
        return RunConfig(
            task=self.task,
            topology=spec,
            train_sizes=self.train_sizes,
            test_sizes=self.test_sizes,
            model=self.model,
            train=replace(self.train, seed=seed),
            eval_size=self.eval_size,
            text=replace(self.text, sample_chars=0),  # a comparison keeps no generated text
            listops=self.listops,
        )


@dataclass
class TopologyResult:
    """The row of one topology and seed."""

    topology: str
    spec: str
    seed: int
    edges_per_seq: float  # mean edges of one sequence of the test set (per head, mean over the layers;
    # with a selector: the allowed graph's; lm: after the intersection with the causal graph)
    density: float  # edges / sum(L^2) on the test set
    max_dense_error: float  # trained model: graph attention vs dense reference, every layer
    final_loss: float
    acc_test: float  # training sizes, unseen instances (listops: the test set; lm: next-character accuracy)
    acc_longer: float | None  # larger sizes than seen in training (sequence tasks only)
    val_loss: float | None  # lm: validation loss in nats per character
    val_windows: int | None  # lm: validation windows (eval_size, or all the validation part holds)
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
    results: list[TopologyResult]  # one per topology and seed, topology after topology
    seconds: float
    device: str

    def summary(self) -> list[dict[str, Any]]:
        """One row per topology: ``<measure>`` the mean over the seeds and ``<measure>_std`` the
        sample standard deviation (0 for one seed); measures that do not apply are ``None``."""
        rows = []
        for name in dict.fromkeys(r.topology for r in self.results):
            runs = [r for r in self.results if r.topology == name]
            row: dict[str, Any] = {"topology": name, "spec": runs[0].spec, "seeds": len(runs)}
            for key in METRICS:
                values = [getattr(r, key) for r in runs]
                if any(v is None for v in values):
                    row[key] = row[f"{key}_std"] = None
                    continue
                row[key] = statistics.fmean(values)
                row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            rows.append(row)
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "device": self.device,
            "seconds": self.seconds,
            "summary": self.summary(),
            "results": [{**r.row(), "history": r.history} for r in self.results],
        }


def _graph(config: CompareConfig, spec: str):
    """``lengths -> graph`` of ``spec`` as the task's workload builds it (lm: made causal)."""
    topo = resolve_topology(spec)
    return causal_build(topo.build) if config.task == "lm" else topo.build


def run_topology(
    config: CompareConfig, spec: str, *, seed: int | None = None, progress: bool = False
) -> TopologyResult:
    """Train and measure the model under one topology (seed: ``config.train.seed`` unless given)."""
    seed = config.train.seed if seed is None else seed
    device = resolve_device(config.train.device)
    workload, model = build(config.run_config(spec, seed))  # same initial weights for every topology
    model = model.to(device)
    result: TrainResult = train(
        model,
        workload,
        replace(config.train, seed=seed),
        progress=progress,
        description=label(spec) + (f" seed {seed}" if config.seeds > 1 else ""),
    )
    graph = _graph(config, spec)
    sets = workload.eval_sets()
    test = sets["test"] if "test" in sets else next(iter(sets.values()))
    edges = 0.0
    nodes_sq = sequences = 0
    for batch in test:
        # per head, mean over the layers; a selector's allowed edges
        edges += graph_edges(graph(batch.lengths), config.model.num_layers, config.model.nhead)
        nodes_sq += sum(L * L for L in batch.lengths)
        sequences += len(batch.lengths)
    model.eval()
    first = _first(test[0])
    error = model_dense_error(model, lambda: workload.logits(model, first, device), first.lengths)
    memory = step_memory(model, workload, workload.train_batch(torch.Generator().manual_seed(0)), device)
    final = result.final
    return TopologyResult(
        topology=label(spec),
        spec=spec,
        seed=seed,
        edges_per_seq=edges / sequences,
        density=edges / nodes_sq,
        max_dense_error=error,
        final_loss=final["final_loss"],
        acc_test=final["acc_test"] if "acc_test" in final else final["acc_val"],
        acc_longer=final.get("acc_longer"),
        val_loss=final.get("loss_val") if config.task == "lm" else None,
        val_windows=workload.eval_windows if config.task == "lm" else None,
        tokens_per_s=result.tokens_per_s,
        memory_mib=memory / 2**20,
        train_seconds=result.train_seconds,
        history=result.history,
    )


def _first(batch: Any, budget: int = 2**22) -> Any:
    """The first sequences of ``batch`` whose dense attention (``sum(L^2)`` scores) fits ``budget``,
    at least one: the dense reference of a batch of long sequences would not fit in memory."""
    k, total = 0, 0
    while k < len(batch.lengths) and (k == 0 or total + batch.lengths[k] ** 2 <= budget):
        total += batch.lengths[k] ** 2
        k += 1
    if k == len(batch.lengths):
        return batch
    n = sum(batch.lengths[:k])
    targets = batch.targets[:k] if isinstance(batch, ListOpsBatch) else batch.targets[:n]
    return type(batch)(batch.tokens[:n], targets, batch.positions[:n], batch.lengths[:k])


def _check_specs(config: CompareConfig) -> None:
    """Fail early on a bad spec or bad data, before any training."""
    if config.task in TASKS:
        task = get_task(config.task, config.train_sizes, config.test_sizes)
        sizes = (*task.train_sizes, *task.test_sizes)
        extremes = [task.seq_len(min(sizes)), task.seq_len(max(sizes))]  # shortest and longest sequence
    elif config.task == "lm":
        load_corpus(config.text)  # a missing or too short text fails here
        extremes = [config.text.context]
    else:
        extremes = [config.listops.lengths[0] + 1, config.listops.lengths[1] + 1]
    for spec in config.specs:
        topo = resolve_topology(spec)
        topo.check_heads(config.model.nhead)
        topo.build(extremes)


def run_compare(
    config: CompareConfig, *, progress: bool = False, on_result: Callable[[TopologyResult], None] | None = None
) -> CompareResult:
    """Run every topology of ``config`` for every seed; ``on_result`` sees each row as soon as it
    exists."""
    if not config.specs:
        raise ValueError("Expected at least one topology in 'topologies'")
    resolve_device(config.train.device)
    _check_specs(config)
    start = time.perf_counter()
    results = []
    for spec in config.specs:
        for seed in range(config.train.seed, config.train.seed + config.seeds):
            r = run_topology(config, spec, seed=seed, progress=progress)
            results.append(r)
            if on_result is not None:
                on_result(r)
    return CompareResult(asdict(config), results, time.perf_counter() - start, config.train.device)


def save_compare(result: CompareResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json`` (per-seed rows and the summary), ``results.csv`` (one row per
    topology and seed) and ``compare.png`` into ``out_dir``."""
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


def mean_std(mean: float | None, std: float | None, fmt: str) -> str:
    """``"0.512 ± 0.013"`` (``"-"`` for a measure that does not apply)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return format(mean, fmt) + (f" ± {format(std, fmt)}" if std else "")


def _csv(value: Any) -> str:
    text = "" if value is None else str(value)
    return f'"{text}"' if "," in text else text
