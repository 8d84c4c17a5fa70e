"""Build the dataset from the package's pairs and templates by matched guise probing.

For every pair and template, the configured model gives log p(attribute | prompt) for the AAE and
the SAE prompt. A prompt's `best_attr_aae` and `best_attr_sae` are chosen from these associations
log p(a|AAE) - log p(a|SAE) by the rule `dataset.answers` (pipeline/data/answers.py). The
association of each attribute with AAE over SAE, averaged over pairs and templates, is written as
a table and chart.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from pipeline.data.answers import choose_answers
from pipeline.data.resources import load_attributes, load_pairs, load_templates
from pipeline.errors import PipelineError
from pipeline.forward import map_last_logits
from pipeline.prompts import single_token_ids, tokenize

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


def build_rows(features=None) -> pd.DataFrame:
    """Every pair variant in every template, in the interleaved order."""
    pairs = load_pairs()
    if features:
        unknown = sorted(set(features) - set(pairs.feature))
        if unknown:
            raise PipelineError(f"dataset.features: unknown feature(s) {unknown}; known: {sorted(set(pairs.feature))}")
        pairs = pairs[pairs.feature.isin(features)]
    rows = []
    for t_index, template in enumerate(load_templates()):
        for p in pairs.itertuples(index=False):
            rows.append({
                "prompt_aae": template.format(p.aae), "prompt_sae": template.format(p.sae),
                "feature": p.feature, "template": template, "template_index": t_index,
                "pair_id": p.pair_id, "pronoun": p.pronoun, "utterance_aae": p.aae, "utterance_sae": p.sae,
            })
    return interleave(pd.DataFrame(rows))


def probe(model, rows: pd.DataFrame, batch_size: int, prepend_bos: bool, answers: str = "cross_fit", answer_pair=None):
    """Matched guise probing: fill best_attr_aae / best_attr_sae by the rule `answers`
    (pipeline/data/answers.py), and return the per-row
    log-probabilities of every attribute {"aae": [rows, attributes], "sae": ...}, the attribute
    names and the attributes dropped for not being one token."""
    attr_ids, dropped = single_token_ids(model, load_attributes())
    if dropped:
        log.info("skipping %d attributes that are not one token for this model: %s", len(dropped), ", ".join(dropped))
    if len(attr_ids) < 2:
        raise PipelineError("fewer than two trait attributes are single tokens for this model's tokenizer")
    names = list(attr_ids)
    ids = torch.tensor([attr_ids[a] for a in names])

    def attr_logprobs(last_logits, _rows):
        return torch.log_softmax(last_logits, dim=-1)[:, ids]

    logp = {}
    for side in ("aae", "sae"):
        splits = [(t.split("{}")[0], u, t.split("{}")[1]) for t, u in zip(rows.template, rows[f"utterance_{side}"])]
        batch = tokenize(model, list(rows[f"prompt_{side}"]), splits, prepend_bos)
        logp[side] = map_last_logits(model, batch, batch_size, attr_logprobs, desc=f"probing {side.upper()}")
    assoc = (logp["aae"] - logp["sae"]).numpy()  # [rows, attributes]
    out = rows.copy()
    aae, sae = choose_answers(assoc, names, rows.pair_id, answers, answer_pair)
    out.insert(2, "best_attr_aae", [names[i] for i in aae])
    out.insert(3, "best_attr_sae", [names[i] for i in sae])
    return out, logp, names, dropped


def association_table(assoc: np.ndarray, names: list[str], features: pd.Series) -> pd.DataFrame:
    """Mean association of each attribute with AAE over SAE, with a normal 95% interval over
    prompts, plus the mean per dialect feature; sorted from most AAE-associated down."""
    n = assoc.shape[0]
    mean, sem = assoc.mean(0), assoc.std(0, ddof=1) / np.sqrt(max(n, 1)) if n > 1 else np.zeros(assoc.shape[1])
    table = pd.DataFrame({"attribute": names, "association": mean, "sem": sem,
                          "ci_low": mean - 1.96 * sem, "ci_high": mean + 1.96 * sem, "n_prompts": n})
    for feature in sorted(features.unique()):
        table[f"association_{feature}"] = assoc[(features == feature).to_numpy()].mean(0)
    return table.sort_values("association", ascending=False).reset_index(drop=True)
