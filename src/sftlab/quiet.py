"""The warnings a user of sftlab cannot act on, silenced in one place for every command.

Each filter names one message and the module (or logger) that emits it, so the same library's other
warnings still show, and says why hiding it is safe. Warnings a user can act on (a bad config, data
dropped, a deprecated option they set) are not here. `quiet()` runs when `sftlab.cli` or `sftlab.bench` is
imported, before a command module imports torch, peft or Lightning (bitsandbytes speaks once, at import); it
is idempotent. A top-level module, not in cli/, because cli and bench may not import each other.
"""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    """Drops a logger's records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# (logger name, message prefixes). One Filter instance per logger, so a second quiet() adds nothing.
_LOG_FILTERS = {
    # bitsandbytes tries to fetch a faster CPU 4-bit kernel from the Hugging Face hub at import and falls back
    # to its own; sftlab runs offline and the fallback is what QLoRA on CPU is measured with.
    "bitsandbytes.backends.cpu.ops": _DropMessages("Failed to load CPU gemm_4bit_forward from kernels"),
    # An advertisement for Lightning's cloud logger, printed by every Trainer; sftlab logs to W&B and CSV.
    "pytorch_lightning.utilities.rank_zero": _DropMessages("💡 Tip: For seamless cloud logging"),
    # transformers renamed the KV-cache argument after 5.0, which knows only `past_key_values`; peft's
    # generation wrappers and sftlab-serve pass that name, which works on every version sftlab allows.
    "transformers.utils.generic": _DropMessages("`past_key_values`/`cache_params` are deprecated"),
}

# (message regex, category, module regex) for warnings.filterwarnings.
_WARNING_FILTERS = [
    # Lightning's own pytree helper builds torch's deprecated LeafSpec; Lightning will change it, not users.
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"pytorch_lightning\.utilities\._pytree",
    ),
    # peft reads `model.is_gradient_checkpointing`, a deprecated alias in transformers 5 (peft's to change).
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
    # `gradient_checkpointing=true` calls gradient_checkpointing_enable, the name that works from transformers
    # 5.0 on (its replacement is newer than sftlab's floor); peft's k-bit preparation calls it too.
    (r"`gradient_checkpointing_enable` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
    # The benchmark and the tests fit without validation on purpose; SFTDataModule always has a val loader,
    # so a training run never reaches this warning by mistake.
    (r"You defined a `validation_step` but have no `val_dataloader`", UserWarning, r""),
]


def quiet() -> None:
    """Install the filters above (again, if something reset the warning filters)."""
    for name, drop in _LOG_FILTERS.items():
        logging.getLogger(name).addFilter(drop)
    for message, category, module in _WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
