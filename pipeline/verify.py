"""`dialect-circuits verify RUN_DIR`: check a run directory against its manifest.

Every output a done stage recorded (path, size, SHA-256) must be there unchanged, every stage the
run started must be done, and the run complete; the config Hydra saved (.hydra/) must be readable
(`rerun` needs it). Exit status 0 when the run is whole, 1 with one line per problem on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.artifacts import read_yaml
from pipeline.errors import PipelineError
from pipeline.runner import read_manifest, run_output_problems


def problems_of(run_dir: Path) -> tuple[list[str], int]:
    """What is wrong with the run, and how many recorded files were checked."""
    manifest = read_manifest(run_dir)
    problems = []
    for name in ("config.yaml", "overrides.yaml"):
        try:
            read_yaml(run_dir / ".hydra" / name)
        except PipelineError as err:
            problems.append(str(err).replace(f"{run_dir}/", "", 1))
    if manifest.get("status") != "complete":
        error = manifest.get("error")
        problems.append(f"the run is {manifest.get('status')}" + (f" ({error})" if error else ""))
    checked = set()
    for stage, info in manifest.get("stages", {}).items():
        if info.get("status") != "done":
            problems.append(f"stage {stage} is {info.get('status')}, not done")
        elif "outputs" not in info:
            problems.append(f"stage {stage}: its outputs were not recorded (a run made before dialect-circuits "
                            "recorded them), so they cannot be checked")
        else:
            checked.update(info["outputs"])
    problems += run_output_problems(run_dir, manifest)
    return problems, len(checked)


def main(argv: list[str], parser: argparse.ArgumentParser) -> int:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory to check")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    problems, checked = problems_of(run_dir)
    for problem in problems:
        print(f"{run_dir}: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"{run_dir}: whole: the run is complete and its {checked} recorded files match the manifest")
    return 0
