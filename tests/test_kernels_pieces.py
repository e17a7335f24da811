"""Long rows cut into pieces (``kernels._pieces``): the cut covers every item of a long row once,
the merge of the pieces is exact, and the Triton kernels with cut rows equal the reference, forward
and backward (under ``TRITON_INTERPRET=1``; the pieces are forced small, as a GPU cuts only rows
far longer than the average)."""

from __future__ import annotations

import os
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gnn_transformer.kernels import _pieces
from gnn_transformer.kernels.primitives import lse_pair

from .conftest import TOL, make_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _ptr(sizes):
    return torch.tensor([0] + sizes, dtype=torch.long).cumsum(0)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12), length=st.integers(1, 12))
def test_cut_covers_each_long_row_once(sizes, length):
    ptr = _ptr(sizes)
    pieces = _pieces.cut(ptr, length)
    long = [r for r, s in enumerate(sizes) if s > length]
    if not long:
        assert pieces is None
        return
    assert pieces.rows.tolist() == long
    start, end = _pieces.ranges(ptr, pieces)
    for r, s in enumerate(sizes):  # the main launch: a cut row is empty, the others whole
        assert int(start[r]) == int(ptr[r])
        assert int(end[r] - start[r]) == (0 if r in long else s)
    assert torch.equal(pieces.row, torch.sort(pieces.row).values)
    for r, count in zip(long, pieces.counts.tolist()):
        sel = pieces.row == r
        first, stop = pieces.start[sel], pieces.stop[sel]
        assert count == int(sel.sum()) == -(-sizes[r] // length)
        assert int(first[0]) == int(ptr[r]) and int(stop[-1]) == int(ptr[r + 1])
        assert torch.equal(first[1:], stop[:-1])  # adjacent, in order: every item once
        size = stop - first
        assert int(size.min()) >= 1 and int(size.max()) <= length
        assert int(size.max()) - int(size.min()) <= 1  # balanced


def test_no_cut_without_a_length():
    ptr = _ptr([100, 1, 2])
    assert _pieces.cut(ptr, 0) is None
    assert _pieces.cut(ptr, 100) is None
    assert _pieces.cut(ptr, 99).rows.tolist() == [0]


def test_piece_length_by_device(monkeypatch):
    monkeypatch.setattr(_pieces, "LENGTH", None)
    assert _pieces.piece_length("csr", 10**6, 12, torch.device("cpu")) == 0  # the interpreter: never
    props = types.SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    cuda = torch.device("cuda")
    # the work of one of 132 * 16 concurrent programs: 12M / 2112 edges
    assert _pieces.piece_length("csr", 10**6, 12, cuda) == -(-12 * 10**6 // 2112)
    assert _pieces.piece_length("csr", 1000, 12, cuda) == _pieces.MIN_PIECE["csr"]
    assert _pieces.piece_length("tiles", 2500, 12, cuda) == -(-2500 * 12 // 264)
    monkeypatch.setattr(_pieces, "LENGTH", 7)
    assert _pieces.piece_length("tiles", 2500, 12, cuda) == 7
    assert _pieces.piece_length("csr", 5, 1, torch.device("cpu")) == 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [1, 3])
@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    length=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    empty=st.booleans(),
    huge=st.booleans(),
)
def test_merge_of_pieces_is_the_softmax_of_the_row(dtype, block, sizes, length, seed, empty, huge):
    """Pieces' partial softmaxes (out, lse, lse_lo) merge into the softmax over the whole row, also
    where every score is near -1e9 (the merged lse + lse_lo is the row's log-sum-exp to 1e-5 /
    1e-10, which lse alone cannot hold); rows whose items all score -inf stay empty; gradients of
    the pieces sum."""
    ptr = _ptr(sizes)
    pieces = _pieces.cut(ptr, length)
    if pieces is None:
        return
    gen = torch.Generator().manual_seed(seed)
    items, heads, dim = int(ptr[-1]), 2, 3
    n = len(sizes) * block - (block > 1)  # a last block with a missing row
    scores = torch.randn(items, n, heads, generator=gen, dtype=dtype)  # item x output row
    if empty:
        scores[int(ptr[pieces.rows[0]]) : int(ptr[pieces.rows[0] + 1])] = float("-inf")
    values = torch.randn(items, heads, dim, generator=gen, dtype=dtype)
    if huge:  # every score near -1e9: the log-sum-exp's remainder (lse_lo) carries the row's log(count)
        scores = scores - 1e9
    cpu = torch.device("cpu")
    out_p = _pieces.partial(pieces, block, (heads, dim), dtype, cpu)
    lse_p = _pieces.partial(pieces, block, (heads,), dtype, cpu, float("-inf"))
    lo_p = _pieces.partial(pieces, block, (heads,), dtype, cpu)
    grad_p = torch.randn(out_p.shape, generator=gen, dtype=dtype)
    for p in range(pieces.num_pieces):
        r, a, b = int(pieces.row[p]), int(pieces.start[p]), int(pieces.stop[p])
        for row in range(r * block, min(r * block + block, n)):
            s = scores[a:b, row]  # [items, H]
            top = s.max(0).values
            top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
            lse, lo = lse_pair(top, torch.exp(s - top).sum(0))
            w = torch.where(torch.isinf(lse), torch.zeros_like(s), torch.softmax(s, 0))
            lse_p[p * block + row - r * block] = lse
            lo_p[p * block + row - r * block] = lo
            out_p[p * block + row - r * block] = torch.einsum("eh,ehd->hd", w, values[a:b])
    out = torch.zeros(n, heads, dim, dtype=dtype)
    lse = torch.zeros(n, heads, dtype=dtype)
    lse_lo = torch.zeros(n, heads, dtype=dtype)
    grad = torch.zeros(n, heads, dim, dtype=dtype)
    _pieces.merge_into(out, lse, lse_lo, out_p, lse_p, lo_p, pieces, block)
    _pieces.add_into(grad, grad_p, pieces, block)
    for c, r in enumerate(pieces.rows.tolist()):
        a, b = int(ptr[r]), int(ptr[r + 1])
        sel = (pieces.row == r).nonzero().flatten()
        for row in range(r * block, min(r * block + block, n)):
            s = scores[a:b, row]
            want_lse = torch.logsumexp(s.double(), 0)  # the row's lse, kept whole as lse + lse_lo
            w = torch.where(torch.isinf(want_lse), torch.zeros_like(s), torch.softmax(s, 0))
            got_lse = lse[row].double() + lse_lo[row].double()
            assert torch.equal(torch.isinf(got_lse), torch.isinf(want_lse))
            finite = torch.isfinite(want_lse)
            torch.testing.assert_close(
                got_lse[finite] - want_lse[finite], torch.zeros_like(want_lse[finite]), **TOL[dtype]
            )
            torch.testing.assert_close(out[row], torch.einsum("eh,ehd->hd", w, values[a:b]), **TOL[dtype])
            want_grad = grad_p[sel * block + row - r * block].sum(0)
            torch.testing.assert_close(grad[row], want_grad, **TOL[dtype])


# ---- the Triton kernels with cut rows, under the interpreter ----------------------------------

triton_only = pytest.mark.skipif(not INTERPRET, reason="TRITON_INTERPRET=1 runs Triton on CPU tensors")


def _hub_graph(n=24, extra=40, seed=0):
    """Target 0 attends to every token, every token to source 1, plus random edges."""
    gen = torch.Generator().manual_seed(seed)
    i = torch.arange(n)
    src = torch.cat([i, torch.full((n,), 1), torch.randint(0, n, (extra,), generator=gen)])
    dst = torch.cat([torch.zeros(n, dtype=torch.long), i, torch.randint(0, n, (extra,), generator=gen)])
    return torch.stack([src, dst])


def _global_window_graph(n=70):
    """A window of 3 plus global tokens 0 and 1 (their query and key blocks hold every tile)."""
    i = torch.arange(n)
    window = torch.stack([torch.cat([i + d for d in range(-3, 4)]), i.repeat(7)])
    window = window[:, (window[0] >= 0) & (window[0] < n)]
    zeros, ones = torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)
    glob = torch.stack([torch.cat([i, i, zeros, ones]), torch.cat([zeros, ones, i, i])])
    return torch.unique(torch.cat([window, glob], 1), dim=1)


def _run(edge_index, backend, kw, dtype, heads, kv_heads, bias, length, monkeypatch, dropout=0.0):
    """``(out, lse, grads)`` of one attend call (and backward) with pieces of ``length``."""
    from gnn_transformer.kernels import attend, clear_cache

    monkeypatch.setattr(_pieces, "LENGTH", length)
    clear_cache()
    n = int(edge_index.max()) + 1
    q, k, v, b = make_inputs(n, n, edge_index.size(1), heads=heads, kv_heads=kv_heads, dim=4, dtype=dtype, bias=bias)
    out, lse = attend(
        q,
        k,
        v,
        edge_index,
        scale=0.4,
        edge_bias=b,
        backend=backend,
        return_lse=True,
        impl="triton",
        dropout_p=dropout,
        dropout_seed=5,
        **kw,
    )
    w = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    inputs = [x for x in (q, k, v, b) if x is not None]
    loss = (out * w).sum() + 0.3 * lse[torch.isfinite(lse)].sum()
    return out, lse, torch.autograd.grad(loss, inputs), (q, k, v, b)


def _check_cut(edge_index, backend, length):
    """The graph's cached structures show rows cut into pieces (the test exercises them)."""
    from gnn_transformer.kernels import planner

    n = int(edge_index.max()) + 1
    graph = planner.prepare(edge_index, n, n)
    if backend == "fused":
        cache = graph.extras
    else:
        cache = graph.extras[("parts", 16, None)][0].launch_cache
    cut = [
        v
        for key, v in cache.items()
        if isinstance(key, tuple) and key[:1] == ("pieces",) and key[2] == length and v is not None
    ]
    assert len(cut) == 2  # rows (query blocks) and columns (key blocks)


CASES = [  # (graph, backend, options, dtype, heads, kv heads, bias, piece length)
    ("hub", "fused", {}, torch.float64, 2, 2, True, 3),
    ("hub", "fused", {}, torch.float32, 4, 2, True, 5),  # the grouped kernels
    ("global", "tiled", {"block_size": 16}, torch.float64, 2, 2, True, 1),
    ("global", "tiled", {"block_size": 16}, torch.float32, 4, 2, False, 2),
    ("global", "split", {"block_size": 16, "tile_cost": 0.25}, torch.float64, 2, 2, True, 1),
]


@triton_only
@pytest.mark.parametrize(
    "graph,backend,kw,dtype,heads,kv_heads,bias,length",
    CASES,
    ids=[f"{c[1]}-{str(c[3])[6:]}-{c[4]}on{c[5]}" for c in CASES],
)
def test_triton_with_pieces_matches_reference(graph, backend, kw, dtype, heads, kv_heads, bias, length, monkeypatch):
    from gnn_transformer.kernels import attend_reference

    edge_index = _hub_graph() if graph == "hub" else _global_window_graph()
    out, lse, grads, (q, k, v, b) = _run(edge_index, backend, kw, dtype, heads, kv_heads, bias, length, monkeypatch)
    if backend != "split":
        _check_cut(edge_index, backend, length)
    ref, ref_lse = attend_reference(q, k, v, edge_index, scale=0.4, edge_bias=b, return_lse=True)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype), **TOL[dtype])
    w = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    inputs = [x for x in (q, k, v, b) if x is not None]
    want = torch.autograd.grad((ref * w).sum() + 0.3 * ref_lse[torch.isfinite(ref_lse)].sum(), inputs)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, **TOL[dtype])


@triton_only
@pytest.mark.parametrize("backend,kw,length", [("fused", {}, 3), ("tiled", {"block_size": 16}, 1)])
def test_dropout_is_the_same_with_pieces(backend, kw, length, monkeypatch):
    """The keep mask follows the edge, not the program: pieces drop the same weights."""
    edge_index = _hub_graph() if backend == "fused" else _global_window_graph()
    args = (edge_index, backend, kw, torch.float64, 2, 2, True)
    out, lse, grads, _ = _run(*args, length, monkeypatch, dropout=0.3)
    _check_cut(edge_index, backend, length)
    ref, ref_lse, ref_grads, _ = _run(*args, 0, monkeypatch, dropout=0.3)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float64])
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, **TOL[torch.float64])


def _hub_inputs(monkeypatch, length, **kw):
    """``(edge_index, q, k, v, bias)`` on :func:`_hub_graph` with pieces of ``length`` forced."""
    from gnn_transformer.kernels import clear_cache

    edge_index = _hub_graph()
    monkeypatch.setattr(_pieces, "LENGTH", length)
    clear_cache()
    return (edge_index, *make_inputs(24, 24, edge_index.size(1), **kw))


@triton_only
def test_a_cut_row_without_finite_scores_stays_empty(monkeypatch):
    """A hub whose edges all carry a -inf bias: zero output, -inf lse, zero gradients, in pieces."""
    from gnn_transformer.kernels import attend, attend_reference

    edge_index, q, k, v, b = _hub_inputs(monkeypatch, 3, heads=2, kv_heads=2, dim=4, dtype=torch.float64)
    with torch.no_grad():
        b[edge_index[1] == 0] = float("-inf")
    out, lse = attend(q, k, v, edge_index, scale=0.4, edge_bias=b, backend="fused", return_lse=True, impl="triton")
    ref, ref_lse = attend_reference(q, k, v, edge_index, scale=0.4, edge_bias=b, return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and bool(torch.isinf(lse[0]).all())
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    got = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(ref.sum(), (q, k, v))
    for x, y in zip(got, want):
        assert bool(torch.isfinite(x).all())
        torch.testing.assert_close(x, y, **TOL[torch.float64])


@triton_only
def test_bfloat16_with_pieces(monkeypatch):
    """Half precision: the pieces' partial results are kept in float32 and merged there."""
    from gnn_transformer.kernels import attend, attend_reference

    edge_index, q, k, v, b = _hub_inputs(monkeypatch, 5, heads=4, kv_heads=2, dim=16, dtype=torch.bfloat16)
    out = attend(q, k, v, edge_index, scale=0.25, edge_bias=b, backend="fused", impl="triton")
    got = torch.autograd.grad(out.float().sum(), (q, k, v, b))
    up = [x.detach().float().requires_grad_() for x in (q, k, v, b)]
    ref = attend_reference(*up[:3], edge_index, scale=0.25, edge_bias=up[3])
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
    for x, y in zip(got, torch.autograd.grad(ref.sum(), up)):
        torch.testing.assert_close(x.float(), y, atol=2e-2, rtol=2e-2)


@triton_only
@pytest.mark.parametrize("backend,kw", [("fused", {}), ("tiled", {"block_size": 16})])
def test_one_query_sliced_from_a_fused_projection(backend, kw, monkeypatch):
    """One query (a pooling token) over 40 keys, cut into pieces, sliced from a packed q/k/v tensor:
    its row stride is not a fresh buffer's (``contiguous()`` keeps it for a dimension of size 1),
    and the pieces' partial gradients were written past their buffer's end."""
    from gnn_transformer.kernels import attend, attend_reference, clear_cache

    monkeypatch.setattr(_pieces, "LENGTH", 8 if backend == "fused" else 1)
    clear_cache()
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 3, 2, 4, generator=gen, dtype=torch.float64)
    q = qkv[:, 0].requires_grad_()  # stride (24, 4, 1), and is_contiguous()
    kv = torch.randn(40, 2, 2, 4, generator=gen, dtype=torch.float64)
    k, v = kv[:, 0].requires_grad_(), kv[:, 1].requires_grad_()  # 40 x 1 key/value blocks, strided
    edge_index = torch.stack([torch.arange(40), torch.zeros(40, dtype=torch.long)])
    out = attend(q, k, v, edge_index, scale=0.5, backend=backend, impl="triton", **kw)
    ref = attend_reference(q, k, v, edge_index, scale=0.5)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    for x, y in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(x, y, **TOL[torch.float64])
