"""`eval=loss`: validation loss and perplexity, computed exactly as in training (response tokens only,
sum of token losses / number of target tokens over the whole split), for the base and the tuned model."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pytorch_lightning.utilities import move_data_to_device

from sftlab.data.tokenize import IGNORE_INDEX
from sftlab.eval.base import LOSS, EvalContext
from sftlab.model.forward import token_loss_sum


def _batches(examples: list, batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[row, :n], labels[row, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels)
            mask[row, :n] = 1
        yield {"input_ids": ids, "labels": labels, "attention_mask": mask}


@dataclass
class LossEval:
    """Loss of the response tokens of a split; perplexity = exp(loss)."""

    split: str = "val"
    batch_size: int = 8
    max_examples: int | None = None
    compare_base: bool = True
    stage: ClassVar[int] = LOSS

    @torch.no_grad()
    def run(self, ctx: EvalContext) -> dict[str, Any]:
        examples = list(ctx.split(self.split).examples)[: self.max_examples]
        device = next(ctx.model.parameters()).device
        was_training = ctx.model.training
        ctx.model.eval()
        total, count = 0.0, 0
        try:
            for batch in _batches(examples, self.batch_size, ctx.tokenizer.pad_token_id):
                loss_sum, n = token_loss_sum(ctx.model, move_data_to_device(batch, device))
                total, count = total + float(loss_sum), count + int(n)
        finally:
            ctx.model.train(was_training)
        loss = total / max(count, 1)
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "target_tokens": count,
            "n": len(examples),
        }
