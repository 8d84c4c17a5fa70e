"""`dialect-circuits compare` on run directories fabricated here: the tables of the attribution and
patching stages' contract, a multirun layout, labels, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from pipeline import tools

PATCH_COLUMNS = ["sweep", "part", "layer", "head", "role", "mean", "sem", "ci_low", "ci_high", "n_prompts"]


def head_attribution(means: np.ndarray) -> pd.DataFrame:
    layers, heads = means.shape
    # mean_<feature> columns as the attribution stage writes them: statistics, not keys
    rows = [{"layer": l, "head": h, "name": f"L{l}H{h}", "mean": means[l, h], "sem": 0.1,
             "ci_low": means[l, h] - 0.2, "ci_high": means[l, h] + 0.2, "n_prompts": 8,
             "mean_aint": means[l, h] + 1, "mean_finna": 2.0} for l in range(layers) for h in range(heads)]
    return pd.DataFrame(rows)


def tables_for(shift: float, layers: int = 2) -> dict[str, pd.DataFrame]:
    """A run's component tables; `shift` moves the means so two runs differ."""
    means = np.arange(layers * 3, dtype=float).reshape(layers, 3) + shift
    means[1, 2] += 10 * shift  # the head that differs most
    patch = pd.DataFrame([["head_out", "z", l, h, role, 0.1 * l + h + shift, 0.01, 0, 1, 16]
                          for l in range(layers) for h in range(3) for role in ("utt_first", "utt_last")],
                         columns=PATCH_COLUMNS)
    resid = pd.DataFrame([["resid_pre", "", l, "", role, 0.5 * l - shift, 0.01, 0, 1, 16]
                          for l in range(layers) for role in ("end", "utt_last")], columns=PATCH_COLUMNS)
    return {
        "head_attribution": head_attribution(means),
        "layer_attribution": pd.DataFrame({"component": [f"{l}_attn_out" for l in range(layers)],
                                           "mean": np.arange(layers) + shift, "ci_low": 0.0, "ci_high": 1.0}),
        "patch_head_out": patch,
        "attrpatch_resid_pre": resid,
        "metric": pd.DataFrame({"prompt_index": range(4), "feature": ["finna", "finna", "aint", "aint"],
                                    "clean_metric": [1.0, 2.0, 3.0, 4.0], "corrupted_metric": [0.0, 0.0, 1.0, 1.0 - shift]}),
        # not a per-component table: no mean column, never compared
        "attribute_association": pd.DataFrame({"attribute": ["lazy"], "association": [shift]}),
    }


def make_run(path: Path, direction="aae_clean", model="tiny-gpt2", dataset_hash="d" * 64, shift=0.0, layers=2,
             tables: dict | None = None) -> Path:
    for name, df in (tables if tables is not None else tables_for(shift, layers)).items():
        (path / "tables").mkdir(parents=True, exist_ok=True)
        df.to_csv(path / "tables" / f"{name}.csv", index=False)
    (path / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"model": {"name": model, "n_layer": layers}, "direction": {"name": direction},
                                     "seed": 0}), path / ".hydra" / "config.yaml")
    (path / "manifest.json").write_text(json.dumps({"model": {"name": model}, "direction": direction, "device": "cpu",
                                                    "dataset_hash": dataset_hash, "status": "complete"}))
    return path


def compare(*args) -> int:
    return tools.main(["compare", *map(str, args)])


def test_two_directions_side_by_side(tmp_path, capsys):
    a = make_run(tmp_path / "a", "aae_clean")
    b = make_run(tmp_path / "b", "sae_clean", shift=1.0)
    assert compare(a, b, "--out", tmp_path / "cmp") == 0
    out = tmp_path / "cmp"
    written = sorted(p.name for p in (out / "tables").iterdir())
    assert written == ["compare_attrpatch_resid_pre.csv", "compare_head_attribution.csv", "compare_layer_attribution.csv",
                       "compare_metric.csv", "compare_patch_head_out.csv"]

    heads = pd.read_csv(out / "tables" / "compare_head_attribution.csv")
    assert list(heads.columns[:4]) == ["rank", "layer", "head", "name"]
    assert heads.iloc[0]["name"] == "L1H2" and heads.iloc[0]["rank"] == 1  # ranked by |difference|
    assert heads.iloc[0]["diff[sae_clean - aae_clean]"] == pytest.approx(11.0)
    assert (heads["diff[sae_clean - aae_clean]"] == heads["mean[sae_clean]"] - heads["mean[aae_clean]"]).all()
    assert len(heads) == 6 and "ci_low[sae_clean]" in heads

    patch = pd.read_csv(out / "tables" / "compare_patch_head_out.csv", keep_default_na=False)
    assert len(patch) == 12 and set(patch.role) == {"utt_first", "utt_last"}
    resid = pd.read_csv(out / "tables" / "compare_attrpatch_resid_pre.csv", keep_default_na=False)
    assert len(resid) == 4 and (resid["head"] == "").all()  # empty head column joins as a key
    assert (resid["diff[sae_clean - aae_clean]"] == -1.0).all()

    ld = pd.read_csv(out / "tables" / "compare_metric.csv").set_index(["quantity", "feature"])
    assert ld.loc[("clean", "all"), "mean[aae_clean]"] == pytest.approx(2.5)
    assert ld.loc[("corrupted", "aint"), "diff[sae_clean - aae_clean]"] == pytest.approx(-0.5)

    page = (out / "comparison.html").read_text()
    assert '<script src="plotly.min.js">' in page and "cdn.plot.ly" not in page
    assert (out / "plotly.min.js").stat().st_size > 100_000
    for name in ("head_attribution", "layer_attribution", "patch_head_out", "attrpatch_resid_pre", "metric"):
        assert f"<h2>{name}</h2>" in page
    assert "attribute_association" not in page
    assert "L1H2" in capsys.readouterr().out


def test_multirun_directory_expands_to_its_jobs_in_order(tmp_path):
    sweep = tmp_path / "multirun" / "2026-11-27" / "10-00-00"
    for job in range(11):
        make_run(sweep / str(job), "aae_clean" if job % 2 == 0 else "sae_clean", shift=job)
        cfg = OmegaConf.load(sweep / str(job) / ".hydra" / "config.yaml")
        cfg.seed = job  # what differs besides the direction
        OmegaConf.save(cfg, sweep / str(job) / ".hydra" / "config.yaml")
    (sweep / ".submitit" / "123").mkdir(parents=True)  # submitit's logs: not a job
    assert compare(sweep) == 0
    [out] = sweep.glob("comparison-*")  # default: beside the jobs, in their common parent
    heads = pd.read_csv(out / "tables" / "compare_head_attribution.csv")
    means = [c for c in heads.columns if c.startswith("mean[")]
    assert means[:3] == ["mean[aae_clean seed=0]", "mean[sae_clean seed=1]", "mean[aae_clean seed=2]"]
    assert means[-1] == "mean[aae_clean seed=10]"  # job 10 after job 9, not after job 1
    diffs = [c for c in heads.columns if c.startswith("diff[")]
    assert len(diffs) == 10 and diffs[0] == "diff[sae_clean seed=1 - aae_clean seed=0]"
    # the comparison directory is not taken for a job the next time
    assert compare(sweep, "--out", tmp_path / "again") == 0


def test_model_against_model_keeps_components_only_one_has(tmp_path):
    a = make_run(tmp_path / "a", model="gpt2", layers=2)
    b = make_run(tmp_path / "b", model="EleutherAI/pythia-70m", layers=3, shift=0.5)
    assert compare(a, b, "--out", tmp_path / "cmp") == 0
    heads = pd.read_csv(tmp_path / "cmp" / "tables" / "compare_head_attribution.csv")
    assert "mean[EleutherAI/pythia-70m]" in heads and "mean[gpt2]" in heads
    assert len(heads) == 9 and heads["mean[gpt2]"].isna().sum() == 3
    assert heads["max_abs_diff"].isna().sum() == 3 and heads["max_abs_diff"].iloc[:6].notna().all()


def test_integers_written_as_floats_still_join(tmp_path):
    tables = tables_for(0.0)
    floats = {**tables, "attrpatch_resid_pre": tables["attrpatch_resid_pre"].assign(layer=lambda d: d.layer.astype(float))}
    a = make_run(tmp_path / "a", "aae_clean", tables=tables)
    b = make_run(tmp_path / "b", "sae_clean", tables=floats)
    assert compare(a, b, "--out", tmp_path / "cmp") == 0
    resid = pd.read_csv(tmp_path / "cmp" / "tables" / "compare_attrpatch_resid_pre.csv")
    assert len(resid) == 4 and resid["max_abs_diff"].notna().all()


def test_same_config_runs_are_labelled_by_directory_and_missing_tables_noted(tmp_path, capsys):
    a = make_run(tmp_path / "first")
    only_baseline = {"metric": tables_for(0.0)["metric"]}
    b = make_run(tmp_path / "second", tables=only_baseline)
    assert compare(a, b, "--out", tmp_path / "cmp") == 0
    assert "mean[first]" in pd.read_csv(tmp_path / "cmp" / "tables" / "compare_metric.csv")
    out = capsys.readouterr().out
    assert "skipped tables/head_attribution.csv: missing in second" in out
    assert "attribute_association" not in out
    assert "missing in second" in (tmp_path / "cmp" / "comparison.html").read_text()


def test_different_datasets_are_refused_unless_allowed(tmp_path, capsys):
    a = make_run(tmp_path / "a", model="gpt2")
    b = make_run(tmp_path / "b", model="smollm2", dataset_hash="e" * 64)
    assert compare(a, b, "--out", tmp_path / "cmp") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dialect-circuits: error:") and "--allow-different-datasets" in err[0]
    assert not (tmp_path / "cmp").exists()
    assert compare(a, b, "--out", tmp_path / "cmp", "--allow-different-datasets") == 0


@pytest.mark.parametrize("args, needle", [
    ([], "required: DIR"),
    (["{a}"], "two or more runs"),
    (["{a}", "{missing}"], "is not a directory"),
    (["{a}", "{empty}"], "neither a run directory"),
    (["{a}", "{a}"], "two or more runs"),
    (["{a}", "{b}", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, needle):
    paths = {"a": make_run(tmp_path / "a"), "b": make_run(tmp_path / "b", shift=1.0),
             "missing": tmp_path / "missing", "empty": tmp_path / "empty"}
    (tmp_path / "empty").mkdir()
    assert compare(*[a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dialect-circuits: error:") and needle in err[0], err


def test_an_unknown_statistic_column_is_not_taken_for_a_key(tmp_path):
    tables = tables_for(0.0)
    with_extra = {name: df.assign(normalized=np.linspace(0.1, 0.9, len(df))) if name == "patch_head_out" else df
                  for name, df in tables.items()}
    a = make_run(tmp_path / "a", "aae_clean", tables=with_extra)
    b = make_run(tmp_path / "b", "sae_clean", tables={**with_extra, "patch_head_out": with_extra["patch_head_out"].assign(normalized=0.5)})
    assert compare(a, b, "--out", tmp_path / "cmp") == 0
    patch = pd.read_csv(tmp_path / "cmp" / "tables" / "compare_patch_head_out.csv")
    assert len(patch) == 12 and patch["max_abs_diff"].notna().all() and "normalized" not in patch
