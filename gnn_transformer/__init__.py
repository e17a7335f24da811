"""gnn-transformer: transformers as graph neural networks.

Attention is message passing on an explicit directed token graph: query ``i`` may attend to key
``j`` exactly when the graph has the edge ``j -> i``.
"""
__version__ = "0.1.0"
