"""Bring your own data: pair, template and attribute files with strict checks; every attribute
scored by the chain rule, batched, equal to one plain forward per prompt and attribute; the task
presets; and the real pair file of Hofmann et al. (2024) where this checkout has it."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.artifacts import safe_open_metadata
from pipeline.data.inputs import read_attributes, read_pairs, read_templates
from pipeline.data.resources import TASKS, load_attributes, load_templates
from pipeline.data.scoring import attribute_tokens, score_attributes
from pipeline.errors import PipelineError
from pipeline.prompts import tokenize
from pipeline.runner import run
from conftest import REPO, make_cfg, only_run_dir, run_cli
from test_bad_input import check_refused

HOFMANN = REPO.parent / "shared" / "data" / "hofmann"
needs_hofmann = pytest.mark.skipif(not (HOFMANN / "habitual.txt").is_file(), reason="no ../shared/data/hofmann in this checkout")

PROMPTS = [
    'The person says: " he be working late " The person is',
    'A person who says " she stay cooking " is',
    'They say: " they finna go to the store later tonight " What are one of their traits? They are',
]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def one_at_a_time(model, prompt_tokens: list[int], attribute: list[int]) -> float:
    """The reference: the prompt followed by the whole attribute, one plain forward, no padding."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_tokens + attribute]))[0].float()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(prompt_tokens) - 1 + j, t]) for j, t in enumerate(attribute))


@pytest.mark.parametrize("max_row_tokens", [512, 40], ids=["one-row", "continuations-over-rows"])
def test_multi_token_scores_equal_one_prompt_at_a_time(tiny_model, max_row_tokens):
    splits = [(p[: p.index('"') + 1], p.split('"')[1], p[p.index('"', p.index('"') + 1):]) for p in PROMPTS]
    batch = tokenize(tiny_model, PROMPTS, splits, True)
    assert len(set(batch.last.tolist())) == 3, "prompts of mixed lengths, so rows are padded"
    names = ["lazy", "happy-go-lucky", "intelligent", "police officer", "quick-tempered", "scientifically-minded"]
    attrs = attribute_tokens(tiny_model, names)
    assert attrs.one_token == [True, False, True, False, False, False]
    scores = score_attributes(tiny_model, batch, attrs, batch_size=2, max_row_tokens=max_row_tokens)
    for i in range(len(PROMPTS)):
        prompt = batch.tokens[i, : int(batch.last[i]) + 1].tolist()
        reference = torch.tensor([one_at_a_time(tiny_model, prompt, ids) for ids in attrs.ids])
        torch.testing.assert_close(scores[i], reference, atol=1e-4, rtol=1e-5)


def test_multi_token_scores_on_the_embedded_model(embedded_model):
    splits = [(p[: p.index('"') + 1], p.split('"')[1], p[p.index('"', p.index('"') + 1):]) for p in PROMPTS[:2]]
    batch = tokenize(embedded_model, PROMPTS[:2], splits, True)
    attrs = attribute_tokens(embedded_model, ["lazy", "acquitted", "happy-go-lucky"])
    scores = score_attributes(embedded_model, batch, attrs, batch_size=2)
    for i in range(2):
        prompt = batch.tokens[i, : int(batch.last[i]) + 1].tolist()
        reference = torch.tensor([one_at_a_time(embedded_model, prompt, ids) for ids in attrs.ids])
        torch.testing.assert_close(scores[i], reference, atol=1e-3, rtol=1e-5)


def test_pair_files_tab_and_csv(tmp_path):
    tab = read_pairs(write(tmp_path, "habitual-be.txt", "he be cracking\the's usually cracking\n\nshe be cracking\tshe's usually cracking\n"))
    assert list(tab.columns) == ["pair_id", "feature", "pronoun", "aae", "sae"]
    assert tab.feature.tolist() == ["habitual_be"] * 2 and tab.pronoun.tolist() == ["he", "she"]
    assert tab.aae[1] == "she be cracking" and tab.pair_id[1] == "habitual_be_0003"
    assert read_pairs(tmp_path / "habitual-be.txt", feature="hab").feature.tolist() == ["hab"] * 2
    csv = read_pairs(write(tmp_path, "p.csv", 'sae,aae,feature\n"he\'s usually tired, man",he be tired,habitual_be\nthey are going to eat,they finna eat,finna\n'))
    assert csv.aae.tolist() == ["he be tired", "they finna eat"] and csv.feature.tolist() == ["habitual_be", "finna"]
    assert csv.sae[0] == "he's usually tired, man" and csv.pair_id[1] == "finna_0003"


@pytest.mark.parametrize(
    "reader, name, text, needles",
    [
        (read_pairs, "p.txt", "", ["p.txt", "empty"]),
        (read_pairs, "p.txt", "he be tired\the's usually tired\nhe be tired he's usually tired\n", ["line 2", "no tab", "AAE<TAB>SAE"]),
        (read_pairs, "p.txt", "a\tb\tc\n", ["line 1", "2 tabs"]),
        (read_pairs, "p.txt", "a\tb\n\t b\n", ["line 2", "AAE utterance is empty"]),
        (read_pairs, "p.txt", "a\tb\nsame\tsame\n", ["line 2", "the same"]),
        (read_pairs, "p.txt", "a\tb\na\tb\n", ["appears twice"]),
        (read_pairs, "p.csv", "aae,standard\na,b\n", ["line 1", "no column 'sae'", "aae, sae"]),
        (read_pairs, "p.csv", "aae,sae,dialect\na,b,c\n", ["unknown column 'dialect'", "pronoun"]),
        (read_pairs, "p.csv", "aae,sae\n", ["no pairs"]),
        (read_pairs, "p.csv", "aae,sae\na,b\nc,d,e\n", ["line 3", "3 cells"]),
        (read_templates, "t.txt", "", ["t.txt", "empty"]),
        (read_templates, "t.txt", 'The person says: " {} " The person is\nThe person is\n', ["line 2", "no {} slot", "exactly one {}"]),
        (read_templates, "t.txt", 'A " {} " and " {} " is\n', ["line 1", "2 {} slots"]),
        (read_templates, "t.txt", 'The person says: {}\n', ["line 1", "nothing after"]),
        (read_templates, "t.txt", 'A " {} " is\n\nA " {} " is\n', ["line 3", "repeats line 1"]),
        (read_attributes, "a.txt", "\n\n", ["a.txt", "empty"]),
        (read_attributes, "a.txt", "lazy\n", ["only one attribute", "at least two"]),
        (read_attributes, "a.txt", "lazy\nkind\nlazy\n", ["line 3", "repeats line 1"]),
        (read_attributes, "a.txt", "lazy\tkind\nrude\n", ["line 1", "one attribute per line"]),
    ],
)
def test_bad_input_files(tmp_path, reader, name, text, needles):
    path = write(tmp_path, name, text)
    with pytest.raises(PipelineError) as err:
        reader(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message, message


def test_task_presets_pass_the_checks_and_fit_the_default_tokenizer(tiny_model):
    """The tiny model has the embedded model's tokenizer: the fixed answers of every task must be
    one token for it, so `+task=<name>` runs every stage on the default model."""
    assert TASKS == ["conviction", "death_penalty", "occupations", "overt", "traits"]
    for task in TASKS:
        cfg = make_cfg([f"+task={task}"]).dataset
        assert cfg.task == task
        templates, attributes = load_templates(task), load_attributes(task)
        assert len(templates) >= 5 and len(attributes) >= 2
        if cfg.answer_pair is not None:
            assert set(cfg.answer_pair) <= set(attributes)
            assert attribute_tokens(tiny_model, list(cfg.answer_pair)).one_token == [True, True]
    conviction = attribute_tokens(tiny_model, load_attributes("conviction"))
    assert dict(zip(conviction.names, conviction.one_token))["acquitted"] is False


def test_user_pairs_with_the_conviction_task_run_every_stage(tmp_path):
    pairs = write(tmp_path, "habitual.txt", "".join(f"{p} be {v}\t{p}{s} usually {v}\n" for p, s in (("he", "'s"), ("they", "'re"))
                                                    for v in ("working", "cooking", "running")))
    common = ["model=tiny", f"dataset.pairs={pairs}", "+task=conviction", "dataset.templates_per_pair=2", "dataset.max_prompts=8",
              "patching.max_prompts=2",
              "patching.sweeps=[resid_pre]", "attribution.bootstrap=50", "patching.bootstrap=50"]
    result = run_cli(common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    dataset = pd.read_csv(run_dir / "dataset.csv")
    assert len(dataset) == 8 and set(dataset.best_attr_aae) == {"guilty"} and set(dataset.best_attr_sae) == {"innocent"}
    assert set(dataset.feature) == {"habitual"} and dataset.prompt_aae.str.contains(" be ").all()
    table = pd.read_csv(run_dir / "tables" / "attribute_association.csv")
    assert set(table.attribute) == {"convicted", "acquitted", "guilty", "innocent"}
    assert table.set_index("attribute").n_tokens["acquitted"] == 2
    logit_diff = pd.read_csv(run_dir / "tables" / "metric.csv")
    assert set(logit_diff.correct) == {" guilty"}
    left_out = json.loads(safe_open_metadata(run_dir / "tensors" / "guise_logprobs.safetensors")["not_answers"])
    assert list(left_out) == ["acquitted"] and "2 tokens" in left_out["acquitted"]
    report = (run_dir / "report.html").read_text()
    assert "left out of the one-token metric" in report and "acquitted (2 tokens)" in report
    assert "guilty (AAE side) / innocent (SAE side), every prompt" in report and "conviction" in report

    # A two-token answer: the analyses that read one token stop before probing, with one line that
    # names it and the one-token attributes the config could take; stage=data alone still runs.
    multi = [*common, "dataset.answer_pair=[convicted,acquitted]"]
    with pytest.raises(PipelineError, match=r"dataset.answer_pair: .*' acquitted' is ' acqu' \+ 'itted'.*' guilty', ' innocent'"):
        run(make_cfg(multi), tmp_path / "a")
    assert not (tmp_path / "a" / "dataset.csv").exists()
    run(make_cfg([*multi, "stage=data"]), tmp_path / "b")
    table = pd.read_csv(tmp_path / "b" / "tables" / "attribute_association.csv")
    assert set(table.attribute) == {"convicted", "acquitted", "guilty", "innocent"}
    # The cheaper probing of one-token attributes only, when asked for.
    run(make_cfg([*common, "stage=data", "dataset.multi_token=false"]), tmp_path / "c")
    table = pd.read_csv(tmp_path / "c" / "tables" / "attribute_association.csv")
    assert set(table.attribute) == {"convicted", "guilty", "innocent"}


def test_bad_template_file_through_the_command(tmp_path):
    templates = write(tmp_path, "templates.txt", 'The person says: " {} " The person is\nA person who says is\n')
    check_refused(run_cli(["model=tiny", "stage=data", f"dataset.templates={templates}"], cwd=tmp_path),
                  f"dataset.templates {templates}, line 2: no {{}} slot in 'A person who says is'; accepted: exactly one {{}} "
                  'where the utterance goes, e.g. The person says: " {} " The person is', tmp_path)


@needs_hofmann
def test_real_pair_and_attribute_files_of_hofmann_et_al(tiny_model):
    pairs = read_pairs(HOFMANN / "habitual.txt")
    assert len(pairs) == 699 and set(pairs.feature) == {"habitual"}
    assert pairs.pronoun.value_counts().to_dict() == {"he": 233, "she": 233, "they": 233}
    assert pairs.aae.str.contains(r"\bbe\b").all()
    katz = read_attributes(HOFMANN / "katz.txt")
    assert len(katz) == 37 and set(katz) <= set(load_attributes("traits"))
    assert read_attributes(HOFMANN / "guilt.txt") == ["acquitted", "convicted"]  # no final newline
    assert read_attributes(HOFMANN / "penalty.txt") == ["life", "death"]
    occupations = attribute_tokens(tiny_model, read_attributes(HOFMANN / "occupations.txt"))
    assert not all(occupations.one_token)  # multi-token ones are scored, not dropped


def test_docs_examples_are_valid_files(tmp_path):
    """The docs' five-line example of each file (docs/how-to/own-data.md) reads as it says."""
    import re

    text = (REPO / "docs" / "how-to" / "own-data.md").read_text()
    section = text[text.index("## Pairs, templates and attributes"): text.index("**Tasks**")]
    blocks = [b for b in re.findall(r"\n\n((?:    .*\n)+)", section) if "dialect-circuits" not in b]
    files = [write(tmp_path, name, "".join(line[4:] + "\n" for line in block.splitlines()).replace("<TAB>", "\t"))
             for name, block in zip(["habitual.txt", "pairs.csv", "templates.txt", "attributes.txt"], blocks)]
    assert len(files) == 4 and all(len(b.splitlines()) == 5 for b in blocks)
    assert read_pairs(files[0]).feature.tolist() == ["habitual"] * 5
    assert read_pairs(files[1]).feature.tolist() == ["finna", "aint", "copula_deletion", "aint"]
    assert len(read_templates(files[2])) == 5 and read_attributes(files[3])[2] == "happy-go-lucky"


@needs_hofmann
def test_shipped_ratings_and_stereotypes_are_hofmann_et_als_numbers():
    """The project's data files carry the published numbers unchanged (users have no ../shared)."""
    from pipeline.data.ratings import packaged_ratings
    from pipeline.data.stereotypes import load_stereotypes

    favorability = pd.read_csv(HOFMANN / "favorability.tsv", sep="\t")
    assert packaged_ratings("favorability") == {a.lower(): float(f) for a, f in zip(favorability.attribute, favorability.favorability)}
    prestige = pd.read_csv(HOFMANN / "occupation_prestige.tsv", sep="\t")
    shipped = packaged_ratings("prestige")
    assert all(shipped[o.lower()] == float(p) for o, p in zip(prestige.occupation, prestige.prestige))
    studies = pd.read_csv(HOFMANN / "stereotypes.tsv", sep="\t")
    mine = load_stereotypes()
    assert mine[["study", "year", "attribute"]].astype(str).values.tolist() == studies[["study", "year", "attribute"]].astype(str).values.tolist()
    assert np.allclose(mine.score, studies.score)
