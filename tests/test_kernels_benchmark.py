"""The benchmark runs end to end on a tiny CPU problem and reports sensible rows."""
from __future__ import annotations

from gnn_transformer.kernels.benchmark import format_markdown, format_table, run_benchmark


def test_run_benchmark_tiny():
    rows = run_benchmark(["window", "random"], [96], ["pyg", "fused", "tiled", "auto", "sdpa"],
                         device="cpu", heads=2, head_dim=8, repeats=1)
    assert len(rows) == 2 * 5 * 2  # topologies x backends x (fwd, fwd+bwd)
    for row in rows:
        assert row["ms"] is not None and row["ms"] > 0, row
        assert row["max_err"] < 1e-5, row
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r["note"].startswith("chose ") for r in rows if r["backend"] == "auto")
    assert format_table(rows).count("\n") == len(rows)
    assert format_markdown(rows).startswith("| topology")


def test_run_benchmark_skips_what_does_not_fit():
    rows = run_benchmark(["causal"], [64], ["pyg", "sdpa", "fused"], device="cpu", heads=2, head_dim=8,
                         repeats=1, backward=False, memory_budget=1e3)
    by_backend = {r["backend"]: r for r in rows}
    assert by_backend["pyg"]["note"].startswith("skipped") and by_backend["sdpa"]["note"].startswith("skipped")
    assert by_backend["fused"]["ms"] is not None and by_backend["fused"]["max_err"] is None  # no dense reference
