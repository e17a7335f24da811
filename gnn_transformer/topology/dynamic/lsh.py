"""Angular LSH buckets (Reformer, Kitaev et al., 2020, arXiv:2001.04451): sorted chunks attend to their
own and the previous chunk."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from .._common import Lengths, check_bool, check_edges, check_int, check_seed, expand_ranges
from ._common import check_qk, detached_scores_dtype, no_edges, sequence_pairs, token_layout


def _bucket_order(x: Tensor, rotation: Tensor, seq: Tensor, num_buckets: int) -> Tensor:
    """Permutation sorting tokens by (sequence, bucket, position); ``x`` ``[N, D]`` normalized."""
    xr = x @ rotation  # [N, num_buckets // 2]
    bucket = torch.cat([xr, -xr], dim=-1).argmax(-1)  # [N]
    return torch.argsort(seq * num_buckets + bucket, stable=True)


@torch.no_grad()
def lsh(
    q: Tensor,
    k: Tensor,
    num_buckets: int,
    *,
    num_hashes: int = 1,
    chunk_size: int = 64,
    seed: int = 0,
    causal: bool = False,
    batch: Tensor | None = None,
    lengths: Lengths | None = None,
) -> tuple[Tensor, Tensor]:
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
    H, g = check_qk(q, k)
    check_int("num_buckets", num_buckets, 2)
    if num_buckets % 2:
        raise ValueError(f"Expected 'num_buckets' to be even (got {num_buckets})")
    check_int("num_hashes", num_hashes, 1)
    check_int("chunk_size", chunk_size, 1)
    check_seed("seed", seed)
    check_bool("causal", causal)
    lens, _ = sequence_pairs("lsh", q, k, batch, lengths)
    device, (n, _, D), H_kv = q.device, q.shape, k.size(1)
    chunk_size = min(chunk_size, max(max(lens, default=0), 1))  # a longer chunk holds the same positions
    check_edges("lsh", H * num_hashes * sum(L * min(L, 2 * chunk_size) for L in lens), n=lens)
    if n == 0:
        return no_edges(device)
    q, k = F.normalize(detached_scores_dtype(q), dim=-1), F.normalize(detached_scores_dtype(k), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    rotations = torch.randn(num_hashes, H_kv, D, num_buckets // 2, generator=generator, dtype=torch.float64)
    rotations = rotations.to(device=device, dtype=q.dtype)  # [R, H_kv, D, num_buckets // 2]
    seq, pos, offset, length = token_layout(lens, device)
    # the same in every round and head: sorted query position p reads sorted key positions [lo, hi)
    c = pos // chunk_size  # [N] sorted chunk of each sorted position
    lo = offset + (c - 1).clamp(min=0) * chunk_size
    hi = offset + torch.minimum((c + 1) * chunk_size, length)
    sorted_q, sorted_k = expand_ranges(lo, hi - lo)  # [M] sorted positions
    key_order = [
        [_bucket_order(k[:, x], rotations[r, x], seq, num_buckets) for x in range(H_kv)] for r in range(num_hashes)
    ]
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
    edge_head, code = torch.cat(heads), torch.cat(keys)
    return torch.stack([code % n, code // n]), edge_head
