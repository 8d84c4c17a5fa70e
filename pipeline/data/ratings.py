"""Human ratings of the task's attributes, and the weights of a rated metric (pipeline/metrics.py).

`metric=favorability` rates the trait adjectives (Bergsieker et al. 2012, -2 very unfavorable ..
+2 very favorable: favorability_bergsieker_2012.csv); `metric=prestige` rates occupations (GSS
2012 occupational prestige: occupation_prestige_gss_2012.csv, with occupation_aliases.csv for the
occupations task's names that no title equals); `metric.ratings=<file>` gives a user's own ratings
(one `attribute<TAB>rating` per line). An attribute takes its rating by name, ignoring case.

The weights, over the attributes that have a rating (the rest get 0 and the run log lists them):

    w_a = -(f_a - mean f), then scaled so the positive weights sum to 1 and the negative to -1

so m = sum_a w_a logit_a is the weighted mean logit of the low-rated attributes minus that of the
high-rated ones: higher means the next token leans toward unfavorable (or low-prestige) attributes,
and the weights sum to 0 (m is also sum_a w_a log p(a)). The mechanistic stages read one token, so
their weights run over the one-token rated attributes (`RatedMetric.tokens`/`weights`); the data
stage also scores every rated attribute by the chain rule (`chain_weights`), with the mean taken
over that larger set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.resources import files

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.metrics import RATED_METRICS, AnswerWeights

log = logging.getLogger(__name__)

SOURCES = {
    "favorability": "Bergsieker et al. (2012) favorability ratings of the Katz-Braly adjectives, as used by Hofmann et al. (2024)",
    "prestige": "GSS 2012 occupational prestige ratings (Smith & Son 2014), as used by Hofmann et al. (2024)",
}
ACCEPTED = "one attribute per line, a tab, then its rating (a number); blank lines and lines starting with # are skipped"


def packaged_ratings(metric: str) -> dict[str, float]:
    """{attribute, lower case: rating} shipped with the package for a rated metric."""
    data = files("pipeline.data")
    if metric == "favorability":
        with data.joinpath("favorability_bergsieker_2012.csv").open() as f:
            table = pd.read_csv(f, comment="#")
        return {str(a).lower(): float(r) for a, r in zip(table.attribute, table.rating)}
    if metric == "prestige":
        with data.joinpath("occupation_prestige_gss_2012.csv").open() as f:
            titles = pd.read_csv(f, comment="#")
        with data.joinpath("occupation_aliases.csv").open() as f:
            aliases = pd.read_csv(f, comment="#")
        by_title = {str(t).lower(): float(r) for t, r in zip(titles.occupation, titles.rating)}
        by_alias = {str(o).lower(): by_title[str(t).lower()] for o, t in zip(aliases.occupation, aliases.gss_title)}
        return {**by_title, **by_alias}
    raise PipelineError(f"metric={metric}: no packaged ratings; rated metrics are {', '.join(RATED_METRICS)}")


def read_ratings(path: str) -> dict[str, float]:
    """A user's ratings file (see ACCEPTED); a first line whose rating is not a number is a header."""
    try:
        text = open(path, encoding="utf-8-sig").read()
    except FileNotFoundError:
        raise PipelineError(f"metric.ratings={path}: no such file; accepted: {ACCEPTED}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PipelineError(f"metric.ratings={path}: cannot be read ({err}); accepted: {ACCEPTED}") from None
    ratings: dict[str, float] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip():
            raise PipelineError(f"metric.ratings={path}, line {n}: expected an attribute, a tab and a rating, got {line!r}; "
                                f"accepted: {ACCEPTED}")
        name, value = parts[0].strip(), parts[1].strip()
        try:
            rating = float(value)
        except ValueError:
            if not ratings and n == 1:
                continue  # a header line
            raise PipelineError(f"metric.ratings={path}, line {n}: the rating {value!r} is not a number; accepted: {ACCEPTED}") from None
        if not np.isfinite(rating):
            raise PipelineError(f"metric.ratings={path}, line {n}: the rating {value!r} is not a finite number; accepted: {ACCEPTED}")
        if name.lower() in ratings:
            raise PipelineError(f"metric.ratings={path}, line {n}: {name!r} is rated twice; accepted: {ACCEPTED}")
        ratings[name.lower()] = rating
    if not ratings:
        raise PipelineError(f"metric.ratings={path}: no ratings in the file; accepted: {ACCEPTED}")
    return ratings


def rating_weights(ratings) -> np.ndarray:
    """w = -(f - mean f) over the finite ratings (NaN: unrated, weight 0), positives scaled to sum
    to 1 and negatives to -1."""
    r = np.asarray(ratings, dtype=np.float64)
    ok = np.isfinite(r)
    w = np.zeros_like(r)
    centred = -(r[ok] - r[ok].mean()) if ok.any() else np.zeros(0)
    pos, neg = centred > 1e-12, centred < -1e-12
    if not pos.any() or not neg.any():
        raise PipelineError("a rated metric needs at least two rated attributes with different ratings "
                            f"(got {int(ok.sum())} rated)")
    centred = np.where(pos, centred / centred[pos].sum(), np.where(neg, centred / -centred[neg].sum(), 0.0))
    w[ok] = centred
    return w


@dataclass
class RatedMetric:
    """A rated metric over a task's attributes: the one-token rated attributes with their token
    ids and weights (what every mechanistic stage reads), the weights of every attribute for the
    chain-rule score, and what was left out."""

    name: str
    source: str
    attributes: list[str]  # every attribute probed, in order
    ratings: np.ndarray  # [attributes], NaN where unrated
    one_token: list[bool]
    token_ids: list[int | None]  # the one token of each one-token attribute
    unrated: list[str]

    @property
    def one_token_names(self) -> list[str]:
        return [a for a, one, r in zip(self.attributes, self.one_token, self.ratings) if one and np.isfinite(r)]

    @property
    def tokens(self) -> list[int]:
        return [t for t, one, r in zip(self.token_ids, self.one_token, self.ratings) if one and np.isfinite(r)]

    @property
    def weights(self) -> np.ndarray:
        """Weights of the one-token rated attributes (in `one_token_names` order)."""
        return rating_weights([r for one, r in zip(self.one_token, self.ratings) if one and np.isfinite(r)])

    def weights_over(self, names: list[str], one_token_only: bool = True) -> np.ndarray:
        """Weights over the columns `names` (attributes of this metric): the one-token metric's, or
        with one_token_only=False the chain-rule score's over every rated attribute; 0 elsewhere."""
        index = {a: i for i, a in enumerate(self.attributes)}
        keep = [(one or not one_token_only) for one in self.one_token]
        ratings = np.array([self.ratings[index[a]] if keep[index[a]] else np.nan for a in names])
        return rating_weights(ratings)

    def answers(self, n: int, sign: float = 1.0) -> AnswerWeights:
        """The metric's answer tokens and weights for n prompts, times `sign` (-1 for sae_clean)."""
        return AnswerWeights.shared(self.tokens, sign * self.weights, n)


def score_name(metric: str, task: str) -> str:
    """What the AAE - SAE gap of a rated metric is called: the covert prejudice score when the
    dialect shows the race, the overt one when the prompts name it (the overt task)."""
    return f"{'overt' if task == 'overt' else 'covert'} prejudice score ({metric})"


def rated_metric(metric_cfg, attributes: list[str], tokenizer) -> RatedMetric:
    """The rated metric `metric_cfg.name` over `attributes` (the task's or the user's), with
    `metric_cfg.ratings` (a file) or the packaged ratings; logs the attributes left without a
    rating and the rated ones that are more than one token (scored by the chain rule only)."""
    name = str(metric_cfg.name)
    path = metric_cfg.get("ratings")
    ratings = read_ratings(str(path)) if path else packaged_ratings(name)
    source = f"metric.ratings={path}" if path else SOURCES[name]
    values = np.array([ratings.get(a.lower(), np.nan) for a in attributes])
    ids = [tokenizer(" " + a, add_special_tokens=False)["input_ids"] for a in attributes]
    one = [len(t) == 1 for t in ids]
    unrated = [a for a, v in zip(attributes, values) if not np.isfinite(v)]
    metric = RatedMetric(name, source, list(attributes), values, one, [t[0] if len(t) == 1 else None for t in ids], unrated)
    where = f"metric={name}" + (f" (ratings {path})" if path else "")
    if unrated:
        log.info("%s: %d of %d attributes have no rating and get weight 0: %s", where, len(unrated), len(attributes),
                 ", ".join(unrated))
    multi = [a for a, o, v in zip(attributes, one, values) if not o and np.isfinite(v)]
    if multi:
        log.info("%s: %d rated attributes are more than one token for this model: in the chain-rule score only: %s",
                 where, len(multi), ", ".join(multi))
    try:
        metric.weights  # noqa: B018  (refuses too few rated one-token attributes, in one line)
    except PipelineError as err:
        raise PipelineError(f"{where}: {err} among the {sum(one)} one-token attributes of {len(attributes)}; give "
                            "metric.ratings=<file> with ratings of these attributes, or use metric=logit_diff") from None
    return metric
