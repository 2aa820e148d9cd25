"""The demo as a new user runs it: `python train.py configs/demo.py` (shortened), what it writes, that it learned,
then `sample.py` on its result, and the LoRA and stage II demos built on it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import lora
import sample
import shapes
import t5cache
from config import load_config
from model import UNet, build

ROOT = Path(__file__).resolve().parents[1]
STEPS = 320  # a sixth of the demo; with min-SNR weighting (which favours the high-t steps that decide colour)
# that is enough for the colours to follow the prompts
# What the shortened run must reach on the pixel judge (45 samples). Measured with the demo's settings (docs/demo.md):
# at 320 steps background 1.00, shape colour 0.62, shape 0.44; an untrained model gets 0.33, 0.00, 0.33. Backgrounds
# are asserted with a margin of 9 samples, colour at 0.4 (10 samples under, three times chance). Shapes are learned
# late: 0.40 at 600 steps, 0.89 at the full run's 2000 - so the shortened run sets no bar for them.
BACKGROUND, COLOUR, SHAPE = 0.8, 0.4, 0.0


def train(*args, timeout=900):
    """python train.py ARGS, from the repository root, as the README runs it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    log = train("configs/demo.py", f"--output_dir={out}", f"--max_train_steps={STEPS}", "--snr_gamma=5.0",
                f"--validation_steps={STEPS // 2}", f"--checkpointing_steps={STEPS // 2}",
                "--validation_num_inference_steps=8", "--report_to=tensorboard")
    return out, log


def test_demo_writes_what_the_readme_promises(demo):
    out, log = demo
    assert f"done: {STEPS} steps" in log and str(out) in log  # the summary says where the outputs are
    config = json.loads((out / "config.json").read_text())
    assert config["max_train_steps"] == STEPS and config["unet_config"]["block_out_channels"] == [32, 64, 128]
    assert {p.name for p in out.glob("checkpoint-*")} == {f"checkpoint-{STEPS // 2}", f"checkpoint-{STEPS}"}
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["variance_type"] == "learned_range"
    grids = sorted((out / "samples").glob("step-*.png"))
    assert [g.name for g in grids] == [f"step-{STEPS // 2:06d}.png", f"step-{STEPS:06d}.png"]
    assert Image.open(grids[-1]).width >= 2 * 128  # 2 validation sizes per prompt, 128 px cells at least
    assert Image.open(out / "loss.png").size == (640, 360)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(10, STEPS + 1, 10))
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, STEPS // 2, STEPS]
    assert (out / "skipped.txt").read_text() == ""

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    logged = events.Scalars("loss")
    assert [e.step for e in logged] == [r["step"] for r in rows if "loss" in r]
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in rows if "loss" in r], rel=1e-6)
    assert [e.step for e in events.Images("validation")] == [STEPS // 2, STEPS]


def shape_colours(unet, cache, colour: str) -> torch.Tensor:
    """R - B of each sample's most saturated quarter of pixels (the shape, not the neutral background), for
    "a <colour> <shape> on a <background> background" over every shape and background, with fixed seeds."""
    prompts = [f"a {colour} {s} on a {b} background" for s in ("circle", "square", "triangle")
               for b in ("white", "black", "gray")]
    x = sample.stage1(unet, cache.get(prompts), cache.get([""]), height=32, width=32, steps=15, guidance=4.0,
                      generator=torch.Generator().manual_seed(0)).flatten(2)  # [9, 3, H*W]
    saturation = x.max(1).values - x.min(1).values
    top = saturation.topk(saturation.shape[1] // 4, dim=1).indices[:, None].expand(-1, 3, -1)
    rgb = x.gather(2, top).mean(2)
    return rgb[:, 0] - rgb[:, 2]


def test_demo_learned_colours_and_held_out_loss(demo):
    """Cannot pass by accident: the held-out loss (fixed images, t and noise) must fall sevenfold, and with the same
    seeds, shapes drawn for "red" prompts must be clearly redder than for "blue" ones - by a margin that an
    untrained model, whose outputs also shift a little with the words, does not reach."""
    out, _ = demo
    held = [json.loads(line)["eval_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "eval_loss" in line]
    # (sevenfold: the held-out loss uses plain noise, while the demo trains on offset noise, a slightly different
    # task - measured 1.19 -> 0.122 at 320 steps, a 9.8x fall; tenfold was the bar before offset noise)
    assert held[-1] < 0.15 * held[0], held

    cache = t5cache.TextCache(ROOT / "data" / "demo" / "t5_cache")
    cfg = load_config(["configs/demo.py"])
    torch.manual_seed(0)
    for unet, learned in ((build(cfg.unet_config).eval(), False), (UNet.from_pretrained(out).eval(), True)):
        red, blue = shape_colours(unet, cache, "red"), shape_colours(unet, cache, "blue")
        margin = (red - blue).mean()
        assert (margin > 0.6) == learned, (learned, red, blue)
    assert (red > blue).all() and red.mean() > 0.2 and blue.mean() < -0.2, (red, blue)  # red is red, blue is blue


def test_the_judge_reads_drawn_pictures():
    """The pixel judge on freshly drawn pictures (every shape, the star too, at every picture size, brought to the
    32 px the demo trains at) must read back what was drawn: it is only a yardstick if it is right on the data
    itself. The shapes here are of random sizes at random places, harder than the demo's centred ones."""
    import random

    rng, images, captions = random.Random(1), [], []
    for _ in range(120):
        colour, shape, background = (rng.choice(list(shapes.COLOURS)), rng.choice((*shapes.SHAPES, "star")),
                                     rng.choice(list(shapes.BACKGROUNDS)))
        w, h = rng.choice(shapes.SIZES)
        img = shapes.draw_one(colour, shape, background, (w, h), rng, scale=(0.45, 0.75), centred=False)
        images.append(img.resize((round(32 * w / min(w, h)), round(32 * h / min(w, h))), Image.BICUBIC))
        captions.append(shapes.caption(colour, shape, background))
    result = shapes.score(images, captions, shapes=(*shapes.SHAPES, "star"))
    assert min(result["background"], result["colour"], result["shape"]) >= 0.97, result


def test_the_judge_reads_a_shape_by_its_outline():
    """A hole of background colour punched into a shape leaves its class (read from the outline) as drawn, and the
    verdict says how much of it is hole; a non-convex cross is no star (four tips, not five); a shape cut in two is
    judged by its larger part."""
    from PIL import ImageDraw

    for shape in shapes.SHAPES:
        img = shapes.draw_one("blue", shape, "white", (32, 32))
        ImageDraw.Draw(img).ellipse([14, 17, 18, 21], fill=shapes.BACKGROUNDS["white"])
        verdict = shapes.judge(img)
        assert verdict["shape"] == shape and verdict["colour"] == "blue" and verdict["holes"] > 0.03, verdict
    cross = Image.new("RGB", (32, 32), shapes.BACKGROUNDS["gray"])  # non-convex like a star, but four arms
    ImageDraw.Draw(cross).rectangle([13, 4, 18, 27], fill=shapes.COLOURS["red"])
    ImageDraw.Draw(cross).rectangle([4, 13, 27, 18], fill=shapes.COLOURS["red"])
    verdict = shapes.judge(cross, shapes=(*shapes.SHAPES, "star"))
    assert verdict["solidity"] < 0.75 and verdict["points"] == 4 and verdict["shape"] != "star", verdict
    img = shapes.draw_one("red", "square", "black", (32, 32))
    ImageDraw.Draw(img).rectangle([0, 10, 31, 12], fill=shapes.BACKGROUNDS["black"])  # a band across: two parts
    verdict = shapes.judge(img)
    assert verdict["holes"] == 0.0 and verdict["shape"] == "square" and verdict["area"] < 0.4, verdict


def test_demo_draws_what_the_captions_say(demo):
    """The shortened run judged from pixels: one sample per colour x shape x background (45, fixed seeds, the demo's
    validation sampler). The thresholds are below what the shortened run reached when measured (docs/demo.md) by a
    margin of several samples; an untrained model, whose pictures are noise, fails all three (chance is 1/3, 1/8,
    1/3)."""
    out, _ = demo
    cfg = load_config(["configs/demo.py"])
    cache = t5cache.TextCache(ROOT / "data" / "demo" / "t5_cache")
    torch.manual_seed(0)
    every = shapes.every_caption(shapes.SHAPES)
    some = [every[3 * i + i % 3] for i in range(15)]  # each colour x shape once, the backgrounds in turn
    untrained = shapes.accuracy(build(cfg.unet_config), cache, some, steps=cfg.validation_num_inference_steps,
                                guidance=cfg.validation_guidance)
    assert untrained["background"] < 0.6 and untrained["colour"] < 0.4 and untrained["shape"] < 0.6, untrained
    trained = shapes.accuracy(out, cache, steps=cfg.validation_num_inference_steps, guidance=cfg.validation_guidance)
    got = {k: trained[k] for k in ("background", "colour", "shape")}
    assert got["background"] >= BACKGROUND and got["colour"] >= COLOUR and got["shape"] >= SHAPE, got


def test_sample_command_on_the_demo(demo, tmp_path):
    out, _ = demo
    result = sample.main(load_config(["configs/demo.py", f"--pretrained={out}", "--prompt=a red circle on a white "
                                      "background", "--num_images=2", "--steps=5", "--resolution=32",
                                      f"--output_dir={tmp_path}"]))
    assert [Image.open(p).size for p in result["images"]] == [(32, 32), (32, 32)]
    assert result["images"][0].parent == tmp_path / "samples" and Image.open(result["grid"]).width >= 2 * 128
    assert result["variance"] == ["learned_range"]  # the demo trains the variance head (hybrid loss)


def test_demo_lora_and_stage2_configs_train(demo, tmp_path):
    """The two follow-up demos, a few steps each: the LoRA on the demo's weights, and the tiny stage II."""
    out, _ = demo
    lora_out, ii_out = tmp_path / "lora", tmp_path / "ii"
    short = ["--max_train_steps=4", "--checkpointing_steps=4", "--validation_steps=4",
             "--validation_num_inference_steps=2", "--validation_loss_images=2"]
    train("configs/demo_lora.py", f"--pretrained={out}", f"--output_dir={lora_out}", *short)
    train("configs/demo_ii.py", f"--output_dir={ii_out}", "--train_batch_size=2", "--num_eval_images=1", *short)
    meta = lora.read_lora_metadata(lora_out / "pytorch_lora_weights.safetensors")
    assert meta["base_model"] == str(out) and meta["variance_trained"] == "true"
    assert (lora_out / "samples" / "step-000004.png").is_file()
    # the LoRA demo's yardstick (docs/demo.md): after 4 steps the model has not learned the word, and the judge,
    # which reads stars right on drawn pictures, finds none
    unet, _ = sample.load_unet(out, lora=lora_out / "pytorch_lora_weights.safetensors", device="cpu")
    every = shapes.every_caption(("star",))
    stars = shapes.accuracy(unet, ROOT / "data" / "demo" / "t5_cache", [every[3 * i + i % 3] for i in range(5)],
                            shapes=(*shapes.SHAPES, "star"))  # each colour once, the backgrounds in turn
    assert stars["shape"] < 0.4, stars
    assert UNet.from_pretrained(ii_out).config["in_channels"] == 6
    assert sample.load_unet(ii_out, device="cpu")[1]["prediction_type"] == "v_prediction"  # (docs/demo.md: why)
    grid = Image.open(ii_out / "samples" / "step-000004.png")
    assert grid.width >= 3 * 128  # low-res, upscaled and original side by side


def test_the_upscale_check_fails_an_untrained_stage2():
    """shapes.upscale_scores, the stage II demo's yardstick (docs/demo.md), on the held-out pictures: bilinear is a
    fair baseline (flat shapes, soft edges: PSNR well above 20 dB, flat areas within 2 levels, edges blurred to well
    under half the original's energy), the original moved by one pixel is crisp and clean, and a random-init stage
    II, whose output is noise, fails sharper_than_bilinear: its edges may be loud, its flat areas are not clean."""
    cfg = load_config(["configs/demo_ii.py"])
    torch.manual_seed(0)
    got = shapes.upscale_scores(build(cfg.unet_config), ROOT / "data" / "demo" / "heldout", steps=4, limit=2,
                                prediction_type=cfg.prediction_type)
    bilinear, shifted, ours = got["bilinear"], got["shifted"], got["stage2"]
    assert got["n"] == 2 and bilinear["psnr"] > 20 and bilinear["flat"] < 2 and bilinear["edge"] < 0.4, got
    assert shifted["edge"] > 0.9 and shifted["flat"] < 0.5, got
    assert shapes.sharper_than_bilinear({"stage2": shifted, "bilinear": bilinear})  # what a crisp, clean upscale does
    assert not shapes.sharper_than_bilinear({"stage2": bilinear, "bilinear": bilinear})
    assert not shapes.sharper_than_bilinear(got) and ours["psnr"] < bilinear["psnr"] - 10, got


def test_upscale_quality_reads_blur_grain_and_a_shift():
    """upscale_quality on a drawn picture: itself scores edge 1 and flat 0; its 4x-down bilinear upscale keeps well
    under half the edge energy; grain of 6 levels shows as ~6 levels RMS on the flats and leaves the edges; moved by
    one pixel it keeps every edge's energy and clean flats, at a PSNR below the blur's."""
    import random

    import numpy as np
    import torch.nn.functional as F

    import data

    img = shapes.draw_one("red", "circle", "white", (128, 128), random.Random(0))
    o = np.asarray(img)
    same = shapes.upscale_quality(o, o)
    assert same["edge"] == 1.0 and same["flat"] == 0.0
    up = F.interpolate(sample.prepare_image(data.resize(img, (32, 32))), size=(128, 128), mode="bilinear")
    blur = shapes.upscale_quality(data.to_pil(up)[0], o)
    assert blur["edge"] < 0.4 and blur["flat"] < 2
    grain = np.clip(o + np.random.default_rng(0).normal(0, 6, o.shape), 0, 255)
    noisy = shapes.upscale_quality(grain, o)
    assert 5 < noisy["flat"] < 7 and 0.9 < noisy["edge"] < 1.2
    moved = shapes.upscale_quality(np.pad(o, ((1, 0), (1, 0), (0, 0)), mode="edge")[:-1, :-1], o)
    assert moved["edge"] > 0.9 and moved["flat"] == 0.0 and moved["psnr"] < blur["psnr"]
