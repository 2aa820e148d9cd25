"""quant.py: int8 weights for a frozen base, what they cost, and that a LoRA trains on them as on the original."""

import pytest
import torch

import lora
import memory
import quant
from model import build, tiny_config


def test_int8_round_trip_is_within_half_a_step_per_channel():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * torch.logspace(-3, 1, 16).view(-1, 1, 1, 1)  # rows of very different sizes
    w = w.contiguous(memory_format=torch.channels_last)
    q, scale = quant.quantise_weight(w)
    assert q.dtype == torch.int8 and q.is_contiguous(memory_format=torch.channels_last) and scale.shape == (16,)
    err = (quant.dequantise(q, scale, torch.float32) - w).abs()
    assert (err <= scale.view(-1, 1, 1, 1) / 2 * (1 + 1e-6)).all()  # round to nearest: half a step at most
    assert (q.flatten(1).abs().amax(1) == 127).all()  # each row's largest weight uses the whole range


def _pair(dtype=torch.float32):
    """A tiny U-Net with LoRA, quantised; and the same with its frozen weights replaced by their dequantised
    values (plain layers): the two must compute the same function."""
    torch.manual_seed(0)
    unet = build(tiny_config(1), dtype=dtype)
    params = lora.add_lora(unet, 4, 4, [*lora.DEFAULT_TARGETS, "conv1", "conv2"])
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)  # B = 0 would leave A without a gradient
    plain = build(tiny_config(1), dtype=dtype)
    lora.add_lora(plain, 4, 4, [*lora.DEFAULT_TARGETS, "conv1", "conv2"])
    plain.load_state_dict(unet.state_dict())
    saved = quant.quantise_(unet, min_numel=1)
    with torch.no_grad():
        for m, ref in zip(unet.modules(), plain.modules()):
            if quant.is_quantised(m):
                ref.weight.copy_(m.weight)
    return unet, plain, saved


def _run(unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 32, 32, generator=g, requires_grad=True)
    out = unet(x, torch.tensor([10, 700]), torch.randn(2, 7, 32, generator=g))
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in unet.named_parameters() if p.requires_grad}, x.grad


def test_quantised_lora_unet_computes_with_the_dequantised_weights():
    """Forward: the same ops on the same (dequantised) weights, bit for bit. Backward: the input gradient of a
    frozen layer comes from the same weights by torch.nn.grad.conv2d_input / grad @ W instead of autograd's own
    kernels, which may sum in another order: fp32 rounding, relative 1e-5."""
    unet, plain, saved = _pair()
    assert saved > 0 and not any(p.dtype == torch.int8 for p in unet.parameters())
    assert sum(quant.is_quantised(m) for m in unet.modules()) > 10
    out, grads, gx = _run(unet)
    ref_out, ref_grads, ref_gx = _run(plain)
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-8)
    assert lora.lora_state_dict(unet).keys() == lora.lora_state_dict(plain).keys()  # the LoRA file is the same


def test_backward_keeps_int8_weights_not_dequantised_copies():
    """Counted on fake tensors at a realistic width: a LoRA step on the int8 base holds ~1/4 of the fp32 base's
    bytes (int8 + fp32 scales), and its activations are no larger than on the plain base (no weight copies kept)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def step(quantised: bool) -> dict:
        config = dict(tiny_config(1), block_out_channels=[64, 128], attention_head_dim=32, norm_num_groups=16)
        with torch.device("meta"):
            unet = build(config)
        params = lora.add_lora(unet, 4, 4)
        if quantised:
            quant.quantise_(unet)
        live = memory.LiveBytes()
        with FakeTensorMode(), live:
            fresh = memory.materialise(unet)
            x = torch.zeros(2, 3, 32, 32)
            unet(x, torch.tensor([10, 700]), torch.zeros(2, 7, 32)).square().mean().backward()
            frozen = [t for t in [*unet.parameters(), *unet.buffers()] if not t.requires_grad]
            trained = [fresh[id(p)] for p in params]
            return live.breakdown({"weights": frozen, "lora": trained, "grads": [p.grad for p in trained]})

    plain, int8 = step(False), step(True)
    assert int8["weights"] < 0.3 * plain["weights"]
    assert int8["activations"] <= plain["activations"] * 1.02


def test_quantise_refuses_a_full_fine_tune(tmp_path):
    import train
    from config import Config

    with pytest.raises(ValueError, match="model_type='lora'"):
        train.check_options(Config(model_type="full", quantise_base=True), world=1)


def test_sample_py_samples_on_the_int8_base_a_quantise_base_lora_names(tmp_path):
    """A LoRA file that says its base was int8 is loaded unmerged onto an int8 base by sample.load_unet, which then
    computes what the training U-Net (LoRA on the quantised base) computes; quantise=False merges it instead."""
    import sample

    torch.manual_seed(0)
    base = build(tiny_config(1))
    base.save_pretrained(tmp_path / "base" / "unet")
    trained = build(tiny_config(1))
    trained.load_state_dict(base.state_dict())
    params = lora.add_lora(trained, 4, 4)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    quant.quantise_(trained)
    lora.save_lora(trained, tmp_path / "l.safetensors", metadata={"base_quantised": "int8"})
    unet, _ = sample.load_unet(tmp_path / "base", lora=tmp_path / "l.safetensors", dtype="fp32", device="cpu")
    assert sum(quant.is_quantised(m) for m in unet.modules()) > 10
    x, t, text = torch.randn(1, 3, 32, 32), torch.tensor([300]), torch.randn(1, 7, 32)
    with torch.no_grad():  # the same weights and ops; the CPU's kernel choice (by layout, requires_grad and the ATen
        # capability level) can differ between the two modules: fp32 rounding, ~1e-6 of these outputs
        ours, ref = unet(x, t, text), trained.eval()(x, t, text)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        assert (ours - base.eval()(x, t, text)).abs().max() > 1e-2  # the LoRA is on
    plain, _ = sample.load_unet(tmp_path / "base", lora=tmp_path / "l.safetensors", dtype="fp32", device="cpu",
                                quantise=False)
    assert not any(quant.is_quantised(m) for m in plain.modules())


def test_int8_t5_embeds_like_the_bf16_t5(tmp_path):
    """text_encoder_dtype='int8': every T5 Linear holds int8, and the embeddings stay within what a 1/254-per-weight
    perturbation allows: cosine > 0.995 per token against the bf16 encoder (bench.py --t5int8 measures 0.9992 at
    d_model 512 over 300 captions); the text cache keeps them apart from bf16 ones (another identity)."""
    import t5cache

    captions = ["a red circle on a white background", "an oil painting of a lighthouse at night", "a corgi"]
    folder = t5cache.make_tiny_t5(tmp_path / "t5", captions + [""], d_model=64, layers=2, heads=4, d_ff=128)
    bf16 = t5cache.TextEncoder(str(folder), dtype="bf16", device="cpu")
    int8 = t5cache.TextEncoder(str(folder), dtype="int8", device="cpu")
    linears = [m for m in int8.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(quant.is_quantised(m) for m in linears)  # each has >= 4096 weights at this size
    assert int8.identity != bf16.identity
    (a, mask), b = bf16.encode(captions, return_mask=True), int8.encode(captions)
    a, b = a[mask.bool()].float(), b[mask.bool()].float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.995 and not torch.equal(a, b)
