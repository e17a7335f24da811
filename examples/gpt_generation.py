"""GPT-style generation with the key/value cache on token graphs.

Trains a tiny decoder-only :class:`gnn_transformer.GraphLM` on a causal graph to continue
counting sequences (``3 4 5 6 ...`` modulo 16), then generates with
:func:`gnn_transformer.generate`, with and without the key/value cache (the same tokens), and with
a sliding-window graph.

Usage:
    python examples/gpt_generation.py [--steps 200]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from gnn_transformer import GraphLM, GraphTransformerConfig, generate
from gnn_transformer.topology import causal

VOCAB = 16


def batch(size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, VOCAB, (size, 1), generator=generator)
    return (start + torch.arange(length)) % VOCAB  # [B, T]


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    lm = GraphLM(
        GraphTransformerConfig(vocab_size=VOCAB, d_model=32, nhead=4, num_layers=2, position="rope", backend="pyg")
    )
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    b, t = 16, 12
    edge_index = causal([t] * b)  # one causal graph for the whole batch
    pos = torch.arange(t).repeat(b)  # [N]
    for _ in range(args.steps):
        ids = batch(b, t, g)
        logits = lm(ids.reshape(-1), edge_index, pos=pos).view(b, t, VOCAB)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"training loss after {args.steps} steps: {loss.item():.3f}")

    lm.eval()
    prompt = torch.tensor([[3, 4, 5], [10, 11, 12]])
    with torch.no_grad():
        start = time.perf_counter()
        cached = generate(lm, prompt, max_new_tokens=8)
        t_cache = time.perf_counter() - start
        start = time.perf_counter()
        recomputed = generate(lm, prompt, max_new_tokens=8, use_cache=False)
        t_full = time.perf_counter() - start
        windowed = generate(lm, prompt, max_new_tokens=8, window=4)
    for row in cached.tolist():
        print("generated:", " ".join(map(str, row)))
    same = bool(torch.equal(cached, recomputed))
    print(f"with cache {t_cache * 1e3:.0f} ms, recomputing the graph {t_full * 1e3:.0f} ms, same tokens: {same}")
    print("sliding window (radius 4):", windowed.tolist())
    return {"loss": loss.item(), "tokens": cached, "same": same}


if __name__ == "__main__":
    main()
