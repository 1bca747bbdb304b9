"""`python -m sftlab.bench.shapes [--tokens N] [--threads N] [-o override ...]`: how fast this CPU multiplies
the matrices of one training step of a config at their real shapes, beside its 2048^3 bf16 peak.

The compute-efficiency figure of `sftlab-bench` divides a run's model FLOP/s by the 2048^3 matmul peak. A
small model's step is made of much smaller matmuls: (tokens in the micro-batch) x in x out of each linear of
the decoder, once forward and once backward for the input's gradient (a frozen linear has no weight
gradient; the trained LoRA factors and the output head at the target positions are left out, a few percent
of the FLOPs). Timed alone, in bf16, those shapes give the ceiling that no framework can pass on this
machine for this config, so the gap splits into what the shapes cost (peak -> shape ceiling) and what the
framework adds (shape ceiling -> the run).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sftlab import build
from sftlab.bench.hardware import matmul_peak
from sftlab.model.load import model_source


def step_shapes(model: torch.nn.Module, tokens: int) -> list[tuple[int, int, int, int]]:
    """(m, k, n, count) of every matmul of one forward + backward through the model's linears other than
    the output head, read from its modules (so a fused QKV or another MLP counts as it is built)."""
    head = model.get_output_embeddings()
    counts = Counter(
        (m.in_features, m.out_features)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )
    shapes = []
    for (k, n), count in counts.items():
        shapes.append((tokens, k, n, count))  # forward
        shapes.append((tokens, n, k, count))  # backward: the input's gradient
    return shapes


def skeleton(config: object) -> torch.nn.Module:
    """The model a config describes, on the meta device: its modules and shapes, no weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def shape_rate(shapes: list[tuple[int, int, int, int]], rounds: int = 5) -> float:
    """GFLOP/s of the shapes' matmuls in bf16, each timed alone (best of `rounds`), weighted by count."""
    flops = seconds = 0.0
    for m, k, n, count in shapes:
        a = torch.randn(m, k).to(torch.bfloat16)
        b = torch.randn(k, n).to(torch.bfloat16)
        torch.matmul(a, b)
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(count):
                torch.matmul(a, b)
            best = min(best, time.perf_counter() - start)
        flops += 2 * m * k * n * count
        seconds += best
    return flops / seconds / 1e9


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sftlab.bench.shapes", description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--override", action="append", default=[])
    ap.add_argument("--tokens", type=int, default=456, help="tokens per micro-batch (default run: 8 x 57)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="sftlab-shapes-") as scratch:  # compose's run dir, left unused
        cfg = build.compose(args.override, scratch)
    config = AutoConfig.from_pretrained(model_source(cfg.model))
    peak, _ = matmul_peak(torch.bfloat16)
    rate = shape_rate(step_shapes(skeleton(config), args.tokens))
    threads = torch.get_num_threads()
    print(f"bf16 matmul, {threads} threads: 2048^3 peak {peak:.0f} GFLOP/s")
    share = 100 * rate / peak
    print(f"this config's step shapes ({args.tokens} tokens): {rate:.0f} GFLOP/s = {share:.1f} % of it")


if __name__ == "__main__":
    main()
