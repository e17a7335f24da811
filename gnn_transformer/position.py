r"""Positions on token graphs: every node carries its own position ``pos`` (an int per node).

A token graph has no order of its own, so position enters in one of four ways:

- **sinusoidal** absolute embeddings (Vaswani et al. 2017), added to the node features:
  :math:`PE(p, 2k) = \sin(p / b^{2k/C})`, :math:`PE(p, 2k+1) = \cos(p / b^{2k/C})`;
- **learned** absolute embeddings: one trained vector per position (BERT, GPT-2);
- **RoPE** (Su et al. 2021): queries and keys are rotated by their node's position, so the score
  of an edge ``j -> i`` depends on ``pos_i - pos_j`` only (see ``GraphMultiheadAttention(rope=True)``),
  with the frequency scalings of long-context models (:class:`RopeScaling`: linear, dynamic NTK,
  Llama 3, YaRN, LongRoPE) and partial rotation;
- **ALiBi** (Press et al. 2022): an ``edge_bias`` ``-m_h |pos_i - pos_j|`` per edge and head, with the
  geometric slopes ``m_h`` of the paper.

Positions usually come from a node's index within its sequence (``pos = arange(L)`` per sequence),
but any integer per node works (e.g. positions in a tree or on a grid).

Notation: ``N`` nodes, ``E`` edges, ``H`` heads, ``D`` head dimension, ``C`` feature dimension.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def _check_pos(pos: Tensor, name: str = "pos") -> None:
    if not isinstance(pos, Tensor) or pos.dim() != 1:
        got = list(pos.shape) if isinstance(pos, Tensor) else type(pos).__name__
        raise ValueError(f"Expected '{name}' to be a 1-D tensor, one position per node (got {got})")


def check_base(base: object, name: str = "base") -> float:
    """``base`` if it is a finite number above 1 (the frequency base of RoPE / sinusoids)."""
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not 1.0 < base < math.inf:
        raise ValueError(f"Expected '{name}' to be a finite number > 1 (got {base!r})")
    return base


def sinusoidal_embedding(pos: Tensor, dim: int, base: float = 10000.0, dtype: torch.dtype | None = None) -> Tensor:
    r"""Sinusoidal embeddings ``[N, dim]`` of the positions ``pos`` ``[N]`` (computed in float64,
    returned in ``dtype``, default ``torch.get_default_dtype()``).

    Example:
        >>> sinusoidal_embedding(torch.tensor([0, 1]), 4)
        tensor([[0.0000, 1.0000, 0.0000, 1.0000],
                [0.8415, 0.5403, 0.0100, 0.9999]])
    """
    _check_pos(pos)
    if dim <= 0 or dim % 2:
        raise ValueError(f"Expected 'dim' to be a positive even int (got {dim})")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)  # [C/2]
    angle = pos.to(torch.float64).unsqueeze(-1) * freq  # [N, C/2]
    out = torch.stack([angle.sin(), angle.cos()], dim=-1)  # [N, C/2, 2]: sin at even, cos at odd
    return out.reshape(pos.size(0), dim).to(dtype)


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed sinusoidal position embeddings: ``forward(pos [N]) -> [N, dim]`` (no parameters).

    Args:
        dim: embedding size (even).
        base: frequency base. Default ``10000.0``.
    """

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 2:
            raise ValueError(f"Expected 'dim' to be a positive even int (got {dim!r})")
        self.dim, self.base = dim, check_base(base)

    def forward(self, pos: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        return sinusoidal_embedding(pos, self.dim, self.base, dtype)


def checked_lookup(lookup: Callable[[Tensor], Tensor], ids: Tensor, check: Callable[[], None]) -> Tensor:
    """``lookup(ids)`` of a table, with ``check()`` raising the clear error for an id outside it. On
    the CPU it runs only when the lookup's own bounds check fails (valid ids cost no extra pass);
    elsewhere first, as an index out of range there is an asynchronous device error."""
    if ids.device.type != "cpu":
        check()
        return lookup(ids)
    try:
        return lookup(ids)
    except IndexError:
        check()
        raise


class LearnedPositionalEmbedding(nn.Embedding):
    """One learned vector per position, ``forward(pos [N]) -> [N, dim]`` (an ``nn.Embedding``).

    Args:
        max_positions: number of positions (``pos`` must be in ``[0, max_positions)``).
        dim: embedding size.
    """

    def __init__(self, max_positions: int, dim: int, device=None, dtype=None) -> None:
        super().__init__(max_positions, dim, device=device, dtype=dtype)

    def forward(self, pos: Tensor) -> Tensor:
        _check_pos(pos)
        return checked_lookup(super().forward, pos, lambda: self._check_range(pos))

    def _check_range(self, pos: Tensor) -> None:
        if pos.numel():
            lo, hi = (int(v) for v in torch.aminmax(pos))  # one pass over the positions
            if lo < 0 or hi >= self.num_embeddings:
                raise ValueError(f"Expected 'pos' in [0, {self.num_embeddings}) (got values in [{lo}, {hi}])")


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension (the half-split RoPE layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
LENGTH_DEPENDENT = ("dynamic", "longrope")  # rope types whose frequencies depend on the call's longest position


@dataclass(frozen=True)
class RopeScaling:
    r"""How the rotary frequencies of a model are scaled (the ``rope_type`` of Hugging Face configs).

    - ``"default"``: :math:`\theta_k = b^{-2k/d}`;
    - ``"linear"`` (position interpolation, Chen et al. 2023): :math:`\theta_k / s`;
    - ``"dynamic"`` (dynamic NTK): the base grows with the longest position of the call, ``L =
      max(pos) + 1``, once it exceeds ``max_position_embeddings`` ``M``:
      :math:`b' = b \, (s L / M - (s - 1))^{d / (d - 2)}`;
    - ``"llama3"``: low frequencies (wavelength above ``original / low_freq_factor``) divided by
      ``s``, high ones (below ``original / high_freq_factor``) kept, smooth in between;
    - ``"yarn"`` (Peng et al. 2023): interpolated and extrapolated frequencies blended by a linear
      ramp between the dimensions of ``beta_fast`` and ``beta_slow`` rotations over
      ``original_max_position_embeddings``; ``cos`` and ``sin`` scaled by ``attention_factor``
      (default ``0.1 ln s + 1``, or the ``mscale`` / ``mscale_all_dim`` ratio);
    - ``"longrope"`` (LongRoPE, Ding et al. 2024; Phi-3, Phi-3.5): one rescale factor per frequency,
      :math:`\theta_k / \lambda_k` with :math:`\lambda` the ``short_factor`` while ``L = max(pos) + 1``
      of the call is at most ``original_max_position_embeddings`` ``M_0``, the ``long_factor``
      beyond; ``cos`` and ``sin`` scaled by ``attention_factor`` (default
      :math:`\sqrt{1 + \ln s / \ln M_0}` for ``s > 1``, else ``1``).

    ``d`` is the number of rotated dimensions, ``s`` = ``factor``.
    """

    rope_type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0  # s (linear, dynamic, llama3, yarn)
    max_position_embeddings: int | None = None  # M (dynamic; yarn's default factor)
    original_max_position_embeddings: int | None = None  # context of pretraining (llama3, yarn)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: scale of cos and sin (None: from factor)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn: round the ramp's bounds to whole dimensions
    short_factor: tuple[float, ...] | None = None  # longrope: d/2 rescale factors up to the original length
    long_factor: tuple[float, ...] | None = None  # longrope: d/2 rescale factors beyond it

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"Expected 'rope_type' to be one of {ROPE_TYPES} (got {self.rope_type!r})")
        if self.rope_type != "default":
            check_real_positive("factor", self.factor)
        needs = {
            "dynamic": ("max_position_embeddings",),
            "llama3": ("original_max_position_embeddings",),
            "yarn": ("original_max_position_embeddings",),
            "longrope": ("original_max_position_embeddings",),
        }.get(self.rope_type, ())
        for name in needs:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"Expected '{name}' to be a positive int for rope_type {self.rope_type!r} (got {value!r})"
                )
        if self.rope_type == "llama3" and not self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                f"Expected 'low_freq_factor' < 'high_freq_factor' for rope_type 'llama3' (got "
                f"{self.low_freq_factor!r} and {self.high_freq_factor!r})"
            )
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if self.rope_type != "longrope":
                if value is not None:
                    raise ValueError(
                        f"Expected '{name}' only with rope_type 'longrope' (got {name}={value!r} "
                        f"and rope_type {self.rope_type!r})"
                    )
                continue
            if (
                isinstance(value, (str, bytes))
                or not isinstance(value, (list, tuple))
                or not value
                or not all(
                    not isinstance(x, bool) and isinstance(x, (int, float)) and 0.0 < x < math.inf for x in value
                )
            ):
                raise ValueError(
                    f"Expected '{name}' to be a non-empty sequence of finite numbers > 0 for rope_type "
                    f"'longrope' (got {value!r})"
                )
            object.__setattr__(self, name, tuple(float(x) for x in value))  # hashable, as the dataclass is frozen
        if self.rope_type == "longrope":
            assert self.short_factor is not None and self.long_factor is not None  # checked above
            if len(self.short_factor) != len(self.long_factor):
                raise ValueError(
                    f"Expected 'short_factor' and 'long_factor' of one length, d/2 (got "
                    f"{len(self.short_factor)} and {len(self.long_factor)})"
                )
            if self.attention_factor is not None:
                check_real_positive("attention_factor", self.attention_factor)

    def check_dim(self, dim: int) -> None:
        """A ``ValueError`` unless the scaling fits ``dim`` rotated dimensions (LongRoPE: ``dim / 2`` factors)."""
        if self.short_factor is not None and len(self.short_factor) != dim // 2:
            raise ValueError(
                f"Expected 'short_factor' and 'long_factor' of {dim // 2} numbers for {dim} rotated "
                f"dimensions (got {len(self.short_factor)})"
            )


def check_real_positive(name: str, value: object) -> float:
    """``float(value)`` if it is a finite number above 0, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < math.inf:
        raise ValueError(f"Expected '{name}' to be a finite number > 0 (got {value!r})")
    return float(value)


def rope_inv_freq(
    dim: int, base: float, scaling: RopeScaling | None = None, seq_len: int | None = None, device=None
) -> tuple[Tensor, float]:
    r"""The rotary inverse frequencies ``[dim / 2]`` (float32) of ``dim`` rotated dimensions, and the
    factor that scales ``cos`` and ``sin`` (``1`` except for YaRN and LongRoPE), as Hugging Face computes
    them.

    ``seq_len``: ``max(pos) + 1`` of the call (``"dynamic"`` and ``"longrope"`` only; ``None``: not
    beyond the original context).

    Example:
        >>> rope_inv_freq(4, 100.0, RopeScaling("linear", factor=2.0))
        (tensor([0.5000, 0.0500]), 1.0)
    """
    scaling = RopeScaling() if scaling is None else scaling
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim  # [d/2]
    kind, factor = scaling.rope_type, scaling.factor
    if kind == "dynamic":
        m = scaling.max_position_embeddings
        assert m is not None  # RopeScaling requires it for "dynamic"
        length = m if seq_len is None else max(seq_len, m)
        base = base * ((factor * length / m) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base**exponent)  # [d/2]
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        old = scaling.original_max_position_embeddings
        assert old is not None  # RopeScaling requires it for "llama3"
        low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(dim, base, scaling, device)
    if kind == "longrope":
        return _longrope(dim, base, scaling, seq_len, device)
    return inv_freq, 1.0


def _longrope(dim: int, base: float, scaling: RopeScaling, seq_len: int | None, device) -> tuple[Tensor, float]:
    """LongRoPE's rescaled inverse frequencies and attention factor (see :class:`RopeScaling`)."""
    scaling.check_dim(dim)
    original = scaling.original_max_position_embeddings
    assert original is not None and scaling.short_factor is not None and scaling.long_factor is not None
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        factor = scaling.factor
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    long = seq_len is not None and seq_len > original
    ext_factors = torch.tensor(
        scaling.long_factor if long else scaling.short_factor, dtype=torch.float32, device=device
    )  # [d/2]
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim  # [d/2]
    return 1.0 / (ext_factors * base**exponent), float(attention_factor)


def _yarn(dim: int, base: float, scaling: RopeScaling, device) -> tuple[Tensor, float]:
    """YaRN's blended inverse frequencies and attention factor (see :class:`RopeScaling`)."""
    factor, original = scaling.factor, scaling.original_max_position_embeddings
    assert original is not None  # RopeScaling requires it for "yarn"

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.attention_factor
    if attention_factor is None:
        if scaling.mscale and scaling.mscale_all_dim:
            attention_factor = float(mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim))
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)  # [d/2]
    extrapolation = 1 - ramp  # 1: keep the frequency, 0: interpolate it
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    r"""Rotary position embedding of per-head vectors ``[N, H, D]`` by per-node positions ``[N]``.

    Dimension ``k`` and ``k + D/2`` form a plane rotated by the angle ``pos * base^{-2k/D}``
    (the half-split layout of GPT-NeoX / LLaMA). Rotating queries and keys makes the score of an
    edge depend only on the position difference ``pos_i - pos_j``. No parameters, no buffers.

    With ``scaling`` (a :class:`RopeScaling`) the frequencies, and for YaRN the magnitude of
    ``cos`` and ``sin``, are those of :func:`rope_inv_freq`, computed as Hugging Face does (angles
    ``pos * inv_freq`` in float32 at least). With ``rotary_dim`` ``R < D`` only the first ``R``
    dimensions are rotated (the half-split layout within them) and the others pass unchanged
    (partial rotary embedding, Phi-3's ``partial_rotary_factor``).

    The frequencies of ``"dynamic"`` and ``"longrope"`` scalings depend on the length of the call,
    ``L = max(pos) + 1`` over all the nodes given at once, as Hugging Face decides on the largest
    ``position_ids`` of its batch: every sequence of a batch gets the frequencies of the longest one
    (LongRoPE: the ``long_factor`` for all of them once any position reaches
    ``original_max_position_embeddings``). Padding is no node of the graph, so, unlike Hugging Face's
    padded ``position_ids``, it never counts. In cached decoding each call rotates its own new keys
    and queries, so cached keys keep the frequencies of the call that computed them, as Hugging
    Face's forward does on its cache (its Phi-3 ``generate``, and
    :meth:`gnn_transformer.hf.GraphDecoderLM.generate`, instead recompute the whole cache once, at
    the first step past ``original_max_position_embeddings``).

    Example:
        >>> rope = RotaryEmbedding(4)
        >>> q = torch.randn(3, 2, 4)
        >>> torch.allclose(rope(q, torch.zeros(3)), q)  # position 0: identity
        True
    """

    def __init__(
        self, dim: int, base: float = 10000.0, *, scaling: RopeScaling | None = None, rotary_dim: int | None = None
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 2:
            raise ValueError(f"Expected 'dim' to be a positive even int (got {dim!r})")
        rotary_dim = dim if rotary_dim is None else rotary_dim
        if (
            isinstance(rotary_dim, bool)
            or not isinstance(rotary_dim, int)
            or not 0 < rotary_dim <= dim
            or rotary_dim % 2
        ):
            raise ValueError(f"Expected 'rotary_dim' to be a positive even int <= dim={dim} (got {rotary_dim!r})")
        if scaling is not None and not isinstance(scaling, RopeScaling):
            raise ValueError(f"Expected 'scaling' to be a RopeScaling or None (got {scaling!r})")
        if scaling is not None:
            scaling.check_dim(rotary_dim)
        self.dim, self.base = dim, check_base(base)
        self.scaling, self.rotary_dim = scaling, rotary_dim

    def cos_sin(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``cos`` and ``sin`` ``[N, 1, R]`` of the rotation angles, in ``dtype``. The angles are
        computed in float32 at least: bfloat16 cannot even hold position 257."""
        ad = torch.promote_types(dtype, torch.float32)
        if self.scaling is None:
            inv_freq = self.base ** (
                -torch.arange(0, self.rotary_dim, 2, dtype=ad, device=pos.device) / self.rotary_dim
            )  # [R/2]
            magnitude = 1.0
        else:
            by_length = self.scaling.rope_type in LENGTH_DEPENDENT and pos.numel() > 0
            seq_len = int(pos.max()) + 1 if by_length else None
            inv_freq, magnitude = rope_inv_freq(self.rotary_dim, self.base, self.scaling, seq_len, pos.device)
            inv_freq = inv_freq.to(ad)  # [R/2]
        angle = pos.to(ad).unsqueeze(-1) * inv_freq  # [N, R/2]
        angle = torch.cat([angle, angle], dim=-1).unsqueeze(1)  # [N, 1, R]
        if magnitude != 1.0:
            return (angle.cos() * magnitude).to(dtype), (angle.sin() * magnitude).to(dtype)
        return angle.cos().to(dtype), angle.sin().to(dtype)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        _check_pos(pos)
        if x.dim() != 3 or x.size(-1) != self.dim or x.size(0) != pos.size(0):
            raise ValueError(f"Expected 'x' of shape [{pos.size(0)}, H, {self.dim}] (got {list(x.shape)})")
        cos, sin = self.cos_sin(pos, x.dtype)
        if self.rotary_dim == self.dim:
            return x * cos + rotate_half(x) * sin  # [N, H, D]
        x_rot, x_pass = x[..., : self.rotary_dim], x[..., self.rotary_dim :]  # [N, H, R], [N, H, D - R]
        return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)  # [N, H, D]

    def extra_repr(self) -> str:
        extra = "" if self.rotary_dim == self.dim else f", rotary_dim={self.rotary_dim}"
        if self.scaling is not None and self.scaling.rope_type != "default":
            extra += f", scaling={self.scaling.rope_type!r}"
        return f"{self.dim}, base={self.base}{extra}"


def alibi_slopes(num_heads: int) -> Tensor:
    r"""ALiBi's per-head slopes: :math:`m_h = 2^{-8h/H}` for ``H`` a power of two; otherwise those
    of the next lower power of two followed by every other slope of twice as many heads.

    Example:
        >>> alibi_slopes(4)
        tensor([0.2500, 0.0625, 0.0156, 0.0039])
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"Expected 'num_heads' to be a positive int (got {num_heads!r})")
    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = [2.0 ** (-8.0 * (h + 1) / closest) for h in range(closest)]
    if closest < num_heads:
        extra = [2.0 ** (-8.0 * (h + 1) / (2 * closest)) for h in range(2 * closest)]
        slopes += extra[0::2][: num_heads - closest]
    return torch.tensor(slopes)


def alibi_edge_bias(
    edge_index: Tensor, pos_src: Tensor, pos_dst: Tensor | None = None, slopes: Tensor | int = 1
) -> Tensor:
    r"""ALiBi as an ``edge_bias`` ``[E, H]``: :math:`b_{ji}^h = -m_h \, |pos_i - pos_j|`.

    For a causal graph this is the paper's ``-m (i - j)``; for a bidirectional graph the symmetric
    distance. ``slopes`` is ``[H]`` or a number of heads (then :func:`alibi_slopes`).

    Example:
        >>> ei = torch.tensor([[0, 0, 1], [0, 1, 1]])
        >>> alibi_edge_bias(ei, torch.arange(2), slopes=torch.tensor([0.5]))
        tensor([[-0.0000],
                [-0.5000],
                [-0.0000]])
    """
    pos_dst = pos_src if pos_dst is None else pos_dst
    _check_pos(pos_src, "pos_src")
    _check_pos(pos_dst, "pos_dst")
    if not isinstance(slopes, Tensor):
        slopes = alibi_slopes(slopes)
    ei = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    dtype = slopes.dtype if slopes.is_floating_point() else torch.get_default_dtype()
    dist = (pos_dst[ei[1]] - pos_src[ei[0]]).abs().to(dtype)  # [E]
    return -dist.unsqueeze(-1) * slopes.to(device=dist.device, dtype=dtype)  # [E, H]
