"""What conf/ says about itself: every config group, option and key, with the value the option
gives it and the comment the YAML gives it.

The docs' configuration reference is drawn from this when the site is built
(docs/gen/config_reference.py), and tests/test_docs_config.py holds every key to a comment with
`undocumented()`. The rule, for anyone adding a key:

- A key that holds a value is documented by a comment on its own line (`top_k: 10  # heads shown`) or by the comment
  lines directly above it. A file's leading comment lines describe the option (the file), not its
  first key. A key that only holds further keys (`processing:`) needs no comment: its keys do.
- A key of a group is documented when at least one option of the group comments it (a preset's
  `processing.fold_ln` is the same key in every model preset); keys of conf/config.yaml in that file.
- A `# @package _global_` option (an experiment, a task) sets keys that other files define: those
  need no comment of their own, but a key that no other file defines (a `hydra.sweeper.params`
  entry) does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.config import CONF_DIR

GLOBAL = "# @package _global_"


@dataclass
class Key:
    path: str          # dotted, as on the command line: model.processing.fold_ln
    value: str         # as written in the file ("" for a key that holds further keys)
    comment: str       # "" when the file gives none
    line: int          # 1-based line in the file
    holds_keys: bool   # a block mapping: its own keys carry the values and the comments


@dataclass
class Option:
    group: str         # "" for conf/config.yaml itself
    name: str
    file: Path
    description: str   # the file's leading comment lines
    package_global: bool
    keys: list[Key] = field(default_factory=list)


def read_option(path: Path, conf_dir: Path = CONF_DIR) -> Option:
    text = path.read_text()
    lines = text.splitlines()
    header_end = 0
    while header_end < len(lines) and lines[header_end].lstrip().startswith("#"):
        header_end += 1
    header = [line.lstrip()[1:].strip() for line in lines[:header_end] if line.strip() != GLOBAL]
    group = path.parent.relative_to(conf_dir).as_posix()
    group = "" if group == "." else group
    package_global = any(line.strip() == GLOBAL for line in lines[:header_end])
    option = Option(group, path.stem, path, "\n".join(header), package_global)
    prefix = "" if package_global or not group else group.replace("/", ".") + "."
    root = yaml.compose(text)
    if root is not None:
        collect(root, prefix, lines, header_end, option.keys)
    return option


def collect(node: yaml.MappingNode, prefix: str, lines: list[str], header_end: int, out: list[Key],
            top: bool = True) -> None:
    for key_node, value_node in node.value:
        if top and key_node.value == "defaults":
            continue  # Hydra's defaults list: the groups, documented by their folders
        path = prefix + key_node.value
        nested = isinstance(value_node, yaml.MappingNode) and value_node.flow_style is False
        row = key_node.start_mark.line
        if nested:
            value, rest = "", lines[row][key_node.end_mark.column:].lstrip()[1:]
        elif getattr(value_node, "style", None) in ("|", ">"):  # a block scalar: its comment follows `|`
            start = value_node.start_mark
            value, rest = " ".join(value_node.value.split()), lines[start.line][start.column:].lstrip("|>+-0123456789")
        else:
            value = " ".join(value_node.start_mark.buffer[value_node.start_mark.index:value_node.end_mark.index].split())
            rest = lines[value_node.end_mark.line][value_node.end_mark.column:]
        comment = rest.strip()[1:].strip() if rest.strip().startswith("#") else ""
        if not comment:
            above = row
            while above > header_end and lines[above - 1].lstrip().startswith("#"):
                above -= 1
            comment = " ".join(line.lstrip()[1:].strip() for line in lines[above:row])
        out.append(Key(path, value, comment, row + 1, nested))
        if nested:
            collect(value_node, path + ".", lines, header_end, out, top=False)


def default_options(conf_dir: Path = CONF_DIR) -> dict[str, str]:
    """{group: its default option}, from config.yaml's defaults list."""
    entries = (yaml.safe_load((conf_dir / "config.yaml").read_text()) or {}).get("defaults", [])
    return {k: v for entry in entries if isinstance(entry, dict) for k, v in entry.items()}


def options(conf_dir: Path = CONF_DIR) -> list[Option]:
    """conf/config.yaml first, then every option of every group: groups by name, each group's
    default option first, then the others by name."""
    defaults = default_options(conf_dir)

    def order(path: Path):
        group = path.parent.relative_to(conf_dir).as_posix()
        return (group != ".", group, path.stem != defaults.get(group), path.stem)

    return [read_option(path, conf_dir) for path in sorted(conf_dir.rglob("*.yaml"), key=order)]


def key_comments(opts: list[Option]) -> dict[str, str]:
    """{dotted key: its comment} from the files that define keys (config.yaml and the options of
    groups that are not `_global_`); a key shared by a group's options takes the default option's
    comment, else the first option's that has one."""
    found: dict[str, str] = {}
    for option in opts:
        if not option.package_global:
            for key in option.keys:
                if key.comment and not found.get(key.path):
                    found[key.path] = key.comment
    return found


def undocumented(conf_dir: Path = CONF_DIR) -> list[str]:
    """One line per key without a comment: the file, the line and the key, and how to document it."""
    opts = options(conf_dir)
    known = key_comments(opts)
    problems = []
    for option in opts:
        for key in option.keys:
            if not key.holds_keys and not key.comment and not known.get(key.path):
                where = f"{option.file.relative_to(conf_dir.parent) if conf_dir.parent in option.file.parents else option.file}:{key.line}"
                problems.append(f"{where}: `{key.path}` has no comment: write one after its value on the same line "
                                f"(`{key.path.rsplit('.', 1)[-1]}: ...  # what it does`) or on the line(s) directly above it")
    return problems
