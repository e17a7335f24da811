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


def _parity_batches():
    """Four batches of 8 parity sequences of 2 to 14 labels each (so their label counts differ)."""
    from gnn_transformer.experiments.tasks import SequenceWorkload, get_task
    from gnn_transformer.experiments.topologies import per_length, topology_fn

    task = get_task("parity", train_sizes=(2, 14), test_sizes=(15, 15))
    base = SequenceWorkload(task, per_length(topology_fn("causal")), 8, eval_size=8)
    return task, base, [base.train_batch(torch.Generator().manual_seed(seed)) for seed in range(4)]


def _step_gradients(batches, **train_args):
    """The gradients and logged row of one training step over ``batches`` (one micro-batch each)."""
    from gnn_transformer.experiments.training import TrainConfig, train

    from .test_training import _model, _Queue

    task, base, _ = _parity_batches()
    model = _model(task)
    if train_args.get("world_size", 1) > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    config = TrainConfig(steps=1, batch_size=8, grad_accum=len(batches), warmup=1)
    row = train(model, _Queue(base, batches), config, **train_args).history[-1]
    named = model.module.named_parameters() if hasattr(model, "module") else model.named_parameters()
    return {name: p.grad.clone() for name, p in named}, row


def _ddp_worker(rank, world_size, store, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        _, _, batches = _parity_batches()
        grads, row = _step_gradients(batches[2 * rank : 2 * rank + 2], rank=rank, world_size=world_size)
        torch.save({"grads": grads, "row": row}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_step_equals_one_process_over_every_rank_batch(tmp_path):
    """Two ranks of two micro-batches each take the gradient, loss and token count of one process
    on one batch of all four, although the four hold different numbers of labels: the step's loss is
    the mean over every label of every rank."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), tmp_path), nprocs=2, join=True)
    _, _, batches = _parity_batches()
    labels = [int((b.targets >= 0).sum()) for b in batches]
    assert labels[0] + labels[1] != labels[2] + labels[3]
    from gnn_transformer.experiments.tasks import SequenceBatch

    whole = SequenceBatch(
        torch.cat([b.tokens for b in batches]),
        torch.cat([b.targets for b in batches]),
        torch.cat([b.positions for b in batches]),
        [n for b in batches for n in b.lengths],
    )
    want, row = _step_gradients([whole])
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["row"]["loss"] == pytest.approx(row["loss"], rel=1e-6)
        assert got["row"]["tokens"] == row["tokens"]
        assert got["row"]["grad_norm"] == pytest.approx(row["grad_norm"], rel=1e-5)
        for name in want:
            torch.testing.assert_close(got["grads"][name], want[name], atol=1e-7, rtol=1e-5, msg=name)
