"""torch.compile of the U-Net (train.py's `compile=True`): forward and backward in one graph, no recompiles after
the first step, eager's gradients, and norm_act's recompute kept."""

import weakref

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lora
from model import build, norm_act, tiny_config

TINY = tiny_config()  # stage I at its smallest: FiLM resnets, a plain final norm, attention, resamplers


def trained():
    """The tiny U-Net as train.py prepares it (train mode, channels_last), training every kind of weight at once so
    that one compile covers them all: LoRA and DoRA on linear and conv layers, bitfit biases on frozen convs, and
    the last up block and the output layers in full (convs that keep their input, norms that learn). The others
    stay frozen, as in LoRA training. Returns the trained parameters too."""
    torch.manual_seed(0)
    unet = build(TINY).train()
    lora.add_lora(unet, 4, targets=("to_q", "down_blocks.1.resnets.0.conv1"))
    lora.add_lora(unet, 4, targets=("add_k_proj", "mid_block.resnets.0.conv2"), dora=True, name="dora")
    full = ("up_blocks.1.", "conv_norm_out.", "conv_out.")
    params = []
    for name, p in unet.named_parameters():  # add_lora froze everything else, the first LoRA too
        # bitfit on the first block's convs only: torch 2.13's CPU GroupNorm backward crashes on a channels_last
        # input that needs no gradient when the norm's weight does, as the first norm's would
        bitfit = name.startswith("down_blocks.0.") and name.endswith(".bias") and ".conv" in name
        p.requires_grad_(".lora_" in name or name.startswith(full) or bitfit)
        params += [p] if p.requires_grad else []
    with torch.no_grad():  # B = 0 (and m = ||W||) would leave A without a gradient: test adapters in use
        for name, p in unet.named_parameters():
            if ".lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return unet.to(memory_format=torch.channels_last), params


@pytest.mark.parametrize("checkpointing", [False, "attention", "full"])
def test_one_graph_no_recompiles_eager_gradients(checkpointing):
    unet, params = trained()
    unet.gradient_checkpointing = checkpointing
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)
    t, text = torch.tensor([10, 900]), torch.randn(2, 7, 32, generator=g)

    def grads(forward):
        for p in params:
            p.grad = None
        forward(x, t, text).square().mean().backward()
        return [p.grad for p in params]

    want = grads(unet)
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounterWithBackend("aot_eager")  # traces forward and backward as inductor would, compiles fast
    compiled = torch.compile(unet, backend=backend)
    grads(compiled)  # the first step compiles
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile raises, naming the guard that failed
        got = grads(compiled)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert backend.frame_count == 1  # one graph: no break split it, no recompile added one
    # The compiled backward may sum the same float terms in another order (a gradient reaching a tensor along
    # several paths, weight gradients summed over batch and pixels), which moves fp32 results by a few ulps (2^-23)
    # per layer, compounded over the ~20 layers backward runs through: 1e-5 of a tensor's largest entry allows about
    # a hundred ulps, and a wrong gradient is off by its own order of magnitude.
    for p, w, c in zip(params, want, got):
        assert (c - w).abs().max() <= 1e-5 * w.abs().max(), p.shape


def _norm_act_inputs():
    torch.manual_seed(0)
    scale, shift = torch.randn(2, 128, 1, 1, requires_grad=True).chunk(2, 1)
    return torch.nn.GroupNorm(8, 64), torch.nn.GELU(), torch.randn(2, 64, 16, 16, requires_grad=True), scale, shift


class _NewStorages(TorchDispatchMode):
    """Weak references to every storage an op makes while active: which of them are still alive, afterwards."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.refs += [weakref.ref(t.untyped_storage()) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out

    def alive_bytes(self, *besides):
        skip = {t.untyped_storage().data_ptr() for t in besides}
        alive = {s.data_ptr(): s.nbytes() for r in self.refs if (s := r()) is not None and s.data_ptr() not in skip}
        return sum(alive.values())


def test_norm_act_keeps_only_its_inputs():
    """The memory norm_act's recompute exists for: after its forward nothing it made is alive but its output;
    without the recompute the norm's output (for the FiLM scale's gradient) and the activation's input are kept."""
    norm, act, x, scale, shift = _norm_act_inputs()
    kept = {}
    for recompute in (True, False):
        with _NewStorages() as made:
            y = norm_act(norm, act, x, scale, shift, recompute=recompute)
        kept[recompute] = made.alive_bytes(y)
        y.sum().backward()
    assert kept[True] == 0
    assert kept[False] >= 2 * x.nbytes


def test_compiled_norm_act_saves_only_its_inputs():
    """The same in a compiled graph: what it saves for backward is norm_act's inputs, so the recompute is kept.
    (Dynamo refuses a dispatch mode, hence saved-tensor hooks here; in eager, checkpoint's own hooks would hide
    the saved tensors from them.)"""
    norm, act, x, scale, shift = _norm_act_inputs()
    inputs = {t.untyped_storage().data_ptr() for t in (x, scale, shift, norm.weight, norm.bias)}
    forward = torch.compile(norm_act, backend="aot_eager", fullgraph=True)

    def saved_besides_inputs(recompute):
        others = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in inputs:
                others.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = forward(norm, act, x, scale, shift, recompute=recompute)
        y.sum().backward()
        return others

    assert saved_besides_inputs(True) == []
    assert saved_besides_inputs(False)  # without the recompute the graph saves activations too
