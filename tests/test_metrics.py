"""The metric as weighted answer tokens (pipeline/metrics.py) and the rated metrics
(pipeline/data/ratings.py): the favorability weights sum to 0 with positives summing to 1, the
metric equals the same weighted sum of log-probabilities, it is a direction in the final-normed
residual stream, sae_clean negates it, and bad ratings files are refused in one line."""

import numpy as np
import pytest
import torch

from pipeline.data.ratings import packaged_ratings, rated_metric, rating_weights, read_ratings
from pipeline.data.resources import load_attributes
from pipeline.errors import PipelineError
from pipeline.forward import _normed_residual, map_last_logits
from pipeline.metrics import AnswerWeights
from conftest import make_cfg, pairs_for
from test_prompts import small_dataset


def test_rating_weights_sum_to_zero_with_unit_sides():
    w = rating_weights([1.0, -2.0, np.nan, 0.5, -0.1])
    assert w[2] == 0
    assert abs(w.sum()) < 1e-12 and abs(w[w > 0].sum() - 1) < 1e-12 and abs(w[w < 0].sum() + 1) < 1e-12
    assert w[1] > 0 and w[0] < 0  # the least favorable attribute weighs most toward the metric's positive side
    with pytest.raises(PipelineError, match="two rated attributes"):
        rating_weights([1.0, 1.0, np.nan])


def test_favorability_metric_over_the_traits(tiny_model):
    rated = rated_metric(make_cfg([]).metric, load_attributes("traits"), tiny_model.tokenizer)
    assert len(rated.tokens) == 46 and rated.unrated == []  # all 83 traits rated; 46 are one token for SmolLM2
    w = rated.weights
    assert abs(w.sum()) < 1e-9 and abs(w[w > 0].sum() - 1) < 1e-9
    ratings = {a: packaged_ratings("favorability")[a] for a in rated.one_token_names}
    worst = min(ratings, key=ratings.get)
    assert w[rated.one_token_names.index(worst)] == w.max()


@pytest.mark.parametrize("direction", ["aae_clean", "sae_clean"])
def test_metric_equals_weighted_log_probabilities_and_is_a_direction(tiny_model, direction):
    cfg = make_cfg([f"direction={direction}"])
    pairs = pairs_for(tiny_model, small_dataset(6), cfg)
    answers = pairs.answers
    assert answers.sums_to_zero()
    logits = map_last_logits(tiny_model, pairs.clean, 3, lambda lg, _r: lg)
    m = answers.values(logits)
    logp = logits.log_softmax(-1)
    torch.testing.assert_close(m, (logp.gather(1, answers.tokens) * answers.weights).sum(-1), atol=1e-5, rtol=0)
    # m = final-normed residual . (W_U[:, t] @ w) + b_U[t] @ w at each prompt's last token
    with torch.no_grad():
        normed = _normed_residual(tiny_model, pairs.clean.tokens, attention_mask=pairs.clean.attention_mask)
    last = normed[torch.arange(len(pairs)), pairs.clean.last]
    direction_, bias = answers.directions(tiny_model)
    torch.testing.assert_close((last * direction_).sum(-1) + bias, m, atol=1e-4, rtol=0)
    other = pairs_for(tiny_model, small_dataset(6), make_cfg(["direction=" + ("sae_clean" if direction == "aae_clean" else "aae_clean")]))
    assert torch.equal(other.answers.tokens, answers.tokens) and torch.equal(other.answers.weights, -answers.weights)


def test_answer_pair_is_the_logit_difference():
    a = AnswerWeights.pair(torch.tensor([[3, 5], [7, 2]]))
    logits = torch.arange(20.0).reshape(2, 10)
    torch.testing.assert_close(a.values(logits), torch.tensor([3.0 - 5.0, 17.0 - 12.0]))
    assert torch.equal(a[1:].tokens, torch.tensor([[7, 2]])) and len(a.repeat(3)) == 6
    torch.testing.assert_close(a.negated().values(logits), -a.values(logits))


def test_prestige_matches_titles_and_aliases_and_lists_the_rest(tiny_model):
    rated = rated_metric(make_cfg(["+task=occupations"]).metric, load_attributes("occupations"), tiny_model.tokenizer)
    assert set(rated.unrated) == {"judge", "scientist", "cleaner", "rapper", "comedian"}
    ratings = dict(zip(rated.attributes, rated.ratings))
    assert ratings["doctor"] == 7.6 and ratings["accountant"] == 5.7  # an alias (Physician) and an exact title


def test_users_ratings_file(tmp_path, tiny_model):
    path = tmp_path / "mine.tsv"
    path.write_text("attribute\trating\nlazy\t-1.5\nintelligent\t1.8\n# a comment\n\nkind\t1.2\n")
    assert read_ratings(str(path)) == {"lazy": -1.5, "intelligent": 1.8, "kind": 1.2}
    cfg = make_cfg([f"metric.ratings={path}"])
    rated = rated_metric(cfg.metric, load_attributes("traits"), tiny_model.tokenizer)
    assert len(rated.unrated) == 80 and rated.weights.shape == (3,)
    for text, message in (("lazy\n", "line 1: expected an attribute, a tab and a rating"),
                          ("lazy\t-1\nkind\tvery\n", "line 2: the rating 'very' is not a number"),
                          ("lazy\t-1\nLazy\t1\n", "line 2: 'Lazy' is rated twice"),
                          ("lazy\t-1\n", None)):
        path.write_text(text)
        if message is None:  # one rated attribute: refused when the metric is built
            with pytest.raises(PipelineError, match="two rated attributes") as err:
                rated_metric(cfg.metric, load_attributes("traits"), tiny_model.tokenizer)
        else:
            with pytest.raises(PipelineError, match=message) as err:
                read_ratings(str(path))
        assert "\n" not in str(err.value)
