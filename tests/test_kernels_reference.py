"""The per-edge reference (what every backend is compared with) against the dense one, and the
dense reference of the tests (tests/conftest.py) itself, by hand."""

from __future__ import annotations

import pytest
import torch

from gnn_transformer.kernels import attend_reference

from .conftest import GRAPHS, assert_matches_dense, dense_attention, graph_case


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("name", GRAPHS + ["band_far"])
def test_reference_matches_dense(name, bias, dtype):
    """The per-edge reference (what every backend is compared with) against the dense masked
    softmax: output, log-sum-exp and the gradients in q, k, v and the bias, float64 and float32."""
    edge_index, n_src, n_dst = graph_case(name)
    assert_matches_dense(
        lambda q, k, v, b: attend_reference(q, k, v, edge_index, scale=0.45, edge_bias=b, return_lse=True),
        edge_index,
        n_src,
        n_dst,
        dtype,
        bias=bias,
    )


def test_dense_reference_counts_parallel_edges_and_gives_lse():
    """The dense reference itself, by hand: target 0 hears source 0 twice (bias 0.5 and -1) and
    source 1 once; target 1 hears nobody (lse -inf, zero output)."""
    q = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    k = torch.tensor([[[2.0, 0.0]], [[0.0, 3.0]]], dtype=torch.float64)
    v = torch.tensor([[[1.0, 2.0]], [[-1.0, 4.0]]], dtype=torch.float64)
    edge_index = torch.tensor([[0, 1, 0], [0, 0, 0]])
    bias = torch.tensor([[0.5], [0.0], [-1.0]], dtype=torch.float64)
    out, lse = dense_attention(q, k, v, edge_index, 0.5, bias, return_lse=True)
    s = torch.tensor([1.0 + 0.5, 0.0, 1.0 - 1.0], dtype=torch.float64)  # scores of the three edges
    p = torch.softmax(s, 0)
    torch.testing.assert_close(out[0, 0], p[0] * v[0, 0] + p[1] * v[1, 0] + p[2] * v[0, 0])
    torch.testing.assert_close(lse[0, 0], torch.logsumexp(s, 0))
    assert torch.isneginf(lse[1, 0]) and (out[1] == 0).all()


def test_dense_reference_counts_copies_and_empty_rows():
    """The reference itself: a doubled edge weighs twice, an empty row is zeros and -inf."""
    q, k, v = (
        torch.randn(3, 2, 4, dtype=torch.float64),
        torch.randn(2, 1, 4, dtype=torch.float64),
        torch.randn(2, 1, 4, dtype=torch.float64),
    )
    src, dst = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 0, 2])  # 1 -> 0 twice; row 1 empty
    out, lse = dense_attention(q, k, v, torch.stack([src, dst]), 0.5, return_lse=True)
    s = torch.einsum("hd,jhd->hj", q[0], k.expand(2, 2, 4)) * 0.5  # [H, 2]
    s = s + torch.log(torch.tensor([1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(lse[0], torch.logsumexp(s, -1))
    torch.testing.assert_close(out[0], torch.einsum("hj,jd->hd", torch.softmax(s, -1), v[:, 0]))
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    torch.testing.assert_close(out[2], v[0].expand(2, 4))
