"""Write a merged Hugging Face causal LM as a GGUF file (llama.cpp, Ollama, LM Studio) with `gguf`.

Why our own mapping: llama.cpp's converter (`convert_hf_to_gguf.py`) is a script in the llama.cpp source tree,
not part of the `gguf` package on PyPI, and it reads a saved directory rather than a model in memory. The
`gguf` package does the hard parts: the tensor-name table (`get_tensor_name_map`), quantization
(`gguf.quants`), the file writer and the tokenizer readers (`SpecialVocab`, `LlamaHfVocab`). What is left
here is llama.cpp's convention for the few architectures sftlab's model zoo shares with it (Llama, Mistral,
Qwen2, Qwen3): the hyper-parameter keys and the rotary permutation of Llama's q/k weights. transformers'
GGUF reader undoes exactly these conventions, so `verify.py` checks every file we write by loading it back.

The file carries the run's tokenizer, the training chat template as `tokenizer.chat_template`, BOS/EOS/EOT ids
and whether BOS is prepended, so llama.cpp and Ollama prompt the model as training did.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftlab.errors import ConfigError
from sftlab.model.generate import stop_token_ids

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
# quant name -> (tensor type of 2-D weights, file type recorded in general.file_type)
QUANTS: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (Q.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (Q.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
# transformers model_type -> llama.cpp architecture (llama.cpp runs Mistral as `llama`)
ARCHES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA}
ARCHES |= {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}
# The pre-tokenizer llama.cpp must use, told apart by the `tokenizer.json` pre-tokenizer (llama.cpp's
# converter hashes a probe text; its table lives in the script we cannot import). A tokenizer that
# transformers rebuilt from a GGUF (the embedded SmolLM2) has a plain GPT-2 ByteLevel split, whatever the
# original said: the file must then say `gpt-2`, the splitting the model was trained with here.
PRE_TOKENIZERS = (
    ('"Digits"', "smollm"),  # SmolLM / StarCoder: single digits, then ByteLevel
    ("\\p{N}{1,3}", "llama-bpe"),  # Llama 3
    ("\\p{N}|", "qwen2"),  # Qwen2 / Qwen3
    ('"use_regex": true', "gpt-2"),
)


@dataclass
class Written:
    path: Path
    quant: str
    arch: str
    tensors: int
    bytes: int
    eot_token_id: int
    stop_tokens: list[str]
    add_bos: bool


def eot_token_id(template: Any, tokenizer: Any) -> int:
    """The id that ends an assistant turn: the template's first stop string when it is one token, else EOS."""
    for text in getattr(template, "stop_strings", None) or []:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return ids[0]
    return tokenizer.eos_token_id


def check_quant(quant: str) -> tuple[Q, gguf.LlamaFileType]:
    if quant not in QUANTS:
        raise ConfigError(f"quant={quant!r}: use one of {', '.join(QUANTS)}.")
    return QUANTS[quant]


def check_supported(config: Any) -> gguf.MODEL_ARCH:
    """The llama.cpp architecture for this model, or one message saying why it cannot be exported."""
    arch = ARCHES.get(config.model_type)
    if arch is None:
        raise ConfigError(
            f"format=gguf: model type {config.model_type!r} is not supported by sftlab's GGUF export "
            f"(supported: {', '.join(sorted(ARCHES))}). Merge to a Hugging Face directory (format=hf) and "
            "convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(
            f"format=gguf: rope scaling {rope.get('rope_type')!r} is not written by sftlab's GGUF export. "
            "Merge to a Hugging Face directory (format=hf) and convert it with llama.cpp's converter."
        )
    return arch


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's layout for Llama's q/k rows (its rotary embedding pairs adjacent elements; transformers'
    pairs the two halves of each head). transformers' GGUF reader applies the inverse."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model: PreTrainedModel, arch: gguf.MODEL_ARCH) -> Iterator[tuple[str, np.ndarray]]:
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(
                f"format=gguf: no GGUF name for tensor {hf_name!r} of a {config.model_type} model."
            )
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("attn_q.weight", "attn_q.bias")):
            data = _permute(data, config.num_attention_heads, config.num_attention_heads)
        elif arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("attn_k.weight", "attn_k.bias")):
            kv = config.num_key_value_heads or config.num_attention_heads
            data = _permute(data, config.num_attention_heads, kv)
        yield name, data


def _tensor_type(data: np.ndarray, qtype: Q) -> Q:
    """Norms and biases stay F32 (as llama.cpp keeps them); rows not divisible in blocks fall back to F16."""
    if data.ndim < 2:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if data.shape[-1] % block == 0 else Q.F16


def pre_tokenizer(tokenizer_json: dict) -> str:
    text = json.dumps(tokenizer_json.get("pre_tokenizer"))
    for needle, name in PRE_TOKENIZERS:
        if needle in text:
            return name
    log.warning("GGUF export: unknown pre-tokenizer; llama.cpp will use its default splitting.")
    return "default"


def _vocab(tokenizer: PreTrainedTokenizerBase, saved: Path, writer: gguf.GGUFWriter) -> None:
    """Tokens, types (and scores), merges, special ids: ByteLevel BPE as llama.cpp's `gpt2` model, a
    byte-fallback (SentencePiece-style) BPE as its `llama` model through gguf's own reader."""
    tj = json.loads((saved / "tokenizer.json").read_text(encoding="utf-8"))
    n_vocab = len(tokenizer)
    if tj["model"]["type"] == "BPE" and not tj["model"].get("byte_fallback", False):
        added = tokenizer.added_tokens_decoder
        tokens, types = [], []
        for i, text in enumerate(tokenizer.convert_ids_to_tokens(list(range(n_vocab)))):
            tokens.append(text if text is not None else f"[PAD{i}]")
            if i in added:
                types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            else:
                types.append(gguf.TokenType.NORMAL)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer(tj))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    else:
        try:
            vocab = gguf.vocab.LlamaHfVocab(saved)
        except (FileNotFoundError, TypeError) as err:
            raise ConfigError(f"format=gguf: this tokenizer cannot be written to GGUF ({err}).") from None
        tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
    special = gguf.SpecialVocab(saved, load_merges=True, n_vocab=n_vocab)
    special.chat_template = None  # written below from the training template
    special.add_special_token = {}  # BOS / EOS insertion is decided by the training template
    special.add_to_gguf(writer, quiet=True)


def write_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: Any,
    path: Path,
    quant: str = "f16",
    name: str = "sftlab model",
) -> Written:
    """`model` (merged, in memory) as one GGUF file at `path`, weights in `quant`."""
    qtype, ftype = check_quant(quant)
    config = model.config
    arch = check_supported(config)
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    writer = gguf.GGUFWriter(path, arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(len(tokenizer))
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        _vocab(tokenizer, Path(tmp), writer)
    stops = stop_token_ids(template, tokenizer)
    # the template's end of turn: its first stop string (Llama 3's <|eot_id|>, not <|end_of_text|> nor the
    # <|eom_id|> that ends a tool-call turn), else EOS
    eot = eot_token_id(template, tokenizer)
    writer.add_eot_token_id(eot)
    add_bos = bool(template.uses_bos())
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    writer.add_chat_template(template.to_jinja())  # the training template, whatever the tokenizer carried

    count = 0
    for tensor_name, data in _tensors(model, arch):
        ttype = _tensor_type(data, qtype)
        if ttype == Q.F32:
            writer.add_tensor(tensor_name, data.astype(np.float32))
        elif ttype == Q.F16:
            writer.add_tensor(tensor_name, data.astype(np.float16))
        else:
            writer.add_tensor(tensor_name, gguf.quants.quantize(data, ttype), raw_dtype=ttype)
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return Written(
        path=path,
        quant=quant,
        arch=arch_name,
        tensors=count,
        bytes=path.stat().st_size,
        eot_token_id=eot,
        stop_tokens=[tokenizer.convert_ids_to_tokens(i) for i in stops],
        add_bos=add_bos,
    )
