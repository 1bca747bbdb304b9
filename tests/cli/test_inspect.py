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


# ---- acceptance: a tool-calling and a reasoning dataset train end to end, and inspect shows their spans ----
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def tool_row(i: int) -> dict:
    """One OpenAI-format tool-calling conversation: schemas, a call (content null), its result, the answer."""
    return {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": f"Weather in city {i}?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call{i:05d}",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": json.dumps({"city": f"c{i}"})},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": f"call{i:05d}", "content": json.dumps({"temp_c": i})},
            {"role": "assistant", "content": f"{i} degrees."},
        ],
    }


def reasoning_row(i: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"{i}+{i}?"},
            {"role": "assistant", "content": f"<think>\nDouble {i}.\n</think>\n\n{2 * i}"},
            {"role": "user", "content": f"Half of {i}?"},
            {"role": "assistant", "content": f"<think>\nHalve {i}.\n</think>\n\n{i / 2}"},
        ]
    }


def train_and_inspect(
    tmp_path, rows: list[dict], overrides: list[str], capsys, rich: bool = True
) -> tuple[dict, dict, str]:
    """Train in-process (sftlab-train's run) on `rows`, then `sftlab-inspect format=jsonl` the same config:
    returns (metrics.json, the first inspected example, the rich view of it)."""
    from sftlab import build
    from sftlab.cli.train import run

    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = [
        "model=tiny_random",
        "data=jsonl",
        f"data.train_path={tmp_path / 'train.jsonl'}",
        f"data.val_path={tmp_path / 'val.jsonl'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_length=512",
        *overrides,
    ]
    run_dir = tmp_path / "run"
    cfg = build.compose(
        [*data, "experiment=smoke", "eval=none", "trainer.max_steps=2", "trainer.val_check_interval=2"],
        output_dir=run_dir,
    )
    loss = run(cfg)
    assert loss == loss and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    capsys.readouterr()
    main([*data, "format=jsonl", "n=1"])
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    if not rich:
        return metrics, record, ""
    main([*data, "n=1"])  # the rich view lists the same spans by kind, readable without colours
    return metrics, record, capsys.readouterr().out


def spans_text(record: dict, tokenizer) -> list[tuple[str, bool, str]]:
    ids = record["input_ids"]
    return [(s["kind"], s["trained"], tokenizer.decode(ids[s["start"] : s["end"]])) for s in record["spans"]]


def test_tool_calling_dataset_trains_and_inspect_shows_calls_and_results(tmp_path, capsys, tokenizer):
    metrics, record, rich = train_and_inspect(
        tmp_path, [tool_row(i) for i in range(8)], ["template=mistral"], capsys
    )
    assert (
        "tool_call (trained): '[TOOL_CALLS]" in rich and "tool_result (not trained): '[TOOL_RESULTS]" in rich
    )
    assert "tools (not trained): '[AVAILABLE_TOOLS]" in rich
    assert metrics["data"]["train"]["kept"] == 8 and metrics["data"]["train"]["skipped"] == {}
    spans = [s for s in spans_text(record, tokenizer) if s[0] != "text" or s[1]]
    assert spans == [
        (
            "tools",
            False,
            '[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "get_weather", '
            '"description": "Current weather of a city", "parameters": {"type": "object", "properties": '
            '{"city": {"type": "string"}}, "required": ["city"]}}}][/AVAILABLE_TOOLS]',
        ),
        (
            "tool_call",
            True,
            '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "c0"}, "id": "call00000"}]',
        ),
        ("text", True, "</s>"),
        (
            "tool_result",
            False,
            '[TOOL_RESULTS] {"content": {"temp_c": 0}, "call_id": "call00000"}[/TOOL_RESULTS]',
        ),
        ("text", True, " 0 degrees.</s>"),
    ]


@pytest.mark.parametrize("vocabulary", ["smollm2", pytest.param("qwen3", marks=pytest.mark.slow)])
def test_reasoning_dataset_trains_and_inspect_shows_reasoning(vocabulary, tmp_path, capsys, tokenizer):
    """On SmolLM2's vocabulary `<think>` is text; on Qwen's (slow: a 151k-token vocabulary) it is the model's
    own added token. Either way the same spans are trained."""
    from tests.helpers import vendor_tokenizers as vendor

    overrides = ["template=chatml"]
    if vocabulary == "qwen3":
        tokenizer = vendor.qwen3()
        overrides.append(f"model.tokenizer_name_or_path={vendor.qwen3_dir()}")
    metrics, record, rich = train_and_inspect(
        tmp_path, [reasoning_row(i) for i in range(1, 9)], overrides, capsys, rich=vocabulary == "smollm2"
    )
    assert metrics["data"]["train"]["kept"] == 8
    trained = [s for s in spans_text(record, tokenizer) if s[1]]
    # keep_last (the default): the last answer's reasoning is trained, the first answer's is dropped.
    assert trained == [
        ("text", True, "2<|im_end|>"),
        ("reasoning", True, "<think>\nHalve 1.\n</think>\n\n"),
        ("text", True, "0.5<|im_end|>"),
    ]
    assert "Double 1." not in tokenizer.decode(record["input_ids"])
    if vocabulary == "qwen3":
        assert tokenizer.convert_tokens_to_ids("<think>") in record["input_ids"]
    else:
        assert "reasoning (trained): '<think>\\nHalve 1.\\n</think>\\n\\n'" in rich
