"""`sftlab-inspect [group=option ...] [key=value ...] [format=rich|jsonl] [n=N] [split=S]`: see what trains.

It composes the same config as `sftlab-train` (`sftlab.build.compose`, so `data=... template=... model=...`
and every `data.*` override work, and the same on-disk data cache is used) and runs exactly the training data
pipeline: read, convert, render, tokenize, mask, (pack). Nothing else is loaded (no model weights), and no
run directory is created.

  * `format=rich` (default): the kept / truncated / dropped / skipped counts of every split, then `n`
    (default 3) examples of `split` (default train) with the trained tokens highlighted and the untrained
    tokens dimmed; reasoning, tool calls, tool results and tool schemas each in their own colour, and
    listed below the example with their trained / not trained state. In packed rows a `▏` marks where the
    next example starts.
  * `format=jsonl`: one JSON object per processed example of `split` on stdout (all unless `n` is given):
    `split`, `index`, `status`, `input_ids`, `labels` (-100 where not trained), `spans` (unpacked rows:
    token ranges `[start, end)` with their `kind` — text, reasoning, tool_call, tool_result, tools — and
    `trained` state) and, when packing, `position_ids`. Logs and counts go to stderr, so
    `sftlab-inspect format=jsonl > out.jsonl` is clean.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from rich.text import Text

from sftlab.data.tokenize import IGNORE_INDEX, Encoded, token_spans
from sftlab.errors import ConfigError, SFTLabError

OWN_KEYS = ("format", "n", "split")
TRAINED, UNTRAINED, BOUNDARY = "bold green", "dim", "bold magenta"
# (kind, trained) -> style. Tool results and schemas are never trained by the templates; shown if they were.
STYLES = {
    ("text", True): TRAINED,
    ("text", False): UNTRAINED,
    ("reasoning", True): "bold cyan",
    ("reasoning", False): "dim cyan",
    ("tool_call", True): "bold yellow",
    ("tool_call", False): "dim yellow",
    ("tool_result", True): "bold red",
    ("tool_result", False): "dim blue",
    ("tools", True): "bold red",
    ("tools", False): "dim magenta",
}
LEGEND = [
    ("trained", TRAINED),
    ("not trained", UNTRAINED),
    ("reasoning (trained)", STYLES["reasoning", True]),
    ("tool call (trained)", STYLES["tool_call", True]),
    ("tool result (not trained)", STYLES["tool_result", False]),
    ("tool schemas (not trained)", STYLES["tools", False]),
    ("▏ next packed example", BOUNDARY),
]


@dataclass
class InspectArgs:
    format: str = "rich"
    n: int | None = None
    split: str = "train"


def split_args(argv: Sequence[str]) -> tuple[InspectArgs, list[str]]:
    """The inspector's own `format=`, `n=`, `split=`; the rest are Hydra overrides for conf/train.yaml."""
    own, overrides = {}, []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in OWN_KEYS:
            own[key] = value
        else:
            overrides.append(arg)
    args = InspectArgs(format=own.get("format", "rich"), split=own.get("split", "train"))
    if args.format not in ("rich", "jsonl"):
        raise ConfigError(f"format={args.format!r}: use rich (highlighted examples) or jsonl (one per line).")
    if "n" in own:
        try:
            args.n = int(own["n"])
        except ValueError:
            raise ConfigError(f"n={own['n']!r}: the number of examples to show must be an integer.") from None
    return args, overrides


def token_kinds(datamodule, split: str, index: int, example: Encoded) -> list[str] | None:
    """What each token of an example is (text, reasoning, tool_call, tool_result, tools), from re-rendering
    its conversation with the run's template; None for packed rows (several conversations per row)."""
    if example.position_ids is not None:
        return None
    kw = datamodule.encode_kwargs
    spans = token_spans(
        datamodule.splits[split].rows[index],
        datamodule.template,
        datamodule.tokenizer,
        train_on=kw["train_on"],
        reasoning=kw.get("reasoning", "keep_last"),
    )
    kinds = [kind for kind, _, n in spans for _ in range(n)]
    if len(kinds) < len(example.input_ids):  # cannot happen for a kept example; never mislabel
        return None
    return kinds[: len(example.input_ids)]  # a truncated example keeps its head


def runs(example: Encoded, kinds: list[str] | None) -> list[dict]:
    """Consecutive tokens of the same kind and trained state: {"kind", "trained", "start", "end"}."""
    out: list[dict] = []
    positions = example.position_ids or [None] * len(example.input_ids)
    for k, (label, pos) in enumerate(zip(example.labels, positions, strict=True)):
        kind, trained = (kinds[k] if kinds else "text"), label != IGNORE_INDEX
        packed_start = pos == 0 and k > 0
        if out and not packed_start and (out[-1]["kind"], out[-1]["trained"]) == (kind, trained):
            out[-1]["end"] = k + 1
        else:
            out.append(
                {"kind": kind, "trained": trained, "start": k, "end": k + 1, "packed_start": packed_start}
            )
    return out


def highlight(example: Encoded, tokenizer, kinds: list[str] | None = None) -> Text:
    """The example's text: trained highlighted, untrained dimmed, reasoning, tool calls, tool results and
    schemas in their own colours (STYLES); `▏` where a packed example starts."""
    text = Text()
    for run in runs(example, kinds):
        if run["packed_start"]:
            text.append("▏", style=BOUNDARY)
        style = STYLES[run["kind"], run["trained"]]
        text.append(tokenizer.decode(example.input_ids[run["start"] : run["end"]]), style=style)
    return text


def counts_table(counts: dict[str, dict]) -> Table:
    table = Table(title="Data: what happened to every row")
    columns = ("split", "rows", "kept", "truncated", "dropped", "skipped", "packed rows", "chat markers")
    for column in columns:
        table.add_column(column, justify="left" if column in ("split", "dropped", "skipped") else "right")
    for split, c in counts.items():
        reasons = [", ".join(f"{r}: {n}" for r, n in c[k].items()) or "-" for k in ("dropped", "skipped")]
        table.add_row(
            split,
            str(c["rows"]),
            str(c["kept"]),
            str(c["truncated"]),
            *reasons,
            str(c.get("packed_rows", "-")),
            str(c.get("chat_markers", "-")),
        )
    return table


def show_rich(args: InspectArgs, datamodule, tokenizer) -> None:
    console = Console()
    console.print(counts_table(datamodule.counts()))
    examples = datamodule.splits[args.split].examples
    for index, example in enumerate(examples[: 3 if args.n is None else args.n]):
        n_targets = sum(label != IGNORE_INDEX for label in example.labels)
        console.rule(
            f"{args.split} example {index}: {len(example.input_ids)} tokens, {n_targets} trained"
            + (" (truncated)" if example.status == "truncated" else "")
        )
        console.print(highlight(example, tokenizer, token_kinds(datamodule, args.split, index, example)))
        console.print(span_summary(example, tokenizer, token_kinds(datamodule, args.split, index, example)))
    console.print(Text("  ").join(Text(label, style=style) for label, style in LEGEND))


def span_summary(example: Encoded, tokenizer, kinds: list[str] | None) -> Text:
    """One line per reasoning / tool span, so their trained state reads without colours (logs, pipes)."""
    text = Text()
    for run in runs(example, kinds):
        if run["kind"] != "text":
            piece = tokenizer.decode(example.input_ids[run["start"] : run["end"]])
            state = "trained" if run["trained"] else "not trained"
            text.append(
                f"  {run['kind']} ({state}): {piece[:60]!r}\n", style=STYLES[run["kind"], run["trained"]]
            )
    return text


def write_jsonl(args: InspectArgs, datamodule) -> None:
    print(json.dumps(datamodule.counts()), file=sys.stderr)
    examples = datamodule.splits[args.split].examples
    for index, example in enumerate(examples if args.n is None else examples[: args.n]):
        record = {
            "split": args.split,
            "index": index,
            "status": example.status,
            "input_ids": example.input_ids,
            "labels": example.labels,
        }
        if example.position_ids is not None:
            record["position_ids"] = example.position_ids
        kinds = token_kinds(datamodule, args.split, index, example)
        if kinds is not None:  # token ranges [start, end) by kind and trained state
            record["spans"] = [
                {k: r[k] for k in ("kind", "trained", "start", "end")} for r in runs(example, kinds)
            ]
        sys.stdout.write(json.dumps(record) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(name)s] %(message)s")
    try:
        args, overrides = split_args(argv)
        from sftlab import build  # torch and transformers load only once the arguments are valid

        parts = build.parts(build.compose(overrides))
        tokenizer, datamodule = parts.tokenizer, build.datamodule(parts)
        if args.split not in datamodule.splits:
            raise ConfigError(f"split={args.split!r}: this data has splits {sorted(datamodule.splits)}.")
        if args.format == "jsonl":
            write_jsonl(args, datamodule)
        else:
            show_rich(args, datamodule, tokenizer)
    except SFTLabError as err:
        print(f"sftlab-inspect: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
