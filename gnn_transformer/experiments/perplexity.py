"""The ``perplexity`` run: a causal language model on one token stream under several token graphs.

Every graph is built on the whole stream (one sequence of ``T`` tokens) and the stream is fed
through the model in chunks with :func:`gnn_transformer.streaming.perplexity`, whose cache keeps
only what the graph still reads. A row per graph: perplexity over the stream, per position bucket,
edges, density and the cache's peak size. The command's options live in
:mod:`gnn_transformer.cli.perplexity`.
"""
from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..streaming import perplexity
from .topologies import label, resolve_topology

NATIVE = "native"  # the model's own graphs (per layer for the families that have local layers)


@dataclass
class PerplexityRow:
    """One graph's result on the stream."""

    topology: str
    tokens: int
    perplexity: float
    nll: float  # mean nats per predicted token
    edges: int  # of the widest layer's graph
    density: float  # edges / (T (T + 1) / 2), of the causal graph's edges
    peak_cache: int
    seconds: float
    buckets: list[dict] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "buckets"}


def _edges(graph: Any) -> int:
    if isinstance(graph, list):
        return max(_edges(g) for g in graph)
    return int((graph[0] if isinstance(graph, tuple) else graph).size(1))


def build_graph(spec: str, length: int, num_layers: int, native: Callable[[int], Any] | None = None) -> Any:
    """The graph of ``spec`` on one sequence of ``length`` tokens: an ``edge_index``, a per-head pair,
    or one graph per layer. ``"native"`` is the model's own graph (``native(length)``)."""
    if spec == NATIVE:
        if native is None:
            raise ValueError(f"Expected a topology spec: the model has no graphs of its own ({NATIVE!r})")
        return native(length)
    topo = resolve_topology(spec)
    if topo.select is not None:
        raise ValueError(f"Expected a graph fixed before the run for a stream (got {spec!r}, whose layers choose "
                         "their graphs from the data)")
    graph = topo.build([length])
    if topo.kind == "per_layer":
        return [graph(layer) for layer in range(num_layers)]
    return graph


def run_perplexity(model, ids: Tensor, specs: Sequence[str], *, num_layers: int, chunk: int = 256,
                   bucket_size: int = 256, native: Callable[[int], Any] | None = None, progress: bool = False,
                   on_row: Callable[[PerplexityRow], None] | None = None) -> list[PerplexityRow]:
    """Perplexity of ``model`` on ``ids`` ``[T]`` under each spec (built first, so a bad spec fails
    before any run)."""
    if not specs:
        raise ValueError("Expected at least one topology spec (got none)")
    length = ids.numel()
    graphs = [(spec, build_graph(spec, length, num_layers, native)) for spec in specs]
    rows = []
    for spec, graph in graphs:
        start = time.perf_counter()
        result = perplexity(model, ids, graph, chunk=chunk, bucket_size=bucket_size, progress=progress)
        edges = _edges(graph)
        row = PerplexityRow(topology=spec if spec == NATIVE else label(spec), tokens=length,
                            perplexity=result.perplexity, nll=result.mean_nll, edges=edges,
                            density=edges / (length * (length + 1) / 2), peak_cache=result.peak_cache,
                            seconds=time.perf_counter() - start, buckets=result.buckets)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def save_perplexity(rows: Sequence[PerplexityRow], out_dir: str | Path, *, title: str = "") -> dict[str, Path]:
    """Write ``perplexity.json`` (rows with their buckets), ``perplexity.csv`` (one line per graph and
    bucket) and ``perplexity.png`` (perplexity against position, one line per graph)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "perplexity.json", "csv": out / "perplexity.csv", "figure": out / "perplexity.png"}
    paths["json"].write_text(json.dumps([asdict(r) for r in rows], indent=2))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["topology", "bucket_start", "bucket_stop", "tokens", "nll", "perplexity",
                         "stream_perplexity", "edges", "peak_cache"])
        for r in rows:
            for b in r.buckets:
                writer.writerow([r.topology, b["start"], b["stop"], b["tokens"], f"{b['nll']:.6f}",
                                 f"{b['perplexity']:.6f}", f"{r.perplexity:.6f}", r.edges, r.peak_cache])
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        middle = [(b["start"] + b["stop"]) / 2 for b in r.buckets]
        ax.plot(middle, [b["perplexity"] for b in r.buckets], marker="o", markersize=3,
                label=f"{r.topology} ({r.perplexity:.2f})")
    ax.set_xlabel("position in the stream")
    ax.set_ylabel("perplexity per bucket")
    if rows and all(b["perplexity"] > 0 and math.isfinite(b["perplexity"]) for r in rows for b in r.buckets):
        ax.set_yscale("log")
    ax.set_title(title or "perplexity along the stream")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["figure"], dpi=120)
    plt.close(fig)
    return paths


def stream_ids(sequences: Sequence[Sequence[int]], max_tokens: int | None) -> Tensor:
    """One stream of token ids from the input's sequences (in order), cut to ``max_tokens``."""
    ids = [int(t) for s in sequences for t in s]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"Expected at least 2 tokens in the input for a perplexity (got {len(ids)})")
    return torch.tensor(ids, dtype=torch.long)


__all__ = ["NATIVE", "PerplexityRow", "build_graph", "run_perplexity", "save_perplexity", "stream_ids"]
