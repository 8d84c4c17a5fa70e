"""Figures of the circuit stage: the faithfulness curves (the circuit itself: pipeline/circuit/view.py)."""

from __future__ import annotations

import plotly.graph_objects as go

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
