"""Formats, field mapping and bad rows: strict mode names the first bad line; lenient counts every row."""

from __future__ import annotations

import json

import pytest

from sftlab.data.datamodule import SFTDataModule
from sftlab.data.formats import BadRow, to_messages
from sftlab.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}

# 20 lines: good rows, one blank line and one bad row per failure mode, with the reason each must get.
LINES: list[tuple[bytes, str | None]] = [
    (b"\xef\xbb\xbf" + json.dumps(GOOD).encode(), None),  # BOM on the first line
    (b'{"messages": [', "bad_json"),
    (json.dumps({"instruction": "Say hi"}).encode(), "missing_field"),
    (json.dumps({"prompt": "2+2?", "completion": 4}).encode(), "wrong_type"),
    (
        json.dumps(
            {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}
        ).encode(),
        "empty_content",
    ),
    (
        json.dumps(
            {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}
        ).encode(),
        "unknown_role",
    ),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "no_assistant"),
    (b'{"prompt": "bad \\ud800 here", "completion": "x"}', "invalid_unicode"),
    (b"   ", None),  # blank: not a row
    (b"[1, 2]", "not_an_object"),
    (json.dumps({"foo": "bar"}).encode(), "unknown_format"),
    (
        json.dumps(
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
        ).encode(),
        None,
    ),
    (json.dumps({"conversations": [{"from": "alien", "value": "Q"}]}).encode(), "unknown_role"),
    (json.dumps({"instruction": "Add", "input": "1 and 2", "output": "3"}).encode(), None),
    (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                    {"role": "assistant", "content": "x"},
                ]
            }
        ).encode(),
        "wrong_type",
    ),
    (json.dumps({"text": "A plain document for continued pre-training."}).encode(), None),
    (b'{"prompt": "caf\xe9", "completion": "x"}', "invalid_unicode"),  # latin-1 byte: not UTF-8
    (json.dumps({"messages": "not a list"}).encode(), "wrong_type"),
    (json.dumps({"prompt": "Capital of France?", "completion": "Paris"}).encode(), None),
    (
        json.dumps({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}).encode(),
        "missing_field",
    ),
]


def write(path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\r\n" for line in lines))  # CRLF line endings
    return str(path)


def datamodule(tokenizer, chatml, path, **kwargs) -> SFTDataModule:
    return SFTDataModule(tokenizer, chatml, path, max_length=256, cache_dir=None, **kwargs)


def test_the_file_has_twenty_lines_of_every_kind():
    assert len(LINES) == 20
    assert {r for _, r in LINES if r} == {
        "bad_json",
        "missing_field",
        "wrong_type",
        "empty_content",
        "unknown_role",
        "no_assistant",
        "invalid_unicode",
        "not_an_object",
        "unknown_format",
    }


def test_strict_mode_names_the_first_bad_line(tokenizer, chatml, tmp_path):
    path = write(tmp_path / "bad.jsonl", [line for line, _ in LINES])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON .*on_error=skip"):
        datamodule(tokenizer, chatml, path).setup()


@pytest.mark.parametrize("lineno", [i + 1 for i, (_, r) in enumerate(LINES) if r])
def test_strict_mode_names_each_bad_line_with_reason_and_fix(tokenizer, chatml, tmp_path, lineno):
    line, _ = LINES[lineno - 1]
    path = write(tmp_path / "one.jsonl", [json.dumps(GOOD).encode()] * (lineno - 1) + [line])
    with pytest.raises(DataError) as err:
        datamodule(tokenizer, chatml, path).setup()
    message = str(err.value)
    assert f"one.jsonl:{lineno}: " in message
    fixes = ("Fix", "Add", "Store", "Remove", "Re-encode", "allowed", "set data")
    assert any(word in message for word in fixes)


def test_lenient_mode_counts_add_up_to_the_non_blank_lines(tokenizer, chatml, tmp_path):
    path = write(tmp_path / "bad.jsonl", [line for line, _ in LINES])
    dm = datamodule(tokenizer, chatml, path, on_error="skip", max_drop_ratio=1.0)
    dm.setup()
    counts = dm.counts()["train"]
    expected_skips: dict[str, int] = {}
    for _, reason in LINES:
        if reason:
            expected_skips[reason] = expected_skips.get(reason, 0) + 1
    assert counts["skipped"] == expected_skips
    non_blank = sum(1 for line, _ in LINES if line.strip())
    assert counts["rows"] == non_blank == 19
    assert counts["kept"] + sum(counts["dropped"].values()) + sum(counts["skipped"].values()) == non_blank
    assert counts["kept"] == 5
    contents = [m["content"] for conv in dm.splits["train"].rows if isinstance(conv, list) for m in conv]
    assert contents and all("\r" not in c for c in contents)  # CRLF line endings left nothing behind


def test_too_many_skipped_rows_stop_the_run(tokenizer, chatml, tmp_path):
    path = write(tmp_path / "bad.jsonl", [line for line, _ in LINES])
    with pytest.raises(DataError, match=r"14 of 19 rows were dropped or skipped.*max_drop_ratio=0.1"):
        datamodule(tokenizer, chatml, path, on_error="skip").setup()


def test_formats_and_field_mapping():
    assert to_messages(
        {"question": "Q?", "answer": "A."}, "alpaca", "f:1", {"instruction": "question", "output": "answer"}
    ) == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    assert to_messages(
        {"chat": [{"speaker": "user", "text": "Q"}, {"speaker": "assistant", "text": "A"}]},
        None,
        "f:1",
        {"messages": "chat", "role": "speaker", "content": "text"},
    ) == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert to_messages(
        {"instruction": "Do", "input": "this", "output": "ok", "system": "Be terse."}, None, "f:1"
    ) == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Do\n\nthis"},
        {"role": "assistant", "content": "ok"},
    ]
    assert to_messages(
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "Q"},
                {"from": "gpt", "value": "A"},
                {"from": "observation", "value": "T"},
                {"from": "gpt", "value": "B"},
            ]
        },
        None,
        "f:1",
    ) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
        {"role": "tool", "content": "T"},
        {"role": "assistant", "content": "B"},
    ]
    assert to_messages({"text": "doc"}, None, "f:1") == "doc"


def test_wrong_types_are_never_coerced():
    with pytest.raises(BadRow, match="must be a string, but it is a int") as err:
        to_messages({"prompt": "2+2", "completion": 4}, None, "f:3")
    assert err.value.reason == "wrong_type" and str(err.value).startswith("f:3: ")


def test_json_csv_and_parquet_sources(tokenizer, chatml, tmp_path):
    rows = [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(4)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("prompt,completion\r\n" + "".join(f'"Q{i}","A{i}"\r\n' for i in range(4)))
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    texts = {}
    for suffix in ("json", "csv", "parquet"):
        dm = datamodule(tokenizer, chatml, str(tmp_path / f"d.{suffix}"))
        dm.setup()
        texts[suffix] = dm.splits["train"].rows
    assert texts["json"] == texts["csv"] == texts["parquet"] and len(texts["json"]) == 4


def test_csv_rows_name_their_line(tokenizer, chatml, tmp_path):
    (tmp_path / "d.csv").write_text('prompt,completion\n"Q1","A1"\n"multi\nline","A2"\n"Q3",""\n')
    with pytest.raises(DataError, match=r"d\.csv:5: field 'completion' is empty"):
        datamodule(tokenizer, chatml, str(tmp_path / "d.csv")).setup()


def test_missing_local_file(tokenizer, chatml, tmp_path):
    with pytest.raises(DataError, match="file not found"):
        datamodule(tokenizer, chatml, str(tmp_path / "nope.jsonl")).setup()


# Slow: conftest sets HF_HUB_OFFLINE after huggingface_hub reads it, so this waits on network timeouts.
@pytest.mark.slow
def test_unreachable_hub_id(tokenizer, chatml):
    # Not a local file: treated as a hub dataset id; unreachable, it fails with advice.
    with pytest.raises(DataError, match=r"train_path='nobody/no-such-dataset': cannot load it with datasets"):
        datamodule(tokenizer, chatml, "nobody/no-such-dataset").setup()


# ---- tool calls (OpenAI format) ---------------------------------------------------------------------------
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_openai_tool_calling_row_is_read_with_schemas_calls_and_ids():
    row = {
        "tools": [WEATHER_TOOL],
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call12345",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call12345", "content": '{"temp_c": 18}'},
            {"role": "assistant", "content": "18 °C."},
        ],
    }
    assert to_messages(row, None, "f:1") == [
        {"role": "tools", "content": json.dumps([WEATHER_TOOL])},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call12345",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "content": '{"temp_c": 18}', "tool_call_id": "call12345"},
        {"role": "assistant", "content": "18 °C."},
    ]


def test_sharegpt_function_call_turns_become_tool_calls():
    row = {
        "tools": json.dumps([WEATHER_TOOL["function"]]),  # LLaMA-Factory stores bare schemas as a JSON string
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": "18"},
            {"from": "gpt", "value": "18 °C."},
        ],
    }
    messages = to_messages(row, None, "f:1")
    assert messages[0] == {"role": "tools", "content": json.dumps([WEATHER_TOOL])}
    assert messages[2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    }
    assert messages[3] == {"role": "tool", "content": "18"}


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"role": "assistant", "content": None}, "missing_field"),  # no content and no tool calls
        (
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]},
            "missing_field",
        ),
        (
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}],
            },
            "wrong_type",
        ),
        (
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
            },
            "wrong_type",
        ),
        ({"role": "assistant", "content": [{"type": "image_url"}]}, "wrong_type"),
    ],
)
def test_bad_tool_calls_are_rejected_with_a_reason(message, reason):
    with pytest.raises(BadRow) as err:
        to_messages({"messages": [{"role": "user", "content": "q"}, message]}, None, "f:3")
    assert err.value.reason == reason
