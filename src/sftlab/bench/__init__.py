"""`sftlab-bench`: sftlab's training throughput beside TRL's SFTTrainer and a bare PyTorch + peft loop.

Every runner trains the same model, LoRA config, data, batch size and max length; each runs in its own
spawned process (so peak RSS is per runner) and reports per-optimizer-step wall times and token counts.
Figures are medians over steps after warm-up; comparisons are ratios taken within one run, because machines
here are shared and absolute numbers drift. See README, "Performance".
"""

# Before run.py or a runner (in its spawned process) imports torch, peft or Lightning: see sftlab.quiet.
from sftlab.quiet import quiet

quiet()
