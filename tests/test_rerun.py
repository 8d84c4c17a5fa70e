"""`dialect-circuits rerun`: a past run's config run again into a new directory gives the same
tensors (determinism on the tiny model), and differences are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from conftest import only_run_dir, run_cli
from pipeline import tools
from pipeline.rerun import compare_runs, merge_overrides

TINY_CACHE = ["model=tiny", "stage=cache", "dataset.max_prompts=8"]


def test_rerun_of_a_tiny_run_gives_identical_tensors(tmp_path):
    result = run_cli(TINY_CACHE, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    old = only_run_dir(tmp_path)
    before = (old / "manifest.json").read_text()

    result = run_cli(["rerun", str(old)], tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    [new] = (tmp_path / "outputs").glob("*/*-rerun")
    assert new != old and (old / "manifest.json").read_text() == before  # the old run is untouched
    assert json.loads((new / "manifest.json").read_text())["status"] == "complete"
    assert list(OmegaConf.load(new / ".hydra" / "overrides.yaml")) == TINY_CACHE
    assert "baseline.safetensors: max abs difference 0 " in result.stdout
    assert "versions: the same" in result.stdout and "the rerun matches" in result.stdout

    # A rerun never writes into a directory that holds files, the old run's least of all.
    result = run_cli(["rerun", str(old), "--out", str(old)], tmp_path)
    assert result.returncode == 2 and "already holds files" in result.stderr


def fake_run(path: Path, tensors: dict, versions: dict, device="cpu", dataset_hash="d") -> Path:
    (path / "tensors").mkdir(parents=True)
    for name, content in tensors.items():
        save_file(content, str(path / "tensors" / name))
    (path / "manifest.json").write_text(json.dumps({"versions": versions, "device": device, "dataset_hash": dataset_hash}))
    return path


def test_compare_runs_names_what_differs(tmp_path, capsys):
    base = {"a.safetensors": {"x": torch.tensor([1.0, float("nan"), 3.0]), "ids": torch.tensor([1, 2])},
            "b.safetensors": {"y": torch.zeros(2, 2)}}
    old = fake_run(tmp_path / "old", base, {"torch": "2.13.0", "transformers": "5.0"})
    same = fake_run(tmp_path / "same", base, {"torch": "2.13.0", "transformers": "5.0"})
    assert compare_runs(old, same) == 0  # NaN where the other has NaN counts as equal
    assert "a.safetensors: max abs difference 0 over 2 tensors (identical)" in capsys.readouterr().out

    moved = {"a.safetensors": {"x": torch.tensor([1.0, float("nan"), 3.001]), "ids": torch.tensor([1, 2])},
             "b.safetensors": {"y": torch.zeros(2, 2)}}
    new = fake_run(tmp_path / "new", moved, {"torch": "2.14.0", "transformers": "5.0"}, device="cuda")
    assert compare_runs(old, new) == 1
    out, err = capsys.readouterr()
    assert "versions: torch 2.13.0 -> 2.14.0" in out and "device: cpu -> cuda" in out
    assert "DIFFERENT, largest in 'x'" in out
    assert len(err.strip().splitlines()) == 1 and err.startswith("dialect-circuits: error: the rerun differs")
    assert compare_runs(old, new, atol=0.01) == 0
    assert "within atol" in capsys.readouterr().out

    missing = fake_run(tmp_path / "missing", {"a.safetensors": base["a.safetensors"]}, {"torch": "2.13.0"},
                       dataset_hash="e")
    assert compare_runs(old, missing) == 1
    err = capsys.readouterr().err
    assert "b.safetensors is only in the old run" in err and "dataset.csv differs" in err


def test_given_overrides_replace_saved_ones():
    saved = ["direction=aae_clean", "model=tiny", "+experiment=quick", "dataset.max_prompts=8"]
    assert merge_overrides(saved, ["direction=sae_clean", "seed=1", "++dataset.max_prompts=4"]) == [
        "model=tiny", "+experiment=quick", "direction=sae_clean", "seed=1", "++dataset.max_prompts=4"]


@pytest.mark.parametrize("args, needle", [
    ([], "required: RUN_DIR"),
    (["{missing}"], "not a run directory (no manifest.json)"),
    (["{no_hydra}"], "has no .hydra/overrides.yaml"),
    (["{no_hydra}", "--atol", "x"], "invalid float value"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, needle):
    no_hydra = tmp_path / "run"
    no_hydra.mkdir()
    (no_hydra / "manifest.json").write_text("{}")
    assert tools.main(["rerun", *[a.format(missing=tmp_path / "nope", no_hydra=no_hydra) for a in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dialect-circuits: error:") and needle in err[0], err
