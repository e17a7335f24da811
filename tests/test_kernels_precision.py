"""Rows whose scores are all huge (every edge of a row masked with a finite bias of -1e9): the
log-sum-exp the backward passes, ``edge_weights`` and the merges reuse keeps what its rounding lost
(``lse_lo``, see ``kernels.primitives``), so gradients and weights equal the reference's uniform
softmax instead of reading every weight of the row as 1."""

from __future__ import annotations

import os

import pytest
import torch
from torch_geometric.utils import softmax

from gnn_transformer.kernels import attend, attend_reference, clear_cache, edge_weights, plan_costs

from .conftest import TOL

BACKENDS = [("fused", {}), ("tiled", {"block_size": 16}), ("split", {"block_size": 16, "tile_cost": 0.3})]
IMPLS = [None] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def _graph(n=40, seed=0):
    """A ring of three keys per query, random keys, and a dense 16 x 16 block (which split tiles);
    every edge once."""
    gen = torch.Generator().manual_seed(seed)
    i = torch.arange(n)
    ring = torch.stack(
        [torch.cat([i, (i + 1) % n, (i + 2) % n, torch.randint(0, n, (n,), generator=gen)]), i.repeat(4)]
    )
    block = torch.stack([torch.arange(16).repeat(16), torch.arange(16).repeat_interleave(16)])
    return torch.unique(torch.cat([ring, block], 1), dim=1)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,kw", BACKENDS, ids=[b for b, _ in BACKENDS])
@pytest.mark.parametrize("bias_grad", [True, False], ids=["bias-grad", "constant-bias"])
def test_rows_masked_with_a_huge_finite_bias(backend, kw, dtype, impl, bias_grad):
    edge_index = _graph()
    n, heads = 40, 2
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(n, heads, 4, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(n, 1, 4, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(n, 1, 4, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    bias = torch.randn(edge_index.size(1), heads, generator=gen, dtype=torch.float64).to(dtype)
    masked = (edge_index[1] == 3) | (edge_index[1] == 5) | (edge_index[1] == 20)  # rows 3 and 5 in the block
    bias[masked] = -1e9
    bias.requires_grad_(bias_grad)
    clear_cache()
    out, lse = attend(q, k, v, edge_index, scale=0.5, edge_bias=bias, backend=backend, return_lse=True, impl=impl, **kw)
    ref, ref_lse = attend_reference(q, k, v, edge_index, scale=0.5, edge_bias=bias, return_lse=True)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    inputs = [x for x in (q, k, v, bias) if x.requires_grad]
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad((out * w).sum(), inputs)
    want = torch.autograd.grad((ref * w).sum(), inputs)
    for x, y in zip(got, want):  # before: the masked rows' weights read as 1 each (3x too large here)
        torch.testing.assert_close(x, y, **TOL[dtype])
    weights = edge_weights(q, k, edge_index, lse, scale=0.5, edge_bias=bias)
    scores = (q[edge_index[1]] * k[edge_index[0]].expand(-1, heads, -1)).sum(-1) * 0.5 + bias
    torch.testing.assert_close(weights, softmax(scores, edge_index[1], num_nodes=n), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_merges_huge_log_sum_exps_exactly(dtype):
    """A row with one edge in a dense tile and one fused, both at scores near -1e9: the merge of
    the two parts keeps each part's log(count) (the merge is the same Python code after the Triton
    kernels)."""
    q = torch.ones(2, 1, 1, dtype=dtype)
    k = -torch.ones(4, 1, 1, dtype=dtype)
    v = torch.tensor([0.0, 0.0, 5.0, 1.0], dtype=dtype).view(4, 1, 1)
    edge_index = torch.tensor([[0, 1, 0, 1, 3], [0, 0, 1, 1, 0]])  # a full 2 x 2 tile plus 3 -> 0
    costs = plan_costs(edge_index, "cpu", block_size=2, tile_cost=0.5)
    assert costs["dense_tiles"] == 1 and costs["dense_edges"] == 4  # both parts non-empty
    out = attend(q, k, v, edge_index, scale=1e9, backend="split", block_size=2, tile_cost=0.5)
    ref = attend_reference(q, k, v, edge_index, scale=1e9)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(out[0, 0, 0], torch.tensor(1 / 3, dtype=dtype), **TOL[dtype])


@pytest.mark.parametrize("impl", IMPLS, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,kw", BACKENDS, ids=[b for b, _ in BACKENDS])
def test_repeated_edges_at_huge_scores(backend, kw, dtype, impl):
    """An edge given twice is two messages at any score: with every score at -1e9, row 0 averages
    keys 0..15 and key 1 again, 121/17 (tiles once folded the multiplicity into the bias as log 2,
    which rounding loses at such scores: 120/16)."""
    q = torch.ones(16, 1, 1, dtype=dtype)
    k = -torch.ones(16, 1, 1, dtype=dtype, requires_grad=True)
    v = torch.arange(16, dtype=dtype).view(16, 1, 1).requires_grad_()
    full = torch.stack([torch.arange(16).repeat(16), torch.arange(16).repeat_interleave(16)])  # a full tile
    edge_index = torch.cat([full, torch.tensor([[1], [0]])], 1)  # and 1 -> 0 once more
    clear_cache()
    out = attend(q, k, v, edge_index, scale=1e9, backend=backend, impl=impl, **kw)
    ref = attend_reference(q, k, v, edge_index, scale=1e9)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor(121 / 17, dtype=dtype), **TOL[dtype])
    torch.testing.assert_close(out, ref, **TOL[dtype])
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    for x, y in zip(torch.autograd.grad((out * w).sum(), (k, v)), torch.autograd.grad((ref * w).sum(), (k, v))):
        torch.testing.assert_close(x, y, **TOL[dtype])


def test_removed_edges_beside_hugging_face_masks():
    """A row whose edges carry ``finfo.min`` (the Hugging Face masking value) beside a ``-inf`` one:
    the ``-inf`` edge is removed and weighs 0, the others share the row, in the reference, on the
    layer's per-edge path and on the kernels (the reference gave the removed edge a third)."""
    from gnn_transformer import GraphMultiheadAttention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    edge_index = torch.tensor([[0, 1, 2, 0, 1], [0, 0, 0, 1, 1]])
    low = torch.finfo(torch.float64).min
    bias = torch.tensor([[low], [low], [float("-inf")], [float("-inf")], [float("-inf")]], dtype=torch.float64)
    ref = attend_reference(q, k, v, edge_index, scale=0.5, edge_bias=bias)
    torch.testing.assert_close(ref[0], (v[0] + v[1]) / 2, **TOL[torch.float64])  # uniform over the two
    assert (ref[1] == 0).all()  # every edge removed: empty
    for backend, kw in BACKENDS:
        out = attend(q, k, v, edge_index, scale=0.5, edge_bias=bias, backend=backend, **kw)
        torch.testing.assert_close(out, ref, **TOL[torch.float64])
        got = torch.autograd.grad(out.square().sum(), (q, k, v))
        want = torch.autograd.grad(ref.square().sum(), (q, k, v), retain_graph=True)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, **TOL[torch.float64])
    layer = GraphMultiheadAttention(4, 1, dtype=torch.float64).eval()
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    _, w = layer(x, edge_index, edge_bias=bias, backend="pyg", return_attention_weights=True)
    torch.testing.assert_close(
        w[:, 0], torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64), **TOL[torch.float64]
    )
