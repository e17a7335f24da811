"""Every PyTorch backend of :func:`gnn_transformer.kernels.attend` equals the per-edge reference and a
dense masked softmax, forward and backward, on small hand-made graphs."""

from __future__ import annotations

import pytest
import torch
from torch_geometric import EdgeIndex

from gnn_transformer.kernels import attend, attend_reference, choose_backend, edge_weights, plan_costs

from .conftest import (
    TOL,
    GRAPHS,
    assert_matches_dense,
    assert_splits,
    dense_attention,
    graph_case,
    make_inputs,
    weighted_loss,
)

# split with tile_cost=0.3: tiles at least 30% full go tiled, the other edges fused
BACKENDS = [
    ("fused", {}),
    ("tiled", {"block_size": 8}),
    ("tiled", {"block_size": 16}),
    ("split", {"block_size": 8, "tile_cost": 0.3}),
    ("auto", {"block_size": 8}),
]
IDS = ["fused", "tiled8", "tiled16", "split8", "auto8"]


def _grads(out, lse, inputs):
    """Gradients of a loss that uses both the output and the finite log-sum-exps."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(weighted_loss(out, lse, w), [x for x in inputs if x is not None], allow_unused=True)


def _check_auto(name, backend, kw, edge_index, n_src, n_dst):
    """On "band_far" with blocks of 8, auto really runs split (elsewhere it runs fused or tiled)."""
    if backend == "auto" and name == "band_far" and kw.get("block_size") == 8:
        assert choose_backend(edge_index, "cpu", num_src=n_src, num_dst=n_dst, **kw) == "split"


@pytest.mark.parametrize("name", ["causal", "window", "bipartite", "batch", "unsorted", "band_far"])
def test_split_cases_tile_and_fuse(name):
    """The split8 case above is no fused or tiled in disguise on these graphs: some tiles go
    tiled and some edges fused (on the others it may tile nothing)."""
    edge_index, n_src, n_dst = graph_case(name)
    assert_splits(edge_index, n_src, n_dst, **dict(BACKENDS)["split"])


@pytest.mark.parametrize(
    "dtype,heads",
    [(torch.float64, (4, 4)), (torch.float64, (4, 1)), (torch.float32, (4, 2))],
    ids=["f64-mha", "f64-mqa", "f32-gqa"],
)
@pytest.mark.parametrize("backend,kw", BACKENDS, ids=IDS)
@pytest.mark.parametrize("name", GRAPHS + ["band_far"])
def test_backend_matches_reference(name, backend, kw, dtype, heads):
    edge_index, n_src, n_dst = graph_case(name)
    _check_auto(name, backend, kw, edge_index, n_src, n_dst)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=heads[0], kv_heads=heads[1], dtype=dtype)
    out, lse = attend(q, k, v, edge_index, scale=0.35, edge_bias=b, backend=backend, return_lse=True, **kw)
    ref, ref_lse = attend_reference(q, k, v, edge_index, scale=0.35, edge_bias=b, return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (n_dst, heads[0])
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype), **TOL[dtype])
    for got, want in zip(_grads(out, lse, (q, k, v, b)), _grads(ref, ref_lse, (q, k, v, b))):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend,kw", BACKENDS + [("auto", {})], ids=IDS + ["auto"])
@pytest.mark.parametrize("name", GRAPHS + ["band_far"])
def test_backend_matches_dense(name, backend, kw, dtype):
    """Each PyTorch backend against the dense masked softmax (float64 autograd): output, lse
    (-inf on empty rows) and the gradients in q, k, v and the bias, with and without a bias."""
    edge_index, n_src, n_dst = graph_case(name)
    _check_auto(name, backend, kw, edge_index, n_src, n_dst)
    for bias in (False, True):
        assert_matches_dense(
            lambda q, k, v, b: attend(
                q, k, v, edge_index, scale=0.45, edge_bias=b, backend=backend, impl="torch", return_lse=True, **kw
            ),
            edge_index,
            n_src,
            n_dst,
            dtype,
            bias=bias,
        )


@pytest.mark.parametrize("backend,kw", BACKENDS, ids=IDS)
@pytest.mark.parametrize("name", ["causal", "hub", "batch", "multigraph"])
def test_backend_bfloat16(name, backend, kw):
    edge_index, n_src, n_dst = graph_case(name)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), dtype=torch.bfloat16)
    out, lse = attend(q, k, v, edge_index, scale=0.35, edge_bias=b, backend=backend, return_lse=True, **kw)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    up = [x.detach().float().requires_grad_() for x in (q, k, v, b)]
    ref, ref_lse = attend_reference(*up[:3], edge_index, scale=0.35, edge_bias=up[3], return_lse=True)
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-2, rtol=1e-2)
    for got, want in zip(_grads(out, lse, (q, k, v, b)), _grads(ref, ref_lse, up)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", GRAPHS)
def test_empty_rows_are_zero(name):
    edge_index, n_src, n_dst = graph_case(name)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), dtype=torch.float32)
    plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    empty = torch.bincount(plain[1], minlength=n_dst) == 0
    for backend, kw in BACKENDS:
        out, lse = attend(q, k, v, edge_index, scale=1.0, edge_bias=b, backend=backend, return_lse=True, **kw)
        assert torch.isfinite(out).all()
        assert (out[empty] == 0).all()
        assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
        grads = torch.autograd.grad(out.sum(), (q, k, v, b))
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", GRAPHS)
def test_edge_weights(name):
    edge_index, n_src, n_dst = graph_case(name)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), dtype=torch.float64)
    out, lse = attend(q, k, v, edge_index, scale=0.3, edge_bias=b, backend="fused", return_lse=True)
    alpha = edge_weights(q, k, edge_index, lse, scale=0.3, edge_bias=b, chunk=7)  # [E, H]
    plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    assert alpha.shape == (plain.size(1), 4) and (alpha >= 0).all() and (alpha <= 1 + 1e-12).all()
    sums = torch.zeros(n_dst, 4, dtype=alpha.dtype).index_add_(0, plain[1], alpha)
    nonempty = torch.bincount(plain[1], minlength=n_dst) > 0
    torch.testing.assert_close(sums[nonempty], torch.ones_like(sums[nonempty]), atol=1e-10, rtol=1e-10)
    # sum_j alpha_ji v_j reproduces the output
    v_j = v[plain[0]].repeat_interleave(2, dim=1)  # [E, H, D]
    again = torch.zeros_like(out).index_add_(0, plain[1], alpha.unsqueeze(-1) * v_j)
    torch.testing.assert_close(again, out, atol=1e-10, rtol=1e-10)


def test_unsorted_bias_follows_columns():
    """A plain, unsorted edge_index: edge_bias stays aligned with the columns as given."""
    edge_index, n_src, n_dst = graph_case("unsorted")
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1))
    perm = torch.randperm(edge_index.size(1))
    shuffled = edge_index[:, perm]
    for backend, kw in BACKENDS:
        a = attend(q, k, v, edge_index, scale=0.3, edge_bias=b, backend=backend, **kw)
        c = attend(q, k, v, shuffled, scale=0.3, edge_bias=b[perm], backend=backend, **kw)
        torch.testing.assert_close(a, c, atol=1e-10, rtol=1e-10)


def test_small_chunks_match_one_chunk():
    """Bounded memory: many row chunks and score chunks give the same result (a hub row alone)."""
    edge_index, n_src, n_dst = graph_case("hub")
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1))
    for backend, kw in [("fused", dict(max_edges=16)), ("tiled", dict(block_size=8, max_cells=64))]:
        out, lse = attend(q, k, v, edge_index, scale=0.3, edge_bias=b, backend=backend, return_lse=True, **kw)
        ref, ref_lse = attend_reference(q, k, v, edge_index, scale=0.3, edge_bias=b, return_lse=True)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        for got, want in zip(_grads(out, lse, (q, k, v, b)), _grads(ref, ref_lse, (q, k, v, b))):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("max_edges", [16, 1 << 20], ids=["chunks", "one chunk"])
def test_chunk_transposes_are_built_by_the_forward_pass_when_gradients_follow(max_edges):
    """The PyTorch fused path's source-sorted views (dK / dV) are built by a forward pass that will
    be differentiated, not for inference; the backward pass reuses them. One chunk of the whole
    graph uses the graph's CSC (an EdgeIndex's: PyG's own)."""
    from gnn_transformer.kernels import planner
    from gnn_transformer.kernels.fused_torch import row_chunks
    from gnn_transformer.topology import sliding_window

    for edge_index, n_src, n_dst in [graph_case("hub"), (sliding_window(20, 3), 20, 20)]:
        q, k, v, _ = make_inputs(n_src, n_dst, edge_index.size(1), bias=False)
        graph = planner.prepare(edge_index, n_src, n_dst)
        with torch.no_grad():
            attend(q, k, v, edge_index, scale=0.3, backend="fused", max_edges=max_edges)
        chunks = row_chunks(graph, max_edges)
        assert (len(chunks) > 1) == (max_edges == 16)
        assert not any(hasattr(c, "_transposed") for c in chunks) and "csc" not in graph.extras
        out = attend(q, k, v, edge_index, scale=0.3, backend="fused", max_edges=max_edges)
        views = [c._transposed for c in chunks]
        assert ("csc" in graph.extras) == (len(chunks) == 1)
        ref = attend_reference(q, k, v, edge_index, scale=0.3)
        torch.testing.assert_close(
            torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v)), atol=1e-10, rtol=1e-10
        )
        assert all(c._transposed is t for c, t in zip(chunks, views))  # reused by the backward pass


def test_deterministic():
    edge_index, n_src, n_dst = graph_case("hub")
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), dtype=torch.float32)
    for backend, kw in BACKENDS:
        runs = []
        for _ in range(2):
            out = attend(q, k, v, edge_index, scale=0.3, edge_bias=b, backend=backend, **kw)
            runs.append([out] + list(torch.autograd.grad(out.square().sum(), (q, k, v, b))))
        for x, y in zip(*runs):
            assert torch.equal(x, y)


def test_no_grad_and_lse_only_backward():
    edge_index, n_src, n_dst = graph_case("causal")
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1))
    with torch.no_grad():
        out = attend(q, k, v, edge_index, scale=0.3, backend="fused")
    assert not out.requires_grad
    for backend, kw in BACKENDS:  # a loss on the lse alone still reaches q, k and the bias
        _, lse = attend(q, k, v, edge_index, scale=0.3, edge_bias=b, backend=backend, return_lse=True, **kw)
        _, ref_lse = attend_reference(q, k, v, edge_index, scale=0.3, edge_bias=b, return_lse=True)
        got = torch.autograd.grad(lse.sum(), (q, k, b))
        want = torch.autograd.grad(ref_lse.sum(), (q, k, b))
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", ["fused", "tiled", "auto"])
def test_an_empty_edge_set_on_another_device_is_no_error(backend):
    """No edges hold no data on the wrong device (an empty EdgeIndex's ``.to("cuda")`` stays on the
    CPU in torch-geometric 2.8.0 with torch 2.11): every row attends to nothing."""
    q, k = torch.randn(4, 2, 8, dtype=torch.float64), torch.randn(3, 1, 8, dtype=torch.float64)
    for empty in (
        torch.empty(2, 0, dtype=torch.long, device="meta"),
        EdgeIndex(torch.empty(2, 0, dtype=torch.long, device="meta"), sparse_size=(3, 4)),
    ):
        out, lse = attend(q, k, k, empty, scale=0.3, backend=backend, return_lse=True)
        assert out.device == q.device and not out.any() and (lse == float("-inf")).all()


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(query=torch.zeros(3, 4)), "query"),
        (dict(key=torch.zeros(3, 3, 8)), "multiple of the key/value heads"),
        (dict(backend="flash"), "backend"),
        (dict(num_dst=5), "num_dst"),
        (dict(edge_bias=torch.zeros(2, 4)), "edge_bias"),
        (dict(edge_index=torch.tensor([[0, 9], [0, 1]])), "source 9"),
        (dict(edge_index=torch.tensor([[0, 1, 2]])), "edge_index"),
        (dict(block_size=0), "'block_size' to be an int in \\[1, 4096\\] \\(got 0\\)"),
        (dict(block_size=10**9), "'block_size' to be an int in \\[1, 4096\\] \\(got 1000000000\\)"),
        (dict(tile_cost=-0.5), "'tile_cost' to be a positive finite number \\(got -0.5\\)"),
        (dict(tile_cost=float("nan")), "'tile_cost'.*nan"),
        (
            dict(query=torch.zeros(3, 4, 8, dtype=torch.long), key=torch.zeros(3, 2, 8, dtype=torch.long)),
            "floating-point query/key/value \\(got torch.int64\\)",
        ),
        (dict(query=torch.zeros(3, 4, 0), key=torch.zeros(3, 2, 0)), "head dimension of at least 1"),
        (dict(edge_bias=torch.zeros(3, 4, dtype=torch.bool)), "'edge_bias'.*floating-point.*torch.bool"),
        (dict(edge_bias=torch.zeros(3, 4, device="meta")), "'edge_bias' on the device.*meta"),
        (dict(edge_index=torch.tensor([[0, 1, 2], [0, 1, 2]], device="meta")), "'edge_index' on the device.*meta"),
        (dict(edge_index=torch.empty(2, 0, dtype=torch.long, device="meta"), num_dst=5), "num_dst"),
        (
            dict(edge_index=EdgeIndex(torch.empty(2, 0, dtype=torch.long, device="meta"), sparse_size=(4, 3))),
            "'edge_index' has 4 source nodes but 'key' has 3 rows",
        ),
        (dict(scale=None), "'scale'.*None"),
        (dict(scale=torch.tensor([0.5, 0.5])), "'scale'.*one-element.*shape \\[2\\]"),
        (dict(scale=torch.tensor(0.5, requires_grad=True)), "'scale'.*without gradient.*requires_grad=True"),
        (dict(scale=torch.tensor(2)), "'scale'.*dtype torch.int64"),
        (
            dict(
                edge_index=torch.tensor([[0, 1], [1, 2]], device="meta"),
                query=torch.zeros(3, 4, 8, device="meta"),
                key=torch.zeros(3, 2, 8, device="meta"),
            ),
            "query, key and value with values to attend over, not on the meta device",
        ),
        (
            dict(
                edge_index=torch.empty(2, 0, dtype=torch.long, device="meta"),
                query=torch.zeros(3, 4, 8, device="meta"),
                key=torch.zeros(3, 2, 8, device="meta"),
            ),
            "query, key and value with values to attend over, not on the meta device",
        ),
        (dict(scale=float("inf")), "'scale'.*inf"),
        (dict(query=torch.zeros(3, 0, 8)), "at least one head"),
        (dict(dropout_p="0.1"), "'dropout_p' in \\[0, 1\\) \\(got '0.1'\\)"),
        (dict(dropout_p=True), "'dropout_p'.*True"),
        (dict(max_edges=0), "'max_edges' to be a positive int \\(got 0\\)"),
        (dict(max_cells=2.5), "'max_cells' to be a positive int \\(got 2.5\\)"),
    ],
)
def test_errors_name_the_argument(bad, match):
    args = dict(
        query=torch.zeros(3, 4, 8),
        key=torch.zeros(3, 2, 8),
        value=torch.zeros(3, 2, 8),
        edge_index=torch.tensor([[0, 1, 2], [0, 1, 2]]),
    )
    args.update({k: v for k, v in bad.items() if k in args})
    extra = {k: v for k, v in bad.items() if k not in args}
    if "key" in bad:
        args["value"] = bad["key"]
    scale = extra.pop("scale", 1.0)
    with pytest.raises(ValueError, match=match):
        attend(args["query"], args["key"], args["value"], args["edge_index"], scale=scale, **extra)
    if set(extra) & {"block_size", "tile_cost"}:  # the planners check them too
        from gnn_transformer.kernels import plan_costs

        for planner in (choose_backend, plan_costs):
            with pytest.raises(ValueError, match=match):
                planner(args["edge_index"], "cpu", **extra)


def test_choose_backend_by_block_fill():
    from gnn_transformer.topology import causal, erdos_renyi

    assert choose_backend(causal(256), "cpu") in ("tiled", "split")
    assert choose_backend(erdos_renyi(256, p=0.02, seed=1), "cpu") == "fused"
    # window plus a few random long-range edges: tiles for the band, fused for the rest
    src, dst = [], []
    for i in range(512):
        for j in range(max(0, i - 64), min(512, i + 65)):
            src.append(j)
            dst.append(i)
    g = torch.Generator().manual_seed(0)
    extra_dst = torch.arange(512)
    extra_src = torch.randint(0, 512, (512,), generator=g)
    far = (extra_src - extra_dst).abs() > 200
    src = torch.cat([torch.tensor(src), extra_src[far]])
    dst = torch.cat([torch.tensor(dst), extra_dst[far]])
    edge_index = torch.stack([src, dst])
    assert choose_backend(edge_index, "cpu") == "split"
    q, k, v, _ = make_inputs(512, 512, 0, heads=2, kv_heads=1, dim=8, bias=False)
    out = attend(q, k, v, edge_index, scale=0.3, backend="auto")
    torch.testing.assert_close(out, attend_reference(q, k, v, edge_index, scale=0.3), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("max_edges", [4, 1 << 20])
def test_chunks_with_more_parallel_edges_than_cells(max_edges):
    """Every pair three times over: a chunk can hold more edges than its dense block has cells."""
    src = torch.arange(3).repeat(3).repeat(3)
    dst = torch.arange(3).repeat_interleave(3).repeat(3)
    edge_index = torch.stack([src, dst])
    q, k, v, b = make_inputs(3, 3, edge_index.size(1))
    out, lse = attend(
        q, k, v, edge_index, scale=0.3, edge_bias=b, backend="fused", return_lse=True, max_edges=max_edges
    )
    ref, ref_lse = attend_reference(q, k, v, edge_index, scale=0.3, edge_bias=b, return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for got, want in zip(_grads(out, lse, (q, k, v, b)), _grads(ref, ref_lse, (q, k, v, b))):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    "backend,kw",
    [("tiled", {"block_size": 8}), ("split", {"block_size": 8, "tile_cost": 0.3})],
    ids=["tiled8", "split8"],
)
@pytest.mark.parametrize("name", GRAPHS)
def test_float32_lse_gradient_through_cpu_flash_backward(name, backend, kw, monkeypatch):
    """A loss on the lse (or split's merge) runs the fused CPU backward with one extra channel."""
    from gnn_transformer.kernels import tiled_torch

    if tiled_torch._FLASH_BWD is None:
        pytest.skip("this torch has no fused CPU attention backward")
    calls = []
    real = tiled_torch._FLASH_BWD
    monkeypatch.setattr(tiled_torch, "_FLASH_BWD", lambda *a, **k: calls.append(a[0].size(-1)) or real(*a, **k))
    edge_index, n_src, n_dst = graph_case(name)
    q, k, v, _ = make_inputs(n_src, n_dst, edge_index.size(1), heads=4, kv_heads=2, dtype=torch.float32, bias=False)
    out, lse = attend(q, k, v, edge_index, scale=0.35, backend=backend, return_lse=True, **kw)
    ref, ref_lse = attend_reference(q, k, v, edge_index, scale=0.35, return_lse=True)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    for got, want in zip(_grads(out, lse, (q, k, v)), _grads(ref, ref_lse, (q, k, v))):
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert set(calls) <= {q.size(-1) + 1}  # head dim 8 + the delta channel
    if backend == "tiled" and edge_index.size(1):  # split may tile nothing
        assert calls


@pytest.mark.parametrize("use_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize(
    "backend,kw",
    [("tiled", {"block_size": 8}), ("tiled", {"block_size": 16}), ("split", {"block_size": 8, "tile_cost": 0.3})],
    ids=["tiled8", "tiled16", "split8"],
)
@pytest.mark.parametrize("name", ["causal", "window", "empty_rows", "hub", "multigraph", "bipartite", "band_far"])
def test_float32_constant_bias_through_cpu_flash_backward(name, backend, kw, use_lse, monkeypatch):
    """A float32 bias that needs no gradient (ALiBi) keeps the PyTorch tiled path on the fused CPU
    attention, forward and backward (as an additive mask):
    output, lse and q/k/v gradients equal the dense reference at 1e-5."""
    from gnn_transformer.kernels import tiled_torch

    if tiled_torch._FLASH is None or tiled_torch._FLASH_BWD is None:
        pytest.skip("this torch has no fused CPU attention")
    fwd, bwd = [], []
    real_fwd, real_bwd = tiled_torch._FLASH, tiled_torch._FLASH_BWD
    monkeypatch.setattr(tiled_torch, "_FLASH", lambda *a, **k: fwd.append(a[0].size(-1)) or real_fwd(*a, **k))
    monkeypatch.setattr(tiled_torch, "_FLASH_BWD", lambda *a, **k: bwd.append(a[0].size(-1)) or real_bwd(*a, **k))
    edge_index, n_src, n_dst = graph_case(name)
    plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    slopes = 2.0 ** -torch.arange(1.0, 5.0)  # ALiBi, 4 heads
    bias = -(plain[0] - plain[1]).abs().float()[:, None] * slopes  # [E, H], no gradient
    q, k, v, _ = make_inputs(n_src, n_dst, plain.size(1), heads=4, kv_heads=2, dtype=torch.float32, bias=False)
    out, lse = attend(
        q, k, v, edge_index, scale=0.45, edge_bias=bias, backend=backend, impl="torch", return_lse=True, **kw
    )
    up = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = dense_attention(*up, edge_index, 0.45, bias.double(), return_lse=True)
    torch.testing.assert_close(out, ref.float(), **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse.float(), **TOL[torch.float32])
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))

    def loss(o, l):
        return (o * w.to(o.dtype)).sum() + (0.3 * l.masked_fill(torch.isinf(l), 0.0).sum() if use_lse else 0.0)

    for got, want in zip(torch.autograd.grad(loss(out, lse), (q, k, v)), torch.autograd.grad(loss(ref, ref_lse), up)):
        torch.testing.assert_close(got, want.float(), **TOL[torch.float32])
    costs = plan_costs(edge_index, "cpu", num_src=n_src, num_dst=n_dst, **kw)
    tiles_something = backend == "tiled" or costs["dense_tiles"] > 0  # split: when its tiled part is not empty
    assert bool(fwd) == tiles_something and bool(bwd) == tiles_something
    # the lse's gradient enters the fused backward as one more channel; a merge always sends one
    # (split's, and tiled's on a graph that repeats an edge: the copies run fused)
    repeats = torch.unique(plain[1] * n_src + plain[0]).numel() < plain.size(1)
    merged = backend == "split" or repeats
    assert set(fwd) <= {q.size(-1)} and set(bwd) <= {q.size(-1) + (use_lse or merged)}


# ---------------------------------------------------------------- the graph cache and the outputs
@pytest.mark.parametrize("backend,kw", BACKENDS, ids=IDS)
@pytest.mark.parametrize("kind", ["tensor", "EdgeIndex", "EdgeIndex data"])
def test_edge_index_written_between_forward_and_backward(backend, kw, kind):
    """Writing the edge_index in place before backward (reusing a buffer for the next batch) is
    never silently wrong: a backend whose backward reads the edges raises PyTorch's in-place
    error (as the per-edge reference does), the others keep their own copies and stay exact.
    An EdgeIndex is written through itself or through its data (``as_tensor()``), which moves
    another version counter."""
    edge_index, n_src, n_dst = graph_case("causal")
    if kind == "tensor":
        edge_index = edge_index.as_tensor().clone()  # a plain LongTensor, sorted by target
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1))
    want = _grads(
        *attend(q, k, v, edge_index, scale=0.3, edge_bias=b, backend=backend, return_lse=True, **kw), (q, k, v, b)
    )
    out, lse = attend(q, k, v, edge_index, scale=0.3, edge_bias=b, backend=backend, return_lse=True, **kw)
    written = edge_index.as_tensor() if kind == "EdgeIndex data" else edge_index
    written[0] = written[1]  # self-loops only, from now on
    try:
        got = _grads(out, lse, (q, k, v, b))
    except RuntimeError as err:
        assert "modified by an inplace operation" in str(err)
        assert backend == "fused" or (backend == "auto" and choose_backend(edge_index, "cpu", **kw) == "fused")
    else:
        assert backend != "fused"
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
    loops, _ = attend(q, k, v, edge_index, scale=0.3, edge_bias=b, backend=backend, return_lse=True, **kw)
    torch.testing.assert_close(loops, attend_reference(q, k, v, edge_index, scale=0.3, edge_bias=b))


@pytest.mark.parametrize("backend,kw", BACKENDS, ids=IDS)
@pytest.mark.parametrize("sort_order", ["col", None])
def test_edge_index_data_written_in_place_is_planned_again(backend, kw, sort_order):
    """A write through an EdgeIndex's data (``as_tensor()``) moves the data's version counter, not
    the wrapper's: the cached plan is dropped, the new edges run (sorted or not) and are checked
    again, so an index past the keys is refused rather than read."""
    gen = torch.Generator().manual_seed(3)
    n = 12
    src, dst = torch.randint(0, n, (2, 40), generator=gen)
    if sort_order == "col":
        dst = dst.sort().values
    edge_index = EdgeIndex(torch.stack([src, dst]), sparse_size=(n, n), sort_order=sort_order)
    q, k, v, _ = make_inputs(n, n, 40, bias=False)
    attend(q, k, v, edge_index, scale=0.3, backend=backend, **kw)
    edge_index.as_tensor()[0] = torch.randint(0, n, (40,), generator=gen)
    out = attend(q, k, v, edge_index, scale=0.3, backend=backend, **kw)
    torch.testing.assert_close(out, attend_reference(q, k, v, edge_index.as_tensor(), scale=0.3))
    edge_index.as_tensor()[0, 5] = 10**7
    with pytest.raises(ValueError, match="'edge_index' names source 10000000 but 'key' has 12 rows"):
        attend(q, k, v, edge_index, scale=0.3, backend=backend, **kw)


def test_inference_tensors_and_their_writes():
    """An edge_index made under inference mode has no version counter: the cache compares values."""
    q, k, v, _ = make_inputs(6, 6, 0, bias=False)
    with torch.inference_mode():
        edge_index = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
        for backend, kw in BACKENDS:
            out = attend(q, k, v, edge_index, scale=0.3, backend=backend, **kw)
            torch.testing.assert_close(out, attend_reference(q, k, v, edge_index, scale=0.3))
        edge_index[0] = torch.tensor([4, 4, 0, 0])  # in place: no version bump on an inference tensor
        for backend, kw in BACKENDS:
            out = attend(q, k, v, edge_index, scale=0.3, backend=backend, **kw)
            torch.testing.assert_close(out, attend_reference(q, k, v, edge_index, scale=0.3))


def test_layer_plans_and_attends_on_one_cached_graph(monkeypatch):
    """choose_backend and attend build the graph once, also when the largest id + 1 is not N."""
    from gnn_transformer import GraphMultiheadAttention
    from gnn_transformer.kernels import planner

    builds = []
    real = planner._build
    monkeypatch.setattr(planner, "_build", lambda *a: builds.append(a[1:]) or real(*a))
    layer = GraphMultiheadAttention(16, 4, backend="auto").eval()
    x = torch.randn(9, 16)
    edge_index = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])  # nodes 5..8 are neither source nor target
    for _ in range(3):
        layer(x, edge_index)
    assert builds == [(9, 9)]
    assert choose_backend(edge_index, "cpu") == layer.resolve_backend(edge_index, x.device, size=(9, 9))
    assert builds == [(9, 9)]  # a later plan without sizes reuses the sizes of the cached graph


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_with_only_minus_inf_biases_are_empty(dtype):
    """A target whose edges all carry a -inf bias is an empty row on every backend and on the
    per-edge layer path: zero output, zero weights, finite and equal gradients."""
    from gnn_transformer import GraphMultiheadAttention

    edge_index, n_src, n_dst = graph_case("window")
    plain = edge_index.as_tensor()
    layer = GraphMultiheadAttention(16, 4, dtype=dtype).eval()
    x = torch.randn(n_src, 16, dtype=dtype, requires_grad=True)
    bias = torch.randn(plain.size(1), 4, dtype=dtype)
    bias[plain[1] == 5] = float("-inf")  # every edge into target 5, every head
    bias[(plain[1] == 9), 2] = float("-inf")  # every edge into target 9, head 2
    bias.requires_grad_()
    results = {}
    for backend in ("pyg", "fused", "tiled", "split"):
        out, w = layer(x, edge_index, edge_bias=bias, backend=backend, return_attention_weights=True)
        grads = torch.autograd.grad(out.square().sum(), (x, bias))
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
        assert (w[plain[1] == 5] == 0).all() and (w[plain[1] == 9, 2] == 0).all()
        results[backend] = (out, w, *grads)
    q, k, v = layer.project(x, x, x)
    heads = layer.attend(q, k, v, edge_index, edge_bias=bias, backend="fused")[0]
    assert (heads[5] == 0).all() and (heads[9, 2] == 0).all()
    # the reference that every backend is tested against (it gave NaN rows here)
    ref = attend_reference(q, k, v, edge_index, scale=layer.head_dim**-0.5, edge_bias=bias)
    torch.testing.assert_close(ref, heads, **TOL[dtype])
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, bias), retain_graph=True)  # shared projections
    fused_grads = torch.autograd.grad(heads.square().sum(), (x, bias))
    for got, want in zip(ref_grads, fused_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **TOL[dtype])
    for backend in ("fused", "tiled", "split"):
        for got, want in zip(results[backend], results["pyg"]):
            torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("backend,kw", BACKENDS, ids=IDS)
def test_output_is_a_plain_contiguous_tensor(backend, kw):
    """The same user code works whichever backend auto picks: view as [N, H·D], add in place."""
    edge_index, n_src, n_dst = graph_case("window")
    q, k, v, _ = make_inputs(n_src, n_dst, edge_index.size(1), bias=False)
    out = attend(q, k, v, edge_index, scale=0.3, backend=backend, **kw)
    assert out.is_contiguous() and out.requires_grad
    out.view(n_dst, -1).add_(1.0)  # a view of a kernel's internal layout refused this


def test_numpy_chunk_sizes_and_a_tensor_dropout_p():
    import numpy as np

    edge_index, n_src, n_dst = graph_case("window")
    q, k, v, _ = make_inputs(n_src, n_dst, edge_index.size(1), bias=False)
    want = attend(q, k, v, edge_index, scale=0.5, backend="fused", max_edges=7, dropout_p=0.2, dropout_seed=3)
    got = attend(
        q,
        k,
        v,
        edge_index,
        scale=0.5,
        backend="fused",
        max_edges=np.int64(7),
        max_cells=np.int32(1 << 12),
        dropout_p=torch.tensor(0.2, dtype=torch.float64),
        dropout_seed=3,
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_one_element_tensor_scale_is_a_float():
    """A one-element floating-point tensor without gradient is a scale, as the docstring says."""
    edge_index, n_src, n_dst = graph_case("window")
    q, k, v, _ = make_inputs(n_src, n_dst, edge_index.size(1), bias=False)
    for backend, kw in BACKENDS:
        got = attend(q, k, v, edge_index, scale=torch.tensor([0.5], dtype=torch.float64), backend=backend, **kw)
        torch.testing.assert_close(got, attend(q, k, v, edge_index, scale=0.5, backend=backend, **kw), rtol=0, atol=0)


def test_a_rational_scale_is_a_float():
    """A ``Fraction`` (or NumPy) scale reaches the kernels as a float: it raised a TypeError inside
    ``torch.sparse.sampled_addmm`` before."""
    import fractions

    edge_index, n_src, n_dst = graph_case("window")
    q, k, v, _ = make_inputs(n_src, n_dst, edge_index.size(1), bias=False)
    for backend, kw in BACKENDS:
        got = attend(q, k, v, edge_index, scale=fractions.Fraction(1, 2), backend=backend, **kw)
        torch.testing.assert_close(got, attend(q, k, v, edge_index, scale=0.5, backend=backend, **kw), rtol=0, atol=0)


@pytest.mark.parametrize(
    "backend,kw", [b for b in BACKENDS if b[0] != "tiled"], ids=[i for i in IDS if "tiled" not in i]
)
def test_a_nan_reaches_exactly_the_rows_that_read_it(backend, kw):
    """A NaN in one token's key: the rows that read it get a NaN output and a NaN log-sum-exp (so
    their attention weights are NaN, as on the per-edge path), the others stay exact (their
    log-sum-exp was -inf before: the weights of a NaN row read 0). The tiled path computes whole
    tiles, where 0 * NaN reaches rows of the tile that do not read the token, as dense masked
    attention does."""
    edge_index, n_src, n_dst = graph_case("empty_rows")
    plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    q, k, v, _ = make_inputs(n_src, n_dst, plain.size(1), bias=False)
    k = k.detach().clone()
    bad = int(plain[0, 0])
    k[bad, :, 0] = float("nan")  # every key/value head
    out, lse = attend(q, k, v, edge_index, scale=0.3, backend=backend, return_lse=True, **kw)
    reads = torch.zeros(n_dst, dtype=torch.bool)
    reads[plain[1][plain[0] == bad]] = True
    assert torch.equal(out.isnan().any(-1).any(-1), reads)
    assert torch.equal(lse.isnan().all(-1), reads) and not lse[~reads].isnan().any()
    want = attend_reference(q, k, v, edge_index, scale=0.3)
    torch.testing.assert_close(out[~reads], want[~reads])
    weights = edge_weights(q, k, edge_index, lse, scale=0.3)
    assert torch.equal(weights.isnan().any(-1), reads[plain[1]])


@pytest.mark.parametrize("backend,kw", BACKENDS, ids=IDS)
def test_one_edge_index_on_inputs_of_other_sizes(backend, kw):
    """The graph cache is keyed by the tensor *and* the sizes it was built for: one plain
    edge_index on more keys and queries (a growing memory) is planned again, and on fewer keys
    than it names it is checked again and refused, never read out of range."""
    edge_index = torch.tensor([[0, 1, 2, 3, 5], [1, 2, 3, 4, 4]])
    for n_src, n_dst in ((6, 5), (9, 7), (6, 5)):
        q, k, v, _ = make_inputs(n_src, n_dst, 0, bias=False)
        out = attend(q, k, v, edge_index, scale=0.3, backend=backend, **kw)
        torch.testing.assert_close(out, attend_reference(q, k, v, edge_index, scale=0.3), **TOL[torch.float64])
    q, k, v, _ = make_inputs(4, 5, 0, bias=False)
    with pytest.raises(ValueError, match="'edge_index' names source 5 but 'key' has 4 rows"):
        attend(q, k, v, edge_index, scale=0.3, backend=backend, **kw)
