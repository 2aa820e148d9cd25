"""DDPM math for DeepFloyd IF: the cosine schedule, q_sample, the sampler step and the hybrid loss.

Notation follows Ho et al. 2020 ("DDPM", arXiv:2006.11239) and Nichol & Dhariwal 2021 ("improved
DDPM", arXiv:2102.09672): `alphas_cumprod[t]` is alpha-bar_t, `x0` is x_0, `eps` is epsilon. IF's
U-Nets output 6 channels: epsilon (3) and v (3), where v in [-1, 1] interpolates the log-variance
between the posterior variance and beta_t ("learned_range", improved DDPM eq. 15).

The sampler reproduces diffusers' DDPMScheduler as IF ships it bit for bit (same float32 arithmetic,
same noise draws), so a seeded image made here is the image the diffusers pipeline would make. The
training loss follows improved DDPM's hybrid objective, as the original IF trainer used it; a pseudo-Huber
epsilon term, min-SNR and soft min-SNR weightings, offset noise and input perturbation are options beside it.

    sched = Schedule()                                  # 1000-step squaredcos_cap_v2
    noise = offset_noise(noise, 0.1, 0.25, g)           # optional, on the global batch's noise
    x_t = q_sample(sched, x0, noise, t)                 # training input (or from input_perturbation(noise, 0.1, g))
    loss = training_losses(sched, unet(x_t, t, emb), x0, x_t, t, noise)   # [B]
    ts = timesteps_for("smart100")                      # or ("leading", steps=100), or [999, ..., 0]
    for t, prev_t in zip(ts, ts[1:] + [-1]):
        x = p_sample_step(sched, unet(x, t, emb), t, prev_t, x, thresholding=(0.95, 1.5), generator=g)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# IF's named respacings: steps taken from each of N equal sections of [0, 1000) (deep-floyd/IF
# modules/base.py), expanded by `space_timesteps`. smart* are for stages I and II, super* for III.
IF_RESPACINGS = {
    "fast27": "10,10,3,2,2",
    "smart27": "7,4,2,1,2,4,7",
    "smart50": "10,6,4,3,2,2,3,4,6,10",
    "smart100": "1,1,1,1,2,2,2,2,2,2,3,3,4,4,5,5,6,7,7,8,9,10,13",
    "smart185": "1,1,2,2,2,3,3,3,4,5,6,7,8,9,10,11,12,13,14,15,16,18,20",
    "super27": "1,1,1,1,1,1,1,2,5,13",
    "super40": "2,2,2,2,2,2,3,4,6,15",
    "super100": "4,4,6,6,8,8,10,10,14,30",
}


# ---------------------------------------------------------------------------------------------
# the schedule


# The scheduler_config.json IF ships (diffusers' DDPMScheduler keys), less what differs by stage and training:
# scheduler_config(stage, variance) gives a stage's whole config. Written beside a fine-tuned unet/ so the folder
# samples as IF does, and used for weights that come without one.
IF_SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001, "beta_end": 0.02, "variance_type": "learned_range", "prediction_type": "epsilon",
    "thresholding": True, "dynamic_thresholding_ratio": 0.95, "clip_sample": True,
    "clip_sample_range": 1.0, "timestep_spacing": "leading", "steps_offset": 0,
}
IF_SAMPLE_MAX = {1: 1.5, 2: 1.0}  # dynamic thresholding's upper bound (sample_max_value), stage I and stage II


# What a U-Net's first C output channels predict: IF's weights predict epsilon; v (Salimans & Ho 2022,
# "Progressive Distillation", sec. 4) is v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, whose x_0 estimate stays well
# conditioned at the highest t, where one from epsilon divides the U-Net's error by sqrt(abar_t).
PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_prediction_type(prediction_type: str) -> None:
    """Refuse a prediction_type that is not one of PREDICTION_TYPES."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")


def scheduler_config(stage: int, variance: str = "learned_range", prediction_type: str = "epsilon") -> dict:
    """IF's scheduler config for `stage` (1 or 2), with `variance` as its variance_type and `prediction_type`."""
    return {**IF_SCHEDULER_CONFIG, "sample_max_value": IF_SAMPLE_MAX[stage], "variance_type": variance,
            "prediction_type": prediction_type}


LOSS_TYPES = ("hybrid", "mse", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def trains_variance(loss_type: str, out_channels: int = 6, channels: int = 3) -> bool:
    """Whether `training_losses` has the VLB term, the one that trains the variance channels v: "hybrid" always (it
    needs 2 * channels outputs), "huber" and "smooth_l1" when the U-Net has them (out_channels = 2 * channels, IF's
    6), "mse" never."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    return loss_type == "hybrid" or (loss_type in ("huber", "smooth_l1") and out_channels == 2 * channels)


def sampler_variance(loss_type: str, out_channels: int = 6) -> str:
    """The variance a model trained with `loss_type` samples with: where the loss has the VLB term (hybrid; huber and
    smooth_l1 on a U-Net with variance channels, as IF's 6-channel ones) the variance channels are trained, so IF's
    learned_range stays valid; an epsilon-only loss (mse, or any loss on a 3-channel U-Net) leaves them as they were
    or has none: fixed_small."""
    return "learned_range" if trains_variance(loss_type, out_channels) else "fixed_small"


def cosine_betas(num_train_timesteps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM eq. 17: alpha-bar(s) = cos((s + 0.008) / 1.008 * pi/2)^2, beta_i = 1 - abar(i+1)/abar(i),
    capped at 0.999. Computed in Python floats (float64) and stored as float32, as diffusers'
    `squaredcos_cap_v2` does, so the table is bit-identical to it. [T] float32."""
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    T = num_train_timesteps
    return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)], dtype=torch.float32)


class Schedule:
    """IF's noise schedule. `betas` and `alphas_cumprod` ([T] float32, on the CPU) equal diffusers'
    DDPMScheduler(beta_schedule="squaredcos_cap_v2") bit for bit: the sampler step does its scalar
    arithmetic on them in float32, exactly as diffusers does.

    The training loss instead gathers per-step tables with a [B] tensor of timesteps; those are
    computed once in float64 (as improved DDPM does) and cached per device by `get`, so a training
    step does no host->device copy.

    `betas` ([T]) gives another schedule (the x4 upscaler's scaled_linear one, say); by default IF's cosine."""

    def __init__(self, num_train_timesteps: int = 1000, betas: torch.Tensor | None = None):
        T = self.num_train_timesteps = num_train_timesteps
        self.betas = cosine_betas(T) if betas is None else betas.float()  # [T] float32
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # [T] float32, accumulated in float32
        self.one = torch.tensor(1.0)  # alpha-bar "before" t=0: the step after the last one lands on x_0
        b = self.betas.double()
        a = torch.cumprod(1.0 - b, dim=0)
        a_prev = torch.cat([torch.ones(1, dtype=b.dtype), a[:-1]])
        post_var = b * (1.0 - a_prev) / (1.0 - a)  # DDPM eq. 7 beta-tilde_t; 0 at t=0
        self._tables = {
            "alphas_cumprod": self.alphas_cumprod,
            "log_betas": b.log().float(),
            # log beta-tilde_t with t=0 replaced by t=1 (beta-tilde_0 = 0 has no log), as improved DDPM does
            "posterior_log_variance_clipped": torch.cat([post_var[1:2], post_var[1:]]).log().float(),
            "posterior_mean_coef1": (b * a_prev.sqrt() / (1.0 - a)).float(),  # DDPM eq. 7, x_0's weight
            "posterior_mean_coef2": ((1.0 - a_prev) * (1.0 - b).sqrt() / (1.0 - a)).float(),  # x_t's weight
        }
        self._on: dict = {}

    def get(self, name: str, device: torch.device | str) -> torch.Tensor:
        """A [T] float32 table on `device`, copied there once and then cached."""
        key = (name, torch.device(device))
        if key not in self._on:
            self._on[key] = self._tables[name].to(key[1])
        return self._on[key]


def _at(sched: Schedule, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] shaped [B, 1, 1, 1] to broadcast against `like` ([B, C, H, W]); t is [B], 0-d or an int. (index_select,
    not table[t]: a 0-d index tensor would be read on the host, which fake tensors of the dry run cannot do.)"""
    t = torch.as_tensor(t, device=like.device).reshape(-1)
    return sched.get(name, like.device).index_select(0, t).reshape(-1, *[1] * (like.ndim - 1))


def randn(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise drawn as diffusers' `randn_tensor` draws it, so seeded runs agree: on the
    generator's device (a CPU generator draws on the CPU, then the noise moves), one draw for the whole
    shape, or one draw per sample when `generator` is a list of per-sample generators."""
    device = torch.device(device or "cpu")
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    draw_on = "cpu" if generator is not None and generator.device.type == "cpu" else device
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)


# ---------------------------------------------------------------------------------------------
# the forward process and its posterior


def q_sample(sched: Schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """DDPM eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; t is [B] (or a scalar) long.
    Equals diffusers' `add_noise` bit for bit, dtype included: alpha-bar is cast to x0's dtype first, so
    pass float32 x0 and noise for a full-precision x_t."""
    a = _at(sched, "alphas_cumprod", t, x0).to(x0.dtype)  # [B,1,1,1]
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def low_res_condition(sched: Schedule, low_res: torch.Tensor, size, noise: torch.Tensor, level) -> torch.Tensor:
    """Stage II's input channels 3:6: the low-res image upsampled to `size` (H, W) (bilinear, align_corners=True,
    as IF's pipelines) and noised to `level` on the same schedule (noise conditioning augmentation, Ho et al. 2021
    "Cascaded Diffusion Models" sec. 3.2). Computed in low_res's dtype, on its device; noise is [B, 3, H, W]."""
    up = F.interpolate(low_res, size=tuple(size), mode="bilinear", align_corners=True)
    return q_sample(sched, up, noise, level)


def x0_from_eps(sched: Schedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """DDPM eq. 15 solved for x_0: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    a = _at(sched, "alphas_cumprod", t, x_t)
    return (x_t - (1 - a) ** 0.5 * eps) / a**0.5


def eps_from_x0(sched: Schedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """DDPM eq. 4 solved for eps: eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
    a = _at(sched, "alphas_cumprod", t, x_t)
    return (x_t - a**0.5 * x0) / (1 - a) ** 0.5


def v_target(sched: Schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, what a v_prediction U-Net learns (diffusers' get_velocity)."""
    a = _at(sched, "alphas_cumprod", t, x0)
    return a**0.5 * noise - (1 - a) ** 0.5 * x0


def eps_from_v(sched: Schedule, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The eps that v and x_t imply: eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t."""
    a = _at(sched, "alphas_cumprod", t, x_t)
    return a**0.5 * v + (1 - a) ** 0.5 * x_t


def q_posterior(sched: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    """DDPM eqs. 6-7, q(x_{t-1} | x_t, x_0) on the 1000-step training schedule: returns the mean
    mu-tilde_t [B,C,H,W] and the clipped log of beta-tilde_t [B,1,1,1]."""
    mean = _at(sched, "posterior_mean_coef1", t, x_t) * x0 + _at(sched, "posterior_mean_coef2", t, x_t) * x_t
    return mean, _at(sched, "posterior_log_variance_clipped", t, x_t)


def p_mean_log_variance(sched: Schedule, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    """The model's p(x_{t-1} | x_t) on the training schedule, improved DDPM eq. 15 (learned_range):
    log sigma_t^2 = frac log beta_t + (1 - frac) log beta-tilde_t with frac = (v + 1) / 2, and the mean
    mu-tilde_t(x_t, x_0) with x_0 from eps (DDPM eqs. 7, 15), unclipped as in training. model_output is
    [B, 6, H, W] (eps, v); returns (mean, log_variance), both [B, 3, H, W]."""
    eps, v = model_output.chunk(2, dim=1)
    mean, min_log = q_posterior(sched, x0_from_eps(sched, x_t, t, eps), x_t, t)
    frac = (v + 1) / 2
    return mean, frac * _at(sched, "log_betas", t, x_t) + (1 - frac) * min_log


# ---------------------------------------------------------------------------------------------
# sampling


def timesteps_for(spec, num_train_timesteps: int = 1000, steps: int | None = None) -> list[int]:
    """The descending timesteps a sampler visits. `spec` is one of:
    - "leading" (IF's default in diffusers), "trailing" or "linspace" with `steps`: equal to diffusers'
      `DDPMScheduler.set_timesteps(steps)` with that `timestep_spacing` (Lin et al. 2023, table 2);
    - an IF respacing name ("smart100", "fast27", ... see IF_RESPACINGS);
    - an explicit list of ints, or a string of comma-separated ints ("999,500,0").
    For names and lists `steps` is ignored, as the diffusers pipelines ignore it when given timesteps."""
    import numpy as np  # the float arithmetic of "trailing" must be numpy's to match diffusers exactly

    T = num_train_timesteps
    if isinstance(spec, str) and spec in ("leading", "trailing", "linspace"):
        if not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"timesteps={spec!r} needs steps, an int in [1, {T}]; got steps={steps!r}")
        if spec == "leading":  # every (T // steps)-th step from 0: 100 steps -> 990, 980, ..., 0
            return [i * (T // steps) for i in reversed(range(steps))]
        if spec == "linspace":
            return np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64).tolist()
        # trailing: T - 1 down in float strides of T/steps. numpy's arange gives one extra (-1) step for
        # some counts (61, 103, ...) where diffusers then visits t=-1; we keep the first `steps`.
        return (np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1)[:steps].tolist()
    if isinstance(spec, str) and spec in IF_RESPACINGS:
        return space_timesteps(T, IF_RESPACINGS[spec])
    if isinstance(spec, str):
        try:
            spec = [int(s) for s in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"timesteps={spec!r}: use 'leading', 'trailing', 'linspace', one of {', '.join(IF_RESPACINGS)}, "
                "or descending comma-separated ints like '999,500,0'"
            ) from None
    ts = [int(t) for t in spec]
    if any(a != b for a, b in zip(ts, spec)):
        raise ValueError(f"timesteps must be integers, got {list(spec)}")
    if not ts or any(b >= a for a, b in zip(ts, ts[1:])) or ts[0] >= T or ts[-1] < 0:
        raise ValueError(f"timesteps {ts} must be non-empty, strictly descending, within [0, {T}); e.g. [999, 500, 0]")
    return ts


def space_timesteps(num_train_timesteps: int, section_counts: str) -> list[int]:
    """IF's respacing (deep-floyd/IF respace.py): split [0, T) into len(counts) equal sections (the first
    T % n one step longer) and take counts[i] evenly strided steps from section i, first and last
    included. Returned descending, e.g. "7,4,2,1,2,4,7" -> smart27."""
    counts = [int(c) for c in section_counts.split(",")]
    size_per, extra = divmod(num_train_timesteps, len(counts))
    taken, start = set(), 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size} ({section_counts!r})")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        pos = 0.0
        for _ in range(count):  # accumulated, not i * stride: the rounding must match the original
            taken.add(start + round(pos))
            pos += stride
        start += size
    return sorted(taken, reverse=True)


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.95, max_value: float = 1.5) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, "Imagen", sec. 2.3): per sample, s = the `ratio`
    quantile of |x_0| clamped to [1, max_value]; x_0 = clamp(x_0, -s, s) / s. With s = 1 it is plain
    clipping. Quantiles are taken in float32 at least, as diffusers does."""
    B = x0.shape[0]
    flat = x0.reshape(B, -1)  # [B, C*H*W]
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)  # [B, 1]
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


def p_sample_step(
    sched: Schedule,
    model_output: torch.Tensor,
    t: int,
    prev_t: int,
    x_t: torch.Tensor,
    *,
    variance: str = "learned_range",
    thresholding: tuple[float, float] | None = None,
    clip_sample: bool = True,
    prediction_type: str = "epsilon",
    generator=None,
) -> torch.Tensor:
    """One ancestral step x_t -> x_{prev_t} (DDPM algorithm 2 over a respaced jump); equals diffusers'
    `DDPMScheduler.step` with IF's config bit for bit. `prev_t` is the next timestep visited, or -1
    after the last (then alpha-bar_prev = 1). The jump acts as one step with alpha_t = abar_t / abar_prev.

    model_output: [B, 2C, H, W] (eps, v) for "learned_range"; [B, C, H, W] or [B, 2C, H, W] for
    "fixed_small" (v is ignored). x_0 from eps (DDPM eq. 15), then `thresholding=(ratio, max_value)`
    (IF: (0.95, 1.5) for stage I, (0.95, 1.0) for stage II) or, without it, clipping to [-1, 1];
    mean from DDPM eq. 7; for t > 0 add sigma * z with z one `randn` of x_t's shape and
    model_output's dtype from `generator` (as diffusers draws it), where sigma^2 is beta-tilde (DDPM
    eq. 7, floored at 1e-20) for fixed_small, or improved DDPM eq. 15 between beta-tilde and beta for
    learned_range. All scalars are float32 0-d CPU tensors, as in diffusers: no copies, no syncs.
    prediction_type="v_prediction" reads the first C channels as v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
    (Salimans & Ho 2022, "Progressive Distillation", sec. 4) instead of eps."""
    t, prev_t = int(t), int(prev_t)
    C = x_t.shape[1]
    if variance not in ("learned_range", "fixed_small"):
        raise ValueError(f"variance must be 'learned_range' or 'fixed_small', got {variance!r}")
    if model_output.shape[1] not in ((2 * C,) if variance == "learned_range" else (C, 2 * C)):
        need = f"{2 * C} (eps, v)" if variance == "learned_range" else f"{C} (eps) or {2 * C} (eps, v)"
        raise ValueError(
            f"variance={variance!r} with a {C}-channel sample needs {need} model output channels, got "
            f"{model_output.shape[1]}; an eps-only model samples with variance='fixed_small'"
        )
    eps, v = model_output[:, :C], model_output[:, C:]

    a_t = sched.alphas_cumprod[t]
    a_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.one
    alpha = a_t / a_prev  # the jump's alpha_t
    beta = 1 - alpha  # the jump's beta_t

    if prediction_type == "v_prediction":
        x0 = a_t**0.5 * x_t - (1 - a_t) ** 0.5 * eps  # x_0 = sqrt(abar) x_t - sqrt(1 - abar) v
    else:
        check_prediction_type(prediction_type)
        x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5  # DDPM eq. 15
    if thresholding is not None:
        x0 = dynamic_threshold(x0, *thresholding)
    elif clip_sample:
        x0 = x0.clamp(-1, 1)
    mean = (a_prev**0.5 * beta) / (1 - a_t) * x0 + alpha**0.5 * (1 - a_prev) / (1 - a_t) * x_t  # DDPM eq. 7
    if t == 0:
        return mean  # the last step returns the mean, no noise

    z = randn(eps.shape, generator, eps.device, eps.dtype)
    posterior_var = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)  # beta-tilde; 0 when prev_t = -1
    if variance == "fixed_small":
        return mean + posterior_var**0.5 * z
    frac = (v + 1) / 2  # improved DDPM eq. 15
    log_var = frac * beta.log() + (1 - frac) * posterior_var.log()
    return mean + torch.exp(0.5 * log_var) * z


# ---------------------------------------------------------------------------------------------
# training


def sample_timesteps(batch: int, num_train_timesteps: int = 1000, generator=None, mode: str = "uniform", device=None):
    """t for a batch, [B] long on `device`, drawn on the generator's device. "uniform": i.i.d. in
    [0, T). "stratified": one t in each of B equal slices of [0, T) (lower-variance loss estimate), then
    shuffled so each sample's t is still uniform in [0, T)."""
    T = num_train_timesteps
    on = generator.device if generator is not None else torch.device(device or "cpu")
    if mode == "uniform":
        t = torch.randint(0, T, (batch,), generator=generator, device=on)
    elif mode == "stratified":
        if batch > T:
            raise ValueError(f"stratified timesteps need batch <= {T}, got {batch}; use mode='uniform'")
        i = torch.arange(batch + 1, device=on)
        edges = i * T // batch  # [B+1] integer slice edges
        u = torch.rand(batch, generator=generator, device=on, dtype=torch.float64)
        t = edges[:-1] + (u * (edges[1:] - edges[:-1])).long()
        t = t[torch.randperm(batch, generator=generator, device=on)]
    else:
        raise ValueError(f"timestep_sampling must be 'uniform' or 'stratified', got {mode!r}")
    return t.to(device or on)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """DDPM sec. 3.3 decoder: log of the Gaussian mass in x's 8-bit bin (width 2/255 in [-1, 1]; the edge
    bins extend to +-inf), elementwise in nats, with improved DDPM's tanh approximation of the normal CDF."""
    cdf = lambda y: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * y**3)))
    inv_std = torch.exp(-log_scale)
    cdf_plus = cdf(inv_std * (x - mean + 1 / 255))
    cdf_min = cdf(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vlb_bpd(sched: Schedule, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    """The VLB term L_t of DDPM eq. 5 in bits per dim, [B], with eps DETACHED, so its gradient reaches only
    the v channels (improved DDPM sec. 3.1): L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for
    t > 0 and the decoder NLL L_0 = -log p(x_0 | x_1) at t = 0. model_output is [B, 6, H, W]."""
    C = x_t.shape[1]
    frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
    mean, log_var = p_mean_log_variance(sched, frozen, x_t, t)
    true_mean, true_log_var = q_posterior(sched, x0, x_t, t)
    kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    return torch.where(t.to(kl.device) == 0, nll, kl)


def snr_at(sched: Schedule, t: torch.Tensor, device) -> torch.Tensor:
    """SNR_t = abar_t / (1 - abar_t) for each t, [B] float32 on `device` (Kingma et al. 2021, "Variational
    Diffusion Models", eq. 2 with alpha_t^2 = abar_t, sigma_t^2 = 1 - abar_t)."""
    a = sched.get("alphas_cumprod", device)[t.to(device)]
    return a / (1 - a)


def huber_c_at(sched: Schedule, t: torch.Tensor, huber_c: float = 0.1, schedule: str = "snr") -> torch.Tensor:
    """The pseudo-Huber threshold c for each t, [B] float32 on t's device (Khrapov et al. 2024, "Improving Diffusion
    Models's Data-Corruption Resistance using Scheduled Pseudo-Huber Loss", arXiv:2403.16728):
    "constant": huber_c. "exponential": huber_c ** (t / T), from 1 at t=0 to huber_c at t=T.
    "snr": (1 - huber_c) / (1 + sigma_t)^2 + huber_c with sigma_t = sqrt((1 - abar_t) / abar_t) = SNR_t^-1/2, near 1
    at low noise (the loss is about the MSE there) and down to huber_c at high noise (about L1, robust to outliers)."""
    if schedule not in HUBER_SCHEDULES:
        raise ValueError(f"huber_schedule must be one of {', '.join(HUBER_SCHEDULES)}; got {schedule!r}")
    if not huber_c > 0:
        raise ValueError(f"huber_c must be > 0, got {huber_c}")
    if schedule != "constant" and huber_c > 1:
        raise ValueError(f"huber_schedule={schedule!r} moves c from 1 at t=0 down to huber_c at t=T, so huber_c must "
                         f"be in (0, 1]; got {huber_c}. For a larger fixed c use huber_schedule='constant'")
    t = torch.as_tensor(t).reshape(-1)
    if schedule == "constant":
        return torch.full(t.shape, float(huber_c), device=t.device)
    if schedule == "exponential":
        return torch.exp(math.log(huber_c) / sched.num_train_timesteps * t.float())
    sigma = snr_at(sched, t, t.device) ** -0.5
    return (1 - huber_c) / (1 + sigma) ** 2 + huber_c


def pseudo_huber(residual: torch.Tensor, c: torch.Tensor | float, loss_type: str = "huber") -> torch.Tensor:
    """Elementwise pseudo-Huber loss of `residual` r (Charbonnier et al. 1994; Hartley & Zisserman, "Multiple View
    Geometry", 2nd ed.) with threshold c (a float, or a tensor broadcasting against r), scaled as Khrapov et al.
    2024 (arXiv:2403.16728): "huber": 2c (sqrt(r^2 + c^2) - c), about r^2 (the MSE) for |r| << c and 2c|r| for
    |r| >> c.
    "smooth_l1": the same divided by c, 2 (sqrt(r^2 + c^2) - c): about r^2 / c, then 2|r| (an L1 for any c; not
    torch's piecewise smooth_l1_loss). Computed as 2c r^2 / (sqrt(r^2 + c^2) + c), the same value without the
    cancellation of sqrt(r^2 + c^2) - c at small r."""
    if loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"pseudo_huber's loss_type must be 'huber' or 'smooth_l1', got {loss_type!r}")
    r2 = residual**2
    d = r2 / ((r2 + c**2) ** 0.5 + c)  # = sqrt(r^2 + c^2) - c
    return 2 * c * d if loss_type == "huber" else 2 * d


def soft_min_snr_weight(snr: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """The epsilon-loss weight of soft min-SNR (Crowson et al. 2024, "Hourglass Diffusion Transformers",
    arXiv:2401.11605): 1 / (1 + sigma_data^2 SNR_t).

    HDiT weights its Karras-preconditioned loss |F - F_target|^2 by (sigma sigma_data)^2 / (sigma^2 + sigma_data^2)^2
    (sigma the EDM noise level, F the network output of Karras et al. 2022, eq. 7). Since |F - F_target|^2 =
    |D - x_0|^2 / c_out^2 with c_out^2 = (sigma sigma_data)^2 / (sigma^2 + sigma_data^2), that is |D - x_0|^2 /
    (sigma^2 + sigma_data^2); with sigma^2 = 1 / SNR_t (x_t / sqrt(abar_t) = x_0 + sigma eps) and |D - x_0|^2 =
    sigma^2 |eps_theta - eps|^2 it is the weight above on the eps MSE. It is min-SNR-gamma (Hang et al. 2023) with the
    min of SNR and gamma replaced by a soft one, 1 / (1/SNR + 1/gamma), and gamma = 1 / sigma_data^2: about 1 where
    SNR_t << gamma and gamma / SNR_t where SNR_t >> gamma, as min(SNR_t, gamma) / SNR_t. sigma_data is the standard
    deviation of the training pixels (in [-1, 1]: about 0.5, the EDM/HDiT value; 1 gives gamma = 1)."""
    if not sigma_data > 0:
        raise ValueError(f"soft_min_snr_sigma_data must be > 0, got {sigma_data}")
    return 1 / (1 + sigma_data**2 * snr)


def offset_noise(noise: torch.Tensor, offset: float, probability: float = 1.0, generator=None) -> torch.Tensor:
    """Offset noise (Guttenberg 2023, "Diffusion with Offset Noise"): noise + offset * z, z ~ N(0, 1) of shape
    [B, C, 1, 1] (one constant per sample and channel), applied to each sample independently with `probability`.
    Returns the new noise, both q_sample's and the loss's target. Pass the *global* batch's noise: the draws (z of
    [B, C, 1, 1], then uniforms of [B]) come from `generator` with shapes fixed by `noise` alone, whatever
    `probability`, so every rank draws the same and slices its rows after.

    In pixel space it does what it does for latents. A channel's mean over H*W pixels is noised by the mean of the
    noise, whose variance is only 1 / (H*W), so that component keeps SNR_t * mean^2 * H*W: for a mean of 0.3 above 1
    up to t = 965 at 64 px and t = 990 at 256 px, although IF's cosine schedule itself ends at SNR = 2.4e-9 (SD's
    scaled-linear one at 0.0047). The model learns to read the image's mean colour off x_t at nearly every t and never
    to change it, and at sampling that mean is the starting noise's (27 'leading' steps start at t = 962). With
    offset 0.1 the mean's noise variance is 0.01 + 1/(H*W), 42 times larger at 64 px: it is destroyed as early as
    the details, and the model learns to pick brightness and colour itself."""
    if not offset >= 0:
        raise ValueError(f"noise_offset must be >= 0, got {offset}")
    if not 0 <= probability <= 1:
        raise ValueError(f"noise_offset_probability must be in [0, 1], got {probability}")
    B, C = noise.shape[:2]
    on = generator.device if generator is not None else noise.device
    z = torch.randn((B, C, 1, 1), generator=generator, device=on)
    use = torch.rand((B, 1, 1, 1), generator=generator, device=on) < probability
    return noise + (offset * z * use).to(noise.device, noise.dtype)


def input_perturbation(noise: torch.Tensor, gamma: float, generator=None) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion Models",
    arXiv:2301.11706, eq. 9 / algorithm 1): the noise that makes x_t = q_sample(x_0, noise + gamma * xi), xi ~ N(0, I)
    of noise's shape, while the loss's target stays `noise`. The model so meets inputs a little off the forward
    process, as its own samples are at inference. Returns noise + gamma * xi; pass the *global* batch's noise, xi is
    one draw of its shape from `generator` (every rank draws the same, then slices)."""
    if not gamma >= 0:
        raise ValueError(f"input_perturbation must be >= 0, got {gamma}")
    on = generator.device if generator is not None else noise.device
    xi = torch.randn(noise.shape, generator=generator, device=on)
    return noise + (gamma * xi).to(noise.device, noise.dtype)


def input_perturbation_at(gamma: float, step: int, steps: int = 0) -> float:
    """input_perturbation's gamma at optimizer step `step`: constant for steps = 0, else gamma * (1 - step / steps)
    for step < steps and 0 after (a linear decay, as SimpleTuner's input_perturbation_steps)."""
    if steps < 0:
        raise ValueError(f"input_perturbation_steps must be >= 0, got {steps}")
    return gamma if steps == 0 else gamma * max(0.0, 1 - step / steps)


def loss_options(cfg, weighted: bool = True) -> dict:
    """training_losses' keyword arguments from a config (config.Config: its options of the same names);
    `weighted=False` leaves the SNR weightings out (the held-out loss stays comparable across them)."""
    options = dict(loss_type=cfg.loss_type, vlb_weight=cfg.vlb_weight, huber_c=cfg.huber_c,
                   huber_schedule=cfg.huber_schedule, prediction_type=cfg.prediction_type)
    if weighted:
        options |= dict(snr_gamma=cfg.snr_gamma, use_soft_min_snr=cfg.use_soft_min_snr,
                        soft_min_snr_sigma_data=cfg.soft_min_snr_sigma_data)
    return options


def training_losses(
    sched: Schedule,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    *,
    loss_type: str = "hybrid",
    vlb_weight: float = 1.0,
    snr_gamma: float | None = None,
    huber_c: float = 0.1,
    huber_schedule: str = "snr",
    use_soft_min_snr: bool = False,
    soft_min_snr_sigma_data: float = 0.5,
    prediction_type: str = "epsilon",
    return_terms: bool = False,
):
    """Per-sample loss [B] for x_t = q_sample(sched, x0, noise_in, t), computed in float32; `noise` is the target
    (noise_in is noise itself, or `input_perturbation`'s). With prediction_type="v_prediction" the first C channels
    are v and their target is `v_target(sched, x0, noise, t)`: "the eps term" below is then the same term on v, its
    SNR weightings times SNR_t / (1 + SNR_t) (v-MSE = eps-MSE / abar_t, so that is the eps weighting's own weight on
    each t; min-SNR's becomes min(SNR_t, gamma) / (1 + SNR_t), Hang et al.'s for v), and the VLB term reads the
    mean from the eps that v implies (`eps_from_v`).

    The eps term, on the C eps channels (v channels, if any, get no gradient from it):
    "mse": L_simple, DDPM eq. 14: mean over C, H, W of (eps - eps_theta)^2. "hybrid": improved DDPM's L_hybrid =
    L_simple + lambda L_vlb (sec. 3.1) with lambda = 0.001 and L_vlb = T * L_t for the sampled t, i.e.
    L_simple + vlb_weight * (T / 1000) * vlb_bpd, the original IF trainer's scaling; it needs the 6-channel
    output and raises for a 3-channel one. "huber" / "smooth_l1": the mean of `pseudo_huber(eps_theta - eps, c_t)`
    instead of the MSE, c_t = `huber_c_at(sched, t, huber_c, huber_schedule)`; beside it the same VLB term as hybrid
    when the model outputs 6 channels (the variance stays learned, sample with learned_range), none for a 3-channel
    one (see `trains_variance`, `sampler_variance`).

    Weighting of the eps term (at most one): `snr_gamma` weights it by min(SNR_t, gamma) / SNR_t (min-SNR-gamma, Hang
    et al. 2023, eq. for eps prediction), SNR_t = abar_t / (1 - abar_t); `use_soft_min_snr` by 1 / (1 + sigma_data^2
    SNR_t) (`soft_min_snr_weight`). The VLB term is never weighted. With `return_terms` also returns {"mse": [B],
    "vlb": [B]} (detached) for logging; "mse" is the weighted eps term (the pseudo-Huber one for huber/smooth_l1)."""
    C = x0.shape[1]
    if model_output.shape[1] not in (C, 2 * C):
        raise ValueError(f"model output has {model_output.shape[1]} channels; expected {C} (eps) or {2 * C} (eps, v)")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    if loss_type == "hybrid" and model_output.shape[1] != 2 * C:
        raise ValueError(
            f"loss_type='hybrid' trains the variance channels, but the model outputs only {C} channels: "
            "use loss_type='mse' (and sample with variance='fixed_small')"
        )
    if snr_gamma is not None and not snr_gamma > 0:
        raise ValueError(f"snr_gamma={snr_gamma} would weight the loss by 0 or less; None turns min-SNR off")
    if snr_gamma is not None and use_soft_min_snr:
        raise ValueError(
            "snr_gamma and use_soft_min_snr are two weightings of the same term, and soft min-SNR is itself a soft "
            "min-SNR-gamma with gamma = 1 / soft_min_snr_sigma_data^2: set snr_gamma=None, or use_soft_min_snr=False"
        )
    check_prediction_type(prediction_type)
    out, x0, x_t, noise = model_output.float(), x0.float(), x_t.float(), noise.float()
    v_pred = prediction_type == "v_prediction"
    target = v_target(sched, x0, noise, t) if v_pred else noise
    if loss_type in ("huber", "smooth_l1"):
        c = huber_c_at(sched, t.to(x0.device), huber_c, huber_schedule).reshape(-1, 1, 1, 1)
        mse = pseudo_huber(out[:, :C] - target, c, loss_type).mean(dim=(1, 2, 3))  # [B], the eps (or v) term
    else:
        mse = ((target - out[:, :C]) ** 2).mean(dim=(1, 2, 3))  # [B]
    snr = snr_at(sched, t, x0.device) if snr_gamma is not None or use_soft_min_snr else None
    if snr_gamma is not None:
        mse = mse * snr.clamp(max=snr_gamma) / snr
    elif use_soft_min_snr:
        mse = mse * soft_min_snr_weight(snr, soft_min_snr_sigma_data)
    if v_pred and snr is not None:
        mse = mse * snr / (1 + snr)  # the eps weighting's weight per t, on v-MSE = eps-MSE / abar_t
    vlb = torch.zeros_like(mse)
    if trains_variance(loss_type, out.shape[1], C):
        if v_pred:
            out = torch.cat([eps_from_v(sched, x_t, t, out[:, :C]), out[:, C:]], dim=1)
        vlb = vlb_bpd(sched, out, x0, x_t, t) * (sched.num_train_timesteps / 1000.0)
    loss = mse + vlb_weight * vlb
    return (loss, {"mse": mse.detach(), "vlb": vlb.detach()}) if return_terms else loss
