"""The slow twin of every backend: per-edge message passing in plain PyTorch Geometric.

It materializes ``[E, H, D]`` messages, exactly like the layer's ``pyg`` path, and exists so that
tests can compare each fast backend with it (and with a dense masked softmax).

Notation: ``E`` edges, ``N_src`` / ``N_dst`` source / target nodes, ``H`` query heads, ``H_kv`` key /
value heads, ``D`` head dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.utils import scatter, softmax

from .primitives import finite_or_zero, plain_tensor, total_or_one


def edge_softmax(score: Tensor, index: Tensor, ptr: Tensor | None = None, num_nodes: int | None = None) -> Tensor:
    """PyG's ``softmax`` of ``score [E, H]`` over the edges of each target ``index``, where a ``-inf``
    score removes its edge: a target whose edges are all removed is an empty row (zero weights and
    gradients, as on every backend), not ``exp(-inf - (-inf)) = NaN``. Only those rows are
    touched; a removed edge in a row with others weighs 0 as it is (even beside scores of
    ``finfo.min``, the Hugging Face masking value)."""
    removed = torch.isneginf(score)  # [E, H]
    if not bool(removed.any()):
        return softmax(score, index, ptr, num_nodes)
    size = int(index.max()) + 1 if num_nodes is None else num_nodes
    alive = torch.zeros(size, score.size(1), dtype=torch.bool, device=score.device)
    alive = alive.index_put((index,), ~removed, accumulate=True)  # [N, H]: a kept edge
    dead = ~alive[index]  # [E, H]: every edge of the row removed
    return softmax(score.masked_fill(dead, 0.0), index, ptr, num_nodes).masked_fill(dead, 0.0)


def edge_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    src: Tensor,
    dst: Tensor,
    *,
    scale: float,
    edge_bias: Tensor | None = None,
    edge_scale: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``out [N_dst, H, D]`` over the edges ``src[e] -> dst[e]`` (with ``return_lse`` also ``lse
    [N_dst, H]``, float32, float64 for float64 inputs, ``-inf`` on empty rows), per-edge messages
    in operations autograd differentiates to every order; ``edge_scale [E, H]`` multiplies the
    softmax weights (attention dropout's keep scales)."""
    num_dst, num_heads = query.size(0), query.size(1)
    group = num_heads // key.size(1)
    query_i = query[dst]  # [E, H, D]
    key_j = key[src].repeat_interleave(group, dim=1)  # [E, H, D]
    value_j = value[src].repeat_interleave(group, dim=1)  # [E, H, D]
    score = (query_i * key_j).sum(dim=-1) * scale  # [E, H]
    if edge_bias is not None:
        score = score + edge_bias
    alpha = edge_softmax(score, dst, num_nodes=num_dst)  # [E, H]
    if edge_scale is not None:
        alpha = alpha * edge_scale
    out = scatter(alpha.unsqueeze(-1) * value_j, dst, dim=0, dim_size=num_dst, reduce="sum")  # [N_dst, H, D]
    if not return_lse:
        return out
    score = score.float() if score.dtype != torch.float64 else score
    index = dst.unsqueeze(-1).expand_as(score)  # [E, H]
    top = torch.full((num_dst, num_heads), float("-inf"), dtype=score.dtype, device=score.device)
    top = finite_or_zero(top.scatter_reduce(0, index, score.detach(), reduce="amax"))  # [N_dst, H]
    total = torch.zeros_like(top).index_add(0, dst, torch.exp(score - top[dst]))  # [N_dst, H]
    # -inf on empty rows, differentiable elsewhere (``top`` cancels out)
    lse = torch.where(total > 0, top + torch.log(total_or_one(total)), float("-inf"))
    return out, lse


def attend_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    edge_index: Tensor,
    *,
    scale: float,
    edge_bias: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``out_i = sum_j softmax_j(scale * q_i . k_j + b_ji) v_j`` over the edges ``j -> i``."""
    plain = plain_tensor(edge_index)
    src, dst = plain[0].long(), plain[1].long()  # [E], [E]
    return edge_attention(query, key, value, src, dst, scale=scale, edge_bias=edge_bias, return_lse=return_lse)
