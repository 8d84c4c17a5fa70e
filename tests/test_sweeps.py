"""Multirun sweeps (Hydra's basic launcher and submitit's local one), the experiment presets and
the Slurm launcher preset; compare on a real multirun of the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from pipeline.config import compose
from omegaconf import OmegaConf

from conftest import REPO, make_cfg, run_cli

TINY_CACHE = ["model=tiny", "stage=cache", "dataset.max_prompts=8"]
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
FEATURES = sorted(pd.read_csv(REPO / "pipeline" / "data" / "pairs.csv").feature.unique())


def only_sweep_dir(root: Path) -> Path:
    """The one sweep directory root/multirun/<date>/<time>."""
    dirs = [p for p in (root / "multirun").glob("*/*") if p.is_dir()]
    assert len(dirs) == 1, dirs
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}", f"{dirs[0].parent.name}/{dirs[0].name}")
    return dirs[0]


def job_manifests(sweep: Path) -> list[dict]:
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == [str(i) for i in range(len(jobs))]
    return [json.loads((job / "manifest.json").read_text()) for job in jobs]


def test_multirun_gives_each_job_its_own_run_and_compare_reads_it(tmp_path):
    result = run_cli(["-m", "direction=aae_clean,sae_clean", *TINY_CACHE], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = only_sweep_dir(tmp_path)
    manifests = job_manifests(sweep)
    assert [m["direction"] for m in manifests] == ["aae_clean", "sae_clean"]
    assert all(m["status"] == "complete" for m in manifests)
    assert manifests[0]["config_hash"] != manifests[1]["config_hash"]
    for job, direction in (("0", "aae_clean"), ("1", "sae_clean")):
        assert f"direction={direction}" in OmegaConf.load(sweep / job / ".hydra" / "overrides.yaml")
        assert OmegaConf.load(sweep / job / ".hydra" / "config.yaml").direction.name == direction
        assert (sweep / job / "tables" / "metric.csv").exists()

    # compare on the multirun directory itself: only metric.csv is there after stage=cache
    result = run_cli(["compare", str(sweep)], tmp_path)
    assert result.returncode == 0, result.stderr
    [out] = sweep.glob("comparison-*")
    assert (out / "comparison.html").exists() and (out / "plotly.min.js").exists()
    table = pd.read_csv(out / "tables" / "compare_metric.csv", keep_default_na=False)
    assert {"mean[aae_clean]", "mean[sae_clean]", "diff[sae_clean - aae_clean]"} <= set(table.columns)
    # The directions mirror each other: sae_clean's clean side is aae_clean's corrupted side with
    # the answers swapped, so its mean logit difference is the negative.
    by = table.set_index(["quantity", "feature"])
    assert by.loc[("clean", "all"), "mean[sae_clean]"] == pytest.approx(-by.loc[("corrupted", "all"), "mean[aae_clean]"], abs=1e-5)


def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path, tiny_model):
    # tiny_model builds the tiny model first, so the two parallel jobs only read it.
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    result = run_cli(["-m", "hydra/launcher=submitit_local", "direction=aae_clean,sae_clean", *TINY_CACHE], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    manifests = job_manifests(only_sweep_dir(tmp_path))
    assert [m["direction"] for m in manifests] == ["aae_clean", "sae_clean"]
    assert [m["status"] for m in manifests] == ["complete", "complete"]


def test_full_experiment_sweeps_both_directions_by_itself(tmp_path):
    # No stages: only the sweep's composition and run directories are under test here.
    result = run_cli(["-m", "+experiment=full", "model=tiny", "device=cpu", "stage.stages=[]"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = only_sweep_dir(tmp_path)
    assert [m["direction"] for m in job_manifests(sweep)] == ["aae_clean", "sae_clean"]
    cfg = OmegaConf.load(sweep / "1" / ".hydra" / "config.yaml")
    assert cfg.patching.max_prompts is None and cfg.dataset.max_prompts is None


def test_every_feature_has_an_experiment():
    assert sorted(e.removeprefix("feature_") for e in EXPERIMENTS if e.startswith("feature_")) == FEATURES


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment):
    cfg = make_cfg([f"+experiment={experiment}", "model=tiny", "stage=cache"])
    assert cfg.model.name == "tiny-gpt2" and cfg.stage.name == "cache"
    if experiment == "quick":
        assert cfg.dataset.max_prompts == 48 and cfg.patching.max_prompts == 16
        assert list(cfg.patching.sweeps) == ["resid_pre", "head_out"] and cfg.patching.attribution_patching
    elif experiment == "full":
        assert cfg.dataset.max_prompts is None and cfg.patching.max_prompts is None
        assert list(cfg.patching.sweeps) == ["resid_pre", "block", "head_out", "head_parts"]
        assert cfg.device == "cuda"
    elif experiment == "curated":
        assert cfg.dataset.pairs == "curated" and cfg.dataset.templates_per_pair is None
    elif experiment in ("scaling", "training"):  # sweeps of models or revisions, run in tests/test_scaling.py
        swept = compose([f"+experiment={experiment}"], return_hydra_config=True).hydra.sweeper.params
        assert list(swept) == (["model"] if experiment == "scaling" else ["model.revision"])
    else:
        assert list(cfg.dataset.features) == [experiment.removeprefix("feature_")]


def test_command_line_wins_over_an_experiment():
    cfg = make_cfg(["+experiment=quick", "dataset.max_prompts=8"])
    assert cfg.dataset.max_prompts == 8


def test_slurm_preset_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    cfg = compose(["hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.partition == "gpu"
    assert launcher.timeout_min > 0 and launcher.cpus_per_task > 0 and launcher.mem_gb > 0
