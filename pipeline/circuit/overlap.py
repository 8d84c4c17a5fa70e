"""How much two circuits share: the overlap of their top-k edges with a pair-bootstrap interval,
beside the overlap two random circuits of the same size would have.

overlap(A, B) = |top_k(A) & top_k(B)| / k, the share of k edges the two circuits have in common
(both have k edges, so it is also the share of either). The interval resamples each circuit's
prompts by pair (pipeline/stats.py bootstrap_counts: the templates of one utterance pair move
together), ranks the edges again on each resample's mean scores and takes the overlap of the two
resampled top-k sets; circuits scored on different prompts are resampled independently. A resample's
top-k set is noisier than the full sample's, so resampled overlaps run low and a plain percentile
interval can lie wholly below the estimate: the interval is the resamples' 2.5th and 97.5th
percentiles shifted by the bootstrap's estimate of that bias (the overlap minus the resamples'
mean), within [0, 1]. The null
is the overlap of two circuits of k edges drawn at random out of n: hypergeometric, mean k / n.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.stats import bootstrap_counts


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[..., n_edges] -> [..., k] indices of the k edges of largest |score| (ties by edge order)."""
    return torch.argsort(scores.abs(), dim=-1, descending=True, stable=True)[..., :k]


def boot_top_k(per_prompt: torch.Tensor, units, k: int, n_boot: int, seed: int, chunk: int = 100) -> torch.Tensor:
    """[n_boot, k] top-k edges of the mean score over each pair-bootstrap resample of the prompts."""
    weights = bootstrap_counts(per_prompt.shape[0], n_boot, seed, units).float()
    weights = weights / weights.sum(1, keepdim=True).clamp(min=1)
    values = per_prompt.float()
    # topk, not a full sort: the same set but for ties at the k-th edge, and far faster
    return torch.cat([torch.topk((w @ values).abs(), k, dim=-1).indices for w in torch.split(weights, chunk)])


def shared(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[rows, k] and [rows, k] edge indices (no repeats within a row) -> [rows] count of edges in
    both sets of a row: the equal neighbours once both rows are sorted together."""
    both = torch.cat([a, b], 1).sort(1).values
    return (both[:, 1:] == both[:, :-1]).sum(1)


def shifted_interval(estimate: float, resampled: np.ndarray, bounds=(0.0, 1.0)) -> tuple[float, float]:
    """The 95% percentile interval shifted by the bootstrap's bias estimate (module docstring)."""
    shift = estimate - float(np.nanmean(resampled))
    q_low, q_high = np.nanpercentile(resampled, [2.5, 97.5])
    return float(np.clip(q_low + shift, *bounds)), float(np.clip(q_high + shift, *bounds))


def random_band(n_edges: int, k: int, draws: int, seed: int) -> dict:
    """The overlap of two random k-edge circuits: mean k / n and the 95% band of `draws` draws."""
    counts = np.random.default_rng(seed).hypergeometric(k, n_edges - k, k, size=max(int(draws), 1)) / k
    low, high = np.percentile(counts, [2.5, 97.5])
    return {"null_mean": k / n_edges, "null_low": float(low), "null_high": float(high)}


def overlaps(scores: dict[str, torch.Tensor], units: dict[str, list | None], k: int, n_boot: int,
             seed: int) -> tuple[list[dict], np.ndarray]:
    """One row per pair of circuits (a, b), a before b in `scores` order: the overlap of their top-k
    edges, its 95% pair-bootstrap interval and the random-circuit null. `scores` maps a name to its
    per-prompt edge scores [n_prompts, n_edges]; `units` to each prompt's pair id (None: prompts
    are independent). Also each pair's overlap on every resample, [n_pairs, n_boot]."""
    names = list(scores)
    n_edges = next(iter(scores.values())).shape[-1]
    k = max(1, min(int(k), n_edges))
    point = {n: top_k(s.float().mean(0), k)[None] for n, s in scores.items()}
    boot = {n: boot_top_k(s, units.get(n), k, n_boot, seed + i) for i, (n, s) in enumerate(scores.items())}
    null = random_band(n_edges, k, n_boot, seed)
    rows, resampled = [], []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            values = shared(boot[a], boot[b]).double().numpy() / k
            resampled.append(values)
            estimate = float(shared(point[a], point[b])[0]) / k
            low, high = shifted_interval(estimate, values)
            rows.append({"a": a, "b": b, "edges": k, "overlap": estimate, "ci_low": low, "ci_high": high, **null})
    return rows, np.array(resampled).reshape(len(rows), -1)
