"""``diffunet train [CONFIG.toml] [section.key=value ...]``: train a diffusion UNet."""

from __future__ import annotations

import argparse

from ..config import RunConfig
from .common import add_run_arguments, describe_config, dry_run, resolve_run_config, say

DESCRIPTION = ("Train a diffusion UNet. Settings come from CONFIG.toml (optional) and "
               "section.key=value overrides, e.g. train.max_steps=500 unet.dropout=0.1.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, resume_help="continue from the newest saved state in --out-dir "
                                     "(fresh if none)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg, out_dir = resolve_run_config(args.items, args.out_dir, args.resume, root=RunConfig,
                                      default_name="default")
    if args.dry_run:
        return dry_run(cfg, cfg.unet, out_dir)
    from ..training import train

    result = train(cfg, out_dir, resume=args.resume, say=say, progress=not args.no_progress,
                   config_source=describe_config(args.items, out_dir, args.resume))
    if result.model_path is not None:
        say(f"step {result.step}: model file {result.model_path}")
    if result.nonfinite_skipped:
        say(f"skipped {result.nonfinite_skipped} step(s) with a non-finite loss")
    if not result.interrupted and result.model_path is not None:
        task = cfg.data.task  # a task model draws from inputs: name the flags it needs
        inputs = {None: "", "inpaint": " --cond-image IMAGES --mask MASKS",
                  "superres": " --cond-image LOW_RES_IMAGES"}.get(task, " --cond-image INPUTS")
        say(f"sample from it with: diffunet sample {result.model_path}{inputs}")
    return 0
