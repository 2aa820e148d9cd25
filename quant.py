"""A frozen base held in int8: the U-Net under a LoRA (QLoRA, Dettmers et al. 2023, with int8 for NF4), and T5.

    lora.add_lora(unet, ...)         # adapters first: they stay in bf16 and train as usual
    quantise_(unet)                  # then every frozen Linear / Conv2d weight becomes int8 + a scale per channel
    unet.to("cuda")                  # (quantise on the CPU: the bf16 weights never reach the GPU)

Each frozen weight W [out, ...] is stored as q = round(W / s) in int8 with s = max|W_row| / 127 per output channel
(fp32), half the bytes of bf16. The layer computes with W' = q s, rebuilt for each use in the input's dtype: in the
forward, and again in backward for the input's gradient, so only q and s are kept for backward, never W'. The
error is at most s/2 per weight, 1/254 of its row's largest. The layer keeps its class's behaviour otherwise
(a LoRA layer adds its adapters; `weight` reads W'), its module name and its parameters' names, so LoRA files
are exactly those of an unquantised run and load in diffusers on the bf16 model. What is quantised is a
property of the run (config `quantise_base`), not of the files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lora


def quantise_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, ...] -> (q int8 of W's shape and memory layout, s [out] fp32) with W ~ q * s per output channel."""
    w32 = w.detach().float()
    scale = w32.flatten(1).abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    q = torch.round(w32 / scale.view(-1, *[1] * (w.dim() - 1))).clamp_(-127, 127)
    return q.to(torch.int8).contiguous(memory_format=_layout(w)), scale


def _layout(w: torch.Tensor):
    cl = w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def dequantise(q: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """q s in fp32 (int8 times fp32 promotes: no separate copy of q), then in `dtype`."""
    return (q * scale.view(-1, *[1] * (q.dim() - 1))).to(dtype)


class _Int8Linear(torch.autograd.Function):
    """F.linear with W = q s: keeps q and s for backward (the input is not needed: W is frozen)."""

    @staticmethod
    def forward(ctx, x, q, scale, bias):
        ctx.save_for_backward(q, scale)
        return F.linear(x, dequantise(q, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        q, scale = ctx.saved_tensors
        grad_x = grad @ dequantise(q, scale, grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.flatten(0, -2).sum(0) if ctx.needs_input_grad[3] else None  # bitfit trains biases
        return grad_x, None, None, grad_bias


class _Int8Conv2d(torch.autograd.Function):
    """F.conv2d with W = q s, likewise."""

    @staticmethod
    def forward(ctx, x, q, scale, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(q, scale)
        ctx.geometry, ctx.x_shape = (stride, padding, dilation, groups), x.shape
        return F.conv2d(x, dequantise(q, scale, x.dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        q, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, dequantise(q, scale, grad.dtype), grad, *ctx.geometry)
        grad_bias = grad.sum((0, 2, 3)) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias, None, None, None, None


class _Int8:
    """Mixed in front of a layer's class: `weight` is W' (read-only), and the base op runs in int8."""

    @property
    def weight(self) -> torch.Tensor:
        return dequantise(self.weight_int8, self.weight_scale, self.weight_dtype)

    def _base(self, x, bias):
        if isinstance(self, nn.Conv2d):
            if self.padding_mode != "zeros":
                raise ValueError("an int8 conv supports padding_mode='zeros' only")
            return _Int8Conv2d.apply(x, self.weight_int8, self.weight_scale, bias, self.stride, self.padding,
                                     self.dilation, self.groups)
        return _Int8Linear.apply(x, self.weight_int8, self.weight_scale, bias)

    def forward(self, x):
        if isinstance(self, lora._LoRAMixin):
            return super().forward(x)  # the adapters on top of _base
        return self._base(x, self.bias)


_CLASSES: dict[type, type] = {}


def _int8_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Int8{cls.__name__}", (_Int8, cls), {})
    return _CLASSES[cls]


def is_quantised(module: nn.Module) -> bool:
    return isinstance(module, _Int8)


@torch.no_grad()
def quantise_(model: nn.Module, min_numel: int = 4096) -> int:
    """Quantise, in place, every Linear and Conv2d of `model` whose weight is frozen and has at least `min_numel`
    values (the smallest layers stay as they are: they save nothing). Returns the bytes saved."""
    saved = 0
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or is_quantised(module):
            continue
        w = module.weight
        if w.requires_grad or w.numel() < min_numel:
            continue
        q, scale = quantise_weight(w)
        del module._parameters["weight"]
        module.register_buffer("weight_int8", q)
        module.register_buffer("weight_scale", scale)
        module.weight_dtype = w.dtype  # what `weight` reads back as
        module.__class__ = _int8_class(type(module))
        saved += w.numel() * w.element_size() - q.numel() - scale.numel() * 4
    return saved
