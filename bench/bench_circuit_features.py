"""The circuit stage with and without `circuit.features` (one circuit per dialect feature), on the
same config, prompts and model: each variant runs on its own copy of a run whose data and cache
stages are done, one after the other in one process.

    dialect-circuits "stage.stages=[data,cache]" hydra.run.dir=RUN
    python bench/bench_circuit_features.py RUN false true false

prints the stage's seconds per variant; the run log lines of the per-feature parts give their own
seconds. Run it on a quiet machine: the variants are timed minutes apart.
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.runner import RunContext
from pipeline.stages import circuit as circuit_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run directory with dataset.csv and .hydra/config.yaml")
    parser.add_argument("variants", nargs="+", choices=["true", "false"], help="circuit.features.enabled of each timing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = OmegaConf.load(args.run / ".hydra" / "config.yaml")
    model = None
    for i, enabled in enumerate(args.variants):
        copy = args.run.parent / f"{args.run.name}-features-{enabled}-{i}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(args.run, copy, ignore=shutil.ignore_patterns("circuit*", "path_patching*", ".partial"))
        cfg.circuit.features.enabled = enabled == "true"
        ctx = RunContext(cfg, copy)
        if model is not None:
            ctx.__dict__["model"] = model  # one model for every variant
        model = ctx.model
        _ = ctx.pairs  # tokenized before the clock starts
        started = time.perf_counter()
        circuit_stage.run(ctx)
        print(f"circuit stage, circuit.features.enabled={enabled}: {time.perf_counter() - started:.1f} s "
              f"(peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB)", flush=True)


if __name__ == "__main__":
    main()
