"""The benchmark on per-head and per-layer specs: rows for every side, each computing the dense
reference's output; FlexAttention's per-head mask_mods (reading ``h``) and SDPA's ``[1, H, N, N]``
mask are the graph; per-layer rows plus a total over the layers."""

from __future__ import annotations

import pytest
import torch

from gnn_transformer import cli
from gnn_transformer.bench import baselines
from gnn_transformer.bench.baselines import Unavailable, bhnd, head_rules, make_sdpa, nhd
from gnn_transformer.bench.benchmark import build_graph, run_benchmark
from gnn_transformer.topology import flex_attention_available, to_dense_mask

from .conftest import TOL, dense_attention

DUO = "duo_attention:streaming_heads=1;3,num_heads=4,num_sinks=2,window=5"
DILATED = "dilated_per_head:window=3,dilations=1;2;3;4,causal=true"
PER_HEAD_SPECS = [DUO, DILATED, "dilated_per_head:window=2,dilations=1;3", "longformer_dilated", "duo_attention"]


def _per_head_graph(spec: str, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(edge_index, edge_head, src, dst)`` of a per-head spec."""
    edge_index, edge_head = build_graph(spec, n)
    plain = edge_index.as_tensor()
    return edge_index, edge_head, plain[0], plain[1]


@pytest.mark.parametrize("spec", PER_HEAD_SPECS)
def test_head_rules_predicate_is_the_graph(spec):
    """The per-head ``mask_mod`` (each head's rule looked up by ``h``), at every (h, q, kv), is the
    graph's dense per-head mask."""
    n = 300
    edge_index, edge_head, src, dst = _per_head_graph(spec, n)
    heads = int(edge_head.max()) + 1
    assert len(head_rules(spec, n)) == heads
    mask_mod = baselines._head_predicate(spec, n, heads, "cpu")
    want = to_dense_mask(edge_index, n, n, edge_head=edge_head, num_heads=heads)  # [H, N, N]
    q, kv = torch.arange(n).view(1, n, 1), torch.arange(n).view(1, 1, n)
    got = mask_mod(torch.zeros((), dtype=torch.long), torch.arange(heads).view(heads, 1, 1), q, kv)
    assert torch.equal(got.expand(heads, n, n), want)


@pytest.mark.parametrize("spec", [DUO, DILATED])
def test_lookup_and_block_table_per_head_are_the_graph(spec):
    n = 256
    edge_index, edge_head, src, dst = _per_head_graph(spec, n)
    heads = int(edge_head.max()) + 1
    want = to_dense_mask(edge_index, n, n, edge_head=edge_head, num_heads=heads)
    q, kv = torch.arange(n).view(1, n, 1), torch.arange(n).view(1, 1, n)
    h, b = torch.arange(heads).view(heads, 1, 1), torch.zeros((), dtype=torch.long)
    lookup = baselines._lookup(src, dst, n, 1e12, edge_head, heads)
    assert torch.equal(lookup(b, h, q, kv), want)
    with pytest.raises(Unavailable, match="the dense lookup needs"):
        baselines._lookup(src, dst, n, heads * n * n - 1, edge_head, heads)
    with pytest.raises(Unavailable, match="not made of whole blocks"):  # windows: no block is whole
        baselines._block_table(src, dst, n, edge_head, heads)


def test_block_table_per_head():
    """Heads of whole blocks (a block-diagonal head and a full one): ``table[h, q // B, kv // B]``."""
    from gnn_transformer.topology import document, full, per_head

    n = 64
    edge_index, edge_head = per_head([document(n, 16), full(n)])
    plain = edge_index.as_tensor()
    table = baselines._block_table(plain[0], plain[1], n, edge_head, 2)
    want = to_dense_mask(edge_index, n, n, edge_head=edge_head, num_heads=2)
    got = table(
        torch.zeros((), dtype=torch.long),
        torch.arange(2).view(2, 1, 1),
        torch.arange(n).view(1, n, 1),
        torch.arange(n).view(1, 1, n),
    )
    assert torch.equal(got, want)


def test_head_rules_of_other_heads_say_why():
    with pytest.raises(Unavailable, match="no vectorized per-head predicate for 'random' heads"):
        head_rules("random", 64)
    part = {
        "builder": "per_head",
        "heads": [
            {"builder": "causal", "params": {}, "repeat": 1},
            {"builder": "random", "params": {"k": 2}, "repeat": 1},
        ],
    }
    with pytest.raises(Unavailable, match="no vectorized per-head predicate for 'random' heads"):
        baselines._part_rules(part, 64)


def test_bitmap_is_unavailable_per_head():
    pytest.importorskip("torch.nn.attention.flex_attention")
    edge_index, edge_head, src, dst = _per_head_graph(DUO, 128)
    with pytest.raises(Unavailable, match="one block structure for every head"):
        baselines.flex_block_mask("bitmap", DUO, edge_index, src, dst, 128, "cpu", 128, 1e12, edge_head, 4)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_sdpa_per_head_mask_matches_dense(kv_heads):
    n = 40
    edge_index, edge_head, src, dst = _per_head_graph(DUO, n)
    fn = make_sdpa(edge_index, src, dst, n, 0.3, "mask", (0, n), edge_head=edge_head, num_heads=4)
    assert fn.layout == "bhnd" and fn.note == "dense bool mask [1, H, N, N]"
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, 8, generator=gen) for h in (4, kv_heads, kv_heads))
    out = nhd(fn(bhnd(q), bhnd(k), bhnd(v)))
    ref = dense_attention(q, k, v, edge_index, 0.3, edge_head=edge_head)
    torch.testing.assert_close(out, ref.float(), **TOL[torch.float32])


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_per_head_rows_compute_the_dense_reference(kv_heads):
    """Every project backend and SDPA on a per-head spec: a row per pass, each output and gradient
    within float32 tolerance of the dense per-head reference."""
    backends = ["pyg", "fused", "tiled", "auto", "sdpa"]
    rows = run_benchmark([DUO], [96], backends, device="cpu", heads=4, kv_heads=kv_heads, head_dim=8, repeats=1)
    assert [(r["backend"], r["pass"]) for r in rows] == [(b, p) for b in backends for p in ("fwd", "fwd+bwd")]
    edge_index, edge_head = build_graph(DUO, 96)
    for row in rows:
        assert row["topology"] == DUO and row["edges"] == edge_index.size(1)
        assert row["ms"] is not None and row["max_err"] is not None and row["max_err"] < 1e-5, row
    assert rows[0]["density"] == pytest.approx(edge_index.size(1) / 4 / 96**2)
    assert next(r for r in rows if r["backend"] == "auto")["note"].startswith("ran ")
    assert next(r for r in rows if r["backend"] == "sdpa")["note"] == "dense bool mask [1, H, N, N]"


@pytest.mark.skipif(not flex_attention_available(), reason="FlexAttention needs torch >= 2.5")
def test_flex_per_head_row_names_variants():
    rows = run_benchmark([DUO], [128], ["flex"], device="cpu", heads=4, head_dim=8, repeats=1)
    fwd, bwd = rows
    assert fwd["ms"] is not None and fwd["max_err"] < 1e-5
    winner = fwd["note"].split(" fastest")[0]
    assert winner in ("predicate", "lookup")
    assert "predicate " in fwd["note"] and "lookup " in fwd["note"]  # both timed
    assert "bitmap: to_block_mask builds one block structure for every head" in fwd["note"]
    assert bwd["ms"] is None and "FlexAttention has no backward pass on cpu" in bwd["note"]


def test_wrong_heads_for_a_per_head_spec_is_refused():
    with pytest.raises(ValueError, match="'heads'.*4 heads.*heads=2"):
        run_benchmark([DUO], [32], ["fused"], device="cpu", heads=2, head_dim=8, repeats=1)


def test_per_layer_rows_and_their_total():
    """A per-layer spec: one row per distinct layer graph and pass, then a total over the layers of
    one cycle, each graph's time counted once per layer that uses it."""
    spec = "modernbert"  # full, then 2 windows (radius 64): two distinct graphs at n = 160
    rows = run_benchmark([spec], [160], ["fused", "sdpa"], device="cpu", heads=2, head_dim=8, repeats=1)
    labels = list(dict.fromkeys(r["topology"] for r in rows))
    assert labels == ["modernbert [layer 0]", "modernbert [layers 1-2]", "modernbert [total, 3 layers]"]
    by = {(r["topology"], r["backend"], r["pass"]): r for r in rows}
    for backend in ("fused", "sdpa"):
        for p in ("fwd", "fwd+bwd"):
            first, windows = by[(labels[0], backend, p)], by[(labels[1], backend, p)]
            total = by[(labels[2], backend, p)]
            assert first["max_err"] < 1e-5 and windows["max_err"] < 1e-5
            assert total["ms"] == pytest.approx(first["ms"] + 2 * windows["ms"])
            assert total["max_err"] == max(first["max_err"], windows["max_err"])
            assert total["edges"] == first["edges"] + 2 * windows["edges"]
            assert total["note"] == "sum over layers: 1 x layer 0 + 2 x layers 1-2"
    assert by[(labels[0], "sdpa", "fwd")]["note"] == "no mask"  # full attention
    assert by[(labels[1], "sdpa", "fwd")]["note"] == "dense bool mask"


def test_per_layer_spec_with_per_head_layers(tmp_path):
    """Layers of a per-layer spec may be per-head graphs: each is timed with its edge_head."""
    path = tmp_path / "mixed.toml"
    path.write_text(
        'name = "mixed"\ndescription = "a per-head layer, then a causal one"\nbuilder = "per_layer"\n\n'
        '[[layers]]\nbuilder = "dilated_per_head"\n'
        'params = { window = 2, dilations = [1, 2], causal = true }\n\n'
        '[[layers]]\nbuilder = "causal"\n'
    )
    rows = run_benchmark(
        [str(path)], [48], ["fused", "pyg"], device="cpu", heads=2, head_dim=8, repeats=1, backward=False
    )
    assert [r["topology"].rsplit(" [", 1)[1] for r in rows] == ["layer 0]"] * 2 + ["layer 1]"] * 2 + [
        "total, 2 layers]"
    ] * 2
    assert rows[-1]["note"] == "sum over layers: 1 x layer 0 + 1 x layer 1"
    assert all(r["max_err"] < 1e-5 for r in rows)


def test_cli_bench_per_head_and_per_layer(capsys):
    code = cli.main(
        [
            "bench",
            "--topologies",
            DILATED,
            "gemma3",
            "--sizes",
            "64",
            "--device",
            "cpu",
            "--repeats",
            "1",
            "--backends",
            "fused",
            "sdpa",
            "--no-backward",
            "--head-dim",
            "8",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "dense bool mask [1, H, N, N]" in out.out
    assert "gemma3 [total, 6 layers]" in out.out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--topologies", "duo_attention", "--heads", "4"], "builds per-head graphs for 8 heads (got --heads 4)"),
        (["--topologies", "duo_attention", "--kv-heads", "3"], "--kv-heads must divide the 8 heads"),
        (["--topologies", "gemma3", "--calibrate"], "--calibrate measures graphs for every head and layer"),
        (["--topologies", "causal+topk:num_keys=2"], "bench --selectors"),
    ],
)
def test_cli_bench_refuses(capsys, argv, message):
    assert cli.main(["bench", "--sizes", "64", "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err
