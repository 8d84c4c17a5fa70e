"""The notebook's four sweeps, as parts that each patch one activation kind, and the small patch
setters that copy clean activations into the corrupted run at role-matched positions.

Like TransformerLens's `patching.py` (one generic loop, one setter per activation shape), but
positions come from the role alignment of each prompt, since clean and corrupted prompts may
differ in token length and sit in right-padded batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError
from pipeline.prompts import PairedPrompts

# part -> (hook name pattern, axis it sweeps besides the layer)
PARTS = {
    "resid_pre": ("blocks.{layer}.hook_resid_pre", "role"),
    "attn_out": ("blocks.{layer}.hook_attn_out", "role"),
    "mlp_out": ("blocks.{layer}.hook_mlp_out", "role"),
    "output": ("blocks.{layer}.attn.hook_z", "head"),
    "query": ("blocks.{layer}.attn.hook_q", "head"),
    "key": ("blocks.{layer}.attn.hook_k", "kv_head"),
    "value": ("blocks.{layer}.attn.hook_v", "kv_head"),
    "pattern": ("blocks.{layer}.attn.hook_pattern", "head"),
}

SWEEPS = {
    "resid_pre": ["resid_pre"],
    "block": ["resid_pre", "attn_out", "mlp_out"],
    "head_out": ["output"],
    "head_parts": ["output", "query", "key", "value", "pattern"],
}

PART_TITLES = {"resid_pre": "Residual stream", "attn_out": "Attn output", "mlp_out": "MLP output",
               "output": "Output", "query": "Query", "key": "Key", "value": "Value", "pattern": "Pattern"}


def check_sweeps(names) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in SWEEPS]
    if unknown:
        raise PipelineError(f"patching.sweeps: unknown sweep(s) {unknown}; choose from {', '.join(SWEEPS)}")
    return names


@dataclass(frozen=True)
class Cell:
    """One patch: an activation kind at one layer, at one role (all heads) or one head (all positions)."""

    part: str
    layer: int
    index: int  # role index or head index

    @property
    def hook(self) -> str:
        return PARTS[self.part][0].format(layer=self.layer)

    @property
    def axis(self) -> str:
        return PARTS[self.part][1]


def axis_size(model, pairs: PairedPrompts, axis: str) -> int:
    if axis == "role":
        return len(pairs.role_names)
    if axis == "kv_head":
        return getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads
    return model.cfg.n_heads


def cells_of(model, pairs: PairedPrompts, part: str) -> list[Cell]:
    n = axis_size(model, pairs, PARTS[part][1])
    return [Cell(part, layer, i) for layer in range(model.cfg.n_layers) for i in range(n)]


def all_position_pairs(pairs: PairedPrompts) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For "all positions" patches: each prompt's (corrupted positions, clean positions) over every
    matched role, plus the utterance's middle tokens by offset when both utterances have the same
    token count (so equal-length prompts match at every position)."""
    out = []
    for i in range(len(pairs)):
        k_pos, c_pos = [], []
        for r in range(len(pairs.role_names)):
            if pairs.clean_pos[i, r] >= 0:
                k_pos.append(int(pairs.corrupted_pos[i, r]))
                c_pos.append(int(pairs.clean_pos[i, r]))
        c_mid = [p for p, role in enumerate(pairs.clean.role_labels[i]) if role == "utt_mid"]
        k_mid = [p for p, role in enumerate(pairs.corrupted.role_labels[i]) if role == "utt_mid"]
        if len(c_mid) == len(k_mid):
            k_pos += k_mid
            c_pos += c_mid
        out.append((torch.tensor(k_pos, dtype=torch.long), torch.tensor(c_pos, dtype=torch.long)))
    return out


def patch_role(act: torch.Tensor, clean: torch.Tensor, rows: torch.Tensor, clean_rows: torch.Tensor,
               k_pos: torch.Tensor, c_pos: torch.Tensor) -> torch.Tensor:
    """act [b, pos, ...]: row rows[j] at position k_pos[j] takes clean row clean_rows[j] at c_pos[j]."""
    act = act.clone()
    act[rows, k_pos] = clean[clean_rows, c_pos].to(act.dtype)
    return act


def patch_head_vector(act, clean, rows, clean_rows, k_pos, c_pos, head) -> torch.Tensor:
    """act [b, pos, head, d_head]: a head (an int, or one per entry) at matched positions (flattened index lists)."""
    act = act.clone()
    act[rows, k_pos, head] = clean[clean_rows, c_pos, head].to(act.dtype)
    return act


def patch_head_pattern(act, clean, rows, clean_rows, k_pos, c_pos, head) -> torch.Tensor:
    """act [b, head, query, key]: a head's pattern (an int, or one per entry) at matched (query,
    key) pairs; index lists are the flattened outer products per prompt."""
    act = act.clone()
    kq, kk = k_pos
    cq, ck = c_pos
    act[rows, head, kq, kk] = clean[clean_rows, head, cq, ck].to(act.dtype)
    return act
