"""tutorials/notebook.md: docs/notebook.py (a jupytext py:percent notebook) as a page, converted by
jupytext when the site is built. tests/test_api.py runs the notebook itself on the tiny model."""

from __future__ import annotations

import jupytext
import mkdocs_gen_files

notebook = jupytext.read("docs/notebook.py")
notebook.metadata = {"jupytext": {"notebook_metadata_filter": "-all", "cell_metadata_filter": "-all"}}
text = jupytext.writes(notebook, fmt="md")
intro = ("!!! note \"This page is docs/notebook.py\"\n"
         "    Download [notebook.py](../notebook.py); open it with jupytext (`jupytext --to notebook notebook.py`) "
         "or run it as a script (`python docs/notebook.py` from a checkout). The test suite runs it on the tiny "
         "model (`tests/test_api.py`), so every cell below works as written.\n\n")
title, _, rest = text.partition("\n\n")
with mkdocs_gen_files.open("tutorials/notebook.md", "w") as f:
    f.write(title + "\n\n" + intro + rest)
mkdocs_gen_files.set_edit_path("tutorials/notebook.md", "notebook.py")
