"""Long rows cut into pieces: the load balance of the GPU kernels.

Every Triton kernel runs one program per *row* of a pointer array: a target's edges (forward, ``dQ``)
or a source's edges (``dK`` / ``dV``) in the CSR kernels, a query block's or a key block's tiles in
the tiled ones. A row with far more items than the others (a global token, which every token attends
to and which attends to every token; a global query or key block) keeps one program busy long after
the others are done, while most of the GPU idles: in BigBird at 16k tokens (blocks of 64) a global
query block has 256 tiles, the others about 8.

Such rows are *cut*. The main launch gives them an empty range (its programs for them write zeros),
and a second launch of the same kernel runs their items in pieces of about ``length`` items, one
program per piece, each reading its row's inputs and writing its own row of float32 (float64)
partial buffers. The partial results are then merged exactly, in a fixed order
(``torch.segment_reduce``: no atomics, deterministic): forward outputs through their log-sum-exps
(as :mod:`.merge` does for two parts), gradients as sums. Edge positions do not change, so dropout
masks and per-edge bias gradients are the same as without cutting.

The piece length is the work one of the GPU's concurrent programs would have if the work were even,
``items × heads / (SMs × PROGRAMS_PER_SM)``, and at least ``MIN_PIECE``: graphs whose rows are all
about as long as the average are never cut. ``PROGRAMS_PER_SM`` is an estimate of occupancy, not a
measurement. Tensors on the CPU (the Triton interpreter of the tests) are cut only where ``LENGTH``
forces a piece length.

Notation: ``R`` rows, ``P`` pieces, ``C`` cut rows, ``B`` rows of output per row (1 for the CSR
kernels, the block size for the tiled ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .planner import Extras
from .primitives import finite_or_zero, lse_pair

# A piece length for every launch, on every device (0: never cut); None: by the device, as above.
LENGTH: int | None = None
# Per kind of row: "csr" rows hold edges (32 per step of the CSR kernels), "tiles" rows hold tiles.
MIN_PIECE = {"csr": 1024, "tiles": 16}
PROGRAMS_PER_SM = {"csr": 16, "tiles": 2}


@dataclass(eq=False)
class Pieces:
    """How the long rows of a pointer array ``ptr [R + 1]`` are cut."""

    end: Tensor  # [R] each row's end in the main launch: its own, or its start for a cut row
    row: Tensor  # [P] the row of each piece; the pieces of one row are adjacent, rows increasing
    start: Tensor  # [P] first item of each piece
    stop: Tensor  # [P] one past its last item
    rows: Tensor  # [C] the cut rows, increasing
    counts: Tensor  # [C] pieces per cut row
    owner: Tensor  # [P] the index in ``rows`` of each piece's row
    # (block, rows of the output) -> the existing output rows of the cut rows and their positions
    # in [C * B] (computed once: a boolean selection waits for the device)
    _targets: dict = field(default_factory=dict, repr=False)

    @property
    def num_pieces(self) -> int:
        return self.row.numel()


def cut(ptr: Tensor, length: int) -> Pieces | None:
    """Rows of ``ptr`` with more than ``length`` items cut into ``ceil(n / length)`` pieces of
    (nearly) equal size; ``None`` when no row is that long (or ``length`` is 0)."""
    starts, ends = ptr[:-1], ptr[1:]
    size = ends - starts  # [R]
    long = size > length
    if length <= 0 or not bool(long.any()):
        return None
    rows = long.nonzero().flatten()  # [C]
    counts = -(-size[rows] // length)  # [C]
    owner = torch.repeat_interleave(torch.arange(rows.numel(), device=ptr.device), counts)  # [P]
    row = rows[owner]  # [P]
    first = torch.cumsum(counts, 0) - counts  # [C] index of each cut row's first piece
    index = torch.arange(row.numel(), device=ptr.device) - first[owner]  # [P]
    n, c = size[row], counts[owner]  # [P], [P]
    start = starts[row] + index * n // c
    stop = starts[row] + (index + 1) * n // c
    return Pieces(torch.where(long, starts, ends), row, start, stop, rows, counts, owner)


def piece_length(kind: str, items: int, heads: int, device: torch.device) -> int:
    """The piece length for a launch over ``items`` items in all with ``heads`` programs per row
    (0: do not cut); see the module docstring."""
    if LENGTH is not None:
        return LENGTH
    if device.type != "cuda":
        return 0
    slots = torch.cuda.get_device_properties(device).multi_processor_count * PROGRAMS_PER_SM[kind]
    return max(MIN_PIECE[kind], -(-items * heads // slots))


def cached_pieces(cache: Extras, name: str, ptr: Tensor, kind: str, items: int, heads: int) -> Pieces | None:
    """:func:`cut` of ``ptr`` at :func:`piece_length`, kept in ``cache`` under ``name`` and the length."""
    length = piece_length(kind, items, heads, ptr.device)
    key = ("pieces", name, length)
    if key not in cache:
        cache[key] = cut(ptr, length)
    return cache[key]


def ranges(ptr: Tensor, pieces: Pieces | None) -> tuple[Tensor, Tensor]:
    """``(start [R], end [R])`` of each row in the main launch."""
    return ptr[:-1], (ptr[1:] if pieces is None else pieces.end)


def partial(
    pieces: Pieces, block: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, fill: float = 0.0
) -> Tensor:
    """A partial buffer ``[P * B, *shape]`` of the pieces' results, filled with ``fill`` (rows past the
    last target of a block are never written)."""
    return torch.full((pieces.num_pieces * block, *shape), fill, dtype=dtype, device=device)


def _targets(pieces: Pieces, block: int, size: int) -> tuple[Tensor, Tensor]:
    """``(rows, positions)``: the output rows of the cut rows that exist (``< size``) and their
    positions in ``[C * B]``; cached on ``pieces``."""
    key = (block, size)
    if key not in pieces._targets:
        rows = (pieces.rows[:, None] * block + torch.arange(block, device=pieces.rows.device)).flatten()
        positions = (rows < size).nonzero().flatten()
        pieces._targets[key] = (rows[positions], positions)
    return pieces._targets[key]


def _sum(x: Tensor, pieces: Pieces, reduce: str = "sum") -> Tensor:
    """Segmented ``reduce`` of ``x [P, ...]`` over each cut row's pieces, in order: ``[C, ...]``
    (``unsafe``: the lengths come from :func:`cut`, no check that waits for the device)."""
    return torch.segment_reduce(x, reduce, lengths=pieces.counts, axis=0, unsafe=True)


def merge_into(
    out: Tensor, lse: Tensor, lse_lo: Tensor, out_p: Tensor, lse_p: Tensor, lo_p: Tensor, pieces: Pieces, block: int = 1
) -> None:
    """Write the cut rows' results, merged from their pieces' ``(out_p [P * B, H, D], lse_p, lo_p
    [P * B, H])`` through the log-sum-exps (``lse + lo``, see :mod:`.primitives`), into
    ``out [N, H, D]``, ``lse`` and ``lse_lo [N, H]``; a row empty in every piece stays empty (zeros,
    ``-inf``, 0)."""
    heads, dim = out_p.shape[1:]
    shape = (pieces.num_pieces, block, heads)
    lse_b, lo_b = lse_p.view(shape), lo_p.view(shape)
    top = _sum(lse_b, pieces, "max")  # [C, B, H]
    top = finite_or_zero(top)
    w = torch.exp((lse_b - top[pieces.owner]) + lo_b)  # [P, B, H]; 0 if empty
    total = _sum(w, pieces)  # [C, B, H]
    acc = _sum(w.unsqueeze(-1) * out_p.view(pieces.num_pieces, block, heads, dim), pieces)  # [C, B, H, D]
    nonempty = total > 0
    safe = torch.where(nonempty, total, torch.ones_like(total))
    merged, lo = lse_pair(top, total)
    rows, positions = _targets(pieces, block, out.size(0))
    out[rows] = (acc / safe.unsqueeze(-1)).flatten(0, 1)[positions].to(out.dtype)
    lse[rows] = merged.flatten(0, 1)[positions].to(lse.dtype)
    lse_lo[rows] = lo.flatten(0, 1)[positions].to(lse_lo.dtype)


def add_into(grad: Tensor, grad_p: Tensor, pieces: Pieces, block: int = 1) -> None:
    """Write the sums of the cut rows' pieces ``grad_p [P * B, ...]`` into ``grad [N, ...]`` (where
    the main launch wrote zeros)."""
    sums = _sum(grad_p.view(pieces.num_pieces, block, *grad_p.shape[1:]), pieces)  # [C, B, ...]
    rows, positions = _targets(pieces, block, grad.size(0))
    grad[rows] = sums.flatten(0, 1)[positions].to(grad.dtype)


def launch_rows(
    run,
    ptr: Tensor,
    pieces: Pieces | None,
    outputs: tuple[Tensor, ...],
    dtype: torch.dtype,
    block: int = 1,
    merge: bool = False,
) -> None:
    """``run(rows, *outputs, start, end, row_map, mapped)`` over every row of ``ptr`` (a cut row with
    an empty range), then over the pieces of the cut rows into partial buffers in ``dtype``, written
    back into ``outputs``: merged through the log-sum-exps (``merge``: a forward pass's ``(out, lse,
    lse_lo)``) or summed (gradients)."""
    start, end = ranges(ptr, pieces)
    run(ptr.numel() - 1, *outputs, start, end, start, False)
    if pieces is None:
        return
    fills = (0.0, float("-inf"), 0.0) if merge else (0.0,) * len(outputs)
    buffers = [partial(pieces, block, x.shape[1:], dtype, x.device, fill) for x, fill in zip(outputs, fills)]
    run(pieces.num_pieces, *buffers, pieces.start, pieces.stop, pieces.row, True)
    if merge:
        out, lse, lse_lo = outputs
        out_p, lse_p, lo_p = buffers
        merge_into(out, lse, lse_lo, out_p, lse_p, lo_p, pieces, block)
    else:
        for x, buffer in zip(outputs, buffers):
            add_into(x, buffer, pieces, block)
