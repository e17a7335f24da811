"""The equivalence check: attention on a token graph equals dense masked attention.

Two entry points:

- :func:`verify_topologies` runs every topology of the ``graphs/`` catalogue (or any list of specs)
  through :class:`~gnn_transformer.GraphMultiheadAttention`, for each backend, and through the
  dense reference :func:`gnn_transformer.dense.multihead_attention` with the same weights and the
  mask ``to_dense_mask(edge_index)``; it reports the largest difference of outputs and of input
  gradients.
- :func:`model_dense_error` checks a whole trained model: every attention call of one forward pass
  is recomputed by the dense reference from the very inputs it received.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import GraphMultiheadAttention, dense, from_padded, to_padded
from ..topology import to_dense_mask
from .topologies import label, topology_fn
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


def dense_reference(layer: GraphMultiheadAttention, x: Tensor, edge_index: Tensor,
                    lengths: Sequence[int], edge_bias: Tensor | None = None,
                    pos: Tensor | None = None) -> Tensor:
    """The dense reference of ``layer(x, edge_index)`` on the sequences ``lengths``: ``[N, C]``.

    With rotary positions (``pos`` and a layer built with ``rope=True``) the queries and keys are
    rotated by the layer, then attended densely under the mask.
    """
    lengths = list(lengths)
    mask = to_dense_mask(edge_index, lengths=lengths).to(x.device)  # [B, T, T]
    bias = None
    if edge_bias is not None:
        bias = dense.edge_values_to_dense(edge_index, edge_bias, lengths)  # [B, H, T, T]
    if getattr(layer, "rotary", None) is None or pos is None:
        x_pad = to_padded(x, lengths)  # [B, T, C]
        out, _ = dense.multihead_attention(layer, x_pad, x_pad, mask, bias=bias)
        return from_padded(out, lengths)  # [N, C]
    query = layer.rotate(layer.project_query(x), pos)  # [N, H, D]
    key, value = layer.key_value(x, pos=pos)  # [N, H_kv, D] each
    heads = [to_padded(t, lengths).transpose(1, 2) for t in (query, key, value)]  # [B, H, T, D]
    out, _ = dense.scaled_dot_product(*heads, mask, scale=layer.head_dim ** -0.5, bias=bias)
    out = from_padded(out.transpose(1, 2), lengths).reshape(x.size(0), -1)  # [N, C]
    return layer.out_proj(out)


def compare_layer(layer: GraphMultiheadAttention, x: Tensor, edge_index: Tensor,
                  lengths: Sequence[int], backend: str) -> tuple[float, float]:
    """Largest output and input-gradient differences between the graph and the dense path."""
    x_graph = x.detach().clone().requires_grad_(True)
    x_dense = x.detach().clone().requires_grad_(True)
    out_graph = layer(x_graph, edge_index, backend=backend)
    out_dense = dense_reference(layer, x_dense, edge_index, lengths)
    upstream = torch.randn_like(out_graph)
    (out_graph * upstream).sum().backward()
    (out_dense * upstream).sum().backward()
    out_err = (out_graph - out_dense).abs().max().item() if out_graph.numel() else 0.0
    grad_err = (x_graph.grad - x_dense.grad).abs().max().item() if x.numel() else 0.0
    return out_err, grad_err


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


def verify_topologies(specs: Sequence[str], lengths: Sequence[int] = (23, 40), *,
                      embed_dim: int = 32, num_heads: int = 4,
                      backends: Sequence[str] | None = None, dtype: torch.dtype = torch.float64,
                      device: str = "cpu", seed: int = 0, small: bool = True,
                      on_row: Callable[[VerifyRow], None] | None = None,
                      on_error: Callable[[str, ValueError], None] | None = None) -> list[VerifyRow]:
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
    device = resolve_device(device)
    backends = list(backends) if backends is not None else available_backends(device)
    builds = [(spec, topology_fn(spec, small=small)) for spec in specs]  # unknown specs fail here
    rows = []
    for spec, build in builds:
        try:
            edge_index = build(lengths).to(device)
        except ValueError as err:
            if on_error is None:
                raise
            on_error(spec, err)
            continue
        n = sum(lengths)
        for backend in backends:
            torch.manual_seed(seed)
            layer = GraphMultiheadAttention(embed_dim, num_heads, backend=backend).to(device, dtype)
            layer.eval()
            x = torch.randn(n, embed_dim, device=device, dtype=dtype)
            out_err, grad_err = compare_layer(layer, x, edge_index, lengths, backend)
            row = VerifyRow(label(spec), backend, n, int(edge_index.size(1)), out_err, grad_err,
                            TOLERANCE[dtype])
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
    calls: list[tuple] = []  # (layer, x, edge_index, edge_bias, pos, out) of every call

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["x"]
        edge_index = args[1] if len(args) > 1 else kwargs["edge_index"]
        if not isinstance(x, Tensor):
            raise ValueError("model_dense_error checks self-attention only (got a pair of inputs)")
        if kwargs.get("kv") is not None:
            raise ValueError("model_dense_error checks attention without precomputed keys/values")
        out = output[0] if isinstance(output, tuple) else output
        calls.append((module, x, edge_index, kwargs.get("edge_bias"), kwargs.get("pos"), out))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, GraphMultiheadAttention)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    if not calls:
        raise ValueError("The model made no GraphMultiheadAttention call")
    err = 0.0
    for module, x, edge_index, edge_bias, pos, out in calls:
        ref = dense_reference(module, x, edge_index, lengths, edge_bias, pos)
        err = max(err, (out - ref).abs().max().item())
    return err
