"""The dense reference: the same attention on padded tensors with a dense boolean mask.

Explicit matmul + softmax, sharing the parameters of the graph layers. Tests compare the graph path
with this one; the graph path never calls it.
"""

from .attention import edge_values_to_dense, multihead_attention, scaled_dot_product
from .layers import attention, encoder, encoder_layer, encoder_model, key_value
from .position import alibi_bias, alibi_slopes, apply_rope, rope_rotation, sinusoidal_table
from .variants import linear_attention, sigmoid_attention

__all__ = [
    "scaled_dot_product",
    "multihead_attention",
    "edge_values_to_dense",
    "attention",
    "key_value",
    "encoder_layer",
    "encoder",
    "encoder_model",
    "sinusoidal_table",
    "rope_rotation",
    "apply_rope",
    "alibi_slopes",
    "alibi_bias",
    "sigmoid_attention",
    "linear_attention",
]
