"""lora.py against peft and diffusers on tiny IF-style U-Nets (CPU, fp32 unless said otherwise).

`make_unets()` gives our model.UNet and a diffusers UNet2DConditionModel twin holding the same weights (ours is
loaded from the twin's save_pretrained folder). Parity tests put our LoRA on our U-Net and peft's (or diffusers'
loader's) on the twin; lora.py works on any nn.Module, so one test also puts ours on the diffusers U-Net.
The two U-Nets already differ by ~1e-6 relative in fp32, so outputs are compared relative to their scale.
"""

import copy
import functools
import json
import tempfile

import pytest
import torch
from torch import nn

import lora
from model import UNet

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

CONFIG = dict(  # IF's architecture in miniature
    sample_size=16, in_channels=3, out_channels=6, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=8, cross_attention_dim=64,
    encoder_hid_dim=24, encoder_hid_dim_type="text_proj", addition_embed_type="text",
    addition_embed_type_num_heads=2, resnet_time_scale_shift="scale_shift", cross_attention_norm="group_norm",
    norm_num_groups=4, act_fn="gelu",
)  # cross_attention_dim 64: norm_cross (32 groups) mixes 2 channels, so encoder_hid_proj's DoRA scale matters
N_ATTN = 4  # attention blocks in CONFIG: down 1, mid 1, up 2
N_RESNET = 10  # resnets (each with conv1, conv2): down 2 + downsampler, mid 2, up 4 + upsampler
N_SHORTCUT = 5  # resnets with a conv_shortcut: the one that widens 16 -> 32 going down, and every up resnet
EXTRA = ("conv1", "encoder_hid_proj")  # resnet convs and the text projection, beyond the default targets


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def seed():
    """add_lora draws A from the global generator: the same numbers whichever tests ran before."""
    torch.manual_seed(0)


@functools.cache
def _templates():
    with torch.random.fork_rng():  # whichever test builds these first, its own draws start from seed() as in the others
        torch.manual_seed(0)
        # frozen, because diffusers' own output moves by ~1e-6 when its weights require grad
        ref = diffusers.UNet2DConditionModel(**CONFIG).eval().requires_grad_(False)
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        ours = UNet.from_pretrained(folder, subfolder=None).requires_grad_(False)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ours.state_dict().items())
    return ours, ref


def make_unets():
    """(our UNet, diffusers twin) with identical random weights, frozen, in eval mode."""
    ours, ref = _templates()
    return copy.deepcopy(ours), copy.deepcopy(ref)


def our_unet():
    return copy.deepcopy(_templates()[0])


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 24, generator=g)


def run(unet, grad=False, x=None, dtype=None):
    """One forward on fixed inputs (in `dtype`, default x's), for either U-Net: ours takes (x, t, text), diffusers'
    returns `.sample`."""
    x0, t, text = inputs()
    x = x0 if x is None else x
    x = x if dtype is None else x.to(dtype)
    text = text.to(x.dtype)
    with torch.set_grad_enabled(grad):
        if isinstance(unet, UNet):
            return unet(x, t, text)
        return unet(x, t, encoder_hidden_states=text).sample


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


def load_trainable(model, path):
    """load_lora, with the loaded parameters made trainable like those of add_lora and mark_bitfit. A round trip is
    bit-exact only between models whose parameters agree in requires_grad too: for a non-contiguous 3D input (the
    attention's (B, HW, C) view) PyTorch's CPU matmul folds the batch into one GEMM when the weight requires grad and
    runs a batched GEMM when it does not, and the two round differently on some CPUs (by ~1e-6)."""
    params = lora.load_lora(model, path)
    for p in params:
        p.requires_grad_(True)
    return params


def close(a, b, rtol=1e-5, scale=0.0):
    """Agreement relative to the tensor's scale (or `scale`, if larger: for tensors that should be ~0)."""
    err = (a - b).abs().max().item() / max(b.abs().max().item(), scale)
    assert err < rtol, f"relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------


def test_target_matching():
    assert lora.matches("mid_block.attentions.0.to_out.0", "to_out.0")
    assert lora.matches("to_q", "to_q") and lora.matches("a.attentions.1.to_q", "attentions.1.to_q")
    assert not lora.matches("a.add_to_q", "to_q") and not lora.matches("a.to_out.0", "to_out")
    assert lora.matches("down_blocks.1.resnets.0.conv1", r"re:down_blocks\.\d\.resnets\.\d\.conv\d")
    assert not lora.matches("up_blocks.1.resnets.0.conv1", r"re:down_blocks\..*")
    ours = our_unet()
    with pytest.raises(ValueError, match="'to_qq' matches no module"):
        lora.add_lora(ours, 4, targets=("to_q", "to_qq"))
    with pytest.raises(ValueError, match="ModuleList"):
        lora.add_lora(ours, 4, targets=("to_out",))
    assert not lora._lora_layers(ours)  # a failed call leaves the model untouched


@pytest.mark.parametrize("dora", [False, True])
def test_identity_trainable_set_and_base_keys(dora):
    ours, plain = our_unet(), our_unet()
    base_sd = {k: v.clone() for k, v in ours.state_dict().items()}
    params = lora.add_lora(ours, 4, alpha=6, targets=lora.DEFAULT_TARGETS + EXTRA, dora=dora)
    x = inputs()[0].requires_grad_()  # the frozen-conv path of model.conv() runs only when grads flow
    assert torch.equal(run(ours, grad=True, x=x), run(plain, grad=True, x=x))  # B = 0 (and m = ||W||): identity
    layers = lora._lora_layers(ours)
    assert len(layers) == 6 * N_ATTN + N_RESNET + 1
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    lora_names = {n for n, _ in ours.named_parameters() if ".lora_" in n}
    assert trainable == lora_names and len(params) == len(lora_names) == (3 if dora else 2) * len(layers)
    assert {id(p) for p in params} == {id(p) for n, p in ours.named_parameters() if n in lora_names}
    # base names unchanged: a base checkpoint loads strictly, only LoRA keys are "missing"
    assert set(ours.state_dict()) - lora_names == set(base_sd)
    result = ours.load_state_dict(base_sd, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == lora_names
    assert isinstance(ours.mid_block.attentions[0].to_q, nn.Linear)  # still a Linear to everyone else
    assert isinstance(ours.mid_block.resnets[0].conv1, nn.Conv2d)


def test_bitfit():
    ours = our_unet()
    biases = lora.mark_bitfit(ours)
    names = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in ours.named_parameters() if n.endswith(".bias")} and len(biases) == len(names)
    params = lora.add_lora(ours, 2) + lora.mark_bitfit(ours)  # with LoRA: LoRA + biases, nothing else
    names = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in ours.named_parameters() if n.endswith(".bias") or ".lora_" in n}
    assert len(params) == len(names)


def _grads_vs_peft(ours, ref, loss=lambda y: y.square().mean()):
    """Backward through both; {name: (our grad, peft's grad)} for every trainable parameter of ours."""
    a, b = run(ours, grad=True), run(ref, grad=True)
    loss(a).backward()
    loss(b).backward()
    theirs = {n.replace(".base_layer.", "."): p for n, p in ref.named_parameters()}
    out = {}
    for name, p in ours.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_" in name:  # peft keeps A and B as layers: ...to_q.lora_A.default -> ...lora_A.default.weight
            name_there = name.replace(".lora_magnitude.", ".lora_magnitude_vector.") + ".weight"
        else:  # a base parameter (bitfit bias): the same name, peft's base_layer aside
            name_there = name
        out[name] = p.grad, theirs[name_there].grad.reshape(p.shape)
    return a, b, out


@pytest.mark.parametrize("dora", [False, True])
def test_forward_and_grads_match_peft(dora):
    """Our U-Net + our LoRA on attention, resnet convs and the text projection (alpha != rank), with bitfit, against
    diffusers' U-Net + peft: the same output and the same gradient for every LoRA parameter and every bias."""
    ours, ref = make_unets()
    targets = lora.DEFAULT_TARGETS + EXTRA
    lora.add_lora(ours, 4, alpha=6, targets=targets, dora=dora)
    lora.mark_bitfit(ours)
    peft_ref(ref, 4, 6, dora, targets)
    copy_from_peft(ours, ref)
    for n, p in ref.named_parameters():
        p.requires_grad_(".lora_" in n or n.endswith(".bias"))
    a, b, grads = _grads_vs_peft(ours, ref)
    close(a, b)
    assert (a - run(our_unet())).abs().max() > 0.1 * a.abs().max()  # the LoRA is far from the identity
    n_lora, n_bias = sum(".lora_" in n for n in grads), sum(n.endswith(".bias") for n, _ in ours.named_parameters())
    assert n_lora == (3 if dora else 2) * (6 * N_ATTN + N_RESNET + 1) and len(grads) == n_lora + n_bias
    largest = max(g.abs().max().item() for g, _ in grads.values())
    # fp32 gradients of the two U-Nets differ by up to ~2e-5 relative (in float64 by ~1e-14), hence test_model.py's
    # gradient tolerance; a key bias under softmax has a zero true gradient, hence the floor.
    for g, want in grads.values():  # (the DoRA norm is detached as in peft)
        close(g, want, rtol=1e-4, scale=1e-4 * largest)


def same_masks(model, ref):
    """Both in training mode, each run from the same seed (so dropout draws the same masks): outputs close."""
    model.train(), ref.train()
    torch.manual_seed(5)
    a = run(model)
    torch.manual_seed(5)
    close(a, run(ref))
    return a


@pytest.mark.parametrize("dora", [False, True])
def test_dropout_in_training_matches_peft(dora):
    """With dropout, peft's DoRA is W x + b + (g - 1) W xd + g s B A xd (x undropped in the base term).

    Both U-Nets must draw the same dropout masks from the global generator, so the targets are layers they call in
    the same order (within an attention ours calls add_k/v_proj and to_k/v before to_q, diffusers after) on inputs
    with the same memory layout (our attention returns channels_last strides, so a conv right after it would lay
    its mask out differently)."""
    ours, ref = make_unets()
    targets = ("encoder_hid_proj", "to_q", "to_out.0", "down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.0.conv1")
    lora.add_lora(ours, 4, alpha=6, targets=targets, dora=dora, dropout=0.3)
    peft_ref(ref, 4, 6, dora, targets, dropout=0.3)
    copy_from_peft(ours, ref)
    a = same_masks(ours, ref)
    ours.eval()
    assert not torch.allclose(a, run(ours))  # dropout did act, and eval() turns it off:
    torch.manual_seed(6)
    close(run(ours), run(ref.eval()))


@pytest.mark.parametrize("shape", [(4, 5, 8), (4, 8, 3, 3)])
def test_dropout_on_ranks_is_the_global_batch_sliced(shape):
    """Rank r of 2, holding half the batch, drops what one process holding the whole batch drops on that half (so
    N processes train like one with N times the batch), and one process drops exactly what F.dropout drops (as peft
    does). Channels-last inputs keep their mask layout."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(8, 8) if len(shape) == 3 else nn.Conv2d(8, 8, 1)})
    lora.add_lora(model, 2, targets=("proj",), dropout=0.5)
    layer, x = model.proj, torch.randn(shape)
    # laid out as the U-Net's LoRA inputs are: a channels-last conv input, a transposed view [B, L, C] of [B, C, L]
    x = x.to(memory_format=torch.channels_last) if x.dim() == 4 else x.transpose(1, 2).contiguous().transpose(1, 2)
    torch.manual_seed(1)
    whole = layer._dropout(x, 0.5)
    torch.manual_seed(1)
    assert torch.equal(whole, nn.functional.dropout(x, 0.5))
    halves = []
    for rank in range(2):
        lora.shard_dropout(model, rank, 2)
        torch.manual_seed(1)  # every rank seeds the default generator alike
        halves.append(layer._dropout(x[2 * rank : 2 * rank + 2], 0.5))
    assert torch.equal(torch.cat(halves), whole)
    assert not torch.equal(halves[0] == 0, halves[1] == 0)  # the ranks' masks differ


@pytest.mark.parametrize("dora", [False, True])
def test_lora_on_the_diffusers_unet_matches_peft(dora):
    """lora.py works on any nn.Module: ours on diffusers' own U-Net (all default targets, dropout) equals peft's."""
    _, ref = make_unets()
    theirs = copy.deepcopy(ref)
    lora.add_lora(theirs, 4, alpha=6, dora=dora, dropout=0.3)
    peft_ref(ref, 4, 6, dora, dropout=0.3)
    copy_from_peft(theirs, ref)
    same_masks(theirs, ref)


@pytest.mark.parametrize("dora", [False, True])
def test_channels_last_matches_contiguous(dora):
    """Our U-Net in channels_last with LoRA on attention and every resnet conv: same output and LoRA gradients.

    In float64, where the two runs differ only by their kernels' summation orders (~1e-15), so that no layout
    mistake can hide under fp32 rounding (fp32 attention-key gradients alone differ by ~1e-5 here)."""
    ours = our_unet().double()
    perturb(lora.add_lora(ours, 4, alpha=6, targets=lora.DEFAULT_TARGETS + ("conv1", "conv2", "conv_shortcut"),
                          dora=dora))
    cl = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    conv = cl.up_blocks[0].resnets[0].conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and isinstance(conv, lora.LoRAConv2d)
    assert conv.lora_A["default"].is_contiguous(memory_format=torch.channels_last)
    x = inputs()[0].double()
    outs = []
    for model, xi in ((ours, x), (cl, x.to(memory_format=torch.channels_last))):
        out = run(model, grad=True, x=xi)
        out.square().mean().backward()
        outs.append(out)
    assert outs[1].dtype == torch.float64 and outs[1].is_contiguous(memory_format=torch.channels_last)
    close(outs[1], outs[0], rtol=1e-12)
    theirs = dict(cl.named_parameters())
    lora_params = [(n, p) for n, p in ours.named_parameters() if ".lora_" in n]
    assert len(lora_params) == (3 if dora else 2) * (6 * N_ATTN + 2 * N_RESNET + N_SHORTCUT)
    for name, p in lora_params:
        close(theirs[name].grad, p.grad, rtol=1e-12)


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
        pipe.load_lora_weights(tmp_path)  # as SimpleTuner's DeepFloyd guide's inference snippet does
    else:  # (without use_safetensors=True diffusers reads no metadata and assumes alpha = rank)
        ref.load_lora_adapter(str(path), prefix="unet", use_safetensors=True)
    want = run(ours)
    close(want, run(ref))
    meta = lora.read_lora_metadata(path)
    assert meta["if_variance_trained"] == "true"
    cfg = meta[lora.METADATA_KEY]
    assert (cfg["unet.r"], cfg["unet.lora_alpha"], cfg["unet.use_dora"]) == (4, 6, dora)
    fresh = our_unet()  # and back into ours, bit for bit
    load_trainable(fresh, path)
    assert torch.equal(run(fresh), want)


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
    ours = our_unet()
    params = lora.load_lora(ours, path)
    assert len(lora._lora_layers(ours)) == 6 * N_ATTN and not any(p.requires_grad for p in params)
    close(run(ours), want)


def test_foreign_dora_file_loads(tmp_path):
    path, want = _foreign_file(tmp_path, "diffusers", dora=True)
    ours = our_unet()
    lora.load_lora(ours, path)
    close(run(ours), want)


def test_merge_and_scale(tmp_path):
    """merge_lora on our U-Net (DoRA on attention and convs, plus a second LoRA) keeps its output; the merged
    weights written by our save_pretrained load in diffusers with the same output."""
    ours, plain = our_unet(), our_unet()
    base_keys = set(ours.state_dict())
    perturb(lora.add_lora(ours, 4, alpha=6, targets=lora.DEFAULT_TARGETS + EXTRA, dora=True))
    perturb(lora.add_lora(ours, 2, alpha=3, name="second"), seed=3)
    want = run(ours)
    lora.set_lora_scale(ours, 0.0)
    assert torch.equal(run(ours), run(plain))  # scale 0: off, DoRA magnitude included
    lora.set_lora_scale(ours, 1.0)
    lora.set_lora_scale(ours, 0.0, name="second")
    only_first = run(ours)
    assert not torch.allclose(only_first, want)
    lora.set_lora_scale(ours, 1.0, name="second")
    lora.merge_lora(ours)
    assert not lora._lora_layers(ours) and set(ours.state_dict()) == base_keys
    assert type(ours.mid_block.attentions[0].to_q) is nn.Linear and type(ours.mid_block.resnets[0].conv1) is nn.Conv2d
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
    mixed = our_unet()
    lora.load_lora(mixed, tmp_path / "b.safetensors")
    assert mixed.mid_block.attentions[0].to_q.lora_alpha == {"default": 5.0}
    assert mixed.mid_block.attentions[0].to_k.lora_alpha == {"default": 6.0}
    lora.save_lora(mixed, tmp_path / "c.safetensors")  # rank_pattern / alpha_pattern for the odd one out
    ref.load_lora_adapter(str(tmp_path / "c.safetensors"), prefix="unet", use_safetensors=True)
    # In float64, where the two agree to ~1e-14: the rank-2 update is ~20x its base weight, and with it each U-Net's
    # fp32 output is 1e-5 to 2e-5 (relative) from the float64 one, by its kernels' rounding on the CPU at hand.
    close(run(ref.double(), dtype=torch.float64), run(mixed.double(), dtype=torch.float64), rtol=1e-12)


def test_bad_files_list_every_problem(tmp_path):
    from safetensors.torch import load_file, save_file

    ours = our_unet()
    lora.add_lora(ours, 4)
    good = tmp_path / "good.safetensors"
    lora.save_lora(ours, good)
    sd = load_file(good)
    sd["unet.mid_block.attentions.0.to_q.lora_B.weight"] = torch.zeros(32, 3)  # rank 3 against A's rank 4
    sd["unet.down_blocks.7.attentions.0.to_q.lora_A.weight"] = torch.zeros(4, 32)  # no such module
    sd["unet.mid_block.attentions.0.to_k.hada_w1_a"] = torch.zeros(4, 32)  # a key form we do not know
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad)
    fresh = our_unet()
    with pytest.raises(ValueError) as err:
        lora.load_lora(fresh, bad)
    for key in ("mid_block.attentions.0.to_q.lora_B.weight", "down_blocks.7", "hada_w1_a"):
        assert key in str(err.value)
    assert not lora._lora_layers(fresh)  # nothing half-loaded
    lora.load_lora(fresh, good)
    with pytest.raises(ValueError, match="already has a LoRA named 'default'"):
        lora.load_lora(fresh, good)


@pytest.mark.parametrize("name", ["training", "keys"])
def test_adapter_names_that_are_module_attributes_are_refused(name):
    """Adapters are keys of ParameterDicts, hence attributes of them: "training" would make .train() fail later,
    "keys" would fail half-way through wrapping. Both must be refused up front, leaving the model as it was."""
    net = nn.ModuleDict({"proj": nn.Linear(4, 4)})
    with pytest.raises(ValueError, match=f"LoRA name '{name}'"):
        lora.add_lora(net, 2, targets=("proj",), name=name)
    assert type(net.proj) is nn.Linear
    net.train().eval()


def test_extra_metadata_and_other_components_are_ignored(tmp_path):
    """A file's metadata may carry other entries and other pipeline components' adapter configs (text_encoder.*);
    only the U-Net's alpha counts. A peft-style config without the "unet." prefix is read as the U-Net's."""
    from safetensors.torch import load_file, save_file

    ours = our_unet()
    perturb(lora.add_lora(ours, 4, alpha=6))
    want = run(ours)
    lora.save_lora(ours, tmp_path / "a.safetensors")
    sd = load_file(tmp_path / "a.safetensors")
    for config in ({"unet.r": 4, "unet.lora_alpha": 6, "text_encoder.r": 8, "text_encoder.lora_alpha": 1},
                   {"r": 4, "lora_alpha": 6}):
        meta = {"format": "pt", "modelspec.title": "a", "ss_network_alpha": "1", lora.METADATA_KEY: json.dumps(config)}
        save_file(sd, tmp_path / "b.safetensors", metadata=meta)
        fresh = our_unet()
        load_trainable(fresh, tmp_path / "b.safetensors")
        assert fresh.mid_block.attentions[0].to_q.lora_alpha == {"default": 6.0}
        assert torch.equal(run(fresh), want)


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


def test_text_encoder_keys_are_skipped_with_a_warning(tmp_path):
    """A pipeline file that also holds a T5 LoRA (diffusers writes `text_encoder.*` keys when the text encoder was
    trained too): the U-Net part loads and the skipped keys are named; any other unknown prefix stays an error."""
    from safetensors.torch import load_file, save_file

    ours = our_unet()
    perturb(lora.add_lora(ours, 4))  # alpha = rank: the file below carries no alpha
    want = run(ours)
    unet_layers = {k.removeprefix("unet."): v for k, v in lora.lora_state_dict(ours).items()}
    g = torch.Generator().manual_seed(3)
    t5 = {f"encoder.block.{i}.layer.0.SelfAttention.{p}.lora_{ab}.weight": torch.randn(4, 4, generator=g)
          for i in range(2) for p in ("q", "v") for ab in "AB"}
    diffusers.IFPipeline.save_lora_weights(tmp_path, unet_lora_layers=unet_layers, text_encoder_lora_layers=t5)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert sum(k.startswith("text_encoder.") for k in load_file(path)) == 8
    fresh = our_unet()
    with pytest.warns(UserWarning, match=r"ignored 8 text_encoder\.\* keys: this loader applies LoRAs to the U-Net"):
        load_trainable(fresh, path)
    assert torch.equal(run(fresh), want)
    other = {f"text_encoder_2.{k}": v for k, v in t5.items()}  # (SDXL's second text encoder: not IF's)
    save_file({**load_file(path), **other}, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="text_encoder_2.encoder.block.0"):
        lora.load_lora(our_unet(), tmp_path / "b.safetensors")


def _trained_biases(model, seed=4):
    """Mark every bias trainable and move it off its initial value; returns {name: bias}."""
    lora.mark_bitfit(model)
    biases = {n: p for n, p in model.named_parameters() if n.endswith(".bias")}
    perturb(biases.values(), seed)
    return biases


@pytest.mark.parametrize("dora", [False, True])
def test_lora_with_biases_round_trip(tmp_path, dora):
    """save_lora(biases=True): the LoRA file stays one that diffusers takes (LoRA keys only), the trained biases go
    next to it under their diffusers names, and load_lora brings back the same model, bit for bit."""
    from safetensors.torch import load_file

    ours = our_unet()
    perturb(lora.add_lora(ours, 4, alpha=6, targets=lora.DEFAULT_TARGETS + EXTRA, dora=dora))
    biases = _trained_biases(ours)
    want = run(ours)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    lora.save_lora(ours, path, metadata={"stage": "1"}, biases=True)
    assert all(".lora_" in k for k in load_file(path))
    meta = lora.read_lora_metadata(path)
    assert (meta[lora.BIASES_KEY], meta["stage"]) == (lora.BIASES_FILE, "1")
    side = load_file(tmp_path / lora.BIASES_FILE)
    assert side.keys() == {f"unet.{n}" for n in biases} and "unet.down_blocks.0.resnets.0.conv1.bias" in side
    assert lora.read_lora_metadata(tmp_path / lora.BIASES_FILE)[lora.BITFIT_KEY] == "true"
    fresh = our_unet()
    before = {n: p for n, p in fresh.named_parameters() if n in biases}
    params = lora.load_lora(fresh, path)
    n_lora = (3 if dora else 2) * (6 * N_ATTN + N_RESNET + 1)
    assert len(params) == n_lora + len(biases) and not any(p.requires_grad for p in params)
    assert {id(p) for p in params[n_lora:]} == {id(p) for p in before.values()}  # copied into the model's own
    for p in params:  # requires_grad as in training on both sides (see load_trainable)
        p.requires_grad_(True)
    assert torch.equal(run(fresh), want)
    (tmp_path / lora.BIASES_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"{lora.BIASES_FILE} next to it, which is missing"):
        lora.load_lora(our_unet(), path)


def test_biases_only_round_trip(tmp_path):
    """bitfit without a LoRA: the biases are the file itself; load_lora reads it like a LoRA file."""
    from safetensors.torch import load_file

    ours = our_unet()
    with pytest.raises(ValueError, match="mark_bitfit"):  # nothing trained: say so instead of writing nothing
        lora.save_lora(ours, tmp_path / "none.safetensors", biases=True)
    biases = _trained_biases(ours)
    want = run(ours)
    path = tmp_path / "biases.safetensors"
    lora.save_lora(ours, path, metadata={"stage": "1"}, biases=True)
    assert load_file(path).keys() == {f"unet.{n}" for n in biases} and not (tmp_path / lora.BIASES_FILE).exists()
    meta = lora.read_lora_metadata(path)
    assert (meta[lora.BITFIT_KEY], meta["stage"]) == ("true", "1") and lora.METADATA_KEY not in meta
    fresh = our_unet()
    assert not torch.equal(run(fresh), want)
    params = load_trainable(fresh, path)
    assert len(params) == len(biases) and not lora._lora_layers(fresh)
    assert torch.equal(run(fresh), want)


def test_bad_bias_keys_list_every_problem(tmp_path):
    from safetensors.torch import load_file, save_file

    ours = our_unet()
    lora.add_lora(ours, 4)
    _trained_biases(ours)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    lora.save_lora(ours, path, biases=True)
    side = load_file(tmp_path / lora.BIASES_FILE)
    side["unet.mid_block.attentions.0.to_q.bias"] = torch.zeros(31)  # the model's is [32]
    side["unet.down_blocks.7.resnets.0.conv1.bias"] = torch.zeros(16)  # no such parameter
    side["unet.mid_block.attentions.0.to_k.lora_B.bias"] = torch.zeros(32)  # peft's lora_bias: not supported here
    save_file(side, tmp_path / lora.BIASES_FILE)
    fresh, plain = our_unet(), our_unet()
    with pytest.raises(ValueError) as err:
        lora.load_lora(fresh, path)
    for key in ("to_q.bias: shape [31] does not fit", "no parameter named down_blocks.7.resnets.0.conv1.bias",
                "to_k.lora_B.bias"):
        assert key in str(err.value)
    assert not lora._lora_layers(fresh)  # nothing half-loaded: no LoRA, and every bias as it was
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), plain.parameters()))


@pytest.mark.parametrize("via", ["pipeline", "unet"])
def test_lora_with_biases_in_diffusers(tmp_path, via):
    """What diffusers does with our LoRA + biases: it loads the LoRA file as usual, the biases file next to it in
    the way, and UNet2DConditionModel.load_state_dict(strict=False) applies the biases (before the LoRA: peft renames
    a wrapped layer's bias to base_layer.bias). The same output as ours, within the two U-Nets' fp32 agreement (see
    the module docstring). In one file with the LoRA, pipe.load_lora_weights would refuse the biases and
    load_lora_adapter would silently take only those of the layers without a LoRA: hence the second file."""
    from safetensors.torch import load_file, save_file

    ours, ref = make_unets()
    perturb(lora.add_lora(ours, 4, alpha=6, targets=lora.DEFAULT_TARGETS + EXTRA))
    lora_only = copy.deepcopy(ours)
    _trained_biases(ours)
    want = run(ours)
    assert (run(lora_only) - want).abs().max() > 0.1 * want.abs().max()  # the biases matter
    lora.save_lora(ours, tmp_path / "pytorch_lora_weights.safetensors", biases=True)
    side = load_file(tmp_path / lora.BIASES_FILE)
    result = ref.load_state_dict({k.removeprefix("unet."): v for k, v in side.items()}, strict=False)
    assert not result.unexpected_keys and not any(k.endswith(".bias") for k in result.missing_keys)
    pipe = diffusers.IFPipeline(tokenizer=None, text_encoder=None, unet=ref, scheduler=diffusers.DDPMScheduler(),
                                safety_checker=None, feature_extractor=None, watermarker=None,
                                requires_safety_checker=False)
    if via == "pipeline":
        pipe.load_lora_weights(tmp_path)  # the folder: diffusers picks pytorch_lora_weights.safetensors
    else:
        ref.load_lora_adapter(str(tmp_path / "pytorch_lora_weights.safetensors"), prefix="unet", use_safetensors=True)
    assert sum(".lora_A." in n for n, _ in ref.named_parameters()) == 6 * N_ATTN + N_RESNET + 1
    close(run(ref), want)
    one = tmp_path / "one"
    one.mkdir()
    save_file({**load_file(tmp_path / "pytorch_lora_weights.safetensors"), **side},
              one / "pytorch_lora_weights.safetensors")
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        pipe.load_lora_weights(one)
    before, partial = dict(make_unets()[1].named_parameters()), make_unets()[1]  # and load_lora_adapter half-loads it:
    partial.load_lora_adapter(str(one / "pytorch_lora_weights.safetensors"), prefix="unet", use_safetensors=True)
    biases = {n.replace(".base_layer.", "."): p for n, p in partial.named_parameters() if n.endswith(".bias")}
    wrapped = {n.replace(".base_layer.", ".") for n, _ in partial.named_parameters() if n.endswith(".base_layer.bias")}
    moved = {n for n, p in biases.items() if not torch.equal(p, before[n])}
    assert wrapped and moved == {k.removeprefix("unet.") for k in side} - wrapped  # the LoRA layers' biases dropped
