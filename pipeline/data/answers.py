"""How the built dataset chooses each prompt's two answers from the matched guise probing.

`assoc[i, a]` is log p(a | AAE prompt i) - log p(a | SAE prompt i). A prompt's clean minus
corrupted logit difference is then assoc[i, aae answer] - assoc[i, sae answer] (the log-sum-exp
cancels), so a rule that picks the answers from the prompt's own row makes that gap positive by
construction, whatever the model. The rules:

- `per_prompt`: the notebook's rule: argmax / argmin of the prompt's own row (biased; kept to
  reproduce the notebook).
- `cross_fit`: argmax / argmin of the mean association over the rows of every *other* pair
  (leave one pair out: all templates and pronoun variants of a pair share its `pair_id`), so a
  prompt's own probing never selects its answers.
- `global`: one attribute pair for every prompt: the one given, or the argmax / argmin of the
  mean association over all rows (a single choice made on the whole dataset).

A pure function of the association matrix, so the permutation null (pipeline/nulls.py) can run
the same selection on guise-swapped data.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError

RULES = ("cross_fit", "per_prompt", "global")


def check_rule(rule: str, answer_pair, names: list[str] | None = None) -> tuple[int, int] | None:
    """Refuse an unknown rule or a bad `dataset.answer_pair`; the given pair's attribute indices
    (None without `names`: checked before probing, when the attributes are not known yet)."""
    if rule not in RULES:
        raise PipelineError(f"dataset.answers={rule!r} is not one of {', '.join(RULES)}")
    if answer_pair is None:
        return None
    if rule != "global":
        raise PipelineError(f"dataset.answer_pair is only used with dataset.answers=global (got answers={rule})")
    pair = [str(a).strip() for a in answer_pair]
    if len(pair) != 2 or pair[0] == pair[1]:
        raise PipelineError(f"dataset.answer_pair must be two different attributes [aae-side, sae-side], got {list(answer_pair)}")
    if names is None:
        return None
    missing = [a for a in pair if a not in names]
    if missing:
        raise PipelineError(f"dataset.answer_pair: {', '.join(map(repr, missing))} not among the probed attributes "
                            "(dataset.attributes, or the task's pipeline/data/tasks/<task>/attributes.txt)")
    return names.index(pair[0]), names.index(pair[1])


def choose_answers(assoc: np.ndarray, names: list[str], pair_ids, rule: str, answer_pair=None) -> tuple[np.ndarray, np.ndarray]:
    """assoc [rows, attributes] -> (aae answer index, sae answer index), each [rows]."""
    given = check_rule(rule, answer_pair, names)
    assoc = np.asarray(assoc, dtype=np.float64)
    n = assoc.shape[0]
    if rule == "per_prompt":
        return assoc.argmax(1), assoc.argmin(1)
    if rule == "global":
        if given is None:
            mean = assoc.mean(0)
            given = int(mean.argmax()), int(mean.argmin())
        return np.full(n, given[0]), np.full(n, given[1])
    # cross_fit: the mean over the other pairs' rows = (all rows - this pair's rows) / their count.
    groups, inverse = np.unique(np.asarray(pair_ids, dtype=str), return_inverse=True)
    if len(groups) < 2:
        raise PipelineError("dataset.answers=cross_fit needs prompts from at least two pairs (pair_id); "
                            "use dataset.answers=global with dataset.answer_pair for a single pair")
    group_sum = np.zeros((len(groups), assoc.shape[1]))
    np.add.at(group_sum, inverse, assoc)
    group_n = np.bincount(inverse, minlength=len(groups))
    others = (assoc.sum(0)[None, :] - group_sum) / (n - group_n)[:, None]  # [groups, attributes]
    return others.argmax(1)[inverse], others.argmin(1)[inverse]


def gaps(assoc: np.ndarray, aae: np.ndarray, sae: np.ndarray) -> np.ndarray:
    """Per-row clean minus corrupted logit difference: assoc[i, aae_i] - assoc[i, sae_i] (the same
    for both directions)."""
    rows = np.arange(assoc.shape[0])
    return assoc[rows, aae] - assoc[rows, sae]
