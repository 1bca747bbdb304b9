"""`sftlab-chat`: scripted through stdin, streamed replies equal greedy generation, multi-turn, /reset."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from sftlab.build import load_run
from sftlab.cli.chat import ChatArgs, chat
from sftlab.model.generate import generate
from tests.cli.test_eval import make_adapter_run
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_cfg, tiny_model_dir, tokenizer, chatml) -> Path:
    return make_adapter_run(tmp_path_factory.mktemp("run"), tiny_cfg, tiny_model_dir, tokenizer, chatml)


def test_multi_turn_reset_and_streamed_text(run_dir):
    run = load_run(run_dir)
    out = io.StringIO()
    history = chat(
        run,
        ChatArgs(run=str(run_dir), max_new_tokens=8),
        io.StringIO("Hi\nConvert 1 May 2020 to ISO 8601\n/reset\nHi\n"),
        out,
    )
    replies = out.getvalue().splitlines()
    first = generate(
        run.model, run.tokenizer, run.template, [[{"role": "user", "content": "Hi"}]], max_new_tokens=8
    )[0]["text"]
    turn2 = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Convert 1 May 2020 to ISO 8601"},
    ]
    second = generate(run.model, run.tokenizer, run.template, [turn2], max_new_tokens=8)[0]["text"]
    assert first and second and first != second
    assert replies == [first, second, first]  # streamed == greedy; turn 2 sees turn 1; /reset forgets it
    assert history == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first}]


def test_system_message_and_exit(run_dir):
    run = load_run(run_dir)
    out = io.StringIO()
    history = chat(
        run,
        ChatArgs(run=str(run_dir), system="Be brief.", max_new_tokens=4),
        io.StringIO("Hi\n/exit\nnever read\n"),
        out,
    )
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert len(out.getvalue().splitlines()) == 1


def test_sftlab_chat_reads_stdin_when_not_a_terminal(run_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "sftlab.cli.chat", f"run={run_dir}", "max_new_tokens=8"],
        input="Hi\n",
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = load_run(run_dir)
    first = generate(
        run.model, run.tokenizer, run.template, [[{"role": "user", "content": "Hi"}]], max_new_tokens=8
    )[0]["text"]
    assert proc.stdout.splitlines() == [first]
    assert "/reset starts over" in proc.stderr


def test_seeded_sampling_replies_reproducibly(run_dir):
    run = load_run(run_dir)

    def replies(**sampling) -> list[str]:
        out = io.StringIO()
        chat(run, ChatArgs(run=str(run_dir), max_new_tokens=8, **sampling), io.StringIO("Hi\n"), out)
        return out.getvalue().splitlines()

    sampled = replies(temperature=1.0, seed=3)
    assert sampled == replies(temperature=1.0, seed=3) != replies()
