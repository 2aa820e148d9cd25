"""The IF cascade sampler: prompts -> T5 -> stage I (64 px) -> stage II (256 px) [-> stage III (1024 px)] -> PNGs.

    python sample.py CONFIG --prompt="a red circle on a blue background" [--lora=PATH] [--stage2=ID_OR_PATH]
    python sample.py CONFIG --prompt="..." --stage2=ID_OR_PATH --stage3=stabilityai/stable-diffusion-x4-upscaler

writes {output_dir}/samples/<index>_<slug>.png (the last stage's image) and a labelled grid.png, and prints their
paths. The earlier stages' images are kept beside it, named by their size: ..._64.png (stage I), ..._256.png
(stage II, when stage III follows), ..._WxH.png when not square. One generator, seeded once, serves the prompts in
order, so image i of a run comes out the same for the same prompts, settings, seed and device. Stage III
(upscaler.py, Stability's x4 latent upscaler, --stage3_lora for its U-Net) runs after stage I and II have made every
prompt's images and have been freed, one stage resident at a time: it reads the raw prompts with its own CLIP (freed
once they are encoded) and the negative prompt, takes stage II's images as saved (8-bit: the ..._256.png files are
exactly its input) and continues the same generator after them, so the 64 and 256 px images are those of the same
run without --stage3. The grid then shows each sample at every stage, enlarged (nearest) to the final size.

From a picture (the grid then shows the picture and the mask before the samples):

    python sample.py CONFIG --prompt="..." --image=photo.png [--strength=0.7]     # stage I img2img
    python sample.py CONFIG --prompt="..." --image=photo.png --mask=mask.png      # stage I inpainting (white: repaint)
    ... either with --stage2=ID_OR_PATH [--stage2_strength=0.8]: stage II continues from the same picture at 4x
    python sample.py CONFIG --prompt="..." --stage2=ID_OR_PATH --upscale_only --image=small.png [--mask=...]
    ... any of these with --stage3=ID_OR_PATH: stage III then upscales stage II's output 4x again
    python sample.py CONFIG --prompt="..." --stage3=ID_OR_PATH --upscale_only --image=256px.png   # stage III alone

Stage I takes the picture resized (bicubic) so its short side is `resolution` (64, as the pipelines), or to exactly
`resolution='WxH'`. `--upscale_only` skips stage I: the picture as it is becomes stage II's low-res input, the
output is 4x its size; stage II starts from noise, or from the picture upscaled given --mask or --stage2_strength.
Without --stage2 stage III alone upscales it (each side first resized to the nearest multiple of its U-Net's, 8).
As a library:

    unet1, kw1 = load_unet("DeepFloyd/IF-I-XL-v1.0", lora="out/pytorch_lora_weights.safetensors")
    unet2, kw2 = load_unet("DeepFloyd/IF-II-L-v1.0")
    images64, images256 = cascade(unet1, unet2, text_emb, neg_emb, stage1_kw=kw1, stage2_kw=kw2, generator=g)
    edited = stage1(unet1, text_emb, neg_emb, image=Image.open("photo.png"), strength=0.7, generator=g, **kw1)
    del unet1, unet2; free_memory()                                  # then stage III, alone on the device
    up = load_upscaler("stabilityai/stable-diffusion-x4-upscaler", lora=None)
    images1024 = upscaler.stage3(up, images256, prompts, generator=g, free_text_encoder=True)  # in [0, 1]

Same weights, embeddings and generator give the images diffusers' IFPipeline and IFSuperResolutionPipeline
give (output_type="pt"): the same random draws in the same order (stage I: the initial noise, then one draw
per step inside the step; stage II: the initial noise, then the low-res augmentation noise, then the steps),
classifier-free guidance on the epsilon channels with the batch ordered [negative, positive], and the
sampler step of diffusion.py, which equals diffusers' DDPMScheduler.step. With a picture they equal
IFImg2ImgPipeline, IFInpaintingPipeline, IFImg2ImgSuperResolutionPipeline and IFInpaintingSuperResolutionPipeline:
the noise that starts the process noises the picture instead (prepare_image prepares it as they do).
"""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import diffusion
import quant
import upscaler
from config import stage_of, torch_dtype
from data import image_grid, parse_resolutions, to_pil
from diffusion import Schedule, low_res_condition, p_sample_step, q_sample, randn, scheduler_config, timesteps_for
from lora import load_lora, merge_lora, read_lora_metadata
from model import UNet

# diffusion.scheduler_config(stage) is used when weights come without scheduler/scheduler_config.json;
# DDPM_DEFAULTS are diffusers' DDPMScheduler defaults, which is what a config file that omits a key means.
DDPM_DEFAULTS = dict(variance_type="fixed_small", thresholding=False, dynamic_thresholding_ratio=0.995,
                     sample_max_value=1.0, clip_sample=True, prediction_type="epsilon", beta_schedule="linear",
                     timestep_spacing="leading", steps_offset=0)
ROMAN = {1: "I", 2: "II", 3: "III"}
NOISE_LEVEL = 250  # stage II's default augmentation of its low-res input, as IF's super-resolution pipeline


# ---------------------------------------------------------------------------------------------
# the sampler


def _check_stage(unet, stage: int, source: str = "this U-Net") -> None:
    got = stage_of(unet.config)
    if got != stage:
        raise ValueError(f"{source} is a stage {ROMAN[got]} U-Net ({unet.config['in_channels']} input channels) but "
                         f"was given as stage {ROMAN[stage]}: stage I weights (IF-I-*) make 64 px images from text, "
                         f"stage II weights (IF-II-*) upscale them; in sample.py use `pretrained` for stage I and "
                         f"`stage2` for stage II")


def _check_size(unet, height: int, width: int, stage: int) -> None:
    f = unet.downsample_factor
    if height % f or width % f:
        raise ValueError(f"stage {ROMAN[stage]} size {width}x{height} (WxH): both sides must be multiples of {f} for "
                         f"this U-Net ({len(unet.config['block_out_channels'])} resolution levels)")


def _sample_size(unet, stage: int) -> int:
    """The U-Net's native size (its config's sample_size: IF-I 64, IF-II 256), as the pipelines default to it."""
    return unet.config.get("sample_size") or {1: 64, 2: 256}[stage]


def _start(unet, stage, batch, height, width, steps, timesteps, image, strength, mask, generator):
    """Where the reverse process starts: (x, the timesteps to visit, the repaint mask [1|B, 1, H, W] bool or None).
    Text to image: x_T, pure noise of height x width (None: the U-Net's sample_size), and every timestep.
    img2img (SDEdit, Meng et al. 2022): only the last int(steps * strength) timesteps (rounded down, as diffusers'
    get_timesteps), and `image` noised to the first of them with one draw of noise; with a `mask` only the masked
    pixels are noised, the others are the picture itself."""
    ts = timesteps_for(timesteps or "leading", steps=steps)
    if image is None:
        if mask is not None or strength != 1.0:
            what = "a mask" if mask is not None else f"strength={strength}"
            raise ValueError(f"{what} needs the picture it acts on: pass image=... too")
        height, width = height or _sample_size(unet, stage), width or _sample_size(unet, stage)
        _check_size(unet, height, width, stage)
        return randn((batch, 3, height, width), generator, unet.device, unet.dtype), ts, None
    if not 0 < strength <= 1:
        raise ValueError(f"strength={strength} must be in (0, 1]: the share of the steps run from the noised picture "
                         f"(small: close to the picture; 1: from almost pure noise)")
    keep = min(int(len(ts) * strength), len(ts))
    if keep < 1:
        raise ValueError(f"strength={strength} of {len(ts)} steps keeps int({len(ts)} * {strength}) = 0 of them: "
                         f"raise strength or steps")
    ts = ts[len(ts) - keep:]
    image, mask = _picture_and_mask(image, mask, _sample_size(unet, stage), batch)
    image = image.to(unet.device, unet.dtype)
    H, W = image.shape[-2:]
    if (height or H, width or W) != (H, W):
        raise ValueError(f"the image is {W}x{H} (WxH) but height, width = {height}, {width}: with an image leave them "
                         f"out (its size is the output's) or resize it")
    _check_size(unet, H, W, stage)
    noise = randn((batch, 3, H, W), generator, unet.device, unet.dtype)
    x = q_sample(Schedule(), image, noise, ts[0])  # (B, 3, H, W)
    if mask is not None:
        mask = mask.to(unet.device)
        x = torch.where(mask, x, image)
    return x, ts, mask


def _denoise(unet, x, ts, text_emb, neg_emb, *, low_res=None, noise_level=None, mask=None, guidance, variance,
             thresholding, clip_sample, prediction_type, generator, progress, desc):
    """The reverse process from x at ts[0]: one U-Net call per timestep (the CFG pair batched as [negative, positive]),
    then one ancestral step. Stage II also feeds the noised, upsampled low-res image and its noise level. With a
    `mask` (inpainting) only the masked pixels take the step; the others keep their values, the original picture's,
    as IF's inpainting pipelines blend (x_prev where the mask is 0)."""
    from tqdm.auto import tqdm

    sched, C = Schedule(), x.shape[1]
    ts_on_device = torch.tensor(ts, device=x.device)  # copied once: indexing it per step needs no host sync
    guided = guidance > 1 and neg_emb is not None  # as the pipelines: guidance <= 1 runs the conditional model only
    text_emb = text_emb.to(x.device, unet.dtype)
    if guided:
        neg_emb = neg_emb.to(x.device, unet.dtype).expand_as(text_emb)  # a [1, L, D] negative serves every sample
        text_emb = torch.cat([neg_emb, text_emb])  # (2B, L, D)
    for i in tqdm(range(len(ts)), desc=desc, disable=not progress, leave=False):
        inp = x if low_res is None else torch.cat([x, low_res], dim=1)  # stage II: (B, 6, H, W), sample first
        out = unet(torch.cat([inp, inp]) if guided else inp, ts_on_device[i], text_emb, noise_level)  # (B|2B, ...)
        if guided:  # Ho & Salimans 2022 eq. 6 on epsilon (or v: linear in it alike); variance from the conditional half
            uncond, cond = out.chunk(2)  # (B, 2C, H, W) each, or (B, C, H, W) from an eps-only U-Net: no variance
            eps_u, eps_c = uncond[:, :C], cond[:, :C]
            out = torch.cat([eps_u + guidance * (eps_c - eps_u), cond[:, C:]], dim=1)
        prev_t = ts[i + 1] if i + 1 < len(ts) else -1
        step = p_sample_step(sched, out, ts[i], prev_t, x, variance=variance, thresholding=thresholding,
                             clip_sample=clip_sample, prediction_type=prediction_type, generator=generator)
        x = step if mask is None else torch.where(mask, step, x)
    return x


@torch.no_grad()
def stage1(unet, text_emb, neg_emb, *, height=None, width=None, steps=100, guidance=7.0, variance="learned_range",
           thresholding=(0.95, 1.5), clip_sample=True, timesteps=None, generator=None, progress=False,
           image=None, strength=1.0, mask=None, prediction_type="epsilon") -> torch.Tensor:
    """Text to image: text_emb [B, L, 4096] (neg_emb [B or 1, L, 4096], or None for no guidance) -> [B, 3, H, W] in
    [-1, 1]; height x width defaults to the U-Net's sample_size (64). `timesteps`: "leading" (None, diffusers' IF
    default) or "trailing" with `steps`, an IF respacing ("smart100", ...) or a descending list, then `steps` is
    unused. `thresholding=(ratio, max)` is dynamic thresholding (Imagen sec. 2.3); None clips x_0 to [-1, 1] (if
    clip_sample). `prediction_type`: what the U-Net outputs, "epsilon" (IF's) or "v_prediction" (load_unet reads it
    from the scheduler config). The sample is kept in the U-Net's dtype, as the pipeline keeps it.

    img2img (IFImg2ImgPipeline): `image` (one picture for all samples or one per sample; see prepare_image: a
    picture is resized so its short side is the U-Net's sample_size, a tensor is taken as is) is noised to the first
    of the last int(steps * strength) timesteps, which are then run; the output has the image's size. Inpainting
    (IFInpaintingPipeline): a `mask` too (1 = repaint, binarised at 0.5); the pixels outside it come out exactly as
    the (prepared) image has them."""
    _check_stage(unet, 1)
    x, ts, mask = _start(unet, 1, text_emb.shape[0], height, width, steps, timesteps, image, strength, mask,
                         generator)  # x_T, or the noised picture
    return _denoise(unet, x, ts, text_emb, neg_emb, mask=mask, guidance=guidance, variance=variance,
                    thresholding=thresholding, clip_sample=clip_sample, prediction_type=prediction_type,
                    generator=generator, progress=progress, desc="stage I")


@torch.no_grad()
def stage2(unet, low_res, text_emb, neg_emb, *, height=None, width=None, steps=50, guidance=4.0,
           noise_level=NOISE_LEVEL, variance="learned_range", thresholding=(0.95, 1.0), clip_sample=True,
           timesteps=None, generator=None, progress=False, image=None, strength=1.0, mask=None,
           prediction_type="epsilon") -> torch.Tensor:
    """Super-resolution: low_res [B, 3, h, w] in [-1, 1] (or a picture, taken at its size) -> [B, 3, height, width]
    in [-1, 1], by default the U-Net's sample_size (256). The low-res image is upsampled (bilinear,
    align_corners=True), noised to `noise_level` on the cosine schedule (noise augmentation, Ho et al. 2021
    "Cascaded Diffusion Models" sec. 3.2; the U-Net gets the level as its class label) and concatenated after the
    sample. text_emb may hold one row for all images. Other arguments as in stage1.

    `image` is the full-size original (diffusers' original_image; a picture is resized so its short side is the
    U-Net's sample_size) that img2img starts from (IFImg2ImgSuperResolutionPipeline) and, with `mask`, inpainting
    keeps outside the mask (IFInpaintingSuperResolutionPipeline); the output has its size."""
    _check_stage(unet, 2)
    low_res = prepare_image(low_res)  # a picture as it is, as the super-resolution pipelines take it
    B, device, dtype = low_res.shape[0], unet.device, unet.dtype
    x, ts, mask = _start(unet, 2, B, height, width, steps, timesteps, image, strength, mask,
                         generator)  # x_T or the noised original, drawn before the augmentation noise
    height, width = x.shape[-2:]
    level = torch.full((), noise_level, device=device, dtype=torch.long)  # broadcasts over the batch (and CFG pair)
    noise = randn((B, low_res.shape[1], height, width), generator, device, dtype)
    up = low_res_condition(Schedule(), low_res.to(device, dtype), (height, width), noise, level)  # (B, 3, H, W)
    return _denoise(unet, x, ts, text_emb.expand(B, -1, -1), neg_emb, low_res=up, noise_level=level, mask=mask,
                    guidance=guidance, variance=variance, thresholding=thresholding, clip_sample=clip_sample,
                    prediction_type=prediction_type, generator=generator, progress=progress, desc="stage II")


def cascade(unet1, unet2, text_emb, neg_emb, *, stage1_kw=None, stage2_kw=None, generator=None, progress=False):
    """IF's text-to-image cascade: stage I at its size, then stage II at 4x that size (unless stage2_kw says
    otherwise, or gives an `image` whose size decides) on stage I's output. The kw dicts are load_unet's defaults
    plus any overrides. -> (low, high)."""
    images64 = stage1(unet1, text_emb, neg_emb, generator=generator, progress=progress, **(stage1_kw or {}))
    h, w = images64.shape[-2:]
    stage2_kw = dict(stage2_kw or {})
    if stage2_kw.get("image") is None:
        stage2_kw = {"height": 4 * h, "width": 4 * w, **stage2_kw}
    images256 = stage2(unet2, images64, text_emb, neg_emb, generator=generator, progress=progress, **stage2_kw)
    return images64, images256


# ---------------------------------------------------------------------------------------------
# pictures in (img2img, inpainting, super-resolution of a given picture), prepared as IF's pipelines prepare them

MAX_PIXELS = 8192 * 8192  # a bigger picture is refused before it is decoded (it would be ~0.8 GB as floats)
MAX_UPSCALE_PIXELS = 256 * 256  # upscale_only: stage II makes 4x each side, so at most ~1024x1024 (IF-II: 64 -> 256)


def _pil(picture, what: str = "image") -> Image.Image:
    """A path, PIL image or uint8 array (H, W[, C]) as a PIL image (a file is not decoded yet), its size checked."""
    if isinstance(picture, (str, Path)):
        if not Path(picture).is_file():
            raise FileNotFoundError(f"{what} {picture} does not exist")
        picture = Image.open(picture)
    elif isinstance(picture, np.ndarray):
        if picture.dtype != np.uint8:
            raise ValueError(f"{what}: an array must hold uint8 pixels (H, W[, C]), got {picture.dtype}; pass a float "
                             f"picture as a torch tensor [B, 3, H, W] in [-1, 1]")
        picture = Image.fromarray(picture)
    if not isinstance(picture, Image.Image):
        raise TypeError(f"{what} must be a path, a PIL image, a uint8 array or a tensor, not {type(picture).__name__}")
    if picture.width * picture.height > MAX_PIXELS:
        raise ValueError(f"{what} is {picture.width}x{picture.height}, {picture.width * picture.height / 1e6:.0f} MP; "
                         f"pictures above {MAX_PIXELS / 1e6:.0f} MP (sample.MAX_PIXELS) are refused: downscale it "
                         f"first (stage I samples at 64 px, stage II at 256 px)")
    return picture


def pipeline_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(W, H) that IF's img2img and inpainting pipelines resize a width x height picture to: the short side becomes
    `short_side`, the long side keeps the aspect ratio, rounded to a multiple of 8 (Python's round: halves to even)."""
    aspect = width / height
    if aspect >= 1:
        return int(round(short_side / 8 * aspect) * 8), short_side
    return short_side, int(round(short_side / 8 / aspect) * 8)


def prepare_image(picture, size=None, *, mask: bool = False) -> torch.Tensor:
    """A picture as the sampler takes it, prepared as IF's pipelines prepare theirs. `picture`: a path, a PIL image,
    a uint8 array, a tensor, or a list of them (one per sample). A picture is converted to RGB (a mask to grey, "L"),
    as the pipelines convert, but one with transparent pixels is refused (RGB would show the colours under them);
    resized (bicubic) to `size`: an int is the short side (pipeline_size), a (W, H) pair exact, None keeps it; then
    scaled to [-1, 1] -> [1, 3, H, W] float32, or for a mask to [0, 1] and binarised at 0.5 (1 = repaint) ->
    [1, 1, H, W] bool. A tensor is taken as it is (not resized): [B, 3, H, W] or [3, H, W] in [-1, 1]; a mask
    [B, 1, H, W], [B, H, W] or [H, W] in [0, 1], binarised."""
    if isinstance(picture, (list, tuple)):
        return torch.cat([prepare_image(p, size, mask=mask) for p in picture])
    if isinstance(picture, torch.Tensor):
        if mask:
            m = picture[None, None] if picture.ndim == 2 else picture.unsqueeze(1) if picture.ndim == 3 else picture
            return m >= 0.5
        x = picture[None] if picture.ndim == 3 else picture
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"an image tensor must be [B, 3, H, W] or [3, H, W] in [-1, 1], got {list(picture.shape)}")
        return x
    what = "mask" if mask else "image"
    im = _pil(picture, what)
    if not mask and (im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info):
        if im.convert("RGBA").getextrema()[3][0] < 255:
            raise ValueError(f"{what} {getattr(im, 'filename', '') or ''} has transparent pixels, which RGB would "
                             f"drop (the colours under them would show): flatten it onto a background first")
    im = im.convert("L" if mask else "RGB")
    if size is not None:
        im = im.resize(pipeline_size(*im.size, size) if isinstance(size, int) else tuple(size), Image.BICUBIC)
    x = torch.from_numpy(np.array(im)).float()  # (H, W) or (H, W, 3), 0..255
    return (x / 255 >= 0.5)[None, None] if mask else (x / 127.5 - 1).permute(2, 0, 1)[None]


def _check_same_size(image, mask) -> None:
    """A mask given as a picture must have its picture's size (both are then resized alike)."""
    if mask is None or any(isinstance(p, (torch.Tensor, list, tuple)) for p in (image, mask)):
        return
    (w, h), (mw, mh) = _pil(image).size, _pil(mask, "mask").size
    if (w, h) != (mw, mh):
        raise ValueError(f"the mask is {mw}x{mh} but the image is {w}x{h}: give a mask of the picture's size (white = "
                         f"repaint, black = keep)")


def _picture_and_mask(image, mask, size, batch: int):
    """The original [1|B, 3, H, W] and its repaint mask [1|B, 1, H, W] bool (or None), prepared alike and checked."""
    _check_same_size(image, mask)
    image = prepare_image(image, size)
    mask = None if mask is None else prepare_image(mask, size, mask=True)
    for name, x in (("image", image), ("mask", mask)):
        if x is not None and x.shape[0] not in (1, batch):
            raise ValueError(f"{name} holds {x.shape[0]} pictures for {batch} samples: give one, or one per sample")
    if mask is not None and mask.shape[-2:] != image.shape[-2:]:
        (h, w), (mh, mw) = image.shape[-2:], mask.shape[-2:]
        raise ValueError(f"the mask is {mw}x{mh} but the image is {w}x{h}: give a mask of the picture's size")
    return image, mask


# ---------------------------------------------------------------------------------------------
# loading weights and their sampler settings


def auto_variance(lora_metadata: dict | None, scheduler_config: dict | None) -> str:
    """variance="auto": what the weights' variance channels were trained for. A LoRA says so in its metadata
    (train.py writes variance_trained "true" or "false"); a LoRA without the key was trained elsewhere, and every
    known trainer trains epsilon only, so its variance channels no longer fit: fixed_small. Without a LoRA the
    scheduler config decides (IF ships learned_range; an eps-only full fine-tune saves fixed_small)."""
    if lora_metadata is not None:
        return "learned_range" if str(lora_metadata.get("variance_trained")).lower() == "true" else "fixed_small"
    variance = (scheduler_config or {}).get("variance_type", "learned_range")
    if variance not in ("learned_range", "fixed_small"):
        raise ValueError(f"scheduler variance_type {variance!r} is not supported; set variance to 'learned_range' "
                         f"or 'fixed_small'")
    return variance


def read_scheduler_config(path_or_id) -> dict | None:
    """scheduler/scheduler_config.json beside unet/ (a local folder, a bare unet folder's parent, or a Hub repo)."""
    p = Path(path_or_id)
    if p.exists():
        root = p if (p / "unet").is_dir() else p.parent  # else a bare unet folder: look beside it
        f = root / "scheduler" / "scheduler_config.json"
        return json.loads(f.read_text()) if f.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(str(path_or_id), "scheduler_config.json", subfolder="scheduler"))
                          .read_text())
    except Exception:  # a repo without one (or offline and not cached): IF's own settings then
        return None


def prediction_of(scheduler_config: dict | None) -> str:
    """What a U-Net predicts by its scheduler config (read_scheduler_config's): epsilon (IF's, and the default where
    the config is missing or silent) or v_prediction."""
    return {**DDPM_DEFAULTS, **(scheduler_config or {})}["prediction_type"]


def sampler_of(unet, path_or_id=None) -> dict:
    """How a U-Net without a LoRA samples: the variance and prediction_type of its weights' scheduler config
    (path_or_id; none, or no path: IF's, learned_range and epsilon), fixed_small whatever the config says when the
    U-Net has no variance channels (3 outputs)."""
    found = read_scheduler_config(path_or_id) if path_or_id is not None else None
    variance = auto_variance(None, found) if unet.config.get("out_channels", 3) == 6 else "fixed_small"
    return dict(variance=variance, prediction_type=prediction_of(found))


def read_unet_config(path_or_id) -> dict | None:
    """unet/config.json of a local folder (or of a bare unet folder) or of a Hub repo, read without any weights, to
    tell which stage the weights are for before loading them; None where there is none to read."""
    p = Path(path_or_id)
    if p.exists():
        f = next((f for f in (p / "unet" / "config.json", p / "config.json") if f.is_file()), None)
        return json.loads(f.read_text()) if f is not None else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(str(path_or_id), "config.json", subfolder="unet")).read_text())
    except Exception:  # not a repo, gated, or offline and not cached: the loader then says what is wrong
        return None


def is_x4_config(unet_config: dict) -> bool:
    """The x4 upscaler's U-Net (4 latent + 3 image channels, Stable Diffusion's block types), not an IF one."""
    return unet_config.get("in_channels") == 7 or any(b in upscaler.SD_DOWN_BLOCKS
                                                      for b in unet_config.get("down_block_types") or [])


def _refuse_x4(path_or_id, stage: int | None) -> None:
    """x4 upscaler weights given where an IF U-Net belongs are refused, naming the option they belong to."""
    c = read_unet_config(path_or_id)
    if c is not None and is_x4_config(c):
        given = f"given as stage {ROMAN[stage]}" if stage else "given as an IF U-Net"
        raise ValueError(f"{path_or_id} is the x4 latent upscaler, stage III (a U-Net of {c.get('in_channels')} input "
                         f"channels, {c.get('down_block_types')}), but was {given}: in sample.py pass it as --stage3 "
                         f"(stage I weights, IF-I-*, go in `pretrained`, stage II weights, IF-II-*, in `stage2`)")


def load_unet(path_or_id, *, dtype=None, device=None, variant=None, lora=None, attention="sdpa", stage=None,
              quantise=None):
    """A U-Net for sampling, and its sampler settings {variance, thresholding, clip_sample, timesteps,
    prediction_type} (from the scheduler config beside it, else IF's; variance by auto_variance) to pass on to
    stage1/stage2/cascade.
    dtype: config.torch_dtype's "auto" (bf16 on GPUs with it, else fp32). A LoRA (and the biases a bitfit run
    saved with it) is loaded and merged into the weights (no extra cost per step).
    `stage` (1 or 2) refuses weights of the other stage. `quantise`: hold the weights in int8 (quant.py), the
    LoRA kept beside them unmerged, as a quantise_base run trained it; None: as the LoRA's metadata says."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch_dtype(dtype, device)
    if lora is not None and not Path(lora).is_file():
        raise FileNotFoundError(f"LoRA file {lora} does not exist; give the .safetensors a training run wrote "
                                f"(e.g. output/pytorch_lora_weights.safetensors)")
    meta = read_lora_metadata(lora) if lora is not None else None
    if quantise is None:
        quantise = (meta or {}).get("base_quantised") == "int8"
    load_on = torch.device("cpu") if quantise else device  # quantised on the CPU: only int8 reaches the device
    _refuse_x4(path_or_id, stage)
    unet = UNet.from_pretrained(path_or_id, subfolder="unet", dtype=dtype, variant=variant, device=load_on)
    unet_stage = stage_of(unet.config)
    if stage is not None:
        _check_stage(unet, stage, str(path_or_id))
    found = read_scheduler_config(path_or_id)
    # no config: IF's own for this stage; a config that omits a key means diffusers' default
    s = {**DDPM_DEFAULTS, **(found if found is not None else scheduler_config(unet_stage))}
    if (s["prediction_type"] not in diffusion.PREDICTION_TYPES or (s["beta_schedule"], s["steps_offset"])
            != ("squaredcos_cap_v2", 0)):
        raise ValueError(f"{path_or_id}: scheduler config has prediction_type={s['prediction_type']!r}, beta_schedule="
                         f"{s['beta_schedule']!r}, steps_offset={s['steps_offset']}; this sampler is IF's: epsilon "
                         f"(or v_prediction), squaredcos_cap_v2, 0")
    if lora is not None:
        try:
            load_lora(unet, lora)
        except ValueError as e:
            raise ValueError(f"LoRA {lora} does not fit the stage {ROMAN[unet_stage]} U-Net of {path_or_id} (a LoRA "
                             f"for another IF model or stage?):\n{e}") from None
        if not quantise:
            merge_lora(unet)
    if quantise:
        quant.quantise_(unet.requires_grad_(False))
        unet.to(device)
    unet.set_attention_backend(attention)
    thresholding = (s["dynamic_thresholding_ratio"], s["sample_max_value"]) if s["thresholding"] else None
    return unet, dict(variance=auto_variance(meta, found), thresholding=thresholding, clip_sample=s["clip_sample"],
                      timesteps=s["timestep_spacing"], prediction_type=s["prediction_type"])


def _refuse_if(path_or_id) -> dict | None:
    """IF weights given as stage III are refused, naming the option they belong to. -> the unet/config.json read."""
    c = read_unet_config(path_or_id)
    if c is not None and upscaler.is_if_config(c):
        raise ValueError(f"{path_or_id} is a DeepFloyd IF stage {ROMAN[stage_of(c)]} folder (a U-Net of "
                         f"{c.get('in_channels')} input channels), not the x4 upscaler: in sample.py pass it as "
                         f"{'--stage2' if stage_of(c) == 2 else '--pretrained'}; --stage3 takes stabilityai/"
                         "stable-diffusion-x4-upscaler (or a folder of that layout)")
    return c


def load_upscaler(path_or_id, *, dtype=None, device=None, variant=None, lora=None, attention="sdpa"):
    """Stage III, the x4 upscaler (upscaler.load: U-Net and CLIP in `dtype`, config.torch_dtype's "auto", the VAE
    decoder in float32), with a LoRA for its U-Net loaded and merged; an IF folder is refused, naming its option."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if lora is not None and not Path(lora).is_file():
        raise FileNotFoundError(f"LoRA file {lora} does not exist; give the .safetensors of the x4 U-Net's LoRA")
    _refuse_if(path_or_id)
    up = upscaler.load(path_or_id, dtype=torch_dtype(dtype, device), device=device, variant=variant,
                       attention=attention)
    if lora is not None:
        try:
            load_lora(up.unet, lora)
        except ValueError as e:
            raise ValueError(f"LoRA {lora} does not fit the x4 upscaler's U-Net of {path_or_id} (a LoRA for an IF "
                             f"stage?):\n{e}") from None
        merge_lora(up.unet)
    return up


def free_memory(device=None) -> None:
    """Give back what deleted models held: Python's reference cycles collected, then (on CUDA) the allocator's cache
    emptied, so the next stage (or another process) finds the memory free."""
    gc.collect()
    if torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# what sampling costs, before a GPU is rented (train.py --dry_run prints it)


def _t5_config(cfg):
    """The T5's config.json where one can be read without weights (a local folder), else T5 v1.1 XXL's, IF's."""
    from transformers import T5Config

    from t5cache import default_text_encoder

    try:
        folder = Path(default_text_encoder(cfg))
    except (FileNotFoundError, ValueError):
        folder = Path("-")
    for candidate in (folder / "text_encoder", folder):
        if (candidate / "config.json").is_file():
            return T5Config.from_pretrained(candidate)
    return T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                    feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)


def estimate(cfg, unet_config: dict) -> dict:
    """Predicted peak of live tensors (bf16) of what sample.py does with this U-Net, on fake tensors: T5 encoding
    text_encoder_batch_size prompts, then one sampler step of cfg.num_images images with guidance at the stage's
    size (stage I: `resolution`; stage II: 4x it), whose FLOPs times the configured steps is the run's."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import T5EncoderModel

    import memory

    stage, dtype, n = stage_of(unet_config), torch.bfloat16, cfg.num_images
    ((w, h),) = parse_resolutions(cfg.resolution)[:1]
    if stage == 2:
        w, h = 4 * w, 4 * h
    steps = (cfg.steps or 100) if stage == 1 else cfg.stage2_steps
    with torch.device("meta"):
        t5 = T5EncoderModel(_t5_config(cfg)).to(dtype).requires_grad_(False)
        unet = UNet(unet_config).to(dtype).requires_grad_(False)
    if cfg.text_encoder_dtype == "int8":
        quant.quantise_(t5)
    if cfg.quantise_base:
        quant.quantise_(unet)
    out = {}
    with FakeTensorMode(), torch.no_grad():
        with memory.LiveBytes() as live:  # the weights are made inside: views of them are not new memory
            memory.materialise(t5)
            ids = torch.zeros(cfg.text_encoder_batch_size, cfg.tokenizer_max_length, dtype=torch.long)
            t5(ids, attention_mask=torch.ones_like(ids))
        out["t5_peak_bytes"] = live.peak
        del t5
        live, flops = memory.LiveBytes(), FlopCounterMode(display=False)
        with live:
            memory.materialise(unet)
            weights = live.now
            emb = torch.zeros(n, cfg.tokenizer_max_length, unet.config["encoder_hid_dim"] or 4096, dtype=dtype)
            low = torch.zeros(n, 3, h // 4, w // 4)
        for counter in (live, flops):  # apart: FlopCounterMode keeps tensors alive a little longer
            with counter:
                if stage == 1:
                    stage1(unet, emb, emb[:1], height=h, width=w, steps=1, generator=torch.Generator())
                else:
                    stage2(unet, low, emb, emb[:1], height=h, width=w, steps=1, generator=torch.Generator())
        out |= {"unet_peak_bytes": live.peak, "unet_weights_bytes": weights, "flops": flops.get_total_flops() * steps,
                "steps": steps, "images": n, "size": [w, h], "stage": stage}
    return out


# ---------------------------------------------------------------------------------------------
# command line


def _slug(text: str, n: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].rstrip("-") or "prompt"


def read_prompts(cfg) -> list[str]:
    prompts = [cfg.prompt] if cfg.prompt else []
    if cfg.prompts_file:
        prompts += [line.strip() for line in Path(cfg.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts: pass --prompt='...' and/or --prompts_file=FILE (one prompt per line)")
    return prompts


STRENGTH = {"img2img": 0.7, "inpainting": 1.0, "stage2": 0.8}  # the pipelines' defaults; stage II: both modes


def check_picture_options(cfg) -> None:
    """Refuse picture options that cannot work together, before minutes of loading T5 and U-Nets."""
    if cfg.image is None:
        given = [k for k in ("mask", "strength", "stage2_strength") if getattr(cfg, k) is not None]
        if given or cfg.upscale_only:
            raise ValueError(f"{', '.join(given + ['upscale_only'] * cfg.upscale_only)}: needs a picture, pass "
                             f"--image=PATH too")
        return
    if cfg.stage2 is None and (cfg.stage2_strength is not None or (cfg.upscale_only and cfg.stage3 is None)):
        what = "stage2_strength" if cfg.stage2_strength is not None else "upscale_only"
        raise ValueError(f"{what} is for stage II: pass --stage2=ID_OR_PATH (e.g. DeepFloyd/IF-II-L-v1.0)")
    if cfg.upscale_only and cfg.stage2 is None and cfg.mask is not None:
        raise ValueError("mask: upscale_only without stage2 runs stage III alone, which upscales but does not "
                         "inpaint: pass --stage2=ID_OR_PATH to inpaint at stage II (then stage III), or drop --mask")
    for key, instead in (("strength", "stage2_strength"), ("lora", "stage2_lora")):
        if cfg.upscale_only and getattr(cfg, key) is not None:
            raise ValueError(f"{key} is stage I's, but upscale_only skips stage I: use {instead}")
    for key in ("strength", "stage2_strength"):
        if getattr(cfg, key) is not None and not 0 < getattr(cfg, key) <= 1:
            raise ValueError(f"{key}={getattr(cfg, key)} must be in (0, 1]: the share of the steps run from the noised "
                             f"picture (small: close to it; 1: from almost pure noise)")
    h, w = prepare_image(cfg.image).shape[-2:]  # it exists, is not too big, is not transparent
    _check_same_size(cfg.image, cfg.mask)
    if cfg.upscale_only:
        ups = [name for name, given in (("stage II", cfg.stage2), ("stage III", cfg.stage3)) if given is not None]
        factor = 4 ** len(ups)  # per side
        limit = MAX_UPSCALE_PIXELS * 16 // factor**2  # the output at most ~1024x1024
        if w * h > limit:
            side = round(limit**0.5)
            raise ValueError(f"upscale_only: the image is {w}x{h} and {' then '.join(ups)} make{'s' * (factor == 4)} "
                             f"{factor}x each side; pictures above {limit} pixels ({side}x{side}, from "
                             f"sample.MAX_UPSCALE_PIXELS) are refused: downscale it first, or drop --upscale_only to "
                             f"start at stage I's size")


def check_stage_options(cfg) -> dict | None:
    """Refuse stage III options that cannot work, and weights given as the wrong stage (read from their
    unet/config.json alone), before anything loads. -> the stage III U-Net's config, or None without stage III."""
    if cfg.stage3 is None:
        if cfg.stage3_lora is not None:
            raise ValueError("stage3_lora is for stage III: pass --stage3=ID_OR_PATH (e.g. "
                             "stabilityai/stable-diffusion-x4-upscaler)")
    else:
        if cfg.stage2 is None and not cfg.upscale_only:
            raise ValueError("stage3 upscales stage II's images: pass --stage2=ID_OR_PATH too (e.g. "
                             "DeepFloyd/IF-II-L-v1.0), or --upscale_only --image=PATH for stage III alone on a picture")
        if not 0 <= cfg.stage3_noise_level <= upscaler.MAX_NOISE_LEVEL:
            raise ValueError(f"stage3_noise_level={cfg.stage3_noise_level} must be in [0, {upscaler.MAX_NOISE_LEVEL}]: "
                             f"the x4 upscaler was trained on those levels (IF's documentation uses "
                             f"{upscaler.NOISE_LEVEL})")
        if cfg.stage3_steps < 1:
            raise ValueError(f"stage3_steps={cfg.stage3_steps} must be at least 1")
    for path, stage in ((None if cfg.upscale_only else cfg.weights, 1), (cfg.stage2, 2)):
        if path is not None:
            _refuse_x4(path, stage)
    if cfg.stage3 is None:
        return None
    c = _refuse_if(cfg.stage3)
    if c is None:
        raise FileNotFoundError(f"stage3={cfg.stage3}: no unet/config.json there; give the x4 upscaler's diffusers "
                                "folder or Hub id (stabilityai/stable-diffusion-x4-upscaler)")
    return c


def add_picture(cfg, kw1: dict, kw2: dict, unet2, multiple: int = 1):
    """The picture (and mask), prepared for each stage that runs, added to its keyword arguments. Stage I: resized
    so its short side is `resolution` ('S', as the pipelines resize to 64) or to exactly 'WxH'; stage II (the
    cascade): to 4x stage I's size. upscale_only: the picture, as it is, is stage II's low-res input and the output
    is 4x its size (each side to the nearest multiple of the U-Net's, and of `multiple`: stage III's when it
    follows); it also starts from it, upscaled (bicubic), given a mask or stage2_strength, else stage II samples from
    noise. Without stage II (unet2 None) stage III alone takes the picture, each side resized to the nearest
    multiple of `multiple`. -> upscale_only's low-res input, or None."""
    mask = cfg.mask
    s2 = STRENGTH["stage2"] if cfg.stage2_strength is None else cfg.stage2_strength
    if cfg.upscale_only:
        low = prepare_image(cfg.image)  # [1, 3, h, w]
        f, (h, w) = max(multiple, 1 if unet2 is None else unet2.downsample_factor), low.shape[-2:]
        if unet2 is None:  # stage III alone (a picture already of that size is taken exactly as it is)
            return prepare_image(cfg.image, tuple(max(f, (s + f // 2) // f * f) for s in (w, h)))
        H, W = (max(f, (4 * s + f // 2) // f * f) for s in (h, w))
        kw2.update(height=H, width=W)
        if mask is not None or cfg.stage2_strength is not None:
            kw2.update(image=prepare_image(cfg.image, (W, H)), strength=s2,
                       mask=None if mask is None else prepare_image(mask, (W, H), mask=True))
        return low
    ((w1, h1),) = parse_resolutions(cfg.resolution)
    size = (w1, h1) if "x" in str(cfg.resolution).lower() else w1
    image = prepare_image(cfg.image, size)
    H, W = image.shape[-2:]
    s1 = (STRENGTH["inpainting" if mask else "img2img"]) if cfg.strength is None else cfg.strength
    kw1.update(height=H, width=W, image=image, strength=s1,
               mask=None if mask is None else prepare_image(mask, size, mask=True))
    kw2.update(height=4 * H, width=4 * W, image=prepare_image(cfg.image, (4 * W, 4 * H)), strength=s2,
               mask=None if mask is None else prepare_image(mask, (4 * W, 4 * H), mask=True))
    return None


def _says(stage: int, weights, kw: dict) -> str:
    if kw.get("image") is None:
        what = ""
    else:
        what = f" {'inpainting' if kw.get('mask') is not None else 'img2img'} strength={kw['strength']}"
    v = " prediction_type=v_prediction" if kw.get("prediction_type") == "v_prediction" else ""
    return f"stage {ROMAN[stage]} {weights} {kw['width']}x{kw['height']}{what} variance={kw['variance']}{v}"


def run_stage3(cfg, lows: list[torch.Tensor], prompts: list[str], generator, device, dtype) -> list[torch.Tensor]:
    """Stage III on each prompt's images, lows[p] [n, 3, h, w] in [-1, 1] -> [n, 3, 4h, 4w] in [-1, 1], prompt after
    prompt with one generator. CLIP encodes the prompts and the negative prompt once and is freed before the
    first step; the upscaler is freed at the end."""
    up = load_upscaler(cfg.stage3, dtype=dtype, device=device, variant=cfg.variant, lora=cfg.stage3_lora,
                       attention=cfg.attention_mechanism)
    text, neg = up.encode(prompts), up.encode([cfg.negative_prompt])  # [P, 77, D], [1, 77, D]
    up.free_text_encoder()
    kw = dict(steps=cfg.stage3_steps, guidance=cfg.stage3_guidance, noise_level=cfg.stage3_noise_level)
    out = [upscaler.stage3(up, low, text[p:p + 1], negative_prompt=neg, generator=generator, progress=True, **kw)
           for p, low in enumerate(lows)]  # [n, 3, 4h, 4w] in [0, 1]
    out = [x * 2 - 1 for x in out]  # in [-1, 1], as the other stages give
    del up
    free_memory(device)
    return out


def main(cfg) -> dict:
    """Prompts -> T5 embeddings (through the text cache training uses) -> stage I (-> stage II (-> stage III)) ->
    PNGs. One generator on the sampling device, seeded once with cfg.seed, draws for prompt after prompt
    (cfg.num_images each), so image i of a run is reproduced by the same prompts (in the same order), settings, seed
    and device; stage III draws after stage I and II have made every prompt's images. With an `image` stage I (and
    stage II) start from it (add_picture), or stage II (or stage III alone) upscales it."""
    import t5cache

    prompts = read_prompts(cfg)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch_dtype("auto", device)
    sizes = parse_resolutions(cfg.resolution)
    if len(sizes) != 1:
        raise ValueError(f"resolution={cfg.resolution!r} names {len(sizes)} sizes; sample.py makes one size per run: "
                         "use e.g. '64' or '96x64'")
    ((width, height),) = sizes
    for path in (cfg.lora, cfg.stage2_lora, cfg.stage3_lora):  # fail before minutes of loading T5
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"LoRA file {path} does not exist; give the .safetensors a training run wrote")
    check_picture_options(cfg)
    x4 = check_stage_options(cfg)  # the stage III U-Net's config, or None
    x4_multiple = 2 ** (len((x4 or upscaler.X4_UNET)["block_out_channels"]) - 1)  # its input's sides: multiples
    if_stages = not (cfg.upscale_only and cfg.stage2 is None)  # False: stage III alone upscales the picture

    unet1 = unet2 = None
    kw1, kw2 = {}, {}
    if if_stages:
        # the text exactly as training embeds it (same T5, settings and cache); T5-XXL (~9.5 GB in bf16) is loaded
        # only for prompts not cached yet, and freed before the U-Nets come in
        cache = t5cache.prepare(cfg, [*prompts, cfg.negative_prompt])
        text_emb, neg_emb = cache.get(prompts), cache.get([cfg.negative_prompt])  # [P, L, D], [1, L, D]
        common = dict(dtype=dtype, device=device, variant=cfg.variant, attention=cfg.attention_mechanism)
        if not cfg.upscale_only:
            unet1, kw1 = load_unet(cfg.weights, lora=cfg.lora, stage=1, **common,
                                   quantise=cfg.quantise_base or None)  # None: as the LoRA says
        kw1.update(height=height, width=width, steps=cfg.steps or 100, guidance=cfg.guidance)
        kw1["timesteps"] = cfg.timesteps or kw1.get("timesteps")  # stage I only; stage II samples stage2_steps
        if cfg.stage2:
            unet2, kw2 = load_unet(cfg.stage2, lora=cfg.stage2_lora, stage=2, **common)
        kw2.update(height=4 * height, width=4 * width, steps=cfg.stage2_steps, guidance=cfg.stage2_guidance,
                   noise_level=cfg.noise_level)
        if cfg.variance != "auto":
            kw1["variance"] = kw2["variance"] = cfg.variance
    low_in = add_picture(cfg, kw1, kw2, unet2, x4_multiple if cfg.stage3 else 1) if cfg.image is not None else None
    runs = [(i + 1, w, kw) for i, (u, w, kw) in enumerate(((unet1, cfg.weights, kw1), (unet2, cfg.stage2, kw2)))
            if u is not None]
    says = [_says(*r) for r in runs]
    if cfg.stage3:
        says.append(f"stage III {cfg.stage3} 4x steps={cfg.stage3_steps} guidance={cfg.stage3_guidance} "
                    f"noise_level={cfg.stage3_noise_level}")
    print("sample: " + "; ".join(says) + (f"; upscaling {cfg.image}" if cfg.upscale_only else ""))

    out_dir = Path(cfg.output_dir) / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    n = cfg.num_images
    stems = [[out_dir / f"{p * n + k:03d}_{_slug(prompt)}" for k in range(n)] for p, prompt in enumerate(prompts)]
    paths, paths_low = [], []

    def save(p: int, images: torch.Tensor, final: bool) -> None:  # the last stage's image, the others by their size
        h, w = images.shape[-2:]
        for stem, image in zip(stems[p], to_pil(images)):
            (paths if final else paths_low).append(stem.with_name(
                f"{stem.name}.png" if final else f"{stem.name}_{w if w == h else f'{w}x{h}'}.png"))
            image.save((paths if final else paths_low)[-1])

    results = []  # per prompt: one [n, 3, H, W] tensor in [-1, 1] per stage that ran, in stage order
    for p in range(len(prompts)):
        if not if_stages:
            results.append([])
            continue
        emb = text_emb[p:p + 1].expand(n, -1, -1)  # num_images_per_prompt, as the pipelines repeat
        if cfg.upscale_only:
            results.append([stage2(unet2, low_in.expand(n, -1, -1, -1), emb, neg_emb, generator=generator,
                                   progress=True, **kw2)])
        elif unet2 is None:
            results.append([stage1(unet1, emb, neg_emb, generator=generator, progress=True, **kw1)])
        else:
            results.append(list(cascade(unet1, unet2, emb, neg_emb, stage1_kw=kw1, stage2_kw=kw2,
                                        generator=generator, progress=True)))
        results[-1] = [x.cpu() for x in results[-1]]  # off the device, which the next stage may need
        for i, images in enumerate(results[-1]):  # written now: stage III may run for minutes
            save(p, images, final=i == len(results[-1]) - 1 and not cfg.stage3)
    variance = [kw["variance"] for _, _, kw in runs]
    if cfg.stage3:  # one stage resident at a time: the IF U-Nets go before the upscaler comes
        del unet1, unet2
        free_memory(device)
        # stage III reads stage II's images as saved (8-bit), so the ..._256.png files reproduce its output
        lows = [prepare_image(to_pil(r[-1])) if r else low_in.expand(n, -1, -1, -1) for r in results]
        for p, (r, high) in enumerate(zip(results, run_stage3(cfg, lows, prompts, generator, device, dtype))):
            r.append(high.cpu())
            save(p, high, final=True)

    # the grid: a row per prompt, the picture (and the mask: the picture, grey where repainted) at the samples'
    # size first, then the samples; with stage III each sample at every stage, enlarged (nearest) to the final size
    H, W = results[0][-1].shape[-2:]
    size = (W, H)  # the samples'
    extras = []
    if cfg.image is not None:
        picture = prepare_image(cfg.image, size)
        extras.append(to_pil(picture)[0])
        if cfg.mask is not None:
            extras += to_pil(picture.masked_fill(prepare_image(cfg.mask, size, mask=True), 0))
    every_stage = cfg.stage3 is not None
    cells, labels = [], []
    for prompt, r in zip(prompts, results):
        cells += extras
        labels += ["input", "mask (grey: repainted)"][:len(extras)]
        for k in range(n):
            for x in r if every_stage else r[-1:]:
                cells.append(to_pil(x[k:k + 1])[0].resize(size, Image.NEAREST))
                labels.append(f"{prompt} ({x.shape[-1]}x{x.shape[-2]})" if every_stage else prompt)
    cols = len(cells) // len(prompts)
    grid = out_dir / "grid.png"
    image_grid(cells, labels, cols=cols if cols > 1 else None).save(grid)
    for path in [*paths, *paths_low, grid]:
        print(path)
    return dict(images=paths, images_low=paths_low, grid=grid, variance=variance)


if __name__ == "__main__":
    from config import parse_args

    main(parse_args(usage="usage: python sample.py CONFIG [--prompt='...'] [--key=value ...]"))
