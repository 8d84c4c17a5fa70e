"""The data files shipped in this folder: AAE/SAE utterance pairs, the nine trait templates of
matched guise probing, and the Katz-Braly trait adjectives."""

from __future__ import annotations

from importlib.resources import files

import pandas as pd

HERE = files("pipeline.data")


def load_pairs() -> pd.DataFrame:
    """Columns pair_id, feature, pronoun, aae, sae; one row per pronoun variant."""
    with HERE.joinpath("pairs.csv").open() as f:
        return pd.read_csv(f, dtype=str)


def load_templates() -> list[str]:
    """Templates with one `{}` slot for the utterance."""
    return [line for line in HERE.joinpath("templates.txt").read_text().splitlines() if line.strip()]


def load_attributes() -> list[str]:
    """Trait adjectives without their leading space."""
    return [line.strip() for line in HERE.joinpath("attributes.txt").read_text().splitlines() if line.strip()]
