"""Selectors: a per-head graph chosen from the data, the queries and keys of one layer.

A selector turns queries ``q`` ``[N_dst, H, D]`` and keys ``k`` ``[N_src, H_kv, D]`` into a
per-head graph ``(edge_index, edge_head)``: the edge ``j -> i`` (``edge_index[:, e] == (j, i)``,
row 0 the source/key, row 1 the target/query) exists for query head ``edge_head[e]`` only. Query
head ``h`` reads key head ``h // g`` with ``g = H // H_kv`` (grouped-query attention).

Every selector returns plain ``torch.long`` tensors on ``q``'s device, sorted by (head, target,
source) without duplicated edges: the kernels relabel node ``(h, i)`` as ``h * N + i``, so the
order is target-sorted there. The selection is not differentiated (it runs under
``torch.no_grad()`` on detached inputs); scores are computed in float32 (float64 for float64
inputs); no ``[N, N]`` score tensor or mask is built.

A batch is a disjoint union of sequences, given as a PyG-style sorted ``batch`` vector or a list of
``lengths``; a query never selects a key of another sequence, and positions (``causal``, blocks,
sorted chunks) are local to each sequence. Edges are counted (exactly or as an upper bound) before
they are allocated and refused above the edge budget (:func:`gnn_transformer.topology.max_edges`).

A layer selects with an object instead (``GraphMultiheadAttention(..., select=TopK(64))``), called
as ``select(q, k, edge_index)`` with the graph the layer was given: the allowed edges. The result
is always a subset of them, per head. :class:`TopK` ranks the allowed edges themselves (any graph,
cross attention included); :class:`BlockTopK`, :class:`LSH` and :class:`Routing` select on the
sequences of the graph (:func:`sequence_lengths`: the maximal ranges of consecutive nodes no edge
crosses), then keep only the selected edges the graph holds. :func:`selector` builds them by name
(``"topk:num_keys=64"``, or a mapping from a TOML table or a model config); :data:`SELECTORS` names
them.

One file per selector: :mod:`.topk`, :mod:`.blocks`, :mod:`.lsh`, :mod:`.routing`; the objects a
layer calls in :mod:`.selectors`, by name in :mod:`.by_name`, shared plumbing in :mod:`._common`.

Words of this package:

- query chunk (``chunk`` of :func:`topk`): the queries scored at a time; a score block is
  ``[chunk, H, N_src]`` at most.
- block (:func:`block_topk`): ``block_size`` consecutive positions of one sequence, the last block
  of a sequence possibly shorter.
- bucket, sorted chunk (:func:`lsh`): an LSH hash value; ``chunk_size`` consecutive positions of
  the bucket-sorted order (Reformer's chunk).
- cluster (:func:`routing`): the tokens nearest to one centroid of one head.
- allowed graph: the edges a selection may keep (``allowed`` of :func:`topk`, the ``edge_index`` a
  selector object is called with).

Notation: ``N`` tokens, ``H`` query heads, ``H_kv`` key heads, ``g = H // H_kv``, ``D`` head dim,
``E`` edges.
"""

from .blocks import BLOCK_CHUNK, block_topk
from .by_name import SELECTORS, selector
from .lsh import lsh
from .routing import ASSIGN_CHUNK, routing
from .selectors import LSH, BlockTopK, Routing, TopK, sequence_lengths
from .topk import topk

__all__ = [
    "topk",
    "block_topk",
    "lsh",
    "routing",
    "sequence_lengths",
    "TopK",
    "BlockTopK",
    "LSH",
    "Routing",
    "SELECTORS",
    "selector",
    "BLOCK_CHUNK",
    "ASSIGN_CHUNK",
]
