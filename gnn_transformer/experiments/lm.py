"""Character-level language modelling on real text: the data, the workload and sampling.

A text is read as characters (UTF-8), its vocabulary is the sorted set of its characters, and it
is split into a training and a validation part: the last ``val_fraction`` of the characters of a
file (nanoGPT's 90% / 10% split of tinyshakespeare), or, for the default corpus, whole files.

The default corpus, when no file is given, is the Python standard library's own source: the
``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` (test suites and installed packages left
out), in sorted order, every tenth file to validation, each part capped in characters. Every Python
installation has it; nothing is downloaded.

The model reads windows of ``context`` characters and predicts, at every position, the next
character; a token sees only itself and earlier tokens: every topology is intersected with the
causal graph (:func:`causal_part`), so a sliding window becomes a causal window and BigBird a
causal BigBird. The validation loss is the mean cross-entropy in nats per character over fixed,
non-overlapping windows of the validation part (divide by ``ln 2`` for bits per character).
"""

from __future__ import annotations

import math
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric import EdgeIndex
from tqdm.auto import tqdm

from ..topology.specs import LayerPattern
from .tasks import SequenceBatch
from .topologies import graph_to, per_length

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


# bytes of one generated character while :func:`generate` runs: its id in a Python list (a pointer
# and an int object) and the decoded text (up to 4 bytes, and a copy while joining)
SAMPLE_CHAR_BYTES = 8 + 28 + 8


@dataclass
class TextConfig:
    """The text of a language-modelling run."""

    text: str | None = None  # a UTF-8 text file; None: the Python standard library's sources
    context: int = 64  # characters the model reads (training and validation windows)
    val_fraction: float = 0.1  # of a file: the share of its last characters held out for validation
    max_chars: int = 1_000_000  # default corpus: characters of training text (validation: a tenth)
    sample_chars: int = 200  # characters generated after training (0: none)

    def __post_init__(self) -> None:
        for name in ("context", "max_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Expected '{name}' to be a positive int (got {value!r})")
        if not isinstance(self.sample_chars, int) or isinstance(self.sample_chars, bool) or self.sample_chars < 0:
            raise ValueError(f"Expected 'sample_chars' to be an int >= 0 (got {self.sample_chars!r})")
        from .tasks import host_memory_budget

        need, budget = self.sample_chars * SAMPLE_CHAR_BYTES, host_memory_budget()
        if need > budget:
            raise ValueError(
                f"Expected 'sample_chars' small enough to fit in memory (got {self.sample_chars}): the "
                f"generated ids and text need about {need / 2**30:.3g} GiB, more than half of this machine's "
                f"memory ({budget / 2**30:.3g} GiB)"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"Expected 'val_fraction' in (0, 1) (got {self.val_fraction})")


@dataclass(frozen=True)
class CharCorpus:
    """A text as character ids, split into training and validation.

    Attributes:
        chars: the vocabulary, id ``i`` is ``chars[i]``.
        train, val: the ids of the two parts, ``[T]`` and ``[V]`` (int64).
        source: where the text came from, for logs.
    """

    chars: str
    train: Tensor
    val: Tensor
    source: str

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ValueError(f"Expected 'text' in the corpus vocabulary (got the characters {unknown[:10]!r})")
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Tensor | list[int]) -> str:
        return "".join(self.chars[i] for i in (ids.tolist() if isinstance(ids, Tensor) else ids))


def read_text(path: str | Path, name: str = "text") -> str:
    """A UTF-8 text file; a ``ValueError`` naming ``name`` for a missing, empty or binary file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(
            f"Expected '{name}' to be a text file (got {str(path)!r}, which "
            f"{'is a directory' if p.is_dir() else 'does not exist'})"
        )
    data = p.read_bytes()
    if not data.strip():
        raise ValueError(f"Expected '{name}' to hold text (got {str(path)!r}, which is empty)")
    if b"\0" in data:
        raise ValueError(f"Expected '{name}' to be a text file (got {str(path)!r}, a binary file with NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"Expected '{name}' to be UTF-8 text (got {str(path)!r}: byte {err.start} is not UTF-8)"
        ) from None


def stdlib_files() -> list[Path]:
    """The standard library's ``*.py`` files, sorted by path (test suites and packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_text(max_chars: int) -> tuple[str, str]:
    """Training and validation text of the default corpus: every tenth file (in sorted order) to
    validation, files taken in order until a part holds ``max_chars`` (validation: a tenth)."""
    parts: tuple[list[str], list[str]] = ([], [])
    sizes = [0, 0]
    caps = (max_chars, max(max_chars // 10, 1))
    for k, path in enumerate(stdlib_files()):
        split = int(k % 10 == 9)
        if sizes[split] >= caps[split]:
            if all(s >= c for s, c in zip(sizes, caps)):
                break
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        text = text[: caps[split] - sizes[split]]
        parts[split].append(text)
        sizes[split] += len(text)
    return "".join(parts[0]), "".join(parts[1])


def load_corpus(config: TextConfig) -> CharCorpus:
    """The corpus of ``config`` (see the module docstring), checked against ``config.context``."""
    if config.text is None:
        train, val = stdlib_text(config.max_chars)
        source = f"Python standard library sources ({sysconfig.get_paths()['stdlib']})"
        if not train or not val:
            raise ValueError(
                "Expected the Python standard library's *.py sources for the default corpus (found none): pass 'text'"
            )
    else:
        text = read_text(config.text)
        cut = int(len(text) * (1.0 - config.val_fraction))
        train, val, source = text[:cut], text[cut:], config.text
    chars = "".join(sorted(set(train) | set(val)))
    index = {c: i for i, c in enumerate(chars)}
    corpus = CharCorpus(
        chars,
        torch.tensor([index[c] for c in train], dtype=torch.long),
        torch.tensor([index[c] for c in val], dtype=torch.long),
        source,
    )
    _check_lengths(corpus, config)
    return corpus


def _check_lengths(corpus: CharCorpus, config: TextConfig) -> None:
    """A text too short to hold one input and one target in each part names ``text``; a context
    longer than a part names ``context``."""
    where = "the default corpus" if config.text is None else repr(config.text)
    for part, ids in (("training", corpus.train), ("validation", corpus.val)):
        if ids.numel() < 2 and config.text is not None:
            raise ValueError(
                f"Expected 'text' to be long enough for a {part} part of 2 characters or more "
                f"(got {where}, {corpus.train.numel() + corpus.val.numel()} characters in all)"
            )
        if ids.numel() < config.context + 1:
            raise ValueError(
                f"Expected 'context' shorter than the {part} part of {where} "
                f"(got context={config.context}, a {part} part of {ids.numel()} characters)"
            )


def causal_part(graph: Any) -> Any:
    """The edges ``j -> i`` with ``j <= i`` of a graph of any kind (an edge set, a per-head pair, a
    per-layer pattern): what a language model may attend along."""
    if isinstance(graph, LayerPattern):
        return LayerPattern(tuple(causal_part(g) for g in graph.graphs))
    if isinstance(graph, tuple):
        edge_index, edge_head = graph
        keep = edge_index[0] <= edge_index[1]
        plain = edge_index.as_tensor() if isinstance(edge_index, EdgeIndex) else edge_index
        return _edge_index(plain[:, keep], edge_index), edge_head[keep]
    keep = graph[0] <= graph[1]
    plain = graph.as_tensor() if isinstance(graph, EdgeIndex) else graph
    return _edge_index(plain[:, keep], graph)


def _edge_index(edges: Tensor, like: Any) -> Any:
    if isinstance(like, EdgeIndex):
        return EdgeIndex(edges, sparse_size=like.sparse_size(), sort_order=like.sort_order)
    return edges


def causal_build(build: Callable[[list[int]], Any]) -> Callable[[list[int]], Any]:
    """``lengths -> graph`` of ``build``, intersected with the causal graph."""
    return lambda lengths: causal_part(build(lengths))


def window_batch(corpus_ids: Tensor, starts: Tensor, context: int) -> SequenceBatch:
    """Windows ``ids[s : s + context]`` with their next characters as targets, one per start."""
    offsets = starts[:, None] + torch.arange(context)  # [B, T]
    tokens, targets = corpus_ids[offsets], corpus_ids[offsets + 1]  # [B, T]
    b = starts.numel()
    return SequenceBatch(tokens.reshape(-1), targets.reshape(-1), torch.arange(context).repeat(b), [context] * b)


class LMWorkload:
    """Next-character prediction on a :class:`CharCorpus` under one topology (made causal).

    Args:
        corpus: the text.
        topology: ``lengths -> graph`` (see :mod:`.topologies`); intersected with the causal graph.
        context: characters per window.
        batch_size: windows per training batch, drawn at uniform random offsets of the training part.
        eval_size: windows of the validation set: evenly spaced, non-overlapping windows over the
            whole validation part (all of them when it holds fewer).
    """

    monitor = ("loss_val", "min")

    def __init__(
        self,
        corpus: CharCorpus,
        topology: Callable[[list[int]], Any],
        context: int,
        batch_size: int = 32,
        eval_size: int = 256,
    ) -> None:
        if corpus.val.numel() < context + 1:
            raise ValueError(
                f"Expected 'context' ({context}) shorter than the validation part ({corpus.val.numel()} characters)"
            )
        self.corpus, self.context, self.batch_size = corpus, context, batch_size
        self.topology = per_length(causal_build(topology))
        available = (corpus.val.numel() - 1) // context
        count = min(eval_size, available)
        self.eval_windows = count  # fewer than eval_size when the validation part holds fewer
        # evenly spaced over the whole part: window k of count starts at window floor(k * available / count)
        starts = (torch.arange(count) * available // count) * context
        self._eval = {"val": [window_batch(corpus.val, starts[i : i + 128], context) for i in range(0, count, 128)]}

    def train_batch(self, generator: torch.Generator) -> SequenceBatch:
        starts = torch.randint(0, self.corpus.train.numel() - self.context, (self.batch_size,), generator=generator)
        return window_batch(self.corpus.train, starts, self.context)

    def edge_index(self, batch: SequenceBatch) -> Any:
        return self.topology(batch.lengths)

    def logits(self, model, batch: SequenceBatch, device) -> tuple[Tensor, Tensor]:
        batch = batch.to(device)
        return model(batch.tokens, batch.positions, graph_to(self.edge_index(batch), device)), batch.targets

    def eval_sets(self) -> dict[str, list[SequenceBatch]]:
        return self._eval

    def batch_tokens(self, batch: SequenceBatch) -> int:
        return batch.num_tokens


def bits_per_char(nats: float) -> float:
    return nats / math.log(2)


@torch.no_grad()
def generate(
    model: nn.Module,
    workload: LMWorkload,
    num_chars: int,
    *,
    prompt: str | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> str:
    """``prompt`` followed by ``num_chars`` characters sampled from ``model``, each from the last
    ``context`` characters (default prompt: a newline if the vocabulary has one, else its first
    character); ``progress`` shows a progress bar. Returns the whole text."""
    if not temperature > 0:
        raise ValueError(f"Expected 'temperature' > 0 (got {temperature})")
    corpus, context = workload.corpus, workload.context
    prompt = prompt if prompt is not None else ("\n" if "\n" in corpus.chars else corpus.chars[0])
    if not prompt:
        raise ValueError("Expected a non-empty 'prompt'")
    ids = corpus.encode(prompt).tolist()
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    for _ in tqdm(range(num_chars), desc="sample", unit="char", disable=not progress, leave=False):
        window = torch.tensor(ids[-context:], dtype=torch.long)
        n = window.numel()
        graph = graph_to(workload.topology([n]), device)
        logits = model(window.to(device), torch.arange(n, device=device), graph)[-1].float().cpu()  # [V]
        logits = logits / temperature
        if top_k is not None and top_k < logits.numel():
            kth = logits.topk(top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        ids.append(int(torch.multinomial(logits.softmax(-1), 1, generator=generator)))
    model.train(was_training)
    return corpus.decode(ids)


def as_graph_lm(model: nn.Module) -> nn.Module:
    """The library's causal language model holding the weights of a language-modelling run's
    :class:`~gnn_transformer.experiments.models.SequenceModel` (its classes are its vocabulary).

    The two are the same architecture (token embedding, absolute positions or RoPE, the same encoder
    layers and final norm, a head on the vocabulary), so the result gives the same logits on any
    graph: a :class:`~gnn_transformer.model.GraphLM` (the head tied to the embedding when the run
    tied them) when the head has no bias, else a :class:`~gnn_transformer.model.GraphEncoderModel`
    whose head of ``vocab_size`` outputs has one. Either takes
    ``forward(ids [N], edge_index, pos=pos [N]) -> [N, vocab_size]``, a key/value cache and
    :mod:`gnn_transformer.streaming`. The copy is in the mode of ``model``; dropout, which the run's
    model applies only inside its layers, is also applied to the embeddings in training mode, so the
    two agree in eval mode.
    """
    from ..model import GraphEncoderModel, GraphLM, GraphTransformerConfig
    from .models import SequenceModel

    if not isinstance(model, SequenceModel):
        raise ValueError(f"Expected 'model' to be a SequenceModel (got {type(model).__name__})")
    vocab_size, num_classes = model.embed.num_embeddings, model.head.out_features
    if vocab_size != num_classes:
        raise ValueError(
            f"Expected 'model' to predict tokens of its vocabulary (got {vocab_size} tokens in "
            f"and {num_classes} classes out)"
        )
    c = model.config
    has_bias = model.head.bias is not None
    table = model.pos  # the learned position table (the run may have enlarged it), or None
    max_positions = table.num_embeddings if isinstance(table, nn.Embedding) else c.max_positions
    config = GraphTransformerConfig(
        vocab_size=vocab_size,
        output_dim=vocab_size if has_bias else None,
        d_model=c.d_model,
        nhead=c.nhead,
        num_layers=c.num_layers,
        dim_feedforward=c.dim_feedforward,
        dropout=c.dropout,
        activation=c.activation,
        norm_first=c.norm_first,
        bias=c.bias,
        position=c.position,
        max_positions=max_positions,
        tie_weights=c.tie_embeddings,
        backend=c.backend,
        select=c.select,
    )
    lm = (GraphEncoderModel(config) if has_bias else GraphLM(config)).to(model.embed.weight)  # device, dtype
    state = {("pos_embed." + k[len("pos.") :] if k.startswith("pos.") else k): v for k, v in model.state_dict().items()}
    lm.load_state_dict(state)
    return lm.train(model.training)
