"""MIB's yardstick and format: the exported edge set is exactly the one EAP-IG's Graph.from_model
builds (enumerated here from the format's rules) for sequential, parallel and grouped-query
models; a graph survives the round trip; pruning keeps exactly the edges on input-to-logits paths
(a plain search over the exported names); the areas are MIB's trapezoids on a hand-computed curve;
bad files are refused in one line; and a run's circuit loaded into another run gives the same
MIB numbers."""

import json

import pytest
import torch

from pipeline.circuit import mib
from pipeline.circuit.graph import Graph, edge_hooks
from pipeline.errors import PipelineError
from pipeline.model import load_model
from pipeline.runner import run
from conftest import make_cfg, run_cli
from test_circuit import gqa_model, model  # noqa: F401  (fresh tiny models)


@pytest.fixture(scope="module")
def neox_model():
    """A tiny GPT-NeoX (Pythia) model: parallel attention and MLP."""
    torch.manual_seed(0)
    cfg = make_cfg(["model=tiny", "model.family=neox", "model.processing.refactor_factored_attn_matrices=false"])
    return load_model(cfg.model, "cpu", torch.float32)


def format_edges(n_layers: int, n_heads: int, parallel: bool) -> set[str]:
    """The edge names of EAP-IG's Graph.from_model, from the format's rules: every earlier node
    (input, heads and MLPs of earlier layers) into each head's q, k and v and into the MLP (a
    sequential MLP also reads its own layer's heads); every node into the logits."""
    names, earlier = set(), ["input"]
    for l in range(n_layers):
        heads = [f"a{l}.h{h}" for h in range(n_heads)]
        names |= {f"{s}->{h}<{x}>" for s in earlier for h in heads for x in "qkv"}
        names |= {f"{s}->m{l}" for s in earlier + ([] if parallel else heads)}
        earlier = earlier + heads + [f"m{l}"]
    return names | {f"{s}->logits" for s in earlier}


def exported(model, scores=None, in_graph=None):
    with edge_hooks(model):
        graph = Graph.of(model)
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(graph.n_edges, generator=g) if scores is None else scores
    in_graph = torch.rand(graph.n_edges, generator=g) < 0.3 if in_graph is None else in_graph
    fmt = mib.Format.of(graph, int(model.cfg.d_model))
    return graph, fmt, scores, in_graph, fmt.to_json(graph, scores, in_graph)


@pytest.mark.parametrize("which,parallel", [("model", False), ("neox_model", True), ("gqa_model", False)])
def test_export_has_eap_ig_edge_set_and_round_trips(which, parallel, request, tmp_path):
    model = request.getfixturevalue(which)
    graph, fmt, scores, in_graph, d = exported(model)
    assert graph.parallel == parallel
    assert set(d["edges"]) == format_edges(graph.n_layers, graph.n_heads, parallel)
    assert len(d["edges"]) == len(format_edges(graph.n_layers, graph.n_heads, parallel))  # no name twice
    assert set(d["nodes"]) == {"input", "logits", *(f"a{l}.h{h}" for l in range(graph.n_layers) for h in range(graph.n_heads)),
                               *(f"m{l}" for l in range(graph.n_layers))}
    assert d["cfg"] == {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "parallel_attn_mlp": parallel,
                        "d_model": int(model.cfg.d_model)}
    path = tmp_path / "graph.json"
    mib.write(path, graph, int(model.cfg.d_model), scores, in_graph)
    back = mib.load(str(path), graph, int(model.cfg.d_model))
    assert torch.equal(back.in_graph, in_graph) and back.merged == 0 and back.missing == 0
    assert torch.allclose(back.scores, scores, atol=1e-6)


def test_grouped_key_value_edges_are_split_per_query_head_and_merged_back(gqa_model):  # noqa: F811
    graph, fmt, scores, in_graph, d = exported(gqa_model)
    names = graph.edge_names()
    e = names.index("input->a0.kv1.k")  # key/value head 1 serves query heads 2 and 3 (4 heads, 2 groups)
    for h in (2, 3):
        assert d["edges"][f"input->a0.h{h}<k>"]["score"] == pytest.approx(float(scores[e]) / 2, rel=1e-6)
        assert d["edges"][f"input->a0.h{h}<k>"]["in_graph"] == bool(in_graph[e])
    d["edges"]["input->a0.h2<k>"]["in_graph"], d["edges"]["input->a0.h3<k>"]["in_graph"] = True, False
    back = fmt.from_json(graph, d, "test")
    assert bool(back.in_graph[e]) and back.merged >= 1  # one query head's key edge brings the group's


def paths_kept(edge_names: list[str], kept: list[bool]) -> list[bool]:
    """Edges of the circuit on some input-to-logits path, by plain search over node names."""
    edges = [(n.split("->")[0], n.split("->")[1].split("<")[0]) for n, k in zip(edge_names, kept) if k]
    forward, backward = {}, {}
    for a, b in edges:
        forward.setdefault(a, set()).add(b)
        backward.setdefault(b, set()).add(a)

    def reach(start, nxt):
        seen, todo = {start}, [start]
        while todo:
            for y in nxt.get(todo.pop(), ()):
                if y not in seen:
                    seen.add(y)
                    todo.append(y)
        return seen

    from_input, to_logits = reach("input", forward), reach("logits", backward)
    out = []
    for n, k in zip(edge_names, kept):
        a, b = n.split("->")[0], n.split("->")[1].split("<")[0]
        out.append(bool(k) and a in from_input and b in to_logits)
    return out


@pytest.mark.parametrize("which", ["model", "neox_model"])
def test_pruning_keeps_exactly_the_edges_on_input_to_logits_paths(which, request):
    model = request.getfixturevalue(which)
    with edge_hooks(model):
        graph = Graph.of(model)
    fmt = mib.Format.of(graph, int(model.cfg.d_model))
    assert torch.equal(fmt.ours, torch.arange(graph.n_edges))  # no grouping: one name per edge
    g = torch.Generator().manual_seed(4)
    for density in (0.03, 0.1, 0.3, 0.6):
        circuit = torch.rand(graph.n_edges, generator=g) < density
        pruned = mib.prune(graph, circuit)
        assert pruned.tolist() == paths_kept(fmt.names, circuit.tolist())
    assert torch.equal(mib.prune(graph, torch.ones(graph.n_edges, dtype=torch.bool)), torch.ones(graph.n_edges, dtype=torch.bool))


def test_fractions_counts_and_areas_match_a_hand_computed_curve():
    assert mib.FRACTIONS == (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    assert mib.counts(110) == [0, 0, 0, 1, 2, 5, 11, 22, 55, 110]  # MIB truncates: int(f * n)
    # faithfulness 0 up to 10%, 0.5 at 20%, 1 from 50%: trapezoids over the fractions themselves
    cpr, cmd = mib.areas([0, 0, 0, 0, 0, 0, 0, 0.5, 1, 1])
    assert cpr == pytest.approx(0.1 * 0.25 + 0.3 * 0.75 + 0.5 * 1.0)  # 0.75
    assert cmd == pytest.approx((0.1 - 0.001) * 1 + 0.1 * 0.75 + 0.3 * 0.25)  # 0.249
    assert mib.areas([1.0] * 10) == pytest.approx((0.999, 0.0))
    assert mib.areas([1.5] * 10)[1] == pytest.approx(0.999 * 0.5)  # |1 - f|: overshoot counts


def test_top_n_ranks_by_absolute_or_signed_score():
    s = torch.tensor([0.5, -2.0, 1.0, -0.1])
    assert mib.top_n(s, 2, "absolute").tolist() == [False, True, True, False]
    assert mib.top_n(s, 2, "signed").tolist() == [True, False, True, False]


def test_bad_files_are_refused_in_one_line(model, tmp_path):  # noqa: F811
    graph, fmt, scores, in_graph, d = exported(model)
    cases = {
        "not JSON": "{not json",
        "lacks one of the keys": json.dumps({"cfg": d["cfg"]}),
        "n_heads=8": json.dumps({**d, "cfg": {**d["cfg"], "n_heads": 8}}),
        "'m1->m0'": json.dumps({**d, "edges": {**d["edges"], "m1->m0": {"score": 1.0, "in_graph": True}}}),
        "edge 'input->m0'": json.dumps({**d, "edges": {**d["edges"], "input->m0": {"score": "high", "in_graph": True}}}),
        "neither a score": json.dumps({**d, "edges": {k: {"score": 0, "in_graph": False} for k in d["edges"]}}),
    }
    for expected, text in cases.items():
        path = tmp_path / "bad.json"
        path.write_text(text)
        with pytest.raises(PipelineError, match=expected) as err:
            mib.load(str(path), graph, int(model.cfg.d_model))
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(PipelineError, match="no such file"):
        mib.load(str(tmp_path / "none.json"), graph, 64)
    # from the command line: refused before any model runs, exit 2
    path.write_text("[1, 2]")
    out = run_cli(["model=tiny", f"circuit.load={path}"], tmp_path)
    assert out.returncode == 2 and f"circuit.load={path}: lacks the keys cfg, nodes, edges" in out.stderr


OVERRIDES = ["model=tiny", "dataset.max_prompts=12", "batch_size=4", "circuit.batch_size=4", "circuit.score_prompts=4",
             "circuit.eval_prompts=4", "circuit.heldout_prompts=2", "circuit.n_sizes=3", "circuit.bootstrap=50",
             "circuit.path_patching.enabled=false", "circuit.edge_check.top=2", "circuit.edge_check.random=2",
             "circuit.mib.heldout_prompts=2", "circuit.ablation=[patching,zero]", "stage.stages=[data,cache,circuit]"]


def test_a_runs_circuit_loaded_into_another_run_gives_the_same_mib_numbers(tmp_path):
    run(make_cfg(OVERRIDES), tmp_path / "a")
    exported_graph = json.loads((tmp_path / "a" / "circuits" / "eap_ig.json").read_text())
    summary = json.loads((tmp_path / "a" / "tables" / "circuit_summary.json").read_text())
    size = summary["curves"]["eap_ig"]["size_at_0.8"] or 1.0
    assert sum(e["in_graph"] for e in exported_graph["edges"].values()) == max(1, round(size * 110))
    assert (tmp_path / "a" / "circuits" / "eap.json").exists()
    a = json.loads((tmp_path / "a" / "tables" / "circuit_mib.json").read_text())
    assert {(r["ablation"], r["prompts"]) for r in a["results"]} == {(x, s) for x in ("patching", "zero") for s in ("discovery", "heldout")}
    assert a["overlap"] and {r["ablation_b"] for r in a["overlap"]} == {"zero"}

    run(make_cfg([*OVERRIDES, f"circuit.load={tmp_path / 'a' / 'circuits' / 'eap_ig.json'}"]), tmp_path / "b")
    b = json.loads((tmp_path / "b" / "tables" / "circuit_mib.json").read_text())
    mine = {(r["ablation"], r["prompts"], r["circuit"].replace("eap_ig", "loaded")): r for r in a["results"]}
    for r in b["results"]:
        if r["circuit"] in ("quoted", "quoted random"):
            continue
        ref = mine[(r["ablation"], r["prompts"], r["circuit"])]
        assert r["cpr"] == pytest.approx(ref["cpr"], abs=1e-5) and r["cmd"] == pytest.approx(ref["cmd"], abs=1e-5)
    quoted = [r for r in b["results"] if r["circuit"] == "quoted"]
    assert len(quoted) == 4 and all(r["edges"] <= max(1, round(size * 110)) for r in quoted)

    from pipeline.stages.report import build_report

    page = build_report(tmp_path / "b")
    assert "MIB CPR (edge)" in page and "The loaded circuit" in page and "circuits/loaded.json" in page


def test_ablation_overlap_is_the_shared_share_of_the_top_k_sets():
    from pipeline.circuit.benchmark import overlap

    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 1000, generator=g)
    b = a + 0.5 * torch.randn(6, 1000, generator=g)
    table = overlap({"patching": a, "mean": b}, 40, 0, None, chunk=7)
    for row in table.itertuples():
        top = [set(torch.argsort(x.mean(0).abs(), descending=True)[:row.top_k].tolist()) for x in (a, b)]
        assert row.shared == pytest.approx(len(top[0] & top[1]) / row.top_k)
        assert row.ci_low <= row.ci_high and row.random_expected == row.top_k / 1000
    assert list(table.top_k) == [1, 2, 5, 10, 20, 50, 100, 200, 500]


def test_areas_of_many_curves_are_each_curves_areas():
    curves = torch.rand(5, 10, generator=torch.Generator().manual_seed(0)).numpy()
    cpr, cmd = mib.areas(curves)
    one_by_one = [mib.areas(c) for c in curves]
    assert list(cpr) == pytest.approx([a for a, _ in one_by_one]) and list(cmd) == pytest.approx([b for _, b in one_by_one])


def test_gpt2_small_has_the_edge_count_of_mibs_published_circuit():
    # MIB's circuits/ioi-eap-ig.json (hannamw/MIB-circuit-track, written by EAP-IG for GPT-2 small)
    # has 32,491 edges; the graph of that shape, without a model, gives the same names.
    graph = Graph(12, 12, 12)
    assert len(format_edges(12, 12, False)) == 32491 == graph.n_edges
    assert set(mib.Format.of(graph, 768).names) == format_edges(12, 12, False)
