"""Circuits of each size from edge scores, and the faithfulness curve with the MIB circuit
track's summary numbers.

faithfulness(C) = (m(C) - m(empty)) / (m(full) - m(empty)), m averaged over prompts: 1 when the
circuit alone reproduces the full model's metric, 0 when it does no better than corrupting
every edge. CPR is the area under the faithfulness curve and CMD the area between it and 1,
over circuit size as a fraction of all edges from 0 (the empty circuit, faithfulness 0) to the
largest size evaluated, by the trapezoid rule (higher CPR and lower CMD are better). 95%
intervals resample prompts (percentile bootstrap).
"""

from __future__ import annotations

import numpy as np
import torch


def size_grid(smallest: float, n_sizes: int) -> np.ndarray:
    """Log-spaced fractions of all edges from `smallest` to 1."""
    return np.unique(np.round(np.logspace(np.log10(float(smallest)), 0.0, int(n_sizes)), 6))


def edge_counts(fractions, n_edges: int) -> list[int]:
    return [max(1, min(n_edges, int(round(f * n_edges)))) for f in fractions]


def top_circuits(scores: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """[n_sizes, n_edges] bool: the `k` edges of largest |score| for each k."""
    order = torch.argsort(scores.abs(), descending=True, stable=True)
    out = torch.zeros(len(counts), len(scores), dtype=torch.bool)
    for i, k in enumerate(counts):
        out[i, order[:k]] = True
    return out


def random_circuits(n_edges: int, counts: list[int], seed: int, draws: int = 1) -> torch.Tensor:
    """[draws x n_sizes, n_edges] bool, draw-major: `draws` random circuits of each size."""
    g = torch.Generator().manual_seed(int(seed))
    out = torch.zeros(draws * len(counts), n_edges, dtype=torch.bool)
    for d in range(draws):
        for i, k in enumerate(counts):
            out[d * len(counts) + i, torch.randperm(n_edges, generator=g)[:k]] = True
    return out


def random_draws(values: torch.Tensor, counts: list[int], n_edges: int, full: torch.Tensor, draws: int) -> torch.Tensor:
    """The evaluated random circuits of the sizes below every edge ([draws x partial sizes, prompts],
    draw-major) as [draws, n_sizes, prompts], the sizes of every edge filled with the full model's
    values (a random circuit of every edge is the full circuit, so it is not evaluated again)."""
    partial = [i for i, k in enumerate(counts) if k < n_edges]
    out = full.expand(draws, len(counts), -1).clone()
    if partial:
        out[:, partial] = values.reshape(draws, len(partial), -1)
    return out


def draw_band(fractions, m_draws: torch.Tensor, m_full: torch.Tensor, m_empty: torch.Tensor) -> dict:
    """The spread of the random draws ([draws, n_sizes, prompts]): per size the lowest and highest
    faithfulness of a draw, and the range of the draws' CPR and CMD."""
    faith = faithfulness(m_draws, m_full, m_empty).numpy()  # [draws, sizes]
    cprs, cmds = zip(*(areas(np.asarray(fractions, dtype=float), f) for f in faith))
    return {"band_low": faith.min(0), "band_high": faith.max(0), "draws": int(len(faith)),
            "cpr_draws": (float(min(cprs)), float(max(cprs))), "cmd_draws": (float(min(cmds)), float(max(cmds)))}


def faithfulness(m_circuits: torch.Tensor, m_full: torch.Tensor, m_empty: torch.Tensor) -> torch.Tensor:
    """[..., n_sizes, n_prompts] metric values -> [..., n_sizes] faithfulness of the prompt means."""
    full, empty = m_full.double().mean(-1), m_empty.double().mean(-1)
    return (m_circuits.double().mean(-1) - empty[..., None]) / (full - empty)[..., None]


def areas(fractions: np.ndarray, faith: np.ndarray) -> tuple[float, float]:
    """(CPR, CMD) of one curve, with the empty circuit at size 0."""
    x = np.concatenate([[0.0], fractions])
    y = np.concatenate([[0.0], faith])
    return float(np.trapezoid(y, x)), float(np.trapezoid(np.abs(1.0 - y), x))


def curve_summary(fractions, m_circuits, m_full, m_empty, n_boot: int, seed: int) -> dict:
    """Faithfulness per size, CPR and CMD, each with a 95% bootstrap interval over prompts."""
    fractions = np.asarray(fractions, dtype=float)
    faith = faithfulness(m_circuits, m_full, m_empty).numpy()
    cpr, cmd = areas(fractions, faith)
    n = m_full.shape[-1]
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(n, (int(n_boot), n), generator=g)
    boot = faithfulness(m_circuits[:, idx].permute(1, 0, 2), m_full[idx], m_empty[idx]).numpy()  # [boot, sizes]
    ok = np.isfinite(boot).all(1)
    boot = boot[ok]
    b_areas = np.array([areas(fractions, row) for row in boot]) if len(boot) else np.full((1, 2), np.nan)
    lo, hi = np.nanpercentile(boot, [2.5, 97.5], axis=0) if len(boot) else (faith * np.nan, faith * np.nan)
    (cpr_lo, cmd_lo), (cpr_hi, cmd_hi) = np.nanpercentile(b_areas, [2.5, 97.5], axis=0)
    first = np.flatnonzero(faith >= 0.8)
    return {"faithfulness": faith, "ci_low": lo, "ci_high": hi, "cpr": cpr, "cpr_ci": (float(cpr_lo), float(cpr_hi)),
            "cmd": cmd, "cmd_ci": (float(cmd_lo), float(cmd_hi)),
            "size_at_0.8": float(fractions[first[0]]) if len(first) else None}
