"""What the analyses need to know about a model's blocks beyond TransformerLens's hook names.

Three layouts differ from GPT-2's sequential pre-norm block, x + attn(ln1 x), then + mlp(ln2 x):
- parallel blocks (GPT-NeoX/Pythia, GPT-J): x + attn(ln1 x) + mlp(ln2 x), the MLP reading the
  block's input, not the attention's output; there is no residual stream between the two
  (`hook_resid_mid`). GPT-J's attention and MLP share one norm (no ln2).
- a norm after the attention (Gemma 2, OLMo 2: `ln1_post`): the heads' outputs are summed, then
  normalised, so a head's write into the residual stream is its output times the norm's gain over
  the norm's scale at that position, a scale the heads share. With that scale held at its value in
  the run, the heads' writes sum to the attention output exactly, as the final norm's scale is held
  in direct logit attribution.
- attention without per-head output or per-head input hooks in the bridge (GPT-J's
  AttentionBridge: `set_use_attn_result` and `set_use_split_qkv_input` raise): a head's output is
  its `z` times its W_O, and the heads' query, key and value inputs are one input with the MLP's.
"""

from __future__ import annotations

import torch


def parallel(model) -> bool:
    """Attention and MLP read the same block input (no `hook_resid_mid`)."""
    return bool(getattr(model.cfg, "parallel_attn_mlp", False))


def has_module(module, name: str) -> bool:
    """Whether a bridge component has a submodule `name` (the bridge raises AttributeError for
    one it lacks)."""
    try:
        getattr(module, name)
    except AttributeError:
        return False
    return True


def shared_norm(model) -> bool:
    """Parallel blocks whose attention and MLP read one normalised input (GPT-J)."""
    return parallel(model) and not has_module(model.blocks[0], "ln2")


def post_attention_norm(model, layer: int):
    """The norm applied to the summed head outputs of `layer` before they join the residual
    stream, or None (pre-norm models)."""
    block = model.blocks[layer]
    return block.ln1_post if has_module(block, "ln1_post") else None


def norm_gain(norm) -> torch.Tensor:
    """[d_model] the elementwise gain of an RMS norm (its weight, or 1 + weight for Gemma's),
    read from the module itself: on a constant input c the RMS is c up to the norm's epsilon,
    so the output is the gain (relative error eps / c^2, 1e-12 here)."""
    if "RMS" not in type(norm).__name__:
        raise ValueError(f"a post-attention {type(norm).__name__} is not an RMS norm; its gain cannot be read this way")
    for p in norm.parameters():
        like = p
        break
    else:
        raise ValueError("a norm without parameters has no gain to read")
    d = like.shape[-1]
    with torch.no_grad():
        return norm(torch.full((1, 1, d), 1e3, dtype=like.dtype, device=like.device))[0, 0].detach()


def post_norm_gains(model) -> list[torch.Tensor | None]:
    """Each layer's post-attention norm gain [d_model] (float32), or None per layer without one."""
    out = []
    for layer in range(model.cfg.n_layers):
        norm = post_attention_norm(model, layer)
        out.append(None if norm is None else norm_gain(norm).float())
    return out


def head_writes(z: torch.Tensor, W_O: torch.Tensor, gain: torch.Tensor | None = None,
                scale: torch.Tensor | None = None) -> torch.Tensor:
    """Each head's write into the residual stream [..., heads, d_model] from its z [..., heads,
    d_head] and W_O [heads, d_head, d_model], without the output bias; through a post-attention
    norm (gain [d_model], scale [..., 1] at the same positions) when the layer has one."""
    out = torch.einsum("...hk,hkd->...hd", z.float(), W_O.float())
    if gain is not None:
        out = out * gain / scale.float()[..., None, :]
    return out


def output_soft_cap(model) -> float | None:
    """Gemma 2's cap on the output logits (logits = cap * tanh(logits / cap)), or None. A logit
    difference is then not linear in the final residual stream: direct logit attribution
    decomposes the logits before the cap, and a metric read from the residual stream applies it."""
    cap = float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0)
    return cap if cap > 0 else None


def soft_capped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else cap * torch.tanh(logits / cap)


_DISCARDS_PATTERN: dict[int, bool] = {}


def discards_pattern_edits(model) -> bool:
    """Whether the bridge ignores an edited attention pattern (GPT-J's AttentionBridge lets the
    Hugging Face module compute the attention and fires `hook_pattern` afterwards; TransformerLens
    warns and discards the edit). Checked once per model: a short forward with block 0's pattern
    made uniform must change the logits."""
    key = id(model)
    if key not in _DISCARDS_PATTERN:
        device = next(model.parameters()).device
        tokens = torch.arange(100, 106, device=device)[None]

        def uniform(pattern, hook):
            causal = torch.ones_like(pattern).tril()
            return causal / causal.sum(-1, keepdim=True)

        import warnings

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the bridge's own warning about the discarded edit
            plain = model(tokens)
            edited = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", uniform)])
        _DISCARDS_PATTERN[key] = bool(torch.equal(plain, edited))
    return _DISCARDS_PATTERN[key]
