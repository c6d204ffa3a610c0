"""What a config will cost before anything is allocated: the network's parameters, the noise
schedule's tables and one batch's activations, and the memory a device has to hold them.

A config from a stranger's model file, or a typo (``unet.base_channels=1000000``,
``schedule.num_train_timesteps=10**9``), must be refused with one line rather than make the
allocator try to find terabytes; :func:`check_fits` is the one place that compares.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .config import UNetConfig
from .unet import UNet

__all__ = ["Cost", "parameter_count", "parameter_shapes", "schedule_bytes", "activation_bytes",
           "available_bytes", "network_cost", "check_fits"]

_FLOAT32 = 4
_SCHEDULE_TABLES = 16  # NoiseSchedule keeps about this many float64 tables of T + 1 entries


def parameter_count(cfg: UNetConfig) -> int:
    """The number of parameters ``UNet(cfg)`` has, counted on the meta device (nothing is
    allocated, so a config asking for trillions of weights is counted in microseconds)."""
    with torch.device("meta"):
        return sum(p.numel() for p in UNet(cfg).parameters())


def parameter_shapes(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in ``UNet(cfg).state_dict()``, in its order, found on the
    meta device (nothing is allocated): what a model file of ``cfg`` must hold."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in UNet(cfg).state_dict().items()}


def schedule_bytes(num_train_timesteps: int) -> int:
    """Bytes of a ``NoiseSchedule``'s tables (float64, one entry per timestep plus one)."""
    return _SCHEDULE_TABLES * (num_train_timesteps + 1) * 8


def activation_bytes(cfg: UNetConfig, batch: int) -> int:
    """A lower bound on the float32 activations one forward pass of ``batch`` images keeps: the
    skip connections of every level (``num_res_blocks + 1`` feature maps each) plus the input.
    The real peak is higher; this bound only has to catch sizes that cannot fit at all."""
    side, total = cfg.image_size, cfg.in_channels * cfg.image_size ** 2
    for mult in cfg.channel_mults:
        total += (cfg.num_res_blocks + 1) * cfg.base_channels * mult * side * side
        side = max(side // 2, 1)
    return batch * total * _FLOAT32


class Cost(NamedTuple):
    """Bytes a config needs: ``parameters`` (weights only), ``schedule`` (tables) and
    ``activations`` (one batch, a lower bound)."""

    parameters: int
    schedule: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.schedule + self.activations


def network_cost(cfg: UNetConfig, num_train_timesteps: int | None, batch: int) -> Cost:
    """The :class:`Cost` of ``UNet(cfg)`` with a schedule of ``num_train_timesteps`` (None: no
    schedule) running ``batch`` images."""
    return Cost(parameter_count(cfg) * _FLOAT32,
                schedule_bytes(num_train_timesteps) if num_train_timesteps else 0,
                activation_bytes(cfg, batch))


def _address_space_used() -> int | None:
    """Bytes of address space this process has mapped (Linux ``VmSize``), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_bytes(device: torch.device | str) -> int | None:
    """Memory ``device`` can give: a GPU's total memory; on the CPU the smaller of the physical
    memory and what the address-space limit (``ulimit -v``) leaves of it beyond what this
    process has already mapped. None where that is not knowable."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            used = _address_space_used() or 0
            have = min(have, max(soft - used, 0))
    except (ImportError, OSError, ValueError):
        pass
    return have


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_fits(cost: Cost, device: torch.device | str, what: str, fix: str,
               error: type[Exception]) -> None:
    """Raise ``error`` (one line: ``what`` needs X, the device has Y; ``fix``) when ``cost``
    exceeds the memory of ``device``."""
    have = available_bytes(device)
    if have is None or cost.total <= have:
        return
    parts = [f"{_gib(cost.parameters)} of weights"]
    if cost.schedule:
        parts.append(f"{_gib(cost.schedule)} of schedule tables")
    if cost.activations:
        parts.append(f"at least {_gib(cost.activations)} of activations")
    raise error(f"{what} needs {', '.join(parts)}, more than the {_gib(have)} this "
                f"{torch.device(device).type.upper()} has; {fix}")
