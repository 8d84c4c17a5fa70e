"""reference/configuration.md, drawn from conf/ when the site is built (pipeline/confdocs.py reads
it): every group, every option with its description, every key with its value and its comment."""

from __future__ import annotations

import html

import mkdocs_gen_files

from pipeline import confdocs
from pipeline.config import CONF_DIR


def cell(text: str) -> str:
    """Table-cell text: pipes escaped, and <placeholders> shown rather than read as HTML."""
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", " ")


def code(text: str) -> str:
    """A value as inline HTML code (it may hold backticks and pipes)."""
    return "<code>" + html.escape(text, quote=False).replace("|", "&#124;").replace("`", "&#96;") + "</code>"


def key_table(option: confdocs.Option, shared: dict[str, str]) -> list[str]:
    rows = ["| key | value | what it does |", "|---|---|---|"]
    for key in option.keys:
        if key.holds_keys:
            continue
        comment = key.comment or shared.get(key.path, "")
        rows.append(f"| {code(key.path)} | {code(key.value)} | {cell(comment)} |")
    return rows if len(rows) > 2 else ["(sets no keys)"]


def page() -> str:
    opts = confdocs.options()
    shared = confdocs.key_comments(opts)
    defaults = confdocs.default_options()
    top, groups = opts[0], {}
    for option in opts[1:]:
        groups.setdefault(option.group, []).append(option)
    out = ["# Configuration", "",
           "Hydra composes `conf/config.yaml` (the top-level `conf/` folder; an installed wheel carries it as "
           "`pipeline/conf`) from one option of each config group (the folders). "
           "This page is generated from `conf/` when this site was built (`docs/gen/config_reference.py`, reading the "
           "YAML files with `pipeline/confdocs.py`): every key with the value its file gives it and the "
           "comment beside or above it. Set any key on the command line (`dialect-circuits batch_size=32`), "
           "choose an option of a group with `group=option` (`model=gpt2-small`), add a group without a "
           "default with `+group=option` (`+experiment=quick`). `dialect-circuits --cfg job` prints the "
           "composed configuration.", "",
           "A key's comment comes from its own line or the lines directly above it; a key shared by a "
           "group's options shows the default option's comment where an option gives none. "
           "`tests/test_docs_config.py` fails when a key has no comment.", "",
           "## conf/config.yaml", "", top.description, "", *key_table(top, shared), "", "## Groups", ""]
    out += [f"- [`{g}`](#{g.replace('/', '')}): {', '.join(o.name for o in opts_)}" for g, opts_ in groups.items()]
    for group, group_opts in groups.items():
        default = defaults.get(group)
        how = f"default `{default}`" if default else f"no default: add one with `+{group}=<option>`"
        if group.startswith("hydra/"):
            how = f"Hydra's own group: `{group}=<option>`"
        out += ["", f"## {group}", "", f"Folder `conf/{group}/`; {how}. Options: "
                + ", ".join(f"`{o.name}`" for o in group_opts) + "."]
        for option in group_opts:
            scope = " (sets keys anywhere in the config: `# @package _global_`)" if option.package_global else ""
            out += ["", f"### {group}: {option.name}", "", f"`conf/{group}/{option.name}.yaml`{scope}", "",
                    "```text", option.description, "```", "", *key_table(option, shared)]
    return "\n".join(out) + "\n"


with mkdocs_gen_files.open("reference/configuration.md", "w") as f:
    f.write(page())
mkdocs_gen_files.set_edit_path("reference/configuration.md", CONF_DIR.relative_to(CONF_DIR.parent).as_posix())
