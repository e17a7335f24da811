"""What a user would otherwise run for a graph: SDPA and FlexAttention as they are written by hand.

Each baseline takes its own layout, contiguous ``[B, H, N, D]`` (the project's kernels take
``[N, H, D]``); the benchmark converts the inputs once, outside the timed calls.

- ``sdpa``: ``scaled_dot_product_attention`` with ``is_causal=True`` on a causal graph, without a
  mask on a full one, per document on nested (jagged) tensors for block-diagonal documents (where
  torch offers it, else one call per document), and with a dense boolean mask ``[N, N]`` otherwise.
- ``flex``: FlexAttention with the fastest of the ``mask_mod`` functions of :data:`FLEX_VARIANTS`:

  - ``predicate``: the topology's predicate twin as the ``mask_mod`` (``kv <= q``, ``|q - kv| <= w``,
    a document id per token), compiled into the kernel: no memory reads;
  - ``lookup``: a dense boolean ``mask[q, kv]`` where its ``N²`` bytes fit the memory budget;
  - ``blocks``: a table of blocks ``table[q // B, kv // B]`` for a graph made of whole ``B × B``
    blocks (BigBird's);
  - ``bitmap``: the project's ``topology.to_block_mask`` lookup (a block table plus a bitmap per
    partially filled block): any graph, at any size.

A variant that cannot be built for a graph says why (:class:`Unavailable`), never silently.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, cast

import torch
from torch import Tensor

from ..kernels._graph import prepare
from ..kernels.sdpa import dense_pattern

FLEX_VARIANTS = ("predicate", "lookup", "blocks", "bitmap")
# block sides a block table is tried with, largest first
TABLE_BLOCKS = (128, 64, 32, 16)


class Unavailable(Exception):
    """A baseline variant that cannot run for this graph; the message says why."""


class Baseline(Protocol):
    """``fn(q, k, v) -> out`` of a baseline, with ``note`` (how it runs) and ``layout`` (of its
    inputs and output: ``"bhnd"``, ``[1, H, N, D]``, or ``"nhd"``, the tokens' ``[N, H, D]``)."""

    note: str
    layout: str

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


def _baseline(fn: Callable[[Tensor, Tensor, Tensor], Tensor], note: str, layout: str = "bhnd") -> Baseline:
    """``fn`` itself, given the attributes of a :class:`Baseline` (no wrapper around the timed call)."""
    baseline = cast(Baseline, fn)
    baseline.note, baseline.layout = note, layout
    return baseline


def bhnd(x: Tensor) -> Tensor:
    """``[N, H, D]`` -> contiguous ``[1, H, N, D]`` (SDPA's and FlexAttention's layout)."""
    return x.transpose(0, 1).unsqueeze(0).contiguous()


def nhd(x: Tensor) -> Tensor:
    """``[1, H, N, D]`` -> ``[N, H, D]`` (a view)."""
    return x[0].transpose(0, 1)


# ---------------------------------------------------------------- SDPA
def sdpa_mode(edge_index: Tensor, n: int) -> tuple[str, tuple[int, ...]]:
    """``(mode, document bounds)``: ``"causal"``, ``"full"``, ``"documents-causal"``,
    ``"documents-full"`` (block-diagonal, first tokens and ``n``), or ``"mask"`` (anything else)."""
    pattern = dense_pattern(prepare(edge_index, n, n))
    if pattern is None:
        return "mask", (0, n)
    if len(pattern.bounds) == 2:
        return pattern.kind, pattern.bounds
    return f"documents-{pattern.kind}", pattern.bounds


def make_sdpa(edge_index: Tensor, src: Tensor, dst: Tensor, n: int, scale: float, mode: str,
              bounds: tuple[int, ...]) -> Baseline:
    """``fn(q, k, v)`` by ``scaled_dot_product_attention`` in ``mode`` (:func:`sdpa_mode`);
    ``fn.layout`` is ``"bhnd"`` (``[1, H, N, D]``) or, on nested tensors, ``"nhd"``; ``fn.note``
    says how it runs."""
    import torch.nn.functional as F

    def gqa(q, k):
        return {"enable_gqa": True} if k.size(1) != q.size(1) else {}

    if mode in ("causal", "full"):
        def sdpa(q, k, v):  # [1, H, N, D]
            return F.scaled_dot_product_attention(q, k, v, is_causal=mode == "causal", scale=scale, **gqa(q, k))
        return _baseline(sdpa, "is_causal" if mode == "causal" else "no mask")
    if mode.startswith("documents"):
        return _sdpa_documents(scale, mode == "documents-causal", bounds)
    mask = torch.zeros(n, n, dtype=torch.bool, device=src.device)
    mask[dst, src] = True

    def masked(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa(q, k))
    return _baseline(masked, "dense bool mask")


def _sdpa_documents(scale: float, causal: bool, bounds: tuple[int, ...]) -> Baseline:
    """SDPA per document: on nested jagged tensors (whose layout is the tokens' ``[N, H, D]``)
    where torch runs them, else one call per document on ``[1, H, N, D]``; ``note`` says which and why."""
    import torch.nn.functional as F

    docs = len(bounds) - 1

    def nested(q, k, v, offsets=torch.tensor(bounds)):
        group = q.size(1) // k.size(1)
        if group > 1:  # nested SDPA takes no enable_gqa: the key/value heads repeated
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        # [N, H, D] -> jagged [docs, j, H, D] -> [docs, H, j, D]
        parts = [torch.nested.nested_tensor_from_jagged(x, offsets.to(x.device)).transpose(1, 2) for x in (q, k, v)]
        out = F.scaled_dot_product_attention(*parts, is_causal=causal, scale=scale)
        return out.transpose(1, 2).values()  # [N, H, D]

    def per_document(q, k, v):
        gqa = {"enable_gqa": True} if k.size(1) != q.size(1) else {}
        return torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=causal,
                                                         scale=scale, **gqa)
                          for a, b in zip(bounds[:-1], bounds[1:])], dim=2)

    try:  # does torch run nested SDPA here? (two tokens per document)
        probe = torch.randn(2 * docs, 1, 8)
        nested(probe, probe, probe, torch.arange(0, 2 * docs + 1, 2))
    except Exception as exc:  # torch refuses nested SDPA (is_causal, a version)
        why = "is_causal" if causal else str(exc).splitlines()[0][:60]
        return _baseline(per_document, f"{docs} calls, one per document" + (", is_causal" if causal else "")
                         + f"; nested jagged SDPA refused ({why})")
    return _baseline(nested, f"nested jagged, {docs} documents" + (", is_causal" if causal else ""), "nhd")


# ---------------------------------------------------------------- FlexAttention mask_mods
def _predicate(topology: str, n: int, device) -> Callable:
    """The topology's predicate twin, vectorized as a ``mask_mod`` (what attention-gym writes)."""
    from ..topology import causal_predicate, sliding_window_predicate

    if topology == "causal":
        return lambda b, h, q_idx, kv_idx: causal_predicate(q_idx, kv_idx)
    if topology == "window":
        return lambda b, h, q_idx, kv_idx: sliding_window_predicate(q_idx, kv_idx, window=128)
    if topology == "document":
        doc = torch.arange(n, device=device) // max(n // 4, 1)  # [N] document of each token

        def mask_mod(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
        return mask_mod
    if topology == "random":
        raise Unavailable("no predicate: the keys are drawn at random")
    if topology == "bigbird":
        raise Unavailable("no predicate for the random blocks (the block table holds them)")
    raise Unavailable(f"no vectorized predicate twin for {topology!r}")


def _lookup(src: Tensor, dst: Tensor, n: int, budget: float) -> Callable:
    if n * n > budget:
        raise Unavailable(f"the dense lookup needs {n * n / 2 ** 30:.1f} GiB")
    mask = torch.zeros(n, n, dtype=torch.bool, device=src.device)
    mask[dst, src] = True
    return lambda b, h, q_idx, kv_idx: mask[q_idx, kv_idx]


def _block_table(src: Tensor, dst: Tensor, n: int) -> Callable:
    """``table[q // B, kv // B]`` for the largest ``B`` of :data:`TABLE_BLOCKS` whose blocks are
    each full or empty."""
    for block in TABLE_BLOCKS:
        nb = -(-n // block)
        key = (dst // block) * nb + src // block
        blocks, counts = torch.unique(key, return_counts=True)
        rows = torch.clamp(n - (blocks // nb) * block, max=block)  # cells of the (boundary) block
        cols = torch.clamp(n - (blocks % nb) * block, max=block)
        if torch.equal(counts, rows * cols):
            table = torch.zeros(nb * nb, dtype=torch.bool, device=src.device)
            table[blocks] = True
            table = table.view(nb, nb)
            return lambda b, h, q_idx, kv_idx, B=block: table[q_idx // B, kv_idx // B]
    raise Unavailable(f"not made of whole blocks of {'/'.join(map(str, TABLE_BLOCKS))}")


def flex_block_mask(variant: str, topology: str, edge_index: Tensor, src: Tensor, dst: Tensor, n: int,
                    device, flex_block: int, budget: float):
    """The ``BlockMask`` of one :data:`FLEX_VARIANTS` entry for this graph (``create_block_mask`` on
    its ``mask_mod``, as a user builds one; ``bitmap``: ``topology.to_block_mask``), or
    :class:`Unavailable`."""
    from ..topology import flex_attention_available, to_block_mask

    if not flex_attention_available():
        raise Unavailable(f"no FlexAttention in torch {torch.__version__}")
    if variant == "bitmap":
        return to_block_mask(edge_index, n, n, block_size=flex_block, device=device, lookup="blocks")
    from torch.nn.attention.flex_attention import create_block_mask

    if variant == "predicate":
        mask_mod = _predicate(topology, n, device)
    elif variant == "lookup":
        mask_mod = _lookup(src, dst, n, budget)
    elif variant == "blocks":
        mask_mod = _block_table(src, dst, n)
    else:
        raise ValueError(f"Expected a FlexAttention variant in {FLEX_VARIANTS} (got {variant!r})")
    return create_block_mask(mask_mod, None, None, n, n, device=device, BLOCK_SIZE=flex_block,
                             _compile=n > 16384)
