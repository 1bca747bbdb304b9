"""sftlab-synth: prompts from any format, best-of-n selection and filters, provenance, resume after a kill;
end to end against sftlab-serve as the teacher with a local judge, then two training steps on the output."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sftlab.errors import ConfigError
from sftlab.eval.synth import (
    SynthSettings,
    choose,
    done_prompts,
    expanded_path,
    prompt_sha256,
    read_prompts,
    rejected_path,
    synthesize,
)
from tests.conftest import ROOT, make_adapter_run, tiny_train_command
from tests.helpers.serve import served


class ScriptedTeacher:
    """A teacher whose answers are fixed in advance (our own teacher interface, not a library)."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers, self.asked = answers, []

    def sample(self, histories):
        self.asked += [h[-1]["content"] for h in histories]
        return [self.answers[h[-1]["content"]] for h in histories]


class LengthJudge:
    """Scores an answer by its word count (our judge interface: judge_records -> verdicts)."""

    def judge_records(self, records):
        return [{"scores": {"len": float(len(r["output"].split()))}, "error": None} for r in records]


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompts_are_read_from_any_format_with_their_reference(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]},
        {"instruction": "Q2", "input": "ctx"},  # alpaca without output
        {"prompt": "Q3"},  # prompt_completion without completion
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q4"}]},
        {"prompt": "Q3"},  # a repeat
        {"text": "a document"},  # not a prompt
    ]
    prompts, skipped = read_prompts(str(write_rows(tmp_path / "p.jsonl", rows)))
    assert [(p.history, p.reference) for p in prompts] == [
        ([{"role": "user", "content": "Q1"}], "A1"),
        ([{"role": "user", "content": "Q2\n\nctx"}], None),
        ([{"role": "user", "content": "Q3"}], None),
        ([{"role": "system", "content": "S"}, {"role": "user", "content": "Q4"}], None),
    ]
    assert [p.where for p in prompts] == [f"{tmp_path / 'p.jsonl'}:{n}" for n in (1, 2, 3, 4)]
    assert skipped == {"duplicate_prompt": 1, "wrong_type": 1}


def test_best_of_n_filters_then_keeps_the_best_scored_candidate(tmp_path):
    prompts = write_rows(tmp_path / "p.jsonl", [{"prompt": f"Q{k}"} for k in range(4)])
    teacher = ScriptedTeacher(
        {
            "Q0": ["short one", "the longest answer of all"],
            "Q1": ["I'm sorry, I cannot help with that at all", "fine answer"],
            "Q2": ["", "I cannot"],
            "Q3": ["x", "y"],
        }
    )
    s = SynthSettings(
        prompts=str(prompts), out=str(tmp_path / "out.jsonl"), base_url="http://unused", model="t",
        samples=2, judge="hf", min_score=1.5,
    )  # fmt: skip
    counts = synthesize(s, teacher, LengthJudge())
    assert (counts["kept"], counts["rejected"]) == (2, 2)
    kept = [json.loads(line) for line in Path(s.out).read_text().splitlines()]
    assert [r["messages"][-1]["content"] for r in kept] == ["the longest answer of all", "fine answer"]
    assert kept[0]["provenance"]["selection"]["scores"] == {"0": 2.0, "1": 5.0}
    assert kept[1]["provenance"]["selection"] == {
        "candidate": 1,
        "judge": {"backend": "hf", "model": s.judge_model},
        "scores": {"1": 2.0},
    }
    assert kept[0]["provenance"]["prompt_sha256"] == prompt_sha256([{"role": "user", "content": "Q0"}])
    assert kept[0]["provenance"]["teacher"] == {
        "backend": "openai",
        "model": "t",
        "base_url": "http://unused",
    }
    rejected = [json.loads(line)["provenance"]["rejected"] for line in rejected_path(Path(s.out)).open()]
    assert rejected == [
        "no usable candidate ({'too_short': 1, 'refusal': 1})",
        "judge score 1.0 below min_score 1.5",
    ]
    # everything is done: a second run asks the teacher nothing
    again = ScriptedTeacher({})
    assert synthesize(s, again, LengthJudge())["already_done"] == 4 and again.asked == []


def test_resume_cuts_a_half_written_line_and_redoes_only_that_prompt(tmp_path):
    prompts = write_rows(tmp_path / "p.jsonl", [{"prompt": f"Q{k}"} for k in range(3)])
    s = SynthSettings(prompts=str(prompts), out=str(tmp_path / "o.jsonl"), base_url="http://x", model="t")
    synthesize(s, ScriptedTeacher({f"Q{k}": [f"A{k}"] for k in range(3)}))
    out = Path(s.out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][:25])  # killed while writing the second row
    assert done_prompts(out) == {prompt_sha256([{"role": "user", "content": "Q0"}])}
    assert out.read_text() == lines[0]
    teacher = ScriptedTeacher({f"Q{k}": [f"A{k}"] for k in range(3)})
    synthesize(s, teacher)
    assert teacher.asked == ["Q1", "Q2"]
    assert [json.loads(line)["messages"][-1]["content"] for line in out.open()] == ["A0", "A1", "A2"]


def test_dedupe_with_skips_prompts_the_data_already_has(tmp_path):
    prompts = write_rows(tmp_path / "p.jsonl", [{"prompt": "Known one?"}, {"prompt": "New"}])
    existing = write_rows(tmp_path / "e.jsonl", [{"prompt": "known ONE", "completion": "x"}])
    s = SynthSettings(
        prompts=str(prompts), out=str(tmp_path / "o.jsonl"), base_url="http://x", model="t",
        dedupe_with=str(existing),
    )  # fmt: skip
    teacher = ScriptedTeacher({"New": ["fresh"]})
    counts = synthesize(s, teacher)
    assert teacher.asked == ["New"] and counts["skipped"] == {"in_dedupe_with": 1}


def test_settings_refuse_what_cannot_work():
    with pytest.raises(ConfigError, match="base_url: required with teacher=openai") as err:
        SynthSettings(prompts="p", out="o", model="m", min_score=3, judge=None)
    assert "min_score needs a judge" in str(err.value)
    assert choose(["a", "b", "c"], [None, 2.0, 2.0]) == 1 and choose(["a"], [None]) == 0


class ExpandingTeacher:
    """Proposes the given tasks in turn to expansion requests and answers every other prompt."""

    def __init__(self, proposals: list[str]) -> None:
        self.proposals, self.requests, self.answered = list(proposals), [], []

    def sample(self, histories):
        out = []
        for h in histories:
            text = h[-1]["content"]
            if text.startswith("Here are some example tasks:"):
                self.requests.append(text)
                out.append([self.proposals.pop(0)])
            else:
                self.answered.append(text)
                out.append([f"Answer to {text}"])
        return out


def test_expand_writes_new_distinct_prompts_then_answers_them_and_resumes(tmp_path):
    seeds = ["Write a short poem about the sea.", "Explain how a rainbow forms.", "List three uses of salt."]
    prompts = write_rows(tmp_path / "p.jsonl", [{"prompt": q} for q in seeds])
    proposals = [
        "Task 4: Summarize the plot of a famous novel in two sentences.",  # kept, label removed
        "Write a short poem about the ocean.",  # ROUGE-L 0.86 with the first seed: too similar
        "ok",  # under three words
        "- a bullet",  # does not start like a task
        "Translate a greeting into French and Spanish.\n\nTask 5: more",  # first paragraph kept
    ]
    teacher = ExpandingTeacher(proposals)
    out = tmp_path / "o.jsonl"
    s = SynthSettings(prompts=str(prompts), out=str(out), base_url="http://x", model="t", expand=2)
    counts = synthesize(s, teacher)
    new = [
        "Summarize the plot of a famous novel in two sentences.",
        "Translate a greeting into French and Spanish.",
    ]
    assert len(teacher.requests) == 5 and teacher.proposals == []
    assert all(q in teacher.requests[0] for q in seeds)  # three examples, all from the seed pool
    expanded = [json.loads(line) for line in expanded_path(out).read_text().splitlines()]
    assert [r["messages"] for r in expanded] == [[{"role": "user", "content": q}] for q in new]
    assert [r["provenance"]["round"] for r in expanded] == [0, 4]
    assert counts["prompts"] == 5 and counts["kept"] == 5 and sorted(teacher.answered) == sorted(seeds + new)

    # asked for one more: the two kept ones are read back, never proposed or answered twice
    again = ExpandingTeacher(["Describe the water cycle to a child."])
    counts = synthesize(SynthSettings(**{**s.__dict__, "expand": 3}), again)
    assert len(again.requests) == 1 and again.answered == ["Describe the water cycle to a child."]
    assert counts["already_done"] == 5 and counts["kept"] == 1
    rounds = [json.loads(line)["provenance"]["round"] for line in expanded_path(out).read_text().splitlines()]
    assert rounds == [0, 4, 5]


def test_rouge_l_equals_the_lcs_f1_rouge_score_computes():
    from sftlab.eval.synth import rouge_l, rouge_tokens

    a, b = (
        rouge_tokens("Write a short poem about the sea."),
        rouge_tokens("write a SHORT poem, about the ocean!"),
    )
    assert a == ["write", "a", "short", "poem", "about", "the", "sea"]
    assert rouge_l(a, b) == pytest.approx(2 * 6 / 14)
    # LCS, not overlap: the same words in another order share only the longest subsequence
    assert rouge_l(rouge_tokens("a b c d"), rouge_tokens("d c b a")) == pytest.approx(2 * 1 / 8)
    assert rouge_l(rouge_tokens("a b c d"), rouge_tokens("a x c y d")) == pytest.approx(2 * 3 / 9)
    assert rouge_l([], b) == 0.0


def test_local_teacher_samples_with_the_settings_seeds(tiny_model, tokenizer, chatml):
    from types import SimpleNamespace

    from sftlab.eval.synth import LocalTeacher
    from sftlab.model.generate import Sampling, generate

    run = SimpleNamespace(model=tiny_model, tokenizer=tokenizer, template=chatml)
    histories = [[{"role": "user", "content": q}] for q in ("What is 2+2?", "Name a colour.")]
    s = SynthSettings(
        prompts="p", out="o", model="run", teacher="local", samples=3, temperature=1.5, seed=7, max_tokens=6
    )
    answers = LocalTeacher(run, s).sample(histories)
    for k in range(3):  # sample k of every prompt is the generation loop's draw with seed 7 + k
        outs = generate(
            tiny_model, tokenizer, chatml, histories, max_new_tokens=6, sampling=Sampling(1.5, 1.0, 7 + k)
        )
        assert [a[k] for a in answers] == [o["text"] for o in outs]
    assert len({a for per_prompt in answers for a in per_prompt}) > 2  # sampled, not one greedy answer
    greedy = LocalTeacher(
        run, SynthSettings(prompts="p", out="o", model="run", teacher="local", temperature=0, max_tokens=6)
    )
    assert greedy.sample(histories) == [
        [o["text"]] for o in generate(tiny_model, tokenizer, chatml, histories, max_new_tokens=6)
    ]


@pytest.fixture(scope="module")
def teacher_url(tmp_path_factory):
    """sftlab-serve on a free loopback port, serving a tiny run as the teacher."""
    run_dir = make_adapter_run(tmp_path_factory.mktemp("teacher"), [])[0]
    with served(run_dir, "teacher") as url:
        yield url


@pytest.mark.slow
def test_synthesize_from_a_served_teacher_resume_after_kill_and_train(tmp_path, teacher_url, tiny_model_dir):
    source = (ROOT / "src/sftlab/resources/iso_dates/train.jsonl").read_text().splitlines()[:20]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(source) + "\n")
    out = tmp_path / "distilled.jsonl"
    cmd = [
        sys.executable, "-m", "sftlab.cli.synth", f"prompts={prompts}", f"out={out}",
        f"base_url={teacher_url}", "model=teacher", "samples=2", "temperature=1.0", "max_tokens=8",
        "judge=hf", f"judge_model={tiny_model_dir}", "judge_max_new_tokens=8", "chunk=2", "concurrency=2",
        "drop_refusals=false",
    ]  # fmt: skip
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while (not out.is_file() or len(out.read_text().splitlines()) < 4) and time.time() < deadline:
        assert first.poll() is None, "the first run ended before it could be killed"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    interrupted = len(out.read_text().splitlines())
    assert 4 <= interrupted < 20

    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    counts = json.loads(second.stdout.strip().splitlines()[-1])
    assert counts["already_done"] == interrupted and counts["kept"] == 20 - interrupted

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = {json.dumps(json.loads(line)["messages"][:-1]) for line in source}
    assert sorted(json.dumps(r["messages"][:-1]) for r in rows) == sorted(expected)  # each prompt once
    for r in rows:
        p = r["provenance"]
        assert p["teacher"] == {"backend": "openai", "model": "teacher", "base_url": teacher_url}
        assert p["sampling"]["samples"] == 2 and p["selection"]["judge"]["backend"] == "hf"
        assert len(p["selection"]["scores"]) >= 1 and p["reference"] and p["time"]
        assert p["prompt_sha256"] == prompt_sha256(r["messages"][:-1])
    assert not rejected_path(out).exists()

    run_dir = tmp_path / "run"
    train = subprocess.run(
        tiny_train_command(
            run_dir, "data=jsonl", f"data.train_path={out}", "data.val_fraction=0.1", "trainer.max_steps=2",
            "eval=none", "data.batch_size=4",
        ),
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data"]["train"]["kept"] == 18
