"""pipeline.api on the tiny model: a run made from Python is the command's run (the CLI reruns it
and the API reruns the CLI's, with identical tensors), the model stays loaded, runs read back
with their status and clear messages, compare gives the command's tables, and the example
notebook runs end to end."""

from __future__ import annotations

import re
import runpy

import plotly.graph_objects as go
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, make_cfg, run_cli
from pipeline import api, model, tools
from pipeline.artifacts import read_figure, write_figure
from pipeline.errors import PipelineError
from pipeline.rerun import compare_runs

TINY_CACHE = ["model=tiny", "stage=cache", "dataset.max_prompts=8"]


@pytest.fixture
def loads(monkeypatch):
    """Every model load in this process, counted (the API keeps models; start without any)."""
    api.clear_models()
    calls = []
    real = model.load_model

    def counting(model_cfg, device, dtype):
        calls.append((str(model_cfg.name), device, dtype))
        return real(model_cfg, device, dtype)

    monkeypatch.setattr(model, "load_model", counting)
    yield calls
    api.clear_models()


def test_an_api_run_is_the_commands_run_both_ways(tmp_path, monkeypatch, loads):
    monkeypatch.chdir(tmp_path)
    made = api.run(TINY_CACHE)
    # The command's default directory, files and saved overrides.
    assert made.dir.parent.parent == tmp_path / "outputs"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", f"{made.dir.parent.name}/{made.dir.name}")
    assert {p.name for p in (made.dir / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert made.overrides == TINY_CACHE
    hydra = OmegaConf.load(made.dir / ".hydra" / "hydra.yaml").hydra
    assert hydra.job.name == "__main__" and hydra.runtime.cwd == str(tmp_path) and list(hydra.overrides.hydra) == ["hydra.mode=RUN"]
    assert "stage cache: done" in (made.dir / "run.log").read_text()
    assert made.status == "complete" and made.stages_done == ["data", "cache", "report"]
    assert made.manifest["command"] == f"pipeline.api.run({TINY_CACHE!r})"

    # The command reruns the API's run ...
    result = run_cli(["rerun", str(made.dir)], tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "the rerun matches" in result.stdout
    [by_cli] = (tmp_path / "outputs").glob("*/*-rerun")

    # ... and the API reruns the command's, with the model it already holds.
    cli_run = api.load_run(by_cli)
    assert cli_run.overrides == TINY_CACHE and cli_run.manifest["command"].endswith(f"hydra.run.dir={by_cli}")
    again = api.run(cli_run.overrides, run_dir=tmp_path / "again")
    assert again.dir == tmp_path / "again"
    assert compare_runs(by_cli, again.dir) == 0
    assert len(loads) == 1
    assert OmegaConf.load(by_cli / ".hydra" / "config.yaml") == OmegaConf.load(again.dir / ".hydra" / "config.yaml")


def test_models_are_kept_by_config_device_and_dtype(monkeypatch):
    api.clear_models()
    calls = []
    monkeypatch.setattr(model, "load_model", lambda cfg, device, dtype: calls.append(1) or object())
    tiny = make_cfg(["model=tiny"]).model
    first = api.cached_model(tiny, "cpu", torch.float32)
    assert api.cached_model(make_cfg(["model=tiny", "direction=sae_clean", "seed=3"]).model, "cpu", torch.float32) is first
    assert len(calls) == 1
    api.cached_model(tiny, "cpu", torch.bfloat16)
    api.cached_model(make_cfg(["model=tiny", "model.processing.center_unembed=false"]).model, "cpu", torch.float32)
    assert len(calls) == 3
    assert api.clear_models() == 3
    assert api.cached_model(tiny, "cpu", torch.float32) is not first and len(calls) == 4
    api.clear_models()


def test_errors_are_the_commands_one_line_and_failed_runs_open(tmp_path, monkeypatch, loads):
    with pytest.raises(PipelineError) as raised:
        api.run(["model=nope"])
    result = run_cli(["model=nope"], tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == f"dialect-circuits: error: {raised.value}"
    with pytest.raises(PipelineError, match="not command-line flags: -m"):
        api.run(["-m", "direction=aae_clean,sae_clean"])
    with pytest.raises(PipelineError, match="Could not override 'nokey'"):
        api.run(["nokey=1"])
    from hydra import initialize_config_dir

    from pipeline.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        with pytest.raises(PipelineError, match="Hydra is already initialized"):
            api.run(["model=tiny"])

    bogus = ["model=tiny", "dataset.max_prompts=4", "stage=patching", "patching.sweeps=[bogus]"]
    with pytest.raises(PipelineError, match="unknown sweep 'bogus'"):  # refused before any stage runs
        api.run(bogus, run_dir=tmp_path / "refused")
    assert api.load_run(tmp_path / "refused").status == "failed"
    # A run that fails in its patching stage, after data and cache: the same sweep, past validation.
    from pipeline import validation

    monkeypatch.setattr(validation, "check_config", lambda cfg: None)
    with pytest.raises(PipelineError, match="unknown sweep|bogus"):
        api.run(bogus, run_dir=tmp_path / "failed")
    failed = api.load_run(tmp_path / "failed")
    assert failed.status == "failed" and failed.stages == {"data": "done", "cache": "done", "patching": "failed"}
    assert "failed" in repr(failed) and "data, cache" in repr(failed)
    assert len(failed.tables["metric"]) == 4
    with pytest.raises(PipelineError, match=r"no tables/patch_head_out.csv: the patching stage writes it and is failed here \(patching.sweeps: unknown"):
        failed.tables["patch_head_out"]
    with pytest.raises(PipelineError, match=r"no tensors/attribution.safetensors: .* did not run here \(stage=attribution runs it\)"):
        failed.tensors("attribution")
    with pytest.raises(PipelineError, match="not a run directory"):
        api.load_run(tmp_path)


def test_figures_come_back_as_plotly_figures(tmp_path):
    fig = go.Figure(go.Heatmap(z=[[1.0, -2.0], [0.5, 3.0]], x=["a", "b"], y=["0", "1"], colorscale="RdBu"))
    fig.update_layout(title="a heatmap", width=300)
    write_figure(tmp_path / "figures" / "grid.html", fig)
    assert (tmp_path / "figures" / "grid.json").is_file() and (tmp_path / "figures" / "grid.html").is_file()
    back = read_figure(tmp_path / "figures" / "grid.json")
    assert isinstance(back, go.Figure) and back.to_plotly_json() == fig.to_plotly_json()


def test_compare_gives_the_commands_tables(tmp_path):
    from test_compare import make_run

    a = make_run(tmp_path / "a", "aae_clean")
    b = make_run(tmp_path / "b", "sae_clean", shift=1.0)
    for run, stage in ((a, "cache"), (b, "attribution")):  # which stages ran: not part of a label
        cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
        cfg.stage = {"name": stage}
        OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    assert tools.main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    result = api.compare([api.load_run(a), b])
    written = sorted(p.name for p in (tmp_path / "cmp" / "tables").iterdir())
    assert written == sorted(f"compare_{name}.csv" for name in result.tables)
    for name, df in result.tables.items():
        assert df.to_csv(index=False) == (tmp_path / "cmp" / "tables" / f"compare_{name}.csv").read_text()
    assert [run.label for run in result.runs] == ["aae_clean", "sae_clean"]
    with pytest.raises(PipelineError, match="different datasets"):
        api.compare([a, make_run(tmp_path / "c", dataset_hash="e" * 64)])


def test_the_example_notebook_runs_on_the_tiny_model(tmp_path, monkeypatch, loads):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIALECT_CIRCUITS_NOTEBOOK_MODEL", "tiny")
    monkeypatch.setenv("DIALECT_CIRCUITS_NOTEBOOK_PROMPTS", "8")
    names = runpy.run_path(str(REPO / "docs" / "notebook.py"))
    study, mirror = names["run"], names["mirror"]
    assert study.stages_done == ["data", "cache", "report", "attribution", "patching"]
    assert mirror.stages_done == ["data", "cache", "attribution", "report"]
    assert names["effect"].shape[:2] == (2, 4) and "head_attribution" in names["comparison"].tables
    assert (tmp_path / "paper" / "patch_head_out.html").stat().st_size > 100_000
    assert len(loads) == 1 and not api._models  # one load for five runs, released at the end

    # Every artifact of these runs is one that api.MADE_BY gives to a stage that ran.
    for run in (study, mirror):
        for folder in ("tables", "tensors", "figures"):
            for path in (run.dir / folder).iterdir():
                if path.name != "plotly.min.js" and not path.name.startswith("."):
                    assert api.made_by(path.stem) in run.stages_done, path
