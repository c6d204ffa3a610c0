"""What a config will cost before anything is allocated: the network's parameters, the noise
schedule's tables and one batch's activations, and the memory a device has to hold them.

A config from a stranger's model file, or a typo (``unet.base_channels=1000000``,
``schedule.num_train_timesteps=10**9``), must be refused with one line rather than make the
allocator try to find terabytes; :func:`check_fits` is the one place that compares. The
network is priced from its config alone (:func:`network_size`, arithmetic on Python integers):
building it to count, even on the meta device, costs about 2 KB and 100 us per tensor, so a
config with a million residual blocks would take minutes and gigabytes just to be priced.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import NamedTuple

import torch

from .config import UNetConfig
from .unet import UNet

__all__ = ["Cost", "NetworkSize", "TENSOR_OVERHEAD", "network_size", "parameter_count",
           "parameter_shapes", "schedule_bytes", "activation_bytes", "weight_bytes",
           "available_bytes", "network_cost", "check_fits"]

_FLOAT32 = 4
_SCHEDULE_TABLES = 16  # NoiseSchedule keeps about this many float64 tables of T + 1 entries

TENSOR_OVERHEAD = 4096
"""Bytes of Python objects one parameter tensor of a built UNet costs beside its numbers (its
module, ``Parameter`` and hooks; measured at about 2.2 KB on the CPU and 2.4 KB on the meta
device): what makes a config of a million tiny residual blocks expensive."""


class NetworkSize(NamedTuple):
    """How many parameter tensors (``state_dict`` entries) and parameters ``UNet(cfg)`` has."""

    tensors: int
    parameters: int


def network_size(cfg: UNetConfig) -> NetworkSize:
    """The :class:`NetworkSize` of ``UNet(cfg)`` by arithmetic on the config (nothing is built,
    so any config, a million levels' worth of blocks or a trillion channels, is priced in
    microseconds; ``tests/test_unet.py`` checks it against the built network). Mirrors
    ``UNet.__init__`` and the blocks of :mod:`diffunet.nn`."""
    base, emb = cfg.base_channels, cfg.time_embed_dim
    tensors = parameters = 0

    def add(count: int, weights: int) -> None:  # one module's tensors and their parameters
        nonlocal tensors, parameters
        tensors += count
        parameters += weights

    def linear(cin: int, cout: int) -> None:
        add(2, cin * cout + cout)

    def conv(cin: int, cout: int, k: int) -> None:
        add(2, cin * cout * k * k + cout)

    def norm(ch: int) -> None:
        add(2, 2 * ch)

    def res(cin: int, cout: int, times: int = 1) -> None:  # nn.ResidualBlock, ``times`` of them
        nonlocal tensors, parameters
        t0, p0 = tensors, parameters
        norm(cin), conv(cin, cout, 3), norm(cout), conv(cout, cout, 3)
        if emb is not None:
            linear(emb, 2 * cout if cfg.scale_shift_norm else cout)
        if cin != cout:
            conv(cin, cout, 1)
        tensors, parameters = t0 + (tensors - t0) * times, p0 + (parameters - p0) * times

    def attn(ch: int, times: int = 1) -> None:  # nn.AttentionBlock: norm, qkv and proj
        add(6 * times, (2 * ch + 3 * ch * ch + 3 * ch + ch * ch + ch) * times)

    if emb is not None:
        linear(base, emb), linear(emb, emb)
    if cfg.num_classes is not None:
        add(1, (cfg.num_classes + 1) * emb)
    conv(cfg.in_channels + cfg.cond_channels, base, 3)
    levels = len(cfg.channel_mults)
    attn_at = [r in cfg.attn_resolutions for r in cfg.resolutions]
    # The skip connections the decoder concatenates, as runs of (channels, how many): what
    # UNet.__init__ records after conv_in, each residual block and each downsample.
    skips, ch = [(base, 1)], base
    for level, mult in enumerate(cfg.channel_mults):
        out, n = base * mult, cfg.num_res_blocks
        res(ch, out), res(out, out, n - 1)
        if attn_at[level]:
            attn(out, n)
        ch = out
        skips.append((out, n))
        if level != levels - 1:
            if cfg.downsample == "conv":
                conv(ch, ch, 3)
            skips.append((out, 1))
    res(ch, ch, 2), attn(ch)  # the middle block
    for level in reversed(range(levels)):
        out = base * cfg.channel_mults[level]
        left = cfg.num_res_blocks + 1
        while left:  # its blocks take the newest skips, a run of equal channels at a time
            width, count = skips[-1]
            take = min(count, left)
            res(ch + width, out), res(out + width, out, take - 1)
            ch = out
            skips[-1] = (width, count - take)
            if not skips[-1][1]:
                skips.pop()
            left -= take
        if attn_at[level]:
            attn(out, cfg.num_res_blocks + 1)
        if level != 0:
            k = 3 if cfg.upsample == "nearest" else 4
            conv(ch, ch, k)
    norm(ch), conv(ch, cfg.output_channels, 3)
    return NetworkSize(tensors, parameters)


def weight_bytes(size: NetworkSize, copies: int = 1) -> int:
    """Bytes ``copies`` float32 copies of a network's weights take, with the Python objects of
    one built network (:data:`TENSOR_OVERHEAD` per tensor)."""
    return copies * _FLOAT32 * size.parameters + TENSOR_OVERHEAD * size.tensors


def parameter_count(cfg: UNetConfig) -> int:
    """The number of parameters ``UNet(cfg)`` has (:func:`network_size`: nothing is built, so a
    config asking for trillions of weights or millions of blocks is counted in microseconds)."""
    return network_size(cfg).parameters


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
    return Cost(weight_bytes(network_size(cfg)),
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
    gib = n / 2**30 if n.bit_length() < 1000 else math.inf  # past a float: say so, in words
    if gib < 1e15:
        return f"{gib:,.1f} GiB"
    return f"{gib:.1e} GiB" if math.isfinite(gib) else f"about 2**{n.bit_length() - 31} GiB"


def check_fits(cost: Cost, device: torch.device | str, what: str, fix: str,
               error: type[Exception], fields: Mapping[str, str] | None = None) -> None:
    """Raise ``error`` (one line: ``what`` needs X, the device has Y; ``fix``) when ``cost``
    exceeds the memory of ``device``. ``fields`` names, per part of the cost
    (``"parameters"``, ``"schedule"``, ``"activations"``), the settings that size it (e.g.
    ``"layers_per_block = 1000000"``); the message names those of the largest part."""
    have = available_bytes(device)
    if have is None or cost.total <= have:
        return
    largest = max(("parameters", "schedule", "activations"), key=lambda k: getattr(cost, k))
    named = {k: f" ({v})" for k, v in (fields or {}).items() if k == largest}
    parts = [f"{_gib(cost.parameters)} of weights{named.get('parameters', '')}"]
    if cost.schedule:
        parts.append(f"{_gib(cost.schedule)} of schedule tables{named.get('schedule', '')}")
    if cost.activations:
        parts.append(f"at least {_gib(cost.activations)} of activations"
                     f"{named.get('activations', '')}")
    raise error(f"{what} needs {', '.join(parts)}, more than the {_gib(have)} this "
                f"{torch.device(device).type.upper()} has; {fix}")
