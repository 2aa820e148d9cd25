"""What a step costs before a GPU is rented: the bytes of every tensor it keeps alive, its FLOPs, and what that
means on the common GPUs. The dry run (dryrun.py, `python train.py CONFIG --dry_run`) and bench.py use it.

    with LiveBytes() as live, FlopCounterMode(display=False) as flops:
        ...one training step, on fake tensors or real ones...
    live.peak, live.peak_phase, live.breakdown({"weights": [w], ...}), flops.get_total_flops()

LiveBytes is a TorchDispatchMode: every tensor an op returns is looked at, its storage counted once (views and
in-place results share it) and uncounted when the storage is freed (a weakref finalizer), so `now` is the bytes of
live storages and `peak` its maximum. Under FakeTensorMode the tensors hold no memory but have real sizes, so a
4.3B-parameter step is counted on a laptop. What it cannot see (say so next to any number it gives): the CUDA
context (~0.5 GiB), cuBLAS/cuDNN workspaces, the caching allocator's rounding and fragmentation, and buffers that
kernels allocate inside themselves (e.g. SDPA's workspace). ALLOWANCE is what the verdicts add for them.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GiB = 2**30
# What the counted peak leaves out, as the verdicts budget it: a fixed part (CUDA context, cuBLAS/cuDNN workspaces)
# and a share of the peak (the caching allocator's block rounding and fragmentation).
ALLOWANCE = {"fixed_bytes": 1.5 * GiB, "share_of_peak": 0.10}
SUSTAINED = 0.40  # share of the peak dense bf16 tensor throughput a training step is assumed to sustain
# name -> (memory in GB as sold, peak dense bf16 tensor TFLOP/s with fp32 accumulation from the vendor's data sheet
# or architecture whitepaper; None: a memory class, no time). GeForce cards run fp32 accumulation at half rate.
GPUS = {
    "H200": (141, 989), "H100 SXM": (80, 989), "H100 PCIe": (80, 756), "A100 80GB": (80, 312),
    "A100 40GB": (40, 312), "L40S": (48, 362), "RTX A6000": (48, 155), "RTX 4090": (24, 165),
    "RTX 3090": (24, 36), "L4": (24, 121), "RTX 4080": (16, 97), "12 GB card": (12, None), "8 GB card": (8, None),
}


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages created while it is active (see the module docstring).

    `phase` is a label the caller sets as the step goes (e.g. "forward", "backward", "optimizer"); the peak records
    the phase it fell in and which storages were live then, for `breakdown`."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, int]] = {}  # id of a live storage -> (its serial number, its bytes)
        self.now = self.peak = self.serial = 0
        self.phase, self.peak_phase, self._at_peak = "setup", "setup", frozenset()  # serials (ids are reused)

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)  # one Python object per live storage: PyTorch keeps it while the storage lives
        if key in self.live:
            return
        self.serial += 1
        self.live[key] = (self.serial, storage.nbytes())
        self.now += storage.nbytes()
        weakref.finalize(storage, self._free, key)
        if self.now > self.peak:
            self.peak, self.peak_phase = self.now, self.phase
            # dict.copy() first: a finalizer run by the garbage collector must not change the dict mid-iteration
            self._at_peak = frozenset(serial for serial, _ in self.live.copy().values())

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an op returns a tensor, or a tuple/list of tensors (and Nones); walked here by hand, because pytree's
        # tree_flatten leaves a reference cycle behind at every call, garbage that only the cyclic collector frees
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._track(t)
            elif isinstance(t, (tuple, list)):
                for u in t:
                    if isinstance(u, torch.Tensor):
                        self._track(u)
        return out

    def breakdown(self, groups: dict[str, list]) -> dict[str, int]:
        """Bytes live at the peak, by group: {name: tensors} (each storage counted in the first group that holds
        it), and "activations" for everything else (activations, saved tensors, temporaries)."""
        out, seen = {}, set()
        for name, tensors in groups.items():
            held = {self.live[id(t.untyped_storage())] for t in tensors if t is not None and
                    id(t.untyped_storage()) in self.live} - seen
            seen |= held
            out[name] = sum(n for serial, n in held if serial in self._at_peak)
        out["activations"] = self.peak - sum(out.values())
        return out


def materialise(module: torch.nn.Module) -> dict[int, torch.nn.Parameter]:
    """Give every parameter and buffer of a meta-device `module` zeroed storage of its dtype, shape and strides
    (under FakeTensorMode: fake storage), keeping requires_grad. Returns {id(old parameter): new parameter}.
    (module.to_empty() is refused under fake mode, and module.to() cannot swap fake parameters.)"""
    new = {}
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                fresh = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype).zero_()
                m._parameters[name] = new[id(p)] = torch.nn.Parameter(fresh, requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype).zero_()
    return new


def fits(peak_bytes: int, memory_gb: float) -> tuple[bool, float]:
    """Whether a counted peak fits a card sold as `memory_gb` (GB; it reports about 93% of that in GiB, less what the
    driver keeps) with ALLOWANCE added, and the GiB to spare (negative: missing)."""
    need = peak_bytes * (1 + ALLOWANCE["share_of_peak"]) + ALLOWANCE["fixed_bytes"]
    spare = memory_gb * 1e9 / GiB - need / GiB
    return spare >= 0, spare


def gpu_table(peak_bytes: int, flops: float, samples: int) -> list[dict]:
    """Per GPU of GPUS: fits (with ALLOWANCE), GiB to spare, and the predicted step time and samples/s at SUSTAINED
    of its peak bf16 throughput."""
    rows = []
    for name, (mem, tflops) in GPUS.items():
        ok, spare = fits(peak_bytes, mem)
        step_s = flops / (tflops * 1e12 * SUSTAINED) if tflops else None
        rows.append({"gpu": name, "memory_gb": mem, "fits": ok, "spare_gib": round(spare, 1),
                     "step_s": step_s, "samples_per_s": samples / step_s if step_s else None})
    return rows


def report(title: str, peak_bytes: int, phase: str, parts: dict[str, int], flops: float, samples: int) -> str:
    """The printout of one estimate: the peak and where it falls, its parts, FLOPs, and the GPU verdicts."""
    lines = [f"{title}", f"  predicted peak of live tensors: {peak_bytes / GiB:.2f} GiB, during {phase}"]
    lines += [f"    {name:<12} {n / GiB:8.2f} GiB" for name, n in parts.items()]
    lines.append(f"  FLOPs per step: {flops / 1e12:.2f} TFLOP ({samples} samples)")
    lines.append(f"  not counted: CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation, kernel-internal "
                 f"buffers; verdicts add {ALLOWANCE['fixed_bytes'] / GiB:.1f} GiB + "
                 f"{ALLOWANCE['share_of_peak']:.0%} of the peak for them. Times assume {SUSTAINED:.0%} of each "
                 f"GPU's peak dense bf16 throughput.")
    for r in gpu_table(peak_bytes, flops, samples):
        verdict = f"fits, {r['spare_gib']:.1f} GiB to spare" if r["fits"] else f"too big by {-r['spare_gib']:.1f} GiB"
        speed = f"~{r['step_s'] * 1000:.0f} ms/step, {r['samples_per_s']:.1f} samples/s" if r["step_s"] else ""
        lines.append(f"    {r['gpu']:<10} {r['memory_gb']:>4} GB: {verdict:<28} {speed}")
    return "\n".join(lines)


def fsdp_peak(peak_bytes: int, parts: dict[str, int], world: int, largest_unit_bytes: int, root_bytes: int) -> int:
    """One rank's predicted peak when FSDP (parallel.py) shards the step that one process measured at `peak_bytes`
    (with `parts` its breakdown at the peak). Every part but the activations is sharded: weights, gradients,
    moments and EMA are 1/world each. Unsharded at a time are the root's own weights (`root_bytes`: gathered for
    the whole forward and backward), the sharded module running and the next one prefetched (2 x
    `largest_unit_bytes`), and in backward that module's whole gradient before its reduce-scatter (1 x). The
    activations are the single process's: the per-rank batch is the same."""
    state = peak_bytes - parts.get("activations", 0)
    return int(state / world + parts.get("activations", 0) + (root_bytes + 3 * largest_unit_bytes) * (world > 1))
