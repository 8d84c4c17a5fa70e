"""Nulls and significance: the sign-flip test and Benjamini-Hochberg against worked examples, the
answer rules (cross_fit never looks at a prompt's own pair), and the guise permutation null on
data with no dialect signal: cross_fit and global find nothing, per_prompt's gap is positive anyway."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.data.answers import choose_answers, gaps
from pipeline.data.builder import build_rows, probe
from pipeline.data.stereotypes import average_precision, load_stereotypes, stereotype_agreement
from pipeline.data.resources import load_attributes
from pipeline.errors import PipelineError
from pipeline.nulls import baseline_null, benjamini_hochberg, sign_flip_test
from pipeline.runner import run
from pipeline.stages.report import build_report
from pipeline.stats import summary_table
from conftest import make_cfg, run_cli


def test_sign_flip_worked_example():
    # [1, 2, 3]: the 8 sign patterns give sums +-6, +-4, +-2, 0, 0; |sum| >= 6 twice -> p = 2/8.
    # [1, -1, 0.5]: every pattern's |sum| is >= 0.5 -> p = 1. [nan, 1, 1]: the NaN prompt is left
    # out of the mean (1); |+-1 +-1| >= 2 in 4 of 8 patterns -> p = 0.5.
    values = np.array([[1.0, 2.0, 3.0], [1.0, -1.0, 0.5], [np.nan, 1.0, 1.0]])
    np.testing.assert_allclose(sign_flip_test(values, n_perm=1000), [0.25, 1.0, 0.5])
    # 30 prompts all equal: only the two all-same patterns are as extreme; random patterns
    # (2**30 > n_perm) practically never draw them -> p = (1 + 0) / (1 + 1000).
    assert sign_flip_test(np.full((1, 30), 0.7), n_perm=1000)[0] == pytest.approx(1 / 1001)
    # Flipped by unit: [1, 2, 3] in units (a, a, b) -> sums +-3 +-3: |sum| >= 6 in 2 of 4 -> p = 0.5.
    assert sign_flip_test(np.array([[1.0, 2.0, 3.0]]), units=["a", "a", "b"])[0] == pytest.approx(0.5)


def test_benjamini_hochberg_worked_example():
    # Sorted p 0.01, 0.03, 0.04, 0.5 against 0.05 * k / 4 = 0.0125, 0.025, 0.0375, 0.05: only 0.01
    # passes. q = min over j >= i of p_(j) * 4 / j: 0.04, 0.0533, 0.0533, 0.5.
    q, flag = benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.5]), 0.05)
    np.testing.assert_allclose(q, [0.04, 0.16 / 3, 0.16 / 3, 0.5])
    assert flag.tolist() == [True, False, False, False]
    q, flag = benjamini_hochberg(np.array([0.01, np.nan, 0.04]), 0.05)  # m = 2 finite p-values
    np.testing.assert_allclose(q, [0.02, np.nan, 0.04])
    assert flag.tolist() == [True, False, True]


def test_summary_table_flags_a_real_effect_only():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 60, generator=g)
    values[0] += 2.0  # a clear effect; rows 1 and 2 have mean 0
    table = summary_table(values, pd.DataFrame({"name": ["a", "b", "c"]}), None, n_boot=200, seed=0)
    assert {"p_signflip", "q_bh", "significant_bh"} <= set(table.columns)
    assert table.significant_bh.tolist()[0] and table.p_signflip[0] < 0.01
    assert not table.significant_bh[1:].any()


NAMES = ["a", "b", "c", "d"]


def test_cross_fit_never_reads_its_own_pair():
    rng = np.random.default_rng(0)
    assoc = rng.normal(size=(24, 4))
    pair_ids = np.repeat(["p0", "p1", "p2", "p3"], 6)
    aae, sae = choose_answers(assoc, NAMES, pair_ids, "cross_fit")
    for pair in ("p0", "p2"):
        own = pair_ids == pair
        changed = assoc.copy()
        changed[own] = rng.normal(scale=100.0, size=(own.sum(), 4))
        aae2, sae2 = choose_answers(changed, NAMES, pair_ids, "cross_fit")
        assert (aae2[own] == aae[own]).all() and (sae2[own] == sae[own]).all()
    # By hand: the rows of p0 get the argmax / argmin of the mean over p1..p3's rows.
    others = assoc[pair_ids != "p0"].mean(0)
    assert (aae[pair_ids == "p0"] == others.argmax()).all() and (sae[pair_ids == "p0"] == others.argmin()).all()


def test_answer_rules_per_prompt_global_and_bad_input():
    assoc = np.array([[3.0, 0.0, -1.0, 0.5], [-2.0, 1.0, 0.0, 0.0]])
    aae, sae = choose_answers(assoc, NAMES, ["x", "y"], "per_prompt")
    assert aae.tolist() == [0, 1] and sae.tolist() == [2, 0]
    np.testing.assert_allclose(gaps(assoc, aae, sae), [4.0, 3.0])
    aae, sae = choose_answers(assoc, NAMES, ["x", "y"], "global")  # column means 0.5, 0.5, -0.5, 0.25
    assert aae.tolist() == [0, 0] and sae.tolist() == [2, 2]
    aae, sae = choose_answers(assoc, NAMES, ["x", "y"], "global", ["d", "b"])
    assert aae.tolist() == [3, 3] and sae.tolist() == [1, 1]
    for rule, pair, ids in (("best", None, ["x", "y"]), ("global", ["a", "zz"], ["x", "y"]),
                            ("cross_fit", ["a", "b"], ["x", "y"]), ("cross_fit", None, ["x", "x"])):
        with pytest.raises(PipelineError):
            choose_answers(assoc, NAMES, ids, rule, pair)


def neutral_rows(marker_side: str, seed: int = 0) -> pd.DataFrame:
    """Guises that are the same SAE utterance apart from one neutral token (`oh`), on a random side
    per pair ("random": no dialect signal by construction) or always on the AAE side ("aae")."""
    rows = build_rows()
    rows = rows[(rows.pronoun == "he") & rows.template_index.isin([0, 3, 6])].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    on_aae = {p: (rng.random() < 0.5) if marker_side == "random" else True for p in sorted(set(rows.pair_id))}
    aae_side = rows.pair_id.map(on_aae).to_numpy()
    marked = "oh " + rows.utterance_sae
    rows["utterance_aae"] = np.where(aae_side, marked, rows.utterance_sae)
    rows["utterance_sae"] = np.where(aae_side, rows.utterance_sae, marked)
    rows["prompt_aae"] = [t.format(u) for t, u in zip(rows.template, rows.utterance_aae)]
    rows["prompt_sae"] = [t.format(u) for t, u in zip(rows.template, rows.utterance_sae)]
    return rows


@pytest.fixture(scope="module")
def neutral_probes(tiny_model):
    out = {}
    for side in ("random", "aae"):
        rows = neutral_rows(side)
        _, logp, names, _, _ = probe(tiny_model, rows, load_attributes(), 48, True, "per_prompt", multi_token=False)
        out[side] = (rows, (logp["aae"] - logp["sae"]).double().numpy(), names)
    return out


def gap_row(assoc, names, rows, rule, pair=None) -> pd.Series:
    aae, sae = choose_answers(assoc, names, rows.pair_id, rule, pair)
    table = baseline_null(gaps(assoc, aae, sae), rows.pair_id, rows.feature, 500, 500, 0, assoc, names, rule, pair)
    return table.iloc[0]


def test_no_signal_cross_fit_and_global_find_nothing_per_prompt_always_positive(neutral_probes):
    rows, assoc, names = neutral_probes["random"]
    assert rows.pair_id.nunique() == 48 and len(rows) == 144
    for rule, pair in (("cross_fit", None), ("global", [names[0], names[1]])):
        r = gap_row(assoc, names, rows, rule, pair)
        assert r.ci_low < 0 < r.ci_high, (rule, r.to_dict())
        assert r.p_perm > 0.1, (rule, r.to_dict())
        assert r.null_low < r.gap < r.null_high
    auto = gap_row(assoc, names, rows, "global")  # the pair picked on all rows: biased, but so is its null
    assert auto.p_perm > 0.1 and auto.null_low > 0, auto.to_dict()
    per_prompt = gap_row(assoc, names, rows, "per_prompt")
    assert per_prompt.gap > 0 and per_prompt.ci_low > 0
    # Swapping a prompt's guises negates its row, and max - min of -x is max - min of x: the
    # per_prompt gap is the same under every swap, so its null is the observed value itself.
    assert per_prompt.null_low == pytest.approx(per_prompt.gap) and per_prompt.p_perm == 1.0


def test_consistent_token_difference_is_found(neutral_probes):
    # The same token always on the AAE side is a real (if meaningless) guise effect: the permutation
    # test has power. (The interval, a bootstrap of the whole cross-fitted procedure, is wider.)
    rows, assoc, names = neutral_probes["aae"]
    r = gap_row(assoc, names, rows, "cross_fit")
    assert r.gap > r.null_high and r.p_perm < 0.05 and r.ci_low < r.gap < r.ci_high, r.to_dict()


def test_fixed_answers_null_negates_gaps():
    observed = np.array([1.0, 2.0, 3.0])
    table = baseline_null(observed, ["a", "b", "c"], None, 1000, 200, 0)
    assert table.loc[0, "p_perm"] == pytest.approx(1 / 8)  # only the identity of 8 patterns reaches mean 2


def test_stereotype_file_and_agreement():
    studies = load_stereotypes()
    assert list(dict.fromkeys(studies.study)) == ["katz_braly", "gilbert", "karlins", "madon", "bergsieker"]
    katz = studies[studies.study == "katz_braly"]
    assert len(katz) == 12 and set(katz.attribute) <= set(load_attributes()) and katz.score.is_monotonic_decreasing
    assert float(average_precision(np.array([3.0, 2.0, 1.0]), np.array([True, False, True]))) == pytest.approx((1 + 2 / 3) / 2)
    names = load_attributes()
    weight = np.array([dict(zip(katz.attribute, katz.score)).get(a, 0.0) for a in names])
    table, model = stereotype_agreement(pd.DataFrame({"attribute": names, "association": weight - 0.001 * np.arange(len(names))}), 500, 0)
    first = table.iloc[0]
    assert first.study == "katz_braly" and first.year == 1933 and first.agreement == pytest.approx(1.0) and first.p_perm < 0.01
    assert first.chance < 0.2 and table.year.is_monotonic_increasing and len(table) == 5
    assert model["aae_top5"] == list(katz.attribute.head(5)) and np.isfinite(model["favorability_aae_top5"])
    reverse, _ = stereotype_agreement(pd.DataFrame({"attribute": names, "association": -weight}), 500, 0)
    assert reverse.iloc[0].agreement < reverse.iloc[0].chance and reverse.iloc[0].p_perm > 0.5


def test_stages_write_nulls_and_significance(tmp_path, tiny_model):
    cfg = make_cfg(["model=tiny", "dataset.max_prompts=24", "stage.stages=[data,cache,attribution]", "metric=logit_diff",
                    "nulls.permutations=200", "nulls.bootstrap=200", "attribution.bootstrap=100"])
    run(cfg, tmp_path)
    null = pd.read_csv(tmp_path / "tables" / "baseline_null.csv")
    assert null.feature[0] == "all" and (null.answers == "cross_fit").all() and null.feature.nunique() == len(null) > 2
    base = json.loads((tmp_path / "tables" / "baseline.json").read_text())
    gap = base["clean_mean"] - base["corrupted_mean"]
    assert null.gap[0] == pytest.approx(gap, abs=1e-5)
    assoc = pd.read_csv(tmp_path / "tables" / "attribute_association.csv")
    assert {"null_low", "null_high", "p_perm", "q_bh", "significant_bh"} <= set(assoc.columns)
    agreement = json.loads((tmp_path / "tables" / "stereotype_agreement.json").read_text())
    assert len(agreement["studies"]) == 5 and {"agreement", "chance", "p_perm"} <= set(agreement["studies"][0])
    heads = pd.read_csv(tmp_path / "tables" / "head_attribution.csv")
    assert heads.p_signflip.between(0, 1).all() and heads.significant_bh.dtype == bool
    both = pd.read_csv(tmp_path / "tables" / "head_attribution_both_sides.csv").pivot(index="name", columns="side", values="mean")
    np.testing.assert_allclose(both["difference"], both["clean"] - both["corrupted"], atol=1e-5)
    page = build_report(tmp_path)
    section = page[page.index('<section id="nulls">'):]
    section = section[:section.index("</section>")]
    assert "Is the effect real?" in section and "cross_fit" in section
    assert "Katz &amp; Braly" in page[page.index('<section id="stereotypes">'):]
    assert f"{null.p_perm[0]:.3f}" in section and "head_attribution.csv" in section
    assert "null 95% band" in page[page.index('<section id="baseline">'):page.index('<section id="nulls">')]


@pytest.mark.parametrize("args, line", [
    (["dataset.answers=best"], "config: dataset.answers='best' is not allowed; accepted: cross_fit, per_prompt or global"),
    (["dataset.answers=global", "dataset.answer_pair=[lazy,no-such-trait]"],
     "dataset.answer_pair: 'no-such-trait' not among the probed attributes (dataset.attributes, or the task's "
     "pipeline/data/tasks/<task>/attributes.txt)"),
], ids=["unknown-rule", "unknown-attribute"])
def test_bad_answer_config_is_one_line(tmp_path, args, line):
    result = run_cli(["model=tiny", "stage=data", "dataset.max_prompts=4", *args], cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert [l for l in result.stderr.splitlines() if "error" in l.lower()] == ["dialect-circuits: error: " + line], result.stderr
