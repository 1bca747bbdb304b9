"""Review fixtures: a run directory holding only what a review reads (eval/generations.jsonl), and the review
app served in-process on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

PROMPTS = [
    "Convert 3 March 2021 to ISO 8601.",
    "Convert July 4, 1999 to ISO 8601.",
    "Convert 12/01/2020 (day first) to ISO 8601.",
    "Convert the 5th of May 2010 to ISO 8601.",
    "Convert 2001-9-11 to ISO 8601.",
    "Convert 31 Dec 1999 to ISO 8601.",
]
REFERENCES = ["2021-03-03", "1999-07-04", "2020-01-12", "2010-05-05", "2001-09-11", "1999-12-31"]
HOSTILE = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">&amp; </pre><b>x</b>'


def verdict(score: float | None) -> dict:
    """A judge verdict as eval/judge.py stores it (every criterion scored `score`; None: a parse failure)."""
    criteria = ("correctness", "helpfulness", "tone", "safety")
    if score is None:
        return {
            "scores": {},
            "unsupported_claims": None,
            "reason": "",
            "error": "no valid 1-5 score",
            "raw": "",
        }
    return {
        "scores": dict.fromkeys(criteria, score),
        "unsupported_claims": False,
        "reason": "ok",
        "error": None,
    }


def write_run(
    run_dir: Path,
    n: int = 4,
    *,
    models: tuple[str, ...] = ("base", "tuned"),
    judge: dict[str, list] | None = None,
    hostile_at: int | None = None,
    prompts: list[str] | None = None,
) -> Path:
    """eval/generations.jsonl as sftlab-eval writes it: rows of the base model, then of the tuned one.
    `judge`: model -> per-example judge score (None: parse failure); `hostile_at`: that example's tuned
    answer is an HTML/script injection attempt."""
    prompts = prompts or PROMPTS
    rows = []
    for model in models:
        for i in range(n):
            out = REFERENCES[i] if model == "tuned" else f"The date is {REFERENCES[i][::-1]}."
            if model == "tuned" and i == hostile_at:
                out = HOSTILE
            row = {
                "model": model,
                "index": i,
                "prompt": prompts[i],
                "history": [{"role": "user", "content": prompts[i]}],
                "reference": REFERENCES[i],
                "output": out,
                "stopped": True,
                "new_tokens": 7,
                "exact_match": out == REFERENCES[i],
            }
            if judge and model in judge:
                row["judge"] = verdict(judge[model][i])
            rows.append(row)
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    (run_dir / "eval" / "generations.jsonl").write_text(lines, encoding="utf-8")
    return run_dir


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """The app under uvicorn in a thread, on a free loopback port; yields its base URL."""
    import uvicorn

    from sftlab.review.server import bind, url_of

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield url_of(sock, "127.0.0.1")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
