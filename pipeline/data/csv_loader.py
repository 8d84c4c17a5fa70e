"""Read a dataset CSV in the notebook's format and refuse anything malformed with one clear line.

The notebook unpacks each row positionally as `prompt_aae, prompt_sae, best_attr_aae,
best_attr_sae, ...`; we require those four names as the first four columns and keep any
further columns (the built dataset writes `feature` and `template`) as metadata.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.errors import PipelineError

REQUIRED = ["prompt_aae", "prompt_sae", "best_attr_aae", "best_attr_sae"]


def load_csv(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"dataset.path: no such file: {path}")
    try:
        df = pd.read_csv(path, dtype=str)  # pandas reads "", NaN, NA, null as missing
    except pd.errors.EmptyDataError:
        raise PipelineError(f"dataset.path {path}: the file is empty") from None
    except pd.errors.ParserError as err:
        raise PipelineError(f"dataset.path {path}: not a readable CSV ({str(err).splitlines()[0]})") from None
    columns = [str(c).strip() for c in df.columns]
    for i, want in enumerate(REQUIRED):
        if i >= len(columns):
            raise PipelineError(f"dataset.path {path}: column {i + 1} is missing, expected {want!r} (need {', '.join(REQUIRED)} first)")
        if columns[i] != want:
            raise PipelineError(f"dataset.path {path}: column {i + 1} is {columns[i]!r}, expected {want!r} (need {', '.join(REQUIRED)} first)")
    df.columns = columns
    if len(df) == 0:
        raise PipelineError(f"dataset.path {path}: the file has a header but no rows")
    for col in REQUIRED:
        bad = df.index[df[col].isna() | (df[col].astype(str).str.strip() == "")]
        if len(bad):
            rows = ", ".join(str(i + 2) for i in bad[:5])
            raise PipelineError(f"dataset.path {path}: empty or NaN cell in column {col!r} on line {rows}")
    for col in REQUIRED[2:]:
        df[col] = df[col].str.strip()
    return df.reset_index(drop=True)
