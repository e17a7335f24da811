"""Models that select their graph from the data, decoded with a key/value cache.

Under a cache a step's queries are the cache's last nodes: ``TopK(causal=True)`` aligns its causal
rule at the end (a query reads its own node and earlier ones), so cached generation and streaming
equal the whole-prefix forward; selectors of self-attention graphs only (``BlockTopK``, ``LSH``,
``Routing``) are refused before any step, naming what runs them instead.
"""

from __future__ import annotations

import pytest
import torch

from gnn_transformer import GraphLM, GraphMultiheadAttention, GraphTransformerConfig, topology
from gnn_transformer.decoding import generate
from gnn_transformer.streaming import perplexity, stream_logits, streaming_generate
from gnn_transformer.topology.dynamic import TopK

from .conftest import TOL


def _lm(select: str, backend: str = "pyg", position: str = "rope") -> GraphLM:
    torch.manual_seed(0)
    config = GraphTransformerConfig(
        vocab_size=17, d_model=16, nhead=2, num_layers=2, position=position, backend=backend, select=select
    )
    return GraphLM(config).double().eval()


@pytest.mark.parametrize("backend", ["pyg", "fused", "auto"])
@pytest.mark.parametrize("num_keys", [1, 3])
def test_causal_topk_generates_with_a_cache_as_the_whole_prefix(backend, num_keys):
    lm = _lm(f"topk:num_keys={num_keys},causal=true", backend)
    ids = torch.randint(0, 17, (1, 6), generator=torch.Generator().manual_seed(1))
    out, logits = generate(lm, ids, 4, return_logits=True)
    full = lm(out[0], topology.causal(10), pos=torch.arange(10))[5:9]  # [4, V]
    torch.testing.assert_close(logits[:, 0], full, **TOL[torch.float64])
    _, uncached = generate(lm, ids, 4, use_cache=False, return_logits=True)
    torch.testing.assert_close(uncached[:, 0], full, **TOL[torch.float64])


@pytest.mark.parametrize("chunk", [1, 4, 5])
@pytest.mark.parametrize("graph", ["causal", "window"])
def test_causal_topk_streams_as_the_whole_graph(chunk, graph):
    lm = _lm("topk:num_keys=3,causal=true")
    ids = torch.randint(0, 17, (12,), generator=torch.Generator().manual_seed(2))
    g = (
        topology.causal(12)
        if graph == "causal"
        else topology.intersection(topology.sliding_window(12, 4), topology.causal(12))
    )
    got = torch.cat([logits for _, logits in stream_logits(lm, ids, g, chunk=chunk)])
    torch.testing.assert_close(got, lm(ids, g, pos=torch.arange(12)), **TOL[torch.float64])


def test_causal_topk_aligns_queries_with_the_last_keys():
    """The rule ``j <= i + N_k - N_q``: with as many queries as keys it is ``j <= i``; with the
    step's queries last among the keys, a query reads its own node and those before it."""
    q, k = torch.randn(2, 1, 4, dtype=torch.float64), torch.randn(5, 1, 4, dtype=torch.float64)
    every = torch.stack([torch.arange(5).repeat(2), torch.arange(2).repeat_interleave(5)])  # every key, both queries
    edge_index, _ = TopK(5, causal=True)(q, k, every)
    assert sorted(zip(*edge_index.tolist())) == sorted([(j, 0) for j in range(4)] + [(j, 1) for j in range(5)])
    square = torch.stack([torch.arange(3).repeat(3), torch.arange(3).repeat_interleave(3)])
    edge_index, _ = TopK(3, causal=True)(k[:3], k[:3], square)
    assert sorted(zip(*edge_index.tolist())) == sorted([(0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2)])


@pytest.mark.parametrize(
    "select",
    [
        "block_topk:block_size=2,num_blocks=1,causal=true",
        "lsh:num_buckets=2,causal=true",
        "routing:num_clusters=2,causal=true",
    ],
)
def test_self_attention_selectors_are_refused_under_a_cache_before_any_step(select):
    lm = _lm(select)
    ids = torch.randint(0, 17, (1, 6), generator=torch.Generator().manual_seed(3))
    match = r"^Expected a 'model' whose attention can select under a key/value cache \(got select="
    with pytest.raises(ValueError, match=match + r".*use_cache=False"):
        generate(lm, ids, 2)
    with pytest.raises(ValueError, match=match + r".*on the whole graph"):
        perplexity(lm, ids[0], topology.causal(6), chunk=2)
    with pytest.raises(ValueError, match=match):
        next(stream_logits(lm, ids[0], topology.causal(6), chunk=2))
    with pytest.raises(ValueError, match=match):
        streaming_generate(lm, ids, 2, num_sinks=1, window=3)
    out = generate(lm, ids, 2, use_cache=False)  # each step on the whole graph: runs
    assert out.shape == (1, 8)


def test_pyg_takes_an_int32_edge_index():
    """PyG's scatter takes int64 indices: an int32 graph (accepted by every other backend) ran into
    'expected scalar type Long' on pyg."""
    torch.manual_seed(0)
    x = torch.randn(6, 16, dtype=torch.float64)
    layer = GraphMultiheadAttention(16, 2).double()
    g = topology.causal(6).as_subclass(torch.Tensor)
    for backend in ("pyg", "fused"):
        out, weights = layer(x, g.int(), backend=backend, return_attention_weights=True)
        want, want_weights = layer(x, g, backend=backend, return_attention_weights=True)
        torch.testing.assert_close(out, want, **TOL[torch.float64])
        torch.testing.assert_close(weights, want_weights, **TOL[torch.float64])
    lm = _lm(None)
    ids = torch.randint(0, 17, (6,))
    torch.testing.assert_close(lm(ids, g.int(), pos=torch.arange(6)), lm(ids, g, pos=torch.arange(6)))


def test_generate_refuses_steps_past_the_position_table_before_the_first():
    """A learned position table of 8: a prompt of 5 and 4 new tokens reads positions up to 7 (the
    last new token is not read); 5 new tokens would read position 8, refused before any step (it
    ran 3 steps and then failed naming 'pos')."""
    torch.manual_seed(0)
    config = GraphTransformerConfig(vocab_size=17, d_model=16, nhead=2, num_layers=1, max_positions=8, backend="pyg")
    lm = GraphLM(config).eval()
    ids = torch.randint(0, 17, (1, 5))
    assert generate(lm, ids, 4).shape == (1, 9)
    with pytest.raises(
        ValueError, match=r"^Expected 'max_new_tokens' small enough for the model's 8 learned positions"
    ):
        generate(lm, ids, 5)


def test_rope_refuses_boolean_positions():
    layer = GraphMultiheadAttention(16, 2, rope=True)
    with pytest.raises(ValueError, match=r"Expected 'pos' to hold integer or real positions \(got dtype torch.bool\)"):
        layer(torch.randn(3, 16), topology.causal(3), pos=torch.tensor([True, False, True]))


@pytest.mark.parametrize("position", ["alibi", "rope"])
def test_a_cache_that_disagrees_with_the_step_is_refused(position):
    """The cache's last registered nodes must be the step's (add_nodes before the model runs): an
    ALiBi model raised an IndexError, the others ran on misaligned keys."""
    from gnn_transformer.decoding import KVCache

    lm = _lm(None, position=position)
    cache = KVCache()
    cache.add_nodes(torch.zeros(2, dtype=torch.long), torch.arange(2))
    with pytest.raises(ValueError, match=r"^Expected the 4 new nodes registered last in 'cache'"):
        lm(torch.randint(0, 17, (4,)), topology.causal(4), pos=torch.arange(4), cache=cache)
    cache = KVCache()  # nothing registered at all
    with pytest.raises(ValueError, match=r"registered .*add_nodes"):
        lm(torch.randint(0, 17, (4,)), topology.causal(4), pos=torch.arange(4), cache=cache)
