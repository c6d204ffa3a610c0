"""``diffunet inspect MODEL``: every block's feature maps for one input, and their statistics."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import out, seed_arg

DESCRIPTION = ("Run one input through a model with a hook on every block and write input.png, "
               "noised.png (diffusion) or prediction.png (segmentation), one NN_<block>.png of "
               "feature maps per block (each channel min-max scaled on its own; magenta = "
               "NaN/inf) and stats.json / stats.txt.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL.safetensors")
    p.add_argument("--image", metavar="PATH",
                   help="input image file (default: an image of the built-in shapes)")
    p.add_argument("--t", type=int, metavar="T",
                   help="diffusion models: the timestep, in [0, T) (default T // 2)")
    p.add_argument("--seed", type=seed_arg, default=0,
                   help="seed of the noise in x_t (default 0)")
    p.add_argument("--class-label", type=int, metavar="K",
                   help="class-conditional models: the label (default: no label)")
    p.add_argument("--max-channels", type=int, default=64, metavar="N",
                   help="feature maps per block picture, the first N channels (default 64)")
    p.add_argument("--out-dir", help="output folder (default inspect/<model file name>)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a --out-dir that holds other files (they are kept; "
                        "a file its stats.json does not list is never written over)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """What was written and the statistics table, on stdout."""
    from ..inspection import format_stats_table, inspect_model

    out_dir = Path(args.out_dir) if args.out_dir else Path("inspect") / Path(args.model).stem
    r = inspect_model(args.model, out_dir, image=args.image, t=args.t, seed=args.seed,
                      class_label=args.class_label, max_channels=args.max_channels,
                      overwrite=args.overwrite, device=args.device)
    lines = [f"{r.kind} model {args.model}; input: {r.input['image']}"
             + (f", t={r.input['t']}, seed {r.input['seed']}" if r.kind == "diffusion" else ""),
             format_stats_table(r.blocks),
             f"wrote {len(r.files)} files to {r.out_dir}:",
             "  input.png        the input image",
             f"  noised.png       x_t at t={r.input['t']} (the network's input)"
             if r.kind == "diffusion" else
             "  prediction.png   the predicted mask (one colour per class)",
             f"  {r.blocks[0]['file']} ... {r.blocks[-1]['file']}   feature maps of the "
             f"{len(r.blocks)} blocks",
             "  stats.json, stats.txt   the statistics above"]
    bad = [b["name"] for b in r.blocks if b["nonfinite"]]
    if bad:
        lines.append(f"warning: non-finite activations from block {bad[0]} on ({len(bad)} "
                     "blocks)")
    out("\n".join(lines))
    return 0
