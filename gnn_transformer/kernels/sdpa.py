"""Full and causal graphs through PyTorch's own attention kernels (``scaled_dot_product_attention``).

A graph whose every target ``i`` has the incoming edges of exactly full or exactly causal attention
(one sequence, or a block diagonal of documents: ``j`` in ``i``'s document, and ``j <= i`` for
causal) is what SDPA's fused kernels run without a mask; :func:`.planner.dense_pattern` recognizes it
from the target-sorted CSR (cached on the graph) and never answers for a graph that differs by one edge.
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

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .primitives import Kernel, compute_dtype, kernel_attention, repeat_heads

if TYPE_CHECKING:
    from .planner import DensePattern

# the fused CPU kernel and its backward, through torch's generated bindings where it has them (a
# few microseconds less per call than the torch.ops dispatch)
_FLASH = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu", None) or getattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None
)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

# The fused CPU kernel rounds the log-sum-exp to float32 without what rounding lost (module
# primitives); at or above this magnitude a call runs the project's kernels instead (as .tiled_torch)
LSE_LIMIT = 128.0


def _documents(x: Tensor, pattern: DensePattern) -> list[Tensor]:
    """``x [N, H, D]`` as SDPA's ``[B, H, L, D]`` batches, views of ``x``: one batch of every
    document when they have one length (one sequence: the whole of ``x``, also every key of a
    bipartite graph), else one per document."""
    if pattern.equal_lengths:
        batch = len(pattern.bounds) - 1
        return [x.view(batch, x.size(0) // batch, x.size(1), x.size(2)).transpose(1, 2)]  # [B, H, L, D]
    return [x[a:b].unsqueeze(0).transpose(1, 2) for a, b in zip(pattern.bounds[:-1], pattern.bounds[1:])]


def _tokens(parts: list[Tensor]) -> Tensor:
    """SDPA's ``[B, H, L, ...]`` batches back to ``[N, H, ...]``, contiguous (one batch in the
    kernels' own ``[B, L, H, ...]`` memory comes back as a view, without a copy)."""
    if len(parts) == 1:
        return parts[0].transpose(1, 2).flatten(0, 1).contiguous()
    return torch.cat([p.transpose(1, 2).flatten(0, 1) for p in parts])


def _unit_stride(x: Tensor) -> Tensor:
    """``x`` itself where its last dimension is contiguous, else a contiguous copy: the fused CPU
    kernel and its backward read rows of ``D`` values as if it were (any other stride of ``x`` is
    theirs to follow)."""
    return x if x.stride(-1) == 1 or x.size(-1) <= 1 else x.contiguous()


def _flash(q: Tensor, k: Tensor, v: Tensor, pattern: DensePattern, scale: float) -> tuple[Tensor, list[Tensor]]:
    """``(out [N, H, D] in q's dtype, lses)`` by the fused CPU kernel, computed in the accumulation
    dtype; differentiable in ``q``, ``k``, ``v`` through the kernel's own autograd. ``lses``: the
    detached log-sum-exp ``[B, H, L]`` of each SDPA batch (:func:`_tokens` makes them ``[N, H]``)."""
    dtype, cd = q.dtype, compute_dtype(q.dtype)
    if dtype != cd:
        q, k, v = q.to(cd), k.to(cd), v.to(cd)
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    group = q.size(1) // k.size(1)
    k, v = repeat_heads(k, group), repeat_heads(v, group)  # [N, H, D]
    causal = pattern.kind == "causal"
    assert _FLASH is not None  # runs_sdpa sends a CPU call here only with the fused CPU kernel
    # lse: not differentiable, the kernel's autograd takes no gradient of it
    parts = [
        _FLASH(qd, kd, vd, is_causal=causal, scale=scale)  # [B, H, L, D], [B, H, L]
        for qd, kd, vd in zip(_documents(q, pattern), _documents(k, pattern), _documents(v, pattern))
    ]
    out = _tokens([o for o, _ in parts])  # [N, H, D]
    return (out if dtype == cd else out.to(dtype)), [lse for _, lse in parts]


def _flash_forward(q, k, v, bias, pattern: DensePattern, scale: float):
    """``(out [N, H, D], lse [N, H], lse_lo [N, H])`` of :data:`FLASH_CPU` (``lse_lo`` 0: the kernel
    rounds the log-sum-exp without keeping what rounding lost)."""
    out, lses = _flash(q, k, v, pattern, scale)
    lse = _tokens(lses)  # [N, H]
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
        return torch.nn.functional.pad(x, (0, extra)) if extra else _unit_stride(x)

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
    q: Tensor, k: Tensor, v: Tensor, pattern: DensePattern, scale: float, return_lse: bool = False
) -> Tensor | tuple[Tensor, Tensor] | None:
    """``out [N, H, D]`` in ``q``'s dtype (with ``return_lse`` also ``lse [N, H]`` in the
    accumulation dtype) of a recognized graph, differentiable in ``q``, ``k``, ``v`` (and ``lse``);
    called without autocast (:func:`.dispatch.attend` and :func:`.dispatch.attend_dense` turn it off).

    On the CPU through the fused CPU kernel: under the kernel's own autograd, or with ``return_lse``
    under the project's autograd function (which takes a gradient of ``lse``); ``None`` where its
    log-sum-exp reaches :data:`LSE_LIMIT` and is returned or reaches a gradient (the caller then runs
    the project's kernels, which keep what rounding the log-sum-exp lost). Elsewhere through the
    public ``scaled_dot_product_attention``, without ``lse``. ``None`` on any device for a causal
    graph with a negative ``scale``."""
    if scale < 0 and pattern.kind == "causal":
        # PyTorch's fused causal CPU kernel returns NaN for a negative scale (untested elsewhere);
        # the project's kernels take any scale
        return None
    if q.device.type != "cpu":
        return public_sdpa(q, k, v, pattern, scale)
    if return_lse:
        out, lse, _ = kernel_attention(FLASH_CPU, q, k, v, None, pattern, scale)
        return (out.to(q.dtype), lse.to(compute_dtype(q.dtype))) if _in_range([lse.detach()]) else None
    # the kernel's own autograd, without a Python autograd function
    out, lses = _flash(q, k, v, pattern, scale)
    # the rounded log-sum-exp reaches only the gradients: without them, any range runs here
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad) and not _in_range(lses):
        return None
    return out


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


def has_cpu_flash() -> bool:
    """Whether this PyTorch has the fused CPU kernel and its backward (this module's CPU path)."""
    return _FLASH is not None and _FLASH_BWD is not None


def _in_range(lses: list[Tensor]) -> bool:
    """Whether the fused CPU kernel's log-sum-exps (not differentiable) are exact enough (below
    :data:`LSE_LIMIT`; NaN is not)."""
    for x in lses:
        if x.numel() and not float(x.abs().amax()) < LSE_LIMIT:
            return False
    return True
