"""Power, before and after: what the run's pairs can and cannot see.

For each side of the discovery / held-out split and each dialect feature (and all features
pooled), the AAE - SAE score of the run's metric with its pair-bootstrap interval and guise-swap
null (pipeline/nulls.py baseline_null), the per-pair spread (standard deviation of the pair means),
the smallest score the side's pairs detect with 80% power, and how many pairs would detect the
score observed. The unit is the base pair: its prompts (templates, pronoun variants) move together.

`pairs_to_see` asks the question that matters before a held-out result is read: with the held-out
side's spread, how many pairs does it need to see the score the discovery side found?
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.nulls import DETECTABLE, baseline_null, pairs_needed

SIDES = ("discovery", "heldout")


def per_pair_sd(gap: np.ndarray, units) -> float:
    """Standard deviation of the pair means: the spread the pair-level tests see."""
    means = pd.Series(np.asarray(gap, dtype=np.float64)).groupby(np.asarray(units, dtype=str)).mean()
    return float(means.std(ddof=1)) if len(means) > 1 else float("nan")


def power_table(gap: np.ndarray, units, features, split, n_perm: int, n_boot: int, seed: int) -> pd.DataFrame:
    """One row per (side, feature), `feature` "all" for the pooled row, sides discovery, heldout and
    all (every prompt; the only side when the run has no split). Columns: side, feature, n_pairs,
    n_prompts, score, ci_low, ci_high, sem, null_low, null_high, p_perm, sd_per_pair, detectable,
    pairs_needed (to detect this row's own score)."""
    gap = np.asarray(gap, dtype=np.float64)
    units = np.asarray(units, dtype=str)
    features = np.asarray(features if features is not None else ["all"] * len(gap), dtype=str)
    split = np.asarray(split if split is not None else ["discovery"] * len(gap), dtype=str)
    sides = [s for s in SIDES if (split == s).any()]
    sides = sides + ["all"] if len(sides) > 1 else sides
    rows = []
    for side in sides:
        mask = np.ones(len(gap), bool) if side == "all" else split == side
        null = baseline_null(gap[mask], units[mask], features[mask], n_perm, n_boot, seed)
        for r in null.itertuples(index=False):
            inside = mask & ((features == r.feature) if r.feature != "all" else True)
            rows.append({"side": side, "feature": r.feature, "n_pairs": int(r.n_pairs), "n_prompts": int(r.n_prompts),
                         "score": r.gap, "ci_low": r.ci_low, "ci_high": r.ci_high, "sem": r.sem,
                         "null_low": r.null_low, "null_high": r.null_high, "p_perm": r.p_perm,
                         "sd_per_pair": per_pair_sd(gap[inside], units[inside]), "detectable": r.detectable,
                         "pairs_needed": pairs_needed(int(r.n_pairs), r.detectable, r.gap) if np.isfinite(r.detectable) else np.nan})
    return pd.DataFrame(rows)


def pairs_to_see(n_pairs: int, detectable: float, target: float) -> float:
    """Pairs a side with `n_pairs` and this `detectable` score needs to see `target` (80% power)."""
    return pairs_needed(n_pairs, detectable, target) if np.isfinite(detectable) else float("nan")


def power_sentence(table: pd.DataFrame) -> dict:
    """Whether the held-out side is powered to see the discovery side's pooled score, in numbers
    and one sentence; {} when the run has no held-out side."""
    pooled = table[table.feature == "all"].set_index("side")
    if not {"discovery", "heldout"} <= set(pooled.index):
        return {}
    d, h = pooled.loc["discovery"], pooled.loc["heldout"]
    target = float(d.score)
    powered = bool(np.isfinite(h.detectable) and h.detectable <= abs(target))
    needed = pairs_to_see(int(h.n_pairs), float(h.detectable), target)
    seen = bool(h.ci_low > 0 or h.ci_high < 0)
    text = (f"The held-out side ({int(h.n_pairs)} pairs) detects a score of {h.detectable:.3f} or more with 80% power; "
            f"the discovery side's score is {target:+.3f}, so the held-out side "
            + ("is powered to see it" if powered else f"is not powered to see it (it would need about {needed:,.0f} pairs)")
            + f". Its own score is {h.score:+.3f} [{h.ci_low:+.3f}, {h.ci_high:+.3f}], "
            + ("an interval that excludes 0." if seen else "an interval that includes 0."))
    return {"powered": powered, "heldout_excludes_zero": seen, "discovery_score": target, "heldout_score": float(h.score),
            "heldout_detectable": float(h.detectable), "heldout_pairs": int(h.n_pairs), "pairs_needed": needed,
            "sentence": text}


def carriers(table: pd.DataFrame) -> dict[str, list[str]]:
    """Features whose held-out score (or, without a split, whose score) excludes 0 on the side of
    the pooled score (`carry`: they carry it) and on the other side (`against`: they lean the
    other way)."""
    side = "heldout" if (table.side == "heldout").any() else table.side.iloc[0]
    rows = table[(table.side == side) & (table.feature != "all")]
    pooled = table[(table.side == side) & (table.feature == "all")].score.iloc[0]
    sign = np.sign(pooled) or 1.0
    up = [r.feature for r in rows.itertuples() if r.ci_low > 0]
    down = [r.feature for r in rows.itertuples() if r.ci_high < 0]
    return {"carry": up if sign > 0 else down, "against": down if sign > 0 else up}


__all__ = ["DETECTABLE", "power_table", "power_sentence", "pairs_to_see", "carriers", "per_pair_sd"]
