"""`sftlab-data audit` (the Hydra app) and the `data.audit` gate of `sftlab-train`, run in-process on a small
dataset with one planted leak and one duplicate."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from sftlab.cli import data as data_cli
from sftlab.cli import train as train_cli
from tests.conftest import ISO_DATA

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def leaky_data(tmp_path_factory) -> list[str]:
    """12 train rows (line 12 repeats line 1) and 4 val rows (line 4 is train line 2)."""
    folder = tmp_path_factory.mktemp("data")
    train = (ISO_DATA / "train.jsonl").read_text().splitlines()[:11]
    val = (ISO_DATA / "val.jsonl").read_text().splitlines()[:3]
    (folder / "train.jsonl").write_text("\n".join([*train, train[0]]) + "\n")
    (folder / "val.jsonl").write_text("\n".join([*val, train[1]]) + "\n")
    return [
        "model=tiny_random",
        f"data.train_path={folder / 'train.jsonl'}",
        f"data.val_path={folder / 'val.jsonl'}",
        "data.test_path=null",
    ]


def output(capfd) -> str:
    """What the command printed: Hydra's job logging writes to stdout, rich tables to stderr."""
    captured = capfd.readouterr()
    return captured.out + captured.err


def run_command(monkeypatch, entry, argv: list[str]) -> int:
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        entry()
        raise SystemExit(0)
    return exit_info.value.code


def test_audit_fails_on_named_checks_and_writes_a_report_with_plots(monkeypatch, tmp_path, leaky_data, capfd):
    out = tmp_path / "report"
    argv = [
        "sftlab-data",
        "audit",
        *leaky_data,
        "fail_on=[contamination>0,duplicates>0.05,conflicts>0]",
        f"out_dir={out}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    assert run_command(monkeypatch, data_cli.main, argv) == 1
    err = output(capfd)
    assert "audit failed: contamination>0: val = 0.25; duplicates>0.05: train = 0.08333" in err
    assert "conflicts>0:" not in err

    report = json.loads((out / "audit.json").read_text())
    assert report["fail_on"]["failed"] == ["contamination>0: val = 0.25", "duplicates>0.05: train = 0.08333"]
    assert report["checks"]["rows"] == {"train": 12, "val": 4}
    md = (out / "audit.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(images) == ["kinds_train.png", "kinds_val.png", "lengths_train.png", "lengths_val.png"]
    assert all((out / name).read_bytes().startswith(PNG) for name in images)
    train = leaky_data[1].split("=", 1)[1]
    assert "**FAILED**" in md and f"- `{train}:1`, `{train}:12`" in md


def test_audit_passes_without_fail_on_and_rejects_a_bad_check(monkeypatch, tmp_path, leaky_data, capfd):
    base = ["sftlab-data", "audit", *leaky_data, f"hydra.run.dir={tmp_path}"]
    assert run_command(monkeypatch, data_cli.main, [*base, f"out_dir={tmp_path / 'ok'}"]) == 0
    assert (tmp_path / "ok" / "audit.md").is_file()
    assert run_command(monkeypatch, data_cli.main, [*base, "fail_on=[leaks>0]"]) == 2
    assert "audit.fail_on: cannot read ['leaks>0']" in output(capfd)


def test_quote_checks_lets_checks_be_typed_bare():
    assert data_cli.quote_checks("fail_on=[contamination>0,duplicates>0.05]") == (
        'audit.fail_on=["contamination>0","duplicates>0.05"]'
    )
    assert data_cli.quote_checks("audit.fail_on=rows<10") == 'audit.fail_on=["rows<10"]'
    assert data_cli.quote_checks("data.max_length=64") == "data.max_length=64"


def test_train_with_data_audit_refuses_contaminated_data(monkeypatch, tmp_path, leaky_data, capfd):
    run_dir = tmp_path / "run"
    argv = ["train.py", *leaky_data, "logger=csv", "data.audit=true", f"hydra.run.dir={run_dir}"]
    assert run_command(monkeypatch, train_cli.main, argv) == 1
    assert "data.audit: the data fails contamination>0: val = 0.25" in output(capfd)
    assert (run_dir / "audit" / "audit.md").is_file()
    assert not (run_dir / "adapter").exists() and not (run_dir / "checkpoints").exists()


def test_usage_without_a_subcommand(monkeypatch, capsys):
    assert run_command(monkeypatch, data_cli.main, ["sftlab-data"]) == 2
    assert "usage: sftlab-data {audit}" in capsys.readouterr().out
    assert Path(data_cli.__file__).name == "data.py"
