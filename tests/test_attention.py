"""GraphMultiheadAttention against torch.nn.MultiheadAttention and against the dense reference."""

from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch_geometric import EdgeIndex
from torch_geometric.nn import TransformerConv

from gnn_transformer import GraphMultiheadAttention, dense, from_padded, to_padded
from gnn_transformer.topology import causal, erdos_renyi, full, to_dense_mask

from .conftest import TOL

DTYPES = [torch.float32, torch.float64]
BACKENDS = ["pyg", "auto", "fused", "tiled", "split"]


def _mha_pair(embed_dim=16, num_heads=4, dtype=torch.float32, **kw):
    torch_mha = nn.MultiheadAttention(embed_dim, num_heads, dtype=dtype, **kw)
    with torch.no_grad():  # nonzero biases so that every parameter matters
        for p in torch_mha.parameters():
            p.add_(0.1 * torch.randn_like(p))
    layer = GraphMultiheadAttention(embed_dim, num_heads, dtype=dtype, **kw)
    layer.load_state_dict(torch_mha.state_dict())
    return torch_mha.eval(), layer.eval()


def _assert_grads_close(a: nn.Module, b: nn.Module, dtype):
    grads_a = {n: p.grad for n, p in a.named_parameters()}
    for name, p in b.named_parameters():
        torch.testing.assert_close(p.grad, grads_a[name], **TOL[dtype], msg=name)


# ---------------------------------------------------------------- vs torch.nn.MultiheadAttention
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["full", "causal", "random"])
@pytest.mark.parametrize("lengths", [[5], [4, 1, 6]])
def test_matches_torch_mha_on_padded_batches(kind, lengths, dtype, backend):
    torch_mha, layer = _mha_pair(dtype=dtype)
    b, t = len(lengths), max(lengths)
    x_pad = torch.randn(b, t, 16, dtype=dtype)
    x = from_padded(x_pad, lengths).requires_grad_()
    n = sum(lengths)
    if kind == "full":
        edge_index = full(lengths)
    elif kind == "causal":
        edge_index = causal(lengths)
    else:  # random edges inside each sequence, every node with an incoming edge
        blocks, offset = [], 0
        for i, length in enumerate(lengths):
            g = erdos_renyi(length, p=0.4, seed=i, min_in_degree=1)
            blocks.append(g.as_tensor() + offset)
            offset += length
        edge_index = torch.cat(blocks, dim=1)
    mask = to_dense_mask(edge_index, n, n, lengths=lengths)  # [B, T, T], True = may attend
    out, alpha = layer(x, edge_index, return_attention_weights=True, backend=backend)

    x_ref = to_padded(x.detach(), lengths).requires_grad_()
    # nn.MultiheadAttention's boolean masks mean "not allowed"; padded queries get a dummy key
    attn_mask = ~(mask | ~mask.any(-1, keepdim=True) & (torch.arange(t) == 0))
    attn_mask = attn_mask.repeat_interleave(4, dim=0)  # [B * H, T, T]
    ref, ref_w = torch_mha(
        x_ref.transpose(0, 1),
        x_ref.transpose(0, 1),
        x_ref.transpose(0, 1),
        attn_mask=attn_mask,
        average_attn_weights=False,
    )
    ref = ref.transpose(0, 1)  # [B, T, C]
    torch.testing.assert_close(out, from_padded(ref, lengths), **TOL[dtype])
    dense_alpha = dense.edge_values_to_dense(edge_index, alpha, lengths)  # [B, H, T, T]
    torch.testing.assert_close(dense_alpha, ref_w * mask.unsqueeze(1), **TOL[dtype])

    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (from_padded(ref, lengths) * grad).sum().backward()
    torch.testing.assert_close(x.grad, from_padded(x_ref.grad, lengths), **TOL[dtype])
    _assert_grads_close(torch_mha, layer, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_mha_with_kdim_vdim(dtype):
    torch_mha, layer = _mha_pair(16, 2, dtype=dtype, kdim=6, vdim=10)
    assert layer.in_proj_weight is None and layer.k_proj_weight.shape == (16, 6)
    x_q = torch.randn(3, 16, dtype=dtype)
    x_k, x_v = torch.randn(5, 6, dtype=dtype), torch.randn(5, 10, dtype=dtype)
    src, dst = torch.meshgrid(torch.arange(5), torch.arange(3), indexing="xy")
    edge_index = torch.stack([src.reshape(-1), dst.reshape(-1)])
    out = layer((x_k, x_q), edge_index, value=x_v)
    ref, _ = torch_mha(x_q[:, None], x_k[:, None], x_v[:, None])
    torch.testing.assert_close(out, ref[:, 0], **TOL[dtype])


def test_state_dict_loads_both_ways():
    layer = GraphMultiheadAttention(12, 3)
    torch_mha = nn.MultiheadAttention(12, 3)
    torch_mha.load_state_dict(layer.state_dict())
    assert set(layer.state_dict()) == set(torch_mha.state_dict())
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, torch_mha.state_dict()[name])
    no_bias = GraphMultiheadAttention(12, 3, bias=False)
    assert set(no_bias.state_dict()) == set(nn.MultiheadAttention(12, 3, bias=False).state_dict())


# ---------------------------------------------------------------- vs the dense reference
def _check_against_dense(layer, x_src, x_dst, edge_index, dtype, edge_bias=None, backend="pyg"):
    x_src = x_src.clone().requires_grad_()
    x_dst = x_dst.clone().requires_grad_() if x_dst is not x_src else x_src
    bipartite = x_dst is not x_src
    x_in = (x_src, x_dst) if bipartite else x_src
    bias = edge_bias.clone().requires_grad_() if edge_bias is not None else None
    out, alpha = layer(x_in, edge_index, edge_bias=bias, return_attention_weights=True, backend=backend)
    n_src, n_dst = x_src.size(0), x_dst.size(0)
    mask = to_dense_mask(edge_index, n_src, n_dst)  # [N_dst, N_src]
    dense_bias = None
    if bias is not None:
        dense_bias = dense.edge_values_to_dense(edge_index, bias, [n_src], [n_dst])  # [1, H, ...]
    ref, ref_w = dense.multihead_attention(layer, x_dst.unsqueeze(0), x_src.unsqueeze(0), mask, bias=dense_bias)
    torch.testing.assert_close(out, ref[0], **TOL[dtype])
    torch.testing.assert_close(dense.edge_values_to_dense(edge_index, alpha, [n_src], [n_dst]), ref_w, **TOL[dtype])
    assert torch.isfinite(out).all()

    grad = torch.randn_like(out)
    inputs = [x_src] + ([x_dst] if bipartite else []) + ([bias] if bias is not None else [])
    params = list(layer.parameters())
    g_graph = torch.autograd.grad((out * grad).sum(), inputs + params, allow_unused=True)
    g_dense = torch.autograd.grad((ref[0] * grad).sum(), inputs + params, allow_unused=True)
    for a, b in zip(g_graph, g_dense):
        torch.testing.assert_close(a, b, **TOL[dtype])
    return out, alpha


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("self_loops", [True, False])
def test_empty_rows_give_zero_attention(self_loops, dtype, backend):
    layer = GraphMultiheadAttention(8, 2, dtype=dtype).eval()
    # node 1 and node 4 have no incoming edge
    edges = [(2, 0), (3, 2), (4, 3), (0, 3), (1, 2)]
    if self_loops:
        edges += [(0, 0), (2, 2), (3, 3)]
    edge_index = torch.tensor(edges).t()
    x = torch.randn(5, 8, dtype=dtype)
    out, alpha = _check_against_dense(layer, x, x, edge_index, dtype, backend=backend)
    # zero attention output: only the output projection's bias remains
    torch.testing.assert_close(out[[1, 4]], layer.out_proj.bias.expand(2, -1).detach(), **TOL[dtype])
    sums = torch.zeros(5, 2, dtype=dtype).index_add_(0, edge_index[1], alpha)
    torch.testing.assert_close(sums[[0, 2, 3]], torch.ones(3, 2, dtype=dtype), **TOL[dtype])
    assert (alpha >= 0).all() and (alpha <= 1).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_src,num_dst", [(7, 3), (2, 6), (1, 1), (5, 5)])
def test_bipartite_cross_attention(num_src, num_dst, dtype, backend):
    layer = GraphMultiheadAttention(12, 3, dtype=dtype).eval()
    edge_index = erdos_renyi(num_src, num_dst, p=0.5, seed=num_src * 10 + num_dst)
    x_src = torch.randn(num_src, 12, dtype=dtype)
    x_dst = torch.randn(num_dst, 12, dtype=dtype)
    _check_against_dense(layer, x_src, x_dst, edge_index, dtype, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1), (6, 3)])
def test_grouped_query_attention(num_heads, num_kv_heads, dtype, backend):
    layer = GraphMultiheadAttention(24, num_heads, num_kv_heads=num_kv_heads, dtype=dtype).eval()
    assert layer.in_proj_weight.shape == (24 + 2 * num_kv_heads * (24 // num_heads), 24)
    with torch.no_grad():
        layer.in_proj_bias.normal_()
    edge_index = causal(6)
    x = torch.randn(6, 24, dtype=dtype)
    _check_against_dense(layer, x, x, edge_index, dtype, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_bias(dtype, backend):
    layer = GraphMultiheadAttention(8, 2, dtype=dtype).eval()
    edge_index = erdos_renyi(6, p=0.5, seed=3)
    bias = torch.randn(edge_index.size(1), 2, dtype=dtype)
    x = torch.randn(6, 8, dtype=dtype)
    out, _ = _check_against_dense(layer, x, x, edge_index, dtype, edge_bias=bias, backend=backend)
    assert not torch.allclose(out, layer(x, edge_index, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_node_and_no_edges(backend):
    layer = GraphMultiheadAttention(8, 2, dtype=torch.float64).eval()
    x = torch.randn(1, 8, dtype=torch.float64)
    _check_against_dense(layer, x, x, torch.tensor([[0], [0]]), torch.float64, backend=backend)
    empty = torch.empty(2, 0, dtype=torch.long)
    out, alpha = layer(x, empty, return_attention_weights=True, backend=backend)
    assert alpha.shape == (0, 2)
    torch.testing.assert_close(out, layer.out_proj.bias.detach().expand(1, -1))


def test_duplicate_edges_are_two_messages():
    layer = GraphMultiheadAttention(8, 1, dtype=torch.float64).eval()
    x = torch.randn(2, 8, dtype=torch.float64)
    edge_index = torch.tensor([[0, 0, 1], [1, 1, 1]])
    _, alpha = layer(x, edge_index, return_attention_weights=True, backend="pyg")
    # the doubled key gets twice the weight of a single copy: alpha_0 = alpha_1 = e^s0 / (2e^s0 + e^s1)
    torch.testing.assert_close(alpha[0], alpha[1])
    torch.testing.assert_close(alpha.sum(0), torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="multigraph|duplicate"):
        to_dense_mask(edge_index, 2, 2)


def test_edge_index_object_equals_plain_tensor():
    layer = GraphMultiheadAttention(8, 2).eval()
    x = torch.randn(5, 8)
    ei = causal(5)
    assert isinstance(ei, EdgeIndex) and ei.is_sorted_by_col
    torch.testing.assert_close(layer(x, ei, backend="pyg"), layer(x, ei.as_tensor(), backend="pyg"))
    perm = torch.randperm(ei.size(1))  # unsorted edges: same result
    torch.testing.assert_close(layer(x, ei.as_tensor()[:, perm], backend="pyg"), layer(x, ei, backend="pyg"))


def _block_and_tail():
    """72 tokens: the first 56 attend to one another (one tile of 64 x 64 cells, 77% full), the other
    16 to themselves and three more. Under attention dropout split tiles that tile and fuses the
    other edges, and auto picks split (asserted here)."""
    from gnn_transformer.kernels import choose_backend, plan_costs

    src = [j for i in range(56) for j in range(56)]
    dst = [i for i in range(56) for _ in range(56)]
    for i in range(56, 72):
        for j in sorted({i, 0, i - 56, (7 * i) % 72}):
            src.append(j)
            dst.append(i)
    edge_index = torch.tensor([src, dst])
    costs = plan_costs(edge_index, "cpu", dropout=True)
    assert costs["dense_tiles"] > 0 and 0 < costs["dense_edges"] < costs["edges"]
    assert choose_backend(edge_index, "cpu", dropout=True) == "split"
    return edge_index


def test_dropout_on_attention_weights():
    layer = GraphMultiheadAttention(8, 2, dropout=0.5)
    x = torch.randn(6, 8)
    ei = full(6)
    torch.manual_seed(1)
    a = layer(x, ei)
    torch.manual_seed(2)
    b = layer(x, ei)
    assert not torch.allclose(a, b)
    layer.eval()
    no_dropout = GraphMultiheadAttention(8, 2).eval()
    no_dropout.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x, ei), no_dropout(x, ei))
    layer.train()
    assert layer.resolve_backend(ei, x.device) in ("fused", "tiled", "split")  # auto: a kernel with dropout
    assert layer.resolve_backend(ei, x.device, "pyg") == "pyg"
    # every kernel drops the same weights, on a graph where split really tiles a block and fuses the rest
    ei = _block_and_tail()
    y = torch.randn(72, 8)
    outs = {}
    for backend in ("fused", "tiled", "split"):
        torch.manual_seed(1)
        outs[backend] = layer(y, ei, backend=backend)
    torch.testing.assert_close(outs["split"], outs["fused"])
    torch.testing.assert_close(outs["tiled"], outs["fused"])
    layer.eval()
    assert not torch.allclose(outs["split"], layer(y, ei, backend="split"))  # it did drop weights


@pytest.mark.parametrize("backend", ["auto", "fused", "tiled"])
def test_dropout_in_the_kernels_is_inverted_dropout(backend):
    """Training with attention dropout on the kernel: the mask follows torch's seed, about ``p`` of
    the weights go, and the mean output over many masks is the output without dropout. auto runs on
    a graph where it picks split."""
    torch.manual_seed(0)
    p = 0.3
    layer = GraphMultiheadAttention(16, 2, dropout=p, backend=backend).double()
    ei = _block_and_tail() if backend == "auto" else full(40)
    n = int(ei.max()) + 1
    assert layer.resolve_backend(ei, torch.device("cpu")) == ("split" if backend == "auto" else backend)
    x = torch.randn(n, 16, dtype=torch.float64)
    torch.manual_seed(5)
    a = layer(x, ei)
    torch.manual_seed(5)
    torch.testing.assert_close(layer(x, ei), a, rtol=0, atol=0)  # seeded by torch's generator
    # the drop rate: with q = k = 0 every weight is 1 / deg_i, and values of 1 make each output channel
    # count the kept weights of its target and head, times 1 / (deg_i (1 - p))
    plain = ei.as_tensor() if hasattr(ei, "as_tensor") else ei
    deg = torch.bincount(plain[1], minlength=n).double()  # [N], no empty rows
    zeros, ones = torch.zeros(n, 2, 8, dtype=torch.float64), torch.ones(n, 2, 8, dtype=torch.float64)
    kept, total = 0.0, 0
    for seed in range(10):
        torch.manual_seed(100 + seed)
        heads, _ = layer.attend(zeros, zeros, ones, ei)  # [N, H, D]
        count = heads[..., 0] * deg[:, None] * (1 - p)  # [N, H] kept weights per target and head
        torch.testing.assert_close(count, count.round(), rtol=0, atol=1e-9)
        assert (heads == heads[..., :1]).all()
        kept, total = kept + count.round().sum().item(), total + plain.size(1) * 2
    rate = 1 - kept / total
    assert abs(rate - p) < 4 * (p * (1 - p) / total) ** 0.5  # 4 standard deviations of the binomial
    outs = torch.stack([layer(x, ei) for _ in range(400)])
    layer.eval()
    ref = layer(x, ei)
    assert not torch.allclose(a, ref)
    assert (outs.mean(0) - ref).abs().max() < 0.15 * ref.abs().max()


# ---------------------------------------------------------------- property-based
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_src=st.integers(1, 9),
    num_dst=st.integers(1, 9),
    p=st.floats(0.0, 1.0),
    heads=st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (4, 4)]),
    seed=st.integers(0, 10_000),
    bipartite=st.booleans(),
    with_bias=st.booleans(),
)
def test_property_graph_equals_dense(num_src, num_dst, p, heads, seed, bipartite, with_bias):
    num_heads, num_kv_heads = heads
    dtype = torch.float64
    if not bipartite:
        num_dst = num_src
    torch.manual_seed(seed)
    layer = GraphMultiheadAttention(4 * num_heads, num_heads, num_kv_heads=num_kv_heads, dtype=dtype).eval()
    edge_index = erdos_renyi(num_src, num_dst, p=p, seed=seed)
    x_src = torch.randn(num_src, 4 * num_heads, dtype=dtype)
    x_dst = torch.randn(num_dst, 4 * num_heads, dtype=dtype) if bipartite else x_src
    bias = torch.randn(edge_index.size(1), num_heads, dtype=dtype) if with_bias else None
    _check_against_dense(layer, x_src, x_dst, edge_index, dtype, edge_bias=bias)


# ---------------------------------------------------------------- gradcheck
def test_gradcheck_float64():
    layer = GraphMultiheadAttention(4, 2, num_kv_heads=1, dtype=torch.float64).eval()
    edge_index = torch.tensor([[0, 1, 2, 2, 0], [0, 0, 1, 2, 2]])  # node 3 has no incoming edge
    x = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: layer(x, edge_index, edge_bias=b, backend="pyg"), (x, bias))


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "edge_index,match",
    [
        (torch.tensor([0, 1]), r"shape \[2, E\]"),
        (torch.zeros(3, 2, dtype=torch.long), r"shape \[2, E\].*\[3, 2\]"),
        (torch.zeros(2, 2), "integers.*float32"),
        (torch.tensor([[0, -1], [0, 0]]), "non-negative.*-1"),
        (torch.tensor([[0, 4], [0, 0]]), "source index 4"),
        (torch.tensor([[0, 0], [0, 7]]), "target index 7"),
    ],
)
def test_bad_edge_index(edge_index, match):
    layer = GraphMultiheadAttention(8, 2)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(4, 8), edge_index)


def test_edge_index_object_with_other_sparse_size():
    layer = GraphMultiheadAttention(8, 2)
    with pytest.raises(ValueError, match=r"sparse_size \(4, 4\).*got \(5, 5\)"):
        layer(torch.randn(4, 8), causal(5))
    with pytest.raises(ValueError, match=r"sparse_size \(4, 3\)"):
        layer((torch.randn(4, 8), torch.randn(3, 8)), erdos_renyi(4, 4, p=0.5))


def test_bad_arguments():
    with pytest.raises(ValueError, match="'embed_dim' \\(10\\).*'num_heads' \\(3\\)"):
        GraphMultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="'num_heads' \\(4\\).*'num_kv_heads' \\(3\\)"):
        GraphMultiheadAttention(8, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="'backend'.*'cuda'"):
        GraphMultiheadAttention(8, 4, backend="cuda")
    for kwargs, match in (
        ({"kdim": 0}, "'kdim'.*0"),
        ({"vdim": -3}, "'vdim'.*-3"),
        ({"kdim": True}, "'kdim'.*True"),
        ({"dropout": "0.1"}, "'dropout'.*'0.1'"),
        ({"dropout": 1.0}, "'dropout'.*1.0"),
        ({"num_kv_heads": 0}, "'num_kv_heads'"),
    ):
        with pytest.raises(ValueError, match=match):
            GraphMultiheadAttention(8, 4, **kwargs)
    layer = GraphMultiheadAttention(8, 2)
    with pytest.raises(ValueError, match=r"'x'.*\[N, 8\].*\[4, 6\]"):
        layer(torch.randn(4, 6), causal(4))
    with pytest.raises(ValueError, match=r"'edge_bias'.*\[10, 2\].*\[10, 3\]"):
        layer(torch.randn(4, 8), causal(4), edge_bias=torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"'x\[0\]'"):
        layer((torch.randn(4, 5), torch.randn(3, 8)), causal(3))


# ---------------------------------------------------------------- teaching anchor: TransformerConv
@pytest.mark.parametrize("dtype", DTYPES)
def test_relation_to_pyg_transformer_conv(dtype):
    """PyG's TransformerConv (root_weight=False, concat heads) is our layer minus the output projection."""
    embed_dim, heads = 12, 3
    d = embed_dim // heads
    layer = GraphMultiheadAttention(embed_dim, heads, dtype=dtype).eval()
    conv = TransformerConv(embed_dim, d, heads=heads, root_weight=False).to(dtype).eval()
    w_q, w_k, w_v = layer.projection_weights()
    b_q, b_k, b_v = layer.projection_biases()
    with torch.no_grad():
        for lin, w, b in ((conv.lin_query, w_q, b_q), (conv.lin_key, w_k, b_k), (conv.lin_value, w_v, b_v)):
            lin.weight.copy_(w)
            lin.bias.copy_(b + 0.1)  # nonzero biases
        layer.in_proj_bias.add_(0.1)
    edge_index = erdos_renyi(7, p=0.4, seed=5, min_in_degree=1)
    x = torch.randn(7, embed_dim, dtype=dtype)
    ours = layer(x, edge_index, backend="pyg")
    theirs = layer.out_proj(conv(x, edge_index))
    torch.testing.assert_close(ours, theirs, **TOL[dtype])


def test_dense_reference_needs_key_value_projections():
    layer = GraphMultiheadAttention(8, 2, project_kv=False)
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="'layer' with key/value projections"):
        dense.multihead_attention(layer, x, x, torch.ones(3, 3, dtype=torch.bool))


def test_scale_whose_float_is_zero_is_refused():
    """A positive number that rounds to 0.0 is not a scale > 0 (every edge would score the same)."""
    with pytest.raises(ValueError, match="'scale' to be a finite number > 0.0"):
        GraphMultiheadAttention(8, 2, scale=Fraction(1, 10**400))
    assert GraphMultiheadAttention(8, 2, scale=Fraction(1, 4)).scale == 0.25


def test_pos_pair_needs_a_bipartite_input():
    layer = GraphMultiheadAttention(8, 2, rope=True)
    x, edge_index, pos = torch.randn(3, 8), causal(3), torch.arange(3)
    with pytest.raises(ValueError, match="'pos' to hold one position per node, shape \\[3\\]"):
        layer(x, edge_index, pos=(pos, pos))
    kv = layer.key_value(x, pos=pos)
    with pytest.raises(ValueError, match="'pos' to hold one position per query node, shape \\[3\\]"):
        layer(x, edge_index, kv=kv, pos=(pos, pos))
    torch.testing.assert_close(
        layer(x, edge_index, kv=kv, pos=pos), layer(x, edge_index, pos=pos), **TOL[torch.float32]
    )


def test_auto_runs_sdpa_on_a_causal_graph_with_the_same_result():
    # the layer under "auto" reaches the kernels' SDPA path on exactly causal graphs, weights included
    from gnn_transformer.topology import causal, sliding_window

    torch.manual_seed(0)
    layer = GraphMultiheadAttention(32, 4, num_kv_heads=2, backend="auto", dtype=torch.float64)
    x = torch.randn(40, 32, dtype=torch.float64)
    graph = causal([15, 25])
    assert layer.resolve_backend(graph, x.device) == "sdpa"
    assert layer.resolve_backend(graph, x.device, edge_bias=True) != "sdpa"
    assert layer.resolve_backend(sliding_window(40, 3, causal=True), x.device) != "sdpa"
    out, alpha = layer(x, graph, return_attention_weights=True)
    layer.backend = "pyg"
    ref, ref_alpha = layer(x, graph, return_attention_weights=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(alpha, ref_alpha, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", ["pyg", "fused", "tiled"])
def test_attention_weights_are_returned_before_dropout(backend):
    """``return_attention_weights`` gives the softmax before attention dropout (documented in
    ``forward``): in training mode with ``dropout=0.5`` they are the weights of evaluation mode,
    summing to 1 over each target's edges, while the output itself is dropped."""
    torch.manual_seed(0)
    layer = GraphMultiheadAttention(8, 2, dropout=0.5, backend=backend)
    x, ei = torch.randn(6, 8), full(6)
    torch.manual_seed(1)
    out, alpha = layer(x, ei, return_attention_weights=True)
    layer.eval()
    clean, clean_alpha = layer(x, ei, return_attention_weights=True)
    assert not torch.allclose(out, clean)  # dropout did act on the output
    torch.testing.assert_close(alpha, clean_alpha, **TOL[torch.float32])
    sums = torch.zeros(6, 2).index_add_(0, ei.as_tensor()[1], alpha)
    torch.testing.assert_close(sums, torch.ones(6, 2), **TOL[torch.float32])


# ---------------------------------------------------------------- dense reference


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 3), (3, 2), (2, 4)])
def test_dense_scaled_dot_product_refuses_query_heads_not_a_multiple_of_key_heads(num_heads, num_kv_heads):
    q = torch.randn(1, num_heads, 3, 4)
    kv = torch.randn(1, num_kv_heads, 3, 4)
    with pytest.raises(ValueError, match="divisible by key heads"):
        dense.scaled_dot_product(q, kv, kv, torch.ones(3, 3, dtype=torch.bool))


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.uint8, torch.long])
def test_dense_scaled_dot_product_refuses_a_non_boolean_mask(mask_dtype):
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="'mask' to be boolean"):
        dense.scaled_dot_product(q, q, q, torch.ones(3, 3, dtype=mask_dtype))


@pytest.mark.parametrize("p", [0.3, 0.5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_scaled_dot_product_drops_weights_in_training_only(p, dtype):
    """``out`` is ``dropout(weights) @ value`` (torch's dropout, same seed) in training and
    ``weights @ value`` otherwise; the returned weights are the ones before dropout."""
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=dtype) for _ in range(3))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.manual_seed(3)
    out, weights = dense.scaled_dot_product(q, k, v, mask, dropout_p=p, training=True)
    torch.manual_seed(3)
    expected = torch.nn.functional.dropout(weights, p=p, training=True) @ v
    torch.testing.assert_close(out, expected, **TOL[dtype])
    assert not torch.allclose(out, weights @ v)  # some weight was dropped
    eval_out, eval_weights = dense.scaled_dot_product(q, k, v, mask, dropout_p=p, training=False)
    torch.testing.assert_close(eval_weights, weights, **TOL[dtype])
    torch.testing.assert_close(eval_out, weights @ v, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_multihead_attention_drops_weights_when_the_layer_trains(dtype):
    """The dense reference follows ``layer.training`` for attention dropout: the same as
    :func:`dense.scaled_dot_product` with ``dropout_p=layer.dropout, training=True`` on the layer's
    own projections, under the same seed."""
    layer = GraphMultiheadAttention(8, 2, dropout=0.5, dtype=dtype).train()
    x = torch.randn(1, 6, 8, dtype=dtype)
    mask = torch.ones(6, 6, dtype=torch.bool)
    w_q, w_k, w_v = layer.projection_weights()
    b_q, b_k, b_v = layer.projection_biases()
    q, k, v = (
        torch.nn.functional.linear(x, w, b).view(1, 6, 2, 4).transpose(1, 2)
        for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v))
    )
    torch.manual_seed(5)
    out, _ = dense.multihead_attention(layer, x, x, mask)
    torch.manual_seed(5)
    heads, _ = dense.scaled_dot_product(q, k, v, mask, dropout_p=0.5, training=True)
    expected = layer.out_proj(heads.transpose(1, 2).reshape(1, 6, 8))
    torch.testing.assert_close(out, expected, **TOL[dtype])
    eval_out, _ = dense.multihead_attention(layer.eval(), x, x, mask)
    assert not torch.allclose(out, eval_out)


@pytest.mark.parametrize("kdim, vdim", [(16, 16), (6, 10)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_multihead_attention_takes_separate_values_like_torch(kdim, vdim, dtype):
    torch_mha, layer = _mha_pair(16, 2, dtype=dtype, kdim=kdim, vdim=vdim)
    x_q = torch.randn(2, 3, 16, dtype=dtype)
    x_k, x_v = torch.randn(2, 5, kdim, dtype=dtype), torch.randn(2, 5, vdim, dtype=dtype)
    ref, ref_w = torch_mha(x_q.transpose(0, 1), x_k.transpose(0, 1), x_v.transpose(0, 1), average_attn_weights=False)
    out, weights = dense.multihead_attention(layer, x_q, x_k, torch.ones(3, 5, dtype=torch.bool), x_value=x_v)
    torch.testing.assert_close(out, ref.transpose(0, 1), **TOL[dtype])
    torch.testing.assert_close(weights, ref_w, **TOL[dtype])


@pytest.mark.parametrize("fill_value", [0.0, -1.5, float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_values_to_dense_fills_the_missing_cells_with_fill_value(fill_value, dtype):
    """Sequences of 2 and 3 tokens, edges 0 -> 1 (first) and 4 -> 2 (second: local 2 -> 0), values
    [E, H=2]: every other cell of the padded [B, H, 3, 3] holds ``fill_value``."""
    edge_index = torch.tensor([[0, 4], [1, 2]])
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype)
    out = dense.edge_values_to_dense(edge_index, values, [2, 3], fill_value=fill_value)
    expected = torch.full((2, 2, 3, 3), fill_value, dtype=dtype)
    expected[0, :, 1, 0] = values[0]
    expected[1, :, 0, 2] = values[1]
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("edge", [(1, 2), (2, 1), (4, 0)])
def test_edge_values_to_dense_refuses_an_edge_between_two_sequences(edge):
    """Sequences of 2 and 3 tokens (nodes 0-1 and 2-4): an edge src -> dst across them is refused
    (it would otherwise land at a wrapped-around local index of the target's sequence)."""
    edge_index = torch.tensor([[0, edge[0]], [1, edge[1]]])
    with pytest.raises(ValueError, match="between two different sequences"):
        dense.edge_values_to_dense(edge_index, torch.ones(2, 2), [2, 3])
