"""The baseline gap of one finished run under each answer rule, with its interval and guise
permutation null, reusing the run's stored log-probabilities (no model is run).

    python bench/answer_rules.py outputs/<date>/<time> [--permutations 1000]

Needs a run with a built dataset (tensors/guise_logprobs.safetensors and dataset.csv)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from pipeline.artifacts import read_tensors, safe_open_metadata
from pipeline.data.answers import RULES, choose_answers, gaps
from pipeline.nulls import baseline_null


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = args.run_dir / "tensors" / "guise_logprobs.safetensors"
    logp = read_tensors(path)
    names = json.loads(safe_open_metadata(path)["columns"])
    df = pd.read_csv(args.run_dir / "dataset.csv", dtype=str, keep_default_na=False)
    assoc = (logp["aae"] - logp["sae"]).double().numpy()
    rows = []
    for rule in RULES:
        started = time.perf_counter()
        aae, sae = choose_answers(assoc, names, df.pair_id, rule)
        table = baseline_null(gaps(assoc, aae, sae), df.pair_id, df.feature, args.permutations, args.bootstrap,
                              args.seed, assoc, names, rule)
        top = table.iloc[0]
        rows.append({"answers": rule, "prompts": int(top.n_prompts), "gap": top.gap, "ci_low": top.ci_low,
                     "ci_high": top.ci_high, "null_low": top.null_low, "null_high": top.null_high, "p_perm": top.p_perm,
                     "features_p<0.05": int((table.p_perm[1:] < 0.05).sum()), "seconds": time.perf_counter() - started})
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
