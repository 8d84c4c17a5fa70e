"""Stage `data`: build the dataset by matched guise probing, or load the configured CSV, and
write it as `dataset.csv` in the notebook's format (feature and template as extra columns).

The built dataset's pairs, templates and attributes come from the package (the task's files) or
from the user's files (`dataset.pairs`, `dataset.templates`, `dataset.attributes`); every attribute
is scored whatever its number of tokens, and the answers are one-token attributes."""

from __future__ import annotations

import json
import logging

import torch

from pipeline import figures, validation
from pipeline.artifacts import write_figure, write_json, write_table, write_tensors
from pipeline.data.answers import check_rule
from pipeline.data.builder import association_table, build_rows, interleave, probe
from pipeline.data.dataset import SEED_COLUMNS, one_token_answers, select
from pipeline.data.resources import load_attributes, load_pairs, load_templates
from pipeline.data.stereotypes import katz_braly_agreement
from pipeline.errors import PipelineError
from pipeline.nulls import association_null

log = logging.getLogger(__name__)
GUISE_LOGPROBS = "guise_logprobs.safetensors"  # log p(attribute | prompt) per row, per side
GUISE_ATTRIBUTION = "guise_attribution.safetensors"  # direct logit attributions from the same pass, per side
NO_ANSWERS_NEEDED = ("data", "report")  # stages that read no answer's logit


def run(ctx) -> None:
    cfg = ctx.cfg.dataset
    if cfg.path:
        given = [k for k in ("pairs", "templates", "attributes") if cfg.get(k)]
        if given:
            raise PipelineError(f"dataset.path (a finished dataset) and dataset.{given[0]} (an input to build one) "
                                "exclude each other; give one of them")
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
        check_rule(cfg.answers, cfg.answer_pair)
        task = str(cfg.get("task") or "traits")
        pairs = load_pairs(cfg.get("pairs"), cfg.get("feature"))
        templates = load_templates(task, cfg.get("templates"))
        attributes = load_attributes(task, cfg.get("attributes"))
        check_rule(cfg.answers, cfg.answer_pair, attributes)  # a given pair must be among the attributes
        fixed = [str(a).strip() for a in cfg.answer_pair] if cfg.answer_pair else None
        if fixed and any(s not in NO_ANSWERS_NEEDED for s in ctx.cfg.stage.stages):
            # Stop before probing: the later stages could not use a multi-token answer.
            one_token_answers(ctx.tokenizer[0], fixed, "dataset.answer_pair", candidates=attributes,
                              advice=" (set dataset.answer_pair=[<aae side>,<sae side>]); stage=data alone "
                                     "still writes the association table of every attribute")
        rows = select(build_rows(pairs, templates, cfg.features), None, cfg.max_prompts)
        record = "attribution" in ctx.cfg.stage.stages  # one pass serves probing, baseline and attribution
        df, logp, names, left_out, attributions = probe(ctx.model, rows, attributes, int(ctx.cfg.batch_size),
                                                        bool(ctx.cfg.model.prepend_bos), cfg.answers, fixed,
                                                        bool(cfg.multi_token), record)
        assoc = (logp["aae"] - logp["sae"]).numpy()
        n_perm, seed = int(ctx.cfg.nulls.permutations), int(ctx.cfg.seed)
        null = association_null(assoc, df.pair_id, n_perm, seed, float(ctx.cfg.nulls.fdr)).assign(attribute=names)
        n_tokens = [len(ctx.model.tokenizer(" " + a, add_special_tokens=False)["input_ids"]) for a in names]
        table = association_table(assoc, names, df.feature, n_tokens).merge(null, on="attribute", how="left")
        write_table(ctx.tables / "attribute_association.csv", table)
        agreement = katz_braly_agreement(table, n_perm, seed)
        if agreement["n_listed"]:  # a task without trait adjectives (conviction, occupations) has nothing to compare
            write_json(ctx.tables / "katz_braly_agreement.json", agreement)
            log.info("Katz-Braly (1933): %d of the %d listed stereotypes among the top %d AAE-associated attributes "
                     "(permutation p %.3f); Spearman %.3f (p %.3f)", agreement["overlap_top_k"], agreement["n_listed"],
                     agreement["n_listed"], agreement["p_overlap"], agreement["spearman"], agreement["p_spearman"])
        # The cache stage reads its baseline logit differences from these (same prompts, same runs).
        write_tensors(ctx.tensors / GUISE_LOGPROBS, logp,
                      metadata={"rows": "dataset.csv rows", "columns": json.dumps(names),
                                "not_answers": json.dumps(left_out)})
        if attributions:
            write_guise_attributions(ctx.tensors / GUISE_ATTRIBUTION, attributions)
        write_figure(ctx.figures / "attribute_association.html", figures.attribute_association(table))
        log.info("dataset: built %d prompts over %d features (task %s, %d attributes), answers by rule %s; top "
                 "AAE-associated attributes: %s", len(df), df.feature.nunique(), task, len(names), cfg.answers,
                 ", ".join(table.attribute.head(5)))
    ordered = SEED_COLUMNS + [c for c in df.columns if c not in SEED_COLUMNS]
    write_table(ctx.run_dir / "dataset.csv", df[ordered])


def write_guise_attributions(path, attributions: dict) -> None:
    """Each guise's attributions on the direction best_attr_aae - best_attr_sae (the attribution
    stage flips the sign for direction=sae_clean), its prompts' last-token positions and answer
    token ids (checked against the run's prompt pairs before use), and the last token's
    attention over the prompt's positions, zero-padded, in float16 (it is read for figures only)."""
    tensors, labels = {}, None
    for side, a in attributions.items():
        for key in ("logit_lens", "layer", "head", "last", "answers"):
            tensors[f"{side}/{key}"] = a[key].clone()
        width = max(t.shape[-1] for t in a["last_attention"])
        tensors[f"{side}/attention"] = torch.stack(
            [torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in a["last_attention"]]).half()
        labels = a["labels"]
    write_tensors(path, tensors, metadata={"labels": json.dumps(labels), "direction": "best_attr_aae - best_attr_sae",
                                           "axes": "logit_lens/layer [component, prompt], head [layer, head, prompt], "
                                                   "attention [prompt, layer, head, position]"})
