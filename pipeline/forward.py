"""Batched forward passes: micro-batches, attention masks in every run, and each prompt's
real last token read out, so batched results equal one-prompt-at-a-time results."""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from pipeline.metrics import gather_last
from pipeline.prompts import PromptBatch, micro_batches


def model_device(model) -> torch.device:
    return next(model.parameters()).device


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
            logits = model(mb.tokens, attention_mask=mb.attention_mask)
            out.append(reduce(gather_last(logits, mb.last).float(), rows).cpu())
    return torch.cat(out)
