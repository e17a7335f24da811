"""Selector objects for a layer's ``select=``: called with the allowed graph, they keep a subset of it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._common import Lengths, check_bool, check_int, check_keys, check_seed
from ._common import check_qk, check_real
from ..implicit import BlockGraph
from .blocks import block_topk
from .lsh import lsh
from .routing import routing
from .topk import checked_edge_list, topk


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
    src, dst = checked_edge_list("edge_index", edge_index, num_nodes, num_nodes, device, ("num_nodes", "num_nodes"))
    return _sequence_lengths(src, dst, num_nodes)


def _allowed_graph(
    who: object, q: Tensor, k: Tensor, edge_index: object, *, self_attention: bool = True
) -> tuple[Tensor, Tensor]:
    """Checked ``(src, dst)`` of the graph a selector is given (of self-attention unless told)."""
    check_qk(q, k)
    if self_attention and q.size(0) != k.size(0):
        raise ValueError(
            f"{who!r} selects on a self-attention graph only: expected as many queries as keys (got "
            f"q.size(0)={q.size(0)}, k.size(0)={k.size(0)})"
        )
    check_keys(k.size(0), q.size(0))
    return checked_edge_list("edge_index", _materialized_graph(edge_index), k.size(0), q.size(0), q.device)


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


def _dense_kind(src: Tensor, dst: Tensor, lengths: list[int]) -> str | None:
    """``"full"`` / ``"causal"`` when the checked graph ``(src, dst)``, whose edges stay within the
    sequences ``lengths`` (:func:`sequence_lengths`), holds every pair of each sequence (``j <= i``:
    causal) once, else ``None``: counted, after one linear check for repeated pairs."""
    num_edges = src.numel()
    full, causal = sum(L * L for L in lengths), sum(L * (L + 1) // 2 for L in lengths)
    if num_edges not in (full, causal):
        return None
    n = max(sum(lengths), 1)
    key = dst * n + src  # [E]
    if num_edges > 1 and not bool((key[1:] > key[:-1]).all()) and torch.unique(key).numel() < num_edges:
        return None  # a pair twice
    if num_edges == full:
        return "full"
    return "causal" if bool((src <= dst).all()) else None


def _dense_graph(
    who: object, q: Tensor, k: Tensor, edge_index: object
) -> tuple[str | None, list[int], tuple[Tensor, Tensor] | None]:
    """``(kind, lengths, edges)`` of the self-attention graph a selector is given: ``kind``
    ``"full"`` / ``"causal"`` when it is exactly that attention within each of the sequences
    ``lengths`` (a :class:`BlockGraph` that says so, or an edge list of exactly those pairs), else
    ``None``; ``edges``: the checked ``(src, dst)`` of an edge list (``None`` for a ``BlockGraph``)."""
    if isinstance(edge_index, BlockGraph):
        check_qk(q, k)
        if edge_index.dense is None or (edge_index.num_dst, edge_index.num_src) != (q.size(0), k.size(0)):
            return None, [], None
        kind, bounds = edge_index.dense
        return kind, [b - a for a, b in zip(bounds[:-1], bounds[1:])], None
    src, dst = _allowed_graph(who, q, k, edge_index)
    lengths = _sequence_lengths(src, dst, q.size(0))
    return _dense_kind(src, dst, lengths), lengths, (src, dst)


def _materialized_graph(edge_index: object) -> object:
    """An implicit graph's edge list (within the edge budget); any other graph as it is."""
    if isinstance(edge_index, BlockGraph):
        if edge_index.per_head:
            raise ValueError(
                f"Expected a graph shared by every head as 'edge_index' to select in (got a per-head {edge_index!r})"
            )
        return edge_index.edges()
    return edge_index


def _select_in_sequences(
    who: object, q: Tensor, k: Tensor, edge_index: object, select: Callable[[list[int]], tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor]:
    """``select(lengths)`` (a per-head graph) on the sequences of the given graph, then kept to that graph."""
    src, dst = _allowed_graph(who, q, k, edge_index)
    chosen_index, chosen_head = select(_sequence_lengths(src, dst, q.size(0)))
    return _within(chosen_index, chosen_head, src, dst, max(k.size(0), 1))


@dataclass(frozen=True)
class TopK:
    r"""Top-k selection as a layer's ``select``: every query head keeps its ``num_keys`` best allowed keys.

    ``TopK(num_keys)(q, k, edge_index)`` is ``topk(q, k, num_keys, allowed=edge_index)``: the
    candidates of query ``i`` are the sources of its edges in ``edge_index`` (any graph, cross
    attention included), so the result is a subset of it for every head.

    Args:
        num_keys: keys kept per query and head, ``>= 1``.
        causal: only keys ``j <= i + N_k - N_q`` (node indices, aligned at the end): in a
            self-attention graph ``j <= i`` (within a sequence of a batch graph, the same as local
            positions); under a key/value cache, whose ``N_k`` keys end with the step's ``N_q``
            queries (:class:`~gnn_transformer.decoding.KVCache`), a query's own node and those
            before it. Default ``False``.

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
        """``(edge_index [2, E], edge_head [E])``, sorted by (head, target, source). A
        self-attention graph of exactly full or causal sequences is scored by blocks of queries
        (:func:`topk` with ``lengths``), without a score per edge of the graph."""
        edges = None
        if q.size(0) == k.size(0) and q.size(0) > 0:
            kind, lengths, edges = _dense_graph(self, q, k, edge_index)
            if kind is not None:
                return topk(q, k, self.num_keys, lengths=lengths, causal=self.causal or kind == "causal")
        src, dst = edges if edges is not None else _allowed_graph(self, q, k, edge_index, self_attention=False)
        if self.causal:  # aligned at the end: a cache's keys end with the step's queries
            keep = src <= dst + (k.size(0) - q.size(0))
            src, dst = src[keep], dst[keep]
        return topk(q, k, self.num_keys, allowed=torch.stack([src, dst]))


@dataclass(frozen=True)
class BlockTopK:
    r"""Block selection (MoBA) as a layer's ``select``: :func:`block_topk` on the graph's sequences,
    kept to the graph.

    The sequences are those of :func:`sequence_lengths` of the given graph (a self-attention graph:
    as many queries as keys); blocks are cut from the start of each. A sequence shorter than
    ``block_size`` is one block. The edges :func:`block_topk` selects are then kept only where the
    given graph has them (the intersection, per head).

    :meth:`implicit` gives the same selection as a per-head
    :class:`~gnn_transformer.topology.BlockGraph` (no edge list) when the given graph holds every
    pair the selection can choose (full attention per sequence, or causal with ``causal=True``);
    a layer with ``select=BlockTopK(...)`` then runs the tiled kernels on it.

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

    def implicit(self, q: Tensor, k: Tensor, edge_index: object) -> BlockGraph | None:
        """The selection of ``__call__`` as a per-head :class:`~gnn_transformer.topology.BlockGraph`,
        or ``None`` when the given graph may remove some of its edges (the intersection then needs
        the edges): it must be exactly full attention per sequence, or causal with ``causal=True``
        (a ``BlockGraph`` that says so, or an edge list of exactly those pairs).

        Example:
            >>> from gnn_transformer import topology as T
            >>> q = k = torch.ones(6, 1, 2)
            >>> g = BlockTopK(2, 0, causal=True).implicit(q, k, T.causal([2, 4], implicit=True))
            >>> g.edges()[0].tolist() == BlockTopK(2, 0, causal=True)(q, k, T.causal([2, 4]))[0].tolist()
            True
        """
        kind, lengths, _ = _dense_graph(self, q, k, edge_index)
        if kind is None or (kind == "causal" and not self.causal) or q.size(0) == 0:
            return None
        block_size = min(self.block_size, max(max(lengths), 1))
        return block_topk(q, k, block_size, self.num_blocks, causal=self.causal, lengths=lengths, implicit=True)


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
            return lsh(
                q,
                k,
                self.num_buckets,
                num_hashes=self.num_hashes,
                chunk_size=self.chunk_size,
                seed=self.seed,
                causal=self.causal,
                lengths=lengths,
            )

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

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_clusters: int,
        *,
        decay: float = 0.999,
        seed: int = 0,
        causal: bool = False,
    ) -> None:
        super().__init__()
        check_int("num_heads", num_heads, 1)
        check_int("head_dim", head_dim, 1)
        check_int("num_clusters", num_clusters, 1)
        self.decay = check_real("decay", decay, 0.0, 1.0)
        self.seed = check_seed("seed", seed)
        self.causal = check_bool("causal", causal)
        generator = torch.Generator().manual_seed(seed)
        centroids = torch.randn(num_heads, num_clusters, head_dim, generator=generator)
        self.register_buffer("centroids", F.normalize(centroids, dim=-1))

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        edge_index: Tensor | None = None,
        *,
        causal: bool | None = None,
        batch: Tensor | None = None,
        lengths: Lengths | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Select with :func:`routing` (within ``edge_index`` when given); update the centroids in
        training mode."""
        causal = self.causal if causal is None else causal
        if edge_index is None:
            return self._route(q, k, causal, batch=batch, lengths=lengths)
        if batch is not None or lengths is not None:
            given = "batch" if batch is not None else "lengths"
            raise ValueError(
                f"Expected no '{given}' with 'edge_index': the sequences are those of the graph "
                f"(got {given}={batch if batch is not None else lengths!r})"
            )
        return _select_in_sequences(self, q, k, edge_index, lambda lens: self._route(q, k, causal, lengths=lens))

    def _route(
        self, q: Tensor, k: Tensor, causal: bool, *, batch: Tensor | None = None, lengths: Lengths | None = None
    ) -> tuple[Tensor, Tensor]:
        return routing(
            q, k, self.centroids, causal=causal, batch=batch, lengths=lengths, update=self.training, decay=self.decay
        )

    def extra_repr(self) -> str:
        H, K, D = self.centroids.shape
        return (
            f"num_heads={H}, head_dim={D}, num_clusters={K}, decay={self.decay}, seed={self.seed}"
            f"{', causal=True' if self.causal else ''}"
        )
