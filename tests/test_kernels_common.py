"""Shared graphs and references of the kernel tests (plus tests of the references themselves).

Graph cases are ``(edge_index, num_src, num_dst)``; the dense reference builds its mask directly
from the edge list (multiplicity ``c_ij`` of the edge ``j -> i`` enters as ``log c_ij``).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch_geometric import EdgeIndex

from gnn_transformer.kernels import attend_reference
from gnn_transformer.topology import causal


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
    raise KeyError(name)


GRAPHS = ["causal", "window", "empty_rows", "single_edge", "no_edges", "hub", "bipartite", "batch",
          "multigraph", "unsorted"]


def make_inputs(n_src, n_dst, num_edges, heads=4, kv_heads=2, dim=8, dtype=torch.float64, bias=True,
                seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    q, k, v = r(n_dst, heads, dim), r(n_src, kv_heads, dim), r(n_src, kv_heads, dim)
    b = r(num_edges, heads) if bias else None
    return q, k, v, b


def dense_attention(q, k, v, edge_index, scale, edge_bias=None):
    """Dense masked softmax in float64, the mask (and multiplicities) straight from the edge list."""
    plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    src, dst = plain[0], plain[1]
    n_dst, heads, dim = q.shape
    n_src, kv_heads = k.shape[:2]
    group = heads // kv_heads
    qd, kd, vd = (x.double() for x in (q, k, v))
    kd, vd = kd.repeat_interleave(group, 1), vd.repeat_interleave(group, 1)
    b = torch.zeros(src.numel(), heads, dtype=torch.float64) if edge_bias is None else edge_bias.double()
    # log sum_e exp(b_e) over the parallel edges j -> i: [H, N_dst, N_src]
    cell = dst * n_src + src
    top = torch.full((n_dst * n_src, heads), -math.inf, dtype=torch.float64)
    top = top.scatter_reduce(0, cell[:, None].expand(-1, heads), b.detach(), reduce="amax")
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    acc = torch.zeros_like(top).index_add(0, cell, torch.exp(b - top[cell]))
    logc = torch.where(acc > 0, torch.log(torch.where(acc > 0, acc, torch.ones_like(acc))) + top,
                       torch.full_like(acc, -math.inf))
    logc = logc.view(n_dst, n_src, heads).permute(2, 0, 1)
    s = torch.einsum("ihd,jhd->hij", qd, kd) * scale + logc  # [H, N_dst, N_src]
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    e = torch.exp(s - mx)
    tot = e.sum(-1, keepdim=True)
    w = e / torch.where(tot > 0, tot, torch.ones_like(tot))
    return torch.einsum("hij,jhd->ihd", w, vd)  # [N_dst, H, D]


@pytest.mark.parametrize("name", GRAPHS)
def test_reference_matches_dense(name):
    edge_index, n_src, n_dst = graph_case(name)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1))
    out = attend_reference(q, k, v, edge_index, scale=0.4, edge_bias=b)
    torch.testing.assert_close(out, dense_attention(q, k, v, edge_index, 0.4, b), atol=1e-10, rtol=1e-10)
    assert torch.isfinite(out).all()
