"""log p(attribute | prompt) for attributes of any token length, batched with masks.

An attribute is scored with its leading space (` lazy`, ` happy-go-lucky`, ` police officer`), as
the probability of its whole token sequence by the chain rule:

    log p(a | prompt) = sum_j log p(a_j | prompt, a_1 .. a_{j-1})

One forward per micro-batch of prompts scores every attribute. Each row holds a prompt followed
by the tokens of every multi-token attribute except its last, laid out as a tree: a continuation
sees the prompt and its own earlier tokens only (a 4D attention mask), and its tokens get the
positions they would have right after the prompt (explicit position ids). So each row computes
exactly what the prompt followed by one attribute would compute, for all attributes at once. The
first token of every attribute is read at the prompt's real last token. The work per prompt is
its own tokens plus sum over multi-token attributes of (tokens - 1): the least any exact
chain-rule scoring runs; running "prompt + attribute" once per attribute repeats the prompt for
every attribute instead.

Why not TransformerLens's KV-cache entry point (`past_key_values`, which would also reuse the
prompt): with transformers 5.x the model layers receive the cache under the new keyword `cache`,
which the bridge's attention components do not read, so the cache stays empty and the
continuation silently ignores the prompt (checked against TransformerLens 4.3 / transformers 5.24).
The 4D mask is HuggingFace's documented "custom 4D mask", given in its additive form, which the
bridge applies as given; the scores are checked once per model against plain forward passes
(`_check_against_plain`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pipeline.errors import PipelineError
from pipeline.forward import logits_at, model_device
from pipeline.prompts import PromptBatch, length_order, micro_batches

PROMPT, PAD = -1, -2  # segment ids: a prompt token, padding; continuations are numbered 0, 1, ...
MAX_ROW_TOKENS = 512  # longest packed row; more continuations than fit go in further rows


@dataclass
class AttributeTokens:
    """Each attribute's token ids, with the leading space the model sees."""

    names: list[str]
    ids: list[list[int]]

    @property
    def one_token(self) -> list[bool]:
        return [len(t) == 1 for t in self.ids]

    def pieces(self, name: str, tokenizer) -> list[str]:
        return [tokenizer.decode([t]) for t in self.ids[self.names.index(name)]]


def attribute_tokens(model, names: list[str]) -> AttributeTokens:
    ids = [model.tokenizer(" " + a, add_special_tokens=False)["input_ids"] for a in names]
    empty = [a for a, t in zip(names, ids) if not t]
    if empty:
        raise PipelineError(f"attributes with no tokens for this model's tokenizer: {empty}")
    return AttributeTokens(list(names), [list(t) for t in ids])


def continuation_groups(ids: list[list[int]], room: int) -> list[list[int]]:
    """Indices of the multi-token attributes, split into groups whose appended tokens (each
    attribute's tokens but its last) fit in `room` positions after a prompt."""
    groups, current, used = [], [], 0
    for k, toks in enumerate(ids):
        need = len(toks) - 1
        if need == 0:
            continue
        if current and used + need > room:
            groups.append(current)
            current, used = [], 0
        current.append(k)
        used += need
    return groups + [current] if current else groups or [[]]


def packed_rows(mb: PromptBatch, ids: list[list[int]], group: list[int], pad_id: int):
    """Tokens, position ids, 4D attention mask of the rows `prompt + continuations of group`, and
    for every appended token: its offset after the prompt, the token it predicts and its attribute."""
    lengths = (mb.last + 1).tolist()
    offsets, targets, owners, segments, tokens = [], [], [], [], []
    for k in group:
        start = len(tokens)
        tokens.extend(ids[k][:-1])
        segments.extend([k] * (len(ids[k]) - 1))
        offsets.extend(range(start, len(tokens)))
        targets.extend(ids[k][1:])
        owners.extend([k] * (len(ids[k]) - 1))
    width = max(lengths) + len(tokens)
    n = len(lengths)
    row_tokens = torch.full((n, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), PAD, dtype=torch.long)
    appended = torch.tensor(tokens, dtype=torch.long)
    for i, length in enumerate(lengths):
        row_tokens[i, :length] = mb.tokens[i, :length]
        positions[i, :length] = torch.arange(length)
        segment[i, :length] = PROMPT
        if tokens:
            row_tokens[i, length: length + len(tokens)] = appended
            positions[i, length: length + len(tokens)] = length + _positions_within(ids, group)
            segment[i, length: length + len(tokens)] = torch.tensor(segments)
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal & ((key == PROMPT) | (key == query)) & (key != PAD)
    mask |= torch.eye(width, dtype=torch.bool)  # a pad row attends to itself: no row without keys
    return row_tokens, positions, mask[:, None], torch.tensor(offsets, dtype=torch.long), \
        torch.tensor(targets, dtype=torch.long), torch.tensor(owners, dtype=torch.long)


def additive(mask: torch.Tensor, model) -> torch.Tensor:
    """A boolean 4D mask (True: may attend) in the additive form, 0 where allowed and the dtype's
    minimum elsewhere: what every family's attention reads the same way. (GPT-J's attention adds a
    4D mask as given, so a boolean one would add 0 or 1 and mask nothing.)"""
    dtype = next(model.parameters()).dtype
    return torch.where(mask, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)


def _positions_within(ids: list[list[int]], group: list[int]) -> torch.Tensor:
    """0, 1, .. within each continuation: its tokens sit where they would right after the prompt."""
    return torch.cat([torch.arange(len(ids[k]) - 1) for k in group]) if group else torch.zeros(0, dtype=torch.long)


def score_attributes(model, batch: PromptBatch, attrs: AttributeTokens, batch_size: int,
                     desc: str | None = None, max_row_tokens: int = MAX_ROW_TOKENS, record=None,
                     hooks_for=None) -> torch.Tensor:
    """[prompts, attributes] log p(attribute | prompt), each attribute's whole token sequence.
    `record` (pipeline.attribution.LastTokenRecord) rides on the pass that holds the prompts and
    keeps what the attribution stage reads at their last tokens: the prompt positions of a packed
    row compute exactly what a plain run of the prompt does. `hooks_for(index)` gives hooks for the
    micro-batch of prompts `index` (an intervention, pipeline/interventions.py), applied to every
    forward of that micro-batch; the prompt positions of its rows are those of a plain batch."""
    device = model_device(model)
    pad_id = model.tokenizer.pad_token_id
    first = torch.tensor([t[0] for t in attrs.ids])
    room = max(max_row_tokens - int(batch.last.max()) - 1, max(len(t) for t in attrs.ids) - 1)
    groups = continuation_groups(attrs.ids, room)
    # Prompts of similar length share a micro-batch (less padding); results go back to batch order.
    order = length_order(batch)
    by_length = batch.take(order)
    out = torch.zeros(len(batch), len(attrs.names))
    chunks = list(micro_batches(len(batch), batch_size))
    with torch.no_grad():
        for rows in tqdm(chunks, desc=desc, disable=desc is None, leave=False):
            mb, index = by_length.slice(rows), torch.tensor(order[rows])
            extra = hooks_for(index) if hooks_for is not None else []
            for g, group in enumerate(groups):
                tokens, positions, mask, offsets, targets, owners = packed_rows(mb, attrs.ids, group, pad_id)
                # Logits only where something is read: the first token of every attribute at the
                # prompt's last token (first group), then after each appended token.
                where = (mb.last + 1)[:, None] + offsets[None, :]
                if g == 0:
                    where = torch.cat([mb.last[:, None], where], 1)
                hooks = [*(record.hooks(mb.last) if record is not None and g == 0 else ()), *extra]
                logits = logits_at(model, tokens.to(device), where, hooks, attention_mask=additive(mask, model).to(device),
                                   position_ids=positions.to(device)).float().cpu()
                if record is not None and g == 0:
                    record.collect(index)
                if g == 0:
                    out[index] += torch.log_softmax(logits[:, 0], -1)[:, first]
                    logits = logits[:, 1:]
                if len(offsets):
                    logp = torch.log_softmax(logits, -1).gather(-1, targets.expand(len(mb), -1)[..., None])[..., 0]
                    out[index] += torch.zeros(len(mb), len(attrs.names)).index_add_(1, owners, logp)
            if rows.start == 0 and hooks_for is None:
                _check_against_plain(model, mb, attrs, out[index])
    return out


def plain_logprob(model, prompt_tokens: torch.Tensor, attribute_ids: list[int]) -> float:
    """log p(attribute | prompt) from one plain forward of the prompt followed by the attribute."""
    device = model_device(model)
    seq = torch.cat([prompt_tokens.cpu(), torch.tensor(attribute_ids)])[None].to(device)
    with torch.no_grad():
        logp = torch.log_softmax(model(seq)[0].float(), -1).cpu()
    n = len(prompt_tokens)
    return float(sum(logp[n - 1 + j, t] for j, t in enumerate(attribute_ids)))


_CHECKED: set[int] = set()


def _check_against_plain(model, mb: PromptBatch, attrs: AttributeTokens, scores: torch.Tensor) -> None:
    """Once per model: the first prompt's packed scores of a few multi-token attributes equal plain
    forwards of `prompt + attribute`. A model that ignored the custom mask or position ids would
    fail here instead of giving wrong associations."""
    if id(model) in _CHECKED:
        return
    multi = [k for k, one in enumerate(attrs.one_token) if not one][:3]
    prompt = mb.tokens[0, : int(mb.last[0]) + 1]
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    for k in multi or [0]:
        plain = plain_logprob(model, prompt, attrs.ids[k])
        if abs(plain - float(scores[0, k])) > tol * max(1.0, abs(plain)):
            raise PipelineError(
                f"multi-token scoring of {attrs.names[k]!r} disagrees with a plain forward pass for this model "
                f"({float(scores[0, k]):.4f} vs {plain:.4f}): it does not honour custom 4D attention masks; "
                "use a dataset.attributes file of one-token attributes")
    _CHECKED.add(id(model))
