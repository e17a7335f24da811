"""The ``perplexity`` run: a causal language model on one token stream under several token graphs.

Every graph is built on the whole stream (one sequence of ``T`` tokens). Two protocols, by the
positions the model is given:

- ``positions="absolute"``: the stream is fed through the model in chunks with
  :func:`gnn_transformer.streaming.perplexity`, whose cache keeps only what the graph still reads;
  each token is at its place in the stream, and the logits equal one forward pass over the graph.
  A model with a table of ``P`` learned positions reads streams of at most ``P`` tokens this way.
- ``positions="context"``: every token is predicted by a fresh forward pass over its context, the
  tokens it reads in the graph (any layer, any head) and itself, in stream order at positions
  ``0 .. k - 1``, along the graph's edges among them. For StreamingLLM's graph (``s`` sinks and a
  causal window) these are the positions StreamingLLM gives inside its cache, the sinks just before
  the window, with every cached key and value recomputed; for a sliding window it is the "sliding
  window with re-computation" baseline of the StreamingLLM paper. It is exact for any positions
  (learned, RoPE, ALiBi) and costs a forward pass of up to ``k`` tokens per token; a model with a
  table of ``P`` learned positions reads graphs whose contexts hold at most ``P`` tokens.

A row per graph: perplexity over the stream, per position bucket, edges, density and the most
nodes held at once (the cache's peak; with ``"context"``, the largest context). The command's
options live in :mod:`gnn_transformer.cli.perplexity`.
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

from ..streaming import PerplexityResult, check_stream_edges, check_stream_ids, layer_graphs, perplexity
from .analyze_run import call_with_graph
from .topologies import label, resolve_topology

NATIVE = "native"  # the model's own graphs (per layer for the families that have local layers)
POSITIONS = ("absolute", "context")


@dataclass
class PerplexityRow:
    """One graph's result on the stream."""

    topology: str
    tokens: int
    perplexity: float
    nll: float  # mean nats per predicted token
    edges: int  # of the widest layer's graph (a per-head graph's summed over its heads)
    density: float  # edges / (T (T + 1) / 2), of the causal graph's edges (per head on a per-head graph)
    peak_cache: int  # the most nodes held at once: the cache's peak, or the largest context
    seconds: float
    positions: str = "absolute"  # the protocol: "absolute" or "context"
    buckets: list[dict] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "buckets"}


def _edges(graph: Any, num_heads: int) -> tuple[int, float]:
    """``(edges, edges per head)`` of the widest layer's graph: a per-head graph's edges are summed
    over its ``num_heads`` heads, a shared graph's serve every head."""
    if isinstance(graph, list):
        return max(_edges(g, num_heads) for g in graph)
    if isinstance(graph, tuple):
        return int(graph[0].size(1)), graph[0].size(1) / num_heads
    return int(graph.size(1)), float(graph.size(1))


def build_graph(spec: str, length: int, num_layers: int, native: Callable[[int], Any] | None = None) -> Any:
    """The graph of ``spec`` on one sequence of ``length`` tokens: an ``edge_index``, a per-head pair,
    or one graph per layer. ``"native"`` is the model's own graph (``native(length)``)."""
    if spec == NATIVE:
        if native is None:
            raise ValueError(f"Expected a topology spec: the model has no graphs of its own ({NATIVE!r})")
        return native(length)
    topo = resolve_topology(spec)
    if topo.select is not None:
        raise ValueError(
            f"Expected a graph fixed before the run for a stream (got {spec!r}, whose layers choose "
            "their graphs from the data)"
        )
    graph = topo.build([length])
    if topo.kind == "per_layer":
        return [graph(layer) for layer in range(num_layers)]
    return graph


# ------------------------------------------------------------------ positions="context"
@dataclass
class _Contexts:
    """Every token's context in one graph: its nodes (sorted, the token last) and, per layer, the
    graph's edges among them, for a fresh forward pass per token."""

    layers: list[tuple[Tensor, Tensor, Tensor | None]]  # (src, dst, head) per layer, sorted by target
    ptr: list[Tensor]  # [T + 1] per layer: the edges into token t are ptr[t] .. ptr[t + 1]
    nodes: list[Tensor]  # per token t: its context, [k_t], ending in t
    shared: bool  # one graph serves every layer

    def step(self, first: int, stop: int) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor | None]]]:
        """The contexts of tokens ``first .. stop - 1`` as one batch of disjoint sequences: their
        nodes ``[N]`` (token ids of the stream), positions ``[N]`` (index in the context) and, per
        layer, the edges among each context's nodes (``[2, E]`` in the batch's numbering, with the
        head of each edge on a per-head graph)."""
        contexts = self.nodes[first:stop]
        sizes = torch.tensor([c.numel() for c in contexts])  # [Q]
        nodes = torch.cat(contexts)  # [N]
        seq = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)  # [N] the context of each node
        starts = sizes.cumsum(0) - sizes  # [Q] the first node of each context
        pos = torch.arange(nodes.numel()) - starts[seq]  # [N]
        length = self.ptr[0].numel() - 1
        keys = seq * length + nodes  # [N] ascending: contexts in order, their nodes sorted
        out = []
        for (src, _, head), ptr in zip(self.layers, self.ptr):
            begin, counts = ptr[nodes], ptr[nodes + 1] - ptr[nodes]  # [N] the edges into each node
            target = torch.repeat_interleave(torch.arange(nodes.numel()), counts)  # [E] target node
            index = begin[target] + torch.arange(target.numel()) - (counts.cumsum(0) - counts)[target]  # [E]
            wanted = seq[target] * length + src[index]  # [E] the source, in the target's context
            source = torch.searchsorted(keys, wanted).clamp(max=nodes.numel() - 1)  # [E]
            keep = keys[source] == wanted  # the source is in the context
            edge_index = torch.stack([source[keep], target[keep]])  # [2, E'] sorted by target
            out.append((edge_index, None if head is None else head[index[keep]]))
        return nodes, pos, out


def _contexts(graph: Any, length: int) -> _Contexts:
    """The contexts of the ``length`` tokens of ``graph`` (an ``edge_index``, a per-head pair or
    one graph per layer), refusing an edge from a later token to an earlier one."""
    graphs, shared = layer_graphs(graph, length)
    layers, ptrs, keys = [], [], [torch.arange(length) * (length + 1)]  # every token is in its context
    for index, (edge_index, head) in enumerate(graphs):
        src, dst = edge_index.cpu()
        check_stream_edges(index, src, dst, length)
        order = torch.argsort(dst * length + src)
        src, dst = src[order], dst[order]
        layers.append((src, dst, None if head is None else head.long().cpu()[order]))
        ptrs.append(torch.searchsorted(dst, torch.arange(length + 1)))
        keys.append(dst * length + src)
    pairs = torch.unique(torch.cat(keys))  # sorted by (token, context node), one entry per pair
    counts = torch.bincount(pairs // length, minlength=length)
    return _Contexts(layers, ptrs, list((pairs % length).split(counts.tolist())), shared)


def _check_sizes(chunk: object, bucket_size: object) -> None:
    for name, value in (("chunk", chunk), ("bucket_size", bucket_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected '{name}' to be an int >= 1 (got {value!r})")


def _buckets(nll: Tensor, bucket_size: int) -> list[dict]:
    """Perplexity per ``bucket_size`` predicted tokens (``nll[p]`` is that of token ``p + 1``), by the
    position of the predicted token."""
    out = []
    for lo in range(0, nll.numel(), bucket_size):  # predicted positions lo + 1 .. hi
        part = nll[lo : lo + bucket_size]
        out.append(
            {
                "start": lo + 1,
                "stop": lo + part.numel(),
                "tokens": part.numel(),
                "nll": float(part.mean()),
                "perplexity": math.exp(float(part.mean())),
            }
        )
    return out


def context_perplexity(
    model, ids: Tensor, graph: Any, *, chunk: int = 256, bucket_size: int = 256, progress: bool = False
) -> PerplexityResult:
    """Perplexity of a causal LM (``forward_graph``) on ``ids`` ``[T]`` under ``graph`` with
    ``positions="context"`` (see the module docstring): token ``t + 1`` is predicted from a forward
    pass over ``t``'s context (the tokens ``t`` reads in ``graph``, any layer or head, and ``t``) at
    positions ``0 .. k - 1``, along the edges of ``graph`` among them. Contexts are batched as
    disjoint sequences of up to ``chunk`` nodes per pass (a longer context runs alone);
    ``peak_cache`` is the largest context.

    Args:
        graph: a causal graph on the ``T`` tokens: an ``edge_index``, a per-head pair
            ``(edge_index, edge_head)`` or a list of one graph per layer.
    """
    ids = check_stream_ids(ids, "ids")
    if ids.numel() < 2:
        raise ValueError(f"Expected 'ids' to hold at least 2 tokens for a perplexity (got {ids.numel()})")
    _check_sizes(chunk, bucket_size)
    return _context_perplexity(model, ids, _contexts(graph, ids.numel()), chunk, bucket_size, progress)


@torch.no_grad()
def _context_perplexity(
    model, ids: Tensor, contexts: _Contexts, chunk: int, bucket_size: int, progress: bool
) -> PerplexityResult:
    from tqdm.auto import tqdm

    num_tokens = ids.numel()
    device = next(iter(model.parameters())).device
    nll = torch.empty(num_tokens - 1, dtype=torch.float64)
    with tqdm(total=num_tokens - 1, unit="tok", disable=not progress, leave=False) as bar:
        first = 0
        while first < num_tokens - 1:  # a step: the contexts of tokens first .. stop - 1, up to `chunk` nodes
            stop, nodes = first + 1, contexts.nodes[first].numel()
            while stop < num_tokens - 1 and nodes + contexts.nodes[stop].numel() <= chunk:
                nodes += contexts.nodes[stop].numel()
                stop += 1
            tokens, pos, layers = contexts.step(first, stop)
            graphs = [
                edge_index.to(device) if head is None else (edge_index.to(device), head.to(device))
                for edge_index, head in layers
            ]
            logits = call_with_graph(
                model.forward_graph,
                ids[tokens].to(device),
                graphs[0] if contexts.shared else graphs,
                pos=pos.to(device),
            )  # [N, V]
            last = torch.tensor([c.numel() for c in contexts.nodes[first:stop]]).cumsum(0) - 1  # [Q]
            logp = torch.log_softmax(logits[last.to(device)].double(), dim=-1)  # [Q, V]
            targets = ids[first + 1 : stop + 1].to(device)  # [Q]
            nll[first:stop] = -logp.gather(1, targets.view(-1, 1)).squeeze(1).cpu()
            bar.update(stop - first)
            first = stop
    peak = max(n.numel() for n in contexts.nodes[: num_tokens - 1])
    return PerplexityResult(nll=nll, bucket_size=bucket_size, peak_cache=peak, buckets=_buckets(nll, bucket_size))


def run_perplexity(
    model,
    ids: Tensor,
    specs: Sequence[str],
    *,
    num_layers: int,
    chunk: int = 256,
    bucket_size: int = 256,
    positions: str = "absolute",
    max_positions: int | None = None,
    native: Callable[[int], Any] | None = None,
    progress: bool = False,
    on_row: Callable[[PerplexityRow], None] | None = None,
) -> list[PerplexityRow]:
    """Perplexity of ``model`` on ``ids`` ``[T]`` under each spec, with ``positions`` ``"absolute"``
    (streamed) or ``"context"`` (recomputed per token; see the module docstring). Every graph is
    built and checked first (causal, and within ``max_positions``, the model's table of learned
    positions), so a bad spec fails before any run."""
    if not specs:
        raise ValueError("Expected at least one topology spec (got none)")
    if positions not in POSITIONS:
        raise ValueError(f"Expected 'positions' to be one of {POSITIONS} (got {positions!r})")
    _check_sizes(chunk, bucket_size)
    length = ids.numel()
    if positions == "absolute" and max_positions is not None and length > max_positions:
        raise ValueError(
            f"Expected 'positions' to be 'context' for a stream longer than the model's table of "
            f"{max_positions} learned positions (got positions='absolute' and a stream of {length} "
            f"tokens; or cut the stream to {max_positions} tokens)"
        )
    from ..attention import GraphMultiheadAttention

    num_heads = max((m.num_heads for m in model.modules() if isinstance(m, GraphMultiheadAttention)), default=1)
    graphs = []
    for spec in specs:
        graph = build_graph(spec, length, num_layers, native)
        contexts = None
        if positions == "context":
            contexts = _contexts(graph, length)
            widest = max(contexts.nodes[: length - 1], key=lambda n: n.numel())
            if max_positions is not None and widest.numel() > max_positions:
                raise ValueError(
                    f"Expected topologies whose tokens read at most {max_positions} tokens with "
                    f"positions='context' (the model's table of {max_positions} learned positions) "
                    f"(got {spec!r}, whose token {int(widest[-1])} reads {widest.numel()})"
                )
        graphs.append((spec, graph, contexts))
    rows = []
    for spec, graph, contexts in graphs:
        start = time.perf_counter()
        if contexts is None:
            result = perplexity(model, ids, graph, chunk=chunk, bucket_size=bucket_size, progress=progress)
        else:
            result = _context_perplexity(model, ids, contexts, chunk, bucket_size, progress)
        edges, per_head = _edges(graph, num_heads)
        row = PerplexityRow(
            topology=spec if spec == NATIVE else label(spec),
            tokens=length,
            perplexity=result.perplexity,
            nll=result.mean_nll,
            edges=edges,
            density=per_head / (length * (length + 1) / 2),
            peak_cache=result.peak_cache,
            seconds=time.perf_counter() - start,
            positions=positions,
            buckets=result.buckets,
        )
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
        writer.writerow(
            [
                "topology",
                "bucket_start",
                "bucket_stop",
                "tokens",
                "nll",
                "perplexity",
                "stream_perplexity",
                "edges",
                "peak_cache",
            ]
        )
        for r in rows:
            for b in r.buckets:
                writer.writerow(
                    [
                        r.topology,
                        b["start"],
                        b["stop"],
                        b["tokens"],
                        f"{b['nll']:.6f}",
                        f"{b['perplexity']:.6f}",
                        f"{r.perplexity:.6f}",
                        r.edges,
                        r.peak_cache,
                    ]
                )
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        middle = [(b["start"] + b["stop"]) / 2 for b in r.buckets]
        ax.plot(
            middle,
            [b["perplexity"] for b in r.buckets],
            marker="o",
            markersize=3,
            label=f"{r.topology} ({r.perplexity:.2f})",
        )
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


def stream_ids(sequences: Sequence[Sequence[int]], max_tokens: int | None, start: int = 0) -> Tensor:
    """One stream of token ids from the input's sequences (in order), from token ``start`` on, cut to
    ``max_tokens``."""
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"Expected 'start' to be an int >= 0 (got {start!r})")
    ids = [int(t) for s in sequences for t in s][start:]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"Expected at least 2 tokens in the input for a perplexity (got {len(ids)})")
    return torch.tensor(ids, dtype=torch.long)


__all__ = [
    "NATIVE",
    "POSITIONS",
    "PerplexityRow",
    "build_graph",
    "context_perplexity",
    "run_perplexity",
    "save_perplexity",
    "stream_ids",
]
