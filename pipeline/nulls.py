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
- A permutation test of agreement between an attribute ranking and a reference list.

numpy has no permutation tests and scipy is not a dependency; these are a few lines each.
With 2**units <= n_perm every sign pattern is enumerated (an exact test, identity included);
otherwise random patterns and p = (1 + #{null at least as extreme}) / (1 + n_perm).
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from pipeline.data.answers import choose_answers, gaps

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


def sign_flip_test(values: np.ndarray, n_perm: int = 1000, seed: int = 0) -> np.ndarray:
    """values [components, prompts] (NaN where a prompt does not apply) -> two-sided p-value per
    component of its mean against 0, flipping the sign of each prompt's value at random (the same
    patterns for every component)."""
    x = np.asarray(values, dtype=np.float64)
    valid = ~np.isnan(x)
    x = np.where(valid, x, 0.0)
    n = valid.sum(1)
    observed = np.where(n > 0, x.sum(1) / np.maximum(n, 1), np.nan)
    patterns, exact = sign_patterns(x.shape[1], n_perm, seed)
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


# ---------------------------------------------------------------- the baseline's null

def unit_index(units) -> tuple[np.ndarray, int]:
    """Each row's unit (pair) as 0..n_units-1."""
    _, inverse = np.unique(np.asarray(units, dtype=str), return_inverse=True)
    return inverse, int(inverse.max()) + 1 if len(inverse) else 0


def swapped_gaps(assoc: np.ndarray, names: list[str], pair_ids, rule: str, answer_pair, patterns: np.ndarray) -> np.ndarray:
    """Per-row gaps [patterns, rows] with the guises of the pairs where a pattern is -1 swapped and
    the answers chosen again by `rule` on the swapped associations."""
    inverse, _ = unit_index(pair_ids)
    out = np.empty((len(patterns), assoc.shape[0]))
    for k, pattern in enumerate(patterns):
        swapped = assoc * pattern[inverse][:, None]
        aae, sae = choose_answers(swapped, names, pair_ids, rule, answer_pair)
        out[k] = gaps(swapped, aae, sae)
    return out


def cluster_bootstrap(values: np.ndarray, units: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean of `values` resampling whole units (pairs) with
    replacement: the rows of one pair are not independent."""
    inverse, n_units = unit_index(units)
    sums = np.bincount(inverse, weights=values, minlength=n_units)
    counts = np.bincount(inverse, minlength=n_units).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_boot).astype(np.float64)
    boot = (draws @ sums) / (draws @ counts)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return float(lo), float(hi)


def gap_null_table(observed: np.ndarray, null: np.ndarray, exact: bool, pair_ids, features, n_boot: int, seed: int) -> pd.DataFrame:
    """One row for all prompts and one per dialect feature: the observed mean gap (clean - corrupted
    logit difference) with its pair-bootstrap 95% interval, and the guise permutation null's mean
    and 95% band with the one-sided p-value of a gap at least as large."""
    pair_ids = np.asarray(pair_ids, dtype=str)
    groups = [("all", np.ones(len(observed), bool))]
    if features is not None and len(set(features)) > 1:
        feats = np.asarray(features, dtype=str)
        groups += [(f, feats == f) for f in sorted(set(feats))]
    rows = []
    for name, mask in groups:
        gap = float(observed[mask].mean())
        lo, hi = cluster_bootstrap(observed[mask], pair_ids[mask], n_boot, seed)
        null_means = null[:, mask].mean(1)
        band = np.quantile(null_means, [0.025, 0.975])
        rows.append({"feature": name, "n_prompts": int(mask.sum()), "n_pairs": len(set(pair_ids[mask])),
                     "gap": gap, "ci_low": lo, "ci_high": hi, "null_mean": float(null_means.mean()),
                     "null_low": float(band[0]), "null_high": float(band[1]),
                     "p_perm": float(p_value(np.array(gap), null_means, exact, "greater"))})
    return pd.DataFrame(rows)


def baseline_null(observed: np.ndarray, pair_ids, features, n_perm: int, n_boot: int, seed: int,
                  assoc: np.ndarray | None = None, names: list[str] | None = None, rule: str | None = None,
                  answer_pair=None) -> pd.DataFrame:
    """The gap table of gap_null_table under the guise permutation null. With `assoc` (a built
    dataset) the answers are chosen again by `rule` on every swapped matrix; without it the
    answers are fixed and swapping a pair's guises negates its prompts' gaps."""
    observed = np.asarray(observed, dtype=np.float64)
    inverse, n_units = unit_index(pair_ids)
    patterns, exact = sign_patterns(n_units, n_perm, seed)
    if assoc is None:
        null = patterns[:, inverse] * observed[None, :]
    else:
        null = swapped_gaps(np.asarray(assoc, dtype=np.float64), names, pair_ids, rule, answer_pair, patterns)
    return gap_null_table(observed, null, exact, pair_ids, features, n_boot, seed)


def association_null(assoc: np.ndarray, pair_ids, n_perm: int, seed: int, alpha: float = 0.05) -> pd.DataFrame:
    """Per attribute (columns of assoc): the guise permutation null of its mean association, its
    95% band, the two-sided p-value, and Benjamini-Hochberg over all attributes."""
    inverse, n_units = unit_index(pair_ids)
    sums = np.zeros((n_units, assoc.shape[1]))
    np.add.at(sums, inverse, np.asarray(assoc, dtype=np.float64))
    patterns, exact = sign_patterns(n_units, n_perm, seed)
    null = patterns @ sums / assoc.shape[0]  # [patterns, attributes]
    p = p_value(assoc.mean(0), null, exact)
    q, significant = benjamini_hochberg(p, alpha)
    band = np.quantile(null, [0.025, 0.975], axis=0)
    return pd.DataFrame({"null_low": band[0], "null_high": band[1], "p_perm": p, "q_bh": q, "significant_bh": significant})


# ---------------------------------------------------------------- agreement with a reference list

def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties."""
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def list_agreement(scores: np.ndarray, reference: np.ndarray, n_perm: int, seed: int) -> dict:
    """scores [attributes] (the model's association, high = AAE) and reference [attributes] (a
    stereotype list's weight, 0 = not listed). Overlap: how many of the k listed attributes are
    among the model's top k; rank correlation: Spearman over all attributes. Both against the same
    random permutations of the scores over attributes (one-sided: agreement at least as large)."""
    scores, reference = np.asarray(scores, float), np.asarray(reference, float)
    listed = reference > 0
    k = int(listed.sum())

    def stats(s):
        top = np.argsort(-s, kind="stable")[:k]
        return int(listed[top].sum()), spearman(s, reference)

    overlap, rho = stats(scores)
    rng = np.random.default_rng(seed)
    null = np.array([stats(rng.permutation(scores)) for _ in range(n_perm)])
    return {"n_attributes": len(scores), "n_listed": k, "overlap_top_k": overlap, "overlap_null_mean": float(null[:, 0].mean()),
            "p_overlap": float((1 + (null[:, 0] >= overlap).sum()) / (1 + n_perm)),
            "spearman": rho, "p_spearman": float((1 + (null[:, 1] >= rho - TIE).sum()) / (1 + n_perm)),
            "n_perm": n_perm}
