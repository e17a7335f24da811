"""The perplexity run and command (gnn_transformer.experiments.perplexity, cli/perplexity.py)."""

import csv
import dataclasses
import json
import math
import re

import pytest
import torch

from gnn_transformer import GraphLM, GraphTransformerConfig, cli, topology
from gnn_transformer.experiments.perplexity import build_graph, run_perplexity, stream_ids


def _checkpoint(tmp_path, position="rope"):
    torch.manual_seed(0)
    cfg = GraphTransformerConfig(vocab_size=13, d_model=16, nhead=2, num_layers=2, position=position, backend="pyg")
    model = GraphLM(cfg).eval()
    path = tmp_path / "ckpt" / "model.pt"
    path.parent.mkdir()
    torch.save({"model": model.state_dict(), "meta": {}}, path)
    (path.parent / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    tokens = tmp_path / "ids.txt"
    g = torch.Generator().manual_seed(1)
    tokens.write_text(" ".join(map(str, torch.randint(0, 13, (90,), generator=g).tolist())) + "\n")
    return path, model, tokens


def test_rows_equal_the_whole_graph(tmp_path):
    _, model, tokens = _checkpoint(tmp_path)
    ids = torch.tensor([int(t) for t in tokens.read_text().split()])
    specs = ["causal", "streaming:num_sinks=2,window=7", "sliding_window:window=5,causal=true"]
    rows = run_perplexity(model, ids, specs, num_layers=2, chunk=8, bucket_size=30)
    assert [r.topology for r in rows] == [
        "causal",
        "streaming(num_sinks=2, window=7)",
        "sliding_window(window=5, causal=True)",
    ]
    for spec, row in zip(specs, rows):
        graph = build_graph(spec, 90, 2)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids, graph, pos=torch.arange(90)).double(), -1)
        nll = -logp[:-1].gather(1, ids[1:].view(-1, 1)).mean()
        assert math.isclose(row.nll, float(nll), rel_tol=1e-5)
        assert math.isclose(row.perplexity, math.exp(row.nll), rel_tol=1e-12)
        assert [b["tokens"] for b in row.buckets] == [30, 30, 29]
    assert rows[0].peak_cache == 90 and rows[1].peak_cache <= 2 + 7 + 1 + 8 and rows[2].peak_cache <= 5 + 1 + 8
    assert rows[0].density == 1.0 and rows[1].edges < rows[0].edges


def test_per_layer_spec_is_expanded_per_layer():
    graph = build_graph("gemma3", 40, 7)
    assert isinstance(graph, list) and len(graph) == 7


def test_command_writes_table_csv_json_and_figure(tmp_path, capsys):
    path, _, tokens = _checkpoint(tmp_path)
    out = tmp_path / "out"
    code = cli.main(
        [
            "perplexity",
            "--checkpoint",
            str(path),
            "--tokens",
            str(tokens),
            "--out",
            str(out),
            "--topology",
            "native",
            "--topology",
            "streaming:num_sinks=1,window=3",
            "--chunk",
            "16",
            "--bucket-size",
            "40",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "cache peak" in printed and "streaming(num_sinks=1, window=3)" in printed
    rows = json.loads((out / "perplexity.json").read_text())
    assert [r["topology"] for r in rows] == ["native", "streaming(num_sinks=1, window=3)"]
    assert rows[0]["peak_cache"] == 90  # the checkpoint's own graph: causal
    with (out / "perplexity.csv").open() as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 2 * 3 and {line["topology"] for line in lines} == {"native", rows[1]["topology"]}
    assert (out / "perplexity.png").stat().st_size > 5000


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--topology", "full"], "causal graph"),
        (["--topology", "nope"], "nope"),
        (["--max-tokens", "1"], "at least 2 tokens"),
        (["--topology", "sliding_window:window=3+topk:num_keys=2"], "fixed before the run"),
    ],
)
def test_command_bad_input(tmp_path, capsys, argv, message):
    path, _, tokens = _checkpoint(tmp_path)
    out = tmp_path / "out"
    code = cli.main(
        ["perplexity", "--checkpoint", str(path), "--tokens", str(tokens), "--out", str(out), "--no-progress", *argv]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (out / "perplexity.json").exists()


def test_command_refuses_text_without_tokenizer_and_missing_files(tmp_path, capsys):
    path, _, _ = _checkpoint(tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    assert cli.main(["perplexity", "--checkpoint", str(path), "--text", str(text), "--out", str(tmp_path / "o")]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "perplexity",
                "--checkpoint",
                str(tmp_path / "none.pt"),
                "--tokens",
                str(text),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )


def test_stream_ids_and_encoder_refused(tmp_path):
    assert stream_ids([[1, 2], [3]], None).tolist() == [1, 2, 3]
    assert stream_ids([[1, 2], [3]], 2).tolist() == [1, 2]
    with pytest.raises(ValueError, match="at least 2 tokens"):
        stream_ids([[1]], None)
    model = GraphLM(GraphTransformerConfig(vocab_size=5, d_model=8, nhead=2, num_layers=1, backend="pyg"))
    with pytest.raises(ValueError, match="causal graph"):
        run_perplexity(model.eval(), torch.tensor([1, 2, 3]), ["full"], num_layers=1)
    assert topology.causal(3).size(1) == 6


def test_command_on_a_saved_hugging_face_decoder(tmp_path, capsys):
    # a Mistral with a window of 4 keys: its native graph is that window in every layer
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    reference = transformers.MistralForCausalLM(config).eval()
    reference.save_pretrained(tmp_path / "mistral")
    ids = torch.randint(0, 40, (50,))
    tokens = tmp_path / "ids.txt"
    tokens.write_text(" ".join(map(str, ids.tolist())))
    out = tmp_path / "out"
    code = cli.main(
        [
            "perplexity",
            "--hf-dir",
            str(tmp_path / "mistral"),
            "--tokens",
            str(tokens),
            "--out",
            str(out),
            "--topology",
            "native",
            "--topology",
            "causal",
            "--chunk",
            "8",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = json.loads((out / "perplexity.json").read_text())
    with torch.no_grad():
        logp = torch.log_softmax(reference(ids.view(1, -1)).logits[0].double(), -1)
    nll = float(-logp[:-1].gather(1, ids[1:].view(-1, 1)).mean())
    assert rows[0]["topology"] == "native" and math.isclose(rows[0]["nll"], nll, rel_tol=1e-5)
    assert rows[0]["peak_cache"] <= 3 + 1 + 8 and rows[1]["peak_cache"] == 50
    assert "mistral" in capsys.readouterr().out


# ---------------------------------------------------------------- a 'train --task lm' run's model
def test_run_model_is_the_graph_lm_on_every_kind_of_graph():
    from gnn_transformer.experiments.lm import as_graph_lm
    from gnn_transformer.experiments.models import EncoderConfig, SequenceModel

    ids, pos = torch.randint(0, 11, (14,)), torch.arange(14)
    heads = topology.dilated_per_head(14, 2, [1, 2], causal=True)  # a per-head graph (2 heads)
    graphs = {
        "causal": topology.causal(14),
        "per_head": heads,
        "per_layer": [topology.sliding_window(14, 2, causal=True), topology.causal(14)],
    }
    for position in ("learned", "rope", "none", "sinusoidal"):
        for bias, tie, norm_first in ((False, True, True), (True, False, True), (True, False, False)):
            config = EncoderConfig(
                d_model=16,
                nhead=2,
                num_layers=2,
                dim_feedforward=24,
                position=position,
                max_positions=20,
                bias=bias,
                tie_embeddings=tie,
                norm_first=norm_first,
                backend="pyg",
            )
            run_model = SequenceModel(11, 11, config).double().eval()
            lm = as_graph_lm(run_model)
            assert isinstance(lm, GraphLM) == (not bias) and not lm.training
            assert lm.embed.weight.dtype == torch.float64
            # sinusoidal positions: the run's model adds them in float32, the library's in float64
            tol = dict(atol=1e-5, rtol=1e-5) if position == "sinusoidal" else dict(atol=1e-10, rtol=1e-10)
            for name, graph in graphs.items():
                with torch.no_grad():
                    expected = run_model(ids, pos, graph)
                    got = (
                        lm(ids, graph[0], pos=pos, edge_head=graph[1])
                        if name == "per_head"
                        else lm(ids, graph, pos=pos)
                    )
                torch.testing.assert_close(got, expected, **tol)


def test_run_model_of_another_task_is_refused():
    from gnn_transformer.experiments.lm import as_graph_lm
    from gnn_transformer.experiments.models import EncoderConfig, SequenceModel

    with pytest.raises(ValueError, match="predict tokens of its vocabulary.*11 tokens in and 3 classes"):
        as_graph_lm(SequenceModel(11, 3, EncoderConfig(d_model=8, nhead=2)))
    with pytest.raises(ValueError, match="'model'.*SequenceModel.*Linear"):
        as_graph_lm(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- positions="context"
def _fresh_passes(model, ids, graph):
    """Reference of positions="context": for each token, its context from the edge list (any layer,
    any head) and a forward pass over it with the edges among it, at positions 0 .. k - 1."""
    layers = graph if isinstance(graph, list) else [graph]
    edges = []
    for g in layers:
        edge_index, head = g if isinstance(g, tuple) else (g, None)
        pairs = edge_index.as_subclass(torch.Tensor).t().tolist()
        edges.append([(j, i, None if head is None else int(head[e])) for e, (j, i) in enumerate(pairs)])
    nll = []
    for t in range(ids.numel() - 1):
        context = sorted({j for layer in edges for j, i, _ in layer if i == t} | {t})
        local = {node: k for k, node in enumerate(context)}
        local_graphs = []
        for layer in edges:
            kept = sorted(
                ((local[j], local[i], h) for j, i, h in layer if j in local and i in local), key=lambda e: (e[1], e[0])
            )
            edge_index = torch.tensor([[j for j, _, _ in kept], [i for _, i, _ in kept]], dtype=torch.long)
            heads = [h for _, _, h in kept]
            local_graphs.append(edge_index if heads[0] is None else (edge_index, torch.tensor(heads)))
        graph_t = local_graphs[0] if not isinstance(graph, list) else local_graphs
        x, pos = ids[context], torch.arange(len(context))
        with torch.no_grad():
            if isinstance(graph_t, tuple):
                logits = model(x, graph_t[0], pos=pos, edge_head=graph_t[1])
            else:
                logits = model(x, graph_t, pos=pos)
        nll.append(-torch.log_softmax(logits[-1].double(), -1)[ids[t + 1]])
    return torch.stack(nll)


@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
def test_context_positions_on_the_causal_graph_equal_the_stream(position):
    torch.manual_seed(0)
    lm = (
        GraphLM(
            GraphTransformerConfig(
                vocab_size=13, d_model=16, nhead=2, num_layers=2, position=position, max_positions=64, backend="pyg"
            )
        )
        .double()
        .eval()
    )
    ids = torch.randint(0, 13, (40,))
    absolute, context = [
        run_perplexity(lm, ids, ["causal"], num_layers=2, chunk=chunk, positions=positions)[0]
        for positions, chunk in (("absolute", 8), ("context", 50))
    ]
    assert math.isclose(absolute.nll, context.nll, rel_tol=1e-12)
    assert [b["nll"] for b in absolute.buckets] == pytest.approx([b["nll"] for b in context.buckets], rel=1e-10)
    assert context.positions == "context" and context.peak_cache == 39  # the last predicting token reads 39


@pytest.mark.parametrize(
    "spec",
    [
        "streaming:num_sinks=2,window=4",
        "sliding_window:window=3,causal=true",
        "dilated_per_head:window=2,dilations=1;3,causal=true",
        "per_layer",
    ],
)
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_context_positions_equal_a_fresh_pass_per_token(spec, chunk):
    from gnn_transformer.experiments.perplexity import context_perplexity

    torch.manual_seed(0)
    lm = (
        GraphLM(
            GraphTransformerConfig(
                vocab_size=13, d_model=16, nhead=2, num_layers=2, position="learned", max_positions=16, backend="pyg"
            )
        )
        .double()
        .eval()
    )
    ids = torch.randint(0, 13, (30,))
    if spec == "per_layer":  # a window in one layer, the sinks in the other
        graph = [topology.sliding_window(30, 2, causal=True), topology.streaming(30, 2, 1)]
    else:
        graph = build_graph(spec, 30, 2)
    result = context_perplexity(lm, ids, graph, chunk=chunk, bucket_size=10)
    torch.testing.assert_close(result.nll, _fresh_passes(lm, ids, graph), atol=1e-10, rtol=1e-10)
    assert math.isclose(result.perplexity, math.exp(float(result.nll.mean())), rel_tol=1e-12)
    assert [b["tokens"] for b in result.buckets] == [10, 10, 9]


def test_positions_beyond_the_table_are_refused():
    lm = GraphLM(
        GraphTransformerConfig(
            vocab_size=13, d_model=8, nhead=2, num_layers=1, position="learned", max_positions=16, backend="pyg"
        )
    ).eval()
    ids = torch.randint(0, 13, (40,))
    with pytest.raises(ValueError, match="'positions' to be 'context'.*16 learned positions.*40 tokens"):
        run_perplexity(lm, ids, ["sliding_window:window=3,causal=true"], num_layers=1, max_positions=16)
    with pytest.raises(
        ValueError, match="at most 16 tokens.*'streaming:num_sinks=4,window=12', whose token 16 reads 17"
    ):  # the first token with a full context
        run_perplexity(
            lm, ids, ["streaming:num_sinks=4,window=12"], num_layers=1, positions="context", max_positions=16
        )
    with pytest.raises(ValueError, match="'causal', whose token 38 reads 39"):
        run_perplexity(
            lm, ids, ["streaming:num_sinks=4,window=11", "causal"], num_layers=1, positions="context", max_positions=16
        )
    with pytest.raises(ValueError, match="'positions' to be one of"):
        run_perplexity(lm, ids, ["causal"], num_layers=1, positions="cache")
    with pytest.raises(ValueError, match="causal graph.*edge 1 -> 0"):
        run_perplexity(lm, ids, ["full"], num_layers=1, positions="context")
    row = run_perplexity(
        lm, ids, ["streaming:num_sinks=4,window=11"], num_layers=1, positions="context", max_positions=16
    )[0]
    assert row.peak_cache == 16 and math.isfinite(row.perplexity)


def test_stream_ids_start():
    assert stream_ids([[1, 2], [3, 4]], 2, start=1).tolist() == [2, 3]
    with pytest.raises(ValueError, match="'start'.*-1"):
        stream_ids([[1, 2]], None, start=-1)


# ---------------------------------------------------------------- the command on a 'train --task lm' run
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 6


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_run")
    text = root / "text.txt"
    text.write_text(TEXT)
    run = root / "run"
    assert (
        cli.main(
            [
                "train",
                "--task",
                "lm",
                "--text",
                str(text),
                "--context",
                "16",
                "--position",
                "learned",
                "--steps",
                "3",
                "--batch-size",
                "2",
                "--d-model",
                "16",
                "--ff",
                "32",
                "--heads",
                "2",
                "--layers",
                "2",
                "--backend",
                "pyg",
                "--warmup",
                "1",
                "--sample-chars",
                "0",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    return text, run


def test_command_on_a_train_lm_run_equals_its_own_model(lm_run, tmp_path, capsys):
    from gnn_transformer.experiments.lm import TextConfig, load_corpus
    from gnn_transformer.experiments.models import EncoderConfig, SequenceModel

    text, run = lm_run
    out = tmp_path / "out"
    code = cli.main(
        [
            "perplexity",
            "--checkpoint",
            str(run / "model.pt"),
            "--text",
            str(text),
            "--start",
            "100",
            "--max-tokens",
            "60",
            "--positions",
            "context",
            "--chunk",
            "100",
            "--bucket-size",
            "30",
            "--topology",
            "streaming:num_sinks=2,window=5",
            "--topology",
            "native",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "lm model (model.pt)" in printed and "trained on sequences of 16 tokens" in printed
    rows = json.loads((out / "perplexity.json").read_text())
    assert [r["positions"] for r in rows] == ["context", "context"]
    # the run's own model (SequenceModel), one window per token, the run's vocabulary
    payload = torch.load(run / "model.pt", weights_only=True)
    corpus = load_corpus(TextConfig(text=str(text), context=16))
    model = SequenceModel(corpus.vocab_size, corpus.vocab_size, EncoderConfig(**payload["meta"]["run"]["model"])).eval()
    model.load_state_dict(payload["model"])
    ids = corpus.encode(TEXT[100:160])
    nll = []
    for t in range(59):
        context = sorted(set(range(min(2, t + 1))) | set(range(max(0, t - 5), t + 1)))
        with torch.no_grad():
            logits = model(ids[context], torch.arange(len(context)), topology.causal(len(context)))
        nll.append(float(-torch.log_softmax(logits[-1].double(), -1)[ids[t + 1]]))
    assert math.isclose(rows[0]["nll"], sum(nll) / len(nll), rel_tol=1e-5)
    assert rows[0]["peak_cache"] == 8 and rows[1]["peak_cache"] == 60 - 1  # native: the run's causal graph


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-tokens", "300"], "--positions: Expected 'positions' to be 'context'.*256 learned positions"),
        (["--positions", "context", "--max-tokens", "300", "--topology", "causal"], "'causal', whose token 298 reads"),
        (["--text", "ÉTRANGE"], "'--text'.*'É' \\(U\\+00C9\\) at character 0"),
    ],
)
def test_command_on_a_train_lm_run_refuses_bad_input(lm_run, tmp_path, capsys, argv, message):
    text, run = lm_run
    if argv[0] == "--text":
        other = tmp_path / "other.txt"
        other.write_text(argv[1])
        argv = ["--text", str(other)]
    else:
        argv = ["--text", str(text), *argv]
    out = tmp_path / "out"
    code = cli.main(["perplexity", "--checkpoint", str(run / "model.pt"), "--out", str(out), "--no-progress", *argv])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (out / "perplexity.json").exists()


def test_command_needs_the_text_of_the_run_for_its_vocabulary(lm_run, tmp_path, capsys):
    import shutil

    text, run = lm_run
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    payload = torch.load(moved / "model.pt", weights_only=True)
    assert payload["meta"]["vocab"] == "".join(sorted(set(TEXT)))  # train keeps its vocabulary
    payload["meta"]["run"]["text"]["text"] = str(tmp_path / "gone.txt")
    torch.save(payload, moved / "model.pt")
    argv = [
        "perplexity",
        "--checkpoint",
        str(moved / "model.pt"),
        "--text",
        str(text),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    assert cli.main([*argv, "--max-tokens", "40", "--topology", "causal"]) == 0  # without its text
    del payload["meta"]["vocab"]  # a checkpoint without its vocabulary needs the text it names
    torch.save(payload, moved / "model.pt")
    assert cli.main(argv) == 2
    assert "gone.txt" in capsys.readouterr().err


def test_context_perplexity_checks_its_arguments():
    from gnn_transformer.experiments.perplexity import context_perplexity

    lm = GraphLM(GraphTransformerConfig(vocab_size=5, d_model=8, nhead=2, num_layers=1, backend="pyg")).eval()
    ids = torch.tensor([1, 2, 3, 4])
    for kwargs, message in ((dict(chunk=0), "'chunk'.*>= 1.*0"), (dict(bucket_size=True), "'bucket_size'.*True")):
        with pytest.raises(ValueError, match=message):
            context_perplexity(lm, ids, topology.causal(4), **kwargs)
    with pytest.raises(ValueError, match=r"'ids' to be an integer tensor \[T\].*float32"):
        context_perplexity(lm, torch.ones(4), topology.causal(4))
    with pytest.raises(ValueError, match=r"'ids' to be an integer tensor \[T\].*torch.bool"):
        context_perplexity(lm, ids.bool(), topology.causal(4))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        context_perplexity(lm, ids[:1], topology.causal(1))
    with pytest.raises(ValueError, match="non-empty sequence of them"):
        context_perplexity(lm, ids, [])
    with pytest.raises(
        ValueError, match=r"graph 0 on the 4 tokens of 'ids' \(got an EdgeIndex of sparse size \(3, 3\)\)"
    ):
        context_perplexity(lm, ids, topology.causal(3))
    with pytest.raises(ValueError, match=r"nodes in \[0, 4\).*0\.\.4"):
        context_perplexity(lm, ids, torch.tensor([[0, 1, 4], [0, 1, 4]]))


def test_context_perplexity_takes_layer_graphs_as_a_tuple_or_a_list():
    """One graph per layer, as a tuple or a list, as perplexity takes them (a tuple of two layer
    graphs was read as one (edge_index, edge_head) pair and failed inside)."""
    from gnn_transformer.experiments.perplexity import context_perplexity

    torch.manual_seed(0)
    lm = GraphLM(GraphTransformerConfig(vocab_size=7, d_model=8, nhead=2, num_layers=2, backend="pyg")).eval()
    ids = torch.randint(0, 7, (12,))
    layers = [topology.streaming(12, 1, 2), topology.causal(12)]
    want = context_perplexity(lm, ids, layers, chunk=5).nll
    torch.testing.assert_close(context_perplexity(lm, ids, tuple(layers), chunk=5).nll, want, rtol=0, atol=0)


def test_density_of_a_per_head_graph_is_per_head(tmp_path):
    """A per-head graph's edges are summed over its heads; its density is per head, at most 1."""
    _, model, tokens = _checkpoint(tmp_path)
    ids = torch.tensor([int(t) for t in tokens.read_text().split()])[:40]
    spec = "duo_attention:streaming_heads=1,num_heads=2,num_sinks=2,window=3"
    (row,) = run_perplexity(model, ids, [spec], num_layers=2)
    edge_index, _ = build_graph(spec, 40, 2)
    assert row.edges == edge_index.size(1)
    assert row.density == pytest.approx(edge_index.size(1) / 2 / (40 * 41 / 2)) and row.density <= 1.0
