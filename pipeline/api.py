"""Running stages and reading finished runs from Python (a notebook, a script).

    from pipeline import api
    run = api.run(["direction=sae_clean", "dataset.max_prompts=48", "stage=attribution"])
    run.tables["head_attribution"]                # pandas DataFrame
    run.tensors("patch_output")["normalized"]     # torch tensor, read from safetensors on access
    run.figure("patch_head_out")                  # plotly Figure
    run.config, run.manifest, run.dir, run.status, run.stages_done
    old = api.load_run("outputs/2026-11-29/22-48-44")
    api.compare([run, old]).tables["head_attribution"]

`run` goes through Hydra exactly as the command does (the same conf/, the same overrides, the
same run directory with .hydra/, run.log and manifest.json), so `dialect-circuits rerun` repeats
a run made here and `api.load_run` reads one made by the command. What differs: the model stays
loaded in this process between runs with the same model config, device and dtype
(`clear_models()` releases them), and bad input raises a PipelineError with the one-line message
the command prints instead of exiting.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from pipeline.artifacts import file_problem, read_figure, read_json, read_table, read_yaml, tensors_error
from pipeline.errors import PipelineError
from pipeline.runner import read_manifest

log = logging.getLogger("pipeline")

# The job name hydra.main gives the command (the stem of pipeline/__main__.py), so that a run
# made here writes the same .hydra/hydra.yaml as one made by `dialect-circuits`.
JOB_NAME = "__main__"

# Which stage writes an artifact, by the start of its name (tables/, tensors/, figures/), for the
# message when a run lacks one. Kept beside the stages' own names: tests/test_api.py checks that
# every artifact of a full run is listed here.
MADE_BY = {
    "data": ("dataset", "attribute_association", "guise_logprobs", "guise_attribution", "stereotype_agreement",
             "prejudice_score", "power"),
    "cache": ("metric", "baseline", "test_prompt"),
    "attribution": ("logit_lens", "layer_attribution", "head_attribution", "top_heads", "attribution", "attention_"),
    "patching": ("patch_", "attrpatch"),
    "intervene": ("intervention", "intervene", "dialect_directions"),
}

# ---------------------------------------------------------------- models kept loaded

_models: dict[tuple[str, str, str], object] = {}


def cached_model(model_cfg, device: str, dtype):
    """The model of `model_cfg` on `device` in `dtype`, loaded once per process (the runner's
    `load_model` hook). The key is the whole resolved model config, so changing any of its keys
    (model.name, processing flags, ...) loads a new model."""
    from pipeline.model import load_model

    key = (OmegaConf.to_yaml(model_cfg, resolve=True), str(device), str(dtype))
    if key in _models:
        log.info("model %s on %s: already loaded in this process", model_cfg.name, device)
    else:
        _models[key] = load_model(model_cfg, device, dtype)
    return _models[key]


def clear_models() -> int:
    """Release every model `run` kept loaded; returns how many there were."""
    import torch

    n = len(_models)
    _models.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return n


# ---------------------------------------------------------------- running

def run(overrides: list[str] | None = None, run_dir: str | Path | None = None) -> "Run":
    """Compose the config from `overrides` (Hydra's syntax, as on the command line), run its
    stages into `run_dir` (default: outputs/<date>/<time> under the working directory, as the
    command) and return the finished Run. A run_dir that holds a run of the same config resumes
    it, and may add stages to it (`stage` is not part of the config's identity)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException

    from pipeline import runner
    from pipeline.__main__ import check_group_choices
    from pipeline.config import CONF_DIR
    from pipeline.rerun import hydra_quote

    if GlobalHydra.instance().is_initialized():
        raise PipelineError("Hydra is already initialized in this process (inside a hydra.initialize context?): "
                            "call api.run outside it; it composes conf/ itself")
    overrides = [str(o) for o in (overrides or [])]
    flags = [o for o in overrides if o.startswith("-")]
    if flags:
        raise PipelineError(f"api.run takes Hydra overrides (key=value), not command-line flags: {' '.join(flags)}")
    check_group_choices(overrides)
    command = f"pipeline.api.run({overrides!r})"
    if run_dir is not None:
        overrides.append(f"hydra.run.dir={hydra_quote(str(Path(run_dir).resolve()))}")
    overrides.append("hydra.mode=RUN")  # as hydra.main adds it for a run that is not a multirun

    outcome: dict = {}

    def task(cfg) -> None:  # what hydra_main in pipeline/__main__.py does, keeping the model
        outcome["dir"] = Path(HydraConfig.get().runtime.output_dir)
        try:
            runner.run(cfg, outcome["dir"], load_model=cached_model, command=command)
            log.info("run directory: %s", outcome["dir"])
        except Exception as err:  # raised below, after Hydra has finished the job
            if isinstance(err, PipelineError):
                log.error("%s", err)  # into run.log, as the command does
            outcome["error"] = err

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        # Hydra's own run path (hydra.main ends in the same call): composes with the compose API's
        # config search, writes .hydra/ and configures the run's logging into run.log.
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=JOB_NAME):
            GlobalHydra.instance().hydra.run(config_name="config", task_function=task, overrides=overrides)
    except HydraException as err:  # a bad override: Hydra's message, in one line
        raise PipelineError(" ".join(str(err).split())) from None
    finally:
        restore_logging(root, handlers, level)
    if "error" in outcome:
        raise outcome["error"]
    return Run(outcome["dir"])


def restore_logging(root: logging.Logger, handlers: list[logging.Handler], level: int) -> None:
    """Hand the notebook its logging back: close the handlers Hydra added (run.log's among them)
    and put back the ones that were there."""
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


# ---------------------------------------------------------------- reading

def load_run(path: str | Path) -> "Run":
    """A finished (or half-finished, or failed) run directory, read-only."""
    return Run(path)


def compare(runs: list, out: str | Path | None = None, allow_different_datasets: bool = False, circuit_prompts: int = 8):
    """The comparison `dialect-circuits compare` makes, as DataFrames: `.tables[name]` is
    tables/compare_<name>.csv, `.runs` the runs with their labels, `.skipped` what could not be
    compared. `runs`: Run objects or directories (a multirun directory stands for its jobs).
    With `out`, also writes the command's comparison.html and CSVs there. `circuit_prompts`: as
    `--circuit-prompts` (0: the circuits' edges only, no model loaded)."""
    from pipeline import compare as comparing

    dirs = [str(r.dir if isinstance(r, Run) else r) for r in runs]
    runs = comparing.open_runs(dirs, allow_different_datasets)
    for run in runs:
        if run.manifest.get("status") != "complete":
            log.warning("%s did not finish (status %s); its tables may be partial", run.label, run.manifest.get("status"))
    result = comparing.comparison(runs, circuit_prompts)
    if out is not None:
        comparing.write_comparison(result, Path(out))
    return result


def made_by(name: str) -> str | None:
    """The stage that writes the artifact `name` (a file's stem), if known."""
    for stage, prefixes in MADE_BY.items():
        if name.startswith(prefixes):
            return stage
    return None


class Tensors(Mapping):
    """The tensors of one safetensors file; each is read from disk when asked for."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        with tensors_error(path), safe_open(str(path), framework="pt") as f:
            self._keys = list(f.keys())
            self.metadata = f.metadata() or {}

    def __getitem__(self, key: str):
        from safetensors import safe_open

        if key not in self._keys:
            raise KeyError(f"{key!r} is not in {self.path.name}; it holds {', '.join(self._keys)}")
        with tensors_error(self.path), safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"<Tensors {self.path.name}: {', '.join(self._keys)}>"


class Tables(Mapping):
    """tables/*.csv of a run as DataFrames, read when asked for."""

    def __init__(self, run: "Run"):
        self.run = run

    def __getitem__(self, name: str) -> pd.DataFrame:
        return read_table(self.run.path_of("tables", name, ".csv"))

    def __iter__(self):
        return iter(sorted(p.stem for p in (self.run.dir / "tables").glob("*.csv") if not p.name.startswith(".")))

    def __len__(self) -> int:
        return len(list(iter(self)))

    def __repr__(self) -> str:
        return f"<Tables of {self.run.dir.name}: {', '.join(self)}>"


class Run:
    """One run directory, read-only: its manifest, config, tables, tensors and figures."""

    def __init__(self, path: str | Path):
        self.dir = Path(path).resolve()
        if not (self.dir / "manifest.json").is_file():
            raise PipelineError(f"{path} is not a run directory (no manifest.json)")
        self.manifest = read_manifest(self.dir)
        saved = self.dir / ".hydra" / "config.yaml"
        self.config = read_yaml(saved) if saved.is_file() else None
        self.tables = Tables(self)

    @property
    def status(self) -> str:
        """complete, failed, or running (also what a killed run stays at)."""
        return str(self.manifest.get("status"))

    @property
    def overrides(self) -> list[str]:
        """The overrides the run was composed with (.hydra/overrides.yaml), what `rerun` repeats."""
        saved = self.dir / ".hydra" / "overrides.yaml"
        return [str(o) for o in read_yaml(saved)] if saved.is_file() else []

    @property
    def stages(self) -> dict[str, str]:
        """Each stage the run started, with its status."""
        return {name: str(info.get("status")) for name, info in self.manifest.get("stages", {}).items()}

    @property
    def stages_done(self) -> list[str]:
        return [name for name, status in self.stages.items() if status == "done"]

    @property
    def dataset(self) -> pd.DataFrame:
        """dataset.csv: the run's prompts in the notebook's format."""
        return read_table(self.path_of("", "dataset", ".csv"), dtype=str, keep_default_na=False)

    def json(self, name: str):
        """tables/<name>.json (baseline, test_prompt) as Python objects."""
        return read_json(self.path_of("tables", name, ".json"))

    def tensors(self, name: str) -> Tensors:
        """tensors/<name>.safetensors; each tensor is read when asked for."""
        return Tensors(self.path_of("tensors", name, ".safetensors"))

    def figure(self, name: str):
        """figures/<name> as a plotly Figure (from the JSON stored beside its HTML page)."""
        html = self.dir / "figures" / f"{name}.html"
        if html.is_file() and not html.with_suffix(".json").is_file():
            raise PipelineError(f"figures/{name}.html has no plotly JSON beside it (a circuitsvis page, or a run "
                                "written before figures were saved as JSON): open the HTML page instead")
        return read_figure(self.path_of("figures", name, ".json"))

    @property
    def figures(self) -> list[str]:
        """The names of the run's plotly figures."""
        return sorted(p.stem for p in (self.dir / "figures").glob("*.json") if not p.name.startswith("."))

    def path_of(self, folder: str, name: str, suffix: str) -> Path:
        """The artifact's path, or a PipelineError that names what is missing and what makes it,
        or what differs from the manifest's record of it."""
        path = self.dir / folder / f"{name}{suffix}"
        shown = f"{folder}/{name}{suffix}" if folder else f"{name}{suffix}"
        record = next((info["outputs"][shown] for info in self.manifest.get("stages", {}).values()
                       if info.get("status") == "done" and shown in (info.get("outputs") or {})), None)
        if record is not None and (problem := file_problem(path, record)):
            raise PipelineError(f"{path} {problem}: the run is damaged (dialect-circuits verify {self.dir} lists "
                                "what is wrong; resuming the run writes it again)")
        if path.is_file():
            return path
        stage = made_by(name)
        status = self.stages.get(stage) if stage else None
        if stage is None:
            why = "no stage is known to write it"
        elif status is None:
            why = f"the {stage} stage writes it and did not run here (stage={stage} runs it)"
        elif status == "done":
            why = f"the {stage} stage ran without writing it (its config keys choose what it writes)"
        else:
            error = self.manifest["stages"][stage].get("error")
            why = f"the {stage} stage writes it and is {status} here" + (f" ({error})" if error else "")
        raise PipelineError(f"{self.dir} has no {shown}: {why}; stages done: {', '.join(self.stages_done) or 'none'}")

    def __repr__(self) -> str:
        model = self.manifest.get("model", {}).get("name")
        return (f"<Run {self.dir} {self.status}: model {model}, {self.manifest.get('direction')}, "
                f"stages done: {', '.join(self.stages_done) or 'none'}>")

