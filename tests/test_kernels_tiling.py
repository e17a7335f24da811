"""Tile lists, graph caching and the split/merge plan."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gnn_transformer.kernels import TILE_COST, planner, attend, attend_reference, choose_backend
from gnn_transformer.kernels.tiling import build_tiles, sorted_unique, unique_keys
from gnn_transformer.topology import causal

from .conftest import graph_case, make_inputs


def _dense_from_tiles(tiles):
    """Multiplicity matrix ``[N_dst, N_src]`` recovered from the tile list."""
    nq, nk = tiles.num_q_blocks * tiles.block_q, tiles.num_k_blocks * tiles.block_k
    out = torch.zeros(nq, nk, dtype=torch.bool)
    for t in range(tiles.num_tiles):
        qb, kb, mi = int(tiles.q_block[t]), int(tiles.k_block[t]), int(tiles.mask_index[t])
        block = torch.ones(tiles.block_q, tiles.block_k, dtype=torch.bool) if mi < 0 else tiles.masks[mi]
        out[qb * tiles.block_q : (qb + 1) * tiles.block_q, kb * tiles.block_k : (kb + 1) * tiles.block_k] = block
    return out[: tiles.num_dst, : tiles.num_src]


def test_causal_tiles():
    graph = planner.prepare(causal(32), 32, 32)
    tiles = build_tiles(graph, 8, 8)
    assert tiles.num_tiles == 4 * 5 // 2  # lower triangle of 4 x 4 blocks
    full = tiles.mask_index < 0
    assert int(full.sum()) == 6 and bool((tiles.q_block[~full] == tiles.k_block[~full]).all())
    assert tiles.tile_ptr.tolist() == [0, 1, 3, 6, 10]
    assert int(tiles.count.sum()) == graph.num_edges
    mask = torch.ones(32, 32, dtype=torch.bool).tril()
    assert torch.equal(_dense_from_tiles(tiles), mask)
    order, k_ptr = tiles.by_key()
    assert k_ptr.tolist() == [0, 4, 7, 9, 10]
    assert bool((tiles.k_block[order][1:] >= tiles.k_block[order][:-1]).all())


def test_ragged_blocks_and_bipartite():
    edge_index, n_src, n_dst = graph_case("bipartite")
    graph = planner.prepare(edge_index, n_src, n_dst)
    tiles = build_tiles(graph, 8, 16)
    dense = torch.zeros(n_dst, n_src, dtype=torch.bool)
    dense[graph.dst, graph.src] = True
    assert torch.equal(_dense_from_tiles(tiles), dense)
    assert (tiles.mask_index >= 0).all()  # ragged edge blocks are never full


def test_build_tiles_refuses_repeated_edges():
    """A tile cell holds one edge: a second copy of ``1 -> 0`` is an error that says so."""
    src, dst = torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 0, 1])
    graph = planner.prepare(torch.stack([src, dst]), 2, 2)
    with pytest.raises(ValueError, match="repeat an edge"):
        build_tiles(graph, 2, 2)
    assert build_tiles(graph, 2, 2, torch.tensor([0, 1, 3])).num_tiles == 1


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_unique_keys_equal_torch_unique(data):
    """Both ways of counting tile keys (``bincount`` when the key range is small, a sort
    otherwise) give ``torch.unique``'s keys, inverse and counts."""
    num_keys = data.draw(st.integers(1, 40), label="num_keys")
    keys = data.draw(st.lists(st.integers(0, num_keys - 1), max_size=30), label="keys")
    key = torch.tensor(keys, dtype=torch.long)
    expected = torch.unique(key, return_inverse=True, return_counts=True)
    for got in (unique_keys(key, num_keys), unique_keys(key, max(num_keys, 2 * key.numel() + 1))):
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype and torch.equal(a, b)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), max_size=12))
def test_sorted_unique_is_an_exact_test(edges):
    """``sorted_unique`` is true exactly for edge lists sorted by (target, source) with no edge
    twice; the fast test of ``build_tiles`` and of the copy search rests on it."""
    src = torch.tensor([j for j, _ in edges], dtype=torch.long)
    dst = torch.tensor([i for _, i in edges], dtype=torch.long)
    pairs = [(i, j) for j, i in edges]
    assert sorted_unique(src, dst) == (pairs == sorted(set(pairs)))


# the runs each graph must produce: a step between the query blocks of a chunk ("one": a chunk
# of one query block); random graphs need not produce any
@pytest.mark.parametrize("graph, runs", [("full", {0}), ("causal", {"one"}), ("window", {1}), ("random", set())])
def test_consecutive_key_blocks_are_read_in_place(graph, runs):
    """Chunks whose query blocks read consecutive key blocks (``first + g * step + j``) take them
    as a strided view of the blocked keys; every chunk's keys equal the gathered copy, and
    attention through the views equals the reference."""
    from gnn_transformer import topology as T
    from gnn_transformer.kernels.tiled_torch import _blocked, _chunks, _key_blocks

    n, block = 40, 4
    edge_index = {
        "full": T.full(n),
        "causal": T.causal(n),
        "window": T.sliding_window(n, 5),
        "random": T.random(n, 3, seed=1),
    }[graph]
    tiles = build_tiles(planner.prepare(edge_index, n, n), block, block)
    kB = _blocked(torch.randn(n, 3, 5, dtype=torch.float64), block, tiles.num_k_blocks, torch.float64)
    seen = set()
    for _, tids, run in _chunks(tiles, 3, max_cells=3 * block * block * 40):
        gathered = kB[:, tiles.k_block[tids].flatten()].reshape(3, tids.size(0), -1, 5)
        assert torch.equal(_key_blocks(kB, tiles, tids, run), gathered)
        if run is not None:
            seen.add(run[1] if tids.size(0) > 1 else "one")
    assert seen >= runs
    q, k, v, _ = make_inputs(n, n, edge_index.size(1), bias=False)
    out = attend(q, k, v, edge_index, scale=0.4, backend="tiled", block_size=block)
    ref = attend_reference(q, k, v, edge_index, scale=0.4)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_build_tiles_checks_unsorted_rows():
    """Rows whose sources are not sorted skip the linear-time test: a repeat is still found
    however far apart its copies are, and an unsorted graph without repeats tiles as sorted."""
    src, dst = torch.tensor([2, 0, 1, 3, 2, 0]), torch.tensor([0, 0, 0, 1, 1, 1])
    graph = planner.prepare(torch.stack([src, dst]), 4, 2)
    tiles = build_tiles(graph, 2, 2)
    dense = torch.zeros(2, 4, dtype=torch.bool)
    dense[dst, src] = True
    assert torch.equal(_dense_from_tiles(tiles), dense) and int(tiles.count.sum()) == 6
    src = torch.tensor([2, 0, 2, 3])  # 2 -> 0 twice, one edge apart
    graph = planner.prepare(torch.stack([src, torch.tensor([0, 0, 0, 1])]), 4, 2)
    with pytest.raises(ValueError, match="repeat an edge"):
        build_tiles(graph, 2, 2)


@pytest.mark.parametrize("backend", ["tiled", "split"])
def test_repeated_copies_run_fused_beside_the_tiles(backend):
    """``tiled`` and ``split`` tile the first copy of each edge and run the other copies fused: the
    tiles hold every distinct edge of their part once, the fused part the copies (and, for split, the
    sparse tiles' edges), and the result counts every copy."""
    from gnn_transformer.kernels.planner import _dense_tiles
    from gnn_transformer.kernels.tiling import tile_stats

    plain = causal(64).as_tensor()
    repeated = torch.cat([plain, plain[:, :3], plain[:, :1]], dim=1)  # 0 -> 0 three times, 0 -> 1 and 1 -> 1 twice
    graph = planner.prepare(repeated, 64, 64)
    key, _, count = tile_stats(graph, 8, 8)
    dense = _dense_tiles(graph, 8, 0.3)
    assert torch.equal(dense, count.double() - (key == 0).double() * 4 >= 0.3 * 64)  # distinct edges
    q, k, v, _ = make_inputs(64, 64, 0, heads=2, kv_heads=1, dim=4, bias=False, dtype=torch.float64)
    out = attend(q, k, v, repeated, scale=0.5, backend=backend, block_size=8, tile_cost=0.3)
    torch.testing.assert_close(out, attend_reference(q, k, v, repeated, scale=0.5), atol=1e-12, rtol=1e-12)
    tiles, rest_ids, rest = graph.extras[("parts", 8, None if backend == "tiled" else 0.3)]
    tiled = tiles.edge_ids
    pairs = graph.dst[tiled] * 64 + graph.src[tiled]
    assert torch.unique(pairs).numel() == pairs.numel()  # one copy per cell
    assert sorted(tiled.tolist() + rest_ids.tolist()) == list(range(graph.num_edges))
    assert rest.num_edges == rest_ids.numel()
    if backend == "tiled":
        assert rest_ids.numel() == 4 and torch.unique(pairs).numel() == plain.size(1)
    else:
        assert tiles.num_tiles == int(dense.sum())


def test_graph_cache_is_reused_and_invalidated():
    edge_index = torch.tensor([[1, 0, 2], [2, 0, 1]])
    g1 = planner.prepare(edge_index, 3, 3)
    assert planner.prepare(edge_index, 3, 3) is g1
    assert g1.perm.tolist() == [1, 2, 0] and g1.rowptr.tolist() == [0, 1, 2, 3]
    edge_index[0, 0] = 2  # in-place change: the structure is rebuilt
    g2 = planner.prepare(edge_index, 3, 3)
    assert g2 is not g1 and g2.src.tolist() == [0, 2, 2]
    ei = causal(5)
    graph = planner.prepare(ei, 5, 5)
    assert graph.perm is None and "csc" not in graph.extras  # built when a backward pass asks
    colptr, perm = graph.csc()
    assert colptr.data_ptr() == ei.get_csr()[0][0].data_ptr()  # EdgeIndex: PyG's cached CSR is reused
    assert torch.equal(graph.src[perm], torch.sort(graph.src, stable=True).values)
    assert colptr.tolist() == [0, 5, 9, 12, 14, 15]


@pytest.mark.parametrize("edge_head", [False, True])
def test_graph_cache_goes_with_its_edge_index(edge_head):
    """A plain tensor's cached structure (and a per-head graph's relabelled one) does not keep the
    tensor alive: a training loop that builds a new graph every step holds one at a time."""
    import gc

    q, k, v, _ = make_inputs(16, 16, 0, bias=False)  # [N, H, D]
    before = len(planner._CACHE)
    for seed in range(3):
        edge_index = torch.randint(0, 16, (2, 40), generator=torch.Generator().manual_seed(seed))
        edge_index = edge_index[:, torch.argsort(edge_index[1], stable=True)]  # sorted: the CSR views it
        extra = {"edge_head": torch.zeros(40, dtype=torch.long)} if edge_head else {}  # one head: still sorted
        attend(q, k, v, edge_index, scale=0.5, backend="fused", **extra)
        assert len(planner._CACHE) == before + 1
        del edge_index, extra
        gc.collect()
        assert len(planner._CACHE) == before


def test_layers_reuse_structures():
    """Several calls on one graph (one per layer) build the tile list and the plan once."""
    edge_index, n_src, n_dst = graph_case("window")
    q, k, v, _ = make_inputs(n_src, n_dst, 0, bias=False)
    attend(q, k, v, edge_index, scale=0.5, backend="auto", block_size=8)
    graph = planner.prepare(edge_index, n_src, n_dst)
    before = dict(graph.extras)
    attend(q, k, v, edge_index, scale=0.5, backend="auto", block_size=8)
    assert all(graph.extras[key] is value for key, value in before.items())
    plans = [value for key, value in graph.extras.items() if isinstance(key, tuple) and key[0] == "plan"]
    assert plans == [choose_backend(edge_index, "cpu", block_size=8)]


def test_costs_changed_at_run_time_take_effect(monkeypatch):
    """The cost constants are plain dicts a user may set (say, from their own --calibrate run); a
    cached plan never hides a change."""
    from gnn_transformer.kernels import MERGE_COST, ROW_COST
    from gnn_transformer.topology import random

    graph = random(512, 4, seed=0)
    assert choose_backend(graph, "cpu") == "fused"
    monkeypatch.setitem(ROW_COST, "cpu", {"fused": 1e6, "tiled": 0.0})
    assert choose_backend(graph, "cpu") == "tiled"  # a fused call now costs more than every tile
    monkeypatch.setitem(TILE_COST, "cpu", 1e6)
    monkeypatch.setitem(MERGE_COST, "cpu", 0.0)
    assert choose_backend(graph, "cpu") == "fused"


def test_plan_costs_explain_the_choice():
    from gnn_transformer.kernels import plan_costs
    from gnn_transformer.topology import bigbird, causal, random

    for graph in (causal(300), random(300, 5, seed=1), bigbird(512, block=16, window=1, num_global=1, num_random=2)):
        for dropout in (False, True):
            c = plan_costs(graph, "cpu", block_size=32, dropout=dropout)
            assert c["chosen"] == choose_backend(graph, "cpu", block_size=32, dropout=dropout)
            assert c[c["chosen"]] == min(c["fused"], c["tiled"], c["split"])
            assert c["edges"] == graph.size(1) and 0 <= c["dense_edges"] <= c["edges"]
            assert 0 <= c["dense_tiles"] <= c["tiles"]
    with_drop, without = (plan_costs(causal(300), "cpu", dropout=d) for d in (True, False))
    assert with_drop["fused"] > without["fused"] and with_drop["tiled"] > without["tiled"]


def test_default_block_size_by_device_and_dtype():
    """Float32 and float64 tiles on CUDA are 32 wide (CUDA cores: no spills), all others 64; the plan
    and its costs follow the dtype (causal over 256 tokens: 36 tiles of 32, 10 of 64)."""
    from gnn_transformer.kernels import BLOCK_SIZE, CUDA_CORE_BLOCK_SIZE, choose_backend, default_block_size, plan_costs

    assert CUDA_CORE_BLOCK_SIZE == 32 and BLOCK_SIZE == {"cpu": 64, "cuda": 64}
    for dtype in (torch.float32, torch.float64):
        assert default_block_size("cuda", dtype) == 32 and default_block_size(torch.device("cpu"), dtype) == 64
    for dtype in (torch.bfloat16, torch.float16, None):
        assert default_block_size("cuda", dtype) == 64
    graph = causal(256)
    assert plan_costs(graph, "cuda", dtype=torch.float32)["tiles"] == 36
    assert plan_costs(graph, "cuda", dtype=torch.bfloat16)["tiles"] == plan_costs(graph, "cuda")["tiles"] == 10
    assert plan_costs(graph, "cuda", dtype=torch.float32, block_size=64)["tiles"] == 10
    chosen = plan_costs(graph, "cuda", dtype=torch.float32)["chosen"]
    assert choose_backend(graph, "cuda", dtype=torch.float32) == chosen
