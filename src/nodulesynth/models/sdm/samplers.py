"""Samplers as small pure functions (in the spirit of k-diffusion).

A sampler takes `model_fn(x, t_model) -> network output [B, C or 2C, H, W]` (float32), the full
`GaussianDiffusion`, the starting noise x_T, a step count and the `Noise` (a torch.Generator, or one
per sample; all randomness comes from it: same generator state, same images), and returns x_0 in [-1, 1].
`guided_model` turns the network and a one-hot map into such a model_fn with classifier-free
guidance.
"""

from typing import Sequence, Union

import numpy as np
import torch

from nodulesynth.errors import InputError
from nodulesynth.models.sdm.diffusion import GaussianDiffusion, split_output

# One generator for the whole batch, or one per sample (the sampling rules': noise independent of the batch).
Noise = Union[torch.Generator, Sequence[torch.Generator]]


def randn(shape, generator: Noise, device) -> torch.Tensor:
    """Normal noise drawn on the generator's device, then moved: a CPU generator gives the same
    numbers whatever device the model runs on. `generator`: one torch.Generator for the batch, or a
    sequence of them, one per sample (row i drawn from generator i), so that a sample's noise does not
    depend on the batch it is sampled in."""
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device).to(device)
    if len(generator) != shape[0]:
        raise InputError(f"{len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator]).to(device)


def guided_model(model, cond: torch.Tensor, guidance_scale: float = 1.0, channels: int = 1, null=None):
    """model_fn with classifier-free guidance: eps = eps(null) + s * (eps(map) - eps(null)).

    Both branches run in ONE forward pass on the batch [x; x] with maps [map; null]. The learned
    variance channel is taken from the conditional branch (as the SDM code does). s = 1 is the
    plain conditional model (one pass of batch B).
    """
    null = torch.zeros_like(cond) if null is None else null
    scale = float(guidance_scale)

    def model_fn(x, t):
        if scale == 1.0:
            return model(x, t, cond).float()
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null])).float()
        out_cond, out_null = out.chunk(2)
        eps = out_null[:, :channels] + scale * (out_cond[:, :channels] - out_null[:, :channels])
        return torch.cat([eps, out_cond[:, channels:]], dim=1)

    return model_fn


def _steps(x: torch.Tensor, i: int) -> torch.Tensor:
    return torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)


@torch.no_grad()
def sample_ddpm(model_fn, diffusion: GaussianDiffusion, x: torch.Tensor, steps: int,
                generator: Noise, clip_denoised: bool = True) -> torch.Tensor:
    """Ancestral sampling on a respaced schedule: x_{t-1} ~ N(mu_theta, Sigma_theta), with the
    learned variance interpolating the RESPACED beta and posterior variance."""
    spaced = diffusion.respaced(steps)
    channels = x.shape[1]
    for i in reversed(range(spaced.num_timesteps)):
        t = _steps(x, i)
        eps, v = split_output(model_fn(x, spaced.model_t(t)), channels)
        out = spaced.p_mean_variance(eps, v, x, t, clip_denoised)
        x = out["mean"]
        if i > 0:
            x = x + torch.exp(0.5 * out["log_variance"]) * randn(x.shape, generator, x.device)
    return x


@torch.no_grad()
def sample_ddim(model_fn, diffusion: GaussianDiffusion, x: torch.Tensor, steps: int,
                generator: Noise, eta: float = 0.0, clip_denoised: bool = True) -> torch.Tensor:
    """DDIM (Song et al. 2021) on a respaced schedule; eta = 0 is deterministic, eta = 1 ~ DDPM."""
    spaced = diffusion.respaced(steps)
    channels = x.shape[1]
    for i in reversed(range(spaced.num_timesteps)):
        t = _steps(x, i)
        eps, _ = split_output(model_fn(x, spaced.model_t(t)), channels)
        x0 = spaced.predict_x0_from_eps(x, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
            eps = spaced.predict_eps_from_x0(x, t, x0)  # keep eps consistent with the clipped x0
        abar = spaced._get("alphas_cumprod", t, x)
        abar_prev = spaced._get("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        x = x0 * torch.sqrt(abar_prev) + torch.sqrt((1 - abar_prev - sigma ** 2).clamp(min=0)) * eps
        if i > 0 and eta > 0:
            x = x + sigma * randn(x.shape, generator, x.device)
    return x


def logsnr_times(diffusion: GaussianDiffusion, steps: int):
    """`steps` times, from the noisiest step to step 0, uniform in log-SNR lambda = log(alpha/sigma).

    Continuous-time view of the discrete schedule (as DPM-Solver's discrete noise schedule):
    log(alpha) is interpolated linearly between the integer steps, so the times are fractional
    step indices. Returns (times, alpha, sigma, lambda), times descending.
    """
    log_alpha = 0.5 * np.log(diffusion.alphas_cumprod)
    lam_n = log_alpha - 0.5 * np.log1p(-np.exp(2 * log_alpha))  # decreasing in the step index
    if steps == 1:
        lam = lam_n[-1:]
    else:
        lam = np.linspace(lam_n[-1], lam_n[0], steps)
    log_alpha_i = -0.5 * np.logaddexp(0.0, -2 * lam)
    index = np.arange(len(log_alpha), dtype=np.float64)
    s = np.interp(-log_alpha_i, -log_alpha, index)  # -log_alpha increases with the index
    alpha = np.exp(log_alpha_i)
    sigma = np.sqrt(-np.expm1(2 * log_alpha_i))
    return s, alpha, sigma, lam


def _dpmpp_2m(model_fn, diffusion: GaussianDiffusion, x: torch.Tensor, steps: int, generator, eta: float,
              clip_denoised: bool) -> torch.Tensor:
    """DPM-Solver++(2M) from the noisiest step to step 0 at log-SNR-uniform times; eta = 0 solves the
    probability-flow ODE, eta = 1 the reverse SDE (SDE-DPM-Solver++(2M), Lu et al. 2022), in
    between a partial renoising. One step from lambda_i to lambda_{i+1} (h = lambda_{i+1} -
    lambda_i, D the 2nd-order multistep combination of the last two x0 estimates):
        x <- sigma_{i+1}/sigma_i e^{-eta h} x + alpha_{i+1} (1 - e^{-(1+eta) h}) D
             + sigma_{i+1} sqrt(1 - e^{-2 eta h}) z
    """
    s, alpha, sigma, lam = logsnr_times(diffusion, steps)
    model_times = np.interp(s, np.arange(diffusion.num_timesteps), diffusion.timestep_map.astype(np.float64))
    channels = x.shape[1]
    prev_x0, prev_h = None, None
    for i in range(len(s)):
        t = torch.full((x.shape[0],), float(model_times[i]), dtype=torch.float32, device=x.device)
        eps, _ = split_output(model_fn(x, t), channels)
        x0 = float(1 / alpha[i]) * x - float(sigma[i] / alpha[i]) * eps
        if clip_denoised:
            x0 = x0.clamp(-1, 1)  # thresholding: CT intensities live in [-1, 1]
        if i == len(s) - 1:
            return x0
        h = float(lam[i + 1] - lam[i])
        if prev_x0 is None:
            d = x0
        else:
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        x = (float(sigma[i + 1] / sigma[i] * np.exp(-eta * h)) * x
             - float(alpha[i + 1] * np.expm1(-(1 + eta) * h)) * d)
        if eta > 0:
            x = x + float(sigma[i + 1] * np.sqrt(-np.expm1(-2 * eta * h))) * randn(x.shape, generator, x.device)
        prev_x0, prev_h = x0, h
    return x


@torch.no_grad()
def sample_dpmpp_2m(model_fn, diffusion: GaussianDiffusion, x: torch.Tensor, steps: int,
                    generator: Noise = None, clip_denoised: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2): second-order multistep ODE solver in data (x0)
    prediction.

    `steps` network evaluations at times uniform in log-SNR from the noisiest step to step 0
    (a time-uniform grid makes the last steps far too long for a linear schedule); the first step
    is first order (DDIM), the last evaluation's x0 estimate is returned. The network gets
    fractional step indices there. Deterministic: the generator is accepted for a uniform
    signature only.
    """
    return _dpmpp_2m(model_fn, diffusion, x, steps, generator, 0.0, clip_denoised)


@torch.no_grad()
def sample_dpmpp_2m_sde(model_fn, diffusion: GaussianDiffusion, x: torch.Tensor, steps: int,
                        generator: Noise, clip_denoised: bool = True) -> torch.Tensor:
    """SDE-DPM-Solver++(2M): the same multistep solver on the reverse SDE, fresh noise at every step
    (from `generator`). Like ancestral DDPM, the noise corrects errors of an imperfect network that
    an ODE solver carries to the end, at the ODE solver's step count."""
    return _dpmpp_2m(model_fn, diffusion, x, steps, generator, 1.0, clip_denoised)


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m,
            "dpmpp_2m_sde": sample_dpmpp_2m_sde}


def sample(sampler: str, model_fn, diffusion: GaussianDiffusion, x: torch.Tensor, steps: int,
           generator: Noise, eta: float = 0.0) -> torch.Tensor:
    """Dispatch by name ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde"); eta applies to DDIM."""
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; one of {sorted(SAMPLERS)}")
    if sampler == "ddim":
        return sample_ddim(model_fn, diffusion, x, steps, generator, eta=eta)
    return SAMPLERS[sampler](model_fn, diffusion, x, steps, generator)
