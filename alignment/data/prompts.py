"""Prompt sets: reading prompt lists (text, JSON, JSON-lines, PartiPrompts-style TSV/CSV, Pick-a-Pic parquet) and
the prompt-only training dataset ``PromptSet`` (methods that sample online: DRaFT-K, Focus-N-Fix).

``read_prompt_records`` keeps every other field of a row (PartiPrompts' ``Category``, a jsonl row's ``value``), so
prompt files can carry per-prompt extras to training (``dataset.extra_columns``) and to generation.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from typing import Sequence

import pyarrow as pa
import torch
from torch.utils.data import Dataset

from alignment.data.extras import check_extra_columns, collate_extras
from alignment.errors import ConfigError, DataError

PROMPT_KEYS: tuple[str, ...] = ("prompt", "caption")
TABLE_COLUMNS: tuple[str, ...] = ("Prompt", "prompt")
SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".json", ".tsv", ".csv", ".parquet")


def _record_of(value: object, where: str) -> dict:
    """The row held by a JSON value: a string (the prompt), or an object with a ``prompt`` (or ``caption``) string
    and any other fields."""
    if isinstance(value, str):
        return {"prompt": value}
    if isinstance(value, dict):
        for key in PROMPT_KEYS:
            if isinstance(value.get(key), str):
                return {**{k: v for k, v in value.items() if k != key}, "prompt": value[key]}
        raise DataError(f"{where}: object has no string 'prompt' or 'caption' key")
    raise DataError(f"{where}: expected a string or an object with a 'prompt' key, got {type(value).__name__}")


def _read_txt(path: Path) -> list[dict]:
    return [{"prompt": line.strip()} for line in path.read_text(encoding="utf-8").splitlines()]


def jsonl_values(path: Path) -> list[tuple[str, object]]:
    """(where, value) for every non-blank line of a JSON-lines file, ``where`` = "<file> line <n>" for messages; a
    line that is not JSON is a one-line DataError naming it (shared by prompt files and LiVO's data)."""
    values = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {line_number}"
        try:
            values.append((where, json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from None
    return values


def _read_jsonl(path: Path) -> list[dict]:
    return [_record_of(value, where) for where, value in jsonl_values(path)]


def _read_json(path: Path) -> list[dict]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
    if not isinstance(values, list):
        raise DataError(f"{path}: expected a JSON list of prompts, got {type(values).__name__}")
    return [_record_of(value, f"{path} item {i}") for i, value in enumerate(values)]


def _read_table(path: Path, delimiter: str) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        # TSV files (PartiPrompts) do not quote fields: a prompt may start with a literal '"'.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting)
        header = reader.fieldnames or []
        column = next((name for name in TABLE_COLUMNS if name in header), None)
        if column is None:
            raise DataError(f"{path}: no 'Prompt' or 'prompt' column (columns: {', '.join(header) or 'none'})")
        return [{**{k: v for k, v in row.items() if k != column}, "prompt": row[column] or ""} for row in reader]


def _read_parquet(path: Path) -> list[dict]:
    """Pick-a-Pic-style parquet: the unique values of its ``caption`` (or ``prompt``) column, first-seen order
    (the first row of each caption gives its other fields, image columns excepted)."""
    import pyarrow.parquet as pq

    try:
        columns = pq.read_schema(path).names
    except Exception as error:  # not a parquet file
        raise DataError(f"prompt file {path} is not a readable parquet file ({type(error).__name__})") from error
    column = next((name for name in ("caption", "prompt", "Prompt") if name in columns), None)
    if column is None:
        raise DataError(f"{path}: no 'caption' or 'prompt' column (columns: {', '.join(columns) or 'none'})")
    schema = pq.read_schema(path)
    keep = [name for name in schema.names
            if name == column or not (pa.types.is_binary(schema.field(name).type)
                                      or pa.types.is_large_binary(schema.field(name).type)
                                      or pa.types.is_struct(schema.field(name).type))]
    rows = pq.read_table(path, columns=keep).to_pylist()
    first: dict[str, dict] = {}
    for row in rows:
        prompt = row.get(column)
        if prompt and prompt not in first:
            first[prompt] = {**{k: v for k, v in row.items() if k != column}, "prompt": prompt}
    return list(first.values())


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
    return [record["prompt"] for record in read_prompt_records(path)]


def read_prompt_records(path: str | os.PathLike) -> list[dict]:
    """The rows of a prompt file as dicts with ``prompt`` (stripped, non-empty) and the row's other fields, in the
    formats of ``read_prompts``; the same errors."""
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
            records = _read_txt(path)
        elif suffix == ".jsonl":
            records = _read_jsonl(path)
        elif suffix == ".json":
            records = _read_json(path)
        elif suffix == ".parquet":
            records = _read_parquet(path)
        else:
            records = _read_table(path, "\t" if suffix == ".tsv" else ",")
    except UnicodeDecodeError as error:
        raise DataError(f"prompt file {path} is not UTF-8 text (byte {error.start})") from error
    records = [{**r, "prompt": r["prompt"].strip()} for r in records if r["prompt"] and r["prompt"].strip()]
    if not records:
        raise DataError(f"prompt file {path} holds no prompts")
    return records


def record_extras(records: Sequence[dict], names) -> dict[str, list]:
    """Per-record values of the fields ``names`` (None where a row lacks one): the extras a conditioner reads."""
    return {name: [record.get(name) for record in records] for name in names}


class PromptSet(Dataset):
    """Prompt-only training data from any prompt file (``dataset=prompts``): for methods that sample images
    online from prompts (DRaFT-K, Focus-N-Fix). Items are ``{"caption", "index", "extras"}``; ``extra_columns``
    names fields of the file's rows (a jsonl key, a TSV column such as PartiPrompts' ``Category``) carried per
    item. Keys are ``index`` or ``(index, epoch)`` like the pair datasets (``StepIndexedSampler``)."""

    kind = "prompts"

    def __init__(self, source: str | os.PathLike | None, extra_columns: Sequence[str] = (), max_rows: int | None = None,
                 proportion_empty_prompts: float = 0.0, seed: int = 0):
        from alignment.config import positive_int

        if source is None or source == "":
            raise ConfigError("dataset.source: set the prompt file to train on (dataset.source=<.txt/.tsv/.jsonl ...>)")
        self.extra_columns = check_extra_columns(extra_columns)
        if max_rows is not None:
            positive_int(max_rows, "dataset.max_rows")
        if not isinstance(proportion_empty_prompts, (int, float)) or not 0.0 <= proportion_empty_prompts <= 1.0:
            raise ConfigError(f"dataset.proportion_empty_prompts must be in [0, 1], got {proportion_empty_prompts!r}")
        self.source = os.fspath(source)
        self.seed = int(seed)
        self.proportion_empty_prompts = float(proportion_empty_prompts)
        try:
            records = read_prompt_records(self.source)
        except DataError as err:
            raise DataError(f"dataset.source: {err}") from None
        records = records[:max_rows] if max_rows is not None else records
        for column in self.extra_columns:
            for row, record in enumerate(records):
                if column not in record:
                    raise DataError(f"dataset.extra_columns: {self.source} row {row} has no field {column!r}")
        self._captions = [r["prompt"] for r in records]
        self._extras = {column: [r[column] for r in records] for column in self.extra_columns}

    def __len__(self) -> int:
        return len(self._captions)

    def captions(self) -> list[str]:
        return list(self._captions)

    def extras(self, index: int) -> dict:
        return {column: values[index] for column, values in self._extras.items()}

    def __getitem__(self, key) -> dict:
        from alignment.data.pickapic import augmentation_seed, resolve_key

        index, epoch = resolve_key(key, len(self), type(self).__name__)
        caption = self._captions[index]
        if self.proportion_empty_prompts > 0:
            rng = torch.Generator().manual_seed(augmentation_seed(self.seed, index, epoch))
            if torch.rand(1, generator=rng).item() < self.proportion_empty_prompts:
                caption = ""
        return {"caption": caption, "index": index, "extras": self.extras(index)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r}, prompts={len(self)}, extras={list(self.extra_columns)})"


def collate_prompts(items: Sequence[dict]) -> dict:
    """Batches ``PromptSet`` items: ``caption`` and ``index`` as lists, ``extras`` collated by type."""
    return {"caption": [item["caption"] for item in items], "index": [int(item["index"]) for item in items],
            "extras": collate_extras(items)}
