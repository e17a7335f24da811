"""Triton helpers the ``fused`` and ``tiled`` kernels share (:mod:`.fused_triton`,
:mod:`.tiled_triton`): the online softmax in ``m_i`` / ``l_i`` / ``acc`` (``softmax_step``,
``softmax_finish``), the backward pass's row statistics, the dropout keep mask, IEEE ``tl.dot``, the
program's rows, and the scalar arguments every launch passes; and the one place where the kernels
are launched (:func:`launch`), which inside :func:`recording` keeps each launch instead, so that
:mod:`gnn_transformer.bench.compile_check` can compile exactly what the kernels' wrappers would
launch, for a GPU, on a machine without one. Importing this module needs Triton.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._dropout import threshold
from .primitives import compute_dtype


@triton.jit
def load_scales(SCALES, ACC: tl.constexpr):
    """``(softmax scale, dropout keep scale)`` from the ``[2]`` tensor of :func:`scalars`, in the
    accumulation dtype (a float argument would reach the kernel as float32)."""
    return tl.load(SCALES).to(ACC), tl.load(SCALES + 1).to(ACC)


@triton.jit
def work(START, END, MAP, MAPPED: tl.constexpr):
    """``(r, o, start, end)`` of this program (axis 0): it walks items ``start:end`` of row ``r`` and
    writes row ``o`` of its outputs. The main launch (``r = o``) reads ``START`` / ``END`` of its
    row; a launch of pieces (``MAPPED``, :mod:`._pieces`) reads the row of piece ``o`` from ``MAP``
    and writes row ``o`` of partial buffers."""
    o = tl.program_id(0).to(tl.int64)  # row offsets pass 2**31 elements at scale
    start = tl.load(START + o)
    end = tl.load(END + o)
    if MAPPED:
        r = tl.load(MAP + o).to(tl.int64)
    else:
        r = o
    return r, o, start, end


@triton.jit
def _two_sum(m, log_l):
    """``(lse, lo)``: ``m + log_l`` rounded and what the rounding lost (Knuth's two-sum, exact;
    see :mod:`.primitives`)."""
    lse = m + log_l
    b = lse - m
    return lse, (m - (lse - b)) + (log_l - b)


@triton.jit
def row_lse(m, l):
    """``(lse, lse_lo, nonempty, l_safe)`` of rows with running max ``m`` and sum ``l``: ``-inf``
    and 0 on empty rows."""
    nonempty = l > 0
    l_safe = tl.where(nonempty, l, 1.0)
    lse, lo = _two_sum(tl.where(nonempty, m, 0.0), tl.log(l_safe))  # no -inf - -inf on empty rows
    return tl.where(nonempty, lse, float("-inf")), tl.where(nonempty, lo, 0.0), nonempty, l_safe


@triton.jit
def row_lse_pair(LSE, LSE_LO, idx, mask, ACC: tl.constexpr):
    """``(lse, lse_lo)`` of the forward pass at offsets ``idx`` (``row * H + head``) in ``ACC``; an
    empty row's ``-inf`` lse reads as 0 (its weights are 0 all the same, and no NaN appears)."""
    lse = tl.load(LSE + idx, mask=mask, other=0.0).to(ACC)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    return lse, tl.load(LSE_LO + idx, mask=mask, other=0.0).to(ACC)


@triton.jit
def row_stats(LSE, LSE_LO, DELTA, idx, mask, ACC: tl.constexpr):
    """``(lse, lse_lo, pivot, delta)`` of the backward pass at offsets ``idx`` (``row * H + head``)
    in ``ACC``. Weights are ``exp((s - lse) - lse_lo)`` and ``ds = p ((dp - pivot) - delta)``;
    ``DELTA`` holds ``[N_dst, H, 2]`` pairs ``(pivot, delta)`` (:func:`store_row_terms`)."""
    lse, lo = row_lse_pair(LSE, LSE_LO, idx, mask, ACC)
    pivot, delta = row_terms_at(DELTA, idx, mask, ACC)
    return lse, lo, pivot, delta


@triton.jit
def row_terms_at(DELTA, idx, mask, ACC: tl.constexpr):
    """``(pivot, delta)`` of :func:`row_stats` alone."""
    pivot = tl.load(DELTA + 2 * idx, mask=mask, other=0.0).to(ACC)
    return pivot, tl.load(DELTA + 2 * idx + 1, mask=mask, other=0.0).to(ACC)


@triton.jit
def pivot_step(m, c, s, dp, AXIS: tl.constexpr):
    """The pivot ``c`` of rows whose running largest score was ``m``, after a block of scores ``s``
    and their ``dp`` (reduced along ``AXIS``): ``dp`` at the block's largest score (the largest such
    ``dp`` on ties) where that score is a new maximum, else ``c``."""
    top = tl.max(s, axis=AXIS)
    if AXIS == 1:
        at_top = tl.where(s == top[:, None], dp, float("-inf"))
    else:
        at_top = tl.where(s == top, dp, float("-inf"))
    return tl.where(top > m, tl.max(at_top, axis=AXIS), c)


@triton.jit
def store_row_terms(DELTA, idx, pivot, delta, mask):
    """Write the ``(pivot, delta)`` pairs :func:`row_stats` reads."""
    tl.store(DELTA + 2 * idx, pivot, mask=mask)
    tl.store(DELTA + 2 * idx + 1, delta, mask=mask)


def row_terms(n_dst: int, num_heads: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Uninitialized ``[N_dst, H, 2]`` pairs ``(pivot, delta)`` of the backward's row kernels."""
    return torch.empty(n_dst, num_heads, 2, dtype=dtype, device=device)


@triton.jit
def _mix(x):
    """``lowbias32`` on uint32 (the same steps as :func:`._dropout._mix`)."""
    x = x ^ (x >> 16)
    x = x * tl.full((1,), 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((1,), 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def keep(SEED, edge, h, THRESH):
    """Whether the weight of each ``edge`` (int64 positions) and head ``h`` survives dropout: the
    hash of :func:`._dropout.keep_hash`, bit for bit."""
    edge = edge.to(tl.int64)
    x = SEED.to(tl.uint32) ^ (h.to(tl.uint32) * tl.full((1,), 0x9E3779B9, tl.uint32))
    x = _mix(x)
    x = _mix(x ^ (edge >> 32).to(tl.uint32))
    x = _mix(x ^ (edge & 0xFFFFFFFF).to(tl.uint32))
    return x.to(tl.int64) >= THRESH


@triton.jit
def dot(a, b, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in ``ACC`` with IEEE products (no TF32); ``UPCAST`` runs bfloat16
    operands in float32 (the CPU interpreter has no bfloat16 matmul)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee", out_dtype=ACC)


@triton.jit
def softmax_step(m, l, s):
    """One block of an online softmax over the rows of ``s`` ``[R, C]``: ``(m_new, l_new, corr, p)``
    with ``p = exp(s - m_new)`` (rows still at ``-inf`` use 0) and ``corr`` the rescaling of what
    was accumulated under ``m``."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    corr = tl.exp(m - m_use)
    p = tl.exp(s - m_use[:, None])
    return m_new, l * corr + tl.sum(p, axis=1), corr, p


@triton.jit
def softmax_finish(m, l, acc):
    """``(out, lse, lse_lo)`` of rows accumulated by :func:`softmax_step`; zeros, ``-inf`` and 0 on
    empty rows."""
    lse, lo, _, l_safe = row_lse(m, l)
    return acc / l_safe[:, None], lse, lo


# The backward pass walks a row's edges once more, for exactly normalized weights and a delta made
# of them (:func:`.fused_triton._csr_bwd_rows`), where the row's log-sum-exp is at least this large.
EXACT_ROWS_LSE = {torch.float32: 128.0, torch.float64: 2.0**19}


def upcast(q: Tensor) -> bool:
    """bfloat16 ``tl.dot`` operands in float32: the CPU interpreter has no bfloat16 matmul."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16


def acc_type(dtype: torch.dtype):
    """The ``tl`` accumulation dtype of inputs of ``dtype`` (:func:`.primitives.compute_dtype`)."""
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


@functools.lru_cache(maxsize=256)
def _scales_tensor(scale: float, keep: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[scale, keep]`` on ``device``, made once per value (no host-to-device copy per call)."""
    return torch.tensor([scale, keep], dtype=dtype, device=device)


def canonical(x: Tensor) -> Tensor:
    """``x`` with the strides of a fresh contiguous tensor. ``contiguous()`` keeps any stride of a
    dimension of size 1 (a single query sliced from a fused projection), but the kernels write the
    partial buffers of pieces with the input's row stride, so it must be that of a buffer."""
    x = x.contiguous()  # [N, H, D]
    _, h, d = x.shape
    return x if x.stride() == (h * d, d, 1) else x.clone(memory_format=torch.contiguous_format)


def scalars(
    scale: float, dropout: tuple[float, int] | None, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, int, int]:
    """``(scales, seed, threshold)`` kernel arguments: ``scales = [scale, 1 / (1 - p)]`` as a tensor in
    the accumulation ``dtype`` (Triton passes a Python float as float32, which float64 results would
    show), and the dropout seed and threshold (placeholders without dropout)."""
    keep_scale = 1.0 if dropout is None else 1.0 / (1.0 - dropout[0])
    values = _scales_tensor(float(scale), keep_scale, dtype, torch.device(device))
    if dropout is None:
        return values, 0, 0
    return values, int(dropout[1]), threshold(dropout[0])


def empty_outputs(q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialized ``(out [N_dst, H, D], lse [N_dst, H], lse_lo [N_dst, H])`` of a forward kernel:
    ``out`` like ``q``, the log-sum-exp pair in the accumulation dtype."""
    out = torch.empty_like(q)
    lse = torch.empty(q.size(0), q.size(1), dtype=compute_dtype(q.dtype), device=q.device)
    return out, lse, torch.empty_like(lse)


class Launch(NamedTuple):
    """One kernel launch: the ``@triton.jit`` function, its grid, arguments and constexprs."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    meta: dict[str, Any]


_STATE = threading.local()


def launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``, or the launch recorded inside :func:`recording`."""
    record = getattr(_STATE, "record", None)
    if record is not None:
        record.append(Launch(kernel, tuple(grid), args, meta))
        return
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):  # Triton launches on the current device: make it the tensors'
            kernel[grid](*args, **meta)
        return
    kernel[grid](*args, **meta)


def is_recording() -> bool:
    """Whether this thread is inside :func:`recording` (no kernel runs, so CPU tensors may stand in
    for GPU ones without the Triton interpreter)."""
    return getattr(_STATE, "record", None) is not None


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Collect the launches of this thread into the yielded list instead of running them."""
    previous = getattr(_STATE, "record", None)
    _STATE.record = []
    try:
        yield _STATE.record
    finally:
        _STATE.record = previous
