"""Reading evaluation prompt lists from text, JSON, JSON-lines, PartiPrompts-style TSV/CSV and Pick-a-Pic parquet files."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from alignment.errors import DataError

PROMPT_KEYS: tuple[str, ...] = ("prompt", "caption")
TABLE_COLUMNS: tuple[str, ...] = ("Prompt", "prompt")
SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".json", ".tsv", ".csv", ".parquet")


def _prompt_of(value: object, where: str) -> str:
    """The prompt held by a JSON value: a string, or an object with a ``prompt`` (or ``caption``) string."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for key in PROMPT_KEYS:
            if isinstance(value.get(key), str):
                return value[key]
        raise DataError(f"{where}: object has no string 'prompt' or 'caption' key")
    raise DataError(f"{where}: expected a string or an object with a 'prompt' key, got {type(value).__name__}")


def _read_txt(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def _read_jsonl(path: Path) -> list[str]:
    prompts = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {line_number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from error
        prompts.append(_prompt_of(value, where))
    return prompts


def _read_json(path: Path) -> list[str]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
    if not isinstance(values, list):
        raise DataError(f"{path}: expected a JSON list of prompts, got {type(values).__name__}")
    return [_prompt_of(value, f"{path} item {i}") for i, value in enumerate(values)]


def _read_table(path: Path, delimiter: str) -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        # TSV files (PartiPrompts) do not quote fields: a prompt may start with a literal '"'.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting)
        header = reader.fieldnames or []
        column = next((name for name in TABLE_COLUMNS if name in header), None)
        if column is None:
            raise DataError(f"{path}: no 'Prompt' or 'prompt' column (columns: {', '.join(header) or 'none'})")
        return [row[column] or "" for row in reader]


def _read_parquet(path: Path) -> list[str]:
    """Pick-a-Pic-style parquet: the unique values of its ``caption`` (or ``prompt``) column, first-seen order."""
    import pyarrow.parquet as pq

    try:
        columns = pq.read_schema(path).names
    except Exception as error:  # not a parquet file
        raise DataError(f"prompt file {path} is not a readable parquet file ({type(error).__name__})") from error
    column = next((name for name in ("caption", "prompt", "Prompt") if name in columns), None)
    if column is None:
        raise DataError(f"{path}: no 'caption' or 'prompt' column (columns: {', '.join(columns) or 'none'})")
    values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    return list(dict.fromkeys(v for v in values if v))


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Reads a list of prompts.

    Supported formats, chosen by the file's suffix:

    - ``.txt``: one prompt per line.
    - ``.jsonl``: one JSON object per line with a ``prompt`` (or ``caption``) key, or one JSON string per line.
    - ``.json``: a list of strings, or of objects with a ``prompt`` (or ``caption``) key.
    - ``.tsv`` / ``.csv``: a header row with a ``Prompt`` or ``prompt`` column, e.g. PartiPrompts
      (``Prompt``, ``Category``, ``Challenge``, ``Note``).
    - ``.parquet``: the unique ``caption`` (or ``prompt``) values in first-seen order, e.g. Pick-a-Pic v2's
      validation split (one caption per pair, so captions repeat).

    Surrounding whitespace is stripped and empty prompts are skipped.

    Raises:
        DataError: The file is missing, has an unsupported suffix, lacks the prompt column or key, or holds no
            prompts; the message names the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"prompt file {path}: unsupported suffix {path.suffix or '(none)'!r} "
            f"(expected one of {', '.join(SUPPORTED_SUFFIXES)})"
        )
    try:
        if suffix == ".txt":
            prompts = _read_txt(path)
        elif suffix == ".jsonl":
            prompts = _read_jsonl(path)
        elif suffix == ".json":
            prompts = _read_json(path)
        elif suffix == ".parquet":
            prompts = _read_parquet(path)
        else:
            prompts = _read_table(path, "\t" if suffix == ".tsv" else ",")
    except UnicodeDecodeError as error:
        raise DataError(f"prompt file {path} is not UTF-8 text (byte {error.start})") from error
    prompts = [prompt.strip() for prompt in prompts if prompt and prompt.strip()]
    if not prompts:
        raise DataError(f"prompt file {path} holds no prompts")
    return prompts
