"""Every check on what a user hands the pipeline: the command line, the composed config and a
dataset CSV, before any model runs.

One contract: a problem raises InputError (a PipelineError), whose message is one line

    <where>[, line <n>][, column <name>]: <what is wrong>; accepted: <what would be accepted>

which the entry point prints as `dialect-circuits: error: ...` with a non-zero exit and no
traceback; the runner marks the run's manifest `failed`. A problem that does not stop the run (a
repeated row) is a warning in the log with its count. Checks that need no model run first and
import neither torch nor pandas, so a refused input costs well under a second; the tokenizer
checks (one-token attributes, prompt length against the model's context) load the tokenizer only.
"""

from __future__ import annotations

import csv
import difflib
import functools
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.config import CONF_DIR
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

REQUIRED = ["prompt_aae", "prompt_sae", "best_attr_aae", "best_attr_sae"]
# Cells that pandas (and spreadsheets) read as a missing value.
MISSING = {"", "#n/a", "#n/a n/a", "#na", "-1.#ind", "-1.#qnan", "-nan", "1.#ind", "1.#qnan", "<na>", "n/a",
           "na", "null", "nan", "none"}
CSV_ACCEPTED = f"a UTF-8 CSV whose header starts {','.join(REQUIRED)}, then one row per prompt pair"


@dataclass(frozen=True)
class Problem:
    where: str
    what: str
    accepted: str
    line: int | None = None
    column: str | None = None

    def __str__(self) -> str:
        place = self.where + (f", line {self.line}" if self.line else "") + (f", column {self.column}" if self.column else "")
        return f"{place}: {self.what}; accepted: {self.accepted}"


class InputError(PipelineError):
    """Bad input, said in one line (see the module docstring)."""

    def __init__(self, problem: Problem, more: int = 0):
        super().__init__(str(problem) + (f" ({more} more problem{'s' * (more > 1)} after this one)" if more else ""))
        self.problem = problem


def refuse(where: str, what: str, accepted: str, line: int | None = None, column: str | None = None):
    raise InputError(Problem(where, what, accepted, line, column))


def one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------- command line (before Hydra)

# Hydra's flags that take a value (their value is not an override).
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                    "--config-dir", "-cd", "--experimental-rerun"}


def check_overrides(argv: list[str], config_dirs: list[Path]) -> None:
    """Compose the config the way Hydra will, so an override Hydra would refuse with a page of text
    (an unknown key, a syntax error) is refused in one line instead. Sweeps (-m a=1,2) are left
    to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in FLAGS_WITH_VALUE
        elif ("=" in arg or arg.startswith("~")) and not arg.lstrip("+~").startswith("hydra."):
            overrides.append(arg)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        refuse("command line", f"cannot read the override ({one_line(str(err).splitlines()[0])})",
               "key=value, +key=value to add a key, ~key to delete one (Hydra's override grammar)")
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    search = [f"hydra.searchpath=[{','.join('file://' + str(Path(d).resolve()) for d in config_dirs)}]"] if config_dirs else []
    from pipeline.config import compose

    try:
        compose(search + plain)
    except HydraException as err:
        message = one_line(err)
        key = next((o.key_or_group for o in parsed if f"'{o.key_or_group}'" in message), None)
        if key and "Could not override" in message:
            refuse("command line", f"{key} is not a config key",
                   f"a key of the composed config{close_match(key, flat_keys(compose(search)))}, "
                   f"or +{key}=... to add a new one (see dialect-circuits --cfg job)")
        refuse("command line", message, "overrides that compose (see dialect-circuits --cfg job)")


def close_match(key: str, known) -> str:
    found = difflib.get_close_matches(key, list(known), n=1)
    return f" such as {found[0]!r}" if found else ""


def flat_keys(cfg) -> dict[str, object]:
    """{dotted key: value} of a config, lists as values."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    container = OmegaConf.to_container(cfg, resolve=False) if not isinstance(cfg, dict) else cfg
    walk({k: v for k, v in container.items() if k != "hydra"}, "")
    return out


# ---------------------------------------------------------------- the composed config

POSITIVE = "an integer of 1 or more"


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def positive_int(v) -> bool:
    return is_int(v) and v >= 1


def optional_positive_int(v) -> bool:
    return v is None or positive_int(v)


# key -> (test, what would be accepted). Keys not listed here are checked by the type of their
# value in the package's own conf/ files (so keys other issues add are type-checked too).
RULES = {
    "batch_size": (positive_int, POSITIVE),
    "seed": (is_int, "an integer"),
    "device": (lambda v: isinstance(v, str) and (v in ("auto", "cpu", "cuda", "mps") or v.startswith("cuda:")),
               "auto, cpu, cuda, cuda:<n> or mps"),
    "dtype": (lambda v: v in ("float32", "float16", "bfloat16"), "float32, float16 or bfloat16"),
    "dataset.path": (lambda v: v is None or (isinstance(v, str) and v.strip() != ""), "null or the path of a CSV file"),
    "dataset.max_prompts": (optional_positive_int, f"null (every row) or {POSITIVE}"),
    "dataset.pairs": (lambda v: v is None or (isinstance(v, str) and v.strip() != ""),
                      "generated, curated, or the path of a pair file (AAE<TAB>SAE lines or a .csv)"),
    "dataset.generate.pairs_per_feature": (positive_int, POSITIVE),
    "dataset.generate.lexicon": (lambda v: v is None or (isinstance(v, str) and v.strip() != ""),
                                 "null (the package's lexicon) or a folder with verbs.tsv and adjectives.tsv"),
    "dataset.templates_per_pair": (optional_positive_int, f"null (every template) or {POSITIVE} up to the number of templates"),
    "dataset.chain_rule_prompts": (lambda v: v is None or (is_int(v) and v >= 0),
                                   "null (every prompt), 0 (one-token attributes only) or a positive integer"),
    "dataset.features": (lambda v: v is None or (isinstance(v, list) and v and all(isinstance(f, str) for f in v)),
                         "null or a list of feature names such as [habitual_be,finna]"),
    "dataset.answers": (lambda v: v in ("cross_fit", "per_prompt", "global"), "cross_fit, per_prompt or global"),
    "dataset.split.heldout": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
                              "a share of the base pairs from 0 (no held-out side) up to, not including, 1"),
    "dataset.split.by": (lambda v: v in ("pair", "template"), "pair or template"),
    "dataset.answer_pair": (lambda v: v is None or (isinstance(v, list) and len(v) == 2 and all(isinstance(a, str) for a in v)),
                            "null or two attributes [<aae-side>, <sae-side>], e.g. [lazy,intelligent]"),
    "nulls.permutations": (positive_int, POSITIVE),
    "nulls.bootstrap": (positive_int, POSITIVE),
    "nulls.fdr": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1, "a number between 0 and 1"),
    "example.prompt_index": (lambda v: is_int(v) and v >= 0, "an integer of 0 or more"),
    "example.top_k": (positive_int, POSITIVE),
    "attribution.top_k_heads": (positive_int, POSITIVE),
    "attribution.bootstrap": (positive_int, POSITIVE),
    "patching.max_prompts": (optional_positive_int, f"null (every prompt) or {POSITIVE}"),
    "patching.attribution_prompts": (optional_positive_int, f"null (every discovery prompt) or {POSITIVE}"),
    "patching.engine": (lambda v: v in ("fast", "reference"), "fast or reference"),
    "patching.bootstrap": (positive_int, POSITIVE),
    "patching.checkpoint_every": (positive_int, POSITIVE),
    "patching.rows_per_run": (positive_int, POSITIVE),
    "circuit.method": (lambda v: v in ("eap", "eap_ig"), "eap or eap_ig"),
    "metric.ratings": (lambda v: v is None or (isinstance(v, str) and v.strip() != ""), "null or the path of a file of attribute<TAB>rating lines"),
    "circuit.ig_steps": (positive_int, POSITIVE),
    "circuit.score_prompts": (optional_positive_int, f"null (every prompt) or {POSITIVE}"),
    "circuit.eval_prompts": (optional_positive_int, f"null (every prompt) or {POSITIVE}"),
    "intervene.kinds": (lambda v: isinstance(v, list) and set(v) <= {"heads", "direction", "edges"},
                        "a list of heads, direction and edges, e.g. [heads,direction]"),
    "intervene.prompts": (optional_positive_int, f"null (every held-out prompt) or {POSITIVE}"),
    "intervene.n_sizes": (positive_int, POSITIVE),
    "intervene.size": (positive_int, POSITIVE),
    "intervene.mode": (lambda v: v in ("blind", "mean"), "blind or mean"),
    "intervene.random_draws": (lambda v: is_int(v) and v >= 0, "an integer of 0 or more"),
    "intervene.direction_prompts": (positive_int, POSITIVE),
    "intervene.edge_prompts": (positive_int, POSITIVE),
    "intervene.association_prompts": (lambda v: is_int(v) and v >= 0, "an integer of 0 (none) or more"),
    "intervene.task_prompts": (positive_int, POSITIVE),
    "intervene.bootstrap": (positive_int, POSITIVE),
    "intervene.checkpoint_every": (positive_int, POSITIVE),
    "circuit.heldout_prompts": (lambda v: v is None or (is_int(v) and v >= 0), "null (every held-out prompt), 0 (none) or a positive integer"),
    "circuit.smallest": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1, "a fraction in (0, 1]"),
    "circuit.n_sizes": (positive_int, POSITIVE),
    "circuit.random_draws": (positive_int, POSITIVE),
    "circuit.edge_check.top": (lambda v: is_int(v) and v >= 0, "an integer of 0 or more"),
    "circuit.edge_check.random": (lambda v: is_int(v) and v >= 0, "an integer of 0 or more"),
    "circuit.path_patching.receivers": (lambda v: v == "logits" or (isinstance(v, list) and v and all(isinstance(r, str) for r in v)),
                                        "logits or a list of head inputs such as [a5.h1.q,a5.kv0.v]"),
    "circuit.path_patching.prompts": (optional_positive_int, f"null (every evaluation prompt) or {POSITIVE}"),
    "circuit.view.max_edges": (positive_int, POSITIVE),
    "circuit.view.paths": (lambda v: is_int(v) and v >= 0, "an integer of 0 or more"),
    "circuit.features.method": (lambda v: v in ("eap", "eap_ig"), "eap or eap_ig"),
    "circuit.features.score_prompts": (optional_positive_int, f"null (every prompt of each feature) or {POSITIVE}"),
    "circuit.features.heldout_prompts": (lambda v: v is None or (is_int(v) and v >= 0),
                                         "null (every held-out prompt of each feature), 0 (none) or a positive integer"),
    "circuit.features.fraction": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
                                  "a fraction in (0, 1]"),
    "circuit.features.random_draws": (lambda v: is_int(v) and v >= 0, "an integer of 0 or more"),
    "circuit.bootstrap": (positive_int, POSITIVE),
    "circuit.batch_size": (positive_int, POSITIVE),
    "circuit.rows_per_run": (positive_int, POSITIVE),
    "circuit.checkpoint_every": (positive_int, POSITIVE),
    "circuit.load": (lambda v: v is None or (isinstance(v, str) and v.strip() != ""), "null or the path of a circuit JSON file"),
    "circuit.ablation": (lambda v: isinstance(v, list) and v and set(v) <= {"patching", "mean", "zero", "mean_positional"},
                         "a list of patching, mean, zero and mean_positional, e.g. [patching,mean]"),
    "circuit.mib.rankings": (lambda v: isinstance(v, list) and v and set(v) <= {"absolute", "signed"},
                             "a list of absolute and signed, e.g. [absolute,signed]"),
    "circuit.mib.eval_prompts": (lambda v: v is None or (is_int(v) and v >= 0), "null (every evaluation prompt), 0 (none) or a positive integer"),
    "circuit.mib.overlap_bootstrap": (positive_int, POSITIVE),
    "circuit.mib.heldout_prompts": (lambda v: v is None or (is_int(v) and v >= 0), "null (every held-out prompt), 0 (none) or a positive integer"),
}


@functools.cache
def package_defaults() -> dict[str, object]:
    """{dotted key: value} over config.yaml and every option of every group in the package's conf/:
    the keys this pipeline knows."""
    known = {}
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        group = path.parent.relative_to(CONF_DIR).as_posix()
        if group.startswith("hydra"):
            continue
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        node = {k: v for k, v in node.items() if k not in ("defaults", "hydra")}
        first = path.read_text().lstrip().splitlines()[:1]
        if group != "." and not (first and first[0].replace(" ", "") == "#@package_global_"):
            node = nest(group.split("/"), node)
        for key, value in flat_keys(node).items():
            if known.get(key) is None:
                known[key] = value
    return known


def nest(parts: list[str], node: dict) -> dict:
    for part in reversed(parts):
        node = {part: node}
    return node


def type_name(v) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a text value", list: "a list"}.get(type(v), type(v).__name__)


def check_config(cfg) -> None:
    """Unknown keys, wrong types and out-of-range values of the composed config, and unknown
    sweep names when the patching stage will run."""
    given = flat_keys(OmegaConf.to_container(cfg, resolve=True))
    known = package_defaults()
    for key, value in given.items():
        if key not in known and not any(key.startswith(k + ".") for k in known if known[k] == {}):
            refuse("config", f"{key} is not a key this pipeline reads",
                   f"a known key{close_match(key, known)} (see dialect-circuits --cfg job)")
        shown = "null" if value is None else repr(value)
        if key in RULES:
            test, accepted = RULES[key]
            if not test(value):
                refuse("config", f"{key}={shown} is not allowed", accepted)
            continue
        default = known[key]
        if default is None:
            continue
        same = type(value) is type(default) or (isinstance(default, float) and is_int(value))
        if not same:
            refuse("config", f"{key}={shown} has the wrong type", type_name(default))
    # Metrics a stage cannot use (pipeline/metrics.py), refused before any stage runs.
    from pipeline.metrics import LINEAR_METRICS

    metric, stages = str(cfg.metric.name), list(cfg.stage.stages)
    if "patching" in stages and metric not in LINEAR_METRICS:
        refuse("config", f"metric={metric}: the patching stage supports only {', '.join(LINEAR_METRICS)}",
               "metric=favorability, prestige or logit_diff for stage=patching (stage=circuit takes prob_diff and kl_div)")
    if "circuit" in stages and metric == "kl_div" and cfg.circuit.method == "eap":
        refuse("config", "circuit.method=eap cannot use metric=kl_div (its gradient at the clean run is zero)", "circuit.method=eap_ig")
    if "circuit" in stages and cfg.circuit.get("load"):
        check_circuit_file(str(cfg.circuit.load))
    if "patching" in stages:
        from pipeline.patching.sweeps import SWEEPS

        sweeps = cfg.patching.sweeps
        for name in sweeps:
            if name not in SWEEPS:
                refuse("config", f"patching.sweeps names an unknown sweep {name!r}", f"any of {', '.join(SWEEPS)}")


def check_circuit_file(path: str) -> None:
    """circuit.load before any model runs: a readable JSON object with the format's three keys
    (its edges are checked against the model's graph by pipeline/circuit/mib.py)."""
    import json

    accepted = "an EAP-IG / MIB circuit JSON with the keys cfg, nodes and edges (circuits/<method>.json of a run)"
    where = f"circuit.load={path}"
    p = Path(path).expanduser()
    if not p.is_file():
        refuse(where, "no such file", accepted)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        refuse(where, f"is not JSON ({one_line(err)})", accepted)
    missing = [k for k in ("cfg", "nodes", "edges") if not isinstance(d, dict) or k not in d]
    if missing:
        refuse(where, f"lacks the key{'s' * (len(missing) > 1)} {', '.join(missing)}", accepted)


# ---------------------------------------------------------------- a dataset CSV

@dataclass
class DatasetCSV:
    """A dataset CSV that passed the checks that need no tokenizer: its header, its rows (lists of
    text, attributes stripped) and the line each row starts on."""
    path: str
    header: list[str]
    rows: list[list[str]]
    lines: list[int]
    repeated: list[int] = field(default_factory=list)  # lines of rows that repeat an earlier row

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows, columns=self.header, dtype=str)


def read_dataset_csv(path: str | Path) -> DatasetCSV:
    """Read and check a dataset CSV (see the module docstring); the result is kept for the run, so
    checking early and loading later reads the file once."""
    p = Path(path)
    stat = p.stat() if p.is_file() else None
    return _read(str(path), stat.st_mtime_ns if stat else None, stat.st_size if stat else None)


@functools.lru_cache(maxsize=2)
def _read(where: str, _mtime, _size) -> DatasetCSV:
    path = Path(where)
    if path.is_dir():
        refuse(where, "is a directory, not a file", CSV_ACCEPTED)
    if not path.exists():
        refuse(where, "no such file", CSV_ACCEPTED)
    if not path.is_file():
        refuse(where, "is not a regular file (a pipe, device or socket)", CSV_ACCEPTED)
    try:
        data = path.read_bytes()
    except OSError as err:
        refuse(where, f"the file cannot be read ({err.strerror or err})", "a file this user may read")
    text = decode(where, data)
    if not text.strip():
        refuse(where, "the file is empty", CSV_ACCEPTED)
    return parse(where, text)


def line_and_column(data: bytes, offset: int) -> tuple[int, int]:
    line_start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, offset - line_start + 1


def decode(where: str, data: bytes) -> str:
    """The file's text: UTF-8, with or without a byte order mark. Anything else is named."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        refuse(where, "the file is UTF-16 text", "UTF-8 text (save the file as UTF-8)")
    nul = data.find(b"\x00")
    if nul >= 0:
        line, col = line_and_column(data, nul)
        refuse(where, f"binary data, not text (a NUL byte, byte {col} of the line)", "UTF-8 CSV text", line=line)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line, col = line_and_column(data, err.start)
        bad = data[err.start:err.start + 1]
        try:
            guess = f": it reads as {data[err.start:err.end].decode('cp1252')!r} in Latin-1/Windows-1252, so the file is probably in that encoding"
        except UnicodeDecodeError:
            guess = ""
        refuse(where, f"byte 0x{bad.hex()} (byte {col} of the line) is not UTF-8{guess}",
               "UTF-8 text (save the file as UTF-8; a UTF-8 byte order mark and CRLF line ends are fine)", line=line)


def parse(where: str, text: str) -> DatasetCSV:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, header_line, records = None, 0, []
    last = 0
    try:
        for record in reader:
            start, last = last + 1, reader.line_num
            if not any(cell.strip() for cell in record):
                continue  # a blank line, or a spreadsheet's row of empty cells
            if header is None:
                header, header_line = [c.strip() for c in record], start
            else:
                records.append((start, last, record))
    except csv.Error as err:
        message = str(err)
        if "unexpected end of data" in message or "EOF" in message:
            refuse(where, "a quoted field opened here is never closed", "fields whose quotes are closed (a quote inside a quoted field is written twice: \"\")", line=last + 1)
        refuse(where, f"not valid CSV ({message})", "fields quoted as a whole, with a quote inside a quoted field written twice (\"\")",
               line=reader.line_num)
    check_header(where, header, header_line)
    if not records:
        refuse(where, "the file has a header but no rows", CSV_ACCEPTED)

    problems: list[Problem] = []
    rows, lines, seen, repeated = [], [], {}, []
    width = len(header)
    for start, end, record in records:
        found = check_row(where, header, start, end, record)
        if found:
            problems.append(found)
            continue
        row = [cell.strip() if i in (2, 3) else cell for i, cell in enumerate(record)]
        key = tuple(row[:4])
        if key in seen:
            repeated.append(start)
        else:
            seen[key] = start
        rows.append(row)
        lines.append(start)
    if problems:
        raise InputError(problems[0], more=len(problems) - 1)
    if repeated:
        shown = ", ".join(map(str, repeated[:5])) + (" ..." if len(repeated) > 5 else "")
        log.warning("%s: %d row%s an earlier row's prompts and answers (line %s); kept, so they count twice",
                    where, len(repeated), "s repeat" if len(repeated) > 1 else " repeats", shown)
    assert all(len(r) == width for r in rows)
    return DatasetCSV(where, header, rows, lines, repeated)


def check_header(where: str, header: list[str] | None, line: int) -> None:
    for i, want in enumerate(REQUIRED):
        if i >= len(header):
            refuse(where, f"column {i + 1} is missing (the header has {len(header)} column{'s' * (len(header) != 1)})",
                   f"{want!r} as column {i + 1}: the header starts {','.join(REQUIRED)}", line=line)
        if header[i] != want:
            # A tab-separated AAE/SAE pair file given as a dataset CSV: point to dataset.pairs.
            hint = " (this looks like a tab-separated pair file: give it as dataset.pairs=<file>)" if "\t" in header[i] else ""
            refuse(where, f"column {i + 1} is named {header[i]!r}",
                   f"{want!r} as column {i + 1}: the header starts {','.join(REQUIRED)}{hint}", line=line)
    seen = {}
    for i, name in enumerate(header):
        if not name:
            refuse(where, f"column {i + 1} has no name", "a name for every column (extra columns are kept as metadata)", line=line)
        if name in seen:
            refuse(where, f"column {i + 1} repeats the name {name!r} of column {seen[name] + 1}", "a different name for each column", line=line)
        seen[name] = i


def check_row(where: str, header: list[str], start: int, end: int, record: list[str]) -> Problem | None:
    """The first problem of one row, or None."""
    if len(record) != len(header):
        more = len(record) > len(header)
        return Problem(where, f"the row has {len(record)} fields but the header has {len(header)} columns",
                       "one field per column" + ("; quote a field that holds a comma" if more else ""), start)
    for i, name in enumerate(REQUIRED):
        cell = record[i]
        if cell.strip().lower() in MISSING:
            what = "the cell is empty" if not cell.strip() else f"the cell is {cell.strip()!r}, a missing value"
            return Problem(where, what, "a prompt" if i < 2 else "an attribute word such as 'lazy'", start, name)
        if "\n" in cell or "\r" in cell:
            return Problem(where, f"the cell holds a line break (a quoted field over lines {start}-{end})",
                           "each prompt and attribute on one line", start, name)
    if record[2].strip() == record[3].strip():
        return Problem(where, f"best_attr_aae and best_attr_sae are both {record[2].strip()!r}, so the logit difference is 0 by construction",
                       "two different attributes", start, "best_attr_sae")
    if record[0].strip() == record[1].strip():
        return Problem(where, "prompt_aae and prompt_sae are the same text, so there is no dialect difference to measure",
                       "an AAE and an SAE prompt that differ", start, "prompt_sae")
    return None


def check_tokens(data: DatasetCSV, tokenizer, n_ctx: int, prepend_bos: bool) -> None:
    """Every attribute is one token (with its leading space) and every prompt fits the model's
    context. A prompt's UTF-8 length bounds its token count (byte-level and SentencePiece
    tokenizers never make more tokens than bytes, plus a word-start marker), so only prompts
    that could be too long are tokenized, one at a time, and only their lengths are kept."""
    first_line: dict[tuple[str, int], int] = {}
    for row, line in zip(data.rows, data.lines):
        for col in (2, 3):
            first_line.setdefault((row[col], col), line)
    sizes: dict[str, int] = {}
    for (word, col), line in sorted(first_line.items(), key=lambda kv: kv[1]):
        if word not in sizes:
            sizes[word] = len(tokenizer(" " + word, add_special_tokens=False, verbose=False)["input_ids"])
        if sizes[word] != 1:
            pieces = tokenizer.convert_ids_to_tokens(tokenizer(" " + word, add_special_tokens=False, verbose=False)["input_ids"])
            refuse(data.path, f"the attribute {word!r} is {sizes[word]} tokens for this model's tokenizer ({', '.join(map(repr, pieces))}), not one token",
                   "an attribute that is one token with its leading space (the run's model decides)", line=line,
                   column=REQUIRED[col])
    if not n_ctx:
        return  # the model's config states no context length
    limit = n_ctx - int(prepend_bos)
    for row, line in zip(data.rows, data.lines):
        for col in (0, 1):
            prompt = row[col]
            if len(prompt.encode("utf-8")) + 1 <= limit:
                continue
            n = len(tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"])
            if n > limit:
                refuse(data.path, f"the prompt is {n} tokens, longer than the model's context of {n_ctx} tokens"
                       + (" (one of them the BOS token)" if prepend_bos else ""),
                       f"a prompt of at most {limit} tokens", line=line, column=REQUIRED[col])
