"""Activation patching is exact: our sweeps equal TransformerLens's own functions on batches
where those apply (equal lengths, no padding), the fast engine equals the full-forward reference
on padded prompts of mixed lengths, and a killed sweep resumes to the same tensors."""

import pandas as pd
import pytest
import torch
from transformer_lens import patching as tl_patching

from pipeline.data.builder import build_rows
from pipeline.data.dataset import pair_prompts
from pipeline.patching.engine import run_cells
from pipeline.patching.sweeps import SWEEPS, axis_size, cells_of
from conftest import make_cfg, pairs_for
from test_prompts import small_dataset


def equal_length_pairs(model, n=4, metric="logit_diff"):
    """Prompts of one template whose clean and corrupted sides all have the same token length."""
    rows = build_rows()
    tok = model.tokenizer
    rows["len_aae"] = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in rows.prompt_aae]
    rows["len_sae"] = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in rows.prompt_sae]
    same = rows[rows.len_aae == rows.len_sae]
    group = max((g for _, g in same.groupby(["template", "len_aae"])), key=len).head(n).copy()
    assert len(group) >= 3
    group.insert(2, "best_attr_aae", "lazy")
    group.insert(3, "best_attr_sae", "intelligent")
    pairs = pairs_for(model, group.reset_index(drop=True), make_cfg([f"metric={metric}"]))
    assert not (pairs.clean.attention_mask == 0).any() and torch.equal(pairs.clean_pos, pairs.corrupted_pos)
    return pairs


def ours(model, pairs, part, fast=True, batch_size=4):
    values, _ = run_cells(model, pairs, cells_of(model, pairs, part), batch_size, fast=fast)
    return values.reshape(model.cfg.n_layers, axis_size(model, pairs, "role" if part in ("resid_pre", "attn_out", "mlp_out") else "head"), -1)


TL_SWEEPS = {
    "resid_pre": lambda *a: [tl_patching.get_act_patch_resid_pre(*a, reduce="none")],
    "block": lambda *a: list(tl_patching.get_act_patch_block_every(*a, reduce="none").values.unbind(0)),
    "head_out": lambda *a: [tl_patching.get_act_patch_attn_head_out_all_pos(*a, reduce="none")],
    "head_parts": lambda *a: list(tl_patching.get_act_patch_attn_head_all_pos_every(*a, reduce="none").values.unbind(0)),
}


@pytest.mark.parametrize("metric", ["logit_diff", "favorability"])
@pytest.mark.parametrize("sweep", list(SWEEPS))
def test_sweeps_equal_transformer_lens(tiny_model, sweep, metric):
    model = tiny_model
    pairs = equal_length_pairs(model, metric=metric)
    _, clean_cache = model.run_with_cache(pairs.clean.tokens)
    metric = lambda logits: pairs.answers.values(logits[:, -1].float())  # noqa: E731 (no padding here)
    reference = TL_SWEEPS[sweep](model, pairs.corrupted.tokens, clean_cache, metric)
    for part, tl in zip(SWEEPS[sweep], reference):
        tl = tl if isinstance(tl, torch.Tensor) else tl.values  # a PatchingResult keeps per-prompt values
        mine = ours(model, pairs, part)
        if part in ("resid_pre", "attn_out", "mlp_out"):
            positions = pairs.clean_pos[0]  # every prompt has the same positions here
            tl = tl[:, positions]
        torch.testing.assert_close(mine, tl.float(), atol=1e-4, rtol=0, msg=f"{sweep}/{part}")


@pytest.mark.parametrize("metric", ["logit_diff", "favorability"])
@pytest.mark.parametrize("part", ["resid_pre", "mlp_out", "output", "key", "pattern"])
def test_fast_engine_equals_reference_on_padded_prompts(tiny_model, part, metric):
    pairs = pairs_for(tiny_model, small_dataset(7), make_cfg([f"metric={metric}"]))
    assert (pairs.clean.last != pairs.corrupted.last).any()
    fast, ref = ours(tiny_model, pairs, part, True, 3), ours(tiny_model, pairs, part, False, 3)
    assert torch.equal(torch.isnan(fast), torch.isnan(ref))
    torch.testing.assert_close(fast.nan_to_num(), ref.nan_to_num(), atol=1e-4, rtol=0)


def test_fast_engine_reuses_keys_and_values(tiny_model):
    """The fast engine runs kv_forward (not the fallback) and starts head patches where the
    prompts first differ, not at position 0."""
    from pipeline.patching.engine import PreparedBatch
    from pipeline.patching.sweeps import all_position_pairs

    pairs = pair_prompts(tiny_model, small_dataset(5), make_cfg([]).direction, True)
    prepared = PreparedBatch(tiny_model, pairs, slice(0, 5), {"blocks.0.attn.hook_z"}, True, all_position_pairs(pairs))
    assert prepared.recording is not None
    assert (prepared.shared > 0).all() and (prepared.first_change >= prepared.shared).all()


def test_fast_engine_equals_reference_on_embedded_model(embedded_model):
    from pipeline.patching.engine import PreparedBatch
    from pipeline.patching.sweeps import all_position_pairs

    model = embedded_model
    pairs = pairs_for(model, small_dataset(4), make_cfg([]))  # the favorability metric
    assert PreparedBatch(model, pairs, slice(0, 4), set(), True, all_position_pairs(pairs)).recording is not None
    for part, layers in (("resid_pre", (29,)), ("value", (0, 29)), ("query", (14,)), ("pattern", (28,))):
        cells = [c for c in cells_of(model, pairs, part) if c.layer in layers]
        fast, _ = run_cells(model, pairs, cells, 4, fast=True)
        ref, _ = run_cells(model, pairs, cells, 4, fast=False)
        torch.testing.assert_close(fast.nan_to_num(), ref.nan_to_num(), atol=1e-4, rtol=0)


def test_attribution_patching_tracks_exact_patching(tiny_model):
    from pipeline.patching.attribution_patching import estimate
    from pipeline.stages.patching import agreement_scores

    # On a random tiny model the gradient estimate tracks exact patching only on average over prompts
    # (12 prompts: r 0.96 for resid_pre, 0.68 for output; 6 prompts gave r -0.56 for resid_pre); the exact
    # check of the estimate is test_attribution_patching_is_the_directional_derivative below.
    pairs = pair_prompts(tiny_model, small_dataset(12), make_cfg(["metric=logit_diff"]).direction, True)
    approx = estimate(tiny_model, pairs, ["resid_pre", "output"], batch_size=3)
    # Micro-batches group prompts by length: each estimate still lands on its own prompt, and
    # equals the estimate of that prompt run alone.
    assert len(set(pairs.clean.last.tolist())) > 1
    alone = estimate(tiny_model, pairs, ["resid_pre", "output"], batch_size=1)
    for part in ("resid_pre", "output"):
        torch.testing.assert_close(approx[part], alone[part], atol=1e-5, rtol=0, equal_nan=True)
    for part in ("resid_pre", "output"):
        exact = ours(tiny_model, pairs, part)
        assert torch.equal(torch.isnan(exact), torch.isnan(approx[part]))
        scores = agreement_scores(exact.nanmean(-1).flatten().numpy(), approx[part].nanmean(-1).flatten().numpy())
        assert scores["pearson_r"] > 0.6, (part, scores)
    # A shared-prefix position has clean == corrupted activations: the estimate is no change at all.
    first = pairs.role_names.index("pre1")
    unpatched = ours(tiny_model, pairs, "resid_pre")[0, first]
    torch.testing.assert_close(approx["resid_pre"][0, first], unpatched, atol=1e-4, rtol=0)


@pytest.mark.parametrize("metric", ["logit_diff", "favorability"])
def test_attribution_patching_is_the_directional_derivative(tiny_model, metric):
    """Attribution patching's change of a cell equals the central finite difference of the metric
    along (clean - corrupted activation) at that cell's positions, prompt by prompt, on padded
    prompts of mixed lengths: the gradient estimate is exact to first order for any linear metric."""
    from pipeline.forward import last_token_logits
    from pipeline.patching.attribution_patching import estimate
    from pipeline.patching.sweeps import all_position_pairs

    pairs = pairs_for(tiny_model, small_dataset(5), make_cfg([f"metric={metric}"]))
    approx = estimate(tiny_model, pairs, ["resid_pre", "output"], batch_size=2)
    all_pos = all_position_pairs(pairs)
    with torch.no_grad():
        _, clean_cache = tiny_model.run_with_cache(pairs.clean.tokens, attention_mask=pairs.clean.attention_mask)
        _, corr_cache = tiny_model.run_with_cache(pairs.corrupted.tokens, attention_mask=pairs.corrupted.attention_mask)
    base = pairs.answers.values(last_token_logits(tiny_model, pairs.corrupted))
    eps, layer, role = 1e-2, 1, pairs.role_names.index("utt_last")
    cases = [("resid_pre", role, "blocks.1.hook_resid_pre"), ("output", 2, "blocks.1.attn.hook_z")]
    for part, index, hook in cases:
        delta = torch.zeros_like(corr_cache[hook])
        for i in range(len(pairs)):
            if part == "resid_pre":
                k, c = pairs.corrupted_pos[i, role], pairs.clean_pos[i, role]
                delta[i, k] = clean_cache[hook][i, c] - corr_cache[hook][i, k]
            else:
                k, c = all_pos[i]
                delta[i, k, index] = clean_cache[hook][i, c, index] - corr_cache[hook][i, k, index]

        def shifted(sign):
            hooks = [(hook, lambda x, hook: x + sign * eps * delta)]
            with torch.no_grad():
                return pairs.answers.values(last_token_logits(tiny_model, pairs.corrupted, hooks))

        derivative = (shifted(1) - shifted(-1)) / (2 * eps)
        torch.testing.assert_close(approx[part][layer, index] - base, derivative, atol=2e-3, rtol=2e-2)
        assert derivative.abs().max() > 1e-3


def test_normalized_metric_is_the_notebooks_and_zero_when_nothing_changes():
    from pipeline.metrics import Anchors

    clean, corrupted = torch.tensor([2.0, 1.0, 3.0, 0.5]), torch.tensor([0.0, -1.0, 1.0, -2.0])
    anchors = Anchors.from_values(clean, corrupted)
    patched = torch.tensor([1.0, 0.0, 2.5, -1.0])
    notebook = (patched.mean() - corrupted.mean()) / (clean.mean() - corrupted.mean())
    torch.testing.assert_close(anchors.normalize(patched).mean(), notebook)
    torch.testing.assert_close(anchors.normalize(clean).mean(), torch.tensor(1.0))
    # A patch that changes nothing reads 0 on any subset of prompts (e.g. those that have a role).
    assert torch.equal(anchors.normalize(corrupted)[[1, 3]], torch.zeros(2))


def test_plan_runs_cuts_at_start_changes_once_a_forward_is_big_enough():
    from pipeline.patching.engine import plan_runs

    starts = [0, 0, 5, 5, 5, 9, 9, 9, 9, 9]
    runs = plan_runs(starts, width=10, rows_per_run=4, min_tokens=10)
    assert runs == [(0, 2), (2, 5), (5, 9), (9, 10)]  # cut where the start moves on, or at 4 rows
    assert plan_runs(starts, width=10, rows_per_run=100, min_tokens=1000) == [(0, 10)]  # never big enough: one forward
    assert plan_runs([], width=10, rows_per_run=4) == []


def test_attribution_patching_cell_changes_equal_a_loop_over_prompts():
    from pipeline.patching.attribution_patching import estimate_cell_changes, padded_positions

    g = torch.Generator().manual_seed(0)
    b, n_pos, heads = 3, 7, 4
    # Each prompt's (corrupted, clean) positions, of different counts; clean prompts are longer.
    all_pos = [(torch.tensor([0, 1, 2, 5]), torch.tensor([0, 1, 3, 6])), (torch.tensor([0, 4]), torch.tensor([0, 5])),
               (torch.tensor([0, 1, 2, 3, 4, 6]), torch.tensor([0, 1, 2, 3, 5, 7]))]
    k_idx, c_idx, valid = padded_positions(all_pos)
    for part, shape_c, shape_k in (("output", (b, n_pos + 1, heads, 5), (b, n_pos, heads, 5)),
                                   ("pattern", (b, heads, n_pos + 1, n_pos + 1), (b, heads, n_pos, n_pos))):
        clean, corrupted, grad = torch.randn(shape_c, generator=g), torch.randn(shape_k, generator=g), torch.randn(shape_k, generator=g)
        got = estimate_cell_changes(part, clean, corrupted, grad, None, None, k_idx, c_idx, valid)
        for i, (k, c) in enumerate(all_pos):
            for h in range(heads):
                if part == "pattern":
                    want = sum(float((clean[i, h, cq, ck] - corrupted[i, h, kq, kk]) * grad[i, h, kq, kk])
                               for cq, kq in zip(c, k) for ck, kk in zip(c, k))
                else:
                    want = sum(float((clean[i, cp, h] - corrupted[i, kp, h]) @ grad[i, kp, h]) for cp, kp in zip(c, k))
                assert abs(float(got[h, i]) - want) < 1e-4, (part, i, h)
    # Role parts: one position per role, NaN where the prompt lacks the role.
    clean, corrupted, grad = torch.randn(b, n_pos + 1, 6, generator=g), torch.randn(b, n_pos, 6, generator=g), torch.randn(b, n_pos, 6, generator=g)
    clean_pos, corrupted_pos = torch.tensor([[0, 2], [1, -1], [3, 4]]), torch.tensor([[0, 1], [1, -1], [2, 6]])
    got = estimate_cell_changes("resid_pre", clean, corrupted, grad, clean_pos, corrupted_pos, k_idx, c_idx, valid)
    assert torch.isnan(got[1, 1]) and torch.isfinite(got[0]).all()
    want = ((clean[2, 4] - corrupted[2, 6]) * grad[2, 6]).sum()
    torch.testing.assert_close(got[1, 2], want)
