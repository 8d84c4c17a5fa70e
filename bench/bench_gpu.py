"""The full study on a GPU: every prompt, all four exact sweeps, both directions, the circuit stage
where this checkout has one; each stage's seconds and peak GPU memory; then the per-prompt tensors
of a GPU run and a CPU run on the same subset, compared (max absolute difference).

    python bench/bench_gpu.py                                  # cuda, embedded SmolLM2-135M, full study
    python bench/bench_gpu.py --dtype bfloat16
    python bench/bench_gpu.py --device cpu --model tiny --max-prompts 12 --subset 6   # smoke test
    python bench/bench_gpu.py --device cpu --dtype bfloat16 --compare-only --subset 16 --stages data,cache,attribution
                                                   # how far bfloat16 is from float32 (on the CPU)

Runs go under --out (default: a temporary directory). Target (issue 12): the full study in under
2 minutes on one H100/H200-class GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import runner  # noqa: E402
from pipeline.artifacts import read_tensors  # noqa: E402
from pipeline.config import compose  # noqa: E402

SWEEPS = "patching.sweeps=[resid_pre,block,head_out,head_parts]"
DIRECTIONS = ("aae_clean", "sae_clean")


def stages() -> list[str]:
    """Every stage of this checkout, the circuit stage included where it exists."""
    names = list(runner.STAGES)
    has_circuit = "circuit" in names or (Path(__file__).resolve().parents[1] / "conf" / "stage" / "circuit.yaml").exists()
    if has_circuit and "circuit" not in names:
        names.insert(names.index("report"), "circuit")
    if not has_circuit:
        print("no circuit stage in this checkout: skipped")
    return names


class StageMeter:
    """Wraps each stage function to record its seconds and the peak memory of the device."""

    def __init__(self, device: str):
        self.device, self.rows = device, []
        self._original = runner.stage_function

    def __enter__(self):
        def measured(name):
            fn = self._original(name)

            def run(ctx):
                cuda = self.device.startswith("cuda")
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                fn(ctx)
                if cuda:
                    torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
                self.rows.append((ctx.cfg.direction.name, name, time.perf_counter() - started, peak))

            return run

        runner.stage_function = measured
        return self

    def __exit__(self, *exc):
        runner.stage_function = self._original


def run_study(out: Path, device: str, overrides: list[str]) -> tuple[list, dict[str, Path]]:
    dirs, meter = {}, StageMeter(device)
    with meter:
        for direction in DIRECTIONS:
            cfg = compose([f"device={device}", f"direction={direction}", *overrides])
            dirs[direction] = out / f"{device.replace(':', '')}-{direction}"
            runner.run(cfg, dirs[direction])
    return meter.rows, dirs


def compare(a: Path, b: Path) -> list[tuple[str, float, int]]:
    """Max |difference| of every per-prompt tensor, on the prompts whose dataset rows agree
    (the data stage chooses answers on each device; a near tie may choose differently)."""
    import pandas as pd

    da, db = pd.read_csv(a / "dataset.csv", dtype=str), pd.read_csv(b / "dataset.csv", dtype=str)
    same = torch.tensor((da.fillna("") == db.fillna("")).all(axis=1).to_numpy())
    out = []
    for path in sorted((a / "tensors").glob("*.safetensors")):  # every stage's tensors, circuit included
        if not (b / "tensors" / path.name).exists():
            continue
        ta, tb = read_tensors(path), read_tensors(b / "tensors" / path.name)
        for key in ta:
            x, y = ta[key].float(), tb.get(key, torch.empty(0)).float()
            if x.shape != y.shape:
                out.append((f"{path.name}:{key}", float("nan"), 0))  # e.g. a circuit of another size
                continue
            if x.ndim and x.shape[0] == len(same) and x.shape[-1] != len(same):
                x, y = x.movedim(0, -1), y.movedim(0, -1)  # prompts first -> prompts last
            per_prompt = x.ndim and (x.shape[-1] == len(same) or path.name.startswith("patch_"))
            keep = same[: x.shape[-1]] if per_prompt else torch.ones(x.shape[-1] if x.ndim else 1, dtype=torch.bool)
            diff = (x[..., keep] - y[..., keep]).abs().nan_to_num() if x.ndim else (x - y).abs()
            out.append((f"{path.name}:{key}", float(diff.max()) if diff.numel() else 0.0, int(keep.sum()) if per_prompt else len(same)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", default="smollm2-135m", help="a conf/model option")
    parser.add_argument("--max-prompts", type=int, default=None, help="limit the full study (default: every prompt)")
    parser.add_argument("--subset", type=int, default=32, help="prompts of the CPU comparison run")
    parser.add_argument("--stages", default=None, help="comma-separated stages (default: every stage)")
    parser.add_argument("--compare-only", action="store_true", help="skip the full study, only compare with the CPU")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="dialect-circuits-gpu-"))
    limit = "null" if args.max_prompts is None else str(args.max_prompts)
    common = [f"model={args.model}", f"dtype={args.dtype}", SWEEPS, f"stage.stages=[{args.stages or ','.join(stages())}]"]
    full = [*common, f"dataset.max_prompts={limit}", "patching.max_prompts=null"]
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name(0)}")

    if not args.compare_only:
        started = time.perf_counter()
        rows, _ = run_study(out / "full", args.device, full)
        total = time.perf_counter() - started
        print(f"\nfull study on {args.device} ({args.dtype}, {limit} prompts, both directions): {total:.1f} s wall")
        print(f"{'direction':<11}{'stage':<13}{'seconds':>9}{'peak MiB':>10}")
        for direction, stage, seconds, peak in rows:
            print(f"{direction:<11}{stage:<13}{seconds:>9.1f}{peak:>10.0f}")

    subset = [*common, f"dataset.max_prompts={args.subset}", "patching.max_prompts=null"]
    _, on_device = run_study(out / "subset-device", args.device, subset)
    _, on_cpu = run_study(out / "subset-cpu", "cpu", [o.replace(f"dtype={args.dtype}", "dtype=float32") for o in subset])
    print(f"\n{args.device} ({args.dtype}) against cpu (float32), {args.subset} prompts: max |difference| per tensor")
    for direction in DIRECTIONS:
        for name, diff, n in compare(on_device[direction], on_cpu[direction]):
            print(f"{direction:<11}{name:<48}{diff:>10.2e}  ({n} prompts with the same dataset row)")
    print(f"\nruns kept in {out}")


if __name__ == "__main__":
    main()
