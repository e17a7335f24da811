r"""Position-wise feed-forward blocks of today's transformers, per node.

- gated (Shazeer 2020, "GLU Variants Improve Transformer"): :math:`W_d(\phi(W_g x) \odot W_u x)`,
  SwiGLU with :math:`\phi` = SiLU (Llama, Mistral, Qwen, Phi-3), GeGLU with GELU (Gemma,
  ModernBERT);
- plain: :math:`W_d \, \phi(W_u x)` (GPT-2, GPT-Neo).

Notation: ``N`` nodes, ``C`` features, ``F`` hidden features of the block.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .attention import check_bool, check_dropout, check_positive_int
from .layers import dropped, get_activation


class FeedForward(nn.Module):
    r"""``down_proj(dropout(act(gate_proj(x)) * up_proj(x)))`` (``gated``), else
    ``down_proj(dropout(act(up_proj(x))))``: ``[N, C] -> [N, C]``.

    Args:
        dim: features ``C``.
        hidden_dim: hidden features ``F``.
        activation: a name of :func:`gnn_transformer.layers.get_activation` or a callable.
            Default ``"silu"``.
        gated: a gate projection (GLU variant). Default ``True``.
        bias: biases in the projections. Default ``False``.
        dropout: dropout before ``down_proj`` (training only). Default ``0.0``.

    Example:
        >>> import torch
        >>> FeedForward(4, 8)(torch.randn(3, 4)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        activation: str | Callable[[Tensor], Tensor] = "silu",
        *,
        gated: bool = True,
        bias: bool = False,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("hidden_dim", hidden_dim)
        check_bool("gated", gated)
        check_bool("bias", bias)
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias, **factory) if gated else None
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias, **factory)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias, **factory)
        self.activation = get_activation(activation)
        self.dropout = nn.Dropout(check_dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_proj is None:
            h = self.activation(self.up_proj(x))  # [N, F]
        else:
            h = self.activation(self.gate_proj(x)) * self.up_proj(x)  # [N, F]
        return self.down_proj(dropped(self.dropout, h))  # [N, C]


__all__ = ["FeedForward"]
