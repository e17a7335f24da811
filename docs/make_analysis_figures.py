"""Pictures of docs/analysis.md: a small GraphLM with a planted attention sink and a planted
massive activation, analysed with gnn_transformer.analysis.

Usage:
    python docs/make_analysis_figures.py            # writes docs/img/analysis_*.png

The model is a 4-layer pre-norm GraphLM with random weights except for two constructed pieces:
token 0 (a "beginning of sequence" token) carries a large marker feature; heads 0 and 1 of layer 1
match every query with that marker (an attention sink); one feed-forward unit of layer 2 fires only
on the marker and writes a huge value into residual dimension 7 (a massive activation). Runs in a
few seconds on a CPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from gnn_transformer.analysis import compare_norm_placement, extract, plots, summarize
from gnn_transformer.model import GraphLM, GraphTransformerConfig
from gnn_transformer.topology import causal

OUT = Path(__file__).resolve().parent / "img"
BOS, MARKER, QUERY, MASSIVE_DIM = 0, 0, 1, 7


def planted_model() -> GraphLM:
    """The GraphLM described in the module docstring."""
    torch.manual_seed(0)
    cfg = GraphTransformerConfig(vocab_size=32, d_model=32, nhead=4, num_layers=4, position="learned", backend="pyg")
    model = GraphLM(cfg).eval()
    c, d = cfg.d_model, cfg.d_model // cfg.nhead
    with torch.no_grad():
        model.embed.weight[:, MARKER] = 0.0
        model.embed.weight[BOS, MARKER] = 20.0  # the marker: only the first token has it
        model.embed.weight[:, QUERY] = 3.0  # a feature every token has
        model.pos_embed.weight.mul_(0.1)
        # layer 1, heads 0 and 1: the query reads the constant feature, the key the marker
        attn = model.encoder.layers[1].self_attn
        for h in (0, 1):
            attn.in_proj_weight[h * d : (h + 1) * d].zero_()
            attn.in_proj_weight[c + h * d : c + (h + 1) * d].zero_()
            attn.in_proj_weight[h * d, QUERY] = math.sqrt(2.0 * math.sqrt(d))
            attn.in_proj_weight[c + h * d, MARKER] = math.sqrt(2.0 * math.sqrt(d))
        # layer 2: feed-forward unit 0 fires where the normalized marker is large
        block = model.encoder.layers[2]
        block.linear1.weight[0].zero_()
        block.linear1.weight[0, MARKER] = 1.0
        block.linear1.bias[0] = -3.0
        block.linear2.weight[:, 0].zero_()
        block.linear2.weight[MASSIVE_DIM, 0] = 1000.0
    return model


def save(fig, name: str) -> Path:
    path = OUT / name
    fig.savefig(path, dpi=80)
    return path


def main() -> list[Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    model = planted_model()
    torch.manual_seed(1)
    n = 12
    ids = torch.cat([torch.tensor([BOS]), torch.randint(1, 32, (n - 1,))])
    labels = ["<s>"] + [f"t{int(t)}" for t in ids[1:]]
    pos, edge_index = torch.arange(n), causal(n)
    trace = extract(model, ids, edge_index, pos=pos)
    rows = summarize(trace)
    layer1 = trace.self_attention()[1]
    paths = [
        save(
            plots.plot_attention_heatmaps(layer1, labels, title="layer 1: heads 0-1 sink, heads 2-3 not"),
            "analysis_heatmaps.png",
        ),
        save(plots.plot_attention_arcs(layer1, 0, labels, title="layer 1, head 0 (a sink)"), "analysis_arcs_sink.png"),
        save(plots.plot_attention_arcs(layer1, 2, labels, title="layer 1, head 2"), "analysis_arcs_plain.png"),
        save(plots.plot_sink_scores(rows), "analysis_sink_scores.png"),
        save(plots.plot_activation_magnitudes(rows), "analysis_activations.png"),
    ]
    traces = compare_norm_placement(model, ids, edge_index, pos=pos)
    variants = {k: summarize(t) for k, t in traces.items()}
    paths.append(save(plots.plot_norm_comparison(variants), "analysis_norm_comparison.png"))
    return paths


if __name__ == "__main__":
    for p in main():
        print(p.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p)
