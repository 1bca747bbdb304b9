"""Where rows come from: local files, Hugging Face Hub datasets, and weighted mixtures of them.

Sources (`data.train_path` / `val_path` / `test_path`): a local .jsonl / .json / .csv / .parquet file
(`pkg://` works), a Hugging Face Hub dataset id (loaded with `datasets.load_dataset`, split `train`,
`validation` or `test`), or a list of sources mixed with weights: `[{path: a.jsonl, weight: 2}, {path: b.csv,
weight: 0.5}]` repeats every row of a twice and a seeded half of b's rows. JSONL and CSV are read with the
standard library so every row keeps its `file:line` and no value is type-coerced (CSV cells are strings).
"""

from __future__ import annotations

import csv
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from sftlab import paths
from sftlab.data import cache
from sftlab.data.formats import BadRow
from sftlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ON_ERROR = ("raise", "skip")
Row = tuple[str, Any]  # (location "file:line", the parsed row or a BadRow for an unparsable line)


@dataclass(frozen=True)
class Source:
    path: str
    weight: float = 1.0
    split: str | None = None  # hub split name (default: train / validation / test)
    revision: str | None = None  # hub revision, part of the cache key


def parse_sources(value: Any, key: str) -> list[Source]:
    """`data.<split>_path`: null, one path / hub id, or a list of paths or {path, weight, split, revision}."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    sources = []
    for item in items:
        spec = {"path": item} if isinstance(item, str) else item
        if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
            raise ConfigError(f"{key}={value!r}: each source is a path string or {{path, weight, split}}.")
        unknown = set(spec) - {"path", "weight", "split", "revision"}
        weight = spec.get("weight", 1.0)
        if unknown or not isinstance(weight, int | float) or weight <= 0:
            raise ConfigError(f"{key}: bad source {spec!r}: keys are path, weight (> 0), split, revision.")
        sources.append(Source(spec["path"], float(weight), spec.get("split"), spec.get("revision")))
    return sources


def _local_file(path: str, key: str) -> Path | None:
    """The local file a source names, None for a hub dataset id; a missing local file is an error."""
    file = Path(paths.resolve(path, key=key))
    if file.is_file():
        return file
    if path.startswith((paths.PKG_SCHEME, "/", ".", "~")) or path.endswith(FILE_SUFFIXES):
        raise DataError(
            f"{key}={path!r}: file not found. Point {key} at an existing "
            f"{'/'.join(FILE_SUFFIXES)} file or a Hugging Face dataset id."
        )
    return None


def read_jsonl(path: str, key: str) -> list[Row]:
    """Rows of a JSONL file (`pkg://` works) with `file:line`, raising DataError at the first unparsable line.
    For callers outside the training pipeline (e.g. eval prompt files)."""
    file = _local_file(path, key)
    if file is None:
        raise DataError(f"{key}={path!r}: file not found. Point {key} at an existing .jsonl file.")
    rows = jsonl_rows(file)
    bad = next((row for _, row in rows if isinstance(row, BadRow)), None)
    if bad is not None:
        raise bad
    return rows


def jsonl_rows(file: Path) -> list[Row]:
    """Rows of a JSONL file with `file:line`; blank lines are skipped; BOM and CRLF are accepted; an
    unparsable line becomes a BadRow in place, so lenient mode can count it."""
    rows: list[Row] = []
    with open(file, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{file}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                rows.append((where, BadRow(where, "invalid_unicode", "the line is not UTF-8. Re-encode it.")))
                continue
            if not line.strip():
                continue
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as err:
                reason = f"invalid JSON ({err.msg} at column {err.colno}). Fix or remove the line."
                rows.append((where, BadRow(where, "bad_json", reason)))
    return rows


def read_json(file: Path) -> list[Row]:
    """A JSON array of rows (`file[i]`); a .json file that is really JSON Lines is read as such."""
    text = file.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON Lines under a .json name
            return jsonl_rows(file)
        raise DataError(f"{file}:{err.lineno}: invalid JSON ({err.msg}). Fix the file.") from None
    if not isinstance(data, list):
        raise DataError(f"{file}: expected a JSON array of rows or JSON Lines, not a {type(data).__name__}.")
    return [(f"{file}[{i}]", row) for i, row in enumerate(data)]


def read_csv(file: Path) -> list[Row]:
    """CSV with a header row; every cell stays a string (no type guessing); `file:line` of each record."""
    rows: list[Row] = []
    with open(file, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        start = 2
        for row in reader:
            if any(v for v in row.values() if isinstance(v, str) and v.strip()):
                rows.append((f"{file}:{start}", row))
            start = reader.line_num + 1
    return rows


def read_with_datasets(source: Source, file: Path | None, split: str, key: str) -> list[Row]:
    """Parquet files and hub datasets, through `datasets` (imported only here: it is slow to import)."""
    import datasets

    try:
        if file is not None:
            ds = datasets.load_dataset("parquet", data_files=str(file), split="train")
        else:
            ds = datasets.load_dataset(source.path, split=source.split or split, revision=source.revision)
    except Exception as err:  # datasets raises many types; the message says what to do
        raise DataError(
            f"{key}={source.path!r}: cannot load it with datasets ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). For a hub id, check the name and split and "
            "that the hub is reachable (or cached); otherwise point the key at a local file."
        ) from None
    name = str(file) if file is not None else f"{source.path}[{source.split or split}]"
    return [(f"{name} row {i}", row) for i, row in enumerate(ds.to_list())]


def read_source(source: Source, key: str, split: str) -> list[Row]:
    file = _local_file(source.path, key)
    if file is None or file.suffix == ".parquet":
        return read_with_datasets(source, file, HUB_SPLITS[split], key)
    readers = {".jsonl": jsonl_rows, ".json": read_json, ".csv": read_csv}
    if file.suffix not in readers:
        raise DataError(f"{key}={source.path!r}: unknown file type; use {', '.join(FILE_SUFFIXES)}.")
    return readers[file.suffix](file)


def weigh(rows: list[Row], weight: float, seed: int) -> list[Row]:
    """Mixture weight: every row `int(weight)` times plus a seeded sample of the fractional part."""
    whole, frac = int(weight), weight - int(weight)
    extra = random.Random(seed).sample(rows, round(frac * len(rows))) if frac else []
    return rows * whole + extra


def source_fingerprint(source: Source, key: str) -> dict:
    file = _local_file(source.path, key)
    ident = cache.file_digest(file) if file is not None else f"hub:{source.path}@{source.revision}"
    return {"data": ident, "weight": source.weight, "split": source.split}
