"""Summaries of per-prompt values: mean, standard error and a 95% percentile-bootstrap interval
over prompts, a sign-flip permutation p-value against zero with a Benjamini-Hochberg flag, and
means per dialect feature."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline.nulls import benjamini_hochberg, sign_flip_test


def summarize(values: torch.Tensor, n_boot: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    """values [..., n_prompts] (NaN where a prompt does not apply) -> mean, sem, ci_low, ci_high,
    n, each shaped [...]. Resamples prompts with replacement `n_boot` times."""
    lead = values.shape[:-1]
    x = values.reshape(-1, values.shape[-1]).double()
    valid = ~torch.isnan(x)
    n = valid.sum(-1)
    filled = torch.where(valid, x, torch.zeros_like(x))
    mean = filled.sum(-1) / n.clamp(min=1)
    var = (torch.where(valid, x - mean[:, None], torch.zeros_like(x)) ** 2).sum(-1) / (n - 1).clamp(min=1)
    sem = (var / n.clamp(min=1)).sqrt()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(values.shape[-1], (n_boot, values.shape[-1]), generator=g)
    counts = torch.zeros(n_boot, values.shape[-1], dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    boot = (filled @ counts.T) / (valid.double() @ counts.T).clamp(min=1)  # [rows, n_boot]
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=-1)
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
    mean, sem, 95% interval, prompt count, the mean per feature, and the test of the mean against
    0: `p_signflip` (two-sided sign-flip permutation test over prompts, or over `units` such as
    pair ids, whose prompts flip together; `n_perm` random sign patterns, or all of them when there
    are few), `q_bh` (Benjamini-Hochberg adjusted over all components of this table) and
    `significant_bh` (q_bh <= alpha)."""
    s = summarize(values, n_boot, seed)
    table = keys.reset_index(drop=True).copy()
    for k in ("mean", "sem", "ci_low", "ci_high"):
        table[k] = s[k].reshape(-1).numpy()
    table["n_prompts"] = s["n"].reshape(-1).numpy()
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
