"""Summaries of per-prompt values: mean, standard error and a 95% percentile-bootstrap interval
(over pairs where the prompts come in pairs, else over prompts), a sign-flip permutation p-value
against zero with a Benjamini-Hochberg flag, the smallest effect the prompts could detect, and
means per dialect feature."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline.nulls import benjamini_hochberg, detectable_effect, sign_flip_test


def bootstrap_counts(n_prompts: int, n_boot: int, seed: int, units=None) -> torch.Tensor:
    """[n_boot, n_prompts] float64: how often each prompt is drawn in each bootstrap resample of
    prompts or, with `units` (each prompt's pair id), of whole units: every prompt of a drawn unit,
    as often as its unit is drawn."""
    g = torch.Generator().manual_seed(seed)
    if units is None:
        unit_of = torch.arange(n_prompts)
    else:
        if len(units) != n_prompts:
            raise ValueError(f"{len(units)} units for {n_prompts} prompts")
        unit_of = torch.from_numpy(pd.factorize(pd.Series(list(units)))[0].astype(np.int64))
    n_units = int(unit_of.max()) + 1 if len(unit_of) else 0
    idx = torch.randint(max(n_units, 1), (n_boot, n_units), generator=g)  # units drawn with replacement
    drawn = torch.zeros(n_boot, n_units, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    return drawn[:, unit_of]


def summarize(values: torch.Tensor, n_boot: int = 1000, seed: int = 0, units=None) -> dict[str, torch.Tensor]:
    """values [..., n_prompts] (NaN where a prompt does not apply) -> mean, sem, ci_low, ci_high,
    n, each shaped [...]. The interval resamples prompts with replacement `n_boot` times or, with
    `units` (each prompt's pair id), whole pairs: the nine templates of one utterance pair are not
    nine independent observations, and resampling prompts alone gives intervals that are too
    narrow. With units, `sem` is the standard deviation of the pair-bootstrap means (the standard
    error under the same resampling); without, the usual std / sqrt(n)."""
    lead = values.shape[:-1]
    x = values.reshape(-1, values.shape[-1]).double()
    valid = ~torch.isnan(x)
    n = valid.sum(-1)
    filled = torch.where(valid, x, torch.zeros_like(x))
    mean = filled.sum(-1) / n.clamp(min=1)
    var = (torch.where(valid, x - mean[:, None], torch.zeros_like(x)) ** 2).sum(-1) / (n - 1).clamp(min=1)
    sem = (var / n.clamp(min=1)).sqrt()
    counts = bootstrap_counts(values.shape[-1], n_boot, seed, units)
    boot = (filled @ counts.T) / (valid.double() @ counts.T).clamp(min=1)  # [rows, n_boot]
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=-1)
    if units is not None:
        sem = boot.std(-1)
    nan = n == 0
    out = {"mean": mean, "sem": sem, "ci_low": lo, "ci_high": hi}
    out = {k: torch.where(nan, torch.full_like(v, float("nan")), v).reshape(lead).float() for k, v in out.items()}
    out["n"] = n.reshape(lead)
    return out


def feature_means(values: torch.Tensor, features: list[str]) -> dict[str, torch.Tensor]:
    """values [..., n_prompts] -> {feature: mean over that feature's prompts [...]}."""
    feats = np.asarray(features)
    out = {}
    for f in sorted(set(features)):
        cols = torch.from_numpy(np.flatnonzero(feats == f))
        out[f] = torch.nanmean(values[..., cols], dim=-1)
    return out


def summary_table(values: torch.Tensor, keys: pd.DataFrame, features: list[str] | None, n_boot: int, seed: int,
                  n_perm: int = 1000, alpha: float = 0.05, units=None) -> pd.DataFrame:
    """One row per component (rows of `keys`, in the flattened order of values[..., :]) with
    mean, sem, 95% interval (resampling `units` where given, `summarize`), prompt count, the
    smallest mean the prompts could detect (`detectable`: 80% power, two-sided 5% test), the mean
    per feature, and the test of the mean against 0: `p_signflip` (two-sided sign-flip permutation test over prompts, or over `units` such as
    pair ids, whose prompts flip together; `n_perm` random sign patterns, or all of them when there
    are few), `q_bh` (Benjamini-Hochberg adjusted over all components of this table) and
    `significant_bh` (q_bh <= alpha)."""
    s = summarize(values, n_boot, seed, units)
    table = keys.reset_index(drop=True).copy()
    for k in ("mean", "sem", "ci_low", "ci_high"):
        table[k] = s[k].reshape(-1).numpy()
    table["n_prompts"] = s["n"].reshape(-1).numpy()
    table["detectable"] = detectable_effect(table["sem"])
    table["p_signflip"] = sign_flip_test(values.reshape(-1, values.shape[-1]).double().numpy(), n_perm, seed, units)
    table["q_bh"], table["significant_bh"] = benjamini_hochberg(table["p_signflip"].to_numpy(), alpha)
    if features and len(set(features)) > 1:
        for f, m in feature_means(values, features).items():
            table[f"mean_{f}"] = m.reshape(-1).numpy()
    return table


def fdr_over(table: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Benjamini-Hochberg again over all rows of a table joined from several summary_tables (the
    parts of one patching sweep), so the flag counts every component of the table."""
    table = table.copy()
    table["q_bh"], table["significant_bh"] = benjamini_hochberg(table["p_signflip"].to_numpy(), alpha)
    return table


def units_of(dataset: pd.DataFrame, n: int | None = None):
    """Each prompt's pair (`pair_id`) where the dataset has one for every row, for tests whose
    prompts of one pair must move together; else None (prompts taken as independent)."""
    if "pair_id" not in dataset or not dataset["pair_id"].astype(bool).all():
        return None
    return list(dataset["pair_id"])[:n]
