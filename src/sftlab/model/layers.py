"""Layers swapped in for eager training under autocast: the same function in fewer, cheaper operations.

Two replacements, made in place by `fast_training_layers` (SFTModule does it unless `compile=true`, whose
compiled step fuses these operations itself):

- `CastCachingLinear`: a frozen `nn.Linear` keeps its low-precision copy instead of being cast anew in every
  forward. Bit-identical to autocast. A finished run loaded for inference (build.load_run: eval, chat,
  serve, review) gets it too, through `cache_frozen_casts`, since peft freezes every weight there.
- `FusedLoraLinear`: a LoRA-wrapped linear computes `x W^T + b + (x A^T)(s B)^T` as one autograd node
  (`_LoraMatmuls`). peft's layer runs eight operators and autograd nodes per call (two casts of the same
  input, the base matmul, the two LoRA matmuls, the scaling multiply, the add, the final cast), which on a
  CPU cost more than its matmuls at the small row counts of fine-tuning: the default run's step took 11 to
  15 % less time with the fused node (docs/performance.md). Not bit-identical to peft under autocast (the LoRA
  product is added before it is rounded to bf16, once, where peft rounds it and then the sum; the scale
  is folded into B): its gradients are as far from an fp32 step's as peft's are (0.6 to 1.8 times peft's
  error over seeds, tested), and exact where the compute dtype is exact (`gradcheck` in float64).

Written here rather than taken from a library: peft has no fused LoRA forward for an unquantized base, and
Unsloth's or Liger's kernels are Triton (GPU only) and replace whole model classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear

from sftlab.model.forward import unwrap


class CastCachingLinear(torch.nn.Linear):
    """A frozen `nn.Linear` that, under autocast, multiplies with a low-precision copy of its weight made once
    instead of in every forward.

    Autocast caches the casts of weights that require grad only; a frozen base weight is cast from fp32 to
    bf16 anew in every forward, and again in each recomputation, which measured 18 % of a CPU training step
    of the default run. The copy is what autocast would make (the same `.to(dtype)`), so outputs and
    gradients are bit-identical; fp32 stays the stored weight, so evaluation, saving and merging without
    autocast read what they always read. The copy is made again when the weight changes (in-place update,
    merge, device move: its version or storage differs), and it is a plain attribute, never in a state dict.
    """

    _cast: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = self.weight.device.type
        if not torch.is_autocast_enabled(device) or self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, *self.low_precision(torch.get_autocast_dtype(device)))

    def low_precision(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) in `dtype`, cast once per weight version."""
        key = (dtype, self.weight.data_ptr(), self.weight._version, self.weight.device)
        if self._cast is None or self._cast[0] != key:
            bias = None if self.bias is None else self.bias.detach().to(dtype)
            self._cast = (key, self.weight.detach().to(dtype), bias)
        return self._cast[1], self._cast[2]


class _LoraMatmuls(torch.autograd.Function):
    """`x W^T + bias + (x A^T)(scale B)^T` in the dtype of `weight` (frozen, no gradient), with gradients
    for `x`, `lora_a` and `lora_b` in their own dtypes.

    Saves what autocast's operators would save (x and x A^T in the compute dtype), so activation memory is
    unchanged. `scale` is folded into B, a rank x out matrix, instead of multiplying the batch x out output.
    """

    @staticmethod
    def forward(ctx: Any, x, weight, bias, lora_a, lora_b, scale: float) -> torch.Tensor:
        dtype = weight.dtype
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), (lora_b * scale).to(dtype)
        down = rows @ a.t()
        out = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
        out.addmm_(down, b.t())
        ctx.save_for_backward(rows, down, weight, a, b)
        ctx.scale, ctx.x_shape, ctx.x_dtype = scale, x.shape, x.dtype
        ctx.lora_dtypes = (lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, down, weight, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        g_down = g @ b  # the gradient reaching x A^T: rows x rank
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            # Summed in x's dtype, as autograd sums the two paths' gradients of an fp32 input that autocast
            # cast twice: rounding the sum to bf16 would add an error to every layer's input gradient below.
            to_x = ctx.x_dtype
            grad_x = (g @ weight).to(to_x).addmm_(g_down.to(to_x), a.to(to_x)).view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            grad_a = (g_down.t() @ rows).to(ctx.lora_dtypes[0])
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ down).to(ctx.lora_dtypes[1]) * ctx.scale
        return grad_x, None, None, grad_a, grad_b, None


class FusedLoraLinear(LoraLinear):
    """peft's LoRA `Linear` whose forward in training mode, under autocast, over a `CastCachingLinear` base
    with one active plain adapter and no dropout, is the single `_LoraMatmuls` node. Anything else (eval
    mode: validation and generation; no autocast; dropout; several adapters; DoRA and other variants; a
    LoRA bias; merged or disabled adapters; per-row adapter names; a quantized base; ZeRO-3-partitioned
    weights) runs peft's own forward, unchanged."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = None if args or kwargs else self._fusable(x)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        weight, bias = base.low_precision(torch.get_autocast_dtype(x.device.type))
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        return _LoraMatmuls.apply(x, weight, bias, lora_a.weight, lora_b.weight, self.scaling[name])

    def _fusable(self, x: torch.Tensor) -> str | None:
        """The one active adapter's name when the fused node computes what peft's forward does, else None."""
        # Training mode only: validation and generation (eval mode) compute exactly what an adapter loaded
        # from disk computes, so a run's own evaluation and a later `sftlab-eval` of it agree.
        if not self.training or self.disable_adapters or self.merged:
            return None
        if not torch.is_autocast_enabled(x.device.type):
            return None
        base, active = self.base_layer, self.active_adapters
        if type(base) is not CastCachingLinear or base.weight.requires_grad or len(active) != 1:
            return None
        name = active[0]
        if name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
            return None
        # DeepSpeed ZeRO-3 gathers a partitioned weight in the forward hook of the module that owns it,
        # which the fused node never calls.
        weights = (base.weight, self.lora_A[name].weight, self.lora_B[name].weight)
        if any(hasattr(w, "ds_id") for w in weights):
            return None
        if not isinstance(self.lora_dropout[name], torch.nn.Identity):  # dropout > 0, in training mode
            return None
        return name


def _swap(model: torch.nn.Module, cls: type, chosen: Callable[[torch.nn.Module], bool]) -> int:
    """Make every `chosen` module of `model` a `cls`, in place; returns how many."""
    modules = [m for m in unwrap(model).modules() if chosen(m)]
    for module in modules:
        module.__class__ = cls
    return len(modules)


def cache_frozen_casts(model: torch.nn.Module) -> int:
    """Make every frozen plain `nn.Linear` of `model` (the base layers under LoRA, a frozen head) a
    `CastCachingLinear`, in place; returns how many. Trainable linears keep autocast's own cast cache."""

    def frozen_linear(m: torch.nn.Module) -> bool:
        return type(m) is torch.nn.Linear and not any(p.requires_grad for p in m.parameters(recurse=False))

    return _swap(model, CastCachingLinear, frozen_linear)


def fuse_lora(model: torch.nn.Module) -> int:
    """Make every peft LoRA `Linear` of `model` a `FusedLoraLinear`, in place; returns how many. The state
    dict, saving, merging and peft's adapter handling are unchanged (a subclass with no new state)."""
    return _swap(model, FusedLoraLinear, lambda m: type(m) is LoraLinear)


def fast_training_layers(model: torch.nn.Module) -> tuple[int, int]:
    """Both replacements, for an eager training step: (frozen linears caching their cast, LoRA linears
    fused)."""
    return cache_frozen_casts(model), fuse_lora(model)


def drop_cast_copies(model: torch.nn.Module) -> None:
    """Free the low-precision copies (they are remade on the next autocast forward)."""
    for module in model.modules():
        if isinstance(module, CastCachingLinear):
            module._cast = None
