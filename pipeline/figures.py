"""Plotly figures of a run: the notebook's line plots and heatmaps, with hover text that names
what a point is, diverging colour scales centred on 0, and role-labelled position axes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

DIVERGING = "RdBu"


def attribute_association(table: pd.DataFrame, top: int = 40) -> go.Figure:
    """Bar chart of each attribute's mean association with AAE over SAE, with 95% intervals."""
    shown = pd.concat([table.head(top // 2), table.tail(top // 2)]).drop_duplicates("attribute")
    fig = go.Figure(go.Bar(
        x=shown.attribute, y=shown.association, name="association (95% interval)",
        error_y=dict(type="data", symmetric=False, array=shown.ci_high - shown.association,
                     arrayminus=shown.association - shown.ci_low),
        marker_color=np.where(shown.association > 0, "#b2182b", "#2166ac"),
        hovertemplate="%{x}: %{y:.3f}<extra></extra>",
    ))
    subtitle = "mean log p(a|AAE) - log p(a|SAE) over pairs and templates; the most and least AAE-associated"
    if "null_low" in shown:
        # The guise permutation null's 95% band of each mean (pipeline/nulls.py); * = BH-significant.
        fig.add_trace(go.Bar(x=shown.attribute, y=shown.null_high - shown.null_low, base=shown.null_low,
                             marker_color="rgba(120,120,120,0.35)", name="null 95% band (guise swaps)",
                             customdata=np.stack([shown.null_low, shown.null_high, shown.p_perm], -1),
                             hovertemplate="%{x}: null band [%{customdata[0]:.3f}, %{customdata[1]:.3f}], p = %{customdata[2]:.3f}<extra></extra>"))
        star = shown[shown.significant_bh.astype(bool)]
        fig.add_trace(go.Scatter(x=star.attribute, y=np.where(star.association > 0, star.ci_high, star.ci_low), mode="text",
                                 text=["*"] * len(star), textposition=np.where(star.association > 0, "top center", "bottom center"),
                                 textfont=dict(size=16), name="* significant (BH)", hoverinfo="skip"))
        subtitle += "; grey: 95% band under guise swaps, * significant after Benjamini-Hochberg"
    fig.update_layout(title=f"Association of trait attributes with AAE over SAE<br><sup>{subtitle}</sup>", barmode="overlay",
                      xaxis_title="attribute", yaxis_title="log-probability difference", width=1000, height=480)
    return fig


def baseline_metric(table: pd.DataFrame, metric: str) -> go.Figure:
    """Per-prompt metric of the clean and corrupted runs, per dialect feature."""
    long = table.melt(id_vars=["feature"], value_vars=["clean_metric", "corrupted_metric"],
                      var_name="run", value_name="metric")
    long["run"] = long["run"].str.replace("_metric", "")
    fig = px.box(long, x="feature", y="metric", color="run", points="all",
                 title=f"{METRIC_TITLES.get(metric, metric)} per prompt, clean and corrupted runs",
                 color_discrete_map={"clean": "#1b7837", "corrupted": "#762a83"})
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    fig.update_layout(width=1000, height=480, yaxis_title=metric)
    return fig


# What each metric's number is, for axis and figure titles (pipeline/metrics.py).
METRIC_TITLES = {
    "logit_diff": "Logit difference (correct - incorrect)",
    "favorability": "Favorability metric (weighted mean logit of unfavorable - favorable traits)",
    "prestige": "Prestige metric (weighted mean logit of low - high prestige occupations)",
    "prob_diff": "Probability difference (correct - incorrect)",
    "kl_div": "KL divergence from the clean run",
}


def stereotype_agreement(table: pd.DataFrame, model: dict) -> go.Figure:
    """Hofmann et al.'s Fig. 2 for one run: the agreement of the model's AAE associations with each
    study's stereotypes (average precision, bars) against chance (markers), and the favorability of
    each study's top 5 traits against that of the model's top 5 AAE- and SAE-associated ones."""
    labels = [f"{n}<br>{y}" for n, y in zip(table.name, table.year)]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=["Agreement with each study's stereotypes", "Favorability of the top 5 traits"])
    fig.add_trace(go.Bar(x=labels, y=table.agreement, name="model (average precision)", marker_color="#b2182b",
                         customdata=np.stack([table.p_perm, table.top_traits], -1),
                         hovertemplate="%{x}: %{y:.3f}, permutation p %{customdata[0]:.3f}<br>their top traits: %{customdata[1]}<extra></extra>"),
                  1, 1)
    fig.add_trace(go.Scatter(x=labels, y=table.chance, mode="markers", name="chance (random rankings)",
                             marker=dict(symbol="line-ew-open", size=28, color="black", line=dict(width=2)),
                             hovertemplate="%{x}: chance %{y:.3f}<extra></extra>"), 1, 1)
    fig.add_trace(go.Bar(x=labels, y=table.favorability_top5, name="study's top 5", marker_color="#999999",
                         hovertemplate="%{x}: %{y:+.2f}<extra></extra>"), 1, 2)
    for key, name, colour in (("favorability_aae_top5", "model's top 5 AAE-associated", "#b2182b"),
                              ("favorability_sae_top5", "model's top 5 SAE-associated", "#2166ac")):
        fig.add_trace(go.Scatter(x=[labels[0], labels[-1]], y=[model[key]] * 2, mode="lines", name=f"{name} ({model[key]:+.2f})",
                                 line=dict(color=colour, dash="dash"), hoverinfo="skip"), 1, 2)
    fig.update_yaxes(title_text="average precision, top 1-5 traits", row=1, col=1)
    fig.update_yaxes(title_text="mean favorability (-2 .. +2)", row=1, col=2)
    fig.update_layout(title="Does the model's AAE association agree with human stereotypes of African Americans, 1933-2012?",
                      width=1100, height=520, legend=dict(orientation="h", y=-0.22), margin=dict(b=130))
    return fig


def line(values: dict[str, np.ndarray], labels: list[str], title: str, bands: dict | None = None, y_title="logit difference") -> go.Figure:
    """One line per series over components (the notebook's logit lens and per-layer plots), with
    an optional shaded 95% interval per series."""
    fig = go.Figure()
    for name, y in values.items():
        if bands and name in bands:
            lo, hi = bands[name]
            fig.add_trace(go.Scatter(x=labels + labels[::-1], y=list(hi) + list(lo)[::-1], fill="toself",
                                     line=dict(width=0), opacity=0.2, showlegend=False, hoverinfo="skip", name=name))
        fig.add_trace(go.Scatter(x=labels, y=y, mode="lines+markers", name=name))
    fig.update_layout(title=title, xaxis_title="component", yaxis_title=y_title, hovermode="x unified", width=1000, height=450)
    return fig


def difference_and_sides(values: dict[str, np.ndarray], bands: dict, labels: list[str], title: str,
                         y_title: str) -> go.Figure:
    """Two panels over components: the clean - corrupted difference with its 95% band (what the
    dialect changes), then the clean and corrupted sides themselves."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08,
                        subplot_titles=["clean - corrupted (what the dialect changes)", "clean and corrupted prompts"])
    colours = {"difference": "#b2182b", "clean": "#1b7837", "corrupted": "#762a83"}
    for side, y in values.items():
        col = 1 if side == "difference" else 2
        if side in bands:
            lo, hi = bands[side]
            fig.add_trace(go.Scatter(x=labels + labels[::-1], y=list(hi) + list(lo)[::-1], fill="toself", fillcolor=colours[side],
                                     line=dict(width=0), opacity=0.2, showlegend=False, hoverinfo="skip"), 1, col)
        fig.add_trace(go.Scatter(x=labels, y=y, mode="lines+markers", name=side, line=dict(color=colours[side])), 1, col)
    fig.add_hline(y=0, line_dash="dot", line_color="grey", row=1, col=1)
    fig.update_yaxes(title_text=y_title, row=1, col=1)
    fig.update_layout(title=title, hovermode="x unified", width=1250, height=470, legend=dict(orientation="h", y=-0.3))
    return fig


def heatmap(z: np.ndarray, x: list[str], y: list[str], title: str, x_title: str, y_title: str,
            hover: np.ndarray | None = None, zmax: float | None = None) -> go.Figure:
    """A diverging heatmap centred on 0; `hover` gives each cell's text."""
    zmax = zmax or float(np.nanmax(np.abs(z))) or 1.0
    fig = go.Figure(go.Heatmap(z=z, x=x, y=y, colorscale=DIVERGING, zmid=0, zmin=-zmax, zmax=zmax,
                               text=hover, hovertemplate="%{text}<extra></extra>" if hover is not None else None))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, width=900, height=600,
                      yaxis_autorange="reversed")
    return fig


def faceted_heatmaps(zs: list[np.ndarray], facet_titles: list[str], x, y: list[str], title: str,
                     x_title: str, y_title: str, hovers: list[np.ndarray] | None = None,
                     marks: list[np.ndarray] | None = None) -> go.Figure:
    """Heatmaps side by side with one shared diverging scale (the notebook's facet_col plots).
    `x` is one list of labels for all facets or one per facet (key/value heads may be fewer);
    `marks` (boolean, like zs) circles cells, e.g. those significant after FDR correction."""
    fig = heatmap_grid([zs], [""], facet_titles, x, y, title, x_title, y_title, None if hovers is None else [hovers])
    if marks is not None:
        xs = x if x and isinstance(x[0], list) else [x] * len(zs)
        for j, mark in enumerate(marks):
            rows, cols = np.nonzero(mark)
            fig.add_trace(go.Scatter(x=[xs[j][c] for c in cols], y=[y[r] for r in rows], mode="markers", hoverinfo="skip",
                                     marker=dict(symbol="circle-open", size=9, color="black", line=dict(width=1.5)),
                                     name="significant (sign-flip, BH)", showlegend=j == 0 and len(rows) > 0), 1, j + 1)
        fig.update_layout(legend=dict(orientation="h", y=-0.12))
    return fig


def heatmap_grid(zs: list[list[np.ndarray]], row_titles: list[str], col_titles: list[str], x, y: list[str],
                 title: str, x_title: str, y_title: str, hovers: list[list[np.ndarray]] | None = None) -> go.Figure:
    """Rows x columns of heatmaps on one diverging scale centred on 0; hover text per cell."""
    n_rows, n_cols = len(zs), len(zs[0])
    xs = x if x and isinstance(x[0], list) else [x] * n_cols
    zmax = max(float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 0.0 for row in zs for z in row) or 1.0
    titles = [f"{c} ({r})" if r else c for r in row_titles for c in col_titles]
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=titles, shared_yaxes=True,
                        horizontal_spacing=0.02, vertical_spacing=0.12 if n_rows > 1 else 0.0)
    for i, row in enumerate(zs):
        for j, z in enumerate(row):
            text = None if hovers is None else hovers[i][j]
            fig.add_trace(go.Heatmap(z=z, x=xs[j], y=y, colorscale=DIVERGING, zmid=0, zmin=-zmax, zmax=zmax,
                                     showscale=i == 0 and j == 0, text=text,
                                     hovertemplate="%{text}<extra></extra>" if text is not None else None), i + 1, j + 1)
    fig.update_yaxes(autorange="reversed")
    fig.update_yaxes(title_text=y_title, col=1)
    fig.update_xaxes(title_text=x_title, row=n_rows)
    fig.update_layout(title=title, width=max(380 * n_cols, 900), height=max(520 * n_rows, 600))
    return fig


def scatter_agreement(points: dict[str, tuple[np.ndarray, np.ndarray, list[str]]], title: str,
                      x_title: str = "exact activation patching (effect, metric units)",
                      y_title: str = "attribution patching (estimated effect)") -> go.Figure:
    """Exact patching (x) against its approximation (y), one trace per part, with y = x drawn."""
    fig = go.Figure()
    lo, hi = 0.0, 0.0
    for name, (xv, yv, labels) in points.items():
        fig.add_trace(go.Scatter(x=xv, y=yv, mode="markers", name=name, text=labels, marker=dict(size=5, opacity=0.7),
                                 hovertemplate="%{text}<br>exact %{x:.3f}<br>attribution %{y:.3f}<extra></extra>"))
        finite = np.concatenate([xv[np.isfinite(xv)], yv[np.isfinite(yv)]])
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dot", color="grey"), name="y = x"))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, width=800, height=700)
    return fig


def small_multiples(zs: list[np.ndarray], titles: list[str], x: list[str], y: list[str], title: str,
                    x_title: str, y_title: str, hovers: list[np.ndarray] | None = None, cols: int = 4) -> go.Figure:
    """A grid of heatmaps on one diverging scale (per-feature splits)."""
    rows = -(-len(zs) // cols)
    zmax = max(float(np.nanmax(np.abs(z))) for z in zs) or 1.0
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.03, vertical_spacing=0.08)
    for i, z in enumerate(zs):
        fig.add_trace(go.Heatmap(z=z, x=x, y=y, colorscale=DIVERGING, zmid=0, zmin=-zmax, zmax=zmax, showscale=i == 0,
                                 text=None if hovers is None else hovers[i],
                                 hovertemplate="%{text}<extra></extra>" if hovers is not None else None),
                      i // cols + 1, i % cols + 1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, width=1100, height=330 * rows)
    return fig


def attention_grid(zs: list[np.ndarray], titles: list[str], x: list[str], y: list[str], title: str, cols: int = 3) -> go.Figure:
    """Attention weights (0..1) of a few heads over role-labelled positions, one panel per template."""
    rows = -(-len(zs) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.04, vertical_spacing=0.12)
    for i, z in enumerate(zs):
        fig.add_trace(go.Heatmap(z=z, x=x, y=y, colorscale="Blues", zmin=0, zmax=1, showscale=i == 0,
                                 hovertemplate="%{y} → %{x}: %{z:.3f}<extra></extra>"), i // cols + 1, i % cols + 1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, width=1300, height=340 * rows)
    fig.update_annotations(font_size=10)
    return fig


def dose_response(table: pd.DataFrame, score: tuple[float, float, float], metric: str) -> go.Figure:
    """One column per intervention kind: the held-out score left against the number of components
    removed (top components with their 95% interval; the random draws' band in grey; the score
    without intervention dashed), and below it the cost: the KL divergence from the unintervened
    model on SAE prompts."""
    kinds = list(dict.fromkeys(table.kind))
    has_kl = {k: "kl_sae" in table and table[table.kind == k].kl_sae.notna().any() for k in kinds}
    fig = make_subplots(rows=2, cols=len(kinds), shared_xaxes=False, vertical_spacing=0.14, horizontal_spacing=0.07,
                        row_heights=[0.62, 0.38],
                        subplot_titles=[f"{k}: score left" for k in kinds]
                        + [f"{k}: KL on SAE prompts" if has_kl[k] else f"{k}: SAE prompts unchanged" for k in kinds])
    titles = {"heads": "heads made dialect-blind", "direction": "layers with the direction removed", "edges": "edges removed"}
    for j, kind in enumerate(kinds, 1):
        t = table[table.kind == kind].sort_values("size")
        top = t[t.selection == "top"]
        rand = t[t.selection.str.startswith("random")].groupby("size")
        lo, hi = rand.score_left.min(), rand.score_left.max()
        if len(lo):
            fig.add_trace(go.Scatter(x=list(lo.index) + list(hi.index[::-1]), y=list(lo) + list(hi[::-1]), fill="toself",
                                     fillcolor="rgba(120,120,120,0.3)", line=dict(width=0), name="random (band of draws)",
                                     showlegend=j == 1, hoverinfo="skip"), 1, j)
        fig.add_trace(go.Scatter(x=top["size"], y=top.score_left, mode="lines+markers", line=dict(color="#b2182b"),
                                 name="top (found on discovery prompts)", showlegend=j == 1,
                                 error_y=dict(type="data", symmetric=False, array=top.score_ci_high - top.score_left,
                                              arrayminus=top.score_left - top.score_ci_low),
                                 customdata=np.stack([top.score_removed, top.score_removed_ci_low, top.score_removed_ci_high], -1),
                                 hovertemplate="%{x}: score left %{y:+.4f}<br>removed %{customdata[0]:+.4f} "
                                               "[%{customdata[1]:+.4f}, %{customdata[2]:+.4f}]<extra></extra>"), 1, j)
        fig.add_hline(y=score[0], line_dash="dash", line_color="#444", row=1, col=j)
        fig.add_hline(y=0, line_dash="dot", line_color="grey", row=1, col=j)
        if has_kl[kind]:
            fig.add_trace(go.Scatter(x=top["size"], y=top.kl_sae, mode="lines+markers", line=dict(color="#b2182b"),
                                     showlegend=False, hovertemplate="%{x}: KL %{y:.4f}<extra></extra>"), 2, j)
            rk = rand.kl_sae.max()
            fig.add_trace(go.Scatter(x=list(rk.index), y=list(rk), mode="lines", line=dict(color="#888", dash="dot"),
                                     name="random (largest KL of the draws)", showlegend=j == 1), 2, j)
        fig.update_xaxes(type="log", title_text=titles.get(kind, kind), row=2, col=j)
        fig.update_xaxes(type="log", row=1, col=j)
    fig.update_yaxes(title_text=f"AAE - SAE ({metric})", row=1, col=1)
    fig.update_yaxes(title_text="KL (nats)", row=2, col=1)
    fig.update_layout(title="Does removing it remove the prejudice? Held-out prompts; dashed: the score without intervention",
                      width=max(420 * len(kinds), 900), height=720, legend=dict(orientation="h", y=-0.12))
    return fig


# What a positive AAE - SAE score means, per metric.
LEANS = {"favorability": "more unfavorable traits after AAE", "prestige": "lower-prestige occupations after AAE"}
SIDE_STYLE = {"discovery": ("#1b7837", "circle"), "heldout": ("#762a83", "diamond"), "all": ("#444444", "square")}
SIDE_NAMES = {"discovery": "discovery side", "heldout": "held-out side", "all": "every prompt"}


def power_forest(table: pd.DataFrame, metric: str) -> go.Figure:
    """Forest plot of the AAE - SAE score (pipeline/power.py): one row per dialect feature and the
    pooled score at the bottom, each side of the split as its own point with its 95% pair-bootstrap
    interval, over the grey 95% band of the guise-swap null; hover for pairs, spread, the smallest
    detectable score and the pairs this score would need."""
    sides = [s for s in ("discovery", "heldout") if (table.side == s).any()] or ["all"]
    features = [f for f in sorted(table.feature.unique()) if f != "all"]
    order = features + ["all"]  # pooled last: drawn at the bottom
    y_of = {f: len(order) - 1 - i for i, f in enumerate(order)}
    offset = {s: (0.18 - 0.36 * k / max(len(sides) - 1, 1)) if len(sides) > 1 else 0.0 for k, s in enumerate(sides)}
    fig = go.Figure()
    for side in sides:
        rows = table[table.side == side].set_index("feature").reindex(order).dropna(subset=["score"])
        ys = np.array([y_of[f] + offset[side] for f in rows.index])
        fig.add_trace(go.Bar(y=ys, x=rows.null_high - rows.null_low, base=rows.null_low, orientation="h", width=0.16,
                             marker_color="rgba(120,120,120,0.30)", name="null 95% band (guise swaps)",
                             legendgroup="null", showlegend=side == sides[0], hoverinfo="skip"))
        color, symbol = SIDE_STYLE[side]
        hover = [f"{f} ({SIDE_NAMES[side]}): {r.score:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]<br>{int(r.n_pairs)} pairs, "
                 f"{int(r.n_prompts)} prompts, sd per pair {r.sd_per_pair:.3f}<br>smallest detectable {r.detectable:.3f}; "
                 f"null band [{r.null_low:+.3f}, {r.null_high:+.3f}], p {r.p_perm:.3g}<br>pairs to detect this score: "
                 + (f"{r.pairs_needed:,.0f}" if np.isfinite(r.pairs_needed) else "-") for f, r in rows.iterrows()]
        fig.add_trace(go.Scatter(x=rows.score, y=ys, mode="markers", name=f"{SIDE_NAMES[side]} (95% interval)",
                                 marker=dict(color=color, symbol=symbol, size=np.where(rows.index == "all", 13, 9)),
                                 error_x=dict(type="data", symmetric=False, array=rows.ci_high - rows.score,
                                              arrayminus=rows.score - rows.ci_low, color=color, thickness=2),
                                 text=hover, hovertemplate="%{text}<extra></extra>"))
    fig.add_vline(x=0, line_dash="dot", line_color="grey")
    fig.add_hline(y=0.5, line_color="#bbbbbb")  # pooled row below the line
    pairs = {(r.side, r.feature): int(r.n_pairs) for r in table.itertuples()}  # a small run may leave a feature off a side
    labels = [f"{f} ({' / '.join(str(pairs.get((side, f), 0)) for side in sides)} pairs)" for f in features]
    pooled = "<b>all features</b>"
    fig.update_yaxes(tickvals=[y_of[f] for f in order], ticktext=labels + [pooled], range=[-0.6, len(order) - 0.4])
    title = METRIC_TITLES.get(metric, metric).split(" (")[0]
    fig.update_layout(
        title=f"AAE - SAE score of the {title.lower()} by dialect feature<br><sup>each side of the split with its 95% "
              "pair-bootstrap interval; grey: 95% band when guises are swapped at random (no dialect effect); "
              "pairs per feature: discovery / held-out</sup>",
        xaxis_title=f"score: mean m(AAE) - m(SAE) (positive: {LEANS.get(metric, 'the AAE-side answer gains after AAE')})",
        barmode="overlay", width=1000, height=140 + 46 * len(order), legend=dict(orientation="h", y=-0.18),
        margin=dict(l=230))
    return fig
