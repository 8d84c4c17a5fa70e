"""The HTML pages (report.html, comparison.html) rendered from the Jinja2 templates in
pipeline/templates/, which ship as package data. Autoescaping is on: every value a page shows is
escaped unless Python hands it over as trusted markup (a plotly div, via markupsafe.Markup)."""

from __future__ import annotations

from functools import cache

from jinja2 import Environment, PackageLoader, StrictUndefined


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@cache
def environment() -> Environment:
    env = Environment(loader=PackageLoader("pipeline", "templates"),
                      autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["human_size"] = human_size
    return env


def render(template: str, **data) -> str:
    """The page `template` (a path under pipeline/templates/) filled with `data`."""
    return environment().get_template(template).render(**data)
