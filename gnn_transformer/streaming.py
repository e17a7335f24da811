r"""Language models on long token streams with a bounded key/value cache.

A causal graph says which earlier tokens each token reads; once no later token reads a node, its
keys and values can leave the cache. :func:`stream_logits` feeds one sequence through a model in
chunks with an :class:`EvictingKVCache` that drops every node whose last reader has been computed,
so memory follows the graph: ``O(num_sinks + window)`` nodes for StreamingLLM's sinks-plus-window
graph (:func:`gnn_transformer.topology.streaming`), ``O(window)`` for a causal sliding window, all
of them for the causal graph. The logits equal one forward pass over the whole graph
(``tests/test_streaming.py``): eviction only removes what the graph never reads again.

:func:`perplexity` evaluates a causal LM on a stream under a graph, StreamingLLM's protocol (tokens
fed in order, every next token predicted), with perplexity per position bucket.
:func:`streaming_generate` generates thousands of tokens under the sinks-plus-window graph with a
cache of at most ``num_sinks + window + 1`` nodes. With ``positions="cache"`` the positions are the
ones StreamingLLM assigns inside its cache: a node's position is its index in the cache, so a query
sees the sinks just before its window (for rotary positions, whose cached keys are rotated to their
new index; a model that adds its positions to the embeddings is refused); with
``positions="absolute"`` (default) they are the tokens' places in the stream.
:func:`h2o_generate` lets the attention choose the cache graph (H2O's heavy hitters): every layer
keeps the most recent tokens and those that received the most attention so far, so each layer, and
with ``per_head`` each key/value head, reads and stores its own data-dependent set of nodes.

The models are those of :mod:`gnn_transformer.decoding`: anything with
``forward_graph(ids [Q], edge_index, *, pos [Q], cache)`` -> ``logits [Q, V]``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias, TypeGuard

import torch
from torch import Tensor

from .attention import check_bool
from .decoding import KV, KVCache, _position_table, _sample, check_cache_selectors, check_sampling, position_embedding
from .kernels.primitives import plain_tensor
from .position import LENGTH_DEPENDENT
from .topology import streaming as streaming_graph

Graph: TypeAlias = Tensor | tuple[Tensor, Tensor]  # edge_index, or (edge_index, edge_head) of a per-head graph
Graphs: TypeAlias = Graph | Sequence[Graph]  # one graph for every layer, or one per layer


class EvictingKVCache(KVCache):
    """A :class:`~gnn_transformer.decoding.KVCache` that can drop nodes: :meth:`keep` removes the
    others from every layer and from ``seq`` / ``pos``. ``peak`` is the most nodes it ever held."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def add_nodes(self, seq: Tensor, pos: Tensor) -> None:
        super().add_nodes(seq, pos)
        self.peak = max(self.peak, len(self))

    def keep(self, mask: Tensor) -> None:
        """Keep the cached nodes where ``mask`` ``[M]`` is true (call between steps)."""
        if self.pos is None or self.seq is None:
            return
        if mask.shape != self.pos.shape:
            raise ValueError(f"Expected 'mask' of shape {list(self.pos.shape)} (got {list(mask.shape)})")
        index = mask.nonzero(as_tuple=True)[0]
        self.seq, self.pos = self.seq[index], self.pos[index]
        self.layers = {i: (k[index], v[index]) for i, (k, v) in self.layers.items()}


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"Expected '{name}' to be an int >= {low} (got {value!r})")
    return int(value)


def _check_model(model) -> None:
    if not hasattr(model, "forward_graph"):
        raise ValueError(f"Expected 'model' with a forward_graph method (got {type(model).__name__})")


def check_stream_ids(ids: object, name: str) -> Tensor:
    if (
        not isinstance(ids, Tensor)
        or ids.dim() != 1
        or ids.is_floating_point()
        or ids.dtype == torch.bool
        or ids.is_complex()
    ):
        got = f"{ids.dtype} of shape {list(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"Expected '{name}' to be an integer tensor [T] (got {got})")
    return ids


def _is_graph(graph: object) -> TypeGuard[Graph]:
    """Whether ``graph`` is one graph (an ``edge_index``, or a pair of tensors with ``edge_head`` ``[E]``)
    rather than a sequence of them."""
    return isinstance(graph, Tensor) or (
        isinstance(graph, tuple)
        and len(graph) == 2
        and all(isinstance(g, Tensor) for g in graph)
        and graph[1].dim() == 1
    )


def _check_prompts(input_ids: object) -> None:
    """Prompts of generation: a non-empty integer tensor ``[B, T]``."""
    if (
        not isinstance(input_ids, Tensor)
        or input_ids.dim() != 2
        or input_ids.is_floating_point()
        or input_ids.dtype == torch.bool
        or input_ids.is_complex()
        or input_ids.numel() == 0
    ):
        got = (
            f"{input_ids.dtype} of shape {list(input_ids.shape)}"
            if isinstance(input_ids, Tensor)
            else type(input_ids).__name__
        )
        raise ValueError(f"Expected 'input_ids' to be a non-empty integer tensor [B, T] (got {got})")


def layer_graphs(graph: Graphs, num_tokens: int | None = None) -> tuple[list[tuple[Tensor, Tensor | None]], bool]:
    """``(edge_index, edge_head)`` per given graph, and whether one graph serves every layer. With
    ``num_tokens``, an ``EdgeIndex`` that knows its size must be a graph on that many tokens (one
    built for fewer would leave the last tokens without keys)."""
    graphs: list[Graph]
    if _is_graph(graph):
        graphs, shared = [graph], True
    elif isinstance(graph, Sequence) and not isinstance(graph, (str, bytes)) and len(graph) > 0:
        graphs, shared = list(graph), False
    else:
        raise ValueError(
            "Expected 'graph' to be an edge_index [2, E], an (edge_index, edge_head) pair, or a "
            f"non-empty sequence of them, one per layer (got {type(graph).__name__})"
        )
    out: list[tuple[Tensor, Tensor | None]] = []
    for g in graphs:
        edge_index, edge_head = g if isinstance(g, tuple) else (g, None)
        if not isinstance(edge_index, Tensor) or edge_index.dim() != 2 or edge_index.size(0) != 2:
            got = list(edge_index.shape) if isinstance(edge_index, Tensor) else type(edge_index).__name__
            raise ValueError(f"Expected each graph's edge_index of shape [2, E] (got {got})")
        sparse_size = getattr(edge_index, "sparse_size", None)
        sizes = sparse_size() if callable(sparse_size) else None
        if num_tokens is not None and sizes is not None and any(n is not None and n != num_tokens for n in sizes):
            raise ValueError(
                f"Expected graph {len(out)} on the {num_tokens} tokens of 'ids' (got an EdgeIndex of sparse "
                f"size {tuple(sizes)})"
            )
        out.append((plain_tensor(edge_index).long(), edge_head))
    return out, shared


@dataclass
class _Sorted:
    """One layer's graph sorted by target, with the targets' boundaries for slicing chunks."""

    src: Tensor
    dst: Tensor
    head: Tensor | None

    def chunk(self, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor | None]:
        lo, hi = torch.searchsorted(self.dst, torch.tensor([start, stop], device=self.dst.device)).tolist()
        return self.src[lo:hi], self.dst[lo:hi], None if self.head is None else self.head[lo:hi]


def check_stream_edges(index: int, src: Tensor, dst: Tensor, num_tokens: int) -> None:
    """``ValueError`` unless the edges ``src[e] -> dst[e]`` of graph ``index`` join tokens in
    ``[0, num_tokens)`` and point forward (``j <= i``), as a stream's graph must."""
    if src.numel() and (int(min(src.min(), dst.min())) < 0 or int(max(src.max(), dst.max())) >= num_tokens):
        raise ValueError(
            f"Expected graph {index}'s nodes in [0, {num_tokens}) for {num_tokens} tokens "
            f"(got nodes {int(min(src.min(), dst.min()))}..{int(max(src.max(), dst.max()))})"
        )
    ahead = src > dst
    if bool(ahead.any()):
        e = int(ahead.nonzero()[0])
        raise ValueError(
            f"Expected a causal graph (edges j -> i with j <= i) for a stream; graph {index} "
            f"has the edge {int(src[e])} -> {int(dst[e])}"
        )


def _prepare(graphs: list[tuple[Tensor, Tensor | None]], num_tokens: int) -> tuple[list[_Sorted], Tensor]:
    """Sorted graphs and each node's last reader ``[T]`` (``-1``: none); refuses non-causal edges."""
    last_use = torch.full((num_tokens,), -1, dtype=torch.long)
    out = []
    for index, (edge_index, edge_head) in enumerate(graphs):
        src, dst = edge_index.cpu()
        check_stream_edges(index, src, dst, num_tokens)
        if edge_head is not None and (not isinstance(edge_head, Tensor) or edge_head.shape != src.shape):
            raise ValueError(f"Expected graph {index}'s edge_head of shape {list(src.shape)}")
        order = torch.argsort(dst, stable=True)
        head = None if edge_head is None else edge_head.cpu()[order]
        out.append(_Sorted(src[order], dst[order], head))
        last_use.scatter_reduce_(0, src, dst, reduce="amax")
    return out, last_use


def _device(model) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def stream_logits(model, ids: Tensor, graph: Graphs, *, chunk: int = 256) -> Iterator[tuple[int, Tensor]]:
    """Feed one sequence ``ids`` ``[T]`` through ``model`` in chunks of ``chunk`` tokens with an
    :class:`EvictingKVCache`; yield ``(start, logits [C, V])`` per chunk.

    Args:
        model: a causal graph LM (``forward_graph``), in eval mode.
        ids: the token ids of the stream ``[T]``.
        graph: a causal graph on the ``T`` tokens (``edge_index``, ``(edge_index, edge_head)``, or one
            per layer); node ``t`` is token ``t``.
        chunk: tokens computed per step.

    After each chunk the cache holds exactly the nodes that later tokens read (:func:`perplexity`
    reports the most it held). Positions are the tokens' places in the stream.
    """
    for _, out in _stream(model, ids, graph, chunk):
        yield out


@torch.no_grad()
def _stream(model, ids: Tensor, graph: Graphs, chunk: int) -> Iterator[tuple[EvictingKVCache, tuple[int, Tensor]]]:
    _check_model(model)
    check_cache_selectors(model, "run it on the whole graph (model.forward_graph) instead of streaming")
    ids = check_stream_ids(ids, "ids")
    chunk = _check_int("chunk", chunk, 1)
    num_tokens = ids.numel()
    graphs, shared = layer_graphs(graph, num_tokens)
    table = _position_table(model)
    if table is not None and num_tokens > table:
        raise ValueError(
            f"Expected 'ids' of at most {table} tokens for the model's {table} learned positions (got "
            f"{num_tokens}): a stream reads its tokens at their places 0 .. T - 1"
        )
    sorted_graphs, last_use = _prepare(graphs, num_tokens)
    device = ids.device
    cache = EvictingKVCache()
    index_of = torch.full((num_tokens,), -1, dtype=torch.long)  # cache slot of each token
    for start in range(0, num_tokens, chunk):
        stop = min(start + chunk, num_tokens)
        pos = torch.arange(start, stop, device=device)
        cache.add_nodes(torch.zeros_like(pos), pos)
        assert cache.pos is not None  # set by add_nodes
        cached_pos = cache.pos.cpu()
        index_of[cached_pos] = torch.arange(cached_pos.numel())
        step = []
        for g in sorted_graphs:
            src, dst, head = g.chunk(start, stop)
            edge_index = torch.stack([index_of[src], dst - start]).to(device)
            step.append(edge_index if head is None else (edge_index, head.to(device)))
        if shared and isinstance(step[0], tuple):  # one per-head graph for every layer
            logits = model.forward_graph(ids[start:stop], step[0][0], pos=pos, cache=cache, edge_head=step[0][1])
        else:
            logits = model.forward_graph(ids[start:stop], step[0] if shared else step, pos=pos, cache=cache)  # [C, V]
        yield cache, (start, logits)
        index_of[cached_pos] = -1
        cache.keep((last_use[cached_pos] >= stop).to(device))


@dataclass
class PerplexityResult:
    """Negative log-likelihoods of a stream's next tokens under one graph."""

    nll: Tensor  # [T - 1] nats, for predicting token t + 1 from tokens <= t
    bucket_size: int
    peak_cache: int  # the most nodes the cache held
    buckets: list[dict] = field(default_factory=list)  # start, stop, tokens, nll, perplexity per bucket

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean()) if self.nll.numel() else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.nll.numel() else math.nan


def perplexity(
    model, ids: Tensor, graph: Graphs, *, chunk: int = 256, bucket_size: int = 256, progress: bool = False
) -> PerplexityResult:
    """Perplexity of a causal LM on the stream ``ids`` ``[T]`` under ``graph`` (see
    :func:`stream_logits`): every token from the second is predicted from the ones before it that the
    graph lets it read; ``buckets`` hold the perplexity per ``bucket_size`` positions (by the position
    of the predicted token)."""
    ids = check_stream_ids(ids, "ids")
    if ids.numel() < 2:
        raise ValueError(f"Expected 'ids' to hold at least 2 tokens for a perplexity (got {ids.numel()})")
    bucket_size = _check_int("bucket_size", bucket_size, 1)
    from tqdm.auto import tqdm

    nll = torch.empty(ids.numel() - 1, dtype=torch.float64)
    cache = None
    with tqdm(total=ids.numel(), unit="tok", disable=not progress, leave=False) as bar:
        for cache, (start, logits) in _stream(model, ids, graph, chunk):
            stop = start + logits.size(0)
            targets = ids[start + 1 : stop + 1]  # the last chunk predicts one token fewer
            logp = torch.log_softmax(logits[: targets.numel()].double(), dim=-1)
            nll[start : start + targets.numel()] = -logp.gather(1, targets.view(-1, 1)).squeeze(1).cpu()
            bar.update(logits.size(0))
    result = PerplexityResult(nll=nll, bucket_size=bucket_size, peak_cache=0 if cache is None else cache.peak)
    for lo in range(0, nll.numel(), bucket_size):  # predicted positions lo + 1 .. hi
        part = nll[lo : lo + bucket_size]
        result.buckets.append(
            {
                "start": lo + 1,
                "stop": lo + part.numel(),
                "tokens": part.numel(),
                "nll": float(part.mean()),
                "perplexity": math.exp(float(part.mean())),
            }
        )
    return result


class _StreamCache(EvictingKVCache):
    """An :class:`EvictingKVCache` that also keeps each node's place in the stream, which decides the
    sinks-plus-window graph whatever positions the model is given."""

    def __init__(self) -> None:
        super().__init__()
        self.stream_pos: Tensor | None = None

    def add_stream_nodes(self, seq: Tensor, pos: Tensor, stream_pos: Tensor) -> None:
        self.add_nodes(seq, pos)
        self.stream_pos = stream_pos if self.stream_pos is None else torch.cat([self.stream_pos, stream_pos])

    def keep(self, mask: Tensor) -> None:
        super().keep(mask)
        if self.stream_pos is not None:
            self.stream_pos = self.stream_pos[mask.nonzero(as_tuple=True)[0]]


def _streaming_edges(cache: _StreamCache, num_new: int, num_sinks: int, window: int) -> Tensor:
    """Edges from the cached nodes (the new ones last) to the ``num_new`` new nodes: within each
    sequence, the sinks and the causal window of radius ``window``, by place in the stream."""
    seq, pos = cache.seq, cache.stream_pos  # [M] including the new nodes
    assert seq is not None and pos is not None
    q_seq, q_pos = seq[-num_new:].unsqueeze(1), pos[-num_new:].unsqueeze(1)  # [Q, 1]
    allowed = (seq.unsqueeze(0) == q_seq) & (pos.unsqueeze(0) <= q_pos)
    allowed &= (pos.unsqueeze(0) < num_sinks) | (pos.unsqueeze(0) >= q_pos - window)  # [Q, M]
    dst, src = allowed.nonzero(as_tuple=True)  # row-major: sorted by target
    return torch.stack([src, dst])


def _rotaries(model) -> list:
    """The rotary embedding (or ``None``) of the self-attention of each layer of ``model``'s stack,
    in order: the attention modules of a decoder-only model, one per layer; refuses rotations that
    cannot be moved to another position (length-dependent scalings)."""
    from .attention import GraphMultiheadAttention

    rotaries = [m.rotary for m in model.modules() if isinstance(m, GraphMultiheadAttention)]
    for rotary in rotaries:
        if rotary is not None and rotary.scaling is not None and rotary.scaling.rope_type in LENGTH_DEPENDENT:
            raise ValueError(
                f"positions='cache' re-rotates cached keys; {rotary.scaling.rope_type!r} RoPE scaling "
                "changes the frequencies with the length, so its keys cannot be moved (use "
                "positions='absolute')"
            )
    return rotaries


def _move_keys(key: Tensor, rotary, old: Tensor, new: Tensor) -> Tensor:
    """Keys ``[M, H, D]`` rotated at positions ``old`` re-rotated to ``new``: undo the rotation
    (``x = (y cos - rot(y) sin) / (cos^2 + sin^2)``, exact for YaRN's scaled cos and sin too), then
    rotate again."""
    from .position import rotate_half

    r = rotary.rotary_dim
    part = key[..., :r].double()
    cos, sin = rotary.cos_sin(old, torch.float64)
    plain = (part * cos - rotate_half(part) * sin) / (cos * cos + sin * sin)
    cos, sin = rotary.cos_sin(new, torch.float64)
    moved = (plain * cos + rotate_half(plain) * sin).to(key.dtype)
    return torch.cat([moved, key[..., r:]], dim=-1) if r < key.size(-1) else moved


@torch.no_grad()
def streaming_generate(
    model,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    num_sinks: int,
    window: int,
    positions: str = "absolute",
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
    return_stats: bool = False,
):
    """Generate ``max_new_tokens`` after each prompt of ``input_ids`` ``[B, T]`` under StreamingLLM's
    graph (the ``num_sinks`` first tokens plus a causal window of radius ``window``,
    :func:`gnn_transformer.topology.streaming`), keeping only the nodes that graph still reads: at
    most ``B * (num_sinks + window + 1)`` cached nodes however long the stream, after the prompt.

    Args:
        positions: ``"absolute"`` (default: each token at its place in the stream; the result equals
            a full forward pass over the sinks-plus-window graph of the whole sequence) or
            ``"cache"`` (StreamingLLM: each node at its index in its sequence's cache; when nodes
            leave, the ones after them move down and their rotary keys are rotated to their new
            index, so after the prompt (read at positions ``0 .. T - 1``) a query's position never
            exceeds ``num_sinks + window`` and the sinks sit just before the window). Only rotary
            keys can move: a model that adds its positions to the token embeddings (learned or
            sinusoidal, GPT-2's ``wpe``) is refused.
        greedy, temperature, top_k, generator: as in :func:`gnn_transformer.decoding.generate`.
        return_logits: also return the logits of every step, ``[max_new_tokens, B, V]``.
        return_stats: also return ``{"peak_cache": nodes}``, the most nodes the cache held.

    Returns:
        ``[B, T + max_new_tokens]`` token ids (then the logits, then the stats, when asked for).
    """
    _check_model(model)
    check_cache_selectors(model, "generate with decoding.generate(..., use_cache=False)")
    _check_prompts(input_ids)
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 0)
    num_sinks = _check_int("num_sinks", num_sinks, 0)
    window = _check_int("window", window, 0)
    if positions not in ("absolute", "cache"):
        raise ValueError(f"Expected 'positions' to be 'absolute' or 'cache' (got {positions!r})")
    check_sampling(greedy, temperature, top_k, generator)
    check_bool("return_logits", return_logits)
    check_bool("return_stats", return_stats)
    batch, length = input_ids.shape
    if positions == "cache":
        added = position_embedding(model)
        if added is not None:
            raise ValueError(
                f"positions='cache' moves each cached node to its index by rotating its rotary keys; "
                f"'model' adds its positions to the token embeddings ({added}), which stay in the cached "
                "keys and values at the index they were computed at: use positions='absolute'"
            )
    rotaries = _rotaries(model) if positions == "cache" else []  # checked before the prompt runs
    last_read = length + max_new_tokens - 2  # the position the last step reads
    if positions == "cache":
        last_read = max(length - 1, min(last_read, num_sinks + window))
    _check_table(model, max_new_tokens, length, last_read)
    device = input_ids.device
    cache = _StreamCache()
    out, step_logits = [input_ids], []
    ids = input_ids.reshape(-1)  # [B * T] sequence after sequence
    seq = torch.arange(batch, device=device).repeat_interleave(length)
    stream_pos = torch.arange(length, device=device).repeat(batch)  # each token's place in the stream
    last = torch.arange(1, batch + 1, device=device) * length - 1  # [B] the last new node of each sequence
    for _ in range(max_new_tokens):
        if positions == "cache" and cache.seq is not None:  # after the sequence's cached nodes
            pos = torch.bincount(cache.seq, minlength=batch)[seq]
        else:
            pos = stream_pos
        prompt = cache.seq is None
        cache.add_stream_nodes(seq, pos, stream_pos)
        if prompt:  # the builder's graph of the B prompts, not a [BT, BT] matrix
            edge_index = plain_tensor(streaming_graph([length] * batch, num_sinks, window)).to(device)
        else:
            edge_index = _streaming_edges(cache, seq.numel(), num_sinks, window)
        logits = model.forward_graph(ids, edge_index, pos=pos, cache=cache)[last]  # [B, V]
        step_logits.append(logits)
        token = _sample(logits, greedy, temperature, top_k, generator)  # [B]
        out.append(token.view(batch, 1))
        # evict what the graph never reads again: not a sink and left of every later window
        next_pos = stream_pos[last] + 1  # [B]
        assert cache.seq is not None and cache.stream_pos is not None and cache.pos is not None
        keep = (cache.stream_pos < num_sinks) | (cache.stream_pos >= next_pos[cache.seq] - window)
        cache.keep(keep)
        if positions == "cache":  # the nodes left move down to their new index in the cache
            old, new = cache.pos, _cache_indices(cache.seq, batch)
            if len(rotaries) <= max(cache.layers, default=-1):
                raise ValueError(
                    "Expected 'model' with one GraphMultiheadAttention per cached layer for "
                    f"positions='cache' (found {len(rotaries)} for {len(cache.layers)} layers)"
                )
            for index, (k, v) in cache.layers.items():
                if rotaries[index] is not None:
                    cache.layers[index] = (_move_keys(k, rotaries[index], old, new), v)
            cache.pos = new
        ids, seq, stream_pos = token, torch.arange(batch, device=device), next_pos
        last = torch.arange(batch, device=device)
    result: tuple = (torch.cat(out, dim=1),)
    if return_logits:
        result += (torch.stack(step_logits) if step_logits else torch.empty(0, batch, 0),)
    if return_stats:
        result += ({"peak_cache": cache.peak},)
    return result if len(result) > 1 else result[0]


def _check_table(model, max_new_tokens: int, length: int, last_read: int) -> None:
    """Refuse, before the prompt runs, a generation whose positions pass ``model``'s learned
    position table (``last_read``: the largest position a step reads)."""
    table = _position_table(model)
    if table is None or max_new_tokens == 0:
        return
    if length > table:
        raise ValueError(
            f"Expected 'input_ids' of at most {table} tokens for the model's {table} learned positions "
            f"(got prompts of {length}: the prompt is read at positions 0 .. T - 1)"
        )
    if last_read >= table:
        raise ValueError(
            f"Expected 'max_new_tokens' small enough for the model's {table} learned positions (got "
            f"{max_new_tokens} after a prompt of {length} tokens: the last step reads position {last_read})"
        )


def _cache_indices(seq: Tensor, batch: int) -> Tensor:
    """Index of each cached node within its sequence's cache (the nodes of a sequence in order)."""
    counts = torch.bincount(seq, minlength=batch)
    starts = counts.cumsum(0) - counts
    order = torch.argsort(seq, stable=True)
    rank = torch.empty_like(seq)
    rank[order] = torch.arange(seq.numel(), device=seq.device) - starts[seq[order]]
    return rank


# ---------------------------------------------------------------- heavy hitters (H2O)
@dataclass
class _LayerNodes:
    """The cached tokens of one layer, in slots: row ``r`` of the stored keys and values ``[M, H_kv, D]``
    belongs to sequence ``seq[r]`` and holds, for key/value head ``g``, the token at ``pos[r, g]``
    (each head fills the rows of a sequence with its own tokens, in stream order; ``alive[r, g]``
    false: an empty slot, read by no edge)."""

    seq: Tensor  # [M]
    pos: Tensor  # [M, H_kv] place in the stream of the token each key/value head holds (-1: none)
    score: Tensor  # [M, H_kv] attention it received so far, summed over the head's group of query heads
    alive: Tensor  # [M, H_kv] bool: the slot holds a token


class HeavyHitterCache(KVCache):
    """A key/value cache whose layers, and each key/value head of a layer, keep their own tokens
    (:func:`h2o_generate`), with the attention they received: ``update`` appends a layer's new keys
    and values ``[Q, H_kv, D]`` (one row per new token) and returns all the stored ones, ``nodes[layer]``
    says which token each key/value head holds in each row. A head's kept tokens fill the first rows
    of their sequence, so a layer stores ``[M, H_kv, D]`` with ``M`` per sequence the most tokens one
    of its heads keeps, not the union over heads. ``num_heads`` query heads share the ``num_kv_heads``
    (default ``num_heads``) in groups of ``num_heads / num_kv_heads``, as in grouped-query attention.
    ``seq`` and ``pos`` stay ``None``: no node list is shared by the layers, so models that read the
    cache's positions (ALiBi) cannot use it."""

    def __init__(self, num_heads: int, num_kv_heads: int | None = None) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        num_heads, num_kv_heads = _check_int("num_heads", num_heads, 1), _check_int("num_kv_heads", num_kv_heads, 1)
        if num_heads % num_kv_heads:
            raise ValueError(f"Expected 'num_heads' ({num_heads}) divisible by 'num_kv_heads' ({num_kv_heads})")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.nodes: dict[int, _LayerNodes] = {}
        self._new: tuple[Tensor, Tensor] | None = None

    @property
    def group(self) -> int:
        """Query heads per key/value head: query head ``h`` reads key/value head ``h // group``."""
        return self.num_heads // self.num_kv_heads

    def __len__(self) -> int:
        """The most rows one layer stores (all sequences)."""
        return max((n.seq.numel() for n in self.nodes.values()), default=0)

    def add_nodes(self, seq: Tensor, pos: Tensor) -> None:
        """Register the next step's new nodes (sequence ids and places in the stream ``[Q]``)."""
        self._new = (seq, pos)

    def update(self, index: int, kv: KV) -> KV:
        assert self._new is not None, "add_nodes runs before the model"
        seq, pos = self._new
        key = kv[0]
        assert key.size(1) == self.num_kv_heads, "the model's key/value heads are the cache's"
        heads = self.num_kv_heads
        fresh = _LayerNodes(
            seq,
            pos.unsqueeze(1).expand(-1, heads),
            key.new_zeros(seq.numel(), heads, dtype=_score_dtype(key.dtype)),
            torch.ones(seq.numel(), heads, dtype=torch.bool, device=key.device),
        )
        if index in self.nodes:
            old_k, old_v = self.layers[index]
            kv = (torch.cat([old_k, kv[0]]), torch.cat([old_v, kv[1]]))
            old = self.nodes[index]
            fresh = _LayerNodes(
                *(
                    torch.cat([a, b])
                    for a, b in zip(
                        (old.seq, old.pos, old.score, old.alive), (fresh.seq, fresh.pos, fresh.score, fresh.alive)
                    )
                )
            )
        self.layers[index], self.nodes[index] = kv, fresh
        return kv

    def keep_rows(self, index: int, alive: Tensor) -> None:
        """Layer ``index`` keeps, per key/value head, the slots where ``alive`` ``[M, H_kv]`` is true:
        each head's kept tokens move to the first rows of their sequence (in stream order), and a
        sequence keeps as many rows as its fullest head needs."""
        nodes, (k, v) = self.nodes[index], self.layers[index]
        heads = self.num_kv_heads
        row, head = (alive & nodes.alive).nonzero(as_tuple=True)  # [K] kept slots, row-major
        group = nodes.seq[row] * heads + head  # [K] (sequence, head) of each kept slot
        num_seq = int(nodes.seq.max()) + 1 if nodes.seq.numel() else 0
        order = torch.argsort(group, stable=True)  # by (sequence, head), then row: stream order
        row, head, group = row[order], head[order], group[order]
        counts = torch.bincount(group, minlength=num_seq * heads).view(num_seq, heads)  # [B, H_kv]
        rows = counts.max(1).values  # [B] rows each sequence keeps
        first = rows.cumsum(0) - rows  # [B]
        flat = counts.view(-1)
        rank = torch.arange(group.numel(), device=group.device) - (flat.cumsum(0) - flat)[group]  # [K]
        new_row = first[group // heads] + rank  # [K]
        total = int(rows.sum())

        def moved(x: Tensor, fill) -> Tensor:
            out = x.new_full((total,) + tuple(x.shape[1:]), fill)  # [M', H_kv, ...]
            out[new_row, head] = x[row, head]
            return out

        self.layers[index] = (moved(k, 0), moved(v, 0))
        self.nodes[index] = _LayerNodes(
            torch.repeat_interleave(torch.arange(num_seq, device=rows.device), rows),
            moved(nodes.pos, -1),
            moved(nodes.score, 0),
            moved(nodes.alive, False),
        )


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _h2o_edges(nodes: _LayerNodes, num_new: int, group: int | None) -> Graph:
    """A decoding step's edges from a layer's stored rows (then the ``num_new`` new ones, one per
    sequence) to the new nodes: each new node reads the tokens its sequence keeps and itself. With
    ``group`` (per-head eviction, ``group`` query heads per key/value head), ``(edge_index, edge_head)``:
    query head ``h`` reads the slots its key/value head ``h // group`` fills; without, every head
    reads the tokens of the first key/value head (the heads keep the same ones)."""
    rows = nodes.seq.numel()
    new = torch.arange(num_new, device=nodes.seq.device)
    if group is None:
        kept = nodes.alive[:, 0].nonzero(as_tuple=True)[0]  # [K]
        src = torch.cat([kept, new + rows])
        dst = torch.cat([nodes.seq[kept], new])
        order = torch.argsort(dst, stable=True)  # by target; sources in the order of the cache
        return torch.stack([src[order], dst[order]])
    num_heads = nodes.alive.size(1) * group
    row, kv_head = nodes.alive.nonzero(as_tuple=True)  # [K] the filled slots
    row = row.repeat_interleave(group)  # [K * group]: every query head of the slot's group
    head = kv_head.repeat_interleave(group) * group + torch.arange(group, device=new.device).repeat(kv_head.numel())
    src = torch.cat([row, (new + rows).repeat_interleave(num_heads)])
    dst = torch.cat([nodes.seq[row], new.repeat_interleave(num_heads)])
    head = torch.cat([head, torch.arange(num_heads, device=new.device).repeat(num_new)])
    order = torch.argsort(dst, stable=True)
    return torch.stack([src[order], dst[order]]), head[order]


def _accumulate(nodes: _LayerNodes, graph: Graph, weights: Tensor, group: int) -> None:
    """Add one step's attention weights (``[E, H]``, or ``[E]`` on a per-head graph) to the scores
    of the slots they read, summed over each key/value head's ``group`` of query heads."""
    edge_index, edge_head = graph if isinstance(graph, tuple) else (graph, None)
    weights = weights.to(nodes.score.dtype)
    if edge_head is None:
        weights = weights.view(weights.size(0), -1, group).sum(-1)  # [E, H_kv]
        nodes.score.index_add_(0, edge_index[0], weights)  # [M, H_kv]
    else:
        nodes.score.index_put_((edge_index[0], edge_head // group), weights, accumulate=True)


def _heavy_hitters(score: Tensor, candidate: Tensor, seq: Tensor, batch: int, heavy: int) -> Tensor:
    """``[M, C]`` bool: per sequence and column, the ``heavy`` candidates of largest score (equal
    scores: the earlier row first)."""
    score = score.masked_fill(~candidate, float("-inf"))
    order = torch.sort(score, dim=0, descending=True, stable=True).indices  # [M, C] rows by score
    order = order.gather(0, torch.sort(seq[order], dim=0, stable=True).indices)  # grouped by sequence
    counts = torch.bincount(seq, minlength=batch)
    starts = counts.cumsum(0) - counts  # [B]
    rank = torch.arange(seq.numel(), device=seq.device).unsqueeze(1) - starts[seq[order]]  # [M, C]
    chosen = torch.zeros_like(candidate).scatter_(0, order, rank < heavy)
    return chosen & candidate


def _check_h2o_model(model) -> tuple[int, int, int]:
    """The query and key/value heads of ``model``'s attention and its attention layers, or a
    ``ValueError`` for a model H2O cannot run."""
    _check_model(model)
    from .attention import GraphMultiheadAttention

    attention = [m for m in model.modules() if isinstance(m, GraphMultiheadAttention)]
    if not attention:
        raise ValueError(f"Expected 'model' built on GraphMultiheadAttention (found none in {type(model).__name__})")
    config = getattr(model, "config", None)
    if getattr(config, "position", None) == "alibi":
        raise ValueError(
            "Expected a 'model' without ALiBi (position='alibi'): its biases read the positions "
            "of one node list shared by the layers, and heavy-hitter caches differ per layer"
        )
    share = getattr(getattr(model, "encoder", None), "kv_share_every", 1)
    if share != 1:
        raise ValueError(
            f"Expected a 'model' without cross-layer key/value sharing (got kv_share_every={share}): "
            "each layer keeps its own heavy hitters"
        )
    for module in attention:
        if module.select is not None:
            raise ValueError(
                f"Expected a 'model' whose attention does not select its own graph (got "
                f"select={module.select!r}): the heavy hitters decide the graph"
            )
    heads = sorted({(module.num_heads, module.num_kv_heads) for module in attention})
    if len(heads) != 1:
        raise ValueError(
            f"Expected 'model' with the same numbers of query and key/value heads in every layer (got {heads})"
        )
    return (*heads[0], len(attention))


MAX_KEPT_CELLS = 1 << 32  # the largest kept-set trace h2o_generate(return_kept=True) builds (bools)


@torch.no_grad()
def h2o_generate(
    model,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    heavy: int,
    recent: int,
    per_head: bool = False,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
    return_stats: bool = False,
    return_kept: bool = False,
):
    r"""Generate ``max_new_tokens`` after each prompt of ``input_ids`` ``[B, T]`` with heavy-hitter
    eviction (H2O, Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference
    of Large Language Models"): a data-dependent cache graph.

    Every layer keeps, per sequence, the ``recent`` most recent tokens and the ``heavy`` tokens
    with the largest attention received so far (the sum of the weights of every query that
    attended to them), and evicts the others; the new token attends to exactly the kept nodes and
    itself. The prompt is read with causal attention, and its attention decides the first kept set.
    After step ``t`` (token ``t`` computed), with ``C`` the cached nodes and ``s(j)`` the
    accumulated attention of ``j``:

    .. math::
        K = \{j \in C : j > t - \mathrm{recent}\} \cup
            \operatorname{top}_{\mathrm{heavy}} \{ s(j) : j \in C, j \le t - \mathrm{recent} \}

    (equal scores: the earlier token first). ``heavy=0`` is a causal window of radius ``recent``
    after the prompt; a ``heavy`` of at least the generated length is causal attention.

    Args:
        model: a causal graph LM (:class:`~gnn_transformer.GraphLM`,
            :class:`~gnn_transformer.hf.GraphDecoderLM`, ``GraphGPT2LMHeadModel``) in eval mode,
            without ALiBi, cross-layer key/value sharing or selecting attention.
        input_ids: prompts ``[B, T]`` of one length.
        max_new_tokens: tokens to add to each sequence.
        heavy, recent: the budget of heavy hitters and of recent tokens per sequence and layer.
        per_head: each key/value head keeps its own heavy hitters from its own scores and stores
            exactly its own kept tokens (a :class:`HeavyHitterCache` slot layout): once the prompt
            is read (``T`` rows), every layer stores at most ``H_kv * (heavy + recent + 1)`` keys
            and values per sequence, the new token included, as in the paper's per-head eviction.
            With grouped-query attention the query heads sharing a key/value head decide together,
            on their scores summed (their keys are one tensor, so they can only evict together);
            with ``H_kv == H`` each head decides alone, exactly as in the paper. Each query head
            attends along its own edges to the tokens its key/value head keeps (a per-head graph).
            ``False`` (default): one kept set per layer from the scores summed over all heads, the
            same bound.
        greedy, temperature, top_k, generator: as in :func:`gnn_transformer.decoding.generate`.
        return_logits: also return the logits of every step, ``[max_new_tokens, B, V]``.
        return_stats: also return ``{"peak_cache": rows, "peak_per_sequence": rows,
            "peak_per_head": nodes}``: the most rows ``M`` of one layer's stored keys and values
            ``[M, H_kv, D]`` (all sequences), the most rows one sequence took in one layer, and the
            most tokens one head of one sequence read in one layer (itself included), prompt included.
        return_kept: also return the kept sets after every step, ``[max_new_tokens, L, B, H, S]``
            bool over the ``S = T + max_new_tokens`` tokens, per query head (the nodes the next
            token reads, besides itself; a key/value head's group alike with ``per_head``, all heads
            alike without). Its size grows with the square of the generated length: a trace of
            more than ``MAX_KEPT_CELLS`` cells (4 GiB) is refused before the prompt runs.

    Returns:
        ``[B, T + max_new_tokens]`` token ids (then the logits, the stats and the kept sets, when
        asked for).

    Example:
        >>> from gnn_transformer import GraphLM, GraphTransformerConfig
        >>> lm = GraphLM(GraphTransformerConfig(vocab_size=10, d_model=8, nhead=2, num_layers=1,
        ...                                     position="rope", backend="pyg")).eval()
        >>> out, stats = h2o_generate(lm, torch.tensor([[1, 2, 3]]), 20, heavy=2, recent=3,
        ...                           return_stats=True)
        >>> out.shape, stats["peak_per_sequence"]
        (torch.Size([1, 23]), 6)
    """
    from .hf._common import attention_weights  # the weights of every attention call

    num_heads, num_kv_heads, layers = _check_h2o_model(model)
    _check_prompts(input_ids)
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 0)
    heavy = _check_int("heavy", heavy, 0)
    recent = _check_int("recent", recent, 0)
    for name, value in (
        ("per_head", per_head),
        ("return_logits", return_logits),
        ("return_stats", return_stats),
        ("return_kept", return_kept),
    ):
        check_bool(name, value)
    check_sampling(greedy, temperature, top_k, generator)
    batch, length = input_ids.shape
    _check_table(model, max_new_tokens, length, length + max_new_tokens - 2)
    if return_kept:
        cells = max_new_tokens * layers * batch * num_heads * (length + max_new_tokens)
        if cells > MAX_KEPT_CELLS:
            raise ValueError(
                f"Expected a kept-set trace of at most {MAX_KEPT_CELLS} cells for return_kept=True (got "
                f"{max_new_tokens} steps x {layers} layers x {batch} prompts x {num_heads} heads x "
                f"{length + max_new_tokens} tokens = {cells}): generate fewer tokens, or without return_kept"
            )
    device = input_ids.device
    total = length + max_new_tokens
    cache = HeavyHitterCache(num_heads, num_kv_heads)
    group = cache.group
    out, step_logits, kept = [input_ids], [], []
    peak = {"peak_cache": 0, "peak_per_sequence": 0, "peak_per_head": 0}
    ids = input_ids.reshape(-1)  # [B * T] sequence after sequence
    seq = torch.arange(batch, device=device).repeat_interleave(length)
    pos = torch.arange(length, device=device).repeat(batch)
    graphs: Graph | list[Graph] = _prompt_graph(batch, length, device)
    last = torch.arange(1, batch + 1, device=device) * length - 1  # [B] the last new node of each sequence
    num_layers = None
    for _ in range(max_new_tokens):
        cache.add_nodes(seq, pos)
        with attention_weights(model) as weights:
            logits = model.forward_graph(ids, graphs, pos=pos, cache=cache)[last]  # [B, V]
        if num_layers is None:
            num_layers = len(cache.layers)
            if sorted(cache.layers) != list(range(num_layers)) or len(weights) != num_layers:
                raise ValueError(
                    f"Expected 'model' to attend once per cached layer (got {len(weights)} attention "
                    f"calls for cached layers {sorted(cache.layers)})"
                )
        if any(w is None for w in weights):
            raise ValueError("Expected 'model' whose attention returns its weights (return_attention_weights)")
        step_logits.append(logits)
        token = _sample(logits, greedy, temperature, top_k, generator)  # [B]
        out.append(token.view(batch, 1))
        layer_graphs = graphs if isinstance(graphs, list) else [graphs] * num_layers
        next_pos = int(pos[-1]) + 1  # every sequence is at the same place
        for index in range(num_layers):
            nodes = cache.nodes[index]
            _accumulate(nodes, layer_graphs[index], weights[index], group)
            _track_peak(peak, nodes, batch)
            recent_slots = nodes.alive & (nodes.pos >= next_pos - recent)  # [M, H_kv] always kept
            candidate = nodes.alive & ~recent_slots  # [M, H_kv]
            score = nodes.score if per_head else nodes.score.sum(1, keepdim=True)  # [M, H_kv] or [M, 1]
            chosen = _heavy_hitters(score, candidate if per_head else candidate[:, :1], nodes.seq, batch, heavy)
            cache.keep_rows(index, recent_slots | chosen.expand_as(nodes.alive))
        if return_kept:
            kept.append(_kept_mask(cache, num_layers, batch, total))
        ids, seq, pos = token, torch.arange(batch, device=device), torch.full((batch,), next_pos, device=device)
        graphs = [_h2o_edges(cache.nodes[index], batch, group if per_head else None) for index in range(num_layers)]
        last = torch.arange(batch, device=device)
    result: tuple = (torch.cat(out, dim=1),)
    if return_logits:
        result += (torch.stack(step_logits) if step_logits else torch.empty(0, batch, 0),)
    if return_stats:
        result += (peak,)
    if return_kept:
        result += (torch.stack(kept) if kept else torch.empty(0, 0, batch, 0, total, dtype=torch.bool),)
    return result if len(result) > 1 else result[0]


def _prompt_graph(batch: int, length: int, device: torch.device) -> Tensor:
    """Causal attention within each prompt, the same for every layer and head."""
    from .topology import causal

    return plain_tensor(causal([length] * batch)).to(device)


def _track_peak(peak: dict, nodes: _LayerNodes, batch: int) -> None:
    """The largest row and token counts of one layer during a step, before eviction (see
    :func:`h2o_generate`)."""
    per_sequence = torch.bincount(nodes.seq, minlength=batch)  # [B]
    per_head = torch.zeros(batch, nodes.alive.size(1), dtype=torch.long, device=nodes.seq.device)
    per_head.index_add_(0, nodes.seq, nodes.alive.long())  # [B, H_kv]
    peak["peak_cache"] = max(peak["peak_cache"], nodes.seq.numel())
    peak["peak_per_sequence"] = max(peak["peak_per_sequence"], int(per_sequence.max()))
    peak["peak_per_head"] = max(peak["peak_per_head"], int(per_head.max()))


def _kept_mask(cache: HeavyHitterCache, num_layers: int, batch: int, total: int) -> Tensor:
    """``[L, B, H, S]``: which tokens each query head of each sequence and layer reads."""
    mask = torch.zeros(num_layers, batch, cache.num_kv_heads, total, dtype=torch.bool)
    for index in range(num_layers):
        nodes = cache.nodes[index]
        row, head = nodes.alive.nonzero(as_tuple=True)
        mask[index, nodes.seq[row].cpu(), head.cpu(), nodes.pos[row, head].cpu()] = True
    return mask.repeat_interleave(cache.group, dim=2)  # query head h reads key/value head h // group


__all__ = [
    "EvictingKVCache",
    "HeavyHitterCache",
    "PerplexityResult",
    "h2o_generate",
    "perplexity",
    "stream_logits",
    "streaming_generate",
]
