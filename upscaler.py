"""Stage III: Stability's x4 latent upscaler (stabilityai/stable-diffusion-x4-upscaler), written from scratch.

IF's cascade ends with it (256 -> 1024 px). It is a latent diffusion model: a U-Net of the Stable Diffusion family
denoises 4-channel latents the size of the low-res image, reading that image (noised) as 3 extra input channels and
the prompt through a CLIP text encoder; a VAE decoder then turns the latents into pixels at 4x the size. Module and
parameter names are diffusers' (UNet2DConditionModel, AutoencoderKL), so the official folder loads key for key and
LoRA files address the same modules; configs this code cannot honour are refused field by field.

    up = load("stabilityai/stable-diffusion-x4-upscaler", dtype=torch.bfloat16, device="cuda")
    images1024 = stage3(up, images256, prompts, generator=g)     # images256 in [-1, 1] -> [B, 3, 1024, 1024] in [0, 1]

Same weights, prompts and generator give the images of diffusers' StableDiffusionUpscalePipeline (output_type="pt",
given the same tensor in [-1, 1]): the same random draws in the same order (the low-res image's augmentation noise,
then the initial latents, then one draw per step for DDPM only), guidance on the whole output with the batch ordered
[negative, positive], the scheduler its config names (DDIM with eta = 0, or DDPM) and the pipeline's postprocessing.

Map of the x4 U-Net at a 256x256 input (latents are as large as the low-res image; 8 heads everywhere):

    conv_in          7 -> 256                           256x256  (4 latent + 3 noised low-res channels)
    down_blocks.0    2 resnets 256                      256x256  + downsampler (3x3 conv, stride 2)
    down_blocks.1    2 x (resnet + transformer) 512     128x128  only_cross_attention: attn1 reads the text too
    down_blocks.2    2 x (resnet + transformer) 512      64x64   ditto
    down_blocks.3    2 x (resnet + transformer) 1024     32x32   self-attention, then cross-attention
    mid_block        resnet, transformer, resnet 1024    32x32
    up_blocks.0..3   mirror image, 3 resnets each on cat([h, skip]), upsamplers (nearest 2x, 3x3 conv)
    conv_out         256 -> 4                           256x256

The VAE decoder: post_quant_conv, conv_in 4 -> 512, a mid block (resnet, one-head self-attention over all 65,536
positions of a 256x256 latent, resnet), three up blocks of 3 resnets (512 at 256^2, 256 at 512^2, 128 at 1024^2),
conv_out -> 3. It runs in float32 (load's vae_dtype), one image at a time: the original config notes that the decoder
breaks in half precision, and float32 costs little. At 1024 px one image's decode holds 3.0 GiB of activations (1.5 in
bf16), a guided bf16 U-Net step 0.9 GiB per image, the weights 1.6 GiB: one image peaks at 4.6 GiB (3.1 with a bf16
VAE), four at 5.2 GiB either way, so no tiling is needed (`python upscaler.py [BATCH]` prints the estimate).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import model
from diffusion import Schedule, p_sample_step, q_sample, randn, timesteps_for
from model import Block, ResnetBlock2D, TimestepEmbedding, activation, attention, norm_act, timestep_embedding

# ----------------------------------------------------------------------------------------------
# the published configs (the Hub folder's files, less bookkeeping keys), for estimates and tests

X4_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[256, 512, 512, 1024], center_input_sample=False,
    cross_attention_dim=1024, down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3, downsample_padding=1,
    dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=7, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, num_class_embeds=1000,
    only_cross_attention=[True, True, True, False], out_channels=4, sample_size=128,
    up_block_types=["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"], use_linear_projection=True,
)
X4_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512], down_block_types=["DownEncoderBlock2D"] * 3, in_channels=3,
    latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=256,
    up_block_types=["UpDecoderBlock2D"] * 3, scaling_factor=0.08333,
)
X4_TEXT = dict(  # text_encoder/config.json: OpenCLIP ViT-H's text tower less its last layer, as a CLIPTextModel
    hidden_act="gelu", hidden_size=1024, intermediate_size=4096, layer_norm_eps=1e-5, max_position_embeddings=77,
    num_attention_heads=16, num_hidden_layers=23, projection_dim=512, vocab_size=49408,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
X4_SCHEDULER = dict(
    _class_name="DDIMScheduler", beta_end=0.02, beta_schedule="scaled_linear", beta_start=0.0001, clip_sample=False,
    num_train_timesteps=1000, prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1,
)
X4_LOW_RES_SCHEDULER = dict(
    _class_name="DDPMScheduler", beta_end=0.02, beta_schedule="scaled_linear", beta_start=0.0001, clip_sample=True,
    num_train_timesteps=1000, prediction_type="epsilon", variance_type="fixed_small",
)
MAX_NOISE_LEVEL = 350  # model_index.json's max_noise_level: the model was trained on levels in [0, 350)
NOISE_LEVEL = 100  # IF's documentation runs stage III at this level (the pipeline's own default is 20)

# ----------------------------------------------------------------------------------------------
# configs: diffusers' defaults fill what a file omits; a key this code does not honour may only keep its default

UNET_DEFAULTS = {**model.DEFAULTS, "use_linear_projection": False, "transformer_layers_per_block": 1,
                 "upcast_attention": False, "reverse_transformer_layers_per_block": None, "downsample_padding": 1,
                 "dual_cross_attention": False}
UNET_HONOURED = {"in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "up_block_types",
                 "block_out_channels", "layers_per_block", "act_fn", "norm_num_groups", "norm_eps",
                 "cross_attention_dim", "attention_head_dim", "only_cross_attention", "num_class_embeds",
                 "time_embedding_dim", "transformer_layers_per_block", "use_linear_projection",
                 # no effect here: diffusers' default (SDPA) attention ignores upcast_attention, UNetMidBlock2DCrossAttn
                 # takes no mid_block_only_cross_attention, the heads of a text pooling this U-Net does not have
                 "sample_size", "upcast_attention", "mid_block_only_cross_attention", "addition_embed_type_num_heads"}
SD_DOWN_BLOCKS = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # type -> has transformers
SD_UP_BLOCKS = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
VAE_DEFAULTS = dict(  # AutoencoderKL's
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,), layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=32,
    scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None, force_upcast=True,
    use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True)
VAE_HONOURED = {"out_channels", "up_block_types", "block_out_channels", "layers_per_block", "act_fn", "latent_channels",
                "norm_num_groups", "scaling_factor", "use_post_quant_conv", "mid_block_add_attention",
                # the encoder's (not built), the pipeline ignores latents_mean/std, and force_upcast is diffusers' fp16
                # rule: here the decoder's dtype is load()'s vae_dtype
                "in_channels", "down_block_types", "use_quant_conv", "sample_size", "latents_mean", "latents_std",
                "force_upcast"}
SCHEDULER_DEFAULTS = dict(  # DDIMScheduler's and DDPMScheduler's (set_alpha_to_one is DDIM's, variance_type DDPM's)
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
    thresholding=False, timestep_spacing="leading", rescale_betas_zero_snr=False, variance_type="fixed_small")
SCHEDULER_CHOICES = dict(
    _class_name=("DDIMScheduler", "DDPMScheduler"), beta_schedule=("linear", "scaled_linear"), trained_betas=(None,),
    prediction_type=("epsilon", "v_prediction"), thresholding=(False,), rescale_betas_zero_snr=(False,),
    timestep_spacing=("leading", "trailing", "linspace"), variance_type=("fixed_small",))


def _refuse(what: str, key: str, value, allowed) -> None:
    raise ValueError(f"{what}: {key}={value!r} is not supported by this x4 upscaler (supported: {allowed})")


def _resolve(config: dict, defaults: dict, honoured: set, what: str) -> dict:
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    if set(cfg) - set(defaults):
        raise ValueError(f"{what} has fields this x4 upscaler does not know: {sorted(set(cfg) - set(defaults))}")
    cfg = {**defaults, **cfg}
    for key in sorted(set(defaults) - honoured):
        if cfg[key] != defaults[key]:
            _refuse(what, key, cfg[key], repr(defaults[key]))
    if cfg["act_fn"] not in ("silu", "swish"):
        _refuse(what, "act_fn", cfg["act_fn"], "'silu'")
    return cfg


def resolve_unet_config(config: dict) -> dict:
    """Fill diffusers' defaults, refuse what this U-Net cannot honour (naming the field), normalise per-block lists."""
    what = "unet/config.json"
    cfg = _resolve(config, UNET_DEFAULTS, UNET_HONOURED, what)
    if not cfg["use_linear_projection"]:
        _refuse(what, "use_linear_projection", False, "True")
    if not isinstance(cfg["num_class_embeds"], int):
        _refuse(what, "num_class_embeds", cfg["num_class_embeds"], "an int: the noise level is the class label")
    n = len(cfg["block_out_channels"])
    for key, kinds in (("down_block_types", SD_DOWN_BLOCKS), ("up_block_types", SD_UP_BLOCKS)):
        if not cfg[key] or len(cfg[key]) != n or any(b not in kinds for b in cfg[key]):
            raise ValueError(f"{what}: {key}={cfg[key]!r} must list {n} of {sorted(kinds)}")
    for key in ("layers_per_block", "attention_head_dim", "only_cross_attention", "transformer_layers_per_block"):
        cfg[key] = list(cfg[key]) if isinstance(cfg[key], (list, tuple)) else [cfg[key]] * n
        if len(cfg[key]) != n:
            raise ValueError(f"{what}: {key} has {len(cfg[key])} entries for {n} blocks")
    if set(cfg["transformer_layers_per_block"]) != {1}:
        _refuse(what, "transformer_layers_per_block", cfg["transformer_layers_per_block"], "1")
    for c, heads in zip(cfg["block_out_channels"], cfg["attention_head_dim"]):
        if c % heads:
            raise ValueError(f"{what}: {c} channels do not split into attention_head_dim={heads} heads")
    return {**cfg, "block_out_channels": list(cfg["block_out_channels"])}


def resolve_vae_config(config: dict) -> dict:
    what = "vae/config.json"
    cfg = _resolve(config, VAE_DEFAULTS, VAE_HONOURED, what)
    if cfg["scaling_factor"] != X4_VAE["scaling_factor"]:  # diffusers' upscale pipeline overwrites any other value
        _refuse(what, "scaling_factor", cfg["scaling_factor"], f"{X4_VAE['scaling_factor']}, the x4 upscaler's")
    n = len(cfg["block_out_channels"])
    if len(cfg["up_block_types"]) != n or set(cfg["up_block_types"]) != {"UpDecoderBlock2D"}:
        raise ValueError(f"{what}: up_block_types={cfg['up_block_types']!r} must list {n} x 'UpDecoderBlock2D'")
    return cfg


def resolve_scheduler_config(config: dict, what: str = "scheduler") -> dict:
    cfg = {**SCHEDULER_DEFAULTS, **config}  # other keys (skip_prk_steps, ...) change nothing, as in diffusers
    for key, allowed in SCHEDULER_CHOICES.items():
        if not any(cfg.get(key) == a for a in allowed):
            _refuse(f"{what}/scheduler_config.json", key, cfg.get(key), ", ".join(map(repr, allowed)))
    if cfg["clip_sample"] and cfg["clip_sample_range"] != 1.0:
        _refuse(f"{what}/scheduler_config.json", "clip_sample_range", cfg["clip_sample_range"], "1.0")
    return cfg


def betas_for(cfg: dict) -> torch.Tensor:
    """[T] float32 betas as diffusers builds them: "linear" from beta_start to beta_end, or "scaled_linear", linear in
    sqrt(beta) (what the original latent-diffusion code calls "linear")."""
    T, b0, b1 = cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"]
    if cfg["beta_schedule"] == "linear":
        return torch.linspace(b0, b1, T, dtype=torch.float32)
    return torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float32) ** 2


# ----------------------------------------------------------------------------------------------
# building blocks (diffusers' names)


class Attention(nn.Module):
    """Multi-head attention of `dim`-wide tokens over a context (the tokens themselves if none is given)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        self.heads, self.backend = heads, "sdpa"
        kv = context_dim or dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(cin, dim, bias=bias) for cin in (dim, kv, kv))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' to_out.1 is a dropout

    def forward(self, x, context=None):  # x (B, L, C), context (B, S, X) -> (B, L, C)
        context = x if context is None else context
        return self.to_out[0](attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.backend))


class GEGLU(nn.Module):
    """Shazeer 2020, "GLU Variants Improve Transformer": h * gelu(gate), both halves of one projection."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer layer: attn1 (self-attention, or cross-attention with `only_cross`), attn2
    (cross-attention to the text), GEGLU feed-forward; each with a residual."""

    def __init__(self, dim: int, heads: int, text_dim: int, only_cross: bool):
        super().__init__()
        self.only_cross = only_cross
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads, text_dim if only_cross else None)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, text_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))  # net.1: a dropout

    def forward(self, x, text):  # x (B, HW, C), text (B, L, X)
        x = self.attn1(self.norm1(x), text if self.only_cross else None) + x
        x = self.attn2(self.norm2(x), text) + x
        return self.ff.net(self.norm3(x)) + x


class Transformer2D(nn.Module):
    """diffusers' Transformer2DModel as SD 2 uses it: GroupNorm, linear proj_in, one transformer layer over the pixels
    as tokens, linear proj_out, plus the input."""

    def __init__(self, channels: int, heads: int, text_dim: int, groups: int, only_cross: bool):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, text_dim, only_cross)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x, text):  # x (B, C, H, W)
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, HW, C)
        for block in self.transformer_blocks:
            h = block(h, text)
        return self.proj_out(h).view(B, H, W, C).permute(0, 3, 1, 2) + x


class Resample(nn.Module):
    """A block's downsamplers.0 (3x3 conv, stride 2) or upsamplers.0 (nearest 2x, then a 3x3 conv)."""

    def __init__(self, channels: int, up: bool):
        super().__init__()
        self.up, self.conv = up, nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else x)


class VAEAttention(Attention):
    """The VAE mid block's self-attention: one head over every position, GroupNorm first, the input added back."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)

    def forward(self, x):  # x (B, C, H, W)
        B, C, H, W = x.shape
        h = super().forward(self.group_norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        return h.transpose(1, 2).reshape(B, C, H, W) + x


# ----------------------------------------------------------------------------------------------
# the U-Net and the VAE decoder


class X4UNet(model.UNetBase):
    """The x4 upscaler's U-Net (an SD 2 UNet2DConditionModel) from its unet/config.json dict. `attention_head_dim` is
    diffusers' legacy name for the number of heads of each level."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = c = resolve_unet_config(config)
        ch, n, text_dim = c["block_out_channels"], len(c["block_out_channels"]), c["cross_attention_dim"]
        temb = c["time_embedding_dim"] or 4 * ch[0]
        heads, layers, only_cross = c["attention_head_dim"], c["layers_per_block"], c["only_cross_attention"]

        self.time_embedding = TimestepEmbedding(ch[0], temb, c["act_fn"])
        self.class_embedding = nn.Embedding(c["num_class_embeds"], temb)  # the low-res image's noise level
        self.conv_in = nn.Conv2d(c["in_channels"], ch[0], 3, padding=1)

        def resnet(cin, cout):
            return ResnetBlock2D(cin, cout, temb, groups=c["norm_num_groups"], eps=c["norm_eps"], act=c["act_fn"],
                                 scale_shift=False, skip_time_act=False)

        def transformers(channels, count, heads, only_cross):
            return [Transformer2D(channels, heads, text_dim, c["norm_num_groups"], only_cross) for _ in range(count)]

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(c["down_block_types"]):
            cin, cout = ch[max(i - 1, 0)], ch[i]
            self.down_blocks.append(Block(
                [resnet(cin if j == 0 else cout, cout) for j in range(layers[i])],
                transformers(cout, layers[i], heads[i], only_cross[i]) if SD_DOWN_BLOCKS[kind] else None,
                Resample(cout, up=False) if i < n - 1 else None, "down"))
        self.mid_block = Block([resnet(ch[-1], ch[-1]) for _ in range(2)], transformers(ch[-1], 1, heads[-1], False),
                               None, "mid")
        self.up_blocks = nn.ModuleList()
        rch, rheads, rlayers, rcross = ch[::-1], heads[::-1], layers[::-1], only_cross[::-1]
        for i, kind in enumerate(c["up_block_types"]):
            prev, cout, skip, count = rch[max(i - 1, 0)], rch[i], rch[min(i + 1, n - 1)], rlayers[i] + 1
            self.up_blocks.append(Block(  # resnet j reads cat([h, skip]): the last one the block input's skip
                [resnet((prev if j == 0 else cout) + (skip if j == count - 1 else cout), cout) for j in range(count)],
                transformers(cout, count, rheads[i], rcross[i]) if SD_UP_BLOCKS[kind] else None,
                Resample(cout, up=True) if i < n - 1 else None, "up"))
        self.conv_norm_out = nn.GroupNorm(c["norm_num_groups"], ch[0], c["norm_eps"])
        self.conv_act = activation(c["act_fn"])
        self.conv_out = nn.Conv2d(ch[0], c["out_channels"], 3, padding=1)

    def forward(self, x, t, text, noise_level):
        """x (B, in_channels, h, w): the latents, then the noised low-res image; t scalar or (B,); text (B, L, X) CLIP
        states; noise_level scalar or (B,) int, the low-res image's noise level (its class label) -> (B, 4, h, w)."""
        B, _, H, W = x.shape
        if H % self.downsample_factor or W % self.downsample_factor:
            raise ValueError(f"latent height and width must be multiples of {self.downsample_factor}, got {H}x{W}")
        c = self.config
        t = torch.as_tensor(t, device=x.device).expand(B)
        emb = self.time_embedding(timestep_embedding(t, c["block_out_channels"][0], c["flip_sin_to_cos"],
                                                     c["freq_shift"]).to(x.dtype))
        emb = emb + self.class_embedding(torch.as_tensor(noise_level, device=x.device).expand(B)).to(x.dtype)
        text = text.to(x.dtype)

        def layer(resnet, attn, h):
            h = resnet(h, emb)
            return h if attn is None else attn(h, text)

        h = self.conv_in(x)
        skips = [h]  # every down-path output, consumed in reverse by the up path
        for block in self.down_blocks:
            for resnet, attn in block.layers():
                h = layer(resnet, attn, h)
                skips.append(h)
            if block.resampler() is not None:
                h = block.resampler()(h)
                skips.append(h)
        for resnet, attn in self.mid_block.layers():
            h = layer(resnet, attn, h)
        for block in self.up_blocks:
            for resnet, attn in block.layers():
                h = layer(resnet, attn, torch.cat([h, skips.pop()], 1))
            if block.resampler() is not None:
                h = block.resampler()(h)
        return self.conv_out(norm_act(self.conv_norm_out, self.conv_act, h))


class VAEDecoder(nn.Module):
    """AutoencoderKL's decoding half from its vae/config.json dict: post_quant_conv, then decoder.* (the encoder is not
    built). forward(z) equals diffusers' `vae.decode(z).sample`: z (B, latent_channels, h, w) -> (B, 3, 4h, 4w) for
    three levels, about [-1, 1]."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = c = resolve_vae_config(config)
        ch, z, n = c["block_out_channels"][::-1], c["latent_channels"], len(c["block_out_channels"])
        groups = c["norm_num_groups"]

        def resnet(cin, cout):  # no time embedding; diffusers' VAE blocks use eps 1e-6
            return ResnetBlock2D(cin, cout, None, groups=groups, eps=1e-6, act=c["act_fn"], scale_shift=False,
                                 skip_time_act=False)

        if c["use_post_quant_conv"]:
            self.post_quant_conv = nn.Conv2d(z, z, 1)
        self.decoder = d = nn.Module()
        d.conv_in = nn.Conv2d(z, ch[0], 3, padding=1)
        d.mid_block = Block([resnet(ch[0], ch[0]) for _ in range(2)],
                            [VAEAttention(ch[0], groups)] if c["mid_block_add_attention"] else None, None, "mid")
        d.up_blocks = nn.ModuleList(
            Block([resnet(ch[max(i - 1, 0)] if j == 0 else cout, cout) for j in range(c["layers_per_block"] + 1)],
                  None, Resample(cout, up=True) if i < n - 1 else None, "up") for i, cout in enumerate(ch))
        d.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        d.conv_act = activation(c["act_fn"])
        d.conv_out = nn.Conv2d(ch[-1], c["out_channels"], 3, padding=1)

    set_attention_backend = model.set_attention_backend

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def forward(self, z):
        d = self.decoder
        h = d.conv_in(self.post_quant_conv(z) if hasattr(self, "post_quant_conv") else z)
        for resnet, attn in d.mid_block.layers():
            h = resnet(h) if attn is None else attn(resnet(h))
        for block in d.up_blocks:
            for resnet, _ in block.layers():
                h = resnet(h)
            if block.resampler() is not None:
                h = block.resampler()(h)
        return d.conv_out(norm_act(d.conv_norm_out, d.conv_act, h))


# ----------------------------------------------------------------------------------------------
# the schedulers


def ddim_step(sched: Schedule, model_output, t: int, prev_t: int, x_t, *, prediction_type: str = "epsilon",
              final_alpha_cumprod=None, clip_sample: bool = False):
    """One deterministic DDIM step x_t -> x_{prev_t} (Song et al. 2021, "DDIM", eq. 12 with sigma_t = 0, i.e. eta = 0):

        epsilon:  x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        v:        x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v,   eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t
                  (v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, Salimans & Ho 2022, sec. 4)
        x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev) eps

    x_0 is clipped to [-1, 1] if clip_sample (eps is not recomputed from it). abar_prev for prev_t < 0 is
    `final_alpha_cumprod` (1, or abar_0 when the config's set_alpha_to_one is false). Scalars are float32 0-d CPU
    tensors, as in diffusers' DDIMScheduler.step, whose result this equals."""
    a_t = sched.alphas_cumprod[t]
    a_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else final_alpha_cumprod
    b_t = 1 - a_t
    if prediction_type == "v_prediction":
        x0 = a_t**0.5 * x_t - b_t**0.5 * model_output
        eps = a_t**0.5 * model_output + b_t**0.5 * x_t
    else:
        x0, eps = (x_t - b_t**0.5 * model_output) / a_t**0.5, model_output
    if clip_sample:
        x0 = x0.clamp(-1, 1)
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps


class Sampler:
    """The main scheduler as scheduler/scheduler_config.json names it: DDIM (eta = 0) or DDPM (fixed_small variance),
    predicting epsilon or v, on a linear or scaled_linear schedule."""

    def __init__(self, config: dict):
        self.config = c = resolve_scheduler_config(config)
        self.sched = Schedule(c["num_train_timesteps"], betas_for(c))
        self.ddim = c["_class_name"] == "DDIMScheduler"
        self.final = torch.tensor(1.0) if c["set_alpha_to_one"] else self.sched.alphas_cumprod[0]

    def timesteps(self, steps: int) -> list[tuple[int, int]]:
        """(t, prev_t) pairs as diffusers' set_timesteps and step visit them: "leading" spacing is offset by
        steps_offset; DDIM's prev_t is t - T // steps, DDPM's the next timestep (-1 after the last)."""
        c, T = self.config, self.config["num_train_timesteps"]
        ts = timesteps_for(c["timestep_spacing"], T, steps)
        if c["timestep_spacing"] == "leading":
            ts = [t + c["steps_offset"] for t in ts]
        return list(zip(ts, [t - T // steps for t in ts] if self.ddim else ts[1:] + [-1]))

    def step(self, model_output, t: int, prev_t: int, x, generator=None):
        c = self.config
        if self.ddim:
            return ddim_step(self.sched, model_output, t, prev_t, x, prediction_type=c["prediction_type"],
                             final_alpha_cumprod=self.final, clip_sample=c["clip_sample"])
        return p_sample_step(self.sched, model_output, t, prev_t, x, variance="fixed_small",
                             clip_sample=c["clip_sample"], prediction_type=c["prediction_type"], generator=generator)


# ----------------------------------------------------------------------------------------------
# loading


class Upscaler:
    """The x4 upscaler's parts, as load() returns them: unet, vae (decoder), text_encoder and tokenizer (CLIP), and
    the two scheduler configs (scheduler: the sampler; low_res_scheduler: the low-res image's noise schedule)."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler: dict, low_res_scheduler: dict,
                 max_noise_level: int = MAX_NOISE_LEVEL):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler = resolve_scheduler_config(scheduler, "scheduler")
        self.low_res_scheduler = resolve_scheduler_config(low_res_scheduler, "low_res_scheduler")
        if self.low_res_scheduler["_class_name"] != "DDPMScheduler":
            _refuse("low_res_scheduler/scheduler_config.json", "_class_name", low_res_scheduler["_class_name"],
                    "'DDPMScheduler'")
        self.max_noise_level = max_noise_level

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """CLIP's last hidden states [B, 77, 1024] for the prompts, padded to the tokenizer's max length (no attention
        mask unless the text encoder's config asks for one), as the pipeline encodes them."""
        if self.text_encoder is None:
            raise ValueError("the text encoder was freed (free_text_encoder=True); load() again, or pass the prompt "
                             "embeddings as tensors")
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        clip = self.text_encoder
        mask = tokens.attention_mask.to(clip.device) if getattr(clip.config, "use_attention_mask", False) else None
        return clip(tokens.input_ids.to(clip.device), attention_mask=mask)[0]

    def free_text_encoder(self) -> None:
        self.text_encoder = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _files(variant: str | None) -> list[str]:
    """The files of a Hub folder that load() reads: configs, tokenizer, and the weights of `variant` only."""
    files = ["model_index.json", "tokenizer/*", "scheduler/*.json", "low_res_scheduler/*.json"]
    for sub, name in (("unet", model.WEIGHTS_NAME), ("vae", model.WEIGHTS_NAME), ("text_encoder", "model")):
        single = model._variant(f"{name}.safetensors", variant)
        shards = single.replace(".safetensors", "-*.safetensors")
        index = model._variant(f"{name}.safetensors.index.json", variant)
        files += [f"{sub}/{f}" for f in ("config.json", single, index, shards)]
    return files


def _build(cls, folder: Path, variant, dtype, device, keep=None, what="U-Net"):
    """A model from folder/config.json and its safetensors weights, built on the meta device (nothing random)."""
    with torch.device("meta"):
        net = cls(json.loads((folder / "config.json").read_text()))
    state = model.read_weights(folder, variant, dtype, device, keep)
    model.check_state_dict(net, state, source=str(folder), what=what)
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval()


def is_if_config(unet_config: dict) -> bool:
    """A DeepFloyd IF U-Net's unet/config.json (3 or 6 input channels, IF's block types), not the x4's."""
    return unet_config.get("in_channels") in (3, 6) or any(b in model.DOWN_BLOCKS
                                                           for b in unet_config.get("down_block_types") or [])


def load(path_or_id, dtype=None, device=None, variant=None, vae_dtype=torch.float32, attention="sdpa") -> Upscaler:
    """The x4 upscaler from a diffusers folder (local, or a Hub id: then only the files used are downloaded). U-Net
    and text encoder in `dtype` (float32 by default), the VAE decoder in `vae_dtype`; `variant` ('fp16') picks the
    weight files. Only safetensors are read."""
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(path_or_id)
    if not root.exists():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(str(path_or_id), allow_patterns=_files(variant)))
    def read(*parts, default=None):  # a json file of the folder
        f = root.joinpath(*parts)
        return json.loads(f.read_text()) if f.is_file() or default is None else default

    c = read("unet", "config.json", default={})
    if is_if_config(c):
        raise ValueError(f"{path_or_id} is a DeepFloyd IF folder (a U-Net of {c.get('in_channels')} input channels, "
                         f"{c.get('down_block_types')}), not the x4 upscaler: stage III takes stabilityai/stable-"
                         "diffusion-x4-upscaler (4 latent + 3 image channels); IF-I-* is stage I, IF-II-* stage II")
    missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "low_res_scheduler")
               if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{path_or_id} lacks {', '.join(missing)}/: stage III needs the whole diffusers folder "
                                "of stabilityai/stable-diffusion-x4-upscaler")
    device = torch.device(device or "cpu")
    unet = _build(X4UNet, root / "unet", variant, dtype, device)
    vae = _build(VAEDecoder, root / "vae", variant, vae_dtype, device, what="VAE decoder",
                 keep=lambda k: k.startswith(("decoder.", "post_quant_conv.")))
    if unet.config["in_channels"] != vae.config["latent_channels"] + 3:
        raise ValueError(f"{path_or_id}: the U-Net takes {unet.config['in_channels']} input channels, but the latents "
                         f"and the RGB image make {vae.config['latent_channels']} + 3")
    unet.set_attention_backend(attention)
    vae.set_attention_backend(attention)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype or torch.float32,
                                                 variant=variant, use_safetensors=True).to(device).eval()
    return Upscaler(unet, vae, text_encoder, CLIPTokenizer.from_pretrained(root / "tokenizer"),
                    read("scheduler", "scheduler_config.json"), read("low_res_scheduler", "scheduler_config.json"),
                    read("model_index.json", default={}).get("max_noise_level", MAX_NOISE_LEVEL))


# ----------------------------------------------------------------------------------------------
# the sampler


def _text(up: Upscaler, text, batch: int, name: str) -> torch.Tensor:
    """Prompt embeddings [B, L, D] from a str (for every image), a list of B strs, or embeddings [B or 1, L, D]."""
    if isinstance(text, torch.Tensor):
        if text.shape[0] not in (1, batch):
            raise ValueError(f"{name}: embeddings of {text.shape[0]} prompts for {batch} images; give {batch} or 1")
        return text.expand(batch, -1, -1)
    text = [text] * batch if isinstance(text, str) else list(text)
    if len(text) != batch:
        raise ValueError(f"{name}: {len(text)} prompts for {batch} images; give one per image, or one str for all")
    return up.encode(text)


@torch.no_grad()
def denoise(up: Upscaler, images, text, neg, *, steps: int = 75, guidance: float = 9.0, noise_level: int = NOISE_LEVEL,
            generator=None, progress: bool = False) -> torch.Tensor:
    """The reverse process in latent space: images [B, 3, h, w] in [-1, 1], text/neg [B, L, D] (neg None: no
    guidance) -> latents [B, 4, h, w]. The low-res image is noised to `noise_level` on the low-res schedule (noise
    conditioning augmentation; its level is the U-Net's class label) and read beside the latents at every step."""
    from tqdm.auto import tqdm

    unet, sampler = up.unet, Sampler(up.scheduler)
    B, C, H, W = images.shape
    if not isinstance(noise_level, int) or not 0 <= noise_level <= up.max_noise_level:
        raise ValueError(f"noise_level must be an int in [0, {up.max_noise_level}] (the levels the x4 upscaler was "
                         f"trained on), got {noise_level!r}")
    if H % unet.downsample_factor or W % unet.downsample_factor:
        raise ValueError(f"stage III input {W}x{H} (WxH): both sides must be multiples of {unet.downsample_factor}")
    latent_channels = unet.config["in_channels"] - C
    device, dtype = unet.device, unet.dtype
    text = text.to(device, dtype)
    if neg is not None:  # classifier-free guidance (Ho & Salimans 2022): one batch [negative, positive]
        text = torch.cat([neg.to(device, dtype), text])
    level = torch.tensor([noise_level], dtype=torch.long, device=device)
    noise = randn(images.shape, generator, device, dtype)  # first draw: the low-res image's augmentation noise
    low_sched = Schedule(up.low_res_scheduler["num_train_timesteps"], betas_for(up.low_res_scheduler))
    low = q_sample(low_sched, images.to(device, dtype), noise, level)  # (B, 3, h, w), noised in pixel space
    low = torch.cat([low, low]) if neg is not None else low
    labels = level.expand(low.shape[0])
    x = randn((B, latent_channels, H, W), generator, device, dtype)  # x_T (DDIM's and DDPM's init_noise_sigma is 1)
    pairs = sampler.timesteps(steps)
    ts_on_device = torch.tensor([t for t, _ in pairs], device=device)  # indexing it per step needs no host copy
    for i, (t, prev_t) in enumerate(tqdm(pairs, desc="stage III", disable=not progress, leave=False)):
        inp = torch.cat([x, x]) if neg is not None else x
        out = unet(torch.cat([inp, low], dim=1), ts_on_device[i], text, labels)  # (B|2B, 4, h, w)
        if neg is not None:  # on the whole output: eps or v alike
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        x = sampler.step(out, t, prev_t, x, generator)
    return x


@torch.no_grad()
def decode(up: Upscaler, latents) -> torch.Tensor:
    """Latents -> images in [0, 1]: the VAE decodes latents / scaling_factor in its dtype, then the pipeline's
    postprocessing x / 2 + 1/2, clamped."""
    z = latents.to(up.vae.dtype) / up.vae.config["scaling_factor"]
    # one image at a time: the same result (every layer is per image), and a batch's peak is one image's (3 GiB at
    # 1024 px in float32) rather than B times it
    return torch.cat([(up.vae(z[i:i + 1]) * 0.5 + 0.5).clamp(0, 1) for i in range(z.shape[0])])


def stage3(up: Upscaler, images, prompts, *, negative_prompt="", steps: int = 75, guidance: float = 9.0,
           noise_level: int = NOISE_LEVEL, generator=None, free_text_encoder: bool = False,
           progress: bool = False) -> torch.Tensor:
    """x4 super-resolution: images [B, 3, h, w] in [-1, 1] (stage II's output) -> [B, 3, 4h, 4w] in [0, 1].
    prompts and negative_prompt: a str for every image, a list of B, or embeddings [B or 1, L, D] (Upscaler.encode);
    guidance <= 1 samples without the negative. free_text_encoder drops CLIP once the prompts are encoded."""
    B = images.shape[0]
    text = _text(up, prompts, B, "prompts")
    neg = _text(up, negative_prompt, B, "negative_prompt") if guidance > 1 else None
    if free_text_encoder:
        up.free_text_encoder()
    latents = denoise(up, images, text, neg, steps=steps, guidance=guidance, noise_level=noise_level,
                      generator=generator, progress=progress)
    return decode(up, latents)


# ----------------------------------------------------------------------------------------------
# what stage III costs, before a GPU is rented


def estimate(batch: int = 1, size=(256, 256), *, dtype=torch.bfloat16, vae_dtype=torch.float32, guidance: bool = True,
             steps: int = 75, unet_config=None, vae_config=None, text_config=None) -> dict:
    """Predicted peak of live tensors of stage3 on `batch` images of `size` (h, w) -> 4x, on fake tensors (nothing is
    allocated; the x4's published configs unless given). Per phase, the bytes its live tensors reach beyond the
    weights (text: CLIP on the prompts and negatives; unet: one guided sampler step; vae: the decode), the weights per
    component, the peak with every component resident (load()'s state) and with CLIP freed, and the FLOPs of the run.
    What LiveBytes cannot see (CUDA context, kernel workspaces) is not counted: see memory.py."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    import memory

    with torch.device("meta"):
        unet, vae = X4UNet(unet_config or X4_UNET).to(dtype), VAEDecoder(vae_config or X4_VAE).to(vae_dtype)
        clip = CLIPTextModel(CLIPTextConfig(**(text_config or X4_TEXT))).to(dtype)
    h, w = size
    out = {"batch": batch, "size": [h, w], "dtype": str(dtype), "vae_dtype": str(vae_dtype)}
    # one LiveBytes for the whole run, the weights made inside it: views of a weight (a Linear's w.t()) are then
    # known as the weight's storage, not counted again; each phase's peak is read above what was live before it
    with FakeTensorMode(), torch.no_grad(), memory.LiveBytes() as live:
        for m in (unet, vae, clip):
            memory.materialise(m)
        out["weights_bytes"] = {name: sum(t.untyped_storage().nbytes() for t in [*m.parameters(), *m.buffers()])
                                for name, m in (("unet", unet), ("vae", vae), ("text_encoder", clip))}
        up = Upscaler(unet, vae, clip, None, X4_SCHEDULER, X4_LOW_RES_SCHEDULER)
        ids = torch.zeros(batch, clip.config.max_position_embeddings, dtype=torch.long)
        images, out["flops"] = torch.zeros(batch, 3, h, w), 0

        def phase(name, run):  # its peak beyond what was live before it, and its FLOPs (the U-Net's times steps)
            base = live.peak = live.now
            result = run()
            out[f"{name}_peak_bytes"] = live.peak - base
            with FlopCounterMode(display=False) as counter:  # apart: it keeps tensors alive a little longer
                run()
            out["flops"] += counter.get_total_flops() * (steps if name == "unet" else 1)
            return result

        text = phase("text", lambda: [clip(ids)[0] for _ in range(1 + guidance)])[0]
        latents = phase("unet", lambda: denoise(up, images, text, text if guidance else None, steps=1))
        phase("vae", lambda: decode(up, latents))
    weights, phases = sum(out["weights_bytes"].values()), [out[f"{n}_peak_bytes"] for n in ("text", "unet", "vae")]
    out["peak_bytes"] = weights + max(phases)
    without_clip = weights - out["weights_bytes"]["text_encoder"]
    out["text_freed_peak_bytes"] = max(weights + phases[0], without_clip + max(phases[1:]))
    return out


if __name__ == "__main__":  # python upscaler.py [BATCH]: what stage III needs at IF's sizes (256 -> 1024 px)
    import sys

    import memory

    batch, gib = int(sys.argv[1]) if len(sys.argv) > 1 else 1, lambda n: f"{n / memory.GiB:.2f} GiB"
    for vae_dtype in (torch.float32, torch.bfloat16):
        e = estimate(batch, vae_dtype=vae_dtype)
        print(f"stage III, {batch} x 256 -> 1024 px, U-Net and CLIP in bf16, VAE in {vae_dtype}: peak of live tensors "
              f"{gib(e['peak_bytes'])} ({gib(e['text_freed_peak_bytes'])} with CLIP freed), {e['flops'] / 1e12:.0f} "
              "TFLOP for 75 steps\n  weights: " + ", ".join(f"{k} {gib(v)}" for k, v in e["weights_bytes"].items())
              + "\n  beyond them: " + ", ".join(f"{k} {gib(e[f'{k}_peak_bytes'])}" for k in ("text", "unet", "vae"))
              + "\n  fits (memory.fits, with its allowance): "
              + ", ".join(f"{gb} GB {'yes' if memory.fits(e['peak_bytes'], gb)[0] else 'no'}" for gb in (8, 12, 24)))
