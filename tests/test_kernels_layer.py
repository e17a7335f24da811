"""``GraphMultiheadAttention(backend=...)`` equals ``backend="pyg"``: outputs, attention weights and
parameter gradients, with GQA, edge bias and cross-attention on a bipartite graph."""

from __future__ import annotations

import copy

import pytest
import torch

from gnn_transformer import GraphMultiheadAttention
from gnn_transformer.kernels import choose_backend
from gnn_transformer.topology import bigbird, causal, random, sliding_window

from .conftest import assert_splits, graph_case

BACKENDS = ["fused", "tiled", "auto"]


def _graphs():
    return {
        "causal": causal([9, 14]),
        "window": sliding_window(30, 4),
        "bigbird": bigbird(48, block=4, window=1, num_global=1, num_random=1),
        "random": random([20, 11], 5),
        "empty_rows": graph_case("empty_rows")[0],
        # in blocks of 64 (the layer's): a diagonal tile half full and two sparse ones, so split
        # tiles one and fuses the rest (auto picks split here)
        "long_causal": causal(72),
    }


CASES = [(name, backend) for name in _graphs() for backend in BACKENDS] + [("long_causal", "split")]


@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("name, backend", CASES, ids=[f"{n}-{b}" for n, b in CASES])
def test_layer_backend_matches_pyg(name, kv_heads, backend):
    edge_index = _graphs()[name]
    n = int(edge_index.max()) + 1 if edge_index.numel() else 1
    n = max(n, edge_index.sparse_size()[1] or 0) if hasattr(edge_index, "sparse_size") else n
    if name == "long_causal":  # split (and auto) on a graph where split has a tiled and a fused part
        assert_splits(edge_index, n, n)
        assert choose_backend(edge_index, "cpu", num_src=n, num_dst=n) == "split"  # what auto runs
    torch.manual_seed(0)
    ref = GraphMultiheadAttention(32, 4, num_kv_heads=kv_heads, backend="pyg").double()
    fast = copy.deepcopy(ref)
    fast.backend = backend
    x = torch.randn(n, 32, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(edge_index.size(1), 4, dtype=torch.float64, requires_grad=True)
    out_ref, w_ref = ref(x, edge_index, edge_bias=bias, return_attention_weights=True)
    out, w = fast(x, edge_index, edge_bias=bias, return_attention_weights=True)
    torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(w, w_ref, atol=1e-10, rtol=1e-10)
    g_ref = torch.autograd.grad(out_ref.square().sum(), [x, bias, *ref.parameters()])
    g = torch.autograd.grad(out.square().sum(), [x, bias, *fast.parameters()])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_cross_attention_float32(backend):
    edge_index, n_src, n_dst = graph_case("bipartite")
    torch.manual_seed(0)
    ref = GraphMultiheadAttention(16, 2, kdim=12, vdim=12, backend="pyg")
    fast = copy.deepcopy(ref)
    fast.backend = backend
    x_src, x_dst = torch.randn(n_src, 12), torch.randn(n_dst, 16)
    torch.testing.assert_close(fast((x_src, x_dst), edge_index), ref((x_src, x_dst), edge_index), atol=1e-5, rtol=1e-5)
