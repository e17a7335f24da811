"""Bad and extreme inputs at the public boundary of the layers, stacks, models, decoding, padding
helpers and Hugging Face import: each gives a ``ValueError`` / ``TypeError`` naming the argument
(and the bad value), or the right result."""

import math
import re

import pytest
import torch
from torch_geometric import EdgeIndex

from gnn_transformer import (
    GraphMultiheadAttention,
    GraphTransformer,
    GraphTransformerDecoderLayer,
    GraphTransformerEncoderLayer,
    from_padded,
    to_padded,
)
from gnn_transformer.decoding import generate
from gnn_transformer.layers import GraphTransformerDecoder, GraphTransformerEncoder
from gnn_transformer.model import GraphEncoderModel, GraphLM, GraphTransformerConfig
from gnn_transformer.topology import causal, full
from gnn_transformer.variants import LinearAttention, MLPProjectionAttention, SigmoidAttention

BACKENDS = ["pyg", "fused", "tiled", "split"]
TOL = dict(atol=1e-5, rtol=1e-5)


def _layer(backend="pyg", **kw):
    return GraphMultiheadAttention(8, 2, backend=backend, **kw)


# ---------------------------------------------------------------- attention layer: edge_bias
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bool, torch.long, torch.int32])
def test_edge_bias_of_non_floating_dtype_refused(backend, dtype):
    """A boolean mask (or integer bias) is not a bias: refused on every backend, not added as +1."""
    ei = causal(4)
    bias = torch.ones(ei.size(1), 2, dtype=dtype)
    with pytest.raises(TypeError, match=rf"'edge_bias'.*{dtype}"):
        _layer(backend)(torch.randn(4, 8), ei, edge_bias=bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias_dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_edge_bias_of_other_floating_dtype_is_cast(backend, bias_dtype):
    """A floating bias of another dtype runs in the computation dtype, as the kernels do: the
    result is the one with that bias cast first, in the layer's dtype."""
    layer, ei, x = _layer(backend), causal(5), torch.randn(5, 8)
    bias = torch.randn(ei.size(1), 2).to(bias_dtype)
    out = layer(x, ei, edge_bias=bias)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, layer(x, ei, edge_bias=bias.float()), **TOL)


def test_edge_bias_cast_keeps_gradient_in_its_dtype():
    layer, ei = _layer("pyg"), causal(4)
    bias = torch.randn(ei.size(1), 2, dtype=torch.float64, requires_grad=True)
    layer(torch.randn(4, 8), ei, edge_bias=bias).sum().backward()
    assert bias.grad.dtype == torch.float64 and bias.grad.abs().sum() > 0


def test_edge_bias_on_other_device_refused():
    ei = causal(4)
    with pytest.raises(ValueError, match="'edge_bias'.*meta"):
        _layer()(torch.randn(4, 8), ei, edge_bias=torch.zeros(ei.size(1), 2, device="meta"))


# ---------------------------------------------------------------- attention layer: x
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_input_of_other_dtype_than_weights(backend, dtype):
    x = torch.randn(4, 8, dtype=dtype)
    with pytest.raises(TypeError, match=rf"'x'.*torch.float32.*{dtype}"):
        _layer(backend)(x, causal(4))


def test_integer_input_refused():
    with pytest.raises(TypeError, match="'x'.*torch.int64"):
        _layer()(torch.ones(4, 8, dtype=torch.long), causal(4))


def test_pair_input_of_other_dtype_names_its_part():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match=r"'x\[0\]'.*torch.float64"):
        _layer()((x.double(), x), full(4))
    with pytest.raises(TypeError, match="'value'.*torch.float64"):
        _layer()(x, full(4), value=x.double())


@pytest.mark.parametrize("backend", ["pyg", "tiled"])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_autocast_cpu_bf16_still_runs(backend, input_dtype):
    """Under torch.autocast the input need not have the weights' dtype; a float32 edge bias is
    accepted too. The result is close to float32's."""
    layer, ei = _layer(backend), causal(6)
    x, bias = torch.randn(6, 8), torch.randn(ei.size(1), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.to(input_dtype), ei, edge_bias=bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer(x, ei, edge_bias=bias), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(
    "x, got",
    [
        (lambda x: (x, x, x), "tuple of length 3"),
        (lambda x: None, "NoneType"),
        (lambda x: [x], "list of length 1"),
        (lambda x: x.tolist(), "list of length 4"),
    ],
)
def test_input_neither_tensor_nor_pair(x, got):
    with pytest.raises(TypeError, match=f"'x'.*{got}"):
        _layer()(x(torch.randn(4, 8)), full(4))


def test_kv_of_other_dtype_or_not_a_pair():
    layer = _layer()
    x = torch.randn(4, 8)
    key, value = layer.key_value(x)
    with pytest.raises(TypeError, match=r"'kv\[0\]'.*torch.float64"):
        layer(x, causal(4), kv=(key.double(), value))
    with pytest.raises(TypeError, match="'kv'.*tuple of length 3"):
        layer(x, causal(4), kv=(key, value, value))
    with pytest.raises(TypeError, match="'x'.*list"):
        layer(x.tolist(), causal(4), kv=(key, value))


# ---------------------------------------------------------------- attention layer: edge_index
def test_edge_index_on_meta_device():
    ei = causal(4).as_tensor().to("meta")
    with pytest.raises(ValueError, match="'edge_index'.*meta"):
        _layer()(torch.randn(4, 8), ei)


def test_edge_index_on_meta_device_with_meta_layer():
    layer = _layer().to("meta")
    with pytest.raises(ValueError, match="'edge_index'.*meta"):
        layer(torch.randn(4, 8, device="meta"), causal(4).as_tensor().to("meta"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "edges, match",
    [
        ([[0, 7], [0, 1]], "source index 7"),
        ([[0, 1], [0, 7]], "target index 7"),
        ([[0, -1], [0, 1]], "non-negative.*-1"),
    ],
)
def test_edge_index_object_out_of_its_sparse_size(backend, edges, match):
    """An EdgeIndex whose sparse_size is right but holds an index outside it: the same ValueError
    on every backend (not PyG's IndexError)."""
    ei = EdgeIndex(torch.tensor(edges), sparse_size=(4, 4))
    with pytest.raises(ValueError, match=match) as err:
        _layer(backend)(torch.randn(4, 8), ei)
    assert "'edge_index'" in str(err.value)


@pytest.mark.parametrize(
    "make, written",
    [
        (lambda: causal(4), lambda ei: ei),
        (lambda: causal(4), lambda ei: ei.as_tensor()),  # an EdgeIndex's data: another version counter
        (lambda: causal(4).as_tensor().clone(), lambda ei: ei),
    ],
    ids=["EdgeIndex", "EdgeIndex data", "tensor"],
)
def test_edge_index_written_in_place_after_a_check_is_checked_again(make, written):
    """The range check runs once per graph object, and again after an in-place write."""
    layer, x = _layer(), torch.randn(4, 8)
    ei = make()
    layer(x, ei)
    layer(x, ei)  # checked once, remembered
    with torch.no_grad():
        written(ei)[0, 1] = 9
    with pytest.raises(ValueError, match="source index 9 in 'edge_index'"):
        layer(x, ei)


def test_edge_index_checked_for_other_sizes():
    """A graph checked for 4 nodes is checked again when used with 3."""
    ei = torch.tensor([[0, 3], [0, 3]])
    _layer()(torch.randn(4, 8), ei)
    with pytest.raises(ValueError, match="source index 3 in 'edge_index'.*3 source"):
        _layer()(torch.randn(3, 8), ei)


# ---------------------------------------------------------------- layer constructors
LAYERS = [GraphTransformerEncoderLayer, GraphTransformerDecoderLayer]


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"layer_norm_eps": -1.0}, "layer_norm_eps"),
        ({"layer_norm_eps": math.nan}, "layer_norm_eps"),
        ({"layer_norm_eps": math.inf}, "layer_norm_eps"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
        ({"layer_norm_eps": "a"}, "layer_norm_eps"),
        ({"layer_norm_eps": True}, "layer_norm_eps"),
        ({"norm_first": "yes"}, "norm_first"),
        ({"norm_first": 1}, "norm_first"),
        ({"batch_first": None}, "batch_first"),
        ({"bias": "no"}, "bias"),
        ({"activation": None}, "activation"),
        ({"activation": "tanh"}, "activation"),
        ({"attention": "softmax"}, "attention"),
        ({"dropout": math.nan}, "dropout"),
    ],
)
def test_layer_arguments(cls, kwargs, name):
    with pytest.raises(ValueError, match=f"'{name}'.*{re.escape(repr(kwargs[name]))}"):
        cls(8, 2, 16, **kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"layer_norm_eps": -1.0}, "layer_norm_eps"),
        ({"layer_norm_eps": math.nan}, "layer_norm_eps"),
        ({"norm_first": "yes"}, "norm_first"),
        ({"bias": 0}, "bias"),
        ({"batch_first": "no"}, "batch_first"),
    ],
)
def test_graph_transformer_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"'{name}'"):
        GraphTransformer(8, 2, 1, 1, 16, **kwargs)
    # checked also when both stacks are given (the arguments then shape nothing, but are wrong)
    enc = GraphTransformerEncoder(GraphTransformerEncoderLayer(8, 2, 16), 1)
    dec = GraphTransformerDecoder(GraphTransformerDecoderLayer(8, 2, 16), 1)
    with pytest.raises(ValueError, match=f"'{name}'"):
        GraphTransformer(8, 2, custom_encoder=enc, custom_decoder=dec, **kwargs)


def test_graph_transformer_custom_stacks_must_be_modules():
    with pytest.raises(TypeError, match="'custom_encoder'.*str"):
        GraphTransformer(8, 2, 1, 1, 16, custom_encoder="enc")
    with pytest.raises(TypeError, match="'custom_decoder'.*function"):
        GraphTransformer(8, 2, 1, 1, 16, custom_decoder=lambda x: x)


@pytest.mark.parametrize(
    "stack, name", [(GraphTransformerEncoder, "encoder_layer"), (GraphTransformerDecoder, "decoder_layer")]
)
def test_stack_arguments(stack, name):
    with pytest.raises(TypeError, match=f"'{name}'.*str"):
        stack("layer", 2)
    layer = (GraphTransformerEncoderLayer if stack is GraphTransformerEncoder else GraphTransformerDecoderLayer)(
        8, 2, 16
    )
    with pytest.raises(TypeError, match="'norm'.*float"):
        stack(layer, 2, norm=1e-5)
    with pytest.raises(ValueError, match="'num_layers'.*-1"):
        stack(layer, -1)


def test_good_layer_arguments_still_accepted():
    layer = GraphTransformerEncoderLayer(
        8, 2, 16, dropout=0.0, activation="gelu", layer_norm_eps=1, norm_first=True, bias=False, backend="pyg"
    )
    assert layer.norm1.eps == 1 and layer(torch.randn(3, 8), causal(3)).shape == (3, 8)


# ---------------------------------------------------------------- variants
@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: SigmoidAttention(8, 2, score_bias=math.nan), "score_bias"),
        (lambda: SigmoidAttention(8, 2, score_bias="a"), "score_bias"),
        (lambda: SigmoidAttention(8, 2, score_bias=True), "score_bias"),
        (lambda: LinearAttention(8, 2, eps=math.nan), "eps"),
        (lambda: LinearAttention(8, 2, eps=-1), "eps"),
        (lambda: LinearAttention(8, 2, eps="1e-6"), "eps"),
        (lambda: MLPProjectionAttention(8, 2, mlp_activation=None), "mlp_activation"),
        (lambda: MLPProjectionAttention(8, 2, mlp_activation="gelu"), "mlp_activation"),
    ],
)
def test_variant_arguments(make, name):
    with pytest.raises(ValueError, match=f"'{name}'"):
        make()


@pytest.mark.parametrize("cls", [SigmoidAttention, LinearAttention])
@pytest.mark.parametrize("backend", ["fused", "tiled", "split"])
def test_score_variants_refuse_kernel_backends_at_construction(cls, backend):
    with pytest.raises(ValueError, match=f"'backend'.*'{backend}'"):
        cls(8, 2, backend=backend)


def test_good_variant_arguments_still_accepted():
    ei, x = causal(3), torch.randn(3, 8)
    assert SigmoidAttention(8, 2, score_bias=-1, backend="pyg")(x, ei).shape == (3, 8)
    assert LinearAttention(8, 2, eps=0)(x, ei).shape == (3, 8)
    assert MLPProjectionAttention(8, 2, mlp_activation=torch.tanh, backend="fused")(x, ei).shape == (3, 8)


# ---------------------------------------------------------------- model configs
@pytest.mark.parametrize("attention", ["sigmoid", "linear"])
@pytest.mark.parametrize("backend", ["fused", "tiled", "split"])
def test_config_score_variant_with_kernel_backend(attention, backend):
    """Refused at construction, naming both fields (not at the first forward)."""
    config = GraphTransformerConfig(
        vocab_size=11, d_model=8, nhead=2, num_layers=1, attention=attention, backend=backend
    )
    with pytest.raises(ValueError, match=f"'backend'.*attention='{attention}'.*backend='{backend}'"):
        GraphLM(config)


@pytest.mark.parametrize("backend", ["fused", "tiled", "split"])
def test_config_mlp_attention_runs_on_kernels(backend):
    config = GraphTransformerConfig(vocab_size=11, d_model=8, nhead=2, num_layers=1, attention="mlp", backend=backend)
    assert GraphLM(config)(torch.tensor([1, 2]), causal(2), pos=torch.arange(2)).shape == (2, 11)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"backend": "cuda"}, "'backend'.*'cuda'"),
        ({"position": "sinusoidal", "d_model": 7, "nhead": 1}, "'d_model'.*sinusoidal.*7"),
    ],
)
def test_config_other_bad_combinations(fields, match):
    config = GraphTransformerConfig(**{"vocab_size": 11, "d_model": 8, "nhead": 2, "num_layers": 1, **fields})
    with pytest.raises(ValueError, match=match):
        GraphEncoderModel(config)


@pytest.mark.parametrize("ids, bad", [([3, 11], 11), ([-1, 2], -1), ([40, 2], 40)])
def test_token_ids_outside_the_vocabulary(ids, bad):
    lm = GraphLM(GraphTransformerConfig(vocab_size=11, d_model=8, nhead=2, num_layers=1, backend="pyg"))
    with pytest.raises(ValueError, match=f"Found {bad} in 'x'.*0..10"):
        lm(torch.tensor(ids), causal(2), pos=torch.arange(2))


def test_model_input_not_a_tensor():
    lm = GraphLM(GraphTransformerConfig(vocab_size=11, d_model=8, nhead=2, num_layers=1))
    with pytest.raises(TypeError, match="'x'.*list"):
        lm([1, 2], causal(2), pos=torch.arange(2))


# ---------------------------------------------------------------- generate
class _Counting(torch.nn.Module):
    """A GraphLM that counts its forward passes."""

    def __init__(self):
        super().__init__()
        self.lm = GraphLM(GraphTransformerConfig(vocab_size=11, d_model=8, nhead=2, num_layers=1, backend="pyg")).eval()
        self.config = self.lm.config
        self.calls = 0

    def forward_graph(self, *args, **kwargs):
        self.calls += 1
        return self.lm.forward_graph(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pad_token_id": "x"}, "'pad_token_id'.*'x'"),
        ({"pad_token_id": None}, "'pad_token_id'.*None"),
        ({"pad_token_id": 1.5}, "'pad_token_id'.*1.5"),
        ({"eos_token_id": "2"}, "'eos_token_id'.*'2'"),
        ({"greedy": "yes"}, "'greedy'.*'yes'"),
        ({"use_cache": 1}, "'use_cache'.*1"),
        ({"return_logits": None}, "'return_logits'.*None"),
        ({"generator": 0}, "'generator'.*0"),
        ({"temperature": math.nan}, "'temperature'.*nan"),
        ({"top_k": 0}, "'top_k'.*0"),
        ({"window": 1.0}, "'window'.*1.0"),
    ],
)
def test_generate_arguments_checked_before_any_step(kwargs, match):
    model = _Counting()
    with pytest.raises(ValueError, match=match):
        generate(model, torch.tensor([[1, 2]]), 3, **kwargs)
    assert model.calls == 0


@pytest.mark.parametrize("ids, bad", [([[1, 11]], 11), ([[-2, 1]], -2)])
def test_generate_prompt_outside_the_vocabulary(ids, bad):
    model = _Counting()
    with pytest.raises(ValueError, match=f"Found {bad} in 'input_ids'.*0..10"):
        generate(model, torch.tensor(ids), 2)
    assert model.calls == 0


def test_generate_padding_may_hold_any_id():
    """Only the real tokens are checked: padding ids outside the vocabulary are dropped."""
    model = _Counting()
    ids, mask = torch.tensor([[1, 2, -100]]), torch.tensor([[1, 1, 0]])
    out = generate(model, ids, 2, attention_mask=mask)
    torch.testing.assert_close(out, generate(model, ids[:, :2], 2))


def test_generate_boolean_input_ids_refused():
    with pytest.raises(ValueError, match="'input_ids'.*torch.bool"):
        generate(_Counting(), torch.ones(1, 2, dtype=torch.bool), 2)


# ---------------------------------------------------------------- padding helpers
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: from_padded([[1, 2]], [1]), "'x'.*list"),
        (lambda: to_padded([1.0, 2.0], [2]), "'x'.*list"),
        (lambda: from_padded(torch.zeros(1, 2), 1), "'lengths'.*1"),
        (lambda: to_padded(torch.zeros(2), "ab"), "'lengths'.*'ab'"),
    ],
)
def test_padding_helpers_types(call, match):
    with pytest.raises(TypeError, match=match):
        call()


@pytest.mark.parametrize(
    "dtype, fill_value",
    [
        (torch.long, math.nan),
        (torch.long, math.inf),
        (torch.long, 2**70),
        (torch.long, 1.5),
        (torch.int32, 2**31),
        (torch.uint8, -1),
        (torch.bool, 2),
        (torch.float32, 1e300),
        (torch.float16, 1e5),
        (torch.float32, "0"),
        (torch.long, None),
    ],
)
def test_to_padded_fill_value_outside_the_dtype(dtype, fill_value):
    x = torch.zeros(3, dtype=dtype)
    with pytest.raises(ValueError, match=f"'fill_value'.*{dtype}"):
        to_padded(x, [2, 1], fill_value=fill_value)


@pytest.mark.parametrize(
    "dtype, fill_value",
    [
        (torch.long, -1),
        (torch.long, 2.0),
        (torch.int32, -(2**31)),
        (torch.bool, True),
        (torch.float32, -math.inf),
        (torch.float32, math.nan),
        (torch.float16, 6e4),
    ],
)
def test_to_padded_fill_values_that_fit(dtype, fill_value):
    out = to_padded(torch.zeros(3, dtype=dtype), [2, 1], fill_value=fill_value)
    assert out.dtype == dtype
    torch.testing.assert_close(out[1, 1], torch.tensor(fill_value, dtype=dtype), equal_nan=True)


# ---------------------------------------------------------------- Hugging Face import
def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=31,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    return transformers.BertModel(config).eval()


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=31, n_embd=8, n_layer=1, n_head=2, n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_from_hf_of_the_wrong_model_type():
    from gnn_transformer import hf

    with pytest.raises(TypeError, match="'model'.*'bert'.*GPT2LMHeadModel.*'gpt2'"):
        hf.GraphBertModel.from_hf(_tiny_gpt2())
    with pytest.raises(TypeError, match="'model'.*'gpt2'.*BertModel.*'bert'"):
        hf.GraphGPT2LMHeadModel.from_hf(_tiny_bert())
    with pytest.raises(TypeError, match="'model'.*'bert'.*str"):
        hf.GraphBertModel.from_hf("bert-base-uncased")
    with pytest.raises(TypeError, match="'config'.*'gpt2'.*BertConfig.*'bert'"):
        hf.GraphGPT2LMHeadModel(_tiny_bert().config)
    with pytest.raises(TypeError, match="'config'.*'bert'.*GPT2Config.*'gpt2'"):
        hf.GraphBertModel(_tiny_gpt2().config)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("make", [_tiny_bert, _tiny_gpt2])
def test_from_hf_topology_returning_a_list(make):
    from gnn_transformer import hf

    graph = hf.from_hf(make(), backend="pyg")
    ids = torch.randint(0, 31, (2, 3))
    with pytest.raises(ValueError, match="'topology'.*list"):
        graph(input_ids=ids, topology=lambda lengths: causal(lengths).tolist())


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("make", [_tiny_bert, _tiny_gpt2])
def test_from_hf_token_ids_outside_the_vocabulary(make):
    from gnn_transformer import hf

    graph = hf.from_hf(make(), backend="pyg")
    with pytest.raises(ValueError, match="Found 31 in 'input_ids'.*0..30"):
        graph(input_ids=torch.tensor([[1, 31]]))


# ---------------------------------------------------------------- padding helpers


@pytest.mark.parametrize(
    "lengths, max_len, expected",
    [
        ([2, 0, 3], None, [[1, 1, 0], [0, 0, 0], [1, 1, 1]]),
        ([0, 0], None, [[], []]),
        ([0, 1], 3, [[0, 0, 0], [1, 0, 0]]),
        ([], None, []),
        (torch.tensor([1, 0]), None, [[1], [0]]),
    ],
)
def test_padding_mask_of_empty_sequences_and_batches(lengths, max_len, expected):
    from gnn_transformer.padding import padding_mask

    mask = padding_mask(lengths, max_len)
    want = torch.tensor(expected, dtype=torch.bool).reshape(len(expected), -1 if expected and expected[0] else 0)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_to_padded_and_from_padded_with_empty_sequences_round_trip(dtype):
    x = torch.arange(1.0, 6.0, dtype=dtype)[:, None].expand(5, 2)  # rows 1..5
    out = to_padded(x, [2, 0, 3], fill_value=-1.0)
    want = torch.tensor([[1, 2, -1], [-1, -1, -1], [3, 4, 5]], dtype=dtype)[..., None].expand(3, 3, 2)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    torch.testing.assert_close(from_padded(out, [2, 0, 3]), x, atol=0, rtol=0)
    empty = to_padded(torch.empty(0, 2, dtype=dtype), [])
    assert empty.shape == (0, 0, 2)
    assert to_padded(torch.empty(0, 2, dtype=dtype), [0, 0]).shape == (2, 0, 2)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: to_padded(torch.zeros(3), [4, -1]), r"'lengths' to be non-negative \(got \[4, -1\]\)"),
        (lambda: from_padded(torch.zeros(2, 3), [-1, 1]), r"'lengths' to be non-negative"),
        (lambda: from_padded(torch.zeros(2, 3), [1]), r"Expected 2 entries in 'lengths', one per sequence \(got 1\)"),
        (lambda: from_padded(torch.zeros(2, 3), [1, 1, 1]), r"Expected 2 entries in 'lengths'.*\(got 3\)"),
        (lambda: from_padded(torch.zeros(2, 3), torch.tensor([True, False])), r"'lengths' to hold.*torch.bool"),
        (lambda: to_padded(torch.zeros(1), torch.tensor([True])), r"'lengths' to hold integers.*torch.bool"),
        (lambda: to_padded(torch.zeros(3), [2, 2]), r"'x' to have sum\(lengths\) = 4 rows \(got 3\)"),
        (lambda: to_padded(torch.zeros(5), [2, 2]), r"'x' to have sum\(lengths\) = 4 rows \(got 5\)"),
        (lambda: from_padded(torch.zeros(3), [1, 1, 1]), r"'x' to be padded \[B, T, ...\] \(got shape \[3\]\)"),
        (lambda: from_padded(torch.tensor(1.0), [1]), r"'x' to be padded \[B, T, ...\] \(got shape \[\]\)"),
    ],
)
def test_padding_helpers_bad_lengths(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("fill_value", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.long, torch.int32])
def test_to_padded_bool_fill_value_only_for_bool_tensors(dtype, fill_value):
    """A bool is no number of a numeric dtype (as in the existing fill-value checks); it fills a
    bool tensor."""
    with pytest.raises(ValueError, match=f"'fill_value'.*{dtype}"):
        to_padded(torch.zeros(3, dtype=dtype), [2, 1], fill_value=fill_value)
    out = to_padded(torch.zeros(3, dtype=torch.bool), [2, 1], fill_value=fill_value)
    assert out[1, 1].item() is fill_value
