"""The dry run, `python train.py CONFIG --dry_run`: one training step at its real size (the largest bucket, the
real U-Net config) on fake tensors, which hold no memory but have real shapes, so a 4.3B-parameter step is counted
on a laptop without weights, data, T5 or a GPU. estimate_step builds the run with train.py's own setup_model and
runs train.py's own train_step; memory.py counts every byte it keeps alive and its FLOPs; dry_run prints what that
means on the common GPUs (and for sampling, validation and FSDP) and writes output_dir/memory_estimate.json.
"""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import replace
from pathlib import Path

import torch

import data
import diffusion
import memory
import parallel
import sample
from config import Config
from model import build
from train import Run, check_options, optimizer_for, setup_model, train_step


class _ZeroText:
    """The text cache's stand-in: zeros of T5's output shape [B, L, D] (bf16, as the cache stores them)."""

    def __init__(self, length: int, dim: int):
        self.length, self.dim = length, dim

    def get(self, captions: list[str]) -> torch.Tensor:
        return torch.zeros(len(captions), self.length, self.dim, dtype=torch.bfloat16)


def unet_config_of(cfg: Config) -> dict:
    """The U-Net config a run would build, without its weights: unet_config, else the unet/config.json of a local
    `pretrained` folder, else the flavour's (model.FLAVOURS; for a Hub id, nothing is downloaded)."""
    from model import FLAVOURS

    if cfg.unet_config is not None:
        return cfg.unet_config
    folder = Path(cfg.weights)
    for f in (folder / "unet" / "config.json", folder / "config.json"):
        if f.is_file() and "block_out_channels" in (found := json.loads(f.read_text())):
            return found
    return FLAVOURS[cfg.model_flavour]["config"]


def estimate_step(cfg: Config, fake: bool = True, flops: bool = True) -> dict:
    """One training step of `cfg` at its real size, its live tensors counted by memory.LiveBytes, its FLOPs by
    FlopCounterMode (in a second pass: FlopCounterMode's bookkeeping keeps tensors alive a little longer, which the
    count would see). The U-Net comes from unet_config_of(cfg), the batch is at the largest bucket the datasets can
    produce, the text at tokenizer_max_length; setup_model and train_step are the functions a real run uses.
    fake=True runs on fake tensors (no memory, no GPU, no weights, images or T5); fake=False on real zeroed CPU
    tensors, which is how tests check the fake count; flops=False skips the FLOP pass. Returns the counts
    (memory_estimate.json's keys)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    cfg = check_options(replace(cfg, unet_config=unet_config_of(cfg), compile=False), 1)
    # planned for a GPU with bf16 (Ampere or newer), where mixed_precision="auto" means bf16
    dtype = torch.float32 if cfg.mixed_precision == "fp32" else torch.bfloat16
    (w, h), B, n_micro = data.largest_bucket(cfg), cfg.train_batch_size, cfg.gradient_accumulation_steps

    def one_step(counter, live=None) -> dict:
        unet, params, _ = setup_model(cfg, torch.device("meta"), dtype)
        with FakeTensorMode() if fake else contextlib.nullcontext(), counter:
            fresh = memory.materialise(unet)
            params = [fresh[id(p)] for p in params]
            opt = optimizer_for(cfg, params)
            ema = opt.flat.clone() if cfg.use_ema else None
            dim = unet.config["encoder_hid_dim"] or unet.config["cross_attention_dim"]
            rngs = {"train": torch.Generator(), "rounding": torch.Generator(), "python": random.Random(cfg.seed)}
            r = Run(cfg, 0, 1, torch.device("cpu"), dtype, Path(cfg.output_dir), diffusion.Schedule(), None,
                    _ZeroText(cfg.tokenizer_max_length, dim), unet, unet, params, "", opt, ema, rngs, [], dry=True)
            if live is not None:  # where the peak falls: hooks label the phases of the step as it runs
                unet.register_forward_pre_hook(lambda *_: setattr(live, "phase", "forward"))
                unet.register_forward_hook(lambda *_: setattr(live, "phase", "loss and backward"))
                name = "end" if cfg.fused_backward else "grad_norm"
                after = getattr(opt, name)

                def backward_done():  # called once backward is over
                    live.phase = "gradient norm, clipping and the optimizer step"
                    return after()

                setattr(opt, name, backward_done)
            batch = {"pixels": torch.zeros(B, 3, h, w), "captions": [""] * B}
            if cfg.stage == 2:
                batch["low_res"] = torch.zeros(B, 3, h // 4, w // 4)
            train_step(r, iter([batch] * n_micro))
            if live is None:
                return {}
            frozen = [t for t in [*unet.parameters(), *unet.buffers()] if not t.requires_grad]
            return live.breakdown({"weights": frozen, "trainable": [opt.flat], "grads": [opt.grad],
                                   "optimizer": opt.state_tensors(), "ema": [ema]})

    live, counter = memory.LiveBytes(), FlopCounterMode(display=False)
    parts = one_step(live, live)
    if flops:
        one_step(counter)
    return {"peak_bytes": live.peak, "peak_phase": live.peak_phase, **{f"{k}_bytes": v for k, v in parts.items()},
            "flops_per_step": counter.get_total_flops() if flops else None, "samples_per_step": B * n_micro,
            "resolution": [w, h], "dtype": str(dtype).removeprefix("torch.")}


def shard_units(cfg: Config) -> tuple[list[int], int]:
    """The bytes of each module FSDP shards on its own (parallel.shard), and of what the root keeps, for cfg's U-Net
    in the training dtype (built on the meta device: no memory)."""
    dtype = torch.float32 if cfg.mixed_precision == "fp32" else torch.bfloat16
    with torch.device("meta"):
        unet = build(unet_config_of(cfg), dtype=dtype)
    units = [sum(p.nbytes for p in m.parameters()) for m in parallel.shard_units(unet)]
    return units, sum(p.nbytes for p in unet.parameters()) - sum(units)


def dry_run(cfg: Config) -> dict:
    """`python train.py CONFIG --dry_run`: estimate_step on fake tensors, printed with the GPU verdicts and written to
    {output_dir}/memory_estimate.json."""
    est = estimate_step(cfg)
    est |= {"allowance": memory.ALLOWANCE, "sustained_share": memory.SUSTAINED,
            "gpus": memory.gpu_table(est["peak_bytes"], est["flops_per_step"], est["samples_per_step"])}
    what = "unet_config" if cfg.unet_config else cfg.weights
    (w, h) = est["resolution"]
    kind = cfg.model_type + (" + DoRA" if cfg.use_dora else "") + (" + bitfit" if cfg.use_bitfit else "")
    title = (f"dry run: {what} {kind}, batch {cfg.train_batch_size} x {cfg.gradient_accumulation_steps} at {w}x{h} "
             f"(the largest bucket), {est['dtype']}, gradient_checkpointing={cfg.gradient_checkpointing}")
    parts = {k.removesuffix("_bytes"): v for k, v in est.items() if k.endswith("_bytes") and k != "peak_bytes"}
    print(memory.report(title, est["peak_bytes"], est["peak_phase"], parts, est["flops_per_step"],
                        est["samples_per_step"]))
    sampling = sample.estimate(cfg, unet_config_of(cfg))
    seconds = {g: sampling["flops"] / (tf * 1e12 * memory.SUSTAINED) for g, (_, tf) in memory.GPUS.items() if tf}
    w, h = sampling["size"]
    print(f"sample.py with this U-Net: peak {sampling['unet_peak_bytes'] / memory.GiB:.2f} GiB for {sampling['images']}"
          f" image(s) at {w}x{h} with guidance, {sampling['flops'] / 1e12:.1f} TFLOP for {sampling['steps']} steps "
          f"(~{seconds['RTX 4090']:.1f} s on an RTX 4090, ~{seconds['H100 SXM']:.1f} s on an H100); T5 encoding "
          f"{cfg.text_encoder_batch_size} prompts at a time: peak {sampling['t5_peak_bytes'] / memory.GiB:.2f} GiB "
          f"(T5 is freed before the U-Net loads)")
    # validation samples one image at a time on the training U-Net, beside everything training keeps between steps
    resident = sum(v for k, v in parts.items() if k != "activations")
    phases = {"T5 encoding (the text cache)": sampling["t5_peak_bytes"], "training step": est["peak_bytes"],
              "validation (training state + sampling)": resident + sampling["unet_peak_bytes"]
              - sampling["unet_weights_bytes"], "sample.py": sampling["unet_peak_bytes"]}
    print("each phase's predicted peak: " + ", ".join(f"{k} {v / memory.GiB:.2f} GiB" for k, v in phases.items()))
    est |= {"sampling": sampling, "phases_bytes": phases}
    if parallel.engine(cfg) == "fsdp":
        units, root = shard_units(cfg)
        per_rank = {n: memory.fsdp_peak(est["peak_bytes"], parts, n, max(units), root) for n in (2, 4, 8)}
        print("torchrun with FSDP (parallelism='fsdp'), training step per rank: " + ", ".join(
            f"{n} GPUs {v / memory.GiB:.2f} GiB" for n, v in per_rank.items()))
        est["fsdp_per_rank_bytes"] = per_rank
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_estimate.json").write_text(json.dumps(est, indent=2) + "\n")
    print(f"written: {out / 'memory_estimate.json'}")
    return est
