"""The examples run (in-process, with tiny settings where they train) and say what they claim."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_has_usage_and_main():
    for path in EXAMPLES.glob("*.py"):
        text = path.read_text()
        assert "Usage:" in text and 'if __name__ == "__main__":' in text, path.name


def test_message_passing(capsys):
    errors = _load("message_passing").main()
    assert all(err < 1e-5 for err in errors.values())
    assert "0 -> 3" in capsys.readouterr().out


def test_sparse_topologies():
    result = _load("sparse_topologies").main(["--steps", "3", "--eval-size", "8"])
    assert len(result.results) == 4
    assert all(r.max_dense_error < 1e-4 for r in result.results)


def test_graph_transformer():
    accuracy = _load("graph_transformer").main(["--steps", "3", "--virtual-node"])
    assert set(accuracy) == {"graph", "full"}


def test_vit_digits():
    pytest.importorskip("sklearn")
    accuracy = _load("vit_digits").main(["--steps", "3"])
    assert set(accuracy) == {"grid", "full"}


def test_bert_sparse():
    pytest.importorskip("transformers")
    drift = _load("bert_sparse").main()
    assert drift["full"] < 1e-4  # full attention reproduces Hugging Face
    assert drift["window 1"] > drift["full"]


def test_gpt_generation():
    out = _load("gpt_generation").main(["--steps", "150"])
    assert out["same"]  # the key/value cache gives the tokens of a full recompute
    assert out["tokens"].tolist()[0][:6] == [3, 4, 5, 6, 7, 8]  # it learned to count


def test_per_head_graphs(capsys, tmp_path):
    errors = _load("per_head_graphs").main(["--n", "20", "--picture", str(tmp_path / "heads.png")])
    assert errors["duo_attention"] < 1e-10 and errors["topk"] < 1e-10
    assert (tmp_path / "heads.png").is_file()
    assert "edges per head [210, 119, 210, 119]" in capsys.readouterr().out
