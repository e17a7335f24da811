"""``gnn-transformer perplexity``: a causal language model on a token stream under several graphs."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import EXIT_OK, UsageError, check_out_dir, positive_int, table

COLUMNS = [("topology", "topology", ""), ("tokens", "tokens", "d"), ("perplexity", "perplexity", ".3f"),
           ("nll", "nats/token", ".4f"), ("edges", "edges", ",d"), ("density", "density", ".4f"),
           ("peak_cache", "cache peak", "d"), ("seconds", "s", ".1f")]


def add_parser(sub) -> None:
    from ..attention import BACKENDS

    p = sub.add_parser(
        "perplexity", help="perplexity of a causal LM on a text under several token graphs (streamed)",
        description="Feed one token stream (a text file through the model's tokenizer, or token ids) "
        "through a causal language model in chunks, with a key/value cache that keeps only what each "
        "graph still reads (StreamingLLM's protocol: every next token predicted in order). Prints a "
        "table and writes perplexity.json, perplexity.csv (per position bucket) and perplexity.png "
        "in --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-dir", metavar="DIR", help="local directory of a Hugging Face causal LM "
                        "(save_pretrained) with its tokenizer")
    source.add_argument("--checkpoint", metavar="PATH", help="model.pt of a 'train' run of a language "
                        "model, or a GraphLM state dict with its config JSON next to it")
    p.add_argument("--config", metavar="JSON", help="model config of --checkpoint (unset: the one next to it)")
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--text", metavar="FILE", help="UTF-8 text, tokenized as one stream")
    inputs.add_argument("--tokens", metavar="FILE", help="token ids, whitespace-separated (one stream)")
    p.add_argument("--tokenizer", metavar="DIR", help="directory with a Hugging Face tokenizer (unset: --hf-dir)")
    p.add_argument("--topology", dest="topologies", action="append", metavar="SPEC",
                   help="token graph, repeatable: 'native' (the model's own graphs), a catalogue name or a "
                   "builder with arguments, e.g. 'streaming:num_sinks=4,window=256' (default: native, "
                   "streaming:num_sinks=4,window=252 and sliding_window:window=255,causal=true)")
    p.add_argument("--max-tokens", type=positive_int, default=4096, help="tokens of the stream used")
    p.add_argument("--chunk", type=positive_int, default=256, help="tokens computed per step")
    p.add_argument("--bucket-size", type=positive_int, default=256, help="positions per perplexity bucket")
    p.add_argument("--backend", choices=BACKENDS, help="attention backend (unset: the model's)")
    p.add_argument("--out", default="runs/perplexity", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


DEFAULT_TOPOLOGIES = ("native", "streaming:num_sinks=4,window=252", "sliding_window:window=255,causal=true")


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
    if not _is_lm(loaded.model):
        raise ValueError(f"Expected a causal language model for a perplexity (got {loaded.name})")
    if args.tokenizer is not None:
        analyze_run.use_tokenizer(loaded, args.tokenizer)
    if args.tokens is not None:
        sequences = analyze_run.read_token_file(args.tokens)
    else:
        sequences = [_tokenize(Path(args.text), loaded.tokenizer)]
    ids = stream_ids(sequences, args.max_tokens)
    analyze_run.check_sequences(loaded, [ids.tolist()], f"the stream of {args.text or args.tokens!r}")
    num_layers = _num_layers(loaded.model)
    specs = args.topologies or list(DEFAULT_TOPOLOGIES)
    print(f"perplexity: {loaded.name}, {ids.numel()} tokens, {len(specs)} graph(s), chunks of {args.chunk}")

    def report(row) -> None:
        print(f"  {row.topology}: perplexity {row.perplexity:.3f}, cache peak {row.peak_cache} nodes, "
              f"{row.seconds:.1f} s", flush=True)

    rows = run_perplexity(loaded.model, ids, specs, num_layers=num_layers, chunk=args.chunk,
                          bucket_size=args.bucket_size, native=_native(loaded), progress=not args.no_progress,
                          on_row=report)
    print()
    print(table([r.row() for r in rows], COLUMNS))
    paths = save_perplexity(rows, args.out, title=f"{loaded.name}: perplexity along the stream")
    print(f"\nWrote {paths['json']}, {paths['csv']}, {paths['figure']}")
    return EXIT_OK


def _tokenize(path: Path, tokenizer) -> list[int]:
    if not path.is_file():
        raise FileNotFoundError(f"No file at '--text' {str(path)!r}")
    if tokenizer is None:
        raise ValueError("Expected a tokenizer for '--text' (none found with the model; pass --tokenizer DIR "
                         "or token ids with --tokens)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"Expected UTF-8 text in '--text' {str(path)!r} ({err.reason} at byte {err.start})") \
            from None
    if hasattr(tokenizer, "encode_stream"):
        return list(tokenizer.encode_stream(text))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _is_lm(model) -> bool:
    """A model whose ``forward_graph`` returns next-token logits."""
    from .. import GraphLM

    if isinstance(model, GraphLM):
        return True
    try:
        from ..hf import GraphDecoderLM, GraphGPT2LMHeadModel
    except ImportError:
        return False
    return isinstance(model, (GraphDecoderLM, GraphGPT2LMHeadModel))


def _num_layers(model) -> int:
    from ..attention import GraphMultiheadAttention

    return sum(isinstance(m, GraphMultiheadAttention) for m in model.modules())


def _native(loaded):
    """``length -> graph``: the model's own graphs, or its training run's topology."""
    model = loaded.model
    if hasattr(model, "native_topologies"):  # the decoder families: a causal graph or window per layer
        return lambda length: [build([length]) for build in model.native_topologies()]
    from ..experiments.perplexity import build_graph

    return lambda length: build_graph(loaded.graph, length, _num_layers(model))
