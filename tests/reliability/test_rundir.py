"""Run directories: a finished run is never replaced by a second launch, two launches never share one
directory, a refused launch rewrites nothing, the adapter is saved whole or not at all, and a later
evaluation never replaces the training-time results."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from sftlab import build
from sftlab.cli import eval as eval_cli
from sftlab.errors import SFTLabError
from sftlab.rundir import guard, write
from tests.conftest import ROOT
from tests.reliability.conftest import snapshot, tiny_overrides, train_in_process


def test_second_launch_is_refused_then_replace_sets_the_old_run_aside(finished_run, tmp_path):
    base, finished = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    before = snapshot(run_dir)
    run_files = {"config.yaml", "metrics.json", "adapter/adapter_model.safetensors", "checkpoints/last.ckpt"}
    assert run_files <= set(before)

    with pytest.raises(SFTLabError, match=r"already holds a run .*config\.yaml.*resume=auto.*replace=true"):
        train_in_process(run_dir, base / "data", "optimizer.lr=1e-3")
    assert snapshot(run_dir) == before  # nothing rewritten, no second best checkpoint beside the first

    train_in_process(run_dir, base / "data", "optimizer.lr=1e-3", "replace=true")
    (aside,) = tmp_path.glob("run.replaced-*")
    assert snapshot(aside) == {k: v for k, v in before.items() if k != guard.LOCK_NAME}
    assert OmegaConf.load(run_dir / "config.yaml").optimizer.lr == 1e-3
    assert len(list((run_dir / "checkpoints").glob("step*.ckpt"))) == 1  # its own best checkpoint only


def test_resume_auto_without_checkpoints_does_not_start_over_a_finished_run(finished_run, tmp_path):
    _, finished = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    with pytest.raises(SFTLabError, match="no checkpoint to continue from"):
        guard.claim(run_dir, resume="auto", replace=False)
    guard.claim(tmp_path / "fresh", resume="auto", replace=False).release()  # a first launch is fine


HOLD = """
import sys
from pathlib import Path
from sftlab.rundir.guard import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


def test_concurrent_launch_fails_at_once_and_a_dead_holder_leaves_no_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SFTLabError, match=rf"in use by pid {holder.pid} on "):
            guard.claim(tmp_path, resume=None, replace=False)
    finally:
        holder.kill()  # SIGKILL: the holder cannot clean up
        holder.wait()
    lock = guard.claim(tmp_path, resume=None, replace=False)  # the stale record is taken over
    lock.release()


def test_refused_launch_does_not_rewrite_the_hydra_record(finished_run, monkeypatch, tmp_path):
    """Through Hydra itself (in this process): a launch failing validation, then one refused for the run
    already there, leave the run's `.hydra/` as it was."""
    from sftlab.cli import train

    base, finished = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / ".hydra").mkdir()
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run_dir / ".hydra" / name).write_text(f"# the first launch's {name}\n")
    record = snapshot(run_dir / ".hydra")
    args = [*tiny_overrides(base / "data"), f"hydra.run.dir={run_dir}"]
    for bad in ("optimizer.lr=-1", "optimizer.lr=0.5"):  # invalid; valid but refused (a run is there)
        monkeypatch.setattr(sys, "argv", ["train.py", *args, bad])
        with pytest.raises(SystemExit) as exit_:
            train.main()
        assert exit_.value.code == 1
        assert snapshot(run_dir / ".hydra") == record


def test_adapter_save_cut_short_leaves_the_previous_adapter_whole(finished_run, tmp_path):
    from sftlab.build import load_run

    _, run_dir = finished_run
    run = load_run(run_dir)
    before = snapshot(run_dir / "adapter")

    class Killed(BaseException):
        pass

    def killed_mid_save(*args, **kwargs):  # the process dies after the weights, before the tokenizer
        raise Killed

    run.tokenizer.save_pretrained = killed_mid_save
    target = tmp_path / "run"
    target.mkdir()
    with pytest.raises(Killed):
        write.save_model(target, run.model, run.tokenizer, run.template)
    assert not (target / "adapter").exists()  # no adapter without its tokenizer
    assert list(target.iterdir()) == []  # and no temporary folder left
    with pytest.raises(Killed):
        write.save_model(run_dir, run.model, run.tokenizer, run.template)
    assert snapshot(run_dir / "adapter") == before


def test_a_later_evaluation_gets_its_own_folder_and_never_overwrites(finished_run, monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # an earlier in-process Hydra app leaves its own
    _, run_dir = finished_run
    out = eval_cli.results_dir(run_dir, None)
    assert out.parent == run_dir / "evals"
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "results.json").write_text("{}")
    with pytest.raises(SFTLabError, match="already holds evaluation results"):
        eval_cli.results_dir(run_dir, str(run_dir / "eval"))
    cfg = build.compose(["run=" + str(run_dir), "eval=loss"], config_name="eval_run")
    eval_cli.run_eval(cfg)
    (folder,) = (run_dir / "evals").iterdir()
    assert (folder / "results.json").is_file()
    assert (run_dir / "eval" / "results.json").read_text() == "{}"
