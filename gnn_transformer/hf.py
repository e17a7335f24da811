r"""Hugging Face BERT and GPT-2 as graph models, with their weights.

:func:`from_hf` turns a ``transformers`` model object (or :func:`from_pretrained` a local directory;
nothing is downloaded) into a graph model built from :mod:`gnn_transformer.layers`:

- BERT (``BertModel`` or any model with a BERT ``base_model``, whose task head is dropped) ->
  :class:`GraphBertModel`: word, position and token-type embeddings, post-norm encoder layers
  (exact GELU), optional pooler;
- GPT-2 (``GPT2Model`` / ``GPT2LMHeadModel``; other heads are refused) ->
  :class:`GraphGPT2LMHeadModel`: token and position embeddings, pre-norm layers (``gelu_new``),
  final norm, tied head. GPT-2's ``Conv1D`` stores weights as ``[in, out]``; they are transposed
  into ``nn.Linear`` layout.

The graph models accept Hugging Face's calling convention, ``model(input_ids=..., attention_mask=...,
token_type_ids=..., position_ids=...)``: the real tokens (``attention_mask == 1``) become the nodes,
padding is dropped, the token graph comes from ``topology`` (a callable ``lengths -> edge_index``;
default ``topology.full`` for BERT, ``topology.causal`` for GPT-2; pass e.g. a sliding window to run
the same weights on a sparse graph), and the output is scattered back to Hugging Face's shapes with
zeros at padded positions. Positions default to the column index, as in Hugging Face.
With the default graphs the outputs equal Hugging Face's at every real token (``tests/test_hf.py``).

``transformers`` is only needed by :func:`from_pretrained` (the optional extra ``[hf]``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import check_ids
from .layers import GraphTransformerEncoder, GraphTransformerEncoderLayer, get_activation

Topology = Callable[[Sequence[int]], Tensor]


@dataclass
class GraphModelOutput:
    """Outputs in Hugging Face's shapes: ``[B, T, ...]``, zeros at padded positions.

    Indexed like Hugging Face's ``ModelOutput``: ``out["logits"]`` by name, ``out[0]`` by position
    among the fields that are not ``None`` (GPT-2: ``logits``, ``last_hidden_state``; BERT:
    ``last_hidden_state``, ``pooler_output``), as in :meth:`to_tuple`.
    """

    logits: Tensor | None = None  # [B, T, vocab] (GPT-2)
    last_hidden_state: Tensor | None = None  # [B, T, C]
    pooler_output: Tensor | None = None  # [B, C] (BERT with a pooler)

    def to_tuple(self) -> tuple[Tensor, ...]:
        """The fields that are not ``None``, in order."""
        return tuple(v for v in (self.logits, self.last_hidden_state, self.pooler_output)
                     if v is not None)

    def __getitem__(self, key: str | int | slice):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


def _default_topology(name: str) -> Topology:
    from . import topology  # resolved lazily: models do not depend on the builders

    return getattr(topology, name)


def _flatten(input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
             max_positions: int) -> tuple[Tensor, Tensor, list[int]]:
    """Padded HF inputs -> real-token mask ``[B, T]``, node positions ``[N]``, lengths."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        got = list(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"Expected 'input_ids' to be an integer tensor [B, T] (got {got})")
    b, t = input_ids.shape
    if attention_mask is None:
        mask = torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"Expected 'attention_mask' of shape {list(input_ids.shape)} (got "
                             f"{list(attention_mask.shape)})")
        mask = attention_mask.bool()
    if position_ids is None:
        position_ids = torch.arange(t, device=input_ids.device)
    elif not isinstance(position_ids, Tensor) or position_ids.shape not in ((t,), (1, t), (b, t)):
        got = list(position_ids.shape) if isinstance(position_ids, Tensor) else position_ids
        raise ValueError(f"Expected 'position_ids' of shape [{t}], [1, {t}] or [{b}, {t}] (that of "
                         f"'input_ids' or one row of it; got {got})")
    pos = position_ids.expand(b, t)[mask]
    _check_positions(pos, max_positions, "(check 'input_ids' length or 'position_ids')")
    return mask, pos, mask.sum(1).tolist()


def _outside(values: Tensor, size: int) -> int | None:
    """A value of ``values`` outside ``[0, size)`` (the lowest if negative, else the highest), or
    ``None``: one pass, one read back to the host."""
    if not values.numel():
        return None
    lo, hi = (int(x) for x in torch.aminmax(values))
    return lo if lo < 0 else (hi if hi >= size else None)


def _check_positions(pos: Tensor, max_positions: int, hint: str) -> None:
    bad = _outside(pos, max_positions)
    if bad is not None:
        raise ValueError(f"Found position {bad} but the model has position embeddings for "
                         f"0..{max_positions - 1} {hint}")


def _scatter_back(h: Tensor, mask: Tensor) -> Tensor:
    out = h.new_zeros(*mask.shape, *h.shape[1:])  # [B, T, ...]
    out[mask] = h
    return out


def _check_topology(topology) -> Topology:
    if not callable(topology):
        got = (f"a tensor of shape {list(topology.shape)}" if isinstance(topology, Tensor)
               else repr(topology))
        raise ValueError(f"Expected 'topology' to be a callable lengths -> edge_index (got {got})")
    return topology


def _edges(topology: Topology, lengths: list[int], device: torch.device) -> Tensor:
    """The token graph ``topology(lengths)`` on ``device``, checked to be a tensor."""
    edge_index = topology(lengths)
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"Expected 'topology' to return an edge_index tensor [2, E] (got "
                        f"{type(edge_index).__name__} from {topology!r})")
    return edge_index.to(device)


def _model_type(obj) -> str | None:
    return getattr(getattr(obj, "config", None), "model_type", None)


def _check_config(config, expected: str, cls: type) -> None:
    got = getattr(config, "model_type", None)
    if got != expected:
        raise TypeError(f"Expected 'config' of a Hugging Face {expected!r} model for {cls.__name__} "
                        f"(got {type(config).__name__} with model_type {got!r})")


def _check_model(model, expected: str, cls: type):
    """The base model of ``model``, a Hugging Face model of type ``expected``, else a TypeError."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected 'model' to be a Hugging Face {expected!r} model for "
                        f"{cls.__name__}.from_hf (got {type(model).__name__})")
    got = _model_type(model)
    if got != expected:
        raise TypeError(f"Expected 'model' to be a Hugging Face {expected!r} model for "
                        f"{cls.__name__}.from_hf (got {type(model).__name__} with model_type {got!r})")


def _resolve_topology(topology: Topology | None, model_topology: Topology | None,
                      default: str) -> Topology:
    """The call's topology, else the model's, else the default builder named ``default``."""
    if topology is not None:
        return _check_topology(topology)
    return model_topology if model_topology is not None else _default_topology(default)


class GraphBertEmbeddings(nn.Module):
    """BERT's embeddings on nodes: word + position + token type, then LayerNorm and dropout."""

    def __init__(self, config) -> None:
        super().__init__()
        # as Hugging Face: the row of pad_token_id gets no gradient
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=getattr(config, "pad_token_id", None))
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, pos: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        check_ids(input_ids, self.word_embeddings.num_embeddings, "input_ids")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        check_ids(token_type_ids, self.token_type_embeddings.num_embeddings, "token_type_ids")
        h = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(pos))  # [N, C]
        return self.dropout(self.LayerNorm(h))


class GraphBertModel(nn.Module):
    r"""BERT on token graphs (post-norm encoder layers). Build with :meth:`from_hf` or :func:`from_hf`.

    ``forward(input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
    topology=None)`` -> :class:`GraphModelOutput` with ``last_hidden_state`` ``[B, T, C]`` (and
    ``pooler_output`` ``[B, C]``); :meth:`forward_graph` is the graph-native path on nodes.

    ``pooler_output`` pools each sequence's first real token (zeros for a row of padding only).
    Hugging Face pools column 0: the same with right padding (BERT's convention), but in a
    left-padded row Hugging Face pools a padding position, which the graph never computes.
    """

    def __init__(self, config, *, add_pooling_layer: bool = True, topology: Topology | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        _check_config(config, "bert", type(self))
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ValueError("Expected a BERT encoder config (got is_decoder / add_cross_attention)")
        position_type = getattr(config, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"Expected position_embedding_type 'absolute' (got {position_type!r})")
        self.config = config
        self.topology = None if topology is None else _check_topology(topology)
        self.embeddings = GraphBertEmbeddings(config)
        layer = GraphTransformerEncoderLayer(
            config.hidden_size, config.num_attention_heads, config.intermediate_size,
            dropout=config.hidden_dropout_prob, activation=get_activation(config.hidden_act),
            layer_norm_eps=config.layer_norm_eps, norm_first=False, backend=backend)
        layer.self_attn.dropout = config.attention_probs_dropout_prob
        layer.dropout.p = 0.0  # BertIntermediate has no dropout between activation and output.dense
        self.encoder = GraphTransformerEncoder(layer, config.num_hidden_layers)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None

    def forward_graph(self, input_ids: Tensor, edge_index: Tensor, *, pos: Tensor,
                      token_type_ids: Tensor | None = None, edge_bias: Tensor | None = None) -> Tensor:
        """Token ids ``[N]``, graph ``[2, E]``, positions ``[N]`` -> hidden states ``[N, C]``."""
        n = self.config.max_position_embeddings
        _check_positions(pos, n, f"(check 'pos': max_position_embeddings={n})")
        h = self.embeddings(input_ids, pos, token_type_ids)
        return self.encoder(h, edge_index, edge_bias=edge_bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None, *,
                topology: Topology | None = None) -> GraphModelOutput:
        mask, pos, lengths = _flatten(input_ids, attention_mask, position_ids,
                                      self.embeddings.position_embeddings.num_embeddings)
        if token_type_ids is not None and (not isinstance(token_type_ids, Tensor)
                                           or token_type_ids.shape != input_ids.shape):
            got = (list(token_type_ids.shape) if isinstance(token_type_ids, Tensor)
                   else type(token_type_ids).__name__)
            raise ValueError(f"Expected 'token_type_ids' of the shape of 'input_ids', "
                             f"{list(input_ids.shape)} (got {got})")
        topology = _resolve_topology(topology, self.topology, "full")
        edge_index = _edges(topology, lengths, input_ids.device)
        types = None if token_type_ids is None else token_type_ids[mask]
        h = self.forward_graph(input_ids[mask], edge_index, pos=pos, token_type_ids=types)
        out = GraphModelOutput(last_hidden_state=_scatter_back(h, mask))
        if self.pooler is not None:  # tanh(W h) of each sequence's first real token; 0 if none
            counts = torch.tensor(lengths, dtype=torch.long, device=h.device)
            first = torch.where(counts > 0, counts.cumsum(0) - counts, h.size(0))  # node index
            first_h = torch.cat([h, h.new_zeros(1, h.size(1))])[first]  # row N: a zero vector
            out.pooler_output = torch.tanh(self.pooler(first_h)) * (counts > 0).unsqueeze(-1)
        return out

    @classmethod
    def from_hf(cls, model, *, topology: Topology | None = None, backend: str = "auto"):
        """A graph model with the weights of a Hugging Face BERT model (``BertModel`` or a model
        whose ``base_model`` is one: its task head, e.g. ``classifier`` or ``cls``, is not
        imported; the pooler is, when the base model has one)."""
        _check_model(model, "bert", cls)
        base = getattr(model, "base_model", model)
        config = base.config
        pooler = getattr(base, "pooler", None)
        graph = cls(config, add_pooling_layer=pooler is not None, topology=topology, backend=backend)
        source = next(base.parameters())
        graph.to(device=source.device, dtype=source.dtype)
        graph.load_state_dict(bert_state_dict(base.state_dict(), config.num_hidden_layers))
        return graph.train(base.training)


def bert_state_dict(hf: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """A ``BertModel`` state dict in the parameter names of :class:`GraphBertModel`."""
    out = {k: v for k, v in hf.items() if k.startswith("embeddings.") and "position_ids" not in k
           and "token_type_ids" not in k}
    if "pooler.dense.weight" in hf:
        out["pooler.weight"], out["pooler.bias"] = hf["pooler.dense.weight"], hf["pooler.dense.bias"]
    for i in range(num_layers):
        src, dst = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"self_attn.in_proj_{kind}"] = torch.cat(
                [hf[src + f"attention.self.{name}.{kind}"] for name in ("query", "key", "value")])
            out[dst + f"self_attn.out_proj.{kind}"] = hf[src + f"attention.output.dense.{kind}"]
            out[dst + f"norm1.{kind}"] = hf[src + f"attention.output.LayerNorm.{kind}"]
            out[dst + f"linear1.{kind}"] = hf[src + f"intermediate.dense.{kind}"]
            out[dst + f"linear2.{kind}"] = hf[src + f"output.dense.{kind}"]
            out[dst + f"norm2.{kind}"] = hf[src + f"output.LayerNorm.{kind}"]
    return out


class GraphGPT2LMHeadModel(nn.Module):
    r"""GPT-2 on token graphs (pre-norm layers, final norm, head tied to ``wte``).

    ``forward(input_ids, attention_mask=None, position_ids=None, *, topology=None)`` ->
    :class:`GraphModelOutput` with ``logits`` ``[B, T, vocab]`` and ``last_hidden_state``;
    :meth:`forward_graph` is the graph-native path (also used by
    :func:`gnn_transformer.decoding.generate` with a key/value cache).
    """

    def __init__(self, config, *, topology: Topology | None = None, backend: str = "auto") -> None:
        super().__init__()
        _check_config(config, "gpt2", type(self))
        if not getattr(config, "scale_attn_weights", True) or getattr(
                config, "scale_attn_by_inverse_layer_idx", False):
            raise ValueError("Expected GPT-2 attention scaled by 1/sqrt(head_dim) only (got "
                             f"scale_attn_weights={config.scale_attn_weights}, "
                             f"scale_attn_by_inverse_layer_idx={config.scale_attn_by_inverse_layer_idx})")
        if getattr(config, "add_cross_attention", False):
            raise ValueError("Expected a GPT-2 config without cross-attention (got add_cross_attention)")
        self.config = config
        self.topology = None if topology is None else _check_topology(topology)
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
        _check_positions(pos, n, f"(check 'pos': n_positions={n})")
        check_ids(input_ids, self.wte.num_embeddings, "input_ids")
        h = self.drop(self.wte(input_ids) + self.wpe(pos))  # [N, C]
        h = self.encoder(h, edge_index, cache=cache)
        logits = self.lm_head(h)
        return (logits, h) if return_hidden else logits

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, *, topology: Topology | None = None
                ) -> GraphModelOutput:
        mask, pos, lengths = _flatten(input_ids, attention_mask, position_ids, self.wpe.num_embeddings)
        topology = _resolve_topology(topology, self.topology, "causal")
        edge_index = _edges(topology, lengths, input_ids.device)
        logits, h = self.forward_graph(input_ids[mask], edge_index, pos=pos, return_hidden=True)
        return GraphModelOutput(last_hidden_state=_scatter_back(h, mask),
                                logits=_scatter_back(logits, mask))

    @classmethod
    def from_hf(cls, model, *, topology: Topology | None = None, backend: str = "auto"):
        """A graph model with the weights of a Hugging Face ``GPT2Model`` or ``GPT2LMHeadModel``
        (a ``GPT2Model``'s head is tied to ``wte``). Other heads (``score``, ...) are refused: pass
        such a model's ``.transformer`` to import its base."""
        _check_model(model, "gpt2", cls)
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


def from_hf(model, *, topology: Topology | None = None, backend: str = "auto"):
    """The graph model of a Hugging Face BERT or GPT-2 model object (weights copied)."""
    model_type = _model_type(model)
    if model_type == "bert":
        return GraphBertModel.from_hf(model, topology=topology, backend=backend)
    if model_type == "gpt2":
        return GraphGPT2LMHeadModel.from_hf(model, topology=topology, backend=backend)
    raise ValueError(f"Expected a Hugging Face BERT or GPT-2 model (got model_type {model_type!r})")


def from_pretrained(path: str, *, topology: Topology | None = None, backend: str = "auto"):
    """Load a BERT or GPT-2 checkpoint from the local directory ``path`` (no network) as a graph model."""
    import os

    if not os.path.isdir(str(path)):
        raise ValueError(f"Expected 'path' to be a local directory with a saved model (got {path!r})")
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("gnn_transformer.hf.from_pretrained needs transformers: "
                          "pip install 'gnn-transformer[hf]'") from err
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    gpt2 = config.model_type == "gpt2"
    loader = transformers.AutoModelForCausalLM if gpt2 else transformers.AutoModel
    model, info = loader.from_pretrained(path, local_files_only=True, output_loading_info=True)
    # modules missing from the checkpoint were initialized randomly: drop them or refuse
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    optional = ("lm_head.",) if gpt2 else ("pooler.",)  # a GPT2Model; a BERT saved without pooler
    if any(not key.startswith(optional) for key in missing):
        raise ValueError(f"Expected a complete {type(model).__name__} checkpoint in {str(path)!r} "
                         f"(missing weights: {missing})")
    if gpt2 and unexpected:  # as from_hf, refuse GPT-2 heads that are not the LM head
        raise ValueError(f"Expected a GPT2Model or GPT2LMHeadModel checkpoint in {str(path)!r} "
                         f"(got weights a GPT2LMHeadModel does not use: {unexpected}); load it with "
                         "transformers and pass its '.transformer' to from_hf")
    if missing and gpt2:
        model = model.transformer  # a GPT2Model: the head is tied to wte, as in from_hf
    elif missing:
        model.pooler = None
    return from_hf(model.eval(), topology=topology, backend=backend)


__all__ = ["GraphModelOutput", "GraphBertModel", "GraphGPT2LMHeadModel", "bert_state_dict",
           "gpt2_state_dict", "from_hf", "from_pretrained"]
