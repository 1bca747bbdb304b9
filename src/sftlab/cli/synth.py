"""`sftlab-synth prompts=FILE out=FILE teacher=openai base_url=URL model=NAME [samples=2 judge=hf ...]`:
training data from a teacher model, judged, filtered and resumable (see `sftlab.eval.synth`).

    sftlab-synth prompts=seeds.jsonl out=distilled.jsonl base_url=http://127.0.0.1:8000/v1 model=teacher \\
        samples=2 judge=hf min_score=3
    sftlab-synth prompts=seed_tasks.jsonl out=grown.jsonl base_url=... model=teacher expand=200
    sftlab-train data=jsonl data.train_path=distilled.jsonl

Run it again with the same arguments after an interruption: it continues where it stopped. Exit status 1
on a configuration, data or teacher error. The teacher's terms of use decide whether its outputs may train
another model.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence

from sftlab.cli.args import parse
from sftlab.errors import SFTLabError

log = logging.getLogger("sftlab.synth")


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from sftlab.eval.synth import LocalTeacher, SynthSettings, synthesize

    try:
        settings = parse(SynthSettings, argv, prog="sftlab-synth")
        teacher = None
        if settings.teacher == "local":
            from sftlab.build import load_run

            teacher = LocalTeacher(load_run(settings.model), settings)
        counts = synthesize(settings, teacher)
    except SFTLabError as err:
        log.error("%s", err)
        raise SystemExit(1) from None
    counts.pop("settings")
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
