"""Attention variants (GQA/MQA, cross-layer KV sharing, MLP projections, sigmoid, linear) vs dense."""

import pytest
import torch

from gnn_transformer import (
    GraphLM,
    GraphMultiheadAttention,
    GraphTransformerConfig,
    GraphTransformerDecoder,
    GraphTransformerDecoderLayer,
    GraphTransformerEncoder,
    GraphTransformerEncoderLayer,
    LinearAttention,
    MLPProjectionAttention,
    SigmoidAttention,
    dense,
    from_padded,
    to_padded,
)
from gnn_transformer.topology import causal, erdos_renyi, full, to_dense_mask
from gnn_transformer.variants import attention_class

from .conftest import TOL, perturbed

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
    layer = perturbed(
        SigmoidAttention(16, 4, num_kv_heads=num_kv_heads, score_bias=score_bias, dtype=dtype, backend="pyg")
    )
    _, alpha, _ = _check_attention(layer, kind, dtype, bias=True)
    assert ((alpha > 0) & (alpha < 1)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["full", "causal", "random"])
@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_linear_attention_matches_dense(num_kv_heads, kind, dtype):
    layer = perturbed(LinearAttention(16, 4, num_kv_heads=num_kv_heads, dtype=dtype, backend="pyg"))
    _, alpha, edge_index = _check_attention(layer, kind, dtype)
    sums = torch.zeros(sum(LENGTHS), 4, dtype=dtype).index_add_(0, edge_index[1], alpha)
    has_edge = torch.zeros(sum(LENGTHS), dtype=torch.bool)
    has_edge[edge_index[1]] = True
    torch.testing.assert_close(sums[has_edge], torch.ones_like(sums[has_edge]), atol=1e-5, rtol=0)
    assert (sums[~has_edge] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["full", "random"])
def test_mlp_projection_attention_matches_dense(kind, dtype):
    layer = perturbed(MLPProjectionAttention(16, 4, num_kv_heads=2, dtype=dtype, backend="pyg"))
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
    layer = perturbed(
        GraphTransformerEncoderLayer(
            16,
            4,
            24,
            dropout=0.0,
            activation="gelu",
            norm_first=True,
            num_kv_heads=num_kv_heads,
            attention=attention_class(attention),
            dtype=dtype,
            backend="pyg",
        )
    )
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
    layer = GraphTransformerEncoderLayer(
        16, 4, 24, dropout=0.0, norm_first=True, num_kv_heads=2, rope=rope, dtype=dtype, backend="pyg"
    )
    stack = perturbed(GraphTransformerEncoder(layer, 4, kv_share_every=every))
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
        assert a is not None and b is not None, name  # every parameter is used
        torch.testing.assert_close(a, b, **TOL[dtype], msg=name)
    # layers that reuse keys/values have only the query rows of the in-projection
    rows = 16 if every > 1 else 16 + 2 * 2 * 4
    assert stack.layers[1].self_attn.in_proj_weight.shape == (rows, 16)


def _num_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("decoder", [False, True])
@pytest.mark.parametrize("attention", ["softmax", "sigmoid", "mlp"])
def test_kv_sharing_removes_key_value_projections(attention, decoder, num_kv_heads):
    torch.manual_seed(0)
    C, H, L = 16, 4, 5
    cls = GraphTransformerDecoderLayer if decoder else GraphTransformerEncoderLayer
    stack_cls = GraphTransformerDecoder if decoder else GraphTransformerEncoder
    layer = cls(C, H, 24, dropout=0.0, num_kv_heads=num_kv_heads, attention=attention_class(attention), backend="pyg")
    plain, shared = stack_cls(layer, L), stack_cls(layer, L, kv_share_every=2)
    kv_dim = num_kv_heads * (C // H)  # H_kv D
    sharing = sum(1 for index in range(L) if index % 2 != 0)  # layers 1 and 3
    per_layer = 2 * kv_dim * C + 2 * kv_dim  # key/value rows of in_proj_weight and in_proj_bias
    if attention == "mlp":
        per_layer += 2 * (C * C + C)  # and the hidden layers k_hidden, v_hidden
    assert _num_params(plain) - _num_params(shared) == sharing * per_layer
    for index, stacked in enumerate(shared.layers):
        attn = stacked.self_attn
        assert attn.project_kv == (index % 2 == 0)
        assert attn.in_proj_weight.shape == ((C if index % 2 else C + 2 * kv_dim), C)
        if decoder:  # cross-attention keeps its key/value projection
            assert stacked.multihead_attn.in_proj_weight.shape == (3 * C, C)
    # every parameter gets a nonzero gradient
    shared = perturbed(shared).train()
    x = torch.randn(sum(LENGTHS), C)
    if decoder:
        memory = torch.randn(5, C)
        cross = torch.stack([torch.arange(5).repeat(x.size(0)), torch.arange(x.size(0)).repeat_interleave(5)])
        out = shared(x, causal(LENGTHS), memory, cross)
    else:
        out = shared(x, causal(LENGTHS))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in shared.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_kv_sharing_config_parameter_count(position):
    base = dict(vocab_size=11, d_model=16, nhead=4, num_layers=4, num_kv_heads=2, position=position, backend="pyg")
    plain = GraphLM(GraphTransformerConfig(**base))
    shared = GraphLM(GraphTransformerConfig(**base, kv_share_every=2))
    kv_dim = 2 * 4
    assert _num_params(plain) - _num_params(shared) == 2 * (2 * kv_dim * 16 + 2 * kv_dim)
    ids, pos = torch.randint(0, 11, (6,)), torch.arange(6)
    shared(ids, causal(6), pos=pos).logsumexp(-1).sum().backward()
    for name, p in shared.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("attention", ["softmax", "linear", "mlp"])
@pytest.mark.parametrize("kdim", [None, 6])
def test_attention_without_key_value_projection(attention, kdim):
    cls = attention_class(attention)
    full_layer = perturbed(cls(8, 2, kdim=kdim, vdim=kdim, num_kv_heads=1, backend="pyg"))
    layer = cls(8, 2, kdim=kdim, vdim=kdim, num_kv_heads=1, backend="pyg", project_kv=False)
    if kdim is None:
        assert layer.in_proj_weight.shape == (8, 8) and layer.in_proj_bias.shape == (8,)
    else:
        assert layer.q_proj_weight.shape == (8, 8) and layer.in_proj_bias.shape == (8,)
        assert layer.k_proj_weight is None and layer.v_proj_weight is None
    w_q, w_k, w_v = layer.projection_weights()
    assert w_q.shape == (8, 8) and w_k is None and w_v is None
    assert layer.projection_biases()[1:] == (None, None)
    assert "project_kv=False" in repr(layer)
    # the query projection of a full layer, loaded by hand, attends like the full layer with kv=
    w_q_full, _, _ = full_layer.projection_weights()
    b_q_full, _, _ = full_layer.projection_biases()
    state = {
        k: v
        for k, v in full_layer.state_dict().items()
        if not k.startswith(("in_proj", "q_proj", "k_proj", "v_proj", "k_hidden", "v_hidden"))
    }
    state["in_proj_weight" if kdim is None else "q_proj_weight"] = w_q_full
    state["in_proj_bias"] = b_q_full
    layer.load_state_dict(state)
    layer.eval()
    x_src = torch.randn(4, 8 if kdim is None else 6)
    x = torch.randn(3, 8)
    edge_index = torch.tensor([[0, 1, 2, 3, 3], [0, 0, 1, 1, 2]])
    kv = full_layer.key_value(x_src)
    torch.testing.assert_close(layer(x, edge_index, kv=kv), full_layer((x_src, x), edge_index), **TOL[torch.float32])
    with pytest.raises(ValueError, match="'kv'"):
        layer(x, torch.tensor([[0, 1], [1, 2]]))
    with pytest.raises(ValueError, match="no key/value projection"):
        layer.key_value(x_src)
    with pytest.raises(ValueError, match="no key/value projection"):
        dense.key_value(layer, x_src.unsqueeze(0))
    with pytest.raises(ValueError, match="'project_kv'"):
        cls(8, 2, project_kv=None)


def test_drop_key_value_projection_keeps_the_query():
    layer = perturbed(GraphMultiheadAttention(8, 2, num_kv_heads=1))
    w_q, b_q = (t.detach().clone() for t in (layer.in_proj_weight[:8], layer.in_proj_bias[:8]))
    layer.drop_key_value_projection()
    assert not layer.project_kv
    torch.testing.assert_close(layer.in_proj_weight, w_q, rtol=0, atol=0)
    torch.testing.assert_close(layer.in_proj_bias, b_q, rtol=0, atol=0)
    assert sorted(layer.state_dict()) == sorted(
        GraphMultiheadAttention(8, 2, num_kv_heads=1, project_kv=False).state_dict()
    )


def test_kv_sharing_differs_from_no_sharing():
    torch.manual_seed(3)
    config = GraphTransformerConfig(vocab_size=11, d_model=16, nhead=4, num_layers=4, kv_share_every=2, backend="pyg")
    shared = GraphLM(config).eval()
    config_plain = GraphTransformerConfig(**{**config.__dict__, "kv_share_every": 1})
    plain = GraphLM(config_plain).eval()
    # the sharing layers keep only the query rows of the in-projection
    shared_state = shared.state_dict()
    shared.load_state_dict({k: v[: shared_state[k].size(0)] for k, v in plain.state_dict().items()})
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["full", "random"])
@pytest.mark.parametrize("attention", [GraphMultiheadAttention, SigmoidAttention])
def test_scale_and_softcap_match_dense(attention, kind, dtype):
    layer = perturbed(attention(16, 4, num_kv_heads=2, scale=0.9, softcap=1.5, dtype=dtype, backend="pyg"))
    _check_attention(layer, kind, dtype, bias=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_attention_scale_is_a_query_scale(dtype):
    # scores q.k * scale equal the default scores of queries scaled by scale * sqrt(D)
    scaled = perturbed(SigmoidAttention(16, 4, scale=0.9, dtype=dtype, backend="pyg"))
    plain = SigmoidAttention(16, 4, dtype=dtype, backend="pyg").eval()
    plain.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        factor = 0.9 * plain.head_dim**0.5
        plain.in_proj_weight[:16].mul_(factor)
        plain.in_proj_bias[:16].mul_(factor)
    x, edge_index = torch.randn(sum(LENGTHS), 16, dtype=dtype), _graph("random", LENGTHS)
    torch.testing.assert_close(scaled(x, edge_index), plain(x, edge_index), **TOL[dtype])


def test_sigmoid_attention_softcap_bounds_the_scores():
    capped = SigmoidAttention(8, 2, softcap=0.5, score_bias=0.0, backend="pyg")
    plain = SigmoidAttention(8, 2, score_bias=0.0, backend="pyg")
    plain.load_state_dict(capped.state_dict())
    x = 100 * torch.randn(5, 8)  # scores far beyond the cap
    bound = torch.sigmoid(torch.tensor(0.5))  # sigmoid of scores in [-0.5, 0.5]
    _, alpha = capped(x, full(5), return_attention_weights=True)  # [E, H]
    _, alpha_plain = plain(x, full(5), return_attention_weights=True)
    assert ((alpha >= 1 - bound) & (alpha <= bound)).all()
    assert ((alpha_plain < 1 - bound) | (alpha_plain > bound)).any()


@pytest.mark.parametrize("name,value", [("scale", 0.5), ("softcap", 30.0)])
def test_linear_attention_refuses_scale_and_softcap(name, value):
    with pytest.raises(ValueError, match=f"LinearAttention takes no '{name}'.*{name}={value}"):
        LinearAttention(8, 2, backend="pyg", **{name: value})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("attention", [SigmoidAttention, LinearAttention])
def test_edge_weight_variants_run_an_implicit_graph_as_its_edges(attention, dtype):
    """A BlockGraph (shared by the heads, or per head) runs as its materialized edges: outputs and
    gradients equal the explicit graph's (it failed inside PyG's propagate)."""
    from gnn_transformer.topology.dynamic import block_topk

    torch.manual_seed(0)
    layer = perturbed(attention(8, 2)).to(dtype)
    x = torch.randn(6, 8, dtype=dtype)
    q, k = torch.randn(6, 2, 4), torch.randn(6, 2, 4)  # a per-head selection of key blocks
    selected = dict(causal=True, lengths=[4, 2])
    for implicit, explicit in (
        (causal([4, 2], implicit=True, block_size=2), (causal([4, 2]), None)),
        (block_topk(q, k, 2, 1, implicit=True, **selected), block_topk(q, k, 2, 1, **selected)),
    ):
        got_x, want_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = layer(got_x, implicit)
        want = layer(want_x, explicit[0], edge_head=explicit[1])
        torch.testing.assert_close(got, want, **TOL[dtype])
        got.square().sum().backward()
        want.square().sum().backward()
        torch.testing.assert_close(got_x.grad, want_x.grad, **TOL[dtype])
    with pytest.raises(ValueError, match="no 'edge_head' with an implicit graph"):
        layer(x, causal([4, 2], implicit=True, block_size=2), edge_head=torch.zeros(0, dtype=torch.long))


# ---------------------------------------------------------------- dense reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["full", "random"])
@pytest.mark.parametrize("eps", [0.01, 0.5, 3.0])
def test_linear_attention_eps_matches_dense(eps, kind, dtype):
    """The dense reference normalizes with the layer's own ``eps``, not the default ``1e-6``."""
    layer = perturbed(LinearAttention(16, 4, num_kv_heads=2, eps=eps, dtype=dtype, backend="pyg"))
    _check_attention(layer, kind, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_linear_attention_default_eps_is_the_layers(dtype):
    """Called without ``eps``, dense.linear_attention normalizes with LinearAttention's default;
    scores kept small (phi(x) = elu(x) + 1 of x near -4) so that eps shows in the weights."""
    q, k, v = (torch.randn(2, 2, 4, 3, dtype=dtype) - 4 for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool).tril().expand(2, 4, 4)
    out, weights = dense.linear_attention(q, k, v, mask)
    eps = LinearAttention(8, 2).eps
    assert eps == 1e-6
    kernel = ((torch.nn.functional.elu(q) + 1) @ (torch.nn.functional.elu(k) + 1).transpose(-1, -2)) * mask[:, None]
    want = kernel / (kernel.sum(-1, keepdim=True) + eps)
    torch.testing.assert_close(weights, want, **TOL[dtype])
    torch.testing.assert_close(out, want @ v, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_sigmoid_attention_minus_inf_bias_off_the_mask_changes_nothing(dtype):
    """An additive bias of -inf where the mask forbids (the other spelling of a mask) gives the
    hand-computed ``sigmoid(q k^T / sqrt(D) - log n_i) * mask``, zeros in a row without keys."""
    q, k, v = (torch.randn(2, 2, 4, 3, dtype=dtype) for _ in range(3))
    mask = torch.ones(2, 4, 4, dtype=torch.bool).tril()
    mask[:, 1] = False  # row 1: no key
    bias = torch.zeros(2, 1, 4, 4, dtype=dtype).masked_fill(~mask[:, None], float("-inf"))
    out, weights = dense.sigmoid_attention(q, k, v, mask, bias=bias)
    count = mask.sum(-1, keepdim=True).clamp(min=1)[:, None].to(dtype)  # [B, 1, T, 1]
    want = torch.sigmoid(q @ k.transpose(-1, -2) / 3**0.5 - count.log()) * mask[:, None]
    torch.testing.assert_close(weights, want, **TOL[dtype])
    torch.testing.assert_close(out, want @ v, **TOL[dtype])
    assert (out[:, :, 1] == 0).all()


@pytest.mark.parametrize("attention", [SigmoidAttention, LinearAttention])
def test_edge_weight_variants_drop_weights_in_training_only_and_return_them_undropped(attention):
    """Attention dropout acts in training only, and the returned weights are those before dropout
    (as ``GraphMultiheadAttention`` documents for ``return_attention_weights``)."""
    torch.manual_seed(0)
    layer = perturbed(attention(16, 4, dropout=0.5, backend="pyg"))  # eval mode
    x, edge_index = torch.randn(9, 16), causal([5, 4])
    out_eval, w_eval = layer(x, edge_index, return_attention_weights=True)
    layer.train()
    torch.manual_seed(1)
    out_a, w_a = layer(x, edge_index, return_attention_weights=True)
    torch.manual_seed(1)
    out_b, _ = layer(x, edge_index, return_attention_weights=True)
    torch.testing.assert_close(w_a, w_eval)  # the weights before dropout
    torch.testing.assert_close(out_a, out_b)  # one seed, one dropout mask
    assert not torch.allclose(out_a, out_eval, atol=1e-4)  # dropout changed the output
    layer.eval()
    torch.testing.assert_close(layer(x, edge_index), out_eval)  # back in eval: no dropout


@pytest.mark.parametrize("attention", [SigmoidAttention, LinearAttention])
@pytest.mark.parametrize("backend", ["fused", "tiled"])
def test_edge_weight_variants_refuse_a_kernel_backend_at_construction(attention, backend):
    """The variants run on message passing only: a softmax-only kernel backend is refused when the
    layer is built, not at its first call."""
    with pytest.raises(ValueError, match=f"runs on message passing only.*'{backend}'"):
        attention(8, 2, backend=backend)


def test_mlp_projection_hidden_layers_follow_the_layers_bias():
    """``bias=False`` removes every bias, the hidden layers' included (as nn.MultiheadAttention's ``bias``)."""
    layer = MLPProjectionAttention(8, 2, bias=False, backend="pyg")
    assert all(getattr(layer, name).bias is None for name in ("q_hidden", "k_hidden", "v_hidden"))
    assert not any(name.endswith("bias") for name, _ in layer.named_parameters())
    with_bias = MLPProjectionAttention(8, 2, backend="pyg")
    assert all(getattr(with_bias, name).bias is not None for name in ("q_hidden", "k_hidden", "v_hidden"))


@pytest.mark.parametrize(
    "options",
    [dict(edge_head=torch.zeros(0, dtype=torch.long)), dict(edge_bias=torch.zeros(8, 2, dtype=torch.float64))],
    ids=["edge_head", "edge_bias"],
)
def test_sigmoid_attention_attend_refuses_what_an_implicit_graph_cannot_take(options):
    """Called directly on projected heads, SigmoidAttention.attend refuses an edge_head (a BlockGraph
    carries its heads) or an edge_bias (a BlockGraph has no edge order) with an implicit graph,
    instead of replacing or misaligning them."""
    torch.manual_seed(0)
    layer = SigmoidAttention(8, 2).double()
    q = torch.randn(6, 2, 4, dtype=torch.float64)
    graph = causal([4, 2], implicit=True, block_size=2)  # 8 edges
    name = next(iter(options))
    with pytest.raises(ValueError, match=f"no '{name}' with an implicit graph"):
        layer.attend(q, q, q, graph, **options)


@pytest.mark.parametrize("layer_type", ["GraphMultiheadAttention", "MLPProjectionAttention"])
@pytest.mark.parametrize(
    "options",
    [dict(edge_head=torch.zeros(8, dtype=torch.long)), dict(edge_bias=torch.zeros(8, 2, dtype=torch.float64))],
    ids=["edge_head", "edge_bias"],
)
def test_attend_refuses_what_an_implicit_graph_cannot_take(layer_type, options):
    """Called directly, the base layer's attend (which MLPProjectionAttention uses) refuses an
    edge_head or an edge_bias with an implicit graph, as forward does, instead of dropping the bias
    or failing elsewhere."""
    from gnn_transformer import GraphMultiheadAttention

    layer = {"GraphMultiheadAttention": GraphMultiheadAttention, "MLPProjectionAttention": MLPProjectionAttention}[
        layer_type
    ](8, 2).double()
    q = torch.randn(6, 2, 4, dtype=torch.float64)
    graph = causal([4, 2], implicit=True, block_size=2)  # 8 edges
    name = next(iter(options))
    with pytest.raises(ValueError, match=f"no '{name}' with an implicit graph"):
        layer.attend(q, q, q, graph, **options)
