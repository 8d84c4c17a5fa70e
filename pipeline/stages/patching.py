"""Stage `patching`: the notebook's "Activation Patching" section, denoising: each cell copies
one clean activation into the corrupted run. Every cell's effect is reported in metric units (the
patched metric minus the corrupted run's, per prompt, with its pair-bootstrap interval), and beside
it the normalized metric of the notebook (the effect divided by the clean - corrupted gap of the
metric: 0 = corrupted performance, 1 = clean); a small gap makes the normalized value noisy, the
effect in metric units is not.

Exact sweeps (resid_pre, block, head_out, head_parts) run on the first `patching.max_prompts`
discovery prompts (pipeline/data/splits.py) with the engine of `patching.engine`, checkpointed so a killed run resumes without
redoing finished cells; attribution patching estimates the same cells on the first
`patching.attribution_prompts` discovery prompts (null: every one; distinct pairs first) and is
scored against the exact sweeps (Pearson r, top-10 overlap).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch

from pipeline import figures
from pipeline.architecture import discards_pattern_edits
from pipeline.artifacts import read_tensors, write_figure, write_table, write_tensors
from pipeline.errors import PipelineError
from pipeline.metrics import LINEAR_METRICS, Anchors, check_metric
from pipeline.patching import attribution_patching
from pipeline.patching.engine import run_cells
from pipeline.patching.sweeps import PART_TITLES, PARTS, SWEEPS, axis_size, cells_of, check_sweeps
from pipeline.stats import fdr_over, summary_table, units_of

log = logging.getLogger(__name__)


class PartCheckpoint:
    """Partial results of one part's cells, saved every `every` cells under tensors/.partial/."""

    def __init__(self, path, every: int):
        self.path, self.every, self.since = path, max(int(every), 1), 0  # since: cells done at the last save
        self.latest = None  # (done, values) as the engine last reported them

    def load(self):
        if not self.path.exists():
            return None, None
        t = read_tensors(self.path)
        self.since = int(t["done"].sum())
        log.info("resuming %s: %d of %d cells done", self.path.name, int(t["done"].sum()), t["done"].numel())
        return t["done"], t["values"]

    def __call__(self, done, values) -> None:
        self.latest = (done, values)
        now = int(done.sum())
        if now - self.since >= self.every or bool(done.all()):
            self.flush()

    def flush(self) -> None:
        """Save every cell finished so far (also when a signal stops the sweep between saves)."""
        if self.latest is not None and int(self.latest[0].sum()) > self.since:
            done, values = self.latest
            self.since = int(done.sum())
            write_tensors(self.path, {"done": done, "values": values})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def anchors_for(ctx, rows: list[int]) -> Anchors:
    """Mean clean and corrupted metric of the dataset rows `rows` (from the cache stage)."""
    base = read_tensors(ctx.tensors / "baseline.safetensors")
    index = torch.as_tensor(rows, dtype=torch.long)
    anchors = Anchors.from_values(base["clean_metric"][index], base["corrupted_metric"][index])
    if abs(anchors.clean - anchors.corrupted) < 1e-6:
        raise PipelineError("clean and corrupted mean metric are equal on the patching prompts: the normalized metric is undefined")
    return anchors


def axis_labels(model, pairs, part: str) -> list[str]:
    axis = PARTS[part][1]
    if axis == "role":
        return [pairs.role_label(r) for r in range(len(pairs.role_names))]
    return [str(h) for h in range(axis_size(model, pairs, axis))]


def long_table(sweep: str, part: str, values: torch.Tensor, labels: list[str], axis: str, features, n_boot, seed,
               n_perm: int = 1000, alpha: float = 0.05, units=None, gap: float | None = None) -> pd.DataFrame:
    """[layer, x, prompt] effects (metric units) -> one row per cell with mean, sem, 95% interval,
    the smallest detectable effect, n and per-feature means; with `gap` (clean - corrupted mean
    metric) the normalized mean and interval beside them."""
    n_layers, n_x = values.shape[:2]
    keys = pd.DataFrame([(sweep, part, l, x if axis != "role" else "", labels[x] if axis == "role" else "")
                         for l in range(n_layers) for x in range(n_x)], columns=["sweep", "part", "layer", "head", "role"])
    table = summary_table(values.reshape(n_layers * n_x, -1), keys, features, n_boot, seed, n_perm, alpha, units)
    if gap is not None:
        at = table.columns.get_loc("ci_high") + 1
        for k, column in enumerate(("mean", "ci_low", "ci_high")):
            table.insert(at + k, f"normalized_{column}", table[column] / gap)
    return table


def split_fdr(tables: list[pd.DataFrame], alpha: float) -> list[pd.DataFrame]:
    """The parts' tables of one sweep with Benjamini-Hochberg redone over all their rows together."""
    joined = fdr_over(pd.concat(tables, ignore_index=True), alpha)
    bounds = np.cumsum([0] + [len(t) for t in tables])
    return [joined.iloc[a:b].reset_index(drop=True) for a, b in zip(bounds[:-1], bounds[1:])]


def hover_text(table: pd.DataFrame, shape) -> np.ndarray:
    return np.array([f"layer {r.layer}, {r.role or 'head ' + str(r.head)}<br>effect {r['mean']:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}], "
                     f"n={r.n_prompts}<br>normalized {r.normalized_mean:+.3f} [{r.normalized_ci_low:+.3f}, {r.normalized_ci_high:+.3f}]"
                     f"<br>sign-flip p {r.p_signflip:.3g}{' (BH significant)' if r.significant_bh else ''}; detectable {r.detectable:.4f}"
                     for _, r in table.iterrows()]).reshape(shape)


def run(ctx) -> None:
    check_metric(str(ctx.cfg.metric.name), LINEAR_METRICS,
                 "the patching stage (its fast engine projects on the metric's direction; use stage=circuit for other metrics)")
    # Everything here is found on the discovery side of the split (pipeline/data/splits.py).
    cfg, model, pairs_all, dataset = ctx.cfg, ctx.model, ctx.discovery, ctx.discovery_dataset
    rows = ctx.side_rows("discovery")
    pcfg = cfg.patching
    sweeps = check_sweeps(pcfg.sweeps)
    if pcfg.engine not in ("fast", "reference"):
        raise PipelineError(f"patching.engine={pcfg.engine!r} is not one of fast, reference")
    n_exact = len(pairs_all) if pcfg.max_prompts is None else min(int(pcfg.max_prompts), len(pairs_all))
    pairs = pairs_all.head(n_exact)
    anchors = anchors_for(ctx, rows[:n_exact])
    features = list(dataset["feature"]) if "feature" in dataset else None
    bs, n_boot, seed = int(cfg.batch_size), int(pcfg.bootstrap), int(cfg.seed)
    n_perm, alpha = int(cfg.nulls.permutations), float(cfg.nulls.fdr)
    log.info("patching: exact sweeps %s on %d discovery prompts (%s engine), anchors clean %.4f corrupted %.4f",
             sweeps, n_exact, pcfg.engine, anchors.clean, anchors.corrupted)

    parts = list(dict.fromkeys(p for s in sweeps for p in SWEEPS[s]))
    if "pattern" in parts and discards_pattern_edits(model):
        raise PipelineError("patching.sweeps: head_parts patches the attention pattern, which the bridge cannot patch in "
                            f"this model's attention ({model.cfg.architecture}: its Hugging Face module computes the attention, "
                            "and an edited pattern is discarded); use patching.sweeps=[resid_pre,block,head_out]")
    exact = {}
    for part in parts:
        cells = cells_of(model, pairs, part)
        checkpoint = PartCheckpoint(ctx.tensors / ".partial" / f"patch_{part}.safetensors", pcfg.checkpoint_every)
        done, values = checkpoint.load()
        started = time.perf_counter()
        try:
            values, _ = run_cells(model, pairs, cells, bs, fast=pcfg.engine == "fast", done=done, values=values,
                                  on_progress=checkpoint, desc=f"patching {part}",
                                  rows_per_run=int(pcfg.rows_per_run))
        except BaseException:  # Ctrl-C, SIGTERM (pipeline/runner.py) or an error: keep the finished cells
            checkpoint.flush()
            raise
        log.info("patching %s: %d cells on %d prompts in %.1f s", part, len(cells), n_exact, time.perf_counter() - started)
        n_x = axis_size(model, pairs, PARTS[part][1])
        values = values.reshape(model.cfg.n_layers, n_x, len(pairs))
        exact[part] = anchors.effect(values)
        write_tensors(ctx.tensors / f"patch_{part}.safetensors",
                      {"effect": exact[part], "normalized": anchors.normalize(values), "metric": values},
                      metadata={"axes": f"[layer, {PARTS[part][1]}, prompt]", "labels": "|".join(axis_labels(model, pairs, part)),
                                "metric": str(cfg.metric.name), "anchor_clean": str(anchors.clean),
                                "anchor_corrupted": str(anchors.corrupted)})
        checkpoint.remove()

    approx = {}
    n_ap = len(pairs_all) if pcfg.get("attribution_prompts") is None else max(n_exact, min(int(pcfg.attribution_prompts), len(pairs_all)))
    if pcfg.attribution_patching:
        all_anchors = anchors_for(ctx, rows[:n_ap])
        started = time.perf_counter()
        raw = attribution_patching.estimate(model, pairs_all.head(n_ap), parts, bs, desc="attribution patching")
        log.info("attribution patching: %s on %d prompts in %.1f s", ", ".join(parts), n_ap, time.perf_counter() - started)
        approx = {p: all_anchors.effect(v) for p, v in raw.items()}
        write_tensors(ctx.tensors / "attrpatch.safetensors", {p: v for p, v in approx.items()},
                      metadata={"axes": "[layer, role-or-head, prompt] over all prompts", "values": "estimated effect, metric units",
                                "metric": str(cfg.metric.name), "anchor_clean": str(all_anchors.clean),
                                "anchor_corrupted": str(all_anchors.corrupted)})

    agreement = []
    for sweep in sweeps:
        tables, ap_tables = [], []
        for part in SWEEPS[sweep]:
            labels, axis = axis_labels(model, pairs, part), PARTS[part][1]
            tables.append(long_table(sweep, part, exact[part], labels, axis, features[:n_exact] if features else None, n_boot, seed,
                                     n_perm, alpha, units_of(dataset, n_exact), anchors.gap))
            if approx:
                ap_tables.append(long_table(sweep, part, approx[part], labels, axis, features[:n_ap] if features else None,
                                            n_boot, seed, n_perm, alpha, units_of(dataset, n_ap), all_anchors.gap))
                # Agreement on the prompts both ran on.
                ap_sub = anchors.effect(raw[part][..., :n_exact]).nanmean(-1).flatten().numpy()
                ex = exact[part].nanmean(-1).flatten().numpy()
                agreement.append({"sweep": sweep, "part": part, **agreement_scores(ex, ap_sub)})
        tables = split_fdr(tables, alpha)
        write_table(ctx.tables / f"patch_{sweep}.csv", pd.concat(tables, ignore_index=True))
        write_sweep_figure(ctx, model, pairs, sweep, tables, f"patch_{sweep}",
                           f"Activation patching: {sweep} ({n_exact} prompts, {cfg.metric.name}, {cfg.direction.name})")
        if approx:
            ap_tables = split_fdr(ap_tables, alpha)
            write_table(ctx.tables / f"attrpatch_{sweep}.csv", pd.concat(ap_tables, ignore_index=True))
            write_side_by_side(ctx, model, pairs, sweep, tables, ap_tables, n_ap)
    if agreement:
        table = pd.DataFrame(agreement).drop_duplicates(["part"])
        write_table(ctx.tables / "attrpatch_agreement.csv", table)
        write_agreement_figure(ctx, exact, raw, anchors, n_exact, model, pairs)
        for _, r in table.iterrows():
            log.info("attribution vs exact patching, %s: Pearson r %.3f, top-10 overlap %d/10", r.part, r.pearson_r, r.top10_overlap)


def agreement_scores(exact: np.ndarray, approx: np.ndarray) -> dict:
    ok = np.isfinite(exact) & np.isfinite(approx)
    e, a = exact[ok], approx[ok]
    r = float(np.corrcoef(e, a)[0, 1]) if len(e) > 2 and e.std() > 0 and a.std() > 0 else float("nan")
    k = min(10, len(e))
    top_e = set(np.argsort(-np.abs(e))[:k])
    top_a = set(np.argsort(-np.abs(a))[:k])
    return {"pearson_r": r, "top10_overlap": len(top_e & top_a), "n_cells": int(ok.sum())}


def grids(model, pairs, sweep, tables):
    zs, hovers, xs = [], [], []
    for part, table in zip(SWEEPS[sweep], tables):
        n_x = axis_size(model, pairs, PARTS[part][1])
        shape = (model.cfg.n_layers, n_x)
        zs.append(table["mean"].to_numpy().reshape(shape))
        hovers.append(hover_text(table, shape))
        xs.append(axis_labels(model, pairs, part))
    return zs, hovers, xs


def write_sweep_figure(ctx, model, pairs, sweep, tables, name, title) -> None:
    zs, hovers, xs = grids(model, pairs, sweep, tables)
    x_title = "position (role)" if PARTS[SWEEPS[sweep][0]][1] == "role" else "head"
    fig = figures.faceted_heatmaps(zs, [PART_TITLES[p] for p in SWEEPS[sweep]], xs, [str(l) for l in range(model.cfg.n_layers)],
                                   title + "<br><sup>effect in metric units: patched - corrupted (0 = no effect); hover: mean "
                                           "[95% interval], the normalized value (1 = clean restored) and the smallest detectable effect</sup>",
                                   x_title, "layer", hovers)
    write_figure(ctx.figures / f"{name}.html", fig)


def write_side_by_side(ctx, model, pairs, sweep, tables, ap_tables, n_all) -> None:
    ez, eh, xs = grids(model, pairs, sweep, tables)
    az, ah, _ = grids(model, pairs, sweep, ap_tables)
    x_title = "position (role)" if PARTS[SWEEPS[sweep][0]][1] == "role" else "head"
    fig = figures.heatmap_grid([ez, az], [f"exact, {len(pairs)} prompts", f"attribution patching, {n_all} prompts"],
                               [PART_TITLES[p] for p in SWEEPS[sweep]], xs, [str(l) for l in range(model.cfg.n_layers)],
                               f"Exact vs attribution patching: {sweep} (effect in metric units)", x_title, "layer", [eh, ah])
    write_figure(ctx.figures / f"attrpatch_{sweep}.html", fig)


def write_agreement_figure(ctx, exact, raw, anchors, n_exact, model, pairs) -> None:
    points = {}
    for part, values in exact.items():
        labels = axis_labels(model, pairs, part)
        names = [f"{part} L{l} {labels[x]}" for l in range(values.shape[0]) for x in range(values.shape[1])]
        approx = anchors.effect(raw[part][..., :n_exact]).nanmean(-1).flatten().numpy()
        points[PART_TITLES[part]] = (values.nanmean(-1).flatten().numpy(), approx, names)
    write_figure(ctx.figures / "attrpatch_vs_exact.html",
                 figures.scatter_agreement(points, f"Attribution patching against exact patching, per cell ({n_exact} prompts)"))
