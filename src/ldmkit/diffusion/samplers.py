"""Samplers: plain functions over a sigma-space denoiser, one signature for all (k-diffusion's):

    sample_x(model, x, sigmas, extra_args, callback, noise, **options) -> x

`model(x, sigma, **extra_args)` returns the predicted clean latent x0. `sigmas` descend and need not
end in 0 (SD's DDIM config ends at sigma(t=0) ≈ 0.029). `noise(x)` draws ancestral noise shaped like
x from each image's own generator. `callback(i, x, x0)` is called after every step.

Each sampler is written in sigma space; where diffusers runs the same algorithm in
variance-preserving form, dividing its update by sqrt(ᾱ) gives the one here (see each docstring)."""

import math
from collections.abc import Callable

import torch

Callback = Callable[[int, torch.Tensor, torch.Tensor], None] | None


def _steps(sigmas: torch.Tensor):
    for i in range(len(sigmas) - 1):
        yield i, float(sigmas[i]), float(sigmas[i + 1])


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split a step to sigma_next into a deterministic part (to sigma_down) and fresh noise of std
    sigma_up, so that sigma_down² + sigma_up² = sigma_next². eta = 1 is the DDPM posterior."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    shrink = 1.0 if math.isinf(sigma) else (sigma**2 - sigma_next**2) / sigma**2
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * shrink))
    return math.sqrt(sigma_next**2 - up**2), up


def sample_euler(model, x, sigmas, extra_args=None, callback: Callback = None, noise=None):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0) / sigma (Karras et al. 2022)."""
    for i, s, s_next in _steps(sigmas):
        x0 = model(x, s, **(extra_args or {}))
        x = x + (x - x0) / s * (s_next - s)
        if callback:
            callback(i, x, x0)
    return x


def sample_euler_ancestral(
    model, x, sigmas, extra_args=None, callback: Callback = None, noise=None, eta=1.0, clip_sample_range=None
):
    """Euler down to sigma_down, then fresh noise of std sigma_up. With eta = 1 this is the DDPM
    sampler (Ho et al. 2020). A first sigma of inf (ᾱ = 0) starts from the variance-preserving
    latent x, which then is the noise estimate itself. `clip_sample_range` is DDPM's clip_sample:
    x0 clamped to ±range, and the step taken from the clamped x0 alone -- DDPM's posterior mean is a
    mix of x0 and x_t, so its noise estimate follows the clamped x0."""
    return _ancestral(model, x, sigmas, extra_args, callback, noise, eta, clip_sample_range, clip_eps=True)


def sample_ddim(
    model, x, sigmas, extra_args=None, callback: Callback = None, noise=None, eta=0.0, clip_sample_range=None
):
    """DDIM (Song et al. 2021, eq. 12): divided by sqrt(ᾱ_prev) its update is x0 + eps * sigma_down
    (+ noise * sigma_up, eq. 16, when eta > 0) -- the ancestral step above; deterministic at eta = 0,
    where it is Euler's method. `clip_sample_range` is DDIM's clip_sample: it clamps the x0 term
    only, the direction pointing to x_t keeps the model's own noise estimate (diffusers'
    DDIMScheduler.step, whose pipelines leave use_clipped_model_output off)."""
    return _ancestral(model, x, sigmas, extra_args, callback, noise, eta, clip_sample_range, clip_eps=False)


def _ancestral(model, x, sigmas, extra_args, callback, noise, eta, clip, clip_eps):
    """x_next = x0 + eps * sigma_down + noise * sigma_up, x0 clamped to ±clip if given, and eps
    taken from the clamped x0 (`clip_eps`) or the model's own."""
    for i, s, s_next in _steps(sigmas):
        x0 = model(x, s, **(extra_args or {}))
        down, up = ancestral_step(s, s_next, eta)
        clipped = x0 if clip is None else x0.clamp(-clip, clip)
        eps_x0 = clipped if clip_eps else x0
        eps = x if math.isinf(s) else (x - eps_x0) / s
        x = clipped + eps * down
        if up > 0:
            x = x + noise(x) * up
        if callback:
            callback(i, x, clipped)
    return x


def sample_heun(model, x, sigmas, extra_args=None, callback: Callback = None, noise=None, clip_sample_range=None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1); the last step, to sigma 0, is
    Euler. `clip_sample_range`: both x0 predictions clamped to ±range (diffusers' clip_sample)."""
    args = extra_args or {}

    def denoise(x, s):
        x0 = model(x, s, **args)
        return x0 if clip_sample_range is None else x0.clamp(-clip_sample_range, clip_sample_range)

    for i, s, s_next in _steps(sigmas):
        x0 = denoise(x, s)
        d = (x - x0) / s
        x_euler = x + d * (s_next - s)
        if s_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - denoise(x_euler, s_next)) / s_next
            x = x + (d + d_next) / 2 * (s_next - s)
        if callback:
            callback(i, x, x0)
    return x


def sample_plms(model, x, sigmas, extra_args=None, callback: Callback = None, noise=None):
    """Pseudo linear multistep (PLMS, Liu et al. 2022), as PNDM with its Runge-Kutta warm-up skipped:
    a Heun-like first step (two UNet calls), then Adams-Bashforth combinations of the last 2, 3 and
    4 noise predictions -- N + 1 UNet calls for N steps. Each step is DDIM's transfer, which in
    sigma space is x + (sigma_next - sigma) * eps."""
    args = extra_args or {}
    eps_history: list[torch.Tensor] = []
    n = len(sigmas) - 1
    for i, s, s_next in _steps(sigmas):
        x0 = model(x, s, **args)
        eps = (x - x0) / s
        eps_history = (eps_history + [eps])[-4:]
        if i == 0 and n > 1:
            x_pred = x + (s_next - s) * eps
            eps_next = (x_pred - model(x_pred, s_next, **args)) / s_next
            eps_prime = (eps + eps_next) / 2
        elif len(eps_history) == 1:
            eps_prime = eps
        elif len(eps_history) == 2:
            eps_prime = (3 * eps_history[-1] - eps_history[-2]) / 2
        elif len(eps_history) == 3:
            eps_prime = (23 * eps_history[-1] - 16 * eps_history[-2] + 5 * eps_history[-3]) / 12
        else:
            e = eps_history
            eps_prime = (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24
        x = x + (s_next - s) * eps_prime
        if callback:
            callback(i, x, x0)
    return x


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback: Callback = None, noise=None, lower_order_final=True):
    """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in t = -log sigma; first order on the
    first step, and on the last step when `lower_order_final` -- always when it goes to sigma 0,
    where the second-order term is undefined."""
    old_x0, h_last = None, None
    last = len(sigmas) - 2
    for i, s, s_next in _steps(sigmas):
        x0 = model(x, s, **(extra_args or {}))
        h = math.log(s) - math.log(s_next) if s_next > 0 else math.inf
        if old_x0 is None or s_next == 0 or (lower_order_final and i == last):
            d = x0
        else:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
        x = (s_next / s) * x - math.expm1(-h) * d
        old_x0, h_last = x0, h
        if callback:
            callback(i, x, x0)
    return x


def sample_unipc(model, x, sigmas, extra_args=None, callback: Callback = None, noise=None):
    """UniPC (Zhao et al. 2023), B(h) = e^h - 1 ("bh2"), order 2, predicting x0: a UniP predictor step,
    then at the next evaluation a UniC corrector that reuses that evaluation; first order on the
    first and last steps. In lambda = -log sigma, dividing diffusers' updates by alpha_t."""
    args = extra_args or {}
    lam = [(-math.log(float(s)) if s > 0 else math.inf) for s in sigmas]
    x0s: list[torch.Tensor] = []
    last_x, last_order = None, 1
    n = len(sigmas) - 1
    for i, s, s_next in _steps(sigmas):
        x0 = model(x, s, **args)
        if last_x is not None:  # corrector for the step i-1 -> i, with the new x0
            h = lam[i] - lam[i - 1]
            phi = math.expm1(-h)  # h*phi_1(-h) = B(h) for bh2
            base = (s / float(sigmas[i - 1])) * last_x - phi * x0s[-1]
            if last_order == 1:
                x = base - phi * 0.5 * (x0 - x0s[-1])
            else:
                r = (lam[i - 2] - lam[i - 1]) / h
                rho_prev, rho_t = _unic_rhos(h, r)
                d1 = (x0s[-2] - x0s[-1]) / r
                x = base - phi * (rho_prev * d1 + rho_t * (x0 - x0s[-1]))
        x0s = (x0s + [x0])[-2:]
        order = min(2, n - i, len(x0s))
        last_x, last_order = x, order
        h = lam[i + 1] - lam[i]
        phi = math.expm1(-h)
        x_next = (s_next / s) * x - phi * x0
        if order == 2:
            r = (lam[i - 1] - lam[i]) / h
            x_next = x_next - phi * 0.5 * (x0s[-2] - x0s[-1]) / r
        x = x_next
        if callback:
            callback(i, x, x0)
    return x


def _unic_rhos(h: float, r: float) -> tuple[float, float]:
    """UniC-2 coefficients: solve R rho = b with R = [[1, 1], [r, 1]], b_k = h*phi_(k+1)(-h)*k!/B(h)."""
    hh = -h
    phi1 = math.expm1(hh)
    b1 = (phi1 / hh - 1) / phi1
    b2 = ((phi1 / hh - 1) / hh - 0.5) * 2 / phi1
    # [1, 1; r, 1] [rho_prev; rho_t] = [b1; b2]
    rho_prev = (b1 - b2) / (1 - r)
    return rho_prev, b1 - rho_prev


def sample_lcm(
    model,
    x,
    sigmas,
    extra_args=None,
    callback: Callback = None,
    noise=None,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
    clip_sample_range: float | None = None,
):
    """Multi-step latent consistency sampling (Luo et al. 2023): at each step the consistency
    function f(x, t) = c_skip(t) x + c_out(t) x0 jumps to the clean latent, which is re-noised to
    the next sigma with fresh noise. One UNet call per step; guidance is in the model's embedding.
    `clip_sample_range`: x0 clamped to ±range first (diffusers' clip_sample). At sigma = inf
    (ᾱ = 0) x is the variance-preserving latent."""
    for i, s, s_next in _steps(sigmas):
        x0 = model(x, s, **(extra_args or {}))
        if clip_sample_range is not None:
            x0 = x0.clamp(-clip_sample_range, clip_sample_range)
        t = model.timestep(s) * timestep_scaling
        c_skip = sigma_data**2 / (t**2 + sigma_data**2)
        c_out = t / (t**2 + sigma_data**2) ** 0.5
        denoised = c_out * x0 + c_skip * (x if math.isinf(s) else x / (s**2 + 1) ** 0.5)
        x = denoised + noise(x) * s_next if s_next > 0 else denoised
        if callback:
            callback(i, x, denoised)
    return x
