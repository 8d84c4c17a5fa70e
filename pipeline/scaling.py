"""The scaling and training comparison of `compare`: Hofmann et al.'s figure of the covert prejudice
against model size, for the mechanism as well as the behaviour.

For runs of one family at several sizes (`-m +experiment=scaling`) or one model at several training
checkpoints (`-m +experiment=training`), each run gives one point:
- its headline score: the row `feature == "all"` of tables/baseline_null.csv (the gap with its 95%
  pair-bootstrap interval, the guise-swap null's 95% band and the permutation p), labelled with the
  run's `metric.name` (the favorability metric's AAE - SAE gap is the covert prejudice score; under
  `metric=logit_diff` it is the logit-difference gap);
- where the circuit stage ran, the circuit's first faithful size: the smallest fraction of edges
  at which the winning method's circuit reaches faithfulness 0.8 (tables/circuit_summary.json);
- its x: the parameter count, or the training step, that the run recorded in its manifest's
  `model` (pipeline/model.py model_facts).
The view is drawn when two or more runs have a headline and differ in parameter count or step.
"""

from __future__ import annotations

import json

import pandas as pd
import plotly.graph_objects as go
from markupsafe import Markup

HEADLINE = ("gap", "ci_low", "ci_high", "null_low", "null_high", "p_perm")
FAITHFUL = 0.8  # the threshold tables/circuit_summary.json reports sizes at (`size_at_0.8`)


def run_point(run) -> dict | None:
    """One run's point, or None when it has no headline (no cache stage) or its manifest no
    parameter count (a run made before runs recorded one)."""
    tables = run.path / "tables"
    baseline, model = tables / "baseline_null.csv", run.manifest.get("model", {})
    if not baseline.exists() or "n_params" not in model:
        return None
    rows = pd.read_csv(baseline, keep_default_na=False)
    rows = rows[rows.feature.astype(str) == "all"]
    if rows.empty:
        return None
    headline = rows.iloc[0]
    point = {"run": run.label, "model": model["name"], "revision": model.get("revision"), "step": model.get("step"),
             "n_params": int(model["n_params"]), "metric": run.config.get("metric.name", "logit_diff"),
             **{k: float(headline[k]) for k in HEADLINE}}
    circuit = tables / "circuit_summary.json"
    if circuit.exists():
        summary = json.loads(circuit.read_text())
        curve = summary["curves"].get(summary.get("winner"), {})
        size = curve.get(f"size_at_{FAITHFUL}")
        point.update(circuit_method=summary.get("winner"), faithful_fraction=size,
                     faithful_edges=None if size is None else round(size * int(summary["n_edges"])))
    return point


def scaling_table(runs) -> tuple[pd.DataFrame, str] | None:
    """The points of the runs that have one, sorted along the x-axis that varies between them
    (`n_params`, else `step`); None when fewer than two runs have a point or neither varies."""
    points = [p for p in (run_point(run) for run in runs) if p is not None]
    if len(points) < 2:
        return None
    table = pd.DataFrame(points)
    for axis in ("n_params", "step"):
        if table[axis].notna().all() and table[axis].nunique() > 1:
            return table.sort_values(axis, kind="stable").reset_index(drop=True), axis
    return None


def x_scale(x: pd.Series) -> str:
    """Log scale (sizes and Pythia's checkpoints are log-spaced), linear when a step is 0."""
    return "log" if (x > 0).all() else "linear"


def x_title(axis: str, x: pd.Series) -> str:
    return {"n_params": "parameters", "step": "training step"}[axis] + (" (log scale)" if x_scale(x) == "log" else "")


def headline_figure(table: pd.DataFrame, axis: str) -> go.Figure:
    """The headline score of each run with its 95% interval, over the guise-swap null's 95% band."""
    metrics = sorted(set(table.metric))
    name = f"headline gap ({', '.join(metrics)})"  # the favorability metric's is the covert prejudice score
    x = table[axis].astype(float)
    fig = go.Figure([
        go.Scatter(x=list(x) + list(x)[::-1], y=list(table.null_high) + list(table.null_low)[::-1], fill="toself",
                   line={"width": 0}, fillcolor="rgba(120,120,120,0.2)", hoverinfo="skip",
                   name="guise-swap null, 95% band"),
        go.Scatter(x=x, y=table.gap, mode="lines+markers", name=name, text=table.run,
                   error_y={"type": "data", "symmetric": False, "array": table.ci_high - table.gap,
                            "arrayminus": table.gap - table.ci_low},
                   customdata=table.p_perm,
                   hovertemplate="%{text}<br>%{y:.4f}, permutation p %{customdata:.3g}<extra></extra>"),
    ])
    fig.add_hline(y=0.0, line_dash="dot", line_color="#999")
    fig.update_layout(title=f"Headline gap against {axis_word(axis)} (95% interval; grey: the null of no dialect effect)",
                      xaxis_type=x_scale(x), xaxis_title=x_title(axis, x), yaxis_title=name, template="plotly_white")
    return fig


def circuit_figure(table: pd.DataFrame, axis: str) -> go.Figure | None:
    """The winning method's smallest circuit that reaches faithfulness 0.8, as a fraction of edges."""
    if "faithful_fraction" not in table or table.faithful_fraction.isna().all():
        return None
    have = table[table.faithful_fraction.notna()]
    x = have[axis].astype(float)
    fig = go.Figure(go.Scatter(x=x, y=have.faithful_fraction * 100, mode="lines+markers",
                               text=[f"{r.run}: {r.faithful_edges} edges ({r.circuit_method})" for r in have.itertuples()],
                               hovertemplate="%{text}<br>%{y:.3g}% of edges<extra></extra>", name="first faithful circuit"))
    fig.update_layout(title=f"Smallest circuit with faithfulness >= {FAITHFUL} against {axis_word(axis)}",
                      xaxis_type=x_scale(x), yaxis_type="log", xaxis_title=x_title(axis, x),
                      yaxis_title="circuit size (% of edges, log scale)", template="plotly_white")
    return fig


def axis_word(axis: str) -> str:
    return {"n_params": "model size", "step": "training step"}[axis]


def scaling_comparison(runs) -> dict | None:
    """What comparison.html shows of the scaling or training view, and its table
    (tables/compare_scaling.csv); None when the runs do not make one."""
    made = scaling_table(runs)
    if made is None:
        return None
    table, axis = made
    figures = [headline_figure(table, axis)]
    circuit = circuit_figure(table, axis)
    if circuit is not None:
        figures.append(circuit)
    return {"table": table, "axis": axis_word(axis), "header": list(table.columns), "rows": table.values.tolist(),
            # plotly's own HTML, trusted: the template inserts it unescaped
            "figures": [Markup(f.to_html(include_plotlyjs=False, full_html=False)) for f in figures]}
