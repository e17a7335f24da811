r"""GPT-2 on token graphs: :class:`GraphGPT2LMHeadModel` and :func:`gpt2_state_dict`.

``GPT2Model`` / ``GPT2LMHeadModel`` (other heads are refused) becomes token and position
embeddings, pre-norm layers (``gelu_new``) of :mod:`gnn_transformer.layers`, final norm and the
tied head. GPT-2's ``Conv1D`` stores weights as ``[in, out]``; they are transposed into
``nn.Linear`` layout. The token graph defaults to ``topology.causal``.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..attention import check_ids
from ..layers import GraphTransformerEncoder, GraphTransformerEncoderLayer, get_activation
from ._common import (GraphModelOutput, Topology, causal_lm_loss, check_config, check_model, check_positions,
                      check_topology, edges, flatten_inputs, resolve_topology, scatter_back)


class GraphGPT2LMHeadModel(nn.Module):
    r"""GPT-2 on token graphs (pre-norm layers, final norm, head tied to ``wte``).

    ``forward(input_ids, attention_mask=None, position_ids=None, labels=None, *, topology=None)`` ->
    :class:`GraphModelOutput` with ``logits`` ``[B, T, vocab]`` and ``last_hidden_state`` (and
    ``loss``, Hugging Face's shifted cross-entropy, given ``labels``);
    :meth:`forward_graph` is the graph-native path (also used by
    :func:`gnn_transformer.decoding.generate` with a key/value cache).
    """

    def __init__(self, config, *, topology: Topology | None = None, backend: str = "auto") -> None:
        super().__init__()
        check_config(config, "gpt2", type(self))
        if not getattr(config, "scale_attn_weights", True) or getattr(
                config, "scale_attn_by_inverse_layer_idx", False):
            raise ValueError("Expected GPT-2 attention scaled by 1/sqrt(head_dim) only (got "
                             f"scale_attn_weights={config.scale_attn_weights}, "
                             f"scale_attn_by_inverse_layer_idx={config.scale_attn_by_inverse_layer_idx})")
        if getattr(config, "add_cross_attention", False):
            raise ValueError("Expected a GPT-2 config without cross-attention (got add_cross_attention)")
        self.config = config
        self.topology = None if topology is None else check_topology(topology)
        c = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, c)
        self.wpe = nn.Embedding(config.n_positions, c)
        self.drop = nn.Dropout(config.embd_pdrop)
        layer = GraphTransformerEncoderLayer(
            c, config.n_head, config.n_inner or 4 * c, dropout=config.resid_pdrop,
            activation=get_activation(config.activation_function),
            layer_norm_eps=config.layer_norm_epsilon, norm_first=True, backend=backend)
        layer.self_attn.dropout = config.attn_pdrop
        layer.dropout.p = 0.0  # GPT2MLP has no dropout between activation and c_proj
        self.encoder = GraphTransformerEncoder(layer, config.n_layer,
                                               nn.LayerNorm(c, eps=config.layer_norm_epsilon))
        self.lm_head = nn.Linear(c, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.weight = self.wte.weight

    def forward_graph(self, input_ids: Tensor, edge_index: Tensor, *, pos: Tensor,
                      cache=None, return_hidden: bool = False):
        """Token ids ``[N]``, graph ``[2, E]``, positions ``[N]`` -> logits ``[N, vocab]`` (and the
        hidden states ``[N, C]`` with ``return_hidden``). With a ``cache``, the nodes are new tokens
        and ``edge_index`` runs from all cached plus new nodes to them."""
        n = self.config.n_positions
        check_positions(pos, n, f"(check 'pos': n_positions={n})")
        check_ids(input_ids, self.wte.num_embeddings, "input_ids")
        h = self.drop(self.wte(input_ids) + self.wpe(pos))  # [N, C]
        h = self.encoder(h, edge_index, cache=cache)
        logits = self.lm_head(h)
        return (logits, h) if return_hidden else logits

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, labels: Tensor | None = None, *,
                topology: Topology | None = None) -> GraphModelOutput:
        mask, pos, lengths = flatten_inputs(input_ids, attention_mask, position_ids, self.wpe.num_embeddings)
        topology = resolve_topology(topology, self.topology, "causal")
        edge_index = edges(topology, lengths, input_ids.device)
        logits, h = self.forward_graph(input_ids[mask], edge_index, pos=pos, return_hidden=True)
        logits = scatter_back(logits, mask)
        return GraphModelOutput(last_hidden_state=scatter_back(h, mask), logits=logits,
                                loss=None if labels is None else causal_lm_loss(logits, labels))

    @classmethod
    def from_hf(cls, model, *, topology: Topology | None = None, backend: str = "auto"):
        """A graph model with the weights of a Hugging Face ``GPT2Model`` or ``GPT2LMHeadModel``
        (a ``GPT2Model``'s head is tied to ``wte``). Other heads (``score``, ...) are refused: pass
        such a model's ``.transformer`` to import its base."""
        check_model(model, "gpt2", cls)
        base = getattr(model, "transformer", model)
        others = sorted({name for name, _ in model.named_children()} - {"transformer", "lm_head"})
        if base is not model and others:
            raise ValueError(f"Expected a GPT2Model or GPT2LMHeadModel (got {type(model).__name__} "
                             f"with modules {others}); pass its '.transformer' to import the base "
                             "model with the head tied to 'wte'")
        config = base.config
        graph = cls(config, topology=topology, backend=backend)
        state = gpt2_state_dict(base.state_dict(), config.n_layer)
        head = getattr(model, "lm_head", None)
        state["lm_head.weight"] = head.weight if head is not None else state["wte.weight"]
        source = next(base.parameters())
        graph.to(device=source.device, dtype=source.dtype)
        graph.load_state_dict(state)
        return graph.train(base.training)


def gpt2_state_dict(hf: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """A ``GPT2Model`` state dict in the names of :class:`GraphGPT2LMHeadModel` (Conv1D transposed)."""
    out = {"wte.weight": hf["wte.weight"], "wpe.weight": hf["wpe.weight"],
           "encoder.norm.weight": hf["ln_f.weight"], "encoder.norm.bias": hf["ln_f.bias"]}
    for i in range(num_layers):
        src, dst = f"h.{i}.", f"encoder.layers.{i}."
        pairs = {"attn.c_attn": "self_attn.in_proj", "attn.c_proj": "self_attn.out_proj.",
                 "mlp.c_fc": "linear1.", "mlp.c_proj": "linear2."}
        for conv, linear in pairs.items():
            sep = "_" if linear.endswith("in_proj") else ""
            out[dst + linear + sep + "weight"] = hf[src + conv + ".weight"].t()  # Conv1D: [in, out]
            out[dst + linear + sep + "bias"] = hf[src + conv + ".bias"]
        for ln, norm in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[dst + f"{norm}.weight"] = hf[src + f"{ln}.weight"]
            out[dst + f"{norm}.bias"] = hf[src + f"{ln}.bias"]
    return out


def gpt2_hf_state_dict(graph: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """The inverse of :func:`gpt2_state_dict`: a :class:`GraphGPT2LMHeadModel` state dict (without
    ``lm_head``) in the names of ``GPT2Model`` (``Conv1D`` layout ``[in, out]``)."""
    out = {"wte.weight": graph["wte.weight"], "wpe.weight": graph["wpe.weight"],
           "ln_f.weight": graph["encoder.norm.weight"], "ln_f.bias": graph["encoder.norm.bias"]}
    for i in range(num_layers):
        src, dst = f"encoder.layers.{i}.", f"h.{i}."
        pairs = {"attn.c_attn": "self_attn.in_proj_", "attn.c_proj": "self_attn.out_proj.",
                 "mlp.c_fc": "linear1.", "mlp.c_proj": "linear2."}
        for conv, linear in pairs.items():
            out[dst + conv + ".weight"] = graph[src + linear + "weight"].t()  # nn.Linear: [out, in]
            out[dst + conv + ".bias"] = graph[src + linear + "bias"]
        for ln, norm in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[dst + f"{ln}.weight"] = graph[src + f"{norm}.weight"]
            out[dst + f"{ln}.bias"] = graph[src + f"{norm}.bias"]
    return out


__all__ = ["GraphGPT2LMHeadModel", "gpt2_state_dict", "gpt2_hf_state_dict"]
