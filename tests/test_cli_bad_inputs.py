"""Bad and extreme values on the command line (issue 18): exit code 2 and a message naming the
option (or file) and the value, before the work starts, never a traceback.

Cases already covered by test_cli_errors.py (unknown devices 'tpu', non-power-of-two block sizes,
unbuildable specs of verify and compare, ...) are not repeated here.
"""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from gnn_transformer import cli

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
BENCH = ["--sizes", "64", "--backends", "pyg", "--heads", "2", "--head-dim", "8", "--repeats", "1"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default outputs (runs/..., <name>.png) land in tmp_path


def _usage_error(argv, capsys, *names) -> str:
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.err.startswith("gnn-transformer: error: "), captured.err
    for name in names:
        assert name in captured.err, (name, captured.err)
    assert "Traceback" not in captured.err
    return captured.err


# ---------------------------------------------------------------- show: bounded -n (item 7)
@pytest.mark.parametrize("spec,n", [("bigbird", "10000000"), ("full", "3000"), ("causal", "257")])
def test_show_refuses_n_beyond_what_it_draws(spec, n, capsys):
    _usage_error(["show", spec, "-n", n], capsys, "-n", n, str(cli.show.SHOW_N_MAX))
    assert not Path(f"{spec}.png").exists()


def test_show_refuses_a_graph_with_too_many_edges_to_draw(capsys):
    err = _usage_error(["show", "full", "-n", "64"], capsys, "-n", "64", "4096 edges", str(cli.show.SHOW_EDGES_MAX))
    assert "full" in err and not Path("full.png").exists()


def test_show_refuses_a_spec_whose_small_n_is_beyond_what_it_draws(tmp_path, capsys):
    spec = tmp_path / "wide.toml"
    spec.write_text('name = "wide"\nbuilder = "causal"\n[small]\nn = 4000\n')
    _usage_error(["show", str(spec)], capsys, "wide.toml", "4000", str(cli.show.SHOW_N_MAX), "-n")
    assert cli.main(["show", str(spec), "-n", "8"]) == 0  # a smaller -n draws it
    assert capsys.readouterr().out.startswith("wide")


def test_show_draws_at_the_bound(capsys):
    assert cli.main(["show", "sliding_window:window=1", "-n", str(cli.show.SHOW_N_MAX)]) == 0
    assert f"on n = {cli.show.SHOW_N_MAX}" in capsys.readouterr().out


# ---------------------------------------------------------------- bench --block-size (item 8)
@pytest.mark.parametrize("block", ["8", "512", "1073741824", "-16"])
def test_bench_block_size_is_bounded(block, capsys):
    err = _usage_error(
        ["bench", "--topologies", "window", *BENCH, "--device", "cpu", "--block-size", block],
        capsys,
        "--block-size",
        block,
    )
    assert "Traceback" not in err


def test_bench_block_size_in_range_runs(capsys):
    assert (
        cli.main(
            [
                "bench",
                "--topologies",
                "window",
                *BENCH,
                "--device",
                "cpu",
                "--backends",
                "tiled",
                "--block-size",
                "16",
                "--no-backward",
            ]
        )
        == 0
    )


def test_run_benchmark_names_block_size():
    from gnn_transformer.bench.benchmark import run_benchmark

    with pytest.raises(ValueError, match="'block_size'.*got 16384"):
        run_benchmark(["window"], [64], ["tiled"], device="cpu", heads=2, head_dim=8, repeats=1, block_size=16384)


# ---------------------------------------------------------------- --device of every command (item 11)
@pytest.mark.parametrize("device", ["meta", "mps", "xpu", "cuda:7", "not a device"])
@pytest.mark.parametrize(
    "command",
    [
        ["verify", "causal", "--lengths", "4"],
        ["bench", "--topologies", "window", *BENCH],
        ["train", *STEP, "--out", "t"],
        ["compare", *STEP, "--topology", "full", "--eval-size", "2", "--out", "c"],
    ],
)
def test_devices_that_cannot_run_are_refused(command, device, capsys):
    err = _usage_error([*command, "--device", device], capsys, "--device", repr(device))
    assert not Path("t").exists() and not Path("c").exists()
    assert err.count("\n") == 1  # one line, no traceback


# ---------------------------------------------------------------- checkpoints and HF weights (item 19)
class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_analyze_refuses_a_malicious_hf_weights_file(tmp_path, capsys):
    pytest.importorskip("transformers")
    from transformers import BertConfig

    directory = tmp_path / "evil"
    BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    ).save_pretrained(directory)
    torch.save({"embeddings.word_embeddings.weight": _RunsCode()}, directory / "pytorch_model.bin")
    (tmp_path / "ids.txt").write_text("1 2 3\n")
    err = _usage_error(
        ["analyze", "--hf-dir", str(directory), "--tokens", "ids.txt", "--no-plots"],
        capsys,
        "--hf-dir",
        "pytorch_model.bin",
        "UnpicklingError",
    )
    assert str(directory) in err
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name,content", [("pytorch_model.bin", b""), ("model.safetensors", b"garbage" * 4)])
def test_analyze_refuses_damaged_hf_weights(tmp_path, name, content, capsys):
    pytest.importorskip("transformers")
    from transformers import BertConfig

    directory = tmp_path / "damaged"
    BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    ).save_pretrained(directory)
    (directory / name).write_bytes(content)
    (tmp_path / "ids.txt").write_text("1 2 3\n")
    _usage_error(["analyze", "--hf-dir", str(directory), "--tokens", "ids.txt", "--no-plots"], capsys, "--hf-dir", name)


def test_analyze_refuses_a_malicious_checkpoint(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_RunsCode()))
    _usage_error(["analyze", "--checkpoint", str(path)], capsys, "evil.pt", "UnpicklingError")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("content,message", [(b"{not json", "Expected JSON"), (b"\xff\xfe{", "UTF-8")])
def test_analyze_names_a_config_it_cannot_read(tmp_path, content, message, capsys):
    torch.save({"a": torch.zeros(2)}, tmp_path / "sd.pt")
    (tmp_path / "cfg.json").write_bytes(content)
    _usage_error(
        ["analyze", "--checkpoint", str(tmp_path / "sd.pt"), "--config", "cfg.json"],
        capsys,
        "--config",
        "cfg.json",
        message,
    )


@pytest.mark.parametrize(
    "config,message",
    [
        ("missing.json", "'missing.json' does not exist: expected a JSON model config file"),
        (".", "'.' is a directory"),
        ("keys.json", "a JSON object with 'd_model' and 'nhead' (at its top or under 'model_config', 'model' or "),
        ("list.json", "got list)"),
    ],
)
def test_analyze_says_what_is_wrong_with_the_config_given(tmp_path, config, message, capsys):
    """A --config that is missing, a folder or no model config is named as such (it was reported
    as 'no config at' or as if --config had not been given)."""
    torch.save({"a": torch.zeros(2)}, tmp_path / "sd.pt")
    (tmp_path / "keys.json").write_text('{"a": 1}')
    (tmp_path / "list.json").write_text("[1, 2]")
    _usage_error(["analyze", "--checkpoint", "sd.pt", "--config", config], capsys, "--config", message)


def test_analyze_refuses_samples_with_an_input_file(tmp_path, capsys):
    """--samples draws examples of a 'train' run's task: with --tokens or --text it was ignored."""
    from gnn_transformer.model import GraphLM, GraphTransformerConfig

    config = dict(vocab_size=10, d_model=8, nhead=2, num_layers=1, max_positions=16)
    torch.save(GraphLM(GraphTransformerConfig(**config)).state_dict(), tmp_path / "lm.pt")
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "ids.txt").write_text("1 2 3\n")
    argv = ["analyze", "--checkpoint", "lm.pt", "--tokens", "ids.txt", "--no-plots"]
    _usage_error([*argv, "--samples", "3"], capsys, "--samples", "does not apply with '--tokens'")
    assert cli.main(argv) == 0


def test_analyze_names_a_token_file_that_is_not_text(tmp_path, capsys):
    from gnn_transformer.model import GraphLM, GraphTransformerConfig

    config = dict(vocab_size=10, d_model=8, nhead=2, num_layers=1, max_positions=16)
    torch.save(GraphLM(GraphTransformerConfig(**config)).state_dict(), tmp_path / "lm.pt")
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "ids.txt").write_text("1 2 3\n")
    assert cli.main(["analyze", "--checkpoint", "lm.pt", "--tokens", "ids.txt", "--no-plots"]) == 0
    capsys.readouterr()
    (tmp_path / "ids.txt").write_bytes(b"\xff\xfe1 2")
    _usage_error(
        ["analyze", "--checkpoint", "lm.pt", "--tokens", "ids.txt", "--no-plots"],
        capsys,
        "--tokens",
        "ids.txt",
        "UTF-8",
    )


# ---------------------------------------------------------------- bench: unbuildable topologies (item 20)
def test_bench_refuses_a_topology_it_cannot_build_before_timing(capsys):
    _usage_error(
        ["bench", "--topologies", "window", "random:k=100", *BENCH, "--device", "cpu"],
        capsys,
        "--topologies",
        "random:k=100",
        "--sizes 64",
    )
    assert "pyg" not in capsys.readouterr().out  # nothing was timed


def test_bench_exits_2_when_a_larger_size_cannot_be_built(monkeypatch, capsys):
    from gnn_transformer.bench import benchmark

    build = benchmark.build_graph

    def build_small_only(topology, n, seed=0):
        if n > 64:
            raise ValueError(f"Expected 'n' <= 64 (got {n})")
        return build(topology, n, seed)

    monkeypatch.setattr(benchmark, "build_graph", build_small_only)
    code = cli.main(
        ["bench", "--topologies", "window", "--sizes", "64", "96", *BENCH[2:], "--device", "cpu", "--no-backward"]
    )
    captured = capsys.readouterr()
    assert code == 2
    assert "window at n = 96" in captured.err and "--sizes" in captured.err
    assert "not built" in captured.out  # the buildable size was still measured and shown


@pytest.mark.parametrize(
    "option,value", [("--heads", "100000000"), ("--head-dim", "100000000"), ("--sizes", "100000000000")]
)
def test_bench_refuses_inputs_that_cannot_fit(option, value, capsys):
    argv = ["bench", "--topologies", "window", *BENCH, "--device", "cpu"]
    argv[argv.index(option) + 1] = value
    _usage_error(argv, capsys, option, value, "GiB")


# ---------------------------------------------------------------- other misuse
@pytest.mark.parametrize("seed", ["-1", str(2**63), str(10**23)])
@pytest.mark.parametrize(
    "command",
    [["train", *STEP, "--out", "t"], ["compare", *STEP, "--topology", "full", "--eval-size", "2", "--out", "c"]],
)
def test_seed_out_of_range(command, seed, capsys):
    _usage_error([*command, "--seed", seed], capsys, "--seed", seed)
    assert not Path("t").exists() and not Path("c").exists()


def test_out_of_memory_is_a_usage_error(monkeypatch, capsys):
    from gnn_transformer.experiments import verify

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 TB")

    monkeypatch.setattr(verify, "verify_topologies", no_memory)
    err = _usage_error(["verify", "causal", "--lengths", "4"], capsys, "out of memory", "can't allocate")
    assert err.count("\n") == 1
    assert err.rstrip().endswith("ask for less (--lengths, ...)")  # the options of the command that ran


def test_other_runtime_errors_are_not_hidden(monkeypatch):
    from gnn_transformer.experiments import verify

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(verify, "verify_topologies", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["verify", "causal", "--lengths", "4"])


@pytest.mark.parametrize("name", ["meta", "mps", "xpu", "gpu", "cuda:7"])
def test_resolve_device_refuses_what_cannot_run(name):
    """The library's device check (used by ``verify_topologies`` and ``run_compare``) follows the
    command line's rule: the CPU, or a CUDA GPU that is there."""
    from gnn_transformer.experiments.training import resolve_device

    with pytest.raises(ValueError, match=f"'device'.*{name!r}"):
        resolve_device(name)


# ---------------------------------------------------------------- show --layers, --sample-chars
def test_show_layers_beyond_the_longest_path_print_one_closing_line(capsys):
    """A receptive field stops growing once a layer adds no token (at the latest after n - 1
    layers): ``--layers 10**9`` prints the layers that change it and one line for the rest."""
    assert cli.main(["show", "sliding_window:window=1", "-n", "6", "--layers", str(10**9)]) == 0
    out = capsys.readouterr().out
    means = [line.split("mean ")[1] for line in out.splitlines() if "receptive field after" in line and "mean" in line]
    assert means == ["2.7 of 6 tokens", "4.0 of 6 tokens", "5.0 of 6 tokens", "5.7 of 6 tokens", "6.0 of 6 tokens"]
    assert f"receptive field after 5 to {10**9} layers: the same" in out
    assert cli.main(["show", "sliding_window:window=1", "-n", "6", "--layers", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("receptive field after") == 2 and "the same" not in out


def test_compare_has_no_sample_chars(capsys):
    """compare generates no text: --sample-chars is not one of its options (it was accepted and ignored)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", "--task", "lm", "--sample-chars", "5", *STEP])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --sample-chars 5" in capsys.readouterr().err


def test_train_sample_chars_that_cannot_fit_are_refused(capsys):
    _usage_error(["train", "--task", "lm", *STEP, "--sample-chars", str(10**15)], capsys, "--sample-chars", "GiB")
    assert not Path("runs").exists() or not any(Path("runs").rglob("*.pt"))
