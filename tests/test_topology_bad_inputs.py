"""Bad and extreme inputs of the topology builders and specs (issue 18, items 5, 9, 16, 18): sizes
near 2**63 give the graph they saturate to, graphs over the edge budget are refused before any
allocation, seeds follow one rule, and malformed spec files give a ValueError naming the file."""

import os
import re
from functools import partial

import pytest
import torch
from torch_geometric import EdgeIndex

from gnn_transformer import topology as T
from gnn_transformer.topology import _common
from gnn_transformer.dense.attention import edge_values_to_dense
from gnn_transformer.padding import padding_mask
from gnn_transformer.topology import specs

HUGE = [2**63 - 1, 2**63, 2**64, 2**100]


def _same(a, b):
    assert a.sparse_size() == b.sparse_size()
    assert torch.equal(a.as_tensor(), b.as_tensor())


# ---------------------------------------------------------------- item 5: sizes near 2**63
@pytest.mark.parametrize("big", HUGE)
@pytest.mark.parametrize("n", [5, [4, 1, 6], 0])
@pytest.mark.parametrize(
    "case",
    [
        ("sliding_window", lambda n, w: T.sliding_window(n, w), T.full),
        ("sliding_window causal", lambda n, w: T.sliding_window(n, w, causal=True), T.causal),
        ("dilated window", lambda n, w: T.dilated(n, w, 1), T.full),
        ("dilated window causal", lambda n, w: T.dilated(n, w, 1, causal=True), T.causal),
        ("dilated dilation", lambda n, d: T.dilated(n, 3, d), lambda n: T.sliding_window(n, 0)),
        ("bigbird window", lambda n, w: T.bigbird(n, block=2, window=w, num_global=0, num_random=0), T.full),
        ("bigbird block", lambda n, b: T.bigbird(n, block=b, window=0, num_global=0, num_random=3), T.full),
        ("bigbird global", lambda n, g: T.bigbird(n, block=2, window=0, num_global=g, global_at="ends"), T.full),
        ("bigbird random", lambda n, r: T.bigbird(n, block=1, window=0, num_global=0, num_random=r), T.full),
        ("global_tokens window", lambda n, w: T.global_tokens(n, 1, window=w), T.full),
        ("global_tokens num_global", lambda n, g: T.global_tokens(n, g), T.full),
        ("strided", lambda n, s: T.strided(n, s), T.causal),
        ("fixed block", lambda n, b: T.fixed(n, b, 0, causal=False), T.full),
        ("fixed block and summaries", lambda n, b: T.fixed(n, b, b), T.causal),
        ("prefix_lm", lambda n, p: T.prefix_lm(n, p), T.full),
        ("expander degree", lambda n, d: T.expander(n, d, self_loops=True), T.full),
    ],
    ids=lambda c: c[0],
)
def test_huge_size_saturates(case, n, big):
    _, build, saturated = case
    _same(build(n, big), saturated(n))


@pytest.mark.parametrize("big", HUGE)
@pytest.mark.parametrize("mode", ["window", "monotonic"])
@pytest.mark.parametrize("n_q, n_k", [(3, 5), (5, 3), ([2, 4], [7, 1]), (1, 0)])
def test_cross_huge_window_is_full(mode, n_q, n_k, big):
    _same(T.cross(n_q, n_k, mode=mode, window=big), T.cross(n_q, n_k))


@pytest.mark.parametrize(
    "case",
    [
        (partial(T.sliding_window, window=2**63 - 1), partial(T.sliding_window_predicate, window=2**63 - 1)),
        (partial(T.dilated, window=2**64, dilation=3), partial(T.dilated_predicate, window=2**64, dilation=3)),
        (partial(T.dilated, window=2, dilation=2**64), partial(T.dilated_predicate, window=2, dilation=2**64)),
        (
            partial(T.global_tokens, num_global=2**63, window=1),
            partial(T.global_tokens_predicate, num_global=2**63, window=1),
        ),
        (partial(T.strided, stride=2**64), partial(T.strided_predicate, stride=2**64)),
        (
            partial(T.fixed, block=2**64, num_summary=2**64 - 3),
            partial(T.fixed_predicate, block=2**64, num_summary=2**64 - 3),
        ),
        (partial(T.prefix_lm, prefix=2**64), partial(T.prefix_lm_predicate, prefix=2**64)),
        (partial(T.bigbird, block=2**64, window=0, num_random=0), partial(T.bigbird_predicate, block=2**64, window=0)),
    ],
    ids=lambda c: f"{c[0].func.__name__}{sorted(c[0].keywords.items())}",
)
@pytest.mark.parametrize("n", [1, 6])
def test_huge_size_matches_predicate_twin(case, n):
    build, predicate = case
    _same(build(n), T.from_predicate(n, predicate))


def test_cross_positions_that_overflow_int64_are_refused():
    with pytest.raises(ValueError, match=r"n_q=3 and n_k=4611686018427387904"):
        T.cross(3, 2**62, mode="window")


def test_edge_keys_that_overflow_int64_are_refused():
    g = EdgeIndex(torch.tensor([[1], [2**32]]), sparse_size=(2**33, 2**33))
    for combine in (T.union, T.intersection):
        with pytest.raises(ValueError, match=r"8589934592 sources x 8589934592 targets"):
            combine(g)


# ---------------------------------------------------------------- item 9: the edge budget
@pytest.mark.parametrize(
    "build, name, n, edges",
    [
        (lambda: T.full(10**6), "full", "n=1000000", 10**12),
        (lambda: T.causal([10**6] * 3), "causal", r"n=\[1000000, 1000000, 1000000\]", 3 * (10**6 * (10**6 + 1) // 2)),
        (
            lambda: T.causal([10**5] * 1000),
            "causal",
            r"n=\[100000, 100000, \.\.\., 100000\] \(1000 sequences, 100000000 tokens\)",
            1000 * (10**5 * (10**5 + 1) // 2),
        ),
        (lambda: T.random(10**6, 10**6), "random", "n=1000000", 10**12),
        (
            lambda: T.sliding_window(10**7, 10**6),
            "sliding_window",
            "n=10000000",
            10**7 * (2 * 10**6 + 1) - 10**6 * (10**6 + 1),
        ),
        (
            lambda: T.dilated(10**7, 10**6, 2, causal=True),
            "dilated",
            "n=10000000",
            (10**6 + 1) * 10**7 - 2 * 10**6 * (10**6 + 1) // 2,
        ),
        (lambda: T.global_tokens(10**6, 10**6), "global_tokens", "n=1000000", 10**12),
        (lambda: T.prefix_lm(10**6, 10**6), "prefix_lm", "n=1000000", 10**12),
        (lambda: T.document(10**6, 10**6), "document", "n=1000000", 10**12),
        (lambda: T.document(10**6, [10**6]), "document", "n=1000000", 10**12),
        (lambda: T.cross(10**6, 10**6), "cross", "n_q=1000000, n_k=1000000", 10**12),
        (lambda: T.erdos_renyi(10**6), "erdos_renyi", "num_src=1000000, num_dst=1000000", 10**12),
    ],
    ids=lambda v: v if isinstance(v, str) and v.isidentifier() else None,
)
def test_graph_over_the_budget_is_refused_before_allocating(build, name, n, edges):
    with pytest.raises(
        ValueError,
        match=rf"^{name}: {n} would need {edges} edges, more than the edge "
        rf"budget max_edges={T.DEFAULT_MAX_EDGES}.*max_edges\(",
    ):
        build()


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: T.bigbird(10**8, block=64, window=1, num_global=2, num_random=3), "bigbird"),
        (lambda: T.strided(10**7, 1000), "strided"),
        (lambda: T.fixed(10**6, 1000, 10), "fixed"),
        (lambda: T.star(10**9), "star"),
        (lambda: T.expander(10**6, 10**5), "expander"),
        (lambda: T.cross(10**6, 10**6, mode="monotonic"), "cross"),
        (lambda: T.cross(10**8, 10**6, mode="window", window=100), "cross"),
    ],
)
def test_linear_and_sparse_builders_are_refused_too(build, name):
    with pytest.raises(ValueError, match=rf"^{name}: n.*would need \d+ edges.*max_edges={T.DEFAULT_MAX_EDGES}"):
        build()


def test_load_names_the_file_and_the_edges():
    with pytest.raises(
        ValueError,
        match=r"full\.toml: cannot build for n=1000000: full: n=1000000 would "
        r"need 1000000000000 edges",
    ):
        T.load("full", 10**6)


def _needed(build) -> int:
    """Edges a builder counts before building (0 when it does not refuse an empty budget)."""
    with T.max_edges(0):
        try:
            build()
        except ValueError as e:
            found = re.search(r"would need (\d+) edges|has \d+ tokens \((\d+) edges\)", str(e))
            return int(found.group(1) or found.group(2))
    return 0


EXACT = {
    "full": lambda n, a, c: T.full(n),
    "causal": lambda n, a, c: T.causal(n),
    "sliding_window": lambda n, a, c: T.sliding_window(n, a, causal=c),
    "dilated": lambda n, a, c: T.dilated(n, a, a % 3 + 1, causal=c),
    "global_tokens": lambda n, a, c: T.global_tokens(n, a % 3, window=a if c else None),
    "random": lambda n, a, c: T.random(n, min([a] + [L for L in ([n] if isinstance(n, int) else n) if L])),
    "prefix_lm": lambda n, a, c: T.prefix_lm(n, a),
    "document": lambda n, a, c: T.document(n, a + 1, causal=c),
    "cross full": lambda n, a, c: T.cross(n, n, mode="full"),
    "expander": lambda n, a, c: T.expander(n, 2 * a, self_loops=c),
}
BOUNDED = {  # the builder merges overlapping parts: the count bounds the parts it allocates
    "bigbird": lambda n, a, c: T.bigbird(
        n, block=a + 1, window=a % 2, num_global=a % 3, num_random=2, global_at="ends" if c else "start"
    ),
    "strided": lambda n, a, c: T.strided(n, a + 1, causal=c),
    "fixed": lambda n, a, c: T.fixed(n, a + 1, a % (a + 2), causal=c),
    "star": lambda n, a, c: T.star(n, ring=c),
    "cross window": lambda n, a, c: T.cross(n, n, mode="window", window=a),
    "cross monotonic": lambda n, a, c: T.cross(n, n, mode="monotonic", window=a),
}
SIZES = [0, 1, 2, 5, 13, [3, 0, 8], [1, 1]]


@pytest.mark.parametrize("name", sorted(EXACT))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("a", [0, 1, 2, 4, 20])
@pytest.mark.parametrize("n", SIZES, ids=str)
def test_edge_count_is_exact(name, n, a, causal):
    ei = EXACT[name](n, a, causal)
    assert _needed(partial(EXACT[name], n, a, causal)) == ei.size(1)
    tokens = (n if isinstance(n, int) else sum(n)) * (2 if name == "cross full" else 1)
    limit = max(ei.size(1), tokens)
    with T.max_edges(limit):  # exactly at the budget: built
        _same(EXACT[name](n, a, causal), ei)
    if limit > 0:
        with T.max_edges(limit - 1), pytest.raises(ValueError, match=rf"^{name.split()[0]}: n"):
            EXACT[name](n, a, causal)


@pytest.mark.parametrize("name", sorted(BOUNDED))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("a", [0, 1, 2, 4, 20])
@pytest.mark.parametrize("n", SIZES, ids=str)
def test_edge_count_bounds_the_graph_tightly(name, n, a, causal):
    edges = BOUNDED[name](n, a, causal).size(1)
    assert edges <= _needed(partial(BOUNDED[name], n, a, causal)) <= 2 * edges


def test_budget_is_scoped_and_restored():
    with T.max_edges(5):
        with pytest.raises(ValueError, match=r"causal: n=3 would need 6 edges, more than the edge budget max_edges=5"):
            T.causal(3)
        with T.max_edges(None):  # no limit
            assert T.causal(3).size(1) == 6
        with pytest.raises(ValueError, match="max_edges=5"):
            T.causal(3)
    assert T.causal(3).size(1) == 6
    with pytest.raises(ValueError, match=rf"max_edges={T.DEFAULT_MAX_EDGES}"):  # the default is back
        T.full(10**6)


def test_budget_is_restored_after_an_error():
    with pytest.raises(RuntimeError):
        with T.max_edges(0):
            raise RuntimeError("in the block")
    assert T.causal(3).size(1) == 6


def test_budget_applies_to_spec_parts():
    with T.max_edges(36):  # global token and window 2: 11 + 19 edges on 6 tokens, 13 + 24 on 7
        assert T.load("longformer", 6, small=True).size(1) == 30
        with pytest.raises(
            ValueError,
            match=r"longformer\.toml: cannot build for n=7: "
            r"global_tokens: n=7 would need 37 edges",
        ):
            T.load("longformer", 7, small=True)


@pytest.mark.parametrize(
    "build, name, n",
    [
        (lambda: T.global_tokens(10**10, 0), "global_tokens", "n=10000000000"),
        (lambda: T.random([10**10, 5], 0), "random", r"n=\[10000000000, 5\]"),
        (lambda: T.cross(10**10, 0), "cross", "n_q=10000000000, n_k=0"),
    ],
)
def test_many_tokens_without_edges_are_refused(build, name, n):
    with pytest.raises(ValueError, match=rf"^{name}: {n} has \d+ tokens \(0 edges\), more than the edge budget"):
        build()


def test_budget_ceiling_keeps_the_benchmark_sizes():
    # bench's default sizes go up to 65536 tokens of causal (and full) attention
    ceiling = _common.EDGE_CEILING
    assert _needed(lambda: T.causal(65536)) <= ceiling
    assert _needed(lambda: T.full(65536)) <= ceiling
    assert _needed(lambda: T.sliding_window(2**20, 128)) <= ceiling
    assert _needed(lambda: T.bigbird(2**20, block=64, window=1, num_global=2, num_random=3)) <= ceiling
    assert _needed(lambda: T.causal(131072)) > ceiling  # 137 GB as an edge list


def test_default_budget_is_what_this_machine_can_build(monkeypatch):
    """2**32 edges, or this machine's memory over 48 bytes an edge (a builder's peak): a graph the
    machine cannot build is refused, not killed by the system."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert T.DEFAULT_MAX_EDGES == min(2**32, memory // 48)
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 2**20}[name])
    assert _common._machine_edges() == 4 * 2**30 // 48  # 4 GiB
    monkeypatch.setattr(os, "sysconf", lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert _common._machine_edges() == 2**32


@pytest.mark.parametrize("limit", [-1, 1.5, "10", True])
def test_bad_budget_names_the_argument(limit):
    with pytest.raises(ValueError, match=rf"'limit'.*{re.escape(repr(limit))}"):
        with T.max_edges(limit):
            pass


# ---------------------------------------------------------------- item 16: one rule for seeds
SEEDED = {
    "random": lambda seed: T.random(5, 2, seed=seed),
    "bigbird": lambda seed: T.bigbird(8, block=2, seed=seed),
    "expander": lambda seed: T.expander(6, 2, seed=seed),
    "erdos_renyi": lambda seed: T.erdos_renyi(4, p=0.5, seed=seed),
}


@pytest.mark.parametrize("name", sorted(SEEDED))
@pytest.mark.parametrize(
    "seed, message",
    [
        (2**64, r"Expected 'seed' <= 9223372036854775807 \(got 18446744073709551616\)"),
        (2**63, r"Expected 'seed' <= 9223372036854775807 \(got 9223372036854775808\)"),
        (-1, r"Expected 'seed' >= 0 \(got -1\)"),
        (True, r"Expected 'seed' to be an int \(got True\)"),
        (None, r"Expected 'seed' to be an int \(got None\)"),
        (1.0, r"Expected 'seed' to be an int \(got 1.0\)"),
        ("0", r"Expected 'seed' to be an int \(got '0'\)"),
    ],
)
def test_bad_seed_names_the_argument(name, seed, message):
    with pytest.raises(ValueError, match=message):
        SEEDED[name](seed)


@pytest.mark.parametrize("name", sorted(SEEDED))
def test_largest_seed_is_accepted_and_fixes_the_graph(name):
    _same(SEEDED[name](2**63 - 1), SEEDED[name](2**63 - 1))
    _same(SEEDED[name](0), SEEDED[name](0))


@pytest.mark.parametrize("builder", ["random", "bigbird", "expander"])
@pytest.mark.parametrize("seed", [-(2**63), -1, 0, 2**63 - 1, 2**63, 2**64])
def test_specs_and_builders_accept_the_same_seeds(builder, seed):
    params = {"random": {"k": 2}, "bigbird": {}, "expander": {"degree": 2}}[builder]
    try:
        specs.check_params(builder, {**params, "seed": seed}, "spec")
        spec_ok = True
    except ValueError as e:
        assert "key 'seed'" in str(e) and str(seed) in str(e)
        spec_ok = False
    try:
        T.BUILDERS[builder].fn(6, **params, seed=seed)
        builder_ok = True
    except ValueError as e:
        assert "'seed'" in str(e) and str(seed) in str(e)
        builder_ok = False
    assert spec_ok == builder_ok == (0 <= seed <= 2**63 - 1)


# ---------------------------------------------------------------- item 18: malformed spec files
def _write(tmp_path, data: bytes | str, name="spec.toml"):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def test_non_utf8_spec_names_the_file(tmp_path):
    path = _write(tmp_path, b'builder = "causal"\ndescription = "caf\xe9"\n')
    for read in (T.read_spec, lambda p: T.load(p, 4)):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not UTF-8 text \(byte 0xe9 at offset 37\)"):
            read(path)


def _nested_headers(depth: int) -> str:
    """A union whose parts nest ``depth`` levels deep, written with [[...parts]] headers."""
    lines, key = ['builder = "union"'], "parts"
    for _ in range(depth - 1):
        lines += [f"[[{key}]]", 'builder = "union"']
        key += ".parts"
    return "\n".join(lines + [f"[[{key}]]", 'builder = "causal"', ""])


def test_nesting_at_the_bound_loads(tmp_path):
    path = _write(tmp_path, _nested_headers(specs.MAX_DEPTH))
    _same(T.load(path, 4), T.causal(4))


@pytest.mark.parametrize("depth", [specs.MAX_DEPTH + 1, 200, 1000])
def test_nesting_beyond_the_bound_names_the_file_and_depth(tmp_path, depth):
    path = _write(tmp_path, _nested_headers(depth))
    with pytest.raises(
        ValueError,
        match=rf"^{re.escape(str(path))}: key '(parts\[0\]\.){{32}}parts': parts "
        rf"nested 33 levels deep, more than 32",
    ):
        T.load(path, 4)


@pytest.mark.parametrize("depth", [40, 250, 2000])
def test_inline_nesting_names_the_file(tmp_path, depth):
    part = '{builder = "causal"}'
    for _ in range(depth):
        part = '{builder = "union", parts = [%s]}' % part
    path = _write(tmp_path, 'builder = "union"\nparts = [%s]\n' % part)
    with pytest.raises(
        ValueError,
        match=rf"^{re.escape(str(path))}: .*(nested 33 levels deep, more than 32|"
        rf"nested too deeply to parse \(parts may nest 32 levels\))",
    ):
        T.read_spec(path)


def test_deeply_nested_params_name_the_file(tmp_path):
    path = _write(tmp_path, 'builder = "sliding_window"\n[params]\nwindow = ' + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: nested too deeply to parse"):
        T.read_spec(path)


def _per_head_mask(n, **options):
    edge_index, edge_head = T.dilated_per_head(n, 1, [1, 2])
    return T.to_dense_mask(edge_index, edge_head=edge_head, num_heads=2, **options)


DENSE = [
    ("to_dense_mask", lambda: T.to_dense_mask(T.causal(5), 5, 7), 35),
    ("to_dense_mask", lambda: _per_head_mask(6), 2 * 36),
    ("to_dense_mask", lambda: T.to_dense_mask(T.causal([3, 5]), lengths=[3, 5]), 2 * 25),
    ("to_dense_mask", lambda: _per_head_mask([3, 5], lengths=[3, 5]), 2 * 2 * 25),
    ("BlockGraph.to_dense", lambda: T.causal(20, implicit=True).to_dense(), 400),
    ("padding_mask", lambda: padding_mask([3, 9, 2]), 27),
    ("edge_values_to_dense", lambda: edge_values_to_dense(T.causal([2, 4]), torch.ones(13, 3), [2, 4]), 2 * 16 * 3),
]


@pytest.mark.parametrize("name,build,cells", DENSE, ids=[f"{d[0]}-{i}" for i, d in enumerate(DENSE)])
def test_dense_tensors_past_the_edge_budget_are_refused_before_allocating(name, build, cells):
    """A dense mask or padded batch counts its cells against the edge budget: built exactly at it,
    refused one below with the shape and the budget that would build it."""
    with T.max_edges(cells):
        assert build().numel() == cells
    with (
        T.max_edges(cells - 1),
        pytest.raises(ValueError, match=rf"^{re.escape(name)}: a dense \[.*\] would have {cells} cells"),
    ):
        build()


def test_huge_dense_masks_are_refused():
    with pytest.raises(ValueError, match=r"to_dense_mask: a dense \[10000000000, 10000000000\]"):
        T.to_dense_mask(torch.tensor([[0], [0]]), 10**10, 10**10)
    with pytest.raises(ValueError, match=r"padding_mask: a dense \[1, 1000000000000\]"):
        padding_mask([10**12])


@pytest.mark.parametrize(
    "n",
    [
        True,
        False,
        [2, True],
        torch.tensor([2.0, 3.0]),
        torch.tensor([2.5]),
        torch.tensor([True, False]),
        torch.tensor([[2, 3]]),
        "5",
        2.0,
    ],
    ids=repr,
)
@pytest.mark.parametrize(
    "build",
    [T.causal, T.full, lambda n: T.sliding_window(n, 1), lambda n: T.expander(n, 2), T.batch_vector, T.ptr_vector],
    ids=["causal", "full", "window", "expander", "batch_vector", "ptr_vector"],
)
def test_lengths_that_are_no_ints_are_refused(build, n):
    """A bool is not a length (True would read as 1), nor is a float, bool or 2-D tensor of them
    (expander and the batch vectors read the lengths once, with no later check to catch them)."""
    with pytest.raises(ValueError, match="'n'"):
        build(n)


def test_lengths_as_an_integer_tensor_are_accepted():
    _same(T.causal(torch.tensor([2, 0, 3])), T.causal([2, 0, 3]))
    _same(T.full(torch.tensor([4], dtype=torch.int32)), T.full(4))


def test_edge_keys_just_past_int64_are_refused_and_just_below_are_kept():
    n = 3037000500  # n * n just past 2**63 - 1: the largest edge key n * n - 1 does not fit in int64
    assert (n - 1) ** 2 <= 2**63 - 1 < n * n
    big = torch.tensor([[n - 1], [n - 1]])
    for combine in (T.union, T.intersection):
        with pytest.raises(ValueError, match=rf"{n} sources x {n} targets"):
            combine(big)
    fits = EdgeIndex(torch.tensor([[2**31 - 1], [2**32 - 2]]), sparse_size=(2**31, 2**32 - 1))  # 2**63 - 2**31 pairs
    for combine in (T.union, T.intersection):
        out = combine(fits)
        assert out.tolist() == [[2**31 - 1], [2**32 - 2]] and out.sparse_size() == (2**31, 2**32 - 1)
