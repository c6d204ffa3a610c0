"""The built-in shapes' VAE: the small diffusers ``AutoencoderKL`` diffunet ships for latent runs
that need no download (``vae.path = "builtin-shapes"``, ``configs/latent_shapes.toml``), and how
it is trained, reproducibly (``diffunet eval train-vae --out DIR``,
``scripts/train_shapes_vae.py``).

The VAE has 3 levels (16, 32, 64 channels, one ResNet block each), so 64x64 RGB images are
4x16x16 latents (4x down). It is trained on the built-in shapes at 64x64 (seed 0, the default
training set) mirrored at random and cut to random 32x32 crops (the network is convolutional:
trained on crops, it runs on whole images, as Stable Diffusion's VAE was trained at 256 and used
at 512; a quarter of the cost), with the mean squared reconstruction error plus a small KL term
(``kl`` x the KL per value, as Rombach et al. 2022 keep the posterior near N(0, I) without
blurring), AdamW at a constant learning rate after a short warm-up, gradients clipped at norm 1.
Every draw comes from generators seeded by ``seed``: the same settings on the same PyTorch give
the same weights on a CPU.

At the end it measures what the docs quote: the reconstruction error (MSE and PSNR of decoded
posterior means on ``eval_images`` held-out images of seed 1, values in [-1, 1]) and the
latents' std over ``std_images`` (1,000) training images, whose inverse becomes the config's ``scaling_factor``
(the diffusion state is then about unit-variance, as Stable Diffusion's 0.18215 does for its VAE).
The weights are kept in float16 (half the size; diffunet loads them as float32).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .checkpoint import tensor_file_bytes
from .data import BuiltinShapes
from .data_space import VAE_WEIGHTS

__all__ = ["VaeTraining", "build_shapes_vae", "train_shapes_vae"]


@dataclass(frozen=True)
class VaeTraining:
    """How the built-in shapes' VAE is trained (the shipped one: these defaults)."""

    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    kl: float = 1e-6
    image_size: int = 64
    crop: int = 32
    seed: int = 0
    eval_images: int = 1000
    """Held-out images (seed 1) the reconstruction error is measured on."""
    std_images: int = 1000
    """Training images whose latents' std sets ``scaling_factor``."""


def build_shapes_vae(image_size: int = 64) -> torch.nn.Module:
    """The untrained VAE (diffusers' ``AutoencoderKL``; its weights from the global RNG)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(16, 32, 64), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=image_size,
                         scaling_factor=1.0)


def _images(data: BuiltinShapes, indices: list[int]) -> torch.Tensor:
    """Images ``indices`` (B, 3, S, S) in [-1, 1], rendered as one batch."""
    return torch.stack([image for image, _ in data.__getitems__(indices)])


def _batch(data: BuiltinShapes, g: torch.Generator, size: int, crop: int) -> torch.Tensor:
    """``size`` random training images (B, 3, crop, crop): mirrored at random, each cut to a
    random ``crop`` x ``crop`` window."""
    x = _images(data, torch.randint(0, len(data), (size,), generator=g).tolist())
    flip = torch.rand(size, generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    s = x.shape[-1]
    if crop >= s:
        return x
    tops = torch.randint(0, s - crop + 1, (size, 2), generator=g).tolist()
    return torch.stack([im[:, a:a + crop, b:b + crop] for im, (a, b) in zip(x, tops)])


def train_shapes_vae(how: VaeTraining = VaeTraining(),
                     say: Callable[[str], None] = lambda msg: None
                     ) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Train the VAE as ``how`` says; returns its folder's files (``config.json`` and the
    float16 weights, by name) and what was measured (the record ``training.json`` keeps).
    ``say`` gets a progress line every 100 steps."""
    torch.manual_seed(how.seed)  # the initial weights
    vae = build_shapes_vae(how.image_size)
    params = sum(t.numel() for t in vae.parameters())
    data = BuiltinShapes(50_000, how.image_size, 3, seed=0)
    g = torch.Generator().manual_seed(how.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=how.lr, weight_decay=0.0)
    warmup = min(100, how.steps // 10)
    began = time.perf_counter()
    vae.train()
    for step in range(1, how.steps + 1):
        for group in opt.param_groups:
            group["lr"] = how.lr * min(1.0, step / max(1, warmup))
        x = _batch(data, g, how.batch_size, how.crop)
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        mse = torch.nn.functional.mse_loss(vae.decode(z).sample, x)
        kl = dist.kl().mean() / x[0].numel()  # per value, as the MSE
        opt.zero_grad(set_to_none=True)
        (mse + how.kl * kl).backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == how.steps:
            say(f"step {step}: mse {mse.item():.5f} kl {kl.item():.2f} "
                f"({time.perf_counter() - began:.0f} s)")

    vae.eval()
    with torch.no_grad():
        held_out = BuiltinShapes(how.eval_images, how.image_size, 3, seed=1)
        errors = []
        for start in range(0, how.eval_images, 50):
            x = _images(held_out, list(range(start, min(start + 50, how.eval_images))))
            mean = vae.encode(x).latent_dist.mean
            errors.append(((vae.decode(mean).sample.clamp(-1, 1) - x) ** 2).mean((1, 2, 3)))
        train_x = _images(data, list(range(how.std_images)))
        latents = torch.cat([vae.encode(train_x[s:s + 50]).latent_dist.mean
                             for s in range(0, how.std_images, 50)])
        mse_all = torch.cat(errors).mean().item()
        std = latents.std().item()
    scaling = round(1.0 / std, 5)
    vae.register_to_config(scaling_factor=scaling)
    record = {"settings": asdict(how), "torch": torch.__version__, "parameters": params,
              "seconds": round(time.perf_counter() - began, 1),
              "held_out_mse": round(mse_all, 6),
              "held_out_psnr_db": round(10 * math.log10(4.0 / mse_all), 2),  # peak-to-peak 2
              "latent_mean": round(latents.mean().item(), 4), "latent_std": round(std, 4),
              "scaling_factor": scaling}
    weights = {k: v.detach().half() for k, v in vae.state_dict().items()}
    files = {"config.json": vae.to_json_string().encode(),  # what save_pretrained writes
             VAE_WEIGHTS: tensor_file_bytes(weights, {"format": "pt"})}
    return files, record
