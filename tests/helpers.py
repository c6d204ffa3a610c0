"""The tiny networks and runs the tests share (imported by the test modules; the fixtures that
use them are in conftest.py).

One tiny UNet, sized by its image side: two levels, 8 base channels, attention at the lower
level, no dropout; :func:`tiny_net` gives its ``UNetConfig`` keywords (override any),
:func:`unet_overrides` the same as ``unet.key=value`` run arguments, :func:`tiny_run` a whole
tiny ``diffunet train`` run on the built-in shapes. :func:`perturbed` takes the zeros out of a
fresh network's output layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


RUN_HEADER = ("config: ", "resuming from ", "data: ", "model: ", "device: ", "batch: ",
              "out-dir: ", "post-hoc EMA: ")
"""How the lines a training run prints before its first step begin (its header, and the state it
resumed from): a run that fails later has them on stderr above its one error line."""


def tiny_net(image_size: int = 16, **overrides: Any) -> dict[str, Any]:
    """``UNetConfig`` keywords of the tiny network at ``image_size`` (its lower level, at half
    the size, has attention), with ``overrides`` applied."""
    return {"image_size": image_size, "base_channels": 8, "num_groups": 4,
            "channel_mults": (1, 2), "num_res_blocks": 1, "attn_resolutions": (image_size // 2,),
            "dropout": 0.0, **overrides}


def unet_overrides(net: dict[str, Any]) -> list[str]:
    """``unet.key=value`` run arguments for the keywords ``net`` (TOML values)."""
    return [f"unet.{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}"
            for k, v in net.items()]


def tiny_run(*extra: str, image_size: int = 16, **net: Any) -> list[str]:
    """Run arguments of a tiny ``diffunet train`` on the built-in shapes: the tiny network
    (``net`` overrides its keywords), 64 images, batch 4, a short warm-up, 4-image previews of
    2 steps; ``extra`` arguments come last and so win."""
    return [*unet_overrides(tiny_net(image_size, **net)), "data.builtin_size=64",
            "train.batch_size=4", "train.lr=1e-3", "train.warmup_steps=2",
            "sample.num_images=4", "sample.num_steps=2", *extra]


def perturbed(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter: zero-initialised output layers make a fresh UNet output
    exactly zero, which would hide conditioning, differences and gradients to earlier layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def save_tiny_vae(folder: Path, seed: int = 0, sample_size: int = 16) -> Path:
    """A tiny diffusers AutoencoderKL (2 levels: downsampling 2, 4 latent channels), its
    weights from ``seed``, saved into ``folder`` as diffusers saves one (config.json and
    safetensors weights only); returns ``folder``. Needs diffusers (the dev extra)."""
    import diffusers

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=sample_size)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder
