"""The forward (noising) process and the training loss.

:class:`NoiseSchedule` holds the float64 tables of a discrete-time diffusion (Ho et al. 2020,
"DDPM") and is the one place that knows what the network predicts (house rule 2): noise
(``epsilon``), velocity (``v``, Salimans & Ho 2022) or clean data (``x0``). Everything else, the
step rules in :mod:`diffunet.schedulers` included, goes through :meth:`NoiseSchedule.target`,
:meth:`NoiseSchedule.split_output` and :meth:`NoiseSchedule.loss_weight`.

Notation (DDPM): ``beta_t`` the per-step noise variance, ``alpha_t = 1 - beta_t``, ``ab`` =
``alpha_bar_t = prod_{s<=t} alpha_s`` (``alphas_cumprod[t]``), so that
``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`` (DDPM eq. 4). Timesteps are integer indices in
``[0, T)``; ``t = -1`` means "before the first step" (``alpha_bar = 1``, no noise), which the step
rules use as the target of their last step (diffusers' ``set_alpha_to_one=True``).

This module knows nothing about the network (house rule 1): the loss takes the model's output,
not the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Union, get_args

import torch
from torch import Tensor

from .config import BetaSchedule, PredictionType, ScheduleConfig
from .errors import ConfigError

Timesteps = Union[int, Tensor]
"""A timestep: a Python int or 0-d integer tensor (one t for the batch), or a (B,) int tensor."""

_COSINE_S = 0.008  # Nichol & Dhariwal 2021, eq. 17: offset so beta_0 is not vanishingly small
_MAX_BETA = 0.999  # ... and betas are capped to avoid the singularity at t = T


def make_betas(config: ScheduleConfig) -> Tensor:
    """The (T,) float64 beta schedule described by ``config`` (before any zero-SNR rescaling)."""
    T, b0, b1 = config.num_train_timesteps, config.beta_start, config.beta_end
    f64 = torch.float64
    if config.beta_schedule == "linear":
        # DDPM section 4: betas increase linearly from 1e-4 to 0.02.
        return torch.linspace(b0, b1, T, dtype=f64)
    if config.beta_schedule == "scaled_linear":
        # Latent/Stable Diffusion: linear in sqrt(beta).
        return torch.linspace(math.sqrt(b0), math.sqrt(b1), T, dtype=f64) ** 2
    if config.beta_schedule == "cosine":
        # Improved DDPM (Nichol & Dhariwal 2021) eq. 17: alpha_bar(t) = f(t) / f(0) with
        # f(t) = cos((t/T + s) / (1 + s) * pi/2)^2, and beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}
        # clipped to 0.999. Indices here are 0-based: beta[i] covers u = i/T -> (i+1)/T.
        u = torch.arange(T + 1, dtype=f64) / T
        f = torch.cos((u + _COSINE_S) / (1 + _COSINE_S) * (math.pi / 2)) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=_MAX_BETA)
    if config.beta_schedule == "sigmoid":
        # GeoDiff (Xu et al. 2022), diffusers' "sigmoid": a logistic ramp, beta_start to beta_end.
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=f64)) * (b1 - b0) + b0
    choices = ", ".join(repr(c) for c in get_args(BetaSchedule))
    raise ConfigError(f"schedule.beta_schedule: {config.beta_schedule!r} is not one of {choices}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale ``betas`` (T,) so that alpha_bar at the last step is exactly 0 (SNR 0).

    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1:
    shift sqrt(alpha_bar) so its last value is 0, scale it so its first value is unchanged, and
    convert back to betas. The last beta becomes 1: x_{T-1} is pure noise, as the sampler assumes.
    With SNR 0 at the last step an ``epsilon`` network cannot recover x0 there (x0 = (x_t -
    eps)/0); use ``v`` or ``x0`` prediction with this option, as the paper does.
    """
    sqrt_ab = torch.cumprod(1 - betas.to(torch.float64), dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


class NoiseSchedule:
    """The forward process q(x_t | x_0) of a ``ScheduleConfig``, and the prediction-type maths.

    Tables (all plain CPU float64 tensors of shape (T,), ``T = config.num_train_timesteps``):
    ``betas``, ``alphas``, ``alphas_cumprod``, ``sqrt_alphas_cumprod``,
    ``sqrt_one_minus_alphas_cumprod``, ``snr_table`` (alpha_bar / (1 - alpha_bar)).

    Every method that takes a tensor gathers at ``t`` and returns values on that tensor's device
    and dtype (house rule 7). ``t`` is a Python int or a 0-d integer tensor (one timestep for the
    whole batch; broadcasts against anything) or a (B,) integer tensor (one per sample; gathered
    values come back shaped (B, 1, ..., 1) to broadcast against a (B, ...) tensor). ``t = -1`` is
    allowed and means alpha_bar = 1 (no noise at all).

    The object is not an ``nn.Module``: it has no parameters or buffers, so it never travels with
    ``model.to(...)`` and never lands in a state dict; it keeps a small memo of its tables already
    cast to each (device, dtype) it has been used with, so gathering does not copy a table to the
    GPU on every call.
    """

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        config = ScheduleConfig() if config is None else config
        if config.prediction_type not in get_args(PredictionType):
            choices = ", ".join(repr(c) for c in get_args(PredictionType))
            raise ConfigError(f"schedule.prediction_type: {config.prediction_type!r} is not one "
                              f"of {choices}")
        self.config = config
        betas = make_betas(config)
        if config.rescale_zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas: Tensor = betas
        self.alphas: Tensor = 1 - betas
        self.alphas_cumprod: Tensor = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod: Tensor = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod: Tensor = (1 - self.alphas_cumprod).sqrt()
        self.snr_table: Tensor = self.alphas_cumprod / (1 - self.alphas_cumprod)

        # Gather tables with one extra entry in front for t = -1 (alpha_bar = 1), indexed by t + 1.
        # Derived coefficients are computed here in float64 and only then cast, so a float32 caller
        # gets correctly rounded coefficients rather than float32 arithmetic on float32 tables.
        ab = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        # (torch divides by zero silently: inf entries are noted where they occur.)
        self._tables: dict[str, Tensor] = {
            "ab": ab,
            "sqrt_ab": ab.sqrt(),
            "sqrt_1m_ab": (1 - ab).sqrt(),
            "recip_sqrt_ab": 1 / ab.sqrt(),  # inf where ab = 0 (zero terminal SNR)
            "sqrt_recip_ab_m1": (1 / ab - 1).sqrt(),  # sqrt(1 - ab) / sqrt(ab)
            "recip_sqrt_1m_ab": 1 / (1 - ab).sqrt(),  # inf at t = -1 (never divided there)
            "sqrt_ab_over_sqrt_1m_ab": ab.sqrt() / (1 - ab).sqrt(),
            "snr": ab / (1 - ab),  # inf at t = -1
        }
        self._memo: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    # -----------------------------------------------------------------------------------------
    # Gathering

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def _index(self, t: Timesteps) -> int | Tensor:
        """``t + 1`` as an index into the gather tables, after checking it is a valid timestep."""
        T = self.config.num_train_timesteps
        if isinstance(t, bool) or not isinstance(t, (int, Tensor)):
            raise TypeError(f"t must be an int or an integer tensor, got {type(t).__name__}")
        if isinstance(t, int):
            if not -1 <= t < T:
                raise ConfigError(f"timestep {t} is outside [-1, {T - 1}] "
                                  f"(num_train_timesteps={T})")
            return t + 1
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"t must hold integer timesteps (e.g. int64), got {t.dtype}")
        if t.ndim > 1:
            raise ValueError(f"t must be a scalar or a (B,) tensor, got shape {tuple(t.shape)}")
        # Range check only where it costs no device synchronisation.
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < -1 or int(t.max()) >= T):
            raise ConfigError(f"timesteps must lie in [-1, {T - 1}] (num_train_timesteps={T}), "
                              f"got values in [{int(t.min())}, {int(t.max())}]")
        return t.long() + 1

    def _gather(self, name: str, t: Timesteps, like: Tensor | None) -> Tensor:
        """``table[t]`` on ``like``'s device and dtype, shaped to broadcast against ``like``.

        With ``like=None``: float64 on CPU, shaped like ``t`` (0-d or (B,)).
        """
        idx = self._index(t)
        if like is None:
            table = self._tables[name]
            out = table[idx.cpu() if isinstance(idx, Tensor) else idx]
            return out.clone() if out.ndim == 0 else out
        key = (name, like.device, like.dtype)
        table = self._memo.get(key)
        if table is None:
            table = self._tables[name].to(device=like.device, dtype=like.dtype)
            self._memo[key] = table
        if isinstance(idx, int):
            return table[idx]  # 0-d: broadcasts against anything
        out = table[idx.to(like.device)]
        if out.ndim == 1 and like.ndim > 1:
            out = out.reshape(-1, *([1] * (like.ndim - 1)))
        return out

    def alpha_bar(self, t: Timesteps, like: Tensor | None = None) -> Tensor:
        """alpha_bar_t = prod_{s<=t} (1 - beta_s); 1 at t = -1.

        Returns a 0-d tensor for scalar ``t``; for (B,) ``t`` a (B, 1, ..., 1) tensor matching
        ``like.ndim`` (or (B,) when ``like`` is None). Device/dtype of ``like``; float64 on CPU
        when ``like`` is None (full table precision, for coefficient arithmetic).
        """
        return self._gather("ab", t, like)

    def snr(self, t: Timesteps, like: Tensor | None = None) -> Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at ``t``, shaped as in alpha_bar."""
        return self._gather("snr", t, like)

    # -----------------------------------------------------------------------------------------
    # Forward process and the prediction-type conversions (house rule 2: only here)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Timesteps) -> Tensor:
        """Sample q(x_t | x_0): ``sqrt(ab) x0 + sqrt(1 - ab) noise`` (DDPM eq. 4).

        x0, noise: (B, C, H, W) (any shape with the batch first); t: (B,) int64 or a scalar.
        Returns x_t with x0's shape, device and dtype.
        """
        return (self._gather("sqrt_ab", t, x0) * x0
                + self._gather("sqrt_1m_ab", t, x0) * noise)

    def target(self, x0: Tensor, noise: Tensor, t: Timesteps) -> Tensor:
        """What the network is trained to output for x_t = add_noise(x0, noise, t).

        ``epsilon``: the noise (returned as is, not copied); ``v``: sqrt(ab) eps - sqrt(1-ab) x0
        (Salimans & Ho 2022, section 4); ``x0``: x0 itself. Shapes (B, C, H, W).
        """
        p = self.config.prediction_type
        if p == "epsilon":
            return noise
        if p == "v":
            return (self._gather("sqrt_ab", t, x0) * noise
                    - self._gather("sqrt_1m_ab", t, x0) * x0)
        return x0

    def split_output(self, xt: Tensor, t: Timesteps, out: Tensor) -> tuple[Tensor, Tensor]:
        """The network output ``out`` at (xt, t) as estimates ``(x0_hat, eps_hat)``.

        xt, out: (B, C, H, W); t: (B,) or scalar. Inverts x_t = sqrt(ab) x0 + sqrt(1-ab) eps:
        ``epsilon``: x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab) (DDPM eq. 15);
        ``v``: x0 = sqrt(ab) x_t - sqrt(1-ab) v, eps = sqrt(1-ab) x_t + sqrt(ab) v (Salimans & Ho);
        ``x0``: eps = (x_t - sqrt(ab) x0) / sqrt(1-ab) (see :meth:`eps_from_x0`).
        Undefined where it divides by zero: ``epsilon`` at alpha_bar = 0 (zero terminal SNR).
        """
        p = self.config.prediction_type
        if p == "epsilon":
            x0_hat = (self._gather("recip_sqrt_ab", t, xt) * xt
                      - self._gather("sqrt_recip_ab_m1", t, xt) * out)
            return x0_hat, out
        if p == "v":
            a = self._gather("sqrt_ab", t, xt)
            s = self._gather("sqrt_1m_ab", t, xt)
            return a * xt - s * out, s * xt + a * out
        return out, self.eps_from_x0(xt, t, out)

    def eps_from_x0(self, xt: Tensor, t: Timesteps, x0_hat: Tensor) -> Tensor:
        """The noise implied by x_t and an x0 estimate: (x_t - sqrt(ab) x0) / sqrt(1 - ab).

        Used by ``x0`` prediction and by DDIM after clipping x0_hat. The coefficients
        1/sqrt(1-ab) and sqrt(ab)/sqrt(1-ab) come from float64 tables; at small t (1 - ab ~ 1e-4)
        the result still amplifies any error in x0_hat by ~1/sqrt(1-ab), which is inherent.
        """
        return (self._gather("recip_sqrt_1m_ab", t, xt) * xt
                - self._gather("sqrt_ab_over_sqrt_1m_ab", t, xt) * x0_hat)

    def loss_weight(self, t: Timesteps, min_snr_gamma: float, like: Tensor | None = None) -> Tensor:
        """Min-SNR-gamma loss weight at ``t`` for this schedule's prediction type.

        Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy": the
        x0-space weight min(SNR, gamma) re-expressed for the target the network regresses:
        ``epsilon``: min(SNR, gamma) / SNR; ``v``: min(SNR, gamma) / (SNR + 1); ``x0``:
        min(SNR, gamma). Shapes as :meth:`alpha_bar` (pass ``like`` = a (B,) loss to get (B,)).
        """
        if not min_snr_gamma > 0:
            raise ConfigError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
        snr = self.snr(t, like)
        p = self.config.prediction_type
        if p == "epsilon":
            # min(snr, g) / snr == min(1, g / snr); written so SNR = 0 gives 1, not 0/0.
            return (min_snr_gamma / snr).clamp(max=1.0)
        if p == "v":
            return snr.clamp(max=min_snr_gamma) / (snr + 1)
        return snr.clamp(max=min_snr_gamma)

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.config!r})"


def diffusion_loss(schedule: NoiseSchedule, out: Tensor, x0: Tensor, noise: Tensor,
                   t: Timesteps, *, min_snr_gamma: float | None = None) -> Tensor:
    """Per-sample training loss, shape (B,).

    ``out`` is the network's output at x_t = schedule.add_noise(x0, noise, t); the loss is the
    mean over (C, H, W) of (out - schedule.target(x0, noise, t))^2 (DDPM eq. 14, the "simple"
    loss, in whichever parametrisation the schedule uses), optionally times the min-SNR-gamma
    weight (:meth:`NoiseSchedule.loss_weight`). out, x0, noise: (B, C, H, W); t: (B,).
    Computed in at least float32 (half-precision outputs are upcast for the reduction).
    """
    target = schedule.target(x0, noise, t)
    dtype = torch.promote_types(out.dtype, torch.float32)
    err = (out.to(dtype) - target.to(dtype)).square()
    loss = err.mean(dim=tuple(range(1, err.ndim))) if err.ndim > 1 else err
    if min_snr_gamma is not None:
        loss = loss * schedule.loss_weight(t, min_snr_gamma, like=loss)
    return loss


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


def _check_variance(variance: str) -> None:
    if variance not in LIKELIHOOD_VARIANCES:
        raise ConfigError(f"unknown variance {variance!r}; choose one of "
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
    idx = schedule._index(t)  # validates t; returns t + 1
    if isinstance(idx, int):
        if idx == 0:
            raise ConfigError("the reverse-process variance is defined for t >= 0, got t = -1")
        return table[idx - 1].clone()
    idx = idx.cpu()
    if idx.numel() and int(idx.min()) == 0:
        raise ConfigError("the reverse-process variance is defined for t >= 0, got t = -1")
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
    T = schedule.num_train_timesteps
    B = x0.shape[0]
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
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
            raise ConfigError(f"num_timesteps must be at least 1 (or None for all {T}), "
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
