"""Patching speed: TransformerLens's own sweep functions against this project's fast engine, on
the same prompts (equal-length, unpadded, so TransformerLens's functions apply), in one process.

    python bench/bench_patching.py                   # embedded SmolLM2-135M, 8 prompts, all four sweeps
    python bench/bench_patching.py --prompts 4 --sweeps resid_pre head_out
    python bench/bench_patching.py --against resume   # against the engine's own fallback (resume the
                                                      # bridge's blocks at every position), not TransformerLens

Prints per sweep: both wall times and their ratio, both CPU times (this process's, `time.process_time`)
and their ratio, the largest absolute difference of the per-prompt metric values, and each engine's
peak resident memory (VmHWM, reset before each run).

On a shared machine compare the CPU ratio, on one thread (`OMP_NUM_THREADS=1`): the two engines run
one after the other, so other users' load can land on either and swing the wall ratio several-fold between
runs of the same work (head_out, 4 prompts, one thread, same code: wall ratios 21.9x and 82.7x
where the CPU ratios were 9.7x and 8.3x; 7.6x to 16.1x in other runs), so a drop such as 9.4x -> 6.1x
can be load, not code.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformer_lens import patching as tl_patching  # noqa: E402

from pipeline.model import load_model  # noqa: E402
from pipeline.patching import kv_forward  # noqa: E402
from pipeline.patching.engine import run_cells  # noqa: E402
from pipeline.patching.sweeps import SWEEPS, axis_size, cells_of  # noqa: E402

TL = {
    "resid_pre": lambda *a: [tl_patching.get_act_patch_resid_pre(*a, reduce="none")],
    "block": lambda *a: list(tl_patching.get_act_patch_block_every(*a, reduce="none").values.unbind(0)),
    "head_out": lambda *a: [tl_patching.get_act_patch_attn_head_out_all_pos(*a, reduce="none")],
    "head_parts": lambda *a: list(tl_patching.get_act_patch_attn_head_all_pos_every(*a, reduce="none").values.unbind(0)),
}


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a conf/model option (tiny for a smoke run)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--sweeps", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
    parser.add_argument("--against", default="transformer_lens", choices=["transformer_lens", "resume"])
    args = parser.parse_args()

    from conftest import make_cfg
    from test_patching import equal_length_pairs

    torch.set_grad_enabled(False)
    model = load_model(make_cfg([f"model={args.model}"]).model, "cpu", torch.float32)
    pairs = equal_length_pairs(model, args.prompts)
    print(f"model {args.model}: {model.cfg.n_layers} layers, {model.cfg.n_heads} heads; {len(pairs)} prompts of "
          f"{pairs.clean.tokens.shape[1]} tokens; {torch.get_num_threads()} threads")
    _, clean_cache = model.run_with_cache(pairs.clean.tokens)
    metric = lambda logits: pairs.answers.values(logits[:, -1].float())  # noqa: E731
    total_tl = total_ours = cpu_tl_total = cpu_ours_total = 0.0
    ref = "TL" if args.against == "transformer_lens" else "prev"
    print(f"{'sweep':<11}{ref + ' s':>9}{'ours s':>9}{'ratio':>8}{ref + ' cpu':>9}{'ours cpu':>9}{'cpu ratio':>10}"
          f"{'max |diff|':>12}{ref + ' peak MB':>14}{'ours peak MB':>14}")
    def ours(sweep):
        mine = {}
        for part in SWEEPS[sweep]:
            values, _ = run_cells(model, pairs, cells_of(model, pairs, part), len(pairs), fast=True)
            axis = "role" if part in ("resid_pre", "attn_out", "mlp_out") else ("kv_head" if part in ("key", "value") else "head")
            mine[part] = values.reshape(model.cfg.n_layers, axis_size(model, pairs, axis), -1)
        return mine

    if args.against == "resume":
        print("reference: this engine resuming the bridge's blocks at every position (kv_forward off)")
    for sweep in args.sweeps:
        reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        if args.against == "resume":
            supported, kv_forward.supported = kv_forward.supported, lambda model: False
            try:
                previous = ours(sweep)
            finally:
                kv_forward.supported = supported
            reference = [previous[part] for part in SWEEPS[sweep]]
        else:
            reference = TL[sweep](model, pairs.corrupted.tokens, clean_cache, metric)
        t_tl, cpu_tl, peak_tl = time.perf_counter() - t0, time.process_time() - c0, peak_mb()
        reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        mine = ours(sweep)
        t_ours, cpu_ours, peak_ours = time.perf_counter() - t0, time.process_time() - c0, peak_mb()
        diff = 0.0
        for part, tl in zip(SWEEPS[sweep], reference):
            tl = (tl if isinstance(tl, torch.Tensor) else tl.values).float()
            if part in ("resid_pre", "attn_out", "mlp_out") and args.against == "transformer_lens":
                tl = tl[:, pairs.clean_pos[0]]
            tl = tl[:, : mine[part].shape[1]]  # TransformerLens pads key/value heads up to n_heads
            diff = max(diff, float((mine[part] - tl).abs().nan_to_num().max()))
        total_tl, total_ours = total_tl + t_tl, total_ours + t_ours
        cpu_tl_total, cpu_ours_total = cpu_tl_total + cpu_tl, cpu_ours_total + cpu_ours
        print(f"{sweep:<11}{t_tl:>9.1f}{t_ours:>9.1f}{t_tl / t_ours:>7.1f}x{cpu_tl:>9.1f}{cpu_ours:>9.1f}{cpu_tl / cpu_ours:>9.1f}x"
              f"{diff:>12.2e}{peak_tl:>14.0f}{peak_ours:>14.0f}")
    print(f"{'all':<11}{total_tl:>9.1f}{total_ours:>9.1f}{total_tl / total_ours:>7.1f}x"
          f"{cpu_tl_total:>9.1f}{cpu_ours_total:>9.1f}{cpu_tl_total / cpu_ours_total:>9.1f}x")


if __name__ == "__main__":
    main()
