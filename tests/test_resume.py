"""A run killed mid-sweep and started again in its own directory with the same config finishes
without redoing finished cells and gives the same tensors as an uninterrupted run; a finished
run is never overwritten by a different config."""

import json
import re
import signal
import subprocess
import sys
import threading
import time

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


SLOW_CELLS = """
import sys, time
from pipeline.patching import engine
original = engine.PreparedBatch.run_fast
def slowed(*args, **kwargs):
    time.sleep(0.3)
    return original(*args, **kwargs)
engine.PreparedBatch.run_fast = slowed
from pipeline.__main__ import main
sys.argv = ["dialect-circuits", *sys.argv[1:]]
main()
"""


def test_sigterm_mid_stage_marks_interrupted_and_the_same_command_resumes(tmp_path):
    """SIGTERM to the CLI while it patches: the manifest says interrupted (the stage too), the
    finished cells are flushed to the checkpoint although no regular checkpoint was due, and the
    same command with hydra.run.dir=<run> finishes with the tensors of an uninterrupted run."""
    overrides = [o if not o.startswith("patching.checkpoint_every") else "patching.checkpoint_every=100000"
                 for o in OVERRIDES] + ["batch_size=1", "patching.rows_per_run=1"]
    overrides = [o for o in overrides if o not in ("batch_size=3", "patching.rows_per_run=3")]
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "pipeline", *overrides, f"hydra.run.dir={run_dir}"]
    # The first run is the same command with every group of patched cells slowed by 0.3 s, so the
    # signal lands mid-sweep however fast the machine is (the tiny model's sweep takes well under
    # a second otherwise, and the signal could arrive after resid_pre had finished).
    slowed = [sys.executable, "-c", SLOW_CELLS, *overrides, f"hydra.run.dir={run_dir}"]
    job = subprocess.Popen(slowed, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(lambda: job.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not re.search(r"patching resid_pre:\s+\d+%\|[^|\r]*\|\s*[1-9]\d*/", "".join(stderr)):
        assert job.poll() is None and time.monotonic() < deadline, "".join(stderr)[-3000:]
        time.sleep(0.02)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == 128 + signal.SIGTERM
    reader.join(timeout=10)
    lines = "".join(stderr).replace("\r", "\n").splitlines()
    assert lines[-1] == f"dialect-circuits: interrupted by SIGTERM; resume with the same command and hydra.run.dir={run_dir}"
    assert "Traceback" not in "".join(stderr)

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["stages"]["patching"]["status"] == "interrupted"
    partial = read_tensors(run_dir / "tensors" / ".partial" / "patch_resid_pre.safetensors")
    assert 0 < int(partial["done"].sum()) < partial["done"].numel()  # flushed on the signal

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed"] == 1
    assert "resuming patch_resid_pre.safetensors" in again.stdout
    reference = run(make_cfg(overrides), tmp_path / "uninterrupted")
    assert reference["status"] == "complete"
    for name in ("patch_resid_pre", "patch_output"):
        a = read_tensors(tmp_path / "uninterrupted" / "tensors" / f"{name}.safetensors")
        b = read_tensors(run_dir / "tensors" / f"{name}.safetensors")
        for key in a:
            assert torch.equal(a[key].nan_to_num(123.0), b[key].nan_to_num(123.0)), (name, key)
