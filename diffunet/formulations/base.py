"""The formulation contract: everything the rest of diffunet may ask a formulation, and the few
helpers every formulation shares.

A *formulation* turns the UNet into a generative model. It owns, and nothing outside
:mod:`diffunet.formulations` knows (docs/design.md, house rule 2):

- **training**: the level drawn for each image (:meth:`Formulation.sample_levels`), how x0 is
  noised to it (:meth:`~Formulation.add_noise`), what the network sees
  (:meth:`~Formulation.network_input`) and the loss with its weighting
  (:meth:`~Formulation.loss`, the whole objective: noising, the network call, the loss);
- **sampling**: the denoiser view D(x; sigma) of Karras et al. 2022 (sec. 2) on x = x0 + sigma n
  (:meth:`~Formulation.denoiser`), its finite sigma range (:meth:`~Formulation.grid_range`)
  and the part of it a grid spans by default (:meth:`~Formulation.default_range`),
  the grid it contributes (:meth:`~Formulation.uniform_sigmas`) and, optionally, an exact
  native sampling path on that grid (:meth:`~Formulation.native_path`), which the sampling
  loop runs instead of the sigma-space solver;
- **config**: which ``[schedule]`` keys it reads (:attr:`~Formulation.config_fields`), their
  cross-field rules (:meth:`~Formulation.check_config`), a one-line description and the memory
  of its tables, all answerable from a ``ScheduleConfig`` before anything is built;
- **capabilities**, as class attributes the commands read instead of asking for a name.

Every formulation is registered in :data:`diffunet.formulations.FORMULATIONS` under its
``name``; ``make_schedule(config)`` builds the one a config names. A formulation module never
imports another formulation's module.

Levels: each formulation trains and samples on its own level variable (VP: integer timesteps
t in [0, T); EDM: sigma; flow: t in [0, 1]). The sigma of the denoiser view is the common
currency: for the "VE" variable x = x0 + sigma n the network sees c(sigma) x, with
c = 1 / sqrt(1 + sigma^2) for VP (x_t), 1 / (1 + sigma) for flow (x_t) and Table 1's
c_in = 1 / sqrt(sigma^2 + sigma_data^2) for EDM.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, Union

import torch
from torch import Tensor

from ..conditioning import Condition
from ..errors import ConfigError, UsageError
from ..randomness import Generators

__all__ = ["Formulation", "Denoiser", "SamplingPath", "StepOptions", "ScheduleSettings", "Model",
           "Spacing", "coefficient_dtype", "per_image", "batch_sigmas", "clip_estimate", "dynamic_threshold",
           "check_eta", "DEFAULT_SIGMA_MAX", "CLIP_RANGE"]

ScheduleSettings = Any
"""A :class:`diffunet.config.ScheduleConfig`. The config layer sits above this package (its
validation asks the formulations for their rules), so the class is not imported here."""
Model = Callable[..., Tensor]
"""The network: ``model(x, t)`` or ``model(x, t, class_labels=y)``, output shaped like x."""
Spacing = Literal["leading", "trailing", "linspace"]
"""Which training timesteps a VP model's uniform grid visits (diffusers' ``timestep_spacing``;
:func:`diffunet.formulations.vp.make_timesteps`)."""


DEFAULT_SIGMA_MAX = 160.0
"""The top of the karras and exponential grids where ``sigma_max`` is unset and the model's range
reaches higher (:meth:`Formulation.default_range`): twice Karras et al. 2022's 80 (chosen for
data of standard deviation 0.5), so that x = x0 + sigma n is noise to the sampler also for
images far from zero mean (the built-in shapes' pixels average -0.65, digits' about -0.8).
Measured against 80 with the built-in judge on VP and flow models: 160 was as good or better at
every step count from 5 to 50 (docs/samplers.md, "The default grid's range"). An explicit
``sigma_max`` still reaches the model's whole range."""


# ---------------------------------------------------------------------------------------------
# Shared helpers


def coefficient_dtype(device: Union[torch.device, str]) -> torch.dtype:
    """The dtype schedule coefficients are formed in on ``device``: float64, or float32 where
    the device has no float64 (Apple's MPS). Results are cast to the sample's dtype after."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def per_image(value: Union[Tensor, float], like: Tensor, dtype: Optional[torch.dtype] = None
              ) -> Tensor:
    """``value`` (B,), 0-d or a float as a tensor broadcasting against ``like`` (B, ...):
    (B, 1, ..., 1) or 0-d, on like's device in ``dtype`` (default like's)."""
    dtype = like.dtype if dtype is None else dtype
    s = torch.as_tensor(value).to(device=like.device, dtype=dtype)
    if s.ndim == 0:
        return s
    if s.ndim != 1 or s.shape[0] != like.shape[0]:
        raise UsageError(f"sigma must be a scalar or a (B,) tensor with B = {like.shape[0]}, "
                         f"got shape {tuple(s.shape)}")
    return s.reshape(-1, *([1] * (like.ndim - 1)))


def batch_sigmas(sigma: Union[float, Tensor], x: Tensor) -> Tensor:
    """A denoiser's noise level ``sigma`` (a float, 0-d or (B,)) as a (B,) tensor on x's device
    in the coefficient dtype (:func:`coefficient_dtype`), x (B, ...)."""
    s = torch.as_tensor(sigma).to(device=x.device, dtype=coefficient_dtype(x.device))
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or a ({x.shape[0]},) tensor, got shape "
                         f"{tuple(s.shape)}")
    return s


def check_eta(eta: Any) -> None:
    """Refuse a step-noise ``eta`` outside [0, 1] with one line."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise UsageError(f"eta must be in [0, 1] (0: deterministic), got {eta!r}")


def dynamic_threshold(x0_hat: Tensor, percentile: float) -> Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3) of x0_hat (B, ...).

    s = max(1, percentile of |x0_hat| per sample); x0_hat = clamp(x0_hat, -s, s) / s. With s = 1
    this is static clipping to [-1, 1]. (diffusers additionally caps s at ``sample_max_value``.)
    """
    compute = x0_hat.dtype if x0_hat.dtype in (torch.float32, torch.float64) else torch.float32
    flat = x0_hat.reshape(x0_hat.shape[0], -1).to(compute)
    s = torch.quantile(flat.abs(), percentile, dim=1).clamp(min=1.0)
    s = s.reshape(-1, *([1] * (x0_hat.ndim - 1)))
    return (flat.reshape(x0_hat.shape).clamp(-s, s) / s).to(x0_hat.dtype)


CLIP_RANGE: tuple[float, float] = (-1.0, 1.0)
"""What ``clip_x0`` clips an x0 estimate to: the range of pixel data. The one place it is
stated; whether a model's data has a clip range at all is its data space's to say
(:class:`diffunet.data_space.PixelSpace` clips to this one, ``LatentSpace`` to none and turns
``clip_x0`` off), so the step rules and samplers take only the ``clip_x0`` flag."""


def clip_estimate(x0_hat: Tensor, clip: bool, threshold: Optional[float] = None
                  ) -> tuple[Tensor, bool]:
    """x0_hat (B, C, H, W) clipped to the data range :data:`CLIP_RANGE` (``clip``) or
    dynamically thresholded (``threshold``, a percentile in (0, 1], which replaces clipping);
    also says whether it may have changed. The one place an x0 estimate is clipped."""
    if threshold is not None:
        if not 0.0 < threshold <= 1.0:
            raise UsageError(f"dynamic_threshold must be a percentile in (0, 1], e.g. 0.995, "
                             f"got {threshold}")
        return dynamic_threshold(x0_hat, threshold), True
    if clip:
        return x0_hat.clamp(*CLIP_RANGE), True
    return x0_hat, False


# ---------------------------------------------------------------------------------------------
# What a sampling run needs from a formulation


@dataclass(frozen=True)
class StepOptions:
    """The settings of one sampling run that a step rule may read (resolved: ``eta`` and
    ``clip_x0`` are numbers, not None)."""

    sampler: str
    num_steps: int
    """The full grid's steps (an edit runs only the last ones)."""
    eta: float = 0.0
    """The step noise of the sampler's rule: its eta setting, or the noise its rule always has
    (ddpm 1, the ancestral step; euler and dpmpp-2m 0)."""
    spacing: str = "trailing"
    clip_x0: bool = False
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0


class Denoiser(ABC):
    """The denoiser view D(x; sigma) of a network under a formulation (Karras et al. 2022,
    sec. 2): ``D(x, sigma, class_labels=None) -> x0_hat``.

    x (B, C, H, W) is in "VE scaling", x = x0 + sigma n; sigma a (B,) float tensor (a 0-d tensor
    or a float applies to the whole batch). Returns x0_hat (B, C, H, W) in x's dtype, on its
    device. ``schedule`` is the formulation; ``sigma_min``/``sigma_max`` its noise levels (the
    grids start from :meth:`Formulation.grid_range`, which is finite).
    """

    schedule: "Formulation"
    sigma_min: float
    sigma_max: float

    @abstractmethod
    def __call__(self, x: Tensor, sigma: Union[float, Tensor],
                 class_labels: Optional[Tensor] = None) -> Tensor:
        ...


class SamplingPath(ABC):
    """One sampling run's walk down a grid of levels, in the state scaling the path steps in;
    what the loop in :func:`diffunet.samplers.sample` drives (it adds editing, RePaint and the
    callback, once for every path).

    ``levels``: the N + 1 levels, descending; ``levels[N]`` is the clean end (VP: t = -1;
    sigma and flow paths: 0). A path object lives for one sampling run and carries what a
    multistep rule remembers from one step to the next; the rules themselves are pure.
    """

    levels: Sequence[Any]

    @abstractmethod
    def start(self, x_T: Tensor) -> Tensor:
        """The state at ``levels[0]`` for the standard normal start noise ``x_T`` (B, C, H, W)."""

    @abstractmethod
    def noised(self, x0: Tensor, i: int, z: Tensor) -> Tensor:
        """Clean data ``x0`` noised to ``levels[i]`` with standard normal ``z``, as a state
        (an edit's start, the known region of inpainting). ``i < N``."""

    @abstractmethod
    def step(self, x: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """One step from ``levels[i]`` to ``levels[i + 1]``: ``(x_next, x0_hat)``."""

    @abstractmethod
    def renoise(self, x: Tensor, i: int, z: Tensor) -> Tensor:
        """The forward process from ``levels[i + 1]`` back up to ``levels[i]`` with standard
        normal ``z`` (RePaint's resampling)."""

    def level(self, i: int) -> Any:
        """What the sampling callback reports for step i: its starting level."""
        return self.levels[i]


# ---------------------------------------------------------------------------------------------
# The contract


class Formulation(ABC):
    """A formulation of diffusion training and sampling (see the module docstring).

    Built from a ``ScheduleConfig`` whose ``formulation`` is :attr:`name`
    (``make_schedule(config)`` picks the class); ``config`` keeps it. Not an ``nn.Module``: it
    holds no parameters, never travels with ``model.to(...)``, and every method follows its
    tensor inputs' device and dtype (house rule 7).
    """

    # --- identity and config (class attributes: known before an object is built) -------------
    name: ClassVar[str]
    """The config's ``schedule.formulation`` value."""
    title: ClassVar[str]
    """How messages name it: "VP", "EDM", "flow-matching"."""
    article: ClassVar[str] = "a"
    """"a" or "an", for "an EDM model"."""
    config_fields: ClassVar[tuple[str, ...]]
    """The ``ScheduleConfig`` fields it reads, in the order ``diffunet info`` shows them."""
    network_fields: ClassVar[Optional[tuple[str, ...]]] = None
    """Those of :attr:`config_fields` that decide what the network's time input and output
    mean (None: all of them). Two models of one formulation that agree on these predict the
    same quantity from the same input, so their outputs combine output by output
    (autoguidance); the others (a training density, a sampling range) do not change the
    denoiser of a given network."""

    # --- capabilities (what the commands ask instead of a name) ---------------------------------
    discrete_timesteps: ClassVar[bool] = False
    """Trained on the integer timesteps 0..T-1 only: a sampler's uniform grid picks distinct
    ones, so ``num_steps`` is at most T."""
    timestep_inputs: ClassVar[bool] = False
    """The network's time input is addressed by integer timesteps 0..T-1 (``inspect --t``)."""
    uniform_grid: ClassVar[bool] = False
    """Contributes the ``uniform`` sigma grid (:meth:`uniform_sigmas`)."""
    native_samplers: ClassVar[tuple[str, ...]] = ()
    """The samplers it runs natively on its uniform grid (:meth:`native_path`): they default to
    that grid (``diffunet.samplers.default_grid``)."""
    variational_bound: ClassVar[bool] = False
    """Has the discrete variational bound ``eval bpd`` evaluates (DDPM eq. 5)."""
    diffusers_scheduler: ClassVar[Optional[str]] = None
    """The diffusers scheduler family it exports to and imports from (``diffunet export``),
    or None."""
    min_snr_weighting: ClassVar[bool] = False
    """Its loss takes ``train.min_snr_gamma``; otherwise the training header says it is unused
    (:attr:`own_weighting` says why)."""
    own_weighting: ClassVar[str] = ""
    """Why ``train.min_snr_gamma`` does not apply (its loss carries its own weighting)."""
    wrong_class_message: ClassVar[str] = ""
    """How the constructor refuses a config of another formulation (after "schedule.formulation: ")."""

    def __init__(self, config: ScheduleSettings) -> None:
        if config.formulation != self.name:
            raise ConfigError(f"schedule.formulation: {self.wrong_class_message.format(config)}")
        self.config = config

    # --- config rules (classmethods: answered from a ScheduleConfig, nothing built) -------------

    @classmethod
    def check_config(cls, config: ScheduleSettings, fail: Callable[[str, str], None]) -> None:
        """Cross-field rules of its keys, reported as ``fail(key, problem)`` (every key's own
        range is checked by ``ScheduleConfig`` itself). Default: none."""

    @classmethod
    @abstractmethod
    def describe(cls, config: ScheduleSettings) -> str:
        """The formulation in a few words (the training header, ``diffunet info``)."""

    @classmethod
    def table_entries(cls, config: ScheduleSettings) -> int:
        """Entries of the float64 tables it builds (what memory checks count before building
        it): 0 for a formulation without tables."""
        return 0

    # --- training -------------------------------------------------------------------------------

    @abstractmethod
    def sample_levels(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` training levels, (n,), drawn from ``generator`` on its device: the one random
        draw of a training step that differs between formulations."""

    @abstractmethod
    def add_noise(self, x0: Tensor, noise: Tensor, level: Any) -> Tensor:
        """x0 (B, C, H, W) noised to ``level`` ((B,) or a scalar) with ``noise``, in the
        formulation's own scaling (VP: x_t; EDM: x0 + sigma n; flow: x_t)."""

    @abstractmethod
    def network_input(self, x0: Tensor, noise: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_in, time_in)``: what the network is called with for x0 noised to ``level``
        (B,): its input image (B, C, H, W) and its time input (B,)."""

    @abstractmethod
    def loss(self, model: Model, x0: Tensor, noise: Tensor, level: Tensor, *,
             class_labels: Optional[Tensor] = None,
             min_snr_gamma: Optional[float] = None,
             cond: Optional[Condition] = None) -> Tensor:
        """The per-image training loss (B,) of ``model`` on x0 (B, C, H, W) noised with
        ``noise`` to ``level`` (B,): noising, the network call and the weighted loss, in at least
        float32. ``min_snr_gamma`` applies where :attr:`min_snr_weighting` says so. The network
        is called with the condition ``cond`` (:mod:`diffunet.conditioning`: class labels, a
        condition image) or the ``class_labels`` alone."""

    @abstractmethod
    def ideal_output(self, x_in: Tensor, time_in: Tensor, x0: Tensor) -> Tensor:
        """What a perfect network outputs at its input ``(x_in, time_in)`` (B, C, H, W) and (B,)
        when the data is ``x0`` (B, C, H, W) alone: the output the loss is zero at, i.e. the
        ideal denoiser of a one-image data set (Karras et al. 2022, sec. 2), in the network's
        own parametrization. Any time input the formulation feeds its network is accepted (VP:
        integer or interpolated timesteps). The conformance suite's oracle."""

    # --- sampling -------------------------------------------------------------------------------

    @abstractmethod
    def denoiser(self, model: Model) -> Denoiser:
        """The denoiser D(x; sigma) of ``model`` under this formulation."""

    @abstractmethod
    def sigma_of_time_input(self, time_in: Tensor) -> Tensor:
        """The noise level sigma of the denoiser view (x = x0 + sigma n) at which the network is
        called with the time input ``time_in`` (B,): any time input the formulation feeds its
        network (:meth:`network_input`, :meth:`denoiser`, :meth:`native_path`; VP: integer or
        interpolated timesteps). Returns (B,) in the coefficient dtype
        (:func:`coefficient_dtype`) on time_in's device, ``inf`` at pure noise. Exact up to the
        rounding of a float32 time input (relative 1e-4 at most). What the guidance interval
        reads: the guidance wrapper sees only the network's inputs."""

    @abstractmethod
    def grid_range(self) -> tuple[float, float]:
        """(sigma_min, sigma_max): the model's whole finite range, 0 < min < max < inf; what an
        explicit ``sigma_min``/``sigma_max`` may reach (within :meth:`override_range` where
        that is set) and where a pure-noise first level of the uniform grid is stepped from."""

    def default_range(self) -> tuple[float, float]:
        """(sigma_min, sigma_max) of the karras and exponential grids where neither is set:
        :meth:`grid_range` with its top capped at :data:`DEFAULT_SIGMA_MAX`. Above that level
        x = x0 + sigma n of data in [-1, 1] is noise to the sampler, and steps spent there (or
        a second-order rule's extrapolation from them) cost the steps near the data: on the
        cosine schedule's 2 x 10^4 DPM++ 2M lost its pictures below 15 steps, and Heun diverged
        (docs/samplers.md, "The default grid's range"). A formulation whose config states its
        own sampling range (EDM) returns that instead."""
        lo, hi = self.grid_range()
        return (lo, DEFAULT_SIGMA_MAX) if lo < DEFAULT_SIGMA_MAX < hi else (lo, hi)

    def override_range(self) -> Optional[tuple[float, float]]:
        """The levels a grid's ``sigma_min``/``sigma_max`` may be set to (the denoiser clamps
        levels outside them), or None: any positive level."""
        return None

    def uniform_sigmas(self, num_steps: int, spacing: str) -> Tensor:
        """The ``uniform`` grid of ``num_steps`` steps: (num_steps + 1,) float64, descending,
        last 0; the first entry may be inf (pure noise; the sigma-space solvers start from
        :meth:`grid_range`'s top there). Only where :attr:`uniform_grid`."""
        raise UsageError(f"sigmas 'uniform' picks training timesteps, which {self.article} "
                         f"{self.title} model does not have; use 'karras' or 'exponential'")

    def native_levels(self, options: StepOptions, grid: str) -> Optional[tuple[str, list]]:
        """``(name, levels)`` of the native path for ``options`` on ``grid`` (for the sample
        manifest: e.g. ``("timesteps", [999, ...])``), or None where none runs."""
        return None

    def native_path(self, model: Model, options: StepOptions, grid: str,
                    generator: Optional[Generators]) -> Optional[SamplingPath]:
        """The exact native sampling path for ``options`` on ``grid`` (VP: its integer-timestep
        DDPM/DDIM/DPM-Solver++ rules; flow: diffusers' flow-matching rules on its shifted t),
        or None: the sampling loop then runs the sigma-space solver on :meth:`denoiser`."""
        return None

    def network_difference(self, other: "Formulation") -> Optional[str]:
        """Why a network trained under ``other`` does not predict what one trained under this
        formulation does from the same input, so that the two cannot be combined output by
        output (autoguidance): another formulation, or another value of one of
        :attr:`network_fields`; None when they can."""
        if type(other) is not type(self):
            return (f"it is {other.article} {other.title} model, the model {self.article} "
                    f"{self.title} one")
        for key in self.config_fields if self.network_fields is None else self.network_fields:
            mine, theirs = getattr(self.config, key), getattr(other.config, key)
            if mine != theirs:
                return f"its schedule.{key} is {theirs!r}, the model's {mine!r}"
        return None

    # --- inspection -----------------------------------------------------------------------------

    def level_of_timestep(self, t: int) -> Tensor:
        """The training level of integer timestep ``t`` (``inspect --t``), as a (1,) tensor;
        only where :attr:`timestep_inputs`."""
        raise UsageError(f"{self.article} {self.title} model has no training timesteps")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"
