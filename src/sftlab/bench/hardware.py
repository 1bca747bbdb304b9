"""The machine's matmul peak, model FLOPs per step, peak memory, device selection.

Model FLOPs (what the step must compute, not what a given implementation happens to compute):
  * every non-pad token goes through every decoder weight: forward 2 FLOPs per weight, backward 2 more for the
    gradient w.r.t. the activations (frozen weights) or 4 more with the weight gradient too (trainable) -> 4 x
    frozen + 6 x trainable parameters per token;
  * the output head only at target positions (sftlab computes logits nowhere else; counting it for every token
    would credit work that is not needed), 4 x its parameters per target (it is frozen);
  * the input embedding is a lookup: no FLOPs;
  * the prompt tokens every row of a batch starts with (`prefix.shared_context_length`: up to the first
    target, 16 tokens or more) compute the same in every row: counted once, with their attention (sftlab
    computes them once; counting each copy would credit work that is not needed);
  * attention (QK^T and AV, forward + backward = 3 x forward) per example of n tokens, causal: query i attends
    to i keys, so 3 x 2 matmuls x 2 FLOPs x d x sum(i) = 6 x d x n(n+1) per layer, d = heads x head_dim.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """`auto`: the CUDA GPU when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    dtype: torch.dtype,
    n: int = 2048,
    repeats: int = 5,
    device: torch.device | None = None,
) -> tuple[float, float]:
    """Best of `repeats` n x n x n matmuls (2 n^3 FLOPs): (GFLOP/s per wall second, per CPU second of the
    process). The second is what a loaded machine hardly changes; on CUDA it is meaningless (0)."""
    device = device or torch.device("cpu")
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up: oneDNN / cuBLAS pick their kernels on the first call
    synchronize(device)
    wall = cpu = float("inf")
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        torch.matmul(a, b)
        synchronize(device)
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    flops = 2 * n**3 / 1e9
    return flops / wall, (flops / cpu if device.type == "cpu" and cpu > 0 else 0.0)


@dataclass(frozen=True)
class FlopModel:
    frozen: int  # decoder weights that do not train (norms included), embedding and head excluded
    trainable: int  # adapter weights (or everything under adapter=none, minus the head)
    head: int  # output head parameters (vocab x hidden), applied at target positions only
    layers: int
    attn_dim: int  # heads x head_dim

    def step_flops(self, tokens: int, targets: int, pairs: int) -> float:
        """Model FLOPs of one optimizer step (forward + backward), see the module docstring; `pairs` is
        sum n(n+1) over the step's examples (`stats.attention_pairs`)."""
        attention = 6 * self.attn_dim * pairs * self.layers
        return (4 * self.frozen + 6 * self.trainable) * tokens + 4 * self.head * targets + attention


def flop_model(model: torch.nn.Module) -> FlopModel:
    """Count parameters by role on a (peft-wrapped) causal LM; 4-bit packed weights count unpacked."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed = {id(p) for p in base.get_input_embeddings().parameters()}
    head = {id(p) for p in base.get_output_embeddings().parameters()}
    frozen = trainable = head_n = 0
    for p in base.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)
        if id(p) in head:
            head_n += n
        elif id(p) in embed:
            continue
        elif p.requires_grad:
            trainable += n
        else:
            frozen += n
    cfg = base.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return FlopModel(frozen, trainable, head_n, cfg.num_hidden_layers, heads * head_dim)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA; the process's peak resident set size on CPU (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    """What the figures were measured on."""
    info = {"cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info
