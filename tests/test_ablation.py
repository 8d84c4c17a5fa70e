"""Each ablation keeps the circuit identities: the full circuit is the model's own metric, and the
empty circuit is the run in which every node's output is replaced by its ablation value (built
here from TransformerLens caches and plain hooks, not from pipeline/circuit/ablation.py); EAP
under an ablation is the directional derivative along (clean - ablation value)."""

import pytest
import torch

from pipeline.circuit import edges
from pipeline.circuit.ablation import ABLATIONS, Ablation, check_ablations
from pipeline.circuit.graph import Graph, edge_hooks
from pipeline.data.dataset import pair_prompts
from pipeline.errors import PipelineError
from pipeline.metrics import gather_last
from conftest import make_cfg
from test_circuit import input_site, metric_with_shift, model  # noqa: F401  (a fresh tiny model)
from test_prompts import small_dataset


def node_hooks(graph):
    """(hook name, head index or None) of every upstream node, in the graph's order."""
    out = [(graph.input_hook(), None)]
    for l in range(graph.n_layers):
        out += [(graph.head_out_hook(l), h) for h in range(graph.n_heads)] + [(graph.mlp_out_hook(l), None)]
    return out


def node_value(cache, site):
    hook, head = site
    return cache[hook][:, :, head] if head is not None else cache[hook]


def reference_values(model, graph, pairs, kind):
    """[n_up] of [b, pos, d]: each node's ablation value at each clean position (its clean output
    where the ablation has no value), from caches of whole-batch runs."""
    with torch.no_grad():
        _, clean = model.run_with_cache(pairs.clean.tokens, attention_mask=pairs.clean.attention_mask)
        _, corr = model.run_with_cache(pairs.corrupted.tokens, attention_mask=pairs.corrupted.attention_mask)
    real = pairs.corrupted.attention_mask.bool()
    out = []
    for site in node_hooks(graph):
        c, k = node_value(clean, site), node_value(corr, site)
        if kind == "zero":
            out.append(torch.zeros_like(c))
        elif kind == "mean":
            out.append(k[real].mean(0).expand_as(c).clone())
        else:  # mean_positional: mean over the corrupted tokens of each role label
            value = c.clone()
            for i, labels in enumerate(pairs.clean.role_labels):
                for p, role in enumerate(labels):
                    hits = [k[j, q] for j, ls in enumerate(pairs.corrupted.role_labels) for q, r in enumerate(ls) if r == role]
                    if hits:
                        value[i, p] = torch.stack(hits).mean(0)
            out.append(value)
    return out


def replaced_run(model, graph, pairs, values):
    """The metric of a clean run in which every node's output is replaced by `values`."""
    def setter(value, head):
        def f(x, hook):
            x = x.clone()
            if head is None:
                x[:] = value
            else:
                x[:, :, head] = value
            return x
        return f

    hooks = [(site[0], setter(v, site[1])) for site, v in zip(node_hooks(graph), values)]
    with torch.no_grad():
        logits = model.run_with_hooks(pairs.clean.tokens, attention_mask=pairs.clean.attention_mask, fwd_hooks=hooks)
    return pairs.answers.values(gather_last(logits, pairs.clean.last))


@pytest.mark.parametrize("kind", ["mean", "zero", "mean_positional"])
def test_full_circuit_is_the_model_and_empty_is_every_node_ablated(model, kind):  # noqa: F811
    pairs = pair_prompts(model, small_dataset(5), make_cfg([]).direction, True)  # mixed lengths: roles matter
    assert (pairs.clean.last != pairs.corrupted.last).any()
    graph = Graph.of(model)
    circuits = torch.stack([torch.ones(graph.n_edges, dtype=torch.bool), torch.zeros(graph.n_edges, dtype=torch.bool)])
    with edge_hooks(model):
        ablation = Ablation.of(kind, model, graph, pairs, batch_size=2)
        ours = edges.evaluate(model, pairs, circuits, "logit_diff", batch_size=2, rows_per_run=4, ablation=ablation)
        patched = edges.evaluate(model, pairs, circuits, "logit_diff", batch_size=2, rows_per_run=4)
        with torch.no_grad():
            clean = pairs.answers.values(gather_last(model(pairs.clean.tokens, attention_mask=pairs.clean.attention_mask),
                                                     pairs.clean.last))
        expected = replaced_run(model, graph, pairs, reference_values(model, graph, pairs, kind))
    assert torch.allclose(ours[0], clean, atol=1e-5)
    assert torch.allclose(ours[1], expected, atol=1e-4), (ours[1], expected)
    assert (ours[1] - clean).abs().max() > 1e-3 and (ours[1] - patched[1]).abs().max() > 1e-4  # it ablates, differently


def test_eap_under_an_ablation_is_the_directional_derivative(model):  # noqa: F811
    from test_patching import equal_length_pairs

    pairs = equal_length_pairs(model, 3, "logit_diff")
    graph = Graph.of(model)
    sample = torch.randperm(graph.n_edges, generator=torch.Generator().manual_seed(3))[:10].tolist()
    up, down = graph.edges
    eps = 1e-2
    with edge_hooks(model):
        ablation = Ablation.of("mean", model, graph, pairs, batch_size=3)
        scores = edges.edge_scores(model, pairs, "logit_diff", "eap", batch_size=2, ablation=ablation)
        values = reference_values(model, graph, pairs, "mean")
        with torch.no_grad():
            _, clean = model.run_with_cache(pairs.clean.tokens)
        brute = []
        for e in sample:
            u, v = int(up[e]), int(down[e])
            delta = node_value(clean, node_hooks(graph)[u]) - values[u]
            hook, index = input_site(graph, v)
            plus = metric_with_shift(model, pairs, hook, index, eps * delta)
            minus = metric_with_shift(model, pairs, hook, index, -eps * delta)
            brute.append((plus - minus) / (2 * eps))
    brute = torch.stack(brute, 1).float()
    assert torch.allclose(scores[:, sample], brute, atol=2e-3 * brute.abs().max().item() + 1e-4, rtol=2e-2)
    assert brute.abs().max() > 1e-3


def test_unknown_ablation_is_refused():
    assert check_ablations(["patching", "mean", "patching"]) == ["patching", "mean"]
    assert set(ABLATIONS) == {"patching", "mean", "zero", "mean_positional"}
    with pytest.raises(PipelineError, match="resample"):
        check_ablations(["resample"])
