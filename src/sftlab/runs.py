"""Load a finished run directory: base model + adapter (or the full model), tokenizer and chat template.

Used by evaluation, chat, merge and serve, so they all see the model exactly as training saved it. Three
layouts load the same way:
  * a training run: config.yaml + adapter/ (PEFT) or model/ (full fine-tuning);
  * a merged directory written by `sftlab-merge`: a plain HF model directory + sftlab_config.yaml.
Special tokens added by the run live in the saved tokenizer; the base embeddings are grown to match it
before the adapter loads (the trained rows come from the adapter).
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
from sftlab.model.load import load_model, model_source
from sftlab.model.tokens import fit_embeddings

MERGED_CONFIG = "sftlab_config.yaml"  # the run's config, kept beside a merged model


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: DictConfig
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    template: ChatTemplate


def _config(run: Path, run_dir: str | Path) -> DictConfig:
    for name in ("config.yaml", MERGED_CONFIG):
        if (run / name).is_file():
            return OmegaConf.load(run / name)
    raise SFTLabError(
        f"run={str(run_dir)!r}: no config.yaml there. Pass a run directory written by train.py "
        "or a directory written by sftlab-merge."
    )


def load_run(run_dir: str | Path, *, with_adapter: bool = True, quantized: bool = True) -> LoadedRun:
    """`with_adapter=False` gives the base model of the run (for base-vs-tuned comparisons).

    `quantized=False` loads the base of a QLoRA / 8-bit run unquantized (in `model.dtype`), as merging needs.
    """
    run = Path(run_dir)
    cfg = _config(run, run_dir)
    template = instantiate(cfg.template, _convert_="all")
    adapter_dir, full_dir = run / "adapter", run / "model"
    if (adapter_dir / "adapter_config.json").is_file():
        base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        adapter = instantiate(cfg.adapter, _convert_="all")
        quantization = adapter.quantization_config() if quantized else None
        model = load_model(cfg.model, base, quantization_config=quantization)
        fit_embeddings(model, tokenizer)
        if with_adapter:
            model = PeftModel.from_pretrained(model, adapter_dir)
    elif (full_dir / "config.json").is_file() or (run / "config.json").is_file():
        model_dir = full_dir if (full_dir / "config.json").is_file() else run
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # Full fine-tuning / merged: the base is the run's configured model, grown to the saved vocabulary.
        model = load_model(cfg.model, str(model_dir) if with_adapter else model_source(cfg.model))
        fit_embeddings(model, tokenizer)
    else:
        raise SFTLabError(f"run={str(run_dir)!r}: neither adapter/ nor model/ found; did the run finish?")
    model.eval()
    if hasattr(template, "bind"):  # resolves `{eos_token}` / `bos: auto` for this run's tokenizer
        template.bind(tokenizer)
    return LoadedRun(run, cfg, model, tokenizer, template)
