"""Per-head graphs: a head is an edge type.

A per-head graph is ``edge_index [2, E]`` plus ``edge_head [E]``: edge ``j -> i`` exists for query
head ``edge_head[e]`` only. Every backend runs it as a one-head graph on (head, token) nodes, the
way PyG turns a typed graph into a homogeneous one:

- target ``(h, i)`` is node ``h * N_dst + i``, its query ``q[i, h]``;
- source ``(g, j)`` is node ``g * N_src + j`` for the key/value head ``g = h // group`` that query
  head ``h`` reads (``group = H // H_kv``), its key ``k[j, g]`` and value ``v[j, g]``.

The relabelled graph has the same ``E`` edges in the same column order, so memory and time follow
the edges that exist, never ``H x`` their union, and a key/value head shared by a group is stored
once. Graphs sorted by ``(head, target)`` (what :func:`gnn_transformer.topology.per_head` and the
selectors of :mod:`gnn_transformer.topology.dynamic` return) are target-sorted after relabelling.

Notation: ``N_src`` / ``N_dst`` source / target tokens, ``H`` query heads, ``H_kv`` key/value heads,
``D`` head dimension, ``E`` edges.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor

from .planner import check_edge_index
from .primitives import forgetter, plain_tensor, versions

# relabelled graphs: id(edge_head) -> (weak refs to edge_head and edge_index, their versions,
# the sizes, the relabelled edge_index); an entry disappears with its edge_head, and a write in
# place through PyTorch (a new version) invalidates it. The relabelled tensor stays the same object
# while its entry lives, so the kernels' graph cache (keyed by tensor identity) keeps its CSR and tiles.
_CACHE: dict[
    int, tuple[weakref.ref[Tensor], weakref.ref[Tensor], tuple[int, int, int], tuple[int, int, int, int], Tensor]
] = {}
_LOCK = threading.RLock()


def check_edge_head(
    edge_head: object,
    num_edges: int,
    num_heads: int,
    device: torch.device,
    edge_index: Tensor | None = None,
    num_src: int = 0,
    num_dst: int = 0,
) -> Tensor:
    """``edge_head`` as a long tensor after checking it is ``[E]``, integer, on ``device``, with
    values in ``[0, num_heads)``; else a ``ValueError`` naming the argument and the value. With
    ``edge_index``, also its sources in ``[0, num_src)`` and targets in ``[0, num_dst)``, read back
    with the heads' range in one transfer: after relabelling, a source past ``num_src`` would be a
    valid node of another key/value head, so the kernels' own range check could not see it."""
    if not isinstance(edge_head, Tensor):
        raise ValueError(f"Expected 'edge_head' to be a tensor (got {type(edge_head).__name__})")
    if edge_head.dim() != 1 or edge_head.size(0) != num_edges:
        raise ValueError(
            f"Expected 'edge_head' of shape [E] = [{num_edges}], one query head per edge (got {list(edge_head.shape)})"
        )
    if edge_head.dtype not in (torch.long, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"Expected 'edge_head' to hold integers (got dtype {edge_head.dtype})")
    if num_edges == 0:
        return edge_head.to(device=device, dtype=torch.long)
    if edge_head.device != device:
        raise ValueError(f"Expected 'edge_head' on the device of query/key/value, {device} (got {edge_head.device})")
    if edge_head.device.type == "meta":
        raise ValueError("Expected 'edge_head' with values to check, not on the meta device")
    head = edge_head.long()
    stats = [head.amin().view(1), head.amax().view(1)]
    if edge_index is not None:
        plain = plain_tensor(edge_index).long()
        stats += [plain.amin(1), plain.amax(1)]
    lo, hi, *rest = torch.cat(stats).tolist()
    if lo < 0 or hi >= num_heads:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"Found {bad} in 'edge_head' but there are {num_heads} query heads (values 0..{num_heads - 1})"
        )
    if rest:
        src_min, dst_min, src_max, dst_max = rest
        if min(src_min, dst_min) < 0:
            raise ValueError(f"Expected 'edge_index' to hold non-negative indices (found {min(src_min, dst_min)})")
        if src_max >= num_src:
            raise ValueError(f"Found source index {src_max} in 'edge_index' but there are only {num_src} source nodes")
        if dst_max >= num_dst:
            raise ValueError(f"Found target index {dst_max} in 'edge_index' but there are only {num_dst} target nodes")
    return head


def _relabel(edge_index: Tensor, edge_head: Tensor, num_src: int, num_dst: int, group: int) -> Tensor:
    plain = plain_tensor(edge_index)
    src, dst = plain[0].long(), plain[1].long()  # [E], [E]
    head = edge_head.long()  # [E]
    return torch.stack([torch.div(head, group, rounding_mode="floor") * num_src + src, head * num_dst + dst])  # [2, E]


def head_graph(
    edge_index: Tensor, edge_head: Tensor, num_src: int, num_dst: int, num_heads: int, num_kv_heads: int
) -> Tensor:
    """The per-head graph as a one-head ``edge_index [2, E]`` on (head, token) nodes, columns in
    the given order; cached per ``edge_head`` tensor (both checked first, node and head ranges
    included: :func:`check_edge_head`)."""
    device = plain_tensor(edge_index).device
    group = num_heads // num_kv_heads
    sizes = (num_src, num_dst, num_heads, num_kv_heads)
    key = id(edge_head)
    with _LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        head_ref, index_ref, seen, hit_sizes, relabelled = hit
        if (
            head_ref() is edge_head
            and index_ref() is edge_index
            and hit_sizes == sizes
            and seen == (edge_head._version, *versions(edge_index))
        ):
            return relabelled
    # the caller's edge_head stays the cache's key (an int32 one is checked as a long copy)
    checked = check_edge_head(
        edge_head, plain_tensor(edge_index).size(1), num_heads, device, edge_index, num_src, num_dst
    )
    relabelled = _relabel(edge_index, checked, num_src, num_dst, group)
    if edge_head.is_inference() or edge_index.is_inference():  # no version counters: not cached
        return relabelled
    try:
        head_ref = weakref.ref(edge_head, forgetter(_CACHE, _LOCK, key))
        index_ref = weakref.ref(edge_index)
    except TypeError:
        return relabelled
    with _LOCK:
        _CACHE[key] = (head_ref, index_ref, (edge_head._version, *versions(edge_index)), sizes, relabelled)
    return relabelled


def heads_to_nodes(x: Tensor) -> Tensor:
    """``[N, H, D]`` -> ``[H * N, 1, D]``: row ``h * N + i`` holds ``x[i, h]``."""
    n, h, d = x.shape
    return x.transpose(0, 1).reshape(h * n, 1, d)  # [H N, 1, D]


def nodes_to_heads(x: Tensor, num_heads: int) -> Tensor:
    """``[H * N, 1, ...]`` -> ``[N, H, ...]``, the inverse of :func:`heads_to_nodes`."""
    rest = x.shape[2:]
    return x.reshape(num_heads, -1, *rest).transpose(0, 1)  # [N, H, ...]


def head_bias(edge_bias: Tensor, edge_head: Tensor, num_heads: int) -> Tensor:
    """``edge_bias`` of a per-head graph as the one-head bias ``[E, 1]``: given ``[E]`` (one value
    per edge, for its head) or ``[E, H]`` (read at each edge's head)."""
    num_edges = edge_head.numel()
    if edge_bias.shape == (num_edges,):
        return edge_bias.unsqueeze(1)  # [E, 1]
    if edge_bias.shape == (num_edges, num_heads):
        return edge_bias.gather(1, edge_head.long().unsqueeze(1))  # [E, 1]
    raise ValueError(
        f"Expected 'edge_bias' of shape [E] = [{num_edges}] or [E, H] = [{num_edges}, "
        f"{num_heads}] for a per-head graph (got {list(edge_bias.shape)})"
    )


def head_inputs(
    query: Tensor, key: Tensor, edge_index: Tensor, edge_head: Tensor, edge_bias: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """The one-head ``edge_index`` and ``edge_bias [E, 1]`` of a per-head graph on the (head, token)
    nodes of :func:`heads_to_nodes` ``(query)`` and ``(key)`` (``query [N_dst, H, D]``, ``key
    [N_src, H_kv, D]``), after checking ``edge_index``, ``edge_head`` and ``edge_bias``."""
    check_edge_index(edge_index, key.size(0), query.size(0))
    if edge_index.numel() and edge_index.device != query.device:
        raise ValueError(
            f"Expected 'edge_index' on the device of query/key/value (got {edge_index.device} and {query.device})"
        )
    index = head_graph(edge_index, edge_head, key.size(0), query.size(0), query.size(1), key.size(1))
    if edge_bias is None:
        return index, None
    if not isinstance(edge_bias, Tensor):
        raise ValueError(f"Expected 'edge_bias' to be a floating-point tensor (got {type(edge_bias).__name__})")
    return index, head_bias(edge_bias, edge_head, query.size(1))
