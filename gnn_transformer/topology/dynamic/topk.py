"""Top-k attention: each query's highest-scoring keys per head, exactly, among all or the allowed keys."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric import EdgeIndex

from .._common import INT64_MAX, check_bool, check_edges, check_int
from ._common import (
    Batch,
    BatchLengths,
    check_qk,
    check_real,
    detached_scores_dtype,
    edge_sizes,
    sequence_pairs,
    token_layout,
)


# topk's default chunk: queries scored at a time without an allowed graph, by device type (smaller
# blocks of scores stay in the CPU's caches and waste less past a causal chunk's last query), and
# with one
CHUNK = {"cpu": 256}
ALLOWED_CHUNK = 1024


# A row is ranked through groups of columns when it is at least this many times wider than the
# keys it keeps (below, one top-k over the whole row costs about as much)
GROUPED_WIDTH = 8


def _rank(scores: Tensor, ok: Tensor, num: int) -> Tensor:
    """Columns ``[..., num]`` (ascending; ``span`` past a row's allowed count) of the ``num`` best
    allowed scores of each row of ``scores [..., span]`` (disallowed ones already ``-inf``;
    ``ok`` broadcasts to ``scores``), ties to the lower column. Exact: ``topk`` gives the
    ``num``-th best score, the threshold; a row whose allowed scores at the threshold do not all
    fit is decided from the left."""
    span = scores.size(-1)
    allowed = ok.sum(-1)  # before broadcasting: [c] for a mask shared by the heads
    ok = ok.expand_as(scores)
    values, cols = scores.topk(min(num + 1, span), dim=-1)  # one more: is the num-th best tied past num?
    threshold = values[..., num - 1]
    taken_ok = ok.gather(-1, cols[..., :num])  # [..., num]
    # decided unless the next best ties with the threshold while allowed scores are left out
    if values.size(-1) > num:
        tied_past = values[..., num] == threshold
    else:  # every column taken
        tied_past = torch.zeros_like(threshold, dtype=torch.bool)
    short = taken_ok.sum(-1) < allowed  # [...]: allowed scores left out
    cols = torch.where(taken_ok, cols[..., :num], span)
    threshold = threshold.unsqueeze(-1)
    unsure = (tied_past & short).nonzero(as_tuple=True)  # rows with more ties than places
    if unsure[0].numel():
        rows, row_ok, t = scores[unsure], ok[unsure], threshold[unsure]  # [R, span], [R, 1]
        above = row_ok & (rows > t)
        tie = row_ok & (rows == t)
        keep = above | (tie & (tie.cumsum(-1) <= num - above.sum(-1, keepdim=True)))
        column = torch.arange(span, device=scores.device)
        cols[unsure] = torch.sort(torch.where(keep, column, span), dim=-1).values[..., :num]
    return torch.sort(cols, dim=-1).values


def _grouped_rank(scores: Tensor, num: int, size: int) -> Tensor:
    """:func:`_rank` of ``scores [H, c, span]`` (finite where allowed, ``-inf`` elsewhere) through
    groups of ``size`` columns (group ``g`` of ``G``: columns ``g, g + G, g + 2G, ...``): the
    ``num`` groups of the highest maxima hold every score above the ``num``-th best (a score
    outside them is at most the ``num``-th highest maximum, and each chosen group holds a score at
    least that high), so the row is ranked among those groups' columns. A row where a group left
    out ties the lowest chosen maximum (finite) is ranked whole: the tie may reach past them."""
    H, c, span = scores.shape
    groups = -(-span // size)
    padded = scores if span == groups * size else F.pad(scores, (0, groups * size - span), value=-math.inf)
    top, picked = padded.view(H, c, size, groups).amax(-2).topk(num + 1, dim=-1)  # [H, c, num + 1]
    whole = (top[..., num - 1] == top[..., num]) & (top[..., num - 1] > -math.inf)
    picked = picked[..., :num].sort(dim=-1).values  # [H, c, num]
    # the candidates [H, c, size, num]: the s-th column (s * G + g) of every chosen group g, which
    # is column order when flattened (g < G)
    values = padded.view(H, c, size, groups).gather(-1, picked[:, :, None, :].expand(H, c, size, num)).flatten(-2)
    slots = _rank(values, values > -math.inf, num)  # [H, c, num], size * num past the count
    taken, slots = slots < size * num, slots.clamp(max=size * num - 1)
    cols = torch.where(taken, slots // num * groups + picked.gather(-1, slots % num), span)
    redo = whole.nonzero(as_tuple=True)
    if redo[0].numel():
        rows = scores[redo]
        cols[redo] = _rank(rows, rows > -math.inf, num)
    return cols


def _best(scores: Tensor, ok: Tensor, num: int, finite: bool) -> Tensor:
    """Columns ``[H, c, num]`` of the ``num`` best allowed scores of each row of ``scores [H, c,
    span]`` (``ok [c, span]``: the allowed columns of each query, every head's), ascending,
    ``span`` past a row's allowed count; ties to the lower column (see :func:`_rank`; with
    ``finite`` scores, wide rows through groups, :func:`_grouped_rank`). ``scores`` is overwritten."""
    span = scores.size(-1)
    barred = (~ok).any(0).nonzero()  # columns some query may not read: only those are masked
    if barred.numel():
        a, b = int(barred[0]), int(barred[-1]) + 1
        scores[..., a:b].masked_fill_(~ok[:, a:b], -math.inf)
    if finite and span >= GROUPED_WIDTH * num:
        return _grouped_rank(scores, num, max(2, math.isqrt(span // num)))
    return _rank(scores, ok, num)


def _finite(q: Tensor, k: Tensor) -> bool:
    """Whether every score is finite: finite inputs whose largest norms multiply to less than the
    dtype's range (False for inf and NaN)."""
    return math.prod(float(x.norm(dim=-1).amax()) for x in (q, k)) < torch.finfo(q.dtype).max / 2


def _range_scores(q: Tensor, k: Tensor) -> Tensor:
    """Scores ``[H, c, span]`` of queries ``q [c, H, D]`` against keys ``k [span, H_kv, D]``, one
    matrix product per key head (query head ``x * g + y`` reads key head ``x``)."""
    (c, H, D), (span, H_kv, _) = q.shape, k.shape
    q_heads = q.reshape(c, H_kv, H // H_kv, D).permute(1, 2, 0, 3).reshape(H_kv, H // H_kv * c, D)
    return torch.bmm(q_heads, k.permute(1, 2, 0)).view(H, c, span)


def _in_order(parts: list[tuple[Tensor, Tensor, Tensor]], H: int) -> tuple[Tensor, Tensor, Tensor]:
    """The (head, query, key) lists of chunks in query order, each sorted, as one sorted list: the
    entries of head ``h`` are those of every chunk in turn, after the entries of the heads before."""
    pieces = [[x.split(torch.bincount(p[0], minlength=H).tolist()) for x in p] for p in parts]
    h, i, j = (torch.cat([piece[x][head] for head in range(H) for piece in pieces]) for x in range(3))
    return h, i, j


def dense_topk(
    q: Tensor, k: Tensor, num: int, lq: list[int], lk: list[int], *, causal: bool, exclude_self: bool, chunk: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(head, query, key) of each query's ``num`` best keys of its sequence, sorted; scored
    ``chunk`` queries at a time against the keys of their sequences only (``causal``: only up to
    the chunk's last query's position; scores are masked only in the columns some query of the
    chunk may not read)."""
    device, (n_q, H, _) = q.device, q.shape
    none = torch.empty(0, dtype=torch.long, device=device)
    if num < 1 or n_q == 0 or k.size(0) == 0:
        return none, none, none
    seq_cpu = torch.repeat_interleave(torch.arange(len(lq)), torch.tensor(lq, dtype=torch.long))
    seq_q, pos_q, _, _ = token_layout(lq, device)
    seq_k, pos_k, _, _ = token_layout(lk, device)
    ptr_q, ptr_k = [0], [0]
    for a, b in zip(lq, lk):
        ptr_q.append(ptr_q[-1] + a)
        ptr_k.append(ptr_k[-1] + b)
    finite = _finite(q, k)
    out: list[tuple[Tensor, Tensor, Tensor]] = []
    for s in range(0, n_q, chunk):
        e = min(s + chunk, n_q)
        last = int(seq_cpu[e - 1])
        lo, hi = ptr_k[int(seq_cpu[s])], ptr_k[last + 1]  # keys of the chunk's sequences
        if causal:  # no query of the chunk reads past the last one's position
            hi = min(hi, ptr_k[last] + (e - 1 - ptr_q[last]) + 1)
        if hi <= lo:
            continue
        # -- compute qk -- head-major: query head h = x * g + y reads key head x
        scores = _range_scores(q[s:e], k[lo:hi])  # [H, c, span]
        ok = seq_k[None, lo:hi] == seq_q[s:e, None]  # [c, span]
        if causal:
            ok &= pos_k[None, lo:hi] <= pos_q[s:e, None]
        if exclude_self:
            ok &= pos_k[None, lo:hi] != pos_q[s:e, None]
        cols = _best(scores, ok, min(num, hi - lo), finite)  # [H, c, width]
        valid = cols < hi - lo
        if bool(valid.all()):  # every row full: (head, query, slot) in order
            h = torch.arange(H, device=device).repeat_interleave(valid[0].numel())
            i = torch.arange(s, e, device=device).repeat_interleave(valid.size(2)).repeat(H)
            out.append((h, i, cols.reshape(-1) + lo))
        else:
            h, i, _ = valid.nonzero(as_tuple=True)  # sorted by (head, query, key) in the chunk
            out.append((h, i + s, cols[valid] + lo))
    if not out:
        return none, none, none
    return _in_order(out, H)


def checked_edge_list(
    name: str,
    edge_index: object,
    n_src: int,
    n_dst: int,
    device: torch.device,
    sizes: tuple[str, str] = ("k.size(0)", "q.size(0)"),
) -> tuple[Tensor, Tensor]:
    """Validate an ``edge_index`` ``[2, E]`` (plain or ``EdgeIndex``) of sources in ``[0, n_src)``
    and targets in ``[0, n_dst)`` (named ``sizes`` in messages); return ``(src, dst)``, long."""
    if isinstance(edge_index, EdgeIndex):
        size = edge_index.sparse_size()
        if (size[0] is not None and size[0] != n_src) or (size[1] is not None and size[1] != n_dst):
            raise ValueError(
                f"Expected '{name}' of sparse_size ({n_src}, {n_dst}) ({sizes[0]}, {sizes[1]}) (got {size})"
            )
        edge_index = edge_index.as_tensor()
    if not isinstance(edge_index, Tensor) or edge_index.dim() != 2 or edge_index.size(0) != 2:
        shape = tuple(edge_index.shape) if isinstance(edge_index, Tensor) else type(edge_index).__name__
        raise ValueError(f"Expected '{name}' to be an edge_index of shape [2, E] (got {shape})")
    if edge_index.is_floating_point() or edge_index.is_complex() or edge_index.dtype == torch.bool:
        raise ValueError(f"Expected '{name}' to be an integer tensor (got dtype {edge_index.dtype})")
    if edge_index.device != device:
        raise ValueError(f"Expected '{name}' on the device of 'q' ({device}) (got {edge_index.device})")
    src, dst = edge_index[0].long(), edge_index[1].long()
    for what, v, n, size_name in (("sources", src, n_src, sizes[0]), ("targets", dst, n_dst, sizes[1])):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= n):
            raise ValueError(
                f"Expected the {what} of '{name}' in [0, {size_name}={n}) (got values in "
                f"[{int(v.min())}, {int(v.max())}])"
            )
    return src, dst


def _check_allowed(
    allowed: object, allowed_head: object, H: int, n_src: int, n_dst: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validate ``allowed`` (and ``allowed_head``); return ``(src, dst, head)``."""
    src, dst = checked_edge_list("allowed", allowed, n_src, n_dst, device)
    if allowed_head is None:
        return src, dst, None
    if (
        not isinstance(allowed_head, Tensor)
        or allowed_head.dim() != 1
        or allowed_head.is_floating_point()
        or allowed_head.is_complex()
        or allowed_head.dtype == torch.bool
    ):
        raise ValueError(f"Expected 'allowed_head' to be a 1-D integer tensor (got {allowed_head!r})")
    if allowed_head.numel() != src.numel():
        raise ValueError(
            f"Expected 'allowed_head' to have one entry per edge of 'allowed' ({src.numel()}) "
            f"(got {allowed_head.numel()})"
        )
    if allowed_head.device != device:
        raise ValueError(f"Expected 'allowed_head' on the device of 'q' ({device}) (got {allowed_head.device})")
    head = allowed_head.long()
    if head.numel() and (int(head.min()) < 0 or int(head.max()) >= H):
        raise ValueError(
            f"Expected 'allowed_head' in [0, {H}) (the heads of 'q') (got values in "
            f"[{int(head.min())}, {int(head.max())}])"
        )
    return src, dst, head


# The allowed path ranks the keys of each row in padded tables: rows of 2^(b-1) < width <= 2^b keys
# share table b (at most two cells per edge). A block of shared rows whose keys lie in a range of
# at most BAND cells per edge is scored against that range (one matrix product, no gathered keys:
# windows, a decoding step's cache, rows that read every key).
BAND = 4
SCORES_PER_CHUNK = 1 << 22  # scores, or gathered key values, per block of rows


def _shared_rows(
    q: Tensor, k: Tensor, keys: Tensor, queries: Tensor, num: int, finite: bool, gathered: int
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(head, query, key) lists of the ``num`` best keys of the ``queries`` (ascending) whose keys
    (ascending, ``-1`` past them) are the rows of ``keys [c, width]`` (every head reads the same
    keys), in query order, each in (head, query, key) order: against the range of their keys, or
    from their keys gathered for ``gathered`` rows at a time."""
    (c, width), (_, H, D), H_kv = keys.shape, q.shape, k.size(1)
    g = H // H_kv
    ok = keys >= 0
    present = keys[ok]
    lo, hi = int(present.min()), int(present.max()) + 1
    if c * (hi - lo) <= BAND * present.numel():  # against the range of keys: [H, c, span]
        scores = _range_scores(q[queries], k[lo:hi])  # [H, c, span]
        allowed = torch.zeros(c, hi - lo + 1, dtype=torch.bool, device=q.device)
        allowed.scatter_(1, torch.where(ok, keys - lo, hi - lo), True)  # past a row's keys: the extra column
        cols = _best(scores, allowed[:, :-1], min(num, hi - lo), finite)  # [H, c, num]
        valid = cols < hi - lo
        h, i, _ = valid.nonzero(as_tuple=True)
        return [(h, queries[i], cols[valid] + lo)]
    out = []
    for t in range(0, c, gathered):
        part, part_ok = keys[t : t + gathered], ok[t : t + gathered]
        kk = k[part.clamp(min=0)]  # [c', width, H_kv, D]: the keys of each row
        qq = q[queries[t : t + gathered]].reshape(part.size(0), H_kv, g, D)
        scores = torch.einsum("cxyd,cwxd->xycw", qq, kk).reshape(H, part.size(0), width)
        scores.masked_fill_(~part_ok, -math.inf)
        cols = _rank(scores, part_ok, min(num, width))  # [H, c', num]
        valid = cols < width
        taken = part.expand(H, -1, -1).gather(-1, cols.clamp(max=width - 1))
        h, i, _ = valid.nonzero(as_tuple=True)
        out.append((h, queries[t + i], taken[valid]))
    return out


def _head_rows(q: Tensor, k: Tensor, keys: Tensor, rows: Tensor, n_q: int, num: int) -> tuple[Tensor, Tensor, Tensor]:
    """(head, query, key) of the ``num`` best keys of the (head, query) ``rows`` (``head * n_q +
    query``, ascending) whose keys (ascending, ``-1`` past them) are the rows of ``keys [c,
    width]``, in (head, query, key) order."""
    width, g = keys.size(1), q.size(1) // k.size(1)
    ok = keys >= 0
    hr, ir = rows // n_q, rows % n_q
    kk = k[keys.clamp(min=0), (hr // g)[:, None]]  # [c, width, D]
    scores = torch.bmm(kk, q[ir, hr].unsqueeze(-1)).squeeze(-1)  # [c, width]
    scores.masked_fill_(~ok, -math.inf)
    cols = _rank(scores, ok, min(num, width))  # [c, num]
    valid = cols < width
    taken = keys.gather(-1, cols.clamp(max=width - 1))
    r, _ = valid.nonzero(as_tuple=True)
    return hr[r], ir[r], taken[valid]


def _padded_topk(
    q: Tensor, k: Tensor, num: int, row: Tensor, col: Tensor, n_q: int, *, shared: bool, chunk: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(head, query, key) of the ``num`` best keys of each row, sorted; ``row`` / ``col``: the
    distinct allowed pairs sorted by (row, key), a row being a query (``shared``: every head's) or
    a (head, query) pair ``head * n_q + query``. Each row's keys fill a row of the padded table of
    its width, in key order, and are scored and ranked there (:func:`_rank`: ties to the lower
    key), at most ``chunk`` rows at a time; blocks of shared rows within a narrow range of keys are
    scored against that range (:func:`_best`)."""
    device, (_, H, D), H_kv = q.device, q.shape, k.size(1)
    num_rows = n_q if shared else H * n_q
    counts = torch.bincount(row, minlength=num_rows)
    slot = torch.arange(row.numel(), device=device) - (counts.cumsum(0) - counts)[row]
    # table b: rows of 2^(b-1) < width <= 2^b keys
    table_of = torch.where(counts > 0, torch.ceil(torch.log2(counts.clamp(min=1).double())).long(), -1)
    finite = shared and _finite(q, k)
    out: list[tuple[Tensor, Tensor, Tensor]] = []
    tables = torch.unique(table_of[table_of >= 0]).tolist()
    position = torch.empty(num_rows, dtype=torch.long, device=device)  # of each row in its table
    for b in tables:
        rows = (table_of == b).nonzero().reshape(-1)  # [R] ascending
        width = int(counts[rows].max())
        position[rows] = torch.arange(rows.numel(), device=device)
        mine = table_of[row] == b
        table = torch.full((rows.numel(), width), -1, dtype=torch.long, device=device)  # -1 past a row's keys
        table[position[row[mine]], slot[mine]] = col[mine]
        if shared:
            gathered = max(1, min(chunk, SCORES_PER_CHUNK // (width * H_kv * D)))  # rows gathered at a time
            step = max(gathered, min(chunk, SCORES_PER_CHUNK // (width * H)))  # rows scored at a time
            for s in range(0, rows.numel(), step):
                out += _shared_rows(q, k, table[s : s + step], rows[s : s + step], num, finite, gathered)
        else:
            step = max(1, min(chunk, SCORES_PER_CHUNK // (width * D)))
            for s in range(0, rows.numel(), step):
                out.append(_head_rows(q, k, table[s : s + step], rows[s : s + step], n_q, num))
    if not out:
        return row[:0], row[:0], row[:0]
    if len(tables) == 1:  # the blocks are in row order
        return _in_order(out, H) if shared else tuple(torch.cat(x) for x in zip(*out))  # type: ignore[return-value]
    h, i, j = (torch.cat(x) for x in zip(*out))
    order = torch.argsort(h * n_q + i, stable=True)  # a row's keys stay in order: they come from one block
    return h[order], i[order], j[order]


def _allowed_topk(
    q: Tensor,
    k: Tensor,
    num: int,
    src: Tensor,
    dst: Tensor,
    head: Tensor | None,
    lq: list[int],
    lk: list[int],
    *,
    causal: bool,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(head, query, key) of each query's ``num`` best keys among its allowed edges, sorted."""
    device, (n_q, H, _), n_k = q.device, q.shape, k.size(0)
    if H * max(n_q, 1) * max(n_k, 1) > INT64_MAX:
        raise ValueError(
            f"Expected at most 2**63 - 1 (head, query, key) triples (got {H} heads, q.size(0)={n_q}, k.size(0)={n_k})"
        )
    if len(lq) > 1 or causal:  # keep the edges inside a sequence (and looking back)
        seq_q, pos_q, _, _ = token_layout(lq, device)
        seq_k, pos_k, _, _ = token_layout(lk, device)
        keep = seq_k[src] == seq_q[dst]
        if causal:
            keep &= pos_k[src] <= pos_q[dst]
        src, dst, head = src[keep], dst[keep], (None if head is None else head[keep])
    if head is None:  # one allowed graph for every head
        key = torch.unique(dst * n_k + src)  # [E] sorted by (target, source), distinct
        check_edges("topk", H * key.numel(), **edge_sizes(lq, lk))
    else:
        check_edges("topk", src.numel(), **edge_sizes(lq, lk))
        key = torch.unique((head * n_q + dst) * n_k + src)  # [E] sorted by (head, target, source)
    if key.numel() == 0:
        return key, key, key
    return _padded_topk(q, k, num, key // n_k, key % n_k, n_q, shared=head is None, chunk=chunk)


@torch.no_grad()
def topk(
    q: Tensor,
    k: Tensor,
    num_keys: int,
    *,
    allowed: Tensor | None = None,
    allowed_head: Tensor | None = None,
    scale: float | None = None,
    batch: Batch | None = None,
    lengths: BatchLengths | None = None,
    causal: bool = False,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Top-k attention: every query head keeps its ``num_keys`` highest-scoring keys.

    For query head :math:`h` and query :math:`i`, the score of key :math:`j` is
    :math:`s_{ij}^h = \mathrm{scale} \cdot \langle q_i^h, k_j^{\lfloor h/g \rfloor} \rangle` (so the
    ranking is the one of :math:`\langle q_i^h, k_j \rangle` for any ``scale > 0``), and

    .. math::
        \mathcal{N}_h(i) = \operatorname{top}_{\mathrm{num\_keys}} \{ s_{ij}^h : j \in A_h(i) \},

    where the allowed keys :math:`A_h(i)` are all keys of :math:`i`'s sequence (only local
    :math:`j \le i` when ``causal``) without ``allowed``, and the sources of the edges ``j -> i`` of
    ``allowed`` (for head :math:`h`: those with ``allowed_head == h``), restricted the same way to
    :math:`i`'s sequence (and to :math:`j \le i`), otherwise. The selection is exact: ties go to
    the lower key index; a row of fewer allowed keys than ``num_keys`` keeps all of them, a row
    without allowed keys stays empty. Queries and keys may be different node sets (cross
    attention).

    Args:
        q: queries ``[N_dst, H, D]``.
        k: keys ``[N_src, H_kv, D]``, same dtype and device, ``H % H_kv == 0``.
        num_keys: keys kept per query and head, ``>= 1``.
        allowed: the candidate edges, an ``edge_index`` ``[2, E]`` (plain integer tensor or
            ``torch_geometric.EdgeIndex``, any order, duplicates ignored); ``None``: every key of
            the query's sequence.
        allowed_head: ``[E]`` query head of each edge of ``allowed`` (a per-head allowed graph);
            ``None``: ``allowed`` is shared by all heads.
        scale: positive score scale, default ``1 / sqrt(D)``; it does not change the selection.
        batch: sorted sequence id of every token (self-attention), or a pair
            ``(batch_q, batch_k)`` (cross attention; sequence ``b`` of the queries reads
            sequence ``b`` of the keys).
        lengths: sequence lengths (self-attention), or a pair ``(lengths_q, lengths_k)``; give at
            most one of ``batch`` and ``lengths`` (neither: one sequence).
        causal: only keys at local positions ``j <= i``.
        chunk: queries scored at a time without ``allowed`` (a score block is
            ``[chunk, H, N_src]`` at most; default 256 on the CPU, 1024 elsewhere); with
            ``allowed``, at most ``chunk`` queries (per-head: (head, query) rows) at a time
            (default 1024). The selection does not depend on it.

    Returns:
        ``(edge_index [2, E], edge_head [E])``, sorted by (head, target, source).

    Example:
        >>> q = torch.tensor([[[1.0]], [[2.0]], [[-1.0]]])  # [3, 1, 1]
        >>> k = torch.tensor([[[1.0]], [[3.0]], [[-2.0]]])
        >>> edge_index, edge_head = topk(q, k, 2)
        >>> edge_index.tolist(), edge_head.tolist()
        ([[0, 1, 0, 1, 0, 2], [0, 0, 1, 1, 2, 2]], [0, 0, 0, 0, 0, 0])
        >>> topk(q, k, 1, causal=True)[0].tolist()
        [[0, 1, 2], [0, 1, 2]]
    """
    H, _ = check_qk(q, k)
    check_int("num_keys", num_keys, 1)
    if scale is not None:
        check_real("scale", scale, 0.0, math.inf, open_lo=True)
    check_bool("causal", causal)
    if chunk is not None:
        check_int("chunk", chunk, 1)
    lq, lk = sequence_pairs("topk", q, k, batch, lengths, bipartite=True)
    if allowed is None and allowed_head is not None:
        raise ValueError(
            f"Expected 'allowed_head' only with 'allowed' (got allowed=None and allowed_head of "
            f"shape {tuple(allowed_head.shape) if isinstance(allowed_head, Tensor) else allowed_head})"
        )
    num = min(num_keys, max(lk, default=0))  # a row never has more keys than its sequence
    q, k = detached_scores_dtype(q), detached_scores_dtype(k)
    if allowed is None:
        check_edges("topk", H * sum(a * min(num, b) for a, b in zip(lq, lk)), **edge_sizes(lq, lk))
        size = CHUNK.get(q.device.type, ALLOWED_CHUNK) if chunk is None else chunk
        h, i, j = dense_topk(q, k, num, lq, lk, causal=causal, exclude_self=False, chunk=size)
    else:
        src, dst, head = _check_allowed(allowed, allowed_head, H, k.size(0), q.size(0), q.device)
        size = ALLOWED_CHUNK if chunk is None else chunk
        h, i, j = _allowed_topk(q, k, num, src, dst, head, lq, lk, causal=causal, chunk=size)
    return torch.stack([j, i]), h
