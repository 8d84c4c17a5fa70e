"""The circuit stage's MIB-comparable evaluation: one scored graph's circuits at MIB's ten edge
fractions (pipeline/circuit/mib.py), pruned as MIB prunes them, evaluated exactly under each
ablation of `circuit.ablation` (pipeline/circuit/ablation.py) on discovery and held-out prompts,
beside random circuits of the same counts (pruned alike); and how much the top edges found under
each ablation overlap, against the overlap of random edge sets.

Intervals resample pairs (pipeline/stats.py bootstrap_counts): faithfulness, CPR and CMD are
recomputed from each resample's prompt means. Identical circuits (after pruning most small random
circuits are empty) are evaluated once.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch

from pipeline.artifacts import write_figure, write_json, write_table
from pipeline.circuit import edges, mib, plots
from pipeline.circuit.ablation import Ablation
from pipeline.stages.patching import PartCheckpoint
from pipeline.stats import bootstrap_counts

log = logging.getLogger(__name__)


def _faith(weights: torch.Tensor, m_circuits: torch.Tensor, m_full: torch.Tensor, m_empty: torch.Tensor) -> torch.Tensor:
    """[k, n] prompt weights (a resample's counts) -> [k, circuits] faithfulness of the weighted means."""
    w = weights / weights.sum(-1, keepdim=True)
    full, empty = w @ m_full.double(), w @ m_empty.double()
    return ((w @ m_circuits.double().T) - empty[:, None]) / (full - empty)[:, None]


def curve(m_circuits: torch.Tensor, m_full: torch.Tensor, m_empty: torch.Tensor, n_boot: int, seed: int, units) -> dict:
    """Faithfulness at each fraction (m_circuits [10, n_prompts]) with CPR, CMD and 95% intervals."""
    n = m_full.shape[-1]
    point = _faith(torch.ones(1, n, dtype=torch.float64), m_circuits, m_full, m_empty)[0].numpy()
    boot = _faith(bootstrap_counts(n, n_boot, seed, units), m_circuits, m_full, m_empty).numpy()
    boot = boot[np.isfinite(boot).all(1)]
    cpr, cmd = mib.areas(point)
    b_areas = np.stack(mib.areas(boot), -1) if len(boot) else np.full((1, 2), np.nan)
    lo, hi = np.nanpercentile(boot, [2.5, 97.5], axis=0) if len(boot) else (point * np.nan, point * np.nan)
    (cpr_lo, cmd_lo), (cpr_hi, cmd_hi) = np.nanpercentile(b_areas, [2.5, 97.5], axis=0)
    return {"faithfulness": point, "ci_low": lo, "ci_high": hi, "cpr": cpr, "cpr_ci": (float(cpr_lo), float(cpr_hi)),
            "cmd": cmd, "cmd_ci": (float(cmd_lo), float(cmd_hi))}


def single(m_circuit: torch.Tensor, m_full: torch.Tensor, m_empty: torch.Tensor, n_boot: int, seed: int, units) -> tuple:
    """(faithfulness, (2.5%, 97.5%)) of one circuit (m_circuit [n_prompts])."""
    n = m_full.shape[-1]
    point = float(_faith(torch.ones(1, n, dtype=torch.float64), m_circuit[None], m_full, m_empty)[0, 0])
    boot = _faith(bootstrap_counts(n, n_boot, seed, units), m_circuit[None], m_full, m_empty)[:, 0].numpy()
    lo, hi = np.nanpercentile(boot, [2.5, 97.5]) if np.isfinite(boot).any() else (np.nan, np.nan)
    return point, (float(lo), float(hi))


def evaluate_unique(model, pairs, circuits: torch.Tensor, metric: str, c, ablation, ck_path, desc) -> torch.Tensor:
    """edges.evaluate on the distinct rows of `circuits` only, checkpointed; [n_circuits, n_prompts]."""
    distinct, back = torch.unique(circuits, dim=0, return_inverse=True)
    ck = PartCheckpoint(ck_path, int(c.checkpoint_every))
    done, values = ck.load()
    m = edges.evaluate(model, pairs, distinct, metric, int(c.batch_size), int(c.rows_per_run), done, values,
                       on_progress=ck, desc=desc, ablation=ablation)
    ck.remove()
    return m[back]


def overlap(per_prompt: dict[str, torch.Tensor], n_boot: int, seed: int, units, chunk: int = 50) -> pd.DataFrame:
    """Shared share of the top-k edges (by |mean score|) of every two ablations at MIB's fractions
    below 100%, with a pair-bootstrap interval, and k/N, the expected share of two random sets.
    Resamples are ranked `chunk` at a time ([chunk, n_edges] at once, not [n_boot, n_edges])."""
    names = list(per_prompt)
    n, n_edges = next(iter(per_prompt.values())).shape
    ks = torch.tensor([k for k in mib.counts(n_edges) if 0 < k < n_edges])
    weights = torch.cat([torch.ones(1, n, dtype=torch.float64), bootstrap_counts(n, n_boot, seed, units)])
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    shared = torch.zeros(len(weights), len(pairs), len(ks))
    for start in range(0, len(weights), chunk):
        w = weights[start:start + chunk]
        ranks = {}
        for a in names:  # each edge's rank by |weighted mean| in each resample
            mean = (w @ per_prompt[a].double()) / w.sum(-1, keepdim=True)
            order = torch.argsort(mean.abs(), dim=-1, descending=True, stable=True)
            ranks[a] = torch.empty_like(order).scatter_(1, order, torch.arange(n_edges).expand_as(order).contiguous())
        for j, (a, b) in enumerate(pairs):
            both = torch.maximum(ranks[a], ranks[b])  # an edge is in both top-k sets when both ranks are < k
            shared[start:start + chunk, j] = (both[:, :, None] < ks).sum(1).float() / ks
    rows = []
    for j, (a, b) in enumerate(pairs):
        for i, k in enumerate(ks.tolist()):
            lo, hi = np.percentile(shared[1:, j, i].numpy(), [2.5, 97.5])
            rows.append({"ablation_a": a, "ablation_b": b, "fraction": k / n_edges, "top_k": k, "shared": float(shared[0, j, i]),
                         "ci_low": float(lo), "ci_high": float(hi), "random_expected": k / n_edges})
    return pd.DataFrame(rows)


def run(ctx, model, graph, method: str, scores: torch.Tensor, sides: dict, ablations: list[str], score_pairs, score_units,
        eap_patching: torch.Tensor | None, quoted: torch.Tensor | None, metric: str) -> dict:
    """Everything above for the scores `scores` [n_edges] of `method`; sides {"discovery"|"heldout":
    (pairs, units)}; score_pairs / score_units the prompts edges are scored on (the means of the mean
    ablations are taken over their corrupted side) and their pairs; eap_patching [prompts, edges] the EAP scores under patching when already
    computed (for the overlap); quoted (bool [n_edges]) a loaded circuit also evaluated on its own.
    Writes tables/circuit_mib.csv, circuit_mib.json, circuit_ablation_overlap.csv and the figure;
    returns the json's dict."""
    cfg, c = ctx.cfg, ctx.cfg.circuit
    n_boot, seed = int(c.bootstrap), int(cfg.seed)
    rankings = list(dict.fromkeys(str(r) for r in c.mib.rankings))
    blocks = {"full": torch.ones(1, graph.n_edges, dtype=torch.bool), "empty": torch.zeros(1, graph.n_edges, dtype=torch.bool)}
    for r in rankings:
        blocks[f"{method} ({r})"] = mib.circuits(graph, scores, r)
    blocks["random"] = mib.random_circuits(graph, seed)
    if quoted is not None:
        blocks["quoted"] = mib.prune(graph, quoted[None])
        g = torch.Generator().manual_seed(seed + 1)
        same = torch.zeros(1, graph.n_edges, dtype=torch.bool)
        same[0, torch.randperm(graph.n_edges, generator=g)[: int(quoted.sum())]] = True
        blocks["quoted random"] = mib.prune(graph, same)
    circuits = torch.cat(list(blocks.values()))
    kept = {k: [int(x) for x in v.sum(-1)] for k, v in blocks.items()}

    rows, summary, shown, partial = [], {}, {}, ctx.tensors / ".partial"
    made = {a: Ablation.of(a, model, graph, score_pairs, int(c.batch_size)) for a in ablations}
    for ablation_name, ablation in made.items():
        for side, (pairs, units) in sides.items():
            started = time.perf_counter()
            m = evaluate_unique(model, pairs, circuits, metric, c, ablation, partial / f"circuit_mib_{ablation_name}_{side}.safetensors",
                                f"MIB evaluation ({ablation_name}, {side})")
            log.info("MIB evaluation under %s ablation on %d %s prompts: %d distinct circuits in %.1f s", ablation_name, len(pairs),
                     side, len(torch.unique(circuits, dim=0)), time.perf_counter() - started)
            split = dict(zip(blocks, torch.split(m, [len(b) for b in blocks.values()])))
            full, empty = split["full"][0], split["empty"][0]
            for name in [*(f"{method} ({r})" for r in rankings), "random"]:
                s = curve(split[name], full, empty, n_boot, seed, units)
                summary[f"{ablation_name}|{side}|{name}"] = {
                    "ablation": ablation_name, "prompts": side, "circuit": name, "n_prompts": len(pairs),
                    "cpr": s["cpr"], "cpr_ci": s["cpr_ci"], "cmd": s["cmd"], "cmd_ci": s["cmd_ci"],
                    "m_full": float(full.mean()), "m_empty": float(empty.mean())}
                if side == "discovery" or "discovery" not in sides:
                    shown[f"{name}, {ablation_name}"] = s
                for i, f in enumerate(mib.FRACTIONS):
                    rows.append({"ablation": ablation_name, "prompts": side, "circuit": name, "fraction": f,
                                 "edges_requested": mib.counts(graph.n_edges)[i], "edges_after_pruning": kept[name][i],
                                 "faithfulness": s["faithfulness"][i], "ci_low": s["ci_low"][i], "ci_high": s["ci_high"][i]})
            if quoted is not None:
                for name in ("quoted", "quoted random"):
                    f, ci = single(split[name][0], full, empty, n_boot, seed, units)
                    summary[f"{ablation_name}|{side}|{name}"] = {
                        "ablation": ablation_name, "prompts": side, "circuit": name, "n_prompts": len(pairs),
                        "edges": kept[name][0], "faithfulness": f, "ci": ci}
    write_table(ctx.tables / "circuit_mib.csv", pd.DataFrame(rows))

    overlap_table = None
    if len(ablations) > 1:  # the top edges found under each ablation, all scored with EAP
        per_prompt = {}
        for ablation_name in ablations:
            if ablation_name == "patching" and eap_patching is not None:
                per_prompt[ablation_name] = eap_patching
                continue
            started = time.perf_counter()
            per_prompt[ablation_name] = edges.edge_scores(model, score_pairs, metric, "eap", batch_size=int(c.batch_size),
                                                          ablation=made[ablation_name], desc=f"EAP scores ({ablation_name})")
            log.info("EAP scores under %s ablation on %d prompts in %.1f s", ablation_name, len(score_pairs),
                     time.perf_counter() - started)
        overlap_table = overlap(per_prompt, int(c.mib.overlap_bootstrap), seed, score_units)
        write_table(ctx.tables / "circuit_ablation_overlap.csv", overlap_table)

    out = {"method": method, "rankings": rankings, "ablations": ablations, "fractions": list(mib.FRACTIONS),
           "n_edges": graph.n_edges, "prompts": {side: len(p) for side, (p, _) in sides.items()},
           "results": list(summary.values()),
           "overlap": overlap_table.to_dict("records") if overlap_table is not None else []}
    write_json(ctx.tables / "circuit_mib.json", out)
    for r in out["results"]:
        if "cpr" in r:
            log.info("MIB %s, %s ablation, %s prompts: CPR %.3f [%.3f, %.3f], CMD %.3f [%.3f, %.3f]", r["circuit"], r["ablation"],
                     r["prompts"], r["cpr"], *r["cpr_ci"], r["cmd"], *r["cmd_ci"])
    side = "discovery" if "discovery" in sides else "held-out"
    write_figure(ctx.figures / "circuit_mib.html", plots.faithfulness_curves(
        shown, mib.FRACTIONS, f"Faithfulness at MIB's edge fractions under each ablation ({side} prompts; {metric}); "
                              "CPR and CMD are MIB's trapezoids over the linear fraction"))
    return out

