"""lora.py against peft and diffusers on tiny IF-style U-Nets (CPU, fp32 unless said otherwise).

`make_unets()` builds the model under test and a diffusers twin with the same weights. Today both are diffusers
UNet2DConditionModels (model.py's U-Net uses the same module names); to test model.UNet, return it as the first.
"""

import copy
import functools

import pytest
import torch
from torch import nn

import lora

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

CONFIG = dict(  # IF's architecture in miniature
    sample_size=16, in_channels=3, out_channels=6, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=8, cross_attention_dim=32,
    encoder_hid_dim=24, encoder_hid_dim_type="text_proj", addition_embed_type="text",
    addition_embed_type_num_heads=2, resnet_time_scale_shift="scale_shift", cross_attention_norm="group_norm",
    norm_num_groups=4, act_fn="gelu",
)
N_ATTN = 4  # attention blocks in CONFIG: down 1, mid 1, up 2
EXTRA = ("conv1", "encoder_hid_proj")  # resnet convs and the text projection, beyond the default targets


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: on a busy 2-core machine, a second intra-op thread costs ~10x in spin-waiting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.cache
def _template():
    torch.manual_seed(0)
    # frozen, because diffusers' own output moves by ~1e-6 when its weights require grad
    return diffusers.UNet2DConditionModel(**CONFIG).requires_grad_(False)


def make_unets():
    """(model under test, diffusers reference) with identical random weights, frozen."""
    return copy.deepcopy(_template()), copy.deepcopy(_template())


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 24, generator=g)


def run(unet, grad=False):
    with torch.set_grad_enabled(grad):
        out = unet(*inputs())
    return out.sample if hasattr(out, "sample") else out


def perturb(params, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def peft_ref(ref, rank, alpha, dora=False, targets=lora.DEFAULT_TARGETS, dropout=0.0):
    """Inject peft's LoRA into the diffusers reference and give it random non-zero weights."""
    ref.add_adapter(peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), use_dora=dora,
                                    lora_dropout=dropout))
    perturb([p for n, p in ref.named_parameters() if "lora_" in n])
    return ref


def copy_from_peft(ours, ref):
    """Copy peft's adapter tensors into ours by module name (independent of lora.py's file code)."""
    with torch.no_grad():
        for name, layer in lora._lora_layers(ours).items():
            p = ref.get_submodule(name)
            layer.lora_A["default"].copy_(p.lora_A["default"].weight)
            layer.lora_B["default"].copy_(p.lora_B["default"].weight)
            if "default" in layer.lora_magnitude:
                layer.lora_magnitude["default"].copy_(p.lora_magnitude_vector["default"].weight.reshape(-1))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------


def test_target_matching():
    assert lora.matches("mid_block.attentions.0.to_out.0", "to_out.0")
    assert lora.matches("to_q", "to_q") and lora.matches("a.attentions.1.to_q", "attentions.1.to_q")
    assert not lora.matches("a.add_to_q", "to_q") and not lora.matches("a.to_out.0", "to_out")
    assert lora.matches("down_blocks.1.resnets.0.conv1", r"re:down_blocks\.\d\.resnets\.\d\.conv\d")
    assert not lora.matches("up_blocks.1.resnets.0.conv1", r"re:down_blocks\..*")
    ours, _ = make_unets()
    with pytest.raises(ValueError, match="'to_qq' matches no module"):
        lora.add_lora(ours, 4, targets=("to_q", "to_qq"))
    with pytest.raises(ValueError, match="ModuleList"):
        lora.add_lora(ours, 4, targets=("to_out",))
    assert not lora._lora_layers(ours)  # a failed call leaves the model untouched


@pytest.mark.parametrize("dora", [False, True])
def test_identity_trainable_set_and_base_keys(dora):
    ours, ref = make_unets()
    base_sd = {k: v.clone() for k, v in ours.state_dict().items()}
    params = lora.add_lora(ours, 4, alpha=6, dora=dora)
    assert torch.equal(run(ours), run(ref))  # B = 0 (and m = ||W||): exactly the identity
    layers = lora._lora_layers(ours)
    assert len(layers) == 6 * N_ATTN and all(n.rsplit(".", 1)[-1] in lora.DEFAULT_TARGETS or n.endswith("to_out.0")
                                             for n in layers)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    lora_names = {n for n, _ in ours.named_parameters() if ".lora_" in n}
    assert trainable == lora_names and len(params) == len(lora_names) == (3 if dora else 2) * 6 * N_ATTN
    assert {id(p) for p in params} == {id(p) for n, p in ours.named_parameters() if n in lora_names}
    # base names unchanged: a base checkpoint loads strictly, only LoRA keys are "missing"
    assert set(ours.state_dict()) - lora_names == set(base_sd)
    result = ours.load_state_dict(base_sd, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == lora_names
    assert isinstance(ours.mid_block.attentions[0].to_q, nn.Linear)  # still a Linear to everyone else


def test_bitfit():
    ours, _ = make_unets()
    biases = lora.mark_bitfit(ours)
    names = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in ours.named_parameters() if n.endswith(".bias")} and len(biases) == len(names)
    params = lora.add_lora(ours, 2) + lora.mark_bitfit(ours)  # with LoRA: LoRA + biases, nothing else
    names = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in ours.named_parameters() if n.endswith(".bias") or ".lora_" in n}
    assert len(params) == len(names)


@pytest.mark.parametrize("dora", [False, True])
def test_forward_and_grads_match_peft(dora):
    ours, ref = make_unets()
    targets = lora.DEFAULT_TARGETS + EXTRA
    lora.add_lora(ours, 4, alpha=6, targets=targets, dora=dora)
    peft_ref(ref, 4, 6, dora, targets)
    copy_from_peft(ours, ref)
    ref.requires_grad_(False)
    for n, p in ref.named_parameters():
        p.requires_grad_(".lora_" in n)
    a, b = run(ours, grad=True), run(ref, grad=True)
    close(a, b)
    a.square().mean().backward()
    b.square().mean().backward()
    for name, layer in lora._lora_layers(ours).items():  # same grads: the DoRA norm is detached as in peft
        p = ref.get_submodule(name)
        close(layer.lora_A["default"].grad, p.lora_A["default"].weight.grad)
        close(layer.lora_B["default"].grad, p.lora_B["default"].weight.grad)
        if dora:
            close(layer.lora_magnitude["default"].grad, p.lora_magnitude_vector["default"].weight.grad.reshape(-1))


@pytest.mark.parametrize("dora", [False, True])
def test_dropout_in_training_matches_peft(dora):
    """With dropout, peft's DoRA is W x + b + (g - 1) W xd + g s B A xd (x undropped in the base term)."""
    ours, ref = make_unets()
    lora.add_lora(ours, 4, alpha=6, dora=dora, dropout=0.3)
    peft_ref(ref, 4, 6, dora, dropout=0.3)
    copy_from_peft(ours, ref)
    ours.train(), ref.train()
    torch.manual_seed(5)
    a = run(ours)
    torch.manual_seed(5)
    close(a, run(ref))
    ours.eval()
    assert not torch.allclose(a, run(ours))  # dropout did act


@pytest.mark.parametrize("via", ["pipeline", "unet"])
@pytest.mark.parametrize("dora", [False, True])
def test_our_file_loads_in_diffusers(tmp_path, dora, via):
    ours, ref = make_unets()
    params = lora.add_lora(ours, 4, alpha=6, targets=lora.DEFAULT_TARGETS + EXTRA, dora=dora)  # alpha != rank
    perturb(params)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    lora.save_lora(ours, path, metadata={"if_variance_trained": "true"})
    if via == "pipeline":
        pipe = diffusers.IFPipeline(tokenizer=None, text_encoder=None, unet=ref, scheduler=diffusers.DDPMScheduler(),
                                    safety_checker=None, feature_extractor=None, watermarker=None,
                                    requires_safety_checker=False)
        pipe.load_lora_weights(tmp_path)  # as the seed's inference snippet does
    else:  # (without use_safetensors=True diffusers reads no metadata and assumes alpha = rank)
        ref.load_lora_adapter(str(path), prefix="unet", use_safetensors=True)
    close(run(ours), run(ref))
    meta = lora.read_lora_metadata(path)
    assert meta["if_variance_trained"] == "true"
    cfg = meta[lora.METADATA_KEY]
    assert (cfg["unet.r"], cfg["unet.lora_alpha"], cfg["unet.use_dora"]) == (4, 6, dora)
    fresh, _ = make_unets()  # and back into ours
    lora.load_lora(fresh, path)
    close(run(fresh), run(ours))


def _foreign_file(tmp_path, form, dora=False):
    """A file another tool wrote from a peft-trained U-Net; returns (path, that U-Net's output)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    alpha = 6 if form in ("diffusers", "old") else 4  # forms without alpha in them come from alpha = rank trainings
    _, ref = make_unets()
    peft_ref(ref, 4, alpha, dora)
    sd = get_peft_model_state_dict(ref)  # X.lora_A.weight, X.lora_B.weight(, X.lora_magnitude_vector)
    save = diffusers.IFPipeline.save_lora_weights
    if form == "diffusers":  # the recommended form, alpha in the metadata as a diffusers training script writes it
        save(tmp_path, unet_lora_layers=sd, unet_lora_adapter_metadata=ref.peft_config["default"].to_dict())
    elif form == "mixed":  # dreambooth: old lora.down/up for to_q/k/v/out.0, lora_A/B for add_k/v_proj
        save(tmp_path, unet_lora_layers=diffusers.utils.convert_state_dict_to_diffusers(sd))
    elif form == "old":  # all lora.down/lora.up, with network alphas
        old = {f"unet.{k}".replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v
               for k, v in sd.items()}
        alphas = {f"unet.{k.split('.lora_A.')[0]}.alpha": torch.tensor(float(alpha)) for k in sd if ".lora_A." in k}
        save_file({**old, **alphas}, tmp_path / "pytorch_lora_weights.safetensors")
    elif form == "processor":  # attention processors: <attn>.processor.to_q_lora.down.weight, to_out_lora, ...
        proc = {}
        for k, v in sd.items():
            module, kind = k.split(".lora_")
            attn, proj = module.replace(".to_out.0", ".to_out").rsplit(".", 1)
            proc[f"unet.{attn}.processor.{proj}_lora.{'down' if kind[0] == 'A' else 'up'}.weight"] = v
        save_file(proc, tmp_path / "pytorch_lora_weights.safetensors")
    elif form == "peft":  # a PeftModel's own adapter file
        save_file({f"base_model.model.{k}": v for k, v in sd.items()}, tmp_path / "pytorch_lora_weights.safetensors")
    return tmp_path / "pytorch_lora_weights.safetensors", run(ref)


@pytest.mark.parametrize("form", ["diffusers", "mixed", "old", "processor", "peft"])
def test_foreign_files_load(tmp_path, form):
    path, want = _foreign_file(tmp_path, form)
    ours, _ = make_unets()
    params = lora.load_lora(ours, path)
    assert len(lora._lora_layers(ours)) == 6 * N_ATTN and not any(p.requires_grad for p in params)
    close(run(ours), want)


def test_foreign_dora_file_loads(tmp_path):
    path, want = _foreign_file(tmp_path, "diffusers", dora=True)
    ours, _ = make_unets()
    lora.load_lora(ours, path)
    close(run(ours), want)


def test_merge_and_scale(tmp_path):
    ours, ref = make_unets()
    base_keys = set(ours.state_dict())
    perturb(lora.add_lora(ours, 4, alpha=6, targets=lora.DEFAULT_TARGETS + EXTRA, dora=True))
    perturb(lora.add_lora(ours, 2, alpha=3, name="second"), seed=3)
    want = run(ours)
    lora.set_lora_scale(ours, 0.0)
    assert torch.equal(run(ours), run(ref))  # scale 0: off, DoRA magnitude included
    lora.set_lora_scale(ours, 1.0)
    lora.set_lora_scale(ours, 0.0, name="second")
    only_first = run(ours)
    assert not torch.allclose(only_first, want)
    lora.set_lora_scale(ours, 1.0, name="second")
    lora.merge_lora(ours)
    assert not lora._lora_layers(ours) and set(ours.state_dict()) == base_keys
    assert type(ours.mid_block.attentions[0].to_q) is nn.Linear
    close(run(ours), want)
    ours.save_pretrained(tmp_path)  # the merged U-Net is a plain checkpoint diffusers reads
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).requires_grad_(False)
    close(run(back), want)


def test_per_module_rank_and_alpha_survive_into_diffusers(tmp_path):
    from safetensors.torch import load_file, save_file

    ours, ref = make_unets()
    perturb(lora.add_lora(ours, 4, alpha=6))
    lora.save_lora(ours, tmp_path / "a.safetensors")
    sd = load_file(tmp_path / "a.safetensors")  # one module at rank 2 with its own network alpha 5
    g, key = torch.Generator().manual_seed(4), "unet.mid_block.attentions.0.to_q"
    sd[f"{key}.lora_A.weight"] = torch.randn(2, 32, generator=g)
    sd[f"{key}.lora_B.weight"] = torch.randn(32, 2, generator=g)
    sd[f"{key}.alpha"] = torch.tensor(5.0)
    save_file(sd, tmp_path / "b.safetensors", metadata={lora.METADATA_KEY: '{"unet.lora_alpha": 6}'})
    mixed, _ = make_unets()
    lora.load_lora(mixed, tmp_path / "b.safetensors")
    assert mixed.mid_block.attentions[0].to_q.lora_alpha == {"default": 5.0}
    assert mixed.mid_block.attentions[0].to_k.lora_alpha == {"default": 6.0}
    lora.save_lora(mixed, tmp_path / "c.safetensors")  # rank_pattern / alpha_pattern for the odd one out
    ref.load_lora_adapter(str(tmp_path / "c.safetensors"), prefix="unet", use_safetensors=True)
    close(run(ref), run(mixed))


def test_bad_files_list_every_problem(tmp_path):
    from safetensors.torch import load_file, save_file

    ours, _ = make_unets()
    lora.add_lora(ours, 4)
    good = tmp_path / "good.safetensors"
    lora.save_lora(ours, good)
    sd = load_file(good)
    sd["unet.mid_block.attentions.0.to_q.lora_B.weight"] = torch.zeros(32, 3)  # rank 3 against A's rank 4
    sd["unet.down_blocks.7.attentions.0.to_q.lora_A.weight"] = torch.zeros(4, 32)  # no such module
    sd["unet.mid_block.attentions.0.to_k.hada_w1_a"] = torch.zeros(4, 32)  # a key form we do not know
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad)
    fresh, _ = make_unets()
    with pytest.raises(ValueError) as err:
        lora.load_lora(fresh, bad)
    for key in ("mid_block.attentions.0.to_q.lora_B.weight", "down_blocks.7", "hada_w1_a"):
        assert key in str(err.value)
    assert not lora._lora_layers(fresh)  # nothing half-loaded
    lora.load_lora(fresh, good)
    with pytest.raises(ValueError, match="already has a LoRA named 'default'"):
        lora.load_lora(fresh, good)


def _saved_bytes(layer, x):
    """Bytes of activations autograd keeps for backward of layer(x): parameters aside, each storage once."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum()
    return sum(seen.values())


def test_memory_saved_for_backward():
    torch.manual_seed(0)
    x = torch.randn(4096, 512, requires_grad=True)  # 8 MiB of input
    plain = nn.ModuleDict({"proj": nn.Linear(512, 512)})
    base = _saved_bytes(plain.proj, x)
    assert base == x.nbytes
    lora.add_lora(plain, 8, targets=("proj",))
    extra = _saved_bytes(plain.proj, x) - base
    assert extra == 4096 * 8 * 4 < 0.02 * base  # only the rank-8 activation A x: no W + BA (1 MiB) is kept
    dora = nn.ModuleDict({"proj": nn.Linear(512, 512)})
    lora.add_lora(dora, 8, targets=("proj",), dora=True)
    extra = _saved_bytes(dora.proj, x) - base
    # DoRA adds one output-sized tensor (for the gradient of m) and the [out] vectors g and ||W + sBA||
    assert extra == 4096 * 8 * 4 + 4096 * 512 * 4 + 2 * 512 * 4


def test_bf16_and_compile():
    torch.manual_seed(0)
    net = nn.ModuleDict({"proj": nn.Linear(64, 32), "conv": nn.Conv2d(8, 8, 3, padding=1)})
    params = lora.add_lora(net, 4, alpha=8, targets=("proj", "conv"), dora=True)
    perturb(params)
    x, img = torch.randn(5, 64), torch.randn(2, 8, 6, 6)
    want, want_img = net.proj(x), net.conv(img)
    compiled = torch.compile(net.proj, backend="eager", fullgraph=True)  # fullgraph: no graph breaks
    close(compiled(x), want)
    net.to(torch.bfloat16)
    got, got_img = net.proj(x.bfloat16()), net.conv(img.bfloat16())
    assert got.dtype == got_img.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got_img.float(), want_img, rtol=3e-2, atol=3e-2)
    got.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in params[:3])
