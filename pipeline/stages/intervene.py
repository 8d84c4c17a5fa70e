"""Stage `intervene`: does removing what the discovery side found remove the prejudice on prompts
it was not found on, and what does the removal cost the model?

On the first `intervene.prompts` held-out prompts (pipeline/data/splits.py), with the metric
oriented to AAE (the score is m(AAE) - m(SAE) in either direction), for sizes from one component
to all of them (pipeline/interventions.py):
- heads: the top k by the run's ranking (attribution patching of head outputs on the discovery
  prompts, else exact patching, else head attribution's clean - corrupted difference) made
  dialect-blind (`intervene.mode=blind`: each head's output on the AAE prompt is its output on the
  matched SAE prompt) or mean-ablated over the guises (`mean`);
- direction: per layer, the mean difference of the last token's residual between the guises on
  discovery prompts, projected out of the residual stream entering the k layers where it
  separates the guises most;
- edges: the circuit stage's top-k edges (by |score| on discovery prompts) set to their SAE values,
  through the circuit stage's exact evaluation.
Each at each size beside `intervene.random_draws` random choices of the same size (random heads,
random unit directions at the same layers, random edges): the band a real effect has to leave.
Measured: the score left and the share removed, with pair-bootstrap intervals; the cost, as the KL
divergence of the last token's next-token distribution from the unintervened model on SAE prompts
(and on AAE prompts) and the change of the loss on the utterance's tokens; at `intervene.size`
heads and at every layer's direction, the association table of every attribute (multi-token ones
by the chain rule) and the gaps of tasks never used for discovery (`intervene.tasks`).
Checkpointed per chunk of prompts: a killed stage resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from pipeline import figures
from pipeline.artifacts import (read_json, read_table, read_tensors, safe_open_metadata, write_figure, write_json,
                                write_table, write_tensors)
from pipeline.data.builder import build_rows
from pipeline.data.dataset import pair_prompts
from pipeline.data.ratings import packaged_ratings
from pipeline.data.resources import load_templates
from pipeline.data.scoring import attribute_tokens, score_attributes
from pipeline.errors import PipelineError
from pipeline.interventions import ComponentSwap, DirectionAblation, dialect_directions, guise_caches, matched_positions, measure
from pipeline.metrics import LINEAR_METRICS
from pipeline.nulls import DETECTABLE, pairs_needed
from pipeline.power import per_pair_sd
from pipeline.stages.data import GUISE_LOGPROBS
from pipeline.stats import bootstrap_counts, summarize

log = logging.getLogger(__name__)
AAE_CLEAN = SimpleNamespace(clean="aae", corrupted="sae", name="aae_clean")  # the interventions' orientation
MEASURES = ("metric_aae", "metric_sae", "kl_aae", "kl_sae", "loss_aae", "loss_sae")


def log_sizes(n: int, count: int, extra=()) -> list[int]:
    """`count` log-spaced sizes from 1 to n (and `extra` ones within range), increasing."""
    grid = np.unique(np.round(np.logspace(0, np.log10(max(n, 1)), max(int(count), 1))).astype(int))
    return sorted({int(k) for k in grid} | {int(k) for k in extra if 1 <= int(k) <= n})


def head_ranking(ctx) -> tuple[list[tuple[int, int]], str]:
    """Heads ordered by how much of the dialect's effect they carry on the discovery prompts: the
    effect of patching the head's clean output (attribution patching, else exact), else its direct
    attribution's clean - corrupted difference; either way signed toward the clean - corrupted gap."""
    tables = ctx.tables
    for name, what in (("attrpatch_head_out.csv", "attribution patching of head outputs (discovery prompts)"),
                       ("patch_head_out.csv", "exact patching of head outputs (discovery prompts)")):
        if (tables / name).exists():
            t = read_table(tables / name)
            t = t[t.part == "output"]  # normalized_mean > 0: the clean head moves the metric toward the clean run
            key = np.where(np.isfinite(t.normalized_mean), t.normalized_mean, -np.inf)
            order = np.argsort(-key, kind="stable")
            return [(int(t.layer.iloc[i]), int(float(t["head"].iloc[i]))) for i in order], what
    path = tables / "head_attribution_both_sides.csv"
    if path.exists():
        t = read_table(path)
        t = t[t.side == "difference"]
        gap = read_json(tables / "baseline.json")
        sign = np.sign(gap["clean_mean"] - gap["corrupted_mean"]) or 1.0
        order = np.argsort(-(sign * t["mean"].to_numpy()), kind="stable")
        return [(int(t.layer.iloc[i]), int(t["head"].iloc[i])) for i in order], "head attribution, clean - corrupted (discovery prompts)"
    raise PipelineError("stage intervene needs a ranking of heads: run the patching or the attribution stage first "
                        "(stage=all runs both)")


def separation(directions: dict[int, torch.Tensor]) -> list[int]:
    """Layers whose dialect direction is not zero, largest norm first. (The first layer's input at
    the last token is that token's embedding, the same in both guises of a rotary model: no
    direction to remove there.)"""
    largest = max(float(d.norm()) for d in directions.values())
    moving = [l for l, d in directions.items() if float(d.norm()) > 1e-6 * max(largest, 1e-12)]
    return sorted(moving, key=lambda l: -float(directions[l].norm()))


def bootstrap_ratio(base: np.ndarray, left: np.ndarray, units, n_boot: int, seed: int) -> tuple[float, float, float]:
    """1 - mean(left) / mean(base): the share of the score removed, with a 95% pair-bootstrap interval."""
    counts = bootstrap_counts(len(base), n_boot, seed, units).numpy()
    b = counts @ base / counts.sum(1)
    l_ = counts @ left / counts.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = 1 - l_ / b
    value = 1 - left.mean() / base.mean() if base.mean() else np.nan
    lo, hi = np.nanpercentile(ratios, [2.5, 97.5]) if np.isfinite(ratios).any() else (np.nan, np.nan)
    return float(value), float(lo), float(hi)


def bootstrap_mean(x: np.ndarray, units, n_boot: int, seed: int) -> tuple[float, float, float]:
    """The mean of per-prompt values with its 95% pair-bootstrap interval (pipeline/stats.py)."""
    s = summarize(torch.as_tensor(x, dtype=torch.float64)[None], n_boot, seed, units)
    return float(s["mean"][0]), float(s["ci_low"][0]), float(s["ci_high"][0])


def measure_checkpointed(ctx, model, pairs, interventions: dict, batch_size: int, chunk: int, name: str) -> dict:
    """`measure` over chunks of `chunk` prompts, saved after each under tensors/.partial/, so a killed
    stage resumes at the first unfinished chunk."""
    path = ctx.tensors / ".partial" / f"{name}.safetensors"
    done = {}
    if path.exists() and json.loads(safe_open_metadata(path).get("names", "[]")) == sorted(interventions):
        done = read_tensors(path)
    n_done = len(next(iter(done.values()))) if done else 0
    if n_done:
        log.info("intervene: resuming %s at prompt %d of %d", name, n_done, len(pairs))
    for start in range(n_done, len(pairs), chunk):
        rows = list(range(start, min(start + chunk, len(pairs))))
        part = measure(model, pairs.take(rows), interventions, batch_size, desc=f"intervene {name} {start}/{len(pairs)}")
        for key, per in part.items():
            for m, v in per.items():
                done[f"{key}/{m}"] = torch.cat([done[f"{key}/{m}"], v]) if f"{key}/{m}" in done else v
        write_tensors(path, done, metadata={"names": json.dumps(sorted(interventions))})
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in done.items():
        n, m = key.rsplit("/", 1)
        out.setdefault(n, {})[m] = v
    return out


def effect_row(kind: str, selection: str, size: int, base: np.ndarray, left: np.ndarray, units, n_boot: int,
               seed: int, share: bool) -> dict:
    """The score left after an intervention and the score it removed (base - left, per prompt), in
    metric units with pair-bootstrap intervals; the share removed only where `share` (the
    unintervened score is distinguishable from 0: a ratio to a score that may be 0 means nothing)."""
    score, lo, hi = bootstrap_mean(left, units, n_boot, seed)
    drop, dlo, dhi = bootstrap_mean(base - left, units, n_boot, seed)
    removed, rlo, rhi = bootstrap_ratio(base, left, units, n_boot, seed) if share else (np.nan, np.nan, np.nan)
    return {"kind": kind, "selection": selection, "size": size, "score_left": score, "score_ci_low": lo, "score_ci_high": hi,
            "score_removed": drop, "score_removed_ci_low": dlo, "score_removed_ci_high": dhi,
            "share_removed": removed, "share_removed_ci_low": rlo, "share_removed_ci_high": rhi}


def curve_rows(kind: str, results: dict, labels: dict, base: np.ndarray, units, n_boot: int, seed: int,
               share: bool) -> list[dict]:
    """One row per intervention of a kind: its size, selection, score left and removed, cost."""
    rows = []
    for name, (selection, size) in labels.items():
        r = {k: v.double().numpy() for k, v in results[name].items()}
        row = effect_row(kind, selection, size, base, r["metric_aae"] - r["metric_sae"], units, n_boot, seed, share)
        for m in ("kl_sae", "kl_aae", "loss_sae", "loss_aae"):
            mean, mlo, mhi = bootstrap_mean(r[m], units, n_boot, seed)
            row.update({m: mean, f"{m}_ci_low": mlo, f"{m}_ci_high": mhi})
        rows.append(row)
    return rows


def heldout_pairs(ctx, rows: list[int]):
    """The held-out rows as AAE/SAE pairs with the metric oriented to AAE, whatever the run's direction."""
    df = ctx.dataset.iloc[rows].reset_index(drop=True)
    return pair_prompts(ctx.model, df, AAE_CLEAN, bool(ctx.cfg.model.prepend_bos), ctx.rated), df


def run(ctx) -> None:
    cfg, model = ctx.cfg, ctx.model
    icfg = cfg.intervene
    metric = str(cfg.metric.name)
    if metric not in LINEAR_METRICS:
        raise PipelineError(f"metric={metric}: the intervene stage measures a linear metric (logit_diff, favorability, prestige)")
    held = ctx.side_rows("heldout")
    if not held:
        raise PipelineError("stage intervene measures on held-out prompts and this run has none: set dataset.split.heldout "
                            "above 0 (the default holds out half the pairs)")
    rows = held[: int(icfg.prompts)] if icfg.prompts is not None else held
    pairs, df = heldout_pairs(ctx, rows)
    units = list(df["pair_id"]) if "pair_id" in df and df["pair_id"].astype(bool).all() else list(range(len(df)))
    bs, n_boot, seed = int(cfg.batch_size), int(icfg.bootstrap), int(cfg.seed)
    draws = int(icfg.random_draws)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    log.info("intervene: %d held-out prompts from %d pairs, %s interventions, %d random draws per size", len(pairs),
             len(set(units)), "/".join(icfg.kinds), draws)
    interventions, labels = {}, {}
    g = torch.Generator().manual_seed(seed)
    all_heads = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    size = min(int(icfg.size), len(all_heads))  # the number of heads the report quotes

    if "heads" in icfg.kinds:
        ranked, source = head_ranking(ctx)
        log.info("intervene: heads ranked by %s; top 5: %s", source, ", ".join(f"L{l}H{h}" for l, h in ranked[:5]))
        labels["heads"] = {}
        for k in log_sizes(len(all_heads), icfg.n_sizes, [size]):
            interventions[f"heads/top/{k}"] = ComponentSwap(ranked[:k], mode=str(icfg.mode))
            labels["heads"][f"heads/top/{k}"] = ("top", k)
            for d in range(draws if k < len(all_heads) else 0):  # every head: a random draw is the same set
                pick = torch.randperm(len(all_heads), generator=g)[:k].tolist()
                interventions[f"heads/random{d}/{k}"] = ComponentSwap([all_heads[i] for i in pick], mode=str(icfg.mode))
                labels["heads"][f"heads/random{d}/{k}"] = (f"random{d}", k)

    direction_layers = []
    if "direction" in icfg.kinds:
        discovery = ctx.discovery.head(int(icfg.direction_prompts))
        started = time.perf_counter()
        directions = dialect_directions(model, discovery, bs)
        direction_layers = separation(directions)
        log.info("intervene: dialect directions from %d discovery prompts in %.1f s; largest at layers %s", len(discovery),
                 time.perf_counter() - started, direction_layers[:5])
        write_tensors(ctx.tensors / "dialect_directions.safetensors", {"directions": torch.stack([directions[l] for l in range(n_layers)])},
                      metadata={"axes": "[layer, d_model]: mean (AAE - SAE) residual entering each layer at the last token",
                                "prompts": f"first {len(discovery)} discovery prompts"})
        labels["direction"] = {}
        for k in log_sizes(len(direction_layers), icfg.n_sizes):
            chosen = direction_layers[:k]
            interventions[f"direction/top/{k}"] = DirectionAblation({l: directions[l] for l in chosen})
            labels["direction"][f"direction/top/{k}"] = ("top", k)
            for d in range(draws):
                random = {l: torch.randn(model.cfg.d_model, generator=g) for l in chosen}
                interventions[f"direction/random{d}/{k}"] = DirectionAblation(random)
                labels["direction"][f"direction/random{d}/{k}"] = (f"random{d}", k)

    started = time.perf_counter()
    results = measure_checkpointed(ctx, model, pairs, interventions, bs, int(icfg.checkpoint_every), "intervene")
    log.info("intervene: %d interventions on %d held-out prompts in %.1f s", len(interventions), len(pairs),
             time.perf_counter() - started)
    base = (results["none"]["metric_aae"] - results["none"]["metric_sae"]).double().numpy()
    score = bootstrap_mean(base, units, n_boot, seed)
    share = score[1] > 0 or score[2] < 0  # a share of a score that may be 0 means nothing
    if not share:
        log.info("intervene: the held-out score %+.4f [%+.4f, %+.4f] on %d prompts is not distinguishable from 0: "
                 "what each intervention removes is given in metric units only", *score, len(pairs))
    curve = []
    for kind, named in labels.items():
        curve += curve_rows(kind, results, named, base, units, n_boot, seed, share)

    if "edges" in icfg.kinds:
        curve += edge_removal(ctx, pairs.head(int(icfg.edge_prompts)), units[: int(icfg.edge_prompts)], n_boot, seed, draws)

    table = pd.DataFrame(curve)
    write_table(ctx.tables / "intervention_curve.csv", table)
    tensors = {f"{name}/{m}": v for name, per in results.items() for m, v in per.items()}
    write_tensors(ctx.tensors / "intervene.safetensors", tensors,
                  metadata={"axes": "[held-out prompt]", "rows": json.dumps(rows), "measures": json.dumps(MEASURES)})

    chosen = {"none": None}
    if "heads" in icfg.kinds:
        chosen[f"heads/top/{size}"] = interventions[f"heads/top/{size}"]
        if f"heads/random0/{size}" in interventions:
            chosen[f"heads/random0/{size}"] = interventions[f"heads/random0/{size}"]
    if direction_layers:
        chosen[f"direction/top/{len(direction_layers)}"] = interventions[f"direction/top/{len(direction_layers)}"]
    associations = association_change(ctx, pairs, rows, chosen, int(icfg.association_prompts)) if icfg.association_prompts else None
    tasks = task_gaps(ctx, df, chosen, n_boot, seed) if icfg.tasks else None

    summary = reported_numbers(ctx, table, score, len(pairs), len(set(units)), associations, tasks, size)
    summary["power"] = heldout_power(base, units, score[0])
    write_json(ctx.tables / "intervention_summary.json", summary)
    write_figure(ctx.figures / "intervention_dose_response.html", figures.dose_response(table, score, metric))
    for line in summary["sentences"]:
        log.info("intervene: %s", line)
    (ctx.tensors / ".partial" / "intervene.safetensors").unlink(missing_ok=True)


def edge_removal(ctx, pairs, units, n_boot: int, seed: int, draws: int) -> list[dict]:
    """The circuit stage's top-k edges, and random edges, set to their SAE values on held-out
    prompts (the circuit stage's exact evaluation with every other edge kept), at its sizes."""
    from pipeline.circuit import edges
    from pipeline.circuit.faithfulness import edge_counts, random_circuits, size_grid, top_circuits
    from pipeline.circuit.graph import Graph, edge_hooks
    from pipeline.stages.patching import PartCheckpoint

    summary_path = ctx.tables / "circuit_summary.json"
    if not summary_path.exists():
        log.info("intervene: no circuit stage in this run, so no edge removal")
        return []
    method = read_json(summary_path)["methods"][0]
    scores = read_tensors(ctx.tensors / f"circuit_scores_{method}.safetensors")["mean"]
    c = ctx.cfg.circuit
    counts = edge_counts(size_grid(float(c.smallest), int(ctx.cfg.intervene.n_sizes)), len(scores))
    blocks = {"none": torch.ones(1, len(scores), dtype=torch.bool)}
    blocks["top"] = ~top_circuits(scores, counts)
    for d in range(draws):
        blocks[f"random{d}"] = ~random_circuits(len(scores), counts, int(ctx.cfg.seed) + 1 + d)
    model = ctx.model
    started = time.perf_counter()
    with edge_hooks(model):
        ck = PartCheckpoint(ctx.tensors / ".partial" / "intervene_edges.safetensors", int(c.checkpoint_every))
        done, values = ck.load()
        m = edges.evaluate(model, pairs, torch.cat(list(blocks.values())), str(ctx.cfg.metric.name), int(c.batch_size),
                           int(c.rows_per_run), done, values, on_progress=ck, desc="intervene edges")
        ck.remove()
        assert Graph.of(model).n_edges == len(scores)
    log.info("intervene: edge removal, %d circuits on %d held-out prompts in %.1f s", sum(len(b) for b in blocks.values()),
             len(pairs), time.perf_counter() - started)
    with torch.no_grad():
        from pipeline.forward import map_last_logits

        sae = map_last_logits(model, pairs.corrupted, int(c.batch_size), lambda lg, r: pairs.answers[r].values(lg)).double().numpy()
    split = dict(zip(blocks, torch.split(m, [len(b) for b in blocks.values()])))
    base = split["none"][0].double().numpy() - sae
    score = bootstrap_mean(base, units, n_boot, seed)
    share = score[1] > 0 or score[2] < 0
    return [effect_row("edges", selection, k, base, split[selection][i].double().numpy() - sae, units, n_boot, seed, share)
            for selection in [k for k in blocks if k != "none"] for i, k in enumerate(counts)]


def association_change(ctx, pairs, rows, chosen: dict, n: int) -> pd.DataFrame:
    """For each chosen intervention on the first n held-out prompts: the association of every
    attribute (log p(a|AAE) - log p(a|SAE), multi-token ones by the chain rule) with and without
    it: their correlation over attributes, and the mean favorability of the top-5 AAE-associated."""
    path = ctx.tensors / GUISE_LOGPROBS
    if ctx.cfg.dataset.path or not path.exists():
        log.info("intervene: no probing record (a CSV dataset), so no association tables under intervention")
        return None
    names = json.loads(safe_open_metadata(path)["columns"])
    stored = read_tensors(path)
    index = torch.as_tensor(rows[:n])
    plain = (stored["aae"][index] - stored["sae"][index]).double().mean(0).numpy()
    model, bs = ctx.model, int(ctx.cfg.batch_size)
    attrs = attribute_tokens(model, names)
    sub = pairs.head(n)
    favorability = packaged_ratings("favorability")
    out = []
    if np.isnan(plain).any():  # multi-token attributes probed on a sample that misses these prompts: probe them here
        plain = None
    for name, intervention in chosen.items():
        if intervention is None and plain is not None:
            assoc = plain
        else:
            logp = {}
            for guise, side in (("aae", "clean"), ("sae", "corrupted")):
                logp[guise] = score_attributes(model, getattr(sub, side), attrs, bs,
                                               hooks_for=intervention_hooks(model, sub, intervention, guise))
            assoc = (logp["aae"] - logp["sae"]).double().mean(0).numpy()
            plain = assoc if intervention is None else plain
        top = [names[i] for i in np.argsort(-assoc, kind="stable")[:5]]
        rated = [favorability[a.lower()] for a in top if a.lower() in favorability]
        out.append({"intervention": name, "prompts": len(sub), "correlation_with_none": float(np.corrcoef(assoc, plain)[0, 1]),
                    "top5_aae": ", ".join(top), "favorability_top5_aae": float(np.mean(rated)) if rated else np.nan})
    table = pd.DataFrame(out)
    write_table(ctx.tables / "intervention_associations.csv", table)
    return table


def intervention_hooks(model, pairs, intervention, guise: str):
    """score_attributes' hooks for the micro-batch of prompts `index`: the intervention's hooks for
    `guise`, with both guises' activations of those prompts where it reads them."""
    from pipeline.forward import model_device

    def hooks_for(index: torch.Tensor):
        if intervention is None or not intervention.changes(guise):
            return []
        rows = index.tolist()
        device = model_device(model)
        batches = {"aae": pairs.clean.take(rows).to(device), "sae": pairs.corrupted.take(rows).to(device)}
        caches = guise_caches(model, batches, intervention.cached)
        return intervention.hooks(guise, caches, matched_positions(pairs, rows, device))
    return hooks_for


def task_gaps(ctx, df: pd.DataFrame, chosen: dict, n_boot: int, seed: int) -> pd.DataFrame | None:
    """The gap m(AAE) - m(SAE) of tasks never used for discovery (their fixed answer pairs, the
    held-out utterances in their templates), with and without each chosen intervention."""
    needed = {"utterance_aae", "utterance_sae", "pair_id", "feature", "pronoun"}
    if not needed <= set(df.columns):
        log.info("intervene: the dataset has no utterance columns (a CSV), so no other tasks")
        return None
    pairs_df = df[["pair_id", "feature", "pronoun", "utterance_aae", "utterance_sae"]].drop_duplicates() \
        .rename(columns={"utterance_aae": "aae", "utterance_sae": "sae"}).reset_index(drop=True)
    out = []
    for task, answer_pair in ctx.cfg.intervene.tasks.items():
        rows = build_rows(pairs_df, load_templates(str(task))).head(int(ctx.cfg.intervene.task_prompts))
        rows.insert(2, "best_attr_aae", str(answer_pair[0]))
        rows.insert(3, "best_attr_sae", str(answer_pair[1]))
        pairs = pair_prompts(ctx.model, rows, AAE_CLEAN, bool(ctx.cfg.model.prepend_bos))
        results = measure(ctx.model, pairs, {k: v for k, v in chosen.items() if v is not None}, int(ctx.cfg.batch_size),
                          desc=f"intervene task {task}")
        units = list(rows.pair_id)
        for name in ["none", *[k for k in chosen if k != "none"]]:
            gap = (results[name]["metric_aae"] - results[name]["metric_sae"]).double().numpy()
            mean, lo, hi = bootstrap_mean(gap, units, n_boot, seed)
            out.append({"task": str(task), "answers": f"{answer_pair[0]} / {answer_pair[1]}", "intervention": name,
                        "prompts": len(rows), "gap": mean, "ci_low": lo, "ci_high": hi})
    table = pd.DataFrame(out)
    write_table(ctx.tables / "intervention_tasks.csv", table)
    return table


def heldout_power(base: np.ndarray, units, score: float) -> dict:
    """What this stage's held-out prompts can see (pipeline/power.py): the spread of the pair
    means, the smallest detectable score at this pair count, and the pairs this score would need."""
    n_pairs = len(set(units))
    sd = per_pair_sd(base, units)
    detectable = float(DETECTABLE * sd / np.sqrt(n_pairs)) if np.isfinite(sd) else float("nan")
    return {"sd_per_pair": sd, "detectable": detectable,
            "pairs_needed": pairs_needed(n_pairs, detectable, score) if np.isfinite(detectable) else float("nan")}


def reported_numbers(ctx, table: pd.DataFrame, score, n_prompts: int, n_pairs: int, associations, tasks, size: int) -> dict:
    """The numbers the report states: for each kind at the report size, the score the top components
    remove (metric units; the share too where the held-out score is distinguishable from 0) against
    the band of random ones, and the cost."""
    distinct = score[1] > 0 or score[2] < 0
    out = {"metric": str(ctx.cfg.metric.name), "prompts": n_prompts, "pairs": n_pairs, "score_distinct_from_zero": distinct,
           "heldout_score": {"mean": score[0], "ci_low": score[1], "ci_high": score[2]}, "at": {}, "sentences": []}
    for kind in table.kind.unique():
        t = table[table.kind == kind]
        k = size if kind == "heads" else int(t["size"].max()) if kind == "direction" else int(t["size"].median())
        k = int(t["size"].iloc[np.argmin(np.abs(t["size"].to_numpy() - k))])
        top = t[(t.selection == "top") & (t["size"] == k)].iloc[0]
        rand = t[t.selection.str.startswith("random") & (t["size"] == k)]
        entry = {"size": k, "score_removed": top.score_removed, "score_removed_ci": [top.score_removed_ci_low, top.score_removed_ci_high],
                 "random_score_removed": [float(rand.score_removed.min()), float(rand.score_removed.max())] if len(rand) else None,
                 "share_removed": top.share_removed, "share_removed_ci": [top.share_removed_ci_low, top.share_removed_ci_high],
                 "random_share_removed": [float(rand.share_removed.min()), float(rand.share_removed.max())] if len(rand) else None,
                 "kl_sae": float(top["kl_sae"]) if "kl_sae" in top and np.isfinite(top["kl_sae"]) else None,
                 "loss_aae": float(top["loss_aae"]) if "loss_aae" in top and np.isfinite(top["loss_aae"]) else None}
        out["at"][kind] = entry
        what = {"heads": f"the top {k} heads", "direction": f"the dialect direction at {k} layers",
                "edges": f"the top {k} edges"}[kind]
        random_what = {"heads": f"{k} random heads", "direction": f"random directions at the same {k} layers",
                       "edges": f"{k} random edges"}[kind]
        cost = ""
        if kind == "heads" and str(ctx.cfg.intervene.mode) == "blind" and entry["loss_aae"] is not None:
            # The swap touches the AAE prompt only at role-matched positions: the utterance's own
            # predictions change only where both utterances have the same token count.
            cost = (f"; SAE prompts are unchanged by construction (KL 0), and the loss on the AAE utterance's tokens "
                    f"changes by {entry['loss_aae']:+.4f} nats, but only where both utterances have the same token count, "
                    f"so a blind swap has no full cost measure (intervene.mode=mean has one: its KL on SAE prompts)")
        elif entry["kl_sae"] is not None:
            cost = f", at a KL cost of {entry['kl_sae']:.4f} nats on SAE prompts"
            if entry["loss_aae"] is not None:
                cost += f" and a loss change of {entry['loss_aae']:+.4f} nats on the AAE utterance's tokens"
        elif kind == "edges":
            cost = "; its cost to the model is not measured (the circuit's exact evaluation reads the metric only)"
        if distinct:
            band = (f"[{entry['random_share_removed'][0]:.0%}, {entry['random_share_removed'][1]:.0%}]"
                    if entry["random_share_removed"] else "(no draws)")
            line = (f"removing {what} removes {top.share_removed:.0%} [{top.share_removed_ci_low:.0%}, "
                    f"{top.share_removed_ci_high:.0%}] of the held-out score against {band} for {random_what}{cost}")
        else:
            band = (f"[{entry['random_score_removed'][0]:+.4f}, {entry['random_score_removed'][1]:+.4f}]"
                    if entry["random_score_removed"] else "(no draws)")
            line = (f"removing {what} lowers the held-out score by {top.score_removed:+.4f} [{top.score_removed_ci_low:+.4f}, "
                    f"{top.score_removed_ci_high:+.4f}] ({ctx.cfg.metric.name} units; {top.score_left:+.4f} left) against "
                    f"{band} for {random_what}{cost}")
        out["sentences"].append(line)
    if associations is not None:
        out["associations"] = associations.to_dict("records")
    if tasks is not None:
        out["tasks"] = tasks.to_dict("records")
    return out
