"""Figures of the experiments (matplotlib, no display needed: ``Figure`` objects saved to PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from matplotlib.figure import Figure

from ..topology import to_dense_mask
from ..topology.specs import LayerPattern
from .topologies import topology_fn

if TYPE_CHECKING:
    from .compare import CompareResult


def _share(graph, length: int) -> torch.Tensor:
    """``[L, L]``: the share of heads (of layers of one cycle) that have edge ``j -> i``."""
    if isinstance(graph, LayerPattern):
        return torch.stack([_share(g, length) for g in graph.graphs]).mean(0)
    if isinstance(graph, tuple):
        edge_index, edge_head = graph
        heads = int(edge_head.max()) + 1 if edge_head.numel() else 1
        mask = to_dense_mask(edge_index, length, length, edge_head=edge_head, num_heads=heads)  # [H, L, L]
        return mask.float().mean(0)
    return to_dense_mask(graph, length, length).float()  # [L, L]


def draw_mask(ax, spec: str, length: int, title: str | None = None, *, causal: bool = False) -> torch.Tensor:
    """Adjacency picture of ``spec`` on one sequence of ``length``: row ``i`` = query, column
    ``j`` = key, dark where the edge ``j -> i`` exists (grey: for some heads, or some layers of a
    per-layer pattern; a selector's allowed graph); ``causal``: intersected with the causal graph, as
    a language model uses it. Returns the mask, ``[L, L]`` floats in ``[0, 1]``."""
    graph = topology_fn(spec)([length])
    if causal:
        from .lm import causal_part

        graph = causal_part(graph)
    mask = _share(graph, length)  # [L, L]
    ax.imshow(mask.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    if title is not None:
        ax.set_title(title, fontsize=9)
    return mask


def _picture_length(cfg: dict) -> int:
    """The sequence length of the adjacency pictures of a comparison."""
    if cfg["task"] == "lm":
        return min(cfg["text"]["context"], 64)
    if cfg["task"] == "listops":
        return min(cfg["listops"]["lengths"][0] + 1, 64)
    from .tasks import get_task

    task = get_task(cfg["task"], cfg.get("train_sizes"), cfg.get("test_sizes"))
    return task.seq_len(task.train_sizes[1])


def compare_figure(result: "CompareResult", path: str | Path, length: int | None = None) -> Path:
    """Loss curves (mean over seeds), the headline measures with error bars (standard deviation over
    seeds) and one adjacency picture per topology, in one PNG."""
    cfg = result.config
    length = length or _picture_length(cfg)
    summary = result.summary()
    k = len(summary)
    fig = Figure(figsize=(max(10, 3 * k), 7.5), layout="constrained")
    grid = fig.add_gridspec(2, k)
    top = grid[0, :].subgridspec(1, 2)
    ax_loss, ax_acc = fig.add_subplot(top[0, 0]), fig.add_subplot(top[0, 1])
    for row in summary:
        runs = [r for r in result.results if r.topology == row["topology"]]
        steps = [h["step"] for h in runs[0].history]
        mean = [sum(r.history[i]["loss"] for r in runs) / len(runs) for i in range(len(steps))]
        ax_loss.plot(steps, mean, label=row["topology"])
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss" + (f" (mean of {summary[0]['seeds']} seeds)" if summary[0]["seeds"] > 1 else ""))
    ax_loss.set_title(f"task: {cfg['task']}")
    ax_loss.legend(fontsize=8)
    xs = torch.arange(k).float()
    if cfg["task"] == "lm":
        bars = [("val_loss", "validation loss (nats/char)", 0.0)]
        ax_acc.set_ylabel("validation loss (nats/char)")
    elif cfg["task"] == "listops":
        bars = [("acc_test", "test set", 0.0)]
        ax_acc.set_ylim(0, 1)
        ax_acc.set_ylabel("accuracy")
    else:
        from .tasks import get_task

        task = get_task(cfg["task"], cfg.get("train_sizes"), cfg.get("test_sizes"))
        bars = [
            ("acc_test", f"sizes {task.train_sizes[0]}-{task.train_sizes[1]} (as trained)", -0.2),
            ("acc_longer", f"sizes {task.test_sizes[0]}-{task.test_sizes[1]} (longer)", 0.2),
        ]
        ax_acc.set_ylim(0, 1)
        ax_acc.set_ylabel("accuracy")
    width = 0.8 / len(bars)
    for key, text, shift in bars:
        ax_acc.bar(
            (xs + shift).tolist(),
            [row[key] for row in summary],
            width=width,
            label=text,
            yerr=[row[f"{key}_std"] for row in summary],
            capsize=3,
        )
    ax_acc.set_xticks(xs.tolist(), [row["topology"].split("(")[0] for row in summary], fontsize=8)
    ax_acc.legend(fontsize=8)
    for col, row in enumerate(summary):
        ax = fig.add_subplot(grid[1, col])
        mask = draw_mask(ax, row["spec"], length, causal=cfg["task"] == "lm")
        ax.set_title(f"{row['topology']}\n{float(mask.sum()):g} edges on {length} tokens", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def loss_figure(history: list[dict[str, float]], path: str | Path, title: str = "") -> Path:
    """Training loss and learning rate of one run."""
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot()
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], color="C0")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="C0")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["lr"] for h in history], color="C1", alpha=0.6)
    ax2.set_ylabel("learning rate", color="C1")
    ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
