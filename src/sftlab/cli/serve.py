"""`sftlab-serve run=<run dir or merged dir> [port=8000]`: an OpenAI-compatible chat server on loopback.

For a laptop and for tests; vLLM on the merged directory (`sftlab-merge`) is the production path. Endpoints:
`GET /v1/models` and `POST /v1/chat/completions` (non-streaming, and streaming as server-sent events).
The prompt is the run's template tokenized exactly as in training (`encode_prompt`), and generation stops at
the template's end-of-turn token, so the model is asked the way it was taught. Generation is
sftlab.model.generate's loop (the one evaluation and `sftlab-chat` use); this module adds the HTTP API and the
`stop` strings, cut from the streamed text.

Decisions: stdlib `http.server` (no web framework dependency); one request generates at a time (a lock: one
model, one CPU); `temperature` defaults to 1.0 as in the OpenAI API, `temperature=0` is greedy and matches
`sftlab.eval.generate`; `stop` strings are honoured, `n` > 1, tools and logprobs are refused with a 400.
`port=0` binds a free port; the bound URL is printed on one line (`sftlab-serve: listening on http://...`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from sftlab.build import LoadedRun, load_run
from sftlab.cli.args import parse
from sftlab.data.formats import ROLES
from sftlab.data.tokenize import encode_prompt
from sftlab.errors import SFTLabError
from sftlab.model import generate
from sftlab.model.generate import Sampling, stop_token_ids

log = logging.getLogger("sftlab.serve")


@dataclass
class ServeArgs:
    """run: a train.py run directory or an sftlab-merge output. host/port: where to listen (port=0: any free
    port). name: the model id clients send (default: the directory name). max_tokens: the cap per request."""

    run: str = "???"
    host: str = "127.0.0.1"
    port: int = 8000
    name: str | None = None
    max_tokens: int = 512


class BadRequest(ValueError):
    """A client error: answered with HTTP 400 and an OpenAI-style error object."""


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    stream: bool


def _content(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise BadRequest("every message needs a string 'content'")
    return content


def parse_request(body: dict, run: LoadedRun, cap: int) -> Request:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    msgs = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in (*ROLES, "developer"):
            raise BadRequest(f"each message needs a role among {', '.join(ROLES)}")
        msgs.append({"role": "system" if m["role"] == "developer" else m["role"], "content": _content(m)})
    for key in ("tools", "logprobs", "response_format"):
        if body.get(key):
            raise BadRequest(f"'{key}' is not supported by sftlab-serve (use vLLM on the merged model)")
    if (body.get("n") or 1) != 1:
        raise BadRequest("only n=1 is supported")
    stop = body.get("stop") or []
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or cap
    temperature, seed = body.get("temperature"), body.get("seed")
    return Request(
        prompt_ids=encode_prompt(msgs, run.template, run.tokenizer),
        max_tokens=min(int(max_tokens), cap),
        sampling=Sampling(
            temperature=1.0 if temperature is None else float(temperature),
            top_p=float(body.get("top_p") or 1.0),
            seed=None if seed is None else int(seed),
        ),
        stop=[stop] if isinstance(stop, str) else list(stop),
        stream=bool(body.get("stream")),
    )


def stream_text(run: LoadedRun, req: Request) -> Iterator[tuple[str, str | None, int]]:
    """(text delta, finish reason or None, tokens so far): text is held back while it could still become a
    stop string."""
    text, sent, n = "", 0, 0
    hold = max((len(s) for s in req.stop), default=1) - 1
    for delta, n in generate.stream_text(
        run.model,
        run.tokenizer,
        req.prompt_ids,
        stop_token_ids(run.template, run.tokenizer),
        max_new_tokens=req.max_tokens,
        sampling=req.sampling,
    ):
        text += delta
        cut = min((text.find(s) for s in req.stop if s in text), default=-1)
        if cut >= 0:
            yield text[sent:cut], "stop", n
            return
        if len(text) - hold > sent:
            yield text[sent : len(text) - hold], None, n
            sent = len(text) - hold
    yield text[sent:], "stop" if n < req.max_tokens else "length", n


def completion(run: LoadedRun, req: Request, name: str) -> dict:
    parts, finish, n = [], "length", 0
    for delta, reason, count in stream_text(run, req):
        parts.append(delta)
        finish, n = reason or finish, count
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "".join(parts)}, "finish_reason": finish}
        ],
        "usage": {
            "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": n,
            "total_tokens": len(req.prompt_ids) + n,
        },
    }


def chunks(run: LoadedRun, req: Request, name: str) -> Iterator[dict]:
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": name,
    }
    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    yield {**base, "choices": [first]}
    for delta, reason, _ in stream_text(run, req):
        if delta or reason:
            yield {
                **base,
                "choices": [
                    {"index": 0, "delta": {"content": delta} if delta else {}, "finish_reason": reason}
                ],
            }


def make_handler(run: LoadedRun, name: str, cap: int) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:
            log.info("%s %s", self.address_string(), fmt % args)

        def _json(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": {"message": message, "type": "invalid_request_error", "code": None}})

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._json(
                    200,
                    {
                        "object": "list",
                        "data": [{"id": name, "object": "model", "created": 0, "owned_by": "sftlab"}],
                    },
                )
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}")
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                req = parse_request(body, run, cap)
            except (BadRequest, ValueError, TypeError) as err:
                return self._error(400, str(err))
            with lock:
                if not req.stream:
                    return self._json(200, completion(run, req, name))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
                for chunk in chunks(run, req, name):
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")

    return Handler


def make_server(args: ServeArgs) -> ThreadingHTTPServer:
    run = load_run(args.run)
    if torch.cuda.is_available() and not getattr(run.model, "hf_device_map", None):
        run.model.to("cuda")
    name = args.name or Path(args.run).resolve().name
    server = ThreadingHTTPServer((args.host, args.port), make_handler(run, name, args.max_tokens))
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        args = parse(ServeArgs, argv, prog="sftlab-serve")
        server = make_server(args)
    except SFTLabError as err:
        log.error("%s", err)
        raise SystemExit(1) from None
    host, port = server.server_address[:2]
    print(f"sftlab-serve: listening on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
