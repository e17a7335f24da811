r"""Measures of attention graphs and hidden states: pure functions of tensors.

An attention graph is ``edge_index`` ``[2, E]`` (row 0 the source ``j``, the key; row 1 the target
``i``, the query) with weights ``alpha`` ``[E, H]`` that sum to 1 over the incoming edges of each
target. Attention *received* by a token is therefore a sum over its **outgoing** edges:

.. math::

    r_j^h = \sum_{i : (j \to i) \in E} \alpha_{ji}^h .

Notation: ``N`` nodes (``N_src`` keys, ``N_dst`` queries), ``E`` edges, ``H`` heads, ``C`` features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def _plain(edge_index: Tensor) -> Tensor:
    return edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index


def _check_graph(edge_index: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Validate an attention graph; return a plain ``[2, E]`` index and ``[E, H]`` weights."""
    if not isinstance(edge_index, Tensor) or edge_index.dim() != 2 or edge_index.size(0) != 2:
        shape = list(edge_index.shape) if isinstance(edge_index, Tensor) else type(edge_index).__name__
        raise ValueError(f"Expected 'edge_index' to have shape [2, E] (got {shape})")
    if not isinstance(weights, Tensor) or weights.dim() not in (1, 2):
        shape = list(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"Expected 'weights' to have shape [E, H] or [E] (got {shape})")
    if weights.size(0) != edge_index.size(1):
        raise ValueError(
            f"Expected 'weights' to have one row per edge ({edge_index.size(1)} edges, got {weights.size(0)} rows)"
        )
    if edge_index.is_floating_point() or edge_index.is_complex() or edge_index.dtype == torch.bool:
        raise ValueError(f"Expected 'edge_index' to hold integers (got {edge_index.dtype})")
    if edge_index.numel() and int(edge_index.min()) < 0:
        raise ValueError(f"Expected 'edge_index' to hold non-negative node indices (got {int(edge_index.min())})")
    weights = weights.unsqueeze(-1) if weights.dim() == 1 else weights  # [E, H]
    return _plain(edge_index).to(weights.device).long(), weights


def _num_nodes(edge_index: Tensor, num_nodes: int | None, row: int | None, name: str) -> int:
    """``num_nodes``, checked to exceed every index of ``edge_index[row]`` (both rows if ``None``),
    else the largest such index + 1."""
    index = edge_index if row is None else edge_index[row]
    needed = int(index.max()) + 1 if index.numel() else 0
    if num_nodes is None:
        return needed
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < needed:
        raise ValueError(
            f"Expected '{name}' to be an int >= {needed} (largest node index of 'edge_index' + 1) (got {num_nodes!r})"
        )
    return num_nodes


def _check_float(weights: Tensor) -> None:
    if not weights.is_floating_point():
        raise ValueError(f"Expected floating-point 'weights' (got {weights.dtype})")


def degree_per_head(nodes: Tensor, weights: Tensor, n: int, edge_head: Tensor | None = None) -> Tensor:
    """Edges at each node per head, ``[n, H]``: ``nodes`` is a row of ``edge_index`` (row 0: the
    queries reading each key; row 1: the keys each query reads). Every edge counts for every head
    of ``weights`` ``[E, H]``, or with ``edge_head`` (a per-head graph) for its own head only."""
    H = weights.size(1)
    nodes = _plain(nodes).to(weights.device).long()
    if edge_head is None:
        return torch.bincount(nodes, minlength=n).unsqueeze(-1).expand(n, H)
    bad = not isinstance(edge_head, Tensor) or edge_head.dim() != 1 or edge_head.size(0) != nodes.size(0)
    if bad or edge_head.is_floating_point() or edge_head.is_complex() or edge_head.dtype == torch.bool:
        got = (
            f"{edge_head.dtype} {list(edge_head.shape)}" if isinstance(edge_head, Tensor) else type(edge_head).__name__
        )
        raise ValueError(f"Expected 'edge_head' to be an integer tensor [E] with E={nodes.size(0)} (got {got})")
    edge_head = edge_head.to(weights.device).long()
    if edge_head.numel() and not (0 <= int(edge_head.min()) and int(edge_head.max()) < H):
        raise ValueError(
            f"Expected 'edge_head' in [0, {H}) (the columns of 'weights'), got values in "
            f"[{int(edge_head.min())}, {int(edge_head.max())}]"
        )
    degree = torch.zeros(n * H, dtype=torch.long, device=weights.device)
    return degree.index_add_(0, nodes * H + edge_head, torch.ones_like(edge_head)).view(n, H)


# ------------------------------------------------------------------ attention received, sinks
def received_attention(
    edge_index: Tensor,
    weights: Tensor,
    num_src: int | None = None,
    *,
    normalize: bool = False,
    edge_head: Tensor | None = None,
) -> Tensor:
    r"""Total attention each key receives, :math:`r_j^h = \sum_i \alpha_{ji}^h` (its out-strength).

    Args:
        edge_index: ``[2, E]``, row 0 the key ``j``, row 1 the query ``i``.
        weights: attention weights ``[E, H]`` (or ``[E]``).
        num_src: number of key nodes (default: largest source index + 1).
        normalize: divide by the number of queries that may attend to each key (its out-degree),
            giving the mean attention a key receives from the queries that see it, in ``[0, 1]``.
        edge_head: ``[E]``, the head of each edge of a per-head graph (its weight in that column,
            0 in the others, as :class:`~gnn_transformer.analysis.AttentionGraph` records it): with
            ``normalize``, a key's queries are counted per head, over that head's edges.

    Returns:
        ``[N_src, H]``; keys with no outgoing edge receive 0.

    Example:
        >>> from gnn_transformer.topology import causal
        >>> alpha = torch.tensor([[1.0], [0.9], [0.1], [0.8], [0.1], [0.1]])  # 3 causal tokens
        >>> received_attention(causal(3), alpha).flatten().tolist()
        [2.700000047683716, 0.20000000298023224, 0.10000000149011612]
    """
    edge_index, weights = _check_graph(edge_index, weights)
    n = _num_nodes(edge_index, num_src, 0, "num_src")
    out = weights.new_zeros(n, weights.size(1)).index_add_(0, edge_index[0], weights)  # [N_src, H]
    if normalize:
        out = out / degree_per_head(edge_index[0], weights, n, edge_head).clamp(min=1).to(weights.dtype)  # [N_src, H]
    return out


def first_tokens(num_nodes: int, batch: Tensor | None = None) -> Tensor:
    """Boolean ``[N]``: ``True`` at the first node of each sequence of a batch (node 0 if no batch).

    ``batch`` is a PyG ``batch`` vector: integers, sorted (each sequence's nodes contiguous)."""
    if batch is None:
        is_first = torch.zeros(num_nodes, dtype=torch.bool)
        if num_nodes:
            is_first[0] = True
        return is_first
    if not isinstance(batch, Tensor) or batch.is_floating_point() or batch.is_complex() or batch.dtype == torch.bool:
        got = getattr(batch, "dtype", type(batch).__name__)
        raise ValueError(f"Expected 'batch' to be an integer tensor (got {got})")
    batch = batch.reshape(-1)
    if batch.numel() != num_nodes:
        raise ValueError(f"Expected 'batch' to have one entry per node ({num_nodes}, got {batch.numel()})")
    if batch.numel() > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError(
            f"Expected a sorted 'batch' (each sequence's nodes contiguous, as PyG "
            f"batches are) (got {batch.tolist()[:20]})"
        )
    is_first = torch.ones_like(batch, dtype=torch.bool)
    is_first[1:] = batch[1:] != batch[:-1]
    return is_first


def sink_scores(
    edge_index: Tensor, weights: Tensor, batch: Tensor | None = None, *, num_src: int | None = None
) -> Tensor:
    r"""Share of all attention that lands on the first token of each sequence, per head.

    .. math::

        \mathrm{sink}^h = \frac{\sum_{(j \to i) : j \text{ first}} \alpha_{ji}^h}
                               {\sum_{(j \to i)} \alpha_{ji}^h}

    that is, the mean over queries (with at least one key) of the weight they put on their
    sequence's first token. ``1/L`` on a uniform full graph of length ``L``; near 1 for a sink.

    Args:
        edge_index: ``[2, E]``; weights: ``[E, H]``.
        batch: sequence id of every *key* node ``[N_src]`` (PyG ``batch`` vector: integers,
            sorted, so a sequence's first token is its first node); default one sequence whose
            first token is node 0. An unsorted ``batch`` is refused.
        num_src: number of key nodes (default from ``batch`` or ``edge_index``).

    Returns:
        ``[H]`` in ``[0, 1]`` (0 for a graph without edges; NaN where the weights are not finite).

    Example:
        >>> from gnn_transformer.topology import full
        >>> sink_scores(full(4), torch.full((16, 2), 0.25)).tolist()
        [0.25, 0.25]
    """
    edge_index, weights = _check_graph(edge_index, weights)
    if batch is not None and num_src is None and isinstance(batch, Tensor):
        needed = _num_nodes(edge_index, None, 0, "num_src")
        if batch.numel() < needed:
            raise ValueError(
                f"Expected 'batch' to have one entry per key node (sources up to index "
                f"{needed - 1}, got {batch.numel()} entries)"
            )
        n = batch.numel()
    else:
        n = _num_nodes(edge_index, num_src, 0, "num_src")
    is_first = first_tokens(n, None if batch is None else batch.cpu()).to(weights.device)  # [N_src]
    on_first = weights[is_first[edge_index[0]]].sum(dim=0)  # [H]
    total = weights.sum(dim=0)  # [H]
    # a head without attention scores 0; non-finite weights give a non-finite score, never 0
    return torch.where(total != 0, on_first / total, torch.zeros_like(total))


def find_sinks(
    edge_index: Tensor,
    weights: Tensor,
    num_src: int | None = None,
    *,
    threshold: float = 0.5,
    edge_head: Tensor | None = None,
) -> Tensor:
    """Keys that draw, on average, more than ``threshold`` of the attention of the queries that see
    them (``received_attention(..., normalize=True) > threshold``), as a boolean ``[N_src, H]``;
    on a per-head graph (``edge_head``, as in :func:`received_attention`) each head's queries are
    those of its own edges.

    Keys seen by a single query (the last token of a causal graph, which only attends to itself
    there) are left out: drawing the attention of one query says nothing about sinks.
    """
    edge_index, weights = _check_graph(edge_index, weights)
    n = _num_nodes(edge_index, num_src, 0, "num_src")
    mean = received_attention(edge_index, weights, n, normalize=True, edge_head=edge_head)  # [N_src, H]
    return (mean > threshold) & (degree_per_head(edge_index[0], weights, n, edge_head) > 1)


def attention_entropy(edge_index: Tensor, weights: Tensor, num_dst: int | None = None) -> Tensor:
    r"""Entropy of each query's attention distribution, :math:`-\sum_j \alpha_{ji} \log \alpha_{ji}`.

    Returns ``[N_dst, H]`` in nats: 0 when a query attends to a single key, ``log(deg)`` when
    uniform; 0 for a query without keys.
    """
    edge_index, weights = _check_graph(edge_index, weights)
    n = _num_nodes(edge_index, num_dst, 1, "num_dst")
    terms = -torch.special.xlogy(weights, weights)  # [E, H], 0 log 0 = 0
    return weights.new_zeros(n, weights.size(1)).index_add_(0, edge_index[1], terms)  # [N_dst, H]


# ------------------------------------------------------------------ centrality
def _transition_sums(edge_index: Tensor, weights: Tensor, n: int) -> Tensor:
    return weights.new_zeros(n, weights.size(1)).index_add_(0, edge_index[1], weights)  # [N, H]


def attention_pagerank(
    edge_index: Tensor,
    weights: Tensor,
    num_nodes: int | None = None,
    *,
    damping: float = 0.85,
    tol: float = 1e-10,
    max_iter: int = 1000,
) -> Tensor:
    r"""PageRank of the walk that follows attention: from a query to a key with probability
    :math:`\alpha_{ji}` (edge ``j -> i`` read backwards), with uniform teleportation.

    .. math::

        \pi_j = \frac{1 - d}{N} + d \Big( \sum_{i : j \to i} \pi_i \frac{\alpha_{ji}}{s_i}
                + \frac{1}{N} \sum_{i : s_i = 0} \pi_i \Big), \qquad s_i = \sum_{j'} \alpha_{j'i}

    Keys that many (important) queries attend to rank high: attention sinks are its top nodes.
    This is ``networkx.pagerank`` of the *reversed* attention graph (weights on edges ``i -> j``);
    queries without keys are dangling nodes whose rank is spread uniformly, as in networkx.

    Args:
        edge_index: ``[2, E]`` of a self-attention graph; weights: ``[E, H]`` (or ``[E]``).
        num_nodes: ``N`` (default from ``edge_index``).
        damping: ``d``. Default ``0.85``.
        tol: stop when the L1 change of every head is below ``N * tol``.
        max_iter: iteration limit.

    Returns:
        ``[N, H]``, each column summing to 1 (dtype of ``weights``, which must be floating point;
        computed in float64).

    Example:
        >>> from gnn_transformer.topology import full
        >>> attention_pagerank(full(2), torch.tensor([[0.9], [0.1], [0.9], [0.1]])).flatten()
        tensor([0.8400, 0.1600])
    """
    edge_index, weights = _check_graph(edge_index, weights)
    if not 0.0 <= damping < 1.0:
        raise ValueError(f"Expected 'damping' in [0, 1) (got {damping})")
    _check_float(weights)
    n = _num_nodes(edge_index, num_nodes, None, "num_nodes")
    w = weights.to(torch.float64)
    heads = w.size(1)
    if n == 0:
        return weights.new_zeros(0, heads)
    s = _transition_sums(edge_index, w, n)  # [N, H] total weight leaving each query
    p = w / s[edge_index[1]].clamp(min=1e-300)  # [E, H] transition probability query -> key
    dangling = s <= 0  # [N, H]
    rank = w.new_full((n, heads), 1.0 / n)  # [N, H]
    for _ in range(max_iter):
        spread = (rank * dangling).sum(dim=0, keepdim=True) / n  # [1, H]
        flow = w.new_zeros(n, heads).index_add_(0, edge_index[0], p * rank[edge_index[1]])
        new = (1.0 - damping) / n + damping * (flow + spread)  # [N, H]
        change = (new - rank).abs().sum(dim=0)  # [H]
        rank = new
        if bool((change < n * tol).all()):
            break
    return (rank / rank.sum(dim=0, keepdim=True)).to(weights.dtype)


def attention_hits(
    edge_index: Tensor, weights: Tensor, num_nodes: int | None = None, *, tol: float = 1e-10, max_iter: int = 1000
) -> tuple[Tensor, Tensor]:
    r"""HITS hub and authority scores of the attention graph (edges ``j -> i``, weights
    :math:`\alpha_{ji}`): with ``A[j, i] = alpha_ji``, hubs are the principal eigenvector of
    :math:`A A^\top` and authorities of :math:`A^\top A`.

    Hubs are *keys* whose weight goes to many queries (sinks score high); authorities are
    *queries* fed by strong hubs. Same as ``networkx.hits`` on the attention graph when the
    principal eigenvalue is simple (e.g. a connected full or causal graph).

    Returns:
        ``(hubs, authorities)``, each ``[N, H]`` with columns summing to 1 (dtype of the
        floating-point ``weights``).
    """
    edge_index, weights = _check_graph(edge_index, weights)
    _check_float(weights)
    n = _num_nodes(edge_index, num_nodes, None, "num_nodes")
    w = weights.to(torch.float64)
    heads = w.size(1)
    if n == 0:
        empty = weights.new_zeros(0, heads)
        return empty, empty
    src, dst = edge_index[0], edge_index[1]
    hubs = w.new_full((n, heads), 1.0 / n)  # [N, H]
    auth = hubs
    for _ in range(max_iter):
        auth = w.new_zeros(n, heads).index_add_(0, dst, w * hubs[src])  # A^T h
        new = w.new_zeros(n, heads).index_add_(0, src, w * auth[dst])  # A a
        new = new / new.abs().amax(dim=0, keepdim=True).clamp(min=1e-300)
        change = (new - hubs).abs().sum(dim=0)
        hubs = new
        if bool((change < n * tol).all()):
            break
    auth = w.new_zeros(n, heads).index_add_(0, dst, w * hubs[src])
    hubs = hubs / hubs.sum(dim=0, keepdim=True).clamp(min=1e-300)
    auth = auth / auth.sum(dim=0, keepdim=True).clamp(min=1e-300)
    return hubs.to(weights.dtype), auth.to(weights.dtype)


# ------------------------------------------------------------------ massive activations
@dataclass(frozen=True)
class ActivationStats:
    """Magnitude profile of one hidden state ``[N, C]``.

    Attributes:
        max_abs: largest ``|h|``.
        median_abs: median ``|h|`` over all tokens and dimensions (the mean of the two middle
            values for an even count, as ``numpy.median``).
        ratio: ``max_abs / median_abs``.
        token, dim: where ``max_abs`` sits (row, column).
        top: the ``k`` largest magnitudes as ``(value, token, dim)``, value signed.
    """

    max_abs: float
    median_abs: float
    ratio: float
    token: int
    dim: int
    top: tuple[tuple[float, int, int], ...]


def _as_rows(hidden: Tensor) -> Tensor:
    if not isinstance(hidden, Tensor) or hidden.dim() < 1:
        raise ValueError(f"Expected 'hidden' to be a tensor [N, C] (got {hidden!r})")
    return hidden.detach().reshape(-1, hidden.size(-1)) if hidden.dim() != 2 else hidden.detach()


def _median(values: Tensor) -> float:
    """Median of a 1-D tensor: the mean of the two middle values for an even count, NaN when any
    value is NaN (``numpy.median``)."""
    if bool(values.isnan().any()):
        return float("nan")
    n = values.numel()
    low, high = values.kthvalue((n + 1) // 2).values, values.kthvalue(n // 2 + 1).values
    return (float(low) + float(high)) / 2


def activation_stats(hidden: Tensor, k: int = 3) -> ActivationStats:
    """Largest magnitudes of a hidden state against its median (Sun et al., 2024); ``top`` holds
    the ``k >= 1`` largest.

    Example:
        >>> h = torch.ones(3, 4); h[1, 2] = -500.0
        >>> s = activation_stats(h, k=1)
        >>> s.ratio, s.token, s.dim, s.top
        (500.0, 1, 2, ((-500.0, 1, 2),))
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Expected 'k' to be a positive int (got {k!r})")
    h = _as_rows(hidden)  # [N, C]
    if h.numel() == 0:
        raise ValueError(f"Expected a non-empty 'hidden' (got shape {list(hidden.shape)})")
    mag = h.abs().flatten().float()  # [N C]
    median = _median(mag)
    values, flat = mag.topk(min(k, mag.numel()))
    c = h.size(1)
    top = tuple((float(h.flatten()[f]), int(f) // c, int(f) % c) for f in flat.tolist())
    max_abs = float(values[0])
    if math.isnan(max_abs) or math.isnan(median):
        ratio = math.nan
    else:
        ratio = max_abs / median if median > 0 else (math.inf if max_abs > 0 else 1.0)
    return ActivationStats(max_abs, median, ratio, top[0][1], top[0][2], top)


def massive_activations(
    hidden: Tensor, *, min_magnitude: float = 100.0, min_ratio: float = 1000.0
) -> list[tuple[int, int, float]]:
    """Entries of a hidden state that are *massive*: ``|h| > min_magnitude`` and
    ``|h| > min_ratio * median |h|`` (median as ``numpy.median``; the criterion of Sun et al., 2024,
    "Massive Activations in Large Language Models").

    Returns:
        ``(token, dim, value)`` triples, largest magnitude first.

    Example:
        >>> h = torch.randn(4, 8) * 0.1; h[0, 3] = 250.0
        >>> massive_activations(h)
        [(0, 3, 250.0)]
    """
    for name, value in (("min_magnitude", min_magnitude), ("min_ratio", min_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"Expected '{name}' to be a non-negative number (got {value!r})")
    h = _as_rows(hidden)
    mag = h.abs().float()  # [N, C]
    if mag.numel() == 0:
        return []
    median = _median(mag.flatten())
    hit = (mag > min_magnitude) & (mag > min_ratio * median)
    tokens, dims = hit.nonzero(as_tuple=True)
    order = mag[tokens, dims].argsort(descending=True)
    return [(int(tokens[o]), int(dims[o]), float(h[tokens[o], dims[o]])) for o in order]
