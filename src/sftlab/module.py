"""SFTModule: the LightningModule around a causal LM + adapter.

Loss = sum of token losses / target tokens of the whole optimizer step. The sampler tags every micro-batch
with the step's global target count (`step_targets`); Lightning divides each micro-batch loss by
`accumulate_grad_batches` and DDP averages gradients over ranks, so both factors are multiplied back in.

Logits are computed only at target positions: the decoder's hidden states are gathered where labels are not
-100 and only those rows go through the output head, so no (batch x length x vocab) fp32 tensor is built.

Checkpoints hold only trainable weights (plus optimizer and loop state): adapter-sized for LoRA.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from peft import PeftModel
from torchmetrics import MeanMetric

from sftlab.data.tokenize import IGNORE_INDEX


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The *ForCausalLM under a PeftModel (LoRA layers are injected in place, so it trains the adapter)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over target positions, number of target positions)."""
    lm = unwrap(model)
    hidden = lm.get_decoder()(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    logits = lm.get_output_embeddings()(hidden[:, :-1][mask]).float()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if softcap:  # Gemma 2 caps logits; skipping it would train a different function than inference runs
        logits = torch.tanh(logits / softcap) * softcap
    loss_sum = F.cross_entropy(logits, targets[mask], reduction="sum")
    return loss_sum, mask.sum()


class SFTModule(pl.LightningModule):
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        # from_pretrained returns eval mode and Lightning keeps submodule modes: without this, LoRA dropout
        # would silently stay off during training.
        self.model.train()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        if gradient_checkpointing:
            unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            unwrap(model).enable_input_require_grads()
        self.strict_loading = False  # checkpoints carry trainable weights only
        self.val_loss = MeanMetric()
        self._step_loss = torch.zeros(())
        self._step_targets = 0
        self._step_tokens = 0
        self._step_clock = time.perf_counter()

    # ---- training -------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, n_targets = token_loss_sum(self.model, batch)
        self._step_loss = self._step_loss + loss_sum.detach().float().cpu()
        self._step_targets += int(n_targets)
        self._step_tokens += int(batch["attention_mask"].sum())
        step_targets = batch["step_targets"].clamp(min=1)
        return loss_sum * (self.trainer.accumulate_grad_batches * self.trainer.world_size) / step_targets

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Runs once per optimizer step, after all its micro-batches: log the token-weighted step loss."""
        loss, targets, tokens = self._step_loss, self._step_targets, self._step_tokens
        if self.trainer.world_size > 1:
            totals = self.all_gather(torch.tensor([float(loss), targets, tokens], device=self.device)).sum(0)
            loss, targets, tokens = totals[0], int(totals[1]), int(totals[2])
        now = time.perf_counter()
        elapsed = max(now - self._step_clock, 1e-9)
        self.log("train/loss", float(loss) / max(targets, 1), prog_bar=True, rank_zero_only=True)
        self.log("train/tokens_per_s", tokens / elapsed, rank_zero_only=True)
        self.log("train/target_tokens_per_s", targets / elapsed, rank_zero_only=True)
        self._step_loss, self._step_targets, self._step_tokens, self._step_clock = torch.zeros(()), 0, 0, now

    # ---- validation -----------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, n_targets = token_loss_sum(self.model, batch)
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
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- adapter-sized checkpoints --------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.trainable_state_dict()
