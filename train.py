"""Fine-tune DeepFloyd IF (stage I or II; LoRA, DoRA, bitfit or full) in one readable pure-bf16 loop.

    python train.py configs/i_m.py --max_train_steps=2000
    torchrun --nproc_per_node=8 train.py configs/i_xl.py        # the same config on 8 GPUs

What it does differently from the popular trainers (docs/if.md, section 5):
- the hybrid loss trains the 3 variance channels too, so the stock `learned_range` sampler stays valid;
- stage II sees the *upsampled, noise-augmented low-res image* (channels 3:6) with its augmentation level as
  the class label, drawn per sample as the original IF trainer did - not the noisy image twice;
- AdamW keeps weights, gradients and moments in bf16 with stochastic rounding (so updates far below bf16's
  resolution still count), with the correct beta1 and bias correction;
- N processes train exactly like one process with N times the batch, and a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import checkpoint
import data
import diffusion
import hub
import lora
import parallel
import prior
import quant
import sample
import t5cache
import validation
from config import Config, parse_args, stage_of, torch_dtype
from metrics import Metrics, plot_losses
from model import UNet, build
from optim import AdamW

# ---------------------------------------------------------------------------------------------
# the optimizer (optim.py) as the config sets it, and the learning rate


def optimizer_for(cfg: Config, params: list, generator: torch.Generator | None = None) -> AdamW:
    """The run's AdamW over `params`, as the config sets it (`generator`: stochastic rounding's draws)."""
    return AdamW(params, cfg.learning_rate, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon, cfg.adam_weight_decay,
                 cfg.fp32_master, generator=generator, state="8bit" if cfg.optimizer_state == "8bit" else "bf16",
                 factored=cfg.factored_second_moment, fused=cfg.fused_backward,
                 clip=cfg.max_grad_norm if cfg.fused_backward else None)  # fused: by the previous step's norm


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


def setup_model(cfg: Config, device, dtype, shard: bool = False) -> tuple[UNet, list, str]:
    """The U-Net with its trainable parameters. Returns (unet, params, where the base weights came from).
    shard=True: sharded by FSDP across the processes (parallel.shard), only each rank's shards reaching the device."""
    # with quantise_base the bf16 weights stay on the CPU: quantised there, only int8 reaches the device
    load_on = torch.device("cpu") if (cfg.quantise_base or shard) and device.type != "meta" else device
    if cfg.unet_config is not None:
        torch.manual_seed(cfg.seed)
        unet, source = build(cfg.unet_config, dtype=dtype, device=load_on), "random init"
    else:
        unet, source = UNet.from_pretrained(cfg.weights, dtype=dtype, variant=cfg.variant, device=load_on), cfg.weights
    stage = stage_of(unet.config)
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
    if shard:  # (FSDP shards contiguous weights only: channels_last stays for the activations)
        parallel.shard(unet, device)
        return unet, [p for p in unet.parameters() if p.requires_grad], source  # now DTensors
    unet = unet.to(memory_format=torch.channels_last)
    if cfg.quantise_base:  # the frozen weights, after the adapters were added (they stay in bf16)
        quant.quantise_(unet)
        unet.to(device)
    return unet, params, source


def model_inputs(batch: dict, sched, cfg: Config, gen: torch.Generator, rank: int, world: int, device, dtype,
                 step: int = 0):
    """Noise the batch. Randomness is drawn for the *global* batch (all ranks alike) and sliced, so N processes
    see exactly what one process with the whole batch would. Returns x0, noise (the loss's target), t, model input,
    x_t, noise level. noise_offset changes the noise; input_perturbation only the noise x_t is made with."""
    x0 = batch["pixels"].to(device, torch.float32)
    B = x0.shape[0]
    mine = slice(rank * B, (rank + 1) * B)
    t = diffusion.sample_timesteps(B * world, sched.num_train_timesteps, gen, cfg.timestep_sampling, device)[mine]
    noise = torch.randn((B * world, *x0.shape[1:]), generator=gen, device=device)
    if cfg.noise_offset:
        noise = diffusion.offset_noise(noise, cfg.noise_offset, cfg.noise_offset_probability, gen)
    noise_in, gamma = noise, diffusion.input_perturbation_at(cfg.input_perturbation, step, cfg.input_perturbation_steps)
    if gamma:
        noise_in = diffusion.input_perturbation(noise, gamma, gen)
    noise, noise_in = noise[mine], noise_in[mine]
    x_t = diffusion.q_sample(sched, x0, noise_in, t)  # fp32
    level, x_in = None, x_t
    if cfg.stage == 2:  # the low-res partner, upsampled and noise-augmented at a per-sample level (the class label)
        lo, hi = cfg.noise_aug_range
        level = torch.randint(lo, hi, (B * world,), generator=gen, device=device)[mine]
        aug = torch.randn((B * world, *x0.shape[1:]), generator=gen, device=device)[mine]
        low = batch["low_res"].to(device, torch.float32)
        x_in = torch.cat([x_t, diffusion.low_res_condition(sched, low, x0.shape[-2:], aug, level)], dim=1)
    return x0, noise, t, x_in.to(dtype).contiguous(memory_format=torch.channels_last), x_t, level


def text_for(captions: list[str], cache, cfg: Config, rnd: random.Random, world: int, rank: int, device, dtype):
    """T5 embeddings; with probability caption_dropout_probability a caption is swapped for "" (keeps CFG)."""
    drops = [rnd.random() < cfg.caption_dropout_probability for _ in range(len(captions) * world)]
    mine = drops[rank * len(captions) : (rank + 1) * len(captions)]
    return cache.get(["" if d else c for c, d in zip(captions, mine)]).to(device, dtype, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# a run: what setup() builds, and the one training step that advances it


@dataclass
class Run:
    """Everything a training run holds. setup() makes it; train_step, validation.evaluate and checkpoint.py read it
    and advance `step`, `nonfinite` and `skipped`, which checkpoints save and a resume restores."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    out: Path
    sched: diffusion.Schedule
    loader: data.Loader
    cache: t5cache.TextCache
    unet: UNet
    model: torch.nn.Module  # what the forward calls: the U-Net, DDP- and/or compile-wrapped
    params: list
    source: str  # where the base weights came from
    opt: AdamW
    ema: torch.Tensor | None
    rngs: dict
    eval_items: list  # the held-out images (rank 0), for eval_loss
    metrics: Metrics | None = None  # rank 0
    class_loader: data.Loader | None = None  # prior preservation: the class images, a batch beside each batch
    regularised: bool = False  # some dataset is_regularisation_data: its samples' target is the base's prediction
    group: object = None  # under torchrun: a gloo group for the CPU-side agreements (parallel.py)
    sharded: bool = False  # FSDP: every rank holds 1/N of the trained weights and their states
    step: int = 0
    nonfinite: int = 0  # steps in a row with a non-finite loss or gradient
    skipped: int = 0  # all such steps
    dry: bool = False  # a dry run's fake tensors have no values: its loss counts as finite


def with_prediction_type(cfg: Config) -> Config:
    """cfg with prediction_type=None made the base's own: its weights' scheduler config's, epsilon for a random init
    (IF's). An adapter or bitfit run that names another than its base's is refused: it trains on the base's
    objective (a full fine-tune may convert one)."""
    adapter = cfg.model_type == "lora" or cfg.use_bitfit
    if cfg.unet_config is not None or (cfg.prediction_type is not None and not adapter):
        return cfg if cfg.prediction_type is not None else replace(cfg, prediction_type="epsilon")
    base = sample.prediction_of(sample.read_scheduler_config(cfg.weights))
    if cfg.prediction_type is not None and cfg.prediction_type != base:
        raise ValueError(f"{cfg.weights} predicts {base} (its scheduler config) but the config says "
                         f"prediction_type={cfg.prediction_type!r}: an adapter or bitfit trains on the base's own "
                         f"objective, leave prediction_type unset (a full fine-tune may convert it)")
    return replace(cfg, prediction_type=base)


def check_options(cfg: Config, world: int) -> Config:
    """Refuse, before anything is loaded, loss options out of range (diffusion.py's own checks, run on a one-pixel
    batch), a new run into an output_dir that holds an earlier run's checkpoints, an adapter whose prediction_type is
    not its base's, and what fused_backward (optim.py) and quantise_base (quant.py) cannot do, saying what to do
    instead. Returns cfg as with_prediction_type completes it (what the run trains and writes)."""
    cfg = with_prediction_type(cfg)
    z, t = torch.zeros(1, 3, 1, 1), torch.zeros(1, dtype=torch.long)
    diffusion.training_losses(diffusion.Schedule(), torch.zeros(1, 6, 1, 1), z, z, t, z, **diffusion.loss_options(cfg),
                              return_terms=True)
    diffusion.offset_noise(z, cfg.noise_offset, cfg.noise_offset_probability)
    diffusion.input_perturbation(z, diffusion.input_perturbation_at(cfg.input_perturbation, 0,
                                                                    cfg.input_perturbation_steps))
    if (cfg.push_to_hub or cfg.push_checkpoints_to_hub) and not cfg.hub_model_id:
        raise ValueError("push_to_hub / push_checkpoints_to_hub upload to hub_model_id: set it, e.g. "
                         "hub_model_id='user/corgi-lora'")
    prior.check_options(cfg)
    done = {} if cfg.resume_from_checkpoint else checkpoint.completed(Path(cfg.output_dir))
    earlier = [p.name for p in done.values()]
    if earlier:
        raise ValueError(f"output_dir {cfg.output_dir} holds an earlier run's checkpoints ({', '.join(earlier)}); a "
                         f"new run there would mix its checkpoints and log with that run's: continue it with "
                         f"--resume_from_checkpoint=latest, or train into another output_dir")
    if cfg.quantise_base and cfg.model_type == "full" and not cfg.use_bitfit:
        raise ValueError("quantise_base holds the frozen weights in int8, and a full fine-tune freezes none: use "
                         "model_type='lora' (QLoRA), or turn quantise_base off")
    if cfg.parallelism == "fsdp" and (cfg.model_type != "full" or cfg.use_bitfit):
        raise ValueError("parallelism='fsdp' shards full fine-tunes; adapters and bitfit train few weights and "
                         "their files are written whole: use parallelism='ddp' (or 'auto')")
    if cfg.factored_second_moment and "RANK" in os.environ and parallel.engine(cfg) == "fsdp":
        raise ValueError("factored_second_moment keeps row and column means of each matrix, and FSDP spreads a "
                         "matrix's rows over the ranks: use optimizer_state='8bit', or parallelism='ddp'")
    if not cfg.fused_backward:
        return cfg
    if cfg.gradient_accumulation_steps > 1:
        raise ValueError("fused_backward updates each parameter as soon as its gradient is complete, so gradients "
                         "cannot accumulate over micro-batches: set gradient_accumulation_steps=1 (raise "
                         "train_batch_size instead), or turn fused_backward off")
    if world > 1 and parallel.engine(cfg) == "ddp":
        raise ValueError("fused_backward would step on each rank's own gradient, before DDP averages it: use "
                         "parallelism='fsdp' (it steps on the reduced shards), or turn fused_backward off")
    return cfg


def setup(cfg: Config) -> Run:
    """Devices and processes, data, text, the model, the optimizer and, with resume_from_checkpoint, their state."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cfg = check_options(cfg, world)
    if cfg.device:
        device = torch.device(cfg.device)
    else:
        device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    rank, world, group = parallel.start(cfg, device)
    sharded = parallel.sharded(cfg)
    dtype = torch_dtype(cfg.mixed_precision, device)
    out = Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")

    loader = data.make_loader(cfg, rank, world)
    cache = t5cache.prepare(cfg, t5cache.run_captions(cfg), progress=rank == 0)
    unet, params, source = setup_model(cfg, device, dtype, shard=sharded)
    lora.shard_dropout(unet, rank, world)  # LoRA dropout masks, like the noise, are drawn for the global batch
    validation.check_validation(cfg, unet, loader)
    class_loader = None
    if cfg.with_prior_preservation:  # from the base model, before any training or resumed state changes it
        prior.make_class_images(cfg, unet, cache, device, dtype, rank, group, sharded)
        class_loader = data.make_class_loader(cfg, rank, world)
    # sharded, every rank takes part in validation (each forward gathers the weights), so each needs its pictures
    eval_items = [loader.items[loader.eval_request(i)] for i in loader.held_out] if rank == 0 or sharded else []
    # stochastic rounding: under DDP every rank rounds the same whole weights alike; sharded, each its own shards
    rounding = cfg.seed + 2 + (rank if sharded else 0)
    rngs = {"train": torch.Generator(device).manual_seed(cfg.seed + 1),  # noise, timesteps, augmentation levels
            "rounding": torch.Generator(device).manual_seed(rounding), "cpu": torch.default_generator,
            "python": random.Random(cfg.seed)}  # python: caption dropout; the default generators: LoRA dropout
    if device.type == "cuda":
        rngs["cuda"] = torch.cuda.default_generators[device.index or 0]
    opt = optimizer_for(cfg, params, rngs["rounding"])
    r = Run(cfg, rank, world, device, dtype, out, diffusion.Schedule(), loader, cache, unet, unet, params, source, opt,
            opt.weights() if cfg.use_ema else None, rngs, eval_items, group=group, sharded=sharded,
            class_loader=class_loader, regularised=any(ds["is_regularisation_data"] for ds in loader.datasets))
    resume = checkpoint.find_checkpoint(cfg)
    if resume is not None:
        checkpoint.load_checkpoint(resume, r)
    if rank == 0:
        r.metrics = Metrics(out, cfg.report_to, resumed_at=r.step if resume is not None else None,
                            config=cfg.to_dict())
        if resume is not None:
            print(f"resumed from {resume} at step {r.step}")
        print(f"training {sum(p.numel() for p in params):,} parameters ({cfg.model_type}"
              f"{', DoRA' if cfg.use_dora else ''}{', bitfit' if cfg.use_bitfit else ''}) of {source} in "
              f"{str(dtype).removeprefix('torch.')} on {world} x {device}")
    r.model = parallel.wrap(unet, device, world)  # DDP when several processes hold the whole U-Net
    if cfg.compile:  # a second bucket size makes dynamo treat sizes as dynamic: one recompile, not one per bucket
        r.model = torch.compile(r.model, backend="inductor" if cfg.compile is True else cfg.compile)
    return r


def train_step(r: Run, batches) -> dict:
    """One optimizer step: gradient_accumulation_steps micro-batches from `batches`, then the clipped AdamW update,
    skipped (and counted) when the loss or the gradient is not finite. Advances r.step; returns what the log shows
    (tensors, so nothing waits for the device until it is logged).

    Samples of is_regularisation_data datasets train on the MSE, over every output channel (the variance ones
    too), between the output and the base model's own (prior.base_prediction, one forward without gradients on those
    samples only), weighted by regularisation_loss_weight, instead of the diffusion loss. The logged parts (mse,
    vlb, regularisation_loss) are each their share of the mean per-sample loss, so with prior preservation's
    prior_loss (the mean loss of the class batch, a forward and backward of its own since its bucket may differ from
    the instance batch's) they add up to loss: mse + vlb_weight vlb + regularisation_loss_weight regularisation_loss
    + prior_loss_weight prior_loss. regularisation_loss is logged for steps that had such samples only."""
    cfg, n_micro = r.cfg, r.cfg.gradient_accumulation_steps
    lr, terms = lr_at(r.step, cfg), {}
    if cfg.fused_backward:  # each parameter takes its AdamW step inside backward (optim.py)
        r.opt.begin(lr)
    for micro in range(n_micro):
        batch = next(batches)
        x0, noise, t, x_in, x_t, level = model_inputs(batch, r.sched, cfg, r.rngs["train"], r.rank, r.world, r.device,
                                                      r.dtype, r.step)
        text = text_for(batch["captions"], r.cache, cfg, r.rngs["python"], r.world, r.rank, r.device, r.dtype)
        last = micro == n_micro - 1
        reg = batch.get("regularisation") if r.regularised else None
        reg = reg.to(r.device) if reg is not None and bool(reg.any()) else None  # (a CPU tensor: no device sync)
        if reg is not None:
            base = prior.base_prediction(r.unet, x_in[reg], t[reg], text[reg], None if level is None else level[reg])
        # the gradients are reduced across ranks once, at the last backward of the step
        with parallel.gradient_sync(r.model, last and "class" not in batch):
            output = r.model(x_in, t, text, noise_level=level)
            loss, parts = diffusion.training_losses(r.sched, output, x0, x_t, t, noise, **diffusion.loss_options(cfg),
                                                    return_terms=True)
            if reg is not None:
                own = loss.new_zeros(loss.shape).index_put((reg,), ((output[reg].float() - base.float()) ** 2)
                                                           .mean(dim=(1, 2, 3)))
                loss = torch.where(reg, cfg.regularisation_loss_weight * own, loss)
                parts = {"mse": parts["mse"] * ~reg, "vlb": parts["vlb"] * ~reg, "regularisation_loss": own.detach()}
            (loss.mean() / n_micro).backward()
        if "class" in batch:  # prior preservation: the class batch, in its own forward and backward
            c = batch["class"]
            x0, noise, t, x_in, x_t, level = model_inputs(c, r.sched, cfg, r.rngs["train"], r.rank, r.world,
                                                          r.device, r.dtype, r.step)
            text = text_for(c["captions"], r.cache, cfg, r.rngs["python"], r.world, r.rank, r.device, r.dtype)
            with parallel.gradient_sync(r.model, last):
                output = r.model(x_in, t, text, noise_level=level)
                class_loss = diffusion.training_losses(r.sched, output, x0, x_t, t, noise,
                                                       **diffusion.loss_options(cfg))
                (cfg.prior_loss_weight * class_loss.mean() / n_micro).backward()
            parts = {**parts, "prior_loss": class_loss.detach()}
        for k, v in parts.items():
            terms[k] = terms.get(k, 0.0) + v.mean() / n_micro
    # the norm of the all-reduced gradient: every rank takes the same decision. Fused, the update is done and the
    # norm is what was applied; a non-finite one means some parameters kept their weights (optim.py)
    norm = r.opt.end() if cfg.fused_backward else r.opt.grad_norm()
    if r.dry or torch.isfinite(norm):
        if not cfg.fused_backward:
            if cfg.max_grad_norm is not None:
                r.opt.clip_grad_(cfg.max_grad_norm, norm)
            r.opt.step(lr)
        if r.ema is not None and (r.step + 1) % cfg.ema_update_interval == 0:  # r.step + 1: the step just taken
            decay = cfg.ema_decay if r.step + 1 > cfg.ema_warmup_steps else 0.0  # warm-up: the EMA is the weights
            r.opt.update_ema(r.ema, decay, r.rngs["rounding"])
        r.nonfinite = 0
    else:  # skip the update, keep going; many in a row means something is broken
        r.nonfinite, r.skipped = r.nonfinite + 1, r.skipped + 1
        if r.rank == 0:
            print(f"step {r.step}: non-finite loss or gradient, update skipped ({r.nonfinite} in a row)")
        if r.nonfinite >= cfg.max_nonfinite_steps:
            raise RuntimeError(f"{r.nonfinite} steps in a row had a non-finite loss or gradient: lower "
                               f"learning_rate, set max_grad_norm, or try mixed_precision='fp32' / fp32_master")
    r.opt.zero_grad()
    r.step += 1
    total = terms["mse"] + cfg.vlb_weight * terms["vlb"] + cfg.prior_loss_weight * terms.get("prior_loss", 0.0) \
        + cfg.regularisation_loss_weight * terms.get("regularisation_loss", 0.0)
    return {"loss": total, **terms, "lr": lr, "grad_norm": norm}


# ---------------------------------------------------------------------------------------------
# the run


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
    if cfg.dry_run:
        import dryrun  # it builds on this file

        return dryrun.dry_run(cfg)
    with stop_on_signals() as stop:
        return run(cfg, stop)


def run(cfg: Config, stop: list) -> dict:
    """The whole training run, top to bottom: set up, train (logging, validating and checkpointing on the way),
    save the final weights. `stop` is a list that becomes non-empty when the run should checkpoint and return."""
    from tqdm import tqdm

    r = setup(cfg)
    cfg = r.cfg  # as check_options completed it (prediction_type)
    if r.step == 0 and cfg.validation_steps:
        if r.rank == 0 or r.sharded:  # (sharded, every rank runs the forward; rank 0 writes)
            validation.evaluate(r, grids=False)  # the untrained model's held-out loss: where the curve starts
        parallel.wait_for_rank0(r.group, cfg, "the held-out loss at step 0")
    samples_per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * r.world
    batches, t0, start = r.loader.stream(), time.time(), r.step
    if r.class_loader is not None:
        batches = prior.with_class_batches(batches, r.class_loader.stream())
    bar = tqdm(total=cfg.max_train_steps, initial=r.step, disable=r.rank != 0, dynamic_ncols=True)
    stopping = parallel.agree_to_stop(r.group, stop)
    while r.step < cfg.max_train_steps and not stopping:
        row = train_step(r, batches)
        stopping = parallel.agree_to_stop(r.group, stop)
        bar.update(1)
        if r.rank == 0 and (r.step % cfg.logging_steps == 0 or r.step == cfg.max_train_steps):
            rate = (r.step - start) * samples_per_step / (time.time() - t0)
            row = {"step": r.step, **{k: float(v) for k, v in row.items()}, "samples_per_s": rate,
                   "skipped_steps": r.skipped, "time": time.time() - t0}
            r.metrics.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", sps=f"{rate:.1f}")
        validating = cfg.validation_steps and r.step % cfg.validation_steps == 0
        checkpointing = r.step % cfg.checkpointing_steps == 0 or stopping
        if validating and (r.rank == 0 or r.sharded):
            validation.evaluate(r)
        if checkpointing:
            checkpoint.save_checkpoint(r)
        if validating or checkpointing:
            parallel.wait_for_rank0(r.group, cfg, f"the validation or checkpoint of step {r.step}")
    bar.close()
    if (r.rank == 0 or r.sharded) and not stopping and cfg.validation_steps and r.step % cfg.validation_steps:
        validation.evaluate(r)  # the final weights' loss and samples
    if r.rank == 0:
        r.metrics.close()

    summary = {"step": r.step}
    if stopping:
        summary["interrupted"] = True
        if r.rank == 0:
            print(f"interrupted: checkpoint saved at step {r.step}; resume with --resume_from_checkpoint=latest")
    else:
        if r.ema is not None:
            r.opt.load_weights(r.ema)  # the final weights are the EMA weights; the raw ones stay in the checkpoints
        whole = parallel.full_state_dict(r.unet) if r.sharded else None  # every rank sends its shards to rank 0
    if r.rank == 0 and not stopping:
        checkpoint.save_weights(r.unet, cfg, r.out, r.source, whole, ema=r.ema is not None)
        seconds = time.time() - t0
        peak = torch.cuda.max_memory_allocated() if r.device.type == "cuda" else _peak_rss()
        summary |= {"seconds": round(seconds, 1), "peak_memory_gib": round(peak / 2**30, 2),
                    "samples_per_s": round((r.step - start) * samples_per_step / seconds, 2)}
        plot_losses(r.out / "metrics.jsonl", r.out / "loss.png")
        hub.write_card(cfg, r.out, repo_id=cfg.hub_model_id)
        print(f"done: {r.step} steps in {summary['seconds']} s, {summary['samples_per_s']} samples/s, peak memory "
              f"{summary['peak_memory_gib']} GiB; weights, checkpoints, samples/ and loss.png are in {r.out}/")
    parallel.wait_for_rank0(r.group, cfg, "the final weights")  # no rank returns before they exist
    if r.rank == 0:  # uploads: the others need not wait for them
        if cfg.push_to_hub and not stopping:
            hub.push(r.out, cfg.hub_model_id, private=cfg.hub_private)  # after any checkpoint still uploading
        hub.wait()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main(parse_args(sys.argv[1:], "usage: python train.py CONFIG [CONFIG ...] [--key=value ...]"))
