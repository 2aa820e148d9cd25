"""Speed and memory of this repo, side by side with the diffusers + peft reference, in one run.

    python bench.py                                        # CPU: the IF-I-M-sized U-Net, batch 4, 64x64
    python bench.py --device=cuda --flavour=i-xlarge-4.3b  # a GPU: the real XL config (random weights)
    python bench.py --only=lora,sample --out=bench.json
    python bench.py --only=lora --rounds=3                 # ours and the reference alternate 3 times
    python bench.py --table=bench.json                     # print a saved (or interrupted) run's table again
    python bench.py --estimate --out=estimate.json         # predicted GPU memory of every flavour and job (no GPU)
    python bench.py --device=cuda --smoke                  # does everything run? (smoke_rows); exits 1 if not
    python bench.py --memory                               # each memory option's predicted peak per flavour
    python bench.py --quality                              # what the memory options cost: demo held-out loss
    python bench.py --t5int8                               # int8 T5's embeddings against bf16's
    python bench.py --scan                                 # data.scan of 10,000 images: 1 and 2 processes, rerun

Every measurement runs in a fresh subprocess, so peak memory is honest. Timed parts repeat after a warm-up and
report medians; with --rounds=N each row runs N times, ours and the reference in turn, and reports the medians
over rounds (on a shared machine a slow spell then slows both sides, not one). Peak memory: on CUDA
`max_memory_allocated` (absolute: weights included); on the CPU the peak RSS over the post-load baseline
(activations, gradients, optimizer state), with glibc told to hand large blocks back at once so that RSS follows
the live tensors (training rows only: it makes both stacks' CPU steps about a third slower). Each row has ours,
the reference, and `*_ratio` = ours / reference. Random weights of the real configs (model.FLAVOURS): nothing is
downloaded. Without diffusers/peft installed, only our numbers are reported.

The smoke run trains every mode for two steps on tiny U-Nets through train.main (data, text cache, loop,
validation, checkpoint, final save), eager and compiled, then samples from what they wrote, then on a GPU measures
one real-size step of three IF models next to the dry run's predicted peak. Each row prints ok, skipped or FAILED
with its losses or its error. `--device=cpu --smoke` takes 20 s on two cores with inductor's cache warm, about
2 minutes cold (its one compiled row).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks


# ---------------------------------------------------------------------------------------------
# measurement helpers (run inside the subprocess)


def _memory_reset(device) -> int:
    """Start a fresh peak; return the baseline in bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    return _proc_status("VmRSS")


def _memory_peak(device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else _proc_status("VmHWM")


def _proc_status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _timed(fn, device, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize() if device.type == "cuda" else None
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize() if device.type == "cuda" else None
        times.append(time.perf_counter() - t0)
    return times


def _unets(stack: str, flavour: str, device, dtype, tmp: Path | None = None):
    """A random U-Net of `flavour` for `stack`; with `tmp`, ours gets exactly the reference's weights."""
    import model

    torch.manual_seed(0)
    config = model.FLAVOURS[flavour]["config"]
    if stack == "ours" and tmp is None:
        return model.build(config, dtype=dtype, device=device)
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        ref = UNet2DConditionModel(**config).to(dtype)
    if stack == "ours":
        ref.save_pretrained(tmp / "unet")
        return model.UNet.from_pretrained(tmp, dtype=dtype, device=device)
    return ref


# ---------------------------------------------------------------------------------------------
# the cases


def case_train(stack, flavour, mode, batch, height, width, ckpt, dtype, device, attention, rank=32, repeat=3,
               warmup=None, compiled=False):
    """One optimizer step: forward, the hybrid loss, backward, AdamW. `warmup` untimed steps (None: 1 on the CPU,
    3 on a GPU) come after the first step, then `repeat` timed ones. `compiled`: ours through torch.compile
    (inductor), as train.py's compile=True wraps it; the first step then includes the compilation."""
    import config
    import diffusion
    import lora
    import optim

    device, dtype = torch.device(device), getattr(torch, dtype)
    unet, stage = _unets(stack, flavour, device, dtype), config.Config(model_flavour=flavour).stage
    if stack == "ours":
        params = lora.add_lora(unet, rank, rank) if mode == "lora" else list(unet.parameters())
        unet.gradient_checkpointing, _ = ckpt, unet.set_attention_backend(attention)
        unet = unet.to(memory_format=torch.channels_last)
        opt = optim.AdamW(params, lr=1e-6, generator=torch.Generator(device).manual_seed(0))
        net = torch.compile(unet) if compiled else unet
        forward = lambda x, t, e, lvl: net(x, t, e, noise_level=lvl)
    else:
        from peft import LoraConfig

        if mode == "lora":
            unet.requires_grad_(False)
            unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(lora.DEFAULT_TARGETS)))
        if ckpt:
            unet.enable_gradient_checkpointing()
        if attention == "xformers":
            unet.enable_xformers_memory_efficient_attention()
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-6)
        forward = lambda x, t, e, lvl: unet(x, t, e, class_labels=lvl).sample
    unet.train()
    sched, g = diffusion.Schedule(), torch.Generator(device).manual_seed(0)
    x0 = torch.randn(batch, 3, height, width, device=device, generator=g)
    noise, text = torch.randn_like(x0), torch.randn(batch, 77, 4096, device=device, dtype=dtype, generator=g)
    t = torch.randint(0, 1000, (batch,), device=device, generator=g)
    x_t = diffusion.q_sample(sched, x0, noise, t)
    x_in, level = x_t, None
    if stage == 2:
        x_in, level = torch.cat([x_t, x0], 1), torch.randint(0, 1000, (batch,), device=device, generator=g)
    x_in = x_in.to(dtype).contiguous(memory_format=torch.channels_last if stack == "ours" else torch.contiguous_format)

    # Gradients stay allocated between steps on both sides (ours live in one flat buffer), so the baseline holds
    # weights, gradients and optimizer state alike, and the peak over it is what a step adds: activations.
    zero_grad = opt.zero_grad if stack == "ours" else lambda: opt.zero_grad(set_to_none=False)

    def step():
        out = forward(x_in, t, text, level)
        diffusion.training_losses(sched, out, x0, x_t, t, noise).mean().backward()
        opt.step(), zero_grad()

    step()  # allocates gradients and optimizer state
    base = _memory_reset(device)
    warmup = (1 if device.type == "cpu" else 3) if warmup is None else warmup
    times = _timed(step, device, warmup=warmup, repeat=repeat)
    peak = _memory_peak(device)
    result = {"step_s": statistics.median(times), "samples_per_s": batch / statistics.median(times),
              "peak_mib": (peak if device.type == "cuda" else peak - base) / 2**20,
              "trainable": sum(p.numel() for p in params)}
    if device.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None)
        result["tflops"] = counter.get_total_flops() / result["step_s"] / 1e12
        result["mfu"] = result["tflops"] * 1e12 / peak_flops if peak_flops else None
    return result


def estimate(stack, flavour, mode, batch, size, ckpt, rank=32) -> dict:
    """The predicted peak of live tensors and the FLOPs of one bf16 training step at real size, counted on fake
    tensors (memory.py): ours through dryrun.estimate_step (the real setup_model and train_step), the reference as
    diffusers' UNet2DConditionModel (+ peft LoRA on the same targets) with torch.optim.AdamW (foreach, as on CUDA)
    and the same loss. Nothing is allocated or downloaded, so it runs in this process."""
    import config
    import diffusion
    import dryrun
    import lora
    import memory
    import model

    square = {"instance_data_dir": "-", "resolution": size, "crop": True, "crop_aspect": "square"}
    cfg = config.Config(model_flavour=flavour, model_type=mode, lora_rank=rank, train_batch_size=batch,
                        gradient_checkpointing=ckpt, mixed_precision="bf16", output_dir=tempfile.gettempdir(),
                        datasets=[square])
    if stack == "ours":
        est = dryrun.estimate_step(cfg)
        return {"peak_gib": est["peak_bytes"] / memory.GiB, "tflop": est["flops_per_step"] / 1e12,
                "peak_phase": est["peak_phase"]}
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    def one_step(counter, live=None) -> None:  # memory and FLOPs in separate passes, as dryrun.estimate_step
        with torch.device("meta"):
            unet = UNet2DConditionModel(**model.FLAVOURS[flavour]["config"])
        if mode == "lora":
            unet.requires_grad_(False)
            unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(lora.DEFAULT_TARGETS)))
        unet.to(torch.bfloat16)  # peft makes its adapters fp32 on the meta device; a real run casts them with the rest
        if ckpt:
            unet.enable_gradient_checkpointing()  # diffusers has one mode (its resnets), for "attention" and "full"
        unet.train()
        label = (lambda phase: setattr(live, "phase", phase)) if live is not None else (lambda phase: None)
        with FakeTensorMode(), counter:
            memory.materialise(unet)
            sched = diffusion.Schedule()
            opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-6, foreach=True)
            x0 = noise = torch.zeros(batch, 3, size, size)
            t, text = torch.zeros(batch, dtype=torch.long), torch.zeros(batch, 77, 4096, dtype=torch.bfloat16)
            x_t = diffusion.q_sample(sched, x0, noise, t)
            x_in, level = (x_t, None) if cfg.stage == 1 else (torch.cat([x_t, x0], 1), t)
            label("forward")
            out = unet(x_in.to(torch.bfloat16), t, text, class_labels=level).sample
            label("loss and backward")
            diffusion.training_losses(sched, out, x0, x_t, t, noise).mean().backward()
            label("optimizer step")
            opt.step()

    live, flops = memory.LiveBytes(), FlopCounterMode(display=False)
    one_step(live, live)
    one_step(flops)
    return {"peak_gib": live.peak / memory.GiB, "tflop": flops.get_total_flops() / 1e12, "peak_phase": live.peak_phase}


def estimate_rows() -> list[dict]:
    """The five flavours x {LoRA r32, full fine-tune} x {no checkpointing, "attention", "full"}, at the seed
    guide's settings: stage I batch 4 at 64 px, stage II batch 1 and 4 at 256 px; ours and the reference."""
    import model

    rows = []
    for flavour, spec in model.FLAVOURS.items():
        size = spec["resolution"]
        for batch in (4,) if size == 64 else (1, 4):
            for mode in ("lora", "full"):
                for ckpt in (False, "attention", "full"):
                    print(f"estimate {flavour} {mode} b{batch} ckpt={ckpt} ...", file=sys.stderr, flush=True)
                    kw = dict(flavour=flavour, mode=mode, batch=batch, size=size, ckpt=ckpt)
                    ours = estimate("ours", **kw)
                    try:
                        ref = estimate("reference", **kw)
                    except ImportError:  # diffusers/peft are test-only dependencies
                        ref = None
                    rows.append({**kw, "ours": ours, "reference": ref})
    return rows


MEMORY_OPTIONS = {  # name -> (model_type, gradient checkpointing, the options); the recipes' settings, and plain
    "full, plain AdamW": ("full", "attention", {}),
    "full, fused + 8-bit (i_xl_full_24gb)": ("full", "attention", dict(fused_backward=True, optimizer_state="8bit")),
    "full, fused + factored": ("full", "attention", dict(fused_backward=True,
                                                         factored_second_moment=True)),
    "full, fused + 8-bit + factored": ("full", "attention", dict(fused_backward=True,
                                                                 optimizer_state="8bit", factored_second_moment=True)),
    "LoRA r32, plain": ("lora", "full", {}),
    "LoRA r32, int8 base (i_xl_lora_8gb)": ("lora", "full", dict(quantise_base=True, text_encoder_dtype="int8")),
}


def memory_option_rows(flavours=("i-medium-400m", "i-xlarge-4.3b", "ii-medium-450m", "ii-large-1.2b")) -> list[dict]:
    """Each memory option's predicted peak per flavour (stage I batch 4 at 64 px, stage II batch 1 at 256 px), its
    T5 cache build and sample.py's peak, on fake tensors (dryrun.estimate_step, sample.estimate)."""
    import config
    import dryrun
    import memory
    import model
    import sample

    rows = []
    for flavour in flavours:
        size = model.FLAVOURS[flavour]["resolution"]
        square = {"instance_data_dir": "-", "resolution": size, "crop": True, "crop_aspect": "square"}
        for name, (mode, ckpt, options) in MEMORY_OPTIONS.items():
            print(f"memory {flavour} {name} ...", file=sys.stderr, flush=True)
            cfg = config.Config(model_flavour=flavour, model_type=mode, lora_rank=32, train_batch_size=4 if size == 64
                                else 1, gradient_checkpointing=ckpt, mixed_precision="bf16",
                                output_dir=tempfile.gettempdir(), datasets=[square], **options)
            est = dryrun.estimate_step(cfg, flops=False)
            row = {"flavour": flavour, "option": name, "batch": cfg.train_batch_size, "size": size,
                   "peak_gib": est["peak_bytes"] / memory.GiB}
            if mode == "lora":  # the rest of the job on the same card: the T5 cache and sampling
                sampling = sample.estimate(cfg, dryrun.unet_config_of(cfg))
                row |= {"t5_gib": sampling["t5_peak_bytes"] / memory.GiB,
                        "sample_gib": sampling["unet_peak_bytes"] / memory.GiB}
            rows.append(row)
    return rows


def print_memory_options(rows: list[dict]) -> None:
    print("| U-Net | job | training step | T5 cache / sample.py | smallest card (training) |")
    print("|---|---|---|---|---|")
    for r in rows:
        rest = f"{r['t5_gib']:.1f} / {r['sample_gib']:.1f} GiB" if "t5_gib" in r else "-"
        print(f"| {r['flavour']} (b{r['batch']}, {r['size']} px) | {r['option']} | {r['peak_gib']:.1f} GiB | {rest} | "
              f"{smallest_card(r['peak_gib'])} |")


def smallest_card(gib: float) -> str:
    """The smallest card of memory.GPUS that holds a peak of `gib` with memory.ALLOWANCE."""
    import memory

    ok = sorted({m for m, _ in memory.GPUS.values() if memory.fits(gib * memory.GiB, m)[0]})
    return f"{ok[0]} GB" if ok else "none listed"


def print_estimates(rows: list[dict]) -> None:
    """Markdown, one row per job: the predicted peak in each checkpointing mode, ours and the reference's, and the
    smallest card of memory.GPUS that holds the lowest of each (with memory.ALLOWANCE)."""
    jobs: dict[tuple, dict] = {}
    for r in rows:
        jobs.setdefault((r["flavour"], r["mode"], r["batch"], r["size"]), {})[r["ckpt"] or "off"] = r
    print("| U-Net | job | ours: no ckpt / attention / full | reference: no ckpt / ckpt | ours fits | reference fits "
          "| TFLOP/step |")
    print("|---|---|---|---|---|---|---|")
    for (flavour, mode, batch, size), by in jobs.items():
        ours = [by[k]["ours"]["peak_gib"] for k in ("off", "attention", "full")]
        ref = [by[k]["reference"]["peak_gib"] for k in ("off", "attention") if by[k]["reference"]]
        job = f"{'LoRA r32' if mode == 'lora' else 'full fine-tune'}, b{batch}, {size} px"
        print(f"| {flavour} | {job} | {' / '.join(f'{g:.1f}' for g in ours)} GiB | "
              f"{' / '.join(f'{g:.1f}' for g in ref) + ' GiB' if ref else '-'} | {smallest_card(min(ours))} | "
              f"{smallest_card(min(ref)) if ref else '-'} | {by['off']['ours']['tflop']:.1f} |")


def case_sample(stack, flavour, batch, height, width, steps, dtype, device, repeat=2):
    """Stage I sampling with classifier-free guidance: ours vs diffusers' IFPipeline on the same weights."""
    import sample

    device, dtype = torch.device(device), getattr(torch, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        unet = _unets(stack, flavour, device, dtype, Path(tmp) if stack == "ours" else None).eval()
    g = torch.Generator(device).manual_seed(0)
    emb, neg = (torch.randn(batch, 77, 4096, device=device, dtype=dtype, generator=g) for _ in range(2))
    if stack == "ours":
        unet = unet.to(memory_format=torch.channels_last)
        run = lambda: sample.stage1(unet, emb, neg, height=height, width=width, steps=steps,
                                    generator=torch.Generator(device).manual_seed(1))
    else:
        from diffusers import DDPMScheduler, IFPipeline

        import diffusion

        pipe = IFPipeline(tokenizer=None, text_encoder=None, unet=unet, safety_checker=None, feature_extractor=None,
                          watermarker=None, requires_safety_checker=False,
                          scheduler=DDPMScheduler.from_config(diffusion.scheduler_config(1)))
        pipe.set_progress_bar_config(disable=True)
        run = lambda: pipe(prompt_embeds=emb, negative_prompt_embeds=neg, height=height, width=width,
                           num_inference_steps=steps, output_type="pt",
                           generator=torch.Generator(device).manual_seed(1))
    with torch.no_grad():
        times = _timed(run, device, warmup=1, repeat=repeat)
    return {"sample_s": statistics.median(times), "s_per_step": statistics.median(times) / steps}


def case_t5(device, d_model=512, layers=8, heads=8, d_ff=1024, dtype="fp32", captions=256, repeat=3):
    """The text cache: bytes per caption, reading a batch of 64, and batched vs one-by-one encoding with a
    random T5 of the given size whose weights and arithmetic are in `dtype`."""
    import t5cache

    texts = [f"a photo of {i} red things on a wooden table, number {i * 7919 % 1000}" for i in range(captions)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t5cache.make_tiny_t5(tmp / "t5", texts, d_model=d_model, layers=layers, heads=heads, d_ff=d_ff, vocab_size=500)
        enc = t5cache.TextEncoder(str(tmp / "t5"), device=device, dtype=dtype)
        batched = _timed(lambda: enc.encode(texts[:64]), torch.device(device), 1, repeat)
        single = _timed(lambda: [enc.encode([c]) for c in texts[:32]], torch.device(device), 1, repeat)
        stats = t5cache.build_cache(texts, enc, tmp / "cache", progress=False)
        cache = t5cache.TextCache(tmp / "cache")
        raw = 77 * d_model * 2  # bf16
        (tmp / "pt").mkdir()
        for i, c in enumerate(texts[:64]):
            torch.save(cache.get([c]).clone(), tmp / "pt" / f"{i}.pt")
        pt_bytes = sum(f.stat().st_size for f in (tmp / "pt").iterdir()) / 64
        buf = torch.empty(64, 77, d_model, dtype=torch.bfloat16)
        read_ours = _timed(lambda: cache.get(texts[:64], out=buf), torch.device("cpu"), 1, 5)
        read_pt = _timed(lambda: torch.cat([torch.load(tmp / "pt" / f"{i}.pt", weights_only=True)
                                            for i in range(64)]), torch.device("cpu"), 1, 5)
    return {"bytes_per_caption": stats["bytes"] / stats["total"], "raw_bytes": raw, "pt_bytes_per_caption": pt_bytes,
            "read64_ms": 1e3 * statistics.median(read_ours), "read64_pt_ms": 1e3 * statistics.median(read_pt),
            "batched_captions_per_s": 64 / statistics.median(batched),
            "single_captions_per_s": 32 / statistics.median(single)}


def case_data(n=12, size=(3000, 2000)):
    """One core: the full item pipeline (reduced-scale decode + progressive resize) vs full decode + one resize."""
    import numpy as np
    from PIL import Image

    import data

    torch.set_num_threads(1)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(n):  # photo-like: smooth gradients plus texture
            yy, xx = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
            img = 127 + 60 * np.sin(xx / (50 + 10 * i))[..., None] * np.cos(yy / 70)[..., None] \
                + rng.normal(0, 12, (size[1], size[0], 3))
            paths.append(Path(tmp) / f"{i}.jpg")
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(paths[-1], quality=90)
        target = (96, 64)
        fast = _timed(lambda: [data.load_item(p, target) for p in paths], torch.device("cpu"), 1, 3)
        naive = _timed(lambda: [data.load_naive(p, target) for p in paths], torch.device("cpu"), 1, 3)
        quality = min(data.psnr(data.load_item(p, target), data.load_item(p, target, fast=False)) for p in paths)
    return {"samples_per_s": n / statistics.median(fast), "naive_samples_per_s": n / statistics.median(naive),
            "psnr_db_min": quality}


CASES = {"train": case_train, "sample": case_sample, "t5": case_t5, "data": case_data}


# ---------------------------------------------------------------------------------------------
# the driver


def run_case(case: str, timeout: float | None = None, **kw) -> tuple[dict | None, list[str]]:
    """Run one case in a fresh interpreter: (its result, []), or (None, the last lines of what it printed to stderr)
    when it failed or ran past `timeout` seconds."""
    env = dict(os.environ)
    if case == "train":  # peak RSS must follow live tensors; this slows both stacks' CPU steps alike
        env |= {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    cmd = [sys.executable, __file__, "--_case=" + json.dumps({"case": case, **kw})]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, [f"timed out after {timeout:.0f} s"]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        return None, proc.stderr.strip().splitlines()[-3:] or [f"exit code {proc.returncode}, no result"]
    return json.loads(lines[-1][7:]), []


def measure(case: str, **kw) -> dict | None:
    """run_case, for the tables: None when it failed (e.g. diffusers missing), with its error on stderr."""
    result, error = run_case(case, **kw)
    if result is None:
        print(f"  {case} {kw}: failed\n    " + "\n    ".join(error), file=sys.stderr)
    return result


def merge(runs: list[dict | None]) -> dict | None:
    """Several rounds of one case: the median of every number, and each round's step time."""
    runs = [r for r in runs if r]
    if len(runs) < 2:
        return runs[0] if runs else None
    out = {k: statistics.median(r[k] for r in runs) if isinstance(v, (int, float)) else v for k, v in runs[0].items()}
    each = {f"{k}_each": [r[k] for r in runs] for k in ("step_s", "sample_s") if k in out}
    return {**out, "rounds": len(runs), **each}


def plan(args: dict) -> list[tuple[str, str, dict, bool]]:
    """(group, row name, case kwargs, has a reference) for every row to measure."""
    dev, fl = args["device"], args["flavour"]
    gpu = dev == "cuda"
    dtype = "bfloat16" if gpu else "float32"
    common = dict(dtype=dtype, device=dev, attention=args["attention"])
    stage2 = "ii-large-1.2b" if fl.startswith("i-x") else "ii-medium-450m"
    res2 = 256 if gpu else 128
    rows = []
    for ckpt in (False, "attention", "full"):
        rows.append(("lora", f"{fl} LoRA r32, b4, 64x64, ckpt={ckpt}",
                     dict(case="train", flavour=fl, mode="lora", batch=4, height=64, width=64, ckpt=ckpt, **common),
                     True))
    for compiled in (False, True):  # the same step eager and through torch.compile, side by side
        rows.append(("compile", f"{fl} LoRA r32, b4, 64x64, ckpt=False, {'compiled' if compiled else 'eager'}",
                     dict(case="train", flavour=fl, mode="lora", batch=4, height=64, width=64, ckpt=False,
                          compiled=compiled, **common), False))
    full = dict(case="train", flavour=fl, mode="full", batch=4, height=64, width=64, ckpt="full", **common)
    rows.append(("full", f"{fl} full fine-tune, b4, 64x64, ckpt=full", full, True))
    rows.append(("stage2", f"{stage2} LoRA r32, b{4 if gpu else 1}, {res2}x{res2}",
                 dict(case="train", flavour=stage2, mode="lora", batch=4 if gpu else 1, height=res2, width=res2,
                      ckpt=False, **common), True))
    for b in (1, 16):
        rows.append(("scaling", f"{fl} LoRA, b{b}, 64x64", dict(case="train", flavour=fl, mode="lora", batch=b,
                                                              height=64, width=64, ckpt=False, **common), False))
    for w, h in ((96, 64), (128, 128)):
        rows.append(("scaling", f"{fl} LoRA, b4, {w}x{h}", dict(case="train", flavour=fl, mode="lora", batch=4,
                                                              height=h, width=w, ckpt=False, **common), False))
    rows.append(("sample", f"{fl} stage I sampling, b1, 64x64, CFG, {20 if gpu else 10} steps",
                 dict(case="sample", flavour=fl, batch=1, height=64, width=64, steps=20 if gpu else 10, dtype=dtype,
                      device=dev), True))
    t5 = dict(d_model=4096, layers=24, heads=64, d_ff=10240) if gpu else dict(d_model=512, layers=8, heads=8, d_ff=1024)
    for t5_dtype in ("bf16",) if gpu else ("fp32", "bf16"):  # the GPU row is T5-XXL's size (random weights)
        rows.append(("t5", f"T5 cache (d_model {t5['d_model']}, {t5['layers']} layers, {t5_dtype} encoder)",
                     dict(case="t5", device=dev, dtype=t5_dtype, **t5), False))
    rows.append(("data", "data pipeline, 3000x2000 JPEG -> 96x64, one core", dict(case="data"), False))
    return [r for r in rows if args["only"] is None or r[0] in args["only"]]


def ratios(ours: dict, ref: dict) -> dict:
    keys = ("step_s", "peak_mib", "sample_s")
    return {f"{k.split('_')[0]}_ratio": ours[k] / ref[k] for k in keys if k in ours and ref and k in ref and ref[k]}


def fmt(r: dict | None) -> str:
    if not r:
        return "-"
    parts = {"step_s": "{:.3f} s/step", "samples_per_s": "{:.2f} samples/s", "peak_mib": "{:.0f} MiB",
             "mfu": "MFU {:.1%}", "sample_s": "{:.2f} s", "bytes_per_caption": "{:.0f} B/caption",
             "read64_ms": "read 64: {:.1f} ms", "batched_captions_per_s": "{:.1f} captions/s batched",
             "psnr_db_min": "PSNR >= {:.1f} dB"}
    return ", ".join(f.format(r[k]) for k, f in parts.items() if r.get(k) is not None)


def print_table(report: dict) -> None:
    """The markdown table of a report (as bench.json holds it), with its machine, date and command."""
    print(f"\n{report['machine']}, torch {report['torch']}, {report['date']}: `{report['command']}`\n")
    print("| measurement | ours | reference | ours / reference |\n|---|---|---|---|")
    for row in report["rows"]:
        rs = ", ".join(f"{k.replace('_ratio', '')} {v:.2f}x" for k, v in row.items() if k.endswith("_ratio"))
        extra = ""
        if row["group"] == "t5" and row["ours"]:
            o = row["ours"]
            extra = (f" (raw {o['raw_bytes']} B; per-caption .pt {o['pt_bytes_per_caption']:.0f} B, read 64: "
                     f"{o['read64_pt_ms']:.1f} ms; one by one: {o['single_captions_per_s']:.1f} captions/s)")
        if row["group"] == "data" and row["ours"]:
            extra = f" (naive full decode + resize: {row['ours']['naive_samples_per_s']:.2f} samples/s)"
        print(f"| {row['name']} | {fmt(row['ours'])}{extra} | {fmt(row['reference'])} | {rs or '-'} |")


# ---------------------------------------------------------------------------------------------
# the smoke run: every training mode for two steps on tiny U-Nets, the sampler, then one real-size step (a GPU)

# The training modes as Config keys; "bitfit" alone is a full fine-tune of the biases only, as train.py runs it
KINDS = {"lora": dict(model_type="lora"), "dora": dict(model_type="lora", use_dora=True),
         "lora+bitfit": dict(model_type="lora", use_bitfit=True), "full": dict(model_type="full"),
         "bitfit": dict(model_type="full", use_bitfit=True),
         "full fused 8bit": dict(model_type="full", fused_backward=True, optimizer_state="8bit"),
         "lora int8 factored": dict(model_type="lora", quantise_base=True, factored_second_moment=True)}
SMOKE_BUDGET_S = 540  # no real-size row starts (or runs on) past this: the whole GPU smoke stays under 10 minutes
SMOKE_PROMPT = "a red square"  # a training caption, so it is in the text cache the rows build


def smoke_rows(device: str) -> list[dict]:
    """The training rows of the smoke run: a covering set, not the product of the axes. Every stage, mode,
    checkpointing mode and attention kernel appears at least once; torch.compile appears with each mode and each
    checkpointing mode, and each compiled row has its eager twin (the same row uncompiled) to compare with:

        stage  mode         checkpointing  attention  compiled
        I      lora         False          sdpa       and eager
        I      dora         "attention"    sdpa       and eager
        I      full         "full"         math       and eager
        II     bitfit       "attention"    sdpa       and eager
        II     lora+bitfit  "full"         math       eager
        II     full         False          sdpa       eager
        I      lora         "attention"    xformers   eager (CUDA with xformers installed; else reported skipped)
        I      full, fused backward + 8-bit moments, "attention", sdpa, eager
        II     LoRA on the int8 base + factored moments, False, sdpa, eager

    mixed_precision is bf16 on CUDA, fp32 on the CPU. On the CPU only the first row is compiled: inductor needs
    1.5-2 minutes of two cores for it from a cold cache (15-30 s warm), and 2-4 minutes for each of the other three
    (they pass there too)."""
    rows = [dict(stage=1, kind="lora", ckpt=False, attention="sdpa"),
            dict(stage=1, kind="dora", ckpt="attention", attention="sdpa"),
            dict(stage=1, kind="full", ckpt="full", attention="math"),
            dict(stage=2, kind="bitfit", ckpt="attention", attention="sdpa"),
            dict(stage=2, kind="lora+bitfit", ckpt="full", attention="math"),
            dict(stage=2, kind="full", ckpt=False, attention="sdpa"),
            dict(stage=1, kind="lora", ckpt="attention", attention="xformers"),
            dict(stage=1, kind="full fused 8bit", ckpt="attention", attention="sdpa"),
            dict(stage=2, kind="lora int8 factored", ckpt=False, attention="sdpa")]
    compiled = rows[:4] if device == "cuda" else rows[:1]
    return [{**r, "compile": False} for r in rows] + [{**r, "compile": True} for r in compiled]


def row_name(row: dict) -> str:
    return (f"{'I' if row['stage'] == 1 else 'II'} {row['kind']}, ckpt={row['ckpt']}, {row['attention']}, "
            f"{'compiled' if row['compile'] else 'eager'}")


def _row_dir(root: Path, row: dict) -> Path:
    return root / "runs" / "".join(c if c.isalnum() else "-" for c in row_name(row))


def smoke_project(root: Path) -> None:
    """Eight pictures in two aspect ratios (two buckets) with .txt captions, and a tiny T5 that knows them."""
    from PIL import Image

    import t5cache

    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (240, 240, 240)}
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(8):
        name = list(colours)[i % 4]
        Image.new("RGB", (64, 64) if i % 2 else (96, 64), colours[name]).save(root / "images" / f"{i}.png")
        (root / "images" / f"{i}.txt").write_text(f"a {name} square\n")
    t5cache.make_tiny_t5(root / "t5", [f"a {c} square" for c in colours] + [""])


def smoke_config(root: Path, row: dict, device: str):
    """The tiny run of `row`: 2 steps of batch 2 with a checkpoint at step 2, validation (samples and held-out
    loss) at steps 0 and 2, the final save, and every step's loss in metrics.jsonl."""
    import model
    from config import Config

    stage = row["stage"]
    res = 32 if stage == 1 else 64  # stage II's low-res partners are 16 px
    valid = dict(validation_prompts=[SMOKE_PROMPT]) if stage == 1 else dict(num_eval_images=1)
    return Config(
        unet_config=model.tiny_config(stage), model_flavour="i-medium-400m" if stage == 1 else "ii-medium-450m",
        **KINDS[row["kind"]], lora_rank=4, gradient_checkpointing=row["ckpt"], attention_mechanism=row["attention"],
        compile=row["compile"], mixed_precision="bf16" if device == "cuda" else "fp32", device=device,
        text_encoder=str(root / "t5"), text_cache_dir=str(root / "cache"), output_dir=str(_row_dir(root, row)),
        datasets=[{"id": "smoke", "instance_data_dir": str(root / "images"), "caption_strategy": "textfile",
                   "resolution": res, "minimum_image_size": 32}],
        dataloader_num_workers=0, train_batch_size=2, max_train_steps=2, checkpointing_steps=2, logging_steps=1,
        learning_rate=1e-3, lr_scheduler="constant", seed=3, validation_steps=2, validation_num_inference_steps=2,
        validation_loss_images=1, **valid)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# The compiled run's first step against its eager twin's (same config and seed: the same batch, noise, timesteps and
# initial weights, so only the arithmetic differs): its loss and its gradient norm. Measured on the CPU, inductor
# against eager on the rows a GPU compiles: in fp32 they agree to 4e-7 (inductor fuses and reorders sums, a few ulps
# per op), so 1e-4 for both. In bf16 eager rounds every op's output to bf16 where inductor keeps fused pointwise
# chains in fp32: the loss moved by up to 4e-4, the gradient norm by up to 4e-3 (stage I rows; inductor's CPU code
# for the stage II one does not build in bf16); a GPU fuses the same way around the same cuDNN/cuBLAS kernels, so
# 3e-3 and 3e-2 leave a margin of 7. A random U-Net's loss is a poor detector (its output is small next to the
# noise it is scored against): dropping every attention output moves it by 0.6-0.9%, dropping the FiLM scale and
# shift by 0.5-1.3%, a wrong head split by 0.04-0.06%; the gradient norm moves by 100%, 0.005-8% and 1-2.5%. So fp32
# catches all three and bf16 the first two, not the head split: finer checks of the compiled graph (every gradient,
# in fp32) are tests/test_compile.py's.
COMPILE_RTOL = {"fp32": {"loss": 1e-4, "grad_norm": 1e-4}, "bf16": {"loss": 3e-3, "grad_norm": 3e-2}}


def smoke_train(root: Path, row: dict, device: str) -> dict:
    """One training row through train.main: its losses, or the error that stopped it (one line). Output (train.py's
    progress, prints and warnings) goes to the row's log.txt."""
    import contextlib

    import torch._dynamo

    import lora
    import train
    from config import torch_dtype

    cfg = smoke_config(root, row, device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"name": row_name(row), "row": row, "status": "ok", "detail": "", "steps": []}
    if row["attention"] == "xformers" and (device != "cuda" or importlib.util.find_spec("xformers") is None):
        return result | {"status": "skipped", "detail": "xformers needs CUDA and `pip install xformers`"}
    try:
        with open(out / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            # a fresh compile per row: none recompiles on guards that another row left (nor, past the recompile
            # limit, silently runs eager)
            torch._dynamo.reset()
            summary = train.main(cfg)
        if summary.get("interrupted"):  # Ctrl-C: train.main saved and returned; the smoke run stops too
            raise KeyboardInterrupt
        steps = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]  # not the eval_loss rows
        result["steps"] = [{"loss": r["loss"], "grad_norm": r["grad_norm"]} for r in steps]
        final = out / (lora.LORA_FILE if cfg.model_type == "lora" else "unet")
        missing = [p.name for p in (final, out / "checkpoint-2", out / "samples" / "step-000002.png") if not p.exists()]
        if summary["step"] != 2 or missing:
            raise RuntimeError(f"ran {summary['step']} steps; missing {missing}")
        if cfg.model_type == "lora":  # the base it trained on, for the sampler rows (setup_model's seeded init)
            import dataclasses

            base_cfg = dataclasses.replace(cfg, model_type="full", use_dora=False, use_bitfit=False,
                                           attention_mechanism="sdpa")
            unet, _, _ = train.setup_model(base_cfg, torch.device("cpu"), torch_dtype(cfg.mixed_precision, device))
            unet.save_pretrained(out / "base" / "unet")
        bad = [r["step"] for r in steps if not math.isfinite(r["loss"]) or r["skipped_steps"]]
        losses, norms = (", ".join(f"{r[k]:{f}}" for r in steps) for k, f in (("loss", ".6f"), ("grad_norm", ".4g")))
        result["detail"] = f"loss {losses}; grad norm {norms}"
        if bad:
            result |= {"status": "FAILED", "detail": result["detail"] + f"; non-finite loss or gradient at steps {bad}"}
    except Exception as e:
        import traceback

        with open(out / "log.txt", "a") as log:  # the whole story where the one line points
            traceback.print_exc(file=log)
        result |= {"status": "FAILED", "detail": one_line(e) + f" (log: {out / 'log.txt'})"}
    return result


def compare_compiled(results: list[dict], device: str) -> None:
    """Flag (as FAILED) each compiled row whose first step's loss or gradient norm is off its eager twin's by more
    than COMPILE_RTOL."""
    rtol = COMPILE_RTOL["bf16" if device == "cuda" else "fp32"]
    eager = {json.dumps({**r["row"], "compile": None}): r for r in results if "row" in r and not r["row"]["compile"]}
    for r in results:
        if "row" not in r or not r["row"]["compile"] or r["status"] != "ok":
            continue
        twin = eager.get(json.dumps({**r["row"], "compile": None}))
        if twin is None or twin["status"] != "ok":
            r |= {"status": "FAILED", "detail": r["detail"] + "; no eager twin to compare with"}
            continue
        for key, tol in rtol.items():
            a, b = r["steps"][0][key], twin["steps"][0][key]
            rel = abs(a - b) / max(abs(b), 1e-12)
            r["detail"] += f"; first {key} vs eager: {rel:.1e} relative (tolerance {tol:.0e})"
            if not rel <= tol:  # a NaN fails too
                r["status"] = "FAILED"
                r["detail"] += " MISMATCH"


def smoke_sample(root: Path, results: list[dict], device: str):
    """The sampler on what the rows trained: sample.main's cascade (stage I -> II) on the two full fine-tunes, and
    the LoRA files loaded onto their bases (sample.load_unet) through sample.cascade, whose images must be finite."""
    import contextlib

    import lora
    import sample
    import t5cache
    from config import Config

    def trained(stage, kinds):
        found = [r for r in results if "row" in r and r["row"]["stage"] == stage and r["row"]["kind"] in kinds
                 and not r["row"]["compile"] and r["status"] == "ok"]
        if not found:
            raise RuntimeError(f"no stage {stage} {'/'.join(kinds)} row trained")
        return _row_dir(root, found[0]["row"])

    def cascade_main():
        cfg = Config(pretrained=str(trained(1, ["full"])), stage2=str(trained(2, ["full"])),
                     text_encoder=str(root / "t5"), text_cache_dir=str(root / "cache"),
                     output_dir=str(root / "sample"), prompt=SMOKE_PROMPT, resolution="16", steps=2, stage2_steps=2,
                     device=device)
        got = sample.main(cfg)
        missing = [str(p) for p in [*got["images"], *got["images_low"], got["grid"]] if not Path(p).is_file()]
        if missing or len(got["images"]) != 1:
            raise RuntimeError(f"images not written: {missing}")
        return f"{Path(got['images'][0]).name} written"

    def cascade_lora():
        one, two = trained(1, ["lora", "dora"]), trained(2, ["lora", "lora+bitfit"])
        unet1, kw1 = sample.load_unet(one / "base", lora=one / lora.LORA_FILE, device=device, stage=1)
        unet2, kw2 = sample.load_unet(two / "base", lora=two / lora.LORA_FILE, device=device, stage=2)
        cache = t5cache.TextCache(root / "cache")
        emb, neg = cache.get([SMOKE_PROMPT]), cache.get([""])
        low, high = sample.cascade(unet1, unet2, emb, neg, stage1_kw={**kw1, "height": 16, "width": 16, "steps": 2},
                                   stage2_kw={**kw2, "steps": 2}, generator=torch.Generator(device).manual_seed(0))
        if low.shape != (1, 3, 16, 16) or high.shape != (1, 3, 64, 64):
            raise RuntimeError(f"shapes {tuple(low.shape)}, {tuple(high.shape)}")
        if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
            raise RuntimeError("non-finite images")
        return f"16x16 -> 64x64, finite, in {str(high.dtype).removeprefix('torch.')}"

    for name, fn in (("sample.main: cascade of the full fine-tunes (I -> II)", cascade_main),
                     ("sample.load_unet + cascade: the LoRAs on their bases (I -> II)", cascade_lora)):
        t0 = time.time()
        try:
            with open(root / "sample.log", "a") as log, contextlib.redirect_stdout(log), \
                    contextlib.redirect_stderr(log):
                detail, status = fn(), "ok"
        except Exception as e:
            detail, status = one_line(e), "FAILED"
        yield {"name": name, "status": status, "detail": detail, "seconds": time.time() - t0}


# Real size (random weights of model.FLAVOURS), cheapest first: the time budget drops the last ones
REAL_ROWS = [dict(flavour="i-medium-400m", mode="lora", batch=4, size=64, ckpt=False),
             dict(flavour="i-xlarge-4.3b", mode="lora", batch=4, size=64, ckpt=False),
             dict(flavour="ii-large-1.2b", mode="lora", batch=4, size=256, ckpt=False),
             dict(flavour="i-medium-400m", mode="full", batch=4, size=64, ckpt="full")]


def smoke_real(kw: dict, seconds_left: float) -> dict:
    """One measured bf16 training step at real size in a fresh process (case_train: its peak is
    max_memory_allocated, weights included), next to the dry run's prediction for the same settings (estimate: the
    real setup_model and train_step on fake tensors)."""
    job = f"{'LoRA r32' if kw['mode'] == 'lora' else 'full fine-tune'}, b{kw['batch']}, {kw['size']} px"
    result = {"name": f"{kw['flavour']} {job}, ckpt={kw['ckpt']}, one step", "status": "ok", "detail": ""}
    if seconds_left < 60:
        return result | {"status": "skipped", "detail": "time budget spent"}
    try:
        predicted = estimate("ours", **kw)
    except Exception as e:
        return result | {"status": "FAILED", "detail": "the dry run: " + one_line(e)}
    got, error = run_case("train", timeout=seconds_left, stack="ours", flavour=kw["flavour"], mode=kw["mode"],
                          batch=kw["batch"], height=kw["size"], width=kw["size"], ckpt=kw["ckpt"], dtype="bfloat16",
                          device="cuda", attention="sdpa", warmup=1, repeat=1)
    if got is None:
        return result | {"status": "FAILED", "detail": error[-1]}
    measured = got["peak_mib"] / 1024
    return result | {"measured_gib": measured, "predicted_gib": predicted["peak_gib"],
                     "detail": f"peak {measured:.2f} GiB measured (max_memory_allocated), {predicted['peak_gib']:.2f} "
                               f"GiB predicted ({measured / predicted['peak_gib']:.2f}x), {got['step_s']:.3f} s/step"}


def smoke(device: str, root: Path, rows: list[dict] | None = None):
    """The smoke run in `root`, row by row (a generator of result dicts: name, status ok / FAILED / skipped, detail,
    seconds, elapsed): the training rows (smoke_rows, or `rows`), the sampler on their outputs, then on CUDA the
    real-size rows while the time budget lasts."""
    import contextlib

    start, results = time.time(), []
    with open(root / "setup.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        smoke_project(root)
    for row in rows if rows is not None else smoke_rows(device):
        t0 = time.time()
        results.append(smoke_train(root, row, device) | {"seconds": time.time() - t0})
        if row["compile"]:
            compare_compiled(results, device)
        yield results[-1] | {"elapsed": time.time() - start}
    for r in smoke_sample(root, results, device):
        yield r | {"elapsed": time.time() - start}
    for kw in REAL_ROWS if device == "cuda" else []:
        t0 = time.time()
        r = smoke_real(kw, SMOKE_BUDGET_S - (t0 - start))
        yield r | {"seconds": time.time() - t0, "elapsed": time.time() - start}


def smoke_main(argv: list[str]) -> None:
    """`python bench.py --smoke [--device=cpu|cuda] [--out=smoke.json]`: exits 1 if any row failed. The tiny runs'
    outputs and logs go to a temporary folder, kept (and named) when a row failed."""
    import shutil

    args = {"device": "cuda" if torch.cuda.is_available() else "cpu", "out": None}
    for a in argv:
        key, _, value = a.lstrip("-").partition("=")
        if key not in args:
            raise SystemExit(f"unknown option {a}; usage: python bench.py --smoke [--device=cpu|cuda] [--out=FILE]")
        args[key] = value
    if args["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device=cuda, but this torch ({torch.__version__}) sees no CUDA GPU")
    machine = torch.cuda.get_device_name() if args["device"] == "cuda" else f"{platform.processor() or 'CPU'} " \
        f"x{os.cpu_count()}"
    print(f"smoke run on {machine}, torch {torch.__version__}", flush=True)
    root, start, results = Path(tempfile.mkdtemp(prefix="if-smoke-")), time.time(), []
    for r in smoke(args["device"], root):
        results.append({k: v for k, v in r.items() if k != "row"})
        print(f"[{r['elapsed']:6.1f} s] {r['status']:7} {r['name']} ({r['seconds']:.1f} s): {r['detail']}", flush=True)
    failed = [r for r in results if r["status"] == "FAILED"]
    if args["out"]:
        Path(args["out"]).write_text(json.dumps({"machine": machine, "torch": torch.__version__,
                                                 "date": time.strftime("%Y-%m-%d"), "rows": results}, indent=2))
    print(f"\n{len(results) - len(failed)} of {len(results)} rows ok or skipped, {len(failed)} failed; "
          f"{time.time() - start:.0f} s in all")
    if failed:
        print(f"outputs and logs kept in {root}")
        raise SystemExit(1)
    shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# quality of the memory options (optim.py, quant.py): the CPU demo's held-out loss, option against plain AdamW

# fused_backward alone is left out: in fp32 it is the unfused step bit for bit (tests/test_optim.py)
QUALITY = {  # name -> the train.py options that make it; each is compared with "AdamW" at the same seed
    "AdamW": [],
    "8-bit moments": ["--optimizer_state=8bit"],
    "factored v": ["--factored_second_moment=True"],
    "fused + 8-bit (i_xl_full_24gb)": ["--fused_backward=True", "--optimizer_state=8bit"],
}
QUALITY_LORA = {"LoRA": [], "LoRA on the int8 base (i_xl_lora_8gb)": ["--quantise_base=True"]}


def _final_eval_loss(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if "eval_loss" in r][-1]


def quality_main(argv: list[str]) -> None:
    """`python bench.py --quality [--steps=120] [--seeds=3] [--only=demo,lora] [--match=fused] [--out=FILE]`:
    each memory option trains the demo (configs/demo.py, in its CPU precision, fp32) for `steps` steps per seed, and
    the LoRA options the star LoRA (configs/demo_lora.py) on a demo base trained first for 2 x steps; the table is each
    option's held-out loss against plain AdamW's, seed by seed (the same data, noise and initial weights: only the
    optimizer or the base differs). bf16 is left to the GPU: on CPUs without bf16 hardware it is many times
    slower."""
    opts = dict(a.lstrip("-").split("=", 1) for a in argv)
    steps, seeds, out_path = int(opts.get("steps", 120)), int(opts.get("seeds", 3)), opts.get("out", "quality.json")
    root = Path(tempfile.mkdtemp(prefix="quality-"))
    common = [f"--max_train_steps={steps}", f"--validation_steps={steps}",
              "--validation_prompts=[]", "--checkpointing_steps=100000", "--report_to=none"]  # held-out loss only

    def train(config: str, name: str, seed: int, extra: list[str]) -> float:
        out = root / f"{Path(config).stem}-{seed}-{len(name)}-{abs(hash(name)) % 10**6}"
        cmd = [sys.executable, "train.py", config, f"--output_dir={out}", f"--seed={seed}", *common, *extra]
        subprocess.run(cmd, check=True, capture_output=True, cwd=Path(__file__).resolve().parent)
        print(f"  {config} seed {seed} {name}: {_final_eval_loss(out):.5f}", file=sys.stderr, flush=True)
        return _final_eval_loss(out)

    results, only = {}, opts.get("only", "demo,lora").split(",")
    match = opts.get("match", "").split(",")  # only the demo options whose names contain one of these
    for seed in range(seeds) if "demo" in only else []:
        for name, extra in [(k, v) for k, v in QUALITY.items() if any(m in k for m in match)]:
            results.setdefault(name, []).append(train("configs/demo.py", name, seed, extra))
    base = root / "base"  # the star LoRA's base
    subprocess.run([sys.executable, "train.py", "configs/demo.py", f"--output_dir={base}", "--validation_steps=0",
                    f"--max_train_steps={2 * steps}"],
                   check=True, capture_output=True, cwd=Path(__file__).resolve().parent) if "lora" in only else None
    for seed in range(seeds) if "lora" in only else []:
        for name, extra in QUALITY_LORA.items():
            results.setdefault(name, []).append(train("configs/demo_lora.py", name, seed, [f"--pretrained={base}",
                                                                                           *extra]))
    report = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "machine": platform.processor(),
              "command": "python bench.py --quality " + " ".join(argv), "steps": steps, "losses": results}
    Path(out_path).write_text(json.dumps(report, indent=2) + "\n")
    print_quality(report)


def _captions(n: int) -> list[str]:
    """n captions of the kind people train on: subject, action, place, style, in every combination's order."""
    import itertools
    import random

    subjects = ["a corgi", "an old fisherman", "a red vintage car", "a bowl of ramen", "a lighthouse", "two cats",
                "a woman in a yellow raincoat", "a robot", "a castle", "a bouquet of tulips", "my grandmother's house"]
    actions = ["sitting", "standing in the rain", "at sunset", "in the snow", "on a wooden table", "running",
               "seen from above", "close up"]
    places = ["in Paris", "on a beach", "in a forest", "in a neon-lit street", "in a studio", "on the moon", ""]
    styles = ["a photo", "an oil painting", "a watercolour", "a pencil sketch", "a 3d render", "an anime still",
              "a polaroid"]
    every = [f"{st} of {su} {a} {p}".strip() for st, su, a, p in itertools.product(styles, subjects, actions, places)]
    return random.Random(0).sample(every, n)


def t5_int8_main(argv: list[str]) -> None:
    """`python bench.py --t5int8 [--captions=300] [--d_model=512] [--layers=8]`: the T5 embeddings of int8 weights
    (text_encoder_dtype='int8') against bf16 ones on the same captions, both computing in bf16: the largest
    relative error of a token's embedding and the cosine similarity per token (lowest and mean). The T5 has random
    weights of the given size (T5-XXL's own cannot be downloaded here), so this bounds the method, not the model."""
    import t5cache

    opts = dict(a.lstrip("-").split("=", 1) for a in argv)
    n, d, layers = int(opts.get("captions", 300)), int(opts.get("d_model", 512)), int(opts.get("layers", 8))
    captions = _captions(n)
    with tempfile.TemporaryDirectory() as tmp:
        folder = t5cache.make_tiny_t5(Path(tmp) / "t5", captions + [""], d_model=d, layers=layers, heads=8,
                                      d_ff=4 * d, vocab_size=2000)
        emb, masks = {}, None
        for dtype in ("bf16", "int8"):
            enc = t5cache.TextEncoder(str(folder), dtype=dtype, device="cpu")
            parts = [enc.encode(captions[i : i + 32], return_mask=True) for i in range(0, n, 32)]
            emb[dtype] = torch.cat([e for e, _ in parts]).float()
            masks = torch.cat([m for _, m in parts]).bool()
    a, b = emb["bf16"][masks], emb["int8"][masks]  # the real tokens of every caption: [tokens, D]
    rel = ((b - a).norm(dim=-1) / a.norm(dim=-1)).max().item()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    report = {"captions": n, "tokens": int(masks.sum()), "d_model": d, "layers": layers,
              "max_relative_error": rel, "cosine_min": cos.min().item(), "cosine_mean": cos.mean().item()}
    print(json.dumps(report, indent=2))


def print_quality(report: dict) -> None:
    losses = report["losses"]
    print(f"| option | held-out loss per seed ({report['steps']} steps) | against plain AdamW/LoRA, per seed | worst |")
    print("|---|---|---|---|")
    for name, values in losses.items():
        ref = losses.get("LoRA" if name in QUALITY_LORA else "AdamW")
        if ref is None:
            continue
        rel = [v / r - 1 for v, r in zip(values, ref)]
        print(f"| {name} | {', '.join(f'{v:.4f}' for v in values)} | {', '.join(f'{x:+.1%}' for x in rel)} | "
              f"{max(rel, key=abs):+.1%} |")


# ---------------------------------------------------------------------------------------------
# the data scan (data.scan): a first scan on one and on two processes, and a rerun from the scan cache


def _scan_rank(rank: int, datasets: list, root: str, cache: str) -> None:
    """One of two gloo processes (torch.multiprocessing.spawn): the scan between two barriers, so process start-up
    and imports are not timed; writes its seconds and its number of decodes."""
    import data

    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/rendezvous-{Path(cache).name}",
                                         rank=rank, world_size=2)
    calls, real = [], data.probe
    data.probe = lambda path: calls.append(1) or real(path)
    torch.distributed.barrier()
    t = time.perf_counter()
    data.scan(datasets, f"{root}/out", rank, 2, cache)
    torch.distributed.barrier()
    Path(root, f"rank{rank}.json").write_text(json.dumps({"seconds": time.perf_counter() - t, "decoded": len(calls)}))
    torch.distributed.destroy_process_group()


def scan_rows(n: int, root: Path) -> list[dict]:
    """`n` 64x64 JPEGs (noise, each with a .txt caption) as a folder and as img2dataset shards of 1000 samples (KEY.jpg
    + KEY.txt + KEY.json), dated an hour back (data.RACY_NS: the cache trusts no file modified just before a scan);
    each scanned first in one process, first in two gloo processes, and again from the cache."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    import data
    from config import Config

    rng, then = np.random.default_rng(0), time.time() - 3600
    (root / "folder").mkdir()
    shards = [tarfile.open(root / f"{s:05d}.tar", "w") for s in range(math.ceil(n / 1000))]
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        key, jpeg, caption = f"{i:09d}", buf.getvalue(), f"a picture of noise number {i}"
        (root / "folder" / f"{key}.jpg").write_bytes(jpeg)
        (root / "folder" / f"{key}.txt").write_text(caption)
        for ext, body in (("jpg", jpeg), ("txt", caption.encode()), ("json", json.dumps({"key": key}).encode())):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(body)
            shards[i // 1000].addfile(info, io.BytesIO(body))
    for tar in shards:
        tar.close()
    for f in [*(root / "folder").iterdir(), *root.glob("*.tar")]:
        os.utime(f, (then, then))
    rows = []
    for source, entry in (("folder", {"instance_data_dir": str(root / "folder"), "caption_strategy": "textfile"}),
                          ("shards", {"type": "webdataset", "shards": str(root / "*.tar")})):
        datasets = data.load_datasets(Config(datasets=[entry]))
        for name, world in (("first scan, 1 process", 1), ("first scan, 2 processes (gloo)", 2),
                            ("rerun (scan cache)", 1)):
            cache = root / f"cache-{source}-{world}" if "first" in name else root / f"cache-{source}-1"
            print(f"{source}: {name} ...", file=sys.stderr, flush=True)
            if world == 2:
                torch.multiprocessing.spawn(_scan_rank, (datasets, str(root), str(cache)), nprocs=2)
                ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
                seconds, decoded = max(r["seconds"] for r in ranks), [r["decoded"] for r in ranks]
            else:
                calls, real = [], data.probe
                data.probe = lambda path, real=real, calls=calls: calls.append(1) or real(path)
                t = time.perf_counter()
                entries, _, _ = data.scan(datasets, str(root / "out"), 0, 1, cache)
                seconds, decoded, data.probe = time.perf_counter() - t, [len(calls)], real
                assert len(entries) == n
            rows.append({"source": source, "name": name, "images": n, "seconds": seconds,
                         "images_per_s": n / seconds, "decoded": decoded})
    return rows


def print_scan(report: dict) -> None:
    rows = report["scan"]
    print(f"| data.scan of {rows[0]['images']} 64x64 JPEGs | seconds | images/s | images decoded |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['source']}, {r['name']} | {r['seconds']:.2f} | {r['images_per_s']:.0f} | "
              f"{' + '.join(str(d) for d in r['decoded'])} |")


def scan_main(argv: list[str]) -> None:
    """`python bench.py --scan [--images=10000] [--out=docs/bench/scan.json]` (scan_rows), in a temporary folder."""
    import shutil

    opts = dict(a.lstrip("-").split("=", 1) for a in argv)
    unknown = set(opts) - {"images", "out"}
    if unknown:
        raise SystemExit(f"unknown option(s) {sorted(unknown)}; usage: python bench.py --scan [--images=10000] "
                         "[--out=docs/bench/scan.json]")
    out, root, load = opts.get("out", "docs/bench/scan.json"), Path(tempfile.mkdtemp(prefix="scan-")), os.getloadavg()
    try:
        rows = scan_rows(int(opts.get("images", 10000)), root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {"machine": f"{platform.processor() or 'CPU'} x{os.cpu_count()}", "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "load_average_before_after": [load[0], os.getloadavg()[0]],
              "command": " ".join(["python bench.py --scan", *argv]), "scan": rows}
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print_scan(report)
    print(f"\nwritten to {out}")


def main(argv: list[str]) -> None:
    args = {"only": None, "flavour": "i-medium-400m", "device": "cuda" if torch.cuda.is_available() else "cpu",
            "out": "bench.json", "attention": "sdpa", "rounds": "1"}
    if len(argv) == 1 and argv[0].startswith("--table="):  # print a saved run's table again (e.g. for the README)
        saved = json.loads(Path(argv[0].split("=", 1)[1]).read_text())
        if "losses" in saved:
            return print_quality(saved)
        if "scan" in saved:
            return print_scan(saved)
        if "memory" in saved:
            return print_memory_options(saved["memory"])
        return print_estimates(saved["estimates"]) if "estimates" in saved else print_table(saved)
    if argv and argv[0] == "--t5int8":  # the int8 T5's embeddings against the bf16 T5's
        return t5_int8_main(argv[1:])
    if argv and argv[0] == "--quality":  # the memory options' held-out loss on the CPU demo, against plain AdamW
        return quality_main(argv[1:])
    if argv and argv[0] == "--scan":  # data.scan: first scans on one and two processes, a rerun from the cache
        return scan_main(argv[1:])
    if "--smoke" in argv:  # every training mode and the sampler on tiny U-Nets, then real-size steps on a GPU
        return smoke_main([a for a in argv if a != "--smoke"])
    fake = {"--memory": ("memory", memory_option_rows, print_memory_options),  # each memory option per flavour
            "--estimate": ("estimates", estimate_rows, print_estimates)}  # every flavour and job, ours and diffusers'
    if argv and argv[0] in fake:  # predicted memory at real size, on fake tensors (no GPU, no weights)
        key, make, show = fake[argv[0]]
        out = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--out=")), f"{key}.json")
        rows = make()
        Path(out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                                         "command": "python bench.py " + " ".join(argv), key: rows}, indent=2))
        show(rows)
        return print(f"\nwritten to {out}")
    for a in argv:
        key, _, value = a.lstrip("-").partition("=")
        if Path(a).is_file():  # a training config: its flavour and attention kernel
            from config import load_config

            cfg = load_config([a])
            args["flavour"], args["attention"] = cfg.model_flavour, cfg.attention_mechanism
        elif key in args:
            args[key] = value.split(",") if key == "only" else value
        else:
            raise SystemExit(f"unknown option {a}; usage: python bench.py [CONFIG] [--only=lora,full,stage2,scaling,"
                             "sample,t5,data,compile] [--flavour=i-medium-400m] [--device=cpu|cuda] "
                             "[--attention=sdpa|xformers] [--rounds=1] [--out=bench.json]")
    machine = torch.cuda.get_device_name() if args["device"] == "cuda" else f"{platform.processor() or 'CPU'} " \
        f"x{os.cpu_count()}"
    report = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "command": "python bench.py " + " ".join(argv), "rows": []}
    for group, name, kw, has_ref in plan(args):
        print(f"{name} ...", file=sys.stderr, flush=True)
        runs = []  # ours and the reference alternate, so a slow spell of a shared machine hits both
        for _ in range(int(args["rounds"])):
            runs.append((measure(**({**kw, "stack": "ours"} if kw["case"] in ("train", "sample") else kw)),
                         measure(**{**kw, "stack": "reference"}) if has_ref else None))
        ours, ref = merge([o for o, _ in runs]), merge([r for _, r in runs])
        report["rows"].append({"group": group, "name": name, "ours": ours, "reference": ref, **ratios(ours or {}, ref)})
        Path(args["out"]).write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nwritten to {args['out']}")


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("--_case="):
        kw = json.loads(sys.argv[1][len("--_case="):])
        result = CASES[kw.pop("case")](**kw)
        print("RESULT " + json.dumps(result))
    else:
        main(sys.argv[1:])
