r"""Hugging Face model objects and local checkpoints to graph models, by ``model_type``."""

from __future__ import annotations

import os

from ._common import Topologies, check_topology, model_type
from .bert import GraphBertModel
from .decoders import FAMILIES, GraphDecoderLM
from .gpt2 import GraphGPT2LMHeadModel
from .modernbert import GraphModernBertModel

SUPPORTED = ("bert", "gpt2", "modernbert", *FAMILIES)


def from_hf(model, *, topology: Topologies | None = None, backend: str = "auto"):
    """The graph model of a Hugging Face model object (weights copied), by its ``model_type``: BERT,
    GPT-2, ModernBERT, or a decoder family of :class:`~gnn_transformer.hf.GraphDecoderLM` (Llama,
    Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3, GPT-Neo)."""
    kind = model_type(model)
    if kind == "bert":  # one graph for every layer
        single = None if topology is None else check_topology(topology)
        return GraphBertModel.from_hf(model, topology=single, backend=backend)
    if kind == "gpt2":
        single = None if topology is None else check_topology(topology)
        return GraphGPT2LMHeadModel.from_hf(model, topology=single, backend=backend)
    if kind == "modernbert":
        return GraphModernBertModel.from_hf(model, topology=topology, backend=backend)
    if kind in FAMILIES:
        return GraphDecoderLM.from_hf(model, topology=topology, backend=backend)
    raise ValueError(
        f"Expected a Hugging Face model of a supported family, model_type one of {list(SUPPORTED)} "
        f"(got model_type {kind!r})"
    )


def _loader(transformers, kind: str):
    """The ``Auto`` class that reads a checkpoint of ``model_type`` ``kind`` with its head."""
    if kind == "bert":
        return transformers.AutoModel
    if kind == "modernbert":
        return transformers.AutoModelForMaskedLM
    return transformers.AutoModelForCausalLM


def from_pretrained(path: str, *, topology: Topologies | None = None, backend: str = "auto"):
    """Load a checkpoint of a supported family from the local directory ``path`` (no network) as a
    graph model. Weights missing from the checkpoint are never kept random: a BERT without pooler
    gets none, a GPT-2 / decoder without ``lm_head`` (a base model) a head tied to the embeddings, a
    ModernBERT without masked-LM head none; any other missing weight raises ``ValueError``."""
    if not os.path.isdir(str(path)):
        raise ValueError(f"Expected 'path' to be a local directory with a saved model (got {path!r})")
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "gnn_transformer.hf.from_pretrained needs transformers: pip install 'gnn-transformer[hf]'"
        ) from err
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    kind = config.model_type
    if kind not in SUPPORTED:
        raise ValueError(
            f"Expected a checkpoint of a supported family, model_type one of {list(SUPPORTED)} (got "
            f"model_type {kind!r} in {str(path)!r})"
        )
    model, info = _loader(transformers, kind).from_pretrained(path, local_files_only=True, output_loading_info=True)
    # modules missing from the checkpoint were initialized randomly: drop them or refuse
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    optional = {"bert": ("pooler.",), "modernbert": ("head.", "decoder.")}.get(kind, ("lm_head.",))
    if any(not key.startswith(optional) for key in missing):
        raise ValueError(
            f"Expected a complete {type(model).__name__} checkpoint in {str(path)!r} (missing weights: {missing})"
        )
    if kind != "bert" and unexpected:  # as from_hf, refuse heads that are not the LM head
        raise ValueError(
            f"Expected a base model or {type(model).__name__} checkpoint in {str(path)!r} "
            f"(got weights a {type(model).__name__} does not use: {unexpected}); load it with "
            "transformers and pass its base model to from_hf"
        )
    if missing and kind == "bert":
        model.pooler = None
    elif missing:
        model = model.base_model  # the base model: its head is tied to the embeddings, as in from_hf
    return from_hf(model.eval(), topology=topology, backend=backend)


__all__ = ["from_hf", "from_pretrained", "SUPPORTED"]
