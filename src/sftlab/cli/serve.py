"""`sftlab-serve run=<run dir> [port=8000]`: an OpenAI-compatible chat server for an un-merged adapter run.

For a merged directory (`sftlab-merge`), the engines users already run serve it better: the command prints
`vllm serve` (production) and `transformers serve` (a laptop) lines that use the training chat template the
merge saved, then serves it itself too (tests, judges and quick looks). For an adapter run neither engine
applies, and this server is the way: Starlette served by uvicorn (kept libraries, as sftlab-review).

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` (non-streaming, and streaming as
server-sent events). The prompt is the run's template tokenized exactly as in training (`encode_prompt`) and
generation stops at the template's end-of-turn token; generation is sftlab.model.generate's loop.

Limits, answered as OpenAI's API answers them (a JSON error object, HTTP 4xx) before any generation:
  * the body must be a JSON object of at most `max_body_bytes` (413 beyond);
  * `max_tokens` / `max_completion_tokens` an integer >= 1 (capped at `max_tokens` of the server),
    `temperature` a number in [0, 2], `top_p` in (0, 1], `seed` an integer, `n` 1, `stop` a string or up to
    4 strings, `stream` a boolean;
  * prompt tokens + max_tokens within the model's context (`model.context_length`, else the model config's
    `max_position_embeddings`); without max_tokens the answer gets what the context leaves, up to the cap.
Concurrency, honestly: the model generates one answer at a time; up to `queue` further requests wait their
turn, and a request beyond that is answered at once with 503 and `Retry-After` (never a dropped connection).

Reasoning (`reasoning=separate`, default): an answer that opens with `<think>…</think>` comes back as
`message.content` (the final answer) and `message.reasoning_content` (the reasoning), the field vLLM's
reasoning parsers and DeepSeek's API use; a stream sends the answer only. `reasoning=show`: the raw text.

`temperature` defaults to 1.0 as in the OpenAI API; `temperature=0` is greedy and matches
`sftlab.eval.generate`. `n` > 1, tools and logprobs are refused with a 400. `port=0` binds a free port; the
bound URL is printed on one line (`sftlab-serve: listening on http://...`).
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sftlab.build import LoadedRun, load_run
from sftlab.cli.args import parse
from sftlab.data.formats import ROLES
from sftlab.data.reasoning import REASONING_KEY, AnswerStream, split_reasoning
from sftlab.data.tokenize import encode_prompt
from sftlab.errors import ConfigError, SFTLabError
from sftlab.model import generate
from sftlab.model.generate import Sampling, stop_token_ids
from sftlab.review import server as review_server

log = logging.getLogger("sftlab.serve")


@dataclass
class ServeArgs:
    """run: a train.py run directory or an sftlab-merge output. host/port: where to listen (port=0: any free
    port). name: the model id clients send (default: the directory name). max_tokens: the cap per request.
    queue: requests that may wait while one generates (more get 503). max_body_bytes: the largest request
    body. context_length: prompt + completion limit (default: the run's model.context_length). reasoning:
    separate (a <think> block goes to message.reasoning_content) or show (raw text)."""

    run: str = "???"
    host: str = "127.0.0.1"
    port: int = 8000
    name: str | None = None
    max_tokens: int = 512
    queue: int = 8
    max_body_bytes: int = 1_000_000
    context_length: int | None = None
    reasoning: str = "separate"


class BadRequest(ValueError):
    """A client error: answered with an HTTP 4xx and an OpenAI-style error object naming the parameter."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


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
        raise BadRequest("every message needs a string 'content'", "messages")
    return content


def _number(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"'{key}' must be a number, got {json.dumps(value)}", key)
    if value < low or (low_open and value == low) or value > high:
        bounds = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"
        raise BadRequest(f"{value!r} is not a valid '{key}': it must be {bounds}", key)
    return float(value)


def _integer(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadRequest(f"'{key}' must be an integer, got {json.dumps(value)}", key)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("'stop' must be a non-empty string or a list of at most 4 of them", "stop")
    return stops


def parse_request(body: Any, run: LoadedRun, cap: int, context: int | None = None) -> Request:
    """The validated request, or BadRequest naming the parameter (OpenAI's checks and messages' shape)."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    msgs = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in (*ROLES, "developer"):
            raise BadRequest(f"each message needs a role among {', '.join(ROLES)}", "messages")
        msgs.append({"role": "system" if m["role"] == "developer" else m["role"], "content": _content(m)})
    for key in ("tools", "logprobs", "response_format"):
        if body.get(key):
            raise BadRequest(f"'{key}' is not supported by sftlab-serve (use vLLM on the merged model)", key)
    if (_integer(body, "n") or 1) != 1:
        raise BadRequest("only n=1 is supported", "n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = _integer(body, key)
    if asked is not None and asked < 1:
        raise BadRequest(f"{asked} is not a valid '{key}': it must be >= 1", key)
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    sampling = Sampling(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=_integer(body, "seed"),
    )
    stop = _stop(body)
    prompt_ids = encode_prompt(msgs, run.template, run.tokenizer)
    max_tokens = min(asked or cap, cap)
    if context is not None:
        room = context - len(prompt_ids)
        if room < 1 or (asked is not None and asked > room):
            wanted = asked or 1
            raise BadRequest(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{len(prompt_ids) + wanted} tokens ({len(prompt_ids)} in the messages, {wanted} in the "
                "completion). Please reduce the length of the messages or completion.",
                "messages",
            )
        max_tokens = min(max_tokens, room)
    return Request(prompt_ids, max_tokens, sampling, stop, bool(body.get("stream", False)))


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


def message(text: str, reasoning: str) -> dict:
    """The assistant message of a generated text: with `reasoning=separate`, a `<think>` block moves to
    `reasoning_content` and `content` holds the final answer."""
    thought, answer = split_reasoning(text) if reasoning == "separate" else (None, text)
    return {
        "role": "assistant",
        "content": answer,
        **({REASONING_KEY: thought} if thought is not None else {}),
    }


def answer_deltas(
    deltas: Iterator[tuple[str, str | None, int]], reasoning: str
) -> Iterator[tuple[str, str | None]]:
    """(text delta, finish reason) of a stream, the reasoning held back with `reasoning=separate`."""
    answer = AnswerStream() if reasoning == "separate" else None
    for delta, reason, _ in deltas:
        if answer is not None:
            delta = answer.feed(delta) + (answer.close() if reason else "")
        yield delta, reason


def completion(run: LoadedRun, req: Request, name: str, reasoning: str = "separate") -> dict:
    parts, finish, n = [], "length", 0
    for delta, reason, count in stream_text(run, req):
        parts.append(delta)
        finish, n = reason or finish, count
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [{"index": 0, "message": message("".join(parts), reasoning), "finish_reason": finish}],
        "usage": {
            "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": n,
            "total_tokens": len(req.prompt_ids) + n,
        },
    }


def chunks(run: LoadedRun, req: Request, name: str, reasoning: str = "separate") -> Iterator[dict]:
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": name,
    }
    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    yield {**base, "choices": [first]}
    for delta, reason in answer_deltas(stream_text(run, req), reasoning):
        if delta or reason:
            yield {
                **base,
                "choices": [
                    {"index": 0, "delta": {"content": delta} if delta else {}, "finish_reason": reason}
                ],
            }


class Gate:
    """One generation at a time, at most `queue` waiting: `admit()` says at once whether a request gets in.

    The count covers a request from admission until its last byte is generated (a stream's end or its
    client's disconnect), so a flood gets 503s instead of piling up threads, memory and timeouts."""

    def __init__(self, queue: int) -> None:
        self.limit = queue + 1
        self.model = threading.Lock()  # held by the one generating request
        self._count = threading.Lock()
        self.pending = 0

    def admit(self) -> bool:
        with self._count:
            if self.pending >= self.limit:
                return False
            self.pending += 1
            return True

    def leave(self) -> None:
        with self._count:
            self.pending -= 1

    @property
    def busy(self) -> bool:
        return self.model.locked()


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    payload = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(payload, status_code=status, headers=headers)


def make_app(run: LoadedRun, name: str, args: ServeArgs, context: int | None) -> Starlette:
    gate = Gate(args.queue)

    async def health(request: HTTPRequest) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "model": name,
                "generating": gate.busy,
                "pending": gate.pending,
                "queue": args.queue,
                "context_length": context,
            }
        )

    async def models(request: HTTPRequest) -> Response:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "sftlab"}]
        return JSONResponse({"object": "list", "data": data})

    def generate_all(req: Request) -> dict:
        with gate.model:
            return completion(run, req, name, args.reasoning)

    def stream_all(req: Request) -> Iterator[bytes]:
        try:
            with gate.model:
                for chunk in chunks(run, req, name, args.reasoning):
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            gate.leave()

    async def read_body(request: HTTPRequest) -> bytes:
        """The body, refused as soon as it passes the limit (a declared or a chunked length)."""
        too_large = BadRequest(f"the request body is larger than {args.max_body_bytes} bytes", status=413)
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > args.max_body_bytes:
            raise too_large
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > args.max_body_bytes:
                raise too_large
        return bytes(data)

    async def chat(request: HTTPRequest) -> Response:
        try:
            raw = await read_body(request)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise BadRequest(f"the request body is not valid JSON ({err})") from None
            req = parse_request(body, run, args.max_tokens, context)
        except BadRequest as err:
            return _error(err.status, str(err), err.param)
        if not gate.admit():
            return _error(
                503,
                f"sftlab-serve is busy: one request is generating and {args.queue} are waiting; retry later",
                headers={"Retry-After": "1"},
            )
        if req.stream:  # the gate is left when the stream ends or its client goes away
            return StreamingResponse(stream_all(req), media_type="text/event-stream")
        try:
            return JSONResponse(await run_in_threadpool(generate_all, req))
        finally:
            gate.leave()

    async def http_error(request: HTTPRequest, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def engine_commands(model_dir: Path, name: str) -> list[str]:
    """How to serve a merged directory with the engines users run, prompted with the training template."""
    template = model_dir / "chat_template.jinja"
    return [
        f"vllm serve {model_dir} --served-model-name {name} --chat-template {template}",
        f"transformers serve {model_dir}",
    ]


def context_limit(run: LoadedRun, args: ServeArgs) -> int | None:
    if args.context_length is not None:
        return args.context_length
    configured = run.cfg.model.get("context_length")
    return configured or getattr(run.model.config, "max_position_embeddings", None)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket with a deep backlog: a burst of clients waits to be answered (maybe with a 503),
    instead of having its connections reset."""
    return review_server.bind(host, port, backlog=2048)


def check(args: ServeArgs) -> None:
    if args.reasoning not in ("separate", "show"):
        raise ConfigError(
            f"reasoning={args.reasoning!r}: use separate (reasoning_content) or show (raw text)."
        )
    for key in ("max_tokens", "max_body_bytes"):
        if getattr(args, key) < 1:
            raise ConfigError(f"{key}={getattr(args, key)}: must be at least 1.")
    if args.queue < 0:
        raise ConfigError(f"queue={args.queue}: must be 0 (no waiting) or more.")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        args = parse(ServeArgs, argv, prog="sftlab-serve")
        check(args)
        run = load_run(args.run)
        sock = bind(args.host, args.port)
    except SFTLabError as err:
        log.error("%s", err)
        raise SystemExit(1) from None
    except OSError as err:
        log.error("sftlab-serve: cannot listen on %s:%s (%s); pick another port=", args.host, args.port, err)
        raise SystemExit(1) from None
    if torch.cuda.is_available() and not getattr(run.model, "hf_device_map", None):
        run.model.to("cuda")
    name = args.name or Path(args.run).resolve().name
    model_dir = Path(args.run)
    if (model_dir / "config.json").is_file():  # an sftlab-merge output: the engines users run serve it
        print("sftlab-serve: a merged model; for production serve it with", flush=True)
        for command in engine_commands(model_dir, name):
            print(f"  {command}", flush=True)
    import uvicorn

    app = make_app(run, name, args, context_limit(run, args))
    host, port = sock.getsockname()[:2]
    print(f"sftlab-serve: listening on http://{host}:{port}/v1", flush=True)
    # Ctrl-C / SIGTERM: in-flight answers get a few seconds, not the length of a long generation
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, backlog=2048, timeout_graceful_shutdown=5
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
