"""Routing attention (Routing Transformer, Roy et al., 2021, arXiv:2003.05997): attention within online
k-means clusters."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from .._common import INT64_MAX, Lengths, check_bool, check_edges, expand_ranges
from ._common import check_qk, check_real, detached_scores_dtype, sequence_pairs, token_layout


ASSIGN_CHUNK = 4096  # tokens assigned to clusters at a time by routing (scores [ASSIGN_CHUNK, H, K])


def _check_centroids(centroids: object, H: int, D: int, device: torch.device) -> Tensor:
    """Validate ``centroids`` ``[H, K, D]``."""
    if (
        not isinstance(centroids, Tensor)
        or centroids.dim() != 3
        or centroids.size(0) != H
        or centroids.size(2) != D
        or centroids.size(1) < 1
    ):
        shape = tuple(centroids.shape) if isinstance(centroids, Tensor) else type(centroids).__name__
        raise ValueError(f"Expected 'centroids' of shape [H={H}, K >= 1, D={D}] (got {shape})")
    if not centroids.is_floating_point():
        raise ValueError(f"Expected 'centroids' to be a floating-point tensor (got dtype {centroids.dtype})")
    if centroids.device != device:
        raise ValueError(f"Expected 'centroids' on the device of 'q' ({device}) (got {centroids.device})")
    return centroids


def _nearest(x: Tensor, centroids: Tensor) -> Tensor:
    """Cluster ``[N, H]`` of normalized ``x`` ``[N, H, D]`` under normalized centroids ``[H, K, D]``."""
    return torch.cat(
        [
            torch.einsum("nhd,hkd->nhk", x[s : s + ASSIGN_CHUNK], centroids).argmax(-1)
            for s in range(0, x.size(0), ASSIGN_CHUNK)
        ]
        or [x.new_empty(0, x.size(1), dtype=torch.long)]
    )


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
def routing(
    q: Tensor,
    k: Tensor,
    centroids: Tensor,
    *,
    causal: bool = False,
    batch: Tensor | None = None,
    lengths: Lengths | None = None,
    update: bool = False,
    decay: float = 0.999,
) -> tuple[Tensor, Tensor]:
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
    H, g = check_qk(q, k)
    _check_centroids(centroids, H, q.size(2), q.device)
    check_bool("causal", causal)
    check_bool("update", update)
    decay = check_real("decay", decay, 0.0, 1.0)
    lens, _ = sequence_pairs("routing", q, k, batch, lengths)
    device, n, K, B = q.device, q.size(0), centroids.size(1), max(len(lens), 1)
    if H * B * K * (n + 1) > INT64_MAX:
        raise ValueError(
            f"Expected H * sequences * K * (N + 1) <= 2**63 - 1 (got {H} heads, {B} sequences, K={K}, N={n})"
        )
    q, k = F.normalize(detached_scores_dtype(q), dim=-1), F.normalize(detached_scores_dtype(k), dim=-1)
    k = k.repeat_interleave(g, dim=1)  # [N, H, D]: key head h // g under query head h
    mu = F.normalize(centroids.detach().to(q.dtype), dim=-1)  # [H, K, D]
    cq, ck = _nearest(q, mu), _nearest(k, mu)  # [N, H] clusters
    # -- count: keys sorted by code (head, sequence, cluster, index), each row a range of them --
    seq, _, _, _ = token_layout(lens, device)
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
