"""The PyTorch ``tiled`` forward on the CPU: PyTorch's fused kernel on the tokens' own layout, the
matmul path for the chunks whose log-sum-exp it cannot keep, and both in one call."""

from __future__ import annotations

import pytest
import torch

from gnn_transformer import kernels, topology
from gnn_transformer.kernels import tiled_torch

from .conftest import dense_attention


def _inputs(n_dst, n_src, heads, kv_heads, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_dst, heads, dim, generator=g, dtype=torch.float64)
    k = torch.randn(n_src, kv_heads, dim, generator=g, dtype=torch.float64)
    v = torch.randn(n_src, kv_heads, dim, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _check(q, k, v, ei, atol, **kw):
    scale = q.size(-1) ** -0.5
    out, lse = kernels.attend(q, k, v, ei, scale=scale, backend="tiled", impl="torch", return_lse=True, **kw)
    want, want_lse = dense_attention(q, k, v, ei, scale, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    assert torch.allclose(out.double(), want, atol=atol, rtol=0)
    has = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), has)
    assert torch.allclose(lse.double()[has], want_lse[has], atol=atol, rtol=0)


@pytest.mark.parametrize(
    "n,block,graph",
    [
        (256, 32, "window"),  # no padding: every input read in place
        (250, 32, "window"),  # a partial last block: padded copies
        (200, 16, "causal_window"),  # query blocks with fewer tiles at the start
        (120, 16, "random"),  # gathered key blocks (no run of consecutive blocks)
        (96, 16, "holes"),  # query blocks without a tile: their rows stay empty
    ],
)
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_fused_cpu_forward_matches_the_dense_reference(n, block, graph, kv_heads):
    ei = {
        "window": lambda: topology.sliding_window(n, 20),
        "causal_window": lambda: topology.sliding_window(n, 20, causal=True),
        "random": lambda: topology.random(n, 5, seed=3),
        "holes": lambda: topology.sliding_window(n, 3)[:, topology.sliding_window(n, 3)[1] >= 40],
    }[graph]()
    q, k, v = _inputs(n, n, 4, kv_heads, 16)
    _check(q, k, v, ei, 1e-5, block_size=block, max_cells=4 * 16 * 16 * 8)


def test_bfloat16_inputs_run_in_float32_and_return_bfloat16():
    q, k, v = _inputs(130, 130, 2, 2, 8, dtype=torch.bfloat16)
    _check(q, k, v, topology.sliding_window(130, 9), 1e-2, block_size=16)


def test_chunks_past_the_fused_kernels_range_take_the_matmul_path(monkeypatch):
    """Rows with a log-sum-exp of about 1e3 in some chunks, ordinary rows in others: each chunk runs
    where it is exact, and together they equal the reference (outputs, log-sum-exp, gradients)."""
    n, block = 128, 16
    ei = topology.sliding_window(n, 8)
    q, k, v = _inputs(n, n, 2, 2, 8, dtype=torch.float64)
    q[: n // 2] *= 300.0  # the first half's scores reach ~1e3: past FLASH_LSE_LIMIT
    q, k, v = (x.float().requires_grad_() for x in (q, k, v))
    seen = []
    real = tiled_torch._matmul_forward

    def spy(q_, k_, v_, tiles, tb, scale, chunks, dropout):
        seen.append(len(chunks))
        return real(q_, k_, v_, tiles, tb, scale, chunks, dropout)

    monkeypatch.setattr(tiled_torch, "_matmul_forward", spy)
    scale = 8**-0.5
    out, lse = kernels.attend(
        q,
        k,
        v,
        ei,
        scale=scale,
        backend="tiled",
        impl="torch",
        return_lse=True,
        block_size=block,
        max_cells=2 * 16 * 48,
    )
    num_chunks = len(tiled_torch._chunks(_tiles(ei, n, block), 2, 2 * 16 * 48))
    assert seen and 0 < seen[0] < num_chunks  # some chunks fell back, not all
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    want, want_lse = dense_attention(qd, kd, vd, ei, scale, return_lse=True)
    assert torch.allclose(out.double(), want, atol=1e-4, rtol=1e-5)
    assert torch.allclose(lse.double(), want_lse, atol=1e-3, rtol=1e-6)
    g = torch.randn(n, 2, 8, dtype=torch.float64)
    out.backward(g.float())
    want.backward(g)
    for got, ref in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert torch.allclose(got.double(), ref, atol=1e-3 * float(ref.abs().max()), rtol=0)


def _tiles(ei, n, block):
    from gnn_transformer.kernels.planner import prepare
    from gnn_transformer.kernels.planner import edge_parts

    return edge_parts(prepare(ei, n, n), block, None)[0]
