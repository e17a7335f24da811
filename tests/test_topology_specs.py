"""The graphs/ catalogue: every spec loads, cites a source, matches its builder; bad specs give a
ValueError naming the file and the key."""

import re

import pytest
import torch

from gnn_transformer import topology as T
from gnn_transformer.topology import specs

NAMES = sorted(T.catalogue())
EXPECTED = {
    "full",
    "causal",
    "sliding_window",
    "longformer",
    "dilated",
    "bigbird",
    "random",
    "sparse_transformer_strided",
    "sparse_transformer_fixed",
    "star_transformer",
    "exphormer",
    "prefix_lm",
    "document",
}


def test_catalogue_has_the_named_topologies():
    assert EXPECTED <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_spec_cites_its_source_in_a_comment(name):
    text = T.catalogue()[name].read_text()
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "Source:" in comments
    assert re.search(r"(19|20)\d\d", comments)
    spec = T.read_spec(name)
    assert spec.name == name and spec.source and spec.description


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [1, 7, [5, 1, 9]])
def test_spec_builds_sorted_graph(name, n):
    N = sum(n) if isinstance(n, list) else n
    if name == "random" and min(n if isinstance(n, list) else [n]) < 3:
        with pytest.raises(ValueError, match="'k'"):  # 3 distinct keys need 3 tokens
            T.load(name, n)
        return
    built, small = T.load(name, n), T.load(name, small=True)
    spec = T.read_spec(name)
    pattern = built if spec.per_layer else specs.LayerPattern((built,))  # per-layer: each graph of the cycle
    small = small if spec.per_layer else specs.LayerPattern((small,))
    for layer in range(pattern.period):
        graph, small_graph = pattern(layer), small(layer)
        ei, heads = graph if isinstance(graph, tuple) else (graph, None)
        assert ei.sparse_size() == (N, N)
        if heads is None:
            assert ei.is_sorted_by_col and not T.is_multigraph(ei)
        else:  # sorted by (head, target), no duplicate within a head
            assert heads.max() < spec.num_heads and bool((heads[1:] >= heads[:-1]).all())
            key = (heads * N + ei[1]) * N + ei[0]
            assert bool((key[1:] > key[:-1]).all())
        assert (small_graph[0] if isinstance(small_graph, tuple) else small_graph).size(1) > 0


def test_load_matches_builder_and_accepts_paths():
    path = T.catalogue()["longformer"]
    assert torch.equal(T.load(path, 40).as_tensor(), T.global_tokens(40, 1, window=256).as_tensor())
    assert torch.equal(T.load(str(path), 40).as_tensor(), T.load("longformer", 40).as_tensor())
    assert torch.equal(T.load("longformer", 40, small=True).as_tensor(), T.global_tokens(40, 1, window=2).as_tensor())
    assert torch.equal(
        T.load("bigbird", 300).as_tensor(),
        T.bigbird(300, block=64, window=1, num_global=2, num_random=3, seed=0, global_at="ends").as_tensor(),
    )
    ex = T.load("exphormer", 20)
    assert torch.equal(ex.as_tensor(), T.union(T.expander(20, 4, self_loops=True), T.global_tokens(20, 1)).as_tensor())


def _write(tmp_path, text, name="spec.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, key, message",
    [
        ('builder = "sliding_window"\n[params]\nwindow = 2\nwindth = 3\n', "params.windth", "unknown parameter"),
        ('builder = "sliding_window"\n[params]\nwindow = "2"\n', "params.window", "integer"),
        ('builder = "sliding_window"\n[params]\nwindow = 2.5\n', "params.window", "integer"),
        ('builder = "sliding_window"\n[params]\nwindow = -1\n', "params.window", ">= 0"),
        ('builder = "sliding_window"\n[params]\nwindow = 2\ncausal = 1\n', "params.causal", "true or false"),
        ('builder = "sliding_window"\n', "params.window", "missing"),
        ('builder = "strided"\n[params]\nstride = 0\n', "params.stride", ">= 1"),
        ('builder = "sliding_windows"\n', "builder", "unknown builder"),
        ('builder = 3\n', "builder", "string"),
        ('[params]\nwindow = 2\n', "builder", "missing"),
        ('builder = "full"\ncolour = "red"\n', "colour", "unknown key"),
        ('builder = "full"\nparams = 3\n', "params", "table"),
        ('builder = "full"\nname = 3\n', "name", "string"),
        ('builder = "union"\n', "parts", "non-empty"),
        (
            'builder = "union"\n[[parts]]\nbuilder = "causal"\n[[parts]]\nbuilder = "bigbird"\n'
            '[parts.params]\nseed = -2\n',
            "parts[1].params.seed",
            ">= 0",
        ),
        ('builder = "full"\n[[parts]]\nbuilder = "causal"\n', "parts", "only 'union'"),
        ('builder = "full"\n[small]\nn = 0\n', "small.n", ">= 1"),
        ('builder = "full"\n[small]\nm = 3\n', "small.m", "unknown key"),
        (
            'builder = "sliding_window"\n[params]\nwindow = 2\n[small]\nparams = { window = -3 }\n',
            # integers are bounded: no overflow deep in a builder, no [small] n that fills the memory
            "small.params.window",
            ">= 0",
        ),
        ('builder = "sliding_window"\n[params]\nwindow = 99999999999999999999999\n', "params.window", "<= 2147483647"),
        ('builder = "bigbird"\n[params]\nblock = 2147483648\n', "params.block", "<= 2147483647"),
        (
            'builder = "random"\n[params]\nk = 2\nseed = 99999999999999999999999\n',
            "params.seed",
            "<= 9223372036854775807",
        ),
        ('builder = "full"\n[small]\nn = 100000000\n', "small.n", "<= 4096"),
    ],
)
def test_bad_spec_names_file_and_key(tmp_path, text, key, message):
    p = _write(tmp_path, text)
    with pytest.raises(ValueError) as info:
        T.load(p, 8)
    msg = str(info.value)
    assert str(p) in msg
    assert f"key '{key}'" in msg
    assert message in msg


def test_invalid_toml_and_unknown_names(tmp_path):
    p = _write(tmp_path, 'builder = "full\n')
    with pytest.raises(ValueError, match="not valid TOML"):
        T.load(p, 4)
    with pytest.raises(ValueError, match="Unknown topology name"):
        T.load("no_such_topology", 4)
    with pytest.raises(ValueError, match="No spec file"):
        T.load(tmp_path / "missing.toml", 4)
    with pytest.raises(ValueError, match="'n'"):
        T.load("causal")


def test_build_errors_name_the_file(tmp_path):
    p = _write(tmp_path, 'builder = "random"\n[params]\nk = 5\n')
    with pytest.raises(ValueError, match=re.escape(str(p)) + ".*'k'"):
        T.load(p, 3)


def test_bounds_are_inclusive(tmp_path):
    p = _write(tmp_path, 'builder = "sliding_window"\n[params]\nwindow = 2147483647\n[small]\nn = 4096\n')
    assert torch.equal(T.load(p, 8).as_tensor(), T.full(8).as_tensor())
    assert T.read_spec(p).small_n == specs.SMALL_N_MAX
    p = _write(tmp_path, 'builder = "random"\n[params]\nk = 2\nseed = 9223372036854775807\n', "r.toml")
    assert T.load(p, 5).size(1) == 10


def test_build_spec_errors_name_the_file(tmp_path):
    p = _write(tmp_path, 'builder = "random"\n[params]\nk = 5\n')
    with pytest.raises(ValueError, match=re.escape(str(p)) + ": cannot build for n=3: .*'k'"):
        T.build_spec(T.read_spec(p), 3)  # what the command line builds (per batch)


def test_specs_are_data_nothing_executed(tmp_path):
    p = _write(tmp_path, 'builder = "__import__"\n[params]\nname = "os"\n')
    with pytest.raises(ValueError, match="unknown builder"):
        T.load(p, 3)
    assert set(specs.BUILDERS) >= {"full", "causal", "bigbird", "expander"}


@pytest.mark.parametrize(
    "text, key",
    [
        ('builder = "sliding_window"\n[params]\nwindow = true\n', "params.window"),  # a bool is no integer
        ('builder = "bigbird"\n[params]\nseed = false\n', "params.seed"),
    ],
)
def test_bool_is_not_an_integer_parameter(tmp_path, text, key):
    p = _write(tmp_path, text)
    with pytest.raises(ValueError) as info:
        T.read_spec(p)
    assert f"key '{key}'" in str(info.value) and "integer" in str(info.value)


def test_intersection_spec_equals_the_intersection_builder(tmp_path):
    text = (
        'builder = "intersection"\n[[parts]]\nbuilder = "sliding_window"\nparams = { window = 2 }\n'
        '[[parts]]\nbuilder = "causal"\n'
    )
    p = _write(tmp_path, text)
    for n in (8, [3, 6]):
        want = T.intersection(T.sliding_window(n, 2), T.causal(n)).as_tensor()
        assert torch.equal(T.load(p, n).as_tensor(), want)
        assert not torch.equal(want, T.union(T.sliding_window(n, 2), T.causal(n)).as_tensor())


@pytest.mark.parametrize(
    "text, key",
    [
        ('builder = "document"\n[params]\ndoc_lengths = 0\n', "params.doc_lengths"),
        ('builder = "dilated"\n[params]\nwindow = 2\ndilation = 0\n', "params.dilation"),
    ],
)
def test_lower_bounds_are_checked_when_the_spec_is_read(tmp_path, text, key):
    p = _write(tmp_path, text)
    with pytest.raises(ValueError) as info:
        T.read_spec(p)  # not only when built: every key is checked on reading
    assert str(p) in str(info.value) and f"key '{key}'" in str(info.value) and ">= 1" in str(info.value)


def test_array_parameters_hold_at_most_max_repeat_items(tmp_path):
    dilations = ", ".join(["1"] * (specs.MAX_REPEAT + 1))
    p = _write(tmp_path, f'builder = "dilated_per_head"\n[params]\nwindow = 1\ndilations = [{dilations}]\n')
    with pytest.raises(ValueError) as info:
        T.read_spec(p)
    assert "key 'params.dilations'" in str(info.value) and f"at most {specs.MAX_REPEAT} items" in str(info.value)
