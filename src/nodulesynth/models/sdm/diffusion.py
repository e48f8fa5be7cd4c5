"""Gaussian diffusion maths (DDPM, Ho et al. 2020; improved DDPM, Nichol & Dhariwal 2021).

Schedules, the forward process q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0), the learned-range
variance and the hybrid loss L_simple + lambda * L_vlb. A `GaussianDiffusion` may be a respaced
copy of the full one (fewer steps, betas recomputed from the kept alphas_cumprod); it then maps its
step indices back to the original ones the network was trained on (`model_t`).
Schedule arithmetic is float64 (numpy); the tensors handed to the network are float32.
"""

import math

import numpy as np
import torch

from nodulesynth.errors import InputError

# --- schedules ---------------------------------------------------------------------------------


def linear_betas(steps: int) -> np.ndarray:
    """DDPM's 1e-4 .. 0.02, rescaled so other step counts keep the same overall noise."""
    scale = 1000.0 / steps
    return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)


def cosine_betas(steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved-DDPM cosine schedule: alpha_bar(t) = cos((t/T + s) / (1 + s) * pi/2)^2."""
    def alpha_bar(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta)
                     for i in range(steps)], dtype=np.float64)


def named_betas(name: str, steps: int) -> np.ndarray:
    if name == "linear":
        return linear_betas(steps)
    if name == "cosine":
        return cosine_betas(steps)
    raise InputError(f"unknown noise schedule {name!r} (linear or cosine)")


def spaced_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """`steps` evenly spread indices of the full schedule, first (0) and last (T-1) included."""
    if not 1 <= steps <= num_timesteps:
        raise InputError(f"cannot respace {num_timesteps} steps to {steps}")
    if steps == 1:
        return np.array([num_timesteps - 1])
    stride = (num_timesteps - 1) / (steps - 1)
    return np.unique(np.round(np.arange(steps) * stride).astype(np.int64))


# --- densities ----------------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales, bin_width=2.0 / 255.0):
    """log P(x) of 8-bit data in [-1, 1] under a Gaussian integrated over each pixel's bin.

    The edge bins extend to -inf / +inf. Uses the exact normal CDF in float64 (improved DDPM used
    the tanh approximation in float32), each bin's mass taken on the side of the mean where the two
    CDF values do not cancel.
    """
    dtype = x.dtype
    x, means, log_scales = x.double(), means.double(), log_scales.double()
    inv_std = torch.exp(-log_scales)
    centered = x - means
    upper = inv_std * (centered + bin_width / 2)
    lower = inv_std * (centered - bin_width / 2)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    mass = torch.where(centered > 0, torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
                       torch.special.ndtr(upper) - torch.special.ndtr(lower))
    log_mass = torch.log(mass.clamp(min=1e-12))
    out = torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mass))
    return out.to(dtype)


def mean_flat(x):
    return x.mean(dim=tuple(range(1, x.ndim)))


# --- the process ------------------------------------------------------------------------------


class GaussianDiffusion:
    def __init__(self, betas, timestep_map=None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or (betas <= 0).any() or (betas > 1).any():
            raise InputError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0: clip the log to its t = 1 value.
        first = self.posterior_variance[1] if self.num_timesteps > 1 else self.betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # Fixed "large" variance when sigma is not learned (DDPM's beta_t, posterior at t = 0).
        self.fixed_log_variance = np.log(np.append(first, betas[1:]))
        self._device_cache = {}

    @classmethod
    def from_options(cls, options) -> "GaussianDiffusion":
        return cls(named_betas(options.noise_schedule, options.diffusion_steps))

    def respaced(self, steps: int) -> "GaussianDiffusion":
        """The same process on `steps` kept steps: beta'_i = 1 - abar[t_i] / abar[t_{i-1}]."""
        keep = spaced_timesteps(self.num_timesteps, steps)
        abar = self.alphas_cumprod[keep]
        betas = 1.0 - abar / np.append(1.0, abar[:-1])
        return GaussianDiffusion(betas, self.timestep_map[keep])

    # -- indexing --
    def _get(self, name, t, x):
        """Schedule array `name` at steps t [B], as float32 [B,1,1,1] on x's device."""
        key = (name, x.device)
        if key not in self._device_cache:
            self._device_cache[key] = torch.as_tensor(getattr(self, name), dtype=torch.float32, device=x.device)
        return self._device_cache[key][t.to(x.device)].view(-1, *([1] * (x.ndim - 1)))

    def model_t(self, t: torch.Tensor) -> torch.Tensor:
        """Step indices of this (respaced) process -> the original ones the network knows."""
        key = ("timestep_map", t.device)
        if key not in self._device_cache:
            self._device_cache[key] = torch.as_tensor(self.timestep_map, dtype=torch.long, device=t.device)
        return self._device_cache[key][t]

    # -- forward process and posterior --
    def q_sample(self, x0, t, noise):
        return self._get("sqrt_alphas_cumprod", t, x0) * x0 + self._get("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0, xt, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._get("posterior_mean_coef1", t, xt) * x0 + self._get("posterior_mean_coef2", t, xt) * xt
        return mean, self._get("posterior_variance", t, xt), self._get("posterior_log_variance_clipped", t, xt)

    def predict_x0_from_eps(self, xt, t, eps):
        return self._get("sqrt_recip_alphas_cumprod", t, xt) * xt - self._get("sqrt_recipm1_alphas_cumprod", t, xt) * eps

    def predict_eps_from_x0(self, xt, t, x0):
        return (self._get("sqrt_recip_alphas_cumprod", t, xt) * xt - x0) / self._get("sqrt_recipm1_alphas_cumprod", t, xt)

    def model_log_variance(self, v, t, x):
        """Learned range: log var = f * log(beta_t) + (1 - f) * log(posterior var clipped), f = (v + 1) / 2.

        With v None (sigma not learned): the fixed large variance.
        """
        if v is None:
            return self._get("fixed_log_variance", t, x).expand_as(x)
        frac = (v + 1) / 2
        return frac * self._get("log_betas", t, x) + (1 - frac) * self._get("posterior_log_variance_clipped", t, x)

    def p_mean_variance(self, eps, v, xt, t, clip_denoised=True):
        """p(x_{t-1} | x_t) from the network's eps (and v): dict(mean, log_variance, pred_x0)."""
        log_variance = self.model_log_variance(v, t, xt)
        pred_x0 = self.predict_x0_from_eps(xt, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(pred_x0, xt, t)
        return {"mean": mean, "log_variance": log_variance, "pred_x0": pred_x0}

    # -- loss --
    def vlb_terms(self, eps, v, x0, xt, t):
        """L_t in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the
        discretised decoder NLL -log p(x_0|x_1) at t = 0. [B]"""
        true_mean, _, true_log_var = self.q_posterior(x0, xt, t)
        out = self.p_mean_variance(eps, v, xt, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x0, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_output, x0, xt, t, noise, vlb_weight=0.001):
        """Hybrid loss per sample: MSE(eps) + lambda * T * L_t (uniform t makes T * L_t an unbiased
        estimate of L_vlb). The VLB sees the mean through a stop-gradient, so it trains only the
        variance and the mean is trained by L_simple alone (improved DDPM, sec. 3.1)."""
        channels = x0.shape[1]
        eps = model_output[:, :channels]
        mse = mean_flat((noise - eps) ** 2)
        if model_output.shape[1] == channels:  # sigma not learned: L_simple alone
            return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}
        v = model_output[:, channels:]
        vb = self.vlb_terms(eps.detach(), v, x0, xt, t) * (vlb_weight * self.num_timesteps)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


def split_output(model_output: torch.Tensor, channels: int):
    """Network output -> (eps, v or None)."""
    if model_output.shape[1] == channels:
        return model_output, None
    return model_output[:, :channels], model_output[:, channels:]
