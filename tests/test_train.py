"""train.py: the learning-rate schedule, the stage II inputs, learning, exact resume, crash safety and DDP."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import checkpoint
import data
import diffusion
import lora
import metrics
import optim
import sample
import t5cache
import train
from config import Config, load_config
from model import tiny_config

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (240, 240, 240)}


tiny_unet = tiny_config  # the smallest IF-shaped U-Net (model.py)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Coloured squares of a few sizes with filename captions, and a tiny T5 in the Hub layout."""
    root = tmp_path_factory.mktemp("project")
    (root / "imgs").mkdir()
    for i in range(8):
        name = list(COLOURS)[i % 4]
        w, h = [(64, 64), (96, 64), (128, 128), (64, 96)][i % 4]
        Image.new("RGB", (w, h), COLOURS[name]).save(root / "imgs" / f"a_{name}_square_{i}.png")
    t5cache.make_tiny_t5(root / "t5", [f"a {c} square" for c in COLOURS] + [""])
    return root


def config(project, tmp_path, stage=1, **kw) -> Config:
    values = dict(
        unet_config=tiny_unet(stage), model_type="full", text_encoder=str(project / "t5"),
        text_cache_dir=str(project / "cache"), output_dir=str(tmp_path / "out"), dataloader_num_workers=0,
        datasets=[{"id": "s", "instance_data_dir": str(project / "imgs"), "caption_strategy": "filename",
                   "resolution": 32 if stage == 1 else 64, "minimum_image_size": 32}],
        max_train_steps=4, checkpointing_steps=2, validation_steps=0, logging_steps=1, train_batch_size=2,
        learning_rate=1e-3, lr_scheduler="constant", seed=3,
    )
    if stage == 2:
        values["model_flavour"] = "ii-medium-450m"
    values.update(kw)
    return Config(**values)


def write_config(cfg: Config, path: Path) -> str:
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in cfg.to_dict().items()))
    return str(path)


# ---------------------------------------------------------------------------------------------
# the learning-rate schedule (the optimizer: tests/test_optim.py)


def test_lr_schedules_end_at_lr_end():
    for name in ("linear", "cosine", "polynomial"):
        cfg = Config(learning_rate=1e-3, lr_end=1e-5, lr_scheduler=name, lr_warmup_steps=10, max_train_steps=100)
        lrs = [train.lr_at(s, cfg) for s in range(100)]
        assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
        assert lrs[-1] == pytest.approx(1e-5) and all(a >= b - 1e-12 for a, b in zip(lrs[9:], lrs[10:]))
    assert train.lr_at(50, Config(learning_rate=2e-4, lr_scheduler="constant")) == 2e-4


# ---------------------------------------------------------------------------------------------
# inputs and learning


def test_stage2_inputs_are_the_noised_upsampled_partner(project, tmp_path):
    cfg = config(project, tmp_path, stage=2, noise_aug_range=(100, 900))
    sched = diffusion.Schedule()
    low = torch.rand(2, 3, 32, 32) * 2 - 1
    batch = {"pixels": torch.rand(2, 3, 128, 128) * 2 - 1, "low_res": low}
    gen = torch.Generator().manual_seed(0)
    x0, noise, t, x_in, x_t, level = train.model_inputs(batch, sched, cfg, gen, 0, 1, "cpu", torch.float32)
    assert x_in.shape == (2, 6, 128, 128) and torch.equal(x_in[:, :3], x_t)
    assert level.dtype == torch.int64 and ((100 <= level) & (level < 900)).all() and not torch.equal(level, t)
    # replay the draws: t, noise, level, then the augmentation noise
    gen.manual_seed(0)
    diffusion.sample_timesteps(2, 1000, gen, "uniform", "cpu"), torch.randn((2, 3, 128, 128), generator=gen)
    assert torch.equal(torch.randint(100, 900, (2,), generator=gen), level)
    aug = torch.randn((2, 3, 128, 128), generator=gen)
    up = torch.nn.functional.interpolate(low, size=(128, 128), mode="bilinear", align_corners=True)
    torch.testing.assert_close(x_in[:, 3:], diffusion.q_sample(sched, up, aug, level))


NOISE_OPTIONS = {"plain": {}, "offset noise, input perturbation": dict(noise_offset=0.1, noise_offset_probability=0.5,
                                                                       input_perturbation=0.1)}


@pytest.mark.parametrize("options", NOISE_OPTIONS)
def test_rank_slices_reproduce_the_global_batch(options, project, tmp_path):
    """What rank r of 2 draws is exactly the r-th half of what one process draws for the whole batch."""
    cfg, sched = config(project, tmp_path, stage=2, **NOISE_OPTIONS[options]), diffusion.Schedule()
    full = {"pixels": torch.rand(4, 3, 64, 64), "low_res": torch.rand(4, 3, 16, 16)}
    one = train.model_inputs(full, sched, cfg, torch.Generator().manual_seed(5), 0, 1, "cpu", torch.float32)
    for r in range(2):
        half = {k: v[2 * r : 2 * r + 2] for k, v in full.items()}
        mine = train.model_inputs(half, sched, cfg, torch.Generator().manual_seed(5), r, 2, "cpu", torch.float32)
        for a, b in zip(one, mine):
            torch.testing.assert_close(a[2 * r : 2 * r + 2], b)


def test_noise_options_change_the_target_or_only_the_input(project, tmp_path):
    """noise_offset moves the target noise by a constant per sample and channel (for the samples it picks);
    input_perturbation makes x_t from perturbed noise while the target stays the noise drawn."""
    sched, batch = diffusion.Schedule(), {"pixels": torch.rand(8, 3, 32, 32) * 2 - 1}

    def inputs(**kw):
        cfg = config(project, tmp_path, **kw)
        return train.model_inputs(batch, sched, cfg, torch.Generator().manual_seed(5), 0, 1, "cpu", torch.float32)

    x0, noise, t, _, x_t, _ = inputs()
    _, offset, t2, _, x_t2, _ = inputs(noise_offset=0.1, noise_offset_probability=0.5)
    shift = offset - noise
    assert torch.equal(t, t2) and torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    moved = shift.abs().amax(dim=(1, 2, 3)) > 0
    assert 0 < moved.sum() < 8 and shift[moved].abs().amax() < 0.5  # some samples, by ~0.1 x N(0, 1)
    torch.testing.assert_close(x_t2, diffusion.q_sample(sched, x0, offset, t))
    _, target, _, _, x_t3, _ = inputs(input_perturbation=0.1)
    assert torch.equal(target, noise) and not torch.allclose(x_t3, x_t)
    xi = (x_t3 - x_t) / (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1) / 0.1
    assert 0.8 < xi.std() < 1.2  # x_t3 = q_sample(x0, noise + 0.1 xi), xi ~ N(0, 1)
    with pytest.raises(ValueError, match="noise_offset_probability"):
        train.check_options(config(project, tmp_path, noise_offset=0.1, noise_offset_probability=2.0), world=1)
    with pytest.raises(ValueError, match="snr_gamma"):
        train.check_options(config(project, tmp_path, snr_gamma=5.0, use_soft_min_snr=True), world=1)


@pytest.mark.parametrize("kind", ["full", "lora", "dora", "bitfit", "lora_stage2"])
def test_loss_on_a_repeated_batch_falls(kind, project, tmp_path):
    stage = 2 if kind == "lora_stage2" else 1
    cfg = config(project, tmp_path, stage=stage, model_type="full" if kind in ("full", "bitfit") else "lora",
                 use_dora=kind == "dora", use_bitfit=kind == "bitfit", lora_rank=8)
    unet, params, _ = train.setup_model(cfg, torch.device("cpu"), torch.float32)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    expected = {"full": lambda n: True, "bitfit": lambda n: n.endswith(".bias"),
                "dora": lambda n: "lora_" in n}.get(kind, lambda n: "lora_A" in n or "lora_B" in n)
    assert trainable == {n for n, _ in unet.named_parameters() if expected(n)}
    opt = optim.AdamW(params, lr=3e-3 if kind == "full" else 1e-2, weight_decay=0.0)
    sched, g = diffusion.Schedule(), torch.Generator().manual_seed(0)
    colours = torch.tensor([[0.8, -0.8, -0.8], [-0.8, -0.8, 0.8]])[:, :, None, None]  # a red and a blue image
    batch = {"pixels": colours.expand(2, 3, 32, 32).contiguous(), "low_res": colours.expand(2, 3, 8, 8).contiguous()}
    x0, noise, t, x_in, x_t, level = train.model_inputs(batch, sched, cfg, g, 0, 1, "cpu", torch.float32)
    text = torch.randn(2, 7, 32)

    def loss():
        out = unet(x_in, t, text, noise_level=level)
        return diffusion.training_losses(sched, out, x0, x_t, t, noise).mean()

    with torch.no_grad():
        before = loss().item()
    for _ in range(30):
        loss().backward()
        opt.step(), opt.zero_grad()
    with torch.no_grad():
        after = loss().item()
    # deterministic (fixed batch, noise and t), so a steady fall cannot happen by chance; adapters on a random
    # base have little to work with, a full fine-tune much more
    assert after < (0.5 if kind == "full" else 0.9) * before, (before, after)


# ---------------------------------------------------------------------------------------------
# whole runs: outputs, exact resume, crash safety, DDP, non-finite steps


def run(cfg_path, *args, env=None, timeout=300):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "train.py"), cfg_path, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=e)


def weights(out: Path) -> dict:
    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


def test_sigkill_and_resume_is_exact(project, tmp_path):
    cfg = config(project, tmp_path, max_train_steps=6, checkpointing_steps=3, mixed_precision="bf16")
    path = write_config(cfg, tmp_path / "c.py")
    straight = run(path, f"--output_dir={tmp_path / 'a'}")
    assert straight.returncode == 0, straight.stderr[-2000:]
    e = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), path, f"--output_dir={tmp_path / 'b'}",
                             "--checkpointing_steps=3"], cwd=ROOT, env=e, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (tmp_path / "b" / "checkpoint-3").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL), proc.wait()
    assert (tmp_path / "b" / "checkpoint-3").exists() and not (tmp_path / "b" / "unet").exists()
    resumed = run(path, f"--output_dir={tmp_path / 'b'}", "--resume_from_checkpoint=latest")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert next(iter(a.values())).dtype == torch.bfloat16
    state = load_file(str(tmp_path / "b" / "checkpoint-3" / "training_state.safetensors"))
    assert all(k.startswith(("opt.", "rng.")) for k in state)  # the weights are in checkpoint-3/unet/ alone
    rows = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r][-3:] == [4, 5, 6]
    for name in ("config.json", "loss.png", "skipped.txt", "scheduler/scheduler_config.json"):
        assert (tmp_path / "a" / name).exists(), name


def test_a_new_run_over_an_earlier_runs_checkpoints_is_refused_and_a_new_log_starts_afresh(project, tmp_path):
    """A run without resume_from_checkpoint into an output_dir that holds checkpoints would mix two runs (a later
    "latest" could pick the earlier run's): refused before it writes anything. With no checkpoint there, a new run
    starts its own log instead of appending to the earlier one's, and TensorBoard shows its steps only."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train.main(config(project, tmp_path, max_train_steps=3, checkpointing_steps=2, report_to="tensorboard"))
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in (out / "config.json", out / "metrics.jsonl")}
    with pytest.raises(ValueError, match=r"checkpoint-2\); .* --resume_from_checkpoint=latest"):
        train.main(config(project, tmp_path, max_train_steps=4, checkpointing_steps=2, learning_rate=2e-3))
    assert all(p.read_bytes() == b for p, b in before.items())
    shutil.rmtree(out / "checkpoint-2")
    train.main(config(project, tmp_path, max_train_steps=2, checkpointing_steps=5, report_to="tensorboard"))
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert [e.step for e in EventAccumulator(str(out / "tensorboard")).Reload().Scalars("loss")] == [1, 2]


def test_a_v_prediction_run_says_so_and_what_trains_on_it_keeps_it(project, tmp_path):
    """prediction_type='v_prediction' (stage II from scratch): the loss is told, the scheduler config says so and
    load_unet hands it to the sampler. On that base, prediction_type left unset is the base's own: a LoRA and a full
    fine-tune train v (the fine-tune writes it again); a LoRA that says epsilon is refused before it trains."""
    cfg = config(project, tmp_path, stage=2, prediction_type="v_prediction", max_train_steps=2)
    assert diffusion.loss_options(cfg)["prediction_type"] == "v_prediction"
    train.main(cfg)
    base = tmp_path / "out"
    assert json.loads((base / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert sample.load_unet(base, device="cpu")[1]["prediction_type"] == "v_prediction"
    on_base = dict(stage=2, unet_config=None, pretrained=str(base), max_train_steps=1)
    with pytest.raises(ValueError, match="predicts v_prediction .* leave prediction_type unset"):
        train.main(config(project, tmp_path, output_dir=str(tmp_path / "a"), model_type="lora",
                          prediction_type="epsilon", **on_base))
    assert not (tmp_path / "a").exists()
    lora_cfg = config(project, tmp_path, output_dir=str(tmp_path / "b"), model_type="lora", **on_base)
    assert diffusion.loss_options(train.check_options(lora_cfg, 1))["prediction_type"] == "v_prediction"
    train.main(lora_cfg)
    assert (tmp_path / "b" / lora.LORA_FILE).is_file()
    assert json.loads((tmp_path / "b" / "config.json").read_text())["prediction_type"] == "v_prediction"
    train.main(config(project, tmp_path, output_dir=str(tmp_path / "c"), model_type="full", **on_base))
    written = json.loads((tmp_path / "c" / "scheduler" / "scheduler_config.json").read_text())
    assert written["prediction_type"] == "v_prediction"  # not converted to IF's epsilon


MEMORY_OPTIONS = {
    "fused+8bit": dict(fused_backward=True, optimizer_state="8bit"),  # clipping by the last step's norm
    "factored": dict(factored_second_moment=True),
    "LoRA on the int8 base": dict(model_type="lora", quantise_base=True),
}


@pytest.mark.parametrize("options", MEMORY_OPTIONS)
def test_memory_options_resume_exactly_and_checkpoint_compact_states(options, project, tmp_path):
    """A run stopped at step 3 and resumed equals a straight 6-step run bit for bit, with each memory option; the
    checkpoint holds the 8-bit moments as bytes and the factored ones as rows and columns (no fp32 blow-up)."""
    kw = dict(mixed_precision="bf16", checkpointing_steps=3, **MEMORY_OPTIONS[options])
    train.main(config(project, tmp_path, max_train_steps=6, output_dir=str(tmp_path / "a"), **kw))
    train.main(config(project, tmp_path, max_train_steps=3, output_dir=str(tmp_path / "b"), **kw))
    shutil.rmtree(tmp_path / "b" / "unet", ignore_errors=True)
    (tmp_path / "b" / lora.LORA_FILE).unlink(missing_ok=True)
    train.main(config(project, tmp_path, max_train_steps=6, output_dir=str(tmp_path / "b"),
                      resume_from_checkpoint="latest", **kw))
    if "model_type" not in MEMORY_OPTIONS[options]:
        a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = load_file(str(tmp_path / "b" / "checkpoint-3" / "training_state.safetensors"))
    assert all(k.startswith(("opt.", "rng.")) for k in state)  # the weights are stored once, in their own files
    if options == "LoRA on the int8 base":
        a, b = (load_file(str(tmp_path / d / lora.LORA_FILE)) for d in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        return
    n = sum(v.numel() for v in a.values())
    if options == "fused+8bit":
        assert state["opt.exp_avg.codes"].dtype == torch.uint8 and state["opt.exp_avg_sq.codes"].numel() >= n
    else:
        assert "opt.exp_avg_sq" not in state and any(k.startswith("opt.row.") for k in state)
        assert sum(v.numel() for k, v in state.items() if k.startswith(("opt.row", "opt.col", "opt.vec"))) < n / 4


def test_a_lora_checkpoint_holds_its_weights_once_and_resumes_exactly(project, tmp_path):
    """LoRA + DoRA + bitfit: the adapters, magnitudes and biases live in the checkpoint's LoRA files only, and a
    resume reads them back bit for bit (a straight 6-step run equals 3 steps, then 3 more from checkpoint-3)."""
    kw = dict(mixed_precision="bf16", checkpointing_steps=3, model_type="lora", use_dora=True, use_bitfit=True,
              lora_rank=4)
    train.main(config(project, tmp_path, max_train_steps=6, output_dir=str(tmp_path / "a"), **kw))
    train.main(config(project, tmp_path, max_train_steps=3, output_dir=str(tmp_path / "b"), **kw))
    for name in (lora.LORA_FILE, lora.BIASES_FILE):
        (tmp_path / "b" / name).unlink()
    train.main(config(project, tmp_path, max_train_steps=6, output_dir=str(tmp_path / "b"),
                      resume_from_checkpoint="latest", **kw))
    files = {name: [load_file(str(tmp_path / d / name)) for d in "ab"] for name in (lora.LORA_FILE, lora.BIASES_FILE)}
    for name, (a, b) in files.items():
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert any(k.endswith("lora_magnitude_vector") for k in files[lora.LORA_FILE][0])
    assert files[lora.BIASES_FILE][0] and all(k.endswith(".bias") for k in files[lora.BIASES_FILE][0])
    state = load_file(str(tmp_path / "b" / "checkpoint-3" / "training_state.safetensors"))
    assert all(k.startswith(("opt.", "rng.")) for k in state)


def test_fused_backward_refuses_what_it_cannot_do(project, tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        train.main(config(project, tmp_path, fused_backward=True, gradient_accumulation_steps=2))
    with pytest.raises(ValueError, match="before DDP averages"):
        train.check_options(config(project, tmp_path, fused_backward=True, parallelism="ddp"), world=2)
    train.check_options(config(project, tmp_path, fused_backward=True, parallelism="fsdp"), world=2)  # reduced shards
    with pytest.raises(ValueError, match="adapters and bitfit"):
        train.check_options(config(project, tmp_path, model_type="lora", parallelism="fsdp"), world=2)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(project, tmp_path):
    cfg = config(project, tmp_path, max_train_steps=10_000, checkpointing_steps=10_000)
    path = write_config(cfg, tmp_path / "c.py")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), path], cwd=ROOT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics, deadline = tmp_path / "out" / "metrics.jsonl", time.time() + 240
    while not (metrics.exists() and '"loss"' in metrics.read_text()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    step = int(stdout.split("interrupted: checkpoint saved at step ")[1].split(";")[0])
    assert step >= 1 and [p.name for p in (tmp_path / "out").glob("checkpoint-*")] == [f"checkpoint-{step}"]
    assert not (tmp_path / "out" / "unet").exists()  # interrupted runs do not pretend to be finished
    resumed = run(path, "--resume_from_checkpoint=latest", f"--max_train_steps={step + 1}")
    assert resumed.returncode == 0 and f"resumed from {tmp_path / 'out' / f'checkpoint-{step}'}" in resumed.stdout
    assert (tmp_path / "out" / "unet").is_dir()


def test_crash_while_checkpointing_keeps_the_previous_one(project, tmp_path, monkeypatch):
    cfg = config(project, tmp_path, max_train_steps=4, checkpointing_steps=2, model_type="lora")
    real = checkpoint.save_weights
    calls = []

    def flaky(unet, cfg, directory, *args, **kw):
        calls.append(directory)
        real(unet, cfg, directory, *args, **kw)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint, "save_weights", flaky)
    with pytest.raises(OSError, match="simulated"):
        train.main(cfg)
    out = Path(cfg.output_dir)
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").exists()
    assert (out / "checkpoint-4.tmp").exists() and not (out / "checkpoint-4").exists()
    monkeypatch.setattr(checkpoint, "save_weights", real)
    cfg.resume_from_checkpoint = "latest"
    assert checkpoint.find_checkpoint(cfg).name == "checkpoint-2"
    assert train.main(cfg)["step"] == 4 and not (out / "checkpoint-4.tmp").exists()


def test_nonfinite_steps_are_skipped_and_counted(project, tmp_path, monkeypatch):
    cfg = config(project, tmp_path, max_train_steps=3, checkpointing_steps=100)
    real, n = diffusion.training_losses, []

    def poisoned(*a, **k):
        loss, terms = real(*a, **k)
        if not loss.requires_grad:  # check_options trying the loss options, not a training step
            return loss, terms
        n.append(1)
        return (loss * float("nan"), terms) if len(n) == 2 else (loss, terms)

    monkeypatch.setattr(diffusion, "training_losses", poisoned)
    train.main(cfg)
    rows = [json.loads(x) for x in open(Path(cfg.output_dir) / "metrics.jsonl")]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    cfg.max_nonfinite_steps, cfg.output_dir = 2, str(tmp_path / "o2")
    monkeypatch.setattr(diffusion, "training_losses", lambda *a, **k: (real(*a, **k)[0] * math.nan, real(*a, **k)[1]))
    with pytest.raises(RuntimeError, match="2 steps in a row"):
        train.main(cfg)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def torchrun(*args, nproc=2, timeout=300):
    """`torchrun --nproc_per_node=2 ARGS` on the CPU (gloo), one thread per process."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("kind", ["full, ddp", "full, fsdp", "lora with dropout"])
def test_two_gloo_processes_equal_one(kind, project, tmp_path):
    """Two processes with half the batch each give the weights one process gets, up to float summation order.

    The bound. Both runs see the same samples, noise, timesteps and LoRA dropout masks
    (test_rank_slices_reproduce_the_global_batch, tests/test_lora.py::test_dropout_on_ranks_is_the_global_batch_sliced);
    they differ only in the order fp32 sums the gradient (two half-batch sums and an all-reduce vs one sum): a
    relative difference of a few ulps, |dg| <= ~1e-6 for these gradients (clipped to norm 1). Adam's update
    lr * m / (sqrt(v) + eps) changes by at most lr * |dg| / eps for a change dg of the gradient; with the default eps
    (1e-8) a gradient near zero can flip its update by 2 lr, so the test sets eps = 1e-3: then 3 steps move the two
    runs apart by <= 3 * 1e-3 * 1e-6 / 1e-3 = 3e-6 (the later gradients' dependence on that is smaller still).
    A wrong split of the batch, the noise or the dropout masks changes the gradients by O(1): the updates then
    differ by ~lr (rank-alike masks: each rank's half drops what the other half drops)."""
    kw = dict(model_type="lora", lora_rank=4, lora_dropout=0.5) if kind.startswith("lora") else \
        dict(parallelism=kind.split(", ")[1])
    cfg = config(project, tmp_path, max_train_steps=3, train_batch_size=4, checkpointing_steps=100, adam_epsilon=1e-3,
                 **kw)
    path = write_config(cfg, tmp_path / "c.py")
    one = run(path, f"--output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(ROOT / "train.py", path, f"--output_dir={tmp_path / 'two'}", "--train_batch_size=2")
    assert two.returncode == 0, two.stderr[-3000:]
    if kind.startswith("full"):
        a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
        torch.manual_seed(cfg.seed)
        init = train.build(cfg.unet_config).state_dict()
    else:
        a, b = (load_file(str(tmp_path / d / lora.LORA_FILE)) for d in ("one", "two"))
        init = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in a.items()}  # only B starts at zero
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3  # training moved the weights by ~lr per step
    moved = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved < 1e-5, moved


def test_two_nodes_of_one_process_equal_one_process(project, tmp_path):
    """torchrun across machines, as two "nodes" of one process each on this one (c10d rendezvous on localhost): the
    weights equal one process with the same global batch, within the bound of test_two_gloo_processes_equal_one."""
    cfg = config(project, tmp_path, max_train_steps=3, train_batch_size=4, checkpointing_steps=100, adam_epsilon=1e-3)
    path = write_config(cfg, tmp_path / "c.py")
    one = run(path, f"--output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    endpoint = f"localhost:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
                               "--rdzv_id=two-nodes", str(ROOT / "train.py"), path, f"--output_dir={tmp_path / 'two'}",
                               "--train_batch_size=2"], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "on 2 x cpu" in outputs[0][0] + outputs[1][0]  # one process group of two ranks, not two runs
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


DRIVER = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import checkpoint
import train
from config import parse_args

step, save = train.train_step, checkpoint.save_weights


def train_step(r, batches):  # a preemption signal that reaches rank 1 alone, after step {signal_at}
    row = step(r, batches)
    if r.rank == 1 and r.step == {signal_at}:
        os.kill(os.getpid(), signal.SIGTERM)
    return row


def save_weights(*args, **kwargs):  # a slow disk (rank 0 alone writes the weights)
    time.sleep({sleep})
    return save(*args, **kwargs)


train.train_step, checkpoint.save_weights = train_step, save_weights
train.main(parse_args(sys.argv[1:], "driver"))
"""


def driver(tmp_path, signal_at=-1, sleep=0.0) -> Path:
    path = tmp_path / "driver.py"
    path.write_text(DRIVER.format(root=str(ROOT), signal_at=signal_at, sleep=sleep))
    return path


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(engine, project, tmp_path):
    """Preemption reaches ranks at different steps, or one only: the ranks agree to stop after the same step, rank 0
    writes that step's checkpoint, every process exits 0, and the run resumes from it."""
    cfg = config(project, tmp_path, max_train_steps=1000, checkpointing_steps=1000, train_batch_size=1,
                 parallelism=engine)
    path = write_config(cfg, tmp_path / "c.py")
    stopped = torchrun(driver(tmp_path, signal_at=3), path)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "interrupted: checkpoint saved at step 3" in stopped.stdout
    assert [p.name for p in (tmp_path / "out").glob("checkpoint-*")] == ["checkpoint-3"]
    resumed = torchrun(ROOT / "train.py", path, "--resume_from_checkpoint=latest", "--max_train_steps=5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "done: 5 steps" in resumed.stdout
    assert (tmp_path / "out" / "unet").is_dir()


def test_a_rank0_checkpoint_past_the_timeout_fails_with_the_option_to_raise(project, tmp_path):
    """The other ranks wait for rank 0's checkpoint at a barrier with distributed_timeout, and say so when it runs
    out (rather than dying inside the next gradient all-reduce)."""
    cfg = config(project, tmp_path, max_train_steps=4, checkpointing_steps=2, train_batch_size=1,
                 distributed_timeout=2)
    slow = torchrun(driver(tmp_path, sleep=8), write_config(cfg, tmp_path / "c.py"))
    assert slow.returncode != 0
    assert "waited more than distributed_timeout=2 s for the validation or checkpoint of step 2" in slow.stderr


@pytest.mark.parametrize("quantise_base", [False, True])
def test_final_lora_loads_in_diffusers(quantise_base, project, tmp_path):
    """The LoRA file, trained on the base as it is or on its int8 copy (QLoRA), loads into the plain base here and
    in diffusers alike."""
    from diffusers import UNet2DConditionModel

    cfg = config(project, tmp_path, model_type="lora", lora_rank=4, lora_alpha=8.0, max_train_steps=2,
                 learning_rate=1e-2, quantise_base=quantise_base)
    train.main(cfg)
    out = Path(cfg.output_dir)
    meta = lora.read_lora_metadata(out / "pytorch_lora_weights.safetensors")
    assert meta["variance_trained"] == "true"
    torch.manual_seed(cfg.seed)  # the base is the seeded random init; rebuild it on both sides
    base = train.build(cfg.unet_config)
    base.save_pretrained(tmp_path / "base")
    ours = train.UNet.from_pretrained(tmp_path / "base", subfolder=None)
    ref = UNet2DConditionModel.from_pretrained(tmp_path / "base")
    x, t, text = torch.randn(1, 3, 32, 32), torch.tensor([500]), torch.randn(1, 7, 32)
    with torch.no_grad():
        before = ours(x, t, text)
        lora.load_lora(ours, out / "pytorch_lora_weights.safetensors")
        ref.load_lora_adapter(str(out / "pytorch_lora_weights.safetensors"), prefix="unet", use_safetensors=True)
        ours_after, ref_after = ours(x, t, text), ref(x, t, text).sample
    assert (ours_after - before).abs().max() > 1e-3  # the LoRA changed something
    torch.testing.assert_close(ref_after, ours_after, rtol=1e-5, atol=1e-5)


def test_config_mismatch_is_refused(project, tmp_path):
    train.build(tiny_unet(1)).save_pretrained(tmp_path / "stage1" / "unet")
    cfg = config(project, tmp_path, unet_config=None, pretrained=str(tmp_path / "stage1"),
                 model_flavour="ii-medium-450m")
    with pytest.raises(ValueError, match="stage 1 U-Net but the config trains stage 2"):
        train.setup_model(cfg, torch.device("cpu"), torch.float32)
    assert load_config(["--model_flavour=ii-large-1.2b"]).stage == 2


@pytest.mark.parametrize("name", ["i_m", "ii_m"])
def test_real_configs_need_only_weights_and_images(name, project, tmp_path):
    """configs/i_m.py and ii_m.py as the README uses them: a config that includes one and names the base weights (a
    diffusers-layout folder with unet/, text_encoder/, tokenizer/) and an image folder with .txt captions."""
    stage = 2 if name.startswith("ii") else 1
    weights, images = tmp_path / "weights", tmp_path / "images"
    torch.manual_seed(0)
    unet_config = tiny_unet(stage)
    if stage == 2:  # 256 px: four levels, attention only in the 32x32 middle (16k-token attention is slow on CPU)
        unet_config.update(block_out_channels=[16, 32, 32, 32], down_block_types=["ResnetDownsampleBlock2D"] * 4,
                           up_block_types=["ResnetUpsampleBlock2D"] * 4)
    train.build(unet_config).save_pretrained(weights / "unet")
    for sub in ("text_encoder", "tokenizer"):
        shutil.copytree(project / "t5" / sub, weights / sub)
    images.mkdir()
    size = 64 if stage == 1 else 256  # each config's resolution: smaller pictures would be skipped
    for i, (colour, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (size + 32 * i, size), rgb).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a {colour} square\n")
    mine = tmp_path / "mine.py"
    mine.write_text(f"include({str(ROOT / 'configs' / f'{name}.py')!r})\npretrained = {str(weights)!r}\n"
                    f"datasets = [dict(datasets[0], instance_data_dir={str(images)!r})]\n")
    cfg = load_config([str(mine), f"--output_dir={tmp_path / 'out'}", "--max_train_steps=2", "--validation_steps=0",
                       "--train_batch_size=2", "--dataloader_num_workers=0"])
    assert (cfg.stage, cfg.learning_rate, cfg.lr_end, cfg.lora_rank) == (stage, 4e-5, 4e-6, 32)
    assert train.main(cfg)["step"] == 2
    meta = lora.read_lora_metadata(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert meta["base_model"] == str(weights) and meta["stage"] == str(stage)
    assert meta[lora.METADATA_KEY]["unet.r"] == 32
    assert (tmp_path / "out" / "skipped.txt").read_text() == ""  # every picture was used


# ---------------------------------------------------------------------------------------------
# checkpoints: pruning, replacing, what a resume restores


def test_pruning_skips_unfinished_checkpoint_folders(project, tmp_path):
    cfg = config(project, tmp_path, max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=2)
    (Path(cfg.output_dir) / "checkpoint-9.tmp").mkdir(parents=True)  # left by a crash mid-checkpoint
    assert train.main(cfg)["step"] == 4
    names = sorted(p.name for p in Path(cfg.output_dir).glob("checkpoint-*"))
    assert names == ["checkpoint-3", "checkpoint-4"]  # and the unfinished one is cleared away
    cfg.resume_from_checkpoint = "latest"
    assert checkpoint.find_checkpoint(cfg).name == "checkpoint-4"


def test_replacing_a_checkpoint_never_leaves_none(project, tmp_path, monkeypatch):
    """A run resumed from an earlier checkpoint writes checkpoint-N again; a crash between moving the old one aside
    and renaming the new one into place leaves the old one, which a resume then uses."""
    cfg = config(project, tmp_path, max_train_steps=4, checkpointing_steps=2, model_type="lora")
    train.main(cfg)
    out = Path(cfg.output_dir)
    before = (out / "checkpoint-4" / "training_state.safetensors").read_bytes()
    real = os.replace

    def crash(src, dst):
        if str(src).endswith("checkpoint-4.tmp"):
            raise OSError("power cut (simulated)")
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    cfg.resume_from_checkpoint = str(out / "checkpoint-2")
    with pytest.raises(OSError, match="simulated"):
        train.main(cfg)
    monkeypatch.setattr(checkpoint.os, "replace", real)
    cfg.resume_from_checkpoint = "latest"
    found = checkpoint.find_checkpoint(cfg)
    assert found.name == "checkpoint-4.old"
    assert (found / "training_state.safetensors").read_bytes() == before  # whole, as it was
    cfg.max_train_steps = 6
    assert train.main(cfg)["step"] == 6  # resumes from it; the next save tidies up after the crash
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert (out / "checkpoint-4" / "training_state.safetensors").read_bytes() == before


def test_resume_restores_the_nonfinite_streak_and_logs_each_step_once(project, tmp_path, monkeypatch):
    real, n = diffusion.training_losses, []

    def poisoned(*a, **k):  # steps 3, 4 (before the checkpoint) and 5 (after it) are non-finite
        loss, terms = real(*a, **k)
        if not loss.requires_grad:  # check_options trying the loss options, not a training step
            return loss, terms
        n.append(1)
        return (loss * math.nan, terms) if len(n) in (3, 4, 5) else (loss, terms)

    monkeypatch.setattr(diffusion, "training_losses", poisoned)
    cfg = config(project, tmp_path, max_train_steps=4, checkpointing_steps=4, max_nonfinite_steps=3)
    train.main(cfg)
    cfg.resume_from_checkpoint, cfg.max_train_steps = "latest", 6
    with pytest.raises(RuntimeError, match="3 steps in a row"):  # 2 before the checkpoint + 1 after
        train.main(cfg)
    n.clear()  # all finite now, from checkpoint-4 again: steps 5 and 6 are logged a second time, not twice
    monkeypatch.setattr(diffusion, "training_losses", real)
    train.main(cfg)
    rows = [json.loads(x) for x in open(Path(cfg.output_dir) / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2, 2, 2]


# ---------------------------------------------------------------------------------------------
# validation and the held-out loss


def test_held_out_images_are_never_trained_on(project, tmp_path):
    cfg = config(project, tmp_path, validation_loss_images=2)
    one = data.make_loader(cfg)
    assert len(one.held_out) == 2
    for world in (1, 2):
        for rank in range(world):
            loader = data.make_loader(cfg, rank, world)
            assert loader.held_out == one.held_out  # the same pictures whatever the number of processes
            trained = {req[0] for epoch in range(3) for batch in loader.plan(epoch) for req in batch}
            assert trained and not trained & set(loader.held_out)
    assert data.make_loader(config(project, tmp_path, seed=4, validation_loss_images=2)).held_out != one.held_out


def test_a_held_out_dataset_gives_the_validation_pictures_and_changes_no_batch(project, tmp_path):
    plain = config(project, tmp_path)
    extra = dict(plain.datasets[0], id="spare", held_out=True)
    both = config(project, tmp_path, datasets=[plain.datasets[0], extra], validation_loss_images=3)
    a, b = data.make_loader(plain), data.make_loader(both)
    spare = {i for i, e in enumerate(b.items.entries) if e[4] == 1}
    assert set(b.held_out) <= spare and len(b.held_out) == 3  # all from the held-out dataset
    assert [a.plan(e) for e in range(3)] == [b.plan(e) for e in range(3)]  # training sees exactly what it saw


def test_stage2_validation_uses_the_validation_options(project, tmp_path, monkeypatch):
    calls = []
    real = train.sample.stage2
    monkeypatch.setattr(train.sample, "stage2", lambda *a, **k: calls.append(k) or real(*a, **k))
    cfg = config(project, tmp_path, stage=2, model_type="lora", max_train_steps=1, validation_steps=1,
                 validation_resolution="64,96x64", validation_guidance=2.5, validation_noise_level=100,
                 validation_num_inference_steps=2, num_eval_images=1, validation_loss_images=1)
    train.main(cfg)
    assert [(k["width"], k["height"], k["guidance"], k["noise_level"]) for k in calls] == [(64, 64, 2.5, 100),
                                                                                           (96, 64, 2.5, 100)]
    assert (Path(cfg.output_dir) / "samples" / "step-000001.png").is_file()
    with pytest.raises(ValueError, match="validation_prompts are stage I's"):
        train.main(config(project, tmp_path, stage=2, validation_prompts=["a red square"], validation_steps=1))
    with pytest.raises(ValueError, match="validation_noise_level is stage II's"):
        train.main(config(project, tmp_path, validation_noise_level=100, validation_steps=1))


# ---------------------------------------------------------------------------------------------
# what the outputs hold


@pytest.mark.parametrize("model_type", ["lora", "full"])
def test_bitfit_weights_load_where_sample_py_loads(model_type, project, tmp_path, monkeypatch):
    """LoRA + bitfit: the biases ride in the LoRA file; bitfit alone (model_type='full'): a whole unet/. Either way
    sample.load_unet gives the trained U-Net."""
    cfg = config(project, tmp_path, model_type=model_type, use_bitfit=True, max_train_steps=2, learning_rate=1e-2,
                 lora_rank=4)
    seen, real = [], checkpoint.save_weights

    def keep(unet, *a, **k):
        seen.append(unet)
        real(unet, *a, **k)

    monkeypatch.setattr(checkpoint, "save_weights", keep)
    train.main(cfg)
    out, trained = Path(cfg.output_dir), seen[-1]
    if model_type == "lora":
        torch.manual_seed(cfg.seed)
        train.build(cfg.unet_config).save_pretrained(tmp_path / "base" / "unet")
        loaded, _ = sample.load_unet(tmp_path / "base", lora=out / "pytorch_lora_weights.safetensors", device="cpu")
    else:
        assert not list(out.glob("*.safetensors"))  # no side file that nothing reads
        loaded, _ = sample.load_unet(out, device="cpu")
    x, t, text = torch.randn(1, 3, 32, 32), torch.tensor([500]), torch.randn(1, 7, 32)
    with torch.no_grad():
        trained.eval()
        want, got = trained(x, t, text), loaded(x, t, text)
    torch.manual_seed(cfg.seed)
    base = train.build(cfg.unet_config).eval()
    with torch.no_grad():
        assert (base(x, t, text) - want).abs().max() > 1e-4  # training changed the output
    # the LoRA is merged into the loaded weights (W + s B A rounded once) but applied on the forward path in the
    # trained U-Net: equal up to fp32 rounding of that sum through a few layers
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_embeds_the_text_sampling_embeds(project, tmp_path):
    """clean_caption reaches the cache training builds (it used to be dropped), so train and sample read one text."""
    cfg = config(project, tmp_path, clean_caption=True, max_train_steps=1, text_cache_dir=str(tmp_path / "cache"))
    train.main(cfg)
    assert json.loads((tmp_path / "cache" / "index.json").read_text())["clean_caption"] is True


def test_a_compiled_run_trains_like_an_eager_one(project, tmp_path):
    """compile=True's path (train.py wraps the U-Net in torch.compile) on a short run, with dynamo's cheapest
    backend: no graph break in the loop, and the weights of the eager run. aot_eager runs the same ATen ops in
    the same order, so the two agree to fp32 rounding of a reordered reduction (rel. 1e-5 over 2 Adam steps)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = config(project, tmp_path, max_train_steps=2, checkpointing_steps=100, model_type="lora", lora_rank=4,
                   output_dir=str(tmp_path / "eager"), adam_epsilon=1e-3)  # eps: see test_two_gloo_processes_equal_one
    train.main(eager)
    compiled = config(project, tmp_path, max_train_steps=2, checkpointing_steps=100, model_type="lora", lora_rank=4,
                      output_dir=str(tmp_path / "compiled"), adam_epsilon=1e-3, compile="aot_eager")
    train.main(compiled)
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    a = load_file(str(tmp_path / "eager" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_cards_are_written_and_uploads_never_fail_the_run(project, tmp_path, monkeypatch, capsys):
    """Each checkpoint and the final output get a model card; with push_checkpoints_to_hub and push_to_hub they are
    uploaded, checkpoints first, without training states; an upload that fails is reported and the run finishes."""
    import huggingface_hub
    import yaml

    calls = []

    class FakeApi:  # HfApi's two calls, recorded; the network is never reached
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, ignore_patterns, commit_message):
            files = sorted(huggingface_hub.utils.filter_repo_objects(  # what upload_folder would send
                [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()],
                ignore_patterns=ignore_patterns))
            calls.append((commit_message, files))
            if len(calls) == 3:
                raise OSError("connection reset (simulated)")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    cfg = config(project, tmp_path, model_type="lora", max_train_steps=4, checkpointing_steps=2, push_to_hub=True,
                 push_checkpoints_to_hub=True, hub_model_id="user/squares")
    assert train.main(cfg)["step"] == 4
    out = Path(cfg.output_dir)
    for folder in (out, out / "checkpoint-2", out / "checkpoint-4"):
        front = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
        assert front["license"] == "deepfloyd-if-license" and "lora" in front["tags"]
    assert [c[0] for c in calls] == ["step 2", "step 4", "Upload out"]
    assert lora.LORA_FILE in calls[0][1] and not any("training_state" in f for c in calls for f in c[1])
    assert "upload of" in capsys.readouterr().out and (out / lora.LORA_FILE).is_file()  # the failure, reported
    with pytest.raises(ValueError, match="hub_model_id"):
        train.check_options(config(project, tmp_path, push_to_hub=True), world=1)


def test_ema_interval_warmup_validation_and_final_weights(project, tmp_path, monkeypatch):
    """The EMA copies the weights until ema_warmup_steps, then averages them every ema_update_interval steps (checked
    against the same recursion on the recorded weights); ema_validation='comparison' puts the EMA's grid beside the
    raw one and leaves the training exactly as without it (the swap restores the weights bit for bit); the final
    LoRA is the EMA and says so."""
    kw = dict(model_type="lora", lora_rank=4, max_train_steps=6, checkpointing_steps=6, use_ema=True, ema_decay=0.5,
              ema_update_interval=2, ema_warmup_steps=2, validation_prompts=["a red square"], validation_steps=3,
              validation_num_inference_steps=2, validation_resolution="32")
    seen, step = [], train.train_step

    def record(r, batches):
        row = step(r, batches)
        seen.append((r.opt.weights().clone(), r.ema.clone()))
        return row

    monkeypatch.setattr(train, "train_step", record)
    train.main(config(project, tmp_path, output_dir=str(tmp_path / "cmp"), **kw))
    ema = seen[0][1] * 0  # what the EMA must be after each step (it starts as the weights; the first update copies)
    for s, (w, got) in enumerate(seen, start=1):
        if s % 2 == 0:
            ema = w.clone() if s <= 2 else ema.lerp(w, 0.5)
            torch.testing.assert_close(got, ema, rtol=0, atol=1e-7)  # lerp in fp32 on both sides
    assert not torch.equal(seen[-1][0], seen[-1][1])  # the average is not the last weights
    seen.clear()
    train.main(config(project, tmp_path, output_dir=str(tmp_path / "raw"), ema_validation="none", **kw))
    a, b = (load_file(str(tmp_path / d / "checkpoint-6" / lora.LORA_FILE)) for d in ("cmp", "raw"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # validating the EMA changed nothing of the training
    grids = [Image.open(tmp_path / d / "samples" / "step-000006.png") for d in ("cmp", "raw")]
    assert grids[0].width == 2 * grids[1].width and grids[0].height == grids[1].height
    assert lora.read_lora_metadata(tmp_path / "cmp" / lora.LORA_FILE)["ema"] == "true"
    assert "ema" not in lora.read_lora_metadata(tmp_path / "cmp" / "checkpoint-6" / lora.LORA_FILE)
    final = load_file(str(tmp_path / "cmp" / lora.LORA_FILE))
    assert not all(torch.equal(final[k], a[k]) for k in a)  # the EMA, not the raw weights of checkpoint-6


def test_wandb_gets_the_scalars_and_grids_metrics_jsonl_gets(project, tmp_path, monkeypatch):
    """report_to='wandb' logs what metrics.jsonl logs, at the same steps, and the grids (wandb stood in for: the
    calls are what is tested, nothing reaches the network)."""
    import types

    calls = []
    fake = types.ModuleType("wandb")
    run = types.SimpleNamespace(log=lambda row, step: calls.append((step, row)), finish=lambda: calls.append("end"))
    fake.init = lambda **kw: calls.append(("init", kw)) or run
    fake.Image = lambda path: ("image", path)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = config(project, tmp_path, report_to="wandb", max_train_steps=2, validation_prompts=["a red square"],
                 validation_steps=2, validation_num_inference_steps=2, validation_resolution="32")
    train.main(cfg)
    assert calls[0][0] == "init" and calls[0][1]["config"]["max_train_steps"] == 2 and calls[-1] == "end"
    rows = [json.loads(x) for x in open(Path(cfg.output_dir) / "metrics.jsonl")]
    logged = [(s, r) for s, r in calls[1:-1] if "validation" not in r]
    assert [(s, set(r)) for s, r in logged] == [(row["step"], set(row) - {"step"}) for row in rows]
    assert any(s == 2 and r.get("validation", [None])[0] == "image" for s, r in calls[1:-1])
    train.main(replace(cfg, max_train_steps=4, resume_from_checkpoint="latest"))  # logs on in the run it continues
    for ckpt in Path(cfg.output_dir).glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    train.main(replace(cfg, validation_steps=0))  # a new run in the same output_dir (no checkpoints left): a new id
    ids = [kw["id"] for kw in (c[1] for c in calls if c[0] == "init")]
    assert len(ids) == 3 and ids[1] == ids[0] and ids[2] != ids[0]


def test_wandb_offline_writes_its_run_in_output_dir(project, tmp_path, monkeypatch):
    """The real wandb package in offline mode: the run (scalars and the grid) lands in output_dir/wandb/, ready for
    `wandb sync`; nothing reaches the network."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = config(project, tmp_path, report_to="wandb", max_train_steps=2, validation_prompts=["a red square"],
                 validation_steps=2, validation_num_inference_steps=2, validation_resolution="32")
    train.main(cfg)
    run = next((Path(cfg.output_dir) / "wandb").glob("offline-run-*"))
    run_id = metrics.wandb_id(Path(cfg.output_dir), resumed=True)  # the id kept in output_dir for a resume
    assert run.name.endswith(run_id) and list(run.glob("run-*.wandb"))
    assert list((run / "files" / "media" / "images").glob("validation_2_*.png"))
