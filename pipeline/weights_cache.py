"""A folder of model files kept between runs (the embedded model's dequantized weights), that a
damaged disk cannot break for good.

The folder is built once into a temporary folder beside it, with `checksums.json` (each file's
size and SHA-256) written last, then renamed into place: two processes filling it at once never
see each other's half-written files, and the first rename wins. Every load checks the sizes
(cheap); a load that fails checks the hashes to say what is wrong. A size that differs, or a load
that fails, means the folder is built again, with one warning line. A folder from before sizes
and hashes were recorded gets them after its first good load.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable, TypeVar

from safetensors import SafetensorError

from pipeline.artifacts import file_problem, file_record, read_json, write_json
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)
CHECKSUMS = "checksums.json"
T = TypeVar("T")


def load(target: Path, build: Callable[[Path], None], load_folder: Callable[[Path], T]) -> T:
    """`load_folder(target)`, with `target` first built by `build(folder)` when it is missing or
    damaged, and built again once when the load fails (the second failure is raised)."""
    folder = whole(target, build)
    try:
        loaded = load_folder(folder)
    except Exception as err:  # noqa: BLE001 - whatever a damaged file makes the loader raise
        cause = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        problem = damage(folder, hashes=True)
        if problem:
            why = f"{problem} (loading it failed: {cause})"
        elif (folder / CHECKSUMS).exists():
            why = f"loading it failed ({cause}), although every file matches its recorded size and SHA-256"
        else:
            why = f"loading it failed ({cause})"
        log.warning("weights cache %s: %s; building it again", folder, why)
        discard(folder)
        return load_folder(whole(target, build))
    if not (folder / CHECKSUMS).exists():  # a folder written before checksums were: it loads, so record it
        write_json(folder / CHECKSUMS, records(folder))
    return loaded


def whole(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built now if it is missing or a file's size differs from its record."""
    if target.is_dir():
        problem = damage(target, hashes=False)
        if problem is None:
            return target
        log.warning("weights cache %s: %s; building it again", target, problem)
        discard(target)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        build(tmp)
        write_json(tmp / CHECKSUMS, records(tmp))  # last: a folder with it is whole
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (OSError, SafetensorError)):  # no space, an I/O error (safetensors says it its own way)
            raise PipelineError(f"cannot write the weights cache {target}: {str(err).splitlines()[0]} (free some space, "
                                "or set DIALECT_CIRCUITS_WEIGHTS_CACHE to another folder)") from None
        raise
    try:
        tmp.rename(target)
    except OSError:  # another process finished first; its copy is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def records(folder: Path) -> dict[str, dict]:
    return {p.name: file_record(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS}


def damage(folder: Path, hashes: bool) -> str | None:
    """What is wrong with the folder's files against checksums.json (sizes; with `hashes`, also
    SHA-256), None when nothing is known to be wrong."""
    if not (folder / CHECKSUMS).exists():
        return None  # written before checksums were recorded: the load decides
    try:
        recorded = read_json(folder / CHECKSUMS)
        problems = [f"{name} {problem}" for name, record in recorded.items()
                    if (problem := file_problem(folder / name, record, check_hash=hashes))]
    except (PipelineError, AttributeError, TypeError):
        return f"{CHECKSUMS} is damaged"
    return ", ".join(problems) or None


def discard(folder: Path) -> None:
    """Move a damaged folder aside (one rename: no process sees it half-deleted), then delete it."""
    aside = folder.with_name(f"{folder.name}.damaged{os.getpid()}")
    try:
        folder.rename(aside)
    except OSError:  # another process moved it first
        return
    shutil.rmtree(aside, ignore_errors=True)
