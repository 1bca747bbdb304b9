"""The one build path: compose the config, check it, and build tokenizer, template, data, model, module and
trainer, for a new run or from a finished run directory.

`sftlab-train`, `sftlab-eval`, `sftlab-inspect`, chat, serve, merge, the bench and the tests all build through
these functions, so each object is made one way, in one order (special tokens are added before data is
tokenized; the embeddings grow to the tokenizer before an adapter is applied).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from peft import PeftModel
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sftlab import paths
from sftlab.config import Origin, check_devices, validate
from sftlab.data.datamodule import SFTDataModule
from sftlab.data.templates import ChatTemplate
from sftlab.errors import ConfigError, SFTLabError
from sftlab.eval.suite import EvalSuite, build_suite
from sftlab.model.layers import cache_frozen_casts
from sftlab.model.load import (
    check_available,
    check_context_length,
    check_hardware,
    load_model,
    load_tokenizer,
    model_source,
    resolve_base,
)
from sftlab.model.tokens import add_special_tokens, fit_embeddings
from sftlab.rundir import read, write
from sftlab.training.module import SFTModule

log = logging.getLogger(__name__)


# ---- configuration ---------------------------------------------------------------------------------------
def compose(
    overrides: list[str] | tuple[str, ...] = (),
    output_dir: str | Path | None = None,
    config_name: str = "train",
    return_hydra_config: bool = False,
) -> DictConfig:
    """The shipped config + overrides, as the command line composes it. Outside a Hydra app
    `${hydra:runtime.output_dir}` cannot resolve, so `output_dir` makes `paths.output_dir` concrete."""
    cfg, _ = compose_with_origin(overrides, output_dir, config_name, return_hydra_config)
    return cfg


def compose_with_origin(
    overrides: list[str] | tuple[str, ...] = (),
    output_dir: str | Path | None = None,
    config_name: str = "train",
    return_hydra_config: bool = False,
) -> tuple[DictConfig, Origin]:
    """`compose`, and where Hydra composed it from (config sources incl. `hydra.searchpath`, chosen options):
    what `validate` needs to find the files of a config dir of your own."""
    with initialize_config_dir(config_dir=str(paths.config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    origin = Origin.from_hydra(cfg.hydra)
    if not return_hydra_config:
        with open_dict(cfg):
            del cfg["hydra"]
    if output_dir is not None:
        OmegaConf.update(cfg, "paths.output_dir", str(output_dir))
    return cfg, origin


def resolve_precision(precision: str | int) -> str | int:
    """`auto`: bf16 autocast where the hardware does bf16 (about 1.5x faster on such CPUs), else fp32."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def eval_autocast(choice: str | int | None, training: str | int) -> torch.dtype | None:
    """The dtype evaluation runs under autocast (None: none, the weights' own). `eval_precision=auto` is the
    training precision `training` (as resolved on this machine): generation and benchmarks then compute in
    the arithmetic the model was trained and validated in (Lightning's validation already runs under the
    trainer's autocast), bf16 on a CPU that has it; `32` evaluates in fp32."""
    choice = str(choice or "auto")
    return AUTOCAST.get(str(resolve_precision(training) if choice == "auto" else choice))


def preflight(cfg: DictConfig, run_dir: Path, origin: Origin | None = None) -> str:
    """What can fail in seconds fails here, before a model or dataset loads. Returns the model source.
    `origin`: where `cfg` was composed from (default: the running Hydra app's record, see `validate`)."""
    validate(cfg, origin)
    check_devices(cfg, origin)
    write.check_writable(run_dir)
    source = model_source(cfg.model)
    check_available(source, cfg.model)
    check_hardware(source, cfg.model)
    check_context_length(cfg.model, cfg.data.get("max_length"))
    return source


# ---- a new run -------------------------------------------------------------------------------------------
@dataclass
class Parts:
    """Tokenizer and template of a config, with the ids of the special tokens it added."""

    cfg: DictConfig
    source: str
    tokenizer: PreTrainedTokenizerBase
    template: ChatTemplate
    new_token_ids: list[int]


def parts(cfg: DictConfig, source: str | None = None) -> Parts:
    """Tokenizer (with the run's special tokens, added before any data is tokenized) and template."""
    source = source or model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    new_token_ids = add_special_tokens(tokenizer, cfg.model.get("special_tokens"))
    template = instantiate(cfg.template, _convert_="all")
    return Parts(cfg, source, tokenizer, template, new_token_ids)


def datamodule(
    p: Parts | LoadedRun, *, setup: bool = True, stage: str = "fit", **settings: Any
) -> SFTDataModule:
    """`cfg.data` of a new or a finished run with the runtime objects injected (and `settings` such as
    packing=True or another test_path), set up for `stage`.

    Partial, then call: Hydra would turn a dataclass passed as a kwarg into a config node."""
    log.info("Instantiating data <%s>", p.cfg.data._target_)
    dm = instantiate(p.cfg.data, _partial_=True)(tokenizer=p.tokenizer, template=p.template, **settings)
    if setup:
        dm.setup(stage)
    return dm


def check_validation_interval(cfg: DictConfig, dm: SFTDataModule) -> None:
    """An integer `trainer.val_check_interval` longer than an epoch fails in Lightning only once `fit` starts,
    after the model loaded and the base evaluation ran: fail here, with the epoch's length and the fixes."""
    trainer = cfg.trainer
    every, devices = trainer.get("val_check_interval"), trainer.get("devices")
    if not (isinstance(every, int) and isinstance(devices, int) and devices > 0):
        return  # a fraction of an epoch, or a device count only Lightning resolves
    across_epochs = trainer.get("check_val_every_n_epoch") is None
    if across_epochs or trainer.get("limit_train_batches") not in (None, 1.0):
        return  # micro-batches counted across epochs, or an epoch cut short on purpose
    processes = devices * (trainer.get("num_nodes") or 1)
    batches = dm.micro_batches_per_epoch(trainer.get("accumulate_grad_batches") or 1, processes)
    if batches is not None and every > batches:
        raise ConfigError(
            f"trainer.val_check_interval={every}: validation every {every} micro-batches, but an epoch has "
            f"{batches} ({len(dm.splits['train'].examples)} training examples, data.batch_size="
            f"{dm.batch_size}, {processes} process(es)), so it would never run. Set it to at most "
            f"{batches}, to a fraction of an epoch (0.5: twice per epoch), or set "
            "trainer.check_val_every_n_epoch=null to count micro-batches across epochs."
        )


def adapter(cfg: DictConfig) -> Any:
    log.info("Instantiating adapter <%s>", cfg.adapter._target_)
    return instantiate(cfg.adapter, _convert_="all")


def base_model(p: Parts, adapter_option: Any) -> torch.nn.Module:
    """The base model (quantized as the adapter asks), its embeddings grown to the tokenizer."""
    log.info("Instantiating model <%s>", p.source)
    model = load_model(p.cfg.model, p.source, quantization_config=adapter_option.quantization_config())
    fit_embeddings(model, p.tokenizer)
    return model


def adapted_model(p: Parts) -> tuple[torch.nn.Module, Any]:
    """(the base model with the configured adapter applied, the adapter option)."""
    option = adapter(p.cfg)
    return option.apply(base_model(p, option), new_token_ids=p.new_token_ids), option


def module(cfg: DictConfig, model: torch.nn.Module) -> SFTModule:
    """The LightningModule around the (adapted) model."""
    return SFTModule(
        model,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler),
        gradient_checkpointing=cfg.gradient_checkpointing,
        compile=cfg.compile,
        loss_chunk_size=cfg.get("loss_chunk_size"),
        share_prefix=cfg.get("share_prefix", True),
    )


def trainer(cfg: DictConfig, loggers: list) -> pl.Trainer:
    # `callbacks.<name>=null` switches one off, as `~callbacks.<name>` does (lightning-hydra-template's way).
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    return instantiate(
        cfg.trainer, precision=resolve_precision(cfg.trainer.precision), logger=loggers, callbacks=callbacks
    )


# ---- where the model lives before and after fit() ----------------------------------------------------------
def eval_device(cfg: DictConfig, trainer: pl.Trainer) -> torch.device:
    """Where base and tuned evaluation, restore-best and saving run: `eval_device`, by default (auto) the
    device this process trains on (`trainer.strategy.root_device`: cuda:<local rank> under DDP). The model
    loads on the CPU, and Lightning's teardown moves it back there after fit(), so without this move every
    evaluation of a GPU run would run on the CPU."""
    choice = str(cfg.get("eval_device") or "auto")
    return trainer.strategy.root_device if choice == "auto" else torch.device(choice)


def device_for(choice: str | None) -> torch.device:
    """A device setting outside training (`sftlab-eval`): `auto` is this process's CUDA device when there is
    one (LOCAL_RANK under a launcher), else the CPU."""
    if choice and str(choice) != "auto":
        return torch.device(str(choice))
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def on_eval_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if next(model.parameters()).device != device:
        log.info("Moving the model to %s for evaluation", device)
        model.to(device)
    return model


def is_sharded(trainer: pl.Trainer) -> bool:
    """FSDP and DeepSpeed: after fit() the weights are split over ranks (FSDP, ZeRO-3) or in an engine."""
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy | DeepSpeedStrategy)


def gathered_trainable_weights(trainer: pl.Trainer, module: SFTModule) -> dict[str, torch.Tensor]:
    """The trainable weights, whole, with the strategy's own full-state-dict API. A collective: every rank
    calls it (FSDP gathers the full state dict on rank 0; ZeRO-3 gathers the partitioned parameters)."""
    strategy = trainer.strategy
    names = module.trainable_names()
    if getattr(strategy, "zero_stage_3", False):
        import deepspeed

        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in params.items()}
    state = strategy.lightning_module_state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items() if k in names}


def rebuilt(p: Parts, weights: dict[str, torch.Tensor]) -> SFTModule:
    """An unsharded module built as training built it (base + adapter), with gathered trainable `weights`."""
    module = SFTModule(adapted_model(p)[0], optimizer=torch.optim.SGD)
    missing = set(weights) - set(module.state_dict())
    if missing:
        raise SFTLabError(f"gathered weights the rebuilt model lacks: {sorted(missing)[:3]} ...")
    module.load_state_dict(weights, strict=False)
    return module


def tuned_model(
    cfg: DictConfig, p: Parts, trainer: pl.Trainer, module: SFTModule, best_path: str | None
) -> torch.nn.Module | None:
    """After fit(), on every rank: the trained model with the best checkpoint restored, on the eval device,
    for rank 0 to save and evaluate; None on the other ranks.

    Single device and DDP: the module's own model (DDP ranks hold identical copies; Lightning's teardown put
    it on the CPU). FSDP and DeepSpeed: the ranks' shards are gathered with the strategy's full-state-dict
    API on all ranks, which then return, and rank 0 alone saves and evaluates, on an unsharded copy it
    builds as training did (base + adapter) and loads the gathered weights, then the best checkpoint, into.
    One rank evaluating keeps generation, the judge and lm-eval free of collectives with ranks that have
    exited; the cost is that the whole model must fit that rank's device (or set eval=none, or eval_device).
    """
    if is_sharded(trainer):
        weights = gathered_trainable_weights(trainer, module)
        if trainer.global_rank != 0:
            return None
        module = rebuilt(p, weights)
    elif trainer.global_rank != 0:
        return None
    from sftlab.training.checkpoint import restore_best

    restore_best(module, best_path)
    return on_eval_device(module.model, eval_device(cfg, trainer))


def suite(
    cfg: DictConfig, p_or_run: Parts | LoadedRun, splits: dict[str, Any], out_dir: Path
) -> EvalSuite | None:
    """The chosen `eval` options of a train.py or sftlab-eval config, ready to run on a model; under
    autocast as `eval_precision` says (for sftlab-eval `p_or_run` is the run, whose training precision
    `auto` follows)."""
    run_cfg = p_or_run.cfg if isinstance(p_or_run, LoadedRun) else cfg
    precision = OmegaConf.select(run_cfg, "trainer.precision", default="auto")
    autocast = eval_autocast(cfg.get("eval_precision"), precision)
    return build_suite(cfg.get("eval"), p_or_run.tokenizer, p_or_run.template, splits, out_dir, autocast)


# ---- a finished run --------------------------------------------------------------------------------------
@dataclass
class LoadedRun:
    run_dir: Path
    cfg: DictConfig
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    template: ChatTemplate


def load_run(run_dir: str | Path, *, with_adapter: bool = True, quantized: bool = True) -> LoadedRun:
    """A finished run as training saved it: base model + adapter (or the full model), tokenizer, template.

    Layouts: a training run (config.yaml + adapter/ or model/) or a directory written by `sftlab-merge`.
    `with_adapter=False` gives the run's base model (for base-vs-tuned comparisons); `quantized=False` loads
    the base of a QLoRA / 8-bit run unquantized (in `model.dtype`), as merging needs. Special tokens the run
    added live in the saved tokenizer: the base embeddings grow to it before the adapter loads.
    """
    run = Path(run_dir)
    cfg = read.run_config(run)
    template = instantiate(cfg.template, _convert_="all")
    adapter_dir, full_dir = run / "adapter", run / "model"
    if (adapter_dir / "adapter_config.json").is_file():
        read.check_adapter(adapter_dir)
        base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = resolve_base(base, cfg.model)  # a cache-built base missing here is rebuilt
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        quantization = adapter(cfg).quantization_config() if quantized else None
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
    # peft loads an adapter for inference with every weight frozen, and autocast casts a frozen weight anew
    # in every forward: each decoding step of sftlab-eval, chat and serve would cast the whole model again
    # (27 % of the default run's tuned evaluation). Cast once, as training does; bit-identical outputs.
    cache_frozen_casts(model)
    if hasattr(template, "bind"):  # resolves `{eos_token}` / `bos: auto` for this run's tokenizer
        template.bind(tokenizer)
    return LoadedRun(run, cfg, model, tokenizer, template)
