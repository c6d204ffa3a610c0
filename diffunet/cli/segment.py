"""``diffunet segment train|predict|stats``: the segmentation recipe on the command line.

- ``train`` runs :func:`~diffunet.segmentation.training.train_segmentation` (with no CONFIG:
  the built-in shapes with their masks, on the CPU in minutes).
- ``predict`` turns images into label masks with a model file
  (:func:`~diffunet.segmentation.predict.predict_masks`).
- ``stats`` computes the training images' per-channel mean and std, to paste into the config
  instead of ImageNet's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import SegRunConfig
from .common import add_run_arguments, describe_config, dry_run, out, resolve_run_config, say

DESCRIPTION = ("The UNet as a segmentation network (no timestep input): `segment train` (with "
               "no CONFIG: built-in shapes with their masks), `segment predict` (mask PNGs and "
               "overlays), `segment stats` (the images' mean/std).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="segment_command", metavar="{train,predict,stats}")
    sub.required = True

    q = sub.add_parser(
        "train", help="train a segmentation UNet",
        description="Train a segmentation UNet. Settings come from CONFIG.toml (optional; see "
                    "configs/segment.toml) and section.key=value overrides, e.g. "
                    "train.epochs=20 data.num_classes=2.")
    add_run_arguments(q, resume_help="continue from the newest saved state in --out-dir "
                                     "(fresh if none)",
                      out_dir_help="run folder (default: runs/<config name>, or runs/segment)")
    q.set_defaults(func=_train)

    q = sub.add_parser(
        "predict", help="write a label mask and an overlay for each image",
        description="Predict masks: <name>.png (palette PNG, pixel value = class index, at the "
                    "input's size) and <name>_overlay.png for every image given (folders are "
                    "searched recursively), and masks.json listing them.")
    q.add_argument("model", metavar="MODEL.safetensors")
    q.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    q.add_argument("--out-dir", help="output folder (default masks/<model file name>)")
    q.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    q.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier predict (listed in masks.json) and "
                        "write beside other files, which are kept and never written over")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=_predict)

    q = sub.add_parser(
        "stats", help="per-channel mean/std of the training images",
        description="Compute the training images' per-channel mean and std (values of [0, 1] "
                    "images), printed as data.mean/data.std config lines.")
    q.add_argument("items", nargs="*", metavar="[CONFIG.toml] [section.key=value ...]")
    q.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="use only the first N training images")
    q.add_argument("--json", action="store_true", help="print one JSON object instead")
    q.set_defaults(func=_stats)


def _train(args: argparse.Namespace) -> int:
    cfg, out_dir = resolve_run_config(args.items, args.out_dir, args.resume, root=SegRunConfig,
                                      default_name="segment")
    if args.dry_run:
        return dry_run(cfg, cfg.net_config, out_dir, f", {cfg.output_channels} output channel(s)")
    from ..segmentation.training import train_segmentation

    result = train_segmentation(cfg, out_dir, resume=args.resume, say=say,
                                progress=not args.no_progress,
                                config_source=describe_config(args.items, out_dir, args.resume))
    if result.best_path is not None:
        say(f"best model (epoch {result.best_epoch}, validation Dice "
            f"{result.best_dice:.3f}): {result.best_path}")
        if not result.interrupted:
            say(f"predict with: diffunet segment predict {result.best_path} IMAGE_OR_FOLDER")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..segmentation.predict import predict_masks

    out_dir = Path(args.out_dir) if args.out_dir else Path("masks") / Path(args.model).stem
    bars: list[Any] = []  # made at the first image, after every input check passed

    def tick(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, disable=args.no_progress, unit="image",
                             dynamic_ncols=True))
        bars[0].update(1)

    try:
        written = predict_masks(args.model, args.inputs, out_dir, device=args.device,
                                overwrite=args.overwrite, alpha=args.alpha, progress=tick)
    finally:
        for bar in bars:
            bar.close()
    say(f"wrote {len(written)} mask(s) and overlay(s) to {out_dir}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from ..segmentation.data import build_segmentation_data, compute_mean_std

    cfg, _ = resolve_run_config(args.items, None, False, root=SegRunConfig,
                                default_name="segment")
    data = build_segmentation_data(cfg)
    mean, std = compute_mean_std(data.train, max_items=args.max_images)
    mean, std = [round(v, 4) for v in mean], [round(v, 4) for v in std]
    if args.json:
        out(json.dumps({"mean": mean, "std": std,
                        "images": min(len(data.train), args.max_images or len(data.train))}))
        return 0
    out(f"data.mean = {json.dumps(mean)}\ndata.std = {json.dumps(std)}")
    say("put these under [data] in your config (or pass them as overrides) to normalise with "
        "this data set's statistics instead of ImageNet's")
    return 0
