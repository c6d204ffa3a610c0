"""``diffunet info MODEL``: a model file's configs, size and checksum."""

from __future__ import annotations

import argparse
import json

from .common import out



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL.safetensors")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_model

    net, schedule, meta = load_model(args.model)
    n_params = sum(p.numel() for p in net.parameters())
    if args.json:
        out(json.dumps({"path": str(args.model), "parameters": n_params, **meta}, indent=2))
        return 0
    lines = [f"model file       {args.model}",
             f"format version   {meta['format_version']} (written by diffunet "
             f"{meta.get('diffunet_version', '?')})"]
    if "step" in meta:
        lines.append(f"training step    {meta['step']}")
    if "epoch" in meta:
        metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
        dice, iou = metrics.get("val_mean_dice"), metrics.get("val_mean_iou")
        lines.append(f"training epoch   {meta['epoch']}" + (
            f" (validation mean Dice {dice:.4f}, IoU {iou:.4f})"
            if isinstance(dice, (int, float)) and isinstance(iou, (int, float)) else ""))
    lines += [f"parameters       {n_params:,} ({n_params / 1e6:.2f}M)",
              f"sha256           {meta['sha256']}"]
    for section in ("unet_config", "schedule_config", "segmentation"):
        if section in meta:
            lines.append(f"[{section.removesuffix('_config')}]")
            lines += [f"  {key} = {json.dumps(value)}" for key, value in meta[section].items()]
    out("\n".join(lines))
    return 0
