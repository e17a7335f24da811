"""The command line on per-head graphs, per-layer graphs and selectors: show, verify, compare,
train, bench (refused), with the errors of bad specs (exit code 2)."""

import json

import pytest
import torch

from gnn_transformer import cli
from gnn_transformer import topology as T
from gnn_transformer.experiments.topologies import batch_graph, parse_spec, per_length, resolve_topology, split_select
from gnn_transformer.topology.specs import LayerPattern

NEW = ["duo_attention", "longformer_dilated", "streaming_llm", "modernbert", "gemma3", "moba", "topk"]


def test_specs_on_the_command_line():
    assert parse_spec("dilated_per_head:window=4,dilations=1;2;4;8") == (
        "dilated_per_head",
        {"window": 4, "dilations": [1, 2, 4, 8]},
    )
    assert split_select("graphs/a+b.toml+block_topk:block_size=4,num_blocks=1") == (
        "graphs/a+b.toml",
        "block_topk:block_size=4,num_blocks=1",
    )
    assert split_select("causal") == ("causal", None)
    with pytest.raises(ValueError, match=r"Expected each key once .* \(got 'window' twice\)"):
        parse_spec("sliding_window:window=1,window=5")  # not the last one silently
    t = resolve_topology("duo_attention:streaming_heads=1,num_heads=2,num_sinks=1,window=1")
    assert t.kind == "per_head" and t.num_heads == 2  # one item without ';'
    assert resolve_topology("duo_attention:streaming_heads=;,num_heads=2,num_sinks=1,window=1").num_heads == 2
    assert resolve_topology("modernbert").kind == "per_layer"
    assert resolve_topology("moba", small=True).select == "block_topk:block_size=4,num_blocks=1,causal=true"
    assert resolve_topology("moba+topk:num_keys=2").select == "topk:num_keys=2"  # the suffix replaces it
    with pytest.raises(ValueError, match="'nhead' to equal the 8 heads.*'duo_attention'.*nhead=4"):
        resolve_topology("duo_attention").check_heads(4)


@pytest.mark.parametrize("spec", ["dilated_per_head:window=2,dilations=1;3", "modernbert", "streaming_llm"])
def test_per_length_batches_equal_the_direct_build(spec):
    topo = resolve_topology(spec, small=True)
    lengths = [5, 1, 7, 5]
    direct, cached = topo.build(lengths), per_length(topo.build)(lengths)
    pattern = (direct, cached) if topo.per_layer else (LayerPattern((direct,)), LayerPattern((cached,)))
    for layer in range(pattern[0].period):
        a, b = pattern[0](layer), pattern[1](layer)
        a, b = (g if isinstance(g, tuple) else (g,) for g in (a, b))
        for x, y in zip(a, b):
            assert torch.equal(torch.as_tensor(x), torch.as_tensor(y))
    if topo.per_layer:
        assert cached(1) is cached(2)  # repeated layers still share one graph
    assert batch_graph([T.causal(2).as_tensor()], [2]).size(1) == 3


def test_verify_new_catalogue_entries_and_command_line_selectors(tmp_path, capsys):
    path = tmp_path / "v.json"
    code = cli.main(
        [
            "verify",
            *NEW,
            "causal+lsh:num_buckets=2,chunk_size=4",
            "dilated_per_head:window=1,dilations=1;2",
            "--lengths",
            "5",
            "9",
            "--backend",
            "pyg",
            "--backend",
            "fused",
            "--json",
            str(path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    rows = json.loads(path.read_text())
    assert len(rows) == 2 * (len(NEW) + 2) and all(row["ok"] for row in rows)


@pytest.mark.parametrize(
    "spec, expected, files",
    [
        ("duo_attention", ["per head (8 heads)", "head 7:"], ["x.png"]),
        (
            "modernbert",
            ["per layer (a cycle of 3 layers)", "layers 1, 2 (of every 3)"],
            ["x_layer0.png", "x_layer1_2.png"],
        ),
        ("moba", ["selects its per-head graph", "block_topk:block_size=4", "shown: the allowed graph"], ["x.png"]),
        ("causal+topk:num_keys=2", ["causal+topk:num_keys=2 on n", "'topk:num_keys=2'"], ["x.png"]),
        ("dilated_per_head:window=1,dilations=1;2", ["per head (2 heads)"], ["x.png"]),
    ],
)
def test_show_structured_specs(tmp_path, capsys, spec, expected, files):
    assert cli.main(["show", spec, "-n", "10", "--out", str(tmp_path / "x.png")]) == 0
    out = capsys.readouterr().out
    assert all(text in out for text in expected), out
    assert all((tmp_path / f).is_file() for f in files)


def test_compare_and_train_on_structured_specs(tmp_path, capsys):
    code = cli.main(
        [
            "compare",
            "--task",
            "copy",
            "--topology",
            "dilated_per_head:window=1,dilations=1;2",
            "--topology",
            "gemma3",
            "--topology",
            "causal+topk:num_keys=2",
            "--heads",
            "2",
            "--d-model",
            "8",
            "--ff",
            "16",
            "--layers",
            "2",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--eval-size",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path / "c"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    rows = json.loads((tmp_path / "c" / "results.json").read_text())["results"]
    assert [r["spec"] for r in rows] == ["dilated_per_head:window=1,dilations=1;2", "gemma3", "causal+topk:num_keys=2"]
    assert all(r["max_dense_error"] < 1e-4 for r in rows)  # per-head masks, per-layer graphs, selections
    code = cli.main(
        [
            "train",
            "--task",
            "copy",
            "--topology",
            "modernbert+topk:num_keys=2",
            "--heads",
            "2",
            "--d-model",
            "8",
            "--ff",
            "16",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path / "t"),
        ]
    )
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["compare", "--topology", "duo_attention", "--heads", "4", "--steps", "1"],
            "--heads: Expected 'nhead' to equal the 8",
        ),
        (["train", "--topology", "longformer_dilated", "--heads", "4", "--steps", "1"], "12 heads"),
        (["verify", "causal+topk:num_keys=0"], "num_keys"),
        (["verify", "causal+topk"], "missing parameter 'num_keys'"),
        (["verify", "dilated_per_head:window=1,dilations=1;0"], "key 'dilations[1]': expected >= 1"),
        (["verify", "dilated_per_head:window=1,dilations=1;x"], "key 'dilations[1]': expected an integer"),
        (["verify", "duo_attention+topk:num_keys=2"], "not within a per-head graph (8 heads)"),
        (
            ["bench", "--quick", "--topologies", "duo_attention", "--heads", "4", "--sizes", "64"],
            "builds per-head graphs for 8 heads (got --heads 4)",
        ),
        (
            ["bench", "--calibrate", "--topologies", "modernbert", "--sizes", "64"],
            "--calibrate measures graphs for every head and layer",
        ),
        (["bench", "--quick", "--topologies", "causal+topk:num_keys=2", "--sizes", "64"], "chosen from the data"),
        (["show", "+topk:num_keys=2"], "before the selector"),
    ],
)
def test_bad_structured_specs_exit_2(tmp_path, capsys, argv, message):
    argv = [*argv, "--out", str(tmp_path / "o")] if argv[0] in ("compare", "train") else argv
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
