"""`sftlab-serve` as its users start it: the real console entry point in a subprocess, on a loopback port."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def served(run_dir: Path | str, name: str, **options: object) -> Iterator[str]:
    """The base URL (`http://127.0.0.1:PORT/v1`) of `run_dir` served as model `name`, with further
    `key=value` options (queue=1, max_body_bytes=...); stopped on exit."""
    extra = [f"{k}={v}" for k, v in options.items()]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sftlab.cli.serve", f"run={run_dir}", "port=0", f"name={name}", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in proc.stdout:  # the server prints its URL once it is bound
            lines.append(line)
            match = re.search(r"listening on (http://127\.0\.0\.1:\d+/v1)", line)
            if match:
                break
        else:
            pytest.fail("sftlab-serve exited before listening:\n" + "".join(lines[-30:]))
        yield match.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a generation that outlives the graceful shutdown
            proc.kill()
            proc.wait(timeout=30)
