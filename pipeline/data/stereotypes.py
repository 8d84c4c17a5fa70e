"""Hofmann et al. (2024)'s comparisons of a model's dialect associations with human stereotypes.

The stereotypes that participants ascribed to African Americans in five studies, 1933-2012
(stereotypes_african_americans.csv, sources in its header), and the favorability of traits
(favorability_bergsieker_2012.csv, pipeline/data/ratings.py):

(a) agreement: the average precision of the model's ranking of the probed attributes (by mean
    association with AAE over SAE) against each study's top l stereotypes among them, averaged
    over l = 1..5; its chance level is the same average precision of random rankings (the model's
    associations permuted over attributes), with a one-sided permutation p (their Fig. 2);
(b) favorability: the mean favorability of the model's top-5 AAE-associated and top-5
    SAE-associated attributes, beside that of each study's top 5.
"""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import pandas as pd

from pipeline.data.ratings import packaged_ratings

STUDIES = {"katz_braly": "Katz & Braly", "gilbert": "Gilbert", "karlins": "Karlins et al.", "madon": "Madon et al.",
           "bergsieker": "Bergsieker et al."}
TOP = 5


def load_stereotypes() -> pd.DataFrame:
    """Columns study, year, attribute, score (higher: more often ascribed), one row per listed trait."""
    with files("pipeline.data").joinpath("stereotypes_african_americans.csv").open() as f:
        return pd.read_csv(f, comment="#")


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """scores [..., attributes] (higher ranks first), relevant [attributes] bool -> [...] average
    precision of each ranking: the mean over relevant attributes of the precision at its rank."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    hits = relevant[order]
    precision = np.cumsum(hits, -1) / np.arange(1, hits.shape[-1] + 1)
    return (precision * hits).sum(-1) / max(int(relevant.sum()), 1)


def mean_rating(attributes, ratings: dict[str, float]) -> float:
    values = [ratings[a.lower()] for a in attributes if a.lower() in ratings]
    return float(np.mean(values)) if values else float("nan")


def stereotype_agreement(association: pd.DataFrame, n_perm: int, seed: int) -> tuple[pd.DataFrame, dict]:
    """association: the data stage's table (attribute, association). One row per study: its year,
    its top traits among the probed attributes, the agreement (average precision averaged over
    l = 1..5), the chance level and p, and the favorability of its top 5; and a dict with the
    favorability of the model's own top 5 on each side."""
    names = association.attribute.astype(str).to_numpy()
    scores = association.association.to_numpy(dtype=np.float64)
    favorability = packaged_ratings("favorability")
    rng = np.random.default_rng(seed)
    permuted = np.stack([rng.permutation(scores) for _ in range(n_perm)])  # the same draws for every study
    rows = []
    for study, listed in load_stereotypes().groupby("study", sort=False):
        listed = listed.sort_values("score", ascending=False, kind="stable")
        probed = [a for a in listed.attribute if a in set(names)]
        row = {"study": study, "name": STUDIES.get(study, study), "year": int(listed.year.iloc[0]),
               "n_listed": len(listed), "n_probed": len(probed), "top_traits": ", ".join(probed[:TOP]),
               "favorability_top5": mean_rating(listed.attribute.head(TOP), favorability)}
        levels = range(1, min(TOP, len(probed)) + 1)
        if levels:
            observed, null = 0.0, np.zeros(n_perm)
            for level in levels:
                relevant = np.isin(names, probed[:level])
                observed += float(average_precision(scores, relevant)) / len(levels)
                null += average_precision(permuted, relevant) / len(levels)
            row.update(agreement=observed, chance=float(null.mean()), p_perm=float((1 + (null >= observed - 1e-12).sum()) / (1 + n_perm)))
        else:
            row.update(agreement=np.nan, chance=np.nan, p_perm=np.nan)
        rows.append(row)
    table = pd.DataFrame(rows).sort_values("year", kind="stable").reset_index(drop=True)
    ranked = association.sort_values("association", ascending=False, kind="stable").attribute.astype(str)
    model = {"aae_top5": list(ranked.head(TOP)), "sae_top5": list(ranked.tail(TOP)[::-1]),
             "favorability_aae_top5": mean_rating(ranked.head(TOP), favorability),
             "favorability_sae_top5": mean_rating(ranked.tail(TOP), favorability),
             "n_attributes": len(names), "n_perm": n_perm, "levels": f"1..{TOP}",
             "source": "stereotypes: pipeline/data/stereotypes_african_americans.csv; favorability: "
                       "pipeline/data/favorability_bergsieker_2012.csv (sources in the files' headers)"}
    return table, model
