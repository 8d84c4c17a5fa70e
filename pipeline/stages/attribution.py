"""Stage `attribution`: the notebook's "Logit Attribution" and "Attention Analysis".

Logit lens, layer attribution and head attribution on clean and corrupted prompts (each prompt
with its own answer pair, at its real last token), summarized with bootstrap intervals and per
dialect feature; attention of the top positive and negative heads.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import torch

from pipeline import figures
from pipeline.architecture import output_soft_cap
from pipeline.artifacts import read_tensors, safe_open_metadata, write_atomic, write_figure, write_table, write_tensors
from pipeline.attribution import attribute, full_attention
from pipeline.errors import PipelineError
from pipeline.forward import sum_tolerance
from pipeline.prompts import role_sort_key
from pipeline.stages.cache import logit_diffs_from_probing
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
    if str(cfg.metric.name) != "logit_diff":
        log.info("attribution: direct logit attribution decomposes the logit difference; it stays a logit-difference "
                 "analysis under metric=%s", cfg.metric.name)
    bs, n_boot, seed = int(cfg.batch_size), int(cfg.attribution.bootstrap), int(cfg.seed)
    features = list(ctx.dataset["feature"]) if "feature" in ctx.dataset else None
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads

    results = from_probing(ctx)
    if results is None:
        results = {side: attribute(model, getattr(pairs, side), pairs.answers, bs, desc=f"attribution ({side})")
                   for side in ("clean", "corrupted")}
    cap = output_soft_cap(model)
    if cap is not None:
        log.info("attribution: the model soft-caps its logits at %g; attribution decomposes the logit difference before "
                 "the cap (the logit lens's final_post), which the layer terms must sum to", cap)
    for side, r in results.items():
        closes_to = r["model_logit_diff"] if cap is None else r["logit_lens"][-1]
        gap = float((r["layer"].sum(0) - closes_to).abs().max())
        tolerance = sum_tolerance(ctx.dtype, r["layer"], CLOSURE_ATOL)
        if gap > tolerance:
            raise PipelineError(f"layer attribution does not sum to the model's logit difference on the {side} prompts "
                                f"(max gap {gap:.2e}, tolerance {tolerance:.1e} for {cfg.dtype})")
        log.info("%s: layer attribution closes to the model's logit difference within %.1e (tolerance %.1e for %s)",
                 side, gap, tolerance, cfg.dtype)

    labels = results["clean"]["labels"]
    tensors = {}
    for side, r in results.items():
        for key in ("logit_lens", "layer", "head", "model_logit_diff"):
            tensors[f"{side}/{key}"] = r[key]
    write_tensors(ctx.tensors / "attribution.safetensors", tensors,
                  metadata={"logit_lens": json.dumps(labels["logit_lens"]), "layer": json.dumps(labels["layer"]),
                            "head": "[n_layers, n_heads, n_prompts]", "prompts": "rows of dataset.csv"})

    # Tables: one row per component, clean and corrupted side by side, and their difference per
    # prompt (side "difference"): what the dialect changes in each component, whose sign-flip test
    # over pairs is the guise-swap null of that component.
    def table(key, keys):
        parts = []
        sides = {side: r[key] for side, r in results.items()}
        sides["difference"] = results["clean"][key] - results["corrupted"][key]
        for side, v in sides.items():
            values = v.reshape(-1, v.shape[-1])
            parts.append(summary_table(values, keys.assign(side=side), features, n_boot, seed,
                                       int(cfg.nulls.permutations), float(cfg.nulls.fdr), units_of(ctx.dataset)))
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

    clean_mean = summarize(results["clean"]["head"], n_boot, seed)
    k = int(cfg.attribution.top_k_heads)
    positive, negative = top_heads(clean_mean["mean"], k, +1), top_heads(clean_mean["mean"], k, -1)
    clean_heads = heads[heads.side == "clean"].set_index("name")
    top = pd.concat([clean_heads.loc[[f"L{l}H{h}" for l, h in positive]].assign(sign="positive"),
                     clean_heads.loc[[f"L{l}H{h}" for l, h in negative]].assign(sign="negative")]).reset_index()
    write_table(ctx.tables / "top_heads.csv", top)
    log.info("top heads by clean attribution: %s", ", ".join(f"{r['name']} {r['mean']:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]" for _, r in top.iterrows()))

    write_figures(ctx, lens, layer, heads, n_layers, n_heads, features)
    write_attention(ctx, positive, negative, results["clean"]["last_attention"])


def from_probing(ctx) -> dict | None:
    """The attributions the data stage kept from its probing pass (pipeline/attribution.py:
    LastTokenRecord), turned to this run's direction, with the model's own logit differences
    from the same pass for the closure check; None when there is no such record (a dataset given
    as a CSV) or it does not match this run's prompts and answers."""
    path = ctx.tensors / GUISE_ATTRIBUTION
    if ctx.cfg.dataset.path or not path.exists():
        return None
    ld = logit_diffs_from_probing(ctx)
    if ld is None:
        return None
    t, labels = read_tensors(path), json.loads(safe_open_metadata(path)["labels"])
    pairs, direction = ctx.pairs, ctx.cfg.direction
    sign = 1.0 if str(direction.clean) == "aae" else -1.0  # the record's direction is best_attr_aae - best_attr_sae
    answers = pairs.answers if sign > 0 else pairs.answers.flip(-1)
    out = {}
    for side, guise in (("clean", direction.clean), ("corrupted", direction.corrupted)):
        batch = getattr(pairs, side)
        last = t[f"{guise}/last"]
        if last.shape != batch.last.shape or not torch.equal(last, batch.last.cpu()) \
                or not torch.equal(t[f"{guise}/answers"], answers.cpu()):
            log.info("attribution: the data stage's record does not match this run's prompts or answers; running a pass")
            return None
        out[side] = {key: sign * t[f"{guise}/{key}"] for key in ("logit_lens", "layer", "head")}
        out[side].update(model_logit_diff=ld[side], labels=labels,
                         last_attention=[a[:, :, : int(n) + 1].float() for a, n in zip(t[f"{guise}/attention"], last)])
    log.info("attribution: read from the data stage's probing pass (one pass over each guise serves probing, "
             "the baseline and attribution)")
    return out


def band(table: pd.DataFrame, side: str):
    t = table[table.side == side]
    return t["mean"].to_numpy(), (t.ci_low.to_numpy(), t.ci_high.to_numpy())


def write_figures(ctx, lens, layer, heads, n_layers, n_heads, features) -> None:
    direction = str(ctx.cfg.direction.name)
    for name, table, title in (
        ("logit_lens", lens, "Logit lens: logit difference from the accumulated residual stream"),
        ("layer_attribution", layer, "Logit difference from each layer (direct attribution)"),
    ):
        values, bands = {}, {}
        for side in ("clean", "corrupted"):
            values[side], bands[side] = band(table, side)
        comp = list(table[table.side == "clean"].component)
        write_figure(ctx.figures / f"{name}.html", figures.line(values, comp, f"{title} ({direction}, mean and 95% interval)", bands))

    facets, hovers, marks = [], [], []
    for side in ("clean", "corrupted"):
        t = heads[heads.side == side]
        z = t["mean"].to_numpy().reshape(n_layers, n_heads)
        facets.append(z)
        hovers.append(np.array([f"{n}: {m:+.4f} [{lo:+.4f}, {hi:+.4f}], sign-flip p {p:.3g}, BH q {q:.3g}"
                                for n, m, lo, hi, p, q in zip(t.name, t["mean"], t.ci_low, t.ci_high, t.p_signflip, t.q_bh)]).reshape(n_layers, n_heads))
        marks.append(t.significant_bh.to_numpy().reshape(n_layers, n_heads))
    heads_x, layers_y = [str(h) for h in range(n_heads)], [str(l) for l in range(n_layers)]
    write_figure(ctx.figures / "head_attribution.html", figures.faceted_heatmaps(
        facets, ["clean prompts", "corrupted prompts"], heads_x, layers_y,
        f"Logit difference from each head ({direction}; hover: mean [95% interval]; circled: nonzero after BH at "
        f"{float(ctx.cfg.nulls.fdr):g})", "head", "layer", hovers, marks))

    if features and len(set(features)) > 1:
        clean = heads[heads.side == "clean"]
        cols = [c for c in clean.columns if c.startswith("mean_")]
        zs = [clean[c].to_numpy().reshape(n_layers, n_heads) for c in cols]
        hv = [np.array([f"{n} ({c[5:]}): {v:+.4f}" for n, v in zip(clean.name, clean[c])]).reshape(n_layers, n_heads) for c in cols]
        fig = figures.small_multiples(zs, [c[5:] for c in cols], heads_x, layers_y,
                                      f"Head attribution per dialect feature (clean prompts, {direction})", "head", "layer", hv)
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
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Attention of the top heads</title></head><body>"
            f"<h2>Top {len(positive)} positive (+) and {len(negative)} negative (-) logit attribution heads</h2>"
            f"<p>Clean prompt {index}: {batch.prompts[index]!r}</p>\n{view.local_src}</body></html>")
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
