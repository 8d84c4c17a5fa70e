"""Writing into a run directory: every file is written to a temporary name and renamed, so a
reader never sees half a file. Tensors go to safetensors, tables to CSV, figures to plotly HTML
that loads plotly.js from a copy inside the run (no CDN), each with its plotly JSON beside it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    import torch

# pandas, torch and safetensors are imported where used: the runner imports this module, and a
# run refused for bad input should not pay for them (pipeline/validation.py).

PLOTLY_JS = "plotly.min.js"


def write_atomic(path: Path, data: bytes | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


def write_json(path: Path, obj) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def write_table(path: Path, df: pd.DataFrame) -> Path:
    return write_atomic(path, df.to_csv(index=False))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def safe_open_metadata(path: Path) -> dict[str, str]:
    """The string metadata stored in a safetensors file's header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def ensure_plotly_js(figures_dir: Path) -> None:
    """Copy plotly.js into the run once, so every figure opens with no network."""
    target = Path(figures_dir) / PLOTLY_JS
    if not target.exists():
        from plotly.offline import get_plotlyjs

        write_atomic(target, get_plotlyjs())


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
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
