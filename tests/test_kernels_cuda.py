"""The compiled Triton kernels on a CUDA GPU equal the reference, forward and backward.

Skipped without a GPU, and under ``TRITON_INTERPRET=1`` (which the CPU test run sets: there the
kernels run interpreted, see ``test_kernels_fused_triton.py`` and ``test_kernels_tiled_triton.py``). On a GPU machine::

    TRITON_INTERPRET=0 python -m pytest -q tests/test_kernels_cuda.py
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 would interpret the kernels; run with TRITON_INTERPRET=0", allow_module_level=True)

from gnn_transformer import GraphMultiheadAttention  # noqa: E402
from gnn_transformer.kernels import attend, attend_reference, clear_cache  # noqa: E402
from gnn_transformer.topology import bigbird, causal, random, sliding_window, to_dense_mask  # noqa: E402

from .conftest import GRAPHS, TOL, graph_case, make_inputs, weighted_loss  # noqa: E402

CUDA = torch.device("cuda")
# ("tiled", {}): the dtype's default tiles on CUDA (32 for float32 and float64, default_block_size)
BACKENDS = [
    ("fused", {}),
    ("tiled", {"block_size": 16}),
    ("tiled", {"block_size": 64}),
    ("tiled", {}),
    ("split", {"block_size": 16, "tile_cost": 0.25}),
    ("auto", {}),
]
IDS = ["fused", "tiled16", "tiled64", "tiled-default", "split", "auto"]


def _to_cuda(*xs):
    return [None if x is None else x.detach().to(CUDA).requires_grad_() for x in xs]


def _compare(edge_index, q, k, v, b, backend, kw, tol, scale=0.4):
    out, lse = attend(q, k, v, edge_index, scale=scale, edge_bias=b, backend=backend, return_lse=True, **kw)
    ref, ref_lse = attend_reference(q, k, v, edge_index, scale=scale, edge_bias=b, return_lse=True)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype), **tol)
    w = torch.randn(out.shape, dtype=out.dtype, device=out.device)
    inputs = [x for x in (q, k, v, b) if x is not None]
    got = torch.autograd.grad(weighted_loss(out, lse, w), inputs)
    want = torch.autograd.grad(weighted_loss(ref, ref_lse, w), inputs)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,kw", BACKENDS, ids=IDS)
@pytest.mark.parametrize("name", GRAPHS)
def test_cuda_matches_reference(name, backend, kw, dtype):
    edge_index, n_src, n_dst = graph_case(name, seed=3)
    q, k, v, b = make_inputs(
        n_src, n_dst, edge_index.size(1), heads=4, kv_heads=2, dim=8, dtype=dtype, bias=name != "bipartite"
    )
    _compare(edge_index.to(CUDA), *_to_cuda(q, k, v, b), backend, kw, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend,kw", [("fused", {}), ("tiled", {"block_size": 64})], ids=["fused", "tiled"])
def test_cuda_cuts_global_rows_into_pieces(backend, kw, dtype, monkeypatch):
    """A global token's row and column (its query and key blocks) are cut into pieces at the GPU's
    own piece length (kernels._pieces), and the result still equals the reference."""
    from gnn_transformer.kernels import planner, _pieces
    from gnn_transformer.topology import global_tokens, union

    monkeypatch.setattr(_pieces, "LENGTH", None)  # the device's length
    clear_cache()
    n = 4096  # a window of 128 and a global token: 4096 edges and 64 tiles in its row, ~131 and 3-4 elsewhere
    edge_index = union(sliding_window(n, 64), global_tokens(n, 1)).to(CUDA)
    q, k, v, b = make_inputs(n, n, edge_index.size(1), heads=4, kv_heads=2, dim=64, dtype=dtype)
    q, k, v, b = _to_cuda(q, k, v, b)
    tol = TOL[torch.float32] if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    out, lse = attend(
        q, k, v, edge_index, scale=0.125, edge_bias=b, backend=backend, return_lse=True, impl="triton", **kw
    )
    graph = planner.prepare(edge_index, n, n)
    cache = graph.extras if backend == "fused" else graph.extras[("parts", 64, None)][0].launch_cache
    w = torch.randn(out.shape, dtype=torch.float32, device=CUDA)
    grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v, b))
    cut = [p for key, p in cache.items() if key[:1] == ("pieces",) and p is not None]
    assert len(cut) == 2  # rows and columns
    up = [x.detach().float().requires_grad_() for x in (q, k, v, b)]
    ref = attend_reference(*up[:3], edge_index, scale=0.125, edge_bias=up[3])
    torch.testing.assert_close(out.float(), ref, **tol)
    for x, y in zip(grads, torch.autograd.grad((ref * w).sum(), up)):
        torch.testing.assert_close(x.float(), y, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,kw", BACKENDS, ids=IDS)
@pytest.mark.parametrize("name", ["window", "bigbird", "random", "causal"])
def test_cuda_model_sized_heads(name, backend, kw, dtype):
    """12 query heads on 4 key/value heads of 64 channels, 700 tokens in two sequences."""
    lengths = [300, 400]
    edge_index = {
        "window": sliding_window(lengths, 40),
        "causal": causal(lengths),
        "bigbird": bigbird(lengths, block=16, window=1, num_global=1, num_random=2),
        "random": random(lengths, 24),
    }[name]
    n = sum(lengths)
    q, k, v, b = make_inputs(n, n, edge_index.size(1), heads=12, kv_heads=4, dim=64, dtype=dtype)
    _compare(edge_index.to(CUDA), *_to_cuda(q, k, v, b), backend, kw, TOL[dtype], scale=64**-0.5)


def _bf16_errors(edge_index, n, heads=12, dim=64, backend="auto"):
    """Max errors of this backend and of masked SDPA, both in bfloat16, against float32."""
    g = torch.Generator(device=CUDA).manual_seed(0)
    q, k, v = (torch.randn(n, heads, dim, device=CUDA, generator=g) for _ in range(3))
    edge_index = edge_index.to(CUDA)
    mask = to_dense_mask(edge_index).to(CUDA)  # [N_dst, N_src]
    s = torch.einsum("ihd,jhd->hij", q, k) * dim**-0.5  # dense float32 reference (no [E, H, D])
    weights = s.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
    ref = torch.einsum("hij,jhd->ihd", weights, v)
    out = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), edge_index, scale=dim**-0.5, backend=backend)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        *(x.bfloat16().transpose(0, 1) for x in (q, k, v)), attn_mask=mask
    ).transpose(0, 1)
    # rows without edges: SDPA gives NaN, the graph gives zeros
    has_edges = mask.any(-1)
    return ((out.float() - ref)[has_edges].abs().max().item(), (sdpa.float() - ref)[has_edges].abs().max().item())


@pytest.mark.parametrize("backend", ["fused", "tiled", "split", "auto"])
@pytest.mark.parametrize("name", ["window", "bigbird", "random", "causal"])
def test_cuda_bfloat16_error_is_sdpas(name, backend):
    """bfloat16 inputs accumulate in float32: the error against float32 is that of dense SDPA's."""
    n = 2048
    edge_index = {
        "window": sliding_window(n, 128),
        "causal": causal(n),
        "bigbird": bigbird(n, block=64, window=1, num_global=2, num_random=3),
        "random": random(n, 64),
    }[name]
    ours, sdpa = _bf16_errors(edge_index, n, backend=backend)
    assert ours <= 2 * sdpa + 1e-3, (ours, sdpa)


@pytest.mark.parametrize("backend", ["fused", "tiled"])
def test_cuda_deterministic(backend):
    edge_index, n_src, n_dst = graph_case("hub", seed=1)
    q, k, v, b = _to_cuda(*make_inputs(n_src, n_dst, edge_index.size(1), dtype=torch.float32))
    edge_index = edge_index.to(CUDA)
    runs = []
    for _ in range(2):
        out = attend(q, k, v, edge_index, scale=0.4, edge_bias=b, backend=backend, block_size=16)
        runs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v, b))))
    for x, y in zip(*runs):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ["fused", "tiled", "auto"])
def test_cuda_layer_matches_pyg(backend):
    edge_index = bigbird([200, 120], block=8, window=1, num_global=1, num_random=2).to(CUDA)
    torch.manual_seed(0)
    ref = GraphMultiheadAttention(96, 6, num_kv_heads=2, backend="pyg").to(CUDA)
    fast = copy.deepcopy(ref)
    fast.backend = backend
    x = torch.randn(320, 96, device=CUDA, requires_grad=True)
    out_ref, w_ref = ref(x, edge_index, return_attention_weights=True)
    out, w = fast(x, edge_index, return_attention_weights=True)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-5)
    g_ref = torch.autograd.grad(out_ref.sum(), [x, *ref.parameters()])
    g = torch.autograd.grad(out.sum(), [x, *fast.parameters()])
    for a, c in zip(g, g_ref):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16-autocast"])
def test_cuda_layer_short_route_matches_the_general_path(dtype):
    """A layer's self-attention on a causal graph takes the short route (kernels.attend_dense); the
    general path (a backend named for the call) runs the same SDPA call on the same heads."""
    edge_index = causal([200, 120]).to(CUDA)
    torch.manual_seed(0)
    layer = GraphMultiheadAttention(96, 6, num_kv_heads=2).to(CUDA)
    x = torch.randn(320, 96, device=CUDA, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = layer(x, edge_index)
        general = layer(x, edge_index, backend="auto")
    assert out.dtype == general.dtype == dtype
    torch.testing.assert_close(out, general, atol=0, rtol=0)
    g = torch.autograd.grad(out.float().sum(), [x, *layer.parameters()])
    g_general = torch.autograd.grad(general.float().sum(), [x, *layer.parameters()])
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # SDPA's CUDA backward may add in another order
    for a, c in zip(g, g_general):
        torch.testing.assert_close(a, c, atol=tol, rtol=tol)


@pytest.mark.xdist_group("48GiB")  # one worker runs both: two at once could each see 48 GiB free
@pytest.mark.parametrize("kv_heads", [16, 4], ids=["mha", "gqa"])
def test_cuda_offsets_past_int32(kv_heads):
    """N·H·D above 2**31 elements: rows at the end of the tensors are read and written where they
    are (int32 offsets would wrap around), forward and backward (dQ over the CSR, dK/dV over the
    CSC, the tiled passes), multi-head and grouped."""
    heads, dim = 16, 64
    n = (2**31) // (heads * dim) + 4096  # 2,101,248 tokens
    clear_cache()
    torch.cuda.empty_cache()  # what earlier tests left in PyTorch's cache counts as used
    free, _ = torch.cuda.mem_get_info()
    if free < 48 * 2**30:
        pytest.skip("needs 48 GiB of free GPU memory")
    edge_index = sliding_window(n, 2).to(CUDA)
    q = torch.randn(n, heads, dim, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(n, kv_heads, dim, device=CUDA, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    # float32 reference on the last 4096 targets and the sources they read (from lo on)
    tail = torch.arange(n - 4096, n, device=CUDA)
    lo = n - 4096 - 2
    offsets = torch.arange(-2, 3, device=CUDA)
    src = (tail[:, None] + offsets).clamp(0, n - 1) - lo  # [4096, 5] rows of the source slice
    valid = (tail[:, None] + offsets < n)[:, None, :]  # [4096, 1, 5]
    qt = q.detach()[tail].float().requires_grad_()
    ks, vs = (x.detach()[lo:].float().requires_grad_() for x in (k, v))
    ke, ve = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (ks, vs))  # [4098, H, D]
    s = torch.einsum("thd,tjhd->thj", qt, ke[src]) * dim**-0.5
    want = torch.einsum("thj,tjhd->thd", s.masked_fill(~valid, float("-inf")).softmax(-1), ve[src])
    w = torch.randn_like(want)
    (want * w).sum().backward()
    for backend in ("fused", "tiled"):
        out = attend(q, k, v, edge_index, scale=dim**-0.5, backend=backend)
        torch.testing.assert_close(out[tail].float(), want.detach(), atol=2e-2, rtol=2e-2)
        dq, dk, dv = torch.autograd.grad((out[tail].float() * w).sum(), (q, k, v))
        del out
        torch.testing.assert_close(dq[tail].float(), qt.grad, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(dk[lo:].float(), ks.grad, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(dv[lo:].float(), vs.grad, atol=2e-2, rtol=2e-2)
        # nothing written where no gradient belongs (a wrapped offset would land there)
        assert int(torch.count_nonzero(dq[: n - 4096])) == 0
        assert int(torch.count_nonzero(dk[:lo])) == 0 and int(torch.count_nonzero(dv[:lo])) == 0
        del dq, dk, dv
    clear_cache()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["fused", "tiled"])
def test_cuda_tensors_on_another_device_than_the_current_one(backend):
    edge_index, n_src, n_dst = graph_case("empty_rows")
    second = torch.device("cuda", 1)
    q, k, v, b = (
        x.detach().to(second).requires_grad_()
        for x in make_inputs(n_src, n_dst, edge_index.size(1), dtype=torch.float32)
    )
    with torch.cuda.device(0):
        _compare(
            edge_index.to(second),
            q,
            k,
            v,
            b,
            backend,
            {"block_size": 16} if backend == "tiled" else {},
            TOL[torch.float32],
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["fused", "tiled", "split"])
def test_cuda_dropout_matches_the_cpu_kernel(backend, dtype):
    """The compiled Triton kernels drop the same weights as the PyTorch path (one hash of seed, edge
    and head): outputs and gradients agree across devices."""
    edge_index, n_src, n_dst = graph_case("empty_rows" if backend == "tiled" else "hub", seed=2)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=4, kv_heads=2, dim=8, dtype=dtype)
    tol = TOL[dtype] if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    results = []
    for device in ("cpu", CUDA):
        xs = [x.detach().to(device).requires_grad_() for x in (q, k, v, b)]
        out, lse = attend(
            *xs[:3],
            edge_index.to(device),
            scale=0.4,
            edge_bias=xs[3],
            backend=backend,
            block_size=16,
            tile_cost=0.3,
            return_lse=True,
            dropout_p=0.25,
            dropout_seed=77,
        )
        grads = torch.autograd.grad(weighted_loss(out, lse, torch.ones_like(out)), xs)
        results.append([t.cpu() for t in (out, lse, *grads)])
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, **tol)


@pytest.mark.parametrize("backend", ["fused", "tiled", "split"])
@pytest.mark.parametrize("n,window,kv_heads,seed", [(28, 7, 2, 1020), (19, 2, 1, 4321), (40, 6, 1, 7), (40, 6, 2, 8)])
@pytest.mark.parametrize("log_scale", [2, 3])
def test_cuda_float32_gradients_at_large_scores(backend, n, window, kv_heads, seed, log_scale):
    """Nearly saturated rows at scores near 1e4 to 1e6: the compiled kernels' row terms (``pivot``,
    ``delta``, the recomputed log-sum-exp) must come from the very scores and ``dp`` the gradient
    kernels compute, which the interpreter cannot show. Within 10x the per-edge path's error
    against float64 (on the GPU), plus 1e-6 of the largest gradient, with the log-sum-exp in the
    loss."""
    gen = torch.Generator().manual_seed(seed)
    ei = sliding_window(n, window)
    ei = torch.cat([ei, random(n, 3, seed=seed)], dim=1).unique(dim=1)
    scale = 10.0**log_scale
    q = torch.randn(n, 2, 8, generator=gen, dtype=torch.float64) * scale
    k = torch.randn(n, kv_heads, 8, generator=gen, dtype=torch.float64) * scale
    v = torch.randn(n, kv_heads, 8, generator=gen, dtype=torch.float64) * scale
    g = torch.randn(n, 2, 8, generator=gen, dtype=torch.float64, device=CUDA)
    ei = ei.to(CUDA)

    def grads(attention, dtype, perm=torch.arange(8), **kw):
        inputs = [
            x.detach()[..., p].to(CUDA, dtype).requires_grad_() for x, p in ((q, perm), (k, perm), (v, slice(None)))
        ]
        out, lse = attention(*inputs, ei, scale=8**-0.5, return_lse=True, **kw)
        ((out * g.to(dtype)).sum() + 0.1 * lse.nan_to_num(0).sum()).backward()
        inverse = torch.argsort(perm)
        return torch.cat([x.grad.double()[..., p].flatten() for x, p in zip(inputs, (inverse, inverse, slice(None)))])

    want = grads(attend_reference, torch.float64)
    # the per-edge path's spread over three orders of summation (test_kernels_extreme_scores.py says why)
    orders = [torch.arange(8), torch.arange(8).flip(0), torch.tensor([3, 6, 0, 7, 1, 5, 2, 4])]
    per_edge = max(float((grads(attend_reference, torch.float32, o) - want).abs().max()) for o in orders)
    got = grads(attend, torch.float32, backend=backend, block_size=16)
    err = float((got - want).abs().max())
    assert err <= 10 * per_edge + 1e-6 * float(want.abs().max()), (err, per_edge)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,kw", BACKENDS[:5], ids=IDS[:5])
@pytest.mark.parametrize("name", ["hub", "bipartite"])
def test_cuda_second_order_matches_dense(name, backend, kw, dtype):
    """Higher-order gradients of the compiled kernels (create_graph=True: the per-edge
    recomputation on the GPU) equal the dense reference's."""
    from .conftest import assert_second_order_equal, dense_attention

    edge_index, n_src, n_dst = graph_case(name)
    edge_index = edge_index.to(CUDA)
    inputs = _to_cuda(*make_inputs(n_src, n_dst, edge_index.size(1), dtype=dtype))

    def run(q, k, v, b):
        return attend(q, k, v, edge_index, scale=0.45, edge_bias=b, backend=backend, return_lse=True, **kw)

    def reference(q, k, v, b):
        return dense_attention(q, k, v, edge_index, 0.45, b, return_lse=True)

    assert_second_order_equal(run, reference, inputs)


@pytest.mark.filterwarnings("error:flex_attention called without torch.compile")  # never the dense fallback
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("implicit", [False, True], ids=["edges", "implicit"])
def test_cuda_flex_route_matches_reference(implicit, dtype):
    """``auto`` runs a long sliding window (CSR or implicit) through compiled FlexAttention; output and
    gradients equal the per-edge reference (float32 inputs: at float32 tolerance; bfloat16: against
    float32 on the same values, at bfloat16's)."""
    from gnn_transformer.kernels import auto_kernel, flex, planner

    n = planner.FLEX_MIN_TARGETS + 77  # not a multiple of FlexAttention's blocks
    graph = sliding_window(n, 24, implicit=implicit)
    edge_index = graph.edges() if implicit else graph
    graph = graph.to(CUDA)
    q, k, v, _ = make_inputs(n, n, 1, heads=4, kv_heads=2, dim=64, dtype=torch.float32, bias=False)
    q, k, v = _to_cuda(q, k, v)
    assert auto_kernel(graph, CUDA, dtype=dtype, head_dim=64) == "flex"
    xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = attend(*xs, graph, scale=0.125)
    assert flex.failure(xs[0], xs[1], True) is None and out.dtype == dtype
    up = [x.detach().float().requires_grad_() for x in xs]
    ref = attend_reference(*up, edge_index.to(CUDA), scale=0.125)
    tol = TOL[torch.float32] if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), ref, **tol)
    w = torch.randn(out.shape, device=CUDA)
    for x, y in zip(torch.autograd.grad((out.float() * w).sum(), xs), torch.autograd.grad((ref * w).sum(), up)):
        torch.testing.assert_close(x.float(), y, **tol)
