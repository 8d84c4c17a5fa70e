"""Batched forward passes: micro-batches, attention masks in every run, and each prompt's
real last token read out, so batched results equal one-prompt-at-a-time results."""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from pipeline.prompts import PromptBatch, micro_batches


def model_device(model) -> torch.device:
    return next(model.parameters()).device


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the final norm's output is known."""


_SHORTCUT_CHECKED: dict[int, bool] = {}


def _normed_residual(model, tokens: torch.Tensor, fwd_hooks=(), **kwargs) -> torch.Tensor:
    box = {}

    def grab(x, hook):
        box["x"] = x
        raise _StopForward

    try:
        model.run_with_hooks(tokens, fwd_hooks=[*fwd_hooks, ("ln_final.hook_out", grab)], **kwargs)
    except _StopForward:
        pass
    return box["x"]


def logits_at(model, tokens: torch.Tensor, where: torch.Tensor, fwd_hooks=(), **kwargs) -> torch.Tensor:
    """[batch, k, vocab] logits at positions where [batch, k] of each row (kwargs: attention_mask,
    position_ids), unembedding only those positions: the forward stops after the final norm (the
    vocabulary projection of every position is a fifth of a small model's work). Checked once per
    model against the full forward, which is used instead where they differ (models that
    transform logits after the unembedding)."""
    rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None]
    where = where.to(tokens.device)
    key = id(model)
    if key not in _SHORTCUT_CHECKED:
        with torch.no_grad():
            full = model(tokens, **kwargs)[rows, where]
            short = _unembed(model, _normed_residual(model, tokens, **kwargs)[rows, where])
        _SHORTCUT_CHECKED[key] = bool(torch.allclose(full, short, atol=1e-4, rtol=1e-4))
    if not _SHORTCUT_CHECKED[key]:
        return model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks), **kwargs)[rows, where]
    return _unembed(model, _normed_residual(model, tokens, fwd_hooks, **kwargs)[rows, where])


def last_token_logits(model, mb: PromptBatch, fwd_hooks=()) -> torch.Tensor:
    """[batch, vocab] logits at each prompt's real last token (`logits_at`)."""
    return logits_at(model, mb.tokens, mb.last[:, None], fwd_hooks, attention_mask=mb.attention_mask)[:, 0]


def _unembed(model, normed: torch.Tensor) -> torch.Tensor:
    b_U = getattr(model, "b_U", None)
    return normed @ model.W_U + (b_U if b_U is not None else 0)


def map_last_logits(
    model,
    batch: PromptBatch,
    batch_size: int,
    reduce: Callable[[torch.Tensor, slice], torch.Tensor],
    desc: str | None = None,
) -> torch.Tensor:
    """Run the model over `batch` in micro-batches and concatenate `reduce(last_logits, rows)`,
    where last_logits is [rows, vocab] at each prompt's real last token."""
    device = model_device(model)
    out = []
    chunks = list(micro_batches(len(batch), batch_size))
    with torch.no_grad():
        for rows in tqdm(chunks, desc=desc, disable=desc is None, leave=False):
            mb = batch.slice(rows).to(device)
            out.append(reduce(last_token_logits(model, mb).float(), rows).cpu())
    return torch.cat(out)


def sum_tolerance(dtype: torch.dtype, terms: torch.Tensor, float32_atol: float = 1e-3) -> float:
    """How far a float32 sum of per-component contributions `terms` [components, prompts] may be
    from the model's own number. In float32, `float32_atol`. A model run in half precision rounds
    its residual stream to the dtype's resolution at every addition, and the components were
    computed in that dtype, so the bound grows with the resolution (eps) times the size of what
    was summed: 2 eps * max over prompts of sum |terms|. (SmolLM2-135M in bfloat16, 16 prompts:
    gaps of 0.05-0.08 where eps * sum |terms| was 0.1-0.17.)"""
    if dtype in (torch.float32, torch.float64):
        return float32_atol
    return float32_atol + 2 * torch.finfo(dtype).eps * float(terms.abs().sum(0).max())
