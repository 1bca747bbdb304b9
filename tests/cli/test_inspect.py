"""sftlab-inspect: the same conf/ and pipeline as training; a rich view and a JSONL dump of examples."""

from __future__ import annotations

import json

import pytest

from sftlab.cli.inspect import main
from sftlab.data.tokenize import IGNORE_INDEX


@pytest.fixture
def data_file(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Hi {i}"},
                {"role": "assistant", "content": f"Hello {i}!"},
            ]
        }
        for i in range(5)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def base(data_file, tmp_path):
    return [
        "model=tiny_random",
        "data=jsonl",
        f"data.train_path={data_file}",
        "data.val_fraction=0",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]


def test_jsonl_dump_has_ids_labels_and_positions_when_packing(data_file, tmp_path, capsys, tokenizer):
    main([*base(data_file, tmp_path), "data.packing=true", "data.max_length=64", "format=jsonl"])
    out = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in out]
    assert records and all({"input_ids", "labels", "position_ids"} <= set(r) for r in records)
    pairs = [(t, lab) for r in records for t, lab in zip(r["input_ids"], r["labels"], strict=True)]
    trained = [t for t, lab in pairs if lab != IGNORE_INDEX]
    assert sum(r["position_ids"].count(0) for r in records) == 5  # five examples, each restarting at 0
    # Exactly the five responses and their end-of-turn tokens are trained (packing reorders them).
    assert sorted(tokenizer.decode(trained).split("<|im_end|>")) == ["", *(f"Hello {i}!" for i in range(5))]


def test_rich_view_shows_counts_and_examples(data_file, tmp_path, capsys):
    main([*base(data_file, tmp_path), "n=2"])
    out = capsys.readouterr().out
    assert "what happened to every row" in out and "Hello 0!<|im_end|>" in out and "Hello 1!" in out
    assert "Hello 2!" not in out  # n=2


def test_bad_option_is_one_message(data_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*base(data_file, tmp_path), "format=xml"])
    assert exit_info.value.code == 2 and "format='xml'" in capsys.readouterr().err
