"""Checkpoints: atomic writes, ``weights_only`` reads, exact resumption, a process killed while
writing, and ``--resume`` from another configuration."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import pytest
import torch

from gnn_transformer.cli import main
from gnn_transformer.experiments import checkpoints
from gnn_transformer.experiments.models import EncoderConfig
from gnn_transformer.experiments.runs import RunConfig, run_training
from gnn_transformer.experiments.training import TrainConfig

TINY = EncoderConfig(d_model=16, nhead=2, num_layers=2, dim_feedforward=32, dropout=0.1, backend="pyg")


def _config(out, **train) -> RunConfig:
    settings = dict(steps=8, batch_size=4, warmup=2, log_every=1, eval_every=2, grad_accum=2)
    settings.update(train)
    return RunConfig(
        task="recall",
        topology="sliding_window:window=2",
        train_sizes=(3, 4),
        test_sizes=(5, 6),
        model=TINY,
        train=TrainConfig(**settings),
        eval_size=16,
        out=str(out),
    )


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_atomic_save_leaves_no_temporary_and_reads_weights_only(tmp_path):
    path = checkpoints.atomic_save({"model": {"w": torch.arange(3.0)}, "meta": {"a": [1, 2]}}, tmp_path / "c.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert checkpoints.read(path)["meta"] == {"a": [1, 2]}
    (tmp_path / "evil.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="'checkpoint'.*evil.pt"):
        checkpoints.read(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="does not exist"):
        checkpoints.read(tmp_path / "missing.pt")


def test_stop_and_resume_equals_one_run(tmp_path):
    """A run of 2k steps equals k steps, a stop, and k more steps resumed from last.pt: weights,
    losses, evaluations (dropout and gradient accumulation on, so every random state matters)."""
    whole, model_whole = run_training(_config(tmp_path / "whole"))
    first, _ = run_training(_config(tmp_path / "split", stop_after=4))
    assert checkpoints.read(tmp_path / "split" / "last.pt")["step"] == 4
    assert first.final["step"] == 4
    rest, model_rest = run_training(replace(_config(tmp_path / "split"), resume=str(tmp_path / "split")))
    _same_weights(model_whole.state_dict(), model_rest.state_dict())
    assert [h["loss"] for h in rest.history] == [h["loss"] for h in whole.history]
    assert rest.evals == whole.evals
    assert rest.best == whole.best and whole.best is not None
    best = checkpoints.read(tmp_path / "whole" / "best.pt")
    assert best["step"] == whole.best["step"]


def test_a_stop_between_log_and_eval_steps_leaves_the_run_unchanged(tmp_path):
    """A stop at a step that is not a logging step (log every 3, stop at 5) adds no row to the log
    kept in last.pt (the resumed run's log and final loss were those of another run), and a stop
    at an evaluation step is evaluated once (the stopped run listed it twice)."""
    whole, _ = run_training(_config(tmp_path / "whole", steps=10, log_every=3, eval_every=5))
    first, _ = run_training(_config(tmp_path / "split", steps=10, log_every=3, eval_every=5, stop_after=5))
    assert [h["step"] for h in first.history] == [3, 5]  # the stop's row is reported, not kept
    assert [e["step"] for e in first.evals] == [5]
    rest, _ = run_training(
        replace(_config(tmp_path / "split", steps=10, log_every=3, eval_every=5), resume=str(tmp_path / "split"))
    )
    assert [h["step"] for h in rest.history] == [h["step"] for h in whole.history] == [3, 6, 9, 10]
    assert rest.history == [dict(h, seconds=r["seconds"]) for h, r in zip(whole.history, rest.history)]
    assert rest.final["final_loss"] == whole.final["final_loss"]
    assert [e["step"] for e in rest.evals] == [e["step"] for e in whole.evals] == [5, 10]


def test_the_logged_learning_rate_is_the_one_the_step_took(tmp_path):
    result, _ = run_training(_config(tmp_path / "lr", steps=6, warmup=4, lr=1e-3, log_every=1, eval_every=0))
    assert [round(h["lr"], 12) for h in result.history[:4]] == [2.5e-4, 5e-4, 7.5e-4, 1e-3]  # warmup: s / 4


def test_resuming_into_another_folder_carries_best_pt(tmp_path):
    """best.pt is written only when a better evaluation comes: resumed into another --out, the
    run's train.json named a best step whose weights were only in the first folder."""
    run_training(_config(tmp_path / "first", stop_after=4))
    rest, _ = run_training(replace(_config(tmp_path / "second"), resume=str(tmp_path / "first")))
    best = checkpoints.read(tmp_path / "second" / "best.pt")
    assert rest.best is not None and best["step"] == rest.best["step"]


@pytest.mark.parametrize("task", ["karate", "shortest_path"])
def test_graph_tasks_are_reproducible_with_their_seed(tmp_path, task):
    """The Laplacian encodings draw their signs from torch's global generator: seeded before the
    workload is built, two runs of one seed (and so a run and its resumption) are the same."""
    config = RunConfig(
        task=task,
        topology="graph",
        model=TINY,
        train=TrainConfig(steps=3, batch_size=2, warmup=0, log_every=1),
        eval_size=8,
        pe_dim=4,
    )
    (a, model_a), (b, model_b) = run_training(config), run_training(config)
    _same_weights(model_a.state_dict(), model_b.state_dict())
    assert a.final == b.final


def test_resume_from_another_configuration_is_refused_and_writes_nothing(tmp_path, capsys):
    run_training(_config(tmp_path, stop_after=2))
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=r"'resume'.*train.lr=0.001 \(this run: 0.002\)"):
        run_training(replace(_config(tmp_path, lr=2e-3), resume=str(tmp_path / "last.pt")))
    argv = [
        "train",
        "--task",
        "recall",
        "--topology",
        "sliding_window:window=2",
        "--train-sizes",
        "3-4",
        "--test-sizes",
        "5-6",
        "--d-model",
        "32",
        "--heads",
        "2",
        "--steps",
        "8",
        "--batch-size",
        "4",
        "--eval-size",
        "16",
        "--out",
        str(tmp_path),
        "--resume",
        str(tmp_path),
        "--no-progress",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "model.d_model=16 (this run: 32)" in err
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_resume_refuses_a_weights_only_checkpoint(tmp_path):
    run_training(_config(tmp_path, steps=2, eval_every=0))
    with pytest.raises(ValueError, match="'resume'.*training checkpoint"):
        run_training(replace(_config(tmp_path, steps=2, eval_every=0), resume=str(tmp_path / "model.pt")))


KILLED_WHILE_SAVING = """
import os, sys, time, torch
from gnn_transformer.experiments.models import EncoderConfig
from gnn_transformer.experiments.runs import RunConfig, run_training
from gnn_transformer.experiments.training import TrainConfig

out, marker = sys.argv[1], sys.argv[2]
real_save, calls = torch.save, []

def save(obj, f, *args, **kwargs):  # the second training checkpoint stops half-written
    if isinstance(obj, dict) and "training_state" in obj:
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\\x03\\x04 half a checkpoint")
            f.flush()
            open(marker, "w").close()
            time.sleep(600)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
model = EncoderConfig(d_model=16, nhead=2, num_layers=2, dim_feedforward=32, dropout=0.1, backend="pyg")
run_training(RunConfig(task="recall", topology="full", train_sizes=(3, 4), test_sizes=(5, 6), model=model,
                       train=TrainConfig(steps=6, batch_size=4, warmup=1, checkpoint_every=2), eval_size=8,
                       out=out))
"""


def test_killed_while_writing_leaves_the_last_good_checkpoint(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(KILLED_WHILE_SAVING))
    out, marker = tmp_path / "run", tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(marker)])
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, "the training process ended before its second checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # mid-write of the checkpoint of step 4
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    payload = checkpoints.read(out / "last.pt")  # weights_only; the torn file is a temporary
    assert payload["step"] == 2
    model = EncoderConfig(d_model=16, nhead=2, num_layers=2, dim_feedforward=32, dropout=0.1, backend="pyg")
    config = RunConfig(
        task="recall",
        topology="full",
        train_sizes=(3, 4),
        test_sizes=(5, 6),
        model=model,
        train=TrainConfig(steps=6, batch_size=4, warmup=1, checkpoint_every=2),
        eval_size=8,
    )
    _, resumed = run_training(replace(config, out=str(out), resume=str(out / "last.pt")))
    _, whole = run_training(replace(config, out=str(tmp_path / "whole")))
    _same_weights(resumed.state_dict(), whole.state_dict())


def test_a_checkpoint_holding_pickled_objects_is_refused(tmp_path):
    """weights_only=True: a checkpoint that pickles an arbitrary Python object is refused."""
    import fractions

    torch.save({"model": {"w": torch.zeros(1)}, "meta": {"x": fractions.Fraction(1, 3)}}, tmp_path / "obj.pt")
    with pytest.raises(ValueError, match="checkpoint"):
        checkpoints.read(tmp_path / "obj.pt")
