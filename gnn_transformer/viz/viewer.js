/* The viewer of gnn_transformer.viz: reads the page's JSON (element #viewer-data), draws the selected
   view as an adjacency matrix (row i: the keys query i reads) and a node-link drawing (edge j -> i:
   query i reads key j), and highlights what the hovered token reads.

   Data: {title, kind, nodes: [label], layers: [{label, views: [{label, src, dst, weights, sinks, hubs,
   stats}]}], receptive_layers, num_tokens, block, notes, node_tokens: [text] (a model page on blocks:
   each block's tokens; else empty), weighted}.
   Elements carry data-node (nodes, axis labels) and data-src / data-dst (edges, cells); highlighted
   ones get the classes hi (incoming edges of the focused token), src (the keys it reads),
   focus (itself) and rf (its receptive field). */
(function () {
  "use strict";
  var SVGNS = "http://www.w3.org/2000/svg";
  var data = JSON.parse(document.getElementById("viewer-data").textContent);
  var n = data.nodes.length;
  var nodeTokens = data.node_tokens || [];
  var state = { layer: 0, head: 0, rf: 0, focus: -1, pinned: false };
  var view = null;                  // the view drawn now
  var maxWeight = 1;
  var inEdges = [], outEdges = [];  // per node: indices of its incoming / outgoing edges
  var edgeEls = [], cellEls = [], nodeEls = [], labelEls = [], axisEls = [];
  var lit = [];                     // [element, class] highlighted now
  var layerInCache = {};            // layer entry -> in-neighbours per node (union of heads)
  var graphSvg = document.getElementById("graph");
  var matrixSvg = document.getElementById("matrix");
  var rowBand = null, colBand = null;

  // -------------------------------------------------------------- helpers
  function svg(tag, attrs, parent) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs) { e.setAttribute(k, attrs[k]); }
    if (parent) { parent.appendChild(e); }
    return e;
  }
  function el(tag, attrs, text, parent) {
    var e = document.createElement(tag);
    for (var k in attrs) { e.setAttribute(k, attrs[k]); }
    if (text !== null && text !== undefined) { e.textContent = text; }
    if (parent) { parent.appendChild(e); }
    return e;
  }
  function clearChildren(e) { while (e.firstChild) { e.removeChild(e.firstChild); } }
  function short(text, len) {  // at most len characters, cut by code points (never half a surrogate pair)
    var chars = Array.from(String(text));
    return chars.length > len ? chars.slice(0, len - 1).join("") + "\u2026" : chars.join("");
  }
  var STOPS = [[254, 224, 139], [253, 174, 97], [244, 109, 67], [215, 48, 39], [165, 0, 38]];
  function colour(t) {  // t in [0, 1]: light yellow .. dark red
    t = Math.max(0, Math.min(1, t)) * (STOPS.length - 1);
    var k = Math.min(Math.floor(t), STOPS.length - 2), f = t - k, a = STOPS[k], b = STOPS[k + 1];
    return "rgb(" + [0, 1, 2].map(function (c) { return Math.round(a[c] + f * (b[c] - a[c])); }).join(",") + ")";
  }
  function weightOf(e) { return view.weights === null ? 1 : view.weights[e]; }
  function scaled(e) { return view.weights === null ? 1 : view.weights[e] / maxWeight; }

  // -------------------------------------------------------------- notes and controls
  function buildNotes() {
    var box = document.getElementById("notes");
    data.notes.forEach(function (line) {
      el("p", { "class": line.indexOf("Aggregated") === 0 ? "reduced" : "" }, line, box);
    });
  }

  function buildControls() {
    var box = document.getElementById("controls");
    var layerLabel = el("label", {}, "layer ", box);
    var layerSel = el("select", { id: "layer-select" }, null, layerLabel);
    data.layers.forEach(function (layer, k) { el("option", { value: String(k) }, layer.label, layerSel); });
    layerSel.disabled = data.layers.length < 2;
    var headLabel = el("label", {}, "head ", box);
    var headSel = el("select", { id: "head-select" }, null, headLabel);
    function fillHeads() {
      clearChildren(headSel);
      data.layers[state.layer].views.forEach(function (v, h) { el("option", { value: String(h) }, v.label, headSel); });
      if (state.head >= data.layers[state.layer].views.length) { state.head = 0; }
      headSel.value = String(state.head);
      headSel.disabled = data.layers[state.layer].views.length < 2;
    }
    fillHeads();
    layerSel.addEventListener("change", function () {
      state.layer = Number(layerSel.value); fillHeads(); draw();
    });
    headSel.addEventListener("change", function () { state.head = Number(headSel.value); draw(); });
    if (data.receptive_layers > 0) {
      var rfLabel = el("label", {}, "receptive field after ", box);
      var slider = el("input", { id: "rf-slider", type: "range", min: "0", max: String(data.receptive_layers),
                                 step: "1", value: "0" }, null, rfLabel);
      var out = el("span", { id: "rf-value" }, "0 layers (off)", rfLabel);
      slider.addEventListener("input", function () {
        state.rf = Number(slider.value);
        out.textContent = state.rf === 0 ? "0 layers (off)" : state.rf + " layer" + (state.rf > 1 ? "s" : "");
        focus(state.focus);
      });
    }
    el("span", { "class": "hint" }, "hover a token; click to pin it, Esc to release", box);
  }

  // -------------------------------------------------------------- receptive field
  function layerIn(entry) {  // in-neighbours per node of a layer entry, union of its heads
    if (!layerInCache[entry]) {
      var sets = [];
      for (var v = 0; v < n; v++) { sets.push(new Set()); }
      data.layers[entry].views.forEach(function (w) {
        for (var e = 0; e < w.src.length; e++) { sets[w.dst[e]].add(w.src[e]); }
      });
      layerInCache[entry] = sets.map(function (s) { return Array.from(s); });
    }
    return layerInCache[entry];
  }
  function receptiveField(i, layers) {  // tokens i has received information from after `layers` layers
    var reached = new Set([i]);
    for (var k = layers - 1; k >= 0; k--) {  // the last layer applied is layers - 1
      var adj = layerIn(k % data.layers.length), next = new Set(reached);
      reached.forEach(function (v) { adj[v].forEach(function (u) { next.add(u); }); });
      reached = next;
    }
    return reached;
  }

  // -------------------------------------------------------------- drawing
  var G = { size: 540, radius: 200 };
  function nodeXY(i) {
    var a = -Math.PI / 2 + 2 * Math.PI * i / n;
    return [G.size / 2 + G.radius * Math.cos(a), G.size / 2 + G.radius * Math.sin(a), a];
  }

  function drawGraph() {
    clearChildren(graphSvg);
    graphSvg.setAttribute("width", G.size); graphSvg.setAttribute("height", G.size);
    graphSvg.setAttribute("viewBox", "0 0 " + G.size + " " + G.size);
    var defs = svg("defs", {}, graphSvg);
    var marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "9", refY: "5", markerWidth: "7",
                                 markerHeight: "7", orient: "auto", markerUnits: "userSpaceOnUse" }, defs);
    svg("path", { d: "M0,0L10,5L0,10z", fill: "#1565c0" }, marker);
    var r = Math.max(2, Math.min(7, 0.6 * Math.PI * G.radius / n));
    var edgesG = svg("g", {}, graphSvg), nodesG = svg("g", {}, graphSvg), labelsG = svg("g", {}, graphSvg);
    var m = view.src.length, opacity = m > 1500 ? 0.15 : m > 300 ? 0.3 : 0.6;
    var order = [];
    for (var e = 0; e < m; e++) { order.push(e); }
    if (view.weights !== null) { order.sort(function (a, b) { return view.weights[a] - view.weights[b]; }); }
    edgeEls = new Array(m);
    var c = G.size / 2;
    order.forEach(function (e) {
      var j = view.src[e], i = view.dst[e], pj = nodeXY(j), pi = nodeXY(i), t = scaled(e), node;
      var attrs = { "class": "edge", "data-src": String(j), "data-dst": String(i) };
      if (j === i) {  // a self-loop: a small circle outside the node
        var out = 1 + 2.2 * r / G.radius;
        attrs.cx = (c + (pi[0] - c) * out).toFixed(1); attrs.cy = (c + (pi[1] - c) * out).toFixed(1);
        attrs.r = (1.3 * r).toFixed(1);
        node = svg("circle", attrs, edgesG);
      } else {  // a curve bent towards the centre, to one side by direction
        var mx = (pj[0] + pi[0]) / 2, my = (pj[1] + pi[1]) / 2, dx = pi[0] - pj[0], dy = pi[1] - pj[1];
        var len = Math.sqrt(dx * dx + dy * dy) || 1, side = j < i ? 1 : -1;
        var qx = mx + (c - mx) * 0.35 - side * 6 * dy / len, qy = my + (c - my) * 0.35 + side * 6 * dx / len;
        var tx = pi[0] - qx, ty = pi[1] - qy, tl = Math.sqrt(tx * tx + ty * ty) || 1;
        var ex = pi[0] - tx / tl * (r + 1), ey = pi[1] - ty / tl * (r + 1);
        attrs.d = "M" + pj[0].toFixed(1) + "," + pj[1].toFixed(1) + "Q" + qx.toFixed(1) + "," + qy.toFixed(1) +
          " " + ex.toFixed(1) + "," + ey.toFixed(1);
        node = svg("path", attrs, edgesG);
      }
      if (view.weights === null) {
        node.setAttribute("stroke", "#666"); node.setAttribute("stroke-opacity", String(opacity));
        node.setAttribute("stroke-width", "1");
      } else {
        node.setAttribute("stroke", colour(t)); node.setAttribute("stroke-opacity", (0.15 + 0.85 * t).toFixed(3));
        node.setAttribute("stroke-width", (0.4 + 3.6 * t).toFixed(2));
        node.setAttribute("data-w", String(view.weights[e]));
      }
      edgeEls[e] = node;
    });
    var sinks = new Set(view.sinks), hubs = new Set(view.hubs);
    nodeEls = []; labelEls = [];
    var showLabels = n <= 128, fontSize = Math.max(7, Math.min(12, 900 / n));
    for (var i = 0; i < n; i++) {
      var p = nodeXY(i);
      var cls = "node" + (sinks.has(i) ? " sink" : "") + (hubs.has(i) ? " hub" : "");
      var circle = svg("circle", { "class": cls, cx: p[0].toFixed(1), cy: p[1].toFixed(1), r: r.toFixed(1),
                                   "data-node": String(i) }, nodesG);
      svg("title", {}, circle).textContent = i + ": " + data.nodes[i] + (sinks.has(i) ? " (sink)" : "") +
        (hubs.has(i) ? " (hub)" : "") + (nodeTokens.length ? "\n" + short(nodeTokens[i], 400) : "");
      nodeEls.push(circle);
      if (showLabels) {
        var lx = G.size / 2 + (G.radius + r + 6) * Math.cos(p[2]), ly = G.size / 2 + (G.radius + r + 6) * Math.sin(p[2]);
        var deg = p[2] * 180 / Math.PI, flip = Math.cos(p[2]) < 0;
        var label = svg("text", { "class": "label", x: lx.toFixed(1), y: ly.toFixed(1), "font-size": fontSize,
                                  "dominant-baseline": "middle", "text-anchor": flip ? "end" : "start",
                                  transform: "rotate(" + (flip ? deg + 180 : deg).toFixed(1) + " " + lx.toFixed(1) +
                                    " " + ly.toFixed(1) + ")" }, labelsG);
        label.textContent = short(data.nodes[i], 14);
        labelEls.push(label);
      }
    }
  }

  function drawMatrix() {
    clearChildren(matrixSvg);
    matrixSvg.classList.toggle("weighted", view.weights !== null);
    var showAxis = n <= 64, margin = showAxis ? 70 : 12, size = 460, cell = size / n;
    matrixSvg.setAttribute("width", size + margin + 8); matrixSvg.setAttribute("height", size + margin + 8);
    var g = svg("g", { transform: "translate(" + margin + "," + margin + ")" }, matrixSvg);
    var bg = svg("rect", { "class": "grid-bg", x: 0, y: 0, width: size, height: size }, g);
    rowBand = svg("rect", { "class": "band", x: 0, y: 0, width: size, height: cell }, g);
    colBand = svg("rect", { "class": "band", x: 0, y: 0, width: cell, height: size }, g);
    var m = view.src.length, w = Math.max(cell, 1);
    cellEls = new Array(m);
    for (var e = 0; e < m; e++) {
      cellEls[e] = svg("rect", { "class": "cell", x: (view.src[e] * cell).toFixed(2), y: (view.dst[e] * cell).toFixed(2),
                                 width: w.toFixed(2), height: w.toFixed(2), "data-src": String(view.src[e]),
                                 "data-dst": String(view.dst[e]),
                                 fill: view.weights === null ? "#444" : colour(scaled(e)) }, g);
    }
    axisEls = [];
    if (showAxis) {
      var fs = Math.max(7, Math.min(11, cell * 0.9));
      for (var i = 0; i < n; i++) {
        var row = svg("text", { "class": "axis", x: -4, y: ((i + 0.5) * cell).toFixed(1), "text-anchor": "end",
                                "dominant-baseline": "middle", "font-size": fs, "data-node": String(i) }, g);
        row.textContent = short(data.nodes[i], 10);
        var cx = ((i + 0.5) * cell).toFixed(1);
        var col = svg("text", { "class": "axis", x: cx, y: -4, "font-size": fs, "data-node": String(i),
                                transform: "rotate(-60 " + cx + " -4)" }, g);
        col.textContent = short(data.nodes[i], 10);
        axisEls.push(row, col);
      }
      svg("text", { x: size / 2, y: -margin + 10, "text-anchor": "middle", "font-size": 11, fill: "#777" }, g)
        .textContent = "key j (source)";
    }
    bg.addEventListener("mousemove", function (ev) {
      if (state.pinned) { return; }
      var box = bg.getBoundingClientRect(), i = Math.floor((ev.clientY - box.top) / box.height * n);
      if (i >= 0 && i < n && i !== state.focus) { focus(i); }
    });
    bg.addEventListener("click", function () { state.pinned = !state.pinned && state.focus >= 0; focus(state.focus); });
  }

  function draw() {
    view = data.layers[state.layer].views[state.head];
    maxWeight = 0;
    if (view.weights !== null) { view.weights.forEach(function (w) { if (w > maxWeight) { maxWeight = w; } }); }
    if (!(maxWeight > 0)) { maxWeight = 1; }
    inEdges = []; outEdges = [];
    for (var i = 0; i < n; i++) { inEdges.push([]); outEdges.push([]); }
    for (var e = 0; e < view.src.length; e++) { inEdges[view.dst[e]].push(e); outEdges[view.src[e]].push(e); }
    lit = [];
    drawGraph();
    drawMatrix();
    document.getElementById("stats").textContent = data.layers[state.layer].label + ", " + view.label + ": " +
      view.stats;
    graphSvg.setAttribute("data-view", state.layer + ":" + state.head);
    focus(state.pinned ? state.focus : -1);
  }

  // -------------------------------------------------------------- highlighting
  function light(element, cls) { element.classList.add(cls); lit.push([element, cls]); }

  function focus(i) {
    lit.forEach(function (pair) { pair[0].classList.remove(pair[1]); });
    lit = [];
    state.focus = i;
    var info = document.getElementById("info");
    clearChildren(info);
    if (i < 0) {
      graphSvg.classList.remove("focused");
      rowBand.classList.remove("on"); colBand.classList.remove("on");
      el("h2", {}, "token", info);
      el("p", { "class": "muted" }, "Hover a token in the drawing, or a row of the matrix, to see the keys it reads " +
        "(its incoming edges)" + (data.receptive_layers > 0 ? " and, with the slider, its receptive field." : "."), info);
      legend(info);
      return;
    }
    graphSvg.classList.add("focused");
    if (state.rf > 0) {
      receptiveField(i, state.rf).forEach(function (v) { light(nodeEls[v], "rf"); });
    }
    inEdges[i].forEach(function (e) {
      light(edgeEls[e], "hi"); light(cellEls[e], "hi"); light(nodeEls[view.src[e]], "src");
      if (labelEls.length) { light(labelEls[view.src[e]], "src"); }
    });
    light(nodeEls[i], "focus");
    if (labelEls.length) { light(labelEls[i], "focus"); }
    axisEls.forEach(function (a) { if (Number(a.getAttribute("data-node")) === i) { light(a, "focus"); } });
    var cell = 460 / n;
    rowBand.setAttribute("y", (i * cell).toFixed(2)); colBand.setAttribute("x", (i * cell).toFixed(2));
    rowBand.classList.add("on"); colBand.classList.add("on");
    describe(info, i);
  }

  function describe(info, i) {
    el("h2", {}, (data.block > 1 ? "block " : "token ") + i + ": " + short(data.nodes[i], 40) +
      (state.pinned ? " (pinned)" : ""), info);
    var marks = [];
    if (view.sinks.indexOf(i) >= 0) { marks.push("sink"); }
    if (view.hubs.indexOf(i) >= 0) { marks.push("hub"); }
    if (nodeTokens.length) { el("p", { "class": "tokens" }, "tokens: " + short(nodeTokens[i], 400), info); }
    if (marks.length) { el("p", {}, "marked: " + marks.join(", "), info); }
    var received = 0;
    outEdges[i].forEach(function (e) { received += weightOf(e); });
    el("p", {}, "reads " + inEdges[i].length + " key" + (inEdges[i].length === 1 ? "" : "s") + "; read by " +
      outEdges[i].length + " quer" + (outEdges[i].length === 1 ? "y" : "ies") +
      (view.weights !== null ? "; receives " + received.toFixed(3) + " attention in all" : ""), info);
    if (state.rf > 0) {
      var size = receptiveField(i, state.rf).size;
      el("p", {}, "receptive field after " + state.rf + " layer" + (state.rf > 1 ? "s" : "") + ": " + size + " of " + n +
        (data.block > 1 ? " blocks" : " tokens"), info);
    }
    var rows = inEdges[i].slice().sort(function (a, b) { return weightOf(b) - weightOf(a); }).slice(0, 16);
    if (rows.length) {
      var table = el("table", {}, null, info);
      rows.forEach(function (e) {
        var tr = el("tr", {}, null, table), j = view.src[e];
        el("td", {}, j + ": " + short(data.nodes[j], 18), tr);
        if (view.weights !== null) {
          var td = el("td", { "class": "num" }, null, tr);
          el("span", { "class": "bar", style: "width:" + Math.round(40 * scaled(e)) + "px" }, null, td);
          el("td", { "class": "num" }, view.weights[e].toFixed(3), tr);
        }
      });
      if (inEdges[i].length > rows.length) {
        el("p", { "class": "muted" }, "(" + (inEdges[i].length - rows.length) + " more)", info);
      }
    }
    legend(info);
  }

  function legend(info) {
    var box = el("div", { "class": "legend" }, null, info);
    var items = [["focus", "the token"], ["src", "keys it reads"]];
    if (data.receptive_layers > 0) { items.push(["rf", "receptive field"]); }
    if (data.kind === "model") { items.push(["sink", "sink"], ["hub", "hub (ring)"]); }
    items.forEach(function (item) {
      var s = svg("svg", { width: 14, height: 14 }, box);
      svg("circle", { "class": "node " + item[0], cx: 7, cy: 7, r: 5, style: "fill-opacity:1" }, s);
      box.appendChild(document.createTextNode(" " + item[1] + "  "));
    });
    if (data.weighted) {
      box.appendChild(document.createElement("br"));
      var bar = svg("svg", { width: 120, height: 12 }, box);
      for (var k = 0; k < 12; k++) { svg("rect", { x: k * 10, y: 0, width: 10, height: 12, fill: colour(k / 11) }, bar); }
      box.appendChild(document.createTextNode(" weight 0 .. " + maxWeight.toPrecision(3) + " (this view's largest)"));
    }
  }

  // -------------------------------------------------------------- events
  graphSvg.addEventListener("mouseover", function (ev) {
    var target = ev.target.closest ? ev.target.closest("[data-node]") : null;
    if (target && !state.pinned) { focus(Number(target.getAttribute("data-node"))); }
  });
  graphSvg.addEventListener("click", function (ev) {
    var target = ev.target.closest ? ev.target.closest("[data-node]") : null;
    if (!target) { return; }
    var i = Number(target.getAttribute("data-node"));
    state.pinned = !(state.pinned && state.focus === i);
    focus(i);
  });
  matrixSvg.addEventListener("mouseover", function (ev) {
    var target = ev.target.closest ? ev.target.closest("[data-node]") : null;
    if (target && !state.pinned) { focus(Number(target.getAttribute("data-node"))); }
  });
  [graphSvg, matrixSvg].forEach(function (s) {
    s.addEventListener("mouseleave", function () { if (!state.pinned) { focus(-1); } });
  });
  document.addEventListener("keydown", function (ev) {
    if (ev.key === "Escape") { state.pinned = false; focus(-1); }
  });

  buildNotes();
  buildControls();
  draw();
  document.body.setAttribute("data-ready", "1");
})();
