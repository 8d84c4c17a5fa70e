"""Exact activation patching (denoising: run corrupted, patch in clean) over role-matched
positions, in two interchangeable ways that give the same numbers:

- reference: one full forward of the micro-batch per cell with the patch hook and the attention
  mask, metric read from the logits at each prompt's real last token (TransformerLens's
  `generic_activation_patch` loop, made correct for padded prompts of different lengths);
- fast: the same patched runs with less work.
  * start at the patched layer: the corrupted run's input to every block (the residual and the
    block's own call arguments: attention mask, rotary position embeddings) is recorded once
    per micro-batch, and patched runs resume there (TransformerBridge's `start_at_layer` still
    executes the earlier blocks, so it saves nothing);
  * compute only what the metric reads: the final norm at each prompt's last token and the
    logit-difference direction, never the full vocabulary at every position;
  * skip patches that cannot change anything: copying a position whose clean and corrupted
    token prefixes are identical (the shared template prefix) leaves a causal model's run
    unchanged, so those prompts take the corrupted value without a run;
  * batch cells: the cells of one layer and part run together, each on its own copy of the
    prompts, up to `rows_per_run` rows per forward (few large matrix products instead of many
    small ones, which is what costs time on a CPU).

Values are raw logit differences per prompt, [layer, role-or-head, prompt], NaN where a prompt
has no such role; normalizing is the caller's job.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from pipeline.forward import model_device
from pipeline.metrics import gather_last, logit_diff, logit_diff_directions
from pipeline.patching.sweeps import Cell, all_position_pairs, patch_head_pattern, patch_head_vector, patch_role
from pipeline.prompts import PairedPrompts, micro_batches

NOOP_PARTS = ("resid_pre", "attn_out", "mlp_out")


def take_rows(obj, idx: torch.Tensor, batch: int):
    """Select batch rows of every tensor in a block's call arguments (masks); leave tensors that
    broadcast over the batch (rotary cos/sin, position ids) and non-tensors alone."""
    if isinstance(obj, torch.Tensor):
        return obj[idx] if obj.ndim and obj.shape[0] == batch else obj
    if isinstance(obj, tuple):
        return tuple(take_rows(o, idx, batch) for o in obj)
    if isinstance(obj, list):
        return [take_rows(o, idx, batch) for o in obj]
    if isinstance(obj, dict):
        return {k: take_rows(v, idx, batch) for k, v in obj.items()}
    return obj


def block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class PreparedBatch:
    """One micro-batch: its clean activations for the sweep's hooks, and (fast engine) the
    corrupted run's recorded block inputs."""

    def __init__(self, model, pairs: PairedPrompts, rows: slice, hooks: set[str], fast: bool,
                 all_pos: list[tuple[torch.Tensor, torch.Tensor]]):
        device = model_device(model)
        self.rows = rows
        self.clean = pairs.clean.slice(rows).to(device)
        self.corrupted = pairs.corrupted.slice(rows).to(device)
        self.size = len(self.clean)
        self.answers = pairs.answers[rows].to(device)
        self.clean_pos = pairs.clean_pos[rows]
        self.corrupted_pos = pairs.corrupted_pos[rows]
        self.all_pos = all_pos[rows]
        self.direction, self.bias = logit_diff_directions(model, self.answers)
        with torch.no_grad():
            _, cache = model.run_with_cache(self.clean.tokens, attention_mask=self.clean.attention_mask,
                                            names_filter=lambda name: name in hooks)
        self.clean_acts = {name: cache[name] for name in hooks}
        self.block_inputs: list[tuple[tuple, dict]] = []
        if fast:
            self._record_corrupted(model)
        else:
            self.corrupted_ld = self.reference_ld(model, [])

    def _record_corrupted(self, model) -> None:
        handles = []

        def recorder(_module, args, kwargs):
            kwargs = dict(kwargs)
            for key in ("past_key_values", "past_key_value", "layer_past", "cache"):
                kwargs.pop(key, None)
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            self.block_inputs.append((args, kwargs))

        for block in model.blocks:
            handles.append(block.register_forward_pre_hook(recorder, with_kwargs=True))
        try:
            with torch.no_grad():
                logits = model(self.corrupted.tokens, attention_mask=self.corrupted.attention_mask)
        finally:
            for h in handles:
                h.remove()
        assert len(self.block_inputs) == model.cfg.n_layers, "every block must run once in the corrupted run"
        self.corrupted_ld = logit_diff(gather_last(logits, self.corrupted.last).float(), self.answers)

    def reference_ld(self, model, fwd_hooks) -> torch.Tensor:
        with torch.no_grad():
            logits = model.run_with_hooks(self.corrupted.tokens, attention_mask=self.corrupted.attention_mask, fwd_hooks=fwd_hooks)
        return logit_diff(gather_last(logits, self.corrupted.last).float(), self.answers)

    def resume_ld(self, model, layer: int, sub: torch.Tensor, fwd_hooks) -> torch.Tensor:
        """Logit difference of rows `sub` when the corrupted run restarts at block `layer`."""
        args, kwargs = self.block_inputs[layer]
        whole = len(sub) == self.size and torch.equal(sub, torch.arange(self.size))
        x = args[0] if args else kwargs["hidden_states"]
        x = x if whole else x[sub]
        with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
            for j in range(layer, model.cfg.n_layers):
                a, kw = self.block_inputs[j]
                if not whole:
                    a, kw = take_rows(a, sub, self.size), take_rows(kw, sub, self.size)
                if a:
                    x = block_output(model.blocks[j](x, *a[1:], **kw))
                else:
                    x = block_output(model.blocks[j](**{**kw, "hidden_states": x}))
            last = x[torch.arange(len(sub), device=x.device), self.corrupted.last[sub]]
            normed = model.ln_final(last[:, None, :])[:, 0].float()
        return (normed * self.direction[sub]).sum(-1) + self.bias[sub]

    # --- which prompts a cell touches, and the hook that patches them -------------------------

    def role_rows(self, cell: Cell, skip_noops: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows that have the cell's role, and among them those whose patch can change the run."""
        c = self.clean_pos[:, cell.index]
        k = self.corrupted_pos[:, cell.index]
        has = torch.nonzero(c >= 0).flatten()
        if not skip_noops:
            return has, has
        active = [int(i) for i in has if not (int(c[i]) == int(k[i]) and torch.equal(
            self.clean.tokens[i, : int(c[i]) + 1], self.corrupted.tokens[i, : int(k[i]) + 1]))]
        return has, torch.tensor(active, dtype=torch.long)

    def patch_hook(self, cell: Cell, sub: torch.Tensor, run_rows: torch.Tensor) -> Callable:
        """A hook patching rows `sub` of the micro-batch, which sit at rows `run_rows` of the run."""
        clean = self.clean_acts[cell.hook]
        dev = clean.device
        if cell.axis == "role":
            k = self.corrupted_pos[sub, cell.index].to(dev)
            c = self.clean_pos[sub, cell.index].to(dev)
            r, cr = run_rows.to(dev), sub.to(dev)
            return lambda act, hook: patch_role(act, clean, r, cr, k, c)
        rs, crs, ks, cs, qk, qc = [], [], [], [], [], []
        for run_row, row in zip(run_rows.tolist(), sub.tolist()):
            k_pos, c_pos = self.all_pos[row]
            if cell.part == "pattern":
                kq, kk = torch.meshgrid(k_pos, k_pos, indexing="ij")
                cq, ck = torch.meshgrid(c_pos, c_pos, indexing="ij")
                causal = (kq >= kk).flatten()  # future keys are masked in both runs
                ks.append(kq.flatten()[causal]); qk.append(kk.flatten()[causal])
                cs.append(cq.flatten()[causal]); qc.append(ck.flatten()[causal])
                n = int(causal.sum())
            else:
                ks.append(k_pos); cs.append(c_pos)
                n = len(k_pos)
            rs.append(torch.full((n,), run_row)); crs.append(torch.full((n,), row))
        r, cr = torch.cat(rs).to(dev), torch.cat(crs).to(dev)
        if cell.part == "pattern":
            kpair = (torch.cat(ks).to(dev), torch.cat(qk).to(dev))
            cpair = (torch.cat(cs).to(dev), torch.cat(qc).to(dev))
            return lambda act, hook: patch_head_pattern(act, clean, r, cr, kpair, cpair, cell.index)
        k, c = torch.cat(ks).to(dev), torch.cat(cs).to(dev)
        return lambda act, hook: patch_head_vector(act, clean, r, cr, k, c, cell.index)

    def cell_rows(self, cell: Cell, fast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows that have the cell's role (all rows for head cells), and those that need a run."""
        if cell.axis != "role":
            every = torch.arange(self.size)
            return every, every
        return self.role_rows(cell, skip_noops=fast and cell.part in NOOP_PARTS)

    def run_reference(self, model, cell: Cell) -> torch.Tensor:
        """[micro-batch] logit differences with the cell patched (full forward); NaN for prompts
        without the role."""
        out = torch.full((self.size,), float("nan"))
        has, _ = self.cell_rows(cell, fast=False)
        if len(has):
            hook = self.patch_hook(cell, has, has)
            out[has] = self.reference_ld(model, [(cell.hook, hook)])[has].cpu()
        return out

    def run_fast(self, model, cells: list[Cell], rows_per_run: int) -> list[torch.Tensor]:
        """The same values for cells that share one layer and part, several cells per forward."""
        assert len({(c.part, c.layer) for c in cells}) == 1
        outs, plans = [], []
        for cell in cells:
            has, active = self.cell_rows(cell, fast=True)
            out = torch.full((self.size,), float("nan"))
            out[has] = self.corrupted_ld[has].cpu()
            outs.append(out)
            plans.append(active)
        start = 0
        while start < len(cells):
            stop, rows = start, 0
            while stop < len(cells) and (stop == start or rows + len(plans[stop]) <= rows_per_run):
                rows += len(plans[stop])
                stop += 1
            chunk = [k for k in range(start, stop) if len(plans[k])]
            if chunk:
                offsets = torch.cumsum(torch.tensor([0] + [len(plans[k]) for k in chunk]), 0).tolist()
                patches = [self.patch_hook(cells[k], plans[k], torch.arange(offsets[n], offsets[n + 1]))
                           for n, k in enumerate(chunk)]

                def patch_all(act, hook, patches=patches):
                    for patch in patches:
                        act = patch(act, hook)
                    return act

                run_rows = torch.cat([plans[k] for k in chunk])
                ld = self.resume_ld(model, cells[0].layer, run_rows, [(cells[0].hook, patch_all)]).cpu()
                for n, k in enumerate(chunk):
                    outs[k][plans[k]] = ld[offsets[n]: offsets[n + 1]]
            start = stop
        return outs


def run_cells(model, pairs: PairedPrompts, cells: list[Cell], batch_size: int, fast: bool = True,
              done: torch.Tensor | None = None, values: torch.Tensor | None = None,
              on_progress: Callable[[torch.Tensor, torch.Tensor], None] | None = None, desc: str | None = None,
              rows_per_run: int = 256):
    """Patched logit differences [len(cells), n_prompts] for every cell on every prompt.

    `done` [n_micro_batches, len(cells)] and `values` resume an interrupted sweep: finished
    (micro-batch, cell) pairs are not recomputed. `on_progress(done, values)` is called after
    every group of cells (the caller decides when to checkpoint)."""
    chunks = list(micro_batches(len(pairs), batch_size))
    if done is None:
        done = torch.zeros(len(chunks), len(cells), dtype=torch.bool)
        values = torch.full((len(cells), len(pairs)), float("nan"))
    hooks = {c.hook for c in cells}
    all_pos = all_position_pairs(pairs)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, cell in enumerate(cells):
        groups.setdefault((cell.part, cell.layer), []).append(i)
    bar = tqdm(total=done.numel(), initial=int(done.sum()), desc=desc, disable=desc is None, unit="cell")
    for b, rows in enumerate(chunks):
        if bool(done[b].all()):
            continue
        prepared = PreparedBatch(model, pairs, rows, hooks, fast, all_pos)
        for members in groups.values():
            todo = [i for i in members if not done[b, i]]
            if not todo:
                continue
            if fast:
                results = prepared.run_fast(model, [cells[i] for i in todo], rows_per_run)
            else:
                results = [prepared.run_reference(model, cells[i]) for i in todo]
            for i, result in zip(todo, results):
                values[i, rows] = result
                done[b, i] = True
            bar.update(len(todo))
            if on_progress:
                on_progress(done, values)
        del prepared
    bar.close()
    return values, done
