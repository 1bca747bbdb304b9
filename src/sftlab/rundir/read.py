"""The read side of the run-directory contract: a finished run's (or merged model's) config.

`sftlab.build.load_run` builds the model, tokenizer and template from what this reads.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sftlab.errors import SFTLabError

MERGED_CONFIG = "sftlab_config.yaml"  # the run's config, kept beside a merged model


def run_config(run_dir: str | Path) -> DictConfig:
    """config.yaml of a training run, or sftlab_config.yaml of a directory written by sftlab-merge."""
    run = Path(run_dir)
    for name in ("config.yaml", MERGED_CONFIG):
        if (run / name).is_file():
            return OmegaConf.load(run / name)
    raise SFTLabError(
        f"run={str(run_dir)!r}: no config.yaml there. Pass a run directory written by sftlab-train "
        "or a directory written by sftlab-merge."
    )


def check_adapter(adapter_dir: Path) -> None:
    """A saved adapter whose files are all there and readable, or one message naming the file: a truncated
    safetensors file otherwise fails deep in peft with a raw SafetensorError or a size mismatch."""
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    needed = [weights, adapter_dir / "adapter_config.json", adapter_dir / "tokenizer_config.json"]
    missing = [p.name for p in needed if not p.is_file()]
    vocab = ("tokenizer.json", "tokenizer.model", "vocab.json")  # fast, sentencepiece, byte-level BPE files
    if not any((adapter_dir / name).is_file() for name in vocab):
        missing.append(" or ".join(vocab))
    if missing:
        raise SFTLabError(
            f"{adapter_dir}: the adapter is incomplete ({', '.join(missing)} missing): the save was cut "
            "short. Train again, or resume the run (resume=auto) to write it again."
        )
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no iteration
                f.get_slice(key)
    except Exception as err:
        raise SFTLabError(
            f"{weights}: not a readable safetensors file ({str(err)[:120]}); it is truncated or was "
            "replaced. Copy the run again, or resume it (resume=auto) to write the adapter again."
        ) from None
