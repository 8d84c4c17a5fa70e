"""The dataset a run works on: a CSV (dataset.path) or the built one, its fixed subset, and its
prompts paired for the configured direction."""

from __future__ import annotations

import pandas as pd
import torch

from pipeline.data.builder import interleave
from pipeline.data.resources import packaged_templates
from pipeline.errors import PipelineError
from pipeline.metrics import AnswerWeights
from pipeline.prompts import PairedPrompts, align_roles, split_by_difference, split_with_template, tokenize

SEED_COLUMNS = ["prompt_aae", "prompt_sae", "best_attr_aae", "best_attr_sae"]


def select(df: pd.DataFrame, features=None, max_prompts=None) -> pd.DataFrame:
    """Keep the configured features, then the first `max_prompts` rows of the fixed order."""
    if features:
        if "feature" not in df.columns:
            raise PipelineError("dataset.features needs a 'feature' column in the dataset")
        df = df[df.feature.isin(features)]
        if len(df) == 0:
            raise PipelineError(f"dataset.features={list(features)} keeps no rows")
    if max_prompts is not None:
        if int(max_prompts) < 1:
            raise PipelineError(f"dataset.max_prompts must be a positive number, got {max_prompts}")
        df = df.head(int(max_prompts))
    return df.reset_index(drop=True)


def one_token_answers(tokenizer, words: list[str], where: str, candidates: list[str] = (), advice: str = "") -> dict[str, int]:
    """Each answer's token id; one clear line if an answer is more than one token (with its leading
    space) for this tokenizer, naming its pieces and the one-token `candidates` it could be
    replaced by."""
    def ids(word):
        return tokenizer(" " + word, add_special_tokens=False)["input_ids"]

    bad = [w for w in words if len(ids(w)) != 1]
    if bad:
        pieces = "; ".join(f"{' ' + w!r} is " + " + ".join(repr(tokenizer.decode([t])) for t in ids(w)) for w in bad)
        alternatives = [c for c in candidates if c not in bad and len(ids(c)) == 1]
        hint = (f"; one-token attributes it could use instead: {', '.join(repr(' ' + c) for c in alternatives)}"
                if alternatives else "")
        raise PipelineError(f"{where}: answers that are not one token for this model's tokenizer ({pieces}); the logit "
                            f"difference, attribution and patching read one token{hint}{advice}")
    return {w: ids(w)[0] for w in words}


def splits_for(df: pd.DataFrame, side: str) -> list[tuple[str, str, str]]:
    """(prefix, utterance, suffix) of every prompt on one side: by its template column, by one of
    the package's task templates, or else where the AAE and SAE prompts differ."""
    templates = packaged_templates()
    out = []
    for row in df.itertuples(index=False):
        prompt = getattr(row, f"prompt_{side}")
        # A `template` column is the built dataset's format string; any other content in a column
        # of that name is the user's metadata and is not read here.
        own = getattr(row, "template", None) if "template" in df.columns else None
        known = [own] if isinstance(own, str) and own.count("{}") == 1 else templates
        split = split_with_template(prompt, known) or split_with_template(prompt, templates)
        if split is None:
            sa, ss = split_by_difference(row.prompt_aae, row.prompt_sae)
            split = sa if side == "aae" else ss
        out.append(split)
    return out


def direction_sign(direction) -> float:
    """+1 for aae_clean, -1 for sae_clean: the metric's weights are oriented to the AAE side
    (pipeline/metrics.py), and sae_clean negates them."""
    return 1.0 if str(direction.clean) == "aae" else -1.0


def metric_answers(tokenizer, df: pd.DataFrame, rated=None, sign: float = 1.0) -> tuple[AnswerWeights, list[tuple[str, ...]]]:
    """The metric's answer tokens and weights for the rows of `df`, times `sign`, and each row's
    answer tokens as text: the rated metric's (pipeline/data/ratings.py RatedMetric) where given,
    else each row's answer pair (best_attr_aae, best_attr_sae) with weights (+1, -1)."""
    if rated is not None:
        words = tuple(" " + a for a in rated.one_token_names)
        return rated.answers(len(df), sign), [words] * len(df)
    ids = one_token_answers(tokenizer, sorted(set(df.best_attr_aae) | set(df.best_attr_sae)), "dataset")
    tokens = torch.tensor([[ids[a], ids[b]] for a, b in zip(df.best_attr_aae, df.best_attr_sae)], dtype=torch.long)
    return AnswerWeights.pair(tokens.reshape(-1, 2), sign), [(" " + a, " " + b) for a, b in zip(df.best_attr_aae, df.best_attr_sae)]


def pair_prompts(model, df: pd.DataFrame, direction, prepend_bos: bool, rated=None) -> PairedPrompts:
    """Clean/corrupted prompts for `direction` and the metric's answers (`metric_answers`):
    sae_clean swaps the sides and negates the weights and nothing else."""
    clean, corrupt = direction.clean, direction.corrupted
    answers, answer_strs = metric_answers(model.tokenizer, df, rated, direction_sign(direction))
    clean_batch = tokenize(model, list(df[f"prompt_{clean}"]), splits_for(df, clean), prepend_bos)
    corrupt_batch = tokenize(model, list(df[f"prompt_{corrupt}"]), splits_for(df, corrupt), prepend_bos)
    names, cpos, kpos = align_roles(clean_batch, corrupt_batch)
    return PairedPrompts(clean_batch, corrupt_batch, answers, answer_strs, names, cpos, kpos)


__all__ = ["SEED_COLUMNS", "select", "metric_answers", "one_token_answers", "pair_prompts", "direction_sign", "interleave"]
