"""A real byte-level BPE tokenizer with a small vocabulary, trained here by `tokenizers`: reading a GGUF file
costs about a second per thousand tokens of vocabulary, so the per-architecture round trips use this one and
the SmolLM2 tokenizer is kept for the tests that check its own tokens."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Convert this date to ISO 8601 (YYYY-MM-DD): the 5th of March, 2021",
    "2021-03-05. What is the capital of France? The capital of France is Paris.",
    "user assistant system Be brief. Name a colour. Blue.",
]


@pytest.fixture(scope="session")
def small_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
