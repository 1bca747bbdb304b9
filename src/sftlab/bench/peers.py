"""The peers sftlab is measured against: a bare PyTorch + peft loop and TRL's SFTTrainer.

Bare loop (the framework-overhead floor): the same model, adapter, optimizer, scheduler, gradient clipping,
autocast and loss function (`module.token_loss_sum`) as sftlab, over the very batches sftlab's datamodule
yields (same sampler, seed and collate), with nothing else: no Hydra, no Lightning.

TRL: `SFTTrainer` on the same base model, LoRA config (`adapter.lora_config()`), conversations, batch size,
max length, learning rate, schedule and clipping. The rows are given as prompt-completion pairs, so TRL trains
the completion only (as sftlab trains the assistant turn), and the tokenizer gets sftlab's chat template, so
both tokenize the same text. Two settings:
  * `default`: `SFTConfig`'s own defaults for everything else (TRL 1.16: bf16 on, gradient checkpointing on);
  * `best`: the fastest CPU settings TRL offers here: bf16, no gradient checkpointing, `padding_free=True`
    (one flattened row per batch with position ids; TRL requires `max_length=None` for it without packing;
    the bundled and generated rows all fit in the max length, so nothing changes).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from pytorch_lightning.utilities import move_data_to_device

from sftlab import build, paths
from sftlab.bench import runner
from sftlab.bench.data import read_conversations
from sftlab.bench.hardware import flop_model, peak_memory_mb, pick_device, synchronize
from sftlab.bench.stats import Record, Step, batch_counts, clock, elapsed
from sftlab.model.forward import enable_gradient_checkpointing, token_loss_sum

TRL_SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "best": {"bf16": True, "gradient_checkpointing": False, "padding_free": True, "max_length": None},
}


def _autocast(device: torch.device, prec: str | int) -> contextlib.AbstractContextManager:
    dtype = runner.autocast_dtype(prec)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def run_bare(spec: dict[str, Any]) -> dict:
    """spec: as `ours.run_sftlab`."""
    p = runner.parts(spec)
    cfg, datamodule = p.cfg, runner.prepared_datamodule(p, spec)
    batches = list(itertools.islice(datamodule.train_dataloader(), spec["steps"]))
    model, adapter = build.adapted_model(p)
    device = pick_device(spec.get("device", "auto"))
    if adapter.quantization_config() is None:
        model.to(device)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.gradient_checkpointing)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = instantiate(cfg.optimizer)(params)
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=len(batches))
    prec = runner.precision(cfg)
    clip = cfg.trainer.get("gradient_clip_val")
    steps = []
    last = clock()
    for batch in batches:
        batch = move_data_to_device(batch, device)
        with _autocast(device, prec):
            loss_sum, _ = token_loss_sum(model, batch)
        (loss_sum / batch["step_targets"].clamp(min=1)).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        counts = batch_counts(batch)
        synchronize(device)
        now, times = elapsed(last)
        steps.append(Step(*counts, **times))
        last = now
    extra = {
        "precision": str(prec),
        "device": str(device),
        "flops": asdict(flop_model(model)),
        "peak_memory_mb": peak_memory_mb(device),
    }
    return Record(spec["name"], steps, extra).to_dict()


def _count_training_steps(trainer: Any, queue: list) -> None:
    """Queue the counts of every micro-batch TRL trains on (wrapping `training_step` sees exactly those;
    the collator also builds batches that are never trained, e.g. when TRL peeks at the data)."""
    inner = trainer.training_step

    def training_step(model: torch.nn.Module, inputs: dict, *args: Any, **kwargs: Any) -> torch.Tensor:
        queue.append(batch_counts(inputs))
        return inner(model, inputs, *args, **kwargs)

    trainer.training_step = training_step


def _trl_timer(steps: list[Step], queue: list, device: torch.device) -> Any:
    from transformers import TrainerCallback

    class TrlStepTimer(TrainerCallback):
        last = (0.0, 0.0)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.last = clock()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            synchronize(device)
            now, times = elapsed(self.last)
            counts = [sum(c) for c in zip(*queue, strict=True)] if queue else [0, 0, 0, 0, 0]
            queue.clear()
            steps.append(Step(*counts, **times))
            self.last = now

    return TrlStepTimer()


def trl_config(cfg: Any, settings: dict[str, Any], steps: int, output_dir: Path) -> Any:
    """SFTConfig with sftlab's batch, length, LR, schedule and clipping; `settings` on top."""
    from trl import SFTConfig

    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.data.batch_size,
        gradient_accumulation_steps=cfg.trainer.accumulate_grad_batches,
        max_steps=steps,
        learning_rate=cfg.optimizer.lr,
        weight_decay=cfg.optimizer.get("weight_decay", 0.0),
        lr_scheduler_type=cfg.scheduler.get("kind", "cosine"),
        warmup_steps=0,
        max_grad_norm=cfg.trainer.get("gradient_clip_val") or 0.0,
        max_length=cfg.data.max_length,
        seed=cfg.seed,
        logging_steps=10**6,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    return SFTConfig(**{**kwargs, **settings})


def run_trl(spec: dict[str, Any]) -> dict:
    """spec: as `ours.run_sftlab` plus `trl`: a key of TRL_SETTINGS."""
    from datasets import Dataset
    from trl import SFTTrainer

    p = runner.parts(spec)
    cfg = p.cfg
    conversations = read_conversations(paths.resolve(cfg.data.train_path, key="data.train_path"))
    rows = [{"prompt": c[:-1], "completion": c[-1:]} for c in conversations]
    p.tokenizer.chat_template = p.template.bind(p.tokenizer).to_jinja()  # the same text as sftlab renders
    adapter = instantiate(cfg.adapter, _convert_="all")
    model = build.base_model(p, adapter)
    args = trl_config(cfg, TRL_SETTINGS[spec["trl"]], spec["steps"], Path(spec["workdir"]) / "trl")
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=p.tokenizer,
        peft_config=adapter.lora_config(),
    )
    steps: list[Step] = []
    queue: list = []
    _count_training_steps(trainer, queue)
    device = trainer.args.device
    trainer.add_callback(_trl_timer(steps, queue, device))
    trainer.train()
    extra = {
        "device": str(device),
        "flops": asdict(flop_model(trainer.model)),
        "peak_memory_mb": peak_memory_mb(device),
        "settings": {
            k: getattr(args, k)
            for k in ("bf16", "gradient_checkpointing", "padding_free", "packing", "max_length")
        },
    }
    return Record(spec["name"], steps, extra).to_dict()
