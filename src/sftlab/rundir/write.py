"""The run directory contract (DESIGN.md): config.yaml, adapter/ (or model/), metrics.json, checkpoints/.

Everything a finished run needs to be reused is written here, loadable with plain transformers + peft.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from sftlab.data.templates import ChatTemplate
from sftlab.errors import SFTLabError
from sftlab.model.load import ORIGIN_FILE
from sftlab.rundir.redact import redact, redact_override, secret_override, secret_values

MIN_FREE_BYTES = (
    1 << 30
)  # adapters, checkpoints and logs of a LoRA run fit in far less; a full disk fails late


def check_writable(run_dir: Path, min_free: int = MIN_FREE_BYTES) -> None:
    """Fail before training, not at the first checkpoint, when the run directory cannot take the outputs."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise SFTLabError(
            f"paths.output_dir={str(run_dir)!r} is not writable ({err.strerror}). "
            "Choose another directory with hydra.run.dir=... (or fix its permissions)."
        ) from None
    free = shutil.disk_usage(run_dir).free
    if free < min_free:
        raise SFTLabError(
            f"paths.output_dir={str(run_dir)!r}: only {free / 2**20:.0f} MiB free on its disk; a run needs "
            f"at least {min_free / 2**20:.0f} MiB for checkpoints and the adapter. Free space or set "
            "hydra.run.dir elsewhere."
        )


def write_json(path: Path, data: Any) -> None:
    """Write atomically (a reader never sees half a file), with secrets masked."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(redact(data), indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def resolved_config(cfg: DictConfig) -> dict:
    """The fully resolved config as plain data with secrets masked: what config.yaml and W&B receive."""
    return redact(OmegaConf.to_container(cfg, resolve=True))


def write_config(run_dir: Path, cfg: DictConfig) -> None:
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved_config(cfg)), encoding="utf-8")


HYDRA_RECORD = ".hydra"


def write_hydra_record(run_dir: Path, cfg: DictConfig) -> None:
    """`.hydra/` (config.yaml, hydra.yaml, overrides.yaml) as Hydra writes it at job start, but with secrets
    masked, and written by sftlab only once the run directory is claimed: Hydra's own write
    (`hydra.output_subdir`, null in conf/hydra/default.yaml) would rewrite the record of an existing run even
    for a launch that is then refused."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return  # composed outside a Hydra app (tests, the bench): there is no Hydra record to write
    hydra_cfg = OmegaConf.to_container(HydraConfig.get(), resolve=False)
    given = hydra_cfg["overrides"]["task"] + hydra_cfg["overrides"]["hydra"]
    # A secret's value also appears in derived strings (job.override_dirname): mask it wherever it is.
    secrets = secret_values() + [o.partition("=")[2] for o in given if secret_override(o)]
    hydra_cfg["overrides"]["task"] = [redact_override(o) for o in hydra_cfg["overrides"]["task"]]
    hydra_cfg["overrides"]["hydra"] = [redact_override(o) for o in hydra_cfg["overrides"]["hydra"]]
    out = run_dir / HYDRA_RECORD
    out.mkdir(parents=True, exist_ok=True)
    for name, data in (
        ("config.yaml", redact(OmegaConf.to_container(cfg, resolve=False), secrets)),
        ("hydra.yaml", {"hydra": redact(hydra_cfg, secrets)}),
        ("overrides.yaml", hydra_cfg["overrides"]["task"]),
    ):
        (out / name).write_text(OmegaConf.to_yaml(OmegaConf.create(data)), encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; when the block completes, it replaces `target` (the old one
    is renamed away first and deleted only after the swap). A kill or error inside the block leaves `target`
    as it was: a reader never finds half a directory (an adapter without its tokenizer)."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def copy_base_origin(model: PeftModel, adapter_dir: Path) -> None:
    """adapter/base_origin.json: how sftlab built a cache-only base, so the adapter is loadable elsewhere."""
    base = Path(str(model.peft_config["default"].base_model_name_or_path))
    if (base / ORIGIN_FILE).is_file():
        shutil.copyfile(base / ORIGIN_FILE, adapter_dir / "base_origin.json")


def save_model(
    run_dir: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate
) -> Path:
    """adapter/ for adapter runs (PeftModel.from_pretrained-loadable), model/ for full fine-tuning.

    The tokenizer is saved beside it with the training template as its chat template, so
    `apply_chat_template(..., add_generation_prompt=True)` renders exactly the training prompt.
    """
    out = run_dir / ("adapter" if isinstance(model, PeftModel) else "model")
    with atomic_dir(out) as tmp:
        if isinstance(model, PeftModel):
            # Not the full (resized) embedding matrices: new-token rows are trained as trainable token rows
            # inside the adapter and re-created deterministically on load (sftlab.model.tokens): small.
            model.save_pretrained(tmp, save_embedding_layers=False)
            copy_base_origin(model, tmp)
        else:
            model.save_pretrained(tmp)
        tokenizer.chat_template = template.to_jinja()
        tokenizer.save_pretrained(tmp)
    return out


def _logged(trainer: Any, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


def final_metrics(trainer: Any, **extra: Any) -> dict:
    """metrics.json: final and best losses from the trainer, plus what the caller adds (eval, data counts)."""
    cb = trainer.checkpoint_callback
    best = float(cb.best_model_score) if cb is not None and cb.best_model_score is not None else None
    return {
        "train": {"loss": _logged(trainer, "train/loss")},
        "val": {
            "loss": _logged(trainer, "val/loss"),
            "best_loss": best if best is not None else _logged(trainer, "val/loss"),
        },
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        **extra,
    }
