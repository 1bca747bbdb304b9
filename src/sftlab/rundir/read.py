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
