"""Phi-3's LongRoPE ("longrope" RoPE scaling) imported from Hugging Face: equal logits on both sides of
``original_max_position_embeddings`` (short and long factors), padded batches, and cached generation
that crosses the switch as Hugging Face's ``generate`` does."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gnn_transformer import hf  # noqa: E402
from gnn_transformer.position import RopeScaling, RotaryEmbedding, rope_inv_freq  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TOL = dict(atol=1e-4, rtol=1e-4)
V, ORIGINAL = 61, 16  # vocabulary; the pretraining context that switches short and long factors
SHORT = [1.0, 1.3, 2.1, 3.7]  # one factor per rotated frequency: head_dim 8 / 2
LONG = [1.5, 4.0, 9.0, 21.0]


def _model(partial: float = 1.0, **rope):
    """A tiny random Phi-3 with LongRoPE (``partial < 1``: the first factors of the rotated dimensions)."""
    half = int(8 * partial) // 2
    config = transformers.Phi3Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        original_max_position_embeddings=ORIGINAL,
        initializer_range=0.3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
        tie_word_embeddings=False,
        attn_implementation="eager",
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 500.0,
            "partial_rotary_factor": partial,
            "short_factor": SHORT[:half],
            "long_factor": LONG[:half],
            **rope,
        },
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _batch(lengths: list[int], width: int, right_padding: bool):
    torch.manual_seed(1)
    ids = torch.randint(2, V, (len(lengths), width))
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        if right_padding:
            mask[row, :n] = 1
        else:
            mask[row, width - n :] = 1
    return ids, mask


@pytest.mark.parametrize("rope", [{}, {"attention_factor": 0.8, "factor": 3.0}])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_longrope_frequencies_are_hugging_faces(partial, rope):
    """The inverse frequencies and attention factor, short (up to the original length) and long."""
    from transformers.modeling_rope_utils import _compute_longrope_parameters

    model = _model(partial, **rope)
    scaling = hf.GraphDecoderLM(model.config).layers[0].self_attn.rotary.scaling
    dim = int(8 * partial)
    for seq_len in (None, ORIGINAL - 1, ORIGINAL, ORIGINAL + 1, 60):
        want, want_factor = _compute_longrope_parameters(model.config, seq_len=seq_len)
        got, factor = rope_inv_freq(dim, 500.0, scaling, seq_len)
        assert torch.equal(got, want) and factor == want_factor
    assert factor == (0.8 if rope else (1 + torch.tensor(4.0).log().item() / torch.tensor(16.0).log().item()) ** 0.5)


@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("right_padding", [True, False])
@pytest.mark.parametrize("lengths,width", [([12, 9, 2], 12), ([16, 5], 16), ([17, 5], 17), ([24, 17, 3], 24)])
def test_longrope_matches_hf(lengths, width, right_padding, partial):
    """Batches whose longest sequence is shorter than, at, and beyond the original length: every
    sequence gets the factors of the batch's longest position, as in Hugging Face."""
    model = _model(partial)
    graph = hf.from_hf(model, backend="pyg")
    ids, mask = _batch(lengths, width, right_padding)
    real = mask.bool()
    ref = model(input_ids=ids, attention_mask=mask).logits
    out = graph(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out[real], ref[real], **TOL)
    # the factors matter: the shortest sequence alone (short factors) differs once the batch is long
    short = lengths[-1]
    alone = graph(input_ids=ids[-1:][real[-1:]].view(1, short)).logits[0]
    if max(lengths) > ORIGINAL:
        assert not torch.allclose(alone, out[-1][real[-1]], **TOL)
    else:
        torch.testing.assert_close(alone, out[-1][real[-1]], **TOL)


def test_padding_beyond_the_original_length_does_not_count():
    """Hugging Face counts the positions of right padding (``position_ids`` default to the columns);
    a graph has no padding nodes: its batch equals Hugging Face's batch cut to the longest sequence."""
    model = _model()
    graph = hf.from_hf(model, backend="pyg")
    ids, mask = _batch([14, 9, 3], 20, right_padding=True)  # real tokens within 16, padding up to 20
    real = mask.bool()
    out = graph(input_ids=ids, attention_mask=mask).logits
    cut = model(input_ids=ids[:, :14], attention_mask=mask[:, :14]).logits
    torch.testing.assert_close(out[:, :14][real[:, :14]], cut[real[:, :14]], **TOL)
    padded = model(input_ids=ids, attention_mask=mask).logits  # Hugging Face switched to the long factors
    assert not torch.allclose(padded[real], out[real], **TOL)


def _hf_cached_greedy(model, ids, mask, new):
    """Greedy decoding with Hugging Face's forward and a cache, one call per token: every call
    chooses the factors by its largest position, as Hugging Face's rotary embedding does."""
    pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)  # as Hugging Face's generate sets them
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    logits = [out.logits[:, -1]]
    for _ in range(new - 1):
        token = logits[-1].argmax(-1, keepdim=True)  # [B, 1]
        mask, pos = torch.cat([mask, torch.ones_like(token)], 1), pos[:, -1:] + 1
        out = model(input_ids=token, attention_mask=mask, position_ids=pos, cache=out.cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits)  # [new, B, V]


def test_generation_across_the_switch():
    """Prompts of 12, 9 and 2 tokens then 10 new ones: positions pass the original length (16) at
    step 5. Hugging Face's Phi-3 ``generate`` drops its cache at that step and recomputes every
    token with the long factors; the graph model's ``generate`` does the same (cached or not) and
    equals it. :func:`gnn_transformer.decoding.generate` itself keeps one cache throughout: it
    rotates each call's new tokens by the call's largest position, as Hugging Face's forward does
    on a cache, so the prompt's keys keep their short factors and it equals Hugging Face's forward
    called token by token."""
    from gnn_transformer.decoding import generate

    model = _model()
    graph = hf.from_hf(model, backend="pyg")
    ids, mask = _batch([12, 9, 2], 12, right_padding=False)  # left padding, as generation wants
    new, switch = 10, ORIGINAL - 12 + 1  # the step whose position is the original length
    lengths = mask.sum(1).tolist()
    runs = {
        use_cache: graph.generate(ids, attention_mask=mask, max_new_tokens=new, use_cache=use_cache, return_logits=True)
        for use_cache in (True, False)
    }
    for use_cache in (True, False):
        ref = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            use_cache=use_cache,
            output_logits=True,
            return_dict_in_generate=True,
        )
        for out, logits in runs.values():
            for row, n in enumerate(lengths):
                assert out[row, n : n + new].tolist() == ref.sequences[row, ids.size(1) :].tolist()
            torch.testing.assert_close(logits, torch.stack(ref.logits), **TOL)
    _, one_cache = generate(graph, ids, new, attention_mask=mask, window=graph.windows, return_logits=True)
    torch.testing.assert_close(one_cache, _hf_cached_greedy(model, ids, mask, new), **TOL)
    recomputed = runs[False][1]
    torch.testing.assert_close(one_cache[:switch], recomputed[:switch], **TOL)  # short factors throughout
    assert not torch.allclose(one_cache[switch:], recomputed[switch:], **TOL)  # prompt keys short, queries long


def test_rotary_embedding_switches_on_the_longest_position_of_the_call():
    scaling = RopeScaling(
        "longrope", factor=4.0, original_max_position_embeddings=ORIGINAL, short_factor=SHORT, long_factor=LONG
    )
    rope = RotaryEmbedding(8, 500.0, scaling=scaling)
    pos = torch.tensor([0, 5, 15])
    for last, factors in ((ORIGINAL - 1, SHORT), (ORIGINAL, LONG)):  # max(pos) + 1 = 16, then 17
        inv_freq = 1.0 / (torch.tensor(factors) * 500.0 ** (torch.arange(0, 8, 2).float() / 8))  # [4]
        angle = torch.cat([pos, torch.tensor([last])]).double().unsqueeze(-1) * inv_freq.double()  # [4, 4]
        cos, sin = rope.cos_sin(torch.cat([pos, torch.tensor([last])]), torch.float64)
        magnitude = (1 + torch.tensor(4.0).log() / torch.tensor(16.0).log()).sqrt().item()
        torch.testing.assert_close(cos[:, 0], torch.cat([angle, angle], -1).cos() * magnitude, atol=1e-6, rtol=0)
        torch.testing.assert_close(sin[:, 0], torch.cat([angle, angle], -1).sin() * magnitude, atol=1e-6, rtol=0)
    assert "longrope" in repr(rope)


@pytest.mark.parametrize(
    "fields,match",
    [
        (
            dict(short_factor=SHORT[:3], long_factor=LONG[:3]),
            r"'short_factor' and 'long_factor' of 4 numbers .* \(got 3\)",
        ),
        (dict(long_factor=LONG + [1.0]), r"'short_factor' and 'long_factor' of one length.*4 and 5"),
        (dict(short_factor=[1.0, 0.0, 1.0, 1.0]), r"'short_factor' to be a non-empty sequence of finite numbers > 0"),
        (dict(long_factor=None), r"'long_factor' to be a non-empty sequence"),
        (dict(original_max_position_embeddings=None), r"'original_max_position_embeddings' to be a positive int"),
        (dict(attention_factor=-1.0), r"'attention_factor' to be a finite number > 0 \(got -1.0\)"),
    ],
)
def test_bad_longrope_scalings_are_refused(fields, match):
    kwargs = dict(factor=4.0, original_max_position_embeddings=ORIGINAL, short_factor=SHORT, long_factor=LONG)
    with pytest.raises(ValueError, match=match):
        RotaryEmbedding(8, scaling=RopeScaling("longrope", **{**kwargs, **fields}))
    with pytest.raises(ValueError, match="'short_factor' only with rope_type 'longrope'"):
        RopeScaling("linear", factor=2.0, short_factor=SHORT)


def test_hf_configs_with_bad_or_other_rope_types_are_refused():
    model = _model()
    config = model.config
    config.rope_parameters = {**config.rope_parameters, "short_factor": SHORT[:3], "long_factor": LONG[:3]}
    with pytest.raises(ValueError, match=r"rope_parameters=.*'short_factor' and 'long_factor' of 4 numbers"):
        hf.GraphDecoderLM(config)
    config.rope_parameters = {"rope_type": "proportional", "rope_theta": 500.0}
    with pytest.raises(ValueError, match=r"rope_parameters\['rope_type'\]='proportional'"):
        hf.GraphDecoderLM(config)
