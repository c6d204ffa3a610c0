"""Deprecated: the VP formulation lives in :mod:`diffunet.formulations.vp`.

``import diffunet.diffusion`` keeps working for this release (with a DeprecationWarning) and
gives the same objects; it will be removed in the next one.
"""

from __future__ import annotations

import warnings

from .formulations.base import coefficient_dtype  # noqa: F401
from .formulations.vp import (NoiseSchedule, Timesteps, VPDenoiser,  # noqa: F401
                              diffusion_loss, make_betas, rescale_zero_terminal_snr)

__all__ = ["NoiseSchedule", "VPDenoiser", "Timesteps", "coefficient_dtype", "diffusion_loss",
           "make_betas", "rescale_zero_terminal_snr"]

warnings.warn("diffunet.diffusion is deprecated; import from diffunet.formulations (or the "
              "diffunet package) instead", DeprecationWarning, stacklevel=2)
