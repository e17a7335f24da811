"""Dense counterparts of the graph layers and models, on padded ``[B, T, C]`` tensors and masks.

They read the parameters of the graph modules (same ``state_dict``) and redo the computation with
padded matmuls: projections, qk-norm (the layer's own norm modules), RoPE (:mod:`.position`, partial
with ``rotary_dim``; a layer with ``rope_scaling`` is refused), the score function (softmax, sigmoid, linear;
:mod:`.variants`), residuals and norms, cross-layer KV sharing, embeddings, ALiBi. Masks are
boolean ``[B, T_q, T_k]``, or per head ``[B, H, T_q, T_k]`` (the twin of a per-head graph),
``True`` = may attend. Stacks and models take one mask for every layer or a sequence of one per
layer (the twin of per-layer graphs); biases likewise.

Notation: ``B`` batch, ``T`` positions, ``H`` heads, ``H_kv`` key/value heads, ``D`` head dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import scaled_dot_product
from .position import alibi_bias, apply_rope, sinusoidal_table
from .variants import linear_attention, sigmoid_attention


def _heads(x: Tensor, num_heads: int, head_dim: int) -> Tensor:
    b, t, _ = x.shape
    return x.view(b, t, num_heads, head_dim).transpose(1, 2)  # [B, H, T, D]


def _mlp_in(layer, name: str, x: Tensor) -> Tensor:
    hidden = getattr(layer, f"{name}_hidden", None)  # nonlinear projections (MLPProjectionAttention)
    return x if hidden is None else layer.mlp_activation(hidden(x))


def _rope_positions(pos: Tensor | None, name: str) -> Tensor:
    """``pos``, which a layer built with ``rope=True`` needs."""
    if pos is None:
        raise ValueError(f"Expected '{name}' [B, T] for a layer built with rope=True (got None)")
    return pos


def _rotate(layer, x: Tensor, pos: Tensor | None, name: str) -> Tensor:
    """``x`` ``[B, H, T, D]`` rotated by the layer's RoPE: the first ``rotary_dim`` dimensions of
    each head, with plain frequencies."""
    rotary = layer.rotary
    if rotary is None:
        return x
    if rotary.scaling is not None:
        raise ValueError(
            f"The dense reference rotates with plain RoPE frequencies; {type(layer).__name__} was built "
            f"with a {rotary.scaling.rope_type!r} rope_scaling (its frequencies are checked against "
            "Hugging Face's)"
        )
    r = rotary.rotary_dim
    turned = apply_rope(x[..., :r], _rope_positions(pos, name), rotary.base)
    return turned if r == x.size(-1) else torch.cat([turned, x[..., r:]], dim=-1)


def _norm(layer, name: str, x: Tensor) -> Tensor:
    norm = getattr(layer, name, None)  # qk-norm (Qwen3, Gemma 3): per head, before RoPE
    return x if norm is None else norm(x)


def key_value(layer, x_key: Tensor, *, pos_key: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Keys (normalized with ``k_norm`` and rotated with RoPE) and values ``[B, H_kv, T_k, D]`` of
    an attention layer."""
    _, w_k, w_v = layer.projection_weights()
    _, b_k, b_v = layer.projection_biases()
    if w_k is None:
        raise ValueError(
            f"{type(layer).__name__} was built with project_kv=False and has no "
            "key/value projection: pass keys and values with 'kv='"
        )
    key = _heads(F.linear(_mlp_in(layer, "k", x_key), w_k, b_k), layer.num_kv_heads, layer.head_dim)
    value = _heads(F.linear(_mlp_in(layer, "v", x_key), w_v, b_v), layer.num_kv_heads, layer.head_dim)
    return _rotate(layer, _norm(layer, "k_norm", key), pos_key, "pos_key"), value


def attention(
    layer,
    x_query: Tensor,
    x_key: Tensor,
    mask: Tensor,
    *,
    pos_query: Tensor | None = None,
    pos_key: Tensor | None = None,
    bias: Tensor | None = None,
    kv: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One attention layer (any variant) on padded tensors: ``out`` ``[B, T_q, C]`` and its ``kv``."""
    w_q, _, _ = layer.projection_weights()
    b_q, _, _ = layer.projection_biases()
    query = _heads(F.linear(_mlp_in(layer, "q", x_query), w_q, b_q), layer.num_heads, layer.head_dim)
    query = _rotate(layer, _norm(layer, "q_norm", query), pos_query, "pos_query")
    if kv is None:
        kv = key_value(layer, x_key, pos_key=pos_key)
    group = layer.num_heads // layer.num_kv_heads
    key, value = (t.repeat_interleave(group, dim=1) for t in kv)  # [B, H, T_k, D]
    score = getattr(layer, "score_function", "softmax")
    scale, softcap = getattr(layer, "scale", None), getattr(layer, "softcap", None)
    if score == "sigmoid":
        out, _ = sigmoid_attention(
            query, key, value, mask, score_bias=layer.score_bias, bias=bias, scale=scale, softcap=softcap
        )
    elif score == "linear":
        out, _ = linear_attention(query, key, value, mask, eps=layer.eps)
    else:
        out, _ = scaled_dot_product(query, key, value, mask, scale=scale, bias=bias, softcap=softcap)
    b, t_q = x_query.shape[:2]
    out = out.transpose(1, 2).reshape(b, t_q, layer.num_heads * layer.head_dim)  # [B, T_q, H D]
    return layer.out_proj(out), kv


def _ff(layer, h: Tensor) -> Tensor:
    return layer.linear2(layer.activation(layer.linear1(h)))


def encoder_layer(
    layer,
    x: Tensor,
    mask: Tensor,
    *,
    pos: Tensor | None = None,
    bias: Tensor | None = None,
    kv: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """A :class:`~gnn_transformer.GraphTransformerEncoderLayer` on padded ``x`` ``[B, T, C]``;
    ``mask`` ``[B, T, T]`` or per head ``[B, H, T, T]``, ``bias`` ``[B, H, T, T]``."""

    def sa(h):
        out, _ = attention(layer.self_attn, h, h, mask, pos_query=pos, pos_key=pos, bias=bias, kv=kv)
        return out

    if layer.norm_first:
        x = x + sa(layer.norm1(x))
        return x + _ff(layer, layer.norm2(x))
    x = layer.norm1(x + sa(x))
    return layer.norm2(x + _ff(layer, x))


def decoder_layer(
    layer,
    x: Tensor,
    memory: Tensor,
    mask: Tensor,
    memory_mask: Tensor,
    *,
    pos: Tensor | None = None,
    bias: Tensor | None = None,
    memory_bias: Tensor | None = None,
    kv: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """A :class:`~gnn_transformer.GraphTransformerDecoderLayer` on padded ``x`` ``[B, T, C]`` and
    ``memory`` ``[B, T_mem, C]``; ``mask`` ``[B(, H), T, T]``, ``memory_mask`` ``[B(, H), T, T_mem]``."""

    def sa(h):
        out, _ = attention(layer.self_attn, h, h, mask, pos_query=pos, pos_key=pos, bias=bias, kv=kv)
        return out

    def ca(h):
        out, _ = attention(layer.multihead_attn, h, memory, memory_mask, bias=memory_bias)
        return out

    if layer.norm_first:
        x = x + sa(layer.norm1(x))
        x = x + ca(layer.norm2(x))
        return x + _ff(layer, layer.norm3(x))
    x = layer.norm1(x + sa(x))
    x = layer.norm2(x + ca(x))
    return layer.norm3(x + _ff(layer, x))


def _per_layer(value, num_layers: int, name: str) -> list:
    """One ``value`` (a mask, a bias or ``None``) for every layer, or a list/tuple of one per layer."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_layers:
            raise ValueError(
                f"Expected '{name}' to hold one entry per layer, {num_layers} (got a sequence of length {len(value)})"
            )
        return list(value)
    return [value] * num_layers


def _stack(stack, x: Tensor, pos: Tensor | None, apply) -> Tensor:
    """The layers of a stack in order, with its KV sharing: ``apply(index, layer, x, kv)``."""
    kv = None
    for index, layer in enumerate(stack.layers):
        if index % stack.kv_share_every == 0:
            h = layer.norm1(x) if layer.norm_first else x
            kv = key_value(layer.self_attn, h, pos_key=pos)
        x = apply(index, layer, x, kv)
    return x if stack.norm is None else stack.norm(x)


def encoder(
    stack,
    x: Tensor,
    mask: Tensor | Sequence[Tensor],
    *,
    pos: Tensor | None = None,
    bias: Tensor | Sequence[Tensor | None] | None = None,
) -> Tensor:
    """A :class:`~gnn_transformer.GraphTransformerEncoder` (with its KV sharing) on padded ``x``:
    ``mask`` (and ``bias``) one for every layer or a sequence of one per layer."""
    masks = _per_layer(mask, len(stack.layers), "mask")
    biases = _per_layer(bias, len(stack.layers), "bias")
    return _stack(
        stack,
        x,
        pos,
        lambda index, layer, h, kv: encoder_layer(layer, h, masks[index], pos=pos, bias=biases[index], kv=kv),
    )


def decoder(
    stack,
    x: Tensor,
    memory: Tensor,
    mask: Tensor | Sequence[Tensor],
    memory_mask: Tensor | Sequence[Tensor],
    *,
    pos: Tensor | None = None,
    bias: Tensor | Sequence[Tensor | None] | None = None,
    memory_bias: Tensor | Sequence[Tensor | None] | None = None,
) -> Tensor:
    """A :class:`~gnn_transformer.GraphTransformerDecoder` (with its KV sharing) on padded ``x`` and
    ``memory``: masks and biases one for every layer or a sequence of one per layer."""
    num_layers = len(stack.layers)
    masks, memory_masks = _per_layer(mask, num_layers, "mask"), _per_layer(memory_mask, num_layers, "memory_mask")
    biases, memory_biases = _per_layer(bias, num_layers, "bias"), _per_layer(memory_bias, num_layers, "memory_bias")
    return _stack(
        stack,
        x,
        pos,
        lambda index, layer, h, kv: decoder_layer(
            layer,
            h,
            memory,
            masks[index],
            memory_masks[index],
            pos=pos,
            bias=biases[index],
            memory_bias=memory_biases[index],
            kv=kv,
        ),
    )


def transformer(model, src: Tensor, tgt: Tensor, src_mask, tgt_mask, memory_mask) -> Tensor:
    """A :class:`~gnn_transformer.GraphTransformer` on padded ``src`` ``[B, S, C]`` and ``tgt``
    ``[B, T, C]``; each mask one for every layer of its stack or one per layer."""
    memory = encoder(model.encoder, src, src_mask)
    return decoder(model.decoder, tgt, memory, tgt_mask, memory_mask)


def encoder_model(
    model,
    x: Tensor,
    mask: Tensor | Sequence[Tensor],
    pos: Tensor,
    *,
    bias: Tensor | Sequence[Tensor | None] | None = None,
) -> Tensor:
    """A :class:`~gnn_transformer.GraphEncoderModel` / ``GraphLM`` on padded inputs ``[B, T(, F)]``
    with positions ``pos`` ``[B, T]``; ``mask`` one for every layer or a sequence of one per layer,
    each ``[B, T, T]`` or per head ``[B, H, T, T]``; ``bias`` extra score biases ``[B, H, T, T]``
    (one, or one per layer), added to ALiBi's."""
    config = model.config
    h = model.embed(x)  # [B, T, C]
    if config.position == "learned":
        h = h + model.pos_embed.weight[pos]
    elif config.position == "sinusoidal":
        table = sinusoidal_table(int(pos.max()) + 1, config.d_model, dtype=h.dtype)
        h = h + table[pos]
    if config.position == "alibi":
        alibi = alibi_bias(pos, pos, config.nhead, dtype=h.dtype)  # [B, H, T, T]
        biases = _per_layer(bias, len(model.encoder.layers), "bias")
        bias = [alibi if b is None else alibi + b for b in biases]
    h = encoder(model.encoder, h, mask, pos=pos, bias=bias)
    return h if model.head is None else model.head(h)
