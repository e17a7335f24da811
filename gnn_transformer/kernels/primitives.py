"""Small tensor idioms every backend uses, written once."""
from __future__ import annotations

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
