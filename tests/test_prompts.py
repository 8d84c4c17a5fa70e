"""Prompt batches: tokenization equals the model's own, roles line up clean and corrupted
prompts, and batched metrics equal one-prompt-at-a-time runs on prompts of mixed lengths."""

import pandas as pd
import pytest
import torch

from pipeline.data.builder import build_rows
from pipeline.data.dataset import pair_prompts, select
from pipeline.forward import map_last_logits
from pipeline.prompts import assign_roles, split_by_difference, tokenize
from conftest import make_cfg


def small_dataset(n=12):
    rows = select(build_rows(), None, n)
    rows.insert(2, "best_attr_aae", "lazy")
    rows.insert(3, "best_attr_sae", "intelligent")
    return rows


def test_tokenize_matches_model_to_tokens(tiny_model):
    df = small_dataset()
    pairs = pair_prompts(tiny_model, df, make_cfg([]).direction, True)
    for i, prompt in enumerate(pairs.clean.prompts):
        expected = tiny_model.to_tokens(prompt)[0]
        n = int(pairs.clean.last[i]) + 1
        assert pairs.clean.tokens[i, :n].tolist() == expected.tolist()
        assert pairs.clean.attention_mask[i, :n].all() and not pairs.clean.attention_mask[i, n:].any()


def test_roles_match_template_parts(tiny_model):
    df = small_dataset()
    pairs = pair_prompts(tiny_model, df, make_cfg([]).direction, True)
    assert pairs.clean_pos.shape == (len(df), len(pairs.role_names))
    assert pairs.role_names[0] == "pre0" and pairs.role_names[-1] == "suf-1"
    end = pairs.role_names.index("suf-1")
    # The final role is every prompt's real last token on both sides, whatever their lengths.
    assert torch.equal(pairs.clean_pos[:, end], pairs.clean.last)
    assert torch.equal(pairs.corrupted_pos[:, end], pairs.corrupted.last)
    # Lengths really differ somewhere, so raw-index matching would be wrong.
    assert (pairs.clean.last != pairs.corrupted.last).any()
    for i in range(len(df)):
        roles = pairs.clean.role_labels[i]
        text = "".join(pairs.clean.str_tokens[i][j] for j, r in enumerate(roles) if r.startswith("utt"))
        assert text.strip() == df.utterance_aae[i]


def test_assign_roles_counts_suffix_from_end():
    # "A b " + "c d" + " e f": tokens A, " b", " c", " d", " e", " f" with a BOS in front.
    offsets = [(0, 1), (1, 3), (3, 5), (5, 7), (7, 9), (9, 11)]
    assert assign_roles(offsets, 4, 7, 1) == ["pre0", "pre1", "pre2", "utt_first", "utt_last", "suf-2", "suf-1"]


def test_split_by_difference_snaps_to_words():
    a, b = split_by_difference('He said " she be working " so', 'He said " she is usually working " so')
    assert a == ('He said " she ', "be", ' working " so')
    assert b[1] == "is usually"


def test_batched_logit_diff_equals_one_at_a_time(tiny_model, embedded_model):
    df = small_dataset(10)
    for model in (tiny_model, embedded_model):
        pairs = pair_prompts(model, df, make_cfg([]).direction, True)
        batch = pairs.corrupted
        assert len(set(batch.last.tolist())) > 1, "prompts must have mixed lengths"
        batched = map_last_logits(model, batch, 10, lambda lg, rows: pairs.answers[rows].values(lg))
        single = torch.cat([
            pairs.answers[i : i + 1].values(model(model.to_tokens(p))[:, -1]) for i, p in enumerate(batch.prompts)
        ])
        torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)


def test_direction_override_swaps_sides_and_answers(tiny_model):
    df = small_dataset(6)
    aae = pair_prompts(tiny_model, df, make_cfg(["direction=aae_clean"]).direction, True)
    sae = pair_prompts(tiny_model, df, make_cfg(["direction=sae_clean"]).direction, True)
    assert aae.clean.prompts == sae.corrupted.prompts == list(df.prompt_aae)
    assert aae.corrupted.prompts == sae.clean.prompts == list(df.prompt_sae)
    # The metric is oriented to the AAE side; sae_clean negates it (the answer order flipped).
    assert torch.equal(aae.answers.tokens, sae.answers.tokens) and torch.equal(aae.answers.weights, -sae.answers.weights)
    assert aae.answers.weights[0].tolist() == [1.0, -1.0]
    assert aae.role_names == sae.role_names


def test_embedded_model_knows_paris(embedded_model):
    logits = embedded_model(embedded_model.to_tokens("The capital of France is"))
    assert embedded_model.tokenizer.decode([int(logits[0, -1].argmax())]) == " Paris"
