"""One run per run directory: a second launch never replaces a finished run, and never runs beside a live one.

A directory holding a run (config.yaml, metrics.json, adapter/, model/ or checkpoints) is refused unless the
launch continues it (`resume=auto` or a checkpoint path) or says `replace=true`, which moves the old run's
files into a sibling `<dir>.replaced-<time>` folder (renamed, never deleted) first.

The lock is `fcntl.flock` on `<run dir>/.sftlab.lock`, not a pid file alone: the kernel drops it when its
process dies, so a run killed by `kill -9`, the OOM killer or a preemption never leaves a lock that blocks the
restart. The file records the holder's pid and host for the message; a pid found in it while the lock is free
is the stale record of a process that died, and is said so.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from sftlab.errors import ConfigError, SFTLabError

log = logging.getLogger(__name__)

LOCK_NAME = ".sftlab.lock"
RUN_MARKERS = ("config.yaml", "metrics.json", "adapter", "model")


def run_contents(run_dir: Path) -> list[str]:
    """What in `run_dir` shows that it holds a run (empty: a fresh or never-started directory)."""
    found = [name for name in RUN_MARKERS if (run_dir / name).exists()]
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.glob("*.ckpt")):
        found.append("checkpoints/")
    return found


class RunLock:
    """An exclusive, non-blocking lock on a run directory, held until `release` or the process ends."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._file = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the lifetime of the lock
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise SFTLabError(
                f"run directory {str(self.path.parent)!r} is in use by {holder} (lock {self.path}). "
                "Wait for that run to end, or launch into another directory (hydra.run.dir=...)."
            ) from None
        f.seek(0)
        previous = f.read().strip()
        if previous:
            log.warning(
                "Stale lock in %s: %s ended without releasing it; taking it over.", self.path, previous
            )
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()  # empty: released cleanly (a pid left here means its process died)
        self._file.flush()
        fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None


def set_aside(run_dir: Path) -> Path:
    """Move the run in `run_dir` into a new sibling folder and return it. Log files stay in place (the logging
    handler of this launch already writes them): they are copied aside and emptied."""
    base = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    aside, n = base, 1
    while aside.exists():
        aside, n = base.with_name(f"{base.name}~{n}"), n + 1
    aside.mkdir()
    for entry in sorted(run_dir.iterdir()):
        if entry.name == LOCK_NAME:
            continue
        if entry.is_file() and entry.suffix == ".log":
            shutil.copy2(entry, aside / entry.name)
            with open(entry, "r+", encoding="utf-8") as f:
                f.truncate()
            continue
        os.replace(entry, aside / entry.name)
    return aside


def claim(run_dir: Path, resume: str | None, replace: bool) -> RunLock:
    """Lock `run_dir` for this launch and check that it may write there; the caller releases the lock.

    Raises when another live process holds the directory, or when it holds a run and the launch neither
    continues it (`resume`) nor replaces it (`replace=true`, which sets the old run aside first)."""
    if resume and replace:
        raise ConfigError(
            f"resume={resume!r} and replace=true: resume continues the run in this directory, replace "
            "sets it aside and starts a new one. Choose one."
        )
    lock = RunLock(run_dir)
    lock.acquire()  # first: a concurrent second launch fails at once, whatever it asks for
    try:
        found = run_contents(run_dir)
        if found and replace:
            aside = set_aside(run_dir)
            log.warning("replace=true: the earlier run in %s was moved to %s", run_dir, aside)
        elif (
            str(resume) == "auto"
            and "checkpoints/" not in found
            and set(found) & {"metrics.json", "adapter", "model"}
        ):
            # resume=auto without a checkpoint starts fresh: right for a first launch, not over a finished run
            raise SFTLabError(
                f"resume=auto: {str(run_dir)!r} holds a finished run ({', '.join(found)}) but no checkpoint "
                "to continue from, and starting over would replace it. Use replace=true to start a new run "
                "here (the old one is moved aside), or another hydra.run.dir."
            )
        elif found and not resume:
            raise SFTLabError(
                f"run directory {str(run_dir)!r} already holds a run ({', '.join(found)}). Continue it with "
                "resume=auto, replace it with replace=true (the old run is moved to "
                f"{run_dir.name}.replaced-<time>, not deleted), or launch into another hydra.run.dir."
            )
    except BaseException:
        lock.release()
        raise
    return lock
