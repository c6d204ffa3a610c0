"""The VP formulation: the discrete forward process of DDPM (Ho et al. 2020), the training loss,
and sampling on the training timesteps (respacing and the DDPM, DDIM and DPM-Solver++(2M) step
rules, its native path).

:class:`NoiseSchedule` holds the float64 tables of a discrete-time diffusion and is the one place
that knows what the network predicts: noise (``epsilon``), velocity (``v``, Salimans & Ho 2022)
or clean data (``x0``). Everything else, the step rules below and the bound in
:mod:`diffunet.likelihood` included, goes through :meth:`NoiseSchedule.target`,
:meth:`NoiseSchedule.split_output` and :meth:`NoiseSchedule.loss_weight`, or through the
denoiser view of Karras et al. 2022 (:class:`VPDenoiser`, ``schedule.denoiser(model)``), which
uses the same conversion at the alpha_bar of a noise level sigma.

Notation (DDPM): ``beta_t`` the per-step noise variance, ``alpha_t = 1 - beta_t``, ``ab`` =
``alpha_bar_t = prod_{s<=t} alpha_s`` (``alphas_cumprod[t]``), so that
``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`` (DDPM eq. 4). Timesteps are integer indices in
``[0, T)``; ``t = -1`` means "before the first step" (``alpha_bar = 1``, no noise), which the step
rules use as the target of their last step (diffusers' ``set_alpha_to_one=True``).

This module knows nothing about the network (house rule 1): the loss takes the model's output,
not the model (:meth:`NoiseSchedule.loss`, the training objective, calls it once).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Optional, Union, get_args

import torch
from torch import Tensor

from ..conditioning import Condition, network_kwargs
from ..errors import ConfigError, UsageError, require
from ..randomness import Generators, check_randomness, gaussian
from .base import (Denoiser, Formulation, Model, SamplingPath, Spacing, StepOptions,
                   check_eta, clip_estimate, coefficient_dtype, batch_sigmas)
from .settings import BetaSchedule, PredictionType, ScheduleConfig

__all__ = ["NoiseSchedule", "VPDenoiser", "Timesteps", "TimestepPath", "INTEGER_SAMPLERS",
           "VARIANCES", "diffusion_loss", "make_betas", "rescale_zero_terminal_snr",
           "make_timesteps", "ddpm_step", "ddim_step", "dpmpp_2m_step"]

VARIANCES: tuple[str, ...] = ("fixed_small", "fixed_large")
"""The DDPM step's reverse-process variances (:func:`ddpm_step`)."""
INTEGER_SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "dpmpp-2m")
"""The samplers with an exact integer-timestep rule (:mod:`~diffunet.formulations.vp_steps`),
run on the ``uniform`` grid."""

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


class NoiseSchedule(Formulation):
    """The VP formulation (``schedule.formulation = "vp"``): the forward process q(x_t | x_0) of
    a ``ScheduleConfig``, and the prediction-type maths.

    Tables (all plain CPU float64 tensors of shape (T,), ``T = config.num_train_timesteps``):
    ``betas``, ``alphas``, ``alphas_cumprod``, ``sqrt_alphas_cumprod``,
    ``sqrt_one_minus_alphas_cumprod``, ``snr_table`` (alpha_bar / (1 - alpha_bar)), ``sigmas``
    (sqrt((1 - alpha_bar) / alpha_bar), the noise levels of the denoiser view).

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

    name = "vp"
    title = "VP"
    config_fields = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                     "prediction_type", "rescale_zero_terminal_snr", "timestep_density",
                     "logit_mean", "logit_std", "laplace_mean", "laplace_scale")
    network_fields = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                      "prediction_type", "rescale_zero_terminal_snr")  # the table, the target
    discrete_timesteps = True
    timestep_inputs = True
    uniform_grid = True
    native_samplers = INTEGER_SAMPLERS
    variational_bound = True
    diffusers_scheduler = "DDIMScheduler"
    min_snr_weighting = True
    wrong_class_message = ("NoiseSchedule is the discrete VP schedule, got {0.formulation!r}; "
                           "use diffunet.make_schedule, which builds the one a config names")

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        config = ScheduleConfig() if config is None else config
        super().__init__(config)
        if config.prediction_type not in get_args(PredictionType):
            choices = ", ".join(repr(c) for c in get_args(PredictionType))
            raise ConfigError(f"schedule.prediction_type: {config.prediction_type!r} is not one "
                              f"of {choices}")
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
            "snr": ab / (1 - ab),  # inf at t = -1
            "sigma": ((1 - ab) / ab).sqrt(),  # 0 at t = -1; inf where ab = 0 (zero terminal SNR)
        }
        # The noise levels of the denoiser view (Karras et al. 2022, sec. 2): sigma_t =
        # sqrt((1 - ab_t) / ab_t), so that x_t / sqrt(ab_t) = x0 + sigma_t eps.
        self.sigmas: Tensor = self._tables["sigma"][1:]
        # Not a gather table (no t = -1 entry): ascending log-sigmas for sigma_to_timestep.
        self._log_sigmas: Tensor = self.sigmas.log()
        self._memo: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    # -----------------------------------------------------------------------------------------
    # Gathering

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def table_index(self, t: Timesteps) -> int | Tensor:
        """``t + 1`` as an index into the gather tables, after checking it is a valid timestep."""
        T = self.config.num_train_timesteps
        if isinstance(t, bool) or not isinstance(t, (int, Tensor)):
            raise TypeError(f"t must be an int or an integer tensor, got {type(t).__name__}")
        if isinstance(t, int):
            if not -1 <= t < T:
                raise UsageError(f"timestep {t} is outside [-1, {T - 1}] "
                                 f"(num_train_timesteps={T})")
            return t + 1
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"t must hold integer timesteps (e.g. int64), got {t.dtype}")
        if t.ndim > 1:
            raise ValueError(f"t must be a scalar or a (B,) tensor, got shape {tuple(t.shape)}")
        # No host sync (on a GPU a device-side assert rather than a gather from a wrong row).
        require(((t >= -1) & (t < T)).all(), UsageError, lambda: (
            f"timesteps must lie in [-1, {T - 1}] (num_train_timesteps={T}), got values in "
            f"[{int(t.min())}, {int(t.max())}]"))
        return t.long() + 1

    def _gather(self, name: str, t: Timesteps, like: Tensor | None) -> Tensor:
        """``table[t]`` on ``like``'s device and dtype, shaped to broadcast against ``like``.

        With ``like=None``: float64 on CPU, shaped like ``t`` (0-d or (B,)).
        """
        if like is None:
            idx = self.table_index(t)
            table = self._tables[name]
            out = table[idx.cpu() if isinstance(idx, Tensor) else idx]
            return out.clone() if out.ndim == 0 else out
        return self._gather_as(name, t, like.device, like.dtype, like.ndim)

    def _gather_as(self, name: str, t: Timesteps, device: torch.device, dtype: torch.dtype,
                   ndim: int) -> Tensor:
        """``table[t]`` on ``device`` in ``dtype``: 0-d for a scalar ``t``, else (B,) reshaped to
        (B, 1, ..., 1) with ``ndim`` dimensions (when ``ndim`` > 1)."""
        idx = self.table_index(t)
        table = self._table(name, device, dtype)
        if isinstance(idx, int):
            return table[idx]  # 0-d: broadcasts against anything
        out = table[idx.to(device)]
        if out.ndim == 1 and ndim > 1:
            out = out.reshape(-1, *([1] * (ndim - 1)))
        return out

    def _table(self, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The gather table ``name`` (or ``log_sigmas``) cast to (device, dtype), memoised."""
        key = (name, device, dtype)
        table = self._memo.get(key)
        if table is None:
            src = self._log_sigmas if name == "log_sigmas" else self._tables[name]
            table = src.to(device=device, dtype=dtype)
            self._memo[key] = table
        return table

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
        The same conversion, at the alpha_bar of a noise level sigma, is the denoiser view
        (:class:`VPDenoiser`).
        """
        a, s = self._coefficients(t, xt)
        return _split(self.config.prediction_type, xt, out, a, s)

    def eps_from_x0(self, xt: Tensor, t: Timesteps, x0_hat: Tensor) -> Tensor:
        """The noise implied by x_t and an x0 estimate: (x_t - sqrt(ab) x0) / sqrt(1 - ab).

        Used by ``x0`` prediction and by DDIM after clipping x0_hat. The coefficients
        1/sqrt(1-ab) and sqrt(ab)/sqrt(1-ab) are formed in float64; at small t (1 - ab ~ 1e-4)
        the result still amplifies any error in x0_hat by ~1/sqrt(1-ab), which is inherent.
        """
        a, s = self._coefficients(t, xt)
        return _split("x0", xt, x0_hat, a, s)[1]

    def _coefficients(self, t: Timesteps, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(ab), sqrt(1 - ab)) at ``t`` in float64 (float32 on a device without float64)
        on ``like``'s device, shaped to broadcast against ``like``."""
        dtype = coefficient_dtype(like.device)
        return (self._gather_as("sqrt_ab", t, like.device, dtype, like.ndim),
                self._gather_as("sqrt_1m_ab", t, like.device, dtype, like.ndim))

    # -----------------------------------------------------------------------------------------
    # Noise levels: the denoiser view of Karras et al. 2022 (sec. 2, Table 1, "VP" column)

    @property
    def sigma_min(self) -> float:
        """The smallest noise level the network was trained on, sigma at t = 0."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """The largest, sigma at t = T-1; ``inf`` for a zero-terminal-SNR schedule (the sigma
        grids then start from the largest finite entry of :attr:`sigmas`)."""
        return float(self.sigmas[-1])

    def timestep_to_sigma(self, t: Timesteps) -> Tensor:
        """sigma_t = sqrt((1 - ab_t) / ab_t) at integer timesteps ``t`` (0 at t = -1), as a
        float64 CPU tensor shaped like ``t`` (0-d or (B,))."""
        return self._gather("sigma", t, None)

    def sigma_to_timestep(self, sigma: Union[float, Tensor],
                          mode: Literal["interpolate", "nearest"] = "interpolate") -> Tensor:
        """The training timestep of noise level ``sigma`` (a float or a tensor of any shape).

        ``interpolate``: linear in log-sigma between the two neighbouring table entries (as
        k-diffusion's ``DiscreteSchedule.sigma_to_t`` and diffusers' Euler schedulers), clamped
        to [0, T-1]; a float64 tensor (float32 on a device without float64). ``nearest``: the
        table entry nearest in log-sigma, i.e. the interpolated value rounded (half to even);
        int64. Same shape and device as ``sigma``. Under zero terminal SNR (sigma_{T-1} = inf)
        every finite sigma above sigma_{T-2} maps to T-2 and only inf to T-1.
        """
        if mode not in ("interpolate", "nearest"):
            raise UsageError(f"sigma_to_timestep: mode must be 'interpolate' or 'nearest', "
                             f"got {mode!r}")
        s = torch.as_tensor(sigma)
        dtype = coefficient_dtype(s.device)
        s = s.to(dtype)
        T = self.config.num_train_timesteps
        if T == 1:
            t = torch.zeros_like(s)
        else:
            log_sigmas = self._table("log_sigmas", s.device, dtype)  # (T,) ascending
            log_s = s.log()
            low = (torch.searchsorted(log_sigmas, log_s.contiguous(), right=True) - 1)
            low = low.clamp(0, T - 2)
            lo, hi = log_sigmas[low], log_sigmas[low + 1]
            w = ((log_s - lo) / (hi - lo)).clamp(0, 1)
            w = torch.where(log_s == math.inf, torch.ones_like(w), w)  # inf / inf at sigma = inf
            t = low.to(dtype) + w
        return t.round().long() if mode == "nearest" else t

    def denoiser(self, model: Callable[..., Tensor], **kwargs: Any) -> "VPDenoiser":
        """The denoiser D(x; sigma) of ``model`` under this schedule (:class:`VPDenoiser`;
        ``kwargs``: its ``timestep`` mode)."""
        return VPDenoiser(model, self, **kwargs)

    def loss_weight(self, t: Timesteps, min_snr_gamma: float, like: Tensor | None = None) -> Tensor:
        """Min-SNR-gamma loss weight at ``t`` for this schedule's prediction type.

        Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy": the
        x0-space weight min(SNR, gamma) re-expressed for the target the network regresses:
        ``epsilon``: min(SNR, gamma) / SNR; ``v``: min(SNR, gamma) / (SNR + 1); ``x0``:
        min(SNR, gamma). Shapes as :meth:`alpha_bar` (pass ``like`` = a (B,) loss to get (B,)).
        """
        if not min_snr_gamma > 0:
            raise UsageError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
        snr = self.snr(t, like)
        p = self.config.prediction_type
        if p == "epsilon":
            # min(snr, g) / snr == min(1, g / snr); written so SNR = 0 gives 1, not 0/0.
            return (min_snr_gamma / snr).clamp(max=1.0)
        if p == "v":
            return snr.clamp(max=min_snr_gamma) / (snr + 1)
        return snr.clamp(max=min_snr_gamma)

    # -----------------------------------------------------------------------------------------
    # The formulation contract

    @classmethod
    def check_config(cls, config: ScheduleConfig, fail: Callable[[str, str], None]) -> None:
        for name in ("logit_std", "laplace_scale"):
            if not getattr(config, name) > 0:
                fail(name, f"must be positive, got {getattr(config, name)}")

    @classmethod
    def describe(cls, config: ScheduleConfig) -> str:
        density = {"uniform": "",
                   "logit_normal": f", logit-normal t ({config.logit_mean}, {config.logit_std})",
                   "laplace": f", Laplace log-SNR t ({config.laplace_mean}, "
                              f"{config.laplace_scale})"}[config.timestep_density]
        return (f"{config.prediction_type} prediction, {config.beta_schedule} schedule, "
                f"{config.num_train_timesteps} timesteps{density}")

    @classmethod
    def table_entries(cls, config: ScheduleConfig) -> int:
        return config.num_train_timesteps

    def sample_levels(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` training timesteps in [0, T), (n,) int64 on the generator's device, drawn from
        ``schedule.timestep_density``:

        - ``uniform``: t ~ U{0, ..., T-1} (DDPM Algorithm 1).
        - ``logit_normal``: u = sigmoid(m + s z), z ~ N(0, 1), the fraction of the way to noise
          (Esser et al. 2024, eq. 19, as flow draws its t), and t = floor(u T): P(t) is the
          logit-normal mass of [t/T, (t+1)/T).
        - ``laplace``: lambda = log SNR ~ Laplace(mu, b) (Hang et al. 2024), drawn by the
          inverse CDF lambda = mu - b sign(v) ln(1 - 2|v|), v ~ U[-1/2, 1/2), and t the timestep
          whose log-SNR is nearest: log SNR = -2 ln sigma, so that is
          :meth:`sigma_to_timestep` ``nearest`` at sigma = exp(-lambda / 2). P(t) is the Laplace
          mass of the lambdas nearer to t's than to its neighbours'; the tails beyond the table
          go to its ends (under zero terminal SNR, whose last log-SNR is -inf, to T-2).

        No host sync (the table search runs on the generator's device)."""
        c, T, dev = self.config, self.num_train_timesteps, generator.device
        if c.timestep_density == "logit_normal":
            z = torch.randn(n, generator=generator, device=dev)
            u = torch.sigmoid(c.logit_mean + c.logit_std * z)
            return (u * T).long().clamp(max=T - 1)  # u = 1 in float32: the last timestep
        if c.timestep_density == "laplace":
            v = torch.rand(n, generator=generator, device=dev,
                           dtype=coefficient_dtype(dev)) - 0.5
            log_snr = c.laplace_mean - c.laplace_scale * v.sign() * torch.log1p(-2 * v.abs())
            return self.sigma_to_timestep((-0.5 * log_snr).exp(), mode="nearest")
        return torch.randint(0, T, (n,), generator=generator, device=dev)

    def network_input(self, x0: Tensor, noise: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, t): the network sees the noised image and the integer timestep itself."""
        return self.add_noise(x0, noise, level), level

    def loss(self, model: Model, x0: Tensor, noise: Tensor, level: Tensor, *,
             class_labels: Optional[Tensor] = None,
             min_snr_gamma: Optional[float] = None,
             cond: Optional[Condition] = None) -> Tensor:
        """:func:`diffusion_loss` of the network's output at x_t (B,)."""
        xt = self.add_noise(x0, noise, level)
        out = model(xt, level, **network_kwargs(cond, class_labels))
        return diffusion_loss(self, out.float(), x0, noise, level, min_snr_gamma=min_snr_gamma)

    def ideal_output(self, x_in: Tensor, time_in: Tensor, x0: Tensor) -> Tensor:
        """The target of :meth:`target` at x_t = ``x_in`` for data ``x0``: eps = (x_t - sqrt(ab)
        x0) / sqrt(1 - ab), as the prediction type asks. An interpolated (float) timestep is read
        back to its sigma by the same log-sigma line :meth:`sigma_to_timestep` drew."""
        dtype = coefficient_dtype(x_in.device)
        if time_in.is_floating_point():
            log_s = self._log_sigma_at(time_in.to(x_in.device))
            ab = 1 / (1 + (2 * log_s).exp())  # sigma^2 = exp(2 log sigma); inf -> ab = 0
            a = ab.sqrt().reshape(-1, *([1] * (x_in.ndim - 1)))
            s = (1 - ab).sqrt().reshape(a.shape)
        else:
            a, s = self._coefficients(time_in, x_in)
        eps = (x_in.to(dtype) - a * x0.to(dtype)) / s
        p = self.config.prediction_type
        out = eps if p == "epsilon" else a * eps - s * x0.to(dtype) if p == "v" else x0.to(dtype)
        return out.to(x_in.dtype)

    def _log_sigma_at(self, time_in: Tensor) -> Tensor:
        """log sigma at float timesteps (B,): linear in log-sigma between table entries, the
        line :meth:`sigma_to_timestep` drew (clamped to [0, T-1]); coefficient dtype."""
        dtype = coefficient_dtype(time_in.device)
        T = self.num_train_timesteps
        log_sigmas = self._table("log_sigmas", time_in.device, dtype)
        if T == 1:
            return log_sigmas[torch.zeros_like(time_in, dtype=torch.long)]
        t = time_in.to(dtype).clamp(0, T - 1)
        low = t.floor().clamp(max=T - 2).long()
        w = t - low.to(dtype)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        return torch.where(w == 0, lo, lo + w * (hi - lo))

    def sigma_of_time_input(self, time_in: Tensor) -> Tensor:
        """The table's sigma at an integer timestep; at an interpolated (float) one, the
        log-sigma line :meth:`sigma_to_timestep` drew, read back."""
        if time_in.is_floating_point():
            return self._log_sigma_at(time_in).exp()
        return self._gather_as("sigma", time_in, time_in.device,
                               coefficient_dtype(time_in.device), 1)

    def grid_range(self) -> tuple[float, float]:
        """(sigma at t = 0, the largest finite sigma of the table): sigma at T-1, or at T-2
        under zero terminal SNR (sigma_{T-1} = inf)."""
        lo, hi = self.sigma_min, self.sigma_max
        if hi == math.inf:
            hi = float(self.sigmas[torch.isfinite(self.sigmas)].max())
        if not (0 < lo < hi < math.inf):
            raise UsageError(f"the noise levels must satisfy 0 < sigma_min < sigma_max < inf, "
                             f"got sigma_min={lo}, sigma_max={hi}")
        return lo, hi

    def override_range(self) -> Optional[tuple[float, float]]:
        """The table's range: the denoiser maps a level outside it to t = 0 or T-1."""
        return self.grid_range()

    def uniform_sigmas(self, num_steps: int, spacing: str) -> Tensor:
        """The sigmas of the training timesteps ``make_timesteps(T, num_steps, spacing)``
        visits, then 0 (inf first under zero terminal SNR)."""
        levels = self.sigmas[make_timesteps(self.num_train_timesteps, num_steps, spacing)]
        return torch.cat([levels, torch.zeros(1, dtype=torch.float64)])

    def native_levels(self, options: StepOptions, grid: str) -> Optional[tuple[str, list]]:
        if grid != "uniform" or options.sampler not in INTEGER_SAMPLERS:
            return None
        return "timesteps", make_timesteps(self.num_train_timesteps, options.num_steps,
                                           options.spacing).tolist()

    def native_path(self, model: Model, options: StepOptions, grid: str,
                    generator: Optional[Generators]) -> Optional[SamplingPath]:
        """The integer-timestep rules (:func:`ddpm_step`, :func:`ddim_step`,
        :func:`dpmpp_2m_step`) for those samplers on the ``uniform`` grid."""
        if self.native_levels(options, grid) is None:
            return None
        return TimestepPath(model, self, options, generator)

    def level_of_timestep(self, t: int) -> Tensor:
        return torch.tensor([t])

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.config!r})"


def _split(prediction_type: str, xt: Tensor, out: Tensor, sqrt_ab: Tensor,
           sqrt_1m_ab: Tensor) -> tuple[Tensor, Tensor]:
    """The one eps/v/x0 conversion (house rule 2): the network output ``out`` at
    x_t = sqrt_ab x0 + sqrt_1m_ab eps as ``(x0_hat, eps_hat)``, both shaped and typed like ``xt``.

    ``sqrt_ab``, ``sqrt_1m_ab``: float64 (see :func:`coefficient_dtype`) tensors broadcasting
    against ``xt``; the derived coefficients are formed at that precision and cast only then.
    ``epsilon``: x0 = x_t / sqrt_ab - (sqrt_1m_ab / sqrt_ab) eps (DDPM eq. 15);
    ``v``: x0 = sqrt_ab x_t - sqrt_1m_ab v, eps = sqrt_1m_ab x_t + sqrt_ab v (Salimans & Ho 2022);
    ``x0``: eps = x_t / sqrt_1m_ab - (sqrt_ab / sqrt_1m_ab) x0.
    """
    a, s = sqrt_ab, sqrt_1m_ab

    def c(coef: Tensor) -> Tensor:
        return coef.to(xt.dtype)

    if prediction_type == "epsilon":
        return c(1 / a) * xt - c(s / a) * out, out
    if prediction_type == "v":
        return c(a) * xt - c(s) * out, c(s) * xt + c(a) * out
    return out, c(1 / s) * xt - c(a / s) * out


class VPDenoiser(Denoiser):
    """The denoiser view of a network trained on a :class:`NoiseSchedule` (Karras et al. 2022,
    sec. 2 and Table 1, "VP"): ``D(x, sigma, class_labels=None) -> x0_hat``.

    x (B, C, H, W) is in "VE scaling", x = x0 + sigma n; sigma a (B,) tensor (or a 0-d one, or
    a float, for the whole batch). With ab = 1 / (1 + sigma^2) (the exact alpha_bar of sigma),
    the network sees x_t = sqrt(ab) x = x / sqrt(1 + sigma^2) and the training timestep of sigma
    (:meth:`NoiseSchedule.sigma_to_timestep` with ``timestep`` = ``interpolate``: a float
    timestep, linear in log-sigma between table entries; ``nearest``: the int64 table index),
    and its output becomes x0_hat through the same conversion as
    :meth:`NoiseSchedule.split_output` at that ab. Returns x0_hat (B, C, H, W) in x's dtype.

    ``sigma_min``/``sigma_max``: the schedule's (``sigma_max`` = inf under zero terminal SNR).
    The model is called as ``model(x_t, t)``, or ``model(x_t, t, class_labels=y)`` with labels.
    """

    def __init__(self, model: Callable[..., Tensor], schedule: NoiseSchedule, *,
                 timestep: Literal["interpolate", "nearest"] = "interpolate") -> None:
        if timestep not in ("interpolate", "nearest"):
            raise UsageError(f"VPDenoiser: timestep must be 'interpolate' or 'nearest', got "
                             f"{timestep!r}")
        self.model = model
        self.schedule = schedule
        self.timestep = timestep
        self.sigma_min: float = schedule.sigma_min
        self.sigma_max: float = schedule.sigma_max

    def __call__(self, x: Tensor, sigma: Union[float, Tensor],
                 class_labels: Optional[Tensor] = None) -> Tensor:
        s = batch_sigmas(sigma, x)
        t = self.schedule.sigma_to_timestep(s, self.timestep)
        if t.is_floating_point():  # a float timestep: at least float32 (the net's time embedding)
            t = t.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        shape = (-1,) + (1,) * (x.ndim - 1)
        sqrt_ab = (1 + s * s).rsqrt()  # ab = 1 / (1 + sigma^2)
        # sqrt(1 - ab) = sigma sqrt(ab), written so that sigma = inf gives 1 rather than inf * 0
        sqrt_1m_ab = torch.where(torch.isinf(s), torch.ones_like(s), s * sqrt_ab)
        a, b = sqrt_ab.reshape(shape), sqrt_1m_ab.reshape(shape)
        xt = x * a.to(x.dtype)
        out = self.model(xt, t) if class_labels is None else \
            self.model(xt, t, class_labels=class_labels)
        return _split(self.schedule.config.prediction_type, xt, out, a, b)[0]

    def __repr__(self) -> str:
        return f"VPDenoiser({self.schedule!r}, timestep={self.timestep!r})"


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
# Sampling on the training timesteps: respacing and the integer-timestep step rules
#
# Respacing picks a subset of the training timesteps and the model always sees original-scale
# ``t`` (house rule 4). Coefficients are computed in float64 from the tables and cast to
# ``xt``'s dtype at the end. ``ab_t`` = alpha_bar at t, ``ab_prev`` = alpha_bar at t_prev (1 when
# t_prev = -1, the last step). For a respaced chain the effective per-step quantities are
# ``alpha'_t = ab_t / ab_prev`` and ``beta'_t = 1 - alpha'_t`` (Nichol & Dhariwal 2021, sec. 4).


def _round_half_even(num: int, den: int) -> int:
    """num / den rounded to the nearest integer, ties to even (as numpy's ``round``), exactly."""
    q, r = divmod(num, den)
    if 2 * r > den or (2 * r == den and q % 2):
        q += 1
    return q


def make_timesteps(num_train_timesteps: int, num_steps: int,
                   spacing: Spacing = "trailing") -> Tensor:
    """The ``num_steps`` training timesteps a sampler visits, descending, as an int64 (n,) tensor.

    The meanings are those of diffusers' ``timestep_spacing`` with ``steps_offset=0`` (Lin et al.
    2023, Table 2), for T = ``num_train_timesteps`` and n = ``num_steps``:

    - ``leading``:  ``arange(0, n) * (T // n)``, reversed (DDIM's original choice; never visits
      T-1, so it starts from a not-quite-pure-noise level).
    - ``trailing``: ``round(arange(T, 0, -T/n)) - 1``: always starts at T-1 (recommended).
    - ``linspace``: ``round(linspace(0, T-1, n))``, reversed.

    The values are computed with exact integer arithmetic (round half to even). diffusers does
    the same in floating point, which breaks a few exact .5 ties the other way (e.g. linspace
    with T=1000, n=27) and, for ``trailing``, sometimes returns n+1 steps (e.g. T=100, n=29);
    for all common step counts the two agree exactly.
    """
    T, n = num_train_timesteps, num_steps
    for name, value in (("num_train_timesteps", T), ("num_steps", n)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{name} must be an integer, got {value!r}")
    if T < 1:
        raise UsageError(f"num_train_timesteps must be positive, got {T}")
    if not 1 <= n <= T:
        raise UsageError(f"num_steps must be between 1 and num_train_timesteps ({T}), got {n}")
    if spacing == "leading":
        values = [i * (T // n) for i in range(n)][::-1]
    elif spacing == "trailing":
        values = [_round_half_even(T * (n - i), n) - 1 for i in range(n)]  # T - i*T/n, minus 1
    elif spacing == "linspace":
        if n == 1:
            values = [0]
        else:
            values = [_round_half_even(i * (T - 1), n - 1) for i in range(n)][::-1]
    else:
        raise UsageError(f"unknown timestep spacing {spacing!r}; choose one of "
                         f"{', '.join(repr(s) for s in get_args(Spacing))}")
    return torch.tensor(values, dtype=torch.int64)


def _coef(c: Tensor, like: Tensor) -> Union[float, Tensor]:
    """A float64 coefficient (0-d or (B,)) ready to multiply ``like`` (B, ...).

    A 0-d coefficient becomes a Python float (no device copy); a (B,) one becomes a
    (B, 1, ..., 1) tensor on ``like``'s device and dtype.
    """
    if c.ndim == 0:
        return float(c)
    return c.reshape(-1, *([1] * (like.ndim - 1))).to(device=like.device, dtype=like.dtype)


def _alpha_bars(schedule: NoiseSchedule, t: Timesteps, t_prev: Timesteps) -> tuple[Tensor, Tensor]:
    """(ab_t, ab_prev) as float64 CPU tensors (0-d or (B,)), after checking t_prev < t."""
    tt = torch.as_tensor(t).cpu()
    tp = torch.as_tensor(t_prev).cpu()
    if bool((tp >= tt).any()):
        raise UsageError(f"t_prev must be smaller than t (t_prev = -1 for the last step), got "
                         f"t={tt.tolist()}, t_prev={tp.tolist()}")
    return schedule.alpha_bar(t), schedule.alpha_bar(t_prev)


def ddpm_step(schedule: NoiseSchedule, out: Tensor, t: Timesteps, t_prev: Timesteps, xt: Tensor,
              *, noise: Optional[Tensor] = None, generator: Optional[Generators] = None,
              variance: Literal["fixed_small", "fixed_large"] = "fixed_small",
              clip_x0: bool = True, dynamic_threshold: Optional[float] = None,
              ) -> tuple[Tensor, Tensor]:
    """One ancestral DDPM step x_t -> x_{t_prev}, sampling the posterior q(x_prev | x_t, x0_hat).

    Args:
        out: the model output at (xt, t), (B, C, H, W), in the schedule's parametrisation.
        t, t_prev: current and previous timestep (Python int or 0-d tensor, or (B,) int tensors);
            ``t_prev`` need not be ``t - 1`` (respaced sampling); ``t_prev = -1`` is the last
            step, which returns the posterior mean (= x0_hat) without noise.
        xt: (B, C, H, W) current sample.
        noise: the step's standard normal noise (B, C, H, W); else drawn from ``generator`` (one
            generator, or a list of B, one per sample), else from a fresh OS-seeded generator.
            Not drawn at all on the last step.
        variance: ``fixed_small`` = the posterior variance beta~ (DDPM eq. 7), ``fixed_large`` =
            beta' (DDPM sec. 3.2's sigma^2 = beta).
        clip_x0: clamp x0_hat to [-1, 1] before forming the posterior mean (as the DDPM code).
        dynamic_threshold: a percentile such as 0.995 to use Imagen's dynamic thresholding
            instead of static clipping.

    Returns:
        (x_prev, x0_hat), both (B, C, H, W), x0_hat after clipping/thresholding.
    """
    if variance not in VARIANCES:
        raise UsageError(f"unknown DDPM variance {variance!r}; choose one of "
                          f"{', '.join(repr(v) for v in VARIANCES)}")
    check_randomness(noise, generator)
    ab_t, ab_prev = _alpha_bars(schedule, t, t_prev)
    alpha_step = ab_t / ab_prev  # alpha'_t of the (possibly respaced) chain
    beta_step = 1 - alpha_step  # beta'_t

    x0_hat, _ = schedule.split_output(xt, t, out)
    x0_hat, _ = clip_estimate(x0_hat, clip_x0, dynamic_threshold)

    # Posterior q(x_prev | x_t, x0) = N(mean, beta~ I), DDPM eq. 6-7 with beta' for beta:
    # mean = sqrt(ab_prev) beta' / (1 - ab_t) x0 + sqrt(alpha') (1 - ab_prev) / (1 - ab_t) x_t.
    c_x0 = ab_prev.sqrt() * beta_step / (1 - ab_t)
    c_xt = alpha_step.sqrt() * (1 - ab_prev) / (1 - ab_t)
    x_prev = _coef(c_x0, xt) * x0_hat + _coef(c_xt, xt) * xt

    if variance == "fixed_small":
        var = beta_step * (1 - ab_prev) / (1 - ab_t)  # beta~ (DDPM eq. 7); 0 at t_prev = -1
    else:
        var = beta_step.clone()
    # The last step (t_prev = -1) adds no noise, whatever the variance choice (DDPM Algorithm 2:
    # "z = 0 if t = 1"). diffusers instead tests t > 0, so for a respaced last step with t > 0 it
    # adds sqrt(beta') z under fixed_large (and 1e-10 z under fixed_small).
    var = torch.where(torch.as_tensor(t_prev).cpu() == -1, torch.zeros_like(var), var)
    if bool((var > 0).any()):
        z = gaussian(xt, noise, generator)
        x_prev = x_prev + _coef(var.sqrt(), xt) * z
    return x_prev, x0_hat


def ddim_step(schedule: NoiseSchedule, out: Tensor, t: Timesteps, t_prev: Timesteps, xt: Tensor,
              *, eta: float = 0.0, noise: Optional[Tensor] = None,
              generator: Optional[Generators] = None, clip_x0: bool = False,
              dynamic_threshold: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12).

    x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma z, with
    sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev) (eq. 16). ``eta = 0``
    is the deterministic DDIM sampler (``noise``/``generator`` are then ignored and no noise is
    drawn); ``eta = 1`` is exactly the DDPM ancestral step with ``fixed_small`` variance. When
    x0_hat is clipped or thresholded, eps_hat is re-derived from x_t and the clipped x0_hat (as
    diffusers' ``use_clipped_model_output=True``), which keeps that eta = 1 identity.

    Args:
        out: the model output at (xt, t), (B, C, H, W).
        t, t_prev: Python ints or 0-d tensors, or (B,) int tensors; t_prev = -1 on the last step.
        xt: (B, C, H, W). eta: in [0, 1]. noise / generator: as :func:`ddpm_step`.
        clip_x0: clamp x0_hat to [-1, 1]. dynamic_threshold: Imagen percentile, replaces clipping.

    Returns:
        (x_prev, x0_hat), both (B, C, H, W).
    """
    check_eta(eta)
    check_randomness(noise, generator)
    ab_t, ab_prev = _alpha_bars(schedule, t, t_prev)

    x0_hat, eps_hat = schedule.split_output(xt, t, out)
    x0_hat, clipped = clip_estimate(x0_hat, clip_x0, dynamic_threshold)
    if clipped:
        eps_hat = schedule.eps_from_x0(xt, t, x0_hat)

    # eq. 16; zero on the last step, where ab_prev = 1.
    sigma = eta * ((1 - ab_prev) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_prev).sqrt()
    # eq. 12: "predicted x0" + "direction pointing to x_t" (+ random noise). Clamped at 0 against
    # rounding: 1 - ab_prev - sigma^2 = (1 - ab_prev)(1 - eta^2 beta' / (1 - ab_t)) >= 0.
    c_dir = (1 - ab_prev - sigma**2).clamp(min=0).sqrt()
    x_prev = _coef(ab_prev.sqrt(), xt) * x0_hat + _coef(c_dir, xt) * eps_hat
    if bool((sigma > 0).any()):
        z = gaussian(xt, noise, generator)
        x_prev = x_prev + _coef(sigma, xt) * z
    return x_prev, x0_hat


def _half_log_snr(ab: Tensor) -> Tensor:
    """lambda = log(alpha / sigma) = (log(ab) - log(1 - ab)) / 2 for float64 ``ab``.

    +inf at ab = 1 (t = -1, no noise), -inf at ab = 0 (zero terminal SNR).
    """
    return 0.5 * (torch.log(ab) - torch.log1p(-ab))


def dpmpp_2m_step(schedule: NoiseSchedule, out: Tensor, t: Timesteps, t_prev: Timesteps,
                  xt: Tensor, *, prev_x0_hat: Optional[Tensor] = None,
                  prev_t: Optional[Timesteps] = None, clip_x0: bool = False,
                  dynamic_threshold: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """One DPM-Solver++(2M) step x_t -> x_{t_prev} (Lu et al. 2022, "DPM-Solver++", Algorithm 2).

    The multistep second-order solver of the diffusion ODE in its data-prediction form, in
    terms of lambda = log(alpha / sigma), alpha = sqrt(ab), sigma = sqrt(1 - ab). With
    h = lambda_prev - lambda_t and, when the previous step's estimate is given,
    r = (lambda_t - lambda_{prev_t}) / h:

        D      = (1 + 1/(2r)) x0_hat - 1/(2r) prev_x0_hat
        x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (exp(-h) - 1) D

    Without ``prev_x0_hat`` (the first step) D = x0_hat: the first-order DPM-Solver++ step,
    which is exactly DDIM with eta = 0 (:func:`ddim_step`). The last step (``t_prev = -1``,
    sigma_prev = 0, h = inf) is always first order and returns x0_hat itself; the second-order
    correction has no limit there (it grows like h). This is diffusers'
    ``final_sigmas_type="zero"`` (which forces ``lower_order_final``).

    A pure function (house rule 3): the caller carries the previous step's x0_hat and timestep
    from one call to the next (:func:`sample` does). It draws no noise.

    Args:
        out: the model output at (xt, t), (B, C, H, W).
        t, t_prev: current and target timestep (ints, 0-d or (B,) int tensors); t_prev = -1 on
            the last step.
        xt: (B, C, H, W) current sample.
        prev_x0_hat: the x0_hat returned by the previous step (at ``prev_t``), or None.
        prev_t: the previous step's timestep (> t); required with ``prev_x0_hat``.
        clip_x0, dynamic_threshold: as :func:`ddim_step`; applied to x0_hat (diffusers'
            ``thresholding``), so the returned, clipped x0_hat is what the next step uses.

    Returns:
        (x_prev, x0_hat), both (B, C, H, W). Coefficients are computed in float64 and cast to
        ``xt``'s dtype.
    """
    if (prev_x0_hat is None) != (prev_t is None):
        raise UsageError("dpmpp_2m_step: pass prev_x0_hat and prev_t together (both None on "
                          "the first step)")
    ab_t, ab_prev = _alpha_bars(schedule, t, t_prev)

    x0_hat, _ = schedule.split_output(xt, t, out)
    x0_hat, _ = clip_estimate(x0_hat, clip_x0, dynamic_threshold)

    lam_t, lam_prev = _half_log_snr(ab_t), _half_log_snr(ab_prev)
    h = lam_prev - lam_t  # > 0; inf on the last step or when starting from ab_t = 0
    ratio = ((1 - ab_prev) / (1 - ab_t)).sqrt()  # sigma_prev / sigma_t; 0 on the last step
    c_d = ab_prev.sqrt() * -torch.expm1(-h)  # -alpha_prev (exp(-h) - 1), 1 on the last step
    x_prev = _coef(ratio, xt) * xt
    if prev_x0_hat is None:
        return x_prev + _coef(c_d, xt) * x0_hat, x0_hat

    tt = torch.as_tensor(t).cpu()
    tp = torch.as_tensor(prev_t).cpu()
    if bool((tp <= tt).any()):
        raise UsageError(f"prev_t must be larger than t (the previous step was noisier), got "
                          f"prev_t={tp.tolist()}, t={tt.tolist()}")
    if prev_x0_hat.shape != x0_hat.shape:
        raise ValueError(f"prev_x0_hat has shape {tuple(prev_x0_hat.shape)}, expected "
                         f"{tuple(x0_hat.shape)}")
    h0 = lam_t - _half_log_snr(schedule.alpha_bar(prev_t))  # the previous step's h, > 0
    half_inv_r = 0.5 * h / h0  # 1/(2r); 0 when the previous step started from ab = 0 (h0 = inf)
    last = torch.as_tensor(t_prev).cpu() == -1
    # On the last step the correction is dropped (lower order final): D = x0_hat.
    c_x0 = torch.where(last, c_d, c_d * (1 + half_inv_r))
    c_prev = torch.where(last, torch.zeros_like(c_d), -c_d * half_inv_r)
    x_prev = x_prev + _coef(c_x0, xt) * x0_hat
    if bool((c_prev != 0).any()):
        x_prev = x_prev + _coef(c_prev, xt) * prev_x0_hat.to(xt.dtype)
    return x_prev, x0_hat


class TimestepPath(SamplingPath):
    """The native path of a VP model: ``options.sampler``'s integer-timestep rule (ddpm, ddim
    or dpmpp-2m) over ``make_timesteps(T, num_steps, spacing)`` and then t = -1, in VP scaling
    (the state is x_t itself, started from x_T). ``model(x_t, t)`` gets int64 (B,) timesteps
    (labels and guidance are already bound into it by the sampling loop)."""

    def __init__(self, model: Model, schedule: NoiseSchedule, options: StepOptions,
                 generator: Optional[Generators]) -> None:
        self.model, self.schedule, self.options, self.generator = model, schedule, options, generator
        self.levels = make_timesteps(schedule.num_train_timesteps, options.num_steps,
                                     options.spacing).tolist() + [-1]
        self._prev: Optional[tuple[Tensor, int]] = None  # dpmpp-2m: the previous (x0_hat, t)

    def start(self, x_T: Tensor) -> Tensor:
        return x_T

    def noised(self, x0: Tensor, i: int, z: Tensor) -> Tensor:
        return self.schedule.add_noise(x0, z, self.levels[i])

    def step(self, x: Tensor, i: int) -> tuple[Tensor, Tensor]:
        o, schedule = self.options, self.schedule
        t, t_prev = self.levels[i], self.levels[i + 1]
        out = self.model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
        if o.sampler == "ddpm":
            return ddpm_step(schedule, out, t, t_prev, x, generator=self.generator,
                             clip_x0=o.clip_x0)
        if o.sampler == "dpmpp-2m":
            prev_x0_hat, prev_t = self._prev if self._prev is not None else (None, None)
            x_next, x0_hat = dpmpp_2m_step(schedule, out, t, t_prev, x, prev_x0_hat=prev_x0_hat,
                                           prev_t=prev_t, clip_x0=o.clip_x0)
            self._prev = (x0_hat, t)
            return x_next, x0_hat
        return ddim_step(schedule, out, t, t_prev, x, eta=o.eta,
                         generator=self.generator if o.eta > 0 else None, clip_x0=o.clip_x0)

    def renoise(self, x: Tensor, i: int, z: Tensor) -> Tensor:
        # back from t_prev to t: q(x_t | x_t_prev) = N(sqrt(a') x, (1 - a') I),
        # a' = ab_t / ab_prev (DDPM eq. 2 for the respaced chain; RePaint eq. 8)
        a_step = self.schedule.alpha_bar(self.levels[i]) / self.schedule.alpha_bar(self.levels[i + 1])
        return _coef(a_step.sqrt(), x) * x + _coef((1 - a_step).sqrt(), z) * z
