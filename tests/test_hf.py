"""Hugging Face BERT and GPT-2 imported as graph models: equal outputs on padded batches."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gnn_transformer import hf  # noqa: E402
from gnn_transformer.topology import causal, full, sliding_window  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TOL = dict(atol=1e-4, rtol=1e-4)


def _bert(hidden_act="gelu", pooler=True, **kw):
    config = transformers.BertConfig(
        vocab_size=61,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=24,
        type_vocab_size=3,
        hidden_act=hidden_act,
        initializer_range=0.3,
        **kw,
    )
    return transformers.BertModel(config, add_pooling_layer=pooler).eval()


def _gpt2(activation="gelu_new", **kw):
    config = transformers.GPT2Config(
        vocab_size=61,
        n_embd=16,
        n_layer=2,
        n_head=4,
        n_positions=24,
        activation_function=activation,
        initializer_range=0.3,
        bos_token_id=0,
        eos_token_id=0,
        **kw,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def _batch(b=3, t=9, right_padding=True):
    ids = torch.randint(0, 61, (b, t))
    lengths = [t, 5, 1][:b]
    mask = torch.zeros(b, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        if right_padding:
            mask[i, :n] = 1
        else:
            mask[i, t - n :] = 1
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
    torch.testing.assert_close(
        graph.embeddings.word_embeddings.weight.grad, model.embeddings.word_embeddings.weight.grad, **TOL
    )
    torch.testing.assert_close(
        graph.encoder.layers[0].linear1.weight.grad, model.encoder.layer[0].intermediate.dense.weight.grad, **TOL
    )


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
    torch.testing.assert_close(
        graph.encoder.layers[1].self_attn.in_proj_weight.grad, lm.transformer.h[1].attn.c_attn.weight.grad.t(), **TOL
    )


def test_from_pretrained_local_directory(tmp_path):
    bert, gpt2 = _bert(), _gpt2()
    bert.save_pretrained(tmp_path / "bert")
    gpt2.save_pretrained(tmp_path / "gpt2")
    ids, mask = _batch()
    real = mask.bool()
    graph_bert = hf.from_pretrained(tmp_path / "bert", backend="pyg")
    torch.testing.assert_close(
        graph_bert(input_ids=ids, attention_mask=mask).last_hidden_state[real],
        bert(input_ids=ids, attention_mask=mask).last_hidden_state[real],
        **TOL,
    )
    graph_gpt2 = hf.from_pretrained(str(tmp_path / "gpt2"), backend="pyg")
    torch.testing.assert_close(
        graph_gpt2(input_ids=ids, attention_mask=mask).logits[real],
        gpt2(input_ids=ids, attention_mask=mask).logits[real],
        **TOL,
    )


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
    torch.testing.assert_close(graph(input_ids=ids, topology=causal).logits, model(input_ids=ids).logits, **TOL)
    bert = hf.from_hf(_bert(), backend="pyg")
    full_out = bert(input_ids=ids).last_hidden_state
    torch.testing.assert_close(bert(input_ids=ids, topology=full).last_hidden_state, full_out)
    assert not torch.allclose(bert(input_ids=ids, topology=causal).last_hidden_state, full_out)


def test_float64_import():
    model = _bert().double()
    graph = hf.from_hf(model, backend="pyg")
    ids, mask = _batch()
    real = mask.bool()
    torch.testing.assert_close(
        graph(input_ids=ids, attention_mask=mask).last_hidden_state[real],
        model(input_ids=ids, attention_mask=mask).last_hidden_state[real],
        atol=1e-10,
        rtol=1e-10,
    )


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="model_type 't5'|BERT or GPT-2"):
        hf.from_hf(
            transformers.T5Model(
                transformers.T5Config(d_model=8, num_layers=1, num_heads=2, d_kv=4, d_ff=8, vocab_size=10)
            )
        )
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


def test_bert_pad_token_row_gets_no_gradient_as_in_hf():
    model = _bert(pad_token_id=0).double()
    graph = hf.from_hf(model, backend="pyg")
    assert graph.embeddings.word_embeddings.padding_idx == 0
    ids = torch.tensor([[5, 0, 7, 9], [0, 3, 0, 2]])  # the pad id at real positions
    w = torch.randn(2, 4, 16, dtype=torch.float64)
    model(input_ids=ids).last_hidden_state.mul(w).sum().backward()
    graph(input_ids=ids).last_hidden_state.mul(w).sum().backward()
    grad = graph.embeddings.word_embeddings.weight.grad
    assert (grad[0] == 0).all()
    torch.testing.assert_close(grad, model.embeddings.word_embeddings.weight.grad, atol=1e-10, rtol=1e-10)


def test_bert_pooler_padding():
    """Right padding: Hugging Face's pooler_output. Left padding: the first real token's (Hugging
    Face pools a padding column there). Rows of padding only: zeros, also for a whole batch."""
    model = _bert().double()
    graph = hf.from_hf(model, backend="pyg")
    ids, right = _batch(right_padding=True)
    torch.testing.assert_close(
        graph(input_ids=ids, attention_mask=right).pooler_output,
        model(input_ids=ids, attention_mask=right).pooler_output,
    )
    _, left = _batch(right_padding=False)
    pooled = graph(input_ids=ids, attention_mask=left).pooler_output
    for row in range(3):  # each left-padded row alone, without its padding (same positions)
        columns = left[row].nonzero().T  # [1, n]
        alone = model(input_ids=ids[row, columns], position_ids=columns).pooler_output
        torch.testing.assert_close(pooled[row], alone[0])
    empty = left.clone()
    empty[1] = 0
    out = graph(input_ids=ids, attention_mask=empty)
    assert (out.pooler_output[1] == 0).all() and (out.pooler_output[0] != 0).any()
    out = graph(input_ids=ids, attention_mask=torch.zeros_like(left))
    assert out.pooler_output.shape == (3, 16) and (out.pooler_output == 0).all()
    assert out.last_hidden_state.shape == (3, 9, 16) and (out.last_hidden_state == 0).all()


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_dropout_placement_matches_hf(kind):
    """In training mode, every active dropout of the graph model sits where Hugging Face's does:
    replacing each dropout's random mask by the same fixed one gives Hugging Face's outputs."""
    if kind == "bert":
        model = _bert(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.0).double().train()
    else:
        model = _gpt2(resid_pdrop=0.2, embd_pdrop=0.3, attn_pdrop=0.0).double().train()
    graph = hf.from_hf(model, backend="pyg")
    assert graph.training
    for layer in graph.encoder.layers:  # no dropout inside the feed-forward block, as HF
        assert layer.dropout.p == 0.0 and layer.dropout1.p == layer.dropout2.p == 0.2
    attn = model.config.attention_probs_dropout_prob if kind == "bert" else model.config.attn_pdrop
    assert all(layer.self_attn.dropout == attn for layer in graph.encoder.layers)

    def fixed_masks(module):
        calls = []

        def hook(dropout, inputs, output):  # the k-th call's mask depends on k only
            mask = (
                torch.rand(
                    inputs[0].numel(), generator=torch.Generator().manual_seed(len(calls)), dtype=inputs[0].dtype
                )
                > dropout.p
            )
            calls.append(inputs[0].numel())
            return inputs[0] * mask.view_as(inputs[0]) / (1 - dropout.p)

        for m in module.modules():
            if isinstance(m, torch.nn.Dropout) and m.p > 0:
                m.register_forward_hook(hook)
        return calls

    ref_calls, calls = fixed_masks(model), fixed_masks(graph)
    ids = torch.randint(0, 61, (2, 7))
    ref, out = model(input_ids=ids), graph(input_ids=ids)
    assert calls == ref_calls and len(calls) == 1 + 2 * 2
    if kind == "bert":
        torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)
    else:
        torch.testing.assert_close(out.logits, ref.logits)


def _save_and_load(model, path):
    model.save_pretrained(path)
    return hf.from_pretrained(path, backend="pyg")


def test_from_pretrained_imports_no_random_weights(tmp_path):
    """Checkpoints without pooler / LM head give what from_hf gives, not random modules."""
    ids, mask = _batch()
    real = mask.bool()
    base = _bert(pooler=False)
    loaded = _save_and_load(base, tmp_path / "no_pooler")
    assert loaded.pooler is None and "pooler.weight" not in loaded.state_dict()
    torch.testing.assert_close(
        loaded(input_ids=ids, attention_mask=mask).last_hidden_state,
        hf.from_hf(base)(input_ids=ids, attention_mask=mask).last_hidden_state,
    )
    mlm = transformers.BertForMaskedLM(base.config).eval()
    loaded = _save_and_load(mlm, tmp_path / "mlm")
    assert loaded.pooler is None
    torch.testing.assert_close(
        loaded(input_ids=ids, attention_mask=mask).last_hidden_state[real],
        mlm.bert(input_ids=ids, attention_mask=mask).last_hidden_state[real],
        **TOL,
    )
    untied = transformers.GPT2Model(
        transformers.GPT2Config(
            vocab_size=61,
            n_embd=16,
            n_layer=2,
            n_head=4,
            n_positions=24,
            initializer_range=0.3,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=False,
        )
    ).eval()
    loaded = _save_and_load(untied, tmp_path / "gpt2_base")
    torch.testing.assert_close(loaded.lm_head.weight, untied.wte.weight)
    torch.testing.assert_close(
        loaded(input_ids=ids, attention_mask=mask).logits, hf.from_hf(untied)(input_ids=ids, attention_mask=mask).logits
    )


def test_from_pretrained_refuses_incomplete_or_other_heads(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    _bert().save_pretrained(tmp_path / "bert")
    weights = safetensors.load_file(tmp_path / "bert" / "model.safetensors")
    del weights["encoder.layer.1.output.dense.weight"]
    safetensors.save_file(weights, tmp_path / "bert" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing weights.*encoder.layer.1.output.dense.weight"):
        hf.from_pretrained(tmp_path / "bert")
    classifier = transformers.GPT2ForSequenceClassification(_gpt2().config)
    classifier.save_pretrained(tmp_path / "gpt2_cls")
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*score.weight"):
        hf.from_pretrained(tmp_path / "gpt2_cls")


def test_task_heads():
    """BERT task models import their base (the head is dropped); GPT-2 refuses non-LM heads."""
    config = _bert().config
    classifier = transformers.BertForSequenceClassification(config).eval()
    graph = hf.from_hf(classifier, backend="pyg")
    assert set(graph.state_dict()) == set(hf.from_hf(classifier.bert).state_dict())
    ids = torch.randint(0, 61, (2, 5))
    torch.testing.assert_close(graph(input_ids=ids).pooler_output, classifier.bert(input_ids=ids).pooler_output, **TOL)
    gpt2_config = _gpt2().config
    for cls in (transformers.GPT2ForSequenceClassification, transformers.GPT2DoubleHeadsModel):
        with pytest.raises(ValueError, match=f"GPT2LMHeadModel.*{cls.__name__}.*'.transformer'"):
            hf.from_hf(cls(gpt2_config))
    assert isinstance(
        hf.from_hf(transformers.GPT2ForSequenceClassification(gpt2_config).transformer), hf.GraphGPT2LMHeadModel
    )
    with pytest.raises(ValueError, match="scale_attn_weights=False"):
        hf.from_hf(_gpt2(scale_attn_weights=False))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_from_hf_keeps_device_and_dtype(kind):
    model = (_bert() if kind == "bert" else _gpt2()).double().to("meta")
    graph = hf.from_hf(model, backend="pyg")
    assert {(p.device.type, p.dtype) for p in graph.parameters()} == {("meta", torch.float64)}


def test_output_indexing_as_hf():
    ids, mask = _batch()
    real = mask.bool()
    bert = _bert()
    ref, out = bert(input_ids=ids, attention_mask=mask), hf.from_hf(bert)(input_ids=ids, attention_mask=mask)
    assert len(out.to_tuple()) == len(ref.to_tuple()) == 2
    torch.testing.assert_close(out[0][real], ref[0][real], **TOL)
    torch.testing.assert_close(out[1], ref[1], **TOL)
    assert out[-1] is out.pooler_output and out["last_hidden_state"] is out[0]
    gpt2 = _gpt2()
    ref, out = gpt2(input_ids=ids, attention_mask=mask), hf.from_hf(gpt2)(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out[0][real], ref[0][real], **TOL)  # logits first, as Hugging Face
    assert out[1] is out.last_hidden_state
    with pytest.raises(IndexError):
        out[2]


@pytest.mark.parametrize("bad", [causal([4, 4]), "causal", 3, "", 0, [], False])
def test_topology_must_be_callable(bad):
    model = _gpt2()
    graph = hf.from_hf(model, backend="pyg")
    ids = torch.randint(0, 61, (2, 4))
    with pytest.raises(ValueError, match="'topology'"):
        graph(input_ids=ids, topology=bad)
    with pytest.raises(ValueError, match="'topology'"):
        hf.from_hf(model, topology=bad)
    with pytest.raises(ValueError, match="'topology'"):
        hf.GraphBertModel(_bert().config, topology=bad)


def test_argument_shapes_and_positions():
    bert = hf.from_hf(_bert(), backend="pyg")
    ids = torch.randint(0, 61, (2, 5))
    with pytest.raises(ValueError, match=r"'token_type_ids'.*\[2, 5\].*\[2, 4\]"):
        bert(input_ids=ids, token_type_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"'position_ids'.*\[3, 5\]"):
        bert(input_ids=ids, position_ids=torch.zeros(3, 5, dtype=torch.long))
    for pos in (torch.arange(5), torch.arange(5).unsqueeze(0), torch.arange(5).expand(2, 5)):
        torch.testing.assert_close(
            bert(input_ids=ids, position_ids=pos).last_hidden_state, bert(input_ids=ids).last_hidden_state
        )
    with pytest.raises(ValueError, match="position 30.*'pos'.*max_position_embeddings=24"):
        bert.forward_graph(ids[0], full([5]), pos=torch.arange(26, 31))
    gpt2 = hf.from_hf(_gpt2(), backend="pyg")
    with pytest.raises(ValueError, match="position 24.*'pos'.*n_positions=24"):
        gpt2.forward_graph(ids[0], causal([5]), pos=torch.arange(20, 25))
    from gnn_transformer.decoding import generate

    with pytest.raises(ValueError, match="'max_new_tokens' small enough for the model's 24 learned positions"):
        generate(gpt2, ids, 30)  # refused before the first step
    assert generate(gpt2, ids, 24 - 5 + 1).shape == (ids.size(0), 25)  # reads positions up to 23
    # token ids and types outside the tables (torch's embedding raised a bare IndexError)
    with pytest.raises(ValueError, match="Found 99 in 'input_ids'.*0..60"):
        bert(input_ids=torch.tensor([[1, 2, 99]]))
    with pytest.raises(ValueError, match="Found -1 in 'input_ids'"):
        gpt2(input_ids=torch.tensor([[1, -1, 3]]))
    with pytest.raises(ValueError, match="Found 5 in 'token_type_ids'"):
        bert(input_ids=ids, token_type_ids=torch.full((2, 5), 5))


@pytest.mark.parametrize("right_padding", [True, False])
def test_bert_output_attentions_match_hf(right_padding):
    model = _bert(attn_implementation="eager")
    graph = hf.from_hf(model, backend="pyg")
    ids, mask = _batch(right_padding=right_padding)
    real = mask.bool()
    ref = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    out = graph(input_ids=ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(out.last_hidden_state[real], ref.last_hidden_state[real], **TOL)
    assert len(out.attentions) == len(ref.attentions) == 2 and len(out.edge_attentions) == 2
    for dense, expected, (edge_index, alpha) in zip(out.attentions, ref.attentions, out.edge_attentions):
        assert dense.shape == expected.shape and alpha.shape == (edge_index.size(1), 4)
        rows = real.unsqueeze(1).expand(-1, expected.size(1), -1)  # the real queries
        torch.testing.assert_close(dense[rows], expected[rows], **TOL)
        sums = torch.zeros(int(real.sum()), 4).index_add_(0, edge_index[1], alpha)
        torch.testing.assert_close(sums, torch.ones_like(sums))  # each query's weights sum to 1
    plain = graph(input_ids=ids, attention_mask=mask)
    assert plain.attentions is None and plain.edge_attentions is None
    torch.testing.assert_close(plain.last_hidden_state, out.last_hidden_state, rtol=0, atol=0)


def test_to_hf_bert_and_gpt2_round_trip():
    ids, mask = _batch()
    real = mask.bool()
    for model in (_bert(), _bert(pooler=False), _gpt2()):
        back = hf.to_hf(hf.from_hf(model, backend="pyg"))
        assert type(back) is type(model) and not back.training
        for name, p in model.state_dict().items():
            torch.testing.assert_close(back.state_dict()[name], p, rtol=0, atol=0, msg=name)
        ref, got = model(input_ids=ids, attention_mask=mask), back(input_ids=ids, attention_mask=mask)
        key = "logits" if isinstance(model, transformers.GPT2LMHeadModel) else "last_hidden_state"
        torch.testing.assert_close(got[key][real], ref[key][real], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_to_hf_of_a_graph_model_gives_its_outputs(kind):
    # a graph model trained (here: perturbed) on its own: Hugging Face computes the same outputs
    torch.manual_seed(3)
    config = (_bert() if kind == "bert" else _gpt2()).config
    graph = hf.GraphBertModel(config) if kind == "bert" else hf.GraphGPT2LMHeadModel(config)
    with torch.no_grad():
        for p in graph.parameters():
            p.add_(0.2 * torch.randn_like(p))
    graph = graph.double().eval()
    back = hf.to_hf(graph)
    assert next(back.parameters()).dtype == torch.float64
    ids, mask = _batch(right_padding=True)
    real = mask.bool()
    want, got = graph(input_ids=ids, attention_mask=mask), back(input_ids=ids, attention_mask=mask)
    key = "last_hidden_state" if kind == "bert" else "logits"
    torch.testing.assert_close(got[key][real], want[key][real], rtol=0, atol=1e-10)
    if kind == "bert":
        torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=0, atol=1e-10)


def test_to_hf_refuses_other_models():
    with pytest.raises(ValueError, match="'graph'.*Linear"):
        hf.to_hf(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kind", ["bert", "bert_no_pooler", "gpt2"])
def test_state_dict_renamings_are_inverse(kind):
    """One table per model renames both ways: Hugging Face -> graph -> Hugging Face gives back every
    parameter (buffers such as position_ids aside), the same tensors."""
    if kind == "gpt2":
        base = _gpt2().transformer
        forward, inverse, layers = hf.gpt2_state_dict, hf.gpt2_hf_state_dict, base.config.n_layer
    else:
        base = _bert(pooler=kind == "bert")
        forward, inverse, layers = hf.bert_state_dict, hf.bert_hf_state_dict, base.config.num_hidden_layers
    params = dict(base.named_parameters())
    graph = forward(base.state_dict(), layers)
    back = inverse(graph, layers)
    assert set(back) == set(params)
    for name, p in params.items():
        torch.testing.assert_close(back[name], p, rtol=0, atol=0, msg=name)
    model = hf.from_hf(base)
    assert set(graph) == set(model.state_dict()) - {"lm_head.weight"}
