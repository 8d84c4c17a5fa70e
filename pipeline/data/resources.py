"""The data files shipped in this folder, and the user's files that replace them.

- `pairs.csv`: the 48 curated AAE/SAE utterance pairs over eight dialect features, each in
  he/she/they variants (`dataset.pairs=curated`);
- `lexicon/`: the words the pair generator (generate.py) writes into its rules
  (`dataset.pairs=generated`, the default);
- `tasks/<task>/templates.txt` and `tasks/<task>/attributes.txt`: one probing task each (the
  config group conf/task/ chooses one): `traits` (the nine trait templates of matched guise probing
  and the Katz-Braly adjectives), `conviction`, `death_penalty`, `occupations`, and `overt` (race
  named instead of shown by dialect, with pairs of its own in `tasks/overt/pairs.csv`).
Each loader takes the user's file instead when one is configured; both go through the same
readers and checks (pipeline/data/inputs.py).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pandas as pd

from pipeline.data.inputs import read_attributes, read_pairs, read_templates
from pipeline.errors import PipelineError

HERE = Path(str(files("pipeline.data")))
TASKS = sorted(p.name for p in (HERE / "tasks").iterdir() if (p / "templates.txt").is_file())


def task_file(task: str, kind: str) -> Path:
    if task not in TASKS:
        raise PipelineError(f"dataset.task: unknown task {task!r}; known: {', '.join(TASKS)} "
                            f"(or give your own dataset.templates and dataset.attributes files)")
    return HERE / "tasks" / task / f"{kind}.txt"


CURATED, GENERATED = "curated", "generated"


def load_pairs(path: str | None = None, feature: str | None = None, task: str = "traits", generate=None,
               seed: int = 0, features=None) -> pd.DataFrame:
    """Columns pair_id, feature, pronoun, aae, sae; one row per pair: the user's file; else the
    task's own pairs (tasks/<task>/pairs.csv, as the overt task has); else the package's dialect
    pairs: `generated` (pipeline/data/generate.py, with the `generate` settings
    pairs_per_feature and lexicon, only `features` where given) or `curated` (pairs.csv, one row
    per pronoun variant; also what null gives)."""
    if path and path not in (CURATED, GENERATED):
        return read_pairs(path, feature)
    own = HERE / "tasks" / task / "pairs.csv"
    if own.is_file():
        return read_pairs(own, key=f"task {task} pairs")
    if path == GENERATED:
        from pipeline.data.generate import generate_pairs

        generate = generate or {}
        return generate_pairs(int(generate.get("pairs_per_feature", 150)), seed, features, generate.get("lexicon"))
    return read_pairs(HERE / "pairs.csv", key="package pairs")


def load_templates(task: str = "traits", path: str | None = None) -> list[str]:
    """Templates with one `{}` slot for the utterance."""
    return read_templates(path) if path else read_templates(task_file(task, "templates"), key=f"task {task} templates")


def load_attributes(task: str = "traits", path: str | None = None) -> list[str]:
    """Attributes without their leading space."""
    return read_attributes(path) if path else read_attributes(task_file(task, "attributes"), key=f"task {task} attributes")


def packaged_templates() -> list[str]:
    """Every task's templates: the frames a CSV dataset's prompts may come from."""
    return [t for task in TASKS for t in load_templates(task)]
