"""Segmentation data: built-in shapes with masks, paired image/mask folders, splits, joint flips,
statistics (the mask PNGs, overlays and normalisation are in :mod:`diffunet.images`).

Every data set here yields ``(image, mask)``: ``image`` a float32 tensor (C, S, S) in [0, 1]
(not normalised: :func:`normalize` works on batches, on whatever device they live) and ``mask``
an int64 tensor (S, S) of class indices 0..K-1 (0 = background) with :data:`IGNORE_INDEX` (255)
for "void" pixels that no loss or metric should count. Items are a pure function of the index;
augmentation happens on batches with an explicit generator (:func:`joint_flip`), as in
:mod:`diffunet.data`.

Each data set has ``num_classes`` (K, background included), ``class_names`` (a tuple of K str)
and ``skipped`` (files that could not be read).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from PIL import ImageOps
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..data import flip_where, image_statistics, scan_image_folder, seed_for, skipped_note
from ..config import SegRunConfig
from ..errors import DataError
from ..fileio import first_line
from ..images import IGNORE_INDEX, IMAGE_EXTENSIONS, image_header, open_image, prepare_image

__all__ = [
    "SegData",
    "build_segmentation_data",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BuiltinSegShapes",
    "PairedFolders",
    "ShapeSpec",
    "class_pixel_counts",
    "compute_mean_std",
    "default_mean_std",
    "joint_flip",
    "split_indices",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Tags that keep these per-item and per-split seeds apart from data.py's streams (tags 1, 2).
_TAG_SEG_SHAPES = 101
_TAG_SPLIT = 102


def default_mean_std(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ImageNet per-channel mean and std for ``channels`` = 3; for 1 channel their averages
    (0.449, 0.226), the usual choice for grayscale input to an RGB-trained recipe."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if channels == 1:
        return (round(sum(IMAGENET_MEAN) / 3, 6),), (round(sum(IMAGENET_STD) / 3, 6),)
    raise ValueError(f"default_mean_std: channels must be 1 or 3, got {channels}")


def _check_classes(num_classes: int, class_names: Sequence[str] | None) -> tuple[str, ...]:
    """``class_names`` as a tuple of ``num_classes`` str (default background, class_1, ...)."""
    # 255 is the ignore value, so labels 0..254 are usable; one class alone segments nothing.
    if not isinstance(num_classes, int) or not 2 <= num_classes <= 255:
        raise DataError(f"data.num_classes: must be an integer from 2 to 255 (background "
                        f"included; 255 is the ignore label), got {num_classes!r}")
    if class_names is None:
        return ("background",) + tuple(f"class_{k}" for k in range(1, num_classes))
    names = tuple(str(n) for n in class_names)
    if len(names) != num_classes:
        raise DataError(f"data.class_names: {len(names)} names for data.num_classes="
                        f"{num_classes}; give one name per class, background first")
    return names


# ---------------------------------------------------------------------------------------------
# Built-in data set: shapes on textured backgrounds, with their masks.


class ShapeSpec(NamedTuple):
    """One shape of a :class:`BuiltinSegShapes` image, in image units (the image is [0, 1]^2,
    x to the right, y downwards)."""

    label: int  # class index: 1 circle, 2 square, 3 triangle
    cx: float
    cy: float
    half: float  # half-extent h: circle radius h, square half-side 0.85 h, triangle side 2 h
    colour: tuple[float, ...]  # C values in [0, 1]


_SEG_CLASS_NAMES = ("background", "circle", "square", "triangle")
_MAX_SHAPES = 3
_MIN_EXTENT, _MAX_EXTENT = 0.15, 0.40  # shape width as a fraction of the image side
_COLOUR_TRIES = 16
_NOISE_STD = 0.04
_SQRT3 = math.sqrt(3.0)


def _signed_distance(label: int, dx: np.ndarray, dy: np.ndarray, h: float) -> np.ndarray:
    """Signed distance (image units, negative inside) from pixel offsets ``dx`` (1, S), ``dy``
    (S, 1) to the edge of shape ``label`` of half-extent ``h``: (S, S).

    The numpy twin of ``data.BuiltinShapes._distance`` for its circle, square and triangle
    (the tests check they agree): the same shapes, but torch ops on one 64x64 image cost
    milliseconds each when intra-op threads contend for a busy CPU, numpy microseconds.
    """
    if label == 1:  # circle of radius h
        return np.sqrt(dx * dx + dy * dy) - h
    if label == 2:  # square; 0.85 so its area is close to the circle's
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * h
    # equilateral triangle, apex up, side 2h, its bounding box centred on (cx, cy)
    r_in = h / _SQRT3  # inradius
    py = dy - h * _SQRT3 / 6.0  # the centroid sits height/6 below the box centre
    d = np.maximum(0.5 * _SQRT3 * dx - 0.5 * py, -0.5 * _SQRT3 * dx - 0.5 * py)
    return np.maximum(d, py) - r_in


class BuiltinSegShapes(Dataset):
    """Synthetic segmentation data: 1-3 shapes (circle, square, triangle) on a textured
    background, with exact masks; generated from ``(seed, index)``, no files, no download.

    Item ``i``: ``(image (C, S, S) float32 in [0, 1], mask (S, S) int64)`` with classes
    ``0 background, 1 circle, 2 square, 3 triangle``. The background is a linear gradient between
    two random colours in a random direction; each shape has a random kind, a random colour
    (independent of the kind, so only geometry tells the class), a width of 15-40% of the image
    side and a position where it fits whole; later shapes are drawn on top of earlier ones and the
    mask labels each pixel with its top-most shape. Gaussian noise (std 0.04) covers the whole
    image. Shape colours keep a distance (0.4 in RGB, 0.25 in grey) from the background gradient
    and from the image's other shapes where 16 random tries allow (else the farthest try), so
    boundaries stay visible. About 9% of the pixels are foreground.

    Image and mask come from the same signed distance ``d`` (the shapes of
    ``data.BuiltinShapes``): the mask is ``d < 0`` at pixel centres, the image's edge coverage
    ``clamp(0.5 - d, 0, 1)`` (antialiased), so a pixel is labelled with a shape exactly where that
    shape covers more than half of it. At 32x32 the smallest shapes are 5 pixels wide and circle
    vs square is hard to tell; 64x64 (or 48) is the intended size. :meth:`shapes` gives an item's
    shapes (for tests and figures).
    """

    def __init__(self, size: int = 2000, image_size: int = 64, channels: int = 3,
                 seed: int = 0) -> None:
        if size < 1 or image_size < 8 or channels not in (1, 3):
            raise ValueError(f"BuiltinSegShapes needs size >= 1, image_size >= 8 and channels 1 "
                             f"or 3, got {size}, {image_size}, {channels}")
        self.size = size
        self.image_size = image_size
        self.channels = channels
        self.seed = seed
        self.num_classes = len(_SEG_CLASS_NAMES)
        self.class_names: tuple[str, ...] = _SEG_CLASS_NAMES
        self.skipped: list[str] = []
        coords = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
        self._x = coords.reshape(1, image_size)  # pixel centres in image units, x to the right
        self._y = coords.reshape(image_size, 1)  # y downwards
        # Grey has one dimension to separate colours in, so it gets a smaller gradient and gap.
        self._span = 0.3 if channels == 3 else 0.2  # max per-channel change across the gradient
        self._min_gap = 0.4 if channels == 3 else 0.25

    def __len__(self) -> int:
        return self.size

    def _draws(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The item's uniforms (float64; a fixed layout, so a shape's draws do not depend on
        how many shapes come before it) and its (C, S, S) float32 standard normal noise."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for BuiltinSegShapes of size "
                             f"{self.size}")
        c, s = self.channels, self.image_size
        # torch's generator, as data.py: the same numbers on every platform and numpy version.
        gen = torch.Generator().manual_seed(seed_for(_TAG_SEG_SHAPES, self.seed, index))
        u = torch.rand(2 + 2 * c + _MAX_SHAPES * (4 + _COLOUR_TRIES * c), generator=gen,
                       dtype=torch.float64)
        noise = torch.randn(c, s, s, generator=gen)
        return u.numpy(), noise.numpy()

    def _background(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The gradient's end colours, (C,) each, from uniforms 1 .. 2C."""
        c = self.channels
        c0 = u[1:1 + c]
        c1 = np.clip(c0 + (2.0 * u[1 + c:1 + 2 * c] - 1.0) * self._span, 0.0, 1.0)
        return c0, c1

    def shapes(self, index: int) -> list[ShapeSpec]:
        """The shapes of item ``index`` in drawing order (the last one is on top)."""
        return self._layout(self._draws(index)[0])

    def _layout(self, u: np.ndarray) -> list[ShapeSpec]:
        c = self.channels
        c0, c1 = self._background(u)
        n = 1 + min(int(u[0] * _MAX_SHAPES), _MAX_SHAPES - 1)
        seg = c1 - c0
        seg_len2 = float(seg @ seg) + 1e-12
        out: list[ShapeSpec] = []
        per_shape = 4 + _COLOUR_TRIES * c
        for k in range(n):
            v = u[2 + 2 * c + k * per_shape: 2 + 2 * c + (k + 1) * per_shape]
            label = 1 + min(int(v[0] * 3), 2)
            half = 0.5 * (_MIN_EXTENT + (_MAX_EXTENT - _MIN_EXTENT) * float(v[1]))
            margin = half + 1.0 / self.image_size  # the whole shape, plus a pixel, in the image
            cx = margin + (1.0 - 2.0 * margin) * float(v[2])
            cy = margin + (1.0 - 2.0 * margin) * float(v[3])
            # Colour: the first candidate far enough from the background gradient (the segment
            # c0..c1 in colour space) and from the other shapes, else the farthest candidate.
            cand = v[4:].reshape(_COLOUR_TRIES, c)
            t = np.clip(((cand - c0) @ seg) / seg_len2, 0.0, 1.0)
            gap = np.linalg.norm(cand - (c0 + t[:, None] * seg), axis=1)
            for prev in out:
                gap = np.minimum(gap, np.linalg.norm(cand - np.array(prev.colour), axis=1))
            ok = np.flatnonzero(gap >= self._min_gap)
            pick = int(ok[0]) if ok.size else int(gap.argmax())
            out.append(ShapeSpec(label, cx, cy, half, tuple(float(x) for x in cand[pick])))
        return out

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        index = int(index)
        u, noise = self._draws(index)
        c, s = self.channels, self.image_size
        c0, c1 = (x.astype(np.float32).reshape(c, 1, 1) for x in self._background(u))
        theta = 2.0 * math.pi * float(u[1 + 2 * c])
        ct, st = math.cos(theta), math.sin(theta)
        # Projection on the gradient direction, scaled so it runs 0..1 across the image.
        ramp = ((self._x - 0.5) * ct + (self._y - 0.5) * st) / (abs(ct) + abs(st)) + 0.5
        image = c0 + (c1 - c0) * ramp  # (C, S, S) float32
        mask = np.zeros((s, s), dtype=np.int64)
        for shape in self._layout(u):
            d = _signed_distance(shape.label, self._x - shape.cx, self._y - shape.cy, shape.half)
            coverage = np.clip(0.5 - d * s, 0.0, 1.0)  # (S, S); d * s is in pixels
            colour = np.array(shape.colour, dtype=np.float32).reshape(c, 1, 1)
            image += (colour - image) * coverage
            mask[d < 0] = shape.label
        image += _NOISE_STD * noise
        np.clip(image, 0.0, 1.0, out=image)
        return torch.from_numpy(image), torch.from_numpy(mask)


# ---------------------------------------------------------------------------------------------
# Paired image and mask folders.

# Masks must hold class indices: palette indices, or grey values (8/16/32-bit or bilevel).
_MASK_MODES = ("P", "L", "1", "I", "I;16", "I;16L", "I;16B", "I;16N")
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


def _upright_size(path: Path) -> tuple[tuple[int, int], str]:
    """(width, height) after the EXIF rotation :func:`images.open_image` applies, and the mode;
    from the header only."""
    with image_header(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in _SWAPPING_ORIENTATIONS:
            w, h = h, w
        return (w, h), im.mode


_MASK_SUFFIXES = ("_mask", "_masks", "-mask", "_label", "_labels", "_seg", "_gt",
                  "_segmentation", "_annotation")
"""Name endings that mark a mask file (x_mask.png is the mask of x.jpg)."""


def _strip_mask_suffix(stem: str) -> str:
    for suffix in _MASK_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return stem[:-len(suffix)]
    return stem


def _bad_mask_mode(path: Path, mode: str) -> DataError:
    return DataError(f"masks must be grayscale or palette images, got {mode}: {path}; convert it "
                     "to a palette or grayscale PNG whose pixel values are the class indices "
                     "(one value per class, not a colour)")


def _check_dir(path: str | os.PathLike, what: str) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{what}: {root} does not exist; point it at a folder")
    if not root.is_dir():
        raise DataError(f"{what}: {root} is a file, not a folder; point it at the folder that "
                        "holds the files")
    return root


class PairedFolders(Dataset):
    """Images under ``images_dir`` with their masks under ``masks_dir`` (both recursive).

    Item ``i``: ``(image (C, S, S) float32 in [0, 1], mask (S, S) int64)``, pairs sorted by the
    image's path. Matching: a mask has its image's relative path with any image extension
    (``images/a/x.jpg`` <-> ``masks/a/x.png``); failing that, the same file name stem, when that
    stem is unique among both the images and the masks (``images/a/x.jpg`` <-> ``masks/x.png``).
    ``unmatched_images`` and ``unmatched_masks`` list the files left without a partner (the
    caller reports them); ``skipped`` the files whose header PIL cannot read; ``upscaled`` the
    paired images whose shorter side is below ``image_size``. Each pair's image and mask must
    have the same size (after EXIF rotation), checked from the headers when the folders are
    scanned, as is that every mask is grayscale or palette.

    Mask values: a palette ("P") image gives its palette indices, a grayscale one its pixel
    values; with ``num_classes == 2`` a *grayscale* mask whose values are only 0 and 255 is a
    binary mask and reads as 0/1 (a palette index 255 stays "ignore"). Other values must be
    0..K-1 or 255 (ignore), checked on the full mask when an item is loaded.

    Geometry: image and mask are cropped to the same centred square and resized to
    ``image_size``; the image by :func:`images.prepare_image` (bicubic, antialiased; alpha on
    white), the mask by nearest neighbour so labels stay labels. A file that fails to decode
    raises :class:`DataError` naming it when it is loaded (as :class:`data.FolderImages`).
    """

    def __init__(self, images_dir: str | os.PathLike, masks_dir: str | os.PathLike,
                 image_size: int, channels: int, num_classes: int,
                 class_names: Sequence[str] | None = None) -> None:
        if image_size < 1 or channels not in (1, 3):
            raise ValueError(f"PairedFolders needs image_size >= 1 and channels 1 or 3, got "
                             f"{image_size}, {channels}")
        self.class_names = _check_classes(num_classes, class_names)
        self.num_classes = num_classes
        self.image_size = image_size
        self.channels = channels
        self.images_root = _check_dir(images_dir, "images folder")
        self.masks_root = _check_dir(masks_dir, "masks folder")
        if self.images_root.resolve() == self.masks_root.resolve():
            raise DataError(f"images and masks are both in {self.images_root}; put the masks in "
                            "their own folder (same relative paths as the images)")

        images, img_skipped, small = scan_image_folder(self.images_root, image_size)
        masks, mask_skipped, _ = scan_image_folder(self.masks_root)
        try:  # a masks folder inside the images folder: its files are not images
            inner = self.masks_root.resolve().relative_to(self.images_root.resolve()).parts
        except ValueError:
            inner = None
        if inner is not None:
            images = [r for r in images if r.parts[:len(inner)] != inner]
            mask_real = str(self.masks_root.resolve()) + os.sep
            img_skipped = [p for p in img_skipped
                           if not os.path.realpath(p).startswith(mask_real)]
        self.skipped: list[str] = img_skipped + mask_skipped

        # Keys: relative path without extension; fallback: bare stem, if unique on both sides.
        # A mask named like its image plus a usual suffix (x_mask.png for x.jpg) matches too,
        # after every exact name.
        by_key: dict[str, Path] = {}
        stems: dict[str, list[Path]] = {}
        for rel in masks:
            by_key.setdefault(rel.with_suffix("").as_posix(), rel)
            stems.setdefault(rel.stem, []).append(rel)
        for rel in masks:
            bare = _strip_mask_suffix(rel.stem)
            if bare != rel.stem:
                by_key.setdefault(rel.with_name(bare).as_posix(), rel)
                if bare not in stems:
                    stems[bare] = [m for m in masks if _strip_mask_suffix(m.stem) == bare]
        image_stems: dict[str, int] = {}
        for rel in images:
            image_stems[rel.stem] = image_stems.get(rel.stem, 0) + 1
        self.pairs: list[tuple[Path, Path]] = []
        self.unmatched_images: list[str] = []
        used: set[Path] = set()
        for rel in images:
            m = by_key.get(rel.with_suffix("").as_posix())
            if m is None and image_stems[rel.stem] == 1 and len(stems.get(rel.stem, ())) == 1:
                m = stems[rel.stem][0]
            if m is None:
                self.unmatched_images.append(str(self.images_root / rel))
            else:
                used.add(m)
                self.pairs.append((self.images_root / rel, self.masks_root / m))
        self.unmatched_masks: list[str] = [str(self.masks_root / r) for r in masks
                                           if r not in used]
        if not self.pairs:
            def found(files: list[Path], root: Path) -> str:
                return f"{len(files)} in {root}" + (f" (e.g. {files[0].as_posix()})"
                                                    if files else "")
            raise DataError(
                f"no image has a mask: found images {found(images, self.images_root)} and masks "
                f"{found(masks, self.masks_root)}"
                + (f", {len(self.skipped)} unreadable" if self.skipped else "")
                + f" ({', '.join(IMAGE_EXTENSIONS)}); a mask must have its image's relative path "
                "with any image extension (images/a/x.jpg <-> masks/a/x.png, or x_mask.png), "
                "or the image's file name stem when that is unique")
        small_set = set(small)
        self.upscaled: list[str] = [str(p) for p, _ in self.pairs if str(p) in small_set]

        # Header checks, so a wrong data set fails now rather than hours into training.
        for ipath, mpath in self.pairs:
            try:
                isize, _ = _upright_size(ipath)
                msize, mode = _upright_size(mpath)
            except Exception as e:  # passed scan_image_folder's header check; changed since?
                raise DataError(f"cannot read {ipath} or {mpath} ({first_line(e)}); check the "
                                "files") from None
            if mode not in _MASK_MODES:
                raise _bad_mask_mode(mpath, mode)
            if isize != msize:
                raise DataError(f"image {ipath} is {isize[0]}x{isize[1]} but its mask {mpath} is "
                                f"{msize[0]}x{msize[1]}; a mask must have its image's size")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        ipath, mpath = self.pairs[index]
        s = self.image_size
        try:
            img = open_image(ipath, s)
            image = prepare_image(img, s, self.channels)
        except Exception as e:
            raise DataError(f"cannot decode {ipath} ({first_line(e)}); delete or repair the "
                            "file (only headers are checked when the folder is scanned)") from None
        # prepare_image gives v / 127.5 - 1 for 8-bit v, so this is exactly v / 255.
        image = ((image + 1.0) * 0.5).clamp(0.0, 1.0)
        labels, binary = self._read_mask(mpath)

        # The crop prepare_image took, in the decoded image's pixels. A JPEG may have been decoded
        # at 1/2, 1/4 or 1/8 size (images.open_image's draft), so scale the box by that power of
        # two: decoded pixel j covers full-size pixels [j*f, (j+1)*f).
        iw, ih = img.size
        mh, mw = labels.shape
        f = 1.0 if (iw, ih) == (mw, mh) else 2.0 ** max(0, round(math.log2(mw / iw)))
        if abs(mw - iw * f) >= f or abs(mh - ih * f) >= f:
            raise DataError(f"image {ipath} decodes to {iw}x{ih} but its mask {mpath} is "
                            f"{mw}x{mh}; a mask must have its image's size")
        side = min(iw, ih) * f
        left, top = (iw * f - side) / 2.0, (ih * f - side) / 2.0
        # Nearest neighbour at output pixel centres (PIL's convention for resize with a box).
        centres = (np.arange(s) + 0.5) * (side / s)
        rows = np.clip(np.floor(top + centres).astype(np.int64), 0, mh - 1)
        cols = np.clip(np.floor(left + centres).astype(np.int64), 0, mw - 1)
        mask = torch.from_numpy(labels[rows[:, None], cols[None, :]].astype(np.int64))
        if binary:
            mask[mask == 255] = 1
        return image, mask

    def _read_mask(self, path: Path) -> tuple[np.ndarray, bool]:
        """The full-size mask (H, W) as integers, checked; and whether it is a 0/255 binary
        mask (to be read as 0/1)."""
        try:
            with image_header(path) as m:
                m.load()
                if m.getexif().get(0x0112, 1) != 1:  # rotate as images.open_image rotates images
                    m = ImageOps.exif_transpose(m)
                mode = m.mode
                arr = np.asarray(m) if mode in _MASK_MODES else None
        except Exception as e:
            raise DataError(f"cannot decode mask {path} ({first_line(e)}); delete or repair the "
                            "file") from None
        if arr is None:
            raise _bad_mask_mode(path, mode)
        if arr.dtype == np.bool_:
            arr = arr.view(np.uint8)
        if arr.dtype == np.uint8:  # bincount: far faster than np.unique on a large mask
            present = np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
        else:
            present = np.unique(arr)
        values = [int(v) for v in present]
        k = self.num_classes
        binary = (k == 2 and mode != "P" and 255 in values and set(values) <= {0, 255})
        bad = [v for v in values if (v >= k or v < 0) and v != IGNORE_INDEX]
        if bad and not binary:
            shown = ", ".join(str(v) for v in values[:12]) + (", ..." if len(values) > 12 else "")
            lossy = Path(path).suffix.lower() in (".jpg", ".jpeg", ".webp")
            raise DataError(f"mask {path} has values {{{shown}}} but data.num_classes is {k}; "
                            + ("JPEG/WebP compression blurs labels, so save masks as PNG"
                               if lossy else
                               f"labels must be 0..{k - 1} (255 = ignore): fix the mask or raise "
                               "data.num_classes"))
        return arr, binary


# ---------------------------------------------------------------------------------------------
# Splits, augmentation, normalisation, statistics.


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A deterministic random split of range(n): (train indices, val indices), each sorted.

    ``round(n * val_fraction)`` items go to validation, at least 1 when ``val_fraction > 0`` and
    ``n >= 2``, and at most ``n - 1`` (training keeps one); ``val_fraction == 0``: none.
    """
    if n < 0:
        raise ValueError(f"split_indices: n must be 0 or more, got {n}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0
    if val_fraction > 0 and n >= 2:
        n_val = min(max(1, round(n * val_fraction)), n - 1)
    gen = torch.Generator().manual_seed(seed_for(_TAG_SPLIT, seed, n))
    perm = torch.randperm(n, generator=gen).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def joint_flip(images: Tensor, masks: Tensor, horizontal: Tensor | None = None,
               vertical: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Flip each sample of ``images`` (B, C, H, W) and ``masks`` (B, H, W) together: left-right
    where ``horizontal`` (B,) bool is True, top-bottom where ``vertical`` is; None leaves that
    axis alone. Returns the same shapes.

    The trainer draws the coins for the global batch from its explicit generator, horizontal
    then vertical, and passes this process's share (see :func:`diffunet.data.flip_where`).
    """
    if images.ndim != 4 or masks.ndim != 3 or images.shape[0] != masks.shape[0] \
            or images.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"joint_flip takes images (B, C, H, W) and masks (B, H, W), got "
                         f"{tuple(images.shape)} and {tuple(masks.shape)}")
    for flip, dim in ((horizontal, -1), (vertical, -2)):
        if flip is not None:
            images, masks = flip_where(images, flip, dim), flip_where(masks, flip, dim)
    return images, masks


def compute_mean_std(dataset: Dataset, max_items: int | None = None,
                     batch_size: int = 64) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of every pixel of the first ``max_items`` items
    (all by default) of a data set of ``(image (C, H, W), ...)`` items
    (:func:`diffunet.data.image_statistics`, exact in float64)."""
    n = len(dataset) if max_items is None else min(len(dataset), max_items)
    if n < 1:
        raise DataError("compute_mean_std: the data set is empty; give it at least one image")
    stats = image_statistics(dataset, range(n), batch_size)
    return stats.mean, stats.std


def class_pixel_counts(dataset: Dataset, max_items: int | None = 512, *,
                       num_classes: int | None = None) -> Tensor:
    """Pixels per class, (K,) int64, over ``max_items`` evenly spaced items (all when None or
    when the data set is smaller), ignoring :data:`IGNORE_INDEX`; K = ``num_classes``, by
    default ``dataset.num_classes`` (give it for a ``Subset``)."""
    k = int(num_classes if num_classes is not None
            else dataset.num_classes)  # type: ignore[attr-defined]
    n = len(dataset)  # type: ignore[arg-type]
    m = n if max_items is None else min(n, max_items)
    counts = torch.zeros(k, dtype=torch.int64)
    for j in range(m):
        i = j * n // m  # evenly spaced, deterministic, always including item 0
        mask = dataset[i][1]
        labels = mask[mask != IGNORE_INDEX]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise DataError(f"item {i} has mask labels outside 0..{k - 1} (and 255); check the "
                            "data set's num_classes")
        counts += torch.bincount(labels.flatten().to(torch.int64), minlength=k)
    return counts


# ---------------------------------------------------------------------------------------------
# The data of a run.


@dataclass
class SegData:
    """The resolved data of a run: training and validation sets and how to read them."""

    train: Dataset
    val: Dataset
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    notes: list[str]
    """One-line remarks for people (skipped files, unmatched names)."""


def _folder_notes(ds: Any, images: str, masks: str) -> list[str]:
    notes = []
    if getattr(ds, "skipped", None):
        notes.append(skipped_note(ds.skipped, f"{images} and {masks}"))
    if getattr(ds, "unmatched_images", None):
        notes.append(f"{len(ds.unmatched_images)} image(s) in {images} have no mask of the same "
                     f"name in {masks} and are left out, e.g. {ds.unmatched_images[0]}")
    if getattr(ds, "unmatched_masks", None):
        notes.append(f"{len(ds.unmatched_masks)} mask(s) in {masks} have no image and are left "
                     f"out, e.g. {ds.unmatched_masks[0]}")
    return notes


def build_segmentation_data(cfg: SegRunConfig) -> SegData:
    """The training and validation sets ``cfg.data`` describes (items: image (C,S,S) in [0, 1],
    mask (S,S) int64)."""
    d = cfg.data
    K = d.classes
    notes: list[str] = []
    if d.source == "builtin":
        base: Dataset = BuiltinSegShapes(d.builtin_size, image_size=d.image_size,
                                         channels=d.channels, seed=0)
    else:
        base = PairedFolders(d.images, d.masks, d.image_size, d.channels, K,
                             class_names=d.class_names or None)
        notes += _folder_notes(base, str(d.images), str(d.masks))
    if d.val_images is not None:
        val: Dataset = PairedFolders(d.val_images, d.val_masks, d.image_size, d.channels, K,
                                     class_names=d.class_names or None)
        notes += _folder_notes(val, str(d.val_images), str(d.val_masks))
        train: Dataset = base
    else:
        train_idx, val_idx = split_indices(len(base), d.val_fraction, cfg.train.seed)
        train, val = Subset(base, train_idx), Subset(base, val_idx)
    names = tuple(d.class_names) or tuple(getattr(base, "class_names", None) or
                                          [f"class{k}" for k in range(K)])
    mean, std = default_mean_std(d.channels)
    return SegData(train=train, val=val, num_classes=K, class_names=names,
                   mean=tuple(d.mean) if d.mean is not None else tuple(mean),
                   std=tuple(d.std) if d.std is not None else tuple(std), notes=notes)
