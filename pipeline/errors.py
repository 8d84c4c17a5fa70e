"""The exception types the entry point prints as a single line and a non-zero exit, without a
traceback: bad input, and faults the user can fix (a full disk, a damaged file)."""

from __future__ import annotations

import errno
from pathlib import Path


class PipelineError(Exception):
    """Bad input or an impossible request, with a message that names what and where."""


class WriteError(PipelineError):
    """A file could not be written: no space left, an I/O error, a read-only disk, no permission.
    The runner adds the stage and how to resume (pipeline/runner.py)."""

    def __init__(self, path: Path, cause: OSError):
        self.path, self.cause = Path(path), cause
        self.stage: str | None = None  # set by the runner when a stage was writing
        name = errno.errorcode.get(cause.errno or 0)
        super().__init__(f"cannot write {path}: {cause.strerror or cause}" + (f" ({name})" if name else ""))

    @property
    def no_space(self) -> bool:
        return self.cause.errno in (errno.ENOSPC, errno.EDQUOT)
