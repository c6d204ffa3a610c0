"""`python scripts/bench_guidance.py [--device cuda] [--batch-sizes 4,16,64] [--repeats 6]`

Autoguidance's network pair, timed: a guided call of two networks of one architecture (the
default run's 1.5M-parameter UNet at 32x32, two random initialisations) as two calls against
one batched call (diffunet.guidance.StackedNetworks, stack_module_state + vmap). Prints the best
of ``--repeats`` per batch size, and the largest difference between the two paths' outputs.
``diffunet.guidance.STACKED_DEVICES`` says where sampling uses the batched call (docs/samplers.md,
"Autoguidance and the guidance interval"); this is the measurement behind it. Writes nothing.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from diffunet.config import SMALL_UNET
from diffunet.guidance import StackedNetworks
from diffunet.unet import UNet


def _best(fn, repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", default="4,16,64")
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*batching rule.*")  # sdpa's vmap fallback
    device = torch.device(args.device)
    torch.manual_seed(0)
    a, b = (UNet(SMALL_UNET).to(device).eval() for _ in range(2))
    with torch.no_grad():
        for p_ in [*a.parameters(), *b.parameters()]:  # zero-initialised output layers
            p_.add_(0.02 * torch.randn_like(p_))
    pair = StackedNetworks(a, b)
    print(f"| batch | two calls (s) | one batched call (s) | ratio | max diff | ({device})")
    print("|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        for n in (int(v) for v in args.batch_sizes.split(",")):
            x = torch.randn(n, 3, 32, 32, device=device)
            t = torch.full((n,), 500.0, device=device)
            two = _best(lambda: (a(x, t), b(x, t)), args.repeats, device)
            one = _best(lambda: pair(x, t), args.repeats, device)
            ga, gb = pair(x, t)
            diff = max(float((ga - a(x, t)).abs().max()), float((gb - b(x, t)).abs().max()))
            print(f"| {n} | {two:.4f} | {one:.4f} | {one / two:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
