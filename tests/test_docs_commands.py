"""Every `dialect-circuits ...` command in the README and the docs composes as written: Hydra's
compose API with the command's overrides (each job of a sweep, and each job an experiment sweeps by
itself under -m), then the checks the command makes before any model runs. A few run end to end
on the tiny model. So a renamed key, option or preset breaks a test, not a reader's first try."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO, only_run_dir, run_cli

PLACEHOLDERS = {"<gpu partition>": "gpu", "<date>": "2026-11-27", "<time>": "10-00-00", "<job>": "0",
                "<run>": "outputs/2026-11-27/10-00-00", "<traits run>": "traits", "<overt run>": "overt", "<covert run>": "covert"}
SUBCOMMANDS = ("rerun", "compare", "verify")


def doc_files() -> list[Path]:
    """The README, the docs' pages, and conf/ (the configuration reference shows each file's comments)."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "conf").rglob("*.yaml"))]


def page_text(path: Path) -> str:
    """A YAML file's comment lines as an indented block, like a page's code lines."""
    if path.suffix != ".yaml":
        return path.read_text()
    return "\n".join("    " + line.strip().lstrip("#").strip() for line in path.read_text().splitlines() if line.strip().startswith("#"))


def commands(text: str) -> list[str]:
    """The commands of a page: code lines that start with `dialect-circuits` (joined over a trailing
    backslash, without their # comment), and inline code spans that do and give it arguments."""
    found, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.split()[:1] == ["dialect-circuits"] and (line.startswith("    ") or line.startswith("dialect-circuits")):
            while stripped.endswith("\\") and i + 1 < len(lines):
                i += 1
                stripped = stripped[:-1] + " " + lines[i].strip()
            found.append(stripped)
    spans = re.findall(r"`(dialect-circuits(?: [^`]*)?)`", text)
    found += [c for c in spans if c.split()[1:] not in ([], *([w] for w in SUBCOMMANDS))]  # not a bare name
    return [strip_comment(c) for c in found]


def strip_comment(command: str) -> str:
    return re.split(r"\s#\s", command, maxsplit=1)[0].strip()


def argv_of(command: str) -> list[str]:
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value)
    return shlex.split(command)[1:]


def all_commands() -> list[tuple[str, str]]:
    seen, out = set(), []
    for path in doc_files():
        for command in commands(page_text(path)):
            if command not in seen:
                seen.add(command)
                out.append((path.relative_to(REPO).as_posix(), command))
    return out


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """The jobs of a -m sweep that between them take every value of every swept key (comma lists
    and glob() over a group): each value once, the other keys at their first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    from pipeline.config import CONF_DIR

    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices.append([override.input_line])
        elif isinstance(override.value(), Glob):
            names = sorted(p.stem for p in (CONF_DIR / override.key_or_group).glob("*.yaml"))
            choices.append([f"{key}={name}" for name in override.value().filter(names)])
        else:
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
    first = [values[0] for values in choices]
    return [first[:i] + [value] + first[i + 1:] for i, values in enumerate(choices) for value in values]


@pytest.fixture(scope="module")
def compose():
    """Hydra's compose API inside one initialized context, each set of overrides composed once
    (what keeps this file cheap): compose(config_name=..., overrides=..., return_hydra_config=...)."""
    from hydra import compose, initialize_config_dir

    from pipeline.config import CONF_DIR

    done = {}

    def cached(config_name: str, overrides: list[str], return_hydra_config: bool = False):
        key = (tuple(overrides), return_hydra_config)
        if key not in done:
            done[key] = compose(config_name=config_name, overrides=overrides, return_hydra_config=return_hydra_config)
        return done[key]

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield cached


def check_composes(argv: list[str], compose) -> int:
    """The command's own checks of its option names, then compose and check every job it would
    run: each value of a -m sweep once, and each job of an experiment that sweeps by itself under
    -m (hydra.sweeper.params). Returns the number of configs composed."""
    from omegaconf import OmegaConf

    from pipeline import validation
    from pipeline.__main__ import check_group_choices, user_config_dirs

    check_group_choices(argv)
    dirs = user_config_dirs(argv)
    search = [f"hydra.searchpath=[{','.join('file://' + str(d.resolve()) for d in dirs)}]"] if dirs else []
    overrides = [a for a in argv if "=" in a and not a.startswith(("-", "hydra."))]
    jobs = expand_sweeps(overrides) if "-m" in argv else [overrides]
    composed = 0
    for job in {tuple(job): job for job in jobs}.values():
        full = compose(config_name="config", overrides=search + job, return_hydra_config=True)
        # An experiment that sweeps by itself under -m (hydra.sweeper.params): each of its jobs.
        params = full.hydra.sweeper.get("params") if "-m" in argv else None
        given = {o.split("=", 1)[0].lstrip("+") for o in job}
        sweeps = [[f"{k}={v}" for v in str(values).split(",")]
                  for k, values in (OmegaConf.to_container(params) if params else {}).items() if k not in given]
        for extra in itertools.product(*sweeps):
            cfg = compose(config_name="config", overrides=search + job + list(extra)) if extra else full
            validation.check_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
            composed += 1
    return composed


def test_the_docs_have_commands_and_every_one_is_checked():
    found = all_commands()
    pages = {path.relative_to(REPO).as_posix() for path in doc_files() if commands(page_text(path))}
    assert len(found) > 50 and {"README.md", "docs/index.md", "docs/how-to/own-data.md", "docs/how-to/sweeps-and-slurm.md",
                                "conf/experiment/full.yaml", "conf/hydra/launcher/slurm_gpu.yaml"} <= pages
    assert all(argv_of(c)[:1] != ["<"] for _, c in found)


COMMANDS = all_commands()


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{page}:{command[17:70]}" for page, command in COMMANDS])
def test_documented_command_composes(page, command, tmp_path, monkeypatch, compose, capsys):
    monkeypatch.chdir(tmp_path)
    argv = argv_of(command)
    first = argv[0] if argv else ""
    if first in ("compare", "verify"):  # no runs here: the arguments must parse, and only the missing run be named
        from pipeline import tools

        assert tools.main(argv) == 2
        error = capsys.readouterr().err
        assert "--help)" not in error and ("not a directory" in error or "not a run directory" in error), error
        return
    if first == "rerun":  # its overrides replace the saved run's: they must compose
        argv = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
    if "--config-dir" in argv:  # the docs' own preset, as they describe it
        preset = tmp_path / argv[argv.index("--config-dir") + 1] / "experiment" / "night.yaml"
        preset.parent.mkdir(parents=True)
        preset.write_text("# @package _global_\ndataset:\n  max_prompts: 48\n")
    assert check_composes(argv, compose) >= 1


def test_a_broken_command_is_caught(tmp_path, monkeypatch, compose):
    from hydra.errors import HydraException

    from pipeline.errors import PipelineError

    monkeypatch.chdir(tmp_path)
    for bad in ("dialect-circuits patching.sweep=[resid_pre]", "dialect-circuits -m model=gpt2-small,gpt2-tiny",
                "dialect-circuits metric=prob_diff stage=patching", "dialect-circuits -m '+experiment=glob(feature_*)' dataset.max_prompts=-1"):
        with pytest.raises((PipelineError, HydraException)):
            check_composes(argv_of(bad), compose)


def test_documented_commands_run_on_the_tiny_model(tmp_path, monkeypatch, capsys):
    """`stage=data` on the docs' own pair file (with model=tiny added), `verify` on its run (in this
    process, through the function the command calls), and `--cfg job`, as written."""
    docs = (REPO / "docs" / "how-to" / "own-data.md").read_text()
    command = "dialect-circuits dataset.pairs=habitual.txt dataset.feature=habitual_be stage=data"
    assert command in [c for _, c in all_commands()]
    example = docs[docs.index("Example, `habitual.txt`"):].split("\n\n")[1]
    (tmp_path / "habitual.txt").write_text("".join(line.strip().replace("<TAB>", "\t") + "\n" for line in example.splitlines()))
    done = run_cli(argv_of(command) + ["model=tiny"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    run = only_run_dir(tmp_path)
    assert (run / "tables" / "attribute_association.csv").exists()

    from pipeline import tools  # what the command runs for its first word `verify`

    assert "dialect-circuits verify outputs/2026-11-27/10-00-00" in [c for _, c in all_commands()]
    monkeypatch.chdir(tmp_path)
    assert tools.main(["verify", str(run.relative_to(tmp_path))]) == 0
    assert ": whole: the run is complete" in capsys.readouterr().out

    command = "dialect-circuits model=gpt2-small direction=sae_clean --cfg job"
    assert command in [c for _, c in all_commands()]
    done = run_cli(argv_of(command), tmp_path)
    assert done.returncode == 0 and "name: gpt2\n" in done.stdout and "clean: sae" in done.stdout
