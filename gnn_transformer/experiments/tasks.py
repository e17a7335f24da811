"""Algorithmic sequence tasks with a length-generalization split (train short, test longer).

Every task is posed to an encoder: one token sequence in, one label per position out, with the
label ``IGNORE`` (``-100``, what :class:`torch.nn.CrossEntropyLoss` skips) where there is nothing to
predict. Outputs that depend on the whole input sit at placeholder positions (``BLANK``), so a
query position must *receive* the information it needs along the edges of the token graph: a
topology that cannot route it there in the available layers cannot solve the task.

``n`` is the size of one instance (items to copy, digits to add, key/value pairs to recall); the
sequence length is a function of ``n`` (``Task.seq_len``). A task draws ``n`` uniformly from
``train_sizes`` for training and in-distribution tests, and from ``test_sizes`` (larger) for the
length-generalization test.

Token ids: ``0 .. num_symbols - 1`` are data symbols; the special tokens follow them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..kernels.primitives import device_memory
from .topologies import graph_to

IGNORE = -100


@dataclass(frozen=True)
class SequenceBatch:
    """A batch of variable-length sequences as the nodes of one disjoint-union graph.

    Attributes:
        tokens: token ids ``[N]``, or ``[N, F]`` for tokens with ``F`` fields (embeddings summed),
            sequence after sequence.
        targets: labels ``[N]`` (``IGNORE`` where nothing is predicted).
        positions: position of each token in its sequence ``[N]``.
        lengths: length of each sequence.
    """

    tokens: Tensor
    targets: Tensor
    positions: Tensor
    lengths: list[int]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size(0))

    def to(self, device) -> "SequenceBatch":
        return SequenceBatch(self.tokens.to(device), self.targets.to(device), self.positions.to(device), self.lengths)


Sampler = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Task:
    """An algorithmic task: a sampler of ``(tokens, targets)`` for an instance of size ``n``.

    Attributes:
        name: registry name.
        description: one line for ``--help`` and tables.
        vocab_size: number of input token ids.
        num_classes: number of output labels.
        train_sizes: inclusive range of ``n`` for training and the in-distribution test.
        test_sizes: inclusive range of ``n`` for the longer-length test.
        seq_len: sequence length as a function of ``n``.
        sample: ``(n, generator) -> (tokens [L] or [L, F], targets [L])``.
    """

    name: str
    description: str
    vocab_size: int
    num_classes: int
    train_sizes: tuple[int, int]
    test_sizes: tuple[int, int]
    seq_len: Callable[[int], int] = field(repr=False)
    sample: Sampler = field(repr=False)

    @property
    def max_len(self) -> int:
        return self.seq_len(max(self.train_sizes[1], self.test_sizes[1]))


def _ignore(n: int) -> Tensor:
    return torch.full((n,), IGNORE, dtype=torch.long)


def _const(n: int, value: int) -> Tensor:
    return torch.full((n,), value, dtype=torch.long)


# ---------------------------------------------------------------- the tasks
def copy_task(num_symbols: int = 10, train_sizes=(4, 8), test_sizes=(9, 16)) -> Task:
    """``x_1 .. x_n SEP BLANK^n`` -> the blanks read ``x_1 .. x_n``."""
    sep, blank = num_symbols, num_symbols + 1

    def sample(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, num_symbols, (n,), generator=g)
        tokens = torch.cat([x, _const(1, sep), _const(n, blank)])
        return tokens, torch.cat([_ignore(n + 1), x])

    return Task(
        "copy",
        "copy the sequence into the blanks after SEP",
        num_symbols + 2,
        num_symbols,
        tuple(train_sizes),
        tuple(test_sizes),
        lambda n: 2 * n + 1,
        sample,
    )


def reverse_task(num_symbols: int = 10, train_sizes=(4, 8), test_sizes=(9, 16)) -> Task:
    """``x_1 .. x_n SEP BLANK^n`` -> the blanks read ``x_n .. x_1``."""
    sep, blank = num_symbols, num_symbols + 1

    def sample(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, num_symbols, (n,), generator=g)
        tokens = torch.cat([x, _const(1, sep), _const(n, blank)])
        return tokens, torch.cat([_ignore(n + 1), x.flip(0)])

    return Task(
        "reverse",
        "write the sequence reversed into the blanks after SEP",
        num_symbols + 2,
        num_symbols,
        tuple(train_sizes),
        tuple(test_sizes),
        lambda n: 2 * n + 1,
        sample,
    )


def sort_task(num_symbols: int = 10, train_sizes=(4, 8), test_sizes=(9, 16)) -> Task:
    """``x_1 .. x_n SEP BLANK^n`` -> the blanks read ``sorted(x)``."""
    sep, blank = num_symbols, num_symbols + 1

    def sample(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, num_symbols, (n,), generator=g)
        tokens = torch.cat([x, _const(1, sep), _const(n, blank)])
        return tokens, torch.cat([_ignore(n + 1), x.sort().values])

    return Task(
        "sort",
        "write the sequence sorted into the blanks after SEP",
        num_symbols + 2,
        num_symbols,
        tuple(train_sizes),
        tuple(test_sizes),
        lambda n: 2 * n + 1,
        sample,
    )


def parity_task(train_sizes=(8, 16), test_sizes=(17, 32)) -> Task:
    """Bits ``b_1 .. b_n`` -> position ``i`` reads ``b_1 xor .. xor b_i`` (running parity)."""

    def sample(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, 2, (n,), generator=g)
        return x, x.cumsum(0) % 2

    return Task(
        "parity", "running parity of a bit string", 2, 2, tuple(train_sizes), tuple(test_sizes), lambda n: n, sample
    )


def addition_task(train_sizes=(2, 5), test_sizes=(6, 10)) -> Task:
    """``a_0 .. a_{n-1} + b_0 .. b_{n-1} = BLANK^{n+1}`` (digits least significant first) -> the
    blanks read the digits of ``a + b``."""
    plus, eq, blank = 10, 11, 12

    def sample(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        a = torch.randint(0, 10, (n,), generator=g)
        b = torch.randint(0, 10, (n,), generator=g)
        digits, carry = [], 0
        for da, db in zip(a.tolist(), b.tolist()):
            s = da + db + carry
            digits.append(s % 10)
            carry = s // 10
        digits.append(carry)
        tokens = torch.cat([a, _const(1, plus), b, _const(1, eq), _const(n + 1, blank)])
        targets = torch.cat([_ignore(2 * n + 2), torch.tensor(digits, dtype=torch.long)])
        return tokens, targets

    return Task(
        "addition",
        "add two n-digit numbers (least significant digit first)",
        13,
        10,
        tuple(train_sizes),
        tuple(test_sizes),
        lambda n: 3 * n + 3,
        sample,
    )


def recall_task(num_keys: int = 32, num_values: int = 16, train_sizes=(6, 12), test_sizes=(13, 24)) -> Task:
    """Multi-query associative recall over a key/value memory.

    The first ``n`` tokens are memory slots, each carrying a key and a value (two token fields,
    their embeddings summed, like BERT's token and segment embeddings); the next ``n`` tokens are
    queries carrying a key of the memory (a random permutation of them) and the ``BLANK`` value.
    Each query reads the value stored under its key. Keys of one instance are distinct.

    Token ids: keys ``0 .. num_keys - 1``, values ``num_keys .. num_keys + num_values - 1``,
    ``BLANK``; label = value index. The memory slot a query needs can be anywhere: a topology must
    route it to the query within the model's layers.
    """
    if test_sizes[1] > num_keys:
        raise ValueError(
            f"Expected 'test_sizes' of at most num_keys={num_keys} tokens (got {tuple(test_sizes)}): the "
            "keys of one instance are distinct"
        )
    blank = num_keys + num_values

    def sample(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        keys = torch.randperm(num_keys, generator=g)[:n]
        values = torch.randint(0, num_values, (n,), generator=g)
        order = torch.randperm(n, generator=g)
        memory = torch.stack([keys, values + num_keys], dim=1)  # [n, 2]
        queries = torch.stack([keys[order], _const(n, blank)], dim=1)  # [n, 2]
        return torch.cat([memory, queries]), torch.cat([_ignore(n), values[order]])

    return Task(
        "recall",
        "associative recall: each query reads the value stored under its key",
        num_keys + num_values + 1,
        num_values,
        tuple(train_sizes),
        tuple(test_sizes),
        lambda n: 2 * n,
        sample,
    )


TASKS: dict[str, Callable[..., Task]] = {
    "copy": copy_task,
    "reverse": reverse_task,
    "sort": sort_task,
    "parity": parity_task,
    "addition": addition_task,
    "recall": recall_task,
}


def get_task(name: str, train_sizes: Sequence[int] | None = None, test_sizes: Sequence[int] | None = None) -> Task:
    """A task by name, optionally with other size ranges ``(lo, hi)``."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}: expected one of {sorted(TASKS)}")
    kwargs = {}
    for key, value in (("train_sizes", train_sizes), ("test_sizes", test_sizes)):
        if value is not None:
            lo, hi = (int(v) for v in value)
            if not 1 <= lo <= hi:
                raise ValueError(f"Expected '{key}' to be a range lo <= hi with lo >= 1 (got {value})")
            kwargs[key] = (lo, hi)
    return TASKS[name](**kwargs)


def check_longer(task: Task) -> None:
    """A ``ValueError`` unless ``task.test_sizes`` lie above ``task.train_sizes``: the runs'
    "longer" evaluation measures generalization to larger instances than any seen in training."""
    if task.test_sizes[0] <= task.train_sizes[1]:
        raise ValueError(
            f"Expected 'test_sizes' {task.test_sizes} above 'train_sizes' "
            f"{task.train_sizes}: the longer test measures generalization to larger "
            "instances than any seen in training"
        )


def sample_batch(task: Task, batch_size: int, sizes: tuple[int, int], generator: torch.Generator) -> SequenceBatch:
    """``batch_size`` instances with ``n`` uniform in ``sizes`` (inclusive), concatenated."""
    lo, hi = sizes
    ns = torch.randint(lo, hi + 1, (batch_size,), generator=generator).tolist()
    tokens, targets = zip(*(task.sample(n, generator) for n in ns))
    lengths = [t.size(0) for t in tokens]
    positions = torch.cat([torch.arange(L) for L in lengths])
    return SequenceBatch(torch.cat(tokens), torch.cat(targets), positions, lengths)


# bytes of one token of a drawn batch: its id, target and position (int64)
TOKEN_BYTES = 3 * 8


def host_memory_budget() -> float:
    """Bytes a fixed data set may take on the host: half of the machine's memory, as the kernels
    budget their own recomputations (:func:`~gnn_transformer.kernels.primitives.device_memory`;
    also the benchmarks' CPU budget); unbounded where the memory cannot be read."""
    budget = device_memory(torch.device("cpu"))
    return math.inf if budget is None else float(budget)


def check_set_fits(name: str, count: int, max_tokens: int, bytes_per_token: int, sets: int = 1, held: str = "") -> None:
    """Refuse, before anything is drawn, ``sets`` sets of ``count`` examples of up to ``max_tokens``
    tokens at about ``bytes_per_token`` each that would not fit in :func:`host_memory_budget`: a
    ``ValueError`` naming the argument ``name`` and its value (``held``: what the bytes count,
    for the message)."""
    need = sets * count * max_tokens * bytes_per_token
    budget = host_memory_budget()
    if need > budget:
        examples = f"{sets} sets of {count}" if sets > 1 else f"{count}"
        raise ValueError(
            f"Expected '{name}' small enough to fit in memory (got {count}): {examples} examples of up to "
            f"{max_tokens} tokens need about {need / 2**30:.3g} GiB{held}, more than half of this "
            f"machine's memory ({budget / 2**30:.3g} GiB)"
        )


def fixed_batches(
    task: Task, num_sequences: int, batch_size: int, sizes: tuple[int, int], seed: int
) -> list[SequenceBatch]:
    """A fixed, seeded evaluation set split into batches."""
    g = torch.Generator().manual_seed(seed)
    out, left = [], num_sequences
    while left > 0:
        b = min(batch_size, left)
        out.append(sample_batch(task, b, sizes, g))
        left -= b
    return out


class SequenceWorkload:
    """A :class:`Task` under one topology, for :func:`~gnn_transformer.experiments.training.train`.

    Args:
        task: the task.
        topology: ``lengths -> graph`` of the disjoint union of the sequences of a batch: an
            ``edge_index``, a per-head pair ``(edge_index, edge_head)`` or a per-layer
            ``LayerPattern`` (see :mod:`.topologies`).
        batch_size: sequences per training batch.
        eval_size: sequences in each fixed evaluation set (``"test"``: training sizes, unseen
            instances; ``"longer"``: the task's larger test sizes).
        eval_seed: seed of the evaluation sets (the same for every topology of a comparison).
    """

    def __init__(
        self,
        task: Task,
        topology: Callable[[list[int]], Tensor],
        batch_size: int = 32,
        eval_size: int = 256,
        eval_seed: int = 12345,
    ) -> None:
        self.task = task
        self.topology = topology
        self.batch_size = batch_size
        # two sets, at the longer set's longest length
        check_set_fits("eval_size", eval_size, max(task.train_sizes[1], task.test_sizes[1]), TOKEN_BYTES, sets=2)
        self._eval = {
            "test": fixed_batches(task, eval_size, 128, task.train_sizes, eval_seed),
            "longer": fixed_batches(task, eval_size, 128, task.test_sizes, eval_seed + 1),
        }

    def train_batch(self, generator: torch.Generator) -> SequenceBatch:
        return sample_batch(self.task, self.batch_size, self.task.train_sizes, generator)

    def edge_index(self, batch: SequenceBatch) -> Tensor:
        return self.topology(batch.lengths)

    def logits(self, model, batch: SequenceBatch, device) -> tuple[Tensor, Tensor]:
        batch = batch.to(device)
        graph = graph_to(self.edge_index(batch), device)
        return model(batch.tokens, batch.positions, graph), batch.targets

    def eval_sets(self) -> dict[str, list[SequenceBatch]]:
        return self._eval

    def batch_tokens(self, batch: SequenceBatch) -> int:
        return batch.num_tokens
