"""Token graphs: attention patterns as explicit directed edge sets ``j -> i``.

Every builder takes ``n`` (one sequence) or a list of lengths (a batch, disjoint union) and
returns a ``torch_geometric.EdgeIndex`` sorted by target without duplicated edges; every builder
has a brute-force ``*_predicate`` twin. A graph of more edges than the budget (:func:`max_edges`,
``DEFAULT_MAX_EDGES``: ``2**32``, or what a smaller machine's memory can build, unless raised) is
refused before anything is allocated. See
``docs/topology.md`` for the catalogue.
"""

from ._common import DEFAULT_MAX_EDGES, as_lengths, batch_vector, max_edges, ptr_vector
from .basic import causal, causal_predicate, full, full_predicate
from .bigbird import bigbird, bigbird_predicate
from .combinators import difference, from_predicate, intersection, union
from .cross import cross, cross_predicate
from .document import document, document_lengths, document_predicate
from .expander import expander
from .exports import flex_attention_available, to_block_mask, to_flex_mask_mod, to_networkx
from .global_tokens import global_tokens, global_tokens_predicate
from .implicit import BlockGraph, interval_graph
from .graph_inputs import from_graph, from_graph_predicate, read_graph
from . import dynamic
from .heads import dilated_per_head, duo_attention, per_head, streaming, streaming_predicate
from .masks import from_dense_mask, is_multigraph, to_dense_mask
from .pictures import draw_per_head, draw_receptive_field, draw_topology
from .prefix_lm import prefix_lm, prefix_lm_predicate
from .random_graphs import edge_set_predicate, erdos_renyi, random
from .specs import BUILDERS, LayerPattern, Spec, build_spec, catalogue, load, read_spec
from .sparse_transformer import fixed, fixed_predicate, strided, strided_predicate
from .star import star, star_predicate
from .statistics import (
    DegreeStats,
    TopologyStats,
    diameter,
    hop_distances,
    layers_to_match,
    receptive_field,
    receptive_field_sizes,
    topology_stats,
)
from .windows import dilated, dilated_predicate, sliding_window, sliding_window_predicate

__all__ = [
    "as_lengths",
    "batch_vector",
    "ptr_vector",
    # builders and their predicate twins
    "full",
    "full_predicate",
    "causal",
    "causal_predicate",
    "sliding_window",
    "sliding_window_predicate",
    "dilated",
    "dilated_predicate",
    "strided",
    "strided_predicate",
    "fixed",
    "fixed_predicate",
    "global_tokens",
    "global_tokens_predicate",
    "bigbird",
    "bigbird_predicate",
    "random",
    "erdos_renyi",
    "edge_set_predicate",
    "star",
    "star_predicate",
    "expander",
    "document",
    "document_lengths",
    "document_predicate",
    "prefix_lm",
    "prefix_lm_predicate",
    "cross",
    "cross_predicate",
    "from_graph",
    "from_graph_predicate",
    "read_graph",
    "streaming",
    "streaming_predicate",
    # implicit graphs: tiles instead of edges
    "BlockGraph",
    "interval_graph",
    # per-head graphs (edge_index, edge_head); graphs chosen from the data: topology.dynamic
    "dynamic",
    "per_head",
    "dilated_per_head",
    "duo_attention",
    # the edge budget of every builder
    "max_edges",
    "DEFAULT_MAX_EDGES",
    # combinators
    "union",
    "intersection",
    "difference",
    "from_predicate",
    # specs (graphs/*.toml)
    "load",
    "read_spec",
    "build_spec",
    "catalogue",
    "Spec",
    "BUILDERS",
    "LayerPattern",
    # masks and exports
    "to_dense_mask",
    "from_dense_mask",
    "is_multigraph",
    "to_networkx",
    "to_flex_mask_mod",
    "to_block_mask",
    "flex_attention_available",
    # graph statistics and pictures
    "topology_stats",
    "TopologyStats",
    "DegreeStats",
    "layers_to_match",
    "receptive_field",
    "receptive_field_sizes",
    "hop_distances",
    "diameter",
    "draw_topology",
    "draw_receptive_field",
    "draw_per_head",
]
