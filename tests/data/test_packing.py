"""Packing: several examples per row give exactly the per-example logits and losses of unpacked examples.

The controls show the check has teeth: the same packed row with position ids that do not restart, or with a
plain 2-D attention mask (examples see each other), does not match.
"""

from __future__ import annotations

import pytest
import torch

from sftlab import build
from sftlab.data.collate import Examples, boundaries, collate
from sftlab.data.packing import pack
from sftlab.data.tokenize import IGNORE_INDEX, encode_conversations
from sftlab.model.forward import token_loss_sum

CONVERSATIONS = [
    [
        {"role": "user", "content": f"Question {i}: " + "why " * (3 * i + 1)},
        {"role": "assistant", "content": f"Answer {i}: " + "because " * (2 * i + 2)},
    ]
    for i in range(6)
]


@pytest.fixture(scope="module")
def encoded(tokenizer, chatml):
    return encode_conversations(CONVERSATIONS, chatml, tokenizer)


@pytest.fixture(scope="module", params=["auto", "sdpa", "eager"])
def model(request):
    from sftlab.model.load import load_model, model_source

    cfg = build.compose(["model=tiny_random", f"model.attn_implementation={request.param}"]).model
    return load_model(cfg, model_source(cfg)).eval()


def batch_of(examples, pad_id):
    return collate([Examples(examples)[i] for i in range(len(examples))], pad_id)


def logits(model, batch):
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
        ).logits


def test_pack_keeps_every_example_and_resets_positions(encoded):
    rows = pack(encoded, max_length=96)
    assert all(len(r.input_ids) <= 96 for r in rows) and len(rows) < len(encoded)
    pieces = []
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        for a, b in zip(starts, [*starts[1:], len(row.input_ids)], strict=True):
            assert row.position_ids[a:b] == list(range(b - a))
            assert row.labels[a] == IGNORE_INDEX  # an example's first token is no target of the previous one
            pieces.append((row.input_ids[a:b], row.labels[a:b]))
    assert sorted(pieces) == sorted((e.input_ids, e.labels) for e in encoded)


def test_packed_batches_state_their_boundaries_as_flash_attention_reads_them():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])  # the last two of row 2: padding
    b = boundaries(position_ids)
    assert b["cu_seq_lens_q"].tolist() == b["cu_seq_lens_k"].tolist() == [0, 3, 5, 6, 10, 11, 12]
    assert b["cu_seq_lens_q"].dtype == b["seq_idx"].dtype == torch.int32
    assert b["max_length_q"] == b["max_length_k"] == 4
    assert b["seq_idx"].tolist() == [[0, 0, 0, 1, 1, 2], [3, 3, 3, 3, 4, 5]]


def _spans(row):
    starts = [i for i, p in enumerate(row) if p == 0]
    return list(zip(starts, [*starts[1:], len(row)], strict=True))


def test_packed_logits_equal_unpacked(model, encoded, tokenizer):
    rows = pack(encoded, max_length=128)
    packed = batch_of(rows, tokenizer.pad_token_id)
    out = logits(model, {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]})
    by_tokens = {tuple(e.input_ids): e for e in encoded}
    checked = 0
    for r, row in enumerate(rows):
        for a, b in _spans(row.position_ids):
            ex = by_tokens[tuple(row.input_ids[a:b])]
            alone = logits(model, {"input_ids": torch.tensor([ex.input_ids])})[0]
            torch.testing.assert_close(out[r, a:b], alone, atol=1e-5, rtol=0)
            checked += 1
    assert checked == len(encoded)


def test_controls_fail_the_same_check(model, encoded, tokenizer):
    rows = pack(encoded, max_length=128)
    row = next(r for r in rows if len(_spans(r.position_ids)) > 1)
    a, b = _spans(row.position_ids)[1]  # the second example of a row: it could see the first one
    alone = logits(model, {"input_ids": torch.tensor([row.input_ids[a:b]])})[0]
    ids = torch.tensor([row.input_ids])
    not_reset = logits(model, {"input_ids": ids, "position_ids": torch.arange(len(row.input_ids))[None]})[0]
    plain_mask = logits(
        model,
        {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "position_ids": torch.tensor([row.position_ids]),
        },
    )[0]
    for wrong in (not_reset, plain_mask):
        assert (wrong[a:b] - alone).abs().max() > 1e-3


def labels_of_one(packed, rows, ex) -> torch.Tensor:
    """The packed batch's labels with only the example `ex` left trained (where it sits among the rows)."""
    labels = torch.full_like(packed["labels"], IGNORE_INDEX)
    for r, row in enumerate(rows):
        for a, b in _spans(row.position_ids):
            if row.input_ids[a:b] == ex.input_ids:
                labels[r, a:b] = packed["labels"][r, a:b]
    return labels


def test_per_example_loss_is_the_same_packed_and_unpacked(model, encoded, tokenizer):
    rows = pack(encoded, max_length=128)
    packed = batch_of(rows, tokenizer.pad_token_id)  # with its boundaries, which the loss passes on
    assert int(packed["cu_seq_lens_q"][-1]) == packed["input_ids"].numel()
    for k, ex in enumerate(encoded):
        alone_sum, alone_n = token_loss_sum(model, batch_of([ex], tokenizer.pad_token_id))
        labels = labels_of_one(packed, rows, ex)
        with torch.no_grad():
            packed_sum, packed_n = token_loss_sum(model, {**packed, "labels": labels})
        assert int(packed_n) == int(alone_n) > 0, k
        torch.testing.assert_close(packed_sum, alone_sum.detach(), atol=1e-4, rtol=1e-6)


def test_datamodule_packs_with_step_targets(tokenizer, chatml, tmp_path):
    import json

    from sftlab.data.datamodule import SFTDataModule

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    unpacked = SFTDataModule(tokenizer, chatml, str(data), max_length=128, cache_dir=None)
    packed = SFTDataModule(tokenizer, chatml, str(data), max_length=128, packing=True, cache_dir=None)
    unpacked.setup(), packed.setup()
    assert sum(packed.splits["train"].num_targets) == sum(unpacked.splits["train"].num_targets)
    n_rows = len(packed.splits["train"].examples)
    assert packed.counts()["train"]["packed_rows"] == n_rows < len(CONVERSATIONS)
    features = [Examples(packed.splits["train"].examples)[(i, 77)] for i in range(2)]
    batch = collate(features, tokenizer.pad_token_id)
    assert int(batch["step_targets"]) == 77 and batch["position_ids"].shape == batch["input_ids"].shape


def test_length_grouped_order_is_a_seeded_permutation_with_similar_lengths_per_batch():
    from sftlab.data.packing import length_grouped_order

    lengths = [(i * 37) % 101 + 1 for i in range(400)]
    order = length_grouped_order(lengths, batch_size=8, seed=3, megabatch=10)
    assert sorted(order) == list(range(400)) and order == length_grouped_order(lengths, 8, 3, 10)
    assert order != length_grouped_order(lengths, 8, 4, 10)
    spread = [
        max(lengths[k] for k in order[i : i + 8]) - min(lengths[k] for k in order[i : i + 8])
        for i in range(0, 400, 8)
    ]
    assert sum(spread) / len(spread) < 10  # random batches of these lengths spread over ~80


def test_group_by_length_cuts_padding_and_still_trains_every_example_once(tokenizer, chatml, tmp_path):
    """data.group_by_length: the varied-length bench set (5 to 230 tokens) in batches of 8, one epoch."""
    from sftlab.bench.data import varied_conversations, write_jsonl
    from sftlab.data.datamodule import SFTDataModule

    path = write_jsonl(varied_conversations(400, seed=1), tmp_path / "varied.jsonl")

    def epoch(group: bool, number: int) -> tuple[float, list[int]]:
        dm = SFTDataModule(tokenizer, chatml, str(path), group_by_length=group, cache_dir=None)
        dm.setup("fit")
        loader = dm.train_dataloader()
        dm.sampler.set_epoch(number)
        batches = list(loader)
        mask = [b["attention_mask"] for b in batches]
        order = [i for b in batches for i in b["index"].tolist()]
        assert sorted(order) == list(range(400))
        return sum(int(m.sum()) for m in mask) / sum(m.numel() for m in mask), order

    (plain, _), (grouped, order0), (_, order1) = epoch(False, 0), epoch(True, 0), epoch(True, 1)
    assert plain < 0.75 and grouped > 0.95
    assert order0 != order1  # reshuffled every epoch
