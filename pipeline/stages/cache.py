"""Stage `cache`: the baseline clean and corrupted runs.

Writes per-prompt logit differences (table and tensors), their means, the two anchors of the
normalized patching metric, and the notebook's `test_prompt` view (top-k next tokens with logits
and probabilities, and the rank of each answer) for the configured example prompt. Only what
later stages read is kept: per-prompt logit differences and the last-token logits of the example.
"""

from __future__ import annotations

import json
import logging

import pandas as pd
import torch

from pipeline import figures
from pipeline.artifacts import read_tensors, safe_open_metadata, write_atomic, write_figure, write_json, write_table, write_tensors
from pipeline.errors import PipelineError
from pipeline.forward import map_last_logits
from pipeline.metrics import logit_diff
from pipeline.nulls import baseline_null
from pipeline.data.builder import answer_columns
from pipeline.stages.data import GUISE_LOGPROBS

log = logging.getLogger(__name__)


def test_prompt_view(model, batch, index: int, answer_strs: tuple[str, str], answers: torch.Tensor, top_k: int) -> dict:
    """The notebook's utils.test_prompt as data: tokens, top-k next tokens and answer ranks."""
    one = batch.slice(slice(index, index + 1))
    last_logits = map_last_logits(model, one, 1, lambda lg, _r: lg)[0]
    probs = torch.softmax(last_logits, -1)
    order = torch.argsort(last_logits, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    top = [{"rank": i, "token": model.tokenizer.decode([int(t)]), "logit": float(last_logits[t]),
            "prob": float(probs[t])} for i, t in enumerate(order[:top_k])]
    ans = [{"role": role, "token": s, "logit": float(last_logits[a]), "prob": float(probs[a]), "rank": int(rank[a])}
           for role, s, a in zip(("correct", "incorrect"), answer_strs, answers.tolist())]
    return {"prompt": batch.prompts[index], "tokens": batch.str_tokens[index], "roles": batch.role_labels[index],
            "top_k": top, "answers": ans}


def view_text(view: dict) -> str:
    lines = [f"Tokenized prompt: {view['tokens']}", ""]
    for a in view["answers"]:
        lines.append(f"{a['role']:>9} answer {a['token']!r}: rank {a['rank']}, logit {a['logit']:.2f}, prob {a['prob']:.2%}")
    lines.append("")
    for t in view["top_k"]:
        lines.append(f"Top {t['rank']}th token. Logit: {t['logit']:.2f} Prob: {t['prob']:6.2%} Token: |{t['token']}|")
    return "\n".join(lines) + "\n"


def logit_diffs_from_probing(ctx) -> dict[str, torch.Tensor] | None:
    """When the data stage built this dataset it already ran every prompt of both guises and kept
    log p(attribute); the logit difference of two attributes is their log-probability difference
    (the log-sum-exp cancels), so the baseline needs no second pass over the prompts."""
    path = ctx.tensors / GUISE_LOGPROBS
    if not path.exists():
        return None
    logp = read_tensors(path)
    names = json.loads(safe_open_metadata(path)["columns"])
    index = {a: i for i, a in enumerate(names)}
    df, direction = ctx.dataset, ctx.cfg.direction
    if len(df) != logp["aae"].shape[0]:
        return None
    correct = torch.tensor([index[a] for a in df[f"best_attr_{direction.clean}"]])
    incorrect = torch.tensor([index[a] for a in df[f"best_attr_{direction.corrupted}"]])
    rows = torch.arange(len(df))
    out = {}
    for side, guise in (("clean", direction.clean), ("corrupted", direction.corrupted)):
        out[side] = logp[guise][rows, correct] - logp[guise][rows, incorrect]
    return out


def gap_null(ctx, ld: dict[str, torch.Tensor]) -> pd.DataFrame:
    """The gap (clean - corrupted logit difference) overall and per feature, with its pair-bootstrap
    interval, against the guise permutation null (pipeline/nulls.py): on a built dataset the
    answers are chosen again by `dataset.answers` under every swap; a CSV dataset's answers are fixed."""
    df, cfg = ctx.dataset, ctx.cfg
    observed = (ld["clean"] - ld["corrupted"]).double().numpy()
    units = df["pair_id"] if "pair_id" in df and df["pair_id"].astype(bool).all() else range(len(df))
    features = list(df["feature"]) if "feature" in df else None
    n_perm, n_boot, seed = int(cfg.nulls.permutations), int(cfg.nulls.bootstrap), int(cfg.seed)
    path = ctx.tensors / GUISE_LOGPROBS
    if cfg.dataset.path or not path.exists():
        return baseline_null(observed, units, features, n_perm, n_boot, seed).assign(answers="fixed (dataset.path)")
    logp = read_tensors(path)
    meta = safe_open_metadata(path)
    names = json.loads(meta["columns"])
    # The answers were chosen among the one-token attributes only (pipeline/data/builder.py): so are the null's.
    keep = answer_columns(names, json.loads(meta.get("not_answers", "{}")))
    assoc = (logp["aae"] - logp["sae"]).double().numpy()[:, keep]
    names = [names[i] for i in keep]
    return baseline_null(observed, units, features, n_perm, n_boot, seed, assoc, names,
                         str(cfg.dataset.answers), cfg.dataset.answer_pair).assign(answers=str(cfg.dataset.answers))


def run(ctx) -> None:
    model, pairs, bs = ctx.model, ctx.pairs, int(ctx.cfg.batch_size)
    ld = logit_diffs_from_probing(ctx)
    if ld is None:
        ld = {side: map_last_logits(model, getattr(pairs, side), bs,
                                    lambda lg, rows: logit_diff(lg, pairs.answers[rows]), desc=f"{side} run")
              for side in ("clean", "corrupted")}
    clean_mean, corrupted_mean = float(ld["clean"].mean()), float(ld["corrupted"].mean())
    if abs(clean_mean - corrupted_mean) < 1e-6:
        log.warning("clean and corrupted mean logit differences are equal: the normalized patching metric is undefined")
    df = ctx.dataset
    table = pd.DataFrame({
        "prompt_index": range(len(pairs)),
        "clean_prompt": pairs.clean.prompts, "corrupted_prompt": pairs.corrupted.prompts,
        "feature": df["feature"] if "feature" in df else "",
        "template": df["template"] if "template" in df else "",
        "correct": [a for a, _ in pairs.answer_strs], "incorrect": [b for _, b in pairs.answer_strs],
        "clean_logit_diff": ld["clean"].numpy(), "corrupted_logit_diff": ld["corrupted"].numpy(),
    })
    write_table(ctx.tables / "logit_diff.csv", table)
    write_tensors(ctx.tensors / "baseline.safetensors", {
        "clean_logit_diff": ld["clean"], "corrupted_logit_diff": ld["corrupted"], "answers": pairs.answers,
        "clean_positions": pairs.clean_pos, "corrupted_positions": pairs.corrupted_pos,
    }, metadata={"roles": json.dumps(pairs.role_names)})
    summary = {
        "direction": str(ctx.cfg.direction.name), "n_prompts": len(pairs),
        "clean_mean_logit_diff": clean_mean, "corrupted_mean_logit_diff": corrupted_mean,
        "anchors": {"clean": clean_mean, "corrupted": corrupted_mean},
        "roles": pairs.role_names,
        "by_feature": table.groupby("feature")[["clean_logit_diff", "corrupted_logit_diff"]].mean().to_dict("index") if table["feature"].astype(bool).any() else {},
    }
    null = gap_null(ctx, ld)
    write_table(ctx.tables / "baseline_null.csv", null)
    summary["gap_null"] = null.to_dict("records")
    write_json(ctx.tables / "baseline.json", summary)
    top = null.iloc[0]
    log.info("baseline gap %.4f [%.4f, %.4f] (pair bootstrap); guise permutation null (answers %s) 95%% band "
             "[%.4f, %.4f], p = %.4f", top.gap, top.ci_low, top.ci_high, top.answers, top.null_low, top.null_high, top.p_perm)
    write_figure(ctx.figures / "baseline_logit_diff.html", figures.baseline_logit_diffs(table.assign(feature=table.feature.replace("", "all"))))

    index = int(ctx.cfg.example.prompt_index)
    if not 0 <= index < len(pairs):
        raise PipelineError(f"example.prompt_index={index} is outside the dataset's {len(pairs)} prompts")
    views = {side: test_prompt_view(model, getattr(pairs, side), index, pairs.answer_strs[index], pairs.answers[index],
                                    int(ctx.cfg.example.top_k)) for side in ("clean", "corrupted")}
    write_json(ctx.tables / "test_prompt.json", views)
    write_atomic(ctx.tables / "test_prompt.txt", "".join(f"== {side} ==\n{view_text(v)}\n" for side, v in views.items()))
    log.info("baseline: mean logit diff clean %.4f, corrupted %.4f over %d prompts", clean_mean, corrupted_mean, len(pairs))
