"""The perplexity run and command (gnn_transformer.experiments.perplexity, cli/perplexity.py)."""
import csv
import dataclasses
import json
import math

import pytest
import torch

from gnn_transformer import GraphLM, GraphTransformerConfig, cli, topology
from gnn_transformer.experiments.perplexity import build_graph, run_perplexity, stream_ids


def _checkpoint(tmp_path, position="rope"):
    torch.manual_seed(0)
    cfg = GraphTransformerConfig(vocab_size=13, d_model=16, nhead=2, num_layers=2, position=position,
                                 backend="pyg")
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
    assert [r.topology for r in rows] == ["causal", "streaming(num_sinks=2, window=7)",
                                          "sliding_window(window=5, causal=True)"]
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
    code = cli.main(["perplexity", "--checkpoint", str(path), "--tokens", str(tokens), "--out", str(out),
                     "--topology", "native", "--topology", "streaming:num_sinks=1,window=3", "--chunk", "16",
                     "--bucket-size", "40", "--no-progress"])
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


@pytest.mark.parametrize("argv, message", [
    (["--topology", "full"], "causal graph"),
    (["--topology", "nope"], "nope"),
    (["--max-tokens", "1"], "at least 2 tokens"),
    (["--topology", "sliding_window:window=3+topk:num_keys=2"], "fixed before the run"),
])
def test_command_bad_input(tmp_path, capsys, argv, message):
    path, _, tokens = _checkpoint(tmp_path)
    out = tmp_path / "out"
    code = cli.main(["perplexity", "--checkpoint", str(path), "--tokens", str(tokens), "--out", str(out),
                     "--no-progress", *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (out / "perplexity.json").exists()


def test_command_refuses_text_without_tokenizer_and_missing_files(tmp_path, capsys):
    path, _, _ = _checkpoint(tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    assert cli.main(["perplexity", "--checkpoint", str(path), "--text", str(text), "--out", str(tmp_path / "o")]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert cli.main(["perplexity", "--checkpoint", str(tmp_path / "none.pt"), "--tokens", str(text),
                     "--out", str(tmp_path / "o")]) == 2


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
    config = transformers.MistralConfig(vocab_size=40, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                        max_position_embeddings=64, attn_implementation="eager")
    reference = transformers.MistralForCausalLM(config).eval()
    reference.save_pretrained(tmp_path / "mistral")
    ids = torch.randint(0, 40, (50,))
    tokens = tmp_path / "ids.txt"
    tokens.write_text(" ".join(map(str, ids.tolist())))
    out = tmp_path / "out"
    code = cli.main(["perplexity", "--hf-dir", str(tmp_path / "mistral"), "--tokens", str(tokens), "--out",
                     str(out), "--topology", "native", "--topology", "causal", "--chunk", "8", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((out / "perplexity.json").read_text())
    with torch.no_grad():
        logp = torch.log_softmax(reference(ids.view(1, -1)).logits[0].double(), -1)
    nll = float(-logp[:-1].gather(1, ids[1:].view(-1, 1)).mean())
    assert rows[0]["topology"] == "native" and math.isclose(rows[0]["nll"], nll, rel_tol=1e-5)
    assert rows[0]["peak_cache"] <= 3 + 1 + 8 and rows[1]["peak_cache"] == 50
    assert "mistral" in capsys.readouterr().out
