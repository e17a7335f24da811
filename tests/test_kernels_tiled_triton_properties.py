"""Hypothesis: on random small (multi)graphs the ``tiled`` Triton kernels, alone and as the tiled part
of ``split`` (a dense tile beside sparse edges that run fused), equal a dense float64 masked softmax,
forward (out, lse) and backward (q, k, v, edge_bias), in float32 and float64, with plain multi-head
and grouped-query heads, and with long rows forced into pieces (``_pieces.LENGTH``). Runs under
``TRITON_INTERPRET=1`` on CPU tensors: graphs stay tiny."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # CPU tensors need the interpreter (set in conftest)
    pytest.skip("TRITON_INTERPRET=1 is needed to run Triton kernels on CPU tensors", allow_module_level=True)

from .triton_helpers import cases, check_random_graph  # noqa: E402


@settings(max_examples=15, deadline=None)
@given(cases(["tiled", "split"]))
def test_triton_random_graphs_match_dense(case):
    check_random_graph(case)
