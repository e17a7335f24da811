r"""GPT-2 on token graphs: :class:`GraphGPT2LMHeadModel` and :func:`gpt2_state_dict`.

``GPT2Model`` / ``GPT2LMHeadModel`` (other heads are refused) becomes token and position
embeddings, pre-norm layers (``gelu_new``) of :mod:`gnn_transformer.layers`, final norm and the
tied head. GPT-2's ``Conv1D`` stores weights as ``[in, out]``; they are transposed into
``nn.Linear`` layout. The token graph defaults to ``topology.causal``.

Notation: ``N`` nodes, ``E`` edges, ``C`` hidden size, ``H`` heads.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from torch import Tensor, nn

from ..attention import check_ids
from ..layers import GraphTransformerEncoder, GraphTransformerEncoderLayer, get_activation
from ._common import (
    GraphModelOutput,
    Renaming,
    Topologies,
    attention_weights,
    causal_lm_loss,
    check_config,
    check_model,
    check_positions,
    check_topologies,
    default_topology,
    dense_attentions,
    flatten_inputs,
    hf_state_dict,
    layer_edges,
    renamed_state_dict,
    resolve_topologies,
    scatter_back,
)


class GraphGPT2LMHeadModel(nn.Module):
    r"""GPT-2 on token graphs (pre-norm layers, final norm, head tied to ``wte``).

    ``forward(input_ids, attention_mask=None, position_ids=None, labels=None, *,
    output_attentions=False, topology=None)`` -> :class:`GraphModelOutput` with ``logits``
    ``[B, T, vocab]`` and ``last_hidden_state`` (and ``loss``, Hugging Face's shifted
    cross-entropy, given ``labels``; with ``output_attentions``, ``edge_attentions``: per layer the
    graph and its weights ``[E, H]``, ``[E]`` on a per-head graph, and ``attentions``: per layer
    ``[B, H, T, T]``, for small inputs);
    :meth:`forward_graph` is the graph-native path (also used by
    :func:`gnn_transformer.decoding.generate` with a key/value cache).

    ``topology`` (constructor: the model's default; ``forward``: this call's) replaces the causal
    graph: a callable ``lengths -> edge_index`` or ``lengths -> (edge_index, edge_head)`` (a
    per-head graph for the model's heads) for every layer, or a sequence of one such callable (or
    ``None``: causal attention) per layer.
    """

    def __init__(self, config, *, topology: Topologies | None = None, backend: str = "auto") -> None:
        super().__init__()
        check_config(config, "gpt2", type(self))
        if not getattr(config, "scale_attn_weights", True) or getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise ValueError(
                "Expected GPT-2 attention scaled by 1/sqrt(head_dim) only (got "
                f"scale_attn_weights={config.scale_attn_weights}, "
                f"scale_attn_by_inverse_layer_idx={config.scale_attn_by_inverse_layer_idx})"
            )
        if getattr(config, "add_cross_attention", False):
            raise ValueError("Expected a GPT-2 config without cross-attention (got add_cross_attention)")
        self.config = config
        self.topology = None if topology is None else check_topologies(topology, config.n_layer)
        c = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, c)
        self.wpe = nn.Embedding(config.n_positions, c)
        self.drop = nn.Dropout(config.embd_pdrop)
        layer = GraphTransformerEncoderLayer(
            c,
            config.n_head,
            config.n_inner or 4 * c,
            dropout=config.resid_pdrop,
            activation=get_activation(config.activation_function),
            layer_norm_eps=config.layer_norm_epsilon,
            norm_first=True,
            backend=backend,
        )
        layer.self_attn.dropout = config.attn_pdrop
        layer.dropout.p = 0.0  # GPT2MLP has no dropout between activation and c_proj
        self.encoder = GraphTransformerEncoder(layer, config.n_layer, nn.LayerNorm(c, eps=config.layer_norm_epsilon))
        self.lm_head = nn.Linear(c, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.weight = self.wte.weight

    def forward_graph(
        self,
        input_ids: Tensor,
        edge_index,
        *,
        pos: Tensor,
        cache=None,
        return_hidden: bool = False,
        edge_head: Tensor | None = None,
    ):
        """Token ids ``[N]``, the graph of every layer (one ``edge_index`` ``[2, E]``, with
        ``edge_head`` ``[E]`` for a per-head one, or one graph per layer:
        :func:`gnn_transformer.layers.resolve_layer_graphs`), positions ``[N]`` -> logits
        ``[N, vocab]`` (and the hidden states ``[N, C]`` with ``return_hidden``). With a ``cache``,
        the nodes are new tokens and each graph runs from all cached plus new nodes to them."""
        n = self.config.n_positions
        check_positions(pos, n, f"(check 'pos': n_positions={n})")
        check_ids(input_ids, self.wte.num_embeddings, "input_ids")
        h = self.drop(self.wte(input_ids) + self.wpe(pos))  # [N, C]
        h = self.encoder(h, edge_index, cache=cache, edge_head=edge_head)
        logits = self.lm_head(h)
        return (logits, h) if return_hidden else logits

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
        mask, pos, lengths = flatten_inputs(input_ids, attention_mask, position_ids, self.wpe.num_embeddings)
        num_layers = self.config.n_layer
        topology = resolve_topologies(topology, self.topology, num_layers)
        graphs = layer_edges(
            topology, [default_topology("causal")] * num_layers, lengths, input_ids.device, self.config.n_head
        )
        recorder: AbstractContextManager[list[Tensor]] = (
            attention_weights(self.encoder) if output_attentions else nullcontext([])
        )
        with recorder as weights:
            logits, h = self.forward_graph(input_ids[mask], graphs, pos=pos, return_hidden=True)
        logits = scatter_back(logits, mask)
        out = GraphModelOutput(
            last_hidden_state=scatter_back(h, mask),
            logits=logits,
            loss=None if labels is None else causal_lm_loss(logits, labels),
        )
        if output_attentions:
            out.edge_attentions = tuple(zip(graphs, weights))
            out.attentions = dense_attentions(out.edge_attentions, mask, self.config.n_head)
        return out

    @classmethod
    def from_hf(cls, model, *, topology: Topologies | None = None, backend: str = "auto"):
        """A graph model with the weights of a Hugging Face ``GPT2Model`` or ``GPT2LMHeadModel``
        (a ``GPT2Model``'s head is tied to ``wte``). Other heads (``score``, ...) are refused: pass
        such a model's ``.transformer`` to import its base."""
        check_model(model, "gpt2", cls)
        base = getattr(model, "transformer", model)
        others = sorted({name for name, _ in model.named_children()} - {"transformer", "lm_head"})
        if base is not model and others:
            raise ValueError(
                f"Expected a GPT2Model or GPT2LMHeadModel (got {type(model).__name__} "
                f"with modules {others}); pass its '.transformer' to import the base "
                "model with the head tied to 'wte'"
            )
        config = base.config
        graph = cls(config, topology=topology, backend=backend)
        state = gpt2_state_dict(base.state_dict(), config.n_layer)
        head = getattr(model, "lm_head", None)
        state["lm_head.weight"] = head.weight if head is not None else state["wte.weight"]
        source = next(base.parameters())
        graph.to(device=source.device, dtype=source.dtype)
        graph.load_state_dict(state)
        return graph.train(base.training)


def gpt2_renaming(num_layers: int) -> Renaming:
    """Every :class:`GraphGPT2LMHeadModel` parameter but ``lm_head`` and the ``GPT2Model`` key it
    comes from (``Conv1D`` weights transposed)."""
    table: Renaming = [
        ("wte.weight", ("wte.weight",), False),
        ("wpe.weight", ("wpe.weight",), False),
        ("encoder.norm.weight", ("ln_f.weight",), False),
        ("encoder.norm.bias", ("ln_f.bias",), False),
    ]
    convs = {
        "attn.c_attn": "self_attn.in_proj_",
        "attn.c_proj": "self_attn.out_proj.",
        "mlp.c_fc": "linear1.",
        "mlp.c_proj": "linear2.",
    }
    for i in range(num_layers):
        src, dst = f"h.{i}.", f"encoder.layers.{i}."
        for conv, linear in convs.items():
            table += [
                (dst + linear + "weight", (src + conv + ".weight",), True),  # Conv1D: [in, out]
                (dst + linear + "bias", (src + conv + ".bias",), False),
            ]
        table += [
            (dst + f"{norm}.{kind}", (src + f"{ln}.{kind}",), False)
            for ln, norm in (("ln_1", "norm1"), ("ln_2", "norm2"))
            for kind in ("weight", "bias")
        ]
    return table


def gpt2_state_dict(hf: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """A ``GPT2Model`` state dict in the names of :class:`GraphGPT2LMHeadModel` (Conv1D transposed)."""
    return renamed_state_dict(hf, gpt2_renaming(num_layers))


def gpt2_hf_state_dict(graph: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """The inverse of :func:`gpt2_state_dict`: a :class:`GraphGPT2LMHeadModel` state dict (without
    ``lm_head``) in the names of ``GPT2Model`` (``Conv1D`` layout ``[in, out]``)."""
    return hf_state_dict(graph, gpt2_renaming(num_layers))


__all__ = ["GraphGPT2LMHeadModel", "gpt2_state_dict", "gpt2_hf_state_dict"]
