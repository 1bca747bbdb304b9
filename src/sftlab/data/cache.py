"""On-disk cache of processed splits: a second run on the same data does no reading, rendering or tokenizing.

The key hashes everything the processed tokens depend on: the data files' contents (or a hub dataset id and
revision), every data setting that changes tokens or rows (format, fields, max_length, truncation, train_on,
packing, val_fraction, dedupe, on_error, seed, mixture weights), the template's fields, the tokenizer (class,
vocabulary and merges, added and special tokens, chat template) and the source of every module of the data
package (readers, mixtures, split, dedupe, formats, templates, tokenize, packing, ...). Any change gives a new
key; stale entries are never read.

Layout: `<cache_dir>/<key>/` with `meta.json` (counts, per split) and per split `<split>.npz` (flat int32
token arrays + offsets) and `<split>.rows.json` (the kept conversations, for generation-based evaluation).
Entries are written to a temporary directory and renamed into place, so a killed run never leaves half an
entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sftlab.data.tokenize import Encoded

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


def file_digest(path: str | Path) -> str:
    """blake2b of the file's bytes (about 1 GB/s): touching a file does not invalidate it, editing does."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # transformers sets padding and truncation on the Rust tokenizer at every call and leaves them (a
        # padded batch leaves padding on); they change no token id, but would change to_str() and miss the
        # cache. Cleared here (transformers sets them again at its next call): 0.02 s, where parsing the
        # 1.5 MB JSON to drop them took 0.25 s of every cached reload.
        backend.no_padding()
        backend.no_truncation()
        vocab = backend.to_str()
    else:
        vocab = json.dumps(tokenizer.get_vocab(), sort_keys=True)
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


def _flat(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


def save(directory: Path, splits: Mapping[str, Any]) -> None:
    """Write `splits` ({name: SplitData}) as one cache entry at `directory` (atomically)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".build-"))
    meta = {}
    for name, data in splits.items():
        arrays = {}
        for field in ("input_ids", "labels", "position_ids"):
            seqs = [getattr(ex, field) for ex in data.examples]
            if field == "position_ids" and any(s is None for s in seqs):
                continue
            arrays[field], arrays["offsets"] = _flat(seqs)
        np.savez(build / f"{name}.npz", **arrays)
        (build / f"{name}.rows.json").write_text(json.dumps(data.rows, ensure_ascii=False), encoding="utf-8")
        meta[name] = {"counts": data.counts, "statuses": [ex.status for ex in data.examples]}
    (build / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    try:
        os.replace(build, directory)
    except OSError:  # another run wrote the same entry first: keep theirs
        shutil.rmtree(build, ignore_errors=True)


def load(directory: Path) -> dict[str, dict] | None:
    """{split: {"examples", "rows", "counts"}} or None when there is no complete, readable entry (a damaged
    entry is reported and then simply rebuilt)."""
    if not (directory / "meta.json").is_file():
        return None
    try:
        return _load(directory)
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("data cache entry %s is unreadable (%s); processing the data again", directory, err)
        shutil.rmtree(directory, ignore_errors=True)  # so the fresh entry can take its place
        return None


def _load(directory: Path) -> dict[str, dict]:
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    out = {}
    for name, info in meta.items():
        arrays = np.load(directory / f"{name}.npz")
        offsets = arrays["offsets"].tolist()
        ids, labels = arrays["input_ids"].tolist(), arrays["labels"].tolist()
        positions = arrays["position_ids"].tolist() if "position_ids" in arrays else None
        examples = [
            Encoded(ids[a:b], labels[a:b], status, None if positions is None else positions[a:b])
            for a, b, status in zip(offsets[:-1], offsets[1:], info["statuses"], strict=True)
        ]
        rows = json.loads((directory / f"{name}.rows.json").read_text(encoding="utf-8"))
        out[name] = {"examples": examples, "rows": rows, "counts": info["counts"]}
    return out
