"""Bad usage of ``gnn-transformer``: exit code 2 and a message naming the option, before any work.

Every command here stays tiny (one step, small models and benchmarks), so that a regression that
lets the work start still finishes quickly and fails on the exit code or the message.
"""

import io
import os
import sys
from pathlib import Path

import pytest
import torch

from gnn_transformer import cli

ROOT = Path(__file__).resolve().parents[1]
STEP = [
    "--steps",
    "1",
    "--batch-size",
    "2",
    "--d-model",
    "16",
    "--ff",
    "32",
    "--heads",
    "2",
    "--warmup",
    "0",
    "--no-progress",
    "--backend",
    "pyg",
]
_at = STEP.index("--batch-size")
ONE_GRAPH = STEP[:_at] + STEP[_at + 2 :]  # karate trains on its one graph: no --batch-size
BENCH = [
    "--topologies",
    "window",
    "--sizes",
    "64",
    "--backends",
    "pyg",
    "--heads",
    "2",
    "--head-dim",
    "8",
    "--repeats",
    "1",
    "--device",
    "cpu",
]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default outputs (runs/..., <name>.png) land in tmp_path


def _usage_error(argv, option, capsys) -> str:
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.err.startswith("gnn-transformer: error: ") and option in captured.err, captured.err
    assert "Traceback" not in captured.err and "final loss" not in captured.out
    return captured.err


@pytest.mark.parametrize(
    "argv,option",
    [
        (["train", *STEP, "--heads", "0"], "--heads"),
        (["train", *STEP, "--log-every", "0"], "--log-every"),
        (["train", *STEP, "--task", "digits", "--topology", "grid", "--patch", "0"], "--patch"),
        (["train", *STEP, "--task", "digits", "--topology", "grid", "--patch", "16"], "--patch"),
        (["train", *STEP, "--task", "digits", "--topology", "grid", "--patch", "-2"], "--patch"),
        (["train", *ONE_GRAPH, "--task", "karate", "--pe-dim", "-1"], "--pe-dim"),
        (["train", *ONE_GRAPH, "--task", "karate", "--pe-dim", "100"], "--pe-dim"),
        (["compare", *STEP, "--topology", "full", "--eval-size", "0"], "--eval-size"),
        (["verify", "causal", "--lengths", "4", "--device", "tpu"], "--device"),
        (["bench", *BENCH[:-2], "--device", "tpu"], "--device"),
        (["bench", *BENCH, "--threads", "-1"], "--threads"),
        (["bench", *BENCH, "--threads", "0"], "--threads"),
        (["bench", *BENCH, "--threads", "100000"], "--threads"),
        (["bench", *BENCH, "--kv-heads", "0"], "--kv-heads must be >= 1"),
        (["bench", *BENCH, "--selectors", "topk", "--train-step", "8"], "--selectors"),
        (["bench", *BENCH, "--calibrate", "--train-step"], "--calibrate"),
        (["compare", *STEP, "--topology", "full", "--topology", "full"], "--topology"),
        (["train", *STEP, "--d-model", "18"], "--position rope rotates pairs of channels"),
        (["compare", *STEP, "--topology", "full", "--d-model", "18"], "(got --d-model 18 / --heads 2 = 9)"),
        (["train", *STEP, "--task", "recall", "--test-sizes", "20-40"], "--test-sizes: Expected 'test_sizes' of"),
        (["train", *STEP, "--betas", "-0.1", "0.9"], "--betas"),
        (["train", *STEP, "--betas", "0.9", "1.0"], "--betas"),
        (["train", *STEP, "--betas", "nan", "0.9"], "--betas"),
        (["train", *STEP, "--eps", "-1"], "--eps"),
        (["train", *STEP, "--eps", "nan"], "--eps"),
        (["train", "--device", "tpu", *STEP], "--device"),
        (["train", *STEP, "--dropout", "2"], "--dropout"),
        # models that cannot fit: refused from their parameter count, before any weight is allocated
        (["train", *STEP, "--layers", str(10**7)], "--layers"),
        (["compare", *STEP, "--topology", "full", "--d-model", str(10**6)], "--d-model"),
        (["train", *ONE_GRAPH, "--task", "karate", "--ff", str(10**10)], "--ff"),
        (["train", *STEP, "--d-model", str(10**11)], "--d-model"),
    ],
)
def test_bad_values(argv, option, capsys):
    _usage_error(argv, option, capsys)


@pytest.mark.parametrize(
    "argv,option",
    [
        (["train", *STEP, "--weight-decay", "-1"], "--weight-decay"),
        (["train", *STEP, "--eval-every", "-1"], "--eval-every"),
        (["train", *STEP, "--lr", "inf"], "--lr"),
        (["train", *STEP, "--lr", "nan"], "--lr"),
        (["train", *STEP, "--clip-grad", "nan"], "--clip-grad"),
        (["train", *STEP, "--train-sizes", "6-12", "--test-sizes", "2-3"], "--test-sizes"),
        (["compare", *STEP, "--topology", "full", "--train-sizes", "2-5", "--test-sizes", "4-6"], "--test-sizes"),
        (["verify", "causal", "--lengths", "0"], "--lengths"),
    ],
)
def test_values_accepted_silently_before(argv, option, capsys):
    _usage_error(argv, option, capsys)


@pytest.mark.parametrize(
    "argv,option",
    [
        (["--train-step", "8", "--heads", "2"], "--heads"),
        (["--train-step", "8", "--kv-heads", "1"], "--kv-heads"),
        (["--train-step", "8", "--head-dim", "8"], "--head-dim"),
        (["--train-step", "8", "--sizes", "64"], "--sizes"),
        (["--train-step", "8", "--topologies", "window"], "--topologies"),
        (["--train-step", "8", "--backends", "auto"], "--backends"),
        (["--train-step", "8", "--flex-variants", "lookup"], "--flex-variants"),
        (["--train-step", "8", "--no-backward"], "--no-backward"),
        (["--train-step", "8", "--block-size", "16"], "--block-size"),
        (["--batch-size", "3", "--topologies", "window", "--sizes", "64"], "--batch-size"),
        (["--calibrate", "--batch-size", "3"], "--batch-size"),
        (["--calibrate", "--backends", "auto"], "--backends"),
        (["--calibrate", "--flex-variants", "lookup"], "--flex-variants"),
        (["--selectors", "topk", "--topologies", "window"], "--topologies"),
        (["--selectors", "topk", "--flex-variants", "lookup"], "--flex-variants"),
        (["--selectors", "topk", "--block-size", "16"], "--block-size"),
        (["--selectors", "topk", "--batch-size", "3"], "--batch-size"),
    ],
)
def test_bench_options_that_a_run_does_not_read_are_refused(argv, option, capsys):
    err = _usage_error(["bench", *argv, "--repeats", "1", "--device", "cpu"], option, capsys)
    assert f"{option} does not apply to" in err and "it would be ignored (read by " in err


def test_bench_selectors_refuse_backends_they_do_not_run(capsys):
    argv = ["bench", "--selectors", "topk", "--backends", "fused", "flex", "--sizes", "64", "--device", "cpu"]
    err = _usage_error(argv, "--backends fused", capsys)
    assert "give --backends among auto flex sdpa" in err


def test_bench_options_given_at_their_defaults_are_accepted(tmp_path, capsys):
    """An option read by the run is accepted at its default value too (the refusal is for options
    the run would ignore, never for defaults)."""
    md = tmp_path / "step.md"
    argv = ["bench", "--train-step", "8", "--batch-size", "12", "--repeats", "1", "--device", "cpu"]
    assert cli.main([*argv, "--markdown", str(md)]) == 0, capsys.readouterr()
    text = md.read_text()
    assert "| gpt_sdpa | 8 | 12 |" in text and "| graph_lm (auto) | 8 | 12 |" in text


def test_verify_cuda_missing_is_usage_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    err = _usage_error(["verify", "causal", "--lengths", "4", "--device", "cuda"], "--device", capsys)
    assert "CUDA" in err


@pytest.mark.parametrize(
    "argv,option",
    [
        (["train", *ONE_GRAPH, "--task", "karate", "--train-sizes", "5-10"], "--train-sizes"),
        (["train", *ONE_GRAPH, "--task", "karate", "--test-sizes", "11-12"], "--test-sizes"),
        (["train", *ONE_GRAPH, "--task", "karate", "--patch", "7"], "--patch"),
        (["train", *ONE_GRAPH, "--task", "karate", "--position", "learned"], "--position"),
        (["train", *STEP, "--task", "digits", "--topology", "grid", "--pe-dim", "1000"], "--pe-dim"),
        (["train", *STEP, "--task", "digits", "--topology", "grid", "--virtual-node"], "--virtual-node"),
        (["train", *STEP, "--task", "digits", "--topology", "grid", "--train-sizes", "5-10"], "--train-sizes"),
        (["train", *STEP, "--task", "recall", "--pe-dim", "4"], "--pe-dim"),
        (["train", *STEP, "--task", "recall", "--virtual-node"], "--virtual-node"),
        (["train", *STEP, "--task", "recall", "--patch", "2"], "--patch"),
        (["train", *ONE_GRAPH, "--task", "karate", "--eval-size", "8"], "--eval-size"),
        (["train", *STEP, "--task", "listops", "--tie-embeddings"], "--tie-embeddings"),
        (["train", *ONE_GRAPH, "--task", "karate", "--tie-embeddings"], "--tie-embeddings"),
        (["train", *STEP, "--task", "karate"], "--batch-size"),
        (["train", "--preset", "nanogpt-cpu", *ONE_GRAPH, "--task", "karate"], "--preset nanogpt-cpu"),
        (["train", *STEP, "--task", "digits", "--topology", "grid", "--eval-size", "8"], "--eval-size"),
    ],
)
def test_options_of_another_task_are_refused(argv, option, capsys):
    err = _usage_error(argv, option, capsys)
    assert "does not apply to task" in err


# runs that draw their examples, by task kind
DRAWING = {
    "compare": ["compare", *STEP, "--topology", "full"],
    "train": ["train", *STEP],
    "listops": ["train", *STEP, "--task", "listops"],
    "shortest_path": ["train", *STEP, "--task", "shortest_path", "--topology", "full"],
    "lm": ["train", *STEP, "--task", "lm"],
    "digits": ["train", *STEP, "--task", "digits", "--topology", "grid"],
}


@pytest.mark.parametrize("run", list(DRAWING))
def test_training_batches_that_cannot_fit_are_refused_before_any_is_drawn(run, capsys):
    """A batch size whose batches (ids and the layer inputs a training step keeps, a lower bound)
    need more than half of the machine's memory is refused before the first step (10**9 recall
    sequences a step would otherwise be drawn for minutes)."""
    err = _usage_error([*DRAWING[run], "--batch-size", str(10**9)], "--batch-size", capsys)
    assert f"Expected 'batch_size' small enough to fit in memory (got {10**9}): {10**9} examples" in err
    assert "with the activations a training step keeps (at least)" in err


@pytest.mark.parametrize("run", ["compare", "train", "listops", "shortest_path"])  # lm: windows of its text
def test_evaluation_sets_that_cannot_fit_are_refused_before_any_is_drawn(run, capsys):
    """An evaluation size whose sets need more than half of the machine's memory is refused at once,
    with the size, the estimate and the budget (drawing 10**10 sequences would otherwise run for
    hours before failing)."""
    err = _usage_error([*DRAWING[run], "--eval-size", str(10**10)], "--eval-size", capsys)
    assert f"Expected 'eval_size' small enough to fit in memory (got {10**10}): 2 sets of {10**10}" in err
    assert "more than half of this machine's memory" in err


def test_options_of_the_task_are_accepted(tmp_path, capsys):
    assert (
        cli.main(
            ["train", *ONE_GRAPH, "--task", "karate", "--pe-dim", "3", "--virtual-node", "--out", str(tmp_path / "k")]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "train",
                *STEP,
                "--task",
                "copy",
                "--position",
                "learned",
                "--train-sizes",
                "2-3",
                "--test-sizes",
                "4-5",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )


def test_output_paths_are_checked_before_the_work(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    missing = str(tmp_path / "missing" / "x")
    _usage_error(["train", *STEP, "--out", str(a_file)], "--out", capsys)
    _usage_error(["train", *STEP, "--out", str(a_file / "sub")], "--out", capsys)
    _usage_error(["compare", *STEP, "--topology", "full", "--eval-size", "2", "--out", str(a_file)], "--out", capsys)
    _usage_error(["verify", "causal", "--lengths", "4", "--json", missing + ".json"], "--json", capsys)
    _usage_error(["verify", "causal", "--lengths", "4", "--json", str(tmp_path)], "--json", capsys)
    _usage_error(["bench", *BENCH, "--markdown", missing + ".md"], "--markdown", capsys)
    calibrate = [a for a in BENCH if a not in ("--backends", "pyg")] + ["--calibrate"]  # it times fused and tiled
    _usage_error(["bench", *calibrate, "--markdown", str(tmp_path)], "--markdown", capsys)
    _usage_error(["show", "sliding_window:window=2", "--out", str(tmp_path)], "--out", capsys)
    assert not (tmp_path / "missing").exists() and a_file.read_text() == ""


def test_compare_builds_every_topology_before_training(tmp_path, capsys):
    code = cli.main(
        [
            "compare",
            *STEP,
            "--eval-size",
            "2",
            "--topology",
            "full",
            "--topology",
            "random:k=50",
            "--out",
            str(tmp_path / "cmp"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 2
    assert "k=50" in captured.err and "full: acc" not in captured.out
    assert not (tmp_path / "cmp").exists()


def _edges_line(capsys, argv) -> str:
    assert cli.main(argv) == 0
    return capsys.readouterr().out.splitlines()[1]  # "  edges E, density D, causal C"


def test_show_n_keeps_the_toy_scale(capsys):
    from gnn_transformer import topology

    small_n = topology.read_spec("bigbird").small_n
    default = _edges_line(capsys, ["show", "bigbird"])
    assert _edges_line(capsys, ["show", "bigbird", "-n", str(small_n)]) == default
    assert _edges_line(capsys, ["show", "bigbird", "-n", str(small_n), "--paper-scale"]) != default
    assert cli.main(["show", "bigbird", "-n", "30"]) == 0
    assert capsys.readouterr().out.startswith("bigbird (small) on n = 30")


def test_show_toml_path_uses_its_small_table_and_stem(tmp_path, capsys):
    default = _edges_line(capsys, ["show", "bigbird", "--out", str(tmp_path / "named.png")])
    path = str(ROOT / "graphs" / "bigbird.toml")
    assert _edges_line(capsys, ["show", path]) == default
    assert (tmp_path / "bigbird.png").is_file()  # <stem>.png in the current directory
    assert not (ROOT / "graphs" / "bigbird.toml.png").exists()


@pytest.mark.parametrize(
    "argv,option",
    [
        (["show", "bigbird", "-n", "0"], "-n"),
        (["show", "bigbird", "-n", "-5"], "-n"),
        (["show", "bigbird", "--layers", "0"], "--layers"),
        (["show", "bigbird", "--layers", "-1"], "--layers"),
    ],
)
def test_show_counts_must_be_positive(argv, option, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert f"argument {option}: expected an integer >= 1" in capsys.readouterr().err


def test_verify_names_a_spec_it_cannot_build_and_checks_the_others(capsys):
    code = cli.main(["verify", "causal", "random", "full", "--lengths", "2", "--backend", "pyg"])
    captured = capsys.readouterr()
    assert code == 2
    assert "cannot be built on --lengths 2: random" in captured.err
    rows = [line.split()[0] for line in captured.out.splitlines() if line.rstrip().endswith(" ok")]
    assert rows == ["causal", "full"]
    assert "2/2 checks within tolerance" in captured.out


def test_verify_library_raises_without_on_error():
    from gnn_transformer.experiments.verify import verify_topologies

    with pytest.raises(ValueError, match="k"):
        verify_topologies(["random"], [2], backends=["pyg"])


def test_broken_pipe_exits_quietly(monkeypatch, capsys):
    read_end, write_end = os.pipe()

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return write_end

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    try:
        assert cli.main(["show", "--list"]) == 1
    finally:
        os.close(read_end)
        os.close(write_end)
    assert capsys.readouterr().err == ""


def test_save_all_ranks_checkpoints_have_the_step(tmp_path, monkeypatch):
    from gnn_transformer.experiments import distributed
    from gnn_transformer.experiments.models import EncoderConfig
    from gnn_transformer.experiments.runs import RunConfig, run_training
    from gnn_transformer.experiments.training import TrainConfig, load_checkpoint

    # rank 0 of two processes, without a process group: the model is not wrapped
    monkeypatch.setattr(distributed, "from_environment", lambda: distributed.DistInfo(0, 2, 0))
    monkeypatch.setattr(distributed, "setup", lambda info, device: device)
    monkeypatch.setattr(distributed, "wrap", lambda model, info, device: model)
    config = RunConfig(
        task="copy",
        train_sizes=(2, 3),
        test_sizes=(4, 5),
        out=str(tmp_path),
        save_all_ranks=True,
        model=EncoderConfig(d_model=16, nhead=2, dim_feedforward=32),
        train=TrainConfig(steps=2, batch_size=2, warmup=0),
    )
    run_training(config)
    assert load_checkpoint(tmp_path / "model_rank0.pt")["step"] == 2
    assert load_checkpoint(tmp_path / "model.pt")["step"] == 2


# ---------------------------------------------------------------- analyze
@pytest.fixture(scope="module")
def recall_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert (
        cli.main(["train", "--task", "recall", *STEP, "--steps", "2", "--position", "learned", "--out", str(out)]) == 0
    )
    return out / "model.pt"


@pytest.mark.parametrize(
    "tokens,message",
    [
        ("1 2 99999", "got 99999 in sequence 1"),
        ("1 2 3\n1 -2 3", "got -2 in sequence 2"),
        (" ".join(["1"] * 300), "at most 256 tokens"),
    ],
)
def test_analyze_refuses_tokens_the_model_cannot_take(recall_run, tmp_path, tokens, message, capsys):
    path = tmp_path / "tokens.txt"
    path.write_text(tokens + "\n")
    err = _usage_error(
        ["analyze", "--checkpoint", str(recall_run), "--tokens", str(path), "--no-plots", "--out", str(tmp_path / "a")],
        "--tokens",
        capsys,
    )
    assert message in err


def test_analyze_refuses_a_file_that_is_not_a_checkpoint_or_an_out_that_is_a_file(recall_run, tmp_path, capsys):
    err = _usage_error(
        ["analyze", "--checkpoint", str(ROOT / "graphs" / "bigbird.toml")], "Could not read the checkpoint", capsys
    )
    assert "bigbird.toml" in err
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    _usage_error(["analyze", "--checkpoint", str(recall_run), "--out", str(a_file)], "--out", capsys)


def test_analyze_help_and_errors_agree_with_the_docs(capsys):
    with pytest.raises(SystemExit):
        cli.main(["analyze", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default 2) (default: 2)" not in help_text and "(default: 2)" in help_text
    assert "unset: a 'train' run's own topology; for a Hugging Face model 'native', each layer's own graph" in help_text
    docs = " ".join((ROOT / "docs" / "analysis.md").read_text().split())
    assert "default: a `train` run's own topology; for a Hugging Face model `native`, each layer's own graph" in docs
    assert cli.main(["analyze", "--checkpoint", "no_such_file.pt"]) == 2
    assert capsys.readouterr().err.startswith("gnn-transformer: error: ")


@pytest.mark.parametrize(
    "argv,option",
    [
        (["show", "full", "-n", "4", "--out", "{bad}/x.png"], "--out"),
        (["view", "full", "-n", "4", "--out", "{bad}/x.html"], "--out"),
        (["verify", "full", "--lengths", "3", "--json", "{bad}/x.json"], "--json"),
        (["bench", *BENCH, "--markdown", "{bad}/x.md"], "--markdown"),
        (["train", *STEP, "--out", "{bad}/run"], "--out"),
        (["compare", *STEP, "--topology", "full", "--out", "{bad}/run"], "--out"),
    ],
)
def test_unwritable_outputs_are_refused_before_any_work(argv, option, tmp_path, capsys):
    """An output whose folder cannot be written to is refused at once, naming the option (the
    folder here is read-only; as root, where permissions do not bind, the probe is skipped)."""
    bad = tmp_path / "read-only"
    bad.mkdir()
    bad.chmod(0o500)
    try:
        if os.access(bad, os.W_OK):
            pytest.skip("permissions do not bind for this user")
        err = _usage_error([a.replace("{bad}", str(bad)) for a in argv], option, capsys)
        assert "cannot write" in err
    finally:
        bad.chmod(0o700)


def test_outputs_where_nothing_can_be_created_are_refused(capsys):
    """/proc takes no new files, whoever asks."""
    if not Path("/proc").is_dir():
        pytest.skip("no /proc")
    err = _usage_error(["show", "full", "-n", "4", "--out", "/proc/x.png"], "--out", capsys)
    assert "cannot write '/proc/x.png'" in err


def test_an_empty_resume_file_is_a_usage_error(tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    err = _usage_error(["train", *STEP, "--out", str(tmp_path / "r"), "--resume", str(empty)], "--resume", capsys)
    assert "empty or truncated file" in err


@pytest.mark.parametrize(
    "argv,option",
    [
        (["show", "causal", "-n", "4", "--out", ""], "--out"),
        (["show", ""], "SPEC"),
        (["view", "causal", "-n", "4", "--out", ""], "--out"),
        (["view", "causal", "-n", "4", "--title", ""], "--title"),
        (["verify", "causal", "--lengths", "3", "--json", ""], "--json"),
        (["verify", "", "causal", "--lengths", "3"], "SPEC"),
        (["train", *STEP, "--topology", ""], "--topology"),
        (["train", *STEP, "--out", ""], "--out"),
        (["compare", *STEP, "--topology", ""], "--topology"),
        (["bench", *BENCH, "--markdown", ""], "--markdown"),
        (["bench", *BENCH[2:], "--topologies", "window", ""], "--topologies"),
        (["analyze", "--checkpoint", "", "--tokens", "x.txt"], "--checkpoint"),
    ],
)
def test_empty_strings_are_refused(argv, option, tmp_path, capsys):
    """An empty path, spec or text was taken as not given (train --out '' wrote /model.pt's
    files into the current folder and said 'wrote /model.pt'; show --out '' drew <name>.png)."""
    err = _usage_error(argv, option, capsys)
    assert f"{option}: expected a non-empty value (got '')" in err
    assert not any(tmp_path.iterdir())


def test_a_diverged_training_run_exits_1(monkeypatch, capsys):
    """A training loss that becomes nan or inf (FloatingPointError) is a failed run: exit code 1
    and one error line, not 0."""
    from gnn_transformer.experiments import runs

    def diverge(*args, **kwargs):
        raise FloatingPointError("Training loss became nan at step 1; try a lower learning rate")

    monkeypatch.setattr(runs, "run_training", diverge)
    assert cli.main(["train", *STEP]) == 1
    assert "Training loss became nan" in capsys.readouterr().err
