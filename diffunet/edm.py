"""Deprecated: the EDM formulation lives in :mod:`diffunet.formulations.edm`, and
``make_schedule`` in :mod:`diffunet.formulations`.

``import diffunet.edm`` keeps working for this release (with a DeprecationWarning) and gives
the same objects; it will be removed in the next one.
"""

from __future__ import annotations

import warnings

from .formulations import Schedule, make_schedule  # noqa: F401
from .formulations.edm import EDMDenoiser, EDMSchedule, edm_loss  # noqa: F401

__all__ = ["EDMSchedule", "EDMDenoiser", "Schedule", "edm_loss", "make_schedule"]

warnings.warn("diffunet.edm is deprecated; import from diffunet.formulations (or the diffunet "
              "package) instead", DeprecationWarning, stacklevel=2)
