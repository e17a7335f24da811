"""The scripts of ``benchmarks/`` that the docs quote run, at small sizes, and print their tables:
they import the package as a user's checkout does (``PYTHONPATH`` the repository), so a renamed
function or option breaks them here first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_auto_vs_sdpa():
    out = _run("auto_vs_sdpa.py", "--tokens", "256", "--threads", "1", "--repeats", "1")
    assert "auto runs sdpa" in out
    assert out.count("auto / sdpa") == 2 and "fwd+bwd:" in out


def test_bench_attention():
    out = _run(
        "bench_attention.py",
        *("--device", "cpu", "--threads", "1", "--sizes", "256", "--topologies", "window"),
        *("--backends", "auto", "sdpa", "--repeats", "1", "--no-backward"),
    )
    assert "window" in out and "ran tiled" in out and "dense bool mask" in out


@pytest.mark.parametrize("path", ["cpu", "triton"])
def test_lines_read(path):
    out = _run("lines_read.py", "--path", path, "--graph", "random")  # causal runs SDPA on either path
    assert f"--path {path}" in out and "| gnn_transformer/attention.py |" in out
    total = next(line for line in out.splitlines() if line.startswith("| **total"))
    executed, in_jit = (int(cell.strip(" *")) for cell in total.strip("|").split("|")[1:3])
    assert executed > 0 and (in_jit > 0) == (path == "triton")  # the interpreter runs the jit bodies


def test_train_step_phases():
    out = _run("train_step_phases.py", "--rounds", "2", "--context", "16", "--batch", "2", "--threads", "1")
    rows = [line for line in out.splitlines() if line.startswith("| gpt_sdpa") or line.startswith("| graph_lm")]
    assert len(rows) == 2 and ("(+" in rows[1] or "(-" in rows[1])  # the GraphLM's differences from the GPT


def test_nanogpt_reference(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(100)))
    out = _run("nanogpt_reference.py", str(text), "--steps", "3", "--threads", "1")
    seed, full, estimate, _ = (cell.strip() for cell in out.splitlines()[2].strip("|").split("|"))
    assert seed == "0" and 0 < float(full) < 10 and 0 < float(estimate) < 10
