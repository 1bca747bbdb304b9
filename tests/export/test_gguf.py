"""The GGUF writer: every supported architecture comes back from the file (read by transformers, which undoes
llama.cpp's conventions) computing the same logits, and the file carries the training template and stops."""

from __future__ import annotations

import gguf
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sftlab.errors import ConfigError
from sftlab.export.gguf import pre_tokenizer, write_gguf
from sftlab.export.verify import load_gguf

SHAPES = {
    # GQA (3 kv heads for 6 heads) exercises the q/k permutation with different head counts
    "llama": {"num_attention_heads": 6, "num_key_value_heads": 3},
    "mistral": {"num_attention_heads": 6, "num_key_value_heads": 2},
    "qwen2": {"num_attention_heads": 6, "num_key_value_heads": 3},  # q/k/v biases
    # q/k norms and head_dim != hidden / heads (128: transformers reads no key_length for qwen3 and takes its
    # default, which every Qwen3 release uses)
    "qwen3": {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128},
}


def random_model(model_type: str, tokenizer, tie: bool = True):
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        **SHAPES[model_type],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # biases and norms start at 0 / 1: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=torch.tensor([ids])).logits[0]


# llama.cpp runs Mistral as its `llama` architecture
READ_BACK_AS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


@pytest.mark.parametrize(
    ("model_type", "tie"), [("llama", True), ("mistral", False), ("qwen2", True), ("qwen3", False)]
)
def test_f32_file_reloads_to_the_same_logits(model_type, tie, small_tokenizer, chatml, tmp_path):
    tok = small_tokenizer
    model = random_model(model_type, tok, tie)
    path = tmp_path / "m.f32.gguf"
    write_gguf(model, tok, chatml.bind(tok), path, quant="f32")
    reloaded, file_tok = load_gguf(path)
    ids = tok("<|im_start|>user\nConvert the 5th of March, 2021 to ISO 8601<|im_end|>\n")["input_ids"]
    assert reloaded.config.model_type == READ_BACK_AS[model_type]
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    assert file_tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids


def test_file_carries_the_training_template_special_ids_and_quant_types(small_tokenizer, chatml, tmp_path):
    tokenizer = small_tokenizer
    tokenizer.chat_template = "{{ 'not the training template' }}"
    model = random_model("llama", tokenizer)
    path = tmp_path / "m.q8_0.gguf"
    written = write_gguf(model, tokenizer, chatml.bind(tokenizer), path, quant="q8_0")
    reader = gguf.GGUFReader(path)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("tokenizer.chat_template") == chatml.to_jinja()
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert field("tokenizer.ggml.eot_token_id") == 2 and field("tokenizer.ggml.bos_token_id") == 1
    assert field("tokenizer.ggml.add_bos_token") is False  # ChatML trains without BOS
    assert field("tokenizer.ggml.pre") == "gpt-2" and field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.tokens")[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(field("tokenizer.ggml.tokens")) == len(tokenizer)
    assert len(field("tokenizer.ggml.merges")) == len(tokenizer) - 256 - 3  # byte alphabet + 3 specials
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert written.stop_tokens == ["<|im_end|>"] and written.tensors == len(types)


def test_pre_tokenizer_names():
    assert pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}]}
    assert pre_tokenizer({"pre_tokenizer": digits}) == "smollm"


def test_unsupported_model_and_quant_are_refused(tokenizer, chatml, tmp_path):
    config = AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_layer=1, n_head=2)
    with pytest.raises(ConfigError, match="model type 'gpt2' is not supported"):
        write_gguf(AutoModelForCausalLM.from_config(config), tokenizer, chatml, tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match="quant='q3_k'"):
        write_gguf(random_model("llama", tokenizer), tokenizer, chatml, tmp_path / "x.gguf", quant="q3_k")
    assert not (tmp_path / "x.gguf").exists()
