"""Secrets: a credential typed as an override is refused before Hydra sees it (nothing written, the value
never echoed), and the `.hydra/` record sftlab writes masks credential keys and values like config.yaml."""

from __future__ import annotations

import sys

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from sftlab import build
from sftlab.rundir import write

TOKEN = "hf_Zq8rT2secretvalue"


@pytest.mark.parametrize("override", [f"+model.hf_token={TOKEN}", f"+logger.wandb.api_key={TOKEN}"])
def test_secret_on_the_command_line_is_refused_before_anything_is_written(
    override, tmp_path, monkeypatch, capsys
):
    from sftlab.cli import train

    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["train.py", "model=tiny_random", override, f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit) as exit_:
        train.main()
    message = str(exit_.value.code)
    assert override.split("=")[0].lstrip("+") in message and "environment" in message
    assert TOKEN not in message + capsys.readouterr().out
    assert not run_dir.exists()


def test_hydra_record_masks_credentials(tmp_path, monkeypatch):
    cfg = build.compose(["model=tiny_random", f"+model.hf_token={TOKEN}"], return_hydra_config=True)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    write.write_hydra_record(tmp_path, cfg)
    files = {p.name: p.read_text() for p in (tmp_path / ".hydra").iterdir()}
    assert set(files) == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert all(TOKEN not in text for text in files.values())
    assert "+model.hf_token=***" in files["overrides.yaml"] and "hf_token: '***'" in files["config.yaml"]
