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

import numpy as np
import pandas as pd

from pipeline.attribution import LastTokenRecord
from pipeline.data.answers import choose_answers
from pipeline.data.inputs import fill
from pipeline.data.resources import load_pairs, load_templates
from pipeline.data.scoring import attribute_tokens, score_attributes
from pipeline.errors import PipelineError
from pipeline.prompts import tokenize

log = logging.getLogger(__name__)


def interleave(df: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The fixed order behind `dataset.max_prompts`: rows shuffled with a fixed seed within each
    feature, then taken round-robin across features (alphabetical), so the first N rows spread
    over features, templates and utterances."""
    if "feature" not in df.columns:
        return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    groups = [g.sample(frac=1.0, random_state=seed) for _, g in sorted(df.groupby("feature"), key=lambda kv: kv[0])]
    order = []
    for k in range(max(len(g) for g in groups)):
        order.extend(g.index[k] for g in groups if k < len(g))
    return df.loc[order].reset_index(drop=True)


def build_rows(pairs: pd.DataFrame | None = None, templates: list[str] | None = None, features=None) -> pd.DataFrame:
    """Every pair in every template, in the interleaved order (the package's pairs and trait
    templates where none are given)."""
    pairs = load_pairs() if pairs is None else pairs
    templates = load_templates() if templates is None else templates
    if features:
        unknown = sorted(set(features) - set(pairs.feature))
        if unknown:
            raise PipelineError(f"dataset.features: unknown feature(s) {unknown}; known: {sorted(set(pairs.feature))}")
        pairs = pairs[pairs.feature.isin(features)]
    rows = []
    for t_index, template in enumerate(templates):
        for p in pairs.itertuples(index=False):
            rows.append({
                "prompt_aae": fill(template, p.aae), "prompt_sae": fill(template, p.sae),
                "feature": p.feature, "template": template, "template_index": t_index,
                "pair_id": p.pair_id, "pronoun": p.pronoun, "utterance_aae": p.aae, "utterance_sae": p.sae,
            })
    return interleave(pd.DataFrame(rows))


def probe(model, rows: pd.DataFrame, attributes: list[str], batch_size: int, prepend_bos: bool,
          answers: str = "cross_fit", answer_pair: list[str] | None = None, multi_token: bool = True,
          record: bool = False):
    """Matched guise probing: the per-row log-probabilities of every attribute, whatever its number
    of tokens, {"aae": [rows, attributes], "sae": ...}; and each row's answers best_attr_aae /
    best_attr_sae by the rule `answers` (pipeline/data/answers.py) among the one-token attributes
    (the logit difference, attribution and patching read one token) or the given `answer_pair`.
    With `multi_token=False` only one-token attributes (and the answer pair) are scored: the
    old, cheaper probing. Returns the rows with their answers, the log-probabilities, the
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
    record = record and all(len(attrs.ids[i]) == 1 for i in candidates)  # a multi-token answer pair has no one column
    logp, records = {}, None
    for side in ("aae", "sae"):
        splits = [(t.split("{}")[0], u, t.split("{}")[1]) for t, u in zip(rows.template, rows[f"utterance_{side}"])]
        batch = tokenize(model, list(rows[f"prompt_{side}"]), splits, prepend_bos)
        rec = LastTokenRecord(model, [attrs.ids[i][0] for i in candidates]) if record else None
        started = time.perf_counter()
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


def answer_columns(names: list[str], left_out) -> list[int]:
    """The attributes answers may be chosen from: all but those left out (more than one token).
    The cache stage's null chooses again among the same ones."""
    return [i for i, a in enumerate(names) if a not in left_out]


def association_table(assoc: np.ndarray, names: list[str], features: pd.Series, n_tokens: list[int] | None = None) -> pd.DataFrame:
    """Mean association of each attribute with AAE over SAE, with a normal 95% interval over
    prompts, plus the mean per dialect feature and each attribute's number of tokens; sorted from
    most AAE-associated down."""
    n = assoc.shape[0]
    mean, sem = assoc.mean(0), assoc.std(0, ddof=1) / np.sqrt(max(n, 1)) if n > 1 else np.zeros(assoc.shape[1])
    table = pd.DataFrame({"attribute": names, "association": mean, "sem": sem,
                          "ci_low": mean - 1.96 * sem, "ci_high": mean + 1.96 * sem, "n_prompts": n})
    if n_tokens is not None:
        table.insert(1, "n_tokens", n_tokens)
    for feature in sorted(features.unique()):
        table[f"association_{feature}"] = assoc[(features == feature).to_numpy()].mean(0)
    return table.sort_values("association", ascending=False).reset_index(drop=True)
