"""SFTModule: the LightningModule around a causal LM + adapter.

Loss = sum of token losses / target tokens of the whole optimizer step. The sampler tags every micro-batch
with the step's global target count (`step_targets`); Lightning divides each micro-batch loss by
`accumulate_grad_batches` and DDP averages gradients over ranks, so both factors are multiplied back in.

Logits are computed only at target positions: the decoder's hidden states are gathered where labels are not
-100 and only those rows go through the output head, so no (batch x length x vocab) fp32 tensor is built.

Checkpoints hold only trainable weights (plus optimizer, loop and RNG state): adapter-sized for LoRA.

Frozen linear layers multiply with a bf16 copy of their weight made once (forward.CastCachingLinear) rather
than autocast re-casting the fp32 weight in every forward: same numbers, a fifth less work per CPU step.

The training random stream (dropout; torch, CUDA, Python and NumPy RNGs, one set per rank) continues from
where the previous training batch left it: its state is taken at the end of every training step and put back
at the start of the next one. Whatever runs in between (validation creating its loader iterator, callbacks)
cannot shift it, and a resumed run restores the saved state there, so it draws the same dropout masks as an
uninterrupted run. Changing how often validation runs does not change the training trajectory either.

A run that `max_steps` ends between validations validates (and so checkpoints) at its last step. Gradient
clipping works with a fused optimizer under bf16 autocast, which Lightning's plugin refuses; under fp16's
loss scaler the unfused kernel is used.

A non-finite step loss stops the run before that step is applied (`NonFiniteLossError`), naming the step and
the last checkpoint to resume from; the check uses the rank-summed loss, so all ranks stop together.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.utilities import GradClipAlgorithmType
from torchmetrics import MeanMetric

from sftlab.errors import SFTLabError
from sftlab.model.forward import DEFAULT_LOSS_CHUNK, enable_gradient_checkpointing, token_loss_sum, unwrap
from sftlab.model.layers import drop_cast_copies, fast_training_layers
from sftlab.training.checkpoint import find_resume_checkpoint

log = logging.getLogger(__name__)


class NonFiniteLossError(SFTLabError):
    """The loss of an optimizer step is NaN or infinite; the step was not applied."""


def rng_states() -> dict[str, Any]:
    """Global RNG states as tensors and plain values, so `torch.load(weights_only=True)` reads them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


class SFTModule(pl.LightningModule):
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        gradient_checkpointing: bool | str = False,
        compile: bool = False,
        loss_chunk_size: int | None = DEFAULT_LOSS_CHUNK,
        share_prefix: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        # from_pretrained returns eval mode and Lightning keeps submodule modes: without this, LoRA dropout
        # would silently stay off during training.
        self.model.train()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        if gradient_checkpointing:
            enable_gradient_checkpointing(model, gradient_checkpointing)
        # Training steps only: validation, evaluation and generation (other shapes, KV cache) stay eager
        # rather than each paying minutes of compiling. A function, not a module: not in the state dict.
        decoder = unwrap(model).get_decoder()
        self._train_decoder = torch.compile(decoder.forward, dynamic=True) if compile else None
        if not compile:  # a compiled step fuses these operations itself
            fast_training_layers(model)
        self.loss_chunk_size = loss_chunk_size
        self.share_prefix = share_prefix
        self.strict_loading = False  # checkpoints carry trainable weights only
        self.val_loss = MeanMetric()
        self._step_loss = torch.zeros(())
        self._step_targets = 0
        self._step_tokens = 0
        self._step_clock = time.perf_counter()
        self._train_rng: dict[str, Any] | None = None  # RNG state at the end of the last training step

    # ---- training -------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self._align_validation_to_steps()

    def _align_validation_to_steps(self) -> None:
        """Validation, and the checkpoint saved after it, inside an accumulation window would save a step half
        accumulated (its gradients are not in the checkpoint), which no resume can continue exactly; move it
        to the end of the window. Lightning counts `val_check_interval` in micro-batches."""
        trainer, accumulate = self.trainer, self.trainer.accumulate_grad_batches
        every = trainer.val_check_batch
        if accumulate > 1 and isinstance(every, int) and every % accumulate:
            trainer.val_check_batch = max(accumulate, every - every % accumulate)
            log.info(
                "Validating every %d micro-batches, not %d: a multiple of accumulate_grad_batches",
                trainer.val_check_batch,
                every,
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._train_rng is not None:
            set_rng_states(self._train_rng)

    def _loss(self, batch: dict[str, torch.Tensor], decoder: Callable[..., Any] | None = None) -> tuple:
        return token_loss_sum(self.model, batch, decoder, self.loss_chunk_size, self.share_prefix)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, n_targets = self._loss(batch, self._train_decoder)
        # Backward and the optimizer step draw no random numbers (checkpointed recomputation restores its own
        # RNG state), so this is the state the next training step starts from.
        self._train_rng = rng_states()
        self._step_loss = self._step_loss + loss_sum.detach().float().cpu()
        self._step_targets += int(n_targets)
        self._step_tokens += int(batch["attention_mask"].sum())
        step_targets = batch["step_targets"].clamp(min=1)
        return loss_sum * (self.trainer.accumulate_grad_batches * self.trainer.world_size) / step_targets

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        trainer = self.trainer
        if 0 < trainer.max_steps <= trainer.global_step and not trainer.should_stop:
            # max_steps can end the run between validations (mid-epoch, validation due at the epoch's end):
            # stopping through `should_stop` makes Lightning validate and checkpoint at this step, as for
            # early stopping, so the last steps are measured and can become the adapter, not dropped.
            trainer.should_stop = True

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Runs once per optimizer step, after all its micro-batches: log the token-weighted step loss."""
        loss, targets, tokens = self._step_loss, self._step_targets, self._step_tokens
        if self.trainer.world_size > 1:
            totals = self.all_gather(torch.tensor([float(loss), targets, tokens], device=self.device)).sum(0)
            loss, targets, tokens = totals[0], int(totals[1]), int(totals[2])
        now = time.perf_counter()
        elapsed = max(now - self._step_clock, 1e-9)
        step_loss = float(loss) / max(targets, 1)
        if not math.isfinite(step_loss):
            raise NonFiniteLossError(self._non_finite_message(step_loss))
        self.log("train/loss", step_loss, prog_bar=True, rank_zero_only=True)
        self.log("train/tokens_per_s", tokens / elapsed, rank_zero_only=True)
        self.log("train/target_tokens_per_s", targets / elapsed, rank_zero_only=True)
        self._step_loss, self._step_targets, self._step_tokens, self._step_clock = torch.zeros(()), 0, 0, now

    def _non_finite_message(self, loss: float) -> str:
        dirs = {Path(cb.dirpath) for cb in self.trainer.checkpoint_callbacks if cb.dirpath}
        found = [c for c in map(find_resume_checkpoint, dirs) if c is not None]
        ckpt = str(found[0]) if found else ""  # what resume=auto would take
        where = f"resume from {ckpt} with resume={ckpt}" if ckpt else "no checkpoint was saved yet"
        return (
            f"train/loss is {loss} at optimizer step {self.trainer.global_step + 1} "
            f"(epoch {self.trainer.current_epoch}); the run stopped before applying it, so the weights "
            f"and checkpoints are intact: {where}. Lower optimizer.lr, use trainer.precision=32 or "
            "bf16-mixed instead of 16-mixed, or look for a broken example in the data."
        )

    def on_fit_end(self) -> None:
        drop_cast_copies(self.model)  # evaluation after training runs without autocast: free the copies

    # ---- validation -----------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, n_targets = self._loss(batch)
        if n_targets > 0:
            self.val_loss.update(loss_sum.detach() / n_targets, weight=n_targets)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/perplexity", torch.exp(loss))
        self.val_loss.reset()

    # ---- optimizer ------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        factory = self.optimizer_factory
        if (
            getattr(factory, "keywords", {}).get("fused")
            and getattr(self.trainer.precision_plugin, "scaler", None) is not None
            and self.trainer.gradient_clip_val
        ):
            # fp16's loss scaler: a fused step unscales the gradients itself, after clipping would have run
            # on scaled ones, so Lightning refuses the pair. The per-tensor kernel is the same update.
            log.warning(
                "optimizer.fused=true under 16-mixed with gradient clipping: using the unfused kernel"
            )
            factory = functools.partial(factory, fused=False)
        optimizer = factory(params)
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: Any = None,
        gradient_clip_algorithm: Any = None,
    ) -> None:
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None and gradient_clip_val:
            # bf16 autocast has no loss scaler, so a fused optimizer's gradients are plain ones and clip as
            # any others; Lightning's mixed-precision plugin refuses every fused optimizer, as if all had one.
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- adapter-sized checkpoints --------------------------------------------------------------------
    def trainable_names(self) -> set[str]:
        # FSDP (use_orig_params) and activation checkpointing insert wrapper names into parameter names,
        # but not into the full state dict Lightning gathers.
        return {
            n.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
            for n, p in self.named_parameters()
            if p.requires_grad
        }

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = self.trainable_names()
        return {k: v for k, v in self.state_dict().items() if k in names}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Filter the state dict the strategy already gathered (DDP, FSDP full) instead of building another.
        names = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint.get("state_dict", {}).items() if k in names}
        checkpoint["rng_states"] = self._all_rank_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states:  # a checkpoint saved by another world size: rank r takes the states of rank r mod saved
            self._train_rng = states[self.global_rank % len(states)]

    def _all_rank_rng_states(self) -> list[dict[str, Any]]:
        """Every rank draws different dropout masks, so each keeps its own states (Lightning calls this hook
        on every rank and writes rank 0's checkpoint)."""
        mine = self._train_rng or rng_states()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return [mine]
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        return gathered
