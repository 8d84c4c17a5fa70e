"""Bad input, through the CLI as a user meets it: every malformed dataset CSV and config is refused
with exactly one line on stderr (where, line, column, what is wrong, what would be accepted), a
non-zero exit, no traceback, and a manifest that says `failed`. Most cases fail before the
tokenizer loads, so each costs about a second; the rest load the tokenizer only."""

import json

import pandas as pd
import pytest

from conftest import only_run_dir, run_cli

HEADER = "prompt_aae,prompt_sae,best_attr_aae,best_attr_sae"
AAE = 'The person says: " he be working " The person is'
SAE = 'The person says: " he is usually working " The person is'


def row(aae=AAE, sae=SAE, a="lazy", b="smart") -> str:
    quote = lambda s: '"' + s.replace('"', '""') + '"'  # noqa: E731
    return f"{quote(aae)},{quote(sae)},{a},{b}"


def good(*rows: str, header: str = HEADER) -> bytes:
    return ("\n".join([header, *(rows or [row()])]) + "\n").encode()


ACCEPTED = "a UTF-8 CSV whose header starts prompt_aae,prompt_sae,best_attr_aae,best_attr_sae, then one row per prompt pair"
HEADER_START = "the header starts prompt_aae,prompt_sae,best_attr_aae,best_attr_sae"

# id -> (file content, or None for no file, or "dir"; the exact line after "dialect-circuits: error: ")
CSV_CASES = {
    "missing-file": (None, "{path}: no such file; accepted: " + ACCEPTED),
    "directory": ("dir", "{path}: is a directory, not a file; accepted: " + ACCEPTED),
    "empty-file": (b"", "{path}: the file is empty; accepted: " + ACCEPTED),
    "header-only": (good(header=HEADER)[: len(HEADER) + 1], "{path}: the file has a header but no rows; accepted: " + ACCEPTED),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "{path}, line 3: binary data, not text (a NUL byte, byte 1 of the line); accepted: UTF-8 CSV text"),
    "latin-1": (good(row(), row(aae='The person says: " he be at the café " The person is')).replace("é".encode(), b"\xe9"),
                "{path}, line 3: byte 0xe9 (byte 38 of the line) is not UTF-8: it reads as 'é' in Latin-1/Windows-1252, so the file is "
                "probably in that encoding; accepted: UTF-8 text (save the file as UTF-8; a UTF-8 byte order mark and CRLF "
                "line ends are fine)"),
    "utf-16": (good().decode().encode("utf-16"), "{path}: the file is UTF-16 text; accepted: UTF-8 text (save the file as UTF-8)"),
    "misnamed-column": (good(header="prompt_aae,prompt_SAE,best_attr_aae,best_attr_sae"),
                        "{path}, line 1: column 2 is named 'prompt_SAE'; accepted: 'prompt_sae' as column 2: " + HEADER_START),
    "missing-column": (b"prompt_aae,prompt_sae,best_attr_aae\nx,y,lazy\n",
                       "{path}, line 1: column 4 is missing (the header has 3 columns); accepted: 'best_attr_sae' as column 4: " + HEADER_START),
    "duplicated-header": (good(row() + ",a,b", header=HEADER + ",feature,feature"),
                          "{path}, line 1: column 6 repeats the name 'feature' of column 5; accepted: a different name for each column"),
    "empty-cell": (good(row(), row(b=""), row()), "{path}, line 3, column best_attr_sae: the cell is empty; accepted: an attribute word such as 'lazy'"),
    "nan-cell": (good(row(), row(sae="NaN")).replace(b'"NaN"', b"NaN"),
                 "{path}, line 3, column prompt_sae: the cell is 'NaN', a missing value; accepted: a prompt"),
    "quoted-newline": (good(row(), row(aae='The person says: " he be\nworking " The person is')),
                       "{path}, line 3, column prompt_aae: the cell holds a line break (a quoted field over lines 3-4); "
                       "accepted: each prompt and attribute on one line"),
    "too-many-fields": (good(row(), row() + ",extra"),
                        "{path}, line 3: the row has 5 fields but the header has 4 columns; accepted: one field per column; quote a field that holds a comma"),
    "stray-quote": (good(row()) + b'"The person says: " he be working",x,lazy,smart\n',
                    '{path}, line 3: not valid CSV (\',\' expected after \'"\'); accepted: fields quoted as a whole, with a '
                    'quote inside a quoted field written twice ("")'),
    "unclosed-quote": (good(row()) + b'"The person says he be working,x,lazy,smart\n',
                       '{path}, line 3: a quoted field opened here is never closed; accepted: fields whose quotes are closed '
                       '(a quote inside a quoted field is written twice: "")'),
    "identical-answers": (good(row(), row(b="lazy"), "x,y,a,a", row(b="lazy")),
                          "{path}, line 3, column best_attr_sae: best_attr_aae and best_attr_sae are both 'lazy', so the logit "
                          "difference is 0 by construction; accepted: two different attributes (2 more problems after this one)"),
    "identical-prompts": (good(row(sae=AAE)), "{path}, line 2, column prompt_sae: prompt_aae and prompt_sae are the same text, so "
                          "there is no dialect difference to measure; accepted: an AAE and an SAE prompt that differ"),
    # These two load the tokenizer (not the model).
    "multi-token-attribute": (good(row(), row(a="happy-go-lucky")),
                              "{path}, line 3, column best_attr_aae: the attribute 'happy-go-lucky' is 6 tokens for this model's "
                              "tokenizer ('Ġhappy', '-', 'go', '-', 'l', 'ucky'), not one token; accepted: an attribute that is one token "
                              "with its leading space (the run's model decides)"),
    "prompt-longer-than-context": (good(row(), row(aae='The person says: " ' + "he be working " * 2000 + '" The person is')),
                                   "{path}, line 3, column prompt_aae: the prompt is 6009 tokens, longer than the model's context "
                                   "of 128 tokens (one of them the BOS token); accepted: a prompt of at most 127 tokens"),
}

def check_refused(result, line: str, tmp_path) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines() == ["dialect-circuits: error: " + line], result.stderr
    manifests = list((tmp_path / "outputs").glob("*/*/manifest.json"))
    assert [json.loads(m.read_text())["status"] for m in manifests] in ([], ["failed"])
    assert not list((tmp_path / "outputs").glob("*/*/dataset.csv"))


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_bad_csv_is_one_line(tmp_path, tiny_model, case):
    content, line = CSV_CASES[case]
    path = tmp_path / "data.csv"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    result = run_cli(["model=tiny", "stage=data", f"dataset.path={path}"], cwd=tmp_path)
    check_refused(result, line.format(path=path), tmp_path)
    assert json.loads(next((tmp_path / "outputs").glob("*/*/manifest.json")).read_text())["status"] == "failed"


def test_bom_crlf_extra_columns_and_repeated_rows_are_accepted(tmp_path, tiny_model):
    """UTF-8 with a byte order mark and CRLF line ends; extra columns of any name and content
    (a `template` column of numbers broke the run once); a repeated row is a warning with its count."""
    extra = ",template,index,notes,Unnamed: 9"
    rows = [row() + ',0,7,"a note, with ""quotes""\nand a line break",', row(b="kind") + ",1,x,,3.5",
            row() + ',0,7,"a note, with ""quotes""\nand a line break",', row(a="rude", b="calm") + ",2,,plain,"]
    content = b"\xef\xbb\xbf" + good(*rows, header=HEADER + extra).replace(b"\n", b"\r\n")
    (tmp_path / "data.csv").write_bytes(content)
    result = run_cli(["model=tiny", "stage=cache", "dataset.path=data.csv"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data.csv: 1 row repeats an earlier row's prompts and answers (line 5); kept, so they count twice" in result.stdout
    run_dir = only_run_dir(tmp_path)
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
    dataset = pd.read_csv(run_dir / "dataset.csv", dtype=str, keep_default_na=False)
    assert list(dataset.columns) == (HEADER + extra).split(",") + ["split"] and len(dataset) == 4
    assert dataset.template.tolist() == ["0", "1", "0", "2"] and dataset.notes[0] == 'a note, with "quotes"\r\nand a line break'
    # The CSV names its answers and the command no metric: the run measures those answers, and says so.
    assert "gives each prompt's answers (best_attr_aae, best_attr_sae) and the command names no metric: measuring those " \
           "answers with metric=logit_diff" in result.stdout
    assert json.loads((run_dir / "tables" / "baseline.json").read_text())["metric"] == "logit_diff"
    assert "name: logit_diff" in (run_dir / ".hydra" / "config.yaml").read_text()


def test_a_named_rated_metric_on_a_csv_says_the_answers_are_unread(tmp_path):
    (tmp_path / "data.csv").write_bytes(good(row(), row(a="rude", b="calm")))
    result = run_cli(["model=tiny", "stage=cache", "dataset.path=data.csv", "metric=favorability"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gives each prompt's answers (best_attr_aae, best_attr_sae), which metric=favorability does not read" in result.stdout
    run_dir = only_run_dir(tmp_path)
    assert json.loads((run_dir / "tables" / "baseline.json").read_text())["metric"] == "favorability"


# id -> (arguments, the exact line after "dialect-circuits: error: ")
CONFIG_CASES = {
    "unknown-key": (["batch_sise=3"], "command line: batch_sise is not a config key; accepted: a key of the composed config "
                    "such as 'batch_size', or +batch_sise=... to add a new one (see dialect-circuits --cfg job)"),
    "unknown-added-key": (["+dataset.max_prompt=3"], "config: dataset.max_prompt is not a key this pipeline reads; accepted: "
                          "a known key such as 'dataset.max_prompts' (see dialect-circuits --cfg job)"),
    "bad-override-syntax": (["batch_size=[1"], "command line: cannot read the override (no viable alternative at input '[1'); "
                            "accepted: key=value, +key=value to add a key, ~key to delete one (Hydra's override grammar)"),
    "wrong-type": (["batch_size=abc"], "config: batch_size='abc' is not allowed; accepted: an integer of 1 or more"),
    "wrong-type-of-a-model-key": (["model.n_layer=two"], "config: model.n_layer='two' has the wrong type; accepted: an integer"),
    "batch-size-0": (["batch_size=0"], "config: batch_size=0 is not allowed; accepted: an integer of 1 or more"),
    "max-prompts-negative": (["dataset.max_prompts=-1"], "config: dataset.max_prompts=-1 is not allowed; accepted: null "
                             "(every row) or an integer of 1 or more"),
    "unknown-sweep": (["stage=patching", "patching.sweeps=[resid_pre,heads]"], "config: patching.sweeps names an unknown "
                      "sweep 'heads'; accepted: any of resid_pre, block, head_out, head_parts"),
    "unknown-model": (["model=no-such-model"], "unknown model 'no-such-model': choose from gemma-2-2b, gpt2-large, "
                      "gpt2-medium, gpt2-small, gpt2-xl, llama-3.2-1b, pythia-1.4b-deduped, pythia-160m-deduped, "
                      "pythia-1b-deduped, pythia-2.8b-deduped, pythia-410m-deduped, pythia-70m-deduped, qwen2.5-0.5b, "
                      "qwen2.5-1.5b, smollm2-1.7b, smollm2-135m, smollm2-360m, tiny "
                      "(or keep a model config and set model.name=<hub name or local dir>)"),
    "unknown-stage": (["stage=no-such-stage"], "unknown stage 'no-such-stage': choose from all, attribution, cache, circuit, data, intervene, patching, report"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_is_one_line(tmp_path, case):
    args, line = CONFIG_CASES[case]
    result = run_cli(["model=tiny", "stage=data", *args], cwd=tmp_path)
    check_refused(result, line, tmp_path)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["model=tiny", "device=cuda"], ["device=cuda", "no CUDA GPU"]),
        (["model=gpt2-small", "model.name=/nonexistent/model-dir"], ["cannot load model", "/nonexistent/model-dir"]),
    ],
    ids=["cuda-without-gpu", "unknown-model-dir"],
)
def test_bad_request(tmp_path, args, needles):
    result = run_cli([*args, "stage=cache"], cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("dialect-circuits: error:"), result.stderr
    assert sum("error" in line.lower() for line in lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    for manifest in (tmp_path / "outputs").glob("*/*/manifest.json"):
        assert json.loads(manifest.read_text())["status"] == "failed"
