"""The README is a front page: short, and every file it links or shows is in the repository
(mkdocs build --strict checks the links of docs/, not the README's)."""

from __future__ import annotations

import re

from conftest import REPO


def test_the_readme_is_a_front_page_whose_links_and_pictures_exist():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert any(t.endswith(".png") for t in local) and any(t.startswith("docs/") for t in local)
    missing = [t for t in local if not (REPO / t).exists()]
    assert not missing, f"README.md links to files that are not in the repository: {missing}"
