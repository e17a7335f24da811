"""The one place where the Triton kernels are launched.

:func:`launch` runs ``kernel[grid](*args, **meta)``; inside :func:`recording` it keeps the launch
instead, so that :mod:`gnn_transformer.bench.compile_check` can compile exactly what the kernels' wrappers would launch,
for a GPU, on a machine without one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch


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
