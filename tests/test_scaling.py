"""The scaling and training comparisons end to end through the command: `-m +experiment=scaling`
over two tiny sizes and `-m +experiment=training` over two tiny local checkpoints, then `compare`,
whose table and figures hold each run's own headline gap, interval, null band, circuit size and
parameter count or step."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import make_cfg, run_cli
from test_sweeps import only_sweep_dir

FEW = ["dataset.max_prompts=8", "nulls.permutations=50", "nulls.bootstrap=50", "device=cpu"]
SMALL_CIRCUIT = ["circuit.score_prompts=4", "circuit.eval_prompts=2", "circuit.ig_steps=2", "circuit.n_sizes=3",
                 "circuit.compare_methods=false", "circuit.edge_check.top=0", "circuit.edge_check.random=0",
                 "circuit.path_patching.enabled=false", "circuit.bootstrap=50"]


def compared(sweep: Path, tmp_path: Path) -> tuple[pd.DataFrame, str]:
    result = run_cli(["compare", str(sweep), "--allow-different-datasets", "--out", str(tmp_path / "cmp")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(tmp_path / "cmp" / "tables" / "compare_scaling.csv")
    return table, (tmp_path / "cmp" / "comparison.html").read_text()


def headline(run: Path) -> pd.Series:
    rows = pd.read_csv(run / "tables" / "baseline_null.csv", keep_default_na=False)
    return rows[rows.feature.astype(str) == "all"].iloc[0]


def test_scaling_over_two_tiny_sizes(tmp_path):
    result = run_cli(["-m", "+experiment=scaling", "model=tiny", "model.n_layer=1,2", "stage.stages=[data,cache,circuit]",
                      *FEW, *SMALL_CIRCUIT], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = only_sweep_dir(tmp_path)
    runs = [sweep / "0", sweep / "1"]
    facts = [json.loads((run / "manifest.json").read_text())["model"] for run in runs]
    assert [f["n_layers"] for f in facts] == [1, 2] and facts[0]["n_params"] < facts[1]["n_params"]
    table, page = compared(sweep, tmp_path)
    assert list(table.n_params) == [f["n_params"] for f in facts]
    for row, run in zip(table.itertuples(), runs):
        expected = headline(run)
        for key in ("gap", "ci_low", "ci_high", "null_low", "null_high", "p_perm"):
            assert getattr(row, key) == pytest.approx(float(expected[key])), key
        summary = json.loads((run / "tables" / "circuit_summary.json").read_text())
        assert row.faithful_fraction == pytest.approx(summary["curves"][summary["winner"]]["size_at_0.8"])
        assert row.metric == "favorability"  # the default metric: the covert prejudice score
    assert "Against model size" in page and "Smallest circuit with faithfulness" in page


def test_training_over_two_local_checkpoints(tmp_path):
    """Two tiny models saved as checkpoint-1000 and checkpoint-2000 of one local training run stand
    for two training steps; model.revision names the subfolder, the step is read from its name."""
    from pipeline.model import build_tiny_model

    run_dir = tmp_path / "my-run"
    for step, seed in ((1000, 1), (2000, 2)):
        build_tiny_model(make_cfg(["model=tiny", f"model.dir={run_dir / f'checkpoint-{step}'}", f"model.init_seed={seed}"]).model)
    result = run_cli(["-m", "+experiment=training", "model=gpt2-small", f"model.name={run_dir}",
                      "model.revision=checkpoint-1000,checkpoint-2000", "stage.stages=[data,cache]", *FEW], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = only_sweep_dir(tmp_path)
    facts = [json.loads((sweep / job / "manifest.json").read_text())["model"] for job in ("0", "1")]
    assert [f["step"] for f in facts] == [1000, 2000] and [f["revision"] for f in facts] == ["checkpoint-1000", "checkpoint-2000"]
    table, page = compared(sweep, tmp_path)
    assert list(table.step) == [1000, 2000]
    assert table.gap.tolist() == pytest.approx([float(headline(sweep / job)["gap"]) for job in ("0", "1")])
    assert table.gap.nunique() == 2  # two different models
    assert "Against training step" in page and "Smallest circuit" not in page  # no circuit stage ran
