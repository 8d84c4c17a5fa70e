"""Faults of the machine and of saved state, each ending in a correct run or in one line and a
non-zero exit: a full disk, a damaged weights cache, damaged run directories, a resume after
outputs were deleted or changed, a weights cache that moved, and two runs in the same second.
All on the tiny model; the full disk is a write wrapper raising ENOSPC."""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import make_cfg, run_cli
from pipeline import api, model, tools, weights_cache
from pipeline.compare import open_runs
from pipeline.artifacts import read_table, read_tensors, write_atomic, write_json
from pipeline.config import new_dir
from pipeline.errors import PipelineError, WriteError
from pipeline.runner import config_hash, run

TINY = ["model=tiny", "stage=cache", "dataset.max_prompts=4", "nulls.permutations=50", "nulls.bootstrap=50"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished tiny run made as the command makes it (with .hydra/), to copy and damage."""
    made = api.run(TINY, run_dir=tmp_path_factory.mktemp("finished") / "run")
    api.clear_models()
    return made.dir


@pytest.fixture
def copy(finished, tmp_path):
    """A fresh copy of the finished run, named `name`."""
    def make(name: str = "run") -> Path:
        return Path(shutil.copytree(finished, tmp_path / name))
    return make


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dialect-circuits: error: "), err
    return err[0].removeprefix("dialect-circuits: error: ")


# ---------------------------------------------------------------- writes that fail

def test_a_failed_write_leaves_no_temporary_file_and_names_the_file(tmp_path, monkeypatch):
    def half_then(exc):
        def write_bytes(self, data):
            with open(self, "wb") as f:
                f.write(data[: len(data) // 2])  # half of it on disk, as when the disk fills up
            raise exc
        return write_bytes

    monkeypatch.setattr(Path, "write_bytes", half_then(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(WriteError) as caught:
        write_json(tmp_path / "manifest.json", {"a": 1})
    assert str(caught.value) == f"cannot write {tmp_path / 'manifest.json'}: No space left on device (ENOSPC)"
    assert caught.value.no_space and list(tmp_path.iterdir()) == []

    monkeypatch.setattr(Path, "write_bytes", half_then(KeyboardInterrupt()))  # a signal mid-write
    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "x.csv", "a,b\n")
    assert list(tmp_path.iterdir()) == []


FULL_DISK = """
import errno, pathlib, sys
real = pathlib.Path.write_bytes
full = []
def write_bytes(self, data):
    # The first figure fills the disk, and it stays full: every later write fails too.
    if full or self.parent.name == "figures":
        full.append(self)
        with open(self, "wb") as f:
            f.write(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, data)
pathlib.Path.write_bytes = write_bytes
from pipeline.__main__ import main
sys.argv = ["dialect-circuits", *sys.argv[1:]]
main()
"""


def test_a_full_disk_ends_in_one_line_and_the_same_command_resumes(tmp_path, tiny_model):
    run_dir = tmp_path / "run"
    args = [*TINY, f"hydra.run.dir={run_dir}"]
    result = subprocess.run([sys.executable, "-c", FULL_DISK, *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    line = result.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert line == (f"dialect-circuits: error: stage data: cannot write {run_dir}/figures/plotly.min.js: No space left "
                    f"on device (ENOSPC); manifest.json could not be updated either and may still say 'running'; free "
                    f"some space, then resume with the same command and hydra.run.dir={run_dir}")
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]  # no stray temporary files
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["data"]["status"] == "running"  # what the full disk left; said in the line

    # Space freed: the same command with hydra.run.dir resumes and finishes.
    again = run_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
    assert tools.main(["verify", str(run_dir)]) == 0


def test_a_run_directory_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """A read-only disk, or no permission, is refused before Hydra's own first write (its traceback)."""
    from pipeline.__main__ import check_run_dir_writable

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ro").mkdir()
    check_run_dir_writable([f"hydra.run.dir={tmp_path}/ro/new/run"])  # writable: nothing said
    monkeypatch.setattr("os.access", lambda path, mode: Path(path) != tmp_path / "ro")  # as on a read-only mount
    with pytest.raises(PipelineError, match=re.escape(f"cannot write into {tmp_path}/ro: a read-only disk, or no "
                                                      "permission")):
        check_run_dir_writable(["model=tiny", f"hydra.run.dir={tmp_path}/ro/new/run"])
    check_run_dir_writable(["model=tiny"])  # the default outputs/ is elsewhere


def test_a_failed_write_marks_the_stage_failed_when_the_manifest_can_be_written(tmp_path, monkeypatch, tiny_model):
    real = Path.write_bytes

    def failing(self, data):
        if self.name.startswith(".metric.csv.tmp"):
            raise OSError(errno.EIO, "Input/output error")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", failing)
    with pytest.raises(PipelineError) as caught:
        run(make_cfg(TINY), tmp_path / "run")
    assert str(caught.value) == (f"stage cache: cannot write {tmp_path}/run/tables/metric.csv: Input/output error "
                                 f"(EIO); manifest.json marks the cache stage failed; fix that, then resume with the "
                                 f"same command and hydra.run.dir={tmp_path}/run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["stages"]["cache"]["status"] == "failed"
    assert manifest["stages"]["data"]["status"] == "done"


# ---------------------------------------------------------------- the weights cache

@pytest.fixture
def fake_dequantize(monkeypatch, tiny_model):
    """model.dequantize replaced by a copy of the tiny model's folder (the embedded model's 520 MB
    are not needed to test the cache); returns the count of builds."""
    tiny_dir = Path(make_cfg(["model=tiny"]).model.dir)
    builds = []

    def build(gguf, folder):
        builds.append(folder)
        for p in tiny_dir.iterdir():
            shutil.copy(p, folder / p.name)

    monkeypatch.setattr(model, "dequantize", build)
    return builds


def test_a_damaged_weights_cache_is_built_again(tmp_path, fake_dequantize, caplog):
    cfg = make_cfg([f"model.cache_dir={tmp_path}"]).model
    load = lambda: model.load_tokenizer_and_hf_model(cfg, torch.float32)[1]  # noqa: E731
    reference = load().transformer.wte.weight.clone()
    [folder] = [p for p in tmp_path.iterdir()]
    weights = folder / "model.safetensors"
    assert len(fake_dequantize) == 1 and (folder / "checksums.json").exists()
    load()
    assert len(fake_dequantize) == 1  # whole: loaded as it is

    with open(weights, "r+b") as f:  # cut short, as by a disk that filled up
        f.truncate(weights.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="pipeline.weights_cache"):
        assert torch.equal(load().transformer.wte.weight, reference)
    assert len(fake_dequantize) == 2
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"weights cache {folder}: model.safetensors has ") and \
        warning.endswith("recorded; building it again")

    caplog.clear()
    with open(weights, "r+b") as f:  # same size, its header overwritten: only the load and the hash tell
        f.write(b"\xff" * 16)
    with caplog.at_level(logging.WARNING, logger="pipeline.weights_cache"):
        assert torch.equal(load().transformer.wte.weight, reference)
    assert len(fake_dequantize) == 3
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "model.safetensors has changed (same size, another SHA-256) (loading it failed: " in warning

    # A copy written before checksums were recorded loads as it is and gets them.
    (folder / "checksums.json").unlink()
    load()
    assert len(fake_dequantize) == 3 and (folder / "checksums.json").exists()
    assert not [p for p in tmp_path.iterdir() if p != folder]  # no temporary or damaged folder left


FILL_CACHE = """
import sys, time
from pathlib import Path
from pipeline import weights_cache

def slow_build(folder):  # slow enough that the two processes build at the same time
    (folder / "a.bin").write_bytes(b"a" * 100_000)
    time.sleep(1)
    (folder / "b.bin").write_bytes(b"b" * 100_000)

folder = weights_cache.load(Path(sys.argv[1]), slow_build, lambda f: f)
print(*[(folder / n).stat().st_size for n in ("a.bin", "b.bin")])
"""


def test_two_processes_fill_the_weights_cache_at_once(tmp_path):
    target = tmp_path / "copy"
    jobs = [subprocess.Popen([sys.executable, "-c", FILL_CACHE, str(target)], stdout=subprocess.PIPE, text=True)
            for _ in range(2)]
    assert [job.communicate(timeout=120)[0].split() for job in jobs] == [["100000", "100000"]] * 2  # whole copies
    assert all(job.returncode == 0 for job in jobs)
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # the loser's temporary folder is gone
    assert weights_cache.damage(target, hashes=True) is None


# ---------------------------------------------------------------- damaged run directories

DAMAGES = {
    "cut-short": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "not-an-object": lambda text: "[1, 2]\n",
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_manifest_is_one_line_everywhere(copy, capsys, damage):
    damaged, other = copy("damaged"), copy("other")
    manifest = damaged / "manifest.json"
    manifest.write_text(DAMAGES[damage](manifest.read_text()))
    what = {"cut-short": "is damaged: not valid JSON (", "empty": "is damaged: the file is empty",
            "not-an-object": "is damaged: not a manifest"}[damage]

    for command in (["rerun", str(damaged)], ["compare", str(damaged), str(other)], ["verify", str(damaged)]):
        assert tools.main(command) == 2
        line = one_error_line(capsys)
        assert line.startswith(f"{manifest} {what}"), (command, line)
    with pytest.raises(PipelineError, match="^" + re.escape(f"{manifest} {what}")):
        api.load_run(damaged)
    with pytest.raises(PipelineError) as caught:  # a resume
        run(make_cfg(TINY), damaged)
    assert str(caught.value).startswith(f"{manifest} {what}")
    assert str(caught.value).endswith("a run whose manifest is damaged cannot be resumed: run into a new directory")


def test_a_damaged_saved_config_or_table_is_one_line(copy, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a rerun would write, had it started
    damaged, other = copy("damaged"), copy("other")
    (damaged / ".hydra" / "config.yaml").write_text("model: {name: tiny\n")
    expected = f"{damaged}/.hydra/config.yaml is damaged: not valid YAML ("
    assert tools.main(["compare", str(damaged), str(other)]) == 2
    assert one_error_line(capsys).startswith(expected)
    with pytest.raises(PipelineError, match="config.yaml is damaged: not valid YAML"):
        api.load_run(damaged)
    (damaged / ".hydra" / "overrides.yaml").write_text("- model=tiny\n- [stage=cache\n")
    assert tools.main(["rerun", str(damaged)]) == 2
    assert one_error_line(capsys).startswith(f"{damaged}/.hydra/overrides.yaml is damaged: not valid YAML (")

    # A table cut short still parses: the manifest's record tells.
    damaged = copy("table")
    table = damaged / "tables" / "metric.csv"
    size = table.stat().st_size
    table.write_text(table.read_text()[:-40])
    assert tools.main(["compare", str(damaged), str(other)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"{table} has {size - 40} bytes, {size} recorded: that run is damaged"), line
    with pytest.raises(PipelineError, match=f"has {size - 40} bytes, {size} recorded: the run is damaged"):
        api.load_run(damaged).tables["metric"]
    table.write_text("a,b\n1,2\n3,4,5,6\n")  # what a table without a record meets: its reader names it
    with pytest.raises(PipelineError, match=re.escape(f"{table} is damaged: not a readable CSV table (")):
        read_table(table)


def test_verify_names_each_problem(copy, capsys):
    whole = copy("whole")
    assert tools.main(["verify", str(whole)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"{whole}: whole: the run is complete and its ")

    size = (whole / "tables" / "metric.csv").stat().st_size
    (whole / "tensors" / "baseline.safetensors").unlink()
    (whole / "tables" / "metric.csv").write_text("changed\n")
    report = whole / "report.html"
    report.write_bytes(report.read_bytes()[::-1])  # same size, other bytes
    assert tools.main(["verify", str(whole)]) == 1
    assert sorted(capsys.readouterr().err.strip().splitlines()) == [
        f"{whole}: report.html has changed (same size, another SHA-256)",
        f"{whole}: tables/metric.csv has 8 bytes, {size} recorded",
        f"{whole}: tensors/baseline.safetensors is missing"]

    legacy = copy("legacy")  # a run from before outputs were recorded, and one that failed
    manifest = json.loads((legacy / "manifest.json").read_text())
    del manifest["stages"]["data"]["outputs"]
    manifest["stages"]["cache"].update(status="failed", error="boom")
    manifest.update(status="failed", error="boom")
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    assert tools.main(["verify", str(legacy)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{legacy}: the run is failed (boom)",
        f"{legacy}: stage data: its outputs were not recorded (a run made before dialect-circuits recorded them), "
        "so they cannot be checked",
        f"{legacy}: stage cache is failed, not done"]


# ---------------------------------------------------------------- a resume checks outputs

def test_a_resume_runs_again_the_stages_whose_outputs_are_missing_or_changed(copy, caplog):
    resumed = copy()
    before = {p.name: read_tensors(p) for p in (resumed / "tensors").glob("*.safetensors")}
    shutil.rmtree(resumed / "tensors")
    with caplog.at_level(logging.INFO, logger="pipeline"):
        manifest = run(make_cfg(TINY), resumed)
    said = [r.getMessage() for r in caplog.records if r.name == "pipeline"]
    assert "stage data: done before, but tensors/guise_logprobs.safetensors is missing; running it again" in said
    assert "stage cache: done before, but tensors/baseline.safetensors is missing; running it again" in said
    assert manifest["status"] == "complete" and manifest["resumed"] == 1
    for name, tensors in before.items():
        again = read_tensors(resumed / "tensors" / name)
        assert tensors.keys() == again.keys() and all(torch.equal(tensors[k], again[k]) for k in tensors), name
    assert tools.main(["verify", str(resumed)]) == 0

    caplog.clear()
    with open(resumed / "tables" / "baseline_null.csv", "a") as f:
        f.write("1,2,3\n")
    with caplog.at_level(logging.INFO, logger="pipeline"):
        run(make_cfg(TINY), resumed)
    said = [r.getMessage() for r in caplog.records if r.name == "pipeline"]
    assert "stage data: already done in this run (outputs checked), skipped" in said
    assert any(m.startswith("stage cache: done before, but tables/baseline_null.csv has ") for m in said), said


def test_a_run_resumes_after_the_caches_moved(copy, tmp_path, monkeypatch, caplog):
    """Cache folders are not part of the config's identity: a run resumes, is rerun and compared
    after they moved (another machine); the manifest records where they were."""
    resumed = copy()
    old = json.loads((resumed / "manifest.json").read_text())
    monkeypatch.setenv("DIALECT_CIRCUITS_CACHE", str(tmp_path / "moved-cache"))
    monkeypatch.setenv("DIALECT_CIRCUITS_WEIGHTS_CACHE", str(tmp_path / "moved-weights"))
    with caplog.at_level(logging.INFO, logger="pipeline"):
        manifest = run(make_cfg(TINY), resumed)  # no "different config"
    assert manifest["config_hash"] == old["config_hash"] and manifest["status"] == "complete"
    assert manifest["local"] == {"model.dir": str(tmp_path / "moved-cache" / "tiny-gpt2-2x64")} != old["local"]
    assert "stage cache: already done in this run (outputs checked), skipped" in [r.getMessage() for r in caplog.records]
    # The embedded model's weights cache leaves the hash alone too.
    embedded = config_hash(make_cfg([]))
    monkeypatch.setenv("DIALECT_CIRCUITS_WEIGHTS_CACHE", str(tmp_path / "elsewhere"))
    assert config_hash(make_cfg([])) == embedded != config_hash(make_cfg(["model.name=other"]))

    # compare: a cache folder is never what tells two runs apart.
    other = copy("other")
    saved = other / ".hydra" / "config.yaml"
    saved.write_text(saved.read_text().replace("dir: ${oc.env:DIALECT_CIRCUITS_CACHE", "dir: ${oc.env:ELSEWHERE"))
    runs = open_runs([str(resumed), str(other)], allow_different_datasets=False)
    assert runs[0].config["model.dir"] != runs[1].config["model.dir"]
    assert [r.label for r in runs] == ["run", "other"]


# ---------------------------------------------------------------- run directories

def test_runs_started_in_the_same_second_get_directories_of_their_own(tmp_path, monkeypatch):
    path = str(tmp_path / "outputs" / "2026-01-01" / "10-00-00")
    made = []
    threads = [threading.Thread(target=lambda: made.append(new_dir(path))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(made) == [path] + [f"{path}-{n}" for n in range(1, 6)]

    # Through Hydra, as the command's default directory resolves it.
    monkeypatch.chdir(tmp_path)
    overrides = ["model=tiny", "stage=data", "dataset.max_prompts=2", "hydra.run.dir=${new_dir:outputs/same/second}"]
    first, second = api.run(overrides), api.run(overrides)
    assert (first.dir, second.dir) == (tmp_path / "outputs/same/second", tmp_path / "outputs/same/second-1")
    assert first.status == second.status == "complete"
