"""Greedy generation on held-out conversations and exact-match scoring.

The prompt is the template's `generation_prompt`, tokenized exactly as in training (tokenize.encode_prompt),
so the model is asked the question in the form it was trained on. Prompts are left-padded into batches;
generation stops at the template's end-of-turn token(s). The fraction of generations that ran into
`max_new_tokens` without stopping is reported: it flags a model that never learned to stop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from sftlab.data.templates import ChatTemplate
from sftlab.data.tokenize import encode_prompt


def stop_token_ids(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for s in template.stop_strings:
        tok = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(tok) == 1:
            ids.add(tok[0])
    return sorted(i for i in ids if i is not None)


def split_prompt(conversation: Sequence[dict]) -> tuple[list[dict], str]:
    """History up to the last assistant turn, and that turn's content (the reference)."""
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    return list(conversation[:last]), conversation[last]["content"]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    histories: Sequence[Sequence[dict]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[dict]:
    """Greedy outputs for each history: {"text", "stopped"}."""
    stops = stop_token_ids(template, tokenizer)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(histories), batch_size):
        prompts = [encode_prompt(h, template, tokenizer) for h in histories[start : start + batch_size]]
        width = max(map(len, prompts))
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=stops, pad_token_id=pad, use_cache=True,
        )
        for row in out[:, width:].tolist():
            stop_at = next((i for i, t in enumerate(row) if t in stops), None)
            text_ids = row if stop_at is None else row[:stop_at]
            outputs.append({"text": tokenizer.decode(text_ids, skip_special_tokens=True), "stopped": stop_at is not None})
    model.train(was_training)
    return outputs


def normalize(text: str) -> str:
    return " ".join(text.strip().split()).lower()


@dataclass
class GenerationEval:
    """`eval=generate`: exact match of greedy generations against the references of a split."""

    split: str = "test"
    max_new_tokens: int = 32
    batch_size: int = 16
    max_examples: int | None = None
    compare_base: bool = True

    def run(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate,
            conversations: Sequence[Sequence[dict]], out_file: Path | None = None) -> dict[str, Any]:
        convs = list(conversations)[: self.max_examples]
        histories, references = zip(*(split_prompt(c) for c in convs), strict=True)
        outs = generate(model, tokenizer, template, histories, max_new_tokens=self.max_new_tokens,
                        batch_size=self.batch_size)
        matches = [normalize(o["text"]) == normalize(r) for o, r in zip(outs, references, strict=True)]
        if out_file is not None:
            out_file.parent.mkdir(parents=True, exist_ok=True)
            with open(out_file, "w", encoding="utf-8") as f:
                for h, r, o, m in zip(histories, references, outs, matches, strict=True):
                    row = {"prompt": h[-1]["content"], "reference": r, "output": o["text"], "exact_match": m,
                           "stopped": o["stopped"]}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        n = len(matches)
        return {
            "exact_match": sum(matches) / n,
            "no_stop_rate": sum(not o["stopped"] for o in outs) / n,
            "n": n,
        }
