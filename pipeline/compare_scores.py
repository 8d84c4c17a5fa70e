"""The behaviour part of `dialect-circuits compare`: each run's headline score (the AAE - SAE gap
of its metric, under a rated metric the covert or overt prejudice score) with its interval and
null band, Hofmann et al.'s comparisons (the favorability of each run's top AAE- and
SAE-associated attributes, and its agreement with each study's stereotypes, 1933-2012), and each
run's intervention curves (the share of the held-out score its top components remove). A covert
run (dialect) beside an overt one (race named, `+task=overt`) shows whether the two disagree, as
Hofmann et al. found; the per-component tables of pipeline/compare.py show which components carry each.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from markupsafe import Markup
from plotly.subplots import make_subplots

from pipeline.artifacts import read_json, read_table


def score_rows(runs) -> pd.DataFrame:
    """One row per run that has a baseline: its headline and, where the data stage wrote them, the
    one-token and chain-rule scores and the favorability of its top 5 attributes on each side."""
    rows = []
    for run in runs:
        tables = run.path / "tables"
        if not (tables / "baseline_null.csv").exists():
            continue
        top = read_table(tables / "baseline_null.csv", keep_default_na=False).iloc[0]
        base = read_json(tables / "baseline.json") if (tables / "baseline.json").exists() else {}
        row = {"run": run.label, "metric": base.get("metric", ""), "headline": base.get("headline", "gap"),
               "score": float(top.gap), "ci_low": float(top.ci_low), "ci_high": float(top.ci_high),
               "null_low": float(top.null_low), "null_high": float(top.null_high), "p_perm": float(top.p_perm),
               "n_pairs": int(top.n_pairs)}
        if (tables / "prejudice_score.csv").exists():
            for r in read_table(tables / "prejudice_score.csv").itertuples():
                row[f"{r.score}_score"] = float(r.score_value)
        if (tables / "stereotype_agreement.json").exists():
            model = read_json(tables / "stereotype_agreement.json")["model"]
            row.update(aae_top5=", ".join(model["aae_top5"]), favorability_aae_top5=model["favorability_aae_top5"],
                       sae_top5=", ".join(model["sae_top5"]), favorability_sae_top5=model["favorability_sae_top5"])
        rows.append(row)
    return pd.DataFrame(rows)


def stereotype_rows(runs) -> pd.DataFrame:
    """Run x study: agreement, chance and p."""
    rows = []
    for run in runs:
        path = run.path / "tables" / "stereotype_agreement.json"
        if path.exists():
            for r in read_json(path)["studies"]:
                rows.append({"run": run.label, "study": r["name"], "year": r["year"], "agreement": r["agreement"],
                             "chance": r["chance"], "p_perm": r["p_perm"]})
    return pd.DataFrame(rows)


def intervention_rows(runs) -> pd.DataFrame:
    """Every run's intervention curve (tables/intervention_curve.csv), with the run's label."""
    parts = [read_table(run.path / "tables" / "intervention_curve.csv").assign(run=run.label) for run in runs
             if (run.path / "tables" / "intervention_curve.csv").exists()]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def intervention_figure(curves: pd.DataFrame) -> go.Figure:
    """One panel per intervention kind: the held-out score each run's top components remove (metric
    units) against their number (with the interval), and the band of its random draws."""
    kinds = list(dict.fromkeys(curves.kind))
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=[f"{k}: held-out score removed" for k in kinds],
                        horizontal_spacing=0.07)
    for i, (run, group) in enumerate(curves.groupby("run", sort=False)):
        colour = f"hsl({(i * 137) % 360},65%,42%)"
        for j, kind in enumerate(kinds, 1):
            t = group[group.kind == kind].sort_values("size")
            top = t[t.selection == "top"]
            rand = t[t.selection.str.startswith("random")].groupby("size").score_removed
            if len(rand.min()):
                lo, hi = rand.min(), rand.max()
                fig.add_trace(go.Scatter(x=list(lo.index) + list(hi.index[::-1]), y=list(lo) + list(hi[::-1]), fill="toself",
                                         fillcolor=colour, opacity=0.15, line=dict(width=0), hoverinfo="skip", showlegend=False), 1, j)
            fig.add_trace(go.Scatter(x=top["size"], y=top.score_removed, mode="lines+markers", line=dict(color=colour), name=run,
                                     legendgroup=run, showlegend=j == 1,
                                     error_y=dict(type="data", symmetric=False, array=top.score_removed_ci_high - top.score_removed,
                                                  arrayminus=top.score_removed - top.score_removed_ci_low),
                                     hovertemplate=f"{run}<br>%{{x}}: removed %{{y:+.4f}}<extra></extra>"), 1, j)
            fig.update_xaxes(type="log", title_text="components removed", row=1, col=j)
    fig.update_yaxes(title_text="score removed, metric units (shaded: random draws)", row=1, col=1)
    fig.update_layout(title="Removing what each run found, on its held-out prompts", width=max(420 * len(kinds), 900),
                      height=480, legend=dict(orientation="h", y=-0.25), margin=dict(b=130))
    return fig


def figure(scores: pd.DataFrame, stereotypes: pd.DataFrame) -> go.Figure:
    """Left: each run's headline score with its 95% interval (bars) and null band (grey); right,
    where the runs have them: agreement with each study's stereotypes per run, against chance."""
    panels = 2 if len(stereotypes) else 1
    fig = make_subplots(rows=1, cols=panels, horizontal_spacing=0.12,
                        subplot_titles=["Headline score (AAE - SAE), 95% interval; grey: guise-swap null band",
                                        "Agreement with each study's stereotypes"][:panels])
    x = list(scores.run)
    fig.add_trace(go.Bar(x=x, y=scores.null_high - scores.null_low, base=scores.null_low, marker_color="rgba(120,120,120,0.3)",
                         name="null 95% band", hoverinfo="skip"), 1, 1)
    fig.add_trace(go.Scatter(x=x, y=scores.score, mode="markers", marker=dict(size=11, color="#b2182b"), name="score",
                             error_y=dict(type="data", symmetric=False, array=scores.ci_high - scores.score,
                                          arrayminus=scores.score - scores.ci_low),
                             customdata=np.stack([scores.p_perm, scores.headline], -1),
                             hovertemplate="%{x}: %{y:+.4f}, p %{customdata[0]:.4f}<br>%{customdata[1]}<extra></extra>"), 1, 1)
    fig.add_hline(y=0, line_dash="dot", line_color="grey", row=1, col=1)
    if panels == 2:
        labels = [f"{s}<br>{y}" for s, y in dict.fromkeys(zip(stereotypes.study, stereotypes.year))]
        for run, group in stereotypes.groupby("run", sort=False):
            fig.add_trace(go.Bar(x=labels, y=group.agreement, name=f"{run}",
                                 customdata=np.stack([group.chance, group.p_perm], -1),
                                 hovertemplate="%{x}: %{y:.3f} (chance %{customdata[0]:.3f}, p %{customdata[1]:.3f})<extra></extra>"),
                          1, 2)
        chance = stereotypes.groupby(["study", "year"], sort=False).chance.mean()
        fig.add_trace(go.Scatter(x=labels, y=chance.to_numpy(), mode="markers", name="chance",
                                 marker=dict(symbol="line-ew-open", size=30, color="black", line=dict(width=2))), 1, 2)
        fig.update_layout(barmode="group")
        fig.update_yaxes(title_text="average precision, top 1-5 traits", row=1, col=2)
    fig.update_yaxes(title_text="score (metric units)", row=1, col=1)
    fig.update_layout(title="Behaviour of each run: its headline score and its agreement with human stereotypes",
                      width=1100, height=520, legend=dict(orientation="h", y=-0.25), margin=dict(b=140))
    return fig


def score_comparison(runs) -> dict | None:
    """What comparison.html shows of the runs' behaviour, with its tables, or None when no run has
    a baseline."""
    scores = score_rows(runs)
    if scores.empty:
        return None
    stereotypes = stereotype_rows(runs)
    header = ["run", "headline", "score", "95% interval", "null band", "p"]
    rows = [[r.run, r.headline, r.score, f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}]", f"[{r.null_low:+.3f}, {r.null_high:+.3f}]",
             r.p_perm] for r in scores.itertuples()]
    if "favorability_aae_top5" in scores:
        header += ["top 5 AAE-associated (favorability)", "top 5 SAE-associated (favorability)"]
        for row, r in zip(rows, scores.itertuples()):
            has = isinstance(r.aae_top5, str)
            row += [f"{r.aae_top5} ({r.favorability_aae_top5:+.2f})" if has else "-",
                    f"{r.sae_top5} ({r.favorability_sae_top5:+.2f})" if has else "-"]
    tables = {"compare_scores": scores}
    if len(stereotypes):
        tables["compare_stereotypes"] = stereotypes
    curves = intervention_rows(runs)
    figs = [figure(scores, stereotypes)]
    if len(curves):
        tables["compare_interventions"] = curves
        figs.append(intervention_figure(curves))
    return {"header": header, "rows": rows, "tables": tables,
            "figures": [Markup(f.to_html(include_plotlyjs=False, full_html=False)) for f in figs]}
