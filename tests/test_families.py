"""Every model family the pipeline supports (pipeline/families.py), as a tiny random model built
offline, keeps the identities the stages rest on:

- direct logit attribution closes: the layer terms sum to the model's logit difference (before
  the cap of a soft-capped model), the heads to their layer's attention term, and the record
  kept from a probing pass equals attribution's own pass, batched or one prompt at a time;
- the fast patching engine equals the reference engine on padded prompts of mixed lengths;
- the circuit graph's nodes add up to every downstream input (up to constant biases), so EAP
  equals a finite-difference directional derivative, exact circuit evaluation equals a naive
  rebuild of every input from the nodes, the full circuit is the clean run and the empty one
  the corrupted run, and batched scores and evaluations equal one prompt at a time;
- the graph follows the architecture: no edge from a parallel block's heads to its own MLP,
  q/k/v inputs only where the bridge has them, and path patching's last-token shortcut equals
  full patched runs where it is used.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.architecture import discards_pattern_edits
from pipeline.attribution import LastTokenRecord, attribute, record_attributions
from pipeline.circuit import edges
from pipeline.circuit.graph import Graph, edge_hooks
from pipeline.circuit.path_patching import last_token_shortcut, path_patch
from pipeline.data.dataset import pair_prompts
from pipeline.families import FAMILIES
from pipeline.metrics import gather_last
from pipeline.model import load_model
from pipeline.patching.engine import run_cells
from pipeline.patching.sweeps import cells_of
from pipeline.prompts import micro_batches
from conftest import make_cfg
from test_circuit import single_edge_circuits
from test_patching import equal_length_pairs
from test_prompts import small_dataset

@pytest.fixture(scope="session", params=list(FAMILIES))
def family_model(request):
    """(family name, its tiny model): built and loaded once per session; pytest runs one family's
    tests together, so one model is held at a time."""
    torch.manual_seed(0)
    rotary = request.param != "gpt2"
    cfg = make_cfg(["model=tiny", f"model.family={request.param}",
                    f"model.processing.refactor_factored_attn_matrices={str(not rotary).lower()}"])
    return request.param, load_model(cfg.model, "cpu", torch.float32)


def mixed_pairs(model, n=6):
    pairs = pair_prompts(model, small_dataset(n), make_cfg([]).direction, True)
    assert (pairs.clean.last != pairs.corrupted.last).any()  # lengths differ: padding and role matching matter
    return pairs


def pre_cap_metric(model, batch, answers):
    """The metric at each prompt's last token before any soft cap, from a plain forward
    (the unembedding's own output)."""
    box = {}

    def grab(x, hook):
        box["logits"] = x
        return x

    with torch.no_grad():
        model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=[("unembed.hook_out", grab)])
    return answers.values(gather_last(box["logits"], batch.last).float())


def recorded(model, batch, answers, batch_size):
    """attribute()'s outputs from LastTokenRecord riding on plain forwards, as the data stage's
    probing pass does."""
    ids = sorted(set(answers.tokens.flatten().tolist()))
    rec = LastTokenRecord(model, ids)
    with torch.no_grad():
        for rows in micro_batches(len(batch), batch_size):
            mb = batch.slice(rows)
            model.run_with_hooks(mb.tokens, attention_mask=mb.attention_mask, fwd_hooks=rec.hooks(mb.last))
            rec.collect(torch.arange(rows.start, rows.stop))
    column = {t: i for i, t in enumerate(ids)}
    weights = torch.zeros(len(answers), len(ids))  # the metric as weights over the record's columns
    for k in range(answers.tokens.shape[1]):
        cols = torch.tensor([column[int(t)] for t in answers.tokens[:, k]])
        weights[torch.arange(len(answers)), cols] += answers.weights[:, k]
    return record_attributions(rec.result(), weights)


def test_attribution_closes_and_the_record_equals_its_own_pass(family_model):
    family, model = family_model
    pairs = mixed_pairs(model, 5)
    r = attribute(model, pairs.clean, pairs.answers, batch_size=5)
    before_cap = pre_cap_metric(model, pairs.clean, pairs.answers)
    torch.testing.assert_close(r["layer"].sum(0), before_cap, atol=1e-4, rtol=0)
    torch.testing.assert_close(r["logit_lens"][-1], before_cap, atol=1e-4, rtol=0)
    if getattr(model.cfg, "output_logits_soft_cap", -1) <= 0:
        torch.testing.assert_close(r["model_metric"], before_cap, atol=1e-4, rtol=0)
    attn = [i for i, label in enumerate(r["labels"]["layer"]) if label.endswith("attn_out")]
    b_O = getattr(model.blocks[0].attn, "b_O", None)
    if b_O is None or float(b_O.detach().abs().max()) == 0:
        torch.testing.assert_close(r["head"].sum(1), r["layer"][attn], atol=1e-4, rtol=0)
    rec = recorded(model, pairs.clean, pairs.answers, batch_size=2)  # other micro-batches: batched = alone
    for key in ("logit_lens", "layer", "head"):
        torch.testing.assert_close(rec[key], r[key], atol=1e-4, rtol=0)
    assert rec["labels"] == r["labels"]
    if model.cfg.parallel_attn_mlp:
        assert not any(label.endswith("_mid") for label in r["labels"]["logit_lens"])  # no resid_mid in a parallel block


def test_fast_engine_equals_reference(family_model):
    family, model = family_model
    pairs = mixed_pairs(model, 3)
    # GPT-J's attention runs inside its Hugging Face module: an edited pattern is discarded, and the
    # patching stage refuses the pattern part there rather than report no effect.
    assert discards_pattern_edits(model) == (family == "gptj")
    # part: the layer patched (a layer-0 key, or a parallel block's layer-0 MLP, reads only each position's own token,
    # the same at every role-matched position, so its patch would change nothing)
    parts = {"resid_pre": 1, "mlp_out": 1, "output": 0, "key": 1, "pattern": 1}
    corrupted = torch.cat([prompt_metric(model, pairs.corrupted, pairs.answers, i) for i in range(len(pairs))])
    for part, layer in parts.items():
        if part == "pattern" and discards_pattern_edits(model):
            continue
        # role cells past the template prefix, where clean and corrupted prompts differ
        cells = [c for c in cells_of(model, pairs, part)
                 if c.layer == layer and (c.axis != "role" or not pairs.role_names[c.index].startswith("pre"))]
        fast, _ = run_cells(model, pairs, cells, 2, fast=True)
        ref, _ = run_cells(model, pairs, cells, 2, fast=False)
        assert torch.equal(torch.isnan(fast), torch.isnan(ref)), part
        torch.testing.assert_close(fast.nan_to_num(), ref.nan_to_num(), atol=1e-4, rtol=0, msg=part)
        assert (ref - corrupted).nan_to_num().abs().max() > 1e-3, part  # the patches do something


def inputs_and_outputs(model, graph, batch):
    """Every downstream input's value [b, pos, d] (head 0's copy for q/k/v inputs) and every
    upstream node's output from one plain run."""
    seen = {}

    def keep(v):
        def f(x, hook):
            seen[v] = (x[:, :, 0] if x.dim() == 4 else x).detach().float().clone()
            return x
        return f

    hooks = [(name, keep(index.start)) for name, index, _ in edges.downstream_inputs(graph)]
    with torch.no_grad():
        out, _ = edges.capture_outputs(model, graph, batch, hooks)
    return seen, out


def test_graph_nodes_add_up_to_every_input_and_follow_the_architecture(family_model):
    family, model = family_model
    pairs = equal_length_pairs(model, 3)
    with edge_hooks(model):
        graph = Graph.of(model)
        constants = []
        for batch in (pairs.clean, pairs.corrupted):
            inputs, out = inputs_and_outputs(model, graph, batch)
            for v, value in inputs.items():
                rest = value - out[:, : int(graph.down_prefix[v])].sum(1)  # the biases written before v
                constants.append(rest)
                scale = float(value.abs().max())
                assert (rest - rest[:1, :1]).abs().max() < 1e-4 * scale, (graph.down_names[v], (rest - rest[:1, :1]).abs().max())
    up, down = graph.edges
    names = graph.edge_names()
    assert len(set(names)) == graph.n_edges
    if model.cfg.parallel_attn_mlp:
        assert graph.parallel and not any(n.startswith(f"a{l}.h") and n.endswith(f"->m{l}")
                                          for n in names for l in range(graph.n_layers))
    else:
        assert "a0.h0->m0" in names or graph.inputs == "block"
    if graph.inputs == "block":  # GPT-J: one input per layer, said in the summary
        assert family == "gptj" and "merged" in graph.summary() and "b1" in graph.down_names
        assert graph.n_edges == sum(1 + 5 * l for l in range(2)) + 11
    else:
        assert all(f"a1.{'h' if graph.n_kv_heads == graph.n_heads else 'kv'}0.{k}" in graph.down_names for k in "kv")
    if family in ("gemma2", "olmo2"):
        assert graph.head_output == "post_norm"


def finite_difference_scores(model, graph, pairs, edge_ids, eps=1e-2):
    """Central finite difference of the metric along (clean - corrupted output of u) at v's input."""
    with torch.no_grad():
        clean, _ = edges.capture_outputs(model, graph, pairs.clean)
        corr, _ = edges.capture_outputs(model, graph, pairs.corrupted)
    sites = {index.start + i: (name, i if name.endswith("_input") else None)
             for name, index, _ in edges.downstream_inputs(graph) for i in range(index.stop - index.start)}
    up, down = graph.edges
    out = []
    for e in edge_ids:
        u, v = int(up[e]), int(down[e])
        delta = clean[:, u] - corr[:, u]
        name, head = sites[v]
        values = []
        for sign in (1, -1):
            def shift(x, hook, sign=sign):
                x = x.clone()
                if head is None:
                    x += sign * eps * delta.to(x.dtype)
                else:
                    x[:, :, head] += sign * eps * delta.to(x.dtype)
                return x
            with torch.no_grad():
                logits = model.run_with_hooks(pairs.clean.tokens, fwd_hooks=[(name, shift)])
            values.append(pairs.answers.values(gather_last(logits, pairs.clean.last)).double())
        out.append((values[0] - values[1]) / (2 * eps))
    return torch.stack(out, 1)


def test_eap_equals_finite_differences(family_model):
    family, model = family_model
    pairs = equal_length_pairs(model, 3)
    with edge_hooks(model):
        graph = Graph.of(model)
        sample = torch.randperm(graph.n_edges, generator=torch.Generator().manual_seed(0))[:8].tolist()
        scores = edges.edge_scores(model, pairs, "logit_diff", "eap", batch_size=2)
        brute = finite_difference_scores(model, graph, pairs, sample)
    got = scores[:, sample].double()
    assert brute.abs().max() > 1e-3
    assert torch.allclose(got, brute, atol=2e-3 * brute.abs().max().item() + 1e-4, rtol=2e-2), (got - brute).abs().max()


def naive_rebuild(model, graph, pairs, edge, clean_in, clean_out, corr_out):
    """The clean run with every downstream input rebuilt from the upstream outputs of this run plus
    its constant (from the clean run's inputs and outputs), except that the one patched edge
    carries the corrupted output."""
    up, down = graph.edges
    eu, ev = int(up[edge]), int(down[edge])
    current = torch.zeros_like(clean_out)
    hooks = edges.upstream_writers(model, graph, current)

    def rebuild(index, n_before):
        def f(x, hook):
            x = x.clone()
            for v in range(index.start, index.stop):
                nodes = current[:, :n_before].clone()
                if v == ev:
                    nodes[:, eu] = corr_out[:, eu]
                constant = clean_in[index.start] - clean_out[:, :n_before].sum(1)
                new = (constant + nodes.sum(1)).to(x.dtype)
                if x.dim() == 4:
                    x[:, :, v - index.start] = new
                else:
                    x = new
            return x
        return f

    hooks += [(name, rebuild(index, n_before)) for name, index, n_before in edges.downstream_inputs(graph)]
    with torch.no_grad():
        logits = model.run_with_hooks(pairs.clean.tokens, fwd_hooks=hooks)
    return pairs.answers.values(gather_last(logits, pairs.clean.last))


def test_single_edge_circuits_equal_a_naive_rebuild(family_model):
    family, model = family_model
    pairs = equal_length_pairs(model, 3)
    with edge_hooks(model):
        graph = Graph.of(model)
        sample, circuits = single_edge_circuits(graph, 6)  # then full, then empty
        ours = edges.evaluate(model, pairs, circuits, "logit_diff", batch_size=2, rows_per_run=8)
        with torch.no_grad():
            clean_in, clean_out = inputs_and_outputs(model, graph, pairs.clean)
            corr_out, _ = edges.capture_outputs(model, graph, pairs.corrupted)
        naive = torch.stack([naive_rebuild(model, graph, pairs, e, clean_in, clean_out, corr_out) for e in sample])
        with torch.no_grad():
            clean = pairs.answers.values(gather_last(model(pairs.clean.tokens), pairs.clean.last))
            corrupted = pairs.answers.values(gather_last(model(pairs.corrupted.tokens), pairs.corrupted.last))
    torch.testing.assert_close(ours[-2], clean, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[-1], corrupted, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[:-2], naive, atol=1e-4, rtol=0)
    assert (ours[:-2] - clean).abs().max() > 1e-4  # the patches do something


def prompt_metric(model, batch, answers, i):
    """logit_diff of prompt i run alone, unpadded."""
    n = int(batch.last[i]) + 1
    with torch.no_grad():
        return answers[i:i + 1].values(model(batch.tokens[i:i + 1, :n])[:, -1].float())


def test_circuits_on_mixed_lengths_batched_equal_one_prompt_at_a_time(family_model):
    family, model = family_model
    pairs = mixed_pairs(model, 4)
    with edge_hooks(model):
        graph = Graph.of(model)
        circuits = torch.rand(3, graph.n_edges, generator=torch.Generator().manual_seed(2)) < 0.5
        circuits[0] = True
        circuits[1] = False
        s_batch = edges.edge_scores(model, pairs, "logit_diff", "eap_ig", ig_steps=2, batch_size=4)
        s_one = edges.edge_scores(model, pairs, "logit_diff", "eap_ig", ig_steps=2, batch_size=1)
        e_batch = edges.evaluate(model, pairs, circuits, "logit_diff", batch_size=4, rows_per_run=12)
        e_one = edges.evaluate(model, pairs, circuits, "logit_diff", batch_size=1, rows_per_run=1)
    assert torch.allclose(s_batch, s_one, atol=1e-4) and s_batch.abs().max() > 0
    assert torch.allclose(e_batch, e_one, atol=1e-4)
    clean = torch.cat([prompt_metric(model, pairs.clean, pairs.answers, i) for i in range(len(pairs))])
    corrupted = torch.cat([prompt_metric(model, pairs.corrupted, pairs.answers, i) for i in range(len(pairs))])
    torch.testing.assert_close(e_batch[0], clean, atol=1e-4, rtol=0)  # the full circuit is the clean run
    torch.testing.assert_close(e_batch[1], corrupted, atol=1e-4, rtol=0)  # the empty one the corrupted run


def test_path_patching_shortcut_equals_full_runs(family_model):
    family, model = family_model
    pairs = mixed_pairs(model, 3)
    with edge_hooks(model):
        graph = Graph.of(model)
        short, _ = path_patch(model, pairs, "logit_diff", batch_size=3)
        full, _ = path_patch(model, pairs, "logit_diff", batch_size=3, full_runs=True)
    expected = family in ("gpt2", "llama", "mistral", "qwen2", "phi3")  # sequential pre-norm blocks
    assert last_token_shortcut(model, graph) == expected
    torch.testing.assert_close(short, full, atol=1e-4, rtol=0)
    assert full.isfinite().all() and full.abs().max() > 0
