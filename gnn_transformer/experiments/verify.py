"""The equivalence check: attention on a token graph equals dense masked attention.

Two entry points:

- :func:`verify_topologies` runs every topology of the ``graphs/`` catalogue (or any list of specs)
  through :class:`~gnn_transformer.GraphMultiheadAttention`, for each backend, and through the
  dense reference :func:`gnn_transformer.dense.multihead_attention` with the same weights and the
  mask ``to_dense_mask(edge_index)``; it reports the largest difference of outputs and of input
  gradients. A per-head topology runs with its number of heads and the per-head mask
  ``to_dense_mask(..., edge_head=...)`` ``[B, H, T, T]``; a per-layer one through a
  :class:`~gnn_transformer.GraphTransformerEncoder` of one cycle plus a layer (so the cycle wraps)
  against :func:`gnn_transformer.dense.layers.encoder` with one mask per layer; a topology with a
  selector through a layer built with ``select=``, against the dense reference on the graph the
  selector chooses (within the built graph) from the same queries and keys.
- :func:`model_dense_error` checks a whole trained model: every attention call of one forward pass
  is recomputed by the dense reference from the very inputs it received.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import (
    GraphMultiheadAttention,
    GraphTransformerEncoder,
    GraphTransformerEncoderLayer,
    dense,
    from_padded,
    to_padded,
)
from ..dense.layers import encoder as dense_encoder
from ..topology import to_dense_mask
from ..topology.dynamic import selector
from ..topology.specs import LayerPattern
from .topologies import Topology, graph_to, label, resolve_topology
from .training import resolve_device

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclass
class VerifyRow:
    """One topology under one backend."""

    topology: str
    backend: str
    nodes: int
    edges: int
    max_out_error: float
    max_grad_error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_out_error <= self.tolerance and self.max_grad_error <= self.tolerance


def _plain(edge_index: Tensor) -> Tensor:
    return edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index


def _mask(edge_index: Tensor, edge_head: Tensor | None, lengths: list[int], num_heads: int) -> Tensor:
    """``[B, T, T]``, or ``[B, H, T, T]`` for a per-head graph."""
    if edge_head is None:
        return to_dense_mask(edge_index, lengths=lengths)
    return to_dense_mask(edge_index, lengths=lengths, edge_head=edge_head, num_heads=num_heads)


def dense_reference(
    layer: GraphMultiheadAttention,
    x: Tensor,
    edge_index: Tensor,
    lengths: Sequence[int],
    edge_bias: Tensor | None = None,
    pos: Tensor | None = None,
    edge_head: Tensor | None = None,
) -> Tensor:
    """The dense reference of ``layer(x, edge_index, edge_head=edge_head)`` on the sequences
    ``lengths``: ``[N, C]``.

    With rotary positions (``pos`` and a layer built with ``rope=True``) the queries and keys are
    rotated by the layer, then attended densely under the mask. A layer built with ``select``
    attends along the per-head graph its selector chooses within ``edge_index`` from these queries
    and keys (detached, as the layer does).
    """
    lengths = list(lengths)
    rotary = getattr(layer, "rotary", None) is not None and pos is not None
    if getattr(layer, "select", None) is not None:
        query, key = layer.project(x, x, x)[:2]  # [N, H, D], [N, H_kv, D]
        if rotary:
            query, key = layer.rotate(query, pos), layer.rotate(key, pos)
        with torch.no_grad():
            edge_index, edge_head = layer.select(query.detach(), key.detach(), edge_index)
    mask = _mask(edge_index, edge_head, lengths, layer.num_heads).to(x.device)  # [B(, H), T, T]
    bias = None
    if edge_bias is not None:
        bias = dense.edge_values_to_dense(edge_index, edge_bias, lengths)  # [B, H, T, T]
    if not rotary:
        x_pad = to_padded(x, lengths)  # [B, T, C]
        out, _ = dense.multihead_attention(layer, x_pad, x_pad, mask, bias=bias)
        return from_padded(out, lengths)  # [N, C]
    query = layer.rotate(layer.project_query(x), pos)  # [N, H, D]
    key, value = layer.key_value(x, pos=pos)  # [N, H_kv, D] each
    q_pad, k_pad, v_pad = (to_padded(t, lengths).transpose(1, 2) for t in (query, key, value))  # [B, H, T, D]
    scale = layer.head_dim**-0.5 if layer.scale is None else layer.scale
    out, _ = dense.scaled_dot_product(q_pad, k_pad, v_pad, mask, scale=scale, bias=bias, softcap=layer.softcap)
    out = from_padded(out.transpose(1, 2), lengths).reshape(x.size(0), -1)  # [N, C]
    return layer.out_proj(out)


def _grad(x: Tensor) -> Tensor:
    """The gradient of a leaf after backward: zeros when the output did not depend on it."""
    return torch.zeros_like(x) if x.grad is None else x.grad


def _errors(x_graph: Tensor, x_dense: Tensor, out_graph: Tensor, out_dense: Tensor) -> tuple[float, float]:
    """Backward through both with one random upstream gradient; the largest differences."""
    upstream = torch.randn_like(out_graph)
    (out_graph * upstream).sum().backward()
    (out_dense * upstream).sum().backward()
    out_err = (out_graph - out_dense).abs().max().item() if out_graph.numel() else 0.0
    grad_err = (_grad(x_graph) - _grad(x_dense)).abs().max().item() if x_graph.numel() else 0.0
    return out_err, grad_err


def compare_layer(
    layer: GraphMultiheadAttention,
    x: Tensor,
    edge_index: Tensor,
    lengths: Sequence[int],
    backend: str,
    edge_head: Tensor | None = None,
) -> tuple[float, float]:
    """Largest output and input-gradient differences between the graph and the dense path."""
    x_graph = x.detach().clone().requires_grad_(True)
    x_dense = x.detach().clone().requires_grad_(True)
    out_graph = layer(x_graph, edge_index, backend=backend, edge_head=edge_head)
    out_dense = dense_reference(layer, x_dense, edge_index, lengths, edge_head=edge_head)
    return _errors(x_graph, x_dense, out_graph, out_dense)


def compare_stack(
    stack: GraphTransformerEncoder, x: Tensor, pattern: LayerPattern, lengths: Sequence[int]
) -> tuple[float, float]:
    """Largest output and input-gradient differences between a stack on per-layer graphs and
    :func:`gnn_transformer.dense.layers.encoder` with one mask per layer."""
    lengths = list(lengths)
    attn = getattr(stack.layers[0], "self_attn", None) if len(stack.layers) else None
    if not isinstance(attn, GraphMultiheadAttention):
        raise ValueError(
            f"Expected 'stack' whose first layer has a GraphMultiheadAttention 'self_attn' (got {type(attn).__name__})"
        )
    masks = []
    for layer in range(len(stack.layers)):
        graph = pattern(layer)
        edge_index, edge_head = graph if isinstance(graph, tuple) else (graph, None)
        masks.append(_mask(edge_index, edge_head, lengths, attn.num_heads).to(x.device))
    x_graph = x.detach().clone().requires_grad_(True)
    x_dense = x.detach().clone().requires_grad_(True)
    out_graph = stack(x_graph, pattern)
    out_dense = from_padded(dense_encoder(stack, to_padded(x_dense, lengths), masks), lengths)
    return _errors(x_graph, x_dense, out_graph, out_dense)


def _edges(graph: Tensor | tuple[Tensor, Tensor] | LayerPattern) -> int:
    """Edges of a graph (of every distinct layer graph of one cycle, summed)."""
    if isinstance(graph, LayerPattern):
        return sum(_edges(g) for _, g in graph.distinct())
    return int((graph[0] if isinstance(graph, tuple) else graph).size(1))


def _check_one(
    topo: Topology,
    graph: Tensor | tuple[Tensor, Tensor] | LayerPattern,
    lengths: list[int],
    backend: str,
    *,
    embed_dim: int,
    num_heads: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
) -> tuple[float, float, int]:
    """``(output error, gradient error, edges)`` of one topology under one backend."""
    n = sum(lengths)
    heads = topo.num_heads or num_heads
    width = heads * max(embed_dim // num_heads, 1)  # the head dim of embed_dim / num_heads, any head count
    torch.manual_seed(seed)
    if isinstance(graph, LayerPattern):
        layer = GraphTransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, backend=backend)
        stack = GraphTransformerEncoder(layer, graph.period + 1).to(device, dtype).eval()
        x = torch.randn(n, width, device=device, dtype=dtype)
        return (*compare_stack(stack, x, graph, lengths), _edges(graph))
    select = None if topo.select is None else selector(topo.select, num_heads=heads, head_dim=width // heads)
    layer = GraphMultiheadAttention(width, heads, backend=backend, select=select).to(device, dtype).eval()
    x = torch.randn(n, width, device=device, dtype=dtype)
    edge_index, edge_head = graph if isinstance(graph, tuple) else (graph, None)
    edges = int(edge_index.size(1))
    if select is not None:  # the edges attended: the selection from these queries and keys
        with torch.no_grad():
            query, key = layer.project(x, x, x)[:2]
            edges = int(select(query, key, edge_index)[0].size(1))
    return (*compare_layer(layer, x, edge_index, lengths, backend, edge_head), edges)


# bytes of one cell of a dense reference's ``[B, H, T, T]`` scores, per layer: the scores, the
# masked scores, the softmax weights kept for the backward pass and two gradients, in the dtype
DENSE_CELL_COPIES = 5


def check_dense_fits(
    lengths: Sequence[int], num_heads: int, dtype: torch.dtype, device: torch.device, layers: int = 1
) -> None:
    """Refuse, before anything is built, ``lengths`` whose dense reference (``layers`` layers of
    ``num_heads`` heads on ``[B, H, T, T]`` scores, ``T`` the longest length, and one boolean mask
    per layer) would not fit on ``device``: a ``ValueError`` naming ``lengths``. The budget is that
    of the data sets on the CPU (:func:`~gnn_transformer.experiments.tasks.host_memory_budget`),
    80% of the GPU's memory on CUDA."""
    from .tasks import host_memory_budget

    cells = len(lengths) * max(lengths) ** 2
    elem = torch.tensor([], dtype=dtype).element_size()
    need = cells * layers * (num_heads * DENSE_CELL_COPIES * elem + num_heads)
    if device.type == "cuda":
        budget, where = 0.8 * torch.cuda.get_device_properties(device).total_memory, "80% of the GPU's memory"
    else:
        budget, where = host_memory_budget(), "half of this machine's memory"
    if need > budget:
        layer_text = f"{layers} layers of " if layers > 1 else ""
        kind = str(dtype).removeprefix("torch.")
        raise ValueError(
            f"Expected 'lengths' whose dense reference fits in memory (got {list(lengths)}): "
            f"{layer_text}{num_heads} heads of [{len(lengths)}, {max(lengths)}, {max(lengths)}] {kind} scores "
            f"need about {need / 2**30:.3g} GiB, more than {where} ({budget / 2**30:.3g} GiB)"
        )


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that run on ``device``: ``pyg`` always, the kernel backends when present."""
    backends = ["pyg"]
    try:
        from .. import kernels
    except ImportError:
        return backends
    if hasattr(kernels, "attend"):
        backends += ["fused", "tiled", "split"]
    return backends


def verify_topologies(
    specs: Sequence[str],
    lengths: Sequence[int] = (23, 40),
    *,
    embed_dim: int = 32,
    num_heads: int = 4,
    backends: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    seed: int = 0,
    small: bool = True,
    on_row: Callable[[VerifyRow], None] | None = None,
    on_error: Callable[[str, ValueError], None] | None = None,
) -> list[VerifyRow]:
    """Graph attention vs the dense reference for every spec and backend.

    Args:
        specs: topology specs (builder names with arguments, or TOML spec names/paths).
        lengths: sequence lengths of the batch each topology is built on.
        backends: backends to check (default: :func:`available_backends`).
        dtype: ``torch.float64`` (tolerance 1e-10) or ``torch.float32`` (1e-5).
        small: build catalogue specs with their toy-scale parameters (paper-scale windows would
            cover these short sequences entirely).
        on_row: called with each row as soon as it is computed.
        on_error: called with a spec and its ``ValueError`` when the spec cannot be built on
            ``lengths`` (e.g. ``random`` with more keys than a sequence has); the other specs are
            still checked. Unset: the error is raised. Unknown or malformed specs raise before any
            check either way.
    """
    if dtype not in TOLERANCE:
        raise ValueError(f"Expected 'dtype' to be float32 or float64 (got {dtype})")
    lengths = list(lengths)
    if not lengths or min(lengths) < 1:
        raise ValueError(f"Expected 'lengths' to be one or more lengths >= 1 (got {lengths})")
    where = resolve_device(device)
    backends = list(backends) if backends is not None else available_backends(where)
    topologies = [resolve_topology(spec, small=small) for spec in specs]  # unknown specs fail here
    check_dense_fits(lengths, max(t.num_heads or num_heads for t in topologies), dtype, where)
    rows = []
    for topo in topologies:
        try:
            graph = topo.build(lengths)
        except ValueError as err:
            if on_error is None:
                raise
            on_error(topo.spec, err)
            continue
        if isinstance(graph, LayerPattern):  # checked as a stack of one cycle and a layer
            check_dense_fits(lengths, topo.num_heads or num_heads, dtype, where, graph.period + 1)
        graph = graph_to(graph, where)
        for backend in backends:
            out_err, grad_err, edges = _check_one(
                topo,
                graph,
                lengths,
                backend,
                embed_dim=embed_dim,
                num_heads=num_heads,
                dtype=dtype,
                device=where,
                seed=seed,
            )
            row = VerifyRow(label(topo.spec), backend, sum(lengths), edges, out_err, grad_err, TOLERANCE[dtype])
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


@torch.no_grad()
def model_dense_error(model: nn.Module, run: Callable[[], object], lengths: Sequence[int]) -> float:
    """Largest difference between each attention call of ``run()`` and its dense reference.

    ``run`` performs one forward pass of ``model`` on a batch of sequences ``lengths`` (the nodes
    of every attention call are those sequences). Model must be in eval mode (no dropout).
    """
    calls: list[tuple] = []  # (layer, x, edge_index, edge_bias, pos, edge_head, out) of every call

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["x"]
        edge_index = args[1] if len(args) > 1 else kwargs["edge_index"]
        if not isinstance(x, Tensor):
            raise ValueError("model_dense_error checks self-attention only (got a pair of inputs)")
        if kwargs.get("kv") is not None:
            raise ValueError("model_dense_error checks attention without precomputed keys/values")
        out = output[0] if isinstance(output, tuple) else output
        calls.append((module, x, edge_index, kwargs.get("edge_bias"), kwargs.get("pos"), kwargs.get("edge_head"), out))

    handles = [
        m.register_forward_hook(hook, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, GraphMultiheadAttention)
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    if not calls:
        raise ValueError("The model made no GraphMultiheadAttention call")
    err = 0.0
    for module, x, edge_index, edge_bias, pos, edge_head, out in calls:
        ref = dense_reference(module, x, edge_index, lengths, edge_bias, pos, edge_head)
        err = max(err, (out - ref).abs().max().item())
    return err
