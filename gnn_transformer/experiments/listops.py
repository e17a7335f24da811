"""ListOps, as in the Long Range Arena (Tay et al., 2020, arXiv:2011.04006).

A nested expression of the operators ``MIN``, ``MAX``, ``MED`` (median, rounded down) and ``SM``
(sum modulo 10) over the digits 0-9, written in prefix form with a closing bracket::

    [MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]   ->   5

The generator follows the LRA script (``lra_benchmarks/data/listops.py``): a node at depth ``d <
max_depth`` is an operator with probability 0.25 (else a digit), an operator has 2 to
``max_args`` arguments, the root is at depth 1, the length counts digits, operators and closing
brackets as the script's does, and expressions outside the length range are drawn again. Two
differences: the range is inclusive (the script keeps ``min < length < max``, 501-1999 by
default), and the closing bracket is a token of the model's input (LRA's tokenizer keeps
alphanumeric tokens only, so its model sees neither ``[`` nor ``]``; the S4 loader, like this one,
keeps ``]``, which makes the nesting readable). The answer, one of 10 classes, is read from a
``[CLS]`` token put before the expression (or from the mean over the sequence). The paper's data:
lengths 500-2000, depth up to 10, up to 10 arguments, 96,000 / 2,000 / 2,000 expressions.

Every expression is generated from its own seed (the run's seed, its split and its index), so the
training set is fixed without being generated ahead: a training batch draws indices. As in LRA,
whose splits come from one set of distinct expressions, the splits do not share an expression: the
test set's are distinct, the validation set's distinct and none of the test set's, and a training
expression that is one of theirs is drawn again (from the seed with an attempt number added), which
matters for short lengths only (at 4-20 tokens, a fifth of the test expressions were among the
first 20,000 training ones).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .tasks import SequenceBatch, check_set_fits
from .topologies import graph_to, per_length

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
CLS = "[CLS]"
VOCAB = tuple(str(d) for d in range(10)) + OPERATORS + (END, CLS)  # token id = index
NUM_CLASSES = 10
VALUE_P = 0.25  # probability of an operator at a node above the maximum depth (else a digit)
ATTEMPTS = 100_000  # draws per expression before a length range counts as impossible
DISTINCT_ATTEMPTS = 1_000  # draws per expression before the splits count as unable to stay distinct


@dataclass
class ListOpsConfig:
    """The ListOps data of a run (defaults: the paper's)."""

    lengths: tuple[int, int] = (500, 2000)  # inclusive range of expression tokens (LRA's: exclusive)
    max_depth: int = 10
    max_args: int = 10
    train_examples: int = 96_000  # the training set (drawn with replacement, each step)
    pool: str = "cls"  # "cls": read the answer at a [CLS] token; "mean": average over the sequence

    def __post_init__(self) -> None:
        pair = isinstance(self.lengths, (tuple, list)) and len(self.lengths) == 2
        if not pair or not all(isinstance(v, int) and not isinstance(v, bool) for v in self.lengths):
            raise ValueError(f"Expected 'lengths' to be a range (lo, hi) of two ints (got {self.lengths!r})")
        self.lengths = (int(self.lengths[0]), int(self.lengths[1]))
        for name in ("max_depth", "train_examples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Expected '{name}' to be a positive int (got {value!r})")
        if not isinstance(self.max_args, int) or self.max_args < 2:
            raise ValueError(f"Expected 'max_args' to be an int >= 2 (got {self.max_args!r})")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"Expected 'pool' in ('cls', 'mean') (got {self.pool!r})")
        lo, hi = self.lengths
        longest = max_length(self.max_depth, self.max_args)
        if not 1 <= lo <= hi:
            raise ValueError(f"Expected 'lengths' to be a range 1 <= lo <= hi (got {lo}-{hi})")
        if lo > longest:
            raise ValueError(
                f"Expected 'lengths' to start at most at {longest}, the longest expression of depth "
                f"{self.max_depth} with {self.max_args} arguments (got {lo}-{hi})"
            )
        if hi < 4 and not lo == 1:
            raise ValueError(
                f"Expected 'lengths' to reach 4 tokens, the shortest expression with an operator, "
                f"or to start at 1 (got {lo}-{hi})"
            )


def max_length(max_depth: int, max_args: int) -> int:
    """The longest expression the generator can make: full trees down to ``max_depth``."""
    length = 1
    for _ in range(max_depth - 1):
        length = 2 + max_args * length
    return length


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int, budget: int) -> list[str] | None:
    """Tokens of a random expression, or ``None`` as soon as it exceeds ``budget`` tokens."""
    if depth >= max_depth or rng.random() > VALUE_P:
        return [str(rng.randrange(10))]
    num_args = rng.randint(2, max_args)
    tokens: list[str] = []
    for _ in range(num_args):
        sub = _tree(rng, depth + 1, max_depth, max_args, budget - 2 - len(tokens))
        if sub is None:
            return None
        tokens += sub
        if len(tokens) + 2 > budget:
            return None
    return [rng.choice(OPERATORS), *tokens, END]


def evaluate_expression(tokens: list[str]) -> int:
    """The value of an expression in prefix form (``MED``: the median, rounded down)."""
    stack: list[list[Any]] = []
    value = None
    for tok in tokens:
        if tok in OPERATORS:
            stack.append([tok])
        elif tok == END:
            op, *args = stack.pop()
            if op == "[MIN":
                value = min(args)
            elif op == "[MAX":
                value = max(args)
            elif op == "[MED":
                ordered, m = sorted(args), len(args) // 2
                value = ordered[m] if len(args) % 2 else (ordered[m - 1] + ordered[m]) // 2
            else:
                value = sum(args) % 10
            if stack:
                stack[-1].append(value)
        else:
            value = int(tok)
            if stack:
                stack[-1].append(value)
    if stack or value is None:
        raise ValueError(f"Expected a complete expression (got {' '.join(tokens[:20])} ...)")
    return value


def generate(config: ListOpsConfig, seed: int | str) -> tuple[list[str], int]:
    """One expression of ``config.lengths`` and its answer, from ``seed``."""
    rng = random.Random(seed)
    lo, hi = config.lengths
    for _ in range(ATTEMPTS):
        tokens = _tree(rng, 1, config.max_depth, config.max_args, hi)
        if tokens is not None and lo <= len(tokens):
            return tokens, evaluate_expression(tokens)
    raise ValueError(
        f"Expected 'lengths' that the generator reaches (got {lo}-{hi}: no expression of "
        f"depth <= {config.max_depth} with <= {config.max_args} arguments in that range "
        f"came out of {ATTEMPTS} draws)"
    )


def encode(tokens: list[str], pool: str = "cls") -> Tensor:
    """Token ids, ``[CLS]`` first for ``pool="cls"``."""
    index = {t: i for i, t in enumerate(VOCAB)}
    ids = [index[t] for t in tokens]
    return torch.tensor([index[CLS], *ids] if pool == "cls" else ids, dtype=torch.long)


@dataclass(frozen=True)
class ListOpsBatch(SequenceBatch):
    """A :class:`SequenceBatch` whose ``targets`` are one label per sequence ``[B]``."""

    @property
    def ptr(self) -> Tensor:
        return torch.tensor([0, *self.lengths]).cumsum(0)

    def to(self, device) -> "ListOpsBatch":
        return ListOpsBatch(self.tokens.to(device), self.targets.to(device), self.positions.to(device), self.lengths)


class ListOpsWorkload:
    """ListOps under one topology for :func:`~gnn_transformer.experiments.training.train`, with a
    :class:`~gnn_transformer.experiments.models.SequenceClassifier`.

    Args:
        config: the data.
        topology: ``lengths -> graph`` (see :mod:`.topologies`).
        batch_size: expressions per training batch.
        eval_size: expressions in each evaluation set (``"val"``, picks the best checkpoint;
            ``"test"``).
        seed: the data seed (the same for every topology of a comparison).
    """

    def __init__(
        self,
        config: ListOpsConfig,
        topology: Callable[[list[int]], Any],
        batch_size: int = 32,
        eval_size: int = 2000,
        seed: int = 0,
    ) -> None:
        self.config, self.batch_size, self.seed = config, batch_size, seed
        self.topology = per_length(topology)
        self._cache: dict[tuple[str, int], tuple[Tensor, int]] = {}
        self._held_out: set[bytes] = set()  # the evaluation sets' expressions, which no other may repeat
        # two sets, each token cached and batched (uint8) with its position (int64); [CLS] first
        check_set_fits("eval_size", eval_size, config.lengths[1] + 1, 1 + 1 + 8, sets=2)
        held_out = {
            split: [self._batch(split, list(range(i, min(i + 64, eval_size)))) for i in range(0, eval_size, 64)]
            for split in ("test", "val")  # the test set first: the validation set avoids its expressions
        }
        self._eval = {"val": held_out["val"], "test": held_out["test"]}

    def example(self, split: str, index: int) -> tuple[Tensor, int]:
        """Expression ``index`` of ``split`` as token ids, with its answer; none of the evaluation
        sets' expressions (see the module docstring)."""
        key = (split, index)
        if key not in self._cache:
            for attempt in range(DISTINCT_ATTEMPTS):
                seed = f"listops/{self.seed}/{split}/{index}" + (f"/{attempt}" if attempt else "")
                words, answer = generate(self.config, seed)
                ids = encode(words, self.config.pool).to(torch.uint8)  # ids < 256
                fingerprint = ids.numpy().tobytes()
                if fingerprint not in self._held_out:
                    break
            else:
                lo, hi = self.config.lengths
                raise ValueError(
                    f"Expected 'lengths' ({lo}-{hi}) to hold enough distinct expressions for evaluation "
                    f"sets of distinct expressions: {DISTINCT_ATTEMPTS} draws of {split} expression "
                    f"{index} all repeated one of the {len(self._held_out)} held out (lower the "
                    "evaluation size or widen the range)"
                )
            if split != "train":
                self._held_out.add(fingerprint)
            self._cache[key] = (ids, answer)
        ids, answer = self._cache[key]
        return ids.long(), answer

    def _batch(self, split: str, indices: list[int]) -> ListOpsBatch:
        examples = [self.example(split, i) for i in indices]
        lengths = [t.numel() for t, _ in examples]
        return ListOpsBatch(
            torch.cat([t for t, _ in examples]),
            torch.tensor([a for _, a in examples], dtype=torch.long),
            torch.cat([torch.arange(n) for n in lengths]),
            lengths,
        )

    def train_batch(self, generator: torch.Generator) -> ListOpsBatch:
        indices = torch.randint(0, self.config.train_examples, (self.batch_size,), generator=generator)
        return self._batch("train", indices.tolist())

    def edge_index(self, batch: ListOpsBatch) -> Any:
        return self.topology(batch.lengths)

    def logits(self, model, batch: ListOpsBatch, device) -> tuple[Tensor, Tensor]:
        batch = batch.to(device)
        graph = graph_to(self.edge_index(batch), device)
        return model(batch.tokens, batch.positions, graph, batch.ptr.to(device)), batch.targets

    def eval_sets(self) -> dict[str, list[ListOpsBatch]]:
        return self._eval

    def batch_tokens(self, batch: ListOpsBatch) -> int:
        return batch.num_tokens
