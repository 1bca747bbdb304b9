"""Check an exported GGUF file by loading it back with transformers and comparing it with the merged model.

The probe set is the run's own data (its test split, else val, else train: the first few conversations), not
a fixed task, so the check covers the prompts the model was tuned for. Checked: the file's tokenizer encodes
the probe texts to the same ids, its chat template is the training template, the logits over every probe
token are within the quantization's tolerance, and the greedy answers agree (required for lossless-ish
`f32` / `f16`; reported for the others, where an argmax can flip on a near tie).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sftlab.data.formats import BadRow, split_prompt, to_messages
from sftlab.data.sources import SPLITS, parse_sources, read_source
from sftlab.data.tokenize import encode_conversations
from sftlab.errors import SFTLabError
from sftlab.model.generate import generate

log = logging.getLogger(__name__)

# (largest, mean) |logit difference| allowed against the fp32 merged model over the probe tokens. Measured
# on SmolLM2-135M-Instruct with the ISO-date probes (logits span about 40): f16 0.064 / 0.0058, bf16 0.25 /
# 0.031, q8_0 1.73 / 0.20; the limits leave about 2x room (docs/export.md).
TOLERANCE = {
    "f32": (1e-3, 1e-4),
    "f16": (0.25, 0.02),
    "bf16": (1.0, 0.1),
    "q8_0": (4.0, 0.5),
    "q5_1": (8.0, 1.0),
    "q5_0": (8.0, 1.0),
    "q4_1": (16.0, 2.0),
    "q4_0": (16.0, 2.0),
}
EXACT_GREEDY = ("f32", "f16")


def probe_conversations(data_cfg: Any, n: int = 4) -> list[list[dict]]:
    """The first `n` conversations with an assistant turn from the run's test, val or train data."""
    for split in reversed(SPLITS):  # test, val, train
        key = f"data.{split}_path"
        convs = []
        for source in parse_sources(data_cfg.get(f"{split}_path"), key):
            for where, row in read_source(source, key, split):
                try:
                    conv = to_messages(row, data_cfg.get("format"), where, data_cfg.get("fields"))
                except BadRow:
                    continue
                if not isinstance(conv, str) and any(m["role"] == "assistant" for m in conv):
                    convs.append(conv)
                if len(convs) == n:
                    return convs
        if convs:
            return convs
    raise SFTLabError("format=gguf: the run's data has no conversation with an assistant turn to probe with.")


@torch.no_grad()
def _logits(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0].float()


def load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The file as transformers reads it (dequantized to fp32)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def verify_gguf(
    path: Path,
    quant: str,
    merged: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: Any,
    conversations: Sequence[list[dict]],
    max_new_tokens: int = 16,
) -> dict:
    """The report written to merge.json: what was compared, the figures, and whether each check passed."""
    reloaded, file_tokenizer = load_gguf(path)
    merged = merged.float().eval()
    encoded = encode_conversations(conversations, template, tokenizer)
    tokens_equal = all(
        file_tokenizer(tokenizer.decode(e.input_ids), add_special_tokens=False)["input_ids"] == e.input_ids
        for e in encoded
    )
    diffs, agree, total = [], 0, 0
    for e in encoded:
        a, b = _logits(merged, e.input_ids), _logits(reloaded, e.input_ids)
        diffs.append((a - b).abs())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(e.input_ids)
    diff = torch.cat([d.flatten() for d in diffs])
    histories = [split_prompt(c)[0] for c in conversations]
    want = generate(merged, tokenizer, template, histories, max_new_tokens=max_new_tokens)
    got = generate(reloaded, tokenizer, template, histories, max_new_tokens=max_new_tokens)
    same_greedy = [w["text"] == g["text"] for w, g in zip(want, got, strict=True)]
    max_tol, mean_tol = TOLERANCE[quant]
    checks = {
        "tokenizer_ids_equal": tokens_equal,
        "chat_template_equal": file_tokenizer.chat_template == template.to_jinja(),
        "logits_within_tolerance": float(diff.max()) <= max_tol and float(diff.mean()) <= mean_tol,
        "greedy_answers_equal": all(same_greedy) if quant in EXACT_GREEDY else None,
    }
    return {
        "loaded_with": "transformers (gguf_file=...)",
        "probe_conversations": len(conversations),
        "probe_tokens": total,
        "logits_max_abs_diff": float(diff.max()),
        "logits_mean_abs_diff": float(diff.mean()),
        "tolerance": {"max": max_tol, "mean": mean_tol},
        "argmax_agreement": agree / total,
        "greedy_same": f"{sum(same_greedy)}/{len(same_greedy)}",
        "greedy_examples": [{"merged": w["text"], "gguf": g["text"]} for w, g in zip(want, got, strict=True)][
            :2
        ],
        "checks": checks,
        "passed": all(v is not False for v in checks.values()),
    }
