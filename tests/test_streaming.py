"""Streams with a bounded cache (gnn_transformer.streaming) against one forward pass on the whole graph."""
import math

import pytest
import torch

from gnn_transformer import GraphLM, GraphTransformerConfig, topology
from gnn_transformer.streaming import EvictingKVCache, perplexity, stream_logits, streaming_generate
from tests.conftest import perturbed


def _lm(position="rope", layers=2, kv_heads=None, backend="pyg", seed=0):
    torch.manual_seed(seed)
    config = GraphTransformerConfig(vocab_size=23, d_model=16, nhead=4, num_layers=layers, position=position,
                                    num_kv_heads=kv_heads, backend=backend, max_positions=512)
    return perturbed(GraphLM(config)).double().eval()


def _full(model, ids, graph):
    return model(ids, graph, pos=torch.arange(ids.numel()))


@pytest.mark.parametrize("chunk", [1, 4, 7, 40])
@pytest.mark.parametrize("position", ["rope", "learned", "alibi"])
def test_stream_equals_whole_graph(chunk, position):
    model = _lm(position)
    ids = torch.randint(0, 23, (40,))
    graph = topology.streaming(40, 2, 5)
    chunks = list(stream_logits(model, ids, graph, chunk=chunk))
    got = torch.cat([logits for _, logits in chunks])
    assert [start for start, _ in chunks] == list(range(0, 40, chunk))
    torch.testing.assert_close(got, _full(model, ids, graph), rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", ["fused", "tiled"])
def test_stream_per_layer_and_per_head_graphs_float32(backend):
    model = _lm(layers=3, kv_heads=2, backend=backend).float()
    ids = torch.randint(0, 23, (37,))
    heads = topology.duo_attention(37, [1, 3], 4, num_sinks=1, window=3)
    graphs = [topology.sliding_window(37, 4, causal=True), heads, topology.causal(37)]
    got = torch.cat([logits for _, logits in stream_logits(model, ids, graphs, chunk=5)])
    torch.testing.assert_close(got, _full(model, ids, graphs), rtol=0, atol=1e-5)


def test_perplexity_matches_whole_graph_and_cache_stays_bounded():
    model = _lm()
    ids = torch.randint(0, 23, (120,))
    graph = topology.streaming(120, 4, 8)
    result = perplexity(model, ids, graph, chunk=3, bucket_size=50)
    logp = torch.log_softmax(_full(model, ids, graph), -1)[:-1]
    nll = -logp.gather(1, ids[1:].view(-1, 1)).squeeze(1)
    torch.testing.assert_close(result.nll, nll, rtol=0, atol=1e-10)
    assert math.isclose(result.perplexity, math.exp(float(nll.mean())), rel_tol=1e-12)
    assert [(b["start"], b["stop"], b["tokens"]) for b in result.buckets] == [(1, 50, 50), (51, 100, 50),
                                                                               (101, 119, 19)]
    assert math.isclose(result.buckets[1]["nll"], float(nll[50:100].mean()), rel_tol=1e-12)
    # the cache holds the sinks, the window and one chunk, never the whole stream
    assert result.peak_cache <= 4 + 8 + 3
    assert perplexity(model, ids, topology.causal(120), chunk=3).peak_cache == 120


def test_eviction_drops_only_unread_nodes():
    cache = EvictingKVCache()
    cache.add_nodes(torch.zeros(4, dtype=torch.long), torch.arange(4))
    cache.update(0, (torch.arange(4.0).view(4, 1, 1), -torch.arange(4.0).view(4, 1, 1)))
    cache.keep(torch.tensor([True, False, True, False]))
    assert cache.pos.tolist() == [0, 2] and len(cache) == 2 and cache.peak == 4
    assert cache.layers[0][0].flatten().tolist() == [0.0, 2.0]
    assert cache.layers[0][1].flatten().tolist() == [0.0, -2.0]
    with pytest.raises(ValueError, match="'mask' of shape \\[2\\]"):
        cache.keep(torch.tensor([True]))


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_streaming_generate_absolute_equals_whole_graph(position):
    model = _lm(position)
    prompt = torch.randint(0, 23, (2, 6))
    out, logits, stats = streaming_generate(model, prompt, 60, num_sinks=2, window=5, return_logits=True,
                                            return_stats=True)
    assert out.shape == (2, 66) and torch.equal(out[:, :6], prompt) and logits.shape == (60, 2, 23)
    assert stats["peak_cache"] <= 2 * max(6, 2 + 5 + 1)
    for b, row in enumerate(out):  # every step's logits are those of a forward pass on the whole graph
        full = _full(model, row, topology.streaming(66, 2, 5))
        torch.testing.assert_close(logits[:, b], full[5:-1], rtol=0, atol=1e-10)
        assert torch.equal(full[5:-1].argmax(-1), row[6:])


def test_streaming_generate_cache_positions_one_layer_matches_recompute():
    # one layer: a node's keys depend on its token and position only, so the cache's moved keys
    # equal keys computed afresh at the new cache indices
    model = _lm("rope", layers=1)
    prompt = torch.randint(0, 23, (1, 5))
    num_sinks, window = 2, 3
    out, logits = streaming_generate(model, prompt, 25, num_sinks=num_sinks, window=window, positions="cache",
                                     return_logits=True)
    row = out[0]
    for step, t in enumerate(range(4, row.numel() - 1)):  # token t + 1 was predicted by token t
        kept = [j for j in range(t + 1) if j < num_sinks or j >= t - window]
        fresh = model(row[kept], topology.causal(len(kept)), pos=torch.arange(len(kept)))[-1]
        torch.testing.assert_close(logits[step, 0], fresh, rtol=0, atol=1e-10)


def test_streaming_generate_cache_positions_before_eviction_equal_absolute():
    model = _lm("rope", layers=2)
    prompt = torch.randint(0, 23, (2, 4))
    a = streaming_generate(model, prompt, 3, num_sinks=2, window=10, positions="absolute")
    c = streaming_generate(model, prompt, 3, num_sinks=2, window=10, positions="cache")
    assert torch.equal(a, c)  # nothing left the cache: positions are the same


def test_streaming_generate_cache_positions_bounded():
    model = _lm("rope", layers=2)
    out, stats = streaming_generate(model, torch.randint(0, 23, (1, 3)), 200, num_sinks=1, window=4,
                                    positions="cache", return_stats=True)
    assert out.shape == (1, 203) and stats["peak_cache"] <= 1 + 4 + 1


def test_bad_inputs():
    model = _lm()
    ids = torch.randint(0, 23, (10,))
    with pytest.raises(ValueError, match="causal graph.*edge 1 -> 0"):
        list(stream_logits(model, ids, topology.full(10)))
    with pytest.raises(ValueError, match="nodes in \\[0, 10\\)"):
        list(stream_logits(model, ids, topology.causal(12)))
    with pytest.raises(ValueError, match="'chunk' to be an int >= 1"):
        list(stream_logits(model, ids, topology.causal(10), chunk=0))
    with pytest.raises(ValueError, match="forward_graph"):
        list(stream_logits(torch.nn.Linear(2, 2), ids, topology.causal(10)))
    with pytest.raises(ValueError, match="'ids' to be an integer tensor"):
        list(stream_logits(model, ids.double(), topology.causal(10)))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, ids[:1], topology.causal(1))
    with pytest.raises(ValueError, match="'positions'"):
        streaming_generate(model, ids.view(1, -1), 2, num_sinks=1, window=2, positions="relative")
    with pytest.raises(ValueError, match="'window' to be an int >= 0"):
        streaming_generate(model, ids.view(1, -1), 2, num_sinks=1, window=-1)
    with pytest.raises(ValueError, match="'input_ids'"):
        streaming_generate(model, ids, 2, num_sinks=1, window=2)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_stream_of_an_imported_decoder_equals_hugging_face(family):
    # the native per-layer graphs (windows and causal layers) streamed with eviction equal HF's logits
    pytest.importorskip("transformers")
    from gnn_transformer import hf
    from tests.test_hf_decoders import _model

    reference = _model(family)
    model = hf.from_hf(reference)
    ids = torch.randint(2, 50, (20,))
    graphs = [build([20]) for build in model.native_topologies()]
    got = torch.cat([logits for _, logits in stream_logits(model, ids, graphs, chunk=3)])
    with torch.no_grad():
        expected = reference(ids.view(1, -1)).logits[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
