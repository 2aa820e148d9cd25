"""Several processes as one run: torchrun's ranks, on one machine or several.

    torchrun --nproc_per_node=8 train.py CONFIG                                   # one machine, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --rdzv_endpoint=HOST:PORT train.py CONFIG   # machine 0
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=1 --rdzv_endpoint=HOST:PORT train.py CONFIG   # machine 1

PyTorch's own engines, chosen by `parallelism` (config.py): DDP keeps a whole copy of the model on every rank and
all-reduces the gradients (adapters: the trained weights are small); FSDP2 (`fully_shard`) keeps 1/N of every
weight, gradient and optimizer moment on each rank and all-gathers one layer's weights at a time (full fine-tunes:
IF-I-XL's 4.3B weights and their moments fit no single small card). Either way N processes train like one process
with N times the batch: train.py draws every random number for the global batch and slices it.

What the ranks must agree on is here too: when to stop (a signal may reach one rank only), and waiting for rank 0
while it alone validates or writes a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from config import Config
from model import Attention, ResnetBlock2D


def start(cfg: Config, device: torch.device) -> tuple[int, int, object]:
    """(rank, world size, gloo group) of this process; under torchrun the process group is started (after the
    device is set, so each rank's NCCL context lands on its own GPU). The gloo group carries the CPU-side
    agreements (agree_to_stop, wait_for_rank0) with distributed_timeout; plain `python train.py` is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.distributed_timeout))
    return dist.get_rank(), dist.get_world_size(), group


def engine(cfg: Config) -> str:
    """"ddp" or "fsdp": parallelism as set, or by default FSDP for full fine-tunes and DDP for adapters."""
    if cfg.parallelism != "auto":
        return cfg.parallelism
    return "fsdp" if cfg.model_type == "full" and not cfg.use_bitfit else "ddp"


def sharded(cfg: Config) -> bool:
    """Whether this run shards its model with FSDP: under torchrun (any number of processes, one included, so a
    sharded checkpoint can be resumed on one GPU) with parallelism 'fsdp'."""
    return dist.is_initialized() and engine(cfg) == "fsdp"


def shard(unet: torch.nn.Module, device: torch.device) -> None:
    """fully_shard every ResnetBlock2D and Attention, then the root (which keeps the rest: the input and output
    convs, the time and text embeddings). These are the modules whose forward the U-Net calls; FSDP gathers a
    module's weights in its forward hook, so sharding a down/up block whose forward is never called would leave its
    weights sharded inside the resnets' ops. The U-Net may be on the CPU: only each rank's shards move to `device`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # the shards land on `device`
    for module in shard_units(unet):
        fully_shard(module, mesh=mesh)
    fully_shard(unet, mesh=mesh)


def shard_units(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules `shard` shards on their own."""
    return [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, Attention))]


def wrap(unet: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """What the training step calls: the U-Net under DDP when there are several processes and it is not sharded."""
    if world == 1 or _is_sharded(unet):
        return unet
    return torch.nn.parallel.DistributedDataParallel(unet, device_ids=[device] if device.type == "cuda" else None)


def _is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, sync: bool):
    """Gradient accumulation: only the last micro-batch's backward reduces the gradients across ranks."""
    if sync or not dist.is_initialized():
        yield
    elif _is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


def agree_to_stop(group, stop: list) -> bool:
    """True on every rank once any rank was asked to stop. Preemption signals reach ranks at different steps, or
    reach one rank only: a rank that left the loop alone would leave the others waiting in a gradient all-reduce
    with no checkpoint written. So after each step the ranks decide together (one int, all-reduced over gloo on the
    CPU: no GPU sync), all leave after the same step, and the checkpoint is written."""
    if group is None:
        return bool(stop)
    flag = torch.tensor([int(bool(stop))])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def wait_for_rank0(group, cfg: Config, what: str) -> None:
    """The other ranks wait here, on the CPU, while rank 0 alone validates or writes a checkpoint, rather than
    inside the next collective, where NCCL's watchdog would end the run after its own 10 minutes. The barrier's
    timeout is distributed_timeout, sized for a full IF-I-XL checkpoint (config.py)."""
    if group is None:
        return
    try:
        dist.monitored_barrier(group, timeout=timedelta(seconds=cfg.distributed_timeout))
    except RuntimeError as e:
        raise RuntimeError(f"rank {dist.get_rank()} waited more than distributed_timeout={cfg.distributed_timeout} s "
                           f"for {what}: if rank 0 is still working (a slow disk, a long validation), raise "
                           f"distributed_timeout; otherwise see the log of the rank that did not arrive") from e


def full_state_dict(unet: torch.nn.Module) -> dict:
    """The sharded U-Net's whole state dict, gathered to rank 0's CPU (an empty dict on the other ranks); every
    rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(unet: torch.nn.Module, state: dict) -> None:
    """The inverse: rank 0's whole `state` (the others pass {}) broadcast into every rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(unet, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                strict=False))


def save_sharded(tensors: dict, directory) -> None:
    """torch.distributed.checkpoint: each rank writes its shards of `tensors` (DTensors) into `directory`, with
    the metadata that lets a run of another world size read them back resharded. Collective."""
    import torch.distributed.checkpoint as dcp

    dcp.save(tensors, checkpoint_id=str(directory))


def load_sharded(tensors: dict, directory) -> None:
    """Fill `tensors` (this run's DTensors, of any world size's sharding) in place from save_sharded's files."""
    import torch.distributed.checkpoint as dcp

    dcp.load(tensors, checkpoint_id=str(directory))
