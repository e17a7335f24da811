"""Attention options of today's decoders (score scale, logit softcapping, head_dim != embed_dim / H,
separate output bias, qk-norm, scaled and partial RoPE), RMSNorm and gated MLPs, against dense
references."""

import pytest
import torch

from gnn_transformer import GraphMultiheadAttention, dense
from gnn_transformer.mlp import FeedForward
from gnn_transformer.norms import RMSNorm
from gnn_transformer.position import RopeScaling, RotaryEmbedding, rope_inv_freq
from gnn_transformer.topology import causal, random, sliding_window, to_dense_mask

TOL32 = dict(atol=1e-5, rtol=1e-5)
TOL64 = dict(atol=1e-10, rtol=1e-10)


def _dense(attn: GraphMultiheadAttention, x: torch.Tensor, mask: torch.Tensor, pos=None) -> torch.Tensor:
    """The layer on a dense [N, N] mask (query i keeps key j): its own projections, norms and
    rotation, then the dense package's masked softmax."""
    q = attn.project_query(x)  # [N, H, D]
    k, v = attn.project_key_value(x, x)  # [N, H_kv, D]
    if attn.rotary is not None:
        q, k = attn.rotary(q, pos), attn.rotary(k, pos)
    heads = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, N, D]
    out, _ = dense.scaled_dot_product(*heads, mask, scale=attn.scale, softcap=attn.softcap)  # [1, H, N, D]
    out = out[0].transpose(0, 1).reshape(x.size(0), -1)  # [N, H D]
    return attn.out_proj(out)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL32), (torch.float64, TOL64)])
@pytest.mark.parametrize(
    "options",
    [
        dict(scale=1.0),
        dict(softcap=0.7),
        dict(softcap=2.0, scale=0.3, head_dim=6, num_kv_heads=1),
        dict(head_dim=4, out_bias=False),
        dict(bias=False, out_bias=True),
        dict(q_norm=RMSNorm(4), k_norm=RMSNorm(4), head_dim=4, rope=True),
        dict(rope=True, rotary_dim=2, head_dim=6),
        dict(rope=True, rope_scaling=RopeScaling("yarn", factor=4.0, original_max_position_embeddings=4)),
        dict(rope=True, rope_scaling=RopeScaling("dynamic", factor=2.0, max_position_embeddings=3)),
    ],
)
def test_options_match_dense(options, dtype, tol):
    torch.manual_seed(0)
    n = 7
    attn = GraphMultiheadAttention(12, 2, backend="pyg", **options).to(dtype)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.5)
    x, pos = torch.randn(n, 12, dtype=dtype), torch.arange(n)
    edge_index = random(n, 3, seed=3)
    mask = to_dense_mask(edge_index, n, n)
    out = attn(x, edge_index, pos=pos if attn.rotary is not None else None)
    torch.testing.assert_close(out, _dense(attn, x, mask, pos), **tol)
    if attn.softcap is None:  # the kernels take the same scale
        for backend in ("fused", "tiled"):
            torch.testing.assert_close(
                attn(x, edge_index, pos=pos if attn.rotary is not None else None, backend=backend), out, **tol
            )


def test_softcap_refuses_kernel_backends():
    attn = GraphMultiheadAttention(8, 2, softcap=5.0)
    x, edge_index = torch.randn(4, 8), causal(4)
    assert attn.resolve_backend(edge_index, x.device) == "pyg"
    for backend in ("fused", "tiled", "split"):
        with pytest.raises(ValueError, match=f"backend={backend!r}"):
            attn(x, edge_index, backend=backend)
    with pytest.raises(ValueError, match="'softcap'"):
        GraphMultiheadAttention(8, 2, softcap=0.0)
    with pytest.raises(ValueError, match="'scale'"):
        GraphMultiheadAttention(8, 2, scale=-1.0)
    with pytest.raises(ValueError, match="'rope_scaling'.*rope=False"):
        GraphMultiheadAttention(8, 2, rope_scaling=RopeScaling("linear", factor=2.0))
    with pytest.raises(ValueError, match="'head_dim'"):
        GraphMultiheadAttention(8, 2, head_dim=0)


def test_softcap_weights_and_per_head_graph():
    torch.manual_seed(0)
    attn = GraphMultiheadAttention(8, 2, softcap=1.5, backend="pyg")
    x, edge_index = torch.randn(5, 8), sliding_window(5, 1, causal=True)
    _, alpha = attn(x, edge_index, return_attention_weights=True)
    dst = edge_index.as_tensor()[1]
    torch.testing.assert_close(torch.zeros(5, 2).index_add_(0, dst, alpha), torch.ones(5, 2), **TOL32)
    edge_head = torch.arange(edge_index.size(1)) % 2
    out = attn(x, edge_index, edge_head=edge_head)  # a per-head graph runs on the pyg path too
    assert out.shape == (5, 8) and torch.isfinite(out).all()


def test_partial_rope_passes_the_rest():
    rope = RotaryEmbedding(6, rotary_dim=2)
    x = torch.randn(4, 2, 6)
    out = rope(x, torch.arange(4))
    torch.testing.assert_close(out[..., 2:], x[..., 2:])
    torch.testing.assert_close(out[..., :2], RotaryEmbedding(2, scaling=RopeScaling())(x[..., :2], torch.arange(4)))
    with pytest.raises(ValueError, match="'rotary_dim'"):
        RotaryEmbedding(6, rotary_dim=3)


def _hf_rope(kind, extra):
    """A Llama config of 4 heads of 16 channels, 32 positions and rope base 1000 with Hugging Face's
    rope parameters ``kind`` / ``extra``, and Hugging Face's rope initializers."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=32,
        rope_parameters={"rope_type": kind, "rope_theta": 1000.0, **extra},
    )
    return config, ROPE_INIT_FUNCTIONS


@pytest.mark.parametrize(
    "kind,extra",
    [
        ("default", {}),
        ("linear", {"factor": 3.0}),
        ("dynamic", {"factor": 2.0}),
        (
            "llama3",
            {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        ),
        ("yarn", {"factor": 4.0, "original_max_position_embeddings": 16}),
        (
            "yarn",
            {
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "mscale": 1.0,
                "mscale_all_dim": 0.7,
                "beta_fast": 16,
                "beta_slow": 2,
                "truncate": False,
            },
        ),
    ],
)
def test_rope_inv_freq_matches_hf(kind, extra):
    config, rope_init = _hf_rope(kind, extra)
    scaling = RopeScaling(kind, max_position_embeddings=32, **extra)
    for seq_len in (None, 50):
        ours, factor = rope_inv_freq(16, 1000.0, scaling, seq_len)
        if kind == "default":
            ref, ref_factor = 1.0 / (1000.0 ** (torch.arange(0, 16, 2).float() / 16)), 1.0
        else:
            ref, ref_factor = rope_init[kind](config, None, seq_len=seq_len)
        torch.testing.assert_close(ours, ref, atol=0, rtol=1e-6)
        assert factor == pytest.approx(ref_factor)


def test_rope_scaling_refuses_bad_fields():
    with pytest.raises(ValueError, match="'rope_type'.*'proportional'"):
        RopeScaling("proportional")
    with pytest.raises(ValueError, match="'short_factor'"):
        RopeScaling("longrope", original_max_position_embeddings=16)
    with pytest.raises(ValueError, match="'original_max_position_embeddings'.*'yarn'"):
        RopeScaling("yarn", factor=2.0)
    with pytest.raises(ValueError, match="'factor'"):
        RopeScaling("linear", factor=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm(dtype, unit_offset):
    torch.manual_seed(0)
    norm = RMSNorm(8, 1e-5, unit_offset=unit_offset).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 8, dtype=dtype) * 4
    h = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    gain = norm.weight.double() + (1.0 if unit_offset else 0.0)
    tol = TOL64 if dtype == torch.float64 else (TOL32 if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2))
    torch.testing.assert_close(norm(x).double(), h * gain, **tol)
    assert norm(x).dtype == dtype
    if dtype == torch.float32 and not unit_offset:
        torch.testing.assert_close(norm(x), torch.nn.functional.rms_norm(x, (8,), norm.weight, 1e-5), **TOL32)


def test_feed_forward():
    torch.manual_seed(0)
    mlp = FeedForward(4, 6, "silu")
    x = torch.randn(5, 4)
    ref = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), ref)
    plain = FeedForward(4, 6, "gelu", gated=False, bias=True)
    assert plain.gate_proj is None
    torch.testing.assert_close(plain(x), plain.down_proj(torch.nn.functional.gelu(plain.up_proj(x))))
    with pytest.raises(ValueError, match="'hidden_dim'"):
        FeedForward(4, 0)


def test_head_dim_state_dict_shapes():
    attn = GraphMultiheadAttention(8, 2, num_kv_heads=1, head_dim=6, bias=True, out_bias=False)
    shapes = {k: list(v.shape) for k, v in attn.state_dict().items()}
    assert shapes == {"in_proj_weight": [12 + 2 * 6, 8], "in_proj_bias": [24], "out_proj.weight": [8, 12]}
    assert attn(torch.randn(3, 8), causal(3)).shape == (3, 8)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL32), (torch.float64, TOL64)])
@pytest.mark.parametrize(
    "options",
    [
        dict(q_norm=RMSNorm(4), k_norm=RMSNorm(4, unit_offset=True)),
        dict(q_norm=RMSNorm(4), k_norm=RMSNorm(4), rope=True, num_kv_heads=1),
        dict(rope=True, rotary_dim=2),
        dict(head_dim=3, num_kv_heads=1),
        dict(head_dim=6, rope=True, rotary_dim=4, q_norm=RMSNorm(6), k_norm=RMSNorm(6)),
    ],
)
def test_dense_layer_reference_takes_qk_norm_partial_rope_and_head_dim(options, dtype, tol):
    """dense.attention, the padded twin the models' references use, computes these options itself
    (it read plain RoPE only: qk-norm, rotary_dim were ignored, head_dim != C / H crashed)."""
    torch.manual_seed(0)
    layer = GraphMultiheadAttention(8, 2, backend="pyg", **options).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    lengths = [5, 3]
    x_pad = torch.randn(2, 5, 8, dtype=dtype)
    pos = torch.arange(5).expand(2, 5)
    mask = (
        torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 5, 5)
        & (torch.arange(5) < torch.tensor(lengths)[:, None])[:, None, :]
    )
    kw = dict(pos_query=pos, pos_key=pos) if layer.rotary is not None else {}
    want, _ = dense.attention(layer, x_pad, x_pad, mask, **kw)
    x = torch.cat([x_pad[b, :n] for b, n in enumerate(lengths)])
    flat_pos = torch.cat([torch.arange(n) for n in lengths])
    got = layer(x, causal(lengths), pos=flat_pos if layer.rotary is not None else None)
    torch.testing.assert_close(got, torch.cat([want[b, :n] for b, n in enumerate(lengths)]), **tol)


def test_dense_references_refuse_what_they_do_not_compute():
    x, mask, pos = torch.randn(1, 4, 8), torch.ones(1, 4, 4, dtype=torch.bool).tril(), torch.arange(4)[None]
    scaled = GraphMultiheadAttention(8, 2, rope=True, rope_scaling=RopeScaling("linear", factor=4.0))
    with pytest.raises(ValueError, match="plain RoPE frequencies.*'linear' rope_scaling"):
        dense.attention(scaled, x, x, mask, pos_query=pos, pos_key=pos)
    for layer, what in (
        (GraphMultiheadAttention(8, 2, rope=True), "rope=True"),
        (GraphMultiheadAttention(8, 2, q_norm=RMSNorm(4)), "a q_norm"),
    ):
        with pytest.raises(ValueError, match=f"built with {what}: use gnn_transformer.dense.attention"):
            dense.multihead_attention(layer, x, x, mask[0])


# ---------------------------------------------------------------- dense reference


@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL32), (torch.float64, TOL64)])
@pytest.mark.parametrize(
    "options",
    [
        dict(head_dim=6, rope=True, rotary_dim=4, k_norm=RMSNorm(6), num_kv_heads=1),
        dict(rope=True, rotary_dim=2),
        dict(rope=True),
    ],
)
def test_dense_key_value_are_the_layers_normed_and_rotated_keys(options, dtype, tol):
    """dense.key_value returns the keys the graph path attends with (k_norm, then RoPE on the first
    rotary_dim dimensions, the rest passed through in place) and the plain values, [B, H_kv, T, D]."""
    torch.manual_seed(0)
    layer = GraphMultiheadAttention(8, 2, backend="pyg", **options).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    x_pad = torch.randn(2, 5, 8, dtype=dtype)
    pos = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
    key, value = dense.key_value(layer, x_pad, pos_key=pos)
    k, v = layer.project_key_value(x_pad.reshape(10, 8), x_pad.reshape(10, 8))  # [N, H_kv, D]
    k = layer.rotary(k, pos.reshape(10))
    h_kv, d = layer.num_kv_heads, layer.head_dim
    torch.testing.assert_close(key, k.view(2, 5, h_kv, d).transpose(1, 2), **tol)
    torch.testing.assert_close(value, v.view(2, 5, h_kv, d).transpose(1, 2), **tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL32), (torch.float64, TOL64)])
@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm_default_eps_and_initial_gain(unit_offset, dtype, tol):
    """Default ``eps`` 1e-6 (it shows on inputs of mean square about 1e-6) and a gain of one at
    initialization in both conventions (weight ones, or zeros with unit_offset)."""
    norm = RMSNorm(8, unit_offset=unit_offset).to(dtype)
    assert norm.eps == 1e-6
    x = torch.randn(3, 8, dtype=dtype) * 1e-3
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), want, **tol)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(eps=0.0), r"'eps' to be a finite number > 0.0 \(got 0.0\)"),
        (dict(eps=-1e-6), r"'eps' to be a finite number > 0.0"),
        (dict(unit_offset=1), r"'unit_offset' to be a bool \(got 1\)"),
        (dict(unit_offset="yes"), r"'unit_offset' to be a bool"),
    ],
)
def test_rms_norm_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        RMSNorm(4, **kw)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL32), (torch.float64, TOL64)])
def test_feed_forward_defaults_are_swiglu_without_biases(dtype, tol):
    """FeedForward(C, F) is Llama's SwiGLU: SiLU gate, no biases, no dropout."""
    torch.manual_seed(0)
    mlp = FeedForward(4, 6, dtype=dtype)
    assert sorted(mlp.state_dict()) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    x = torch.randn(5, 4, dtype=dtype)
    gate, up = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
    want = (gate * torch.sigmoid(gate) * up) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), want, **tol)
    torch.testing.assert_close(mlp.train()(x), want, **tol)


@pytest.mark.parametrize("gated", [False, True])
def test_feed_forward_bias_puts_a_bias_in_every_projection(gated):
    mlp = FeedForward(4, 6, gated=gated, bias=True)
    names = ["down_proj.bias", "down_proj.weight", "up_proj.bias", "up_proj.weight"]
    names += ["gate_proj.bias", "gate_proj.weight"] if gated else []
    assert sorted(mlp.state_dict()) == sorted(names)


@pytest.mark.parametrize("p", [0.3, 0.5])
@pytest.mark.parametrize("gated", [False, True])
def test_feed_forward_dropout_before_down_proj_in_training_only(gated, p):
    torch.manual_seed(0)
    mlp = FeedForward(4, 6, "gelu", gated=gated, bias=True, dropout=p, dtype=torch.float64)
    x = torch.randn(7, 4, dtype=torch.float64)
    gelu = torch.nn.functional.gelu
    up = gelu(mlp.gate_proj(x)) * mlp.up_proj(x) if gated else gelu(mlp.up_proj(x))
    torch.manual_seed(1)
    out = mlp.train()(x)
    torch.manual_seed(1)
    want = mlp.down_proj(torch.nn.functional.dropout(up, p=p, training=True))
    torch.testing.assert_close(out, want, **TOL64)
    assert not torch.allclose(out, mlp.down_proj(up))  # it dropped something
    torch.testing.assert_close(mlp.eval()(x), mlp.down_proj(up), **TOL64)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(gated=1), r"'gated' to be a bool \(got 1\)"),
        (dict(gated="no"), r"'gated' to be a bool"),
        (dict(bias=0), r"'bias' to be a bool \(got 0\)"),
        (dict(dropout=1.5), r"'dropout' to be a number in \[0, 1\)"),
    ],
)
def test_feed_forward_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        FeedForward(4, 6, **kw)


@pytest.mark.parametrize(
    "kind,extra,seq_len",
    [
        ("dynamic", {"factor": 2.0}, 10),  # a call shorter than max_position_embeddings: the base is kept
        ("yarn", {"factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0}, None),  # no mscale_all_dim
        ("yarn", {"factor": 4.0, "original_max_position_embeddings": 16, "attention_factor": 0.8}, None),
        # both ramp bounds clamp to dimension 0 (beta_slow's correction dimension is below 0): a zero-width
        # ramp, widened as Hugging Face does
        ("yarn", {"factor": 4.0, "original_max_position_embeddings": 16, "beta_slow": 4.0}, None),
    ],
)
def test_rope_inv_freq_matches_hf_on_edge_cases(kind, extra, seq_len):
    config, rope_init = _hf_rope(kind, extra)
    ours, factor = rope_inv_freq(16, 1000.0, RopeScaling(kind, max_position_embeddings=32, **extra), seq_len)
    ref, ref_factor = rope_init[kind](config, None, seq_len=seq_len)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, atol=0, rtol=1e-6)
    assert factor == pytest.approx(ref_factor)


def test_dynamic_rope_below_its_length_is_the_default_rotation():
    """Dynamic NTK only grows the base past ``max_position_embeddings``: shorter calls rotate as
    unscaled RoPE (b' = b (s L / M - (s - 1))^(d / (d - 2)) with L = max(max(pos) + 1, M))."""
    default, _ = rope_inv_freq(16, 1000.0)
    dynamic = RopeScaling("dynamic", factor=2.0, max_position_embeddings=32)
    for seq_len in (1, 10, 32):
        torch.testing.assert_close(rope_inv_freq(16, 1000.0, dynamic, seq_len)[0], default, atol=0, rtol=1e-6)
    grown = 1000.0 * (2.0 * 64 / 32 - 1.0) ** (16 / 14)
    want = 1.0 / grown ** (torch.arange(0, 16, 2).float() / 16)
    torch.testing.assert_close(rope_inv_freq(16, 1000.0, dynamic, 64)[0], want, atol=0, rtol=1e-5)


def test_longrope_attention_factor_is_one_without_extension():
    """LongRoPE's default attention factor: sqrt(1 + ln s / ln M0) for s > 1, else 1."""
    import math

    short, long = (1.0, 1.5, 2.0, 3.0), (2.0, 3.0, 4.0, 6.0)
    for factor, want in ((0.5, 1.0), (1.0, 1.0), (4.0, math.sqrt(1 + math.log(4.0) / math.log(16)))):
        scaling = RopeScaling(
            "longrope", factor=factor, original_max_position_embeddings=16, short_factor=short, long_factor=long
        )
        assert rope_inv_freq(8, 100.0, scaling)[1] == pytest.approx(want)


@pytest.mark.parametrize(
    "scaling",
    [
        RopeScaling("dynamic", factor=2.0, max_position_embeddings=8),
        RopeScaling("longrope", original_max_position_embeddings=8, short_factor=(1.0, 2.0), long_factor=(3.0, 4.0)),
    ],
)
def test_length_dependent_rotary_embedding_of_no_nodes(scaling):
    """A call without nodes (no new token in a step) has no longest position: nothing to rotate."""
    rope = RotaryEmbedding(4, scaling=scaling)
    assert rope(torch.randn(0, 2, 4), torch.zeros(0, dtype=torch.long)).shape == (0, 2, 4)


@pytest.mark.parametrize("base", [1.0, 0.5])
def test_rotary_and_sinusoidal_bases_must_exceed_one(base):
    """A base of 1 gives every dimension the same frequency (and below 1 they grow): refused."""
    from gnn_transformer.position import SinusoidalPositionalEmbedding

    with pytest.raises(ValueError, match=f"'base' to be a finite number > 1 \\(got {base}\\)"):
        RotaryEmbedding(8, base=base)
    with pytest.raises(ValueError, match=f"'base' to be a finite number > 1 \\(got {base}\\)"):
        SinusoidalPositionalEmbedding(8, base=base)


@pytest.mark.parametrize("low,high", [(4.0, 4.0), (4.0, 1.0)])
def test_llama3_scaling_refuses_low_freq_factor_not_below_high(low, high):
    """Llama 3's smooth band divides by high_freq_factor - low_freq_factor: it must be positive."""
    with pytest.raises(ValueError, match="'low_freq_factor' < 'high_freq_factor'"):
        RopeScaling(
            "llama3", factor=8.0, original_max_position_embeddings=16, low_freq_factor=low, high_freq_factor=high
        )
