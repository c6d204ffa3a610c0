"""Editing inputs of ``diffunet sample``: the ``--init-image`` files or folder (SDEdit) and the
``--mask`` files or folder (inpainting), found, paired, read and checked before any sampling.

Inputs are read through the regular-file opener (a FIFO named x.png never blocks), must be the
model's size and mode (nothing is resized; EXIF orientation is applied), and are identified by
their SHA-256, which the sample manifest records; each batch reads its inputs again and checks
them against those hashes (:meth:`EditInputs.batch`). A mask folder pairs with an init-image
folder by relative path without the extension; one mask file applies to every init image.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from .data import SKIPPED_NOTE, pair_by_name, scan_image_folder
from .errors import DataError, DiffunetError, NotRegularFileError, UsageError
from .fileio import first_line, read_regular_file
from .images import IMAGE_EXTENSIONS, image_header

__all__ = ["EditInputs", "load_edit_inputs", "MASK_CONVENTION", "MASK_THRESHOLD",
           "IMG2IMG_STRENGTH"]


MASK_CONVENTION = ("white (255) = repaint (generate), black (0) = keep the init image's pixel; "
                   "grey is binarised at 128 (>= 128 repaints), as diffusers' inpainting does")
"""How ``--mask`` files are read (diffusers' inpainting convention); the library's ``mask``
is the other way round (1 = keep), so :meth:`EditInputs.batch` inverts it once."""
MASK_THRESHOLD = 128
IMG2IMG_STRENGTH = 0.8
"""``--strength`` without ``--mask`` when not given (diffusers' img2img default); with a mask
the default is 1 (the masked region is generated from pure noise, as diffusers' inpainting)."""
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


class _NamedBytes(io.BytesIO):
    """A file's bytes in memory that print as the file's path (for the image reader's
    messages)."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self._shown = name

    def __str__(self) -> str:
        return self._shown


def _input_files(path: Path, flag: str) -> tuple[list[Path], list[Path], bool]:
    """The image files ``flag`` names (``[path]`` for a file; a folder's images, recursive and
    in sorted order, as a data folder is scanned), their paths relative to the folder (the
    file name for a file), and whether ``path`` is a folder."""
    if not path.exists():
        raise UsageError(f"{flag} {path} does not exist; give an image file or a folder of "
                         "images")
    if not path.is_dir():
        return [path], [Path(path.name)], False
    files, skipped, _ = scan_image_folder(path)
    if skipped:
        raise DataError(f"{flag} {path}: cannot use {skipped[0]} ({SKIPPED_NOTE}); every image "
                        "file in the folder is an input: fix it or move it out")
    if not files:
        raise DataError(f"{flag} {path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in "
                        "that folder")
    return [path / f for f in files], files, True


def _read_input(path: Path, flag: str, size: int) -> bytes:
    """The bytes of the input image ``path`` (a regular file, checked on the open descriptor:
    a FIFO named x.png never blocks the command), at most what a ``size`` x ``size`` image
    could take."""
    try:
        return read_regular_file(path, max(16 << 20, 64 * size * size))
    except NotRegularFileError as e:
        kind = "a folder" if e.is_folder else "not a regular file (a FIFO, socket or device)"
        raise DataError(f"{flag} {path} is {kind}; give an image file") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{flag}: cannot read {path} ({first_line(e)})") from None


def _decode_input(data: bytes, path: Path, flag: str, size: int) -> tuple[Image.Image, bool]:
    """The image in ``data`` (read from ``path``), upright, after checking it is ``size`` x
    ``size`` (from the header, before decoding); and whether it has transparency. Any problem
    is a one-line :class:`DataError` naming the file."""
    try:
        with image_header(_NamedBytes(data, str(path))) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
            upright = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
            if upright != (size, size):
                raise DataError(f"{flag} {path} is {upright[0]}x{upright[1]} pixels; this model "
                                f"takes {size}x{size} images (diffunet does not resize inputs: "
                                f"crop or resize it to {size}x{size} first)")
            alpha = img.mode in _ALPHA_MODES or "transparency" in img.info
            img.load()
            return (ImageOps.exif_transpose(img) if orientation != 1 else img), alpha
    except DiffunetError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise DataError(f"{flag}: cannot read image {path} ({first_line(e)}); give a "
                        "png/jpg/webp/... file") from None


def _grey_rgb(img: Image.Image) -> Optional[np.ndarray]:
    """The one channel (H, W) of an RGB image whose three channels are equal, else None."""
    arr = np.asarray(img)
    if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
        return np.ascontiguousarray(arr[..., 0])
    return None


def _init_pixels(img: Image.Image, alpha: bool, path: Path, channels: int,
                 flag: str = "--init-image") -> np.ndarray:
    """An init (or condition) image as uint8 (H, W, channels); a mode that is not the model's
    is refused."""
    need = "RGB" if channels == 3 else "grayscale (mode L)"
    if alpha:
        raise DataError(f"{flag} {path} has transparency (mode {img.mode}); this model "
                        f"takes {need} images: flatten it onto a background first")
    if channels == 3 and img.mode in ("RGB", "P"):
        return np.asarray(img.convert("RGB"))
    if channels == 1:
        if img.mode in ("L", "1"):
            return np.asarray(img.convert("L"))[..., None]
        grey = _grey_rgb(img) if img.mode == "RGB" else None
        if grey is not None:
            return grey[..., None]
    raise DataError(f"{flag} {path} is a mode {img.mode} image; this model "
                    f"{'makes' if flag == '--init-image' else 'takes'} {need} images: convert "
                    "it first")


def _mask_pixels(img: Image.Image, alpha: bool, path: Path) -> np.ndarray:
    """A mask as uint8 (H, W); only single-channel masks (or grey RGB) are accepted."""
    grey = None
    if not alpha and img.mode in ("L", "1"):
        grey = np.asarray(img.convert("L"))
    elif not alpha and img.mode == "RGB":
        grey = _grey_rgb(img)
    if grey is None:
        found = "colours (its R, G and B differ)" if img.mode == "RGB" and not alpha \
            else f"mode {img.mode}"
        raise DataError(f"--mask {path} has {found}; a mask is single-channel (mode L or 1, or "
                        f"RGB with equal channels): {MASK_CONVENTION.split(';')[0]}")
    return grey


@dataclass(frozen=True)
class EditInputs:
    """The init images (and masks) of an editing run (``--init-image``, ``--mask``), checked:
    output image i is made from input ``i % count`` (see :meth:`batch`)."""

    init_paths: tuple[Path, ...]
    init_sha256: tuple[str, ...]
    mask_paths: tuple[Path, ...]
    """One per init image (a single ``--mask`` file repeated), or () without masks."""
    mask_sha256: tuple[str, ...]
    channels: int
    size: int
    flag: str = "--init-image"
    """The option the images came from (``--cond-image`` reads its condition images this way)."""

    @property
    def count(self) -> int:
        """The number of init images K."""
        return len(self.init_paths)

    def batch(self, idx: Sequence[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The init images (B, C, H, W) float32 in [-1, 1] and keep masks (B, 1, H, W), 1 where
        the init image's pixel is kept and 0 where it is repainted (None without masks), for
        output images ``idx``. Each file is read again and must still have the SHA-256 recorded
        in the manifest (the inputs are never read one way and recorded another)."""
        inits, keeps = [], []
        cache: dict[tuple[str, int], np.ndarray] = {}
        for i in idx:
            k = i % self.count
            if ("init", k) not in cache:
                cache[("init", k)] = self._pixels("init", k)
                if self.mask_paths:
                    cache[("mask", k)] = self._pixels("mask", k)
            inits.append(cache[("init", k)])
            if self.mask_paths:
                keeps.append(cache[("mask", k)])
        x = torch.from_numpy(np.stack(inits)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if not self.mask_paths:
            return x, None
        repaint = torch.from_numpy(np.stack(keeps) >= MASK_THRESHOLD)
        return x, (~repaint).float().unsqueeze(1)

    def _pixels(self, kind: str, k: int) -> np.ndarray:
        path = (self.init_paths if kind == "init" else self.mask_paths)[k]
        sha = (self.init_sha256 if kind == "init" else self.mask_sha256)[k]
        flag = self.flag if kind == "init" else "--mask"
        data = _read_input(path, flag, self.size)
        if hashlib.sha256(data).hexdigest() != sha:
            raise DataError(f"{flag} {path} changed while this run was sampling; rerun the "
                            "command (the images made from the old file are kept; --overwrite "
                            "redraws them)")
        img, alpha = _decode_input(data, path, flag, self.size)
        return (_init_pixels(img, alpha, path, self.channels, flag) if kind == "init"
                else _mask_pixels(img, alpha, path))


def load_edit_inputs(init_image: str | os.PathLike, mask: str | os.PathLike | None, *,
                     channels: int, size: int, flag: str = "--init-image") -> EditInputs:
    """Find, read and check the ``--init-image`` file or folder and the ``--mask`` file or
    folder for a model of ``channels`` x ``size`` x ``size`` images. A folder's images are taken
    in sorted order (recursive, hidden names skipped, as a data folder); a mask folder pairs
    with an init folder by relative path without the extension (``cat.jpg`` with ``cat.png``);
    one mask file applies to every init image. Wrong sizes, modes, unpaired files and unreadable
    files are one-line :class:`DataError`/:class:`UsageError` naming the file."""
    init_files, init_rel, init_is_dir = _input_files(Path(init_image), flag)
    mask_files: list[Path] = []
    noun = "init image" if flag == "--init-image" else "condition image"
    if mask is not None:
        found, rel, mask_is_dir = _input_files(Path(mask), "--mask")
        if mask_is_dir and not init_is_dir:
            raise UsageError(f"--mask {mask} is a folder but {flag} {init_image} is one "
                             f"file; give one mask file, or a {flag[2:]} folder to pair with")
        if not mask_is_dir:
            mask_files = found * len(init_files)
        else:
            order = pair_by_name(init_rel, rel, where=f"--mask {mask}", noun="mask",
                                 primary_noun=noun, primary_where=init_image)
            mask_files = [found[k] for k in order]
    sha: dict[Path, str] = {}
    for kind, files in (("init", init_files), ("mask", mask_files)):
        what = flag if kind == "init" else "--mask"
        for path in dict.fromkeys(files):
            data = _read_input(path, what, size)
            img, alpha = _decode_input(data, path, what, size)
            if kind == "init":
                _init_pixels(img, alpha, path, channels, flag)
            else:
                _mask_pixels(img, alpha, path)
            sha[path] = hashlib.sha256(data).hexdigest()
    return EditInputs(init_paths=tuple(init_files),
                      init_sha256=tuple(sha[p] for p in init_files),
                      mask_paths=tuple(mask_files),
                      mask_sha256=tuple(sha[p] for p in mask_files),
                      channels=channels, size=size, flag=flag)
