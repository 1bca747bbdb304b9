"""`sftlab-chat run=<run dir>`: chat with the tuned model in the terminal.

Replies stream token by token; the conversation is multi-turn (each prompt is the whole history, rendered by
the run's template exactly as in training). Commands: `/reset` starts over, `/exit` (or end of input) quits.
When stdin is not a terminal, lines are read from it one message each, so a chat can be scripted:
`printf 'Hi\n/reset\nConvert 1 May 2020 to ISO 8601\n' | sftlab-chat run=...`. Only the replies go to stdout
(one line each); the banner goes to stderr.

Options: `base=true` chats with the run's base model (adapter disabled), `system=...` sets a system message,
`max_new_tokens`, and `temperature` (0 = greedy, the default, as in evaluation).
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
from transformers import TextStreamer

from sftlab.build import LoadedRun, load_run
from sftlab.cli.args import parse
from sftlab.data.tokenize import encode_prompt
from sftlab.errors import SFTLabError
from sftlab.model.generate import stop_token_ids

log = logging.getLogger("sftlab.chat")
COMMANDS = {"/reset", "/exit", "/quit"}


@dataclass
class ChatArgs:
    """run: a train.py run directory (or an sftlab-merge output). base: chat with the base model instead.
    system: an optional system message. temperature: 0 = greedy."""

    run: str = "???"
    base: bool = False
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0


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


@torch.no_grad()
def reply(run: LoadedRun, history: list[dict], args: ChatArgs, out: TextIO) -> str:
    """Generate the next assistant turn, streaming its text to `out`; returns the text."""
    ids = torch.tensor([encode_prompt(history, run.template, run.tokenizer)], device=run.model.device)
    streamer = TextStreamer(run.tokenizer, skip_prompt=True, skip_special_tokens=True)
    streamer.on_finalized_text = lambda text, stream_end=False: print(text, end="", file=out, flush=True)
    sampling = (
        {"do_sample": True, "temperature": args.temperature}
        if args.temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    stops = stop_token_ids(run.template, run.tokenizer)
    generated = run.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        streamer=streamer,
        max_new_tokens=args.max_new_tokens,
        eos_token_id=stops,
        pad_token_id=run.tokenizer.pad_token_id,
        use_cache=True,
        **sampling,
    )
    new = generated[0, ids.shape[1] :].tolist()
    stop_at = next((i for i, t in enumerate(new) if t in stops), len(new))
    print(file=out, flush=True)
    return run.tokenizer.decode(new[:stop_at], skip_special_tokens=True)


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
        history.append({"role": "assistant", "content": reply(run, history, args, stdout)})
    return history


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="[%(name)s][%(levelname)s] - %(message)s")
    try:
        args = parse(ChatArgs, argv, prog="sftlab-chat")
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
