"""Autocast on the CPU (bfloat16, float16): every backend and implementation casts query, key and
value as autocast casts them for ``scaled_dot_product_attention``, computes in float32, and its
forward and backward passes equal float32 attention on the rounded inputs, rounded once more.

Tolerance: a half-precision result is the float32 result rounded once (bfloat16 keeps 8 bits: a
relative step of 2^-8 = 3.9e-3; float16 keeps 11). ``atol = rtol = 1e-2`` (STYLE: bf16 ~1e-2)
covers one rounding of values of order 1 and the float32 sums behind them."""

from __future__ import annotations

import os

import pytest
import torch

from gnn_transformer import GraphLM, GraphTransformerConfig
from gnn_transformer.kernels import attend, auto_kernel
from gnn_transformer.topology import causal, random

HALF = dict(atol=1e-2, rtol=1e-2)
BACKENDS = [("auto", {}), ("fused", {}), ("tiled", {"block_size": 16}), ("split", {"block_size": 16, "tile_cost": 0.3})]
IMPLS = [None] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
GRAPHS = {"causal": lambda: causal(40), "random": lambda: random(40, 6, seed=1)}


def _inputs(seed=0, n=40, heads=2, kv_heads=1, dim=16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, heads, dim, generator=gen, requires_grad=True)
    k, v = (torch.randn(n, kv_heads, dim, generator=gen, requires_grad=True) for _ in range(2))
    return q, k, v, torch.randn(n, heads, dim, generator=gen)


# the Triton interpreter is slow: bfloat16 only there
CASES = [
    (dtype, impl)
    for impl in IMPLS
    for dtype in (torch.bfloat16, torch.float16)
    if impl is None or dtype == torch.bfloat16
]


@pytest.mark.parametrize("dtype,impl", CASES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("graph", list(GRAPHS))
@pytest.mark.parametrize("backend,kw", BACKENDS, ids=[b for b, _ in BACKENDS])
def test_attend_under_autocast_is_attend_on_cast_inputs(backend, kw, graph, dtype, impl):
    """Forward and backward inside an autocast region equal the same call on inputs cast by hand."""
    edge_index = GRAPHS[graph]()
    q, k, v, w = _inputs()
    with torch.autocast("cpu", dtype=dtype):
        out = attend(q, k, v, edge_index, scale=0.25, backend=backend, impl=impl, **kw)
        grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v))  # backward inside the region too
    assert out.dtype == dtype and all(g.dtype == torch.float32 for g in grads)
    cast = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    want = attend(*cast, edge_index, scale=0.25, backend=backend, impl=impl, **kw)
    want_grads = torch.autograd.grad((want.float() * w).sum(), cast)
    torch.testing.assert_close(out, want, atol=0.0, rtol=0.0)
    for g, r in zip(grads, want_grads):
        torch.testing.assert_close(g, r.float(), atol=0.0, rtol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("graph", list(GRAPHS))
@pytest.mark.parametrize("backend,kw", BACKENDS, ids=[b for b, _ in BACKENDS])
def test_attend_under_autocast_matches_float32(backend, kw, graph, dtype):
    """The PyTorch kernels compute half precision in float32: the result and the gradients are the
    float32 ones on the rounded inputs, rounded once."""
    edge_index = GRAPHS[graph]()
    q, k, v, w = _inputs()
    with torch.autocast("cpu", dtype=dtype):
        out = attend(q, k, v, edge_index, scale=0.25, backend=backend, impl="torch", **kw)
        grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    rounded = [x.detach().to(dtype).float().requires_grad_() for x in (q, k, v)]
    ref = attend(*rounded, edge_index, scale=0.25, backend=backend, impl="torch", **kw)
    ref_grads = torch.autograd.grad((ref * w).sum(), rounded)
    torch.testing.assert_close(out.float(), ref, **HALF)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **HALF)


@pytest.mark.parametrize("backend,kw", BACKENDS, ids=[b for b, _ in BACKENDS])
def test_autocast_with_edge_bias_and_lse(backend, kw):
    """A float32 edge bias beside autocast's bfloat16 heads; the log-sum-exp stays float32."""
    edge_index = random(40, 6, seed=2)
    q, k, v, w = _inputs(seed=1)
    bias = torch.randn(edge_index.size(1), 2, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = attend(
            q, k, v, edge_index, scale=0.25, edge_bias=bias, backend=backend, return_lse=True, impl="torch", **kw
        )
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    grads = torch.autograd.grad((out.float() * w).sum() + lse.sum(), (q, k, v, bias))
    rounded = [x.detach().to(torch.bfloat16).float().requires_grad_() for x in (q, k, v)] + [
        bias.detach().requires_grad_()
    ]
    ref, ref_lse = attend(
        *rounded[:3], edge_index, scale=0.25, edge_bias=rounded[3], backend=backend, return_lse=True, impl="torch", **kw
    )
    ref_grads = torch.autograd.grad((ref * w).sum() + ref_lse.sum(), rounded)
    torch.testing.assert_close(out.float(), ref, **HALF)
    torch.testing.assert_close(lse, ref_lse, **HALF)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **HALF)


def test_float64_inputs_are_not_cast():
    q, k, v, _ = _inputs()
    q, k, v = (x.detach().double() for x in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, causal(40), scale=0.25)
    assert out.dtype == torch.float64


def test_auto_runs_sdpa_under_autocast():
    """The causal graph of these tests is one ``auto`` runs through SDPA (the case that crashed
    ``auto`` before: sparse products under autocast have no bfloat16 kernel)."""
    assert auto_kernel(causal(40), "cpu") == "sdpa"
    assert auto_kernel(random(40, 6, seed=1), "cpu") != "sdpa"


@pytest.mark.parametrize("backend", ["auto", "fused", "tiled", "split"])
def test_graph_lm_training_step_under_bf16_autocast(backend):
    """One training step of a small GraphLM in bfloat16 autocast against float32: the loss and the
    gradients agree to bfloat16's rounding (each matmul rounds its inputs to 8 bits, a relative
    2^-9 each; through two layers the loss stays within 1e-2 relative and the gradient of every
    parameter within 5e-2 of its norm)."""
    torch.manual_seed(0)
    config = GraphTransformerConfig(
        vocab_size=65, d_model=32, nhead=4, num_layers=2, bias=False, max_positions=64, backend=backend
    )
    model = GraphLM(config)
    lengths = [24, 16]
    edge_index = causal(lengths)
    tokens = torch.randint(0, 65, (sum(lengths),))
    targets = torch.randint(0, 65, (sum(lengths),))
    pos = torch.cat([torch.arange(n) for n in lengths])

    def step(autocast: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(tokens, edge_index, pos=pos)
            loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss32, grads32 = step(False)
    loss16, grads16 = step(True)
    torch.testing.assert_close(loss16, loss32, atol=0.0, rtol=1e-2)
    for name, g in grads32.items():
        err = float((grads16[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert err < 5e-2, (name, err)
