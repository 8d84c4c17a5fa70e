"""Removing what the discovery side found, and measuring what is left (the intervene stage).

Prompts come as AAE/SAE pairs (PairedPrompts with clean = AAE, corrupted = SAE, and the metric
oriented to AAE), positions matched by role as patching matches them. Interventions:

- `ComponentSwap`, mode `blind`: the chosen components (heads' outputs `z`, MLP outputs) of the AAE
  run take their values from the matched SAE run at role-matched positions: those components see
  no dialect. The SAE run is left as it is. Made blind everywhere (every head and MLP), the AAE
  run's last-token residual stream is the SAE run's, so the metric is the SAE run's (tested).
  Mode `mean`: both runs take the mean of the two guises' values (a mean ablation over guises).
- `DirectionAblation`: per chosen layer, a unit direction projected out of the residual stream
  entering that layer at every position, in both runs (directional ablation, Arditi et al. 2024).
  The dialect direction of a layer is the mean difference of the last token's residual between
  the guises on discovery prompts (`dialect_directions`).
(Edge removal runs through the circuit stage's exact evaluation, pipeline/circuit/edges.py.)

`measure` runs one intervention over the pairs and returns per prompt: the metric on both guises,
the KL divergence of the last token's next-token distribution from the unintervened run on each
guise, and the mean next-token loss on the utterance's tokens on each guise.

TransformerLens's patching functions patch one activation of one run; these patch many
components of one run at once from a second run, position by position, hence the hooks here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from pipeline.forward import logits_at, model_device
from pipeline.patching.sweeps import all_position_pairs
from pipeline.prompts import PairedPrompts, PromptBatch, micro_batches

GUISES = ("aae", "sae")  # the clean and the corrupted side of the pairs given to measure()


def z_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def mlp_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


@dataclass
class ComponentSwap:
    """Heads [(layer, head)] and MLPs [layer] whose outputs take the other guise's values (blind) or
    the mean of both guises (mean), at role-matched positions."""

    heads: list[tuple[int, int]] = field(default_factory=list)
    mlps: list[int] = field(default_factory=list)
    mode: str = "blind"

    def __len__(self) -> int:
        return len(self.heads) + len(self.mlps)

    @property
    def cached(self) -> set[str]:
        """Hooks whose activations of both guises the hooks read."""
        return {z_hook(l) for l, _ in self.heads} | {mlp_hook(l) for l in self.mlps}

    def changes(self, guise: str) -> bool:
        return len(self) > 0 and (guise == "aae" or self.mode == "mean")

    def hooks(self, guise: str, caches: dict, matched) -> list:
        """Hooks for the run of `guise` in one micro-batch: caches[guise][hook] are both guises'
        unintervened activations, `matched` (rows, aae positions, sae positions) the role-matched
        positions."""
        rows, pos_aae, pos_sae = matched
        here, there = (pos_aae, pos_sae) if guise == "aae" else (pos_sae, pos_aae)
        other = "sae" if guise == "aae" else "aae"

        def values(name, index_here, index_there):  # what the matched positions take
            theirs = caches[other][name][index_there]
            return theirs if self.mode == "blind" else (theirs + caches[guise][name][index_here]) / 2

        def head_patch(name, heads):  # z [b, pos, head, d_head]
            r, h = rows[:, None], heads[None, :]

            def patch(z, hook):
                z = z.clone()
                z[r, here[:, None], h] = values(name, (r, here[:, None], h), (r, there[:, None], h)).to(z.dtype)
                return z
            return patch

        def mlp_patch(name):  # [b, pos, d_model]
            def patch(x, hook):
                x = x.clone()
                x[rows, here] = values(name, (rows, here), (rows, there)).to(x.dtype)
                return x
            return patch

        by_layer: dict[int, list[int]] = {}
        for l, h in self.heads:
            by_layer.setdefault(l, []).append(h)
        out = [(z_hook(l), head_patch(z_hook(l), torch.tensor(hs, device=rows.device))) for l, hs in sorted(by_layer.items())]
        out += [(mlp_hook(l), mlp_patch(mlp_hook(l))) for l in sorted(set(self.mlps))]
        return out


@dataclass
class DirectionAblation:
    """{layer: direction [d_model]}: each projected out of the residual stream entering its layer."""

    directions: dict[int, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.directions)

    cached: set = field(default_factory=set, repr=False)

    def changes(self, guise: str) -> bool:
        return len(self) > 0

    def hooks(self, guise: str, caches=None, matched=None) -> list:
        def ablate(unit):
            def f(x, hook):
                u = unit.to(x.device, x.dtype)
                return x - (x @ u)[..., None] * u
            return f
        return [(f"blocks.{l}.hook_resid_pre", ablate(d / d.norm())) for l, d in sorted(self.directions.items())]


def matched_positions(pairs: PairedPrompts, rows: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(micro-batch row, AAE position, SAE position) of every role-matched position of `rows`."""
    all_pos = all_position_pairs(pairs.take(rows))
    r = torch.cat([torch.full((len(k),), j, dtype=torch.long) for j, (k, _) in enumerate(all_pos)])
    aae = torch.cat([c for _, c in all_pos])
    sae = torch.cat([k for k, _ in all_pos])
    return r.to(device), aae.to(device), sae.to(device)


def utterance_targets(batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions whose next token is an utterance token, those tokens, and a mask, [b, width] each
    (the model's loss on the utterance: how well it still predicts the words it is given)."""
    spans = [[p - 1 for p, role in enumerate(roles) if role.startswith("utt") and p > 0] for roles in batch.role_labels]
    width = max(1, max(len(s) for s in spans))
    where = torch.zeros(len(spans), width, dtype=torch.long)
    mask = torch.zeros(len(spans), width, dtype=torch.bool)
    for i, s in enumerate(spans):
        where[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    targets = batch.tokens.cpu().gather(1, (where + 1).clamp(max=batch.tokens.shape[1] - 1))
    return where, targets, mask


def run_guise(model, batch: PromptBatch, answers, hooks=()) -> dict[str, torch.Tensor]:
    """One run of a micro-batch: the metric, the last token's log-probabilities and the mean loss on
    the utterance tokens, per prompt."""
    where, targets, mask = utterance_targets(batch)
    device = batch.tokens.device
    at = torch.cat([batch.last[:, None].to(device), where.to(device)], 1)
    with torch.no_grad():
        logits = logits_at(model, batch.tokens, at, list(hooks), attention_mask=batch.attention_mask).float()
    last = logits[:, 0]
    logp = logits[:, 1:].log_softmax(-1)
    nll = -logp.gather(-1, targets.to(device)[..., None])[..., 0]
    mask = mask.to(device)
    loss = (nll * mask).sum(1) / mask.sum(1).clamp(min=1)
    return {"metric": answers.values(last).cpu(), "logp": last.log_softmax(-1).cpu(), "loss": loss.cpu()}


def guise_caches(model, batches: dict[str, PromptBatch], names: set[str]) -> dict:
    """{guise: {hook name: activation}}: both guises' unintervened activations at `names`, what a
    ComponentSwap's hooks read ({} when it reads none)."""
    caches = {}
    if not names:
        return caches
    for guise, mb in batches.items():
        with torch.no_grad():
            _, cache = model.run_with_cache(mb.tokens, attention_mask=mb.attention_mask, names_filter=lambda n: n in names)
        caches[guise] = {n: cache[n] for n in names}
    return caches


def measure(model, pairs: PairedPrompts, interventions: dict, batch_size: int, desc: str | None = None) -> dict:
    """{name: {"metric_aae", "metric_sae", "kl_aae", "kl_sae", "loss_aae", "loss_sae"} per prompt}
    for every intervention of `interventions` (name -> ComponentSwap | DirectionAblation | None for
    the unintervened run, which is always measured as "none"). KL divergences and loss changes are
    against the unintervened run of the same guise."""
    device = model_device(model)
    cached = set().union(*(getattr(i, "cached", set()) for i in interventions.values() if i is not None))
    names = ["none", *[n for n in interventions if n != "none"]]
    out = {n: {k: [] for k in ("metric_aae", "metric_sae", "kl_aae", "kl_sae", "loss_aae", "loss_sae")} for n in names}
    for chunk in tqdm(list(micro_batches(len(pairs), batch_size)), desc=desc, disable=desc is None, leave=False):
        rows = list(range(chunk.start, chunk.stop))
        batches = {"aae": pairs.clean.take(rows).to(device), "sae": pairs.corrupted.take(rows).to(device)}
        answers = pairs.answers[torch.as_tensor(rows)]
        caches = guise_caches(model, batches, cached)
        base = {guise: run_guise(model, mb, answers) for guise, mb in batches.items()}
        matched = matched_positions(pairs, rows, device)
        for name in names:
            intervention = interventions.get(name)
            for guise, mb in batches.items():
                if intervention is None or not intervention.changes(guise):
                    got = base[guise]
                else:
                    got = run_guise(model, mb, answers, intervention.hooks(guise, caches, matched))
                out[name][f"metric_{guise}"].append(got["metric"])
                out[name][f"loss_{guise}"].append(got["loss"] - base[guise]["loss"])
                p = base[guise]["logp"]
                out[name][f"kl_{guise}"].append((p.exp() * (p - got["logp"])).sum(-1))
    return {n: {k: torch.cat(v) for k, v in d.items()} for n, d in out.items()}


def dialect_directions(model, pairs: PairedPrompts, batch_size: int) -> dict[int, torch.Tensor]:
    """{layer: mean over prompts of (AAE - SAE) residual stream entering the layer, at the last
    token} [d_model] each: the direction along which the dialect moves each layer's input."""
    device = model_device(model)
    n_layers = model.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)]
    total = {l: torch.zeros(model.cfg.d_model, dtype=torch.float64) for l in range(n_layers)}
    for chunk in micro_batches(len(pairs), batch_size):
        rows = list(range(chunk.start, chunk.stop))
        for guise, sign in (("clean", 1.0), ("corrupted", -1.0)):
            mb = getattr(pairs, guise).take(rows).to(device)
            with torch.no_grad():
                _, cache = model.run_with_cache(mb.tokens, attention_mask=mb.attention_mask, names_filter=lambda n: n in names)
            r = torch.arange(len(rows), device=device)
            for l in range(n_layers):
                total[l] += sign * cache[names[l]][r, mb.last].double().sum(0).cpu()
    return {l: (v / len(pairs)).float() for l, v in total.items()}
