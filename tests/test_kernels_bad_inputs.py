"""Bad and extreme inputs at the kernels' boundary: each gives the right result or an error that
names the argument and the value."""

from __future__ import annotations

import pytest
import torch
from torch_geometric import EdgeIndex

from gnn_transformer import GraphMultiheadAttention, kernels, topology


def _false_col_order() -> EdgeIndex:
    """Targets 3, 1, 0 flagged as sorted by column (PyG trusts the flag)."""
    return EdgeIndex([[0, 1, 2], [3, 1, 0]], sparse_size=(5, 5), sort_order="col")


@pytest.mark.parametrize("backend", ["pyg", "fused", "tiled", "split", "auto"])
def test_a_false_sort_flag_is_refused_by_the_layer(backend):
    layer = GraphMultiheadAttention(8, 2)
    with pytest.raises(ValueError, match="'edge_index' flagged sort_order='col'.*ascending"):
        layer(torch.randn(5, 8), _false_col_order(), backend=backend)


@pytest.mark.parametrize("backend", ["fused", "tiled", "split", "auto"])
def test_a_false_sort_flag_is_refused_by_attend(backend):
    q = torch.randn(5, 2, 4)
    with pytest.raises(ValueError, match="'edge_index' flagged sort_order='col'.*ascending"):
        kernels.attend(q, q, q, _false_col_order(), scale=0.5, backend=backend)


def test_a_false_row_sort_flag_is_refused_by_the_layer():
    edge_index = EdgeIndex([[3, 1, 0], [0, 1, 2]], sparse_size=(5, 5), sort_order="row")
    with pytest.raises(ValueError, match="sort_order='row'.*row 0 in ascending order"):
        GraphMultiheadAttention(8, 2)(torch.randn(5, 8), edge_index)


@pytest.mark.parametrize("backend", ["pyg", "fused", "tiled", "split"])
def test_the_same_edges_unflagged_give_the_dense_result(backend):
    """Without the false flag the edges are sorted here, and every backend agrees with the
    per-edge reference."""
    edge_index = EdgeIndex([[0, 1, 2], [3, 1, 0]], sparse_size=(5, 5))
    layer = GraphMultiheadAttention(8, 2).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    want = layer(x, torch.tensor([[0, 1, 2], [3, 1, 0]]), backend="pyg")
    torch.testing.assert_close(layer(x, edge_index, backend=backend), want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("block_size", [64, 4096])
def test_a_tile_larger_than_the_sequence_is_cut_to_it(block_size):
    """A tile of 4096 on 5 tokens runs in tiles of 16 (the smallest the kernels take): exact,
    and nothing of 4096² cells is allocated."""
    q, k, v = (torch.randn(5, 2, 4, dtype=torch.float64) for _ in range(3))
    edge_index = topology.causal(5)
    out = kernels.attend(q, k, v, edge_index, scale=0.5, backend="tiled", block_size=block_size)
    want = kernels.attend_reference(q, k, v, edge_index, scale=0.5)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    costs = kernels.plan_costs(edge_index, "cpu", block_size=block_size)
    assert costs["tiles"] == 1


@pytest.mark.parametrize("block_size", [0, -1, 4097, 10**9, True, 2.0, "16"])
@pytest.mark.parametrize("entry", ["attend", "choose_backend", "plan_costs"])
def test_a_bad_block_size_is_refused(block_size, entry):
    q = torch.randn(5, 2, 4)
    edge_index = topology.causal(5)
    with pytest.raises(ValueError, match=r"'block_size' to be an int in \[1, 4096\] \(got " + repr(block_size)):
        if entry == "attend":
            kernels.attend(q, q, q, edge_index, scale=0.5, backend="tiled", block_size=block_size)
        else:
            getattr(kernels, entry)(edge_index, "cpu", block_size=block_size)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", 3.5, None])
@pytest.mark.parametrize("entry", ["choose_backend", "plan_costs"])
def test_a_bad_device_is_named(device, entry):
    with pytest.raises(ValueError, match=f"'device'.*got {device!r}"):
        getattr(kernels, entry)(topology.causal(5), device)


@pytest.mark.parametrize("num_dst", ["4", 4.0, True, 5, torch.tensor(4)])
def test_num_dst_other_than_the_query_rows_is_refused(num_dst):
    q = k = v = torch.randn(4, 1, 8)
    with pytest.raises(ValueError, match=r"Expected 'num_dst' to be the number of rows of 'query', 4 \(got"):
        kernels.attend(q, k, v, topology.causal(4), scale=0.5, num_dst=num_dst)


@pytest.mark.parametrize("return_lse", ["no", 1, None])
def test_return_lse_must_be_a_bool(return_lse):
    q = k = v = torch.randn(4, 1, 8)
    with pytest.raises(ValueError, match=r"Expected 'return_lse' to be a bool \(got"):
        kernels.attend(q, k, v, topology.causal(4), scale=0.5, return_lse=return_lse)


def test_flags_of_the_layer_are_checked_under_their_own_names():
    with pytest.raises(ValueError, match=r"Expected 'bias' to be a bool \(got 'yes'\)"):
        GraphMultiheadAttention(8, 2, bias="yes")
    with pytest.raises(ValueError, match=r"Expected 'out_bias' to be a bool \(got 1\)"):
        GraphMultiheadAttention(8, 2, out_bias=1)
    attn = GraphMultiheadAttention(8, 2)
    with pytest.raises(ValueError, match=r"Expected 'return_attention_weights' to be a bool \(got 'yes'\)"):
        attn(torch.randn(3, 8), topology.causal(3), return_attention_weights="yes")


def test_lengths_and_spec_flags_of_other_types_are_refused():
    with pytest.raises(ValueError, match=r"Expected 'n' to be a 1-D integer tensor of lengths"):
        topology.full(torch.tensor([True, True]))
    with pytest.raises(ValueError, match=r"Expected 'small' to be a bool \(got 'yes'\)"):
        topology.load("causal", 3, small="yes")
