"""Adapter options: what to train on top of the base model. One class per `conf/adapter/*.yaml`.

Every LoRA-family option has `r`, `lora_alpha`, `lora_dropout` and `target_modules` as top-level fields, so
`adapter.r=8,16` sweeps the rank whatever the adapter. `quantization_config()` is consulted *before* the base
model loads (QLoRA loads 4-bit weights); `apply()` wraps the loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, PreTrainedModel

from sftlab.model.load import DTYPES


@dataclass
class FullFineTune:
    """`adapter=none`: every weight trains; the run saves a full model instead of an adapter."""

    name: str = "none"

    def quantization_config(self) -> Any:
        return None

    def apply(self, model: PreTrainedModel) -> PreTrainedModel:
        model.requires_grad_(True)
        return model


@dataclass
class LoRA:
    """Low-rank adapters on `target_modules` ("all-linear" = every linear layer except the output head)."""

    name: str = "lora"
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: Any = "all-linear"
    modules_to_save: list[str] | None = None
    use_dora: bool = False
    use_rslora: bool = False
    bias: str = "none"

    def quantization_config(self) -> Any:
        return None

    def lora_config(self) -> LoraConfig:
        target = self.target_modules
        return LoraConfig(
            r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
            target_modules=target if isinstance(target, str) else list(target),
            modules_to_save=list(self.modules_to_save) if self.modules_to_save else None,
            use_dora=self.use_dora, use_rslora=self.use_rslora, bias=self.bias, task_type="CAUSAL_LM",
        )

    def prepare(self, model: PreTrainedModel) -> PreTrainedModel:
        return model

    def apply(self, model: PreTrainedModel) -> PeftModel:
        return get_peft_model(self.prepare(model), self.lora_config())


@dataclass
class QLoRA(LoRA):
    """LoRA on a 4-bit (NF4, double-quantized) frozen base, bitsandbytes; also runs on CPU with bnb >= 0.46."""

    name: str = "qlora"
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quant_storage: str = "uint8"

    def quantization_config(self) -> BitsAndBytesConfig:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=DTYPES[self.compute_dtype],
            bnb_4bit_quant_storage=getattr(torch, self.quant_storage),
        )

    def prepare(self, model: PreTrainedModel) -> PreTrainedModel:
        # Casts norms to fp32 and enables input grads; gradient checkpointing is decided by the trainer config.
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights are counted as their unpacked size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # bnb packs two 4-bit values per byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
