"""Bad input: one clear line on stderr naming what is wrong and where, a non-zero exit, and no
run presented as finished."""

import json

import pytest

from conftest import run_cli

GOOD_HEADER = "prompt_aae,prompt_sae,best_attr_aae,best_attr_sae\n"
GOOD_ROW = '"The person says: "" he be working "" The person is","The person says: "" he\'s usually working "" The person is",lazy,intelligent\n'


def check_error(result, *needles):
    assert result.returncode != 0
    # Progress bars may come before it; the message is the last line, the only error, no traceback.
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("dialect-circuits: error:"), result.stderr
    assert "Traceback" not in result.stderr and sum("error" in line.lower() for line in lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def assert_not_complete(tmp_path):
    for manifest in (tmp_path / "outputs").glob("*/*/manifest.json"):
        assert json.loads(manifest.read_text())["status"] != "complete"
    assert not list((tmp_path / "outputs").glob("*/*/report.html"))


@pytest.mark.parametrize(
    "content, needles",
    [
        (None, ["no such file"]),
        ("", ["empty"]),
        (GOOD_HEADER, ["no rows"]),
        ("prompt_aae,prompt_SAE,best_attr_aae,best_attr_sae\n" + GOOD_ROW.replace("\n", "") + "\n", ["column 2", "'prompt_SAE'", "'prompt_sae'"]),
        ("prompt_aae,prompt_sae,best_attr_aae\nx,y,lazy\n", ["column 4 is missing", "best_attr_sae"]),
        (GOOD_HEADER + GOOD_ROW + '"a "" x "" b","a "" y "" b",lazy,\n', ["best_attr_sae", "line 3"]),
        (GOOD_HEADER + GOOD_ROW + '"a "" x "" b",NaN,lazy,kind\n', ["prompt_sae", "line 3"]),
        (GOOD_HEADER + GOOD_ROW.replace("lazy", "happy-go-lucky"), ["not one token", "happy-go-lucky"]),
    ],
    ids=["missing", "empty-file", "header-only", "misnamed-column", "missing-column", "empty-cell", "nan-cell", "multi-token"],
)
def test_bad_csv(tmp_path, content, needles):
    path = tmp_path / "data.csv"
    if content is not None:
        path.write_text(content)
    result = run_cli(["model=tiny", "stage=cache", f"dataset.path={path}"], cwd=tmp_path)
    check_error(result, str(path) if content is not None else "data.csv", *needles)
    assert_not_complete(tmp_path)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["model=no-such-model"], ["unknown model 'no-such-model'", "smollm2-135m"]),
        (["stage=no-such-stage"], ["unknown stage 'no-such-stage'", "attribution"]),
        (["model=tiny", "device=cuda"], ["device=cuda", "no CUDA GPU"]),
        (["model=gpt2-small", "model.name=/nonexistent/model-dir"], ["cannot load model", "/nonexistent/model-dir"]),
    ],
    ids=["unknown-model", "unknown-stage", "cuda-without-gpu", "unknown-model-dir"],
)
def test_bad_request(tmp_path, args, needles):
    result = run_cli([*args, "stage=cache"] if "stage=no-such-stage" not in args else args, cwd=tmp_path)
    check_error(result, *needles)
    assert_not_complete(tmp_path)
