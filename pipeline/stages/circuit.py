"""Stage `circuit`: edge-level circuit discovery and its exact evaluation.

1. Edge scores (pipeline/circuit/edges.py) with `circuit.method` (eap | eap_ig) on the first
   `circuit.score_prompts` prompts, and with the other method too when `circuit.compare_methods`.
2. Circuits of each size (`circuit.smallest` .. 100% of edges, `circuit.n_sizes` log-spaced): the
   edges of largest |mean score|, and `circuit.random_draws` random circuits of each size as the
   baseline (their mean and the spread of the draws); evaluated
   exactly on the first `circuit.eval_prompts` prompts: faithfulness curve, CPR, CMD, 95% intervals.
3. Scores against exact single-edge patching on the top `circuit.edge_check.top` edges and
   `circuit.edge_check.random` others: Pearson r and top-k overlap per method.
4. Path patching (pipeline/circuit/path_patching.py): sender heads -> `circuit.path_patching.receivers`.
5. MIB's yardstick (pipeline/circuit/benchmark.py): the main scores' circuits at MIB's ten edge
   fractions, pruned, under each ablation of `circuit.ablation`, on `circuit.mib.eval_prompts`
   discovery and `circuit.mib.heldout_prompts` held-out prompts; the top edges found under each
   ablation compared. Every scored graph is written as circuits/<method>.json in the EAP-IG / MIB
   format (pipeline/circuit/mib.py), and `circuit.load=<file.json>` evaluates a given one instead
   of discovering a circuit (method `loaded`).
6. One circuit per dialect feature (pipeline/circuit/features.py, `circuit.features`): their overlap
   and each one's faithfulness on every feature's held-out prompts.
7. The circuit view and its strongest paths (pipeline/circuit/view.py, `circuit.view`).
Each long part is checkpointed under tensors/.partial/, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch

from pipeline import figures
from pipeline.artifacts import write_figure, write_json, write_table, write_tensors
from pipeline.circuit import benchmark, edges, features, mib, view
from pipeline.circuit.ablation import check_ablations
from pipeline.circuit.faithfulness import (curve_summary, draw_band, edge_counts, random_circuits, random_draws, size_grid,
                                           top_circuits)
from pipeline.circuit.graph import Graph, edge_hooks
from pipeline.circuit.path_patching import path_patch
from pipeline.circuit import plots
from pipeline.metrics import LINEAR_METRICS, check_metric
from pipeline.stages.patching import PartCheckpoint
from pipeline.stats import summary_table, units_of

log = logging.getLogger(__name__)


def prompt_count(value, n_all: int) -> int:
    return n_all if value is None else max(1, min(int(value), n_all))


def run(ctx) -> None:
    # Edges are scored on the discovery side of the split (pipeline/data/splits.py); the circuits
    # are evaluated there and on held-out prompts, to see whether they generalize.
    cfg, model, pairs_all = ctx.cfg, ctx.model, ctx.discovery
    c = cfg.circuit
    metric = check_metric(str(cfg.metric.name))
    edges.check_method(str(c.method), metric)
    ablations = check_ablations(c.ablation)
    methods = ["loaded"] if c.load else [str(c.method)]
    other = "eap" if c.method == "eap_ig" else "eap_ig"
    if c.compare_methods and not c.load and not (other == "eap" and metric == "kl_div"):
        methods.append(other)
    n_score = prompt_count(c.score_prompts, len(pairs_all))
    n_eval = min(prompt_count(c.eval_prompts, len(pairs_all)), n_score)
    n_heldout = prompt_count(c.heldout_prompts, len(ctx.heldout)) if len(ctx.heldout) and c.heldout_prompts != 0 else 0
    bs, rows_per_run, every = int(c.batch_size), int(c.rows_per_run), int(c.checkpoint_every)
    partial = ctx.tensors / ".partial"

    with edge_hooks(model):
        graph = Graph.of(model)
        log.info("circuit graph: %s", graph.summary())
        score_pairs, eval_pairs = pairs_all.head(n_score), pairs_all.head(n_eval)

        scores, loaded = {}, None
        if c.load:  # a given circuit: its file's scores stand in for a discovery (one row)
            loaded = mib.load(str(c.load), graph, int(model.cfg.d_model))
            log.info("circuit.load=%s: %d edges in its circuit, %d scored%s", c.load, int(loaded.in_graph.sum()),
                     int((loaded.scores != 0).sum()), f"; {loaded.merged} grouped key/value edges taken whole" if loaded.merged else "")
            scores["loaded"] = loaded.scores[None].clone()
            write_tensors(ctx.tensors / "circuit_scores_loaded.safetensors", {"per_prompt": scores["loaded"], "mean": loaded.scores,
                                                                              "in_graph": loaded.in_graph},
                          metadata={"axes": "[1, edge]", "method": "loaded", "file": str(c.load), "graph": graph.summary()})
        for method in methods if loaded is None else []:
            ck = PartCheckpoint(partial / f"circuit_scores_{method}.safetensors", every)
            done, values = ck.load()
            started = time.perf_counter()
            values = edges.edge_scores(model, score_pairs, metric, method, int(c.ig_steps), bs, done, values,
                                       on_progress=ck, desc=f"circuit scores {method}")
            log.info("circuit scores %s: %d edges on %d prompts in %.1f s", method, graph.n_edges, n_score, time.perf_counter() - started)
            scores[method] = values
            write_tensors(ctx.tensors / f"circuit_scores_{method}.safetensors", {"per_prompt": values, "mean": values.mean(0)},
                          metadata={"axes": "[prompt, edge]", "method": method, "metric": metric,
                                    "ig_steps": str(c.ig_steps), "graph": graph.summary()})
            ck.remove()

        # Every circuit evaluated exactly, in one checkpointed pass over the evaluation prompts.
        fractions = size_grid(float(c.smallest), int(c.n_sizes))
        counts = edge_counts(fractions, graph.n_edges)
        main = scores[methods[0]].mean(0)
        check_edges = edge_sample(main, int(c.edge_check.top), int(c.edge_check.random), int(cfg.seed))
        blocks = {"full": torch.ones(1, graph.n_edges, dtype=torch.bool), "empty": torch.zeros(1, graph.n_edges, dtype=torch.bool)}
        for method in methods:
            blocks[method] = top_circuits(scores[method].mean(0), counts)
        draws = int(c.random_draws)  # random circuits of each size below every edge: the band the top ones must leave
        blocks["random"] = random_circuits(graph.n_edges, [k for k in counts if k < graph.n_edges], int(cfg.seed), draws)
        minus_one = torch.ones(len(check_edges), graph.n_edges, dtype=torch.bool)
        minus_one[torch.arange(len(check_edges)), check_edges] = False
        blocks["edge_patching"] = minus_one
        circuits = torch.cat(list(blocks.values()))
        ck = PartCheckpoint(partial / "circuit_eval.safetensors", every)
        done, values = ck.load()
        started = time.perf_counter()
        m = edges.evaluate(model, eval_pairs, circuits, metric, bs, rows_per_run, done, values, on_progress=ck,
                           desc=f"circuit evaluation ({len(circuits)} circuits)")
        log.info("circuit evaluation: %d circuits on %d prompts in %.1f s", len(circuits), n_eval, time.perf_counter() - started)
        split = dict(zip(blocks, torch.split(m, [len(b) for b in blocks.values()])))
        split["random_draws"] = random_draws(split["random"], counts, graph.n_edges, split["full"][0], draws)
        split["random"] = split["random_draws"].mean(0)  # the average random circuit of each size
        write_tensors(ctx.tensors / "circuit_eval.safetensors", {**{k: v for k, v in split.items()}, "fractions": torch.tensor(fractions),
                                                                 "check_edges": check_edges, **{f"circuit_{k}": blocks[k] for k in methods}},
                      metadata={"axes": "[circuit, prompt]", "metric": metric})
        ck.remove()

        heldout = None
        if n_heldout:  # the same circuits (found on discovery prompts) on prompts they were not found on
            held_blocks = {k: blocks[k] for k in ("full", "empty", methods[0], "random")}
            ck = PartCheckpoint(partial / "circuit_eval_heldout.safetensors", every)
            done, values = ck.load()
            started = time.perf_counter()
            mh = edges.evaluate(model, ctx.heldout.head(n_heldout), torch.cat(list(held_blocks.values())), metric, bs,
                                rows_per_run, done, values, on_progress=ck, desc="circuit evaluation (held-out)")
            log.info("circuit evaluation on held-out prompts: %d circuits on %d prompts in %.1f s",
                     sum(len(b) for b in held_blocks.values()), n_heldout, time.perf_counter() - started)
            heldout = dict(zip(held_blocks, torch.split(mh, [len(b) for b in held_blocks.values()])))
            heldout["random_draws"] = random_draws(heldout["random"], counts, graph.n_edges, heldout["full"][0], draws)
            heldout["random"] = heldout["random_draws"].mean(0)
            write_tensors(ctx.tensors / "circuit_eval_heldout.safetensors", {**heldout, "fractions": torch.tensor(fractions)},
                          metadata={"axes": "[circuit, prompt]", "metric": metric, "prompts": "held-out"})
            ck.remove()

        sides = {}  # MIB's yardstick on discovery and held-out prompts
        n_mib = min(prompt_count(c.mib.eval_prompts, n_eval), n_eval) if c.mib.eval_prompts != 0 else 0
        n_mib_held = prompt_count(c.mib.heldout_prompts, len(ctx.heldout)) if len(ctx.heldout) and c.mib.heldout_prompts else 0
        if n_mib:
            sides["discovery"] = (pairs_all.head(n_mib), units_of(ctx.discovery_dataset, n_mib))
        if n_mib_held:
            held_dataset = ctx.dataset.iloc[ctx.side_rows("heldout")].reset_index(drop=True)
            sides["heldout"] = (ctx.heldout.head(n_mib_held), units_of(held_dataset, n_mib_held))
        if sides:
            benchmark.run(ctx, model, graph, methods[0], scores[methods[0]].mean(0), sides, ablations, score_pairs,
                          units_of(ctx.discovery_dataset, n_score), scores["eap"] if "eap" in scores else None,
                          loaded.in_graph if loaded is not None else None, metric)
        if c.features.enabled:  # one circuit per dialect feature (pipeline/circuit/features.py)
            features.run(ctx, graph, metric, scores, units_of(ctx.discovery_dataset, n_score))

        pp = None
        if c.path_patching.enabled:
            n_pp = prompt_count(c.path_patching.prompts, n_eval)
            started = time.perf_counter()
            pp, pp_anchors = path_patch(model, pairs_all.head(n_pp), metric, c.path_patching.receivers, bs,
                                        rows_per_run, desc="path patching")
            log.info("path patching into %s: %d prompts in %.1f s", c.path_patching.receivers, n_pp, time.perf_counter() - started)
            write_tensors(ctx.tensors / "path_patching.safetensors", {"normalized": pp, "effect": pp * pp_anchors.gap},
                          metadata={"axes": "[layer, head, prompt]", "receivers": str(c.path_patching.receivers),
                                    "effect": "metric units: patched - corrupted", "gap": str(pp_anchors.gap)})
            pp = (pp, pp_anchors.gap)

    write_outputs(ctx, graph, methods, scores, fractions, counts, split, check_edges, pp, n_score, n_eval, metric,
                  heldout, n_heldout, loaded)


def curve_numbers(curve: dict) -> dict:
    """What circuit_summary.json keeps of a curve: CPR and CMD with their intervals, the first size
    at faithfulness 0.8, and for the random circuits the range of their draws' CPR and CMD."""
    keep = ("cpr", "cpr_ci", "cmd", "cmd_ci", "size_at_0.8", "draws", "cpr_draws", "cmd_draws")
    return {k: curve[k] for k in keep if k in curve}


def edge_sample(scores: torch.Tensor, top: int, n_random: int, seed: int) -> torch.Tensor:
    """The `top` edges of largest |score| and `n_random` others drawn at random."""
    order = torch.argsort(scores.abs(), descending=True, stable=True)
    head = order[:top]
    rest = order[top:]
    g = torch.Generator().manual_seed(seed)
    pick = rest[torch.randperm(len(rest), generator=g)[:n_random]]
    return torch.cat([head, pick])


def agreement(exact: np.ndarray, approx: np.ndarray, k: int) -> dict:
    ok = np.isfinite(exact) & np.isfinite(approx)
    e, a = exact[ok], approx[ok]
    usable = len(e) > 2 and e.std() > 0 and a.std() > 0
    r = float(np.corrcoef(e, a)[0, 1]) if usable else float("nan")
    # Spearman: Pearson on ranks, robust to a few huge edges
    rho = float(pd.Series(e).rank().corr(pd.Series(a).rank())) if usable else float("nan")
    k = min(k, len(e))
    overlap = len(set(np.argsort(-np.abs(e))[:k]) & set(np.argsort(-np.abs(a))[:k]))
    return {"pearson_r": r, "spearman_r": rho, "top_k": k, "top_k_overlap": overlap, "n_edges": int(ok.sum())}


def write_outputs(ctx, graph, methods, scores, fractions, counts, split, check_edges, pp, n_score, n_eval, metric,
                  heldout=None, n_heldout=0, loaded=None) -> None:
    cfg, c = ctx.cfg, ctx.cfg.circuit
    n_boot, seed = int(c.bootstrap), int(cfg.seed)
    names = graph.edge_names()
    up, down = graph.edges

    # Ranked edges, with intervals over prompts.
    main = methods[0]
    order = torch.argsort(scores[main].mean(0).abs(), descending=True)[: int(c.top_edges)]
    keys = pd.DataFrame({"score_rank": np.arange(1, len(order) + 1), "edge": [names[i] for i in order.tolist()],
                         "upstream": [graph.up_names[int(up[i])] for i in order], "downstream": [graph.down_names[int(down[i])] for i in order]})
    one_row = scores[main].shape[0] != n_score  # a loaded circuit's scores: one row, no prompts
    features = list(ctx.discovery_dataset["feature"][:n_score]) if "feature" in ctx.discovery_dataset and not one_row else None
    table = summary_table(scores[main][:, order].T, keys, features, n_boot, seed)
    table.insert(4, "method", main)
    write_table(ctx.tables / "circuit_edges.csv", table)

    # Faithfulness curves: on the discovery prompts the edges were scored on, and on held-out ones.
    full, empty = split["full"][0], split["empty"][0]
    curves, curves_heldout, rows = {}, {}, []
    for prompts, values, names_ in (("discovery", split, [*methods, "random"]),
                                     ("heldout", heldout or {}, [methods[0], "random"] if heldout else [])):
        for name in names_:
            s = curve_summary(fractions, values[name], values["full"][0], values["empty"][0], n_boot, seed)
            if name == "random":  # the mean of the draws, and their spread
                s.update(draw_band(fractions, values["random_draws"], values["full"][0], values["empty"][0]))
            (curves if prompts == "discovery" else curves_heldout)[name] = s
            for i, f in enumerate(fractions):
                rows.append({"prompts": prompts, "circuit": name, "fraction": f, "edges": counts[i],
                             "faithfulness": s["faithfulness"][i], "ci_low": s["ci_low"][i], "ci_high": s["ci_high"][i],
                             "draws_low": s["band_low"][i] if "band_low" in s else np.nan,
                             "draws_high": s["band_high"][i] if "band_high" in s else np.nan,
                             "metric_mean": float(values[name][i].mean())})
    write_table(ctx.tables / "circuit_faithfulness.csv", pd.DataFrame(rows))

    # Scores against exact single-edge patching (same prompts).
    exact = (full[None, :] - split["edge_patching"]).mean(-1).numpy()  # m(full) - m(full without e)
    agree, points = [], {}
    for method in methods:
        approx = scores[method][:n_eval, check_edges].mean(0).numpy()
        agree.append({"method": method, **agreement(exact, approx, int(c.edge_check.top))})
        points[method.upper().replace("_", "-")] = (exact, approx, [names[i] for i in check_edges.tolist()])
    agree = pd.DataFrame(agree)
    write_table(ctx.tables / "circuit_edge_agreement.csv", agree)

    summary = {
        "metric": metric, "methods": methods, "ig_steps": int(c.ig_steps), "n_nodes": graph.n_nodes, "n_edges": graph.n_edges,
        "graph": graph.summary(), "graph_shape": graph.shape, "score_prompts": n_score, "eval_prompts": n_eval,
        "m_full": float(full.mean()), "m_empty": float(empty.mean()),
        "curves": {k: curve_numbers(v) for k, v in curves.items()},
        "heldout_prompts": n_heldout, "random_draws": int(c.random_draws),
        "curves_heldout": {k: curve_numbers(v) for k, v in curves_heldout.items()},
        "m_full_heldout": float(heldout["full"][0].mean()) if heldout else None,
        "m_empty_heldout": float(heldout["empty"][0].mean()) if heldout else None,
        "edge_agreement": agree.to_dict("records"),
    }
    summary["empty_vs_corrupted"] = empty_gap(ctx, empty, metric, n_eval)
    best = max(methods, key=lambda k: curves[k]["cpr"])
    summary["winner"] = best
    if loaded is not None:
        summary["loaded"] = {"file": str(c.load), "in_graph": int(loaded.in_graph.sum()), "merged": loaded.merged,
                             "missing": loaded.missing}
    write_json(ctx.tables / "circuit_summary.json", summary)
    for method in methods:  # every scored graph in the EAP-IG / MIB format, the circuit the report quotes marked
        size = curves[method]["size_at_0.8"] or fractions[-1]
        quoted = loaded.in_graph if loaded is not None else top_circuits(scores[method].mean(0), edge_counts([size], graph.n_edges))[0]
        if not mib.write(ctx.tables.parent / "circuits" / f"{method}.json", graph, int(ctx.model.cfg.d_model), scores[method].mean(0), quoted):
            log.info("circuits/%s.json not written: the EAP-IG / MIB format has no merged block inputs", method)
    for prompts, family in (("discovery", curves), ("held-out", curves_heldout)):
        for k, v in family.items():
            log.info("circuit %s on %s prompts: CPR %.3f [%.3f, %.3f], CMD %.3f [%.3f, %.3f], faithfulness >= 0.8 at %s of edges",
                     k, prompts, v["cpr"], *v["cpr_ci"], v["cmd"], *v["cmd_ci"], v["size_at_0.8"])
    for r in agree.itertuples():
        log.info("circuit scores %s vs exact edge patching: Pearson r %.3f, Spearman %.3f, top-%d overlap %d",
                 r.method, r.pearson_r, r.spearman_r, r.top_k, r.top_k_overlap)

    shown = {k: curves[k] for k in [*methods, "random"]}
    shown.update({f"{k} (held-out)": v for k, v in curves_heldout.items()})
    held = f" and {n_heldout} held-out prompts (dashed)" if curves_heldout else ""
    write_figure(ctx.figures / "circuit_faithfulness.html", plots.faithfulness_curves(
        shown, fractions, f"Faithfulness of the top-|score| circuits ({n_eval} discovery prompts{held}; {metric}, "
                          f"{cfg.direction.name})"))
    write_figure(ctx.figures / "circuit_edge_agreement.html", figures.scatter_agreement(
        points, f"Edge scores against exact single-edge patching ({n_eval} prompts)",
        f"exact: m(full) - m(full without the edge), {metric}", "edge score (EAP, EAP-IG)"))
    k_draw = min(int(c.draw_max_edges), graph.n_edges)
    write_figure(ctx.figures / "circuit_graph.html", view.circuit_view(
        graph, scores[main].mean(0), counts, k_draw, int(c.view.max_edges), f"Circuit by |{main} score| ({cfg.direction.name})"))
    write_table(ctx.tables / "circuit_paths.csv", view.strongest_paths(
        graph, scores[main], k_draw, int(c.view.paths), units_of(ctx.discovery_dataset, n_score), n_boot, seed))
    if pp is not None:
        normalized, gap = pp
        effect = normalized * gap
        keys = pd.DataFrame([(l, h) for l in range(graph.n_layers) for h in range(graph.n_heads)], columns=["layer", "head"])
        table = summary_table(effect.reshape(-1, effect.shape[-1]), keys, None, n_boot, seed)
        table.insert(table.columns.get_loc("ci_high") + 1, "normalized_mean", table["mean"] / gap)
        write_table(ctx.tables / "path_patching.csv", table)
        hover = np.array([f"L{r.layer}H{r.head}: effect {r.mean:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}], normalized "
                          f"{r.normalized_mean:+.3f}" for r in table.itertuples()]).reshape(graph.n_layers, graph.n_heads)
        fig = figures.faceted_heatmaps([table["mean"].to_numpy().reshape(graph.n_layers, graph.n_heads)],
                                       [f"receivers: {c.path_patching.receivers}"],
                                       [str(h) for h in range(graph.n_heads)], [str(l) for l in range(graph.n_layers)],
                                       f"Path patching: sender head -> {c.path_patching.receivers} ({effect.shape[-1]} prompts)"
                                       f"<br><sup>effect in metric units ({metric}): patched - corrupted; hover: 95% interval "
                                       "and normalized value (1 = clean restored)</sup>",
                                       "sender head", "layer", [hover])
        write_figure(ctx.figures / "path_patching.html", fig)


def empty_gap(ctx, empty: torch.Tensor, metric: str, n_eval: int) -> dict:
    """How far the empty circuit is from the corrupted run (0 on equal-length pairs)."""
    from pipeline.artifacts import read_tensors

    path = ctx.tensors / "baseline.safetensors"
    if metric not in LINEAR_METRICS or not path.exists():
        return {"note": "compared only for a linear metric (logit_diff, favorability, prestige) with the cache stage's baseline"}
    corrupted = read_tensors(path)["corrupted_metric"][torch.as_tensor(ctx.side_rows("discovery")[:n_eval])]
    return {"mean_abs_gap": float((empty - corrupted).abs().mean()), "max_abs_gap": float((empty - corrupted).abs().max())}
