"""Label masks for images with a segmentation model file (``diffunet segment predict``).

:func:`predict_masks` writes ``<name>.png`` (a palette PNG whose pixel values are the class
indices, at the input's own size) and ``<name>_overlay.png`` (the image with the classes blended
in) for every input, and ``masks.json``, the list of them (:mod:`diffunet.outputs`);
:func:`predict_image` is the one-image step at any size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..checkpoint import read_model
from ..errors import DataError, FolderError, ModelFileError, UsageError
from ..images import IMAGE_EXTENSIONS, load_image_full, mask_image, normalize, overlay
from ..outputs import check_unique_outputs, claim_folder
from ..runs import pick_device

__all__ = ["MANIFEST", "predict_image", "predict_masks"]

MANIFEST = "masks.json"
"""The manifest of a predict output folder: ``files`` lists every mask and overlay written there
(before they are written; :mod:`diffunet.outputs`), ``model`` the last model file used."""
MANIFEST_FORMAT = "diffunet.masks"
MANIFEST_VERSION = 1


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
    unique: dict[Path, Path] = {}
    for f in files:  # one image named twice (or as a file and in its folder) is predicted once
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


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
    ``<stem>_overlay.png`` per input into ``out_dir``, and ``masks.json`` listing them; returns
    those pairs of paths. Outputs of an earlier predict there are replaced only with
    ``overwrite``; a folder holding other files is refused unless ``overwrite`` (they are then
    kept), an input or a file ``masks.json`` does not list is never written over, and two inputs
    that would write the same name are refused before anything is written.
    """
    dev = pick_device(device)
    net, schedule, meta = read_model(model_path, device=dev)
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
        raise FolderError(f"--out-dir {out_dir} is a file, not a folder; choose another --out-dir")
    targets = [(out_dir / f"{f.stem}.png", out_dir / f"{f.stem}_overlay.png") for f in files]
    # outputs are named by file stem: no two inputs may share a name, with either suffix
    names = check_unique_outputs((p.name, str(f)) for f, pair in zip(files, targets)
                                 for p in pair)
    doc = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "complete": False,
           "model": {"path": str(Path(model_path).resolve()), "sha256": meta.get("sha256")}}
    with claim_folder(out_dir, command="segment predict", manifest=MANIFEST,
                      format=MANIFEST_FORMAT, format_version=MANIFEST_VERSION, planned=names,
                      inputs=[*files, model_path], overwrite=overwrite, noun="masks") as folder:
        if not overwrite:
            clash = [n for n in names if n in folder.present]
            if clash:
                raise FolderError(f"{out_dir / clash[0]} exists ({len(clash)} output file(s) "
                                  "of an earlier segment predict would be replaced); pass "
                                  "--overwrite or choose another --out-dir")
        folder.remove_leftovers()
        # earlier outputs for other images stay listed (and in the folder)
        listed = [n for n in folder.listed if n in folder.present] + names
        folder.write_manifest(doc, listed)
        for i, (f, (mask_path, overlay_path)) in enumerate(zip(files, targets)):
            image = load_image_full(f, channels).to(dev)
            labels = predict_image(net, image, image_size, mean, std).cpu()
            # relative to the folder's descriptor, never through a link
            folder.save_image(mask_path.name, mask_image(labels, K))
            blended = overlay(image.cpu(), labels, K, alpha=alpha)
            folder.save_image(overlay_path.name, Image.fromarray(np.ascontiguousarray(blended)))
            if progress is not None:
                progress(i + 1, len(files))
        folder.write_manifest({**doc, "complete": True}, listed)
    return targets
