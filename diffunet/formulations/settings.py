"""The ``[schedule]`` section: one frozen, typed dataclass with every formulation's keys, and the
registry from its ``formulation`` name to the class that implements it.

The section lives beside the formulations that read it: each formulation class names its keys
(:attr:`~diffunet.formulations.base.Formulation.config_fields`) and their cross-field rules
(:meth:`~diffunet.formulations.base.Formulation.check_config`), and :class:`ScheduleConfig`
asks the registered class instead of knowing any formulation itself. :mod:`diffunet.config`
composes it into ``RunConfig`` (and re-exports it). The on-disk form is unchanged: a model file's
``schedule_config`` is this dataclass as JSON, and a key an older file lacks takes its default
(a file from before formulations existed is VP).

:data:`FORMULATIONS` is filled once, by :mod:`diffunet.formulations` (the package's
``__init__``), with every formulation class; importing anything from this package runs that
first, so a ``ScheduleConfig`` is never validated against a partial registry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..checks import check_finite, fail

if TYPE_CHECKING:  # pragma: no cover
    from .base import Formulation

__all__ = ["ScheduleConfig", "FormulationName", "BetaSchedule", "PredictionType",
           "TimestepDensity", "TimeDensity", "LossWeighting", "FORMULATIONS", "formulation_class"]

FormulationName = Literal["vp", "edm", "flow"]
"""``ScheduleConfig.formulation``: DDPM's discrete variance-preserving process, the EDM
formulation of Karras et al. 2022, or flow matching (rectified flow). The registry
:data:`FORMULATIONS` holds the same names (a test keeps the two equal)."""
BetaSchedule = Literal["linear", "scaled_linear", "cosine", "sigmoid"]
"""``schedule.beta_schedule`` (VP): how the betas grow over the T steps."""
PredictionType = Literal["epsilon", "v", "x0"]
"""``schedule.prediction_type`` (VP): what the network is trained to output."""
TimestepDensity = Literal["uniform", "logit_normal", "laplace"]
"""``schedule.timestep_density`` (VP): how training draws the integer timestep t in [0, T)."""
TimeDensity = Literal["uniform", "logit_normal", "mode"]
"""``schedule.time_density`` (flow): how training draws t in [0, 1] (Esser et al. 2024, sec. 3.1)."""
LossWeighting = Literal["none", "cosmap"]
"""``schedule.loss_weighting`` (flow): the weight of the velocity loss at t."""

FORMULATIONS: dict[str, type["Formulation"]] = {}
"""``schedule.formulation`` -> the class implementing it (``make_schedule`` builds one). Filled
by :mod:`diffunet.formulations`; a fourth formulation is one entry there."""


def formulation_class(name: str) -> type["Formulation"]:
    """The registered class of formulation ``name`` (a ``ScheduleConfig`` has already checked
    that it is one)."""
    return FORMULATIONS[name]


@dataclass(frozen=True)
class ScheduleConfig:
    """The forward noising process and what the network is trained to predict.

    ``formulation`` picks the formulation; each reads only its own keys
    (:meth:`used_fields`): ``vp`` (the default) the discrete process q(x_t | x_0) of DDPM,
    from ``num_train_timesteps`` to ``laplace_scale``, and ``logit_mean``/``logit_std``, which it
    shares with flow (:class:`~diffunet.formulations.vp.NoiseSchedule`); ``edm`` Karras et al. 2022
    ("Elucidating the Design Space of Diffusion-Based Generative Models"), x = x0 + sigma n with
    a continuous sigma and the network preconditioned as their Table 1 says, from
    ``sigma_data`` to ``p_std`` (:class:`~diffunet.formulations.edm.EDMSchedule`); ``flow``
    flow matching, x_t = (1 - t) x0 + t noise with a velocity-predicting network,
    ``num_train_timesteps`` and the keys from ``shift`` on
    (:class:`~diffunet.formulations.flow.FlowSchedule`). A key only another formulation reads,
    set away from its default, is an error naming it; VP's keys are the exception (the default
    run sets them), so switching a run to ``edm`` or ``flow`` needs no reset.
    """

    formulation: FormulationName = "vp"
    num_train_timesteps: int = 1000
    """VP: the discrete timesteps T. flow: the scale of the network's time input (t x T, as
    diffusers' flow schedulers call the model) and of its grid's small end (1 / T)."""
    beta_schedule: BetaSchedule = "linear"
    beta_start: float = 0.0001
    """First beta for ``linear``/``scaled_linear``/``sigmoid`` (DDPM: 1e-4)."""
    beta_end: float = 0.02
    """Last beta for ``linear``/``scaled_linear``/``sigmoid`` (DDPM: 0.02)."""
    prediction_type: PredictionType = "epsilon"
    rescale_zero_terminal_snr: bool = False
    """Rescale betas so the last step is pure noise (Lin et al. 2023, Algorithm 1)."""
    timestep_density: TimestepDensity = "uniform"
    """``vp``: the training density of the timestep t: ``uniform`` on 0..T-1 (DDPM Algorithm 1);
    ``logit_normal``, u = sigmoid(logit_mean + logit_std z) as flow's (Esser et al. 2024,
    sec. 3.1) and t = floor(u T), the timestep whose slice [t/T, (t+1)/T) of the way to noise
    holds u; or ``laplace``, the log-SNR lambda ~ Laplace(laplace_mean, laplace_scale) (Hang et
    al. 2024, "Improved Noise Schedule for Diffusion Training") and t the timestep whose
    log-SNR is nearest. ``train.min_snr_gamma`` weights the loss on top of the density, so the
    effective weight of a level is density x min-SNR weight."""
    laplace_mean: float = 0.0
    """``vp``, ``laplace``: the centre mu of the log-SNR density (0: where signal and noise are
    equal)."""
    laplace_scale: float = 0.5
    """``vp``, ``laplace``: the scale b of the log-SNR density, p(lambda) = exp(-|lambda - mu| / b)
    / (2 b) (Hang et al.'s choice: 0.5)."""
    sigma_data: float = 0.5
    """``edm``: the standard deviation of the data in the preconditioning (Table 1; 0.5 for
    images in [-1, 1])."""
    sigma_min: float = 0.002
    """``edm``: the smallest noise level the samplers visit (Karras et al. Table 1)."""
    sigma_max: float = 80.0
    """``edm``: the largest noise level, where sampling starts from sigma_max-scaled noise."""
    p_mean: float = -1.2
    """``edm``: training noise levels are log-normal, ln(sigma) ~ N(p_mean, p_std^2) (sec. 5)."""
    p_std: float = 1.2
    """``edm``: the standard deviation of ln(sigma) while training."""
    shift: float = 1.0
    """``flow``: the time shift s, t' = s t / (1 + (s - 1) t) (Esser et al. 2024, eq. 23), on the
    training draws and the sampling grid (once each); s > 1 spends more time at high noise."""
    time_density: TimeDensity = "logit_normal"
    """``flow``: the training density of t: ``uniform``, ``logit_normal`` (t = sigmoid(m + s z),
    Esser et al.'s default m = 0, s = 1) or ``mode`` (their mode sampling with heavy tails)."""
    logit_mean: float = 0.0
    """``flow`` and ``vp``, ``logit_normal`` density: the mean m of logit(t) (VP: of t / T)."""
    logit_std: float = 1.0
    """``flow`` and ``vp``, ``logit_normal`` density: the standard deviation s of logit(t)."""
    mode_scale: float = 1.29
    """``flow``, ``mode``: the scale c of f(u) = 1 - u - c (cos^2(pi u / 2) - 1 + u), in
    [-1, 2 / (pi - 2)] (Esser et al. eq. 20; they use 1.29)."""
    loss_weighting: LossWeighting = "none"
    """``flow``: ``none`` (the plain velocity MSE) or ``cosmap`` (w(t) = 2 / (pi (1 - 2t + 2t^2)),
    Esser et al. sec. 3.1)."""

    def __post_init__(self) -> None:
        check_finite(self, "schedule")
        p = "schedule."
        if self.num_train_timesteps < 2:
            fail(p + "num_train_timesteps", f"must be at least 2, got {self.num_train_timesteps}")
        if not 0.0 < self.beta_start < 1.0:
            fail(p + "beta_start", f"must be in (0, 1), got {self.beta_start}")
        if not 0.0 < self.beta_end < 1.0:
            fail(p + "beta_end", f"must be in (0, 1), got {self.beta_end}")
        if self.beta_start > self.beta_end:
            fail(p + "beta_start", f"{self.beta_start} is larger than beta_end {self.beta_end}")
        active = formulation_class(self.formulation)
        # A key of another formulation, set: refused (VP's keys excepted: see the docstring).
        lenient = formulation_class(_DEFAULT_FORMULATION).config_fields
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in active.config_fields or f.name in lenient or value == f.default:
                continue
            owner = next((cls for cls in FORMULATIONS.values() if f.name in cls.config_fields),
                         None)
            if owner is not None:
                fail(p + f.name, f"{value} is {owner.article} {owner.title} setting, unused with "
                     f"formulation {self.formulation!r}; set schedule.formulation={owner.name} "
                     f"or leave it at its default {f.default}")
        active.check_config(self, lambda key, problem: fail(p + key, problem))

    def used_fields(self) -> tuple[str, ...]:
        """The fields that mean something under this formulation, ``formulation`` first (what
        ``diffunet info`` shows; the others are stored but unused)."""
        return ("formulation", *formulation_class(self.formulation).config_fields)

    def describe(self) -> str:
        """The schedule in a few words, for the training header and ``diffunet info``."""
        return formulation_class(self.formulation).describe(self)

    @property
    def table_timesteps(self) -> int | None:
        """Entries of the float64 schedule tables (what memory checks count before anything is
        built), or None for a formulation without tables (a continuous level)."""
        return formulation_class(self.formulation).table_entries(self) or None


_DEFAULT_FORMULATION: str = ScheduleConfig.__dataclass_fields__["formulation"].default
"""The formulation of ``ScheduleConfig()`` (VP), whose keys the default run sets."""
