"""On-disk cache of processed splits: a second run on the same data does no reading, rendering or tokenizing.

The key hashes everything the processed tokens depend on: the data files' contents (or a hub dataset id and
revision), every data setting that changes tokens or rows (format, fields, max_length, truncation, train_on,
packing, val_fraction, dedupe, on_error, seed, mixture weights), the template's fields, the tokenizer (class,
vocabulary and merges, added and special tokens, chat template) and the source of every module of the data
package (readers, mixtures, split, dedupe, formats, templates, tokenize, packing, ...). Any change gives a new
key; stale entries are never read.

Layout: `<cache_dir>/<key>/` with `meta.json` (counts, per split) and per split two `datasets` Arrow datasets
(the layout `Dataset.save_to_disk` writes, so `datasets.load_from_disk` opens them; sftlab itself opens
them with pyarrow, which imports in a fraction of the time):
`<split>/examples` (input_ids, labels, status, num_targets[, position_ids when packed]: what the loaders
read) and `<split>/rows` (one `json` column: the kept conversations, for generation-based evaluation).
They are written a batch at a time and opened memory-mapped, so neither writing nor reading holds a split in
memory: the loaders read one example at a time, and only the per-example lengths and target counts (a few
bytes each) are loaded whole, for the step plan, length grouping and packing. Entries are written to a
temporary directory and renamed into place, so a killed run never leaves half an entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import xxhash

from sftlab.data.packing import pack_plan
from sftlab.data.tokenize import IGNORE_INDEX, STATUSES, Encoded, EncodedRows, plain_backend

FORMAT_VERSION = 2
log = logging.getLogger(__name__)


def file_digest(path: str | Path, memo: Path | None = None) -> str:
    """xxh3-128 of the file's bytes: touching a file does not invalidate it, editing does. xxhash (the
    library `datasets` fingerprints with) reads 4 GB/s here against blake2b's 0.7 (a 500 MB file: 0.1
    against 0.7 s at its first preparation); a cache key must tell edits apart, not resist a forger.

    With `memo` (a directory beside the cache entries) the digest is remembered with the file's stat stamp
    (size, mtime and ctime in ns, inode, device) and reused while the stamp is unchanged, so a cached reload
    of a 500 MB file does not read it again. ctime cannot be set back by a user (any write or `touch -d`
    moves it to now), so an edit that keeps the size and restores the mtime is still seen. A file changed
    within the last few seconds is not remembered: two writes inside one timestamp tick would share a
    stamp (git's "racily clean" index entries have the same guard)."""
    if memo is None:
        return _hash_file(path)
    before = os.stat(path)
    stamp = _stamp(before)
    record = memo / (hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:24] + ".json")
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(record.read_text(encoding="utf-8"))
        if saved["stamp"] == stamp:
            return saved["digest"]
    digest = _hash_file(path)
    settled = time.time_ns() - max(before.st_mtime_ns, before.st_ctime_ns) > RACY_NS
    if settled and _stamp(os.stat(path)) == stamp:  # not changing while it was read
        with contextlib.suppress(OSError):  # a read-only cache still works, it just hashes every time
            memo.mkdir(parents=True, exist_ok=True)
            tmp = record.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"path": str(path), "stamp": stamp, "digest": digest}))
            os.replace(tmp, record)
    return digest


RACY_NS = 3_000_000_000  # how recently changed a file must not be for its digest to be remembered


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _hash_file(path: str | Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict:
    # The padding and truncation transformers leaves on the Rust tokenizer would change to_str() and miss
    # the cache: cleared (0.02 s, where parsing the 1.5 MB JSON to drop them took 0.25 s of every reload).
    backend = plain_backend(tokenizer)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    added = {i: str(t) for i, t in tokenizer.added_tokens_decoder.items()}
    return {
        "class": type(tokenizer).__name__,
        "name": getattr(tokenizer, "name_or_path", ""),
        "vocab": hashlib.sha256(vocab.encode()).hexdigest(),
        "added": added,
        "special": tokenizer.special_tokens_map,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


def template_fingerprint(template: Any) -> dict:
    fields = {f.name: getattr(template, f.name) for f in dataclasses.fields(template) if f.init}
    return {"class": type(template).__name__, **fields}


def code_fingerprint(package: Path = Path(__file__).parent) -> str:
    """A hash of every module of the data package. All of them, not a list of the ones that shape tokens
    today: a list goes stale when code moves between modules or a new one joins the pipeline, and then an
    edit silently reuses old entries. An edit to a module that does not shape the data (the audit, say)
    costs one rebuild of the cache."""
    h = hashlib.sha256()
    for module in sorted(package.rglob("*.py")):
        h.update(str(module.relative_to(package)).encode() + b"\0" + module.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cache_key(parts: Mapping[str, Any]) -> str:
    blob = json.dumps({"v": FORMAT_VERSION, "code": code_fingerprint(), **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def arrow_schema(packed: bool) -> Any:
    """The schema of `<split>/examples` (`packed`: with position_ids)."""
    import pyarrow as pa

    ints = pa.list_(pa.int32())
    columns = [("input_ids", ints), ("labels", ints), ("status", pa.string()), ("num_targets", pa.int32())]
    if packed:
        columns.append(("position_ids", ints))
    return pa.schema(columns)


def rows_schema() -> Any:
    """The schema of `<split>/rows`: each kept conversation as JSON text."""
    import pyarrow as pa

    return pa.schema([("json", pa.string())])


def table_of(columns: Mapping[str, Any], schema: Any) -> Any:
    """An Arrow table of columns (int32, string (str or UTF-8 bytes) or list<int32>, as the cache's schemas
    hold): Python sequences, or numpy arrays (an int32 column) and (values, offsets) pairs of them (a
    list<int32> column, as EncodedRows holds its examples). Made from numpy buffers rather than with
    `pa.array`, whose first call imports pandas (about 0.4 s of CPU in every process that writes or
    tokenizes: the workers and the parent alike)."""
    import numpy as np
    import pyarrow as pa

    def ints(values: Any, n: int) -> Any:
        if not isinstance(values, np.ndarray):
            values = np.fromiter(values, np.int32, n)
        return pa.Array.from_buffers(pa.int32(), n, [None, pa.py_buffer(values.astype(np.int32, copy=False))])

    def offsets(ends: np.ndarray) -> Any:
        if ends[-1] >= 2**31:
            raise ValueError("an Arrow chunk of the data cache would exceed 2 GB; lower the chunk size")
        return pa.py_buffer(ends.astype(np.int32))

    def cumulative(lengths: Iterable[int], n: int) -> np.ndarray:
        out = np.zeros(n + 1, np.int64)
        np.cumsum(np.fromiter(lengths, np.int64, n), out=out[1:])
        return out

    arrays = []
    for field in schema:
        values = columns[field.name]
        if field.type == pa.int32():
            arrays.append(ints(values, len(values)))
        elif field.type == pa.string():
            data = [v if isinstance(v, bytes) else v.encode() for v in values]
            buffers = [None, offsets(cumulative(map(len, data), len(data))), pa.py_buffer(b"".join(data))]
            arrays.append(pa.Array.from_buffers(pa.string(), len(data), buffers))
        elif field.type == pa.list_(pa.int32()):
            if isinstance(values, tuple):
                flat, ends = values
            else:
                ends = cumulative(map(len, values), len(values))
                flat = itertools.chain.from_iterable(values)
            n = len(ends) - 1
            children = [ints(flat, int(ends[-1]))]
            arrays.append(pa.Array.from_buffers(field.type, n, [None, offsets(ends)], children=children))
        else:
            raise TypeError(f"table_of: no conversion for {field.type}")
    return pa.Table.from_arrays(arrays, schema=schema)


class ArrowWriter:
    """One Arrow dataset written a record batch at a time, so memory holds one batch, never the split, in
    the layout `Dataset.save_to_disk` writes for one shard: the data as an Arrow IPC stream, beside it the
    two small files `datasets.load_from_disk` reads. Written with pyarrow alone: importing `datasets` (and
    the pandas it imports) costs more CPU than tokenizing thousands of rows. The features are left out of
    `dataset_info.json`, so `datasets` infers them from the Arrow schema (List(Value("int32")),
    Value("string"), ...), as each version of it spells them."""

    SHARD = "data-00000-of-00001.arrow"

    def __init__(self, directory: Path, schema: Any, batch_size: int = 1000) -> None:
        import pyarrow as pa

        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.schema, self.batch_size = directory, schema, batch_size
        self.columns: dict[str, list] = {}
        self.sink = pa.OSFile(str(directory / self.SHARD), "wb")
        self.writer = pa.ipc.new_stream(self.sink, schema)

    def add(self, row: dict) -> None:
        """Buffer a row; every `batch_size` rows go to the file as one Arrow record batch."""
        for name, value in row.items():
            self.columns.setdefault(name, []).append(value)
        if len(next(iter(self.columns.values()))) >= self.batch_size:
            self._flush()

    def write_table(self, table: Any) -> None:
        self._flush()
        if not table.schema.equals(self.schema):
            table = table.cast(self.schema)
        self.writer.write_table(table)

    def _flush(self) -> None:
        if self.columns:
            self.writer.write_table(table_of(self.columns, self.schema))
            self.columns = {}

    def close(self) -> None:
        self._flush()
        self.writer.close()
        self.sink.close()
        state = {
            "_data_files": [{"filename": self.SHARD}],
            "_fingerprint": hashlib.sha256(str(self.directory).encode()).hexdigest()[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        (self.directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        (self.directory / "dataset_info.json").write_text(json.dumps({"features": None}, indent=2))


def targets(labels: Sequence[int]) -> int:
    """Target tokens of an example: labels after the first (the loss shifts by one) that are not ignored."""
    return max(0, len(labels) - 1 - labels[1:].count(IGNORE_INDEX))


def arrow_tables(examples: EncodedRows, rows_json: Sequence[bytes]) -> tuple[Any, Any]:
    """(examples, rows) Arrow tables of kept examples and their conversations (as JSON text), in the
    cache's schema."""
    columns = {
        "input_ids": (examples.input_ids, examples.offsets),
        "labels": (examples.labels, examples.offsets),
        "status": [STATUSES[code] for code in examples.status],
        "num_targets": examples.num_targets(),
    }
    return table_of(columns, arrow_schema(False)), table_of({"json": rows_json}, rows_schema())


def write_split(
    directory: Path, chunks: Iterable[tuple[Any, Any]], pack_length: int | None = None
) -> int | None:
    """Write one split, chunk by chunk ((examples, rows) Arrow tables from `arrow_tables`), as
    `directory/examples` and `directory/rows`. With `pack_length`, the examples are packed into rows of
    that many tokens (best-fit decreasing over the lengths alone, then the rows are assembled from the
    memory-mapped unpacked examples) and the number of packed rows is returned."""
    first = directory / ("unpacked" if pack_length else "examples")
    examples, rows = ArrowWriter(first, arrow_schema(False)), ArrowWriter(directory / "rows", rows_schema())
    lengths: list[int] = []
    for example_table, row_table in chunks:
        examples.write_table(example_table)
        rows.write_table(row_table)
        if pack_length:
            import pyarrow.compute as pc

            lengths += pc.list_value_length(example_table.column("input_ids")).to_pylist()
    examples.close()
    rows.close()
    if not pack_length:
        return None
    plan = pack_plan(lengths, pack_length)
    unpacked = ArrowExamples(_open(first))
    packed = ArrowWriter(directory / "examples", arrow_schema(True))
    for row in plan:
        parts = [unpacked[i] for i in row]
        ids = [t for p in parts for t in p.input_ids]
        labels = [t for p in parts for t in p.labels]
        positions = [k for p in parts for k in range(len(p.input_ids))]
        packed.add(
            {
                "input_ids": ids,
                "labels": labels,
                "status": "kept",
                "num_targets": targets(labels),
                "position_ids": positions,
            }
        )
    packed.close()
    del unpacked
    shutil.rmtree(first)
    return len(plan)


def _open(directory: Path) -> Any:
    """The dataset `load_from_disk` would open there, as a pyarrow Table over the memory-mapped files:
    pyarrow alone, since importing `datasets` costs about 2 s of every cached reload."""
    import pyarrow as pa

    state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    files = [directory / f["filename"] for f in state["_data_files"]]
    return pa.concat_tables([pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files])


class _Lazy(Sequence):
    """A read-only sequence over a memory-mapped Arrow table: one row is read per index."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return [self[i] for i in range(*key.indices(len(self)))]
        if key < 0:
            key += len(self)
        if not 0 <= key < len(self):
            raise IndexError(key)
        return self._row(self.table.slice(int(key), 1).to_pylist()[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def _row(self, row: dict) -> Any:
        raise NotImplementedError


class ArrowExamples(_Lazy):
    """Encoded examples read one at a time from `<split>/examples`."""

    def _row(self, row: dict) -> Encoded:
        return Encoded(row["input_ids"], row["labels"], row["status"], row.get("position_ids"))

    def column(self, name: str) -> list[int]:
        """A whole integer column, from Arrow directly (no per-row Python objects but the ints)."""
        return self.table.column(name).to_numpy().tolist()

    def lengths(self) -> list[int]:
        import pyarrow.compute as pc

        return pc.list_value_length(self.table.column("input_ids")).to_numpy().tolist()


class ArrowRows(_Lazy):
    """The kept conversations read one at a time from `<split>/rows`."""

    def _row(self, row: dict) -> Any:
        return json.loads(row["json"])


def open_split(directory: Path) -> tuple[ArrowExamples, ArrowRows]:
    return ArrowExamples(_open(directory / "examples")), ArrowRows(_open(directory / "rows"))


def build_dir(parent: Path) -> Path:
    """A fresh directory beside the entries, where one entry is written before `commit` renames it."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix=".build-"))


def commit(build: Path, directory: Path, counts: Mapping[str, Any]) -> Path:
    """Seal the entry written in `build` (meta.json last) and rename it to `directory`; the entry that is
    in place afterwards is returned (another run's, when it wrote the same entry first)."""
    (build / "meta.json").write_text(json.dumps({s: {"counts": c} for s, c in counts.items()}))
    try:
        os.replace(build, directory)
    except OSError:  # another run wrote the same entry first: keep theirs
        shutil.rmtree(build, ignore_errors=True)
    return directory


def load(directory: Path) -> dict[str, dict] | None:
    """{split: {"examples", "rows", "counts"}} opened memory-mapped, or None when there is no complete,
    readable entry (a damaged entry is reported and then simply rebuilt)."""
    if not (directory / "meta.json").is_file():
        return None
    try:
        return _load(directory)
    except Exception as err:  # datasets and pyarrow raise many types for a damaged file
        log.warning("data cache entry %s is unreadable (%s); processing the data again", directory, err)
        shutil.rmtree(directory, ignore_errors=True)  # so the fresh entry can take its place
        return None


def _load(directory: Path) -> dict[str, dict]:
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    out = {}
    for name, info in meta.items():
        examples, rows = open_split(directory / name)
        if len(rows) != info["counts"]["kept"]:
            raise ValueError(f"{name}: {len(rows)} rows, meta.json says {info['counts']['kept']}")
        out[name] = {"examples": examples, "rows": rows, "counts": info["counts"]}
    return out
