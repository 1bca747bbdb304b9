"""Added special tokens: embeddings grow, only the new rows train, the adapter carries them, a new process
reloads base + adapter and reproduces the logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate

from sftlab import build
from sftlab.model.forward import token_loss_sum
from sftlab.model.load import load_model, load_tokenizer, model_source
from sftlab.model.tokens import add_special_tokens, fit_embeddings
from sftlab.rundir import write
from tests.conftest import ROOT, chat_batch

NEW = ["<|tool_call|>", "<|tool_end|>"]
CONV = [
    {"role": "user", "content": "Call the clock tool."},
    {"role": "assistant", "content": "<|tool_call|>clock()<|tool_end|>"},
]
RELOAD = """
import json, sys, torch
from sftlab.build import load_run
from sftlab import build
run = load_run(sys.argv[1])
ids = json.loads(sys.argv[2])
with torch.no_grad():
    print(json.dumps(run.model(input_ids=torch.tensor([ids])).logits[0].tolist()))
"""


def effective_rows(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(input embedding rows, output head rows) as the model computes with them, adapters included."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    vocab = emb.weight.shape[0] if hasattr(emb, "weight") else emb.base_layer.weight.shape[0]
    with torch.no_grad():
        rows = emb(torch.arange(vocab))
        hidden = rows.shape[1]
        head_rows = head(torch.eye(hidden)).T  # head(x) = x @ W.T, so the identity gives W.T
    return rows.clone(), head_rows.clone()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied_head"])
def test_new_tokens_train_alone_and_reload_identically_in_a_new_process(tmp_path, tied):
    cfg = build.compose(
        [
            "model=tiny_random",
            f"model.random_init.tie_word_embeddings={str(tied).lower()}",
            f"model.special_tokens=[{','.join(json.dumps(t) for t in NEW)}]",
        ],
        output_dir=tmp_path,
    )
    source = model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    old_vocab = len(tokenizer)
    ids = add_special_tokens(tokenizer, cfg.model.special_tokens)
    assert ids == [old_vocab, old_vocab + 1]
    assert tokenizer("<|tool_call|>x", add_special_tokens=False)["input_ids"][0] == old_vocab  # one token

    model = load_model(cfg.model, source)
    old_emb, old_head = effective_rows(model)
    assert fit_embeddings(model, tokenizer) == 2
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb[old_vocab], old_emb.mean(0)) and torch.equal(emb[:old_vocab], old_emb)

    adapter = instantiate(cfg.adapter, _convert_="all")
    model = adapter.apply(model, new_token_ids=ids)
    indices = model.peft_config["default"].trainable_token_indices
    assert indices == ({"embed_tokens": ids} if tied else {"embed_tokens": ids, "lm_head": ids})

    template = instantiate(cfg.template, _convert_="all")
    batch = chat_batch([CONV], template, tokenizer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss_sum, n = token_loss_sum(model, batch)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
    model.eval()

    new_emb, new_head = effective_rows(model)
    assert torch.equal(new_emb[:old_vocab], old_emb)  # every old row bit-identical
    assert torch.equal(new_head[:old_vocab], old_head)
    assert not torch.equal(new_emb[old_vocab:], emb[old_vocab:].detach())  # the new rows trained
    assert not torch.equal(new_head[old_vocab:], old_head.mean(0).expand(2, -1))

    write.write_config(tmp_path, cfg)
    write.save_model(tmp_path, model, tokenizer, template)
    probe = batch["input_ids"][0].tolist()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([probe])).logits[0]
    out = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path), json.dumps(probe)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    reloaded = torch.tensor(json.loads(out.strip().splitlines()[-1]))
    assert (reloaded - expected).abs().max() < 1e-6


def test_tokens_already_in_the_vocabulary_are_not_added_but_still_trained(tokenizer):
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path) if tokenizer.name_or_path else tokenizer
    n = len(tok)
    ids = add_special_tokens(tok, ["<|im_end|>", "<|im_end|>"])
    assert len(tok) == n and ids == [tok.convert_tokens_to_ids("<|im_end|>")]
