"""Where the Hydra configuration lives, composing it outside the command line, and the resolver
that gives each run a directory of its own.

The configs are the top-level `conf/` folder of the source tree. A wheel ships the same folder
as the package data `pipeline/conf` (pyproject.toml maps it there), so the command finds them
from a checkout, an editable install and an installed wheel alike, from any working directory.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

_HERE = Path(__file__).resolve().parent


def new_dir(path: str) -> str:
    """`path`, else `path-1`, `path-2`, ...: the first that does not exist yet, created here so
    that no other process can take it. conf/config.yaml's default run directory is
    `${new_dir:outputs/<date>/<time to the second>}`: two runs started in the same second get two
    directories. (Hydra resolves it once per run; a run resumed with hydra.run.dir=<run> never
    calls it.)"""
    candidate, n = Path(path), 0
    while True:
        try:
            candidate.mkdir(parents=True)
            return str(candidate)
        except FileExistsError:
            n += 1
            candidate = Path(f"{path}-{n}")


OmegaConf.register_new_resolver("new_dir", new_dir, use_cache=True, replace=True)


def conf_dir() -> Path:
    """The folder holding config.yaml: the installed package's copy, else the checkout's conf/."""
    for candidate in (_HERE / "conf", _HERE.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"dialect-circuits: no conf/config.yaml beside {_HERE} (a broken install?)")


CONF_DIR = conf_dir()


def compose(overrides: list[str] | None = None, return_hydra_config: bool = False):
    """The composed config for `overrides`, exactly as the command composes it (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []),
                             return_hydra_config=return_hydra_config)
