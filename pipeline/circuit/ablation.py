"""What an edge outside a circuit carries: the ablation value of its upstream node's output.

- `patching` (the default, pipeline/circuit/edges.py): the corrupted run's output at the
  role-matched position (Reference.make there);
- `mean`: the node's mean output over every real token of the corrupted prompts, one vector per
  node (MIB's `mean`, over the corrupted side instead of a separate data set);
- `zero`: zero;
- `mean_positional`: the node's mean output over the corrupted prompts at each role
  (pipeline/prompts.py: `pre<i>`, `utt_first`, `utt_last`, `suf-<k>`; the utterance's middle
  tokens, which have no counterpart, pooled as `utt_mid`), so positions are matched by role as
  everywhere in the project rather than by raw index as MIB's `mean-positional` does.
Means are taken once, over the corrupted side of the prompts edges are scored on, and used for
every evaluation (discovery and held-out). A clean token whose role no corrupted prompt has keeps
its clean value (it is never ablated), as unmatched tokens do under patching. The input node is
the residual stream entering block 0 (token and position embeddings), so `zero` removes both.

With every edge ablated, each downstream input reads the sum of the ablation values of the
nodes before it (plus the constant biases): the same as a run whose every node output is
replaced by its ablation value (tests/test_ablation.py checks this against plain hooks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.circuit.graph import Graph
from pipeline.errors import PipelineError
from pipeline.prompts import PairedPrompts, PromptBatch, micro_batches

ABLATIONS = ("patching", "mean", "zero", "mean_positional")


def check_ablations(names) -> list[str]:
    names = [str(n) for n in ([names] if isinstance(names, str) else names)]
    bad = [n for n in names if n not in ABLATIONS]
    if bad or not names:
        raise PipelineError(f"circuit.ablation={names}: {', '.join(bad) or 'empty'} is not one of {', '.join(ABLATIONS)}")
    return list(dict.fromkeys(names))


@dataclass
class Ablation:
    """A non-patching ablation's values: `mean` [n_up, d_model] (mean and zero), or per role
    `roles` -> [n_up, d_model] (mean_positional). Passed to edges.edge_scores / edges.evaluate."""

    kind: str
    mean: torch.Tensor | None = None
    roles: dict[str, torch.Tensor] | None = None

    @classmethod
    def of(cls, kind: str, model, graph: Graph, pairs: PairedPrompts, batch_size: int) -> "Ablation | None":
        """None for patching (the corrupted run itself); else the values from pairs' corrupted side."""
        if kind == "patching":
            return None
        if kind == "zero":
            return cls(kind, mean=torch.zeros(graph.n_up, int(model.cfg.d_model)))
        sums, counts = node_sums(model, graph, pairs.corrupted, batch_size, by_role=kind == "mean_positional")
        if kind == "mean":
            total = sum(sums.values())
            return cls(kind, mean=total / sum(counts.values()))
        return cls(kind, roles={r: sums[r] / counts[r] for r in sums})

    def values(self, clean: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """([b, n_up, pos, d_model] each node's ablation value at each clean position, bool [b, pos]
        where it applies)."""
        b, s = clean.tokens.shape
        device = clean.tokens.device
        real = clean.attention_mask.bool()
        if self.roles is None:
            mean = self.mean.to(device)
            return mean[None, :, None, :].expand(b, -1, s, -1).contiguous(), real
        names = list(self.roles)
        table = torch.stack([self.roles[r] for r in names]).to(device)  # [roles, up, d]
        index = torch.full((b, s), -1, dtype=torch.long)
        for i, labels in enumerate(clean.role_labels):
            for p, r in enumerate(labels):
                if r in self.roles:
                    index[i, p] = names.index(r)
        index = index.to(device)
        out = table[index.clamp(min=0)].permute(0, 2, 1, 3)  # [b, up, pos, d]
        matched = (index >= 0) & real
        return out.masked_fill(~matched[:, None, :, None], 0).contiguous(), matched


def node_sums(model, graph: Graph, batch: PromptBatch, batch_size: int, by_role: bool):
    """Sums of every node's output over real tokens ({"all": [n_up, d]}) or per role label, and
    the token counts."""
    from pipeline.circuit.edges import capture_outputs
    from pipeline.forward import model_device

    sums, counts = {}, {}
    for rows in micro_batches(len(batch), batch_size):
        mb = batch.slice(rows).to(model_device(model))
        out, _ = capture_outputs(model, graph, mb)  # [b, up, pos, d]
        out = out.cpu().double()
        for i, labels in enumerate(mb.role_labels):
            for p, r in enumerate(labels):
                key = r if by_role else "all"
                sums[key] = sums.get(key, 0) + out[i, :, p]
                counts[key] = counts.get(key, 0) + 1
    return {k: v.float() for k, v in sums.items()}, counts
