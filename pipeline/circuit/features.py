"""One circuit or one per dialect feature? The circuit stage's per-feature part (`circuit.features`).

Each dialect feature's own discovery prompts (the dataset's `feature` column; the first
`score_prompts` of each feature, one per utterance pair before a second of any pair) get edge
scores of their own (`method`, EAP by default: one gradient pass per prompt, where EAP-IG takes
ig_steps), and each feature's circuit is its top `fraction` of edges by |mean score|. Reported:
- overlap: for every pair of features (and each feature against the pooled circuit, the stage's
  own circuit scored with the same method on its own prompts), the share of top edges the two
  circuits have in common, with a pair-bootstrap interval, against the overlap of two random
  circuits of the same size (pipeline/circuit/overlap.py);
- transfer: each feature's circuit (and the pooled one, and `random_draws` random circuits of the
  same size) evaluated exactly (pipeline/circuit/edges.py evaluate) on the first `heldout_prompts`
  held-out prompts of every feature: faithfulness (m(C) - m(empty)) / (m(full) - m(empty)) on that
  feature's prompts, with a pair-bootstrap interval. The diagonal is a feature's circuit on its own
  held-out prompts; a row that keeps its value across the columns is a circuit the features share.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from pipeline.artifacts import read_json, write_figure, write_json, write_table, write_tensors
from pipeline.circuit import edges
from pipeline.circuit.faithfulness import random_circuits, top_circuits
from pipeline.circuit.overlap import shifted_interval, overlaps
from pipeline.stats import bootstrap_counts

log = logging.getLogger(__name__)

POOLED = "pooled"
RANDOM = "random"


def spread_rows(features: list[str], pair_ids: list | None, n: int | None) -> dict[str, list[int]]:
    """For each feature (sorted), the first `n` of its rows (None: all) in dataset order, taking one
    row of every pair before a second of any pair, so that the pair bootstrap has pairs to resample."""
    out = {}
    for feature in sorted(set(features)):
        rows = [i for i, f in enumerate(features) if f == feature]
        seen: dict = {}
        rank = {}
        for i in rows:
            key = pair_ids[i] if pair_ids is not None else i
            rank[i] = seen.get(key, 0)
            seen[key] = rank[i] + 1
        out[feature] = sorted(rows, key=lambda i: (rank[i], i))[:None if n is None else max(0, int(n))]
    return out


def pair_ids(dataset: pd.DataFrame) -> list | None:
    return list(dataset["pair_id"]) if "pair_id" in dataset and dataset["pair_id"].astype(bool).all() else None


def faithfulness_interval(m_circuit: torch.Tensor, m_full: torch.Tensor, m_empty: torch.Tensor, units, n_boot: int,
                          seed: int) -> tuple[float, float, float, np.ndarray]:
    """Faithfulness of the prompt means, its 95% pair-bootstrap interval and its value on each
    resample ([n_prompts] each; NaN where a resample's full and empty circuits agree)."""
    x = torch.stack([m_circuit, m_full, m_empty]).double()
    point = x.mean(-1)
    weights = bootstrap_counts(x.shape[-1], n_boot, seed, units)
    means = (x @ weights.T) / weights.sum(1).clamp(min=1)  # [3, n_boot]
    boot = ((means[0] - means[2]) / (means[1] - means[2])).numpy()
    finite = boot[np.isfinite(boot)]
    low, high = np.percentile(finite, [2.5, 97.5]) if len(finite) else (np.nan, np.nan)
    return float((point[0] - point[2]) / (point[1] - point[2])), float(low), float(high), np.where(np.isfinite(boot), boot, np.nan)


def mean_interval(point: list[float], boot: list[np.ndarray], shifted: bool = False) -> dict:
    """The mean of several estimates and its 95% interval from their resamples (one row each):
    percentile, or with `shifted` shifted by the bootstrap's bias estimate (pipeline/circuit/overlap.py)."""
    if not point:
        return {"mean": None, "ci_low": None, "ci_high": None}
    means = np.nanmean(np.vstack(boot), axis=0)
    mean = float(np.mean(point))
    low, high = shifted_interval(mean, means) if shifted else np.nanpercentile(means, [2.5, 97.5])
    return {"mean": mean, "ci_low": float(low), "ci_high": float(high)}


def run(ctx, graph, metric: str, pooled: dict[str, torch.Tensor], score_units: list | None) -> None:
    """Score, compare and evaluate the per-feature circuits; write their tables and figure.
    `pooled` holds the stage's per-prompt scores by method; `score_units` the pair ids of its prompts."""
    from pipeline.stages.patching import PartCheckpoint

    cfg, c = ctx.cfg, ctx.cfg.circuit.features
    data = ctx.discovery_dataset
    if "feature" not in data or data["feature"].nunique() < 2:
        log.info("circuit per feature: skipped (the discovery prompts have fewer than two dialect features)")
        return
    method, seed, n_boot = str(c.method), int(cfg.seed), int(ctx.cfg.circuit.bootstrap)
    edges.check_method(method, metric)
    partial = ctx.tensors / ".partial"
    bs, rows_per_run, every = int(ctx.cfg.circuit.batch_size), int(ctx.cfg.circuit.rows_per_run), int(ctx.cfg.circuit.checkpoint_every)

    units_all = pair_ids(data)
    chosen = spread_rows(list(data["feature"]), units_all, c.score_prompts)
    names = list(chosen)
    rows = [i for f in names for i in chosen[f]]
    ck = PartCheckpoint(partial / "circuit_feature_scores.safetensors", every)
    done, values = ck.load()
    started = time.perf_counter()
    values = edges.edge_scores(ctx.model, ctx.discovery.take(rows), metric, method, int(ctx.cfg.circuit.ig_steps), bs,
                               done, values, on_progress=ck, desc=f"circuit scores per feature ({method})")
    seconds_scores = time.perf_counter() - started
    log.info("circuit scores per feature (%s): %d features, %d prompts in %.1f s", method, len(names), len(rows), seconds_scores)
    write_tensors(ctx.tensors / "circuit_feature_scores.safetensors", {"per_prompt": values, "rows": torch.tensor(rows)},
                  metadata={"axes": "[prompt, edge]", "method": method, "metric": metric, "features": ",".join(names),
                            "rows": "discovery rows of each prompt, features in the order of `features`"})
    ck.remove()

    per_feature, units, start = {}, {}, 0
    for f in names:
        per_feature[f] = values[start:start + len(chosen[f])]
        units[f] = [units_all[i] for i in chosen[f]] if units_all else None
        start += len(chosen[f])
    k = max(1, min(graph.n_edges, int(round(float(c.fraction) * graph.n_edges))))
    compared = dict(per_feature)
    if method in pooled:
        compared[POOLED] = pooled[method]
        units[POOLED] = score_units
    rows_overlap, boot_overlap = overlaps(compared, units, k, n_boot, seed)
    overlap = pd.DataFrame(rows_overlap)
    write_table(ctx.tables / "circuit_feature_overlap.csv", overlap)

    circuits = {f: top_circuits(s.mean(0), [k])[0] for f, s in compared.items()}
    transfer, boot_transfer, seconds_eval, n_held = pd.DataFrame(), {}, 0.0, 0
    held_data = ctx.dataset.iloc[ctx.side_rows("heldout")].reset_index(drop=True)
    if (c.heldout_prompts is None or int(c.heldout_prompts) > 0) and len(held_data) and "feature" in held_data:
        held_units = pair_ids(held_data)
        held = {f: r for f, r in spread_rows(list(held_data["feature"]), held_units, c.heldout_prompts).items() if r}
        held_rows = [i for f in held for i in held[f]]
        n_held = len(held_rows)
        draws = random_circuits(graph.n_edges, [k] * int(c.random_draws), seed)
        blocks = torch.stack([torch.ones(graph.n_edges, dtype=torch.bool), torch.zeros(graph.n_edges, dtype=torch.bool),
                              *circuits.values(), *draws])
        ck = PartCheckpoint(partial / "circuit_feature_eval.safetensors", every)
        done, m = ck.load()
        started = time.perf_counter()
        m = edges.evaluate(ctx.model, ctx.heldout.take(held_rows), blocks, metric, bs, rows_per_run, done, m, on_progress=ck,
                           desc=f"circuit per feature on held-out prompts ({len(blocks)} circuits)")
        seconds_eval = time.perf_counter() - started
        log.info("circuit per feature on held-out prompts: %d circuits on %d prompts in %.1f s", len(blocks), n_held, seconds_eval)
        write_tensors(ctx.tensors / "circuit_feature_eval.safetensors", {"metric": m, "rows": torch.tensor(held_rows)},
                      metadata={"axes": "[circuit, prompt]", "circuits": ",".join(["full", "empty", *circuits, *[RANDOM] * len(draws)]),
                                "rows": "held-out rows", "metric": metric})
        ck.remove()
        transfer, boot_transfer = transfer_table(m, list(circuits), held, held_rows, held_units, n_boot, seed)
        write_table(ctx.tables / "circuit_feature_transfer.csv", transfer)

    null = overlap.iloc[0][["null_mean", "null_low", "null_high"]].to_dict() if len(overlap) else {}
    between = ((overlap.a != POOLED) & (overlap.b != POOLED)).to_numpy() if len(overlap) else np.zeros(0, dtype=bool)
    summary = {"method": method, "metric": metric, "features": names, "score_prompts": {f: len(r) for f, r in chosen.items()},
               "heldout_prompts": n_held, "fraction": float(c.fraction), "edges": k, "n_edges": graph.n_edges,
               "random_draws": int(c.random_draws), "pooled": POOLED in compared,
               "overlap_between_features": mean_interval(list(overlap.overlap[between]), list(boot_overlap[between]), shifted=True),
               **{k_: float(v) for k_, v in null.items()},
               "seconds": {"scores": round(seconds_scores, 1), "evaluation": round(seconds_eval, 1)}}
    if len(transfer):
        for key, pick in (("own_feature", transfer.circuit == transfer.prompts),
                          ("other_features", (transfer.circuit != transfer.prompts) & transfer.circuit.isin(per_feature)),
                          ("pooled", transfer.circuit == POOLED), ("random", transfer.circuit == RANDOM)):
            chosen_rows = transfer[pick]
            summary[f"faithfulness_{key}"] = mean_interval(
                list(chosen_rows.faithfulness), [boot_transfer[(r.circuit, r.prompts)] for r in chosen_rows.itertuples()])
    write_json(ctx.tables / "circuit_features.json", summary)
    low, high = min(map(len, chosen.values())), max(map(len, chosen.values()))
    title = (f"One circuit or one per feature? {method.upper().replace('_', '-')} scores on {low if low == high else f'{low}-{high}'} "
             f"discovery prompts per feature; circuits of {k} edges ({100 * float(c.fraction):.2g}%)")
    write_figure(ctx.figures / "circuit_features.html", matrix_figure(overlap, transfer, k, null, title))


def transfer_table(m: torch.Tensor, names: list[str], held: dict[str, list[int]], held_rows: list[int], units,
                   n_boot: int, seed: int) -> tuple[pd.DataFrame, dict]:
    """Faithfulness of every circuit (and of the random draws' mean metric) on every feature's
    held-out prompts, with pair-bootstrap intervals, and each one's resamples by (circuit, feature):
    every circuit on one feature's prompts sees the same resamples."""
    full, empty, named = m[0], m[1], m[2:2 + len(names)]
    random_mean = m[2 + len(names):].mean(0) if m.shape[0] > 2 + len(names) else None
    position = {r: j for j, r in enumerate(held_rows)}
    out, boots = [], {}
    for j, (f, rows) in enumerate(held.items()):
        cols = torch.tensor([position[r] for r in rows])
        u = [units[r] for r in rows] if units else None
        for name, values in [*zip(names, named), *([(RANDOM, random_mean)] if random_mean is not None else [])]:
            faith, low, high, boots[(name, f)] = faithfulness_interval(values[cols], full[cols], empty[cols], u, n_boot, seed + j)
            out.append({"circuit": name, "prompts": f, "n_prompts": len(rows), "n_pairs": len(set(u)) if u else len(rows),
                        "faithfulness": faith, "ci_low": low, "ci_high": high,
                        "m_full": float(full[cols].mean()), "m_empty": float(empty[cols].mean())})
    return pd.DataFrame(out), boots


def matrix_figure(overlap: pd.DataFrame, transfer: pd.DataFrame, k: int, null: dict, title: str) -> go.Figure:
    """Left: overlap of top edges for every pair of circuits (`null`: of two random circuits of k
    edges); right: each circuit's faithfulness on each prompt set. Cells say the value and its 95%
    interval."""
    names = list(dict.fromkeys([*overlap.a, *overlap.b]))
    index = {n: i for i, n in enumerate(names)}
    z = np.eye(len(names))
    text = [["" if i != j else "1" for j in range(len(names))] for i in range(len(names))]
    for r in overlap.itertuples():
        i, j = index[r.a], index[r.b]
        z[i, j] = z[j, i] = r.overlap
        text[i][j] = text[j][i] = f"{r.overlap:.2f}<br>[{r.ci_low:.2f}, {r.ci_high:.2f}]"
    cols = 2 if len(transfer) else 1
    fig = make_subplots(rows=1, cols=cols, horizontal_spacing=0.22, subplot_titles=[
        f"overlap of the top {k} edges (random: {null.get('null_mean', float('nan')):.3f} "
        f"[{null.get('null_low', float('nan')):.3f}, {null.get('null_high', float('nan')):.3f}])",
        *(["faithfulness on held-out prompts"] if cols == 2 else [])])
    fig.add_trace(go.Heatmap(z=z, x=names, y=names, text=text, texttemplate="%{text}", colorscale="Greys", zmin=0, zmax=1,
                             colorbar={"x": 0.39 if cols == 2 else 1.0, "len": 0.8, "title": "overlap"},
                             hovertemplate="%{y} and %{x}: %{text}<extra></extra>"), 1, 1)
    if cols == 2:
        circuits = list(dict.fromkeys(transfer.circuit))
        prompts = list(dict.fromkeys(transfer.prompts))
        grid = transfer.pivot(index="circuit", columns="prompts", values="faithfulness").loc[circuits, prompts]
        cell = {(r.circuit, r.prompts): f"{r.faithfulness:.2f}<br>[{r.ci_low:.2f}, {r.ci_high:.2f}]" for r in transfer.itertuples()}
        fig.add_trace(go.Heatmap(z=grid.to_numpy(), x=prompts, y=circuits, text=[[cell[(c, p)] for p in prompts] for c in circuits],
                                 texttemplate="%{text}", colorscale="Blues", zmin=0, zmax=1,
                                 colorbar={"title": "faithfulness<br>(0 to 1)"},
                                 hovertemplate="circuit %{y} on %{x} prompts: %{text}<extra></extra>"), 1, 2)
        fig.update_xaxes(title_text="held-out prompts of", row=1, col=2)
        fig.update_yaxes(title_text="circuit of", autorange="reversed", row=1, col=2)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    n = len(names)
    fig.update_layout(title=title, width=1300 if cols == 2 else 700, height=max(450, 60 * n + 200), template="plotly_white")
    return fig


def section_data(run_dir) -> dict | None:
    """What the report's circuit section shows of the per-feature circuits (None when not run)."""
    path = run_dir / "tables" / "circuit_features.json"
    if not path.exists():
        return None
    s = read_json(path)
    overlap = pd.read_csv(run_dir / "tables" / "circuit_feature_overlap.csv")
    transfer_path = run_dir / "tables" / "circuit_feature_transfer.csv"
    transfer = pd.read_csv(transfer_path) if transfer_path.exists() else pd.DataFrame()
    pooled = overlap[(overlap.a == POOLED) | (overlap.b == POOLED)]
    rows = [[r.b if r.a == POOLED else r.a, r.overlap, f"[{r.ci_low:.3f}, {r.ci_high:.3f}]"] for r in pooled.itertuples()]
    return {"s": s, "pooled_rows": rows, "has_transfer": len(transfer) > 0}
