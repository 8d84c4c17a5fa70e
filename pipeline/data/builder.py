"""Build the dataset from pairs and templates (the package's or the user's) by matched guise probing.

For every pair and template, the configured model gives log p(attribute | prompt) for the AAE and
the SAE prompt, for every attribute whatever its number of tokens (pipeline/data/scoring.py). A
prompt's `best_attr_aae` is a one-token attribute with a large log p(a|AAE) - log p(a|SAE),
`best_attr_sae` one with a small one, chosen by the rule `dataset.answers` (pipeline/data/answers.py;
a task may fix both answers with `dataset.answer_pair`).
The association of each attribute with AAE over SAE, averaged over pairs and templates, is written
as a table and chart.
"""

from __future__ import annotations

import logging
import time
import zlib

import numpy as np
import pandas as pd
import torch

from pipeline.attribution import LastTokenRecord
from pipeline.data.answers import choose_answers
from pipeline.data.inputs import fill
from pipeline.data.resources import load_pairs, load_templates
from pipeline.data.scoring import AttributeTokens, attribute_tokens, score_attributes
from pipeline.errors import PipelineError
from pipeline.prompts import tokenize
from pipeline.validation import refuse

log = logging.getLogger(__name__)


def interleave(df: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The fixed order behind `dataset.max_prompts` and every "first N prompts" of a stage: rows
    shuffled with a fixed seed within each feature, then every base pair's first prompt before any
    pair's second (one prompt per pair before two), each round taken round-robin across features
    (alphabetical). So the first N rows cover as many distinct pairs as N allows, spread over
    features and templates: the pair, not the prompt, is the unit of evidence."""
    if "feature" not in df.columns:
        return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    features = sorted(df.feature.unique())
    shuffled = pd.concat([df[df.feature == f].sample(frac=1.0, random_state=seed) for f in features])
    unit = shuffled["pair_id"].to_numpy() if "pair_id" in shuffled else np.arange(len(shuffled))
    occurrence = shuffled.groupby(unit, sort=False).cumcount().to_numpy()  # 0: the pair's first prompt
    rank = shuffled.groupby([shuffled.feature.to_numpy(), occurrence], sort=False).cumcount().to_numpy()
    feature_index = shuffled.feature.map({f: i for i, f in enumerate(features)}).to_numpy()
    return shuffled.iloc[np.lexsort((feature_index, rank, occurrence))].reset_index(drop=True)


def assign_templates(pairs: pd.DataFrame, n_templates: int, per_pair: int | None, seed: int = 0) -> list[list[int]]:
    """Each pair's template indices. `per_pair` null: every template. Otherwise, within each
    feature, the templates in a seeded order and the i-th pair takes the `per_pair` templates from
    position i on (cyclically): so each template gets an equal share (to one) of each feature's
    pairs, in each of a pair's rounds, and a pair never repeats a template."""
    if per_pair is None:
        return [list(range(n_templates))] * len(pairs)
    per_pair = int(per_pair)
    if not 1 <= per_pair <= n_templates:
        refuse("dataset.templates_per_pair", f"{per_pair} is {'below 1' if per_pair < 1 else f'more than the {n_templates} templates'}",
               f"1 to {n_templates}, or null for every template")
    features = pairs["feature"].to_numpy() if "feature" in pairs else np.full(len(pairs), "")
    out: list[list[int]] = [[] for _ in range(len(pairs))]
    for feature in sorted(set(features)):
        rng = np.random.default_rng([int(seed), zlib.crc32(str(feature).encode())])
        order = rng.permutation(n_templates)
        for i, row in enumerate(np.flatnonzero(features == feature)):
            out[row] = [int(order[(i + j) % n_templates]) for j in range(per_pair)]
    return out


def build_rows(pairs: pd.DataFrame | None = None, templates: list[str] | None = None, features=None,
               templates_per_pair: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Every pair in its templates (`assign_templates`: all of them, or `templates_per_pair`
    balanced ones), in the interleaved order (the package's curated pairs and trait templates
    where none are given)."""
    pairs = load_pairs() if pairs is None else pairs
    templates = load_templates() if templates is None else templates
    if features:
        unknown = sorted(set(features) - set(pairs.feature))
        if unknown:
            raise PipelineError(f"dataset.features: unknown feature(s) {unknown}; known: {sorted(set(pairs.feature))}")
        pairs = pairs[pairs.feature.isin(features)].reset_index(drop=True)
    rows = []
    chosen = assign_templates(pairs, len(templates), templates_per_pair, seed)
    for p, t_indices in zip(pairs.itertuples(index=False), chosen):
        for t_index in t_indices:
            template = templates[t_index]
            rows.append({
                "prompt_aae": fill(template, p.aae), "prompt_sae": fill(template, p.sae),
                "feature": p.feature, "template": template, "template_index": t_index,
                "pair_id": p.pair_id, "pronoun": p.pronoun, "utterance_aae": p.aae, "utterance_sae": p.sae,
                **({"rule": p.rule} if "rule" in pairs else {}),  # a generated pair's rule (generate.py RULES)
            })
    return interleave(pd.DataFrame(rows), seed)


def probe(model, rows: pd.DataFrame, attributes: list[str], batch_size: int, prepend_bos: bool,
          answers: str = "cross_fit", answer_pair: list[str] | None = None, multi_token: bool = True,
          record: bool = False, chain_rule_rows: int | None = None):
    """Matched guise probing: the per-row log-probabilities of every attribute, whatever its number
    of tokens, {"aae": [rows, attributes], "sae": ...}; and each row's answers best_attr_aae /
    best_attr_sae by the rule `answers` (pipeline/data/answers.py) among the one-token attributes
    (the logit difference, attribution and patching read one token) or the given `answer_pair`.
    With `multi_token=False` only one-token attributes (and the answer pair) are scored: the
    old, cheaper probing. With `chain_rule_rows` N below the row count, the multi-token attributes
    are scored on the first N rows only (NaN elsewhere; the rows' order spreads them over distinct
    pairs and features) and the one-token attributes on every row: the packed continuations cost
    about four plain passes per prompt. Returns the rows with their answers, the log-probabilities, the
    attribute names, the attributes left out of the answers with the reason, and (with `record`)
    each guise's LastTokenRecord result from the same pass, projected on the unembedding column of
    every one-token attribute (`answer_columns` order) with each prompt's last position under
    "last" ({"aae": ..., "sae": ...}; else None): any metric over those tokens follows from it
    (pipeline/attribution.py record_attributions)."""
    pair = list(answer_pair or [])
    names = list(attributes)
    attrs = attribute_tokens(model, names)
    if not multi_token:
        skipped = [a for a, one in zip(names, attrs.one_token) if not one and a not in pair]
        if skipped:
            log.info("dataset.multi_token=false: not scoring %d multi-token attributes: %s", len(skipped), ", ".join(skipped))
        names = [a for a in names if a not in skipped]
        attrs = attribute_tokens(model, names)
    left_out = {a: f"{len(t)} tokens: " + " + ".join(repr(p) for p in attrs.pieces(a, model.tokenizer))
                for a, t, one in zip(names, attrs.ids, attrs.one_token) if not one and a not in pair}
    if left_out:
        log.info("%d attributes are more than one token for this model: scored by the chain rule, left out of the "
                 "answers: %s", len(left_out), ", ".join(left_out))
    candidates = answer_columns(names, left_out)
    if len(candidates) < 2:
        raise PipelineError("fewer than two attributes are one token for this model's tokenizer, so no prompt can get "
                            "two one-token answers: add one-token attributes or set dataset.answer_pair")
    one_token_candidates = all(len(attrs.ids[i]) == 1 for i in candidates)
    record = record and one_token_candidates  # a multi-token answer pair has no one column
    multi = [i for i, one in enumerate(attrs.one_token) if not one]
    sampled = bool(multi) and one_token_candidates and chain_rule_rows is not None and int(chain_rule_rows) < len(rows)
    if sampled:
        log.info("the %d multi-token attributes are scored by the chain rule on the first %d of %d prompts "
                 "(dataset.chain_rule_prompts); the one-token attributes on every prompt", len(multi), int(chain_rule_rows), len(rows))
    logp, records = {}, None
    for side in ("aae", "sae"):
        splits = [(t.split("{}")[0], u, t.split("{}")[1]) for t, u in zip(rows.template, rows[f"utterance_{side}"])]
        batch = tokenize(model, list(rows[f"prompt_{side}"]), splits, prepend_bos)
        rec = LastTokenRecord(model, [attrs.ids[i][0] for i in candidates]) if record else None
        started = time.perf_counter()
        if sampled:
            logp[side] = score_sampled(model, batch, attrs, multi, int(chain_rule_rows), batch_size, side, rec)
        else:
            logp[side] = score_attributes(model, batch, attrs, batch_size, desc=f"probing {side.upper()}", record=rec)
        log.info("probing %s: %d prompts, %d attributes in %.1f s", side.upper(), len(batch), len(names), time.perf_counter() - started)
        if rec is not None:
            records = records or {}
            records[side] = {**rec.result(), "last": batch.last, "tokens": [attrs.ids[i][0] for i in candidates]}
    assoc = (logp["aae"] - logp["sae"]).numpy()[:, candidates]
    choices = [names[i] for i in candidates]
    aae, sae = choose_answers(assoc, choices, rows.pair_id, answers, answer_pair)
    out = rows.copy()
    out.insert(2, "best_attr_aae", [choices[i] for i in aae])
    out.insert(3, "best_attr_sae", [choices[i] for i in sae])
    return out, logp, names, left_out, records


def score_sampled(model, batch, attrs: AttributeTokens, multi: list[int], n: int, batch_size: int, side: str, record=None):
    """[prompts, attributes] log p: the one-token attributes on every prompt (with `record` riding
    on that pass), the multi-token ones (columns `multi`) on the first n prompts, NaN elsewhere."""
    one = [i for i in range(len(attrs.names)) if i not in set(multi)]
    pick = lambda cols: AttributeTokens([attrs.names[i] for i in cols], [attrs.ids[i] for i in cols])  # noqa: E731
    out = torch.full((len(batch), len(attrs.names)), float("nan"))
    out[:, one] = score_attributes(model, batch, pick(one), batch_size, desc=f"probing {side.upper()}", record=record)
    sample = batch.take(range(n))
    out[:n, multi] = score_attributes(model, sample, pick(multi), batch_size, desc=f"probing {side.upper()} (chain rule)")
    return out


def answer_columns(names: list[str], left_out) -> list[int]:
    """The attributes answers may be chosen from: all but those left out (more than one token).
    The cache stage's null chooses again among the same ones."""
    return [i for i, a in enumerate(names) if a not in left_out]


def association_table(assoc: np.ndarray, names: list[str], features: pd.Series, n_tokens: list[int] | None = None) -> pd.DataFrame:
    """Mean association of each attribute with AAE over SAE, with a normal 95% interval over
    the prompts it was scored on (NaN: not scored there), plus the mean per dialect feature and each attribute's number of tokens; sorted from
    most AAE-associated down."""
    n = (~np.isnan(assoc)).sum(0)  # per attribute: the multi-token ones may be scored on a sample of prompts
    mean = np.nanmean(assoc, 0)
    sem = np.where(n > 1, np.nanstd(assoc, 0, ddof=1) / np.sqrt(np.maximum(n, 1)), 0.0) if assoc.shape[0] > 1 else np.zeros(assoc.shape[1])
    table = pd.DataFrame({"attribute": names, "association": mean, "sem": sem,
                          "ci_low": mean - 1.96 * sem, "ci_high": mean + 1.96 * sem, "n_prompts": n})
    if n_tokens is not None:
        table.insert(1, "n_tokens", n_tokens)
    for feature in sorted(features.unique()):
        table[f"association_{feature}"] = np.nanmean(assoc[(features == feature).to_numpy()], 0)
    return table.sort_values("association", ascending=False).reset_index(drop=True)
