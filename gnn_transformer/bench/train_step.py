"""A training step of :class:`~gnn_transformer.GraphLM` on causal graphs against a plain PyTorch GPT.

The baseline is nanoGPT's model written out (pre-norm blocks, ``scaled_dot_product_attention``
with ``is_causal=True``, GELU MLP of width ``4C``, tied embedding, no biases), the same size as the
``GraphLM``: by default nanoGPT's CPU configuration (4 layers, 4 heads, width 128, batch 12,
vocabulary 65). One step is forward, cross-entropy, backward and an AdamW update, timed as the
median of ``repeats`` steps after one warm-up step; the models take their steps in turn, and each
``GraphLM`` row also gives the quartiles of its per-round ratios to the GPT's step. The GPT
takes ``[B, T]`` token ids, the ``GraphLM`` the same tokens as ``B·T`` nodes of one disjoint union
of causal graphs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

COLUMNS = ("model", "context", "batch", "params", "ms", "ratio", "paired", "note")


class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width, bias=False)
        self.c_proj = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))  # [B, H, T, D]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, bias=False)
        self.attn = _SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width, bias=False), nn.GELU(), nn.Linear(4 * width, width, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PlainGPT(nn.Module):
    """nanoGPT's GPT without dropout or biases: ``forward(idx [B, T]) -> logits [B, T, vocab]``."""

    def __init__(self, vocab: int, context: int, layers: int, heads: int, width: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width, bias=False)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _round_robin(steps: Sequence[Callable[[], object]], device, repeats: int) -> list[list[float]]:
    """Seconds of ``repeats`` rounds of each step of ``steps``, timed round-robin (one step of each
    in turn, after one warm-up step of each), so that a drift of the machine's speed reaches every
    model alike; ``[model][round]``."""
    cuda = torch.device(device).type == "cuda"
    for step in steps:
        step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, spent in zip(steps, times):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            spent.append(time.perf_counter() - t0)
    return times


def _paired(times: Sequence[float], base: Sequence[float]) -> tuple[float, float, float]:
    """Quartiles ``(q1, median, q3)`` of the per-round ratios ``times[r] / base[r]``."""
    ratios = [t / b for t, b in zip(times, base)]
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, median, q3


def run_train_step_benchmark(
    contexts: Sequence[int] = (64, 256),
    *,
    batch_size: int = 12,
    layers: int = 4,
    heads: int = 4,
    width: int = 128,
    vocab: int = 65,
    backends: Sequence[str] = ("auto",),
    device: str | None = None,
    dtype: torch.dtype | None = None,
    repeats: int = 5,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Time a training step of the plain GPT and of ``GraphLM`` (one row per attention backend of
    ``backends``) at each context; ``ratio`` is a row's median time over the GPT's (``gpt_sdpa``)
    at that context, ``paired`` the quartiles ``(q1, median, q3)`` of the ratios of the steps taken
    in the same round (steps seconds apart, which the machine's drift reaches alike). ``dtype``
    (e.g. ``torch.bfloat16``) runs the steps under autocast. The ``GraphLM`` row's note names the
    backend its layers resolve to."""
    from .. import GraphLM, GraphMultiheadAttention, GraphTransformerConfig
    from ..topology import causal

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for context in contexts:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, vocab, (batch_size, context), generator=gen).to(device)
        targets = torch.randint(0, vocab, (batch_size, context), generator=gen).to(device)
        edge_index = causal([context] * batch_size).to(device)
        pos = torch.arange(context, device=device).repeat(batch_size)
        models: list[tuple[str, nn.Module, Callable[[nn.Module], Tensor], str]] = []
        torch.manual_seed(seed)
        models.append(
            (
                "gpt_sdpa",
                PlainGPT(vocab, context, layers, heads, width).to(device),
                lambda m: F.cross_entropy(m(idx).view(-1, vocab), targets.view(-1)),
                "SDPA is_causal",
            )
        )
        for backend in backends:
            torch.manual_seed(seed)
            config = GraphTransformerConfig(
                vocab_size=vocab,
                d_model=width,
                nhead=heads,
                num_layers=layers,
                bias=False,
                max_positions=context,
                backend=backend,
            )
            lm = GraphLM(config).to(device)
            layer = lm.encoder.layers[0].self_attn
            assert isinstance(layer, GraphMultiheadAttention)
            resolved = layer.resolve_backend(
                edge_index,
                torch.device(device),
                size=(context * batch_size,) * 2,
                dtype=torch.float32 if dtype is None else dtype,
            )
            models.append(
                (
                    f"graph_lm ({backend})",
                    lm,
                    lambda m: F.cross_entropy(m(idx.view(-1), edge_index, pos=pos), targets.view(-1)),
                    f"layers run {resolved}",
                )
            )
        steps = []
        for _, model, loss_fn, _ in models:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

            def step(model=model, loss_fn=loss_fn, optimizer=optimizer):
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss = loss_fn(model)
                loss.backward()
                optimizer.step()
                return loss

            steps.append(step)
        times = _round_robin(steps, device, repeats)
        seconds = [statistics.median(spent) for spent in times]
        for index, ((name, model, _, note), sec) in enumerate(zip(models, seconds)):
            params = sum(p.numel() for p in model.parameters())
            row = dict(
                model=name,
                context=context,
                batch=batch_size,
                params=params,
                ms=1e3 * sec,
                ratio=sec / seconds[0],
                paired=None if index == 0 else _paired(times[index], times[0]),
                note=note,
            )
            rows.append(row)
            if log:
                log(format_table([row]).splitlines()[-1])
    return rows


def _cell(key: str, value) -> str:
    if value is None:
        return "—"
    if key == "ms":
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    if key == "ratio":
        return f"{value:.2f}×"
    if key == "paired":
        q1, median, q3 = value
        return f"{median:.3f}× ({q1:.3f}–{q3:.3f})"
    if key == "params":
        return f"{value / 1e6:.2f}M" if value >= 1e5 else str(value)
    return str(value)


def format_table(rows: Sequence[dict]) -> str:
    """Plain-text table of the rows."""
    widths = {c: max([len(c)] + [len(_cell(c, r.get(c))) for r in rows]) for c in COLUMNS}
    lines = ["  ".join(f"{c:>{widths[c]}}" for c in COLUMNS)]
    lines += ["  ".join(f"{_cell(c, r.get(c)):>{widths[c]}}" for c in COLUMNS) for r in rows]
    return "\n".join(lines)


def format_markdown(rows: Sequence[dict]) -> str:
    """Markdown table of the rows."""
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    return "\n".join([head] + ["| " + " | ".join(_cell(c, r.get(c)) for c in COLUMNS) + " |" for r in rows])
