r"""Incremental decoding on token graphs with a key/value cache.

Every generated token is a new node. Its keys and values are computed once and kept in a
:class:`KVCache`; its query attends along the edges its topology allows, from cached nodes (and
itself) to it: ``j -> i`` for the tokens ``j`` of the same sequence with ``0 <= pos_i - pos_j``
(causal) and ``pos_i - pos_j <= window`` (sliding window, radius as in
:func:`gnn_transformer.topology.sliding_window`). The cache is one growing node set for the whole
batch (node ids in order of arrival, with a sequence id and a position per node), so sequences of
different lengths need no padding. ``window`` may also give each layer its own radius (``None``:
causal), e.g. windows in most layers and full causal attention in every third; each layer then
attends along its own new edges. The result equals a full recompute on the whole graph, token by
token (``tests/test_decoding.py``).

The models take per-head and per-layer graphs with a cache directly: ``model(ids, edge_index,
pos=pos, cache=cache)`` with each layer's graph (``(edge_index, edge_head)`` for a per-head one)
from all cached plus new nodes to the new ones, as :func:`step_edges` builds them.

Works with any model exposing ``forward_graph(ids [Q], edge_index, *, pos [Q], cache)`` ->
``logits [Q, V]`` whose stack passes ``cache`` on: :class:`~gnn_transformer.GraphLM` and
:class:`~gnn_transformer.hf.GraphGPT2LMHeadModel`.

Example:
    >>> from gnn_transformer import GraphLM, GraphTransformerConfig
    >>> lm = GraphLM(GraphTransformerConfig(vocab_size=10, d_model=8, nhead=2, num_layers=1,
    ...                                     backend="pyg")).eval()
    >>> generate(lm, torch.tensor([[1, 2, 3]]), max_new_tokens=4).shape
    torch.Size([1, 7])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from .attention import check_bool, check_ids

KV = tuple[Tensor, Tensor]
Window = int | None | Sequence[int | None]  # one radius for every layer, or one per layer (None: causal)


class KVCache:
    """Keys and values of every layer for all nodes seen so far, with their sequence and position.

    ``seq`` / ``pos`` ``[M]`` describe the cached nodes *and* the nodes of the step being computed
    (:meth:`add_nodes` is called before the model runs); :meth:`update` appends a layer's new keys
    and values ``[Q, H_kv, D]`` and returns all of them ``[M, H_kv, D]``.
    """

    def __init__(self) -> None:
        self.layers: dict[int, KV] = {}
        self.seq: Tensor | None = None
        self.pos: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.pos is None else self.pos.numel()

    def add_nodes(self, seq: Tensor, pos: Tensor) -> None:
        """Register new nodes (their sequence ids and positions ``[Q]``)."""
        self.seq = seq if self.seq is None else torch.cat([self.seq, seq])
        self.pos = pos if self.pos is None else torch.cat([self.pos, pos])

    def update(self, index: int, kv: KV) -> KV:
        """Append layer ``index``'s keys and values of the new nodes; return those of all nodes."""
        before = self.layers[index][0].size(0) if index in self.layers else 0
        registered = 0 if self.pos is None else self.pos.numel()
        if before + kv[0].size(0) != registered:
            raise ValueError(
                f"Expected the keys of layer {index} for the {registered - before} nodes registered by "
                f"add_nodes since its last update (got {kv[0].size(0)}): call add_nodes with the step's "
                "new nodes before running the model"
            )
        if index in self.layers:
            old_k, old_v = self.layers[index]
            kv = (torch.cat([old_k, kv[0]]), torch.cat([old_v, kv[1]]))
        self.layers[index] = kv
        return kv


def step_edges(seq: Tensor, pos: Tensor, num_new: int, window: int | None = None) -> Tensor:
    """Edges ``[2, E]`` from all nodes to the last ``num_new`` nodes: same sequence, causal, and
    within ``window`` positions when given. Sorted by target."""
    q_seq, q_pos = seq[-num_new:], pos[-num_new:]
    allowed = (seq.unsqueeze(0) == q_seq.unsqueeze(1)) & (pos.unsqueeze(0) <= q_pos.unsqueeze(1))
    if window is not None:
        allowed &= pos.unsqueeze(0) >= q_pos.unsqueeze(1) - window  # [Q, M]
    dst, src = allowed.nonzero(as_tuple=True)  # row-major: sorted by target
    return torch.stack([src, dst])


def _per_layer(window: Window, build) -> Tensor | list[Tensor]:
    """``build(radius)``: one graph, or one per layer for a sequence of radii (each built once)."""
    if not isinstance(window, Sequence):
        return build(window)
    graphs = {radius: build(radius) for radius in dict.fromkeys(window)}
    return [graphs[radius] for radius in window]


def _graph(lengths: list[int], window: Window, device: torch.device) -> Tensor | list[Tensor]:
    from . import topology  # the builders of the prompt graph

    def build(radius: int | None) -> Tensor:
        if radius is None:
            return topology.causal(lengths).to(device)
        return topology.sliding_window(lengths, radius, causal=True).to(device)

    return _per_layer(window, build)


def _step_graph(seq: Tensor, pos: Tensor, num_new: int, window: Window) -> Tensor | list[Tensor]:
    return _per_layer(window, lambda radius: step_edges(seq, pos, num_new, radius))


def check_cache_selectors(model, instead: str) -> None:
    """Refuse, before any step, a ``model`` with a layer whose ``select`` chooses on a
    self-attention graph only (:class:`~gnn_transformer.topology.dynamic.BlockTopK`,
    :class:`~gnn_transformer.topology.dynamic.LSH`, :class:`~gnn_transformer.topology.dynamic.Routing`:
    as many queries as keys): under a key/value cache a step's queries are fewer than its keys.
    ``instead`` says what runs such a model. :class:`~gnn_transformer.topology.dynamic.TopK`
    selects under a cache (its ``causal`` rule aligns the queries with the cache's last keys)."""
    from .attention import GraphMultiheadAttention
    from .topology.dynamic import LSH, BlockTopK, Routing

    if not isinstance(model, torch.nn.Module):
        return
    for module in model.modules():
        if isinstance(module, GraphMultiheadAttention) and isinstance(module.select, (BlockTopK, LSH, Routing)):
            raise ValueError(
                f"Expected a 'model' whose attention can select under a key/value cache (got select="
                f"{module.select!r}, which selects on a self-attention graph: as many queries as keys, "
                f"while a cached step has fewer queries than keys); {instead}"
            )


def _forward(model, ids: Tensor, edge_index: Tensor | list[Tensor], pos: Tensor, cache: KVCache | None) -> Tensor:
    if not hasattr(model, "forward_graph"):
        raise ValueError(f"Expected 'model' with a forward_graph method (got {type(model).__name__})")
    return model.forward_graph(ids, edge_index, pos=pos, cache=cache)


def _sample(
    logits: Tensor, greedy: bool, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    if greedy:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _check_int(name: str, value: object, low: int | None = None, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (low is not None and value < low):
        what = "an int" if low is None else ("a positive int" if low == 1 else "a non-negative int")
        raise ValueError(f"Expected '{name}' to be {what}{' or None' if optional else ''} (got {value!r})")


def _check_window(model, window: object) -> None:
    """A radius (or ``None``), or a sequence of one per layer of ``model``'s stack when it has one."""
    if isinstance(window, (str, bytes)) or not isinstance(window, Sequence):
        _check_int("window", window, 0, optional=True)
        return
    for index, radius in enumerate(window):
        _check_int(f"window[{index}]", radius, 0, optional=True)
    num_layers = getattr(getattr(model, "encoder", None), "num_layers", None)
    if isinstance(num_layers, int) and len(window) != num_layers:
        raise ValueError(
            f"Expected 'window' to hold one radius per layer, {num_layers} (got a sequence of length {len(window)})"
        )


def check_sampling(greedy: object, temperature: object, top_k: object, generator: object) -> None:
    """The sampling arguments of :func:`generate` (and of the streaming generators), checked before
    any step: a ``ValueError`` naming the argument and the value."""
    check_bool("greedy", greedy)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 < temperature < math.inf:
        raise ValueError(f"Expected 'temperature' to be a positive finite number (got {temperature!r})")
    _check_int("top_k", top_k, 1, optional=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"Expected 'generator' to be a torch.Generator or None (got {generator!r})")


def _check_generate(
    model,
    input_ids,
    max_new_tokens,
    greedy,
    attention_mask,
    window,
    use_cache,
    temperature,
    top_k,
    generator,
    pad_token_id,
    eos_token_id,
    return_logits,
) -> tuple[Tensor, Tensor]:
    """Every argument of :func:`generate`, checked before any step; returns the real-token mask
    ``[B, T]`` and the prompt lengths ``[B]``."""
    if not hasattr(model, "forward_graph"):
        raise ValueError(f"Expected 'model' with a forward_graph method (got {type(model).__name__})")
    if getattr(model, "topology", None) is not None:
        raise ValueError(
            f"Expected a model without 'topology' (got {model.topology!r}): cached generation "
            "builds each step's graph from 'window'"
        )
    _check_int("max_new_tokens", max_new_tokens, 0)
    check_bool("use_cache", use_cache)
    if use_cache:
        check_cache_selectors(model, "generate with use_cache=False (each step recomputes the whole graph)")
    if (
        not isinstance(input_ids, Tensor)
        or input_ids.dim() != 2
        or input_ids.is_floating_point()
        or input_ids.dtype == torch.bool
        or input_ids.is_complex()
    ):
        got = (
            f"{input_ids.dtype} of shape {list(input_ids.shape)}"
            if isinstance(input_ids, Tensor)
            else type(input_ids).__name__
        )
        raise ValueError(f"Expected 'input_ids' to be an integer tensor [B, T] (got {got})")
    _check_window(model, window)
    _check_int("eos_token_id", eos_token_id, optional=True)
    _check_int("pad_token_id", pad_token_id)
    check_bool("return_logits", return_logits)
    if input_ids.size(0) == 0:
        raise ValueError(f"Expected 'input_ids' to hold at least one prompt (got {list(input_ids.shape)})")
    check_sampling(greedy, temperature, top_k, generator)
    if attention_mask is not None and (
        not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape
    ):
        got_mask = list(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ValueError(
            f"Expected 'attention_mask' of the shape of 'input_ids' {list(input_ids.shape)} (got {got_mask})"
        )
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    lengths = mask.sum(1)  # [B]
    if int(lengths.min()) == 0:
        raise ValueError(f"Expected every prompt to have a token (got lengths {lengths.tolist()})")
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab_size, int) and not isinstance(vocab_size, bool):
        check_ids(input_ids[mask], vocab_size, "input_ids")  # padding may hold any id
    table = _position_table(model)
    last = int(lengths.max()) + max_new_tokens - 2  # the position of the last token a step reads
    if table is not None and max_new_tokens > 0 and last >= table:
        raise ValueError(
            f"Expected 'max_new_tokens' small enough for the model's {table} learned positions (got "
            f"{max_new_tokens} after a prompt of {int(lengths.max())} tokens: the last step reads position {last})"
        )
    return mask, lengths


def position_embedding(model) -> str | None:
    """The name of ``model``'s position embedding added to the token embeddings (``pos_embed``,
    ``wpe``, ``embed_positions``: learned or sinusoidal), ``None`` for a model without one (RoPE,
    ALiBi, no positions)."""
    for name in ("pos_embed", "wpe", "embed_positions"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name
    return None


def _position_table(model) -> int | None:
    """The positions of a model's learned position table (``GraphLM``'s ``pos_embed``, GPT-2's
    ``wpe``, GPT-Neo's ``embed_positions``); ``None`` for a model without one."""
    name = position_embedding(model)
    table = None if name is None else getattr(model, name)
    return table.num_embeddings if isinstance(table, torch.nn.Embedding) else None


@torch.no_grad()
def generate(
    model,
    input_ids: Tensor,
    max_new_tokens: int,
    greedy: bool = True,
    *,
    attention_mask: Tensor | None = None,
    window: Window = None,
    use_cache: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    pad_token_id: int = 0,
    eos_token_id: int | None = None,
    return_logits: bool = False,
):
    r"""Generate up to ``max_new_tokens`` tokens after each prompt.

    Args:
        model: a decoder-only graph model (``GraphLM``, ``GraphGPT2LMHeadModel``) in eval mode.
        input_ids: prompts ``[B, T]``; with ``attention_mask`` the real tokens of each row (in
            order) form its prompt, so prompts may have different lengths.
        max_new_tokens: tokens to add to each sequence.
        greedy: argmax (default) or sampling with ``temperature`` / ``top_k`` / ``generator``.
        window: sliding-window radius (keys ``j`` with ``pos_i - window <= pos_j <= pos_i``);
            ``None`` = causal; or a sequence of one radius (or ``None``) per layer of the model.
        use_cache: decode with the key/value cache (default); ``False`` recomputes the whole graph
            for every new token (the reference).
        pad_token_id: fills the end of rows shorter than the longest.
        eos_token_id: a sequence that produces this token stops there (the token is kept): it adds
            no more nodes to the graph. Generation ends when every sequence has stopped.
        return_logits: also return the logits of every step, ``[steps, B, V]`` (``NaN`` in the
            rows of sequences that had already stopped).

    Returns:
        ``[B, width]``: row ``b`` holds its prompt, its new tokens, then ``pad_token_id``.
    """
    mask, lengths = _check_generate(
        model,
        input_ids,
        max_new_tokens,
        greedy,
        attention_mask,
        window,
        use_cache,
        temperature,
        top_k,
        generator,
        pad_token_id,
        eos_token_id,
        return_logits,
    )
    device = input_ids.device
    seqs = [row[m] for row, m in zip(input_ids, mask)]  # each prompt, padding dropped
    batch = len(seqs)
    cache = KVCache() if use_cache else None
    active = torch.ones(batch, dtype=torch.bool, device=device)  # [B] sequences still growing
    cur_len = lengths.clone()  # [B]
    # the first step is the prompt graph: nodes sequence after sequence
    ids = input_ids[mask]  # [N]
    seq = torch.repeat_interleave(torch.arange(batch, device=device), lengths)  # [N]
    pos = torch.cat([torch.arange(int(n), device=device) for n in lengths])  # [N]
    edge_index = _graph(lengths.tolist(), window, device)
    last = lengths.cumsum(0) - 1  # [B] the last node of each prompt
    step_logits = []
    for _ in range(max_new_tokens):
        act = active.nonzero(as_tuple=True)[0]  # [A] the growing sequences
        if cache is not None:
            cache.add_nodes(seq, pos)
            logits = _forward(model, ids, edge_index, pos, cache)[last]  # [A, V]
        else:  # reference: the whole graph again, nodes sequence after sequence
            lens = [int(t.numel()) for t in seqs]
            full_pos = torch.cat([torch.arange(n, device=device) for n in lens])
            logits = _forward(model, torch.cat(seqs), _graph(lens, window, device), full_pos, None)
            logits = logits[torch.tensor(lens, device=device).cumsum(0) - 1][act]  # [A, V]
        every = logits.new_full((batch, logits.size(-1)), float("nan"))
        every[act] = logits
        step_logits.append(every)
        token = _sample(logits, greedy, temperature, top_k, generator)  # [A]
        for b, new in zip(act.tolist(), token):
            seqs[b] = torch.cat([seqs[b], new.view(1)])
        cur_len[act] += 1
        if eos_token_id is not None:
            active[act[token == eos_token_id]] = False
        if not bool(active.any()):
            break
        # the next step: one new node per growing sequence, edges from the cache and itself
        keep = active[act]  # [A]
        ids, seq = token[keep], act[keep]
        pos = cur_len[seq] - 1
        if cache is not None:
            assert cache.seq is not None and cache.pos is not None  # add_nodes ran in the first step
            edge_index = _step_graph(torch.cat([cache.seq, seq]), torch.cat([cache.pos, pos]), seq.numel(), window)
        last = torch.arange(seq.numel(), device=device)
    width = max(s.numel() for s in seqs)
    out = input_ids.new_full((batch, width), pad_token_id)
    for b, s in enumerate(seqs):
        out[b, : s.numel()] = s
    if return_logits:
        return out, torch.stack(step_logits) if step_logits else torch.empty(0, batch, 0)
    return out


__all__ = ["KVCache", "generate", "step_edges"]
