"""Adapter options: what to train on top of the base model. One class per `conf/adapter/*.yaml`.

Every LoRA-family option has `r`, `lora_alpha`, `lora_dropout` and `target_modules` as top-level fields, so
`adapter.r=8,16` sweeps the rank whatever the adapter. `quantization_config()` is consulted *before* the base
model loads (QLoRA loads 4-bit weights, LoRA8bit 8-bit ones); `apply()` wraps the loaded model.

Defaults live in one place, the shipped `conf/adapter/*.yaml` (LoRA's in lora.yaml, which the other
LoRA-family options extend): the dataclasses read them from there, so `LoRA()` is `adapter=lora`.

`apply(model, new_token_ids)`: ids of the run's special tokens (model/tokens.py). With LoRA only those
embedding rows train (peft `trainable_token_indices`, on the output head too when it is not tied), unless
`modules_to_save` already names the embedding / head, in which case those whole matrices train.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, PreTrainedModel

from sftlab import paths
from sftlab.model.load import DTYPES
from sftlab.model.tokens import embedding_module_names

log = logging.getLogger(__name__)


def _shipped(option: str) -> dict[str, Any]:
    """The values of the shipped `conf/adapter/<option>.yaml`, over those of the options it extends."""
    cfg = OmegaConf.load(paths.config_dir() / "adapter" / f"{option}.yaml")
    bases = [_shipped(b) for b in cfg.pop("defaults", []) if b != "_self_"]
    return {**{k: v for b in bases for k, v in b.items()}, **OmegaConf.to_container(cfg)}


_LORA, _QLORA, _LORA8BIT = _shipped("lora"), _shipped("qlora"), _shipped("lora8bit")


@dataclass
class FullFineTune:
    """`adapter=none`: every weight trains; the run saves a full model instead of an adapter."""

    name: str = "none"

    def quantization_config(self) -> Any:
        return None

    def apply(self, model: PreTrainedModel, new_token_ids: Sequence[int] = ()) -> PreTrainedModel:
        model.requires_grad_(True)
        return model


@dataclass
class LoRA:
    """Low-rank adapters on `target_modules` ("all-linear" = every linear layer except the output head).

    `use_dora` (weight-decomposed LoRA, conf/adapter/dora.yaml) and `use_rslora` (rank-stabilized scaling
    alpha/sqrt(r), conf/adapter/rslora.yaml) are flags of the same peft LoRA, hence of this class.
    """

    name: str = _LORA["name"]
    r: int = _LORA["r"]
    lora_alpha: int = _LORA["lora_alpha"]
    lora_dropout: float = _LORA["lora_dropout"]
    target_modules: Any = _LORA["target_modules"]
    modules_to_save: list[str] | None = _LORA["modules_to_save"]
    use_dora: bool = _LORA["use_dora"]
    use_rslora: bool = _LORA["use_rslora"]
    bias: str = _LORA["bias"]

    def quantization_config(self) -> Any:
        return None

    def token_indices(self, model: PreTrainedModel, new_token_ids: Sequence[int]) -> dict | None:
        """{embedding module: rows of the new tokens to train}; None when there is nothing to do."""
        if not new_token_ids:
            return None
        names = embedding_module_names(model)
        if set(names) & set(self.modules_to_save or []):
            log.info("New tokens: %s trained whole (adapter.modules_to_save)", sorted(names))
            return None
        return {name: sorted(new_token_ids) for name in names}

    def lora_config(self, trainable_token_indices: dict[str, list[int]] | None = None) -> LoraConfig:
        target = self.target_modules
        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=target if isinstance(target, str) else list(target),
            modules_to_save=list(self.modules_to_save) if self.modules_to_save else None,
            trainable_token_indices=trainable_token_indices,
            use_dora=self.use_dora,
            use_rslora=self.use_rslora,
            bias=self.bias,
            task_type="CAUSAL_LM",
        )

    def prepare(self, model: PreTrainedModel) -> PreTrainedModel:
        return model

    def apply(self, model: PreTrainedModel, new_token_ids: Sequence[int] = ()) -> PeftModel:
        indices = self.token_indices(model, new_token_ids)
        return get_peft_model(self.prepare(model), self.lora_config(indices))


def _prepare_kbit(model: PreTrainedModel) -> PreTrainedModel:
    # Casts norms to fp32 and enables input grads; gradient checkpointing is decided by the trainer config.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


@dataclass
class QLoRA(LoRA):
    """LoRA on a 4-bit (NF4, double-quantized) frozen base (bitsandbytes; runs on CPU with bnb >= 0.46)."""

    name: str = _QLORA["name"]
    quant_type: str = _QLORA["quant_type"]
    double_quant: bool = _QLORA["double_quant"]
    compute_dtype: str = _QLORA["compute_dtype"]
    quant_storage: str = _QLORA["quant_storage"]

    def quantization_config(self) -> BitsAndBytesConfig:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=DTYPES[self.compute_dtype],
            bnb_4bit_quant_storage=getattr(torch, self.quant_storage),
        )

    def prepare(self, model: PreTrainedModel) -> PreTrainedModel:
        return _prepare_kbit(model)


@dataclass
class LoRA8bit(LoRA):
    """LoRA on an 8-bit (LLM.int8) frozen base: half the memory of bf16 weights, closer to them than NF4."""

    name: str = _LORA8BIT["name"]
    llm_int8_threshold: float = _LORA8BIT["llm_int8_threshold"]

    def quantization_config(self) -> BitsAndBytesConfig:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=self.llm_int8_threshold)

    def prepare(self, model: PreTrainedModel) -> PreTrainedModel:
        return _prepare_kbit(model)


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights are counted as their unpacked size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # bnb packs two 4-bit values per byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
