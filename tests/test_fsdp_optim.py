"""optim.AdamW on FSDP2-sharded parameters (DTensors): two CPU processes over gloo against one unsharded process.

The tiny IF U-Net (model.tiny_config) is sharded the way a full fine-tune shards it: fully_shard on every
ResnetBlock2D and Attention, then on the root. Shards may be uneven, or empty (a 1-row positional embedding leaves
the second process none of it), and most do not start on an 8-bit block boundary of the whole parameter. One spawn
of two processes runs every case; each process saves what it saw and the tests below judge it (a DTensor is saved
as its local shard, and the two shards are joined: no collective per tensor). In each case three copies of one
model step from the same weights:
- "sharded": the FSDP2 model, each process running its half of the batch (FSDP averages the two halves' gradients);
- "ref": the unsharded flat-buffer AdamW on the whole batch: equal up to the gradient's summation order;
- "same": the unsharded AdamW fed the sharded run's own gradient (gathered): this isolates the optimizer, so where
  no rounding draw or 8-bit block differs, its weights must equal the sharded ones bit for bit.
"""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

import model
import optim

WORLD = 2
LR, EPS = 1e-2, 1e-3  # eps: see _step_bound


def _unet(dtype=torch.float32):
    torch.manual_seed(0)
    return model.build(model.tiny_config(1), dtype=dtype)


def _shard(unet, mesh):
    from torch.distributed.fsdp import fully_shard

    for m in unet.modules():
        if isinstance(m, (model.ResnetBlock2D, model.Attention)):
            fully_shard(m, mesh=mesh)
    fully_shard(unet, mesh=mesh)
    return unet


def _batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 1000, (4,), generator=g)
    return x.to(dtype), t, torch.randn(4, 7, 32, generator=g).to(dtype)


def _loss(net, batch, rows=slice(None)):
    x, t, text = batch
    return net(x[rows], t[rows], text[rows]).float().square().mean()


def _keep(tensors) -> list:
    """Copies to save: a plain tensor as it is, a DTensor as {"shard": its local tensor}, which _join makes whole."""
    with torch.no_grad():
        return [{"shard": t.to_local().clone()} if isinstance(t, DTensor) else t.detach().clone() for t in tensors]


def _whole(dtensors) -> list:
    """The whole tensors, on every process: the local shards of all processes in one collective, joined."""
    parts = [None] * WORLD
    dist.all_gather_object(parts, [t.to_local().detach().clone() for t in dtensors])
    return [torch.cat(shards) for shards in zip(*parts)]


def _join(parts: list):
    """What the processes saved, made one: shards joined along dim 0 (FSDP's Shard(0): the first process holds the
    first rows, as torch.chunk cuts them), anything else as the first process saw it."""
    first = parts[0]
    if isinstance(first, dict) and first.keys() == {"shard"}:
        return torch.cat([p["shard"] for p in parts])
    if isinstance(first, dict):
        return {k: _join([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_join(list(x)) for x in zip(*parts))
    return first


def _params(net) -> list:
    return list(net.parameters())


def _states(opt) -> dict:
    state = opt.param_state_dict()
    return dict(zip(state, _keep(state.values())))


# ---------------------------------------------------------------------------------------------
# what each process runs


def _compare(mesh, rank, dtype=torch.float32, steps=1, clip=None, **kw) -> tuple:
    """`steps` steps of the three copies (module docstring); returns what they did, and the sharded model, its
    optimizer and its EMA (decay 0.9, every step) for the checkpoint case."""
    batch, mine = _batch(dtype), slice(2 * rank, 2 * rank + 2)
    ref = _unet(dtype)
    same, sharded = copy.deepcopy(ref), _shard(copy.deepcopy(ref), mesh)

    def adamw(net, seed):
        return optim.AdamW(_params(net), lr=LR, eps=EPS, weight_decay=0.1,
                           generator=torch.Generator().manual_seed(seed), **kw)

    o_ref, o_same, o_sh = adamw(ref, 0), adamw(same, 0), adamw(sharded, 1 + rank)  # each process its own draws
    ema_sh, ema_same = o_sh.weights(), o_same.weights()
    rec = {"w0": _keep(_params(ref)), "local_numel": [optim._local(p).numel() for p in _params(sharded)],
           "names": [n for n, _ in sharded.named_parameters()] == [n for n, _ in ref.named_parameters()], "steps": []}
    for _ in range(steps):
        _loss(sharded, batch, mine).backward()
        _loss(ref, batch).backward()
        step = {"norm": o_sh.grad_norm(), "norm_ref": o_ref.grad_norm(),
                "norm_exact": torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in _params(ref)]).double())}
        if clip is not None:
            o_sh.clip_grad_(clip, step["norm"])
            o_ref.clip_grad_(clip, step["norm_ref"])
        step["grad"], step["grad_ref"] = _keep(p.grad for p in _params(sharded)), _keep(p.grad for p in _params(ref))
        for p, g in zip(_params(same), _whole(p.grad for p in _params(sharded))):
            p.grad.copy_(g)
        for o in (o_ref, o_same, o_sh):
            o.step(), o.zero_grad()
        o_sh.update_ema(ema_sh, 0.9)
        o_same.update_ema(ema_same, 0.9)
        step["w"], step["w_ref"], step["w_same"] = (_keep(_params(n)) for n in (sharded, ref, same))
        step["state"], step["state_same"] = _states(o_sh), _states(o_same)
        step["ema"], step["ema_same"] = _keep(o_sh.param_views(ema_sh)), _keep(o_same.param_views(ema_same))
        rec["steps"].append(step)
    with torch.no_grad():  # the next forward all-gathers the shards the step wrote in place
        rec["out"], rec["out_same"] = sharded(*_batch(dtype)), same(*_batch(dtype))
    return rec, sharded, o_sh, ema_sh


def _checkpoint(mesh, rank, sharded, opt, ema, path) -> dict:
    """Save model, optimizer and EMA with torch.distributed.checkpoint, load them into a fresh sharded model and
    optimizer (from the initial weights), then take one more step with both."""
    import torch.distributed.checkpoint as dcp

    def state(net, o, e):
        return {"model": net.state_dict(), "optim": o.param_state_dict(),
                "ema": {str(i): v for i, v in enumerate(o.param_views(e))}}

    saved = state(sharded, opt, ema)
    dcp.save(saved, checkpoint_id=path)
    rec = {"saved": _states(opt),
           "saved_model": dict(zip(saved["model"], _keep(saved["model"].values()))),
           "saved_ema": _keep(saved["ema"].values())}
    net = _shard(_unet(), mesh)
    o = optim.AdamW(_params(net), lr=LR, eps=EPS, weight_decay=0.1, state="8bit")
    e = o.weights()
    loaded = state(net, o, e)
    dcp.load(loaded, checkpoint_id=path)
    o.load_param_state_dict(loaded["optim"])
    rec["local"] = [{k: v.clone() for k, v in x.state_dict().items()} for x in (opt, o)]  # 8-bit codes, maxima
    rec["weights"], rec["ema"] = (opt.weights(), o.weights()), (ema.clone(), e)
    batch, mine = _batch(), slice(2 * rank, 2 * rank + 2)
    for n, x in ((sharded, opt), (net, o)):
        _loss(n, batch, mine).backward()
        x.step(), x.zero_grad()
    rec["after"] = (opt.weights(), o.weights())
    return rec


def _fused(mesh, rank, **kw) -> dict:
    """Two steps of the sharded model unfused and fused (each shard steps in FSDP's post-reduce-scatter hook)."""
    batch, mine, base = _batch(), slice(2 * rank, 2 * rank + 2), _unet()
    a, b = _shard(copy.deepcopy(base), mesh), _shard(copy.deepcopy(base), mesh)
    oa = optim.AdamW(_params(a), lr=LR, eps=EPS, weight_decay=0.1, **kw)
    ob = optim.AdamW(_params(b), lr=LR, eps=EPS, weight_decay=0.1, fused=True, **kw)
    norms = []
    for _ in range(2):
        _loss(a, batch, mine).backward()
        norms.append((oa.grad_norm(), None))
        oa.step(), oa.zero_grad()
        ob.begin()
        _loss(b, batch, mine).backward()
        norms[-1] = (norms[-1][0], ob.end())
    return {"w": _keep(_params(a)), "w_fused": _keep(_params(b)), "norms": norms,
            "freed": all(p.grad is None for p in _params(b)), "states": (oa.state_dict(), ob.state_dict())}


def _refusals(mesh) -> dict:
    params, said = _params(_shard(_unet(), mesh)), {}
    for name, args, kw in (("factored", params, dict(factored=True)),
                           ("mixed", params + [torch.zeros(3, requires_grad=True)], {})):
        try:
            optim.AdamW(args, **kw)
        except ValueError as e:
            said[name] = str(e)
    return said


def _worker(rank: int, store: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    results = {"fp32": _compare(mesh, rank)[0], "clip": _compare(mesh, rank, clip=1e-2)[0],
               "bf16": _compare(mesh, rank, dtype=torch.bfloat16)[0],
               "master": _compare(mesh, rank, dtype=torch.bfloat16, fp32_master=True)[0]}
    results["8bit"], sharded, opt, ema = _compare(mesh, rank, steps=2, state="8bit")
    results["dcp"] = _checkpoint(mesh, rank, sharded, opt, ema, os.path.join(out, "dcp"))
    results["fused"] = {kind: _fused(mesh, rank, state=kind) for kind in ("fp32", "8bit")}
    results["refusals"] = _refusals(mesh)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """What the two processes saw: joined ("whole"), as each saw it ("ranks"), and their checkpoint's folder."""
    root = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(str(root / "store"), str(root)), nprocs=WORLD, join=True)
    ranks = [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]
    return {"whole": _join(ranks), "ranks": ranks, "dcp": root / "dcp"}


# ---------------------------------------------------------------------------------------------
# the step


def _step_bound(w, g, g_ref):
    """How far one fp32 AdamW step from zero moments may move w apart, for gradients g and g_ref.

    At step 1 the bias-corrected moments are g and g^2, so the update is lr g / (|g| + eps), whose derivative in g
    is lr eps / (|g| + eps)^2 <= lr / eps: the weights differ by at most lr/eps |g - g_ref| (eps = 1e-3 keeps that
    small; with eps = 1e-8 a gradient near zero could flip its update by 2 lr), plus the rounding of the update
    itself in fp32 (a few ulps of w and of lr)."""
    return LR / EPS * (g - g_ref).abs() + 4 * 2**-23 * (w.abs() + LR)


def _assert_gradients_match(step):
    """The sharded gradient is the unsharded one up to summation order: two half-batch sums averaged by the
    reduce-scatter vs one sum over the batch, each over up to 4 x 16 x 16 positions in fp32. Allowed: 1e-4 of the
    parameter's largest component (~2e-6 seen), far below what a wrong shard, a sum instead of a mean or a missing
    half gives (O(1)); plus 1e-6 of the whole gradient's largest, for parameters whose gradient is zero in exact
    arithmetic (a bias that the next GroupNorm cancels): theirs is rounding noise of sums of that scale."""
    scale = max(ref.abs().max().item() for ref in step["grad_ref"])
    for g, ref in zip(step["grad"], step["grad_ref"]):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item() + 1e-6 * scale)


def test_sharded_fp32_step_equals_the_unsharded_one(runs):
    rec = runs["whole"]["fp32"]
    step = rec["steps"][0]
    assert rec["names"]
    _assert_gradients_match(step)
    for w, ref, same, g, g_ref in zip(step["w"], step["w_ref"], step["w_same"], step["grad"], step["grad_ref"]):
        assert torch.equal(w, same)  # the same gradient: the same bits (each piece is padded to whole blocks)
        assert ((w - ref).abs() <= _step_bound(w, g, g_ref)).all()
    assert max((w - w0).abs().max().item() for w, w0 in zip(step["w"], rec["w0"])) > LR / 2  # it moved by ~lr
    # what the step wrote into the local shards is what FSDP all-gathers for the next forward
    assert torch.equal(rec["out"], rec["out_same"])
    assert 0 in runs["ranks"][1]["fp32"]["local_numel"]  # an empty shard took part


def test_clipping_uses_the_global_norm(runs):
    """Every process gets the same norm (the all-reduced sum of the local squared norms), that of the unsharded
    gradient (in fp64) to 1e-5: the gradients differ by ~1e-6 (_assert_gradients_match), and each parameter's norm
    in fp32 is good to ~1e-6. A local norm would be ~30% off and clip by another factor. (The unsharded fp32 norm,
    one vector_norm over 872k values, is itself ~1e-5 off on the CPU: the sharded sum of per-parameter norms is
    nearer the fp64 value than it.)"""
    step, other = runs["whole"]["clip"]["steps"][0], runs["ranks"][1]["clip"]["steps"][0]
    assert torch.equal(step["norm"], other["norm"])
    torch.testing.assert_close(step["norm"].double(), step["norm_exact"], rtol=1e-5, atol=0)
    torch.testing.assert_close(step["norm_ref"].double(), step["norm_exact"], rtol=1e-4, atol=0)
    assert step["norm"] > 10 * 1e-2  # so clipping to 1e-2 scaled the gradient down
    clipped = torch.linalg.vector_norm(torch.cat([g.view(-1) for g in step["grad"]]))
    torch.testing.assert_close(clipped, torch.tensor(1e-2), rtol=1e-4, atol=0)
    _assert_gradients_match(step)
    for w, ref, same, g, g_ref in zip(step["w"], step["w_ref"], step["w_same"], step["grad"], step["grad_ref"]):
        assert torch.equal(w, same) and ((w - ref).abs() <= _step_bound(w, g, g_ref)).all()


def _aligned(rec) -> list[bool]:
    """Per parameter: does the second process's shard start on a block boundary of the whole parameter? Then both
    layouts cut it into the same 8-bit blocks, and the sharded states must equal the unsharded ones bit for bit."""
    return [n % optim.BLOCK == 0 for n in rec["local_numel"]]


def test_sharded_8bit_step_equals_the_unsharded_one_up_to_its_blocks(runs):
    """Step 1's weights depend on the new moments in fp32, before they are stored: bitwise equal to the unsharded
    step's on the same gradient. The stored moments are quantised per block: where the blocks are the same, bitwise
    equal; elsewhere each side is within half a map gap of the exact moment, times its block's maximum, which is at
    most the parameter's largest moment. Step 2 reads the stored moments: bitwise equal where the blocks are."""
    rec = runs["whole"]["8bit"]
    one, two = rec["steps"]
    _assert_gradients_match(one)
    for w, ref, same, g, g_ref in zip(one["w"], one["w_ref"], one["w_same"], one["grad"], one["grad_ref"]):
        assert torch.equal(w, same) and ((w - ref).abs() <= _step_bound(w, g, g_ref)).all()
    aligned = _aligned(rec)
    assert any(aligned) and not all(aligned)
    for name in ("exp_avg", "exp_avg_sq"):
        gap = optim.dynamic_map(name == "exp_avg").unique().diff().max()
        for i, exact in enumerate(aligned):
            a, b = one["state"][f"{name}.{i}"], one["state_same"][f"{name}.{i}"]
            if exact:
                assert torch.equal(a, b) and torch.equal(two["state"][f"{name}.{i}"], two["state_same"][f"{name}.{i}"])
            else:
                assert ((a - b).abs() <= gap * b.abs().max() * (1 + 1e-5)).all()
    assert all(torch.equal(w, same) for w, same, exact in zip(two["w"], two["w_same"], aligned) if exact)
    assert not all(torch.equal(w, same) for w, same in zip(two["w"], two["w_same"]))  # other blocks, other codes


def test_sharded_bf16_step_is_within_one_ulp_of_the_unsharded_one(runs):
    """bf16 weights and moments, stochastic rounding: from the same gradient both compute the same fp32 weights,
    then each rounds with its own draws (the sharded processes from their own generators), to one of the two bf16
    neighbours of that value: at most one ulp apart. The bf16 gradients themselves went through FSDP."""
    step, w0 = runs["whole"]["bf16"]["steps"][0], runs["whole"]["bf16"]["w0"]
    ulps = [(w.view(torch.int16).int() - same.view(torch.int16).int()).abs() for w, same in
            zip(step["w"], step["w_same"])]
    assert all(w.dtype == torch.bfloat16 for w in step["w"])
    assert max(u.max().item() for u in ulps) == 1  # the draws differ somewhere, and by one ulp at most
    assert max((w.float() - w0.float()).abs().max().item() for w, w0 in zip(step["w"], w0)) > LR / 2


def test_sharded_fp32_masters_step_equals_the_unsharded_one(runs):
    """bf16 weights from fp32 masters (laid out over the local shards): nothing is random, so from the same gradient
    the masters, the moments and the bf16 weights rounded from the masters are bitwise the unsharded ones."""
    step = runs["whole"]["master"]["steps"][0]
    assert all(torch.equal(w, same) for w, same in zip(step["w"], step["w_same"]))
    assert step["state"].keys() == step["state_same"].keys() and "master.0" in step["state"]
    assert all(torch.equal(v, step["state_same"][k]) for k, v in step["state"].items())


def test_ema_of_the_shards_is_the_ema_of_the_weights(runs):
    """update_ema on the sharded layout is ema_update on each local shard: the EMA (decay 0.9) after a step whose
    weights are bitwise equal is the same up to fp32 rounding of the lerp (1 ulp: a shard's last values may go
    through the kernel's scalar tail instead of its vector loop)."""
    step = runs["whole"]["fp32"]["steps"][0]
    for e, same in zip(step["ema"], step["ema_same"]):
        torch.testing.assert_close(e, same, rtol=2**-22, atol=0)


def test_fused_sharded_step_equals_the_unfused_one(runs):
    """FSDP2 runs post-accumulate-grad hooks on each sharded parameter once its gradient is reduce-scattered, so the
    fused step sees the same averaged shards: bitwise equal weights and states after 2 steps, every gradient freed,
    and end()'s norm that of grad_norm() up to the order of the per-parameter sum (backward's vs the parameters')."""
    for kind in ("fp32", "8bit"):
        for rank in range(WORLD):
            rec, whole = runs["ranks"][rank]["fused"][kind], runs["whole"]["fused"][kind]
            assert all(torch.equal(a, b) for a, b in zip(whole["w"], whole["w_fused"]))
            sa, sb = rec["states"]
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
            assert rec["freed"]
            for unfused, fused in rec["norms"]:
                torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# checkpoints with torch.distributed.checkpoint


def test_checkpoint_round_trip_is_exact_at_the_same_sharding(runs):
    """Saved and loaded on two processes: the 8-bit codes and block maxima (dequantised to fp32 on the way, see
    param_state_dict), the weights, the EMA and the step count come back bit for bit, so the next step is the same."""
    for rank in range(WORLD):
        rec = runs["ranks"][rank]["dcp"]
        before, after = rec["local"]
        assert before.keys() == after.keys() and {"exp_avg.codes", "exp_avg_sq.absmax", "step"} <= before.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        for pair in (rec["weights"], rec["ema"], rec["after"]):
            assert torch.equal(*pair)
    assert int(runs["whole"]["dcp"]["saved"]["step"]) == 2


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process loads, without a process group
def test_checkpoint_loads_unsharded_within_8bit_precision(runs):
    """The two processes' checkpoint loaded by one unsharded process (resharding): weights, EMA and step exactly;
    the 8-bit moments requantised over the whole parameters' blocks, each value within half a map gap of what was
    saved, times its new block's maximum."""
    import torch.distributed.checkpoint as dcp

    saved, path = runs["whole"]["dcp"], runs["dcp"]
    net = _unet()
    opt = optim.AdamW(_params(net), lr=LR, eps=EPS, weight_decay=0.1, state="8bit")
    ema = opt.weights()
    state = {"model": net.state_dict(), "optim": opt.param_state_dict(),
             "ema": {str(i): v for i, v in enumerate(opt.param_views(ema))}}
    dcp.load(state, checkpoint_id=path)
    opt.load_param_state_dict(state["optim"])
    assert all(torch.equal(p, saved["saved_model"][k]) for k, p in net.state_dict().items())
    assert all(torch.equal(e, s) for e, s in zip(opt.param_views(ema), saved["saved_ema"]))
    back, moved = opt.param_state_dict(), 0
    assert opt.step_count == 2
    for name, moment in (("exp_avg", opt.exp_avg), ("exp_avg_sq", opt.exp_avg_sq)):
        gap = optim.dynamic_map(name == "exp_avg").unique().diff().max()
        block_max = moment.absmax.repeat_interleave(optim.BLOCK)
        for i, offset in enumerate(opt.offsets):
            a, b = back[f"{name}.{i}"], saved["saved"][f"{name}.{i}"]
            bound = gap / 2 * block_max[offset : offset + a.numel()].view(a.shape) * (1 + 1e-5)
            assert ((a - b).abs() <= bound).all()
            moved += not torch.equal(a, b)
    assert moved  # the blocks really were other runs of values


def test_what_cannot_be_sharded_is_refused(runs):
    said = runs["whole"]["refusals"]
    assert "factored" in said["factored"] and "state='8bit'" in said["factored"]
    assert "fully_shard the root module too" in said["mixed"]
