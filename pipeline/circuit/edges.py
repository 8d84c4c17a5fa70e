"""Edge scores (EAP, EAP-IG) and exact circuit evaluation on the graph of pipeline/circuit/graph.py.

Positions. Clean and corrupted prompts may differ in token length, so everything is computed in
the clean prompt's coordinates. The corrupted value of an upstream node's output at clean position
p is the corrupted run's output at the role-matched position (pipeline/patching/sweeps.py
all_position_pairs: every matched role, plus the utterance's middle tokens by offset when both
utterances have as many). A clean token without a counterpart (a middle token of the longer
utterance) takes its own clean output as its corrupted value: its clean-minus-corrupted difference
is zero, so it adds nothing to any edge score and is never patched. Corrupted tokens without a
counterpart do not appear. On equal-length pairs every position is matched by offset and both
definitions below are the plain ones (tests/test_circuit.py checks this against
TransformerLens caches).

Scores. EAP: score(u -> v) = sum over positions of (clean - corrupted output of u) . dm/d(input of
v), the gradient taken on the clean run; it estimates m(clean) - m(clean with that one edge
corrupted). EAP-IG: the same with the gradient averaged over `ig_steps` runs whose input embedding
is corrupted + alpha (clean - corrupted), alpha = k / ig_steps, k = 1..ig_steps (with one step it is
EAP). Passes per prompt: EAP one forward (corrupted) plus one forward and backward; EAP-IG one
forward plus ig_steps forwards and backwards.

Evaluation. A circuit is a set of edges. It runs on the clean tokens with every edge outside it
patched to its corrupted value: each downstream input = its input in this run - the sum over
upstream nodes u outside the circuit's edges into it of (u's output in this run - u's corrupted
output); equivalently the corrupted input plus, over in-circuit upstream nodes, their output in
this run minus their corrupted output (the residual stream is a sum of node outputs and constant
biases). All edges: the clean run exactly. No edges: the logits read the corrupted run's final
residual stream at the matched last token, so the metric is the corrupted run's (on mixed lengths
too); on equal-length pairs every node sees its corrupted input.

TransformerLens's `patching` and `tools.analysis` work per activation, not per edge, so this is
written here on the bridge's per-head hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pipeline.circuit.graph import Graph, enable_edge_hooks
from pipeline.errors import PipelineError
from pipeline.forward import last_token_logits, model_device
from pipeline.metrics import AnswerWeights, metric_values
from pipeline.patching.sweeps import all_position_pairs
from pipeline.prompts import PairedPrompts, PromptBatch, micro_batches

METHODS = ("eap", "eap_ig")


def check_method(method: str, metric: str) -> None:
    if method not in METHODS:
        raise PipelineError(f"circuit.method={method!r} is not one of {', '.join(METHODS)}")
    if method == "eap" and metric == "kl_div":
        raise PipelineError("circuit.method=eap cannot use metric=kl_div: its gradient at the clean run is zero; use circuit.method=eap_ig")


def position_map(pairs: PairedPrompts, rows: slice, width: int, all_pos=None) -> torch.Tensor:
    """[b, width]: the corrupted position matched to each clean position, -1 where none."""
    all_pos = all_pos if all_pos is not None else all_position_pairs(pairs)
    out = torch.full((rows.stop - rows.start, width), -1, dtype=torch.long)
    for j, i in enumerate(range(rows.start, rows.stop)):
        k_pos, c_pos = all_pos[i]
        out[j, c_pos] = k_pos
    return out


def capture_outputs(model, graph: Graph, mb: PromptBatch, hooks=()) -> tuple[torch.Tensor, torch.Tensor]:
    """Every upstream node's output [b, n_up, pos, d_model] and the last-token logits [b, vocab]."""
    b, s = mb.tokens.shape
    out = torch.zeros(b, graph.n_up, s, model.cfg.d_model, device=mb.tokens.device)
    with torch.no_grad():
        logits = last_token_logits(model, mb, [*hooks, *upstream_writers(model, graph, out)])
    return out, logits


def upstream_writers(model, graph: Graph, buffer: torch.Tensor, minus: torch.Tensor | None = None,
                     running: torch.Tensor | None = None):
    """Hooks that write each upstream node's output (minus `minus`, if given) into buffer[:, node],
    and add it to `running` [batch, pos, d_model] (the sum over the nodes written so far).
    Buffers are [batch, node, pos, d_model], so that a prefix of nodes is one strided block for
    the batched matrix products below (no copies of the largest tensors)."""
    def writer(index):
        def write(x, hook):
            value = x.detach().float()
            value = value.unsqueeze(1) if value.dim() == 3 else value.transpose(1, 2)
            buffer[:, index] = value - (minus[:, index] if minus is not None else 0)
            if running is not None:
                running.add_(buffer[:, index].sum(1))
            return x
        return write

    hooks = [(graph.input_hook(), writer(slice(0, 1)))]
    for l in range(graph.n_layers):
        hooks += graph.head_writers(model, l, writer(slice(graph.up_head(l, 0), graph.up_head(l, 0) + graph.n_heads)))
        hooks.append((graph.mlp_out_hook(l), writer(slice(graph.up_mlp(l), graph.up_mlp(l) + 1))))
    return hooks


def downstream_inputs(graph: Graph):
    """(hook name, downstream index slice, layer, kind) of every downstream input."""
    for l in range(graph.n_layers):
        for kind in graph.input_kinds:
            yield graph.in_hook(l, kind), graph.down_slice(l, kind), graph.n_up_before(l, kind)
    yield graph.logits_hook(), slice(graph.down_logits, graph.down_logits + 1), graph.n_up


@dataclass
class Reference:
    """One micro-batch of clean prompts with the corrupted output of every upstream node in clean
    coordinates (see the module docstring for tokens without a counterpart)."""

    clean: PromptBatch
    answers: AnswerWeights
    corrupted: torch.Tensor  # [b, n_up, pos, d_model], 0 where unmatched
    matched: torch.Tensor  # [b, pos] bool

    @classmethod
    def make(cls, model, graph, pairs: PairedPrompts, rows: slice, all_pos, ablation=None) -> "Reference":
        """`ablation` (pipeline/circuit/ablation.py Ablation): its values instead of the corrupted run's."""
        device = model_device(model)
        clean = pairs.clean.slice(rows).to(device)
        if ablation is not None:
            values, matched = ablation.values(clean)
            return cls(clean, pairs.answers[rows].to(device), values, matched)
        corrupted = pairs.corrupted.slice(rows).to(device)
        corr_out, _ = capture_outputs(model, graph, corrupted)
        pos = position_map(pairs, rows, clean.tokens.shape[1], all_pos).to(device)
        matched = pos >= 0
        mapped = corr_out.transpose(1, 2)[torch.arange(len(pos), device=device)[:, None], pos.clamp(min=0)]  # [b, pos, up, d]
        mapped[~matched] = 0
        return cls(clean, pairs.answers[rows].to(device), mapped.transpose(1, 2).contiguous(), matched)

    def fill(self, clean_out: torch.Tensor) -> torch.Tensor:
        """The corrupted value of every output: matched positions from the corrupted run, the rest
        their own clean value."""
        return torch.where(self.matched[:, None, :, None], self.corrupted, clean_out)


def _no_param_grads(model):
    was = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    return was


def _restore_param_grads(model, was):
    for p, w in zip(model.parameters(), was):
        p.requires_grad_(w)


def edge_scores(model, pairs: PairedPrompts, metric: str, method: str = "eap", ig_steps: int = 5,
                batch_size: int = 8, done: torch.Tensor | None = None, values: torch.Tensor | None = None,
                on_progress=None, desc: str | None = None, ablation=None) -> torch.Tensor:
    """[n_prompts, n_edges] EAP or EAP-IG score of every edge on every prompt (see module docstring).
    `done`/`values` resume a partial computation; `on_progress(done, values)` is called after
    every micro-batch. With an `ablation` (pipeline/circuit/ablation.py) its values stand for the
    corrupted outputs: the score estimates m(clean) - m(clean with that edge ablated)."""
    check_method(method, metric)
    enable_edge_hooks(model)
    graph = Graph.of(model)
    n = len(pairs)
    done = torch.zeros(n, dtype=torch.bool) if done is None else done
    values = torch.zeros(n, graph.n_edges) if values is None else values
    alphas = [1.0] if method == "eap" else [k / int(ig_steps) for k in range(int(ig_steps), 0, -1)]  # alpha = 1 first
    all_pos = all_position_pairs(pairs)
    was = _no_param_grads(model)
    try:
        for rows in tqdm([r for r in micro_batches(n, batch_size) if not bool(done[r].all())], desc=desc, disable=desc is None):
            ref = Reference.make(model, graph, pairs, rows, all_pos, ablation)
            b, s = ref.clean.tokens.shape
            d = model.cfg.d_model
            grads = torch.zeros(b, graph.n_down, s, d, device=ref.corrupted.device)
            clean_out = torch.zeros(b, graph.n_up, s, d, device=grads.device)
            clean_last = None
            for alpha in alphas:
                hooks = _gradient_hooks(graph, ref, alpha, grads)
                if alpha == 1.0:
                    hooks += upstream_writers(model, graph, clean_out)
                with torch.enable_grad():
                    last = last_token_logits(model, ref.clean, hooks)
                    if clean_last is None:
                        clean_last = last.detach()
                    m = metric_values(metric, last, ref.answers, clean_last)
                    m.sum().backward()  # prompts do not interact: each row's gradient is its own
            diff = torch.where(ref.matched[:, None, :, None], clean_out - ref.corrupted, torch.zeros((), device=grads.device))
            dense = torch.bmm(diff.flatten(2), grads.flatten(2).transpose(1, 2)) / len(alphas)  # [b, up, down]
            values[rows] = graph.from_dense(dense).cpu()
            done[rows] = True
            if on_progress is not None:
                on_progress(done, values)
    finally:
        _restore_param_grads(model, was)
    return values


def _gradient_hooks(graph: Graph, ref: Reference, alpha: float, grads: torch.Tensor):
    """Interpolate the input embedding (EAP-IG over inputs) and add each downstream input's
    gradient into grads[:, :, index]."""
    def interpolate(x, hook):
        if alpha == 1.0:
            return x.detach().requires_grad_(True)
        corr = torch.where(ref.matched[:, :, None], ref.corrupted[:, 0], x.detach().float())
        new = corr + alpha * (x.detach().float() - corr)
        return new.to(x.dtype).requires_grad_(True)

    def catcher(index):
        def catch(x, hook):
            def add(g):
                grads[:, index] += (g.transpose(1, 2) if g.dim() == 4 else g.unsqueeze(1)).float()
            # A fresh tensor: the MLP-input hook receives the residual stream tensor itself, whose
            # gradient would also count the residual path around the MLP.
            y = x.clone()
            y.register_hook(add)
            return y
        return catch

    hooks = [(graph.input_hook(), interpolate)]
    for name, index, _ in downstream_inputs(graph):
        hooks.append((name, catcher(index)))
    return hooks


def evaluate(model, pairs: PairedPrompts, circuits: torch.Tensor, metric: str, batch_size: int = 8,
             rows_per_run: int = 32, done: torch.Tensor | None = None, values: torch.Tensor | None = None,
             on_progress=None, desc: str | None = None, ablation=None) -> torch.Tensor:
    """[n_circuits, n_prompts] metric of each circuit (bool [n_circuits, n_edges]) on each prompt,
    run exactly as described in the module docstring. Circuits of one micro-batch of prompts share
    a forward pass up to `rows_per_run` rows. With an `ablation` (pipeline/circuit/ablation.py)
    edges outside a circuit carry its values instead of the corrupted outputs."""
    enable_edge_hooks(model)
    graph = Graph.of(model)
    n, n_c = len(pairs), circuits.shape[0]
    if circuits.shape[-1] != graph.n_edges:
        raise ValueError(f"circuits have {circuits.shape[-1]} edges, the graph {graph.n_edges}")
    done = torch.zeros(n, dtype=torch.bool) if done is None else done
    values = torch.full((n_c, n), float("nan")) if values is None else values
    all_pos = all_position_pairs(pairs)
    for rows in tqdm([r for r in micro_batches(n, batch_size) if not bool(done[r].all())], desc=desc, disable=desc is None):
        ref = Reference.make(model, graph, pairs, rows, all_pos, ablation)
        clean_out, clean_last = capture_outputs(model, graph, ref.clean)
        corrupted = ref.fill(clean_out)
        del clean_out
        b = len(ref.answers)
        per_run = max(1, int(rows_per_run) // b)
        out = []
        for start in range(0, n_c, per_run):
            chunk = circuits[start:start + per_run]
            notin = (~graph.dense(chunk.cpu(), fill=True)).float().to(corrupted.device)  # [c, up, down]
            out.append(_run_circuits(model, graph, ref, corrupted, clean_last, notin, metric))
        values[:, rows] = torch.cat(out).reshape(n_c, b).cpu()
        done[rows] = True
        if on_progress is not None:
            on_progress(done, values)
    return values


def _run_circuits(model, graph, ref: Reference, corrupted, clean_last, notin, metric) -> torch.Tensor:
    """Metric of c circuits on one micro-batch: rows ordered circuit-major."""
    c, b = notin.shape[0], len(ref.answers)
    rows_notin = notin.repeat_interleave(b, 0)  # [c*b, up, down]
    corr = corrupted.repeat(c, 1, 1, 1)
    diff = torch.zeros_like(corr)
    batch = PromptBatch(ref.clean.prompts * c, ref.clean.tokens.repeat(c, 1), ref.clean.attention_mask.repeat(c, 1),
                        ref.clean.last.repeat(c), ref.clean.role_labels * c, ref.clean.str_tokens * c)

    running = torch.zeros(diff.shape[0], diff.shape[2], diff.shape[3], device=diff.device)

    def patcher(index, n_before):
        def patch(x, hook):
            # delta = sum over upstream nodes outside the circuit of their difference, per input k.
            # When most edges are out, sum those in and take it from the running total of every
            # node's difference (all nodes before this input have been written); either way only
            # the upstream nodes some row needs enter the product.
            out_mask = rows_notin[:, :n_before, index]  # [rows, up, k]
            n_out = int(out_mask.sum())
            if n_out == 0:
                return x
            # (Not in parallel blocks: when a layer's MLP input is read, the running total may already
            # hold that layer's heads, which do not feed it.)
            use_in = 2 * n_out > out_mask.numel() and not graph.parallel
            mask = 1.0 - out_mask if use_in else out_mask
            cols = mask.amax(dim=(0, 2)).nonzero().squeeze(-1)
            r, _, s, d = diff.shape
            k = mask.shape[-1]
            if len(cols):
                # The span of the nodes needed, as a slice: a view of diff, where indexing by `cols`
                # would copy up to all of it for every input (most of this function's time).
                lo, hi = int(cols[0]), int(cols[-1]) + 1
                part = torch.bmm(mask[:, lo:hi].transpose(1, 2), diff[:, lo:hi].reshape(r, hi - lo, s * d)).view(r, k, s, d)
            else:
                part = torch.zeros(r, k, s, d, device=diff.device)
            delta = running[:, None] - part if use_in else part
            return (x.float() - (delta.transpose(1, 2) if x.dim() == 4 else delta[:, 0])).to(x.dtype)
        return patch

    hooks = upstream_writers(model, graph, diff, minus=corr, running=running)
    for name, index, n_before in downstream_inputs(graph):
        hooks.append((name, patcher(index, n_before)))
    with torch.no_grad():
        last = last_token_logits(model, batch, hooks)
    return metric_values(metric, last, ref.answers.repeat(c), clean_last.repeat(c, 1)).float()
