"""`sftlab-inspect [group=option ...] [key=value ...] [format=rich|jsonl] [n=N] [split=S]`: see what trains.

It composes the same config as `sftlab-train` (`sftlab.build.compose`, so `data=... template=... model=...`
and every `data.*` override work, and the same on-disk data cache is used) and runs exactly the training data
pipeline: read, convert, render, tokenize, mask, (pack). Nothing else is loaded (no model weights), and no
run directory is created.

  * `format=rich` (default): the kept / truncated / dropped / skipped counts of every split, then `n`
    (default 3) examples of `split` (default train) with the trained tokens highlighted and the untrained
    tokens dimmed. In packed rows a `▏` marks where the next example starts.
  * `format=jsonl`: one JSON object per processed example of `split` on stdout (all unless `n` is given):
    `split`, `index`, `status`, `input_ids`, `labels` (-100 where not trained) and, when packing,
    `position_ids`. Logs and counts go to stderr, so `sftlab-inspect format=jsonl > out.jsonl` is clean.
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

from sftlab.data.tokenize import IGNORE_INDEX, Encoded
from sftlab.errors import ConfigError, SFTLabError

OWN_KEYS = ("format", "n", "split")
TRAINED, UNTRAINED, BOUNDARY = "bold green", "dim", "bold magenta"


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


def highlight(example: Encoded, tokenizer) -> Text:
    """The example's text, trained spans highlighted, untrained dimmed; `▏` where a packed example starts."""
    text = Text()
    positions = example.position_ids or [None] * len(example.input_ids)
    run: list[int] = []
    run_trained = False

    def flush() -> None:
        if run:
            text.append(tokenizer.decode(run), style=TRAINED if run_trained else UNTRAINED)

    for k, (token, label, pos) in enumerate(zip(example.input_ids, example.labels, positions, strict=True)):
        trained = label != IGNORE_INDEX
        if (pos == 0 and k > 0) or trained != run_trained:
            flush()
            run, run_trained = [], trained
            if pos == 0 and k > 0:
                text.append("▏", style=BOUNDARY)
        run.append(token)
    flush()
    return text


def counts_table(counts: dict[str, dict]) -> Table:
    table = Table(title="Data: what happened to every row")
    for column in ("split", "rows", "kept", "truncated", "dropped", "skipped", "packed rows"):
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
        console.print(highlight(example, tokenizer))
    console.print(
        Text.assemble(
            ("trained", TRAINED), "  ", ("not trained", UNTRAINED), "  ", ("▏ next packed example", BOUNDARY)
        )
    )


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
