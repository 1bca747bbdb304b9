"""The pipeline's scale pieces: dedupe over 16-byte keys and the seeded split over positions choose exactly
what the list functions choose; workers keep a bounded number of tasks in flight."""

from __future__ import annotations

import itertools
import json

from sftlab.data import pipeline
from sftlab.data.pipeline import Workers, convert_chunk, dedupe, first_occurrences, split_indices, split_off


def conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"q{i % 7}"}, {"role": "assistant", "content": f"a{i % 5}"}]


def test_dedupe_by_keys_and_split_by_positions_choose_what_the_list_functions_choose(tmp_path):
    convs = [conversation(i) for i in range(60)]  # 35 distinct, repeats interleaved
    rows = [(f"f:{i}", {"messages": c}) for i, c in enumerate(convs)]
    _, texts, keys = convert_chunk((None, rows), None, {}, "raise", keys=True)
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
