"""Dense multi-head attention: padded ``[B, T, C]`` inputs, a dense mask, explicit softmax.

Mask polarity is that of ``scaled_dot_product_attention``: ``mask[b, i, j] == True`` means query
``i`` may attend to key ``j`` (edge ``j -> i``). A query row with no allowed key gets weights zero
and attention output zero, as on the graph path.

Notation: ``B`` batch, ``T_q``/``T_k`` query/key positions, ``H`` heads, ``H_kv`` key/value heads,
``D`` head dimension, ``C`` model dimension.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..topology._common import check_cells


def scaled_dot_product(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor,
    *,
    scale: float | None = None,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Masked softmax attention on ``[B, H, T_q, D]`` queries and ``[B, H_kv, T_k, D]`` keys/values.

    Args:
        mask: boolean ``[T_q, T_k]``, ``[B, T_q, T_k]``, or per head ``[B, H, T_q, T_k]`` (``B`` may
            be 1: a per-head graph's ``to_dense_mask(..., edge_head=...)[None]``), ``True`` where
            attention is allowed; a row without an allowed key (of a head) gives zeros.
        scale: the factor of the scores ``q k^T``. Default ``1 / sqrt(D)``.
        bias: added to the scaled scores, broadcastable to ``[B, H, T_q, T_k]``.
        softcap: scaled scores become ``softcap * tanh(s / softcap)`` before the bias is added.

    Returns:
        ``out`` ``[B, H, T_q, D]`` and ``weights`` ``[B, H, T_q, T_k]``.
    """
    num_heads, num_kv_heads = query.size(1), key.size(1)
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"Expected query heads ({num_heads}) divisible by key heads ({num_kv_heads})")
    key = key.repeat_interleave(num_heads // num_kv_heads, dim=1)  # [B, H, T_k, D]
    value = value.repeat_interleave(num_heads // num_kv_heads, dim=1)  # [B, H, T_k, D]
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if mask.dtype != torch.bool:
        raise ValueError(f"Expected 'mask' to be boolean (got dtype {mask.dtype})")
    if mask.dim() not in (2, 3, 4):
        raise ValueError(
            f"Expected 'mask' of shape [T_q, T_k], [B, T_q, T_k] or [B, H, T_q, T_k] (got {list(mask.shape)})"
        )
    mask = mask.unsqueeze(-3) if mask.dim() == 3 else mask  # [B, 1 or H, T_q, T_k] or [T_q, T_k]
    scores = (query @ key.transpose(-1, -2)) * scale  # [B, H, T_q, T_k]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    has_key = mask.any(dim=-1, keepdim=True)  # [B, 1 or H, T_q, 1]: rows with at least one edge
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~has_key, 0.0)
    weights = torch.softmax(scores, dim=-1) * has_key  # empty rows: all-zero weights
    dropped = F.dropout(weights, p=dropout_p, training=training)
    return dropped @ value, weights  # [B, H, T_q, D], [B, H, T_q, T_k]


def multihead_attention(
    layer, x_query: Tensor, x_key: Tensor, mask: Tensor, *, x_value: Tensor | None = None, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The attention of a :class:`~gnn_transformer.GraphMultiheadAttention` on padded tensors.

    Uses the layer's own parameters (``in_proj_weight``, ``out_proj``, ...), so graph and dense
    paths share one ``state_dict``, and its ``scale`` and ``softcap``.

    Args:
        layer: a ``GraphMultiheadAttention``.
        x_query: ``[B, T_q, C]``; x_key: ``[B, T_k, kdim]``; x_value: ``[B, T_k, vdim]`` (default
            ``x_key``).
        mask: boolean ``[B, T_q, T_k]`` or ``[T_q, T_k]``, ``True`` = may attend.
        bias: ``[B, H, T_q, T_k]`` added to the scaled scores.

    Returns:
        ``out`` ``[B, T_q, C]`` and weights ``[B, H, T_q, T_k]``.
    """
    for name in ("rotary", "q_norm", "k_norm"):
        if getattr(layer, name, None) is not None:
            what = "rope=True" if name == "rotary" else f"a {name}"
            raise ValueError(
                f"multihead_attention takes no positions and no qk-norm; the layer was built with {what}: "
                "use gnn_transformer.dense.attention(layer, ..., pos_query=, pos_key=)"
            )
    x_value = x_key if x_value is None else x_value
    b, t_q, _ = x_query.shape
    t_k = x_key.size(1)
    h, h_kv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    w_q, w_k, w_v = layer.projection_weights()
    b_q, b_k, b_v = layer.projection_biases()
    if w_k is None:
        raise ValueError(
            f"Expected a 'layer' with key/value projections (got {layer!r}, which "
            "reuses another layer's keys and values)"
        )
    query = F.linear(x_query, w_q, b_q).view(b, t_q, h, d).transpose(1, 2)  # [B, H, T_q, D]
    key = F.linear(x_key, w_k, b_k).view(b, t_k, h_kv, d).transpose(1, 2)  # [B, H_kv, T_k, D]
    value = F.linear(x_value, w_v, b_v).view(b, t_k, h_kv, d).transpose(1, 2)  # [B, H_kv, T_k, D]
    scale = getattr(layer, "scale", None)
    out, weights = scaled_dot_product(
        query,
        key,
        value,
        mask,
        scale=1.0 / math.sqrt(d) if scale is None else scale,
        bias=bias,
        dropout_p=layer.dropout,
        training=layer.training,
        softcap=getattr(layer, "softcap", None),
    )
    out = out.transpose(1, 2).reshape(b, t_q, h * d)  # [B, T_q, C]
    return layer.out_proj(out), weights


def edge_values_to_dense(
    edge_index: Tensor,
    values: Tensor,
    lengths_src: Sequence[int],
    lengths_dst: Sequence[int] | None = None,
    fill_value: float = 0.0,
) -> Tensor:
    """Per-edge values ``[E, ...]`` of a batched graph to a padded ``[B, ..., T_q, T_k]`` tensor.

    ``lengths_src`` / ``lengths_dst`` are the sequence lengths of the source / target nodes (equal
    for self-attention). Edges must stay within one sequence.
    """
    lengths_dst = lengths_src if lengths_dst is None else lengths_dst
    ls = torch.as_tensor(list(lengths_src), dtype=torch.long)
    ld = torch.as_tensor(list(lengths_dst), dtype=torch.long)
    ptr_s = torch.cat([ls.new_zeros(1), ls.cumsum(0)])
    ptr_d = torch.cat([ld.new_zeros(1), ld.cumsum(0)])
    edge_index = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    src, dst = edge_index[0].cpu().long().contiguous(), edge_index[1].cpu().long().contiguous()
    seq = torch.bucketize(dst, ptr_d[1:], right=True)  # [E] sequence of each target
    seq_src = torch.bucketize(src, ptr_s[1:], right=True)
    if not torch.equal(seq, seq_src):
        raise ValueError("Found an edge between two different sequences of the batch")
    i, j = dst - ptr_d[seq], src - ptr_s[seq]
    t_q = int(ld.max()) if ld.numel() else 0
    t_k = int(ls.max()) if ls.numel() else 0
    check_cells("edge_values_to_dense", (len(ld), t_q, t_k, *values.shape[1:]))
    out = values.new_full((len(ld), t_q, t_k, *values.shape[1:]), fill_value)
    out[seq.to(values.device), i.to(values.device), j.to(values.device)] = values
    return out.movedim(tuple(range(3, out.dim())), tuple(range(1, out.dim() - 2)))
