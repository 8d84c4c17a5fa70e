"""Read the three inputs of matched guise probing from files, in the formats the field uses, and
refuse anything malformed with one line that names the file, the line, what is wrong and what
would be accepted.

- pairs: `AAE<TAB>SAE` lines (the public matched guise probing repositories' format), or a CSV
  with the columns `aae,sae` and optional `feature`, `pronoun`, `pair_id` (a `.csv` file);
- templates: one per line, each with exactly one `{}` where the utterance goes;
- attributes: one per line (a trait adjective, an occupation, `acquitted`), written without
  the leading space the model sees; any number of tokens.

The package's own files (pipeline/data/) are read by the same functions, so they pass the same
checks. Blank lines are skipped everywhere; a file with nothing else is an error.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pandas as pd

from pipeline.errors import PipelineError

PAIR_COLUMNS = ["aae", "sae"]
OPTIONAL_PAIR_COLUMNS = ["feature", "pronoun", "pair_id"]
PRONOUNS = {"i", "you", "he", "she", "it", "we", "they"}
TAB_EXAMPLE = "he be cracking<TAB>he's usually cracking"


def _lines(path: Path, key: str) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines; one clear line if the file cannot be read."""
    if not path.is_file():
        raise PipelineError(f"{key}: no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM from spreadsheet exports is not content
    except UnicodeDecodeError as err:
        raise PipelineError(f"{key} {path}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
    lines = [(n, line.rstrip("\r\n")) for n, line in enumerate(text.splitlines(), start=1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    if not lines:
        raise PipelineError(f"{key} {path}: the file is empty (want one entry per line)")
    return lines


def _feature_name(path: Path, feature: str | None) -> str:
    name = feature or re.sub(r"[^A-Za-z0-9_]+", "_", path.stem).strip("_") or "pairs"
    return str(name)


def _pronoun(utterance: str) -> str:
    first = utterance.split()[0].lower() if utterance.split() else ""
    return first if first in PRONOUNS else ""


def read_pairs(path: str | Path, feature: str | None = None, key: str = "dataset.pairs") -> pd.DataFrame:
    """Columns pair_id, feature, pronoun, aae, sae; one row per line of the file."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return _read_pair_csv(path, feature, key)
    feature = _feature_name(path, feature)
    rows = []
    for n, line in _lines(path, key):
        fields = line.split("\t")
        where = f"{key} {path}, line {n}"
        if len(fields) == 1:
            raise PipelineError(f"{where}: no tab between the AAE and the SAE utterance; want AAE<TAB>SAE "
                                f"(e.g. {TAB_EXAMPLE}), or a .csv file with columns aae,sae")
        if len(fields) > 2:
            raise PipelineError(f"{where}: {len(fields) - 1} tabs; want exactly one, AAE<TAB>SAE (e.g. {TAB_EXAMPLE})")
        aae, sae = fields[0].strip(), fields[1].strip()
        rows.append(_check_pair(where, aae, sae) | {"feature": feature, "pronoun": _pronoun(aae),
                                                    "pair_id": f"{feature}_{n:04d}"})
    return _finish_pairs(pd.DataFrame(rows), path, key)


def _check_pair(where: str, aae: str, sae: str) -> dict:
    if not aae or not sae:
        side = "AAE" if not aae else "SAE"
        raise PipelineError(f"{where}: the {side} utterance is empty; want two non-empty utterances")
    if aae == sae:
        raise PipelineError(f"{where}: the AAE and SAE utterances are the same ({aae!r}); a matched guise pair "
                            "must differ in dialect")
    return {"aae": aae, "sae": sae}


def _read_pair_csv(path: Path, feature: str | None, key: str) -> pd.DataFrame:
    lines = _lines(path, key)
    header = next(csv.reader([lines[0][1]]))
    columns = [c.strip() for c in header]
    accepted = PAIR_COLUMNS + OPTIONAL_PAIR_COLUMNS
    for want in PAIR_COLUMNS:
        if want not in columns:
            raise PipelineError(f"{key} {path}, line {lines[0][0]}: no column {want!r} in the header {header}; "
                                f"want columns {', '.join(PAIR_COLUMNS)} (optional: {', '.join(OPTIONAL_PAIR_COLUMNS)})")
    unknown = [c for c in columns if c not in accepted]
    if unknown or len(set(columns)) != len(columns):
        what = f"unknown column {unknown[0]!r}" if unknown else "a repeated column"
        raise PipelineError(f"{key} {path}, line {lines[0][0]}: {what}; accepted columns: {', '.join(accepted)}")
    rows = []
    for n, line in lines[1:]:
        where = f"{key} {path}, line {n}"
        cells = next(csv.reader([line]))
        if len(cells) != len(columns):
            raise PipelineError(f"{where}: {len(cells)} cells, the header has {len(columns)} ({', '.join(columns)})")
        cell = dict(zip(columns, (c.strip() for c in cells)))
        row = _check_pair(where, cell["aae"], cell["sae"])
        row["feature"] = cell.get("feature") or _feature_name(path, feature)
        row["pronoun"] = cell["pronoun"] if "pronoun" in cell else _pronoun(row["aae"])
        row["pair_id"] = cell.get("pair_id") or f"{row['feature']}_{n:04d}"
        rows.append(row)
    if not rows:
        raise PipelineError(f"{key} {path}: the file has a header but no pairs")
    return _finish_pairs(pd.DataFrame(rows), path, key)


def _finish_pairs(df: pd.DataFrame, path: Path, key: str) -> pd.DataFrame:
    dup = df.duplicated(["aae", "sae"])
    if dup.any():
        first = df[dup].iloc[0]
        raise PipelineError(f"{key} {path}: the pair {first.aae!r} / {first.sae!r} appears twice; "
                            "each pair once (a repeat would weigh it double)")
    return df[["pair_id", "feature", "pronoun", "aae", "sae"]].reset_index(drop=True)


def read_templates(path: str | Path, key: str = "dataset.templates") -> list[str]:
    """Templates with exactly one `{}`, surrounding spaces removed (the attribute brings its own)."""
    path = Path(path)
    out: dict[str, int] = {}
    for n, line in _lines(path, key):
        template = line.strip()
        slots = template.count("{}")
        if slots != 1:
            what = "no {} slot" if slots == 0 else f"{slots} {{}} slots"
            raise PipelineError(f"{key} {path}, line {n}: {what} in {template!r}; want exactly one {{}} where the "
                                'utterance goes, e.g. The person says: " {} " The person is')
        if template.endswith("{}"):
            raise PipelineError(f"{key} {path}, line {n}: nothing after the {{}} slot in {template!r}; the attribute "
                                "is predicted after the template's last word, e.g. ... \" {} \" The person is")
        if template in out:
            raise PipelineError(f"{key} {path}, line {n}: the template repeats line {out[template]}; each template once")
        out[template] = n
    return list(out)


def read_attributes(path: str | Path, key: str = "dataset.attributes") -> list[str]:
    """Attributes without their leading space, in file order."""
    path = Path(path)
    out: dict[str, int] = {}
    for n, line in _lines(path, key):
        attribute = line.strip()
        if "\t" in attribute:
            raise PipelineError(f"{key} {path}, line {n}: a tab in {attribute!r}; want one attribute per line")
        if attribute in out:
            raise PipelineError(f"{key} {path}, line {n}: {attribute!r} repeats line {out[attribute]}; each attribute once")
        out[attribute] = n
    if len(out) < 2:
        raise PipelineError(f"{key} {path}: only one attribute ({next(iter(out))!r}); want at least two, one per line")
    return list(out)


def fill(template: str, utterance: str) -> str:
    """The prompt: the template with the utterance in its slot (no str.format, so other braces in a
    template are kept as written)."""
    return template.replace("{}", utterance, 1)
