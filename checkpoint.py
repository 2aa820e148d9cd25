"""Checkpoints. save_weights writes the trained weights in their final format (a LoRA file, or a diffusers unet/ +
scheduler/ folder) and load_weights reads them back bit for bit; checkpoint-<step>/ holds those weights and the
training state (optimizer, EMA, generators, the loader's place) a resumed run needs to continue exactly. A checkpoint
is written to a temporary folder and renamed into place, so a crash never leaves half a checkpoint, and an existing
one is never gone before its replacement is whole. train.py calls save_checkpoint, find_checkpoint, load_checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import diffusion
import hub
import lora
import parallel
from config import Config
from lora import LORA_FILE
from model import UNet, read_weights

if TYPE_CHECKING:
    from train import Run


def save_weights(unet: UNet, cfg: Config, directory: Path, source: str, state_dict: dict | None = None,
                 ema: bool = False) -> None:
    """The trained weights in their final format: a LoRA file diffusers loads (with use_bitfit, plus the trained
    biases in the file beside it that the LoRA file names, see lora.py), or, for model_type='full' (all weights, or
    with use_bitfit only the biases), a complete diffusers unet/ + scheduler/ folder that sample.py and diffusers
    take as the base weights. `state_dict`: the U-Net's whole state when it is sharded (parallel.full_state_dict)."""
    variance = diffusion.sampler_variance(cfg.loss_type, unet.config["out_channels"])
    meta = {"variance_trained": str(variance == "learned_range").lower(), "base_model": source, "stage": str(cfg.stage)}
    meta |= {"base_quantised": "int8"} if cfg.quantise_base else {}  # sample.py then samples on the int8 base too
    meta |= {"ema": "true"} if ema else {}  # the final weights of a use_ema run are the EMA (checkpoints: the raw)
    if cfg.model_type == "lora":
        lora.save_lora(unet, directory / LORA_FILE, metadata=meta, biases=cfg.use_bitfit)
        return
    unet.save_pretrained(directory / "unet", state_dict)
    (directory / "scheduler").mkdir(exist_ok=True)
    config = json.dumps(diffusion.scheduler_config(cfg.stage, variance, cfg.prediction_type), indent=2)
    (directory / "scheduler" / "scheduler_config.json").write_text(config)


def load_weights(unet: UNet, cfg: Config, directory: Path) -> None:
    """The inverse of save_weights for a run being resumed: the trained parameters of `unet` (already built as the
    run builds it) get their values back, bit for bit, from the files save_weights wrote in `directory`."""
    if cfg.model_type == "lora":
        lora.restore_lora(unet, directory / LORA_FILE, biases=cfg.use_bitfit)
        return
    trained = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    state = read_weights(directory / "unet", dtype=next(iter(trained.values())).dtype, keep=trained.__contains__)
    if state.keys() != trained.keys():
        raise ValueError(f"{directory / 'unet'} lacks trained weights: {sorted(trained.keys() - state.keys())[:8]}")
    with torch.no_grad():
        for n, p in trained.items():
            p.copy_(state[n])


def completed(out: Path) -> dict[int, Path]:
    """step -> the complete checkpoint of that step in `out`. checkpoint-N, or checkpoint-N.old where a crash came
    between moving the old checkpoint-N aside and renaming its replacement into place (see save_checkpoint);
    .tmp folders are never complete."""
    found: dict[int, Path] = {}
    for p in sorted(out.glob("checkpoint-*"), key=lambda p: p.name.endswith(".old")):  # checkpoint-N first
        m = re.fullmatch(r"checkpoint-(\d+)(\.old)?", p.name)
        if m and p.is_dir():
            found.setdefault(int(m[1]), p)
    return dict(sorted(found.items()))


def save_checkpoint(r: Run) -> Path | None:
    """checkpoint-<step>/: the weights as save_weights writes them, and the training state that a resume needs to
    continue exactly. Rank 0 writes it; sharded (FSDP), every rank first sends its weight shards to rank 0 and
    writes its moment shards itself through torch.distributed.checkpoint (sharded/, readable at any world size).
    Never is there a moment without a complete checkpoint of this step once one existed: an existing checkpoint-N
    is moved to checkpoint-N.old, the new one renamed into place, then the old one deleted. Then only the newest
    checkpoints_total_limit are kept."""
    from safetensors.torch import save_file

    whole = parallel.full_state_dict(r.unet) if r.sharded else None
    final, tmp, old = (r.out / f"checkpoint-{r.step}{suffix}" for suffix in ("", ".tmp", ".old"))
    if r.rank == 0:
        for left in r.out.glob("checkpoint-*.tmp"):  # what crashes left: half-written checkpoints go,
            shutil.rmtree(left, ignore_errors=True)
        for left in r.out.glob("checkpoint-*.old"):  # a moved-aside one is put back where its replacement is missing
            if left.with_suffix("").exists():
                shutil.rmtree(left, ignore_errors=True)
            else:
                os.replace(left, left.with_suffix(""))
        tmp.mkdir(parents=True)
    if r.sharded:
        parallel.wait_for_rank0(r.group, r.cfg, f"checkpoint-{r.step}.tmp to exist")
        parallel.save_sharded(sharded_state(r), tmp / "sharded")
        save_file({"rounding": r.rngs["rounding"].get_state()}, str(tmp / f"rounding-rank{r.rank}.safetensors"))
        parallel.wait_for_rank0(r.group, r.cfg, f"every rank's shards of checkpoint-{r.step}")
    if r.rank != 0:
        return None
    save_weights(r.unet, r.cfg, tmp, r.source, whole)
    tensors = {} if r.sharded else {f"opt.{k}": v for k, v in r.opt.state_dict().items()}  # the weights: above only
    tensors |= {f"rng.{k}": g.get_state() for k, g in r.rngs.items()
                if isinstance(g, torch.Generator) and not (r.sharded and k == "rounding")}
    tensors |= {"ema": r.ema} if r.ema is not None and not r.sharded else {}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "training_state.safetensors"))
    state = {"step": r.step, "data": r.loader.state_dict(), "python_random": r.rngs["python"].getstate(),
             "nonfinite_steps": r.nonfinite, "skipped_steps": r.skipped, "world_size": r.world,
             "sharded": r.sharded, "class_data": r.class_loader.state_dict() if r.class_loader else None}
    (tmp / "training_state.json").write_text(json.dumps(state, default=list))
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)  # atomic: the checkpoint appears whole or not at all
    shutil.rmtree(old, ignore_errors=True)
    hub.write_card(r.cfg, final, repo_id=r.cfg.hub_model_id, step=r.step)  # the model card beside the weights
    if r.cfg.push_checkpoints_to_hub:
        hub.push(final, r.cfg.hub_model_id, private=r.cfg.hub_private, background=True, commit_message=f"step {r.step}")
    done = completed(r.out)
    for step in list(done)[: -r.cfg.checkpoints_total_limit] if r.cfg.checkpoints_total_limit else []:
        shutil.rmtree(done[step], ignore_errors=True)
    return final


def sharded_state(r: Run) -> dict:
    """What a sharded checkpoint keeps in sharded/ (torch.distributed.checkpoint): the optimizer's moments and
    the EMA, per parameter, as DTensors of this run's sharding, which a load fills in place."""
    state = {"optimizer": r.opt.param_state_dict()}
    if r.ema is not None:
        names = [n for n, p in r.unet.named_parameters() if p.requires_grad]
        state["ema"] = dict(zip(names, r.opt.param_views(r.ema)))
    return state


def find_checkpoint(cfg: Config) -> Path | None:
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint != "latest":
        path = Path(cfg.resume_from_checkpoint)
        if not (path / "training_state.json").is_file():
            raise FileNotFoundError(f"resume_from_checkpoint={path}: not a checkpoint (no training_state.json)")
        return path
    done = completed(Path(cfg.output_dir))
    return done[max(done)] if done else None


def load_checkpoint(path: Path, r: Run) -> None:
    """The state save_checkpoint wrote, into the run setup() made. A sharded checkpoint resumes under torchrun with
    parallelism='fsdp' on any number of processes: at the same number exactly; at another, the moments are
    resharded (8-bit ones within their precision) and stochastic rounding draws afresh."""
    from safetensors.torch import load_file

    state = json.loads((path / "training_state.json").read_text())
    if state.get("sharded", False) != r.sharded:
        how = ("under torchrun with parallelism='fsdp' (any number of processes)" if state.get("sharded") else
               "without FSDP (parallelism='ddp', or plain python train.py)")
        raise ValueError(f"{path} was written by a {'sharded' if state.get('sharded') else 'unsharded'} run: resume "
                         f"it {how}")
    device = str(r.device)
    tensors = load_file(str(path / "training_state.safetensors"), device=device)
    if r.sharded:
        whole = read_weights(path / "unet", dtype=r.dtype) if r.rank == 0 else {}  # rank 0 reads, all get shards
        parallel.load_full_state_dict(r.unet, whole)
        shards = sharded_state(r)
        parallel.load_sharded(shards, path / "sharded")
        r.opt.load_param_state_dict(shards["optimizer"])  # the EMA was filled in place
        mine = path / f"rounding-rank{r.rank}.safetensors"
        if state["world_size"] == r.world and mine.is_file():
            r.rngs["rounding"].set_state(load_file(str(mine))["rounding"])
    else:
        load_weights(r.unet, r.cfg, path)
        r.opt.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("opt.")})
        if r.ema is not None:
            r.ema.copy_(tensors["ema"])
    for name, g in r.rngs.items():
        if isinstance(g, torch.Generator) and f"rng.{name}" in tensors:
            g.set_state(tensors[f"rng.{name}"].cpu())
    r.loader.load_state_dict(state["data"])
    if r.class_loader is not None:
        if state.get("class_data") is None:
            raise ValueError(f"{path} was written by a run without with_prior_preservation: resume it without, or "
                             "start the prior-preservation run afresh")
        r.class_loader.load_state_dict(state["class_data"])
    version, internal, gauss = state["python_random"]
    r.rngs["python"].setstate((version, tuple(internal), gauss))
    r.step, r.nonfinite, r.skipped = state["step"], state.get("nonfinite_steps", 0), state.get("skipped_steps", 0)
