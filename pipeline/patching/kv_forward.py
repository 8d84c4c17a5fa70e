"""The model's blocks run from one position on: positions before `start` are taken from a recorded
run (their keys and values), only positions `start..` are computed, and patches are applied at the
points the sweeps patch (resid_pre, q/k/v, pattern, z, attn_out, mlp_out).

In a causal model a patch at position p (or a run that differs from the corrupted one only from p
on) leaves every earlier position as it was in the corrupted run, in every block; so a patched run
needs the corrupted run's keys and values of those positions, nothing else of them.

Written here because TransformerBridge's own key/value cache is not reachable from a block call in
this transformers version (blocks pass `cache=`, the bridge's attention reads `past_key_values`),
and a bridge block computes every input position. The norms, projections and MLPs are the bridge's
own modules; only the attention core (rotary, mask, softmax, weighted sum) is written here, for the
two block layouts it knows: GPT-2 (learned positions) and Llama (rotary, grouped-query attention),
which covers the embedded SmolLM2, gpt2-small, Qwen2, Mistral and Phi-3. `Recording.of` checks this
forward against the bridge's own run of the same prompts; where they differ (another layout), the
engine falls back to resuming the bridge's blocks, and says so in the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# Architectures with the block layout below (Qwen2 adds q/k/v biases inside its projections,
# Mistral a sliding window, which the agreement check of each micro-batch catches where it bites).
SUPPORTED = ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM")

# part -> where the forward below applies it (the bridge's hook of the same name)
Patcher = Callable[[str, torch.Tensor], torch.Tensor]


def unsupported_because(model) -> str | None:
    """Why this forward cannot stand in for the model's blocks, or None when it can."""
    cfg = model.cfg
    architecture = getattr(cfg, "architecture", None)
    if architecture not in SUPPORTED:
        return f"{architecture} is not one of the block layouts it knows (GPT-2's and Llama's: {', '.join(SUPPORTED)})"
    flags = [f for f in ("parallel_attn_mlp", "use_split_qkv_input", "use_attn_in", "use_attn_result",
                         "scale_attn_by_inverse_layer_idx") if getattr(cfg, f, False)]
    if flags:
        return f"the model has {', '.join(flags)} set"
    if getattr(cfg, "attn_scores_soft_cap", -1.0) > 0:
        return "the model soft-caps its attention scores"
    return None


def supported(model) -> bool:
    return unsupported_because(model) is None


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[b, 1, T, T] causal and padding mask: 0 where query q may read key k, the dtype's minimum
    elsewhere (the same mask TransformerBridge builds for a right-padded batch)."""
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class Recording:
    """One micro-batch's corrupted run: each block's input residual [b, T, d], keys after rotary
    and values [b, kv_heads, T, d_head], the additive mask [b, 1, T, T], rotary cos/sin [1|b, T, d_head]."""

    resid: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor] | None
    final: torch.Tensor  # [b, T, d] the last block's output

    @classmethod
    def of(cls, model, x0: torch.Tensor, attention_mask: torch.Tensor, rotary) -> "Recording":
        """Run every block from the block-0 input `x0`, keeping what later runs reuse."""
        rec = cls([], [], [], additive_mask(attention_mask, x0.dtype), rotary, x0)
        rows = torch.arange(x0.shape[0], device=x0.device)
        x = x0
        for layer in range(model.cfg.n_layers):
            rec.resid.append(x)
            x = block(model, layer, x, rec, rows, 0, None, keep=True)
        rec.final = x
        return rec


def run_from(model, rec: Recording, layer: int, rows: torch.Tensor, start: int, patch: Patcher | None,
             last: torch.Tensor) -> torch.Tensor:
    """[len(rows), d] output of the last block at each row's last position `last` when rows `rows`
    of the recording are rerun from block `layer` and position `start` with `patch` applied in
    block `layer`. The last block (when it holds no patch) computes keys and values of every
    position but queries, output projection and MLP only at the last token."""
    n_layers = model.cfg.n_layers
    x = rec.resid[layer][rows, start:]
    at = torch.arange(len(rows), device=x.device)
    for j in range(layer, n_layers):
        if j == n_layers - 1 and j != layer:
            return last_token_block(model, j, x, rec, rows, start, last - start)
        x = block(model, j, x, rec, rows, start, patch if j == layer else None)
    return x[at, last - start]


def head_shape(cfg) -> tuple[int, int, int]:
    """Query heads, key/value heads (fewer under grouped-query attention) and head size."""
    return cfg.n_heads, getattr(cfg, "n_key_value_heads", None) or cfg.n_heads, cfg.d_head


def block(model, j: int, x: torch.Tensor, rec: Recording, rows: torch.Tensor, start: int,
          patch: Patcher | None, keep: bool = False) -> torch.Tensor:
    """One pre-norm block (x + attn(ln1 x), then + mlp(ln2 x)) over positions start.. of `rows`."""
    patch = patch or (lambda _part, act: act)
    blk = model.blocks[j]
    attn = blk.attn
    n_heads, n_kv, d_head = head_shape(model.cfg)
    R, S, _ = x.shape

    x = patch("resid_pre", x)
    h = blk.ln1(x)
    q = patch("query", attn.q(h).reshape(R, S, n_heads, d_head)).transpose(1, 2)
    k = patch("key", attn.k(h).reshape(R, S, n_kv, d_head)).transpose(1, 2)
    v = patch("value", attn.v(h).reshape(R, S, n_kv, d_head)).transpose(1, 2)
    if rec.rotary is not None:
        cos, sin = (t[:, start:] if t.shape[0] == 1 else t[rows, start:] for t in rec.rotary)
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
    if keep:
        rec.keys.append(k)
        rec.values.append(v)
    k, v = with_recorded_prefix(rec, j, rows, start, k, v, n_heads // n_kv)
    scale = getattr(attn.original_component, "scaling", d_head ** -0.5)
    scores = (q @ k.transpose(-1, -2)) * scale + rec.mask[rows, :, start:].to(q.dtype)
    pattern = patch("pattern", torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
    z = patch("output", (pattern @ v).transpose(1, 2))
    x = x + patch("attn_out", attn.o(z.reshape(R, S, n_heads * d_head)))
    return x + patch("mlp_out", blk.mlp(blk.ln2(x)))


def with_recorded_prefix(rec: Recording, j: int, rows: torch.Tensor, start: int, k: torch.Tensor, v: torch.Tensor,
                         group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of block j over every position: the recorded corrupted ones before `start`,
    then the recomputed ones; each key/value head repeated for its `group` query heads (GQA)."""
    if start:
        k = torch.cat([rec.keys[j][rows, :, :start], k], dim=2)
        v = torch.cat([rec.values[j][rows, :, :start], v], dim=2)
    if group != 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return k, v


def last_token_block(model, j: int, x: torch.Tensor, rec: Recording, rows: torch.Tensor, start: int,
                     query: torch.Tensor) -> torch.Tensor:
    """`block` without patches, its output only at position `query` [R] (relative to `start`) of
    each row: [R, d]."""
    blk = model.blocks[j]
    attn = blk.attn
    n_heads, n_kv, d_head = head_shape(model.cfg)
    R, S, _ = x.shape
    at = torch.arange(R, device=x.device)
    h = blk.ln1(x)
    x_q, h_q = x[at, query][:, None], h[at, query][:, None]  # [R, 1, d]
    q = attn.q(h_q).reshape(R, 1, n_heads, d_head).transpose(1, 2)
    k = attn.k(h).reshape(R, S, n_kv, d_head).transpose(1, 2)
    v = attn.v(h).reshape(R, S, n_kv, d_head).transpose(1, 2)
    if rec.rotary is not None:
        cos, sin = (t[:, start:] if t.shape[0] == 1 else t[rows, start:] for t in rec.rotary)
        cos, sin = cos.expand(R, -1, -1).to(q.dtype), sin.expand(R, -1, -1).to(q.dtype)
        q = q * cos[at, query][:, None, None] + rotate_half(q) * sin[at, query][:, None, None]
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    k, v = with_recorded_prefix(rec, j, rows, start, k, v, n_heads // n_kv)
    scale = getattr(attn.original_component, "scaling", d_head ** -0.5)
    mask = rec.mask[rows, :, start + query][:, :, None].to(q.dtype)  # [R, 1, 1, T]
    scores = (q @ k.transpose(-1, -2)) * scale + mask
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    z = (pattern @ v).transpose(1, 2)  # [R, 1, heads, d_head]
    x_q = x_q + attn.o(z.reshape(R, 1, n_heads * d_head))
    return (x_q + blk.mlp(blk.ln2(x_q)))[:, 0]
