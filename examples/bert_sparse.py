"""A Hugging Face BERT whose attention graph is swapped for a sparse one.

Builds a small BERT from a random config (``transformers``, no download), imports its weights
into a graph model (:func:`gnn_transformer.hf.from_hf`), checks that full attention reproduces
Hugging Face's output, then runs the same weights on sliding windows of growing radius and
measures how far the hidden states drift from full attention.

Usage:
    python examples/bert_sparse.py
"""

from __future__ import annotations

import torch

from gnn_transformer.hf import from_hf
from gnn_transformer.topology import sliding_window


def main() -> dict[str, float]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    hf = BertModel(config).eval()
    graph = from_hf(hf, backend="pyg").eval()
    input_ids = torch.randint(0, 100, (2, 32))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 20:] = 0  # a shorter second sequence: its padding is simply absent
    with torch.no_grad():
        reference = hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        full = graph(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        real = attention_mask.bool()
        drift = {"full": (full - reference)[real].abs().max().item()}
        print(f"full attention vs Hugging Face: max |difference| {drift['full']:.2e}")
        for radius in (1, 2, 4, 8, 16):
            out = graph(
                input_ids=input_ids,
                attention_mask=attention_mask,
                topology=lambda lengths, r=radius: sliding_window(lengths, r),
            ).last_hidden_state
            diff = (out - reference)[real]
            drift[f"window {radius}"] = diff.abs().max().item()
            rel = diff.norm() / reference[real].norm()
            print(
                f"sliding window radius {radius:2d}: max |difference| {drift[f'window {radius}']:.3f}, "
                f"relative {rel:.3f}"
            )
    return drift


if __name__ == "__main__":
    main()
