r"""Hugging Face models as graph models, with their weights.

:func:`from_hf` turns a ``transformers`` model object (or :func:`from_pretrained` a local directory;
nothing is downloaded) into a graph model, by its ``model_type``:

- BERT -> :class:`GraphBertModel` (:mod:`.bert`); GPT-2 -> :class:`GraphGPT2LMHeadModel` (:mod:`.gpt2`);
- Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Phi-3, GPT-Neo -> :class:`GraphDecoderLM`
  (:mod:`.decoders`), each layer on its native graph (causal, or the family's sliding window);
- ModernBERT -> :class:`GraphModernBertModel` (:mod:`.modernbert`), local layers on a symmetric window.

The graph models accept Hugging Face's calling convention, ``model(input_ids=..., attention_mask=...,
position_ids=...)``: the real tokens (``attention_mask == 1``) become the nodes, padding is dropped,
the token graph comes from ``topology`` (a callable ``lengths -> edge_index`` or ``lengths ->
(edge_index, edge_head)``, a per-head graph; or one per layer), and the outputs are scattered back to
Hugging Face's shapes with zeros at padded positions (:class:`GraphModelOutput`). With the default
graphs the outputs equal Hugging Face's at every real token (``tests/test_hf.py``,
``tests/test_hf_decoders.py``). :func:`to_hf` exports back (every family above).

``transformers`` is only needed by :func:`from_pretrained` and :func:`to_hf` (the optional extra ``[hf]``).
"""

from ._common import GraphModelOutput, causal_lm_loss, masked_lm_loss
from .bert import GraphBertEmbeddings, GraphBertModel, bert_hf_state_dict, bert_state_dict
from .decoders import DecoderConfig, GraphDecoderLayer, GraphDecoderLM, RopeConfig, decoder_config
from .export import decoder_hf_state_dict, decoder_state_dict, to_hf
from .gpt2 import GraphGPT2LMHeadModel, gpt2_hf_state_dict, gpt2_state_dict
from .load import SUPPORTED, from_hf, from_pretrained
from .modernbert import GraphModernBertModel, modernbert_hf_state_dict, modernbert_state_dict

__all__ = [
    "GraphModelOutput",
    "GraphBertModel",
    "GraphBertEmbeddings",
    "GraphGPT2LMHeadModel",
    "GraphDecoderLM",
    "GraphDecoderLayer",
    "GraphModernBertModel",
    "DecoderConfig",
    "RopeConfig",
    "decoder_config",
    "bert_state_dict",
    "bert_hf_state_dict",
    "gpt2_state_dict",
    "gpt2_hf_state_dict",
    "decoder_state_dict",
    "decoder_hf_state_dict",
    "modernbert_state_dict",
    "modernbert_hf_state_dict",
    "causal_lm_loss",
    "masked_lm_loss",
    "from_hf",
    "from_pretrained",
    "to_hf",
    "SUPPORTED",
]
