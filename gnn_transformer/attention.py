r"""Multi-head attention as message passing on a directed token graph.

An edge ``j -> i`` (``edge_index[0] = j`` the source, ``edge_index[1] = i`` the target) means
"query ``i`` may attend to key ``j``". For each head ``h``:

.. math::

    s_{ji}^h = \frac{\langle q_i^h, k_j^h \rangle}{\sqrt{d}} + b_{ji}^h, \qquad
    \alpha_{ji}^h = \frac{\exp s_{ji}^h}{\sum_{j' \in \mathcal{N}(i)} \exp s_{j'i}^h}, \qquad
    o_i^h = \sum_{j \in \mathcal{N}(i)} \alpha_{ji}^h \, v_j^h

followed by the output projection. A node with no incoming edge aggregates nothing: its attention
output is zero (never NaN). A duplicated edge is two messages.

Notation: ``N`` nodes (``N_src`` / ``N_dst`` for a bipartite graph), ``E`` edges, ``H`` query heads,
``H_kv`` key/value heads, ``D`` head dimension, ``C`` = ``embed_dim`` = ``H * D``.
"""

from __future__ import annotations

import math
import numbers
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric import EdgeIndex
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import softmax

from . import kernels
from .kernels.primitives import versions
from .kernels.reference import edge_softmax
from .position import RopeScaling, RotaryEmbedding, check_base, checked_lookup

# the layer's backends: the per-edge message-passing path and every kernel backend
BACKENDS = ("auto", "pyg", *(b for b in kernels.BACKENDS if b != "auto"))


def _materialized(graph) -> tuple[Tensor, Tensor | None]:
    """``(edge_index, edge_head or None)`` of an implicit graph, within the edge budget."""
    edges = graph.edges()
    return edges if isinstance(edges, tuple) else (edges, None)


# edge_index tensors that passed check_edge_index: id -> (weak reference, version, sizes, device);
# an entry disappears with its tensor, and a write in place through PyTorch (a new version)
# invalidates it
_CHECKED: dict[int, tuple[weakref.ref, tuple[int, int], tuple[int, int], torch.device]] = {}


def _already_checked(edge_index: Tensor, num_src: int, num_dst: int, device: torch.device | None) -> bool:
    """Whether this very ``edge_index``, unchanged since, passed :func:`check_edge_index` for these
    sizes (and lies on ``device``)."""
    hit = _CHECKED.get(id(edge_index))
    if hit is None:
        return False
    ref, version, sizes, on = hit  # only tensors with a version counter are remembered
    return (
        ref() is edge_index
        and version == versions(edge_index)
        and sizes == (num_src, num_dst)
        and (device is None or device == on)
    )


def _remember_checked(edge_index: Tensor, num_src: int, num_dst: int) -> None:
    if edge_index.is_inference():  # no version counter: in-place writes could not be seen
        return
    key = id(edge_index)

    def forget(_ref: object) -> None:
        _CHECKED.pop(key, None)

    try:
        ref = weakref.ref(edge_index, forget)
    except TypeError:  # not weak-referenceable: checked on every call
        return
    _CHECKED[key] = (ref, versions(edge_index), (num_src, num_dst), edge_index.device)


def check_edge_index(edge_index: Tensor, num_src: int, num_dst: int, device: torch.device | None = None) -> None:
    """Validate ``edge_index`` at the public boundary (shape, dtype, device, range).

    The checks (with the range scan: one pass over the edges, one read back to the host) run once
    per graph object: a tensor or ``torch_geometric.EdgeIndex`` that passed them for ``(num_src,
    num_dst)`` is not checked again until it is written in place (its version counter; writes that
    bypass it, through ``.data`` or a NumPy view, are not seen, as in the kernels' graph cache).
    ``device``: that of the node features, which an ``edge_index`` with edges must share.
    """
    if _already_checked(edge_index, num_src, num_dst, device):
        return
    if kernels.is_block_structure(edge_index):
        _check_block_graph(edge_index, num_src, num_dst, device)
        return
    if not isinstance(edge_index, Tensor):
        raise ValueError(f"Expected 'edge_index' to be a tensor (got {type(edge_index).__name__})")
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"Expected 'edge_index' to have shape [2, E] (got {list(edge_index.shape)})")
    if edge_index.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"Expected 'edge_index' to hold integers (got dtype {edge_index.dtype})")
    if isinstance(edge_index, EdgeIndex) and None not in edge_index.sparse_size():
        if tuple(edge_index.sparse_size()) != (num_src, num_dst):
            raise ValueError(
                f"Expected 'edge_index' of sparse_size ({num_src}, {num_dst}) for "
                f"{num_src} source and {num_dst} target nodes (got "
                f"{tuple(edge_index.sparse_size())})"
            )
    if edge_index.numel() == 0:
        return
    if device is not None and edge_index.device != device:
        raise ValueError(
            f"Expected 'edge_index' on the device of the node features, {device} (got device {edge_index.device})"
        )
    if edge_index.device.type == "meta":
        raise ValueError(
            f"Expected 'edge_index' with values to check, not on the meta device (got device {edge_index.device})"
        )
    plain = edge_index.as_tensor() if isinstance(edge_index, EdgeIndex) else edge_index
    stats = [plain.amin(1), plain.amax(1)]
    order = edge_index.sort_order if isinstance(edge_index, EdgeIndex) else None
    if order is not None and plain.size(1) > 1:  # PyG trusts the flag: a false one gives wrong sums
        key = plain[1] if order == "col" else plain[0]
        stats.append((key[1:] < key[:-1]).any().view(1).to(plain.dtype))
    src_min, dst_min, src_max, dst_max, *unsorted = torch.cat(stats).tolist()
    if unsorted and unsorted[0]:
        row = 1 if order == "col" else 0
        raise ValueError(
            f"Expected 'edge_index' flagged sort_order={order!r} to have row {row} in "
            "ascending order (it is not): build the EdgeIndex without sort_order, or "
            f"sort it with .sort_by({order!r})"
        )
    lo = min(src_min, dst_min)
    if lo < 0:
        raise ValueError(f"Expected 'edge_index' to hold non-negative indices (found {lo})")
    if src_max >= num_src:
        raise ValueError(f"Found source index {src_max} in 'edge_index' but there are only {num_src} source nodes")
    if dst_max >= num_dst:
        raise ValueError(f"Found target index {dst_max} in 'edge_index' but there are only {num_dst} target nodes")
    _remember_checked(edge_index, num_src, num_dst)


def _check_block_graph(graph, num_src: int, num_dst: int, device: torch.device | None) -> None:
    """The sizes and device of an implicit graph (a :class:`~gnn_transformer.topology.BlockGraph`)."""
    if (graph.num_src, graph.num_dst) != (num_src, num_dst):
        raise ValueError(
            f"Expected a BlockGraph of {num_src} sources and {num_dst} targets as 'edge_index' (got "
            f"{graph.num_src} and {graph.num_dst})"
        )
    if device is not None and graph.q_block.device != device:
        raise ValueError(
            f"Expected the BlockGraph 'edge_index' on the device of the node features, {device} "
            f"(got device {graph.q_block.device})"
        )


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs linear layers in on ``device`` now (``None``: off)."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return None
    return torch.get_autocast_dtype(device.type) if enabled else None


def _check_features(x: Tensor, dim: int, name: str, dtype: torch.dtype | None = None) -> None:
    """Node features ``[N, dim]``, floating point, of ``dtype`` (the weights') unless autocast is on."""
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected '{name}' to be a tensor (got {type(x).__name__})")
    if x.dim() != 2 or x.size(-1) != dim:
        raise ValueError(f"Expected '{name}' to have shape [N, {dim}] (got {list(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"Expected '{name}' to hold floating-point features (got dtype {x.dtype})")
    if dtype is not None and x.dtype != dtype and _autocast_dtype(x.device) is None:
        raise TypeError(
            f"Expected '{name}' in the dtype of the layer's weights, {dtype} (got "
            f"{x.dtype}): cast one to the other, or run under torch.autocast"
        )


def check_real(name: str, value: object, *, low: float | None = None, low_open: bool = False) -> float:
    """``float(value)`` if it is a finite real number (not a bool), at least ``low`` (above it with
    ``low_open``), else a ``ValueError`` naming ``name`` and the value."""
    number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    if not (math.isfinite(number) and (low is None or number > low or (number == low and not low_open))):
        bounds = "" if low is None else f" {'>' if low_open else '>='} {low}"
        raise ValueError(f"Expected '{name}' to be a finite number{bounds} (got {value!r})")
    return number


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool, else a ``ValueError`` naming ``name`` and the value."""
    if not isinstance(value, bool):
        raise ValueError(f"Expected '{name}' to be a bool (got {value!r})")
    return value


def check_ids(ids: Tensor, size: int, name: str) -> None:
    """Token ids (or token types) in ``[0, size)``, else a ``ValueError`` naming ``name``, the value
    found and the table size (one pass, one read back to the host)."""
    if not ids.numel():
        return
    lo, hi = (int(v) for v in torch.aminmax(ids))
    bad = lo if lo < 0 else (hi if hi >= size else None)
    if bad is not None:
        raise ValueError(f"Found {bad} in '{name}' but the model's table has entries 0..{size - 1}")


def embed_ids(embedding: nn.Embedding, ids: Tensor, name: str) -> Tensor:
    """``embedding(ids)``, with :func:`check_ids`'s ``ValueError`` naming ``name`` for an id outside
    the table (:func:`.position.checked_lookup`: no extra pass over valid ids on the CPU)."""
    return checked_lookup(embedding, ids, lambda: check_ids(ids, embedding.num_embeddings, name))


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is a positive int (not a bool), else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"Expected '{name}' to be a positive int (got {value!r})")
    return value


def check_dropout(value: object, name: str = "dropout") -> float:
    """``value`` if it is a probability in ``[0, 1)`` (not a bool), else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"Expected '{name}' to be a number in [0, 1) (got {value!r})")
    return float(value)


def _own_route(layer: GraphMultiheadAttention) -> bool:
    """Whether ``layer`` reaches the kernels through :class:`GraphMultiheadAttention`'s own
    ``_attend_and_project`` and ``attend``: neither replaced on its class nor on the instance (as a
    wrapper that must see every call replaces it)."""
    cls, own = type(layer), layer.__dict__
    return (
        cls.attend is GraphMultiheadAttention.attend
        and cls._attend_and_project is GraphMultiheadAttention._attend_and_project
        and "attend" not in own
        and "_attend_and_project" not in own
    )


class GraphMultiheadAttention(MessagePassing):
    r"""Multi-head attention over the incoming edges of each node of a token graph.

    Constructor and parameter names mirror :class:`torch.nn.MultiheadAttention`, so
    ``layer.load_state_dict(mha.state_dict())`` and the reverse both work (when
    ``num_kv_heads == num_heads``): ``in_proj_weight`` ``[3C, C]`` (or ``q_proj_weight``,
    ``k_proj_weight``, ``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``),
    ``in_proj_bias`` ``[3C]`` and ``out_proj``. With ``project_kv=False`` (a layer that attends
    with keys and values computed by another layer, as in cross-layer KV sharing) only the query
    projection exists: ``in_proj_weight`` ``[C, C]`` (or ``q_proj_weight`` alone), ``in_proj_bias``
    ``[C]``.

    Args:
        embed_dim: model dimension ``C``.
        num_heads: number of query heads ``H``; ``embed_dim`` must be divisible by it.
        dropout: dropout probability on the attention weights (training only). Default ``0.0``.
        bias: add bias to the input and output projections. Default ``True``.
        kdim: feature size of the nodes supplying keys. Default ``embed_dim``.
        vdim: feature size of the nodes supplying values. Default ``embed_dim``.
        num_kv_heads: key/value heads ``H_kv`` (grouped-query attention; ``1`` is multi-query).
            ``num_heads`` must be divisible by it. Default ``num_heads``.
        backend: ``"auto"`` (default), ``"pyg"`` (readable per-edge message passing), ``"fused"``,
            ``"tiled"`` or ``"split"`` (dense tiles tiled, the other edges fused, merged through their
            log-sum-exps) — kernels of :mod:`gnn_transformer.kernels`, never ``[E, H, D]``.
        rope: rotate queries and keys by the position of their node (RoPE, Su et al. 2021) between
            the projections and the attention; ``forward`` then needs ``pos``. Default ``False``.
        rope_base: the base of the rotary frequencies. Default ``10000.0``.
        project_kv: own a key/value projection. With ``False`` the layer has no key/value
            parameters and ``forward`` needs ``kv=`` (keys and values from elsewhere, e.g. an
            earlier layer). Default ``True``.
        head_dim: the head dimension ``D``, when the query heads span ``H * D != embed_dim`` features
            (Gemma: the in-projection is ``[H D + 2 H_kv D, C]``, ``out_proj`` ``[C, H D]``). Default
            ``embed_dim // num_heads``.
        out_bias: a bias in ``out_proj``. Default ``bias`` (Qwen2 has biased query/key/value
            projections and an unbiased output projection, GPT-Neo the reverse).
        scale: the factor of the scores ``<q_i, k_j>``. Default ``1 / sqrt(D)`` (GPT-Neo: ``1.0``;
            Gemma 2: ``query_pre_attn_scalar ** -0.5``). Every backend applies it.
        softcap: attention logit softcapping (Gemma 2): scores become ``softcap * tanh(s / softcap)``
            before the edge bias and the softmax. Only the ``pyg`` backend computes it: ``"auto"``
            resolves to ``"pyg"``, another explicit backend is refused. Default ``None``.
        q_norm, k_norm: modules applied to each query / key head ``[N, H, D]`` after the projection
            and before RoPE (qk-norm of Qwen3 and Gemma 3: an RMSNorm over ``D``). Default ``None``.
        rope_scaling: a :class:`~gnn_transformer.position.RopeScaling` of the rotary frequencies
            (linear, dynamic, Llama 3, YaRN). Default ``None``: unscaled.
        rotary_dim: rotate only the first ``rotary_dim`` dimensions of each head (partial RoPE).
            Default ``None``: all ``D``.
        select: choose the graph from the data, on every forward pass: a callable
            ``select(query [N_dst, H, D], key [N_src, H_kv, D], edge_index) -> (edge_index,
            edge_head)`` given this layer's (rotated) queries and keys, detached, and the graph
            passed to ``forward`` (the edges allowed), returning a per-head graph on the same
            nodes (the selectors of :mod:`gnn_transformer.topology.dynamic`; an ``nn.Module``
            selector, such as one with routing centroids, becomes a submodule). The choice is not
            differentiated; attention on the chosen graph is. ``forward`` then takes no
            ``edge_head`` or ``edge_bias``. Default ``None``: attend along the given graph.

    Example:
        >>> import torch
        >>> from gnn_transformer import GraphMultiheadAttention
        >>> from gnn_transformer.topology import causal
        >>> attn = GraphMultiheadAttention(8, 2)
        >>> out, alpha = attn(torch.randn(3, 8), causal(3), return_attention_weights=True)
        >>> out.shape, alpha.shape   # 6 causal edges on 3 tokens, 2 heads
        (torch.Size([3, 8]), torch.Size([6, 2]))
    """

    # the projections' parameters (None where the layer's dimensions or ``project_kv`` leave them out)
    in_proj_weight: nn.Parameter | None
    q_proj_weight: nn.Parameter | None
    k_proj_weight: nn.Parameter | None
    v_proj_weight: nn.Parameter | None
    in_proj_bias: nn.Parameter | None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        *,
        num_kv_heads: int | None = None,
        backend: str = "auto",
        rope: bool = False,
        rope_base: float = 10000.0,
        project_kv: bool = True,
        select=None,
        head_dim: int | None = None,
        out_bias: bool | None = None,
        scale: float | None = None,
        softcap: float | None = None,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        rope_scaling: RopeScaling | None = None,
        rotary_dim: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(aggr="sum", node_dim=0)
        if select is not None and not callable(select):
            raise ValueError(
                f"Expected 'select' to be a callable (query, key, edge_index) -> (edge_index, "
                f"edge_head), or None (got {select!r})"
            )
        check_positive_int("embed_dim", embed_dim)
        check_positive_int("num_heads", num_heads)
        for name, value in (("kdim", kdim), ("vdim", vdim)):
            if value is not None:
                check_positive_int(name, value)
        if head_dim is not None:
            check_positive_int("head_dim", head_dim)
        elif embed_dim % num_heads != 0:
            raise ValueError(f"Expected 'embed_dim' ({embed_dim}) to be divisible by 'num_heads' ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"Expected 'num_heads' ({num_heads}) to be divisible by 'num_kv_heads' ({num_kv_heads})")
        dropout = check_dropout(dropout)
        check_base(rope_base, "rope_base")
        if backend not in BACKENDS:
            raise ValueError(f"Expected 'backend' to be one of {BACKENDS} (got {backend!r})")
        for name, value in (("project_kv", project_kv), ("rope", rope), ("bias", bias), ("out_bias", out_bias)):
            if not isinstance(value, bool) and not (name == "out_bias" and value is None):
                raise ValueError(f"Expected '{name}' to be a bool (got {value!r})")
        out_bias = bias if out_bias is None else out_bias
        self.scale = None if scale is None else check_real("scale", scale, low=0.0, low_open=True)
        self.softcap = None if softcap is None else check_real("softcap", softcap, low=0.0, low_open=True)
        for name, norm in (("q_norm", q_norm), ("k_norm", k_norm)):
            if norm is not None and not isinstance(norm, nn.Module):
                raise ValueError(f"Expected '{name}' to be an nn.Module or None (got {norm!r})")
        if not rope and (rope_scaling is not None or rotary_dim is not None):
            given = "rope_scaling" if rope_scaling is not None else "rotary_dim"
            raise ValueError(
                f"Expected '{given}' only with rope=True (got {given}="
                f"{rope_scaling if rope_scaling is not None else rotary_dim!r} and rope=False)"
            )
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads if head_dim is None else head_dim
        q_dim = self.q_dim = num_heads * self.head_dim  # H D: embed_dim unless head_dim says otherwise
        self.dropout = dropout
        self.backend = backend
        self.project_kv = project_kv
        kv_dim = num_kv_heads * self.head_dim
        kv_rows = 2 * kv_dim if project_kv else 0  # key and value rows of the in-projection

        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(q_dim + kv_rows, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(q_dim, embed_dim, **factory))
            if project_kv:
                self.k_proj_weight = nn.Parameter(torch.empty(kv_dim, self.kdim, **factory))
                self.v_proj_weight = nn.Parameter(torch.empty(kv_dim, self.vdim, **factory))
            else:
                self.register_parameter("k_proj_weight", None)
                self.register_parameter("v_proj_weight", None)
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(q_dim + kv_rows, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(q_dim, embed_dim, bias=out_bias, **factory)
        if rope and self.head_dim % 2 != 0:
            raise ValueError(f"Expected an even head dimension for 'rope' (got {self.head_dim})")
        self.rotary = (
            RotaryEmbedding(self.head_dim, base=rope_base, scaling=rope_scaling, rotary_dim=rotary_dim)
            if rope
            else None
        )
        self.q_norm, self.k_norm = q_norm, k_norm
        self.select = select
        self._reset_attention_parameters()

    def _reset_attention_parameters(self) -> None:
        # Same initialization as nn.MultiheadAttention._reset_parameters (without key/value rows:
        # the query rows drawn as those of the full [C + 2 H_kv D, C] matrix).
        if self.in_proj_weight is not None and self.project_kv:
            nn.init.xavier_uniform_(self.in_proj_weight)
        elif self.in_proj_weight is not None:
            kv_dim = self.num_kv_heads * self.head_dim
            bound = math.sqrt(6.0 / (self.embed_dim + self.q_dim + 2 * kv_dim))
            nn.init.uniform_(self.in_proj_weight, -bound, bound)
        else:
            assert self.q_proj_weight is not None  # the layer has in_proj_weight or q_proj_weight
            nn.init.xavier_uniform_(self.q_proj_weight)
            for weight in (self.k_proj_weight, self.v_proj_weight):
                if weight is not None:  # None without a key/value projection
                    nn.init.xavier_uniform_(weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
        if self.out_proj.bias is not None:
            nn.init.constant_(self.out_proj.bias, 0.0)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.out_proj.reset_parameters()
        self._reset_attention_parameters()

    def drop_key_value_projection(self) -> None:
        """Remove the key/value projection in place, keeping the query projection's values: the
        layer becomes what ``project_kv=False`` builds (used by the stacks' cross-layer sharing)."""
        if not self.project_kv:
            return
        w_q, _, _ = self.projection_weights()
        b_q, _, _ = self.projection_biases()
        if self.in_proj_weight is not None:
            grad = self.in_proj_weight.requires_grad
            self.in_proj_weight = nn.Parameter(w_q.detach().clone(), requires_grad=grad)
        else:
            self.k_proj_weight = None
            self.v_proj_weight = None
        if self.in_proj_bias is not None:
            assert b_q is not None  # the query rows of in_proj_bias
            grad = self.in_proj_bias.requires_grad
            self.in_proj_bias = nn.Parameter(b_q.detach().clone(), requires_grad=grad)
        self.project_kv = False

    def _check_project_kv(self) -> None:
        if not self.project_kv:
            raise ValueError(
                f"{type(self).__name__} was built with project_kv=False and has no "
                "key/value projection: pass keys and values with 'kv='"
            )

    # ------------------------------------------------------------------ projections
    def projection_weights(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The query, key and value projection matrices ``[C, C]``, ``[H_kv D, kdim]``, ``[H_kv D, vdim]``
        (key and value ``None`` when the layer has no key/value projection)."""
        if self.in_proj_weight is not None:
            if not self.project_kv:
                return self.in_proj_weight, None, None
            kv_dim = self.num_kv_heads * self.head_dim
            return self.in_proj_weight.split([self.q_dim, kv_dim, kv_dim], dim=0)
        assert self.q_proj_weight is not None  # the layer has in_proj_weight or q_proj_weight
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def projection_biases(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The query, key and value projection biases (or ``None``; key and value are ``None``
        when the layer has no key/value projection)."""
        if self.in_proj_bias is None:
            return None, None, None
        if not self.project_kv:
            return self.in_proj_bias, None, None
        kv_dim = self.num_kv_heads * self.head_dim
        return self.in_proj_bias.split([self.q_dim, kv_dim, kv_dim], dim=0)

    def project_query(self, x_query: Tensor) -> Tensor:
        """Per-head queries ``[N_dst, H, D]``."""
        w_q, _, _ = self.projection_weights()
        b_q, _, _ = self.projection_biases()
        return self._query_heads(F.linear(x_query, w_q, b_q))

    def project_key_value(self, x_key: Tensor, x_value: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head keys and values ``[N_src, H_kv, D]``."""
        self._check_project_kv()
        _, w_k, w_v = self.projection_weights()
        _, b_k, b_v = self.projection_biases()
        assert w_k is not None and w_v is not None  # the layer has a key/value projection (checked above)
        return self._key_value_heads(F.linear(x_key, w_k, b_k), F.linear(x_value, w_v, b_v))

    def project(self, x_query: Tensor, x_key: Tensor, x_value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head queries ``[N_dst, H, D]``, keys and values ``[N_src, H_kv, D]``. Self-attention
        (one input for all three) with a packed ``in_proj_weight`` runs one matmul and splits it,
        as ``nn.MultiheadAttention`` does."""
        weight = self.in_proj_weight
        packed = (
            x_query is x_key
            and x_key is x_value
            and self.project_kv
            and type(self).project_query is GraphMultiheadAttention.project_query
            and type(self).project_key_value is GraphMultiheadAttention.project_key_value
        )
        if not packed or weight is None:
            return (self.project_query(x_query), *self.project_key_value(x_key, x_value))
        kv_dim = self.num_kv_heads * self.head_dim
        q, k, v = F.linear(x_query, weight, self.in_proj_bias).split([self.q_dim, kv_dim, kv_dim], dim=-1)
        return (self._query_heads(q), *self._key_value_heads(k, v))

    def _query_heads(self, rows: Tensor) -> Tensor:
        """Projected query rows ``[N, H·D]`` as heads ``[N, H, D]``, query-normed."""
        query = rows.view(-1, self.num_heads, self.head_dim)
        return query if self.q_norm is None else self.q_norm(query)

    def _key_value_heads(self, key_rows: Tensor, value_rows: Tensor) -> tuple[Tensor, Tensor]:
        """Projected key and value rows ``[N, H_kv·D]`` as heads ``[N, H_kv, D]``, keys key-normed."""
        key = key_rows.view(-1, self.num_kv_heads, self.head_dim)
        value = value_rows.view(-1, self.num_kv_heads, self.head_dim)
        return (key if self.k_norm is None else self.k_norm(key)), value

    def _score_scale(self) -> float:
        """The factor of the scores ``<q_i, k_j>``: ``scale``, by default ``1 / sqrt(D)``."""
        return 1.0 / math.sqrt(self.head_dim) if self.scale is None else self.scale

    def rotate(self, heads: Tensor, pos: Tensor | None, name: str = "pos") -> Tensor:
        """Queries or keys ``[N, H, D]`` rotated by their node's position (identity without RoPE)."""
        if self.rotary is None and pos is None:
            return heads
        if not isinstance(pos, Tensor) or pos.dim() != 1 or pos.size(0) != heads.size(0):
            got = list(pos.shape) if isinstance(pos, Tensor) else pos
            why = "; the layer uses RoPE" if self.rotary is not None else ""
            raise ValueError(
                f"Expected '{name}' to hold one position per node, shape [{heads.size(0)}] (got {got}){why}"
            )
        if pos.dtype == torch.bool or pos.is_complex():  # a mask given for positions: read as 0 and 1
            raise ValueError(f"Expected '{name}' to hold integer or real positions (got dtype {pos.dtype})")
        return heads if self.rotary is None else self.rotary(heads, pos)

    def key_value(
        self, x_src: Tensor, *, value: Tensor | None = None, pos: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Keys (rotated when the layer uses RoPE) and values ``[N_src, H_kv, D]`` of source nodes.

        What ``forward(..., kv=...)`` takes: keys and values computed once and reused by several
        layers (cross-layer sharing) or kept in a cache while decoding. Raises ``ValueError`` on a
        layer built with ``project_kv=False`` (it has no key/value projection).
        """
        self._check_project_kv()
        _check_features(x_src, self.kdim, "x_src", self.out_proj.weight.dtype)
        if value is not None:
            _check_features(value, self.vdim, "value", self.out_proj.weight.dtype)
        key, value_h = self.project_key_value(x_src, x_src if value is None else value)
        return self.rotate(key, pos), value_h

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: Tensor | tuple[Tensor, Tensor],
        edge_index: Tensor,
        *,
        value: Tensor | None = None,
        edge_bias: Tensor | None = None,
        pos: Tensor | tuple[Tensor, Tensor] | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
        edge_head: Tensor | None = None,
        return_attention_weights: bool = False,
        backend: str | None = None,
    ):
        r"""Attend along the edges of ``edge_index``.

        Args:
            x: node features ``[N, C]``, or a pair ``(x_src, x_dst)`` for cross-attention on a
                bipartite graph (``x_src`` ``[N_src, kdim]`` supplies keys and values, ``x_dst``
                ``[N_dst, C]`` supplies queries).
            edge_index: ``[2, E]`` (plain tensor or ``torch_geometric.EdgeIndex``), row 0 the
                source ``j``, row 1 the target ``i``.
            value: optional value features of the source nodes ``[N_src, vdim]`` when they differ
                from the key features (``nn.MultiheadAttention`` with separate key and value).
            edge_bias: ``[E, H]`` added to the scaled scores before the softmax (ALiBi, graph
                biases), in the order of ``edge_index``'s columns; with ``edge_head`` also ``[E]``
                (each edge's bias for its head).
            pos: positions of the nodes for RoPE: ``[N]``, or a pair ``(pos_src, pos_dst)`` for a
                bipartite graph (only ``pos_dst`` with ``kv``). Required iff the layer uses RoPE.
            kv: precomputed ``(key, value)`` of the source nodes, ``[N_src, H_kv, D]`` each (see
                :meth:`key_value`); ``x`` then holds only the query nodes ``[N_dst, C]``. Required
                when the layer was built with ``project_kv=False``.
            edge_head: ``[E]`` integer, values in ``[0, H)``: a per-head graph, edge ``j -> i``
                exists for query head ``edge_head[e]`` only (a head is an edge type; grouped-query
                heads read their group's key/value head). Every backend runs it at the cost of its
                ``E`` edges (:mod:`gnn_transformer.kernels.heads`). ``None``: every head sees every edge.
            return_attention_weights: also return the attention weights per edge ``[E, H]`` (``[E]``
                with ``edge_head``): the
                softmax, before attention dropout (``nn.MultiheadAttention`` returns its weights
                after dropout, averaged over heads by default).
            backend: override the layer's backend for this call.

        Returns:
            ``out`` ``[N_dst, C]``, and ``alpha`` ``[E, H]`` (``[E]`` with ``edge_head``) when
            ``return_attention_weights``.
        """
        if (
            kv is None
            and value is None
            and edge_bias is None
            and edge_head is None
            and not return_attention_weights
            and backend is None
            and (pos is None or isinstance(pos, Tensor))
        ):
            out = self._forward_dense(x, edge_index, pos)
            if out is not None:
                return out
        if not isinstance(return_attention_weights, bool):
            raise ValueError(f"Expected 'return_attention_weights' to be a bool (got {return_attention_weights!r})")
        if kv is not None:
            return self._forward_kv(
                x,
                edge_index,
                kv,
                edge_bias=edge_bias,
                pos=pos,
                edge_head=edge_head,
                return_attention_weights=return_attention_weights,
                backend=backend,
            )
        x_src, x_dst, edge_bias = self._check_forward(x, edge_index, value, edge_bias, edge_head)
        pos_src, pos_dst = self._positions(x, pos)
        query, key, value_h = self.project(x_dst, x_src, x_src if value is None else value)
        bipartite = not isinstance(x, Tensor)
        query = self.rotate(query, pos_dst, "pos[1]" if bipartite else "pos")
        key = self.rotate(key, pos_src, "pos[0]" if bipartite else "pos")
        return self._attend_and_project(
            query, key, value_h, edge_index, edge_bias, edge_head, return_attention_weights, backend
        )

    def _forward_dense(self, x, edge_index: Tensor, pos: Tensor | None) -> Tensor | None:
        """``forward(x, edge_index, pos=pos)`` in fewer steps where it is the commonest call:
        self-attention of one tensor ``x`` that ``auto`` runs through PyTorch's attention kernels
        (:func:`kernels.attend_dense`: a graph recognized as full or causal per document), in a
        layer that attends along the given graph with this class's own ``attend`` (no ``select``,
        softcap or active attention dropout; ``attend`` not replaced on the class or the instance,
        so that a wrapper of it sees every call). The same checks of ``x``, ``edge_index`` and
        ``pos``, the same projections and kernel as the general path, which takes the call where
        this returns ``None``."""
        if not (
            isinstance(x, Tensor)
            and isinstance(edge_index, Tensor)
            and self.backend == "auto"
            and self.select is None
            and self.softcap is None
            and not (self.training and self.dropout > 0.0)
            and self.project_kv
            and self.kdim == self.embed_dim == self.vdim
            and _own_route(self)
        ):
            return None
        _check_features(x, self.embed_dim, "x", self.out_proj.weight.dtype)
        num_nodes = x.size(0)
        check_edge_index(edge_index, num_nodes, num_nodes, x.device)
        query, key, value = self.project(x, x, x)
        query, key = self.rotate(query, pos), self.rotate(key, pos)
        scale = self._score_scale()
        out = kernels.attend_dense(query, key, value, edge_index, scale=scale)
        if out is None:  # not a graph SDPA runs: the general route, with these heads
            return self._attend_and_project(query, key, value, edge_index, None, None, False, None)
        return self.out_proj(out.reshape(num_nodes, self.q_dim))  # [N, C]

    def _positions(self, x, pos) -> tuple[Tensor | None, Tensor | None]:
        """``(pos_src, pos_dst)`` of a ``forward`` without ``kv``: ``pos`` for both on one node set,
        the pair's halves for a bipartite ``x = (x_src, x_dst)``."""
        if self.rotary is None and pos is None:
            return None, None
        if isinstance(x, Tensor):
            if isinstance(pos, (tuple, list)):
                raise ValueError(
                    f"Expected 'pos' to hold one position per node, shape [{x.size(0)}] (got "
                    "a pair: (pos_src, pos_dst) is for a bipartite input 'x' = (x_src, x_dst))"
                )
            return pos, pos
        if isinstance(pos, (tuple, list)) and len(pos) == 2:
            return pos[0], pos[1]
        got = type(pos).__name__ if pos is None or not isinstance(pos, Tensor) else list(pos.shape)
        raise ValueError(
            f"Expected 'pos' to be a pair (pos_src, pos_dst) for a bipartite input 'x' = (x_src, x_dst) (got {got})"
        )

    def _forward_kv(
        self,
        x: Tensor | tuple[Tensor, Tensor],
        edge_index: Tensor,
        kv: tuple[Tensor, Tensor],
        *,
        edge_bias: Tensor | None,
        pos: Tensor | tuple[Tensor, Tensor] | None,
        edge_head: Tensor | None,
        return_attention_weights: bool,
        backend: str | None,
    ):
        """``forward`` with the sources' keys and values given: only the queries are projected."""
        key, value_h, edge_bias = self._check_forward_kv(x, edge_index, kv, edge_bias, edge_head)
        assert isinstance(x, Tensor)  # refused by _check_forward_kv otherwise
        if isinstance(pos, (tuple, list)):
            raise ValueError(
                f"Expected 'pos' to hold one position per query node, shape [{x.size(0)}] (got "
                "a pair: with 'kv' only the query nodes' positions are used)"
            )
        query = self.rotate(self.project_query(x), pos)
        return self._attend_and_project(
            query, key, value_h, edge_index, edge_bias, edge_head, return_attention_weights, backend
        )

    def _check_forward(
        self, x, edge_index: Tensor, value: Tensor | None, edge_bias: Tensor | None, edge_head: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Checked ``(x_src, x_dst, edge_bias)`` of a ``forward`` without ``kv``."""
        if not self.project_kv:
            raise ValueError(
                f"Expected 'kv' (keys and values of the source nodes) for "
                f"{type(self).__name__} built with project_kv=False (got None): it "
                "has no key/value projection"
            )
        if isinstance(x, Tensor):
            x_src = x_dst = x
        elif isinstance(x, (tuple, list)) and len(x) == 2:
            x_src, x_dst = x
        else:
            got = f"a {type(x).__name__} of length {len(x)}" if isinstance(x, (tuple, list)) else type(x).__name__
            raise TypeError(f"Expected 'x' to be node features [N, C] or a pair (x_src, x_dst) (got {got})")
        weight_dtype = self.out_proj.weight.dtype
        _check_features(x_dst, self.embed_dim, "x" if isinstance(x, Tensor) else "x[1]", weight_dtype)
        if x_src is not x_dst or self.kdim != self.embed_dim:  # else checked just above
            _check_features(x_src, self.kdim, "x" if isinstance(x, Tensor) else "x[0]", weight_dtype)
        if value is not None:
            _check_features(value, self.vdim, "value", weight_dtype)
            if value.size(0) != x_src.size(0):
                raise ValueError(
                    f"Expected 'value' to have {x_src.size(0)} rows, one per source node (got {value.size(0)})"
                )
        elif self.vdim != self.kdim:
            raise ValueError(
                f"The layer has vdim={self.vdim} != kdim={self.kdim}: pass the value features with 'value='"
            )
        check_edge_index(edge_index, x_src.size(0), x_dst.size(0), x_dst.device)
        return x_src, x_dst, self._check_edge_bias(edge_bias, edge_index, x_dst.device, edge_head)

    def _check_forward_kv(
        self,
        x: Tensor | tuple[Tensor, Tensor],
        edge_index: Tensor,
        kv,
        edge_bias: Tensor | None,
        edge_head: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Checked ``(key, value, edge_bias)`` of a ``forward`` with ``kv``."""
        if not isinstance(x, Tensor):
            raise TypeError(
                f"Expected 'x' to be the query features [N_dst, C] when 'kv' is given (got {type(x).__name__})"
            )
        _check_features(x, self.embed_dim, "x", self.out_proj.weight.dtype)
        if not isinstance(kv, (tuple, list)) or len(kv) != 2:
            got = f"a {type(kv).__name__} of length {len(kv)}" if isinstance(kv, (tuple, list)) else type(kv).__name__
            raise TypeError(f"Expected 'kv' to be a pair (key, value) (got {got})")
        key, value_h = kv
        expected = [self.num_kv_heads, self.head_dim]
        for name, t in (("kv[0]", key), ("kv[1]", value_h)):
            if not isinstance(t, Tensor) or t.dim() != 3 or list(t.shape[1:]) != expected:
                found = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"Expected '{name}' to have shape [N_src, {expected[0]}, {expected[1]}] (got {found})")
        if key.size(0) != value_h.size(0):
            raise ValueError(
                f"Expected 'kv' keys and values for the same {key.size(0)} source nodes (got {value_h.size(0)} values)"
            )
        heads = self._heads_dtype(x.device)
        for name, t in (("kv[0]", key), ("kv[1]", value_h)):
            if t.dtype != heads:
                raise TypeError(f"Expected '{name}' in the dtype of the layer's queries, {heads} (got {t.dtype})")
        check_edge_index(edge_index, key.size(0), x.size(0), x.device)
        return key, value_h, self._check_edge_bias(edge_bias, edge_index, x.device, edge_head)

    def _heads_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype of the projected heads: the weights', or autocast's when it is on."""
        autocast = _autocast_dtype(device)
        return self.out_proj.weight.dtype if autocast is None else autocast

    def _check_edge_bias(
        self,
        edge_bias: Tensor | None,
        edge_index: Tensor,
        device: torch.device | None = None,
        edge_head: Tensor | None = None,
    ) -> Tensor | None:
        """Checked ``edge_bias``; a floating bias of another dtype than the heads is cast to the
        dtype the scores are computed in (float32; float64 for float64 heads), as the kernels do."""
        if edge_bias is None and edge_head is None:  # nothing to check, on any graph
            return None
        if kernels.is_block_structure(edge_index):
            kernels.check_implicit_options(edge_bias, edge_head)
            return None
        if edge_bias is None:
            return None
        expected = [edge_index.size(1), self.num_heads]
        shapes = [expected] if edge_head is None else [expected, expected[:1]]
        if not isinstance(edge_bias, Tensor) or list(edge_bias.shape) not in shapes:
            got = list(edge_bias.shape) if isinstance(edge_bias, Tensor) else type(edge_bias).__name__
            want = expected if edge_head is None else f"{expected[:1]} or {expected}"
            raise ValueError(f"Expected 'edge_bias' to have shape {want} (got {got})")
        if not edge_bias.is_floating_point():
            raise TypeError(
                f"Expected 'edge_bias' to be a floating-point tensor (got dtype "
                f"{edge_bias.dtype}); to remove edges, leave them out of 'edge_index' "
                "or give them a bias of -inf"
            )
        if device is not None and edge_bias.device != device:
            raise ValueError(
                f"Expected 'edge_bias' on the device of the node features, {device} (got device {edge_bias.device})"
            )
        if edge_bias.dtype != self.out_proj.weight.dtype:
            heads = self._heads_dtype(edge_bias.device)
            if edge_bias.dtype != heads:
                edge_bias = edge_bias.to(torch.float64 if heads == torch.float64 else torch.float32)
        return edge_bias

    def _attend_and_project(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        edge_index: Tensor,
        edge_bias: Tensor | None,
        edge_head: Tensor | None,
        return_attention_weights: bool,
        backend: str | None,
    ):
        num_dst = query.size(0)
        if self.select is not None:
            chosen = self._implicit_selection(
                query, key, edge_index, edge_head, edge_bias, return_attention_weights, backend
            )
            if chosen is not None:
                edge_index, edge_head = chosen, None
            else:
                edge_index, edge_head = self._selected_graph(query, key, edge_index, edge_head, edge_bias)
        out, alpha = self.attend(
            query,
            key,
            value,
            edge_index,
            edge_bias=edge_bias,
            edge_head=edge_head,
            need_weights=return_attention_weights,
            backend=backend,
        )
        out = self.out_proj(out.reshape(num_dst, self.q_dim))  # [N_dst, C]
        return (out, alpha) if return_attention_weights else out

    def _implicit_selection(
        self,
        query: Tensor,
        key: Tensor,
        edge_index,
        edge_head: Tensor | None,
        edge_bias: Tensor | None,
        need_weights: bool,
        backend: str | None,
    ):
        """The selection as an implicit graph (a per-head ``BlockGraph``), when ``select`` can give one
        (``select.implicit``, as :class:`~gnn_transformer.topology.dynamic.BlockTopK` does) and the
        call runs the tiled kernels on it: backend ``auto`` or ``tiled``, no weights, no attention
        dropout, no softcap; else ``None``."""
        implicit = getattr(self.select, "implicit", None)
        requested = self.backend if backend is None else backend
        if (
            not callable(implicit)
            or requested not in ("auto", "tiled")
            or need_weights
            or self.softcap is not None
            or (self.training and self.dropout > 0.0)
        ):
            return None
        self._check_select_inputs(edge_head, edge_bias)
        with torch.no_grad():
            return implicit(query.detach(), key.detach(), edge_index)

    def _check_select_inputs(self, edge_head: Tensor | None, edge_bias: Tensor | None) -> None:
        if edge_head is not None or edge_bias is not None:
            given = "edge_head" if edge_head is not None else "edge_bias"
            raise ValueError(
                f"Expected no '{given}' for a layer that selects its graph (select={self.select!r}): "
                "the selection decides which edges each head has"
            )

    def _selected_graph(
        self, query: Tensor, key: Tensor, edge_index: Tensor, edge_head: Tensor | None, edge_bias: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The per-head graph ``select`` chooses from the detached queries and keys, checked (an
        implicit ``edge_index`` is given to it materialized, within the edge budget)."""
        self._check_select_inputs(edge_head, edge_bias)
        if kernels.is_block_structure(edge_index):
            if edge_index.num_heads is not None:
                raise ValueError(
                    f"Expected a graph shared by every head for a layer that selects its graph "
                    f"(select={self.select!r}; got a per-head BlockGraph)"
                )
            edge_index = _materialized(edge_index)[0]
        with torch.no_grad():
            chosen = self.select(query.detach(), key.detach(), edge_index)
        if not (isinstance(chosen, (tuple, list)) and len(chosen) == 2 and all(isinstance(t, Tensor) for t in chosen)):
            raise ValueError(
                f"Expected 'select' ({self.select!r}) to return a pair (edge_index, edge_head) "
                f"(got {type(chosen).__name__})"
            )
        return chosen[0], chosen[1]  # shapes, devices and ranges: checked once, by kernels.head_inputs

    def resolve_backend(
        self,
        edge_index: Tensor,
        device: torch.device,
        backend: str | None = None,
        size: tuple[int, int] | None = None,
        dtype: torch.dtype | None = None,
        *,
        edge_bias: bool = False,
        need_weights: bool = False,
    ) -> str:
        """The kernel one call will run; ``size`` is ``(N_src, N_dst)``, by default the graph's,
        and ``dtype`` that of the projected heads, which sets the default tile size. Under
        ``"auto"`` it is :func:`gnn_transformer.kernels.auto_kernel`'s answer: ``"sdpa"`` for a graph
        of exactly full or causal attention per sequence or document (without an edge bias or
        dropout), ``"flex"`` for a long interval graph such as a sliding window on the GPU, else the
        cheapest of the project's backends."""
        backend = self.backend if backend is None else backend
        if backend not in BACKENDS:
            raise ValueError(f"Expected 'backend' to be one of {BACKENDS} (got {backend!r})")
        dropout_active = self.training and self.dropout > 0.0
        if backend == "pyg":
            return "pyg"
        if self.softcap is not None:  # the kernels compute no softcapping
            if backend == "auto":
                return "pyg"
            raise ValueError(
                f"Expected backend 'pyg' or 'auto' for a layer with softcap={self.softcap} (got "
                f"backend={backend!r}): the kernels do not compute attention logit softcapping"
            )
        if backend == "auto":
            num_src, num_dst = (None, None) if size is None else size
            return kernels.auto_kernel(
                edge_index,
                device,
                edge_bias=edge_bias,
                dropout=dropout_active,
                return_lse=need_weights,
                num_src=num_src,
                num_dst=num_dst,
                dtype=dtype,
                head_dim=self.head_dim,
            )
        return backend

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
        """Attention on already projected heads: ``[N_dst, H, D]`` out, optional ``[E, H]`` weights
        (``[E]`` on a per-head graph, ``edge_head``).

        The one hook between the readable message-passing path and the fused kernels. A per-head
        graph runs as a one-head graph on (head, token) nodes on every backend, ``pyg`` included.
        """
        implicit = kernels.is_block_structure(edge_index)
        if implicit:  # refused here too: attend is called without forward's checks (variants, tests)
            kernels.check_implicit_options(edge_bias, edge_head)
        if edge_head is not None:
            return self._attend_per_head(query, key, value, edge_index, edge_head, edge_bias, need_weights, backend)
        if implicit:
            return self._attend_implicit(query, key, value, edge_index, need_weights, backend)
        size = (key.size(0), query.size(0))
        requested = self.backend if backend is None else backend
        resolved = requested  # "auto": the kernels plan the call (SDPA is not a backend a caller names)
        if requested != "auto" or self.softcap is not None:
            resolved = self.resolve_backend(
                edge_index,
                query.device,
                backend,
                size,
                query.dtype,
                edge_bias=edge_bias is not None,
                need_weights=need_weights,
            )
        scale = self._score_scale()
        if resolved == "pyg":
            # half precision is computed in float32, as on every backend: bfloat16 scores of large
            # inputs round by far more than the gaps between them
            dtype = query.dtype
            cd = torch.float64 if dtype == torch.float64 else torch.float32
            group = query.size(1) // key.size(1)
            query = query.to(cd)  # [N_dst, H, D]
            key = key.to(cd).repeat_interleave(group, dim=1)  # [N_src, H, D]
            value = value.to(cd).repeat_interleave(group, dim=1)  # [N_src, H, D]
            if edge_index.dtype != torch.long:  # PyG's scatter takes int64 indices (the kernels take int32 too)
                edge_index = edge_index.long()
            alpha = self.edge_updater(
                edge_index, query=query, key=key, edge_bias=edge_bias, scale=scale, softcap=self.softcap, size=size
            )  # [E, H]
            weights = alpha.to(dtype)
            alpha = F.dropout(alpha, p=self.dropout, training=self.training)
            out = self.propagate(edge_index, value=value, alpha=alpha, size=size)  # [N_dst, H, D]
            return out.to(dtype), (weights if need_weights else None)

        dropout_p = self.dropout if self.training else 0.0
        result = kernels.attend(
            query,
            key,
            value,
            edge_index,
            scale=scale,
            edge_bias=edge_bias,
            backend=resolved,
            num_dst=query.size(0),
            return_lse=need_weights,
            dropout_p=dropout_p,
        )
        if not need_weights:
            return result, None
        out, lse = result
        return out, kernels.edge_weights(query, key, edge_index, lse, scale=scale, edge_bias=edge_bias)

    def _attend_implicit(
        self, query: Tensor, key: Tensor, value: Tensor, graph, need_weights: bool, backend: str | None
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`attend` on an implicit graph (a ``BlockGraph``): its tiles through the kernels; the
        ``pyg`` backend (and softcap) and attention weights run on its materialized edges (weights in
        the order of ``graph.edges()``), refused past the edge budget."""
        requested = self.backend if backend is None else backend
        resolved = self.resolve_backend(
            graph, query.device, backend, (key.size(0), query.size(0)), query.dtype, need_weights=need_weights
        )
        if resolved == "pyg" or need_weights:
            edge_index, edge_head = _materialized(graph)
            return self.attend(
                query, key, value, edge_index, edge_head=edge_head, need_weights=need_weights, backend=backend
            )
        scale = self._score_scale()
        out = kernels.attend(
            query,
            key,
            value,
            graph,
            scale=scale,
            backend="auto" if requested == "auto" else resolved,
            num_dst=query.size(0),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return out, None

    def _attend_per_head(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        edge_index: Tensor,
        edge_head: Tensor,
        edge_bias: Tensor | None,
        need_weights: bool,
        backend: str | None,
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`attend` on a per-head graph: one head on (head, token) nodes, then ``[N_dst, H, D]``
        and weights ``[E]``."""
        num_heads = query.size(1)
        index, bias = kernels.head_inputs(query, key, edge_index, edge_head, edge_bias)
        out, weights = self.attend(
            kernels.heads_to_nodes(query),
            kernels.heads_to_nodes(key),
            kernels.heads_to_nodes(value),
            index,
            edge_bias=bias,
            need_weights=need_weights,
            backend=backend,
        )  # [H N_dst, 1, D]
        return kernels.nodes_to_heads(out, num_heads), (None if weights is None else weights[:, 0])

    # ------------------------------------------------------------------ message passing
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
        alpha = (query_i * key_j).sum(dim=-1) * scale  # [E, H]
        if softcap is not None:
            alpha = torch.tanh(alpha / softcap) * softcap  # [E, H], in (-softcap, softcap)
        if edge_bias is None:
            return softmax(alpha, index, ptr, size_i)  # [E, H], sums to 1 over each target's edges
        # a -inf bias removes its edge; a row of removed edges is empty (as on every backend)
        return edge_softmax(alpha + edge_bias, index, ptr, size_i)

    def message(self, value_j: Tensor, alpha: Tensor) -> Tensor:
        return alpha.unsqueeze(-1) * value_j  # [E, H, D]

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.embed_dim}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, backend={self.backend!r}"
            f"{'' if self.q_dim == self.embed_dim else f', head_dim={self.head_dim}'}"
            f"{'' if self.scale is None else f', scale={self.scale}'}"
            f"{'' if self.softcap is None else f', softcap={self.softcap}'}"
            f"{', rope=True' if self.rotary is not None else ''}"
            f"{'' if self.select is None else f', select={self.select!r}'}"
            f"{'' if self.project_kv else ', project_kv=False'})"
        )
