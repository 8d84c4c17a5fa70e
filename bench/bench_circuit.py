"""Cost of the circuit stage's parts on the embedded model (or `--model tiny`), per prompt:

    python bench/bench_circuit.py                  # 16 prompts, EAP, EAP-IG (5 steps), evaluation, path patching
    python bench/bench_circuit.py --prompts 32 --ig-steps 10

Prints seconds per 100 prompts for each part, the forward/backward passes per prompt, the graph's
node and edge counts and the process's peak memory. The reference each part is measured against
is one plain forward pass over the same prompts (as `seconds / forward`), so the ratios hold on a
busy machine even when the absolute seconds do not.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.circuit import edges  # noqa: E402
from pipeline.circuit.faithfulness import edge_counts, size_grid, top_circuits  # noqa: E402
from pipeline.circuit.graph import Graph, edge_hooks  # noqa: E402
from pipeline.circuit.path_patching import path_patch  # noqa: E402
from pipeline.config import compose  # noqa: E402
from pipeline.data.builder import build_rows  # noqa: E402
from pipeline.data.dataset import pair_prompts, select  # noqa: E402
from pipeline.forward import map_last_logits  # noqa: E402
from pipeline.model import load_model  # noqa: E402


CPU = {}


def timed(fn):
    """Wall seconds (returned) and CPU seconds of this process (kept in CPU, by call order): on a
    shared machine the CPU seconds are the steadier figure."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    CPU[len(CPU)] = time.process_time() - cpu
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--ig-steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--circuits", type=int, default=8, help="circuits evaluated per prompt")
    ap.add_argument("--path-prompts", type=int, default=2)
    args = ap.parse_args()
    cfg = compose([f"model={args.model}"])
    model = load_model(cfg.model, "cpu", torch.float32)
    rows = select(build_rows(), None, args.prompts)
    rows.insert(2, "best_attr_aae", "lazy")
    rows.insert(3, "best_attr_sae", "intelligent")
    pairs = pair_prompts(model, rows.reset_index(drop=True), cfg.direction, True)
    n, bs = len(pairs), args.batch_size
    per100 = lambda s, k=n: 100 * s / k  # noqa: E731

    forward = lambda: map_last_logits(model, pairs.clean, bs, lambda x, r: x[:, :1])  # noqa: E731
    forward()  # warm-up (the first call also checks the last-token shortcut)
    fwd, _ = timed(forward)
    with edge_hooks(model):
        graph = Graph.of(model)
        t_eap, scores = timed(lambda: edges.edge_scores(model, pairs, "logit_diff", "eap", batch_size=bs))
        t_ig, _ = timed(lambda: edges.edge_scores(model, pairs, "logit_diff", "eap_ig", args.ig_steps, batch_size=bs))
        counts = edge_counts(size_grid(0.001, args.circuits), graph.n_edges)
        circuits = top_circuits(scores.mean(0), counts)
        t_eval, _ = timed(lambda: edges.evaluate(model, pairs, circuits, "logit_diff", bs, rows_per_run=32))
        pp_pairs = pairs.head(args.path_prompts)
        t_pp, _ = timed(lambda: path_patch(model, pp_pairs, "logit_diff", "logits", bs, rows_per_run=64))
    senders = graph.n_layers * graph.n_heads
    print(f"model {args.model}: {graph.summary()}; {n} prompts, micro-batch {bs}, 1 forward over them {fwd:.1f}s wall, {CPU[0]:.1f}s CPU")
    cpu = [CPU[i] for i in range(5)]
    print(f"{'part':<34}{'s / 100 prompts':>16}{'CPU s / 100':>12}{'x forward':>11}  passes per prompt")
    print(f"{'EAP scores':<34}{per100(t_eap):>16.1f}{per100(cpu[1]):>12.1f}{t_eap / fwd:>11.1f}  2 forward + 1 backward")
    print(f"{f'EAP-IG scores ({args.ig_steps} steps)':<34}{per100(t_ig):>16.1f}{per100(cpu[2]):>12.1f}{t_ig / fwd:>11.1f}  {1 + args.ig_steps} forward + {args.ig_steps} backward")
    print(f"{f'exact evaluation, {len(circuits)} circuits':<34}{per100(t_eval):>16.1f}{per100(cpu[3]):>12.1f}{t_eval / fwd:>11.1f}  2 + {len(circuits)} forward (one per circuit)")
    print(f"{'path patching -> logits':<34}{per100(t_pp, len(pp_pairs)):>16.1f}{per100(cpu[4], len(pp_pairs)):>12.1f}{t_pp / (fwd * len(pp_pairs) / n):>11.1f}  2 forward + {senders} last-token MLP passes (one per sender head)")
    print(f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
