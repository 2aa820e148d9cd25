"""img2img, inpainting and super-resolution of a given picture (sample.stage1/stage2 with image, strength, mask)
against diffusers' IFImg2ImgPipeline, IFImg2ImgSuperResolutionPipeline, IFInpaintingPipeline and
IFInpaintingSuperResolutionPipeline (the oracles), and the command line's picture modes."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_sample import (  # noqa: F401  (folders and cli are fixtures)
    DiffusersUNet,
    cli,
    close_to_reference,
    embeddings,
    folders,
    kwargs_for,
    run,
)

import sample

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def refs(folders):  # noqa: F811
    """diffusers' U-Nets and ours (with IF's sampler settings) of the two tiny random IF folders, loaded once."""
    from diffusers import UNet2DConditionModel

    return {stage: (UNet2DConditionModel.from_pretrained(folder / "unet"), *sample.load_unet(folder, stage=stage))
            for stage, folder in zip((1, 2), folders)}


def pipeline(name, refs, folder, **scheduler_kw):
    import diffusers

    parts = dict(tokenizer=None, text_encoder=None, safety_checker=None, feature_extractor=None, watermarker=None,
                 requires_safety_checker=False, unet=refs[2 if "SuperResolution" in name else 1][0],
                 scheduler=diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **scheduler_kw))
    if "SuperResolution" in name:
        parts["image_noising_scheduler"] = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    return getattr(diffusers, name)(**parts)


def picture(w, h, seed=0, mode="RGB"):
    """A random PIL picture (a mask in mode "L": random grey levels, so binarising at 0.5 matters)."""
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
    return Image.fromarray(a, mode)


def seeded():
    return torch.Generator().manual_seed(0)


def agree(stage, refs, expected, call, ours_kw):
    """Our sampler on diffusers' U-Net equals the pipeline bit for bit (same draws, same float32 arithmetic); with
    our U-Net it is as close as test_sample's close_to_reference argues (the U-Nets differ by ~1e-6 relative per
    call, which sampling amplifies to ~1e-4; the unmasked pixels are copied, so they are exact either way).
    -> the number of U-Net calls ours made."""
    ref, unet, defaults = refs[stage]
    assert torch.equal(call(DiffusersUNet(ref), ours_kw), expected)
    calls = []
    hook = unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        close_to_reference(call(unet, {**defaults, **ours_kw}), expected)
    finally:
        hook.remove()
    return len(calls)


# variance, guidance, thresholding, timesteps, steps, batch, strength. 50 * 0.58 is 28.999999999999996 in floats:
# the pipelines keep int() of it, 28 steps, not 29.
CASES = [
    ("learned_range", 7.0, True, None, 5, 2, 0.6),
    ("fixed_small", 1.0, True, None, 50, 1, 0.58),
    ("learned_range", 4.0, False, [999, 700, 400, 120, 7], None, 2, 0.5),  # ends above 0: the last step adds noise
]


@pytest.mark.parametrize("variance,guidance,thresholding,timesteps,steps,batch,strength", CASES)
def test_stage1_img2img_equals_ifimg2imgpipeline(folders, refs, variance, guidance, thresholding, timesteps, steps,  # noqa: F811
                                                 batch, strength):
    ours_kw, sched_kw, call_kw = kwargs_for(variance, thresholding, timesteps, steps)
    text, neg = embeddings(batch)
    pictures = [picture(30, 20, seed=i) for i in range(batch)]  # resized by both to short side 16: 24x16
    expected = pipeline("IFImg2ImgPipeline", refs, folders[0], **sched_kw)(
        image=pictures, strength=strength, prompt_embeds=text, negative_prompt_embeds=neg, guidance_scale=guidance,
        generator=seeded(), output_type="pt", **call_kw).images
    assert expected.shape == (batch, 3, 16, 24)
    n = agree(1, refs, expected, lambda unet, kw: sample.stage1(unet, text, neg, guidance=guidance, image=pictures,
                                                                strength=strength, generator=seeded(), **kw), ours_kw)
    assert n == int(len(timesteps or range(steps)) * strength)  # one U-Net call per kept step


@pytest.mark.parametrize("variance,guidance,thresholding,timesteps,steps,batch,strength", CASES[:1] + CASES[2:])
def test_stage1_inpainting_equals_ifinpaintingpipeline(folders, refs, variance, guidance, thresholding, timesteps,  # noqa: F811
                                                       steps, batch, strength):
    ours_kw, sched_kw, call_kw = kwargs_for(variance, thresholding, timesteps, steps)
    text, neg = embeddings(batch)
    if batch == 2:  # pictures (20x33, portrait: resized to 16x24) and one grey-level mask for both
        image, mask = [picture(20, 33, seed=i) for i in range(batch)], picture(20, 33, seed=9, mode="L")
    else:  # tensors, taken as they are: a [B, H, W] mask in [0, 1], one per sample
        g = torch.Generator().manual_seed(4)
        image, mask = torch.rand(batch, 3, 16, 24, generator=g) * 2 - 1, torch.rand(batch, 16, 24, generator=g)
    pipe = pipeline("IFInpaintingPipeline", refs, folders[0], **sched_kw)
    # (the pipeline binarises a tensor mask in place: it gets a copy)
    expected = pipe(image=image, mask_image=mask.clone() if torch.is_tensor(mask) else mask, strength=strength,
                    prompt_embeds=text, negative_prompt_embeds=neg, guidance_scale=guidance, generator=seeded(),
                    output_type="pt", **call_kw).images
    agree(1, refs, expected, lambda unet, kw: sample.stage1(unet, text, neg, guidance=guidance, image=image,
                                                            mask=mask, strength=strength, generator=seeded(), **kw),
          ours_kw)
    keep = ~sample.prepare_image(mask, 16, mask=True)  # [1|B, 1, H, W]: the pixels not repainted
    original = sample.prepare_image(image, 16)
    assert 0 < keep.float().mean() < 1
    assert torch.equal(torch.where(keep, original, expected), expected)  # ... are the picture's, exactly


SR_CASES = [  # variance, guidance, thresholding, timesteps, steps, batch, strength, noise_level
    ("learned_range", 4.0, True, None, 5, 2, 0.8, 100),
    ("fixed_small", 1.0, False, [999, 700, 400, 120, 7], None, 1, 0.6, 0),
]


@pytest.mark.parametrize("variance,guidance,thresholding,timesteps,steps,batch,strength,noise_level", SR_CASES)
@pytest.mark.parametrize("inpaint", [False, True])
def test_stage2_equals_superresolution_pipelines(folders, refs, inpaint, variance, guidance, thresholding, timesteps,  # noqa: F811
                                                 steps, batch, strength, noise_level):
    """IFImg2ImgSuperResolutionPipeline, and with a mask IFInpaintingSuperResolutionPipeline: the original is noised
    first (one draw), then the low-res augmentation noise is drawn, then the steps."""
    ours_kw, sched_kw, call_kw = kwargs_for(variance, thresholding, timesteps, steps)
    text, neg = embeddings(batch)
    low_res = torch.rand(batch, 3, 8, 12, generator=torch.Generator().manual_seed(5)) * 2 - 1
    original = [picture(36, 24, seed=i) for i in range(batch)]  # resized by both to short side 16: 24x16
    mask = picture(36, 24, seed=7, mode="L") if inpaint else None
    name = "IFInpaintingSuperResolutionPipeline" if inpaint else "IFImg2ImgSuperResolutionPipeline"
    expected = pipeline(name, refs, folders[1], **sched_kw)(
        image=low_res, original_image=original, **(dict(mask_image=mask) if inpaint else {}), strength=strength,
        noise_level=noise_level, prompt_embeds=text, negative_prompt_embeds=neg, guidance_scale=guidance,
        generator=seeded(), output_type="pt", **call_kw).images
    assert expected.shape == (batch, 3, 16, 24)
    agree(2, refs, expected, lambda unet, kw: sample.stage2(
        unet, low_res, text, neg, guidance=guidance, noise_level=noise_level, image=original, mask=mask,
        strength=strength, generator=seeded(), **kw), ours_kw)


def test_preprocessing_equals_the_pipelines(folders, refs):  # noqa: F811
    """prepare_image is the pipelines' preprocessing bit for bit: convert to RGB (masks to L), the short-side resize
    with its rounding (Python's round: 20x16 at 16 is 16x16, a half rounded to even), bicubic, scaling."""
    from diffusers.pipelines.deepfloyd_if.pipeline_if_img2img import resize

    for w, h in [(20, 16), (30, 20), (20, 33), (17, 16), (300, 200), (100, 290), (64, 64), (1, 5)]:
        for short in (16, 64, 256):
            assert sample.pipeline_size(w, h, short) == resize(Image.new("L", (w, h)), short).size, (w, h, short)
    stage1 = pipeline("IFInpaintingPipeline", refs, folders[0])
    stage2 = pipeline("IFInpaintingSuperResolutionPipeline", refs, folders[1])
    rgb = picture(40, 25, seed=1)
    for im in (rgb, rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("P"), np.asarray(rgb)):
        pil = Image.fromarray(im) if isinstance(im, np.ndarray) else im
        assert torch.equal(sample.prepare_image(im, 16), stage1.preprocess_image(pil))
        assert torch.equal(sample.prepare_image(im, 16), stage2.preprocess_original_image(pil))
    mask = picture(40, 25, seed=2, mode="L")
    for m in (mask, mask.convert("RGB")):  # a colour mask is read as grey, as the pipelines read it
        assert torch.equal(sample.prepare_image(m, 16, mask=True).float(), stage1.preprocess_mask_image(m))
    for t in (torch.rand(16, 24), torch.rand(1, 16, 24), torch.rand(2, 1, 16, 24)):
        assert torch.equal(sample.prepare_image(t, mask=True).float(), stage1.preprocess_mask_image(t.clone()))
    # [B, H, W] is B masks (the pipelines stack it to [1, B, H, W], B channels, which cannot broadcast for B > 1);
    # a tensor is never resized
    assert sample.prepare_image(torch.rand(2, 16, 24), 64, mask=True).shape == (2, 1, 16, 24)
    assert torch.equal(sample.prepare_image([rgb, rgb], (12, 8)), sample.prepare_image(rgb.resize((12, 8),
                       Image.BICUBIC), None).expand(2, -1, -1, -1))  # a (W, H) size is exact


def test_bf16_inpainting_keeps_the_picture(folders):  # noqa: F811
    """In the U-Net's dtype (bf16, as on GPUs) the kept pixels are still the picture's, as the picture is in bf16."""
    unet, kw = sample.load_unet(folders[1], dtype=torch.bfloat16, device="cpu")
    text, neg = embeddings(2)
    original, low_res = picture(36, 24), torch.rand(1, 3, 4, 6) * 2 - 1
    mask = torch.zeros(16, 24)
    mask[4:12, 6:18] = 1
    kw.update(steps=3, noise_level=50)
    x = sample.stage2(unet, low_res, text[:1], neg[:1], image=original, mask=mask, generator=seeded(), **kw)
    assert x.dtype == torch.bfloat16 and x.shape == (1, 3, 16, 24)
    start = sample.prepare_image(original, 16).to(torch.bfloat16)
    assert torch.equal(x[..., mask == 0], start[..., mask == 0])
    assert not torch.equal(x[..., mask == 1], start[..., mask == 1])
    y = sample.stage2(unet, low_res.expand(2, -1, -1, -1), text, neg, image=original, mask=mask, generator=seeded(),
                      **kw)  # one picture and one mask for a batch of 2
    assert y.shape == (2, 3, 16, 24) and torch.equal(y[..., mask == 0], start.expand(2, -1, -1, -1)[..., mask == 0])


def test_refusals(refs, tmp_path, monkeypatch):
    unet = refs[1][1]
    text, neg = embeddings(1)
    kw = dict(steps=4, generator=seeded())
    with pytest.raises(ValueError, match=r"the mask is 30x30 but the image is 30x20"):
        sample.stage1(unet, text, neg, image=picture(30, 20), mask=picture(30, 30, mode="L"), **kw)
    with pytest.raises(ValueError, match=r"the mask is 12x8 but the image is 24x16"):
        sample.stage1(unet, text, neg, image=torch.zeros(1, 3, 16, 24), mask=torch.ones(8, 12), **kw)
    for strength in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match=rf"strength={strength} must be in \(0, 1\]"):
            sample.stage1(unet, text, neg, image=picture(30, 20), strength=strength, **kw)
    with pytest.raises(ValueError, match=r"strength=0.2 of 4 steps keeps int\(4 \* 0.2\) = 0 of them"):
        sample.stage1(unet, text, neg, image=picture(30, 20), strength=0.2, **kw)
    with pytest.raises(ValueError, match="a mask needs the picture it acts on"):
        sample.stage1(unet, text, neg, mask=picture(30, 20, mode="L"), **kw)
    with pytest.raises(ValueError, match="strength=0.5 needs the picture"):
        sample.stage1(unet, text, neg, strength=0.5, **kw)
    with pytest.raises(ValueError, match="image holds 3 pictures for 1 samples"):
        sample.stage1(unet, text, neg, image=torch.zeros(3, 3, 16, 16), **kw)
    with pytest.raises(ValueError, match="the image is 24x16 .* but height, width = 64, 64"):
        sample.stage1(unet, text, neg, image=picture(30, 20), height=64, width=64, **kw)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\] or \[3, H, W\]"):
        sample.stage1(unet, text, neg, image=torch.zeros(1, 4, 16, 16), **kw)
    see_through = picture(30, 20).convert("RGBA")
    see_through.putpixel((3, 3), (0, 0, 0, 0))
    with pytest.raises(ValueError, match="has transparent pixels"):
        sample.prepare_image(see_through, 16)
    assert sample.prepare_image(picture(30, 20).convert("RGBA"), 16).shape == (1, 3, 16, 24)  # opaque: fine
    with pytest.raises(ValueError, match="must hold uint8 pixels"):
        sample.prepare_image(np.zeros((16, 16, 3), np.float32))
    with pytest.raises(FileNotFoundError, match="nope.png does not exist"):
        sample.prepare_image(tmp_path / "nope.png")
    monkeypatch.setattr(sample, "MAX_PIXELS", 599)
    with pytest.raises(ValueError, match=r"image is 30x20, 0 MP; pictures above 0 MP \(sample.MAX_PIXELS\)"):
        sample.prepare_image(picture(30, 20))


# ---------------------------------------------------------------------------------------------
# command line


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A 24x16 photo (the CLI config's resolution '16' is its short side, so stage I takes it as it is), a mask of
    its size repainting the left half, a small picture to upscale with its mask, a transparent one, a big one."""
    root = tmp_path_factory.mktemp("photos")
    picture(24, 16, seed=3).save(root / "photo.png")
    mask = np.zeros((16, 24), np.uint8)
    mask[:, :12] = 255
    Image.fromarray(mask).save(root / "mask.png")
    picture(9, 6, seed=4).save(root / "small.png")
    blocks = np.kron(np.eye(2, dtype=np.uint8), np.full((3, 5), 255, np.uint8))[:, :9]  # 9x6: two white blocks
    Image.fromarray(blocks).save(root / "smallmask.png")
    see_through = picture(24, 16).convert("RGBA")
    see_through.putpixel((0, 0), (0, 0, 0, 0))
    see_through.save(root / "see_through.png")
    Image.new("RGB", (300, 220)).save(root / "big.png")
    return root


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_cli_img2img_inpainting_and_cascade(folders, cli, photos, tmp_path):  # noqa: F811
    config, _ = cli
    out = run(config, f"--output_dir={tmp_path / 'a'}", "--prompt=a red circle", f"--image={photos / 'photo.png'}",
              "--strength=0.7", "--num_images=2")
    assert [Image.open(p).size for p in out["images"]] == [(24, 16)] * 2 and out["images_low"] == []
    assert not np.array_equal(pixels(out["images"][0]), pixels(photos / "photo.png"))
    assert Image.open(out["grid"]).width >= 3 * 128  # input, then the 2 samples

    out = run(config, f"--output_dir={tmp_path / 'b'}", "--prompt=a red circle", f"--image={photos / 'photo.png'}",
              f"--mask={photos / 'mask.png'}", f"--stage2={folders[1]}", "--stage2_strength=1.0")
    assert [p.name for p in out["images_low"]] == ["000_a-red-circle_24x16.png"]
    low, high = pixels(out["images_low"][0]), pixels(out["images"][0])
    photo = pixels(photos / "photo.png")
    assert low.shape == (16, 24, 3) and high.shape == (64, 96, 3)
    assert np.array_equal(low[:, 12:], photo[:, 12:]) and not np.array_equal(low[:, :12], photo[:, :12])
    photo4 = np.asarray(Image.open(photos / "photo.png").resize((96, 64), Image.BICUBIC))  # stage II's original
    assert np.array_equal(high[:, 48:], photo4[:, 48:]) and not np.array_equal(high[:, :48], photo4[:, :48])
    grid = Image.open(out["grid"])
    assert grid.width == 4 + 3 * (192 + 4)  # input, mask, sample: 96 px cells enlarged 2x to reach 128


def test_cli_upscale_only(folders, cli, photos, tmp_path):  # noqa: F811
    config, _ = cli
    out = run(config, f"--output_dir={tmp_path / 'a'}", "--prompt=a red circle", f"--stage2={folders[1]}",
              "--upscale_only", f"--image={photos / 'small.png'}", "--num_images=2")
    assert [Image.open(p).size for p in out["images"]] == [(36, 24)] * 2 and out["images_low"] == []
    assert out["variance"] == ["learned_range"]  # stage II's alone

    out = run(config, f"--output_dir={tmp_path / 'b'}", "--prompt=a red circle", f"--stage2={folders[1]}",
              "--upscale_only", f"--image={photos / 'small.png'}", f"--mask={photos / 'smallmask.png'}")
    high = pixels(out["images"][0])
    keep = np.asarray(Image.open(photos / "smallmask.png").resize((36, 24), Image.BICUBIC)) < 128
    start = np.asarray(Image.open(photos / "small.png").resize((36, 24), Image.BICUBIC))
    assert 0 < keep.mean() < 1
    assert np.array_equal(high[keep], start[keep]) and not np.array_equal(high[~keep], start[~keep])


def test_cli_bad_pictures(folders, cli, photos, tmp_path):  # noqa: F811
    config, loras = cli
    args = (f"--output_dir={tmp_path}", "--prompt=a")
    photo = f"--image={photos / 'photo.png'}"
    bad = [
        ((f"--mask={photos / 'mask.png'}",), "mask: needs a picture, pass --image=PATH too"),
        (("--upscale_only", f"--stage2={folders[1]}"), "upscale_only: needs a picture"),
        ((photo, "--upscale_only"), "upscale_only is for stage II: pass --stage2"),
        ((photo, "--stage2_strength=0.5"), "stage2_strength is for stage II"),
        ((photo, "--upscale_only", f"--stage2={folders[1]}", "--strength=0.5"), "upscale_only skips stage I: use "
                                                                               "stage2_strength"),
        ((photo, "--upscale_only", f"--stage2={folders[1]}", f"--lora={loras[1]}"), "use stage2_lora"),
        ((photo, "--strength=1.5"), r"strength=1.5 must be in \(0, 1\]"),
        ((photo, f"--mask={photos / 'small.png'}"), "the mask is 9x6 but the image is 24x16"),
        ((f"--image={photos / 'see_through.png'}",), "has transparent pixels"),
        ((f"--image={photos / 'nope.png'}",), "nope.png does not exist"),
        ((f"--image={photos / 'big.png'}", "--upscale_only", f"--stage2={folders[1]}"),
         r"the image is 300x220 .* above 65536 pixels"),
    ]
    for extra, message in bad:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            run(config, *args, *extra)
    assert not (tmp_path / "samples").exists()  # every refusal came before any sampling
