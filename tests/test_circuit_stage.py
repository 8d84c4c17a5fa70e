"""The circuit stage: path patching into the final residual from a last-layer head equals
activation patching of that head; a run killed mid-evaluation resumes from its checkpoint to the
same tensors without redoing finished prompts; metrics a stage cannot use are refused in one line."""

import json

import pytest
import torch

from pipeline.artifacts import read_tensors
from pipeline.circuit import edges
from pipeline.circuit.graph import edge_hooks
from pipeline.circuit.path_patching import path_patch
from pipeline.data.dataset import pair_prompts
from pipeline.patching.engine import run_cells
from pipeline.patching.sweeps import Cell
from pipeline.runner import run
from conftest import make_cfg
from test_circuit import gqa_model, model  # noqa: F401  (fresh tiny models)
from test_prompts import small_dataset


def test_path_patching_from_last_layer_equals_head_patching(model):  # noqa: F811
    pairs = pair_prompts(model, small_dataset(5), make_cfg([]).direction, True)  # mixed lengths
    with edge_hooks(model):
        pp, anchors = path_patch(model, pairs, "logit_diff", "logits", batch_size=2, rows_per_run=6)
    last = model.cfg.n_layers - 1
    cells = [Cell("output", last, h) for h in range(model.cfg.n_heads)]
    values, _ = run_cells(model, pairs, cells, batch_size=5, fast=False)
    assert torch.allclose(pp[last], anchors.normalize(values), atol=1e-4)
    assert pp[last].abs().max() > 1e-3 and torch.isfinite(pp).all()


@pytest.mark.parametrize("which", ["model", "gqa_model"])
def test_last_token_path_patching_equals_full_patched_runs(which, request):
    model = request.getfixturevalue(which)
    pairs = pair_prompts(model, small_dataset(4), make_cfg([]).direction, True)
    with edge_hooks(model):
        fast, _ = path_patch(model, pairs, "prob_diff", "logits", batch_size=2, rows_per_run=6)
        full, _ = path_patch(model, pairs, "prob_diff", "logits", batch_size=4, rows_per_run=8, full_runs=True)
        heads, _ = path_patch(model, pairs, "logit_diff", ["a1.h0.q", "a1.h1.k"], batch_size=4)
    assert torch.allclose(fast, full, atol=1e-4) and fast[0].abs().max() > 1e-3
    assert torch.isfinite(heads[0]).all() and heads[1].isnan().all()  # senders: layer 0 only


OVERRIDES = ["model=tiny", "dataset.max_prompts=6", "batch_size=2", "circuit.batch_size=2", "circuit.score_prompts=6",
             "circuit.eval_prompts=6", "circuit.checkpoint_every=2", "circuit.rows_per_run=8", "circuit.n_sizes=4",
             "circuit.path_patching.enabled=false", "circuit.bootstrap=50", "stage.stages=[data,cache,circuit]",
             "dataset.split.heldout=0", "circuit.mib.eval_prompts=0"]  # every prompt is discovery: the evaluation of all six is what is killed and resumed (MIB's is tests/test_mib.py's)
ORIGINAL = edges._run_circuits


class Killed(Exception):
    """Stands in for the process being killed mid-stage."""


def count_runs(monkeypatch, fail_after=None):
    calls = {"prompts": 0}

    def counted(model, graph, ref, *args):
        if fail_after is not None and calls["prompts"] >= fail_after:
            raise Killed("killed mid-evaluation")
        calls["prompts"] += len(ref.answers)
        return ORIGINAL(model, graph, ref, *args)

    monkeypatch.setattr(edges, "_run_circuits", counted)
    return calls


def test_killed_circuit_stage_resumes_to_the_same_tensors(tmp_path, monkeypatch):
    cfg = make_cfg(OVERRIDES)
    whole = count_runs(monkeypatch)
    run(cfg, tmp_path / "uninterrupted")
    total = whole["prompts"]  # prompts x circuit chunks

    count_runs(monkeypatch, fail_after=total // 2)
    with pytest.raises(Killed):
        run(cfg, tmp_path / "killed")
    assert json.loads((tmp_path / "killed" / "manifest.json").read_text())["stages"]["circuit"]["status"] == "failed"
    partial = read_tensors(tmp_path / "killed" / "tensors" / ".partial" / "circuit_eval.safetensors")
    saved = int(partial["done"].sum())
    assert 0 < saved < 6

    resumed = count_runs(monkeypatch)
    run(cfg, tmp_path / "killed")
    assert resumed["prompts"] == total * (6 - saved) // 6  # only the prompts missing from the checkpoint ran
    for name in ("circuit_eval", "circuit_scores_eap_ig", "circuit_scores_eap"):
        a = read_tensors(tmp_path / "uninterrupted" / "tensors" / f"{name}.safetensors")
        b = read_tensors(tmp_path / "killed" / "tensors" / f"{name}.safetensors")
        for key in a:
            assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), (name, key)
    summary = json.loads((tmp_path / "killed" / "tables" / "circuit_summary.json").read_text())
    assert summary["n_edges"] == 110 and set(summary["curves"]) == {"eap_ig", "eap", "random"}

    # compare: the two runs' circuits share every edge, and both curves are drawn
    from pipeline.compare import compare

    out = compare([str(tmp_path / "uninterrupted"), str(tmp_path / "killed")], str(tmp_path / "cmp"), False)
    page = (out / "comparison.html").read_text()
    assert "<h2>Circuit</h2>" in page and "(Jaccard 1.00)" in page
    shared = (out / "tables" / "compare_circuit_shared_edges.csv").read_text().splitlines()
    assert len(shared) - 1 == int(round((summary["curves"]["eap_ig"]["size_at_0.8"] or 1.0) * 110))


def test_unusable_metric_or_setting_is_one_line(tmp_path):
    from pipeline.circuit.graph import Graph
    from pipeline.circuit.path_patching import parse_receivers
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match=r"metric=prob_diff: the patching stage supports only logit_diff") as err:
        run(make_cfg(["model=tiny", "metric=prob_diff", "stage.stages=[patching]"]), tmp_path / "run")
    assert "\n" not in str(err.value)
    with pytest.raises(PipelineError, match="circuit.method=eap cannot use metric=kl_div"):
        run(make_cfg(["model=tiny", "metric=kl_div", "circuit.method=eap", "stage.stages=[data,circuit]"]), tmp_path / "run2")
    with pytest.raises(PipelineError, match="circuit.path_patching.receivers"):
        run(make_cfg(["model=tiny", "circuit.path_patching.receivers=a1.h0.q", "stage.stages=[data]"]), tmp_path / "run3")
    graph = Graph(2, 4, 2)
    assert parse_receivers("logits", graph) is None and parse_receivers(["a1.kv1.v", "a1.h3.q"], graph) == [(1, "v", 1), (1, "q", 3)]
    with pytest.raises(PipelineError, match="a9.h0.q"):
        parse_receivers(["a9.h0.q"], graph)
