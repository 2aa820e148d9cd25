"""diffusion.py against diffusers' DDPMScheduler (the oracle), plus closed forms for the hybrid loss."""

import math

import pytest
import torch

import diffusion as D


def reference(**kw):
    """DDPMScheduler configured as IF's scheduler/scheduler_config.json."""
    from diffusers import DDPMScheduler

    cfg = dict(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
        clip_sample=True, dynamic_thresholding_ratio=0.95, variance_type="learned_range",
    )
    return DDPMScheduler(**{**cfg, **kw})


@pytest.fixture(scope="module")
def sched():
    return D.Schedule()


# ---- schedule and forward process -------------------------------------------------------------


def test_schedule_is_bit_equal_to_diffusers(sched):
    ref = reference()
    assert sched.betas.dtype == sched.alphas_cumprod.dtype == torch.float32
    assert torch.equal(sched.betas, ref.betas)
    assert torch.equal(sched.alphas_cumprod, ref.alphas_cumprod)
    assert sched.get("alphas_cumprod", "cpu") is sched.get("alphas_cumprod", torch.device("cpu"))  # cached


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_sample_equals_add_noise(sched, dtype):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 3, 8, 8, generator=g).mul(2).sub(1).to(dtype)
    noise = torch.randn(5, 3, 8, 8, generator=g).to(dtype)
    t = torch.tensor([0, 1, 250, 998, 999])
    assert torch.equal(D.q_sample(sched, x0, noise, t), reference().add_noise(x0, noise, t))


def test_x0_and_eps_conversions_invert_q_sample(sched):
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 900])
    x_t = D.q_sample(sched, x0, noise, t)
    torch.testing.assert_close(D.x0_from_eps(sched, x_t, t, noise), x0, atol=1e-4, rtol=0)
    torch.testing.assert_close(D.eps_from_x0(sched, x_t, t, x0), noise, atol=1e-4, rtol=0)


def alphas_cumprod_float64():
    """alpha-bar accumulated in float64 from diffusers' betas: differencing the float32 alpha-bar would
    lose ~3 digits of beta_t at small t."""
    return torch.cumprod(1 - reference().betas.double(), dim=0)


def test_posterior_matches_ddpm_eq7_in_float64(sched):
    a = alphas_cumprod_float64()
    g = torch.Generator().manual_seed(2)
    x0, x_t = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([1, 2, 400, 999])
    a_t, a_p = a[t].view(-1, 1, 1, 1), a[t - 1].view(-1, 1, 1, 1)
    beta = 1 - a_t / a_p
    mean = a_p.sqrt() * beta / (1 - a_t) * x0.double() + (1 - beta).sqrt() * (1 - a_p) / (1 - a_t) * x_t.double()
    log_var = (beta * (1 - a_p) / (1 - a_t)).log()
    got_mean, got_log_var = D.q_posterior(sched, x0, x_t, t)
    torch.testing.assert_close(got_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_log_var.double(), log_var, rtol=1e-5, atol=0)
    # t = 0: the posterior variance is 0, so its log is taken from t = 1 (improved DDPM's clipping)
    _, log_var0 = D.q_posterior(sched, x0, x_t, torch.tensor([0, 1, 0, 1]))
    assert torch.equal(log_var0[0], log_var0[1])


# ---- timesteps ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 27, 48, 50, 61, 100, 1000])
def test_spacings_equal_set_timesteps(spacing, steps):
    ref = reference(timestep_spacing=spacing)
    ref.set_timesteps(steps)
    ours = D.timesteps_for(spacing, steps=steps)
    assert ours == ref.timesteps.tolist()[:steps]
    # diffusers' trailing spacing gives 62 steps for 61, the last one t=-1; we stop at 61
    assert len(ours) == steps and ours[-1] >= 0


def test_named_respacings_equal_diffusers_lists():
    from diffusers.pipelines.deepfloyd_if import timesteps as lists

    for name in D.IF_RESPACINGS:
        assert D.timesteps_for(name, steps=100) == getattr(lists, f"{name}_timesteps"), name  # steps is ignored


def test_explicit_timesteps_and_errors():
    assert D.timesteps_for([999, 500, 3]) == [999, 500, 3]
    assert D.timesteps_for("999, 500,0") == [999, 500, 0]
    for bad in ([500, 999], [999, 999, 0], [1000, 0], [10, -1], [], [999.5, 0]):
        with pytest.raises(ValueError, match="timesteps"):
            D.timesteps_for(bad)
    with pytest.raises(ValueError, match="smart100"):  # an unknown name lists the known ones
        D.timesteps_for("smart99")
    for steps in (None, 0, 1001):
        with pytest.raises(ValueError, match="needs steps"):
            D.timesteps_for("leading", steps=steps)
    with pytest.raises(ValueError, match="cannot take"):
        D.space_timesteps(10, "6,6")


# ---- the sampler step ---------------------------------------------------------------------------


def step_inputs(t, seed=0, channels=6):
    """x_t made from a known x_0 slightly outside [-1, 1], eps near the true noise: the 0.95-quantile of
    |x_0| then lies between 1 and 1.5, so thresholding is neither a no-op nor saturated."""
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.rand(3, 3, 16, 16, generator=g) * 2 - 1) * torch.tensor([1.0, 1.2, 1.6]).view(3, 1, 1, 1)
    noise = torch.randn(3, 3, 16, 16, generator=g)
    a = reference().alphas_cumprod[t]
    x_t = a**0.5 * x0 + (1 - a) ** 0.5 * noise
    eps = noise + 0.05 * torch.randn(3, 3, 16, 16, generator=g)
    v = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    return torch.cat([eps, v], 1)[:, :channels], x_t


def reference_step(variance, thresholding, timesteps, t, model_output, x_t, seed, prediction_type="epsilon"):
    ref = reference(
        variance_type=variance, thresholding=thresholding is not None,
        sample_max_value=thresholding[1] if thresholding else 1.0, prediction_type=prediction_type,
    )
    ref.set_timesteps(timesteps=timesteps)
    g = torch.Generator().manual_seed(seed)
    return ref.step(model_output, t, x_t, generator=g).prev_sample, g


STEP_CASES = [
    ("learned_range", (0.95, 1.5)),  # stage I
    ("learned_range", (0.95, 1.0)),  # stage II
    ("learned_range", None),  # plain clipping
    ("fixed_small", (0.95, 1.5)),
    ("fixed_small", None),
]


@pytest.mark.parametrize("variance,thresholding", STEP_CASES)
# first (t=999), middle and last (t=0) steps of a respaced list; a leading step; and trailing's last step
# (t=9 -> -1, where beta-tilde is 0 and only its 1e-20 floor keeps the log finite)
@pytest.mark.parametrize("spec,index", [("smart27", 0), ("smart27", 13), ("smart27", 26), ("leading", 37),
                                        ("trailing", 99)])
def test_step_equals_ddpm_scheduler_step(sched, variance, thresholding, spec, index):
    timesteps = D.timesteps_for(spec, steps=100)
    t = timesteps[index]
    prev_t = timesteps[index + 1] if index + 1 < len(timesteps) else -1
    model_output, x_t = step_inputs(t, channels=6 if variance == "learned_range" else 3)
    expected, g_ref = reference_step(variance, thresholding, timesteps, t, model_output, x_t, seed=7)
    g = torch.Generator().manual_seed(7)
    got = D.p_sample_step(sched, model_output, t, prev_t, x_t, variance=variance, thresholding=thresholding,
                          generator=g)
    assert torch.equal(got, expected)
    assert torch.equal(g.get_state(), g_ref.get_state())  # the same draws were taken (none at t=0)
    if variance == "fixed_small":  # a 6-channel output is accepted and its v channels ignored
        full, _ = step_inputs(t, channels=6)
        got6 = D.p_sample_step(sched, full, t, prev_t, x_t, variance=variance, thresholding=thresholding,
                               generator=torch.Generator().manual_seed(7))
        assert torch.equal(got6, expected)


@pytest.mark.parametrize("variance,thresholding", STEP_CASES[1:2] + STEP_CASES[3:])
@pytest.mark.parametrize("index", [0, 13, 26])
def test_v_prediction_step_equals_ddpm_scheduler_step(sched, variance, thresholding, index):
    """The first C channels read as v (x_0 = sqrt(abar) x_t - sqrt(1 - abar) v, then thresholded or clipped), bit for
    bit as diffusers reads them."""
    timesteps = D.timesteps_for("smart27")
    t, prev_t = timesteps[index], timesteps[index + 1] if index + 1 < len(timesteps) else -1
    model_output, x_t = step_inputs(t, channels=6 if variance == "learned_range" else 3)
    a = reference().alphas_cumprod[t]
    model_output[:, :3] = a**0.5 * model_output[:, :3] - (1 - a) ** 0.5 * x_t  # some output of the size of a v
    expected, _ = reference_step(variance, thresholding, timesteps, t, model_output, x_t, 7, "v_prediction")
    got = D.p_sample_step(sched, model_output, t, prev_t, x_t, variance=variance, thresholding=thresholding,
                          prediction_type="v_prediction", generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, expected)
    eps_read = D.p_sample_step(sched, model_output, t, prev_t, x_t, variance=variance, thresholding=thresholding,
                               generator=torch.Generator().manual_seed(7))
    assert not torch.equal(eps_read, expected)  # the prediction type is not ignored


def test_v_target_and_its_eps_are_diffusers_velocity_and_invert_q_sample(sched):
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1, torch.randn(5, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 900, 999])
    assert torch.equal(D.v_target(sched, x0, noise, t), reference().get_velocity(x0, noise, t))
    x_t = D.q_sample(sched, x0, noise, t)
    # eps = sqrt(abar) v + sqrt(1 - abar) x_t: each term is O(1) in float32, so the sum is good to a few ulp
    torch.testing.assert_close(D.eps_from_v(sched, x_t, t, D.v_target(sched, x0, noise, t)), noise, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variance", ["learned_range", "fixed_small"])
def test_bf16_step_equals_ddpm_scheduler_step(sched, variance):
    """Half-precision sampling: noise is drawn in the output's dtype, the quantile taken in float32."""
    timesteps = D.timesteps_for("smart50")
    model_output, x_t = step_inputs(timesteps[20], channels=6 if variance == "learned_range" else 3)
    model_output, x_t = model_output.bfloat16(), x_t.bfloat16()
    expected, _ = reference_step(variance, (0.95, 1.5), timesteps, timesteps[20], model_output, x_t, seed=9)
    got = D.p_sample_step(sched, model_output, timesteps[20], timesteps[21], x_t, variance=variance,
                          thresholding=(0.95, 1.5), generator=torch.Generator().manual_seed(9))
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_step_thresholding_and_t0(sched):
    model_output, x_t = step_inputs(0)
    a = lambda th, seed: D.p_sample_step(sched, model_output, 0, -1, x_t, thresholding=th,
                                         generator=torch.Generator().manual_seed(seed))
    assert torch.equal(a((0.95, 1.5), 0), a((0.95, 1.5), 1))  # t=0: no noise, the seed is irrelevant
    assert not torch.equal(a((0.95, 1.5), 0), a((0.95, 1.0), 0))  # sample_max_value matters here
    assert not torch.equal(a((0.95, 1.5), 0), a(None, 0))  # thresholding differs from clipping...
    assert torch.equal(a((0.95, 1.0), 0), a(None, 0))  # ...except with stage II's max 1.0, where s is always 1


def test_step_rejects_wrong_channels(sched):
    model_output, x_t = step_inputs(500, channels=3)
    with pytest.raises(ValueError, match="fixed_small"):
        D.p_sample_step(sched, model_output, 500, 490, x_t, variance="learned_range")
    with pytest.raises(ValueError, match="variance must be"):
        D.p_sample_step(sched, model_output, 500, 490, x_t, variance="fixed_large")


@pytest.mark.parametrize("variance", ["learned_range", "fixed_small"])
def test_twenty_step_loop_matches_diffusers_with_one_generator(sched, variance):
    from diffusers.utils.torch_utils import randn_tensor

    def fake_unet(x, t):  # deterministic, so both loops see the same outputs for the same inputs
        out = torch.cat([torch.tanh(0.9 * x + t / 1000), torch.sin(3 * x + t)], 1)
        return out if variance == "learned_range" else out[:, :3]

    ref = reference(variance_type=variance, thresholding=True, sample_max_value=1.5)
    ref.set_timesteps(20)
    g_ref, g = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x_ref = randn_tensor((2, 3, 16, 16), generator=g_ref)
    x = D.randn((2, 3, 16, 16), g)
    assert torch.equal(x, x_ref)
    timesteps = D.timesteps_for("leading", steps=20)
    assert timesteps == ref.timesteps.tolist()
    for t, prev_t in zip(timesteps, timesteps[1:] + [-1]):
        x_ref = ref.step(fake_unet(x_ref, t), t, x_ref, generator=g_ref).prev_sample
        x = D.p_sample_step(sched, fake_unet(x, t), t, prev_t, x, variance=variance, thresholding=(0.95, 1.5),
                            generator=g)
        assert torch.equal(x, x_ref), t


def test_randn_with_per_sample_generators_matches_diffusers():
    from diffusers.utils.torch_utils import randn_tensor

    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]
    assert torch.equal(D.randn((2, 3, 4, 4), gens()), randn_tensor((2, 3, 4, 4), generator=gens()))


# ---- training losses ----------------------------------------------------------------------------


def test_normal_kl_closed_form():
    g = torch.Generator().manual_seed(4)
    m1, m2, lv1, lv2 = torch.randn(4, 100, generator=g, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(D.normal_kl(m1, lv1, m2, lv2), expected)


def loss_inputs(t, seed=5):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 256, (len(t), 3, 8, 8), generator=g) / 127.5 - 1  # 8-bit pixels in [-1, 1]
    noise = torch.randn(len(t), 3, 8, 8, generator=g)
    out = torch.cat([noise + 0.3 * torch.randn_like(noise), torch.rand(len(t), 3, 8, 8, generator=g) * 2 - 1], 1)
    return x0, noise, out


def test_vlb_equals_kl_computed_independently(sched):
    """L_{t-1} for t > 0 against a float64 derivation from DDPM eqs. 4, 7, 15 and improved DDPM eq. 15,
    with the KL from torch.distributions, on diffusers' alpha-bar."""
    t = torch.tensor([1, 3, 50, 500, 999])
    x0, noise, out = loss_inputs(t)
    x_t = D.q_sample(sched, x0, noise, t)
    a = alphas_cumprod_float64()
    a_t, a_p = a[t].view(-1, 1, 1, 1), a[t - 1].view(-1, 1, 1, 1)
    beta, x0d, x_td = 1 - a_t / a_p, x0.double(), x_t.double()
    post_mean = lambda x: a_p.sqrt() * beta / (1 - a_t) * x + (1 - beta).sqrt() * (1 - a_p) / (1 - a_t) * x_td
    x0_hat = (x_td - (1 - a_t).sqrt() * out[:, :3].double()) / a_t.sqrt()
    frac = (out[:, 3:].double() + 1) / 2
    log_post_var = (beta * (1 - a_p) / (1 - a_t)).log()
    model_std = (0.5 * (frac * beta.log() + (1 - frac) * log_post_var)).exp()
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(post_mean(x0d), (0.5 * log_post_var).exp().expand_as(x0d)),
        torch.distributions.Normal(post_mean(x0_hat), model_std),
    )
    expected = kl.mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(D.vlb_bpd(sched, out, x0, x_t, t).double(), expected, rtol=2e-4, atol=1e-6)


def test_decoder_nll_is_a_normalised_discrete_distribution():
    bins = torch.arange(256, dtype=torch.float32) / 127.5 - 1  # every 8-bit value
    for mean, log_scale in [(0.3, math.log(0.05)), (-0.99, math.log(0.2)), (0.0, math.log(2.0))]:
        p = D.discretized_gaussian_log_likelihood(bins, torch.tensor(mean), torch.tensor(log_scale)).exp()
        torch.testing.assert_close(p.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    # a sharp Gaussian centred on the pixel puts all its mass in that pixel's bin
    centred = D.discretized_gaussian_log_likelihood(bins, bins, torch.full_like(bins, math.log(1e-4)))
    assert centred.abs().max() < 1e-6


def test_vlb_vanishes_at_the_true_posterior(sched):
    """eps = the true noise gives the true posterior mean; v = -1 gives log-variance = log beta-tilde_t."""
    t = torch.tensor([1, 2, 10, 300, 700, 999])
    x0, noise, _ = loss_inputs(t)
    x_t = D.q_sample(sched, x0, noise, t)
    out = torch.cat([noise, -torch.ones_like(noise)], 1)
    vlb = D.vlb_bpd(sched, out, x0, x_t, t)
    assert vlb.abs().max() < 1e-5, vlb
    # and it is clearly positive once the variance is wrong
    assert (D.vlb_bpd(sched, torch.cat([noise, torch.ones_like(noise)], 1), x0, x_t, t)[:3] > 1e-3).all()


def test_vlb_gradient_reaches_only_the_variance_channels(sched):
    t = torch.tensor([0, 1, 400, 999])
    x0, noise, out = loss_inputs(t)
    x_t = D.q_sample(sched, x0, noise, t)
    out.requires_grad_(True)
    D.vlb_bpd(sched, out, x0, x_t, t).sum().backward()
    assert torch.equal(out.grad[:, :3], torch.zeros_like(out.grad[:, :3]))
    assert (out.grad[:, 3:].abs().sum(dim=(1, 2, 3)) > 0).all()  # every sample, t = 0 included
    # in the hybrid loss, the eps channels get exactly the MSE gradient
    hybrid_grad = torch.autograd.grad(D.training_losses(sched, out, x0, x_t, t, noise).sum(), out)[0]
    mse_grad = torch.autograd.grad(D.training_losses(sched, out, x0, x_t, t, noise, loss_type="mse").sum(), out)[0]
    assert torch.equal(hybrid_grad[:, :3], mse_grad[:, :3])
    assert torch.equal(mse_grad[:, 3:], torch.zeros_like(mse_grad[:, 3:]))


def test_hybrid_loss_terms(sched):
    t = torch.tensor([0, 5, 500, 999])
    x0, noise, out = loss_inputs(t)
    x_t = D.q_sample(sched, x0, noise, t)
    plain_mse = torch.nn.functional.mse_loss(out[:, :3], noise, reduction="none").mean(dim=(1, 2, 3))
    torch.testing.assert_close(D.training_losses(sched, out, x0, x_t, t, noise, vlb_weight=0.0), plain_mse)
    torch.testing.assert_close(D.training_losses(sched, out, x0, x_t, t, noise, loss_type="mse"), plain_mse)
    loss, terms = D.training_losses(sched, out, x0, x_t, t, noise, vlb_weight=0.5, return_terms=True)
    vlb = D.vlb_bpd(sched, out, x0, x_t, t)  # T = 1000, so the T/1000 scale is 1
    torch.testing.assert_close(terms["vlb"], vlb)
    torch.testing.assert_close(loss, plain_mse + 0.5 * vlb)
    assert loss.shape == (4,)
    with pytest.raises(ValueError, match="loss_type='mse'"):  # a 3-channel model cannot learn a variance
        D.training_losses(sched, out[:, :3], x0, x_t, t, noise)
    torch.testing.assert_close(D.training_losses(sched, out[:, :3], x0, x_t, t, noise, loss_type="mse"), plain_mse)


def test_min_snr_gamma_weights(sched):
    t = torch.tensor([0, 100, 300, 600, 999])
    x0, noise, out = loss_inputs(t)
    x_t = D.q_sample(sched, x0, noise, t)
    a = reference().alphas_cumprod.double()[t]
    snr = a / (1 - a)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr
    kw = dict(loss_type="mse")
    weight = D.training_losses(sched, out, x0, x_t, t, noise, snr_gamma=5.0, **kw) / D.training_losses(
        sched, out, x0, x_t, t, noise, **kw
    )
    torch.testing.assert_close(weight.double(), expected, rtol=1e-5, atol=0)
    assert expected[0] < 1e-3 and expected[-1] == 1  # low noise is down-weighted, high noise untouched


@pytest.mark.parametrize("batch", [1, 3, 8, 7])
def test_stratified_timesteps_one_per_slice(batch):
    T = 1000
    for seed in range(20):
        t = D.sample_timesteps(batch, T, torch.Generator().manual_seed(seed), mode="stratified")
        assert t.dtype == torch.long and t.shape == (batch,)
        slices = (t * batch) // T  # which of the B equal slices each t falls in
        assert sorted(slices.tolist()) == list(range(batch))
    u = D.sample_timesteps(4096, T, torch.Generator().manual_seed(0))
    assert u.min() >= 0 and u.max() < T and len(u.unique()) > 900
    assert torch.equal(u, D.sample_timesteps(4096, T, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="uniform"):
        D.sample_timesteps(4, T, mode="sorted")
