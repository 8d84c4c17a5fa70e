"""Cost of matched guise probing with multi-token attributes, all in one process (one model load,
the same prompts), so the ratios hold on a busy machine.

    python bench/bench_probing.py                    # the default dataset (1296 prompts x 2 guises), traits task
    python bench/bench_probing.py --max-prompts 216 --batch-size 16
    python bench/bench_probing.py --pairs ../shared/data/hofmann/habitual.txt --attributes ../shared/data/hofmann/katz.txt

Three ways of scoring every prompt of both guises:
- one-token only: the attributes that are one token, from one forward per prompt (what the data
  stage did before multi-token attributes; it dropped the others);
- packed (pipeline/data/scoring.py): every attribute, one forward per prompt whose row also holds
  each multi-token attribute's continuation;
- per attribute: the prompt followed by one multi-token attribute, one row per (prompt,
  attribute), batched: timed on the first --naive-prompts prompts and scaled to all.
It also prints the largest difference between packed and per-attribute scores on those prompts.
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.config import compose
from pipeline.data.builder import build_rows
from pipeline.data.dataset import select
from pipeline.data.resources import load_attributes, load_pairs, load_templates
from pipeline.data.scoring import attribute_tokens, score_attributes
from pipeline.forward import map_last_logits
from pipeline.model import load_model
from pipeline.prompts import tokenize


def per_attribute(model, batch, attrs, batch_size: int) -> torch.Tensor:
    """Reference cost: one row per (prompt, multi-token attribute), right-padded, in micro-batches."""
    pad = model.tokenizer.pad_token_id
    multi = [k for k, one in enumerate(attrs.one_token) if not one]
    jobs = [(i, k) for i in range(len(batch)) for k in multi]
    out = torch.zeros(len(batch), len(attrs.names))
    with torch.no_grad():
        for s in range(0, len(jobs), batch_size):
            chunk = jobs[s: s + batch_size]
            seqs = [batch.tokens[i, : int(batch.last[i]) + 1].tolist() + attrs.ids[k] for i, k in chunk]
            width = max(map(len, seqs))
            tokens = torch.full((len(seqs), width), pad)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, seq in enumerate(seqs):
                tokens[r, : len(seq)], mask[r, : len(seq)] = torch.tensor(seq), 1
            logp = torch.log_softmax(model(tokens, attention_mask=mask).float(), -1)
            for r, (i, k) in enumerate(chunk):
                n = int(batch.last[i]) + 1
                out[i, k] = sum(logp[r, n - 1 + j, t] for j, t in enumerate(attrs.ids[k]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--naive-prompts", type=int, default=16)
    parser.add_argument("--task", default="traits")
    parser.add_argument("--pairs", default=None)
    parser.add_argument("--templates", default=None)
    parser.add_argument("--attributes", default=None)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    cfg = compose([f"model={args.model}"])
    model = load_model(cfg.model, "cpu", torch.float32)
    rows = select(build_rows(load_pairs(args.pairs), load_templates(args.task, args.templates)), None, args.max_prompts)
    attrs = attribute_tokens(model, load_attributes(args.task, args.attributes))
    one = [k for k, o in enumerate(attrs.one_token) if o]
    extra = sum(len(t) - 1 for t in attrs.ids)
    batches = []
    for side in ("aae", "sae"):
        splits = [(t.split("{}")[0], u, t.split("{}")[1]) for t, u in zip(rows.template, rows[f"utterance_{side}"])]
        batches.append(tokenize(model, list(rows[f"prompt_{side}"]), splits, bool(cfg.model.prepend_bos)))
    n = sum(len(b) for b in batches)
    prompt_tokens = sum(int((b.last + 1).sum()) for b in batches) / n
    print(f"{n} prompts (mean {prompt_tokens:.1f} tokens), {len(attrs.names)} attributes, "
          f"{len(attrs.names) - len(one)} of them multi-token ({extra} continuation tokens per prompt); "
          f"batch size {args.batch_size}, torch threads {torch.get_num_threads()}")

    ids = torch.tensor([attrs.ids[k][0] for k in one])
    start = time.perf_counter()
    for b in batches:
        map_last_logits(model, b, args.batch_size, lambda lg, _r: torch.log_softmax(lg, -1)[:, ids])
    t_one = time.perf_counter() - start
    start = time.perf_counter()
    packed = [score_attributes(model, b, attrs, args.batch_size, desc="packed") for b in batches]
    t_packed = time.perf_counter() - start
    sub = batches[0].slice(slice(0, min(args.naive_prompts, len(batches[0]))))
    start = time.perf_counter()
    naive = per_attribute(model, sub, attrs, args.batch_size)
    t_naive = (time.perf_counter() - start) * n / len(sub)
    multi = [k for k, o in enumerate(attrs.one_token) if not o]
    diff = float((naive[:, multi] - packed[0][: len(sub), multi]).abs().max()) if multi else 0.0
    print(f"one-token only (before): {t_one:8.1f} s  ({len(one)} attributes; the others were dropped)")
    print(f"packed (now):            {t_packed:8.1f} s  (all {len(attrs.names)} attributes)  = {t_packed / t_one:.2f} x before")
    print(f"per attribute (scaled):  {t_naive:8.1f} s  = {t_naive / t_packed:.1f} x packed "
          f"(timed on {len(sub)} prompts); max |packed - per attribute| = {diff:.2e}")


if __name__ == "__main__":
    main()
