"""``gnn-transformer view``: write one self-contained HTML page to explore a token graph or a model's
attention in a browser (see :mod:`gnn_transformer.viz`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import EXIT_OK, EXIT_USAGE, UsageError, check_out_file, error, positive_int


def add_parser(sub) -> None:
    from ..viz import DEFAULT_MAX_EDGES, MAX_TOKENS

    p = sub.add_parser(
        "view",
        help="write an interactive HTML page of a topology or of a model's attention",
        description="Write one self-contained HTML file (no network needed to open it): the adjacency "
        "matrix and a drawing of the token graph side by side; hover a token to see the keys it reads, "
        "and its receptive field after 1..L layers. From a topology SPEC (as 'show' takes it; per-head "
        "and per-layer graphs are shown per head and layer), or from a model (--checkpoint or --hf-dir) "
        "run on one sequence: attention weights per layer and head, sinks and hubs marked.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("spec", nargs="?", help="topology spec (builder with arguments, catalogue name or .toml path)")
    p.add_argument(
        "-n",
        type=positive_int,
        help=f"tokens of the topology's sequence, at most {MAX_TOKENS} (default: the spec's [small] n, else 16)",
    )
    p.add_argument(
        "--paper-scale",
        action="store_true",
        help="build catalogue and .toml specs with their paper parameters instead of their toy-scale [small] ones",
    )
    p.add_argument(
        "--layers",
        type=positive_int,
        help="range of the receptive-field slider (default: 3, at least a per-layer cycle; a model: its layers)",
    )
    model = p.add_argument_group("model (instead of SPEC)")
    model.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="model.pt of a 'train' run, or a state dict of a GraphLM/GraphEncoderModel with "
        "its config JSON next to it",
    )
    model.add_argument("--hf-dir", metavar="DIR", help="local directory of a Hugging Face BERT or GPT-2")
    model.add_argument("--config", metavar="JSON", help="model config of --checkpoint (unset: the one next to it)")
    inputs = model.add_mutually_exclusive_group()
    inputs.add_argument("--prompt", metavar="TEXT", help="the sequence as text (needs a tokenizer)")
    inputs.add_argument("--text", metavar="FILE", help="the sequence as text: the first line of FILE")
    inputs.add_argument(
        "--tokens", metavar="FILE", help="the sequence as token ids: the first line of FILE, whitespace-separated"
    )
    model.add_argument("--tokenizer", metavar="DIR", help="directory with a Hugging Face tokenizer (unset: --hf-dir)")
    model.add_argument(
        "--graph",
        metavar="SPEC",
        help="token graph the model runs on (unset: its own: 'native', each layer's graph, for a Hugging "
        "Face model; its run's topology for a 'train' checkpoint)",
    )
    p.add_argument("-o", "--out", metavar="HTML", help="output file (default: <name>.html in the current directory)")
    p.add_argument(
        "--max-edges",
        type=positive_int,
        default=DEFAULT_MAX_EDGES,
        help="edges per view drawn one by one; a larger graph is drawn on blocks of tokens",
    )
    p.add_argument("--title", help="the page's heading (default: the spec's or model's name)")
    p.set_defaults(func=run)


def _sequence(args, loaded) -> list[int]:
    """The one sequence of a model page: from --prompt, --text, --tokens or the run's task."""
    from ..experiments import analyze_run

    if args.prompt is not None:
        if loaded.tokenizer is None:
            raise ValueError("'--prompt' needs a tokenizer: save one in '--hf-dir' or pass '--tokenizer'")
        sequences = [loaded.tokenizer(args.prompt)["input_ids"]]
        source = "'--prompt'"
    elif args.text is not None:
        sequences = analyze_run.read_text_file(args.text, loaded.tokenizer)
        source = f"'--text' {args.text!r}"
    elif args.tokens is not None:
        sequences = analyze_run.read_token_file(args.tokens)
        source = f"'--tokens' {args.tokens!r}"
    elif loaded.examples is not None:
        sequences, source = loaded.examples(1), "an example of the run's task"
    else:
        raise ValueError(
            "Give the sequence with '--prompt', '--text' or '--tokens' (only a 'train' run's "
            "checkpoint can draw an example of its task)"
        )
    analyze_run.check_sequences(loaded, sequences[:1], source)
    return list(sequences[0])


def _model_page(args):
    from ..experiments import analyze_run
    from ..viz import model_page

    if args.checkpoint is not None:
        loaded = analyze_run.load_checkpoint_model(args.checkpoint, args.config)
    else:
        loaded = analyze_run.load_hf_model(args.hf_dir)
    if args.tokenizer is not None:
        analyze_run.use_tokenizer(loaded, args.tokenizer)
    tokens = _sequence(args, loaded)
    return model_page(loaded, tokens, graph=args.graph, title=args.title)


def _check_args(args) -> None:
    given = [
        name
        for name, value in (("SPEC", args.spec), ("--checkpoint", args.checkpoint), ("--hf-dir", args.hf_dir))
        if value is not None
    ]
    if len(given) != 1:
        raise UsageError(f"view needs exactly one of SPEC, --checkpoint or --hf-dir (got {', '.join(given) or 'none'})")
    if args.spec is not None:
        for option, value in (
            ("--config", args.config),
            ("--prompt", args.prompt),
            ("--text", args.text),
            ("--tokens", args.tokens),
            ("--tokenizer", args.tokenizer),
            ("--graph", args.graph),
        ):
            if value is not None:
                raise UsageError(f"{option} applies to a model (--checkpoint or --hf-dir), not to a SPEC")
    else:
        for option, value in (("-n", args.n), ("--paper-scale", args.paper_scale or None), ("--layers", args.layers)):
            if value is not None:
                raise UsageError(f"{option} applies to a SPEC, not to a model (its sequence and layers are its own)")
    if args.config is not None and args.checkpoint is None:
        raise UsageError("--config applies to --checkpoint")


def _default_out(args) -> Path:
    if args.spec is not None:
        from ..experiments.topologies import parse_spec

        return Path(f"{Path(parse_spec(args.spec)[0]).stem}.html")
    source = Path(args.checkpoint) if args.checkpoint is not None else Path(args.hf_dir)
    name = source.stem if args.checkpoint is not None else source.resolve().name
    return Path(f"{name or 'model'}_attention.html")


def run(args) -> int:
    from ..viz import reduce_page, to_html, topology_page, write_html

    _check_args(args)
    out = Path(args.out) if args.out else _default_out(args)
    check_out_file("--out", str(out))
    try:
        if args.spec is not None:
            page = topology_page(args.spec, args.n, paper_scale=args.paper_scale, layers=args.layers, title=args.title)
        else:
            page = _model_page(args)
        page = reduce_page(page, args.max_edges)
        text = to_html(page, max_edges=args.max_edges)
        write_html(text, out)
    except (FileNotFoundError, ValueError) as err:  # reported before anything is written
        error(str(err))
        return EXIT_USAGE
    except OSError as err:
        error(f"--out: cannot write {str(out)!r}: {err.strerror or err}")
        return EXIT_USAGE
    views = sum(len(layer.views) for layer in page.layers)
    reduced = f" (drawn on blocks of {page.block} tokens)" if page.block > 1 else ""
    print(
        f"{page.title}: {len(page.layers)} layer entr{'y' if len(page.layers) == 1 else 'ies'}, {views} "
        f"view{'s' * (views != 1)}, up to {page.max_view_edges} edges per view{reduced}"
    )
    print(f"Wrote {out}")
    return EXIT_OK
