"""Two or more runs' circuits against each other, for `dialect-circuits compare`: the overlap of their
top edges (pipeline/circuit/overlap.py: pair-bootstrap interval, random-circuit null) where their
graphs are the same, and, where the runs also share a model and each has its saved config
(.hydra/config.yaml, written by the command line), each run's circuit evaluated exactly on every
run's held-out prompts (faithfulness with a pair-bootstrap interval, beside a random circuit of
the same size): e.g. an aae_clean run's circuit on the sae_clean run's prompts. Runs of different
models get the overlap alone, when their graphs have the same shape, and nothing when they do not.

The circuits compared are each run's top `fraction` of edges by |mean score| of its main method,
the fraction its per-feature circuits used (tables/circuit_features.json) or 1%.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import torch

from pipeline.artifacts import read_tensors, read_yaml
from pipeline.circuit.faithfulness import random_circuits, top_circuits
from pipeline.circuit.features import faithfulness_interval, matrix_figure, pair_ids
from pipeline.circuit.overlap import overlaps
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)
FRACTION = 0.01


def scores_of(run) -> tuple[dict, torch.Tensor, list | None] | None:
    """(circuit summary, per-prompt scores of its main method, the scored prompts' pair ids)."""
    path = run.path / "tables" / "circuit_summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    per_prompt = read_tensors(run.path / "tensors" / f"circuit_scores_{summary['methods'][0]}.safetensors")["per_prompt"]
    units = None
    dataset_path = run.path / "dataset.csv"
    if dataset_path.exists():
        data = pd.read_csv(dataset_path, dtype=str, keep_default_na=False)
        if "split" in data:
            data = data[data.split == "discovery"]
        ids = pair_ids(data.reset_index(drop=True))
        units = ids[:per_prompt.shape[0]] if ids else None
    return summary, per_prompt, units


def fraction_of(runs) -> float:
    for run in runs:
        path = run.path / "tables" / "circuit_features.json"
        if path.exists():
            return float(json.loads(path.read_text())["fraction"])
    return FRACTION


def saved_config(run):
    path = run.path / ".hydra" / "config.yaml"
    return read_yaml(path) if path.exists() else None


def transfer(runs, circuits: dict[str, torch.Tensor], k: int, n_prompts: int, n_boot: int, seed: int) -> tuple[pd.DataFrame, str]:
    """Each run's circuit on the first n_prompts held-out prompts of every run (one model loaded
    once), with a random circuit of k edges; or an empty table and the reason it was not done."""
    if n_prompts <= 0:
        return pd.DataFrame(), "not asked for (--circuit-prompts 0)"
    models = {json.dumps(run.manifest.get("model"), sort_keys=True) for run in runs}
    if len(models) > 1:
        return pd.DataFrame(), "the runs' models differ, so one run's circuit cannot run on another's prompts"
    configs = [saved_config(run) for run in runs]
    if any(c is None for c in configs):
        return pd.DataFrame(), "a run has no saved config (.hydra/config.yaml: runs made from the command line have one)"
    from pipeline.circuit import edges
    from pipeline.circuit.graph import edge_hooks
    from pipeline.runner import RunContext

    contexts = [RunContext(cfg, run.path) for cfg, run in zip(configs, runs)]
    try:
        model = contexts[0].model
    except (PipelineError, OSError) as err:
        return pd.DataFrame(), f"the model could not be loaded here ({err})"
    for ctx in contexts[1:]:
        ctx.__dict__["model"] = model  # the same model: load it once
    names = list(circuits)
    n_edges = next(iter(circuits.values())).shape[0]
    blocks = torch.stack([torch.ones(n_edges, dtype=torch.bool), torch.zeros(n_edges, dtype=torch.bool), *circuits.values(),
                          random_circuits(n_edges, [k], seed)[0]])
    rows = []
    with edge_hooks(model):
        for j, (run, ctx) in enumerate(zip(runs, contexts)):
            held = ctx.dataset.iloc[ctx.side_rows("heldout")].reset_index(drop=True)
            n = min(n_prompts, len(held))
            if not n:
                continue
            metric = str(ctx.cfg.metric.name)
            m = edges.evaluate(model, ctx.heldout.take(range(n)), blocks, metric, int(ctx.cfg.circuit.batch_size),
                               int(ctx.cfg.circuit.rows_per_run), desc=f"circuits on the held-out prompts of {run.label}")
            units = pair_ids(held)
            units = units[:n] if units else None
            for name, values in zip([*names, "random"], m[2:]):
                faith, low, high, _ = faithfulness_interval(values, m[0], m[1], units, n_boot, seed + j)
                rows.append({"circuit": name, "prompts": run.label, "n_prompts": n, "metric": metric, "faithfulness": faith,
                             "ci_low": low, "ci_high": high, "m_full": float(m[0].mean()), "m_empty": float(m[1].mean())})
    return pd.DataFrame(rows), ""


def across_runs(runs, n_prompts: int, n_boot: int = 1000, seed: int = 0) -> dict | None:
    """The overlap table, the transfer table (or why there is none) and their figure; None when
    fewer than two runs have a circuit of one graph shape."""
    loaded = [(run, x) for run in runs if (x := scores_of(run)) is not None]
    if len(loaded) < 2 or len({tuple(x[0]["graph_shape"]) for _, x in loaded}) > 1:
        return None
    runs = [run for run, _ in loaded]
    n_edges = loaded[0][1][1].shape[-1]
    k = max(1, int(round(fraction_of(runs) * n_edges)))
    scores = {run.label: x[1] for run, x in loaded}
    rows, _ = overlaps(scores, {run.label: x[2] for run, x in loaded}, k, n_boot, seed)
    overlap = pd.DataFrame(rows)
    circuits = {label: top_circuits(s.float().mean(0), [k])[0] for label, s in scores.items()}
    table, why_not = transfer(runs, circuits, k, n_prompts, n_boot, seed)
    null = overlap.iloc[0][["null_mean", "null_low", "null_high"]].to_dict()
    fig = matrix_figure(overlap, table, k, null, f"The runs' circuits: the top {k} edges of each "
                                                 f"({100 * k / n_edges:.2g}% of {n_edges})")
    return {"overlap": overlap, "transfer": table, "why_not": why_not, "k": k, "null": null, "figure": fig}
