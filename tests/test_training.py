import json
import math
from dataclasses import replace

import pytest
import torch

from gnn_transformer.experiments.models import EncoderConfig, NodeModel, PatchModel, SequenceModel
from gnn_transformer.experiments.runs import RunConfig, run_training
from gnn_transformer.experiments.tasks import IGNORE, SequenceBatch, SequenceWorkload, get_task
from gnn_transformer.experiments.topologies import per_length, topology_fn
from gnn_transformer.experiments.training import (
    TrainConfig,
    autocast,
    evaluate,
    load_checkpoint,
    lr_lambda,
    save_checkpoint,
    seed_everything,
    step_memory,
    train,
    write_logs,
)
from gnn_transformer.experiments.verify import model_dense_error, verify_topologies

SMALL = EncoderConfig(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, backend="pyg")


def _recall(spec="full", batch_size=16):
    task = get_task("recall", train_sizes=(3, 5), test_sizes=(6, 8))
    return task, SequenceWorkload(task, per_length(topology_fn(spec)), batch_size, eval_size=32)


def _model(task, config=SMALL, seed=0):
    seed_everything(seed)
    return SequenceModel(task.vocab_size, task.num_classes, config)


@pytest.mark.parametrize("schedule", ["cosine", "inverse_sqrt", "linear", "constant"])
def test_warmup_then_decay(schedule):
    f = lr_lambda(TrainConfig(steps=100, warmup=10, schedule=schedule))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    values = [f(s) for s in range(10, 100)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))  # never increases after warmup
    if schedule != "constant":
        assert values[-1] < 0.5


@pytest.mark.parametrize(
    "bad",
    [
        dict(steps=0),
        dict(optimizer="sgd"),
        dict(schedule="step"),
        dict(label_smoothing=1.0),
        dict(clip_grad=-1.0),
        dict(device="tpu"),
    ],
)
def test_config_errors_name_the_field(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        TrainConfig(**bad)


def test_training_learns_and_logs(tmp_path):
    task, workload = _recall()
    model = _model(task)
    before = evaluate(model, workload, torch.device("cpu"))["acc_test"]
    config = TrainConfig(steps=120, batch_size=16, lr=3e-3, warmup=10, log_every=10, eval_every=60, label_smoothing=0.1)
    result = train(model, workload, config)
    assert result.history[0]["loss"] > result.history[-1]["loss"]
    assert result.final["acc_test"] > max(before, 0.3)
    assert [e["step"] for e in result.evals] == [60, 120]
    assert result.tokens_per_s > 0
    paths = write_logs(result, tmp_path)
    assert [p.name for p in paths] == ["train_log.csv", "train_eval.csv", "train.json"]
    assert (tmp_path / "train_log.csv").read_text().startswith("step,")
    assert json.loads((tmp_path / "train.json").read_text())["final"]["step"] == 120


def test_same_seed_same_weights_and_checkpoint_roundtrip(tmp_path):
    task, workload = _recall()
    config = TrainConfig(steps=5, batch_size=8, warmup=2)
    a, b = _model(task), _model(task)
    train(a, workload, config)
    train(b, workload, config)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    path = save_checkpoint(tmp_path / "m.pt", a, step=5, meta={"task": "recall", "sizes": [3, 5]})
    c = _model(task, seed=1)
    payload = load_checkpoint(path, c)  # weights_only=True inside
    assert payload["step"] == 5 and payload["meta"]["sizes"] == [3, 5]
    for p, q in zip(a.state_dict().values(), c.state_dict().values()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="checkpoint"):
        torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pt")
        load_checkpoint(tmp_path / "bad.pt")


@pytest.mark.parametrize("position", ["rope", "sinusoidal", "learned"])
@pytest.mark.parametrize("spec", ["full", "bigbird:window=1,num_global=1,num_random=1"])
def test_trained_model_matches_dense_reference(position, spec):
    task, workload = _recall(spec)
    model = _model(
        task, EncoderConfig(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, position=position, backend="pyg")
    ).eval()
    batch = workload.eval_sets()["test"][0]
    build = workload.topology
    err = model_dense_error(model, lambda: model(batch.tokens, batch.positions, build(batch.lengths)), batch.lengths)
    assert err < 1e-5


def test_verify_rows_within_tolerance():
    rows = verify_topologies(
        ["full", "causal", "sliding_window:window=2", "random:k=3"], lengths=[7, 12], backends=["pyg"]
    )
    assert len(rows) == 4 and all(r.ok for r in rows)
    assert rows[0].edges == 49 + 144


def test_step_memory_grows_with_edges():
    task, full_w = _recall("full", batch_size=16)
    _, win_w = _recall("sliding_window:window=1", batch_size=16)
    model = _model(task)
    batch = full_w.train_batch(torch.Generator().manual_seed(0))
    m_full = step_memory(model, full_w, batch, torch.device("cpu"))
    m_win = step_memory(model, win_w, batch, torch.device("cpu"))
    assert m_full > m_win > 0


def test_other_models_forward():
    x = torch.randn(5, 3)
    edge_index = torch.tensor([[0, 1, 2, 3, 4, 0], [1, 2, 3, 4, 0, 0]])
    assert NodeModel(3, 4, SMALL, pe_dim=2)(x, edge_index, torch.randn(5, 2)).shape == (5, 4)
    with pytest.raises(ValueError, match="pe"):
        NodeModel(3, 4, SMALL, pe_dim=2)(x, edge_index)
    vit = PatchModel(4, 3, 10, SMALL)
    ei = torch.tensor([[0, 1, 2, 3, 0, 0, 0], [0, 1, 2, 3, 1, 2, 3]])
    ei = torch.cat([ei, ei + 4], dim=1)
    assert vit(torch.randn(2, 3, 4), ei).shape == (2, 10)


@pytest.mark.parametrize(
    "task,topology", [("karate", "graph"), ("shortest_path", "full"), ("digits", "grid"), ("parity", "causal")]
)
def test_run_training_every_kind(tmp_path, task, topology):
    if task == "digits":
        pytest.importorskip("sklearn")
    config = RunConfig(
        task=task,
        topology=topology,
        pe_dim=2,
        virtual_node=task == "karate",
        model=SMALL,
        train=TrainConfig(steps=3, batch_size=4, warmup=1),
        out=str(tmp_path),
    )
    result, model = run_training(config)
    assert 0.0 <= result.final["acc_test"] <= 1.0
    payload = load_checkpoint(tmp_path / "model.pt", model)
    assert payload["meta"]["run"]["task"] == task


@pytest.mark.parametrize("eval_size", [1, 5, 40])
def test_eval_size_sets_the_graphs_of_shortest_path_evaluation(eval_size):
    """``eval_size`` is the number of graphs in each of shortest_path's two evaluation sets."""
    from gnn_transformer.experiments.runs import build

    workload, _ = build(RunConfig(task="shortest_path", topology="full", eval_size=eval_size, model=SMALL))
    sets = workload.eval_sets()
    assert set(sets) == {"test", "longer"}
    for batches in sets.values():
        assert sum(b.data.num_graphs for b in batches) == eval_size


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize(
    "task,topology", [("recall", "full"), ("listops", "full"), ("shortest_path", "full"), ("karate", "graph")]
)
def test_a_model_that_cannot_fit_is_refused_before_it_is_built(task, topology, layers, monkeypatch):
    """The parameter count behind the check (from one and two layers on the meta device) is the
    built model's: a budget of exactly its training bytes on the CPU builds it, one byte less
    refuses it and names the sizes."""
    from gnn_transformer.experiments import runs
    from gnn_transformer.experiments.listops import ListOpsConfig

    config = RunConfig(
        task=task,
        topology=topology,
        model=replace(SMALL, num_layers=layers),
        eval_size=2,
        listops=ListOpsConfig(lengths=(20, 40)),
    )
    _, model = runs.build(config)
    need = 16 * sum(p.numel() for p in model.parameters())  # weights, gradients, two AdamW moments
    monkeypatch.setattr(runs, "host_memory_budget", lambda: need)
    _, again = runs.build(config)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)  # seeded as before the check
    monkeypatch.setattr(runs, "host_memory_budget", lambda: need - 1)
    with pytest.raises(ValueError, match=rf"Expected .*'num_layers' \({layers}\).* of a model that fits"):
        runs.build(config)


def test_the_batch_check_counts_the_longest_training_example(monkeypatch):
    """The training batch check sits exactly at batch_size x longest training example x (ids,
    targets, positions and each layer's float32 input): at that budget the run builds, a byte
    less refuses it (parity trains on lengths up to 12 here)."""
    from gnn_transformer.experiments import runs, tasks

    config = RunConfig(
        task="parity", topology="causal", model=SMALL, eval_size=1, train_sizes=(4, 12), test_sizes=(13, 16)
    )
    batch = config.train.batch_size * 12 * (24 + 4 * SMALL.d_model * SMALL.num_layers)
    monkeypatch.setattr(runs, "host_memory_budget", lambda: 1e18)  # the model check passes
    monkeypatch.setattr(tasks, "host_memory_budget", lambda: batch)
    runs.build(config)
    monkeypatch.setattr(tasks, "host_memory_budget", lambda: batch - 1)
    with pytest.raises(ValueError, match=r"Expected 'batch_size' small enough .* up to 12 tokens"):
        runs.build(config)


def test_a_gpu_run_checks_only_the_weights_built_on_the_host(monkeypatch):
    """A GPU run builds its weights on the host and keeps gradients and optimizer state on the
    GPU: the host check counts 4 bytes a parameter (nothing reaches a GPU here: the model is only
    built)."""
    from gnn_transformer.experiments import runs

    config = RunConfig(task="recall", topology="full", model=SMALL, eval_size=2, train=TrainConfig(device="cuda"))
    _, model = runs.build(replace(config, train=TrainConfig()))
    weights = 4 * sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(runs, "host_memory_budget", lambda: weights)
    assert next(runs.build(config)[1].parameters()).device.type == "cpu"
    monkeypatch.setattr(runs, "host_memory_budget", lambda: weights - 1)
    with pytest.raises(ValueError, match=r"fits in half of this machine's memory.*parameters: about [0-9.e+-]+ GiB\)$"):
        runs.build(config)


def test_run_training_rejects_bad_topology():
    with pytest.raises(ValueError, match="topology"):
        run_training(RunConfig(task="karate", topology="sliding_window:window=1"))


def test_cosine_decays_to_min_lr():
    f = lr_lambda(TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4))
    assert f(9) == pytest.approx(1.0) and f(99) == pytest.approx(0.1)
    assert min(f(s) for s in range(100)) >= 0.1 - 1e-12


@pytest.mark.parametrize(
    "bad",
    [dict(min_lr=2.0), dict(grad_accum=0), dict(precision="fp16"), dict(checkpoint_every=-1), dict(stop_after=2000)],
)
def test_new_config_errors_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**bad)


class _Queue:
    """A workload whose training batches are given in advance."""

    def __init__(self, base, batches):
        self.base, self.batches = base, list(batches)

    def train_batch(self, generator):
        return self.batches.pop(0)

    def __getattr__(self, name):
        return getattr(self.base, name)


@pytest.mark.parametrize("sizes", [(6, 6), (2, 14)], ids=["equal", "unequal"])
def test_gradient_accumulation_equals_the_larger_batch(sizes):
    """Two micro-batches of 8 sequences give the gradient, the logged loss and the gradient norm of
    one batch of their 16, also when the micro-batches hold different numbers of labels (sequences
    of 2 to 14 labels each), where a mean of the micro-batches' means would weigh their labels
    unalike. (The weights after an AdamW step are not compared: its update divides by the
    gradient's magnitude and so magnifies rounding in gradients near zero.)"""
    task = get_task("parity", train_sizes=sizes, test_sizes=(15, 15))
    base = SequenceWorkload(task, per_length(topology_fn("causal")), 8, eval_size=8)
    micro = [base.train_batch(torch.Generator().manual_seed(seed)) for seed in (3, 4)]
    a, b = micro
    whole = SequenceBatch(
        torch.cat([a.tokens, b.tokens]),
        torch.cat([a.targets, b.targets]),
        torch.cat([a.positions, b.positions]),
        a.lengths + b.lengths,
    )
    if sizes[0] != sizes[1]:
        assert int((a.targets != IGNORE).sum()) != int((b.targets != IGNORE).sum())
    rows, grads = [], []
    for batches, accum in (([whole], 1), (micro, 2)):
        model = _model(task)
        config = TrainConfig(steps=1, batch_size=8, grad_accum=accum, warmup=1)
        rows.append(train(model, _Queue(base, batches), config).history[-1])
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-6)
    assert rows[1]["grad_norm"] == pytest.approx(rows[0]["grad_norm"], rel=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-7, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["pyg", "fused", "tiled"])
def test_bf16_autocast_trains_close_to_fp32(backend):
    task, workload = _recall()
    config = EncoderConfig(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, backend=backend)
    batch = workload.eval_sets()["test"][0]
    model = _model(task, config)
    with autocast(torch.device("cpu"), "bf16"):
        logits, _ = workload.logits(model, batch, torch.device("cpu"))
    assert logits.dtype == torch.bfloat16
    losses = {}
    for precision in ("fp32", "bf16"):
        result = train(
            _model(task, config), workload, TrainConfig(steps=3, batch_size=8, warmup=1, precision=precision)
        )
        losses[precision] = result.history[-1]["loss"]
        assert math.isfinite(result.final["loss_test"])
    assert losses["bf16"] != losses["fp32"]  # autocast was on
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=5e-2)


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one():
    task = get_task("parity", train_sizes=(6, 6), test_sizes=(7, 7))  # two shapes: two compilations
    workload = SequenceWorkload(task, per_length(topology_fn("causal")), 8, eval_size=8)
    results = [
        train(_model(task), workload, TrainConfig(steps=2, batch_size=8, warmup=1, compile=flag))
        for flag in (False, True)
    ]
    torch.testing.assert_close(results[1].history[-1]["loss"], results[0].history[-1]["loss"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["node", "patch"])
def test_node_and_patch_models_honour_bias_and_gpt_init(kind):
    """``--no-bias`` and ``--gpt-init`` reach the graph and vision models as they reach the
    sequence models: no bias anywhere in the model, and GPT-2's normal(0, 0.02) weights."""
    from gnn_transformer.experiments.models import EncoderConfig, NodeModel, PatchModel

    def build(**options):
        config = EncoderConfig(d_model=16, nhead=2, num_layers=2, dim_feedforward=32, **options)
        torch.manual_seed(0)
        return NodeModel(5, 3, config, pe_dim=2) if kind == "node" else PatchModel(4, 9, 3, config)

    assert not [n for n, _ in build(bias=False).named_parameters() if n.endswith("bias") and "norm" not in n]
    assert any(n.endswith("bias") and "norm" not in n for n, _ in build().named_parameters())
    plain, gpt = build(), build(gpt_init=True)
    assert abs(float(gpt.head.weight.std()) - 0.02) < 0.01 and float(plain.head.weight.std()) > 0.05
    assert float(gpt.embed.bias.abs().max()) == 0.0


def test_linear_decays_to_min_lr():
    f = lr_lambda(TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4, schedule="linear"))
    assert f(9) == pytest.approx(1.0) and f(99) == pytest.approx(0.1)
    assert min(f(s) for s in range(100)) >= 0.1 - 1e-12


def test_gradients_are_clipped_before_the_optimizer_step():
    """With eps=1 the first Adam step moves each weight by about lr * grad: a gradient clipped to
    a norm of 1e-6 before the step moves the weights by at most lr * 1e-6 in all."""
    task, workload = _recall()
    model = _model(task)
    before = [p.detach().clone() for p in model.parameters()]
    config = TrainConfig(
        steps=1, batch_size=8, lr=1e-3, warmup=0, schedule="constant", eps=1.0, weight_decay=0.0, clip_grad=1e-6
    )
    train(model, workload, config)
    moved = torch.stack([(p.detach() - q).norm() for p, q in zip(model.parameters(), before)]).norm()
    assert 0 < float(moved) <= 1e-3 * 1e-6 * 1.01


def test_optimizer_takes_betas_eps_and_decays_only_matrices():
    from gnn_transformer.experiments.training import make_optimizer

    task = get_task("recall", train_sizes=(3, 5), test_sizes=(6, 8))
    model = _model(task)
    opt = make_optimizer(model, TrainConfig(betas=(0.5, 0.6), eps=1e-3, weight_decay=0.2))
    assert all(g["betas"] == (0.5, 0.6) and g["eps"] == 1e-3 for g in opt.param_groups)
    dims = {(p.dim() >= 2, g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert dims == {(True, 0.2), (False, 0.0)}  # biases and norms: no weight decay


def test_gradient_accumulation_counts_only_labelled_positions():
    """Recall labels only its queries (the memory positions are IGNORE): two micro-batches give
    the loss and gradients of their union, the mean over labels, not over positions."""
    task, base = _recall()
    micro = [base.train_batch(torch.Generator().manual_seed(seed)) for seed in (3, 4)]
    a, b = micro
    assert bool((a.targets == IGNORE).any())
    whole = SequenceBatch(
        torch.cat([a.tokens, b.tokens]),
        torch.cat([a.targets, b.targets]),
        torch.cat([a.positions, b.positions]),
        a.lengths + b.lengths,
    )
    rows, grads = [], []
    for batches, accum in (([whole], 1), (micro, 2)):
        model = _model(task)
        config = TrainConfig(steps=1, batch_size=16, grad_accum=accum, warmup=1)
        rows.append(train(model, _Queue(base, batches), config).history[-1])
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-4, msg=name)


def test_best_is_the_highest_accuracy_of_the_evaluations():
    task, workload = _recall()
    model = _model(task)
    config = TrainConfig(steps=40, batch_size=16, lr=3e-3, warmup=5, eval_every=4)
    result = train(model, workload, config)
    accs = [e["acc_test"] for e in result.evals]
    assert len(set(accs)) > 1  # the evaluations differ, so the choice matters
    assert result.best["acc_test"] == max(accs)
    assert result.best["step"] == result.evals[accs.index(max(accs))]["step"]  # the first of the best


def test_the_best_evaluation_is_the_lowest_under_min_and_the_highest_under_max():
    """``monitor`` picks best.pt: the language model's validation loss is best lowest ("min"), an
    accuracy highest ("max"); the first evaluation is always the best so far, ties keep the older."""
    from gnn_transformer.experiments.training import _better

    assert _better(1.0, None, "min") and _better(1.0, None, "max")
    assert _better(0.5, 1.0, "min") and not _better(1.5, 1.0, "min") and not _better(1.0, 1.0, "min")
    assert _better(1.5, 1.0, "max") and not _better(0.5, 1.0, "max") and not _better(1.0, 1.0, "max")
