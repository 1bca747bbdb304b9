"""Where rows come from: local files, Hugging Face Hub datasets, and weighted mixtures of them.

Sources (`data.train_path` / `val_path` / `test_path`): a local .jsonl / .json / .csv / .parquet file
(`pkg://` works), a Hugging Face Hub dataset id (loaded with `datasets.load_dataset`, split `train`,
`validation` or `test`), or a list of sources mixed with weights: `[{path: a.jsonl, weight: 2}, {path: b.csv,
weight: 0.5}]` repeats every row of a twice and a seeded half of b's rows. JSONL and CSV are read with the
standard library so every row keeps its `file:line` and no value is type-coerced (CSV cells are strings).

A hub source takes `load_dataset`'s own arguments as users pass them: `{path: org/set, name: config,
data_dir: ..., data_files: ..., revision: ..., split: ..., kwargs: {...any other keyword...}}`; the same
works for datasets' file builders (`{path: json, data_files: "shards/*.jsonl"}`).
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
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
    # the other keyword arguments of `datasets.load_dataset` (name, data_dir, data_files, kwargs' entries)
    load: dict[str, Any] = field(default_factory=dict, hash=False)


LOAD_KEYS = ("name", "data_dir", "data_files")
SOURCE_KEYS = ("path", "weight", "split", "revision", *LOAD_KEYS, "kwargs")


def parse_sources(value: Any, key: str) -> list[Source]:
    """`data.<split>_path`: null, one path / hub id, or a list of paths or {path, weight, split, revision,
    name, data_dir, data_files, kwargs} (the last four go to `datasets.load_dataset`)."""
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
        unknown = set(spec) - set(SOURCE_KEYS)
        weight = spec.get("weight", 1.0)
        extra = spec.get("kwargs") or {}
        if unknown or not isinstance(weight, int | float) or weight <= 0 or not isinstance(extra, dict):
            raise ConfigError(
                f"{key}: bad source {spec!r}: keys are {', '.join(SOURCE_KEYS)} (weight > 0; kwargs: a "
                "mapping of other datasets.load_dataset arguments)."
            )
        clash = set(extra) & {"path", "split", "revision", "streaming", *LOAD_KEYS}
        if clash:
            raise ConfigError(f"{key}: kwargs {sorted(clash)} are source keys of their own; move them up.")
        load = {k: spec[k] for k in LOAD_KEYS if spec.get(k) is not None} | extra
        sources.append(Source(spec["path"], float(weight), spec.get("split"), spec.get("revision"), load))
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
    return list(iter_jsonl_rows(file))


def iter_rows(source: Source, key: str, split: str) -> Iterator[Row]:
    """`read_source`'s rows one at a time where the reader allows it (JSONL, Parquet, hub datasets), so a
    large source's raw rows are never all in memory; JSON and CSV files are read whole."""
    file = _local_file(source.path, key)
    if file is not None and file.suffix == ".jsonl":
        return iter_jsonl_rows(file)
    if file is None or file.suffix == ".parquet":
        return iter_with_datasets(source, file, HUB_SPLITS[split], key)
    return iter(read_source(source, key, split))


@dataclass(frozen=True)
class LineSpan:
    """`lines` consecutive lines of a file, `size` bytes from `offset`. A worker reads them itself, so a
    large file's lines never pass through the parent process and a pipe on their way to the workers."""

    offset: int
    size: int
    lines: int

    def __len__(self) -> int:
        return self.lines

    def read(self, file: Path) -> list[bytes]:
        """The lines, split where iterating the file in binary mode splits them (after each b"\n")."""
        with open(file, "rb") as f:
            f.seek(self.offset)
            lines = f.read(self.size).split(b"\n")
        if not lines[-1]:  # the span ends with a newline: no line follows it
            lines.pop()
        return lines


# A chunk of raw rows as the pipeline's workers take it: a JSONL file, the number of its first line and the
# span of its lines, read and parsed by the worker (`parse_chunk`); or (None, 0, rows parsed by the reader).
RawChunk = tuple[Path | None, int, LineSpan | list]


def line_spans(file: Path, size: int, block: int = 1 << 23) -> Iterator[LineSpan]:
    """Spans of `size` lines of a file (the last one shorter), found a newline at a time with `bytes.find`
    (memchr): well under a microsecond a line, half the time of comparing every byte with numpy."""
    data, base, start, pos, lines = b"", 0, 0, 0, 0  # data[0] is at file offset `base`
    with open(file, "rb") as f:
        while more := f.read(block):
            data, base, pos = data[start:] + more, base + start, pos - start
            start = 0
            while (end := data.find(b"\n", pos)) >= 0:
                pos, lines = end + 1, lines + 1
                if lines == size:
                    yield LineSpan(base + start, pos - start, size)
                    start, lines = pos, 0
            pos = len(data)
    if start < len(data):  # the last lines; the very last one may have no newline
        yield LineSpan(base + start, len(data) - start, lines + (not data.endswith(b"\n")))


def raw_chunks(source: Source, key: str, split: str, size: int, seed: int) -> Iterator[RawChunk]:
    """The source's rows, weighed (see `weigh`), `size` at a time. A JSONL file of weight 1 is handed on as
    spans of lines, so reading, decoding and parsing happen where the chunk is converted; a weighed source
    is read whole first (its sample needs every row)."""
    if source.weight != 1:
        rows = weigh(read_source(source, key, split), source.weight, seed)
        for start in range(0, len(rows), size):
            yield None, 0, rows[start : start + size]
        return
    file = _local_file(source.path, key)
    if file is not None and file.suffix == ".jsonl":
        first = 1
        for span in line_spans(file, size):
            yield file, first, span
            first += span.lines
        return
    rows = []
    for row in iter_rows(source, key, split):
        rows.append(row)
        if len(rows) == size:
            yield None, 0, rows
            rows = []
    if rows:
        yield None, 0, rows


def parse_chunk(chunk: RawChunk) -> list[Row]:
    file, first, items = chunk
    if file is None:
        return items
    if isinstance(items, LineSpan):
        items = items.read(file)
    rows = (parse_jsonl_line(file, lineno, raw) for lineno, raw in enumerate(items, start=first))
    return [row for row in rows if row is not None]


def iter_jsonl_rows(file: Path) -> Iterator[Row]:
    """`jsonl_rows`, one row at a time."""
    with open(file, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            row = parse_jsonl_line(file, lineno, raw)
            if row is not None:
                yield row


def parse_jsonl_line(file: Path, lineno: int, raw: bytes) -> Row | None:
    """One JSONL line: (file:line, the parsed value or a BadRow); None for a blank line."""
    where = f"{file}:{lineno}"
    value = loads(raw)
    if value is not _UNREAD:
        return where, value
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError:
        return where, BadRow(where, "invalid_unicode", "the line is not UTF-8. Re-encode it.")
    if not line.strip():
        return None
    try:
        return where, json.loads(line)
    except json.JSONDecodeError as err:
        reason = f"invalid JSON ({err.msg} at column {err.colno}). Fix or remove the line."
        return where, BadRow(where, "bad_json", reason)


_UNREAD = object()


def loads(raw: bytes) -> Any:
    """`json.loads(raw)` where orjson reads it the same (a fifth of the time, most of the parsing of a
    large file), else `_UNREAD`: on anything orjson refuses (blank or invalid lines, a BOM, NaN, lone
    surrogates, 1e400, which the standard library reads or reports in its own words), and on any value
    holding a float, since orjson reads an integer past 64 bits as a float, silently."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _UNREAD
    return _UNREAD if _holds_float(value) else value


def exact_loads(raw: bytes) -> Any:
    """`json.loads(raw)`, through orjson where it gives the same (`loads`)."""
    value = loads(raw)
    return json.loads(raw) if value is _UNREAD else value


def _holds_float(value: Any) -> bool:
    kind = type(value)
    if kind is dict:
        return any(type(v) is not str and _holds_float(v) for v in value.values())
    if kind is list:
        return any(type(v) is not str and _holds_float(v) for v in value)
    return kind is float


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
    return list(iter_csv_rows(file))


def iter_csv_rows(file: Path) -> Iterator[Row]:
    """`read_csv`, one record at a time."""
    with open(file, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        start = 2
        for row in reader:
            if any(v for v in row.values() if isinstance(v, str) and v.strip()):
                yield f"{file}:{start}", row
            start = reader.line_num + 1


def read_with_datasets(source: Source, file: Path | None, split: str, key: str) -> list[Row]:
    """Parquet files and hub datasets, through `datasets` (imported only here: it is slow to import)."""
    return list(iter_with_datasets(source, file, split, key))


def iter_with_datasets(
    source: Source, file: Path | None, split: str, key: str, batch_size: int = 1000
) -> Iterator[Row]:
    """`read_with_datasets` a batch of rows at a time: the dataset stays memory-mapped Arrow, and only
    `batch_size` of its rows are Python objects at once."""
    ds = load_with_datasets(source, file, split, key)
    name = str(file) if file is not None else f"{source.path}[{source.split or split}]"
    i = 0
    for batch in ds.iter(batch_size=batch_size):
        names = list(batch)
        for values in zip(*(batch[n] for n in names), strict=True):
            yield f"{name} row {i}", dict(zip(names, values, strict=True))
            i += 1


def load_with_datasets(
    source: Source, file: Path | None, split: str, key: str, streaming: bool = False
) -> Any:
    """A local Parquet file or a hub dataset as `datasets` loads it (an `IterableDataset` with `streaming`);
    `split` is the one asked for when the source names none. Argument and load errors say what to do."""
    import datasets

    if file is not None and source.load:
        raise ConfigError(
            f"{key}: {sorted(source.load)} are datasets.load_dataset arguments for a hub id or a "
            f"builder (json, csv, parquet ...); {source.path!r} is a local file. Drop them, or use "
            "path: parquet with data_files."
        )
    try:
        if file is not None:
            return datasets.load_dataset("parquet", data_files=str(file), split="train", streaming=streaming)
        return datasets.load_dataset(
            source.path,
            split=source.split or split,
            revision=source.revision,
            streaming=streaming,
            **source.load,
        )
    except Exception as err:  # datasets raises many types; the message says what to do
        verb = "stream" if streaming else "load"
        raise DataError(
            f"{key}={source.path!r}: cannot {verb} it with datasets ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). For a hub id, check the name and split and "
            "that the hub is reachable (or cached); otherwise point the key at a local file."
        ) from None


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


def source_fingerprint(source: Source, key: str, memo: Path | None = None) -> dict:
    """What the source's rows depend on: a local file's bytes; a hub id, its revision and load arguments,
    plus the bytes of every local file its `data_files` name (a builder such as `json` reading shards).
    `memo`: where file digests are remembered by stat stamp (cache.file_digest)."""
    file = _local_file(source.path, key)
    ident = cache.file_digest(file, memo) if file is not None else f"hub:{source.path}@{source.revision}"
    out = {"data": ident, "weight": source.weight, "split": source.split}
    if source.load:
        out["load"] = source.load
        files = source.load.get("data_files")
        patterns = [files] if isinstance(files, str) else list(files or []) if isinstance(files, list) else []
        if isinstance(files, dict):
            patterns = [f for v in files.values() for f in ([v] if isinstance(v, str) else v)]
        matched = sorted({m for pat in patterns for m in glob.glob(pat, recursive=True) if Path(m).is_file()})
        out["data_files"] = {m: cache.file_digest(m, memo) for m in matched}
    return out
