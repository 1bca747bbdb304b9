"""The generation loop (sftlab.model.generate) on the tiny random model: batching, prompts, stopping, sampling
and streaming."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sftlab.data.formats import split_prompt
from sftlab.data.tokenize import encode_conversations, encode_prompt
from sftlab.model.generate import (
    Sampling,
    generate,
    generate_ids,
    stop_token_ids,
    stream_ids,
    stream_text,
)
from sftlab.model.prefix import SHARED_PREFIX_MIN, shared_prefix_length

CONVS = [
    [
        {"role": "user", "content": "Convert this date to ISO 8601 (YYYY-MM-DD): 11 March 1991"},
        {"role": "assistant", "content": "1991-03-11"},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": "Name a colour, and then explain at some length why you picked that one.",
        },
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Red."},
    ],
    [{"role": "user", "content": "2048, January 31 -> ISO?"}, {"role": "assistant", "content": "2048-01-31"}],
    [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}],
]
HISTORIES = [split_prompt(c)[0] for c in CONVS]
SAMPLED = Sampling(temperature=1.0, seed=0)


def test_batched_greedy_equals_one_by_one(lively_model, tokenizer, chatml):
    lengths = {len(encode_prompt(h, chatml, tokenizer)) for h in HISTORIES}
    assert len(lengths) == len(HISTORIES)  # every row but the longest is really left-padded
    one = generate(lively_model, tokenizer, chatml, HISTORIES, max_new_tokens=12, batch_size=1)
    batched = generate(lively_model, tokenizer, chatml, HISTORIES, max_new_tokens=12, batch_size=8)
    assert batched == one
    assert len({o["text"] for o in one}) == len(HISTORIES)
    # Batches are formed in prompt-length order; the results still come back in the caller's order.
    backwards = generate(lively_model, tokenizer, chatml, HISTORIES[::-1], max_new_tokens=12, batch_size=8)
    assert backwards == one[::-1]


def test_a_shared_prompt_prefix_runs_once_and_decodes_as_each_row_alone(lively_model, tokenizer, chatml):
    system = {"role": "system", "content": "You answer in one short line, with no preamble and no apology."}
    histories = [[system, *h[-1:]] for h in HISTORIES]
    prompts = [encode_prompt(h, chatml, tokenizer) for h in histories]
    shared = shared_prefix_length(prompts)
    assert shared >= SHARED_PREFIX_MIN and len({len(p) for p in prompts}) > 2  # rows really padded
    assert tokenizer.decode(prompts[0][:shared]).startswith("<|im_start|>system\nYou answer in one short")
    seen = []  # the tokens of each model call, as the embedding receives them
    hook = lively_model.get_input_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        batched = generate(lively_model, tokenizer, chatml, histories, max_new_tokens=12, batch_size=8)
    finally:
        hook.remove()
    one = generate(lively_model, tokenizer, chatml, histories, max_new_tokens=12, batch_size=1)
    assert batched == one and len({o["text"] for o in one}) == len(histories)
    # The prefix once as a row of its own, then the rest of every prompt, left-padded, then one token a row.
    width = max(len(p) for p in prompts) - shared
    assert seen[0].tolist() == [prompts[0][:shared]]
    assert seen[1].shape == (len(prompts), width) and seen[2].shape == (len(prompts), 1)


def _manual_greedy(model, prefix: list[int], steps: int, stops: list[int]) -> list[int]:
    """Greedy decoding the slow, obvious way: the whole sequence through the model at every step, no cache."""
    ids, out = torch.tensor([prefix]), []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.parametrize("conv", [CONVS[0], CONVS[2]], ids=["single_turn", "multi_turn_system"])
def test_generation_prompt_is_the_training_prefix(lively_model, tokenizer, chatml, conv):
    """The ids generation feeds the model are the training tokens before the last response, whose first
    supervised label is the first response token; decoding from that exact prefix gives generate()'s text."""
    history, reference = split_prompt(conv)
    train = encode_conversations([conv], chatml, tokenizer)[0]
    prompt = encode_prompt(history, chatml, tokenizer)
    assert train.input_ids[: len(prompt)] == prompt
    first_response = tokenizer(reference, add_special_tokens=False)["input_ids"][0]
    assert train.labels[len(prompt)] == first_response
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    stops = stop_token_ids(chatml, tokenizer)
    assert stops == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    expected = _manual_greedy(lively_model, train.input_ids[: len(prompt)], 10, stops)
    got = generate(lively_model, tokenizer, chatml, [history], max_new_tokens=10)[0]
    assert got["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert got["new_tokens"] == len(expected) + got["stopped"]


def test_stops_at_the_templates_end_of_turn_and_reports_no_stop(lively_model, tokenizer, chatml):
    """Generation ends at the template's stop token (excluded from the text), batched and streamed alike;
    without one it runs to max_new_tokens and is reported as not stopped."""
    history = HISTORIES[1]
    prompt = encode_prompt(history, chatml, tokenizer)
    free = generate(lively_model, tokenizer, chatml, [history], max_new_tokens=6)[0]
    expected = _manual_greedy(lively_model, prompt, 6, stops=[])
    text = tokenizer.decode(expected, skip_special_tokens=True)
    assert free == {"text": text, "stopped": False, "new_tokens": 6}
    stop = expected[2]  # pretend the third greedy token is this template's end-of-turn marker
    assert stop not in expected[:2]
    template = dataclasses.replace(chatml, stop_strings=[tokenizer.decode([stop])])
    assert stop in stop_token_ids(template, tokenizer)
    out = generate(lively_model, tokenizer, template, [history], max_new_tokens=6)[0]
    text = tokenizer.decode(expected[:2], skip_special_tokens=True)
    assert out == {"text": text, "stopped": True, "new_tokens": 3}
    stops = stop_token_ids(template, tokenizer)
    assert list(stream_ids(lively_model, prompt, stops, max_new_tokens=6)) == expected[:2]


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(lively_model, tokenizer, chatml):
    def run(sampling: Sampling) -> list[str]:
        outs = generate(lively_model, tokenizer, chatml, HISTORIES[:2], max_new_tokens=8, sampling=sampling)
        return [o["text"] for o in outs]

    greedy = run(Sampling())
    assert run(SAMPLED) == run(SAMPLED)
    assert run(SAMPLED) != greedy
    assert run(dataclasses.replace(SAMPLED, seed=1)) != run(SAMPLED)
    assert run(Sampling(temperature=0.0, seed=0)) == greedy  # temperature <= 0 is greedy, seed or not
    assert run(dataclasses.replace(SAMPLED, top_p=1e-6)) == greedy  # the nucleus keeps only the argmax


@pytest.mark.parametrize("sampling", [Sampling(), SAMPLED], ids=["greedy", "sampled"])
def test_streamed_text_joins_to_the_generated_text(lively_model, tokenizer, chatml, sampling):
    stops = stop_token_ids(chatml, tokenizer)
    for history in HISTORIES:
        prompt = encode_prompt(history, chatml, tokenizer)
        whole = generate_ids(lively_model, tokenizer, [prompt], stops, max_new_tokens=8, sampling=sampling)[0]
        parts = list(stream_text(lively_model, tokenizer, prompt, stops, max_new_tokens=8, sampling=sampling))
        assert "".join(delta for delta, _ in parts) == whole["text"]
        assert parts[-1][1] == whole["new_tokens"] - whole["stopped"]


class Out(dict):
    __getattr__ = dict.__getitem__


class Scripted(torch.nn.Module):
    """A stand-in causal LM that answers `script`, one token per step, whatever it is asked. Its forward names
    the cache `past_key_values`, as transformers releases before the rename to `cache` do."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True):
        step = past_key_values or 0  # the "cache" is the number of steps taken
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[:, -1, self.script[step]] = 1.0
        return Out(logits=logits, past_key_values=step + 1)


def test_streamed_text_holds_back_half_a_character(tokenizer):
    """ "é" as two byte tokens: the first alone decodes to U+FFFD, which is not sent; the pair gives "é"."""
    café = tokenizer.convert_tokens_to_ids(["Hi", "Ġcaf", "Ã", "©", "!"])
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = Scripted([*café, end], len(tokenizer))
    parts = list(stream_text(model, tokenizer, [1, 2, 3], [end], max_new_tokens=10))
    assert parts == [("Hi", 1), (" caf", 2), ("", 3), ("é", 4), ("!", 5)]
    cut = list(stream_text(model, tokenizer, [1, 2, 3], [end], max_new_tokens=3))
    assert cut == [("Hi", 1), (" caf", 2), ("", 3), ("\ufffd", 3)]  # the half character, last
    assert generate_ids(model, tokenizer, [[1, 2, 3]], [end], max_new_tokens=10)[0] == {
        "text": "Hi café!",
        "stopped": True,
        "new_tokens": 6,
    }


def test_generation_runs_in_eval_mode_and_restores_the_mode(lively_model, tokenizer, chatml):
    """The W&B sample callback generates mid-training: no dropout while generating, training mode after."""
    modes = []
    lively_model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    lively_model.train()
    generate(lively_model, tokenizer, chatml, HISTORIES[:1], max_new_tokens=2)
    assert lively_model.training and modes == [False, False]
    lively_model.eval()
    list(stream_ids(lively_model, [1, 2], [], max_new_tokens=2))
    assert not lively_model.training
