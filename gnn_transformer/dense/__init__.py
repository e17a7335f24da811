"""The dense reference: the same attention on padded tensors with a dense boolean mask.

Explicit matmul + softmax, sharing the parameters of the graph layers. Tests compare the graph path
with this one; the graph path never calls it.
"""
from .attention import edge_values_to_dense, multihead_attention, scaled_dot_product

__all__ = ["scaled_dot_product", "multihead_attention", "edge_values_to_dense"]
