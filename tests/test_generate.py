"""The pair generator (pipeline/data/generate.py), the design that spends prompts on distinct pairs
(pipeline/data/builder.py) and the power arithmetic (pipeline/power.py).

Minimality is checked independently of the rules: each pair's two sides are compared word by word
(difflib), and every difference must be one this feature's description allows, nothing else."""

from __future__ import annotations

import difflib
import re

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, run_cli
from pipeline.data.builder import assign_templates, build_rows
from pipeline.data.generate import FEATURES, available, generate_pairs, load_lexicon
from pipeline.data.resources import load_templates
from pipeline.errors import PipelineError
from pipeline.nulls import DETECTABLE, pairs_needed
from pipeline.power import power_sentence, power_table

CONTRACTED = {"'s", "'re", "'ve"}
REMOTE, LONG = ["a", "long", "time", "ago"], ["for", "a", "long", "time"]


def words(utterance: str) -> list[str]:
    """Words, with a pronoun's contracted auxiliary as a word of its own (he's -> he 's)."""
    out = []
    for w in utterance.split():
        m = re.fullmatch(r"(he|she|they)('s|'re|'ve)", w)
        out.extend(m.groups() if m else [w])
    return out


def third_person(base: str, inflected: str) -> bool:
    return inflected in (base + "s", base + "es", base[:-1] + "ies") or (base, inflected) == ("have", "has")


# feature -> the (AAE words, SAE words) a difference may be: the feature's own words, nothing else.
ALLOWED = {
    "habitual_be": lambda a, s: a == ["be"] and s[-1] == "usually" and len(s) == 2 and s[0] in CONTRACTED,
    "finna": lambda a, s: a == ["finna"] and s[1:] == ["about", "to"] and s[0] in CONTRACTED,
    "aint": lambda a, s: a == ["ain't"] and s in (["isn't"], ["aren't"], ["hasn't"], ["haven't"]),
    "copula_deletion": lambda a, s: a == [] and len(s) == 1 and s[0] in CONTRACTED,
    "stay": lambda a, s: a == ["stay"] and len(s) == 2 and s[0] in CONTRACTED and s[1] == "always",
    "stressed_been": lambda a, s: (a == ["been"] and s == []) or (a == [] and s in (REMOTE, LONG, ["'s"], ["'ve"])),
    "third_person_s": lambda a, s: len(a) == 1 and len(s) == 1 and third_person(a[0], s[0]),
    "in_for_ing": lambda a, s: len(a) == 1 and len(s) == 1 and a[0].endswith("in") and s[0] == a[0] + "g",
}


def differences(aae: str, sae: str) -> list[tuple[list[str], list[str]]]:
    a, s = words(aae), words(sae)
    ops = difflib.SequenceMatcher(a=a, b=s, autojunk=False).get_opcodes()
    return [(a[i1:i2], s[j1:j2]) for tag, i1, i2, j1, j2 in ops if tag != "equal"]


@pytest.fixture(scope="module")
def every_pair():
    """Every pair the package's lexicon yields, for every feature."""
    counts = available()
    return pd.concat([generate_pairs(counts[f], 0, [f]) for f in FEATURES], ignore_index=True)


def test_every_pair_differs_only_where_its_feature_is(every_pair):
    assert len(every_pair) >= 1200 and min(available().values()) >= 150
    for p in every_pair.itertuples():
        diffs = differences(p.aae, p.sae)
        assert diffs, (p.aae, p.sae)
        for a, s in diffs:
            assert ALLOWED[p.feature](a, s), f"{p.feature}: {p.aae!r} / {p.sae!r} differ in {a} / {s}"
        assert p.aae.split()[0] in ("he", "she", "they") or p.aae.split()[0] in ("he's", "she's", "they're")


def test_no_pair_repeats_and_rules_keep_their_contexts(every_pair):
    assert not every_pair.duplicated(["aae", "sae"]).any()
    assert not every_pair.pair_id.duplicated().any()
    # copula deletion never in the first person or with a past copula; third person -s only where SAE has it
    assert not every_pair.aae.str.match(r"^(i|I)\b").any()
    assert set(every_pair[every_pair.feature == "third_person_s"].pronoun) == {"he", "she"}
    assert not every_pair.sae.str.contains(r"\b(?:was|were)\b").any()
    # no utterance names an attribute a probing task scores
    scored = {line.strip() for p in (REPO / "pipeline" / "data" / "tasks").glob("*/attributes.txt")
              for line in p.read_text().splitlines() if line.strip()}
    assert not {w for u in every_pair.aae for w in u.split()} & scored


def test_generation_is_deterministic_and_pronouns_balanced():
    a, b, c = generate_pairs(150, 0), generate_pairs(150, 0), generate_pairs(150, 1)
    pd.testing.assert_frame_equal(a, b)
    assert (a.word.tolist() == c.word.tolist()) and (a.pronoun.tolist() != c.pronoun.tolist())
    assert len(a) == 1200 and a.groupby("feature").size().eq(150).all()
    for feature, group in a.groupby("feature"):
        counts = group.pronoun.value_counts()
        assert counts.max() - counts.min() <= 1, (feature, counts.to_dict())


def test_the_shipped_lexicon_is_what_derive_gives():
    pytest.importorskip("lemminflect")
    pytest.importorskip("wordfreq")
    from pipeline.data.lexicon.derive import HERE, derive

    for name, text in derive().items():
        assert (HERE / name).read_text(encoding="utf-8") == text, f"{name} differs: run python -m pipeline.data.lexicon.derive"


def test_templates_are_balanced_and_prompts_spread_over_distinct_pairs():
    pairs = generate_pairs(40, 0)
    templates = load_templates("traits")
    for k in (1, 2, 4):
        chosen = assign_templates(pairs, len(templates), k, seed=3)
        assert all(len(set(t)) == k for t in chosen)  # a pair never repeats a template
        for feature in FEATURES:
            rows = np.flatnonzero(pairs.feature == feature)
            for j in range(k):  # each round of a feature spreads over templates to within one
                counts = np.bincount([chosen[r][j] for r in rows], minlength=len(templates))
                assert counts.max() - counts.min() <= 1
    rows = build_rows(pairs, templates, templates_per_pair=3, seed=0)
    assert len(rows) == 3 * len(pairs)
    first = rows.head(len(pairs))  # one prompt per pair before two
    assert first.pair_id.is_unique and first.feature.value_counts().eq(40).all()
    assert rows.head(16).feature.nunique() == 8
    assert rows.groupby("pair_id").template.nunique().eq(3).all()


def test_power_arithmetic_matches_a_simulation_with_a_known_effect():
    rng = np.random.default_rng(0)
    n, sigma = 60, 0.5
    # One simulated study: the table's spread and detectable score follow the pair-level formulas.
    gap = rng.normal(0.1, sigma, n)
    table = power_table(gap, [f"p{i}" for i in range(n)], ["f"] * n, ["discovery"] * 30 + ["heldout"] * 30, 200, 400, 0)
    pooled = table[(table.side == "all") & (table.feature == "all")].iloc[0]
    assert pooled.sd_per_pair == pytest.approx(gap.std(ddof=1))
    assert pooled.detectable == pytest.approx(DETECTABLE * gap.std(ddof=1) / np.sqrt(n), rel=0.15)
    assert pooled.pairs_needed == pytest.approx(n * (pooled.detectable / pooled.score) ** 2)
    assert set(table.side) == {"discovery", "heldout", "all"} and power_sentence(table)["heldout_pairs"] == 30
    # Many simulated studies: a true effect of the detectable size is found 80% of the time, and
    # one of half that size at the pair count pairs_needed gives.
    detectable = DETECTABLE * sigma / np.sqrt(n)
    for effect, pairs in ((detectable, n), (detectable / 2, int(round(pairs_needed(n, detectable, detectable / 2))))):
        sims = rng.normal(effect, sigma, (4000, pairs))
        se = sims.std(1, ddof=1) / np.sqrt(pairs)
        found = np.abs(sims.mean(1)) > 1.959964 * se
        assert found.mean() == pytest.approx(0.80, abs=0.03), (effect, pairs)


@pytest.mark.parametrize("make, message", [
    (lambda: generate_pairs(10, 0, ["habitual_be", "double_negation"]),
     "dataset.features: unknown feature 'double_negation' for generated pairs; accepted: any of habitual_be, finna"),
    (lambda: generate_pairs(10_000, 0),
     "dataset.generate.pairs_per_feature: 10000 is more than the lexicon yields (fewest: "),
    (lambda: assign_templates(generate_pairs(5, 0), 9, 12), "dataset.templates_per_pair: 12 is more than the 9 templates; accepted: 1 to 9"),
    (lambda: assign_templates(generate_pairs(5, 0), 9, 0), "dataset.templates_per_pair: 0 is below 1; accepted: 1 to 9"),
])
def test_bad_generator_settings_are_one_line(make, message):
    with pytest.raises(PipelineError) as err:
        make()
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_bad_lexicons_are_one_line(tmp_path):
    shipped = REPO / "pipeline" / "data" / "lexicon"
    cases = {
        "empty": ("", "the file is empty"),
        "header": ("word\tzipf\nhappy\t4.0\n", "the header is ['word', 'zipf']; accepted: the columns word, class, zipf"),
        "cells": ("word\tclass\tzipf\nhappy\tstate\n", "line 2: 2 cells; accepted: 3 non-empty tab-separated cells"),
        "zipf": ("word\tclass\tzipf\nhappy\tstate\tcommon\n", "line 2: zipf is 'common'; accepted: a number"),
    }
    for name, (text, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "verbs.tsv").write_text((shipped / "verbs.tsv").read_text())
        (folder / "adjectives.tsv").write_text(text)
        with pytest.raises(PipelineError) as err:
            load_lexicon(folder)
        assert message in str(err.value) and str(folder / "adjectives.tsv") in str(err.value), str(err.value)
    with pytest.raises(PipelineError, match="no file verbs.tsv in"):
        load_lexicon(tmp_path / "empty" / "nowhere")


def test_cli_refuses_a_bad_generator_setting_in_one_line(tmp_path):
    result = run_cli(["model=tiny", "stage=data", "dataset.templates_per_pair=10"], cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[-1] == ("dialect-circuits: error: dataset.templates_per_pair: 10 is more than the 9 templates; "
                         "accepted: 1 to 9, or null for every template")
