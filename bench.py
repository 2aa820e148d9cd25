"""Speed and memory of this repo, side by side with the diffusers + peft reference, in one run.

    python bench.py                                        # CPU: the IF-I-M-sized U-Net, batch 4, 64x64
    python bench.py --device=cuda --flavour=i-xlarge-4.3b  # a GPU: the real XL config (random weights)
    python bench.py --only=lora,sample --out=bench.json
    python bench.py --only=lora --rounds=3                 # ours and the reference alternate 3 times
    python bench.py --table=bench.json                     # print a saved (or interrupted) run's table again
    python bench.py --estimate --out=estimate.json         # predicted GPU memory of every flavour and job (no GPU)

Every measurement runs in a fresh subprocess, so peak memory is honest. Timed parts repeat after a warm-up and
report medians; with --rounds=N each row runs N times, ours and the reference in turn, and reports the medians
over rounds (on a shared machine a slow spell then slows both sides, not one). Peak memory: on CUDA
`max_memory_allocated` (absolute: weights included); on the CPU the peak RSS over the post-load baseline
(activations, gradients, optimizer state), with glibc told to hand large blocks back at once so that RSS follows
the live tensors (training rows only: it makes both stacks' CPU steps about a third slower). Each row has ours,
the reference, and `*_ratio` = ours / reference. Random weights of the real configs (model.FLAVOURS): nothing is
downloaded. Without diffusers/peft installed, only our numbers are reported.
"""

from __future__ import annotations

import json
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


def case_train(stack, flavour, mode, batch, height, width, ckpt, dtype, device, attention, rank=32, repeat=3):
    """One optimizer step: forward, the hybrid loss, backward, AdamW."""
    import config
    import diffusion
    import lora
    import train

    device, dtype = torch.device(device), getattr(torch, dtype)
    unet, stage = _unets(stack, flavour, device, dtype), config.Config(model_flavour=flavour).stage
    if stack == "ours":
        params = lora.add_lora(unet, rank, rank) if mode == "lora" else list(unet.parameters())
        unet.gradient_checkpointing, _ = ckpt, unet.set_attention_backend(attention)
        unet = unet.to(memory_format=torch.channels_last)
        opt = train.AdamW(params, lr=1e-6, generator=torch.Generator(device).manual_seed(0))
        forward = lambda x, t, e, lvl: unet(x, t, e, noise_level=lvl)
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
    times = _timed(step, device, warmup=1 if device.type == "cpu" else 3, repeat=repeat)
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
    tensors (memory.py): ours through train.estimate_step (the real setup_model and train_step), the reference as
    diffusers' UNet2DConditionModel (+ peft LoRA on the same targets) with torch.optim.AdamW (foreach, as on CUDA)
    and the same loss. Nothing is allocated or downloaded, so it runs in this process."""
    import config
    import diffusion
    import lora
    import memory
    import model
    import train

    square = {"instance_data_dir": "-", "resolution": size, "crop": True, "crop_aspect": "square"}
    cfg = config.Config(model_flavour=flavour, model_type=mode, lora_rank=rank, train_batch_size=batch,
                        gradient_checkpointing=ckpt, mixed_precision="bf16", output_dir=tempfile.gettempdir(),
                        datasets=[square])
    if stack == "ours":
        est = train.estimate_step(cfg)
        return {"peak_gib": est["peak_bytes"] / memory.GiB, "tflop": est["flops_per_step"] / 1e12,
                "peak_phase": est["peak_phase"]}
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**model.FLAVOURS[flavour]["config"])
    if mode == "lora":
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(lora.DEFAULT_TARGETS)))
    unet.to(torch.bfloat16)  # peft makes its adapters fp32 on the meta device; a real run casts them with the rest
    if ckpt:
        unet.enable_gradient_checkpointing()  # diffusers has one mode (its resnets), for "attention" and "full" alike
    unet.train()
    with FakeTensorMode(), memory.LiveBytes() as live, FlopCounterMode(display=False) as flops, memory.no_cyclic_gc():
        memory.materialise(unet)
        sched = diffusion.Schedule()
        opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-6, foreach=True)
        x0 = noise = torch.zeros(batch, 3, size, size)
        t, text = torch.zeros(batch, dtype=torch.long), torch.zeros(batch, 77, 4096, dtype=torch.bfloat16)
        x_t = diffusion.q_sample(sched, x0, noise, t)
        x_in, level = (x_t, None) if cfg.stage == 1 else (torch.cat([x_t, x0], 1), t)
        live.phase = "forward"
        out = unet(x_in.to(torch.bfloat16), t, text, class_labels=level).sample
        live.phase = "loss and backward"
        diffusion.training_losses(sched, out, x0, x_t, t, noise).mean().backward()
        live.phase = "optimizer step"
        opt.step()
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


def print_estimates(rows: list[dict]) -> None:
    """Markdown: per job, the predicted peak (ours vs reference) and the smallest common card that holds it."""
    import memory

    def smallest(gib):
        ok = sorted({m for m, _ in memory.GPUS.values() if memory.fits(gib * memory.GiB, m)[0]})
        return f"{ok[0]} GB" if ok else "none listed"

    print("| U-Net | job | checkpointing | ours: peak | reference: peak | ours / ref | ours fits from | TFLOP/step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, ref = r["ours"], r["reference"]
        job = f"{'LoRA r32' if r['mode'] == 'lora' else 'full fine-tune'}, b{r['batch']}, {r['size']} px"
        ref_txt, ratio = ("-", "-") if not ref else (f"{ref['peak_gib']:.1f} GiB",
                                                    f"{o['peak_gib'] / ref['peak_gib']:.2f}x")
        print(f"| {r['flavour']} | {job} | {r['ckpt'] or 'off'} | {o['peak_gib']:.1f} GiB | {ref_txt} | {ratio} | "
              f"{smallest(o['peak_gib'])} | {o['tflop']:.1f} |")


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


def measure(case: str, **kw) -> dict | None:
    """Run one case in a fresh interpreter; None when it failed (e.g. diffusers missing)."""
    env = dict(os.environ)
    if case == "train":  # peak RSS must follow live tensors; this slows both stacks' CPU steps alike
        env |= {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    cmd = [sys.executable, __file__, "--_case=" + json.dumps({"case": case, **kw})]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(f"  {case} {kw}: failed\n    " + "\n    ".join(proc.stderr.strip().splitlines()[-3:]), file=sys.stderr)
        return None
    return json.loads(lines[-1][7:])


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


def main(argv: list[str]) -> None:
    args = {"only": None, "flavour": "i-medium-400m", "device": "cuda" if torch.cuda.is_available() else "cpu",
            "out": "bench.json", "attention": "sdpa", "rounds": "1"}
    if len(argv) == 1 and argv[0].startswith("--table="):  # print a saved run's table again (e.g. for the README)
        saved = json.loads(Path(argv[0].split("=", 1)[1]).read_text())
        return print_estimates(saved["estimates"]) if "estimates" in saved else print_table(saved)
    if argv and argv[0] == "--estimate":  # predicted memory at real size, on fake tensors (no GPU, no weights)
        out = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--out=")), "estimate.json")
        rows = estimate_rows()
        Path(out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                                         "command": "python bench.py " + " ".join(argv), "estimates": rows}, indent=2))
        print_estimates(rows)
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
                             "sample,t5,data] [--flavour=i-medium-400m] [--device=cpu|cuda] [--attention=sdpa|xformers"
                             "] [--rounds=1] [--out=bench.json]")
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
