"""In-process training runs for the reliability suite: the real `sftlab.cli.train.run` on the tiny model,
a few seconds each (24 training rows, batch 4, 4 steps, validation every 2 steps)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sftlab import build
from tests.conftest import small_iso_data


def tiny_overrides(data_dir: Path, *extra: str) -> list[str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "train.jsonl").exists():
        small_iso_data(data_dir)
    return [
        "experiment=smoke",
        "eval=none",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
        f"data.train_path={data_dir / 'train.jsonl'}",
        f"data.val_path={data_dir / 'val.jsonl'}",
        "data.test_path=null",
        "data.cache_dir=null",
        *extra,
    ]


def train_in_process(run_dir: Path, data_dir: Path, *extra: str) -> float:
    """`sftlab-train` as `main` runs it (without Hydra's command-line parsing), into `run_dir`."""
    from sftlab.cli import train

    return train.run(build.compose(tiny_overrides(data_dir, *extra), output_dir=run_dir))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    """(folder holding the data, a finished run directory). Tests that change the run work on a copy."""
    base = tmp_path_factory.mktemp("reliability")
    run_dir = base / "run"
    train_in_process(run_dir, base / "data")
    return base, run_dir
