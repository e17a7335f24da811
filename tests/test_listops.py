"""ListOps (Long Range Arena): expressions, answers, lengths, the classifier, and the commands."""

import json
import pytest
import torch

from gnn_transformer.cli import main
from gnn_transformer.experiments.compare import CompareConfig, run_compare
from gnn_transformer.experiments.listops import (
    CLS,
    END,
    VOCAB,
    ListOpsConfig,
    ListOpsWorkload,
    encode,
    evaluate_expression,
    generate,
    max_length,
)
from gnn_transformer.experiments.models import EncoderConfig, SequenceClassifier
from gnn_transformer.experiments.runs import RunConfig, run_training
from gnn_transformer.experiments.topologies import topology_fn
from gnn_transformer.experiments.training import TrainConfig

TINY = EncoderConfig(d_model=16, nhead=2, num_layers=2, dim_feedforward=32, backend="pyg")


@pytest.mark.parametrize(
    "text,value",
    [
        ("[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]", 5),
        ("[SM 9 8 7 ]", 4),
        ("[MED 1 2 ]", 1),  # median 1.5, rounded down as int(np.median(...)) in the LRA script
        ("[MED 3 8 1 6 ]", 4),  # median of 1 3 6 8: 4.5
        ("[MIN [MAX 1 9 ] [SM 5 5 ] ]", 0),
        ("7", 7),
    ],
)
def test_expression_values(text, value):
    assert evaluate_expression(text.split()) == value


def test_generated_expressions_follow_the_rules():
    config = ListOpsConfig(lengths=(20, 60), max_depth=4, max_args=5)
    for i in range(30):
        tokens, answer = generate(config, i)
        assert 20 <= len(tokens) <= 60 and 0 <= answer < 10
        assert answer == evaluate_expression(tokens)
        depth = deepest = 0
        for tok in tokens:  # nesting within max_depth, 2..max_args arguments per operator
            depth += tok.startswith("[")
            depth -= tok == END
            deepest = max(deepest, depth)
        assert depth == 0 and deepest <= 3  # operators at depths 1..max_depth - 1
        assert set(tokens) <= set(VOCAB) - {CLS}
    assert generate(config, 3) == generate(config, 3) != generate(config, 4)


def test_paper_defaults_and_answers_are_spread():
    config = ListOpsConfig()
    assert (config.lengths, config.max_depth, config.max_args, config.train_examples) == ((500, 2000), 10, 10, 96_000)
    tokens, _ = generate(config, 0)
    assert 500 <= len(tokens) <= 2000
    answers = [generate(ListOpsConfig(lengths=(30, 90)), i)[1] for i in range(200)]
    assert len(set(answers)) == 10 and max(answers.count(a) for a in set(answers)) < 80


def test_max_length():
    assert max_length(1, 10) == 1 and max_length(2, 3) == 5 and max_length(3, 2) == 2 + 2 * 4


@pytest.mark.parametrize(
    "lengths,kwargs",
    [
        ((9, 4), {}),
        ((0, 5), {}),
        ((2, 3), {}),
        ((60, 80), dict(max_depth=3, max_args=3)),
        ((5, 6), dict(max_depth=10, max_args=2)),
    ],
)
def test_impossible_length_ranges_name_the_argument(lengths, kwargs):
    with pytest.raises(ValueError, match="'lengths'"):
        generate(ListOpsConfig(lengths=lengths, **kwargs), 0)


def test_workload_batches_and_pooling():
    config = ListOpsConfig(lengths=(10, 30), max_depth=4, max_args=4)
    w = ListOpsWorkload(config, topology_fn("full"), batch_size=3, eval_size=5, seed=1)
    batch = w.train_batch(torch.Generator().manual_seed(0))
    assert batch.targets.shape == (3,) and batch.ptr.tolist()[-1] == batch.num_tokens
    starts = batch.ptr[:-1]
    assert bool((batch.tokens[starts] == VOCAB.index(CLS)).all()) and bool((batch.positions[starts] == 0).all())
    assert sum(len(b.lengths) for b in w.eval_sets()["test"]) == 5
    assert w.example("val", 0)[0].tolist() != w.example("test", 0)[0].tolist()  # disjoint seeds
    for pool in ("cls", "mean"):
        model = SequenceClassifier(len(VOCAB), 10, TINY, pool).eval()
        logits, labels = w.logits(model, batch, "cpu")
        assert logits.shape == (3, 10) and torch.equal(labels, batch.targets)
        one = batch.lengths[0]  # the first sequence alone gives the same logits
        alone = model(batch.tokens[:one], batch.positions[:one], topology_fn("full")([one]), torch.tensor([0, one]))
        torch.testing.assert_close(alone[0], logits[0], atol=1e-5, rtol=1e-5)
    assert encode(["[MIN", "1", "]"], "mean").tolist() == [10, 1, 14]


def test_splits_share_no_expression():
    """At 4-8 tokens expressions repeat often: the test set holds distinct ones, the validation set
    distinct ones none of which is the test set's, and no training expression is one of theirs."""
    config = ListOpsConfig(lengths=(4, 8), max_depth=3, max_args=3)
    w = ListOpsWorkload(config, topology_fn("full"), eval_size=300, seed=2)
    held = {split: [tuple(w.example(split, i)[0].tolist()) for i in range(300)] for split in ("test", "val")}
    assert all(len(set(rows)) == 300 for rows in held.values())
    assert not set(held["test"]) & set(held["val"])
    train = [tuple(w.example("train", i)[0].tolist()) for i in range(3000)]
    assert not set(train) & (set(held["test"]) | set(held["val"]))
    assert len(set(train)) > 100  # the training set is not emptied by it
    for split, rows in held.items():  # what the evaluation batches hold
        batches = w.eval_sets()[split]
        assert sum(len(b.lengths) for b in batches) == 300
    words, answer = generate(config, "listops/2/test/0")
    assert held["test"][0] == tuple(encode(words).tolist())  # the first one of each seed is kept
    assert w.example("test", 0)[1] == answer


def test_too_narrow_lengths_for_distinct_evaluation_sets_are_refused():
    with pytest.raises(ValueError, match="'lengths' \\(1-1\\) to hold enough distinct expressions"):
        ListOpsWorkload(ListOpsConfig(lengths=(1, 1)), topology_fn("full"), eval_size=20)


@pytest.mark.parametrize("lengths", [(1.5, 3.7), ("a", "b"), (True, 4), (4,), 5])
def test_lengths_must_be_two_ints(lengths):
    with pytest.raises(ValueError, match="'lengths' to be a range \\(lo, hi\\) of two ints"):
        ListOpsConfig(lengths=lengths)


def test_classifier_learns_short_expressions():
    config = RunConfig(
        task="listops",
        topology="full",
        model=TINY,
        eval_size=128,
        listops=ListOpsConfig(lengths=(4, 8), max_depth=2, max_args=6),
        train=TrainConfig(steps=100, batch_size=32, lr=3e-3, warmup=10),
    )
    result, _ = run_training(config)
    answers = [generate(config.listops, f"listops/0/test/{i}")[1] for i in range(128)]
    majority = max(answers.count(a) for a in range(10)) / len(answers)
    assert result.final["acc_test"] > majority + 0.03


def test_compare_listops_reports_accuracy_per_topology():
    config = CompareConfig(
        task="listops",
        topologies=("full", "sliding_window:window=2"),
        model=TINY,
        listops=ListOpsConfig(lengths=(4, 12), max_depth=3, max_args=3),
        train=TrainConfig(steps=3, batch_size=8, warmup=1),
        eval_size=16,
    )
    result = run_compare(config)
    assert [r.topology for r in result.results] == ["full", "sliding_window(window=2)"]
    for r in result.results:
        assert r.acc_longer is None and r.val_loss is None and r.max_dense_error < 1e-5
        assert 0.0 <= r.acc_test <= 1.0
    assert result.results[0].edges_per_seq > result.results[1].edges_per_seq


def test_cli_compare_listops_table_and_bad_range(tmp_path, capsys):
    argv = [
        "compare",
        "--task",
        "listops",
        "--listops-lengths",
        "4-10",
        "--listops-depth",
        "3",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--eval-size",
        "8",
        "--d-model",
        "16",
        "--ff",
        "32",
        "--out",
        str(tmp_path),
        "--topology",
        "full",
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "acc (test)" in out and "acc (longer)" not in out
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["acc_longer"] is None
    bad = tmp_path / "bad"
    assert (
        main(
            [
                *argv[:-5],
                "--out",
                str(bad),
                "--listops-lengths",
                "5000-6000",
                "--listops-depth",
                "3",
                "--topology",
                "full",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.startswith("gnn-transformer: error: --listops-lengths")
    assert not bad.exists()


def test_training_batches_hold_no_evaluation_expression():
    """Training batches are drawn from the training split (as many expressions as the test set
    here, so that a batch drawn from the test split would be all test expressions)."""
    config = ListOpsConfig(lengths=(4, 8), max_depth=3, max_args=3, train_examples=300)
    w = ListOpsWorkload(config, topology_fn("full"), batch_size=64, eval_size=300, seed=2)
    held = {tuple(w.example(split, i)[0].tolist()) for split in ("test", "val") for i in range(300)}
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        batch = w.train_batch(g)
        ptr = batch.ptr.tolist()
        rows = {tuple(batch.tokens[a:b].tolist()) for a, b in zip(ptr, ptr[1:])}
        assert not rows & held
