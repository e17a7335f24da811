"""``compare --seeds N``: one run per topology and seed, mean ± std in the table, error bars in the
figure, per-seed rows in the CSV and JSON."""

import csv
import json
import statistics

import pytest

from gnn_transformer.cli import main
from gnn_transformer.experiments.compare import DEFAULT_TOPOLOGIES, CompareConfig, mean_std, run_compare, save_compare
from gnn_transformer.experiments.models import EncoderConfig
from gnn_transformer.experiments.training import TrainConfig

TINY = EncoderConfig(d_model=16, nhead=2, num_layers=1, dim_feedforward=32, backend="pyg")


@pytest.fixture(scope="module")
def result():
    config = CompareConfig(
        task="recall",
        topologies=("full", "sliding_window:window=1"),
        model=TINY,
        seeds=3,
        train_sizes=(3, 4),
        test_sizes=(5, 6),
        eval_size=16,
        train=TrainConfig(steps=4, batch_size=8, warmup=1, seed=5),
    )
    return run_compare(config)


def test_one_row_per_topology_and_seed(result):
    assert [(r.topology, r.seed) for r in result.results] == [
        ("full", 5),
        ("full", 6),
        ("full", 7),
        ("sliding_window(window=1)", 5),
        ("sliding_window(window=1)", 6),
        ("sliding_window(window=1)", 7),
    ]
    losses = [r.final_loss for r in result.results[:3]]
    assert len(set(losses)) == 3  # the seeds differ


def test_summary_is_mean_and_sample_std(result):
    rows = result.summary()
    assert [r["topology"] for r in rows] == ["full", "sliding_window(window=1)"]
    for row in rows:
        runs = [r for r in result.results if r.topology == row["topology"]]
        assert row["seeds"] == 3
        for key in ("final_loss", "acc_test", "acc_longer"):
            values = [getattr(r, key) for r in runs]
            assert row[key] == pytest.approx(statistics.fmean(values))
            assert row[f"{key}_std"] == pytest.approx(statistics.stdev(values))
        assert row["val_loss"] is None and row["val_loss_std"] is None


def test_files_hold_per_seed_rows_and_the_summary(result, tmp_path):
    paths = save_compare(result, tmp_path)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [(r["topology"], r["seed"]) for r in rows] == [(r.topology, str(r.seed)) for r in result.results]
    data = json.loads(paths["json"].read_text())
    assert len(data["results"]) == 6 and len(data["summary"]) == 2
    assert data["summary"][0]["acc_test_std"] == pytest.approx(result.summary()[0]["acc_test_std"])
    assert paths["figure"].stat().st_size > 10_000


def test_mean_std_cells():
    assert mean_std(0.5, 0.0125, ".3f") == "0.500 ± 0.013"
    assert mean_std(0.5, 0.0, ".3f") == "0.500"
    assert mean_std(None, None, ".3f") == "-"


def test_cli_table_shows_mean_and_std(tmp_path, capsys):
    argv = [
        "compare",
        "--seeds",
        "2",
        "--topology",
        "full",
        "--train-sizes",
        "3-4",
        "--test-sizes",
        "5-6",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--batch-size",
        "8",
        "--eval-size",
        "8",
        "--d-model",
        "16",
        "--heads",
        "2",
        "--layers",
        "1",
        "--ff",
        "32",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 seeds" in out and "seed 1:" in out
    assert "±" in out.splitlines()[-3]  # the row of 'full' in the table


def test_seeds_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--seeds", "0"])
    assert exit_.value.code == 2 and "--seeds" in capsys.readouterr().err


def test_default_comparison_is_unchanged():
    config = CompareConfig()
    assert config.task == "recall" and config.topologies == DEFAULT_TOPOLOGIES and config.seeds == 1
    assert (config.train.steps, config.train.batch_size, config.train.lr) == (800, 32, 2e-3)
