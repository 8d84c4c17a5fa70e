"""`dialect-circuits compare DIR [DIR ...]`: put two or more runs side by side.

Each DIR is a run directory (it holds manifest.json) or a multirun directory (its job
subdirectories that hold manifest.json are taken in job order). Every per-component table that
all runs have is joined on its key columns (every column that is not a statistic), and written
as `tables/compare_<name>.csv` with one mean column per run, the difference against the first
run, and a rank by the largest absolute difference. `comparison.html` shows, per table, run A
against run B per component and the components that differ most.

A table is per-component when it has a `mean` column (head_attribution, layer_attribution,
patch_<sweep>, attrpatch_<sweep>, and whatever later stages write in that shape); metric.csv
(the baseline metric) is per prompt and is first reduced to means per dialect feature.
"""

from __future__ import annotations

import argparse
import html
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from markupsafe import Markup
from omegaconf import OmegaConf

from pipeline.artifacts import PLOTLY_JS, ensure_plotly_js, read_yaml, write_atomic, write_table
from pipeline.artifacts import read_table as read_csv
from pipeline.errors import PipelineError
from pipeline.pages import render
from pipeline.runner import MACHINE_LOCAL, read_manifest, run_output_problems

# Columns that hold a statistic of a component; every other column names the component, except
# one named <statistic>_<group> (mean_finna: the mean over one feature's prompts) and one of
# numbers with decimals (a statistic this list does not know yet: never a key).
STATISTICS = ("mean", "sem", "std", "ci_low", "ci_high", "n_prompts", "n", "p_signflip", "q_bh", "significant_bh",
              "detectable", "normalized")
TOP = 20
# Page order: the baseline, the attribution tables, the patching sweeps, then anything else.
ORDER = ("metric", "head_attribution", "layer_attribution", "patch_", "attrpatch_")


class Run:
    """One run directory: its manifest, its flattened config and the label it gets on the page."""

    def __init__(self, path: Path):
        self.path = path
        self.manifest = read_manifest(path)
        self.config = flat_config(path, self.manifest)
        self.label = path.name
        # What compare reads must be as the run wrote it (a truncated table still parses).
        damaged = run_output_problems(path, self.manifest, under=("tables/", "tensors/"))
        if damaged:
            more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
            raise PipelineError(f"{path}/{damaged[0]}{more}: that run is damaged (dialect-circuits verify {path} lists "
                                "what is wrong; resuming the run writes it again)")

    def table_names(self) -> set[str]:
        return {p.stem for p in (self.path / "tables").glob("*.csv")}


def flat_config(run_dir: Path, manifest: dict) -> dict[str, str]:
    """The run's config as {dotted key: value text}, from .hydra/config.yaml (interpolations
    left as written) or, where that is missing, the little the manifest says."""
    saved = run_dir / ".hydra" / "config.yaml"
    if saved.exists():
        return flatten(OmegaConf.to_container(read_yaml(saved), resolve=False))
    return {"model.name": str(manifest.get("model", {}).get("name")), "direction.name": str(manifest.get("direction"))}


def flatten(node, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: str(node)}


def find_runs(dirs: list[str]) -> list[Run]:
    """Run directories in the order given; a multirun directory becomes its jobs, in job order."""
    paths: list[Path] = []
    for given in dirs:
        path = Path(given)
        if not path.is_dir():
            raise PipelineError(f"{given} is not a directory")
        if (path / "manifest.json").exists():
            paths.append(path)
            continue
        jobs = sorted((p.parent for p in path.glob("*/manifest.json")), key=job_order)
        if not jobs:
            raise PipelineError(f"{given} is neither a run directory (no manifest.json) nor a multirun directory "
                                "(no job subdirectories with manifest.json)")
        paths.extend(jobs)
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    if len(unique) < 2:
        raise PipelineError(f"compare needs two or more runs; found {len(unique)} in {' '.join(dirs)}")
    return [Run(p) for p in unique]


def job_order(path: Path):
    """Multirun jobs are named 0, 1, ... 10: sort them as numbers, anything else by name."""
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def check_same_dataset(runs: list[Run]) -> None:
    hashes = {run.label: run.manifest.get("dataset_hash") for run in runs}
    if len(set(hashes.values())) > 1:
        shown = ", ".join(f"{label}: {str(h)[:12]}" for label, h in hashes.items())
        raise PipelineError(f"the runs were made on different datasets (dataset_hash {shown}); "
                            "compare them anyway with --allow-different-datasets")


def label_runs(runs: list[Run]) -> None:
    """Name each run by what differs in its config: direction and model names, else key=value."""
    keys = list(dict.fromkeys(k for run in runs for k in run.config))
    # `stage` chooses which stages run, not what they compute (runner.NOT_HASHED), and a cache
    # folder is where a machine keeps its files (runner.MACHINE_LOCAL): never a label.
    differing = [k for k in keys if len({run.config.get(k) for run in runs}) > 1 and k.split(".")[0] != "stage"
                 and k not in MACHINE_LOCAL]

    def implied(key: str) -> bool:
        # The rest of a model or direction config follows from its name.
        group = key.split(".", 1)[0]
        return group in ("model", "direction") and f"{group}.name" in differing and key != f"{group}.name"

    shown = [k for k in differing if not implied(k)]
    for run in runs:
        parts = [run.config.get(k, "(unset)") if k in ("model.name", "direction.name") else f"{k}={run.config.get(k, '(unset)')}"
                 for k in shown]
        run.label = " ".join(parts) or run.path.name
    labels = [run.label for run in runs]
    for run in runs:
        if labels.count(run.label) > 1:
            run.label = f"{run.label} ({run.path.name})"
    if len({run.label for run in runs}) < len(runs):  # same config and same directory names
        for i, run in enumerate(runs):
            run.label = f"{run.label} #{i + 1}"


def read_table(run: Run, name: str) -> pd.DataFrame | None:
    """The table as components x statistics, or None when it is not a per-component table."""
    path = run.path / "tables" / f"{name}.csv"
    if name == "metric":
        per_prompt = read_csv(path, keep_default_na=False)
        needed = {"clean_metric", "corrupted_metric"}
        return metric_means(per_prompt) if needed <= set(per_prompt.columns) else None
    df = read_csv(path, dtype=str, keep_default_na=False)
    if "mean" not in df.columns:
        return None
    for column in df.columns:
        numbers = pd.to_numeric(df[column].mask(df[column] == "").replace({"True": "1", "False": "0"}), errors="coerce")
        all_numbers = (numbers.notna() | (df[column] == "")).all()
        has_decimals = all_numbers and (numbers.dropna() % 1 != 0).any()
        if column in STATISTICS or column.startswith(tuple(f"{stat}_" for stat in STATISTICS)) or has_decimals:
            df[column] = numbers
        else:
            # Integers written by a float column ("3.0") must join with integers written as "3".
            df[column] = df[column].str.replace(r"^(-?\d+)\.0$", r"\1", regex=True)
    return df


def metric_means(per_prompt: pd.DataFrame) -> pd.DataFrame:
    """metric.csv reduced to the mean of each run side (and their gap) per dialect feature and
    over all prompts, in the long shape of the other tables."""
    per_prompt = per_prompt.assign(gap_metric=per_prompt.clean_metric - per_prompt.corrupted_metric)
    features = per_prompt["feature"].astype(str) if "feature" in per_prompt else pd.Series("", index=per_prompt.index)
    rows = []
    for quantity in ("clean_metric", "corrupted_metric", "gap_metric"):
        groups = [("all", per_prompt[quantity])]
        groups += [(f, per_prompt.loc[features == f, quantity]) for f in sorted(features.unique()) if f]
        for feature, values in groups:
            values = values.astype(float)
            rows.append({"quantity": quantity.removesuffix("_metric"), "feature": feature, "mean": values.mean(),
                         "sem": values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.nan,
                         "n_prompts": len(values)})
    return pd.DataFrame(rows)


def key_columns(df: pd.DataFrame) -> list[str]:
    """The columns that name a component: the text columns (read_table made statistics numbers)."""
    return [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]


def component_names(df: pd.DataFrame, keys: list[str]) -> pd.Series:
    """What a row is, for hover text and bar labels: the table's `name` column where it has one,
    else its non-empty key values (the sweep name, the same on every row, left out)."""
    if "name" in keys:
        return df["name"].astype(str)
    shown = [k for k in keys if k != "sweep"]
    return df[shown].astype(str).apply(
        lambda row: " ".join(v if k == "component" else f"{k}={v}" for k, v in row.items() if v not in ("", "nan")), axis=1)


def join_runs(tables: list[pd.DataFrame], runs: list[Run]) -> pd.DataFrame | str:
    """The runs' tables joined on their key columns; a string says why the table was skipped."""
    keys = key_columns(tables[0])
    for run, df in zip(runs, tables):
        if key_columns(df) != keys:
            return f"its key columns differ between runs ({run.label} has {', '.join(key_columns(df))})"
        if df.duplicated(keys).any():
            return f"its key columns ({', '.join(keys)}) do not name one row each in {run.label}"
    joined = None
    for run, df in zip(runs, tables):
        stats = [c for c in ("mean", "ci_low", "ci_high") if c in df.columns]
        part = df[keys + stats].rename(columns={c: f"{c}[{run.label}]" for c in stats})
        # Outer join: a component that one run lacks (another model's layer 20) stays, with gaps.
        joined = part if joined is None else joined.merge(part, on=keys, how="outer", sort=False)
    first = f"mean[{runs[0].label}]"
    diffs = []
    for run in runs[1:]:
        column = f"diff[{run.label} - {runs[0].label}]"
        joined[column] = joined[f"mean[{run.label}]"] - joined[first]
        diffs.append(column)
    joined["max_abs_diff"] = joined[diffs].abs().max(axis=1, skipna=False)
    joined = joined.sort_values("max_abs_diff", ascending=False, na_position="last", kind="stable")
    joined.insert(0, "rank", range(1, len(joined) + 1))
    return joined.reset_index(drop=True)


def scatter(joined: pd.DataFrame, names: pd.Series, runs: list[Run], name: str) -> go.Figure:
    a, b = (f"mean[{run.label}]" for run in runs)
    both = joined.dropna(subset=[a, b])
    names = names[both.index]
    low = float(min(both[a].min(), both[b].min())) if len(both) else 0.0
    high = float(max(both[a].max(), both[b].max())) if len(both) else 1.0
    fig = go.Figure([
        go.Scatter(x=[low, high], y=[low, high], mode="lines", line=dict(dash="dot", color="grey"),
                   name="equal", hoverinfo="skip"),
        go.Scatter(x=both[a], y=both[b], mode="markers", text=names, name="component",
                   hovertemplate="%{text}<br>" + html.escape(runs[0].label) + ": %{x:.4f}<br>"
                                 + html.escape(runs[1].label) + ": %{y:.4f}<extra></extra>"),
    ])
    fig.update_layout(title=f"{name}: mean per component, {runs[0].label} against {runs[1].label}",
                      xaxis_title=runs[0].label, yaxis_title=runs[1].label, width=620, height=560, showlegend=False,
                      yaxis_scaleanchor="x")
    return fig


def top_bar(joined: pd.DataFrame, names: pd.Series, runs: list[Run], name: str) -> go.Figure:
    """Two runs: the difference of the TOP components; more: each run's mean of them, grouped."""
    top = joined.dropna(subset=["max_abs_diff"]).head(TOP)
    labels = names[top.index]
    if len(runs) == 2:
        diff = f"diff[{runs[1].label} - {runs[0].label}]"
        fig = go.Figure(go.Bar(x=labels, y=top[diff], marker_color=np.where(top[diff] > 0, "#b2182b", "#2166ac"),
                               hovertemplate="%{x}: %{y:.4f}<extra></extra>"))
        fig.update_layout(yaxis_title=f"{runs[1].label} - {runs[0].label}")
    else:
        fig = go.Figure([go.Bar(x=labels, y=top[f"mean[{run.label}]"], name=run.label) for run in runs])
        fig.update_layout(barmode="group", yaxis_title="mean")
    fig.update_layout(title=f"{name}: the {len(top)} components that differ most", xaxis_title="component",
                      width=1000, height=480)
    return fig


def correlation(joined: pd.DataFrame, runs: list[Run]) -> str:
    a, b = (f"mean[{run.label}]" for run in runs[:2])
    both = joined.dropna(subset=[a, b])
    if len(both) < 3 or both[a].std() == 0 or both[b].std() == 0:
        return ""
    return f"Pearson r between {runs[0].label} and {runs[1].label}: {both[a].corr(both[b]):.3f} over {len(both)} components. "


def page(runs: list[Run], sections: list[dict], skipped: list[str], circuit: dict | None = None,
         scores: dict | None = None, scaling: dict | None = None) -> str:
    shown = [{"label": run.label, "path": str(run.path), "model": str(run.manifest.get("model", {}).get("name")),
              "direction": str(run.manifest.get("direction")), "dataset": str(run.manifest.get("dataset_hash")),
              "device": str(run.manifest.get("device")), "status": str(run.manifest.get("status"))} for run in runs]
    return render("comparison.html.j2", runs=shown, sections=sections, skipped=skipped, plotly_js=PLOTLY_JS,
                  circuit=circuit, scores=scores, scaling=scaling)


def section(name: str, joined: pd.DataFrame, names: pd.Series, runs: list[Run]) -> dict:
    """What comparison.html shows of one table: its figures (plotly divs) and a line about it."""
    figs = [top_bar(joined, names, runs, name)]
    if len(runs) == 2:
        figs.insert(0, scatter(joined, names, runs, name))
    return {"name": name, "n": len(joined), "correlation": correlation(joined, runs),
            "top": ", ".join(names[joined.max_abs_diff.notna()].head(5)), "csv": f"tables/compare_{name}.csv",
            # plotly's own HTML, trusted: the template inserts it unescaped
            "figures": [Markup(f.to_html(include_plotlyjs=False, full_html=False)) for f in figs]}


def page_order(name: str) -> tuple[int, str]:
    return next((i for i, prefix in enumerate(ORDER) if name.startswith(prefix)), len(ORDER)), name


def default_out(runs: list[Run]) -> Path:
    parent = Path(os.path.commonpath([str(run.path) for run in runs]))
    out = parent / f"comparison-{datetime.now():%Y-%m-%d_%H-%M-%S}"
    n = 1
    while out.exists():
        out = parent / f"comparison-{datetime.now():%Y-%m-%d_%H-%M-%S}-{n}"
        n += 1
    return out


@dataclass
class Comparison:
    """What `compare` computes, before any page: the runs (labelled), each compared table joined
    across them, each table's component names, and the tables that could not be compared."""

    runs: list[Run]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    names: dict[str, pd.Series] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    circuit: dict | None = None  # pipeline/circuit/compare_view.py: shared edges, both faithfulness curves
    scores: dict | None = None  # pipeline/compare_scores.py: headline scores and stereotype agreement
    scaling: dict | None = None  # pipeline/scaling.py: the headline and circuit size against size or training step


def open_runs(dirs: list[str], allow_different_datasets: bool) -> list[Run]:
    """The runs of `dirs`, labelled, refused when their datasets differ (unless allowed)."""
    runs = find_runs(dirs)
    label_runs(runs)
    if not allow_different_datasets:
        check_same_dataset(runs)
    return runs


def comparison(runs: list[Run], circuit_prompts: int = 8) -> Comparison:
    """Every per-component table the runs have, joined across them (shared by the command and
    pipeline/api.py; it prints nothing and writes nothing). `circuit_prompts`: held-out prompts of
    each run every run's circuit is evaluated on, where the runs share a model (0: none)."""
    result = Comparison(runs)
    for name in sorted(set.union(*(run.table_names() for run in runs)), key=page_order):
        having = [run for run in runs if name in run.table_names()]
        tables = [read_table(run, name) for run in having]
        if tables[0] is None:
            continue  # not a per-component table (no mean column)
        if len(having) < len(runs):
            missing = [run.label for run in runs if run not in having]
            result.skipped.append(f"tables/{name}.csv: missing in {', '.join(missing)}")
            continue
        joined = join_runs(tables, runs)
        if isinstance(joined, str):
            result.skipped.append(f"tables/{name}.csv: {joined}")
            continue
        if joined["max_abs_diff"].isna().all():
            result.skipped.append(f"tables/{name}.csv: no component is in every run")
            continue
        result.tables[name] = joined
        result.names[name] = component_names(joined, key_columns(tables[0]))
    from pipeline.circuit.compare_view import circuit_comparison

    result.circuit = circuit_comparison(runs, circuit_prompts)
    from pipeline.compare_scores import score_comparison
    from pipeline.scaling import scaling_comparison

    result.scores = score_comparison(runs)
    result.scaling = scaling_comparison(runs)
    if not result.tables and not result.circuit and not result.scores and not result.scaling:
        raise PipelineError(f"the runs share no per-component table to compare ({', '.join(str(r.path) for r in runs)})")
    return result


def write_comparison(result: Comparison, out_dir: Path) -> Path:
    """tables/compare_<name>.csv and comparison.html (with its plotly.js) into out_dir."""
    out_dir = Path(out_dir)
    sections = []
    for name, joined in result.tables.items():
        write_table(out_dir / "tables" / f"compare_{name}.csv", joined)
        sections.append(section(name, joined, result.names[name], result.runs))
    for name, table in {**(result.circuit or {}).get("tables", {}), **(result.scores or {}).get("tables", {})}.items():
        write_table(out_dir / "tables" / f"{name}.csv", table)
    if result.scaling:
        write_table(out_dir / "tables" / "compare_scaling.csv", result.scaling["table"])
    ensure_plotly_js(out_dir)
    write_atomic(out_dir / "comparison.html", page(result.runs, sections, result.skipped, result.circuit, result.scores,
                                                   result.scaling))
    return out_dir


def compare(dirs: list[str], out: str | None, allow_different_datasets: bool, circuit_prompts: int = 8) -> Path:
    runs = open_runs(dirs, allow_different_datasets)
    out_dir = Path(out) if out else default_out(runs)
    for run in runs:
        print(f"  {run.label}: {run.path} ({run.manifest.get('status')})")
        if run.manifest.get("status") != "complete":
            print(f"  note: {run.label} did not finish (status {run.manifest.get('status')}); its tables may be partial")
    result = comparison(runs, circuit_prompts)
    for name, joined in result.tables.items():
        print(f"  {name}: {len(joined)} components; largest difference {joined['max_abs_diff'].max():.4g} "
              f"({result.names[name].iloc[0]})")
    if result.scaling:
        print(f"  scaling: the headline against {result.scaling['axis']} over {len(result.scaling['rows'])} runs "
              "(tables/compare_scaling.csv)")
    for note in result.skipped:
        print(f"  skipped {note}")
    write_comparison(result, out_dir)
    print(f"comparison: {out_dir / 'comparison.html'}")
    return out_dir


def main(argv: list[str], parser: argparse.ArgumentParser) -> int:
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run directories, or a multirun directory")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: <common parent>/comparison-<time>)")
    parser.add_argument("--allow-different-datasets", action="store_true",
                        help="compare runs whose dataset.csv differ (e.g. two models' built datasets)")
    parser.add_argument("--circuit-prompts", type=int, default=8, metavar="N",
                        help="held-out prompts of each run that every run's circuit is evaluated on, where the runs share a "
                             "model (loads it; 0: compare the circuits' edges only)")
    args = parser.parse_args(argv)
    compare(args.dirs, args.out, args.allow_different_datasets, args.circuit_prompts)
    return 0
