"""``gnn-transformer perplexity``: a causal language model on a token stream under several graphs."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import EXIT_OK, UsageError, check_out_dir, nonnegative_int, positive_int, table

COLUMNS = [
    ("topology", "topology", ""),
    ("tokens", "tokens", "d"),
    ("perplexity", "perplexity", ".3f"),
    ("nll", "nats/token", ".4f"),
    ("edges", "edges", ",d"),
    ("density", "density", ".4f"),
    ("peak_cache", "cache peak", "d"),
    ("seconds", "s", ".1f"),
]


def add_parser(sub) -> None:
    from ..attention import BACKENDS
    from ..experiments.perplexity import POSITIONS

    p = sub.add_parser(
        "perplexity",
        help="perplexity of a causal LM on a text under several token graphs (streamed)",
        description="Predict every next token of one stream (a text file through the model's tokenizer, "
        "or token ids) with a causal language model under several token graphs (StreamingLLM's protocol). "
        "--positions absolute: the stream is fed in chunks at its own positions, with a key/value cache "
        "that keeps only what each graph still reads. --positions context: every token is predicted by "
        "a fresh pass over the tokens it reads, at positions 0..k-1 (StreamingLLM's positions inside "
        "its cache, recomputed), which keeps a model with a table of learned positions within it on any "
        "stream. Prints a table and writes perplexity.json, perplexity.csv (per position bucket) and "
        "perplexity.png in --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--hf-dir",
        metavar="DIR",
        help="local directory of a Hugging Face causal LM (save_pretrained) with its tokenizer",
    )
    source.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="model.pt or best.pt of a 'train --task lm' "
        "run (its character vocabulary is the set of characters of the run's text, read "
        "from the path the run names), or a GraphLM state dict with its config JSON next "
        "to it",
    )
    p.add_argument("--config", metavar="JSON", help="model config of --checkpoint (unset: the one next to it)")
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--text", metavar="FILE", help="UTF-8 text, tokenized as one stream")
    inputs.add_argument("--tokens", metavar="FILE", help="token ids, whitespace-separated (one stream)")
    p.add_argument("--tokenizer", metavar="DIR", help="directory with a Hugging Face tokenizer (unset: --hf-dir)")
    p.add_argument(
        "--topology",
        dest="topologies",
        action="append",
        metavar="SPEC",
        help="token graph, repeatable: 'native' (the model's own graphs), a catalogue name or a "
        "builder with arguments, e.g. 'streaming:num_sinks=4,window=256' (default: native, "
        "streaming:num_sinks=4,window=251 and sliding_window:window=255,causal=true: 256 keys each)",
    )
    p.add_argument(
        "--start",
        type=nonnegative_int,
        default=0,
        help="tokens of the input skipped before the "
        "stream (e.g. the training part of a text: 'train --task lm' validates on the last 10%% of "
        "its characters)",
    )
    p.add_argument("--max-tokens", type=positive_int, default=4096, help="tokens of the stream used")
    p.add_argument(
        "--positions",
        choices=POSITIONS,
        default="absolute",
        help="absolute: each token at its place in the stream (at most the model's table of "
        "learned positions); context: each token's context recomputed at positions 0..k-1",
    )
    p.add_argument(
        "--chunk",
        type=positive_int,
        default=256,
        help="tokens computed per step (with --positions context: nodes of the contexts computed together)",
    )
    p.add_argument("--bucket-size", type=positive_int, default=256, help="positions per perplexity bucket")
    p.add_argument("--backend", choices=BACKENDS, help="attention backend (unset: the model's)")
    p.add_argument("--out", default="runs/perplexity", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


DEFAULT_TOPOLOGIES = ("native", "streaming:num_sinks=4,window=251", "sliding_window:window=255,causal=true")


def run(args) -> int:
    try:
        return _run(args)
    except FileNotFoundError as err:  # a missing checkpoint, directory or input file
        raise UsageError(str(err)) from None


def _run(args) -> int:
    from ..experiments import analyze_run
    from ..experiments.perplexity import run_perplexity, save_perplexity, stream_ids

    check_out_dir("--out", args.out)
    if args.checkpoint is not None:
        loaded = analyze_run.load_checkpoint_model(args.checkpoint, args.config, backend=args.backend)
    else:
        loaded = analyze_run.load_hf_model(args.hf_dir, backend=args.backend)
    if not loaded.language_model:
        raise ValueError(f"Expected a causal language model for a perplexity (got {loaded.name})")
    if args.tokenizer is not None:
        analyze_run.use_tokenizer(loaded, args.tokenizer)
    if args.tokens is not None:
        sequences = analyze_run.read_token_file(args.tokens)
    else:
        sequences = [_tokenize(Path(args.text), loaded.tokenizer)]
    ids = stream_ids(sequences, args.max_tokens, args.start)
    analyze_run.check_sequences(
        loaded, [ids.tolist()], f"the stream of {args.text or args.tokens!r}", check_length=False
    )
    num_layers = _num_layers(loaded.model)
    specs = args.topologies or list(DEFAULT_TOPOLOGIES)
    print(
        f"perplexity: {loaded.name}, {ids.numel()} tokens, {len(specs)} graph(s), {args.positions} "
        f"positions, chunks of {args.chunk}"
    )
    if loaded.trained_length is not None:
        print(
            f"  the model was trained on sequences of {loaded.trained_length} tokens: positions from "
            f"{loaded.trained_length} on are untrained"
        )

    def report(row) -> None:
        print(
            f"  {row.topology}: perplexity {row.perplexity:.3f}, cache peak {row.peak_cache} nodes, "
            f"{row.seconds:.1f} s",
            flush=True,
        )

    rows = run_perplexity(
        loaded.model,
        ids,
        specs,
        num_layers=num_layers,
        chunk=args.chunk,
        bucket_size=args.bucket_size,
        positions=args.positions,
        max_positions=loaded.max_length,
        native=_native(loaded),
        progress=not args.no_progress,
        on_row=report,
    )
    print()
    print(table([r.row() for r in rows], COLUMNS))
    paths = save_perplexity(rows, args.out, title=f"{loaded.name}: perplexity along the stream")
    print(f"\nWrote {paths['json']}, {paths['csv']}, {paths['figure']}")
    return EXIT_OK


def _tokenize(path: Path, tokenizer) -> list[int]:
    if not path.is_file():
        raise FileNotFoundError(f"No file at '--text' {str(path)!r}")
    if tokenizer is None:
        raise ValueError(
            "Expected a tokenizer for '--text' (none found with the model; pass --tokenizer DIR "
            "or token ids with --tokens)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"Expected UTF-8 text in '--text' {str(path)!r} ({err.reason} at byte {err.start})") from None
    try:
        if hasattr(tokenizer, "encode_stream"):
            return list(tokenizer.encode_stream(text))
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except ValueError as err:  # a character outside a training run's vocabulary
        raise ValueError(f"'--text' {str(path)!r}: {err}") from None


def _num_layers(model) -> int:
    from ..attention import GraphMultiheadAttention

    return sum(isinstance(m, GraphMultiheadAttention) for m in model.modules())


def _native(loaded):
    """``length -> graph``: the model's own graphs, or its training run's topology."""
    model = loaded.model
    if hasattr(model, "native_topologies"):  # the decoder families: a causal graph or window per layer
        return lambda length: [build([length]) for build in model.native_topologies()]
    from ..experiments.lm import causal_part
    from ..experiments.perplexity import build_graph

    def causal(graph):
        return [causal_part(g) for g in graph] if isinstance(graph, list) else causal_part(graph)

    if loaded.causal_graphs:  # a language-modelling run trained on the causal part of its topology
        return lambda length: causal(build_graph(loaded.graph, length, _num_layers(model)))
    return lambda length: build_graph(loaded.graph, length, _num_layers(model))
