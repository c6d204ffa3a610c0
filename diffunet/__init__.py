"""diffunet: diffusion models built around the time-conditioned residual/attention UNet.

    from diffunet import UNet, UNetConfig, NoiseSchedule, ScheduleConfig
    net = UNet(UNetConfig(image_size=32))
    eps_hat = net(xt, t)                       # xt (B,C,H,W), t (B,) -> (B,C,H,W)
"""

from __future__ import annotations

from .checkpoint import load_model, save_model
from .config import (DataConfig, RunConfig, SampleConfig, ScheduleConfig, TrainConfig, UNetConfig,
                     load_config)
from .diffusion import NoiseSchedule, diffusion_loss
from .errors import (ConfigError, DataError, DiffunetError, FolderError, ModelFileError,
                     TrainingError, UsageError)
from .samplers import ddim_step, ddpm_step, dpmpp_2m_step, make_timesteps, sample
from .unet import UNet
from .version import __version__

__all__ = [
    "__version__",
    "UNet", "UNetConfig", "NoiseSchedule", "ScheduleConfig", "diffusion_loss",
    "make_timesteps", "ddpm_step", "ddim_step", "dpmpp_2m_step", "sample",
    "save_model", "load_model",
    "RunConfig", "DataConfig", "TrainConfig", "SampleConfig", "load_config",
    "DiffunetError", "ConfigError", "UsageError", "FolderError", "DataError", "ModelFileError",
    "TrainingError",
]
