"""The data audit on crafted splits whose every duplicate, near-duplicate, leak, conflict, long row and
quality problem is known: each is found, each count is exact, and nothing else is flagged."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from sftlab.data.audit import (
    AuditSettings,
    Signatures,
    audit_splits,
    diversity,
    evaluate,
    near_pairs_within,
    parse_checks,
    read_splits,
    view,
)
from sftlab.data.sources import parse_sources
from sftlab.errors import ConfigError

VOCAB = [f"w{k}" for k in range(400)]  # distinct words: unrelated rows share (almost) no shingle
VERBS = ["Describe", "List", "Explain", "Summarize", "What"]
MAX_LENGTH = 128


def chat(prompt: str, response: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def clean_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        chat(
            f"{VERBS[k % len(VERBS)]} {' '.join(rng.sample(VOCAB, 12))}",
            " ".join(rng.sample(VOCAB, 12)),
        )
        for k in range(n)
    ]


def with_last_word(row: dict, word: str) -> dict:
    prompt, response = (m["content"] for m in row["messages"])
    return chat(prompt, " ".join([*response.split()[:-1], word]))


def prompt_of(row: dict) -> str:
    return row["messages"][0]["content"]


# A row of 13 + 12 words has 23 word trigrams; changing its first or last word changes one of them.
ONE_WORD_OFF = 22 / 24


def write(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("audit")
    base = clean_rows(20, seed=0)  # train lines 1..20
    train = [
        *base,
        base[2],  # 21: exact duplicate of line 3
        base[2],  # 22: and again (one group of three)
        base[4],  # 23: exact duplicate of line 5
        with_last_word(base[6], "changed"),  # 24: near duplicate of line 7, and a conflict with it
        json.loads(json.dumps(base[8]).upper().replace("W", "w").replace(" W", " w")),  # 25: see below
        chat(base[10]["messages"][0]["content"], "an entirely different answer here"),  # 26: conflict with 11
        chat("Expand on w300 w301", " ".join(random.Random(1).choices(VOCAB, k=300))),  # 27: long
        chat("Answer w310 w311 w312 briefly", "Ok"),  # 28: short
        chat("Tell me about w320 w321", "I'm sorry, but I cannot help with that request today."),  # 29
        chat("Advertise w330 w331", "buy now " * 10),  # 30: repetitive
        chat("Define w340\u200b w341", "a w342 w343\x07 thing"),  # 31: invisible + control characters
        chat("Rewrite w350 w351 w352 w353 w354 w355", "rewrite w350 w351, w352 w353 w354 w355!"),  # 32: echo
        "{not json",  # 33: bad row
        {"messages": [{"role": "user", "content": "no answer"}]},  # 34: bad row, no assistant
    ]
    # line 25 is line 9 with its words upper-cased and punctuation added: same shingles, not the same row
    prompt, response = (m["content"] for m in base[8]["messages"])
    train[24] = chat(prompt.upper() + "!", response.upper() + ".")
    val = [
        *clean_rows(5, seed=1),  # 1..5
        base[0],  # 6: a train row verbatim
        chat(base[1]["messages"][0]["content"], "another answer"),  # 7: a train prompt, new answer
        chat("Condense" + prompt_of(base[3])[len("Summarize") :], base[3]["messages"][1]["content"]),  # 8
        chat(base[5]["messages"][0]["content"].lower() + "?", base[5]["messages"][1]["content"]),  # 9
    ]
    test = clean_rows(3, seed=2)
    return {
        "train": write(folder / "train.jsonl", train),
        "val": write(folder / "val.jsonl", val),
        "test": write(folder / "test.jsonl", test),
    }


@pytest.fixture(scope="module")
def result(crafted, tokenizer, chatml):
    sources = {split: parse_sources(str(path), f"data.{split}_path") for split, path in crafted.items()}
    splits = read_splits(sources, None, {})
    settings = AuditSettings(fail_on=["contamination>0", "duplicates>0.05", "rows<4"])
    return audit_splits(splits, chatml, tokenizer, settings, max_length=MAX_LENGTH, batch_size=8)


def at(crafted, split: str, *lines: int) -> list[str]:
    return [f"{crafted[split]}:{n}" for n in lines]


def test_rows_and_bad_rows(result, crafted):
    train = result.report["splits"]["train"]
    assert [result.report["splits"][s]["rows"] for s in ("train", "val", "test")] == [32, 9, 3]
    assert train["bad_rows"]["reasons"] == {"bad_json": 1, "no_assistant": 1}
    assert [b["row"] for b in train["bad_rows"]["listed"]] == at(crafted, "train", 33, 34)
    assert result.report["checks"]["bad_rows"]["train"] == pytest.approx(2 / 34)


def test_exact_duplicates_are_grouped_with_their_lines(result, crafted):
    exact = result.report["splits"]["train"]["duplicates"]["exact"]
    assert (exact["rows"], exact["groups"]) == (3, 2)
    assert exact["listed"] == [at(crafted, "train", 3, 21, 22), at(crafted, "train", 5, 23)]
    for split in ("val", "test"):
        assert result.report["splits"][split]["duplicates"]["exact"]["rows"] == 0


def test_near_duplicates_are_the_reworded_rows_only(result, crafted):
    near = result.report["splits"]["train"]["duplicates"]["near"]
    assert (near["rows"], near["pairs"]) == (2, 2)
    pairs = {(p["earlier"], p["row"]): p["similarity"] for p in near["listed"]}
    assert pairs == {
        (*at(crafted, "train", 9, 25),): 1.0,
        (*at(crafted, "train", 7, 24),): round(ONE_WORD_OFF, 4),
    }
    for split in ("val", "test"):
        assert result.report["splits"][split]["duplicates"]["near"]["rows"] == 0


def test_contamination_lists_every_val_row_seen_in_train(result, crafted):
    leak = result.report["splits"]["val"]["contamination"]
    assert (leak["rows"], leak["same_prompt"]) == (4, 3)
    found = {(p["row"], p["train"], p["match"]) for p in leak["listed"]}
    assert found == {
        (*at(crafted, "val", 6), *at(crafted, "train", 1), "same prompt"),
        (*at(crafted, "val", 7), *at(crafted, "train", 2), "same prompt"),
        (*at(crafted, "val", 8), *at(crafted, "train", 4), f"similarity {ONE_WORD_OFF:.4f}"),
        (*at(crafted, "val", 9), *at(crafted, "train", 6), "same prompt"),
    }
    assert result.report["splits"]["test"]["contamination"]["rows"] == 0
    assert "contamination" not in result.report["splits"]["train"]


def test_conflicts_are_prompts_with_different_answers(result, crafted):
    conflicts = result.report["splits"]["train"]["conflicts"]
    assert (conflicts["prompts"], conflicts["rows"]) == (2, 4)
    # line 24 (one word of line 7's response changed) is a near duplicate and a conflict: both are true
    assert [[r["row"] for r in c["responses"]] for c in conflicts["listed"]] == [
        at(crafted, "train", 7, 24),
        at(crafted, "train", 11, 26),
    ]
    assert result.report["splits"]["val"]["conflicts"]["rows"] == 0


def test_quality_flags_find_exactly_the_planted_rows(result, crafted):
    flags = result.report["splits"]["train"]["flags"]
    planted = {"short": 28, "refusals": 29, "repetitive": 30, "control_chars": 31, "echoes": 32}
    assert {name: [f["row"] for f in flag["listed"]] for name, flag in flags.items()} == {
        **{name: at(crafted, "train", line) for name, line in planted.items()},
        "chat_markers": [],
    }
    assert flags["control_chars"]["listed"][0]["detail"] == "U+200B U+0007"
    for split in ("val", "test"):
        assert all(f["rows"] == 0 for f in result.report["splits"][split]["flags"].values())


def test_tokens_and_the_max_length_forecast(result, crafted, tokenizer):
    tok = result.report["splits"]["train"]["tokens"]
    assert tok["over_max_length"] == 1 and tok["forecast"] == {"kept": 31, "truncated": 1, "dropped": {}}
    # ChatML trains each response and its <|im_end|>: one more token than the response alone
    rows = [json.loads(line) for line in crafted["train"].read_text().splitlines()[:32]]
    responses = [r["messages"][1]["content"] for r in rows]
    assert tok["response"]["total"] == sum(len(tokenizer(r)["input_ids"]) + 1 for r in responses)
    lengths = result.lengths["train"]
    assert len(lengths) == 32 and max(lengths) > MAX_LENGTH
    assert tok["example"]["total"] == sum(lengths) == tok["prompt"]["total"] + tok["response"]["total"]
    assert tok["epoch"] == {
        "examples": 32,
        "tokens": sum(min(n, MAX_LENGTH) for n in lengths),
        "target_tokens": tok["epoch"]["target_tokens"],
        "batches": 4,
    }
    assert tok["epoch"]["target_tokens"] < tok["response"]["total"]  # the long response lost its tail
    assert sum(tok["histogram"]["counts"]) == 32
    assert result.report["checks"]["truncated"] == {"train": 1 / 32, "val": 0.0, "test": 0.0}


def test_fail_on_names_each_check_that_holds(result):
    assert result.failures == [
        "contamination>0: val = 0.4444",
        "duplicates>0.05: train = 0.09375",
        "rows<4: test = 3",
    ]
    assert evaluate(["near_duplicates>=0.0625"], result.report["checks"]) == [
        "near_duplicates>=0.0625: train = 0.0625"
    ]
    assert evaluate(["conflicts>0.125", "refusals>0.5"], result.report["checks"]) == []


def test_malformed_checks_are_a_config_error_naming_them():
    assert parse_checks(["contamination>0", " duplicates >= 1e-2 "], "k") == [
        ("contamination", ">", 0.0),
        ("duplicates", ">=", 0.01),
    ]
    with pytest.raises(ConfigError, match=r"audit.fail_on: cannot read \['contamnation>0', 'rows=3'\]"):
        AuditSettings(fail_on=["contamnation>0", "rows=3", "rows>3"])


def test_diversity_counts_kinds_and_their_concentration(result):
    d = diversity([view(chat(p, "x")["messages"]) for p in ["Write a", "write b", "List c", "What d"]], top=2)
    assert d["kinds"] == 3 and d["top"] == [
        {"kind": "write", "rows": 2, "share": 0.5},
        {"kind": "list", "rows": 1, "share": 0.25},
    ]
    assert d["top_share"] == 0.5 and d["entropy"] == pytest.approx(0.9464, abs=1e-4)  # H(.5,.25,.25)/ln 3
    train = result.report["splits"]["train"]["diversity"]
    # each verb leads 4 clean rows; "Explain" also leads the two copies of line 3, the others one copy each
    assert [(t["kind"], t["rows"]) for t in train["top"][:5]] == [
        ("explain", 6),
        ("describe", 5),
        ("list", 5),
        ("summarize", 5),
        ("what", 5),
    ]
    assert train["kinds"] == 11 and train["top_share"] == 6 / 32


def test_near_pairs_within_returns_only_pairs_at_or_above_the_threshold():
    texts = ["a b c d e f g h i j", "a b c d e f g h i k", "a b c d e f x y z q", "unrelated words only here"]
    sig = Signatures.of(texts, shingle=3, num_perm=128)
    assert near_pairs_within(sig, range(4), threshold=0.7, num_perm=128)[0] == [(0, 1, 7 / 9)]
    assert near_pairs_within(sig, range(4), threshold=0.8, num_perm=128)[0] == []


def test_val_fraction_holds_out_train_rows_as_the_pipeline_does(crafted):
    sources = {"train": parse_sources(str(crafted["train"]), "data.train_path"), "val": [], "test": []}
    splits = read_splits(sources, None, {}, val_fraction=0.25, seed=3)
    assert [len(splits[s].items) for s in ("train", "val")] == [24, 8]
    assert Counter(it.where for s in splits.values() for it in s.items).most_common(1)[0][1] == 1


def test_chat_markers_in_content_are_flagged_by_name(tokenizer):
    from sftlab.data.audit import AuditSettings, Item, flags, view
    from sftlab.data.quality import special_strings

    convs = [
        [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, how can I help?"}],
        [
            {"role": "user", "content": "Quote <|im_end|> please"},
            {"role": "assistant", "content": "It ends turns."},
        ],
        [
            {"role": "user", "content": "And im_end?"},
            {"role": "assistant", "content": "<|im_start|>assistant hi"},
        ],
    ]
    items = [Item(f"rows.jsonl:{k + 1}", c) for k, c in enumerate(convs)]
    found = flags(items, [view(c) for c in convs], AuditSettings(), special_strings(tokenizer))[
        "chat_markers"
    ]
    assert found["rows"] == 2
    assert found["listed"] == [
        {"row": "rows.jsonl:2", "detail": "<|im_end|>"},
        {"row": "rows.jsonl:3", "detail": "<|im_start|>"},
    ]
