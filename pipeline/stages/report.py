"""Stage `report`: one page, `report.html` at the top of the run directory, that gathers what the
run holds: the manifest and config, the dataset, the baseline, and every figure embedded with a
caption that says how to read it.

It reads files only (it never loads the model), shows each section only when its inputs exist,
and links everything by relative path, so the page opens from disk with no network: the figures
load the run's own copy of plotly.js.
"""

from __future__ import annotations

import json
import logging
import re
from html import escape
from pathlib import Path
from urllib.parse import quote

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import read_json, write_atomic
from pipeline.figures import DIVERGING

log = logging.getLogger(__name__)

# Colours of positive and negative values in the heatmaps: plotly's RdBu runs from red (low) to
# blue (high), and a `_r` scale is its reverse.
POSITIVE, NEGATIVE = ("red", "blue") if DIVERGING.endswith("_r") else ("blue", "red")

# How to read each known figure, keyed by filename stem. A figure whose stem is not here gets the
# caption of the longest key its stem starts with (`patch_head_out_by_feature` -> `patch_head_out`).
CAPTIONS = {
    "attribute_association": "Mean log p(attribute | AAE) - log p(attribute | SAE) over pairs and templates, "
                             "with 95% intervals: red bars are more likely after AAE, blue bars after SAE.",
    "baseline_logit_diff": "One point per prompt: its logit difference (correct - incorrect answer) in the clean "
                           "and the corrupted run, by dialect feature; the gap between the two is what patching "
                           "restores.",
    "logit_lens": "Logit difference read off the residual stream after each layer (through the final layer norm and "
                  "unembedding): the depth at which the model comes to prefer the correct attribute.",
    "layer_attribution": "Direct logit attribution per layer: how much each attention and MLP output writes the "
                         "logit difference directly; positive pushes toward the correct answer.",
    "head_attribution": "Direct logit attribution of each head (rows = layers, columns = heads): "
                        f"{POSITIVE} heads push toward the correct answer, {NEGATIVE} heads against it.",
    "head_attribution_by_feature": "Head attribution split by dialect feature on one shared colour scale: a head "
                                   "that matters for one feature only stands out in that panel.",
    "attention_top_heads": "Attention patterns of the heads with the largest positive and negative attribution on "
                           "the example prompt: each row is a query token, each column a token it reads from.",
    "attention_last_token": "Where the final token attends in the top heads, by role position: which part of the "
                            "prompt those heads read when the attribute is predicted.",
    "patch_resid_pre": "Clean residual stream patched into the corrupted run at each layer (rows) and role position "
                       "(columns): 1 = the clean logit difference is restored, 0 = no effect.",
    "patch_block": "Residual stream, attention output and MLP output of each layer patched at each role position: "
                   "1 = restores the clean logit difference, 0 = no effect.",
    "patch_head_out": "Each head's output patched at all positions: heads near 1 restore the clean behaviour on "
                      "their own, negative heads work against it.",
    "patch_head_parts": "Each head's queries, keys, values and attention pattern patched separately: which part "
                        "of a head carries its effect (1 = restores clean, 0 = no effect).",
    "attrpatch_vs_exact": "Attribution patching (a gradient estimate) against exact activation patching, one point "
                          "per component: points on the diagonal mean the cheap estimate can be trusted.",
    # Prefixes, for figures added later under these names.
    "attrpatch": "Attribution patching: a gradient estimate of the normalized patching metric for every component "
                 "at once (1 = restores clean, 0 = no effect).",
    "attribution": "Direct logit attribution: each component's direct contribution to the logit difference "
                   "(correct - incorrect).",
    "layer": "Per-layer contributions to the logit difference; positive pushes toward the correct answer.",
    "head": "One value per head (rows = layers, columns = heads) on a diverging scale centred on 0.",
    "attention": "Attention patterns: each row is a query token, each column a token it attends to.",
    "patch": "Activation patching, normalized metric: 1 = copying this activation from the clean run restores the "
             "clean logit difference, 0 = no effect.",
}

# Figure groups in page order; a figure goes to the first group whose test its stem passes.
FIGURE_GROUPS = [
    ("Attribution patching", lambda s: s.startswith("attrpatch") or "attribution_patching" in s),
    ("Attribution", lambda s: s.startswith(("attribution_", "logit_lens", "layer_", "head_"))),
    ("Attention", lambda s: s.startswith("attention_")),
    ("Activation patching", lambda s: s.startswith("patch_")),
    ("Other figures", lambda s: True),
]
PAGE_ORDER = ["Attribution", "Attention", "Activation patching", "Attribution patching", "Other figures"]

# Figures shown in the dataset and baseline sections rather than among the others.
SHOWN_EARLIER = {"attribute_association", "baseline_logit_diff"}

# Frame size for a figure page whose size cannot be read from it (circuitsvis, autosized plotly):
# circuitsvis widgets grow downwards as one hovers, so the frame is tall.
DEFAULT_FRAME = (1000, 900)

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1f2328; background: #f6f7f9; margin: 0; line-height: 1.5; font-size: 15px; }
main { max-width: 1380px; margin: 0 auto; padding: 24px 28px 64px; background: #fff; min-height: 100vh;
       box-shadow: 0 0 0 1px #e3e6ea; }
h1 { font-size: 1.6em; margin: 0 0 4px; }
h2 { font-size: 1.25em; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #e3e6ea; }
h3 { font-size: 1.05em; margin: 22px 0 6px; }
a { color: #0b5cad; }
.subtitle { color: #57606a; margin: 0 0 14px; }
nav { font-size: 0.92em; margin: 8px 0 18px; }
nav a { margin-right: 14px; white-space: nowrap; }
.howto { background: #f0f6ff; border-left: 4px solid #0b5cad; padding: 10px 14px; margin: 12px 0; }
.howto p { margin: 6px 0; }
p, .howto, figcaption, pre { max-width: 1100px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 0.92em; }
th, td { border: 1px solid #d8dee4; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f3f5f7; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.facts th { width: 180px; }
.status-done, .status-complete { color: #1a7f37; font-weight: 600; }
.status-failed { color: #cf222e; font-weight: 600; }
.status-running { color: #9a6700; font-weight: 600; }
pre { background: #f6f8fa; border: 1px solid #d8dee4; padding: 10px 12px; overflow-x: auto; font-size: 0.85em;
      line-height: 1.4; max-height: 480px; }
details { margin: 8px 0; }
summary { cursor: pointer; color: #0b5cad; }
figure { margin: 18px 0 28px; }
.frame { display: inline-block; max-width: 100%; box-sizing: border-box; overflow-x: auto;
         border: 1px solid #e3e6ea; border-radius: 4px; background: #fff; }
iframe { border: 0; display: block; }
figcaption { font-size: 0.92em; color: #3d444d; margin-top: 6px; }
figcaption .name { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-weight: 600;
                   color: #1f2328; }
.side-by-side { display: flex; gap: 28px; flex-wrap: wrap; align-items: flex-start; }
.muted { color: #57606a; }
ul.files { columns: 2; padding-left: 20px; }
"""


# ---------------------------------------------------------------- small HTML helpers

def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}">\n<h2>{escape(title)}</h2>\n{body}\n</section>\n'


def cell(value) -> str:
    """A table cell: numbers right-aligned with 3 decimals, everything else escaped text."""
    if isinstance(value, bool) or value is None:
        return f"<td>{escape(str(value))}</td>"
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    if isinstance(value, float):
        return f'<td class="num">{value:.3f}</td>'
    return f"<td>{escape(str(value))}</td>"


def html_table(header: list[str], rows: list[list], css_class: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>\n" for row in rows)
    cls = f' class="{css_class}"' if css_class else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def facts_table(facts: list[tuple[str, str]]) -> str:
    """Two-column table of label and already-escaped HTML value."""
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>\n" for k, v in facts)
    return f'<table class="facts"><tbody>\n{rows}</tbody></table>'


def status_html(status: str) -> str:
    return f'<span class="status-{escape(status)}">{escape(status)}</span>'


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number_text(value) -> str:
    return f"{value:.3f}" if is_number(value) else escape(str(value))


def frame_size(path: Path) -> tuple[int, int]:
    """Width and height of a plotly page, read from the sized div plotly writes at its top."""
    with open(path, "rb") as f:
        head = f.read(4000).decode("utf-8", errors="replace")
    found = re.search(r"height:\s*(\d+)px;\s*width:\s*(\d+)px", head)
    if found:
        return int(found.group(2)), int(found.group(1))
    return DEFAULT_FRAME


def figure_block(path: Path, caption: str) -> str:
    """A figure page embedded in an iframe, with its caption and a link to open it alone."""
    width, height = frame_size(path)
    src = f"figures/{quote(path.name)}"
    return (f'<figure id="fig-{escape(path.stem)}">\n'
            f'<div class="frame"><iframe src="{src}" loading="lazy" title="{escape(path.stem)}" '
            f'width="{width + 20}" height="{height + 20}"></iframe></div>\n'
            f'<figcaption><span class="name">{escape(path.stem)}</span>: {escape(caption)} '
            f'<a href="{src}" target="_blank">Open alone</a></figcaption>\n</figure>')


# ---------------------------------------------------------------- captions and groups

def caption_for(stem: str) -> str:
    """The caption of a known figure, else of the longest known prefix, else one from the name."""
    if stem in CAPTIONS:
        return CAPTIONS[stem]
    prefixes = [key for key in CAPTIONS if stem.startswith(key)]
    if prefixes:
        return CAPTIONS[max(prefixes, key=len)]
    return f"{stem.replace('_', ' ').capitalize()}: hover over a point or cell to read its value."


def group_for(stem: str) -> str:
    return next(name for name, test in FIGURE_GROUPS if test(stem))


# ---------------------------------------------------------------- sections

def how_to_read(direction: str | None) -> str:
    sides = {"aae_clean": ("AAE", "SAE", "aae", "sae"), "sae_clean": ("SAE", "AAE", "sae", "aae")}
    if direction in sides:
        clean, corrupted, c, k = sides[direction]
        runs = (f"In this run (direction <code>{direction}</code>) the <b>clean</b> run reads the {clean} prompts "
                f"and the <b>corrupted</b> run the {corrupted} prompts with the same meaning. For each prompt the "
                f"correct answer is the attribute the model links most to the {clean} version "
                f"(<code>best_attr_{c}</code>) and the incorrect one the attribute it links most to the "
                f"{corrupted} version (<code>best_attr_{k}</code>).")
    else:
        runs = ("The <b>clean</b> run reads one dialect's prompts and the <b>corrupted</b> run the other "
                "dialect's prompts with the same meaning; the answers are the attributes the model links most "
                "to each side.")
    return (
        '<div class="howto">\n<p><b>How to read this run.</b> Each pair says the same thing in African American '
        "English (AAE) and in Standard American English (SAE), placed in a template such as "
        "<i>The person says: \" ... \" The person is</i>. " + runs + "</p>\n"
        "<p>The <b>logit difference</b> is logit(correct) - logit(incorrect) at each prompt's last real token: "
        "a preference the model takes from the dialect shows as a larger value in the clean run than in the "
        "corrupted one. <b>Activation patching</b> "
        "copies one activation from the clean run into the corrupted run and reports the <b>normalized "
        "metric</b> (patched - corrupted) / (clean - corrupted): <b>0 = corrupted</b> behaviour, "
        "<b>1 = clean</b> behaviour fully restored, so components near 1 carry the dialect signal. "
        "Position axes are role labels (template prefix, utterance start and end, template suffix), so "
        f"prompts of different lengths line up. Heatmap colour scales are centred on 0 (white): {POSITIVE} "
        f"positive, {NEGATIVE} negative.</p>\n"
        "</div>")


def displayed_run_status(manifest: dict) -> str:
    """The run's status as it will be once this page is written: the report runs last, so while it
    runs the manifest still says `running` although every other stage has finished."""
    status = manifest.get("status", "unknown")
    others = {name: s.get("status") for name, s in manifest.get("stages", {}).items() if name != "report"}
    if status == "running" and all(s == "done" for s in others.values()):
        return "complete"
    return status


def run_section(run_dir: Path, manifest: dict | None, cfg) -> str:
    parts = []
    if manifest:
        model = manifest.get("model") or {}
        model_text = escape(str(model.get("name", "?")))
        if model.get("source"):
            model_text += f' <span class="muted">({escape(str(model["source"]))})</span>'
        stages = manifest.get("stages", {})
        total = sum(float(s.get("seconds") or 0) for s in stages.values())
        facts = [
            ("model", model_text),
            ("direction", escape(str(manifest.get("direction", "?")))),
            ("device", escape(str(manifest.get("device", "?")))),
            ("status", status_html(displayed_run_status(manifest))),
            ("created", escape(str(manifest.get("created", "?")))),
            ("command", f"<code>{escape(str(manifest.get('command', '?')))}</code>"),
            ("config hash", f"<code>{escape(str(manifest.get('config_hash', '?')))}</code>"),
            ("dataset hash", f"<code>{escape(str(manifest.get('dataset_hash') or '-')[:16])}</code>"),
            ("stage time", f"{total:.1f} s"),
        ]
        if manifest.get("resumed"):
            facts.append(("resumed", f"{int(manifest['resumed'])} time(s)"))
        parts.append(facts_table(facts))
        if stages:
            parts.append("<h3>Stages</h3>")
            parts.append(stage_table(stages))
        versions = manifest.get("versions")
        if versions:
            parts.append("<details><summary>Package versions</summary>"
                         + html_table(["package", "version"], [[k, v] for k, v in versions.items()]) + "</details>")
    config_text, config_source = composed_config(run_dir, manifest, cfg)
    if config_text:
        parts.append(f"<details><summary>Composed config ({escape(config_source)})</summary>"
                     f"<pre>{escape(config_text)}</pre></details>")
    return section("run", "Run", "\n".join(parts)) if parts else ""


def stage_table(stages: dict) -> str:
    """One row per stage: status and seconds, with start times and errors where the manifest has them."""
    columns = ["stage", "status"] + [c for c in ("started", "error") if any(c in s for s in stages.values())]
    rows = []
    for name, s in stages.items():
        status = s.get("status", "?")
        if name == "report" and status == "running":
            status = "writing this page"
        seconds = s.get("seconds")
        rows.append([name, status] + [s.get(c, "") for c in columns[2:]]
                    + ["-" if seconds is None else float(seconds)])
    header = [{"started": "started (UTC)"}.get(c, c) for c in columns] + ["seconds"]
    return html_table(header, rows)


def composed_config(run_dir: Path, manifest: dict | None, cfg) -> tuple[str, str]:
    """The config as Hydra saved it, else the one in hand, else the manifest."""
    saved = run_dir / ".hydra" / "config.yaml"
    if saved.exists():
        return saved.read_text(), ".hydra/config.yaml"
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_yaml(cfg), "the config of this report run"
    if manifest:
        return json.dumps(manifest, indent=2), "manifest.json"
    return "", ""


def dataset_section(run_dir: Path) -> str:
    parts = []
    path = run_dir / "dataset.csv"
    if path.exists():
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        facts = [("prompts", str(len(df)))]
        if "pair_id" in df:
            facts.append(("pairs", str(df.pair_id.nunique())))
        if "feature" in df:
            facts.append(("dialect features", str(df.feature.nunique())))
        if "template" in df:
            facts.append(("templates", str(df.template.nunique())))
        if "pronoun" in df:
            counts = df.pronoun.value_counts()
            facts.append(("pronouns", escape(", ".join(f"{p or '(none)'} {n}" for p, n in counts.items()))))
        attributes = set(df.get("best_attr_aae", [])) | set(df.get("best_attr_sae", []))
        facts.append(("answer attributes", str(len(attributes))))
        overview = "<div><h3>Overview</h3>" + facts_table(facts) + "</div>"
        if "template" in df:
            counts = df.template.value_counts(sort=False)
            overview += ("<div><h3>Templates</h3>"
                         + html_table(["template", "prompts"], [[t, int(n)] for t, n in counts.items()]) + "</div>")
        parts.append(f'<div class="side-by-side">{overview}</div>')
        if "feature" in df:
            parts.append("<h3>Pairs per dialect feature</h3>")
            parts.append(feature_table(df))
    figure = run_dir / "figures" / "attribute_association.html"
    if figure.exists():
        parts.append(figure_block(figure, caption_for(figure.stem)))
    table_path = run_dir / "tables" / "attribute_association.csv"
    if table_path.exists():
        parts.append(association_tables(pd.read_csv(table_path)))
    return section("dataset", "Dataset", "\n".join(parts)) if parts else ""


def feature_table(df: pd.DataFrame) -> str:
    """Pairs and prompts per dialect feature, with one example utterance pair."""
    rows = []
    for feature, group in df.groupby("feature", sort=True):
        pairs = int(group.pair_id.nunique()) if "pair_id" in group else "-"
        first = group.iloc[0]
        if "utterance_aae" in group and "utterance_sae" in group:
            example = f"{first.utterance_aae}  /  {first.utterance_sae}"
        else:
            example = f"{first.prompt_aae}  /  {first.prompt_sae}"
        rows.append([feature, pairs, len(group), example])
    return html_table(["feature", "pairs", "prompts", "example (AAE / SAE)"], rows)


def association_tables(table: pd.DataFrame) -> str:
    """The 10 most AAE-associated and the 10 most SAE-associated attributes."""
    columns = [c for c in ("attribute", "association", "ci_low", "ci_high", "n_prompts") if c in table]
    table = table.sort_values("association", ascending=False)
    top = table.head(10)
    bottom = table.iloc[len(top):].tail(10).iloc[::-1]

    def rows(frame):
        return [[v.item() if hasattr(v, "item") else v for v in row] for row in frame[columns].itertuples(index=False)]

    out = ['<div class="side-by-side">',
           "<div><h3>Most AAE-associated attributes</h3>" + html_table(columns, rows(top)) + "</div>"]
    if len(bottom):
        out.append("<div><h3>Most SAE-associated attributes</h3>" + html_table(columns, rows(bottom)) + "</div>")
    out.append("</div>")
    out.append('<p class="muted">Full table: <a href="tables/attribute_association.csv">'
               "tables/attribute_association.csv</a></p>")
    return "\n".join(out)


def baseline_section(run_dir: Path) -> str:
    parts = []
    path = run_dir / "tables" / "baseline.json"
    if path.exists():
        base = read_json(path)
        clean, corrupted = base.get("clean_mean_logit_diff"), base.get("corrupted_mean_logit_diff")
        facts = [("prompts", escape(str(base.get("n_prompts", "-")))),
                 ("clean mean", number_text(clean)),
                 ("corrupted mean", number_text(corrupted))]
        if is_number(clean) and is_number(corrupted):
            facts.append(("gap (clean - corrupted)", number_text(clean - corrupted)))
        overall = ("<div><h3>Mean logit difference</h3>" + facts_table(facts)
                   + '<p class="muted">The clean and corrupted means are the 1 and the 0 of the<br>'
                   "normalized patching metric.</p></div>")
        by_feature = base.get("by_feature") or {}
        if by_feature:
            feature_rows = []
            for feature, v in sorted(by_feature.items()):
                c, k = v.get("clean_logit_diff"), v.get("corrupted_logit_diff")
                feature_rows.append([feature, c, k, c - k if is_number(c) and is_number(k) else "-"])
            overall += ("<div><h3>By dialect feature</h3>"
                        + html_table(["feature", "clean", "corrupted", "gap"], feature_rows) + "</div>")
        parts.append(f'<div class="side-by-side">{overall}</div>')
    text = run_dir / "tables" / "test_prompt.txt"
    if text.exists():
        parts.append("<h3>Example prompt: the model's top next tokens</h3>")
        parts.append(f"<pre>{escape(text.read_text())}</pre>")
    figure = run_dir / "figures" / "baseline_logit_diff.html"
    if figure.exists():
        parts.append(figure_block(figure, caption_for(figure.stem)))
    return section("baseline", "Baseline: clean and corrupted runs", "\n".join(parts)) if parts else ""


def figure_sections(run_dir: Path) -> list[tuple[str, str]]:
    """(anchor, html) of one section per figure group that has figures, in page order."""
    figures_dir = run_dir / "figures"
    if not figures_dir.is_dir():
        return []
    grouped: dict[str, list[Path]] = {}
    for path in sorted(figures_dir.glob("*.html")):
        if path.name.startswith(".") or path.stem in SHOWN_EARLIER:
            continue
        grouped.setdefault(group_for(path.stem), []).append(path)
    out = []
    for title in PAGE_ORDER:
        if title in grouped:
            anchor = title.lower().replace(" ", "-")
            blocks = [figure_block(p, caption_for(p.stem)) for p in grouped[title]]
            out.append((anchor, section(anchor, title, "\n".join(blocks))))
    return out


def files_section(run_dir: Path) -> str:
    """Relative links to the run's tables and tensors."""
    parts = []
    kinds = (("tables", ("*.csv", "*.parquet", "*.json", "*.txt")), ("tensors", ("*.safetensors",)))
    for folder, patterns in kinds:
        files = sorted({p for pattern in patterns for p in (run_dir / folder).glob(pattern)
                        if not p.name.startswith(".")})
        if files:
            items = "".join(f'<li><a href="{folder}/{quote(p.name)}">{folder}/{escape(p.name)}</a> '
                            f'<span class="muted">({human_size(p.stat().st_size)})</span></li>\n' for p in files)
            parts.append(f"<h3>{folder.capitalize()}</h3>\n<ul class=\"files\">\n{items}</ul>")
    return section("files", "Tables and tensors", "\n".join(parts)) if parts else ""


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# ---------------------------------------------------------------- the page

def build_report(run_dir: Path, cfg=None) -> str:
    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.exists() else None
    model = ((manifest or {}).get("model") or {}).get("name")
    direction = (manifest or {}).get("direction")
    title = "dialect-circuits run" + (f": {model}" if model else "") + (f", {direction}" if direction else "")

    sections = [("run", run_section(run_dir, manifest, cfg)), ("dataset", dataset_section(run_dir)),
                ("baseline", baseline_section(run_dir))]
    sections += figure_sections(run_dir)
    sections.append(("files", files_section(run_dir)))
    sections = [(anchor, body) for anchor, body in sections if body]

    nav_titles = {"run": "Run", "dataset": "Dataset", "baseline": "Baseline", "files": "Tables"}
    nav = "".join(f'<a href="#{a}">{escape(nav_titles.get(a, a.replace("-", " ").capitalize()))}</a>'
                  for a, _ in sections)
    subtitle = escape(str(run_dir.resolve()))
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{escape(title)}</title>\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{escape(title)}</h1>\n<p class=\"subtitle\">{subtitle}</p>\n"
        f"<nav>{nav}</nav>\n{how_to_read(direction)}\n"
        + "\n".join(body for _, body in sections)
        + "</main>\n</body>\n</html>\n"
    )


def run(ctx) -> None:
    run_dir = Path(ctx.run_dir)
    path = write_atomic(run_dir / "report.html", build_report(run_dir, getattr(ctx, "cfg", None)))
    log.info("report: %s", path)
