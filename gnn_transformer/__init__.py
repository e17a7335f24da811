"""gnn-transformer: transformers as graph neural networks.

Attention is message passing on an explicit directed token graph: query ``i`` may attend to key
``j`` exactly when the graph has the edge ``j -> i``.
"""
from . import dense, topology
from .attention import GraphMultiheadAttention
from .padding import from_padded, padding_mask, to_padded

__version__ = "0.1.0"

__all__ = ["GraphMultiheadAttention", "from_padded", "to_padded", "padding_mask", "dense",
           "topology"]
