"""The ``gnn-transformer`` command line.

Subcommands: ``compare`` (the main experiment), ``verify``, ``show``, ``train``, ``bench`` and
``analyze``. ``gnn-transformer <command> --help`` lists the options of each.

Exit codes: 0 success; 1 a check failed (``verify`` found a mismatch) or the run failed;
2 bad usage (unknown option, bad value, unknown topology, missing CUDA or optional dependency).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with the user's request (exit code 2)."""


def _err(message: str) -> None:
    print(f"gnn-transformer: error: {message}", file=sys.stderr)


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table: columns are (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([format(row[k], f) if f else str(row[k]) for k, _, f in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer (got {text!r})") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 (got {text!r})")
    return value


def _sizes(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size range like 4-8 (got {text!r})") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 1 <= lo <= hi (got {text!r})")
    return lo, hi


# ---------------------------------------------------------------- bad values
# Config objects (TrainConfig, EncoderConfig, ...) raise ValueError("Expected '<field>' ...");
# main() names the option that set the field. Fields whose option has another name:
FIELD_DESTS = {"nhead": "heads", "num_layers": "layers", "dim_feedforward": "ff"}


def _name_option(message: str, args: argparse.Namespace) -> str:
    """``"Expected 'nhead' >= 1 (got 0)"`` -> ``"--heads: Expected 'nhead' >= 1 (got 0)"``."""
    match = re.match(r"Expected '(\w+)'", message)
    dest = FIELD_DESTS.get(match[1], match[1]) if match else None
    if dest is None or dest not in vars(args):
        return message
    return f"--{dest.replace('_', '-')}: {message}"


class _Given(argparse.Action):
    """Store an option's value and record that it was given: ``train`` refuses an option that
    does not apply to its task only when the user gave it, never for its default."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def _check_out_dir(option: str, path: str) -> None:
    """An output folder (created if missing): refuse it if it or a parent is not a folder."""
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"{option}: {str(p)!r} exists and is not a directory")
            return


def _check_out_file(option: str, path: str) -> None:
    """An output file: refuse a folder, or a file whose folder does not exist."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option}: {path!r} is a directory, expected a file path")
    if not p.parent.is_dir():
        raise UsageError(f"{option}: the directory {str(p.parent)!r} of {path!r} does not exist")


def _check_device(option: str, name: str) -> None:
    """A device the commands run on: ``cpu``, or ``cuda`` / ``cuda:<index>`` of a present GPU."""
    from .experiments.training import resolve_device

    try:
        resolve_device(name)
    except ValueError as err:
        raise UsageError(f"{option}: {err}") from None


# ---------------------------------------------------------------- shared options
def _add_model_args(p: argparse.ArgumentParser, defaults) -> None:
    from .attention import BACKENDS

    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=int, default=defaults.d_model, help="model width (default %(default)s)")
    g.add_argument("--heads", type=int, default=defaults.nhead, help="attention heads (default %(default)s)")
    g.add_argument("--layers", type=int, default=defaults.num_layers, help="encoder layers (default %(default)s)")
    g.add_argument("--ff", type=int, default=defaults.dim_feedforward,
                   help="feed-forward width (default %(default)s)")
    g.add_argument("--dropout", type=float, default=defaults.dropout, help="dropout (default %(default)s)")
    g.add_argument("--post-norm", action="store_true", help="post-norm layers as in the original paper "
                   "(default: pre-norm)")
    g.add_argument("--position", choices=("rope", "sinusoidal", "learned", "none"), action=_Given,
                   default=defaults.position, help="token positions (default %(default)s)")
    g.add_argument("--backend", choices=BACKENDS, default=defaults.backend,
                   help="attention backend (default %(default)s)")


def _add_train_args(p: argparse.ArgumentParser, defaults) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help="sequences/graphs/images per step and process (default %(default)s)")
    g.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (default %(default)s)")
    g.add_argument("--optimizer", choices=("adamw", "adam"), default=defaults.optimizer,
                   help="default %(default)s")
    g.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="default %(default)s")
    g.add_argument("--warmup", type=int, default=defaults.warmup, help="warmup steps (default %(default)s)")
    g.add_argument("--schedule", choices=("cosine", "inverse_sqrt", "linear", "constant"),
                   default=defaults.schedule, help="decay after warmup (default %(default)s)")
    g.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing,
                   help="default %(default)s")
    g.add_argument("--clip-grad", type=float, default=defaults.clip_grad,
                   help="max gradient norm, 0 to disable (default %(default)s)")
    g.add_argument("--seed", type=int, default=defaults.seed, help="default %(default)s")
    g.add_argument("--device", default=defaults.device, help="cpu or cuda (default %(default)s)")
    g.add_argument("--log-every", type=int, default=defaults.log_every, help="default %(default)s")
    g.add_argument("--eval-every", type=int, default=defaults.eval_every,
                   help="steps between evaluations, 0 = at the end (default %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


SEED_MAX = 2**63 - 1  # as the seeds of topology specs: a torch.Generator seed


def _check_seed(seed: int) -> None:
    if not 0 <= seed <= SEED_MAX:
        raise UsageError(f"--seed: expected an integer in [0, 2**63 - 1] (got {seed})")


def _model_config(args):
    from .experiments.models import EncoderConfig

    return EncoderConfig(d_model=args.d_model, nhead=args.heads, num_layers=args.layers,
                         dim_feedforward=args.ff, dropout=args.dropout,
                         norm_first=not args.post_norm, position=args.position, backend=args.backend)


def _train_config(args):
    from .experiments.training import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       optimizer=args.optimizer, weight_decay=args.weight_decay,
                       warmup=args.warmup, schedule=args.schedule,
                       label_smoothing=args.label_smoothing,
                       clip_grad=args.clip_grad or None, seed=args.seed, device=args.device,
                       log_every=args.log_every, eval_every=args.eval_every)


# ---------------------------------------------------------------- compare
COMPARE_COLUMNS = [
    ("topology", "topology", ""), ("edges_per_seq", "edges/seq", ".1f"), ("density", "density", ".2f"),
    ("max_dense_error", "max err vs dense", ".1e"), ("final_loss", "final loss", ".3f"),
    ("acc_test", "acc (train sizes)", ".3f"), ("acc_longer", "acc (longer)", ".3f"),
    ("tokens_per_s", "tokens/s", ",.0f"), ("memory_mib", "memory MiB", ".1f"),
]


def _compare_parser(sub) -> None:
    from .experiments.compare import CompareConfig
    from .experiments.runs import ALL_TASKS
    from .experiments.tasks import TASKS

    d = CompareConfig()
    p = sub.add_parser(
        "compare", help="train one model under several topologies and compare them (main job)",
        description="Train the same small transformer (same initial weights, same batches) under "
        "several attention topologies on a built-in task; print a table, save results.json, "
        "results.csv and compare.png (loss curves, accuracies, adjacency pictures) in --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default=d.task, help="sequence task")
    p.add_argument("--topology", dest="topologies", action="append", metavar="SPEC",
                   help="topology spec, repeatable: a builder with arguments such as "
                   "'sliding_window:window=3' or a catalogue name (see 'gnn-transformer show "
                   f"--list'); default: {' '.join(d.topologies)}")
    p.add_argument("--train-sizes", type=_sizes, help="instance sizes to train on, e.g. 6-12")
    p.add_argument("--test-sizes", type=_sizes, help="longer sizes to test on, e.g. 13-24")
    p.add_argument("--eval-size", type=int, default=d.eval_size, help="sequences per evaluation set")
    p.add_argument("--out", default="runs/compare", help="output folder")
    _add_model_args(p, d.model)
    _add_train_args(p, d.train)
    p.set_defaults(func=cmd_compare, all_tasks=ALL_TASKS)


def cmd_compare(args) -> int:
    from .experiments.compare import CompareConfig, run_compare, save_compare

    _check_out_dir("--out", args.out)
    _check_device("--device", args.device)
    _check_seed(args.seed)
    config = CompareConfig(task=args.task, topologies=tuple(args.topologies or CompareConfig().topologies),
                           train_sizes=args.train_sizes, test_sizes=args.test_sizes,
                           model=_model_config(args), train=_train_config(args),
                           eval_size=args.eval_size)
    print(f"compare: task {config.task!r}, {len(config.topologies)} topologies, "
          f"{config.train.steps} steps each, device {config.train.device}")

    def report(r) -> None:
        print(f"  {r.topology}: acc {r.acc_test:.3f} (longer {r.acc_longer:.3f}), "
              f"{r.train_seconds:.1f} s", flush=True)

    result = run_compare(config, progress=not args.no_progress, on_result=report)
    print()
    print(_table([r.row() for r in result.results], COMPARE_COLUMNS))
    paths = save_compare(result, args.out)
    print(f"\n{result.seconds:.0f} s in all. Wrote {paths['json']}, {paths['csv']}, {paths['figure']}")
    return EXIT_OK


# ---------------------------------------------------------------- verify
def _verify_parser(sub) -> None:
    from .attention import BACKENDS

    p = sub.add_parser(
        "verify", help="check graph attention against the dense reference on every topology",
        description="Run every topology of the graphs/ catalogue (or the given specs) through "
        "GraphMultiheadAttention with each backend and through the dense reference with the same "
        "weights; print the largest output and gradient differences. Exit code 1 on any mismatch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("specs", nargs="*", metavar="SPEC",
                   help="topology specs (default: every spec of the graphs/ catalogue)")
    p.add_argument("--lengths", type=int, nargs="+", default=[23, 40],
                   help="sequence lengths of the batch each topology is built on")
    p.add_argument("--backend", action="append", choices=[b for b in BACKENDS if b != "auto"],
                   help="backend to check, repeatable (default: all available)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--device", default="cpu")
    p.add_argument("--paper-scale", action="store_true",
                   help="build catalogue specs with their paper parameters instead of their "
                   "toy-scale [small] ones (windows of thousands cover short sequences entirely)")
    p.add_argument("--json", dest="json_path", help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args) -> int:
    import torch

    from .experiments.topologies import label, spec_names
    from .experiments.verify import verify_topologies

    _check_device("--device", args.device)
    specs = args.specs or spec_names()
    if not specs:
        raise UsageError("no topology to verify: the graphs/ catalogue is empty; pass SPEC names")
    if args.json_path:
        _check_out_file("--json", args.json_path)
    rows, unbuilt = [], []

    def show(row) -> None:
        rows.append(row)
        status = "ok" if row.ok else "MISMATCH"
        print(f"  {row.topology:<28} {row.backend:<6} {row.edges:>7} edges  "
              f"out {row.max_out_error:.1e}  grad {row.max_grad_error:.1e}  {status}", flush=True)

    def not_built(spec: str, err: ValueError) -> None:
        unbuilt.append(spec)
        print(f"  {label(spec):<28} cannot be built on lengths {args.lengths}: {err}", flush=True)

    print(f"verify: {len(specs)} topologies on lengths {args.lengths}, {args.dtype}")
    verify_topologies(specs, args.lengths, backends=args.backend, dtype=getattr(torch, args.dtype),
                      device=args.device, small=not args.paper_scale, on_row=show,
                      on_error=not_built)
    bad = [r for r in rows if not r.ok]
    if args.json_path:
        Path(args.json_path).write_text(json.dumps([{**asdict(r), "ok": r.ok} for r in rows], indent=2))
    if rows:
        print(f"\n{len(rows) - len(bad)}/{len(rows)} checks within tolerance {rows[0].tolerance:g}")
    if bad:
        _err(f"{len(bad)} mismatches: " + ", ".join(f"{r.topology}/{r.backend}" for r in bad))
        return EXIT_FAIL
    if unbuilt:
        _err(f"{len(unbuilt)} of {len(specs)} topologies cannot be built on --lengths "
             f"{' '.join(map(str, args.lengths))}: " + ", ".join(map(label, unbuilt)))
        return EXIT_USAGE
    return EXIT_OK


# ---------------------------------------------------------------- show
# show draws every edge: graphs of at most this many tokens and edges draw in seconds
SHOW_N_MAX = 256
SHOW_EDGES_MAX = 2048


def _show_parser(sub) -> None:
    p = sub.add_parser(
        "show", help="draw a topology to PNG and print its statistics",
        description="Build a topology (builder with arguments, e.g. 'bigbird:window=1', or a "
        "catalogue spec name or .toml path) on one sequence of -n tokens, print its statistics "
        "and save its adjacency matrix and graph drawing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("spec", nargs="?", help="topology spec")
    p.add_argument("-n", type=_positive_int,
                   help=f"sequence length, at most {SHOW_N_MAX}; the graph drawn has at most "
                   f"{SHOW_EDGES_MAX} edges (default: the spec's [small] n, else 16)")
    p.add_argument("--paper-scale", action="store_true",
                   help="build catalogue and .toml specs with their paper parameters instead of "
                   "their toy-scale [small] ones")
    p.add_argument("--out", help="PNG path (default: <name>.png in the current directory, the "
                   "file's stem for a .toml path)")
    p.add_argument("--layers", type=_positive_int, default=3,
                   help="layers for the receptive-field sizes")
    p.add_argument("--list", action="store_true", help="list builders and catalogue specs")
    p.set_defaults(func=cmd_show)


def _show_stats(topology, edge_index, n: int, layers: int, indent: str = "  ") -> None:
    """Print the statistics of one graph on one sequence of ``n`` tokens."""
    stats = topology.topology_stats(edge_index, [n])
    print(f"{indent}edges {stats.num_edges}, density {stats.density:.3f}, causal {stats.causal}")
    print(f"{indent}keys per query: min {stats.in_degree.min}, max {stats.in_degree.max}, "
          f"mean {stats.in_degree.mean:.2f}; self-loops {stats.self_loops}; "
          f"queries with no key {stats.empty_rows}")
    sizes = topology.receptive_field_sizes(edge_index, layers, n)
    for k in range(1, layers + 1):
        s = sizes[k]
        print(f"{indent}receptive field after {k} layer(s): mean {sum(s) / len(s):.1f} of {n} tokens")


def _show_per_head(topology, graph, num_heads: int, n: int, title: str, out: Path, indent: str = "  ") -> None:
    """Print edges and keys per query of each head, draw one matrix per head."""
    import torch

    edge_index, edge_head = graph
    counts = torch.bincount(edge_head, minlength=num_heads).tolist()
    for h in range(num_heads):
        print(f"{indent}head {h}: {counts[h]} edges, mean {counts[h] / max(n, 1):.2f} keys per query")
    topology.draw_per_head(edge_index, edge_head, num_heads, title=title, path=out)


def _graph_edges(graph) -> int:
    from .topology.specs import LayerPattern

    if isinstance(graph, LayerPattern):
        return max(_graph_edges(g) for g in graph.graphs)
    return int((graph[0] if isinstance(graph, tuple) else graph).size(1))


def cmd_show(args) -> int:
    from . import topology
    from .experiments.topologies import builder_names, label, parse_spec, resolve_topology, spec_names, split_select

    if args.list or not args.spec:
        if not args.list:
            raise UsageError("show needs a SPEC (or --list)")
        print("builders:", " ".join(builder_names()))
        print("catalogue specs:", " ".join(spec_names()))
        return EXIT_OK
    if args.n is not None and args.n > SHOW_N_MAX:
        raise UsageError(f"-n: expected at most {SHOW_N_MAX} tokens, what show draws in seconds "
                         f"(got {args.n})")
    name, _ = parse_spec(args.spec)
    topo = resolve_topology(args.spec, small=not args.paper_scale)  # unknown names fail here
    spec = topo.source  # a catalogue name or spec file rather than a builder (topology_fn's precedence)
    out = Path(args.out or f"{Path(name).stem}.png")
    _check_out_file("--out", str(out))
    n = args.n or (spec and spec.small_n) or 16
    if n > SHOW_N_MAX:
        raise UsageError(f"{args.spec!r}: its [small] n = {n} is more than show draws ({SHOW_N_MAX} "
                         "tokens); pass a smaller -n")
    graph = topo.build([n])
    if _graph_edges(graph) > SHOW_EDGES_MAX:
        raise UsageError(f"-n: {label(args.spec)} on n = {n} has {_graph_edges(graph)} edges, more than "
                         f"show draws in seconds ({SHOW_EDGES_MAX}); pass a smaller -n (got {n})")
    if spec is not None:
        title = spec.name + (" (small)" if (spec.small_params or spec.small_select) and not args.paper_scale else "")
    else:
        title = label(args.spec)
    if spec is not None and split_select(args.spec)[1] is not None:
        title += f"+{split_select(args.spec)[1]}"
    kind = ""
    if topo.kind == "per_head":
        kind = f", per head ({topo.num_heads} heads)"
    elif topo.kind == "per_layer":
        kind = f", per layer (a cycle of {graph.period} layers)"
    print(f"{title} on n = {n}{kind}")
    if topo.select is not None:
        print(f"  each layer selects its per-head graph within this one with {topo.select!r}; "
              "shown: the allowed graph")
    written = []
    if topo.kind == "per_layer":
        for layers, g in graph.distinct():
            which = ", ".join(map(str, layers))
            path = out.with_name(f"{out.stem}_layer{'_'.join(map(str, layers))}{out.suffix}")
            print(f"  layer{'s' * (len(layers) > 1)} {which} (of every {graph.period}):")
            sub = f"{title}, layer{'s' * (len(layers) > 1)} {which} of {graph.period}"
            if isinstance(g, tuple):
                _show_per_head(topology, g, topo.num_heads, n, sub, path, "    ")
            else:
                _show_stats(topology, g, n, args.layers, "    ")
                topology.draw_topology(g, title=sub, path=path)
            written.append(path)
    elif topo.kind == "per_head":
        _show_per_head(topology, graph, topo.num_heads, n, title, out)
        written.append(out)
    else:
        _show_stats(topology, graph, n, args.layers)
        topology.draw_topology(graph, title=title, path=out)
        written.append(out)
    if spec is not None and spec.source:
        print(f"  source: {spec.source}")
    print("Wrote " + ", ".join(map(str, written)))
    return EXIT_OK


# ---------------------------------------------------------------- train
def _train_parser(sub) -> None:
    from .experiments.models import EncoderConfig
    from .experiments.runs import ALL_TASKS
    from .experiments.training import TrainConfig

    p = sub.add_parser(
        "train", help="one training run with all options (runs under torchrun too)",
        description="Train one model on a built-in task under one topology. Sequence tasks take "
        "a topology spec; graph tasks (karate, shortest_path) 'graph' or 'full'; digits 'grid' or "
        "'full'. Writes train_log.csv, train_eval.csv, train.json, loss.png and model.pt in --out. "
        "Under 'torchrun --nproc_per_node=K -m gnn_transformer.cli train ...' it trains with "
        "DistributedDataParallel.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=ALL_TASKS, default="recall")
    p.add_argument("--topology", default=None,
                   help="topology spec (default: full; 'graph' for graph tasks, 'grid' for digits)")
    p.add_argument("--train-sizes", type=_sizes, help="instance sizes to train on, e.g. 6-12")
    p.add_argument("--test-sizes", type=_sizes, help="longer sizes to test on, e.g. 13-24")
    p.add_argument("--pe-dim", type=int, default=4, action=_Given,
                   help="graph tasks: Laplacian eigenvector PE size")
    p.add_argument("--virtual-node", action="store_true", help="graph tasks: add a virtual node")
    p.add_argument("--patch", type=int, default=2, action=_Given, help="digits: patch side in pixels")
    p.add_argument("--out", default="runs/train", help="output folder")
    p.add_argument("--save-all-ranks", action="store_true",
                   help="under torchrun, every rank also writes model_rank<r>.pt")
    _add_model_args(p, EncoderConfig())
    _add_train_args(p, TrainConfig())
    p.set_defaults(func=cmd_train)


def _check_task_options(args) -> None:
    """Refuse the options given for another task than ``--task`` (their defaults never count)."""
    from .experiments.runs import GRAPH_TASKS, SIZED_TASKS, VISION_TASKS
    from .experiments.tasks import TASKS

    given = {*getattr(args, "given", ()),  # options with defaults, see _Given
             *(name for name in ("train_sizes", "test_sizes", "virtual_node") if getattr(args, name))}
    for name, tasks in (("train_sizes", SIZED_TASKS), ("test_sizes", SIZED_TASKS),
                        ("pe_dim", GRAPH_TASKS), ("virtual_node", GRAPH_TASKS),
                        ("patch", VISION_TASKS), ("position", tuple(TASKS))):
        if name in given and args.task not in tasks:
            raise UsageError(f"--{name.replace('_', '-')} does not apply to task {args.task!r} "
                             f"(only to {', '.join(tasks)})")


def cmd_train(args) -> int:
    from .experiments.distributed import from_environment
    from .experiments.figures import loss_figure
    from .experiments.runs import GRAPH_TASKS, RunConfig, run_training

    _check_task_options(args)
    _check_out_dir("--out", args.out)
    _check_device("--device", args.device)
    _check_seed(args.seed)
    topology = args.topology or ("graph" if args.task in GRAPH_TASKS
                                 else "grid" if args.task == "digits" else "full")
    config = RunConfig(task=args.task, topology=topology, train_sizes=args.train_sizes,
                       test_sizes=args.test_sizes, pe_dim=args.pe_dim,
                       virtual_node=args.virtual_node, patch=args.patch,
                       model=_model_config(args), train=_train_config(args), out=args.out,
                       save_all_ranks=args.save_all_ranks)
    info = from_environment()
    main = info.is_main
    if main:
        print(f"train: task {config.task!r}, topology {topology!r}, {config.train.steps} steps"
              + (f", {info.world_size} processes" if info.enabled else ""), flush=True)
    start = time.perf_counter()
    result, _ = run_training(config, progress=main and not args.no_progress)
    if main:
        loss_figure(result.history, Path(args.out) / "loss.png", f"{config.task} / {topology}")
        accs = ", ".join(f"{k} {v:.3f}" for k, v in result.final.items() if k.startswith("acc"))
        print(f"final loss {result.final['final_loss']:.4f}, {accs}")
        print(f"{result.tokens_per_s:,.0f} tokens/s, {time.perf_counter() - start:.1f} s; "
              f"wrote {args.out}/model.pt and logs")
    return EXIT_OK


# ---------------------------------------------------------------- bench
def _bench_parser(sub) -> None:
    from .bench.benchmark import BACKENDS, TOPOLOGIES
    from .bench.selection import DESCRIPTIONS, SELECTIONS

    p = sub.add_parser(
        "bench", help="benchmark the attention backends against dense SDPA and FlexAttention",
        description="Time forward and forward+backward of each attention backend (pyg, fused, "
        "tiled, auto), dense scaled_dot_product_attention with a boolean mask and FlexAttention "
        "with a BlockMask, on the same edge sets; median time, peak memory, max error against a "
        "float32 dense reference. Graph and mask construction are timed separately.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES), metavar="SPEC",
                   help="the benchmark's graphs (causal; window: radius 128; bigbird: blocks of 64, "
                        "3 window, 2 global, 3 random; random: 64 keys per query) or any topology "
                        "spec: a builder with arguments ('dilated:window=256,dilation=4'), a "
                        "catalogue name ('longformer') or a .toml path")
    p.add_argument("--sizes", nargs="+", type=int, default=None,
                   help="token counts (unset: 4096 16384 65536, plus 262144 1048576 for the "
                        "linear-size topologies on CUDA; 4096 with --quick)")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--device", default=None, help="cpu or cuda (unset: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="unset: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=None,
                   help="key/value heads (grouped-query attention; must divide --heads; unset: --heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repetitions, median reported (default 5; 3 with --quick or --calibrate)")
    p.add_argument("--no-backward", action="store_true", help="forward passes only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (unset: torch's)")
    p.add_argument("--quick", action="store_true", help="CPU-sized: 4096 tokens, 3 repeats")
    p.add_argument("--markdown", default=None, metavar="FILE",
                   help="also write the table as markdown to FILE")
    p.add_argument("--calibrate", action="store_true",
                   help="instead, measure auto's cost model for this device and dtype: TILE_COST (the "
                        "time of a tile cell of 'tiled' over that of an edge of 'fused'), ROW_COST and "
                        "MERGE_COST (fixed costs per target row, in edges), DROPOUT_COST (what attention "
                        "dropout adds per edge and per cell); sizes default to 4096")
    p.add_argument("--block-size", type=int, default=None,
                   help="tile size of tiled, auto and --calibrate, a power of two from 16 to 256 (unset: "
                        "by device and dtype, 64, or 32 for float32 on CUDA; FlexAttention keeps blocks "
                        "of 128)")
    p.add_argument("--selectors", nargs="+", default=None, choices=list(SELECTIONS),
                   help="instead, time graphs chosen from the data, end to end with the graph rebuilt on "
                        "every call: selection + attention against FlexAttention with a BlockMask built per "
                        "call and SDPA with a dense boolean mask (" + "; ".join(
                            f"{k}: {v}" for k, v in DESCRIPTIONS.items()) + "); sizes default to 4096")
    p.set_defaults(func=cmd_bench)


def _calibrate(args, device, dtype) -> int:
    import torch

    from .bench.benchmark import (CALIBRATION_COLUMNS, calibrate_dropout_cost, calibrate_row_costs,
                                    calibrate_tile_cost, current_costs, format_markdown, format_table)

    sizes = args.sizes or [4096]
    common = dict(device=device, dtype=dtype, heads=args.heads, head_dim=args.head_dim, kv_heads=args.kv_heads,
                  block_size=args.block_size, repeats=args.repeats or 3)
    rows, suggested = calibrate_tile_cost(args.topologies, sizes, backward=not args.no_backward, log=print,
                                          **common)
    fixed = calibrate_row_costs(rows, suggested, max(sizes), **common)
    dropout = calibrate_dropout_cost(rows, **common)
    tile_cost, row_cost, merge_cost, dropout_cost = current_costs(device)
    kind = torch.device(device).type
    lines = ["TILE_COST measured (median ratio over the graphs): "
             + ", ".join(f"{p} {value:.3f}" for p, value in suggested.items())
             + f"; auto uses {tile_cost} on {kind}",
             "ROW_COST measured (edges per target row, fused / tiled): "
             + ", ".join(f"{p} {c['fused']:.1f} / {c['tiled']:.1f}" for p, c in fixed.items())
             + f"; auto uses {row_cost['fused']} / {row_cost['tiled']}",
             "MERGE_COST measured (edges per target row): "
             + ", ".join(f"{p} {c['merge']:.1f}" for p, c in fixed.items()) + f"; auto uses {merge_cost}",
             "DROPOUT_COST measured (edges added per fused edge / per tile cell, dropout 0.1): "
             + ", ".join(f"{p} {c['fused']:.2f} / {c['tiled']:.2f}" for p, c in dropout.items())
             + f"; auto uses {dropout_cost['fused']} / {dropout_cost['tiled']}"]
    print()
    print(format_table(rows, CALIBRATION_COLUMNS))
    print()
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text(format_markdown(rows, CALIBRATION_COLUMNS) + "\n\n"
                                       + "\n".join(f"- {line}" for line in lines) + "\n")
        print(f"Wrote {args.markdown}")
    return 0


def _bench_selection(args, device, dtype) -> int:
    import torch

    from .bench.selection import format_markdown, format_table, run_selection_benchmark

    baselines = [b for b in ("flex", "sdpa") if b in args.backends]
    rows = run_selection_benchmark(args.selectors, args.sizes or [4096], heads=args.heads, kv_heads=args.kv_heads,
                                   head_dim=args.head_dim, device=device, dtype=dtype or torch.float32,
                                   repeats=args.repeats or (3 if args.quick else 5), backward=not args.no_backward,
                                   baselines=baselines, log=print)
    print()
    print(format_table(rows))
    if args.markdown:
        Path(args.markdown).write_text(format_markdown(rows) + "\n")
        print(f"Wrote {args.markdown}")
    return EXIT_OK


def _check_bench_topologies(names, smallest: int) -> None:
    """Refuse unknown specs, and specs that cannot be built at the smallest of ``--sizes`` (before
    any timing, as ``compare`` builds its topologies before training)."""
    from .experiments.topologies import resolve_topology
    from .bench.benchmark import TOPOLOGIES, build_graph

    for name in names:
        if name not in TOPOLOGIES:
            try:
                topo = resolve_topology(name)
            except ValueError as err:
                raise UsageError(f"--topologies: {err}") from None
            if topo.kind != "shared" or topo.select is not None:
                what = ("graphs chosen from the data" if topo.select is not None
                        else f"{topo.kind.replace('_', '-')} graphs")
                raise UsageError(f"--topologies {name!r}: bench times a graph for every head and layer, not "
                                 f"{what}; time selectors with 'bench --selectors topk block_topk', "
                                 "check these with 'verify'")
    for name in names:
        try:
            build_graph(name, smallest)
        except ValueError as err:
            raise UsageError(f"--topologies {name!r} cannot be built at --sizes {smallest}: {err}") from None


def _check_bench_inputs(args, device: str, dtype) -> None:
    """Refuse --heads / --head-dim / --sizes whose query, key, value and gradient tensors alone
    would not fit in memory (the benchmark skips sizes whose graphs do not fit, not its inputs)."""
    import torch

    from .bench.benchmark import input_memory_budget

    n = max(args.sizes or [4096])
    heads, kv_heads = args.heads, args.kv_heads or args.heads
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    need = 2 * n * (2 * heads + 2 * kv_heads) * args.head_dim * torch.tensor([], dtype=dtype).element_size()
    budget = input_memory_budget(device)
    if need > budget:
        raise UsageError(f"--heads {heads}, --head-dim {args.head_dim} and --sizes {n}: the inputs and their "
                         f"gradients need {need / 2**30:.1f} GiB, more than the benchmark's memory budget "
                         f"({budget / 2**30:.1f} GiB)")


def cmd_bench(args) -> int:
    import torch

    from .experiments.training import resolve_device
    from .bench.benchmark import BLOCK_SIZES, LINEAR, format_markdown, format_table, run_benchmark

    for name in ("heads", "head_dim", "repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.sizes is not None and min(args.sizes) < 1:
        raise UsageError(f"--sizes must be positive (got {args.sizes})")
    if args.kv_heads is not None and (args.kv_heads < 1 or args.heads % args.kv_heads):
        raise UsageError(f"--kv-heads must divide --heads {args.heads} (got {args.kv_heads})")
    if args.block_size is not None:
        if args.block_size < 1 or args.block_size & (args.block_size - 1):
            raise UsageError(f"--block-size must be a power of two (got {args.block_size})")
        if args.block_size not in BLOCK_SIZES:
            raise UsageError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))} "
                             f"(got {args.block_size})")
    if args.device is not None:
        _check_device("--device", args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    resolve_device(device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    _check_bench_inputs(args, device, dtype)
    if args.markdown:
        _check_out_file("--markdown", args.markdown)
    _check_bench_topologies(args.topologies, min(args.sizes or [4096]))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.calibrate:
        return _calibrate(args, device, dtype)
    if args.selectors:
        return _bench_selection(args, device, dtype)
    if args.quick:
        sizes, repeats = args.sizes or [4096], args.repeats or 3
    else:
        sizes, repeats = args.sizes or [4096, 16384, 65536], args.repeats or 5
    rows = []
    for name in args.topologies:
        extra = [262144, 1048576] if (args.sizes is None and not args.quick and name in LINEAR
                                       and torch.device(device).type == "cuda") else []
        rows += run_benchmark([name], list(sizes) + extra, args.backends, device=device,
                              dtype=dtype, heads=args.heads, head_dim=args.head_dim, kv_heads=args.kv_heads,
                              repeats=repeats, backward=not args.no_backward, block_size=args.block_size,
                              log=print)
    print()
    print(format_table(rows))
    if args.markdown:
        Path(args.markdown).write_text(format_markdown(rows) + "\n")
        print(f"Wrote {args.markdown}")
    unbuilt = [f"{r['topology']} at n = {r['n']}" for r in rows if str(r["note"]).startswith("not built")]
    if unbuilt:  # as verify: the other rows are measured, the exit code says some are missing
        _err(f"{len(unbuilt)} of the --topologies cannot be built at some --sizes: " + ", ".join(unbuilt))
        return EXIT_USAGE
    return EXIT_OK


# ---------------------------------------------------------------- analyze
def _analyze_parser(sub) -> None:
    import importlib

    from .attention import BACKENDS

    p = sub.add_parser(
        "analyze", help="attention analytics of a model: sinks, hubs, massive activations, pictures",
        description="Attention analytics of a model: see gnn_transformer.experiments.analyze_run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    try:
        importlib.import_module("gnn_transformer.experiments.analyze_run")
    except ImportError:
        p.set_defaults(func=_analyze_missing)
        return
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="PATH",
                        help="model.pt of a 'train' run (sequence tasks), or a state dict of a "
                             "GraphLM/GraphEncoderModel with its config JSON next to it")
    source.add_argument("--hf-dir", metavar="DIR",
                        help="local directory of a Hugging Face BERT or GPT-2 (save_pretrained)")
    p.add_argument("--config", metavar="JSON",
                   help="model config of --checkpoint (unset: the one found next to it)")
    inputs = p.add_mutually_exclusive_group()
    inputs.add_argument("--tokens", metavar="FILE",
                        help="token ids, whitespace-separated, one sequence per line (required "
                             "except for a 'train' run's checkpoint, which can use its task)")
    inputs.add_argument("--text", metavar="FILE", help="text, one sequence per line")
    p.add_argument("--samples", type=int, default=2, metavar="K",
                   help="with a 'train' run's checkpoint and no --tokens: K sequences of its task")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="directory with a Hugging Face tokenizer (unset: --hf-dir)")
    p.add_argument("--out", metavar="DIR", default="analysis",
                   help="directory for summary.json and the PNGs")
    p.add_argument("--graph", metavar="NAME|TOML",
                   help="token graph: a catalogue name (causal, full, bigbird, ...), a builder "
                        "with arguments (sliding_window:window=3) or a spec file (unset: a "
                        "'train' run's own topology, causal for language models and GPT-2, "
                        "full otherwise)")
    p.add_argument("--compare-norm", action="store_true",
                   help="also run the same weights pre-norm and post-norm")
    p.add_argument("--backend", choices=BACKENDS,
                   help="attention backend while recording (unset: the model's)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens shown in the pictures")
    p.add_argument("--massive-magnitude", type=float, default=100.0,
                   help="massive activation: |h| above this")
    p.add_argument("--massive-ratio", type=float, default=1000.0,
                   help="massive activation: |h| above this times the median")
    p.add_argument("--no-plots", action="store_true", help="only print and write summary.json")
    p.set_defaults(func=cmd_analyze)


def _analyze_missing(args) -> int:
    _err("'analyze' is not available in this installation "
         "(gnn_transformer.experiments.analyze_run is missing)")
    return EXIT_USAGE


def cmd_analyze(args) -> int:
    from .analysis import format_table
    from .experiments import analyze_run

    _check_out_dir("--out", args.out)
    try:
        if args.max_tokens < 1:
            raise ValueError(f"Expected '--max-tokens' >= 1 (got {args.max_tokens})")
        for option, value in (("--massive-magnitude", args.massive_magnitude),
                              ("--massive-ratio", args.massive_ratio)):
            if not value >= 0:  # also refuses nan
                raise ValueError(f"Expected '{option}' >= 0 (got {value})")
        if args.checkpoint is not None:
            loaded = analyze_run.load_checkpoint_model(args.checkpoint, args.config, backend=args.backend)
        else:
            loaded = analyze_run.load_hf_model(args.hf_dir, backend=args.backend)
        if args.tokenizer is not None:
            loaded.tokenizer = analyze_run.load_tokenizer(args.tokenizer)
            if loaded.tokenizer is None:
                raise ValueError(f"Found no tokenizer in '--tokenizer' {args.tokenizer!r}")
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
            raise ValueError("Give the input with '--tokens' or '--text' (only a 'train' run's "
                             "checkpoint can draw examples of its task)")
        result = analyze_run.analyze(loaded, sequences, graph=args.graph, compare_norm=args.compare_norm,
                                     backend=args.backend, min_magnitude=args.massive_magnitude,
                                     min_ratio=args.massive_ratio)
    except (FileNotFoundError, ValueError) as err:  # reported as they are, before any output
        _err(str(err))
        return EXIT_USAGE
    print(f"{loaded.name}: {len(result.lengths)} sequence(s), {sum(result.lengths)} tokens, "
          f"{result.graph} graph")
    for label, rows in result.rows.items():
        if label != "model":
            print(f"\n[{label}]")
        print(format_table(rows))
        massive = [(r.name, m) for r in rows for m in r.massive]
        if massive:
            first_layer = massive[0][0]
            dims = sorted({d for _, (_, d, _) in massive})
            print(f"massive activations from {first_layer}, dims {dims}")
    paths = analyze_run.save_outputs(result, args.out, pictures=not args.no_plots,
                                     max_tokens=args.max_tokens)
    print(f"\nwrote {len(paths)} file{'s' if len(paths) != 1 else ''} to {args.out}")
    return EXIT_OK


# ---------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="gnn-transformer",
        description="Transformers are graph neural networks: attention as message passing on "
        "explicit token graphs, checked against dense attention.",
        epilog="Start with 'gnn-transformer compare'. Each command has --help.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _compare_parser(sub)
    _verify_parser(sub)
    _show_parser(sub)
    _train_parser(sub)
    _bench_parser(sub)
    _analyze_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe (gnn-transformer show ... | head) shows here
        return code
    except BrokenPipeError:
        # the reader is gone: send what Python flushes at exit to devnull, exit 1 like Python
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL
    except UsageError as e:
        _err(str(e))
        return EXIT_USAGE
    except ValueError as e:  # the library's boundary checks name the argument and the value
        _err(_name_option(str(e), args))
        return EXIT_USAGE
    except ImportError as e:
        _err(str(e))
        return EXIT_USAGE
    except FloatingPointError as e:
        _err(str(e))
        return EXIT_FAIL
    except (MemoryError, RuntimeError) as e:  # sizes the machine cannot hold (torch.OutOfMemoryError
        # and the CPU allocator's RuntimeError): the request is too large, not a failed run
        text = str(e)
        if isinstance(e, RuntimeError) and not ("out of memory" in text or "can't allocate memory" in text):
            raise
        _err(f"out of memory ({text.splitlines()[0][:200] if text else type(e).__name__}): ask for less "
             "(--batch-size, --d-model, --sizes, --heads, ...)")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
