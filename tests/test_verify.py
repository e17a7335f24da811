"""The dense reference of the equivalence check follows the layer it checks."""

import pytest
import torch

from gnn_transformer import GraphMultiheadAttention
from gnn_transformer.experiments.verify import compare_layer, dense_reference
from gnn_transformer.topology import causal

from .conftest import TOL, perturbed

LENGTHS = [5, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("scale,softcap", [(0.9, None), (None, 1.5), (0.9, 1.5)])
def test_dense_reference_uses_the_layer_scale_and_softcap(scale, softcap, rope, dtype):
    layer = perturbed(
        GraphMultiheadAttention(16, 4, scale=scale, softcap=softcap, rope=rope, dtype=dtype, backend="pyg")
    )
    x = torch.randn(sum(LENGTHS), 16, dtype=dtype)
    pos = torch.cat([torch.arange(n) for n in LENGTHS])
    edge_index = causal(LENGTHS)
    out = layer(x, edge_index, pos=pos) if rope else layer(x, edge_index)
    ref = dense_reference(layer, x, edge_index, LENGTHS, pos=pos if rope else None)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_compare_layer_with_scale_and_softcap_agrees():
    layer = perturbed(GraphMultiheadAttention(16, 4, scale=0.9, softcap=1.5, dtype=torch.float64, backend="pyg"))
    out_err, grad_err = compare_layer(layer, torch.randn(8, 16, dtype=torch.float64), causal(LENGTHS), LENGTHS, "pyg")
    assert out_err <= 1e-10 and grad_err <= 1e-10
