"""Path patching as in ARENA's IOI tutorial, in the denoising direction of the node sweeps: on the
corrupted run, one sender head takes its clean output (at role-matched positions), every other
head is frozen at its corrupted output, MLPs and norms recompute, and the receivers read the
result. Receivers are the final residual stream (`logits`, the default: the metric of that run
is the answer), or a list of head inputs like `a3.h1.q`, `a3.h0.k` (k and v count key/value
heads), in which case a second corrupted run takes only the receivers' inputs from the first.
Senders are every head in a layer below the lowest receiver. Values are normalized like the
node sweeps: 0 = corrupted, 1 = clean (pipeline/metrics.py Anchors, per prompt).

TransformerLens has no path-patching function (the tutorial writes it by hand on hooks), so it
is written here on the bridge's per-head result and input hooks.
"""

from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm

from pipeline.architecture import has_module, output_soft_cap
from pipeline.circuit.graph import Graph, enable_edge_hooks
from pipeline.errors import PipelineError
from pipeline.forward import last_token_logits, model_device
from pipeline.metrics import Anchors, metric_values
from pipeline.patching.sweeps import all_position_pairs
from pipeline.prompts import PairedPrompts, PromptBatch, micro_batches


def parse_receivers(receivers, graph: Graph) -> list[tuple[int, str, int]] | None:
    """None for the final residual stream, else [(layer, q|k|v, head or kv head)]."""
    if receivers in (None, "logits") or list(receivers) == ["logits"]:
        return None
    if graph.inputs != "qkv":
        raise PipelineError("circuit.path_patching.receivers: this model's graph has no per-head q/k/v inputs "
                            f"({graph.summary()}); use logits")
    out = []
    for r in receivers:
        m = re.fullmatch(r"a(\d+)\.(?:h|kv)(\d+)\.([qkv])", str(r))
        if not m:
            raise PipelineError(f"circuit.path_patching.receivers: {r!r} is not `logits` or like a3.h1.q / a3.kv0.k")
        layer, head, kind = int(m[1]), int(m[2]), m[3]
        n = graph.n_heads if kind == "q" else graph.n_kv_heads
        if not (0 < layer < graph.n_layers and head < n):
            raise PipelineError(f"circuit.path_patching.receivers: {r!r} is outside the model (layers 1..{graph.n_layers - 1}, {n} heads for {kind})")
        out.append((layer, kind, head))
    return out


def _results(model, graph, mb, extra=()):
    """Every head's output at graph.head_out_hook [b, pos, layer, head, d] (d: d_model, or d_head
    where the hook is z) and the last-token logits."""
    layers = []

    def keep(x, hook):
        layers.append(x.detach().float().clone())
        return x

    with torch.no_grad():
        logits = last_token_logits(model, mb, [*extra, *[(graph.head_out_hook(l), keep) for l in range(graph.n_layers)]])
    return torch.stack(layers, 2), logits


def path_patch(model, pairs: PairedPrompts, metric: str, receivers=None, batch_size: int = 8,
               rows_per_run: int = 64, desc: str | None = None, full_runs: bool = False) -> tuple[torch.Tensor, Anchors]:
    """[layer, head, prompt] normalized path-patching effect of each sender head (NaN for heads
    that are not senders), and the anchors used. Into the final residual stream it reads only the
    last token (see _to_logits_last_token) unless `full_runs`, which runs every patched forward."""
    enable_edge_hooks(model)
    graph = Graph.of(model)
    recv = parse_receivers(receivers, graph)
    top = graph.n_layers if recv is None else min(r[0] for r in recv)
    senders = [(l, h) for l in range(top) for h in range(graph.n_heads)]
    n = len(pairs)
    raw = torch.full((graph.n_layers, graph.n_heads, n), float("nan"))
    clean_m, corr_m = torch.zeros(n), torch.zeros(n)
    all_pos = all_position_pairs(pairs)
    device = model_device(model)
    chunks = list(micro_batches(n, batch_size))
    for rows in tqdm(chunks, desc=desc, disable=desc is None):
        clean = pairs.clean.slice(rows).to(device)
        corr = pairs.corrupted.slice(rows).to(device)
        answers = pairs.answers[rows].to(device)
        clean_res, clean_last = _results(model, graph, clean)
        corr_res, corr_last = _results(model, graph, corr)
        clean_m[rows] = metric_values(metric, clean_last, answers, clean_last).cpu()
        corr_m[rows] = metric_values(metric, corr_last, answers, clean_last).cpu()
        # the clean output of every head in corrupted coordinates (unmatched positions keep corrupted)
        mapped = corr_res.clone()
        for j, i in enumerate(range(rows.start, rows.stop)):
            k_pos, c_pos = all_pos[i]
            mapped[j, k_pos.to(device)] = clean_res[j, c_pos.to(device)]
        b = len(answers)
        per_run = max(1, int(rows_per_run) // b)
        cache = _last_token_cache(model, graph, corr) if recv is None and not full_runs and last_token_shortcut(model, graph) else None
        for start in range(0, len(senders), per_run):
            group = senders[start:start + per_run]
            if cache is not None:
                with torch.no_grad():
                    values = _to_logits_last_token(model, graph, corr, corr_res, mapped, group, answers, clean_last, metric, cache)
            else:
                values = _run_senders(model, graph, corr, corr_res, mapped, group, recv, answers, clean_last, metric)
            for g, (l, h) in enumerate(group):
                raw[l, h, rows] = values[g * b:(g + 1) * b].cpu()
    anchors = Anchors.from_values(clean_m, corr_m)
    if abs(anchors.clean - anchors.corrupted) < 1e-9:
        raise PipelineError("path patching: the clean and corrupted mean metric are equal, the normalized metric is undefined")
    return anchors.normalize(raw), anchors


def last_token_shortcut(model, graph: Graph) -> bool:
    """Whether _to_logits_last_token holds: sequential pre-norm blocks (an MLP reads ln2 of the
    residual stream after its attention), head outputs that add into the residual stream as they
    are, no norm after a sublayer and no cap on the logits. Other families (GPT-NeoX, GPT-J,
    Gemma 2, OLMo 2) run every patched forward in full."""
    block = model.blocks[0]
    return (not graph.parallel and graph.head_output == "result" and has_module(block, "ln2")
            and not has_module(block, "ln2_post") and output_soft_cap(model) is None)


def _to_logits_last_token(model, graph, corr, corr_res, mapped, group, answers, clean_last, metric, cache):
    """Path patching into the final residual stream without full forward passes. With every head
    frozen, positions only exchange information through attention, so the last token's residual
    stream moves only by the sender's own difference there and by what the MLPs of the sender's
    layer and later make of it at that position. So: start from the corrupted run's last-token
    residual at the sender's layer, add the sender's clean-minus-corrupted output, and run only
    the MLPs (through the model's own ln2 and mlp modules) and the final norm and unembedding at
    that one position. tests/test_circuit_stage.py checks it against full patched runs."""
    c, b = len(group), len(answers)
    rows = torch.arange(b, device=corr.tokens.device)
    last = corr.last
    delta = torch.zeros(c * b, model.cfg.d_model, device=corr.tokens.device)
    for g, (l, h) in enumerate(group):
        delta[g * b:(g + 1) * b] = (mapped[rows, last, l, h] - corr_res[rows, last, l, h])
    start = min(l for l, _ in group)
    first_layer = torch.tensor([l for l, _ in group], device=delta.device).repeat_interleave(b)
    for layer in range(start, graph.n_layers):
        active = (first_layer <= layer)[:, None]  # a sender's difference enters at its own layer
        mid = cache["mid"][layer].repeat(c, 1) + torch.where(active, delta, torch.zeros_like(delta))
        block = model.blocks[layer]
        out = block.mlp(block.ln2(mid[:, None].to(model.W_U.dtype)))[:, 0].float()
        delta = torch.where(active, delta + out - cache["mlp"][layer].repeat(c, 1), delta)
    final = cache["final"].repeat(c, 1) + delta
    normed = model.ln_final(final[:, None])[:, 0]
    b_U = getattr(model, "b_U", None)
    logits = normed @ model.W_U + (b_U if b_U is not None else 0)
    return metric_values(metric, logits, answers.repeat(c), clean_last.repeat(c, 1)).float()


def _last_token_cache(model, graph, corr) -> dict:
    """The corrupted run's residual stream before each MLP, each MLP's output and the final
    residual, at each prompt's last token."""
    keep = {"mid": {}, "mlp": {}}
    rows = torch.arange(len(corr.last), device=corr.tokens.device)

    def grab(kind, layer):
        def f(x, hook):
            keep[kind][layer] = x[rows, corr.last].detach().float()
            return x
        return f

    def grab_final(x, hook):
        keep["final"] = x[rows, corr.last].detach().float()
        return x

    hooks = [h for l in range(graph.n_layers) for h in ((f"blocks.{l}.hook_resid_mid", grab("mid", l)),
                                                         (graph.mlp_out_hook(l), grab("mlp", l)))]
    with torch.no_grad():
        last_token_logits(model, corr, [*hooks, (graph.logits_hook(), grab_final)])
    return keep


def _repeat(mb: PromptBatch, c: int) -> PromptBatch:
    return PromptBatch(mb.prompts * c, mb.tokens.repeat(c, 1), mb.attention_mask.repeat(c, 1), mb.last.repeat(c),
                       mb.role_labels * c, mb.str_tokens * c)


def _run_senders(model, graph, corr, corr_res, mapped, group, recv, answers, clean_last, metric):
    c, b = len(group), len(answers)
    batch = _repeat(corr, c)

    def freeze(layer):
        def f(x, hook):
            new = corr_res[:, :, layer].repeat(c, 1, 1, 1)
            for g, (l, h) in enumerate(group):
                if l == layer:
                    new[g * b:(g + 1) * b, :, h] = mapped[:, :, layer, h]
            return new.to(x.dtype)
        return f

    hooks = [(graph.head_out_hook(l), freeze(l)) for l in range(graph.n_layers)]
    if recv is None:
        with torch.no_grad():
            last = last_token_logits(model, batch, hooks)
    else:
        captured = {}

        def grab(key, index):
            def f(x, hook):
                captured[key] = x[:, :, index].clone()
                return x
            return f

        first = hooks + [(graph.in_hook(l, kind), grab((l, kind, i), i)) for l, kind, i in recv]
        with torch.no_grad():
            last_token_logits(model, batch, first)

        def put(key, index):
            def f(x, hook):
                x = x.clone()
                x[:, :, index] = captured[key].to(x.dtype)
                return x
            return f

        with torch.no_grad():
            last = last_token_logits(model, batch, [(graph.in_hook(l, kind), put((l, kind, i), i)) for l, kind, i in recv])
    return metric_values(metric, last, answers.repeat(c), clean_last.repeat(c, 1)).float()
