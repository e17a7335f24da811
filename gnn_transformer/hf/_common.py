r"""What every imported model shares: the output container, padded inputs to nodes and back, the
token graphs of a call, labels to a loss, per-edge attention weights to Hugging Face's dense view,
and the recording of those weights from any model built on graph attention.

Notation: ``B`` rows, ``T`` columns of a padded batch, ``N`` real tokens (nodes), ``E`` edges,
``H`` heads, ``L`` layers, ``V`` vocabulary.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Topology = Callable[[Sequence[int]], Tensor]
# a call's graphs: one builder for every layer, or one per layer (None: the layer's native graph)
Topologies = Topology | Sequence[Topology | None]
IGNORE_INDEX = -100  # labels that add nothing to the loss (Hugging Face's and PyTorch's default)
DENSE_ATTENTIONS_MAX_CELLS = 1 << 24  # B * H * T * T at most for the dense view of attention weights


@dataclass
class GraphModelOutput:
    """Outputs in Hugging Face's shapes: ``[B, T, ...]``, zeros at padded positions.

    Indexed like Hugging Face's ``ModelOutput``: ``out["logits"]`` by name, ``out[0]`` by position
    among the fields that are not ``None`` (GPT-2: ``logits``, ``last_hidden_state``; BERT:
    ``last_hidden_state``, ``pooler_output``; ``loss`` first when labels were given), as in
    :meth:`to_tuple`.
    """

    loss: Tensor | None = None  # [] (causal LMs given labels)
    logits: Tensor | None = None  # [B, T, vocab] (language models)
    last_hidden_state: Tensor | None = None  # [B, T, C]
    pooler_output: Tensor | None = None  # [B, C] (BERT with a pooler)
    attentions: tuple[Tensor, ...] | None = None  # L x [B, H, T, T] (output_attentions, small inputs)
    edge_attentions: tuple[tuple[Tensor, Tensor], ...] | None = None  # L x (edge_index [2, E], weights [E, H])

    def to_tuple(self) -> tuple:
        """The fields that are not ``None``, in order."""
        return tuple(v for v in (self.loss, self.logits, self.last_hidden_state, self.pooler_output,
                                 self.attentions, self.edge_attentions) if v is not None)

    def __getitem__(self, key: str | int | slice):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


def default_topology(name: str) -> Topology:
    from .. import topology  # resolved lazily: models do not depend on the builders

    return getattr(topology, name)


def flatten_inputs(input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
                   max_positions: int | None) -> tuple[Tensor, Tensor, list[int]]:
    """Padded HF inputs -> real-token mask ``[B, T]``, node positions ``[N]``, lengths.
    ``max_positions``: the size of a learned position table (``None``: no table, positions >= 0)."""
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
    if max_positions is not None:
        check_positions(pos, max_positions, "(check 'input_ids' length or 'position_ids')")
    else:
        bad = outside(pos, 2 ** 62)
        if bad is not None:
            raise ValueError(f"Expected non-negative 'position_ids' (found {bad})")
    return mask, pos, mask.sum(1).tolist()


def outside(values: Tensor, size: int) -> int | None:
    """A value of ``values`` outside ``[0, size)`` (the lowest if negative, else the highest), or
    ``None``: one pass, one read back to the host."""
    if not values.numel():
        return None
    lo, hi = (int(x) for x in torch.aminmax(values))
    return lo if lo < 0 else (hi if hi >= size else None)


def check_positions(pos: Tensor, max_positions: int, hint: str) -> None:
    bad = outside(pos, max_positions)
    if bad is not None:
        raise ValueError(f"Found position {bad} but the model has position embeddings for "
                         f"0..{max_positions - 1} {hint}")


def scatter_back(h: Tensor, mask: Tensor) -> Tensor:
    out = h.new_zeros(*mask.shape, *h.shape[1:])  # [B, T, ...]
    out[mask] = h
    return out


def check_topology(topology) -> Topology:
    if not callable(topology):
        got = (f"a tensor of shape {list(topology.shape)}" if isinstance(topology, Tensor)
               else repr(topology))
        raise ValueError(f"Expected 'topology' to be a callable lengths -> edge_index (got {got})")
    return topology


def check_topologies(topology, num_layers: int) -> Topologies:
    """One callable for every layer, or a sequence of ``num_layers`` callables or ``None``."""
    if callable(topology) or isinstance(topology, (Tensor, str, bytes)) or not isinstance(topology, Sequence):
        return check_topology(topology)
    if len(topology) != num_layers:
        raise ValueError(f"Expected 'topology' to hold one builder (or None) per layer, {num_layers} (got "
                         f"a sequence of length {len(topology)})")
    for index, builder in enumerate(topology):
        if builder is not None and not callable(builder):
            raise ValueError(f"Expected 'topology[{index}]' to be a callable lengths -> edge_index or None "
                             f"(got {builder!r})")
    return list(topology)


def edges(topology: Topology, lengths: list[int], device: torch.device) -> Tensor:
    """The token graph ``topology(lengths)`` on ``device``, checked to be a tensor."""
    edge_index = topology(lengths)
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"Expected 'topology' to return an edge_index tensor [2, E] (got "
                        f"{type(edge_index).__name__} from {topology!r})")
    return edge_index.to(device)


def layer_edges(topology: Topologies, native: Sequence[Topology], lengths: list[int],
                device: torch.device) -> list[Tensor]:
    """One graph per layer: ``topology`` (one builder, or one per layer where not ``None``), else the
    layer's ``native`` builder; each distinct builder is called once."""
    builders = ([topology] * len(native) if callable(topology)
                else [n if t is None else t for t, n in zip(topology, native)])
    built: dict[int, Tensor] = {}
    for builder in builders:
        if id(builder) not in built:
            built[id(builder)] = edges(builder, lengths, device)
    return [built[id(builder)] for builder in builders]


def model_type(obj) -> str | None:
    return getattr(getattr(obj, "config", None), "model_type", None)


def check_config(config, expected: str | tuple[str, ...], cls: type) -> None:
    got = getattr(config, "model_type", None)
    if got not in ((expected,) if isinstance(expected, str) else expected):
        raise TypeError(f"Expected 'config' of a Hugging Face {expected!r} model for {cls.__name__} "
                        f"(got {type(config).__name__} with model_type {got!r})")


def check_model(model, expected: str | tuple[str, ...], cls: type) -> None:
    """A TypeError unless ``model`` is a Hugging Face model of type ``expected``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected 'model' to be a Hugging Face {expected!r} model for "
                        f"{cls.__name__}.from_hf (got {type(model).__name__})")
    got = model_type(model)
    if got not in ((expected,) if isinstance(expected, str) else expected):
        raise TypeError(f"Expected 'model' to be a Hugging Face {expected!r} model for "
                        f"{cls.__name__}.from_hf (got {type(model).__name__} with model_type {got!r})")


def resolve_topology(topology: Topology | None, model_topology: Topology | None,
                     default: str) -> Topology:
    """The call's topology, else the model's, else the default builder named ``default``."""
    if topology is not None:
        return check_topology(topology)
    return model_topology if model_topology is not None else default_topology(default)


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    r"""Hugging Face's causal language-model loss: the mean cross-entropy of the logits at column
    ``t`` against ``labels[:, t + 1]``, over the labels that are not ``-100``, in float32.

    ``logits`` ``[B, T, V]``, ``labels`` ``[B, T]`` (usually ``input_ids`` with ``-100`` at padding).
    """
    if not isinstance(labels, Tensor) or labels.shape != logits.shape[:2] or labels.is_floating_point():
        got = list(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"Expected 'labels' to be an integer tensor of the shape of 'input_ids', "
                         f"{list(logits.shape[:2])} (got {got})")
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].to(logits.device)  # [B, T]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), shifted.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def masked_lm_loss(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    r"""Hugging Face's masked language-model loss: the mean cross-entropy of the logits at every
    position against ``labels`` at the same position, over the labels that are not ``-100``, in
    float32. ``logits`` ``[B, T, V]``, ``labels`` ``[B, T]``, ``mask`` ``[B, T]`` the real tokens:
    a label at padding must be ``-100`` (the graph computes no logits there)."""
    if not isinstance(labels, Tensor) or labels.shape != logits.shape[:2] or labels.is_floating_point():
        got = list(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"Expected 'labels' to be an integer tensor of the shape of 'input_ids', "
                         f"{list(logits.shape[:2])} (got {got})")
    labels = labels.to(logits.device)
    padded = (~mask) & (labels != IGNORE_INDEX)
    if bool(padded.any()):
        b, t = (int(i) for i in padded.nonzero()[0])
        raise ValueError(f"Expected 'labels' -100 at padded positions (got {int(labels[b, t])} at row {b}, "
                         f"column {t}, where attention_mask is 0)")
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def dense_attentions(edge_attentions: Sequence[tuple[Tensor, Tensor]], mask: Tensor
                     ) -> tuple[Tensor, ...] | None:
    """Per-edge weights ``[E, H]`` of each layer -> Hugging Face's ``[B, H, T, T]`` (query row, key
    column, zeros where the graph has no edge and at padding), or ``None`` above
    ``DENSE_ATTENTIONS_MAX_CELLS`` cells per layer."""
    b, t = mask.shape
    if not edge_attentions:
        return ()
    heads = edge_attentions[0][1].size(1)
    if b * heads * t * t > DENSE_ATTENTIONS_MAX_CELLS:
        return None
    row = torch.arange(b, device=mask.device).unsqueeze(1).expand(b, t)[mask]  # [N] row of each node
    col = torch.arange(t, device=mask.device).expand(b, t)[mask]  # [N] column of each node
    out = []
    for edge_index, alpha in edge_attentions:
        src, dst = edge_index[0].long(), edge_index[1].long()  # [E]
        dense = alpha.new_zeros(b, t, t, heads)  # [B, T_query, T_key, H]
        dense[row[dst], col[dst], col[src]] = alpha
        out.append(dense.permute(0, 3, 1, 2))  # [B, H, T, T]
    return tuple(out)


@contextmanager
def attention_weights(model: nn.Module) -> Iterator[list[Tensor]]:
    """While open, every :class:`~gnn_transformer.GraphMultiheadAttention` of ``model`` computes as
    usual and appends its attention weights per edge (``[E, H]``, ``[E]`` on a per-head graph) to
    the yielded list, in call order; its callers get what they asked for."""
    from ..attention import GraphMultiheadAttention

    found: list[Tensor] = []
    wanted: dict[int, bool] = {}

    def ask(module, args, kwargs):
        wanted[id(module)] = bool(kwargs.get("return_attention_weights", False))
        return args, {**kwargs, "return_attention_weights": True}

    def take(module, args, kwargs, output):
        out, alpha = output
        found.append(alpha)
        return output if wanted.pop(id(module)) else out

    handles = []
    try:
        for module in model.modules():
            if isinstance(module, GraphMultiheadAttention):
                handles.append(module.register_forward_pre_hook(ask, with_kwargs=True))
                handles.append(module.register_forward_hook(take, with_kwargs=True))
        yield found
    finally:
        for handle in handles:
            handle.remove()
