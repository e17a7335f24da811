"""The benchmark's baselines: SDPA as a user calls it for each graph, FlexAttention with each
``mask_mod`` variant (or the reason it cannot run), and the plain GPT of the training-step benchmark."""

from __future__ import annotations

import pytest
import torch

from gnn_transformer.bench import baselines
from gnn_transformer.bench.baselines import FLEX_VARIANTS, Unavailable, make_sdpa, sdpa_mode
from gnn_transformer.bench.benchmark import build_graph, run_benchmark
from gnn_transformer.topology import causal, document, flex_attention_available, full, sliding_window

from .conftest import TOL, dense_attention

SDPA_CASES = [
    ("causal", lambda: causal(48), "causal"),
    ("full", lambda: full(32), "full"),
    ("documents-causal", lambda: document(48, [10, 30, 8], causal=True), "documents-causal"),
    ("documents-full", lambda: document(48, [10, 30, 8]), "documents-full"),
    ("equal-documents-causal", lambda: document(48, 12, causal=True), "documents-causal"),
    ("equal-documents-full", lambda: document(48, 12), "documents-full"),
    ("window", lambda: sliding_window(48, 5), "mask"),
]


def _inputs(n, heads=4, kv_heads=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, dim, generator=gen) for h in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("name,build,mode", SDPA_CASES, ids=[c[0] for c in SDPA_CASES])
def test_sdpa_as_a_user_calls_it_matches_dense(name, build, mode):
    edge_index = build()
    n = 48 if name != "full" else 32
    got_mode, bounds = sdpa_mode(edge_index, n)
    assert got_mode == mode
    plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    fn = make_sdpa(edge_index, plain[0], plain[1], n, 0.4, got_mode, bounds)
    q, k, v = _inputs(n)
    assert fn.layout == ("docs" if name.startswith("equal") else "nhd" if fn.note.startswith("nested") else "bhnd")
    to, back = baselines.layout_functions(fn)
    qg, kg, vg = (to(x).requires_grad_() for x in (q, k, v))
    out = back(fn(qg, kg, vg))
    ref_inputs = [x.double().requires_grad_() for x in (q, k, v)]
    ref = dense_attention(*ref_inputs, edge_index, 0.4)
    torch.testing.assert_close(out, ref.float(), **TOL[torch.float32])
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (qg, kg, vg), grad)
    want = torch.autograd.grad(ref, ref_inputs, grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(back(g), w.float(), **TOL[torch.float32])
    assert fn.note
    if name.startswith("equal"):  # documents of one length: one call with the documents as the batch
        assert fn.note.startswith("one call, 4 documents as the batch")


def test_causal_documents_say_why_they_are_not_nested():
    fn = make_sdpa(*_edges(document(24, [8, 10, 6], causal=True)), 24, 1.0, "documents-causal", (0, 8, 18, 24))
    assert fn.note.startswith("3 calls, one per document, is_causal") or fn.note.startswith("nested jagged")


def _edges(edge_index):
    plain = edge_index.as_tensor()
    return edge_index, plain[0], plain[1]


@pytest.mark.parametrize(
    "topology,variant,reason",
    [
        ("random", "predicate", "no predicate"),
        ("bigbird", "predicate", "no predicate"),
        ("causal", "blocks", "not made of whole blocks"),
        ("window", "blocks", "not made of whole blocks"),
    ],
)
def test_flex_variants_that_cannot_run_say_why(topology, variant, reason):
    pytest.importorskip("torch.nn.attention.flex_attention")
    edge_index, src, dst = _edges(build_graph(topology, 1024))
    with pytest.raises(Unavailable, match=reason):
        baselines.flex_block_mask(variant, topology, edge_index, src, dst, 1024, "cpu", 128, 1e12)


def test_dense_lookup_refuses_what_does_not_fit():
    pytest.importorskip("torch.nn.attention.flex_attention")
    edge_index, src, dst = _edges(build_graph("random", 1024))
    with pytest.raises(Unavailable, match="the dense lookup needs"):
        baselines.flex_block_mask("lookup", "random", edge_index, src, dst, 1024, "cpu", 128, 1024 * 1023)


@pytest.mark.parametrize(
    "topology,variants",
    [
        ("causal", ["predicate", "lookup", "bitmap"]),
        ("window", ["predicate", "lookup", "bitmap"]),
        ("document", ["predicate", "lookup", "bitmap"]),
        ("bigbird", ["lookup", "blocks", "bitmap"]),
        ("random", ["lookup", "bitmap"]),
    ],
)
def test_flex_mask_mods_are_the_graph(topology, variants):
    """Every variant's mask_mod, evaluated at every (q, kv), is the graph's dense mask."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    n = 1024
    edge_index, src, dst = _edges(build_graph(topology, n))
    want = torch.zeros(n, n, dtype=torch.bool)
    want[dst, src] = True
    qi, ki = torch.arange(n)[:, None].expand(n, n), torch.arange(n)[None, :].expand(n, n)
    zero = torch.zeros((), dtype=torch.long)
    for variant in variants:
        mask = baselines.flex_block_mask(variant, topology, edge_index, src, dst, n, "cpu", 128, 1e12)
        got = mask.mask_mod(zero, zero, qi, ki)
        assert torch.equal(got, want), variant
        # the block lists agree with the mask: a full block holds only edges, an empty one none
        dense = mask.to_dense()[0, 0]  # [Qb, KVb] blocks holding any cell
        blocks = want.view(n // 128, 128, n // 128, 128).any(3).any(1)
        assert torch.equal(dense.bool(), blocks), variant


@pytest.mark.skipif(not flex_attention_available(), reason="FlexAttention needs torch >= 2.5")
def test_flex_row_names_the_fastest_variant_and_the_reasons_of_the_others():
    rows = run_benchmark(
        ["random"], [256], ["flex"], device="cpu", heads=2, head_dim=8, repeats=1, flex_variants=FLEX_VARIANTS
    )
    fwd, bwd = rows
    assert fwd["ms"] is not None and fwd["max_err"] < 1e-5
    winner = fwd["note"].split(" fastest")[0]
    assert winner in ("lookup", "bitmap")
    assert "predicate: no predicate" in fwd["note"] and "blocks: not made of whole blocks" in fwd["note"]
    assert bwd["ms"] is None and "FlexAttention has no backward pass on cpu" in bwd["note"]


def test_sdpa_row_on_a_causal_graph_runs_is_causal():
    rows = run_benchmark(["causal", "window"], [320], ["sdpa", "auto"], device="cpu", heads=2, head_dim=8, repeats=1)
    notes = {(r["topology"], r["backend"], r["pass"]): r["note"] for r in rows}
    assert notes[("causal", "sdpa", "fwd")] == "is_causal" and notes[("window", "sdpa", "fwd")] == "dense bool mask"
    assert notes[("causal", "auto", "fwd")] == "ran sdpa" and notes[("window", "auto", "fwd")] != "ran sdpa"
    assert all(r["max_err"] < 1e-5 for r in rows)


def test_train_step_paired_ratios_are_quartiles_of_the_rounds():
    from gnn_transformer.bench.train_step import _paired, format_table

    q1, median, q3 = _paired([2.0, 3.0, 4.0, 10.0, 6.0], [1.0, 1.0, 2.0, 2.0, 2.0])  # ratios 2 3 2 5 3
    assert (q1, median, q3) == (2.0, 3.0, 3.0)
    row = dict(model="m", context=8, batch=1, params=10, ms=1.0, ratio=1.0, paired=(q1, median, q3), note="")
    assert "3.000× (2.000–3.000)" in format_table([row])


def test_train_step_rows_compare_models_of_one_size():
    from gnn_transformer.bench.train_step import format_markdown, format_table, run_train_step_benchmark

    rows = run_train_step_benchmark(
        [8, 16], batch_size=2, layers=1, heads=2, width=16, vocab=11, repeats=1, device="cpu"
    )
    assert [(r["model"], r["context"]) for r in rows] == [
        ("gpt_sdpa", 8),
        ("graph_lm (auto)", 8),
        ("gpt_sdpa", 16),
        ("graph_lm (auto)", 16),
    ]
    for gpt, graph in (rows[:2], rows[2:]):
        assert gpt["params"] == graph["params"] and gpt["ratio"] == 1.0
        assert graph["ratio"] == pytest.approx(graph["ms"] / gpt["ms"])
        # one round: its one paired ratio is the ratio of the two medians
        assert gpt["paired"] is None and graph["paired"] == pytest.approx((graph["ratio"],) * 3)
        assert graph["note"].startswith("layers run ")
    assert format_table(rows).count("\n") == len(rows) and format_markdown(rows).startswith("| model")


def test_plain_gpt_is_causal():
    """Changing a later token leaves the GPT's logits at earlier positions unchanged."""
    from gnn_transformer.bench.train_step import PlainGPT

    torch.manual_seed(0)
    model = PlainGPT(11, 8, 1, 2, 16)
    idx = torch.randint(0, 11, (1, 8))
    other = idx.clone()
    other[0, 5] = (other[0, 5] + 1) % 11
    a, b = model(idx), model(other)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_block_table_takes_the_partial_blocks_at_the_end_of_a_length_the_block_does_not_divide():
    """n = 200 on blocks of 128: the boundary blocks are 128 x 72, 72 x 128 and 72 x 72 cells, full
    on a full graph; with one edge missing no block size is made of whole blocks."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    n = 200
    edge_index = full(n)
    plain = edge_index.as_tensor()
    src, dst = plain[0], plain[1]
    mask = baselines.flex_block_mask("blocks", "full", edge_index, src, dst, n, "cpu", 128, 1e12)
    qi, ki = torch.arange(n)[:, None].expand(n, n), torch.arange(n)[None, :].expand(n, n)
    zero = torch.zeros((), dtype=torch.long)
    assert bool(mask.mask_mod(zero, zero, qi, ki).all())
    keep = ~((dst == 150) & (src == 3))  # a cell of the 72 x 128 block of the last query rows
    with pytest.raises(Unavailable, match="not made of whole blocks"):
        baselines.flex_block_mask("blocks", "full", edge_index, src[keep], dst[keep], n, "cpu", 128, 1e12)


def test_plain_gpt_computes_what_graph_lm_computes_with_its_weights():
    """The training-step baseline is the same model as GraphLM (pre-norm blocks, GELU MLP of width
    4C, no biases, tied head) on causal graphs: same weights, same logits."""
    from gnn_transformer import GraphLM, GraphTransformerConfig
    from gnn_transformer.bench.train_step import PlainGPT

    torch.manual_seed(0)
    vocab, context, layers, heads, width, batch = 11, 8, 2, 2, 16, 3
    gpt = PlainGPT(vocab, context, layers, heads, width)
    with torch.no_grad():
        for p in gpt.parameters():  # LayerNorm weights away from 1
            p.add_(0.1 * torch.randn_like(p))
    config = GraphTransformerConfig(
        vocab_size=vocab,
        d_model=width,
        nhead=heads,
        num_layers=layers,
        bias=False,
        max_positions=context,
        backend="pyg",
    )
    lm = GraphLM(config)
    names = {"wte.weight": "embed.weight", "wpe.weight": "pos_embed.weight", "ln_f.weight": "encoder.norm.weight"}
    for i in range(layers):
        src, dst = f"blocks.{i}.", f"encoder.layers.{i}."
        names.update(
            {
                src + "ln_1.weight": dst + "norm1.weight",
                src + "attn.c_attn.weight": dst + "self_attn.in_proj_weight",
                src + "attn.c_proj.weight": dst + "self_attn.out_proj.weight",
                src + "ln_2.weight": dst + "norm2.weight",
                src + "mlp.0.weight": dst + "linear1.weight",
                src + "mlp.2.weight": dst + "linear2.weight",
            }
        )
    state = {names[k]: v for k, v in gpt.state_dict().items() if k in names}
    state["head.weight"] = state["embed.weight"]
    lm.load_state_dict(state)
    idx = torch.randint(0, vocab, (batch, context))
    pos = torch.arange(context).repeat(batch)
    want = gpt(idx)  # [B, T, V]
    got = lm(idx.view(-1), causal([context] * batch), pos=pos)  # [B T, V]
    torch.testing.assert_close(got, want.reshape(-1, vocab), **TOL[torch.float32])
