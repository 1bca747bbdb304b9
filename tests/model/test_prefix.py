"""A batch's shared prefix run once (sftlab.model.prefix): where it ends, the one-row layout, and a loss and
gradients equal to the rows computed whole, or the rows computed whole wherever sharing would change them."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DynamicCache,
    FalconH1Config,
    LlamaConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3NextConfig,
)

from sftlab.model import attention
from sftlab.model.forward import attention_span, enable_gradient_checkpointing, token_loss_sum, unwrap
from sftlab.model.prefix import (
    ROW_MULTIPLE,
    SHARED_PREFIX_MIN,
    keys_and_values_only,
    shared_context_length,
    shared_prefix_length,
    shared_prefix_rows,
)
from tests.conftest import chat_batch
from tests.model.test_forward import lora_model

SYSTEM = {
    "role": "system",
    "content": "You convert dates to ISO 8601, YYYY-MM-DD, and answer with the date alone.",
}
QUESTIONS = [
    ("4 July 1998", "1998-07-04"),
    ("the third of March, 2001", "2001-03-03"),
    ("12/31/99", "1999-12-31"),
]
CONVS = [[SYSTEM, {"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QUESTIONS]


@pytest.fixture(scope="module")
def batch(chatml, tokenizer):
    b = chat_batch(CONVS, chatml, tokenizer)
    assert len(set(b["attention_mask"].sum(1).tolist())) == len(CONVS)  # rows of three lengths: padded
    return b


# ---- where the prefix ends -------------------------------------------------------------------------------
def test_shared_context_length_ends_before_the_first_target_and_skips_short_prefixes():
    n = SHARED_PREFIX_MIN + 4
    ids = torch.tensor([[*range(1, n + 1), 7, 8, 9], [*range(1, n + 1), 7, 6, 0]])
    mask = torch.tensor([[1] * (n + 3), [1] * (n + 2) + [0]])
    no_targets = torch.full_like(ids, -100)
    labels = no_targets.clone()
    labels[:, n + 1] = ids[:, n + 1]  # the first target: token n + 1, predicted from position n
    assert shared_context_length(ids, labels, mask) == n  # tokens 0 .. n-1 (n is common too, but predicts)
    labels[1, n] = 7
    assert shared_context_length(ids, labels, mask) == n - 1  # an earlier target in one row
    assert shared_context_length(ids, no_targets, mask) == n + 1  # the shorter row keeps a token of its own
    early = labels.clone()
    early[0, SHARED_PREFIX_MIN] = 1
    assert shared_context_length(ids, early, mask) == 0  # fewer than SHARED_PREFIX_MIN tokens before it
    assert shared_context_length(ids[:1], labels[:1], mask[:1]) == 0  # one row: nothing to share


def test_shared_prefix_length_leaves_every_row_a_token_and_skips_short_prefixes():
    long, short = list(range(100, 100 + SHARED_PREFIX_MIN)), list(range(100, 99 + SHARED_PREFIX_MIN))
    assert shared_prefix_length([[*long, 1, 2], [*long, 1, 3]]) == SHARED_PREFIX_MIN + 1
    assert shared_prefix_length([[*long, 1], [*long, 1, 3]]) == SHARED_PREFIX_MIN  # the shorter keeps one
    assert shared_prefix_length([[*short, 1], [*short, 2]]) == 0  # too short to pay
    assert shared_prefix_length([[*long, 1, 2]]) == 0  # one row: nothing to share


def test_only_a_cache_of_keys_and_values_is_copied_to_the_rows():
    small = {"num_hidden_layers": 4, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 8}
    assert keys_and_values_only(DynamicCache(config=LlamaConfig(**small)))
    assert keys_and_values_only(DynamicCache(config=MistralConfig(**small, sliding_window=8)))
    # Linear attention keeps convolution and recurrent states that batch_repeat_interleave does not copy.
    assert not keys_and_values_only(DynamicCache(config=Qwen3NextConfig(num_hidden_layers=4)))
    assert not keys_and_values_only(DynamicCache(config=FalconH1Config(num_hidden_layers=4)))
    assert not keys_and_values_only(None)


def test_attention_span_is_unbounded_the_window_or_none_for_mixing_layers():
    def model(config):
        m = torch.nn.Module()
        m.config = config
        return m

    small = {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 8}
    assert attention_span(model(LlamaConfig(**small))) == float("inf")
    assert attention_span(model(MistralConfig(**small, sliding_window=8))) == 8
    assert attention_span(model(Qwen3NextConfig(num_hidden_layers=4))) == 0  # linear attention mixes rows
    assert attention_span(model(FalconH1Config(num_hidden_layers=4))) == 0  # so do Mamba layers


# ---- the one-row layout ----------------------------------------------------------------------------------
def test_the_rows_become_the_prefix_once_then_each_rows_own_tokens(batch, tokenizer):
    lengths = batch["attention_mask"].sum(1).tolist()
    shared = shared_context_length(batch["input_ids"], batch["labels"], batch["attention_mask"])
    assert tokenizer.decode(batch["input_ids"][0, :shared]).startswith(
        "<|im_start|>system\nYou convert dates"
    )
    rows = shared_prefix_rows(batch, shared)
    ids, labels = batch["input_ids"], batch["labels"]
    expected_ids = ids[0, :shared].tolist()
    expected_positions = list(range(shared))
    expected_targets = [-100] * shared
    for row, n in enumerate(lengths):
        expected_ids += ids[row, shared:n].tolist()
        expected_positions += list(range(shared, n))
        expected_targets += [*labels[row, shared + 1 : n].tolist(), -100]
    # rounded up to a multiple of ROW_MULTIPLE by untrained tokens after the last row's own
    extra = rows.input_ids.shape[1] - len(expected_ids)
    assert 0 < extra < ROW_MULTIPLE and rows.input_ids.shape[1] % ROW_MULTIPLE == 0
    assert rows.input_ids[0, : len(expected_ids)].tolist() == expected_ids
    assert rows.position_ids.tolist() == [[*expected_positions, *range(lengths[-1], lengths[-1] + extra)]]
    assert rows.targets.tolist() == expected_targets + [-100] * extra
    # the supervised tokens are each row's answer and end of turn, as in the whole batch
    answers = tokenizer.decode(rows.targets[rows.targets != -100])
    assert answers == "".join(f"{a}<|im_end|>" for _, a in QUESTIONS)


# ---- the loss ---------------------------------------------------------------------------------------------
def _loss_and_grads(model, batch, share_prefix, seen=None):
    model.zero_grad(set_to_none=True)
    embed = unwrap(model).get_input_embeddings()
    hook = embed.register_forward_pre_hook(
        lambda m, args: seen.append(tuple(args[0].shape)) if seen is not None else None
    )
    try:
        loss_sum, n = token_loss_sum(model, batch, share_prefix=share_prefix)
    finally:
        hook.remove()
    if loss_sum.requires_grad:
        (loss_sum / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss_sum.detach(), int(n), grads


def _assert_same(model, batch, shares: bool):
    seen: list[tuple] = []
    loss, n, grads = _loss_and_grads(model, batch, True, seen)
    whole_loss, whole_n, whole_grads = _loss_and_grads(model, batch, False)
    lengths = batch["attention_mask"].sum(1)
    shared = shared_context_length(batch["input_ids"], batch["labels"], batch["attention_mask"])
    one_row = (1, -(-(int((lengths - shared).sum()) + shared) // ROW_MULTIPLE) * ROW_MULTIPLE)
    assert seen == ([one_row] if shares else [tuple(batch["input_ids"].shape)])
    assert n == whole_n > 0
    torch.testing.assert_close(loss, whole_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == whole_grads.keys()
    for name, grad in whole_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["lora", "full", "sdpa"])
def test_loss_and_every_gradient_equal_the_rows_computed_whole(
    kind, batch, tiny_cfg, tiny_model_dir, monkeypatch
):
    if kind == "sdpa":  # rows too long for the eager path: the prefix and the rows through SDPA's kernel
        monkeypatch.setattr(attention, "EAGER_MAX_LENGTH", 8)
    if kind != "full":
        model = lora_model(tiny_cfg, tiny_model_dir, dropout=0.0)
    else:  # every weight trains, the embedding too: the prefix tokens' rows get every row's gradient
        from sftlab.model.load import load_model

        model = load_model(tiny_cfg.model, tiny_model_dir)
    model.train()
    _assert_same(model, batch, shares=True)


def tiny(cls, config_cls, tokenizer, **extra):
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        **extra,
    )
    config._attn_implementation = attention.implementation("auto")
    return cls(config).train()


@pytest.mark.parametrize("mode", [True, "reentrant"])
def test_checkpointed_layers_recompute_the_one_row_alike(mode, batch, tiny_cfg, tiny_model_dir):
    model = lora_model(tiny_cfg, tiny_model_dir, dropout=0.0).train()
    enable_gradient_checkpointing(model, mode)
    _assert_same(model, batch, shares=True)


def test_other_architectures_share_through_the_same_attention(batch, tokenizer):
    # Qwen3 normalises queries and keys per head; Mistral declares a window, here longer than the rows.
    _assert_same(tiny(Qwen3ForCausalLM, Qwen3Config, tokenizer), batch, shares=True)
    _assert_same(tiny(MistralForCausalLM, MistralConfig, tokenizer, sliding_window=4096), batch, shares=True)


def test_rows_run_whole_wherever_sharing_would_change_them(batch, tokenizer, tiny_cfg, tiny_model_dir):
    window = int(batch["attention_mask"].sum(1).max()) - 1  # the longest row sees past its window
    _assert_same(
        tiny(MistralForCausalLM, MistralConfig, tokenizer, sliding_window=window), batch, shares=False
    )
    dropout = lora_model(tiny_cfg, tiny_model_dir, dropout=0.1).train()
    seen: list[tuple] = []
    _loss_and_grads(dropout, batch, True, seen)
    assert seen == [tuple(batch["input_ids"].shape)]  # one dropout mask per row, as whole rows draw them
    _assert_same(dropout.eval(), batch, shares=True)  # evaluation draws none: shared


def test_a_layer_that_does_not_hand_the_rows_to_attention_makes_the_model_run_rows_whole(
    batch, tiny_cfg, tiny_model_dir
):
    model = lora_model(tiny_cfg, tiny_model_dir, dropout=0.0).train()
    attn = unwrap(model).model.layers[1].self_attn
    forward = attn.forward
    attn.forward = lambda *args, shared_prefix_rows=None, **kwargs: forward(*args, **kwargs)
    seen: list[tuple] = []
    loss, _, _ = _loss_and_grads(model, batch, True, seen)
    whole, _, _ = _loss_and_grads(model, batch, False)
    one_row, rows = seen
    assert one_row[0] == 1 and rows == tuple(batch["input_ids"].shape)  # tried once, then computed whole
    torch.testing.assert_close(loss, whole)
    assert attention_span(unwrap(model)) == 0
    seen.clear()
    _loss_and_grads(model, batch, True, seen)
    assert seen == [tuple(batch["input_ids"].shape)]  # not tried again
