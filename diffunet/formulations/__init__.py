"""Formulations: one home each for what turns the UNet into a generative model.

==========  ==================================================================================
``base``    the contract (:class:`Formulation`, :class:`Denoiser`, :class:`SamplingPath`) and
            what every formulation shares
``settings``  the ``[schedule]`` section (:class:`ScheduleConfig`) and the registry
``vp``      DDPM's discrete VP process (eps / v / x0): :class:`NoiseSchedule`, its
            integer-timestep step rules (DDPM, DDIM, DPM-Solver++(2M)) and native path
``edm``     Karras et al. 2022: :class:`EDMSchedule`, the Table 1 preconditioning
``flow``    flow matching (rectified flow): :class:`FlowSchedule`, diffusers' flow grid and
            rules as its native path
==========  ==================================================================================

:data:`FORMULATIONS` maps ``schedule.formulation`` to its class; :func:`make_schedule` builds
the one a config names. Nothing outside this package compares a formulation's name or checks its
class: every other module asks the object (its methods and capability attributes). A
formulation module never imports another formulation's module. Adding a fourth: a module here
subclassing :class:`Formulation`, its name in ``FormulationName``, its keys in
:class:`ScheduleConfig` and one entry below (docs/design.md, "Adding a formulation").
"""

from __future__ import annotations

from .base import (Denoiser, Formulation, Model, SamplingPath, Spacing, StepOptions,
                   coefficient_dtype)
from .edm import EDMDenoiser, EDMSchedule, edm_loss
from .flow import FlowDenoiser, FlowPath, FlowSchedule, flow_grid, flow_loss
from .settings import (FORMULATIONS, BetaSchedule, FormulationName, LossWeighting,
                       PredictionType, ScheduleConfig, TimeDensity, formulation_class)
from .vp import NoiseSchedule, VPDenoiser, diffusion_loss

__all__ = ["FORMULATIONS", "Formulation", "Denoiser", "SamplingPath", "StepOptions", "Model",
           "Spacing", "ScheduleConfig", "FormulationName", "BetaSchedule", "PredictionType",
           "TimeDensity", "LossWeighting", "NoiseSchedule", "VPDenoiser", "EDMSchedule",
           "EDMDenoiser", "FlowSchedule", "FlowDenoiser", "FlowPath", "diffusion_loss",
           "edm_loss", "flow_loss", "flow_grid", "coefficient_dtype", "formulation_class",
           "make_schedule", "Schedule"]

FORMULATIONS.update({NoiseSchedule.name: NoiseSchedule, EDMSchedule.name: EDMSchedule,
                     FlowSchedule.name: FlowSchedule})

Schedule = Formulation
"""What :func:`make_schedule` builds and a model file holds (the old name of the union)."""


def make_schedule(config: ScheduleConfig) -> Formulation:
    """The formulation object ``config`` describes (``config.formulation``'s registered class):
    every place that rebuilds a schedule from a stored config goes through it."""
    return formulation_class(config.formulation)(config)
