"""The circuit view (pipeline/circuit/view.py): the strongest paths against a hand-worked graph,
barycentric ordering against the natural order, and the figure in headless Chromium with no
network: the size slider redraws the edges, and at the default 150 edges no two node labels overlap."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.artifacts import write_figure
from pipeline.circuit import view
from pipeline.circuit.faithfulness import edge_counts
from pipeline.circuit.graph import Graph
from test_report import CHROMIUM, chromium, console_messages


def edge_index(graph: Graph, name: str) -> int:
    return graph.edge_names().index(name)


def test_strongest_paths_rank_by_their_share_of_the_logits():
    graph = Graph(2, 2, 2)  # input, a0.h0, a0.h1, m0, a1.h0, a1.h1, m1, logits
    scores = torch.zeros(graph.n_edges)
    # input -> a0.h0 -> logits: weakest 0.5; input -> m0 -> a1.h1 (k) -> logits: weakest 0.3;
    # input -> logits: 0.2; a0.h1 -> logits (0.9) has no edge from the input, so no path.
    for name, s in (("input->a0.h0.q", 0.5), ("a0.h0->logits", -2.0), ("input->m0", 0.4), ("m0->a1.h1.k", -0.3),
                    ("a1.h1->logits", 1.0), ("input->logits", 0.2), ("a0.h1->logits", 0.9)):
        scores[edge_index(graph, name)] = s
    noise = torch.zeros(graph.n_edges)
    noise[edge_index(graph, "a0.h0->logits")], noise[edge_index(graph, "input->logits")] = 0.5, 0.1
    per_prompt = torch.stack([scores + noise, scores - noise])  # mean: scores; the prompts' shares differ
    paths = view.strongest_paths(graph, per_prompt, k=7, n_paths=10, units=None, n_boot=50, seed=0)
    assert list(paths.path) == ["input -> a0.h0.q -> logits", "input -> m0 -> a1.h1.k -> logits", "input -> logits"]
    # The logits' inputs total 4.1 (2.0 + 1.0 + 0.2 + 0.9); each node on the first two paths has one
    # input edge, so it passes its whole share on. a0.h1 has no input: its 0.9 reaches no path.
    assert np.allclose(paths.share, [2.0 / 4.1, 1.0 / 4.1, 0.2 / 4.1])
    assert np.allclose(paths.weakest_abs_score, [0.5, 0.3, 0.2])
    assert np.allclose(paths.sum_of_scores, [-1.5, 1.1, 0.2]) and list(paths.signs) == ["+-", "+-+", "+"]
    assert (paths.ci_low <= paths.share + 1e-12).all() and (paths.share <= paths.ci_high + 1e-12).all()
    assert (paths.ci_high > paths.ci_low).all()  # the two prompts' scores differ in ratio, so the shares do
    assert list(paths.in_drawn_circuit) == [2, 3, 1]
    # Paths run through the whole graph; the circuit drawn (here the top 2 edges) only counts theirs.
    drawn_2 = view.strongest_paths(graph, per_prompt, k=2, n_paths=10, units=None, n_boot=50, seed=0)
    assert list(drawn_2.path) == list(paths.path) and list(drawn_2.in_drawn_circuit) == [1, 1, 0]


def test_grouped_key_value_edges_continue_through_their_query_heads():
    graph = Graph(2, 4, 2)
    assert view.readers(graph, "a1.kv1.v") == ["a1.h2", "a1.h3"] and view.readers(graph, "a1.h0.q") == ["a1.h0"]
    scores = torch.zeros(graph.n_edges)
    for name, s in (("input->a0.kv1.k", 0.6), ("a0.h3->logits", 0.7)):
        scores[edge_index(graph, name)] = s
    paths = view.strongest_paths(graph, scores[None], 2, 5, None, 10, 0)
    assert list(paths.path) == ["input -> a0.kv1.k [a0.h3] -> logits"]
    scores[edge_index(graph, "input->a0.kv1.k")] = 0.0
    none = view.strongest_paths(graph, scores[None], 2, 5, None, 10, 0)  # no edge leaves the input
    assert len(none) == 0 and list(none.columns) == view.PATH_COLUMNS


def crossings(table: pd.DataFrame, xy: dict) -> int:
    segs = [(xy[s], xy[t]) for s, t in zip(table.source, table.target)]
    count = 0
    for i, ((a0, a1)) in enumerate(segs):
        for b0, b1 in segs[i + 1:]:
            if a0[1] == b0[1] and a1[1] == b1[1] and len({a0, a1, b0, b1}) == 4:  # same pair of rows
                count += (a0[0] - b0[0]) * (a1[0] - b1[0]) < 0
    return count


def test_barycentric_order_has_fewer_crossings_than_the_natural_order():
    graph = Graph(4, 8, 8)
    scores = torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(1)) * torch.rand(graph.n_edges) ** 4
    table = view.circuit_edges(graph, scores, 60)
    ordered = view.layout(table, graph.n_layers)
    natural = view.layout(table, graph.n_layers, sweeps=0)
    assert crossings(table, ordered) < crossings(table, natural)


# Appended to a copy of the figure page: once plotly has drawn, record the drawn edges and the
# node labels' boxes, press the slider at another size, and record them again. Plotly runs a
# slider step's command in the next animation frame, which headless Chromium under a virtual time
# budget does not reliably schedule, so animation frames are timers here.
PROBE = """<pre id="probe">waiting</pre><script>
window.requestAnimationFrame = callback => setTimeout(() => callback(performance.now()), 16);
function drawn(gd) {
  const lines = [...gd.querySelectorAll(".scatterlayer .trace path.js-line")];
  const edges = lines.reduce((n, p) => n + ((p.getAttribute("d") || "").match(/M/g) || []).length, 0);
  const labels = [...gd.querySelectorAll(".scatterlayer .trace .textpoint text")].map(t => {
    const r = t.getBoundingClientRect(); return {text: t.textContent, l: r.left, r: r.right, t: r.top, b: r.bottom};
  });
  return {edges, labels, active: gd._fullLayout.sliders[0].active};
}
window.addEventListener("load", () => setTimeout(() => {
  const gd = document.querySelector(".plotly-graph-div");
  const before = drawn(gd);
  const ticks = [...gd.querySelectorAll("rect.slider-tick-rect")];
  const target = ticks[STEP].getBoundingClientRect();
  const rail = gd.querySelector("rect.slider-rail-touch-rect");
  const at = {bubbles: true, clientX: target.left + target.width / 2, clientY: target.top + 2, button: 0};
  rail.dispatchEvent(new MouseEvent("mousedown", at));
  rail.dispatchEvent(new MouseEvent("mouseup", at));
  setTimeout(() => {
    document.getElementById("probe").textContent = JSON.stringify({before, after: drawn(gd), ticks: ticks.length});
  }, 1500);
}, 1500));
</script>"""


def overlapping(labels: list[dict]) -> list[tuple[str, str]]:
    out = []
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            if min(a["r"], b["r"]) - max(a["l"], b["l"]) > 0.5 and min(a["b"], b["b"]) - max(a["t"], b["t"]) > 0.5:
                out.append((a["text"], b["text"]))
    return out


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_view_slider_redraws_and_labels_do_not_overlap_in_chromium(tmp_path):
    graph = Graph(30, 9, 3)  # SmolLM2-135M's shape: 70,651 edges
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(graph.n_edges, generator=g) * torch.rand(graph.n_edges, generator=g) ** 6
    counts = edge_counts([0.001, 0.002, 0.005, 0.01, 0.1, 1.0], graph.n_edges)  # 71, 141, 353, 707, ...
    fig = view.circuit_view(graph, scores, counts, 150, 1000, "test circuit")
    sizes = [int(s["label"].split()[0]) for s in fig.layout.sliders[0].steps]
    assert sizes == [71, 141, 150, 353, 707] and fig.layout.sliders[0].active == 2
    page = write_figure(tmp_path / "figures" / "circuit_graph.html", fig)
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE.replace("STEP", "4") + "</body>"))
    done = chromium(tmp_path / "profile", "--allow-file-access-from-files", "--window-size=900,1400",
                    "--virtual-time-budget=10000", "--run-all-compositor-stages-before-draw", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="probe">([^<]*)</pre>', done.stdout)
    assert found and found.group(1) != "waiting", done.stderr[-2000:]
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&gt;", ">").replace("&amp;", "&"))
    assert not console_messages(done.stderr), console_messages(done.stderr)
    before, after = result["before"], result["after"]
    assert result["ticks"] == 5 and before["active"] == 2 and after["active"] == 4
    assert before["edges"] == 150 and after["edges"] == 707  # moving the slider drew the other circuit
    nodes_150 = set(view.circuit_edges(graph, scores, 150).pipe(lambda t: [*t.source, *t.target]))
    assert {l["text"] for l in before["labels"]} == nodes_150
    assert len(after["labels"]) > len(before["labels"])
    assert overlapping(before["labels"]) == []
