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

# a token graph: an edge_index [2, E] for every head, or a per-head graph (edge_index, edge_head [E])
Graph = Tensor | tuple[Tensor, Tensor]
Topology = Callable[[Sequence[int]], Graph]
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
    # L x (graph, weights): (edge_index [2, E], [E, H]), or ((edge_index, edge_head), [E]) on a per-head graph
    edge_attentions: tuple[tuple[Graph, Tensor], ...] | None = None

    def to_tuple(self) -> tuple:
        """The fields that are not ``None``, in order."""
        return tuple(
            v
            for v in (
                self.loss,
                self.logits,
                self.last_hidden_state,
                self.pooler_output,
                self.attentions,
                self.edge_attentions,
            )
            if v is not None
        )

    def __getitem__(self, key: str | int | slice):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


def default_topology(name: str) -> Topology:
    from .. import topology  # resolved lazily: models do not depend on the builders

    return getattr(topology, name)


def flatten_inputs(
    input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None, max_positions: int | None
) -> tuple[Tensor, Tensor, list[int]]:
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
            raise ValueError(
                f"Expected 'attention_mask' of shape {list(input_ids.shape)} (got {list(attention_mask.shape)})"
            )
        mask = attention_mask.bool()
    if position_ids is None:
        position_ids = torch.arange(t, device=input_ids.device)
    elif not isinstance(position_ids, Tensor) or position_ids.shape not in ((t,), (1, t), (b, t)):
        got = list(position_ids.shape) if isinstance(position_ids, Tensor) else position_ids
        raise ValueError(
            f"Expected 'position_ids' of shape [{t}], [1, {t}] or [{b}, {t}] (that of "
            f"'input_ids' or one row of it; got {got})"
        )
    pos = position_ids.expand(b, t)[mask]
    if max_positions is not None:
        check_positions(pos, max_positions, "(check 'input_ids' length or 'position_ids')")
    else:
        bad = outside(pos, 2**62)
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
        raise ValueError(
            f"Found position {bad} but the model has position embeddings for 0..{max_positions - 1} {hint}"
        )


def scatter_back(h: Tensor, mask: Tensor) -> Tensor:
    out = h.new_zeros(*mask.shape, *h.shape[1:])  # [B, T, ...]
    out[mask] = h
    return out


def check_topology(topology) -> Topology:
    if not callable(topology):
        got = f"a tensor of shape {list(topology.shape)}" if isinstance(topology, Tensor) else repr(topology)
        raise ValueError(
            f"Expected 'topology' to be a callable lengths -> edge_index or (edge_index, edge_head) (got {got})"
        )
    return topology


def check_topologies(topology, num_layers: int) -> Topologies:
    """One callable for every layer, or a sequence of ``num_layers`` callables or ``None``."""
    if callable(topology) or isinstance(topology, (Tensor, str, bytes)) or not isinstance(topology, Sequence):
        return check_topology(topology)
    if len(topology) != num_layers:
        raise ValueError(
            f"Expected 'topology' to hold one builder (or None) per layer, {num_layers} (got "
            f"a sequence of length {len(topology)})"
        )
    for index, builder in enumerate(topology):
        if builder is not None and not callable(builder):
            raise ValueError(
                f"Expected 'topology[{index}]' to be a callable lengths -> edge_index or "
                f"(edge_index, edge_head), or None (got {builder!r})"
            )
    return list(topology)


def check_heads(edge_head: Tensor, num_heads: int, name: str) -> None:
    """A ``ValueError`` naming ``name`` unless the heads of ``edge_head`` are the model's
    ``num_heads`` attention heads: values in ``[0, num_heads)``, the last head among them (a graph
    built for fewer heads would leave the others without edges). Checked in one read back."""
    if not edge_head.numel():
        return
    lo, hi = (int(x) for x in torch.aminmax(edge_head))
    if lo < 0 or hi != num_heads - 1:
        raise ValueError(
            f"Expected '{name}' to return a per-head graph for the model's {num_heads} attention "
            f"heads, edge_head in 0..{num_heads - 1} (got edge_head in {lo}..{hi}: a graph for "
            f"{hi + 1} heads)"
        )


def edges(
    topology: Topology, lengths: list[int], device: torch.device, num_heads: int, name: str = "topology"
) -> Graph:
    """The token graph ``topology(lengths)`` on ``device``: an ``edge_index`` ``[2, E]``, or a
    per-head graph ``(edge_index, edge_head)`` whose heads are checked against the model's
    ``num_heads`` (:func:`check_heads`)."""
    graph = topology(lengths)
    if isinstance(graph, Tensor):
        return graph.to(device)
    if isinstance(graph, (tuple, list)) and len(graph) == 2 and all(isinstance(t, Tensor) for t in graph):
        edge_index, edge_head = graph
        if (
            edge_head.dim() != 1
            or edge_head.is_floating_point()
            or edge_head.dtype == torch.bool
            or edge_head.size(0) != (edge_index.size(-1) if edge_index.dim() else -1)
        ):
            raise ValueError(
                f"Expected '{name}' to return (edge_index [2, E], edge_head [E]) with integer "
                f"edge_head (got shapes {list(edge_index.shape)} and {list(edge_head.shape)}, "
                f"{edge_head.dtype}, from {topology!r})"
            )
        check_heads(edge_head, num_heads, name)
        return edge_index.to(device), edge_head.to(device)
    got = (
        f"a {type(graph).__name__} of length {len(graph)}" if isinstance(graph, (tuple, list)) else type(graph).__name__
    )
    raise ValueError(
        f"Expected '{name}' to return an edge_index tensor [2, E] or a pair (edge_index, edge_head) "
        f"(got {got} from {topology!r})"
    )


def layer_edges(
    topology: Topologies, native: Sequence[Topology], lengths: list[int], device: torch.device, num_heads: int
) -> list[Graph]:
    """One graph per layer: ``topology`` (one builder, or one per layer where not ``None``), else the
    layer's ``native`` builder; each distinct builder is called once, so layers that share a builder
    share its graph (and what the kernels cache for it). A per-head graph is a pair
    ``(edge_index, edge_head)``, as :func:`gnn_transformer.layers.resolve_layer_graphs` takes it."""
    builders = (
        [topology] * len(native) if callable(topology) else [n if t is None else t for t, n in zip(topology, native)]
    )
    named = (
        {id(topology): "topology"}
        if callable(topology)
        else {id(t): f"topology[{i}]" for i, t in reversed(list(enumerate(topology))) if t is not None}
    )
    built: dict[int, Graph] = {}
    for builder in builders:
        if id(builder) not in built:
            built[id(builder)] = edges(builder, lengths, device, num_heads, named.get(id(builder), "topology"))
    return [built[id(builder)] for builder in builders]


def graph_edge_index(graph: Graph) -> Tensor:
    """The ``edge_index`` of a graph (of a per-head pair, its first item)."""
    return graph[0] if isinstance(graph, tuple) else graph


def model_type(obj) -> str | None:
    return getattr(getattr(obj, "config", None), "model_type", None)


def check_config(config, expected: str | tuple[str, ...], cls: type) -> None:
    got = getattr(config, "model_type", None)
    if got not in ((expected,) if isinstance(expected, str) else expected):
        raise TypeError(
            f"Expected 'config' of a Hugging Face {expected!r} model for {cls.__name__} "
            f"(got {type(config).__name__} with model_type {got!r})"
        )


def check_model(model, expected: str | tuple[str, ...], cls: type) -> None:
    """A TypeError unless ``model`` is a Hugging Face model of type ``expected``."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"Expected 'model' to be a Hugging Face {expected!r} model for "
            f"{cls.__name__}.from_hf (got {type(model).__name__})"
        )
    got = model_type(model)
    if got not in ((expected,) if isinstance(expected, str) else expected):
        raise TypeError(
            f"Expected 'model' to be a Hugging Face {expected!r} model for "
            f"{cls.__name__}.from_hf (got {type(model).__name__} with model_type {got!r})"
        )


def resolve_topologies(topology: Topologies | None, model_topology: Topologies | None, num_layers: int) -> Topologies:
    """The call's topology (checked), else the model's, else ``None`` for every layer (the native
    graphs)."""
    if topology is not None:
        return check_topologies(topology, num_layers)
    return model_topology if model_topology is not None else [None] * num_layers


# one renamed tensor of a state dict: (graph key, the Hugging Face keys whose concatenation along dim 0
# it is, whether Hugging Face stores it transposed: GPT-2's Conv1D [in, out])
Renaming = list[tuple[str, tuple[str, ...], bool]]


def renamed_state_dict(hf: dict[str, Tensor], renaming: Renaming) -> dict[str, Tensor]:
    """A Hugging Face state dict in the graph model's names, by the table ``renaming``."""
    out = {}
    for graph_key, hf_keys, transposed in renaming:
        value = torch.cat([hf[key] for key in hf_keys]) if len(hf_keys) > 1 else hf[hf_keys[0]]
        out[graph_key] = value.t() if transposed else value
    return out


def hf_state_dict(graph: dict[str, Tensor], renaming: Renaming) -> dict[str, Tensor]:
    """The inverse of :func:`renamed_state_dict` by the same table: a graph model's state dict in
    Hugging Face's names (a concatenation split into equal parts)."""
    out = {}
    for graph_key, hf_keys, transposed in renaming:
        value = graph[graph_key].t() if transposed else graph[graph_key]
        for key, part in zip(hf_keys, value.chunk(len(hf_keys)) if len(hf_keys) > 1 else (value,)):
            out[key] = part
    return out


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    r"""Hugging Face's causal language-model loss: the mean cross-entropy of the logits at column
    ``t`` against ``labels[:, t + 1]``, over the labels that are not ``-100``, in float32.

    ``logits`` ``[B, T, V]``, ``labels`` ``[B, T]`` (usually ``input_ids`` with ``-100`` at padding).
    """
    if not isinstance(labels, Tensor) or labels.shape != logits.shape[:2] or labels.is_floating_point():
        got = list(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(
            f"Expected 'labels' to be an integer tensor of the shape of 'input_ids', "
            f"{list(logits.shape[:2])} (got {got})"
        )
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].to(logits.device)  # [B, T]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), shifted.reshape(-1), ignore_index=IGNORE_INDEX)


def masked_lm_loss(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    r"""Hugging Face's masked language-model loss: the mean cross-entropy of the logits at every
    position against ``labels`` at the same position, over the labels that are not ``-100``, in
    float32. ``logits`` ``[B, T, V]``, ``labels`` ``[B, T]``, ``mask`` ``[B, T]`` the real tokens:
    a label at padding must be ``-100`` (the graph computes no logits there)."""
    if not isinstance(labels, Tensor) or labels.shape != logits.shape[:2] or labels.is_floating_point():
        got = list(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(
            f"Expected 'labels' to be an integer tensor of the shape of 'input_ids', "
            f"{list(logits.shape[:2])} (got {got})"
        )
    labels = labels.to(logits.device)
    padded = (~mask) & (labels != IGNORE_INDEX)
    if bool(padded.any()):
        b, t = (int(i) for i in padded.nonzero()[0])
        raise ValueError(
            f"Expected 'labels' -100 at padded positions (got {int(labels[b, t])} at row {b}, "
            f"column {t}, where attention_mask is 0)"
        )
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def dense_attentions(
    edge_attentions: Sequence[tuple[Graph, Tensor]], mask: Tensor, num_heads: int
) -> tuple[Tensor, ...] | None:
    """Per-edge weights of each layer -> Hugging Face's ``[B, H, T, T]`` (query row, key column,
    zeros where the graph has no edge and at padding), or ``None`` above
    ``DENSE_ATTENTIONS_MAX_CELLS`` cells per layer. A layer's entry is ``(edge_index, weights
    [E, H])``, or ``((edge_index, edge_head), weights [E])`` on a per-head graph (each weight at
    its edge's head)."""
    b, t = mask.shape
    if not edge_attentions:
        return ()
    if b * num_heads * t * t > DENSE_ATTENTIONS_MAX_CELLS:
        return None
    row = torch.arange(b, device=mask.device).unsqueeze(1).expand(b, t)[mask]  # [N] row of each node
    col = torch.arange(t, device=mask.device).expand(b, t)[mask]  # [N] column of each node
    out = []
    for graph, alpha in edge_attentions:
        edge_index = graph_edge_index(graph)
        src, dst = edge_index[0].long(), edge_index[1].long()  # [E]
        dense = alpha.new_zeros(b, t, t, num_heads)  # [B, T_query, T_key, H]
        if isinstance(graph, tuple):  # per-head: weights [E], each at its edge's head
            dense[row[dst], col[dst], col[src], graph[1].long()] = alpha
        else:
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
