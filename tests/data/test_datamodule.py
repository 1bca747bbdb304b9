"""SFTDataModule: cache, truncation and drop counts, validation split, de-duplication, mixtures, text."""

from __future__ import annotations

import copy
import json
import logging

import pytest
from hydra.utils import instantiate

from sftlab import build
from sftlab.data import datamodule as dm_module
from sftlab.data import pipeline
from sftlab.data.collate import Examples, collate
from sftlab.data.datamodule import SFTDataModule
from sftlab.data.tokenize import IGNORE_INDEX
from sftlab.errors import ConfigError, DataError


def conv(i: int, answer_words: int = 3) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"Question number {i}?"},
            {"role": "assistant", "content": " ".join(["word"] * answer_words) + f" {i}."},
        ]
    }


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make(tokenizer, template, path, **kwargs) -> SFTDataModule:
    kwargs.setdefault("cache_dir", None)
    kwargs.setdefault("max_length", 256)
    return SFTDataModule(tokenizer, template, path, **kwargs)


def test_second_run_is_a_cache_hit_and_does_no_tokenizing(tokenizer, chatml, tmp_path, monkeypatch, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", [conv(i) for i in range(20)])
    first = make(tokenizer, chatml, path, cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    first.setup()

    def forbidden(*args, **kwargs):
        raise AssertionError("the cached run must not read or tokenize")

    monkeypatch.setattr(pipeline, "encode_conversations", forbidden)
    monkeypatch.setattr(dm_module, "raw_chunks", forbidden)
    second = make(tokenizer, chatml, path, cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    with caplog.at_level(logging.INFO, logger="sftlab.data.datamodule"):
        second.setup()
    assert "data cache hit" in caplog.text
    assert second.counts() == first.counts()
    for split in ("train", "val"):
        assert second.splits[split].examples == first.splits[split].examples
        assert second.splits[split].rows == first.splits[split].rows


def test_any_change_invalidates_the_cache(tokenizer, chatml, tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [conv(i) for i in range(5)])
    base = {"cache_dir": str(tmp_path / "cache")}
    key = make(tokenizer, chatml, str(path), **base)._cache_entry()
    assert make(tokenizer, chatml, str(path), **base)._cache_entry() == key  # stable
    llama3 = instantiate(build.compose(["template=llama3"]).template, _convert_="all")
    other_tokenizer = copy.deepcopy(tokenizer)
    other_tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    variants = [
        make(tokenizer, chatml, str(path), max_length=128, **base),
        make(tokenizer, chatml, str(path), truncation="drop", **base),
        make(tokenizer, chatml, str(path), train_on="last_assistant", **base),
        make(tokenizer, chatml, str(path), reasoning="drop", **base),
        make(tokenizer, chatml, str(path), packing=True, **base),
        make(tokenizer, llama3, str(path), **base),
        make(other_tokenizer, chatml, str(path), **base),
    ]
    keys = {v._cache_entry() for v in variants}
    assert key not in keys and len(keys) == len(variants)
    write_jsonl(path, [conv(i) for i in range(6)])  # edit the data
    assert make(tokenizer, chatml, str(path), **base)._cache_entry() != key


def test_truncation_and_drops_are_counted_by_reason(tokenizer, chatml, tmp_path):
    rows = [conv(0), conv(1, answer_words=200), conv(2)]
    long_prompt = [{"role": "user", "content": "long " * 300}, {"role": "assistant", "content": "ok"}]
    rows.append({"messages": long_prompt})
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    truncated = make(tokenizer, chatml, path, max_length=64, max_drop_ratio=0.5)
    truncated.setup()
    assert truncated.counts()["train"] == {
        "rows": 4,
        "kept": 3,
        "truncated": 1,
        "dropped": {"no_targets_after_truncation": 1},
        "skipped": {},
        "chat_markers": 0,
    }
    assert max(len(e.input_ids) for e in truncated.splits["train"].examples) == 64
    dropped = make(tokenizer, chatml, path, max_length=64, truncation="drop", max_drop_ratio=0.5)
    dropped.setup()
    assert dropped.counts()["train"]["dropped"] == {"too_long": 2}
    with pytest.raises(DataError, match="2 of 4 rows were dropped or skipped"):
        make(tokenizer, chatml, path, max_length=64, truncation="drop").setup()


def test_val_fraction_is_seeded_and_disjoint(tokenizer, chatml, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [conv(i) for i in range(40)])
    a = make(tokenizer, chatml, path, val_fraction=0.25, seed=1)
    b = make(tokenizer, chatml, path, val_fraction=0.25, seed=1)
    c = make(tokenizer, chatml, path, val_fraction=0.25, seed=2)
    for d in (a, b, c):
        d.setup()
    assert len(a.splits["val"].rows) == 10 and len(a.splits["train"].rows) == 30
    assert a.splits["val"].rows == b.splits["val"].rows != c.splits["val"].rows
    as_text = {json.dumps(r) for r in a.splits["train"].rows}
    assert not as_text & {json.dumps(r) for r in a.splits["val"].rows}


def test_dedupe_drops_exact_duplicates_and_counts_them(tokenizer, chatml, tmp_path):
    rows = [conv(0), conv(1), conv(0), conv(2), conv(1)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    d = make(tokenizer, chatml, path, dedupe=True)
    d.setup()
    expected = {
        "rows": 5,
        "kept": 3,
        "truncated": 0,
        "dropped": {"duplicate": 2},
        "skipped": {},
        "chat_markers": 0,
    }
    assert d.counts()["train"] == expected


def test_weighted_mixture(tokenizer, chatml, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [conv(i) for i in range(4)])
    b = write_jsonl(tmp_path / "b.jsonl", [conv(100 + i) for i in range(10)])
    d = make(tokenizer, chatml, [{"path": a, "weight": 2}, {"path": b, "weight": 0.5}])
    d.setup()
    rows = d.splits["train"].rows
    from_a = [r for r in rows if int(r[0]["content"].split()[-1].rstrip("?")) < 100]
    assert len(rows) == 4 * 2 + 5 and len(from_a) == 8
    with pytest.raises(ConfigError, match="weight"):
        make(tokenizer, chatml, [{"path": a, "weight": -1}])


def test_text_format_trains_every_token_and_eos(tokenizer, chatml, tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "Continued pre-training on plain text."}])
    d = make(tokenizer, chatml, path)
    d.setup()
    ex = d.splits["train"].examples[0]
    assert ex.labels[0] == IGNORE_INDEX and ex.labels[1:] == ex.input_ids[1:]
    assert ex.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex.input_ids) == "Continued pre-training on plain text." + tokenizer.eos_token


def test_collate_trains_eos_but_never_padding_when_pad_is_eos(tokenizer, chatml, tmp_path):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    path = write_jsonl(tmp_path / "train.jsonl", [conv(0, 1), conv(1, 30)])
    d = make(tokenizer, chatml, path)
    d.setup()
    batch = collate([Examples(d.splits["train"].examples)[i] for i in range(2)], tokenizer.pad_token_id)
    short = batch["attention_mask"][0].sum()
    assert batch["input_ids"][0, short:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"][0, short:].eq(IGNORE_INDEX).all()
    eos_positions = (batch["input_ids"][0, :short] == tokenizer.eos_token_id).nonzero().flatten()
    user_end, assistant_end = eos_positions.tolist()
    assert batch["labels"][0, assistant_end] == tokenizer.eos_token_id
    assert batch["labels"][0, user_end] == IGNORE_INDEX


def test_bad_settings_fail_before_any_work(tokenizer, chatml, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [conv(0)])
    with pytest.raises(ConfigError, match="on_error"):
        make(tokenizer, chatml, path, on_error="ignore")
    with pytest.raises(ConfigError, match=r"packing=true needs data\.max_length"):
        make(tokenizer, chatml, path, packing=True, max_length=None)
    with pytest.raises(ConfigError, match=r"data\.reasoning='last'.*keep_last"):
        make(tokenizer, chatml, path, reasoning="last")


def test_a_damaged_cache_entry_is_rebuilt(tokenizer, chatml, tmp_path, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", [conv(i) for i in range(5)])
    first = make(tokenizer, chatml, path, cache_dir=str(tmp_path / "cache"))
    first.setup()
    expected = list(first.splits["train"].examples)  # read before the file under its memory map is damaged
    (first._cache_entry() / "train" / "examples" / "data-00000-of-00001.arrow").write_bytes(b"not arrow")
    again = make(tokenizer, chatml, path, cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="sftlab.data.cache"):
        again.setup()
    assert "unreadable" in caplog.text and again.splits["train"].examples == expected
    caplog.clear()
    third = make(tokenizer, chatml, path, cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="sftlab.data"):
        third.setup()
    assert "data cache hit" in caplog.text  # the damaged entry was replaced


def test_cache_key_ignores_the_tokenizers_transient_padding_state(tokenizer, chatml, tmp_path):
    """transformers leaves padding switched on in the Rust tokenizer after a padded call; found when a test
    that pads a batch ran before the cache-hit test."""
    path = write_jsonl(tmp_path / "train.jsonl", [conv(i) for i in range(3)])
    key = make(tokenizer, chatml, path, cache_dir=str(tmp_path / "cache"))._cache_entry()
    tokenizer(["a", "a longer text"], padding=True)
    assert make(tokenizer, chatml, path, cache_dir=str(tmp_path / "cache"))._cache_entry() == key
    tokenizer("a")  # back to no padding
