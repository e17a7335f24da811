"""The selection benchmark: its rows agree with the library on the same selection, and its block
table (what a FlexAttention user builds for MoBA) is the selection of ``topology.dynamic.block_topk``."""

from __future__ import annotations

import pytest
import torch

from gnn_transformer.bench.selection import COLUMNS, _block_table, format_markdown, run_selection_benchmark
from gnn_transformer.topology import dynamic


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("n", [512, 1024])
def test_block_table_is_the_block_topk_selection(kv_heads, n):
    block, num_blocks, heads = 64, 3, 2
    q, k = torch.randn(n, heads, 16), torch.randn(n, kv_heads, 16)
    counts, indices = _block_table(q, k, block, num_blocks)
    edge_index, edge_head = dynamic.block_topk(q, k, block, num_blocks, causal=True)
    got = set()
    for h in range(heads):
        for qb in range(n // block):
            for kb in indices[0, h, qb, : counts[0, h, qb]].tolist():
                got |= {
                    (h, i, j)
                    for i in range(qb * block, (qb + 1) * block)
                    for j in range(kb * block, (kb + 1) * block)
                    if j <= i
                }
    assert got == set(zip(edge_head.tolist(), edge_index[1].tolist(), edge_index[0].tolist()))
    assert indices.shape == (1, heads, n // block, n // block)  # one column per key block, as Flex reads it


def test_block_table_builds_flex_block_mask():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    n, heads = 1024, 2
    q, k = torch.randn(n, heads, 16), torch.randn(n, heads, 16)
    counts, indices = _block_table(q, k, 64, 3)
    mask = flex.BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=64, seq_lengths=(n, n))
    blocks = mask.to_dense()[0]  # [H, Q, K] block bitmap
    edge_index, edge_head = dynamic.block_topk(q, k, 64, 3, causal=True)
    want = torch.zeros(heads, n // 64, n // 64, dtype=torch.bool)
    want[edge_head, edge_index[1] // 64, edge_index[0] // 64] = True
    assert torch.equal(blocks.bool(), want)


def test_rows_agree_with_the_library():
    rows = run_selection_benchmark(["topk", "block_topk"], [128], heads=2, head_dim=16, repeats=1, baselines=("sdpa",))
    assert [(r["selector"], r["row"], r["pass"]) for r in rows] == [
        (s, row, p)
        for s in ("topk", "block_topk")
        for row, p in (("select", "fwd"), ("auto", "fwd"), ("auto", "fwd+bwd"), ("sdpa", "fwd"))
    ]
    for r in rows:
        assert set(r) == set(COLUMNS) and r["ms"] > 0
        if r["max_err"] is not None:
            assert r["max_err"] < 1e-5
    assert format_markdown(rows).count("\n") == len(rows) + 1


def test_block_table_with_grouped_key_heads():
    """4 query heads on 2 key/value heads: query heads 0, 1 read key head 0 and 2, 3 key head 1."""
    n, block, num_blocks, heads, kv_heads = 512, 64, 3, 4, 2
    torch.manual_seed(0)
    q, k = torch.randn(n, heads, 16), torch.randn(n, kv_heads, 16)
    counts, indices = _block_table(q, k, block, num_blocks)
    edge_index, edge_head = dynamic.block_topk(q, k, block, num_blocks, causal=True)
    want = torch.zeros(heads, n // block, n // block, dtype=torch.bool)
    want[edge_head, edge_index[1] // block, edge_index[0] // block] = True
    got = torch.zeros_like(want)
    for h in range(heads):
        for qb in range(n // block):
            got[h, qb, indices[0, h, qb, : counts[0, h, qb]].long()] = True
    assert torch.equal(got, want)


def test_a_row_that_computes_the_wrong_attention_has_a_large_max_err(monkeypatch):
    from gnn_transformer.bench import selection

    monkeypatch.setattr(selection, "_dense_mask", lambda ei, eh, heads, n: torch.ones(heads, n, n, dtype=torch.bool))
    rows = run_selection_benchmark(
        ["topk"], [128], heads=2, head_dim=16, repeats=1, backward=False, baselines=("sdpa",)
    )
    by_row = {r["row"]: r for r in rows}
    assert by_row["auto"]["max_err"] < 1e-5
    assert by_row["sdpa"]["max_err"] > 1e-3  # full attention instead of the top-64 selection


def test_against_baselines_compares_every_baseline_with_auto_forward():
    from gnn_transformer.bench.selection import AGAINST_COLUMNS, against_baselines

    def row(label, pas, ms, note=""):
        return dict(selector="block_topk", n=4096, edges=9, row=label, **{"pass": pas}, ms=ms, max_err=None, note=note)

    rows = [
        row("select", "fwd", 4.0),  # not a baseline: its time is inside every other row
        row("auto", "fwd", 80.0),
        row("auto", "fwd+bwd", 240.0),  # the baselines have no backward row here
        row("sdpa", "fwd", 1600.0, "select + dense bool mask [1, H, N, N]"),
        row("flex", "fwd", 1200.0, "select + dense lookup + compiled create_block_mask per call"),
        row("flex", "fwd", 64.0, "own block table (from_kv_blocks) per call"),
    ]
    sdpa, lookup, table = against_baselines(rows)
    assert sdpa["baseline"] == "SDPA (select + dense bool mask [1, H, N, N])"
    assert sdpa["baseline_over_auto"] == pytest.approx(20.0) and lookup["baseline_over_auto"] == pytest.approx(15.0)
    assert table["baseline_over_auto"] == pytest.approx(0.8) and table["auto_ms"] == 80.0
    assert [r["fastest"] for r in (sdpa, lookup, table)] == ["", "", "yes"]
    md = format_markdown([sdpa, lookup, table], AGAINST_COLUMNS)
    assert "| block_topk | 4096 | Flex (own block table (from_kv_blocks) per call) | 64.0 | 80.0 | 0.80× | yes |" in md
    assert against_baselines(rows[:3]) == []  # no baseline ran


def test_cli_selection_writes_both_tables(tmp_path, capsys):
    from gnn_transformer import cli

    md = tmp_path / "select.md"
    argv = ["bench", "--selectors", "topk", "--sizes", "64", "--heads", "2", "--head-dim", "8", "--repeats", "1"]
    assert cli.main([*argv, "--backends", "auto", "sdpa", "--device", "cpu", "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "`auto` against each baseline of this run" in capsys.readouterr().out
    rows, against = text.split("`auto` against each baseline of this run")
    assert rows.count("| topk | 64 |") == 4  # select, auto fwd, auto fwd+bwd, sdpa
    assert against.count("| topk | 64 | SDPA (select + dense bool mask") == 1
