"""Exact activation patching (denoising: run corrupted, patch in clean) over role-matched
positions, in two interchangeable ways that give the same numbers:

- reference: one full forward of the micro-batch per cell with the patch hook and the attention
  mask, metric read from the logits at each prompt's real last token (TransformerLens's
  `generic_activation_patch` loop, made correct for padded prompts of different lengths);
- fast: the same patched runs with less work.
  * compute only what can change: in a causal model, every position before the first one a
    patch changes is the corrupted run's, in every block. The corrupted run's keys and values
    are recorded once per micro-batch (pipeline/patching/kv_forward.py), and a patched run
    starts at the patched block and at that position, reusing the recorded keys and values of
    the earlier positions. A patch changes nothing at a position whose clean and corrupted
    token prefixes are identical (the shared template prefix), so head patches over "all
    positions" start where the two prompts first differ; prompts where no patched position
    differs take the corrupted value without a run;
  * compute only what the metric reads: the final norm at each prompt's last token and the
    metric's direction (pipeline/metrics.py AnswerWeights.directions), never the full vocabulary
    at every position;
  * batch cells: the cells of one layer and part run together, each on its own copy of the
    prompts, up to `rows_per_run` rows per forward, their patches applied as one indexed copy
    (few large matrix products instead of many small ones, which is what costs time on a CPU);
    rows are sorted by the position they start at and cut into forwards of similar starts
    (`plan_runs`), since a forward computes from its earliest row's start.
  For a block layout kv_forward does not know, the fast engine resumes the bridge's own blocks
  from the recorded block inputs instead (all positions; TransformerBridge's `start_at_layer`
  still executes the earlier blocks, so it would save nothing).

Values are the raw metric per prompt (a linear metric: the logit difference or a rated metric),
[layer, role-or-head, prompt], NaN where a prompt has no such role; normalizing is the caller's job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from pipeline.architecture import output_soft_cap, soft_capped
from pipeline.forward import model_device
from pipeline.metrics import gather_last
from pipeline.patching import kv_forward
from pipeline.patching.sweeps import Cell, all_position_pairs, patch_head_pattern, patch_head_vector, patch_role
from pipeline.prompts import PairedPrompts, micro_batches

log = logging.getLogger(__name__)
MIN_RUN_TOKENS = 256  # positions a forward computes before plan_runs cuts at a later start (chosen by timing 64-4096)


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


@dataclass
class Patch:
    """Copies of clean activations into a run: entry j copies clean row clean_rows[j] at position
    c[j] (head head[j]) into run row rows[j] at position k[j]. For the pattern, k and c are the
    query positions and k_key, c_key the key positions. Several cells' patches concatenate into
    one, applied as one indexed copy."""

    part: str
    clean: torch.Tensor
    rows: torch.Tensor
    clean_rows: torch.Tensor
    k: torch.Tensor
    c: torch.Tensor
    head: torch.Tensor | None = None
    k_key: torch.Tensor | None = None
    c_key: torch.Tensor | None = None

    @staticmethod
    def cat(patches: list["Patch"]) -> "Patch":
        first = patches[0]
        join = lambda name: None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in patches])  # noqa: E731
        return Patch(first.part, first.clean, *(join(n) for n in ("rows", "clean_rows", "k", "c", "head", "k_key", "c_key")))

    def apply(self, act: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Patch `act`, whose position axis (the query axis of a pattern) begins at `start`;
        entries before `start` are left out (the caller starts where the first change is)."""
        keep = self.k >= start
        pick = lambda t: None if t is None else t[keep]  # noqa: E731
        rows, crows, k, c, head, kk, ck = (pick(t) for t in (self.rows, self.clean_rows, self.k, self.c, self.head, self.k_key, self.c_key))
        k = k - start
        if self.part == "pattern":
            return patch_head_pattern(act, self.clean, rows, crows, (k, kk), (c, ck), head)
        if head is None:
            return patch_role(act, self.clean, rows, crows, k, c)
        return patch_head_vector(act, self.clean, rows, crows, k, c, head)


class PreparedBatch:
    """One micro-batch: its clean activations for the sweep's hooks, and (fast engine) the
    corrupted run's recording."""

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
        self.last = self.corrupted.last.cpu()
        self.shared = shared_prefix(pairs.clean.tokens[rows], pairs.corrupted.tokens[rows])
        self.first_change = torch.tensor([first_change(k, c, int(s)) for (k, c), s in zip(self.all_pos, self.shared)])
        self.direction, self.bias = self.answers.directions(model)
        with torch.no_grad():
            _, cache = model.run_with_cache(self.clean.tokens, attention_mask=self.clean.attention_mask,
                                            names_filter=lambda name: name in hooks)
        self.clean_acts = {name: cache[name] for name in hooks}
        self.block_inputs: list[tuple[tuple, dict]] = []
        self.recording: kv_forward.Recording | None = None
        if fast:
            self._record_corrupted(model)
        else:
            self.corrupted_ld = self.reference_ld(model, [])

    def _record_corrupted(self, model) -> None:
        """The corrupted run through the bridge (its logit differences, each block's inputs), then
        kv_forward's recording of keys and values, kept where it gives the bridge's numbers."""
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
        self.corrupted_ld = self.answers.values(gather_last(logits, self.corrupted.last))
        why_not = kv_forward.unsupported_because(model)
        args, kwargs = self.block_inputs[0]
        x0 = args[0] if args else kwargs["hidden_states"]
        rotary = kwargs.get("position_embeddings")
        if why_not is None and rotary is None and model.cfg.positional_embedding_type == "rotary":
            why_not = "the bridge passes its blocks no rotary cos/sin to reuse"
        if why_not is None:
            with torch.no_grad():
                recording = kv_forward.Recording.of(model, x0, self.corrupted.attention_mask, rotary)
                ld = self.final_ld(model, recording.final, torch.arange(self.size), 0)
            gap = float((ld - self.corrupted_ld.cpu()).abs().max())
            if gap <= agreement_tolerance(x0.dtype, self.corrupted_ld):
                self.recording, self.block_inputs = recording, []
            else:
                why_not = f"it differs from the bridge's run of these prompts (max gap {gap:.2e})"
        say_engine(model, why_not)

    def final_ld(self, model, x: torch.Tensor, sub: torch.Tensor, start: int, at_last: bool = True) -> torch.Tensor:
        """Logit differences of rows `sub` from the last block's output x, whose positions begin
        at `start` (at_last=False: x holds only each row's last position)."""
        at = (self.last[sub] - start) if at_last else torch.zeros(len(sub), dtype=torch.long)
        last = x[torch.arange(len(sub), device=x.device), at.to(x.device)]
        normed = model.ln_final(last[:, None, :])[:, 0].float()
        dev_sub = sub.to(x.device)
        cap = output_soft_cap(model)
        if cap is not None:  # Gemma 2 caps its logits: not linear in the residual stream, so take the answers' logits
            b_U = getattr(model, "b_U", None)
            logits = soft_capped(normed @ model.W_U.float() + (b_U.float() if b_U is not None else 0), cap)
            return self.answers[dev_sub].values(logits).cpu()
        return ((normed * self.direction[dev_sub]).sum(-1) + self.bias[dev_sub]).cpu()

    def reference_ld(self, model, fwd_hooks) -> torch.Tensor:
        with torch.no_grad():
            logits = model.run_with_hooks(self.corrupted.tokens, attention_mask=self.corrupted.attention_mask, fwd_hooks=fwd_hooks)
        return self.answers.values(gather_last(logits, self.corrupted.last))

    def patched_ld(self, model, cell: Cell, sub: torch.Tensor, start: int, patch: Patch) -> torch.Tensor:
        """Logit differences of run rows `sub` (micro-batch rows, repeats allowed) with `patch` in
        cell's layer: from position `start` on with kv_forward, else resuming the bridge's blocks."""
        with torch.no_grad():
            if self.recording is not None:
                dev_sub = sub.to(model_device(model))
                x = kv_forward.run_from(model, self.recording, cell.layer, dev_sub, start,
                                        lambda part, act: patch.apply(act, start) if part == cell.part else act,
                                        self.last[sub].to(dev_sub.device))
                return self.final_ld(model, x[:, None], sub, 0, at_last=False)
            return self.resume_ld(model, cell.layer, sub, [(cell.hook, lambda act, hook: patch.apply(act))])

    def resume_ld(self, model, layer: int, sub: torch.Tensor, fwd_hooks) -> torch.Tensor:
        """Logit difference of rows `sub` when the corrupted run restarts at block `layer`."""
        args, kwargs = self.block_inputs[layer]
        whole = len(sub) == self.size and torch.equal(sub, torch.arange(self.size))
        x = args[0] if args else kwargs["hidden_states"]
        x = x if whole else x[sub]
        with model.hooks(fwd_hooks=fwd_hooks):
            for j in range(layer, model.cfg.n_layers):
                a, kw = self.block_inputs[j]
                if not whole:
                    a, kw = take_rows(a, sub, self.size), take_rows(kw, sub, self.size)
                if a:
                    x = block_output(model.blocks[j](x, *a[1:], **kw))
                else:
                    x = block_output(model.blocks[j](**{**kw, "hidden_states": x}))
        return self.final_ld(model, x, sub, 0)

    # --- which prompts a cell touches, and the patch that patches them -------------------------

    def cell_rows(self, cell: Cell, fast: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows that have the cell's role (all rows for head cells); among them those whose patch
        can change the run (all of them for the reference engine), and the first position it
        changes in each of those."""
        if cell.axis != "role":
            every = torch.arange(self.size)
            if not fast:
                return every, every, torch.zeros(self.size, dtype=torch.long)
            active = torch.nonzero(self.first_change <= self.last).flatten()
            return every, active, self.first_change[active]
        c = self.clean_pos[:, cell.index]
        k = self.corrupted_pos[:, cell.index]
        has = torch.nonzero(c >= 0).flatten()
        if not fast:
            return has, has, k[has]
        noop = (c == k) & (k < self.shared)
        active = has[~noop[has]]
        return has, active, k[active]

    def patch_for(self, cell: Cell, sub: torch.Tensor, run_rows: torch.Tensor) -> Patch:
        """The patch of rows `sub` of the micro-batch, which sit at rows `run_rows` of the run."""
        clean = self.clean_acts[cell.hook]
        dev = clean.device
        if cell.axis == "role":
            return Patch(cell.part, clean, run_rows.to(dev), sub.to(dev),
                         self.corrupted_pos[sub, cell.index].to(dev), self.clean_pos[sub, cell.index].to(dev))
        rs, crs, ks, cs, kks, cks = [], [], [], [], [], []
        for run_row, row in zip(run_rows.tolist(), sub.tolist()):
            k_pos, c_pos = self.all_pos[row]
            if cell.part == "pattern":
                kq, kk = torch.meshgrid(k_pos, k_pos, indexing="ij")
                cq, ck = torch.meshgrid(c_pos, c_pos, indexing="ij")
                causal = (kq >= kk).flatten()  # future keys are masked in both runs
                ks.append(kq.flatten()[causal]); kks.append(kk.flatten()[causal])
                cs.append(cq.flatten()[causal]); cks.append(ck.flatten()[causal])
            else:
                ks.append(k_pos); cs.append(c_pos)
            rs.append(torch.full((len(ks[-1]),), run_row)); crs.append(torch.full((len(ks[-1]),), row))
        n = sum(len(r) for r in rs)
        cat = lambda parts: torch.cat(parts).to(dev) if parts else None  # noqa: E731
        return Patch(cell.part, clean, cat(rs), cat(crs), cat(ks), cat(cs),
                     torch.full((n,), cell.index, device=dev), cat(kks), cat(cks))

    def run_reference(self, model, cell: Cell) -> torch.Tensor:
        """[micro-batch] logit differences with the cell patched (full forward); NaN for prompts
        without the role."""
        out = torch.full((self.size,), float("nan"))
        has, _, _ = self.cell_rows(cell, fast=False)
        if len(has):
            patch = self.patch_for(cell, has, has)
            out[has] = self.reference_ld(model, [(cell.hook, lambda act, hook: patch.apply(act))])[has].cpu()
        return out

    def run_fast(self, model, cells: list[Cell], rows_per_run: int) -> list[torch.Tensor]:
        """The same values for cells that share one layer and part, several cells per forward.
        Every (cell, prompt) row that can change the run starts at its own first changed position,
        and a forward computes from the earliest start among its rows: so rows are sorted by start
        and cut into forwards of similar starts (`plan_runs`), rather than taken cell by cell (a
        late role's rows would be recomputed from the earliest role's position)."""
        assert len({(c.part, c.layer) for c in cells}) == 1
        outs, entries = [], []  # entries: (first changed position, cell, micro-batch row)
        for k, cell in enumerate(cells):
            has, active, first = self.cell_rows(cell, fast=True)
            out = torch.full((self.size,), float("nan"))
            out[has] = self.corrupted_ld[has].cpu()
            outs.append(out)
            entries += [(s, k, r) for r, s in zip(active.tolist(), first.tolist())]
        entries.sort()
        width = int(self.corrupted.tokens.shape[1])
        for lo, hi in plan_runs([s for s, _, _ in entries], width, rows_per_run):
            run = entries[lo:hi]
            by_cell: dict[int, list[tuple[int, int]]] = {}
            for n, (_, k, r) in enumerate(run):
                by_cell.setdefault(k, []).append((n, r))
            patch = Patch.cat([self.patch_for(cells[k], torch.tensor([r for _, r in rows]), torch.tensor([n for n, _ in rows]))
                               for k, rows in by_cell.items()])
            ld = self.patched_ld(model, cells[0], torch.tensor([r for _, _, r in run]), run[0][0], patch)
            for n, (_, k, r) in enumerate(run):
                outs[k][r] = ld[n]
        return outs


_SAID: dict[int, str | None] = {}


def say_engine(model, why_not: str | None) -> None:
    """Log once per model (and again if it changes) how the fast engine runs its patched forwards."""
    if _SAID.get(id(model), "unsaid") == why_not:
        return
    _SAID[id(model)] = why_not
    if why_not is None:
        log.info("fast engine: kv_forward (patched runs start at the patched block and position, reusing the corrupted run's keys and values)")
    else:
        log.info("fast engine: resuming the bridge's own blocks from the patched block (all positions), not kv_forward: %s", why_not)


def plan_runs(starts: list[int], width: int, rows_per_run: int, min_tokens: int = MIN_RUN_TOKENS) -> list[tuple[int, int]]:
    """Cut rows sorted by start position into forwards [lo, hi): at most `rows_per_run` rows, and
    a new forward where the start moves on once the current one already computes `min_tokens`
    positions (rows x positions from its start to `width`). Small forwards waste the CPU's matrix
    units more than recomputing a few earlier positions costs, so a forward grows to that size
    before it is cut."""
    runs, lo = [], 0
    for i in range(1, len(starts) + 1):
        if i == len(starts):
            runs.append((lo, i))
        elif i - lo >= rows_per_run or ((i - lo) * (width - starts[lo]) >= min_tokens and starts[i] > starts[lo]):
            runs.append((lo, i))
            lo = i
    return runs


def shared_prefix(clean: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
    """[n] how many leading tokens each clean prompt shares with its corrupted one."""
    width = min(clean.shape[1], corrupted.shape[1])
    same = (clean[:, :width] == corrupted[:, :width]).long()
    return same.cumprod(1).sum(1)


def first_change(k_pos: torch.Tensor, c_pos: torch.Tensor, shared: int) -> int:
    """The first corrupted position an all-positions patch changes: copying position p onto
    itself changes nothing inside the shared token prefix. Large when it changes none."""
    changes = k_pos[~((k_pos == c_pos) & (k_pos < shared))]
    return int(changes.min()) if len(changes) else 1 << 30


def agreement_tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """How far kv_forward may be from the bridge's own run and still be used in its place."""
    scale = max(1.0, float(reference.abs().max()))
    return scale * (1e-5 if dtype == torch.float32 else 2e-2)


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
