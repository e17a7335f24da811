"""Fast attention on token graphs: :func:`attend` over every backend, without ``[E, H, D]``.

A call goes :mod:`.dispatch` (checks, backend and implementation) -> one backend file:
``fused_triton.py`` / ``fused_torch.py`` (``fused``: the target-sorted CSR), ``tiled_triton.py`` /
``tiled_torch.py`` (``tiled``: tiles of the adjacency), both and :mod:`.merge` (``split``);
:mod:`.planner` turns an edge list into the graph the kernels read (its target-sorted CSR, cached
per graph), recognizes what the graph is (an implicit graph; full or causal attention per document,
which ``auto`` runs through PyTorch's own attention kernels, :mod:`.sdpa`; on the GPU an interval
graph such as a sliding window, which it runs through FlexAttention, :mod:`.flex`) and picks the
backend under ``auto``. Every backend file builds on :mod:`.primitives` (the one autograd function, a
forward and a backward over a graph structure, and the small tensor idioms); the Triton files also
share :mod:`.triton_common` (jit helpers, launches) and :mod:`._pieces`. :mod:`.higher_order` gives
that autograd function its backward pass under ``create_graph=True`` (gradients differentiated
again), by recomputation per edge (:mod:`.reference`).

Glossary (each word has this one meaning in this package):

- **tile**: a ``Bq x Bk`` block of the adjacency (query block x key block), with a mask of its
  cells unless every cell is an edge (:mod:`.tiling`).
- **chunk**: rows (in :func:`edge_weights`, edges) processed together on the PyTorch paths, to
  bound their memory (``max_edges``, ``max_cells``, ``chunk``).
- **piece**: a cut of a long row (or, in ``dK`` / ``dV``, column) for load balance on the GPU,
  merged afterwards (:mod:`._pieces`).
- **part**: one of the edge subsets ``split`` runs, the tiled one or the fused one
  (:func:`.planner.edge_parts`).
- **merge**: combining partial results through their log-sum-exps (:mod:`.merge`).
- **group**: the query heads that share one key/value head (grouped-query attention).
- **per-head graph**: ``edge_index`` plus ``edge_head``, each edge for one query head; run as a
  one-head graph on (head, token) nodes (:mod:`.heads`).
- **implicit graph**: a block structure (``topology.BlockGraph``) given to :func:`attend` instead
  of an ``edge_index``: its tiles run without an edge list (:mod:`.implicit`).
"""

from .dispatch import BACKENDS, IMPLS, attend, attend_dense, check_implicit_options, edge_weights, triton_available
from .fused_torch import DEFAULT_MAX_EDGES
from .heads import head_inputs, heads_to_nodes, nodes_to_heads
from .merge import merge_partials
from .planner import (
    BLOCK_SIZE,
    CUDA_CORE_BLOCK_SIZE,
    DROPOUT_COST,
    MAX_BLOCK_SIZE,
    MERGE_COST,
    ROW_COST,
    TILE_COST,
    BlockStructure,
    auto_kernel,
    choose_backend,
    clear_cache,
    default_block_size,
    is_block_structure,
    plan_costs,
)
from .reference import attend_reference
from .tiled_torch import DEFAULT_MAX_CELLS

__all__ = [
    "attend",
    "attend_dense",
    "edge_weights",
    "auto_kernel",
    "choose_backend",
    "plan_costs",
    "attend_reference",
    "merge_partials",
    "triton_available",
    "clear_cache",
    "BACKENDS",
    "TILE_COST",
    "ROW_COST",
    "MERGE_COST",
    "DROPOUT_COST",
    "BLOCK_SIZE",
    "CUDA_CORE_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "DEFAULT_MAX_EDGES",
    "DEFAULT_MAX_CELLS",
    "IMPLS",
    "default_block_size",
    "head_inputs",
    "heads_to_nodes",
    "nodes_to_heads",
    "BlockStructure",
    "is_block_structure",
    "check_implicit_options",
]
