"""Direct logit attribution on each prompt's own logit-difference direction, read at each
prompt's real last token with the final norm's scale of that prompt applied.

TransformerLens's `ActivationCache.accumulated_resid` / `decompose_resid` give the residual
stacks; its `apply_ln_to_stack(pos_slice=...)` takes one position for the whole batch, which is
wrong for right-padded prompts of different lengths, so the scale is gathered per prompt here.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from pipeline.forward import model_device
from pipeline.metrics import gather_last, logit_diff, logit_diff_directions
from pipeline.prompts import PromptBatch, micro_batches

CACHED_HOOKS = ("hook_embed", "hook_pos_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post",
                "hook_attn_out", "hook_mlp_out", "attn.hook_z", "attn.hook_pattern", "ln_final.hook_scale")


def apply_final_ln_scale(model, stack: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """stack [..., batch, d_model] at the last token, scale [batch, 1] of the final norm."""
    if model.cfg.normalization_type in ("LN", "LNPre"):
        stack = stack - stack.mean(-1, keepdim=True)
    return stack / scale


def attribute(model, batch: PromptBatch, answers: torch.Tensor, batch_size: int, desc: str | None = None) -> dict:
    """Per-prompt attributions [components, n]: `logit_lens` (accumulated residual, incl_mid),
    `layer` (decompose_resid terms plus the unembedding bias, summing to the model's logit
    difference), `head` [n_layers, n_heads, n], and `model_logit_diff` [n]; plus
    `last_attention`, each prompt's last-token attention over its real positions
    [n_layers, n_heads, n_tokens], kept from the same pass for the attention figures."""
    device = model_device(model)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    W_O = model.W_O  # [layers, heads, d_head, d_model]
    out = {"logit_lens": [], "layer": [], "head": [], "model_logit_diff": []}
    labels, last_attention = {}, []
    with torch.no_grad():
        for rows in tqdm(list(micro_batches(len(batch), batch_size)), desc=desc, disable=desc is None, leave=False):
            mb = batch.slice(rows).to(device)
            logits, cache = model.run_with_cache(mb.tokens, attention_mask=mb.attention_mask,
                                                 names_filter=lambda name: name.endswith(CACHED_HOOKS))
            direction, bias = (t.float() for t in logit_diff_directions(model, answers[rows]))
            ar = torch.arange(len(mb), device=device)
            scale = cache["ln_final.hook_scale"][ar, mb.last].float()  # [b, 1]

            def project(stack):  # [c, b, pos, d] -> [c, b] logit difference at each prompt's last token
                last = stack[:, ar, mb.last].float()  # accumulate in float32 whatever the model's dtype
                return (apply_final_ln_scale(model, last, scale) * direction).sum(-1)

            acc, labels["logit_lens"] = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=None, return_labels=True)
            out["logit_lens"].append(project(acc) + bias)
            dec, dec_labels = cache.decompose_resid(layer=-1, pos_slice=None, return_labels=True)
            labels["layer"] = dec_labels + ["unembed_bias"]
            out["layer"].append(torch.cat([project(dec), bias[None]]))
            heads = []
            for layer in range(n_layers):
                z_last = cache[f"blocks.{layer}.attn.hook_z"][ar, mb.last].float()  # [b, heads, d_head]
                per_head = torch.einsum("bhk,hkd->hbd", z_last, W_O[layer].float())  # each head's write, no bias
                heads.append((apply_final_ln_scale(model, per_head, scale) * direction).sum(-1))
            out["head"].append(torch.stack(heads))
            out["model_logit_diff"].append(logit_diff(gather_last(logits, mb.last).float(), answers[rows]))
            patterns = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][ar, :, mb.last] for l in range(n_layers)], 1)
            last_attention += [patterns[i, :, :, : int(mb.last[i]) + 1].float().cpu() for i in range(len(mb))]
    result = {k: torch.cat(v, dim=-1).float().cpu() for k, v in out.items()}
    assert result["head"].shape[:2] == (n_layers, n_heads)
    result["labels"] = labels
    result["last_attention"] = last_attention
    return result


def full_attention(model, batch: PromptBatch, index: int, heads: list[tuple[int, int]]) -> torch.Tensor:
    """[len(heads), n_tokens, n_tokens] attention patterns of one prompt (no padding)."""
    one = batch.slice(slice(index, index + 1)).to(model_device(model))
    names = {f"blocks.{l}.attn.hook_pattern" for l, _ in heads}
    with torch.no_grad():
        _, cache = model.run_with_cache(one.tokens, attention_mask=one.attention_mask, names_filter=lambda n: n in names)
    return torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0, h] for l, h in heads]).float().cpu()
