"""sftlab-merge never destroys what it did not write: an `out` that is the run, holds it, lies in another run
or holds other files is refused before anything is touched, and an earlier merge output is replaced only once
the new one is complete."""

from __future__ import annotations

import pytest

from sftlab.cli import merge as merge_cli
from sftlab.errors import SFTLabError
from tests.conftest import make_adapter_run
from tests.reliability.conftest import snapshot


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("merge")
    run_dir, *_ = make_adapter_run(base / "runs" / "a", [])
    other, *_ = make_adapter_run(base / "runs" / "b", [])
    return base, run_dir, other


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("{run}", "is \\(or contains\\) the input run"),
        ("{base}/runs", "is \\(or contains\\) the input run"),
        ("{other}", "is inside another run directory"),
        ("{other}/adapter", "is inside another run directory"),
        ("{run}/adapter", "not an sftlab-merge output"),
        ("{base}/notes", "not an sftlab-merge output"),
    ],
    ids=["the-run", "folder-holding-it", "another-run", "inside-another-run", "run-adapter", "other-files"],
)
def test_out_that_would_destroy_something_is_refused_with_overwrite(runs, out, message):
    base, run_dir, other = runs
    (base / "notes").mkdir(exist_ok=True)
    (base / "notes" / "todo.txt").write_text("keep me")
    before = snapshot(base)
    target = out.format(run=run_dir, base=base, other=other)
    with pytest.raises(SFTLabError, match=message):
        merge_cli.merge(merge_cli.MergeArgs(run=str(run_dir), out=target, overwrite=True))
    assert snapshot(base) == before


def test_an_earlier_merge_is_replaced_only_once_the_new_one_is_complete(runs, monkeypatch):
    _, run_dir, _ = runs
    out = run_dir / "merged"
    merge_cli.merge(merge_cli.MergeArgs(run=str(run_dir)))
    first = snapshot(out)
    assert "model.safetensors" in first and "merge_report.json" in first

    with pytest.raises(SFTLabError, match="pass overwrite=true"):
        merge_cli.merge(merge_cli.MergeArgs(run=str(run_dir)))

    def disk_full(out_dir, *args):  # the new output fails halfway through writing
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merge_cli, "write_merged", disk_full)
    with pytest.raises(OSError, match="No space left"):
        merge_cli.merge(merge_cli.MergeArgs(run=str(run_dir), overwrite=True))
    assert snapshot(out) == first
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".merged")) == []
