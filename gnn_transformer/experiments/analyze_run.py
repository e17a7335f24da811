"""The run behind ``gnn-transformer analyze``: attention sinks, hubs and massive activations of
one model.

Loads a model (a checkpoint of :class:`~gnn_transformer.model.GraphLM` /
:class:`~gnn_transformer.model.GraphEncoderModel` with its config JSON, the ``model.pt`` /
``best.pt`` of a ``gnn-transformer train`` run of a sequence task, ``lm`` or ``listops``, or a
Hugging Face model from a local directory), runs it once on token sequences under
:func:`gnn_transformer.analysis.record`, measures every layer and saves the measures and pictures.
The command's options and printed table live in :mod:`gnn_transformer.cli.analyze`.

Any graph a spec builds can be analysed: one graph for every head and layer; a per-head graph
(each head's weights over its own edges, recorded as ``[E, H]`` with zeros in the columns of the
other heads); per-layer graphs (each layer on its own); a selector (``causal+topk:num_keys=8``:
every layer attends along the graph it selects from its queries and keys, and that graph is what
is recorded).

Usage::

    gnn-transformer analyze --checkpoint run/model.pt --tokens ids.txt --out analysis/
    gnn-transformer analyze --hf-dir ./gpt2 --text prompt.txt --out analysis/ --compare-norm

Inputs: ``--tokens`` holds whitespace-separated integer ids, one sequence per line; ``--text`` one
text per line, tokenized with the tokenizer saved in ``--hf-dir`` (or ``--tokenizer``). The
sequences form one batch (a disjoint union of token graphs); sink scores use each sequence's first
token, pictures show the first sequence.

Outputs in ``--out``: ``summary.json`` (the per-layer measures), ``attention_<layer>.png`` (heat
maps per head), ``arcs_<layer>.png`` (attention drawn on the token graph), ``sink_scores.png``,
``activations.png`` and, with ``--compare-norm``, ``norm_comparison.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..analysis import LayerSummary, Trace, norm_placement, record, summarize
from ..attention import GraphMultiheadAttention
from ..model import GraphEncoderModel, GraphLM, GraphTransformerConfig
from ..topology import batch_vector
from ..topology.dynamic import selector
from ..topology.specs import LayerPattern
from .tasks import check_set_fits, host_memory_budget
from .topologies import per_length, resolve_topology

CONFIG_NAMES = ("config.json", "model_config.json")


# a drawn example's token: an int64 in a tensor, then an entry of a Python list (small ints are shared)
_LISTED_TOKEN = 8 + 8


@dataclass
class LoadedModel:
    """A model ready to analyse.

    Attributes:
        model: the module (in eval mode).
        forward: ``forward(ids [N], graph, pos [N]) -> output`` for a batch of sequences; ``graph``
            is an ``edge_index``, a per-head pair ``(edge_index, edge_head)`` or per-layer graphs
            (a ``LayerPattern`` or a list).
        graph: the token graph it was trained on: ``"causal"``, ``"full"``, the topology spec of
            a training run (``"sliding_window:window=3"``, see :mod:`.topologies`), or
            ``"native"``: each layer's own graph (``native``).
        tokenizer: a Hugging Face tokenizer, or the :class:`VocabularyTokenizer` of a training run.
        name: a short description for titles.
        examples: for a checkpoint of a training run, ``examples(k)`` draws ``k`` seeded sequences
            of its task (the input when no token file is given).
        vocab_size: token ids it takes are ``0 .. vocab_size - 1`` (``None``: unchecked).
        max_length: longest sequence its position table covers (``None``: no limit).
        language_model: ``forward`` returns next-token logits ``[N, vocab_size]`` of a causal
            language model (``forward_graph`` of ``model`` too: :mod:`gnn_transformer.streaming`
            runs it).
        causal_graphs: every graph is cut to its causal part (edges ``j -> i`` with ``j <= i``), as
            in the training of an ``lm`` run.
        trained_length: the longest sequence it was trained on, when known (an ``lm`` run's
            context); positions beyond it are untrained.
        native: for an imported Hugging Face model whose layers have graphs of their own (a
            causal graph or a sliding window per layer, ModernBERT's local and global layers),
            ``native(lengths)`` builds them, one per layer: the graph ``"native"``.
    """

    model: nn.Module
    forward: Callable[[Tensor, Any, Tensor], Any]
    graph: str
    tokenizer: Any = None
    name: str = "model"
    examples: Callable[[int], list[list]] | None = None
    vocab_size: int | None = None
    max_length: int | None = None
    language_model: bool = False
    causal_graphs: bool = False
    trained_length: int | None = None
    native: Callable[[list[int]], list[Any]] | None = None


def native_builder(model: nn.Module) -> Callable[[list[int]], list[Any]] | None:
    """``lengths -> [graph of layer 0, ...]`` from a model's ``native_topologies()`` (the Hugging
    Face decoder families and ModernBERT), each distinct builder run once; ``None`` without them."""
    native = getattr(model, "native_topologies", None)
    if not callable(native):
        return None
    builders = native()

    def build(lengths: list[int]) -> list[Any]:
        built: dict[int, Any] = {}  # one graph per distinct builder (layers of one window share it)
        for builder in builders:
            if id(builder) not in built:
                built[id(builder)] = builder(list(lengths))
        return [built[id(builder)] for builder in builders]

    return build


@dataclass
class Analysis:
    """What ``analyze`` measured: traces and per-layer rows, by variant (``"model"`` and, when
    compared, ``"pre-norm"`` / ``"post-norm"``)."""

    traces: dict[str, Trace]
    rows: dict[str, list[LayerSummary]]
    lengths: list[int]
    labels: list[str]
    graph: str
    extra: dict[str, Any] = field(default_factory=dict)


class VocabularyTokenizer:
    """The tokenizer of a training run: characters (an ``lm`` run) or whitespace-separated words
    (ListOps) to ids, id ``i`` being ``tokens[i]``; ``prefix`` ids start every sequence (ListOps'
    ``[CLS]``). It answers the calls the commands make of a Hugging Face tokenizer.

    Example:
        >>> tok = VocabularyTokenizer("abc")
        >>> tok.encode_stream("cab"), tok("ab")["input_ids"], tok.convert_ids_to_tokens([2, 0])
        ([2, 0, 1], [0, 1], ['c', 'a'])
    """

    def __init__(self, tokens: Sequence[str], *, words: bool = False, prefix: Sequence[int] = ()) -> None:
        self.tokens, self.words, self.prefix = list(tokens), words, list(prefix)
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def encode_stream(self, text: str) -> list[int]:
        """Ids of ``text`` (no prefix); a ``ValueError`` naming the first token outside the vocabulary."""
        pieces = text.split() if self.words else text
        ids = [self.index.get(piece, -1) for piece in pieces]
        if -1 in ids:
            at = ids.index(-1)
            piece = pieces[at]
            shown = f"{piece!r}" + (f" (U+{ord(piece):04X})" if len(piece) == 1 else "")
            unit = "word" if self.words else "character"
            raise ValueError(
                f"Expected only {unit}s of the model's vocabulary ({len(self.tokens)} {unit}s) in the "
                f"text (got {shown} at {unit} {at})"
            )
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = self.encode_stream(text)
        return {"input_ids": self.prefix + ids if add_special_tokens else ids}

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.tokens[i] for i in ids]


def call_with_graph(model: Callable[..., Any], ids: Tensor, graph: Any, **kwargs: Any) -> Any:
    """``model(ids, edge_index, edge_head=..., **kwargs)`` for a graph of any kind: an
    ``edge_index``, a per-head pair (passed as ``edge_head``) or per-layer graphs (passed as they
    are)."""
    if isinstance(graph, tuple):
        edge_index, edge_head = graph
        return model(ids, edge_index, edge_head=edge_head, **kwargs)
    return model(ids, graph, **kwargs)


# ------------------------------------------------------------------ loading models
def _find_config(obj: Any) -> dict | None:
    """The first dict (depth-first under ``model_config``/``model``/``config``) with model fields."""
    if not isinstance(obj, dict):
        return None
    if "d_model" in obj and "nhead" in obj:
        return obj
    for key in ("model_config", "model", "config"):
        found = _find_config(obj.get(key))
        if found is not None:
            return found
    return None


def _config_from_dict(values: dict, source: str) -> GraphTransformerConfig:
    names = {f.name for f in dataclasses.fields(GraphTransformerConfig)}
    kwargs = {k: v for k, v in values.items() if k in names}
    try:
        return GraphTransformerConfig(**kwargs)
    except TypeError as err:
        raise ValueError(f"Could not build a GraphTransformerConfig from {source}: {err}") from err


def load_checkpoint_model(
    checkpoint: str | Path, config: str | Path | None = None, *, backend: str | None = None
) -> LoadedModel:
    """A :class:`GraphLM` or :class:`GraphEncoderModel` from a checkpoint and its config.

    The checkpoint is a state dict, or a dict with the state dict under ``"model"`` (as written by
    :func:`gnn_transformer.experiments.training.save_checkpoint`), read with
    ``torch.load(weights_only=True)``. The config (fields of :class:`GraphTransformerConfig`, at
    the top level or under ``"model_config"``/``"model"``/``"config"``) comes from ``config``, else
    the checkpoint's ``meta``, else ``<checkpoint>.json``, ``config.json`` or
    ``model_config.json`` next to it. A ``"class"`` entry (``"GraphLM"`` or
    ``"GraphEncoderModel"``) picks the class; otherwise a model with a token vocabulary and a head
    of ``vocab_size`` outputs is a ``GraphLM``.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at '--checkpoint' {str(path)!r}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load fails on a non-checkpoint file with
        # RuntimeError, UnpicklingError, EOFError, IndexError, ... (and on unsafe contents)
        raise ValueError(
            f"Could not read the checkpoint {str(path)!r}: not a file of torch.save "
            f"that loads with weights_only=True ({type(err).__name__})"
        ) from err
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        state, meta = payload["model"], payload.get("meta")
        meta = meta if isinstance(meta, dict) else {}
        if config is None and isinstance(meta.get("run"), dict) and "task" in meta["run"]:
            return _load_run_checkpoint(path, state, meta, backend)
    elif isinstance(payload, dict) and all(isinstance(v, Tensor) for v in payload.values()):
        state, meta = payload, {}
    else:
        raise ValueError(f"Expected a state dict (or a dict with one under 'model') in {str(path)!r}")

    candidates = [Path(config)] if config is not None else []
    if config is None:
        candidates += [path.with_suffix(".json")] + [path.parent / n for n in CONFIG_NAMES]
    values, source = (_find_config(meta), "the checkpoint's meta") if config is None else (None, "")
    for candidate in candidates:
        if values is not None:
            break
        if candidate.is_file():
            option = "'--config' " if config is not None else "the config "
            try:
                loaded = json.loads(_read_text(candidate, option))
            except json.JSONDecodeError as err:
                raise ValueError(f"Expected JSON in {option}{str(candidate)!r} ({err})") from None
            values, source = _find_config(loaded), str(candidate)
            if values is None and config is not None:
                what = (
                    f"an object with keys {sorted(loaded)[:8]}" if isinstance(loaded, dict) else type(loaded).__name__
                )
                raise ValueError(
                    f"Expected a model config in '--config' {str(candidate)!r}: a JSON object with 'd_model' and "
                    f"'nhead' (at its top or under 'model_config', 'model' or 'config'; got {what})"
                )
            if values is not None and isinstance(loaded, dict) and "class" in loaded:
                values = {**values, "class": loaded["class"]}
        elif config is not None:
            missing = "is a directory" if candidate.is_dir() else "does not exist"
            raise FileNotFoundError(f"'--config' {str(candidate)!r} {missing}: expected a JSON model config file")
    if values is None:
        raise ValueError(
            f"Found no model config for {str(path)!r}: pass '--config' or put "
            f"{' / '.join(CONFIG_NAMES)} next to the checkpoint"
        )
    cfg = _config_from_dict(values, source)
    if cfg.vocab_size is None:
        raise ValueError(
            f"The model in {str(path)!r} takes node features (vocab_size is None): analyze needs a token model"
        )
    if backend is not None:
        cfg = dataclasses.replace(cfg, backend=backend)
    cls_name = values.get("class") or meta.get("class")
    if cls_name is None:
        head = state.get("head.weight")
        is_lm = (
            cfg.vocab_size is not None
            and cfg.output_dim is None
            and head is not None
            and head.size(0) == cfg.vocab_size
        )
        cls_name = "GraphLM" if is_lm else "GraphEncoderModel"
    classes = {"GraphLM": GraphLM, "GraphEncoderModel": GraphEncoderModel}
    if cls_name not in classes:
        raise ValueError(f"Expected 'class' to be one of {sorted(classes)} (got {cls_name!r})")
    model = classes[cls_name](cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"The checkpoint {str(path)!r} does not fit its config ({source}): {err}") from err
    model.eval()

    def forward(ids: Tensor, graph: Any, pos: Tensor):
        return call_with_graph(model, ids, graph, pos=pos)

    return LoadedModel(
        model,
        forward,
        "causal" if cls_name == "GraphLM" else "full",
        None,
        f"{cls_name} ({path.name})",
        vocab_size=cfg.vocab_size,
        max_length=cfg.max_positions if cfg.position == "learned" else None,
        language_model=cls_name == "GraphLM",
    )


def _load_run_checkpoint(path: Path, state: dict, meta: dict, backend: str | None) -> LoadedModel:
    """The model of a ``gnn-transformer train`` / ``compare`` run, rebuilt from its run config: a
    sequence task's or ListOps' model as trained, a language model as the library's causal LM
    (:func:`.lm.as_graph_lm`) with the run's character vocabulary."""
    from .models import EncoderConfig
    from .tasks import TASKS

    run = meta["run"]
    name = run["task"]
    if name not in TASKS and name not in ("lm", "listops"):
        raise ValueError(
            f"The checkpoint {str(path)!r} is of task {name!r}, whose model takes node "
            f"features or image patches: analyze needs a token model (tasks "
            f"{sorted(TASKS) + ['listops', 'lm']})"
        )
    try:
        model_config = EncoderConfig(**run.get("model", {}))
    except TypeError as err:
        raise ValueError(f"Could not rebuild the model of {str(path)!r} from its run config: {err}") from err
    if backend is not None:
        model_config = dataclasses.replace(model_config, backend=backend)
    table = state.get("pos.weight")
    if model_config.position == "learned" and isinstance(table, Tensor):  # the run may have enlarged it
        model_config = dataclasses.replace(model_config, max_positions=table.size(0))
    max_length = model_config.max_positions if model_config.position == "learned" else None
    if name == "lm":
        return _load_lm_run(path, state, meta, model_config, max_length)
    if name == "listops":
        return _load_listops_run(path, state, run, model_config, max_length)
    return _load_task_run(path, state, run, model_config, max_length)


def _load_state(model: nn.Module, state: dict, path: Path) -> nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"The checkpoint {str(path)!r} does not fit its run config: {err}") from err
    return model.eval()


def _load_task_run(path: Path, state: dict, run: dict, model_config: Any, max_length: int | None) -> LoadedModel:
    """A sequence task's :class:`~.models.SequenceModel`, with examples of its task."""
    from .models import SequenceModel
    from .tasks import get_task, sample_batch

    name = run["task"]
    try:
        task = get_task(name, run.get("train_sizes"), run.get("test_sizes"))
    except TypeError as err:
        raise ValueError(f"Could not rebuild the model of {str(path)!r} from its run config: {err}") from err
    model = _load_state(SequenceModel(task.vocab_size, task.num_classes, model_config), state, path)

    def forward(ids: Tensor, graph: Any, pos: Tensor):
        return model(ids, pos, graph)

    def examples(k: int) -> list[list]:
        check_set_fits("samples", k, task.train_sizes[1], _LISTED_TOKEN)
        batch = sample_batch(task, k, task.train_sizes, torch.Generator().manual_seed(0))
        return [s.tolist() for s in batch.tokens.split(batch.lengths)]

    return LoadedModel(
        model,
        forward,
        run.get("topology", "full"),
        None,
        f"{name} model ({path.name})",
        examples,
        vocab_size=task.vocab_size,
        max_length=max_length,
    )


def run_vocabulary(meta: dict, path: str | Path) -> str:
    """The characters of an ``lm`` run's vocabulary (id ``i`` is character ``i``): the run's
    ``meta["vocab"]`` when it holds one, else the sorted characters of the corpus its config names
    (:func:`.lm.load_corpus`; a relative ``text`` path is read from the current folder)."""
    from .lm import TextConfig, load_corpus

    vocab = meta.get("vocab")
    if isinstance(vocab, str) and vocab:
        return vocab
    text = meta["run"].get("text", {})
    try:
        config = TextConfig(**text)
    except TypeError as err:
        raise ValueError(f"Could not read the text config of the run of {str(path)!r}: {err}") from err
    if config.text is not None and not Path(config.text).is_file():
        raise ValueError(
            f"The vocabulary of the language model in {str(path)!r} is the set of characters of "
            f"its training text {config.text!r}, which is not a file from this folder: run from "
            "the folder the run was trained in, or with the text at that path"
        )
    return load_corpus(config).chars


def _load_lm_run(path: Path, state: dict, meta: dict, model_config: Any, max_length: int | None) -> LoadedModel:
    """An ``lm`` run's model as the library's causal LM, with its character vocabulary; examples
    are windows of the validation part of its text."""
    from .lm import TextConfig, as_graph_lm, load_corpus
    from .models import SequenceModel

    chars = run_vocabulary(meta, path)
    vocab_size = state["embed.weight"].size(0) if isinstance(state.get("embed.weight"), Tensor) else None
    if vocab_size != len(chars):
        raise ValueError(
            f"The checkpoint {str(path)!r} has {vocab_size} tokens, its run's text "
            f"{len(chars)} characters: the text changed since the run"
        )
    run = meta["run"]
    model = as_graph_lm(_load_state(SequenceModel(len(chars), len(chars), model_config), state, path))
    context = TextConfig(**run.get("text", {})).context

    def forward(ids: Tensor, graph: Any, pos: Tensor):
        return call_with_graph(model, ids, graph, pos=pos)

    def examples(k: int) -> list[list]:
        check_set_fits("samples", k, context, _LISTED_TOKEN)
        val = load_corpus(TextConfig(**run.get("text", {}))).val
        starts = torch.linspace(0, val.numel() - context - 1, k).long()  # evenly spaced windows
        return [val[s : s + context].tolist() for s in starts.tolist()]

    return LoadedModel(
        model,
        forward,
        run.get("topology", "causal"),
        VocabularyTokenizer(chars),
        f"lm model ({path.name})",
        examples,
        vocab_size=len(chars),
        max_length=max_length,
        language_model=True,
        causal_graphs=True,
        trained_length=context,
    )


def _load_listops_run(path: Path, state: dict, run: dict, model_config: Any, max_length: int | None) -> LoadedModel:
    """A ListOps run's classifier; the input is expressions (``[CLS]`` first when it reads its
    answer there), examples the run's validation expressions."""
    from .listops import CLS, VOCAB, ListOpsConfig, encode, generate
    from .listops import NUM_CLASSES as LISTOPS_CLASSES
    from .models import SequenceClassifier

    try:
        config = ListOpsConfig(**run.get("listops", {}))
    except TypeError as err:
        raise ValueError(f"Could not rebuild the ListOps data of {str(path)!r} from its run config: {err}") from err
    model = _load_state(SequenceClassifier(len(VOCAB), LISTOPS_CLASSES, model_config, config.pool), state, path)

    def forward(ids: Tensor, graph: Any, pos: Tensor):
        starts = (pos == 0).nonzero(as_tuple=True)[0]  # [B] the first node of each sequence
        ptr = torch.cat([starts, starts.new_tensor([pos.numel()])])  # [B + 1]
        return model(ids, pos, graph, ptr)  # [B, classes]

    seed = run.get("train", {}).get("seed", 0)

    def examples(k: int) -> list[list]:
        check_set_fits("samples", k, config.lengths[1] + 1, _LISTED_TOKEN)
        return [encode(generate(config, f"listops/{seed}/val/{i}")[0], config.pool).tolist() for i in range(k)]

    prefix = [VOCAB.index(CLS)] if config.pool == "cls" else []
    return LoadedModel(
        model,
        forward,
        run.get("topology", "full"),
        VocabularyTokenizer(VOCAB, words=True, prefix=prefix),
        f"listops model ({path.name})",
        examples,
        vocab_size=len(VOCAB),
        max_length=max_length,
    )


def load_hf_model(directory: str | Path, *, backend: str | None = None) -> LoadedModel:
    """A Hugging Face model saved in a local directory (``save_pretrained``) of a family
    :func:`gnn_transformer.hf.from_pretrained` imports, with its tokenizer when the directory has one.
    By default each layer runs on its own graph, as in Hugging Face's model (``"native"``: causal
    or the family's sliding window per layer for the decoders, ModernBERT's local and global
    layers); GPT-2 on the causal graph, BERT on the full one."""
    from .. import hf  # needs transformers: imported only when asked for

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"No directory at '--hf-dir' {str(directory)!r}")
    try:
        if backend is None:
            model = hf.from_pretrained(str(directory)).eval()
        else:
            model = hf.from_pretrained(str(directory), backend=backend).eval()
    except OSError as err:  # transformers: no config or weights in the directory
        raise ValueError(f"Could not load a Hugging Face model from {str(directory)!r}: {err}") from err
    except (pickle.UnpicklingError, EOFError) as err:
        # torch.load(weights_only=True) of pytorch_model.bin refuses a pickle that would run code
        # (UnpicklingError, before running any of it) and fails on a truncated one (EOFError)
        raise ValueError(
            f"Could not read the weights {_weight_files(directory)} in '--hf-dir' "
            f"{str(directory)!r}: not a file of torch.save that loads with "
            f"weights_only=True, which runs nothing from it ({type(err).__name__})"
        ) from None
    except Exception as err:  # noqa: BLE001 - a damaged zip (torch's RuntimeError), safetensors'
        # SafetensorError, huggingface_hub's StrictDataclassError (a config field of the wrong type)
        if not (
            isinstance(err, RuntimeError)
            or type(err).__module__.split(".")[0] in ("safetensors", "huggingface_hub", "transformers")
        ):
            raise
        raise ValueError(
            f"Could not load a Hugging Face model from '--hf-dir' {str(directory)!r} "
            f"(weights {_weight_files(directory)}): {type(err).__name__}: "
            f"{_first_line(err)}"
        ) from None
    config = model.config
    if isinstance(model, hf.GraphGPT2LMHeadModel):
        graph, name, max_length = "causal", "GPT-2", config.n_positions
    elif isinstance(model, hf.GraphDecoderLM):  # RoPE families take any position; GPT-Neo has a table
        graph, name = "native", config.model_type
        max_length = model.spec.max_position_embeddings if model.embed_positions is not None else None
    elif isinstance(model, hf.GraphModernBertModel):
        graph, name, max_length = "native", "ModernBERT", None
    else:
        graph, name, max_length = "full", "BERT", config.max_position_embeddings

    def forward(ids: Tensor, graph: Any, pos: Tensor):
        return call_with_graph(model.forward_graph, ids, graph, pos=pos)

    return LoadedModel(
        model,
        forward,
        graph,
        load_tokenizer(directory),
        f"{name} ({directory.name})",
        vocab_size=config.vocab_size,
        max_length=max_length,
        language_model=isinstance(model, (hf.GraphGPT2LMHeadModel, hf.GraphDecoderLM)),
        native=native_builder(model),
    )


def _weight_files(directory: Path) -> str:
    """The weight files of a ``save_pretrained`` directory, for error messages."""
    files = sorted(str(p) for p in directory.iterdir() if p.suffix in (".bin", ".safetensors", ".pt", ".pth"))
    return ", ".join(map(repr, files)) or "(none found)"


def _first_line(err: BaseException) -> str:
    return next((line for line in str(err).splitlines() if line.strip()), "")


def load_tokenizer(directory: str | Path):
    """The tokenizer saved in ``directory``, or ``None``."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, ImportError):
        return None


def use_tokenizer(loaded: LoadedModel, directory: str | Path) -> None:
    """Give ``loaded`` the tokenizer saved in ``directory`` (the ``--tokenizer`` option of the
    commands); a ``ValueError`` naming the option if there is none."""
    loaded.tokenizer = load_tokenizer(directory)
    if loaded.tokenizer is None:
        raise ValueError(f"Found no tokenizer in '--tokenizer' {str(directory)!r}")


# ------------------------------------------------------------------ inputs
def _read_text(path: Path, option: str) -> str:
    """The UTF-8 text of ``path``; a ``ValueError`` naming ``option`` and the file otherwise."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"Expected UTF-8 text in {option}{str(path)!r} ({err.reason} at byte {err.start})") from None


def read_token_file(path: str | Path) -> list[list[int]]:
    """Sequences of token ids: one line per sequence, whitespace-separated integers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No token file at '--tokens' {str(path)!r}")
    sequences = []
    for number, line in enumerate(_read_text(path, "'--tokens' ").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            sequences.append([int(t) for t in line.split()])
        except ValueError as err:
            raise ValueError(f"Expected integer token ids in {str(path)!r}, line {number} ({err})") from err
    if not sequences:
        raise ValueError(f"Found no tokens in {str(path)!r}")
    return sequences


def read_text_file(path: str | Path, tokenizer) -> list[list[int]]:
    """Sequences of token ids: one line of text per sequence, tokenized with ``tokenizer``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No text file at '--text' {str(path)!r}")
    if tokenizer is None:
        raise ValueError("'--text' needs a tokenizer: save one in '--hf-dir' or pass '--tokenizer'")
    try:
        sequences = [
            tokenizer(line)["input_ids"] for line in _read_text(path, "'--text' ").splitlines() if line.strip()
        ]
    except ValueError as err:  # a character or word outside a training run's vocabulary
        raise ValueError(f"'--text' {str(path)!r}: {err}") from None
    if not sequences:
        raise ValueError(f"Found no text in {str(path)!r}")
    return sequences


def check_sequences(
    loaded: LoadedModel, sequences: Sequence[Sequence], source: str = "the input", *, check_length: bool = True
) -> None:
    """A ``ValueError`` naming ``source`` unless every sequence is non-empty, its token ids are in
    the model's vocabulary and (with ``check_length``) its length within the model's position table."""
    for number, sequence in enumerate(sequences, start=1):
        ids = torch.tensor(sequence, dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError(f"Expected non-empty sequences in {source} (sequence {number} is empty)")
        if loaded.vocab_size is not None and not 0 <= int(ids.min()) <= int(ids.max()) < loaded.vocab_size:
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(
                f"Expected token ids 0..{loaded.vocab_size - 1} (the vocabulary of "
                f"{loaded.name}) in {source}, got {bad} in sequence {number}"
            )
        if check_length and loaded.max_length is not None and len(sequence) > loaded.max_length:
            raise ValueError(
                f"Expected sequences of at most {loaded.max_length} tokens (the position "
                f"table of {loaded.name}) in {source}, got {len(sequence)} in sequence "
                f"{number}"
            )


# ------------------------------------------------------------------ the analysis
def attention_modules(model: nn.Module) -> list[GraphMultiheadAttention]:
    """The attention modules of ``model``, in order."""
    return [m for m in model.modules() if isinstance(m, GraphMultiheadAttention)]


@contextmanager
def selecting(model: nn.Module, select: str | dict | None) -> Iterator[nn.Module]:
    """While open, every attention of ``model`` selects its per-head graph with a new
    :func:`~gnn_transformer.topology.dynamic.selector` of spec ``select`` (its own copy per layer)
    within the graph it is given; ``None`` changes nothing. Restored on exit."""
    if select is None:
        yield model
        return
    modules = attention_modules(model)
    before = [m.select for m in modules]
    try:
        for module in modules:
            chosen = selector(select, num_heads=module.num_heads, head_dim=module.head_dim)
            if isinstance(module.select, nn.Module):
                delattr(module, "select")
            setattr(module, "select", chosen)
        yield model
    finally:
        for module, previous in zip(modules, before):
            delattr(module, "select")
            setattr(module, "select", previous)


def build_graph(loaded: LoadedModel, spec: str, lengths: Sequence[int]) -> tuple[Any, str | dict | None]:
    """The graph of ``spec`` on a batch of sequences of ``lengths`` for ``loaded``: an
    ``edge_index``, a per-head pair or per-layer graphs (a list), cut to its causal part when
    ``loaded.causal_graphs``; and the spec's selector (``None`` without one). ``"native"`` is each
    layer's own graph (``loaded.native``), or the graph ``loaded`` was trained on."""
    if spec == "native":
        if loaded.native is not None:
            return loaded.native(list(lengths)), None
        if loaded.graph != "native":
            return build_graph(loaded, loaded.graph, lengths)
        raise ValueError(f"Expected a 'graph' spec: {loaded.name} has no graphs of its own ('native')")
    topo = resolve_topology(spec)
    modules = attention_modules(loaded.model)
    if topo.num_heads is not None and modules and topo.num_heads != modules[0].num_heads:
        raise ValueError(
            f"Expected a per-head graph of {modules[0].num_heads} heads (the heads of "
            f"{loaded.name}) in 'graph' (got {spec!r}, with {topo.num_heads})"
        )
    graph = per_length(topo.build)(list(lengths))
    if loaded.causal_graphs:
        from .lm import causal_part

        graph = causal_part(graph)
    if isinstance(graph, LayerPattern):
        graph = [graph(layer) for layer in range(len(modules))]
    return graph, topo.select


def _num_edges(graph: Any) -> int:
    """Edges of one layer's graph: an ``edge_index`` or a per-head pair ``(edge_index, edge_head)``."""
    edge_index = graph[0] if isinstance(graph, tuple) else graph
    return edge_index.size(1) if isinstance(edge_index, Tensor) else 0


def recording_bytes(loaded: LoadedModel, built: Any, select: Any, num_tokens: int, variants: int = 1) -> int:
    """A lower bound of the bytes :func:`analyze` keeps for a batch of ``num_tokens`` tokens on
    the graph ``built`` (:func:`build_graph`): every attention layer's weights ``[E, H]`` and every
    layer's hidden states ``[N, C]``, in the model's dtype, for each of ``variants`` runs. A
    selector's graphs are not known before the run and count no edges."""
    modules = attention_modules(loaded.model)
    param = next(loaded.model.parameters(), None)
    itemsize = param.element_size() if param is not None else 4
    graphs = built if isinstance(built, list) else [built] * len(modules)
    weights = 0 if select is not None else sum(_num_edges(g) * m.num_heads for m, g in zip(modules, graphs))
    states = (len(modules) + 1) * num_tokens * max((m.embed_dim for m in modules), default=0)
    return variants * (weights + states) * itemsize


def check_recording_fits(
    loaded: LoadedModel, built: Any, select: Any, lengths: Sequence[int], variants: int = 1
) -> None:
    """Refuse, before the model runs, a batch whose recording (:func:`recording_bytes`) would not
    fit in half of the host memory: a ``ValueError`` naming ``'sequences'``."""
    need = recording_bytes(loaded, built, select, sum(lengths), variants)
    budget = host_memory_budget()
    if need > budget:
        runs = f" in each of {variants} runs" if variants > 1 else ""
        count = f"{len(lengths)} sequence{'s' if len(lengths) != 1 else ''}"
        raise ValueError(
            f"Expected 'sequences' small enough to analyze in memory (got {count}, "
            f"{sum(lengths)} tokens): recording every layer's attention weights and hidden states{runs} "
            f"needs at least {need / 2**30:.3g} GiB, more than half of this machine's memory "
            f"({budget / 2**30:.3g} GiB)"
        )


def analyze(
    loaded: LoadedModel,
    sequences: Sequence[Sequence[int]],
    *,
    graph: str | None = None,
    compare_norm: bool = False,
    backend: str | None = None,
    min_magnitude: float = 100.0,
    min_ratio: float = 1000.0,
) -> Analysis:
    """Run the model once on ``sequences`` (one batch) under :func:`record` and summarize.

    Args:
        loaded: from :func:`load_checkpoint_model` or :func:`load_hf_model`.
        sequences: token ids, one list per sequence.
        graph: a topology of the ``graphs/`` catalogue (``"causal"``, ``"full"``, ``"bigbird"``,
            ``"duo_attention"``, ``"gemma3"``, ...), a builder with arguments
            (``"sliding_window:window=3"``), a ``.toml`` spec path, or any of these with a selector
            (``"causal+topk:num_keys=8"``) (default: the model's own: causal, full, or the topology
            its run trained on). A per-head graph records each head's weights over its own edges,
            per-layer graphs each layer on its graph, a selector the graph each layer selects.
        compare_norm: also run with every layer's ``norm_first`` set to ``True`` and ``False``
            (same weights), giving the ``"pre-norm"`` and ``"post-norm"`` variants.
        backend: attention backend forced while recording.
        min_magnitude, min_ratio: massive-activation thresholds.
    """
    graph = loaded.graph if graph is None else graph
    lengths = [len(s) for s in sequences]
    if not lengths:
        raise ValueError("Expected at least one sequence (got none)")
    check_sequences(loaded, sequences)
    ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long)  # [N] or [N, fields]
    pos = torch.cat([torch.arange(n) for n in lengths])  # [N] position within each sequence
    built, select = build_graph(loaded, graph, lengths)
    check_recording_fits(loaded, built, select, lengths, variants=3 if compare_norm else 1)
    batch = batch_vector(lengths)

    def run_once() -> Trace:
        with torch.no_grad(), selecting(loaded.model, select), record(loaded.model, backend=backend) as trace:
            trace.output = loaded.forward(ids, built, pos)
        return trace

    traces = {"model": run_once()}
    if compare_norm:
        for label, norm_first in (("pre-norm", True), ("post-norm", False)):
            with norm_placement(loaded.model, norm_first):
                traces[label] = run_once()
    rows = {k: summarize(t, batch, min_magnitude=min_magnitude, min_ratio=min_ratio) for k, t in traces.items()}
    labels = token_labels(sequences[0], loaded.tokenizer)
    return Analysis(traces, rows, lengths, labels, graph)


def token_labels(ids: Sequence[int], tokenizer=None) -> list[str]:
    """Token strings for plots (the ids themselves without a tokenizer)."""
    if tokenizer is None:
        return [str(t) for t in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens(list(ids))]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "attention"


def _json_values(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_values(v) for v in value]
    return value


def non_finite_layers(rows: Sequence[LayerSummary]) -> list[str]:
    """The layers whose measures are NaN or infinite (non-finite attention weights or hidden states)."""
    names = []
    for row in rows:
        values = [*row.sink, row.entropy, row.top_key_share, row.pagerank_max]
        if row.activations is not None:
            values += [row.activations.max_abs, row.activations.median_abs]
        if not all(math.isfinite(v) for v in values):
            names.append(row.name)
    return names


def write_summary(result: Analysis, out: str | Path) -> Path:
    """Write the per-layer measures of every variant to ``out/summary.json`` (strict JSON: a NaN
    or infinite measure is written as ``null``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    summary = {
        "graph": result.graph,
        "lengths": result.lengths,
        "tokens": result.labels,
        "variants": {k: [dataclasses.asdict(r) for r in rows] for k, rows in result.rows.items()},
    }
    path.write_text(json.dumps(_json_values(summary), indent=2, allow_nan=False))
    return path


def save_outputs(
    result: Analysis, out: str | Path, *, pictures: bool = True, max_tokens: int = 48, title: str = ""
) -> list[Path]:
    """Write ``summary.json`` and (unless ``pictures=False``) the PNGs into ``out``; the pictures
    show the first ``max_tokens >= 1`` tokens of the first sequence."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"Expected 'max_tokens' to be an int >= 1 (got {max_tokens!r})")
    paths = [write_summary(result, out)]
    if not pictures:
        return paths
    from ..analysis import plots

    out = Path(out)

    def save(fig, name: str) -> None:
        target = out / name
        fig.savefig(target, dpi=110)
        paths.append(target)

    first = min(result.lengths[0], max_tokens)  # pictures show the first sequence
    for graph in result.traces["model"].self_attention():
        slug = _slug(graph.name)
        save(
            plots.plot_attention_heatmaps(
                graph, result.labels, max_tokens=first, title=f"{title} {graph.name}".strip()
            ),
            f"attention_{slug}.png",
        )
        save(plots.plot_attention_arcs(graph, None, result.labels, max_tokens=first), f"arcs_{slug}.png")
    rows = result.rows["model"]
    save(plots.plot_sink_scores(rows, title=f"{title} sink score".strip()), "sink_scores.png")
    save(plots.plot_activation_magnitudes(rows, title=f"{title} hidden-state magnitudes".strip()), "activations.png")
    if "pre-norm" in result.rows:
        variants = {k: v for k, v in result.rows.items() if k != "model"}
        save(plots.plot_norm_comparison(variants), "norm_comparison.png")
    return paths
