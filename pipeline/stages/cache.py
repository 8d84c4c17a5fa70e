"""Stage `cache`: the baseline clean and corrupted runs.

Writes the run's metric per prompt (pipeline/metrics.py; table `metric.csv` and tensors), its
clean and corrupted means (the two anchors of the normalized patching metric), the gap between
them against its guise-swap null (under a rated metric the gap is the covert prejudice score),
and the notebook's `test_prompt` view (top-k next tokens with logits and probabilities, and each
answer token's weight and rank) for the configured example prompt.
"""

from __future__ import annotations

import json
import logging

import pandas as pd
import torch

from pipeline import figures
from pipeline.artifacts import read_tensors, safe_open_metadata, write_atomic, write_figure, write_json, write_table, write_tensors
from pipeline.errors import PipelineError
from pipeline.data.builder import answer_columns
from pipeline.data.dataset import direction_sign
from pipeline.data.ratings import score_name
from pipeline.forward import map_last_logits
from pipeline.metrics import LINEAR_METRICS, AnswerWeights, metric_values
from pipeline.nulls import baseline_null
from pipeline.stages.data import GUISE_LOGPROBS

log = logging.getLogger(__name__)


def test_prompt_view(model, batch, index: int, answer_strs: tuple[str, ...], answers: AnswerWeights, top_k: int,
                     shown: int = 5) -> dict:
    """The notebook's utils.test_prompt as data: tokens, top-k next tokens, the metric, and its
    answer tokens with weight, logit, probability and rank (the `shown` largest and smallest
    weights of a metric with many)."""
    one = batch.slice(slice(index, index + 1))
    last_logits = map_last_logits(model, one, 1, lambda lg, _r: lg)[0]
    probs = torch.softmax(last_logits, -1)
    order = torch.argsort(last_logits, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    top = [{"rank": i, "token": model.tokenizer.decode([int(t)]), "logit": float(last_logits[t]),
            "prob": float(probs[t])} for i, t in enumerate(order[:top_k])]
    weights = answers.weights[0]
    by_weight = torch.argsort(weights, descending=True, stable=True).tolist()
    picked = by_weight if len(by_weight) <= 2 * shown else by_weight[:shown] + by_weight[-shown:]
    ans = [{"token": answer_strs[k], "weight": float(weights[k]), "logit": float(last_logits[t]), "prob": float(probs[t]),
            "rank": int(rank[t])} for k in picked for t in [int(answers.tokens[0, k])]]
    return {"prompt": batch.prompts[index], "tokens": batch.str_tokens[index], "roles": batch.role_labels[index],
            "metric": float(answers.values(last_logits[None])[0]), "top_k": top, "answers": ans,
            "n_answer_tokens": len(by_weight)}


def view_text(view: dict) -> str:
    lines = [f"Tokenized prompt: {view['tokens']}", "", f"Metric: {view['metric']:+.4f}", ""]
    if view["n_answer_tokens"] > len(view["answers"]):
        lines.append(f"Answer tokens with the largest and smallest weights ({len(view['answers'])} of {view['n_answer_tokens']}):")
    for a in view["answers"]:
        lines.append(f"weight {a['weight']:+.3f} answer {a['token']!r}: rank {a['rank']}, logit {a['logit']:.2f}, prob {a['prob']:.2%}")
    lines.append("")
    for t in view["top_k"]:
        lines.append(f"Top {t['rank']}th token. Logit: {t['logit']:.2f} Prob: {t['prob']:6.2%} Token: |{t['token']}|")
    return "\n".join(lines) + "\n"


def metric_from_probing(ctx) -> dict[str, torch.Tensor] | None:
    """When the data stage built this dataset it already ran every prompt of both guises and kept
    log p(attribute); a linear metric's weights sum to 0 (or it is a difference of two answers), so
    it is the same weighted sum of log-probabilities (the log-sum-exp cancels) and the baseline
    needs no second pass over the prompts."""
    path = ctx.tensors / GUISE_LOGPROBS
    if not path.exists():
        return None
    logp = read_tensors(path)
    names = json.loads(safe_open_metadata(path)["columns"])
    df, direction, answers = ctx.dataset, ctx.cfg.direction, ctx.pairs.answers
    if len(df) != logp["aae"].shape[0] or not answers.sums_to_zero():
        return None
    tokenizer = ctx.tokenizer[0]
    column = {}
    for j, a in enumerate(names):
        ids = tokenizer(" " + a, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            column[ids[0]] = j
    if any(int(t) not in column for t in answers.tokens.unique()):
        return None
    cols = answers.tokens.clone().apply_(lambda t: column[t])
    out = {}
    for side, guise in (("clean", direction.clean), ("corrupted", direction.corrupted)):
        out[side] = (logp[guise].gather(1, cols) * answers.weights).sum(-1)
    return out


def gap_null(ctx, ld: dict[str, torch.Tensor]) -> pd.DataFrame:
    """The gap (clean - corrupted metric) overall and per feature, with its pair-bootstrap
    interval, against the guise permutation null (pipeline/nulls.py): on a built dataset the
    answers are chosen again by `dataset.answers` under every swap; a CSV dataset's answers are
    fixed, and a rated metric chooses none (a swap negates a pair's gap)."""
    df, cfg = ctx.dataset, ctx.cfg
    observed = (ld["clean"] - ld["corrupted"]).double().numpy()
    units = df["pair_id"] if "pair_id" in df and df["pair_id"].astype(bool).all() else range(len(df))
    features = list(df["feature"]) if "feature" in df else None
    n_perm, n_boot, seed = int(cfg.nulls.permutations), int(cfg.nulls.bootstrap), int(cfg.seed)
    path = ctx.tensors / GUISE_LOGPROBS
    if ctx.rated is not None:
        return baseline_null(observed, units, features, n_perm, n_boot, seed).assign(answers="none (rated metric)")
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
    metric = str(ctx.cfg.metric.name)
    ld = metric_from_probing(ctx)
    if ld is None:
        linear = metric if metric in LINEAR_METRICS else "logit_diff"  # the baseline of a nonlinear metric: its answers' weighted logits
        ld = {side: map_last_logits(model, getattr(pairs, side), bs,
                                    lambda lg, rows: metric_values(linear, lg, pairs.answers[rows]), desc=f"{side} run")
              for side in ("clean", "corrupted")}
    clean_mean, corrupted_mean = float(ld["clean"].mean()), float(ld["corrupted"].mean())
    if abs(clean_mean - corrupted_mean) < 1e-6:
        log.warning("clean and corrupted mean metric are equal: the normalized patching metric is undefined")
    df = ctx.dataset
    table = pd.DataFrame({
        "prompt_index": range(len(pairs)),
        "clean_prompt": pairs.clean.prompts, "corrupted_prompt": pairs.corrupted.prompts,
        "feature": df["feature"] if "feature" in df else "",
        "template": df["template"] if "template" in df else "",
        "clean_metric": ld["clean"].numpy(), "corrupted_metric": ld["corrupted"].numpy(),
    })
    if ctx.rated is None:  # the answer pair of each prompt (for this direction: correct first)
        flip = direction_sign(ctx.cfg.direction) < 0
        table.insert(5, "correct", [s[1] if flip else s[0] for s in pairs.answer_strs])
        table.insert(6, "incorrect", [s[0] if flip else s[1] for s in pairs.answer_strs])
    write_table(ctx.tables / "metric.csv", table)
    write_tensors(ctx.tensors / "baseline.safetensors", {
        "clean_metric": ld["clean"], "corrupted_metric": ld["corrupted"],
        "answer_tokens": pairs.answers.tokens, "answer_weights": pairs.answers.weights,
        "clean_positions": pairs.clean_pos, "corrupted_positions": pairs.corrupted_pos,
    }, metadata={"roles": json.dumps(pairs.role_names), "metric": metric})
    summary = {
        "direction": str(ctx.cfg.direction.name), "metric": metric, "n_prompts": len(pairs),
        "headline": headline_name(ctx),
        "clean_mean": clean_mean, "corrupted_mean": corrupted_mean,
        "anchors": {"clean": clean_mean, "corrupted": corrupted_mean},
        "roles": pairs.role_names,
        "by_feature": table.groupby("feature")[["clean_metric", "corrupted_metric"]].mean().to_dict("index") if table["feature"].astype(bool).any() else {},
    }
    null = gap_null(ctx, ld)
    write_table(ctx.tables / "baseline_null.csv", null)
    summary["gap_null"] = null.to_dict("records")
    write_json(ctx.tables / "baseline.json", summary)
    top = null.iloc[0]
    log.info("%s %.4f [%.4f, %.4f] (pair bootstrap); guise permutation null (answers %s) 95%% band "
             "[%.4f, %.4f], p = %.4f", summary["headline"], top.gap, top.ci_low, top.ci_high, top.answers, top.null_low,
             top.null_high, top.p_perm)
    write_figure(ctx.figures / "baseline_metric.html",
                 figures.baseline_metric(table.assign(feature=table.feature.replace("", "all")), metric))

    index = int(ctx.cfg.example.prompt_index)
    if not 0 <= index < len(pairs):
        raise PipelineError(f"example.prompt_index={index} is outside the dataset's {len(pairs)} prompts")
    views = {side: test_prompt_view(model, getattr(pairs, side), index, pairs.answer_strs[index], pairs.answers[index],
                                    int(ctx.cfg.example.top_k)) for side in ("clean", "corrupted")}
    write_json(ctx.tables / "test_prompt.json", views)
    write_atomic(ctx.tables / "test_prompt.txt", "".join(f"== {side} ==\n{view_text(v)}\n" for side, v in views.items()))
    log.info("baseline: mean %s clean %.4f, corrupted %.4f over %d prompts", metric, clean_mean, corrupted_mean, len(pairs))


def headline_name(ctx) -> str:
    """What the gap (clean - corrupted, = m(AAE) - m(SAE) in either direction) is called."""
    if ctx.rated is not None:
        return score_name(ctx.rated.name, str(ctx.cfg.dataset.get("task") or "traits"))
    return "gap (clean - corrupted logit difference)"
