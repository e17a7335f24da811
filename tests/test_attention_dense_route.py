"""The layer's short route for its commonest call: self-attention that ``auto`` runs through
PyTorch's attention kernels goes ``forward`` -> ``kernels.attend_dense``. It gives exactly the
general path's result (the same kernels on the same heads: outputs and gradients equal bit for bit),
and every call it does not cover takes the general path, through ``attend``."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from gnn_transformer import GraphMultiheadAttention, kernels
from gnn_transformer.kernels import attend_reference, choose_backend
from gnn_transformer.topology import causal, document, full, sliding_window
from gnn_transformer.variants import SigmoidAttention


class _Calls:
    """Counts the calls of ``kernels.attend`` and ``kernels.attend_dense`` as the layer makes them."""

    def __init__(self, monkeypatch):
        self.general = self.dense = 0
        attend, attend_dense = kernels.attend, kernels.attend_dense

        def general(*args, **kwargs):
            self.general += 1
            return attend(*args, **kwargs)

        def dense(*args, **kwargs):
            self.dense += 1
            return attend_dense(*args, **kwargs)

        monkeypatch.setattr(kernels, "attend", general)
        monkeypatch.setattr(kernels, "attend_dense", dense)


def _layer(dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    return GraphMultiheadAttention(16, 4, dtype=dtype, **kwargs)


def _grads(layer, x, out):
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    params = [p for p in layer.parameters() if p.requires_grad]
    return torch.autograd.grad((out * weights).sum(), [x, *params])


GRAPHS = {
    "causal": (lambda: causal(13), 13),
    "batch-causal": (lambda: causal([5, 7, 3]), 15),
    "batch-full": (lambda: full([4, 4, 4]), 12),
    "document-causal": (lambda: document(14, [3, 6, 5], causal=True), 14),
    "one-token": (lambda: causal(1), 1),
}
LAYERS = {
    "plain": {},
    "no-bias": {"bias": False},
    "gqa": {"num_kv_heads": 2},
    "mqa-rope": {"num_kv_heads": 1, "rope": True},
    "head-dim-scale": {"head_dim": 6, "scale": 0.3},
    "qk-norm": {"q_norm": nn.LayerNorm(4), "k_norm": nn.LayerNorm(4)},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", list(LAYERS))
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_short_route_equals_the_general_path_bit_for_bit(graph, options, dtype, monkeypatch):
    build, n = GRAPHS[graph]
    edge_index = build()
    layer = _layer(dtype, **LAYERS[options]).to(dtype)
    x = torch.randn(n, 16, dtype=dtype, requires_grad=True)
    pos = torch.arange(n) if layer.rotary is not None else None
    calls = _Calls(monkeypatch)
    out = layer(x, edge_index, pos=pos)
    assert (calls.dense, calls.general) == (1, 0)
    general = layer(x, edge_index, pos=pos, backend="auto")  # a named backend: the general path
    assert calls.general == 1
    assert torch.equal(out, general)
    for got, want in zip(_grads(layer, x, out), _grads(layer, x, general)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_short_route_matches_the_dense_reference(dtype, tol):
    edge_index = causal([6, 9])
    layer = _layer(dtype, num_kv_heads=2).to(dtype)
    x = torch.randn(15, 16, dtype=dtype, requires_grad=True)
    out = layer(x, edge_index)
    q, k, v = layer.project(x, x, x)
    ref = layer.out_proj(attend_reference(q, k, v, edge_index, scale=0.5).reshape(15, 16))
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for got, want in zip(_grads(layer, x, out), _grads(layer, x, ref)):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


class _OwnAttend(GraphMultiheadAttention):
    def attend(self, *args, **kwargs):
        self.seen = getattr(self, "seen", 0) + 1
        return super().attend(*args, **kwargs)


def _dropout_training():
    layer = _layer(dropout=0.2)
    layer.train()
    return layer


def _named_backend():
    layer = _layer()
    layer.backend = "tiled"
    return layer


GENERAL = {
    "attention-dropout-in-training": _dropout_training,
    "softcap": lambda: _layer(softcap=20.0),
    "backend-named-on-the-layer": _named_backend,
    "select": lambda: _layer(select=lambda q, k, e: (e, torch.zeros(e.size(1), dtype=torch.long))),
}


@pytest.mark.parametrize("name", list(GENERAL))
def test_layers_the_short_route_does_not_cover_take_the_general_path(name, monkeypatch):
    layer = GENERAL[name]()
    calls = _Calls(monkeypatch)
    torch.manual_seed(5)
    out = layer(torch.randn(12, 16, dtype=torch.float64), causal(12))
    assert calls.dense == 0
    assert out.shape == (12, 16)


def test_calls_the_short_route_does_not_cover_take_the_general_path(monkeypatch):
    layer = _layer()
    x = torch.randn(12, 16, dtype=torch.float64)
    edge_index = causal(12)
    calls = _Calls(monkeypatch)
    layer(x, edge_index, edge_bias=torch.zeros(edge_index.size(1), 4, dtype=torch.float64))
    layer(x, edge_index, return_attention_weights=True)
    layer(x, edge_index, edge_head=torch.zeros(edge_index.size(1), dtype=torch.long))
    layer((x, x), edge_index)
    layer(x, edge_index, value=x)
    layer(x, edge_index, kv=layer.key_value(x))
    layer(x, causal(12, implicit=True))
    assert calls.dense == 0
    assert calls.general == 7


def test_a_graph_sdpa_does_not_run_takes_the_general_route_with_the_same_heads(monkeypatch):
    """attend_dense declines before running anything; the layer then attends through its own
    ``attend`` on the heads it has already projected (the general path's result, bit for bit)."""
    layer = _layer()
    x = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    edge_index = sliding_window(20, 3)
    calls = _Calls(monkeypatch)
    out = layer(x, edge_index)
    assert (calls.dense, calls.general) == (1, 1)
    general = layer(x, edge_index, backend="auto")
    assert torch.equal(out, general)
    for got, want in zip(_grads(layer, x, out), _grads(layer, x, general)):
        assert torch.equal(got, want)


def test_an_attend_replaced_on_the_class_or_the_instance_sees_every_call(monkeypatch):
    layer = _OwnAttend(16, 4, dtype=torch.float64)
    calls = _Calls(monkeypatch)
    layer(torch.randn(8, 16, dtype=torch.float64), causal(8))
    assert layer.seen == 1 and calls.dense == 0
    sigmoid = SigmoidAttention(16, 4, dtype=torch.float64)
    sigmoid(torch.randn(8, 16, dtype=torch.float64), causal(8))
    assert calls.dense == 0

    plain = _layer()
    seen = []
    original = plain.attend

    def wrapper(*args, **kwargs):
        seen.append(1)
        return original(*args, **kwargs)

    plain.attend = wrapper
    plain(torch.randn(8, 16, dtype=torch.float64), causal(8))
    assert seen == [1] and calls.dense == 0


@pytest.mark.parametrize("graph", ["causal", "batch-causal"])
def test_autocast_on_the_short_route_equals_the_general_path(graph, monkeypatch):
    """Under autocast the short route casts the heads as ``attend`` does: the general path's
    bfloat16 output and gradients, bit for bit."""
    build, n = GRAPHS[graph]
    edge_index = build()
    layer = _layer(torch.float32, num_kv_heads=2)
    x = torch.randn(n, 16, requires_grad=True)
    calls = _Calls(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, edge_index)
        assert (calls.dense, calls.general) == (1, 0)
        general = layer(x, edge_index, backend="auto")
    assert out.dtype == general.dtype == torch.bfloat16
    assert torch.equal(out, general)
    for got, want in zip(_grads(layer, x, out), _grads(layer, x, general)):
        assert torch.equal(got, want)


def test_a_huge_log_sum_exp_runs_the_backend_auto_plans(monkeypatch):
    """Scores near 300: the fused CPU kernel's rounded log-sum-exp would reach the gradients, so
    the short route runs the backend ``auto`` plans for the graph, as the general path does."""
    layer = _layer(torch.float32, bias=False)
    with torch.no_grad():
        layer.in_proj_weight.mul_(12.0)
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(2)).add_(3.0).requires_grad_()
    edge_index = causal(24)
    with torch.no_grad():
        _, lse = attend_reference(*layer.project(x, x, x), edge_index, scale=0.5, return_lse=True)
    assert float(lse.abs().max()) > 128
    ran = []
    dense = kernels.attend_dense

    def watched(*args, **kwargs):
        from gnn_transformer.kernels import dispatch

        real = dispatch._attend

        def inner(*a, **k):
            ran.append(k["backend"])
            return real(*a, **k)

        monkeypatch.setattr(dispatch, "_attend", inner)
        try:
            return dense(*args, **kwargs)
        finally:
            monkeypatch.setattr(dispatch, "_attend", real)

    monkeypatch.setattr(kernels, "attend_dense", watched)
    out = layer(x, edge_index)
    assert ran == [choose_backend(edge_index, "cpu")]
    general = layer(x, edge_index, backend="auto")
    assert torch.equal(out, general)
    for got, want in zip(_grads(layer, x, out), _grads(layer, x, general)):
        assert torch.equal(got, want)


BAD = {
    "width": (lambda layer: layer(torch.randn(8, 15, dtype=torch.float64), causal(8)), "shape [N, 16]"),
    "dtype": (lambda layer: layer(torch.randn(8, 16), causal(8)), "dtype of the layer's weights"),
    "out-of-range": (lambda layer: layer(torch.randn(4, 16, dtype=torch.float64), causal(8)), "edge_index"),
    "pos-shape": (
        lambda layer: layer(torch.randn(8, 16, dtype=torch.float64), causal(8), pos=torch.arange(5)),
        "one position per node",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gets_the_general_paths_error(name):
    call, match = BAD[name]
    short, general = _layer(rope=True), _layer(rope=True)
    with pytest.raises((ValueError, TypeError), match=re.escape(match)) as got:
        call(short)
    general.attend = general.attend  # an instance attribute: every call takes the general path
    with pytest.raises(type(got.value)) as want:
        call(general)
    assert str(got.value) == str(want.value)
