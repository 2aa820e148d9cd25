"""Fine-tune DeepFloyd IF (stage I or II; LoRA, DoRA, bitfit or full) in one readable pure-bf16 loop.

    python train.py configs/i_m.py --max_train_steps=2000
    torchrun --nproc_per_node=8 train.py configs/i_xl.py        # the same config on 8 GPUs

What it does differently from the popular trainers (see IF_REFERENCE.md, section 5):
- the hybrid loss trains the 3 variance channels too, so the stock `learned_range` sampler stays valid;
- stage II sees the *upsampled, noise-augmented low-res image* (channels 3:6) with its augmentation level as
  the class label, drawn per sample as the original IF trainer did - not the noisy image twice;
- AdamW keeps weights, gradients and moments in bf16 with stochastic rounding (so updates far below bf16's
  resolution still count), with the correct beta1 and bias correction;
- N processes train exactly like one process with N times the batch, and a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import diffusion
import lora
import sample
import t5cache
from config import Config, parse_args
from model import UNet, build

# ---------------------------------------------------------------------------------------------
# the optimizer: AdamW on one flat buffer, bf16 with stochastic rounding


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction: unbiased, E[round(x)] = x.

    bf16 is the top 16 bits of fp32: add uniform noise to the low 16 bits, then truncate them."""
    noise = torch.randint(0, 1 << 16, x.shape, device=x.device, dtype=torch.int32, generator=generator)
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class AdamW:
    """AdamW (Loshchilov & Hutter 2019, Algorithm 2) for parameters that all share one dtype and device.

    The parameters (and their gradients) become views into one flat buffer, so a step is a handful of large
    kernels over chunks of it instead of ~20 small kernels per tensor. The update is computed in fp32; in bf16
    the new weights and moments are written back with stochastic rounding, or, with `fp32_master`, from fp32
    copies kept here."""

    CHUNK = 1 << 25  # elements per kernel launch: bounds the fp32 temporaries to ~0.5 GiB

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, fp32_master=False,
                 generator=None):
        self.params, self.lr, self.betas, self.eps, self.weight_decay = list(params), lr, betas, eps, weight_decay
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"all trainable parameters must share one dtype, got {dtypes}")
        # each parameter keeps its memory layout (channels_last conv weights stay channels_last)
        in_memory_order = [p.detach().as_strided((p.numel(),), (1,)) for p in self.params]
        self.flat = torch.cat(in_memory_order)
        self.grad = torch.zeros_like(self.flat)
        offset = 0
        for p in self.params:  # parameters and gradients become views: backward accumulates into self.grad
            p.data = self.flat.as_strided(p.shape, p.stride(), offset)
            p.grad = self.grad.as_strided(p.shape, p.stride(), offset)
            offset += p.numel()
        self.rounded = self.flat.dtype == torch.bfloat16 and not fp32_master
        self.master = self.flat.float() if self.flat.dtype != torch.float32 and fp32_master else None
        state_dtype = self.flat.dtype if self.rounded else torch.float32
        self.exp_avg = torch.zeros_like(self.flat, dtype=state_dtype)
        self.exp_avg_sq = torch.zeros_like(self.flat, dtype=state_dtype)
        self.step_count, self.generator = 0, generator

    def zero_grad(self) -> None:
        self.grad.zero_()

    def grad_norm(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.grad, dtype=torch.float32)

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        lr = self.lr if lr is None else lr
        (b1, b2), self.step_count = self.betas, self.step_count + 1
        bc1, bc2 = 1 - b1**self.step_count, 1 - b2**self.step_count  # bias corrections
        for i in range(0, self.flat.numel(), self.CHUNK):
            s = slice(i, i + self.CHUNK)
            g = self.grad[s].float()
            m = self.exp_avg[s].float().lerp_(g, 1 - b1)  # m = b1 m + (1 - b1) g
            v = self.exp_avg_sq[s].float().mul_(b2).addcmul_(g, g, value=1 - b2)  # v = b2 v + (1 - b2) g^2
            p = self.master[s] if self.master is not None else self.flat[s].float()
            p.mul_(1 - lr * self.weight_decay)  # decoupled weight decay
            p.addcdiv_(m, (v / bc2).sqrt_().add_(self.eps), value=-lr / bc1)
            for dst, src in ((self.flat[s], p), (self.exp_avg[s], m), (self.exp_avg_sq[s], v)):
                dst.copy_(stochastic_round(src, self.generator) if self.rounded else src)

    def state_dict(self) -> dict:
        state = {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step": torch.tensor(self.step_count)}
        return state | ({"master": self.master} if self.master is not None else {})

    def load_state_dict(self, state: dict) -> None:
        self.exp_avg.copy_(state["exp_avg"]), self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.step_count = int(state["step"])
        if self.master is not None:
            self.master.copy_(state["master"])


@torch.no_grad()
def ema_update(ema: torch.Tensor, flat: torch.Tensor, decay: float, generator=None) -> None:
    """ema <- decay * ema + (1 - decay) * weights; in bf16 with stochastic rounding (the increments are tiny)."""
    for i in range(0, flat.numel(), AdamW.CHUNK):
        s = slice(i, i + AdamW.CHUNK)
        new = ema[s].float().lerp_(flat[s].float(), 1 - decay)
        ema[s].copy_(stochastic_round(new, generator) if ema.dtype == torch.bfloat16 else new)


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up from 0, then the schedule, which for
    linear/cosine/polynomial ends exactly at lr_end on the last step."""
    lr, end, warm, total = cfg.learning_rate, cfg.lr_end, cfg.lr_warmup_steps, cfg.max_train_steps
    if step < warm:
        return lr * (step + 1) / warm
    if cfg.lr_scheduler in ("constant", "constant_with_warmup"):
        return lr
    progress = min(1.0, (step - warm) / max(1, total - 1 - warm))
    if cfg.lr_scheduler == "linear":
        return lr + (end - lr) * progress
    if cfg.lr_scheduler == "cosine":
        return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * progress))
    return end + (lr - end) * (1 - progress) ** cfg.lr_power  # polynomial


# ---------------------------------------------------------------------------------------------
# model, text and the loss


def setup_model(cfg: Config, device, dtype) -> tuple[UNet, list, str]:
    """The U-Net with its trainable parameters. Returns (unet, params, where the base weights came from)."""
    if cfg.unet_config is not None:
        torch.manual_seed(cfg.seed)
        unet, source = build(cfg.unet_config, dtype=dtype, device=device), "random init"
    else:
        unet, source = UNet.from_pretrained(cfg.weights, dtype=dtype, variant=cfg.variant, device=device), cfg.weights
    stage = 2 if unet.config["in_channels"] == 6 else 1
    if stage != cfg.stage:
        raise ValueError(f"{source} is a stage {stage} U-Net but the config trains stage {cfg.stage} "
                         f"(model_flavour={cfg.model_flavour!r}): pick a matching model_flavour or weights")
    unet.set_attention_backend(cfg.attention_mechanism)
    unet.gradient_checkpointing = cfg.gradient_checkpointing
    torch.manual_seed(cfg.seed)  # LoRA's A init
    if cfg.model_type == "lora":
        params = lora.add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets or lora.DEFAULT_TARGETS,
                               cfg.lora_dropout, cfg.use_dora, cfg.lora_init)
        params += lora.mark_bitfit(unet) if cfg.use_bitfit else []
    elif cfg.use_bitfit:
        unet.requires_grad_(False)
        params = lora.mark_bitfit(unet)
    else:
        params = list(unet.parameters())
    unet.train()
    return unet.to(memory_format=torch.channels_last), params, source


def prepare_text_cache(cfg: Config, rank: int) -> t5cache.TextCache:
    """Every caption the run can ask for, encoded once; T5 is loaded only if some are missing, then freed."""
    cache_dir = data.text_cache_dir_from(cfg) or t5cache.default_cache_dir(cfg)
    wanted = data.all_captions(cfg) + cfg.validation_prompts + [cfg.validation_negative_prompt, ""]
    if not Path(cache_dir, "index.json").exists() or t5cache.TextCache(cache_dir).missing(wanted):
        dtype = None if cfg.text_encoder_dtype == "auto" else cfg.text_encoder_dtype
        t5cache.build_cache(wanted, t5cache.default_text_encoder(cfg), cache_dir, max_length=cfg.tokenizer_max_length,
                            batch_size=cfg.text_encoder_batch_size, encoder_dtype=dtype, progress=rank == 0)
    return t5cache.TextCache(cache_dir)


def model_inputs(batch: dict, sched, cfg: Config, gen: torch.Generator, rank: int, world: int, device, dtype):
    """Noise the batch. Randomness is drawn for the *global* batch (all ranks alike) and sliced, so N processes
    see exactly what one process with the whole batch would. Returns x0, noise, t, model input, noise level."""
    x0 = batch["pixels"].to(device, torch.float32)
    B = x0.shape[0]
    mine = slice(rank * B, (rank + 1) * B)
    t = diffusion.sample_timesteps(B * world, sched.num_train_timesteps, gen, cfg.timestep_sampling, device)[mine]
    noise = torch.randn((B * world, *x0.shape[1:]), generator=gen, device=device)[mine]
    x_t = diffusion.q_sample(sched, x0, noise, t)  # fp32
    level, x_in = None, x_t
    if cfg.stage == 2:  # the low-res partner, upsampled and noise-augmented at a per-sample level (the class label)
        lo, hi = cfg.noise_aug_range
        level = torch.randint(lo, hi, (B * world,), generator=gen, device=device)[mine]
        aug = torch.randn((B * world, *x0.shape[1:]), generator=gen, device=device)[mine]
        x_in = torch.cat([x_t, low_res_condition(sched, batch["low_res"], x0.shape[-2:], aug, level)], dim=1)
    return x0, noise, t, x_in.to(dtype).contiguous(memory_format=torch.channels_last), x_t, level


def low_res_condition(sched, low_res: torch.Tensor, size, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Stage II's channels 3:6: the low-res image upsampled (bilinear, align_corners, as IF's pipeline) to `size`
    and noised to `level` with the same schedule (x_level = sqrt(abar) up + sqrt(1 - abar) noise)."""
    up = F.interpolate(low_res.to(noise.device, torch.float32), size=tuple(size), mode="bilinear", align_corners=True)
    return diffusion.q_sample(sched, up, noise, level)


def text_for(captions: list[str], cache, cfg: Config, rnd: random.Random, world: int, rank: int, device, dtype):
    """T5 embeddings; with probability caption_dropout_probability a caption is swapped for "" (keeps CFG)."""
    drops = [rnd.random() < cfg.caption_dropout_probability for _ in range(len(captions) * world)]
    mine = drops[rank * len(captions) : (rank + 1) * len(captions)]
    return cache.get(["" if d else c for c, d in zip(captions, mine)]).to(device, dtype, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# checkpoints: written to a temporary directory, then renamed (a crash never leaves half a checkpoint)


def save_weights(unet: UNet, cfg: Config, directory: Path, source: str) -> None:
    """The trained weights in their final format: a diffusers-loadable LoRA file, or a diffusers unet/ folder."""
    meta = {"variance_trained": str(cfg.loss_type == "hybrid").lower(), "base_model": source,
            "stage": str(cfg.stage)}
    if cfg.model_type == "lora":
        lora.save_lora(unet, directory / "pytorch_lora_weights.safetensors", metadata=meta)
    if cfg.use_bitfit:  # bias updates have no place in a LoRA file: a small file of their own
        from safetensors.torch import save_file

        save_file({n: p.detach().contiguous() for n, p in unet.named_parameters() if n.endswith(".bias")},
                  str(directory / "bitfit_biases.safetensors"), metadata=meta)
    if cfg.model_type == "full" and not cfg.use_bitfit:
        unet.save_pretrained(directory / "unet")
        scheduler = dict(diffusion.IF_SCHEDULER_CONFIG, sample_max_value=1.5 if cfg.stage == 1 else 1.0,
                         variance_type="learned_range" if cfg.loss_type == "hybrid" else "fixed_small")
        (directory / "scheduler").mkdir(exist_ok=True)
        (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))


def save_checkpoint(out: Path, step: int, unet, opt: AdamW, ema, loader, rngs: dict, cfg: Config, source: str,
                    extra: dict) -> Path:
    from safetensors.torch import save_file

    final, tmp = out / f"checkpoint-{step}", out / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(unet, cfg, tmp, source)
    tensors = {f"opt.{k}": v for k, v in opt.state_dict().items()} | {"weights": opt.flat}
    tensors |= {f"rng.{k}": g.get_state() for k, g in rngs.items() if isinstance(g, torch.Generator)}
    tensors |= {"ema": ema} if ema is not None else {}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "training_state.safetensors"))
    state = {"step": step, "data": loader.state_dict(), "python_random": rngs["python"].getstate()} | extra
    (tmp / "training_state.json").write_text(json.dumps(state, default=list))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # atomic: the checkpoint appears whole or not at all
    done = sorted(out.glob("checkpoint-[0-9]*"), key=lambda p: int(p.name.split("-")[1]))
    for old in done[: -cfg.checkpoints_total_limit] if cfg.checkpoints_total_limit else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(cfg: Config) -> Path | None:
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint != "latest":
        path = Path(cfg.resume_from_checkpoint)
        if not (path / "training_state.json").is_file():
            raise FileNotFoundError(f"resume_from_checkpoint={path}: not a checkpoint (no training_state.json)")
        return path
    done = [p for p in Path(cfg.output_dir).glob("checkpoint-[0-9]*") if p.suffix != ".tmp"]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def load_checkpoint(path: Path, opt: AdamW, ema, loader, rngs: dict) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "training_state.safetensors"), device=str(opt.flat.device))
    opt.flat.copy_(tensors["weights"])
    opt.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("opt.")})
    for name, g in rngs.items():
        if isinstance(g, torch.Generator):
            g.set_state(tensors[f"rng.{name}"].cpu())
    if ema is not None:
        ema.copy_(tensors["ema"])
    state = json.loads((path / "training_state.json").read_text())
    loader.load_state_dict(state["data"])
    rngs["python"].setstate((state["python_random"][0], tuple(state["python_random"][1]), state["python_random"][2]))
    return state


# ---------------------------------------------------------------------------------------------
# validation: fixed prompts, sizes, images and seeds, so grids are comparable across steps


@torch.no_grad()
def validate(unet, cfg: Config, cache, eval_items: list[dict], step: int, device, dtype) -> Path:
    unet.eval()
    variance = "learned_range" if cfg.loss_type == "hybrid" else "fixed_small"
    neg = cache.get([cfg.validation_negative_prompt]).to(device, dtype)
    gen = torch.Generator(device).manual_seed(cfg.validation_seed)
    images, labels = [], []
    if cfg.stage == 1:
        for prompt in cfg.validation_prompts:
            for w, h in data.parse_resolutions(cfg.validation_resolution):
                gen.manual_seed(cfg.validation_seed)  # the same noise for every prompt: the prompt alone differs
                x = sample.stage1(unet, cache.get([prompt]).to(device, dtype), neg, height=h, width=w,
                                  steps=cfg.validation_num_inference_steps, guidance=cfg.validation_guidance,
                                  variance=variance, generator=gen)
                images += sample.to_pil(x)
                labels.append(f"{prompt} ({w}x{h})")
    else:
        for item in eval_items:
            low, (H, W) = item["low_res"][None].to(device, dtype), item["pixels"].shape[-2:]
            gen.manual_seed(cfg.validation_seed)
            x = sample.stage2(unet, low, cache.get([item["caption"]]).to(device, dtype), neg, height=H, width=W,
                              steps=cfg.validation_num_inference_steps, guidance=cfg.stage2_guidance,
                              noise_level=cfg.noise_level, variance=variance, generator=gen)
            up = F.interpolate(item["low_res"][None].float(), size=(H, W), mode="nearest")
            images += sample.to_pil(torch.cat([up, x.float().cpu(), item["pixels"][None].float()]))
            labels += [f"low-res: {item['caption']}", "upscaled", "original"]
    path = Path(cfg.output_dir) / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    sample.image_grid(images, labels, cols=len(data.parse_resolutions(cfg.validation_resolution))
                      if cfg.stage == 1 else 3).save(path)
    unet.train()
    return path


@torch.no_grad()
def eval_loss(unet, items: list[dict], cache, sched, cfg: Config, device, dtype) -> float:
    """Loss on fixed images at fixed, evenly spread timesteps and fixed noise: a low-variance progress measure."""
    unet.eval()
    gen, losses = torch.Generator(device).manual_seed(1234), []
    for i, item in enumerate(items):
        x0 = item["pixels"][None].to(device, torch.float32)
        t = torch.tensor([int((i + 0.5) * sched.num_train_timesteps / len(items))], device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        x_t = diffusion.q_sample(sched, x0, noise, t)
        x_in, level = x_t, None
        if cfg.stage == 2:
            level, aug = torch.full_like(t, cfg.noise_level), torch.randn(x0.shape, generator=gen, device=device)
            x_in = torch.cat([x_t, low_res_condition(sched, item["low_res"][None], x0.shape[-2:], aug, level)], 1)
        out = unet(x_in.to(dtype), t, cache.get([item["caption"]]).to(device, dtype), noise_level=level)
        losses.append(diffusion.training_losses(sched, out, x0, x_t, t, noise, loss_type=cfg.loss_type,
                                                vlb_weight=cfg.vlb_weight).item())
    unet.train()
    return sum(losses) / max(1, len(losses))


# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT / SIGTERM set a flag instead of killing the run: the loop finishes its step, saves a checkpoint and
    returns. The previous handlers come back afterwards."""
    stop: list = []
    old = {sig: signal.signal(sig, lambda *_: stop.append(True)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def main(cfg: Config) -> dict:
    with stop_on_signals() as stop:
        return run(cfg, stop)


def run(cfg: Config, stop: list) -> dict:
    """The whole training run, top to bottom."""
    # ---- setup ---------------------------------------------------------------------------------
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    log = print if rank == 0 else (lambda *a, **k: None)
    if cfg.device:
        device = torch.device(cfg.device)
    else:
        device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    out = Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
    sched = diffusion.Schedule()
    for w, h in data.parse_resolutions(cfg.validation_resolution) if cfg.validation_prompts else []:
        if w % (8 if cfg.stage == 1 else 16) or h % (8 if cfg.stage == 1 else 16):
            raise ValueError(f"validation_resolution {w}x{h} is not a multiple of {8 if cfg.stage == 1 else 16}")

    # ---- data and text ---------------------------------------------------------------------------
    loader = data.make_loader(cfg, rank, world)
    cache = prepare_text_cache(cfg, rank)
    n_fixed = max(cfg.num_eval_images if cfg.stage == 2 else 0, cfg.validation_loss_images)
    fixed = [loader.items[req] for batch in loader.plan(0) for req in batch][:n_fixed]  # the same every run

    # ---- model and optimizer ---------------------------------------------------------------------
    unet, params, source = setup_model(cfg, device, dtype)
    gen = torch.Generator(device).manual_seed(cfg.seed + 1)  # noise, timesteps, augmentation levels
    rngs = {"train": gen, "rounding": torch.Generator(device).manual_seed(cfg.seed + 2), "cpu": torch.default_generator,
            "python": random.Random(cfg.seed)}  # python: caption dropout; the default generators: LoRA dropout
    if device.type == "cuda":
        rngs["cuda"] = torch.cuda.default_generators[device.index or 0]
    opt = AdamW(params, cfg.learning_rate, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon, cfg.adam_weight_decay,
                cfg.fp32_master, generator=rngs["rounding"])
    ema = opt.flat.clone() if cfg.use_ema else None
    step, nonfinite, skipped_total = 0, 0, 0
    resume = find_checkpoint(cfg)
    if resume is not None:
        state = load_checkpoint(resume, opt, ema, loader, rngs)
        step, skipped_total = state["step"], state.get("skipped_steps", 0)
        log(f"resumed from {resume} at step {step}")
    model = unet
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    if rank == 0:
        n = sum(p.numel() for p in params)
        log(f"training {n:,} parameters ({cfg.model_type}{', DoRA' if cfg.use_dora else ''}"
              f"{', bitfit' if cfg.use_bitfit else ''}) of {source} in {precision} on {world} x {device}")

    def checkpoint():
        if rank == 0:
            save_checkpoint(out, step, unet, opt, ema, loader, rngs, cfg, source, {"skipped_steps": skipped_total})

    # ---- the loop --------------------------------------------------------------------------------
    from tqdm import tqdm

    metrics = Metrics(out, cfg.report_to) if rank == 0 else None

    def evaluate(grids=True):  # rank 0: held-out loss, then validation grids
        if cfg.validation_loss_images:
            value = eval_loss(unet, fixed[: cfg.validation_loss_images], cache, sched, cfg, device, dtype)
            metrics.write({"step": step, "eval_loss": value})
        if grids and (cfg.validation_prompts or cfg.stage == 2):
            metrics.image(validate(unet, cfg, cache, fixed[: cfg.num_eval_images], step, device, dtype), step)

    if rank == 0 and step == 0 and cfg.validation_steps:
        evaluate(grids=False)  # the untrained model's held-out loss: the baseline the curve should fall from
    samples_per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * world
    batches, t0, start = iter(loader), time.time(), step
    bar = tqdm(total=cfg.max_train_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    while step < cfg.max_train_steps and not stop:
        lr = lr_at(step, cfg)
        terms = {"mse": 0.0, "vlb": 0.0}
        for micro in range(cfg.gradient_accumulation_steps):
            batch = next(batches)
            x0, noise, t, x_in, x_t, level = model_inputs(batch, sched, cfg, gen, rank, world, device, dtype)
            text = text_for(batch["captions"], cache, cfg, rngs["python"], world, rank, device, dtype)
            last = micro == cfg.gradient_accumulation_steps - 1
            with model.no_sync() if world > 1 and not last else contextlib.nullcontext():  # all-reduce once
                output = model(x_in, t, text, noise_level=level)
                loss, parts = diffusion.training_losses(sched, output, x0, x_t, t, noise, loss_type=cfg.loss_type,
                                                        vlb_weight=cfg.vlb_weight, snr_gamma=cfg.snr_gamma,
                                                        return_terms=True)
                (loss.mean() / cfg.gradient_accumulation_steps).backward()
            terms = {k: terms[k] + parts[k].mean() / cfg.gradient_accumulation_steps for k in terms}
        norm = opt.grad_norm()  # of the all-reduced gradient: every rank takes the same decision
        if torch.isfinite(norm):
            if cfg.max_grad_norm is not None:
                opt.grad.mul_(torch.clamp(cfg.max_grad_norm / (norm + 1e-6), max=1.0))
            opt.step(lr)
            if ema is not None:
                ema_update(ema, opt.flat, cfg.ema_decay, rngs["rounding"])
            nonfinite = 0
        else:  # skip the update, keep going; many in a row means something is broken
            nonfinite, skipped_total = nonfinite + 1, skipped_total + 1
            log(f"step {step}: non-finite loss or gradient, update skipped ({nonfinite} in a row)")
            if nonfinite >= cfg.max_nonfinite_steps:
                raise RuntimeError(f"{nonfinite} steps in a row had a non-finite loss or gradient: lower "
                                   f"learning_rate, set max_grad_norm, or try mixed_precision='fp32' / fp32_master")
        opt.zero_grad()
        step += 1
        bar.update(1)

        if rank == 0 and (step % cfg.logging_steps == 0 or step == cfg.max_train_steps):
            rate = (step - start) * samples_per_step / (time.time() - t0)
            row = {"step": step, "loss": float(terms["mse"] + cfg.vlb_weight * terms["vlb"]),
                   "mse": float(terms["mse"]), "vlb": float(terms["vlb"]), "lr": lr, "grad_norm": float(norm),
                   "samples_per_s": rate, "skipped_steps": skipped_total, "time": time.time() - t0}
            metrics.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}")
        if rank == 0 and cfg.validation_steps and step % cfg.validation_steps == 0:
            evaluate()
        if step % cfg.checkpointing_steps == 0 or stop:
            checkpoint()
    bar.close()
    if rank == 0 and not stop and cfg.validation_steps and step % cfg.validation_steps:
        evaluate()  # the final weights' loss and samples
    if rank == 0:
        metrics.close()

    # ---- the end ---------------------------------------------------------------------------------
    if stop:
        log(f"interrupted: checkpoint saved at step {step}; resume with --resume_from_checkpoint=latest")
        return {"step": step, "interrupted": True}
    summary = {"step": step}
    if rank == 0:
        if ema is not None:
            opt.flat.copy_(ema)  # the final weights are the EMA weights; the raw ones stay in the checkpoints
        save_weights(unet, cfg, out, source)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss()
        summary |= {"seconds": round(time.time() - t0, 1), "peak_memory_gib": round(peak / 2**30, 2),
                    "samples_per_s": round((step - start) * samples_per_step / (time.time() - t0), 2)}
        plot_losses(out / "metrics.jsonl", out / "loss.png")
        log(f"done: {step} steps in {summary['seconds']} s, {summary['samples_per_s']} samples/s, peak memory "
              f"{summary['peak_memory_gib']} GiB; weights, checkpoints, samples/ and loss.png are in {out}/")
    if world > 1:
        torch.distributed.destroy_process_group()
    return summary


class Metrics:
    """metrics.jsonl (one JSON object per line), and TensorBoard scalars and grids with report_to='tensorboard'."""

    def __init__(self, out: Path, report_to: str):
        self.file, self.tb = open(out / "metrics.jsonl", "a"), None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("report_to='tensorboard' needs TensorBoard: pip install tensorboard") from e
            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n"), self.file.flush()
        if self.tb:
            for key in row.keys() - {"step"}:
                self.tb.add_scalar(key, row[key], row["step"])

    def image(self, png: Path, step: int) -> None:
        if self.tb:
            import numpy as np
            from PIL import Image

            self.tb.add_image("validation", np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.file.close()
        if self.tb:
            self.tb.close()


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def plot_losses(metrics_path: Path, png: Path, size=(640, 360)) -> None:
    """A small loss curve (a moving average over the logged steps) drawn with PIL, no plotting library."""
    from PIL import Image, ImageDraw

    rows = [json.loads(line) for line in open(metrics_path)]
    pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if len(pts) < 2:
        return
    k = max(1, len(pts) // 50)
    window = [[v for _, v in pts[max(0, i - k + 1) : i + 1]] for i in range(len(pts))]
    smooth = [(s, sum(w) / len(w)) for (s, _), w in zip(pts, window)]
    held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]  # fixed t and noise: orange dots
    (W, H), m = size, 40
    x0, x1 = min(s for s, _ in smooth + held), max(s for s, _ in smooth + held)
    lo, hi = min(v for _, v in smooth + held), max(v for _, v in smooth + held)
    ln = lambda v: math.log(max(v, 1e-12))

    def xy(s, v):  # log scale: the first steps' loss is often 100x the last
        y = (ln(v) - ln(lo)) / max(1e-12, ln(hi) - ln(lo))
        return m + (s - x0) / max(1, x1 - x0) * (W - 2 * m), H - m - y * (H - 2 * m)

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, m, W - m, H - m], outline="gray")
    d.line([xy(s, v) for s, v in smooth], fill="navy", width=2)
    for x, y in (xy(s, v) for s, v in held):
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill="darkorange")
    title = f"training loss, log scale (moving average of {k}): {smooth[-1][1]:.4f} at step {smooth[-1][0]}"
    d.text((m, 8), title + (f"; held-out loss (dots): {held[-1][1]:.4f}" if held else ""), fill="black")
    d.text((m, H - m + 8), f"step {x0}", fill="black"), d.text((W - m - 60, H - m + 8), f"step {x1}", fill="black")
    d.text((4, m), f"{hi:.3g}", fill="black"), d.text((4, H - m - 10), f"{lo:.3g}", fill="black")
    img.save(png)


if __name__ == "__main__":
    main(parse_args(sys.argv[1:], "usage: python train.py CONFIG [CONFIG ...] [--key=value ...]"))
