"""Validation during training: grids with fixed prompts, sizes, held-out pictures and seeds (comparable across
steps; stage I samples the validation prompts, stage II upscales held-out pictures beside their low-res input and
original), and the held-out loss at fixed timesteps and noise. train.py calls check_validation before training
and evaluate every validation_steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

import data
import diffusion
import sample
from config import Config
from model import UNet

if TYPE_CHECKING:
    from train import Run


def validation_sizes(cfg: Config, loader) -> list[tuple[int, int]]:
    """(width, height) of the validation images: validation_resolution, else the first dataset's resolution."""
    return data.parse_resolutions(cfg.validation_resolution or loader.datasets[0]["resolution"])


def check_validation(cfg: Config, unet: UNet, loader) -> None:
    """Refuse, before training starts, validation settings that the run's stage cannot honour."""
    if cfg.stage == 2 and cfg.validation_prompts:
        raise ValueError("validation_prompts are stage I's (text to image); stage II validation upscales num_eval_"
                         "images held-out dataset images, with their own captions. Set validation_prompts=[]")
    if cfg.stage == 1 and cfg.validation_noise_level is not None:
        raise ValueError("validation_noise_level is stage II's (the low-res input's augmentation); unset it")
    f = unet.downsample_factor if cfg.stage == 1 else max(unet.downsample_factor, 4)  # stage II: low-res is 1/4
    for w, h in validation_sizes(cfg, loader) if cfg.validation_steps else []:
        if w % f or h % f:
            raise ValueError(f"validation_resolution {w}x{h}: both sides must be multiples of {f} for this U-Net")


@torch.no_grad()
def validate(r: Run, tag: str = "", beside: Path | None = None) -> Path:
    """Stage I: each validation prompt at each validation size; stage II: each of the first num_eval_images
    held-out images (low-res | upscaled | original) at each size. The same seed for every image. `tag` names the
    weights in the labels (ema); `beside`: an earlier grid of this step, which the new one is put to the right
    of, with the same seeds (the comparison of raw and EMA weights)."""
    cfg, unet, device, dtype = r.cfg, r.unet, r.device, r.dtype
    unet.eval()
    variance = diffusion.sampler_variance(cfg.loss_type, unet.config["out_channels"])
    kw = {} if cfg.validation_guidance is None else {"guidance": cfg.validation_guidance}  # None: the stage's own
    kw["prediction_type"] = cfg.prediction_type
    neg = r.cache.get([cfg.validation_negative_prompt]).to(device, dtype)
    gen = torch.Generator(device).manual_seed(cfg.validation_seed)
    sizes, images, labels = validation_sizes(cfg, r.loader), [], []
    if cfg.stage == 1:
        for prompt in cfg.validation_prompts:
            for w, h in sizes:
                gen.manual_seed(cfg.validation_seed)  # the same noise for every prompt: the prompt alone differs
                x = sample.stage1(unet, r.cache.get([prompt]).to(device, dtype), neg, height=h, width=w,
                                  steps=cfg.validation_num_inference_steps, variance=variance, generator=gen, **kw)
                images += data.to_pil(x)
                labels.append(f"{tag + ': ' if tag else ''}{prompt} ({w}x{h})")
    else:
        if cfg.validation_noise_level is not None:
            kw["noise_level"] = cfg.validation_noise_level
        for i in r.loader.eval_order[: cfg.num_eval_images]:
            for w, h in sizes:
                item = r.loader.items[r.loader.eval_request(i, (w, h))]
                gen.manual_seed(cfg.validation_seed)
                x = sample.stage2(unet, item["low_res"][None].to(device, dtype),
                                  r.cache.get([item["caption"]]).to(device, dtype), neg, height=h, width=w,
                                  steps=cfg.validation_num_inference_steps, variance=variance, generator=gen, **kw)
                up = F.interpolate(item["low_res"][None].float(), size=(h, w), mode="nearest")
                images += data.to_pil(torch.cat([up, x.float().cpu(), item["pixels"][None].float()]))
                seen = "held out" if i in r.loader.held_out else "a training image"
                labels += [f"low-res ({seen}): {item['caption']}", f"{tag + ' ' if tag else ''}upscaled {w}x{h}",
                           "original"]
    path = r.out / "samples" / f"step-{r.step:06d}.png"
    if r.rank == 0:  # (sharded, every rank made the same grid)
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        grid = data.image_grid(images, labels, cols=len(sizes) if cfg.stage == 1 else 3)
        if beside is not None:
            left = Image.open(beside)
            both = Image.new("RGB", (left.width + grid.width, max(left.height, grid.height)), "white")
            both.paste(left), both.paste(grid, (left.width, 0))
            grid = both
        grid.save(path)
    unet.train()
    return path


@torch.no_grad()
def eval_loss(unet, items: list[dict], cache, sched, cfg: Config, device, dtype) -> float:
    """Loss on the held-out images at fixed, evenly spread timesteps and fixed noise: a low-variance measure of
    progress on pictures the run never trains on."""
    unet.eval()
    gen, losses = torch.Generator(device).manual_seed(1234), []
    level = sample.NOISE_LEVEL if cfg.validation_noise_level is None else cfg.validation_noise_level
    for i, item in enumerate(items):
        x0 = item["pixels"][None].to(device, torch.float32)
        t = torch.tensor([int((i + 0.5) * sched.num_train_timesteps / len(items))], device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        x_t = diffusion.q_sample(sched, x0, noise, t)
        x_in, levels = x_t, None
        if cfg.stage == 2:
            levels, aug = torch.full_like(t, level), torch.randn(x0.shape, generator=gen, device=device)
            low = item["low_res"][None].to(device, torch.float32)
            x_in = torch.cat([x_t, diffusion.low_res_condition(sched, low, x0.shape[-2:], aug, levels)], 1)
        out = unet(x_in.to(dtype), t, cache.get([item["caption"]]).to(device, dtype), noise_level=levels)
        options = diffusion.loss_options(cfg, weighted=False)
        losses.append(diffusion.training_losses(sched, out, x0, x_t, t, noise, **options).item())
    unet.train()
    return sum(losses) / max(1, len(losses))


def evaluate(r: Run, grids: bool = True) -> None:
    """The held-out loss, then (with `grids`) the validation grid: on rank 0, or sharded on every rank (each
    forward gathers the weights from all of them), rank 0 writing."""
    if r.cfg.validation_loss_images:
        value = eval_loss(r.unet, r.eval_items, r.cache, r.sched, r.cfg, r.device, r.dtype)
        if r.metrics is not None:
            r.metrics.write({"step": r.step, "eval_loss": value})
    if grids and (r.cfg.validation_prompts or r.cfg.stage == 2):
        mode = r.cfg.ema_validation if r.ema is not None else "none"
        path = validate(r) if mode != "ema_only" else None
        if mode != "none":
            r.opt.swap_weights(r.ema)  # the EMA weights in place of the raw ones, then back (bit for bit)
            try:
                path = validate(r, "ema" if mode == "comparison" else "", beside=path)
            finally:
                r.opt.swap_weights(r.ema)
        if r.metrics is not None:
            r.metrics.image(path, r.step)
