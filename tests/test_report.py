"""The report stage: report.html built from a fake run directory (no model), checked as text and,
where Chromium is installed, rendered by headless Chromium from disk with the network off."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from markupsafe import escape
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from pipeline import figures
from pipeline.artifacts import write_atomic, write_figure, write_json, write_table
from pipeline.stages import report
from pipeline.stages.report import CAPTIONS, caption_for, group_for

# Figure pages of the fake run that the report shows in its figure sections, with their group.
FIGURE_GROUP = {
    "head_attribution": "Attribution",
    "patch_resid_pre": "Activation patching",
    "attrpatch_vs_exact": "Attribution patching",
    "token_frequency": "Other figures",
}


def make_run(run_dir: Path) -> Path:
    """A run directory as the data and cache stages (and a patching stage) would leave it."""
    features = ["habitual_be", "habitual_be", "finna", "finna"]
    dataset = pd.DataFrame({
        "prompt_aae": [f'The person says: " he be {w} " The person is' for w in ("running", "cooking")]
                      + [f'The person says: " he finna {w} " The person is' for w in ("leave", "eat")],
        "prompt_sae": [f'The person says: " he is usually {w} " The person is' for w in ("running", "cooking")]
                      + [f'The person says: " he is about to {w} " The person is' for w in ("leave", "eat")],
        "best_attr_aae": ["lazy", "loud", "rude", "lazy"],
        "best_attr_sae": ["smart", "calm", "polite", "smart"],
        "feature": features,
        "template": ['The person says: " {} " The person is'] * 4,
        "pair_id": ["habitual_be_00", "habitual_be_01", "finna_00", "finna_01"],
        "pronoun": ["he"] * 4,
    })
    write_table(run_dir / "dataset.csv", dataset)
    write_json(run_dir / "manifest.json", {
        "created": "2026-11-27T10:00:00+00:00", "command": "dialect-circuits model=tiny stage=patching",
        "config_hash": "0123456789abcdef", "versions": {"python": "3.11", "plotly": "test"},
        "model": {"name": "tiny-gpt2", "source": "tiny"}, "direction": "aae_clean", "device": "cpu",
        "dataset_hash": "f" * 64, "status": "running",
        "stages": {"data": {"status": "done", "seconds": 1.5}, "cache": {"status": "done", "seconds": 0.7},
                   "patching": {"status": "done", "seconds": 3.25}, "report": {"status": "running"}},
    })
    association = pd.DataFrame({"attribute": ["lazy", "loud", "rude", "calm", "polite", "smart"],
                                "association": [0.9, 0.5, 0.2, -0.1, -0.4, -0.8]})
    association["ci_low"], association["ci_high"] = association.association - 0.3, association.association + 0.3
    association["n_prompts"] = 4
    write_table(run_dir / "tables" / "attribute_association.csv", association)
    write_table(run_dir / "tables" / "baseline_null.csv", pd.DataFrame([{
        "feature": "all", "n_prompts": 4, "n_pairs": 4, "gap": 0.0467, "ci_low": 0.0071, "ci_high": 0.0853, "sem": 0.02,
        "detectable": 0.056, "null_mean": 0.0, "null_low": -0.04, "null_high": 0.04, "p_perm": 0.0123, "null_draws": 16,
        "null_exact": True, "answers": "none (rated metric)"}]))
    write_table(run_dir / "tables" / "prejudice_score.csv", pd.DataFrame([
        {"score": "one_token", "metric": "favorability", "n_attributes": 46, "n_prompts": 4, "n_pairs": 4, "score_value": 0.0467,
         "ci_low": 0.0071, "ci_high": 0.0853, "null_low": -0.04, "null_high": 0.04, "p_perm": 0.0123, "sd_per_pair": 0.23,
         "pair_pearson_r": 0.61, "pair_sign_agreement": 0.75},
        {"score": "chain_rule", "metric": "favorability", "n_attributes": 83, "n_prompts": 4, "n_pairs": 4, "score_value": 0.0931,
         "ci_low": 0.055, "ci_high": 0.132, "null_low": -0.05, "null_high": 0.05, "p_perm": 0.0002, "sd_per_pair": 0.3,
         "pair_pearson_r": 0.61, "pair_sign_agreement": 0.75}]))
    from pipeline.data.stereotypes import stereotype_agreement
    studies, model = stereotype_agreement(association, 100, 0)
    write_json(run_dir / "tables" / "stereotype_agreement.json", {"studies": studies.to_dict("records"), "model": model})
    write_figure(run_dir / "figures" / "stereotype_agreement.html", figures.stereotype_agreement(studies, model))
    write_json(run_dir / "tables" / "baseline.json", {
        "direction": "aae_clean", "n_prompts": 4, "clean_mean": 1.25, "corrupted_mean": -0.5, "metric": "favorability",
        "headline": "covert prejudice score (favorability)",
        "by_feature": {"habitual_be": {"clean_metric": 1.5, "corrupted_metric": -0.25},
                       "finna": {"clean_metric": 1.0, "corrupted_metric": -0.75}},
    })
    write_atomic(run_dir / "tables" / "test_prompt.txt", "== clean ==\nTop 0th token. Logit: 7.00 Token: | lazy|\n")

    fig_dir = run_dir / "figures"
    rng = np.random.default_rng(0)
    write_figure(fig_dir / "attribute_association.html", figures.attribute_association(association))
    per_prompt = pd.DataFrame({"feature": features, "clean_metric": [1.0, 2.0, 0.5, 1.5],
                               "corrupted_metric": [-0.5, 0.0, -1.0, -0.5]})
    write_figure(fig_dir / "baseline_metric.html", figures.baseline_metric(per_prompt, "favorability"))
    write_figure(fig_dir / "head_attribution.html", figures.heatmap(
        rng.normal(size=(2, 4)), [f"H{h}" for h in range(4)], ["L0", "L1"], "Head attribution", "head", "layer"))
    write_figure(fig_dir / "patch_resid_pre.html", figures.heatmap(
        rng.uniform(size=(3, 5)), ["BOS", "prefix", "utt_first", "utt_last", "suffix"], ["0", "1", "2"],
        "Patching resid_pre", "role", "layer"))
    write_figure(fig_dir / "attrpatch_vs_exact.html",
                 go.Figure(go.Scatter(x=[0, 0.5, 1], y=[0.1, 0.4, 0.9], mode="markers")))
    write_figure(fig_dir / "token_frequency.html", go.Figure(go.Bar(x=["a", "b"], y=[1, 2])))
    return run_dir


def make_ctx(run_dir: Path) -> SimpleNamespace:
    """What the report stage may use of a RunContext; no model or pairs, so touching them fails."""
    return SimpleNamespace(run_dir=run_dir, cfg=None, tables=run_dir / "tables", figures=run_dir / "figures",
                           tensors=run_dir / "tensors")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_run(tmp_path / "run")


def test_report_shows_every_section_and_figure_with_its_caption(run_dir):
    report.run(make_ctx(run_dir))
    page = (run_dir / "report.html").read_text()

    assert "How to read this run" in page and "clean - corrupted" in page and "normalized" in page
    # The page opens with the covert prejudice score: value, interval, null band, p, and what it takes to see it.
    headline = page[page.index('<section id="headline">'):page.index('<section id="run">')]
    assert "Covert prejudice score (favorability): +0.047" in headline and "[+0.007, +0.085]" in headline
    assert "[-0.040, +0.040]" in headline and "p = 0.0123" in headline and "every rated attribute (chain rule)" in headline
    assert "about 6 pairs" in headline and "What it does not show" in headline
    assert page.index('id="headline"') < page.index('id="run"') < page.index('id="dataset"')
    stereotypes = page[page.index('<section id="stereotypes">'):]
    assert "Katz &amp; Braly" in stereotypes and "Bergsieker et al." in stereotypes and "1933" in stereotypes
    assert "tiny-gpt2" in page and "aae_clean" in page
    for stage in ("data", "cache", "patching"):
        assert f"<td>{stage}</td>" in page
    assert "habitual_be" in page and "The person says" in page   # dataset summary
    assert "1.250" in page and "-0.500" in page                  # baseline means
    assert "Top 0th token" in page                               # test_prompt.txt
    assert "lazy" in page and "smart" in page                    # attribute association tables

    for stem in ["attribute_association", "baseline_metric", "stereotype_agreement", *FIGURE_GROUP]:
        assert f'<iframe src="figures/{stem}.html" loading="lazy"' in page, stem
        assert escape(caption_for(stem)) in page, stem
    for group in set(FIGURE_GROUP.values()):
        assert f"<h2>{group}</h2>" in page
    assert escape(CAPTIONS["head_attribution"]) in page
    assert escape(CAPTIONS["patch_resid_pre"]) in page
    for name in ("attribute_association.csv", "baseline.json", "test_prompt.txt"):
        assert f'href="tables/{name}"' in page


def test_report_uses_no_network_and_every_link_resolves(run_dir):
    report.run(make_ctx(run_dir))
    page = (run_dir / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I), \
        "the report must not load anything from the network"
    for target in re.findall(r'(?:src|href)="([^"#]+)"', page):
        assert (run_dir / target).is_file(), f"report links to {target}, which the run does not hold"
    for figure in (run_dir / "figures").glob("*.html"):
        assert not re.search(r"""<script[^>]+src=["']https?://""", figure.read_text()), figure.name


def test_report_is_rewritten_atomically(run_dir):
    ctx = make_ctx(run_dir)
    report.run(ctx)
    first = (run_dir / "report.html").stat().st_ino
    write_figure(run_dir / "figures" / "patch_head_out.html", go.Figure(go.Heatmap(z=[[0.0, 1.0]])))
    report.run(ctx)
    page = (run_dir / "report.html").read_text()
    assert 'src="figures/patch_head_out.html"' in page
    assert (run_dir / "report.html").stat().st_ino != first, \
        "report.html must be replaced by a rename, not rewritten in place"
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name], "a temporary file was left behind"


def test_sections_appear_only_when_their_inputs_exist(tmp_path):
    run_dir = tmp_path / "bare"
    write_json(run_dir / "manifest.json", {"model": {"name": "m"}, "direction": "sae_clean", "status": "failed",
                                           "stages": {"data": {"status": "failed", "error": "boom", "seconds": 0.1}}})
    report.run(make_ctx(run_dir))
    page = (run_dir / "report.html").read_text()
    assert "boom" in page and "failed" in page
    assert "the <b>clean</b> run reads the SAE prompts" in page   # direction-specific reading guide
    for absent in ('id="dataset"', 'id="baseline"', "<iframe", 'id="files"'):
        assert absent not in page


def test_captions_and_groups_by_name():
    assert caption_for("patch_head_out_by_feature") == CAPTIONS["patch_head_out"]
    assert caption_for("head_attribution_by_feature") == CAPTIONS["head_attribution_by_feature"]
    assert "mystery plot" in caption_for("mystery_plot").lower()
    assert group_for("logit_lens") == "Attribution"
    assert group_for("layer_attribution") == "Attribution"
    assert group_for("attribution_patching_resid") == "Attribution patching"
    assert group_for("attrpatch_vs_exact") == "Attribution patching"
    assert group_for("attention_top_heads") == "Attention"
    assert group_for("patch_block") == "Activation patching"
    assert group_for("mystery_plot") == "Other figures"


# ---------------------------------------------------------------- real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with no network: every host resolves to nothing and the proxy is closed."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9",
             "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=5000"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=90)


def console_messages(stderr: str) -> list[str]:
    """Messages the pages wrote to the console. Chromium logs every page console message (log,
    error and uncaught exception alike) at INFO as `CONSOLE`; plotly pages write none, so any is a
    failure."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium_offline(run_dir, tmp_path):
    report.run(make_ctx(run_dir))
    profile = tmp_path / "chromium-profile"

    # Each figure page: plotly.js loads from the run's own copy and draws its SVG.
    for figure in sorted((run_dir / "figures").glob("*.html")):
        assert "main-svg" not in figure.read_text()   # so finding it below proves plotly rendered
        done = chromium(profile, "--dump-dom", figure.as_uri())
        assert done.returncode == 0, done.stderr[-2000:]
        assert 'class="plot-container' in done.stdout and "main-svg" in done.stdout, \
            f"{figure.name}: plotly did not render offline\n{done.stderr[-2000:]}"
        assert not console_messages(done.stderr), f"{figure.name}: {console_messages(done.stderr)}"

    # The report itself, iframes included: renders with no console message, and a screenshot.
    screenshot = tmp_path / "report.png"
    done = chromium(profile, f"--screenshot={screenshot}", "--window-size=1280,2000", "--hide-scrollbars",
                    (run_dir / "report.html").as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    assert not console_messages(done.stderr), console_messages(done.stderr)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
    if os.environ.get("REPORT_SCREENSHOT"):   # keep a copy to look at: REPORT_SCREENSHOT=/tmp/report.png
        shutil.copy(screenshot, os.environ["REPORT_SCREENSHOT"])


def test_the_page_escapes_what_the_run_holds(tmp_path):
    """The templates autoescape: text from the run's files is shown, never run as markup."""
    run_dir = tmp_path / "odd"
    write_json(run_dir / "manifest.json", {"model": {"name": "<script>alert(1)</script>"}, "direction": "aae_clean",
                                           "status": "failed", "stages": {"data": {"status": "failed",
                                                                                   "error": 'bad "x" & <b>y</b>'}}})
    report.run(make_ctx(run_dir))
    page = (run_dir / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;y&lt;/b&gt;" in page and "&amp;" in page
