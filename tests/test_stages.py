"""Whole runs: the default pipeline end to end on the embedded model (a few prompts, through the
CLI as a user runs it), and the stages' shortcuts checked against plain forward passes."""

import json

import pandas as pd
import pytest
import torch

from pipeline.artifacts import read_tensors
from pipeline.attribution import attribute
from pipeline.forward import map_last_logits
from pipeline.runner import run
from conftest import make_cfg, pairs_for, only_run_dir, run_cli


def test_embedded_model_end_to_end(tmp_path):
    result = run_cli(["dataset.max_prompts=6", "patching.max_prompts=2", "patching.sweeps=[resid_pre,head_out]",
                      "attribution.bootstrap=200", "patching.bootstrap=200", "circuit.score_prompts=2",
                      "circuit.eval_prompts=2", "circuit.ig_steps=2", "circuit.n_sizes=3", "circuit.edge_check.top=3",
                      "circuit.edge_check.random=3", "circuit.path_patching.prompts=1", "circuit.bootstrap=200"],
                     cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["model"]["source"] == "embedded" and manifest["device"] == "cpu"
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    assert set(manifest["stages"]) == {"data", "cache", "attribution", "patching", "circuit", "report"}
    circuit = json.loads((run_dir / "tables" / "circuit_summary.json").read_text())
    assert circuit["n_edges"] == 70651 and circuit["n_nodes"] == 302  # SmolLM2: 30 layers, 9 query and 3 key/value heads
    dataset = pd.read_csv(run_dir / "dataset.csv")
    assert list(dataset.columns[:4]) == ["prompt_aae", "prompt_sae", "best_attr_aae", "best_attr_sae"]
    assert {"feature", "template"} <= set(dataset.columns) and len(dataset) == 6
    assert dataset.feature.nunique() == 6  # the subset spreads over features
    for name in ("report.html", "run.log", ".hydra/config.yaml", "tables/metric.csv", "tables/test_prompt.txt",
                 "tables/attribute_association.csv", "tables/head_attribution.csv", "tables/patch_resid_pre.csv",
                 "tables/attrpatch_agreement.csv", "tensors/patch_resid_pre.safetensors",
                 "figures/logit_lens.html", "figures/patch_head_out.html", "figures/attention_top_heads.html"):
        assert (run_dir / name).exists(), name
    association = pd.read_csv(run_dir / "tables" / "attribute_association.csv")
    assert len(association) == 83 and (association.n_tokens > 1).sum() == 37  # multi-token adjectives scored too
    assert set(dataset.best_attr_aae) | set(dataset.best_attr_sae) <= set(association.attribute[association.n_tokens == 1])
    heads = pd.read_csv(run_dir / "tables" / "head_attribution.csv")
    assert len(heads) == 30 * 9 and (heads.ci_low <= heads["mean"]).all() and (heads["mean"] <= heads.ci_high).all()
    assert "layer attribution closes" in (run_dir / "run.log").read_text()


@pytest.mark.parametrize("metric", ["favorability", "logit_diff"])
def test_baseline_from_probing_equals_forward_passes(tmp_path, tiny_model, metric):
    for direction in ("aae_clean", "sae_clean"):
        cfg = make_cfg(["model=tiny", "dataset.max_prompts=9", f"direction={direction}", f"metric={metric}",
                        "stage.stages=[data,cache]"])
        run(cfg, tmp_path / direction)
        base = read_tensors(tmp_path / direction / "tensors" / "baseline.safetensors")
        df = pd.read_csv(tmp_path / direction / "dataset.csv", dtype=str, keep_default_na=False)
        pairs = pairs_for(tiny_model, df, cfg)
        assert pairs.answers.tokens.shape[1] == (2 if metric == "logit_diff" else 46)
        for side in ("clean", "corrupted"):
            forward = map_last_logits(tiny_model, getattr(pairs, side), 4, lambda lg, r: pairs.answers[r].values(lg))
            torch.testing.assert_close(base[f"{side}_metric"], forward, atol=1e-4, rtol=0)


@pytest.mark.parametrize("metric", ["favorability", "logit_diff"])
def test_attribution_from_probing_equals_its_own_pass(tmp_path, tiny_model, monkeypatch, metric):
    """The attribution stage reads what the data stage kept from its probing pass (multi-token
    attributes packed behind each prompt, micro-batches of 4); it equals a pass of its own
    (pipeline/attribution.py: attribute) on the run's prompt pairs, for both directions and for
    the favorability metric as for the logit difference."""
    import pipeline.stages.attribution as stage

    def no_pass(*args, **kwargs):
        raise AssertionError("the attribution stage ran a pass of its own")

    monkeypatch.setattr(stage, "attribute", no_pass)
    for direction in ("aae_clean", "sae_clean"):
        cfg = make_cfg(["model=tiny", "dataset.max_prompts=9", f"direction={direction}", "batch_size=4", f"metric={metric}",
                        "stage.stages=[data,cache,attribution]", "attribution.bootstrap=50", "nulls.permutations=50"])
        run(cfg, tmp_path / direction)
        got = read_tensors(tmp_path / direction / "tensors" / "attribution.safetensors")
        df = pd.read_csv(tmp_path / direction / "dataset.csv", dtype=str, keep_default_na=False)
        pairs = pairs_for(tiny_model, df, cfg)
        for side in ("clean", "corrupted"):
            ref = attribute(tiny_model, getattr(pairs, side), pairs.answers, 3)
            for key in ("logit_lens", "layer", "head", "model_metric"):
                torch.testing.assert_close(got[f"{side}/{key}"], ref[key], atol=1e-4, rtol=0)
            kept = read_tensors(tmp_path / direction / "tensors" / "guise_attribution.safetensors")
            guise = cfg.direction[side]
            for i, att in enumerate(ref["last_attention"]):  # kept in float16 for the attention figures
                torch.testing.assert_close(kept[f"{guise}/attention"][i, :, :, : att.shape[-1]].float(), att, atol=1e-3, rtol=0)
                assert not kept[f"{guise}/attention"][i, :, :, att.shape[-1]:].any()
