"""The command the benchmark launches sftlab's real entry point with composes to what it claims: the user's
overrides, no evaluation, CSV logging, and the measuring callback with its settings."""

from __future__ import annotations

import sys

from hydra.utils import instantiate

from sftlab import build
from sftlab.bench.callbacks import FirstStepMarker, train_command


def test_train_command_composes_to_the_measured_run(tmp_path):
    marker = tmp_path / "first_step.txt"
    cmd = train_command(
        ["eval=generate", "adapter.r=8"], tmp_path / "run", "bench_first_step", FirstStepMarker, path=marker
    )
    assert cmd[:3] == [sys.executable, "-m", "sftlab.cli.train"]
    assert f"hydra.run.dir={tmp_path / 'run'}" in cmd
    cfg = build.compose([o for o in cmd[3:] if not o.startswith("hydra.")], tmp_path / "run")
    assert cfg.adapter.r == 8
    assert dict(cfg.eval) == {}  # eval=none wins over an override asking for an evaluation
    assert list(cfg.logger) == ["csv"]
    callback = instantiate(cfg.callbacks.bench_first_step)
    assert isinstance(callback, FirstStepMarker) and callback.path == str(marker)
