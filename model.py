"""The DeepFloyd IF U-Net (stage I and stage II), written from scratch.

Module and parameter names are diffusers' `UNet2DConditionModel` names, so an official `unet/` folder
loads key for key with no conversion, and LoRA files from the ecosystem address the same modules.
Only the subset IF uses is implemented; any other config value is refused by name.

    unet = UNet.from_pretrained("DeepFloyd/IF-I-XL-v1.0", dtype=torch.bfloat16)
    out = unet(x_t, t, text_emb)                 # [B, 6, H, W]: 3 epsilon + 3 variance channels
    out = unet2(torch.cat([x_t, low_res_up], 1), t, text_emb, noise_level=aug_t)    # stage II

Map of IF-I-XL at 64x64 (C = channels, one attention head per 64 channels):

    conv_in            3 -> 704                       64x64   (pushed on the skip stack)
    down_blocks.0      3 resnets 704                  64x64   + downsampler (resnet, 2x2 avg pool)
    down_blocks.1      3 x (resnet + attention) 1408  32x32   + downsampler
    down_blocks.2      3 x (resnet + attention) 2112  16x16   + downsampler
    down_blocks.3      3 x (resnet + attention) 2816   8x8    (last block: no downsampler)
    mid_block          resnet, attention, resnet 2816  8x8
    up_blocks.0..3     mirror image, 4 resnets each reading cat([h, skip]), upsamplers (nearest 2x)
    conv_out           704 -> 6                       64x64

Stage II (IF-II-L, 256x256) has five blocks [160, 320, 640, 960, 1280] with attention only in the last
two, takes 6 input channels (the noisy image and the upsampled low-res image) and adds an embedding
of the low-res image's noise level (`class_embedding`) to the time embedding.

Every attention layer reads the text twice: its keys/values are `[text tokens, image tokens]`
(IF's "added KV" attention), and the text is also pooled into the time embedding (`add_embedding`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------------------------
# The five published U-Nets. XL and II-L are the published unet/config.json values; the M and L
# configs were not available to us and are *inferred* from the published parameter counts: the
# checkpoint's own config.json always wins when weights are loaded.

_IF_I = dict(
    in_channels=3, out_channels=6, sample_size=64, layers_per_block=3, attention_head_dim=64,
    down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
    up_block_types=["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", encoder_hid_dim=4096, encoder_hid_dim_type="text_proj",
    addition_embed_type="text", addition_embed_type_num_heads=64, resnet_time_scale_shift="scale_shift",
    act_fn="gelu", norm_num_groups=32, norm_eps=1e-5, cross_attention_norm="group_norm",
    flip_sin_to_cos=True, freq_shift=0, only_cross_attention=False,
)
_IF_II = dict(
    _IF_I, in_channels=6, sample_size=256, layers_per_block=[2, 2, 3, 5, 5],
    down_block_types=["ResnetDownsampleBlock2D"] * 3 + ["SimpleCrossAttnDownBlock2D"] * 2,
    up_block_types=["SimpleCrossAttnUpBlock2D"] * 2 + ["ResnetUpsampleBlock2D"] * 3,
    class_embed_type="timestep", time_embedding_act_fn="gelu", resnet_skip_time_act=True,
    resnet_out_scale_factor=1.4142271248762552, mid_block_scale_factor=1.4142271248762552,
)
FLAVOURS = {  # name -> native resolution, unet/config.json, whether inferred (Hub repos: config.FLAVOUR_REPOS)
    "i-medium-400m": dict(resolution=64, inferred=True,
                          config=dict(_IF_I, block_out_channels=[192, 384, 576, 768], cross_attention_dim=768)),
    "i-large-900m": dict(resolution=64, inferred=True,
                         config=dict(_IF_I, block_out_channels=[320, 640, 960, 1280], cross_attention_dim=1280)),
    "i-xlarge-4.3b": dict(resolution=64, inferred=False,
                          config=dict(_IF_I, block_out_channels=[704, 1408, 2112, 2816], cross_attention_dim=2816)),
    "ii-medium-450m": dict(resolution=256, inferred=True,
                           config=dict(_IF_II, block_out_channels=[96, 192, 384, 576, 768], cross_attention_dim=768)),
    "ii-large-1.2b": dict(resolution=256, inferred=False,
                          config=dict(_IF_II, block_out_channels=[160, 320, 640, 960, 1280], cross_attention_dim=1280,
                                      time_embedding_dim=1280)),
}

# diffusers' defaults for every key we honour (a config file may omit any of them), and the keys we
# accept but that change nothing for IF's block types.
DEFAULTS = dict(
    sample_size=None, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=None, mid_block_type="UNetMidBlock2DCrossAttn", up_block_types=None, only_cross_attention=False,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, mid_block_scale_factor=1, dropout=0.0,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280, encoder_hid_dim=None,
    encoder_hid_dim_type=None, attention_head_dim=8, class_embed_type=None, addition_embed_type=None,
    resnet_time_scale_shift="default", resnet_skip_time_act=False, resnet_out_scale_factor=1.0,
    time_embedding_type="positional", time_embedding_dim=None, time_embedding_act_fn=None, timestep_post_act=None,
    time_cond_proj_dim=None, conv_in_kernel=3, conv_out_kernel=3, num_class_embeds=None, num_attention_heads=None,
    addition_time_embed_dim=None, projection_class_embeddings_input_dim=None, attention_type="default",
    class_embeddings_concat=False, mid_block_only_cross_attention=None, cross_attention_norm=None,
    addition_embed_type_num_heads=64,
)
IGNORED = {"downsample_padding", "transformer_layers_per_block", "reverse_transformer_layers_per_block",
           "dual_cross_attention", "use_linear_projection", "upcast_attention"}
CHOICES = dict(  # allowed values of keys that select behaviour
    mid_block_type={"UNetMidBlock2DSimpleCrossAttn"}, act_fn={"gelu", "silu", "swish"},
    time_embedding_act_fn={None, "gelu", "silu", "swish"}, encoder_hid_dim_type={None, "text_proj"},
    class_embed_type={None, "timestep"}, addition_embed_type={None, "text"}, time_embedding_type={"positional"},
    resnet_time_scale_shift={"default", "scale_shift"}, cross_attention_norm={None, "group_norm"},
    center_input_sample={False}, dropout={0}, timestep_post_act={None}, time_cond_proj_dim={None},
    num_class_embeds={None}, num_attention_heads={None}, addition_time_embed_dim={None},
    projection_class_embeddings_input_dim={None}, attention_type={"default"}, class_embeddings_concat={False},
)
DOWN_BLOCKS = {"ResnetDownsampleBlock2D": False, "SimpleCrossAttnDownBlock2D": True}  # type -> has attention
UP_BLOCKS = {"ResnetUpsampleBlock2D": False, "SimpleCrossAttnUpBlock2D": True}
WEIGHTS_NAME = "diffusion_pytorch_model"


def resolve_config(config: dict) -> dict:
    """Fill diffusers' defaults, refuse what this U-Net cannot honour (naming the field), normalise lists."""
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = set(cfg) - set(DEFAULTS) - IGNORED
    if unknown:
        raise ValueError(f"unet config has fields this IF U-Net does not know: {sorted(unknown)}")
    cfg = {**DEFAULTS, **cfg}
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise ValueError(f"unet config: {key}={cfg[key]!r} is not supported by this IF U-Net "
                             f"(supported: {sorted(map(repr, allowed))})")
    n = len(cfg["block_out_channels"])
    for key, kinds in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        if not cfg[key] or len(cfg[key]) != n or any(b not in kinds for b in cfg[key]):
            raise ValueError(f"unet config: {key}={cfg[key]!r} must list {n} of {sorted(kinds)}")
    if not isinstance(cfg["cross_attention_dim"], int):
        raise ValueError("unet config: cross_attention_dim must be one int for IF's attention blocks")
    if cfg["encoder_hid_dim"] is not None and cfg["encoder_hid_dim_type"] is None:
        cfg["encoder_hid_dim_type"] = "text_proj"  # as diffusers does
    for key in ("layers_per_block", "attention_head_dim", "only_cross_attention"):
        if not isinstance(cfg[key], (list, tuple)):
            cfg[key] = [cfg[key]] * n
        if len(cfg[key]) != n:
            raise ValueError(f"unet config: {key} has {len(cfg[key])} entries for {n} blocks")
        cfg[key] = list(cfg[key])
    if cfg["mid_block_only_cross_attention"] is None:
        cfg["mid_block_only_cross_attention"] = cfg["only_cross_attention"][-1] if len(set(
            cfg["only_cross_attention"])) == 1 else False
    cfg["block_out_channels"] = list(cfg["block_out_channels"])
    return cfg


# ----------------------------------------------------------------------------------------------
# building blocks


def activation(name: str | None) -> nn.Module | None:
    return {None: None, "gelu": nn.GELU(), "silu": nn.SiLU(), "swish": nn.SiLU()}[name]


class _FrozenConv2d(torch.autograd.Function):
    """A conv whose weight needs no gradient: backward needs only the weight, so the input is not kept."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(weight)
        ctx.x_shape, ctx.stride, ctx.padding = x.shape, stride, padding
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, weight, grad, ctx.stride, ctx.padding)
        grad_bias = grad.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None  # bitfit trains biases
        return grad_x, None, grad_bias, None, None


def conv(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`; when the conv is frozen (LoRA training) its input is not saved for backward, since only
    the weight gradient needs it. A wrapped (LoRA) conv runs as itself."""
    if type(layer) is nn.Conv2d and not layer.weight.requires_grad and x.requires_grad and torch.is_grad_enabled():
        return _FrozenConv2d.apply(x, layer.weight, layer.bias, layer.stride, layer.padding)
    return layer(x)


def _norm_act(x, scale, shift, weight, bias, groups, eps, act):
    h = F.group_norm(x, groups, weight, bias, eps)
    return act(h if scale is None else h * (1 + scale) + shift)


def norm_act(norm: nn.GroupNorm, act: nn.Module, x, scale=None, shift=None, recompute: bool = True):
    """act(norm(x) * (1 + scale) + shift). With `recompute`, only the inputs are kept for backward and the cheap
    norm/activation are recomputed there: one tensor is kept instead of three (the norm's input and output, the
    activation's input), for a few per cent more time.

    The recompute is torch.utils.checkpoint's because torch.compile traces it into the U-Net's one graph and keeps
    it a recompute there; a custom autograd.Function whose backward calls autograd.grad would break the graph at
    every norm."""
    args = (x, scale, shift, norm.weight, norm.bias, norm.num_groups, norm.eps, act)
    if recompute and torch.is_grad_enabled() and x.requires_grad:
        # nothing here is random, so there is no RNG state to save and restore for the recompute
        return checkpoint(_norm_act, *args, use_reentrant=False, preserve_rng_state=False)
    return _norm_act(*args)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0) -> torch.Tensor:
    """Sinusoidal features of timesteps [B] -> [B, dim] in fp32 (Vaswani et al. 2017, sec. 3.5).

    freq_i = 10000^(-i / (dim/2 - shift)); features [cos, sin] when flip_sin_to_cos (IF's choice)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = t[:, None].float() * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], -1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal features: linear_1 -> act -> linear_2."""

    def __init__(self, cin: int, dim: int, act: str):
        super().__init__()
        self.linear_1, self.act, self.linear_2 = nn.Linear(cin, dim), activation(act), nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class AttentionPooling(nn.Module):
    """Pool T5 tokens into one vector (CLIP-style attention pooling, as in IF's nn.py).

    The query is the token mean plus a learned position; keys/values are [query token, tokens]."""

    def __init__(self, heads: int, dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(1, dim) / dim**0.5)
        self.k_proj, self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):  # x (B, L, E) -> (B, E)
        B, _, E = x.shape
        d = E // self.heads
        cls = x.mean(1, keepdim=True) + self.positional_embedding.to(x.dtype)  # (B, 1, E)
        x = torch.cat([cls, x], 1)  # (B, L+1, E)
        q = self.q_proj(cls).view(B, 1, self.heads, d).transpose(1, 2)  # (B, h, 1, d)
        k = self.k_proj(x).view(B, -1, self.heads, d).transpose(1, 2)  # (B, h, L+1, d)
        v = self.v_proj(x).view(B, -1, self.heads, d).transpose(1, 2)
        scale = d**-0.25  # applied to q and k separately: kinder to fp16 than one d^-0.5 afterwards
        w = ((q * scale) @ (k * scale).transpose(-1, -2)).float().softmax(-1).to(v.dtype)  # (B, h, 1, L+1)
        return (w @ v).reshape(B, E)


class TextTimeEmbedding(nn.Module):
    """`add_embedding`: the pooled, raw 4096-d T5 states (padding included, no mask) -> time-embedding width."""

    def __init__(self, text_dim: int, dim: int, heads: int):
        super().__init__()
        self.norm1, self.pool = nn.LayerNorm(text_dim), AttentionPooling(heads, text_dim)
        self.proj, self.norm2 = nn.Linear(text_dim, dim), nn.LayerNorm(dim)

    def forward(self, text):
        return self.norm2(self.proj(self.pool(self.norm1(text))))


class ResnetBlock2D(nn.Module):
    """GroupNorm-act-conv twice, with the time embedding as a FiLM scale/shift after the second norm.

    `up`/`down` resample both paths (nearest 2x / 2x2 average) - IF's resamplers are resnets. With `temb=None` it
    has no time embedding (no time_emb_proj), as a VAE's resnets."""

    def __init__(self, cin: int, cout: int, temb: int | None, *, groups: int, eps: float, act: str, scale_shift: bool,
                 skip_time_act: bool, out_scale: float = 1.0, up: bool = False, down: bool = False):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, 2 * cout if scale_shift else cout) if temb is not None else None
        self.norm2 = nn.GroupNorm(groups, cout, eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.act, self.scale_shift, self.skip_time_act = activation(act), scale_shift, skip_time_act
        self.out_scale, self.up, self.down = out_scale, up, down
        self.recompute = True  # see norm_act; off under gradient checkpointing, which already recomputes

    def resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return F.avg_pool2d(x, 2) if self.down else x

    def forward(self, x, temb=None):  # x (B, cin, H, W), temb (B, T) or None -> (B, cout, H', W')
        h = self.resample(norm_act(self.norm1, self.act, x, recompute=self.recompute))
        x = self.resample(x)
        h = conv(self.conv1, h)
        s = None
        if self.time_emb_proj is not None:
            s = self.time_emb_proj(temb if self.skip_time_act else self.act(temb))[:, :, None, None]
        if self.scale_shift:  # FiLM: norm2(h) * (1 + scale) + shift
            h = norm_act(self.norm2, self.act, h, *s.chunk(2, dim=1), recompute=self.recompute)
        else:
            h = norm_act(self.norm2, self.act, h if s is None else h + s, recompute=self.recompute)
        h = conv(self.conv2, h)
        if self.conv_shortcut is not None:
            x = conv(self.conv_shortcut, x)
        return (x + h) if self.out_scale == 1 else (x + h) / self.out_scale


def attention(q, k, v, heads: int, backend: str):
    """Multi-head attention on (B, L, C) tensors; heads are contiguous C/heads-wide channel chunks."""
    B, Lq, C = q.shape
    d = C // heads
    if backend == "xformers":
        import xformers.ops as xops

        q, k, v = (t.reshape(B, -1, heads, d) for t in (q, k, v))  # (B, L, h, d)
        return xops.memory_efficient_attention(q, k, v).reshape(B, Lq, C)
    q, k, v = (t.reshape(B, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, h, L, d)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    else:  # "math": the readable reference, softmax in fp32
        w = (q @ k.transpose(-1, -2)) * d**-0.5  # (B, h, Lq, Lk)
        out = w.float().softmax(-1).to(v.dtype) @ v
    return out.transpose(1, 2).reshape(B, Lq, C)


def set_attention_backend(module: nn.Module, backend: str) -> None:
    """Run every attention layer under `module` (each a module with a `backend` attribute) through `backend`."""
    if backend not in ("sdpa", "xformers", "math"):
        raise ValueError(f"attention backend must be 'sdpa', 'xformers' or 'math', not {backend!r}")
    if backend == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError as e:
            raise ImportError("attention_mechanism='xformers' needs `pip install xformers` (CUDA only)") from e
    for m in module.modules():
        if hasattr(m, "backend"):
            m.backend = backend


class Attention(nn.Module):
    """IF's attention: queries from the image; keys/values from [text tokens, image tokens] (text first).

    `only_cross` drops the image keys/values (to_k, to_v). Residual added, no output rescale."""

    def __init__(self, channels: int, text_dim: int, head_dim: int, *, groups: int, cross_norm: bool, only_cross: bool):
        super().__init__()
        self.heads, self.only_cross, self.backend = channels // head_dim, only_cross, "sdpa"
        self.group_norm = nn.GroupNorm(groups, channels, 1e-5)
        self.norm_cross = nn.GroupNorm(32, text_dim, 1e-5) if cross_norm else None
        self.to_q = nn.Linear(channels, channels)
        if not only_cross:
            self.to_k, self.to_v = nn.Linear(channels, channels), nn.Linear(channels, channels)
        self.add_k_proj, self.add_v_proj = nn.Linear(text_dim, channels), nn.Linear(text_dim, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x, text):  # x (B, C, H, W), text (B, L, X)
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.norm_cross is not None:
            text = self.norm_cross(text.transpose(1, 2)).transpose(1, 2)
        k, v = self.add_k_proj(text), self.add_v_proj(text)  # (B, L, C)
        if not self.only_cross:
            k, v = torch.cat([k, self.to_k(h)], 1), torch.cat([v, self.to_v(h)], 1)  # (B, L+HW, C)
        out = self.to_out[0](attention(self.to_q(h), k, v, self.heads, self.backend))  # (B, HW, C)
        return x + out.view(B, H, W, C).permute(0, 3, 1, 2)  # a free view: channels_last-strided


class Block(nn.Module):
    """A down, mid or up block: resnets, each optionally followed by attention, then a resampling resnet.

    Down blocks push every output on the skip stack; up blocks pop one skip per resnet (cat on channels)."""

    def __init__(self, resnets: list, attentions: list | None, resampler: nn.Module | None, kind: str):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions:
            self.attentions = nn.ModuleList(attentions)
        if resampler is not None:
            setattr(self, "downsamplers" if kind == "down" else "upsamplers", nn.ModuleList([resampler]))
        self.kind = kind

    def layers(self):
        attns = getattr(self, "attentions", [None] * len(self.resnets))
        if self.kind == "mid":  # resnets.0, attentions.0, resnets.1
            return [(self.resnets[0], attns[0]), (self.resnets[1], None)]
        return list(zip(self.resnets, attns))

    def resampler(self):
        group = getattr(self, "downsamplers", None) or getattr(self, "upsamplers", None)
        return group[0] if group is not None else None


# ----------------------------------------------------------------------------------------------
# the U-Net


class UNetBase(nn.Module):
    """What every U-Net here (IF's, and upscaler.py's x4) offers beside its forward: a `config` dict and a conv_in."""

    def set_attention_backend(self, backend: str) -> None:
        set_attention_backend(self, backend)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device


class UNet(UNetBase):
    """IF's U-Net from a diffusers `unet/config.json` dict. Switches: `gradient_checkpointing`,
    `set_attention_backend("sdpa" | "xformers" | "math")`."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = c = resolve_config(config)
        ch = c["block_out_channels"]
        temb = c["time_embedding_dim"] or 4 * ch[0]
        text_dim = c["cross_attention_dim"]
        common = dict(groups=c["norm_num_groups"], eps=c["norm_eps"], act=c["act_fn"],
                      scale_shift=c["resnet_time_scale_shift"] == "scale_shift",
                      skip_time_act=c["resnet_skip_time_act"])
        attn_common = dict(groups=c["norm_num_groups"], cross_norm=c["cross_attention_norm"] == "group_norm")
        # embeddings
        self.time_embedding = TimestepEmbedding(ch[0], temb, c["act_fn"])
        if c["class_embed_type"] == "timestep":  # stage II: the low-res image's noise level
            self.class_embedding = TimestepEmbedding(ch[0], temb, c["act_fn"])
        if c["addition_embed_type"] == "text":
            self.add_embedding = TextTimeEmbedding(c["encoder_hid_dim"] or text_dim, temb,
                                                   c["addition_embed_type_num_heads"])
        self.time_embed_act = activation(c["time_embedding_act_fn"])
        if c["encoder_hid_dim_type"] == "text_proj":
            self.encoder_hid_proj = nn.Linear(c["encoder_hid_dim"], text_dim)
        self.conv_in = nn.Conv2d(c["in_channels"], ch[0], c["conv_in_kernel"], padding=c["conv_in_kernel"] // 2)

        def resnet(cin, cout, scale=c["resnet_out_scale_factor"], **kw):
            return ResnetBlock2D(cin, cout, temb, out_scale=scale, **common, **kw)

        def attn(channels, i, only_cross):
            return Attention(channels, text_dim, c["attention_head_dim"][i], only_cross=only_cross, **attn_common)

        # down: n resnets (+ attention), then a downsampling resnet except in the last block
        n, self.down_blocks = len(ch), nn.ModuleList()
        for i, kind in enumerate(c["down_block_types"]):
            cin, cout, layers, last = ch[max(i - 1, 0)], ch[i], c["layers_per_block"][i], i == n - 1
            self.down_blocks.append(Block(
                [resnet(cin if j == 0 else cout, cout) for j in range(layers)],
                [attn(cout, i, c["only_cross_attention"][i]) for _ in range(layers)] if DOWN_BLOCKS[kind] else None,
                None if last else resnet(cout, cout, down=True), "down"))
        self.mid_block = Block(
            [resnet(ch[-1], ch[-1], c["mid_block_scale_factor"]) for _ in range(2)],
            [attn(ch[-1], -1, c["mid_block_only_cross_attention"])], None, "mid")

        # up: n+1 resnets each reading cat([h, skip]), then an upsampling resnet except in the last block
        self.up_blocks = nn.ModuleList()
        rch, rlayers, roc = ch[::-1], c["layers_per_block"][::-1], c["only_cross_attention"][::-1]
        for i, kind in enumerate(c["up_block_types"]):
            prev, cout, skip_in, last = rch[max(i - 1, 0)], rch[i], rch[min(i + 1, n - 1)], i == n - 1
            layers = rlayers[i] + 1
            self.up_blocks.append(Block(
                [resnet((prev if j == 0 else cout) + (skip_in if j == layers - 1 else cout), cout)
                 for j in range(layers)],
                # diffusers indexes attention_head_dim un-reversed here; kept for checkpoint compatibility
                [attn(cout, i, roc[i]) for _ in range(layers)] if UP_BLOCKS[kind] else None,
                None if last else resnet(cout, cout, up=True), "up"))

        self.conv_norm_out = nn.GroupNorm(c["norm_num_groups"], ch[0], c["norm_eps"])
        self.conv_act = activation(c["act_fn"])
        self.conv_out = nn.Conv2d(ch[0], c["out_channels"], c["conv_out_kernel"], padding=c["conv_out_kernel"] // 2)

    # -- switches ------------------------------------------------------------------------------
    @property
    def gradient_checkpointing(self) -> bool | str:
        """False, "attention" (or True) or "full"; see `layer`."""
        return getattr(self, "_checkpointing", False)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, mode: bool | str) -> None:
        mode = "attention" if mode is True else mode
        if mode not in (False, None, "attention", "full"):
            raise ValueError(f"gradient_checkpointing must be False, True/'attention' or 'full', not {mode!r}")
        self._checkpointing = mode or False
        for m in self.modules():
            if isinstance(m, ResnetBlock2D):
                m.recompute = mode != "full"  # "full" recomputes the whole layer anyway


    def layer(self, resnet, attn, h, emb, text):
        """One resnet and its attention. Gradient checkpointing recomputes in backward what it does not keep:
        "attention" keeps only each attention's input (the resnets already keep little, see norm_act and
        conv); "full" keeps only each layer's input, the least memory. Two CPU runs of an IF-I-M LoRA step measured
        +3% and +7% time for "attention", +18% and +52% for "full" (README, Benchmarks)."""
        mode = self.gradient_checkpointing if torch.is_grad_enabled() else False
        if mode == "full":
            return checkpoint(self._layer, resnet, attn, h, emb, text, use_reentrant=False)
        h = resnet(h, emb)
        if attn is None:
            return h
        return checkpoint(attn, h, text, use_reentrant=False) if mode == "attention" else attn(h, text)

    @staticmethod
    def _layer(resnet, attn, h, emb, text):
        h = resnet(h, emb)
        return attn(h, text) if attn is not None else h

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x, t, text_emb, noise_level=None):
        """x (B, in_channels, H, W); t scalar or (B,); text_emb (B, L, 4096) raw T5 states, every position attended
        to (no mask, as IF's pipelines run it: all 77 tokens, padding included); noise_level (B,) for stage II.
        -> (B, out_channels, H, W)."""
        B, _, H, W = x.shape
        f = self.downsample_factor
        if H % f or W % f:
            raise ValueError(f"height and width must be multiples of {f} for this U-Net, got {H}x{W}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(B) if t.ndim == 0 else t
        text_emb = text_emb.to(x.dtype)

        # time (+ noise level) (+ pooled text) embedding, shared by every resnet
        c = self.config
        emb = self.time_embedding(timestep_embedding(t, c["block_out_channels"][0], c["flip_sin_to_cos"],
                                                     c["freq_shift"]).to(x.dtype))
        if hasattr(self, "class_embedding"):
            if noise_level is None:
                raise ValueError("this is a stage II U-Net: pass noise_level, the low-res image's noise level")
            noise_level = torch.as_tensor(noise_level, device=x.device).expand(B)
            emb = emb + self.class_embedding(timestep_embedding(noise_level, c["block_out_channels"][0],
                                                                c["flip_sin_to_cos"], c["freq_shift"]).to(x.dtype))
        if hasattr(self, "add_embedding"):
            emb = emb + self.add_embedding(text_emb)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        text = self.encoder_hid_proj(text_emb) if hasattr(self, "encoder_hid_proj") else text_emb  # (B, L, X)

        h = self.conv_in(x)
        skips = [h]  # every down-path output, consumed in reverse by the up path
        for block in self.down_blocks:
            for resnet, attn in block.layers():
                h = self.layer(resnet, attn, h, emb, text)
                skips.append(h)
            if block.resampler() is not None:
                h = self.layer(block.resampler(), None, h, emb, text)
                skips.append(h)
        for resnet, attn in self.mid_block.layers():
            h = self.layer(resnet, attn, h, emb, text)
        for block in self.up_blocks:
            for resnet, attn in block.layers():
                h = self.layer(resnet, attn, torch.cat([h, skips.pop()], 1), emb, text)
            if block.resampler() is not None:
                h = self.layer(block.resampler(), None, h, emb, text)
        h = norm_act(self.conv_norm_out, self.conv_act, h)
        return conv(self.conv_out, h)

    # -- loading and saving (diffusers layout) ---------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, subfolder: str | None = "unet", dtype=None,
                        variant: str | None = None, device=None) -> UNet:
        """Load `unet/config.json` + safetensors weights (single file, sharded, or a variant such as
        'fp16') from a local folder or a Hub id, without first building a randomly initialised copy."""
        folder = _resolve_folder(path_or_repo_id, subfolder, variant)
        config = json.loads((folder / "config.json").read_text())
        with torch.device("meta"):
            model = cls(config)
        state = read_weights(folder, variant, dtype, device)
        check_state_dict(model, state, source=str(folder))
        model.load_state_dict(state, strict=True, assign=True)
        model.source = str(path_or_repo_id)
        return model.eval()

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Write config.json + diffusion_pytorch_model.safetensors that diffusers' from_pretrained reads."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1", **self.config}
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = state_dict if state_dict is not None else self.state_dict()
        state = {k: v.detach().contiguous() for k, v in state.items()}
        save_file(state, str(directory / f"{WEIGHTS_NAME}.safetensors"), metadata={"format": "pt"})


def read_weights(folder: Path, variant: str | None = None, dtype=None, device=None, keep=None) -> dict:
    """The tensors of a diffusers folder's safetensors files (single, sharded or a variant), cast to `dtype` (float32
    by default), on `device`; `keep(key)`, if given, picks which keys are read at all."""
    from safetensors import safe_open

    state = {}
    for file in _weight_files(folder, variant):
        with safe_open(str(file), framework="pt", device=str(device or "cpu")) as fh:
            for key in fh.keys():
                if keep is None or keep(key):
                    state[key] = fh.get_tensor(key).to(dtype or torch.float32)
    return state


def check_state_dict(model: nn.Module, state: dict, source: str = "checkpoint", what: str = "U-Net") -> None:
    """Strict loading with an error that lists missing keys, unexpected keys and shape mismatches."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
                    for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or shapes:
        def few(xs):
            return ", ".join(xs[:8]) + (f" ... ({len(xs)} in all)" if len(xs) > 8 else "")
        raise ValueError(f"weights in {source} do not fit this {what} config:\n"
                         f"  missing keys: {few(missing) or 'none'}\n  unexpected keys: {few(unexpected) or 'none'}\n"
                         f"  shape mismatches: {few(shapes) or 'none'}")


def _variant(name: str, variant: str | None) -> str:
    """diffusers' naming: the variant goes before the last extension (x.safetensors -> x.fp16.safetensors,
    x.safetensors.index.json -> x.safetensors.index.fp16.json)."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The safetensors files of a diffusers folder: single file or sharded (via the index json)."""
    single = folder / _variant(f"{WEIGHTS_NAME}.safetensors", variant)
    index = folder / _variant(f"{WEIGHTS_NAME}.safetensors.index.json", variant)
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    found = sorted(p.name for p in folder.glob("*.safetensors*")) or ["none"]
    raise FileNotFoundError(f"no {single.name} or {index.name} in {folder}; safetensors files there: "
                            f"{', '.join(found)}. Pass variant='fp16' for fp16-only folders; .bin files are not "
                            f"read (convert them to safetensors).")


def _resolve_folder(path_or_repo_id, subfolder: str | None, variant: str | None) -> Path:
    """A local folder as is; a Hub id downloads only config.json and the weight files it needs."""
    path = Path(path_or_repo_id)
    if path.exists():
        folder = path / subfolder if subfolder and (path / subfolder).is_dir() else path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {folder}: expected a diffusers unet/ folder")
        return folder
    from huggingface_hub import snapshot_download

    sub = f"{subfolder}/" if subfolder else ""
    files = [_variant(f"{WEIGHTS_NAME}.safetensors", variant), _variant(f"{WEIGHTS_NAME}.safetensors.index.json",
                                                                        variant)]
    shards = _variant(f"{WEIGHTS_NAME}.safetensors", variant).replace(".safetensors", "-*.safetensors")
    root = snapshot_download(str(path_or_repo_id), allow_patterns=[sub + f for f in ["config.json", *files, shards]])
    return Path(root) / subfolder if subfolder else Path(root)


def build(flavour_or_config: str | dict, dtype=None, device=None) -> UNet:
    """Random-init U-Net of a named flavour (FLAVOURS) or a config dict; `device='meta'` allocates nothing."""
    config = FLAVOURS[flavour_or_config]["config"] if isinstance(flavour_or_config, str) else flavour_or_config
    with torch.device(device or "cpu"):
        model = UNet(config)
    return model.to(dtype) if dtype is not None else model


def tiny_config(stage: int = 1, text_dim: int = 32) -> dict:
    """A unet/config.json dict for the smallest U-Net with every part of IF's: FiLM resnets, a down- and an
    upsampler, cross-attention in the second level and the middle, the text projection (from `text_dim`: a tiny
    T5's width). Stage II's takes its 6 input channels and the low-res image's noise level as the class label, as
    IF-II-M/L do. Tests and bench.py's smoke run build it."""
    config = dict(
        block_out_channels=[32, 64], layers_per_block=1, attention_head_dim=32, in_channels=3, out_channels=6,
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", encoder_hid_dim=text_dim, encoder_hid_dim_type="text_proj",
        cross_attention_dim=64, addition_embed_type="text", addition_embed_type_num_heads=4,
        resnet_time_scale_shift="scale_shift", act_fn="gelu", norm_num_groups=8, cross_attention_norm="group_norm")
    if stage == 2:
        config.update(in_channels=6, class_embed_type="timestep", time_embedding_act_fn="gelu",
                      resnet_skip_time_act=True, resnet_out_scale_factor=1.4142271248762552,
                      mid_block_scale_factor=1.4142271248762552)
    return config
