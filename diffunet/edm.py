"""The EDM formulation (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"), written from the paper.

Noising is x = x0 + sigma n with a continuous noise level sigma (the "VE scaling" of the
denoiser view). The network F is wrapped by the preconditioning of the paper's Table 1 (eq. 7):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))
    c_skip = sd^2 / (sigma^2 + sd^2)      c_out = sigma sd / sqrt(sigma^2 + sd^2)
    c_in = 1 / sqrt(sigma^2 + sd^2)       c_noise = ln(sigma) / 4

(sd = ``sigma_data``), so the network still knows nothing about noise (house rule 1): it is
called as ``model(c_in x, c_noise, class_labels=y)`` with a float (B,) c_noise. Training draws
ln(sigma) ~ N(P_mean, P_std^2) (Table 1, "Noise distribution") and minimises
lambda(sigma) ||D(x; sigma) - x0||^2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2 (eq. 8,
"Loss weighting"). This module is, beside :mod:`diffunet.diffusion`, the one place that
converts between the network's output and x0 (house rule 2).

:func:`make_schedule` builds the schedule object a :class:`~diffunet.config.ScheduleConfig`
describes, VP or EDM: every place that rebuilds a schedule from a stored config goes through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch
from torch import Tensor

from .config import ScheduleConfig
from .diffusion import NoiseSchedule
from .errors import ConfigError, UsageError

__all__ = ["EDMSchedule", "EDMDenoiser", "Schedule", "edm_loss", "make_schedule"]


class EDMSchedule:
    """The EDM formulation of a ``ScheduleConfig(formulation="edm")``: noising, the Table 1
    preconditioning, the training noise distribution and the loss target.

    Float attributes ``sigma_data``, ``sigma_min``, ``sigma_max`` (the sampling range: samplers
    start at sigma_max and end at sigma_min before the last step to 0), ``p_mean``, ``p_std``.
    Like :class:`~diffunet.diffusion.NoiseSchedule` it is not an ``nn.Module`` and holds no
    tensors; every method follows its tensor inputs' device and dtype (house rule 7).
    """

    def __init__(self, config: ScheduleConfig) -> None:
        if config.formulation != "edm":
            raise ConfigError(f"schedule.formulation: EDMSchedule needs 'edm', got "
                              f"{config.formulation!r}; build a 'vp' schedule with "
                              "NoiseSchedule (or diffunet.edm.make_schedule for either)")
        self.config = config
        self.sigma_data = float(config.sigma_data)
        self.sigma_min = float(config.sigma_min)
        self.sigma_max = float(config.sigma_max)
        self.p_mean = float(config.p_mean)
        self.p_std = float(config.p_std)

    # -----------------------------------------------------------------------------------------
    # Noise levels and noising

    def sample_sigmas(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` training noise levels, (n,) float32 on the generator's device: ln(sigma) =
        P_mean + P_std z with z ~ N(0, 1) drawn from ``generator`` (Table 1, "Noise
        distribution"). Not clipped to [sigma_min, sigma_max]: the paper trains on the whole
        log-normal and only samples within that range."""
        z = torch.randn(n, generator=generator, device=generator.device)
        return (self.p_mean + self.p_std * z).exp()

    def add_noise(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        """x = x0 + sigma noise (eq. 1's perturbation with s(t) = 1). x0, noise (B, C, H, W);
        sigma (B,) (or a 0-d tensor / float). Returns x in x0's dtype and device."""
        return x0 + _per_image(sigma, x0) * noise

    # -----------------------------------------------------------------------------------------
    # The preconditioning (Table 1) and the loss (eq. 2 with eq. 8's weight)

    def preconditioning(self, sigma: Tensor, like: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) of Table 1 at ``sigma`` (B,) (or 0-d / float).

        The first three come back shaped (B, 1, ..., 1) to broadcast against ``like``
        (B, C, H, W), c_noise = ln(sigma) / 4 as (B,); all in at least float32 (``like``'s
        dtype if wider) on ``like``'s device. A sigma of exactly 0 gives c_skip = 1, c_out = 0
        (D(x; 0) = x, the limit) and a finite c_noise (ln of the smallest positive float), so
        the network output it multiplies by 0 is finite.
        """
        dtype = torch.promote_types(like.dtype, torch.float32)
        s = _per_image(sigma, like, dtype)
        sd2 = self.sigma_data ** 2
        total = s * s + sd2
        c_skip = sd2 / total
        c_out = s * self.sigma_data * total.rsqrt()
        c_in = total.rsqrt()
        c_noise = s.reshape(-1).expand(like.shape[0]) if s.ndim == 0 else s.reshape(-1)
        c_noise = c_noise.clamp(min=torch.finfo(dtype).tiny).log() / 4
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (eq. 8), same shape as ``sigma``: the
        weight of the x0-space loss ||D - x0||^2. It equals 1 / c_out^2, which is why
        :meth:`training_target` can train F with a unit weight instead."""
        sd2 = self.sigma_data ** 2
        return (sigma * sigma + sd2) / (sigma * sigma * sd2)

    def training_target(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        """What F is trained to output at x = add_noise(x0, noise, sigma): the effective
        target (x0 - c_skip x) / c_out of eq. 8, in the closed form
        (sigma / sd x0 - sd noise) / sqrt(sigma^2 + sd^2), which has no cancellation between
        x0 and c_skip x at small sigma. (B, C, H, W) in at least float32."""
        dtype = torch.promote_types(x0.dtype, torch.float32)
        s = _per_image(sigma, x0, dtype)
        sd = self.sigma_data
        return (s / sd * x0.to(dtype) - sd * noise.to(dtype)) * (s * s + sd * sd).rsqrt()

    def denoiser(self, model: Callable[..., Tensor]) -> EDMDenoiser:
        """The denoiser D(x; sigma) of ``model`` under this preconditioning."""
        return EDMDenoiser(model, self)

    def __repr__(self) -> str:
        return f"EDMSchedule({self.config!r})"


class EDMDenoiser:
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Karras et al. 2022, eq. 7, Table 1).

    Called as ``D(x, sigma, class_labels=None)``: x (B, C, H, W) in VE scaling (x0 + sigma n),
    sigma (B,) float tensor (float64 or x's dtype; a 0-d tensor or a float applies to the whole
    batch), class_labels (B,) long or None. Returns x0_hat (B, C, H, W) in x's dtype and on
    its device. ``sigma_min``/``sigma_max`` are the schedule's sampling range.
    """

    def __init__(self, model: Callable[..., Tensor], schedule: EDMSchedule) -> None:
        self.model = model
        self.schedule = schedule
        self.sigma_min = schedule.sigma_min
        self.sigma_max = schedule.sigma_max

    def __call__(self, x: Tensor, sigma: Tensor | float,
                 class_labels: Tensor | None = None) -> Tensor:
        c_skip, c_out, c_in, c_noise = self.schedule.preconditioning(
            torch.as_tensor(sigma), x)
        out = self.model((c_in * x).to(x.dtype), c_noise, class_labels=class_labels)
        return (c_skip * x + c_out * out.to(c_out.dtype)).to(x.dtype)

    def __repr__(self) -> str:
        return f"EDMDenoiser({self.schedule!r})"


Schedule = Union[NoiseSchedule, EDMSchedule]
"""Either schedule object: what :func:`make_schedule` builds and a model file holds."""


def make_schedule(config: ScheduleConfig) -> Schedule:
    """The schedule object ``config`` describes: a :class:`~diffunet.diffusion.NoiseSchedule`
    for ``formulation = "vp"``, an :class:`EDMSchedule` for ``"edm"``."""
    return EDMSchedule(config) if config.formulation == "edm" else NoiseSchedule(config)


def edm_loss(schedule: EDMSchedule, out: Tensor, x0: Tensor, noise: Tensor,
             sigma: Tensor) -> Tensor:
    """Per-sample EDM training loss, (B,): the mean over (C, H, W) of
    lambda(sigma) (D(x; sigma) - x0)^2 (eq. 2 with eq. 8's weight) for the network output
    ``out`` = F(c_in x; c_noise) at x = schedule.add_noise(x0, noise, sigma).

    Since D - x0 = c_out (F - (x0 - c_skip x) / c_out) and lambda c_out^2 = 1, the weighted
    x0-space loss equals the unit-weighted MSE of F against the effective target
    (:meth:`EDMSchedule.training_target`); that form is computed, as it neither multiplies a
    small difference by lambda ~ 1/sigma^2 at small sigma nor needs D. out, x0, noise
    (B, C, H, W); sigma (B,). At least float32 (half outputs are upcast).
    """
    target = schedule.training_target(x0, noise, sigma)
    err = (out.to(target.dtype) - target).square()
    return err.mean(dim=tuple(range(1, err.ndim)))


def _per_image(sigma: Tensor | float, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``sigma`` (B,), 0-d or a float as a tensor broadcasting against ``like`` (B, ...):
    (B, 1, ..., 1) or 0-d, on like's device in ``dtype`` (default like's)."""
    dtype = like.dtype if dtype is None else dtype
    s = torch.as_tensor(sigma).to(device=like.device, dtype=dtype)
    if s.ndim == 0:
        return s
    if s.ndim != 1 or s.shape[0] != like.shape[0]:
        raise UsageError(f"sigma must be a scalar or a (B,) tensor with B = {like.shape[0]}, "
                         f"got shape {tuple(s.shape)}")
    return s.reshape(-1, *([1] * (like.ndim - 1)))

