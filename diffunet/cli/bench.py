"""``diffunet bench``: how fast a UNet config trains and samples here (optionally against
diffusers), and how much memory a training step takes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import out, say

DESCRIPTION = ("Time a training step (forward + backward + AdamW) and DDIM-50 sampling of a UNet "
               "config: images/s, ms per step, peak memory and, on a GPU, MFU. Prints a table "
               "and writes it as JSON.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..bench import PRESETS, BenchOptions

    d = BenchOptions  # the defaults live in the options dataclass (house rule 5)
    p.add_argument("items", nargs="*", metavar="unet.key=value",
                   help="overrides of the network config, e.g. unet.base_channels=64")
    p.add_argument("--config", default=d.config_name, metavar="|".join(PRESETS) + "|CONFIG.toml",
                   help=f"the network (default {d.config_name}: 35.7M parameters)")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="training batch (default 128 on a GPU, 16 on a CPU)")
    p.add_argument("--sample-batch-size", type=int, metavar="B",
                   help="sampling batch (default 1024 on a GPU, 64 on a CPU)")
    p.add_argument("--sample-steps", type=int, metavar="S",
                   help="DDIM steps timed per sampling pass (default 50 on a GPU, 5 on a CPU)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=d.precision,
                   help="fp32, or bf16 autocast with fp32 weights (default fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last weights and inputs for both models")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (torch.set_num_threads)")
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help=f"timed repeats, the median is reported (default {d.repeats})")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help=f"untimed repeats first (default {d.warmup})")
    p.add_argument("--only", choices=("train", "sample"), help="measure only this")
    p.add_argument("--compare-diffusers", action="store_true",
                   help="also run diffusers' UNet2DModel / DDIMPipeline, interleaved "
                        "(pip install 'diffunet[bench]')")
    p.add_argument("--diffusers-eager", action="store_true",
                   help="with --compile: leave diffusers uncompiled")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--peak-tflops", type=float, metavar="X",
                   help="the device's bf16 peak for MFU (default: known GPUs by name)")
    p.add_argument("--profile", metavar="PREFIX",
                   help="also profile one diffunet train step / sampling pass: top operators "
                        "in the table, Chrome traces to PREFIX.train.json, PREFIX.sample.json")
    p.add_argument("--json", default="bench.json", metavar="PATH",
                   help="write the results here too (default bench.json; '' for none)")
    p.add_argument("--gpu-check", metavar="DIR",
                   help="run the whole GPU check instead (training step in fp32/bf16/"
                        "channels-last/compile and DDIM-50 vs diffusers, host syncs, attention "
                        "kernels, a recipe run, a sampling run; under 8 minutes on an H100) "
                        "and write DIR/gpu_check.json and DIR/gpu_check.md")
    p.add_argument("--quick", action="store_true",
                   help="with --gpu-check: tiny sizes, to check the check (e.g. on a CPU)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Progress on stderr, the table on stdout, the JSON to ``--json``."""
    from ..bench import BenchOptions, benchmark, format_table, resolve_unet
    from ..fileio import atomic_write_bytes

    if args.gpu_check:
        from ..gpu_check import gpu_check, markdown

        out(markdown(gpu_check(args.gpu_check, device=args.device, quick=args.quick, say=say)))
        out(f"wrote {Path(args.gpu_check) / 'gpu_check.json'} and gpu_check.md")
        return 0

    opts = BenchOptions(
        unet=resolve_unet(args.config, args.items), config_name=args.config,
        batch_size=args.batch_size, sample_batch_size=args.sample_batch_size,
        sample_steps=args.sample_steps, precision=args.precision, compile=args.compile,
        channels_last=args.channels_last, device=args.device, threads=args.threads,
        repeats=args.repeats, warmup=args.warmup,
        what=(args.only,) if args.only else ("train", "sample"),
        compare_diffusers=args.compare_diffusers, diffusers_eager=args.diffusers_eager,
        memory=not args.no_memory, peak_tflops=args.peak_tflops, profile=args.profile)
    result = benchmark(opts, say=say)
    out(format_table(result))
    if args.json:
        atomic_write_bytes(Path(args.json), (json.dumps(result, indent=2) + "\n").encode())
        out(f"wrote {args.json}")
    return 0
