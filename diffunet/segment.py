"""``diffunet segment train|predict|stats``: the segmentation recipe on the command line.

- ``train`` runs :func:`~diffunet.seg_training.train_segmentation` (with no CONFIG: the built-in
  shapes with their masks, on the CPU in minutes).
- ``predict`` turns images into label masks with a model file: ``<name>.png`` (a palette PNG
  whose pixel values are the class indices, at the input's own size) and
  ``<name>_overlay.png`` (the image with the classes blended in), see :func:`predict_masks`.
- ``stats`` computes the training images' per-channel mean and std, to paste into the config
  instead of ImageNet's.

Only :func:`run_segment` prints.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .cli import resolve_run_config, say
from .config import SegRunConfig, to_toml
from .data import IMAGE_EXTENSIONS, load_image_full
from .errors import ConfigError, DataError, ModelFileError
from .fileio import atomic_save_image
from .seg_data import compute_mean_std, normalize, overlay, save_mask

__all__ = ["add_segment_parser", "predict_masks", "run_segment"]


# ---------------------------------------------------------------------------------------------
# predict


def _input_files(inputs: Sequence[str]) -> list[Path]:
    """Image files named on the command line; folders are searched recursively."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise DataError(f"{p} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input not found: {p}; give image files or folders")
    names = {}
    for f in files:  # outputs are named by file stem, so two inputs must not share one
        if f.stem in names and names[f.stem] != f:
            raise DataError(f"{names[f.stem]} and {f} would both write {f.stem}.png; predict "
                            "them into different --out-dir folders")
        names[f.stem] = f
    return files


@torch.no_grad()
def predict_image(net: torch.nn.Module, image: torch.Tensor, image_size: int,
                  mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Labels (H, W) int64 for one image (C, H, W) in [0, 1] at any size.

    The image is resized so its shorter side is ``image_size`` (the scale the model was trained
    at), padded by reflection to a multiple of the network's downsampling factor, and the
    logits are cropped and resized back (bilinear) to the input size before the argmax.
    """
    c, h, w = image.shape
    scale = image_size / min(h, w)
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    x = F.interpolate(image[None], size=(sh, sw), mode="bilinear", antialias=True,
                      align_corners=False) if (sh, sw) != (h, w) else image[None]
    x = normalize(x, mean, std)
    factor = 2 ** (len(net.config.channel_mults) - 1)
    ph, pw = (-sh) % factor, (-sw) % factor
    if ph or pw:
        mode = "reflect" if ph < sh and pw < sw else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    logits = net(x)[..., :sh, :sw].float()
    if (sh, sw) != (h, w):
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    if logits.shape[1] == 1:
        return (logits[0, 0] > 0).long()
    return logits[0].argmax(dim=0)


def predict_masks(model_path: str | os.PathLike, inputs: Sequence[str], out_dir: str | Path, *,
                  device: str | None = None, overwrite: bool = False,
                  alpha: float = 0.5, progress: Callable[[int, int], None] | None = None,
                  ) -> list[tuple[Path, Path]]:
    """Predict a label mask for every input image with a segmentation model file.

    Writes ``<stem>.png`` (palette PNG: pixel value = class index, at the input's size) and
    ``<stem>_overlay.png`` per input into ``out_dir``; returns those pairs of paths.
    Existing files of the same names are refused unless ``overwrite``.
    """
    from .checkpoint import load_model

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net, schedule, meta = load_model(model_path, device=dev)
    seg = meta.get("segmentation")
    if net.config.time_conditioning or not isinstance(seg, dict):
        raise ModelFileError(f"{model_path} is not a segmentation model (it was not written by "
                             "`diffunet segment train`); use `diffunet sample` with it")
    try:
        K, channels = int(seg["num_classes"]), int(seg["channels"])
        image_size = int(seg["image_size"])
        mean = tuple(float(v) for v in seg["mean"])
        std = tuple(float(v) for v in seg["std"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{model_path}: its segmentation metadata is damaged ({e})") from None
    if not 0 < alpha <= 1:
        raise ConfigError(f"--alpha: must be in (0, 1], got {alpha}")
    files = _input_files(inputs)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out-dir {out_dir} is a file; give a folder path")
    targets = [(out_dir / f"{f.stem}.png", out_dir / f"{f.stem}_overlay.png") for f in files]
    if not overwrite:
        clash = [p for pair in targets for p in pair if p.exists()]
        if clash:
            raise ConfigError(f"{clash[0]} exists ({len(clash)} output file(s) would be "
                              "replaced); pass --overwrite or choose another --out-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, (f, (mask_path, overlay_path)) in enumerate(zip(files, targets)):
        image = load_image_full(f, channels).to(dev)
        labels = predict_image(net, image, image_size, mean, std).cpu()
        save_mask(labels, mask_path, K)
        blended = overlay(image.cpu(), labels, K, alpha=alpha)
        atomic_save_image(Image.fromarray(np.ascontiguousarray(blended)), overlay_path)
        if progress is not None:
            progress(i + 1, len(files))
    return targets


# ---------------------------------------------------------------------------------------------
# the command


def run_segment(args: argparse.Namespace) -> int:
    """Run ``diffunet segment train|predict|stats``; returns the exit code."""
    if args.segment_command == "train":
        cfg, out_dir = resolve_run_config(args.items, args.out_dir, args.resume,
                                          root=SegRunConfig, default_name="segment")
        if args.dry_run:
            from .unet import UNet

            n = UNet(cfg.net_config).num_parameters()
            print(to_toml(cfg))
            print(f"# UNet parameters: {n:,} ({n / 1e6:.2f}M), {cfg.output_channels} output "
                  f"channel(s)")
            print(f"# output folder: {out_dir}")
            return 0
        from .seg_training import train_segmentation

        result = train_segmentation(cfg, out_dir, resume=args.resume, say=say,
                                    progress=not args.no_progress)
        if result.best_path is not None:
            say(f"best model (epoch {result.best_epoch}, validation Dice "
                 f"{result.best_dice:.3f}): {result.best_path}")
            say(f"predict with: diffunet segment predict {result.best_path} IMAGE_OR_FOLDER")
        return 0
    if args.segment_command == "predict":
        out_dir = Path(args.out_dir) if args.out_dir else Path("masks") / Path(args.model).stem
        from tqdm.auto import tqdm

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
    # stats
    cfg, _ = resolve_run_config(args.items, None, False, root=SegRunConfig,
                                default_name="segment")
    from .seg_training import build_segmentation_data

    data = build_segmentation_data(cfg)
    mean, std = compute_mean_std(data.train, max_items=args.max_images)
    print(json.dumps({"mean": [round(v, 4) for v in mean], "std": [round(v, 4) for v in std],
                      "images": min(len(data.train), args.max_images or len(data.train))})
          if args.json else
          f"data.mean = {json.dumps([round(v, 4) for v in mean])}\n"
          f"data.std = {json.dumps([round(v, 4) for v in std])}")
    if not args.json:
        say("put these under [data] in your config (or pass them as overrides) to normalise "
             "with this data set's statistics instead of ImageNet's")
    return 0


def add_segment_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``segment`` (``train``, ``predict``, ``stats``) to an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "segment", help="segmentation with the same UNet: train, predict masks, data stats",
        description="The UNet as a segmentation network (no timestep input): `segment train` "
                    "(with no CONFIG: built-in shapes with their masks), `segment predict` "
                    "(mask PNGs and overlays), `segment stats` (the images' mean/std).")
    sub = p.add_subparsers(dest="segment_command", metavar="{train,predict,stats}")
    sub.required = True

    q = sub.add_parser(
        "train", help="train a segmentation UNet",
        description="Train a segmentation UNet. Settings come from CONFIG.toml (optional; see "
                    "configs/segment.toml) and section.key=value overrides, e.g. "
                    "train.epochs=20 data.num_classes=2.")
    q.add_argument("items", nargs="*", metavar="[CONFIG.toml] [section.key=value ...]")
    q.add_argument("--out-dir", help="run folder (default: runs/<config name>, or "
                                     "runs/segment)")
    q.add_argument("--resume", action="store_true",
                   help="continue after the newest finished epoch in --out-dir (fresh if none)")
    q.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and model size, then exit")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=run_segment)

    q = sub.add_parser(
        "predict", help="write a label mask and an overlay for each image",
        description="Predict masks: <name>.png (palette PNG, pixel value = class index, at the "
                    "input's size) and <name>_overlay.png for every image given (folders are "
                    "searched recursively).")
    q.add_argument("model", metavar="MODEL.safetensors")
    q.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    q.add_argument("--out-dir", help="output folder (default masks/<model file name>)")
    q.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    q.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    q.add_argument("--overwrite", action="store_true", help="replace existing output files")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=run_segment)

    q = sub.add_parser(
        "stats", help="per-channel mean/std of the training images",
        description="Compute the training images' per-channel mean and std (values of [0, 1] "
                    "images), printed as data.mean/data.std config lines.")
    q.add_argument("items", nargs="*", metavar="[CONFIG.toml] [section.key=value ...]")
    q.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="use only the first N training images")
    q.add_argument("--json", action="store_true", help="print one JSON object instead")
    q.set_defaults(func=run_segment)
    return p
