"""What a user would otherwise run for a graph: SDPA and FlexAttention as they are written by hand.

Each baseline takes its own layout, contiguous ``[B, H, N, D]`` (the project's kernels take
``[N, H, D]``); the benchmark converts the inputs once, outside the timed calls.

- ``sdpa``: ``scaled_dot_product_attention`` with ``is_causal=True`` on a causal graph, without a
  mask on a full one, per document for block-diagonal documents (documents of one length: one
  call with the documents as the batch; else on nested (jagged) tensors where torch offers it, else
  one call per document), and with a dense boolean mask ``[N, N]`` otherwise.
- ``flex``: FlexAttention with the fastest of the ``mask_mod`` functions of :data:`FLEX_VARIANTS`:

  - ``predicate``: the topology's predicate twin as the ``mask_mod`` (``kv <= q``, ``|q - kv| <= w``,
    a document id per token), compiled into the kernel: no memory reads;
  - ``lookup``: a dense boolean ``mask[q, kv]`` where its ``N²`` bytes fit the memory budget;
  - ``blocks``: a table of blocks ``table[q // B, kv // B]`` for a graph made of whole ``B × B``
    blocks (BigBird's);
  - ``bitmap``: the project's ``topology.to_block_mask`` lookup (a block table plus a bitmap per
    partially filled block): any graph, at any size.

A per-head graph (``edge_index`` plus ``edge_head``) is what a user writes with a ``mask_mod``
that reads the head ``h``: ``predicate`` looks up each head's rule (window, dilation, causality,
sinks: :func:`head_rules`, for specs made of such heads, DuoAttention's and Longformer's),
``lookup`` a dense ``mask[h, q, kv]``, ``blocks`` a table per head; SDPA takes a boolean
``[1, H, N, N]`` mask; ``bitmap`` (one block structure for every head) is unavailable.

A variant that cannot be built for a graph says why (:class:`Unavailable`), never silently.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol, cast

import torch
from torch import Tensor

from ..kernels.planner import dense_pattern, prepare

FLEX_VARIANTS = ("predicate", "lookup", "blocks", "bitmap")
# block sides a block table is tried with, largest first
TABLE_BLOCKS = (128, 64, 32, 16)


class Unavailable(Exception):
    """A baseline variant that cannot run for this graph; the message says why."""


class Baseline(Protocol):
    """``fn(q, k, v) -> out`` of a baseline, with ``note`` (how it runs) and ``layout`` (of its
    inputs and output: ``"bhnd"``, ``[1, H, N, D]``; ``"nhd"``, the tokens' ``[N, H, D]``; or
    ``"docs"``, ``[docs, H, L, D]`` for documents of one length ``L``; see :func:`layout_functions`)."""

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


def layout_functions(fn: object) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``(to, back)``: the tokens' ``[N, H, D]`` to the layout of ``fn`` (its ``layout``, default
    ``"nhd"``; ``"docs"`` with ``fn.documents``, the number of equal documents) and back."""
    layout = getattr(fn, "layout", "nhd")
    if layout == "bhnd":
        return bhnd, nhd
    if layout == "docs":
        docs = int(getattr(fn, "documents"))

        def to(x: Tensor) -> Tensor:  # [N, H, D] -> contiguous [docs, H, L, D]
            return x.reshape(docs, -1, *x.shape[1:]).transpose(1, 2).contiguous()

        def back(x: Tensor) -> Tensor:  # [docs, H, L, D] -> [N, H, D]
            return x.transpose(1, 2).reshape(-1, x.size(1), x.size(-1))

        return to, back
    return (lambda x: x), (lambda x: x)


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


def make_sdpa(
    edge_index: Tensor,
    src: Tensor,
    dst: Tensor,
    n: int,
    scale: float,
    mode: str,
    bounds: tuple[int, ...],
    edge_head: Tensor | None = None,
    num_heads: int = 1,
) -> Baseline:
    """``fn(q, k, v)`` by ``scaled_dot_product_attention`` in ``mode`` (:func:`sdpa_mode`);
    ``fn.layout`` is ``"bhnd"`` (``[1, H, N, D]``) or, on nested tensors, ``"nhd"``; ``fn.note``
    says how it runs. A per-head graph (``edge_head``, ``num_heads`` query heads) runs with a
    boolean ``[1, H, N, N]`` mask, whatever ``mode``."""
    import torch.nn.functional as F

    def gqa(q, k):
        return {"enable_gqa": True} if k.size(1) != q.size(1) else {}

    if edge_head is not None:
        head_mask = torch.zeros(1, num_heads, n, n, dtype=torch.bool, device=src.device)
        head_mask[0, edge_head, dst, src] = True

        def per_head(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=head_mask, scale=scale, **gqa(q, k))

        return _baseline(per_head, "dense bool mask [1, H, N, N]")

    if mode in ("causal", "full"):

        def sdpa(q, k, v):  # [1, H, N, D]
            return F.scaled_dot_product_attention(q, k, v, is_causal=mode == "causal", scale=scale, **gqa(q, k))

        return _baseline(sdpa, "is_causal" if mode == "causal" else "no mask")
    if mode.startswith("documents"):
        return _sdpa_documents(scale, mode == "documents-causal", bounds, src.device)
    mask = torch.zeros(n, n, dtype=torch.bool, device=src.device)
    mask[dst, src] = True

    def masked(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa(q, k))

    return _baseline(masked, "dense bool mask")


def _sdpa_documents(scale: float, causal: bool, bounds: tuple[int, ...], device: torch.device) -> Baseline:
    """SDPA per document: documents of one length as one batched call on ``[docs, H, L, D]`` (what
    a user writes: the batch dimension is the documents); documents of several lengths on nested
    jagged tensors (whose layout is the tokens' ``[N, H, D]``) where torch runs them, else one call
    per document on ``[1, H, N, D]``; ``note`` says which and why."""
    import torch.nn.functional as F

    docs = len(bounds) - 1
    sizes = {b - a for a, b in zip(bounds[:-1], bounds[1:])}
    if len(sizes) == 1:

        def batched(q, k, v):  # [docs, H, L, D]
            gqa = {"enable_gqa": True} if k.size(1) != q.size(1) else {}
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **gqa)

        batched.documents = docs  # type: ignore[attr-defined]
        note = f"one call, {docs} documents as the batch" + (", is_causal" if causal else "")
        return _baseline(batched, note, "docs")

    offsets_on = torch.tensor(bounds, device=device)  # once, not in the timed call

    def nested(q, k, v, offsets=offsets_on):
        group = q.size(1) // k.size(1)
        if group > 1:  # nested SDPA takes no enable_gqa: the key/value heads repeated
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        # [N, H, D] -> jagged [docs, j, H, D] -> [docs, H, j, D]: views, as a user of nested SDPA writes
        parts = [torch.nested.nested_tensor_from_jagged(x, offsets).transpose(1, 2) for x in (q, k, v)]
        out = F.scaled_dot_product_attention(*parts, is_causal=causal, scale=scale)
        return out.transpose(1, 2).values()  # [N, H, D]

    def per_document(q, k, v):
        gqa = {"enable_gqa": True} if k.size(1) != q.size(1) else {}
        return torch.cat(
            [
                F.scaled_dot_product_attention(
                    q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=causal, scale=scale, **gqa
                )
                for a, b in zip(bounds[:-1], bounds[1:])
            ],
            dim=2,
        )

    try:  # does torch run nested SDPA on this device? (two tokens per document)
        probe = torch.randn(2 * docs, 1, 8, device=device)
        nested(probe, probe, probe, torch.arange(0, 2 * docs + 1, 2, device=device))
    except Exception as exc:  # torch refuses nested SDPA (is_causal, a version)
        why = "is_causal" if causal else str(exc).splitlines()[0][:60]
        return _baseline(
            per_document,
            f"{docs} calls, one per document"
            + (", is_causal" if causal else "")
            + f"; nested jagged SDPA refused ({why})",
        )
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


# the rule of one head, (dilation, window, causal, sinks): j -> i iff (j <= i or not causal) and
# (|i - j| = s * dilation for an integer 0 <= s <= window, or j < sinks)
HeadRule = tuple[int, int, bool, int]


def _part_rules(part: dict, n: int) -> list[HeadRule]:
    """The rule of every head of one spec part (``builder`` with ``params`` or ``heads``)."""
    from ..topology import BUILDERS

    name = part["builder"]
    if name == "per_head":
        return [rule for head in part["heads"] for rule in _part_rules(head, n) * head.get("repeat", 1)]
    if name not in BUILDERS:
        raise Unavailable(f"no vectorized per-head predicate for {name!r} heads")
    bound = inspect.signature(BUILDERS[name].fn).bind(n, **part.get("params", {}))
    bound.apply_defaults()
    p = bound.arguments
    if name in ("causal", "full"):
        return [(1, n, name == "causal", 0)]
    if name in ("sliding_window", "dilated"):
        return [(p.get("dilation", 1), p["window"], p["causal"], 0)]
    if name == "streaming":
        return [(1, p["window"], True, p["num_sinks"])]
    if name == "dilated_per_head":
        dilations = p["dilations"] if isinstance(p["dilations"], list) else [p["dilations"]]
        return [(d, p["window"], p["causal"], 0) for d in dilations]
    if name == "duo_attention":
        streaming_heads = p["streaming_heads"] if isinstance(p["streaming_heads"], list) else [p["streaming_heads"]]
        return [
            (1, p["window"], True, p["num_sinks"]) if h in streaming_heads else (1, n, True, 0)
            for h in range(p["num_heads"])
        ]
    raise Unavailable(f"no vectorized per-head predicate for {name!r} heads")


def head_rules(spec: str, n: int) -> list[HeadRule]:
    """The rule of every head of a per-head topology spec (``duo_attention``, ``dilated_per_head``,
    a ``per_head`` spec of windows, dilated windows, causal, full or streaming heads), from its
    builder's arguments or TOML parameters, or :class:`Unavailable`."""
    from ..experiments.topologies import parse_spec, resolve_topology

    topo = resolve_topology(spec)
    if topo.source is not None:
        part: dict[str, Any] = topo.source.part
    else:
        name, kwargs = parse_spec(spec)
        part = {"builder": name, "params": kwargs}
    return _part_rules(part, n)


def _head_predicate(spec: str, n: int, num_heads: int, device) -> Callable:
    """A ``mask_mod`` reading each head's rule (:func:`head_rules`) from tables indexed by ``h``."""
    rules = head_rules(spec, n)
    if len(rules) != num_heads:
        raise Unavailable(f"{len(rules)} head rules for {num_heads} heads")
    dilation, window, causal_head, sinks = (torch.tensor(column, device=device) for column in zip(*rules))  # [H]

    def mask_mod(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        step = dilation[h]
        within = (diff.abs() % step == 0) & (diff.abs() <= window[h] * step)
        return ((diff >= 0) | ~causal_head[h]) & (within | (kv_idx < sinks[h]))

    return mask_mod


def _lookup(
    src: Tensor, dst: Tensor, n: int, budget: float, edge_head: Tensor | None = None, num_heads: int = 1
) -> Callable:
    heads = 1 if edge_head is None else num_heads
    if heads * n * n > budget:
        raise Unavailable(f"the dense lookup needs {heads * n * n / 2**30:.1f} GiB")
    if edge_head is None:
        mask = torch.zeros(n, n, dtype=torch.bool, device=src.device)
        mask[dst, src] = True
        return lambda b, h, q_idx, kv_idx: mask[q_idx, kv_idx]
    head_mask = torch.zeros(num_heads, n, n, dtype=torch.bool, device=src.device)
    head_mask[edge_head, dst, src] = True
    return lambda b, h, q_idx, kv_idx: head_mask[h, q_idx, kv_idx]


def _block_table(src: Tensor, dst: Tensor, n: int, edge_head: Tensor | None = None, num_heads: int = 1) -> Callable:
    """``table[q // B, kv // B]`` (``table[h, q // B, kv // B]`` on a per-head graph) for the
    largest ``B`` of :data:`TABLE_BLOCKS` whose blocks are each full or empty."""
    head = torch.zeros_like(dst) if edge_head is None else edge_head.to(dst)
    heads = 1 if edge_head is None else num_heads
    for block in TABLE_BLOCKS:
        nb = -(-n // block)
        key = (head * nb + dst // block) * nb + src // block
        blocks, counts = torch.unique(key, return_counts=True)
        rows = torch.clamp(n - (blocks // nb % nb) * block, max=block)  # cells of the (boundary) block
        cols = torch.clamp(n - (blocks % nb) * block, max=block)
        if torch.equal(counts, rows * cols):
            table = torch.zeros(heads * nb * nb, dtype=torch.bool, device=src.device)
            table[blocks] = True
            table = table.view(heads, nb, nb)
            if edge_head is None:
                return lambda b, h, q_idx, kv_idx, B=block: table[0, q_idx // B, kv_idx // B]
            return lambda b, h, q_idx, kv_idx, B=block: table[h, q_idx // B, kv_idx // B]
    raise Unavailable(f"not made of whole blocks of {'/'.join(map(str, TABLE_BLOCKS))}")


def flex_block_mask(
    variant: str,
    topology: str,
    edge_index: Tensor,
    src: Tensor,
    dst: Tensor,
    n: int,
    device,
    flex_block: int,
    budget: float,
    edge_head: Tensor | None = None,
    num_heads: int = 1,
):
    """The ``BlockMask`` of one :data:`FLEX_VARIANTS` entry for this graph (``create_block_mask`` on
    its ``mask_mod``, as a user builds one; ``bitmap``: ``topology.to_block_mask``), or
    :class:`Unavailable`. With ``edge_head`` (a per-head graph of ``num_heads`` heads) the
    ``mask_mod`` reads ``h`` and the mask has a block structure per head."""
    from ..topology import flex_attention_available, to_block_mask

    if variant not in FLEX_VARIANTS:
        raise ValueError(f"Expected a FlexAttention variant in {FLEX_VARIANTS} (got {variant!r})")
    if not flex_attention_available():
        raise Unavailable(f"no FlexAttention in torch {torch.__version__}")
    if variant == "bitmap":
        if edge_head is not None:
            raise Unavailable("to_block_mask builds one block structure for every head, not per head")
        return to_block_mask(edge_index, n, n, block_size=flex_block, device=device, lookup="blocks")
    from torch.nn.attention.flex_attention import create_block_mask

    if variant == "predicate":
        mask_mod = (
            _predicate(topology, n, device) if edge_head is None else _head_predicate(topology, n, num_heads, device)
        )
    elif variant == "lookup":
        mask_mod = _lookup(src, dst, n, budget, edge_head, num_heads)
    else:
        mask_mod = _block_table(src, dst, n, edge_head, num_heads)
    # Above 16k tokens the eager build would hold an N x N mask: compile it, as PyTorch advises.
    build = torch.compile(create_block_mask) if n > 16384 else create_block_mask
    return build(mask_mod, None, None if edge_head is None else num_heads, n, n, device=device, BLOCK_SIZE=flex_block)
