"""sample.py against diffusers' IFPipeline / IFSuperResolutionPipeline (the oracles), and its command line."""

import json

import pytest
import torch
from PIL import Image
from test_model import STAGE_I, STAGE_II

import lora
import sample
import t5cache
from config import load_config
from model import UNet, build, tiny_config

IF_SCHEDULER = dict(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", thresholding=True,
                    dynamic_thresholding_ratio=0.95, clip_sample=True, prediction_type="epsilon",
                    num_train_timesteps=1000)


pytestmark = pytest.mark.usefixtures("one_thread")


def save_if_folder(path, unet_config, sample_max_value, seed):
    """A random diffusers U-Net and IF's scheduler config, saved in the diffusers pipeline layout."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    UNet2DConditionModel(**unet_config).save_pretrained(path / "unet")
    DDPMScheduler(**IF_SCHEDULER, sample_max_value=sample_max_value).save_pretrained(path / "scheduler")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("if")
    return save_if_folder(root / "stage1", STAGE_I, 1.5, 0), save_if_folder(root / "stage2", STAGE_II, 1.0, 1)


def pipeline(folder, stage, **scheduler_kw):
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel

    parts = dict(tokenizer=None, text_encoder=None, safety_checker=None, feature_extractor=None, watermarker=None,
                 requires_safety_checker=False, unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
                 scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **scheduler_kw))
    if stage == 1:
        return IFPipeline(**parts)
    return IFSuperResolutionPipeline(image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), **parts)


class DiffusersUNet(torch.nn.Module):
    """diffusers' U-Net behind our UNet's interface: checks the sampler alone, bit for bit."""

    def __init__(self, ref):
        super().__init__()
        self.ref, self.config = ref, dict(ref.config)
        self.dtype, self.device = ref.dtype, ref.device
        self.downsample_factor = 2 ** (len(ref.config.block_out_channels) - 1)

    def forward(self, x, t, text_emb, noise_level=None):
        level = None if noise_level is None else noise_level.expand(x.shape[0])
        return self.ref(x, t, text_emb, class_labels=level).sample


def close_to_reference(ours, expected):
    """With our U-Net in place of diffusers' (the sampler alone is checked bit for bit). The two U-Nets agree to
    ~1e-6 relative per call (tests/test_model.py), and sampling amplifies that: CFG by up to 2g + 1, and x_0 =
    (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) by ~1e4 at t = 999 where thresholding does not clip. Perturbing
    diffusers' own U-Net output by 1e-6 relative moves these images by ~1e-4 (measured), so we require 1e-3:
    far below one 8-bit level (2/255), i.e. the same PNGs up to rare rounding flips."""
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-3)


def embeddings(batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 7, 48, generator=g), torch.randn(batch, 7, 48, generator=g)


def kwargs_for(variance, thresholding, timesteps, steps):
    """Our keyword arguments, and the diffusers pipeline/scheduler settings that mean the same."""
    ours = dict(variance=variance, steps=steps, timesteps=timesteps)
    sched = dict(variance_type=variance)
    if not thresholding:
        ours["thresholding"], sched["thresholding"] = None, False
    call = dict(num_inference_steps=steps) if timesteps is None else dict(timesteps=timesteps)
    return ours, sched, call


CASES = [  # variance, guidance, thresholding, timesteps
    ("learned_range", 7.0, True, None),
    ("fixed_small", 7.0, True, None),
    ("learned_range", 1.0, True, None),
    ("fixed_small", 1.0, False, None),
    ("learned_range", 4.0, False, [999, 700, 400, 120, 7]),  # ends above 0: the last step adds (tiny) noise
]


@pytest.mark.parametrize("variance,thresholding", [("learned_range", True), ("fixed_small", False)])
def test_stage1_with_v_prediction_equals_ifpipeline(folders, variance, thresholding):
    """A scheduler config of prediction_type v_prediction: the guided output is read as v, bit for bit as the
    pipeline reads it (and not as epsilon)."""
    ours_kw, sched_kw, call_kw = kwargs_for(variance, thresholding, None, steps=5)
    text, neg = embeddings()
    pipe = pipeline(folders[0], 1, prediction_type="v_prediction", **sched_kw)
    expected = pipe(prompt_embeds=text, negative_prompt_embeds=neg, height=16, width=24, guidance_scale=7.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt", **call_kw).images
    ours = lambda prediction_type: sample.stage1(
        DiffusersUNet(pipe.unet), text, neg, height=16, width=24, guidance=7.0, prediction_type=prediction_type,
        generator=torch.Generator().manual_seed(0), **ours_kw)
    assert torch.equal(ours("v_prediction"), expected)
    assert not torch.equal(ours("epsilon"), expected)


@pytest.mark.parametrize("variance,guidance,thresholding,timesteps", CASES)
def test_stage1_equals_ifpipeline(folders, variance, guidance, thresholding, timesteps):
    ours_kw, sched_kw, call_kw = kwargs_for(variance, thresholding, timesteps, steps=5)
    text, neg = embeddings()
    pipe = pipeline(folders[0], 1, **sched_kw)
    expected = pipe(prompt_embeds=text, negative_prompt_embeds=neg, height=16, width=24, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(0), output_type="pt", **call_kw).images
    exact = sample.stage1(DiffusersUNet(pipe.unet), text, neg, height=16, width=24, guidance=guidance,
                          generator=torch.Generator().manual_seed(0), **ours_kw)
    assert torch.equal(exact, expected)  # the sampler alone: bit for bit
    unet, defaults = sample.load_unet(folders[0])
    assert defaults == dict(variance="learned_range", thresholding=(0.95, 1.5), clip_sample=True, timesteps="leading",
                            prediction_type="epsilon")
    ours_kw = {**defaults, **ours_kw}
    calls = []
    unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    got = sample.stage1(unet, text, neg, height=16, width=24, guidance=guidance,
                        generator=torch.Generator().manual_seed(0), **ours_kw)
    assert got.shape == (2, 3, 16, 24)
    close_to_reference(got, expected)
    assert calls == [4 if guidance > 1 else 2] * (len(timesteps) if timesteps else 5)  # one U-Net call per step


@pytest.mark.parametrize("variance,guidance,thresholding,timesteps", CASES[:3] + CASES[4:])
def test_stage2_equals_ifsuperresolutionpipeline(folders, variance, guidance, thresholding, timesteps):
    ours_kw, sched_kw, call_kw = kwargs_for(variance, thresholding, timesteps, steps=4)
    text, neg = embeddings()
    low_res = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(5)) * 2 - 1
    pipe = pipeline(folders[1], 2, **sched_kw)
    expected = pipe(image=low_res, prompt_embeds=text, negative_prompt_embeds=neg, height=32, width=48,
                    guidance_scale=guidance, noise_level=100, generator=torch.Generator().manual_seed(0),
                    output_type="pt", **call_kw).images
    exact = sample.stage2(DiffusersUNet(pipe.unet), low_res, text, neg, height=32, width=48, guidance=guidance,
                          noise_level=100, generator=torch.Generator().manual_seed(0), **ours_kw)
    assert torch.equal(exact, expected)  # the sampler alone: bit for bit
    unet, defaults = sample.load_unet(folders[1], stage=2)
    assert defaults["thresholding"] == (0.95, 1.0)
    got = sample.stage2(unet, low_res, text, neg, height=32, width=48, guidance=guidance, noise_level=100,
                        generator=torch.Generator().manual_seed(0), **ours_kw)
    close_to_reference(got, expected)


def test_cascade_equals_both_pipelines_in_turn(folders):
    text, neg = embeddings(batch=1)
    g = torch.Generator().manual_seed(7)
    low = pipeline(folders[0], 1)(prompt_embeds=text, negative_prompt_embeds=neg, height=16, width=16,
                                  num_inference_steps=3, generator=g, output_type="pt").images
    high = pipeline(folders[1], 2)(image=low, prompt_embeds=text, negative_prompt_embeds=neg, height=64, width=64,
                                   num_inference_steps=3, generator=g, output_type="pt").images
    (_, kw1), (_, kw2) = sample.load_unet(folders[0]), sample.load_unet(folders[1])  # IF's settings per stage
    u1, u2 = (DiffusersUNet(pipeline(f, i + 1).unet) for i, f in enumerate(folders))
    got_low, got_high = sample.cascade(u1, u2, text, neg, stage1_kw=dict(kw1, height=16, width=16, steps=3),
                                       stage2_kw=dict(kw2, steps=3), generator=torch.Generator().manual_seed(7))
    assert got_high.shape == (1, 3, 64, 64)
    assert torch.equal(got_low, low) and torch.equal(got_high, high)


def test_no_negative_means_no_guidance(folders):
    unet, _ = sample.load_unet(folders[0])
    text, neg = embeddings()
    a = sample.stage1(unet, text, None, height=16, width=16, steps=3, guidance=7.0, generator=torch.manual_seed(1))
    b = sample.stage1(unet, text, neg, height=16, width=16, steps=3, guidance=1.0, generator=torch.manual_seed(1))
    c = sample.stage1(unet, text, neg, height=16, width=16, steps=3, guidance=7.0, generator=torch.manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_auto_variance_rule():
    learned, fixed = {"variance_type": "learned_range"}, {"variance_type": "fixed_small"}
    assert sample.auto_variance({"variance_trained": "true"}, fixed) == "learned_range"
    assert sample.auto_variance({"variance_trained": "false"}, learned) == "fixed_small"
    assert sample.auto_variance({}, learned) == "fixed_small"  # a LoRA from another trainer: eps only
    assert sample.auto_variance(None, fixed) == "fixed_small"  # our eps-only full fine-tune
    assert sample.auto_variance(None, learned) == "learned_range"  # IF as shipped
    assert sample.auto_variance(None, None) == "learned_range"
    with pytest.raises(ValueError, match="fixed_large"):
        sample.auto_variance(None, {"variance_type": "fixed_large"})


def test_bare_unet_folder_and_refusals(folders, tmp_path):
    _, defaults = sample.load_unet(folders[1] / "unet")  # scheduler/ beside unet/ is still found
    assert defaults["thresholding"] == (0.95, 1.0)
    (tmp_path / "unet").symlink_to(folders[0] / "unet")  # no scheduler config at all: IF's stage I settings
    assert sample.load_unet(tmp_path / "unet")[1]["thresholding"] == (0.95, 1.5)
    unet, _ = sample.load_unet(folders[0])
    text, neg = embeddings()
    with pytest.raises(ValueError, match="multiples of 2"):
        sample.stage1(unet, text, neg, height=16, width=15)
    with pytest.raises(ValueError, match="stage I U-Net .* given as stage II"):
        sample.stage2(unet, torch.zeros(2, 3, 4, 4), text, neg, height=16, width=16)
    with pytest.raises(ValueError, match="stage II U-Net .* given as stage I"):
        sample.load_unet(folders[1], stage=1)


def test_eps_only_unet_with_guidance(tmp_path):
    """A U-Net with 3 output channels (eps only, e.g. a full fine-tune with loss_type='mse') samples with guidance
    and variance='fixed_small'. IFPipeline cannot be the oracle here (its guidance step splits off variance channels
    that are not there), so the oracle is its loop written out with diffusers' DDPMScheduler."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.utils.torch_utils import randn_tensor

    torch.manual_seed(4)
    ref = UNet2DConditionModel(**dict(STAGE_I, out_channels=3)).eval()
    ref.save_pretrained(tmp_path / "unet")
    text, neg = embeddings()
    guidance, steps = 5.0, 4
    sched = DDPMScheduler(**dict(IF_SCHEDULER, variance_type="fixed_small"), sample_max_value=1.5)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    expected = randn_tensor((2, 3, 16, 24), generator=g)
    with torch.no_grad():
        for t in sched.timesteps:
            eps_u, eps_c = ref(torch.cat([expected] * 2), t, torch.cat([neg, text])).sample.chunk(2)
            expected = sched.step(eps_u + guidance * (eps_c - eps_u), t, expected, generator=g).prev_sample
    kw = dict(height=16, width=24, steps=steps, guidance=guidance, variance="fixed_small")
    exact = sample.stage1(DiffusersUNet(ref), text, neg, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(exact, expected)  # the sampler alone: bit for bit
    unet = UNet.from_pretrained(tmp_path)
    assert unet.config["out_channels"] == 3
    close_to_reference(sample.stage1(unet, text, neg, generator=torch.Generator().manual_seed(0), **kw), expected)


def test_one_grid_painter():
    import data

    assert sample.image_grid is data.image_grid and sample.to_pil is data.to_pil
    assert not hasattr(sample, "parse_resolution")  # sizes are read by data.parse_resolutions alone


# ---------------------------------------------------------------------------------------------
# command line


@pytest.fixture(scope="module")
def cli(folders, tmp_path_factory):
    """A tiny T5 (width 48, as the U-Nets' encoder_hid_dim), a config, an eps-only stage I LoRA, a stage II LoRA."""
    root = tmp_path_factory.mktemp("cli")
    words = "a an the red blue green circle square triangle on of background big small".split()
    texts = [f"{a} {b} {c} on a {d} background" for a in words for b in words[3:6] for c in words[6:9]
             for d in words[3:6]]
    t5 = t5cache.make_tiny_t5(root / "t5", texts, d_model=48)
    config = root / "cfg.py"
    config.write_text(f"pretrained = {str(folders[0])!r}\ntext_encoder = {str(t5)!r}\nresolution = '16'\n"
                      f"steps = 3\nstage2_steps = 2\nguidance = 5.0\nseed = 0\ndevice = 'cpu'\n")
    loras = {}
    for stage, folder in zip((1, 2), folders):
        unet = UNet.from_pretrained(folder)
        lora.add_lora(unet, rank=2)
        torch.manual_seed(stage)
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.data.normal_(std=0.5)
        loras[stage] = root / f"lora{stage}.safetensors"
        lora.save_lora(unet, loras[stage], metadata={"variance_trained": "false"})
    return config, loras


def run(config, *args):
    return sample.main(load_config([str(config), *args]))


def test_cli_stage1_and_cascade_with_lora(folders, cli, tmp_path):
    config, loras = cli
    (tmp_path / "prompts.txt").write_text("a red circle\n\n  a blue square on a green background \n")
    out = run(config, f"--output_dir={tmp_path / 'one'}", "--prompt=a big triangle", "--num_images=2",
              f"--prompts_file={tmp_path / 'prompts.txt'}")
    assert [p.name for p in out["images"]] == ["000_a-big-triangle.png", "001_a-big-triangle.png",
                                               "002_a-red-circle.png", "003_a-red-circle.png",
                                               "004_a-blue-square-on-a-green-background.png",
                                               "005_a-blue-square-on-a-green-background.png"]
    assert all(Image.open(p).size == (16, 16) for p in out["images"]) and out["images_low"] == []
    assert out["variance"] == ["learned_range"]
    grid = Image.open(out["grid"])
    assert grid.width > 2 * 128 and grid.height > 3 * 128  # 2 columns x 3 rows of 128 px cells plus labels

    out2 = run(config, f"--output_dir={tmp_path / 'two'}", "--prompt=a red circle", f"--lora={loras[1]}",
               f"--stage2={folders[1]}", "--noise_level=100")
    assert out2["variance"] == ["fixed_small", "learned_range"]  # the LoRA's metadata says eps-only
    assert Image.open(out2["images"][0]).size == (64, 64)
    assert [p.name for p in out2["images_low"]] == ["000_a-red-circle_16.png"]
    low = Image.open(out2["images_low"][0])
    assert low.size == (16, 16) and low.tobytes() != Image.open(out["images"][2]).tobytes()  # the LoRA acts

    out3 = run(config, f"--output_dir={tmp_path / 'three'}", "--prompt=a red circle", "--resolution=24x16")
    assert Image.open(out3["images"][0]).size == (24, 16)  # WxH


def test_cli_bad_arguments(folders, cli, tmp_path):
    config, loras = cli
    with pytest.raises(FileNotFoundError, match="nope.safetensors does not exist"):
        run(config, "--prompt=a", f"--lora={tmp_path / 'nope.safetensors'}")
    with pytest.raises(ValueError, match=f"LoRA {loras[2]} does not fit the stage I U-Net"):
        run(config, "--prompt=a", f"--lora={loras[2]}", f"--output_dir={tmp_path}")
    with pytest.raises(ValueError, match="stage II U-Net .* given as stage I"):
        run(config, "--prompt=a", f"--pretrained={folders[1]}", f"--output_dir={tmp_path}")
    with pytest.raises(ValueError, match="no prompts"):
        run(config)
    with pytest.raises(ValueError, match=r"resolution='16,24' names 2 sizes; sample.py makes one size per run"):
        run(config, "--prompt=a", "--resolution=16,24", f"--output_dir={tmp_path}")
    with pytest.raises(ValueError, match="bad resolution '16px'"):
        run(config, "--prompt=a", "--resolution=16px", f"--output_dir={tmp_path}")
    assert json.loads((folders[0] / "scheduler" / "scheduler_config.json").read_text())["sample_max_value"] == 1.5


def test_scheduler_config_is_read_beside_unet_in_a_run_folder(tmp_path):
    """A full run's output_dir holds the run's config.json next to unet/ and scheduler/: its scheduler is the one
    read (not the parent folder's), and a bare unet/ folder still finds the scheduler/ beside it."""
    (tmp_path / "unet").mkdir()
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    (tmp_path / "config.json").write_text("{}")  # the training run's config
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"variance_type": "fixed_small"}))
    assert sample.read_scheduler_config(tmp_path)["variance_type"] == "fixed_small"
    assert sample.read_scheduler_config(tmp_path / "unet")["variance_type"] == "fixed_small"


def test_sampler_of_a_bare_unet_follows_its_channels_and_scheduler_config(tmp_path):
    """How class images and the demo's judge sample a U-Net without a LoRA: IF's learned_range and epsilon by
    default; fixed_small for a U-Net without variance channels, whatever the loss that would train it; the variance
    and prediction type a full fine-tune's scheduler config records."""
    six, three = build(tiny_config()), build({**tiny_config(), "out_channels": 3})
    assert sample.sampler_of(six) == dict(variance="learned_range", prediction_type="epsilon")
    assert sample.sampler_of(three) == dict(variance="fixed_small", prediction_type="epsilon")
    six.save_pretrained(tmp_path / "unet")
    (tmp_path / "scheduler").mkdir()
    config = sample.scheduler_config(1, "fixed_small", "v_prediction")
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    assert sample.sampler_of(six, tmp_path) == dict(variance="fixed_small", prediction_type="v_prediction")
