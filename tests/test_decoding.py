"""Incremental decoding with a key/value cache equals a full recompute, token by token."""

import pytest
import torch

from gnn_transformer import GraphLM, GraphTransformerConfig
from gnn_transformer.decoding import KVCache, generate, step_edges
from gnn_transformer.topology import causal, sliding_window

TOL = dict(atol=1e-5, rtol=1e-5)


def _lm(**kw):
    config = GraphTransformerConfig(
        **{"vocab_size": 17, "d_model": 16, "nhead": 4, "num_layers": 3, "max_positions": 32, "backend": "pyg", **kw}
    )
    return GraphLM(config).eval()


def _prompts():
    ids = torch.randint(0, 17, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5])
    return ids, mask


@pytest.mark.parametrize(
    "kw,window",
    [
        (dict(position="learned"), None),
        (dict(position="rope", num_kv_heads=2), 2),
        (dict(position="alibi"), 2),
        (dict(position="sinusoidal", norm_first=False), None),
        (dict(position="rope", kv_share_every=2), None),
        (dict(position="learned", attention="sigmoid"), 2),
    ],
    ids=["learned", "rope-gqa-window", "alibi-window", "sinusoidal-postnorm", "rope-cla", "sigmoid-window"],
)
def test_cached_generation_equals_full_recompute(kw, window):
    model = _lm(**kw)
    ids, mask = _prompts()
    out, logits = generate(model, ids, 6, attention_mask=mask, window=window, return_logits=True)
    ref, ref_logits = generate(model, ids, 6, attention_mask=mask, window=window, use_cache=False, return_logits=True)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    assert torch.equal(out, ref)
    assert out.shape == (3, 12) and logits.shape == (6, 3, 17)
    assert torch.equal(out[1, :3], ids[1, :3]) and (out[2, 7:] == 0).all()


def test_step_logits_equal_the_full_forward_at_each_position():
    model = _lm(position="rope")
    ids, mask = _prompts()
    out, logits = generate(model, ids, 5, attention_mask=mask, return_logits=True)
    lengths = mask.sum(1)
    for b in range(3):
        seq = out[b, : int(lengths[b]) + 5]
        n = seq.numel()
        full_logits = model(seq, causal(n), pos=torch.arange(n))  # [n, V]
        torch.testing.assert_close(logits[:, b], full_logits[int(lengths[b]) - 1 : n - 1], **TOL)


def test_sliding_window_decoding_uses_the_window():
    model = _lm(position="learned")
    ids = torch.randint(0, 17, (1, 7))
    _, logits = generate(model, ids, 1, return_logits=True, window=2)
    full = model(ids[0], sliding_window(7, 2, causal=True), pos=torch.arange(7))
    torch.testing.assert_close(logits[0, 0], full[-1], **TOL)
    _, causal_logits = generate(model, ids, 1, return_logits=True)
    assert not torch.allclose(logits, causal_logits)


def test_gpt2_generation_with_cache_matches_hf():
    transformers = pytest.importorskip("transformers")
    from gnn_transformer import hf

    config = transformers.GPT2Config(
        vocab_size=29,
        n_embd=16,
        n_layer=2,
        n_head=4,
        n_positions=32,
        initializer_range=0.3,
        bos_token_id=0,
        eos_token_id=None,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    graph = hf.from_hf(model, backend="pyg")
    ids, mask = torch.randint(0, 29, (2, 5)), torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])
    out, logits = generate(graph, ids, 6, attention_mask=mask, return_logits=True)
    ref, ref_logits = generate(graph, ids, 6, attention_mask=mask, use_cache=False, return_logits=True)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    assert torch.equal(out, ref)
    hf_out = model.generate(
        ids[:1], attention_mask=mask[:1], max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    assert hf_out.shape == (1, 11) and torch.equal(out[0], hf_out[0])


def test_sampling_is_reproducible_and_cache_bookkeeping():
    model = _lm(position="learned")
    ids = torch.randint(0, 17, (2, 4))
    a = generate(model, ids, 5, greedy=False, top_k=5, generator=torch.Generator().manual_seed(1))
    b = generate(model, ids, 5, greedy=False, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 9)
    cache = KVCache()
    cache.add_nodes(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]))
    k = torch.randn(3, 2, 4)
    assert cache.update(0, (k, k))[0].shape == (3, 2, 4) and len(cache) == 3
    cache.add_nodes(torch.tensor([0, 1]), torch.tensor([2, 1]))
    assert cache.update(0, (k[:2], k[:2]))[0].shape == (5, 2, 4)
    edges = step_edges(cache.seq, cache.pos, 2)
    assert edges.tolist() == [[0, 1, 3, 2, 4], [0, 0, 0, 1, 1]]


def test_errors():
    model = _lm()
    ids = torch.randint(0, 17, (2, 4))
    with pytest.raises(ValueError, match="'max_new_tokens'.*-1"):
        generate(model, ids, -1)
    with pytest.raises(ValueError, match="'input_ids'"):
        generate(model, ids[0], 2)
    with pytest.raises(ValueError, match="'window'.*-2"):
        generate(model, ids, 2, window=-2)
    with pytest.raises(ValueError, match="lengths \\[4, 0\\]"):
        generate(model, ids, 2, attention_mask=torch.tensor([[1] * 4, [0] * 4]))
    with pytest.raises(ValueError, match="forward_graph"):
        generate(torch.nn.Linear(2, 2), ids, 2)
    for kwargs, match in (
        ({"temperature": -1.0}, "'temperature'.*-1.0"),
        ({"temperature": 0.0}, "'temperature'.*0.0"),
        ({"top_k": 0}, "'top_k'.*0"),
        ({"top_k": -1}, "'top_k'.*-1"),
    ):
        with pytest.raises(ValueError, match=match):
            generate(model, ids, 2, greedy=False, **kwargs)
    with pytest.raises(ValueError, match=r"'attention_mask'.*\[2, 4\].*\[2, 3\]"):
        generate(model, ids, 2, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(model, ids[:0], 2)


@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_stops_a_sequence(use_cache):
    """A sequence stops at its first EOS (kept), adds no more nodes, and the others go on exactly
    as they would without the stop; padding fills the rest."""
    model = _lm(position="rope")
    ids, mask = _prompts()
    free, free_logits = generate(model, ids, 8, attention_mask=mask, return_logits=True)
    lengths = mask.sum(1)
    new = [free[b, int(lengths[b]) : int(lengths[b]) + 8] for b in range(3)]
    eos = int(new[0][2])  # sequence 0 stops at its third new token (maybe others earlier)
    out, logits = generate(
        model, ids, 8, attention_mask=mask, eos_token_id=eos, pad_token_id=-1, use_cache=use_cache, return_logits=True
    )
    stops = []
    for b in range(3):
        hits = (new[b] == eos).nonzero()
        stop = int(hits[0]) + 1 if hits.numel() else 8  # new tokens kept
        stops.append(stop)
        L = int(lengths[b])
        assert torch.equal(out[b, : L + stop], free[b, : L + stop])
        assert (out[b, L + stop :] == -1).all()
        torch.testing.assert_close(logits[:stop, b], free_logits[:stop, b], **TOL)
        assert torch.isnan(logits[stop:, b]).all()
    assert stops[0] <= 3 and logits.size(0) == max(stops)
    assert out.size(1) == max(int(lengths[b]) + stops[b] for b in range(3))
    with pytest.raises(ValueError, match="'eos_token_id'.*'x'"):
        generate(model, ids, 2, eos_token_id="x")


def test_top_k_sampling_draws_among_the_k_best_and_not_only_the_best():
    """``top_k=3``: every sampled token is one of the 3 highest logits of its step, and over a few
    seeds not always the highest (sampling, not argmax)."""
    torch.manual_seed(0)
    model = _lm(position="learned")
    ids = torch.randint(0, 17, (2, 4))
    argmax_only = True
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        out, logits = generate(model, ids, 4, greedy=False, top_k=3, generator=gen, return_logits=True)
        new = out[:, 4:]  # [B, steps]
        for step in range(4):
            top = logits[step].topk(3, dim=-1).indices  # [B, 3]
            assert (top == new[:, step : step + 1]).any(-1).all()
            argmax_only &= bool((top[:, 0] == new[:, step]).all())
    assert not argmax_only


def test_temperature_divides_the_logits():
    """A temperature near 0 samples the argmax (greedy); a large one flattens the distribution,
    so the sampled tokens leave the greedy ones."""
    torch.manual_seed(0)
    model = _lm(position="learned")
    ids = torch.randint(0, 17, (3, 4))
    greedy = generate(model, ids, 6)
    cold = generate(model, ids, 6, greedy=False, temperature=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cold, greedy)
    hot = generate(model, ids, 6, greedy=False, temperature=1e3, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(hot, greedy)


def test_top_k_samples_exactly_among_the_k_best_tokens():
    """``top_k=3`` with a flat temperature over 64 copies of one prompt draws every one of the 3
    highest logits (the k-th included) and nothing else; ``top_k=1`` is the argmax."""
    torch.manual_seed(0)
    model = _lm(position="learned")
    ids = torch.randint(0, 17, (1, 4)).expand(64, -1).contiguous()
    out, logits = generate(
        model,
        ids,
        1,
        greedy=False,
        top_k=3,
        temperature=1e3,
        generator=torch.Generator().manual_seed(0),
        return_logits=True,
    )
    best3 = set(logits[0, 0].topk(3).indices.tolist())
    assert set(out[:, -1].tolist()) == best3
    one = generate(model, ids[:3], 5, greedy=False, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(one, generate(model, ids[:3], 5))


@pytest.mark.parametrize("top_k", [17, 100])
def test_top_k_of_the_whole_vocabulary_or_more_masks_nothing(top_k):
    """``top_k`` at or past the vocabulary size (17) keeps every token: the same draws as plain sampling."""
    torch.manual_seed(0)
    model = _lm(position="learned")
    ids = torch.randint(0, 17, (3, 4))
    plain = generate(model, ids, 5, greedy=False, generator=torch.Generator().manual_seed(3))
    same = generate(model, ids, 5, greedy=False, top_k=top_k, generator=torch.Generator().manual_seed(3))
    assert torch.equal(same, plain)


class _NextId:
    """A stub LM whose next token is always ``id + 1 (mod V)``: the tokens of each row follow from
    its last prompt token alone, whatever the graph, the cache or the other rows."""

    def forward_graph(self, ids, edge_index, *, pos, cache):
        return 10.0 * torch.nn.functional.one_hot((ids + 1) % 8, 8).float()


@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_stops_the_sequence_that_produced_it_after_others_stopped(use_cache):
    """Row 0 stops at the first step; then row 2 (second of the rows still growing) reaches EOS
    before row 1: row 2 must stop, and row 1 go on to its own EOS, where generation ends."""
    ids = torch.tensor([[0, 4], [0, 1], [0, 3]])
    out, logits = generate(_NextId(), ids, 6, eos_token_id=5, pad_token_id=-1, use_cache=use_cache, return_logits=True)
    assert out.tolist() == [[0, 4, 5, -1, -1, -1], [0, 1, 2, 3, 4, 5], [0, 3, 4, 5, -1, -1]]
    # generation ends with the last row's EOS (4 steps, not 6); a stopped row's logits are NaN
    assert logits.shape == (4, 3, 8)
    assert torch.isnan(logits[1:, 0]).all() and torch.isnan(logits[2:, 2]).all()
    assert not torch.isnan(logits[:, 1]).any() and not torch.isnan(logits[:2, 2]).any()


def test_no_new_tokens_runs_no_step_so_the_position_table_does_not_limit_the_prompt():
    """``max_new_tokens=0`` reads no position (no step runs): a prompt longer than the learned
    table comes back as it is, while one new token after it is refused."""
    model = _lm(position="learned", max_positions=8)
    ids = torch.randint(0, 17, (2, 12))
    assert torch.equal(generate(model, ids, 0), ids)
    with pytest.raises(ValueError, match="'max_new_tokens' small enough"):
        generate(model, ids, 1)


def test_generate_refuses_a_model_with_its_own_topology_before_any_step():
    """``decoding.generate`` builds each step's graph from ``window``: an imported decoder given its
    own ``topology`` is refused (not only by its ``.generate`` method), before the prompt runs."""
    transformers = pytest.importorskip("transformers")
    from gnn_transformer import hf
    from gnn_transformer.topology import full

    config = transformers.GPT2Config(vocab_size=29, n_embd=16, n_layer=1, n_head=4, n_positions=32)
    model = hf.from_hf(transformers.GPT2LMHeadModel(config).eval(), backend="pyg", topology=full)
    calls = []
    real = model.forward_graph
    model.forward_graph = lambda *a, **k: calls.append(1) or real(*a, **k)
    with pytest.raises(ValueError, match="without 'topology'"):
        generate(model, torch.randint(0, 29, (1, 4)), 2)
    assert calls == []
