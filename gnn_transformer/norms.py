r"""Root-mean-square normalization (Zhang & Sennrich 2019) as today's decoder models compute it.

.. math::

    \mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\mathrm{mean}(x^2) + \epsilon}} \odot g

normalized in float32 whatever the input dtype (float64 stays float64). Two conventions for the gain ``g`` exist and are
not interchangeable (a checkpoint stores one): Llama, Mistral, Qwen and Phi store ``g = weight``
(initialized to ones) and multiply after casting back to the input dtype; Gemma stores
``g = 1 + weight`` (initialized to zeros) and multiplies in float32 (``unit_offset=True``).
:class:`torch.nn.RMSNorm` computes the first in the input dtype throughout, which differs from
Llama's rounding in half precision; this module reproduces each convention exactly.

Notation: ``N`` nodes, ``C`` features.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import check_positive_int, check_real


class RMSNorm(nn.Module):
    r"""RMS normalization over the last dimension, with a learned gain ``weight`` ``[dim]``.

    Args:
        dim: size of the last dimension.
        eps: added to the mean square. Default ``1e-6``.
        unit_offset: the gain is ``1 + weight`` (Gemma) instead of ``weight``. Default ``False``.

    Example:
        >>> norm = RMSNorm(4)
        >>> norm(torch.tensor([[1.0, -1.0, 1.0, -1.0]]))
        tensor([[ 1.0000, -1.0000,  1.0000, -1.0000]], grad_fn=<MulBackward0>)
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, unit_offset: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        self.eps = check_real("eps", eps, low=0.0, low_open=True)
        if not isinstance(unit_offset, bool):
            raise ValueError(f"Expected 'unit_offset' to be a bool (got {unit_offset!r})")
        self.unit_offset = unit_offset
        init = torch.zeros if unit_offset else torch.ones
        self.weight = nn.Parameter(init(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # [..., C] in float32 at least
        if self.unit_offset:
            return (h * (1.0 + self.weight.to(h.dtype))).type_as(x)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.size(0)}, eps={self.eps}{', unit_offset=True' if self.unit_offset else ''}"


__all__ = ["RMSNorm"]
