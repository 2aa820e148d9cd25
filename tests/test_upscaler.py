"""upscaler.py against diffusers: the x4 upscaler's U-Net, VAE decoder and StableDiffusionUpscalePipeline; then
sample.py's stage III (--stage3) on the command line, against upscaler.stage3 called directly.

Everything is tiny, random and built here (no downloads): components with the real block types, a CLIP tokenizer from
a 56-token vocabulary, saved by the pipeline's save_pretrained in the Hub folder's layout, then read by upscaler.load.

Tolerances. Both sides compute in float32 (eps = 1.2e-7) the same operations, some in another order or kernel (a
GEGLU split, a fused linear), so a layer's output differs by a few ulps of its scale; through the tiny U-Net's ~40
layers that stays around 1e-6 relative, as measured (5e-7 to 7e-7; the VAE decoder agrees bit for bit), and the test
asks 1e-5. A sampled image then carries that error through the steps: x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
multiplies it by up to 1/sqrt(abar_999) ~ 37 at the first step, guidance by about 2g + 1 ~ 20, and the decoder adds
its own gain; measured differences are 1e-6 to 2.3e-5 on images in [0, 1] (under ATEN_CPU_CAPABILITY default, avx2
and avx512 alike), so 2e-4 is asked: 20 times below one 8-bit level (1/255), and far below what a wrong formula, draw
order or batch order gives (> 1e-2, checked in test_settings_matter).
"""

import json
import string
import weakref

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel
from PIL import Image
from test_sample import cli, folders, run  # noqa: F401  (cli and folders are fixtures)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import lora
import model
import sample
import t5cache
import upscaler
from config import load_config
from data import to_pil

# the x4's block types at toy widths: a plain level, an only-cross-attention level, a self-attention level
UNET = dict(
    block_out_channels=[32, 32, 64], layers_per_block=1, attention_head_dim=[2, 4, 4], in_channels=7, out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=32,
    use_linear_projection=True, only_cross_attention=[True, True, False], num_class_embeds=1000, norm_num_groups=8,
)
VAE = dict(block_out_channels=[16, 32, 32], layers_per_block=1, latent_channels=4, norm_num_groups=8,
           down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3, scaling_factor=0.08333)
LETTERS = list(string.ascii_lowercase)
VOCAB = ["<|startoftext|>", "<|endoftext|>"] + LETTERS + [c + "</w>" for c in LETTERS] + ["th", "the</w>"]
TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(VOCAB),
            max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")
PROMPTS = ["the cat", "a dog on grass"]


pytestmark = pytest.mark.usefixtures("one_thread")


def config(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The diffusers pipeline of tiny random parts, saved in the Hub layout; our Upscaler loaded from that folder."""
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(VOCAB)}, merges=[("t", "h"), ("th", "e</w>")],
                              model_max_length=77)
    pipe = StableDiffusionUpscalePipeline(
        vae=AutoencoderKL(**VAE).eval(), text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)).eval(),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**UNET).eval(),
        low_res_scheduler=DDPMScheduler(**config(upscaler.X4_LOW_RES_SCHEDULER)),
        scheduler=DDIMScheduler(**config(upscaler.X4_SCHEDULER)), max_noise_level=350)
    pipe.set_progress_bar_config(disable=True)
    root = tmp_path_factory.mktemp("x4")
    pipe.save_pretrained(root)
    return pipe, upscaler.load(root), root


def images(batch=2, h=16, w=24, seed=3):
    """Low-res images in [-1, 1] (the pipeline takes a tensor with negative values as already in [-1, 1])."""
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def close(a, b, rtol=1e-5):
    err = (a - b).abs().max().item() / a.abs().max().item()
    assert err < rtol, f"relative error {err:.2e}"


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_unet_matches_diffusers(pair, backend):
    pipe, up, _ = pair
    up.unet.set_attention_backend(backend)
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 7, 8, 12, generator=g), torch.randn(2, 5, 32, generator=g)
    t, level = torch.tensor([3, 900]), torch.tensor([0, 349])
    with torch.no_grad():
        expected = pipe.unet(x, t, text, class_labels=level).sample
        got = up.unet(x, t, text, level)
    up.unet.set_attention_backend("sdpa")
    assert got.shape == (2, 4, 8, 12)
    close(expected, got)


def test_vae_decoder_matches_diffusers(pair):
    pipe, up, _ = pair
    z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = pipe.vae.decode(z).sample, up.vae(z)
    assert got.shape == (2, 3, 32, 48)
    close(expected, got)
    assert not any(k.startswith(("encoder.", "quant_conv.")) for k in up.vae.state_dict())  # decoder only
    assert up.vae.dtype == torch.float32


SCHEDULERS = {  # name -> (class, config): the x4's DDIM (v), and what else a scheduler_config.json may say
    "ddim_v": (DDIMScheduler, upscaler.X4_SCHEDULER),
    "ddpm_v": (DDPMScheduler, dict(upscaler.X4_SCHEDULER, set_alpha_to_one=None)),
    "ddpm_eps_linear": (DDPMScheduler, dict(upscaler.X4_SCHEDULER, set_alpha_to_one=None, prediction_type="epsilon",
                                            beta_schedule="linear", steps_offset=0)),
    "ddim_eps_trailing": (DDIMScheduler, dict(upscaler.X4_SCHEDULER, prediction_type="epsilon", clip_sample=True,
                                              timestep_spacing="trailing", set_alpha_to_one=True)),
}


@pytest.mark.parametrize("name,guidance,noise_level,negative", [
    ("ddim_v", 9.0, 100, None), ("ddim_v", 1.0, 20, None), ("ddpm_v", 7.5, 350, ["", "blurry"]),
    ("ddpm_eps_linear", 1.0, 0, None), ("ddim_eps_trailing", 4.0, 100, None)])
def test_equals_upscale_pipeline(pair, name, guidance, noise_level, negative):
    """Batch of 2, non-square (16x24 -> 64x96), CFG on and off, DDIM and DDPM, v and epsilon."""
    pipe, up, _ = pair
    cls, cfg = SCHEDULERS[name]
    pipe.scheduler = cls(**{k: v for k, v in config(cfg).items() if v is not None})
    ours = upscaler.Upscaler(up.unet, up.vae, up.text_encoder, up.tokenizer,
                             {"_class_name": cls.__name__, **pipe.scheduler.config}, up.low_res_scheduler)
    low, kw = images(), dict(num_inference_steps=3, guidance_scale=guidance, noise_level=noise_level)
    expected = pipe(prompt=PROMPTS, image=low, negative_prompt=negative, generator=torch.Generator().manual_seed(0),
                    output_type="pt", **kw).images
    got = upscaler.stage3(ours, low, PROMPTS, negative_prompt=negative or "", steps=3, guidance=guidance,
                          noise_level=noise_level, generator=torch.Generator().manual_seed(0))
    assert got.shape == (2, 3, 64, 96) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 2e-4
    assert 0 <= got.min() and got.max() <= 1


def test_settings_matter(pair):
    """The parity above is not vacuous: guidance, the noise level, the negative prompt and the seed each change the
    image by far more than its tolerance."""
    _, up, _ = pair
    low = images()

    def run(seed=0, **kw):
        return upscaler.stage3(up, low, PROMPTS, steps=2, generator=torch.Generator().manual_seed(seed),
                               **{"guidance": 9.0, "noise_level": 100, **kw})

    base = run()
    for other in (run(guidance=1.0), run(noise_level=300), run(negative_prompt="blurry"), run(seed=1)):
        assert (other - base).abs().max().item() > 1e-2


def test_embeddings_and_freed_text_encoder(pair):
    """Prompts may be given as embeddings; free_text_encoder drops CLIP after encoding and says so when asked again."""
    _, up, root = pair
    low, g = images(batch=1), lambda: torch.Generator().manual_seed(0)
    expected = upscaler.stage3(up, low, "the cat", steps=2, generator=g())
    fresh = upscaler.load(root)
    text, neg = fresh.encode(["the cat"]), fresh.encode([""])
    got = upscaler.stage3(fresh, low, "the cat", steps=2, generator=g(), free_text_encoder=True)
    assert torch.equal(got, expected) and fresh.text_encoder is None
    assert torch.equal(upscaler.stage3(fresh, low, text, negative_prompt=neg, steps=2, generator=g()), expected)
    with pytest.raises(ValueError, match="text encoder was freed"):
        upscaler.stage3(fresh, low, "the cat", steps=2)


def test_refusals(pair, tmp_path):
    _, up, _ = pair
    with pytest.raises(ValueError, match="noise_level must be an int in \\[0, 350\\]"):
        upscaler.stage3(up, images(), PROMPTS, steps=1, noise_level=351)
    with pytest.raises(ValueError, match="multiples of 4"):
        upscaler.stage3(up, images(h=18), PROMPTS, steps=1)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        upscaler.stage3(up, images(batch=3), PROMPTS, steps=1)
    for change, field in ((dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift"),
                          (dict(use_linear_projection=False), "use_linear_projection"),
                          (dict(num_class_embeds=None), "num_class_embeds"),
                          (dict(addition_embed_type="text"), "addition_embed_type"),
                          (dict(down_block_types=["DownBlock2D"] * 3, mid_block_type="UNetMidBlock2DSimpleCrossAttn"),
                           "mid_block_type"),
                          (dict(an_unknown_key=1), "does not know")):
        with pytest.raises(ValueError, match=field):
            upscaler.X4UNet({**UNET, **change})
    with pytest.raises(ValueError, match="scaling_factor=0.18215"):
        upscaler.VAEDecoder({**VAE, "scaling_factor": 0.18215})
    for change, field in ((dict(thresholding=True), "thresholding"), (dict(_class_name="PNDMScheduler"), "_class_name"),
                          (dict(variance_type="learned_range"), "variance_type")):
        with pytest.raises(ValueError, match=field):
            upscaler.Upscaler(up.unet, up.vae, None, None, {**upscaler.X4_SCHEDULER, **change}, up.low_res_scheduler)

    # an IF folder given as stage III is named as such
    model.build(model.tiny_config(stage=2)).save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="DeepFloyd IF folder"):
        upscaler.load(tmp_path)


def test_full_size_keys_shapes_and_counts():
    """The published configs build the published layouts: every key and shape of diffusers' models (the VAE's
    decoding half), and the x4 U-Net's 473M parameters."""
    with torch.device("meta"):
        unet, ref_unet = upscaler.X4UNet(upscaler.X4_UNET), UNet2DConditionModel(**upscaler.X4_UNET)
        vae, ref_vae = upscaler.VAEDecoder(upscaler.X4_VAE), AutoencoderKL(**upscaler.X4_VAE)
    shapes = lambda m, keep=lambda k: True: {k: v.shape for k, v in m.state_dict().items() if keep(k)}  # noqa: E731
    assert shapes(unet) == shapes(ref_unet)
    assert shapes(vae) == shapes(ref_vae, lambda k: k.startswith(("decoder.", "post_quant_conv.")))
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in ref_unet.parameters()) == 473_398_020


def test_estimate_is_counted_on_fake_tensors():
    tiny = dict(unet_config=UNET, vae_config=VAE, text_config=TEXT, size=(16, 24))
    est, bf16 = upscaler.estimate(**tiny), upscaler.estimate(**tiny, vae_dtype=torch.bfloat16)
    assert set(est["weights_bytes"]) == {"unet", "vae", "text_encoder"}
    # the fp32 decoder's activations are twice the bf16 one's; the phases sit on top of all the weights
    assert est["vae_peak_bytes"] == 2 * bf16["vae_peak_bytes"] > 0
    assert est["peak_bytes"] == sum(est["weights_bytes"].values()) + max(
        est[f"{k}_peak_bytes"] for k in ("text", "unet", "vae"))
    assert est["text_freed_peak_bytes"] <= est["peak_bytes"] and est["flops"] > 0
    json.dumps(est)  # a plain record


def test_variant_files_and_dtypes(pair, tmp_path):
    """variant='fp16' reads the .fp16 weight files; the U-Net and CLIP take `dtype`, the VAE decoder stays float32."""
    pipe, up, _ = pair
    pipe.scheduler = DDIMScheduler(**config(upscaler.X4_SCHEDULER))  # the parity tests change it
    pipe.save_pretrained(tmp_path, variant="fp16")
    with pytest.raises(FileNotFoundError, match="variant='fp16'"):
        upscaler.load(tmp_path)
    half = upscaler.load(tmp_path, variant="fp16", dtype=torch.bfloat16)
    assert (half.unet.dtype, half.text_encoder.dtype, half.vae.dtype) == (torch.bfloat16,) * 2 + (torch.float32,)
    got = upscaler.stage3(half, images(), PROMPTS, steps=2, generator=torch.Generator().manual_seed(0))
    expected = upscaler.stage3(up, images(), PROMPTS, steps=2, generator=torch.Generator().manual_seed(0))
    # bf16 keeps 3 significant digits and the steps amplify its rounding (see the tolerances above): measured 6e-3 on
    # average, 6e-2 at worst
    assert got.dtype == torch.float32 and (got - expected).abs().mean().item() < 2e-2


# ---------------------------------------------------------------------------------------------
# sample.py's stage III: the command line on tiny local weights (IF stage I and II as tests/test_sample.py builds
# them, the x4 parts above), 16 -> 64 -> 256 px standing in for 64 -> 256 -> 1024


@pytest.fixture(scope="module")
def x4_lora(pair, tmp_path_factory):
    """A LoRA on the x4 U-Net (its attention projections: it has no IF-style add_k_proj), B random so it acts."""
    unet = upscaler.load(pair[2]).unet  # a fresh copy: the pair's stays as it is
    lora.add_lora(unet, rank=2, targets=("to_q", "to_k", "to_v", "to_out.0"))
    torch.manual_seed(5)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.5)
    path = tmp_path_factory.mktemp("x4lora") / "x4_lora.safetensors"
    lora.save_lora(unet, path)
    return path


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_cli_cascade_with_stage3(folders, cli, pair, x4_lora, tmp_path, monkeypatch):  # noqa: F811
    """Stage I -> II -> III: the last stage's images 4x stage II's, the 16 and 64 px ones kept, every stage in the
    grid; the IF U-Nets freed before the upscaler loads and CLIP after encoding; stage III equal to upscaler.stage3 on
    the saved stage II files with the generator continued from stage I and II (one generator, seeded once)."""
    config, _ = cli
    x4 = pair[2]
    resident, ups = [], []
    load_unet, load_upscaler = sample.load_unet, sample.load_upscaler

    def tracked_unet(*args, **kw):
        unet, defaults = load_unet(*args, **kw)
        resident.append(weakref.ref(unet))
        return unet, defaults

    def tracked_upscaler(*args, **kw):
        assert resident and all(r() is None for r in resident), "an IF U-Net is still alive as stage III loads"
        ups.append(load_upscaler(*args, **kw))
        return ups[-1]

    monkeypatch.setattr(sample, "load_unet", tracked_unet)
    monkeypatch.setattr(sample, "load_upscaler", tracked_upscaler)
    args = [str(config), f"--output_dir={tmp_path / 'out'}", "--prompt=a red circle", "--negative_prompt=blue",
            f"--stage2={folders[1]}", "--num_images=2"]
    stage3 = [f"--stage3={x4}", "--stage3_steps=2", f"--stage3_lora={x4_lora}"]
    out = sample.main(load_config(args + stage3))
    assert ups[0].text_encoder is None  # CLIP freed once the prompts were encoded
    assert [p.name for p in out["images"]] == ["000_a-red-circle.png", "001_a-red-circle.png"]
    assert [p.name for p in out["images_low"]] == ["000_a-red-circle_16.png", "001_a-red-circle_16.png",
                                                   "000_a-red-circle_64.png", "001_a-red-circle_64.png"]
    assert [pixels(p).shape[:2] for p in out["images"] + out["images_low"]] == [(256, 256)] * 2 + [(16, 16)] * 2 + [
        (64, 64)] * 2
    grid = pixels(out["grid"])
    assert grid.shape[1] == 4 + 2 * 3 * (256 + 4) and grid.shape[0] > 256 + 8  # 2 samples x 3 stages, 256 px cells

    # the same run, step by step: stage I and II for the prompt, then stage III on stage II's files, one generator
    cfg = load_config(args)
    cache = t5cache.prepare(cfg, ["a red circle", "blue"])
    text, neg = cache.get(["a red circle"]).expand(2, -1, -1), cache.get(["blue"])
    (unet1, kw1), (unet2, kw2) = load_unet(folders[0], stage=1), load_unet(folders[1], stage=2)
    g = torch.Generator().manual_seed(cfg.seed)
    low, mid = sample.cascade(unet1, unet2, text, neg, generator=g,
                              stage1_kw=dict(kw1, height=16, width=16, steps=cfg.steps, guidance=cfg.guidance),
                              stage2_kw=dict(kw2, steps=cfg.stage2_steps, guidance=cfg.stage2_guidance,
                                             noise_level=cfg.noise_level))
    saved = out["images_low"][2:]
    for x, paths in ((low, out["images_low"][:2]), (mid, saved)):  # as a run without stage III makes them
        assert all(np.array_equal(np.asarray(im), pixels(p)) for im, p in zip(to_pil(x), paths))
    up, state = load_upscaler(x4, lora=x4_lora), g.get_state()
    expected = upscaler.stage3(up, sample.prepare_image(saved), "a red circle", negative_prompt="blue", steps=2,
                               generator=g)  # guidance 9.0 and noise level 100: stage III's defaults, the config's
    assert all(np.array_equal(np.asarray(im), pixels(p)) for im, p in zip(to_pil(expected * 2 - 1), out["images"]))
    g.set_state(state)
    plain = upscaler.stage3(upscaler.load(x4), sample.prepare_image(saved), "a red circle", negative_prompt="blue",
                            steps=2, generator=g)
    assert (plain - expected).abs().max().item() > 1e-2  # the LoRA acts


def test_cli_stage3_on_a_picture(folders, cli, pair, photo_dir, tmp_path):  # noqa: F811
    """--upscale_only with --stage2 and --stage3: stage II then stage III on a picture (16x each side); without
    --stage2, stage III alone (no T5, no IF U-Net), equal to upscaler.stage3 on the picture, seeded generator."""
    config, _ = cli
    x4 = pair[2]
    out = run(config, f"--output_dir={tmp_path / 'two'}", "--prompt=a red circle", f"--stage2={folders[1]}",
              f"--stage3={x4}", "--stage3_steps=2", "--upscale_only", f"--image={photo_dir / 'small.png'}")
    assert [p.name for p in out["images_low"]] == ["000_a-red-circle_36x24.png"]
    assert pixels(out["images"][0]).shape == (96, 144, 3) and out["variance"] == ["learned_range"]
    assert pixels(out["grid"]).shape[1] == 4 + 3 * (144 + 4)  # the picture, stage II, stage III

    # inpainting at stage I and II, then stage III: the picture and the mask lead the grid's row
    out = run(config, f"--output_dir={tmp_path / 'inpaint'}", "--prompt=a red circle", f"--stage2={folders[1]}",
              f"--stage3={x4}", "--stage3_steps=1", f"--image={photo_dir / 'photo.png'}",
              f"--mask={photo_dir / 'mask.png'}")
    assert [p.name for p in out["images_low"]] == ["000_a-red-circle_24x16.png", "000_a-red-circle_96x64.png"]
    assert pixels(out["images"][0]).shape == (256, 384, 3)
    assert pixels(out["grid"]).shape[1] == 4 + 5 * (384 + 4)  # picture, mask, stage I, II, III

    alone = tmp_path / "alone"
    out = run(config, f"--output_dir={alone / 'out'}", "--prompt=a red circle", f"--stage3={x4}", "--stage3_steps=2",
              "--upscale_only", f"--image={photo_dir / 'photo.png'}", "--seed=3", "--stage3_guidance=5.0",
              "--stage3_noise_level=20")
    assert out["images_low"] == [] and out["variance"] == [] and not (alone / "cache").exists()  # T5 never ran
    expected = upscaler.stage3(upscaler.load(x4), sample.prepare_image(photo_dir / "photo.png"), "a red circle",
                               steps=2, guidance=5.0, noise_level=20, generator=torch.Generator().manual_seed(3))
    assert expected.shape == (1, 3, 64, 96)
    assert np.array_equal(pixels(out["images"][0]), np.asarray(to_pil(expected * 2 - 1)[0]))


def test_stage3_refusals(folders, cli, pair, photo_dir, tmp_path):  # noqa: F811
    config, loras = cli
    x4 = pair[2]
    args = (f"--output_dir={tmp_path}", "--prompt=a")
    small, photo = f"--image={photo_dir / 'small.png'}", f"--image={photo_dir / 'photo.png'}"
    bad = [
        ((f"--stage3={x4}",), "stage3 upscales stage II's images: pass --stage2"),
        ((f"--stage2={x4}",), "is the x4 latent upscaler, stage III .* given as stage II: in sample.py pass it as "
                              "--stage3"),
        ((f"--pretrained={x4}",), "x4 latent upscaler, .* given as stage I: in sample.py pass it as --stage3"),
        ((f"--stage2={folders[1]}", f"--stage3={folders[1]}"), "DeepFloyd IF stage II folder .* not the x4 "
                                                               "upscaler: in sample.py pass it as --stage2"),
        ((f"--stage2={folders[1]}", f"--stage3={folders[0]}"), "IF stage I folder .* pass it as --pretrained"),
        ((f"--stage2={folders[1]}", f"--stage3={tmp_path / 'nope'}"), "no unet/config.json there"),
        ((f"--stage2={folders[1]}", f"--stage3={x4}", "--stage3_noise_level=351"), r"must be in \[0, 350\]"),
        ((f"--stage3_lora={loras[2]}",), "stage3_lora is for stage III: pass --stage3"),
        ((f"--stage2={folders[1]}", f"--stage3={x4}", f"--stage3_lora={tmp_path / 'no.safetensors'}"),
         "no.safetensors does not exist"),
        ((f"--stage3={x4}", "--upscale_only", photo, f"--mask={photo_dir / 'mask.png'}"), "stage III alone, which "
                                                                                          "upscales but does not"),
        ((f"--stage3={x4}", "--upscale_only", photo, "--stage2_strength=0.5"), "stage2_strength is for stage II"),
        ((f"--stage2={folders[1]}", f"--stage3={x4}", "--upscale_only", f"--image={photo_dir / 'mid.png'}"),
         r"the image is 80x60 and stage II then stage III make 16x each side; pictures above 4096 pixels \(64x64"),
        ((small, "--upscale_only"), "upscale_only is for stage II: pass --stage2"),  # as before stage III
    ]
    for extra, message in bad:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            run(config, *args, *extra)
    assert not (tmp_path / "samples").exists()  # every refusal came before any sampling
    # the library's loaders say the same
    with pytest.raises(ValueError, match="x4 latent upscaler, stage III .* given as stage II: in sample.py pass it "
                                         "as --stage3"):
        sample.load_unet(x4, stage=2)
    with pytest.raises(ValueError, match="DeepFloyd IF stage II folder .* pass it as --stage2"):
        sample.load_upscaler(folders[1])
    with pytest.raises(ValueError, match="does not fit the x4 upscaler's U-Net"):
        sample.load_upscaler(x4, lora=loras[2])  # an IF stage II LoRA


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """A 24x16 picture and its mask, a 9x6 one, an 80x60 one (too big to upscale 16x)."""
    root = tmp_path_factory.mktemp("pictures")
    g = torch.Generator().manual_seed(6)
    Image.fromarray((torch.rand(16, 24, 3, generator=g) * 255).byte().numpy()).save(root / "photo.png")
    Image.fromarray((torch.rand(16, 24, generator=g) * 255).byte().numpy()).save(root / "mask.png")
    Image.fromarray((torch.rand(6, 9, 3, generator=g) * 255).byte().numpy()).save(root / "small.png")
    Image.new("RGB", (80, 60)).save(root / "mid.png")
    return root
