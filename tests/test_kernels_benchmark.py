"""The benchmark runs end to end on a tiny CPU problem and reports sensible rows."""

from __future__ import annotations

import math

import pytest
import torch

from gnn_transformer.bench.benchmark import format_markdown, format_table, run_benchmark


def test_run_benchmark_tiny():
    rows = run_benchmark(
        ["window", "random"],
        [96],
        ["pyg", "fused", "tiled", "auto", "sdpa"],
        device="cpu",
        heads=2,
        head_dim=8,
        repeats=1,
    )
    assert len(rows) == 2 * 5 * 2  # topologies x backends x (fwd, fwd+bwd)
    for row in rows:
        assert row["ms"] is not None and row["ms"] > 0, row
        assert row["max_err"] < 1e-5, row
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r["note"].startswith("ran ") for r in rows if r["backend"] == "auto")
    assert format_table(rows).count("\n") == len(rows)
    assert format_markdown(rows).startswith("| topology")


def test_run_benchmark_skips_what_does_not_fit():
    rows = run_benchmark(
        ["random"],
        [256],
        ["pyg", "sdpa", "fused"],
        device="cpu",
        heads=2,
        head_dim=8,
        repeats=1,
        backward=False,
        memory_budget=1e3,
    )
    by_backend = {r["backend"]: r for r in rows}
    assert by_backend["pyg"]["note"].startswith("skipped") and by_backend["sdpa"]["note"].startswith("skipped")
    assert by_backend["fused"]["ms"] is not None and by_backend["fused"]["max_err"] is None  # no dense reference


def test_run_benchmark_reports_a_failing_backend_and_goes_on(monkeypatch):
    """A backend whose call fails (out of memory, a launch the device refuses) gives rows that say
    so; the other backends still run."""
    from gnn_transformer.bench import benchmark

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


def test_calibrate_tile_cost_rows_add_up():
    from gnn_transformer.bench.benchmark import calibrate_tile_cost

    rows, suggested = calibrate_tile_cost(
        ["window", "random"], [96], device="cpu", heads=2, head_dim=8, block_size=16, repeats=1
    )
    assert [(r["topology"], r["pass"]) for r in rows] == [
        ("window", "fwd"),
        ("window", "fwd+bwd"),
        ("random", "fwd"),
        ("random", "fwd+bwd"),
    ]
    for r in rows:
        assert r["edges"] > 0 and r["tiles"] > 0
        assert abs(r["fill"] - r["edges"] / (r["tiles"] * 16 * 16)) < 1e-12
        assert abs(r["ns_per_edge"] - 1e6 * r["fused_ms"] / r["edges"]) < 1e-6
        assert abs(r["ratio"] - r["ns_per_cell"] / r["ns_per_edge"]) < 1e-9
    window = rows[0]
    assert window["edges"] == sum(min(i + 128, 95) - max(i - 128, 0) + 1 for i in range(96))  # |i-j| <= 128
    for p in ("fwd", "fwd+bwd"):
        ratios = sorted(r["ratio"] for r in rows if r["pass"] == p)
        assert suggested[p] == (ratios[0] + ratios[1]) / 2  # median of two


def test_calibrate_row_costs():
    from gnn_transformer.bench.benchmark import calibrate_row_costs

    rows = [dict(ns_per_edge=value, **{"pass": p}) for p in ("fwd", "fwd+bwd") for value in (1e3, 2e3, 9e9)]
    costs = calibrate_row_costs(
        rows, {"fwd": 0.25, "fwd+bwd": 0.3}, 64, device="cpu", heads=2, head_dim=8, block_size=16, repeats=1
    )
    assert set(costs) == {"fwd", "fwd+bwd"}
    for c in costs.values():
        assert set(c) == {"fused", "tiled", "merge"} and all(x >= 0 and math.isfinite(x) for x in c.values())
    # a slower unit edge makes every fixed cost smaller in edges
    slow = calibrate_row_costs(
        [dict(r, ns_per_edge=1e12) for r in rows],
        {"fwd": 0.25, "fwd+bwd": 0.3},
        64,
        device="cpu",
        heads=2,
        head_dim=8,
        block_size=16,
        repeats=1,
    )
    assert all(x == 0 for c in slow.values() for x in (c["fused"], c["tiled"]))
    assert all(c["merge"] < 1e-3 for c in slow.values())


def test_calibrate_dropout_cost():
    """Per pass, the median over the graphs of what dropout adds per edge / cell, in units of the
    pass's median fused edge: non-negative and finite; a far slower unit edge makes both near 0, and
    times without dropout far above the real ones read 0."""
    from gnn_transformer.bench.benchmark import calibrate_dropout_cost, calibrate_tile_cost

    kw = dict(device="cpu", heads=2, head_dim=8, block_size=16, repeats=1)
    rows, _ = calibrate_tile_cost(["window", "random"], [96], **kw)
    costs = calibrate_dropout_cost(rows, **kw)
    assert set(costs) == {"fwd", "fwd+bwd"}
    for c in costs.values():
        assert set(c) == {"fused", "tiled"} and all(x >= 0 and math.isfinite(x) for x in c.values())
    slow = calibrate_dropout_cost([dict(r, ns_per_edge=1e15) for r in rows], **kw)
    assert all(x < 1e-3 for c in slow.values() for x in c.values())
    late = calibrate_dropout_cost([dict(r, fused_ms=1e9, tiled_ms=1e9) for r in rows], **kw)
    assert all(x == 0 for c in late.values() for x in c.values())


def test_benchmark_takes_topology_specs(tmp_path):
    from gnn_transformer.bench.benchmark import build_graph
    from gnn_transformer.topology import dilated, to_dense_mask

    spec = tmp_path / "mine.toml"
    spec.write_text('builder = "dilated"\n[params]\nwindow = 3\ndilation = 2\ncausal = true\n')
    want = to_dense_mask(dilated(40, 3, 2, causal=True))
    for name in ("dilated:window=3,dilation=2,causal=true", str(spec)):
        assert torch.equal(to_dense_mask(build_graph(name, 40)), want)
    rows = run_benchmark(
        [str(spec), "exphormer"], [48], ["fused", "sdpa"], device="cpu", heads=2, head_dim=8, repeats=1, backward=False
    )
    assert [(r["topology"], r["backend"]) for r in rows] == [
        (str(spec), "fused"),
        (str(spec), "sdpa"),
        ("exphormer", "fused"),
        ("exphormer", "sdpa"),
    ]
    assert all(r["max_err"] < 1e-5 for r in rows)


def test_benchmark_grouped_query_heads():
    rows = run_benchmark(
        ["window"],
        [80],
        ["pyg", "fused", "tiled", "auto", "sdpa"],
        device="cpu",
        heads=4,
        kv_heads=2,
        head_dim=8,
        repeats=1,
    )
    assert len(rows) == 5 * 2
    for row in rows:
        assert row["ms"] is not None and row["max_err"] < 1e-5, row
    with pytest.raises(ValueError, match="'kv_heads' to divide heads=4 \\(got 3\\)"):
        run_benchmark(["window"], [80], ["fused"], device="cpu", heads=4, kv_heads=3)


def test_benchmark_block_size_reaches_the_tiles(monkeypatch):
    from gnn_transformer.bench import benchmark

    seen = []
    real = benchmark.attend
    monkeypatch.setattr(benchmark, "attend", lambda *a, **k: seen.append(k.get("block_size")) or real(*a, **k))
    rows = run_benchmark(
        ["window"], [64], ["tiled"], device="cpu", heads=2, head_dim=8, repeats=1, backward=False, block_size=16
    )
    assert rows[0]["ms"] is not None and seen and set(seen) == {16}


def test_auto_note_names_the_backend_for_the_block_size():
    """'ran X' is the plan for the --block-size the row ran with, not for the default block."""
    from gnn_transformer.kernels import choose_backend
    from gnn_transformer.bench.benchmark import build_graph

    rows = run_benchmark(
        ["longformer"], [512], ["auto"], device="cpu", heads=2, head_dim=8, repeats=1, backward=False, block_size=16
    )
    graph = build_graph("longformer", 512)
    assert rows[0]["note"] == "ran " + choose_backend(graph, "cpu", block_size=16)
    assert choose_backend(graph, "cpu", block_size=16) != choose_backend(graph, "cpu")  # the case that failed


def test_a_size_a_topology_cannot_take_is_a_row_not_an_abort():
    rows = run_benchmark(
        ["random", "causal"], [32, 128], ["fused"], device="cpu", heads=2, head_dim=8, repeats=1, backward=False
    )
    assert [(r["topology"], r["n"]) for r in rows] == [("random", 32), ("random", 128), ("causal", 32), ("causal", 128)]
    assert rows[0]["note"].startswith("not built: Expected 'k'") and rows[0]["ms"] is None
    assert all(r["ms"] is not None for r in rows[1:])
    format_table(rows), format_markdown(rows)  # the empty cells print


def test_fwd_bwd_error_is_the_gradient_error():
    """The fwd+bwd rows report the largest error of dQ, dK, dV against the dense reference, whose
    gradients equal autograd's through the per-edge reference."""
    from gnn_transformer.kernels import attend_reference
    from gnn_transformer.bench.benchmark import _dense_reference_grads, build_graph

    g = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(40, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4))
    edge_index = build_graph("random:k=5", 40)
    src, dst = edge_index.as_tensor()
    want = torch.autograd.grad(
        attend_reference(*(x.requires_grad_() for x in (q, k, v)), edge_index, scale=0.3), (q, k, v), grad_out
    )
    for got, w in zip(_dense_reference_grads(q.detach(), k.detach(), v.detach(), src, dst, 0.3, grad_out), want):
        torch.testing.assert_close(got.double(), w, atol=1e-5, rtol=1e-5)
    rows = run_benchmark(["random"], [128], ["fused"], device="cpu", heads=2, head_dim=8, repeats=1)
    fwd, bwd = rows
    assert bwd["pass"] == "fwd+bwd" and bwd["max_err"] is not None and bwd["max_err"] != fwd["max_err"]
    assert bwd["max_err"] < 1e-4


def test_cpu_peak_is_at_least_the_result():
    """The sampled CPU peak is taken once more while the call's result is held."""
    from gnn_transformer.bench.benchmark import _measure

    for _ in range(3):
        _, peak = _measure(lambda: torch.ones(1 << 18), "cpu", 1)  # 1 MiB, made in microseconds
        assert peak >= (1 << 20) - 4096  # the result, less malloc's own bookkeeping between samples


@pytest.mark.parametrize(
    "argv, want", [(["--quick"], 3), (["--quick", "--repeats", "7"], 7), ([], 5), (["--repeats", "2"], 2)]
)
def test_bench_repeats_are_what_was_asked(monkeypatch, argv, want):
    """--repeats is honoured with --quick (which only changes its default)."""
    from gnn_transformer import cli
    from gnn_transformer.bench import benchmark

    seen = []
    monkeypatch.setattr(benchmark, "run_benchmark", lambda *a, **kw: seen.append(kw["repeats"]) or [])
    assert cli.main(["bench", "--device", "cpu", "--topologies", "causal", "--sizes", "64", *argv]) == 0
    assert seen == [want]


def _flex_compile(monkeypatch, refuse):
    """``torch.compile`` as the benchmark's FlexAttention sees it, refusing the kernel options for
    which ``refuse(options)`` returns an error; the accepted calls run FlexAttention on the CPU."""
    real, tried = torch.compile, []

    def compile(fn):
        compiled = real(fn)

        def run(*args, kernel_options=None, **kwargs):
            tried.append(kernel_options)
            error = refuse(kernel_options)
            if error is not None:
                raise error
            return compiled(*args, **kwargs)  # the CPU kernels take no GPU launch options

        return run

    monkeypatch.setattr(torch, "compile", compile)
    return tried


def _window_flex_rows(variants):
    """The benchmark's forward rows of ``flex`` on a window of 64 tokens (2 heads of 8, one
    repeat), trying ``variants``."""
    return run_benchmark(
        ["window"], [64], ["flex"], device="cpu", heads=2, head_dim=8, repeats=1, backward=False, flex_variants=variants
    )


def test_flex_is_compiled_again_with_fewer_stages_when_its_kernels_do_not_fit(monkeypatch):
    """torch 2.11's FlexAttention asks an H100 for more shared memory than it has (bfloat16, head dim
    64): the benchmark compiles it again with the next kernel options and says so in the note."""
    from gnn_transformer.bench.benchmark import FLEX_OPTIONS

    oom = RuntimeError(
        "No valid triton configs. OutOfMemoryError: out of resource: "
        "triton_tem_fused_flex_attention_0 Required: 247808 Hardware limit:232448"
    )
    tried = _flex_compile(monkeypatch, lambda options: oom if options is None else None)
    rows = _window_flex_rows(["bitmap"])
    assert tried[:2] == [None, FLEX_OPTIONS[1]]
    assert rows[0]["note"].startswith("bitmap fastest (bitmap ") and rows[0]["ms"] is not None
    assert rows[0]["note"].endswith(f"; kernel_options={FLEX_OPTIONS[1]}")
    assert rows[0]["max_err"] < 1e-5


def test_flex_errors_other_than_resources_are_reported_not_retried(monkeypatch):
    tried = _flex_compile(monkeypatch, lambda options: ValueError("bad mask"))
    rows = _window_flex_rows(["bitmap"])
    assert tried == [None]
    assert rows[0]["ms"] is None and rows[0]["note"] == "unavailable: bitmap: ValueError: bad mask"


def test_flex_that_never_fits_reports_the_last_refusal(monkeypatch):
    from gnn_transformer.bench.benchmark import FLEX_OPTIONS

    tried = _flex_compile(monkeypatch, lambda options: RuntimeError(f"out of resource with {options}"))
    rows = _window_flex_rows(["bitmap"])
    assert tried == list(FLEX_OPTIONS)
    assert rows[0]["ms"] is None and "out of resource with {'BLOCK_M': 64" in rows[0]["note"]


def test_a_dense_reference_out_of_memory_leaves_the_error_column_empty(monkeypatch):
    """Beside a large edge set the dense reference may not fit although the estimate said it would
    (causal at 64k tokens on an 80 GB GPU): the rows are still measured, without an error."""
    from gnn_transformer.bench import benchmark

    def refuse(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    monkeypatch.setattr(benchmark, "_dense_reference", refuse)
    monkeypatch.setattr(benchmark, "_dense_reference_grads", refuse)
    rows = run_benchmark(["window"], [64], ["fused"], device="cpu", heads=2, head_dim=8, repeats=1)
    assert [r["pass"] for r in rows] == ["fwd", "fwd+bwd"]
    assert all(r["ms"] is not None and r["max_err"] is None for r in rows)


def test_times_under_ten_ms_keep_three_significant_digits():
    """GPU rows of a fraction of a millisecond stay comparable (0.3 against 0.4 would hide 30%)."""
    from gnn_transformer.bench.benchmark import _cell

    assert [_cell("ms", x) for x in (0.31234, 2.5, 172.44)] == ["0.312", "2.50", "172.4"]
    assert _cell("build_ms", 0.0) == "0.000" and _cell("ms", None) == "—"


def test_median_seconds_is_the_median_of_the_repeats_after_a_warm_up(monkeypatch):
    import types

    from gnn_transformer.bench import benchmark

    now = [0.0]
    durations = iter([100.0, 1.0, 5.0, 3.0, 9.0, 4.0])  # warm-up, then 5 timed calls

    def fn():
        now[0] += next(durations)

    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    assert benchmark.median_seconds(fn, "cpu", 5) == 4.0  # not the min 1, the mean 4.4 or the warm-up


def test_max_err_is_the_row_output_against_the_dense_reference():
    from gnn_transformer.bench.baselines import bhnd
    from gnn_transformer.bench.benchmark import _Case

    q = torch.randn(8, 2, 4)
    case = _Case(q, q, q, torch.ones_like(q), q.float(), None, "cpu", 1, False)

    def wrong(q, k, v):  # [N, H, D]: off by 0.25 everywhere
        return q + 0.25

    assert case.rows({}, wrong, 0.0)[0]["max_err"] == pytest.approx(0.25)

    def right(q, k, v):  # [1, H, N, D], laid out and back as its layout says
        return q.clone()

    right.layout = "bhnd"
    assert case.rows({}, right, 0.0)[0]["max_err"] == 0.0
    assert bhnd(q).shape == (1, 2, 8, 4)


def test_flex_row_is_the_fastest_variant(monkeypatch):
    from gnn_transformer.bench import benchmark

    ms = {"predicate": 3.0, "lookup": 1.0, "bitmap": 2.0}

    called = []  # the variant of the last call

    def fake_flex(block_mask, q, k, v, scale, backward=True):
        def fn(q, k, v):
            called.append(block_mask)
            return q.clone()

        fn.layout, fn.note = "bhnd", ""
        return fn

    def measure(fn, device, repeats):
        fn()
        return ms[called[-1]] / 1e3, 0.0

    monkeypatch.setattr(benchmark, "flex_block_mask", lambda variant, *args: variant)
    monkeypatch.setattr(benchmark, "_flex", fake_flex)
    monkeypatch.setattr(benchmark, "_measure", measure)
    rows = _window_flex_rows(["predicate", "lookup", "bitmap"])
    assert rows[0]["note"].startswith("lookup fastest (") and rows[0]["ms"] == pytest.approx(1.0)


def _row(backend, pass_, ms, peak=None, note="", **extra):
    return dict(topology="window", n=4096, backend=backend, **{"pass": pass_}, ms=ms, peak_mb=peak, note=note, **extra)


def test_against_baselines_takes_the_fastest_baseline_not_the_projects_own_backends():
    from gnn_transformer.bench.benchmark import against_baselines

    rows = [
        _row("fused", "fwd", 5.0),  # faster than auto, but not a baseline
        _row("auto", "fwd", 10.0, 40.0, "ran tiled"),
        _row("sdpa", "fwd", 30.0, 100.0, "dense bool mask"),
        _row("flex", "fwd", 15.0, 20.0, "predicate fastest (predicate 15.0, lookup 16.0)", variant="predicate"),
        _row("auto", "fwd+bwd", 40.0, 80.0, "ran tiled"),
        _row("sdpa", "fwd+bwd", 20.0, 90.0, "dense bool mask"),
        _row("flex", "fwd+bwd", None, note="unavailable: FlexAttention has no backward pass on cpu"),
    ]
    fwd, bwd = against_baselines(rows)
    assert fwd["pass"] == "fwd" and fwd["kernel"] == "tiled" and fwd["auto_ms"] == 10.0
    assert fwd["fastest_baseline"] == "Flex (predicate)" and fwd["baseline_ms"] == 15.0
    assert fwd["baseline_over_auto"] == pytest.approx(1.5) and fwd["flex_over_auto"] == pytest.approx(1.5)
    assert fwd["flex_variant"] == "predicate" and fwd["auto_peak_over_flex"] == pytest.approx(2.0)
    assert bwd["fastest_baseline"] == "SDPA (dense bool mask)" and bwd["baseline_over_auto"] == pytest.approx(0.5)
    assert bwd["flex_over_auto"] is None and bwd["flex_variant"] is None and bwd["auto_peak_over_flex"] is None


def test_against_baselines_without_a_timed_auto_or_baseline():
    from gnn_transformer.bench.benchmark import AGAINST_COLUMNS, against_baselines, format_markdown

    rows = [
        _row("auto", "fwd", None, note="unavailable: ..."),
        _row("sdpa", "fwd", 3.0),
        _row("auto", "fwd+bwd", 7.0, note="ran fused"),
        _row("sdpa", "fwd+bwd", None, note="skipped: needs 9 GiB"),
    ]
    (only,) = against_baselines(rows)  # no auto time, no row
    assert only["pass"] == "fwd+bwd" and only["fastest_baseline"] == "none ran"
    assert only["baseline_over_auto"] is None and only["baseline_ms"] is None
    assert "| window | 4096 | fwd+bwd | 7.00 | fused | none ran | — | — | — | — | — |" in format_markdown(
        [only], AGAINST_COLUMNS
    )
    assert against_baselines([_row("sdpa", "fwd", 3.0)]) == []
    total = "sum over layers: 6 x layers 0-5"  # a per-layer spec's total rows name no kernel
    (summed,) = against_baselines([_row("auto", "fwd", 2.0, note=total), _row("sdpa", "fwd", 1.0, note=total)])
    assert summed["kernel"] is None and summed["baseline_over_auto"] == pytest.approx(0.5)


def test_against_baselines_of_a_real_run_and_its_cells():
    from gnn_transformer.bench.benchmark import AGAINST_COLUMNS, against_baselines, format_table

    rows = run_benchmark(["causal"], [96], ["fused", "auto", "sdpa"], device="cpu", heads=2, head_dim=8, repeats=1)
    summary = against_baselines(rows)
    assert [s["pass"] for s in summary] == ["fwd", "fwd+bwd"]
    for s in summary:
        auto, sdpa = (next(r for r in rows if r["backend"] == b and r["pass"] == s["pass"]) for b in ("auto", "sdpa"))
        assert s["fastest_baseline"] == "SDPA (is_causal)" and s["kernel"] == "sdpa"
        assert s["baseline_over_auto"] == pytest.approx(sdpa["ms"] / auto["ms"])
    table = format_table(summary, AGAINST_COLUMNS)
    assert table.count("\n") == 2 and "×" in table
