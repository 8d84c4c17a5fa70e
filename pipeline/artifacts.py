"""Writing into a run directory: every file is written to a temporary name and renamed, so a
reader never sees half a file. Tensors go to safetensors, tables to CSV, figures to plotly HTML
that loads plotly.js from a copy inside the run (no CDN), each with its plotly JSON beside it.

A write that fails (no space, an I/O error, a read-only disk, no permission) removes its temporary
file and raises WriteError naming the file. The writers here are the only way a run writes its
files, so `recording()` collects what a stage wrote, and `file_record` / `file_problem` say what a
file was and whether it still is (the manifest's record of each stage's outputs). Readers of a
run's JSON, YAML and CSV files raise a PipelineError naming a damaged file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError, WriteError

if TYPE_CHECKING:
    import pandas as pd
    import torch

# pandas, torch and safetensors are imported where used: the runner imports this module, and a
# run refused for bad input should not pay for them (pipeline/validation.py).

PLOTLY_JS = "plotly.min.js"


# The sets of paths that `recording()` blocks are collecting (the runner opens one per stage).
_recording: list[set[Path]] = []


@contextlib.contextmanager
def recording():
    """Collect the path of every file written (or, for plotly.js, relied on) inside the block."""
    written: set[Path] = set()
    _recording.append(written)
    try:
        yield written
    finally:
        _recording.remove(written)


def _record(path: Path) -> None:
    for written in _recording:
        written.add(Path(path))


def write_atomic(path: Path, data: bytes | str) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as err:  # a signal too: no temporary file is left behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise WriteError(path, err) from err
        raise
    _record(path)
    return path


def write_json(path: Path, obj) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_text(path: Path, what: str) -> str:
    """The file's text, or a PipelineError saying it is missing, unreadable or empty."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing") from None
    except UnicodeDecodeError as err:
        raise PipelineError(f"{path} is damaged: not {what} (byte {err.start} is not UTF-8)") from None
    except OSError as err:
        raise PipelineError(f"cannot read {path}: {err.strerror or err}") from None
    if not text.strip():
        raise PipelineError(f"{path} is damaged: the file is empty")
    return text


def read_json(path: Path):
    text = read_text(path, "JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path} is damaged: not valid JSON ({err})") from None


def read_yaml(path: Path):
    """A YAML file of the run (.hydra/) as an OmegaConf node."""
    import io

    import yaml
    from omegaconf import OmegaConf

    text = read_text(path, "YAML")
    try:
        return OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise PipelineError(f"{path} is damaged: not valid YAML ({problem}{where})") from None
    except OSError as err:  # OmegaConf's "Invalid loaded object type": a bare number or string
        raise PipelineError(f"{path} is damaged: not a YAML mapping or list ({err})") from None


def read_table(path: Path, **read_csv_args) -> pd.DataFrame:
    """A CSV table of the run, or a PipelineError naming the file and what is wrong with it."""
    import pandas as pd

    try:
        return pd.read_csv(path, **read_csv_args)
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing") from None
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{path} is damaged: the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path} is damaged: not a readable CSV table ({str(err).strip().splitlines()[0]})") from None
    except OSError as err:
        raise PipelineError(f"cannot read {path}: {err.strerror or err}") from None


def write_table(path: Path, df: pd.DataFrame) -> Path:
    return write_atomic(path, df.to_csv(index=False))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save

    # Serialized in memory, then written like any file: a failed write is an OSError (save_file
    # would raise safetensors' own error) and leaves no temporary file.
    return write_atomic(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    with tensors_error(path):
        return load_file(str(path))


def safe_open_metadata(path: Path) -> dict[str, str]:
    """The string metadata stored in a safetensors file's header."""
    from safetensors import safe_open

    with tensors_error(path), safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


@contextlib.contextmanager
def tensors_error(path: Path):
    """Reading a safetensors file: a missing or damaged one is a PipelineError naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing") from None
    except SafetensorError as err:
        raise PipelineError(f"{path} is damaged: not a readable safetensors file ({err})") from None


def ensure_plotly_js(figures_dir: Path) -> None:
    """Copy plotly.js into the run once, so every figure opens with no network."""
    target = Path(figures_dir) / PLOTLY_JS
    if not target.exists():
        from plotly.offline import get_plotlyjs

        write_atomic(target, get_plotlyjs())
    _record(target)  # every figure page needs it: an output of each stage that writes figures


# The page of a figure fills whatever frame it is shown in: plotly's responsive mode redraws the
# figure at the frame's size, and the page has no margin of its own. A page with plotly's default
# body margin inside `html, body {height: 100%}` is 16 px taller than its frame, so it scrolls both
# ways in any iframe sized to the figure.
FIGURE_PAGE_STYLE = "<style>html, body {height: 100%; margin: 0; overflow: hidden;}</style>"


def write_figure(path: Path, fig) -> Path:
    """A plotly figure as a standalone HTML page next to the run's copy of plotly.js, and as
    plotly's own JSON beside it (`name.json`), which `read_figure` turns back into the Figure and
    which keeps the figure's intended width and height (the report sizes its frame from them)."""
    path = Path(path)
    ensure_plotly_js(path.parent)
    write_atomic(path.with_suffix(".json"), fig.to_json())  # first: an HTML page always has its JSON
    page = type(fig)(fig).update_layout(width=None, height=None, autosize=True)
    html = page.to_html(include_plotlyjs="directory", full_html=True, config={"responsive": True},
                        default_width="100%", default_height="100%")
    html = html.replace("<style>html, body {height: 100%;}</style>", FIGURE_PAGE_STYLE, 1)
    return write_atomic(path, html)


def read_figure(path: Path):
    """The plotly Figure that write_figure stored as JSON at `path`."""
    import plotly.io

    return plotly.io.read_json(str(path))


def file_hash(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_record(path: Path) -> dict:
    """What the manifest records of an output file."""
    return {"size": Path(path).stat().st_size, "sha256": file_hash(path)}


def file_problem(path: Path, record: dict, check_hash: bool = True) -> str | None:
    """What differs between the file and its record (`file_record`), None when nothing: the size
    first (cheap), then the SHA-256."""
    try:
        size = Path(path).stat().st_size
    except FileNotFoundError:
        return "is missing"
    if size != record.get("size"):
        return f"has {size} bytes, {record.get('size')} recorded"
    if check_hash and file_hash(path) != record.get("sha256"):
        return "has changed (same size, another SHA-256)"
    return None


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
