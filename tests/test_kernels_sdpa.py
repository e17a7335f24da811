"""``auto`` on graphs of exactly full or causal attention (per sequence or document) runs PyTorch's
SDPA kernels: recognition never answers for a graph one edge away, and the results (output,
log-sum-exp, gradients) equal the dense reference as on every other backend."""

from __future__ import annotations

import pytest
import torch

from gnn_transformer.kernels import planner, attend, attend_dense, auto_kernel, choose_backend, clear_cache, sdpa
from gnn_transformer.kernels.planner import DensePattern, dense_pattern
from gnn_transformer.kernels.sdpa import public_sdpa
from gnn_transformer.topology import causal, cross, document, full

from .conftest import TOL, assert_matches_dense, dense_attention, weighted_loss


def _pattern(edge_index, n_src, n_dst):
    return dense_pattern(planner.prepare(edge_index, n_src, n_dst))


def _edges(edge_index):
    plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    return plain[0].clone(), plain[1].clone()


RECOGNIZED = [
    ("causal", lambda: causal(13), 13, 13, DensePattern("causal", (0, 13))),
    ("full", lambda: full(9), 9, 9, DensePattern("full", (0, 9))),
    ("one-token", lambda: causal(1), 1, 1, DensePattern("causal", (0, 1))),
    ("batch-causal", lambda: causal([5, 7, 3]), 15, 15, DensePattern("causal", (0, 5, 12, 15))),
    ("batch-full", lambda: full([4, 4, 4]), 12, 12, DensePattern("full", (0, 4, 8, 12))),
    ("document-causal", lambda: document(14, [3, 6, 5], causal=True), 14, 14, DensePattern("causal", (0, 3, 9, 14))),
    ("document-full", lambda: document(12, 4), 12, 12, DensePattern("full", (0, 4, 8, 12))),
    ("bipartite-full", lambda: cross(5, 8), 8, 5, DensePattern("full", (0, 5))),
]


@pytest.mark.parametrize("name,build,n_src,n_dst,want", RECOGNIZED, ids=[r[0] for r in RECOGNIZED])
def test_recognizes_full_and_causal(name, build, n_src, n_dst, want):
    edge_index = build()
    assert _pattern(edge_index, n_src, n_dst) == want
    assert auto_kernel(edge_index, "cpu", num_src=n_src, num_dst=n_dst) == "sdpa"


def _near_causal(n: int = 12):
    """Graphs one edge (or one order of the same edges) away from causal(n) or full(n)."""
    src, dst = _edges(causal(n))
    cases = {}
    for e in (0, 1, 5, src.numel() // 2, src.numel() - 1):  # one edge missing
        keep = torch.ones(src.numel(), dtype=torch.bool)
        keep[e] = False
        cases[f"causal-minus-{e}"] = torch.stack([src[keep], dst[keep]])
    for j, i in ((1, 0), (n - 1, n - 2), (n - 1, 0)):  # one extra edge above the diagonal
        cases[f"causal-plus-{j}-{i}"] = torch.stack(
            [torch.cat([src, torch.tensor([j])]), torch.cat([dst, torch.tensor([i])])]
        )
    cases["causal-duplicate"] = torch.stack([torch.cat([src, src[3:4]]), torch.cat([dst, dst[3:4]])])
    # same count per row, one source shifted: row 5 sees 0..4 and 6 instead of 0..5
    shifted = src.clone()
    shifted[(dst == 5) & (src == 5)] = 6
    cases["causal-shifted"] = torch.stack([shifted, dst])
    # a row whose sources are right but unsorted stays unrecognized (never a wrong answer)
    fs, fd = _edges(full(n))
    cases["full-minus-one"] = torch.stack([fs[1:], fd[1:]])
    ds, dd = _edges(document(n, [4, 8], causal=True))
    cases["document-causal-plus-cross"] = torch.stack(
        [torch.cat([ds, torch.tensor([2])]), torch.cat([dd, torch.tensor([6])])]
    )
    cases["empty-row"] = torch.stack([src[dst != 4], dst[dst != 4]])
    cases["window"] = torch.stack([src[dst - src <= 3], dst[dst - src <= 3]])
    return cases


@pytest.mark.parametrize("name", list(_near_causal()))
def test_never_recognizes_a_graph_one_edge_away(name):
    edge_index = _near_causal()[name]
    n = 12
    assert _pattern(edge_index, n, n) is None
    assert auto_kernel(edge_index, "cpu", num_src=n, num_dst=n) == choose_backend(
        edge_index, "cpu", num_src=n, num_dst=n
    )
    assert_matches_dense(
        lambda q, k, v, b: attend(q, k, v, edge_index, scale=0.45, return_lse=True),
        edge_index,
        n,
        n,
        torch.float64,
        bias=False,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2), (4, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("name,build,n_src,n_dst,want", RECOGNIZED, ids=[r[0] for r in RECOGNIZED])
def test_sdpa_path_matches_dense(name, build, n_src, n_dst, want, heads, kv_heads, dtype):
    edge_index = build()
    assert auto_kernel(edge_index, "cpu", num_src=n_src, num_dst=n_dst, return_lse=True) == "sdpa"
    assert_matches_dense(
        lambda q, k, v, b: attend(q, k, v, edge_index, scale=0.45, return_lse=True),
        edge_index,
        n_src,
        n_dst,
        dtype,
        bias=False,
        heads=heads,
        kv_heads=kv_heads,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2)], ids=["gqa", "mha"])
@pytest.mark.parametrize("name,build,n_src,n_dst,want", RECOGNIZED, ids=[r[0] for r in RECOGNIZED])
def test_sdpa_path_without_lse_matches_dense(name, build, n_src, n_dst, want, heads, kv_heads, dtype, monkeypatch):
    """A call that returns no log-sum-exp runs the fused CPU kernel under PyTorch's own autograd
    (no Python autograd function): outputs and gradients equal the dense reference."""
    edge_index = build()
    monkeypatch.setattr(sdpa, "kernel_attention", None)  # the Python autograd function must not run
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(n_dst, heads, 8, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    k, v = (
        torch.randn(n_src, kv_heads, 8, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for _ in "kv"
    )
    w = torch.randn(n_dst, heads, 8, generator=gen, dtype=torch.float64)
    out = attend(q, k, v, edge_index, scale=0.45)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = dense_attention(qd, kd, vd, edge_index, 0.45)
    torch.testing.assert_close(out, ref.to(dtype), **TOL[dtype])
    got = torch.autograd.grad((out * w.to(dtype)).sum(), (q, k, v))
    want_grads = torch.autograd.grad((ref * w).sum(), (qd, kd, vd))
    for a, b in zip(got, want_grads):
        torch.testing.assert_close(a, b.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,build,n_src,n_dst,want", RECOGNIZED, ids=[r[0] for r in RECOGNIZED])
def test_public_sdpa_path_matches_dense(name, build, n_src, n_dst, want, dtype):
    """The path ``auto`` takes off the CPU (public SDPA, documents and GQA handled the same way),
    run here on CPU tensors."""
    edge_index = build()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(n_dst, 4, 8, generator=gen, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(n_src, 2, 8, generator=gen, dtype=dtype, requires_grad=True) for _ in range(2))
    up = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = public_sdpa(q, k, v, _pattern(edge_index, n_src, n_dst), 0.45)
    ref = dense_attention(*up, edge_index, 0.45)
    torch.testing.assert_close(out, ref.to(dtype), **TOL[dtype])
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out * w.to(dtype)).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), up)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.to(dtype), **TOL[dtype])


def test_edge_bias_dropout_and_triton_do_not_run_sdpa():
    edge_index = causal(32)
    assert auto_kernel(edge_index, "cpu") == "sdpa"
    plan = choose_backend(edge_index, "cpu")
    assert auto_kernel(edge_index, "cpu", edge_bias=True) == plan
    assert auto_kernel(edge_index, "cpu", dropout=True) == choose_backend(edge_index, "cpu", dropout=True)
    assert auto_kernel(edge_index, "cpu", impl="triton") == plan
    assert auto_kernel(edge_index, "cuda", return_lse=True) == choose_backend(edge_index, "cuda")
    assert auto_kernel(edge_index, "cuda") == "sdpa"


def test_edge_bias_on_a_causal_graph_matches_dense():
    edge_index = causal(20)
    assert_matches_dense(
        lambda q, k, v, b: attend(q, k, v, edge_index, scale=0.45, edge_bias=b, return_lse=True),
        edge_index,
        20,
        20,
        torch.float64,
        bias=True,
    )


@pytest.mark.parametrize("backend", ["tiled", "fused"])
def test_dropout_keeps_the_projects_mask(backend):
    """With attention dropout, ``auto`` runs the project's kernels: the same hash-based mask as the
    explicit backend the plan names, for the same seed."""
    edge_index = causal(40)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    plan = choose_backend(edge_index, "cpu", dropout=True)
    out = attend(q, k, v, edge_index, scale=0.3, dropout_p=0.25, dropout_seed=7)
    want = attend(q, k, v, edge_index, scale=0.3, dropout_p=0.25, dropout_seed=7, backend=plan)
    torch.testing.assert_close(out, want, **TOL[torch.float64])
    other = attend(q, k, v, edge_index, scale=0.3, dropout_p=0.25, dropout_seed=7, backend=backend)
    torch.testing.assert_close(out, other, **TOL[torch.float64])


def _autograd_nodes(t: torch.Tensor) -> set[str]:
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo.extend(f for f, _ in fn.next_functions)
    return {type(fn).__name__ for fn in seen}


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("return_lse", [True, False])
def test_huge_log_sum_exp_falls_back_to_the_projects_kernels(return_lse, sign):
    """Scores near 300 (or -300: the magnitude counts) put a float32 log-sum-exp beyond what the
    fused CPU kernel keeps (it drops what rounding lost, which the backward pass needs): ``auto``
    then runs the project's kernels, and gives their results. Without ``return_lse`` too, where
    the call would otherwise run under the fused kernel's own autograd, whose backward reads the
    rounded log-sum-exp."""
    edge_index = causal(24)
    gen = torch.Generator().manual_seed(3)
    q = (torch.randn(24, 2, 4, generator=gen) * 0.1 + 10.0).requires_grad_()
    k = (torch.randn(24, 2, 4, generator=gen) * 0.1 + sign * 10.0).requires_grad_()
    v = torch.randn(24, 2, 4, generator=gen, requires_grad=True)
    w = torch.randn(24, 2, 4, generator=gen)
    results = []
    for backend in ("auto", choose_backend(edge_index, "cpu")):
        out, lse = attend(q, k, v, edge_index, scale=0.75, return_lse=True, backend=backend)
        if not return_lse:
            out = attend(q, k, v, edge_index, scale=0.75, backend=backend)
        loss = weighted_loss(out, lse, w) if return_lse else (out * w).sum()
        results.append((out, lse, *torch.autograd.grad(loss, (q, k, v))))
    assert float(results[0][1].detach().abs().min()) > 128
    assert not any("FlashAttention" in name for name in _autograd_nodes(results[0][0]))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_moderate_scores_without_lse_run_the_fused_kernels_own_autograd():
    edge_index = causal(24)
    q, k, v = (torch.randn(24, 2, 4, requires_grad=True) for _ in range(3))
    nodes = _autograd_nodes(attend(q, k, v, edge_index, scale=0.5))
    assert any("FlashAttention" in name for name in nodes), nodes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_the_sdpa_path(dtype):
    """Half-precision inputs are computed in float32: the result is the float32 result rounded."""
    edge_index = causal(48)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(48, 4, 16, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    out = attend(q, k, v, edge_index, scale=0.25)
    assert out.dtype == dtype
    ref = attend(*(x.detach().float() for x in (q, k, v)), edge_index, scale=0.25, backend="tiled")
    torch.testing.assert_close(out.float(), ref.to(dtype).float(), atol=1e-2, rtol=1e-2)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(g.dtype == dtype and bool(torch.isfinite(g).all()) for g in grads)


def test_cpu_without_the_fused_backward_kernel_runs_the_projects_kernels(monkeypatch):
    """The CPU path differentiates through the fused CPU backward kernel: where torch lacks it,
    ``auto`` runs the project's kernels, and the gradients still equal dense."""
    from gnn_transformer.kernels import sdpa

    monkeypatch.setattr(sdpa, "_FLASH_BWD", None)
    edge_index = causal(12)
    assert auto_kernel(edge_index, "cpu") != "sdpa"
    assert_matches_dense(
        lambda q, k, v, b: attend(q, k, v, edge_index, scale=0.45, return_lse=True),
        edge_index,
        12,
        12,
        torch.float32,
        bias=False,
    )


def test_recognition_is_cached_per_edge_index():
    clear_cache()
    edge_index = causal(16)
    graph = planner.prepare(edge_index, 16, 16)
    assert dense_pattern(graph) is dense_pattern(planner.prepare(edge_index, 16, 16))
    assert "dense_pattern" in graph.extras


def test_recognition_compares_edges_in_chunks(monkeypatch):
    """Chunks of 7 edges (boundaries inside rows) give the same answers."""
    monkeypatch.setattr(planner, "CHECK_CHUNK", 7)
    clear_cache()
    for name, build, n_src, n_dst, want in RECOGNIZED:
        assert _pattern(build(), n_src, n_dst) == want, name
    for name, edge_index in _near_causal().items():
        assert _pattern(edge_index, 12, 12) is None, name


def test_huge_log_sum_exp_without_gradients_stays_on_the_fused_kernel():
    """The rounded log-sum-exp reaches only the backward pass: without gradients and without
    ``return_lse``, a huge one keeps the fused CPU kernel. Its output is then as close to the
    float64 result as the project's kernels' (both round scores near 300 in float32)."""
    edge_index = causal(24)
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(24, 2, 4, generator=gen) * 0.1 + 10.0 for _ in range(2))
    v = torch.randn(24, 2, 4, generator=gen)
    _, lse = attend(q, k, v, edge_index, scale=0.75, return_lse=True, backend="fused")
    assert float(lse.abs().min()) > 128
    fused_cpu = sdpa._flash(q, k, v, dense_pattern(planner.prepare(edge_index, 24, 24)), 0.75)[0]
    exact = attend(q.double(), k.double(), v.double(), edge_index, scale=0.75, backend="fused")
    ours = attend(q, k, v, edge_index, scale=0.75, backend=choose_backend(edge_index, "cpu"))
    assert float((fused_cpu.double() - exact).abs().max()) <= 2 * float((ours.double() - exact).abs().max())
    with torch.no_grad():
        assert torch.equal(attend(q.requires_grad_(), k, v, edge_index, scale=0.75), fused_cpu)
    assert torch.equal(attend(q.detach(), k, v, edge_index, scale=0.75), fused_cpu)  # no input needs a gradient
    out = attend(q, k, v, edge_index, scale=0.75)  # a gradient: the project's kernels
    assert not torch.equal(out.detach(), fused_cpu)
    torch.testing.assert_close(out, ours, **TOL[torch.float32])


def _strided(x: torch.Tensor) -> torch.Tensor:
    """``x [N, H, D]`` as a view whose last dimension has stride 2 (same values, differentiable)."""
    out = torch.stack([x, torch.zeros_like(x)], dim=-1).flatten(-2)[..., ::2]
    assert out.stride(-1) == 2
    return out


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,build,n_src,n_dst,want", RECOGNIZED, ids=[r[0] for r in RECOGNIZED])
def test_inputs_whose_last_dimension_is_strided(name, build, n_src, n_dst, want, dtype, return_lse):
    """The fused CPU kernel reads each row of ``D`` values as contiguous: views with another last
    stride (``x[..., ::2]``) give the dense reference's output and gradients, with or without
    gradients and on the layers' short route."""
    edge_index = build()

    def strided_attend(q, k, v, b):
        out, lse = attend(_strided(q), _strided(k), _strided(v), edge_index, scale=0.45, return_lse=True)
        if not return_lse:  # the output of the kernel's own autograd, lse from the same call with it
            out = attend(_strided(q), _strided(k), _strided(v), edge_index, scale=0.45)
        return out, lse

    assert_matches_dense(strided_attend, edge_index, n_src, n_dst, dtype, bias=False)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(n_dst, 2, 4, generator=gen, dtype=dtype)
    k, v = (torch.randn(n_src, 2, 4, generator=gen, dtype=dtype) for _ in "kv")
    want_out = dense_attention(q, k, v, edge_index, 0.45)
    with torch.no_grad():
        for out in (
            attend(_strided(q), _strided(k), _strided(v), edge_index, scale=0.45),
            attend_dense(_strided(q), _strided(k), _strided(v), edge_index, scale=0.45),
        ):
            torch.testing.assert_close(out, want_out.to(dtype), **TOL[dtype])


CAUSAL = [r for r in RECOGNIZED if r[4].kind == "causal"] + [
    ("implicit-causal", lambda: causal(13, implicit=True), 13, 13, DensePattern("causal", (0, 13)))
]


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,build,n_src,n_dst,want", CAUSAL, ids=[r[0] for r in CAUSAL])
def test_negative_scale_on_causal_graphs(name, build, n_src, n_dst, want, dtype, grad):
    """PyTorch's fused causal kernel returns NaN for a negative scale: ``auto`` runs the project's
    kernels there, whose results equal the dense reference, with or without gradients."""
    edge_index = build()
    edges = edge_index.edges() if hasattr(edge_index, "edges") else edge_index  # an implicit graph's edges
    assert_matches_dense(
        lambda q, k, v, b: attend(q, k, v, edge_index, scale=-0.5, return_lse=True),
        edges,
        n_src,
        n_dst,
        dtype,
        bias=False,
        scale=-0.5,
    )
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(n, 2, 4, generator=gen, dtype=dtype).requires_grad_(grad) for n in (n_dst, n_src, n_src))
    want_out = dense_attention(q, k, v, edges, -0.5)
    for out in (attend(q, k, v, edge_index, scale=-0.5), attend_dense(q, k, v, edges, scale=-0.5)):
        torch.testing.assert_close(out, want_out.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("drop", ["one-query-misses-the-last-key", "every-query-misses-the-last-key"])
def test_never_recognizes_a_bipartite_graph_short_of_full(drop):
    """A bipartite graph (N_src != N_dst) is full only if every query hears *every* key: one
    whose rows stop short of the last key is not run by SDPA over all the keys."""
    n_dst, n_src = 5, 8
    src, dst = _edges(cross(n_dst, n_src))
    last = src == n_src - 1
    keep = ~last if drop.startswith("every") else ~(last & (dst == 2))
    edge_index = torch.stack([src[keep], dst[keep]])
    assert _pattern(edge_index, n_src, n_dst) is None
    assert auto_kernel(edge_index, "cpu", num_src=n_src, num_dst=n_dst) == choose_backend(
        edge_index, "cpu", num_src=n_src, num_dst=n_dst
    )
    assert_matches_dense(
        lambda q, k, v, b: attend(q, k, v, edge_index, scale=0.45, return_lse=True),
        edge_index,
        n_src,
        n_dst,
        torch.float64,
        bias=False,
    )
