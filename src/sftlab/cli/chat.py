"""`sftlab-chat run=<run dir>`: chat with the tuned model in the terminal.

Replies stream token by token; the conversation is multi-turn (each prompt is the whole history, rendered by
the run's template exactly as in training). Commands: `/reset` starts over, `/exit` (or end of input) quits.
When stdin is not a terminal, lines are read from it one message each, so a chat can be scripted:
`printf 'Hi\n/reset\nConvert 1 May 2020 to ISO 8601\n' | sftlab-chat run=...`. Only the replies go to stdout
(one line each); the banner goes to stderr.

Options: `base=true` chats with the run's base model (adapter disabled), `system=...` sets a system message,
`reasoning=strip|show` (a reasoning model's `<think>…</think>` block is hidden by default and never fed back
as history, as in training with data.reasoning=keep_last), `max_new_tokens`, and `temperature` (0 = greedy,
the default, as in evaluation), with `top_p` and `seed` when sampling. Generation is sftlab.model.generate's
loop, the one evaluation and `sftlab-serve` use.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

import torch
from peft import PeftModel

from sftlab.build import LoadedRun, load_run
from sftlab.cli.args import parse
from sftlab.data.reasoning import REASONING_KEY, AnswerStream, split_reasoning
from sftlab.data.tokenize import encode_prompt
from sftlab.errors import ConfigError, SFTLabError
from sftlab.model.generate import Sampling, stop_token_ids, stream_text

log = logging.getLogger("sftlab.chat")
COMMANDS = {"/reset", "/exit", "/quit"}


@dataclass
class ChatArgs:
    """run: a train.py run directory (or an sftlab-merge output). base: chat with the base model instead.
    system: an optional system message. temperature: 0 = greedy; top_p, seed: for temperature > 0.
    reasoning: strip (default: a reply's <think>…</think> block is not printed) or show."""

    run: str = "???"
    base: bool = False
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    reasoning: str = "strip"


def read_messages(stream: TextIO) -> Iterator[str]:
    """User lines: with a prompt on a terminal, plain lines otherwise."""
    interactive = stream.isatty()
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = stream.readline()
        if not line:
            return
        yield line.rstrip("\n")


def reply(run: LoadedRun, history: list[dict], args: ChatArgs, out: TextIO) -> dict:
    """Generate the next assistant turn, streaming it to `out` (its reasoning too with reasoning=show);
    returns the assistant message: the answer as content, the reasoning (if any) as reasoning_content."""
    parts = []
    shown = AnswerStream() if args.reasoning == "strip" else None
    for delta, _ in stream_text(
        run.model,
        run.tokenizer,
        encode_prompt(history, run.template, run.tokenizer),
        stop_token_ids(run.template, run.tokenizer),
        max_new_tokens=args.max_new_tokens,
        sampling=Sampling(args.temperature, args.top_p, args.seed),
    ):
        print(shown.feed(delta) if shown else delta, end="", file=out, flush=True)
        parts.append(delta)
    print(shown.close() if shown else "", file=out, flush=True)
    reasoning, answer = split_reasoning("".join(parts))
    # Kept in the history; the next prompt drops it (encode_prompt), as data.reasoning=keep_last trains it.
    return {"role": "assistant", "content": answer} | (
        {} if reasoning is None else {REASONING_KEY: reasoning}
    )


def chat(run: LoadedRun, args: ChatArgs, stdin: TextIO, stdout: TextIO) -> list[dict]:
    """The chat loop; returns the final conversation."""
    fresh = [{"role": "system", "content": args.system}] if args.system else []
    history = list(fresh)
    for line in read_messages(stdin):
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(fresh)
            print("(conversation reset)", file=sys.stderr, flush=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": line})
        history.append(reply(run, history, args, stdout))
    return history


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="[%(name)s][%(levelname)s] - %(message)s")
    try:
        args = parse(ChatArgs, argv, prog="sftlab-chat")
        if args.reasoning not in ("strip", "show"):
            raise ConfigError(f"reasoning={args.reasoning!r}: use strip (answers only) or show.")
        run = load_run(args.run, with_adapter=True)
        if args.base and not isinstance(run.model, PeftModel):  # full fine-tuning: load the configured base
            run = load_run(args.run, with_adapter=False)
    except SFTLabError as err:
        log.error("%s", err)
        raise SystemExit(1) from None
    if torch.cuda.is_available() and not getattr(run.model, "hf_device_map", None):
        run.model.to("cuda")
    use_base = args.base and isinstance(run.model, PeftModel)
    which = "base" if args.base else "tuned"
    print(f"sftlab-chat: {run.run_dir} ({which} model). /reset starts over, /exit quits.", file=sys.stderr)
    with run.model.disable_adapter() if use_base else contextlib.nullcontext():
        chat(run, args, sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()
