"""Loss memory of one loss + backward with a 128k vocabulary (Llama 3's), chunked vs unchunked.

`python -m sftlab.bench.loss_memory` builds a tiny random Llama (2 layers, hidden 64) with a 128,256-token
vocabulary, so the output head and the cross-entropy are nearly all of the memory, and runs
`sftlab.model.forward.token_loss_sum` + backward on a micro-batch with N target tokens, once with
`loss_chunk_size` chunks and once without. Each measurement runs in its own spawned process and reports the
growth of peak RSS over the process's RSS just before the step (CPU; on a GPU, `max_memory_allocated`).

Unchunked, fp32 logits alone are N x vocab x 4 bytes (16k targets: 8.4 GB) and the cross-entropy keeps a
second tensor of that size for backward; a measurement whose estimate exceeds half the memory available is
skipped and reported as such rather than run into the OOM killer of a shared machine.
"""

from __future__ import annotations

import argparse
import json
import resource
from multiprocessing import get_context
from pathlib import Path
from typing import Any

VOCAB = 128_256
HIDDEN = 64
SEQ = 2048


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def unchunked_estimate(targets: int, vocab: int = VOCAB) -> int:
    """Bytes the unchunked loss holds at its peak: logits, log-softmax and their gradient, fp32."""
    return 3 * targets * vocab * 4


def measure(targets: int, chunk_size: int | None, device: str = "cpu") -> dict[str, Any]:
    """One loss + backward with `targets` target tokens; runs in the calling process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftlab.model.forward import token_loss_sum

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ + 1,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).to(device)
    rows = -(-targets // SEQ)
    ids = torch.randint(0, VOCAB, (rows, SEQ + 1), device=device)
    labels = ids.clone()
    keep = torch.arange(rows * SEQ, device=device).view(rows, SEQ) < targets  # exactly `targets` targets
    labels[:, 1:][~keep] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    # One warm-up step at few targets, so allocator and kernel set-up are not counted as loss memory.
    warm = {k: v[:, :64] for k, v in batch.items()}
    token_loss_sum(model, warm, chunk_size=chunk_size)[0].backward()
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    loss_sum, n = token_loss_sum(model, batch, chunk_size=chunk_size)
    (loss_sum / n).backward()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "targets": int(n),
        "chunk_size": chunk_size,
        "loss": float(loss_sum.detach() / n),
        "peak_growth_mib": round(max(peak - before, 0) / 2**20, 1),
    }


def run(targets: list[int], chunk_size: int, device: str = "cpu") -> list[dict[str, Any]]:
    """Every (targets, chunked / unchunked) measurement, each in a fresh spawned process."""
    results = []
    ctx = get_context("spawn")
    for n in targets:
        for chunk in (chunk_size, None):
            if chunk is None and device == "cpu" and unchunked_estimate(n) > _available_bytes() / 2:
                results.append(
                    {
                        "targets": n,
                        "chunk_size": None,
                        "skipped": f"needs about {unchunked_estimate(n) / 2**30:.1f} GiB "
                        f"(3 x targets x vocab x 4 bytes), over half of the memory available",
                    }
                )
                continue
            with ctx.Pool(1) as pool:
                results.append(pool.apply(measure, (n, chunk, device)))
    return results


def render(results: list[dict[str, Any]]) -> str:
    lines = [
        f"Loss + backward memory, vocabulary {VOCAB:,} (tiny Llama), peak growth in the step",
        "",
        "| target tokens | chunk_size | peak growth (MiB) | loss |",
        "|---:|---:|---:|---:|",
    ]
    for r in results:
        chunk = r["chunk_size"] or "none"
        if "skipped" in r:
            lines.append(f"| {r['targets']:,} | {chunk} | skipped: {r['skipped']} | |")
        else:
            lines.append(f"| {r['targets']:,} | {chunk} | {r['peak_growth_mib']:,} | {r['loss']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    prog = "python -m sftlab.bench.loss_memory"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("--targets", type=int, nargs="+", default=[2048, 4096, 16384], help="target tokens")
    ap.add_argument("--chunk-size", type=int, default=1024, help="loss_chunk_size of the chunked runs")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    results = run(args.targets, args.chunk_size, args.device)
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
