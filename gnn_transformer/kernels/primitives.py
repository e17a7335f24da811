"""What every backend shares: the one autograd function of the kernels, and small tensor idioms.

**The autograd function** (:func:`kernel_attention`): ``(out, lse, lse_lo)`` forward, backward
from the saved log-sum-exp. A kernel is a pair of plain functions over a graph structure (a CSR
graph or a tile list):

- ``forward(q, k, v, bias, structure, scale, **options) -> (out, lse, lse_lo)``;
- ``backward(q, k, v, bias, structure, scale, out, lse, lse_lo, dout, dlse, need_bias, **options)
  -> (dq, dk, dv, dbias)``, where ``dlse`` may be ``None`` (the log-sum-exp was not used);
- optionally ``prepare(structure, **options)``, run by the forward pass when a gradient will be
  needed: builds what the backward pass reads (the CSC of a graph) before the backward's memory
  peak, where the activations of every layer are held.

The log-sum-exp of a row, ``m + log l`` (``m`` the row's largest score, ``l`` the sum of
``exp(s - m)``), is kept as two numbers of the accumulation dtype: ``lse``, the sum rounded, and
``lse_lo``, what the rounding lost (:func:`lse_pair`). Where the scores are huge (a row whose every
edge carries a bias of ``-1e9``), ``log l`` is below ``lse``'s rounding step; the backward pass's
``p = exp((s - lse) - lse_lo)`` and the merges of partial results keep it all the same. ``lse_lo``
is 0 on empty rows and not differentiable (the gradient of the log-sum-exp reaches ``lse``).

**Tensor idioms**, written once: the accumulation dtype, empty-row guards, autocast handling,
grouped-query heads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor


def forgetter(cache: dict, lock: Any, key: Any) -> Callable[[Any], None]:
    """The weak reference callback that forgets ``cache[key]`` (under ``lock``) when its tensor dies:
    the entries of the kernels' caches disappear with the tensors they describe."""

    def forget(_ref: Any) -> None:
        with lock:
            cache.pop(key, None)

    return forget


def plain_tensor(edge_index: Tensor) -> Tensor:
    """``edge_index`` as a plain tensor (the data of an ``EdgeIndex``, anything else as given)."""
    return edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index


def versions(edge_index: Tensor) -> tuple[int, int]:
    """The version counters that move when ``edge_index`` is written in place through PyTorch: its
    own and its data's. They differ for an ``EdgeIndex``: a write through ``as_tensor()`` moves only
    the data's counter, a write through the wrapper only the wrapper's."""
    return edge_index._version, plain_tensor(edge_index)._version


def device_memory(device: torch.device) -> int | None:
    """Bytes a computation may allocate on ``device``: the GPU's free memory (with what PyTorch's
    allocator holds unused), half of the host's physical memory; ``None`` where it cannot be read."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    if device.type != "cpu":
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (AttributeError, OSError, ValueError):  # no sysconf (Windows)
        return None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of inputs of ``dtype``: float64 stays float64, the others use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def finite_or_zero(top: Tensor) -> Tensor:
    """A row max or log-sum-exp with the infinities of empty rows read as 0, so ``s - top`` is
    never ``inf - inf``."""
    return torch.where(torch.isinf(top), torch.zeros_like(top), top)


def total_or_one(total: Tensor) -> Tensor:
    """A row sum with the zeros of empty rows read as 1, a divisor that is never 0."""
    return torch.where(total > 0, total, torch.ones_like(total))


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (a device type autocast does not know: off)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def no_autocast(device_type: str):
    """A context without autocast on ``device_type``: the kernels choose their own accumulation
    dtype (:func:`compute_dtype`), and autocast would round their float32 products to half precision
    (or reach sparse products that have no half-precision kernel)."""
    return torch.autocast(device_type, enabled=False) if autocast_on(device_type) else contextlib.nullcontext()


def autocast_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` as autocast gives them to ``scaled_dot_product_attention``: under autocast on
    their device, floating-point tensors other than float64 in autocast's dtype; unchanged otherwise."""
    device_type = next((x.device.type for x in tensors if isinstance(x, Tensor)), None)
    if device_type is None or not autocast_on(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point() and x.dtype != torch.float64 else x
        for x in tensors
    )


def repeat_heads(x: Tensor, group: int) -> Tensor:
    """``x [N, H_kv, D]`` with each key/value head repeated for its ``group`` query heads (``x``
    itself when ``group`` is 1)."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


class Kernel(NamedTuple):
    """A kernel's forward and backward functions (see the module docstring)."""

    forward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor | None]]
    prepare: Callable[..., object] | None = None


def lse_pair(top: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
    """``(lse, lse_lo)`` of rows with largest score ``top`` (0 on empty rows) and ``total`` the sum
    of ``exp(s - top)``: ``top + log total`` rounded and its rounding error, exactly (Knuth's
    two-sum); ``(-inf, 0)`` where ``total`` is 0 (an empty row), NaN where it is (a row that read a
    NaN, whose output is NaN too). Differentiable in ``lse``."""
    nonempty = total != 0
    log_l = torch.log(torch.where(nonempty, total, torch.ones_like(total)))
    lse = top + log_l
    b = (lse - top).detach()
    lo = ((top - (lse - b)) + (log_l - b)).detach()
    return (
        torch.where(nonempty, lse, torch.full_like(lse, float("-inf"))),
        torch.where(nonempty, lo, torch.zeros_like(lo)),
    )


class KernelAttention(torch.autograd.Function):
    """Differentiable ``(out, lse, lse_lo)`` of a :class:`Kernel` in ``q``, ``k``, ``v`` and ``bias``."""

    @staticmethod
    def forward(ctx, q, k, v, bias, kernel: Kernel, structure: Any, scale: float, options: dict):
        with no_autocast(q.device.type):  # the kernels pick their accumulation dtype themselves
            out, lse, lse_lo = kernel.forward(q, k, v, bias, structure, scale, **options)
        ctx.set_materialize_grads(False)  # an unused lse sends None, not zeros
        ctx.mark_non_differentiable(lse_lo)
        guards = structure.guards() if hasattr(structure, "guards") else ()  # views of edge_index
        ctx.save_for_backward(q, k, v, bias, out, lse, lse_lo, *guards)
        ctx.kernel, ctx.structure, ctx.scale, ctx.options = kernel, structure, scale, options
        return out, lse, lse_lo

    @staticmethod
    def backward(ctx, dout, dlse, _dlse_lo):
        q, k, v, bias, out, lse, lse_lo = ctx.saved_tensors[:7]  # unpacking the guards checks their versions
        if torch.is_grad_enabled():  # create_graph=True: gradients autograd can differentiate again
            from .higher_order import differentiable_grads  # it imports this module

            with no_autocast(q.device.type):
                dropout = ctx.options.get("dropout")
                grads = differentiable_grads(
                    q, k, v, bias, ctx.structure, ctx.scale, dropout, out.dtype, dout, dlse, ctx.needs_input_grad[:4]
                )
            return *grads, None, None, None, None
        if dout is None:
            dout = torch.zeros_like(out)
        need_bias = bias is not None and ctx.needs_input_grad[3]
        with no_autocast(q.device.type):  # a backward pass run inside an autocast region, too
            dq, dk, dv, dbias = ctx.kernel.backward(
                q, k, v, bias, ctx.structure, ctx.scale, out, lse, lse_lo, dout, dlse, need_bias, **ctx.options
            )
        return dq, dk, dv, dbias, None, None, None, None


def kernel_attention(
    kernel: Kernel, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, structure: Any, scale: float, **options
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, lse, lse_lo)`` of ``kernel``, differentiable in ``q``, ``k``, ``v`` and ``bias``."""
    if (
        kernel.prepare is not None
        and torch.is_grad_enabled()
        and any(x is not None and x.requires_grad for x in (q, k, v, bias))
    ):
        kernel.prepare(structure, **options)
    return KernelAttention.apply(q, k, v, bias, kernel, structure, scale, options)
