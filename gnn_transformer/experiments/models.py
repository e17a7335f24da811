"""Small graph-transformer models of the experiments, built from the layer library.

One encoder (a stack of :class:`~gnn_transformer.GraphTransformerEncoderLayer`) under three heads:

- :class:`SequenceModel`: token embedding + positions -> a label per token (algorithmic tasks,
  language modelling);
- :class:`SequenceClassifier`: the same encoder -> a label per sequence, read at a ``[CLS]`` node or
  pooled over the sequence (ListOps);
- :class:`NodeModel`: node features (+ Laplacian eigenvector PE) -> a label per node (graph tasks);
- :class:`PatchModel`: image patches + a ``[CLS]`` token -> a label per image (ViT).

The token graph is an argument of ``forward``: the same weights run under any topology. A graph is
an ``edge_index``, a per-head pair ``(edge_index, edge_head)`` or per-layer graphs (a callable
``layer -> graph`` such as a ``LayerPattern``, or a sequence). With ``EncoderConfig.select`` every
layer chooses its per-head graph within the given one from its queries and keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..attention import GraphMultiheadAttention
from ..layers import GraphTransformerEncoder, GraphTransformerEncoderLayer
from ..topology.dynamic import selector
from ..position import LearnedPositionalEmbedding, SinusoidalPositionalEmbedding

POSITIONS = ("rope", "sinusoidal", "learned", "none")
POOLS = ("cls", "mean")


@dataclass
class EncoderConfig:
    """Size of the encoder shared by every model here."""

    d_model: int = 64  # width C of every token
    nhead: int = 4  # attention heads
    num_layers: int = 2  # encoder layers (hops a message can travel)
    dim_feedforward: int = 128  # hidden width of the feed-forward block
    dropout: float = 0.0  # dropout in attention and feed-forward (0.1 in the original paper)
    norm_first: bool = True  # pre-norm (GPT-2, ViT) rather than post-norm (original paper)
    activation: str = "gelu"  # feed-forward activation: "relu" or "gelu"
    position: str = "rope"  # SequenceModel positions: "rope" (rotary, in attention), "sinusoidal",
    # "learned" or "none"; NodeModel uses Laplacian PE instead, PatchModel learned patch positions
    max_positions: int = 256  # table size of learned positions
    backend: str = "pyg"  # attention backend: "pyg" (fastest for these small CPU models), "auto",
    # "fused" or "tiled"
    select: str | dict | None = None  # a selector of topology.dynamic.selector ("topk:num_keys=8"): every
    # layer chooses its per-head graph within the graph it is given; None: attend along that graph
    bias: bool = True  # biases in the linear layers and layer norms (GPT-2 style models: False)
    tie_embeddings: bool = False  # SequenceModel: the output layer reuses the token embedding
    gpt_init: bool = False  # GPT-2 initialization: weights normal(0, 0.02), the projections into the
    # residual stream normal(0, 0.02 / sqrt(2 num_layers)), biases zero

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"Expected 'position' in {POSITIONS} (got {self.position!r})")
        for name in ("d_model", "nhead", "num_layers", "dim_feedforward", "max_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"Expected '{name}' >= 1 (got {getattr(self, name)})")
        if self.d_model % self.nhead:
            raise ValueError(f"Expected 'd_model' ({self.d_model}) divisible by 'nhead' ({self.nhead})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Expected 'dropout' in [0, 1) (got {self.dropout})")
        if self.select is not None:
            selector(self.select, num_heads=self.nhead, head_dim=self.d_model // self.nhead)  # validates


def make_encoder(config: EncoderConfig, rope: bool = False) -> GraphTransformerEncoder:
    """``num_layers`` graph encoder layers and a final norm (pre-norm models need it); with
    ``config.select`` each layer's attention selects its graph (a copy of the selector per layer)."""
    attention: Callable[..., GraphMultiheadAttention] = GraphMultiheadAttention
    if config.select is not None:
        attention = partial(
            GraphMultiheadAttention,
            select=selector(config.select, num_heads=config.nhead, head_dim=config.d_model // config.nhead),
        )
    layer = GraphTransformerEncoderLayer(
        config.d_model,
        config.nhead,
        config.dim_feedforward,
        config.dropout,
        config.activation,
        norm_first=config.norm_first,
        bias=config.bias,
        backend=config.backend,
        rope=rope,
        attention=attention,
    )
    norm = nn.LayerNorm(config.d_model, bias=config.bias) if config.norm_first else None
    return GraphTransformerEncoder(layer, config.num_layers, norm)


def gpt_init(model: nn.Module, num_layers: int) -> None:
    """GPT-2's initialization (as in nanoGPT): linear and embedding weights normal(0, 0.02), the
    output projections of attention and feed-forward (``out_proj``, ``linear2``) normal(0, 0.02 /
    sqrt(2 num_layers)), biases zero; layer norms keep ones and zeros."""
    for name, p in model.named_parameters():
        if name.endswith("bias") and "norm" not in name:
            nn.init.zeros_(p)
        elif p.dim() >= 2:
            std = 0.02 / (2 * num_layers) ** 0.5 if name.endswith(("out_proj.weight", "linear2.weight")) else 0.02
            nn.init.normal_(p, mean=0.0, std=std)


def encode(encoder: GraphTransformerEncoder, x: Tensor, graph: Any, pos: Tensor | None = None) -> Tensor:
    """``encoder`` along a graph of any kind: a pair ``(edge_index, edge_head)`` is a per-head graph
    for every layer; anything else is what the encoder takes (one graph, or per-layer graphs)."""
    if isinstance(graph, tuple):
        edge_index, edge_head = graph
        return encoder(x, edge_index, pos=pos, edge_head=edge_head)
    return encoder(x, graph, pos=pos)


def _positions(config: EncoderConfig) -> nn.Module | None:
    if config.position == "sinusoidal":
        return SinusoidalPositionalEmbedding(config.d_model)
    if config.position == "learned":
        return LearnedPositionalEmbedding(config.max_positions, config.d_model)
    return None  # "rope" rotates queries and keys inside attention; "none" has no positions


class SequenceModel(nn.Module):
    """Token ids ``[N]`` (or ``[N, F]``: fields whose embeddings are summed) with their positions
    ``[N]`` -> logits ``[N, num_classes]``."""

    def __init__(self, vocab_size: int, num_classes: int, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(vocab_size, config.d_model)
        self.pos = _positions(config)
        self.encoder = make_encoder(config, rope=config.position == "rope")
        self.head = nn.Linear(config.d_model, num_classes, bias=config.bias)
        if config.tie_embeddings:
            if vocab_size != num_classes:
                raise ValueError(
                    f"Expected 'tie_embeddings' only where the vocabulary ({vocab_size}) "
                    f"is the set of classes ({num_classes})"
                )
            self.head.weight = self.embed.weight
        if config.gpt_init:
            gpt_init(self, config.num_layers)

    def forward(self, tokens: Tensor, positions: Tensor, edge_index: Tensor) -> Tensor:
        x = self.embed(tokens)  # [N, C] or [N, F, C]
        if x.dim() == 3:
            x = x.sum(dim=1)  # [N, C]
        if self.pos is not None:
            x = x + self.pos(positions).to(x.dtype)
        rope_pos = positions if self.config.position == "rope" else None
        return self.head(encode(self.encoder, x, edge_index, rope_pos))  # [N, num_classes]


class SequenceClassifier(nn.Module):
    """Token ids ``[N]`` of a batch of sequences (a ``[CLS]`` token first in each, for
    ``pool="cls"``) with their positions ``[N]`` -> logits ``[B, num_classes]``, read at the first
    node of each sequence (``"cls"``) or averaged over its nodes (``"mean"``)."""

    def __init__(self, vocab_size: int, num_classes: int, config: EncoderConfig, pool: str = "cls") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"Expected 'pool' in {POOLS} (got {pool!r})")
        self.config, self.pool = config, pool
        self.embed = nn.Embedding(vocab_size, config.d_model)
        self.pos = _positions(config)
        self.encoder = make_encoder(config, rope=config.position == "rope")
        self.head = nn.Linear(config.d_model, num_classes, bias=config.bias)
        if config.gpt_init:
            gpt_init(self, config.num_layers)

    def forward(self, tokens: Tensor, positions: Tensor, edge_index: Tensor, ptr: Tensor) -> Tensor:
        """``ptr``: ``[B + 1]`` offsets of the sequences among the nodes."""
        x = self.embed(tokens)  # [N, C]
        if self.pos is not None:
            x = x + self.pos(positions).to(x.dtype)
        rope_pos = positions if self.config.position == "rope" else None
        h = encode(self.encoder, x, edge_index, rope_pos)  # [N, C]
        if self.pool == "cls":
            return self.head(h[ptr[:-1]])  # [B, num_classes]
        lengths = ptr.diff()  # [B]
        batch = torch.repeat_interleave(torch.arange(lengths.numel(), device=h.device), lengths)  # [N]
        pooled = torch.zeros(lengths.numel(), h.size(1), dtype=h.dtype, device=h.device).index_add_(0, batch, h)
        return self.head(pooled / lengths[:, None].to(h.dtype))  # [B, num_classes]


class NodeModel(nn.Module):
    """Node features ``[N, F]`` (and optional positional encodings ``[N, P]``) -> ``[N, classes]``."""

    def __init__(self, in_features: int, num_classes: int, config: EncoderConfig, pe_dim: int = 0) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, config.d_model, bias=config.bias)
        self.pe = nn.Linear(pe_dim, config.d_model, bias=False) if pe_dim else None
        self.encoder = make_encoder(config)
        self.head = nn.Linear(config.d_model, num_classes, bias=config.bias)
        if config.gpt_init:
            gpt_init(self, config.num_layers)

    def forward(self, x: Tensor, edge_index: Tensor, pe: Tensor | None = None) -> Tensor:
        h = self.embed(x)  # [N, C]
        if self.pe is not None:
            if pe is None:
                raise ValueError("This model was built with pe_dim > 0: pass 'pe'")
            h = h + self.pe(pe)
        return self.head(encode(self.encoder, h, edge_index))  # [N, num_classes]


class PatchModel(nn.Module):
    """ViT: patches ``[B, P, patch_dim]`` -> logits ``[B, num_classes]`` read at ``[CLS]``.

    Each image is ``P + 1`` nodes (``[CLS]`` first, then the patches in raster order) with
    learned position embeddings; ``edge_index`` is the token graph of the whole batch.
    """

    def __init__(self, patch_dim: int, num_patches: int, num_classes: int, config: EncoderConfig) -> None:
        super().__init__()
        self.embed = nn.Linear(patch_dim, config.d_model, bias=config.bias)
        self.cls = nn.Parameter(torch.zeros(1, 1, config.d_model))
        self.pos = nn.Parameter(torch.randn(1, num_patches + 1, config.d_model) * 0.02)
        self.encoder = make_encoder(config)
        self.head = nn.Linear(config.d_model, num_classes, bias=config.bias)
        if config.gpt_init:
            gpt_init(self, config.num_layers)

    def forward(self, patches: Tensor, edge_index: Tensor) -> Tensor:
        b, p, _ = patches.shape
        x = torch.cat([self.cls.expand(b, 1, -1), self.embed(patches)], dim=1)  # [B, P+1, C]
        x = (x + self.pos).reshape(b * (p + 1), -1)  # [N, C], image after image
        x = encode(self.encoder, x, edge_index).view(b, p + 1, -1)  # [B, P+1, C]
        return self.head(x[:, 0])  # [B, num_classes]
