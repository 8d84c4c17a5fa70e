"""The subcommands beside a Hydra run: `dialect-circuits rerun ...`, `dialect-circuits compare ...`
and `dialect-circuits verify ...`.

pipeline/__main__.py hands them here before Hydra sees the command line; each lives in its own
file (pipeline/rerun.py, pipeline/compare.py, pipeline/verify.py) and returns an exit status.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.errors import PipelineError

COMMANDS = {
    "rerun": "run a past run's saved config again into a new directory and check its tensors are the same",
    "compare": "put two or more runs (or a multirun) side by side: comparison.html and CSV tables",
    "verify": "check a run directory against its manifest: every recorded output there and unchanged",
}


class Parser(argparse.ArgumentParser):
    """argparse that reports bad usage in the project's one-line form instead of usage + message."""

    def error(self, message):
        raise PipelineError(f"{self.prog.removeprefix('dialect-circuits ')}: {message} (see {self.prog} --help)")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"dialect-circuits: error: the first word must be one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    parser = Parser(prog=f"dialect-circuits {command}", description=COMMANDS[command])
    try:
        if command == "rerun":
            from pipeline import rerun

            return rerun.main(rest, parser)
        if command == "verify":
            from pipeline import verify

            return verify.main(rest, parser)
        from pipeline import compare

        return compare.main(rest, parser)
    except PipelineError as err:
        print(f"dialect-circuits: error: {err}", file=sys.stderr)
        return 2
