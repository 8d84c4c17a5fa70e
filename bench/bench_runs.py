"""Wall time and peak memory of whole pipeline runs, each in its own process (as a user runs them).

    python bench/bench_runs.py                 # building the dataset, stage=attribution, and the default run
    python bench/bench_runs.py --only data attribution
    python bench/bench_runs.py --extra dataset.max_prompts=96

Each command runs in a fresh temporary directory; peak memory is the child's own maximum resident
set size (os.wait4), so runs do not hide each other's figures. The reference for the default run is
the target of the project: at most 10 minutes and 4 GB on 2 CPU cores.

The data stage makes the one model pass over the whole dataset (probing both guises; the cache and
attribution stages read what it kept). It also prints the fraction of this machine's float32 matmul
throughput that pass achieves: its matmul work (2 x non-embedding parameters x tokens of both
guises, plus every multi-token attribute's continuation tokens; the unembedding at each position
read) over seconds x the peak, which is measured in this process just before (a 2048 x 2048
matmul on torch's default threads). After a run
that built a dataset, one plain forward over both guises of it is timed in this process: the
reference of the target "data+cache+attribution at most 1.2x one plain forward". On a
machine shared with other jobs, both the peak and the stages vary; the fraction is what compares.
Each run's line is followed by the seconds of every model pass its log timed (probing per guise,
each exact patching part, attribution patching, circuit scoring, evaluation, path patching).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = {
    "data": ["stage=data"],        # building the dataset by matched guise probing
    "attribution": ["stage=attribution"],  # data + baseline + attribution + report: the one-pass stages
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
        manifest_path = next(Path(cwd).glob("outputs/*/*/manifest.json"))
        manifest = json.loads(manifest_path.read_text())
        stages = {k: v.get("seconds") for k, v in manifest["stages"].items()}
        gflop = one_pass_gflop(manifest_path.parent) if manifest["model"]["source"] == "embedded" else None
        plain = plain_pass_seconds(manifest_path.parent, args) if "data" in stages else None
        return {"wall_s": wall, "peak_mb": usage.ru_maxrss / 1024, "stages": stages, "pass_gflop": gflop, "plain_s": plain,
                "passes": model_passes(manifest_path.parent / "run.log")}


PASS_LINE = re.compile(r"\] - (.+?): (.*) in ([0-9.]+) s$")


def model_passes(log: Path) -> list[tuple[str, float]]:
    """(what, seconds) of each model pass the run's log timed (probing per guise, each exact
    patching part, attribution patching, circuit scoring, evaluation, path patching)."""
    found = [PASS_LINE.search(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [(m.group(1), float(m.group(3))) for m in found if m]


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def one_pass_gflop(run_dir: Path) -> tuple[float, float] | None:
    """Matmul work of one forward over both guises of the run's dataset (embedded model only), and
    of the probing pass, which also runs every multi-token attribute's tokens but its last after
    each prompt (pipeline/data/scoring.py) and unembeds each of those positions."""
    import pandas as pd
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import compose
    from pipeline.model import dequantized_copy, embedded_model_dir

    cfg = compose([]).model
    if not cfg.get("cache_dir"):
        return None
    folder = dequantized_copy(embedded_model_dir(cfg.package) / cfg.gguf_file, Path(cfg.cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    embed = model.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - embed  # tied unembedding counted once, below
    df = pd.read_csv(run_dir / "dataset.csv", dtype=str, keep_default_na=False)
    prompts = list(df.prompt_aae) + list(df.prompt_sae)
    tokens = sum(len(tokenizer(p)["input_ids"]) + 1 for p in prompts)  # + BOS
    plain = (2 * body * tokens + 2 * embed * len(prompts)) / 1e9
    association = run_dir / "tables" / "attribute_association.csv"
    extra = int((pd.read_csv(association).n_tokens - 1).sum()) if association.exists() else 0  # per prompt
    probing = plain + (2 * body + 2 * embed) * extra * len(prompts) / 1e9
    return plain, probing


def plain_pass_seconds(run_dir: Path, overrides: list[str]) -> float:
    """Seconds of one plain forward over both guises of the run's dataset, measured here: every
    prompt once, micro-batches of `batch_size`, logits at each prompt's last token (the cheapest
    forward the pipeline makes), on the run's model, device and dtype."""
    import pandas as pd

    from pipeline.config import compose
    from pipeline.data.dataset import pair_prompts
    from pipeline.forward import map_last_logits
    from pipeline.model import load_model, resolve_device, resolve_dtype

    cfg = compose(overrides)
    model = load_model(cfg.model, resolve_device(str(cfg.device)), resolve_dtype(str(cfg.dtype)))
    df = pd.read_csv(run_dir / "dataset.csv", dtype=str, keep_default_na=False)
    pairs = pair_prompts(model, df, cfg.direction, bool(cfg.model.prepend_bos))
    started = time.perf_counter()
    for side in (pairs.clean, pairs.corrupted):
        map_last_logits(model, side, int(cfg.batch_size), lambda logits, rows: logits[:, :1])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    args = parser.parse_args()
    print(f"{'run':<9}{'wall s':>9}{'peak MB':>10}  stages (seconds)")
    for name in args.only:
        peak = matmul_peak_gflops()
        r = measure(RUNS[name] + args.extra)
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages"].items() if v is not None)
        print(f"{name:<9}{r['wall_s']:>9.1f}{r['peak_mb']:>10.0f}  {stages}")
        if r["passes"]:
            print(f"{'':<9}model passes: " + ", ".join(f"{what} {sec:.0f}" for what, sec in r["passes"]))
        if r["pass_gflop"]:
            plain, probing = r["pass_gflop"]
            floor, probing_floor = plain / peak, probing / peak
            print(f"{'':<9}one pass over both guises: {plain / 1e3:.1f} TFLOP; matmul peak here {peak:.0f} GFLOP/s "
                  f"-> floor {floor:.0f} s")
            print(f"{'':<9}the probing pass (prompts + multi-token attribute continuations): {probing / 1e3:.1f} TFLOP "
                  f"-> floor {probing_floor:.0f} s")
            together = sum(v for k, v in r["stages"].items() if k in ("data", "cache", "attribution") and v)
            if "data" in r["stages"]:
                print(f"{'':<9}data: {r['stages']['data']:.0f} s, {probing / r['stages']['data'] / peak:.0%} of the matmul peak")
            print(f"{'':<9}data+cache+attribution: {together:.0f} s = {together / floor:.1f}x the floor of one pass over the "
                  f"prompts, {together / probing_floor:.2f}x the floor of the probing pass")
        if r["plain_s"]:
            together = sum(v for k, v in r["stages"].items() if k in ("data", "cache", "attribution") and v)
            print(f"{'':<9}one plain forward over both guises, measured here: {r['plain_s']:.0f} s; data+cache+attribution "
                  f"= {together / r['plain_s']:.2f}x it (target <= 1.2x)")
        if name == "default":
            print(f"{'':<9}target: <= 600 s and <= 4096 MB -> {'met' if r['wall_s'] <= 600 and r['peak_mb'] <= 4096 else 'NOT met'}")


if __name__ == "__main__":
    main()
