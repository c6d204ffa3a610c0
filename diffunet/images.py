"""Images <-> tensors: reading image files, the one image transform, writing PNGs and grids,
and label masks as images (palette PNGs, overlays, the logits-to-labels rule).

Everything that turns pixels into tensors or tensors into pixels lives here, shared by the data
sets (:mod:`diffunet.data`, :mod:`diffunet.segmentation.data`), previews and ``diffunet sample``,
``diffunet inspect`` and ``diffunet segment predict``. Tensors of images are float32 in [-1, 1]
(diffusion) or [0, 1] (segmentation inputs); label masks are int64 (H, W) class indices with
:data:`IGNORE_INDEX` for void pixels. Every file is written atomically (:mod:`diffunet.fileio`).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from .errors import DataError, DiffunetError, NotRegularFileError, UsageError
from .fileio import atomic_save_image, first_line, open_regular_file

__all__ = [
    "IGNORE_INDEX", "IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS_VARIABLE", "check_pixels",
    "class_palette", "image_header", "load_image", "load_image_full", "make_grid_image",
    "mask_image", "max_image_pixels", "normalize", "open_image", "overlay", "pil_from_hwc",
    "predict_labels", "prepare_image", "save_grid", "save_image", "save_mask", "tensor_image",
    "to_uint8",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""File endings (any case) that an image folder scan picks up."""
IGNORE_INDEX = 255
"""The mask label of void pixels: counted in neither the loss nor the metrics."""
MAX_IMAGE_PIXELS_VARIABLE = "DIFFUNET_MAX_IMAGE_PIXELS"
"""The environment variable that sets the largest image (width x height) any command decodes."""
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
"""About 10000x10000: far above any training image, and a 10000x10000 RGB image is already
300 MB decoded (a float tensor of it 1.2 GB); a small file can claim any size in its header."""


def max_image_pixels() -> int:
    """The largest image, in pixels, that diffunet decodes: ``DIFFUNET_MAX_IMAGE_PIXELS`` (an
    integer; default :data:`DEFAULT_MAX_IMAGE_PIXELS`). A value that is not a positive integer
    is a one-line :class:`UsageError`."""
    text = os.environ.get(MAX_IMAGE_PIXELS_VARIABLE, "").strip().replace("_", "")
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{MAX_IMAGE_PIXELS_VARIABLE}="
                         f"{os.environ[MAX_IMAGE_PIXELS_VARIABLE]!r} is not a positive integer; "
                         f"unset it (default {DEFAULT_MAX_IMAGE_PIXELS:_}) or set e.g. "
                         f"{MAX_IMAGE_PIXELS_VARIABLE}=200000000")
    return value


@contextlib.contextmanager
def image_header(path: str | os.PathLike | BinaryIO, name: str | None = None
                 ) -> Iterator[Image.Image]:
    """``Image.open(path)`` (the header only; pixels are decoded by ``load()``) with
    diffunet's size limit in place of PIL's decompression-bomb check (a multi-line warning
    above ~90 megapixels, an error above ~180 that no setting of ours could raise): an image
    larger than :func:`max_image_pixels` is a one-line :class:`DataError` naming the setting,
    raised before a single pixel is decoded.

    ``path`` is a file name or an open binary file (bytes in memory). A name is opened without
    blocking and checked on the open descriptor (:func:`~diffunet.fileio.open_regular_file`):
    a FIFO, socket or device raises :class:`~diffunet.errors.NotRegularFileError` (a
    ``ValueError``) instead of blocking in ``open()`` forever, also when a file that was an
    image when a folder was scanned is swapped for one later. This is the one place user
    images are opened, so every reader (data sets, ``inspect --image``, masks, ``eval``) gets
    it. ``name``: how messages show the image (default ``str(path)``)."""
    max_image_pixels()  # a bad setting is its own error, before any file is opened
    shown = str(path) if name is None else name
    with contextlib.ExitStack() as stack:
        source: Any = path
        if isinstance(path, (str, bytes, os.PathLike)):
            raw, _ = stack.enter_context(open_regular_file(path))
            # buffered: PIL reads headers in pieces of a few bytes
            source = stack.enter_context(io.BufferedReader(raw))
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # PIL checks in Image.open; this module checks instead
        try:
            img = Image.open(source)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
        with img:
            w, h = img.size
            check_pixels(w, h, shown)
            yield img


def check_pixels(width: int, height: int, name: str) -> None:
    """Refuse an image of ``width`` x ``height`` above :func:`max_image_pixels` with the one-line
    :class:`DataError` every reader gives (``name`` says which image), before it is decoded."""
    limit = max_image_pixels()
    if width * height > limit:
        raise DataError(f"{name} is {width}x{height} = {width * height:,} pixels, more than the "
                        f"{limit:,} diffunet decodes; shrink the image or raise the limit with "
                        f"{MAX_IMAGE_PIXELS_VARIABLE}={width * height}")


# ---------------------------------------------------------------------------------------------
# The one image transform: any PIL image -> float32 (C, S, S) in [-1, 1].

# Modes with more than 8 bits per sample. PIL cannot convert them to "L" without clipping at 255,
# so they are scaled by hand: integer modes are read as 16-bit (0..65535; what PIL gives for
# 16-bit PNG and TIFF), "F" (float TIFF) as 0..1. Values outside those ranges are clipped.
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def _has_alpha(img: Image.Image) -> bool:
    # Image.has_transparency_data needs Pillow >= 10.1; this is the same test.
    if img.mode in _ALPHA_MODES:
        return True
    return img.mode in ("P", "L", "RGB") and "transparency" in img.info


def _convert_mode(img: Image.Image, channels: int) -> Image.Image:
    """``img`` as ``L``/``RGB`` 8-bit, or ``F`` on the 0..255 scale for 16-bit and float
    images; transparency composited onto white (see :func:`prepare_image`)."""
    if img.mode in _HIGH_BIT_MODES:
        scale = 255.0 if img.mode == "F" else 255.0 / 65535.0
        arr = np.asarray(img, dtype=np.float32) * scale
        return Image.fromarray(arr)  # float32 (H, W): mode "F" (all high-bit modes are 1-band)
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def prepare_image(img: Image.Image, image_size: int, channels: int) -> Tensor:
    """Turn a PIL image into a float32 tensor (channels, image_size, image_size) in [-1, 1].

    The one transform shared by image folders, torchvision data sets and :func:`load_image`:

    - transparency (RGBA, LA, palette or colour-key transparency) is composited onto **white**,
      because transparent images (icons, sprites, cut-outs) are drawn to be seen on a white page
      and their dark outlines would vanish on black;
    - palette, bilevel, CMYK, ... become ``L`` (channels=1, ITU-R 601 luma) or ``RGB``; 16-bit
      and float images are scaled to 8-bit range without clipping at 255;
    - the centred square of side min(W, H) is resized to image_size in one bicubic resample
      (antialiased when shrinking), which is "resize the shorter side, then centre-crop" without
      rounding the intermediate size.
    """
    work = _convert_mode(img, channels)
    w, h = work.size
    side = min(w, h)
    left, top = (w - side) / 2.0, (h - side) / 2.0
    work = work.resize((image_size, image_size), Image.BICUBIC,
                       box=(left, top, left + side, top + side))

    arr = np.array(work)  # a writable copy: (S, S) or (S, S, 3)
    x = torch.from_numpy(arr).to(torch.float32)
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    # uint8 v -> v / 127.5 - 1 maps 0 -> -1 and 255 -> 1 exactly, so to_uint8 inverts it.
    x = x / 127.5 - 1.0
    if work.mode == "F":
        x = x.clamp(-1.0, 1.0)  # bicubic overshoots near edges; uint8 results are clipped by PIL
    if x.shape[0] != channels:  # a grey high-bit image asked for as RGB
        x = x.expand(channels, -1, -1).contiguous()
    return x


def open_image(path: str | os.PathLike, image_size: int | None) -> Image.Image:
    """Open and decode an image file, upright (EXIF orientation applied). Raises on failure;
    an image above :func:`max_image_pixels` is a :class:`DataError` raised from its header,
    before decoding. ``image_size`` None: at full resolution."""
    # The with-block closes the file (also when decoding fails); the loaded pixels stay usable.
    with image_header(path) as img:
        # JPEG only: let the decoder shrink by 1/2, 1/4 or 1/8 while keeping at least twice the
        # target size, so a 4000x3000 photo is not fully decoded just to become 64x64.
        if image_size is not None:
            img.draft(None, (2 * image_size, 2 * image_size))
        img.load()
        if img.getexif().get(0x0112, 1) != 1:  # camera photos store "rotate me" in EXIF
            return ImageOps.exif_transpose(img)
        return img


def _open_checked(path: str | os.PathLike, image_size: int | None) -> Image.Image:
    """:func:`open_image`, with a missing or unreadable file as a one-line DataError."""
    try:
        return open_image(path, image_size)
    except DiffunetError:  # over the size limit: its own line names the setting
        raise
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (NotRegularFileError, IsADirectoryError) as e:
        kind = ("a folder" if isinstance(e, IsADirectoryError) or e.is_folder
                else "not a regular file (a FIFO, socket or device)")
        raise DataError(f"{path} is {kind}; give an image file") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise DataError(f"cannot read image {path} ({first_line(e)}); "
                        "give a png/jpg/webp/... file") from None


def load_image(path: str | os.PathLike, image_size: int, channels: int) -> Tensor:
    """Read one image file as a float32 tensor (channels, image_size, image_size) in [-1, 1],
    with the same transform as the image folder data set."""
    return prepare_image(_open_checked(path, image_size), image_size, channels)


def load_image_full(path: str | os.PathLike, channels: int) -> Tensor:
    """Read one image file at its own size (H, W upright) as float32 (channels, H, W) in
    [0, 1], converted as :func:`prepare_image` converts (transparency onto white, 16-bit
    scaled), but not resized or cropped."""
    work = _convert_mode(_open_checked(path, None), channels)
    x = torch.from_numpy(np.array(work, dtype=np.float32) / 255.0).clamp_(0.0, 1.0)
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    return x.expand(channels, -1, -1).contiguous() if x.shape[0] != channels else x


# ---------------------------------------------------------------------------------------------
# Tensor -> image files.


def to_uint8(images: Tensor, channels_last: bool = True) -> Tensor:
    """Map [-1, 1] floats to uint8 0..255 (clamped, rounded; NaN -> 128).

    (B, C, H, W) -> (B, H, W, C) when ``channels_last`` else (B, C, H, W); a single (C, H, W)
    image works the same way. Inverse of ``v / 127.5 - 1`` for uint8 ``v``.
    """
    x = torch.nan_to_num(images.detach().float(), nan=0.0).clamp(-1.0, 1.0)
    x = ((x + 1.0) * 127.5).round().to(torch.uint8)
    if channels_last:
        x = x.permute(*range(x.ndim - 3), x.ndim - 2, x.ndim - 1, x.ndim - 3)
    return x


def pil_from_hwc(arr: np.ndarray) -> Image.Image:
    """A uint8 (H, W, 1) or (H, W, 3) array as an ``L`` or ``RGB`` image."""
    if arr.shape[-1] == 1:
        return Image.fromarray(np.ascontiguousarray(arr[..., 0]))  # uint8 (H, W): "L"
    if arr.shape[-1] == 3:
        return Image.fromarray(np.ascontiguousarray(arr))  # uint8 (H, W, 3): "RGB"
    raise ValueError(f"images need 1 or 3 channels, got {arr.shape[-1]}")


def tensor_image(image: Tensor) -> Image.Image:
    """One image (C, H, W) in [-1, 1] as a PIL image: grayscale for C=1, RGB for C=3."""
    if image.ndim != 3:
        raise ValueError(f"an image is (C, H, W), got shape {tuple(image.shape)}")
    return pil_from_hwc(to_uint8(image).cpu().numpy())


def save_image(image: Tensor, path: str | os.PathLike) -> None:
    """Save one image (C, H, W) in [-1, 1]: grayscale for C=1, RGB for C=3 (atomic write)."""
    if image.ndim != 3:
        raise ValueError(f"save_image takes one image (C, H, W), got shape {tuple(image.shape)}")
    atomic_save_image(tensor_image(image), path)


def make_grid_image(images: Tensor, nrow: int | None = None, padding: int = 2,
                    pad_value: float = 0.0) -> Image.Image:
    """Tile (B, C, H, W) images in [-1, 1] into one ``L``/``RGB`` PIL image.

    ``nrow`` images per row (default ceil(sqrt(B)), a near-square grid), ``padding`` pixels
    between and around tiles in ``pad_value`` (default 0.0: mid grey, visible against both dark
    and white backgrounds).
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"make_grid_image takes a batch (B, C, H, W), got {tuple(images.shape)}")
    b, c, h, w = images.shape
    ncol = nrow if nrow is not None else math.ceil(math.sqrt(b))
    ncol = max(1, min(ncol, b))
    rows = math.ceil(b / ncol)
    tiles = to_uint8(images).cpu().numpy()  # (B, H, W, C)
    fill = int(to_uint8(torch.tensor([pad_value]), channels_last=False)[0])
    canvas = np.full((rows * (h + padding) + padding, ncol * (w + padding) + padding, c), fill,
                     dtype=np.uint8)
    for k in range(b):
        r, q = divmod(k, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        canvas[y:y + h, x:x + w] = tiles[k]
    return pil_from_hwc(canvas)


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None) -> None:
    """Save (B, C, H, W) images in [-1, 1] as one grid image (see :func:`make_grid_image`)."""
    atomic_save_image(make_grid_image(images, nrow), path)


# ---------------------------------------------------------------------------------------------
# Normalisation of segmentation inputs.


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(images - mean) / std`` per channel for (B, C, H, W) (or (C, H, W)) images in [0, 1];
    same shape, device and dtype as ``images``."""
    c = images.shape[-3]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"normalize: {c} channels but mean has {len(mean)} and std "
                         f"{len(std)} values")
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(c, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(c, 1, 1)
    return (images - m) / s


# ---------------------------------------------------------------------------------------------
# Masks as images.


def _voc_colour(i: int) -> tuple[int, int, int]:
    # PASCAL VOC's palette: the bits of i spread over the high bits of r, g, b.
    r = g = b = 0
    for j in range(8):
        r |= ((i >> 0) & 1) << (7 - j)
        g |= ((i >> 1) & 1) << (7 - j)
        b |= ((i >> 2) & 1) << (7 - j)
        i >>= 3
    return r, g, b


def class_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """RGB colours for classes 0..num_classes-1: the PASCAL VOC palette (0 black, 1 dark red,
    2 green, 3 olive, 4 navy, ...; index 255, the ignore label, is cream)."""
    if not 1 <= num_classes <= 256:
        raise ValueError(f"class_palette: num_classes must be 1..256, got {num_classes}")
    return [_voc_colour(i) for i in range(num_classes)]


def _as_label_array(mask: Tensor | np.ndarray, num_classes: int) -> np.ndarray:
    arr = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"a mask is (H, W), got shape {arr.shape}")
    bad = (arr < 0) | ((arr >= num_classes) & (arr != IGNORE_INDEX))
    if bad.any():
        raise ValueError(f"mask values must be 0..{num_classes - 1} or 255, got "
                         f"{int(arr[bad].flat[0])}")
    return arr


def save_mask(mask: Tensor | np.ndarray, path: str | os.PathLike, num_classes: int) -> None:
    """Save a mask (H, W) of labels 0..K-1 (and 255) as a palette PNG whose indices are the
    labels: it shows in colour and :class:`PairedFolders` reads it back exactly. Atomic write."""
    if Path(path).suffix.lower() != ".png":
        raise DataError(f"cannot write mask {path}: masks are saved as .png (lossless, with a "
                        "palette); change the extension")
    atomic_save_image(mask_image(mask, num_classes), path)


def mask_image(mask: Tensor | np.ndarray, num_classes: int) -> Image.Image:
    """A mask (H, W) of labels 0..K-1 (and 255) as a palette image whose indices are the labels
    (:func:`save_mask`; write it as a PNG)."""
    arr = _as_label_array(mask, num_classes).astype(np.uint8)
    img = Image.frombytes("P", (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr).tobytes())
    img.putpalette([v for colour in class_palette(256) for v in colour])
    return img


def overlay(image: Tensor, mask: Tensor, num_classes: int, alpha: float = 0.5) -> Tensor:
    """The image (C, H, W) in [0, 1] (grayscale shown as RGB) with each non-background class
    blended in its :func:`class_palette` colour at opacity ``alpha``: uint8 (H, W, 3).
    Background and ignore (255) pixels are the image's own."""
    if image.ndim != 3 or image.shape[0] not in (1, 3) or mask.shape != image.shape[1:]:
        raise ValueError(f"overlay takes an image (C, H, W) with C 1 or 3 and a mask (H, W), got "
                         f"{tuple(image.shape)} and {tuple(mask.shape)}")
    base = to_uint8(image.detach().cpu().float() * 2.0 - 1.0)  # (H, W, C): [0, 1] -> 0..255
    base = base.expand(-1, -1, 3) if base.shape[-1] == 1 else base
    labels = mask.detach().cpu().to(torch.int64)
    _as_label_array(labels, num_classes)
    lut = torch.zeros(256, 3)
    lut[:num_classes] = torch.tensor(class_palette(num_classes), dtype=torch.float32)
    fg = ((labels > 0) & (labels < num_classes)).unsqueeze(-1)
    blended = (base.float() * (1.0 - alpha) + lut[labels.clamp(0, 255)] * alpha).round()
    return torch.where(fg, blended.clamp(0, 255).to(torch.uint8), base)


def predict_labels(logits: Tensor) -> Tensor:
    """Hard labels (B, H, W) int64 from segmentation logits (B, K_out, H, W): the one decision
    rule of validation, ``segment predict`` and ``inspect``.

    One channel (a binary problem): foreground where sigmoid(logit) > 0.5, i.e. logit > 0 (a tie
    is background). Several channels: the argmax over channels.
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, K, H, W), got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)
