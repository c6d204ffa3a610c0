"""The flow-matching formulation (rectified flow), written from the papers: Liu et al. 2022
("Flow Straight and Fast"), Lipman et al. 2022 ("Flow Matching for Generative Modeling") and, for
the time densities and the shift, Esser et al. 2024 ("Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis", SD3).

Noising is the straight line x_t = (1 - t) x0 + t noise, t in [0, 1] (t = 1 is pure noise), and
the network predicts the velocity v = dx_t/dt = noise - x0 with a plain MSE (optionally weighted
by Esser et al.'s ``cosmap``). Training draws t from ``time_density`` and then shifts it,
t' = s t / (1 + (s - 1) t) (Esser et al. sec. 5.3.2); the sampling grid is shifted the same way,
each once. The network is called with t x T (T = ``num_train_timesteps``, 1000 by default) as
its time input, a float, as diffusers' FlowMatch schedulers hand their ``timesteps`` to a model,
so an exported flow model runs in diffusers' flow loop unchanged.

The denoiser view: x_t = (1 - t) x0 + t n is x = x0 + sigma n scaled by 1 - t with
sigma = t / (1 - t), so D(x; sigma) = x_t - t v at x_t = x / (1 + sigma), t = sigma / (1 + sigma).
Every sampler runs on it in sigma space. On the ``uniform`` grid, which is exactly
``FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(N)``'s (:func:`flow_grid`), the
native path (:class:`FlowPath`) steps x_t itself in t, so t = 1 is handled exactly: image i
starts from the same per-image standard normal draw as on any model, x_t = x_T at t = 1. Its
rules are diffusers' flow rules: Euler (``FlowMatchEulerDiscreteScheduler``), Heun
(``FlowMatchHeunDiscreteScheduler``), DPM-Solver++(2M) and its SDE form
(``DPMSolverMultistepScheduler`` with flow sigmas) and the ancestral DDIM/DDPM step, each the
exponential-integrator form in flow scaling (alpha_t = 1 - t, sigma_t = t).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..conditioning import Condition, network_kwargs
from ..randomness import Generators, gaussian
from .base import (Denoiser, Formulation, Model, SamplingPath, StepOptions, batch_sigmas,
                   clip_estimate, coefficient_dtype, per_image)
from .settings import ScheduleConfig

__all__ = ["FlowSchedule", "FlowDenoiser", "FlowPath", "flow_grid", "flow_loss", "shift_time",
           "MODE_SCALE_MAX", "NATIVE_SAMPLERS"]

MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)
"""The largest ``mode_scale`` for which mode sampling's f(u) maps [0, 1] onto [0, 1]
monotonically (Esser et al. eq. 20: -1 <= s <= 2 / (pi - 2))."""
NATIVE_SAMPLERS: tuple[str, ...] = ("euler", "heun", "dpmpp-2m", "dpmpp-2m-sde", "ddim",
                                    "euler-ancestral", "ddpm")
"""The samplers :class:`FlowPath` runs natively on the uniform grid (Heun with churn is the
exception: it takes the sigma path, where EDM's Algorithm 2 defines the churn)."""


def shift_time(t: Union[Tensor, float], shift: float) -> Union[Tensor, float]:
    """t' = s t / (1 + (s - 1) t) (Esser et al. 2024, sec. 5.3.2; diffusers' ``shift``): maps
    [0, 1] onto [0, 1], fixing both ends; s > 1 moves every t towards noise."""
    return shift * t / (1 + (shift - 1) * t)


def flow_grid(num_steps: int, num_train_timesteps: int, shift: float) -> list[float]:
    """The t of ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=s)
    .set_timesteps(num_steps)`` (its ``sigmas`` without the final 0), computed as diffusers does
    so the values are the same float32 numbers (returned as Python floats):

    - at construction it shifts the training grid t = (1..T) / T in float32, so its ends are
      t_max = s(1) = 1 and t_min = s(1 / T);
    - ``set_timesteps`` spaces N points linearly from t_max to t_min (float64) and shifts them
      **again**: the grid ends at s(s(1 / T)), not s(1 / T) (its small end is shifted twice; the
      top, 1, is a fixed point of the shift). The grid is then rounded to float32.
    """
    T = num_train_timesteps
    ends = torch.tensor([float(np.float32(T)), 1.0], dtype=torch.float32) / T
    ends = shift * ends / (1 + (shift - 1) * ends)  # float32, as the scheduler's constructor
    t_max, t_min = ends[0].item(), ends[1].item()
    ts = np.linspace(t_max * T, t_min * T, num_steps) / T
    ts = shift * ts / (1 + (shift - 1) * ts)
    return [float(v) for v in ts.astype(np.float32)]


def flow_loss(schedule: "FlowSchedule", out: Tensor, x0: Tensor, noise: Tensor,
              t: Tensor) -> Tensor:
    """Per-image flow-matching loss, (B,): the mean over (C, H, W) of (out - (noise - x0))^2
    (the conditional flow matching objective, Lipman et al. eq. 9 with the straight path of
    Liu et al.), times the ``cosmap`` weight 2 / (pi (1 - 2t + 2t^2)) where
    ``loss_weighting = "cosmap"`` (Esser et al. sec. 3.1). ``out`` is the network's velocity at
    x_t = schedule.add_noise(x0, noise, t); out, x0, noise (B, C, H, W), t (B,). At least
    float32."""
    dtype = torch.promote_types(out.dtype, torch.float32)
    err = (out.to(dtype) - (noise.to(dtype) - x0.to(dtype))).square()
    loss = err.mean(dim=tuple(range(1, err.ndim)))
    if schedule.config.loss_weighting == "cosmap":
        tt = t.to(dtype)
        loss = loss * (2 / (math.pi * (1 - 2 * tt + 2 * tt * tt)))
    return loss


class FlowSchedule(Formulation):
    """The flow-matching formulation of a ``ScheduleConfig(formulation="flow")`` (see the module
    docstring). Float attributes ``shift`` and ``num_train_timesteps`` (T); holds no tensors."""

    name = "flow"
    title = "flow-matching"
    config_fields = ("num_train_timesteps", "shift", "time_density", "logit_mean", "logit_std",
                     "mode_scale", "loss_weighting")
    network_fields = ("num_train_timesteps",)  # the time input is t x T; shift and density
    # decide where training and the grid spend their levels, not what the network predicts
    timestep_inputs = True
    uniform_grid = True
    native_samplers = NATIVE_SAMPLERS
    diffusers_scheduler = "FlowMatchEulerDiscreteScheduler"
    own_weighting = "flow matching's loss has its own weighting, schedule.loss_weighting"
    wrong_class_message = ("FlowSchedule needs 'flow', got {0.formulation!r}; build the schedule "
                           "a config names with diffunet.make_schedule")

    def __init__(self, config: ScheduleConfig) -> None:
        super().__init__(config)
        self.shift = float(config.shift)
        self.num_train_timesteps = int(config.num_train_timesteps)

    # -----------------------------------------------------------------------------------------
    # Config

    @classmethod
    def check_config(cls, config: ScheduleConfig, fail: Callable[[str, str], None]) -> None:
        if config.num_train_timesteps < 3:
            fail("num_train_timesteps", f"must be at least 3 for flow matching (its grid's ends "
                 f"are t = 1/T and (T-1)/T), got {config.num_train_timesteps}")
        if not config.shift > 0:
            fail("shift", f"must be positive (1 = no shift; SD3 uses 3), got {config.shift}")
        if not math.isfinite(config.shift * config.num_train_timesteps):
            fail("shift", f"{config.shift} x num_train_timesteps overflows: the grid's largest "
                 "noise level, shift (T - 1), must be a finite number")
        if not config.logit_std > 0:
            fail("logit_std", f"must be positive, got {config.logit_std}")
        if not -1.0 <= config.mode_scale <= MODE_SCALE_MAX:
            fail("mode_scale", f"must be in [-1, {MODE_SCALE_MAX:.4f}] (2 / (pi - 2): beyond "
                 f"it mode sampling's f(u) leaves [0, 1]), got {config.mode_scale}")

    @classmethod
    def describe(cls, config: ScheduleConfig) -> str:
        density = {"uniform": "uniform t",
                   "logit_normal": f"logit-normal t ({config.logit_mean}, {config.logit_std})",
                   "mode": f"mode-sampled t (scale {config.mode_scale})"}[config.time_density]
        weighting = ", cosmap weighting" if config.loss_weighting == "cosmap" else ""
        return (f"flow matching (rectified flow): velocity prediction, {density}, shift "
                f"{config.shift}{weighting}")

    # -----------------------------------------------------------------------------------------
    # Training

    def sample_levels(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` training times t in [0, 1], (n,) float32 on the generator's device: u from
        ``time_density`` (uniform; sigmoid of N(logit_mean, logit_std^2); or mode sampling's
        f(u) = 1 - u - c (cos^2(pi u / 2) - 1 + u) of a uniform u, Esser et al. eq. 20), then
        shifted, t = s u / (1 + (s - 1) u)."""
        c, dev = self.config, generator.device
        if c.time_density == "logit_normal":
            z = torch.randn(n, generator=generator, device=dev)
            u = torch.sigmoid(c.logit_mean + c.logit_std * z)
        else:
            u = torch.rand(n, generator=generator, device=dev)
            if c.time_density == "mode":
                u = 1 - u - c.mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
        return shift_time(u, self.shift)

    def add_noise(self, x0: Tensor, noise: Tensor, level: Union[Tensor, float]) -> Tensor:
        """x_t = (1 - t) x0 + t noise; t (B,), 0-d or a float. x0's dtype and device."""
        t = per_image(level, x0)
        return (1 - t) * x0 + t * noise

    def time_input(self, t: Tensor) -> Tensor:
        """The network's time input for t: t x T (float)."""
        return t * self.num_train_timesteps

    def network_input(self, x0: Tensor, noise: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        return self.add_noise(x0, noise, level), self.time_input(level)

    def loss(self, model: Model, x0: Tensor, noise: Tensor, level: Tensor, *,
             class_labels: Optional[Tensor] = None,
             min_snr_gamma: Optional[float] = None,
             cond: Optional[Condition] = None) -> Tensor:
        """:func:`flow_loss` of the network's velocity at x_t (B,); ``min_snr_gamma`` does not
        apply (the weighting is ``schedule.loss_weighting``)."""
        x_t, time_in = self.network_input(x0, noise, level)
        out = model(x_t, time_in, **network_kwargs(cond, class_labels))
        return flow_loss(self, out.float(), x0, noise, level)

    def ideal_output(self, x_in: Tensor, time_in: Tensor, x0: Tensor) -> Tensor:
        """v = noise - x0 = (x_t - x0) / t at t = time_in / T (t > 0)."""
        t = per_image(time_in.to(torch.float64) / self.num_train_timesteps, x_in, torch.float64)
        return ((x_in.to(torch.float64) - x0.to(torch.float64)) / t).to(x_in.dtype)

    # -----------------------------------------------------------------------------------------
    # Sampling

    def denoiser(self, model: Model) -> "FlowDenoiser":
        return FlowDenoiser(model, self)

    def sigma_of_time_input(self, time_in: Tensor) -> Tensor:
        """sigma = t / (1 - t) at t = time_in / T (inf at t = 1)."""
        t = time_in.to(coefficient_dtype(time_in.device)) / self.num_train_timesteps
        return torch.where(t < 1, t / (1 - t), torch.full_like(t, math.inf))

    def grid_range(self) -> tuple[float, float]:
        """The sigma of the shifted training grid's ends below t = 1: t = 1 / T and (T - 1) / T
        shifted, i.e. s / (T - 1) and s (T - 1) (the shift multiplies sigma = t / (1 - t))."""
        T = self.num_train_timesteps
        return self.shift / (T - 1), self.shift * (T - 1)

    def uniform_sigmas(self, num_steps: int, spacing: str) -> Tensor:
        """:func:`flow_grid` as sigma = t / (1 - t) (inf at t = 1), then 0. ``spacing`` is a
        VP setting; diffusers' flow grid is linear in t."""
        ts = torch.tensor(flow_grid(num_steps, self.num_train_timesteps, self.shift),
                          dtype=torch.float64)
        sig = torch.where(ts < 1, ts / (1 - ts), torch.full_like(ts, math.inf))
        return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])

    def native_levels(self, options: StepOptions, grid: str) -> Optional[tuple[str, list]]:
        if grid != "uniform" or options.sampler not in NATIVE_SAMPLERS or (
                options.sampler == "heun" and options.s_churn > 0):
            return None
        return "flow_t", flow_grid(options.num_steps, self.num_train_timesteps, self.shift)

    def native_path(self, model: Model, options: StepOptions, grid: str,
                    generator: Optional[Generators]) -> Optional[SamplingPath]:
        if self.native_levels(options, grid) is None:
            return None
        return FlowPath(model, self, options, generator)

    def level_of_timestep(self, t: int) -> Tensor:
        """t / T: diffusers' flow timestep t x T read back."""
        return torch.tensor([t / self.num_train_timesteps], dtype=torch.float32)


class FlowDenoiser(Denoiser):
    """D(x; sigma) of a velocity network: x_t = x / (1 + sigma), t = sigma / (1 + sigma), and
    D = x_t - t v(x_t, t x T). x (B, C, H, W) in VE scaling, sigma (B,) (or a scalar), finite:
    the sampling loop steps t = 1 natively. Returns x0_hat in x's dtype, on its device."""

    def __init__(self, model: Model, schedule: FlowSchedule) -> None:
        self.model = model
        self.schedule = schedule
        self.sigma_min, self.sigma_max = schedule.grid_range()

    def __call__(self, x: Tensor, sigma: Union[float, Tensor],
                 class_labels: Optional[Tensor] = None) -> Tensor:
        s = batch_sigmas(sigma, x)
        dtype = s.dtype
        t = s / (1 + s)
        tt = t.reshape(-1, *([1] * (x.ndim - 1)))
        x_t = (x * (1 - tt).to(x.dtype))
        time_in = self.schedule.time_input(t).to(torch.float64 if x.dtype == torch.float64
                                                 else torch.float32)
        v = self.model(x_t, time_in) if class_labels is None else \
            self.model(x_t, time_in, class_labels=class_labels)
        return (x_t.to(dtype) - tt * v.to(dtype)).to(x.dtype)

    def __repr__(self) -> str:
        return f"FlowDenoiser({self.schedule!r})"


def _lam(t: float) -> float:
    """lambda = log(alpha_t / sigma_t) = log((1 - t) / t) in flow scaling (-inf at t = 1)."""
    if t >= 1:
        return -math.inf
    return math.log1p(-t) - math.log(t)


class FlowPath(SamplingPath):
    """The native path of a flow model: the state is x_t itself, stepped down ``levels`` (t,
    descending, ending at 0; default :func:`flow_grid` of the options) with diffusers' flow
    rules (see the module docstring). ``model(x_t, time)`` gets float32 (B,) times t x T
    (labels and guidance are already bound into it by the sampling loop)."""

    def __init__(self, model: Model, schedule: FlowSchedule, options: StepOptions,
                 generator: Optional[Generators], levels: Optional[Sequence[float]] = None) -> None:
        self.model, self.schedule, self.options, self.generator = model, schedule, options, generator
        ts = (list(levels) if levels is not None
              else flow_grid(options.num_steps, schedule.num_train_timesteps, schedule.shift))
        self.levels = ts + [0.0] if ts[-1] != 0 else ts
        self._prev: Optional[tuple[Tensor, float]] = None  # the multistep rules' (x0_hat, h)

    # -- the state ---------------------------------------------------------------------------

    def start(self, x_T: Tensor) -> Tensor:
        t = self.levels[0]
        return x_T if t == 1 else t * x_T

    def noised(self, x0: Tensor, i: int, z: Tensor) -> Tensor:
        t = self.levels[i]
        return (1 - t) * x0 + t * z

    def renoise(self, x: Tensor, i: int, z: Tensor) -> Tensor:
        # x_t from x_{t'} (t' < t) with the forward process's marginal: the VE step
        # x + sqrt(sigma^2 - sigma'^2) z, scaled by 1 - t (sigma = t / (1 - t)).
        t, tn = self.levels[i], self.levels[i + 1]
        keep = (1 - t) / (1 - tn)
        return keep * x + math.sqrt(max(t * t - (keep * tn) ** 2, 0.0)) * z

    # -- the rules ---------------------------------------------------------------------------

    def _denoise(self, x: Tensor, t: float) -> Tensor:
        time_in = torch.full((x.shape[0],), t * self.schedule.num_train_timesteps,
                             dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                             device=x.device)
        v = self.model(x, time_in)
        x0_hat = x - t * v.to(x.dtype)
        return clip_estimate(x0_hat, self.options.clip_x0)[0]

    def step(self, x: Tensor, i: int) -> tuple[Tensor, Tensor]:
        t, tn = self.levels[i], self.levels[i + 1]
        sampler = self.options.sampler
        x0 = self._denoise(x, t)
        if tn == 0:
            return x0, x0  # every rule's last step returns the estimate itself
        if sampler == "heun":
            # FlowMatchHeunDiscreteScheduler: the trapezoid of the two slopes dx_t/dt
            d = (x - x0) / t
            x_euler = x + (tn - t) * d
            d_next = (x_euler - self._denoise(x_euler, tn)) / tn
            return x + (tn - t) * (0.5 * d + 0.5 * d_next), x0
        # alpha_t = 1 - t, sigma_t = t; h = lambda' - lambda (inf from t = 1)
        h = _lam(tn) - _lam(t)
        eta = self.options.eta  # the rule's step noise (euler, dpmpp-2m: 0; ddpm: 1)
        if sampler in ("dpmpp-2m", "dpmpp-2m-sde"):
            # DPM-Solver++(2M), Lu et al. 2022 Algorithm 2 (midpoint form), and its SDE form:
            # x' = (t'/t) e^{-eta h} x + (1-t')(1 - e^{-(1+eta) h}) (x0 + (h / 2 h_prev)(x0 - x0_prev))
            #      + t' sqrt(1 - e^{-2 eta h}) z
            eta_h = eta * h if eta > 0 else 0.0  # (0 x inf is nan: h is inf from t = 1)
            c = -math.expm1(-h - eta_h)
            x_next = (tn / t * math.exp(-eta_h)) * x + ((1 - tn) * c) * x0
            if self._prev is not None:
                prev_x0, h_prev = self._prev
                x_next = x_next + ((1 - tn) * c * 0.5 * h / h_prev) * (x0 - prev_x0)
            self._prev = (x0, h)
            if eta > 0:
                x_next = x_next + (tn * math.sqrt(-math.expm1(-2 * eta_h))) * gaussian(
                    x, None, self.generator)
            return x_next, x0
        # DDIM's step (Song et al. 2021, eq. 12 and 16) in flow scaling: eta 0 is Euler
        # (FlowMatchEulerDiscreteScheduler), eta 1 the DDPM posterior step.
        c = eta * tn * math.sqrt(-math.expm1(-2 * h))
        eps = (x - (1 - t) * x0) / t
        x_next = (1 - tn) * x0 + math.sqrt(max(tn * tn - c * c, 0.0)) * eps
        if c > 0:
            x_next = x_next + c * gaussian(x, None, self.generator)
        return x_next, x0
