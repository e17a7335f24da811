"""Positions on token graphs (sinusoidal, learned, RoPE, ALiBi) against dense implementations."""

import pytest
import torch

from gnn_transformer import (
    GraphEncoderModel,
    GraphLM,
    GraphMultiheadAttention,
    GraphTransformerConfig,
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    alibi_edge_bias,
    alibi_slopes,
    dense,
    from_padded,
    sinusoidal_embedding,
    to_padded,
)
from gnn_transformer.topology import causal, full, sliding_window, to_dense_mask

from .conftest import TOL

LENGTHS = [5, 2, 7]
DTYPES = [torch.float32, torch.float64]


def _positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])  # position of each node in its sequence


def _padded_positions(lengths):
    return torch.arange(max(lengths)).expand(len(lengths), -1)  # [B, T]


def test_sinusoidal_matches_table():
    pos = torch.tensor([0, 3, 1, 9, 2])
    table = dense.sinusoidal_table(10, 12, dtype=torch.float64)
    out = sinusoidal_embedding(pos, 12).double()
    torch.testing.assert_close(out, table[pos], **TOL[torch.float32])
    module = SinusoidalPositionalEmbedding(12)
    torch.testing.assert_close(module(pos, torch.float64), table[pos], **TOL[torch.float64])
    assert list(module.parameters()) == [] and len(module.state_dict()) == 0


def test_learned_embedding_is_a_table_lookup():
    emb = LearnedPositionalEmbedding(8, 4)
    pos = torch.tensor([0, 7, 3])
    torch.testing.assert_close(emb(pos), emb.weight[pos])
    with pytest.raises(ValueError, match=r"'pos' in \[0, 8\).*\[0, 8\]"):
        emb(torch.tensor([0, 8]))
    with pytest.raises(ValueError, match=r"'pos' in \[0, 8\).*\[-1, 3\]"):
        emb(torch.tensor([3, -1]))


@pytest.mark.parametrize("num_heads", [1, 2, 3, 4, 6, 8, 12, 16])
def test_alibi_slopes_match_paper(num_heads):
    torch.testing.assert_close(
        alibi_slopes(num_heads).double(), torch.tensor(dense.alibi_slopes(num_heads), dtype=torch.float64)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["full", "causal"])
def test_alibi_edge_bias_matches_dense(kind, dtype):
    edge_index = full(LENGTHS) if kind == "full" else causal(LENGTHS)
    pos = _positions(LENGTHS)
    bias = alibi_edge_bias(edge_index, pos, slopes=alibi_slopes(4).to(dtype))  # [E, 4]
    ref = dense.alibi_bias(_padded_positions(LENGTHS), _padded_positions(LENGTHS), 4, dtype=dtype)
    mask = to_dense_mask(edge_index, sum(LENGTHS), sum(LENGTHS), lengths=LENGTHS)  # [B, T, T]
    got = dense.edge_values_to_dense(edge_index, bias, LENGTHS)  # [B, 4, T, T]
    torch.testing.assert_close(got, ref * mask.unsqueeze(1), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_rotation_matrices(dtype):
    rope = RotaryEmbedding(8)
    x = torch.randn(6, 3, 8, dtype=dtype)
    pos = torch.tensor([0, 1, 5, 2, 11, 3])
    ref = dense.apply_rope(x.permute(1, 0, 2).unsqueeze(0), pos.unsqueeze(0))  # [1, H, N, D]
    torch.testing.assert_close(rope(x, pos), ref[0].permute(1, 0, 2), **TOL[dtype])
    # rotation preserves norms; position 0 is the identity
    torch.testing.assert_close(rope(x, pos).norm(dim=-1), x.norm(dim=-1), **TOL[dtype])
    torch.testing.assert_close(rope(x, torch.zeros(6, dtype=torch.long)), x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_rope_attention_matches_dense(num_kv_heads, dtype):
    layer = GraphMultiheadAttention(16, 4, num_kv_heads=num_kv_heads, rope=True, dtype=dtype, backend="pyg").eval()
    edge_index = causal(LENGTHS)
    x = torch.randn(sum(LENGTHS), 16, dtype=dtype, requires_grad=True)
    pos = _positions(LENGTHS)
    out = layer(x, edge_index, pos=pos)
    x_pad = to_padded(x, LENGTHS)
    mask = to_dense_mask(edge_index, x.size(0), x.size(0), lengths=LENGTHS)
    ref, _ = dense.attention(
        layer, x_pad, x_pad, mask, pos_query=_padded_positions(LENGTHS), pos_key=_padded_positions(LENGTHS)
    )
    torch.testing.assert_close(out, from_padded(ref, LENGTHS), **TOL[dtype])
    g1 = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    g2 = torch.autograd.grad(from_padded(ref, LENGTHS).square().sum(), [x, *layer.parameters()])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_half_precision_angles(dtype):
    """Angles are computed in float32 even for half-precision inputs: bfloat16 cannot hold
    position 257, and an angle of 300 rad in bfloat16 is off by up to a radian."""
    rope = RotaryEmbedding(8)
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    pos = torch.tensor([3, 257, 2049, 3001])
    ref = rope(x, pos)  # float64 angles
    got = rope(x.to(dtype), pos).double()
    assert (got - ref).abs().max() < 3 * torch.finfo(dtype).eps * x.abs().max()
    # the dense reference builds its rotations the same way
    ref_dense = dense.apply_rope(x.to(dtype).permute(1, 0, 2)[None], pos[None])[0].permute(1, 0, 2)
    assert (ref_dense.double() - ref).abs().max() < 3 * torch.finfo(dtype).eps * x.abs().max()


def test_rope_scores_depend_on_position_differences_only():
    layer = GraphMultiheadAttention(8, 2, rope=True, dtype=torch.float64, backend="pyg").eval()
    x = torch.randn(5, 8, dtype=torch.float64)
    edge_index = full(5)
    pos = torch.arange(5)
    a = layer(x, edge_index, pos=pos)
    torch.testing.assert_close(a, layer(x, edge_index, pos=pos + 17), **TOL[torch.float64])
    assert not torch.allclose(a, layer(x, edge_index, pos=pos.flip(0)))


def test_rope_bipartite_and_errors():
    layer = GraphMultiheadAttention(8, 2, rope=True, backend="pyg").eval()
    ei = torch.tensor([[0, 1, 2], [0, 0, 1]])
    out = layer((torch.randn(3, 8), torch.randn(2, 8)), ei, pos=(torch.arange(3), torch.arange(2)))
    assert out.shape == (2, 8)
    with pytest.raises(ValueError, match="'pos'.*RoPE"):
        layer(torch.randn(3, 8), full(3))
    with pytest.raises(ValueError, match=r"'pos'.*\[3\].*\[2\]"):
        layer(torch.randn(3, 8), full(3), pos=torch.arange(2))
    with pytest.raises(ValueError, match="even head dimension.*3"):
        GraphMultiheadAttention(6, 2, rope=True)
    with pytest.raises(ValueError, match=r"'pos'.*pair.*\[3\]"):  # bipartite input, one tensor
        layer((torch.randn(3, 8), torch.randn(2, 8)), ei, pos=torch.arange(3))
    with pytest.raises(ValueError, match="'rope_base'.*0.0"):
        GraphMultiheadAttention(8, 2, rope=True, rope_base=0.0)
    with pytest.raises(ValueError, match="'rope'.*'yes'"):
        GraphMultiheadAttention(8, 2, rope="yes")
    with pytest.raises(ValueError, match="'base'.*-2"):
        RotaryEmbedding(8, base=-2)
    # a layer without RoPE still checks the positions it is given
    with pytest.raises(ValueError, match=r"'pos'.*\[3\].*\[2\]"):
        GraphMultiheadAttention(8, 2)(torch.randn(3, 8), full(3), pos=torch.arange(2))
    assert set(layer.state_dict()) == set(GraphMultiheadAttention(8, 2).state_dict())


MODEL_CASES = [
    ("learned", "causal"),
    ("sinusoidal", "full"),
    ("rope", "causal"),
    ("alibi", "causal"),
    ("alibi", "full"),
    ("none", "window"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("position,kind", MODEL_CASES)
def test_model_with_positions_matches_dense(position, kind, dtype):
    config = GraphTransformerConfig(
        vocab_size=23,
        d_model=16,
        nhead=4,
        num_layers=2,
        position=position,
        max_positions=16,
        backend="pyg",
        norm_first=position != "sinusoidal",
    )
    model = GraphLM(config).to(dtype).eval()
    ids = torch.randint(0, 23, (sum(LENGTHS),))
    builders = {"full": full, "causal": causal, "window": lambda n: sliding_window(n, 2, causal=True)}
    edge_index = builders[kind](LENGTHS)
    pos = _positions(LENGTHS)
    out = model(ids, edge_index, pos=pos)
    mask = to_dense_mask(edge_index, ids.numel(), ids.numel(), lengths=LENGTHS)
    ids_pad = to_padded(ids, LENGTHS).long()
    ref = dense.encoder_model(model, ids_pad, mask, _padded_positions(LENGTHS))
    torch.testing.assert_close(out, from_padded(ref, LENGTHS), **TOL[dtype])
    assert out.shape == (ids.numel(), 23)


def test_feature_input_model_and_errors():
    config = GraphTransformerConfig(
        input_dim=5, output_dim=3, d_model=8, nhead=2, num_layers=1, position="sinusoidal", backend="pyg"
    )
    model = GraphEncoderModel(config).eval()
    x = torch.randn(6, 5)
    out = model(x, full([2, 4]), pos=_positions([2, 4]))
    assert out.shape == (6, 3)
    with pytest.raises(ValueError, match="'pos'.*\\[6\\]"):
        model(x, full([2, 4]))
    with pytest.raises(ValueError, match="'position'.*'xpos'"):
        GraphEncoderModel(GraphTransformerConfig(vocab_size=3, position="xpos"))
    with pytest.raises(ValueError, match="exactly one of 'vocab_size' and 'input_dim'"):
        GraphEncoderModel(GraphTransformerConfig())
    with pytest.raises(ValueError, match="'dim'.*5"):
        SinusoidalPositionalEmbedding(5)


def test_rope_bipartite_rotates_queries_by_pos_dst_and_keys_by_pos_src():
    """With ``x = (x_src, x_dst)`` and ``pos = (pos_src, pos_dst)`` the queries turn by ``pos_dst``
    and the keys by ``pos_src``, even when both node sets have the same size: the same as keys
    given through ``kv``, unchanged by a shift of both, changed by a shift of the targets only."""
    torch.manual_seed(0)
    layer = GraphMultiheadAttention(8, 2, rope=True, backend="pyg").eval()
    x_src, x_dst = torch.randn(3, 8), torch.randn(3, 8)
    ei = full(3)
    pos_src, pos_dst = torch.arange(3), torch.tensor([5, 9, 2])
    out = layer((x_src, x_dst), ei, pos=(pos_src, pos_dst))
    kv = layer.key_value(x_src, pos=pos_src)
    torch.testing.assert_close(out, layer(x_dst, ei, kv=kv, pos=pos_dst), **TOL[torch.float32])
    shifted = layer((x_src, x_dst), ei, pos=(pos_src + 7, pos_dst + 7))
    torch.testing.assert_close(out, shifted, **TOL[torch.float32])
    assert not torch.allclose(out, layer((x_src, x_dst), ei, pos=(pos_src, pos_dst + 3)), atol=1e-4)
