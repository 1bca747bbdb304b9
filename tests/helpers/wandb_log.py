"""Read what an offline W&B run wrote (`run-*.wandb`) without network or account: the tests check each
job's identity, config and summary with it. (Users can read one with `wandb leet inspect --json RUN_DIR`.)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---- reading offline runs ---------------------------------------------------------------------------------
# run-*.wandb is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of
# chunks, each with a 7-byte header (crc32, length, type); a record is a FULL chunk or FIRST, MIDDLE.., LAST.
# Each record is a serialized wandb_internal_pb2.Record. wandb 0.31 ships no Python reader for it.
_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What one offline W&B run recorded."""

    path: Path
    id: str = ""
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None


def iter_records(path: str | Path) -> list[Any]:
    """The protobuf records of a `run-*.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = _HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: not a W&B run log (header {data[:7]!r})")
    records, pending, pos = [], b"", _HEADER.size
    while pos + _CHUNK.size <= len(data):
        if _BLOCK - pos % _BLOCK < _CHUNK.size:  # a block tail too short for a chunk header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = _CHUNK.unpack_from(data, pos)
        chunk = data[pos + _CHUNK.size : pos + _CHUNK.size + length]
        pos += _CHUNK.size + length
        if kind in (_FULL, _FIRST):
            pending = chunk
        elif kind in (_MIDDLE, _LAST):
            pending += chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _apply(target: dict[str, Any], item: Any, remove: bool = False) -> None:
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    if remove:
        target.pop(keys[-1], None)
    else:
        target[keys[-1]] = json.loads(item.value_json)


def read_offline_run(path: str | Path) -> OfflineRun:
    """Identity, config, final summary, history rows and exit code of one offline run.

    `path` is the `run-*.wandb` file or the `offline-run-*` directory holding it. Read it once the process
    that wrote it has exited (or after `wandb.teardown()`): `wandb.finish()` returns before wandb's service
    process has flushed the file.
    """
    path = Path(path)
    if path.is_dir():
        path = next(path.glob("run-*.wandb"))
    run = OfflineRun(path)
    for rec in iter_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.id, run.name, run.group, run.tags = r.run_id, r.display_name, r.run_group, list(r.tags)
        elif kind == "config":
            for item in rec.config.update:
                _apply(run.config, item)
        elif kind == "summary":
            for item in rec.summary.update:
                _apply(run.summary, item)
            for item in rec.summary.remove:
                _apply(run.summary, item, remove=True)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                _apply(row, item)
            run.history.append(row)
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    run.config.pop("_wandb", None)
    return run


def offline_runs(root: str | Path) -> list[OfflineRun]:
    """Every offline W&B run under a run or sweep directory, sorted by path."""
    return [read_offline_run(p) for p in sorted(Path(root).rglob("offline-run-*/run-*.wandb"))]
