"""Figures of the circuit stage: the faithfulness curves and the circuit as a layered graph."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch

from pipeline.circuit.graph import Graph

COLOURS = {"eap": "#1f77b4", "eap_ig": "#d62728", "random": "#7f7f7f"}


def faithfulness_curves(curves: dict, fractions, title: str, names: dict | None = None) -> go.Figure:
    """One line per circuit family with its 95% band; x is the fraction of edges (log scale)."""
    fig = go.Figure()
    x = [float(f) * 100 for f in fractions]
    for i, (key, s) in enumerate(curves.items()):
        label = (names or {}).get(key, key)
        family = key.removesuffix(" (held-out)")  # a held-out curve: the family's colour, dashed
        colour = COLOURS.get(family, f"hsl({(i * 67) % 360},60%,45%)")
        fig.add_trace(go.Scatter(x=x + x[::-1], y=list(s["ci_high"]) + list(s["ci_low"])[::-1], fill="toself",
                                 line={"width": 0}, fillcolor=colour, opacity=0.15, hoverinfo="skip", showlegend=False))
        if "band_low" in s:  # random circuits: the lowest and highest of the draws, dotted
            for edge in ("band_low", "band_high"):
                fig.add_trace(go.Scatter(x=x, y=s[edge], mode="lines", line={"color": colour, "dash": "dot", "width": 1},
                                         name=f"{label}: range of {s['draws']} draws", showlegend=edge == "band_low",
                                         legendgroup=f"{key} draws", hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=s["faithfulness"], mode="lines+markers",
                                 line={"color": colour, "dash": "dash" if family != key else "solid"},
                                 name=f"{label}: CPR {s['cpr']:.2f}, CMD {s['cmd']:.2f}"))
    fig.add_hline(y=1.0, line_dash="dot", annotation_text="full model")
    fig.add_hline(y=0.8, line_dash="dash", line_color="#999", annotation_text="0.8")
    fig.update_layout(title=title, xaxis_title="circuit size (% of edges, log scale)", yaxis_title="faithfulness",
                      xaxis_type="log", template="plotly_white")
    return fig


def node_xy(graph: Graph):
    """Upstream and downstream node positions: x = layer (input at -1, logits at n_layers),
    y = head (MLP above the heads)."""
    up = [(-1.0, graph.n_heads / 2)]
    for l in range(graph.n_layers):
        up += [(l, float(h)) for h in range(graph.n_heads)] + [(l + 0.5, graph.n_heads + 0.5)]
    down = []
    for l in range(graph.n_layers):
        if graph.inputs == "block":  # one input per layer, read by its heads and its MLP
            down.append((l - 0.15, graph.n_heads / 2))
            continue
        down += [(l - 0.15, float(h)) for h in range(graph.n_heads)]
        ratio = graph.n_heads / graph.n_kv_heads
        down += [(l - 0.15, g * ratio) for g in range(graph.n_kv_heads)] * 2
        down.append((l + 0.5, graph.n_heads + 0.5))
    down.append((graph.n_layers, graph.n_heads / 2))
    return up, down


def circuit_graph(graph: Graph, scores: torch.Tensor, k: int, title: str) -> go.Figure:
    """The k edges of largest |score|: width by |score|, colour by sign; nodes by layer."""
    up_xy, down_xy = node_xy(graph)
    up, down = graph.edges
    order = torch.argsort(scores.abs(), descending=True)[:k]
    top = scores[order].abs().max().item() or 1.0
    fig = go.Figure()
    for sign, colour in ((1, "#d62728"), (-1, "#1f77b4")):
        for lo, hi, width in ((0.0, 0.33, 1), (0.33, 0.66, 2.5), (0.66, 1.01, 5)):
            xs, ys = [], []
            for e in order.tolist():
                s = float(scores[e])
                if np.sign(s) != sign or not (lo <= abs(s) / top < hi):
                    continue
                (x0, y0), (x1, y1) = up_xy[int(up[e])], down_xy[int(down[e])]
                xs += [x0, x1, None]
                ys += [y0, y1, None]
            if xs:
                fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": colour, "width": width}, opacity=0.6,
                                         name=f"{'positive' if sign > 0 else 'negative'} score, |s| {lo:.0%}-{min(hi, 1):.0%} of max",
                                         hoverinfo="skip"))
    used_up = sorted({int(up[e]) for e in order.tolist()})
    used_down = sorted({int(down[e]) for e in order.tolist()})
    fig.add_trace(go.Scatter(x=[up_xy[u][0] for u in used_up], y=[up_xy[u][1] for u in used_up], mode="markers+text",
                             text=[graph.up_names[u] for u in used_up], textposition="top center",
                             marker={"size": 9, "color": "black"}, name="node outputs"))
    fig.add_trace(go.Scatter(x=[down_xy[v][0] for v in used_down], y=[down_xy[v][1] for v in used_down], mode="markers",
                             text=[graph.down_names[v] for v in used_down], hoverinfo="text",
                             marker={"size": 6, "symbol": "triangle-right", "color": "#555"}, name="node inputs (q/k/v, MLP, logits)"))
    fig.update_layout(title=title, xaxis_title="layer (input at -1, logits at the right)", yaxis_title="head (MLP on top)",
                      template="plotly_white", height=700)
    return fig
