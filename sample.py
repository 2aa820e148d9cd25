"""The IF cascade sampler: prompts -> T5 -> stage I (64 px) -> stage II (256 px) -> PNGs.

    python sample.py CONFIG --prompt="a red circle on a blue background" [--lora=PATH] [--stage2=ID_OR_PATH]

writes {output_dir}/samples/<index>_<slug>.png (stage II's image when the cascade runs, stage I's also as
..._64.png) and a labelled grid.png, and prints their paths. One generator, seeded once, serves the prompts in
order, so image i of a run comes out the same for the same prompts, settings, seed and device. As a library:

    unet1, kw1 = load_unet("DeepFloyd/IF-I-XL-v1.0", lora="out/pytorch_lora_weights.safetensors")
    unet2, kw2 = load_unet("DeepFloyd/IF-II-L-v1.0")
    images64, images256 = cascade(unet1, unet2, text_emb, neg_emb, stage1_kw=kw1, stage2_kw=kw2, generator=g)

Same weights, embeddings and generator give the images diffusers' IFPipeline and IFSuperResolutionPipeline
give (output_type="pt"): the same random draws in the same order (stage I: the initial noise, then one draw
per step inside the step; stage II: the initial noise, then the low-res augmentation noise, then the steps),
classifier-free guidance on the epsilon channels with the batch ordered [negative, positive], and the
sampler step of diffusion.py, which equals diffusers' DDPMScheduler.step.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from config import stage_of, torch_dtype
from data import image_grid, parse_resolutions, to_pil
from diffusion import Schedule, low_res_condition, p_sample_step, randn, scheduler_config, timesteps_for
from lora import load_lora, merge_lora, read_lora_metadata
from model import UNet

# diffusion.scheduler_config(stage) is used when weights come without scheduler/scheduler_config.json;
# DDPM_DEFAULTS are diffusers' DDPMScheduler defaults, which is what a config file that omits a key means.
DDPM_DEFAULTS = dict(variance_type="fixed_small", thresholding=False, dynamic_thresholding_ratio=0.995,
                     sample_max_value=1.0, clip_sample=True, prediction_type="epsilon", beta_schedule="linear",
                     timestep_spacing="leading", steps_offset=0)
ROMAN = {1: "I", 2: "II"}
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


def _denoise(unet, x, text_emb, neg_emb, *, low_res=None, noise_level=None, steps, guidance, variance, thresholding,
             clip_sample, timesteps, generator, progress, desc):
    """The reverse process from x = x_T: one U-Net call per timestep (the CFG pair batched as [negative, positive]),
    then one ancestral step. Stage II also feeds the noised, upsampled low-res image and its noise level."""
    from tqdm.auto import tqdm

    sched, C = Schedule(), x.shape[1]
    ts = timesteps_for(timesteps or "leading", sched.num_train_timesteps, steps)
    ts_on_device = torch.tensor(ts, device=x.device)  # copied once: indexing it per step needs no host sync
    guided = guidance > 1 and neg_emb is not None  # as the pipelines: guidance <= 1 runs the conditional model only
    text_emb = text_emb.to(x.device, unet.dtype)
    if guided:
        neg_emb = neg_emb.to(x.device, unet.dtype).expand_as(text_emb)  # a [1, L, D] negative serves every sample
        text_emb = torch.cat([neg_emb, text_emb])  # (2B, L, D)
    for i in tqdm(range(len(ts)), desc=desc, disable=not progress, leave=False):
        inp = x if low_res is None else torch.cat([x, low_res], dim=1)  # stage II: (B, 6, H, W), sample first
        out = unet(torch.cat([inp, inp]) if guided else inp, ts_on_device[i], text_emb, noise_level)  # (B|2B, ...)
        if guided:  # Ho & Salimans 2022 eq. 6 on epsilon; the variance channels come from the conditional half
            uncond, cond = out.chunk(2)  # (B, 2C, H, W) each, or (B, C, H, W) from an eps-only U-Net: no variance
            eps_u, eps_c = uncond[:, :C], cond[:, :C]
            out = torch.cat([eps_u + guidance * (eps_c - eps_u), cond[:, C:]], dim=1)
        prev_t = ts[i + 1] if i + 1 < len(ts) else -1
        x = p_sample_step(sched, out, ts[i], prev_t, x, variance=variance, thresholding=thresholding,
                          clip_sample=clip_sample, generator=generator)
    return x


@torch.no_grad()
def stage1(unet, text_emb, neg_emb, *, height=64, width=64, steps=100, guidance=7.0, variance="learned_range",
           thresholding=(0.95, 1.5), clip_sample=True, timesteps=None, generator=None, progress=False) -> torch.Tensor:
    """Text to image: text_emb [B, L, 4096] (neg_emb [B or 1, L, 4096], or None for no guidance) -> [B, 3, H, W] in
    [-1, 1]. `timesteps`: "leading" (None, diffusers' IF default) or "trailing" with `steps`, an IF respacing
    ("smart100", ...) or a descending list, then `steps` is unused. `thresholding=(ratio, max)` is dynamic
    thresholding (Imagen sec. 2.3); None clips x_0 to [-1, 1] (if clip_sample). The sample is kept in the U-Net's
    dtype, as the pipeline keeps it."""
    _check_stage(unet, 1)
    _check_size(unet, height, width, 1)
    x = randn((text_emb.shape[0], 3, height, width), generator, unet.device, unet.dtype)  # x_T
    return _denoise(unet, x, text_emb, neg_emb, steps=steps, guidance=guidance, variance=variance,
                    thresholding=thresholding, clip_sample=clip_sample, timesteps=timesteps, generator=generator,
                    progress=progress, desc="stage I")


@torch.no_grad()
def stage2(unet, low_res, text_emb, neg_emb, *, height=256, width=256, steps=50, guidance=4.0, noise_level=NOISE_LEVEL,
           variance="learned_range", thresholding=(0.95, 1.0), clip_sample=True, timesteps=None, generator=None,
           progress=False) -> torch.Tensor:
    """Super-resolution: low_res [B, 3, h, w] in [-1, 1] -> [B, 3, height, width] in [-1, 1]. The low-res image is
    upsampled (bilinear, align_corners=True), noised to `noise_level` on the cosine schedule (noise augmentation,
    Ho et al. 2021 "Cascaded Diffusion Models" sec. 3.2; the U-Net gets the level as its class label) and
    concatenated after the sample. text_emb may hold one row for all images. Other arguments as in stage1."""
    _check_stage(unet, 2)
    _check_size(unet, height, width, 2)
    B, device, dtype = low_res.shape[0], unet.device, unet.dtype
    x = randn((B, 3, height, width), generator, device, dtype)  # x_T, drawn before the augmentation noise
    level = torch.full((), noise_level, device=device, dtype=torch.long)  # broadcasts over the batch (and CFG pair)
    noise = randn((B, low_res.shape[1], height, width), generator, device, dtype)
    up = low_res_condition(Schedule(), low_res.to(device, dtype), (height, width), noise, level)  # (B, 3, H, W)
    return _denoise(unet, x, text_emb.expand(B, -1, -1), neg_emb, low_res=up, noise_level=level, steps=steps,
                    guidance=guidance, variance=variance, thresholding=thresholding, clip_sample=clip_sample,
                    timesteps=timesteps, generator=generator, progress=progress, desc="stage II")


def cascade(unet1, unet2, text_emb, neg_emb, *, stage1_kw=None, stage2_kw=None, generator=None, progress=False):
    """IF's text-to-image cascade: stage I at its size, then stage II at 4x that size (unless stage2_kw says
    otherwise) on stage I's output. The kw dicts are load_unet's defaults plus any overrides. -> (low, high)."""
    images64 = stage1(unet1, text_emb, neg_emb, generator=generator, progress=progress, **(stage1_kw or {}))
    h, w = images64.shape[-2:]
    stage2_kw = {"height": 4 * h, "width": 4 * w, **(stage2_kw or {})}
    images256 = stage2(unet2, images64, text_emb, neg_emb, generator=generator, progress=progress, **stage2_kw)
    return images64, images256


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
        root = p.parent if (p / "config.json").is_file() else p  # a bare unet folder: look beside it
        f = root / "scheduler" / "scheduler_config.json"
        return json.loads(f.read_text()) if f.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(str(path_or_id), "scheduler_config.json", subfolder="scheduler"))
                          .read_text())
    except Exception:  # a repo without one (or offline and not cached): IF's own settings then
        return None


def load_unet(path_or_id, *, dtype=None, device=None, variant=None, lora=None, attention="sdpa", stage=None):
    """A U-Net for sampling, and its sampler settings {variance, thresholding, clip_sample, timesteps} (from the
    scheduler config beside it, else IF's; variance by auto_variance) to pass on to stage1/stage2/cascade.
    dtype: config.torch_dtype's "auto" (bf16 on GPUs with it, else fp32). A LoRA (and the biases a bitfit run
    saved with it) is loaded and merged into the weights (no extra cost per step).
    `stage` (1 or 2) refuses weights of the other stage."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch_dtype(dtype, device)
    if lora is not None and not Path(lora).is_file():
        raise FileNotFoundError(f"LoRA file {lora} does not exist; give the .safetensors a training run wrote "
                                f"(e.g. output/pytorch_lora_weights.safetensors)")
    unet = UNet.from_pretrained(path_or_id, subfolder="unet", dtype=dtype, variant=variant, device=device)
    unet_stage = stage_of(unet.config)
    if stage is not None:
        _check_stage(unet, stage, str(path_or_id))
    found = read_scheduler_config(path_or_id)
    # no config: IF's own for this stage; a config that omits a key means diffusers' default
    s = {**DDPM_DEFAULTS, **(found if found is not None else scheduler_config(unet_stage))}
    if (s["prediction_type"], s["beta_schedule"], s["steps_offset"]) != ("epsilon", "squaredcos_cap_v2", 0):
        raise ValueError(f"{path_or_id}: scheduler config has prediction_type={s['prediction_type']!r}, beta_schedule="
                         f"{s['beta_schedule']!r}, steps_offset={s['steps_offset']}; this sampler is IF's: epsilon, "
                         f"squaredcos_cap_v2, 0")
    meta = None
    if lora is not None:
        try:
            load_lora(unet, lora)
        except ValueError as e:
            raise ValueError(f"LoRA {lora} does not fit the stage {ROMAN[unet_stage]} U-Net of {path_or_id} (a LoRA "
                             f"for another IF model or stage?):\n{e}") from None
        meta = read_lora_metadata(lora)
        merge_lora(unet)
    unet.set_attention_backend(attention)
    thresholding = (s["dynamic_thresholding_ratio"], s["sample_max_value"]) if s["thresholding"] else None
    return unet, dict(variance=auto_variance(meta, found), thresholding=thresholding, clip_sample=s["clip_sample"],
                      timesteps=s["timestep_spacing"])


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
        t5 = T5EncoderModel(_t5_config(cfg)).to(dtype)
        unet = UNet(unet_config).to(dtype)
    out = {}
    with FakeTensorMode(), torch.no_grad():
        with memory.LiveBytes() as live:
            memory.materialise(t5)
            ids = torch.zeros(cfg.text_encoder_batch_size, cfg.tokenizer_max_length, dtype=torch.long)
            t5(ids, attention_mask=torch.ones_like(ids))
        out["t5_peak_bytes"] = live.peak
        del t5
        memory.materialise(unet)
        emb = torch.zeros(n, cfg.tokenizer_max_length, unet.config["encoder_hid_dim"] or 4096, dtype=dtype)
        low = torch.zeros(n, 3, h // 4, w // 4)
        live, flops = memory.LiveBytes(), FlopCounterMode(display=False)
        for counter in (live, flops):  # apart: FlopCounterMode keeps tensors alive a little longer
            with counter:
                if stage == 1:
                    stage1(unet, emb, emb[:1], height=h, width=w, steps=1, generator=torch.Generator())
                else:
                    stage2(unet, low, emb, emb[:1], height=h, width=w, steps=1, generator=torch.Generator())
        live.peak += sum(t.untyped_storage().nbytes() for t in [*unet.parameters(), *unet.buffers(), emb, low])
        out |= {"unet_peak_bytes": live.peak, "flops": flops.get_total_flops() * steps, "steps": steps,
                "images": n, "size": [w, h], "stage": stage}
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


def main(cfg) -> dict:
    """Prompts -> T5 embeddings (through the text cache training uses) -> stage I (-> stage II) -> PNGs. One
    generator on the sampling device, seeded once with cfg.seed, draws for prompt after prompt (cfg.num_images
    each), so image i of a run is reproduced by the same prompts (in the same order), settings, seed and device."""
    import t5cache

    prompts = read_prompts(cfg)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch_dtype("auto", device)
    sizes = parse_resolutions(cfg.resolution)
    if len(sizes) != 1:
        raise ValueError(f"resolution={cfg.resolution!r} names {len(sizes)} sizes; sample.py makes one size per run: "
                         "use e.g. '64' or '96x64'")
    ((width, height),) = sizes
    for path in (cfg.lora, cfg.stage2_lora):  # fail before minutes of loading T5
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"LoRA file {path} does not exist; give the .safetensors a training run wrote")

    # the text exactly as training embeds it (same T5, settings and cache); T5-XXL (~9.5 GB in bf16) is loaded only
    # for prompts not cached yet, and freed before the U-Nets come in
    cache = t5cache.prepare(cfg, [*prompts, cfg.negative_prompt])
    text_emb, neg_emb = cache.get(prompts), cache.get([cfg.negative_prompt])  # [P, L, D], [1, L, D]

    common = dict(dtype=dtype, device=device, variant=cfg.variant, attention=cfg.attention_mechanism)
    unet1, kw1 = load_unet(cfg.weights, lora=cfg.lora, stage=1, **common)
    kw1.update(height=height, width=width, steps=cfg.steps or 100, guidance=cfg.guidance)
    kw1["timesteps"] = cfg.timesteps or kw1["timesteps"]  # stage I only; stage II samples stage2_steps
    unet2, kw2 = load_unet(cfg.stage2, lora=cfg.stage2_lora, stage=2, **common) if cfg.stage2 else (None, {})
    kw2.update(steps=cfg.stage2_steps, guidance=cfg.stage2_guidance, noise_level=cfg.noise_level)
    if cfg.variance != "auto":
        kw1["variance"] = kw2["variance"] = cfg.variance
    print(f"sample: stage I {cfg.weights} {width}x{height} variance={kw1['variance']}"
          + (f"; stage II {cfg.stage2} {4 * width}x{4 * height} variance={kw2['variance']}" if unet2 else ""))

    out_dir = Path(cfg.output_dir) / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    paths, paths_low, finals, labels = [], [], [], []
    for p, prompt in enumerate(prompts):
        emb = text_emb[p:p + 1].expand(cfg.num_images, -1, -1)  # num_images_per_prompt, as the pipelines repeat
        if unet2 is None:
            low, final = None, stage1(unet1, emb, neg_emb, generator=generator, progress=True, **kw1)
        else:
            low, final = cascade(unet1, unet2, emb, neg_emb, stage1_kw=kw1, stage2_kw=kw2, generator=generator,
                                 progress=True)
        for k, image in enumerate(to_pil(final)):
            stem = out_dir / f"{p * cfg.num_images + k:03d}_{_slug(prompt)}"
            paths.append(stem.with_name(stem.name + ".png"))
            image.save(paths[-1])
            if low is not None:
                paths_low.append(stem.with_name(f"{stem.name}_{width if width == height else f'{width}x{height}'}.png"))
                to_pil(low[k:k + 1])[0].save(paths_low[-1])
        finals += to_pil(final)
        labels += [prompt] * cfg.num_images
    grid = out_dir / "grid.png"
    image_grid(finals, labels, cols=cfg.num_images if cfg.num_images > 1 else None).save(grid)
    for path in [*paths, *paths_low, grid]:
        print(path)
    return dict(images=paths, images_low=paths_low, grid=grid,
                variance=[kw1["variance"]] + ([kw2["variance"]] if unet2 else []))


if __name__ == "__main__":
    from config import parse_args

    main(parse_args(usage="usage: python sample.py CONFIG [--prompt='...'] [--key=value ...]"))
