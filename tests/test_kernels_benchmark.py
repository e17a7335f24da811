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


def test_run_benchmark_reports_a_failing_backend_and_goes_on(monkeypatch):
    """A backend whose call fails (out of memory, a launch the device refuses) gives rows that say
    so; the other backends still run."""
    from gnn_transformer.kernels import benchmark

    make = benchmark._make

    def failing_make(backend, *args):
        fn, build = make(backend, *args)
        if backend != "tiled":
            return fn, build

        def fail(q, k, v):
            raise RuntimeError("out of memory")
        return fail, build

    monkeypatch.setattr(benchmark, "_make", failing_make)
    rows = run_benchmark(["window"], [64], ["tiled", "fused"], device="cpu", heads=2, head_dim=8, repeats=1)
    tiled = [r for r in rows if r["backend"] == "tiled"]
    assert [r["pass"] for r in tiled] == ["fwd", "fwd+bwd"]
    assert all(r["ms"] is None and r["note"] == "failed: RuntimeError: out of memory" for r in tiled)
    assert all(r["ms"] is not None for r in rows if r["backend"] == "fused")
