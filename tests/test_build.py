"""The model's lifecycle around fit(): where it is evaluated and what rank 0 saves."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sftlab import build
from sftlab.errors import ConfigError
from sftlab.model.forward import token_loss_sum
from tests.conftest import quiet_trainer, small_iso_data


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A real fit of the tiny model: 4 steps, validation (and a best checkpoint) after steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("fit")
    cfg = build.compose(["model=tiny_random", *small_iso_data(tmp), "data.batch_size=4"], output_dir=tmp)
    parts = build.parts(cfg)
    dm = build.datamodule(parts)
    module = build.module(cfg, build.adapted_model(parts)[0])
    best_cb = instantiate(cfg.callbacks.model_checkpoint)
    trainer = quiet_trainer([best_cb], max_steps=4, val_check_interval=2, precision="32-true")
    trainer.fit(module, datamodule=dm)
    return cfg, parts, dm, trainer, module, best_cb.best_model_path


def test_the_tuned_model_carries_the_best_weights_on_the_training_device(fitted):
    cfg, parts, _, trainer, module, best_path = fitted
    best = torch.load(best_path, weights_only=True)["state_dict"]
    with torch.no_grad():  # weights past the best checkpoint, as after validation loss went up again
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.01)
    assert best and not any(torch.equal(best[k], module.state_dict()[k]) for k in best)
    tuned = build.tuned_model(cfg, parts, trainer, module, best_path)
    assert tuned is module.model
    assert build.eval_device(cfg, trainer) == trainer.strategy.root_device
    assert {p.device for p in tuned.parameters()} == {trainer.strategy.root_device}
    state = module.state_dict()
    assert all(torch.equal(state[k], best[k]) for k in best)


def test_a_configured_eval_device_is_where_the_tuned_model_goes(fitted):
    """`meta` stands in for a second accelerator: a real move, observable without one."""
    cfg, parts, _, trainer, module, best_path = fitted
    cfg = cfg.copy()
    cfg.eval_device = "meta"
    tuned = build.tuned_model(cfg, parts, trainer, module, best_path)
    assert {p.device.type for p in tuned.parameters()} == {"meta"}


def test_the_rank_zero_rebuild_of_a_sharded_run_computes_what_training_did(tmp_path, fitted):
    """FSDP / DeepSpeed: rank 0 rebuilds base + adapter and loads the gathered trainable weights."""
    cfg, parts, dm, *_ = fitted
    module = build.module(cfg, build.adapted_model(parts)[0])
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)  # trained-looking weights: a plain rebuild would not have them
    weights = module.trainable_state_dict()
    fresh = build.rebuilt(parts, weights)
    batch = next(iter(dm.val_dataloader()))
    module.eval(), fresh.eval()
    with torch.no_grad():
        expected, _ = token_loss_sum(module.model, batch)
        got, _ = token_loss_sum(fresh.model, batch)
        untrained, _ = token_loss_sum(build.adapted_model(parts)[0].eval(), batch)
    torch.testing.assert_close(got, expected)
    assert (untrained - expected).abs() > 1e-3


def test_device_for_commands_outside_training(monkeypatch):
    """sftlab-eval: `auto` is this process's GPU (LOCAL_RANK under a launcher) when there is one."""
    assert build.device_for("cpu") == torch.device("cpu")
    assert build.device_for("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    expected = torch.device("cuda", 1) if torch.cuda.is_available() else torch.device("cpu")
    assert build.device_for("auto") == build.device_for(None) == expected


def test_a_callback_or_logger_set_to_null_is_switched_off(tmp_path):
    """`callbacks.<name>=null` and `logger.<name>=null` leave that one out (as `~callbacks.<name>` does),
    instead of handing Lightning a None it fails on after the model has loaded."""
    from pytorch_lightning.callbacks import EarlyStopping
    from pytorch_lightning.loggers import CSVLogger

    from sftlab.training.loggers import make_loggers

    cfg = build.compose(
        ["model=tiny_random", "logger=wandb", "logger.wandb=null", "callbacks.early_stopping=null"], tmp_path
    )
    loggers = make_loggers(cfg.logger)
    assert [type(lg).__name__ for lg in loggers] == ["ResumableCSVLogger"] and isinstance(
        loggers[0], CSVLogger
    )
    trainer = build.trainer(cfg, loggers)
    assert None not in trainer.callbacks
    assert not any(isinstance(c, EarlyStopping) for c in trainer.callbacks)


def test_a_validation_interval_longer_than_an_epoch_fails_before_the_model_loads(fitted):
    """24 examples in micro-batches of 4 with accumulation 2: 6 micro-batches per epoch, as the real training
    loader yields them; an interval of 7 is refused naming the epoch's length, 6 passes, and with
    check_val_every_n_epoch=null (micro-batches counted across epochs) any interval is Lightning's to run."""
    cfg, _, dm, *_ = fitted

    def with_trainer(**trainer):
        return OmegaConf.merge(cfg, {"trainer": {"accumulate_grad_batches": 2, **trainer}})

    assert dm.micro_batches_per_epoch(2, 1) == 6 == len(dm.train_dataloader())
    with pytest.raises(ConfigError, match=r"val_check_interval=7: .* an epoch has 6 \(24 training examples"):
        build.check_validation_interval(with_trainer(val_check_interval=7), dm)
    build.check_validation_interval(with_trainer(val_check_interval=6), dm)
    build.check_validation_interval(with_trainer(val_check_interval=7, check_val_every_n_epoch=None), dm)
    build.check_validation_interval(with_trainer(val_check_interval=0.5), dm)


def test_a_loaded_run_casts_its_frozen_weights_once_and_generates_as_peft_does(tmp_path):
    """peft freezes a loaded adapter's model: without the cast cache autocast would cast every frozen weight
    in every decoding step. The cached copy is the same cast, so the tokens are peft's own."""
    from sftlab.model.generate import generate_ids, stop_token_ids
    from sftlab.model.layers import CastCachingLinear
    from tests.conftest import make_adapter_run

    run_dir, peft_model, tokenizer, template = make_adapter_run(tmp_path / "run", [])
    run = build.load_run(run_dir)
    linears = [m for m in run.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is CastCachingLinear for m in linears)
    assert all(type(m) is torch.nn.Linear for m in peft_model.modules() if isinstance(m, torch.nn.Linear))
    prompts = [tokenizer("Hello there, how are")["input_ids"], tokenizer("Name three colours")["input_ids"]]
    stops = stop_token_ids(template, tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = generate_ids(run.model, tokenizer, prompts, stops, max_new_tokens=8)
        theirs = generate_ids(peft_model, tokenizer, prompts, stops, max_new_tokens=8)
    assert ours == theirs and any(o["text"] for o in ours)
