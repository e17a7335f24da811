"""Per-layer graphs (a sequence, or a callable from layer index to graph; graphs shared by the heads
or per head) through the stacks, ``GraphTransformer`` and the models equal the dense stacks with one
mask per layer, outputs and gradients; one graph for every layer is the same computation as before;
the key/value cache decodes with per-layer and per-head graphs; bad input is refused naming the
argument."""

from __future__ import annotations

import re

import pytest
import torch

from gnn_transformer import (
    GraphTransformer,
    GraphTransformerDecoder,
    GraphTransformerDecoderLayer,
    GraphTransformerEncoder,
    GraphTransformerEncoderLayer,
    from_padded,
    to_padded,
)
from gnn_transformer import dense
from gnn_transformer.decoding import KVCache, generate
from gnn_transformer.dense import layers as dense_layers
from gnn_transformer.layers import resolve_layer_biases, resolve_layer_graphs
from gnn_transformer.topology import causal, cross, duo_attention, sliding_window

from .conftest import TOL, perturbed
from .test_layers_per_head import (
    DTYPES,
    HEADS,
    LENGTHS,
    SRC_LENGTHS,
    assert_matches,
    dense_bias,
    dense_mask,
    lm,
    nodes,
    padded_positions,
    per_head_graph,
    positions,
    random_heads,
)

WINDOW = sliding_window(LENGTHS, 1, causal=True)
CAUSAL = causal(LENGTHS)


def layer_graphs(kind: str, num_layers: int = 4):
    """Per-layer graphs of a named kind, as the stacks take them (a sequence or a callable)."""
    if kind == "window-full-every-third":  # a window in every layer, full causal attention in every third
        return lambda index: CAUSAL if index % 3 == 2 else WINDOW
    mixed = [WINDOW, per_head_graph("dilated"), CAUSAL, per_head_graph("duo")][:num_layers]
    if kind == "mixed-sequence":  # shared and per-head graphs
        return mixed
    if kind == "mixed-callable":
        return lambda index: mixed[index]
    raise KeyError(kind)


KINDS = ["window-full-every-third", "mixed-sequence", "mixed-callable"]


def dense_masks(graphs, num_layers: int, lengths=LENGTHS, src_lengths=None):
    """One padded dense mask per layer (``[B, T, T_src]`` or per head ``[B, H, T, T_src]``)."""
    return [
        dense_mask(edge_index, edge_head, lengths, src_lengths)
        for edge_index, edge_head in resolve_layer_graphs(graphs, num_layers)
    ]


def encoder_stack(dtype, num_layers=4, kv_share_every=1):
    layer = GraphTransformerEncoderLayer(
        16, HEADS, 24, dropout=0.0, norm_first=True, num_kv_heads=2, rope=True, dtype=dtype, backend="pyg"
    )
    return perturbed(
        GraphTransformerEncoder(layer, num_layers, torch.nn.LayerNorm(16, dtype=dtype), kv_share_every=kv_share_every)
    )


# ---------------------------------------------------------------- stacks, GraphTransformer, models
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_share_every", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_encoder_stack_per_layer_matches_dense(kind, kv_share_every, dtype):
    stack = encoder_stack(dtype, kv_share_every=kv_share_every)
    graphs = layer_graphs(kind)
    x = nodes(LENGTHS, 16, dtype)
    out = stack(x, graphs, pos=positions(LENGTHS))
    ref = dense.encoder(stack, to_padded(x, LENGTHS), dense_masks(graphs, 4), pos=padded_positions(LENGTHS))
    assert_matches(out, from_padded(ref, LENGTHS), [x, *stack.parameters()], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_share_every", [1, 3])
def test_decoder_stack_per_layer_matches_dense(kv_share_every, dtype):
    layer = GraphTransformerDecoderLayer(16, HEADS, 24, dropout=0.0, norm_first=True, dtype=dtype, backend="pyg")
    stack = perturbed(GraphTransformerDecoder(layer, 3, kv_share_every=kv_share_every))
    graphs = layer_graphs("mixed-sequence", 3)
    full_cross = cross(LENGTHS, SRC_LENGTHS)
    window_cross = cross(LENGTHS, SRC_LENGTHS, mode="window", window=1)
    memory_graphs = lambda index: [window_cross, random_heads(full_cross, seed=index), full_cross][index]  # noqa: E731
    x, memory = nodes(LENGTHS, 16, dtype), nodes(SRC_LENGTHS, 16, dtype)
    out = stack(x, graphs, memory, memory_graphs)
    ref = dense_layers.decoder(
        stack,
        to_padded(x, LENGTHS),
        to_padded(memory, SRC_LENGTHS),
        dense_masks(graphs, 3),
        dense_masks(memory_graphs, 3, src_lengths=SRC_LENGTHS),
    )
    assert_matches(out, from_padded(ref, LENGTHS), [x, memory, *stack.parameters()], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_graph_transformer_per_layer_matches_dense(dtype):
    model = perturbed(GraphTransformer(16, HEADS, 3, 2, 24, dropout=0.0, dtype=dtype, backend="pyg"))
    src_window, src_full = sliding_window(SRC_LENGTHS, 1), per_head_graph("mixed", SRC_LENGTHS)
    src_graphs = lambda index: src_full if index % 3 == 2 else src_window  # noqa: E731
    tgt_graphs = [per_head_graph("duo"), CAUSAL]
    memory_edge_index, memory_edge_head = random_heads(cross(LENGTHS, SRC_LENGTHS), seed=5)
    src, tgt = nodes(SRC_LENGTHS, 16, dtype), nodes(LENGTHS, 16, dtype)
    out = model(src, tgt, src_graphs, tgt_graphs, memory_edge_index, memory_edge_head=memory_edge_head)
    ref = dense_layers.transformer(
        model,
        to_padded(src, SRC_LENGTHS),
        to_padded(tgt, LENGTHS),
        dense_masks(src_graphs, 3, SRC_LENGTHS),
        dense_masks(tgt_graphs, 2),
        dense_mask(memory_edge_index, memory_edge_head, src_lengths=SRC_LENGTHS),
    )
    assert_matches(out, from_padded(ref, LENGTHS), [src, tgt, *model.parameters()], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "fields",
    [
        dict(position="learned"),
        dict(position="rope", num_kv_heads=2),
        dict(position="alibi"),
        dict(position="alibi", kv_share_every=2),
    ],
    ids=["learned", "rope-gqa", "alibi", "alibi-cla"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_model_per_layer_matches_dense(kind, fields, dtype):
    model = lm(dtype, num_layers=4, **fields)
    graphs = layer_graphs(kind)
    ids = torch.randint(0, 23, (sum(LENGTHS),))
    out = model(ids, graphs, pos=positions(LENGTHS))
    ref = dense.encoder_model(model, to_padded(ids, LENGTHS).long(), dense_masks(graphs, 4), padded_positions(LENGTHS))
    assert_matches(out, from_padded(ref, LENGTHS), list(model.parameters()), dtype)


def _layer_biases(graphs, dtype):
    """One bias per layer: ``[E, H]`` on a shared graph, ``[E]`` on a per-head graph, and ``None`` in
    layer 2; with their padded dense twins."""
    biases, dense_biases = [], []
    for index, (edge_index, edge_head) in enumerate(resolve_layer_graphs(graphs, 4)):
        if index == 2:
            biases.append(None), dense_biases.append(None)
            continue
        size = (edge_index.size(1),) if edge_head is not None else (edge_index.size(1), HEADS)
        bias = torch.randn(size, dtype=dtype, requires_grad=True)
        biases.append(bias)
        dense_biases.append(
            dense_bias(edge_index, edge_head, bias)
            if edge_head is not None
            else dense.edge_values_to_dense(edge_index, bias, LENGTHS)
        )
    return biases, dense_biases


@pytest.mark.parametrize("dtype", DTYPES)
def test_encoder_stack_per_layer_biases_match_dense(dtype):
    stack = encoder_stack(dtype)
    graphs = layer_graphs("mixed-sequence")
    biases, dense_biases = _layer_biases(graphs, dtype)
    x = nodes(LENGTHS, 16, dtype)
    out = stack(x, graphs, edge_bias=biases, pos=positions(LENGTHS))
    ref = dense.encoder(
        stack, to_padded(x, LENGTHS), dense_masks(graphs, 4), pos=padded_positions(LENGTHS), bias=dense_biases
    )
    leaves = [x, *(b for b in biases if b is not None), *stack.parameters()]
    assert_matches(out, from_padded(ref, LENGTHS), leaves, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_alibi_model_per_layer_biases_match_dense(dtype):
    model = lm(dtype, num_layers=4, position="alibi")
    graphs = layer_graphs("mixed-callable")
    biases, dense_biases = _layer_biases(graphs, dtype)
    ids = torch.randint(0, 23, (sum(LENGTHS),))
    out = model(ids, graphs, edge_bias=biases, pos=positions(LENGTHS))
    ref = dense.encoder_model(
        model, to_padded(ids, LENGTHS).long(), dense_masks(graphs, 4), padded_positions(LENGTHS), bias=dense_biases
    )
    leaves = [*(b for b in biases if b is not None), *model.parameters()]
    assert_matches(out, from_padded(ref, LENGTHS), leaves, dtype)


# ---------------------------------------------------------------- one graph for every layer
@pytest.mark.parametrize("form", ["sequence", "callable"])
@pytest.mark.parametrize("per_head", [False, True])
def test_one_graph_given_per_layer_is_the_same_computation(per_head, form):
    stack = encoder_stack(torch.float64, kv_share_every=2)
    edge_index, edge_head = per_head_graph("duo") if per_head else (WINDOW, None)
    graph = edge_index if edge_head is None else (edge_index, edge_head)
    bias = torch.randn(edge_index.size(1), dtype=torch.float64)  # [E] or [E, H]
    bias = bias if per_head else bias[:, None].expand(-1, HEADS)
    x = torch.randn(sum(LENGTHS), 16, dtype=torch.float64)
    one = stack(x, edge_index, edge_head=edge_head, edge_bias=bias, pos=positions(LENGTHS))
    graphs = [graph] * 4 if form == "sequence" else (lambda index: graph)
    assert torch.equal(stack(x, graphs, edge_bias=bias, pos=positions(LENGTHS)), one)
    assert torch.equal(stack(x, graphs, edge_bias=[bias] * 4, pos=positions(LENGTHS)), one)


def test_one_graph_resolves_to_the_same_objects_for_every_layer():
    edge_index, edge_head = per_head_graph("duo")
    graphs = resolve_layer_graphs(edge_index, 3, edge_head=edge_head)
    assert len(graphs) == 3 and all(ei is edge_index and eh is edge_head for ei, eh in graphs)


@pytest.mark.parametrize("edge_bias", ["none", "one", "per-layer"])
def test_resolve_layer_biases_gives_one_per_layer(edge_bias):
    graphs = resolve_layer_graphs([WINDOW, WINDOW.as_tensor().flip(0)], 2)
    bias = torch.randn(WINDOW.size(1), HEADS)
    given = {"none": None, "one": bias, "per-layer": [None, bias]}[edge_bias]
    want = {"none": [None, None], "one": [bias, bias], "per-layer": [None, bias]}[edge_bias]
    assert resolve_layer_biases(given, graphs) == want


def test_callable_is_called_once_per_layer_in_order():
    calls = []
    model = lm(torch.float64, num_layers=3, position="alibi")

    def graphs(index):
        calls.append(index)
        return WINDOW

    model(torch.randint(0, 23, (sum(LENGTHS),)), graphs, pos=positions(LENGTHS))
    assert calls == [0, 1, 2]


def test_one_bias_with_per_layer_graphs_of_one_edge_count_biases_every_layer():
    stack = encoder_stack(torch.float64, num_layers=3)
    plain = WINDOW.as_tensor()
    reverse = torch.stack([plain[1], plain[0]])  # as many edges, other ones: each node's next tokens
    graphs = [WINDOW, reverse, (WINDOW, None)]
    bias = torch.randn(plain.size(1), HEADS, dtype=torch.float64)
    x = torch.randn(sum(LENGTHS), 16, dtype=torch.float64)
    torch.testing.assert_close(
        stack(x, graphs, edge_bias=bias, pos=positions(LENGTHS)),
        stack(x, graphs, edge_bias=[bias] * 3, pos=positions(LENGTHS)),
        rtol=0,
        atol=0,
    )


# ---------------------------------------------------------------- decoding with a cache
def _new_edges(graph, first: int, stop: int):
    """The edges of ``graph`` into the nodes ``first..stop-1`` of one sequence, targets renumbered
    from 0 (the step's new nodes), sources kept (all cached plus new nodes)."""
    edge_index, edge_head = graph if isinstance(graph, tuple) else (graph, None)
    plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    keep = (plain[1] >= first) & (plain[1] < stop)
    step = torch.stack([plain[0, keep], plain[1, keep] - first])
    return step if edge_head is None else (step, edge_head[keep])


@pytest.mark.parametrize(
    "fields",
    [dict(position="rope", num_kv_heads=2), dict(position="alibi"), dict(position="learned", kv_share_every=2)],
    ids=["rope-gqa", "alibi", "learned-cla"],
)
def test_cached_decoding_with_per_layer_and_per_head_graphs_equals_the_full_forward(fields):
    model = lm(torch.float64, num_layers=3, **fields)
    n, prompt = 10, 4
    graphs = [sliding_window(n, 2, causal=True), duo_attention(n, [1, 2], HEADS, num_sinks=1, window=1), causal(n)]
    ids = torch.randint(0, 23, (n,))
    full = model(ids, graphs, pos=torch.arange(n))  # [n, V]
    cache, steps = KVCache(), []
    for first, stop in [(0, prompt), *((t, t + 1) for t in range(prompt, n))]:
        cache.add_nodes(torch.zeros(stop - first, dtype=torch.long), torch.arange(first, stop))
        step_graphs = lambda index, a=first, b=stop: _new_edges(graphs[index], a, b)  # noqa: E731
        steps.append(model(ids[first:stop], step_graphs, pos=torch.arange(first, stop), cache=cache))
    torch.testing.assert_close(torch.cat(steps), full, **TOL[torch.float64])


def test_generate_with_a_window_per_layer_equals_the_full_recompute():
    model = lm(torch.float32, num_layers=3, position="rope")
    ids, mask = torch.randint(0, 23, (3, 6)), torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5])
    out, logits = generate(model, ids, 6, attention_mask=mask, window=[1, 1, None], return_logits=True)
    ref, ref_logits = generate(
        model, ids, 6, attention_mask=mask, window=[1, 1, None], use_cache=False, return_logits=True
    )
    torch.testing.assert_close(logits, ref_logits, **TOL[torch.float32])
    assert torch.equal(out, ref)
    _, causal_logits = generate(model, ids, 6, attention_mask=mask, return_logits=True)
    assert not torch.allclose(logits, causal_logits)


def test_generate_with_a_window_per_layer_matches_the_model_on_per_layer_graphs():
    model = lm(torch.float64, num_layers=3, position="alibi")
    ids = torch.randint(0, 23, (1, 7))
    _, logits = generate(model, ids, 1, window=[2, None, 0], return_logits=True)
    graphs = [sliding_window(7, 2, causal=True), causal(7), sliding_window(7, 0, causal=True)]
    torch.testing.assert_close(logits[0, 0], model(ids[0], graphs, pos=torch.arange(7))[-1], **TOL[torch.float64])


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("length", [2, 5])
def test_sequence_of_the_wrong_length_is_refused(length):
    stack = encoder_stack(torch.float32, num_layers=3)
    match = rf"'edge_index' to hold one graph per layer, 3 \(got a sequence of length {length}\)"
    with pytest.raises(ValueError, match=match):
        stack(torch.randn(sum(LENGTHS), 16), [WINDOW] * length, pos=positions(LENGTHS))


@pytest.mark.parametrize(
    "returned, match",
    [
        (None, r"'edge_index\(1\)' to be a graph.*got None"),
        ("causal", r"'edge_index\(1\)' to be a graph.*got 'causal'"),
        ((WINDOW, None, None), r"'edge_index\(1\)' to be a graph.*tuple of length 3"),
        (torch.zeros(3, 4, dtype=torch.long), r"'edge_index\(1\)' to be an edge_index of shape \[2, E\].*\[3, 4\]"),
        (
            (torch.zeros(2, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long)),
            r"'edge_index\(1\)\[1\]' to be an integer edge_head of shape \[4\].*\[3\]",
        ),
        ((torch.zeros(2, 4, dtype=torch.long), torch.zeros(4)), r"'edge_index\(1\)\[1\]'.*torch.float32"),
        (([[0], [0]], None), r"'edge_index\(1\)\[0\]' to be an edge_index.*list of length 2"),
    ],
    ids=["none", "string", "triple", "shape", "head-length", "head-dtype", "list"],
)
def test_callable_returning_a_non_graph_is_refused(returned, match):
    stack = encoder_stack(torch.float32, num_layers=3)
    with pytest.raises(ValueError, match=match):
        stack(torch.randn(sum(LENGTHS), 16), lambda index: WINDOW if index != 1 else returned, pos=positions(LENGTHS))


def test_per_layer_edge_head_out_of_range_is_refused():
    edge_index, edge_head = per_head_graph("duo")
    model = lm(torch.float32, num_layers=2, position="alibi")
    with pytest.raises(ValueError, match="Found 5 in 'edge_head' but there are 4 query heads"):
        model(torch.randint(0, 23, (sum(LENGTHS),)), [WINDOW, (edge_index, edge_head + 2)], pos=positions(LENGTHS))


def test_edge_head_with_per_layer_graphs_is_refused():
    edge_index, edge_head = per_head_graph("duo")
    stack = encoder_stack(torch.float32, num_layers=2)
    with pytest.raises(ValueError, match="'edge_head' only with one graph in 'edge_index'.*list of length 2"):
        stack(torch.randn(sum(LENGTHS), 16), [edge_index, edge_index], edge_head=edge_head, pos=positions(LENGTHS))


def test_a_per_head_pair_given_as_per_layer_graphs_is_refused_with_a_hint():
    stack = encoder_stack(torch.float32, num_layers=2)
    with pytest.raises(ValueError, match=r"'edge_index\[1\]' to be an edge_index of shape \[2, E\].*edge_head="):
        stack(torch.randn(sum(LENGTHS), 16), per_head_graph("duo"), pos=positions(LENGTHS))


@pytest.mark.parametrize("graphs", [3, "causal", {0: WINDOW}], ids=["int", "string", "dict"])
def test_something_that_is_no_graph_is_refused(graphs):
    stack = encoder_stack(torch.float32, num_layers=1)
    with pytest.raises(ValueError, match=r"'edge_index' to be an edge_index tensor \[2, E\], a sequence"):
        stack(torch.randn(sum(LENGTHS), 16), graphs, pos=positions(LENGTHS))


def test_one_bias_with_per_layer_graphs_of_different_edge_counts_is_refused():
    stack = encoder_stack(torch.float32, num_layers=3)
    graphs = layer_graphs("window-full-every-third")
    counts = [WINDOW.size(1), WINDOW.size(1), CAUSAL.size(1)]
    match = re.escape(
        f"'edge_bias' to be a sequence of one bias per layer for per-layer graphs with different "
        f"edge counts {counts} (got one tensor of shape [{WINDOW.size(1)}, 4]"
    )
    with pytest.raises(ValueError, match=match):
        stack(
            torch.randn(sum(LENGTHS), 16), graphs, edge_bias=torch.zeros(WINDOW.size(1), HEADS), pos=positions(LENGTHS)
        )


@pytest.mark.parametrize(
    "edge_bias, match",
    [
        ([None, None], r"'edge_bias' to hold one bias per layer, 3 \(got a sequence of length 2\)"),
        ([None, 1.0, None], r"'edge_bias\[1\]' to be a tensor or None \(got 1.0\)"),
        ("bias", r"'edge_bias' to be None, a tensor or a sequence of one per layer \(got 'bias'\)"),
    ],
)
def test_bad_per_layer_biases_are_refused(edge_bias, match):
    stack = encoder_stack(torch.float32, num_layers=3)
    with pytest.raises(ValueError, match=match):
        stack(torch.randn(sum(LENGTHS), 16), WINDOW, edge_bias=edge_bias, pos=positions(LENGTHS))


@pytest.mark.parametrize("argument", ["src", "tgt", "memory"])
def test_graph_transformer_names_the_argument_of_a_sequence_of_the_wrong_length(argument):
    model = GraphTransformer(16, HEADS, 2, 3, 24, dropout=0.0, backend="pyg")
    graphs = {"src": sliding_window(SRC_LENGTHS, 1), "tgt": CAUSAL, "memory": cross(LENGTHS, SRC_LENGTHS)}
    graphs[argument] = [graphs[argument]] * 4
    with pytest.raises(
        ValueError,
        match=rf"'{argument}_edge_index' to hold one graph per layer, "
        rf"{2 if argument == 'src' else 3} \(got a sequence of length 4\)",
    ):
        model(
            torch.randn(sum(SRC_LENGTHS), 16),
            torch.randn(sum(LENGTHS), 16),
            graphs["src"],
            graphs["tgt"],
            graphs["memory"],
        )


def test_graph_transformer_names_a_bad_edge_head():
    model = GraphTransformer(16, HEADS, 2, 2, 24, dropout=0.0, backend="pyg")
    memory_edge_index, memory_edge_head = random_heads(cross(LENGTHS, SRC_LENGTHS))
    with pytest.raises(ValueError, match="'memory_edge_head'.*integer edge_head"):
        model(
            torch.randn(sum(SRC_LENGTHS), 16),
            torch.randn(sum(LENGTHS), 16),
            sliding_window(SRC_LENGTHS, 1),
            CAUSAL,
            memory_edge_index,
            memory_edge_head=memory_edge_head[1:],
        )


def test_decoder_stack_names_memory_edge_index():
    stack = GraphTransformerDecoder(GraphTransformerDecoderLayer(16, HEADS, 24), 2)
    with pytest.raises(ValueError, match=r"'memory_edge_index\(0\)' to be a graph.*got None"):
        stack(torch.randn(sum(LENGTHS), 16), CAUSAL, torch.randn(sum(SRC_LENGTHS), 16), lambda index: None)


def test_alibi_model_refuses_a_bias_of_the_wrong_shape():
    model = lm(torch.float32, num_layers=2, position="alibi")
    with pytest.raises(ValueError, match=rf"'edge_bias' to have shape \[{WINDOW.size(1)}, 4\].*\[{WINDOW.size(1)}\]"):
        model(
            torch.randint(0, 23, (sum(LENGTHS),)), WINDOW, edge_bias=torch.zeros(WINDOW.size(1)), pos=positions(LENGTHS)
        )


@pytest.mark.parametrize(
    "window, match",
    [
        ([1, None], r"'window' to hold one radius per layer, 3 \(got a sequence of length 2\)"),
        ([1, -1, None], r"'window\[1\]'.*-1"),
        ([1, 2.5, None], r"'window\[1\]'.*2.5"),
    ],
)
def test_generate_refuses_bad_windows_per_layer(window, match):
    model = lm(torch.float32, num_layers=3)
    with pytest.raises(ValueError, match=match):
        generate(model, torch.randint(0, 23, (1, 4)), 2, window=window)


def test_alibi_on_per_layer_per_head_graphs_sharing_one_edge_index():
    """Layers whose per-head graphs share one edge_index tensor but not its edge_head each get ALiBi
    with their own edges' head slopes: the same logits as with a copy of edge_index per layer."""
    torch.manual_seed(0)
    model = lm(torch.float64, num_layers=2, position="alibi").eval()
    edge_index = CAUSAL.as_tensor()
    g = torch.Generator().manual_seed(0)
    heads = [torch.randint(0, HEADS, (edge_index.size(1),), generator=g) for _ in range(2)]
    ids, pos = torch.randint(0, 23, (sum(LENGTHS),)), positions(LENGTHS)
    shared = model(ids, [(edge_index, heads[0]), (edge_index, heads[1])], pos=pos)
    copies = model(ids, [(edge_index.clone(), heads[0]), (edge_index.clone(), heads[1])], pos=pos)
    torch.testing.assert_close(shared, copies, **TOL[torch.float64])


# ---------------------------------------------------------------- dense reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_layer", [False, True])
def test_decoder_stack_memory_biases_match_dense(per_layer, dtype):
    """``memory_edge_bias`` of a decoder stack (one for every layer, or one per layer with a None)
    reaches the cross-attention of each layer, and dense.decoder's ``memory_bias`` does the same."""
    layer = GraphTransformerDecoderLayer(16, HEADS, 24, dropout=0.0, norm_first=True, dtype=dtype, backend="pyg")
    stack = perturbed(GraphTransformerDecoder(layer, 3))
    memory_graph = cross(LENGTHS, SRC_LENGTHS)
    num_edges = memory_graph.size(1)
    if per_layer:
        biases = [torch.randn(num_edges, HEADS, dtype=dtype, requires_grad=True), None, None]
        biases[2] = torch.randn(num_edges, HEADS, dtype=dtype, requires_grad=True)
    else:
        biases = torch.randn(num_edges, HEADS, dtype=dtype, requires_grad=True)
    to_dense = lambda b: None if b is None else dense.edge_values_to_dense(memory_graph, b, SRC_LENGTHS, LENGTHS)  # noqa: E731
    dense_biases = [to_dense(b) for b in biases] if per_layer else to_dense(biases)
    x, memory = nodes(LENGTHS, 16, dtype), nodes(SRC_LENGTHS, 16, dtype)
    out = stack(x, CAUSAL, memory, memory_graph, memory_edge_bias=biases)
    ref = dense_layers.decoder(
        stack,
        to_padded(x, LENGTHS),
        to_padded(memory, SRC_LENGTHS),
        dense_mask(CAUSAL),
        dense_mask(memory_graph, src_lengths=SRC_LENGTHS),
        memory_bias=dense_biases,
    )
    leaves = [x, memory, *(b for b in (biases if per_layer else [biases]) if b is not None), *stack.parameters()]
    assert_matches(out, from_padded(ref, LENGTHS), leaves, dtype)


@pytest.mark.parametrize("length", [2, 5])
@pytest.mark.parametrize("argument", ["mask", "bias"])
def test_dense_stack_refuses_a_sequence_of_the_wrong_length(argument, length):
    stack = encoder_stack(torch.float32, num_layers=3)
    x = to_padded(torch.randn(sum(LENGTHS), 16), LENGTHS)
    mask = dense_mask(WINDOW)
    kw = dict(mask=[mask] * length) if argument == "mask" else dict(mask=mask, bias=[None] * length)
    match = rf"'{argument}' to hold one entry per layer, 3 \(got a sequence of length {length}\)"
    with pytest.raises(ValueError, match=match):
        dense.encoder(stack, x, pos=padded_positions(LENGTHS), **kw)
