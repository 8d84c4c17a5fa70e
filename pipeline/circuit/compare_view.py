"""The circuit part of `dialect-circuits compare`: which edges two or more runs' circuits share,
and their faithfulness curves on one plot."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from markupsafe import Markup

from pipeline.artifacts import read_tensors
from pipeline.circuit.across_runs import across_runs
from pipeline.circuit.graph import Graph


def _load(run):
    summary_path = run.path / "tables" / "circuit_summary.json"
    if not summary_path.exists():
        return None
    summary = json.loads(summary_path.read_text())
    method = summary["methods"][0]
    scores = read_tensors(run.path / "tensors" / f"circuit_scores_{method}.safetensors")["mean"]
    curve = pd.read_csv(run.path / "tables" / "circuit_faithfulness.csv")
    return summary, method, scores, curve


def circuit_comparison(runs, circuit_prompts: int = 8) -> dict | None:
    """What comparison.html.j2 shows under "Circuit" (None when fewer than two runs have a circuit),
    with the tables to write under `tables` (it writes nothing itself); `across`: the circuits'
    overlap and transfer (pipeline/circuit/across_runs.py)."""
    loaded = [(run, _load(run)) for run in runs]
    loaded = [(run, x) for run, x in loaded if x is not None]
    if len(loaded) < 2:
        return None
    n_edges = {x[0]["n_edges"] for _, x in loaded}
    if len(n_edges) > 1:
        return {"tables": {}, "different": f"the runs' graphs differ ({', '.join(map(str, sorted(n_edges)))} edges)"}
    # Each run's circuit: the top edges up to the size where its faithfulness first reaches 0.8
    # (its largest size if never); shared = in every run's circuit.
    sizes, sets = [], []
    for run, (summary, method, scores, _) in loaded:
        frac = summary["curves"][method]["size_at_0.8"] or 1.0
        k = max(1, int(round(frac * summary["n_edges"])))
        sizes.append(k)
        sets.append(set(np.argsort(-scores.abs().numpy())[:k].tolist()))
    shared = set.intersection(*sets)
    union = set.union(*sets)
    summary0 = loaded[0][1][0]
    graph_txt = summary0["graph"]
    rows = []
    for run, (summary, method, scores, _) in loaded:
        rows.append({"run": run.label, "method": method, "metric": summary["metric"], "circuit_edges": sizes[len(rows)],
                     "cpr": summary["curves"][method]["cpr"], "cmd": summary["curves"][method]["cmd"],
                     "size_at_0.8": summary["curves"][method]["size_at_0.8"]})
    table = pd.DataFrame(rows)
    first_scores = [x[2] for _, x in loaded]
    top_shared = sorted(shared, key=lambda e: -float(sum(abs(s[e]) for s in first_scores)))[:20]
    names = _edge_names(summary0)
    shared_rows = pd.DataFrame({"edge": [names[e] for e in top_shared],
                                **{f"score[{run.label}]": [float(x[2][e]) for e in top_shared] for run, x in loaded}})
    fig = go.Figure()
    for run, (summary, method, _, curve) in loaded:
        for family, dash in ((method, "solid"), ("random", "dot")):
            c = curve[curve.circuit == family]
            fig.add_trace(go.Scatter(x=c.fraction * 100, y=c.faithfulness, mode="lines+markers", line={"dash": dash},
                                     name=f"{run.label}: {family}"))
    fig.add_hline(y=1.0, line_dash="dot")
    fig.update_layout(title="Faithfulness curves (dotted: random circuits of the same size)", xaxis_type="log",
                      xaxis_title="circuit size (% of edges, log scale)", yaxis_title="faithfulness", template="plotly_white")
    jaccard = len(shared) / len(union) if union else float("nan")
    tables = {"compare_circuit": table, "compare_circuit_shared_edges": pd.DataFrame({"edge": [names[e] for e in sorted(shared)]})}
    across = across_runs([run for run, _ in loaded], circuit_prompts)
    if across:
        tables["compare_circuit_overlap"] = across["overlap"]
        if len(across["transfer"]):
            tables["compare_circuit_transfer"] = across["transfer"]
        across["figure"] = Markup(across["figure"].to_html(include_plotlyjs=False, full_html=False))
        across["overlap_rows"] = [[r.a, r.b, r.overlap, f"[{r.ci_low:.3f}, {r.ci_high:.3f}]"] for r in across["overlap"].itertuples()]
    return {"tables": tables, "across": across, "different": None, "graph": graph_txt, "sizes": ", ".join(map(str, sizes)), "n_shared": len(shared), "jaccard": jaccard,
            "header": list(table.columns), "rows": table.values.tolist(),
            "shared_header": list(shared_rows.columns), "shared_rows": shared_rows.values.tolist(),
            "figure": Markup(fig.to_html(include_plotlyjs=False, full_html=False))}


def _edge_names(summary: dict) -> list[str]:
    return Graph(*summary["graph_shape"]).edge_names()
