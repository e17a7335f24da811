"""``gnn-transformer analyze``: attention analytics of a model."""

from __future__ import annotations

import argparse

from ._common import EXIT_OK, EXIT_USAGE, Given, check_out_dir, error, name_option, warn


def add_parser(sub) -> None:
    import importlib

    from ..attention import BACKENDS

    p = sub.add_parser(
        "analyze",
        help="attention analytics of a model: sinks, hubs, massive activations, pictures",
        description="Attention analytics of a model: see gnn_transformer.experiments.analyze_run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    try:
        importlib.import_module("gnn_transformer.experiments.analyze_run")
    except ImportError:
        p.set_defaults(func=_analyze_missing)
        return
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="model.pt or best.pt of a 'train' run (sequence tasks, lm, listops), or a "
        "state dict of a GraphLM/GraphEncoderModel with its config JSON next to it",
    )
    source.add_argument(
        "--hf-dir",
        metavar="DIR",
        help="local directory of a Hugging Face model (save_pretrained) of a family gnn_transformer.hf imports",
    )
    p.add_argument("--config", metavar="JSON", help="model config of --checkpoint (unset: the one found next to it)")
    inputs = p.add_mutually_exclusive_group()
    inputs.add_argument(
        "--tokens",
        metavar="FILE",
        help="token ids, whitespace-separated, one sequence per line (required "
        "except for a 'train' run's checkpoint, which can use its task)",
    )
    inputs.add_argument(
        "--text",
        metavar="FILE",
        help="text, one sequence per line (tokenized with the "
        "Hugging Face tokenizer, or a 'train' run's characters (lm) or words (listops))",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=2,
        action=Given,
        metavar="K",
        help="with a 'train' run's checkpoint and no --tokens or --text: K sequences of its task",
    )
    p.add_argument("--tokenizer", metavar="DIR", help="directory with a Hugging Face tokenizer (unset: --hf-dir)")
    p.add_argument("--out", metavar="DIR", default="analysis", help="directory for summary.json and the PNGs")
    p.add_argument(
        "--graph",
        metavar="NAME|TOML",
        help="token graph: a catalogue name (causal, full, bigbird, ...), a builder "
        "with arguments (sliding_window:window=3) or a spec file, per-head "
        "(duo_attention: each head's weights over its own edges), per-layer (gemma3: "
        "each layer on its graph) or with a selector (causal+topk:num_keys=8: the "
        "graph each layer selects), or 'native' (unset: a 'train' run's own topology; for a Hugging "
        "Face model 'native', each layer's own graph (causal, or its family's sliding window; "
        "ModernBERT's local and global layers), causal for GPT-2, full for BERT; an lm run's graphs "
        "are cut to their causal part, as in its training)",
    )
    p.add_argument("--compare-norm", action="store_true", help="also run the same weights pre-norm and post-norm")
    p.add_argument("--backend", choices=BACKENDS, help="attention backend while recording (unset: the model's)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens shown in the pictures")
    p.add_argument("--massive-magnitude", type=float, default=100.0, help="massive activation: |h| above this")
    p.add_argument(
        "--massive-ratio", type=float, default=1000.0, help="massive activation: |h| above this times the median"
    )
    p.add_argument("--no-plots", action="store_true", help="only print and write summary.json")
    p.set_defaults(func=run)


def _analyze_missing(args) -> int:
    error("'analyze' is not available in this installation (gnn_transformer.experiments.analyze_run is missing)")
    return EXIT_USAGE


def run(args) -> int:
    from ..analysis import format_table
    from ..experiments import analyze_run

    check_out_dir("--out", args.out)
    try:
        if args.max_tokens < 1:
            raise ValueError(f"Expected '--max-tokens' >= 1 (got {args.max_tokens})")
        for option, value in (("--massive-magnitude", args.massive_magnitude), ("--massive-ratio", args.massive_ratio)):
            if not value >= 0:  # also refuses nan
                raise ValueError(f"Expected '{option}' >= 0 (got {value})")
        if args.checkpoint is not None:
            loaded = analyze_run.load_checkpoint_model(args.checkpoint, args.config, backend=args.backend)
        else:
            loaded = analyze_run.load_hf_model(args.hf_dir, backend=args.backend)
        if args.tokenizer is not None:
            analyze_run.use_tokenizer(loaded, args.tokenizer)
        if "samples" in getattr(args, "given", ()) and (args.tokens is not None or args.text is not None):
            given = "--tokens" if args.tokens is not None else "--text"
            raise ValueError(f"'--samples' draws examples of the run's task: it does not apply with '{given}'")
        if args.tokens is not None:
            sequences = analyze_run.read_token_file(args.tokens)
            analyze_run.check_sequences(loaded, sequences, f"'--tokens' {args.tokens!r}")
        elif args.text is not None:
            sequences = analyze_run.read_text_file(args.text, loaded.tokenizer)
            analyze_run.check_sequences(loaded, sequences, f"'--text' {args.text!r}")
        elif loaded.examples is not None:
            if args.samples < 1:
                raise ValueError(f"Expected '--samples' >= 1 (got {args.samples})")
            sequences = loaded.examples(args.samples)
        else:
            raise ValueError(
                "Give the input with '--tokens' or '--text' (only a 'train' run's "
                "checkpoint can draw examples of its task)"
            )
        result = analyze_run.analyze(
            loaded,
            sequences,
            graph=args.graph,
            compare_norm=args.compare_norm,
            backend=args.backend,
            min_magnitude=args.massive_magnitude,
            min_ratio=args.massive_ratio,
        )
    except (FileNotFoundError, ValueError) as err:  # reported before any output, naming the option
        message = str(err)
        if message.startswith("Expected 'sequences'"):  # the input as a whole: the option that gave it
            source = "--tokens" if args.tokens is not None else "--text" if args.text is not None else "--samples"
            message = f"{source}: {message}"
        error(name_option(message, args))
        return EXIT_USAGE
    print(f"{loaded.name}: {len(result.lengths)} sequence(s), {sum(result.lengths)} tokens, {result.graph} graph")
    for label, rows in result.rows.items():
        if label != "model":
            print(f"\n[{label}]")
        print(format_table(rows))
        massive = [(r.name, m) for r in rows for m in r.massive]
        if massive:
            first_layer = massive[0][0]
            dims = sorted({d for _, (_, d, _) in massive})
            print(f"massive activations from {first_layer}, dims {dims}")
    for label, rows in result.rows.items():
        broken = analyze_run.non_finite_layers(rows)
        if broken:
            where = "" if label == "model" else f" ({label})"
            warn(
                f"NaN or infinite attention weights or hidden states in {', '.join(broken)}{where}: "
                "their measures are NaN (null in summary.json)"
            )
    paths = analyze_run.save_outputs(result, args.out, pictures=not args.no_plots, max_tokens=args.max_tokens)
    print(f"\nwrote {len(paths)} file{'s' if len(paths) != 1 else ''} to {args.out}")
    return EXIT_OK
