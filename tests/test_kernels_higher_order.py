"""Higher-order gradients (``create_graph=True``) of every attention path equal those of the dense
reference: the kernels' backward passes are differentiated again through :mod:`.higher_order`'s
recomputation (per edge, or per document for PyTorch's fused attention), and the merge of
``split`` records its formulas. Gradient penalties, Hessian-vector products and meta-learning
take these."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

from gnn_transformer import GraphMultiheadAttention, kernels
from gnn_transformer import topology as T
from gnn_transformer.kernels import attend

from .conftest import (
    GRAPHS,
    _sorted_index,
    assert_second_order_equal,
    assert_splits,
    dense_attention,
    dropout_reference,
    graph_case,
    make_inputs,
    small_graph,
    split_graph,
)
from .test_kernels_per_head import per_head_case

SCALE = 0.45
# tiles of 8 cut the small test graphs into tiles and leftover edges
BLOCK = {"fused": None, "tiled": 8, "split": 8, "auto": None}


def _attend(edge_index, backend, impl=None, **kw):
    def fn(q, k, v, b=None):
        return attend(
            q,
            k,
            v,
            edge_index,
            scale=SCALE,
            edge_bias=b,
            backend=backend,
            impl=impl,
            block_size=BLOCK.get(backend),
            return_lse=True,
            **kw,
        )

    return fn


def _dense(edge_index, edge_head=None):
    def fn(q, k, v, b=None):
        return dense_attention(q, k, v, edge_index, SCALE, b, return_lse=True, edge_head=edge_head)

    return fn


def _inputs(n_src, n_dst, num_edges, dtype=torch.float64, bias=True, heads=4, kv_heads=2, **kw):
    q, k, v, b = make_inputs(n_src, n_dst, num_edges, heads=heads, kv_heads=kv_heads, dtype=dtype, bias=bias, **kw)
    return [x for x in (q, k, v, b) if x is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["fused", "tiled", "split", "auto"])
@pytest.mark.parametrize("name", GRAPHS)
def test_second_order_matches_dense(name, backend, dtype):
    edge_index, n_src, n_dst = graph_case(name)
    inputs = _inputs(n_src, n_dst, edge_index.size(1), dtype)
    assert_second_order_equal(_attend(edge_index, backend), _dense(edge_index), inputs)


@pytest.mark.parametrize("backend", ["fused", "tiled", "split", "auto"])
def test_second_order_without_bias_and_lse_unused(backend):
    """Only the output carries a gradient (the log-sum-exp's is ``None``), no bias."""
    edge_index, n_src, n_dst = graph_case("window")
    q, k, v = _inputs(n_src, n_dst, edge_index.size(1), bias=False)
    out = _attend(edge_index, backend)(q, k, v)[0]
    w = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad((out * w).sum(), (q, k, v), create_graph=True)
    hvp = torch.autograd.grad(sum((g * g).sum() for g in got), (q, k, v))
    q2, k2, v2 = (x.detach().requires_grad_() for x in (q, k, v))
    ref = _dense(edge_index)(q2, k2, v2)[0]
    want = torch.autograd.grad((ref * w).sum(), (q2, k2, v2), create_graph=True)
    want_hvp = torch.autograd.grad(sum((g * g).sum() for g in want), (q2, k2, v2))
    for a, b in zip(hvp, want_hvp):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_second_order_through_the_merge_of_split():
    """Both parts of split non-empty: the merge's backward pass is differentiated too."""
    edge_index, n_src, n_dst = split_graph()
    assert_splits(edge_index, n_src, n_dst, block_size=4)
    inputs = _inputs(n_src, n_dst, edge_index.size(1))

    def split4(q, k, v, b):
        return attend(q, k, v, edge_index, scale=SCALE, edge_bias=b, backend="split", block_size=4, return_lse=True)

    assert_second_order_equal(split4, _dense(edge_index), inputs)


@pytest.mark.parametrize("backend", ["fused", "tiled", "split"])
def test_gradgradcheck(backend):
    """Second derivatives against finite differences of the first (``torch.autograd.gradgradcheck``),
    with a bias and grouped query heads, on a multigraph."""
    edge_index, n_src, n_dst = small_graph("multigraph", limit=8)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=3)
    fn = _attend(edge_index, backend)
    assert torch.autograd.gradgradcheck(lambda *x: fn(*x), (q, k, v, b))


@pytest.mark.parametrize("backend", ["fused", "tiled", "split"])
def test_second_order_with_dropout(backend):
    """Attention dropout: the recomputation applies the same keep scales."""
    edge_index, n_src, n_dst = graph_case("band_far")
    inputs = _inputs(n_src, n_dst, edge_index.size(1))

    def ref(q, k, v, b):
        return dropout_reference(q, k, v, edge_index, SCALE, b, 0.3, 11)

    assert_second_order_equal(_attend(edge_index, backend, dropout_p=0.3, dropout_seed=11), ref, inputs)


@pytest.mark.parametrize("backend", ["fused", "tiled", "split", "auto"])
@pytest.mark.parametrize("name", ["hub", "bipartite", "empty_rows"])
def test_second_order_per_head(name, backend):
    edge_index, edge_head, n_src, n_dst = per_head_case(name)
    inputs = _inputs(n_src, n_dst, edge_index.size(1), bias_shape=(edge_index.size(1),))
    fn = _attend(edge_index, backend, edge_head=edge_head)
    assert_second_order_equal(fn, _dense(edge_index, edge_head), inputs)


IMPLICIT = {
    "window": lambda: T.sliding_window(45, 4, implicit=True, block_size=16),
    "documents": lambda: T.document(50, [13, 30, 7], causal=True, implicit=True, block_size=16),
    "batch_with_empty": lambda: T.causal([20, 0, 30], implicit=True, block_size=16),
    "odd_block": lambda: T.sliding_window(40, 5, implicit=True, block_size=12),
}


@pytest.mark.parametrize("backend", ["tiled", "auto"])
@pytest.mark.parametrize("name", list(IMPLICIT))
def test_second_order_implicit_graph(name, backend):
    """An implicit graph's tiles (no edge list): the recomputation reads the cells of its masks,
    on padded rows for batches of uneven blocks."""
    graph = IMPLICIT[name]()
    edges = graph.edges()
    inputs = _inputs(graph.num_src, graph.num_dst, 0, bias=False)

    def run(q, k, v):
        return attend(q, k, v, graph, scale=SCALE, backend=backend, return_lse=True)

    assert_second_order_equal(run, _dense(edges), inputs)


def test_second_order_per_head_implicit_graph():
    """Block selection: a per-head BlockGraph, grouped query heads."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(48, h, 16, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    graph = T.dynamic.block_topk(q, k, 16, 1, causal=True, implicit=True)
    index, head = graph.edges()

    def run(q, k, v):
        return attend(q, k, v, graph, scale=SCALE, backend="tiled", return_lse=True)

    assert_second_order_equal(run, _dense(index, head), [q, k, v])


@pytest.mark.parametrize(
    "graph",
    [
        T.causal(30),
        T.causal([12, 18]),  # documents of unequal lengths
        T.full([10, 10, 10]),
        _sorted_index(torch.arange(9).repeat(5), torch.arange(5).repeat_interleave(9), 9, 5),  # full bipartite
    ],
    ids=["causal", "documents", "full_documents", "full_bipartite"],
)
def test_second_order_through_pytorch_fused_attention_with_lse(graph):
    """``auto`` with ``return_lse`` runs PyTorch's fused CPU attention under the project's autograd
    function: its higher-order gradients come from the per-document dense recomputation."""
    n_src, n_dst = int(graph[0].max()) + 1, int(graph[1].max()) + 1
    assert kernels.auto_kernel(graph, "cpu", return_lse=True, num_src=n_src, num_dst=n_dst) == "sdpa"
    inputs = _inputs(n_src, n_dst, 0, torch.float32, bias=False)
    assert_second_order_equal(_attend(graph, "auto"), _dense(graph), inputs)


def test_sdpa_kernel_without_flash_turns_the_fused_cpu_route_off():
    """PyTorch's fused CPU kernel has no double backward (nor has SDPA's); under
    ``sdpa_kernel(SDPBackend.MATH)`` ``auto`` leaves it as SDPA does, and its own kernels give the
    exact higher-order gradients."""
    graph = T.causal(30)
    assert kernels.auto_kernel(graph, "cpu") == "sdpa"
    q, k, v = _inputs(30, 30, 0, torch.float32, bias=False)
    with pytest.raises(RuntimeError, match="derivative for"):  # PyTorch's own error, as SDPA gives it
        out = attend(q, k, v, graph, scale=SCALE)
        (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        dq.sum().backward()
    with sdpa_kernel([SDPBackend.MATH]):
        assert kernels.auto_kernel(graph, "cpu") != "sdpa"
        assert_second_order_equal(lambda *x: _attend(graph, "auto")(*x), _dense(graph), [q, k, v])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton kernels on CPU need TRITON_INTERPRET=1")
@pytest.mark.parametrize("backend", ["fused", "tiled", "split"])
def test_second_order_triton(backend):
    pytest.importorskip("triton")
    edge_index, n_src, n_dst = small_graph("hub", limit=16)
    inputs = _inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1)
    block = {"fused": None, "tiled": 16, "split": 16}[backend]

    def run(q, k, v, b):
        return attend(
            q,
            k,
            v,
            edge_index,
            scale=SCALE,
            edge_bias=b,
            backend=backend,
            impl="triton",
            block_size=block,
            return_lse=True,
        )

    assert_second_order_equal(run, _dense(edge_index), inputs)


@st.composite
def graphs(draw):
    n_src, n_dst = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    cells = draw(st.lists(st.tuples(st.integers(0, n_src - 1), st.integers(0, n_dst - 1)), max_size=40))
    src = torch.tensor([c[0] for c in cells], dtype=torch.long)
    dst = torch.tensor([c[1] for c in cells], dtype=torch.long)
    return torch.stack([src, dst]), n_src, n_dst


@settings(max_examples=30, deadline=None)
@given(case=graphs(), backend=st.sampled_from(["fused", "tiled", "split", "auto"]), seed=st.integers(0, 2**16))
def test_random_graphs_second_order(case, backend, seed):
    edge_index, n_src, n_dst = case
    inputs = _inputs(n_src, n_dst, edge_index.size(1), seed=seed)
    block = 4 if backend in ("tiled", "split") else None

    def run(q, k, v, b):
        return attend(q, k, v, edge_index, scale=SCALE, edge_bias=b, backend=backend, block_size=block, return_lse=True)

    assert_second_order_equal(run, _dense(edge_index), inputs, seed=seed)


def test_layer_hessian_vector_product_equals_torch_multihead_attention():
    """A Hessian-vector product in the weights of a ``GraphMultiheadAttention`` on a full graph
    equals that of ``torch.nn.MultiheadAttention`` with the same weights."""
    torch.manual_seed(0)
    n, e, h = 12, 16, 4
    ref = torch.nn.MultiheadAttention(e, h, dtype=torch.float64)
    layer = GraphMultiheadAttention(e, h, backend="fused", dtype=torch.float64)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(n, e, dtype=torch.float64)
    graph = T.full(n)

    def hvp(module, forward):
        params = [module.in_proj_weight, module.out_proj.weight]
        loss = forward().square().sum()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        vecs = [torch.ones_like(p) / p.numel() for p in params]
        return torch.autograd.grad(sum((g * c).sum() for g, c in zip(grads, vecs)), params)

    got = hvp(layer, lambda: layer(x, graph))
    want = hvp(ref, lambda: ref(x[:, None], x[:, None], x[:, None], need_weights=True)[0][:, 0])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_recomputation_that_does_not_fit_is_refused(monkeypatch):
    """The per-edge recomputation's memory is checked before it allocates."""
    from gnn_transformer.kernels import higher_order

    monkeypatch.setattr(higher_order, "device_memory", lambda device: 1000)
    edge_index, n_src, n_dst = graph_case("window")
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1))
    out = attend(q, k, v, edge_index, scale=SCALE, backend="fused")
    (dq,) = torch.autograd.grad(out.square().sum(), q)  # first order: no recomputation
    assert dq.shape == q.shape
    out = attend(q, k, v, edge_index, scale=SCALE, backend="fused")
    with pytest.raises(RuntimeError, match=r"create_graph=True.*edges x 4 heads x 8 channels.*GiB"):
        torch.autograd.grad(out.square().sum(), q, create_graph=True)


@pytest.mark.parametrize("backend", ["fused", "tiled", "split"])
def test_second_order_bfloat16(backend):
    """bfloat16 inputs: a Hessian-vector product equal to the float32 one on the same values
    within 2e-2 (as bfloat16 first derivatives are held)."""
    edge_index, n_src, n_dst = small_graph("hub", seed=3)
    inputs = _inputs(n_src, n_dst, edge_index.size(1), torch.bfloat16, dim=16)
    up = [x.detach().float().requires_grad_() for x in inputs]
    g = torch.Generator().manual_seed(5)
    w = torch.randn(n_dst, 4, 16, generator=g)
    r = [torch.randn(x.shape, generator=g) for x in inputs]

    def hvp(xs):
        out, lse = _attend(edge_index, backend)(*xs)
        grads = torch.autograd.grad(
            (out.float() * w).sum() + 0.3 * lse[torch.isfinite(lse)].sum(), xs, create_graph=True
        )
        return torch.autograd.grad(sum((d.float() * c).sum() for d, c in zip(grads, r)), xs)

    for x, y in zip(hvp(inputs), hvp(up)):
        assert x.dtype == torch.bfloat16
        torch.testing.assert_close(x.float(), y, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["fused", "tiled", "auto"])
def test_torch_func_transforms_are_refused_by_name(backend):
    """Inside ``torch.func.grad`` the kernels would read wrapped tensors without memory: refused
    before anything runs, naming what to use instead."""
    from torch.func import grad

    edge_index, n_src, n_dst = graph_case("window")
    q, k, v, _ = make_inputs(n_src, n_dst, edge_index.size(1), bias=False)
    k, v = k.detach(), v.detach()
    with pytest.raises(RuntimeError, match=r"torch.func transforms.*torch.autograd.grad"):
        grad(lambda q: attend(q, k, v, edge_index, scale=SCALE, backend=backend).sum())(q.detach())
    layer = GraphMultiheadAttention(16, 4, backend=backend)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    x = torch.randn(n_dst, 16)
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        grad(lambda p: torch.func.functional_call(layer, p, (x, edge_index)).sum())(params)


def test_dense_recomputation_that_does_not_fit_is_refused(monkeypatch):
    """PyTorch's fused CPU attention (``auto`` with ``return_lse`` on a causal graph): the dense
    per-document recomputation's scores are counted before they are allocated."""
    from gnn_transformer.kernels import higher_order

    monkeypatch.setattr(higher_order, "device_memory", lambda device: 1000)
    q, k, v = _inputs(30, 30, 0, torch.float32, bias=False)
    out, lse = attend(q, k, v, T.causal([10, 20]), scale=SCALE, return_lse=True)
    with pytest.raises(RuntimeError, match=r"create_graph=True.*2000 scores of 4 heads, dense per document"):
        torch.autograd.grad(out.square().sum() + lse.sum(), q, create_graph=True)


@pytest.mark.parametrize("graph", [T.causal(30), T.sliding_window(30, 4)], ids=["pytorch_fused_attention", "window"])
@pytest.mark.parametrize("backend", ["fused", "tiled", "split", "auto"])
@pytest.mark.parametrize("shared", ["kv", "qkv"])
def test_second_order_of_one_tensor_passed_twice(shared, backend, graph):
    """``attend(q, x, x)`` and ``attend(x, x, x)``: the gradient in ``x`` is the sum of its roles'
    (the recomputation differentiates each role on its own view), to the second order."""
    x, q = _inputs(30, 30, 0, bias=False, heads=2, kv_heads=2)[:2]

    def fn(x, q=None):
        return attend(x if q is None else q, x, x, graph, scale=SCALE, backend=backend, return_lse=True)

    def ref(x, q=None):
        return dense_attention(x if q is None else q, x, x, graph, SCALE, return_lse=True)

    inputs = [x] if shared == "qkv" else [x, q]
    assert_second_order_equal(fn, ref, inputs)


def test_second_order_under_autocast_runs_without_it():
    """Under bfloat16 autocast the recomputation (here PyTorch's fused CPU attention's dense one)
    runs in float32 as the kernels do: a Hessian-vector product within 2e-2 of float32's."""
    graph = T.causal(40)
    q, k, v = _inputs(40, 40, 0, torch.float32, bias=False, dim=16)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 4, 16, generator=g)
    r = [torch.randn(x.shape, generator=g) for x in (q, k, v)]

    def hvp(autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, lse = attend(q, k, v, graph, scale=0.25, return_lse=True)
            grads = torch.autograd.grad((out.float() * w).sum() + 0.3 * lse.sum(), (q, k, v), create_graph=True)
            return torch.autograd.grad(sum((d.float() * c).sum() for d, c in zip(grads, r)), (q, k, v))

    for x, y in zip(hvp(True), hvp(False)):
        torch.testing.assert_close(x, y, atol=2e-2, rtol=2e-2)


def test_device_memory(monkeypatch):
    """What a recomputation may allocate: half of the host's memory; on a GPU its free memory and
    what PyTorch's allocator holds unused (checked here on stand-ins for the CUDA queries)."""
    from gnn_transformer.kernels.primitives import device_memory

    assert device_memory(torch.device("cpu")) == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    assert device_memory(torch.device("meta")) is None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1000, 8000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 300)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 200)
    assert device_memory(torch.device("cuda", 0)) == 1100
