"""Two processes on CPU (gloo) under torchrun: DDP keeps the replicas identical."""

import os
import subprocess
import sys

import pytest
import torch

from gnn_transformer.experiments.distributed import DistInfo, from_environment
from gnn_transformer.experiments.training import load_checkpoint


def test_environment_defaults(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert from_environment() == DistInfo(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="RANK"):
        from_environment()


@pytest.mark.slow
def test_torchrun_two_processes_end_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "gnn_transformer.cli",
        "train",
        "--task",
        "recall",
        "--topology",
        "sliding_window:window=2",
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--d-model",
        "16",
        "--ff",
        "32",
        "--heads",
        "2",
        "--warmup",
        "2",
        "--dropout",
        "0.1",
        "--no-progress",
        "--out",
        str(out),
        "--save-all-ranks",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 processes" in proc.stdout
    w0 = load_checkpoint(out / "model_rank0.pt")["model"]
    w1 = load_checkpoint(out / "model_rank1.pt")["model"]
    init = load_checkpoint(out / "model.pt")
    assert init["meta"]["world_size"] == 2
    assert w0.keys() == w1.keys()
    for name in w0:
        torch.testing.assert_close(w0[name], w1[name], rtol=0, atol=0, msg=name)
    assert (out / "train_log.csv").exists()
    # the logged tokens are the sum over both ranks' batches (seeds 1000 * seed + rank)
    import csv

    from gnn_transformer.experiments.runs import RunConfig, build
    from gnn_transformer.experiments.training import TrainConfig

    config = RunConfig(task="recall", topology="sliding_window:window=2", train=TrainConfig(steps=6, batch_size=4))
    workload, _ = build(config)
    want = 0
    for rank in (0, 1):
        g = torch.Generator().manual_seed(config.train.seed * 1000 + rank)
        want += sum(workload.batch_tokens(workload.train_batch(g)) for _ in range(6))
    with open(out / "train_log.csv") as f:
        assert int(list(csv.DictReader(f))[-1]["tokens"]) == want
