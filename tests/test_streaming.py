"""Streams with a bounded cache (gnn_transformer.streaming) against one forward pass on the whole graph."""

import math

import pytest
import torch

from gnn_transformer import GraphLM, GraphTransformerConfig, dense, topology
from gnn_transformer.decoding import generate
from gnn_transformer.streaming import (
    EvictingKVCache,
    HeavyHitterCache,
    h2o_generate,
    perplexity,
    stream_logits,
    streaming_generate,
)
from tests.conftest import perturbed


def _lm(position="rope", layers=2, kv_heads=None, backend="pyg", seed=0):
    torch.manual_seed(seed)
    config = GraphTransformerConfig(
        vocab_size=23,
        d_model=16,
        nhead=4,
        num_layers=layers,
        position=position,
        num_kv_heads=kv_heads,
        backend=backend,
        max_positions=512,
    )
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


@pytest.mark.parametrize("backend", ["fused", "tiled"])
def test_stream_one_per_head_graph_for_every_layer(backend):
    """A per-head pair ``(edge_index, edge_head)`` shared by every layer (``perplexity --topology
    duo_attention:...``) streams as the whole graph computes."""
    model = _lm(layers=2, kv_heads=2, backend=backend).float()
    ids = torch.randint(0, 23, (37,))
    heads = topology.duo_attention(37, [1, 3], 4, num_sinks=1, window=3)
    got = torch.cat([logits for _, logits in stream_logits(model, ids, heads, chunk=5)])
    torch.testing.assert_close(got, _full(model, ids, [heads, heads]), rtol=0, atol=1e-5)


def test_perplexity_matches_whole_graph_and_cache_stays_bounded():
    model = _lm()
    ids = torch.randint(0, 23, (120,))
    graph = topology.streaming(120, 4, 8)
    result = perplexity(model, ids, graph, chunk=3, bucket_size=50)
    logp = torch.log_softmax(_full(model, ids, graph), -1)[:-1]
    nll = -logp.gather(1, ids[1:].view(-1, 1)).squeeze(1)
    torch.testing.assert_close(result.nll, nll, rtol=0, atol=1e-10)
    assert math.isclose(result.perplexity, math.exp(float(nll.mean())), rel_tol=1e-12)
    assert [(b["start"], b["stop"], b["tokens"]) for b in result.buckets] == [
        (1, 50, 50),
        (51, 100, 50),
        (101, 119, 19),
    ]
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
    out, logits, stats = streaming_generate(
        model, prompt, 60, num_sinks=2, window=5, return_logits=True, return_stats=True
    )
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
    _assert_cache_positions_match_recompute(model, torch.randint(0, 23, (1, 5)), 25, model)


def _assert_cache_positions_match_recompute(model, prompt, steps, forward):
    """Each step's logits of ``streaming_generate(positions="cache")`` (2 sinks, a window of 3)
    equal ``forward`` on the kept tokens at their cache indices, computed afresh."""
    num_sinks, window = 2, 3
    out, logits = streaming_generate(
        model, prompt, steps, num_sinks=num_sinks, window=window, positions="cache", return_logits=True
    )
    row = out[0]
    for step, t in enumerate(range(prompt.size(1) - 1, row.numel() - 1)):  # token t + 1 was predicted by token t
        kept = [j for j in range(t + 1) if j < num_sinks or j >= t - window]
        with torch.no_grad():
            fresh = forward(row[kept], topology.causal(len(kept)), pos=torch.arange(len(kept)))[-1]
        torch.testing.assert_close(logits[step, 0], fresh, rtol=0, atol=1e-10)


def test_streaming_generate_cache_positions_before_eviction_equal_absolute():
    model = _lm("rope", layers=2)
    prompt = torch.randint(0, 23, (2, 4))
    a = streaming_generate(model, prompt, 3, num_sinks=2, window=10, positions="absolute")
    c = streaming_generate(model, prompt, 3, num_sinks=2, window=10, positions="cache")
    assert torch.equal(a, c)  # nothing left the cache: positions are the same


def test_streaming_generate_cache_positions_bounded():
    model = _lm("rope", layers=2)
    out, stats = streaming_generate(
        model, torch.randint(0, 23, (1, 3)), 200, num_sinks=1, window=4, positions="cache", return_stats=True
    )
    assert out.shape == (1, 203) and stats["peak_cache"] <= 1 + 4 + 1


def test_bad_inputs():
    model = _lm()
    ids = torch.randint(0, 23, (10,))
    with pytest.raises(ValueError, match="causal graph.*edge 1 -> 0"):
        list(stream_logits(model, ids, topology.full(10)))
    with pytest.raises(ValueError, match="nodes in \\[0, 10\\)"):
        list(stream_logits(model, ids, topology.causal(12).as_tensor()))
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


def test_cache_positions_refuse_longrope():
    # LongRoPE's frequencies depend on the length of the call that rotated a key: it cannot be moved
    pytest.importorskip("transformers")
    from gnn_transformer import hf
    from tests.test_hf_longrope import _model

    model = hf.from_hf(_model())
    ids = torch.randint(2, 50, (1, 6))
    with pytest.raises(ValueError, match="positions='cache'.*'longrope' RoPE scaling changes the frequencies"):
        streaming_generate(model, ids, 4, num_sinks=1, window=2, positions="cache")
    assert streaming_generate(model, ids, 4, num_sinks=1, window=2).shape == (1, 10)


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


# ---------------------------------------------------------------- heavy hitters (H2O)
def _dense_lm(model, ids, masks):
    """A pre-norm GraphLM on one sequence with a dense mask per layer ``[H, n, n]``, written with the
    dense reference: logits ``[n, V]`` and the attention weights of every layer ``[L, H, n, n]``."""
    n = ids.numel()
    pos = torch.arange(n).view(1, n)
    h = model.embed(ids.view(1, n))  # [1, n, C]
    if model.config.position == "learned":
        h = h + model.pos_embed.weight[pos]
    weights = []
    for layer, mask in zip(model.encoder.layers, masks):
        attn, x = layer.self_attn, layer.norm1(h)
        w_q, _, _ = attn.projection_weights()
        b_q, _, _ = attn.projection_biases()
        query = torch.nn.functional.linear(x, w_q, b_q).view(1, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        if attn.rotary is not None:
            query = dense.apply_rope(query, pos, attn.rotary.base)
        key, value = dense.key_value(attn, x, pos_key=pos)  # [1, H_kv, n, D]
        out, w = dense.scaled_dot_product(query, key, value, mask.unsqueeze(0))  # [1, H, n, D], [1, H, n, n]
        h = h + attn.out_proj(out.transpose(1, 2).reshape(1, n, -1))
        h = h + layer.linear2(layer.activation(layer.linear1(layer.norm2(h))))
        weights.append(w[0])
    return model.head(model.encoder.norm(h))[0], torch.stack(weights)


def _graph_decoder(model, ids, masks):
    """A GraphDecoderLM's whole-sequence forward on per-head graphs from dense masks ``[L, H, n, n]``,
    its weights made dense."""
    n = ids.numel()
    graphs = []
    for mask in masks:
        head, dst, src = mask.nonzero(as_tuple=True)
        order = torch.argsort(dst, stable=True)
        graphs.append((torch.stack([src[order], dst[order]]), head[order]))
    logits, weights = model.forward_graph(ids, graphs, pos=torch.arange(n), output_attentions=True)
    out = torch.zeros(masks.shape, dtype=logits.dtype)
    for index, ((edge_index, head), w) in enumerate(zip(graphs, weights)):
        out[index, head, edge_index[1], edge_index[0]] = w
    return logits, out


@torch.no_grad()
def _h2o_reference(forward, row, prompt, steps, heavy, recent, per_head, layers, heads, kv_heads=None):
    """H2O on one sequence, step by step on dense masks: every step recomputes the whole sequence
    on the graph chosen so far, takes each key's accumulated score as the sum of its column of
    weights, and keeps the ``recent`` last tokens and the ``heavy`` best-scored cached others: per
    layer, or with ``per_head`` per key/value head from the scores of its group of query heads."""
    total = prompt + steps
    allowed = torch.zeros(layers, heads, total, total, dtype=torch.bool)  # [L, H, i, j]: i reads j
    allowed[:, :, :prompt, :prompt] = torch.ones(prompt, prompt, dtype=torch.bool).tril()
    cached = [[set(range(prompt)) for _ in range(heads)] for _ in range(layers)]
    all_logits, all_kept = [], torch.zeros(steps, layers, heads, total, dtype=torch.bool)
    for step in range(steps):
        n = prompt + step  # tokens computed: 0 .. n - 1
        if step:
            for layer in range(layers):
                for head in range(heads):
                    cached[layer][head].add(n - 1)
                    allowed[layer, head, n - 1, sorted(cached[layer][head])] = True
        logits, weights = forward(row[:n], allowed[:, :, :n, :n])
        all_logits.append(logits[n - 1])
        score = weights.sum(2)  # [L, H, n]: attention each key received from every query so far
        for layer in range(layers):
            size = heads // (kv_heads or heads)  # query heads per key/value head
            groups = [list(range(g, g + size)) for g in range(0, heads, size)] if per_head else [list(range(heads))]
            for group in groups:
                s = score[layer, group].sum(0)
                pool = cached[layer][group[0]]
                keep = {j for j in pool if j >= n - recent}
                others = sorted((j for j in pool if j < n - recent), key=lambda j: (-float(s[j]), j))
                keep |= set(others[:heavy])
                for head in group:
                    cached[layer][head] = set(keep)
                    all_kept[step, layer, head, sorted(keep)] = True
    return torch.stack(all_logits), all_kept


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("position,kv_heads", [("rope", None), ("learned", 2), ("rope", 2)])
def test_h2o_matches_dense_step_by_step_reference(per_head, position, kv_heads):
    model = _lm(position, layers=2, kv_heads=kv_heads)
    prompt, steps, heavy, recent = 6, 14, 3, 2
    ids = torch.randint(0, 23, (2, prompt), generator=torch.Generator().manual_seed(1))
    out, logits, kept = h2o_generate(
        model, ids, steps, heavy=heavy, recent=recent, per_head=per_head, return_logits=True, return_kept=True
    )
    assert kept.shape == (steps, 2, 2, 4, prompt + steps)
    for b, row in enumerate(out):
        want_logits, want_kept = _h2o_reference(
            lambda x, m: _dense_lm(model, x, m), row, prompt, steps, heavy, recent, per_head, 2, 4, kv_heads
        )
        assert torch.equal(kept[:, :, b], want_kept)
        torch.testing.assert_close(logits[:, b], want_logits, rtol=0, atol=1e-10)
        assert torch.equal(want_logits.argmax(-1), row[prompt:])
    if per_head and position == "rope":  # the key/value heads chose differently: a per-head graph
        assert not torch.equal(kept, kept[:, :, :, :1].expand_as(kept))  # (the learned model's rank by age)


@pytest.mark.parametrize("per_head", [False, True])
def test_h2o_of_an_imported_decoder_matches_reference(per_head):
    pytest.importorskip("transformers")
    from gnn_transformer import hf
    from tests.test_hf_decoders import _model

    model = hf.from_hf(_model("llama")).double()  # grouped-query attention: 4 query heads, 2 key/value heads
    ids = torch.randint(2, 50, (1, 5))
    out, logits, kept = h2o_generate(
        model, ids, 10, heavy=2, recent=3, per_head=per_head, return_logits=True, return_kept=True
    )
    want_logits, want_kept = _h2o_reference(
        lambda x, m: _graph_decoder(model, x, m), out[0], 5, 10, 2, 3, per_head, 3, 4, kv_heads=2
    )
    assert torch.equal(kept[:, :, 0], want_kept)
    torch.testing.assert_close(logits[:, 0], want_logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("per_head", [False, True])
def test_h2o_memory_is_bounded(per_head):
    model = _lm("rope", layers=2)
    heavy, recent = 3, 4
    out, stats, kept = h2o_generate(
        model,
        torch.randint(0, 23, (3, 4)),
        150,
        heavy=heavy,
        recent=recent,
        per_head=per_head,
        return_stats=True,
        return_kept=True,
    )
    assert out.shape == (3, 154)
    assert stats["peak_per_head"] == heavy + recent + 1  # every head reads at most the budget and itself
    assert int(kept.sum(-1).max()) == heavy + recent
    # every key/value head stores its own kept tokens: one sequence's rows are its fullest head's
    assert stats["peak_per_sequence"] == heavy + recent + 1 and stats["peak_cache"] == 3 * (heavy + recent + 1)


def _record_stored_shapes(monkeypatch) -> list:
    """The shapes of the keys and values every layer's attention reads from the H2O cache, per call,
    with the cache's rows per sequence: ``(keys.shape, values.shape, rows of each sequence [B])``."""
    from gnn_transformer.streaming import HeavyHitterCache

    calls, update = [], HeavyHitterCache.update

    def recording(self, index, kv):
        k, v = update(self, index, kv)
        calls.append((tuple(k.shape), tuple(v.shape), torch.bincount(self.nodes[index].seq).tolist()))
        return k, v

    monkeypatch.setattr(HeavyHitterCache, "update", recording)
    return calls


@pytest.mark.parametrize("model_kind", ["graph_lm", "llama"])
def test_h2o_per_head_stores_each_kv_heads_own_tokens(model_kind, monkeypatch):
    """Per-head H2O stores per layer and key/value head exactly its own ``heavy + recent`` tokens
    (and the new one): the keys and values every attention call reads are ``[M, H_kv, D]`` with at
    most ``heavy + recent + 1`` rows per sequence at every step, while the union of the tokens the
    heads keep, which a cache of whole nodes would hold, exceeds that."""
    if model_kind == "llama":
        pytest.importorskip("transformers")
        from gnn_transformer import hf
        from tests.test_hf_decoders import _model

        model, heads, kv_heads, dim = hf.from_hf(_model("llama")).double(), 4, 2, 8  # grouped-query attention
    else:
        model, heads, kv_heads, dim = _lm("rope", layers=2), 4, 4, 4
    heavy, recent, prompt, batch, steps = 3, 2, 6, 2, 30  # the prompt fits the bound: every step obeys it
    calls = _record_stored_shapes(monkeypatch)
    ids = torch.randint(2, 23, (batch, prompt), generator=torch.Generator().manual_seed(1))
    out, kept = h2o_generate(model, ids, steps, heavy=heavy, recent=recent, per_head=True, return_kept=True)
    layers = kept.size(1)
    assert len(calls) == steps * layers
    for k_shape, v_shape, rows in calls:
        assert k_shape == v_shape and k_shape[1:] == (kv_heads, dim)
        assert k_shape[0] == sum(rows) and len(rows) == batch and max(rows) <= heavy + recent + 1
    assert max(max(rows) for _, _, rows in calls[layers:]) == heavy + recent + 1  # the bound is reached
    # each key/value head keeps heavy + recent tokens (its query heads alike); their union is more
    assert int(kept.sum(-1).max()) == heavy + recent
    group = heads // kv_heads
    assert torch.equal(kept, kept[:, :, :, ::group].repeat_interleave(group, dim=3))
    union = kept.any(3).sum(-1)  # [steps, L, B]: the tokens some head of the layer keeps
    assert int(union.max()) + 1 > heavy + recent + 1  # what a cache of whole nodes would store


def test_h2o_without_heavy_hitters_is_a_causal_window():
    model = _lm("rope", layers=2)
    recent = 4
    short = torch.randint(0, 23, (2, recent + 1))  # the prompt fits in the window: the whole stream is one
    a, la = h2o_generate(model, short, 30, heavy=0, recent=recent, return_logits=True)
    b, lb = streaming_generate(model, short, 30, num_sinks=0, window=recent, return_logits=True)
    assert torch.equal(a, b)
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-10)
    # a longer prompt is read causally, the tokens after it through a window of radius `recent`
    out, logits = h2o_generate(model, torch.randint(0, 23, (1, 9)), 20, heavy=0, recent=recent, return_logits=True)
    i, j = torch.arange(29).view(-1, 1), torch.arange(29).view(1, -1)
    mask = (j <= i) & ((i < 9) | (j >= i - recent))  # [29, 29]
    dst, src = mask.nonzero(as_tuple=True)
    full = _full(model, out[0], torch.stack([src, dst]))
    torch.testing.assert_close(logits[:, 0], full[8:-1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("per_head", [False, True])
def test_h2o_with_room_for_everything_is_causal_generation(per_head):
    model = _lm("rope", layers=2, kv_heads=2)
    prompt = torch.randint(0, 23, (2, 5))
    a, la = h2o_generate(model, prompt, 12, heavy=20, recent=0, per_head=per_head, return_logits=True)
    b, lb = generate(model, prompt, 12, return_logits=True)
    assert torch.equal(a, b)
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-10)


def test_h2o_bad_inputs():
    model = _lm()
    ids = torch.randint(0, 23, (1, 4))
    with pytest.raises(ValueError, match="'heavy' to be an int >= 0"):
        h2o_generate(model, ids, 2, heavy=-1, recent=2)
    with pytest.raises(ValueError, match="'recent' to be an int >= 0"):
        h2o_generate(model, ids, 2, heavy=1, recent=2.0)
    with pytest.raises(ValueError, match="'per_head' to be a bool"):
        h2o_generate(model, ids, 2, heavy=1, recent=2, per_head=1)
    with pytest.raises(ValueError, match="'input_ids'"):
        h2o_generate(model, ids[0], 2, heavy=1, recent=2)
    with pytest.raises(ValueError, match="'max_new_tokens'"):
        h2o_generate(model, ids, -1, heavy=1, recent=2)
    with pytest.raises(ValueError, match="ALiBi"):
        h2o_generate(_lm("alibi"), ids, 2, heavy=1, recent=2)
    config = GraphTransformerConfig(vocab_size=23, d_model=16, nhead=4, num_layers=2, kv_share_every=2, backend="pyg")
    with pytest.raises(ValueError, match="kv_share_every=2"):
        h2o_generate(GraphLM(config).eval(), ids, 2, heavy=1, recent=2)
    with pytest.raises(ValueError, match="forward_graph"):
        h2o_generate(torch.nn.Linear(2, 2), ids, 2, heavy=1, recent=2)
    with pytest.raises(ValueError, match=r"'num_heads' \(4\) divisible by 'num_kv_heads' \(3\)"):
        HeavyHitterCache(4, 3)
    with pytest.raises(ValueError, match="'num_kv_heads' to be an int >= 1"):
        HeavyHitterCache(4, 0)


def test_perplexity_of_a_saved_hugging_face_model_equals_its_own_logits(tmp_path):
    # what `perplexity --hf-dir` does, at library level: a saved directory, its native per-layer graphs
    pytest.importorskip("transformers")
    from gnn_transformer import hf
    from tests.test_hf_decoders import _model

    reference = _model("mistral")  # sliding window of 4 keys in every layer
    reference.save_pretrained(tmp_path / "mistral")
    model = hf.from_pretrained(tmp_path / "mistral", backend="pyg")
    ids = torch.randint(2, 50, (30,))
    graphs = [build([30]) for build in model.native_topologies()]
    result = perplexity(model, ids, graphs, chunk=7, bucket_size=10)
    with torch.no_grad():
        logits = reference(ids.view(1, -1)).logits[0].double()  # [T, V]
    nll = -torch.log_softmax(logits[:-1], -1).gather(1, ids[1:].view(-1, 1)).squeeze(1)
    torch.testing.assert_close(result.nll, nll, rtol=0, atol=1e-5)
    assert math.isclose(result.perplexity, math.exp(float(nll.mean())), rel_tol=1e-5)
    assert result.peak_cache == 3 + 7  # the keys the window still reads before a chunk, and the chunk


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_cache_positions_refuse_positions_added_to_the_embeddings(position):
    """positions='cache' moves nodes by rotating their rotary keys; an added position embedding
    stays in the cached keys and values at the index a node was computed at, so it is refused."""
    model = _lm(position, layers=1)
    prompt = torch.randint(0, 23, (1, 5))
    with pytest.raises(
        ValueError, match=r"positions='cache'.*adds its positions to the token embeddings \(pos_embed\)"
    ):
        streaming_generate(model, prompt, 4, num_sinks=1, window=2, positions="cache")
    assert streaming_generate(model, prompt, 4, num_sinks=1, window=2).shape == (1, 9)


def _forward_calls(monkeypatch, model) -> list:
    calls: list = []
    real = model.forward_graph
    monkeypatch.setattr(model, "forward_graph", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(greedy=False, temperature=-0.5), "'temperature' to be a positive finite number \\(got -0.5\\)"),
        (dict(greedy=False, temperature=0), "'temperature'.*got 0"),
        (dict(greedy="no"), "'greedy' to be a bool \\(got 'no'\\)"),
        (dict(greedy=False, top_k=0), "'top_k' to be a positive int or None \\(got 0\\)"),
        (dict(greedy=False, top_k=2.5), "'top_k'.*2.5"),
        (dict(greedy=False, generator=0), "'generator' to be a torch.Generator or None \\(got 0\\)"),
        (dict(return_logits="yes"), "'return_logits' to be a bool"),
        (dict(return_stats=1), "'return_stats' to be a bool"),
    ],
)
@pytest.mark.parametrize("which", ["streaming", "h2o"])
def test_generators_check_sampling_before_the_prompt_runs(which, kwargs, message, monkeypatch):
    model = _lm()
    calls = _forward_calls(monkeypatch, model)
    prompt = torch.randint(0, 23, (1, 4))
    with pytest.raises(ValueError, match=message):
        if which == "streaming":
            streaming_generate(model, prompt, 3, num_sinks=1, window=2, **kwargs)
        else:
            h2o_generate(model, prompt, 3, heavy=1, recent=2, **kwargs)
    assert calls == []


def test_learned_position_table_is_checked_before_the_prompt_runs(monkeypatch):
    torch.manual_seed(0)
    config = GraphTransformerConfig(vocab_size=23, d_model=16, nhead=4, num_layers=1, max_positions=16, backend="pyg")
    model = GraphLM(config).eval()
    calls = _forward_calls(monkeypatch, model)
    prompt = torch.randint(0, 23, (1, 8))
    table = "for the model's 16 learned positions"
    with pytest.raises(ValueError, match=f"'max_new_tokens' small enough {table}.*reads position 17"):
        streaming_generate(model, prompt, 11, num_sinks=1, window=2)
    with pytest.raises(ValueError, match=f"'max_new_tokens' small enough {table}.*reads position 17"):
        h2o_generate(model, prompt, 11, heavy=1, recent=2)
    with pytest.raises(ValueError, match=f"'ids' of at most 16 tokens {table} \\(got 17\\)"):
        perplexity(model, torch.randint(0, 23, (17,)), topology.causal(17))
    assert calls == []
    assert streaming_generate(model, prompt, 9, num_sinks=1, window=2).shape == (1, 17)  # position 15 fits


def test_prompt_step_builds_no_dense_matrix(monkeypatch):
    """The prompt's edges come from the streaming builder; the [cached, new] matrix of
    _streaming_edges is only built for one new token per sequence."""
    from gnn_transformer import streaming

    sizes = []
    real = streaming._streaming_edges
    monkeypatch.setattr(streaming, "_streaming_edges", lambda c, n, s, w: sizes.append(n) or real(c, n, s, w))
    model = _lm("rope", layers=2)
    prompt = torch.randint(0, 23, (2, 9))
    out, logits = streaming_generate(model, prompt, 5, num_sinks=2, window=3, return_logits=True)
    assert sizes == [2] * 4
    whole = topology.streaming([13, 13], 2, 3)  # the prompt and the 4 tokens fed back
    ids = out[:, :-1].reshape(-1)
    with torch.no_grad():
        full = model(ids, whole, pos=torch.arange(13).repeat(2)).view(2, 13, -1)
    torch.testing.assert_close(logits, full[:, 8:].transpose(0, 1), rtol=0, atol=1e-10)


def test_stream_refuses_a_graph_built_for_fewer_tokens():
    model = _lm()
    ids = torch.randint(0, 23, (30,))
    with pytest.raises(
        ValueError, match=r"graph 0 on the 30 tokens of 'ids' \(got an EdgeIndex of sparse size \(20, 20\)\)"
    ):
        perplexity(model, ids, topology.causal(20))
    with pytest.raises(ValueError, match="graph 1 on the 30 tokens"):
        perplexity(model, ids, [topology.causal(30), topology.causal(20)])


def test_h2o_kept_trace_is_refused_past_its_budget(monkeypatch):
    from gnn_transformer import streaming

    monkeypatch.setattr(streaming, "MAX_KEPT_CELLS", 1000)
    model = _lm()
    prompt = torch.randint(0, 23, (1, 4))
    with pytest.raises(
        ValueError,
        match="kept-set trace of at most 1000 cells.*20 steps x 2 layers x 1 prompts x 4 heads x 24 tokens = 3840",
    ):
        h2o_generate(model, prompt, 20, heavy=1, recent=2, return_kept=True)
    assert h2o_generate(model, prompt, 5, heavy=1, recent=2, return_kept=True)[1].shape == (5, 2, 1, 4, 9)


def test_heavy_hitters_break_ties_toward_the_earlier_token():
    """H2O keeps the ``heavy`` candidates of largest accumulated attention per sequence and column;
    equal scores go to the earlier token (h2o_generate's docstring). Rows interleave two
    sequences, as the cache appends one token per sequence and step; column 1 has other scores."""
    from gnn_transformer.streaming import _heavy_hitters

    seq = torch.tensor([0, 1, 0, 1, 0, 1])
    score = torch.tensor([[1.0, 5.0], [1.0, 1.0], [1.0, 5.0], [3.0, 1.0], [2.0, 5.0], [1.0, 1.0]])
    candidate = torch.ones(6, 2, dtype=torch.bool)
    chosen = _heavy_hitters(score, candidate, seq, 2, 2)
    # column 0: sequence 0 keeps row 4 (2.0) and row 0 (tied at 1.0 with row 2, earlier);
    #           sequence 1 keeps row 3 (3.0) and row 1 (tied with row 5, earlier)
    # column 1: sequence 0 has three rows at 5.0: rows 0 and 2; sequence 1 three at 1.0: rows 1 and 3
    expected = torch.tensor([[1, 1], [1, 1], [0, 1], [1, 1], [1, 0], [0, 0]], dtype=torch.bool)
    assert torch.equal(chosen, expected)
    # a row that is no candidate is never chosen, even when it would win the tie
    candidate[0, 0] = False
    chosen = _heavy_hitters(score, candidate, seq, 2, 2)
    assert chosen[:, 0].tolist() == [False, True, True, True, True, False]


def test_h2o_scores_sum_each_key_value_heads_own_query_heads():
    """The attention a slot received is summed over the query heads of its key/value head's group
    (query head ``h`` reads key/value head ``h // group``), on a per-head graph as on a shared one."""
    from gnn_transformer.streaming import _accumulate, _LayerNodes

    def nodes():  # two slots of one sequence, two key/value heads (four query heads, groups of two)
        return _LayerNodes(
            torch.zeros(2, dtype=torch.long),
            torch.zeros(2, 2, dtype=torch.long),
            torch.zeros(2, 2, dtype=torch.float64),
            torch.ones(2, 2, dtype=torch.bool),
        )

    w = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)  # query heads 0..3 read slot 0
    per_head = nodes()
    _accumulate(per_head, (torch.zeros(2, 4, dtype=torch.long), torch.arange(4)), w, 2)
    shared = nodes()
    _accumulate(shared, torch.zeros(2, 1, dtype=torch.long), w.view(1, 4), 2)
    for result in (per_head, shared):
        assert result.score.tolist() == [[3.0, 12.0], [0.0, 0.0]]


def test_cache_positions_refuse_dynamic_ntk():
    # dynamic NTK's frequencies depend on the length of the call that rotated a key, as LongRoPE's
    pytest.importorskip("transformers")
    from gnn_transformer import hf
    from tests.test_hf_decoders import _model

    rope = {"rope_theta": 500.0, "rope_type": "dynamic", "factor": 2.0}
    model = hf.from_hf(_model("llama", max_position_embeddings=8, rope_parameters=rope))
    ids = torch.randint(2, 50, (1, 6))
    with pytest.raises(ValueError, match="positions='cache'.*'dynamic' RoPE scaling changes the frequencies"):
        streaming_generate(model, ids, 4, num_sinks=1, window=2, positions="cache")
    assert streaming_generate(model, ids, 4, num_sinks=1, window=2).shape == (1, 10)


def test_streaming_generate_cache_positions_move_yarn_keys_exactly():
    """YaRN scales cos and sin by its attention factor; keys moved to their new cache index equal
    keys computed afresh there (one layer: a key depends on its token and position only)."""
    pytest.importorskip("transformers")
    from gnn_transformer import hf
    from tests.test_hf_decoders import _model

    rope = {"rope_theta": 500.0, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4}
    model = hf.from_hf(_model("llama", num_hidden_layers=1, rope_parameters=rope), backend="pyg").double()
    _assert_cache_positions_match_recompute(model, torch.randint(2, 50, (1, 5)), 12, model.forward_graph)


def test_generators_take_a_prompt_that_fills_the_position_table():
    """A prompt of exactly the table's 16 positions reads positions 0 .. 15: one new token fits;
    with no new token nothing is read, so even a longer prompt comes back as it is."""
    torch.manual_seed(0)
    config = GraphTransformerConfig(vocab_size=23, d_model=16, nhead=4, num_layers=1, max_positions=16, backend="pyg")
    model = GraphLM(config).eval()
    prompt = torch.randint(0, 23, (1, 16))
    out, logits = streaming_generate(model, prompt, 1, num_sinks=1, window=2, return_logits=True)
    with torch.no_grad():
        full = model(prompt[0], topology.streaming(16, 1, 2), pos=torch.arange(16))
    torch.testing.assert_close(logits[0, 0], full[-1], rtol=0, atol=1e-6)
    assert h2o_generate(model, prompt, 1, heavy=1, recent=2).shape == (1, 17)
    longer = torch.randint(0, 23, (2, 20))
    assert torch.equal(streaming_generate(model, longer, 0, num_sinks=1, window=2), longer)
    assert torch.equal(h2o_generate(model, longer, 0, heavy=1, recent=2), longer)


def test_stream_takes_per_layer_graphs_as_a_tuple():
    """A tuple of two edge_index tensors is one graph per layer (not an (edge_index, edge_head)
    pair, whose edge_head is 1-D): it streams as the list of the same graphs, as the whole graph."""
    model = _lm(layers=2)
    ids = torch.randint(0, 23, (20,))
    graphs = (topology.sliding_window(20, 2, causal=True), topology.causal(20))
    got = torch.cat([logits for _, logits in stream_logits(model, ids, graphs, chunk=6)])
    torch.testing.assert_close(got, _full(model, ids, list(graphs)), rtol=0, atol=1e-10)


def test_h2o_refuses_a_model_whose_attention_selects_its_own_graph():
    """The heavy hitters decide the graph each step: a model whose attention picks its own keys is
    refused before the prompt runs."""
    torch.manual_seed(0)
    config = GraphTransformerConfig(
        vocab_size=23,
        d_model=16,
        nhead=4,
        num_layers=2,
        position="rope",
        backend="pyg",
        select="block_topk:block_size=2,num_blocks=1,causal=true",
    )
    model = GraphLM(config).double().eval()
    ids = torch.randint(0, 23, (1, 6))
    with pytest.raises(ValueError, match="attention does not select its own graph.*heavy hitters decide the graph"):
        h2o_generate(model, ids, 3, heavy=1, recent=2)


def test_h2o_refuses_layers_with_different_numbers_of_heads():
    """Every layer's heavy-hitter cache has one layout of heads: a layer with other numbers of query
    and key/value heads than the others is refused."""
    from gnn_transformer import GraphMultiheadAttention

    model = _lm("rope", layers=2)  # 4 heads per layer
    model.encoder.layers[1].self_attn = GraphMultiheadAttention(16, 2, rope=True, backend="pyg").double()
    ids = torch.randint(0, 23, (1, 6))
    heads = r"same numbers of query and key/value heads in every layer \(got \[\(2, 2\), \(4, 4\)\]\)"
    with pytest.raises(ValueError, match=heads):
        h2o_generate(model, ids, 3, heavy=1, recent=2)


class _OneMoreCachedLayer(torch.nn.Module):
    """A one-layer LM that also caches a second layer (its first layer's new keys and values again),
    with a single GraphMultiheadAttention."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward_graph(self, ids, edge_index, pos=None, cache=None):
        out = self.lm.forward_graph(ids, edge_index, pos=pos, cache=cache)
        k, v = cache.layers[0]
        new = ids.numel()
        cache.update(1, (k[-new:].clone(), v[-new:].clone()))
        return out


def test_cache_positions_refuse_more_cached_layers_than_attention_modules():
    """positions='cache' re-rotates every cached layer's keys with that layer's rotary embedding: a
    cache with a layer no GraphMultiheadAttention owns is refused with a ValueError (absolute
    positions move nothing and run)."""
    model = _OneMoreCachedLayer(_lm("rope", layers=1))
    ids = torch.randint(0, 23, (1, 6))
    assert streaming_generate(model, ids, 3, num_sinks=1, window=2).shape == (1, 9)
    with pytest.raises(ValueError, match=r"one GraphMultiheadAttention per cached layer.*found 1 for 2 layers"):
        streaming_generate(model, ids, 3, num_sinks=1, window=2, positions="cache")
