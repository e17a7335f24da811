"""Shared fixtures and helpers of the tests: tolerances, the kernel tests' named graphs and inputs,
and their references (the dense one built on :mod:`gnn_transformer.dense`).

Graph cases are ``(edge_index, num_src, num_dst)``; the dense reference builds its mask directly
from the edge list (multiplicity ``c_ij`` of the edge ``j -> i`` enters as ``log c_ij``).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from torch_geometric import EdgeIndex  # noqa: E402

from gnn_transformer import dense  # noqa: E402
from gnn_transformer.kernels import _dropout, planner, attend_reference, plan_costs  # noqa: E402
from gnn_transformer.topology import causal  # noqa: E402

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with noise on every parameter (nonzero biases, non-unit norms, so that every
    parameter matters), in eval mode."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()


def _sorted_index(src, dst, n_src, n_dst) -> EdgeIndex:
    src, dst = torch.as_tensor(src, dtype=torch.long), torch.as_tensor(dst, dtype=torch.long)
    perm = torch.argsort(dst * max(n_src, 1) + src, stable=True)
    return EdgeIndex(torch.stack([src[perm], dst[perm]]), sparse_size=(n_src, n_dst), sort_order="col")


def _window(n: int, w: int, offset: int = 0):
    i = torch.arange(n).repeat_interleave(2 * w + 1)
    j = i + torch.arange(-w, w + 1).repeat(n)
    keep = (j >= 0) & (j < n)
    return j[keep] + offset, i[keep] + offset


def graph_case(name: str, seed: int = 0):
    """``(edge_index, num_src, num_dst)`` of a named small test graph."""
    g = torch.Generator().manual_seed(seed)
    if name == "causal":
        return causal(37), 37, 37
    if name == "window":
        src, dst = _window(45, 4)
        return _sorted_index(src, dst, 45, 45), 45, 45
    if name == "empty_rows":  # random, a third of the targets without edges
        n = 30
        keep = torch.rand(n, n, generator=g) < 0.25
        keep[torch.arange(0, n, 3)] = False
        dst, src = keep.nonzero(as_tuple=True)
        return _sorted_index(src, dst, n, n), n, n
    if name == "single_edge":
        return _sorted_index([2], [4], 6, 7), 6, 7
    if name == "no_edges":
        return _sorted_index([], [], 5, 4), 5, 4
    if name == "hub":  # target 3 hears every source twice over; source 0 talks to every target
        n = 70
        src = torch.cat([torch.arange(n), torch.zeros(n, dtype=torch.long), torch.randint(0, n, (n,), generator=g)])
        dst = torch.cat([torch.full((n,), 3), torch.arange(n), torch.randint(0, n, (n,), generator=g)])
        keep = (dst != 3) | (src != 0)
        return _sorted_index(src[keep], dst[keep], n, n), n, n
    if name == "bipartite":  # N_src != N_dst
        keep = torch.rand(17, 41, generator=g) < 0.3
        dst, src = keep.nonzero(as_tuple=True)
        return _sorted_index(src, dst, 41, 17), 41, 17
    if name == "batch":  # disjoint union: causal 10, window 20, random 15
        c = causal(10)
        w_src, w_dst = _window(20, 3, offset=10)
        keep = torch.rand(15, 15, generator=g) < 0.3
        r_dst, r_src = keep.nonzero(as_tuple=True)
        src = torch.cat([c[0].as_tensor(), w_src, r_src + 30])
        dst = torch.cat([c[1].as_tensor(), w_dst, r_dst + 30])
        return _sorted_index(src, dst, 45, 45), 45, 45
    if name == "multigraph":  # duplicated edges are separate messages
        src = torch.randint(0, 12, (90,), generator=g)
        dst = torch.randint(0, 10, (90,), generator=g)
        src = torch.cat([src, src[:30]])
        dst = torch.cat([dst, dst[:30]])
        return _sorted_index(src, dst, 12, 10), 12, 10
    if name == "unsorted":  # a plain LongTensor in random order
        keep = torch.rand(25, 25, generator=g) < 0.3
        dst, src = keep.nonzero(as_tuple=True)
        perm = torch.randperm(src.numel(), generator=g)
        return torch.stack([src[perm], dst[perm]]), 25, 25
    if name == "band_far":  # window 12 plus 2 random far sources per target: with blocks of 8 (or
        # 16) the band's tiles are dense and the far edges sparse, and auto picks split (not in GRAPHS)
        n = 96
        w_src, w_dst = _window(n, 12)
        f_src = torch.randint(0, n, (2 * n,), generator=g)
        f_dst = torch.arange(n).repeat_interleave(2)
        far = (f_src - f_dst).abs() > 12
        return _sorted_index(torch.cat([w_src, f_src[far]]), torch.cat([w_dst, f_dst[far]]), n, n), n, n
    raise KeyError(name)


def small_graph(name: str, seed: int = 0, limit: int = 20):
    """:func:`graph_case`, cut to its first ``limit`` sources and targets (a plain tensor) when it
    has more: the graphs of the (slow) Triton interpreter."""
    edge_index, n_src, n_dst = graph_case(name, seed=seed)
    if n_dst > limit or n_src > limit:
        plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
        keep = (plain[0] < limit) & (plain[1] < limit)
        edge_index, n_src, n_dst = plain[:, keep], min(n_src, limit), min(n_dst, limit)
    return edge_index, n_src, n_dst


GRAPHS = [
    "causal",
    "window",
    "empty_rows",
    "single_edge",
    "no_edges",
    "hub",
    "bipartite",
    "batch",
    "multigraph",
    "unsorted",
]


def split_graph():
    """``(edge_index, 9, 8)``: a full 4 x 4 block (targets 0-3 on sources 0-3, a dense tile with
    blocks of 4) and five scattered edges (target 5 without any), unsorted: split with blocks of
    4 tiles the block and fuses the rest, with or without dropout."""
    src = torch.tensor([5, 8, 0, 7, 8] + list(range(4)) * 4)
    dst = torch.tensor([4, 4, 6, 6, 7] + [i for i in range(4) for _ in range(4)])
    perm = torch.randperm(src.numel(), generator=torch.Generator().manual_seed(0))
    return torch.stack([src[perm], dst[perm]]), 9, 8


def assert_splits(edge_index, n_src, n_dst, **kw):
    """split's tiled part and its fused part are both non-empty."""
    costs = plan_costs(edge_index, "cpu", num_src=n_src, num_dst=n_dst, **kw)
    assert costs["dense_tiles"] > 0 and 0 < costs["dense_edges"] < costs["edges"]


def make_inputs(
    n_src, n_dst, num_edges, heads=4, kv_heads=2, dim=8, dtype=torch.float64, bias=True, seed=0, bias_shape=None
):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    q, k, v = r(n_dst, heads, dim), r(n_src, kv_heads, dim), r(n_src, kv_heads, dim)
    b = r(*(bias_shape or (num_edges, heads))) if bias else None
    return q, k, v, b


def dense_attention(q, k, v, edge_index, scale, edge_bias=None, return_lse=False, edge_head=None):
    """The dense reference of the kernel tests: :func:`gnn_transformer.dense.scaled_dot_product` in
    float64 on one padded sequence, its mask and bias straight from the edge list (the ``c``
    parallel edges ``j -> i`` with biases ``b_1..b_c`` enter as one cell of bias
    ``log sum_e exp(b_e)``: separate messages); differentiable (by autograd) in q, k, v and
    edge_bias. ``return_lse``: also the log-sum-exp ``[N_dst, H]`` of each row's scores (``-inf``
    on rows without an edge). ``edge_head``: a per-head graph (edge ``e`` for head
    ``edge_head[e]`` only), its mask ``[1, H, N_dst, N_src]``; ``edge_bias`` then ``[E]`` or
    ``[E, H]`` (read at each edge's head)."""
    plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    src, dst = plain[0].long(), plain[1].long()
    n_dst, heads, _ = q.shape
    n_src = k.size(0)
    device = q.device
    qd, kd, vd = (x.double() for x in (q, k, v))
    if edge_head is None:
        b = (
            torch.zeros(src.numel(), heads, dtype=torch.float64, device=device)
            if edge_bias is None
            else edge_bias.double()
        )  # [E, H]: every edge in every head
        cell, cells, lanes = dst * n_src + src, n_dst * n_src, heads  # [E]
    else:
        head = edge_head.long()
        b = torch.zeros(src.numel(), dtype=torch.float64, device=device) if edge_bias is None else edge_bias.double()
        b = b.gather(1, head[:, None]) if b.dim() == 2 else b[:, None]  # [E, 1]: each edge in its head
        cell, cells, lanes = (head * n_dst + dst) * n_src + src, heads * n_dst * n_src, 1  # [E]
    mask = torch.zeros(cells, dtype=torch.bool, device=device)
    mask[cell] = True
    # log sum_e exp(b_e) over the parallel edges of each cell (0 off the edges)
    top = torch.full((cells, lanes), -math.inf, dtype=torch.float64, device=device)
    top = top.scatter_reduce(0, cell[:, None].expand(-1, lanes), b.detach(), reduce="amax")
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    acc = torch.zeros_like(top).index_add(0, cell, torch.exp(b - top[cell]))
    logc = torch.where(acc > 0, torch.log(torch.where(acc > 0, acc, torch.ones_like(acc))) + top, torch.zeros_like(acc))
    if edge_head is None:
        mask = mask.view(n_dst, n_src)  # [N_dst, N_src]: True where the target hears the source
        bias = logc.view(n_dst, n_src, heads).permute(2, 0, 1).unsqueeze(0)  # [1, H, N_dst, N_src]
        head_mask = mask  # [N_dst, N_src]
    else:
        mask = mask.view(1, heads, n_dst, n_src)  # per head
        bias = logc.view(1, heads, n_dst, n_src)
        head_mask = mask[0]  # [H, N_dst, N_src]
    out, _ = dense.scaled_dot_product(
        qd.transpose(0, 1)[None], kd.transpose(0, 1)[None], vd.transpose(0, 1)[None], mask, scale=scale, bias=bias
    )  # [1, H, N_dst, D]
    out = out[0].transpose(0, 1)  # [N_dst, H, D]
    if not return_lse:
        return out
    # the library's weights are exp(s - lse): the scores again, for the log-sum-exp itself
    kd = kd.repeat_interleave(heads // kd.size(1), 1)
    s = torch.einsum("ihd,jhd->hij", qd, kd) * scale + bias[0]  # [H, N_dst, N_src]
    row = head_mask.any(-1)  # [N_dst] or [H, N_dst]
    s = s.masked_fill(~head_mask, -math.inf).masked_fill(~row[..., None], 0.0)  # empty rows: finite gradients
    lse = torch.logsumexp(s, -1).masked_fill(~row, -math.inf)  # [H, N_dst]
    return out, lse.t()  # [N_dst, H]


def dropout_reference(q, k, v, edge_index, scale, bias, p, seed):
    """Per-edge attention with the kernels' dropout mask, ``(out, lse)``:
    ``out_i = sum_j m_ji alpha_ji v_j``, the mask of column ``c`` keyed by its position in the
    target-sorted order (``c`` itself for a sorted graph). Neither library reference applies a
    dropout mask; the log-sum-exp is :func:`~gnn_transformer.kernels.attend_reference`'s."""
    plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    src, dst = plain[0], plain[1]
    num_edges = src.numel()
    graph = planner.prepare(edge_index, k.size(0), q.size(0))
    if graph.perm is None:  # sorted graphs: positions are columns
        assert bool((dst[1:] >= dst[:-1]).all())
        position = torch.arange(num_edges)
    else:  # perm[position] = column: a permutation that sorts the columns by target
        perm = graph.perm
        assert torch.equal(torch.sort(perm).values, torch.arange(num_edges))
        assert bool((dst[perm][1:] >= dst[perm][:-1]).all())
        position = torch.empty_like(perm)
        position[perm] = torch.arange(num_edges)
    group = q.size(1) // k.size(1)
    s = (q[dst] * k[src].repeat_interleave(group, 1)).sum(-1) * scale  # [E, H]
    if bias is not None:
        s = s + bias
    _, lse = attend_reference(q, k, v, edge_index, scale=scale, edge_bias=bias, return_lse=True)
    alpha = torch.exp(s - lse[dst])  # [E, H]
    m = torch.stack([_dropout.keep_scale(seed, position, h, p, q.dtype) for h in range(q.size(1))], 1)
    msg = (alpha * m).unsqueeze(-1) * v[src].repeat_interleave(group, 1)  # [E, H, D]
    out = torch.zeros(q.shape, dtype=q.dtype).index_add(0, dst, msg)
    return out, lse


def weighted_loss(out, lse, w):
    """A loss on both results: ``out`` weighed by ``w``, plus the finite log-sum-exps."""
    return (out * w).sum() + 0.3 * lse[torch.isfinite(lse)].sum()


def assert_matches_dense(
    fn,
    edge_index,
    n_src,
    n_dst,
    dtype,
    *,
    bias=True,
    heads=4,
    kv_heads=2,
    scale=0.45,
    seed=0,
    edge_head=None,
    bias_shape=None,
):
    """``fn(q, k, v, edge_bias) -> (out, lse)`` on inputs of ``dtype`` equals :func:`dense_attention`
    (float64 autograd on the same values): the output, the log-sum-exp (``-inf`` exactly on the
    rows without an edge) and the gradients in q, k, v and edge_bias of a loss on both, at 1e-10
    in float64 and 1e-5 in float32 (the float64 results cast down). ``edge_head``: a per-head
    graph (``bias_shape`` ``(E,)`` or ``(E, H)``)."""
    num_edges = edge_index.size(1)
    q, k, v, b = make_inputs(
        n_src,
        n_dst,
        num_edges,
        heads=heads,
        kv_heads=kv_heads,
        dtype=dtype,
        bias=bias,
        seed=seed,
        bias_shape=bias_shape,
    )
    inputs = [x for x in (q, k, v, b) if x is not None]
    up = [x.detach().double().requires_grad_() for x in inputs]
    out, lse = fn(q, k, v, b)
    ref, ref_lse = dense_attention(
        up[0], up[1], up[2], edge_index, scale, up[3] if bias else None, return_lse=True, edge_head=edge_head
    )
    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == (n_dst, heads, q.size(-1))
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lse.shape == (n_dst, heads)
    torch.testing.assert_close(out, ref.to(dtype), **tol)
    plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    if edge_head is None:
        empty = torch.bincount(plain[1], minlength=n_dst) == 0  # [N_dst]
    else:  # [N_dst, H]
        cells = edge_head.long() * n_dst + plain[1].long()
        empty = torch.bincount(cells, minlength=heads * n_dst).view(heads, n_dst).t() == 0
    assert torch.isneginf(ref_lse[empty]).all() and torch.isfinite(ref_lse[~empty]).all()
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype), **tol)  # -inf only where the dense one is
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)  # the same weights for both

    def loss(o, l):
        return (o * w.to(o.dtype)).sum() + 0.3 * l.masked_fill(torch.isinf(l), 0.0).sum()

    got = torch.autograd.grad(loss(out, lse), inputs)
    want = torch.autograd.grad(loss(ref, ref_lse), up)
    for name, x, y in zip("qkvb", got, want):
        assert x.dtype == dtype
        torch.testing.assert_close(x, y.to(dtype), **tol, msg=lambda m, name=name: f"d{name}: {m}")


# Second derivatives in float32 round through about twice the operations of the first: PyTorch's own
# float32 dense attention, differentiated twice by autograd, is up to 1.1e-5 (relative) off the
# float64 values on the test graphs of assert_second_order_equal; the kernels up to 1.2e-5
SECOND_ORDER_TOL = {torch.float32: dict(atol=3e-5, rtol=3e-5), torch.float64: TOL[torch.float64]}


def _grads(loss, inputs, **kw):
    """``torch.autograd.grad`` of ``loss`` in ``inputs``, zeros where it does not depend on one
    (or on none: a graph without edges)."""
    if not loss.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, **kw)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def assert_second_order_equal(fn, reference, inputs, seed=0):
    """``fn(*inputs) -> (out, lse)`` has the first and second derivatives of ``reference`` (the same
    function in float64, on float64 copies of ``inputs``): the gradients ``g`` of a loss on both
    results, taken with ``create_graph=True``, and the gradients of a loss on ``g`` that is not
    linear in it (``sum(r . g + g . g / 2)``): first derivatives at 1e-10 in float64 and 1e-5 in
    float32, second derivatives at 1e-10 and :data:`SECOND_ORDER_TOL` in float32."""
    dtype = inputs[0].dtype
    tol = TOL[dtype]
    up = [x.detach().double().requires_grad_() for x in inputs]
    out, lse = fn(*inputs)
    ref, ref_lse = reference(*up)
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)
    r = [torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device) for x in inputs]

    def loss(o, l):
        return (o * w.to(o.dtype)).sum() + 0.3 * l.masked_fill(torch.isinf(l), 0.0).sum()

    def loss2(grads):
        zero = torch.zeros((), device=grads[0].device)
        return sum(((d * c.to(d.dtype)).sum() + 0.5 * (d * d).sum() for d, c in zip(grads, r)), zero)

    got = _grads(loss(out, lse), inputs, create_graph=True)
    want = _grads(loss(ref, ref_lse), up, create_graph=True)
    for name, x, y in zip("qkvb", got, want):
        torch.testing.assert_close(x, y.to(dtype), **tol, msg=lambda m, name=name: f"d{name}: {m}")
    for name, x, y in zip("qkvb", _grads(loss2(got), inputs), _grads(loss2(want), up)):
        assert x.dtype == dtype
        torch.testing.assert_close(
            x, y.to(dtype), **SECOND_ORDER_TOL[dtype], msg=lambda m, name=name: f"second order, {name}: {m}"
        )


def tiny_lm_checkpoint(tmp_path, *, wrapped=True, norm_first=True, nan=False):
    """``(path, model)``: a 2-layer ``GraphLM`` (vocabulary 13, width 16, 2 heads) saved as
    ``tmp_path/ckpt/model.pt`` with its ``config.json``, as ``train`` writes one (``wrapped``: in
    ``{"model": ..., "meta": {}}``); ``nan``: token 2's embedding holds a NaN, so every layer that
    reads it computes NaN attention and states."""
    import dataclasses
    import json

    from gnn_transformer.model import GraphLM, GraphTransformerConfig

    cfg = GraphTransformerConfig(vocab_size=13, d_model=16, nhead=2, num_layers=2, norm_first=norm_first, backend="pyg")
    model = GraphLM(cfg)
    state = model.state_dict()
    if nan:
        state["embed.weight"][2, 0] = float("nan")
    path = tmp_path / "ckpt" / "model.pt"
    path.parent.mkdir()
    torch.save({"model": state, "meta": {}} if wrapped else state, path)
    (path.parent / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    return path, model
