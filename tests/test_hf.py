"""Hugging Face BERT and GPT-2 imported as graph models: equal outputs on padded batches."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from gnn_transformer import hf  # noqa: E402
from gnn_transformer.topology import causal, full, sliding_window  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TOL = dict(atol=1e-4, rtol=1e-4)


def _bert(hidden_act="gelu", pooler=True, **kw):
    config = transformers.BertConfig(vocab_size=61, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=40,
                                     max_position_embeddings=24, type_vocab_size=3,
                                     hidden_act=hidden_act, initializer_range=0.3, **kw)
    return transformers.BertModel(config, add_pooling_layer=pooler).eval()


def _gpt2(activation="gelu_new", **kw):
    config = transformers.GPT2Config(vocab_size=61, n_embd=16, n_layer=2, n_head=4, n_positions=24,
                                     activation_function=activation, initializer_range=0.3,
                                     bos_token_id=0, eos_token_id=0, **kw)
    return transformers.GPT2LMHeadModel(config).eval()


def _batch(b=3, t=9, right_padding=True):
    ids = torch.randint(0, 61, (b, t))
    lengths = [t, 5, 1][:b]
    mask = torch.zeros(b, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        if right_padding:
            mask[i, :n] = 1
        else:
            mask[i, t - n:] = 1
    return ids, mask


@pytest.mark.parametrize("hidden_act", ["gelu", "relu", "gelu_new"])
@pytest.mark.parametrize("pooler", [True, False])
def test_bert_matches_hf(hidden_act, pooler):
    model = _bert(hidden_act, pooler)
    graph = hf.from_hf(model, backend="pyg")
    assert isinstance(graph, hf.GraphBertModel)
    ids, mask = _batch()
    types = torch.randint(0, 3, ids.shape)
    ref = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    out = graph(input_ids=ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape
    torch.testing.assert_close(out.last_hidden_state[real], ref.last_hidden_state[real], **TOL)
    assert (out.last_hidden_state[~real] == 0).all()
    if pooler:
        torch.testing.assert_close(out["pooler_output"], ref.pooler_output, **TOL)
    else:
        assert out.pooler_output is None


def test_bert_gradients_match_hf():
    model = _bert()
    graph = hf.from_hf(model, backend="pyg")
    ids, mask = _batch()
    real = mask.bool()
    model(input_ids=ids, attention_mask=mask).last_hidden_state[real].square().sum().backward()
    graph(input_ids=ids, attention_mask=mask).last_hidden_state[real].square().sum().backward()
    torch.testing.assert_close(graph.embeddings.word_embeddings.weight.grad,
                               model.embeddings.word_embeddings.weight.grad, **TOL)
    torch.testing.assert_close(graph.encoder.layers[0].linear1.weight.grad,
                               model.encoder.layer[0].intermediate.dense.weight.grad, **TOL)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu", "relu"])
@pytest.mark.parametrize("right_padding", [True, False])
def test_gpt2_matches_hf(activation, right_padding):
    model = _gpt2(activation)
    graph = hf.from_hf(model, backend="pyg")
    assert isinstance(graph, hf.GraphGPT2LMHeadModel)
    ids, mask = _batch(right_padding=right_padding)
    ref = model(input_ids=ids, attention_mask=mask)
    out = graph(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert out.logits.shape == ref.logits.shape == (3, 9, 61)
    torch.testing.assert_close(out.logits[real], ref.logits[real], **TOL)
    assert (out.logits[~real] == 0).all()


def test_gpt2_base_model_and_gradients():
    lm = _gpt2()
    graph = hf.from_hf(lm.transformer, backend="pyg")  # GPT2Model: head tied to wte
    ids, mask = _batch()
    real = mask.bool()
    ref = lm(input_ids=ids, attention_mask=mask).logits
    out = graph(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out[real], ref[real], **TOL)
    graph = hf.from_hf(lm, backend="pyg")
    lm(input_ids=ids, attention_mask=mask).logits[real].logsumexp(-1).sum().backward()
    graph(input_ids=ids, attention_mask=mask).logits[real].logsumexp(-1).sum().backward()
    torch.testing.assert_close(graph.wte.weight.grad, lm.transformer.wte.weight.grad, **TOL)
    torch.testing.assert_close(graph.encoder.layers[1].self_attn.in_proj_weight.grad,
                               lm.transformer.h[1].attn.c_attn.weight.grad.t(), **TOL)


def test_from_pretrained_local_directory(tmp_path):
    bert, gpt2 = _bert(), _gpt2()
    bert.save_pretrained(tmp_path / "bert")
    gpt2.save_pretrained(tmp_path / "gpt2")
    ids, mask = _batch()
    real = mask.bool()
    graph_bert = hf.from_pretrained(tmp_path / "bert", backend="pyg")
    torch.testing.assert_close(graph_bert(input_ids=ids, attention_mask=mask).last_hidden_state[real],
                               bert(input_ids=ids, attention_mask=mask).last_hidden_state[real], **TOL)
    graph_gpt2 = hf.from_pretrained(str(tmp_path / "gpt2"), backend="pyg")
    torch.testing.assert_close(graph_gpt2(input_ids=ids, attention_mask=mask).logits[real],
                               gpt2(input_ids=ids, attention_mask=mask).logits[real], **TOL)


def test_other_topology_equals_hf_with_the_same_mask():
    """A sliding-window graph on GPT-2 equals Hugging Face given the same (4-D) mask."""
    model = _gpt2()
    window = lambda lengths: sliding_window(lengths, 2, causal=True)  # noqa: E731
    graph = hf.from_hf(model, topology=window, backend="pyg")
    ids = torch.randint(0, 61, (2, 8))
    out = graph(input_ids=ids).logits
    i, j = torch.arange(8).unsqueeze(1), torch.arange(8)
    allowed = (j <= i) & (i - j <= 2)
    mask4d = torch.zeros(2, 1, 8, 8).masked_fill(~allowed, torch.finfo(torch.float32).min)
    model.config._attn_implementation = "eager"
    ref = model(input_ids=ids, attention_mask=mask4d).logits
    torch.testing.assert_close(out, ref, **TOL)
    # per-call topology overrides the model's; the default is causal
    torch.testing.assert_close(graph(input_ids=ids, topology=causal).logits,
                               model(input_ids=ids).logits, **TOL)
    bert = hf.from_hf(_bert(), backend="pyg")
    full_out = bert(input_ids=ids).last_hidden_state
    torch.testing.assert_close(bert(input_ids=ids, topology=full).last_hidden_state, full_out)
    assert not torch.allclose(bert(input_ids=ids, topology=causal).last_hidden_state, full_out)


def test_float64_import():
    model = _bert().double()
    graph = hf.from_hf(model, backend="pyg")
    ids, mask = _batch()
    real = mask.bool()
    torch.testing.assert_close(graph(input_ids=ids, attention_mask=mask).last_hidden_state[real],
                               model(input_ids=ids, attention_mask=mask).last_hidden_state[real],
                               atol=1e-10, rtol=1e-10)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="model_type 't5'|BERT or GPT-2"):
        hf.from_hf(transformers.T5Model(transformers.T5Config(d_model=8, num_layers=1, num_heads=2,
                                                               d_kv=4, d_ff=8, vocab_size=10)))
    with pytest.raises(ValueError, match="'path'.*nowhere"):
        hf.from_pretrained(tmp_path / "nowhere")
    graph = hf.from_hf(_bert(), backend="pyg")
    with pytest.raises(ValueError, match="'input_ids'"):
        graph(input_ids=torch.randn(2, 3))
    with pytest.raises(ValueError, match="'attention_mask'.*\\[2, 3\\]"):
        graph(input_ids=torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="'topology'"):
        graph(input_ids=torch.zeros(2, 3, dtype=torch.long), topology="full")
    config = transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True"):
        hf.GraphGPT2LMHeadModel(config)


def test_positions_beyond_the_embedding_table():
    graph = hf.from_hf(_gpt2(), backend="pyg")  # n_positions=24
    with pytest.raises(ValueError, match="position 29.*0..23"):
        graph(input_ids=torch.zeros(1, 30, dtype=torch.long))
    bert = hf.from_hf(_bert(), backend="pyg")  # max_position_embeddings=24
    with pytest.raises(ValueError, match="position 24.*0..23"):
        bert(input_ids=torch.zeros(2, 25, dtype=torch.long))
