"""Many nodes, proven on one machine: 2 "nodes" x 1 process on loopback (gloo) train the adapter that
1 process trains with the same global batch, started the way a launcher starts them (NODE_RANK,
MASTER_ADDR, MASTER_PORT) and the way SLURM's `srun` does (Lightning's SLURMEnvironment reads its variables).

Each node gets its own run directory here so their logs stay apart; on a cluster they share one and only
global rank 0 writes into it. LoRA dropout is off: each rank draws its own masks (see test_ddp.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, small_iso_data, tiny_train_command

pytestmark = pytest.mark.slow

COMMON = ["adapter.lora_dropout=0.0", "trainer.precision=32", "trainer.max_epochs=1", "eval=none"]
NODES = [
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.num_nodes=2",
    "data.batch_size=2",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _start(run_dir, overrides: list[str], env: dict[str, str]) -> subprocess.Popen:
    cmd = tiny_train_command(run_dir, *COMMON, *overrides)
    with open(f"{run_dir}.out", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(procs: list[subprocess.Popen], run_dirs: list) -> None:
    for proc, run_dir in zip(procs, run_dirs, strict=True):
        try:
            rc = proc.wait(timeout=600)
        finally:
            proc.kill()
        assert rc == 0, Path(f"{run_dir}.out").read_text()[-4000:]


def _two_nodes(tmp_path, data: list[str], env_of) -> dict[str, torch.Tensor]:
    port = _free_port()
    dirs = [tmp_path / f"node{r}" for r in range(2)]
    overrides = [*data, *NODES, "data.batch_size=2"]
    procs = [_start(dirs[r], overrides, {**_clean_env(), **env_of(r, port)}) for r in range(2)]
    _wait(procs, dirs)
    # Global rank 1 trains; only rank 0 writes the run directory (node 1 knows its rank from NODE_RANK alone).
    assert not (dirs[1] / "adapter").exists() and not (dirs[1] / "config.yaml").exists()
    return load_file(dirs[0] / "adapter/adapter_model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    data = small_iso_data(tmp, n_train=12, n_val=4)
    _wait([_start(tmp / "single", [*data, "data.batch_size=4"], _clean_env())], [tmp / "single"])
    ckpt = torch.load(tmp / "single/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    return data, load_file(tmp / "single/adapter/adapter_model.safetensors")


def _same(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert ref.keys() == got.keys()
    lora_b = [name for name in ref if "lora_B" in name]
    assert lora_b and all(ref[name].abs().max() > 0 for name in lora_b)  # B starts at zero: it trained
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5, msg=name)


def test_two_nodes_started_by_a_launcher_train_the_single_process_adapter(tmp_path, reference):
    data, ref = reference

    def env(rank: int, port: int) -> dict[str, str]:
        return {"NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}

    _same(ref, _two_nodes(tmp_path, data, env))


def test_two_nodes_started_by_srun_train_the_single_process_adapter(tmp_path, reference):
    data, ref = reference

    def env(rank: int, port: int) -> dict[str, str]:
        return {
            "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_PROCID": str(rank),
            "SLURM_NODEID": str(rank),
            "SLURM_LOCALID": "0",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "sftlab",
            "SLURM_NODELIST": "127.0.0.1",
            "MASTER_PORT": str(port),
        }

    _same(ref, _two_nodes(tmp_path, data, env))
