"""``gnn-transformer show``: draw a topology to PNG and print its statistics."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import EXIT_OK, UsageError, positive_int, check_out_file


# show draws every edge: graphs of at most this many tokens and edges draw in seconds
SHOW_N_MAX = 256
SHOW_EDGES_MAX = 2048


def add_parser(sub) -> None:
    p = sub.add_parser(
        "show",
        help="draw a topology to PNG and print its statistics",
        description="Build a topology (builder with arguments, e.g. 'bigbird:window=1', or a "
        "catalogue spec name or .toml path) on one sequence of -n tokens, print its statistics "
        "and save its adjacency matrix and graph drawing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("spec", nargs="?", help="topology spec")
    p.add_argument(
        "-n",
        type=positive_int,
        help=f"sequence length, at most {SHOW_N_MAX}; the graph drawn has at most "
        f"{SHOW_EDGES_MAX} edges (default: the spec's [small] n, else 16)",
    )
    p.add_argument(
        "--paper-scale",
        action="store_true",
        help="build catalogue and .toml specs with their paper parameters instead of their toy-scale [small] ones",
    )
    p.add_argument(
        "--out", help="PNG path (default: <name>.png in the current directory, the file's stem for a .toml path)"
    )
    p.add_argument("--layers", type=positive_int, default=3, help="layers for the receptive-field sizes")
    p.add_argument("--list", action="store_true", help="list builders and catalogue specs")
    p.set_defaults(func=run)


def _show_stats(topology, edge_index, n: int, layers: int, indent: str = "  ") -> None:
    """Print the statistics of one graph on one sequence of ``n`` tokens."""
    stats = topology.topology_stats(edge_index, [n])
    print(f"{indent}edges {stats.num_edges}, density {stats.density:.3f}, causal {stats.causal}")
    print(
        f"{indent}keys per query: min {stats.in_degree.min}, max {stats.in_degree.max}, "
        f"mean {stats.in_degree.mean:.2f}; self-loops {stats.self_loops}; "
        f"queries with no key {stats.empty_rows}"
    )
    # a path has at most n - 1 edges: from there on (or once a layer adds nothing) it stays the same
    last = min(layers, n)
    sizes = topology.receptive_field_sizes(edge_index, last, n)
    for k in range(1, last + 1):
        if k > 1 and sizes[k] == sizes[k - 1]:
            last = k - 1
            break
        print(f"{indent}receptive field after {k} layer(s): mean {sum(sizes[k]) / n:.1f} of {n} tokens")
    if last < layers:
        print(f"{indent}receptive field after {last} to {layers} layers: the same")


def _show_per_head(topology, graph, num_heads: int, n: int, title: str, out: Path, indent: str = "  ") -> None:
    """Print edges and keys per query of each head, draw one matrix per head."""
    import torch

    edge_index, edge_head = graph
    counts = torch.bincount(edge_head, minlength=num_heads).tolist()
    for h in range(num_heads):
        print(f"{indent}head {h}: {counts[h]} edges, mean {counts[h] / max(n, 1):.2f} keys per query")
    topology.draw_per_head(edge_index, edge_head, num_heads, title=title, path=out)


def _graph_edges(graph) -> int:
    from ..topology.specs import LayerPattern

    if isinstance(graph, LayerPattern):
        return max(_graph_edges(g) for g in graph.graphs)
    return int((graph[0] if isinstance(graph, tuple) else graph).size(1))


def run(args) -> int:
    from .. import topology
    from ..experiments.topologies import builder_names, label, parse_spec, resolve_topology, spec_names, split_select

    if args.list or not args.spec:
        if not args.list:
            raise UsageError("show needs a SPEC (or --list)")
        print("builders:", " ".join(builder_names()))
        print("catalogue specs:", " ".join(spec_names()))
        return EXIT_OK
    if args.n is not None and args.n > SHOW_N_MAX:
        raise UsageError(f"-n: expected at most {SHOW_N_MAX} tokens, what show draws in seconds (got {args.n})")
    name, _ = parse_spec(args.spec)
    topo = resolve_topology(args.spec, small=not args.paper_scale)  # unknown names fail here
    spec = topo.source  # a catalogue name or spec file rather than a builder (topology_fn's precedence)
    out = Path(args.out or f"{Path(name).stem}.png")
    check_out_file("--out", str(out))
    n = args.n or (spec and spec.small_n) or 16
    if n > SHOW_N_MAX:
        raise UsageError(
            f"{args.spec!r}: its [small] n = {n} is more than show draws ({SHOW_N_MAX} tokens); pass a smaller -n"
        )
    graph = topo.build([n])
    if _graph_edges(graph) > SHOW_EDGES_MAX:
        raise UsageError(
            f"-n: {label(args.spec)} on n = {n} has {_graph_edges(graph)} edges, more than "
            f"show draws in seconds ({SHOW_EDGES_MAX}); pass a smaller -n (got {n})"
        )
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
        print(f"  each layer selects its per-head graph within this one with {topo.select!r}; shown: the allowed graph")
    written = []
    if topo.kind == "per_layer":
        for layers, g in graph.distinct():
            which = ", ".join(map(str, layers))
            path = out.with_name(f"{out.stem}_layer{'_'.join(map(str, layers))}{out.suffix}")
            print(f"  layer{'s' * (len(layers) > 1)} {which} (of every {graph.period}):")
            sub = f"{title}, layer{'s' * (len(layers) > 1)} {which} of {graph.period}"
            if isinstance(g, tuple):
                assert topo.num_heads is not None  # a per-head layer gives its spec its number of heads
                _show_per_head(topology, g, topo.num_heads, n, sub, path, "    ")
            else:
                _show_stats(topology, g, n, args.layers, "    ")
                topology.draw_topology(g, title=sub, path=path)
            written.append(path)
    elif topo.kind == "per_head":
        assert topo.num_heads is not None  # the kind of a topology with per-head graphs
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
