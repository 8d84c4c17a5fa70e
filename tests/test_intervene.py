"""The discovery / held-out split and the interventions (pipeline/data/splits.py,
pipeline/interventions.py, pipeline/stages/intervene.py): no pair on both sides of the split;
dialect-blind patching of every head and MLP gives the corrupted run; removing nothing changes
nothing; directional ablation leaves no component along the direction; random draws are seeded;
a killed intervene stage resumes to the same tables."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.data.builder import build_rows
from pipeline.data.splits import DISCOVERY, HELDOUT, assign_split
from pipeline.interventions import ComponentSwap, DirectionAblation, dialect_directions, measure
from pipeline.runner import run
from conftest import make_cfg, pairs_for
from test_patching import equal_length_pairs
from test_prompts import small_dataset


def test_split_keeps_each_pair_on_one_side_and_is_seeded():
    rows = build_rows()
    split = assign_split(rows, 0.5, "pair", 0)
    sides = rows.assign(split=split).groupby("pair_id").split.nunique()
    assert (sides == 1).all()  # he/she/they variants and all templates of a pair stay together
    per_feature = rows.assign(split=split).groupby("feature").split.nunique()
    assert (per_feature == 2).all()  # every feature on both sides
    held = rows[split == HELDOUT].pair_id.nunique()
    assert held == rows.pair_id.nunique() // 2
    assert split.equals(assign_split(rows, 0.5, "pair", 0)) and not split.equals(assign_split(rows, 0.5, "pair", 1))
    by_template = assign_split(rows, 0.34, "template", 0)
    assert (rows.assign(split=by_template).groupby("template").split.nunique() == 1).all()
    assert rows[by_template == HELDOUT].template.nunique() == 3
    assert (assign_split(rows, 0.0, "pair", 0) == DISCOVERY).all()


@pytest.fixture(scope="module")
def model():
    from pipeline.model import load_model

    torch.manual_seed(0)
    return load_model(make_cfg(["model=tiny"]).model, "cpu", torch.float32)


def every_component(model) -> ComponentSwap:
    return ComponentSwap([(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)],
                         list(range(model.cfg.n_layers)))


@pytest.mark.parametrize("metric", ["favorability", "logit_diff"])
def test_dialect_blind_everything_is_the_corrupted_run_and_nothing_changes_nothing(model, metric):
    pairs = equal_length_pairs(model, 4, metric)
    blind, mean = every_component(model), every_component(model)
    mean.mode = "mean"
    got = measure(model, pairs, {"all": blind, "nothing": ComponentSwap(), "mean": mean}, batch_size=3)
    none = got["none"]
    assert (none["metric_aae"] - none["metric_sae"]).abs().max() > 1e-2  # there is a dialect effect to remove
    torch.testing.assert_close(got["all"]["metric_aae"], none["metric_sae"], atol=1e-4, rtol=0)
    torch.testing.assert_close(got["all"]["metric_sae"], none["metric_sae"])  # blind leaves SAE prompts alone
    # mean over the guises everywhere: both guises end in the same last-token residual stream
    torch.testing.assert_close(got["mean"]["metric_aae"], got["mean"]["metric_sae"], atol=1e-4, rtol=0)
    for key in ("metric_aae", "metric_sae"):
        torch.testing.assert_close(got["nothing"][key], none[key])
    for key in ("kl_aae", "kl_sae", "loss_aae", "loss_sae"):
        assert got["nothing"][key].abs().max() < 1e-6 and none[key].abs().max() < 1e-6


def test_dialect_blind_heads_on_mixed_lengths_equal_one_prompt_at_a_time(model):
    pairs = pairs_for(model, small_dataset(6), make_cfg([]))
    assert (pairs.clean.last != pairs.corrupted.last).any()
    swap = {"some": ComponentSwap([(0, 1), (1, 2), (1, 3)], [0])}
    batched = measure(model, pairs, swap, batch_size=6)
    alone = measure(model, pairs, swap, batch_size=1)
    for key in batched["some"]:
        torch.testing.assert_close(batched["some"][key], alone["some"][key], atol=1e-4, rtol=1e-4)
    assert (batched["some"]["metric_aae"] - batched["none"]["metric_aae"]).abs().max() > 1e-3


def test_dialect_blind_heads_change_the_utterance_loss_only_where_the_utterances_line_up(model):
    """What the report says of a blind swap's cost: it reaches the utterance's own predictions only at
    role-matched positions, so where the utterances differ in token count (and share their first
    token) the loss on them cannot change; where they line up token for token it does."""
    blind = {"all": every_component(model)}
    mixed = pairs_for(model, small_dataset(6), make_cfg([]))
    got = measure(model, mixed, blind, batch_size=3)["all"]["loss_aae"]
    checked = 0
    for i in range(len(mixed)):
        utt = [[p for p, r in enumerate(side.role_labels[i]) if r.startswith("utt")] for side in (mixed.clean, mixed.corrupted)]
        same_first = mixed.clean.tokens[i, utt[0][0]] == mixed.corrupted.tokens[i, utt[1][0]]
        if len(utt[0]) != len(utt[1]) and same_first:
            assert abs(float(got[i])) < 1e-6
            checked += 1
    assert checked > 0
    lined_up = measure(model, equal_length_pairs(model, 4, "favorability"), blind, batch_size=3)["all"]["loss_aae"]
    assert lined_up.abs().max() > 1e-4


def test_directional_ablation_leaves_no_component_along_the_direction(model):
    pairs = pairs_for(model, small_dataset(6), make_cfg([]))
    directions = dialect_directions(model, pairs, batch_size=4)
    assert set(directions) == {0, 1} and all(d.norm() > 0 for d in directions.values())
    ablation = DirectionAblation({l: directions[l] for l in (0, 1)})
    seen = {}

    def keep(layer):
        def f(x, hook):
            seen[layer] = x.detach().clone()
            return x
        return f

    hooks = ablation.hooks("aae") + [(f"blocks.{l}.hook_resid_pre", keep(l)) for l in (0, 1)]  # after the ablation at each site
    with torch.no_grad():
        model.run_with_hooks(pairs.clean.tokens, attention_mask=pairs.clean.attention_mask, fwd_hooks=hooks)
    for l in (0, 1):
        unit = directions[l] / directions[l].norm()
        along = seen[l] @ unit
        assert along.abs().max() < 1e-4
    got = measure(model, pairs, {"direction": ablation}, batch_size=4)
    assert got["direction"]["kl_sae"].min() > 0  # both guises are changed


OVERRIDES = ["model=tiny", "dataset.max_prompts=32", "stage.stages=[data,cache,attribution,intervene]",
             "nulls.permutations=50", "nulls.bootstrap=50", "attribution.bootstrap=50", "intervene.prompts=12",
             "intervene.checkpoint_every=4", "intervene.n_sizes=3", "intervene.size=2", "intervene.random_draws=2",
             "intervene.association_prompts=4", "intervene.task_prompts=5", "intervene.bootstrap=100",
             "intervene.kinds=[heads,direction]", "batch_size=4"]


class Killed(Exception):
    pass


def test_intervene_stage_is_seeded_and_a_killed_stage_resumes(tmp_path, monkeypatch):
    import pipeline.stages.intervene as stage

    run(make_cfg(OVERRIDES), tmp_path / "a")
    curve = pd.read_csv(tmp_path / "a" / "tables" / "intervention_curve.csv")
    assert set(curve.kind) == {"heads", "direction"} and set(curve.selection) == {"top", "random0", "random1"}
    summary = json.loads((tmp_path / "a" / "tables" / "intervention_summary.json").read_text())
    assert summary["prompts"] == 12 and len(summary["sentences"]) == 2
    assert ("removes" if summary["score_distinct_from_zero"] else "lowers the held-out score by") in summary["sentences"][0]
    dataset = pd.read_csv(tmp_path / "a" / "dataset.csv", keep_default_na=False)
    held = dataset[dataset.split == "heldout"]
    assert set(held.pair_id).isdisjoint(dataset[dataset.split == "discovery"].pair_id)

    real, calls = stage.measure, []

    def dies_after_one_chunk(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 2:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "measure", dies_after_one_chunk)
    with pytest.raises(Killed):
        run(make_cfg(OVERRIDES), tmp_path / "b")
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["stages"]["intervene"]["status"] == "failed"
    calls.clear()
    monkeypatch.setattr(stage, "measure", lambda *a, **k: (calls.append(len(a[1])), real(*a, **k))[1])
    run(make_cfg(OVERRIDES), tmp_path / "b")
    assert calls[:2] == [4, 4]  # the first chunk of 4 prompts came from the checkpoint: two chunks left of three
    again = pd.read_csv(tmp_path / "b" / "tables" / "intervention_curve.csv")
    pd.testing.assert_frame_equal(curve, again, atol=1e-6)  # seeded draws, resumed: the same numbers
    assert not (tmp_path / "b" / "tensors" / ".partial" / "intervene.safetensors").exists()
