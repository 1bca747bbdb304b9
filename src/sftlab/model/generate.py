"""The one generation loop: greedy batched generation of chat continuations, prompted exactly as in training.

The prompt is the template's `generation_prompt`, tokenized exactly as in training (tokenize.encode_prompt),
so the model is asked the question in the form it was trained on. Prompts are left-padded into batches (the
position ids follow the attention mask, so a padded row decodes exactly as it would alone; a test checks
batched == one-by-one); generation stops at the template's end-of-turn token(s).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from sftlab.data.templates import ChatTemplate
from sftlab.data.tokenize import encode_prompt


def stop_token_ids(template: ChatTemplate | None, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS plus every single-token stop string of the template (`<|im_end|>` for ChatML)."""
    ids = {tokenizer.eos_token_id}
    for s in template.stop_strings if template is not None else []:
        tok = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(tok) == 1:
            ids.add(tok[0])
    return sorted(i for i in ids if i is not None)


def _left_pad(prompts: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return input_ids, attention


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    stops: Sequence[int],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[dict]:
    """Greedy continuations of token-id prompts: {"text", "stopped", "new_tokens"} each, in order."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for start in range(0, len(prompts), batch_size):
            input_ids, attention = _left_pad(prompts[start : start + batch_size], pad, device)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=list(stops),
                pad_token_id=pad,
                use_cache=True,
                # the model's generation_config may carry sampling defaults; greedy must not warn or sample
                temperature=None,
                top_p=None,
                top_k=None,
            )
            for row in out[:, input_ids.shape[1] :].tolist():
                stop_at = next((i for i, t in enumerate(row) if t in stops), None)
                text_ids = row if stop_at is None else row[:stop_at]
                outputs.append(
                    {
                        "text": tokenizer.decode(text_ids, skip_special_tokens=True),
                        "stopped": stop_at is not None,
                        "new_tokens": len(text_ids) + (stop_at is not None),
                    }
                )
    finally:
        model.train(was_training)
    return outputs


def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    histories: Sequence[Sequence[dict]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[dict]:
    """Greedy outputs for each conversation history, prompted exactly as in training."""
    prompts = [encode_prompt(h, template, tokenizer) for h in histories]
    return generate_ids(
        model,
        tokenizer,
        prompts,
        stop_token_ids(template, tokenizer),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
