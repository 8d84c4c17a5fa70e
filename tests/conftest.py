"""Shared test fixtures: everything offline, a tiny random GPT-2-architecture model built into a
temporary cache, Hydra's compose API for configs, and the CLI run as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIALECT_CIRCUITS_CACHE", tempfile.mkdtemp(prefix="dialect-circuits-test-cache-"))
# The embedded model's dequantized weights (520 MB, keyed by the GGUF file's hash) are shared with
# the user's own runs rather than written again into every session's temporary cache.
os.environ.setdefault("DIALECT_CIRCUITS_WEIGHTS_CACHE", str(Path.home() / ".cache" / "dialect-circuits"))

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_cfg(overrides: list[str] | None = None):
    """The composed config, as the CLI would compose it (without Hydra's run-time fields)."""
    from pipeline.config import compose

    return compose(overrides)


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`dialect-circuits ARGS` in `cwd`, as a user would type it."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


def only_run_dir(root: Path) -> Path:
    """The one run directory under root/outputs/<date>/<time>."""
    dirs = [p for p in (root / "outputs").glob("*/*") if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.fixture(scope="session")
def tiny_model():
    from pipeline.model import load_model

    torch.manual_seed(0)
    return load_model(make_cfg(["model=tiny"]).model, "cpu", torch.float32)


@pytest.fixture(scope="session")
def embedded_model():
    from pipeline.model import load_model

    return load_model(make_cfg([]).model, "cpu", torch.float32)


def pairs_for(model, df, cfg):
    """The run's prompt pairs for a composed config, as the pipeline builds them: a rated metric's
    (favorability, prestige) answers over the task's attributes, else the dataset's answer pairs."""
    from pipeline.data.dataset import pair_prompts
    from pipeline.data.ratings import rated_metric
    from pipeline.data.resources import load_attributes
    from pipeline.metrics import RATED_METRICS

    rated = None
    if str(cfg.metric.name) in RATED_METRICS:
        attributes = load_attributes(str(cfg.dataset.task), cfg.dataset.get("attributes"))
        rated = rated_metric(cfg.metric, attributes, model.tokenizer)
    return pair_prompts(model, df, cfg.direction, True, rated)
