"""The variational bound on the negative log-likelihood, in bits per dimension (DDPM sec. 3.3).

Built on :class:`~diffunet.formulations.vp.NoiseSchedule` (its tables and ``split_output``), like the
step rules; :func:`bits_per_dim` is the one function here that calls the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from .formulations import Formulation
from .formulations.vp import NoiseSchedule, Timesteps
from .errors import UsageError

# ---------------------------------------------------------------------------------------------
# Likelihood: the variational bound in bits per dimension (DDPM section 3.3, eq. 5 and 13).
#
# The model's reverse process is p(x_{t-1} | x_t) = N(mu, sigma_t^2 I) with mu the posterior mean
# of q(x_{t-1} | x_t, x0) at x0 = x0_hat (the model's estimate, via split_output) and a FIXED
# variance, since diffunet networks do not learn one. The bound on -log p(x0) is
#   L = L_T + sum_{t=1}^{T-1} L_t + L_0                       (0-based timestep indices)
#   L_T = KL(q(x_{T-1} | x0) || N(0, I))                       the prior term (no network)
#   L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))         x_t ~ q(x_t | x0), t = 1..T-1
#   L_0 = -log p(x0 | x_t at t = 0), a Gaussian discretised to the 256 data bins (eq. 13)
# each divided by (C H W ln 2) to give bits per dimension, as improved-diffusion's calc_bpd_loop.
# ``bits_per_dim`` is the one function here that calls the network; like ``sample`` it takes any
# callable ``model(x, t, class_labels=None)``; the per-term functions take its output.

LikelihoodVariance = Literal["fixed_large", "fixed_small"]
LIKELIHOOD_VARIANCES: tuple[str, ...] = ("fixed_large", "fixed_small")
_BIN = 1.0 / 255.0  # half the width of one of the 256 data bins in [-1, 1] (DDPM eq. 13)


def _bcast(c: Tensor, like: Tensor) -> Tensor:
    """A float64 CPU coefficient (0-d, or (B,) per sample) on ``like``'s device and dtype,
    shaped to broadcast against ``like`` (B, ...)."""
    if c.ndim == 1:
        c = c.reshape(-1, *([1] * (like.ndim - 1)))
    return c.to(device=like.device, dtype=like.dtype)


def _posterior_variance_table(schedule: NoiseSchedule) -> Tensor:
    """beta~_t = beta_t (1 - ab_{t-1}) / (1 - ab_t) for t in [0, T) (DDPM eq. 7), float64 (T,).

    0 at t = 0, where the previous step is x0 itself."""
    ab = schedule.alphas_cumprod
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    return schedule.betas * (1 - ab_prev) / (1 - ab)


def require_vp_bound(schedule: object) -> None:
    """Refuse, with one :class:`UsageError` line, a schedule the bound here is not defined
    for: bits/dim is implemented for the discrete VP bound (DDPM eq. 5) only, which a
    formulation says it has (``variational_bound``); an EDM or flow-matching model (a
    continuous level) has none."""
    if isinstance(schedule, Formulation) and schedule.variational_bound:
        return
    what = (f"{schedule.article} {schedule.title} model (schedule.formulation = "
            f"'{schedule.name}')" if isinstance(schedule, Formulation)
            else type(schedule).__name__)
    raise UsageError(f"bits/dim is implemented for the discrete VP bound only (DDPM eq. 5); "
                     f"this is {what}, which has no discrete-time bound to evaluate")


def _check_variance(variance: str) -> None:
    if variance not in LIKELIHOOD_VARIANCES:
        raise UsageError(f"unknown variance {variance!r}; choose one of "
                         f"{', '.join(repr(v) for v in LIKELIHOOD_VARIANCES)}")


def model_variance(schedule: NoiseSchedule, t: Timesteps,
                   variance: LikelihoodVariance = "fixed_large") -> Tensor:
    """The fixed reverse-process variance sigma_t^2 at ``t``: float64 CPU, shaped like ``t``.

    ``fixed_large``: beta_t (DDPM sec. 3.2, sigma^2 = beta); ``fixed_small``: the posterior
    variance beta~_t (eq. 7). At t = 0 both use beta~ of t = 1, as improved-diffusion does:
    beta~_0 is 0 (log undefined), and for fixed_large it gives a better decoder likelihood L_0
    than beta_0.
    """
    _check_variance(variance)
    small = _posterior_variance_table(schedule)
    table = (small if variance == "fixed_small" else schedule.betas).clone()
    table[0] = small[1]
    idx = schedule.table_index(t)  # validates t; returns t + 1
    if isinstance(idx, int):
        if idx == 0:
            raise UsageError("the reverse-process variance is defined for t >= 0, got t = -1")
        return table[idx - 1].clone()
    idx = idx.cpu()
    if idx.numel() and int(idx.min()) == 0:
        raise UsageError("the reverse-process variance is defined for t >= 0, got t = -1")
    return table[idx - 1]


def q_posterior(schedule: NoiseSchedule, x0: Tensor, xt: Tensor,
                t: Timesteps) -> tuple[Tensor, Tensor]:
    """Mean and variance of the forward-process posterior q(x_{t-1} | x_t, x0) (DDPM eq. 6-7).

    mean = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x0 + sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t) x_t,
    variance = beta~_t = (1 - ab_{t-1}) / (1 - ab_t) beta_t (ab_{-1} = 1, so at t = 0 the mean is
    x0 and the variance 0). x0, xt: (B, C, H, W); t: (B,) or scalar, each >= 0. Returns the mean
    (B, C, H, W) and the variance, (B, 1, 1, 1) or 0-d, both in xt's dtype and device
    (coefficients computed in float64).
    """
    ab_t = schedule.alpha_bar(t)
    ab_prev = schedule.alpha_bar(t - 1 if isinstance(t, int) else t.cpu() - 1)
    alpha_t = ab_t / ab_prev
    beta_t = 1 - alpha_t
    c_x0 = ab_prev.sqrt() * beta_t / (1 - ab_t)
    c_xt = alpha_t.sqrt() * (1 - ab_prev) / (1 - ab_t)
    mean = _bcast(c_x0, xt) * x0 + _bcast(c_xt, xt) * xt
    return mean, _bcast(beta_t * (1 - ab_prev) / (1 - ab_t), xt)


def p_mean_variance(schedule: NoiseSchedule, out: Tensor, xt: Tensor, t: Timesteps, *,
                    variance: LikelihoodVariance = "fixed_large", clip_x0: bool = True,
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """The model's reverse step p(x_{t-1} | x_t) = N(mean, var I) from its output ``out``.

    x0_hat comes from :meth:`NoiseSchedule.split_output` (clamped to [-1, 1] when ``clip_x0``,
    as improved-diffusion's ``clip_denoised=True``; p is still a proper distribution, so the
    bound stays a bound for the clipped model), and mean = the posterior mean at x0 = x0_hat
    (DDPM eq. 11 rewritten through eq. 7). out, xt: (B, C, H, W); t: (B,) or scalar >= 0.
    Returns (mean (B, C, H, W), var (B, 1, 1, 1) or 0-d, x0_hat (B, C, H, W)) in xt's dtype.
    """
    x0_hat, _ = schedule.split_output(xt, t, out)
    if clip_x0:
        x0_hat = x0_hat.clamp(-1.0, 1.0)
    mean, _ = q_posterior(schedule, x0_hat, xt, t)
    return mean, _bcast(model_variance(schedule, t, variance), xt), x0_hat


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats (broadcasts).

    0.5 (log v2 - log v1 + v1 / v2 + (mean1 - mean2)^2 / v2 - 1), the closed form for two
    univariate Gaussians.
    """
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2).square() * torch.exp(-logvar2) - 1.0)


def _log_sub_exp(a: Tensor, b: Tensor) -> Tensor:
    """log(exp(a) - exp(b)) for a > b, without cancellation: a + log(1 - exp(b - a))."""
    return a + torch.log(-torch.expm1(b - a))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """Elementwise log-probability (nats) of data ``x`` on the 256-level grid of [-1, 1] under
    N(mean, exp(logvar)) discretised to that grid (DDPM eq. 13).

    Bin k covers [x_k - 1/255, x_k + 1/255]; the first and last bins extend to -inf and +inf, so
    the 256 probabilities sum to 1. Uses the exact normal CDF in log space (``log_ndtr``), taking
    the upper tail for bins right of the mean, so tiny probabilities keep their precision
    (improved-diffusion uses a tanh approximation of the CDF and floors probabilities at 1e-12).
    x: data in [-1, 1] (values v / 127.5 - 1 of uint8 v); mean, logvar broadcast against x.
    """
    inv_std = torch.exp(-0.5 * logvar)
    upper = (x - mean + _BIN) * inv_std  # standardised bin edges
    lower = (x - mean - _BIN) * inv_std
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(z < upper)
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(z > lower)
    # Interior bins: P(lower < z < upper), from whichever tail the bin lies in.
    right = lower > 0
    log_mid = torch.where(
        right,
        _log_sub_exp(log_sf_lower, torch.special.log_ndtr(-upper)),
        _log_sub_exp(log_cdf_upper, torch.special.log_ndtr(lower)))
    return torch.where(x < -1 + _BIN, log_cdf_upper,
                       torch.where(x > 1 - _BIN, log_sf_lower, log_mid))


def _per_dim_bits(nats: Tensor) -> Tensor:
    """Elementwise nats (B, ...) -> (B,) mean over the non-batch dims, in bits."""
    return nats.mean(dim=tuple(range(1, nats.ndim))) / math.log(2.0)


def prior_bpd(schedule: NoiseSchedule, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_{T-1} | x0) || N(0, I)) in bits per dimension, (B,) for x0 (B, C, H, W).

    q(x_{T-1} | x0) = N(sqrt(ab) x0, (1 - ab) I) (DDPM eq. 4) at the last step; 0 when ab = 0
    (zero terminal SNR). Computed in at least float32, as every term here.
    """
    dtype = torch.promote_types(x0.dtype, torch.float32)
    x = x0.to(dtype)
    ab = schedule.alpha_bar(schedule.num_train_timesteps - 1)  # float64 0-d
    mean = float(ab.sqrt()) * x
    logvar = torch.full((), float(torch.log1p(-ab)), dtype=dtype, device=x.device)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    return _per_dim_bits(normal_kl(mean, logvar, zero, zero))


def vlb_term(schedule: NoiseSchedule, out: Tensor, x0: Tensor, xt: Tensor, t: Tensor, *,
             variance: LikelihoodVariance = "fixed_large", clip_x0: bool = True) -> Tensor:
    """One term of the bound per sample, in bits per dimension, (B,).

    ``out`` is the model output at (xt, t) with xt ~ q(x_t | x0). Where t = 0 the term is the
    decoder L_0 = -log p(x0 | x_t), a discretised Gaussian
    (:func:`discretized_gaussian_log_likelihood`); elsewhere it is
    L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) (:func:`normal_kl`).
    out, x0, xt: (B, C, H, W); t: (B,) int64 (may mix t = 0 and t > 0).
    """
    dtype = torch.promote_types(out.dtype, torch.float32)
    out, x0, xt = out.to(dtype), x0.to(dtype), xt.to(dtype)
    mean, var, _ = p_mean_variance(schedule, out, xt, t, variance=variance, clip_x0=clip_x0)
    logvar = var.log()
    true_mean, true_var = q_posterior(schedule, x0, xt, t)
    # At t = 0 the posterior variance is 0 (log = -inf); those rows take the decoder branch, and
    # a finite stand-in keeps the unused KL branch free of NaNs.
    true_logvar = torch.where(true_var > 0, true_var, torch.ones_like(true_var)).log()
    kl = _per_dim_bits(normal_kl(true_mean, true_logvar, mean, logvar))
    nll = -_per_dim_bits(discretized_gaussian_log_likelihood(x0, mean, logvar))
    return torch.where(t.to(kl.device) == 0, nll, kl)


@dataclass(frozen=True)
class BitsPerDim:
    """The variational bound of each image, in bits per dimension (all (B,) unless noted).

    ``bpd = prior + decoder + kl``. ``terms`` (B, n) are the evaluated per-timestep terms at
    ``timesteps`` (B, n) int64: column 0 is t = 0 (the decoder L_0), the rest KL terms L_t.
    With a subset of timesteps, ``kl`` is the unbiased estimate (T - 1) / K * (sum of the K
    evaluated KL terms), and ``exact`` is False.
    """

    bpd: Tensor
    prior: Tensor
    decoder: Tensor
    kl: Tensor
    terms: Tensor
    timesteps: Tensor
    exact: bool


def bits_per_dim(model: Callable[..., Tensor], schedule: NoiseSchedule, x0: Tensor, *,
                 class_labels: Tensor | None = None, num_timesteps: int | None = None,
                 variance: LikelihoodVariance = "fixed_large", clip_x0: bool = True,
                 batch_size: int = 256, generator: torch.Generator | None = None) -> BitsPerDim:
    """The variational bound on -log2 p(x0) per dimension for each image of x0 (B, C, H, W).

    Args:
        model: ``model(x, t)`` / ``model(x, t, class_labels=y)`` returning the schedule's
            parametrisation; called under ``torch.no_grad`` on (b, C, H, W) batches with b <=
            ``batch_size`` rows, each row one (image, timestep) pair.
        x0: data in [-1, 1] on the 256-level grid (what :mod:`diffunet.data` yields).
        class_labels: (B,) labels for a class-conditional model.
        num_timesteps: None evaluates every KL term t = 1..T-1 (the bound itself). An int K <
            T - 1 draws K distinct timesteps per image uniformly from 1..T-1 and scales their sum
            by (T - 1) / K: an unbiased estimate, K + 1 network calls per image instead of T.
            The decoder L_0 and the prior L_T are always computed exactly.
        variance: the fixed reverse variance, ``fixed_large`` (beta_t) or ``fixed_small`` (beta~_t);
            see :func:`model_variance`.
        clip_x0: clamp x0_hat to [-1, 1] (improved-diffusion's default).
        generator: source of the noise x_t ~ q(x_t | x0) and of the timestep subset; a fresh
            OS-seeded CPU generator when None (the global RNG is never used).

    Returns:
        :class:`BitsPerDim`, on x0's device, in at least float32.
    """
    require_vp_bound(schedule)
    T = schedule.num_train_timesteps
    B = x0.shape[0]
    if batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size}")
    _check_variance(variance)
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    gen_device = generator.device
    exact = num_timesteps is None or num_timesteps >= T - 1
    if exact:
        timesteps = torch.arange(T, dtype=torch.int64).repeat(B, 1)
        kl_scale = 1.0
    else:
        if num_timesteps < 1:
            raise UsageError(f"num_timesteps must be at least 1 (or None for all {T}), "
                             f"got {num_timesteps}")
        # K distinct timesteps per image: the first K of a random permutation of 1..T-1.
        keys = torch.rand(B, T - 1, generator=generator, device=gen_device).cpu()
        picked = keys.argsort(dim=1)[:, :num_timesteps].sort(dim=1).values + 1
        timesteps = torch.cat([torch.zeros(B, 1, dtype=torch.int64), picked], dim=1)
        kl_scale = (T - 1) / num_timesteps
    n = timesteps.shape[1]
    rows_img = torch.arange(B).repeat_interleave(n)  # (B n,) which image each row belongs to
    rows_t = timesteps.reshape(-1)
    dtype = torch.promote_types(x0.dtype, torch.float32)
    terms = torch.empty(B * n, dtype=dtype, device=x0.device)
    with torch.no_grad():
        for start in range(0, B * n, batch_size):
            img = rows_img[start:start + batch_size]
            t = rows_t[start:start + batch_size].to(x0.device)
            x0_rows = x0[img.to(x0.device)]
            noise = torch.randn(x0_rows.shape, generator=generator, device=gen_device,
                                dtype=x0.dtype).to(x0.device)
            xt = schedule.add_noise(x0_rows, noise, t)
            if class_labels is None:
                out = model(xt, t)
            else:
                out = model(xt, t, class_labels=class_labels[img.to(class_labels.device)])
            terms[start:start + len(img)] = vlb_term(schedule, out, x0_rows, xt, t,
                                                     variance=variance, clip_x0=clip_x0)
        terms = terms.reshape(B, n)
        decoder = terms[:, 0]
        kl = terms[:, 1:].sum(dim=1) * kl_scale
        prior = prior_bpd(schedule, x0).to(dtype)
    return BitsPerDim(bpd=prior + decoder + kl, prior=prior, decoder=decoder, kl=kl,
                      terms=terms, timesteps=timesteps, exact=exact)
