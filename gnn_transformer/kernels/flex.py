"""Interval graphs through FlexAttention: every target ``i`` hears the sources ``lo[i] ... hi[i]``.

Sliding windows, prefix-LM and windows within documents are such graphs
(:class:`.planner.IntervalPattern`, recognized from the target-sorted CSR, or carried by an implicit
graph built by ``topology.interval_graph``). They are what FlexAttention's block-sparse kernels were
written for, with the ``mask_mod`` a user writes for them, ``lo[q] <= kv <= hi[q]``. ``auto`` runs
them here on the devices of :data:`.planner.FLEX_DEVICES` (:func:`.planner.runs_flex`), through the
public ``flex_attention`` compiled with ``torch.compile``; the project's kernels carry the graphs
nobody else runs well (unstructured, per-head, data-dependent).

- **The block mask** is built from the bounds (:func:`block_mask`), never by evaluating the
  ``mask_mod`` on ``N_dst x N_src`` cells: query block ``r`` lists the key blocks its rows reach,
  those every row hears whole as *full* (no ``mask_mod`` there), the others as partial. Rows of a
  padded last block hear nothing (``lo = 0``, ``hi = -1``). Cached on the pattern.
- **Compiled, or not at all**: uncompiled, FlexAttention materializes every score. This module
  compiles a function of its own (:func:`_flex_call`, ``fullgraph=True``): its cache and recompile
  limit are its own, and past the limit dynamo raises instead of running it uncompiled; that call
  then returns ``None`` and the caller runs the project's kernels.
- **Kernel options**: the first of :data:`FLEX_OPTIONS` whose kernels the GPU can hold (PyTorch
  2.11's default bfloat16 tiles for head dimension 64 ask an H100 for more shared memory than it
  has) is found once per (device, dtype, head dimension, group, gradients) by running the call on
  detached copies of its inputs in the caller's gradient mode, forward and, when gradients are
  needed, backward. Where none runs, the reason is kept (:func:`failure`), a warning says it once,
  and ``auto`` runs the project's kernels for heads of that dtype and dimension from then on
  (:func:`failed`, which ``auto_kernel`` reads as well).
- On the CPU FlexAttention runs uncompiled (its reference, which materializes the scores, forward
  only, and does not read the block tables): what the tests use, with the compiled CPU kernels for
  the tables; ``auto`` does not route CPU calls here (the project's CPU kernels are faster,
  docs/benchmarks.md).

Layouts: ``[N, H, D]`` inputs are passed as ``[1, H, N, D]`` views (no copy); the output comes back
as ``[N, H, D]``. Notation: ``B`` the block size of the mask, ``NBq`` / ``NBk`` query / key blocks.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .planner import IntervalPattern

BLOCK = 128  # FlexAttention's default block size
# devices where FlexAttention runs compiled (its GPU kernels); elsewhere its uncompiled reference
COMPILED_DEVICES: tuple[str, ...] = ("cuda",)

# kernel_options tried in order while Inductor finds no configuration of FlexAttention's kernels
# that fits the GPU (an "out of resource" error): the defaults, then fewer pipeline stages (torch
# 2.11's bfloat16 forward for head dim 64 on an H100 asks for 242 KB of shared memory, 227 KB fit),
# then smaller tiles
FLEX_OPTIONS: tuple[dict[str, int] | None, ...] = (
    None,
    {"num_stages": 2},
    {"num_stages": 1},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 1, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32},
)

_LOCK = threading.Lock()
# (device, dtype, head dim, group, grad) -> index into FLEX_OPTIONS, or the message of a failure
_CHOSEN: dict[tuple[Any, ...], int | str] = {}
_WARNED: set[tuple[Any, ...]] = set()


@functools.cache
def flex_available() -> bool:
    """Whether this PyTorch has FlexAttention and Triton is installed (its GPU kernels)."""
    try:
        import triton  # noqa: F401
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def out_of_resources(exc: BaseException) -> bool:
    """Whether ``exc`` says the GPU cannot hold a kernel (shared memory, registers)."""
    return "out of resource" in str(exc).lower()


def _flex_call(q: Tensor, k: Tensor, v: Tensor, mask, scale: float, gqa: bool, options) -> Tensor:
    """``flex_attention`` on ``[1, H, N, D]`` inputs: the function this module compiles, so that its
    compiled code has a cache of its own (not shared with other compiled ``flex_attention`` calls
    of the process, whose recompiles would count against this one's limit)."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa, kernel_options=options)


@functools.cache
def _compiled_call():
    # fullgraph: past the recompile limit (or at a graph break) dynamo raises instead of running
    # flex_attention uncompiled, which would materialize every score
    return torch.compile(_flex_call, fullgraph=True)


def runs_compiled(device_type: str) -> bool:
    """Whether FlexAttention can run on this kind of device here: compiled on
    :data:`COMPILED_DEVICES` while ``torch.compile`` is enabled (``TORCH_COMPILE_DISABLE=1`` turns
    it off, and compiled calls then run uncompiled, every score materialized), uncompiled elsewhere."""
    return device_type not in COMPILED_DEVICES or not torch._dynamo.config.disable


def _mask_mod(lo: Tensor, hi: Tensor):
    """``lo[q] <= kv <= hi[q]`` (one function per pattern; its code is the same for every
    pattern, so a compiled call is not compiled again for a new graph of the same sizes)."""

    def interval(b, h, q_idx, kv_idx):
        return (kv_idx >= lo[q_idx]) & (kv_idx <= hi[q_idx])

    return interval


def block_mask(pattern: IntervalPattern, block: int = BLOCK):
    """The ``BlockMask`` of ``pattern`` in blocks of ``block`` (module docstring), on its device;
    cached on the pattern."""
    key = ("block_mask", block)
    if key in pattern.extras:
        return pattern.extras[key]
    from torch.nn.attention.flex_attention import BlockMask

    n, n_src = pattern.lo.numel(), pattern.num_src
    device = pattern.lo.device
    nqb, nkb = -(-n // block), -(-n_src // block)
    pad = nqb * block - n
    lo = torch.nn.functional.pad(pattern.lo, (0, pad), value=0).to(torch.int32)  # [NBq B]
    hi = torch.nn.functional.pad(pattern.hi, (0, pad), value=-1).to(torch.int32)
    rows_lo, rows_hi = lo.view(nqb, block).long(), hi.view(nqb, block).long()  # [NBq, B]
    some = rows_hi >= rows_lo  # rows that hear a key
    first = torch.where(some, rows_lo, n_src).amin(1).div(block, rounding_mode="floor")  # [NBq]
    last = torch.where(some, rows_hi, -1).amax(1).div(block, rounding_mode="floor")  # [NBq], -1: none
    reach = (last - first + 1).clamp(min=0)  # key blocks some row of the block hears
    # whole key blocks that every row hears (none where a row hears nothing, hi = -1, padded rows
    # too; a short last key block never, as hi < N_src)
    full_lo = -(-rows_lo.amax(1) // block)
    full_hi = (rows_hi.amin(1) + 1).div(block, rounding_mode="floor") - 1
    num_full = (full_hi - full_lo + 1).clamp(min=0)  # [NBq]
    # partial: the reached blocks before the full ones, then those after them
    left = torch.where(num_full > 0, full_lo - first, reach)  # [NBq]
    after = torch.where(num_full > 0, full_hi + 1, first + reach)  # first block after the full run
    first, full_lo, left, after = (x.to(torch.int32)[:, None] for x in (first, full_lo, left, after))  # [NBq, 1]
    k = torch.arange(nkb, device=device, dtype=torch.int32)  # [NBk]; the tables below are [NBq, NBk] int32
    full_idx = full_lo + k  # the first num_full[r] entries of row r count
    part_idx = torch.where(k < left, first + k, after + (k - left))
    # entries past a row's count are never read as blocks; kept inside [0, NBk) all the same
    top = max(nkb - 1, 0)
    full_idx, part_idx = full_idx.clamp_(0, top), part_idx.clamp_(0, top)
    mask = BlockMask.from_kv_blocks(
        (reach - num_full).to(torch.int32)[None, None],
        part_idx[None, None],
        num_full.to(torch.int32)[None, None],
        full_idx[None, None],
        BLOCK_SIZE=block,
        mask_mod=_mask_mod(lo, hi),
        seq_lengths=(n, n_src),
    )
    pattern.extras[key] = mask
    return mask


def _key(q: Tensor, k: Tensor, grad: bool) -> tuple[Any, ...]:
    return (q.device.type, q.dtype, q.size(-1), q.size(1) // k.size(1), grad)


def failure(q: Tensor, k: Tensor, grad: bool) -> str | None:
    """Why FlexAttention cannot run calls like this one here (found by an earlier call), or ``None``."""
    chosen = _CHOSEN.get(_key(q, k, grad))
    return chosen if isinstance(chosen, str) else None


def failed(device_type: str, dtype: torch.dtype | None, head_dim: int | None) -> bool:
    """Whether FlexAttention failed to run for heads of this dtype and dimension on this kind of
    device (any group, with or without gradients; ``None``: any dtype / dimension)."""
    with _LOCK:
        return any(
            isinstance(chosen, str) and key[0] == device_type and dtype in (None, key[1]) and head_dim in (None, key[2])
            for key, chosen in _CHOSEN.items()
        )


def _call(q: Tensor, k: Tensor, v: Tensor, mask, scale: float, options) -> Tensor:
    """``[1, H, N_dst, D]``: FlexAttention on ``[N, H, D]`` inputs seen as ``[1, H, N, D]``,
    compiled on :data:`COMPILED_DEVICES`, elsewhere uncompiled (the reference)."""
    bhnd = [x.unsqueeze(0).transpose(1, 2) for x in (q, k, v)]
    fn = _compiled_call() if q.device.type in COMPILED_DEVICES else _flex_call
    return fn(bhnd[0], bhnd[1], bhnd[2], mask, scale, k.size(1) != q.size(1), options)


def _options(q: Tensor, k: Tensor, v: Tensor, mask, scale: float, grad: bool) -> tuple[bool, Any]:
    """``(decided, options)``: the kernel options for calls like this one (module docstring), or
    ``(True, None)`` with the failure recorded where none runs, or ``(False, None)`` where the
    probe itself ran out of memory (nothing recorded: a later call tries again)."""
    key = _key(q, k, grad)
    with _LOCK:
        chosen = _CHOSEN.get(key)
    if isinstance(chosen, int):
        return True, FLEX_OPTIONS[chosen]
    if chosen is not None:
        return True, None
    if q.device.type not in COMPILED_DEVICES:  # the uncompiled reference takes no kernel options
        with _LOCK:
            _CHOSEN[key] = 0
        return True, None
    reason = ""
    for i, options in enumerate(FLEX_OPTIONS):
        probe = [x.detach().requires_grad_(grad) for x in (q, k, v)]
        try:
            # in the caller's gradient mode: the real call then finds the probe's compiled code
            with torch.enable_grad() if grad else contextlib.nullcontext():
                out = _call(probe[0], probe[1], probe[2], mask, scale, options)
                if grad:
                    out.sum().backward()
        except torch.cuda.OutOfMemoryError:
            return False, None
        except Exception as exc:  # noqa: BLE001 - a kernel that does not compile or fit: try the next
            reason = f"{type(exc).__name__}: {exc}"
            if out_of_resources(exc):
                continue
            break  # not a matter of tile sizes: the other options would fail alike
        finally:
            del probe
        with _LOCK:
            _CHOSEN[key] = i
        return True, options
    _record(key, reason)
    return True, None


# what dynamo raises past the recompile limit of a fullgraph call (older PyTorch: nothing to catch)
_RECOMPILE_LIMIT: type[BaseException] = getattr(
    torch._dynamo.exc, "FailOnRecompileLimitHit", type("_Never", (Exception,), {})
)


def _record(key: tuple[Any, ...], reason: str) -> None:
    with _LOCK:
        _CHOSEN[key] = reason[:500] or "no kernel options ran"


def _warn(key: tuple[Any, ...], message: str) -> None:
    with _LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=5)


def flex_interval_attention(q: Tensor, k: Tensor, v: Tensor, pattern: IntervalPattern, scale: float) -> Tensor | None:
    """``out [N_dst, H, D]`` in ``q``'s dtype of the interval graph ``pattern`` by FlexAttention,
    differentiable in ``q``, ``k``, ``v`` through its own autograd (on CUDA; its CPU reference has
    no backward pass). ``None``, having run nothing the caller sees, where FlexAttention does not
    run such heads on this device (an earlier call found so: :func:`failed`, which ``auto_kernel``
    reads too), where its compiled call reached ``torch.compile``'s recompile limit, or where
    trying its kernel options ran out of memory: each said once per configuration by a
    ``RuntimeWarning``; the caller then runs the project's kernels. (:func:`.planner.runs_flex`
    sends no call here while ``torch.compile`` is disabled.)"""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    key = _key(q, k, grad)
    where = f"{q.dtype} heads of {q.size(-1)} on {q.device}"
    if not failed(q.device.type, q.dtype, q.size(-1)):
        mask = block_mask(pattern)
        decided, options = _options(q, k, v, mask, scale, grad)
        if not decided:
            _warn(key + ("memory",), f"trying FlexAttention's kernel options ran out of memory; {where} ran elsewhere")
            return None
    if failed(q.device.type, q.dtype, q.size(-1)):
        _warn(key, f"FlexAttention does not run {where} ({_reason(q)}); auto runs the project's kernels for them")
        return None
    try:
        out = _call(q, k, v, mask, scale, options)  # [1, H, N, D]
    except _RECOMPILE_LIMIT as exc:
        _record(key, f"{type(exc).__name__}: {exc}")
        _warn(key, f"FlexAttention's compiled call reached torch.compile's recompile limit; {where} run elsewhere")
        return None
    return out[0].transpose(0, 1).contiguous()  # [N, H, D]


def _reason(q: Tensor) -> str:
    """The first failure recorded for heads like ``q``'s."""
    with _LOCK:
        for key, chosen in _CHOSEN.items():
            if isinstance(chosen, str) and key[:3] == (q.device.type, q.dtype, q.size(-1)):
                return chosen
    return ""
