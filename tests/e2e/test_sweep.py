"""Sweeps end to end: `python train.py -m ...` in a subprocess on the tiny random model, a few steps per job.

- a 2 x 2 grid with W&B (offline): one job directory and one W&B run per job, distinct ids, one group, each
  run's config holding its own swept values, runs one after another, and a report with plots;
- a job that fails does not stop the sweep (with the submitit local launcher, jobs in their own processes);
- an Optuna search of 3 trials whose reported best is the best job.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from hydra.types import RunMode
from omegaconf import OmegaConf

from sftlab import build
from sftlab.cli import report
from tests.conftest import ROOT
from tests.helpers import wandb_log

# Two optimizer steps, one validation on 2 batches, no generation-based evaluation: each job takes seconds.
FAST = [
    "model=tiny_random",
    "eval=none",
    "data.batch_size=4",
    "data.max_length=64",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "+trainer.limit_val_batches=2",
]


VAL = [
    json.loads(row)["messages"]
    for row in (ROOT / "src/sftlab/resources/iso_dates/val.jsonl").read_text().splitlines()
]


def _train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _overrides(job_dir) -> dict[str, str]:
    return report.parse_overrides(list(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")))


def _best_loss(job_dir) -> float:
    return json.loads((job_dir / "metrics.json").read_text())["val"]["best_loss"]


def _hydra_cfg(overrides: list[str]):
    return build.compose(overrides, return_hydra_config=True).hydra


def test_launcher_and_search_configs_compose_onto_the_plugins():
    slurm = _hydra_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]).launcher
    assert slurm._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (slurm.gpus_per_node, slurm.partition, slurm.max_num_timeout) == (1, "gpu", 3)
    joblib = _hydra_cfg(["hydra/launcher=local_parallel"]).launcher
    assert joblib._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert joblib.n_jobs == 2
    search = _hydra_cfg(["hparams_search=optuna"])
    assert search.mode == RunMode.MULTIRUN
    assert search.sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert search.sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert set(search.sweeper.params) == {"optimizer.lr", "adapter.r", "trainer.max_epochs"}
    grid = _hydra_cfg(["experiment=cpu_sweep"])
    assert grid.mode == RunMode.MULTIRUN and dict(grid.sweeper.params) == {
        "optimizer.lr": "1e-4,4e-4",
        "adapter.r": "4,16",
    }


def test_grid_sweep_one_wandb_run_per_job_in_one_group_and_a_report(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _train(
        "-m",
        "experiment=smoke",
        "logger=wandb",
        "+trainer.limit_val_batches=2",
        "callbacks.generation_samples.max_new_tokens=8",
        "optimizer.lr=1e-4,3e-4",
        "adapter.r=4,8",
        f"hydra.sweep.dir={sweep}",
    )

    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    runs = [wandb_log.offline_runs(j) for j in jobs]
    assert [len(r) for r in runs] == [1, 1, 1, 1]
    runs = [r for (r,) in runs]
    assert len({r.id for r in runs}) == 4
    assert {r.group for r in runs} == {str(sweep)}
    for job, run in zip(jobs, runs, strict=True):
        swept = _overrides(job)
        assert run.config["optimizer"]["lr"] == float(swept["optimizer.lr"])
        assert run.config["adapter"]["r"] == int(swept["adapter.r"])
        given = list(OmegaConf.load(job / ".hydra" / "overrides.yaml"))  # as typed, "+" included
        assert run.name == ",".join(sorted(given))
        assert run.tags == ["smoke", *given]
        assert run.exit_code == 0
        assert run.summary["val/best_loss"] == _best_loss(job)
        assert run.config["params"]["trainable"] > 0 and run.config["data_counts"]["train"]["kept"] == 800
        samples = [h["val/samples"] for h in run.history if "val/samples" in h]
        assert len(samples) == 2  # smoke validates after steps 2 and 4
        table = json.loads((run.path.parent / "files" / samples[-1]["path"]).read_text())
        assert table["columns"] == ["step", "prompt", "reference", "output"]
        assert [row[:3] for row in table["data"]] == [[4, m[0]["content"], m[1]["content"]] for m in VAL[:4]]
        assert run.summary["perf/peak_memory_mb"] > 0
    assert {(r.config["optimizer"]["lr"], r.config["adapter"]["r"]) for r in runs} == {
        (1e-4, 4),
        (1e-4, 8),
        (3e-4, 4),
        (3e-4, 8),
    }
    # One job's run is over before the next one logs anything: no W&B run spans two jobs.
    spans = [(min(h["_timestamp"] for h in r.history), max(h["_timestamp"] for h in r.history)) for r in runs]
    assert all(spans[i][1] < spans[i + 1][0] for i in range(3))

    report.main([str(sweep)])
    best = min(jobs, key=_best_loss)
    out = capsys.readouterr().out
    assert f"Best job: {best.name} (adapter.r=" in out
    md = (sweep / "report.md").read_text()
    assert f"| ★ {best.name} |" in md and md.count("★") == 1
    for plot in ("val_loss.png", "val.best_loss_vs_adapter.r.png", "val.best_loss_vs_optimizer.lr.png"):
        assert (sweep / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_job_is_recorded_and_the_sweep_goes_on_with_submitit_local(tmp_path):
    sweep = tmp_path / "sweep"
    # data.max_length=1 leaves no example with a target token: that job stops with a DataError.
    _train(
        "-m",
        "hydra/launcher=submitit_local",
        *FAST,
        "logger=csv",
        "data.max_length=1,64",
        f"hydra.sweep.dir={sweep}",
    )
    failed, ok = sweep / "0", sweep / "1"
    assert _overrides(failed)["data.max_length"] == "1"
    assert not (failed / "metrics.json").exists()
    assert (failed / "error.txt").read_text().strip().splitlines()[-1].startswith("sftlab.errors.DataError: ")
    assert math.isfinite(_best_loss(ok))
    assert (ok / "adapter" / "adapter_config.json").is_file()
    assert list((sweep / ".submitit").iterdir())  # the jobs really went through submitit

    jobs = report.find_jobs(sweep)
    assert [(j.name, j.status) for j in jobs] == [("0", "failed"), ("1", "ok")]


def test_optuna_search_of_three_trials_reports_the_best_trial(tmp_path, capsys):
    sweep = tmp_path / "search"
    _train(
        "hparams_search=optuna", "hydra.sweeper.n_trials=3", *FAST, "logger=csv", f"hydra.sweep.dir={sweep}"
    )

    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    assert [j.name for j in jobs] == ["0", "1", "2"]
    results = OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml"))
    best = min(jobs, key=_best_loss)
    assert results["best_value"] == _best_loss(best)
    swept = _overrides(best)
    assert set(results["best_params"]) == {"optimizer.lr", "adapter.r", "trainer.max_epochs"}
    for key, value in results["best_params"].items():
        assert float(swept[key]) == value

    report.main([str(sweep)])
    out = capsys.readouterr().out
    assert "Optuna best trial: " in out and f"Best job: {best.name} " in out
