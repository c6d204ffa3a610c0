"""Label masks for images with a segmentation model file (``diffunet segment predict``).

:func:`predict_masks` writes ``<name>.png`` (a palette PNG whose pixel values are the class
indices, at the input's own size) and ``<name>_overlay.png`` (the image with the classes blended
in) for every input; :func:`predict_image` is the one-image step at any size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..checkpoint import load_model
from ..errors import DataError, FolderError, ModelFileError, UsageError
from ..fileio import atomic_save_image
from ..images import IMAGE_EXTENSIONS, load_image_full, normalize, overlay, save_mask
from ..runs import pick_device

__all__ = ["predict_image", "predict_masks"]


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
    dev = pick_device(device)
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
        raise UsageError(f"--alpha: must be in (0, 1], got {alpha}")
    files = _input_files(inputs)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FolderError(f"--out-dir {out_dir} is a file; give a folder path")
    targets = [(out_dir / f"{f.stem}.png", out_dir / f"{f.stem}_overlay.png") for f in files]
    if not overwrite:
        clash = [p for pair in targets for p in pair if p.exists()]
        if clash:
            raise FolderError(f"{clash[0]} exists ({len(clash)} output file(s) would be "
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
