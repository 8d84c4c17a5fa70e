"""A run killed mid-sweep and started again in its own directory with the same config finishes
without redoing finished cells and gives the same tensors as an uninterrupted run; a finished
run is never overwritten by a different config."""

import json

import pytest
import torch

from pipeline.artifacts import read_tensors
from pipeline.errors import PipelineError
from pipeline.patching import engine
from pipeline.runner import run
from conftest import make_cfg

OVERRIDES = ["model=tiny", "dataset.max_prompts=6", "patching.max_prompts=6", "batch_size=3",
             "patching.sweeps=[resid_pre,head_out]", "patching.checkpoint_every=4",
             "patching.attribution_patching=false", "patching.rows_per_run=3", "stage.stages=[data,cache,patching]"]


ORIGINAL_RUN_FAST = engine.PreparedBatch.run_fast


class Killed(Exception):
    """Stands in for the process being killed mid-sweep."""


def count_groups(monkeypatch, fail_after=None):
    calls = {"cells": 0}
    original = ORIGINAL_RUN_FAST

    def counted(self, model, cells, rows_per_run):
        if fail_after is not None and calls["cells"] >= fail_after:
            raise Killed("killed mid-sweep")
        calls["cells"] += len(cells)
        return original(self, model, cells, rows_per_run)

    monkeypatch.setattr(engine.PreparedBatch, "run_fast", counted)
    return calls


def test_killed_sweep_resumes_without_redoing_cells(tmp_path, monkeypatch):
    cfg = make_cfg(OVERRIDES)
    whole = count_groups(monkeypatch)
    run(cfg, tmp_path / "uninterrupted")
    total = whole["cells"]

    count_groups(monkeypatch, fail_after=total // 3)
    with pytest.raises(Killed):
        run(cfg, tmp_path / "killed")
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert manifest["stages"]["patching"]["status"] == "failed" and manifest["status"] == "failed"
    partial = read_tensors(tmp_path / "killed" / "tensors" / ".partial" / "patch_resid_pre.safetensors")
    saved = int(partial["done"].sum())
    assert 0 < saved < partial["done"].numel()

    resumed = count_groups(monkeypatch)
    run(cfg, tmp_path / "killed")
    assert resumed["cells"] == total - saved  # only the cells missing from the checkpoint ran
    assert not (tmp_path / "killed" / "tensors" / ".partial" / "patch_resid_pre.safetensors").exists()
    for name in ("patch_resid_pre", "patch_output"):
        a = read_tensors(tmp_path / "uninterrupted" / "tensors" / f"{name}.safetensors")
        b = read_tensors(tmp_path / "killed" / "tensors" / f"{name}.safetensors")
        for key in a:
            assert torch.equal(a[key].nan_to_num(123.0), b[key].nan_to_num(123.0)), (name, key)
    assert json.loads((tmp_path / "killed" / "manifest.json").read_text())["status"] == "complete"


def test_different_config_refuses_existing_run(tmp_path):
    run(make_cfg(["model=tiny", "dataset.max_prompts=4", "stage.stages=[data]"]), tmp_path / "run")
    with pytest.raises(PipelineError, match="different config"):
        run(make_cfg(["model=tiny", "dataset.max_prompts=5", "stage.stages=[data]"]), tmp_path / "run")
