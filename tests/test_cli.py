import json

import pytest

from gnn_transformer import cli
from gnn_transformer.experiments import verify as verify_module

COMMANDS = ["compare", "verify", "show", "train", "bench", "analyze", "view", "perplexity"]
TINY = [
    "--steps",
    "4",
    "--batch-size",
    "4",
    "--eval-size",
    "8",
    "--d-model",
    "16",
    "--ff",
    "32",
    "--heads",
    "2",
    "--no-progress",
    "--backend",
    "pyg",
    "--warmup",
    "1",
]


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


def test_python_dash_m_runs_the_command_line():
    import subprocess
    import sys

    from gnn_transformer import __version__

    proc = subprocess.run(
        [sys.executable, "-m", "gnn_transformer", "--version"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"gnn-transformer {__version__}"
    proc = subprocess.run([sys.executable, "-m", "gnn_transformer"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2  # no command: the help and the usage exit code, as gnn-transformer
    assert "usage: gnn-transformer" in proc.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert "usage: gnn-transformer " + command in capsys.readouterr().out


def test_no_command_is_usage_error(capsys):
    assert cli.main([]) == 2


def test_unknown_option_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "--no-such-option"])
    assert e.value.code == 2


def test_compare_tiny(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = cli.main(
        [
            "compare",
            "--topology",
            "full",
            "--topology",
            "sliding_window:window=1",
            "--train-sizes",
            "2-3",
            "--test-sizes",
            "4-5",
            "--out",
            str(out),
            *TINY,
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "max err vs dense" in text and "sliding_window(window=1)" in text
    results = json.loads((out / "results.json").read_text())
    rows = results["results"]
    assert [r["topology"] for r in rows] == ["full", "sliding_window(window=1)"]
    assert rows[0]["density"] == pytest.approx(1.0)
    assert rows[1]["edges_per_seq"] < rows[0]["edges_per_seq"]
    for r in rows:
        assert r["max_dense_error"] < 1e-4
        assert 0.0 <= r["acc_test"] <= 1.0 and r["memory_mib"] > 0 and r["history"]
    assert (out / "compare.png").stat().st_size > 10_000
    assert (out / "results.csv").read_text().startswith("topology,")


def test_compare_bad_topology_exits_2(tmp_path, capsys):
    code = cli.main(["compare", "--topology", "nope", "--out", str(tmp_path), *TINY])
    assert code == 2
    assert "Unknown topology 'nope'" in capsys.readouterr().err


def test_verify_ok_and_json(tmp_path, capsys):
    path = tmp_path / "v.json"
    code = cli.main(
        [
            "verify",
            "full",
            "causal",
            "sliding_window:window=2",
            "--lengths",
            "5",
            "9",
            "--backend",
            "pyg",
            "--json",
            str(path),
        ]
    )
    assert code == 0
    assert "3/3 checks within tolerance" in capsys.readouterr().out
    assert all(row["ok"] for row in json.loads(path.read_text()))


def test_verify_catalogue_default(capsys):
    code = cli.main(["verify", "--lengths", "6", "11"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "bigbird" in out and "MISMATCH" not in out


def test_verify_mismatch_exits_1(monkeypatch, capsys):
    import torch

    monkeypatch.setitem(verify_module.TOLERANCE, torch.float64, -1.0)
    code = cli.main(["verify", "full", "--lengths", "4", "--backend", "pyg"])
    assert code == 1
    captured = capsys.readouterr()
    assert "MISMATCH" in captured.out and "1 mismatches" in captured.err


def test_show_builder_and_spec(tmp_path, capsys):
    png = tmp_path / "w.png"
    assert cli.main(["show", "sliding_window:window=2", "-n", "10", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "edges 44" in out and png.stat().st_size > 1000
    png2 = tmp_path / "bb.png"
    assert cli.main(["show", "bigbird", "--out", str(png2)]) == 0
    assert "source:" in capsys.readouterr().out and png2.exists()
    assert cli.main(["show", "--list"]) == 0
    assert "sliding_window" in capsys.readouterr().out


def test_show_errors(capsys):
    assert cli.main(["show"]) == 2
    assert cli.main(["show", "nope"]) == 2
    assert "Unknown topology" in capsys.readouterr().err


@pytest.mark.parametrize("task,topology", [("recall", "random:k=2"), ("karate", "graph")])
def test_train_writes_logs_and_checkpoint(tmp_path, capsys, task, topology):
    out = tmp_path / "run"
    # the sequence task takes its default evaluation set; karate trains on its one graph
    dropped = ("--eval-size", "--batch-size") if task == "karate" else ("--eval-size",)
    tiny = [a for i, a in enumerate(TINY) if a not in dropped and TINY[i - 1] not in dropped]
    args = ["train", "--task", task, "--topology", topology, "--out", str(out), *tiny]
    assert cli.main(args) == 0
    for name in ("train_log.csv", "train_eval.csv", "train.json", "model.pt", "loss.png"):
        assert (out / name).exists(), name
    assert "final loss" in capsys.readouterr().out


def test_train_cuda_missing_is_usage_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert cli.main(["train", "--steps", "1", "--device", "cuda", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_analyze_without_its_module_is_a_clear_error(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "gnn_transformer.experiments.analyze_run", None)
    assert cli.main(["analyze"]) == 2
    assert "'analyze' is not available" in capsys.readouterr().err


def test_bench_runs_a_tiny_benchmark(tmp_path, capsys):
    md = tmp_path / "bench.md"
    assert (
        cli.main(
            [
                "bench",
                "--topologies",
                "window",
                "--sizes",
                "64",
                "--backends",
                "pyg",
                "fused",
                "sdpa",
                "--heads",
                "2",
                "--head-dim",
                "8",
                "--repeats",
                "1",
                "--device",
                "cpu",
                "--markdown",
                str(md),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "fused" in out and "sdpa" in out
    assert md.read_text().count("| window |") >= 4  # pyg, fused, sdpa rows; fwd and fwd+bwd
    assert "against the fastest baseline" not in out  # no auto row: nothing to compare
    assert cli.main(["bench", "--heads", "0"]) == 2
    assert "--heads" in capsys.readouterr().err


def test_bench_compares_auto_with_the_fastest_baseline(tmp_path, capsys):
    md = tmp_path / "bench.md"
    argv = ["bench", "--topologies", "causal", "--sizes", "64", "--backends", "auto", "sdpa", "--heads", "2"]
    assert cli.main([*argv, "--head-dim", "8", "--repeats", "1", "--device", "cpu", "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert "`auto` against the fastest baseline of this run" in out and "SDPA (is_causal)" in out
    text = md.read_text()
    rows, against = text.split("`auto` against the fastest baseline of this run")
    assert rows.count("| causal |") == 4 and against.count("| causal | 64 |") == 2
    assert "| topology | n | pass | auto_ms | kernel | fastest_baseline |" in against


def test_bench_calibrate(tmp_path, capsys):
    md = tmp_path / "calibration.md"
    assert (
        cli.main(
            [
                "bench",
                "--calibrate",
                "--topologies",
                "window",
                "random",
                "--sizes",
                "128",
                "--heads",
                "2",
                "--kv-heads",
                "1",
                "--head-dim",
                "8",
                "--repeats",
                "1",
                "--device",
                "cpu",
                "--block-size",
                "16",
                "--markdown",
                str(md),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "TILE_COST measured (median ratio over the graphs): fwd " in out and "auto uses 0.25 on cpu" in out
    assert "ROW_COST measured (edges per target row, fused / tiled): fwd " in out and "auto uses 7.0 / 10.0" in out
    assert "MERGE_COST measured (edges per target row): fwd " in out
    assert "DROPOUT_COST measured (edges added per fused edge / per tile cell, dropout 0.1): fwd " in out
    assert "auto uses 0.2 / 0.25" in out
    text = md.read_text()
    assert text.count("| window |") == 2 and text.count("| random |") == 2  # fwd, fwd+bwd
    assert cli.main(["bench", "--calibrate", "--block-size", "24"]) == 2
    assert "--block-size must be a power of two (got 24)" in capsys.readouterr().err


def test_bench_topology_specs(capsys):
    assert (
        cli.main(
            [
                "bench",
                "--topologies",
                "dilated:window=4,dilation=2",
                "longformer",
                "--sizes",
                "64",
                "--backends",
                "fused",
                "auto",
                "--heads",
                "2",
                "--head-dim",
                "8",
                "--repeats",
                "1",
                "--device",
                "cpu",
                "--no-backward",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "dilated:window=4,dilation=2" in out and "longformer" in out
    assert cli.main(["bench", "--topologies", "window", "nosuch"]) == 2
    assert "--topologies: Unknown topology 'nosuch'" in capsys.readouterr().err
    assert cli.main(["bench", "--heads", "4", "--kv-heads", "3"]) == 2
    assert "--kv-heads must divide --heads 4 (got 3)" in capsys.readouterr().err
    assert cli.main(["bench", "--block-size", "12"]) == 2  # the tile size of tiled and auto, too
    assert "--block-size must be a power of two (got 12)" in capsys.readouterr().err
