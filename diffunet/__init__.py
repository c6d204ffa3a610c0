"""diffunet: diffusion models built around the time-conditioned residual/attention UNet."""

from __future__ import annotations

__version__ = "0.1.0"

from .config import ScheduleConfig, UNetConfig
from .errors import ConfigError, DataError, DiffunetError, ModelFileError

__all__ = [
    "__version__",
    "UNetConfig",
    "ScheduleConfig",
    "ConfigError",
    "DataError",
    "DiffunetError",
    "ModelFileError",
]
