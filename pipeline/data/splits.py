"""The discovery / held-out split (`dataset.split`): what the analyses find is found on the
discovery side, and judged on the held-out side (held-out circuit faithfulness, the intervene
stage).

By default half of the base pairs of each dialect feature are held out (at least one unit on each
side): a base pair is its
`pair_id`, so its he/she/they variants and all its templates stay on one side, and every feature
is on both sides. `dataset.split.by=template` holds out templates instead (every pair in them).
Seeded by `seed`; written into dataset.csv as the column `split`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError

DISCOVERY, HELDOUT = "discovery", "heldout"
BY = ("pair", "template")


def assign_split(df: pd.DataFrame, heldout: float, by: str, seed: int) -> pd.Series:
    """Each row's side. The units are base pairs (`pair_id`; rows without one are their own unit),
    stratified by feature, or templates."""
    if by not in BY:
        raise PipelineError(f"dataset.split.by={by!r} is not one of {', '.join(BY)}")
    if not 0 <= heldout < 1:
        raise PipelineError(f"dataset.split.heldout={heldout} must be at least 0 and below 1")
    if by == "template":
        if "template" not in df:
            raise PipelineError("dataset.split.by=template needs a `template` column in the dataset")
        unit_of, strata = df["template"].astype(str), pd.Series("", index=df.index)
    else:
        has_pairs = "pair_id" in df and df["pair_id"].astype(bool).all()
        unit_of = df["pair_id"].astype(str) if has_pairs else pd.Series([f"row{i}" for i in range(len(df))], index=df.index)
        strata = df["feature"].astype(str) if "feature" in df else pd.Series("", index=df.index)
    # Units shuffled within each stratum, then taken round-robin across strata: the first
    # round(heldout x units) of that order are held out, so each stratum gives its share (and
    # with one unit per stratum, the strata alternate). At least one unit stays on each side.
    rng = np.random.default_rng(seed)
    shuffled = []
    for stratum in sorted(strata.unique()):
        names = np.array(sorted(set(unit_of[strata == stratum])))
        shuffled.append(list(names[rng.permutation(len(names))]))
    order = [group[i] for i in range(max(map(len, shuffled))) for group in shuffled if i < len(group)]
    n_held = int(round(heldout * len(order)))
    if heldout > 0 and len(order) > 1:
        n_held = min(max(n_held, 1), len(order) - 1)
    held = set(order[:n_held])
    return pd.Series(np.where(unit_of.isin(held), HELDOUT, DISCOVERY), index=df.index, name="split")


def side_rows(df: pd.DataFrame, side: str) -> list[int]:
    """The dataset rows of one side, in dataset order; every row is on the discovery side of a
    dataset without a `split` column."""
    if "split" not in df:
        return list(range(len(df))) if side == DISCOVERY else []
    return [i for i, s in enumerate(df["split"]) if s == side]
