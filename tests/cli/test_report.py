"""sftlab-report on hand-made job directories laid out exactly as train.py and Hydra write them."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from sftlab.cli import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CSV_HEADER = "epoch,lr-AdamW,step,train/loss,val/loss\n"


def _job(root, name, overrides, *, best=None, exact=None, val_curve=(), error=None):
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    (job / "config.yaml").write_text("seed: 42\n")
    (job / "csv").mkdir()
    rows = [f"0,,{step},,{loss}\n" for step, loss in val_curve] + ["0,,1,2.5,\n", ",0.0002,1,,\n"]
    (job / "csv" / "metrics.csv").write_text(CSV_HEADER + "".join(rows))
    if error:
        (job / "error.txt").write_text(f"Traceback (most recent call last):\n  ...\n{error}\n")
    else:
        metrics = {
            "val": {"best_loss": best, "loss": best},
            "train": {"loss": 2.5},
            "steps": 4,
            "runtime_s": 12.34,
            "eval": {"base": {"exact_match": 0.0, "n": 4}, "tuned": {"exact_match": exact, "n": 4}},
        }
        (job / "metrics.json").write_text(json.dumps(metrics))
    return job


@pytest.fixture
def sweep(tmp_path):
    common = ["experiment=smoke"]
    _job(
        tmp_path,
        "0",
        [*common, "optimizer.lr=1e-4", "adapter.r=8"],
        best=2.1,
        exact=0.25,
        val_curve=[(2, 2.4), (4, 2.1)],
    )
    _job(
        tmp_path,
        "1",
        [*common, "optimizer.lr=2e-4", "adapter.r=8"],
        best=1.7,
        exact=0.5,
        val_curve=[(2, 2.0), (4, 1.7)],
    )
    _job(
        tmp_path,
        "2",
        [*common, "optimizer.lr=1e-4", "adapter.r=16"],
        best=1.9,
        exact=0.75,
        val_curve=[(2, 2.2), (4, 1.9)],
    )
    _job(tmp_path, "10", [*common, "optimizer.lr=2e-4", "adapter.r=16"], error="ValueError: boom")
    return tmp_path


def test_jobs_in_natural_order_with_swept_keys_only(sweep):
    jobs = report.find_jobs(sweep)
    assert [j.name for j in jobs] == ["0", "1", "2", "10"]
    assert report.swept_keys(jobs) == ["adapter.r", "optimizer.lr"]  # experiment=smoke is common to all
    assert [j.status for j in jobs] == ["ok", "ok", "ok", "failed"]
    assert jobs[3].error == "ValueError: boom"
    assert jobs[1].curves["val/loss"] == [(2, 2.0), (4, 1.7)]
    assert jobs[1].curves["lr-AdamW"] == [(1, 0.0002)]


def test_best_job_by_loss_is_the_minimum_and_by_exact_match_the_maximum(sweep):
    jobs = report.find_jobs(sweep)
    assert report.best_job(jobs, "val.best_loss", minimize=True).name == "1"
    assert report.best_job(jobs, "eval.tuned.exact_match", minimize=False).name == "2"
    assert report.lower_is_better("val.best_loss") and not report.lower_is_better("eval.tuned.exact_match")


def test_sweep_report_table_marks_best_and_failed_and_writes_plots(sweep, capsys):
    report.main([str(sweep)])
    out = capsys.readouterr().out
    assert "Best job: 1 (adapter.r=8, optimizer.lr=2e-4) with val.best_loss = 1.7000" in out
    assert "Failed jobs (see their error.txt): 10" in out
    md = (sweep / "report.md").read_text()
    header = "| job | adapter.r | optimizer.lr | status | best val loss | train loss | exact_match | steps |"
    assert header + " runtime s |" in md
    assert "| ★ 1 | 8 | 0.0002 | ok | 1.7000 | 2.5000 | 0.5000 | 4 | 12.3 |" in md
    assert "| 0 | 8 | 0.0001 | ok | 2.1000 | 2.5000 | 0.2500 | 4 | 12.3 |" in md
    assert "| 10 | 16 | 0.0002 | failed: ValueError: boom | - | - | - | - | - |" in md
    plots = ["val_loss.png", "val.best_loss_vs_adapter.r.png", "val.best_loss_vs_optimizer.lr.png"]
    for name in plots:
        assert (sweep / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in md


def test_metric_option_adds_its_column_and_picks_the_best_by_it(sweep, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("out")
    report.main([str(sweep), "--metric", "eval.tuned.exact_match", "--out", str(out_dir)])
    md = (out_dir / "report.md").read_text()
    assert "| ★ 2 | 16 | 0.0001 | ok | 1.9000 | 2.5000 | 0.7500 | 4 | 12.3 |" in md
    assert (out_dir / "eval.tuned.exact_match_vs_adapter.r.png").read_bytes()[:8] == PNG_MAGIC
    assert not (sweep / "report.md").exists()


def test_optuna_best_trial_is_reported(sweep, capsys):
    OmegaConf.save(
        OmegaConf.create({"name": "optuna", "best_params": {"optimizer.lr": 2e-4}, "best_value": 1.7}),
        sweep / "optimization_results.yaml",
    )
    report.main([str(sweep)])
    assert "Optuna best trial: {'optimizer.lr': 0.0002} -> 1.7000" in capsys.readouterr().out


def test_single_run_plots_its_curves(tmp_path):
    run = _job(tmp_path, "run", ["model=tiny_random"], best=1.7, exact=0.5, val_curve=[(2, 2.0), (4, 1.7)])
    report.main([str(run)])
    md = (run / "report.md").read_text()
    assert "- val.best_loss: 1.7000" in md and "- eval.tuned.exact_match: 0.5000" in md
    assert (run / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_a_directory_without_jobs_is_refused_with_what_to_pass(tmp_path):
    with pytest.raises(SystemExit, match="no job directories"):
        report.main([str(tmp_path)])
