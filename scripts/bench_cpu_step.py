"""CPU training-step time of diffunet's UNet vs diffusers' UNet2DModel at the DDPM CIFAR-10 config.

One step = forward + MSE loss + backward + AdamW, fp32, batch 8, 32x32. The two models are timed
interleaved (A, B, A, B, ...) so that thermal or background drift hits both alike; the median of
the repeats is reported. diffusers is optional.

    python scripts/bench_cpu_step.py [--threads 2] [--batch 8] [--repeats 7] [--warmup 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from diffunet.config import UNetConfig
from diffunet.unet import UNet


def make_step(model: torch.nn.Module, call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              x: torch.Tensor, t: torch.Tensor) -> Callable[[], float]:
    """A closure running one training step and returning its wall time in seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.randn_like(x)

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(call(x, t), target)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = UNetConfig()  # DDPM CIFAR-10: base 128, mults (1,2,2,2), 2 res blocks, attn at 16
    x = torch.randn(args.batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.randint(0, 1000, (args.batch,))

    ours = UNet(cfg).train()
    steps = {"diffunet": make_step(ours, lambda x, t: ours(x, t), x, t)}
    counts = {"diffunet": ours.num_parameters()}
    try:
        from diffusers import UNet2DModel
    except ImportError:
        print("diffusers is not installed; timing diffunet only (pip install diffusers)")
    else:
        theirs = UNet2DModel(
            sample_size=cfg.image_size, in_channels=3, out_channels=3,
            block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mults),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            layers_per_block=cfg.num_res_blocks, attention_head_dim=None,
            dropout=cfg.dropout, flip_sin_to_cos=True, freq_shift=0,
        ).train()
        steps["diffusers"] = make_step(theirs, lambda x, t: theirs(x, t).sample, x, t)
        counts["diffusers"] = sum(p.numel() for p in theirs.parameters())

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{cfg.image_size}x{cfg.image_size}, fp32, fwd+bwd+AdamW")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.repeats):
        for name, step in steps.items():  # interleaved
            dt = step()
            if i >= args.warmup:
                times[name].append(dt)
    for name, ts in times.items():
        print(f"{name:>10}: {counts[name]:,} params  median {statistics.median(ts):.3f} s/step  "
              f"(min {min(ts):.3f}, max {max(ts):.3f}, n={len(ts)})")
    if len(times) == 2:
        ratio = statistics.median(times["diffunet"]) / statistics.median(times["diffusers"])
        print(f"diffunet / diffusers: {ratio:.3f}")


if __name__ == "__main__":
    main()
