"""gnn-transformer: transformers as graph neural networks.

Attention is message passing on an explicit directed token graph: query ``i`` may attend to key
``j`` exactly when the graph has the edge ``j -> i``.
"""

from . import dense, topology
from .attention import GraphMultiheadAttention
from .decoding import KVCache, generate
from .layers import (
    GraphTransformerDecoder,
    GraphTransformerDecoderLayer,
    GraphTransformerEncoder,
    GraphTransformerEncoderLayer,
)
from .model import GraphEncoderModel, GraphLM, GraphTransformer, GraphTransformerConfig
from .padding import from_padded, padding_mask, to_padded
from .position import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    alibi_edge_bias,
    alibi_slopes,
    sinusoidal_embedding,
)
from .variants import LinearAttention, MLPProjectionAttention, SigmoidAttention

__version__ = "0.1.0"

__all__ = [
    "GraphMultiheadAttention",
    "from_padded",
    "to_padded",
    "padding_mask",
    "dense",
    "topology",
    "GraphTransformerEncoderLayer",
    "GraphTransformerDecoderLayer",
    "GraphTransformerEncoder",
    "GraphTransformerDecoder",
    "GraphTransformer",
    "GraphTransformerConfig",
    "GraphEncoderModel",
    "GraphLM",
    "SinusoidalPositionalEmbedding",
    "LearnedPositionalEmbedding",
    "RotaryEmbedding",
    "sinusoidal_embedding",
    "alibi_slopes",
    "alibi_edge_bias",
    "SigmoidAttention",
    "LinearAttention",
    "MLPProjectionAttention",
    "KVCache",
    "generate",
]
