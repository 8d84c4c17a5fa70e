"""`dialect-circuits rerun RUN_DIR [overrides...]`: run a past run's config again, into a new
directory, and check that it gives the same tensors.

The config is recomposed the way Hydra composed it the first time: the CLI is run again with the
overrides Hydra saved in RUN_DIR/.hydra/overrides.yaml (the ones given here replace saved ones
with the same key) plus `hydra.run.dir=<new directory>`, from the directory the first run was
started in, so that relative paths in the config mean the same files. Then every tensor in
tensors/*.safetensors of the two runs is compared, and the package versions and device recorded
in the two manifests.

Exit status: 0 when every tensor is equal (within --atol), 1 when not, the CLI's own status when
the new run fails.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipeline.artifacts import read_tensors, read_yaml
from pipeline.errors import PipelineError
from pipeline.runner import read_manifest, run_output_problems


def override_key(override: str) -> str:
    """`+model.x=1`, `~model.x`, `model=tiny` -> the key they set: model.x, model.x, model."""
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(saved: list[str], given: list[str]) -> list[str]:
    """The saved overrides with each given one replacing the saved one of the same key."""
    merged = {override_key(o): o for o in saved}
    for override in given:
        merged.pop(override_key(override), None)  # re-insert at the end: given ones come last
        merged[override_key(override)] = override
    return list(merged.values())


def hydra_quote(value: str) -> str:
    """A value for Hydra's override grammar: a plain path as it is, anything else quoted so that
    it is taken literally (spaces, commas, brackets, quotes, `$`)."""
    if re.fullmatch(r"[\w/.:@+-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def saved_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        raise PipelineError(f"{run_dir} has no .hydra/overrides.yaml: not a run directory written by dialect-circuits")
    overrides = read_yaml(path)
    if not OmegaConf.is_list(overrides):
        raise PipelineError(f"{path} is damaged: not a list of overrides")
    return [str(o) for o in overrides]


def start_dir(run_dir: Path) -> Path:
    """The directory the run was started in (Hydra records it), if it still exists."""
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    if hydra_yaml.exists():
        cwd = OmegaConf.select(read_yaml(hydra_yaml), "hydra.runtime.cwd")
        if cwd and Path(cwd).is_dir():
            return Path(cwd)
    return Path.cwd()


def new_run_dir(out: str | None) -> Path:
    if out:
        path = Path(out).resolve()
        if path.exists() and any(path.iterdir()):
            raise PipelineError(f"--out {out} already holds files: a rerun goes into a new directory")
        return path
    stamp = datetime.now()
    path = Path.cwd() / "outputs" / f"{stamp:%Y-%m-%d}" / f"{stamp:%H-%M-%S}-rerun"
    n = 1
    while path.exists():
        path = path.with_name(f"{stamp:%H-%M-%S}-rerun-{n}")
        n += 1
    return path.resolve()


def max_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b|; NaN in the same place in both counts as equal, elsewhere as infinite."""
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    a, b = a.double(), b.double()
    diff = (a - b).abs()
    diff[a.isnan() & b.isnan()] = 0.0
    diff[a.isinf() & (a == b)] = 0.0  # inf - inf is NaN
    return float(diff.nan_to_num(nan=float("inf")).max())


def compare_tensors(old: Path, new: Path, atol: float) -> list[str]:
    """Print each tensor file's largest difference; return what differs beyond atol."""
    problems = []
    names = sorted({p.name for run in (old, new) for p in (run / "tensors").glob("*.safetensors")})
    if not names:
        print("  no tensors/*.safetensors in either run")
    for name in names:
        paths = [run / "tensors" / name for run in (old, new)]
        if not all(p.exists() for p in paths):
            where = "old" if paths[0].exists() else "new"
            print(f"  {name}: only in the {where} run")
            problems.append(f"{name} is only in the {where} run")
            continue
        a, b = (read_tensors(p) for p in paths)
        if a.keys() != b.keys():
            print(f"  {name}: different tensors ({', '.join(sorted(a.keys() ^ b.keys()))} in one run only)")
            problems.append(f"{name} holds different tensors")
            continue
        worst, worst_key = 0.0, ""
        for key in sorted(a):
            diff = max_abs_difference(a[key], b[key])
            if a[key].shape != b[key].shape:
                print(f"  {name}: {key} has shape {tuple(a[key].shape)} in the old run, {tuple(b[key].shape)} in the new")
            if diff > worst or not worst_key:
                worst, worst_key = diff, key
        verdict = "identical" if worst == 0 else f"within atol, largest in {worst_key!r}" if worst <= atol \
            else f"DIFFERENT, largest in {worst_key!r}"
        print(f"  {name}: max abs difference {worst:.3g} over {len(a)} tensors ({verdict})")
        if worst > atol:
            problems.append(f"{name} differs by up to {worst:.3g} in {worst_key!r}")
    return problems


def compare_manifests(old: Path, new: Path) -> list[str]:
    """Print what differs in the recorded environment; return what differs in the inputs."""
    a, b = (read_manifest(run) for run in (old, new))
    va, vb = a.get("versions", {}), b.get("versions", {})
    changed = [f"{k} {va.get(k, 'absent')} -> {vb.get(k, 'absent')}" for k in sorted(va.keys() | vb.keys()) if va.get(k) != vb.get(k)]
    print(f"  versions: {'; '.join(changed) if changed else 'the same'}")
    if a.get("device") != b.get("device"):
        print(f"  device: {a.get('device')} -> {b.get('device')}")
    else:
        print(f"  device: the same ({a.get('device')})")
    if a.get("dataset_hash") != b.get("dataset_hash"):
        print(f"  dataset.csv: different (hash {str(a.get('dataset_hash'))[:12]} -> {str(b.get('dataset_hash'))[:12]})")
        return ["dataset.csv differs"]
    return []


def compare_runs(old: Path, new: Path, atol: float = 0.0) -> int:
    """0 when the two runs' tensors agree within atol, else 1 with one line on stderr."""
    print(f"comparing {old} (old) with {new} (new)")
    problems = compare_manifests(old, new) + compare_tensors(old, new, atol)
    if problems:
        print(f"dialect-circuits: error: the rerun differs from {old}: {'; '.join(problems)}", file=sys.stderr)
        return 1
    print(f"the rerun matches: every tensor {'identical' if atol == 0 else f'within atol {atol:g}'}")
    return 0


def rerun(run_dir: str, given: list[str], out: str | None, atol: float) -> int:
    old = Path(run_dir)
    # Checked before minutes of model runs: the run compared against must be readable and whole.
    damaged = run_output_problems(old, read_manifest(old), under="tensors/")
    if damaged:
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise PipelineError(f"{old}/{damaged[0]}{more}: a rerun is compared with that run, so it must be whole "
                            f"(dialect-circuits verify {run_dir} lists what is wrong; resuming the run writes it again)")
    overrides = merge_overrides(saved_overrides(old), given)
    new = new_run_dir(out)
    if new == old.resolve():
        raise PipelineError("a rerun goes into a new directory, never into the run it repeats")
    cwd = start_dir(old)
    command = [sys.executable, "-m", "pipeline", *overrides, f"hydra.run.dir={hydra_quote(str(new))}"]
    print(f"rerunning {run_dir} in {cwd}: dialect-circuits {shlex.join(command[3:])}", flush=True)
    status = subprocess.run(command, cwd=cwd).returncode
    if status != 0:
        print(f"dialect-circuits: error: the rerun failed with exit status {status} (its log: {new / 'run.log'})",
              file=sys.stderr)
        return status
    return compare_runs(old.resolve(), new, atol)


def main(argv: list[str], parser: argparse.ArgumentParser) -> int:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory to repeat")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra overrides to change (key=value)")
    parser.add_argument("--out", metavar="DIR", help="the new run directory (default: outputs/<date>/<time>-rerun)")
    parser.add_argument("--atol", type=float, default=0.0, help="largest tensor difference still counted as equal (default 0)")
    if not argv:  # parse_intermixed_args would also call the optional overrides required
        parser.error("the following arguments are required: RUN_DIR")
    args = parser.parse_intermixed_args(argv)
    return rerun(args.run_dir, args.overrides, args.out, args.atol)
