"""Token graphs: attention patterns as explicit directed edge sets ``j -> i``."""
from ._common import as_lengths, batch_vector, ptr_vector
from .basic import causal, causal_predicate, full, full_predicate
from .masks import from_dense_mask, is_multigraph, to_dense_mask
from .random_graphs import erdos_renyi

__all__ = [
    "as_lengths", "batch_vector", "ptr_vector",
    "full", "full_predicate", "causal", "causal_predicate", "erdos_renyi",
    "to_dense_mask", "from_dense_mask", "is_multigraph",
]
