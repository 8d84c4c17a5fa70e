"""Wall time and peak memory of whole pipeline runs, each in its own process (as a user runs them).

    python bench/bench_runs.py                 # building the dataset, stage=cache, and the default run
    python bench/bench_runs.py --only data cache
    python bench/bench_runs.py --extra dataset.max_prompts=96

Each command runs in a fresh temporary directory; peak memory is the child's own maximum resident
set size (os.wait4), so runs do not hide each other's figures. The reference for the default run is
the target of the project: at most 10 minutes and 8 GB on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = {
    "data": ["stage=data"],        # building the dataset by matched guise probing
    "cache": ["stage=cache"],      # data + baseline clean/corrupted runs + report
    "default": [],                 # `dialect-circuits` with no arguments: every stage
}


def measure(args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as cwd:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        stderr = proc.stderr.read().decode(errors="replace")
        if status != 0:
            raise SystemExit(f"dialect-circuits {' '.join(args)} failed:\n{stderr[-2000:]}")
        manifest = json.loads(next(Path(cwd).glob("outputs/*/*/manifest.json")).read_text())
        stages = {k: v.get("seconds") for k, v in manifest["stages"].items()}
        return {"wall_s": wall, "peak_mb": usage.ru_maxrss / 1024, "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    args = parser.parse_args()
    print(f"{'run':<9}{'wall s':>9}{'peak MB':>10}  stages (seconds)")
    for name in args.only:
        r = measure(RUNS[name] + args.extra)
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages"].items() if v is not None)
        print(f"{name:<9}{r['wall_s']:>9.1f}{r['peak_mb']:>10.0f}  {stages}")
        if name == "default":
            print(f"{'':<9}target: <= 600 s and <= 8192 MB -> {'met' if r['wall_s'] <= 600 and r['peak_mb'] <= 8192 else 'NOT met'}")


if __name__ == "__main__":
    main()
