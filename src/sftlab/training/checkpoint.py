"""Checkpoint plumbing: atomic checkpoint writes, `resume=auto|<path>`, and restoring the best checkpoint.

Why a CheckpointIO of our own: Lightning's default writes through an fsspec transaction whose temporary file
lives in the system temp directory; when that is another filesystem than the run directory (tmpfs /tmp, a
cluster scratch or NFS run directory) the final move degrades to a copy onto `last.ckpt`, and a kill during
that copy leaves a truncated file. Here the temporary file sits beside the target, is fsynced, and
`os.replace` swaps it in: a reader (or a resume after `kill -9`) sees the old or the new file, never half.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from sftlab.errors import ConfigError, SFTLabError

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
        present = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
        if found is None and present:
            # Starting over here would overwrite the run whose checkpoints could not be read.
            raise SFTLabError(
                f"resume=auto: none of the checkpoints in {run_dir / 'checkpoints'} can resume training "
                f"({', '.join(present)}: unreadable or weights-only; the log above says which). Pass a "
                "readable one with resume=<path>, or start a new run in another hydra.run.dir."
            )
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
    load_checkpoint(path if path.is_file() else _deepspeed_states(path), what=f"resume={resume!r}")
    return str(path)


def load_checkpoint(path: str | Path, what: str) -> dict[str, Any]:
    """torch.load a checkpoint as data, or one message naming the file when it is truncated or not one."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, a foreign pickle, a text file: one answer for all
        raise SFTLabError(
            f"{what}: {path} is not a readable checkpoint ({type(err).__name__}: {str(err)[:120]}). It is "
            "truncated (a disk filled up or a copy was cut short) or not a PyTorch checkpoint; pass another "
            "one (resume=auto picks the newest readable checkpoint of the run directory)."
        ) from None


def trainable_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The trainable weights a checkpoint holds, named as in the LightningModule's state dict: a Lightning
    file, or a DeepSpeed directory (its fp32 master weights, the same precision a file holds)."""
    path = Path(path)
    if path.is_file():
        return load_checkpoint(path, what="the best checkpoint")["state_dict"]
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


# ---- what a resumed run depends on ---------------------------------------------------------------------
SETTINGS_KEY = "sftlab_settings"
# The sample plan, the schedule's length and the adapter's shape depend on these: a resume that changes one
# would continue a different run than the checkpoint's (or fail in load_state_dict). The learning rate alone
# is honoured: the restored optimizer and scheduler are rescaled to it from the resume point.
SETTING_KEYS = (
    "model.name_or_path",
    "adapter",
    "optimizer",
    "scheduler",
    "data.batch_size",
    "data.max_length",
    "data.packing",
    "trainer.accumulate_grad_batches",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.devices",
    "trainer.num_nodes",
    "seed",
)
# The learning rate is rescaled from the resume point; fused / foreach pick another kernel for the same update
# (the optimizer state loads into any of them; results differ in the last bits, so not bit-identical).
SAFE_CHANGES = ("optimizer.lr", "optimizer.fused", "optimizer.foreach")
DATA_KEY = "data (tokenized train split, sha256)"


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def run_settings(cfg: Any, train_examples: list[Any]) -> dict[str, Any]:
    """The settings a checkpoint's training trajectory depends on, flat (`adapter.r`, `optimizer.lr`), plus a
    hash of the tokenized training split: a changed data file, template or tokenizer shows there."""
    from omegaconf import OmegaConf

    flat: dict[str, Any] = {}
    for key in SETTING_KEYS:
        node = OmegaConf.select(cfg, key, default=None)
        value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        _flatten(key, value, flat)
    digest = hashlib.sha256()
    for ex in train_examples:
        digest.update(json.dumps([list(ex.input_ids), list(ex.labels)]).encode())
    flat[DATA_KEY] = digest.hexdigest()
    return {k: v if isinstance(v, str | int | float | bool | type(None)) else str(v) for k, v in flat.items()}


def check_resume(ckpt_path: str | None, settings: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Compare this launch's settings with those recorded in the checkpoint it resumes from.

    Returns the safe changes honoured ({key: (checkpoint's, now)}); raises one ConfigError naming every other
    difference. A checkpoint without a record (written by an older sftlab) is resumed with a warning."""
    if not ckpt_path:
        return {}
    recorded = load_checkpoint(ckpt_path, what="resume").get(SETTINGS_KEY)
    if recorded is None:
        log.warning("resume: %s records no run settings; cannot check that this launch matches it", ckpt_path)
        return {}
    diffs = {
        k: (recorded.get(k, "<absent>"), settings.get(k, "<absent>"))
        for k in sorted(set(recorded) | set(settings))
        if recorded.get(k, "<absent>") != settings.get(k, "<absent>")
    }
    unsafe = {k: v for k, v in diffs.items() if k not in SAFE_CHANGES}
    if unsafe:
        listing = "\n".join(
            f"  - {k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in unsafe.items()
        )
        raise ConfigError(
            f"resume from {ckpt_path}: this launch differs from the run it would continue in what the "
            f"checkpoint depends on ({len(unsafe)} difference(s)):\n{listing}\n"
            "Put these settings back to the checkpoint's values to resume, or start a new run "
            f"(another hydra.run.dir, or replace=true). Only {', '.join(SAFE_CHANGES)} may change on resume."
        )
    for k, (old, new) in diffs.items():
        log.warning("resume: %s changed from %r to %r; applied from the resume point on", k, old, new)
    return diffs


class ResumeSettings(pl.Callback):
    """Writes the run's settings into every checkpoint, applies a changed learning rate on resume, and
    refuses to save weights that are no longer finite (a resume from them could only diverge again)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def on_save_checkpoint(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict) -> None:
        bad = [
            k
            for k, v in checkpoint.get("state_dict", {}).items()
            if v.is_floating_point() and not v.isfinite().all()
        ]
        if bad:
            raise NonFiniteWeightsError(
                f"optimizer step {trainer.global_step}: {len(bad)} trainable tensor(s) hold NaN or inf "
                f"(e.g. {bad[0]}); this checkpoint was not written, so the checkpoints on disk still hold "
                "finite weights. Resume with resume=auto and a lower optimizer.lr (applied from the resume "
                "point), or trainer.precision=32."
            )
        checkpoint[SETTINGS_KEY] = self.settings

    def on_load_checkpoint(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict) -> None:
        old = (checkpoint.get(SETTINGS_KEY) or {}).get("optimizer.lr")
        new = self.settings.get("optimizer.lr")
        if old and new and old != new:
            rescale_lr(checkpoint, new / old)


def rescale_lr(checkpoint: dict, ratio: float) -> None:
    """Multiply every learning rate the optimizer and scheduler states hold (current, initial, base) by
    `ratio`: the schedule continues its shape from the resume point at the new peak rate."""
    for state in checkpoint.get("optimizer_states") or []:
        for group in state.get("param_groups", []):
            for key in ("lr", "initial_lr"):
                if key in group:
                    group[key] = group[key] * ratio
    for state in checkpoint.get("lr_schedulers") or []:
        for key in ("base_lrs", "_last_lr"):
            if key in state:
                state[key] = [lr * ratio for lr in state[key]]


class NonFiniteWeightsError(SFTLabError):
    """Trainable weights became NaN or infinite; they are not saved."""
