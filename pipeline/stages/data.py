"""Stage `data`: build the dataset by matched guise probing, or load the configured CSV, and
write it as `dataset.csv` in the notebook's format (feature and template as extra columns).

The built dataset's pairs, templates and attributes come from the package (the task's files) or
from the user's files (`dataset.pairs`, `dataset.templates`, `dataset.attributes`); every attribute
is scored whatever its number of tokens, and the answers are one-token attributes."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import torch

from pipeline import figures, validation
from pipeline.artifacts import write_figure, write_json, write_table, write_tensors
from pipeline.attribution import record_attributions
from pipeline.data.answers import check_rule
from pipeline.data.builder import association_table, build_rows, interleave, probe
from pipeline.data.dataset import SEED_COLUMNS, metric_answers, one_token_answers, select
from pipeline.data.ratings import score_name
from pipeline.data.resources import load_attributes, load_pairs, load_templates
from pipeline.data.splits import DISCOVERY, HELDOUT, assign_split
from pipeline.data.stereotypes import stereotype_agreement
from pipeline.errors import PipelineError
from pipeline.metrics import AnswerWeights
from pipeline.nulls import association_null, baseline_null
from pipeline.power import carriers, power_sentence, power_table

log = logging.getLogger(__name__)
GUISE_LOGPROBS = "guise_logprobs.safetensors"  # log p(attribute | prompt) per row, per side
GUISE_ATTRIBUTION = "guise_attribution.safetensors"  # direct logit attributions from the same pass, per side
NO_ANSWERS_NEEDED = ("data", "report")  # stages that read no answer's logit


def run(ctx) -> None:
    cfg = ctx.cfg.dataset
    if cfg.path:
        given = [k for k in ("pairs", "templates", "attributes") if cfg.get(k) and cfg.get(k) != "generated"]  # generated: the default
        if given:
            raise PipelineError(f"dataset.path (a finished dataset) and dataset.{given[0]} (an input to build one) "
                                "exclude each other; give one of them")
        # Checked whole, with the tokenizer only: no model loads for a CSV this stage refuses.
        csv = validation.read_dataset_csv(cfg.path)
        tokenizer, n_ctx = ctx.tokenizer
        validation.check_tokens(csv, tokenizer, n_ctx, bool(ctx.cfg.model.prepend_bos))
        df = csv.frame()
        if cfg.max_prompts is not None:
            df = interleave(df, seed=int(ctx.cfg.seed))
        df = select(df, cfg.features, cfg.max_prompts)
        log.info("dataset: %d prompts from %s", len(df), cfg.path)
    else:
        check_rule(cfg.answers, cfg.answer_pair)
        task = str(cfg.get("task") or "traits")
        pairs = load_pairs(cfg.get("pairs"), cfg.get("feature"), task, cfg.get("generate"), int(ctx.cfg.seed), cfg.features)
        if "rule" in pairs:
            log.info("dataset: %d generated feature-matched pairs (%s)", len(pairs),
                     ", ".join(f"{f} {n}" for f, n in pairs.feature.value_counts(sort=False).items()))
        templates = load_templates(task, cfg.get("templates"))
        attributes = load_attributes(task, cfg.get("attributes"))
        check_rule(cfg.answers, cfg.answer_pair, attributes)  # a given pair must be among the attributes
        fixed = [str(a).strip() for a in cfg.answer_pair] if cfg.answer_pair else None
        rated = ctx.rated  # a rated metric's ratings are read (and refused) before any model runs
        if fixed and rated is None and any(s not in NO_ANSWERS_NEEDED for s in ctx.cfg.stage.stages):
            # Stop before probing: the later stages could not use a multi-token answer.
            one_token_answers(ctx.tokenizer[0], fixed, "dataset.answer_pair", candidates=attributes,
                              advice=" (set dataset.answer_pair=[<aae side>,<sae side>]); stage=data alone "
                                     "still writes the association table of every attribute")
        rows = select(build_rows(pairs, templates, cfg.features, cfg.get("templates_per_pair"), int(ctx.cfg.seed)), None,
                      cfg.max_prompts)
        record = "attribution" in ctx.cfg.stage.stages  # one pass serves probing, baseline and attribution
        df, logp, names, left_out, records = probe(ctx.model, rows, attributes, int(ctx.cfg.batch_size),
                                                   bool(ctx.cfg.model.prepend_bos), cfg.answers, fixed,
                                                   bool(cfg.multi_token), record, chain_rule_rows(cfg))
        assoc = (logp["aae"] - logp["sae"]).numpy()
        n_perm, seed = int(ctx.cfg.nulls.permutations), int(ctx.cfg.seed)
        null = association_null(assoc, df.pair_id, n_perm, seed, float(ctx.cfg.nulls.fdr)).assign(attribute=names)
        n_tokens = [len(ctx.model.tokenizer(" " + a, add_special_tokens=False)["input_ids"]) for a in names]
        table = association_table(assoc, names, df.feature, n_tokens).merge(null, on="attribute", how="left")
        if rated is not None:  # each attribute's rating and weight in the run's metric (0: unrated or several tokens)
            weights = dict(zip(rated.one_token_names, rated.weights))
            ratings = dict(zip(rated.attributes, rated.ratings))
            table.insert(2, "rating", table.attribute.map(ratings))
            table.insert(3, "weight", table.attribute.map(weights).fillna(0.0))
        write_table(ctx.tables / "attribute_association.csv", table)
        write_figure(ctx.figures / "attribute_association.html", figures.attribute_association(table))
        write_stereotype_agreement(ctx, table, n_perm, seed)
        if rated is not None:
            write_prejudice_score(ctx, df, assoc, names, rated)
        # The cache stage reads its baseline metric from these (same prompts, same runs).
        write_tensors(ctx.tensors / GUISE_LOGPROBS, logp,
                      metadata={"rows": "dataset.csv rows", "columns": json.dumps(names),
                                "not_answers": json.dumps(left_out)})
        if records:
            write_guise_attributions(ctx.tensors / GUISE_ATTRIBUTION, records,
                                     metric_answers(ctx.model.tokenizer, df, rated)[0])
        log.info("dataset: built %d prompts over %d features (task %s, %d attributes), answers by rule %s; top "
                 "AAE-associated attributes: %s", len(df), df.feature.nunique(), task, len(names), cfg.answers,
                 ", ".join(table.attribute.head(5)))
    if "split" not in df.columns:  # a CSV may bring its own sides
        df["split"] = assign_split(df, float(cfg.split.heldout), str(cfg.split.by), int(ctx.cfg.seed))
    sides = df["split"].value_counts().to_dict()
    log.info("split: %d discovery and %d held-out prompts (dataset.split.heldout=%s, by %s)", sides.get(DISCOVERY, 0),
             sides.get(HELDOUT, 0), cfg.split.heldout, cfg.split.by)
    if not cfg.path:
        write_power(ctx, df, assoc, names, rated)
    ordered = SEED_COLUMNS + [c for c in df.columns if c not in SEED_COLUMNS]
    write_table(ctx.run_dir / "dataset.csv", df[ordered])


def chain_rule_rows(cfg) -> int | None:
    """`dataset.chain_rule_prompts`: null every prompt; 0 is multi_token=false."""
    n = cfg.get("chain_rule_prompts")
    return None if n is None else int(n)


def score_per_row(df: pd.DataFrame, assoc: np.ndarray, names: list[str], rated) -> np.ndarray:
    """Each row's m(AAE) - m(SAE) of the run's metric on one token, from the probing: a rated
    metric's weights over its one-token attributes, else the row's answer pair (as chosen)."""
    column = {a: j for j, a in enumerate(names)}
    if rated is not None:
        w = rated.weights_over(names, one_token_only=True)
        used = np.flatnonzero(w)
        return assoc[:, used] @ w[used]
    aae = np.array([column[a] for a in df.best_attr_aae])
    sae = np.array([column[a] for a in df.best_attr_sae])
    rows = np.arange(len(df))
    return assoc[rows, aae] - assoc[rows, sae]


def write_power(ctx, df: pd.DataFrame, assoc: np.ndarray, names: list[str], rated) -> None:
    """tables/power.csv and figures/power_forest.html (pipeline/power.py): the score per feature
    on each side of the split, its spread, and the pairs it takes to see it."""
    cfg = ctx.cfg
    gap = score_per_row(df, assoc, names, rated)
    units = df["pair_id"] if "pair_id" in df and df["pair_id"].astype(bool).all() else [f"row{i}" for i in range(len(df))]
    table = power_table(gap, units, df.get("feature"), df["split"], int(cfg.nulls.permutations),
                        int(cfg.nulls.bootstrap), int(cfg.seed))
    summary = power_sentence(table)
    summary.update({f"features_{k}": v for k, v in carriers(table).items()})
    summary["metric"] = str(cfg.metric.name)
    write_table(ctx.tables / "power.csv", table)
    write_json(ctx.tables / "power.json", summary)
    write_figure(ctx.figures / "power_forest.html", figures.power_forest(table, str(cfg.metric.name)))
    for r in table[table.feature == "all"].itertuples():
        log.info("power, %s side: score %+.4f [%+.4f, %+.4f] over %d pairs, sd per pair %.3f, detectable %.4f, "
                 "pairs to detect this score %.0f", r.side, r.score, r.ci_low, r.ci_high, r.n_pairs, r.sd_per_pair,
                 r.detectable, r.pairs_needed)
    if summary.get("sentence"):
        log.info("power: %s", summary["sentence"])


def write_stereotype_agreement(ctx, association: pd.DataFrame, n_perm: int, seed: int) -> None:
    """Hofmann et al.'s comparisons (pipeline/data/stereotypes.py) when the task probes traits that
    the stereotype studies list (the traits task; not conviction or occupations)."""
    table, model = stereotype_agreement(association, n_perm, seed)
    if not (table.n_probed > 0).any():
        return
    write_table(ctx.tables / "stereotype_agreement.csv", table)
    write_json(ctx.tables / "stereotype_agreement.json", {"studies": table.to_dict("records"), "model": model})
    write_figure(ctx.figures / "stereotype_agreement.html", figures.stereotype_agreement(table, model))
    for r in table.itertuples():
        log.info("stereotypes %s %d: agreement %.3f (chance %.3f, p %.3f); their top 5 favorability %+.2f",
                 r.name, r.year, r.agreement, r.chance, r.p_perm, r.favorability_top5)
    log.info("favorability of the model's top 5 AAE-associated attributes %+.2f (%s), SAE-associated %+.2f (%s)",
             model["favorability_aae_top5"], ", ".join(model["aae_top5"]), model["favorability_sae_top5"],
             ", ".join(model["sae_top5"]))


def write_prejudice_score(ctx, df: pd.DataFrame, assoc: np.ndarray, names: list[str], rated) -> None:
    """The covert prejudice score (the AAE - SAE gap of the rated metric, pipeline/data/ratings.py)
    two ways, from the probing's log-probabilities: over the one-token rated attributes (what
    every mechanistic stage reads; the cache stage's baseline gap) and over every rated attribute
    by the chain rule; each with its pair-bootstrap interval and guise-swap null, and how closely
    the two agree pair by pair."""
    cfg = ctx.cfg
    units = list(df.pair_id)
    n_perm, n_boot, seed = int(cfg.nulls.permutations), int(cfg.nulls.bootstrap), int(cfg.seed)
    versions = {"one_token": rated.weights_over(names, one_token_only=True)}
    chain = rated.weights_over(names, one_token_only=False)
    if not np.allclose(chain, versions["one_token"]):
        versions["chain_rule"] = chain
    rows, per_pair = [], {}
    for version, w in versions.items():
        used = np.flatnonzero(w)
        gap = assoc[:, used] @ w[used]  # per row: m(AAE) - m(SAE), the log-sum-exp cancels
        scored = ~np.isnan(gap)  # the chain rule may be scored on a sample of prompts (dataset.chain_rule_prompts)
        gap, unit_of = gap[scored], np.asarray(units)[scored]
        null = baseline_null(gap, unit_of, list(df.feature[scored]), n_perm, n_boot, seed).iloc[0]
        per_pair[version] = pd.Series(gap).groupby(unit_of).mean()
        rows.append({"score": version, "metric": rated.name, "n_attributes": int((w != 0).sum()),
                     **{k: null[k] for k in ("n_prompts", "n_pairs", "gap", "ci_low", "ci_high", "null_low", "null_high", "p_perm")},
                     "sd_per_pair": float(per_pair[version].std(ddof=1))})
    table = pd.DataFrame(rows).rename(columns={"gap": "score_value"})
    if len(per_pair) == 2:
        b = per_pair["chain_rule"]
        a = per_pair["one_token"].loc[b.index]  # the pairs both are scored on
        table["pair_pearson_r"] = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else np.nan
        table["pair_sign_agreement"] = float((np.sign(a) == np.sign(b)).mean())
    write_table(ctx.tables / "prejudice_score.csv", table)
    name = score_name(rated.name, str(cfg.dataset.get("task") or "traits"))
    for r in table.itertuples():
        log.info("%s, %s over %d attributes: %+.4f [%+.4f, %+.4f], guise-swap null [%+.4f, %+.4f], p %.4f",
                 name, r.score, r.n_attributes, r.score_value, r.ci_low, r.ci_high, r.null_low, r.null_high, r.p_perm)
    if len(per_pair) == 2:
        log.info("one-token vs chain-rule score per pair: Pearson r %.3f, same sign %.0f%%", table.pair_pearson_r[0],
                 100 * table.pair_sign_agreement[0])


def write_guise_attributions(path, records: dict, answers: AnswerWeights) -> None:
    """Each guise's direct logit attributions of the metric (`answers`, oriented to the AAE side:
    the attribution stage negates them for direction=sae_clean), its prompts' last-token positions,
    the metric's tokens and weights (checked against the run's prompt pairs before use), and the
    last token's attention over the prompt's positions, zero-padded, in float16 (it is read for
    figures only)."""
    tensors, labels = {"answer_tokens": answers.tokens.clone(), "answer_weights": answers.weights.clone()}, None
    for side, record in records.items():
        column = {t: j for j, t in enumerate(record["tokens"])}
        weights = torch.zeros(len(answers), len(column))
        for k in range(answers.tokens.shape[1]):
            cols = torch.tensor([column.get(int(t), -1) for t in answers.tokens[:, k]])
            if (cols < 0).any():
                log.info("attribution: the metric reads tokens the probing record does not hold; the attribution stage runs a pass")
                return
            weights[torch.arange(len(answers)), cols] += answers.weights[:, k]
        a = record_attributions(record, weights)
        for key in ("logit_lens", "layer", "head"):
            tensors[f"{side}/{key}"] = a[key].clone()
        tensors[f"{side}/last"] = record["last"].clone()
        width = max(t.shape[-1] for t in a["last_attention"])
        tensors[f"{side}/attention"] = torch.stack(
            [torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in a["last_attention"]]).half()
        labels = a["labels"]
    write_tensors(path, tensors, metadata={"labels": json.dumps(labels), "direction": "the metric oriented to AAE (answer_weights)",
                                           "axes": "logit_lens/layer [component, prompt], head [layer, head, prompt], "
                                                   "attention [prompt, layer, head, position]"})
