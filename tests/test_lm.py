"""Character-level language modelling: the corpus, the causal graphs, the workload, sampling, and
``train --task lm`` / ``compare --task lm`` with their bad inputs."""

import json
import math

import pytest
import torch

from gnn_transformer.cli import main
from gnn_transformer.experiments.lm import (
    LMWorkload,
    TextConfig,
    causal_part,
    generate,
    load_corpus,
    read_text,
    stdlib_files,
    stdlib_text,
)
from gnn_transformer.experiments.models import EncoderConfig, SequenceModel
from gnn_transformer.experiments.runs import RunConfig, run_training
from gnn_transformer.experiments.topologies import topology_fn
from gnn_transformer.experiments.training import TrainConfig
from gnn_transformer.topology import causal, intersection, to_dense_mask

TEXT = "".join(f"{w} the cat sat on the mat and the dog ran to the log.\n" for w in ("one", "two", "six") * 40)
TINY = EncoderConfig(d_model=32, nhead=2, num_layers=2, dim_feedforward=64, backend="pyg")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def test_corpus_split_and_vocabulary(text_file):
    corpus = load_corpus(TextConfig(text=str(text_file), context=8))
    cut = int(len(TEXT) * 0.9)
    assert corpus.decode(corpus.train) == TEXT[:cut] and corpus.decode(corpus.val) == TEXT[cut:]
    assert corpus.chars == "".join(sorted(set(TEXT)))


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "does not exist"),
        (b"", "empty"),
        (b"  \n", "empty"),
        (b"ab\x00cd" * 50, "binary"),
        (b"\xff\xfe" * 100, "UTF-8"),
    ],
)
def test_bad_text_files_name_the_argument(tmp_path, content, match):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=f"'text'.*{match}"):
        read_text(path)


def test_too_short_text_and_too_long_context(tmp_path, text_file):
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij")  # a validation part of 1 character
    with pytest.raises(ValueError, match="'text'.*validation part"):
        load_corpus(TextConfig(text=str(short), context=2))
    val = len(TEXT) - int(len(TEXT) * 0.9)
    with pytest.raises(ValueError, match=f"'context'.*context={val}, a validation part of {val} characters"):
        load_corpus(TextConfig(text=str(text_file), context=val))
    load_corpus(TextConfig(text=str(text_file), context=val - 1))


def test_stdlib_corpus_is_split_by_file_and_capped():
    files = stdlib_files()
    assert files and all(f.suffix == ".py" for f in files) and files == sorted(files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    train, val = stdlib_text(50_000)
    assert len(train) == 50_000 and len(val) == 5_000
    assert (train, val) == stdlib_text(50_000)  # deterministic
    first_val = files[9].read_text(encoding="utf-8")
    assert val.startswith(first_val[:200])  # every tenth file, whole files


@pytest.mark.parametrize(
    "spec",
    [
        "full",
        "sliding_window:window=2",
        "bigbird:window=1,num_global=1,num_random=1",
        "dilated_per_head:window=1,dilations=1;2",
    ],
)
def test_causal_part_is_the_intersection_with_causal(spec):
    n = 9
    graph = topology_fn(spec)([n])
    got = causal_part(graph)
    if isinstance(graph, tuple):  # per head: each head's graph, intersected
        for h in range(2):
            want = intersection(graph[0][:, graph[1] == h], causal(n))
            assert torch.equal(to_dense_mask(got[0][:, got[1] == h], n, n), to_dense_mask(want, n, n))
    else:
        assert torch.equal(to_dense_mask(got, n, n), to_dense_mask(intersection(graph, causal(n)), n, n))


def test_workload_targets_are_the_next_characters(text_file):
    corpus = load_corpus(TextConfig(text=str(text_file), context=8))
    w = LMWorkload(corpus, topology_fn("full"), 8, batch_size=5, eval_size=1000)
    batch = w.train_batch(torch.Generator().manual_seed(0))
    tokens, targets = batch.tokens.view(5, 8), batch.targets.view(5, 8)
    assert torch.equal(tokens[:, 1:], targets[:, :-1]) and batch.lengths == [8] * 5
    windows = torch.cat([b.tokens for b in w.eval_sets()["val"]])
    assert windows.numel() == (corpus.val.numel() - 1) // 8 * 8  # every non-overlapping window
    edges = w.edge_index(batch)
    assert bool((edges[0] <= edges[1]).all())  # "full" made causal


@pytest.mark.parametrize("eval_size", [1, 7, 8, 11, 12, 100])
def test_validation_windows_spread_over_the_whole_part(eval_size):
    """12 windows fit in the validation part: eval_size of them are taken evenly spaced over all
    of it, without overlap (7 of 12 were the first 7: the stride 12 // 7 was 1)."""
    from gnn_transformer.experiments.lm import CharCorpus

    context, available = 8, 12
    text = "".join(chr(0x4E00 + i) for i in range(1000 + available * context + 1))
    ids = torch.arange(len(text))
    corpus = CharCorpus(text, ids[:1000], ids[1000:], "x")
    w = LMWorkload(corpus, topology_fn("full"), context, eval_size=eval_size)
    windows = torch.cat([b.tokens for b in w.eval_sets()["val"]]).view(-1, context)
    first = (windows[:, 0] - 1000).tolist()  # where each window starts in the validation part
    count = min(eval_size, available)
    assert w.eval_windows == count and len(first) == count
    assert first == sorted(set(first)) and all(s % context == 0 for s in first)  # whole, disjoint windows
    assert first == [k * available // count * context for k in range(count)]
    assert first[-1] // context >= available + available // -count  # within one stride of the end


def test_a_model_cannot_see_the_future(text_file):
    """Changing a later character leaves the logits of every earlier position unchanged."""
    corpus = load_corpus(TextConfig(text=str(text_file), context=8))
    w = LMWorkload(corpus, topology_fn("bigbird:window=1,num_global=1,num_random=2"), 8)
    model = SequenceModel(corpus.vocab_size, corpus.vocab_size, TINY).eval()
    x = corpus.train[:8].clone()
    graph = w.topology([8])
    a = model(x, torch.arange(8), graph)
    x[5] = (x[5] + 1) % corpus.vocab_size
    b = model(x, torch.arange(8), graph)
    torch.testing.assert_close(a[:5], b[:5], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[5:], b[5:])


def test_training_lowers_the_validation_loss_and_samples(text_file):
    config = RunConfig(
        task="lm",
        topology="causal",
        text=TextConfig(text=str(text_file), context=16, sample_chars=20),
        model=TINY,
        train=TrainConfig(steps=60, batch_size=8, lr=3e-3, warmup=5),
        eval_size=16,
    )
    result, model = run_training(config)
    corpus = load_corpus(config.text)
    assert result.final["val_loss"] < 0.75 * math.log(corpus.vocab_size)  # well below a uniform guess
    assert result.final["val_bits_per_char"] == pytest.approx(result.final["val_loss"] / math.log(2))
    assert result.sample.startswith("\n") and len(result.sample) == 21 and set(result.sample) <= set(corpus.chars)
    w = LMWorkload(corpus, topology_fn("causal"), 16)
    assert generate(model, w, 20, seed=0) == result.sample  # seeded


def test_model_options_bias_tying_and_gpt_init():
    config = EncoderConfig(
        d_model=32, nhead=2, num_layers=3, dim_feedforward=64, bias=False, tie_embeddings=True, gpt_init=True
    )
    model = SequenceModel(50, 50, config)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith("bias") for n in names)
    assert model.head.weight is model.embed.weight
    out_proj = model.encoder.layers[0].self_attn.out_proj.weight
    assert float(out_proj.detach().std()) == pytest.approx(0.02 / math.sqrt(6), rel=0.15)
    assert float(model.embed.weight.detach().std()) == pytest.approx(0.02, rel=0.1)
    with pytest.raises(ValueError, match="tie_embeddings"):
        SequenceModel(50, 10, config)


def test_cli_train_lm_writes_val_loss_and_prints_a_sample(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "--task",
        "lm",
        "--text",
        str(text_file),
        "--context",
        "16",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--d-model",
        "16",
        "--ff",
        "32",
        "--heads",
        "2",
        "--eval-size",
        "8",
        "--sample-chars",
        "12",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "train.json").read_text())
    assert data["final"]["val_loss"] > 0 and "val_bits_per_char" in data["final"]
    assert "nats/char" in printed and "sample:" in printed and data["sample"] in printed


def test_preset_sets_nanogpt_cpu_and_later_options_override(tmp_path, text_file, capsys):
    argv = [
        "train",
        "--task",
        "lm",
        "--text",
        str(text_file),
        "--preset",
        "nanogpt-cpu",
        "--steps",
        "2",
        "--d-model",
        "16",
        "--context",
        "8",
        "--eval-size",
        "4",
        "--sample-chars",
        "0",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert main(argv) == 0
    config = json.loads((tmp_path / "train.json").read_text())["config"]
    train, model = config["train"], config["model"]
    assert train["steps"] == 2 and model["d_model"] == 16  # given after the preset
    # given before it, an option the preset sets would be overwritten: refused
    before = ["train", "--d-model", "32", "--preset", "nanogpt-cpu", "--out", str(tmp_path / "b")]
    with pytest.raises(SystemExit) as exit_info:
        main(before)
    assert exit_info.value.code == 2
    assert "--preset: give it before the options it sets (--d-model came first)" in capsys.readouterr().err
    assert (
        train["batch_size"],
        train["lr"],
        train["min_lr"],
        train["warmup"],
        train["betas"],
        train["weight_decay"],
        train["clip_grad"],
    ) == (12, 1e-3, 1e-4, 100, [0.9, 0.99], 0.1, 1.0)
    assert (model["num_layers"], model["nhead"], model["dropout"], model["bias"]) == (4, 4, 0.0, False)


@pytest.mark.parametrize(
    "make,extra,option",
    [
        (None, [], "--text"),
        (b"", [], "--text"),
        (b"\x00\x01\x02" * 100, [], "--text"),
        (b"abcdefghij", ["--context", "2"], "--text"),
        (TEXT.encode(), ["--context", "2000"], "--context"),
    ],
)
@pytest.mark.parametrize("command", ["train", "compare"])
def test_cli_bad_text_exits_2_and_writes_nothing(tmp_path, capsys, make, extra, option, command):
    path = tmp_path / "t.txt"
    if make is not None:
        path.write_bytes(make)
    out = tmp_path / "out"
    argv = [command, "--task", "lm", "--text", str(path), "--steps", "1", "--out", str(out), "--no-progress", *extra]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"gnn-transformer: error: {option}")
    assert not out.exists()


def test_lm_options_refused_for_other_tasks(capsys):
    assert main(["train", "--task", "recall", "--context", "8"]) == 2
    assert "--context does not apply" in capsys.readouterr().err


def test_compare_runs_generate_no_sample():
    """A comparison keeps no generated text, so its runs generate none (whatever its TextConfig)."""
    from gnn_transformer.experiments.compare import CompareConfig

    config = CompareConfig(task="lm", text=TextConfig(sample_chars=50))
    assert config.run_config(config.specs[0], 0).text.sample_chars == 0


def test_generate_shows_a_progress_bar_when_asked(text_file, capsys):
    corpus = load_corpus(TextConfig(text=str(text_file), context=8))
    w = LMWorkload(corpus, topology_fn("causal"), 8)
    model = SequenceModel(corpus.vocab_size, corpus.vocab_size, TINY)
    assert generate(model, w, 5, seed=0, progress=True) == generate(model, w, 5, seed=0)
    assert "sample" in capsys.readouterr().err


def test_cli_says_when_the_validation_part_holds_fewer_windows_than_eval_size(tmp_path, text_file, capsys):
    """--eval-size beyond the windows of the validation part evaluates on all of them, and says so
    (it was capped without a word); train.json and results.json record the windows used."""
    corpus = load_corpus(TextConfig(text=str(text_file), context=16))
    windows = (corpus.val.numel() - 1) // 16
    common = ["--task", "lm", "--text", str(text_file), "--context", "16", "--steps", "1", "--d-model", "16"]
    common += ["--ff", "32", "--heads", "2", "--no-progress"]
    assert main(["train", *common, "--eval-size", "1000", "--sample-chars", "0", "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert f"over {windows} windows" in printed
    assert f"(--eval-size 1000: the validation part holds only {windows} windows of 16 characters)" in printed
    assert json.loads((tmp_path / "a" / "train.json").read_text())["final"]["val_windows"] == windows
    assert main(["train", *common, "--eval-size", "3", "--sample-chars", "0", "--out", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert "over 3 windows" in printed and "holds only" not in printed
    argv = ["compare", *common, "--topology", "causal", "--eval-size", "1000", "--out", str(tmp_path / "c")]
    assert main(argv) == 0
    assert f"holds only {windows} windows" in capsys.readouterr().out
    rows = json.loads((tmp_path / "c" / "results.json").read_text())["results"]
    assert [r["val_windows"] for r in rows] == [windows]
