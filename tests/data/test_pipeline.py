"""The pipeline's scale pieces: dedupe over 16-byte keys and the seeded split over positions choose exactly
what the list functions choose; workers keep a bounded number of tasks in flight."""

from __future__ import annotations

import itertools
import json
import math
import os
import time

import pytest

from sftlab.data import pipeline
from sftlab.data.pipeline import Workers, convert_chunk, dedupe, first_occurrences, split_indices, split_off


def conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"q{i % 7}"}, {"role": "assistant", "content": f"a{i % 5}"}]


def test_dedupe_by_keys_and_split_by_positions_choose_what_the_list_functions_choose(tmp_path):
    convs = [conversation(i) for i in range(60)]  # 35 distinct, repeats interleaved
    rows = [(f"f:{i}", {"messages": c}) for i, c in enumerate(convs)]
    _, texts, keys = convert_chunk((None, 0, rows), None, {}, "raise", keys=True)
    assert [json.loads(t) for t in texts] == convs and len(keys) == 16 * len(convs)
    kept = first_occurrences(keys)
    unique, duplicates = dedupe(convs)
    assert [convs[i] for i in kept] == unique and len(convs) - len(kept) == duplicates == 25
    train, val = split_indices(len(unique), 0.3, seed=4)
    ref_train, ref_val = split_off(unique, 0.3, 4)
    assert [unique[i] for i in train] == ref_train and [unique[i] for i in val] == ref_val
    assert len(val) == 10 and sorted([*train, *val]) == list(range(len(unique)))


def test_workers_keep_at_most_two_tasks_per_worker_in_flight_and_results_in_order():
    pulled = []

    def tasks():
        for k in itertools.count():
            if k == 50:
                return
            pulled.append(k)
            yield -k

    with Workers(2) as workers:
        results = workers.map(abs, tasks())
        assert next(results) == 0
        assert len(pulled) == 4  # not the whole stream queued ahead
        assert list(results) == list(range(1, 50))
    with Workers(2) as workers:  # a single task runs in this process: no pool forked for it
        assert list(workers.map(abs, iter([-3]))) == [3] and workers.pool is None
    assert pipeline._job == {}


def _pid(task: int) -> int:
    if task < 0:
        raise ValueError(task)
    time.sleep(task / 1000)
    return os.getpid()


def _alive(pid: int) -> bool:
    """Running, or exited but not yet reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_exit_by_themselves_after_the_last_result_and_are_stopped_at_once_on_an_error():
    with Workers(2) as workers:
        pids = set(workers.map(_pid, iter(range(8))))
    assert pids and os.getpid() not in pids  # ran in forked workers
    deadline = time.monotonic() + 30  # a bound on a hang, not a speed: they take milliseconds
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(map(_alive, pids))  # exited and reaped: no process left behind

    pids = set()
    with pytest.raises(ValueError), Workers(2) as workers:
        for pid in workers.map(_pid, iter([0, 1, 2, -3, 900, 900, 900, 900])):
            pids.add(pid)
    assert pids and not any(map(_alive, pids))  # stopped, not left to finish their 0.9 s tasks


def test_the_json_text_of_a_conversation_reads_back_as_exactly_that_conversation():
    """orjson where its text reads back the same; a tool call's non-finite float and a 70-bit integer
    (orjson would write null and refuse) through the standard library. Key order is kept, or sorted for
    dedupe."""
    plain = [{"role": "user", "content": 'é "q"\u2028\n\t'}, {"content": "a", "role": "assistant"}]
    nan = [{"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {"x": math.inf}}]}]
    big = [{"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {"n": 2**70}}]}]
    for conv in (plain, nan, big, "a plain-text document"):
        text = pipeline.to_json(conv)
        assert isinstance(text, bytes) and json.loads(text) == conv, conv
        assert repr(json.loads(text)) == repr(conv)  # same key order, same number types
        assert json.loads(pipeline.to_json(conv, sort_keys=True)) == conv
    assert pipeline.to_json(plain[1:], sort_keys=True) == b'[{"content":"a","role":"assistant"}]'
    assert pipeline.to_json(plain[1:]) == b'[{"content":"a","role":"assistant"}]'
    unsorted = [{"role": "a", "content": "b"}]
    assert pipeline.to_json(unsorted, sort_keys=True) == b'[{"content":"b","role":"a"}]'


def test_a_chunk_converted_and_encoded_in_one_task_gives_what_the_two_steps_give(tmp_path, tokenizer, chatml):
    """Splits without dedupe or a seeded split skip the JSON round trip: same statuses, examples, rows and
    skips as converting first and encoding the JSON texts after."""
    lines = [json.dumps({"messages": conversation(i)}) for i in range(12)]
    lines[3] = "{not json"
    lines[7] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    lines[9] = json.dumps({"messages": [*conversation(9), {"role": "user", "content": "x " * 40}]})
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    chunk = (path, 1, [line.encode() + b"\n" for line in lines])
    kwargs = {"max_length": 30, "truncation": "drop", "train_on": "all_assistant", "reasoning": "keep_last"}
    skipped, texts, _ = convert_chunk(chunk, None, {}, "skip", keys=False)
    two_steps = pipeline.encode_chunk(texts, chatml, tokenizer, ("<|im_end|>",), **kwargs)
    one_task = pipeline.convert_encode_chunk(chunk, (None, {}, "skip"), chatml, tokenizer, ("x",), **kwargs)
    assert one_task[0] == skipped == {"bad_json": 1, "no_assistant": 1}
    assert one_task[1] == two_steps[0] == {"kept": 9, "too_long": 1}
    assert one_task[2].equals(two_steps[1]) and one_task[3].equals(two_steps[2])
    assert one_task[3].column("json").to_pylist() == [t.decode() for k, t in enumerate(texts) if k != 7]
    assert (two_steps[3], one_task[4]) == (0, 1)  # no row holds "<|im_end|>"; one holds "x"


def test_rows_with_markers_counts_the_rows_whose_content_holds_one():
    rows = [
        [{"role": "user", "content": "<|im_end|> twice <|im_end|>"}, {"role": "assistant", "content": "ok"}],
        [{"role": "user", "content": "end with <|im"}, {"role": "assistant", "content": "_end|> here"}],
        "a document with <|im_start|> in it",
        [{"role": "user", "content": "plain"}, {"role": "assistant", "content": None}],
    ]
    markers = ("<|im_end|>", "<|im_start|>")
    assert pipeline.rows_with_markers(rows, markers) == 2  # a marker split across two messages is none
    assert pipeline.rows_with_markers(rows[1:2] + rows[3:], markers) == 0
    assert pipeline.rows_with_markers(rows, ()) == 0
