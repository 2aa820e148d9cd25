"""model.py against diffusers' UNet2DConditionModel: same weights, same inputs -> same outputs."""

import copy
import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from model import FLAVOURS, UNet, build

STAGE_I = dict(
    block_out_channels=[32, 64], layers_per_block=1, attention_head_dim=8, in_channels=3, out_channels=6,
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    encoder_hid_dim=48, encoder_hid_dim_type="text_proj", cross_attention_dim=64, addition_embed_type="text",
    addition_embed_type_num_heads=4, resnet_time_scale_shift="scale_shift", act_fn="gelu", norm_num_groups=8,
    cross_attention_norm="group_norm", sample_size=16,
)
STAGE_II = dict(
    STAGE_I, block_out_channels=[16, 32, 48], layers_per_block=[1, 2, 2], in_channels=6,
    down_block_types=["ResnetDownsampleBlock2D"] * 2 + ["SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D"] + ["ResnetUpsampleBlock2D"] * 2, cross_attention_dim=32,
    class_embed_type="timestep", time_embedding_dim=40, time_embedding_act_fn="gelu", resnet_skip_time_act=True,
    resnet_out_scale_factor=1.4142271248762552, mid_block_scale_factor=1.4142271248762552,
)
VARIANTS = {
    "stage_i": STAGE_I,
    "stage_ii": STAGE_II,
    "only_cross_silu": dict(STAGE_I, only_cross_attention=True, act_fn="silu"),
    "default_time_norm": dict(STAGE_I, resnet_time_scale_shift="default", attention_head_dim=[16, 8],
                              layers_per_block=[2, 1]),
}


def pair(config, tmp_path, seed=0):
    """A random diffusers U-Net saved with save_pretrained, and ours loaded from that folder."""
    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**config).eval()
    ref.save_pretrained(tmp_path / "unet")
    return ref, UNet.from_pretrained(tmp_path, subfolder="unet")


def inputs(config, batch=2, h=16, w=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config["in_channels"], h, w, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    text = torch.randn(batch, 7, config["encoder_hid_dim"], generator=g)
    level = torch.randint(0, 1000, (batch,), generator=g) if config.get("class_embed_type") else None
    return x, t, text, level


def close(a, b, rtol=1e-5, scale=0.0):
    """Agreement relative to the tensor's scale (or `scale`, if larger: for tensors that should be ~0)."""
    err = (a - b).abs().max().item() / max(a.abs().max().item(), scale)
    assert err < rtol, f"relative error {err:.2e}"


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_parity_with_diffusers(name, backend, tmp_path):
    config = VARIANTS[name]
    ref, ours = pair(config, tmp_path)
    ours.set_attention_backend(backend)
    x, t, text, level = inputs(config)
    with torch.no_grad():
        expected = ref(x, t, text, class_labels=level).sample
        got = ours(x, t, text, noise_level=level)
    assert got.shape == (2, 6, 16, 24)
    close(expected, got)


def test_scalar_timestep(tmp_path):
    """A scalar timestep (int or 0-d tensor) is every sample's; no text mask is taken, as IF's pipelines pass none."""
    ref, ours = pair(STAGE_I, tmp_path)
    x, _, text, _ = inputs(STAGE_I, batch=3, h=24, w=16)
    with torch.no_grad():
        expected = ref(x, 250, text).sample
        got = ours(x, 250, text)
        # the same computation after the scalar is expanded to the batch, hence bit for bit
        assert torch.equal(ours(x, torch.tensor(250), text), got)
        assert torch.equal(ours(x, torch.full((3,), 250), text), got)
    close(expected, got)
    with pytest.raises(TypeError, match="text_mask"):
        ours(x, 250, text, text_mask=torch.ones(3, 7))


def test_flavours_agree_with_config():
    """model.FLAVOURS holds the architectures; the names, Hub repos and stages are config.py's."""
    import config

    assert set(FLAVOURS) == set(config.FLAVOUR_REPOS)
    for name, flavour in FLAVOURS.items():
        assert set(flavour) == {"config", "resolution", "inferred"}, name  # nothing that config.py already says
        stage = config.Config(model_flavour=name).stage
        assert flavour["config"]["in_channels"] == {1: 3, 2: 6}[stage], name


def test_our_save_pretrained_loads_in_diffusers(tmp_path):
    torch.manual_seed(3)
    ours = build(STAGE_II).eval()
    ours.save_pretrained(tmp_path / "out")
    ref = UNet2DConditionModel.from_pretrained(tmp_path / "out").eval()
    x, t, text, level = inputs(STAGE_II, h=32, w=16)
    with torch.no_grad():
        close(ref(x, t, text, class_labels=level).sample, ours(x, t, text, noise_level=level))
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["_class_name"] == "UNet2DConditionModel" and saved["layers_per_block"] == [1, 2, 2]


@pytest.mark.parametrize("flavour,count", [("i-xlarge-4.3b", 4_304_695_110), ("ii-large-1.2b", 1_243_277_190)])
def test_full_size_keys_shapes_and_counts(flavour, count):
    ours = build(flavour, device="meta")
    with torch.device("meta"):
        ref = UNet2DConditionModel(**FLAVOURS[flavour]["config"])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == count


def test_sharded_and_fp16_variant_load(tmp_path):
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**STAGE_I).eval()
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    copy.deepcopy(ref).to(torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    sharded = UNet.from_pretrained(tmp_path / "sharded", subfolder=None)
    half = UNet.from_pretrained(tmp_path / "fp16", subfolder=None, variant="fp16", dtype=torch.float16)
    assert half.dtype == torch.float16
    for k, v in ref.state_dict().items():
        assert torch.equal(sharded.state_dict()[k], v)
        assert torch.equal(half.state_dict()[k], v.half())
    with pytest.raises(FileNotFoundError, match="variant='fp16'"):
        UNet.from_pretrained(tmp_path / "fp16", subfolder=None)


def test_bf16_close_to_fp32(tmp_path):
    _, ours = pair(STAGE_I, tmp_path)
    x, t, text, _ = inputs(STAGE_I)
    with torch.no_grad():
        full = ours(x, t, text)
        half = ours.to(torch.bfloat16)(x.bfloat16(), t, text.bfloat16())
    assert half.dtype == torch.bfloat16
    err = (half.float() - full).abs().max() / full.abs().max()
    assert err < 0.05, err  # bf16 keeps 8 bits of mantissa; errors compound over ~40 layers


@pytest.mark.parametrize("mode", ["attention", "full"])
def test_gradient_checkpointing_same_gradients(mode):
    torch.manual_seed(0)
    model = build(STAGE_II)
    x, t, text, level = inputs(STAGE_II, h=32, w=32)

    def grads(ckpt):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(x, t, text, noise_level=level).square().mean().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(mode)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("checkpointing", [False, "attention", "full"])
def test_gradients_match_diffusers_with_frozen_base(checkpointing, tmp_path):
    """LoRA-style training (frozen convs keep no input; norms are recomputed): the same gradients as diffusers
    for the trainable weights, the biases (bitfit) and the input, also in channels_last."""
    ref, ours = pair(STAGE_II, tmp_path)
    ours = ours.to(memory_format=torch.channels_last).train()
    ours.gradient_checkpointing = checkpointing
    x, t, text, level = inputs(STAGE_II, h=32, w=16)
    grads = []
    for model in (ref, ours):
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias") or name.endswith("to_q.weight"))
        xi = x.clone().requires_grad_()
        out = model(xi, t, text, class_labels=level).sample if model is ref else model(xi, t, text, noise_level=level)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads.append({"x": xi.grad, **{n: p.grad for n, p in model.named_parameters() if p.requires_grad}})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    largest = max(g.abs().max().item() for g in grads[0].values())
    for k in grads[0]:  # some biases have an exactly-zero true gradient (e.g. a key bias under softmax)
        close(grads[0][k], grads[1][k], rtol=1e-4, scale=1e-4 * largest)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="mid_block_type"):
        build(dict(STAGE_I, mid_block_type="UNetMidBlock2DCrossAttn"))
    with pytest.raises(ValueError, match="down_block_types"):
        build(dict(STAGE_I, down_block_types=["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"]))
    with pytest.raises(ValueError, match="does not know.*'foo'"):
        build(dict(STAGE_I, foo=1))
    with pytest.raises(ValueError, match="multiples of 2"):
        build(STAGE_I)(torch.randn(1, 3, 15, 16), 1, torch.randn(1, 7, 48))
    with pytest.raises(ValueError, match="noise_level"):
        build(STAGE_II)(torch.randn(1, 6, 16, 16), 1, torch.randn(1, 7, 48))
    # missing weights file
    (tmp_path / "empty" / "unet").mkdir(parents=True)
    (tmp_path / "empty" / "unet" / "config.json").write_text(json.dumps(STAGE_I))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        UNet.from_pretrained(tmp_path / "empty")
    # weights saved from another config: the error lists missing keys and shape mismatches
    build(STAGE_I).save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text(json.dumps(dict(STAGE_I, block_out_channels=[32, 96],
                                                                    layers_per_block=2)))
    with pytest.raises(ValueError, match=r"(?s)missing keys: down_blocks.*shape mismatches: .*\(96"):
        UNet.from_pretrained(tmp_path / "other", subfolder=None)
