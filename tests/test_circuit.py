"""Edge-level circuits are exact: EAP scores equal a finite-difference directional derivative
built from TransformerLens caches (the plain definition on equal-length pairs), exact circuit
evaluation equals a naive run that rebuilds every downstream input from all upstream outputs,
the full circuit is the clean run and the empty one the corrupted run, grouped-query attention
has key/value edges per key/value head, and batched equals one prompt at a time on mixed lengths."""

import pytest
import torch

from pipeline.circuit import edges
from pipeline.circuit.graph import Graph, edge_hooks
from pipeline.metrics import gather_last
from pipeline.model import load_model
from conftest import make_cfg, pairs_for
from test_patching import equal_length_pairs
from test_prompts import small_dataset


@pytest.fixture(scope="module")
def model():
    """A fresh tiny model (the edge hooks' flags stay off the shared session fixture)."""
    torch.manual_seed(0)
    return load_model(make_cfg(["model=tiny"]).model, "cpu", torch.float32)


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory):
    """A tiny random Llama-architecture model: rotary attention, 4 query heads sharing 2 key/value heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.model import build_tiny_model

    gpt2_dir = build_tiny_model(make_cfg(["model=tiny"]).model)  # for its tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.2)
    folder = tmp_path_factory.mktemp("tiny-llama-gqa")
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = make_cfg(["model=tiny", f"model.dir={folder}", "model.processing.refactor_factored_attn_matrices=false"])
    return load_model(cfg.model, "cpu", torch.float32)


def caches(model, pairs):
    with torch.no_grad():
        _, clean = model.run_with_cache(pairs.clean.tokens)
        _, corr = model.run_with_cache(pairs.corrupted.tokens)
    return clean, corr


def node_output(graph, cache, u):
    """Upstream node u's output [b, pos, d] read from a TransformerLens cache."""
    if u == 0:
        return cache["blocks.0.hook_resid_pre"]
    layer, rest = divmod(u - 1, graph.n_heads + 1)
    if rest == graph.n_heads:
        return cache[f"blocks.{layer}.hook_mlp_out"]
    return cache[f"blocks.{layer}.attn.hook_result"][:, :, rest]


def input_site(graph, v):
    """(hook name, index into the hook's head axis or None) of downstream input v."""
    if v == graph.down_logits:
        return graph.logits_hook(), None
    layer, rest = divmod(v, graph.per_layer)
    for kind in ("q", "k", "v", "mlp"):
        sl = graph.down_slice(layer, kind)
        if sl.start <= v < sl.stop:
            return graph.in_hook(layer, kind), (None if kind == "mlp" else v - sl.start)


def metric_with_shift(model, pairs, site, index, shift):
    def add(x, hook):
        x = x.clone()
        if index is None:
            x += shift
        else:
            x[:, :, index] += shift
        return x
    with torch.no_grad():
        logits = model.run_with_hooks(pairs.clean.tokens, fwd_hooks=[(site, add)])
    return pairs.answers.values(gather_last(logits, pairs.clean.last)).double()


def brute_force_eap(model, pairs, edge_ids, eps=1e-2):
    """Central finite difference of the metric along (clean - corrupted output of u) at v's input."""
    graph = Graph.of(model)
    clean, corr = caches(model, pairs)
    up, down = graph.edges
    out = []
    for e in edge_ids:
        u, v = int(up[e]), int(down[e])
        delta = (node_output(graph, clean, u) - node_output(graph, corr, u)).double()
        hook, index = input_site(graph, v)
        plus = metric_with_shift(model, pairs, hook, index, (eps * delta).float())
        minus = metric_with_shift(model, pairs, hook, index, (-eps * delta).float())
        out.append((plus - minus) / (2 * eps))
    return torch.stack(out, 1)  # [prompts, edges]


def test_graph_counts_match_the_formula(model, gqa_model):
    g = Graph.of(model)
    assert (g.n_layers, g.n_heads, g.n_kv_heads) == (2, 4, 4) and g.n_nodes == 12 and g.n_edges == 110
    q = Graph.of(gqa_model)
    assert q.n_kv_heads == 2
    # per layer l: (4 q + 2 k + 2 v) inputs fed by 1 + 5l nodes, the MLP by 5 + 5l; logits by 11
    assert q.n_edges == sum(8 * (1 + 5 * l) + (5 + 5 * l) for l in range(2)) + 11
    assert len(set(q.edge_names())) == q.n_edges and "a1.kv1.v" in q.down_names


@pytest.mark.parametrize("metric", ["logit_diff", "favorability"])
@pytest.mark.parametrize("which", ["model", "gqa_model"])
def test_eap_equals_brute_force_directional_derivative(which, metric, request):
    model = request.getfixturevalue(which)
    pairs = equal_length_pairs(model, 3, metric)
    graph = Graph.of(model)
    g = torch.Generator().manual_seed(0)
    sample = torch.randperm(graph.n_edges, generator=g)[:24].tolist()
    with edge_hooks(model):
        scores = edges.edge_scores(model, pairs, metric, "eap", batch_size=2)
        brute = brute_force_eap(model, pairs, sample)
    got = scores[:, sample].double()
    assert torch.allclose(got, brute, atol=2e-3 * brute.abs().max().item() + 1e-4, rtol=2e-2), (got - brute).abs().max()
    # EAP-IG with one step is EAP; with more it differs but stays finite
    with edge_hooks(model):
        assert torch.allclose(edges.edge_scores(model, pairs, metric, "eap_ig", ig_steps=1, batch_size=3), scores, atol=1e-5)


def naive_single_edge(model, pairs, edge):
    """Clean run in which every downstream input is rebuilt from the upstream outputs of this run
    (and the constant biases), except that the one patched edge carries the corrupted output."""
    graph = Graph.of(model)
    clean, corr = caches(model, pairs)
    up, down = graph.edges
    eu, ev = int(up[edge]), int(down[edge])
    current = {}

    def keep(u, head=None):
        def f(x, hook):
            current[u] = x[:, :, head].clone() if head is not None else x.clone()
            return x
        return f

    def rebuild(v, head=None):
        def f(x, hook):
            n_before = int(graph.down_prefix[v])
            const = (x[:, :, head] if head is not None else x) * 0 + (clean_in[v] - sum(node_output(graph, clean, u) for u in range(n_before)))
            new = const + sum(node_output(graph, corr, u) if (u == eu and v == ev) else current[u] for u in range(n_before))
            x = x.clone()
            if head is None:
                return new
            x[:, :, head] = new
            return x
        return f

    hooks, clean_in = [(graph.input_hook(), keep(0))], {}
    for l in range(graph.n_layers):
        for h in range(graph.n_heads):
            hooks.append((graph.head_out_hook(l), keep(graph.up_head(l, h), h)))
        hooks.append((graph.mlp_out_hook(l), keep(graph.up_mlp(l))))
    for v in range(graph.n_down):
        hook, index = input_site(graph, v)
        clean_in[v] = clean[hook][:, :, index] if index is not None else clean[hook]
        hooks.append((hook, rebuild(v, index)))
    # hooks at one site run in order; head outputs must be kept before a later site reads them
    with torch.no_grad():
        logits = model.run_with_hooks(pairs.clean.tokens, fwd_hooks=hooks)
    return pairs.answers.values(gather_last(logits, pairs.clean.last))


def single_edge_circuits(graph, n: int) -> tuple[list[int], torch.Tensor]:
    """n seeded edges, and circuits [n + 2, edges]: all edges but one of them each, then the full
    circuit, then the empty one."""
    sample = torch.randperm(graph.n_edges, generator=torch.Generator().manual_seed(1))[:n].tolist()
    circuits = torch.ones(n + 2, graph.n_edges, dtype=torch.bool)
    for i, e in enumerate(sample):
        circuits[i, e] = False
    circuits[-1] = False
    return sample, circuits


@pytest.mark.parametrize("metric", ["logit_diff", "favorability"])
@pytest.mark.parametrize("which", ["model", "gqa_model"])
def test_single_edge_patching_equals_naive_rebuild_and_full_empty_are_clean_corrupted(which, metric, request):
    model = request.getfixturevalue(which)
    pairs = equal_length_pairs(model, 3, metric)
    graph = Graph.of(model)
    sample, circuits = single_edge_circuits(graph, 12)
    with edge_hooks(model):
        ours = edges.evaluate(model, pairs, circuits, metric, batch_size=2, rows_per_run=8)
        with torch.no_grad():
            clean = pairs.answers.values(gather_last(model(pairs.clean.tokens), pairs.clean.last))
            corrupted = pairs.answers.values(gather_last(model(pairs.corrupted.tokens), pairs.corrupted.last))
        naive = torch.stack([naive_single_edge(model, pairs, e) for e in sample])
    # Nothing patched: the clean run. Bit for bit on one thread; with several threads the batched
    # matmuls of a different batch shape may round differently in the last place.
    assert torch.allclose(ours[-2], clean, atol=1e-5, rtol=0)
    assert torch.allclose(ours[-1], corrupted, atol=1e-4)
    assert torch.allclose(ours[:-2], naive, atol=1e-4)
    assert (ours[:-2] - clean).abs().max() > 1e-3  # the patches do something


@pytest.mark.parametrize("metric", ["logit_diff", "favorability"])
def test_mixed_lengths_batched_equals_one_prompt_at_a_time(model, metric):
    ds = small_dataset(6)
    pairs = pairs_for(model, ds, make_cfg([f"metric={metric}"]))
    assert (pairs.clean.last != pairs.corrupted.last).any()  # lengths differ
    graph = Graph.of(model)
    circuits = torch.rand(3, graph.n_edges, generator=torch.Generator().manual_seed(2)) < 0.5
    circuits[0] = True
    circuits[1] = False
    with edge_hooks(model):
        s_batch = edges.edge_scores(model, pairs, metric, "eap_ig", ig_steps=2, batch_size=4)
        s_one = edges.edge_scores(model, pairs, metric, "eap_ig", ig_steps=2, batch_size=1)
        e_batch = edges.evaluate(model, pairs, circuits, "prob_diff", batch_size=4, rows_per_run=12)
        e_one = edges.evaluate(model, pairs, circuits, "prob_diff", batch_size=1, rows_per_run=1)
    assert torch.allclose(s_batch, s_one, atol=1e-4) and s_batch.abs().max() > 0
    assert torch.allclose(e_batch, e_one, atol=1e-5)
    with torch.no_grad():
        clean = torch.cat([prompt_metric(model, pairs.clean, pairs.answers, i) for i in range(len(pairs))])
        corrupted = torch.cat([prompt_metric(model, pairs.corrupted, pairs.answers, i) for i in range(len(pairs))])
    assert torch.allclose(e_batch[0], clean, atol=1e-5)  # the full circuit is the clean run
    # the empty circuit hands the logits the corrupted final residual: the corrupted run even on mixed lengths
    assert torch.allclose(e_batch[1], corrupted, atol=1e-5)


def prompt_metric(model, batch, answers, i):
    """prob_diff of prompt i run alone, unpadded."""
    from pipeline.metrics import prob_diff

    n = int(batch.last[i]) + 1
    return prob_diff(model(batch.tokens[i:i + 1, :n])[:, -1], answers[i:i + 1])


def test_kl_div_refuses_plain_eap(model):
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="eap_ig"):
        edges.check_method("eap", "kl_div")
