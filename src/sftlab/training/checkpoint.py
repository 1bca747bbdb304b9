"""Checkpoint plumbing: atomic checkpoint writes, `resume=auto|<path>`, and restoring the best checkpoint.

Why a CheckpointIO of our own: Lightning's default writes through an fsspec transaction whose temporary file
lives in the system temp directory; when that is another filesystem than the run directory (tmpfs /tmp, a
cluster scratch or NFS run directory) the final move degrades to a copy onto `last.ckpt`, and a kill during
that copy leaves a truncated file. Here the temporary file sits beside the target, is fsynced, and
`os.replace` swaps it in: a reader (or a resume after `kill -9`) sees the old or the new file, never half.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from sftlab.errors import ConfigError

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to `.<name>.tmp-<pid>` in the target directory, fsync, then `os.replace`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if "://" in str(path):  # remote storage: keep Lightning's fsspec path
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return None


def _readable(path: Path) -> dict[str, Any] | None:
    """The checkpoint's loop position if it loads and can resume training (has optimizer state), else None."""
    if path.is_dir():
        return _readable_deepspeed(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file (truncated, foreign) is skipped, and said so
        log.warning("resume=auto: skipping unreadable checkpoint %s (%s)", path, type(err).__name__)
        return None
    if not ckpt.get("optimizer_states"):
        return None  # weights-only (top-k "best" files): cannot continue the optimizer
    return {"global_step": ckpt.get("global_step", 0), "last": path.name.startswith("last")}


# DeepSpeed (Lightning's DeepSpeedStrategy) writes each checkpoint as a directory named like the file would
# be: <name>.ckpt/checkpoint/mp_rank_00_model_states.pt holds the module weights (trainable ones only with
# exclude_frozen_parameters, as conf/trainer/deepspeed.yaml sets) and Lightning's loop state; the optimizer
# state is in its *_optim_states.pt shards.
DEEPSPEED_TAG = "checkpoint"


def _deepspeed_states(path: Path) -> Path:
    return path / DEEPSPEED_TAG / "mp_rank_00_model_states.pt"


def _readable_deepspeed(path: Path) -> dict[str, Any] | None:
    states = _deepspeed_states(path)
    try:
        ckpt = torch.load(states, map_location="cpu", weights_only=True)
    except Exception as err:
        log.warning("resume=auto: skipping unreadable DeepSpeed checkpoint %s (%s)", path, type(err).__name__)
        return None
    if not any(states.parent.glob("*optim_states.pt")):
        return None
    return {"global_step": ckpt.get("global_step", 0), "last": path.name.startswith("last")}


def find_resume_checkpoint(checkpoint_dir: Path) -> Path | None:
    """Newest readable, resumable checkpoint: highest global step; on a tie `last*.ckpt` (written last)."""
    best, best_key = None, None
    for path in sorted(checkpoint_dir.glob("*.ckpt")):
        info = _readable(path)
        if info is None:
            continue
        key = (info["global_step"], info["last"], path.stat().st_mtime)
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    """`resume` as `trainer.fit(ckpt_path=...)` wants it.

    `auto` resumes from the newest readable checkpoint in `<run_dir>/checkpoints` and starts fresh when there
    is none, so one command serves the first launch and every restart (a preempted SLURM job that requeues
    itself). The run directory is Hydra's: pass `hydra.run.dir=<old run dir>` to continue an earlier run.
    """
    if not resume:
        return None
    if str(resume) == "auto":
        found = find_resume_checkpoint(run_dir / "checkpoints")
        if found is None:
            log.info("resume=auto: no checkpoint in %s; starting a fresh run", run_dir / "checkpoints")
            return None
        log.info("resume=auto: resuming from %s", found)
        return str(found)
    path = Path(resume)
    if not (path.is_file() or _deepspeed_states(path).is_file()):
        raise ConfigError(
            f"resume={resume!r}: no such checkpoint file. Pass a .ckpt path, or resume=auto "
            "with hydra.run.dir=<the run directory to continue>."
        )
    return str(path)


def trainable_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The trainable weights a checkpoint holds, named as in the LightningModule's state dict: a Lightning
    file, or a DeepSpeed directory (its fp32 master weights, the same precision a file holds)."""
    path = Path(path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(path, tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    # DeepSpeed wraps Lightning's module wrapper, whose attribute is `_forward_module`.
    return {k.removeprefix("_forward_module."): v for k, v in state.items()}


def restore_best(module: torch.nn.Module, best_path: str | None) -> bool:
    """Load the trainable weights of the best checkpoint into `module` (early stopping keeps the best)."""
    if not best_path or not (Path(best_path).is_file() or _deepspeed_states(Path(best_path)).is_file()):
        return False
    state = trainable_weights(best_path)
    missing = set(state) - set(module.state_dict())
    if missing:
        raise RuntimeError(f"checkpoint {best_path} has weights this model lacks: {sorted(missing)[:3]} ...")
    module.load_state_dict(state, strict=False)
    return True
