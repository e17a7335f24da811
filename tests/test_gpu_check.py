"""``benchmarks/gpu_check.sh`` is run on a GPU rarely and once: its commands must be right before
then. Every ``bench`` command in it parses as the CLI parses it, every test file it names exists,
and the time limits of the table's steps add up to at most 8 minutes."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import torch

from gnn_transformer.cli import build_parser

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _lines() -> list[str]:
    """The script's lines with continuations joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", SCRIPT.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _bench_commands() -> list[list[str]]:
    """The arguments after ``bench`` of every bench command (the script's ``bench`` function adds
    ``--device cuda``), with ``$out`` and its shell variables replaced."""
    commands = []
    for line in _lines():
        if not (line.startswith(("step ", "python ")) and " bench " in line):
            continue  # not a bench command (the embedded Python programs among them)
        line = line.split(" 2>&1")[0].split(" | ")[0].split(" <<")[0]
        for name, value in (("$out", "out"), ("$length", "auto"), ("$block", "32")):  # the loops' values
            line = line.replace(name, value)
        words = shlex.split(line)
        if "gnn_transformer.cli" in words and "bench" in words:
            commands.append(words[words.index("bench") :])
        elif words[:1] == ["step"] and len(words) > 3 and words[3] == "bench":
            commands.append(["bench", "--device", "cuda", *words[4:]])
        elif words[:1] == ["python"] and "-" in words and "bench" in words:  # the pieces stage's wrapper
            commands.append(words[words.index("bench") :])
    return commands


def test_the_script_holds_bench_commands():
    commands = _bench_commands()
    assert len(commands) >= 15
    assert any("--train-step" in c for c in commands) and any("--selectors" in c for c in commands)


@pytest.mark.parametrize("command", _bench_commands(), ids=lambda c: " ".join(c[1:6]))
def test_every_bench_command_parses(command):
    build_parser().parse_args(command)  # argparse exits on an unknown option or a value out of its choices


@pytest.mark.parametrize("folder,example", [("tests", "test_kernels_cuda.py"), ("benchmarks", "implicit_causal.py")])
def test_named_files_exist(folder, example):
    root = SCRIPT.parents[1]
    named = set(re.findall(folder + r"/[\w/]+\.py", SCRIPT.read_text()))
    assert f"{folder}/{example}" in named
    for path in named:
        assert (root / path).is_file(), path


def test_the_table_fits_in_eight_minutes():
    limits = [int(words[1]) for words in (line.split() for line in _lines()) if words[0] == "step"]
    assert len(limits) >= 9
    assert sum(limits) <= 480


def test_embedded_python_programs_compile():
    programs = re.findall(r"<<'PY'[^\n]*\n(.*?)\nPY\n", SCRIPT.read_text(), flags=re.S)
    assert programs  # the pieces stage's wrapper
    for program in programs:
        compile(program, str(SCRIPT), "exec")


def test_implicit_causal_rows_match_sdpa_on_the_cpu():
    """The table's implicit-causal step, run on the CPU at small sizes (one of them not a multiple of
    the tile size): every backend and pass gives a row, the edge count is the causal graph's and the
    output is SDPA's."""
    spec = importlib.util.spec_from_file_location("implicit_causal", SCRIPT.parent / "implicit_causal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = list(module.rows([256, 640], device="cpu", dtype=torch.float32, heads=2, dim=16, repeats=1))
    assert len(rows) == 2 * 2 * 2
    for row in rows:
        n, edges, _, _, backend, pas, ms, peak, err = (cell.strip() for cell in row.strip("|").split("|"))
        assert int(edges) == int(n) * (int(n) + 1) // 2
        assert backend in ("tiled", "auto") and pas in ("fwd", "fwd+bwd")
        assert float(ms) > 0 and peak == "—"
        assert float(err) < 1e-5
