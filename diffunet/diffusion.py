"""The forward (noising) process and the training loss.

:class:`NoiseSchedule` holds the float64 tables of a discrete-time diffusion (Ho et al. 2020,
"DDPM") and is the one place that knows what the network predicts (house rule 2): noise
(``epsilon``), velocity (``v``, Salimans & Ho 2022) or clean data (``x0``). Everything else, the
step rules in :mod:`diffunet.samplers` and the bound in
:mod:`diffunet.likelihood` included, goes through :meth:`NoiseSchedule.target`,
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
from typing import Union, get_args

import torch
from torch import Tensor

from .config import BetaSchedule, PredictionType, ScheduleConfig
from .errors import ConfigError, UsageError, require

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
        idx = self.table_index(t)
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
            raise UsageError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
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
