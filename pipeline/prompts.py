"""Prompt batches that stay correct when prompts differ in token length (DESIGN.md).

- Prompts are right-padded; `last` holds each prompt's real last token, which every metric reads.
- `attention_mask` goes into every model run (including patched runs).
- Every token gets a role: `pre<i>` for template-prefix tokens counted from the start (pre0 is
  BOS), `utt_first` / `utt_last` for the utterance's first and last tokens (`utt_mid` for the
  ones between, which have no counterpart on the other side), and `suf-<k>` for template-suffix
  tokens counted from the end (`suf-1` is the final token). Clean and corrupted positions are
  matched by role, never by raw index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from pipeline.errors import PipelineError
from pipeline.metrics import AnswerWeights


@dataclass
class PromptBatch:
    """One side (clean or corrupted) of a dataset, tokenized."""

    prompts: list[str]
    tokens: torch.Tensor  # [n, max_len], right-padded
    attention_mask: torch.Tensor  # [n, max_len], 1 on real tokens
    last: torch.Tensor  # [n], index of the real last token
    role_labels: list[list[str]]  # role of every real token
    str_tokens: list[list[str]]

    def __len__(self) -> int:
        return len(self.prompts)

    def roles(self, i: int) -> dict[str, int]:
        """Role -> position for the matchable roles of prompt i."""
        return {r: p for p, r in enumerate(self.role_labels[i]) if r != "utt_mid"}

    def slice(self, idx: slice) -> "PromptBatch":
        """A micro-batch, trimmed to its own longest prompt."""
        return self.take(range(len(self))[idx])

    def take(self, index) -> "PromptBatch":
        """The prompts at `index`, in that order, trimmed to their longest."""
        index = list(index)
        idx = torch.as_tensor(index, dtype=torch.long)
        width = int(self.last[idx].max()) + 1
        return PromptBatch([self.prompts[i] for i in index], self.tokens[idx, :width], self.attention_mask[idx, :width],
                           self.last[idx], [self.role_labels[i] for i in index], [self.str_tokens[i] for i in index])

    def to(self, device) -> "PromptBatch":
        return PromptBatch(self.prompts, self.tokens.to(device), self.attention_mask.to(device),
                           self.last.to(device), self.role_labels, self.str_tokens)


def split_with_template(prompt: str, templates: list[str]) -> tuple[str, str, str] | None:
    """(prefix, utterance, suffix) if the prompt fills one of the templates."""
    for template in templates:
        before, after = template.split("{}")
        m = re.fullmatch(re.escape(before.rstrip()) + r"\s*(.+?)\s*" + re.escape(after.lstrip()), prompt)
        if m:
            return prompt[: m.start(1)], m.group(1), prompt[m.end(1):]
    return None


def split_by_difference(a: str, b: str) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """Split two matched prompts where they differ, snapped to word boundaries: the shared start
    is the prefix, the shared end the suffix, the rest each side's utterance."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    n = max(a.rfind(" ", 0, n + 1) + 1, 0) if n < min(len(a), len(b)) else n
    m = 0
    while m < min(len(a), len(b)) - n and a[len(a) - 1 - m] == b[len(b) - 1 - m]:
        m += 1
    tail_a = a[len(a) - m:]
    cut = tail_a.find(" ") if m and not tail_a.startswith(" ") and len(a) - m > n else 0
    m = m - max(cut, 0)
    sa = (a[:n], a[n: len(a) - m], a[len(a) - m:])
    sb = (b[:n], b[n: len(b) - m], b[len(b) - m:])
    return sa, sb


def assign_roles(offsets: list[tuple[int, int]], prefix_len: int, utt_end: int, n_special: int) -> list[str]:
    """Role of each token from its character span (a token belongs where its last char falls)."""
    zones = []
    for start, end in offsets:
        last_char = max(end - 1, start)
        zones.append("pre" if last_char < prefix_len else "utt" if last_char < utt_end else "suf")
    labels = [f"pre{i}" for i in range(n_special)]
    n_pre = n_special + zones.count("pre")
    utt_idx = [i for i, z in enumerate(zones) if z == "utt"]
    n_suf = zones.count("suf")
    for i, zone in enumerate(zones):
        if zone == "pre":
            labels.append(f"pre{n_special + i}")
        elif zone == "utt":
            labels.append("utt_first" if i == utt_idx[0] else "utt_last" if i == utt_idx[-1] else "utt_mid")
        else:
            labels.append(f"suf-{len(zones) - i}")
    assert len(labels) == n_pre + len(utt_idx) + n_suf
    return labels


def tokenize(model, prompts: list[str], splits: list[tuple[str, str, str]], prepend_bos: bool) -> PromptBatch:
    """Tokenize like `model.to_tokens` (BOS, then the text), right-pad, and label roles."""
    tok = model.tokenizer
    rows, labels, strs = [], [], []
    for prompt, (prefix, utt, _suffix) in zip(prompts, splits):
        enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids = ([tok.bos_token_id] if prepend_bos else []) + list(enc["input_ids"])
        roles = assign_roles(enc["offset_mapping"], len(prefix), len(prefix) + len(utt), int(prepend_bos))
        if "utt_first" not in roles:
            raise PipelineError(f"prompt has no utterance tokens between its template parts: {prompt!r}")
        rows.append(ids)
        labels.append(roles)
        strs.append([tok.decode([i]) for i in ids])
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    last = mask.sum(1) - 1
    return PromptBatch(list(prompts), tokens, mask, last, labels, strs)


def single_token_ids(model, words: list[str]) -> tuple[dict[str, int], list[str]]:
    """Token id of ' word' for each word that is one token; and the words that are not."""
    ids, bad = {}, []
    for w in words:
        enc = model.tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        if len(enc) == 1:
            ids[w] = enc[0]
        else:
            bad.append(w)
    return ids, bad


@dataclass
class PairedPrompts:
    """Clean and corrupted prompts of one direction, the metric's answer tokens and weights
    (pipeline/metrics.py AnswerWeights), and the role alignment."""

    clean: PromptBatch
    corrupted: PromptBatch
    answers: AnswerWeights  # [n, K] tokens and weights, oriented to this direction
    answer_strs: list[tuple[str, ...]]  # each prompt's answer tokens as text, in the order of answers.tokens
    role_names: list[str] = field(default_factory=list)  # ordered roles present on both sides
    clean_pos: torch.Tensor | None = None  # [n, R], -1 where a prompt lacks the role
    corrupted_pos: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.clean)

    def head(self, n: int) -> "PairedPrompts":
        """The first n prompts (the patching subset), with the same role columns."""
        def cut(b: PromptBatch) -> PromptBatch:
            return PromptBatch(b.prompts[:n], b.tokens[:n], b.attention_mask[:n], b.last[:n], b.role_labels[:n], b.str_tokens[:n])

        return PairedPrompts(cut(self.clean), cut(self.corrupted), self.answers[:n], self.answer_strs[:n],
                             self.role_names, self.clean_pos[:n], self.corrupted_pos[:n])

    def role_label(self, r: int) -> str:
        """Role name with the token it holds in the first prompt that has it, for axes."""
        name = self.role_names[r]
        for i in range(len(self)):
            p = int(self.clean_pos[i, r])
            if p >= 0:
                return f"{name} {self.clean.str_tokens[i][p]!r}"
        return name


def role_sort_key(role: str) -> tuple[int, int]:
    if role.startswith("pre"):
        return (0, int(role[3:]))
    if role == "utt_first":
        return (1, 0)
    if role == "utt_last":
        return (1, 1)
    return (2, int(role[3:]))  # suf-k: larger k first


def align_roles(clean: PromptBatch, corrupted: PromptBatch) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Roles present in both sides of at least one pair, and each prompt's position of each."""
    per_prompt = [(clean.roles(i), corrupted.roles(i)) for i in range(len(clean))]
    names = sorted({r for a, b in per_prompt for r in a if r in b}, key=role_sort_key)
    cpos = torch.full((len(clean), len(names)), -1, dtype=torch.long)
    kpos = torch.full((len(clean), len(names)), -1, dtype=torch.long)
    for i, (a, b) in enumerate(per_prompt):
        for r, name in enumerate(names):
            if name in a and name in b:
                cpos[i, r], kpos[i, r] = a[name], b[name]
    return names, cpos, kpos


def length_order(*batches: PromptBatch) -> list[int]:
    """Prompt indices sorted by length (the longest of each prompt's versions in `batches`), so
    that micro-batches taken in this order hold prompts of similar length and little padding."""
    longest = torch.stack([b.last for b in batches]).amax(0)
    return sorted(range(len(longest)), key=lambda i: int(longest[i]))


def micro_batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
