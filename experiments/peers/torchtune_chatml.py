"""A torchtune ModelTokenizer for SmolLM2's ChatML, as a torchtune user writes one for a model torchtune has no
builder for: torchtune 0.6.1 reads a Hugging Face tokenizer.json (HuggingFaceBaseTokenizer) but ships no model
tokenizer that renders ChatML from it (its Qwen2 tokenizer wants vocab.json + merges.txt and Qwen's special
token ids).

Each piece of a turn is encoded on its own, as sftlab encodes its template's segments:
`<|im_start|>{role}\\n` + content + `<|im_end|>` + `\\n`; a turn that is not masked trains its content and
`<|im_end|>`. Referenced from torchtune_lora.yaml as `torchtune_chatml.chatml_tokenizer` (the run directory is
on PYTHONPATH).
"""

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from torchtune.data import Message
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer, ModelTokenizer


class ChatMLTokenizer(ModelTokenizer, Transform):
    def __init__(self, path: str, max_seq_len: Optional[int] = None) -> None:
        d = Path(path)
        self.base = HuggingFaceBaseTokenizer(
            str(d / "tokenizer.json"), tokenizer_config_json_path=str(d / "tokenizer_config.json")
        )
        self.max_seq_len = max_seq_len
        self.eos_id = self.base.tokenizer.token_to_id("<|im_end|>")
        self.pad_id = self.eos_id  # SmolLM2's pad is its eos; padding is never a target (label -100)
        self.bos_id = self.base.bos_id
        self.special_tokens = {t: self.base.tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>")}

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
        ids = self.base.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, token_ids: List[int], skip_special_tokens: bool = True) -> str:
        return self.base.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def tokenize_messages(self, messages: List[Message], add_end_tokens: bool = True) -> Tuple[List[int], List[bool]]:
        tokens: List[int] = []
        mask: List[bool] = []
        for m in messages:
            head = self.encode(f"<|im_start|>{m.role}\n")
            body = self.encode(m.text_content) + self.encode("<|im_end|>")
            tail = self.encode("\n")
            tokens += head + body + tail
            mask += [True] * len(head) + [m.masked] * len(body) + [True] * len(tail)
        if self.max_seq_len is not None:
            tokens, mask = tokens[: self.max_seq_len], mask[: self.max_seq_len]
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Dict[str, Any]:
        tokens, mask = self.tokenize_messages(sample["messages"])
        return {**sample, "tokens": tokens, "mask": mask}


def chatml_tokenizer(path: str, max_seq_len: Optional[int] = None) -> ChatMLTokenizer:
    return ChatMLTokenizer(path, max_seq_len=max_seq_len)
