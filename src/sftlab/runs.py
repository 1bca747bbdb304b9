"""Load a finished run directory: base model + adapter (or the full model), tokenizer and chat template.

Used by evaluation, chat, merge and serve, so they all see the model exactly as training saved it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sftlab.data.templates import ChatTemplate
from sftlab.errors import SFTLabError
from sftlab.model.load import load_model


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: DictConfig
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    template: ChatTemplate


def load_run(run_dir: str | Path, *, with_adapter: bool = True) -> LoadedRun:
    """`with_adapter=False` gives the base model of the run (for base-vs-tuned comparisons)."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise SFTLabError(f"run={run_dir!r}: no config.yaml there. Pass a run directory written by train.py.")
    cfg = OmegaConf.load(run / "config.yaml")
    template = instantiate(cfg.template, _convert_="all")
    adapter_dir, full_dir = run / "adapter", run / "model"
    if (adapter_dir / "adapter_config.json").is_file():
        base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        adapter = instantiate(cfg.adapter, _convert_="all")
        model = load_model(cfg.model, base, quantization_config=adapter.quantization_config())
        if with_adapter:
            model = PeftModel.from_pretrained(model, adapter_dir)
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    elif (full_dir / "config.json").is_file():
        model = load_model(cfg.model, str(full_dir))
        tokenizer = AutoTokenizer.from_pretrained(full_dir)
    else:
        raise SFTLabError(f"run={run_dir!r}: neither adapter/ nor model/ found; did the run finish?")
    model.eval()
    return LoadedRun(run, cfg, model, tokenizer, template)
