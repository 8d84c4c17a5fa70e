"""The fast patching engine against the reference engine on a tiny random model of every family
(pipeline/families.py), on the same padded prompts of mixed lengths, in one process.

    python bench/bench_families.py                       # every family, 8 prompts, resid_pre and head_out
    python bench/bench_families.py --families neox gptj --prompts 16 --n-layer 4 --n-embd 128

Prints per family: how the fast engine ran its patched forwards (kv_forward, or resuming the
bridge's blocks and why), both wall times, the ratio reference / fast, and the largest absolute
difference of the per-prompt logit differences. Tiny models are dominated by the unembedding of
their 49,152-token vocabulary (the reference engine computes it at every position); the ratio on a
real model is larger (bench/bench_patching.py, docs/reference/cost-and-speed.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIALECT_CIRCUITS_CACHE", tempfile.mkdtemp(prefix="bench-families-"))

from conftest import make_cfg  # noqa: E402
from test_prompts import small_dataset  # noqa: E402

from pipeline.architecture import discards_pattern_edits  # noqa: E402
from pipeline.data.dataset import pair_prompts  # noqa: E402
from pipeline.families import FAMILIES  # noqa: E402
from pipeline.model import load_model  # noqa: E402
from pipeline.patching import engine  # noqa: E402
from pipeline.patching.engine import run_cells  # noqa: E402
from pipeline.patching.sweeps import SWEEPS, cells_of  # noqa: E402


class Said(logging.Handler):
    """Keeps the engine's line about how it ran (pipeline/patching/engine.py say_engine)."""

    def __init__(self):
        super().__init__()
        self.line = ""

    def emit(self, record):
        self.line = record.getMessage()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--sweeps", nargs="+", default=["resid_pre", "head_out"], choices=list(SWEEPS))
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    said = Said()
    engine.log.addHandler(said)
    engine.log.setLevel(logging.INFO)
    engine.log.propagate = False
    print(f"{args.prompts} prompts of mixed lengths, sweeps {args.sweeps}, {args.n_layer} layers, d_model {args.n_embd}")
    print(f"{'family':8} {'fast s':>8} {'reference s':>12} {'ratio':>6} {'max diff':>9}  fast engine")
    for family in args.families:
        cfg = make_cfg(["model=tiny", f"model.family={family}", f"model.n_layer={args.n_layer}", f"model.n_embd={args.n_embd}",
                        f"model.processing.refactor_factored_attn_matrices={str(family == 'gpt2').lower()}"])
        torch.manual_seed(0)
        model = load_model(cfg.model, "cpu", torch.float32)
        pairs = pair_prompts(model, small_dataset(args.prompts), cfg.direction, True)
        parts = [p for s in args.sweeps for p in SWEEPS[s]]
        if "pattern" in parts and discards_pattern_edits(model):  # the patching stage refuses it (GPT-J)
            parts.remove("pattern")
            print(f"{family}: no pattern cells (the bridge discards an edited pattern in this attention)")
        cells = [c for p in dict.fromkeys(parts) for c in cells_of(model, pairs, p)]
        seconds, values = {}, {}
        for name, fast in (("fast", True), ("reference", False)):
            times = []
            for _ in range(args.repeats):  # the best of a few: the first run of a model warms it up
                started = time.perf_counter()
                values[name], _ = run_cells(model, pairs, cells, args.batch_size, fast=fast)
                times.append(time.perf_counter() - started)
            seconds[name] = min(times)
        diff = float((values["fast"].nan_to_num() - values["reference"].nan_to_num()).abs().max())
        how = said.line.removeprefix("fast engine: ").split(" (")[0].split(":")[0]
        why = said.line.split("not kv_forward: ")[1] if "not kv_forward: " in said.line else ""
        print(f"{family:8} {seconds['fast']:8.2f} {seconds['reference']:12.2f} {seconds['reference'] / seconds['fast']:6.1f} "
              f"{diff:9.1e}  {how}{' (' + why.split(' (')[0] + ')' if why else ''}")


if __name__ == "__main__":
    main()
