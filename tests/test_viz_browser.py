"""The viewer in a real browser (headless Chromium driven by selenium): pages load without a
JavaScript error, hovering a token highlights exactly its incoming edges, the receptive-field slider
and the layer and head selectors change what is drawn. One browser for the module."""

import pytest
import torch

from gnn_transformer import topology, viz
from gnn_transformer.experiments.topologies import resolve_topology
from gnn_transformer.viz import browser

REASON = browser.missing()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"needs headless Chromium: {REASON}")


@pytest.fixture(scope="module")
def driver():
    d = browser.start_chromium()
    yield d
    d.quit()


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """Page files by name, written once for the module."""
    root = tmp_path_factory.mktemp("pages")
    written = {}

    def page(name, make):
        if name not in written:
            written[name] = viz.write_html(make(), root / f"{name}.html")
        return written[name]

    return page


def _load(driver, path):
    errors = browser.open_page(driver, path)
    assert errors == [], errors


def _pairs(driver, selector):
    """``(src, dst)`` of the elements matching ``selector``."""
    found = driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".map(function (e) { return [Number(e.dataset.src), Number(e.dataset.dst)]; });",
        selector,
    )
    return sorted(map(tuple, found))


def _nodes(driver, selector):
    return sorted(
        driver.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0])).map(function (e) "
            "{ return Number(e.dataset.node); });",
            selector,
        )
    )


def _select(driver, element_id, index):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, element_id)).select_by_index(index)


def _edges(edge_index):
    t = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    return sorted(zip(t[0].tolist(), t[1].tolist()))


SPEC, N = "bigbird:window=1,num_global=1,num_random=2,seed=3", 24


def test_hovering_a_token_highlights_exactly_its_incoming_edges(driver, pages):
    _load(driver, pages("bigbird", lambda: viz.topology_html(SPEC, N)))
    edges = _edges(resolve_topology(SPEC).build([N]))
    assert _pairs(driver, "#graph .edge") == edges and _pairs(driver, "#matrix .cell") == edges
    assert _pairs(driver, "#graph .edge.hi") == []
    for i in (0, 7, N - 1):
        browser.hover(driver, i)
        incoming = [(j, t) for j, t in edges if t == i]
        assert _pairs(driver, "#graph .edge.hi") == incoming
        assert _pairs(driver, "#matrix .cell.hi") == incoming  # its row of the matrix
        assert _nodes(driver, "#graph .node.src") == sorted({j for j, _ in incoming})
        assert _nodes(driver, "#graph .node.focus") == [i]


def test_the_receptive_field_slider_shows_the_tokens_reached_after_l_layers(driver, pages):
    _load(driver, pages("bigbird", lambda: viz.topology_html(SPEC, N)))
    edge_index = resolve_topology(SPEC).build([N])
    for layers in (1, 2):
        browser.set_receptive(driver, layers)
        for i in (3, 20):
            browser.hover(driver, i)
            assert _nodes(driver, "#graph .node.rf") == sorted(topology.receptive_field(edge_index, layers, N)[i])


def test_the_head_selector_draws_each_heads_graph(driver, pages):
    spec, n = "dilated_per_head:window=2,dilations=1;2;3", 15
    _load(driver, pages("per_head", lambda: viz.topology_html(spec, n)))
    edge_index, edge_head = resolve_topology(spec).build([n])
    for h in (0, 2, 1):
        _select(driver, "head-select", h)
        head_edges = _edges(edge_index[:, edge_head == h])
        assert _pairs(driver, "#graph .edge") == head_edges
        browser.hover(driver, 7)
        assert _pairs(driver, "#graph .edge.hi") == [(j, i) for j, i in head_edges if i == 7]


def test_the_layer_selector_draws_each_layers_graph(driver, pages):
    _load(driver, pages("gemma3", lambda: viz.topology_html("gemma3", 16)))
    pattern = resolve_topology("gemma3", small=True).build([16])
    for layer in (5, 0):
        _select(driver, "layer-select", layer)
        assert _pairs(driver, "#graph .edge") == _edges(pattern(layer))


def test_a_model_page_draws_the_weights_of_the_selected_layer_and_head(driver, pages):
    from gnn_transformer.analysis import AttentionGraph

    n = 6
    ei = topology.causal(n).as_tensor()
    gen = torch.Generator().manual_seed(0)
    graphs = []
    for k in range(2):
        scores = (
            torch.randn(n, n, 2, generator=gen)
            .masked_fill(~torch.ones(n, n, 1, dtype=torch.bool).tril(), float("-inf"))
            .softmax(dim=1)
        )  # [N_q, N_k, H]
        graphs.append(AttentionGraph(f"layers.{k}", k, ei, scores[ei[1], ei[0]], n, n))
    page = viz.attention_page(graphs, ["the", "cat", "sat", "on", "a", "mat"])
    _load(driver, pages("model", lambda: viz.to_html(page)))
    for layer, head in ((0, 0), (1, 1), (1, 2)):
        _select(driver, "layer-select", layer)
        _select(driver, "head-select", head)
        view = page.layers[layer].views[head]
        drawn = driver.execute_script(
            "return Array.from(document.querySelectorAll('#graph .edge')).map(function (e) "
            "{ return [Number(e.dataset.src), Number(e.dataset.dst), Number(e.dataset.w)]; });"
        )
        want = {(j, i): w for j, i, w in zip(view.src, view.dst, view.weights)}
        assert {(j, i): w for j, i, w in drawn} == pytest.approx(want, abs=1e-7)
        browser.hover(driver, 4)
        assert _pairs(driver, "#graph .edge.hi") == [(j, 4) for j in range(5)]
        assert _nodes(driver, "#graph .node.sink") == view.sinks


def test_an_aggregated_page_says_so(driver, pages):
    from selenium.webdriver.common.by import By

    _load(driver, pages("full", lambda: viz.topology_html("full", 120, max_edges=1000)))
    assert "Aggregated" in driver.find_element(By.ID, "notes").text
    assert len(_pairs(driver, "#graph .edge")) <= 1000
