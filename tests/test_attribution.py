"""Direct logit attribution closes: the layer terms sum to the model's own metric per prompt (the
check the notebook had to comment out), for the logit difference and the favorability metric
alike; heads sum to their layer's attention term, and batched attributions equal
one-prompt-at-a-time ones."""

import pytest
import torch

from pipeline.attribution import attribute
from pipeline.stats import summarize
from conftest import make_cfg, pairs_for
from test_prompts import small_dataset


@pytest.mark.parametrize("metric", ["logit_diff", "favorability"])
@pytest.mark.parametrize("which", ["tiny_model", "embedded_model"])
def test_layer_attribution_sums_to_the_metric(which, metric, request):
    model = request.getfixturevalue(which)
    pairs = pairs_for(model, small_dataset(10), make_cfg([f"metric={metric}"]))
    assert len(set(pairs.clean.last.tolist())) > 1
    r = attribute(model, pairs.clean, pairs.answers, batch_size=4)
    torch.testing.assert_close(r["layer"].sum(0), r["model_metric"], atol=1e-3, rtol=0)
    torch.testing.assert_close(r["logit_lens"][-1], r["model_metric"], atol=1e-3, rtol=0)
    attn = [i for i, label in enumerate(r["labels"]["layer"]) if label.endswith("attn_out")]
    b_O = getattr(model.blocks[0].attn, "b_O", None)
    if b_O is None or float(b_O.detach().abs().max()) == 0:
        torch.testing.assert_close(r["head"].sum(1), r["layer"][attn], atol=1e-3, rtol=0)


@pytest.mark.parametrize("metric", ["logit_diff", "favorability"])
def test_batched_attribution_equals_single(tiny_model, metric):
    pairs = pairs_for(tiny_model, small_dataset(6), make_cfg([f"metric={metric}", "direction=sae_clean"]))
    batched = attribute(tiny_model, pairs.corrupted, pairs.answers, batch_size=6)
    single = attribute(tiny_model, pairs.corrupted, pairs.answers, batch_size=1)
    for key in ("logit_lens", "layer", "head", "model_metric"):
        torch.testing.assert_close(batched[key], single[key], atol=1e-4, rtol=0)


def test_summarize_interval_contains_mean_and_ignores_nan():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 200, generator=g) + torch.tensor([[0.0], [1.0], [-2.0]])
    x[0, :10] = float("nan")
    s = summarize(x, n_boot=500, seed=0)
    assert (s["ci_low"] < s["mean"]).all() and (s["mean"] < s["ci_high"]).all()
    torch.testing.assert_close(s["mean"][0], torch.nanmean(x[0]), atol=1e-6, rtol=0)
    assert s["n"].tolist() == [190, 200, 200]
    assert abs(float(s["mean"][2]) + 2) < 0.3


def test_pair_bootstrap_resamples_whole_pairs():
    """With pair ids, the interval resamples pairs: for pairs of equal size it equals the
    bootstrap of the pair means (same draws), and when the templates of a pair move together it
    is wider than the prompt bootstrap, which treats them as independent."""
    g = torch.Generator().manual_seed(1)
    n_pairs, per_pair = 40, 9
    pair_effect = torch.randn(2, n_pairs, generator=g).repeat_interleave(per_pair, -1)
    x = pair_effect + 0.05 * torch.randn(2, n_pairs * per_pair, generator=g)
    units = [f"p{i // per_pair}" for i in range(n_pairs * per_pair)]
    paired = summarize(x, n_boot=400, seed=3, units=units)
    of_means = summarize(x.reshape(2, n_pairs, per_pair).mean(-1), n_boot=400, seed=3)
    for key in ("mean", "ci_low", "ci_high"):
        torch.testing.assert_close(paired[key], of_means[key], atol=1e-6, rtol=0)
    prompts = summarize(x, n_boot=400, seed=3)
    assert ((paired["ci_high"] - paired["ci_low"]) > 2 * (prompts["ci_high"] - prompts["ci_low"])).all()
    assert (paired["sem"] > 2 * prompts["sem"]).all()
    torch.testing.assert_close(prompts["mean"], paired["mean"])
