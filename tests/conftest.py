"""Shared fixtures. Unit tests use a tiny random Llama with the real SmolLM2 tokenizer; integration tests
(marked slow) use the real SmolLM2-135M-Instruct. Nothing touches the network."""

from __future__ import annotations

import os
import sys

# Before anything imports transformers / huggingface_hub, which read these once at import time.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path

import pytest
from omegaconf import DictConfig

from sftlab import build

ROOT = Path(__file__).resolve().parents[1]
ISO_DATA = ROOT / "src/sftlab/resources/iso_dates"


def small_iso_data(folder: Path, n_train: int = 24, n_val: int = 8) -> list[str]:
    """The first rows of the bundled ISO-date train and val files, copied into `folder`; returns the data
    overrides that select them (no test split)."""
    for split, n in (("train", n_train), ("val", n_val)):
        lines = (ISO_DATA / f"{split}.jsonl").read_text().splitlines()[:n]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return [
        f"data.train_path={folder / 'train.jsonl'}",
        f"data.val_path={folder / 'val.jsonl'}",
        "data.test_path=null",
    ]


def quiet_trainer(callbacks: list | None = None, **kwargs):
    """A CPU Lightning Trainer with no logger, progress bar, model summary or distributed sampler (the
    datamodule's StepPlanSampler is the sampler); `kwargs` add or override Trainer arguments."""
    import pytorch_lightning as pl

    return pl.Trainer(
        **{
            "accelerator": "cpu",
            "logger": False,
            "callbacks": callbacks or [],
            "enable_progress_bar": False,
            "use_distributed_sampler": False,
            "enable_model_summary": False,
            **kwargs,
        }
    )


def tiny_train_command(run_dir: Path, *overrides: str) -> list[str]:
    """`python train.py` (run from ROOT) on the tiny random model on CPU, CSV metrics only, into `run_dir`."""
    return [
        sys.executable,
        "train.py",
        "model=tiny_random",
        "logger=csv",
        "trainer.accelerator=cpu",
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]


@pytest.fixture(scope="session")
def tiny_cfg() -> DictConfig:
    return build.compose(["model=tiny_random"])


@pytest.fixture(scope="session")
def tokenizer(tiny_cfg):
    """The real SmolLM2 tokenizer (from the converted embedded model)."""
    from sftlab.model.load import load_tokenizer

    return load_tokenizer(tiny_cfg.model)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_cfg) -> str:
    from sftlab.model.load import model_source

    return model_source(tiny_cfg.model)


@pytest.fixture
def tiny_model(tiny_cfg, tiny_model_dir):
    from sftlab.model.load import load_model

    return load_model(tiny_cfg.model, tiny_model_dir)


@pytest.fixture
def lively_model(tiny_model):
    """The tiny model with larger seeded random weights: its greedy outputs differ from prompt to prompt (the
    stock init answers every prompt with newlines, which would make batched == one-by-one trivially true)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tiny_model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return tiny_model


@pytest.fixture(scope="session")
def chatml(tiny_cfg):
    from hydra.utils import instantiate

    return instantiate(tiny_cfg.template, _convert_="all")


# ---- finished adapter runs (merge, serve, new tokens) ----------------------------------------------------
def chat_batch(conversations, template, tokenizer):
    """A right-padded training batch, built by the real tokenize + collate."""
    from sftlab.data.collate import collate
    from sftlab.data.tokenize import encode_conversations

    enc = encode_conversations(conversations, template, tokenizer)
    targets = sum(sum(label != -100 for label in e.labels[1:]) for e in enc)
    feats = [
        {"input_ids": e.input_ids, "labels": e.labels, "step_targets": targets, "index": i}
        for i, e in enumerate(enc)
    ]
    return collate(feats, tokenizer.pad_token_id)


def make_adapter_run(run_dir: Path, overrides: list[str], scale: float = 0.1):
    """A finished run directory as train.py writes it (config.yaml + adapter/). Every trainable tensor gets
    seeded noise of `scale` (LoRA B starts at zero: an untouched adapter would equal the base, and merge
    tests would prove nothing). Returns (run_dir, the in-memory adapter model, tokenizer, template)."""
    import torch
    from hydra.utils import instantiate

    from sftlab.model.load import load_model, load_tokenizer, model_source
    from sftlab.model.tokens import add_special_tokens, fit_embeddings
    from sftlab.rundir import write

    cfg = build.compose(["model=tiny_random", *overrides], output_dir=run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write.write_config(run_dir, cfg)
    source = model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    token_ids = add_special_tokens(tokenizer, cfg.model.get("special_tokens"))
    template = instantiate(cfg.template, _convert_="all").bind(tokenizer)
    adapter = instantiate(cfg.adapter, _convert_="all")
    model = load_model(cfg.model, source, quantization_config=adapter.quantization_config())
    fit_embeddings(model, tokenizer)
    torch.manual_seed(0)  # LoRA A's init draws from the global RNG: the same run whatever ran before
    model = adapter.apply(model, new_token_ids=token_ids)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)
    model.eval()
    write.save_model(run_dir, model, tokenizer, template)
    return run_dir, model, tokenizer, template
