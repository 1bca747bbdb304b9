"""The one generation loop of sftlab: evaluation, the judge's local model, error analysis, the W&B samples,
`sftlab-chat` and `sftlab-serve` all generate here.

    generate(model, tokenizer, template, histories)  histories -> [{"text", "stopped", "new_tokens"}], batched
    generate_ids(model, tokenizer, prompts, stops)   the same from token-id prompts (the judge's own template)
    stream_text(model, tokenizer, prompt, stops)     one continuation as (text delta, tokens so far) pairs
    stream_ids(model, prompt, stops)                 one continuation as token ids

Every path runs `_steps`, one KV-cache decode loop over a left-padded batch: one place picks the next token
(`pick`: greedy when `Sampling.temperature <= 0`, else temperature and nucleus (`top_p`) sampling from a
`torch.Generator` seeded by `Sampling.seed`) and one place stops a sequence (at its first id in `stops`: the
template's end-of-turn tokens plus EOS, see `stop_token_ids`; the stop id is never part of the output).
Stop *strings* (the OpenAI `stop` parameter) are text, not ids: `sftlab-serve` cuts them from the streamed
text.

Why our own loop rather than `model.generate`: a stream is a plain generator, consumed in the caller's thread
(`generate` would need a streamer fed from a second thread, and a stopping criterion to end early at a stop
string); sampling draws from a per-call seeded `torch.Generator`, so a seed reproduces a reply exactly without
touching the global RNG (`generate` samples from the global one); and a batch and a stream share the same
pick and stop code, so greedy serving is exactly greedy evaluation. The loop asks the model for the last
position's logits only (`logits_to_keep=1`, as `generate` does) and ignores the model's `generation_config`:
greedy is the argmax, whatever sampling defaults a checkpoint ships.

Prompts are the template's `generation_prompt`, tokenized exactly as in training (tokenize.encode_prompt), so
the model is asked in the form it was trained on. In a batch, prompts are left-padded and the position ids
follow the attention mask, so a padded row decodes exactly as it would alone (a test checks batched ==
one-by-one). The tokens every prompt of a batch starts with (the system prompt, a tool list, the template's
header) run through the model once, and their KV cache is copied to every row, as vLLM's prefix caching
does within a batch; the rows' own tokens follow.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from sftlab.data.templates import ChatTemplate
from sftlab.data.tokenize import encode_prompt
from sftlab.model.forward import unwrap
from sftlab.model.prefix import cache_argument, keys_and_values_only, shared_prefix_length


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked. temperature <= 0: greedy (the argmax). Otherwise sampled from
    softmax(logits / temperature), restricted to the smallest set of most likely tokens whose probability
    reaches `top_p`; `seed` makes the draws reproducible (None: the global RNG's state decides)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


GREEDY = Sampling()


def stop_token_ids(template: ChatTemplate | None, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS plus every single-token stop string of the template (`<|im_end|>` for ChatML)."""
    ids = {tokenizer.eos_token_id}
    for s in template.stop_strings if template is not None else []:
        tok = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(tok) == 1:
            ids.add(tok[0])
    return sorted(i for i in ids if i is not None)


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row of `logits` (batch x vocab)."""
    if sampling.temperature <= 0:
        # max's indices are argmax's (the first maximal value, documented for both), but on a CPU argmax runs
        # as a scalar loop: 8.6 against 2.6 ms over 64 rows of a 49k bf16 vocabulary, once per decoding step.
        return logits.max(-1).indices
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < sampling.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_pad(prompts: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return input_ids, attention


@torch.no_grad()
def _steps(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    stops: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    pad: int = 0,
) -> Iterator[list[int | None]]:
    """One list per decoding step: the new token of each prompt, or None once that prompt has reached a stop
    id (the stop id itself is not given). Ends when every prompt has stopped or after `max_new_tokens` steps,
    so a sequence stopped exactly when it has fewer than `max_new_tokens` tokens. The model runs in eval mode
    (its mode is restored afterwards)."""
    device = next(model.parameters()).device
    lm_forward = unwrap(model).forward
    cache_key = cache_argument(lm_forward)
    logits_to_keep = "logits_to_keep" in inspect.signature(lm_forward).parameters
    kwargs = {"use_cache": True, **({"logits_to_keep": 1} if logits_to_keep else {})}
    generator = torch.Generator(device).manual_seed(sampling.seed) if sampling.seed is not None else None
    stop_set, live = set(stops), [True] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        shared = shared_prefix_length(prompts)
        if shared:
            out = model(input_ids=torch.tensor([prompts[0][:shared]], device=device), **kwargs)
            cache = out[cache_key]
            if keys_and_values_only(cache):
                cache.batch_repeat_interleave(len(prompts))
                kwargs[cache_key] = cache
            else:  # a state the copy would miss: every row computes its whole prompt
                shared = 0
        input_ids, attention = _left_pad([p[shared:] for p in prompts], pad, device)
        # The prefix sits left of every row's padding: [prefix | pads | rest of the prompt]. Positions follow
        # the mask, so each token has the position it has alone, and the pads are masked like any padding.
        positions = (attention.cumsum(-1) - 1).clamp(min=0) + shared
        attention = torch.cat([attention.new_ones(len(prompts), shared), attention], dim=1)
        for _ in range(max_new_tokens):
            out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, **kwargs)
            picked = pick(out.logits[:, -1], sampling, generator).tolist()
            step = [t if alive and t not in stop_set else None for t, alive in zip(picked, live, strict=True)]
            live = [t is not None for t in step]
            yield step
            if not any(live):
                return
            kwargs[cache_key] = out[cache_key]
            input_ids = torch.tensor([[pad if t is None else t] for t in step], device=device)
            attention = torch.cat([attention, attention.new_ones(len(step), 1)], dim=1)
            positions = positions[:, -1:] + 1
    finally:
        model.train(was_training)


def generate_ids(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    stops: Sequence[int],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    sampling: Sampling = GREEDY,
) -> list[dict]:
    """Continuations of token-id prompts, `batch_size` at a time: {"text", "stopped", "new_tokens"} each, in
    order. `new_tokens` counts the stop id when there was one."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Greedy: batches of similar prompt lengths, so less left padding to compute. A greedy row decodes as it
    # would alone whatever its neighbours, so the order changes no output (sampled rows keep the caller's
    # order: a seed's draws follow the rows). Results come back in the caller's order either way.
    order = list(range(len(prompts)))
    if sampling.temperature <= 0:
        order.sort(key=lambda i: len(prompts[i]))
    outputs: list[dict] = [{} for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = [prompts[i] for i in rows]
        new: list[list[int]] = [[] for _ in batch]
        for step in _steps(model, batch, stops, max_new_tokens=max_new_tokens, sampling=sampling, pad=pad):
            for ids, token in zip(new, step, strict=True):
                if token is not None:
                    ids.append(token)
        for i, ids in zip(rows, new, strict=True):
            stopped = len(ids) < max_new_tokens
            text = tokenizer.decode(ids, skip_special_tokens=True)
            outputs[i] = {"text": text, "stopped": stopped, "new_tokens": len(ids) + stopped}
    return outputs


def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    histories: Sequence[Sequence[dict]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    sampling: Sampling = GREEDY,
) -> list[dict]:
    """The next assistant turn of each conversation history, prompted exactly as in training (greedy unless
    `sampling` says otherwise)."""
    return generate_ids(
        model,
        tokenizer,
        [encode_prompt(h, template, tokenizer) for h in histories],
        stop_token_ids(template, tokenizer),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        sampling=sampling,
    )


def stream_ids(
    model: torch.nn.Module,
    prompt: Sequence[int],
    stops: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
) -> Iterator[int]:
    """The token ids of one continuation as they are generated, up to (not including) a stop id."""
    for (token,) in _steps(model, [prompt], stops, max_new_tokens=max_new_tokens, sampling=sampling):
        if token is None:
            return
        yield token


def stream_text(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: Sequence[int],
    stops: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
) -> Iterator[tuple[str, int]]:
    """One continuation as text: (delta, tokens so far) for every new token; the deltas join to the text
    `generate_ids` gives. A delta is "" while the text ends in half of a multi-byte character (the rest
    follows with the next token, or alone at the end)."""
    ids: list[int] = []
    sent = 0
    for token in stream_ids(model, prompt, stops, max_new_tokens=max_new_tokens, sampling=sampling):
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        safe = max(sent, len(text) - text.endswith("\ufffd"))
        yield text[sent:safe], len(ids)
        sent = safe
    rest = tokenizer.decode(ids, skip_special_tokens=True)[sent:]
    if rest:
        yield rest, len(ids)
