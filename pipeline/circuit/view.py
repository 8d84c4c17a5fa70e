"""The circuit view (figures/circuit_graph.html) and its table of the strongest paths
(tables/circuit_paths.csv).

Nodes are the graph's nodes as a reader names them: `input`, each head `a{l}.h{h}`, each MLP `m{l}`
and `logits`; an edge into a head's query, key or value input ends at that head (the input is
named in the hover), and in grouped-query models an edge into a key/value head ends at a node of its
own, `a{l}.kv{g}`, read by the query heads of its group (GPT-J's merged inputs: `b{l}`, read by the
layer's heads and MLP). Layers run upwards: the input at the bottom, each layer's heads on one row
and its MLP half a row above them, the logits on top. Within a row the nodes are ordered to reduce
crossings (barycentric ordering, Sugiyama et al. 1981: each node moves to the mean position of its
neighbours in the rows below, then above, a few sweeps). Node size is the node's attribution, the
sum of the scores of all its outgoing edges in the whole graph (for EAP this is exactly the
attribution-patching estimate of corrupting the node; for the logits and the key/value or block
inputs, the sum over incoming edges). Edges are red where the score is positive (the edge pushes the
metric toward the clean run's value), blue where negative, thicker for larger |score|.

The slider runs over the circuit stage's sizes up to `circuit.view.max_edges` edges, plus
`circuit.draw_max_edges` (selected at first); each size has its own layout. Hovering a node lists
its inputs and outputs in the circuit with their scores.

Paths: a path runs from `input` to `logits` through the whole graph, continuing from an edge's head
(or the heads of its key/value group) or MLP. It is ranked by the share of the logits' |score| that
flows along it, as circuit-tracer traces influence through an attribution graph: the logits' share
is split over the edges into them in proportion to |score|, and each node passes its share on to
its inputs (a head's q, k and v) in proportion to their total |score| and then over each input's
edges in proportion to |score|. A path's share is the product along it; the shares of all paths
sum to at most 1. Unlike the raw scores' product (in powers of the metric's units) or sum (larger
for longer paths), a share is unitless and says how much of the effect a route carries. It is a
bookkeeping of first-order scores, not a measured effect of patching the path.
"""

from __future__ import annotations

import heapq
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from pipeline.circuit.graph import Graph
from pipeline.stats import bootstrap_counts

POSITIVE, NEGATIVE = "#d62728", "#1f77b4"
ROW_PX = 36  # pixels per layer: a row of heads and the MLP half a row above (labels 15 px tall beside their nodes)
WIDTH = 900
MARGIN = {"l": 40, "r": 40, "t": 80, "b": 130}


def view_node(name: str) -> str:
    """The drawn node a downstream input belongs to: `a3.h1.q` -> `a3.h1`, `a3.kv0.k` -> `a3.kv0`."""
    return re.sub(r"\.(q|k|v)$", "", name)


def input_kind(name: str) -> str:
    found = re.search(r"\.(q|k|v)$", name)
    return found.group(1) if found else ""


def row_of(node: str) -> float:
    """The node's height: input -1, a layer's heads l, its MLP l + 0.5, logits n_layers (set later)."""
    if node == "input":
        return -1.0
    if node == "logits":
        return float("inf")
    layer = int(re.match(r"[abm](\d+)", node).group(1))
    return layer + 0.5 if node.startswith("m") else float(layer)


def readers(graph: Graph, down: str) -> list[str]:
    """The upstream nodes whose output a downstream input feeds (where a path continues)."""
    node = view_node(down)
    if down == "logits":
        return []
    layer = int(re.match(r"[abm](\d+)", node).group(1))
    if node.startswith("b"):
        return [f"a{layer}.h{h}" for h in range(graph.n_heads)] + [f"m{layer}"]
    group = re.match(r"a\d+\.kv(\d+)$", node)
    if group:
        per = graph.n_heads // graph.n_kv_heads
        g = int(group.group(1))
        return [f"a{layer}.h{h}" for h in range(g * per, (g + 1) * per)]
    return [node]


def node_scores(graph: Graph, scores: torch.Tensor) -> dict[str, float]:
    """Each drawn node's attribution (module docstring)."""
    up, down = graph.edges
    out = torch.zeros(graph.n_up, dtype=torch.float64).index_add_(0, up, scores.double())
    into = torch.zeros(graph.n_down, dtype=torch.float64).index_add_(0, down, scores.double())
    result = {name: float(v) for name, v in zip(graph.up_names, out)}
    for name, v in zip(graph.down_names, into):
        node = view_node(name)
        if node not in result:  # logits, key/value heads, merged block inputs
            result[node] = result.get(node, 0.0) + float(v)
    return result


def circuit_edges(graph: Graph, scores: torch.Tensor, k: int) -> pd.DataFrame:
    """The k edges of largest |score| as rows: edge index, upstream node, downstream input, drawn
    target node, input kind and score."""
    up, down = graph.edges
    order = torch.argsort(scores.abs(), descending=True, stable=True)[:k].tolist()
    downs = [graph.down_names[int(down[e])] for e in order]
    return pd.DataFrame({"edge": order, "source": [graph.up_names[int(up[e])] for e in order], "input": downs,
                         "target": [view_node(d) for d in downs], "kind": [input_kind(d) for d in downs],
                         "score": [float(scores[e]) for e in order]})


def layout(table: pd.DataFrame, n_layers: int, sweeps: int = 4) -> dict[str, tuple[float, float]]:
    """Node -> (x, y): y by row_of; x from barycentric sweeps, the nodes of a row at least one slot
    apart, centred on their neighbours (module docstring)."""
    nodes = list(dict.fromkeys([*table.source, *table.target]))
    y = {n: (n_layers if row_of(n) == float("inf") else row_of(n)) for n in nodes}
    rows: dict[float, list[str]] = {}
    for n in sorted(nodes, key=natural):
        rows.setdefault(y[n], []).append(n)
    half = (max(len(m) for m in rows.values()) - 1) / 2
    below = {n: [] for n in nodes}
    above = {n: [] for n in nodes}
    for s, t in zip(table.source, table.target):
        below[t].append(s)
        above[s].append(t)
    x = {n: i - (len(m) - 1) / 2 for m in rows.values() for i, n in enumerate(m)}
    keys = sorted(rows)
    for _ in range(sweeps):
        for order, neighbours in ((keys, below), (keys[::-1], above)):
            for key in order:
                wanted = {n: float(np.mean([x[m] for m in neighbours[n]])) if neighbours[n] else x[n] for n in rows[key]}
                rows[key] = sorted(rows[key], key=lambda n: (wanted[n], x[n]))
                x.update(zip(rows[key], spread([wanted[n] for n in rows[key]], half)))
    return {n: (x[n], y[n]) for n in nodes}


def spread(wanted: list[float], half: float) -> list[float]:
    """Positions as near the ascending `wanted` as a gap of at least 1 and the range [-half, half] allow."""
    x = []
    for w in wanted:
        x.append(max(w, x[-1] + 1) if x else w)
    shift = (np.mean(wanted) - np.mean(x)) if x else 0.0  # the pushes moved the row right: recentre it
    x = [v + shift for v in x]
    x = [max(v, -half + i) for i, v in enumerate(x)]
    x = [min(v, half - (len(x) - 1 - i)) for i, v in enumerate(x)]
    return x


def natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def hovers(table: pd.DataFrame, attribution: dict[str, float], top: int = 8) -> dict[str, str]:
    """Each node's attribution, and its inputs and outputs in this circuit with their scores
    (the table is in order of |score|, largest first)."""
    ins: dict[str, list[str]] = {}
    outs: dict[str, list[str]] = {}
    for r in table.itertuples():
        ins.setdefault(r.target, []).append(f"  {r.source} -> {r.input}: {r.score:+.4g}")
        outs.setdefault(r.source, []).append(f"  -> {r.input}: {r.score:+.4g}")
    text = {}
    for node in dict.fromkeys([*table.source, *table.target]):
        lines = [f"<b>{node}</b>  node attribution {attribution.get(node, 0.0):+.4g}"]
        for title, part in (("inputs", ins.get(node, [])), ("outputs", outs.get(node, []))):
            lines.append(f"{title} in this circuit: {len(part)}")
            lines += part[:top] + ([f"  ... and {len(part) - top} more"] if len(part) > top else [])
        text[node] = "<br>".join(lines)
    return text


def step_traces(graph: Graph, table: pd.DataFrame, attribution: dict[str, float], font: int) -> list[go.Scatter]:
    """The traces of one circuit size: edges by sign and width, edge midpoints (hover), nodes."""
    xy = layout(table, graph.n_layers)
    top = table.score.abs().max() or 1.0
    traces = []
    for sign, colour in ((1, POSITIVE), (-1, NEGATIVE)):
        for lo, hi, width in ((0.0, 1 / 3, 1.0), (1 / 3, 2 / 3, 2.5), (2 / 3, 1.01, 4.5)):
            part = table[(np.sign(table.score) == sign) & (table.score.abs() / top >= lo) & (table.score.abs() / top < hi)]
            xs, ys = [], []
            for r in part.itertuples():
                xs += [xy[r.source][0], xy[r.target][0], None]
                ys += [xy[r.source][1], xy[r.target][1], None]
            traces.append(go.Scatter(x=xs, y=ys, mode="lines", line={"color": colour, "width": width}, opacity=0.55,
                                     hoverinfo="skip",
                                     showlegend=False))
    traces.append(go.Scatter(
        x=[(xy[s][0] + xy[t][0]) / 2 for s, t in zip(table.source, table.target)],
        y=[(xy[s][1] + xy[t][1]) / 2 for s, t in zip(table.source, table.target)], mode="markers",
        marker={"size": 7, "color": "rgba(0,0,0,0)"}, showlegend=False, name="edges",
        hovertext=[f"{r.source} -> {r.input}: {r.score:+.4g}" for r in table.itertuples()], hoverinfo="text"))
    nodes = list(xy)
    text = hovers(table, attribution)
    biggest = max(abs(attribution.get(n, 0.0)) for n in nodes) or 1.0
    traces.append(go.Scatter(
        x=[xy[n][0] for n in nodes], y=[xy[n][1] for n in nodes], mode="markers+text", text=nodes, name="nodes",
        textposition="middle right", textfont={"size": font}, cliponaxis=False, showlegend=False,
        marker={"size": [5 + 11 * np.sqrt(abs(attribution.get(n, 0.0)) / biggest) for n in nodes], "color": "#333",
                "line": {"width": 1, "color": "white"}},
        hovertext=[text[n] for n in nodes], hoverinfo="text"))
    return traces


def sizes_drawn(counts: list[int], default: int, max_edges: int, n_edges: int) -> list[int]:
    """The slider's sizes: the stage's circuit sizes up to max_edges, and the default size."""
    return sorted({c for c in counts if c <= max_edges} | {min(default, n_edges)})


def heading(title: str, k: int) -> str:
    return (f"{title}: the top {k} edges<br><sup>red: positive score, blue: negative, thicker: larger |score|; node size: "
            "node attribution; hover a node for its inputs and outputs</sup>")


def circuit_view(graph: Graph, scores: torch.Tensor, counts: list[int], default: int, max_edges: int, title: str) -> go.Figure:
    """The interactive circuit (module docstring): one set of traces per size, a slider between them."""
    sizes = sizes_drawn(counts, default, max_edges, graph.n_edges)
    attribution = node_scores(graph, scores)
    tables = {k: circuit_edges(graph, scores, k) for k in sizes}
    widest = max(max(pd.Series([row_of(n) for n in set(t.source) | set(t.target)]).value_counts()) for t in tables.values())
    longest = max(len(n) for t in tables.values() for n in set(t.source) | set(t.target))
    slot = (WIDTH - MARGIN["l"] - MARGIN["r"]) / max(widest, 1)
    font = int(max(6, min(11, (slot - 20) / (0.62 * longest))))  # a label and two node radii fit a slot
    fig = go.Figure()
    owner = []
    for k in sizes:
        for trace in step_traces(graph, tables[k], attribution, font):
            trace.visible = k == min(default, graph.n_edges)
            fig.add_trace(trace)
            owner.append(k)
    steps = []
    for k in sizes:
        steps.append({"method": "update", "label": f"{k} ({100 * k / graph.n_edges:.3g}%)",
                      "args": [{"visible": [o == k for o in owner]}, {"title.text": heading(title, k)}]})
    active = sizes.index(min(default, graph.n_edges))
    fig.update_layout(
        title=heading(title, sizes[active]), template="plotly_white", width=WIDTH, showlegend=False,
        height=ROW_PX * (graph.n_layers + 2) + MARGIN["t"] + MARGIN["b"], margin=MARGIN, hovermode="closest",
        sliders=[{"active": active, "steps": steps, "currentvalue": {"prefix": "circuit size (edges): "}, "pad": {"t": 30}}],
        xaxis={"visible": False, "range": [-widest / 2, widest / 2]},
        yaxis={"title": "layer (input at the bottom, logits on top)", "range": [-1.5, graph.n_layers + 0.6],
               "tickvals": [-1, *range(graph.n_layers), graph.n_layers], "ticktext": ["input", *map(str, range(graph.n_layers)), "logits"],
               "zeroline": False, "showgrid": False})
    return fig


PATH_COLUMNS = ["rank", "path", "edges", "in_drawn_circuit", "share", "ci_low", "ci_high", "weakest_abs_score", "sum_of_scores",
                "signs"]


def path_text(graph: Graph, path) -> str:
    """`input -> a3.h1.q -> m5 -> logits` from (edge, next node) steps; where a path leaves a
    key/value head or a merged block input through one of its readers, that reader in brackets:
    `a3.kv0.k [a3.h1]`."""
    _, down = graph.edges
    parts = ["input"]
    for e, r in path:
        name = graph.down_names[int(down[e])]
        parts.append(name if r == -1 or view_node(name) == graph.up_names[r] else f"{name} [{graph.up_names[r]}]")
    return " -> ".join(parts)


def input_totals(graph: Graph, magnitude: torch.Tensor) -> torch.Tensor:
    """[..., n_down]: the sum of |score| over the edges into each downstream input."""
    _, down = graph.edges
    out = torch.zeros(*magnitude.shape[:-1], graph.n_down, dtype=magnitude.dtype)
    return out.index_add_(-1, down, magnitude)


def path_shares(graph: Graph, magnitude: torch.Tensor, totals: torch.Tensor, feeds: list[list[int]], path) -> torch.Tensor:
    """[...] the share of the logits' |score| that flows along `path` ((edge, node) steps from the
    input), for edge magnitudes [..., n_edges] and their input_totals (module docstring)."""
    _, down = graph.edges
    share = torch.ones(magnitude.shape[:-1], dtype=magnitude.dtype)
    for e, r in path:
        d = int(down[e])
        reader = feeds[r] if r != -1 else [graph.down_logits]
        share = share * totals[..., d] / totals[..., reader].sum(-1) * magnitude[..., e] / totals[..., d]
    return share.nan_to_num(0.0)  # 0 / 0: a resample in which no edge reaches an input passes nothing on


def strongest_paths(graph: Graph, per_prompt: torch.Tensor, k: int, n_paths: int, units, n_boot: int, seed: int,
                    max_pops: int = 100_000) -> pd.DataFrame:
    """The n_paths input-to-logits paths of the whole graph that carry the largest share of the
    logits' |score| (module docstring), best first, each with how many of its edges the top-k
    circuit has and its share on each pair-bootstrap resample of the prompts (a 95% interval).
    Best-first search from the logits back to the input: a share only shrinks as a path grows, so
    paths reach the input in order of their share."""
    scores = per_prompt.float().mean(0)
    magnitude = scores.abs().double()
    up, down = graph.edges
    index = {name: i for i, name in enumerate(graph.up_names)}
    feeds: list[list[int]] = [[] for _ in range(graph.n_up)]  # the downstream inputs each node reads
    for d, name in enumerate(graph.down_names):
        for r in readers(graph, name):
            feeds[index[r]].append(d)
    into: list[list] = [[] for _ in range(graph.n_down)]
    for e, (u, d, m) in enumerate(zip(up.tolist(), down.tolist(), magnitude.tolist())):
        if m > 0:
            into[d].append((e, u, m))
    totals = input_totals(graph, magnitude).tolist()
    # A node's share of what it passes on is split over its inputs by their totals, then over each
    # input's edges by their |score|; the logits read one input.
    heap, found, pops, counter = [(-1.0, 0, -1, ())], [], 0, 1
    while heap and len(found) < n_paths and pops < max_pops:
        negative, _, node, path = heapq.heappop(heap)
        pops += 1
        if node == 0:  # the input: a whole path
            found.append((-negative, path))
            continue
        inputs = [graph.down_logits] if node == -1 else feeds[node]
        whole = sum(totals[d] for d in inputs)
        for d in inputs:
            for e, u, m in into[d]:
                share = -negative * m / whole
                if share > 0:
                    heapq.heappush(heap, (-share, counter, u, ((e, node), *path)))
                    counter += 1
    drawn = set(torch.argsort(scores.abs(), descending=True, stable=True)[:k].tolist())
    weights = bootstrap_counts(per_prompt.shape[0], n_boot, seed, units).float()
    weights = weights / weights.sum(1, keepdim=True).clamp(min=1)
    resampled = torch.cat([(w @ per_prompt.float()).abs().double() for w in torch.split(weights, 50)]) if found else None
    resampled_totals = input_totals(graph, resampled) if found else None
    rows = []
    for rank, (share, path) in enumerate(found, 1):
        idx = [e for e, _ in path]
        low, high = np.percentile(path_shares(graph, resampled, resampled_totals, feeds, path).numpy(), [2.5, 97.5])
        rows.append({"rank": rank, "path": path_text(graph, path), "edges": len(path),
                     "in_drawn_circuit": len(drawn & set(idx)), "share": share, "ci_low": float(low), "ci_high": float(high),
                     "weakest_abs_score": float(scores[idx].abs().min()), "sum_of_scores": float(scores[idx].sum()),
                     "signs": "".join("+" if scores[e] > 0 else "-" for e in idx)})
    return pd.DataFrame(rows, columns=PATH_COLUMNS)
