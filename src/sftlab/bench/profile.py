"""`python -m sftlab.bench.profile [-o override ...]`: where one sftlab training step spends its time.

Runs the bare loop's step (the same `token_loss_sum`, autocast, backward and optimizer as sftlab's training
step, over the datamodule's batches) under `torch.profiler` for a few steps after one warm-up, then prints the
operators by self CPU time and a summary by kind (matmuls, attention, the rest), the breakdown the README's
Performance section quotes.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
from collections import defaultdict

import torch
from hydra.utils import instantiate
from torch.profiler import ProfilerActivity, profile

from sftlab import build
from sftlab.bench import runner
from sftlab.bench.peers import _autocast
from sftlab.model.forward import token_loss_sum
from sftlab.model.layers import fast_training_layers

KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
    "optimizer": ("Optimizer.step", "aten::_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul"),
    "dtype casts": ("aten::to", "aten::_to_copy", "aten::copy_"),
}


def kind_of(name: str) -> str:
    return next((k for k, prefixes in KINDS.items() if name.startswith(prefixes)), "other")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sftlab.bench.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--override", action="append", default=[])
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="sftlab-profile-") as scratch:  # compose's run dir, left unused
        cfg = build.compose(args.override, scratch)
    p = build.parts(cfg)
    dm = build.datamodule(p)
    batches = list(itertools.islice(dm.train_dataloader(), args.steps + 1))
    model, _ = build.adapted_model(p)
    fast_training_layers(model)  # as SFTModule does for training
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = instantiate(cfg.optimizer)(params)
    prec, device = runner.precision(cfg), torch.device("cpu")

    def step(batch: dict) -> None:
        with _autocast(device, prec):
            loss_sum, _ = token_loss_sum(model, batch)
        (loss_sum / batch["step_targets"].clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[1:]:
            step(batch)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=20))
    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total
    total = sum(by_kind.values())
    print(
        "self CPU time by kind:",
        ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])),
    )


if __name__ == "__main__":
    main()
