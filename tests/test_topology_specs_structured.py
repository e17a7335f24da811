"""TOML specs of per-head graphs, per-layer graphs and selectors: parsing, validation (errors name
the file and the key), and building equals the Python builders."""

import re

import pytest
import torch

from gnn_transformer import topology as T
from gnn_transformer.topology import specs


def _write(tmp_path, text, name="spec.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _same(a, b):
    """Two graphs (an edge_index or a pair (edge_index, edge_head)) are equal."""
    a, b = (g if isinstance(g, tuple) else (g,) for g in (a, b))
    return len(a) == len(b) and all(torch.equal(torch.as_tensor(x), torch.as_tensor(y)) for x, y in zip(a, b))


PER_HEAD = '''builder = "per_head"
[[heads]]
builder = "causal"
[[heads]]
builder = "streaming"
params = { num_sinks = 1, window = 2 }
repeat = 2
[[heads]]
builder = "union"
[[heads.parts]]
builder = "sliding_window"
params = { window = 1 }
[[heads.parts]]
builder = "global_tokens"
params = { num_global = 1 }
[small]
n = 8
params = { window = 1 }
'''


@pytest.mark.parametrize("n", [1, 9, [4, 1, 6]])
def test_per_head_spec_equals_builder(tmp_path, n):
    spec = T.read_spec(_write(tmp_path, PER_HEAD))
    assert spec.num_heads == 4 and not spec.per_layer and spec.select is None
    local = T.streaming(n, 1, 2)
    expected = T.per_head([T.causal(n), local, local, T.union(T.sliding_window(n, 1), T.global_tokens(n, 1))])
    assert _same(T.build_spec(spec, n), expected)


def test_per_head_builders_by_name(tmp_path):
    spec = _write(
        tmp_path, 'builder = "dilated_per_head"\n[params]\nwindow = 2\ndilations = [1, 2, 4]\ncausal = true\n'
    )
    assert T.read_spec(spec).num_heads == 3
    assert _same(T.load(spec, [7, 3]), T.dilated_per_head([7, 3], 2, [1, 2, 4], causal=True))
    assert T.read_spec("duo_attention").num_heads == 8
    assert _same(T.load("duo_attention", 300), T.duo_attention(300, [1, 3, 5, 7], 8, num_sinks=64, window=255))
    assert _same(T.load("duo_attention", small=True), T.duo_attention(16, [1, 3, 5, 7], 8, num_sinks=2, window=3))
    assert _same(T.load("streaming_llm", 40, small=True), T.streaming(40, 2, 3))
    dilated = [T.dilated(20, 256, 1, causal=True)] * 10 + [T.dilated(20, 256, 2, causal=True)] * 2
    assert _same(T.load("longformer_dilated", 20), T.per_head(dilated))


def test_streaming_builder_matches_its_predicate_twin():
    from functools import partial

    for n, sinks, window in [(9, 2, 3), ([5, 1, 7], 1, 1), (6, 0, 0), (4, 9, 9)]:
        twin = T.from_predicate(n, partial(T.streaming_predicate, num_sinks=sinks, window=window))
        assert torch.equal(
            specs.BUILDERS["streaming"].fn(n, num_sinks=sinks, window=window).as_tensor(), twin.as_tensor()
        )


PER_LAYER = '''builder = "per_layer"
[[layers]]
builder = "sliding_window"
params = { window = 1, causal = true }
repeat = 2
[[layers]]
builder = "per_head"
[[layers.heads]]
builder = "causal"
repeat = 2
[[layers.heads]]
builder = "streaming"
params = { num_sinks = 1, window = 1 }
repeat = 2
[[layers]]
builder = "causal"
'''


def test_per_layer_spec_is_a_cycle(tmp_path):
    spec = T.read_spec(_write(tmp_path, PER_LAYER))
    assert spec.per_layer and spec.num_heads == 4
    pattern = T.build_spec(spec, [5, 3])
    assert isinstance(pattern, specs.LayerPattern) and pattern.period == 4
    window, causal = T.sliding_window([5, 3], 1, causal=True), T.causal([5, 3])
    local = T.streaming([5, 3], 1, 1)
    expected = [window, window, T.per_head([causal, causal, local, local]), causal]
    for layer in range(9):
        assert _same(pattern(layer), expected[layer % 4]) and _same(pattern.graph(layer), expected[layer % 4])
    assert pattern(0) is pattern(1)  # a repeated layer is one graph object (the kernels' caches serve both)
    assert [layers for layers, _ in pattern.distinct()] == [[0, 1], [2], [3]]
    with pytest.raises(ValueError, match="'layer'"):
        pattern(-1)


def test_catalogue_per_layer_specs():
    modern = T.load("modernbert", 200)
    assert modern.period == 3
    assert _same(modern(0), T.full(200)) and _same(modern(4), T.sliding_window(200, 64))
    gemma = T.load("gemma3", 30, small=True)
    assert gemma.period == 6 and _same(gemma(5), T.causal(30))
    assert all(_same(gemma(layer), T.sliding_window(30, 3, causal=True)) for layer in range(5))


def test_per_layer_pattern_runs_in_a_stack():
    from gnn_transformer import GraphTransformerEncoder, GraphTransformerEncoderLayer

    torch.manual_seed(0)
    stack = GraphTransformerEncoder(GraphTransformerEncoderLayer(8, 4, 16, dropout=0.0), num_layers=4)
    pattern = T.load("gemma3", [5, 4], small=True)
    x = torch.randn(9, 8)
    assert torch.allclose(stack(x, pattern), stack(x, [pattern(layer) for layer in range(4)]))


def test_select_is_kept_and_the_graph_is_the_allowed_one(tmp_path):
    moba, topk = T.read_spec("moba"), T.read_spec("topk")
    assert moba.select == "block_topk:block_size=512,num_blocks=2,causal=true"
    assert moba.selector(small=True) == "block_topk:block_size=4,num_blocks=1,causal=true"
    assert topk.select == {"name": "topk", "num_keys": 64} and topk.selector() == topk.select
    assert _same(T.load("moba", 10), T.causal(10))
    p = _write(tmp_path, 'builder = "sliding_window"\nselect = "lsh:num_buckets=4"\n[params]\nwindow = 2\n')
    assert T.read_spec(p).select == "lsh:num_buckets=4" and T.read_spec(p).selector(small=True) == "lsh:num_buckets=4"


def test_small_params_reach_every_part_that_takes_them(tmp_path):
    text = (
        'builder = "union"\n[[parts]]\nbuilder = "sliding_window"\nparams = { window = 9 }\n'
        '[[parts]]\nbuilder = "global_tokens"\nparams = { window = 7 }\n[small]\nparams = { window = 1 }\n'
    )
    p = _write(tmp_path, text)
    assert _same(T.load(p, 8, small=True), T.union(T.sliding_window(8, 1), T.global_tokens(8, 1, window=1)))
    assert _same(T.load(p, 8), T.union(T.sliding_window(8, 9), T.global_tokens(8, 1, window=7)))


@pytest.mark.parametrize(
    "text, key, message",
    [
        ('builder = "per_head"\n', "heads", "non-empty array"),
        ('builder = "per_head"\nheads = []\n', "heads", "non-empty array"),
        ('builder = "per_head"\nheads = 3\n', "heads", "non-empty array"),
        ('builder = "per_head"\n[params]\nwindow = 2\n', "params", "takes [[heads]]"),
        ('builder = "per_head"\n[[heads]]\nbuilder = "causal"\nrepeat = 0\n', "heads[0].repeat", ">= 1"),
        ('builder = "per_head"\n[[heads]]\nbuilder = "causal"\nrepeat = 5000\n', "heads[0].repeat", "<= 4096"),
        ('builder = "per_head"\n[[heads]]\nbuilder = "causal"\nrepeat = true\n', "heads[0].repeat", "integer"),
        (
            'builder = "per_head"\n[[heads]]\nbuilder = "causal"\nrepeat = 3000\n[[heads]]\nbuilder = "full"\n'
            'repeat = 3000\n',
            "heads",
            "6000 heads in all",
        ),
        ('builder = "per_head"\n[[heads]]\nbuilder = "causal"\ncolour = 1\n', "heads[0].colour", "unknown key"),
        ('builder = "per_head"\n[[heads]]\nbuilder = "duo_attention"\n', "heads[0].builder", "per-head graph"),
        ('builder = "per_head"\n[[heads]]\nbuilder = "per_head"\n', "heads[0].builder", "per-head graph"),
        (
            'builder = "per_head"\n[[heads]]\nbuilder = "sliding_window"\n[heads.params]\nwindow = -1\n',
            "heads[0].params.window",
            ">= 0",
        ),
        ('builder = "causal"\nrepeat = 2\n', "repeat", "unknown key"),
        ('builder = "causal"\n[[heads]]\nbuilder = "causal"\n', "heads", "only 'per_head'"),
        (
            'builder = "union"\n[[parts]]\nbuilder = "dilated_per_head"\n[parts.params]\nwindow = 1\ndilations = [1]\n',
            "parts[0].builder",
            "per-head graph",
        ),
        ('builder = "dilated_per_head"\n[params]\nwindow = 1\ndilations = []\n', "params.dilations", "at least 1"),
        ('builder = "dilated_per_head"\n[params]\nwindow = 1\ndilations = 2\n', "params.dilations", "array"),
        ('builder = "dilated_per_head"\n[params]\nwindow = 1\ndilations = [1, 0]\n', "params.dilations[1]", ">= 1"),
        (
            'builder = "dilated_per_head"\n[params]\nwindow = 1\ndilations = [1, "2"]\n',
            "params.dilations[1]",
            "integer",
        ),
        ('builder = "dilated_per_head"\n[params]\nwindow = 1\n', "params.dilations", "missing"),
        (
            'builder = "duo_attention"\n[params]\nstreaming_heads = [4]\nnum_heads = 4\nnum_sinks = 1\nwindow = 1\n',
            "params.streaming_heads",
            "< num_heads = 4",
        ),
        (
            'builder = "duo_attention"\n[params]\nstreaming_heads = [1, 1]\nnum_heads = 4\nnum_sinks = 1\nwindow = 1\n',
            "params.streaming_heads",
            "distinct",
        ),
        ('builder = "streaming"\n[params]\nnum_sinks = 1\n', "params.window", "missing"),
        ('builder = "per_layer"\n', "layers", "non-empty array"),
        ('builder = "per_layer"\nlayers = []\n', "layers", "non-empty array"),
        ('builder = "per_layer"\n[[layers]]\nbuilder = "per_layer"\n', "layers[0].builder", "whole spec"),
        ('builder = "per_layer"\n[[layers]]\nbuilder = "causal"\nrepeat = -1\n', "layers[0].repeat", ">= 1"),
        (
            'builder = "per_layer"\n[[layers]]\nbuilder = "dilated_per_head"\n[layers.params]\nwindow = 1\n'
            'dilations = [1, 2]\n[[layers]]\nbuilder = "dilated_per_head"\n[layers.params]\nwindow = 1\n'
            'dilations = [1, 2, 3]\n',
            "layers",
            "2 in layers[0], 3 in layers[1]",
        ),
        ('builder = "union"\n[[parts]]\nbuilder = "per_layer"\n', "parts[0].builder", "whole spec"),
        ('builder = "causal"\nselect = "topk"\n', "select", "missing parameter 'num_keys'"),
        ('builder = "causal"\nselect = "nearest:k=2"\n', "select", "one of"),
        ('builder = "causal"\nselect = 3\n', "select", "selector like"),
        (
            'builder = "dilated_per_head"\nselect = "topk:num_keys=2"\n[params]\nwindow = 1\ndilations = [1, 2]\n',
            "select",
            "not within a per-head graph (2 heads)",
        ),
        ('builder = "causal"\n[select]\nnum_keys = 2\n', "select", "name"),
        ('builder = "causal"\n[small]\nselect = "topk:num_keys=2"\n', "small.select", "top-level 'select'"),
        (
            'builder = "causal"\nselect = "topk:num_keys=2"\n[small]\nselect = "topk:num_keys=0"\n',
            "small.select",
            "num_keys",
        ),
        (
            'builder = "union"\n[[parts]]\nbuilder = "causal"\n[small]\nparams = { window = 1 }\n',
            "small.params.window",
            "no part",
        ),
        (
            'builder = "dilated_per_head"\n[params]\nwindow = 1\ndilations = [1, 2]\n[small]\n'
            'params = { dilations = [1] }\n',
            "small.params",
            "number of heads",
        ),
    ],
)
def test_bad_structured_spec_names_file_and_key(tmp_path, text, key, message):
    p = _write(tmp_path, text)
    with pytest.raises(ValueError, match=re.escape(f"{p}: key '{key}'") + ".*" + re.escape(message)):
        T.read_spec(p)


def test_per_head_edge_budget_counts_every_head(tmp_path):
    p = _write(tmp_path, 'builder = "per_head"\n[[heads]]\nbuilder = "causal"\nrepeat = 4\n')
    with T.max_edges(30):  # one head: 10 edges, four: 40
        with pytest.raises(ValueError, match=re.escape(str(p)) + ".*per_head.*40 edges"):
            T.load(p, 4)


# ---------------------------------------------------------------- LayerPattern


@pytest.mark.parametrize("layer", [True, False, -1, 1.0, "0", None])
def test_layer_pattern_refuses_a_layer_that_is_no_non_negative_int(layer):
    pattern = specs.LayerPattern((T.causal(3), T.full(3)))
    with pytest.raises(ValueError, match=r"'layer' to be a non-negative int"):
        pattern(layer)


def test_layer_pattern_to_moves_every_tensor_and_keeps_shared_graphs_shared():
    pair = T.per_head([T.causal(3), T.full(3)])
    window = T.sliding_window(3, 1)
    pattern = specs.LayerPattern((pair, pair, window, window))
    moved = pattern.to("meta")
    assert moved.period == 4
    assert moved.graphs[0] is moved.graphs[1] and moved.graphs[2] is moved.graphs[3]
    assert all(t.device.type == "meta" for t in moved.graphs[0]) and moved.graphs[2].device.type == "meta"
    assert [layers for layers, _ in pattern.to("cpu").distinct()] == [[0, 1], [2, 3]]


def test_layer_pattern_distinct_tells_a_per_head_pair_from_its_edge_index():
    """A per-head pair ``(edge_index, edge_head)`` and its bare ``edge_index`` are different graphs
    (the second is shared by all heads), even though their edge_index is equal."""
    pair = T.per_head([T.causal(3), T.causal(3)])
    pattern = specs.LayerPattern((pair[0], pair, pair[0]))
    assert [layers for layers, _ in pattern.distinct()] == [[0, 2], [1]]


def test_layer_patterns_compare_by_identity():
    """Patterns hold tensors: ``==`` is identity (no elementwise tensor comparison), and a pattern is
    hashable."""
    a, b = specs.LayerPattern((T.causal(3), T.full(3))), specs.LayerPattern((T.causal(3), T.full(3)))
    assert a == a and a != b
    assert {a: 1, b: 2}[a] == 1


def test_small_params_are_checked_against_the_other_parameters(tmp_path):
    text = (
        'builder = "duo_attention"\n[params]\nstreaming_heads = [1]\nnum_heads = 4\nnum_sinks = 1\nwindow = 1\n'
        "[small]\nparams = { streaming_heads = [5] }\n"
    )
    p = _write(tmp_path, text)
    with pytest.raises(ValueError, match=re.escape(f"{p}: key 'small.params.streaming_heads'") + ".*< num_heads = 4"):
        T.read_spec(p)
