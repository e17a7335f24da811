r"""Attention variants from the literature, as message passing over the same edge set.

Each is a subclass of :class:`~gnn_transformer.GraphMultiheadAttention` with the same constructor,
parameters and ``forward`` (so it drops into the layers via ``attention=``), and each has a dense
counterpart in :mod:`gnn_transformer.dense.variants` that the tests compare it with.

- :class:`SigmoidAttention` (Ramapuram et al. 2024, "Theory, Analysis, and Best Practices for
  Sigmoid Self-Attention"): :math:`\alpha_{ji} = \sigma(s_{ji} + b)` with no normalization over
  the incoming edges; by default :math:`b = -\log n_i`, ``n_i`` the in-degree of node ``i`` (the
  paper's ``-log(sequence length)`` on a full graph).
- :class:`LinearAttention` (Katharopoulos et al. 2020, "Transformers are RNNs"): the kernel
  :math:`\phi(q_i)^\top \phi(k_j)` with :math:`\phi = \mathrm{elu} + 1` replaces ``exp``,
  normalized over the incoming edges of each target:
  :math:`o_i = \sum_j \phi(q_i)^\top\phi(k_j) v_j / (\sum_j \phi(q_i)^\top\phi(k_j) + \epsilon)`.
- :class:`MLPProjectionAttention`: nonlinear query/key/value projections, each a small MLP
  ``x -> W act(W_h x + b_h) + b`` (the outer ``W`` is the usual ``in_proj_weight``).
- grouped-query / multi-query attention is ``num_kv_heads`` of every attention class; cross-layer
  KV sharing is ``kv_share_every`` of the stacks (:mod:`gnn_transformer.layers`).

A node without incoming edges gets a zero attention output in every variant. These variants run
on the message-passing path (``backend`` ``"auto"`` or ``"pyg"``); the fused kernels are softmax only.

Notation: ``N`` nodes, ``E`` edges, ``H`` heads, ``D`` head dimension, ``C`` model dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.utils import degree, scatter

from . import kernels
from .attention import GraphMultiheadAttention, _materialized, check_real


def _message_passing_only(layer: GraphMultiheadAttention, backend: str | None) -> None:
    backend = layer.backend if backend is None else backend
    if backend not in ("auto", "pyg"):
        raise ValueError(
            f"{type(layer).__name__} runs on message passing only: expected 'backend' 'auto' or 'pyg' (got {backend!r})"
        )


class _EdgeWeightAttention(GraphMultiheadAttention):
    """Shared ``attend``: per-edge weights from ``edge_update``, then weighted sum of values."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _message_passing_only(self, None)

    def attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        edge_index: Tensor,
        *,
        edge_bias: Tensor | None = None,
        need_weights: bool = False,
        backend: str | None = None,
        edge_head: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        _message_passing_only(self, backend)
        if kernels.is_block_structure(edge_index):  # an implicit graph: its edges, within the budget
            kernels.check_implicit_options(edge_bias, edge_head)
            edge_index, edge_head = _materialized(edge_index)
        if edge_head is not None:  # one head on (head, token) nodes
            return self._attend_per_head(query, key, value, edge_index, edge_head, edge_bias, need_weights, backend)
        size = (key.size(0), query.size(0))
        group = query.size(1) // key.size(1)
        key = key.repeat_interleave(group, dim=1)  # [N_src, H, D]
        value = value.repeat_interleave(group, dim=1)  # [N_src, H, D]
        scale = self.head_dim**-0.5 if self.scale is None else self.scale
        alpha = self.edge_updater(
            edge_index, query=query, key=key, edge_bias=edge_bias, scale=scale, softcap=self.softcap, size=size
        )  # [E, H]
        weights = alpha
        alpha = F.dropout(alpha, p=self.dropout, training=self.training)
        out = self.propagate(edge_index, value=value, alpha=alpha, size=size)  # [N_dst, H, D]
        return out, (weights if need_weights else None)


class SigmoidAttention(_EdgeWeightAttention):
    r"""Sigmoid attention: :math:`\alpha_{ji} = \sigma(q_i^\top k_j / \sqrt{D} + b_{ji} + b)`.

    Args:
        *args, **kwargs: as :class:`GraphMultiheadAttention`; ``scale`` replaces
            :math:`1 / \sqrt{D}`, ``softcap`` caps the scaled scores before the biases, as for
            softmax attention.
        score_bias: the constant ``b``; ``None`` (default) uses ``-log(in-degree of i)`` per target.

    Example:
        >>> attn = SigmoidAttention(8, 2, backend="pyg")
        >>> attn(torch.randn(3, 8), torch.tensor([[0, 0, 1], [0, 1, 1]])).shape
        torch.Size([3, 8])
    """

    score_function = "sigmoid"

    def __init__(self, *args, score_bias: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.score_bias = None if score_bias is None else check_real("score_bias", score_bias)

    def edge_update(
        self,
        query_i: Tensor,
        key_j: Tensor,
        edge_bias: Tensor | None,
        scale: float,
        softcap: float | None,
        index: Tensor,
        ptr: Tensor | None,
        size_i: int | None,
    ) -> Tensor:
        score = (query_i * key_j).sum(dim=-1) * scale  # [E, H]
        if softcap is not None:
            score = torch.tanh(score / softcap) * softcap  # [E, H], in (-softcap, softcap)
        if edge_bias is not None:
            score = score + edge_bias
        if self.score_bias is None:
            in_degree = degree(index, size_i, dtype=score.dtype)  # [N_dst]
            score = score - in_degree.log()[index].unsqueeze(-1)
        else:
            score = score + self.score_bias
        return torch.sigmoid(score)  # [E, H], not normalized over the incoming edges


def elu_feature_map(x: Tensor) -> Tensor:
    r""":math:`\phi(x) = \mathrm{elu}(x) + 1 > 0`, the feature map of linear attention."""
    return F.elu(x) + 1.0


class LinearAttention(_EdgeWeightAttention):
    r"""Kernelized linear attention with :math:`\phi = \mathrm{elu} + 1`, normalized per target.

    Args:
        *args, **kwargs: as :class:`GraphMultiheadAttention` (no ``edge_bias`` in ``forward``; no
            ``scale`` or ``softcap``: the kernel has no scores to scale or cap).
        eps: added to each target's normalizer. Default ``1e-6``.
    """

    score_function = "linear"

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name in ("scale", "softcap"):
            if getattr(self, name) is not None:
                raise ValueError(
                    f"LinearAttention takes no '{name}': the kernel phi(q)^T phi(k) has no scores "
                    f"to scale or cap (got {name}={getattr(self, name)!r})"
                )
        self.eps = check_real("eps", eps, low=0.0)

    def edge_update(
        self,
        query_i: Tensor,
        key_j: Tensor,
        edge_bias: Tensor | None,
        scale: float,
        softcap: float | None,
        index: Tensor,
        ptr: Tensor | None,
        size_i: int | None,
    ) -> Tensor:
        if edge_bias is not None:
            raise ValueError("LinearAttention takes no 'edge_bias' (got a tensor)")
        kernel = (elu_feature_map(query_i) * elu_feature_map(key_j)).sum(dim=-1)  # [E, H], > 0
        normalizer = scatter(kernel, index, dim=0, dim_size=size_i, reduce="sum")  # [N_dst, H]
        return kernel / (normalizer[index] + self.eps)  # [E, H]


class MLPProjectionAttention(GraphMultiheadAttention):
    r"""Softmax attention with nonlinear projections ``q = W_q act(W_qh x + b_qh) + b_q`` (same for
    ``k``, ``v``); the hidden layers ``q_hidden``, ``k_hidden``, ``v_hidden`` keep the input width
    (``q_hidden`` only with ``project_kv=False``).

    Args:
        *args, **kwargs: as :class:`GraphMultiheadAttention`.
        mlp_activation: activation of the hidden layer. Default ``F.gelu``.
    """

    score_function = "softmax"

    def __init__(self, *args, mlp_activation=F.gelu, **kwargs) -> None:
        if not callable(mlp_activation):
            raise ValueError(f"Expected 'mlp_activation' to be a callable (got {mlp_activation!r})")
        super().__init__(*args, **kwargs)
        factory = {"device": self.out_proj.weight.device, "dtype": self.out_proj.weight.dtype}
        bias = self.in_proj_bias is not None
        self.q_hidden = nn.Linear(self.embed_dim, self.embed_dim, bias=bias, **factory)
        if self.project_kv:
            self.k_hidden = nn.Linear(self.kdim, self.kdim, bias=bias, **factory)
            self.v_hidden = nn.Linear(self.vdim, self.vdim, bias=bias, **factory)
        self.mlp_activation = mlp_activation

    def drop_key_value_projection(self) -> None:
        if self.project_kv:
            del self.k_hidden, self.v_hidden
        super().drop_key_value_projection()

    def project_query(self, x_query: Tensor) -> Tensor:
        return super().project_query(self.mlp_activation(self.q_hidden(x_query)))

    def project_key_value(self, x_key: Tensor, x_value: Tensor) -> tuple[Tensor, Tensor]:
        self._check_project_kv()
        return super().project_key_value(
            self.mlp_activation(self.k_hidden(x_key)), self.mlp_activation(self.v_hidden(x_value))
        )


ATTENTIONS: dict[str, type[GraphMultiheadAttention]] = {
    "softmax": GraphMultiheadAttention,
    "sigmoid": SigmoidAttention,
    "linear": LinearAttention,
    "mlp": MLPProjectionAttention,
}


def attention_class(name: str) -> type[GraphMultiheadAttention]:
    """The attention class named ``name`` (``"softmax"``, ``"sigmoid"``, ``"linear"``, ``"mlp"``)."""
    if name not in ATTENTIONS:
        raise ValueError(f"Expected 'attention' to be one of {sorted(ATTENTIONS)} (got {name!r})")
    return ATTENTIONS[name]


__all__ = [
    "SigmoidAttention",
    "LinearAttention",
    "MLPProjectionAttention",
    "elu_feature_map",
    "ATTENTIONS",
    "attention_class",
]
