"""Derive the pair generator's lexicon files (verbs.tsv, adjectives.tsv) from the word lists beside
this file: every inflected form from lemminflect, every frequency from wordfreq, never a form
table written by hand.

    pip install -e ".[lexicon]"
    python -m pipeline.data.lexicon.derive          # rewrites verbs.tsv and adjectives.tsv here

A test (tests/test_generate.py) checks that the shipped files are what this gives, where both
libraries are installed. The word lists say which words fit which rule (an activity, an event with
an end point, a state); the generator (pipeline/data/generate.py) reads only the derived files.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
TASKS = HERE.parent / "tasks"
MIN_ZIPF = 2.5  # a word is listed if it is at least this common (wordfreq's Zipf scale: 3 = once per million words)
SOURCES = {
    "verbs": ("activity_verbs.txt", "eventive_verbs.txt"),
    "adjectives": ("adjectives.txt",),
}
# lemminflect's Penn tags of the forms the rules use.
VERB_FORMS = {"ing": "VBG", "past": "VBD", "participle": "VBN", "third": "VBZ"}


def word_list(name: str) -> list[str]:
    """The words of one list in file order, each once; comments and blank lines skipped."""
    words = []
    for line in (HERE / name).read_text(encoding="utf-8").splitlines():
        word = line.strip()
        if word and not word.startswith("#") and word not in words:
            words.append(word)
    return words


def task_attributes() -> set[str]:
    """Every attribute a probing task scores: no utterance may name an answer."""
    return {line.strip() for path in TASKS.glob("*/attributes.txt")
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def header(kind: str, columns: list[str]) -> str:
    from importlib.metadata import version

    return "\n".join([
        f"# {kind} of the pair generator (pipeline/data/generate.py), derived by pipeline/data/lexicon/derive.py",
        f"# from the word lists {', '.join(SOURCES[kind])} beside this file (the project's own choice of words).",
        f"# Inflected forms: lemminflect {version('lemminflect')} (MIT licence), the most frequent of its forms.",
        f"# Frequencies: wordfreq {version('wordfreq')} zipf_frequency(word, 'en') (code Apache-2.0; data CC BY-SA 4.0,",
        "# https://creativecommons.org/licenses/by-sa/4.0/, from Wikipedia, SUBTLEX, OpenSubtitles, Google Books",
        "# Ngrams, Reddit, Twitter and other sources listed in wordfreq's README). This file is CC BY-SA 4.0.",
        f"# Words rarer than Zipf {MIN_ZIPF}, or that a probing task scores as an attribute, are left out; each form's",
        "# own frequency is in its zipf_ column (the generator takes the commonest forms a rule uses first).",
        "\t".join(columns),
    ]) + "\n"


def commonest(forms, zipf) -> str:
    return max(forms, key=lambda f: (zipf(f), -len(f)))


def derive_verbs() -> tuple[str, list[str]]:
    from lemminflect import getInflection
    from wordfreq import zipf_frequency

    def zipf(w):
        return zipf_frequency(w, "en")

    columns = ["lemma", "class", "zipf", *VERB_FORMS, *(f"zipf_{name}" for name in VERB_FORMS)]
    rows, dropped = [], []
    banned = task_attributes()
    for source, kind in zip(SOURCES["verbs"], ("activity", "eventive")):
        for lemma in word_list(source):
            forms = {}
            for name, tag in VERB_FORMS.items():
                # a form spelled apart from its lemma (babysit -> baby-sits) is not the same word
                found = [f for f in getInflection(lemma, tag) if f.isalpha() or not lemma.isalpha()]
                forms[name] = commonest(found, zipf) if found else ""
            if not all(forms.values()) or zipf(lemma) < MIN_ZIPF or lemma in banned:
                dropped.append(lemma)
                continue
            rows.append([lemma, kind, f"{zipf(lemma):.2f}", *forms.values(), *(f"{zipf(f):.2f}" for f in forms.values())])
    return header("verbs", columns) + "".join("\t".join(r) + "\n" for r in rows), dropped


def derive_adjectives() -> tuple[str, list[str]]:
    from wordfreq import zipf_frequency

    columns = ["word", "class", "zipf"]
    rows, dropped = [], []
    banned = task_attributes()
    for word in word_list(SOURCES["adjectives"][0]):
        z = zipf_frequency(word, "en")
        if z < MIN_ZIPF or word in banned:
            dropped.append(word)
            continue
        rows.append([word, "state", f"{z:.2f}"])
    return header("adjectives", columns) + "".join("\t".join(r) + "\n" for r in rows), dropped


def derive() -> dict[str, str]:
    """{file name: text} of the derived files, and what each left out (printed by main)."""
    verbs, v_dropped = derive_verbs()
    adjectives, a_dropped = derive_adjectives()
    derive.dropped = {"verbs.tsv": v_dropped, "adjectives.tsv": a_dropped}
    return {"verbs.tsv": verbs, "adjectives.tsv": adjectives}


def main() -> int:
    try:
        files = derive()
    except ImportError as err:
        print(f"derive needs lemminflect and wordfreq ({err.name} is missing): pip install -e \".[lexicon]\"", file=sys.stderr)
        return 2
    for name, text in files.items():
        (HERE / name).write_text(text, encoding="utf-8")
        n = sum(1 for line in text.splitlines() if line and not line.startswith("#")) - 1
        left = derive.dropped[name]
        print(f"{name}: {n} words" + (f"; left out {len(left)}: {', '.join(left)}" if left else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
