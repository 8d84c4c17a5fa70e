"""Stage `report`: one page, `report.html` at the top of the run directory, that gathers what the
run holds: the manifest and config, the dataset, the baseline, and every figure embedded with a
caption that says how to read it.

It reads files only (it never loads the model), shows each section only when its inputs exist,
and links everything by relative path, so the page opens from disk with no network: the figures
load the run's own copy of plotly.js.

This module only gathers data; the page is drawn by the Jinja2 templates in pipeline/templates/
(report.html.j2 for the frame, report/<section>.html.j2 for each section, macros.html.j2 for
tables and figures). To add a section:
  1. write pipeline/templates/report/<name>.html.j2; it gets the section's data as `data`
     (import "macros.html.j2" as m for m.table, m.facts, m.figure, m.number);
  2. write a function here `<name>_section(run_dir, manifest, cfg) -> list[Section]` that returns
     [] when its inputs are absent, else [Section(anchor, title, "report/<name>.html.j2", data, nav)];
  3. put it in SECTIONS where it belongs in page order.
Figures need no section of their own: a figure file in figures/ lands in the group its name
matches (FIGURE_GROUPS) with the caption CAPTIONS gives it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import read_json, write_atomic
from pipeline.figures import DIVERGING
from pipeline.nulls import pairs_needed
from pipeline.pages import render

log = logging.getLogger(__name__)

# Colours of positive and negative values in the heatmaps: plotly's RdBu runs from red (low) to
# blue (high), and a `_r` scale is its reverse.
POSITIVE, NEGATIVE = ("red", "blue") if DIVERGING.endswith("_r") else ("blue", "red")

# How to read each known figure, keyed by filename stem. A figure whose stem is not here gets the
# caption of the longest key its stem starts with (`patch_head_out_by_feature` -> `patch_head_out`).
CAPTIONS = {
    "attribute_association": "Mean log p(attribute | AAE) - log p(attribute | SAE) over pairs and templates, "
                             "with 95% intervals: red bars are more likely after AAE, blue bars after SAE. Grey: "
                             "the 95% band of the same mean when the guises of random pairs are swapped (no dialect "
                             "effect); * marks attributes significant after Benjamini-Hochberg.",
    "power_forest": "The AAE - SAE score of the run's metric per dialect feature (the pooled score at the bottom), on the "
                    "discovery side (green) and the held-out side (purple) of the split, each with its 95% pair-bootstrap "
                    "interval; the grey bar is the 95% band of the same score when the guises of random pairs are swapped "
                    "(no dialect effect). Hover a point for its pairs, the per-pair spread, the smallest detectable score "
                    "and the pairs it would take to detect this score.",
    "baseline_metric": "One point per prompt: the metric in the clean and the corrupted run, by dialect "
                       "feature; the gap between the two is what the dialect changes, and what patching restores.",
    "stereotype_agreement": "Left: how well the model's ranking of attributes by AAE association picks out the traits "
                            "each study's participants ascribed to African Americans (average precision over the "
                            "study's top 1-5 traits; the black mark is the chance level of a random ranking). Right: "
                            "the mean favorability of each study's top 5 traits, with the model's own top 5 "
                            "AAE- and SAE-associated attributes as dashed lines.",
    "logit_lens": "The metric read off the residual stream after each layer (through the final layer norm and "
                  "unembedding). Left: clean - corrupted, the depth at which the dialect's effect on the metric appears; "
                  "right: each side.",
    "layer_attribution": "Direct attribution per layer: how much each attention and MLP output writes the metric "
                         "directly. Left: clean - corrupted (what the dialect changes in each layer's write); right: "
                         "each side.",
    "head_attribution": "Direct attribution of each head (rows = layers, columns = heads). First panel: clean - "
                        "corrupted, what the dialect changes in each head's write; then the clean and corrupted "
                        f"prompts. {POSITIVE.capitalize()} raises the metric, {NEGATIVE} lowers it. Circled heads "
                        "differ from 0 after Benjamini-Hochberg over all heads (sign-flip permutation test over "
                        "pairs); hover for the interval, p, q and the smallest detectable effect.",
    "head_attribution_by_feature": "The clean - corrupted head attribution split by dialect feature on one shared colour "
                                   "scale: a head that carries one feature's effect only stands out in that panel.",
    "attention_top_heads": "Attention patterns of the heads with the largest positive and negative clean - corrupted "
                           "attribution on the example prompt: each row is a query token, each column a token it reads from.",
    "attention_last_token": "Where the final token attends in the top heads, by role position: which part of the "
                            "prompt those heads read when the attribute is predicted.",
    "patch_resid_pre": "Clean residual stream patched into the corrupted run at each layer (rows) and role position "
                       "(columns): the effect on the metric in its own units (0 = no effect); hover for the normalized "
                       "value (1 = the clean metric restored).",
    "patch_block": "Residual stream, attention output and MLP output of each layer patched at each role position: "
                   "the effect on the metric (0 = no effect; hover for the normalized value).",
    "patch_head_out": "Each head's output patched at all positions: the effect on the metric; heads whose effect "
                      "approaches the clean - corrupted gap restore the clean behaviour on their own (hover: normalized "
                      "value), heads of the other sign work against it.",
    "patch_head_parts": "Each head's queries, keys, values and attention pattern patched separately: which part "
                        "of a head carries its effect (metric units, 0 = no effect).",
    "attrpatch_vs_exact": "Attribution patching (a gradient estimate) against exact activation patching, one point "
                          "per component, both in metric units: points on the diagonal mean the cheap estimate can be "
                          "trusted.",
    "circuit_faithfulness": "Faithfulness of the circuit made of the top-|score| edges, by its size (share of all edges, "
                            "log scale): 1 = the circuit alone reproduces the full model's metric, 0 = no better than "
                            "corrupting every edge. The grey line is a random circuit of the same size; bands are 95% "
                            "bootstrap intervals over prompts.",
    "circuit_graph": "The circuit drawn by layer, input at the bottom and logits on top: each layer's heads on one row "
                     "and its MLP half a row above, ordered to reduce crossings; node size is the node's attribution "
                     "(the sum of its outgoing edges' scores). Red edges push the metric toward the clean run's value, "
                     "blue against it; thicker = larger |score|. The slider picks the circuit size; hover a node for "
                     "its inputs and outputs in the circuit with their scores.",
    "circuit_features": "One circuit or one per dialect feature? Left: the share of top edges two features' circuits "
                        "(and the pooled circuit) have in common, with 95% pair-bootstrap intervals; the title gives "
                        "what two random circuits of the same size share. Right: each circuit's faithfulness on each "
                        "feature's held-out prompts (1 = the full model, 0 = every edge corrupted), the random row "
                        "being random circuits of the same size.",
    "circuit_mib": "Faithfulness at MIB's ten edge fractions, the circuits pruned to the edges on input-to-logits paths, "
                   "under each ablation (colour); CPR and CMD in the legend are MIB's trapezoids over the linear fraction "
                   "(the x axis is drawn on a log scale); bands are 95% pair-bootstrap intervals.",
    "circuit_edge_agreement": "Each edge's score (EAP, EAP-IG) against the exact effect of corrupting that one edge: "
                              "points on the diagonal mean the cheap score can be trusted for that edge.",
    "intervention_dose_response": "Top: the held-out score left after removing the top components found on discovery "
                                  "prompts (red, 95% interval) and random components of the same size (grey band of the "
                                  "draws), against how many were removed; dashed: the score without intervention, dotted: "
                                  "0. Bottom: the cost, the KL divergence from the unintervened model on SAE prompts.",
    "path_patching": "Path patching: each head's clean output sent to the receivers with every other head frozen at its "
                     "corrupted output: the effect on the metric through that path alone (0 = no effect; hover for the "
                     "normalized value).",
    # Prefixes, for figures added later under these names.
    "attrpatch": "Attribution patching: a gradient estimate of every component's patching effect at once, in metric "
                 "units (0 = no effect).",
    "attribution": "Direct attribution: each component's direct contribution to the metric.",
    "layer": "Per-layer contributions to the metric.",
    "head": "One value per head (rows = layers, columns = heads) on a diverging scale centred on 0.",
    "attention": "Attention patterns: each row is a query token, each column a token it attends to.",
    "patch": "Activation patching: the effect on the metric of copying this activation from the clean run (0 = no "
             "effect).",
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
SHOWN_EARLIER = {"power_forest", "attribute_association", "baseline_metric", "stereotype_agreement", "intervention_dose_response"}
# Figures shown in the circuit section.
CIRCUIT_FIGURES = ("circuit_faithfulness", "circuit_graph", "circuit_features", "circuit_edge_agreement", "path_patching",
                   "circuit_mib")

# Frame size for a figure page whose size cannot be read from it (circuitsvis, autosized plotly):
# circuitsvis widgets grow downwards as one hovers, so the frame is tall.
DEFAULT_FRAME = (1000, 900)



@dataclass
class Section:
    """One section of report.html: `<section id=anchor><h2>title</h2>` around its template (a path
    under pipeline/templates/) rendered with `data`; `nav` is its link text at the top."""
    anchor: str
    title: str
    template: str
    data: dict = field(default_factory=dict)
    nav: str = ""

    def __post_init__(self):
        self.nav = self.nav or self.title


# ---------------------------------------------------------------- figures

def frame_size(path: Path) -> tuple[int, int]:
    """The width and height a figure was drawn for: from the plotly JSON beside its page
    (pipeline/artifacts.py write_figure; the page itself fills its frame), else DEFAULT_FRAME."""
    spec = path.with_suffix(".json")
    if spec.exists():
        layout = json.loads(spec.read_text()).get("layout", {})
        if layout.get("width") and layout.get("height"):
            return int(layout["width"]), int(layout["height"])
    return DEFAULT_FRAME


def figure(path: Path) -> dict:
    """What the template needs to embed a figure page: its name, link, frame size and caption."""
    width, height = frame_size(path)
    return {"stem": path.stem, "src": f"figures/{quote(path.name)}", "width": width, "height": height,
            "caption": caption_for(path.stem)}


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


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------- sections

def displayed_run_status(manifest: dict) -> str:
    """The run's status as it will be once this page is written: the report runs last, so while it
    runs the manifest still says `running` although every other stage has finished."""
    status = manifest.get("status", "unknown")
    others = {name: s.get("status") for name, s in manifest.get("stages", {}).items() if name != "report"}
    if status == "running" and all(s == "done" for s in others.values()):
        return "complete"
    return status


def run_section(run_dir: Path, manifest: dict | None, cfg) -> list[Section]:
    data = {"run": None, "stage_header": [], "stage_rows": [], "versions": []}
    if manifest:
        model = manifest.get("model") or {}
        stages = manifest.get("stages", {})
        data["run"] = {
            "model": str(model.get("name", "?")), "source": str(model.get("source") or ""),
            "direction": str(manifest.get("direction", "?")), "device": str(manifest.get("device", "?")),
            "status": displayed_run_status(manifest), "created": str(manifest.get("created", "?")),
            "command": str(manifest.get("command", "?")), "config_hash": str(manifest.get("config_hash", "?")),
            "dataset_hash": str(manifest.get("dataset_hash") or "-"),
            "stage_seconds": sum(float(s.get("seconds") or 0) for s in stages.values()),
            "resumed": int(manifest.get("resumed") or 0),
        }
        if stages:
            data["stage_header"], data["stage_rows"] = stage_table(stages)
        data["versions"] = [[k, v] for k, v in (manifest.get("versions") or {}).items()]
    data["config_text"], data["config_source"] = composed_config(run_dir, manifest, cfg)
    if not manifest and not data["config_text"]:
        return []
    return [Section("run", "Run", "report/run.html.j2", data)]


def stage_table(stages: dict) -> tuple[list[str], list[list]]:
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
    return header, rows


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


def dataset_section(run_dir: Path, manifest: dict | None, cfg) -> list[Section]:
    data = {"facts": [], "templates": [], "features": [], "figure": None, "association": None}
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
            facts.append(("pronouns", ", ".join(f"{p or '(none)'} {n}" for p, n in counts.items())))
        attributes = set(df.get("best_attr_aae", [])) | set(df.get("best_attr_sae", []))
        metric = OmegaConf.select(cfg, "metric.name") if cfg is not None else None
        if metric not in ("favorability", "prestige"):  # a rated metric reads no answers
            facts.append(("answer attributes", str(len(attributes))))
        task = OmegaConf.select(cfg, "dataset.task") if cfg is not None and not OmegaConf.select(cfg, "dataset.path") else None
        if task:
            facts.append(("task", str(task)))
        if metric not in ("favorability", "prestige") and len(attributes) == 2 and "best_attr_aae" in df \
                and df.best_attr_aae.nunique() == 1:
            facts.append(("answers", f"{df.best_attr_aae.iloc[0]} (AAE side) / {df.best_attr_sae.iloc[0]} (SAE side), every prompt"))
        data["facts"] = facts
        if "template" in df:
            data["templates"] = [[t, int(n)] for t, n in df.template.value_counts(sort=False).items()]
        if "feature" in df:
            data["features"] = feature_rows(df)
    path = run_dir / "figures" / "attribute_association.html"
    if path.exists():
        data["figure"] = figure(path)
    table_path = run_dir / "tables" / "attribute_association.csv"
    if table_path.exists():
        data["association"] = association_tables(pd.read_csv(table_path))
    if not (data["facts"] or data["figure"] or data["association"]):
        return []
    return [Section("dataset", "Dataset", "report/dataset.html.j2", data)]


def feature_rows(df: pd.DataFrame) -> list[list]:
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
    return rows


def association_tables(table: pd.DataFrame) -> dict:
    """The 10 most AAE-associated and the 10 most SAE-associated attributes, and the attributes
    that are scored but cannot be answers (more than one token for the model)."""
    columns = [c for c in ("attribute", "n_tokens", "rating", "weight", "association", "ci_low", "ci_high", "null_low",
                           "null_high", "p_perm", "n_prompts") if c in table]
    table = table.assign(rating=table.rating.round(2)) if "rating" in table else table
    multi = table[table.n_tokens > 1] if "n_tokens" in table else None
    left_out = [] if multi is None else [f"{a} ({int(n)} tokens)" for a, n in zip(multi.attribute, multi.n_tokens)]
    table = table.sort_values("association", ascending=False)
    top = table.head(10)
    bottom = table.iloc[len(top):].tail(10).iloc[::-1]

    def rows(frame):
        return [[v.item() if hasattr(v, "item") else v for v in row] for row in frame[columns].itertuples(index=False)]

    return {"columns": columns, "top": rows(top), "bottom": rows(bottom), "left_out": left_out,
            "csv": "tables/attribute_association.csv"}


METRIC_TEXT = {
    "favorability": "The favorability metric is the weighted mean logit of the unfavorable trait adjectives minus that of "
                    "the favorable ones at each prompt's last token (weights from human favorability ratings, "
                    "Bergsieker et al. 2012): higher means the model's next word leans toward unfavorable traits. The "
                    "score is its mean after the AAE guise minus after the SAE guise of the same utterance; positive "
                    "means the model leans more unfavorable when the speaker uses AAE.",
    "prestige": "The prestige metric is the weighted mean logit of the low-prestige occupations minus that of the "
                "high-prestige ones at each prompt's last token (GSS 2012 prestige ratings): higher means the model's "
                "next word leans toward low-prestige jobs. The score is its mean after the AAE guise minus after the "
                "SAE guise of the same utterance; positive means lower-prestige jobs for AAE speakers.",
    "logit_diff": "The logit difference logit(AAE-side answer) - logit(SAE-side answer) at each prompt's last token, its mean "
                  "after the AAE guise minus after the SAE guise; the answers come from the dataset's answer rule (see "
                  "Is the effect real?).",
}


def headline_section(run_dir: Path, manifest: dict | None, cfg) -> list[Section]:
    """The AAE - SAE gap of the run's metric (the covert prejudice score under a rated metric) with
    its interval, null band, p and power, first on the page."""
    tables = run_dir / "tables"
    if not (tables / "baseline_null.csv").exists():
        return []
    null = pd.read_csv(tables / "baseline_null.csv", keep_default_na=False)
    row = null.iloc[0].to_dict()
    base = read_json(tables / "baseline.json") if (tables / "baseline.json").exists() else {}
    metric = str(base.get("metric", "logit_diff"))
    name = str(base.get("headline") or "gap (clean - corrupted)")
    needed = "-"
    if is_number(row.get("detectable")) and np.isfinite(row["detectable"]) and row["gap"]:
        n = pairs_needed(int(row["n_pairs"]), float(row["detectable"]), float(row["gap"]))
        needed = (f"about {n:,.0f} pairs (this run has {int(row['n_pairs'])}) to detect a gap of {abs(row['gap']):.3f} "
                  f"with 80% power")
    versions, agreement = [], None
    path = tables / "prejudice_score.csv"
    if path.exists():
        scores = pd.read_csv(path)
        labels = {"one_token": "one-token attributes (the mechanistic stages' metric)",
                  "chain_rule": "every rated attribute (chain rule)"}
        versions = [[labels.get(r.score, r.score), int(r.n_attributes), int(r.n_pairs), float(r.score_value), f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}]",
                     f"[{r.null_low:+.3f}, {r.null_high:+.3f}]", float(r.p_perm), float(r.sd_per_pair)] for r in scores.itertuples()]
        if "pair_pearson_r" in scores:
            agreement = {"r": float(scores.pair_pearson_r.iloc[0]), "sign": float(scores.pair_sign_agreement.iloc[0])}
    data = {"name": name, "metric": metric, "metric_text": METRIC_TEXT.get(metric, ""), "row": row, "pairs_needed": needed,
            "versions": versions, "agreement": agreement, "rated": metric in ("favorability", "prestige")}
    return [Section("headline", "Headline: " + name, "report/headline.html.j2", data, nav="Headline")]


def power_section(run_dir: Path, manifest: dict | None, cfg) -> list[Section]:
    """The score per dialect feature on each side of the split, and whether the held-out side can
    see the discovery side's score (pipeline/power.py): the first thing on the page."""
    path = run_dir / "tables" / "power.csv"
    if not path.exists():
        return []
    table = pd.read_csv(path, dtype={"side": str, "feature": str})
    summary = read_json(run_dir / "tables" / "power.json") if (run_dir / "tables" / "power.json").exists() else {}
    names = {"discovery": "discovery", "heldout": "held-out", "all": "every prompt"}

    def finite(v, text="{}"):  # a pair count of one has no spread: "-"
        return text.format(v) if is_number(v) and np.isfinite(v) else "-"

    rows = [[names.get(r.side, r.side), "all features" if r.feature == "all" else r.feature, int(r.n_pairs), int(r.n_prompts),
             float(r.score), finite(r.ci_low, "[{:+.3f}") + finite(r.ci_high, ", {:+.3f}]"),
             f"[{r.null_low:+.3f}, {r.null_high:+.3f}]", float(r.p_perm), finite(r.sd_per_pair, "{:.3f}"),
             finite(r.detectable, "{:.3f}"), finite(r.pairs_needed, "{:,.0f}")]
            for r in table.itertuples()]
    fig = run_dir / "figures" / "power_forest.html"
    data = {"sentence": summary if summary.get("sentence") else {}, "carriers": summary.get("features_carry", []),
            "against": summary.get("features_against", []), "rows": rows,
            "figure": figure(fig) if fig.exists() else None, "has_split": "heldout" in set(table.side)}
    return [Section("power", "Where the score is, and what the pairs can see", "report/power.html.j2", data, nav="Power")]


def stereotypes_section(run_dir: Path, manifest: dict | None, cfg) -> list[Section]:
    """Hofmann et al.'s comparisons with the stereotypes of five studies, 1933-2012."""
    path = run_dir / "tables" / "stereotype_agreement.json"
    if not path.exists():
        return []
    agreement = read_json(path)
    rows = [[r["name"], int(r["year"]), r["top_traits"] or "-", r["agreement"], r["chance"], r["p_perm"], r["favorability_top5"]]
            for r in agreement["studies"]]
    fig = run_dir / "figures" / "stereotype_agreement.html"
    data = {"rows": rows, "model": agreement["model"], "figure": figure(fig) if fig.exists() else None}
    return [Section("stereotypes", "Agreement with human stereotypes, 1933-2012", "report/stereotypes.html.j2", data,
                    nav="Stereotypes")]


def baseline_section(run_dir: Path, manifest: dict | None, cfg) -> list[Section]:
    data = {"means": None, "by_feature": [], "by_feature_header": [], "test_prompt": "", "figure": None}
    path = run_dir / "tables" / "baseline.json"
    if path.exists():
        base = read_json(path)
        clean, corrupted = base.get("clean_mean"), base.get("corrupted_mean")
        data["means"] = {"n_prompts": base.get("n_prompts", "-"), "clean": clean, "corrupted": corrupted,
                         "gap": clean - corrupted if is_number(clean) and is_number(corrupted) else None, "null": None}
        # The gap against its guise permutation null (cache stage; details in the nulls section).
        null = {r["feature"]: r for r in base.get("gap_null") or []}
        if "all" in null:
            r = null["all"]
            data["means"]["null"] = {"interval": f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
                                     "band": f"[{r['null_low']:.3f}, {r['null_high']:.3f}]", "p": r["p_perm"]}
        for feature, v in sorted((base.get("by_feature") or {}).items()):
            c, k = v.get("clean_metric"), v.get("corrupted_metric")
            data["by_feature"].append([feature, c, k, c - k if is_number(c) and is_number(k) else "-"]
                                      + ([null.get(feature, {}).get("p_perm", "-")] if null else []))
        data["by_feature_header"] = ["feature", "clean", "corrupted", "gap"] + (["p (null)"] if null else [])
    text = run_dir / "tables" / "test_prompt.txt"
    if text.exists():
        data["test_prompt"] = text.read_text()
    path = run_dir / "figures" / "baseline_metric.html"
    if path.exists():
        data["figure"] = figure(path)
    if not (data["means"] or text.exists() or data["figure"]):
        return []
    return [Section("baseline", "Baseline: clean and corrupted runs", "report/baseline.html.j2", data, nav="Baseline")]


def figure_sections(run_dir: Path, manifest: dict | None, cfg) -> list[Section]:
    """One section per figure group that has figures, in page order."""
    figures_dir = run_dir / "figures"
    if not figures_dir.is_dir():
        return []
    grouped: dict[str, list[Path]] = {}
    for path in sorted(figures_dir.glob("*.html")):
        if path.name.startswith(".") or path.stem in SHOWN_EARLIER or path.stem in CIRCUIT_FIGURES:
            continue
        grouped.setdefault(group_for(path.stem), []).append(path)
    return [Section(title.lower().replace(" ", "-"), title, "report/figures.html.j2",
                    {"figures": [figure(p) for p in grouped[title]]}, nav=title.capitalize())
            for title in PAGE_ORDER if title in grouped]


def circuit_section(run_dir: Path, manifest: dict | None, cfg) -> list[Section]:
    """The circuit stage in plain words: graph size, faithfulness (CPR, CMD, size at 0.8) per method
    against the random baseline, score-vs-exact agreement, and its figures."""
    path = run_dir / "tables" / "circuit_summary.json"
    if not path.exists():
        return []
    summary = read_json(path)
    curves = summary["curves"]
    rows = [[name, c["cpr"], f"[{c['cpr_ci'][0]:.3f}, {c['cpr_ci'][1]:.3f}]", c["cmd"],
             f"[{c['cmd_ci'][0]:.3f}, {c['cmd_ci'][1]:.3f}]",
             "never" if c["size_at_0.8"] is None else f"{100 * c['size_at_0.8']:.3g}%"] for name, c in curves.items()]
    agreement = [[r["method"], r["pearson_r"], r.get("spearman_r", "-"), f"{r['top_k_overlap']}/{r['top_k']}", r["n_edges"]]
                 for r in summary.get("edge_agreement", [])]
    main = summary["methods"][0]
    data = {"s": summary, "main": main, "main_curve": curves[main], "random": curves.get("random"), "rows": rows,
            "agreement": agreement, "gap": summary.get("empty_vs_corrupted", {}), **circuit_extras(run_dir),
            "figures": [figure(run_dir / "figures" / f"{stem}.html") for stem in CIRCUIT_FIGURES
                        if stem != "circuit_mib" and (run_dir / "figures" / f"{stem}.html").exists()]}  # MIB's has its section
    return [Section("circuit", "Circuit", "report/circuit.html.j2", data)]


def mib_section(run_dir: Path, manifest: dict | None, cfg) -> list[Section]:
    """MIB's yardstick (tables/circuit_mib.json, pipeline/circuit/benchmark.py): CPR and CMD per
    ablation and prompt side beside random circuits, faithfulness at the ten fractions, the
    overlap of the top edges found under each ablation, and the exported files."""
    path = run_dir / "tables" / "circuit_mib.json"
    if not path.exists():
        return []
    s = read_json(path)
    ci = lambda lo_hi: f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]"  # noqa: E731
    curves = [r for r in s["results"] if "cpr" in r]
    areas = [[r["ablation"], r["prompts"], r["n_prompts"], r["circuit"], r["cpr"], ci(r["cpr_ci"]), r["cmd"], ci(r["cmd_ci"])]
             for r in curves]
    table = pd.read_csv(run_dir / "tables" / "circuit_mib.csv")
    points = []
    for (ablation, prompts, circuit), t in table.groupby(["ablation", "prompts", "circuit"], sort=False):
        points.append([ablation, prompts, circuit, *(f"{r.faithfulness:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]" for r in t.itertuples())])
    quoted = [[r["ablation"], r["prompts"], r["circuit"], r["edges"], r["faithfulness"], ci(r["ci"])]
              for r in s["results"] if "cpr" not in r]
    overlap = [[r["ablation_a"], r["ablation_b"], f"{100 * r['fraction']:.3g}%", r["top_k"], r["shared"], ci((r["ci_low"], r["ci_high"])),
                r["random_expected"]] for r in s.get("overlap", [])]
    summary_path = run_dir / "tables" / "circuit_summary.json"
    summary = read_json(summary_path) if summary_path.exists() else {}
    files = sorted(p.name for p in (run_dir / "circuits").glob("*.json")) if (run_dir / "circuits").is_dir() else []
    data = {"s": s, "areas": areas, "points": points, "fractions": [f"{100 * f:g}%" for f in s["fractions"]],
            "quoted": quoted, "overlap": overlap, "files": files, "loaded": summary.get("loaded"),
            "grouped": "key/value heads" in summary.get("graph", ""),
            "figures": [figure(run_dir / "figures" / "circuit_mib.html")] if (run_dir / "figures" / "circuit_mib.html").exists() else []}
    return [Section("circuit-mib", "Circuit on MIB's yardstick", "report/circuit_mib.html.j2", data, nav="MIB")]


def circuit_extras(run_dir: Path) -> dict:
    """The strongest paths shown beside the circuit view, and the per-feature circuits."""
    from pipeline.circuit.features import section_data

    path = run_dir / "tables" / "circuit_paths.csv"
    paths = pd.read_csv(path) if path.exists() else pd.DataFrame()
    rows = [[r.path, f"{100 * r.share:.2g}%", f"[{100 * r.ci_low:.2g}%, {100 * r.ci_high:.2g}%]", f"{r.in_drawn_circuit}/{r.edges}",
             f"{r.weakest_abs_score:.3g}", f"{r.sum_of_scores:+.3g}"] for r in paths.itertuples()]
    return {"paths": rows if path.exists() else None, "features": section_data(run_dir)}


def intervene_section(run_dir: Path, manifest: dict | None, cfg) -> list[Section]:
    """Does removing it remove the prejudice? The intervene stage's numbers, the dose-response
    figure, and whether the circuit generalizes to held-out prompts."""
    path = run_dir / "tables" / "intervention_summary.json"
    if not path.exists():
        return []
    summary = read_json(path)
    generalization, denominators = [], None
    circuit = run_dir / "tables" / "circuit_summary.json"
    if circuit.exists():
        c = read_json(circuit)
        if c.get("m_full_heldout") is not None:
            denominators = {"discovery": c["m_full"] - c["m_empty"], "heldout": c["m_full_heldout"] - c["m_empty_heldout"]}
        for prompts, curves in (("discovery", c.get("curves", {})), ("held-out", c.get("curves_heldout", {}))):
            for name, v in curves.items():
                if name in (c["methods"][0], "random"):
                    generalization.append([name, prompts, v["cpr"], f"[{v['cpr_ci'][0]:.3f}, {v['cpr_ci'][1]:.3f}]", v["cmd"],
                                           f"[{v['cmd_ci'][0]:.3f}, {v['cmd_ci'][1]:.3f}]",
                                           "never" if v["size_at_0.8"] is None else f"{100 * v['size_at_0.8']:.3g}%"])
    associations = [[r["intervention"], int(r["prompts"]), r["correlation_with_none"], r["top5_aae"], r["favorability_top5_aae"]]
                    for r in summary.get("associations", [])]
    tasks = [[r["task"], r["answers"], r["intervention"], int(r["prompts"]), r["gap"], f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"]
             for r in summary.get("tasks", [])]
    fig = run_dir / "figures" / "intervention_dose_response.html"
    data = {"s": summary, "generalization": generalization, "denominators": denominators, "associations": associations,
            "tasks": tasks, "figure": figure(fig) if fig.exists() else None}
    return [Section("intervene", "Does removing it remove the prejudice?", "report/intervene.html.j2", data, nav="Removal")]


def files_section(run_dir: Path, manifest: dict | None, cfg) -> list[Section]:
    """Relative links to the run's tables and tensors."""
    folders = []
    kinds = (("tables", ("*.csv", "*.parquet", "*.json", "*.txt")), ("tensors", ("*.safetensors",)))
    for folder, patterns in kinds:
        files = sorted({p for pattern in patterns for p in (run_dir / folder).glob(pattern)
                        if not p.name.startswith(".")})
        if files:
            folders.append((folder, [(p.name, p.stat().st_size) for p in files]))
    if not folders:
        return []
    return [Section("files", "Tables and tensors", "report/files.html.j2", {"folders": folders}, nav="Tables")]


RULE_TEXT = {
    "none (rated metric)": "None are chosen: the metric weighs every rated attribute by its human rating, the same for "
                           "every prompt, so nothing is selected on the data it is measured on. Swapping a pair's guises "
                           "negates its gap.",
    "per_prompt": "per_prompt: each prompt's answers are the most and least AAE-associated attributes of its own "
                  "probing (the notebook's rule). Its gap is then max - min of the prompt's own associations: positive "
                  "by construction, and unchanged when the prompt's guises are swapped, so the null below equals the "
                  "observed gap and p = 1. This gap says nothing about dialect; use cross_fit or global to measure it.",
    "cross_fit": "cross_fit: each prompt's answers are the attributes most and least associated with AAE over all "
                 "other pairs (leave one pair out), so a prompt's own probing never picks its answers. With no "
                 "dialect effect the gap is centred on 0.",
    "global": "global: one answer pair for every prompt (dataset.answer_pair, or the most and least associated over "
              "all pairs; picked on the same data, that pair's gap is biased upward, which the null below repeats).",
    "fixed (dataset.path)": "The answers come from the dataset file (dataset.path) and are fixed: swapping a prompt's "
                            "guises negates its gap. If the file's answers were picked from this model's own probing of "
                            "these prompts (as the notebook's were), this null cannot know it and its p is too small: "
                            "build the dataset with dataset.answers=cross_fit instead.",
}


def nulls_section(run_dir: Path, manifest: dict | None, cfg) -> list[Section]:
    """Is the effect real? The baseline gap against its guise permutation null, the attribute
    associations and Katz-Braly agreement against theirs, and how many ranked components survive
    the false-discovery-rate correction."""
    tables = run_dir / "tables"
    path = tables / "baseline_null.csv"
    if not path.exists():
        return []
    null = pd.read_csv(path, keep_default_na=False)
    rule = str(null.answers[0])
    rows = [[r.feature, int(r.n_prompts), int(r.n_pairs), float(r.gap), f"[{r.ci_low:.3f}, {r.ci_high:.3f}]",
             f"[{r.null_low:.3f}, {r.null_high:.3f}]", float(r.p_perm)] for r in null.itertuples()]
    n_perm = int(null.null_draws[0]) if "null_draws" in null else None
    data = {"rule": rule, "rule_text": RULE_TEXT.get(rule, rule), "rows": rows, "n_perm": n_perm, "association": None,
            "ranked": []}
    path = tables / "attribute_association.csv"
    if path.exists():
        assoc = pd.read_csv(path)
        if "significant_bh" in assoc:
            sig = assoc[assoc.significant_bh.astype(bool)]
            data["association"] = {"n": len(assoc), "aae": list(sig[sig.association > 0].attribute),
                                   "sae": list(sig[sig.association < 0].attribute)}
    for name, side, what in (("head_attribution.csv", None, "heads (direct logit attribution, clean prompts)"),
                             ("head_attribution_both_sides.csv", "difference",
                              "heads (attribution clean - corrupted: what the dialect changes)"),
                             ("patch_resid_pre.csv", None, "residual stream cells (exact patching)"),
                             ("patch_block.csv", None, "block cells (exact patching)"),
                             ("patch_head_out.csv", None, "heads (exact patching)"),
                             ("patch_head_parts.csv", None, "head parts (exact patching)"),
                             ("attrpatch_head_out.csv", None, "heads (attribution patching, all prompts)")):
        if (tables / name).exists():
            t = pd.read_csv(tables / name)
            if side is not None:
                t = t[t.side == side] if "side" in t else t.iloc[:0]
            if "significant_bh" in t and len(t):
                n_prompts = int(t.n_prompts.max()) if len(t) else 0
                # Over components that vary at all (a shared-prefix cell is exactly 0 on every prompt).
                varying = t.detectable[t.detectable > 0] if "detectable" in t else t.iloc[:0]
                detectable = float(varying.median()) if len(varying) else "-"
                data["ranked"].append([name + (f" (side {side})" if side else ""), what, int(t.significant_bh.astype(bool).sum()), len(t), n_prompts,
                                       float(t.p_signflip.min()) if len(t) else "-", detectable])
    return [Section("nulls", "Is the effect real?", "report/nulls.html.j2", data, nav="Nulls")]


# The page's sections in order; each returns [] when the run holds nothing for it.
SECTIONS = [power_section, headline_section, run_section, dataset_section, stereotypes_section, baseline_section, nulls_section,
            figure_sections, circuit_section, mib_section, intervene_section, files_section]


# ---------------------------------------------------------------- the page

def build_report(run_dir: Path, cfg=None) -> str:
    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.exists() else None
    model = ((manifest or {}).get("model") or {}).get("name")
    direction = (manifest or {}).get("direction")
    title = "dialect-circuits run" + (f": {model}" if model else "") + (f", {direction}" if direction else "")
    sides = {"aae_clean": ("AAE", "SAE", "aae", "sae"), "sae_clean": ("SAE", "AAE", "sae", "aae")}
    sections = [s for make in SECTIONS for s in make(run_dir, manifest, cfg)]
    return render("report.html.j2", title=title, subtitle=str(run_dir.resolve()), direction=direction,
                  sides=sides.get(direction), positive=POSITIVE, negative=NEGATIVE, sections=sections)


def run(ctx) -> None:
    run_dir = Path(ctx.run_dir)
    path = write_atomic(run_dir / "report.html", build_report(run_dir, getattr(ctx, "cfg", None)))
    log.info("report: %s", path)
