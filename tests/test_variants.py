"""Attention variants (GQA/MQA, cross-layer KV sharing, MLP projections, sigmoid, linear) vs dense."""
import pytest
import torch

from gnn_transformer import (GraphLM, GraphMultiheadAttention, GraphTransformerConfig,
                             GraphTransformerEncoder, GraphTransformerEncoderLayer, LinearAttention,
                             MLPProjectionAttention, SigmoidAttention, dense, from_padded, to_padded)
from gnn_transformer.topology import causal, erdos_renyi, full, to_dense_mask
from gnn_transformer.variants import attention_class

from .conftest import TOL

LENGTHS = [4, 1, 6]
DTYPES = [torch.float32, torch.float64]


def _graph(kind, lengths):
    if kind == "full":
        return full(lengths)
    if kind == "causal":
        return causal(lengths)
    blocks, offset = [], 0  # random edges inside each sequence; some nodes without incoming edge
    for i, n in enumerate(lengths):
        blocks.append(erdos_renyi(n, p=0.4, seed=i).as_tensor() + offset)
        offset += n
    return torch.cat(blocks, dim=1)


def _perturbed(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()


def _check_attention(layer, kind, dtype, bias=False):
    edge_index = _graph(kind, LENGTHS)
    n = sum(LENGTHS)
    x = torch.randn(n, layer.embed_dim, dtype=dtype, requires_grad=True)
    edge_bias = torch.randn(edge_index.size(1), layer.num_heads, dtype=dtype) if bias else None
    out, alpha = layer(x, edge_index, edge_bias=edge_bias, return_attention_weights=True)
    mask = to_dense_mask(edge_index, n, n, lengths=LENGTHS)  # [B, T, T]
    dense_bias = dense.edge_values_to_dense(edge_index, edge_bias, LENGTHS) if bias else None
    x_pad = to_padded(x, LENGTHS)
    ref, _ = dense.attention(layer, x_pad, x_pad, mask, bias=dense_bias)
    ref = from_padded(ref, LENGTHS)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    assert torch.isfinite(out).all()
    params = [x, *layer.parameters()]
    g1 = torch.autograd.grad(out.square().sum(), params)
    g2 = torch.autograd.grad(ref.square().sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **TOL[dtype])
    return out, alpha, edge_index


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["full", "causal", "random"])
@pytest.mark.parametrize("num_kv_heads,score_bias", [(4, None), (1, -1.5)])
def test_sigmoid_attention_matches_dense(num_kv_heads, score_bias, kind, dtype):
    layer = _perturbed(SigmoidAttention(16, 4, num_kv_heads=num_kv_heads, score_bias=score_bias,
                                        dtype=dtype, backend="pyg"))
    _, alpha, _ = _check_attention(layer, kind, dtype, bias=True)
    assert ((alpha > 0) & (alpha < 1)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["full", "causal", "random"])
@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_linear_attention_matches_dense(num_kv_heads, kind, dtype):
    layer = _perturbed(LinearAttention(16, 4, num_kv_heads=num_kv_heads, dtype=dtype, backend="pyg"))
    _, alpha, edge_index = _check_attention(layer, kind, dtype)
    sums = torch.zeros(sum(LENGTHS), 4, dtype=dtype).index_add_(0, edge_index[1], alpha)
    has_edge = torch.zeros(sum(LENGTHS), dtype=torch.bool)
    has_edge[edge_index[1]] = True
    torch.testing.assert_close(sums[has_edge], torch.ones_like(sums[has_edge]), atol=1e-5, rtol=0)
    assert (sums[~has_edge] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["full", "random"])
def test_mlp_projection_attention_matches_dense(kind, dtype):
    layer = _perturbed(MLPProjectionAttention(16, 4, num_kv_heads=2, dtype=dtype, backend="pyg"))
    _check_attention(layer, kind, dtype, bias=True)
    names = set(layer.state_dict())
    assert {"q_hidden.weight", "k_hidden.weight", "v_hidden.weight", "in_proj_weight"} <= names


def test_linear_attention_on_a_full_graph_is_the_factorized_formula():
    """On a full graph the per-edge messages equal phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1)."""
    layer = LinearAttention(8, 2, dtype=torch.float64, backend="pyg").eval()
    x = torch.randn(5, 8, dtype=torch.float64)
    q, k, v = layer.project(x, x, x)  # [N, H, D]
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    kv = torch.einsum("nhd,nhe->hde", fk, v)  # [H, D, D]: O(N D^2), no N x N matrix
    num = torch.einsum("nhd,hde->nhe", fq, kv)
    den = torch.einsum("nhd,hd->nh", fq, fk.sum(0)).unsqueeze(-1) + layer.eps
    out, _ = layer.attend(q, k, v, full(5))
    torch.testing.assert_close(out, num / den, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("attention", ["softmax", "sigmoid", "linear", "mlp"])
def test_encoder_layer_variants_match_dense(attention, num_kv_heads, dtype):
    layer = _perturbed(GraphTransformerEncoderLayer(
        16, 4, 24, dropout=0.0, activation="gelu", norm_first=True, num_kv_heads=num_kv_heads,
        attention=attention_class(attention), dtype=dtype, backend="pyg"))
    x = torch.randn(sum(LENGTHS), 16, dtype=dtype)
    edge_index = causal(LENGTHS)
    out = layer(x, edge_index)
    mask = to_dense_mask(edge_index, x.size(0), x.size(0), lengths=LENGTHS)
    ref = dense.encoder_layer(layer, to_padded(x, LENGTHS), mask)
    torch.testing.assert_close(out, from_padded(ref, LENGTHS), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("every", [1, 2, 3])
@pytest.mark.parametrize("rope", [False, True])
def test_cross_layer_kv_sharing_matches_dense(every, rope, dtype):
    layer = GraphTransformerEncoderLayer(16, 4, 24, dropout=0.0, norm_first=True, num_kv_heads=2,
                                         rope=rope, dtype=dtype, backend="pyg")
    stack = _perturbed(GraphTransformerEncoder(layer, 4, kv_share_every=every))
    x = torch.randn(sum(LENGTHS), 16, dtype=dtype, requires_grad=True)
    pos = torch.cat([torch.arange(n) for n in LENGTHS])
    edge_index = causal(LENGTHS)
    out = stack(x, edge_index, pos=pos)
    mask = to_dense_mask(edge_index, x.size(0), x.size(0), lengths=LENGTHS)
    pos_pad = torch.arange(max(LENGTHS)).expand(len(LENGTHS), -1)
    ref = from_padded(dense.encoder(stack, to_padded(x, LENGTHS), mask, pos=pos_pad), LENGTHS)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    names = ["x", *(name for name, _ in stack.named_parameters())]
    g1 = torch.autograd.grad(out.sum(), [x, *stack.parameters()], allow_unused=True)
    g2 = torch.autograd.grad(ref.sum(), [x, *stack.parameters()], allow_unused=True)
    for name, a, b in zip(names, g1, g2):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        torch.testing.assert_close(a, b, **TOL[dtype], msg=name)
    # layers that reuse keys/values leave their own key/value projections unused
    grad_w = dict(zip(names, g1))["layers.1.self_attn.in_proj_weight"]
    assert (grad_w[16:].abs().sum() == 0) == (every > 1)


def test_kv_sharing_differs_from_no_sharing():
    torch.manual_seed(3)
    config = GraphTransformerConfig(vocab_size=11, d_model=16, nhead=4, num_layers=4,
                                    kv_share_every=2, backend="pyg")
    shared = GraphLM(config).eval()
    config_plain = GraphTransformerConfig(**{**config.__dict__, "kv_share_every": 1})
    plain = GraphLM(config_plain).eval()
    plain.load_state_dict(shared.state_dict())
    ids, pos = torch.randint(0, 11, (6,)), torch.arange(6)
    assert not torch.allclose(shared(ids, causal(6), pos=pos), plain(ids, causal(6), pos=pos))


def test_variant_errors():
    layer = LinearAttention(8, 2, backend="pyg")
    with pytest.raises(ValueError, match="'edge_bias'"):
        layer(torch.randn(3, 8), full(3), edge_bias=torch.randn(9, 2))
    with pytest.raises(ValueError, match="'backend'.*'fused'"):
        SigmoidAttention(8, 2, backend="pyg")(torch.randn(3, 8), full(3), backend="fused")
    with pytest.raises(ValueError, match="'attention'.*'cosine'"):
        attention_class("cosine")
    # state dicts of the score variants are those of the softmax layer
    assert set(SigmoidAttention(8, 2).state_dict()) == set(GraphMultiheadAttention(8, 2).state_dict())
