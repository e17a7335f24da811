"""Graph encoder/decoder layers, stacks and GraphTransformer against torch.nn on padded batches."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

from gnn_transformer import (
    GraphMultiheadAttention,
    GraphTransformer,
    GraphTransformerDecoder,
    GraphTransformerDecoderLayer,
    GraphTransformerEncoder,
    GraphTransformerEncoderLayer,
    from_padded,
    padding_mask,
    to_padded,
)
from gnn_transformer.topology import causal, cross, full

from .conftest import TOL

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")

SRC_LENGTHS = [4, 1, 6]
TGT_LENGTHS = [3, 5, 2]


def _perturb(module: nn.Module) -> nn.Module:
    with torch.no_grad():  # nonzero biases and non-unit norms so that every parameter matters
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


def _load(graph: nn.Module, reference: nn.Module) -> nn.Module:
    graph.load_state_dict(reference.state_dict())
    assert set(graph.state_dict()) == set(reference.state_dict())
    return graph.eval()


def _assert_grads_close(reference: nn.Module, graph: nn.Module, dtype):
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, p in graph.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], **TOL[dtype], msg=name)


def _key_padding(lengths, t):
    return ~padding_mask(lengths, t)  # torch.nn: True = padding, ignored


def _causal_mask(t):
    return torch.ones(t, t, dtype=torch.bool).triu(1)  # torch.nn: True = not allowed


def _inputs(lengths, d, dtype):
    x_pad = torch.randn(len(lengths), max(lengths), d, dtype=dtype)
    x = from_padded(x_pad, lengths).requires_grad_()
    x_ref = x_pad.clone().requires_grad_()
    return x, x_ref


CONFIGS = [(norm_first, activation) for norm_first in (False, True) for activation in ("relu", "gelu")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_first,activation", CONFIGS)
@pytest.mark.parametrize("kind", ["full", "causal"])
def test_encoder_layer_matches_torch(kind, norm_first, activation, dtype):
    ref = _perturb(
        nn.TransformerEncoderLayer(
            16, 4, 24, dropout=0.1, activation=activation, batch_first=True, norm_first=norm_first, dtype=dtype
        )
    )
    layer = _load(
        GraphTransformerEncoderLayer(
            16, 4, 24, dropout=0.1, activation=activation, norm_first=norm_first, dtype=dtype, backend="pyg"
        ),
        ref,
    )
    ref.eval()
    x, x_ref = _inputs(SRC_LENGTHS, 16, dtype)
    t = max(SRC_LENGTHS)
    edge_index = full(SRC_LENGTHS) if kind == "full" else causal(SRC_LENGTHS)
    out = layer(x, edge_index)
    out_ref = ref(
        x_ref, src_mask=_causal_mask(t) if kind == "causal" else None, src_key_padding_mask=_key_padding(SRC_LENGTHS, t)
    )
    torch.testing.assert_close(out, from_padded(out_ref, SRC_LENGTHS), **TOL[dtype])
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (from_padded(out_ref, SRC_LENGTHS) * grad).sum().backward()
    torch.testing.assert_close(x.grad, from_padded(x_ref.grad, SRC_LENGTHS), **TOL[dtype])
    _assert_grads_close(ref, layer, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_first,activation", CONFIGS)
def test_decoder_layer_matches_torch(norm_first, activation, dtype):
    ref = _perturb(
        nn.TransformerDecoderLayer(
            16, 4, 24, activation=activation, batch_first=True, norm_first=norm_first, dtype=dtype
        )
    )
    layer = _load(
        GraphTransformerDecoderLayer(
            16, 4, 24, activation=activation, norm_first=norm_first, dtype=dtype, backend="pyg"
        ),
        ref,
    )
    ref.eval()
    x, x_ref = _inputs(TGT_LENGTHS, 16, dtype)
    mem, mem_ref = _inputs(SRC_LENGTHS, 16, dtype)
    t, s = max(TGT_LENGTHS), max(SRC_LENGTHS)
    out = layer(x, causal(TGT_LENGTHS), mem, cross(TGT_LENGTHS, SRC_LENGTHS))
    out_ref = ref(
        x_ref,
        mem_ref,
        tgt_mask=_causal_mask(t),
        tgt_key_padding_mask=_key_padding(TGT_LENGTHS, t),
        memory_key_padding_mask=_key_padding(SRC_LENGTHS, s),
    )
    torch.testing.assert_close(out, from_padded(out_ref, TGT_LENGTHS), **TOL[dtype])
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (from_padded(out_ref, TGT_LENGTHS) * grad).sum().backward()
    torch.testing.assert_close(x.grad, from_padded(x_ref.grad, TGT_LENGTHS), **TOL[dtype])
    torch.testing.assert_close(mem.grad, from_padded(mem_ref.grad, SRC_LENGTHS), **TOL[dtype])
    _assert_grads_close(ref, layer, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_first", [False, True])
def test_stacks_match_torch(norm_first, dtype):
    """Five layers deep, outputs and every gradient. The loss is a mean, so that the gradients are of
    order one and float32's tolerance asks for agreement near its rounding: with a sum the weight
    gradients reach 40, where torch.nn's own float32 result is 2e-5 from the float64 one."""
    enc_ref = _perturb(
        nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 2, 32, activation="gelu", batch_first=True, norm_first=norm_first),
            3,
            nn.LayerNorm(16),
            enable_nested_tensor=False,
        ).to(dtype)
    )
    enc = _load(
        GraphTransformerEncoder(
            GraphTransformerEncoderLayer(16, 2, 32, activation="gelu", norm_first=norm_first, backend="pyg"),
            3,
            nn.LayerNorm(16),
        ).to(dtype),
        enc_ref,
    )
    dec_ref = _perturb(
        nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 32, batch_first=True, norm_first=norm_first), 2).to(
            dtype
        )
    )
    dec = _load(
        GraphTransformerDecoder(GraphTransformerDecoderLayer(16, 2, 32, norm_first=norm_first, backend="pyg"), 2).to(
            dtype
        ),
        dec_ref,
    )
    enc_ref.eval(), dec_ref.eval()
    src, src_ref = _inputs(SRC_LENGTHS, 16, dtype)
    tgt, tgt_ref = _inputs(TGT_LENGTHS, 16, dtype)
    t, s = max(TGT_LENGTHS), max(SRC_LENGTHS)
    memory = enc(src, full(SRC_LENGTHS))
    out = dec(tgt, causal(TGT_LENGTHS), memory, cross(TGT_LENGTHS, SRC_LENGTHS))
    mem_ref = enc_ref(src_ref, src_key_padding_mask=_key_padding(SRC_LENGTHS, s))
    out_ref = dec_ref(
        tgt_ref,
        mem_ref,
        tgt_mask=_causal_mask(t),
        tgt_key_padding_mask=_key_padding(TGT_LENGTHS, t),
        memory_key_padding_mask=_key_padding(SRC_LENGTHS, s),
    )
    torch.testing.assert_close(memory, from_padded(mem_ref, SRC_LENGTHS), **TOL[dtype])
    torch.testing.assert_close(out, from_padded(out_ref, TGT_LENGTHS), **TOL[dtype])
    (out.square().mean() + memory.mean()).backward()
    (from_padded(out_ref, TGT_LENGTHS).square().mean() + from_padded(mem_ref, SRC_LENGTHS).mean()).backward()
    _assert_grads_close(enc_ref, enc, dtype)
    _assert_grads_close(dec_ref, dec, dtype)
    torch.testing.assert_close(src.grad, from_padded(src_ref.grad, SRC_LENGTHS), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_transformer_matches_torch(norm_first, activation, dtype):
    ref = _perturb(
        nn.Transformer(16, 4, 2, 2, 32, activation=activation, batch_first=True, norm_first=norm_first, dtype=dtype)
    )
    model = _load(
        GraphTransformer(16, 4, 2, 2, 32, activation=activation, norm_first=norm_first, dtype=dtype, backend="pyg"), ref
    )
    ref.eval()
    src, src_ref = _inputs(SRC_LENGTHS, 16, dtype)
    tgt, tgt_ref = _inputs(TGT_LENGTHS, 16, dtype)
    t, s = max(TGT_LENGTHS), max(SRC_LENGTHS)
    out = model(src, tgt, full(SRC_LENGTHS), causal(TGT_LENGTHS), cross(TGT_LENGTHS, SRC_LENGTHS))
    out_ref = ref(
        src_ref,
        tgt_ref,
        tgt_mask=_causal_mask(t),
        src_key_padding_mask=_key_padding(SRC_LENGTHS, s),
        tgt_key_padding_mask=_key_padding(TGT_LENGTHS, t),
        memory_key_padding_mask=_key_padding(SRC_LENGTHS, s),
    )
    torch.testing.assert_close(out, from_padded(out_ref, TGT_LENGTHS), **TOL[dtype])
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (from_padded(out_ref, TGT_LENGTHS) * grad).sum().backward()
    torch.testing.assert_close(src.grad, from_padded(src_ref.grad, SRC_LENGTHS), **TOL[dtype])
    torch.testing.assert_close(tgt.grad, from_padded(tgt_ref.grad, TGT_LENGTHS), **TOL[dtype])
    _assert_grads_close(ref, model, dtype)


def test_state_dicts_load_both_ways():
    ours = GraphTransformer(12, 3, 1, 2, 20)
    theirs = nn.Transformer(12, 3, 1, 2, 20)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs.state_dict()[name]), name
    no_bias = GraphTransformerEncoderLayer(12, 3, 20, bias=False)
    assert set(no_bias.state_dict()) == set(nn.TransformerEncoderLayer(12, 3, 20, bias=False).state_dict())
    assert "encoder.norm.weight" in ours.state_dict() and "decoder.layers.1.norm3.bias" in ours.state_dict()


def test_training_mode_dropout_changes_output_and_eval_is_deterministic():
    layer = GraphTransformerEncoderLayer(8, 2, 16, dropout=0.5, backend="pyg")
    x, ei = torch.randn(5, 8), causal(5)
    torch.manual_seed(1)
    a = layer(x, ei)
    torch.manual_seed(2)
    b = layer(x, ei)
    assert not torch.allclose(a, b)
    layer.eval()
    torch.testing.assert_close(layer(x, ei), layer(x, ei))


@pytest.mark.parametrize("name", ["dropout", "dropout1", "dropout2"])
def test_each_residual_dropout_runs_when_its_own_p_is_set(name):
    """A dropout module with ``p`` 0 or in evaluation mode is skipped, not called; one whose ``p``
    is set later (or that alone is in training mode) still drops."""
    layer = GraphTransformerEncoderLayer(8, 2, 16, dropout=0.0, backend="pyg").eval()
    x, ei = torch.randn(5, 8), causal(5)
    clean = layer(x, ei)
    module = getattr(layer, name)
    module.p = 0.5
    torch.testing.assert_close(layer(x, ei), clean)  # evaluation mode: the identity
    module.train()
    torch.manual_seed(1)
    assert not torch.allclose(layer(x, ei), clean)
    module.p = 0.0
    torch.testing.assert_close(layer(x, ei), clean)
    setattr(layer, name, nn.Identity())  # any module put in its place is called
    torch.testing.assert_close(layer(x, ei), clean)
    setattr(layer, name, _Twice())
    assert not torch.allclose(layer(x, ei), clean)


class _Twice(nn.Module):
    def forward(self, x):
        return 2 * x


def test_empty_rows_and_isolated_tokens_are_finite():
    layer = GraphTransformerDecoderLayer(8, 2, 16, dropout=0.0, backend="pyg").eval()
    x, memory = torch.randn(4, 8), torch.randn(3, 8)
    out = layer(x, torch.empty(2, 0, dtype=torch.long), memory, torch.empty(2, 0, dtype=torch.long))
    assert torch.isfinite(out).all()


def test_callable_activation_and_padding_free_batches():
    layer = GraphTransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=F.silu, backend="pyg").eval()
    x = torch.randn(7, 8)
    lengths = [3, 4]
    together = layer(x, causal(lengths))
    apart = torch.cat([layer(x[:3], causal(3)), layer(x[3:], causal(4))])
    torch.testing.assert_close(together, apart, **TOL[torch.float32])
    padded = to_padded(together, lengths)
    assert padded.shape == (2, 4, 8) and (padded[0, 3] == 0).all()
    for bad in ([2.7, 1.2], [True, 1], torch.tensor([2.0, 1.0])):  # never truncated silently
        with pytest.raises(ValueError, match="'lengths'.*integers"):
            from_padded(padded, bad)
    torch.testing.assert_close(from_padded(padded, torch.tensor(lengths, dtype=torch.int32)), together)


def test_bad_arguments():
    with pytest.raises(ValueError, match="'activation'.*'swish'"):
        GraphTransformerEncoderLayer(8, 2, activation="swish")
    with pytest.raises(ValueError, match="'dim_feedforward'.*0"):
        GraphTransformerEncoderLayer(8, 2, 0)
    with pytest.raises(ValueError, match="'dropout'.*1.5"):
        GraphTransformerDecoderLayer(8, 2, dropout=1.5)
    with pytest.raises(ValueError, match="'num_layers'.*-1"):
        GraphTransformerEncoder(GraphTransformerEncoderLayer(8, 2), -1)
    with pytest.raises(ValueError, match="'kv_share_every'.*0"):
        GraphTransformerEncoder(GraphTransformerEncoderLayer(8, 2), 2, kv_share_every=0)
    layer = GraphTransformerEncoderLayer(8, 2, backend="pyg")
    with pytest.raises(ValueError, match=r"'x'.*\[N, 8\]"):
        layer(torch.randn(3, 5), causal(3))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    norm_first=st.booleans(),
    causal_mask=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_property_encoder_layer_equals_torch(lengths, norm_first, causal_mask, seed):
    torch.manual_seed(seed)
    dtype = torch.float64
    ref = _perturb(
        nn.TransformerEncoderLayer(8, 2, 12, activation="gelu", batch_first=True, norm_first=norm_first, dtype=dtype)
    ).eval()
    layer = _load(
        GraphTransformerEncoderLayer(8, 2, 12, activation="gelu", norm_first=norm_first, dtype=dtype, backend="pyg"),
        ref,
    )
    x_pad = torch.randn(len(lengths), max(lengths), 8, dtype=dtype)
    t = max(lengths)
    out = layer(from_padded(x_pad, lengths), causal(lengths) if causal_mask else full(lengths))
    with torch.no_grad():
        out_ref = ref(
            x_pad, src_mask=_causal_mask(t) if causal_mask else None, src_key_padding_mask=_key_padding(lengths, t)
        )
    torch.testing.assert_close(out, from_padded(out_ref, lengths), **TOL[dtype])


class _NoSelfKV(torch.nn.Module):
    """A custom layer with a self-attention but no self_kv method."""

    def __init__(self):
        super().__init__()
        self.self_attn = GraphMultiheadAttention(8, 2, backend="pyg")

    def forward(self, x, edge_index, **kwargs):
        return self.self_attn(x, edge_index, kv=kwargs.get("kv"))


def test_kv_sharing_needs_layers_with_self_kv():
    stack = GraphTransformerEncoder(_NoSelfKV(), 2, kv_share_every=2)
    with pytest.raises(TypeError, match=r"layer 0 to have a method self_kv.*kv_share_every=2.*_NoSelfKV"):
        stack(torch.randn(3, 8), causal(3))


@pytest.mark.parametrize("norm_first", [False, True])
def test_feedforward_dropout_sits_where_torch_puts_it(norm_first):
    """``dropout`` acts on the hidden activations of the feed-forward block, between ``activation``
    and ``linear2`` (``nn.TransformerEncoderLayer``'s ``_ff_block``): a module put in its place
    in both layers gives the same outputs."""
    ref = _perturb(nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True, norm_first=norm_first))
    layer = _load(GraphTransformerEncoderLayer(16, 4, 24, dropout=0.0, norm_first=norm_first, backend="pyg"), ref)
    ref.eval()
    ref.dropout, layer.dropout = _Twice(), _Twice()
    x, x_ref = _inputs(SRC_LENGTHS, 16, torch.float32)
    t = max(SRC_LENGTHS)
    out = layer(x, causal(SRC_LENGTHS))
    out_ref = ref(x_ref, src_mask=_causal_mask(t), src_key_padding_mask=_key_padding(SRC_LENGTHS, t))
    torch.testing.assert_close(out, from_padded(out_ref, SRC_LENGTHS), **TOL[torch.float32])
