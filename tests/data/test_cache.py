"""The Arrow-backed cache: processed splits streamed into `datasets` Arrow files and read back memory-mapped
give exactly what the in-memory pipeline gives, train the same, and open with `datasets.load_from_disk`;
tokenizing in worker processes changes nothing."""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import datasets
import pytest
import pytorch_lightning as pl
import torch

from sftlab.data import cache, pipeline
from sftlab.data.datamodule import SFTDataModule
from sftlab.data.pipeline import SplitData, convert_rows, dedupe, encode_split, split_off
from sftlab.data.sources import jsonl_rows
from sftlab.data.tokenize import encode_conversations
from sftlab.errors import DataError
from sftlab.model.adapters import LoRA
from sftlab.model.load import load_model
from sftlab.training.module import SFTModule
from tests.conftest import quiet_trainer


def conv(i: int) -> dict:
    answer = " ".join(f"w{k}" for k in range(1 + (i * 7) % 23))  # 1 to 23 words: lengths differ
    return {"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": answer}]}


@pytest.fixture
def data_file(tmp_path):
    rows = [conv(i) for i in range(40)] + [conv(3), conv(5)]  # two duplicates
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def in_memory(path, tokenizer, template, packing: bool) -> dict[str, SplitData]:
    """The same steps on lists, nothing written: the reference the Arrow path must equal."""
    convs, skipped = convert_rows(jsonl_rows(path), None, {}, "raise")
    convs, duplicates = dedupe(convs)
    train, val = split_off(convs, 0.25, 0)
    kwargs = {"max_length": 50, "truncation": "drop", "train_on": "all_assistant", "packing": packing}
    return {
        "train": encode_split(train, template, tokenizer, skipped=skipped, duplicates=duplicates, **kwargs),
        "val": encode_split(val, template, tokenizer, skipped=Counter(), duplicates=0, **kwargs),
    }


def arrow(path, tokenizer, template, cache_dir, **kwargs) -> SFTDataModule:
    settings = {"max_length": 50, "truncation": "drop", "val_fraction": 0.25, "dedupe": True, "seed": 0}
    dm = SFTDataModule(tokenizer, template, str(path), cache_dir=str(cache_dir), **{**settings, **kwargs})
    dm.setup()
    return dm


@pytest.mark.parametrize("packing", [False, True])
def test_arrow_splits_equal_the_in_memory_pipeline_field_by_field(
    tokenizer, chatml, data_file, tmp_path, packing, monkeypatch
):
    monkeypatch.setattr(pipeline, "CHUNK", 8)  # workers convert and encode, duplicates in other chunks
    dm = arrow(data_file, tokenizer, chatml, tmp_path / "cache", packing=packing, max_drop_ratio=0.5)
    expected = in_memory(data_file, tokenizer, chatml, packing)
    for split, ref in expected.items():
        got = dm.splits[split]
        assert isinstance(got.examples, cache.ArrowExamples) and isinstance(got.rows, cache.ArrowRows)
        assert list(got.examples) == ref.examples  # input_ids, labels, status, position_ids
        assert list(got.rows) == ref.rows
        assert got.counts == {**ref.counts, "chat_markers": 0}  # counted before encoding (none here)
        assert got.num_targets == ref.num_targets and got.lengths == ref.lengths
    assert dm.counts()["train"]["dropped"]["duplicate"] == 2
    assert ("packed_rows" in dm.counts()["train"]) is packing
    assert not list(dm._cache_entry().rglob(".spill-*"))  # the workers' tables, once written, are removed
    # the ecosystem's reader opens the entry as it is
    on_disk = datasets.load_from_disk(str(dm._cache_entry() / "train" / "examples"))
    assert on_disk["input_ids"] == [ex.input_ids for ex in expected["train"].examples]
    ints = datasets.List(datasets.Value("int32"))
    columns = {"input_ids": ints, "labels": ints, "status": datasets.Value("string")}
    columns["num_targets"] = datasets.Value("int32")
    assert on_disk.features == datasets.Features(columns | ({"position_ids": ints} if packing else {}))
    rows = datasets.load_from_disk(str(dm._cache_entry() / "val" / "rows"))
    assert [json.loads(r) for r in rows["json"]] == expected["val"].rows


def test_without_a_cache_dir_the_splits_are_still_arrow_backed(tokenizer, chatml, data_file):
    dm = SFTDataModule(tokenizer, chatml, str(data_file), cache_dir=None, max_length=40)
    dm.setup()
    assert isinstance(dm.splits["train"].examples, cache.ArrowExamples)
    assert (
        dm.splits["train"].examples[-1] == dm.splits["train"].examples[len(dm.splits["train"].examples) - 1]
    )


def test_workers_encode_exactly_what_one_process_does(tokenizer, chatml):
    convs = [conv(i)["messages"] for i in range(23)]
    kwargs = {"max_length": 18, "truncation": "drop", "train_on": "all_assistant"}
    chunks = list(pipeline.encoded_chunks(convs, chatml, tokenizer, num_proc=2, chunk_size=5, **kwargs))
    assert [sum(counted.values()) for counted, *_ in chunks] == [5, 5, 5, 5, 3]
    reference = encode_conversations(convs, chatml, tokenizer, **kwargs)
    kept = [(e, c) for e, c in zip(reference, convs, strict=True) if not e.dropped]
    assert 0 < len(kept) < len(convs)
    assert sum((counted for counted, *_ in chunks), Counter()) == Counter(e.status for e in reference)
    examples = [row for _, table, *_ in chunks for row in table.to_pylist()]
    assert [(r["input_ids"], r["labels"], r["status"]) for r in examples] == [
        (e.input_ids, e.labels, e.status) for e, _ in kept
    ]
    rows = [json.loads(row["json"]) for _, _, table, _ in chunks for row in table.to_pylist()]
    assert rows == [c for _, c in kept]


def test_with_two_workers_strict_mode_names_the_first_bad_line_and_lenient_counts_add_up(
    tokenizer, chatml, tmp_path, monkeypatch
):
    monkeypatch.setattr(pipeline, "CHUNK", 4)  # several chunks, so the workers really share the split
    lines = [json.dumps(conv(i)) for i in range(30)]
    lines[13] = "{not json"
    lines[21] = json.dumps({"messages": [{"role": "user", "content": "no answer"}], "x": 1})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cache_dir = tmp_path / "cache"
    strict = SFTDataModule(tokenizer, chatml, str(path), cache_dir=str(cache_dir), max_length=40, num_proc=2)
    with pytest.raises(DataError, match=rf"{path}:14\b.*invalid JSON"):
        strict.setup()
    assert [p.name for p in cache_dir.iterdir() if not p.name.startswith(".digests")] == []  # no half entry

    def lenient_with(num_proc: int) -> SFTDataModule:
        dm = SFTDataModule(
            tokenizer, chatml, str(path), cache_dir=None, max_length=20, num_proc=num_proc, on_error="skip",
            max_drop_ratio=1,
        )  # fmt: skip
        dm.setup()
        return dm

    lenient = lenient_with(2)
    c = lenient.counts()["train"]
    assert c["rows"] == 30 and c["skipped"]["bad_json"] == 1 and sum(c["skipped"].values()) == 2
    assert c["rows"] == c["kept"] + sum(c["dropped"].values()) + sum(c["skipped"].values())
    assert c["kept"] > 0 and c["truncated"] > 0
    one_process = lenient_with(1)
    assert one_process.counts() == lenient.counts()
    assert list(one_process.splits["train"].examples) == list(lenient.splits["train"].examples)


class Record(pl.Callback):
    def __init__(self) -> None:
        self.indices, self.losses = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.indices.append(batch["index"].tolist())
        self.losses.append(float(outputs["loss"]))


def train(dm, tiny_cfg, tiny_model_dir) -> tuple[Record, dict]:
    torch.manual_seed(0)
    model = LoRA(r=4, lora_alpha=8, lora_dropout=0.0).apply(load_model(tiny_cfg.model, tiny_model_dir))
    module = SFTModule(model, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    record = Record()
    trainer = quiet_trainer([record], max_steps=4, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    return record, {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_training_on_arrow_gives_the_in_memory_sample_ids_losses_and_adapter(
    tokenizer, chatml, data_file, tmp_path, tiny_cfg, tiny_model_dir
):
    settings = {"batch_size": 3, "group_by_length": True, "max_drop_ratio": 0.5}
    on_arrow = arrow(data_file, tokenizer, chatml, tmp_path / "cache", **settings)
    in_lists = arrow(data_file, tokenizer, chatml, tmp_path / "cache", **settings)
    in_lists.splits = in_memory(data_file, tokenizer, chatml, packing=False)
    a, adapter_a = train(on_arrow, tiny_cfg, tiny_model_dir)
    b, adapter_b = train(in_lists, tiny_cfg, tiny_model_dir)
    assert len(a.indices) == 4 and a.indices == b.indices
    assert a.losses == b.losses
    assert adapter_a.keys() == adapter_b.keys()
    assert all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)


def test_a_remembered_file_digest_is_reused_until_the_file_changes_even_with_size_and_mtime_kept(
    tmp_path, monkeypatch
):
    path, memo = tmp_path / "train.jsonl", tmp_path / "cache" / ".digests"
    path.write_text('{"a": 1}\n')
    fresh = cache.file_digest(path, memo)
    assert fresh == cache.file_digest(path) and not memo.exists()  # changed just now: not remembered
    monkeypatch.setattr(cache, "RACY_NS", 0)
    assert cache.file_digest(path, memo) == fresh and len(list(memo.iterdir())) == 1
    hash_file = cache._hash_file

    def forbidden(p):
        raise AssertionError("a remembered digest must not read the file again")

    monkeypatch.setattr(cache, "_hash_file", forbidden)
    assert cache.file_digest(path, memo) == fresh
    stat = path.stat()
    time.sleep(0.05)  # past a coarse timestamp tick
    path.write_text('{"a": 2}\n')  # same size; the mtime is set back: only the ctime tells
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    monkeypatch.setattr(cache, "_hash_file", hash_file)
    assert cache.file_digest(path, memo) == cache.file_digest(path) != fresh
