"""optim.py: stochastic rounding, AdamW against torch's, the 8-bit and factored states, and the fused step."""

import pytest
import torch

import optim


# ---------------------------------------------------------------------------------------------
# stochastic rounding and plain AdamW
def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([1.0 + 2**-10, -3.0 - 2**-9, 0.1, 1e-30])  # between bf16 neighbours
    draws = torch.stack([optim.stochastic_round(x, g).float() for _ in range(20000)])
    assert ((draws - x).abs() <= x.abs() * 2**-7).all()  # always one of the two neighbours
    torch.testing.assert_close(draws.mean(0), x, rtol=2e-4, atol=0)
    assert x.bfloat16().float()[0] == 1.0  # round-to-nearest would lose the offset entirely


def test_update_below_bf16_resolution_moves_weights_in_expectation():
    g = torch.Generator().manual_seed(0)
    w = torch.ones(10000, dtype=torch.bfloat16)
    nearest = w.clone()
    for _ in range(100):  # 100 updates of 1e-4 each: every one is far below bf16's step of 2^-7 at 1.0
        w = optim.stochastic_round(w.float() - 1e-4, g)
        nearest = (nearest.float() - 1e-4).bfloat16()
    assert torch.equal(nearest, torch.ones_like(nearest))  # round-to-nearest never moved
    assert abs(w.float().mean().item() - (1 - 1e-2)) < 1e-3


def test_fp32_adamw_equals_torch_adamw():
    torch.manual_seed(0)
    a = [torch.randn(5, 7, requires_grad=True), torch.randn(3, 2, 4, 4, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    ours = optim.AdamW(a, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    ref = torch.optim.AdamW(b, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for step in range(5):
        for ps in (a, b):
            sum(((p - step) ** 2).sum() for p in ps).backward()
        ours.step(), ref.step(), ours.zero_grad(), ref.zero_grad()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fp32_master", [False, True])
def test_bf16_adamw_tracks_fp32_on_regression(fp32_master):
    torch.manual_seed(0)
    X, w_true = torch.randn(128, 16), torch.randn(16, 1)
    y = X @ w_true

    def fit(dtype, **kw):
        w = torch.zeros(16, 1, dtype=dtype, requires_grad=True)
        opt = optim.AdamW([w], lr=2e-2, weight_decay=0.0, generator=torch.Generator().manual_seed(1), **kw)
        for i in range(600):
            ((X.to(dtype) @ w).float() - y).square().mean().backward()
            opt.step(2e-2 * (1 - i / 600)), opt.zero_grad()
        return w.detach().float()

    full, half = fit(torch.float32), fit(torch.bfloat16, fp32_master=fp32_master)
    assert (full - w_true).norm() < 1e-3 * w_true.norm()  # fp32 solves the problem
    assert (half - full).norm() < 1e-2 * w_true.norm()  # bf16 alone resolves only ~0.4% of each weight


def test_ema_update():
    ema, w = torch.zeros(1000), torch.ones(1000)
    optim.ema_update(ema, w, 0.9)
    torch.testing.assert_close(ema, torch.full((1000,), 0.1))
    ema16 = torch.zeros(100000, dtype=torch.bfloat16)
    optim.ema_update(ema16, w.bfloat16().repeat(100), 0.999, torch.Generator().manual_seed(0))
    assert abs(ema16.float().mean().item() - 1e-3) < 2e-5  # unbiased even though 1e-3 * 1 rounds in bf16




def _bf16_step_is_unbiased(fused: bool):
    """One bf16 AdamW step of 100k identical weights with identical gradients: each lands on one of two bf16
    neighbours at random; their mean is the fp32 result to within 5 standard errors (SR's spread is under one ulp)."""
    w = torch.full((100_000,), 1.0, dtype=torch.bfloat16, requires_grad=True)
    opt = optim.AdamW([w], lr=1e-3 / 3, weight_decay=0.0, generator=torch.Generator().manual_seed(0), fused=fused)
    exact = 1.0 - 1e-3 / 3  # step 1 of Adam moves every weight by lr (m/sqrt(v) = sign(g) after bias correction)
    opt.begin() if fused else None
    (w.float() * 0.5).sum().backward()
    opt.end() if fused else opt.step()
    values = w.detach().float()
    below, above = exact - exact % 2**-8, exact - exact % 2**-8 + 2**-8  # bf16's neighbours of `exact`
    assert set(values.unique().tolist()) <= {below, above}
    assert abs(values.double().mean().item() - exact) < 5 * 2**-8 / 2 / 100_000**0.5


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_adamw_step_is_unbiased(fused):
    _bf16_step_is_unbiased(fused)


# ---------------------------------------------------------------------------------------------
# 8-bit states


def test_8bit_round_trip_is_within_half_a_level_of_the_map():
    """Dequantised values are the nearest of the 256 map levels (scaled by the block's absmax): the error is at most
    half the gap between the two levels around the value, and the block's largest value comes back exactly."""
    torch.manual_seed(0)
    x = torch.randn(64 * optim.BLOCK) * torch.logspace(-6, 0, 64).repeat_interleave(optim.BLOCK)  # every decade
    x = x * torch.logspace(-4, 0, 16).repeat(4 * optim.BLOCK)  # and a dynamic range inside each block
    for signed, values in ((True, x), (False, x.square())):
        state = optim.State(values.numel(), "8bit", "cpu", signed=signed)
        s = slice(0, values.numel())
        state.put(s, values.clone())
        back = state.get(s)
        absmax = values.view(-1, optim.BLOCK).abs().amax(1, keepdim=True)
        level = (values.view(-1, optim.BLOCK) / absmax).view(-1)
        qmap = optim.dynamic_map(signed).unique()
        hi = torch.searchsorted(qmap, level).clamp(1, len(qmap) - 1)
        gap = (qmap[hi] - qmap[hi - 1]).view(-1, optim.BLOCK) * absmax
        err = (back - values).abs().view(-1, optim.BLOCK)
        assert (err <= gap / 2 * (1 + 1e-5) + 1e-30).all()
        top = values.view(-1, optim.BLOCK).abs().argmax(1)
        assert torch.equal(back.view(-1, optim.BLOCK).gather(1, top[:, None]), values.view(-1, optim.BLOCK)
                           .gather(1, top[:, None]))
        assert state.codes.dtype == torch.uint8 and state.absmax.numel() == values.numel() // optim.BLOCK


def test_dynamic_map_is_256_sorted_levels_dense_near_zero():
    for signed in (True, False):
        qmap = optim.dynamic_map(signed)
        assert qmap.numel() == 256 and (qmap[1:] >= qmap[:-1]).all() and qmap[-1] == 1.0 and (qmap == 0).any()
        positive = qmap.unique()[qmap.unique() > 0]
        assert len(qmap.unique()) == (255 if signed else 256)
        assert positive.min() < (1e-5 if signed else 1e-6)  # six (seven) decades below the block's maximum
        assert (positive > 0.1).sum() == (64 if signed else 128) + 1  # the top decade gets the most levels (and 1.0)


def _moments_after_one_step(kind: str, g: torch.Tensor, betas=(0.9, 0.99)):
    w = torch.zeros_like(g, requires_grad=True)
    opt = optim.AdamW([w], lr=1e-2, betas=betas, eps=1e-8, weight_decay=0.0, state=kind)
    w.grad.copy_(g)
    opt.step()
    n = g.numel()
    every = slice(0, opt.flat.numel())
    return w.detach(), opt.exp_avg.get(every)[:n], opt.exp_avg_sq.get(every)[:n]


def test_8bit_adamw_step_equals_torch_adamw_up_to_the_quantised_moments():
    """One step from zero, fp32 weights: torch's AdamW moves w by lr m/sqrt(v) (bias-corrected) with exact moments;
    ours uses the dequantised ones. Each element's update then differs from torch's by the relative error of its
    m plus half that of its v (to first order), and each of those is at most half a map level (the test above)."""
    torch.manual_seed(0)
    g = torch.randn(4 * optim.BLOCK) * torch.logspace(-3, 0, 4 * optim.BLOCK)
    ref_w = torch.zeros_like(g, requires_grad=True)
    ref = torch.optim.AdamW([ref_w], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    ref_w.grad = g.clone()
    ref.step()
    ours, m, v = _moments_after_one_step("8bit", g)
    m_true, v_true = 0.1 * g, 0.01 * g.square()
    rel_m, rel_v = ((m - m_true) / m_true).abs(), ((v - v_true) / v_true).abs()
    bound = 1e-2 * (rel_m + rel_v / 2 + rel_m * rel_v + 1e-5)  # lr x (first-order terms + their product + fp32)
    assert ((ours - ref_w.detach()).abs() <= bound).all()
    assert (ours - ref_w.detach()).abs().max() > 0  # the moments really were quantised
    fp32_w, _, _ = _moments_after_one_step("fp32", g)
    torch.testing.assert_close(fp32_w, ref_w.detach(), rtol=1e-6, atol=1e-9)  # and without quantisation: torch's


def _fit(dtype=torch.float32, steps=300, **kw):
    """A least-squares fit of a 16 x 16 matrix and a bias, with AdamW options kw; returns the final loss."""
    torch.manual_seed(0)
    X, W_true = torch.randn(256, 16), torch.randn(16, 16)
    y = X @ W_true + 0.5
    w, b = torch.zeros(16, 16, dtype=dtype, requires_grad=True), torch.zeros(16, dtype=dtype, requires_grad=True)
    ref = kw.pop("torch", False)
    opt = (torch.optim.AdamW([w, b], lr=3e-2, weight_decay=0.0) if ref else
           optim.AdamW([w, b], lr=3e-2, weight_decay=0.0, generator=torch.Generator().manual_seed(1), **kw))
    loss = None
    for _ in range(steps):
        if kw.get("fused"):
            opt.begin()
        loss = ((X.to(dtype) @ w + b).float() - y).square().mean()
        loss.backward()
        if not kw.get("fused"):
            opt.step(), opt.zero_grad()
    return loss.item()


@pytest.mark.parametrize("kw", [dict(state="8bit"), dict(factored=True), dict(state="8bit", factored=True, fused=True)])
def test_compact_states_solve_what_adamw_solves(kw):
    """After 300 steps AdamW has the residual down by > 1000x; each variant gets within 2x of AdamW's loss there."""
    start, reference = _fit(steps=1, torch=True), _fit(torch=True)
    assert reference < start / 1000
    assert _fit(**kw) < 2 * reference + 1e-6


def test_factored_second_moment_is_exact_for_a_rank_one_squared_gradient():
    """For g = a b^T, g^2 = a^2 (b^2)^T is rank one, and row means x column means / overall mean reproduce it: one
    step equals torch's AdamW to fp32 rounding (Adafactor's 1e-30 floor is far below these g^2)."""
    torch.manual_seed(0)
    g = torch.randn(12, 1)[:, :] @ torch.randn(1, 40)
    ref_w = torch.zeros_like(g, requires_grad=True)
    ref = torch.optim.AdamW([ref_w], lr=1e-2, weight_decay=0.0)
    ref_w.grad = g.clone()
    ref.step()
    w = torch.zeros_like(g, requires_grad=True)
    opt = optim.AdamW([w], lr=1e-2, weight_decay=0.0, factored=True)
    w.grad.copy_(g)
    opt.step()
    torch.testing.assert_close(w.detach(), ref_w.detach(), rtol=1e-5, atol=1e-8)
    assert opt.exp_avg_sq is None and opt.rows[0].shape == (12,) and opt.cols[0].shape == (40,)


# ---------------------------------------------------------------------------------------------
# the fused step


def _model(dtype):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 1),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 36, 5))
    return net.to(dtype=dtype, memory_format=torch.channels_last)


def _train(fused: bool, dtype=torch.float32, steps=4, **kw):
    net = _model(dtype)
    params = list(net.parameters())
    opt = optim.AdamW(params, lr=1e-2, weight_decay=0.1, generator=torch.Generator().manual_seed(3), fused=fused, **kw)
    g = torch.Generator().manual_seed(5)
    for step in range(steps):
        x = torch.randn(6, 3, 6, 6, generator=g).to(dtype=dtype, memory_format=torch.channels_last)
        lr = 1e-2 * (1 + step)
        opt.begin(lr) if fused else None
        net(x).float().square().mean().backward()
        opt.end() if fused else (opt.step(lr), opt.zero_grad())
    return opt


@pytest.mark.parametrize("kw", [dict(), dict(state="8bit"), dict(factored=True), dict(fp32_master=True)])
def test_fused_step_equals_the_unfused_one_bit_for_bit(kw):
    """Without stochastic rounding (fp32 weights, or fp32 masters) nothing random differs, and each element sees the
    same operations in both orders: weights and every state are bitwise equal after 4 steps."""
    dtype = torch.bfloat16 if kw.get("fp32_master") else torch.float32
    a, b = _train(False, dtype, **kw), _train(True, dtype, **kw)
    assert torch.equal(a.flat, b.flat)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.grad is None and all(p.grad is None for p in b.params)  # no gradient outlives its parameter's step


@pytest.mark.parametrize("kw", [dict(), dict(state="8bit")])
def test_fused_bf16_step_is_the_unfused_one_up_to_the_rounding_draws(kw):
    """bf16 with stochastic rounding: the two paths draw their rounding noise in different orders (per parameter in
    backward's order vs per chunk of the flat buffer), so after one step from the same weights each weight is either
    the same or the bf16 neighbour on the other side of the same fp32 value: at most one ulp apart."""
    a, b = _train(False, torch.bfloat16, steps=1, **kw), _train(True, torch.bfloat16, steps=1, **kw)
    ia, ib = a.flat.view(torch.int16).int(), b.flat.view(torch.int16).int()
    assert ((ia - ib).abs() <= 1).all() and (ia != ib).any()


def test_fused_nonfinite_gradient_keeps_those_weights_and_reports_it():
    net = _model(torch.float32)
    params = list(net.parameters())
    opt = optim.AdamW(params, lr=1e-2, fused=True)
    before = opt.flat.clone()
    opt.begin()
    out = net(torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last))
    (out.sum() + params[-1].sum() * float("nan")).backward()  # only the last layer's bias gets a NaN gradient
    assert not torch.isfinite(opt.end())
    bias = slice(opt.offsets[-1], opt.offsets[-1] + params[-1].numel())
    assert torch.equal(opt.flat[bias], before[bias])
    assert torch.equal(opt.exp_avg.get(bias), torch.zeros_like(before[bias]))
    first = slice(0, params[0].numel())
    assert not torch.equal(opt.flat[first], before[first])  # the others stepped


def test_checkpoint_state_is_stored_compact_and_restores_exactly():
    a = _train(False, torch.bfloat16, steps=2, state="8bit")
    state = a.state_dict()
    assert state["exp_avg.codes"].dtype == torch.uint8 and state["exp_avg_sq.codes"].dtype == torch.uint8
    b = _train(False, torch.bfloat16, steps=0, state="8bit")
    b.flat.copy_(a.flat), b.load_state_dict({k: v.clone() for k, v in state.items()})
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in state.items())


def test_fused_clipping_uses_the_previous_steps_norm():
    """fused + clip equals the unfused step whose gradient is scaled by min(1, clip / (norm of the previous step's
    gradient + 1e-6)) (none at the first step), bit for bit in fp32 given the same norm; the norm end() returns is
    this step's, before clipping, and the optimizer's state carries it on."""
    net_a, net_b = _model(torch.float32), _model(torch.float32)
    a = optim.AdamW(list(net_a.parameters()), lr=1e-2, weight_decay=0.0)
    b = optim.AdamW(list(net_b.parameters()), lr=1e-2, weight_decay=0.0, fused=True, clip=0.05)
    g, last, scaled = torch.Generator().manual_seed(5), None, 0
    for _ in range(4):
        x = torch.randn(6, 3, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
        net_a(x).square().mean().backward()
        norm = a.grad_norm()
        if last is not None:
            factor = torch.clamp(0.05 / (last + 1e-6), max=1.0)
            scaled += bool(factor < 1)
            a.grad.mul_(factor)
        a.step(), a.zero_grad()
        b.begin()
        net_b(x).square().mean().backward()
        last = b.end()  # the same norm, summed per parameter instead of per chunk: equal to fp32 rounding
        torch.testing.assert_close(last, norm, rtol=1e-6, atol=0)
    assert torch.equal(a.flat, b.flat) and scaled == 3  # every step after the first was clipped
    assert torch.equal(b.state_dict()["last_norm"], last)


def test_weights_ema_clipping_and_per_parameter_state_unsharded():
    """What a training loop calls in either layout (tests/test_fsdp_optim.py: sharded), here on the flat buffer:
    weights() is a copy of it, update_ema is ema_update on it, clip_grad_ scales the gradient to the given norm (or
    leaves it alone below it), and param_state_dict views each parameter's states in its shape and memory order,
    loading back bit for bit, 8-bit included (each block's maximum maps to 1.0, every other value to its level)."""
    a = _train(False, torch.bfloat16, steps=2, state="8bit", fp32_master=True)
    assert torch.equal(a.weights(), a.flat) and a.weights().data_ptr() != a.flat.data_ptr()
    ema, ref = a.weights(), a.flat.clone()
    a.update_ema(ema, 0.9, torch.Generator().manual_seed(0))
    optim.ema_update(ref, a.flat, 0.9, torch.Generator().manual_seed(0))
    assert torch.equal(ema, ref)
    state = a.param_state_dict()
    for i, p in enumerate(a.params):
        master = state[f"master.{i}"]
        assert master.shape == p.shape and master.stride() == p.stride()  # channels_last conv weights stay so
        assert torch.equal(master.bfloat16(), p.detach())  # the bf16 weights are the masters rounded
        assert state[f"exp_avg.{i}"].dtype == torch.float32 and state[f"exp_avg.{i}"].shape == p.shape
    b = _train(False, torch.bfloat16, steps=0, state="8bit", fp32_master=True)
    b.load_weights(a.weights())
    b.load_param_state_dict({k: v.clone() for k, v in state.items()})
    sa, sb = a.state_dict(), b.state_dict()
    assert torch.equal(a.flat, b.flat) and all(torch.equal(sa[k], sb[k]) for k in sa) and b.step_count == 2
    a.grad.copy_(torch.randn(a.grad.shape, generator=torch.Generator().manual_seed(0)))
    norm, before = a.grad_norm(), a.grad.clone()
    a.clip_grad_(2 * norm.item(), norm)
    assert torch.equal(a.grad, before)
    a.clip_grad_(norm.item() / 4, norm)
    torch.testing.assert_close(a.grad_norm(), norm / 4, rtol=1e-5, atol=0)
