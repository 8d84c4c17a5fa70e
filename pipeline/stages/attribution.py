"""Stage `attribution`: the notebook's "Logit Attribution" and "Attention Analysis", on the run's
metric (pipeline/metrics.py).

Logit lens, layer attribution and head attribution on clean and corrupted prompts (at each
prompt's real last token) and their difference, clean - corrupted: what the dialect changes in
each component's direct contribution, shown first in every figure. Each is summarized with pair
bootstrap intervals, sign-flip tests and per dialect feature; attention of the heads with the
largest positive and negative difference.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import torch
from markupsafe import Markup

from pipeline import figures
from pipeline.architecture import output_soft_cap
from pipeline.artifacts import read_tensors, safe_open_metadata, write_atomic, write_figure, write_table, write_tensors
from pipeline.attribution import attribute, full_attention
from pipeline.data.dataset import direction_sign
from pipeline.errors import PipelineError
from pipeline.forward import sum_tolerance
from pipeline.metrics import LINEAR_METRICS
from pipeline.pages import render
from pipeline.prompts import role_sort_key
from pipeline.stages.cache import metric_from_probing
from pipeline.stages.data import GUISE_ATTRIBUTION
from pipeline.stats import summarize, summary_table, units_of

log = logging.getLogger(__name__)
CLOSURE_ATOL = 1e-3


def top_heads(mean: torch.Tensor, k: int, sign: int) -> list[tuple[int, int]]:
    flat = (mean * sign).flatten()
    idx = torch.topk(flat, min(k, flat.numel())).indices
    return [(int(i) // mean.shape[1], int(i) % mean.shape[1]) for i in idx]


def run(ctx) -> None:
    cfg, model, pairs = ctx.cfg, ctx.model, ctx.pairs
    if str(cfg.metric.name) not in LINEAR_METRICS:
        log.info("attribution: direct logit attribution decomposes a linear metric; under metric=%s it decomposes the "
                 "answers' logit difference", cfg.metric.name)
    bs, n_boot, seed = int(cfg.batch_size), int(cfg.attribution.bootstrap), int(cfg.seed)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads

    results = from_probing(ctx)
    if results is None:
        results = {side: attribute(model, getattr(pairs, side), pairs.answers, bs, desc=f"attribution ({side})")
                   for side in ("clean", "corrupted")}
    cap = output_soft_cap(model)
    if cap is not None:
        log.info("attribution: the model soft-caps its logits at %g; attribution decomposes the metric before "
                 "the cap (the logit lens's final_post), which the layer terms must sum to", cap)
    for side, r in results.items():
        closes_to = r["model_metric"] if cap is None else r["logit_lens"][-1]
        gap = float((r["layer"].sum(0) - closes_to).abs().max())
        tolerance = sum_tolerance(ctx.dtype, r["layer"], CLOSURE_ATOL)
        if gap > tolerance:
            raise PipelineError(f"layer attribution does not sum to the model's metric on the {side} prompts "
                                f"(max gap {gap:.2e}, tolerance {tolerance:.1e} for {cfg.dtype})")
        log.info("%s: layer attribution closes to the model's metric within %.1e (tolerance %.1e for %s)",
                 side, gap, tolerance, cfg.dtype)

    labels = results["clean"]["labels"]
    tensors = {}
    for side, r in results.items():
        for key in ("logit_lens", "layer", "head", "model_metric"):
            tensors[f"{side}/{key}"] = r[key]
    write_tensors(ctx.tensors / "attribution.safetensors", tensors,
                  metadata={"logit_lens": json.dumps(labels["logit_lens"]), "layer": json.dumps(labels["layer"]),
                            "head": "[n_layers, n_heads, n_prompts]", "prompts": "rows of dataset.csv"})

    # Tables: one row per component, clean and corrupted side by side, and their difference per
    # prompt (side "difference"): what the dialect changes in each component, whose sign-flip test
    # over pairs is the guise-swap null of that component. Rankings are made on the discovery side
    # of the split (pipeline/data/splits.py); the tensors above hold every prompt.
    rows = ctx.side_rows("discovery")
    found = {side: {key: r[key][..., rows] for key in ("logit_lens", "layer", "head")} for side, r in results.items()}
    dataset = ctx.discovery_dataset
    features = list(dataset["feature"]) if "feature" in dataset else None
    log.info("attribution: tables and rankings on the %d discovery prompts of %d", len(rows), len(pairs))

    def table(key, keys):
        parts = []
        sides = {side: r[key] for side, r in found.items()}
        sides["difference"] = found["clean"][key] - found["corrupted"][key]
        for side, v in sides.items():
            values = v.reshape(-1, v.shape[-1])
            parts.append(summary_table(values, keys.assign(side=side), features, n_boot, seed,
                                       int(cfg.nulls.permutations), float(cfg.nulls.fdr), units_of(dataset)))
        return pd.concat(parts, ignore_index=True)

    lens = table("logit_lens", pd.DataFrame({"component": labels["logit_lens"]}))
    layer = table("layer", pd.DataFrame({"component": labels["layer"]}))
    grid = pd.DataFrame([(l, h, f"L{l}H{h}") for l in range(n_layers) for h in range(n_heads)], columns=["layer", "head", "name"])
    heads = table("head", grid)
    write_table(ctx.tables / "logit_lens.csv", lens)
    write_table(ctx.tables / "layer_attribution.csv", layer[layer.side == "clean"].drop(columns="side"))
    write_table(ctx.tables / "layer_attribution_both_sides.csv", layer)
    write_table(ctx.tables / "head_attribution.csv", heads[heads.side == "clean"].drop(columns="side"))
    write_table(ctx.tables / "head_attribution_both_sides.csv", heads)

    # The heads shown with their attention: the largest positive and negative clean - corrupted
    # difference, what the dialect changes in each head's direct contribution.
    difference = found["clean"]["head"] - found["corrupted"]["head"]
    diff_mean = summarize(difference, n_boot, seed)
    k = int(cfg.attribution.top_k_heads)
    positive, negative = top_heads(diff_mean["mean"], k, +1), top_heads(diff_mean["mean"], k, -1)
    diff_heads = heads[heads.side == "difference"].set_index("name")
    top = pd.concat([diff_heads.loc[[f"L{l}H{h}" for l, h in positive]].assign(sign="positive"),
                     diff_heads.loc[[f"L{l}H{h}" for l, h in negative]].assign(sign="negative")]).reset_index()
    write_table(ctx.tables / "top_heads.csv", top)
    log.info("top heads by clean - corrupted attribution: %s", ", ".join(f"{r['name']} {r['mean']:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]" for _, r in top.iterrows()))

    write_figures(ctx, lens, layer, heads, n_layers, n_heads, features)
    write_attention(ctx, positive, negative, results["clean"]["last_attention"])


def from_probing(ctx) -> dict | None:
    """The attributions the data stage kept from its probing pass (pipeline/attribution.py:
    LastTokenRecord), turned to this run's direction, with the model's own metric from the same
    pass for the closure check; None when there is no such record (a dataset given as a CSV) or
    it does not match this run's prompts and metric."""
    path = ctx.tensors / GUISE_ATTRIBUTION
    if ctx.cfg.dataset.path or not path.exists():
        return None
    ld = metric_from_probing(ctx)
    if ld is None:
        return None
    t, labels = read_tensors(path), json.loads(safe_open_metadata(path)["labels"])
    pairs, direction = ctx.pairs, ctx.cfg.direction
    sign = direction_sign(direction)  # the record is oriented to the AAE side
    same = t["answer_tokens"].shape == pairs.answers.tokens.shape and torch.equal(t["answer_tokens"], pairs.answers.tokens) \
        and torch.equal(sign * t["answer_weights"], pairs.answers.weights)
    out = {}
    for side, guise in (("clean", direction.clean), ("corrupted", direction.corrupted)):
        batch = getattr(pairs, side)
        last = t[f"{guise}/last"]
        if not same or last.shape != batch.last.shape or not torch.equal(last, batch.last.cpu()):
            log.info("attribution: the data stage's record does not match this run's prompts or metric; running a pass")
            return None
        out[side] = {key: sign * t[f"{guise}/{key}"] for key in ("logit_lens", "layer", "head")}
        out[side].update(model_metric=ld[side], labels=labels,
                         last_attention=[a[:, :, : int(n) + 1].float() for a, n in zip(t[f"{guise}/attention"], last)])
    log.info("attribution: read from the data stage's probing pass (one pass over each guise serves probing, "
             "the baseline and attribution)")
    return out


def band(table: pd.DataFrame, side: str):
    t = table[table.side == side]
    return t["mean"].to_numpy(), (t.ci_low.to_numpy(), t.ci_high.to_numpy())


SIDES = ("difference", "clean", "corrupted")  # in panel order: what the dialect changes first


def write_figures(ctx, lens, layer, heads, n_layers, n_heads, features) -> None:
    direction, metric = str(ctx.cfg.direction.name), str(ctx.cfg.metric.name)
    for name, table, title in (
        ("logit_lens", lens, "Logit lens: the metric read from the accumulated residual stream"),
        ("layer_attribution", layer, "The metric written directly by each layer (direct attribution)"),
    ):
        values, bands = {}, {}
        for side in SIDES:
            values[side], bands[side] = band(table, side)
        comp = list(table[table.side == "clean"].component)
        write_figure(ctx.figures / f"{name}.html", figures.difference_and_sides(
            values, bands, comp, f"{title} ({metric}, {direction}; mean and 95% interval)", metric))

    facets, hovers, marks = [], [], []
    for side in SIDES:
        t = heads[heads.side == side]
        z = t["mean"].to_numpy().reshape(n_layers, n_heads)
        facets.append(z)
        hovers.append(np.array([f"{n}: {m:+.4f} [{lo:+.4f}, {hi:+.4f}], sign-flip p {p:.3g}, BH q {q:.3g}, detectable {d:.4f}"
                                for n, m, lo, hi, p, q, d in zip(t.name, t["mean"], t.ci_low, t.ci_high, t.p_signflip, t.q_bh,
                                                                 t.detectable)]).reshape(n_layers, n_heads))
        marks.append(t.significant_bh.to_numpy().reshape(n_layers, n_heads))
    heads_x, layers_y = [str(h) for h in range(n_heads)], [str(l) for l in range(n_layers)]
    write_figure(ctx.figures / "head_attribution.html", figures.faceted_heatmaps(
        facets, ["clean - corrupted (what the dialect changes)", "clean prompts", "corrupted prompts"], heads_x, layers_y,
        f"The metric written directly by each head ({metric}, {direction}; hover: mean [95% interval]; circled: nonzero "
        f"after BH at {float(ctx.cfg.nulls.fdr):g})", "head", "layer", hovers, marks))

    if features and len(set(features)) > 1:
        diff = heads[heads.side == "difference"]
        cols = [c for c in diff.columns if c.startswith("mean_")]
        zs = [diff[c].to_numpy().reshape(n_layers, n_heads) for c in cols]
        hv = [np.array([f"{n} ({c[5:]}): {v:+.4f}" for n, v in zip(diff.name, diff[c])]).reshape(n_layers, n_heads) for c in cols]
        fig = figures.small_multiples(zs, [c[5:] for c in cols], heads_x, layers_y,
                                      f"Head attribution, clean - corrupted, per dialect feature ({metric}, {direction})",
                                      "head", "layer", hv)
        write_figure(ctx.figures / "head_attribution_by_feature.html", fig)


def write_attention(ctx, positive, negative, last_attention) -> None:
    """circuitsvis views of the example prompt and, per template, the last token's attention over
    role-labelled positions for the top heads."""
    import circuitsvis as cv

    model, pairs, cfg = ctx.model, ctx.pairs, ctx.cfg
    index = int(cfg.example.prompt_index)
    if not 0 <= index < len(pairs):
        raise PipelineError(f"example.prompt_index={index} is outside the dataset's {len(pairs)} prompts")
    batch = pairs.clean
    heads = positive + negative
    names = [f"L{l}H{h} ({'+' if (l, h) in positive else '-'})" for l, h in heads]
    pattern = full_attention(model, batch, index, heads)
    # One widget for all heads: each widget carries the whole circuitsvis bundle. `local_src`
    # inlines that bundle; the default string would load it from a CDN.
    view = cv.attention.attention_heads(attention=pattern, tokens=batch.str_tokens[index], attention_head_names=names)
    page = render("attention_heads.html.j2", widget=Markup(view.local_src), n_positive=len(positive),
                  n_negative=len(negative), index=index, prompt=repr(batch.prompts[index]))
    write_atomic(ctx.figures / "attention_top_heads.html", page)

    rows = [att[[l for l, _ in heads], [h for _, h in heads]] for att in last_attention]  # [top heads, tokens]
    templates = list(ctx.dataset["template"]) if "template" in ctx.dataset else ["all prompts"] * len(batch)
    per_template, roles = {}, set()
    for i, att in enumerate(rows):
        by_role = {}
        for pos, role in enumerate(batch.role_labels[i]):
            by_role[role] = by_role.get(role, 0) + att[:, pos]  # utt_mid tokens add up into one role
        per_template.setdefault(templates[i], []).append(by_role)
        roles.update(by_role)
    order = sorted(roles, key=lambda r: role_sort_key(r) if r != "utt_mid" else (1, 0.5))
    zs, titles = [], []
    for template, dicts in per_template.items():
        z = np.full((len(heads), len(order)), np.nan)
        for j, role in enumerate(order):
            vals = [d[role].numpy() for d in dicts if role in d]
            if vals:
                z[:, j] = np.mean(vals, axis=0)
        zs.append(z)
        titles.append(template.replace("{}", "…"))
    fig = figures.attention_grid(zs, titles, order, names,
                                 "Attention of the last token over role-labelled positions (clean prompts, mean per template)")
    write_figure(ctx.figures / "attention_last_token.html", fig)
