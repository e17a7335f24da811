"""Per-head graphs (``edge_head``) through the encoder and decoder layers, the stacks,
``GraphTransformer`` and the models: each equals its dense twin (:mod:`gnn_transformer.dense`) with
the per-head masks ``[B, H, T_q, T_k]``, outputs and gradients in the inputs and every parameter.

The helpers here (perturbed modules, per-head graphs and masks, the comparison of outputs and
gradients) are also those of ``tests/test_model_per_layer.py``.
"""

from __future__ import annotations

import pytest
import torch

from gnn_transformer import (
    GraphLM,
    GraphTransformer,
    GraphTransformerConfig,
    GraphTransformerDecoder,
    GraphTransformerDecoderLayer,
    GraphTransformerEncoder,
    GraphTransformerEncoderLayer,
    from_padded,
    to_padded,
)
from gnn_transformer import dense
from gnn_transformer.dense import layers as dense_layers
from gnn_transformer.topology import (
    causal,
    cross,
    dilated_per_head,
    duo_attention,
    full,
    per_head,
    sliding_window,
    to_dense_mask,
)

from .conftest import TOL, perturbed

LENGTHS = [5, 3, 6]  # decoder / single-stack sequences
SRC_LENGTHS = [4, 6, 2]  # encoder sequences of the encoder-decoder tests
HEADS = 4
DTYPES = [torch.float32, torch.float64]


def random_heads(edge_index, num_heads: int = HEADS, keep: float = 0.7, seed: int = 0):
    """A per-head graph from ``edge_index``: each edge kept with probability ``keep``, for one random
    head (rows without an edge in some heads)."""
    g = torch.Generator().manual_seed(seed)
    plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    kept = torch.rand(plain.size(1), generator=g) < keep
    return plain[:, kept], torch.randint(0, num_heads, (int(kept.sum()),), generator=g)


def per_head_graph(kind: str, lengths=LENGTHS):
    """``(edge_index, edge_head)`` of a named per-head graph on a batch of ``lengths``."""
    if kind == "dilated":  # Longformer: one dilation per head
        return dilated_per_head(lengths, 1, [1, 2, 3, 1], causal=True)
    if kind == "duo":  # DuoAttention: heads 0 and 2 stream (a sink and a window), 1 and 3 see all
        return duo_attention(lengths, [0, 2], HEADS, num_sinks=1, window=1)
    if kind == "mixed":  # a window, causal, nothing at all, full
        none = torch.empty(2, 0, dtype=torch.long)
        return per_head([sliding_window(lengths, 1), causal(lengths), none, full(lengths)])
    if kind == "random":
        return random_heads(full(lengths))
    raise KeyError(kind)


PER_HEAD = ["dilated", "duo", "mixed", "random"]


def dense_mask(edge_index, edge_head=None, lengths=LENGTHS, src_lengths=None):
    """The padded dense twin of a graph: ``[B, T, T_src]``, or ``[B, H, T, T_src]`` per head."""
    heads = None if edge_head is None else HEADS
    return to_dense_mask(edge_index, edge_head=edge_head, num_heads=heads, lengths=lengths, src_lengths=src_lengths)


def dense_bias(edge_index, edge_head, bias, lengths=LENGTHS, src_lengths=None):
    """A per-head graph's ``edge_bias`` (``[E]``, or ``[E, H]`` read at each edge's head) as the
    padded ``[B, H, T, T_src]`` bias (zero off the edges), differentiable in ``bias``."""
    src_lengths = lengths if src_lengths is None else src_lengths
    per_edge = bias if bias.dim() == 1 else bias.gather(1, edge_head[:, None])[:, 0]  # [E]
    planes = [
        dense.edge_values_to_dense(edge_index[:, edge_head == h], per_edge[edge_head == h], src_lengths, lengths)
        for h in range(HEADS)
    ]
    return torch.stack(planes, 1)  # [B, H, T, T_src]


def assert_matches(out, ref, leaves, dtype):
    """``out`` equals ``ref``, and so do the gradients in every leaf of one loss, ``sum(w * out)``
    with random weights of norm about 1 (gradients of order 1, whatever the number of outputs)."""
    torch.testing.assert_close(out, ref, **TOL[dtype])
    w = torch.randn(out.shape, dtype=dtype) / out.numel() ** 0.5
    got = torch.autograd.grad((out * w).sum(), leaves, allow_unused=True)
    want = torch.autograd.grad((ref * w).sum(), leaves, allow_unused=True)
    for index, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), index
        if a is not None:
            torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, index=index: f"leaf {index}: {m}")


def nodes(lengths, dim, dtype):
    """Node features ``[sum(lengths), dim]`` that require gradients."""
    return torch.randn(sum(lengths), dim, dtype=dtype, requires_grad=True)


def padded_positions(lengths):
    return torch.arange(max(lengths)).expand(len(lengths), -1)  # [B, T]


def positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])  # [N]


# ---------------------------------------------------------------- layers
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("num_kv_heads", [4, 2])
@pytest.mark.parametrize("kind", PER_HEAD)
def test_encoder_layer_per_head_matches_dense(kind, num_kv_heads, norm_first, dtype):
    layer = perturbed(
        GraphTransformerEncoderLayer(
            16, HEADS, 24, dropout=0.0, norm_first=norm_first, num_kv_heads=num_kv_heads, dtype=dtype, backend="pyg"
        )
    )
    edge_index, edge_head = per_head_graph(kind)
    x = nodes(LENGTHS, 16, dtype)
    out = layer(x, edge_index, edge_head=edge_head)
    ref = from_padded(dense.encoder_layer(layer, to_padded(x, LENGTHS), dense_mask(edge_index, edge_head)), LENGTHS)
    assert_matches(out, ref, [x, *layer.parameters()], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["pyg", "fused", "tiled"])
@pytest.mark.parametrize("shape", ["[E]", "[E, H]"])
def test_encoder_layer_per_head_bias_matches_dense(shape, backend, dtype):
    layer = perturbed(GraphTransformerEncoderLayer(16, HEADS, 24, dropout=0.0, dtype=dtype, backend=backend))
    edge_index, edge_head = per_head_graph("duo")
    x = nodes(LENGTHS, 16, dtype)
    size = (edge_index.size(1),) if shape == "[E]" else (edge_index.size(1), HEADS)
    bias = torch.randn(size, dtype=dtype, requires_grad=True)
    out = layer(x, edge_index, edge_head=edge_head, edge_bias=bias)
    ref = dense.encoder_layer(
        layer, to_padded(x, LENGTHS), dense_mask(edge_index, edge_head), bias=dense_bias(edge_index, edge_head, bias)
    )
    assert_matches(out, from_padded(ref, LENGTHS), [x, bias, *layer.parameters()], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("self_kind,memory_kind", [("dilated", "random"), ("mixed", None), (None, "random")])
def test_decoder_layer_per_head_matches_dense(self_kind, memory_kind, norm_first, dtype):
    layer = perturbed(
        GraphTransformerDecoderLayer(16, HEADS, 24, dropout=0.0, norm_first=norm_first, dtype=dtype, backend="pyg")
    )
    edge_index, edge_head = per_head_graph(self_kind) if self_kind else (causal(LENGTHS), None)
    memory_edge_index, memory_edge_head = (
        random_heads(cross(LENGTHS, SRC_LENGTHS), seed=1) if memory_kind else (cross(LENGTHS, SRC_LENGTHS), None)
    )
    x, memory = nodes(LENGTHS, 16, dtype), nodes(SRC_LENGTHS, 16, dtype)
    out = layer(x, edge_index, memory, memory_edge_index, edge_head=edge_head, memory_edge_head=memory_edge_head)
    ref = dense_layers.decoder_layer(
        layer,
        to_padded(x, LENGTHS),
        to_padded(memory, SRC_LENGTHS),
        dense_mask(edge_index, edge_head),
        dense_mask(memory_edge_index, memory_edge_head, src_lengths=SRC_LENGTHS),
    )
    assert_matches(out, from_padded(ref, LENGTHS), [x, memory, *layer.parameters()], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decoder_layer_per_head_memory_bias_matches_dense(dtype):
    layer = perturbed(GraphTransformerDecoderLayer(16, HEADS, 24, dropout=0.0, dtype=dtype, backend="pyg"))
    edge_index = causal(LENGTHS)
    memory_edge_index, memory_edge_head = random_heads(cross(LENGTHS, SRC_LENGTHS), seed=2)
    x, memory = nodes(LENGTHS, 16, dtype), nodes(SRC_LENGTHS, 16, dtype)
    bias = torch.randn(memory_edge_index.size(1), dtype=dtype, requires_grad=True)
    out = layer(x, edge_index, memory, memory_edge_index, memory_edge_head=memory_edge_head, memory_edge_bias=bias)
    ref = dense_layers.decoder_layer(
        layer,
        to_padded(x, LENGTHS),
        to_padded(memory, SRC_LENGTHS),
        dense_mask(edge_index),
        dense_mask(memory_edge_index, memory_edge_head, src_lengths=SRC_LENGTHS),
        memory_bias=dense_bias(memory_edge_index, memory_edge_head, bias, src_lengths=SRC_LENGTHS),
    )
    assert_matches(out, from_padded(ref, LENGTHS), [x, memory, bias, *layer.parameters()], dtype)


# ---------------------------------------------------------------- stacks and GraphTransformer
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_share_every", [1, 2])
@pytest.mark.parametrize("kind", ["dilated", "random"])
def test_encoder_stack_per_head_matches_dense(kind, kv_share_every, dtype):
    layer = GraphTransformerEncoderLayer(
        16, HEADS, 24, dropout=0.0, norm_first=True, num_kv_heads=2, rope=True, dtype=dtype, backend="pyg"
    )
    stack = perturbed(
        GraphTransformerEncoder(layer, 3, torch.nn.LayerNorm(16, dtype=dtype), kv_share_every=kv_share_every)
    )
    edge_index, edge_head = per_head_graph(kind)
    x = nodes(LENGTHS, 16, dtype)
    out = stack(x, edge_index, edge_head=edge_head, pos=positions(LENGTHS))
    ref = dense.encoder(stack, to_padded(x, LENGTHS), dense_mask(edge_index, edge_head), pos=padded_positions(LENGTHS))
    assert_matches(out, from_padded(ref, LENGTHS), [x, *stack.parameters()], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_share_every", [1, 2])
def test_decoder_stack_per_head_matches_dense(kv_share_every, dtype):
    layer = GraphTransformerDecoderLayer(16, HEADS, 24, dropout=0.0, norm_first=True, dtype=dtype, backend="pyg")
    stack = perturbed(GraphTransformerDecoder(layer, 3, kv_share_every=kv_share_every))
    edge_index, edge_head = per_head_graph("duo")
    memory_edge_index, memory_edge_head = random_heads(cross(LENGTHS, SRC_LENGTHS), seed=3)
    x, memory = nodes(LENGTHS, 16, dtype), nodes(SRC_LENGTHS, 16, dtype)
    out = stack(x, edge_index, memory, memory_edge_index, edge_head=edge_head, memory_edge_head=memory_edge_head)
    ref = dense_layers.decoder(
        stack,
        to_padded(x, LENGTHS),
        to_padded(memory, SRC_LENGTHS),
        dense_mask(edge_index, edge_head),
        dense_mask(memory_edge_index, memory_edge_head, src_lengths=SRC_LENGTHS),
    )
    assert_matches(out, from_padded(ref, LENGTHS), [x, memory, *stack.parameters()], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_graph_transformer_per_head_matches_dense(dtype):
    model = perturbed(GraphTransformer(16, HEADS, 2, 2, 24, dropout=0.0, dtype=dtype, backend="pyg"))
    src_edge_index, src_edge_head = per_head_graph("mixed", SRC_LENGTHS)
    tgt_edge_index, tgt_edge_head = per_head_graph("dilated")
    memory_edge_index, memory_edge_head = random_heads(cross(LENGTHS, SRC_LENGTHS), seed=4)
    src, tgt = nodes(SRC_LENGTHS, 16, dtype), nodes(LENGTHS, 16, dtype)
    out = model(
        src,
        tgt,
        src_edge_index,
        tgt_edge_index,
        memory_edge_index,
        src_edge_head=src_edge_head,
        tgt_edge_head=tgt_edge_head,
        memory_edge_head=memory_edge_head,
    )
    ref = dense_layers.transformer(
        model,
        to_padded(src, SRC_LENGTHS),
        to_padded(tgt, LENGTHS),
        dense_mask(src_edge_index, src_edge_head, SRC_LENGTHS),
        dense_mask(tgt_edge_index, tgt_edge_head),
        dense_mask(memory_edge_index, memory_edge_head, src_lengths=SRC_LENGTHS),
    )
    assert_matches(out, from_padded(ref, LENGTHS), [src, tgt, *model.parameters()], dtype)


# ---------------------------------------------------------------- models
def lm(dtype, **fields):
    config = GraphTransformerConfig(
        **{
            "vocab_size": 23,
            "d_model": 16,
            "nhead": HEADS,
            "num_layers": 3,
            "max_positions": 16,
            "backend": "pyg",
            **fields,
        }
    )
    return perturbed(GraphLM(config).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "fields",
    [
        dict(position="learned"),
        dict(position="rope", num_kv_heads=2),
        dict(position="alibi"),
        dict(position="alibi", kv_share_every=2),
        dict(position="sinusoidal", norm_first=False),
    ],
    ids=["learned", "rope-gqa", "alibi", "alibi-cla", "sinusoidal-postnorm"],
)
@pytest.mark.parametrize("kind", ["duo", "mixed"])
def test_model_per_head_matches_dense(kind, fields, dtype):
    model = lm(dtype, **fields)
    edge_index, edge_head = per_head_graph(kind)
    ids = torch.randint(0, 23, (sum(LENGTHS),))
    out = model(ids, edge_index, edge_head=edge_head, pos=positions(LENGTHS))
    ref = dense.encoder_model(
        model, to_padded(ids, LENGTHS).long(), dense_mask(edge_index, edge_head), padded_positions(LENGTHS)
    )
    assert_matches(out, from_padded(ref, LENGTHS), list(model.parameters()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["[E]", "[E, H]"])
def test_alibi_model_per_head_with_edge_bias_matches_dense(shape, dtype):
    model = lm(dtype, position="alibi")
    edge_index, edge_head = per_head_graph("dilated")
    ids = torch.randint(0, 23, (sum(LENGTHS),))
    size = (edge_index.size(1),) if shape == "[E]" else (edge_index.size(1), HEADS)
    bias = torch.randn(size, dtype=dtype, requires_grad=True)
    out = model(ids, edge_index, edge_head=edge_head, edge_bias=bias, pos=positions(LENGTHS))
    ref = dense.encoder_model(
        model,
        to_padded(ids, LENGTHS).long(),
        dense_mask(edge_index, edge_head),
        padded_positions(LENGTHS),
        bias=dense_bias(edge_index, edge_head, bias),
    )
    assert_matches(out, from_padded(ref, LENGTHS), [bias, *model.parameters()], dtype)


# ---------------------------------------------------------------- bad input
def test_stack_refuses_edge_head_of_the_wrong_length():
    stack = GraphTransformerEncoder(GraphTransformerEncoderLayer(16, HEADS, 24), 2)
    edge_index, edge_head = per_head_graph("duo")
    with pytest.raises(ValueError, match=rf"'edge_head'.*shape \[{edge_index.size(1)}\].*\[{edge_index.size(1) - 1}\]"):
        stack(torch.randn(sum(LENGTHS), 16), edge_index, edge_head=edge_head[1:])


def test_stack_refuses_a_floating_edge_head():
    stack = GraphTransformerEncoder(GraphTransformerEncoderLayer(16, HEADS, 24), 2)
    edge_index, edge_head = per_head_graph("duo")
    with pytest.raises(ValueError, match="'edge_head'.*integer.*torch.float32"):
        stack(torch.randn(sum(LENGTHS), 16), edge_index, edge_head=edge_head.float())


@pytest.mark.parametrize("position", ["learned", "alibi"])
def test_model_refuses_an_edge_head_out_of_range(position):
    model = lm(torch.float32, position=position)
    edge_index, edge_head = per_head_graph("duo")
    with pytest.raises(ValueError, match="Found 4 in 'edge_head' but there are 4 query heads"):
        model(torch.randint(0, 23, (sum(LENGTHS),)), edge_index, edge_head=edge_head + 1, pos=positions(LENGTHS))


def test_decoder_stack_refuses_memory_edge_head_of_the_wrong_length():
    stack = GraphTransformerDecoder(GraphTransformerDecoderLayer(16, HEADS, 24), 2)
    memory_edge_index, memory_edge_head = random_heads(cross(LENGTHS, SRC_LENGTHS))
    with pytest.raises(ValueError, match="'memory_edge_head'.*shape"):
        stack(
            torch.randn(sum(LENGTHS), 16),
            causal(LENGTHS),
            torch.randn(sum(SRC_LENGTHS), 16),
            memory_edge_index,
            memory_edge_head=memory_edge_head[:-2],
        )
