"""Read the three inputs of matched guise probing from files, in the formats the field uses, and
refuse anything malformed with one line that names the file, the line, what is wrong and what
would be accepted.

- pairs: `AAE<TAB>SAE` lines (the public matched guise probing repositories' format), or a CSV
  with the columns `aae,sae` and optional `feature`, `pronoun`, `pair_id` (a `.csv` file);
- templates: one per line, each with exactly one `{}` where the utterance goes;
- attributes: one per line (a trait adjective, an occupation, `acquitted`), written without
  the leading space the model sees; any number of tokens.

The package's own files (pipeline/data/) are read by the same functions, so they pass the same
checks. Blank lines are skipped everywhere; a file with nothing else is an error. Problems are
refused in pipeline/validation.py's one-line form: `<key> <file>, line <n>: <what>; accepted: <what>`.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pandas as pd

from pipeline.validation import refuse

PAIR_COLUMNS = ["aae", "sae"]
OPTIONAL_PAIR_COLUMNS = ["feature", "pronoun", "pair_id"]
PRONOUNS = {"i", "you", "he", "she", "it", "we", "they"}
TAB_EXAMPLE = "he be cracking<TAB>he's usually cracking"


def _lines(path: Path, key: str) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines; one clear line if the file cannot be read."""
    if not path.is_file():
        refuse(key, f"no such file: {path}", "the path of a readable text file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM from spreadsheet exports is not content
    except UnicodeDecodeError as err:
        refuse(f"{key} {path}", f"not UTF-8 text (byte {err.start})", "a file saved as UTF-8")
    lines = [(n, line.rstrip("\r\n")) for n, line in enumerate(text.splitlines(), start=1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    if not lines:
        refuse(f"{key} {path}", "the file is empty", "one entry per line")
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
        where = (f"{key} {path}", n)
        if len(fields) == 1:
            refuse(where[0], "no tab between the AAE and the SAE utterance",
                   f"AAE<TAB>SAE (e.g. {TAB_EXAMPLE}), or a .csv file with columns aae,sae", line=n)
        if len(fields) > 2:
            refuse(where[0], f"{len(fields) - 1} tabs", f"exactly one, AAE<TAB>SAE (e.g. {TAB_EXAMPLE})", line=n)
        aae, sae = fields[0].strip(), fields[1].strip()
        rows.append(_check_pair(where, aae, sae) | {"feature": feature, "pronoun": _pronoun(aae),
                                                    "pair_id": f"{feature}_{n:04d}"})
    return _finish_pairs(pd.DataFrame(rows), path, key)


def _check_pair(where: tuple[str, int], aae: str, sae: str) -> dict:
    if not aae or not sae:
        refuse(where[0], f"the {'AAE' if not aae else 'SAE'} utterance is empty", "two non-empty utterances", line=where[1])
    if aae == sae:
        refuse(where[0], f"the AAE and SAE utterances are the same ({aae!r})",
               "a matched guise pair: the same meaning in AAE and in SAE, which differ", line=where[1])
    return {"aae": aae, "sae": sae}


def _read_pair_csv(path: Path, feature: str | None, key: str) -> pd.DataFrame:
    lines = _lines(path, key)
    header = next(csv.reader([lines[0][1]]))
    columns = [c.strip() for c in header]
    accepted = PAIR_COLUMNS + OPTIONAL_PAIR_COLUMNS
    columns_accepted = f"columns {', '.join(PAIR_COLUMNS)} (optional: {', '.join(OPTIONAL_PAIR_COLUMNS)}), in any order"
    for want in PAIR_COLUMNS:
        if want not in columns:
            refuse(f"{key} {path}", f"no column {want!r} in the header {header}", columns_accepted, line=lines[0][0])
    unknown = [c for c in columns if c not in accepted]
    if unknown or len(set(columns)) != len(columns):
        refuse(f"{key} {path}", f"unknown column {unknown[0]!r}" if unknown else "a repeated column", columns_accepted,
               line=lines[0][0])
    rows = []
    for n, line in lines[1:]:
        where = (f"{key} {path}", n)
        cells = next(csv.reader([line]))
        if len(cells) != len(columns):
            refuse(where[0], f"{len(cells)} cells", f"{len(columns)} cells, as in the header ({', '.join(columns)})", line=n)
        cell = dict(zip(columns, (c.strip() for c in cells)))
        row = _check_pair(where, cell["aae"], cell["sae"])
        row["feature"] = cell.get("feature") or _feature_name(path, feature)
        row["pronoun"] = cell["pronoun"] if "pronoun" in cell else _pronoun(row["aae"])
        row["pair_id"] = cell.get("pair_id") or f"{row['feature']}_{n:04d}"
        rows.append(row)
    if not rows:
        refuse(f"{key} {path}", "the file has a header but no pairs", "one pair per line after the header")
    return _finish_pairs(pd.DataFrame(rows), path, key)


def _finish_pairs(df: pd.DataFrame, path: Path, key: str) -> pd.DataFrame:
    dup = df.duplicated(["aae", "sae"])
    if dup.any():
        first = df[dup].iloc[0]
        refuse(f"{key} {path}", f"the pair {first.aae!r} / {first.sae!r} appears twice",
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
            refuse(f"{key} {path}", f"{what} in {template!r}",
                   'exactly one {} where the utterance goes, e.g. The person says: " {} " The person is', line=n)
        if template.endswith("{}"):
            refuse(f"{key} {path}", f"nothing after the {{}} slot in {template!r}",
                   'words after the slot: the attribute is predicted after the last one, e.g. ... " {} " The person is',
                   line=n)
        if template in out:
            refuse(f"{key} {path}", f"the template repeats line {out[template]}", "each template once", line=n)
        out[template] = n
    return list(out)


def read_attributes(path: str | Path, key: str = "dataset.attributes") -> list[str]:
    """Attributes without their leading space, in file order."""
    path = Path(path)
    out: dict[str, int] = {}
    for n, line in _lines(path, key):
        attribute = line.strip()
        if "\t" in attribute:
            refuse(f"{key} {path}", f"a tab in {attribute!r}", "one attribute per line", line=n)
        if attribute in out:
            refuse(f"{key} {path}", f"{attribute!r} repeats line {out[attribute]}", "each attribute once", line=n)
        out[attribute] = n
    if len(out) < 2:
        refuse(f"{key} {path}", f"only one attribute ({next(iter(out))!r})", "at least two attributes, one per line")
    return list(out)


def fill(template: str, utterance: str) -> str:
    """The prompt: the template with the utterance in its slot (no str.format, so other braces in a
    template are kept as written)."""
    return template.replace("{}", utterance, 1)
