"""upscaler.py against diffusers: the x4 upscaler's U-Net, VAE decoder and StableDiffusionUpscalePipeline.

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

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import model
import upscaler

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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()  # tiny ops on a busy 2-core machine spend most of their time in thread hand-offs
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
