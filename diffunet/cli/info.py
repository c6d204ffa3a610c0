"""``diffunet info MODEL``: a model file's configs, size and checksum."""

from __future__ import annotations

import argparse
import json

from .common import out, say

REAL_KEYS = ("path", "parameters", "sha256", "format_version", "weights_finite",
             "nonfinite_tensor", "metadata")
"""The keys of ``info --json`` that the command itself fills in (what the file is); a file's
own metadata keys of these names appear only under ``metadata``."""


def _shown(value: object) -> str:
    """A metadata value on one line of the table (a string as it is when it is printable)."""
    text = value if isinstance(value, str) and value.isprintable() else json.dumps(value)
    return text if len(text) <= 200 else text[:197] + "..."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL.safetensors")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_model_file

    loaded = load_model_file(args.model, check_finite=False)
    meta = loaded.metadata
    n_params = sum(p.numel() for p in loaded.net.parameters())
    bad = loaded.nonfinite
    finite_line = ("finite" if bad is None else
                   f"NOT FINITE: tensor {bad[0]} holds {bad[1]:,} NaN/inf value(s) of "
                   f"{bad[2]:,}; sampling it gives grey images, use an earlier model file")
    if bad is not None:
        say(f"diffunet info: warning: {args.model}: tensor {bad[0]} holds {bad[1]:,} "
            f"non-finite value(s) (NaN or inf) of {bad[2]:,}; the weights are damaged, use "
            "an earlier model file")
    if args.json:
        real = {"path": str(args.model), "parameters": n_params, "sha256": loaded.sha256,
                "format_version": meta["format_version"], "weights_finite": bad is None,
                "nonfinite_tensor": None if bad is None else bad[0], "metadata": meta}
        own = {k: v for k, v in meta.items() if k not in REAL_KEYS}
        out(json.dumps({**own, **real}, indent=2))
        return 0
    lines = [f"model file       {args.model}",
             f"format version   {meta['format_version']} (written by diffunet "
             f"{meta.get('diffunet_version', '?')})"]
    if "step" in meta:
        lines.append(f"training step    {_shown(meta['step'])}")
    if loaded.guide is not None:  # autoguidance by the run's own earlier EMA (train.guide_at)
        lines.append(f"carried guide    the EMA of step {loaded.guide.step}, weight "
                     f"{loaded.guide.scale:g} (diffunet sample autoguides with it; --no-guide "
                     "switches it off)")
    if "epoch" in meta:
        metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
        dice, iou = metrics.get("val_mean_dice"), metrics.get("val_mean_iou")
        lines.append(f"training epoch   {_shown(meta['epoch'])}" + (
            f" (validation mean Dice {dice:.4f}, IoU {iou:.4f})"
            if isinstance(dice, (int, float)) and isinstance(iou, (int, float)) else ""))
    names = meta.get("class_names")
    if isinstance(names, list) and names:
        lines.append(f"classes          {len(names)}: " + ", ".join(
            f"{k} {_shown(name)}" for k, name in enumerate(names)))
    lines += [f"parameters       {n_params:,} ({n_params / 1e6:.2f}M)",
              f"weights          {finite_line}",
              f"sha256           {loaded.sha256}"]
    schedule = loaded.schedule
    if schedule is not None:
        lines.append(f"schedule         {schedule.config.describe()}")
    vae = meta.get("vae")
    if isinstance(vae, dict):  # a latent model: what its states decode through
        net = loaded.net.config
        f = vae.get("factor")
        size = f"{net.image_size * f}x{net.image_size * f} " if isinstance(f, int) else ""
        lines.append(f"data space       latents of the VAE {_shown(vae.get('path'))}"
                     + (f" (revision {_shown(vae['revision'])})" if vae.get("revision") else "")
                     + (f" (subfolder {_shown(vae['subfolder'])})" if vae.get("subfolder") else "")
                     + f": {net.in_channels}x{net.image_size}x{net.image_size} states, {size}"
                     f"images; x0 = (z - {_shown(vae.get('shift_factor'))}) x "
                     f"{_shown(vae.get('scaling_factor'))}; VAE weights sha256 "
                     f"{_shown(vae.get('weights_sha256'))}")
    for section in ("unet_config", "schedule_config", "segmentation"):
        if section in meta:
            lines.append(f"[{section.removesuffix('_config')}]")
            table = meta[section]
            if section == "schedule_config" and schedule is not None:
                # Only the fields of its formulation (an older file stores every formulation's
                # fields; one without `formulation` is a VP one).
                table = {key: getattr(schedule.config, key)
                         for key in schedule.config.used_fields()}
            lines += [f"  {key} = {json.dumps(value)}" for key, value in table.items()]
    out("\n".join(lines))
    return 0
