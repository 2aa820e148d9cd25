"""What DreamBooth and SimpleTuner users bring against overfitting and language drift, beside train.py's loop.

Prior preservation (DreamBooth; Ruiz et al. 2023, eq. 2): images of the subject's class, drawn by the base model
before training (make_class_images), train in every step beside the instance images, their loss weighted by
prior_loss_weight, so the model keeps what "a dog" looked like while it learns "a sks dog". Regularisation data
(SimpleTuner's "parent-teacher"): samples of a dataset marked is_regularisation_data train towards the base
model's own prediction, the LoRA switched off (base_prediction), not towards the noise. train.train_step holds
the losses; this file what feeds them.
"""

from __future__ import annotations

import itertools
import os
import zlib
from pathlib import Path

import torch

import data
import lora
import parallel
import sample
from config import Config
from model import UNet


def regularised(cfg: Config) -> bool:
    """Whether a dataset of cfg is_regularisation_data (read from the config alone)."""
    return bool(cfg.datasets) and any(ds["is_regularisation_data"] for ds in data.load_datasets(cfg, need_images=False))


def check_options(cfg: Config) -> None:
    """Refuse prior preservation without what it needs, and regularisation data where the base model's prediction
    cannot be had by switching an adapter off."""
    if cfg.with_prior_preservation:
        if not cfg.class_data_dir or not cfg.class_prompt:
            raise ValueError("with_prior_preservation needs class_data_dir (the folder that holds, or will hold, the "
                             "class images) and class_prompt (their caption, e.g. 'a photo of a dog')")
        if cfg.num_class_images < 1 or cfg.sample_batch_size < 1:
            raise ValueError("num_class_images and sample_batch_size must be at least 1")
        if cfg.fused_backward:
            raise ValueError("fused_backward steps each weight as soon as its gradient is complete, and prior "
                             "preservation backpropagates the instance and the class batch one after the other (their "
                             "buckets may differ): turn fused_backward or with_prior_preservation off")
    if not regularised(cfg):
        return
    if cfg.model_type == "full" and not cfg.use_bitfit:
        raise ValueError("is_regularisation_data trains towards the base model's own prediction; a full fine-tune "
                         "changes the base itself, so it would need a frozen copy of the whole U-Net beside the "
                         "trained one (its weights again: 2 bytes a parameter in bf16, 8.6 GB more for IF-I-XL). Use "
                         "model_type='lora' (the base is the LoRA switched off), or drop is_regularisation_data")
    if cfg.use_bitfit:
        raise ValueError("is_regularisation_data asks the base model by switching the LoRA off, and bitfit's trained "
                         "biases cannot be switched off: set use_bitfit=False, or drop is_regularisation_data")


def make_class_images(cfg: Config, unet: UNet, cache, device, dtype, rank: int, group, sharded: bool) -> int:
    """Prior preservation's class images: stage I draws what class_data_dir lacks of num_class_images with the base
    model (the U-Net as set up, before training or a resume, its LoRA switched off), sample_batch_size at a time,
    each saved as it is made (class-NNNNN.png + .txt holding class_prompt), so an interrupted run draws only the rest.
    Rank 0 draws (sharded, every rank runs the forwards and rank 0 writes) while the others wait. Stage II cannot
    draw (it upscales stage I's pictures): its class images must be in the folder. Returns how many were drawn."""
    from tqdm import tqdm

    folder = Path(cfg.class_data_dir)
    have = len(data.list_images({"instance_data_dir": folder})) if folder.is_dir() else 0
    missing = max(0, cfg.num_class_images - have)
    if missing and cfg.stage == 2:
        raise ValueError(f"class_data_dir {folder} holds {have} images and num_class_images={cfg.num_class_images}; "
                         f"stage II cannot draw class images itself (it upscales stage I's). Put {missing} more images "
                         f"of {cfg.class_prompt!r} there, at least {data.class_dataset(cfg)['resolution']} px (e.g. "
                         "sample.py with --stage2 on the class prompt), or lower num_class_images")
    parallel.wait_for_rank0(group, cfg, "every rank to count the class images")  # before rank 0 adds any
    if missing and (rank == 0 or sharded):
        ds = data.class_dataset(cfg)
        w, h = data.bucket_size(1.0, ds["resolution"], ds["resolution_type"], data.BUCKET_MULTIPLE[1])
        text = cache.get([cfg.class_prompt]).to(device, dtype)
        neg = cache.get([cfg.validation_negative_prompt]).to(device, dtype)
        kw = {} if cfg.validation_guidance is None else {"guidance": cfg.validation_guidance}
        kw |= sample.sampler_of(unet, None if cfg.unet_config else cfg.weights)  # as the base itself samples
        folder.mkdir(parents=True, exist_ok=True)
        if cfg.model_type == "lora":
            lora.set_lora_scale(unet, 0.0)
        unet.eval()
        names = (folder / f"class-{i:05d}" for i in itertools.count() if not (folder / f"class-{i:05d}.png").exists())
        try:
            for done in tqdm(range(0, missing, cfg.sample_batch_size), desc="class images", disable=rank != 0):
                n = min(cfg.sample_batch_size, missing - done)  # seeded by its first image's number: reproducible
                gen = torch.Generator(device).manual_seed(zlib.crc32(f"{cfg.seed}:class:{have + done}".encode()))
                x = sample.stage1(unet, text.expand(n, -1, -1), neg, height=h, width=w,
                                  steps=cfg.validation_num_inference_steps, generator=gen, **kw)
                for image in data.to_pil(x) if rank == 0 else ():
                    name = next(names)
                    name.with_suffix(".txt").write_text(cfg.class_prompt + "\n")  # the caption first: then the PNG
                    image.save(name.with_suffix(".png.tmp"), format="PNG")  # whole or not at all, so a count is right
                    os.replace(name.with_suffix(".png.tmp"), name.with_suffix(".png"))
        finally:
            unet.train()
            if cfg.model_type == "lora":
                lora.set_lora_scale(unet, 1.0)
        del x
        sample.free_memory(device)
    parallel.wait_for_rank0(group, cfg, f"the {missing} class images rank 0 draws")
    return missing


@torch.no_grad()
def base_prediction(unet: UNet, x_in, t, text, level) -> torch.Tensor:
    """The base model's own output for these inputs, regularisation data's target: the U-Net with its LoRA switched
    off (scale 0 skips the adapters, their dropout and DoRA's magnitudes), then switched back on."""
    lora.set_lora_scale(unet, 0.0)
    try:
        return unet(x_in, t, text, noise_level=level)
    finally:
        lora.set_lora_scale(unet, 1.0)


def with_class_batches(batches, class_batches):
    """Prior preservation: each instance batch with a class batch under "class", one drawn for one, so both loaders
    count the same number of batches handed out and a checkpoint's two states agree."""
    for batch in batches:
        yield {**batch, "class": next(class_batches)}
