"""Attribution patching: the first-order (gradient) approximation of activation patching.

One clean run and one corrupted run with gradients per micro-batch estimate every cell at once:
patched metric ~ corrupted metric + (clean - corrupted activation) . d(metric)/d(activation), summed
over the positions the exact patch would copy (role-matched); the metric is the run's linear one
(pipeline/metrics.py).

TransformerLens's `tools.analysis.attribution_patching` scores residual-stream nodes and edges
of one clean/corrupted batch of equal shapes; it has no per-prompt role alignment for padded
prompts of different lengths or the q/k/v/pattern parts, so the estimate is written here on the
same hooks and position maps as the exact engine.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from pipeline.forward import last_token_logits, model_device
from pipeline.patching.sweeps import PARTS, all_position_pairs, axis_size
from pipeline.prompts import PairedPrompts, length_order, micro_batches


def estimate(model, pairs: PairedPrompts, parts: list[str], batch_size: int, desc: str | None = None) -> dict[str, torch.Tensor]:
    """Estimated patched metric {part: [layer, role-or-head, prompt]} (NaN where a
    prompt lacks the role)."""
    device = model_device(model)
    n_layers = model.cfg.n_layers
    hooks = {PARTS[p][0].format(layer=l) for p in parts for l in range(n_layers)}
    out = {p: torch.full((n_layers, axis_size(model, pairs, PARTS[p][1]), len(pairs)), float("nan")) for p in parts}
    k_all, c_all, valid_all = padded_positions(all_position_pairs(pairs))
    grads_were = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # gradients w.r.t. activations only
    try:
        # Prompts of similar length share a micro-batch: in dataset order (templates interleaved)
        # a fifth of the tokens run would be padding.
        order = length_order(pairs.clean, pairs.corrupted)
        for chunk in tqdm(list(micro_batches(len(pairs), batch_size)), desc=desc, disable=desc is None, leave=False):
            idx = order[chunk]
            rows = torch.tensor(idx, dtype=torch.long)
            clean = pairs.clean.take(idx).to(device)
            corrupted = pairs.corrupted.take(idx).to(device)
            answers = pairs.answers[rows].to(device)
            with torch.no_grad():
                _, clean_cache = model.run_with_cache(clean.tokens, attention_mask=clean.attention_mask,
                                                      names_filter=lambda n: n in hooks)
            saved = {}

            def keeper(name):  # keyed by the name we asked for (the bridge may report an alias)
                def keep(act, hook):
                    act.retain_grad()
                    saved[name] = act
                    return act  # returning it keeps it in the graph (the bridge drops a None result's tensor)
                return keep

            def leaf(x, hook):  # the embedding becomes a leaf that requires grad
                return x.detach().requires_grad_(True)

            with torch.enable_grad():
                last_logits = last_token_logits(model, corrupted, [("hook_embed", leaf)] + [(h, keeper(h)) for h in sorted(hooks)])
                ld = answers.values(last_logits)
                ld.sum().backward()  # prompts do not interact, so each row's gradient is its own
            ld = ld.detach().cpu()
            with torch.no_grad():
                for part in parts:
                    for layer in range(n_layers):
                        name = PARTS[part][0].format(layer=layer)
                        delta = estimate_cell_changes(part, clean_cache[name].detach(), saved[name].detach(), saved[name].grad,
                                                      pairs.clean_pos[rows], pairs.corrupted_pos[rows],
                                                      k_all[rows], c_all[rows], valid_all[rows])
                        out[part][layer, :, rows] = ld[None, :] + delta.detach().cpu()
            del saved, clean_cache, last_logits
    finally:
        for p, g in zip(model.parameters(), grads_were):
            p.requires_grad_(g)
    return out


def padded_positions(all_pos: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`all_position_pairs` as [prompts, width] corrupted and clean positions and a mask of the real
    entries (padding points at position 0), so every prompt's cells are read in one indexing."""
    width = max((len(k) for k, _ in all_pos), default=0)
    k_idx = torch.zeros((len(all_pos), width), dtype=torch.long)
    c_idx = torch.zeros_like(k_idx)
    valid = torch.zeros((len(all_pos), width), dtype=torch.bool)
    for i, (k, c) in enumerate(all_pos):
        k_idx[i, : len(k)], c_idx[i, : len(c)], valid[i, : len(k)] = k, c, True
    return k_idx, c_idx, valid


def estimate_cell_changes(part, clean, corrupted, grad, clean_pos, corrupted_pos, k_idx, c_idx, valid) -> torch.Tensor:
    """First-order change of the metric for every cell of one layer: [roles-or-heads, b].
    Role parts read each prompt's role positions (clean_pos / corrupted_pos, -1: no such role, NaN);
    head parts sum over the positions k_idx / c_idx [b, width] where `valid` (padded_positions)."""
    clean, corrupted, grad = clean.float(), corrupted.float(), grad.float()  # accumulate in float32 whatever the model's dtype
    dev = grad.device
    rows = torch.arange(corrupted.shape[0], device=dev)[:, None]
    if PARTS[part][1] == "role":
        has = (clean_pos >= 0).to(dev)
        c, k = clean_pos.clamp(min=0).to(dev), corrupted_pos.clamp(min=0).to(dev)
        change = ((clean[rows, c] - corrupted[rows, k]) * grad[rows, k]).sum(-1)  # [b, roles]
        return change.masked_fill(~has, float("nan")).T
    k_idx, c_idx, valid = k_idx.to(dev), c_idx.to(dev), valid.to(dev)
    if part == "pattern":  # [b, heads, q, k]: indexing dims 0, 2, 3 gives [b, width, width, heads]
        r = rows[:, :, None]
        kq, kk, cq, ck = k_idx[:, :, None], k_idx[:, None, :], c_idx[:, :, None], c_idx[:, None, :]
        both = (valid[:, :, None] & valid[:, None, :])[..., None]
        return ((clean[r, :, cq, ck] - corrupted[r, :, kq, kk]) * grad[r, :, kq, kk] * both).sum((1, 2)).T
    # [b, pos, heads, d_head] -> [b, width, heads, d_head]
    return ((clean[rows, c_idx] - corrupted[rows, k_idx]) * grad[rows, k_idx] * valid[:, :, None, None]).sum((1, 3)).T
