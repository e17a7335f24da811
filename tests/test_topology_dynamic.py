"""Selectors (topology.dynamic): each one equals a brute-force selection written plainly here
(Python loops over heads, queries and keys on tiny inputs), returns sorted, distinct, same-sequence
per-head edges, and refuses bad arguments with a ValueError naming the argument and the value. The
selector objects (a layer's ``select``) equal the functions on the graph's sequences, kept to the
graph; ``sequence_lengths`` equals its rule written plainly; ``selector(spec)`` builds them by name."""

import importlib
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_geometric import EdgeIndex

from gnn_transformer import topology as T
from gnn_transformer.topology.dynamic import (
    LSH,
    SELECTORS,
    BlockTopK,
    Routing,
    TopK,
    block_topk,
    lsh,
    routing,
    selector,
    sequence_lengths,
    topk,
)

TOPK_MODULE = importlib.import_module("gnn_transformer.topology.dynamic.topk")  # the package exports the function


# ---------------------------------------------------------------- helpers
def _tokens(lengths):
    """(sequence id, local position) of every token of a disjoint union, as Python lists."""
    seq = [b for b, L in enumerate(lengths) for _ in range(L)]
    pos = [p for L in lengths for p in range(L)]
    return seq, pos


def _triples(edge_index, edge_head):
    """``[(head, target, source), ...]`` in the order returned."""
    return list(zip(edge_head.tolist(), edge_index[1].tolist(), edge_index[0].tolist()))


def _ints(*shape, seed=0, dtype=torch.float32, lo=-2, hi=3):
    """Small integer values: exact scores, many ties."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g).to(dtype)


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _given(lq, lk, how):
    """The ``batch`` / ``lengths`` keywords describing the sequences ``lq`` (queries), ``lk`` (keys)."""
    if how == "none":
        assert len(lq) == 1 and len(lk) == 1
        return {}
    if how == "lengths":
        return {"lengths": lq if lq == lk else (lq, lk)}
    bq, bk = T.batch_vector(lq), T.batch_vector(lk)
    return {"batch": bq if lq == lk else (bq, bk)}


def brute_topk(q, k, num_keys, lq, lk, *, causal=False, allowed=None, allowed_head=None):
    """Sort each row's allowed keys by (-score, key), keep the first num_keys (scores in float64)."""
    H, g = q.size(1), q.size(1) // k.size(1)
    sq, pq = _tokens(lq)
    sk, pk = _tokens(lk)
    cand = [[set() for _ in range(q.size(0))] for _ in range(H)]
    if allowed is None:
        for h in range(H):
            for i in range(q.size(0)):
                cand[h][i] = set(range(k.size(0)))
    else:
        for e, (j, i) in enumerate(allowed.t().tolist()):
            for h in [int(allowed_head[e])] if allowed_head is not None else range(H):
                cand[h][i].add(j)
    out = []
    for h in range(H):
        for i in range(q.size(0)):
            js = [j for j in cand[h][i] if sk[j] == sq[i] and (not causal or pk[j] <= pq[i])]
            score = {j: float(q[i, h].double() @ k[j, h // g].double()) for j in js}
            best = sorted(js, key=lambda j: (-score[j], j))[:num_keys]
            out += [(h, i, j) for j in sorted(best)]
    return out


def brute_block_topk(q, k, block_size, num_blocks, lengths, *, causal=False):
    H, g = q.size(1), q.size(1) // k.size(1)
    out, offset = [], 0
    for L in lengths:
        blocks = [range(s, min(s + block_size, L)) for s in range(0, L, block_size)]
        qm = [sum(q[offset + t] for t in b) / len(b) for b in blocks]  # [H, D] each
        km = [sum(k[offset + t] for t in b) / len(b) for b in blocks]
        for h in range(H):
            for b in range(len(blocks)):
                cand = [c for c in range(len(blocks)) if c != b and (not causal or c < b)]
                score = {c: float(qm[b][h] @ km[c][h // g]) for c in cand}
                kept = sorted(cand, key=lambda c: (-score[c], c))[:num_blocks] + [b]
                for i in blocks[b]:
                    js = [j for c in kept for j in blocks[c] if not (causal and c == b and j > i)]
                    out += [(h, offset + i, offset + j) for j in js]
        offset += L
    return sorted(out)


def brute_lsh(q, k, num_buckets, num_hashes, chunk_size, seed, lengths, *, causal=False):
    """Reformer's recipe with the documented rotations."""
    H, H_kv, D = q.size(1), k.size(1), q.size(2)
    g = H // H_kv
    R = torch.randn(
        num_hashes, H_kv, D, num_buckets // 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )

    def bucket(v, rot):
        x = (v / v.norm()) @ rot
        return int(torch.cat([x, -x]).argmax())

    out, offset = set(), 0
    for L in lengths:
        for r in range(num_hashes):
            for h in range(H):
                rot = R[r, h // g]
                bq = [bucket(q[offset + p, h], rot) for p in range(L)]
                bk = [bucket(k[offset + p, h // g], rot) for p in range(L)]
                sorted_q = sorted(range(L), key=lambda p: (bq[p], p))
                sorted_k = sorted(range(L), key=lambda p: (bk[p], p))
                for rank, i in enumerate(sorted_q):
                    c = rank // chunk_size
                    for j in sorted_k[max(c - 1, 0) * chunk_size : (c + 1) * chunk_size]:
                        if not causal or j <= i:
                            out.add((h, offset + i, offset + j))
        offset += L
    return sorted(out)


def brute_routing(q, k, centroids, lengths, *, causal=False):
    H, g = q.size(1), q.size(1) // k.size(1)
    mu = centroids / centroids.norm(dim=-1, keepdim=True)
    seq, pos = _tokens(lengths)

    def cluster(v, h):
        return int(((v / v.norm()) @ mu[h].T).argmax())

    cq = [[cluster(q[i, h], h) for h in range(H)] for i in range(q.size(0))]
    ck = [[cluster(k[j, h // g], h) for h in range(H)] for j in range(k.size(0))]
    return [
        (h, i, j)
        for h in range(H)
        for i in range(q.size(0))
        for j in range(k.size(0))
        if cq[i][h] == ck[j][h] and seq[i] == seq[j] and (not causal or pos[j] <= pos[i])
    ]


def assert_format(edge_index, edge_head, num_heads, lq, lk=None):
    """long, shapes, sorted by (head, target, source), distinct, heads in range, within sequences."""
    lk = lq if lk is None else lk
    assert edge_index.dtype == torch.long and edge_head.dtype == torch.long
    assert type(edge_index) is torch.Tensor and type(edge_head) is torch.Tensor
    assert edge_index.dim() == 2 and edge_index.size(0) == 2 and edge_head.shape == (edge_index.size(1),)
    triples = _triples(edge_index, edge_head)
    assert triples == sorted(set(triples))
    if triples:
        assert 0 <= min(edge_head.tolist()) and max(edge_head.tolist()) < num_heads
        assert 0 <= min(edge_index[0].tolist()) and max(edge_index[0].tolist()) < sum(lk)
        assert 0 <= min(edge_index[1].tolist()) and max(edge_index[1].tolist()) < sum(lq)
    sq, sk = T.batch_vector(lq), T.batch_vector(lk)
    assert torch.equal(sk[edge_index[0]], sq[edge_index[1]])


HEADS = [(1, 1), (2, 2), (4, 2), (4, 1)]  # (H, H_kv)
# (lengths, how they are given, (H, H_kv)): one sequence, a batch with an empty sequence, GQA
SELF = [
    ([9], "none", (1, 1)),
    ([9], "none", (4, 2)),
    ([5, 3, 6], "lengths", (4, 1)),
    ([5, 3, 6], "lengths", (2, 2)),
    ([4, 0, 7], "batch", (4, 2)),
    ([6, 5], "batch", (1, 1)),
]
CROSS = [
    ([4], [9], "none", (4, 2)),
    ([3, 0, 5], [4, 2, 3], "lengths", (2, 1)),
    ([2, 6], [5, 1], "batch", (1, 1)),
    ([12], [12], "none", (4, 1)),
    ([5, 3, 6], [5, 3, 6], "lengths", (2, 2)),
]


# ---------------------------------------------------------------- topk
@pytest.mark.parametrize("lengths, how, heads", SELF, ids=str)
@pytest.mark.parametrize("num_keys", [1, 3, 20])
@pytest.mark.parametrize("causal", [False, True])
def test_topk_equals_brute_force(lengths, how, heads, num_keys, causal):
    H, H_kv = heads
    q, k = _ints(sum(lengths), H, 3, seed=1), _ints(sum(lengths), H_kv, 3, seed=2)
    edge_index, edge_head = topk(q, k, num_keys, causal=causal, chunk=4, **_given(lengths, lengths, how))
    assert _triples(edge_index, edge_head) == brute_topk(q, k, num_keys, lengths, lengths, causal=causal)
    assert_format(edge_index, edge_head, H, lengths)


@pytest.mark.parametrize("lq, lk, how, heads", CROSS[:3], ids=str)
@pytest.mark.parametrize("num_keys", [1, 4, 20])
def test_topk_cross_attention_equals_brute_force(lq, lk, how, heads, num_keys):
    H, H_kv = heads
    q, k = _ints(sum(lq), H, 2, seed=3), _ints(sum(lk), H_kv, 2, seed=4)
    edge_index, edge_head = topk(q, k, num_keys, chunk=3, **_given(lq, lk, how))
    assert _triples(edge_index, edge_head) == brute_topk(q, k, num_keys, lq, lk)
    assert_format(edge_index, edge_head, H, lq, lk)


def _allowed(n_src, n_dst, num, seed, heads=None):
    """Random edges with duplicates (and so some empty rows), in random order."""
    g = torch.Generator().manual_seed(seed)
    src, dst = torch.randint(0, n_src, (num,), generator=g), torch.randint(0, n_dst, (num,), generator=g)
    edge_index = torch.cat([torch.stack([src, dst]), torch.stack([src, dst])[:, : num // 4]], dim=1)
    head = None if heads is None else torch.randint(0, heads, (edge_index.size(1),), generator=g)
    return edge_index, head


@pytest.mark.parametrize("lq, lk, how, heads", CROSS, ids=str)
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("num_keys", [1, 2, 10])
@pytest.mark.parametrize("causal", [False, True])
def test_topk_within_allowed_equals_brute_force(lq, lk, how, heads, per_head, num_keys, causal):
    H, H_kv = heads
    q, k = _ints(sum(lq), H, 2, seed=5), _ints(sum(lk), H_kv, 2, seed=6)
    allowed, allowed_head = _allowed(sum(lk), sum(lq), 30, seed=7, heads=H if per_head else None)
    edge_index, edge_head = topk(
        q, k, num_keys, allowed=allowed, allowed_head=allowed_head, causal=causal, chunk=1, **_given(lq, lk, how)
    )
    expected = brute_topk(q, k, num_keys, lq, lk, causal=causal, allowed=allowed, allowed_head=allowed_head)
    assert _triples(edge_index, edge_head) == expected
    assert_format(edge_index, edge_head, H, lq, lk)


@pytest.mark.parametrize("route", ["default", "gathered"])
@pytest.mark.parametrize("graph", ["window", "step", "per_head_window", "random", "global"])
def test_topk_within_allowed_routes_equal_brute_force(monkeypatch, route, graph):
    # rows of an allowed graph are ranked in padded tables of rows of similar widths (a narrow
    # range of keys scored as a range, or the keys gathered): all exact
    if route == "gathered":
        monkeypatch.setattr(TOPK_MODULE, "BAND", 0)
    monkeypatch.setattr(TOPK_MODULE, "SCORES_PER_CHUNK", 160)  # blocks of rows, gathered in parts
    lq, lk, head = [11, 9], [11, 9], None
    if graph == "step":  # a decoding step: 2 queries read every key of their sequence
        lq, lk = [1, 1], [11, 9]
        allowed = torch.stack([torch.arange(20), torch.tensor([0] * 11 + [1] * 9)])
    elif graph == "random":
        allowed = _allowed(20, 20, 80, seed=12)[0]
    elif graph == "global":  # rows of 3 to 20 keys: several tables, blocks out of row order
        allowed = T.union(T.sliding_window([11, 9], 1), T.global_tokens([11, 9], 2))
    else:
        allowed = T.sliding_window([11, 9], 2).as_tensor()
        if graph == "per_head_window":  # a window of its own per head
            allowed, head = T.heads.per_head([T.sliding_window([11, 9], r) for r in (1, 2, 2, 3)])
    q, k = _ints(sum(lq), 4, 4, seed=14), _ints(sum(lk), 2, 4, seed=15)
    for causal in (False, True):
        got = topk(q, k, 3, allowed=allowed, allowed_head=head, lengths=(lq, lk), causal=causal)
        want = brute_topk(q, k, 3, lq, lk, causal=causal, allowed=allowed, allowed_head=head)
        assert _triples(*got) == want
        assert_format(*got, 4, lq, lk)


def test_topk_takes_an_edge_index_as_allowed():
    q, k = _ints(6, 2, 2, seed=0), _ints(6, 1, 2, seed=1)
    ei = T.sliding_window(6, 1)
    a = topk(q, k, 2, allowed=ei)
    b = topk(q, k, 2, allowed=ei.as_tensor())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert _triples(*a) == brute_topk(q, k, 2, [6], [6], allowed=ei.as_tensor())


@pytest.mark.parametrize("allowed", [False, True])
def test_topk_ties_go_to_the_lower_key(allowed):
    q, k = torch.ones(5, 2, 3), torch.ones(5, 1, 3)  # every score ties
    kw = {"allowed": torch.tensor([[4, 3, 1, 2, 0], [0, 0, 0, 0, 0]])} if allowed else {}
    edge_index, edge_head = topk(q, k, 2, **kw)
    rows = range(1) if allowed else range(5)
    assert _triples(edge_index, edge_head) == [(h, i, j) for h in range(2) for i in rows for j in (0, 1)]


@pytest.mark.parametrize("allowed", [False, True])
def test_topk_row_with_fewer_keys_keeps_them_all_and_empty_rows_stay_empty(allowed):
    q, k = _randn(4, 1, 2), _randn(3, 1, 2, seed=1)
    kw = {"allowed": torch.tensor([[0, 2], [1, 1]])} if allowed else {}
    edge_index, _ = topk(q, k, 5, **kw)
    if allowed:  # row 1 has two allowed keys; rows 0, 2, 3 none
        assert edge_index.tolist() == [[0, 2], [1, 1]]
    else:
        assert edge_index.tolist() == [[0, 1, 2] * 4, [i for i in range(4) for _ in range(3)]]


@pytest.mark.parametrize("allowed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_topk_result_does_not_depend_on_the_chunk(allowed, dtype):
    lengths = [7, 12, 5]
    q, k = _randn(24, 4, 8, dtype=dtype), _randn(24, 2, 8, seed=1, dtype=dtype)
    kw = {"allowed": _allowed(24, 24, 200, seed=2)[0]} if allowed else {}
    results = [topk(q, k, 3, lengths=lengths, causal=True, chunk=c, **kw) for c in (1, 5, 1024, None)]
    for edge_index, edge_head in results[1:]:
        assert torch.equal(edge_index, results[0][0]) and torch.equal(edge_head, results[0][1])


def test_topk_float_inputs_equal_brute_force():
    q, k = _randn(10, 2, 4), _randn(10, 2, 4, seed=1)
    assert _triples(*topk(q, k, 3, scale=0.1)) == brute_topk(q, k, 3, [10], [10])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("values", ["ties", "randn"])
def test_topk_wide_rows_ranked_through_groups_equal_brute_force(causal, values):
    # rows at least GROUPED_WIDTH times wider than the keys kept are ranked among the columns of
    # their best groups; small integers tie at every group boundary
    lengths, num = [48, 33], 4
    assert max(lengths) >= TOPK_MODULE.GROUPED_WIDTH * num
    if values == "ties":
        q, k = _ints(81, 4, 2, seed=8), _ints(81, 2, 2, seed=9)
    else:
        q, k = _randn(81, 4, 3, seed=8), _randn(81, 2, 3, seed=9)
    edge_index, edge_head = topk(q, k, num, lengths=lengths, causal=causal, chunk=16)
    assert _triples(edge_index, edge_head) == brute_topk(q, k, num, lengths, lengths, causal=causal)


def test_topk_tie_at_the_groups_boundary_goes_to_the_lower_key():
    # 16 keys, 2 kept: groups of 2 columns (g, g + 8); key 10 (group 2) is best, keys 1 (group 1)
    # and 12 (group 4) tie for second place with their groups' maxima: key 1 is kept
    scores = torch.zeros(16, dtype=torch.float64)
    scores[10], scores[1], scores[12] = 5.0, 3.0, 3.0
    q, k = torch.ones(1, 1, 1, dtype=torch.float64), scores.view(16, 1, 1)
    for order in (scores, scores.flip(0)):  # the tied key outside the first groups, then inside
        edge_index, _ = topk(q, order.view(16, 1, 1), 2)
        expected = brute_topk(q, order.view(16, 1, 1), 2, [1], [16])
        assert _triples(edge_index, torch.zeros(2, dtype=torch.long)) == expected
    assert topk(q, k, 2)[0].tolist() == [[1, 10], [0, 0]]


def test_topk_keeps_keys_of_infinitely_low_score_when_nothing_better_is_left():
    # a row keeps num_keys of its keys whatever their scores: -inf scores (here from an infinite
    # key) are kept, in key order, where no finite score is left
    k = torch.full((32, 1, 1), -math.inf)  # wide enough to be ranked through groups
    k[5] = 1.0
    q = torch.ones(1, 1, 1)
    assert 32 >= TOPK_MODULE.GROUPED_WIDTH * 3
    assert topk(q, k, 1)[0].tolist() == [[5], [0]]
    assert topk(q, k, 3)[0].tolist() == [[0, 1, 5], [0, 0, 0]]
    assert topk(q, k, 3)[0].tolist() == [[j for _, _, j in brute_topk(q, k, 3, [1], [32])], [0, 0, 0]]


def test_topk_is_not_differentiated():
    q, k = _randn(5, 1, 2).requires_grad_(), _randn(5, 1, 2, seed=1).requires_grad_()
    edge_index, edge_head = topk(q, k, 2)
    assert not edge_index.requires_grad and not edge_head.requires_grad and q.grad is None


@settings(max_examples=60, deadline=None)
@given(
    lq=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    extra=st.lists(st.integers(-2, 3), min_size=3, max_size=3),
    heads=st.sampled_from(HEADS),
    num_keys=st.integers(1, 7),
    causal=st.booleans(),
    use_allowed=st.booleans(),
    per_head=st.booleans(),
    chunk=st.integers(1, 9),
    seed=st.integers(0, 10**6),
)
def test_topk_property_equals_brute_force(lq, extra, heads, num_keys, causal, use_allowed, per_head, chunk, seed):
    lk = [max(L + d, 0) for L, d in zip(lq, extra)]
    H, H_kv = heads
    q, k = _ints(sum(lq), H, 2, seed=seed), _ints(sum(lk), H_kv, 2, seed=seed + 1)
    allowed = allowed_head = None
    if use_allowed and sum(lq) and sum(lk):
        allowed, allowed_head = _allowed(sum(lk), sum(lq), 3 * sum(lq), seed=seed, heads=H if per_head else None)
    edge_index, edge_head = topk(
        q, k, num_keys, allowed=allowed, allowed_head=allowed_head, causal=causal, chunk=chunk, lengths=(lq, lk)
    )
    expected = brute_topk(q, k, num_keys, lq, lk, causal=causal, allowed=allowed, allowed_head=allowed_head)
    assert _triples(edge_index, edge_head) == expected
    assert_format(edge_index, edge_head, H, lq, lk)


# ---------------------------------------------------------------- block_topk
@pytest.mark.parametrize("lengths, how, heads", SELF, ids=str)
@pytest.mark.parametrize("block_size, num_blocks", [(1, 2), (2, 1), (3, 0), (3, 2), (4, 9)])
@pytest.mark.parametrize("causal", [False, True])
def test_block_topk_equals_brute_force(lengths, how, heads, block_size, num_blocks, causal):
    H, H_kv = heads
    q, k = _randn(sum(lengths), H, 3), _randn(sum(lengths), H_kv, 3, seed=1)
    edge_index, edge_head = block_topk(q, k, block_size, num_blocks, causal=causal, **_given(lengths, lengths, how))
    assert _triples(edge_index, edge_head) == brute_block_topk(q, k, block_size, num_blocks, lengths, causal=causal)
    assert_format(edge_index, edge_head, H, lengths)


@pytest.mark.parametrize("causal", [False, True])
def test_block_topk_ties_go_to_the_lower_block(causal):
    q, k = torch.ones(8, 1, 2), torch.ones(8, 1, 2)
    edge_index, edge_head = block_topk(q, k, 2, 1, causal=causal)
    assert _triples(edge_index, edge_head) == brute_block_topk(q, k, 2, 1, [8], causal=causal)
    kept = {(i // 2, j // 2) for _, i, j in _triples(edge_index, edge_head)}
    assert kept == (
        {(0, 0), (1, 1), (1, 0), (2, 2), (2, 0), (3, 3), (3, 0)}
        if causal
        else {(0, 0), (0, 1), (1, 1), (1, 0), (2, 2), (2, 0), (3, 3), (3, 0)}
    )


@pytest.mark.parametrize("causal", [False, True])
def test_block_topk_with_all_blocks_is_full_or_causal(causal):
    q, k = _randn(10, 2, 4), _randn(10, 2, 4, seed=1)
    edge_index, edge_head = block_topk(q, k, 3, 5, causal=causal, lengths=[4, 6])
    full = (T.causal if causal else T.full)([4, 6]).as_tensor()
    assert torch.equal(edge_index, full.repeat(1, 2))
    assert torch.equal(edge_head, torch.arange(2).repeat_interleave(full.size(1)))


def test_block_topk_pools_the_short_last_block_over_its_real_tokens():
    # keys: block 0 = {0, 1} mean 0; block 1 = {2, 3} mean 1; block 2 = {4} mean 2: block 2 wins
    k = torch.tensor([1.0, -1.0, 1.0, 1.0, 2.0]).view(5, 1, 1)
    edge_index, _ = block_topk(torch.ones(5, 1, 1), k, 2, 1)
    assert edge_index[0][edge_index[1] == 0].tolist() == [0, 1, 4]


# ---------------------------------------------------------------- lsh
@pytest.mark.parametrize("lengths, how, heads", SELF, ids=str)
@pytest.mark.parametrize("num_buckets, num_hashes, chunk_size", [(2, 1, 2), (4, 2, 3), (6, 3, 1), (8, 1, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_lsh_equals_brute_force(lengths, how, heads, num_buckets, num_hashes, chunk_size, causal):
    H, H_kv = heads
    q, k = _randn(sum(lengths), H, 4), _randn(sum(lengths), H_kv, 4, seed=1)
    edge_index, edge_head = lsh(
        q,
        k,
        num_buckets,
        num_hashes=num_hashes,
        chunk_size=chunk_size,
        seed=3,
        causal=causal,
        **_given(lengths, lengths, how),
    )
    expected = brute_lsh(q, k, num_buckets, num_hashes, chunk_size, 3, lengths, causal=causal)
    assert _triples(edge_index, edge_head) == expected
    assert_format(edge_index, edge_head, H, lengths)


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_one_chunk_is_full_or_causal(causal):
    q, k = _randn(9, 2, 4), _randn(9, 1, 4, seed=1)
    edge_index, edge_head = lsh(q, k, 4, chunk_size=5, causal=causal, lengths=[5, 4])
    full = (T.causal if causal else T.full)([5, 4]).as_tensor()
    assert torch.equal(edge_index, full.repeat(1, 2))
    assert torch.equal(edge_head, torch.arange(2).repeat_interleave(full.size(1)))


def test_lsh_shared_queries_and_keys_always_see_themselves():
    x = _randn(40, 2, 8)
    edge_index, edge_head = lsh(x, x, 8, chunk_size=2, num_hashes=2)
    loops = {(h, i) for h, i, j in _triples(edge_index, edge_head) if i == j}
    assert loops == {(h, i) for h in range(2) for i in range(40)}


def test_lsh_same_seed_same_graph_other_seed_other_graph():
    q, k = _randn(40, 2, 8), _randn(40, 2, 8, seed=1)
    a, b, c = (lsh(q, k, 8, chunk_size=2, seed=s) for s in (5, 5, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape != c[0].shape or not torch.equal(a[0], c[0])


def test_lsh_leaves_the_global_generator_alone():
    q = _randn(10, 1, 4)
    torch.manual_seed(3)
    before = torch.rand(1)
    torch.manual_seed(3)
    lsh(q, q, 4, chunk_size=2)
    assert torch.equal(torch.rand(1), before)


# ---------------------------------------------------------------- routing
@pytest.mark.parametrize("lengths, how, heads", SELF, ids=str)
@pytest.mark.parametrize("num_clusters", [1, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_routing_equals_brute_force(lengths, how, heads, num_clusters, causal):
    H, H_kv = heads
    q, k = _randn(sum(lengths), H, 4), _randn(sum(lengths), H_kv, 4, seed=1)
    centroids = _randn(H, num_clusters, 4, seed=2) * 3  # not normalized: routing normalizes
    edge_index, edge_head = routing(q, k, centroids, causal=causal, **_given(lengths, lengths, how))
    assert _triples(edge_index, edge_head) == brute_routing(q, k, centroids, lengths, causal=causal)
    assert_format(edge_index, edge_head, H, lengths)


def test_routing_query_of_a_keyless_cluster_has_an_empty_row():
    centroids = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    q = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    k = torch.tensor([[[1.0, 0.1]], [[1.0, -0.1]]])  # both keys in cluster 0
    edge_index, _ = routing(q, k, centroids)
    assert edge_index.tolist() == [[0, 1], [0, 0]]


def test_routing_function_updates_in_place_only_when_asked():
    q, k = _randn(6, 2, 3), _randn(6, 1, 3, seed=1)
    centroids = torch.nn.functional.normalize(_randn(2, 2, 3, seed=2), dim=-1)
    before = centroids.clone()
    a = routing(q, k, centroids)
    assert torch.equal(centroids, before)
    b = routing(q, k, centroids, update=True, decay=0.5)
    assert not torch.equal(centroids, before)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # the graph of the centroids as given


def _expected_update(centroids, q, k, decay):
    """Online k-means step written plainly: per head and cluster, the mean of the normalized
    queries and keys nearest to it; EMA; normalize."""
    H, K, _ = centroids.shape
    g = H // k.size(1)
    new = centroids.clone()
    for h in range(H):
        xs = [v / v.norm() for v in list(q[:, h]) + list(k[:, h // g])]
        assign = [int((x @ centroids[h].T).argmax()) for x in xs]
        for c in range(K):
            members = [x for x, a in zip(xs, assign) if a == c]
            if members:
                new[h, c] = decay * centroids[h, c] + (1 - decay) * sum(members) / len(members)
    return new / new.norm(dim=-1, keepdim=True)


def test_routing_module_updates_centroids_toward_assigned_vectors_in_train_mode():
    router = Routing(4, 3, 3, decay=0.7, seed=1).double()
    q, k = _randn(8, 4, 3), _randn(8, 2, 3, seed=1)
    before = router.centroids.clone()
    router.train()
    router(q, k)
    torch.testing.assert_close(router.centroids, _expected_update(before, q, k, 0.7), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(router.centroids.norm(dim=-1), torch.ones(4, 3, dtype=torch.float64))


def test_routing_module_moves_a_centroid_closer_to_its_members():
    router = Routing(1, 2, 1, decay=0.9)
    x = torch.tensor([[[1.0, 0.0]], [[0.8, 0.6]]])  # every vector in the only cluster
    mean = torch.nn.functional.normalize(x[:, 0].mean(0), dim=0)
    before = float(router.centroids[0, 0] @ mean)
    router(x, x)
    assert float(router.centroids[0, 0] @ mean) > before


def test_routing_module_keeps_centroids_in_eval_mode():
    router = Routing(2, 3, 2).eval()
    before = router.centroids.clone()
    router(_randn(5, 2, 3, dtype=torch.float32), _randn(5, 2, 3, seed=1, dtype=torch.float32))
    assert torch.equal(router.centroids, before)


def test_routing_module_centroids_follow_to_and_the_state_dict():
    router = Routing(2, 4, 3, seed=5)
    assert router.centroids.dtype == torch.float32 and router.centroids.device.type == "cpu"
    assert "centroids" in router.state_dict()
    torch.testing.assert_close(router.centroids.norm(dim=-1), torch.ones(2, 3))
    assert torch.equal(Routing(2, 4, 3, seed=5).centroids, router.centroids)
    router = router.to(torch.float64)
    assert router.centroids.dtype == torch.float64
    edge_index, edge_head = router(_randn(5, 2, 4), _randn(5, 1, 4, seed=1))
    assert router.centroids.dtype == torch.float64
    assert_format(edge_index, edge_head, 2, [5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_selectors_on_cuda_match_cpu():
    q, k = _ints(20, 4, 4, seed=0), _ints(20, 2, 4, seed=1)
    router = Routing(4, 4, 3)
    for fn in (
        lambda a, b: topk(a, b, 3, lengths=[8, 12], causal=True),
        lambda a, b: block_topk(a, b, 3, 1, lengths=[8, 12]),
        lambda a, b: lsh(a, b, 4, chunk_size=2, lengths=[8, 12]),
    ):
        cpu, gpu = fn(q, k), fn(q.cuda(), k.cuda())
        assert gpu[0].device.type == "cuda" and torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
    router.eval()
    cpu = router(q, k)
    gpu = router.cuda()(q.cuda(), k.cuda())
    assert router.centroids.device.type == "cuda" and torch.equal(cpu[0], gpu[0].cpu())


# ---------------------------------------------------------------- all selectors
FUNCTIONS = {
    "topk": lambda q, k, **kw: topk(q, k, 2, **kw),
    "topk_allowed": lambda q, k, **kw: topk(q, k, 2, allowed=T.full(q.size(0)).as_tensor(), **kw),
    "block_topk": lambda q, k, **kw: block_topk(q, k, 2, 1, **kw),
    "lsh": lambda q, k, **kw: lsh(q, k, 4, chunk_size=2, **kw),
    "routing": lambda q, k, **kw: routing(q, k, torch.eye(4)[None, :3].repeat(4, 1, 1), **kw),
}


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("lengths", [[0], [3, 0, 4], [1]], ids=str)
def test_selectors_take_empty_and_single_token_sequences(name, lengths):
    if name == "block_topk" and max(lengths) < 2:
        return  # block_size 2 > the longest sequence: refused (see the bad inputs)
    q, k = _randn(sum(lengths), 4, 4), _randn(sum(lengths), 2, 4, seed=1)
    edge_index, edge_head = FUNCTIONS[name](q, k, lengths=lengths, causal=True)
    assert_format(edge_index, edge_head, 4, lengths)
    if sum(lengths) == 0:
        assert edge_index.shape == (2, 0)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_selectors_keep_batch_gaps_apart(name):
    batch = torch.tensor([0, 0, 0, 2, 2, 2, 2, 5])  # ids with gaps: three sequences
    q, k = _randn(8, 4, 4), _randn(8, 2, 4, seed=1)
    a = FUNCTIONS[name](q, k, batch=batch)
    b = FUNCTIONS[name](q, k, lengths=[3, 4, 1])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("name", FUNCTIONS)
def test_selectors_respect_the_edge_budget(name):
    q, k = _randn(8, 4, 4), _randn(8, 2, 4, seed=1)
    with T.max_edges(3), pytest.raises(ValueError, match=re.escape("max_edges=3")):
        FUNCTIONS[name](q, k)


# ---------------------------------------------------------------- bad inputs
Q, K = torch.zeros(4, 4, 2), torch.zeros(4, 2, 2)
C = torch.eye(2)[None].repeat(4, 1, 1)
BAD = [
    (lambda: topk(Q, K, 0), "'num_keys'", "(got 0)"),
    (lambda: topk(Q, K, 1.5), "'num_keys'", "1.5"),
    (lambda: topk(Q[0], K, 1), "'q'", "(4, 2)"),
    (lambda: topk(Q.long(), K, 1), "'q'", "torch.int64"),
    (lambda: topk(Q, K.double(), 1), "'k'", "torch.float64"),
    (lambda: topk(Q, torch.zeros(4, 3, 2), 1), "'k'", "(4, 3, 2)"),
    (lambda: topk(Q, torch.zeros(4, 2, 3), 1), "'k'", "(4, 2, 3)"),
    (lambda: topk(Q, K, 1, scale=0.0), "'scale'", "0.0"),
    (lambda: topk(Q, K, 1, scale=-1.0), "'scale'", "-1.0"),
    (lambda: topk(Q, K, 1, chunk=0), "'chunk'", "(got 0)"),
    (lambda: topk(Q, K, 1, causal=1), "'causal'", "(got 1)"),
    (lambda: topk(Q, K, 1, batch=torch.tensor([0, 0, 1])), "'batch'", "3"),
    (lambda: topk(Q, K, 1, batch=torch.tensor([0, 1, 0, 1])), "'batch'", "[0, 1, 0, 1]"),
    (lambda: topk(Q, K, 1, batch=torch.tensor([-1, 0, 0, 0])), "'batch'", "-1"),
    (lambda: topk(Q, K, 1, batch=torch.tensor([0.0, 0, 0, 0])), "'batch'", "tensor"),
    (lambda: topk(Q, K, 1, batch=torch.zeros(4, dtype=torch.long), lengths=[4]), "'lengths'", "[4]"),
    (lambda: topk(Q, K, 1, lengths=[2, 3]), "'lengths'", "[2, 3]"),
    (lambda: topk(Q, K, 1, lengths=[2, -2, 4]), "'lengths'", "-2"),
    (lambda: topk(Q, K, 1, lengths=([2, 2], [4])), "'lengths'", "[4]"),
    (lambda: topk(Q, K[:3], 1, batch=torch.zeros(4, dtype=torch.long)), "'batch'", "k.size(0)=3"),
    (lambda: topk(Q, K, 1, allowed=torch.zeros(3, 2, dtype=torch.long)), "'allowed'", "(3, 2)"),
    (lambda: topk(Q, K, 1, allowed=torch.zeros(2, 2)), "'allowed'", "torch.float32"),
    (lambda: topk(Q, K, 1, allowed=torch.tensor([[0, 4], [0, 0]])), "'allowed'", "[0, 4]"),
    (lambda: topk(Q, K, 1, allowed=torch.tensor([[0, 0], [0, -1]])), "'allowed'", "[-1, 0]"),
    (lambda: topk(Q, K, 1, allowed=EdgeIndex(torch.tensor([[0], [0]]), sparse_size=(5, 4))), "'allowed'", "(5, 4)"),
    (
        lambda: topk(Q, K, 1, allowed=torch.tensor([[0, 1], [0, 0]]), allowed_head=torch.tensor([0])),
        "'allowed_head'",
        "(got 1)",
    ),
    (
        lambda: topk(Q, K, 1, allowed=torch.tensor([[0, 1], [0, 0]]), allowed_head=torch.tensor([0, 4])),
        "'allowed_head'",
        "[0, 4]",
    ),
    (lambda: topk(Q, K, 1, allowed_head=torch.tensor([0])), "'allowed_head'", "allowed=None"),
    (lambda: block_topk(Q, K, 0, 1), "'block_size'", "(got 0)"),
    (lambda: block_topk(Q, K, 5, 1), "'block_size'", "(got 5)"),
    (lambda: block_topk(Q, K, 3, 1, lengths=[2, 2]), "'block_size'", "(got 3)"),
    (lambda: block_topk(Q, K, 2, -1), "'num_blocks'", "(got -1)"),
    (lambda: block_topk(Q, K[:3], 2, 1), "self-attention", "k.size(0)=3"),
    (lambda: block_topk(Q, K, 2, 1, lengths=([2, 2], [2, 2])), "'lengths'", "[2, 2]"),
    (lambda: lsh(Q, K, 3), "'num_buckets'", "(got 3)"),
    (lambda: lsh(Q, K, 0), "'num_buckets'", "(got 0)"),
    (lambda: lsh(Q, K, 4, num_hashes=0), "'num_hashes'", "(got 0)"),
    (lambda: lsh(Q, K, 4, chunk_size=0), "'chunk_size'", "(got 0)"),
    (lambda: lsh(Q, K, 4, seed=-1), "'seed'", "(got -1)"),
    (lambda: lsh(Q, K, 4, batch=(torch.zeros(4, dtype=torch.long),) * 2), "'batch'", "tuple of 2"),
    (lambda: routing(Q, K, C[:3]), "'centroids'", "(3, 2, 2)"),
    (lambda: routing(Q, K, torch.zeros(4, 2, 3)), "'centroids'", "(4, 2, 3)"),
    (lambda: routing(Q, K, C.long()), "'centroids'", "torch.int64"),
    (lambda: routing(Q, K, C, decay=1.5), "'decay'", "1.5"),
    (lambda: routing(Q, K, C, update=None), "'update'", "None"),
    (lambda: Routing(4, 2, 0), "'num_clusters'", "(got 0)"),
    (lambda: Routing(0, 2, 2), "'num_heads'", "(got 0)"),
    (lambda: Routing(4, 2, 2, decay=-0.1), "'decay'", "-0.1"),
    (lambda: Routing(4, 2, 2, seed=2**63), "'seed'", str(2**63)),
    (lambda: Routing(2, 2, 3)(Q, K), "'centroids'", "(2, 3, 2)"),
]


def test_scale_does_not_change_the_selection():
    q, k = _randn(7, 2, 4), _randn(7, 1, 4, seed=1)
    a, b = topk(q, k, 3), topk(q, k, 3, scale=math.pi)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------- the sequences of a graph
def brute_lengths(edge_index, n):
    """The rule written plainly: a boundary between b - 1 and b starts a sequence unless an edge spans it."""
    edges = edge_index.t().tolist()
    starts = [0] + [b for b in range(1, n) if not any(min(i, j) < b <= max(i, j) for j, i in edges)] + [n]
    return [b - a for a, b in zip(starts, starts[1:])] if n else [0]


def _edges(pairs):
    """``edge_index`` from ``[(j, i), ...]``."""
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).t()


RULE = [  # (graph, num_nodes, lengths)
    (T.causal([5, 7]), 12, [5, 7]),
    (T.sliding_window([3, 0, 4], 1), 7, [3, 4]),  # an empty sequence has no nodes to find
    (T.full(6), 6, [6]),
    (T.sliding_window(9, 2, causal=True), 9, [9]),
    (_edges([(0, 5)]), 8, [6, 1, 1]),  # one long edge spans its range; nodes 6, 7 alone
    (_edges([(5, 0), (7, 7)]), 8, [6, 1, 1]),  # direction does not matter; a self-loop spans nothing
    (_edges([(0, 2), (2, 4), (6, 8)]), 9, [5, 1, 3]),  # overlapping spans chain; node 5 alone
    (_edges([]), 4, [1, 1, 1, 1]),
    (_edges([]), 0, [0]),
    (_edges([(i, i) for i in range(3)]), 3, [1, 1, 1]),
]


@pytest.mark.parametrize("graph, n, lengths", RULE, ids=[f"{i}-{case[2]}" for i, case in enumerate(RULE)])
def test_sequence_lengths_of_graphs_with_and_without_boundaries(graph, n, lengths):
    plain = graph.as_tensor() if isinstance(graph, EdgeIndex) else graph
    assert sequence_lengths(graph, n) == lengths == brute_lengths(plain, n)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 14), num=st.integers(0, 12), span=st.integers(0, 6), seed=st.integers(0, 10**6))
def test_sequence_lengths_property_equals_the_rule(n, num, span, seed):
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, max(n, 1), (num if n else 0,), generator=g)
    j = (i + torch.randint(-span, span + 1, i.shape, generator=g)).clamp(0, max(n - 1, 0))
    edge_index = torch.stack([j, i])
    lengths = sequence_lengths(edge_index, n)
    assert lengths == brute_lengths(edge_index, n) and sum(lengths) == n


# ---------------------------------------------------------------- selector objects (a layer's select)
def _within(triples, graph):
    """The triples ``(head, target, source)`` whose edge ``source -> target`` the graph holds."""
    edges = {(i, j) for j, i in graph.t().tolist()}
    return [t for t in triples if (t[1], t[2]) in edges]


ROUTER = Routing(4, 4, 3, seed=1).double().eval()
OBJECTS = {  # name: (selector object, its reference on the graph's lengths: the plain function, kept to the graph)
    "topk": (TopK(3), lambda q, k, g, lens: brute_topk(q, k, 3, lens, lens, allowed=g)),
    "topk_causal": (
        TopK(2, causal=True),
        lambda q, k, g, lens: brute_topk(q, k, 2, lens, lens, causal=True, allowed=g),
    ),
    "block_topk": (BlockTopK(2, 1), lambda q, k, g, lens: _within(_triples(*block_topk(q, k, 2, 1, lengths=lens)), g)),
    "block_topk_causal": (
        BlockTopK(3, 1, causal=True),
        lambda q, k, g, lens: _within(_triples(*block_topk(q, k, 3, 1, causal=True, lengths=lens)), g),
    ),
    "lsh": (
        LSH(4, num_hashes=2, chunk_size=2, seed=3),
        lambda q, k, g, lens: _within(_triples(*lsh(q, k, 4, num_hashes=2, chunk_size=2, seed=3, lengths=lens)), g),
    ),
    "lsh_causal": (
        LSH(2, chunk_size=3, causal=True),
        lambda q, k, g, lens: _within(_triples(*lsh(q, k, 2, chunk_size=3, causal=True, lengths=lens)), g),
    ),
    "routing": (ROUTER, lambda q, k, g, lens: _within(_triples(*routing(q, k, ROUTER.centroids, lengths=lens)), g)),
}
GRAPHS = {  # name: (graph on 12 nodes, its sequences)
    "causal": (T.causal([5, 7]).as_tensor(), [5, 7]),
    "full": (T.full([5, 7]).as_tensor(), [5, 7]),
    "window": (T.sliding_window([5, 7], 2).as_tensor(), [5, 7]),
    "causal_window": (T.sliding_window(12, 1, causal=True).as_tensor(), [12]),
    "isolated_node": (
        T.full([5, 4, 1, 2]).as_tensor()[:, (T.full([5, 4, 1, 2]).as_tensor() != 9).all(0)],
        [5, 4, 1, 2],
    ),  # node 9 has no edge: a sequence of its own, and no selected edge
}


@pytest.mark.parametrize("name", OBJECTS)
@pytest.mark.parametrize("graph", GRAPHS)
def test_selector_object_equals_the_function_within_the_graph(name, graph):
    edge_index, lengths = GRAPHS[graph]
    assert brute_lengths(edge_index, 12) == lengths
    select, reference = OBJECTS[name]
    q, k = _randn(12, 4, 4), _randn(12, 2, 4, seed=1)
    chosen, chosen_head = select(q, k, edge_index)
    assert _triples(chosen, chosen_head) == reference(q, k, edge_index, lengths)
    assert_format(chosen, chosen_head, 4, lengths)


@pytest.mark.parametrize("name", OBJECTS)
def test_selector_object_ignores_the_order_duplicates_and_type_of_the_graph(name):
    select, _ = OBJECTS[name]
    q, k = _randn(12, 4, 4), _randn(12, 2, 4, seed=1)
    graph = T.sliding_window([5, 7], 2)
    plain = graph.as_tensor()
    shuffled = torch.cat([plain, plain[:, :9]], dim=1)[:, torch.randperm(plain.size(1) + 9)]
    want = select(q, k, plain)
    for other in (graph, shuffled):
        got = select(q, k, other)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_selector_object_on_an_empty_graph_selects_nothing():
    q, k = _randn(6, 2, 4), _randn(6, 2, 4, seed=1)
    for select, _ in OBJECTS.values():
        if isinstance(select, Routing):
            select = Routing(2, 4, 3).double().eval()
        for n in (6, 0):
            edge_index, edge_head = select(q[:n], k[:n], torch.empty(2, 0, dtype=torch.long))
            assert edge_index.shape == (2, 0) and edge_head.shape == (0,)


def test_block_topk_object_takes_sequences_shorter_than_a_block_as_one_block():
    q, k = _randn(12, 4, 4), _randn(12, 2, 4, seed=1)
    edge_index, edge_head = BlockTopK(64, 1)(q, k, T.sliding_window([5, 7], 2))
    assert _triples(edge_index, edge_head) == _within(
        _triples(*T.heads.per_head([T.full([5, 7])] * 4)), T.sliding_window([5, 7], 2).as_tensor()
    )


def test_topk_object_takes_a_bipartite_graph():
    q, k = _randn(5, 4, 4), _randn(7, 2, 4, seed=1)
    graph = _allowed(7, 5, 20, seed=2)[0]
    edge_index, edge_head = TopK(2)(q, k, graph)
    assert _triples(edge_index, edge_head) == brute_topk(q, k, 2, [5], [7], allowed=graph)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["full", "causal"])
def test_topk_object_scores_full_and_causal_sequences_by_blocks_of_queries(monkeypatch, kind, causal):
    # a graph of exactly full or causal attention per sequence (an edge list, or an implicit graph
    # that says so) is scored as topk(lengths=...) is, never per edge; one edge less is scored per edge
    lengths = [6, 1, 9]
    q, k = _ints(16, 4, 2, seed=10), _ints(16, 2, 2, seed=11)
    build = T.full if kind == "full" else T.causal
    plain = build(lengths).as_tensor()
    expected = brute_topk(q, k, 3, lengths, lengths, causal=causal, allowed=plain)
    per_edge = TOPK_MODULE._allowed_topk
    with monkeypatch.context() as m:
        m.setattr(TOPK_MODULE, "_allowed_topk", lambda *a, **kw: pytest.fail("scored per edge"))
        for graph in (plain, build(lengths), build(lengths, implicit=True)):
            assert _triples(*TopK(3, causal=causal)(q, k, graph)) == expected
    calls = []
    monkeypatch.setattr(TOPK_MODULE, "_allowed_topk", lambda *a, **kw: calls.append(1) or per_edge(*a, **kw))
    fewer = plain[:, 1:]
    assert _triples(*TopK(3, causal=causal)(q, k, fewer)) == brute_topk(
        q, k, 3, lengths, lengths, causal=causal, allowed=fewer
    )
    assert calls == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", OBJECTS)
def test_selector_objects_on_cuda_match_cpu(name):
    select = OBJECTS[name][0]
    q, k = _randn(12, 4, 4), _randn(12, 2, 4, seed=1)
    graph = T.sliding_window([5, 7], 2)
    cpu = select(q, k, graph)
    if isinstance(select, Routing):
        select = Routing(4, 4, 3, seed=1).double().eval().cuda()
    gpu = select(q.cuda(), k.cuda(), graph.cuda())
    assert gpu[0].device.type == "cuda" and torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
    assert sequence_lengths(graph.cuda(), 12) == [5, 7]


@pytest.mark.parametrize("name", ["block_topk", "lsh", "routing"])
def test_selector_objects_of_sequences_refuse_a_bipartite_graph(name):
    select = OBJECTS[name][0]
    q, k = _randn(5, 4, 4), _randn(7, 2, 4, seed=1)
    with pytest.raises(ValueError, match=re.escape(f"{select!r} selects on a self-attention graph only")) as info:
        select(q, k, _allowed(7, 5, 20, seed=2)[0])
    assert "q.size(0)=5, k.size(0)=7" in str(info.value)


def test_routing_object_takes_its_causal_default_from_the_constructor():
    q, k = _randn(9, 4, 4), _randn(9, 2, 4, seed=1)
    router = Routing(4, 4, 3, causal=True).double().eval()
    want = routing(q, k, router.centroids, causal=True, lengths=[4, 5])
    for got in (router(q, k, lengths=[4, 5]), router(q, k, T.full([4, 5]))):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert router(q, k, causal=False)[0].size(1) > want[0].size(1)


@pytest.mark.parametrize(
    "select, text",
    [
        (TopK(64, causal=True), "TopK(num_keys=64, causal=True)"),
        (BlockTopK(64, 8), "BlockTopK(block_size=64, num_blocks=8, causal=False)"),
        (LSH(8, num_hashes=2), "LSH(num_buckets=8, num_hashes=2, chunk_size=64, seed=0, causal=False)"),
        (
            Routing(4, 16, 8, seed=3, causal=True),
            "Routing(num_heads=4, head_dim=16, num_clusters=8, decay=0.999, seed=3, causal=True)",
        ),
    ],
    ids=lambda x: type(x).__name__ if not isinstance(x, str) else "",
)
def test_selector_object_repr(select, text):
    assert repr(select) == text


OBJECT_BAD = [
    (lambda: TopK(0), "'num_keys'", "(got 0)"),
    (lambda: TopK(2.0), "'num_keys'", "2.0"),
    (lambda: TopK(2, causal=1), "'causal'", "(got 1)"),
    (lambda: BlockTopK(0, 1), "'block_size'", "(got 0)"),
    (lambda: BlockTopK(2, -1), "'num_blocks'", "(got -1)"),
    (lambda: LSH(3), "'num_buckets'", "(got 3)"),
    (lambda: LSH(4, num_hashes=0), "'num_hashes'", "(got 0)"),
    (lambda: LSH(4, chunk_size=0), "'chunk_size'", "(got 0)"),
    (lambda: LSH(4, seed=-1), "'seed'", "(got -1)"),
    (lambda: Routing(2, 2, 2, causal="yes"), "'causal'", "'yes'"),
    (lambda: TopK(1)(Q, K, torch.zeros(2, 3)), "'edge_index'", "torch.float32"),
    (lambda: TopK(1)(Q, K, torch.tensor([[0, 4], [0, 0]])), "'edge_index'", "[0, 4]"),
    (lambda: LSH(2)(Q, K, torch.tensor([[0], [0], [0]])), "'edge_index'", "(3, 1)"),
    (lambda: BlockTopK(1, 1)(Q, K, EdgeIndex(torch.tensor([[0], [0]]), sparse_size=(5, 5))), "'edge_index'", "(5, 5)"),
    (lambda: Routing(4, 2, 2)(Q, K, torch.tensor([[0], [0]]), lengths=[4]), "'lengths'", "[4]"),
    (lambda: sequence_lengths(torch.tensor([[0], [3]]), 3), "'edge_index'", "[3, 3]"),
    (lambda: sequence_lengths(torch.tensor([[0], [0]]), -1), "'num_nodes'", "(got -1)"),
]


@pytest.mark.parametrize(
    "call, name, value", BAD + OBJECT_BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD + OBJECT_BAD)]
)
def test_bad_inputs_name_the_argument_and_the_value(call, name, value):
    with pytest.raises(ValueError) as info:
        call()
    assert name in str(info.value) and value in str(info.value), str(info.value)


def test_selector_object_arguments_after_the_sizes_are_keyword_only():
    with pytest.raises(TypeError):
        TopK(2, True)
    with pytest.raises(TypeError):
        LSH(4, 2)


# ---------------------------------------------------------------- selectors by name
@pytest.mark.parametrize(
    "spec, want",
    [
        ("topk:num_keys=64", TopK(64)),
        ("topk:num_keys=64,causal=true", TopK(64, causal=True)),
        ("block_topk:block_size=64,num_blocks=8,causal=true", BlockTopK(64, 8, causal=True)),
        ("lsh:num_buckets=8,num_hashes=2", LSH(8, num_hashes=2)),
        (
            " lsh : num_buckets = 8 , chunk_size=+16, seed=12345678901234567 , causal=false ",
            LSH(8, chunk_size=16, seed=12345678901234567),
        ),
        ({"name": "topk", "num_keys": 64}, TopK(64)),
        ({"name": "block_topk", "block_size": 4, "num_blocks": 0, "causal": True}, BlockTopK(4, 0, causal=True)),
        (
            {"name": "lsh", "num_buckets": 2, "num_hashes": 3, "chunk_size": 5, "seed": 7, "causal": True},
            LSH(2, num_hashes=3, chunk_size=5, seed=7, causal=True),
        ),
    ],
    ids=str,
)
def test_selector_by_name_equals_the_object(spec, want):
    got = selector(spec, num_heads=4, head_dim=8)  # the sizes are ignored but by routing
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize(
    "spec, decay, seed, causal",
    [
        ("routing:num_clusters=3", 0.999, 0, False),
        ("routing:num_clusters=3,decay=0.5,seed=4,causal=true", 0.5, 4, True),
        ("routing:num_clusters=3,decay=1,seed=4", 1.0, 4, False),
        ("routing:num_clusters=3,decay=25e-3", 0.025, 0, False),
        ({"name": "routing", "num_clusters": 3, "decay": 0.5, "seed": 4, "causal": True}, 0.5, 4, True),
        ({"name": "routing", "num_clusters": 3, "decay": 1}, 1.0, 0, False),
    ],
    ids=str,
)
def test_selector_routing_by_name_holds_fresh_centroids(spec, decay, seed, causal):
    router = selector(spec, num_heads=2, head_dim=8)
    want = Routing(2, 8, 3, decay=decay, seed=seed, causal=causal)
    assert isinstance(router, Routing) and repr(router) == repr(want)
    assert router.decay == decay and router.seed == seed and router.causal is causal
    assert torch.equal(router.centroids, want.centroids) and router.centroids.shape == (2, 3, 8)


def test_selector_parameters_are_typed():
    select = selector("lsh:num_buckets=8,seed=12345678901234567,causal=false")
    assert type(select.num_buckets) is int and select.seed == 12345678901234567 and select.causal is False
    assert type(selector("routing:num_clusters=2,decay=1", num_heads=1, head_dim=2).decay) is float


def test_selectors_names_every_selector():
    required = {
        "topk": "num_keys=1",
        "block_topk": "block_size=1,num_blocks=0",
        "lsh": "num_buckets=2",
        "routing": "num_clusters=1",
    }
    assert set(SELECTORS) == set(required)
    for name in SELECTORS:
        assert callable(selector(f"{name}:{required[name]}", num_heads=2, head_dim=4))


SPEC_BAD = [  # (spec, what the message names besides the spec)
    ("top_k:num_keys=4", ["'name'", "'top_k'"]),
    ({"name": "top_k", "num_keys": 4}, ["'name'", "'top_k'"]),
    ({"name": 3}, ["'name'", "(got 3)"]),
    ({"num_keys": 4}, ["'name'", "['num_keys']"]),
    ("topk:num_keys=4,k=3", ["'k'", "k='3'"]),
    ({"name": "topk", "num_keys": 4, "chunk": 8}, ["'chunk'", "chunk=8"]),
    ("topk:num_keys=1.5", ["'num_keys'", "num_keys='1.5'"]),
    ("topk:num_keys=true", ["'num_keys'", "num_keys='true'"]),
    ("topk:num_keys=4,causal=1", ["'causal'", "causal='1'"]),
    ("topk:num_keys=4,causal=True", ["'causal'", "causal='True'"]),
    ("topk:num_keys=__import__('os')", ["'num_keys'", "__import__"]),
    ("routing:num_clusters=2,decay=nan", ["'decay'", "decay='nan'"]),
    ({"name": "topk", "num_keys": True}, ["'num_keys'", "num_keys=True"]),
    ({"name": "topk", "num_keys": 4.0}, ["'num_keys'", "num_keys=4.0"]),
    ({"name": "topk", "num_keys": "4"}, ["'num_keys'", "num_keys='4'"]),
    ({"name": "topk", "num_keys": 4, "causal": 1}, ["'causal'", "causal=1"]),
    ({"name": "routing", "num_clusters": 2, "decay": "0.5"}, ["'decay'", "decay='0.5'"]),
    ("topk:num_keys=0", ["'num_keys'", "(got 0)"]),
    ("lsh:num_buckets=3", ["'num_buckets'", "(got 3)"]),
    ("routing:num_clusters=2,decay=1.5", ["'decay'", "1.5"]),
    ("block_topk:block_size=4", ["'num_blocks'"]),
    ("topk", ["'num_keys'"]),
    ("topk:num_keys", ["'num_keys'"]),
    ("topk:num_keys=", ["'num_keys='"]),
    ("topk:num_keys=2,num_keys=3", ["'num_keys'", "num_keys=2", "num_keys=3"]),
]


@pytest.mark.parametrize("spec, names", SPEC_BAD, ids=[f"{i}" for i in range(len(SPEC_BAD))])
def test_selector_bad_specs_name_the_spec_the_key_and_the_value(spec, names):
    with pytest.raises(ValueError) as info:
        selector(spec, num_heads=2, head_dim=4)
    message = str(info.value)
    assert repr(spec) in message and all(name in message for name in names), message


@pytest.mark.parametrize("sizes", [{}, {"num_heads": 2}, {"head_dim": 4}], ids=str)
def test_selector_routing_needs_the_sizes(sizes):
    with pytest.raises(
        ValueError, match=re.escape("'routing:num_clusters=2': routing needs the layer's 'num_heads' and 'head_dim'")
    ):
        selector("routing:num_clusters=2", **sizes)


def test_selector_routing_refuses_bad_sizes_naming_the_spec():
    with pytest.raises(ValueError, match=re.escape("'routing:num_clusters=2': Expected 'num_heads' >= 1 (got 0)")):
        selector("routing:num_clusters=2", num_heads=0, head_dim=4)


@pytest.mark.parametrize("spec", [3, None, ["topk", 3]], ids=str)
def test_selector_refuses_a_spec_of_another_type(spec):
    message = (
        "Expected 'spec' to be a string such as 'topk:num_keys=64' or a mapping such as {'name': 'topk', "
        f"'num_keys': 64}} (got {spec!r})"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        selector(spec)


def test_topk_cross_attention_batch_with_a_sequence_of_keys_only():
    # key sequence 1 has no query: query sequence 2 still reads the keys of sequence 2 only
    bq, bk = torch.tensor([0, 0, 2, 2]), torch.tensor([0, 1, 1, 2, 2])
    q, k = _ints(4, 2, 2, seed=3), _ints(5, 1, 2, seed=4)
    edge_index, edge_head = topk(q, k, 3, batch=(bq, bk))
    assert _triples(edge_index, edge_head) == brute_topk(q, k, 3, [2, 0, 2], [1, 2, 2])
    assert_format(edge_index, edge_head, 2, [2, 0, 2], [1, 2, 2])


@pytest.mark.parametrize(
    "name, param",
    [("topk", "num_keys"), ("block_topk", "block_size"), ("lsh", "num_buckets"), ("routing", "num_clusters")],
)
@pytest.mark.parametrize("as_mapping", [False, True])
def test_selector_without_its_required_parameter_is_a_value_error(name, param, as_mapping):
    spec = {"name": name} if as_mapping else name
    with pytest.raises(ValueError) as info:
        selector(spec, num_heads=2, head_dim=4)
    assert repr(spec) in str(info.value) and f"missing parameter '{param}'" in str(info.value)


@pytest.mark.parametrize("decay", [True, False])
def test_selector_decay_is_no_boolean(decay):
    spec = {"name": "routing", "num_clusters": 2, "decay": decay}
    with pytest.raises(ValueError) as info:
        selector(spec, num_heads=2, head_dim=4)
    assert "'decay'" in str(info.value) and f"decay={decay}" in str(info.value)


def test_routing_module_centroids_are_the_seeded_normal_normalized():
    for seed in (0, 7):
        want = torch.nn.functional.normalize(
            torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(seed)), dim=-1
        )
        assert torch.equal(Routing(2, 4, 3, seed=seed).centroids, want)
    assert not torch.equal(Routing(2, 4, 3, seed=0).centroids, Routing(2, 4, 3, seed=7).centroids)


@pytest.mark.parametrize("lengths", [([4], [3]), ([4], [5]), ([2, 2], [1, 2])], ids=str)
def test_topk_refuses_key_lengths_that_do_not_sum_to_the_keys(lengths):
    q, k = _randn(4, 2, 2), _randn(4, 1, 2, seed=1)
    with pytest.raises(ValueError) as info:
        topk(q, k, 1, lengths=lengths)
    assert "'lengths'" in str(info.value) and "k.size(0)=4" in str(info.value)


def test_routing_object_call_overrides_its_causal_default():
    q, k = _randn(9, 4, 4), _randn(9, 2, 4, seed=1)
    for default in (False, True):
        router = Routing(4, 4, 3, causal=default).double().eval()
        for causal in (False, True):
            want = routing(q, k, router.centroids, causal=causal, lengths=[4, 5])
            for got in (router(q, k, causal=causal, lengths=[4, 5]), router(q, k, T.full([4, 5]), causal=causal)):
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
