"""One circuit per dialect feature (pipeline/circuit/features.py, overlap.py): the prompt choice, the
overlap and its null against hand-built scores, the faithfulness interval against a hand-computed
value, and the stage on the tiny model: every table, the per-feature scores equal to the pooled
scores of the same prompts, and the report's section."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from pipeline.artifacts import read_tensors
from pipeline.circuit.features import faithfulness_interval, spread_rows
from pipeline.circuit.overlap import overlaps, random_band
from pipeline.artifacts import write_json, write_table
from pipeline.circuit.across_runs import across_runs
from pipeline.compare import compare
from pipeline.data.splits import assign_split
from pipeline.runner import RunContext
from pipeline.stages import circuit as circuit_stage
from pipeline.stages import report
from conftest import make_cfg
from test_prompts import small_dataset


def test_spread_rows_takes_one_row_of_every_pair_before_a_second():
    features = ["a", "a", "b", "a", "b", "a"]
    pairs = ["a1", "a1", "b1", "a2", "b1", "a2"]
    assert spread_rows(features, pairs, 3) == {"a": [0, 3, 1], "b": [2, 4]}
    assert spread_rows(features, None, 2) == {"a": [0, 1], "b": [2, 4]}


def test_overlap_of_equal_and_of_disjoint_circuits_and_the_random_null():
    n = 1000
    base = torch.zeros(4, n)
    base[:, :10] = torch.tensor([5.0, 4.0, 3.0, 2.0])[:, None]  # the same top 10 on every prompt
    other = torch.zeros(4, n)
    other[:, 500:510] = -3.0  # a top 10 of its own (sign does not matter: |score|)
    rows, boot = overlaps({"a": base, "b": base.clone(), "c": other}, {"a": ["p", "p", "q", "q"], "b": None, "c": None},
                          10, 200, 0)
    table = pd.DataFrame(rows).set_index(["a", "b"])
    assert table.loc[("a", "b"), ["overlap", "ci_low", "ci_high"]].tolist() == [1.0, 1.0, 1.0]
    assert table.loc[("a", "c"), ["overlap", "ci_low", "ci_high"]].tolist() == [0.0, 0.0, 0.0]
    assert boot.shape == (3, 200) and (table.null_mean == 10 / n).all()
    band = random_band(n, 100, 4000, 0)  # two random 100-edge circuits of 1000 share 10% on average
    assert band["null_low"] < 0.1 < band["null_high"] and band["null_mean"] == 0.1


def test_faithfulness_interval_by_hand():
    m_circuit, full, empty = torch.tensor([1.0, 3.0, 2.0]), torch.tensor([2.0, 4.0, 3.0]), torch.zeros(3)
    faith, low, high, boot = faithfulness_interval(m_circuit, full, empty, ["x", "x", "y"], 500, 0)
    assert np.isclose(faith, 6 / 9)  # (2 - 0) / (3 - 0)
    # two pairs: the resamples are {x, x} (4/6), {y, y} (2/3) and {x, y} (6/9): all 2/3
    assert np.allclose(boot, 2 / 3) and np.isclose(low, 2 / 3) and np.isclose(high, 2 / 3)


OVERRIDES = ["model=tiny", "metric=logit_diff", "batch_size=4", "circuit.batch_size=4", "circuit.score_prompts=6",
             "circuit.eval_prompts=2", "circuit.heldout_prompts=2", "circuit.n_sizes=3", "circuit.path_patching.enabled=false",
             "circuit.bootstrap=50", "circuit.features.score_prompts=2", "circuit.features.heldout_prompts=1",
             "circuit.features.fraction=0.1", "circuit.features.random_draws=1"]


def circuit_run(run_dir: Path, model, overrides: list[str]) -> Path:
    """The circuit and report stages on 24 prompts of every feature, half of the pairs held out,
    with the session's tiny model (no data stage: its dataset.csv is written here)."""
    cfg = make_cfg(OVERRIDES + overrides)
    data = small_dataset(24)
    data["split"] = assign_split(data, 0.5, "pair", 0)
    write_table(run_dir / "dataset.csv", data)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # as the command line saves it
    write_json(run_dir / "manifest.json", {"model": {"name": "tiny"}, "direction": str(cfg.direction.name), "stages": {}})
    ctx = RunContext(cfg, run_dir)
    ctx.__dict__["model"] = model
    circuit_stage.run(ctx)
    report.run(ctx)
    return run_dir


def test_feature_circuits_in_the_stage_the_report_and_across_runs(tmp_path, tiny_model):
    run_dir = circuit_run(tmp_path / "aae", tiny_model, [])
    tables = run_dir / "tables"
    summary = json.loads((tables / "circuit_features.json").read_text())
    features = summary["features"]
    assert len(features) >= 2 and summary["edges"] == 11 and summary["method"] == "eap" and summary["pooled"]
    overlap = pd.read_csv(tables / "circuit_feature_overlap.csv")
    names = len(features) + 1  # and the pooled circuit
    assert len(overlap) == names * (names - 1) // 2
    assert ((overlap.ci_low <= overlap.overlap + 1e-9) & (overlap.overlap <= overlap.ci_high + 1e-9)).all()
    transfer = pd.read_csv(tables / "circuit_feature_transfer.csv")
    held = transfer.prompts.unique()
    assert len(transfer) == (len(features) + 2) * len(held)  # the features', the pooled and the random circuit
    assert set(transfer.circuit) == {*features, "pooled", "random"} and transfer.faithfulness.notna().all()

    # A prompt scored both per feature and for the pooled circuit has the same EAP scores in both.
    per_feature = read_tensors(run_dir / "tensors" / "circuit_feature_scores.safetensors")
    pooled = read_tensors(run_dir / "tensors" / "circuit_scores_eap.safetensors")["per_prompt"]
    common = [(i, int(r)) for i, r in enumerate(per_feature["rows"]) if int(r) < pooled.shape[0]]
    assert common
    for i, r in common:
        assert torch.allclose(per_feature["per_prompt"][i], pooled[r], atol=1e-5)

    paths = pd.read_csv(tables / "circuit_paths.csv")
    assert len(paths) and paths.path.str.startswith("input -> ").all() and paths.path.str.endswith("logits").all()
    assert (paths.share.diff().dropna() <= 1e-15).all() and paths.share.sum() <= 1 + 1e-9  # best first; shares of one flow
    page = (run_dir / "report.html").read_text()
    assert "One circuit or one per feature?" in page and "Strongest input-to-logits paths" in page
    assert 'src="figures/circuit_features.html"' in page and 'src="figures/circuit_graph.html"' in page

    # Across runs (`compare`): the other direction's circuit on these prompts and this one's on its prompts.
    other = circuit_run(tmp_path / "sae", tiny_model, ["direction=sae_clean"])
    out = compare([str(run_dir), str(other)], str(tmp_path / "cmp"), False, circuit_prompts=2)
    page = (out / "comparison.html").read_text()
    assert "Do the runs find the same circuit?" in page and "not evaluated" not in page
    overlap_runs = pd.read_csv(out / "tables" / "compare_circuit_overlap.csv")
    assert len(overlap_runs) == 1 and (overlap_runs.edges == 11).all()  # the per-feature circuits' 10% of 110 edges
    table = pd.read_csv(out / "tables" / "compare_circuit_transfer.csv").set_index(["circuit", "prompts"])
    assert len(table) == 3 * 2  # the aae_clean, sae_clean and random circuits on each run's held-out prompts
    s = json.loads((tables / "circuit_summary.json").read_text())
    assert np.isclose(table.loc[("aae_clean", "aae_clean"), "m_full"], s["m_full_heldout"], atol=1e-5)  # same prompts, model
    assert np.isclose(table.loc[("aae_clean", "aae_clean"), "m_empty"], s["m_empty_heldout"], atol=1e-5)
    runs = [SimpleNamespace(path=p, label=p.name, manifest={"model": {"name": p.name}}) for p in (run_dir, other)]
    assert across_runs(runs, 2, 50)["why_not"].startswith("the runs' models differ")
