"""Selectors: a per-head graph chosen from the data, the queries and keys of one layer.

A selector turns queries ``q`` ``[N_dst, H, D]`` and keys ``k`` ``[N_src, H_kv, D]`` into a
per-head graph ``(edge_index, edge_head)``: the edge ``j -> i`` (``edge_index[:, e] == (j, i)``,
row 0 the source/key, row 1 the target/query) exists for query head ``edge_head[e]`` only. Query
head ``h`` reads key head ``h // g`` with ``g = H // H_kv`` (grouped-query attention).

Every selector returns plain ``torch.long`` tensors on ``q``'s device, sorted by (head, target,
source) without duplicated edges: the kernels relabel node ``(h, i)`` as ``h * N + i``, so the
order is target-sorted there. The selection is not differentiated (it runs under
``torch.no_grad()`` on detached inputs); scores are computed in float32 (float64 for float64
inputs); no ``[N, N]`` score tensor or mask is built.

A batch is a disjoint union of sequences, given as a PyG-style sorted ``batch`` vector or a list of
``lengths``; a query never selects a key of another sequence, and positions (``causal``, blocks,
sorted chunks) are local to each sequence. Edges are counted (exactly or as an upper bound) before
they are allocated and refused above the edge budget (:func:`gnn_transformer.topology.max_edges`).

A layer selects with an object instead (``GraphMultiheadAttention(..., select=TopK(64))``), called
as ``select(q, k, edge_index)`` with the graph the layer was given: the allowed edges. The result
is always a subset of them, per head. :class:`TopK` ranks the allowed edges themselves (any graph,
cross attention included); :class:`BlockTopK`, :class:`LSH` and :class:`Routing` select on the
sequences of the graph (:func:`sequence_lengths`: the maximal ranges of consecutive nodes no edge
crosses), then keep only the selected edges the graph holds. :func:`selector` builds them by name
(``"topk:num_keys=64"``, or a mapping from a TOML table or a model config); :data:`SELECTORS` names
them.

Words of this file:

- query chunk (``chunk`` of :func:`topk`): the queries scored at a time; a score block is
  ``[chunk, H, N_src]`` at most.
- block (:func:`block_topk`): ``block_size`` consecutive positions of one sequence, the last block
  of a sequence possibly shorter.
- bucket, sorted chunk (:func:`lsh`): an LSH hash value; ``chunk_size`` consecutive positions of
  the bucket-sorted order (Reformer's chunk).
- cluster (:func:`routing`): the tokens nearest to one centroid of one head.
- allowed graph: the edges a selection may keep (``allowed`` of :func:`topk`, the ``edge_index`` a
  selector object is called with).

Notation: ``N`` tokens, ``H`` query heads, ``H_kv`` key heads, ``g = H // H_kv``, ``D`` head dim,
``E`` edges.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric import EdgeIndex

from ._common import (INT64_MAX, Lengths, as_lengths, check_bool, check_edges, check_int, check_keys, check_seed,
                      expand_ranges, local_positions)

__all__ = ["topk", "block_topk", "lsh", "routing", "sequence_lengths", "TopK", "BlockTopK", "LSH", "Routing",
           "SELECTORS", "selector"]

EDGES_PER_QUERY = 64  # the allowed path of topk scores chunk * EDGES_PER_QUERY candidate edges at a time
BLOCK_CHUNK = 1024    # query blocks scored at a time by block_topk
ASSIGN_CHUNK = 4096   # tokens assigned to clusters at a time by routing (scores [ASSIGN_CHUNK, H, K])

Batch = Tensor | tuple[Tensor, Tensor]
BatchLengths = Lengths | tuple[Lengths, Lengths]


# ---------------------------------------------------------------- argument checks
def _show(t: Tensor) -> str:
    """A tensor's values for a message: all of them when few, else the first ones and the shape."""
    values = t.reshape(-1)[:8].tolist()
    return str(values) if t.numel() <= 8 else f"{str(values)[:-1]}, ...] (shape {tuple(t.shape)})"


def _check_qk(q: object, k: object) -> tuple[int, int]:
    """Check ``q`` ``[N_dst, H, D]`` and ``k`` ``[N_src, H_kv, D]``; return ``(H, g)``."""
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, Tensor):
            raise ValueError(f"Expected '{name}' to be a tensor (got {type(x).__name__})")
        if x.dim() != 3:
            raise ValueError(f"Expected '{name}' of shape [N, heads, head_dim] (got shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise ValueError(f"Expected '{name}' to be a floating-point tensor (got dtype {x.dtype})")
        if x.size(1) < 1 or x.size(2) < 1:
            raise ValueError(f"Expected '{name}' to have at least one head of head_dim >= 1 (got shape "
                             f"{tuple(x.shape)})")
    assert isinstance(q, Tensor) and isinstance(k, Tensor)
    if k.dtype != q.dtype:
        raise ValueError(f"Expected 'k' to have the dtype of 'q' ({q.dtype}) (got {k.dtype})")
    if k.device != q.device:
        raise ValueError(f"Expected 'k' on the device of 'q' ({q.device}) (got {k.device})")
    if k.size(2) != q.size(2):
        raise ValueError(f"Expected 'k' to have the head_dim of 'q' ({q.size(2)}) (got shape {tuple(k.shape)})")
    if q.size(1) % k.size(1):
        raise ValueError(f"Expected the heads of 'q' ({q.size(1)}) to be a multiple of the heads of 'k' (got "
                         f"shape {tuple(k.shape)}, {k.size(1)} heads)")
    return q.size(1), q.size(1) // k.size(1)


def _check_real(name: str, value: object, lo: float, hi: float, *, open_lo: bool = False) -> float:
    """Validate a finite real number in ``[lo, hi]`` (``(lo, hi]`` when ``open_lo``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > hi or value < lo or (open_lo and value == lo):
        where = f"{'(' if open_lo else '['}{lo}, {hi}]"
        raise ValueError(f"Expected '{name}' to be a real number in {where} (got {value!r})")
    return float(value)  # type: ignore[arg-type]


def _check_batch(name: str, batch: object, n: int, device: torch.device) -> Tensor:
    """Validate a PyG ``batch`` vector: 1-D integer, one entry per token, sorted, non-negative."""
    if not isinstance(batch, Tensor) or batch.dim() != 1 or batch.is_floating_point() or batch.is_complex() \
            or batch.dtype == torch.bool:
        raise ValueError(f"Expected '{name}' to be a 1-D integer tensor (got {batch!r})")
    if batch.numel() != n:
        raise ValueError(f"Expected '{name}' to have one entry per token ({n}) (got {batch.numel()} entries)")
    if batch.device != device:
        raise ValueError(f"Expected '{name}' on the device of 'q' ({device}) (got {batch.device})")
    if n and int(batch.min()) < 0:
        raise ValueError(f"Expected '{name}' >= 0 (got {_show(batch)})")
    if n > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError(f"Expected '{name}' to be sorted (got {_show(batch)})")
    return batch.long()


def _is_pair(x: object) -> bool:
    """``(lengths_q, lengths_k)`` rather than one list of lengths."""
    def many(v: object) -> bool:
        return (isinstance(v, Tensor) and v.dim() == 1) or (isinstance(v, Sequence) and not isinstance(v, str))
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(many(v) for v in x)


def _sequences(fn: str, q: Tensor, k: Tensor, batch: object, lengths: object, *,
               bipartite: bool = False) -> tuple[list[int], list[int]]:
    """Lengths of the query sequences and of the key sequences (as many of each; sequence ``b`` of
    the queries reads sequence ``b`` of the keys)."""
    n_q, n_k = q.size(0), k.size(0)
    if not bipartite and n_q != n_k:
        raise ValueError(f"{fn} is self-attention only: expected 'q' and 'k' with as many tokens (got "
                         f"q.size(0)={n_q}, k.size(0)={n_k})")
    if batch is not None and lengths is not None:
        raise ValueError(f"Expected one of 'batch' and 'lengths', not both (got lengths={lengths!r})")
    if batch is not None:
        if isinstance(batch, (tuple, list)):
            if not bipartite or len(batch) != 2:
                raise ValueError(f"Expected 'batch' to be {'a pair (batch_q, batch_k) or ' if bipartite else ''}"
                                 f"one vector (got a {type(batch).__name__} of {len(batch)})")
            bq = _check_batch("batch[0]", batch[0], n_q, q.device)
            bk = _check_batch("batch[1]", batch[1], n_k, q.device)
        else:
            bq = bk = _check_batch("batch", batch, n_q, q.device)
            if n_k != n_q:
                raise ValueError(f"Expected a pair (batch_q, batch_k) as 'batch' for 'q' and 'k' of different "
                                 f"lengths (got one vector, q.size(0)={n_q}, k.size(0)={n_k})")
        ids = torch.unique(torch.cat([bq, bk]))  # sorted sequence ids, gaps removed
        lq = torch.bincount(torch.searchsorted(ids, bq), minlength=ids.numel()).tolist()
        lk = torch.bincount(torch.searchsorted(ids, bk), minlength=ids.numel()).tolist()
        return lq, lk
    if lengths is None:
        return [n_q], [n_k]
    if _is_pair(lengths):
        if not bipartite:
            raise ValueError(f"Expected 'lengths' to be one list of lengths for {fn} (got {lengths!r})")
        lq, lk = as_lengths(lengths[0], "lengths[0]"), as_lengths(lengths[1], "lengths[1]")  # type: ignore[index]
        if len(lq) != len(lk):
            raise ValueError(f"Expected 'lengths' (lengths_q, lengths_k) with as many sequences (got {lq} and {lk})")
    else:
        lq = lk = as_lengths(lengths, "lengths")  # type: ignore[arg-type]
    if sum(lq) != n_q or sum(lk) != n_k:
        raise ValueError(f"Expected 'lengths' to sum to q.size(0)={n_q} and k.size(0)={n_k} (got {lengths!r})")
    return lq, lk


def _layout(lengths: list[int], device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For every token: (sequence id, position in its sequence, its sequence's offset, its length)."""
    pos, offset, length = local_positions(lengths)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
    return seq.to(device), pos.to(device), offset.to(device), length.to(device)


def _sizes(lq: list[int], lk: list[int]) -> dict[str, list[int]]:
    """Sizes for :func:`check_edges`' message."""
    return {"n": lq} if lq == lk else {"n_q": lq, "n_k": lk}


def _prepare(x: Tensor) -> Tensor:
    """Detached, in the dtype scores are computed in: float64 for float64, float32 otherwise."""
    return x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _empty(device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.empty(2, 0, dtype=torch.long, device=device), torch.empty(0, dtype=torch.long, device=device)


# ---------------------------------------------------------------- top-k
def _best(scores: Tensor, ok: Tensor, num: int) -> Tensor:
    """Mask of each row's ``num`` best allowed scores, ties to the lower column (exact: the
    ``num``-th best score is the threshold, ties at it taken from the left)."""
    masked = scores.masked_fill(~ok, -math.inf)
    threshold = masked.topk(num, dim=-1).values[..., -1:]  # [..., 1]
    above = ok & (masked > threshold)
    tie = ok & (masked == threshold)
    need = num - above.sum(-1, keepdim=True)
    return above | (tie & (tie.cumsum(-1) <= need))


def _dense_topk(q: Tensor, k: Tensor, num: int, lq: list[int], lk: list[int], *, causal: bool,
                exclude_self: bool, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """(head, query, key) of each query's ``num`` best keys of its sequence, sorted; scored
    ``chunk`` queries at a time against the keys of their sequences only."""
    device, (n_q, H, D), H_kv = q.device, q.shape, k.size(1)
    g = H // H_kv
    out: list[tuple[Tensor, Tensor, Tensor]] = []
    none = torch.empty(0, dtype=torch.long, device=device)
    if num < 1 or n_q == 0 or k.size(0) == 0:
        return none, none, none
    seq_cpu = torch.repeat_interleave(torch.arange(len(lq)), torch.tensor(lq, dtype=torch.long))
    seq_q, pos_q, _, _ = _layout(lq, device)
    seq_k, pos_k, _, _ = _layout(lk, device)
    ptr_k = [0]
    for L in lk:
        ptr_k.append(ptr_k[-1] + L)
    for s in range(0, n_q, chunk):
        e = min(s + chunk, n_q)
        lo, hi = ptr_k[int(seq_cpu[s])], ptr_k[int(seq_cpu[e - 1]) + 1]  # keys of the chunk's sequences
        if hi == lo:
            continue
        # -- compute qk --
        scores = torch.einsum("cxgd,jxd->cxgj", q[s:e].reshape(e - s, H_kv, g, D), k[lo:hi])
        scores = scores.reshape(e - s, H, hi - lo)  # [c, H, span]
        ok = seq_k[None, lo:hi] == seq_q[s:e, None]  # [c, span]
        if causal:
            ok &= pos_k[None, lo:hi] <= pos_q[s:e, None]
        if exclude_self:
            ok &= pos_k[None, lo:hi] != pos_q[s:e, None]
        keep = _best(scores, ok[:, None, :], min(num, hi - lo))  # [c, H, span]
        h, i, j = keep.transpose(0, 1).nonzero(as_tuple=True)  # sorted by (head, query, key) in the chunk
        out.append((h, i + s, j + lo))
    if not out:
        return none, none, none
    h, i, j = (torch.cat(t) for t in zip(*out))
    perm = torch.argsort(h, stable=True)  # chunks are in query order: (head, query, key)
    return h[perm], i[perm], j[perm]


def _edge_list(name: str, edge_index: object, n_src: int, n_dst: int, device: torch.device,
               sizes: tuple[str, str] = ("k.size(0)", "q.size(0)")) -> tuple[Tensor, Tensor]:
    """Validate an ``edge_index`` ``[2, E]`` (plain or ``EdgeIndex``) of sources in ``[0, n_src)``
    and targets in ``[0, n_dst)`` (named ``sizes`` in messages); return ``(src, dst)``, long."""
    if isinstance(edge_index, EdgeIndex):
        size = edge_index.sparse_size()
        if (size[0] is not None and size[0] != n_src) or (size[1] is not None and size[1] != n_dst):
            raise ValueError(f"Expected '{name}' of sparse_size ({n_src}, {n_dst}) ({sizes[0]}, {sizes[1]}) "
                             f"(got {size})")
        edge_index = edge_index.as_tensor()
    if not isinstance(edge_index, Tensor) or edge_index.dim() != 2 or edge_index.size(0) != 2:
        shape = tuple(edge_index.shape) if isinstance(edge_index, Tensor) else type(edge_index).__name__
        raise ValueError(f"Expected '{name}' to be an edge_index of shape [2, E] (got {shape})")
    if edge_index.is_floating_point() or edge_index.is_complex() or edge_index.dtype == torch.bool:
        raise ValueError(f"Expected '{name}' to be an integer tensor (got dtype {edge_index.dtype})")
    if edge_index.device != device:
        raise ValueError(f"Expected '{name}' on the device of 'q' ({device}) (got {edge_index.device})")
    src, dst = edge_index[0].long(), edge_index[1].long()
    for what, v, n, size_name in (("sources", src, n_src, sizes[0]), ("targets", dst, n_dst, sizes[1])):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= n):
            raise ValueError(f"Expected the {what} of '{name}' in [0, {size_name}={n}) (got values in "
                             f"[{int(v.min())}, {int(v.max())}])")
    return src, dst


def _check_allowed(allowed: object, allowed_head: object, H: int, n_src: int, n_dst: int,
                   device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validate ``allowed`` (and ``allowed_head``); return ``(src, dst, head)``."""
    src, dst = _edge_list("allowed", allowed, n_src, n_dst, device)
    if allowed_head is None:
        return src, dst, None
    if not isinstance(allowed_head, Tensor) or allowed_head.dim() != 1 or allowed_head.is_floating_point() \
            or allowed_head.is_complex() or allowed_head.dtype == torch.bool:
        raise ValueError(f"Expected 'allowed_head' to be a 1-D integer tensor (got {allowed_head!r})")
    if allowed_head.numel() != src.numel():
        raise ValueError(f"Expected 'allowed_head' to have one entry per edge of 'allowed' ({src.numel()}) "
                         f"(got {allowed_head.numel()})")
    if allowed_head.device != device:
        raise ValueError(f"Expected 'allowed_head' on the device of 'q' ({device}) (got {allowed_head.device})")
    head = allowed_head.long()
    if head.numel() and (int(head.min()) < 0 or int(head.max()) >= H):
        raise ValueError(f"Expected 'allowed_head' in [0, {H}) (the heads of 'q') (got values in "
                         f"[{int(head.min())}, {int(head.max())}])")
    return src, dst, head


def _allowed_topk(q: Tensor, k: Tensor, num: int, src: Tensor, dst: Tensor, head: Tensor | None,
                  lq: list[int], lk: list[int], *, causal: bool, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """(head, query, key) of each query's ``num`` best keys among its allowed edges, sorted."""
    device, (n_q, H, D), (n_k, H_kv, _) = q.device, q.shape, k.shape
    g = H // H_kv
    if H * max(n_q, 1) * max(n_k, 1) > INT64_MAX:
        raise ValueError(f"Expected at most 2**63 - 1 (head, query, key) triples (got {H} heads, "
                         f"q.size(0)={n_q}, k.size(0)={n_k})")
    if len(lq) > 1 or causal:  # keep the edges inside a sequence (and looking back)
        seq_q, pos_q, _, _ = _layout(lq, device)
        seq_k, pos_k, _, _ = _layout(lk, device)
        keep = seq_k[src] == seq_q[dst]
        if causal:
            keep &= pos_k[src] <= pos_q[dst]
        src, dst, head = src[keep], dst[keep], (None if head is None else head[keep])
    pairs = n_q * n_k
    if head is None:  # one allowed graph for every head
        key = torch.unique(dst * n_k + src)  # [E] sorted by (target, source), distinct
        check_edges("topk", H * key.numel(), **_sizes(lq, lk))
        key = (torch.arange(H, device=device)[:, None] * pairs + key[None]).reshape(-1)  # [H * E]
    else:
        check_edges("topk", src.numel(), **_sizes(lq, lk))
        key = torch.unique((head * n_q + dst) * n_k + src)  # [E] sorted by (head, target, source)
    if key.numel() == 0:
        return key, key, key
    h, i, j = key // pairs, key % pairs // n_k, key % n_k
    # -- compute qk --, EDGES_PER_QUERY * chunk edges at a time
    q_flat, k_flat = q.reshape(n_q * H, D), k.reshape(n_k * H_kv, D)
    score = torch.empty(key.numel(), dtype=q.dtype, device=device)  # [E]
    step = chunk * EDGES_PER_QUERY
    for s in range(0, key.numel(), step):
        hs = h[s:s + step]
        score[s:s + step] = (q_flat[i[s:s + step] * H + hs] * k_flat[j[s:s + step] * H_kv + hs // g]).sum(-1)
    # -- rank within each (head, query) row: by score, ties to the lower key --
    row = h * n_q + i  # [E] non-decreasing
    order = torch.sort(score, descending=True, stable=True).indices  # ties keep (head, query, key) order
    order = order[torch.argsort(row[order], stable=True)]  # by (row, -score, key)
    _, counts = torch.unique_consecutive(row, return_counts=True)
    rank = torch.arange(key.numel(), device=device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    chosen = order[rank < num].sort().values  # back to (head, query, key)
    return h[chosen], i[chosen], j[chosen]


@torch.no_grad()
def topk(q: Tensor, k: Tensor, num_keys: int, *, allowed: Tensor | None = None, allowed_head: Tensor | None = None,
         scale: float | None = None, batch: Batch | None = None, lengths: BatchLengths | None = None,
         causal: bool = False, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    r"""Top-k attention: every query head keeps its ``num_keys`` highest-scoring keys.

    For query head :math:`h` and query :math:`i`, the score of key :math:`j` is
    :math:`s_{ij}^h = \mathrm{scale} \cdot \langle q_i^h, k_j^{\lfloor h/g \rfloor} \rangle` (so the
    ranking is the one of :math:`\langle q_i^h, k_j \rangle` for any ``scale > 0``), and

    .. math::
        \mathcal{N}_h(i) = \operatorname{top}_{\mathrm{num\_keys}} \{ s_{ij}^h : j \in A_h(i) \},

    where the allowed keys :math:`A_h(i)` are all keys of :math:`i`'s sequence (only local
    :math:`j \le i` when ``causal``) without ``allowed``, and the sources of the edges ``j -> i`` of
    ``allowed`` (for head :math:`h`: those with ``allowed_head == h``), restricted the same way to
    :math:`i`'s sequence (and to :math:`j \le i`), otherwise. The selection is exact: ties go to
    the lower key index; a row of fewer allowed keys than ``num_keys`` keeps all of them, a row
    without allowed keys stays empty. Queries and keys may be different node sets (cross
    attention).

    Args:
        q: queries ``[N_dst, H, D]``.
        k: keys ``[N_src, H_kv, D]``, same dtype and device, ``H % H_kv == 0``.
        num_keys: keys kept per query and head, ``>= 1``.
        allowed: the candidate edges, an ``edge_index`` ``[2, E]`` (plain integer tensor or
            ``torch_geometric.EdgeIndex``, any order, duplicates ignored); ``None``: every key of
            the query's sequence.
        allowed_head: ``[E]`` query head of each edge of ``allowed`` (a per-head allowed graph);
            ``None``: ``allowed`` is shared by all heads.
        scale: positive score scale, default ``1 / sqrt(D)``; it does not change the selection.
        batch: sorted sequence id of every token (self-attention), or a pair
            ``(batch_q, batch_k)`` (cross attention; sequence ``b`` of the queries reads
            sequence ``b`` of the keys).
        lengths: sequence lengths (self-attention), or a pair ``(lengths_q, lengths_k)``; give at
            most one of ``batch`` and ``lengths`` (neither: one sequence).
        causal: only keys at local positions ``j <= i``.
        chunk: queries scored at a time without ``allowed`` (a score block is
            ``[chunk, H, N_src]`` at most); with ``allowed``, ``64 * chunk`` candidate edges.

    Returns:
        ``(edge_index [2, E], edge_head [E])``, sorted by (head, target, source).

    Example:
        >>> q = torch.tensor([[[1.0]], [[2.0]], [[-1.0]]])  # [3, 1, 1]
        >>> k = torch.tensor([[[1.0]], [[3.0]], [[-2.0]]])
        >>> edge_index, edge_head = topk(q, k, 2)
        >>> edge_index.tolist(), edge_head.tolist()
        ([[0, 1, 0, 1, 0, 2], [0, 0, 1, 1, 2, 2]], [0, 0, 0, 0, 0, 0])
        >>> topk(q, k, 1, causal=True)[0].tolist()
        [[0, 1, 2], [0, 1, 2]]
    """
    H, _ = _check_qk(q, k)
    check_int("num_keys", num_keys, 1)
    if scale is not None:
        _check_real("scale", scale, 0.0, math.inf, open_lo=True)
    check_bool("causal", causal)
    check_int("chunk", chunk, 1)
    lq, lk = _sequences("topk", q, k, batch, lengths, bipartite=True)
    if allowed is None and allowed_head is not None:
        raise ValueError(f"Expected 'allowed_head' only with 'allowed' (got allowed=None and allowed_head of "
                         f"shape {tuple(allowed_head.shape) if isinstance(allowed_head, Tensor) else allowed_head})")
    num = min(num_keys, max(lk, default=0))  # a row never has more keys than its sequence
    q, k = _prepare(q), _prepare(k)
    if allowed is None:
        check_edges("topk", H * sum(a * min(num, b) for a, b in zip(lq, lk)), **_sizes(lq, lk))
        h, i, j = _dense_topk(q, k, num, lq, lk, causal=causal, exclude_self=False, chunk=chunk)
    else:
        src, dst, head = _check_allowed(allowed, allowed_head, H, k.size(0), q.size(0), q.device)
        h, i, j = _allowed_topk(q, k, num, src, dst, head, lq, lk, causal=causal, chunk=chunk)
    return torch.stack([j, i]), h


# ---------------------------------------------------------------- blocks
@torch.no_grad()
def block_topk(q: Tensor, k: Tensor, block_size: int, num_blocks: int, *, causal: bool = False,
               batch: Tensor | None = None, lengths: Lengths | None = None) -> tuple[Tensor, Tensor]:
    r"""Block selection (MoBA, Lu et al. 2025): each query block keeps its best key blocks.

    Each sequence is cut into blocks of ``block_size`` positions (the last one possibly shorter);
    query block :math:`b` and key block :math:`b` cover the same positions. Keys and queries are
    mean-pooled over the real tokens of a block, :math:`\bar k_c = \frac{1}{|c|}\sum_{j \in c} k_j`,
    :math:`\bar q_b = \frac{1}{|b|}\sum_{i \in b} q_i`, and head :math:`h` of query block :math:`b`
    keeps

    .. math::
        K_h(b) = \{b\} \cup \operatorname{top}_{\mathrm{num\_blocks}}
        \{ \langle \bar q_b^h, \bar k_c^{\lfloor h/g \rfloor} \rangle : c \ne b \}

    (ties to the lower block index; with ``causal`` only blocks :math:`c < b` compete). The own
    block is always kept and does not count toward ``num_blocks``, so ``num_blocks = 0`` is local
    block attention. The edges are all ``j -> i`` with ``j`` in a kept block of ``i``'s block (with
    ``causal``, only ``j <= i`` inside the own block). The gate is per query block (MoBA's is per
    query token), so every query of a block reads the same key blocks. Self-attention only.

    Args:
        q: queries ``[N, H, D]``.
        k: keys ``[N, H_kv, D]``, same dtype and device, ``H % H_kv == 0``.
        block_size: positions per block, ``>= 1`` and at most the longest sequence.
        num_blocks: key blocks kept besides the own block, ``>= 0`` (more than there are: all).
        causal: only blocks at or before the query's, and ``j <= i`` inside its own.
        batch: sorted sequence id of every token; or
        lengths: the sequence lengths (at most one of the two; neither: one sequence).

    Returns:
        ``(edge_index [2, E], edge_head [E])``, sorted by (head, target, source).

    Example:
        >>> q = k = torch.ones(6, 1, 2)  # all blocks tie: the lower block index wins
        >>> edge_index, edge_head = block_topk(q, k, 2, 1, causal=True)
        >>> edge_index.tolist()
        [[0, 0, 1, 0, 1, 2, 0, 1, 2, 3, 0, 1, 4, 0, 1, 4, 5], [0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 5, 5, 5, 5]]
    """
    H, _ = _check_qk(q, k)
    check_int("block_size", block_size, 1)
    check_int("num_blocks", num_blocks, 0)
    check_bool("causal", causal)
    lens, _ = _sequences("block_topk", q, k, batch, lengths)
    longest = max(lens, default=0)
    if longest and block_size > longest:
        raise ValueError(f"Expected 'block_size' <= the longest sequence ({longest}) (got {block_size})")
    device, n = q.device, q.size(0)
    if n == 0:
        return _empty(device)
    q, k = _prepare(q), _prepare(k)
    per_seq = [-(-L // block_size) for L in lens]  # blocks per sequence
    NB = sum(per_seq)
    seq, pos, _, _ = _layout(lens, device)
    block_offset = torch.tensor([0] + per_seq[:-1], dtype=torch.long).cumsum(0).to(device)
    block = block_offset[seq] + pos // block_size  # [N] block of each token
    size = torch.bincount(block, minlength=NB)  # [NB] real tokens per block
    start = size.cumsum(0) - size  # [NB] first token of each block
    q_mean = torch.zeros(NB, *q.shape[1:], dtype=q.dtype, device=device).index_add_(0, block, q)
    k_mean = torch.zeros(NB, *k.shape[1:], dtype=k.dtype, device=device).index_add_(0, block, k)
    q_mean, k_mean = q_mean / size[:, None, None], k_mean / size[:, None, None]  # [NB, H, D], [NB, H_kv, D]
    # -- the kept blocks: the best others, then the own block --
    hb, qb, kb = _dense_topk(q_mean, k_mean, min(num_blocks, max(per_seq)), per_seq, per_seq, causal=causal,
                             exclude_self=True, chunk=BLOCK_CHUNK)
    own = torch.arange(NB, device=device).repeat(H)
    hb = torch.cat([hb, torch.arange(H, device=device).repeat_interleave(NB)])
    qb, kb = torch.cat([qb, own]), torch.cat([kb, own])
    order = torch.argsort((hb * NB + qb) * NB + kb)
    hb, qb, kb = hb[order], qb[order], kb[order]  # [P] sorted by (head, query block, key block)
    pair_edges = size[qb] * size[kb]
    if causal:
        pair_edges = torch.where(qb == kb, size[qb] * (size[qb] + 1) // 2, pair_edges)
    check_edges("block_topk", int(pair_edges.sum()), n=lens)
    # -- expand: rows (head, query), then kept blocks, then the keys of each --
    counts = torch.bincount(hb * NB + qb, minlength=H * NB)  # kept blocks per (head, query block)
    first = counts.cumsum(0) - counts
    row_seg = (torch.arange(H, device=device)[:, None] * NB + block[None]).reshape(-1)  # [H * N]
    row, p = expand_ranges(first[row_seg], counts[row_seg])  # one entry per (row, kept block)
    i, kept = row % n, kb[p]
    count = size[kept]
    if causal:
        count = torch.where(kept == block[i], i - start[kept] + 1, count)
    entry, j = expand_ranges(start[kept], count)
    row = row[entry]
    return torch.stack([j, row % n]), row // n


# ---------------------------------------------------------------- LSH
def _bucket_order(x: Tensor, rotation: Tensor, seq: Tensor, num_buckets: int) -> Tensor:
    """Permutation sorting tokens by (sequence, bucket, position); ``x`` ``[N, D]`` normalized."""
    xr = x @ rotation  # [N, num_buckets // 2]
    bucket = torch.cat([xr, -xr], dim=-1).argmax(-1)  # [N]
    return torch.argsort(seq * num_buckets + bucket, stable=True)


@torch.no_grad()
def lsh(q: Tensor, k: Tensor, num_buckets: int, *, num_hashes: int = 1, chunk_size: int = 64, seed: int = 0,
        causal: bool = False, batch: Tensor | None = None, lengths: Lengths | None = None) -> tuple[Tensor, Tensor]:
    r"""LSH attention (Reformer, Kitaev et al. 2020): queries read keys that hash near them.

    Angular LSH: for hash round :math:`r` and key head :math:`x`, a random rotation
    :math:`R \in \mathbb{R}^{D \times \mathrm{num\_buckets}/2}`, :math:`R_{ab} \sim N(0, 1)`, and
    :math:`\mathrm{bucket}(v) = \operatorname{argmax}([\hat v R; -\hat v R])` with
    :math:`\hat v = v / \lVert v \rVert`. Query head :math:`h` and key head :math:`\lfloor h/g
    \rfloor` are hashed with the same rotations (Reformer shares queries and keys; with separate
    ``q`` and ``k`` both are hashed alike). Per round, head and sequence, the queries are sorted
    by (bucket, position), the keys likewise, and both sorted orders are cut into sorted chunks
    of ``chunk_size`` positions; a query in sorted chunk :math:`c` reads the keys of sorted
    chunks :math:`c` and :math:`c - 1` (the first chunk reads its own only: no wrap-around, unlike
    Reformer's code). The graph is the union over rounds; ``causal`` keeps local ``j <= i``.

    The rotations are drawn on the CPU, ``torch.randn(num_hashes, H_kv, D, num_buckets // 2,
    generator=torch.Generator().manual_seed(seed), dtype=torch.float64)``, then moved to ``q``'s
    device and score dtype: the same on every device.

    Args:
        q: queries ``[N, H, D]``.
        k: keys ``[N, H_kv, D]``, same dtype and device, ``H % H_kv == 0``.
        num_buckets: buckets per round, even and ``>= 2``.
        num_hashes: hash rounds, ``>= 1``.
        chunk_size: positions per sorted chunk, ``>= 1``.
        seed: seed of the rotations, in ``[0, 2**63 - 1]``.
        causal: only keys at local positions ``j <= i``.
        batch: sorted sequence id of every token; or
        lengths: the sequence lengths (at most one of the two; neither: one sequence).

    Returns:
        ``(edge_index [2, E], edge_head [E])``, sorted by (head, target, source).

    Example:
        >>> q, k = torch.randn(3, 1, 4), torch.randn(3, 1, 4)
        >>> edge_index, edge_head = lsh(q, k, 4, chunk_size=4, causal=True)  # one chunk: all of it
        >>> edge_index.tolist()
        [[0, 0, 1, 0, 1, 2], [0, 1, 1, 2, 2, 2]]
    """
    H, g = _check_qk(q, k)
    check_int("num_buckets", num_buckets, 2)
    if num_buckets % 2:
        raise ValueError(f"Expected 'num_buckets' to be even (got {num_buckets})")
    check_int("num_hashes", num_hashes, 1)
    check_int("chunk_size", chunk_size, 1)
    check_seed("seed", seed)
    check_bool("causal", causal)
    lens, _ = _sequences("lsh", q, k, batch, lengths)
    device, (n, _, D), H_kv = q.device, q.shape, k.size(1)
    chunk_size = min(chunk_size, max(max(lens, default=0), 1))  # a longer chunk holds the same positions
    check_edges("lsh", H * num_hashes * sum(L * min(L, 2 * chunk_size) for L in lens), n=lens)
    if n == 0:
        return _empty(device)
    q, k = F.normalize(_prepare(q), dim=-1), F.normalize(_prepare(k), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    rotations = torch.randn(num_hashes, H_kv, D, num_buckets // 2, generator=generator, dtype=torch.float64)
    rotations = rotations.to(device=device, dtype=q.dtype)  # [R, H_kv, D, num_buckets // 2]
    seq, pos, offset, length = _layout(lens, device)
    # the same in every round and head: sorted query position p reads sorted key positions [lo, hi)
    c = pos // chunk_size  # [N] sorted chunk of each sorted position
    lo = offset + (c - 1).clamp(min=0) * chunk_size
    hi = offset + torch.minimum((c + 1) * chunk_size, length)
    sorted_q, sorted_k = expand_ranges(lo, hi - lo)  # [M] sorted positions
    key_order = [[_bucket_order(k[:, x], rotations[r, x], seq, num_buckets) for x in range(H_kv)]
                 for r in range(num_hashes)]
    heads, keys = [], []
    for h in range(H):
        codes = []
        for r in range(num_hashes):
            i = _bucket_order(q[:, h], rotations[r, h // g], seq, num_buckets)[sorted_q]  # [M]
            j = key_order[r][h // g][sorted_k]
            if causal:
                keep = j <= i  # same sequence: global order is local order
                i, j = i[keep], j[keep]
            codes.append(i * n + j)
        code = torch.unique(torch.cat(codes))  # [E_h] sorted by (query, key), distinct
        heads.append(torch.full_like(code, h))
        keys.append(code)
    h, code = torch.cat(heads), torch.cat(keys)
    return torch.stack([code % n, code // n]), h


# ---------------------------------------------------------------- routing
def _check_centroids(centroids: object, H: int, D: int, device: torch.device) -> Tensor:
    """Validate ``centroids`` ``[H, K, D]``."""
    if not isinstance(centroids, Tensor) or centroids.dim() != 3 or centroids.size(0) != H \
            or centroids.size(2) != D or centroids.size(1) < 1:
        shape = tuple(centroids.shape) if isinstance(centroids, Tensor) else type(centroids).__name__
        raise ValueError(f"Expected 'centroids' of shape [H={H}, K >= 1, D={D}] (got {shape})")
    if not centroids.is_floating_point():
        raise ValueError(f"Expected 'centroids' to be a floating-point tensor (got dtype {centroids.dtype})")
    if centroids.device != device:
        raise ValueError(f"Expected 'centroids' on the device of 'q' ({device}) (got {centroids.device})")
    return centroids


def _nearest(x: Tensor, centroids: Tensor) -> Tensor:
    """Cluster ``[N, H]`` of normalized ``x`` ``[N, H, D]`` under normalized centroids ``[H, K, D]``."""
    return torch.cat([torch.einsum("nhd,hkd->nhk", x[s:s + ASSIGN_CHUNK], centroids).argmax(-1)
                      for s in range(0, x.size(0), ASSIGN_CHUNK)] or [x.new_empty(0, x.size(1), dtype=torch.long)])


def _update_centroids(centroids: Tensor, q: Tensor, k: Tensor, cq: Tensor, ck: Tensor, decay: float) -> None:
    """Move ``centroids`` in place toward the mean of the vectors assigned to them, then normalize."""
    H, K, D = centroids.shape
    index = (torch.cat([cq, ck]) + torch.arange(H, device=cq.device) * K).reshape(-1)  # [2N * H]
    total = torch.zeros(H * K, D, dtype=q.dtype, device=q.device).index_add_(0, index, torch.cat([q, k]).reshape(-1, D))
    count = torch.bincount(index, minlength=H * K).view(H, K, 1)
    mean = total.view(H, K, D) / count.clamp(min=1)
    old = centroids.to(q.dtype)
    new = torch.where(count > 0, decay * old + (1 - decay) * mean, old)
    centroids.copy_(F.normalize(new, dim=-1))


@torch.no_grad()
def routing(q: Tensor, k: Tensor, centroids: Tensor, *, causal: bool = False, batch: Tensor | None = None,
            lengths: Lengths | None = None, update: bool = False, decay: float = 0.999) -> tuple[Tensor, Tensor]:
    r"""Routing attention (Routing Transformer, Roy et al. 2021): queries read the keys of their cluster.

    With normalized :math:`\hat v = v / \lVert v \rVert` and the normalized centroids
    :math:`\mu_{h,1..K}` of head :math:`h`, query :math:`i` joins cluster
    :math:`c_h(q_i) = \operatorname{argmax}_c \langle \hat q_i^h, \hat\mu_{h,c} \rangle` and key
    :math:`j` cluster :math:`c_h(k_j) = \operatorname{argmax}_c \langle \hat k_j^{\lfloor h/g
    \rfloor}, \hat\mu_{h,c} \rangle` (a key head is assigned with the centroids of each query
    head that reads it). Edge ``j -> i`` exists for head :math:`h` iff :math:`c_h(q_i) =
    c_h(k_j)`, both in one sequence (and local ``j <= i`` when ``causal``). A query whose cluster
    holds no key has no edge.

    With ``update``, after the assignment (the returned graph uses the centroids as given), the
    centroids move in place as online mini-batch k-means: :math:`\mu_{h,c} \leftarrow
    \mathrm{normalize}(\lambda \mu_{h,c} + (1 - \lambda)\, m_{h,c})` with :math:`m_{h,c}` the mean
    of the normalized queries and keys assigned to :math:`c` under head :math:`h` (over the whole
    batch); centroids without assigned vectors are only re-normalized. The edges can number up to
    :math:`H N^2`: they are counted first and refused above the edge budget.

    Args:
        q: queries ``[N, H, D]``.
        k: keys ``[N, H_kv, D]``, same dtype and device, ``H % H_kv == 0``.
        centroids: ``[H, K, D]`` on ``q``'s device (any float dtype; normalized before use).
        causal: only keys at local positions ``j <= i``.
        batch: sorted sequence id of every token; or
        lengths: the sequence lengths (at most one of the two; neither: one sequence).
        update: move ``centroids`` in place (see above).
        decay: :math:`\lambda \in [0, 1]` of the update.

    Returns:
        ``(edge_index [2, E], edge_head [E])``, sorted by (head, target, source).

    Example:
        >>> centroids = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [H=1, K=2, D=2]
        >>> q = k = torch.tensor([[[1.0, 0.1]], [[0.1, 1.0]], [[1.0, 0.0]]])  # clusters 0, 1, 0
        >>> routing(q, k, centroids)[0].tolist()
        [[0, 2, 1, 0, 2], [0, 0, 1, 2, 2]]
        >>> routing(q, k, centroids, causal=True)[0].tolist()
        [[0, 1, 0, 2], [0, 1, 2, 2]]
    """
    H, g = _check_qk(q, k)
    _check_centroids(centroids, H, q.size(2), q.device)
    check_bool("causal", causal)
    check_bool("update", update)
    decay = _check_real("decay", decay, 0.0, 1.0)
    lens, _ = _sequences("routing", q, k, batch, lengths)
    device, n, K, B = q.device, q.size(0), centroids.size(1), max(len(lens), 1)
    if H * B * K * (n + 1) > INT64_MAX:
        raise ValueError(f"Expected H * sequences * K * (N + 1) <= 2**63 - 1 (got {H} heads, {B} sequences, "
                         f"K={K}, N={n})")
    q, k = F.normalize(_prepare(q), dim=-1), F.normalize(_prepare(k), dim=-1)
    k = k.repeat_interleave(g, dim=1)  # [N, H, D]: key head h // g under query head h
    mu = F.normalize(centroids.detach().to(q.dtype), dim=-1)  # [H, K, D]
    cq, ck = _nearest(q, mu), _nearest(k, mu)  # [N, H] clusters
    # -- count: keys sorted by code (head, sequence, cluster, index), each row a range of them --
    seq, _, _, _ = _layout(lens, device)
    node = torch.arange(n, device=device)
    head = torch.arange(H, device=device)
    base_k = ((head[:, None] * B + seq[None]) * K + ck.T) * (n + 1)  # [H, N]
    code, perm = torch.sort((base_k + node[None]).reshape(-1))  # [H * N]
    base_q = (((head[:, None] * B + seq[None]) * K + cq.T) * (n + 1)).reshape(-1)  # [H * N] rows (head, query)
    last = node.repeat(H) if causal else torch.full_like(base_q, n)  # largest key index (code) of a row
    lo = torch.searchsorted(code, base_q)
    count = torch.searchsorted(code, base_q + last, right=True) - lo
    check_edges("routing", int(count.sum()), n=lens)
    if update:
        _update_centroids(centroids, q, k, cq, ck, decay)
    row, p = expand_ranges(lo, count)
    return torch.stack([perm[p] % max(n, 1), row % max(n, 1)]), row // max(n, 1)


# ---------------------------------------------------------------- a layer's selectors
def _sequence_lengths(src: Tensor, dst: Tensor, n: int) -> list[int]:
    """:func:`sequence_lengths` of checked ``src``, ``dst``."""
    if n == 0:
        return [0]
    lo, hi = torch.minimum(src, dst), torch.maximum(src, dst)
    spans = torch.bincount(lo, minlength=n + 1) - torch.bincount(hi, minlength=n + 1)  # difference array
    covered = spans.cumsum(0)[: n - 1]  # [N - 1]: edges spanning the boundary between b - 1 and b
    bounds = (covered == 0).nonzero().reshape(-1) + 1  # first node of every sequence but the first
    ptr = torch.cat([bounds.new_zeros(1), bounds, bounds.new_full((1,), n)])
    return ptr.diff().tolist()


def sequence_lengths(edge_index: Tensor, num_nodes: int) -> list[int]:
    r"""The sequences of a self-attention graph: the maximal ranges of consecutive nodes no edge crosses.

    An edge ``j -> i`` covers the boundaries between the nodes :math:`\min(i, j)` and
    :math:`\max(i, j)`; a boundary between nodes ``b - 1`` and ``b`` that no edge covers starts a
    new sequence. A disjoint union of sequences (causal, windows, any builder's batch) gives back
    its lengths; a node without edges is a sequence of its own; nodes joined by a chain of
    overlapping edges are one sequence. It is the rule the selector objects (:class:`BlockTopK`,
    :class:`LSH`, :class:`Routing`) use to find the sequences of the graph a layer passes them: in
    ``O(N + E)``, with a difference array over the edges' spans.

    Args:
        edge_index: ``[2, E]`` integer (plain or ``EdgeIndex``), both rows in ``[0, num_nodes)``.
        num_nodes: ``N``, ``>= 0``.

    Returns:
        The lengths, summing to ``num_nodes`` (``[0]`` for no nodes).

    Example:
        >>> from gnn_transformer import topology as T
        >>> sequence_lengths(T.causal([2, 3]), 5)
        [2, 3]
        >>> sequence_lengths(torch.tensor([[0, 2], [2, 0]]), 4)  # 0 <-> 2 covers node 1; node 3 alone
        [3, 1]
    """
    check_int("num_nodes", num_nodes, 0)
    device = edge_index.device if isinstance(edge_index, Tensor) else torch.device("cpu")
    src, dst = _edge_list("edge_index", edge_index, num_nodes, num_nodes, device, ("num_nodes", "num_nodes"))
    return _sequence_lengths(src, dst, num_nodes)


def _allowed_graph(who: object, q: Tensor, k: Tensor, edge_index: object, *,
                   self_attention: bool = True) -> tuple[Tensor, Tensor]:
    """Checked ``(src, dst)`` of the graph a selector is given (of self-attention unless told)."""
    _check_qk(q, k)
    if self_attention and q.size(0) != k.size(0):
        raise ValueError(f"{who!r} selects on a self-attention graph only: expected as many queries as keys (got "
                         f"q.size(0)={q.size(0)}, k.size(0)={k.size(0)})")
    check_keys(k.size(0), q.size(0))
    return _edge_list("edge_index", edge_index, k.size(0), q.size(0), q.device)


def _within(edge_index: Tensor, edge_head: Tensor, src: Tensor, dst: Tensor, n_src: int) -> tuple[Tensor, Tensor]:
    """The edges of a per-head selection that the shared graph ``(src, dst)`` holds, in their order:
    each ``(target, source)`` looked up among the graph's sorted keys (no ``[N, N]`` mask)."""
    allowed = torch.unique(dst * n_src + src)  # [A] sorted by (target, source)
    if allowed.numel() == 0:
        return edge_index[:, :0], edge_head[:0]
    code = edge_index[1] * n_src + edge_index[0]  # [E]
    at = torch.searchsorted(allowed, code).clamp(max=allowed.numel() - 1)
    keep = allowed[at] == code  # [E]
    return edge_index[:, keep], edge_head[keep]


def _select_in_sequences(who: object, q: Tensor, k: Tensor, edge_index: object, select) -> tuple[Tensor, Tensor]:
    """``select(lengths)`` on the sequences of the given graph, then kept to that graph."""
    src, dst = _allowed_graph(who, q, k, edge_index)
    chosen = select(_sequence_lengths(src, dst, q.size(0)))
    return _within(*chosen, src, dst, max(k.size(0), 1))


@dataclass(frozen=True)
class TopK:
    r"""Top-k selection as a layer's ``select``: every query head keeps its ``num_keys`` best allowed keys.

    ``TopK(num_keys)(q, k, edge_index)`` is ``topk(q, k, num_keys, allowed=edge_index)``: the
    candidates of query ``i`` are the sources of its edges in ``edge_index`` (any graph, cross
    attention included), so the result is a subset of it for every head.

    Args:
        num_keys: keys kept per query and head, ``>= 1``.
        causal: only keys ``j <= i`` (node indices; within a sequence of a self-attention batch
            graph, the same as local positions). Default ``False``.

    Example:
        >>> from gnn_transformer import topology as T
        >>> q = torch.tensor([[[1.0]], [[2.0]], [[-1.0]]])  # [3, 1, 1]
        >>> k = torch.tensor([[[1.0]], [[3.0]], [[-2.0]]])
        >>> edge_index, edge_head = TopK(1)(q, k, T.causal(3))
        >>> edge_index.tolist(), edge_head.tolist()
        ([[0, 1, 2], [0, 1, 2]], [0, 0, 0])
    """

    num_keys: int
    _: KW_ONLY
    causal: bool = False

    def __post_init__(self) -> None:
        check_int("num_keys", self.num_keys, 1)
        check_bool("causal", self.causal)

    def __call__(self, q: Tensor, k: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        """``(edge_index [2, E], edge_head [E])``, sorted by (head, target, source)."""
        src, dst = _allowed_graph(self, q, k, edge_index, self_attention=False)
        return topk(q, k, self.num_keys, allowed=torch.stack([src, dst]), causal=self.causal)


@dataclass(frozen=True)
class BlockTopK:
    r"""Block selection (MoBA) as a layer's ``select``: :func:`block_topk` on the graph's sequences,
    kept to the graph.

    The sequences are those of :func:`sequence_lengths` of the given graph (a self-attention graph:
    as many queries as keys); blocks are cut from the start of each. A sequence shorter than
    ``block_size`` is one block. The edges :func:`block_topk` selects are then kept only where the
    given graph has them (the intersection, per head).

    Args:
        block_size: positions per block, ``>= 1``.
        num_blocks: key blocks kept besides the own block, ``>= 0``.
        causal: only blocks at or before the query's, ``j <= i`` inside its own. Default ``False``.

    Example:
        >>> from gnn_transformer import topology as T
        >>> q = k = torch.ones(6, 1, 2)  # all blocks tie: the lower block index wins
        >>> edge_index, _ = BlockTopK(2, 0, causal=True)(q, k, T.causal([2, 4]))
        >>> edge_index.tolist()
        [[0, 0, 1, 2, 2, 3, 4, 4, 5], [0, 1, 1, 2, 3, 3, 4, 5, 5]]
    """

    block_size: int
    num_blocks: int
    _: KW_ONLY
    causal: bool = False

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size, 1)
        check_int("num_blocks", self.num_blocks, 0)
        check_bool("causal", self.causal)

    def __call__(self, q: Tensor, k: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        """``(edge_index [2, E], edge_head [E])``, sorted by (head, target, source)."""
        def select(lengths: list[int]) -> tuple[Tensor, Tensor]:
            block_size = min(self.block_size, max(max(lengths), 1))  # a longer block holds the same positions
            return block_topk(q, k, block_size, self.num_blocks, causal=self.causal, lengths=lengths)
        return _select_in_sequences(self, q, k, edge_index, select)


@dataclass(frozen=True)
class LSH:
    r"""LSH attention (Reformer) as a layer's ``select``: :func:`lsh` on the graph's sequences, kept
    to the graph.

    The sequences are those of :func:`sequence_lengths` of the given graph (a self-attention graph:
    as many queries as keys); the edges :func:`lsh` selects are kept only where the given graph has
    them (the intersection, per head). The rotations are drawn from ``seed`` on every call: the
    same input gives the same graph.

    Args:
        num_buckets: buckets per round, even and ``>= 2``.
        num_hashes: hash rounds, ``>= 1``. Default ``1``.
        chunk_size: positions per sorted chunk, ``>= 1``. Default ``64``.
        seed: seed of the rotations, in ``[0, 2**63 - 1]``. Default ``0``.
        causal: only keys at local positions ``j <= i``. Default ``False``.

    Example:
        >>> from gnn_transformer import topology as T
        >>> q = k = torch.randn(5, 2, 4)
        >>> edge_index, edge_head = LSH(4, chunk_size=8)(q, k, T.sliding_window(5, 1))  # one chunk: all of it
        >>> edge_index.size(1) == 2 * T.sliding_window(5, 1).size(1)
        True
    """

    num_buckets: int
    _: KW_ONLY
    num_hashes: int = 1
    chunk_size: int = 64
    seed: int = 0
    causal: bool = False

    def __post_init__(self) -> None:
        check_int("num_buckets", self.num_buckets, 2)
        if self.num_buckets % 2:
            raise ValueError(f"Expected 'num_buckets' to be even (got {self.num_buckets})")
        check_int("num_hashes", self.num_hashes, 1)
        check_int("chunk_size", self.chunk_size, 1)
        check_seed("seed", self.seed)
        check_bool("causal", self.causal)

    def __call__(self, q: Tensor, k: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        """``(edge_index [2, E], edge_head [E])``, sorted by (head, target, source)."""
        def select(lengths: list[int]) -> tuple[Tensor, Tensor]:
            return lsh(q, k, self.num_buckets, num_hashes=self.num_hashes, chunk_size=self.chunk_size,
                       seed=self.seed, causal=self.causal, lengths=lengths)
        return _select_in_sequences(self, q, k, edge_index, select)


class Routing(nn.Module):
    r"""Routing attention with its centroids: :func:`routing` plus an online k-means.

    Holds ``centroids`` ``[H, K, D]`` as a buffer (in the state dict, follows ``.to()``), drawn
    from a seeded normal and normalized. In training mode every forward moves them toward the mean
    of the normalized queries and keys assigned to them (exponential moving average of rate
    ``decay``, then re-normalized); in eval mode they stay. The graph of a call uses the centroids
    as they were before it.

    Two ways to call it:

    - ``router(q, k, *, causal=None, batch=None, lengths=None)``: :func:`routing` on the sequences
      given by ``batch`` or ``lengths`` (neither: one sequence).
    - ``router(q, k, edge_index)``: a layer's ``select``. The sequences are those of
      :func:`sequence_lengths` of the given graph (a self-attention graph: as many queries as keys;
      ``batch`` and ``lengths`` are then refused), and the selected edges are kept only where the
      graph has them (the intersection, per head).

    Args:
        num_heads: query heads ``H``.
        head_dim: head dimension ``D``.
        num_clusters: centroids per head ``K``.
        decay: :math:`\lambda \in [0, 1]` of the moving average. Default ``0.999``.
        seed: seed of the initial centroids. Default ``0``.
        causal: only keys at local positions ``j <= i``, unless a call says otherwise. Default ``False``.

    Example:
        >>> from gnn_transformer import topology as T
        >>> router = Routing(num_heads=2, head_dim=4, num_clusters=3)
        >>> q, k = torch.randn(5, 2, 4), torch.randn(5, 1, 4)
        >>> edge_index, edge_head = router(q, k, causal=True)
        >>> bool((edge_index[0] <= edge_index[1]).all()), router.centroids.shape
        (True, torch.Size([2, 3, 4]))
        >>> edge_index, edge_head = router(q, k, T.sliding_window([2, 3], 1))  # a layer's call
        >>> bool(((edge_index[0] - edge_index[1]).abs() <= 1).all())
        True
    """

    centroids: Tensor

    def __init__(self, num_heads: int, head_dim: int, num_clusters: int, *, decay: float = 0.999,
                 seed: int = 0, causal: bool = False) -> None:
        super().__init__()
        check_int("num_heads", num_heads, 1)
        check_int("head_dim", head_dim, 1)
        check_int("num_clusters", num_clusters, 1)
        self.decay = _check_real("decay", decay, 0.0, 1.0)
        self.seed = check_seed("seed", seed)
        self.causal = check_bool("causal", causal)
        generator = torch.Generator().manual_seed(seed)
        centroids = torch.randn(num_heads, num_clusters, head_dim, generator=generator)
        self.register_buffer("centroids", F.normalize(centroids, dim=-1))

    def forward(self, q: Tensor, k: Tensor, edge_index: Tensor | None = None, *, causal: bool | None = None,
                batch: Tensor | None = None, lengths: Lengths | None = None) -> tuple[Tensor, Tensor]:
        """Select with :func:`routing` (within ``edge_index`` when given); update the centroids in
        training mode."""
        causal = self.causal if causal is None else causal
        if edge_index is None:
            return self._route(q, k, causal, batch=batch, lengths=lengths)
        if batch is not None or lengths is not None:
            given = "batch" if batch is not None else "lengths"
            raise ValueError(f"Expected no '{given}' with 'edge_index': the sequences are those of the graph "
                             f"(got {given}={batch if batch is not None else lengths!r})")
        return _select_in_sequences(self, q, k, edge_index, lambda lens: self._route(q, k, causal, lengths=lens))

    def _route(self, q: Tensor, k: Tensor, causal: bool, *, batch: Tensor | None = None,
               lengths: Lengths | None = None) -> tuple[Tensor, Tensor]:
        return routing(q, k, self.centroids, causal=causal, batch=batch, lengths=lengths, update=self.training,
                       decay=self.decay)

    def extra_repr(self) -> str:
        H, K, D = self.centroids.shape
        return (f"num_heads={H}, head_dim={D}, num_clusters={K}, decay={self.decay}, seed={self.seed}"
                f"{', causal=True' if self.causal else ''}")


# ---------------------------------------------------------------- by name
SELECTORS = ("topk", "block_topk", "lsh", "routing")
_CLASSES: dict[str, type] = {"topk": TopK, "block_topk": BlockTopK, "lsh": LSH, "routing": Routing}
_PARAMETERS: dict[str, dict[str, type]] = {  # the parameters a spec may give, with their types
    "topk": {"num_keys": int, "causal": bool},
    "block_topk": {"block_size": int, "num_blocks": int, "causal": bool},
    "lsh": {"num_buckets": int, "num_hashes": int, "chunk_size": int, "seed": int, "causal": bool},
    "routing": {"num_clusters": int, "decay": float, "seed": int, "causal": bool},
}
_REQUIRED = {"topk": ("num_keys",), "block_topk": ("block_size", "num_blocks"), "lsh": ("num_buckets",),
             "routing": ("num_clusters",)}
_INT = re.compile(r"[+-]?\d+")
_REAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_WANT = {bool: "a boolean (true or false)", int: "an integer", float: "a real number"}


def _parse(spec: object) -> tuple[str, dict[str, object], bool]:
    """``(name, parameters, from_text)`` of a spec string or mapping, the parameters not yet typed."""
    if isinstance(spec, str):
        name, _, rest = spec.partition(":")
        params: dict[str, object] = {}
        for item in rest.split(",") if rest.strip() else []:
            key, eq, text = (part.strip() for part in item.partition("="))
            if not eq or not key or not text:
                raise ValueError(f"selector spec {spec!r}: expected 'key=value' items after 'name:' (got {item!r})")
            if key in params:
                raise ValueError(f"selector spec {spec!r}: parameter '{key}' given twice (got {key}={params[key]} "
                                 f"and {key}={text})")
            params[key] = text
        return name.strip(), params, True
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"selector spec {spec!r}: expected a 'name' key, one of {SELECTORS} (got keys "
                             f"{list(spec)})")
        return spec["name"], {key: v for key, v in spec.items() if key != "name"}, False
    raise ValueError(f"Expected 'spec' to be a string such as 'topk:num_keys=64' or a mapping such as "
                     f"{{'name': 'topk', 'num_keys': 64}} (got {spec!r})")


def _typed(spec: object, key: str, value: object, kind: type, from_text: bool) -> object:
    """``value`` as a ``kind`` (parsed from text, or checked), else a ``ValueError``."""
    if from_text:
        assert isinstance(value, str)
        if kind is bool and value in ("true", "false"):
            return value == "true"
        if kind is int and _INT.fullmatch(value):
            return int(value)
        if kind is float and _REAL.fullmatch(value):
            return float(value)
    elif kind is bool and isinstance(value, bool):
        return value
    elif kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"selector spec {spec!r}: expected '{key}' to be {_WANT[kind]} (got {key}={value!r})")


def selector(spec: str | Mapping[str, object], *, num_heads: int | None = None,
             head_dim: int | None = None) -> TopK | BlockTopK | LSH | Routing:
    r"""A selector object by name, from a spec string or a mapping (a TOML table, a model config).

    The string form is ``"name"`` or ``"name:key=value,key=value"``: integers in decimal, booleans
    ``true`` / ``false``, reals (``decay``) in decimal or exponent notation; nothing is evaluated.
    The mapping form is ``{"name": name, key: value, ...}`` with values of those types (an ``int``
    is not a ``bool``). Names (:data:`SELECTORS`) and their parameters:

    ============== ============================================================= ==============
    name           parameters (required first)                                   object
    ============== ============================================================= ==============
    ``topk``       ``num_keys``; ``causal``                                      :class:`TopK`
    ``block_topk`` ``block_size``, ``num_blocks``; ``causal``                    :class:`BlockTopK`
    ``lsh``        ``num_buckets``; ``num_hashes``, ``chunk_size``, ``seed``,    :class:`LSH`
                   ``causal``
    ``routing``    ``num_clusters``; ``decay``, ``seed``, ``causal``             :class:`Routing`
    ============== ============================================================= ==============

    Args:
        spec: the selector, as above.
        num_heads: query heads of the layer; required for ``routing`` (its centroids are per
            head), ignored by the others.
        head_dim: head dimension of the layer; required for ``routing``, ignored by the others.

    Returns:
        The selector (a new :class:`Routing` module, with fresh centroids, for ``routing``).

    Raises:
        ValueError: an unknown name or parameter, a missing parameter, a value of the wrong type
            or out of range, naming the spec, the key and the value.

    Example:
        >>> selector("block_topk:block_size=64,num_blocks=8,causal=true")
        BlockTopK(block_size=64, num_blocks=8, causal=True)
        >>> selector({"name": "topk", "num_keys": 16})
        TopK(num_keys=16, causal=False)
        >>> selector("routing:num_clusters=4", num_heads=2, head_dim=8)
        Routing(num_heads=2, head_dim=8, num_clusters=4, decay=0.999, seed=0)
    """
    name, raw, from_text = _parse(spec)
    if name not in SELECTORS:
        raise ValueError(f"selector spec {spec!r}: expected 'name' to be one of {SELECTORS} (got {name!r})")
    types = _PARAMETERS[name]
    params = {}
    for key, value in raw.items():
        if key not in types:
            raise ValueError(f"selector spec {spec!r}: unknown parameter '{key}' of {name} (got {key}={value!r}); "
                             f"its parameters: {', '.join(types)}")
        params[key] = _typed(spec, key, value, types[key], from_text)
    missing = [key for key in _REQUIRED[name] if key not in params]
    if missing:
        raise ValueError(f"selector spec {spec!r}: missing parameter '{missing[0]}' of {name} (required: "
                         f"{', '.join(_REQUIRED[name])})")
    if name == "routing":
        if num_heads is None or head_dim is None:
            raise ValueError(f"selector spec {spec!r}: routing needs the layer's 'num_heads' and 'head_dim' for its "
                             f"centroids (got num_heads={num_heads!r}, head_dim={head_dim!r})")
        params = {"num_heads": num_heads, "head_dim": head_dim, **params}
    try:
        return _CLASSES[name](**params)
    except ValueError as error:
        raise ValueError(f"selector spec {spec!r}: {error}") from error
