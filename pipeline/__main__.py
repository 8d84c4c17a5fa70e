"""The `dialect-circuits` command: Hydra composes conf/, the runner does the rest.

    dialect-circuits                                  # embedded model, built dataset, every stage
    dialect-circuits model=gpt2-small stage=patching
    dialect-circuits -m direction=aae_clean,sae_clean
    dialect-circuits rerun outputs/2026-11-27/10-00-00
    dialect-circuits compare multirun/2026-11-27/10-00-00
    dialect-circuits verify outputs/2026-11-27/10-00-00
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from pipeline.config import CONF_DIR
from pipeline.errors import PipelineError

GROUPS = ("model", "dataset", "task", "direction", "metric", "stage", "experiment")
log = logging.getLogger("pipeline")


def fail(message: str) -> None:
    print(f"dialect-circuits: error: {message}", file=sys.stderr)
    sys.exit(2)


def user_config_dirs(argv: list[str]) -> list[Path]:
    """Folders given with Hydra's --config-dir / -cd (a user's own presets, kept outside the repo)."""
    dirs = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
    return dirs


def check_group_choices(argv: list[str]) -> None:
    """Name an unknown config-group option in one line (a PipelineError), before Hydra prints its
    long message. pipeline/api.py checks its overrides with it too."""
    roots = [CONF_DIR, *user_config_dirs(argv)]
    for arg in argv:
        if "=" not in arg or arg.startswith("hydra"):
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~")
        if group not in GROUPS:
            continue
        known = sorted({p.stem for root in roots for p in (root / group).glob("*.yaml")})
        for choice in value.strip("[]").split(","):
            if choice and choice not in known and not choice.startswith(("range(", "choice(", "glob(")):
                hint = " (or keep a model config and set model.name=<hub name or local dir>)" if group == "model" else ""
                raise PipelineError(f"unknown {group} {choice!r}: choose from {', '.join(known)}{hint}")


def check_run_dir_writable(argv: list[str]) -> None:
    """A run directory on a read-only disk, or without write permission, stops here with one line:
    Hydra's own first write (run.log) would fail with a traceback."""
    if any(arg in ("-m", "--multirun") for arg in argv):
        return
    given = [arg.split("=", 1)[1].strip("'\"") for arg in argv if arg.startswith("hydra.run.dir=")]
    folder = Path(given[-1]) if given else Path("outputs")
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        raise PipelineError(f"cannot write into {folder.resolve()}: a read-only disk, or no permission (run in "
                            "another directory, or give hydra.run.dir=<a writable directory>)")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg) -> None:
    from pipeline.runner import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # A log line that cannot be written (run.log on a full disk) is dropped, not reported with a
    # traceback over the one line the run ends in.
    logging.raiseExceptions = False
    interrupted = None
    try:
        run(cfg, run_dir)
    except PipelineError as err:
        log.error("%s", err)
        fail(str(err))
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the manifest says interrupted
        interrupted = str(err) or "SIGINT"
    if interrupted:  # said outside the except block, once the stopped stage's progress bar has closed
        print(f"dialect-circuits: interrupted by {interrupted}; resume with the same command and "
              f"hydra.run.dir={run_dir}", file=sys.stderr)
        sys.exit(128 + getattr(signal.Signals, interrupted, signal.SIGINT).value)
    log.info("run directory: %s", run_dir)


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] in ("rerun", "compare", "verify"):
        from pipeline import tools

        sys.exit(tools.main(argv))
    from pipeline import validation

    try:
        check_group_choices(argv)
        validation.check_overrides(argv, user_config_dirs(argv))
        check_run_dir_writable(argv)
    except PipelineError as err:
        fail(str(err))
    hydra_main()


if __name__ == "__main__":
    main()
