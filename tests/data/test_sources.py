"""Sources: `load_dataset`'s arguments pass through for hub ids and builders, and the cache key follows what
the rows depend on (the files a builder reads, every module of the data package)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftlab.data import cache
from sftlab.data.sources import (
    Source,
    exact_loads,
    iter_with_datasets,
    jsonl_rows,
    line_spans,
    parse_chunk,
    parse_jsonl_line,
    parse_sources,
    raw_chunks,
    read_source,
    source_fingerprint,
)
from sftlab.errors import ConfigError


def _shards(folder: Path) -> list[Path]:
    folder.mkdir()
    files = []
    for k in range(2):
        rows = [{"prompt": f"q{k}{j}", "completion": f"a{k}{j}"} for j in range(3)]
        files.append(folder / f"shard-{k}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def test_builder_with_data_files_and_kwargs_reads_every_shard(tmp_path):
    files = _shards(tmp_path / "shards")
    spec = {"path": "json", "data_files": str(tmp_path / "shards" / "shard-*.jsonl"), "split": "train"}
    (source,) = parse_sources([{**spec, "kwargs": {"encoding": "utf-8"}}], "data.train_path")
    assert source.load == {"data_files": spec["data_files"], "encoding": "utf-8"}
    rows = read_source(source, "data.train_path", "train")
    assert sorted(r["prompt"] for _, r in rows) == [f"q{k}{j}" for k in range(2) for j in range(3)]

    before = source_fingerprint(source, "data.train_path")
    assert sorted(before["data_files"]) == sorted(map(str, files))
    files[1].write_text(files[1].read_text().replace("a12", "changed"))
    assert source_fingerprint(source, "data.train_path")["data_files"] != before["data_files"]


def test_load_arguments_are_refused_where_they_cannot_apply(tmp_path):
    with pytest.raises(ConfigError, match=r"kwargs \['data_files'\] are source keys of their own"):
        parse_sources([{"path": "org/set", "kwargs": {"data_files": "x"}}], "data.train_path")
    with pytest.raises(ConfigError, match="keys are path, weight, split, revision, name, data_dir"):
        parse_sources([{"path": "org/set", "nmae": "x"}], "data.train_path")
    parquet = tmp_path / "rows.parquet"
    import datasets

    datasets.Dataset.from_list([{"prompt": "q", "completion": "a"}]).to_parquet(str(parquet))
    with pytest.raises(
        ConfigError, match=r"\['name'\] are datasets.load_dataset arguments .* is a local file"
    ):
        read_source(Source(str(parquet), load={"name": "cfg"}), "data.train_path", "train")


def test_code_fingerprint_covers_every_module_of_the_data_package(tmp_path):
    package = Path(cache.__file__).parent
    copy = tmp_path / "data"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    base = cache.code_fingerprint(copy)
    assert base == cache.code_fingerprint(package)
    modules = sorted(copy.rglob("*.py"))
    assert {"sources.py", "pipeline.py", "datamodule.py", "formats.py", "tokenize.py"} <= {
        m.name for m in modules
    }
    for module in modules:
        original = module.read_bytes()
        module.write_bytes(original + b"\n# an edit\n")
        assert cache.code_fingerprint(copy) != base, module.name
        module.write_bytes(original)


def test_jsonl_chunks_and_hub_style_batches_give_the_rows_read_whole(tmp_path):
    lines = ['{"a": 1}', "", "{bad", '{"a": 2}', '{"a": 3}', '{"a": 4}', "  ", '{"a": 5}']
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    whole = jsonl_rows(jsonl)
    chunks = list(raw_chunks(Source(str(jsonl)), "data.train_path", "train", 3, seed=0))
    assert [(first, len(items)) for _, first, items in chunks] == [(1, 3), (4, 3), (7, 2)]  # blank ones too
    parsed = [row for chunk in chunks for row in parse_chunk(chunk)]
    assert [w for w, _ in parsed] == [w for w, _ in whole] == [f"{jsonl}:{n}" for n in (1, 3, 4, 5, 6, 8)]
    assert [r if isinstance(r, dict) else r.reason for _, r in parsed] == [
        {"a": 1}, "bad_json", {"a": 2}, {"a": 3}, {"a": 4}, {"a": 5},
    ]  # fmt: skip

    import datasets

    parquet = tmp_path / "rows.parquet"
    datasets.Dataset.from_list([{"prompt": f"q{i}", "n": i} for i in range(5)]).to_parquet(str(parquet))
    batched = list(iter_with_datasets(Source(str(parquet)), parquet, "train", "k", batch_size=2))
    assert batched == [(f"{parquet} row {i}", {"prompt": f"q{i}", "n": i}) for i in range(5)]
    assert read_source(Source(str(parquet)), "data.train_path", "train") == batched


LITERALS = [
    b'{"n": 123456789012345678901234567890}',  # past 64 bits: orjson would give a float
    b'{"n": -9223372036854775809, "m": 18446744073709551615}',
    b'{"x": 0.1, "y": 1e400, "z": NaN}',
    b'{"s": "\\ud800"}',  # a lone surrogate
    b'\xef\xbb\xbf{"bom": 1}',
    b'{"a": 1, "a": 2}',
    b'{"t": "caf\xc3\xa9 \\u0000", "l": [true, null, [], {}]}\r',
    b'{"tool": {"arguments": {"temperature": 0.7, "n": [1, 2.5]}}}',
]


@pytest.mark.parametrize("raw", LITERALS)
def test_loads_reads_exactly_what_json_loads_reads(raw):
    want = json.loads(raw)  # bytes: the standard library detects the BOM itself
    got = exact_loads(raw)
    assert got == want or (got != got and want != want)
    assert json.dumps(got) == json.dumps(want)  # the same types: 1e29 and 10**29 print differently


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=4),
        max_leaves=12,
    )
)
@settings(max_examples=200, deadline=None)
def test_loads_matches_json_on_any_value(value):
    raw = json.dumps(value).encode()
    assert json.dumps(exact_loads(raw)) == json.dumps(json.loads(raw))


@given(
    lines=st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")), max_size=40),
    newline_at_end=st.booleans(),
    size=st.integers(1, 7),
    block=st.integers(1, 64),
)
@settings(max_examples=150, deadline=None)
def test_line_spans_cut_the_lines_iteration_gives(tmp_path_factory, lines, newline_at_end, size, block):
    file = tmp_path_factory.mktemp("spans") / "rows.jsonl"
    file.write_bytes(b"\n".join(lines) + (b"\n" if newline_at_end and lines else b""))
    with open(file, "rb") as f:
        want = [line.removesuffix(b"\n") for line in f]
    spans = list(line_spans(file, size, block=block))
    assert all(len(s) == size for s in spans[:-1]) and all(0 < len(s) <= size for s in spans[-1:])
    assert [line for s in spans for line in s.read(file)] == want
    assert sum(len(s) for s in spans) == len(want)


@pytest.mark.parametrize(
    "raw", [b'{"a": "x\ty"}', b"[1,]", b"{'a': 1}", b"01", b"+1", b".5", b"1.", b'{"a": 1} x', b'"\\x41"']
)
def test_a_line_the_standard_library_refuses_is_a_bad_row_whichever_parser_reads_it_first(raw):
    where, row = parse_jsonl_line(Path("rows.jsonl"), 3, raw)
    assert where == "rows.jsonl:3" and row.reason == "bad_json"
