"""Stage `data`: build the dataset by matched guise probing, or load the configured CSV, and
write it as `dataset.csv` in the notebook's format (feature and template as extra columns)."""

from __future__ import annotations

import json
import logging

from pipeline import figures, validation
from pipeline.artifacts import write_figure, write_table, write_tensors
from pipeline.data.builder import association_table, build_rows, interleave, probe
from pipeline.data.dataset import SEED_COLUMNS, select

log = logging.getLogger(__name__)
GUISE_LOGPROBS = "guise_logprobs.safetensors"  # log p(attribute | prompt) per row, per side


def run(ctx) -> None:
    cfg = ctx.cfg.dataset
    if cfg.path:
        # Checked whole, with the tokenizer only: no model loads for a CSV this stage refuses.
        csv = validation.read_dataset_csv(cfg.path)
        tokenizer, n_ctx = ctx.tokenizer
        validation.check_tokens(csv, tokenizer, n_ctx, bool(ctx.cfg.model.prepend_bos))
        df = csv.frame()
        if cfg.max_prompts is not None:
            df = interleave(df, seed=int(ctx.cfg.seed))
        df = select(df, cfg.features, cfg.max_prompts)
        log.info("dataset: %d prompts from %s", len(df), cfg.path)
    else:
        rows = select(build_rows(cfg.features), None, cfg.max_prompts)
        df, logp, names, dropped = probe(ctx.model, rows, int(ctx.cfg.batch_size), bool(ctx.cfg.model.prepend_bos))
        table = association_table((logp["aae"] - logp["sae"]).numpy(), names, df.feature)
        write_table(ctx.tables / "attribute_association.csv", table)
        # The cache stage reads its baseline logit differences from these (same prompts, same runs).
        write_tensors(ctx.tensors / GUISE_LOGPROBS, logp,
                      metadata={"rows": "dataset.csv rows", "columns": json.dumps(names), "dropped": json.dumps(dropped)})
        write_figure(ctx.figures / "attribute_association.html", figures.attribute_association(table))
        log.info("dataset: built %d prompts over %d features; top AAE-associated attributes: %s", len(df),
                 df.feature.nunique(), ", ".join(table.attribute.head(5)))
    ordered = SEED_COLUMNS + [c for c in df.columns if c not in SEED_COLUMNS]
    write_table(ctx.run_dir / "dataset.csv", df[ordered])
