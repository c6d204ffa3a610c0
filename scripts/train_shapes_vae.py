"""Train the small AutoencoderKL that diffunet ships for latent runs on the built-in shapes
(``vae.path = "builtin-shapes"``, ``configs/latent_shapes.toml``), reproducibly.

    python scripts/train_shapes_vae.py --out diffunet/vae_shapes

A diffusers ``AutoencoderKL`` (3 levels, so 4x down: 64x64 RGB -> 4x16x16 latents) trained on
the built-in shapes at 64x64 (seed 0, the default training set, random flips) with the mean
squared reconstruction error plus a small KL term (weight ``--kl``, as Rombach et al. 2022 keep
the posterior near N(0, I) without blurring), AdamW at a constant learning rate after a short
warm-up. Everything random comes from generators seeded by ``--seed``: the same command on
the same PyTorch gives the same weights on a CPU.

At the end it measures what the docs quote: the reconstruction error (MSE and PSNR of
decoded posterior means, on 1,000 held-out images of seed 1, values in [-1, 1]) and the
latents' std over the training images, from which it sets the config's ``scaling_factor``
(1 / std: the diffusion state is then about unit-variance, as Stable Diffusion's 0.18215 does
for its VAE). The weights are written in float16 (half the size; diffunet loads them as
float32) beside ``config.json``, with ``training.json`` recording the command and the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffunet.data import BuiltinShapes  # noqa: E402


def build_vae(image_size: int) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(16, 32, 64), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=image_size,
                         scaling_factor=1.0)


def batch(data: BuiltinShapes, g: torch.Generator, size: int) -> torch.Tensor:
    idx = torch.randint(0, len(data), (size,), generator=g).tolist()
    x = torch.stack([image for image, _ in data.__getitems__(idx)])  # rendered as one batch
    flip = torch.rand(size, generator=g) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="diffunet/vae_shapes")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl", type=float, default=1e-6)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-images", type=int, default=1000)
    args = p.parse_args()

    torch.manual_seed(args.seed)  # the initial weights
    vae = build_vae(args.image_size)
    params = sum(t.numel() for t in vae.parameters())
    data = BuiltinShapes(50_000, args.image_size, 3, seed=0)
    g = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = min(100, args.steps // 10)
    began = time.perf_counter()
    vae.train()
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / max(1, warmup))
        x = batch(data, g, args.batch_size)
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        recon = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        kl = dist.kl().mean() / x[0].numel()  # per pixel value, as the MSE
        loss = mse + args.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps:
            print(f"step {step}: mse {mse.item():.5f} kl {kl.item():.2f} "
                  f"({time.perf_counter() - began:.0f} s)", flush=True)

    vae.eval()
    with torch.no_grad():
        held_out = BuiltinShapes(args.eval_images, args.image_size, 3, seed=1)
        errors, stds = [], []
        for start in range(0, args.eval_images, 50):
            x = torch.stack([image for image, _ in held_out.__getitems__(
                list(range(start, min(start + 50, args.eval_images))))])
            mean = vae.encode(x).latent_dist.mean
            errors.append(((vae.decode(mean).sample.clamp(-1, 1) - x) ** 2).mean((1, 2, 3)))
        train_x = torch.stack([image for image, _ in data.__getitems__(list(range(1000)))])
        for start in range(0, 1000, 50):
            stds.append(vae.encode(train_x[start:start + 50]).latent_dist.mean)
        mse = torch.cat(errors).mean().item()
        latents = torch.cat(stds)
        std = latents.std().item()
    psnr = 10 * math.log10(4.0 / mse)  # peak-to-peak 2 in [-1, 1]
    scaling = round(1.0 / std, 5)
    vae.register_to_config(scaling_factor=scaling)
    out = Path(args.out)
    vae.half().save_pretrained(out, safe_serialization=True)
    record = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
              "parameters": params, "steps": args.steps, "batch_size": args.batch_size,
              "seconds": round(time.perf_counter() - began, 1),
              "held_out_mse": round(mse, 6), "held_out_psnr_db": round(psnr, 2),
              "latent_mean": round(latents.mean().item(), 4), "latent_std": round(std, 4),
              "scaling_factor": scaling}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
