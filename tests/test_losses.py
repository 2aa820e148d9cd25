"""The loss options of diffusion.py (pseudo-Huber, soft min-SNR, offset noise, input perturbation) against values
computed by hand in Python floats, and hybrid / mse unchanged bit for bit."""

import math

import pytest
import torch

import diffusion as D

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sched():
    return D.Schedule()


def abar(t: int, T: int = 1000) -> float:
    """Improved DDPM eq. 17 in closed form: alpha-bar after step t (diffusers' index) is f((t + 1) / T) / f(0), f(s) =
    cos((s + 0.008) / 1.008 * pi/2)^2; the 0.999 cap on beta changes only t = T - 1."""
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return f((t + 1) / T) / f(0)


def rel_at(t: int) -> float:
    """How close the float32 table's SNR comes to the closed form: 1 - alpha-bar loses digits at small t (5e-4
    relative at t = 0; the table is diffusers' float32 cumprod, as the sampler needs it)."""
    return 1e-3 if t < 50 else 1e-5


def huber(r: float, c: float) -> float:
    return 2 * c * (math.sqrt(r * r + c * c) - c)


def close(a, b, rel=1e-5):
    assert a == pytest.approx(b, rel=rel, abs=1e-12), (a, b)


# ---- pseudo-Huber ----------------------------------------------------------------------------


def test_pseudo_huber_hand_values():
    r = [0.05, -0.3, 2.0]
    got_h = D.pseudo_huber(torch.tensor(r, dtype=torch.float64), 0.1, "huber").tolist()
    got_s = D.pseudo_huber(torch.tensor(r, dtype=torch.float64), 0.1, "smooth_l1").tolist()
    for x, h, s in zip(r, got_h, got_s):
        close(h, 0.2 * (math.sqrt(x * x + 0.01) - 0.1))
        close(s, 2 * (math.sqrt(x * x + 0.01) - 0.1))
    close(got_h[2], 0.2 * (math.sqrt(4.01) - 0.1))  # 0.38049..., spelled out once
    assert abs(got_h[2] - 0.380499) < 1e-6


def test_pseudo_huber_is_mse_for_small_residuals_and_linear_for_large():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(4096, generator=g)
    c = 0.1
    small, large = 1e-3 * r, 100 * r
    # |r| << c: huber = r^2 (the MSE), smooth_l1 = r^2 / c; relative error about r^2 / (4 c^2) <= 1e-3 here
    torch.testing.assert_close(D.pseudo_huber(small, c, "huber").mean(), (small**2).mean(), rtol=1e-3, atol=0)
    torch.testing.assert_close(D.pseudo_huber(small, c, "smooth_l1").mean(), (small**2).mean() / c, rtol=1e-3, atol=0)
    # |r| >> c: huber = 2c|r| - 2c^2, smooth_l1 = 2|r| - 2c: linear
    torch.testing.assert_close(D.pseudo_huber(large, c, "huber").mean(), 2 * c * large.abs().mean(), rtol=1e-2, atol=0)
    torch.testing.assert_close(D.pseudo_huber(large, c, "smooth_l1").mean(), 2 * large.abs().mean(), rtol=1e-2, atol=0)
    # and the gradient of a large residual is bounded by 2c (huber), where the MSE's is 2r
    x = large.clone().requires_grad_(True)
    D.pseudo_huber(x, c, "huber").sum().backward()
    assert x.grad.abs().max() <= 2 * c + 1e-6 and x.grad.abs().max() > 1.9 * c
    # exact, not cancelled, at residuals far below c: 2c (sqrt(r^2 + c^2) - c) = r^2 (1 - r^2 / (4c^2) + ...)
    tiny = torch.tensor([1e-4])
    torch.testing.assert_close(D.pseudo_huber(tiny, c), torch.tensor([1e-8]), rtol=1e-6, atol=0)


def test_huber_c_schedules_hand_values(sched):
    t = torch.tensor([0, 10, 300, 700])
    c = 0.1
    const = D.huber_c_at(sched, t, c, "constant").tolist()
    expo = D.huber_c_at(sched, t, c, "exponential").tolist()
    snr = D.huber_c_at(sched, t, c, "snr").tolist()
    for i, ti in enumerate(t.tolist()):
        close(const[i], c)
        close(expo[i], math.exp(-(-math.log(c) / 1000) * ti), rel=1e-6)  # c ** (t / T)
        sigma = math.sqrt((1 - abar(ti)) / abar(ti))
        close(snr[i], (1 - c) / (1 + sigma) ** 2 + c, rel=1e-4)
    assert expo[0] == 1 and abs(snr[0] - 1) < 0.02  # about the MSE at low noise
    assert abs(D.huber_c_at(sched, torch.tensor([999]), c, "snr").item() - c) < 1e-3  # huber_c at high noise
    assert D.huber_c_at(sched, t, c, "constant").shape == t.shape


def test_huber_loss_hand_value(sched):
    """Two samples, 3 eps channels of 1 pixel: the loss is the mean of 2c (sqrt(r^2 + c^2) - c) over the 3."""
    noise = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.2, -0.3]]).view(2, 3, 1, 1)
    r = [[0.05, -0.5, 3.0], [0.01, 0.0, -0.2]]
    out = noise + torch.tensor(r).view(2, 3, 1, 1)
    x0 = torch.tensor([[0.1, -0.2, 0.3], [1.0, -1.0, 0.0]]).view(2, 3, 1, 1)
    t = torch.tensor([10, 700])
    x_t = D.q_sample(sched, x0, noise, t)
    kw = dict(huber_schedule="constant", huber_c=0.1)
    got = D.training_losses(sched, out, x0, x_t, t, noise, loss_type="huber", **kw).tolist()
    for b in range(2):
        close(got[b], sum(huber(x, 0.1) for x in r[b]) / 3, rel=1e-5)
    got = D.training_losses(sched, out, x0, x_t, t, noise, loss_type="smooth_l1", **kw).tolist()
    for b in range(2):
        close(got[b], sum(huber(x, 0.1) / 0.1 for x in r[b]) / 3, rel=1e-5)
    # the snr schedule: c_t per sample
    got = D.training_losses(sched, out, x0, x_t, t, noise, loss_type="huber").tolist()  # default: snr, 0.1
    for b, tb in enumerate(t.tolist()):
        sigma = math.sqrt((1 - abar(tb)) / abar(tb))
        c = 0.9 / (1 + sigma) ** 2 + 0.1
        close(got[b], sum(huber(x, c) for x in r[b]) / 3, rel=1e-4)
    # min-SNR-gamma weights the huber term as it does the MSE
    w = D.training_losses(sched, out, x0, x_t, t, noise, loss_type="huber", snr_gamma=5.0, **kw) / D.training_losses(
        sched, out, x0, x_t, t, noise, loss_type="huber", **kw)
    for b, tb in enumerate(t.tolist()):
        s = abar(tb) / (1 - abar(tb))
        close(w[b].item(), min(s, 5.0) / s, rel=rel_at(tb))


def loss_inputs(t, seed=5):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 256, (len(t), 3, 8, 8), generator=g) / 127.5 - 1
    noise = torch.randn(len(t), 3, 8, 8, generator=g)
    out = torch.cat([noise + 0.3 * torch.randn_like(noise), torch.rand(len(t), 3, 8, 8, generator=g) * 2 - 1], 1)
    return x0, noise, out


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
def test_huber_keeps_the_vlb_term_on_a_six_channel_model(sched, loss_type):
    t = torch.tensor([0, 5, 500, 999])
    x0, noise, out = loss_inputs(t)
    x_t = D.q_sample(sched, x0, noise, t)
    out.requires_grad_(True)
    six, parts = D.training_losses(sched, out, x0, x_t, t, noise, loss_type=loss_type, vlb_weight=0.5,
                                   return_terms=True)
    three = D.training_losses(sched, out[:, :3], x0, x_t, t, noise, loss_type=loss_type)  # no variance: no VLB
    vlb = D.vlb_bpd(sched, out, x0, x_t, t)
    torch.testing.assert_close(parts["vlb"], vlb.detach())
    torch.testing.assert_close(parts["mse"], three.detach())
    torch.testing.assert_close(six, three + 0.5 * vlb)
    assert (vlb > 0).all()
    g6 = torch.autograd.grad(six.sum(), out)[0]
    g3 = torch.autograd.grad(three.sum(), out)[0]
    assert torch.equal(g6[:, :3], g3[:, :3])  # the eps channels see the huber term only
    assert (g6[:, 3:].abs().sum(dim=(1, 2, 3)) > 0).all() and torch.equal(g3[:, 3:], torch.zeros_like(g3[:, 3:]))


def test_sampler_variance_follows_the_vlb_term():
    assert D.sampler_variance("hybrid") == "learned_range" and D.sampler_variance("mse") == "fixed_small"
    assert D.sampler_variance("huber") == D.sampler_variance("smooth_l1") == "learned_range"  # IF's 6 channels
    assert D.sampler_variance("huber", out_channels=3) == "fixed_small"
    assert D.sampler_variance("mse", out_channels=6) == "fixed_small"
    with pytest.raises(ValueError, match="loss_type"):
        D.sampler_variance("l2")


# ---- soft min-SNR ----------------------------------------------------------------------------


def test_soft_min_snr_hand_values_and_hdit_form(sched):
    """The weight from its closed form, and from HDiT's weighting of the Karras-preconditioned loss converted to the
    eps loss by hand: w_F / c_out^2 * sigma^2."""
    t = [0, 100, 400, 800]
    sd = 0.5
    got = D.soft_min_snr_weight(D.snr_at(sched, torch.tensor(t), "cpu"), sd).tolist()
    for ti, w in zip(t, got):
        snr = abar(ti) / (1 - abar(ti))
        close(w, 1 / (1 + sd**2 * snr), rel=rel_at(ti))
        sigma = math.sqrt(1 / snr)
        w_f = (sigma * sd) ** 2 / (sigma**2 + sd**2) ** 2
        c_out2 = (sigma * sd) ** 2 / (sigma**2 + sd**2)
        close(w, w_f / c_out2 * sigma**2, rel=rel_at(ti))
        gamma = 1 / sd**2  # a soft min(SNR, gamma) / SNR: between half the hard one and the hard one
        hard = min(snr, gamma) / snr
        assert hard / 2 - 1e-6 <= w <= hard + 1e-6
    close(D.soft_min_snr_weight(torch.tensor([3.0]), 1.0).item(), 0.25)  # 1 / (1 + 1 * 3)


def test_soft_min_snr_in_training_losses(sched):
    t = torch.tensor([0, 100, 300, 600, 999])
    x0, noise, out = loss_inputs(t)
    x_t = D.q_sample(sched, x0, noise, t)
    for loss_type in ("mse", "huber"):
        plain = D.training_losses(sched, out[:, :3], x0, x_t, t, noise, loss_type=loss_type)
        soft = D.training_losses(sched, out[:, :3], x0, x_t, t, noise, loss_type=loss_type, use_soft_min_snr=True,
                                 soft_min_snr_sigma_data=1.0)
        for b, tb in enumerate(t.tolist()[:-1]):
            close((soft[b] / plain[b]).item(), 1 / (1 + abar(tb) / (1 - abar(tb))), rel=rel_at(tb))
        close((soft[-1] / plain[-1]).item(), 1.0, rel=1e-6)  # t = 999: SNR ~ 2e-9, weight 1
    # in hybrid only the eps term is weighted
    loss, parts = D.training_losses(sched, out, x0, x_t, t, noise, use_soft_min_snr=True, return_terms=True)
    torch.testing.assert_close(parts["vlb"], D.vlb_bpd(sched, out, x0, x_t, t))
    torch.testing.assert_close(loss, parts["mse"] + parts["vlb"])


def test_weightings_refuse_to_combine_and_bad_values(sched):
    t = torch.tensor([0, 500])
    x0, noise, out = loss_inputs(t)
    x_t = D.q_sample(sched, x0, noise, t)
    args = (sched, out, x0, x_t, t, noise)
    with pytest.raises(ValueError, match="snr_gamma=None, or use_soft_min_snr=False"):
        D.training_losses(*args, snr_gamma=5.0, use_soft_min_snr=True)
    with pytest.raises(ValueError, match="None turns min-SNR off"):  # SimpleTuner reads 0 as off; here it would zero
        D.training_losses(*args, snr_gamma=0.0)
    with pytest.raises(ValueError, match="sigma_data"):
        D.training_losses(*args, use_soft_min_snr=True, soft_min_snr_sigma_data=0.0)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        D.training_losses(*args, loss_type="l2")
    with pytest.raises(ValueError, match="huber_schedule"):
        D.training_losses(*args, loss_type="huber", huber_schedule="cosine")
    with pytest.raises(ValueError, match="huber_c must be > 0"):
        D.training_losses(*args, loss_type="huber", huber_c=0.0)
    with pytest.raises(ValueError, match="huber_schedule='constant'"):
        D.training_losses(*args, loss_type="smooth_l1", huber_c=2.0, huber_schedule="exponential")
    D.training_losses(*args, loss_type="smooth_l1", huber_c=2.0, huber_schedule="constant")  # a large fixed c is fine


# ---- hybrid and mse as they were -------------------------------------------------------------


def reference_training_losses(sched, model_output, x0, x_t, t, noise, *, loss_type="hybrid", vlb_weight=1.0,
                              snr_gamma=None, return_terms=False):
    """training_losses as it was before the loss options, line for line."""
    C = x0.shape[1]
    out, x0, x_t, noise = model_output.float(), x0.float(), x_t.float(), noise.float()
    mse = ((noise - out[:, :C]) ** 2).mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        a = sched.get("alphas_cumprod", x0.device)[t.to(x0.device)]
        snr = a / (1 - a)
        mse = mse * snr.clamp(max=snr_gamma) / snr
    vlb = torch.zeros_like(mse)
    if loss_type == "hybrid":
        vlb = D.vlb_bpd(sched, out, x0, x_t, t) * (sched.num_train_timesteps / 1000.0)
    loss = mse + vlb_weight * vlb
    return (loss, {"mse": mse.detach(), "vlb": vlb.detach()}) if return_terms else loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hybrid_and_mse_are_unchanged_bit_for_bit(sched, dtype):
    t = torch.tensor([0, 1, 5, 250, 500, 998, 999, 999])
    x0, noise, out = loss_inputs(t, seed=7)
    x_t = D.q_sample(sched, x0, noise, t)
    out = out.to(dtype)
    for loss_type in ("hybrid", "mse"):
        for snr_gamma in (None, 5.0, 1.0):
            for vlb_weight in (1.0, 0.5):
                kw = dict(loss_type=loss_type, vlb_weight=vlb_weight, snr_gamma=snr_gamma, return_terms=True)
                o1, o2 = out.clone().requires_grad_(True), out.clone().requires_grad_(True)
                l1, p1 = D.training_losses(sched, o1, x0, x_t, t, noise, **kw)
                l2, p2 = reference_training_losses(sched, o2, x0, x_t, t, noise, **kw)
                assert torch.equal(l1, l2) and torch.equal(p1["mse"], p2["mse"]) and torch.equal(p1["vlb"], p2["vlb"])
                l1.sum().backward()
                l2.sum().backward()
                assert torch.equal(o1.grad, o2.grad)
    three = out[:, :3]
    assert torch.equal(D.training_losses(sched, three, x0, x_t, t, noise, loss_type="mse"),
                       reference_training_losses(sched, three, x0, x_t, t, noise, loss_type="mse"))


@pytest.mark.parametrize("loss_type", ["hybrid", "mse"])
def test_v_prediction_loss_is_the_eps_loss_of_the_same_prediction(sched, loss_type):
    """A v output and the eps it implies (eps_from_v) predict the same x_0: the VLB term is the same bit for bit (it
    reads that eps); unweighted, v-MSE = eps-MSE / abar_t; min-SNR and soft min-SNR weight the two alike. t up to 990:
    there abar_t = 2e-4, and the eps error sqrt(abar) (v - v_hat) stands ~1e-2 above eps's float32 rounding, so the
    ratio holds to ~1e-5 (rel 1e-4 asserted); at 999 (abar 2e-9) float32 cannot carry it."""
    t = torch.tensor([0, 1, 250, 500, 900, 990])
    x0, noise, out = loss_inputs(t, seed=11)
    x_t = D.q_sample(sched, x0, noise, t)
    v_out = out.clone()
    v_out[:, :3] = D.v_target(sched, x0, noise, t) + 0.3 * out[:, :3]  # v, off by an O(1) error
    eps_out = torch.cat([D.eps_from_v(sched, x_t, t, v_out[:, :3]), v_out[:, 3:]], 1)
    a = sched.alphas_cumprod[t]
    for weights in (dict(), dict(snr_gamma=5.0), dict(snr_gamma=0.5), dict(use_soft_min_snr=True)):
        kw = dict(loss_type=loss_type, return_terms=True, **weights)
        _, v_terms = D.training_losses(sched, v_out, x0, x_t, t, noise, prediction_type="v_prediction", **kw)
        _, eps_terms = D.training_losses(sched, eps_out, x0, x_t, t, noise, **kw)
        assert torch.equal(v_terms["vlb"], eps_terms["vlb"])
        want = eps_terms["mse"] / a if not weights else eps_terms["mse"]
        torch.testing.assert_close(v_terms["mse"], want, rtol=1e-4, atol=0)
    exact = torch.cat([D.v_target(sched, x0, noise, t), out[:, 3:]], 1)
    for kind in ("mse", "huber"):  # the exact v has no eps (or v) term: the target is v, not noise
        _, terms = D.training_losses(sched, exact, x0, x_t, t, noise, loss_type=kind, prediction_type="v_prediction",
                                     return_terms=True)
        assert torch.equal(terms["mse"], torch.zeros(len(t)))
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        D.training_losses(sched, out, x0, x_t, t, noise, prediction_type="sample")


# ---- offset noise and input perturbation -----------------------------------------------------


def per_rank(fn, world: int, batch: int, seed: int = 3) -> torch.Tensor:
    """What `world` processes draw as train.py's model_inputs does: each seeds the same generator, draws the global
    batch's noise, applies `fn` to it, keeps its own rows. The ranks' rows, concatenated."""
    rows = []
    for rank in range(world):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((batch * world, 3, 4, 4), generator=g)
        rows.append(fn(noise, g)[rank * batch : (rank + 1) * batch])
    return torch.cat(rows)


def test_offset_noise_formula(sched):
    noise = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    got = D.offset_noise(noise, 0.1, 1.0, g)
    z = torch.randn((6, 3, 1, 1), generator=torch.Generator().manual_seed(1))  # the first draw: z of [B, C, 1, 1]
    diff = got - noise
    for b in range(6):
        for c in range(3):
            v = diff[b, c].flatten().tolist()
            assert max(v) - min(v) < 1e-6  # one constant per sample and channel
            close(v[0], 0.1 * z[b, c, 0, 0].item(), rel=1e-5)
    assert torch.equal(D.offset_noise(noise, 0.1, 0.0, torch.Generator().manual_seed(1)), noise)
    assert torch.equal(D.offset_noise(noise, 0.0, 1.0, torch.Generator().manual_seed(1)), noise)
    # per sample: about p of the rows are offset, the others untouched
    big = torch.zeros(4000, 3, 2, 2)
    shifted = (D.offset_noise(big, 0.1, 0.25, torch.Generator().manual_seed(2)) != 0).any(dim=(1, 2, 3))
    assert 0.22 < shifted.float().mean() < 0.28
    full = D.offset_noise(big, 0.1, 1.0, torch.Generator().manual_seed(2))[:, :, 0, 0]
    assert 0.095 < full.std() < 0.105  # offset * N(0, 1)
    # the draws do not depend on the probability: rows offset under both p get the same offset
    lo = D.offset_noise(big, 0.1, 0.3, torch.Generator().manual_seed(2))
    hi = D.offset_noise(big, 0.1, 0.7, torch.Generator().manual_seed(2))
    both = (lo != 0).any(dim=(1, 2, 3))
    assert both.sum() > 1000 and torch.equal(lo[both], hi[both]) and torch.equal(lo[both], full.view(4000, 3, 1, 1)
                                                                                 .expand(-1, -1, 2, 2)[both])
    with pytest.raises(ValueError, match="noise_offset_probability"):
        D.offset_noise(noise, 0.1, 1.5)
    with pytest.raises(ValueError, match="noise_offset must be"):
        D.offset_noise(noise, -0.1)


def test_input_perturbation_formula(sched):
    noise = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    got = D.input_perturbation(noise, 0.1, torch.Generator().manual_seed(4))
    xi = torch.randn(noise.shape, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, noise + 0.1 * xi)
    assert 0.095 < (got - noise).std() < 0.105
    assert torch.equal(D.input_perturbation(noise, 0.0, torch.Generator().manual_seed(4)), noise)
    # x_t from the perturbed noise, the target the original: a model that predicts the noise x_t was made with
    # loses gamma^2 mean(xi^2), one that predicts the original noise loses 0
    t = torch.full((8,), 300)
    x0 = torch.zeros_like(noise)
    x_t = D.q_sample(sched, x0, got, t)
    on_input = D.training_losses(sched, got, x0, x_t, t, noise, loss_type="mse")
    torch.testing.assert_close(on_input, 0.01 * (xi**2).mean(dim=(1, 2, 3)))
    assert D.training_losses(sched, noise, x0, x_t, t, noise, loss_type="mse").abs().max() == 0
    with pytest.raises(ValueError, match="input_perturbation must be"):
        D.input_perturbation(noise, -0.1)


def test_input_perturbation_decay():
    assert D.input_perturbation_at(0.1, 5000) == 0.1  # steps = 0: constant
    close(D.input_perturbation_at(0.1, 25, 100), 0.075)
    assert D.input_perturbation_at(0.1, 0, 100) == 0.1
    assert D.input_perturbation_at(0.1, 100, 100) == 0 and D.input_perturbation_at(0.1, 150, 100) == 0


@pytest.mark.parametrize("name", ["offset", "perturbation", "both"])
def test_noise_options_reproduce_and_are_rank_independent(name):
    fns = {
        "offset": lambda n, g: D.offset_noise(n, 0.1, 0.5, g),
        "perturbation": lambda n, g: D.input_perturbation(n, 0.1, g),
        "both": lambda n, g: D.input_perturbation(D.offset_noise(n, 0.1, 0.5, g), 0.1, g),
    }
    fn = fns[name]
    one = per_rank(fn, world=1, batch=8)
    assert torch.equal(one, per_rank(fn, world=1, batch=8))  # same seed, same draws
    assert not torch.equal(one, per_rank(fn, world=1, batch=8, seed=4))
    for world in (2, 4):
        assert torch.equal(per_rank(fn, world=world, batch=8 // world), one)  # N processes see what one would
    # and not trivially: drawing for the local batch only would give rank 1 other noise
    g = torch.Generator().manual_seed(3)
    local = fn(torch.randn((4, 3, 4, 4), generator=g), g)
    assert not torch.equal(local, one[4:])
