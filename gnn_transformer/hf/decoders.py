r"""Today's decoder families on token graphs: one configurable :class:`GraphDecoderLM`.

Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Phi-3 and GPT-Neo are the same pre-norm
stack with different choices, read from the Hugging Face config by :func:`decoder_config`:

| choice | families |
| --- | --- |
| RMSNorm with gain ``w`` / ``1 + w`` / LayerNorm | Llama-like / Gemma / GPT-Neo |
| gated MLP (SwiGLU, GeGLU) / plain MLP | all but GPT-Neo / GPT-Neo |
| grouped-query attention, RoPE (scaled: linear, dynamic, llama3, YaRN, LongRoPE; partial) | all but GPT-Neo |
| learned absolute positions, no ``1/sqrt(D)`` scaling | GPT-Neo |
| qk-norm (RMSNorm of each query and key head) | Qwen3, Gemma 3 |
| norms after attention and MLP too, embeddings times ``sqrt(C)`` | Gemma 2, Gemma 3 |
| attention logit softcapping, ``query_pre_attn_scalar`` | Gemma 2 (Gemma 3: scalar) |
| final logit softcapping | Gemma 2 |
| causal sliding windows | Mistral, Phi-3, Qwen2/3 (``layer_types``), Gemma 2 (every other layer), |
|  | Gemma 3 (5 of 6), GPT-Neo (``attention_layers``) |
| own RoPE base on local layers | Gemma 3 |

Each layer's native graph is causal, or a causal sliding window. Hugging Face's window of ``W``
(``masking_utils``: key ``j`` is kept iff ``i - W < j <= i``; GPT-Neo's ``window_size`` the same)
keeps ``W`` keys, the query included: the radius of :func:`gnn_transformer.topology.sliding_window`
is ``W - 1``.

Notation: ``N`` nodes, ``C`` hidden size, ``H`` / ``H_kv`` query / key-value heads, ``D`` head
dimension, ``L`` layers, ``V`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from ..attention import GraphMultiheadAttention, check_ids
from ..layers import ACTIVATIONS, resolve_layer_graphs
from ..mlp import FeedForward
from ..norms import RMSNorm
from ..position import ROPE_TYPES, RopeScaling
from ._common import (
    GraphModelOutput,
    Topologies,
    Topology,
    causal_lm_loss,
    check_model,
    check_positions,
    check_topologies,
    dense_attentions,
    flatten_inputs,
    layer_edges,
    scatter_back,
)

# model_type -> family; the families share GraphDecoderLM
FAMILIES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "gpt_neo": "gpt_neo",
}
LAYER_TYPE_FAMILIES = ("qwen2", "qwen3", "gemma2", "gemma3")
ACTIVATION_NAMES = {"swish": "silu"}  # Hugging Face's aliases of the project's activations


@dataclass
class RopeConfig:
    """The rotary embedding of one layer."""

    base: float  # rope_theta
    scaling: RopeScaling  # frequency scaling (rope_type "default": none)
    rotary_dim: int  # rotated dimensions of each head (partial RoPE: < head_dim)


@dataclass
class DecoderConfig:
    """What a :class:`GraphDecoderLM` computes, read from a Hugging Face config (:func:`decoder_config`)."""

    family: str  # llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, gpt_neo
    vocab_size: int
    hidden_size: int  # C
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # H_kv
    head_dim: int  # D (H * D may differ from C)
    intermediate_size: int  # hidden features of the MLP
    activation: str  # of the MLP (a name of gnn_transformer.layers.ACTIVATIONS)
    gated_mlp: bool = True  # SwiGLU / GeGLU; False: GPT-Neo's plain MLP
    norm: str = "rms"  # "rms" (gain w), "rms_unit_offset" (Gemma: gain 1 + w), "layer" (LayerNorm)
    norm_eps: float = 1e-6
    qkv_bias: bool = False  # biases of the query, key and value projections
    out_bias: bool = False  # bias of the output projection
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm of every query and key head (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # norms after attention and after the MLP too (Gemma 2 and 3)
    embed_scale: float | None = None  # embeddings times this (Gemma: sqrt(C))
    max_position_embeddings: int | None = None  # size of the learned position table (GPT-Neo); None: RoPE
    rope: list[RopeConfig] = field(default_factory=list)  # one per layer (empty with learned positions)
    scale: float | None = None  # of the scores; None: 1 / sqrt(D)
    softcap: float | None = None  # attention logit softcapping
    final_softcap: float | None = None  # logit softcapping of the LM head
    windows: list[int | None] = field(default_factory=list)  # per layer: causal window radius, None: causal
    tie_word_embeddings: bool = True
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0  # on both residual branches (Phi-3, GPT-Neo)
    embed_dropout: float = 0.0  # on the embeddings (GPT-Neo)
    pad_token_id: int | None = None  # its embedding row gets no gradient


def _get(config, name: str, default=None):
    value = getattr(config, name, default)
    return default if value is None else value


def _refuse(field_name: str, value, why: str) -> NoReturn:
    raise ValueError(f"Unsupported Hugging Face config: {field_name}={value!r} ({why})")


def read_activation(config, name: str) -> str:
    """The activation named by the config field ``name``, or a ``ValueError`` naming field and value."""
    value = getattr(config, name)
    value = ACTIVATION_NAMES.get(value, value)
    if not isinstance(value, str) or value not in ACTIVATIONS:
        _refuse(name, getattr(config, name), f"supported: {sorted(ACTIVATIONS)} and 'swish'")
    return value


def _window_radius(window, field_name: str) -> int:
    """Hugging Face's causal window of ``W`` keys, the query included, as a radius ``W - 1``."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        _refuse(field_name, window, "expected a positive int")
    return window - 1


def _rope_params(config, layer_type: str | None) -> tuple[dict, str]:
    """The RoPE parameters of one layer type and the name of the config field they come from."""
    params = getattr(config, "rope_parameters", None)
    name = "rope_parameters"
    if params is None:  # configs of transformers 4: rope_theta and rope_scaling
        name = "rope_scaling"
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", _get(config, "rope_theta", 10000.0))
        if layer_type == "sliding_attention" and getattr(config, "rope_local_base_freq", None) is not None:
            params = {"rope_type": "default", "rope_theta": config.rope_local_base_freq}
    elif layer_type is not None and isinstance(params.get(layer_type), dict):
        params, name = params[layer_type], f"rope_parameters[{layer_type!r}]"
    return dict(params), name


def rope_config(config, layer_type: str | None, head_dim: int, partial_rotary: bool = False) -> RopeConfig:
    """The :class:`RopeConfig` of the layers of ``layer_type`` (``None``: of every layer) of a
    Hugging Face config, or a ``ValueError`` naming the field of an unsupported choice.

    ``partial_rotary``: the family's Hugging Face model rotates ``head_dim * partial_rotary_factor``
    dimensions (Phi-3). The others (Llama, Mistral, Qwen, Gemma, ModernBERT) rotate every dimension
    with the default RoPE whatever the factor, as here, and fail with a scaled one given a factor
    below 1, which is refused."""
    params, name = _rope_params(config, layer_type)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        _refuse(f"{name}['rope_type']", kind, f"supported: {list(ROPE_TYPES)}")
    partial = params.get("partial_rotary_factor", _get(config, "partial_rotary_factor", 1.0))
    if not partial_rotary and partial != 1.0:
        if kind != "default":
            _refuse(
                f"{name}['partial_rotary_factor']",
                partial,
                f"this family's Hugging Face model rotates every dimension and cannot run a factor "
                f"with rope_type {kind!r}: expected 1.0",
            )
        partial = 1.0  # Hugging Face's default RoPE of this family reads no factor
    rotary_dim = int(head_dim * partial)
    if rotary_dim <= 0 or rotary_dim % 2:
        _refuse(
            f"{name}['partial_rotary_factor']",
            partial,
            f"gives {rotary_dim} rotated dimensions of {head_dim}: expected a positive even number",
        )
    max_positions = _get(config, "max_position_embeddings")
    original = params.get("original_max_position_embeddings", _get(config, "original_max_position_embeddings"))
    if kind == "longrope":  # as Hugging Face standardizes the config first: its own field wins (Phi-3)
        original = _get(config, "original_max_position_embeddings", max_positions if original is None else original)
    factor = params.get("factor")
    if (
        kind in ("yarn", "longrope")
        and factor is None
        and isinstance(max_positions, int)
        and isinstance(original, int)
        and original > 0
    ):
        factor = max_positions / original
    scaling_fields: dict[str, Any] = {"factor": 1.0 if factor is None else float(factor)}  # checked by RopeScaling
    for key in (
        "low_freq_factor",
        "high_freq_factor",
        "beta_fast",
        "beta_slow",
        "attention_factor",
        "mscale",
        "mscale_all_dim",
        "truncate",
        "short_factor",
        "long_factor",
    ):
        if params.get(key) is not None:
            scaling_fields[key] = params[key]
    try:
        scaling = RopeScaling(
            kind, max_position_embeddings=max_positions, original_max_position_embeddings=original, **scaling_fields
        )
        scaling.check_dim(rotary_dim)
    except ValueError as err:
        raise ValueError(f"Unsupported Hugging Face config: {name}={params!r} ({err})") from err
    return RopeConfig(float(params["rope_theta"]), scaling, rotary_dim)


def _layer_types(config, num_layers: int) -> list[str]:
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * num_layers)
    if len(types) != num_layers:
        _refuse("layer_types", types, f"expected one per layer, {num_layers}")
    for kind in types:
        if kind not in ("full_attention", "sliding_attention"):
            _refuse("layer_types", types, "supported: 'full_attention', 'sliding_attention'")
    return types


def _gpt_neo_config(config) -> DecoderConfig:
    num_layers, heads = config.num_layers, config.num_heads
    windows = []
    for kind in config.attention_layers:
        if kind not in ("global", "local"):
            _refuse("attention_layers", config.attention_layers, "supported: 'global', 'local'")
        windows.append(_window_radius(config.window_size, "window_size") if kind == "local" else None)
    return DecoderConfig(
        family="gpt_neo",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=config.hidden_size // heads,
        intermediate_size=_get(config, "intermediate_size", 4 * config.hidden_size),
        activation=read_activation(config, "activation_function"),
        gated_mlp=False,
        norm="layer",
        norm_eps=config.layer_norm_epsilon,
        qkv_bias=False,
        out_bias=True,
        mlp_bias=True,
        max_position_embeddings=config.max_position_embeddings,
        scale=1.0,
        windows=windows,
        tie_word_embeddings=_get(config, "tie_word_embeddings", True),
        attention_dropout=float(config.attention_dropout),
        residual_dropout=float(config.resid_dropout),
        embed_dropout=float(config.embed_dropout),
    )


def decoder_config(config) -> DecoderConfig:
    """The :class:`DecoderConfig` of a Hugging Face config of a supported family; a ``ValueError``
    naming the config field and value for anything that would compute something else."""
    kind = getattr(config, "model_type", None)
    family = FAMILIES.get(kind) if isinstance(kind, str) else None
    if family is None:
        _refuse("model_type", kind, f"supported: {sorted(FAMILIES)}")
    if getattr(config, "add_cross_attention", False):
        _refuse("add_cross_attention", True, "no cross-attention in decoder-only graph models")
    if family == "gpt_neo":
        return _gpt_neo_config(config)
    if getattr(config, "use_bidirectional_attention", False):
        _refuse("use_bidirectional_attention", config.use_bidirectional_attention, "causal models only")
    if _get(config, "pretraining_tp", 1) != 1:
        _refuse("pretraining_tp", config.pretraining_tp, "expected 1")
    num_layers, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = _get(config, "head_dim", config.hidden_size // heads)
    gemma = family in ("gemma2", "gemma3")
    # the families whose Hugging Face models read layer_types (Llama, Mistral and Phi-3 do not)
    types = _layer_types(config, num_layers) if family in LAYER_TYPE_FAMILIES else ["full_attention"] * num_layers
    window = getattr(config, "sliding_window", None)
    if family in ("mistral", "phi3"):  # one window for every layer, when set
        windows = [None if window is None else _window_radius(window, "sliding_window")] * num_layers
    elif family == "llama":  # Hugging Face's Llama has no sliding window
        windows = [None] * num_layers
    else:
        windows = [_window_radius(window, "sliding_window") if kind == "sliding_attention" else None for kind in types]
    attention_bias = bool(_get(config, "attention_bias", False))
    if family == "qwen2":
        qkv_bias, out_bias = True, False
    elif family in ("phi3", "mistral"):  # their projections have no bias, whatever attention_bias says
        qkv_bias = out_bias = False
    else:
        qkv_bias = out_bias = attention_bias
    scale = None
    if gemma:
        scale = float(config.query_pre_attn_scalar) ** -0.5
    softcap = _get(config, "attn_logit_softcapping") if family == "gemma2" else None
    if family == "gemma3" and getattr(config, "attn_logit_softcapping", None) is not None:
        _refuse("attn_logit_softcapping", config.attn_logit_softcapping, "Gemma 3 applies none")
    return DecoderConfig(
        family=family,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=_get(config, "num_key_value_heads", heads),
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        activation=read_activation(config, "hidden_activation" if gemma else "hidden_act"),
        norm="rms_unit_offset" if gemma else "rms",
        norm_eps=config.rms_norm_eps,
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        mlp_bias=bool(_get(config, "mlp_bias", False)) if family == "llama" else False,
        qk_norm=family in ("qwen3", "gemma3"),
        sandwich_norms=gemma,
        embed_scale=config.hidden_size**0.5 if gemma else None,
        rope=[rope_config(config, kind if family == "gemma3" else None, head_dim, family == "phi3") for kind in types],
        scale=scale,
        softcap=None if softcap is None else float(softcap),
        final_softcap=(
            None if getattr(config, "final_logit_softcapping", None) is None else float(config.final_logit_softcapping)
        ),
        windows=windows,
        tie_word_embeddings=bool(_get(config, "tie_word_embeddings", False)),
        attention_dropout=float(_get(config, "attention_dropout", 0.0)),
        residual_dropout=float(_get(config, "resid_pdrop", 0.0)) if family == "phi3" else 0.0,
        pad_token_id=config.pad_token_id if isinstance(getattr(config, "pad_token_id", None), int) else None,
    )


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """``"rms"``, ``"rms_unit_offset"`` (Gemma) or ``"layer"`` normalization over ``dim`` features."""
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    return RMSNorm(dim, eps, unit_offset=kind == "rms_unit_offset")


class GraphDecoderLayer(nn.Module):
    r"""A pre-norm transformer layer on a token graph:
    ``x = x + post(SA(attn_norm(x))); x = x + post(MLP(mlp_norm(x)))``, ``post`` the optional
    ``attn_out_norm`` / ``mlp_out_norm`` (Gemma's sandwich norms) then the branch's residual dropout.

    ``forward(x, edge_index, *, pos, kv=None, edge_head=None, need_weights=False)`` -> ``[N, C]``
    (and the attention weights per edge with ``need_weights``); :meth:`self_kv` gives the keys and
    values a cache keeps.
    """

    def __init__(
        self,
        attn_norm: nn.Module,
        self_attn: GraphMultiheadAttention,
        mlp_norm: nn.Module,
        mlp: nn.Module,
        *,
        attn_out_norm: nn.Module | None = None,
        mlp_out_norm: nn.Module | None = None,
        attn_dropout: float = 0.0,
        mlp_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn_norm, self.self_attn, self.attn_out_norm = attn_norm, self_attn, attn_out_norm
        self.mlp_norm, self.mlp, self.mlp_out_norm = mlp_norm, mlp, mlp_out_norm
        self.attn_dropout, self.mlp_dropout = nn.Dropout(attn_dropout), nn.Dropout(mlp_dropout)

    def self_kv(self, x: Tensor, *, pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The keys (rotated) and values ``[N, H_kv, D]`` this layer's attention computes from ``x``."""
        return self.self_attn.key_value(self.attn_norm(x), pos=pos)

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        *,
        pos: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
        edge_head: Tensor | None = None,
        need_weights: bool = False,
    ):
        h = self.self_attn(
            self.attn_norm(x), edge_index, pos=pos, kv=kv, edge_head=edge_head, return_attention_weights=need_weights
        )
        h, alpha = h if need_weights else (h, None)
        if self.attn_out_norm is not None:
            h = self.attn_out_norm(h)
        x = x + self.attn_dropout(h)
        h = self.mlp(self.mlp_norm(x))
        if self.mlp_out_norm is not None:
            h = self.mlp_out_norm(h)
        x = x + self.mlp_dropout(h)  # [N, C]
        return (x, alpha) if need_weights else x


def _build_layer(spec: DecoderConfig, index: int, backend: str) -> GraphDecoderLayer:
    c = spec.hidden_size
    rope = spec.rope[index] if spec.rope else None
    attn = GraphMultiheadAttention(
        c,
        spec.num_heads,
        dropout=spec.attention_dropout,
        bias=spec.qkv_bias,
        out_bias=spec.out_bias,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        backend=backend,
        rope=rope is not None,
        rope_base=rope.base if rope is not None else 10000.0,
        rope_scaling=rope.scaling if rope is not None else None,
        rotary_dim=rope.rotary_dim if rope is not None else None,
        scale=spec.scale,
        softcap=spec.softcap,
        q_norm=make_norm(spec.norm, spec.head_dim, spec.norm_eps) if spec.qk_norm else None,
        k_norm=make_norm(spec.norm, spec.head_dim, spec.norm_eps) if spec.qk_norm else None,
    )
    mlp = FeedForward(c, spec.intermediate_size, spec.activation, gated=spec.gated_mlp, bias=spec.mlp_bias, dropout=0.0)

    def norm():
        return make_norm(spec.norm, c, spec.norm_eps)

    return GraphDecoderLayer(
        norm(),
        attn,
        norm(),
        mlp,
        attn_out_norm=norm() if spec.sandwich_norms else None,
        mlp_out_norm=norm() if spec.sandwich_norms else None,
        attn_dropout=spec.residual_dropout,
        mlp_dropout=spec.residual_dropout,
    )


def _causal_builder(radius: int | None) -> Topology:
    from .. import topology  # resolved lazily: models do not depend on the builders

    if radius is None:
        return topology.causal
    return lambda lengths: topology.sliding_window(lengths, radius, causal=True)


class GraphDecoderLM(nn.Module):
    r"""A decoder-only language model of a supported Hugging Face family on token graphs.

    Build with :meth:`from_hf` or :func:`gnn_transformer.hf.from_hf`. ``forward(input_ids,
    attention_mask=None, position_ids=None, labels=None, *, output_attentions=False,
    topology=None)`` -> :class:`GraphModelOutput` with ``logits`` ``[B, T, V]``,
    ``last_hidden_state`` ``[B, T, C]``, ``loss`` given ``labels`` (Hugging Face's shifted
    cross-entropy) and, with ``output_attentions``, ``edge_attentions`` (per layer the graph and
    its weights ``[E, H]``; on a per-head graph ``((edge_index, edge_head), [E])``) and
    ``attentions`` (per layer ``[B, H, T, T]``, for small inputs).

    Each layer attends along its native graph (:attr:`windows`: causal, or a causal sliding
    window) unless ``topology`` replaces it: a callable ``lengths -> edge_index`` or ``lengths ->
    (edge_index, edge_head)`` (a per-head graph: edge ``j -> i`` for query head ``edge_head[e]``
    only, heads ``0 .. H - 1`` of the model) for every layer, or a sequence of one callable (or
    ``None``: the native graph) per layer. :meth:`forward_graph` is the graph-native path, also
    used by :meth:`generate` with a key/value cache.

    Args:
        config: the Hugging Face config (kept as ``self.config``).
        topology: the default replacement of the native graphs (as in ``forward``).
        backend: attention backend (``"auto"`` picks ``"pyg"`` where softcapping is on).
    """

    def __init__(self, config, *, topology: Topologies | None = None, backend: str = "auto") -> None:
        super().__init__()
        spec = decoder_config(config)
        self.config, self.spec = config, spec
        self.topology = None if topology is None else check_topologies(topology, spec.num_layers)
        c = spec.hidden_size
        pad = spec.pad_token_id if spec.pad_token_id is not None and 0 <= spec.pad_token_id < spec.vocab_size else None
        self.embed_tokens = nn.Embedding(spec.vocab_size, c, padding_idx=pad)
        self.embed_positions = (
            nn.Embedding(spec.max_position_embeddings, c) if spec.max_position_embeddings is not None else None
        )
        self.embed_dropout = nn.Dropout(spec.embed_dropout)
        self.layers = nn.ModuleList([_build_layer(spec, index, backend) for index in range(spec.num_layers)])
        self.norm = make_norm(spec.norm, c, spec.norm_eps)
        self.lm_head = nn.Linear(c, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def windows(self) -> list[int | None]:
        """Each layer's native graph: a causal window radius (``W - 1`` for a window of ``W`` keys),
        or ``None`` for causal attention."""
        return list(self.spec.windows)

    def native_topologies(self) -> list[Topology]:
        """Each layer's native graph builder, ``lengths -> edge_index``."""
        builders = {radius: _causal_builder(radius) for radius in dict.fromkeys(self.spec.windows)}
        return [builders[radius] for radius in self.spec.windows]

    def embed(self, input_ids: Tensor, pos: Tensor) -> Tensor:
        """Token ids and positions ``[N]`` -> the first layer's input ``[N, C]``."""
        check_ids(input_ids, self.spec.vocab_size, "input_ids")
        h = self.embed_tokens(input_ids)  # [N, C]
        if self.spec.embed_scale is not None:
            h = h * torch.tensor(self.spec.embed_scale, dtype=h.dtype, device=h.device)
        if self.embed_positions is not None:
            n = self.embed_positions.num_embeddings  # the spec's max_position_embeddings
            check_positions(pos, n, f"(check 'pos': max_position_embeddings={n})")
            h = h + self.embed_positions(pos)
        return self.embed_dropout(h)

    def forward_graph(
        self,
        input_ids: Tensor,
        edge_index,
        *,
        pos: Tensor,
        cache=None,
        return_hidden: bool = False,
        output_attentions: bool = False,
    ):
        """Token ids ``[N]``, the graph of every layer (one ``edge_index`` ``[2, E]``, a sequence of
        one per layer or a callable: :func:`gnn_transformer.layers.resolve_layer_graphs`), positions
        ``[N]`` -> logits ``[N, V]`` (and the hidden states ``[N, C]`` with ``return_hidden``, the
        weights ``[E_l, H]``, ``[E_l]`` on a per-head graph, of every layer with
        ``output_attentions``). With a ``cache`` (:class:`gnn_transformer.decoding.KVCache`) the
        nodes are new tokens and each layer's graph runs from all cached plus new nodes to them."""
        graphs = resolve_layer_graphs(edge_index, len(self.layers), "edge_index")
        x = self.embed(input_ids, pos)
        weights = []
        for index, (layer, (graph, head)) in enumerate(zip(self.layers, graphs)):
            assert isinstance(layer, GraphDecoderLayer)  # the layers are built by _build_layer
            kv = None if cache is None else cache.update(index, layer.self_kv(x, pos=pos))
            x = layer(x, graph, pos=pos, kv=kv, edge_head=head, need_weights=output_attentions)
            if output_attentions:
                x, alpha = x
                weights.append(alpha)
        h = self.norm(x)  # [N, C]
        logits = self.lm_head(h)  # [N, V]
        if self.spec.final_softcap is not None:
            logits = torch.tanh(logits / self.spec.final_softcap) * self.spec.final_softcap
        out = (logits, h) if return_hidden else (logits,)
        out = out + (weights,) if output_attentions else out
        return out if len(out) > 1 else out[0]

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
        mask, pos, lengths = flatten_inputs(input_ids, attention_mask, position_ids, self.spec.max_position_embeddings)
        topology = self.topology if topology is None else check_topologies(topology, len(self.layers))
        graphs = layer_edges(
            topology if topology is not None else [None] * len(self.layers),
            self.native_topologies(),
            lengths,
            input_ids.device,
            self.spec.num_heads,
        )
        out = self.forward_graph(
            input_ids[mask], graphs, pos=pos, return_hidden=True, output_attentions=output_attentions
        )
        logits, h = scatter_back(out[0], mask), scatter_back(out[1], mask)
        result = GraphModelOutput(
            logits=logits, last_hidden_state=h, loss=None if labels is None else causal_lm_loss(logits, labels)
        )
        if output_attentions:
            result.edge_attentions = tuple(zip(graphs, out[2]))
            result.attentions = dense_attentions(result.edge_attentions, mask, self.spec.num_heads)
        return result

    @torch.no_grad()
    def generate(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 20, **kwargs
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Greedy (or sampled) generation with a key/value cache along each layer's native graph:
        :func:`gnn_transformer.decoding.generate` with ``window=self.windows``. Returns ``[B, width]``
        (each row its prompt without padding, its new tokens, then ``pad_token_id``; with
        ``return_logits``, also the logits of every step). A model built with another ``topology`` is
        refused: the cached steps follow the native windows. With LongRoPE, as Hugging Face's Phi-3
        ``generate``, the cache is dropped and every token recomputed with the long factors at the
        first step past ``original_max_position_embeddings`` (without ``eos_token_id``)."""
        from ..decoding import generate

        if self.topology is not None:
            raise ValueError(
                f"Expected a model without 'topology' for generate (got {self.topology!r}): "
                "cached generation follows the native windows; pass 'window=' to "
                "gnn_transformer.decoding.generate for other windows"
            )
        window = kwargs.pop("window", self.windows)
        switches = [
            r.scaling.original_max_position_embeddings
            for r in self.spec.rope
            if r.scaling.rope_type == "longrope" and r.scaling.original_max_position_embeddings is not None
        ]
        switch = min(switches) if switches else None
        lengths = (
            attention_mask.sum(1)
            if attention_mask is not None
            else torch.full((input_ids.size(0),), input_ids.size(1), device=input_ids.device)
        )
        first = None if switch is None else switch - int(lengths.max()) + 1  # new tokens before the long factors
        if (
            first is None
            or not 0 < first < max_new_tokens
            or not kwargs.get("use_cache", True)
            or kwargs.get("eos_token_id") is not None
        ):
            return generate(self, input_ids, max_new_tokens, attention_mask=attention_mask, window=window, **kwargs)
        # Hugging Face's Phi-3 drops its cache at the first step past the original length: recompute from there
        head = generate(self, input_ids, first, attention_mask=attention_mask, window=window, **kwargs)
        head, head_logits = head if kwargs.get("return_logits") else (head, None)
        mask = torch.arange(head.size(1), device=head.device) < (lengths + first).unsqueeze(1)  # [B, width]
        tail = generate(self, head, max_new_tokens - first, attention_mask=mask.long(), window=window, **kwargs)
        return tail if head_logits is None else (tail[0], torch.cat([head_logits, tail[1]]))

    @classmethod
    def from_hf(cls, model, *, topology: Topologies | None = None, backend: str = "auto"):
        """A graph model with the weights of a Hugging Face model of a supported family: the causal
        LM (``LlamaForCausalLM``, ``Gemma3ForCausalLM``, ``GPTNeoForCausalLM``, ...) or its base
        model (``LlamaModel``, ...: the head is then tied to the embeddings). Other heads are refused."""
        from .export import decoder_state_dict

        check_model(model, tuple(FAMILIES), cls)
        prefix = getattr(model, "base_model_prefix", "model")
        base = getattr(model, prefix, model)
        others = sorted({name for name, _ in model.named_children()} - {prefix, "lm_head"})
        if base is not model and others:
            raise ValueError(
                f"Expected a causal LM or its base model (got {type(model).__name__} with modules "
                f"{others}); pass its '.{prefix}' to import the base model"
            )
        graph = cls(base.config, topology=topology, backend=backend)
        state = decoder_state_dict(base.state_dict(), graph.spec)
        head = getattr(model, "lm_head", None) if base is not model else None
        state["lm_head.weight"] = head.weight if head is not None else state["embed_tokens.weight"]
        source = next(base.parameters())
        graph.to(device=source.device, dtype=source.dtype)
        graph.load_state_dict(state)
        if head is None and not graph.spec.tie_word_embeddings:  # a base model: its head is the embedding
            graph.lm_head.weight = graph.embed_tokens.weight
            graph.spec = replace(graph.spec, tie_word_embeddings=True)
        return graph.train(base.training)


__all__ = [
    "GraphDecoderLM",
    "GraphDecoderLayer",
    "DecoderConfig",
    "RopeConfig",
    "decoder_config",
    "make_norm",
    "FAMILIES",
    "rope_config",
    "read_activation",
]
