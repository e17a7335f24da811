"""Per-head token graphs on imported Hugging Face models: a builder returning ``(edge_index,
edge_head)`` equals Hugging Face's eager model given the same per-head graph as a ``[B, H, T, T]``
additive mask, on padded batches; per-layer mixes, attention weights per head, head-count errors."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gnn_transformer import hf  # noqa: E402
from gnn_transformer.topology import causal, duo_attention, full, per_head, sliding_window  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TOL = dict(atol=1e-4, rtol=1e-4)
V, T, H = 61, 12, 4  # vocabulary, padded length, attention heads of every model here
LENGTHS = [T, 9, 2]


def _decoder(family: str):
    common = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=H,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
        attn_implementation="eager",
    )
    c = transformers
    config = {
        "llama": lambda: c.LlamaConfig(**common),
        "mistral": lambda: c.MistralConfig(**common, sliding_window=4),
        "gemma2": lambda: c.Gemma2Config(
            **common,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=4,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=5.0,
        ),
    }[family]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if family == "gemma2":  # norms initialized to zero (gain 1): make them count
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    return model


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        return transformers.BertModel(
            transformers.BertConfig(
                vocab_size=V,
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=H,
                intermediate_size=40,
                max_position_embeddings=24,
                initializer_range=0.3,
                attn_implementation="eager",
            )
        ).eval()
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=V,
                n_embd=16,
                n_layer=2,
                n_head=H,
                n_positions=24,
                initializer_range=0.3,
                bos_token_id=0,
                eos_token_id=0,
                attn_implementation="eager",
            )
        ).eval()
    return _decoder(kind)


def _batch(right_padding: bool):
    torch.manual_seed(1)
    ids = torch.randint(2, V, (len(LENGTHS), T))
    mask = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1 if right_padding else 0
        if not right_padding:
            mask[i, T - n :] = 1
    return ids, mask


def duo(lengths):
    """Heads 1 and 3 stream (2 sinks + a causal window of radius 2), heads 0 and 2 causal."""
    return duo_attention(lengths, [1, 3], H, num_sinks=2, window=2)


def random_per_head(base):
    """A per-head graph: for each head, about half of ``base``'s edges drawn at random, plus each
    token's self-loop (no empty row), seeded."""

    def build(lengths):
        graph = base(lengths).as_tensor()
        gen = torch.Generator().manual_seed(7)
        heads = []
        for _ in range(H):
            keep = (torch.rand(graph.size(1), generator=gen) < 0.5) | (graph[0] == graph[1])
            heads.append(graph[:, keep])
        return per_head(heads)

    return build


def hf_mask(graph, mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The additive ``[B, H, T, T]`` mask Hugging Face's eager attention takes for a graph on the
    real tokens of ``mask`` (0 on an edge of the head, float32's minimum elsewhere: eager attention
    may take its softmax in float32, where float64's minimum would be ``-inf``)."""
    edge_index, edge_head = graph if isinstance(graph, tuple) else (graph, None)
    b, t = mask.shape
    real = mask.bool()
    row = torch.arange(b).unsqueeze(1).expand(b, t)[real]  # [N]
    col = torch.arange(t).expand(b, t)[real]  # [N]
    src, dst = edge_index[0].long(), edge_index[1].long()
    allowed = torch.zeros(b, H, t, t, dtype=torch.bool)
    if edge_head is None:
        allowed[row[dst], :, col[dst], col[src]] = True
    else:
        allowed[row[dst], edge_head.long(), col[dst], col[src]] = True
    return torch.zeros(b, H, t, t, dtype=dtype).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _modernbert():
    torch.manual_seed(0)
    config = transformers.ModernBertConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=4,
        num_attention_heads=H,
        max_position_embeddings=64,
        local_attention=4,
        global_attn_every_n_layers=3,
        initializer_range=0.3,
        pad_token_id=0,
        sep_token_id=1,
        bos_token_id=1,
        eos_token_id=1,
        cls_token_id=1,
        attn_implementation="eager",
    )
    model = transformers.ModernBertModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    return model


def _key(model) -> str:
    return "last_hidden_state" if isinstance(model, transformers.BertModel) else "logits"


CASES = [("bert", full), ("gpt2", causal), ("llama", causal), ("mistral", causal), ("gemma2", causal)]


@pytest.mark.parametrize("kind,base", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("builder", ["duo", "random"])
@pytest.mark.parametrize("right_padding", [True, False])
def test_per_head_graph_equals_hf_with_a_per_head_mask(kind, base, builder, right_padding):
    model = _model(kind)
    build = duo if builder == "duo" else random_per_head(base)  # (on BERT, duo's causal heads are a choice like any)
    graph = hf.from_hf(model, backend="pyg")
    ids, mask = _batch(right_padding)
    real = mask.bool()
    lengths = mask.sum(1).tolist()
    per_head_graph = build(lengths)
    assert isinstance(per_head_graph, tuple)
    out = graph(input_ids=ids, attention_mask=mask, topology=build)
    ref = model(input_ids=ids, attention_mask=hf_mask(per_head_graph, mask))
    key = _key(model)
    torch.testing.assert_close(out[key][real], ref[key][real], **TOL)
    assert (out[key][~real] == 0).all()
    # the same graph as the model's default equals the per-call one
    default = hf.from_hf(model, backend="pyg", topology=build)(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(default[key], out[key], rtol=0, atol=0)


@pytest.mark.parametrize("right_padding", [True, False])
def test_modernbert_per_head_graph_equals_hf(right_padding):
    """ModernBERT's global and local layers all replaced by one random per-head graph."""
    model = _modernbert()
    graph = hf.from_hf(model, backend="pyg")
    ids, mask = _batch(right_padding)
    real = mask.bool()
    build = random_per_head(full)
    out = graph(input_ids=ids, attention_mask=mask, topology=build, output_attentions=True)
    ref = model(input_ids=ids, attention_mask=hf_mask(build(mask.sum(1).tolist()), mask), output_attentions=True)
    torch.testing.assert_close(out.last_hidden_state[real], ref.last_hidden_state[real], **TOL)
    rows = real.unsqueeze(1).expand(-1, H, -1)
    for dense, expected in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(dense[rows], expected[rows], **TOL)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("backend", ["fused", "tiled", "auto"])
def test_per_head_graph_on_every_backend(kind, backend):
    model = _model(kind)
    graph = hf.from_hf(model, backend=backend)
    ids, mask = _batch(right_padding=False)
    real = mask.bool()
    out = graph(input_ids=ids, attention_mask=mask, topology=duo)
    ref = model(input_ids=ids, attention_mask=hf_mask(duo(mask.sum(1).tolist()), mask))
    key = _key(model)
    torch.testing.assert_close(out[key][real], ref[key][real], **TOL)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_per_head_graph_float64(kind):
    """BERT's and GPT-2's eager attention keep float64 (the decoder families take their softmax in
    float32)."""
    model = _model(kind).double()
    graph = hf.from_hf(model, backend="pyg")
    ids, mask = _batch(right_padding=True)
    real = mask.bool()
    out = graph(input_ids=ids, attention_mask=mask, topology=duo)
    ref = model(input_ids=ids, attention_mask=hf_mask(duo(LENGTHS), mask, torch.float64))
    key = _key(model)
    torch.testing.assert_close(out[key][real], ref[key][real], atol=1e-10, rtol=1e-10)


def test_shared_graph_builder_still_works():
    model = _model("mistral")
    graph = hf.from_hf(model, backend="pyg")
    ids, mask = _batch(right_padding=True)
    real = mask.bool()

    def window(lengths):
        return sliding_window(lengths, 2, causal=True)

    out = graph(input_ids=ids, attention_mask=mask, topology=window)
    ref = model(input_ids=ids, attention_mask=hf_mask(window(LENGTHS), mask))
    torch.testing.assert_close(out.logits[real], ref.logits[real], **TOL)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_per_layer_mix_of_shared_and_per_head_builders(kind):
    """Layer 0 per-head (DuoAttention), then a shared window (and on Llama's third layer its native
    graph): equals Hugging Face's model with each layer given its own 4-D mask."""
    model = _model(kind)

    def window(lengths):
        return sliding_window(lengths, 1, causal=kind != "bert")

    builders = [duo, window, None] if kind == "llama" else [duo, window]
    graph = hf.from_hf(model, backend="pyg")
    ids, mask = _batch(right_padding=True)
    real = mask.bool()
    out = graph(input_ids=ids, attention_mask=mask, topology=builders)
    native = full if kind == "bert" else causal
    masks = [hf_mask((native if b is None else b)(LENGTHS), mask) for b in builders]
    ref = _hf_per_layer_masks(model, ids, masks)
    key = _key(model)
    torch.testing.assert_close(out[key][real], ref[real], **TOL)
    weights = graph(input_ids=ids, attention_mask=mask, topology=builders, output_attentions=True).edge_attentions
    assert isinstance(weights[0][0], tuple) and weights[0][1].dim() == 1  # per-head: ((edge_index, edge_head), [E])
    assert not isinstance(weights[1][0], tuple) and weights[1][1].shape[1:] == (H,)


def _hf_per_layer_masks(model, ids, masks):
    """Hugging Face's model with layer ``l`` given ``masks[l]``: each attention module's mask
    replaced by a forward pre-hook (the model computes one mask; its layers each get their own)."""
    if isinstance(model, transformers.BertModel):
        layers = [layer.attention.self for layer in model.encoder.layer]
    elif isinstance(model, transformers.GPT2LMHeadModel):
        layers = [block.attn for block in model.transformer.h]
    else:
        layers = [layer.self_attn for layer in model.model.layers]
    handles = []
    for layer, layer_mask in zip(layers, masks):

        def hook(module, args, kwargs, layer_mask=layer_mask):
            return args, {**kwargs, "attention_mask": layer_mask}

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        out = model(input_ids=ids, attention_mask=masks[0])
    finally:
        for handle in handles:
            handle.remove()
    return out[_key(model)]


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "gemma2"])
def test_output_attentions_per_head(kind):
    """Weights per edge ``[E]``, each at its head: the dense view equals Hugging Face's eager
    attention probabilities under the per-head mask."""
    model = _model(kind)
    graph = hf.from_hf(model, backend="pyg")
    ids, mask = _batch(right_padding=True)
    real = mask.bool()
    out = graph(input_ids=ids, attention_mask=mask, topology=duo, output_attentions=True)
    (edge_index, edge_head), alpha = out.edge_attentions[0]
    assert alpha.shape == (edge_index.size(1),) and edge_head.shape == alpha.shape
    sums = torch.zeros(H * int(real.sum())).index_add_(0, edge_head * int(real.sum()) + edge_index[1], alpha)
    torch.testing.assert_close(sums, torch.ones_like(sums))  # each (head, query) row sums to 1
    ref = model(input_ids=ids, attention_mask=hf_mask(duo(LENGTHS), mask), output_attentions=True)
    for dense, expected in zip(out.attentions, ref.attentions):
        assert dense.shape == expected.shape == (len(LENGTHS), H, T, T)
        rows = real.unsqueeze(1).expand(-1, H, -1)  # [B, H, T] real query rows
        torch.testing.assert_close(dense[rows], expected[rows], **TOL)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "mistral"])
def test_wrong_head_count_is_refused(kind):
    model = _model(kind)
    graph = hf.from_hf(model, backend="pyg")
    ids, mask = _batch(right_padding=True)
    for heads in (H * 2, H // 2):

        def build(lengths, heads=heads):
            return duo_attention(lengths, [1], heads, num_sinks=1, window=1)

        with pytest.raises(ValueError, match=f"'topology'.*{H} attention heads.*a graph for {heads} heads"):
            graph(input_ids=ids, attention_mask=mask, topology=build)
        with pytest.raises(ValueError, match=f"'topology'.*{H} attention heads"):
            hf.from_hf(model, topology=build)(input_ids=ids, attention_mask=mask)
    if kind == "llama":

        def wide(lengths):
            return duo_attention(lengths, [1], H * 2, num_sinks=1, window=1)

        with pytest.raises(ValueError, match=f"'topology\\[1\\]'.*{H} attention heads"):
            graph(input_ids=ids, attention_mask=mask, topology=[None, wide, None])


def test_malformed_per_head_graphs_are_refused():
    graph = hf.from_hf(_model("gpt2"), backend="pyg")
    ids = torch.randint(0, V, (2, 5))
    with pytest.raises(ValueError, match="'topology'.*integer edge_head"):
        graph(input_ids=ids, topology=lambda lengths: (causal(lengths), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="'topology'.*integer edge_head"):
        graph(input_ids=ids, topology=lambda lengths: (causal(lengths), torch.zeros(causal(lengths).size(1))))
    with pytest.raises(ValueError, match="'topology'.*edge_index.*edge_head.*tuple of length 3"):
        graph(input_ids=ids, topology=lambda lengths: (causal(lengths),) * 3)


def test_cached_generation_refuses_a_per_head_topology():
    """Cached generation builds each step's graph from the native windows: a model built with a
    per-head topology is refused by name rather than decoded along another graph."""
    model = _model("llama")
    ids, mask = _batch(right_padding=False)
    with pytest.raises(ValueError, match="'topology'.*generate"):
        hf.from_hf(model, topology=duo).generate(ids, attention_mask=mask, max_new_tokens=2)
