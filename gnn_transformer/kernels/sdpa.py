"""Full and causal graphs through PyTorch's own attention kernels (``scaled_dot_product_attention``).

A graph whose every target ``i`` has the incoming edges of exactly full or exactly causal attention
(one sequence, or a block diagonal of documents: ``j`` in ``i``'s document, and ``j <= i`` for
causal) is what SDPA's fused kernels run without a mask; :func:`dense_pattern` recognizes it from
the target-sorted CSR (cached on the graph) and never answers for a graph that differs by one edge.
``auto`` then runs it here when nothing SDPA lacks is asked for: no edge bias, no attention dropout
(the project's dropout mask is its own hash), and, off the CPU, no log-sum-exp.

On the CPU, PyTorch's fused CPU kernel returns the log-sum-exp, and its backward pass takes a
gradient of it as one more channel (as in :mod:`.tiled_torch`); half-precision inputs are computed
in float32, as on every backend. Elsewhere the public ``scaled_dot_product_attention`` runs in the
inputs' dtype with its own autograd.

Notation: ``N`` tokens, ``B`` documents of one length ``L``, ``H`` / ``H_kv`` query / key-value
heads, ``D`` head dimension.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._autograd import Kernel, kernel_attention
from ._graph import CSRGraph
from .primitives import compute_dtype, no_autocast, repeat_heads

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

# Documents of unequal lengths run one call each: beyond this many, the tiled backend is cheaper
MAX_DOCUMENTS = 64
# Edges per chunk of the recognition's edge-by-edge comparison
CHECK_CHUNK = 1 << 24
# The fused CPU kernel rounds the log-sum-exp to float32 without what rounding lost (module
# _autograd); at or above this magnitude a call runs the project's kernels instead (as .tiled_torch)
LSE_LIMIT = 128.0


@dataclass(frozen=True)
class DensePattern:
    """A graph SDPA runs without a mask: ``kind`` ``"full"`` or ``"causal"`` within each document,
    ``bounds`` the documents' first tokens and the token count (one sequence: ``(0, N)``; a full
    bipartite graph, ``N_src != N_dst``: ``(0, N_dst)`` with every key)."""

    kind: str
    bounds: tuple[int, ...]

    @functools.cached_property
    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])]

    @functools.cached_property
    def equal_lengths(self) -> bool:
        """Whether every document has one length (one batched SDPA call runs them all)."""
        return len(set(self.lengths)) == 1


def dense_pattern(graph: CSRGraph) -> DensePattern | None:
    """The :class:`DensePattern` of ``graph``, or ``None`` (cached). Linear checks on the rows'
    first sources and counts come first; only a graph that passes them has its edges compared
    with the pattern's, one by one."""
    if "dense_pattern" not in graph.extras:
        graph.extras["dense_pattern"] = _recognize(graph)
    return graph.extras["dense_pattern"]


def _recognize(graph: CSRGraph) -> DensePattern | None:
    n, n_src, num_edges = graph.num_dst, graph.num_src, graph.num_edges
    if n == 0 or num_edges == 0:
        return None
    counts = graph.rowptr.diff()  # [N]
    if bool((counts == 0).any()):  # an empty row: not full, not causal
        return None
    lo = graph.src[graph.rowptr[:-1]]  # [N] first source of each row
    hi = lo + counts  # [N] one past the last source, if the row is a run lo, lo + 1, ...
    pattern = None
    if n_src != n:  # bipartite: every query sees every key
        if bool((lo == 0).all()) and bool((hi == n_src).all()):
            pattern = DensePattern("full", (0, n))
    else:
        i = torch.arange(n, device=lo.device)
        first = lo == i  # [N] the first token of a document sees itself first
        docs = first.cumsum(0) - 1  # [N] document of each token
        starts = i[first]  # [B]
        ends = torch.cat([starts[1:], starts.new_tensor([n])])  # [B]
        if bool(first[0]) and bool((lo == starts[docs]).all()):
            if bool((hi == i + 1).all()):
                pattern = DensePattern("causal", tuple(starts.tolist()) + (n,))
            elif bool((hi == ends[docs]).all()):
                pattern = DensePattern("full", tuple(starts.tolist()) + (n,))
    if pattern is None:
        return None
    # each row's sources must be exactly the run lo, lo + 1, ..., hi - 1 (sorted, no repeats);
    # compared in chunks of edges, so that the check adds no per-edge array of the whole graph
    first = lo - graph.rowptr[:-1]  # [N] source of the row's edge e is first[i] + e
    for e0 in range(0, num_edges, CHECK_CHUNK):
        e1 = min(e0 + CHECK_CHUNK, num_edges)
        dst = graph.dst[e0:e1]
        if not torch.equal(graph.src[e0:e1], first[dst] + torch.arange(e0, e1, device=lo.device)):
            return None
    return pattern


def runs_sdpa(pattern: DensePattern | None, device_type: str, bias: bool, dropout: bool, lse: bool) -> bool:
    """Whether ``auto`` runs ``pattern`` through SDPA: a recognized graph, no edge bias, no attention
    dropout, few enough documents of unequal lengths, and on devices other than the CPU no
    log-sum-exp (the public SDPA does not return it)."""
    if pattern is None or bias or dropout:
        return False
    if device_type == "cpu" and (_FLASH is None or _FLASH_BWD is None):
        return False
    if device_type != "cpu" and lse:
        return False
    return pattern.equal_lengths or len(pattern.lengths) <= MAX_DOCUMENTS


def _documents(x: Tensor, pattern: DensePattern) -> list[Tensor]:
    """``x [N, H, D]`` as SDPA's ``[B, H, L, D]`` batches, views of ``x``: the whole sequence (also
    every key of a bipartite graph), one batch of every document when they have one length, else
    one per document."""
    lengths = pattern.lengths
    if len(lengths) == 1:
        return [x.unsqueeze(0).transpose(1, 2)]  # [1, H, N, D]
    if pattern.equal_lengths:
        return [x.view(len(lengths), lengths[0], *x.shape[1:]).transpose(1, 2)]  # [B, H, L, D]
    return [x[a:b].unsqueeze(0).transpose(1, 2) for a, b in zip(pattern.bounds[:-1], pattern.bounds[1:])]


def _tokens(parts: list[Tensor]) -> Tensor:
    """SDPA's ``[B, H, L, ...]`` batches back to ``[N, H, ...]``, contiguous (one batch in the
    kernels' own ``[B, L, H, ...]`` memory comes back as a view, without a copy)."""
    tokens = [p.transpose(1, 2).flatten(0, 1) for p in parts]
    return tokens[0].contiguous() if len(tokens) == 1 else torch.cat(tokens)


def _flash(q: Tensor, k: Tensor, v: Tensor, pattern: DensePattern, scale: float) -> tuple[Tensor, Tensor]:
    """``(out [N, H, D] in q's dtype, lse [N, H] detached)`` by the fused CPU kernel, computed in the
    accumulation dtype; differentiable in ``q``, ``k``, ``v`` through the kernel's own autograd."""
    dtype, cd = q.dtype, compute_dtype(q.dtype)
    if dtype != cd:
        q, k, v = q.to(cd), k.to(cd), v.to(cd)
    group = q.size(1) // k.size(1)
    k, v = repeat_heads(k, group), repeat_heads(v, group)  # [N, H, D]
    causal = pattern.kind == "causal"
    outs, lses = [], []
    assert _FLASH is not None  # runs_sdpa sends a CPU call here only with the fused CPU kernel
    for qd, kd, vd in zip(_documents(q, pattern), _documents(k, pattern), _documents(v, pattern)):
        o, lse = _FLASH(qd, kd, vd, is_causal=causal, scale=scale)  # [B, H, L, D], [B, H, L]
        outs.append(o)
        lses.append(lse.detach())
    out = _tokens(outs)  # [N, H, D]
    return (out if dtype == cd else out.to(dtype)), _tokens(lses)  # [N, H, D], [N, H]


def _flash_forward(q, k, v, bias, pattern: DensePattern, scale: float):
    """``(out [N, H, D], lse [N, H], lse_lo [N, H])`` of :data:`FLASH_CPU` (``lse_lo`` 0: the kernel
    rounds the log-sum-exp without keeping what rounding lost)."""
    out, lse = _flash(q, k, v, pattern, scale)
    return out, lse, torch.zeros_like(lse)


def _flash_backward(q, k, v, bias, pattern: DensePattern, scale: float, out, lse, lse_lo, dout, dlse, need_bias: bool):
    """``(dq, dk, dv, None)`` by the fused CPU kernel's backward. A gradient of the log-sum-exp
    enters as one more channel: ``dO_i[D] = 1``, ``O_i[D] = -dlse_i``, ``q, k, v[D] = 0`` make the
    kernel's ``delta_i = dO_i . O_i`` equal ``dO_i . O_i - dlse_i`` and leave every product unchanged."""
    cd = compute_dtype(q.dtype)
    n_src, num_kv, dim = k.shape
    group = q.size(1) // num_kv
    extra = 0 if dlse is None else 1

    def padded(x: Tensor, heads: int | None = None) -> Tensor:  # [N, H, D] -> [N, H, D + extra] in cd
        x = x.to(cd) if heads is None else repeat_heads(x.to(cd), heads)
        return torch.nn.functional.pad(x, (0, extra)) if extra else x

    qc, kc, vc, oc, doc = padded(q), padded(k, group), padded(v, group), padded(out), padded(dout)
    if extra:
        doc[..., dim] = 1.0
        oc[..., dim] = -dlse.to(cd)
    batches = [_documents(x, pattern) for x in (doc, qc, kc, vc, oc)]
    lse_docs = _documents(lse.to(cd).unsqueeze(-1), pattern)  # [B, H, L, 1]
    dqs, dks, dvs = [], [], []
    assert _FLASH_BWD is not None  # runs_sdpa sends a CPU call here only with the fused CPU kernel
    for do, qd, kd, vd, od, ld in zip(*batches, lse_docs):
        dq, dk, dv = _FLASH_BWD(do, qd, kd, vd, od, ld.squeeze(-1), 0.0, pattern.kind == "causal", scale=scale)
        dqs.append(dq)
        dks.append(dk)
        dvs.append(dv)
    dq, dk, dv = (_tokens(x)[..., :dim] for x in (dqs, dks, dvs))  # [N, H, D]
    if group > 1:  # the query heads of one key/value head add up
        dk, dv = (x.reshape(n_src, num_kv, group, dim).sum(2) for x in (dk, dv))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


FLASH_CPU = Kernel(_flash_forward, _flash_backward)


def sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: DensePattern, scale: float, lse_grad: bool = True
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(out [N, H, D], lse, lse_lo)`` of a recognized graph; on the CPU through the fused CPU kernel
    (differentiable in ``q``, ``k``, ``v``; with ``lse_grad`` also in ``lse``, else ``lse`` is
    detached and the kernel's own autograd runs), elsewhere through the public
    ``scaled_dot_product_attention`` (``lse`` and ``lse_lo`` ``None``)."""
    if q.device.type == "cpu":
        if not lse_grad:  # the kernel's own autograd, without a Python autograd function
            with no_autocast("cpu"):  # computed in the accumulation dtype, as every backend does
                out, lse = _flash(q, k, v, pattern, scale)
            return out, lse, None
        return kernel_attention(FLASH_CPU, q, k, v, None, pattern, scale)
    return public_sdpa(q, k, v, pattern, scale), None, None


def public_sdpa(q: Tensor, k: Tensor, v: Tensor, pattern: DensePattern, scale: float) -> Tensor:
    """``out [N, H, D]`` of a recognized graph by the public ``scaled_dot_product_attention`` (its
    own autograd; the path off the CPU, on any device)."""
    # enable_gqa only when needed: torch 2.4's SDPA does not take it
    gqa: dict[str, Any] = {"enable_gqa": True} if k.size(1) != q.size(1) else {}
    outs = [
        F.scaled_dot_product_attention(qd, kd, vd, is_causal=pattern.kind == "causal", scale=scale, **gqa)
        for qd, kd, vd in zip(*(_documents(x, pattern) for x in (q, k, v)))
    ]
    return _tokens(outs)


def lse_in_range(lse: Tensor | None) -> bool:
    """Whether the fused CPU kernel's log-sum-exp is exact enough (below :data:`LSE_LIMIT`)."""
    return lse is None or lse.numel() == 0 or float(lse.detach().abs().amax()) < LSE_LIMIT
