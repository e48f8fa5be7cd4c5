"""Small file helpers shared by every stage: atomic writes, TSV tables, and the contract tables between stages
checked against their schemas."""

import contextlib
import functools
import hashlib
import os
from importlib import resources
from pathlib import Path

import pandas as pd

from nodulesynth.errors import InputError


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    So a killed or failed step never leaves a half-written output behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_tsv(frame: pd.DataFrame, path):
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False)


def read_tsv(path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype={"scan_id": str, "patient_id": str})


def read_columns(path, columns) -> pd.DataFrame:
    """A TSV that is no contract table (those have schemas: `read_table`) but must exist and hold `columns`
    (read by name; other columns are kept). Texts stay as written: ids are text, "75.00" is not the number 75.0,
    "n/a" is not a missing value."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    table = pd.read_csv(path, sep="\t", keep_default_na=False, na_values=["", "nan", "NaN"],
                        dtype={c: str for c in ("scan_id", "patient_id", "arm", "metric", "text")})
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing} (has {list(table.columns)})")
    return table


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes (a model file's identity: what sampling records and the audit checks)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# The contract files between stages and their schemas (src/nodulesynth/schemas/{name}.schema.yaml).
TABLES = ("scans", "manifest", "folds")


@functools.cache
def table_schema(name: str) -> dict:
    """The JSON Schema (YAML) of one row of the contract table `name`: scans, manifest or folds."""
    import yaml

    if name not in TABLES:
        raise InputError(f"no schema for table {name!r}: one of {', '.join(TABLES)}")
    return yaml.safe_load((resources.files("nodulesynth") / "schemas" / f"{name}.schema.yaml").read_text())


def _column_of(error, record) -> str:
    """The column a jsonschema error is about: its path, or the required property the row lacks."""
    if error.path:
        return str(error.path[0])
    if error.validator == "required":
        return next(c for c in error.validator_value if c not in record)
    return "?"


def _number(text: str, kind: str):
    """A cell of a number column: an int or float when it reads as one of `kind`, else the text itself."""
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if kind == "integer" and value.is_integer() else value


def read_table(path, name: str) -> pd.DataFrame:
    """A contract table (`TABLES`), checked against its schema: every required column present, every row
    valid, no repeated value in a `unique` column. A failure names the file, the column and the row
    (rows count from 1 below the header)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    schema = table_schema(name)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the {name} table)")
    # The schema's columns are read as text and typed cell by cell: a series UID or a numeric patient id stays
    # text, and a stray word in a number column fails on its own row (pandas would make the column text).
    numeric = {c: p["type"] for c, p in schema["properties"].items() if p.get("type") in ("integer", "number")}
    try:
        frame = pd.read_csv(path, sep="\t", dtype=dict.fromkeys(schema["properties"], str))
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: empty file, not even the header of a {name} table") from None
    for column, kind in numeric.items():
        if column in frame:
            frame[column] = frame[column].map(lambda v: _number(v, kind), na_action="ignore").astype(object)
    missing = [c for c in schema["required"] if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column {missing[0]!r} (a {name} table has "
                         f"{', '.join(schema['required'])})")
    validator = Draft202012Validator(schema)
    for row, record in enumerate(frame.to_dict("records"), 1):
        record = {k: v for k, v in record.items() if not pd.isna(v)}  # an empty cell is an absent value
        error = best_match(validator.iter_errors(record))
        if error is not None:
            column = _column_of(error, record)
            why = "empty" if error.validator == "required" else error.message
            raise InputError(f"{path}: row {row}, column {column!r}: {why}")
    for column in schema.get("unique", []):
        repeated = frame[column].dropna()
        repeated = repeated[repeated.duplicated()]
        if len(repeated):
            rows = (frame[column] == repeated.iloc[0]).to_numpy().nonzero()[0] + 1
            raise InputError(f"{path}: column {column!r}: {repeated.iloc[0]!r} repeated in rows "
                             f"{', '.join(map(str, rows))}")
    for column in numeric:
        if column in frame:
            frame[column] = pd.to_numeric(frame[column])
    return frame
