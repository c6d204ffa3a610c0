"""diffunet: diffusion models built around the time-conditioned residual/attention UNet.

    from diffunet import UNet, UNetConfig, NoiseSchedule, ScheduleConfig
    net = UNet(UNetConfig(image_size=32))
    eps_hat = net(xt, t)                       # xt (B,C,H,W), t (B,) -> (B,C,H,W)
"""

from __future__ import annotations

from .checkpoint import save_model
from .config import (DataConfig, RunConfig, SampleConfig, ScheduleConfig, TrainConfig, UNetConfig,
                     load_config)
from .errors import (ConfigError, DataError, DiffunetError, FolderError, ModelFileError,
                     TrainingError, UsageError)
from .formulations import (FORMULATIONS, EDMDenoiser, EDMSchedule, FlowDenoiser, FlowSchedule,
                           Formulation, NoiseSchedule, VPDenoiser, diffusion_loss, edm_loss,
                           flow_loss, make_schedule)
from .interop import load_model
from .samplers import (NetworkCount, ddim_step, ddpm_step, dpmpp_2m_step, make_sigmas,
                       make_timesteps, network_calls, sample, sample_dpmpp_2m, sample_dpmpp_2m_sde,
                       sample_euler, sample_euler_ancestral, sample_heun)
from .unet import UNet
from .version import __version__

__all__ = [
    "__version__",
    "UNet", "UNetConfig", "NoiseSchedule", "ScheduleConfig", "diffusion_loss",
    "make_timesteps", "ddpm_step", "ddim_step", "dpmpp_2m_step", "sample",
    "EDMSchedule", "EDMDenoiser", "edm_loss", "make_schedule",
    "FlowSchedule", "FlowDenoiser", "flow_loss", "Formulation", "FORMULATIONS",
    "VPDenoiser", "make_sigmas", "network_calls", "NetworkCount", "sample_euler", "sample_heun",
    "sample_euler_ancestral", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
    "save_model", "load_model",
    "RunConfig", "DataConfig", "TrainConfig", "SampleConfig", "load_config",
    "DiffunetError", "ConfigError", "UsageError", "FolderError", "DataError", "ModelFileError",
    "TrainingError",
]
