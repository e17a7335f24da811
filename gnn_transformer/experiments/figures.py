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


def draw_mask(ax, spec: str, length: int, title: str | None = None) -> torch.Tensor:
    """Adjacency picture of ``spec`` on one sequence of ``length``: row ``i`` = query, column
    ``j`` = key, dark where the edge ``j -> i`` exists (grey: for some heads, or some layers of a
    per-layer pattern; a selector's allowed graph). Returns the mask, ``[L, L]`` floats in ``[0, 1]``."""
    mask = _share(topology_fn(spec)([length]), length)  # [L, L]
    ax.imshow(mask.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    if title is not None:
        ax.set_title(title, fontsize=9)
    return mask


def compare_figure(result: "CompareResult", path: str | Path, length: int | None = None) -> Path:
    """Loss curves, accuracies and one adjacency picture per topology, in one PNG."""
    from .tasks import get_task

    cfg = result.config
    task = get_task(cfg["task"], cfg.get("train_sizes"), cfg.get("test_sizes"))
    length = length or task.seq_len(task.train_sizes[1])
    k = len(result.results)
    fig = Figure(figsize=(max(10, 3 * k), 7.5), layout="constrained")
    grid = fig.add_gridspec(2, k)
    top = grid[0, :].subgridspec(1, 2)
    ax_loss, ax_acc = fig.add_subplot(top[0, 0]), fig.add_subplot(top[0, 1])
    for r in result.results:
        steps = [h["step"] for h in r.history]
        ax_loss.plot(steps, [h["loss"] for h in r.history], label=r.topology)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title(f"task: {cfg['task']}")
    ax_loss.legend(fontsize=8)
    xs = torch.arange(k).float()
    ax_acc.bar((xs - 0.2).tolist(), [r.acc_test for r in result.results], width=0.4,
               label=f"sizes {task.train_sizes[0]}-{task.train_sizes[1]} (as trained)")
    ax_acc.bar((xs + 0.2).tolist(), [r.acc_longer for r in result.results], width=0.4,
               label=f"sizes {task.test_sizes[0]}-{task.test_sizes[1]} (longer)")
    ax_acc.set_xticks(xs.tolist(), [r.topology.split("(")[0] for r in result.results], fontsize=8)
    ax_acc.set_ylim(0, 1)
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend(fontsize=8)
    for col, r in enumerate(result.results):
        ax = fig.add_subplot(grid[1, col])
        mask = draw_mask(ax, r.spec, length)
        ax.set_title(f"{r.topology}\n{float(mask.sum()):g} edges on {length} tokens", fontsize=8)
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
