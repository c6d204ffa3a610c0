"""``diffunet bench``: how fast a UNet config trains and samples here (optionally against
diffusers), and how much memory a training step takes."""

from __future__ import annotations

import argparse
import contextlib
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
                        "in the table, Chrome traces to PREFIX.train.json, PREFIX.sample.json "
                        "(an existing one is replaced only if diffunet bench wrote it)")
    p.add_argument("--json", default="bench.json", metavar="PATH",
                   help="write the results here too (default bench.json; '' for none); an "
                        "existing PATH is replaced only if it is an earlier diffunet bench "
                        "result")
    p.add_argument("--gpu-check", metavar="DIR",
                   help="run the whole GPU check instead (training step in fp32/bf16/"
                        "channels-last/compile and DDIM-50 vs diffusers, host syncs, attention "
                        "kernels, a recipe run, a sampling run; under 8 minutes on an H100) "
                        "and write DIR/gpu_check.json and DIR/gpu_check.md")
    p.add_argument("--quick", action="store_true",
                   help="with --gpu-check: tiny sizes, to check the check (e.g. on a CPU)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Progress on stderr, the table on stdout, the JSON to ``--json``. Every output file is
    claimed (diffunet/output_files.py) before the benchmark runs."""
    from ..bench import BenchOptions, benchmark, claim_traces, format_table, resolve_unet
    from ..output_files import check_distinct, claim_file, written_by

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
    with contextlib.ExitStack() as claims:  # a benchmark that fails leaves no temporary file
        json_out = None
        if args.json:  # '' is documented as "none"
            json_out = claims.enter_context(claim_file(
                args.json, flag="--json", example="bench.json", ours=written_by(
                    WRITTEN_BY, legacy=is_old_bench_result), noun="a diffunet bench result",
                fix="give another --json PATH, or --json '' for none"))
        traces = claim_traces(opts, claims)
        check_distinct(json_out, *traces.values())
        result = benchmark(opts, say=say, traces=traces)
        out(format_table(result))
        if json_out is not None:
            json_out.write((json.dumps({"written_by": WRITTEN_BY, **result}, indent=2)
                                  + "\n").encode())
            out(f"wrote {args.json}")
    return 0


WRITTEN_BY = "diffunet bench"
"""The ``written_by`` entry of ``--json``: an existing file without it (and not a result of an
older diffunet bench, :func:`is_old_bench_result`) is the user's, and is never replaced."""


def is_old_bench_result(doc: object) -> bool:
    """A ``--json`` result of a diffunet bench from before the ``written_by`` entry: its exact
    top-level shape (a version, the network config, the FLOPs and a list of result rows)."""
    return (isinstance(doc, dict) and isinstance(doc.get("diffunet_version"), str)
            and isinstance(doc.get("unet"), dict) and isinstance(doc.get("flops"), dict)
            and isinstance(doc.get("results"), list)
            and all(isinstance(r, dict) and "model" in r and "what" in r
                    for r in doc["results"]))
