"""Small tensor idioms every backend uses, written once."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def plain_tensor(edge_index: Tensor) -> Tensor:
    """``edge_index`` as a plain tensor (the data of an ``EdgeIndex``, anything else as given)."""
    return edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index


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


def no_autocast(device_type: str):
    """A context without autocast on ``device_type``: the kernels choose their own accumulation
    dtype (:func:`compute_dtype`), and autocast would round their float32 products to half precision
    (or reach sparse products that have no half-precision kernel)."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def autocast_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` as autocast gives them to ``scaled_dot_product_attention``: under autocast on
    their device, floating-point tensors other than float64 in autocast's dtype; unchanged otherwise."""
    device_type = next((x.device.type for x in tensors if isinstance(x, Tensor)), None)
    if (
        device_type is None
        or not torch.amp.is_autocast_available(device_type)
        or not torch.is_autocast_enabled(device_type)
    ):
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
