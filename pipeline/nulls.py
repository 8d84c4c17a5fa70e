"""What a number would look like with no dialect effect.

- The guise permutation null of the baseline: swap the AAE and SAE guise of random pairs (both
  prompts keep their tokens; only which one counts as AAE changes). No model is run again: the
  association matrix log p(a|AAE) - log p(a|SAE) of a swapped pair is negated. The answer
  selection is part of the statistic, so it is re-run on every permuted matrix
  (pipeline/data/answers.py); with fixed answers (a CSV dataset) swapping a prompt's guises
  negates its gap. The swap unit is the base pair (`pair_id`): its templates and pronoun variants
  are swapped together, because they are not independent of each other.
- The sign-flip test of a component against zero over prompts, and Benjamini-Hochberg over the
  components of a table.
- Power: the smallest mean a number of pairs could detect, and the pairs a given mean would need.

numpy has no permutation tests and scipy is not a dependency; these are a few lines each.
With 2**units <= n_perm every sign pattern is enumerated (an exact test, identity included);
otherwise random patterns and p = (1 + #{null at least as extreme}) / (1 + n_perm).
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from pipeline.data.answers import choose_answers, gaps
from pipeline.errors import PipelineError

# Ties with the observed value count as "at least as extreme" (floating-point noise of a sum
# taken in another order must not make an exact tie look smaller).
TIE = 1e-9


def sign_patterns(n_units: int, n_perm: int, seed: int) -> tuple[np.ndarray, bool]:
    """[patterns, n_units] of +1/-1 and whether they are all 2**n_units patterns (exact)."""
    if n_units <= 20 and 2 ** n_units <= n_perm:
        return np.array(list(itertools.product((1.0, -1.0), repeat=n_units))).reshape(-1, n_units), True
    rng = np.random.default_rng(seed)
    return rng.choice([1.0, -1.0], size=(n_perm, n_units)), False


def p_value(observed: np.ndarray, null: np.ndarray, exact: bool, alternative: str = "two-sided") -> np.ndarray:
    """observed [...], null [patterns, ...] -> p [...]; NaN where observed is NaN."""
    observed = np.asarray(observed, dtype=np.float64)
    null = np.asarray(null, dtype=np.float64)
    scale = TIE * np.maximum(1.0, np.abs(observed))
    if alternative == "greater":
        extreme = null >= observed - scale
    elif alternative == "two-sided":
        extreme = np.abs(null) >= np.abs(observed) - scale
    else:
        raise ValueError(f"alternative={alternative!r}")
    count = extreme.sum(0)
    p = count / null.shape[0] if exact else (1.0 + count) / (1.0 + null.shape[0])
    return np.where(np.isnan(observed), np.nan, p)


def sign_flip_test(values: np.ndarray, n_perm: int = 1000, seed: int = 0, units=None) -> np.ndarray:
    """values [components, prompts] (NaN where a prompt does not apply) -> two-sided p-value per
    component of its mean against 0, flipping the sign of each prompt's value at random (the same
    patterns for every component). With `units` (e.g. each prompt's pair_id) the prompts of one
    unit are flipped together, for prompts that are not independent of each other."""
    x = np.asarray(values, dtype=np.float64)
    valid = ~np.isnan(x)
    x = np.where(valid, x, 0.0)
    n = valid.sum(1)
    observed = np.where(n > 0, x.sum(1) / np.maximum(n, 1), np.nan)
    if units is None:
        patterns, exact = sign_patterns(x.shape[1], n_perm, seed)
    else:
        inverse, n_units = unit_index(units)
        patterns, exact = sign_patterns(n_units, n_perm, seed)
        patterns = patterns[:, inverse]
    null = (patterns @ x.T) / np.maximum(n, 1)  # [patterns, components]
    return p_value(observed, null, exact)


def benjamini_hochberg(p: np.ndarray, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg over the finite p-values: (adjusted q-values, q <= alpha); NaN p gives
    NaN q and False."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m:
        order = ok[np.argsort(p[ok], kind="stable")]
        scaled = p[order] * m / np.arange(1, m + 1)
        q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q, np.isfinite(q) & (q <= alpha)


# (z_0.975 + z_0.8): a mean this many standard errors from 0 is found by a two-sided test at the 5%
# level 80% of the time.
DETECTABLE = 1.959964 + 0.841621


def detectable_effect(sem):
    """The smallest true mean a two-sided 5% test would detect with 80% power, given the standard
    error of the mean (from the pair-level spread): 2.80 standard errors. It shrinks as
    1/sqrt(pairs): pairs_needed = pairs * (detectable / target)^2."""
    return DETECTABLE * sem


def pairs_needed(n_pairs: int, detectable: float, target: float) -> float:
    """How many pairs a two-sided 5% test with 80% power needs to detect a mean of `target`, when
    n_pairs give the smallest detectable mean `detectable`."""
    return float(n_pairs * (detectable / abs(target)) ** 2) if target else float("inf")


# ---------------------------------------------------------------- the baseline's null

def unit_index(units) -> tuple[np.ndarray, int]:
    """Each row's unit (pair) as 0..n_units-1."""
    _, inverse = np.unique(np.asarray(units, dtype=str), return_inverse=True)
    return inverse, int(inverse.max()) + 1 if len(inverse) else 0


class GapProcedure:
    """The per-row gap (clean - corrupted logit difference) of any subset of rows, with some pairs'
    guises swapped, answers included: on a built dataset the answers are chosen again by `rule`
    on the rows in hand (the selection is part of the statistic); with fixed answers (a CSV
    dataset) swapping a prompt's guises negates its gap."""

    def __init__(self, observed, pair_ids, assoc=None, names=None, rule=None, answer_pair=None):
        self.observed = np.asarray(observed, dtype=np.float64)
        self.pair_ids = np.asarray(pair_ids, dtype=str)
        self.assoc = None if assoc is None else np.asarray(assoc, dtype=np.float64)
        self.names, self.rule, self.answer_pair = names, rule, answer_pair

    def __call__(self, rows: np.ndarray, signs: np.ndarray) -> np.ndarray:
        if self.assoc is None:
            return self.observed[rows] * signs
        swapped = self.assoc[rows] * signs[:, None]
        aae, sae = choose_answers(swapped, self.names, self.pair_ids[rows], self.rule, self.answer_pair)
        return gaps(swapped, aae, sae)


def baseline_null(observed: np.ndarray, pair_ids, features, n_perm: int, n_boot: int, seed: int,
                  assoc: np.ndarray | None = None, names: list[str] | None = None, rule: str | None = None,
                  answer_pair=None) -> pd.DataFrame:
    """One row for all prompts and one per dialect feature: the observed mean gap with a 95%
    interval from a pair bootstrap of the whole procedure (pairs resampled within each feature,
    the answers chosen again on every resample, so the interval includes the selection's own
    variability), its standard error (the bootstrap's standard deviation) and the smallest gap the
    pairs could detect (pipeline/stats.py detectable_effect), and the guise permutation null's
    mean and 95% band with the one-sided p-value of a gap at least as large (pairs' guises swapped
    at random, answers chosen again)."""
    gap_of = GapProcedure(observed, pair_ids, assoc, names, rule, answer_pair)
    n_rows = len(gap_of.observed)
    inverse, n_units = unit_index(pair_ids)
    if assoc is not None:
        # The observed gap as the null computes it (float64), so that an unchanged swap ties exactly.
        again = gap_of(np.arange(n_rows), np.ones(n_rows))
        if not np.allclose(again, gap_of.observed, atol=1e-3):
            raise PipelineError(f"the dataset's answers are not those of dataset.answers={rule} on its probing "
                                f"(largest gap difference {np.abs(again - gap_of.observed).max():.3g})")
        gap_of.observed = again
    feats = np.asarray(features, dtype=str) if features is not None else np.full(n_rows, "all")
    groups = [("all", np.ones(n_rows, bool))]
    if len(set(feats)) > 1:
        groups += [(f, feats == f) for f in sorted(set(feats))]
    everything = np.arange(n_rows)

    patterns, exact = sign_patterns(n_units, n_perm, seed)
    null = np.stack([gap_of(everything, pattern[inverse]) for pattern in patterns])  # [patterns, rows]

    unit_rows = [np.flatnonzero(inverse == u) for u in range(n_units)]
    strata = [[u for u in range(n_units) if feats[unit_rows[u][0]] == f] for f in sorted(set(feats))]
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, len(groups)))
    for b in range(n_boot):
        draw = [u for stratum in strata for u in rng.choice(stratum, len(stratum))]
        if rule == "cross_fit" and len(set(draw)) < 2:  # one pair drawn every time: nothing to cross-fit on
            boot[b] = np.nan
            continue
        rows = np.concatenate([unit_rows[u] for u in draw])
        g = gap_of(rows, np.ones(len(rows)))
        boot[b] = [g[mask[rows]].mean() if mask[rows].any() else np.nan for _, mask in groups]

    table = []
    for k, (name, mask) in enumerate(groups):
        gap = float(gap_of.observed[mask].mean())
        null_means = null[:, mask].mean(1)
        band = np.quantile(null_means, [0.025, 0.975])
        finite = np.isfinite(boot[:, k])
        ci = np.nanquantile(boot[:, k], [0.025, 0.975]) if finite.any() else (np.nan, np.nan)
        sem = float(np.nanstd(boot[:, k], ddof=1)) if finite.sum() > 1 else np.nan
        table.append({"feature": name, "n_prompts": int(mask.sum()), "n_pairs": len(set(inverse[mask])),
                      "gap": gap, "ci_low": float(ci[0]), "ci_high": float(ci[1]), "sem": sem,
                      "detectable": float(detectable_effect(sem)), "null_mean": float(null_means.mean()),
                      "null_low": float(band[0]), "null_high": float(band[1]),
                      "p_perm": float(p_value(np.array(gap), null_means, exact, "greater")),
                      "null_draws": len(patterns), "null_exact": exact})
    return pd.DataFrame(table)


def association_null(assoc: np.ndarray, pair_ids, n_perm: int, seed: int, alpha: float = 0.05) -> pd.DataFrame:
    """Per attribute (columns of assoc): the guise permutation null of its mean association, its
    95% band, the two-sided p-value, and Benjamini-Hochberg over all attributes."""
    inverse, n_units = unit_index(pair_ids)
    assoc = np.asarray(assoc, dtype=np.float64)
    valid = ~np.isnan(assoc)  # an attribute scored on a sample of prompts only (dataset.chain_rule_prompts)
    sums = np.zeros((n_units, assoc.shape[1]))
    np.add.at(sums, inverse, np.where(valid, assoc, 0.0))
    counts = np.maximum(valid.sum(0), 1)
    patterns, exact = sign_patterns(n_units, n_perm, seed)
    null = patterns @ sums / counts  # [patterns, attributes]
    p = p_value(np.where(valid, assoc, 0.0).sum(0) / counts, null, exact)
    q, significant = benjamini_hochberg(p, alpha)
    band = np.quantile(null, [0.025, 0.975], axis=0)
    return pd.DataFrame({"null_low": band[0], "null_high": band[1], "p_perm": p, "q_bh": q, "significant_bh": significant})
