"""`python -m sftlab.bench.attention [--threads N]`: one decoder layer's attention, forward + backward in bf16
on this CPU, through PyTorch's SDPA kernel and through the eager path of `model.attn_implementation=auto`, per
sequence length: the figures behind `sftlab.model.attention.EAGER_MAX_LENGTH`.

Shapes are SmolLM2-135M's (9 query heads over 3 key/value heads of 64), a right-padded batch with its boolean
mask, as transformers hands them to the attention function.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sftlab.model.attention import eager_attention_forward

LAYER = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=True)


def _time(fn, rounds: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per call, after two warm-up calls."""
    fn()
    fn()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - wall) * 1e3 / rounds, (time.process_time() - cpu) * 1e3 / rounds


def attention_times(rows: int, length: int, rounds: int = 10) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)

    def tensor(heads: int) -> torch.Tensor:
        return torch.randn(rows, heads, length, 64, generator=gen, dtype=torch.bfloat16).requires_grad_()

    q, k, v = tensor(9), tensor(3), tensor(3)
    mask = torch.ones(length, length, dtype=torch.bool).tril().expand(rows, 1, length, length).clone()
    mask[0, :, :, length // 2 :] = False  # one padded row, so the mask is not plain causal

    def sdpa() -> None:
        out, _ = sdpa_attention_forward(LAYER, q, k, v, mask, scaling=0.125)
        out.float().sum().backward()

    def eager() -> None:
        eager_attention_forward(LAYER, q, k, v, mask, scaling=0.125).float().sum().backward()

    sdpa_wall, sdpa_cpu = _time(sdpa, rounds)
    eager_wall, eager_cpu = _time(eager, rounds)
    return {"sdpa_ms": sdpa_wall, "sdpa_cpu_ms": sdpa_cpu, "eager_ms": eager_wall, "eager_cpu_ms": eager_cpu}


def main(argv: list[str] | None = None) -> None:
    prog = "python -m sftlab.bench.attention"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 192, 256, 384, 512])
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"attention forward + backward, bf16, {args.rows} rows, {threads} threads (ms per call)")
    print(f"{'length':>6} {'sdpa':>8} {'eager':>8} {'sdpa cpu':>9} {'eager cpu':>10}  faster")
    for length in args.lengths:
        t = attention_times(args.rows, length)
        faster = "eager" if t["eager_ms"] < t["sdpa_ms"] else "sdpa"
        print(
            f"{length:>6} {t['sdpa_ms']:>8.2f} {t['eager_ms']:>8.2f} {t['sdpa_cpu_ms']:>9.2f} "
            f"{t['eager_cpu_ms']:>10.2f}  {faster}"
        )


if __name__ == "__main__":
    main()
