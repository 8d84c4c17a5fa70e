"""The 1933 Katz-Braly stereotypes about African Americans (katz_braly_1933.csv, source in its
header) against the model's attribute associations: as in matched guise probing studies, do the
attributes the model links to AAE agree with the stereotypes of the original study?"""

from __future__ import annotations

from importlib.resources import files

import pandas as pd

from pipeline.nulls import list_agreement

SOURCE = "Katz & Braly (1933), Racial stereotypes of one hundred college students, J. Abnorm. Soc. Psychol. 28(3)"


def load_katz_braly() -> pd.DataFrame:
    """Columns attribute, original_trait, percent (of 100 students who chose the trait)."""
    with files("pipeline.data").joinpath("katz_braly_1933.csv").open() as f:
        return pd.read_csv(f, comment="#")


def katz_braly_agreement(association: pd.DataFrame, n_perm: int, seed: int) -> dict:
    """association: the data stage's table (attribute, association). Overlap of the listed
    stereotypes present among the probed attributes with the model's top AAE-associated
    attributes of the same number, and Spearman's rank correlation between each attribute's
    association and its 1933 percentage (0 for unlisted attributes), each with a permutation p."""
    kb = load_katz_braly().set_index("attribute")["percent"]
    weight = association.attribute.map(kb).fillna(0).to_numpy()
    out = list_agreement(association.association.to_numpy(), weight, n_perm, seed)
    listed = association[weight > 0].sort_values("association", ascending=False)
    top = association.sort_values("association", ascending=False).attribute.head(out["n_listed"])
    out.update({"source": SOURCE, "listed_probed": list(listed.attribute), "absent": sorted(set(kb.index) - set(association.attribute)),
                "top_k_model": list(top), "overlap": sorted(set(top) & set(listed.attribute))})
    return out
