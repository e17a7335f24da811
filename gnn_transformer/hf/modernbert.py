r"""ModernBERT (Warner et al. 2024) on token graphs: :class:`GraphModernBertModel`.

A pre-norm encoder: token embeddings then LayerNorm; per layer ``x = x + Wo(attention(attn_norm(x)))``
(no ``attn_norm`` in layer 0) and ``x = x + Wo(act(a) * g)`` with ``a, g`` the two halves of
``Wi(mlp_norm(x))`` (GeGLU); a final LayerNorm; RoPE with one base on global layers and another on
local ones. Local layers (all but every ``global_attn_every_n_layers``-th, from layer 0) attend within
a symmetric window: Hugging Face keeps key ``j`` iff ``|i - j| <= local_attention // 2``, the radius
of :func:`gnn_transformer.topology.sliding_window`. ``ModernBertForMaskedLM``'s head (dense,
activation, LayerNorm, decoder tied to the embeddings) gives ``logits``.

Notation: ``N`` nodes, ``C`` hidden size, ``L`` layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..attention import GraphMultiheadAttention, check_ids
from ..layers import get_activation, resolve_layer_graphs
from ..mlp import FeedForward
from ._common import (
    GraphModelOutput,
    Topologies,
    Topology,
    check_model,
    check_topologies,
    dense_attentions,
    flatten_inputs,
    layer_edges,
    masked_lm_loss,
    scatter_back,
)
from .decoders import GraphDecoderLayer, read_activation, rope_config


def _builder(radius: int | None) -> Topology:
    from .. import topology  # resolved lazily: models do not depend on the builders

    if radius is None:
        return topology.full
    return lambda lengths: topology.sliding_window(lengths, radius)


def _layer_windows(config) -> list[int | None]:
    types = list(config.layer_types)
    if len(types) != config.num_hidden_layers or any(t not in ("full_attention", "sliding_attention") for t in types):
        raise ValueError(
            f"Unsupported Hugging Face config: layer_types={types!r} (expected one of "
            f"'full_attention', 'sliding_attention' per layer, {config.num_hidden_layers})"
        )
    return [config.local_attention // 2 if t == "sliding_attention" else None for t in types]


def _layer(config, index: int, layer_type: str, backend: str) -> GraphDecoderLayer:
    c, heads = config.hidden_size, config.num_attention_heads
    if c % heads:
        raise ValueError(
            f"Unsupported Hugging Face config: num_attention_heads={heads} (hidden_size={c} is not divisible by it)"
        )
    rope = rope_config(config, layer_type, c // heads)

    def norm() -> nn.Module:
        return nn.LayerNorm(c, eps=config.norm_eps, bias=config.norm_bias)

    attn = GraphMultiheadAttention(
        c,
        heads,
        dropout=float(config.attention_dropout),
        bias=config.attention_bias,
        backend=backend,
        rope=True,
        rope_base=rope.base,
        rope_scaling=rope.scaling,
        rotary_dim=rope.rotary_dim,
    )
    mlp = FeedForward(
        c,
        config.intermediate_size,
        read_activation(config, "hidden_activation"),
        gated=True,
        bias=config.mlp_bias,
        dropout=float(config.mlp_dropout),
    )
    return GraphDecoderLayer(
        nn.Identity() if index == 0 else norm(), attn, norm(), mlp, attn_dropout=float(config.attention_dropout)
    )


class GraphModernBertModel(nn.Module):
    r"""ModernBERT on token graphs. Build with :meth:`from_hf` or :func:`gnn_transformer.hf.from_hf`.

    ``forward(input_ids, attention_mask=None, position_ids=None, labels=None, *,
    output_attentions=False, topology=None)`` -> :class:`GraphModelOutput` with
    ``last_hidden_state`` ``[B, T, C]`` (and ``logits`` ``[B, T, V]`` with the masked-LM head, and
    ``loss`` given ``labels``: Hugging Face's masked-LM cross-entropy over the labels that are not
    ``-100``, :func:`~gnn_transformer.hf.masked_lm_loss`). Each layer attends along its native graph
    (:attr:`windows`: full, or a symmetric window) unless ``topology`` replaces it (one callable
    ``lengths -> edge_index`` or ``lengths -> (edge_index, edge_head)``, a per-head graph for the
    model's heads, for every layer, or one callable or ``None`` per layer).
    """

    def __init__(
        self, config, *, masked_lm: bool = False, topology: Topologies | None = None, backend: str = "auto"
    ) -> None:
        super().__init__()
        if getattr(config, "model_type", None) != "modernbert":
            raise TypeError(
                f"Expected 'config' of a Hugging Face 'modernbert' model for {type(self).__name__} "
                f"(got {type(config).__name__} with model_type {getattr(config, 'model_type', None)!r})"
            )
        self.config = config
        self.window_radii = _layer_windows(config)
        self.topology = None if topology is None else check_topologies(topology, config.num_hidden_layers)
        c = config.hidden_size
        pad = (
            config.pad_token_id
            if isinstance(config.pad_token_id, int) and 0 <= config.pad_token_id < config.vocab_size
            else None
        )
        self.tok_embeddings = nn.Embedding(config.vocab_size, c, padding_idx=pad)
        self.embed_norm = nn.LayerNorm(c, eps=config.norm_eps, bias=config.norm_bias)
        self.embed_dropout = nn.Dropout(float(config.embedding_dropout))
        self.layers = nn.ModuleList([_layer(config, i, t, backend) for i, t in enumerate(config.layer_types)])
        self.final_norm = nn.LayerNorm(c, eps=config.norm_eps, bias=config.norm_bias)
        self.head: nn.Sequential | None = None  # the masked-LM head and decoder (masked_lm only)
        self.decoder: nn.Linear | None = None
        if masked_lm:
            self.head = nn.Sequential(
                nn.Linear(c, c, bias=config.classifier_bias),
                _Activation(read_activation(config, "classifier_activation")),
                nn.LayerNorm(c, eps=config.norm_eps, bias=config.norm_bias),
            )
            self.decoder = nn.Linear(c, config.vocab_size, bias=config.decoder_bias)
            if getattr(config, "tie_word_embeddings", True):
                self.decoder.weight = self.tok_embeddings.weight

    @property
    def windows(self) -> list[int | None]:
        """Each layer's native graph: a symmetric window radius, or ``None`` for full attention."""
        return list(self.window_radii)

    def native_topologies(self) -> list[Topology]:
        builders = {radius: _builder(radius) for radius in dict.fromkeys(self.window_radii)}
        return [builders[radius] for radius in self.window_radii]

    def forward_graph(self, input_ids: Tensor, edge_index, *, pos: Tensor, output_attentions: bool = False):
        """Token ids ``[N]``, the graph of every layer (:func:`gnn_transformer.layers.resolve_layer_graphs`),
        positions ``[N]`` -> hidden states ``[N, C]`` (and the weights ``[E_l, H]`` of every layer)."""
        graphs = resolve_layer_graphs(edge_index, len(self.layers), "edge_index")
        check_ids(input_ids, self.config.vocab_size, "input_ids")
        x = self.embed_dropout(self.embed_norm(self.tok_embeddings(input_ids)))  # [N, C]
        weights = []
        for layer, (graph, head) in zip(self.layers, graphs):
            x = layer(x, graph, pos=pos, edge_head=head, need_weights=output_attentions)
            if output_attentions:
                x, alpha = x
                weights.append(alpha)
        h = self.final_norm(x)
        return (h, weights) if output_attentions else h

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        output_attentions: bool = False,
        topology: Topologies | None = None,
    ) -> GraphModelOutput:
        if labels is not None and self.head is None:
            raise ValueError(
                "Expected no 'labels' for a ModernBERT without the masked-LM head (build it from a "
                "ModernBertForMaskedLM, or with masked_lm=True)"
            )
        mask, pos, lengths = flatten_inputs(input_ids, attention_mask, position_ids, None)
        topology = self.topology if topology is None else check_topologies(topology, len(self.layers))
        graphs = layer_edges(
            topology if topology is not None else [None] * len(self.layers),
            self.native_topologies(),
            lengths,
            input_ids.device,
            self.config.num_attention_heads,
        )
        out = self.forward_graph(input_ids[mask], graphs, pos=pos, output_attentions=output_attentions)
        h = out[0] if output_attentions else out
        result = GraphModelOutput(last_hidden_state=scatter_back(h, mask))
        if self.head is not None:
            assert self.decoder is not None  # built with the head
            result.logits = scatter_back(self.decoder(self.head(h)), mask)
            if labels is not None:
                result.loss = masked_lm_loss(result.logits, labels, mask)
        if output_attentions:
            result.edge_attentions = tuple(zip(graphs, out[1]))
            result.attentions = dense_attentions(result.edge_attentions, mask, self.config.num_attention_heads)
        return result

    @classmethod
    def from_hf(cls, model, *, topology: Topologies | None = None, backend: str = "auto"):
        """A graph model with the weights of a ``ModernBertModel`` or ``ModernBertForMaskedLM`` (with its
        head); other heads are refused: pass such a model's ``.model`` to import its base."""
        check_model(model, "modernbert", cls)
        base = getattr(model, "model", model)
        others = sorted({name for name, _ in model.named_children()} - {"model", "head", "decoder"})
        if base is not model and others:
            raise ValueError(
                f"Expected a ModernBertModel or ModernBertForMaskedLM (got {type(model).__name__} "
                f"with modules {others}); pass its '.model' to import the base model"
            )
        masked = base is not model
        graph = cls(base.config, masked_lm=masked, topology=topology, backend=backend)
        state = modernbert_state_dict(
            model.state_dict(), base.config.num_hidden_layers, prefix="model." if masked else ""
        )
        source = next(base.parameters())
        graph.to(device=source.device, dtype=source.dtype)
        graph.load_state_dict(state)
        return graph.train(base.training)


class _Activation(nn.Module):
    """An activation function as a module (for ``nn.Sequential``)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.fn = name, get_activation(name)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def _pairs(num_layers: int, prefix: str) -> list[tuple[str, str]]:
    """(graph key, Hugging Face key) of every tensor; ``:0`` / ``:1`` a half of a fused tensor."""
    p = prefix
    pairs = [
        ("tok_embeddings.weight", f"{p}embeddings.tok_embeddings.weight"),
        ("embed_norm.weight", f"{p}embeddings.norm.weight"),
        ("final_norm.weight", f"{p}final_norm.weight"),
    ]
    for i in range(num_layers):
        src, dst = f"{p}layers.{i}.", f"layers.{i}."
        pairs += [
            (dst + "self_attn.in_proj_weight", src + "attn.Wqkv.weight"),
            (dst + "self_attn.out_proj.weight", src + "attn.Wo.weight"),
            (dst + "mlp.gate_proj.weight", src + "mlp.Wi.weight:0"),
            (dst + "mlp.up_proj.weight", src + "mlp.Wi.weight:1"),
            (dst + "mlp.down_proj.weight", src + "mlp.Wo.weight"),
            (dst + "mlp_norm.weight", src + "mlp_norm.weight"),
        ]
        pairs += [
            (dst + "self_attn.in_proj_bias", src + "attn.Wqkv.bias"),
            (dst + "self_attn.out_proj.bias", src + "attn.Wo.bias"),
            (dst + "mlp.gate_proj.bias", src + "mlp.Wi.bias:0"),
            (dst + "mlp.up_proj.bias", src + "mlp.Wi.bias:1"),
            (dst + "mlp.down_proj.bias", src + "mlp.Wo.bias"),
            (dst + "mlp_norm.bias", src + "mlp_norm.bias"),
        ]
        if i > 0:
            pairs += [(dst + f"attn_norm.{kind}", src + f"attn_norm.{kind}") for kind in ("weight", "bias")]
    pairs += [("embed_norm.bias", f"{p}embeddings.norm.bias"), ("final_norm.bias", f"{p}final_norm.bias")]
    if prefix:
        pairs += [
            ("head.0.weight", "head.dense.weight"),
            ("head.0.bias", "head.dense.bias"),
            ("head.2.weight", "head.norm.weight"),
            ("head.2.bias", "head.norm.bias"),
            ("decoder.weight", "decoder.weight"),
            ("decoder.bias", "decoder.bias"),
        ]
    return pairs


def modernbert_state_dict(hf: dict[str, Tensor], num_layers: int, prefix: str = "") -> dict[str, Tensor]:
    """A ``ModernBertModel`` state dict (``prefix="model."``: a ``ModernBertForMaskedLM``'s, with the
    head) in the names of :class:`GraphModernBertModel`; biases the config leaves out are skipped."""
    out = {}
    for graph, key in _pairs(num_layers, prefix):
        name, _, half = key.partition(":")
        if name in hf:
            out[graph] = hf[name] if not half else hf[name].chunk(2, dim=0)[int(half)]
    return out


def modernbert_hf_state_dict(graph: dict[str, Tensor], num_layers: int, prefix: str = "") -> dict[str, Tensor]:
    """The inverse of :func:`modernbert_state_dict`."""
    out: dict[str, Tensor] = {}
    halves: dict[str, list] = {}
    for key, hf_key in _pairs(num_layers, prefix):
        if key not in graph:
            continue
        name, _, half = hf_key.partition(":")
        if half:
            halves.setdefault(name, [None, None])[int(half)] = graph[key]
        else:
            out[name] = graph[key]
    out.update({name: torch.cat(parts) for name, parts in halves.items()})
    return out


__all__ = ["GraphModernBertModel", "modernbert_state_dict", "modernbert_hf_state_dict"]
