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
"Loss weighting"). This module is the one place that converts between an EDM network's output
and x0 (house rule 2). EDM has no native sampling path: every sampler runs in sigma space on
its denoiser (the karras grid by default, as the paper samples).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from ..conditioning import Condition, network_kwargs
from .base import Denoiser, Formulation, Model, coefficient_dtype, per_image
from .settings import ScheduleConfig

__all__ = ["EDMSchedule", "EDMDenoiser", "edm_loss"]


class EDMSchedule(Formulation):
    """The EDM formulation of a ``ScheduleConfig(formulation="edm")``: noising, the Table 1
    preconditioning, the training noise distribution and the loss target.

    Float attributes ``sigma_data``, ``sigma_min``, ``sigma_max`` (the sampling range: samplers
    start at sigma_max and end at sigma_min before the last step to 0), ``p_mean``, ``p_std``.
    It holds no tensors; every method follows its tensor inputs' device and dtype (house rule 7).
    """

    name = "edm"
    title = "EDM"
    article = "an"
    config_fields = ("sigma_data", "sigma_min", "sigma_max", "p_mean", "p_std")
    network_fields = ("sigma_data",)  # the preconditioning; the rest is sampling and training
    own_weighting = "EDM's loss has its own weight"
    wrong_class_message = ("EDMSchedule needs 'edm', got {0.formulation!r}; build the schedule "
                           "a config names with diffunet.make_schedule")

    def __init__(self, config: ScheduleConfig) -> None:
        super().__init__(config)
        self.sigma_data = float(config.sigma_data)
        self.sigma_min = float(config.sigma_min)
        self.sigma_max = float(config.sigma_max)
        self.p_mean = float(config.p_mean)
        self.p_std = float(config.p_std)

    # -----------------------------------------------------------------------------------------
    # The formulation contract

    @classmethod
    def check_config(cls, config: ScheduleConfig, fail: Callable[[str, str], None]) -> None:
        for name in ("sigma_data", "sigma_min", "p_std"):
            if not getattr(config, name) > 0:
                fail(name, f"must be positive, got {getattr(config, name)}")
        if not config.sigma_max > config.sigma_min:
            fail("sigma_max", f"{config.sigma_max} must be larger than sigma_min "
                 f"{config.sigma_min}")

    @classmethod
    def describe(cls, config: ScheduleConfig) -> str:
        return (f"EDM formulation (Karras et al. 2022): sigma_data {config.sigma_data}, "
                f"sigma {config.sigma_min} to {config.sigma_max}, training ln(sigma) ~ "
                f"N({config.p_mean}, {config.p_std}^2)")

    def sample_levels(self, n: int, generator: torch.Generator) -> Tensor:
        return self.sample_sigmas(n, generator)

    def network_input(self, x0: Tensor, noise: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        """(c_in x, c_noise) at x = x0 + sigma noise (Table 1)."""
        _, _, c_in, c_noise = self.preconditioning(level, x0)
        return (c_in * self.add_noise(x0, noise, level)).to(x0.dtype), c_noise

    def loss(self, model: Model, x0: Tensor, noise: Tensor, level: Tensor, *,
             class_labels: Optional[Tensor] = None,
             min_snr_gamma: Optional[float] = None,
             cond: Optional[Condition] = None) -> Tensor:
        """:func:`edm_loss` of F(c_in x; c_noise) (B,); ``min_snr_gamma`` does not apply."""
        x_in, c_noise = self.network_input(x0, noise, level)
        out = model(x_in, c_noise, **network_kwargs(cond, class_labels))
        return edm_loss(self, out.float(), x0, noise, level)

    def ideal_output(self, x_in: Tensor, time_in: Tensor, x0: Tensor) -> Tensor:
        """F = (x0 - c_skip x) / c_out at sigma = exp(4 c_noise), x = x_in / c_in (eq. 7)."""
        sigma = (4 * time_in.to(torch.float64)).exp()
        c_skip, c_out, c_in, _ = self.preconditioning(sigma, x_in.to(torch.float64))
        x = x_in.to(torch.float64) / c_in
        return ((x0.to(torch.float64) - c_skip * x) / c_out).to(x_in.dtype)

    def sigma_of_time_input(self, time_in: Tensor) -> Tensor:
        """sigma = exp(4 c_noise), c_noise = ln(sigma) / 4 (Table 1)."""
        return (4 * time_in.to(coefficient_dtype(time_in.device))).exp()

    def grid_range(self) -> tuple[float, float]:
        """[sigma_min, sigma_max]: only the sampling default; any positive range goes."""
        return self.sigma_min, self.sigma_max

    def default_range(self) -> tuple[float, float]:
        """The config's own sampling range [sigma_min, sigma_max], uncapped: EDM states where
        its sampler starts (80 for sigma_data 0.5 by default), so a set ``schedule.sigma_max``
        is what the grid spans."""
        return self.grid_range()

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
        return x0 + per_image(sigma, x0) * noise

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
        s = per_image(sigma, like, dtype)
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
        s = per_image(sigma, x0, dtype)
        sd = self.sigma_data
        return (s / sd * x0.to(dtype) - sd * noise.to(dtype)) * (s * s + sd * sd).rsqrt()

    def denoiser(self, model: Callable[..., Tensor]) -> EDMDenoiser:
        """The denoiser D(x; sigma) of ``model`` under this preconditioning."""
        return EDMDenoiser(model, self)


class EDMDenoiser(Denoiser):
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
