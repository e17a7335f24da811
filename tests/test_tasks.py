import networkx as nx
import pytest
import torch

from gnn_transformer.experiments.graph_tasks import (
    KarateWorkload,
    ShortestPathWorkload,
    shortest_path_graph,
    token_graph,
)
from gnn_transformer.experiments.tasks import IGNORE, TASKS, fixed_batches, get_task, sample_batch
from gnn_transformer.experiments.topologies import label, parse_spec, per_length, topology_fn
from gnn_transformer.topology import bigbird, sliding_window, to_dense_mask


def _one(name, n, seed=0):
    return get_task(name).sample(n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("n", [1, 5])
def test_sample_shapes_and_ranges(name, n):
    task = get_task(name, train_sizes=(n, n), test_sizes=(n, n + 1))
    tokens, targets = task.sample(n, torch.Generator().manual_seed(1))
    assert tokens.size(0) == targets.size(0) == task.seq_len(n)
    assert 0 <= int(tokens.min()) and int(tokens.max()) < task.vocab_size
    keep = targets != IGNORE
    assert keep.any()
    assert 0 <= int(targets[keep].min()) and int(targets[keep].max()) < task.num_classes


def test_copy_reverse_sort_targets():
    for name, fn in (("copy", lambda x: x), ("reverse", lambda x: x.flip(0)), ("sort", lambda x: x.sort().values)):
        tokens, targets = _one(name, 6)
        assert torch.equal(targets[7:], fn(tokens[:6]))
        assert (targets[:7] == IGNORE).all()


def test_parity_is_running_xor():
    tokens, targets = _one("parity", 12)
    expected = [sum(tokens[: i + 1].tolist()) % 2 for i in range(12)]
    assert targets.tolist() == expected


def test_addition_digits():
    n = 4
    tokens, targets = _one("addition", n, seed=3)
    a = sum(d * 10**i for i, d in enumerate(tokens[:n].tolist()))
    b = sum(d * 10**i for i, d in enumerate(tokens[n + 1 : 2 * n + 1].tolist()))
    total = sum(d * 10**i for i, d in enumerate(targets[2 * n + 2 :].tolist()))
    assert total == a + b


def test_recall_answers_are_the_stored_values():
    task = get_task("recall")
    n = 7
    tokens, targets = task.sample(n, torch.Generator().manual_seed(0))
    assert tokens.shape == (2 * n, 2)
    store = {int(k): int(v) - 32 for k, v in tokens[:n].tolist()}  # 32 keys by default
    assert len(store) == n  # distinct keys
    for (key, blank), target in zip(tokens[n:].tolist(), targets[n:].tolist()):
        assert blank == task.vocab_size - 1
        assert store[key] == target


def test_get_task_errors():
    with pytest.raises(ValueError, match="Unknown task"):
        get_task("nope")
    with pytest.raises(ValueError, match="train_sizes"):
        get_task("copy", train_sizes=(5, 2))


def test_batches_are_disjoint_unions_and_seeded():
    task = get_task("copy")
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    b1, b2 = sample_batch(task, 8, (2, 6), g1), sample_batch(task, 8, (2, 6), g2)
    assert torch.equal(b1.tokens, b2.tokens) and b1.lengths == b2.lengths
    assert sum(b1.lengths) == b1.num_tokens == b1.positions.numel()
    starts = torch.tensor([0] + b1.lengths).cumsum(0)[:-1]
    assert (b1.positions[starts] == 0).all()
    evals = fixed_batches(task, 300, 128, (2, 6), seed=1)
    assert [len(b.lengths) for b in evals] == [128, 128, 44]


def test_parse_spec_and_label():
    assert parse_spec("random:k=7,seed=2") == ("random", {"k": 7, "seed": 2})
    assert parse_spec("sliding_window:window=2,causal=true")[1] == {"window": 2, "causal": True}
    assert label("full") == "full"
    with pytest.raises(ValueError, match="key=value"):
        parse_spec("random:k")
    with pytest.raises(ValueError, match="Unknown topology"):
        topology_fn("nope")
    with pytest.raises(ValueError, match="Bad arguments"):
        topology_fn("sliding_window:width=2")


@pytest.mark.parametrize(
    "spec,builder",
    [
        ("sliding_window:window=2", lambda L: sliding_window(L, 2)),
        ("bigbird:window=1,num_global=1,num_random=0", lambda L: bigbird(L, window=1, num_global=1, num_random=0)),
    ],
)
def test_per_length_cache_matches_batch_builder(spec, builder):
    lengths = [5, 9, 5, 3]
    cached = per_length(topology_fn(spec))
    got, want = cached(lengths), builder(lengths)
    assert torch.equal(to_dense_mask(got, lengths=lengths), to_dense_mask(want, lengths=lengths))
    assert bool((got[1][1:] >= got[1][:-1]).all())  # sorted by target


def test_karate_workload_masks_and_virtual_node():
    w = KarateWorkload("graph", pe_dim=4, virtual_node=True)
    train, test = w.train_batch(None), w.eval_sets()["test"][0]
    assert train.data.num_nodes == 35 and train.data.pe.shape == (35, 4)
    assert int((train.labels != IGNORE).sum()) == 4
    assert int((test.labels != IGNORE).sum()) == 30
    assert train.labels[-1] == IGNORE and test.labels[-1] == IGNORE  # the virtual node
    edge_index = token_graph(train.data, "graph")
    assert edge_index.size(1) == train.data.edge_index.size(1) + 35  # self-loops added


def test_shortest_path_labels_match_networkx():
    data = shortest_path_graph(12, max_distance=20, seed=4)
    graph = nx.Graph(data.edge_index.t().tolist())
    source = int(data.x[:, 0].argmax())
    dist = nx.single_source_shortest_path_length(graph, source)
    assert data.y.tolist() == [dist[v] for v in range(12)]


def test_shortest_path_full_topology_stays_within_graphs():
    w = ShortestPathWorkload("full", pe_dim=2, batch_size=3, eval_size=4)
    batch = w.train_batch(torch.Generator().manual_seed(0))
    edge_index = token_graph(batch.data, "full")
    sizes = batch.data.ptr[1:] - batch.data.ptr[:-1]
    assert edge_index.size(1) == int((sizes**2).sum())
    assert torch.equal(batch.data.batch[edge_index[0]], batch.data.batch[edge_index[1]])


def test_digits_patches_and_grid_graph():
    pytest.importorskip("sklearn")
    from gnn_transformer.experiments.vision_tasks import DigitsWorkload, image_graph, patchify

    images = torch.arange(2 * 64, dtype=torch.float32).view(2, 8, 8)
    patches = patchify(images, 2)
    assert patches.shape == (2, 16, 4)
    assert patches[0, 1].tolist() == [2.0, 3.0, 10.0, 11.0]
    g = image_graph(4, "grid")
    deg = torch.bincount(g[1], minlength=17)
    assert deg[0] == 17  # CLS sees everything
    assert deg[1] == 4 + 1  # corner patch: 2x2 neighbourhood + CLS
    assert deg[6] == 9 + 1  # inner patch: 3x3 neighbourhood + CLS
    w = DigitsWorkload("grid", batch_size=4)
    assert len(w.train_y) == 1797 - 360


def test_sample_batch_draws_both_ends_of_the_size_range():
    task = get_task("parity", train_sizes=(3, 5), test_sizes=(6, 8))
    batch = sample_batch(task, 200, task.train_sizes, torch.Generator().manual_seed(0))
    assert set(batch.lengths) == {3, 4, 5}


def test_check_longer_refuses_test_sizes_that_start_at_the_longest_training_size():
    from gnn_transformer.experiments.tasks import check_longer

    check_longer(get_task("parity", train_sizes=(3, 5), test_sizes=(6, 8)))
    with pytest.raises(ValueError, match="test_sizes"):
        check_longer(get_task("parity", train_sizes=(3, 5), test_sizes=(5, 8)))
