"""``auto``'s FlexAttention route for interval graphs (each target hears one run of sources): the
recognition never answers for a graph that is not one, the block mask built from the bounds
holds exactly the graph's cells, and the results equal the dense reference. FlexAttention's CPU
reference has no backward pass: gradients of the route are tested on a GPU
(``tests/test_kernels_cuda.py``); here the route runs on CPU tensors with ``FLEX_DEVICES``
patched."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gnn_transformer.kernels import attend, auto_kernel, choose_backend, dispatch, flex, planner
from gnn_transformer.kernels.planner import IntervalPattern, interval_pattern
from gnn_transformer.topology import (
    BlockGraph,
    causal,
    cross,
    dilated,
    document,
    interval_graph,
    prefix_lm,
    random,
    sliding_window,
    to_dense_mask,
)

from .conftest import TOL, dense_attention

pytestmark = [
    pytest.mark.skipif(not flex.flex_available(), reason="needs FlexAttention and Triton"),
    # FlexAttention's CPU reference, uncompiled, is what these tests run on purpose
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
]


def _pattern(edge_index, n_src, n_dst):
    return interval_pattern(planner.prepare(edge_index, n_src, n_dst))


def _bounds(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` of a dense ``[N_dst, N_src]`` mask whose rows are runs (``0, -1``: empty row)."""
    cols = torch.arange(mask.size(1))
    some = mask.any(1)
    lo = torch.where(some, torch.where(mask, cols, mask.size(1)).amin(1), 0)
    hi = torch.where(some, torch.where(mask, cols, -1).amax(1), -1)
    return lo, hi


def _edges(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The target-sorted edge list of ``lo[i] ... hi[i]`` per target, sources ascending."""
    counts = (hi - lo + 1).clamp(min=0)
    dst = torch.repeat_interleave(torch.arange(lo.numel()), counts)
    start = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    src = torch.repeat_interleave(lo, counts) + torch.arange(dst.numel()) - start
    return torch.stack([src, dst])


INTERVALS = [
    ("window", lambda: sliding_window(40, 5), 40, 40),
    ("causal-window", lambda: sliding_window(40, 6, causal=True), 40, 40),
    ("prefix-lm", lambda: prefix_lm(30, 9), 30, 30),
    ("batch-windows", lambda: sliding_window([9, 20, 4], 3), 33, 33),
    ("document-windows", lambda: _edges(*_bounds(to_dense_mask(document(24, [10, 14])) & _band(24, 4))), 24, 24),
    ("empty-rows", lambda: _edges(torch.tensor([0, 0, 2, 0, 1, 0]), torch.tensor([2, -1, 4, -1, 5, 5])), 6, 6),
    ("not-monotone", lambda: _edges(torch.tensor([5, 0, 3, 1]), torch.tensor([6, 6, 3, 2])), 7, 4),
    ("bipartite-window", lambda: cross(12, 30, mode="window", window=4), 30, 12),
    ("one-node", lambda: torch.tensor([[0], [0]]), 1, 1),
]


def _band(n: int, w: int) -> torch.Tensor:
    i = torch.arange(n)
    return (i[:, None] - i[None, :]).abs() <= w


@pytest.mark.parametrize("name,build,n_src,n_dst", INTERVALS, ids=[r[0] for r in INTERVALS])
def test_recognizes_interval_graphs(name, build, n_src, n_dst):
    edge_index = build()
    pattern = _pattern(edge_index, n_src, n_dst)
    assert pattern is not None and pattern.num_src == n_src
    mask = to_dense_mask(edge_index, n_src, n_dst) if name != "one-node" else torch.ones(1, 1, dtype=torch.bool)
    lo, hi = _bounds(mask)
    assert torch.equal(pattern.lo, lo) and torch.equal(pattern.hi, hi)


def _not_intervals():
    src, dst = sliding_window(20, 3)
    keep = torch.ones(src.numel(), dtype=torch.bool)
    keep[(dst == 7) & (src == 7)] = False  # a hole inside row 7's run
    twice = src.clone()
    twice[(dst == 7) & (src == 7)] = 6  # row 7 hears 6 twice and not 7: first, last and count as a run's
    cases = {
        "hole": torch.stack([src[keep], dst[keep]]),
        "hole-and-repeat": torch.stack([twice, dst]),
        "duplicate": torch.stack([torch.cat([src, src[5:6]]), torch.cat([dst, dst[5:6]])]),
        "dilated": dilated(20, 3, 2),
        "random": random(20, 4, seed=1),
        "no-edges": torch.empty(2, 0, dtype=torch.long),
    }
    # the same edges, one row's sources in descending order: left to the project's kernels
    order = torch.argsort(dst * 100 + torch.where(dst == 9, -src, src))
    cases["unsorted-row"] = torch.stack([src[order], dst[order]])
    return cases


@pytest.mark.parametrize("name", list(_not_intervals()))
def test_never_recognizes_a_graph_that_is_not_one(name):
    edge_index = _not_intervals()[name]
    assert _pattern(edge_index, 20, 20) is None


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_recognition_on_random_graphs(data):
    """A random graph of runs, perhaps with one edge added or removed: recognized exactly when every
    row of its dense mask is one run (its edges listed once, sources ascending), with those bounds."""
    n_dst = data.draw(st.integers(1, 12))
    n_src = data.draw(st.integers(1, 12))
    lo = torch.tensor(data.draw(st.lists(st.integers(0, n_src - 1), min_size=n_dst, max_size=n_dst)))
    width = torch.tensor(data.draw(st.lists(st.integers(-1, n_src), min_size=n_dst, max_size=n_dst)))
    hi = torch.minimum(lo + width, torch.tensor(n_src - 1))
    hi = torch.where(width < 0, -1, hi)
    lo = torch.where(width < 0, 0, lo)
    src, dst = _edges(lo, hi)
    change = data.draw(st.sampled_from(["none", "add", "remove", "repeat"]))
    if change == "repeat" and src.numel() > 1:  # an edge's source becomes its predecessor's in the row
        e = data.draw(st.integers(1, src.numel() - 1))
        if dst[e] == dst[e - 1]:
            src = src.clone()
            src[e] = src[e - 1]
    elif change == "remove" and src.numel():
        e = data.draw(st.integers(0, src.numel() - 1))
        src, dst = torch.cat([src[:e], src[e + 1 :]]), torch.cat([dst[:e], dst[e + 1 :]])
    elif change == "add":
        j, i = data.draw(st.integers(0, n_src - 1)), data.draw(st.integers(0, n_dst - 1))
        # inserted where it keeps the row's sources sorted (a repeated edge stays a repeat)
        at = int(((dst < i) | ((dst == i) & (src <= j))).sum())
        src = torch.cat([src[:at], torch.tensor([j]), src[at:]])
        dst = torch.cat([dst[:at], torch.tensor([i]), dst[at:]])
    edge_index = torch.stack([src, dst])
    pattern = _pattern(edge_index, n_src, n_dst)
    mask = torch.zeros(n_dst, n_src, dtype=torch.bool)
    mask[dst, src] = True
    want_lo, want_hi = _bounds(mask)
    runs = (
        src.numel() > 0
        and src.numel() == int(mask.sum())
        and bool((want_hi - want_lo + 1).clamp(min=0).eq(mask.sum(1)).all())
    )
    assert (pattern is not None) == runs
    if pattern is not None:
        assert torch.equal(pattern.lo, want_lo) and torch.equal(pattern.hi, want_hi)


def _emulate(mask_obj, n_dst: int, n_src: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What FlexAttention's kernels compute from a ``BlockMask``: ``(cells [N_dst, N_src], full
    blocks' cells)``: every cell of a full block, the ``mask_mod``'s cells of a partial block, no
    other cell; and whether each listed block is listed once."""
    nqb, nkb = -(-n_dst // block), -(-n_src // block)
    cells = torch.zeros(nqb * block, nkb * block, dtype=torch.bool)
    full = torch.zeros_like(cells)
    q = torch.arange(nqb * block)
    kv = torch.arange(nkb * block)
    allowed = mask_obj.mask_mod(0, 0, q[:, None], kv[None, :])
    tables = (
        (mask_obj.kv_num_blocks, mask_obj.kv_indices, False),
        (mask_obj.full_kv_num_blocks, mask_obj.full_kv_indices, True),
    )
    seen = torch.zeros(nqb, nkb, dtype=torch.int64)
    for num, idx, is_full in tables:
        for r in range(nqb):
            for kb in idx[0, 0, r, : int(num[0, 0, r])].tolist():
                seen[r, kb] += 1
                rows, cols = slice(r * block, (r + 1) * block), slice(kb * block, (kb + 1) * block)
                cells[rows, cols] |= True if is_full else allowed[rows, cols]
                if is_full:
                    full[rows, cols] = True
    assert int(seen.max()) <= 1, "a key block listed twice for one query block"
    return cells[:n_dst, :n_src], full


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_block_mask_holds_exactly_the_graph(data):
    """Random bounds (monotone or not, empty rows, sizes not multiples of the block): the cells the
    kernels would compute are exactly the graph's, and a block listed as full is full."""
    block = data.draw(st.sampled_from([4, 8]))
    n_dst, n_src = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40))
    monotone = data.draw(st.booleans())
    lo = torch.tensor(data.draw(st.lists(st.integers(0, n_src - 1), min_size=n_dst, max_size=n_dst)))
    width = torch.tensor(data.draw(st.lists(st.integers(-2, n_src), min_size=n_dst, max_size=n_dst)))
    if monotone:
        lo = lo.sort().values
        width = width.clamp(min=0)
    hi = torch.minimum(lo + width, torch.tensor(n_src - 1))
    if monotone:
        hi = torch.cummax(hi, 0).values
    lo, hi = torch.where(hi < lo, 0, lo), torch.where(hi < lo, -1, hi)
    mask_obj = flex.block_mask(IntervalPattern(lo, hi, n_src), block)
    cells, full = _emulate(mask_obj, n_dst, n_src, block)
    cols = torch.arange(n_src)
    want = (cols >= lo[:, None]) & (cols <= hi[:, None])
    assert torch.equal(cells, want)
    inside = torch.zeros_like(full)
    inside[:n_dst, :n_src] = want
    assert not bool((full & ~inside).any()), "a block listed as full holds a cell outside the graph"


def _inputs(n_src, n_dst, heads, kv_heads, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_dst, heads, dim, generator=g, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(n_src, kv_heads, dim, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2), (4, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("name,build,n_src,n_dst", INTERVALS, ids=[r[0] for r in INTERVALS])
def test_route_matches_dense(name, build, n_src, n_dst, heads, kv_heads, dtype):
    edge_index = build()
    q, k, v = _inputs(n_src, n_dst, heads, kv_heads, 16, dtype)
    out = flex.flex_interval_attention(q, k, v, _pattern(edge_index, n_src, n_dst), 0.4)
    ref = dense_attention(q, k, v, edge_index, 0.4)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref.to(dtype), **TOL[dtype])


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_route_on_random_interval_graphs(data):
    n_dst, n_src = data.draw(st.integers(1, 300)), data.draw(st.integers(1, 300))
    w = data.draw(st.integers(0, 40))
    i = torch.arange(n_dst) * n_src // n_dst  # the diagonal of a bipartite graph
    lo, hi = (i - w).clamp(min=0), (i + data.draw(st.integers(-w, w))).clamp(max=n_src - 1)
    lo, hi = torch.where(hi < lo, 0, lo), torch.where(hi < lo, -1, hi)
    edge_index = _edges(lo, hi)
    if edge_index.size(1) == 0:
        return
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    q, k, v = _inputs(n_src, n_dst, 2, 1, 16, dtype, seed=data.draw(st.integers(0, 9)))
    out = flex.flex_interval_attention(q, k, v, _pattern(edge_index, n_src, n_dst), -0.7)
    torch.testing.assert_close(out, dense_attention(q, k, v, edge_index, -0.7).to(dtype), **TOL[dtype])


@pytest.fixture
def flex_on_cpu(monkeypatch):
    """The route taken on CPU tensors (FlexAttention's reference), from one target, in float32 and
    float64, with nothing decided yet; counts the calls that reached FlexAttention."""
    monkeypatch.setattr(planner, "FLEX_DEVICES", ("cpu",))
    monkeypatch.setattr(planner, "FLEX_MIN_TARGETS", 1)
    monkeypatch.setattr(planner, "FLEX_DTYPES", (torch.float32, torch.float64))
    monkeypatch.setattr(flex, "_CHOSEN", {})  # what earlier calls decided, and warned
    monkeypatch.setattr(flex, "_WARNED", set())
    calls = []
    route = dispatch.flex_interval_attention

    def counted(*args, **kwargs):
        calls.append(args[3])
        return route(*args, **kwargs)

    monkeypatch.setattr(dispatch, "flex_interval_attention", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("implicit", [False, True])
def test_auto_runs_the_route_and_matches_dense(flex_on_cpu, implicit, dtype):
    graph = sliding_window(150, 9, implicit=implicit, **({"block_size": 16} if implicit else {}))
    edges = graph.edges() if implicit else graph
    q, k, v = _inputs(150, 150, 4, 2, 16, dtype)
    assert auto_kernel(graph, "cpu", dtype=dtype, head_dim=16) == "flex"
    with torch.no_grad():
        out = attend(q, k, v, graph, scale=0.3)
    assert len(flex_on_cpu) == 1
    torch.testing.assert_close(out, dense_attention(q, k, v, edges, 0.3).to(dtype), **TOL[dtype])
    with torch.no_grad():  # the pattern (and its block mask) is cached with the graph
        attend(q, k, v, graph, scale=0.3)
    assert flex_on_cpu[1] is flex_on_cpu[0]


def test_implicit_graph_keeps_its_bounds_on_another_device():
    graph = sliding_window(40, 3, causal=True, implicit=True, block_size=16)
    lo, hi = graph.intervals
    moved = graph.to("cpu")
    assert moved is not graph and torch.equal(moved.intervals[0], lo) and torch.equal(moved.intervals[1], hi)
    mask = to_dense_mask(graph.edges(), 40, 40)
    want_lo, want_hi = _bounds(mask)
    assert torch.equal(lo, want_lo) and torch.equal(hi, want_hi)
    rebuilt = interval_graph(lo, hi, 40, 16)
    assert torch.equal(rebuilt.intervals[0], lo) and torch.equal(rebuilt.intervals[1], hi)
    # a graph given by its tiles carries no bounds
    tiles = BlockGraph(40, 40, 16, 16, graph.q_block, graph.k_block, graph.mask_index, graph.masks)
    assert tiles.intervals is None and auto_kernel(tiles, "cuda", dtype=torch.bfloat16, head_dim=64) == "tiled"


def test_what_keeps_calls_off_the_route(flex_on_cpu):
    edge_index = sliding_window(64, 5)
    q, k, v = _inputs(64, 64, 2, 2, 16, torch.float32)
    bias = torch.randn(edge_index.size(1), 2)
    planned = choose_backend(edge_index, "cpu")
    assert auto_kernel(edge_index, "cpu", edge_bias=True, head_dim=16) == planned
    assert auto_kernel(edge_index, "cpu", dropout=True, head_dim=16) != "flex"
    assert auto_kernel(edge_index, "cpu", return_lse=True, head_dim=16) == planned
    assert auto_kernel(edge_index, "cpu", impl="triton", head_dim=16) == planned
    assert auto_kernel(edge_index, "cpu", head_dim=8) == planned  # FlexAttention's GPU kernels need 16
    assert auto_kernel(edge_index, "cpu", dtype=torch.bfloat16, head_dim=16) == planned  # not in FLEX_DTYPES here
    assert auto_kernel(causal(64), "cpu", head_dim=16) == "sdpa"  # SDPA first
    with torch.no_grad():
        out_b = attend(q, k, v, edge_index, scale=0.5, edge_bias=bias)
        out, lse = attend(q, k, v, edge_index, scale=0.5, return_lse=True)
        attend(q, k, v, edge_index, scale=0.5, backend="tiled")
        attend(q, k, v, edge_index, scale=0.5, dropout_p=0.1, dropout_seed=3)
    assert flex_on_cpu == []
    torch.testing.assert_close(out_b, dense_attention(q, k, v, edge_index, 0.5, bias).float(), **TOL[torch.float32])
    torch.testing.assert_close(out, dense_attention(q, k, v, edge_index, 0.5).float(), **TOL[torch.float32])


def test_route_needs_enough_targets_and_a_device_of_its_list(monkeypatch):
    edge_index = sliding_window(64, 5)
    planned = choose_backend(edge_index, "cpu")
    assert auto_kernel(edge_index, "cpu", head_dim=16) == planned  # not on the CPU by default
    monkeypatch.setattr(planner, "FLEX_DEVICES", ("cpu",))
    monkeypatch.setattr(planner, "FLEX_MIN_TARGETS", 65)
    assert auto_kernel(edge_index, "cpu", head_dim=16) == planned
    monkeypatch.setattr(planner, "FLEX_MIN_TARGETS", 64)
    assert auto_kernel(edge_index, "cpu", head_dim=16) == "flex"
    monkeypatch.setattr(planner, "FLEX_MAX_BLOCKS", 0)  # one query block x one key block is too many
    assert auto_kernel(edge_index, "cpu", head_dim=16) == planned


def test_gpu_decision_without_a_gpu():
    """The answer for a CUDA device: a long window in bfloat16 runs FlexAttention, a short one, a
    float64 one and a per-head one do not."""
    long = sliding_window(planner.FLEX_MIN_TARGETS, 64)
    assert auto_kernel(long, "cuda", dtype=torch.bfloat16, head_dim=64) == "flex"
    assert auto_kernel(long, "cuda", dtype=torch.float64, head_dim=64) != "flex"
    short = sliding_window(planner.FLEX_MIN_TARGETS - 1, 64)
    assert auto_kernel(short, "cuda", dtype=torch.bfloat16, head_dim=64) != "flex"
    implicit = sliding_window(planner.FLEX_MIN_TARGETS, 64, implicit=True)
    assert auto_kernel(implicit, "cuda", dtype=torch.bfloat16, head_dim=64) == "flex"


def test_a_configuration_flex_cannot_run_falls_back_with_one_warning(flex_on_cpu, monkeypatch):
    """A failure recorded for one configuration of heads (here: one key/value head per query head,
    without gradients) keeps every call with heads of that dtype and dimension off the route, as
    ``auto_kernel`` says, whatever their grouping; other dtypes stay on it."""
    edge_index = sliding_window(64, 5)
    q, k, v = _inputs(64, 64, 2, 2, 16, torch.float32)
    monkeypatch.setitem(flex._CHOSEN, ("cpu", torch.float32, 16, 1, False), "OutOfResources: out of resource: shared")
    assert auto_kernel(edge_index, "cpu", dtype=torch.float32, head_dim=16) == choose_backend(edge_index, "cpu")
    implicit = sliding_window(64, 5, implicit=True, block_size=16)
    assert auto_kernel(implicit, "cpu", dtype=torch.float32, head_dim=16) == "tiled"
    assert auto_kernel(implicit, "cpu", dtype=torch.float64, head_dim=16) == "flex"  # another dtype
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="FlexAttention does not run torch.float32 heads of 16"):
        out = attend(q, k, v, edge_index, scale=0.5)
    torch.testing.assert_close(out, dense_attention(q, k, v, edge_index, 0.5).float(), **TOL[torch.float32])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        attend(q, k, v, edge_index, scale=0.5)  # said once
    grouped = _inputs(64, 64, 4, 1, 16, torch.float32)  # another grouping: off the route as well
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="out of resource"):
        out = attend(*grouped, edge_index, scale=0.5)
    torch.testing.assert_close(out, dense_attention(*grouped, edge_index, 0.5).float(), **TOL[torch.float32])
    assert flex_on_cpu == [] or all(p is not None for p in flex_on_cpu)  # reached, and declined
    assert flex.failure(q, k, False).startswith("OutOfResources")
    assert flex.failure(q, k, True) is None  # what failed is one configuration; the others are not recorded
    q64, k64, v64 = (x.double() for x in (q, k, v))
    with torch.no_grad():
        attend(q64, k64, v64, edge_index, scale=0.5)
    assert flex._CHOSEN[("cpu", torch.float64, 16, 1, False)] == 0  # float64 ran the route


def test_the_recompile_limit_falls_back(flex_on_cpu, monkeypatch):
    """Past ``torch.compile``'s recompile limit the compiled call raises (``fullgraph``) instead of
    running FlexAttention uncompiled; ``auto`` then runs the project's kernels, warned once."""
    monkeypatch.setattr(flex, "COMPILED_DEVICES", ("cpu",))

    def limit(*args, **kwargs):
        raise flex._RECOMPILE_LIMIT("Hard failure due to fullgraph=True")

    monkeypatch.setattr(flex, "_compiled_call", lambda: limit)
    monkeypatch.setitem(flex._CHOSEN, ("cpu", torch.float32, 16, 1, False), 0)  # options known: no probe
    edge_index = sliding_window(64, 5)
    q, k, v = _inputs(64, 64, 2, 2, 16, torch.float32)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="recompile limit"):
        out = attend(q, k, v, edge_index, scale=0.5)
    torch.testing.assert_close(out, dense_attention(q, k, v, edge_index, 0.5).float(), **TOL[torch.float32])
    assert "fullgraph" in flex.failure(q, k, False)
    assert auto_kernel(edge_index, "cpu", dtype=torch.float32, head_dim=16) == choose_backend(edge_index, "cpu")


def test_compile_disabled_keeps_calls_off_the_route(flex_on_cpu, monkeypatch):
    monkeypatch.setattr(flex, "COMPILED_DEVICES", ("cpu",))
    edge_index = sliding_window(64, 5)
    with torch._dynamo.config.patch(disable=True):
        assert auto_kernel(edge_index, "cpu", head_dim=16) == choose_backend(edge_index, "cpu")
    assert auto_kernel(edge_index, "cpu", head_dim=16) == "flex"


def test_a_probe_out_of_memory_decides_nothing(flex_on_cpu, monkeypatch):
    monkeypatch.setattr(flex, "COMPILED_DEVICES", ("cpu",))

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(flex, "_compiled_call", lambda: oom)
    edge_index = sliding_window(64, 5)
    q, k, v = _inputs(64, 64, 2, 2, 16, torch.float32)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="ran out of memory"):
        out = attend(q, k, v, edge_index, scale=0.5)
    torch.testing.assert_close(out, dense_attention(q, k, v, edge_index, 0.5).float(), **TOL[torch.float32])
    assert ("cpu", torch.float32, 16, 1, False) not in flex._CHOSEN  # a later call tries again
    assert auto_kernel(edge_index, "cpu", dtype=torch.float32, head_dim=16) == "flex"


def test_the_probe_runs_in_the_callers_gradient_mode(flex_on_cpu, monkeypatch):
    """Inputs without gradients under grad mode: the probe compiles what the call then runs (no
    second compile), with the kernels FlexAttention compiles for the CPU."""
    monkeypatch.setattr(flex, "COMPILED_DEVICES", ("cpu",))
    torch._dynamo.reset()
    edge_index = sliding_window(300, 7)
    q, k, v = _inputs(300, 300, 2, 2, 16, torch.float32)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = attend(q, k, v, edge_index, scale=0.5)  # grad mode on, nothing requires grad
    assert flex._CHOSEN == {("cpu", torch.float32, 16, 1, False): 0}
    torch.testing.assert_close(out, dense_attention(q, k, v, edge_index, 0.5).float(), **TOL[torch.float32])


@settings(max_examples=12, deadline=None)
@given(st.data())
def test_compiled_route_reads_the_block_tables(data):
    """FlexAttention's compiled CPU kernels read the block tables (the uncompiled reference does
    not): on random interval graphs, sizes off the block size, bipartite, empty rows, the compiled
    route equals the dense reference."""
    n_dst = data.draw(st.sampled_from([200, 333]))
    n_src = data.draw(st.sampled_from([200, 333, 129]))
    i = torch.arange(n_dst) * n_src // n_dst
    w = data.draw(st.integers(0, 150))
    lo = (i - data.draw(st.integers(0, w))).clamp(min=0)
    hi = (i + data.draw(st.integers(-w, w))).clamp(max=n_src - 1)
    lo, hi = torch.where(hi < lo, 0, lo), torch.where(hi < lo, -1, hi)
    edge_index = _edges(lo, hi)
    if edge_index.size(1) == 0:
        return
    q, k, v = _inputs(n_src, n_dst, 2, 1, 16, torch.float32, seed=data.draw(st.integers(0, 9)))
    x = [t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)]
    # blocks of 32 as well: full blocks between partial ones, on both sides
    mask = flex.block_mask(_pattern(edge_index, n_src, n_dst), data.draw(st.sampled_from([32, flex.BLOCK])))
    out = flex._compiled_call()(x[0], x[1], x[2], mask, 0.25, True, None)[0].transpose(0, 1)
    torch.testing.assert_close(out, dense_attention(q, k, v, edge_index, 0.25).float(), **TOL[torch.float32])


@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("n_src,n_dst,w", [(333, 333, 150), (333, 200, 100), (129, 333, 70)])
def test_compiled_route_on_wide_windows(n_src, n_dst, w, block):
    """Windows wide enough for full blocks between partial ones, on both sides, through the
    compiled kernels: every listed block read where the tables say."""
    i = torch.arange(n_dst) * n_src // n_dst
    lo, hi = (i - w).clamp(min=0), (i + w).clamp(max=n_src - 1)
    edge_index = _edges(lo, hi)
    mask = flex.block_mask(_pattern(edge_index, n_src, n_dst), block)
    assert block == flex.BLOCK or int(mask.full_kv_num_blocks.sum()) > 0
    q, k, v = _inputs(n_src, n_dst, 2, 1, 16, torch.float32)
    x = [t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)]
    out = flex._compiled_call()(x[0], x[1], x[2], mask, 0.25, True, None)[0].transpose(0, 1)
    torch.testing.assert_close(out, dense_attention(q, k, v, edge_index, 0.25).float(), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_head_windows_take_the_route(flex_on_cpu, dtype):
    """A per-head graph runs as one head on (head, token) nodes: per-head windows of different
    widths are one interval graph there, and the route's result equals the dense reference."""
    from gnn_transformer.topology import per_head

    n, widths = 90, [2, 5, 9, 0]
    edge_index, edge_head = per_head([sliding_window(n, w) for w in widths])
    q, k, v = _inputs(n, n, 4, 2, 16, dtype)
    with torch.no_grad():
        out = attend(q, k, v, edge_index, scale=0.3, edge_head=edge_head)
    assert len(flex_on_cpu) == 1
    ref = dense_attention(q, k, v, edge_index, 0.3, edge_head=edge_head)
    torch.testing.assert_close(out, ref.to(dtype), **TOL[dtype])


def test_a_new_graph_of_the_same_sizes_is_not_compiled_again():
    """The compiled call (what CUDA runs; here FlexAttention's CPU kernels) takes the bounds as
    tensors: a second graph of the same sizes runs without compiling again."""
    torch._dynamo.reset()
    n = 200
    i = torch.arange(n)
    first = IntervalPattern((i - 10).clamp(min=0), i, n)
    second = IntervalPattern((i - 30).clamp(min=0), (i + 5).clamp(max=n - 1), n)
    # three tensors: torch 2.11's CPU lowering refuses one tensor as query, key and value
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    fn = flex._compiled_call()
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = [fn(q, k, v, flex.block_mask(p), 0.25, False, None) for p in (first, second)]
    for p, out in zip((first, second), outs):
        edge_index = _edges(p.lo, p.hi)
        ref = dense_attention(*(x[0].transpose(0, 1) for x in (q, k, v)), edge_index, 0.25).float()
        torch.testing.assert_close(out[0].transpose(0, 1), ref, **TOL[torch.float32])
