r"""Weights between Hugging Face's parameter names and the graph models', both ways.

:func:`decoder_state_dict` renames a Hugging Face base model's state dict (``LlamaModel``,
``GPTNeoModel``, ...) into :class:`~gnn_transformer.hf.GraphDecoderLM`'s; :func:`decoder_hf_state_dict`
is its inverse; :func:`to_hf` builds the Hugging Face model of a graph model, with its weights.
Query, key and value projections are concatenated into one ``in_proj_weight`` (Phi-3 stores them
so already); Phi-3's fused ``gate_up_proj`` is split into ``gate_proj`` and ``up_proj``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .decoders import DecoderConfig

# graph key -> the Hugging Face keys whose concatenation (along dim 0) it is
Pairs = list[tuple[str, list[str]]]

_NORMS_LLAMA = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_NORMS_GEMMA = {
    "attn_norm": "input_layernorm",
    "attn_out_norm": "post_attention_layernorm",
    "mlp_norm": "pre_feedforward_layernorm",
    "mlp_out_norm": "post_feedforward_layernorm",
}


def _gpt_neo_pairs(spec: DecoderConfig) -> Pairs:
    pairs = [
        ("embed_tokens.weight", ["wte.weight"]),
        ("embed_positions.weight", ["wpe.weight"]),
        ("norm.weight", ["ln_f.weight"]),
        ("norm.bias", ["ln_f.bias"]),
    ]
    for i in range(spec.num_layers):
        src, dst = f"h.{i}.", f"layers.{i}."
        pairs.append((dst + "self_attn.in_proj_weight", [src + f"attn.attention.{n}_proj.weight" for n in "qkv"]))
        for kind in ("weight", "bias"):
            pairs += [
                (dst + f"self_attn.out_proj.{kind}", [src + f"attn.attention.out_proj.{kind}"]),
                (dst + f"attn_norm.{kind}", [src + f"ln_1.{kind}"]),
                (dst + f"mlp_norm.{kind}", [src + f"ln_2.{kind}"]),
                (dst + f"mlp.up_proj.{kind}", [src + f"mlp.c_fc.{kind}"]),
                (dst + f"mlp.down_proj.{kind}", [src + f"mlp.c_proj.{kind}"]),
            ]
    return pairs


def _pairs(spec: DecoderConfig) -> Pairs:
    """Every graph parameter of a model with ``spec`` and the Hugging Face keys it comes from."""
    if spec.family == "gpt_neo":
        return _gpt_neo_pairs(spec)
    pairs = [("embed_tokens.weight", ["embed_tokens.weight"]), ("norm.weight", ["norm.weight"])]
    norms = _NORMS_GEMMA if spec.sandwich_norms else _NORMS_LLAMA
    for i in range(spec.num_layers):
        src, dst = f"layers.{i}.", f"layers.{i}."
        pairs += [(dst + f"{graph}.weight", [src + f"{hf}.weight"]) for graph, hf in norms.items()]
        if spec.family == "phi3":
            pairs += [
                (dst + "self_attn.in_proj_weight", [src + "self_attn.qkv_proj.weight"]),
                (dst + "mlp.gate_proj.weight", [src + "mlp.gate_up_proj.weight:0"]),
                (dst + "mlp.up_proj.weight", [src + "mlp.gate_up_proj.weight:1"]),
            ]
        else:
            pairs += [(dst + "self_attn.in_proj_weight", [src + f"self_attn.{n}_proj.weight" for n in "qkv"])]
            kinds = ("weight", "bias") if spec.mlp_bias else ("weight",)
            pairs += [
                (dst + f"mlp.{n}_proj.{kind}", [src + f"mlp.{n}_proj.{kind}"]) for n in ("gate", "up") for kind in kinds
            ]
        if spec.qkv_bias:
            pairs.append((dst + "self_attn.in_proj_bias", [src + f"self_attn.{n}_proj.bias" for n in "qkv"]))
        pairs.append((dst + "self_attn.out_proj.weight", [src + "self_attn.o_proj.weight"]))
        if spec.out_bias:
            pairs.append((dst + "self_attn.out_proj.bias", [src + "self_attn.o_proj.bias"]))
        kinds = ("weight", "bias") if spec.mlp_bias else ("weight",)
        pairs += [(dst + f"mlp.down_proj.{kind}", [src + f"mlp.down_proj.{kind}"]) for kind in kinds]
        if spec.qk_norm:
            pairs += [(dst + f"self_attn.{n}.weight", [src + f"self_attn.{n}.weight"]) for n in ("q_norm", "k_norm")]
    return pairs


def _read(hf: dict[str, Tensor], key: str) -> Tensor:
    """``hf[key]``, or half ``h`` of a fused tensor for ``key`` ending in ``:h`` (dim 0)."""
    name, _, half = key.partition(":")
    if name not in hf:
        raise ValueError(f"Expected the Hugging Face weight {name!r} in the state dict (missing)")
    return hf[name] if not half else hf[name].chunk(2, dim=0)[int(half)]


def decoder_state_dict(hf: dict[str, Tensor], spec: DecoderConfig) -> dict[str, Tensor]:
    """A Hugging Face base model's state dict (``LlamaModel``, ``Gemma3TextModel``, ``GPTNeoModel``,
    ...) in the parameter names of :class:`~gnn_transformer.hf.GraphDecoderLM` (without ``lm_head``)."""
    return {
        graph: torch.cat([_read(hf, key) for key in keys]) if len(keys) > 1 else _read(hf, keys[0])
        for graph, keys in _pairs(spec)
    }


def decoder_hf_state_dict(graph: dict[str, Tensor], spec: DecoderConfig) -> dict[str, Tensor]:
    """The inverse of :func:`decoder_state_dict`: a graph model's state dict (without ``lm_head``) in
    the names of the Hugging Face base model."""
    kv_dim = spec.num_kv_heads * spec.head_dim
    sizes = [spec.num_heads * spec.head_dim, kv_dim, kv_dim]  # query, key, value rows
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[int, Tensor]] = {}  # the two halves of a Hugging Face tensor, by index
    for key, names in _pairs(spec):
        value = graph[key]
        parts = value.split(sizes) if len(names) == 3 else (value,)
        for name, part in zip(names, parts):
            base, _, half = name.partition(":")
            if half:
                fused.setdefault(base, {})[int(half)] = part
            else:
                out[base] = part
    for base, halves in fused.items():
        out[base] = torch.cat([halves[0], halves[1]])
    return out


def to_hf(graph: nn.Module):
    """The Hugging Face model of a graph model, with its weights, device, dtype and training mode:
    a :class:`~gnn_transformer.hf.GraphDecoderLM` becomes its family's causal LM
    (``LlamaForCausalLM``, ``Gemma3ForCausalLM``, ``GPTNeoForCausalLM``, ...), a
    :class:`~gnn_transformer.hf.GraphModernBertModel` a ``ModernBertModel`` (or
    ``ModernBertForMaskedLM`` with its head), a :class:`~gnn_transformer.hf.GraphBertModel` a
    ``BertModel`` (with its pooler when it has one), a
    :class:`~gnn_transformer.hf.GraphGPT2LMHeadModel` a ``GPT2LMHeadModel``. The graph is not part
    of the export: Hugging Face computes its own masks, so the outputs are equal on the models'
    default graphs. Needs ``transformers``."""
    from .bert import GraphBertModel, bert_hf_state_dict
    from .decoders import GraphDecoderLM
    from .gpt2 import GraphGPT2LMHeadModel, gpt2_hf_state_dict
    from .modernbert import GraphModernBertModel, modernbert_hf_state_dict

    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("gnn_transformer.hf.to_hf needs transformers: pip install 'gnn-transformer[hf]'") from err
    if isinstance(graph, GraphDecoderLM):
        model = transformers.AutoModelForCausalLM.from_config(graph.config)
        prefix = model.base_model_prefix
        state = {f"{prefix}.{k}": v for k, v in decoder_hf_state_dict(graph.state_dict(), graph.spec).items()}
        state["lm_head.weight"] = graph.lm_head.weight
    elif isinstance(graph, GraphModernBertModel):
        masked = graph.head is not None
        cls = transformers.ModernBertForMaskedLM if masked else transformers.ModernBertModel
        model = cls(graph.config)
        state = modernbert_hf_state_dict(
            graph.state_dict(), graph.config.num_hidden_layers, prefix="model." if masked else ""
        )
    elif isinstance(graph, GraphBertModel):
        model = transformers.BertModel(graph.config, add_pooling_layer=graph.pooler is not None)
        state = bert_hf_state_dict(graph.state_dict(), graph.config.num_hidden_layers)
    elif isinstance(graph, GraphGPT2LMHeadModel):
        model = transformers.GPT2LMHeadModel(graph.config)
        state = {f"transformer.{k}": v for k, v in gpt2_hf_state_dict(graph.state_dict(), graph.config.n_layer).items()}
        state["lm_head.weight"] = graph.lm_head.weight
    else:
        raise ValueError(
            f"Expected a GraphDecoderLM, GraphModernBertModel, GraphBertModel or GraphGPT2LMHeadModel "
            f"for 'graph' (got {type(graph).__name__})"
        )
    source = next(graph.parameters())
    model.to(device=source.device, dtype=source.dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:  # an invariant of the renaming, kept loud
        raise ValueError(
            f"Expected the exported weights to fill {type(model).__name__} (missing {missing}, unexpected {unexpected})"
        )
    return model.train(graph.training)


def _tied_keys(model) -> set[str]:
    """Parameters Hugging Face ties to others (shared storage), which a state dict may omit."""
    named = dict(model.named_parameters(remove_duplicate=False))
    first: dict[int, str] = {}
    tied = set()
    for name, param in named.items():
        if id(param) in first:
            tied.add(name)
        else:
            first[id(param)] = name
    return tied


__all__ = ["decoder_state_dict", "decoder_hf_state_dict", "to_hf"]
