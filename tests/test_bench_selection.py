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
