"""Random topologies (random, BigBird's random blocks, expanders): structure and determinism by
seed. Their predicate twin is the drawn edge set (edge_set_predicate), the only sensible twin."""

import collections

import networkx as nx
import pytest
import torch

from gnn_transformer import topology as T
from gnn_transformer.topology.random_graphs import sample_distinct


@pytest.mark.parametrize("lengths", [[1], [4], [9], [3, 1, 6], [5, 0, 5]], ids=str)
@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("seed", [0, 7])
def test_random_k_distinct_keys_per_query(lengths, k, seed):
    if any(0 < L < k for L in lengths):
        with pytest.raises(ValueError, match="'k'"):
            T.random(lengths, k, seed=seed)
        return
    ei = T.random(lengths, k, seed=seed)
    N = sum(lengths)
    assert ei.is_sorted_by_col and ei.sparse_size() == (N, N) and not T.is_multigraph(ei)
    assert torch.equal(torch.bincount(ei[1], minlength=N), torch.full((N,), k))
    seq = T.batch_vector(lengths)
    assert torch.equal(seq[ei[0]], seq[ei[1]])  # keys from the query's own sequence
    assert torch.equal(ei.as_tensor(), T.random(lengths, k, seed=seed).as_tensor())  # determinism
    assert torch.equal(
        ei.as_tensor(), T.from_predicate(lengths if len(lengths) == 1 else [N], T.edge_set_predicate(ei)).as_tensor()
    )


def test_random_seed_changes_the_graph_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = T.random(30, 4, seed=0), T.random(30, 4, seed=1)
    assert torch.equal(torch.rand(1), before)
    assert not torch.equal(a.as_tensor(), b.as_tensor())


def test_sample_distinct_is_uniform():
    g = torch.Generator().manual_seed(0)
    m = torch.full((20000,), 5)
    row, val = sample_distinct(m, 2, g)
    assert torch.equal(torch.bincount(row), torch.full((20000,), 2))
    pairs = val.view(-1, 2)
    assert (pairs[:, 0] != pairs[:, 1]).all() and int(val.max()) == 4 and int(val.min()) == 0
    counts = collections.Counter(tuple(sorted(p)) for p in pairs.tolist())
    assert len(counts) == 10  # all C(5, 2) subsets
    freq = torch.tensor(list(counts.values()), dtype=torch.float) / 20000
    assert (freq - 0.1).abs().max() < 0.01
    row, val = sample_distinct(torch.tensor([0, 1, 3]), 3, g)  # fewer than k available: all of them
    assert row.tolist() == [1, 2, 2, 2] and sorted(val[1:].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("lengths", [[1], [8], [33], [20, 1, 7]], ids=str)
@pytest.mark.parametrize(
    "block, window, num_global, num_random", [(1, 1, 1, 2), (3, 1, 1, 2), (2, 0, 2, 3), (4, 1, 0, 1)]
)
def test_bigbird_random_blocks(lengths, block, window, num_global, num_random):
    kw = dict(block=block, window=window, num_global=num_global)
    ei = T.bigbird(lengths, num_random=num_random, seed=5, **kw)
    det = T.bigbird(lengths, num_random=0, **kw)
    N = sum(lengths)
    assert ei.is_sorted_by_col and ei.sparse_size() == (N, N) and not T.is_multigraph(ei)
    assert torch.equal(T.intersection(ei, det).as_tensor(), det.as_tensor())  # contains the rule part
    assert torch.equal(ei.as_tensor(), T.bigbird(lengths, num_random=num_random, seed=5, **kw).as_tensor())
    extra = T.difference(ei, det)
    seq = T.batch_vector(lengths)
    assert torch.equal(seq[extra[0]], seq[extra[1]])
    pos = torch.arange(N) - T.ptr_vector(lengths)[seq]
    qb, kb = pos[extra[1]] // block, pos[extra[0]] // block
    # per (sequence, query block): the random key blocks, each complete, not in window or global
    blocks = collections.defaultdict(set)
    for s, a, b in zip(seq[extra[1]].tolist(), qb.tolist(), kb.tolist()):
        blocks[(s, a)].add(b)
        assert abs(a - b) > window and a >= num_global and b >= num_global
    for L_idx, L in enumerate(lengths):
        nb = -(-L // block)
        for a in range(num_global, nb):
            seen = {b for b in range(nb) if abs(a - b) <= window or b < num_global}
            assert len(blocks.get((L_idx, a), set())) == min(num_random, nb - len(seen))
    pairs = collections.Counter(zip(seq[extra[1]].tolist(), qb.tolist(), kb.tolist()))
    for (s, a, b), count in pairs.items():  # whole blocks: every query token x every key token

        def size(x):
            return min(block, lengths[s] - x * block)

        assert count == size(a) * size(b)


@pytest.mark.parametrize("lengths", [[10], [7, 12], [3], [1, 16]], ids=str)
@pytest.mark.parametrize("degree", [2, 4])
@pytest.mark.parametrize("self_loops", [False, True])
def test_expander_regular_symmetric_deterministic(lengths, degree, self_loops):
    ei = T.expander(lengths, degree, seed=3, self_loops=self_loops)
    N = sum(lengths)
    assert ei.is_sorted_by_col and ei.sparse_size() == (N, N) and not T.is_multigraph(ei)
    m = T.to_dense_mask(ei)
    assert torch.equal(m, m.T)  # undirected: both directions
    assert bool(m.diagonal().all()) == self_loops or N == 0
    seq = T.batch_vector(lengths)
    assert torch.equal(seq[ei[0]], seq[ei[1]])
    deg = torch.bincount(ei[1], minlength=N) - int(self_loops)
    expected = torch.tensor([min(degree, L - 1) for L in lengths for _ in range(L)])
    assert torch.equal(deg, expected)
    assert torch.equal(ei.as_tensor(), T.expander(lengths, degree, seed=3, self_loops=self_loops).as_tensor())


def test_expander_is_connected_with_small_diameter():
    ei = T.expander(200, 4, seed=0)
    g = T.to_networkx(ei)
    assert nx.is_strongly_connected(g)
    assert nx.diameter(g) <= 8  # ~ log_3(200) + slack; a ring of 200 would need 100
    assert not torch.equal(ei.as_tensor(), T.expander(200, 4, seed=1).as_tensor())


@pytest.mark.parametrize("num_src, num_dst", [(1, 6), (3, 5), (7, 7), (0, 4)])
@pytest.mark.parametrize("p", [0.0, 0.15])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_erdos_renyi_min_in_degree_gives_every_empty_target_one_key(num_src, num_dst, p, seed):
    """min_in_degree=1 keeps the drawn edges and adds exactly one key to each target that drew none
    (a graph without sources has nothing to add)."""
    base = T.to_dense_mask(T.erdos_renyi(num_src, num_dst, p=p, seed=seed), num_src, num_dst)  # [N_dst, N_src]
    ei = T.erdos_renyi(num_src, num_dst, p=p, seed=seed, min_in_degree=1)
    assert ei.sparse_size() == (num_src, num_dst) and not T.is_multigraph(ei)
    mask = T.to_dense_mask(ei, num_src, num_dst)
    assert torch.equal(mask & base, base)  # the drawn edges stay
    drew = base.sum(1)
    expected = torch.where(drew > 0, drew, 1) if num_src > 0 else drew
    assert torch.equal(mask.sum(1), expected)


def test_erdos_renyi_and_bigbird_seed_changes_the_graph():
    a, b = T.erdos_renyi(12, p=0.5, seed=0), T.erdos_renyi(12, p=0.5, seed=1)
    assert not torch.equal(a.as_tensor(), b.as_tensor())
    kw = dict(block=2, window=1, num_global=1, num_random=2)
    a, b = T.bigbird(64, seed=0, **kw), T.bigbird(64, seed=1, **kw)
    assert not torch.equal(a.as_tensor(), b.as_tensor())


@pytest.mark.parametrize(
    "kw, arg",
    [(dict(p=1.5), "'p'"), (dict(p=-0.1), "'p'"), (dict(p=True), "'p'"), (dict(min_in_degree=2), "min_in_degree")],
)
def test_erdos_renyi_bad_arguments_name_the_argument(kw, arg):
    with pytest.raises(ValueError, match=arg):
        T.erdos_renyi(4, **kw)
