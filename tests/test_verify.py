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


def test_lengths_whose_dense_reference_cannot_fit_are_refused_before_building(monkeypatch):
    """verify_topologies estimates the dense reference's [B, H, T, T] scores before it builds any
    graph: lengths that cannot fit raise a ValueError naming 'lengths', sizes and GiB."""
    from gnn_transformer.experiments import verify, tasks

    import dataclasses

    built, resolve = [], verify.resolve_topology
    monkeypatch.setattr(
        verify, "resolve_topology", lambda spec, **kw: dataclasses.replace(resolve(spec, **kw), build=built.append)
    )
    with pytest.raises(
        ValueError, match=r"^Expected 'lengths' whose dense reference fits in memory \(got \[100000\]\)"
    ):
        verify.verify_topologies(["causal"], [100000])
    assert built == []
    # the estimate: 5 float64 copies and a boolean mask per cell and head, against the budget
    monkeypatch.setattr(tasks, "host_memory_budget", lambda: 2 * 40 * 40 * 4 * (5 * 8 + 1))
    verify.check_dense_fits([40, 40], 4, torch.float64, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"4 heads of \[2, 41, 41\] float64 scores need about"):
        verify.check_dense_fits([41, 40], 4, torch.float64, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"2 layers of 4 heads"):
        verify.check_dense_fits([40, 40], 4, torch.float64, torch.device("cpu"), layers=2)
    verify.check_dense_fits([40, 40], 4, torch.float32, torch.device("cpu"), layers=1)


def test_cli_verify_refuses_lengths_that_cannot_fit(capsys):
    from gnn_transformer import cli

    assert cli.main(["verify", "causal", "--lengths", "100000"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("gnn-transformer: error: --lengths: Expected 'lengths' whose dense reference fits")
        and "GiB" in err
    )


def test_compare_layer_and_model_dense_error_see_a_wrong_output():
    """A graph path 1e-3 away from the dense reference (a forward hook shifts one output) is
    reported: by compare_layer, and by model_dense_error also when it is the model's last
    attention call; and a float32 check does not pass it (its tolerance is 1e-5)."""
    from gnn_transformer.experiments.models import EncoderConfig, SequenceModel
    from gnn_transformer.experiments.verify import VerifyRow, model_dense_error, verify_topologies

    def shift(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out = out + 1e-3
        return (out, *output[1:]) if isinstance(output, tuple) else out

    layer = perturbed(GraphMultiheadAttention(16, 4, dtype=torch.float64, backend="pyg"))
    handle = layer.register_forward_hook(shift)
    out_err, _ = compare_layer(layer, torch.randn(8, 16, dtype=torch.float64), causal(LENGTHS), LENGTHS, "pyg")
    handle.remove()
    assert out_err == pytest.approx(1e-3, rel=1e-3)

    model = SequenceModel(10, 4, EncoderConfig(d_model=16, nhead=2, num_layers=2, dim_feedforward=32, backend="pyg"))
    model.eval()
    attentions = [m for m in model.modules() if isinstance(m, GraphMultiheadAttention)]
    handle = attentions[-1].register_forward_hook(shift)
    tokens = torch.randint(0, 10, (sum(LENGTHS),))
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    try:
        err = model_dense_error(model, lambda: model(tokens, positions, causal(LENGTHS)), LENGTHS)
    finally:
        handle.remove()
    assert err > 5e-4

    row = verify_topologies(["causal"], lengths=[5], backends=["pyg"], dtype=torch.float32)[0]
    assert row.tolerance <= 1e-5
    assert not VerifyRow("x", "pyg", 5, 15, 1e-4, 0.0, row.tolerance).ok
