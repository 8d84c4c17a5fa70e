"""reference/cli.md: the command's own help, captured when the site is built."""

from __future__ import annotations

import subprocess
import sys

import mkdocs_gen_files

COMMANDS = [
    (["--help"], "Hydra's help for the run command: the config groups and the composed default config."),
    (["rerun", "--help"], "Run a past run's config again and compare the tensors."),
    (["compare", "--help"], "Put runs side by side."),
    (["verify", "--help"], "Check a run directory against its manifest."),
    (["--hydra-help"], "Hydra's own flags: `-m` for a sweep, `--cfg job` to print the config and run nothing, "
                       "`--config-dir` for your own presets, and the rest."),
]


def help_text(args: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, check=True)
    return done.stdout.rstrip()


out = ["# Command line", "",
       "`dialect-circuits` runs the stages a config asks for (Hydra composes `conf/`); three subcommands work "
       "on finished run directories. Everything below is the command's own `--help`, captured when this site "
       "was built (`docs/gen/cli_reference.py`). Every key and option is in [Configuration](configuration.md)."]
for args, what in COMMANDS:
    out += ["", f"## dialect-circuits {' '.join(args)}", "", what, "", "```text", help_text(args), "```"]
with mkdocs_gen_files.open("reference/cli.md", "w") as f:
    f.write("\n".join(out) + "\n")
