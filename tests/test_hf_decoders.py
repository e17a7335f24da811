"""Today's Hugging Face decoder families and ModernBERT imported as graph models: equal outputs,
native per-layer graphs checked against Hugging Face's own masks, cached generation, loss,
attention weights, export back."""

from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gnn_transformer import hf  # noqa: E402
from gnn_transformer.topology import causal, full, sliding_window, to_dense_mask  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TOL = dict(atol=1e-4, rtol=1e-4)
V, T, WINDOW = 61, 12, 4  # vocabulary, padded length, sliding window W (< the longest sequence)
COMMON = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.3,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,
    attn_implementation="eager",
)


def _config(family: str, **kw):
    c = transformers
    if family == "llama":
        return c.LlamaConfig(**{**COMMON, "attention_bias": True, "mlp_bias": True, **kw})
    if family == "mistral":
        return c.MistralConfig(**{**COMMON, "sliding_window": WINDOW, **kw})
    if family == "qwen2":
        return c.Qwen2Config(
            **{**COMMON, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1, **kw}
        )
    if family == "qwen3":
        return c.Qwen3Config(
            **{
                **COMMON,
                "head_dim": 16,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                "use_sliding_window": True,
                "sliding_window": WINDOW,
                **kw,
            }
        )
    if family == "gemma2":
        return c.Gemma2Config(
            **{
                **COMMON,
                "head_dim": 16,
                "query_pre_attn_scalar": 24,
                "sliding_window": WINDOW,
                "attn_logit_softcapping": 3.0,
                "final_logit_softcapping": 5.0,
                **kw,
            }
        )
    if family == "gemma3":
        return c.Gemma3TextConfig(
            **{
                **COMMON,
                "num_hidden_layers": 7,
                "head_dim": 16,
                "query_pre_attn_scalar": 16,
                "sliding_window": WINDOW,
                "final_logit_softcapping": 7.0,
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
                },
                **kw,
            }
        )
    if family == "phi3":
        return c.Phi3Config(
            **{
                **COMMON,
                "sliding_window": WINDOW,
                "tie_word_embeddings": False,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                **kw,
            }
        )
    if family == "gpt_neo":
        return c.GPTNeoConfig(
            vocab_size=V,
            hidden_size=32,
            num_layers=3,
            num_heads=4,
            max_position_embeddings=64,
            attention_types=[[["global", "local"], 1], [["local"], 1]],
            window_size=WINDOW,
            initializer_range=0.3,
            bos_token_id=1,
            eos_token_id=None,
            pad_token_id=0,
            attn_implementation="eager",
            **kw,
        )
    raise AssertionError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt_neo"]


def _model(family: str, **kw):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(family, **kw)).eval()
    if family.startswith("gemma"):  # norms initialized to zero (gain 1): make them count
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    return model


def _batch(right_padding: bool, b: int = 3):
    torch.manual_seed(1)
    ids = torch.randint(2, V, (b, T))
    mask = torch.zeros(b, T, dtype=torch.long)
    for i, n in enumerate([T, 9, 2][:b]):
        if right_padding:
            mask[i, :n] = 1
        else:
            mask[i, T - n :] = 1
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("right_padding", [True, False])
def test_decoder_matches_hf(family, right_padding):
    model = _model(family)
    graph = hf.from_hf(model, backend="pyg")
    assert isinstance(graph, hf.GraphDecoderLM)
    ids, mask = _batch(right_padding)
    real = mask.bool()
    ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    out = graph(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out.logits[real], ref.logits[real], **TOL)
    torch.testing.assert_close(out.last_hidden_state[real], ref.hidden_states[-1][real], **TOL)
    assert (out.logits[~real] == 0).all()


def _hf_greedy(model, ids, mask, new):
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    return out[:, ids.size(1) :]


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_matches_hf_greedy(family):
    model = _model(family)
    graph = hf.from_hf(model, backend="pyg")
    ids, mask = _batch(right_padding=False)  # left padding, as generation wants
    new = 8  # prompts of 12, 9, 2 tokens then 8 new ones: every window (4) is exceeded
    ref = _hf_greedy(model, ids, mask, new)
    out = graph.generate(ids, attention_mask=mask, max_new_tokens=new)
    lengths = mask.sum(1).tolist()
    for row, n in enumerate(lengths):
        assert out[row, n : n + new].tolist() == ref[row].tolist()
    uncached = graph.generate(ids, attention_mask=mask, max_new_tokens=new, use_cache=False)
    assert torch.equal(uncached, out)


@pytest.mark.parametrize("family", FAMILIES)
def test_native_graphs_are_hf_masks(family):
    """Every layer's edges are exactly the keys Hugging Face's eager attention gives weight to, and
    the weights per edge (dense view) equal Hugging Face's attention probabilities."""
    model = _model(family)
    graph = hf.from_hf(model, backend="pyg")
    ids, mask = _batch(right_padding=True)
    real = mask.bool()
    ref = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    out = graph(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == len(ref.attentions) == len(out.edge_attentions) == len(graph.layers)
    windows = graph.windows
    assert any(w is not None for w in windows) == (family != "llama")
    for layer, (dense, expected) in enumerate(zip(out.attentions, ref.attentions)):
        rows = real.unsqueeze(1).expand(-1, expected.size(1), -1)  # [B, H, T] real query rows
        torch.testing.assert_close(dense[rows], expected[rows], **TOL)
        kept = expected[0, 0] > 0  # the unpadded row: [T, T], query i keeps key j
        edge_index = out.edge_attentions[layer][0].as_tensor()
        first = edge_index[:, edge_index[1] < T]  # the graph of sequence 0
        assert torch.equal(to_dense_mask(first, T, T), kept)
        w = windows[layer]
        assert int(kept.sum(1).max()) == (T if w is None else w + 1) == (T if w is None else WINDOW)


def test_window_semantics_of_masking_utils():
    """Hugging Face's causal window of W keeps W keys, the query included (radius W - 1); GPT-Neo's
    local layers the same; ModernBERT's symmetric window |i - j| <= local_attention // 2."""
    from transformers import masking_utils

    n = 10
    for w in (1, 3, 4):
        overlay = masking_utils.sliding_window_overlay(w)
        hf_mask = torch.tensor([[bool(overlay(0, 0, i, j)) and j <= i for j in range(n)] for i in range(n)])
        assert torch.equal(hf_mask, to_dense_mask(sliding_window(n, w - 1, causal=True), n))
        bias = torch.tril(torch.ones(n, n, dtype=torch.bool))
        neo = torch.bitwise_xor(bias, torch.tril(bias, -w))  # GPTNeoSelfAttention's local mask
        assert torch.equal(neo, hf_mask)
        overlay = masking_utils.sliding_window_bidirectional_overlay(w)
        hf_mask = torch.tensor([[bool(overlay(0, 0, i, j)) for j in range(n)] for i in range(n)])
        assert torch.equal(hf_mask, to_dense_mask(sliding_window(n, w), n))
    config = transformers.ModernBertConfig(local_attention=8)
    assert config.sliding_window == 4


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neo"])
def test_loss_matches_hf(family):
    model = _model(family)
    graph = hf.from_hf(model, backend="pyg")
    ids, mask = _batch(right_padding=True)
    labels = ids.masked_fill(mask == 0, -100)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    out = graph(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, ref, **TOL)
    assert out[0] is out.loss and out[1] is out.logits
    with pytest.raises(ValueError, match="'labels'"):
        graph(input_ids=ids, labels=labels[:, :5])


@pytest.mark.parametrize("family", FAMILIES)
def test_to_hf_round_trip(family):
    model = _model(family)
    graph = hf.from_hf(model, backend="pyg")
    back = hf.to_hf(graph)
    assert type(back) is type(model)
    ids, mask = _batch(right_padding=True)
    real = mask.bool()
    torch.testing.assert_close(
        back(input_ids=ids, attention_mask=mask).logits[real],
        model(input_ids=ids, attention_mask=mask).logits[real],
        **TOL,
    )
    for name, p in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], p, msg=name)


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "gpt_neo"])
def test_from_pretrained(family, tmp_path):
    model = _model(family)
    model.save_pretrained(tmp_path / family)
    graph = hf.from_pretrained(tmp_path / family, backend="pyg")
    ids, mask = _batch(right_padding=False)
    real = mask.bool()
    torch.testing.assert_close(
        graph(input_ids=ids, attention_mask=mask).logits[real],
        model(input_ids=ids, attention_mask=mask).logits[real],
        **TOL,
    )
    base = transformers.AutoModel.from_config(model.config).eval()
    base.save_pretrained(tmp_path / "base")
    loaded = hf.from_pretrained(tmp_path / "base", backend="pyg")
    torch.testing.assert_close(
        loaded(input_ids=ids, attention_mask=mask).last_hidden_state[real],
        base(input_ids=ids, attention_mask=mask).last_hidden_state[real],
        **TOL,
    )


def test_base_model_and_other_heads():
    model = _model("llama")
    base = hf.from_hf(model.model, backend="pyg")
    torch.testing.assert_close(base.lm_head.weight, model.model.embed_tokens.weight)
    # tied, not a copy: training keeps them one (the config said untied: the base model has no head)
    assert not model.config.tie_word_embeddings
    assert base.lm_head.weight is base.embed_tokens.weight and base.spec.tie_word_embeddings
    ids, mask = _batch(right_padding=True)
    real = mask.bool()
    torch.testing.assert_close(
        base(input_ids=ids, attention_mask=mask).last_hidden_state[real],
        model.model(input_ids=ids, attention_mask=mask).last_hidden_state[real],
        **TOL,
    )
    classifier = transformers.LlamaForSequenceClassification(model.config)
    with pytest.raises(ValueError, match="score.*'.model'"):
        hf.from_hf(classifier)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 4,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4},
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 4,
            "beta_fast": 8.0,
            "beta_slow": 2.0,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
        },
    ],
)
def test_rope_scaling_matches_hf(rope):
    """Dynamic scaling changes the frequencies beyond max_position_embeddings (8 < 12 columns)."""
    model = _model("llama", max_position_embeddings=8, rope_parameters={"rope_theta": 500.0, **rope})
    graph = hf.from_hf(model, backend="pyg")
    for right_padding in (True, False):
        ids, mask = _batch(right_padding)
        real = mask.bool()
        ref = transformers.AutoModelForCausalLM.from_config(model.config).eval()  # fresh dynamic state
        ref.load_state_dict(model.state_dict())
        torch.testing.assert_close(
            graph(input_ids=ids, attention_mask=mask).logits[real],
            ref(input_ids=ids, attention_mask=mask).logits[real],
            **TOL,
        )


@pytest.mark.parametrize(
    "family,backend",
    [
        ("gpt_neo", "fused"),
        ("gpt_neo", "tiled"),
        ("gemma3", "fused"),
        ("gemma3", "tiled"),
        ("gemma3", "auto"),
        ("qwen3", "split"),
    ],
)
def test_scale_on_every_backend(family, backend):
    """GPT-Neo's unscaled scores and Gemma's query_pre_attn_scalar go through the kernels too."""
    model = _model(family)
    graph = hf.from_hf(model, backend=backend)
    ids, mask = _batch(right_padding=False)
    real = mask.bool()
    torch.testing.assert_close(
        graph(input_ids=ids, attention_mask=mask).logits[real],
        model(input_ids=ids, attention_mask=mask).logits[real],
        **TOL,
    )


def test_softcap_backends():
    model = _model("gemma2")
    graph = hf.from_hf(model)  # auto -> pyg: the kernels have no softcap
    ids, mask = _batch(right_padding=True)
    real = mask.bool()
    torch.testing.assert_close(
        graph(input_ids=ids, attention_mask=mask).logits[real],
        model(input_ids=ids, attention_mask=mask).logits[real],
        **TOL,
    )
    attn = graph.layers[0].self_attn
    assert attn.resolve_backend(causal(4), torch.device("cpu")) == "pyg"
    for backend in ("fused", "tiled", "split"):
        with pytest.raises(ValueError, match=f"backend={backend!r}.*softcap=3.0|softcap=3.0.*backend={backend!r}"):
            hf.from_hf(model, backend=backend)(input_ids=ids, attention_mask=mask)


def test_user_topology_replaces_native_graphs_per_layer():
    """Qwen2 with layer_types (full, sliding, sliding): replacing layer 1's window by causal
    attention equals Hugging Face's model with layer_types (full, full, sliding), same weights."""
    model = _model("qwen2", layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    other = transformers.AutoModelForCausalLM.from_config(
        _config("qwen2", layer_types=["full_attention", "full_attention", "sliding_attention"])
    ).eval()
    other.load_state_dict(model.state_dict())
    graph = hf.from_hf(model, backend="pyg")
    assert graph.windows == [None, WINDOW - 1, WINDOW - 1]
    ids, mask = _batch(right_padding=True)
    real = mask.bool()
    out = graph(input_ids=ids, attention_mask=mask, topology=[None, causal, None])
    torch.testing.assert_close(out.logits[real], other(input_ids=ids, attention_mask=mask).logits[real], **TOL)
    everywhere = hf.from_hf(model, backend="pyg", topology=causal)(input_ids=ids, attention_mask=mask)
    assert not torch.allclose(everywhere.logits[real], out.logits[real], atol=1e-3)
    with pytest.raises(ValueError, match="'topology'.*one builder.*3.*length 2"):
        graph(input_ids=ids, topology=[None, causal])
    with pytest.raises(ValueError, match="'topology\\[1\\]'"):
        graph(input_ids=ids, topology=[None, 3, None])
    with pytest.raises(ValueError, match="'topology'.*generate"):
        hf.from_hf(model, topology=causal).generate(ids, max_new_tokens=2)


def _modernbert(masked_lm: bool, **kw):
    torch.manual_seed(0)
    config = transformers.ModernBertConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=64,
        local_attention=4,
        global_attn_every_n_layers=3,
        initializer_range=0.3,
        pad_token_id=0,
        attn_implementation="eager",
        **kw,
    )
    cls = transformers.ModernBertForMaskedLM if masked_lm else transformers.ModernBertModel
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    return model


@pytest.mark.parametrize("masked_lm", [False, True])
@pytest.mark.parametrize("right_padding", [True, False])
def test_modernbert_matches_hf(masked_lm, right_padding):
    model = _modernbert(masked_lm)
    graph = hf.from_hf(model, backend="pyg")
    assert isinstance(graph, hf.GraphModernBertModel)
    assert graph.windows == [None, 2, 2, None]
    ids, mask = _batch(right_padding)
    real = mask.bool()
    ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    out = graph(input_ids=ids, attention_mask=mask, output_attentions=True)
    hidden = ref.hidden_states[-1] if masked_lm else ref.last_hidden_state
    torch.testing.assert_close(out.last_hidden_state[real], hidden[real], **TOL)
    if masked_lm:
        torch.testing.assert_close(out.logits[real], ref.logits[real], **TOL)
    for dense, expected in zip(out.attentions, ref.attentions):
        rows = real.unsqueeze(1).expand(-1, expected.size(1), -1)
        torch.testing.assert_close(dense[rows], expected[rows], **TOL)
    back = hf.to_hf(graph)
    assert type(back) is type(model)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], p, msg=name)


def test_modernbert_from_pretrained_and_bias(tmp_path):
    model = _modernbert(True, norm_bias=True, attention_bias=True, mlp_bias=True)
    model.save_pretrained(tmp_path / "mlm")
    graph = hf.from_pretrained(tmp_path / "mlm", backend="pyg")
    ids, mask = _batch(right_padding=True)
    real = mask.bool()
    torch.testing.assert_close(
        graph(input_ids=ids, attention_mask=mask).logits[real],
        model(input_ids=ids, attention_mask=mask).logits[real],
        **TOL,
    )
    full_graph = graph(input_ids=ids, attention_mask=mask, topology=full)
    assert not torch.allclose(
        full_graph.logits[real], model(input_ids=ids, attention_mask=mask).logits[real], atol=1e-3
    )


@pytest.mark.parametrize(
    "family,field,value,match",
    [
        (
            "llama",
            "rope_parameters",
            {"rope_type": "proportional", "rope_theta": 10000.0},
            r"rope_parameters\['rope_type'\]='proportional'",
        ),
        ("gemma3", "use_bidirectional_attention", True, "use_bidirectional_attention=True"),
        ("llama", "hidden_act", "relu2", "hidden_act='relu2'"),
    ],
)
def test_unsupported_configs_are_refused(family, field, value, match):
    config = _config(family)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=match):
        hf.GraphDecoderLM(config)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2"])
def test_partial_rotary_factor_is_read_as_hugging_face_reads_it(family):
    """Only Phi-3's Hugging Face model rotates part of each head; the other families' default RoPE
    rotates every dimension whatever ``partial_rotary_factor`` says (the import rotated half, logits
    off by 3-9), and their scaled RoPE cannot run a factor (refused)."""
    params = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    if family.startswith("gemma"):  # head_dim 24 set by _config: rotating half of it is 12, even
        params["rope_theta"] = 100.0
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(family, rope_parameters=params)).eval()
    graph = hf.from_hf(model, backend="pyg")
    assert all(rope.rotary_dim == graph.spec.head_dim for rope in graph.spec.rope)
    ids, mask = _batch(right_padding=True)
    real = mask.bool()
    torch.testing.assert_close(
        graph(input_ids=ids, attention_mask=mask).logits[real],
        model(input_ids=ids, attention_mask=mask).logits[real],
        **TOL,
    )
    scaled = _config(family, rope_parameters={**params, "rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match=r"partial_rotary_factor'\]=0.5 .*cannot run a factor with rope_type 'linear'"):
        hf.GraphDecoderLM(scaled)


@pytest.mark.parametrize(
    "family,fields",
    [
        ("llama", {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 3}),
        ("mistral", {"attention_bias": True}),
    ],
)
def test_fields_the_family_does_not_read_are_ignored_as_hugging_face_ignores_them(family, fields):
    """Hugging Face's Llama has no sliding window (layer_types and sliding_window are not read;
    the import put a window on layer 0, logits off by 10) and Mistral's projections have no bias
    whatever attention_bias says (the import looked for bias weights and failed)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(family, num_hidden_layers=2, **fields)).eval()
    graph = hf.from_hf(model, backend="pyg")
    assert graph.spec.windows == [None, None] if family == "llama" else not graph.spec.qkv_bias
    ids, mask = _batch(right_padding=True)
    real = mask.bool()
    torch.testing.assert_close(
        graph(input_ids=ids, attention_mask=mask).logits[real],
        model(input_ids=ids, attention_mask=mask).logits[real],
        **TOL,
    )


def test_unhashable_model_type_is_refused():
    with pytest.raises(ValueError, match=r"model_type=\['llama'\]"):
        hf.decoder_config(SimpleNamespace(model_type=["llama"]))


def test_unknown_family_is_refused():
    config = transformers.GPTJConfig(vocab_size=V, n_embd=32, n_layer=1, n_head=4, rotary_dim=4)
    with pytest.raises(ValueError, match="model_type 'gptj'"):
        hf.from_hf(transformers.GPTJForCausalLM(config))
    with pytest.raises(ValueError, match="model_type='gptj'"):
        hf.decoder_config(config)


@pytest.mark.parametrize("right_padding", [True, False])
def test_modernbert_masked_lm_loss_matches_hf(right_padding):
    model = _modernbert(True)
    graph = hf.from_hf(model, backend="pyg")
    ids, mask = _batch(right_padding)
    labels = torch.where(torch.rand(ids.shape) < 0.4, ids, -100).masked_fill(mask == 0, -100)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    out = graph(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    assert out[0] is out.loss and out.logits is not None
    with pytest.raises(ValueError, match="'labels' -100 at padded positions"):
        graph(input_ids=ids, attention_mask=mask, labels=torch.where(mask.bool(), labels, 5))
    with pytest.raises(ValueError, match="'labels'"):
        graph(input_ids=ids, attention_mask=mask, labels=labels[:, :3])
    with pytest.raises(ValueError, match="'labels' for a ModernBERT without the masked-LM head"):
        hf.from_hf(_modernbert(False))(input_ids=ids, attention_mask=mask, labels=labels)


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm_rounds_exactly_as_hugging_face(unit_offset, dtype):
    """RMSNorm reproduces Llama's (normalize in float32, cast, multiply by the gain in the input
    dtype) and Gemma's (``1 + weight`` multiplied in float32, then cast) conventions bit for bit,
    default eps included."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from gnn_transformer.norms import RMSNorm

    torch.manual_seed(0)
    ours = RMSNorm(64, unit_offset=unit_offset).to(dtype)
    theirs = (GemmaRMSNorm(64) if unit_offset else LlamaRMSNorm(64)).to(dtype)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    x = (torch.randn(16, 64) * 3).to(dtype)
    out = ours(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, theirs(x), atol=0, rtol=0)
