"""Training images: the built-in shapes, an image folder, torchvision and Hugging Face data
sets; batching.

Every data set here yields ``(image, label)`` with ``image`` a float32 tensor (C, H, W) in
[-1, 1] (C = ``DataConfig.channels``, H = W = ``DataConfig.image_size``) and ``label`` an int
class index, or -1 when the source has no labels. Items are a pure function of their index: no
random augmentation happens inside a data set (training flips batches itself with
:func:`flip_where` and coins from an explicit generator), so a resumed run sees exactly the
images an uninterrupted one would have seen.

Each data set has ``num_classes`` (None when unlabelled), ``class_names`` (None when unlabelled)
and ``skipped`` (files that could not be read; only an image folder ever has any). An image
folder also lists in ``upscaled`` the images whose shorter side is below ``image_size``: they
are used (upscaled, which blurs them), and training says how many there are.

Batches come from :class:`GlobalBatchSampler`: one infinite stream of per-epoch permutations, cut
into global batches, each process taking its slice. The order depends only on the seed, never on
the number of processes, and starting at step ``s`` reproduces an uninterrupted run from ``s``.
"""

from __future__ import annotations

import difflib
import io
import itertools
import math
import os
import stat
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import DataConfig
from . import errors
from .errors import (ConfigError, DataError, DiffunetError, MissingDependencyError,
                     NotRegularFileError)
from .fileio import first_line
from .images import (IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS_VARIABLE, check_pixels, image_header,
                     max_image_pixels, open_image, prepare_image)

__all__ = [
    "BuiltinShapes",
    "FolderImages",
    "PairedFolders",
    "pair_by_name",
    "HFImages",
    "HFStream",
    "ImageStats",
    "hf_columns",
    "hf_image",
    "hf_name",
    "MAX_CLASSES",
    "TorchvisionImages",
    "GlobalBatchSampler",
    "Loader",
    "TORCHVISION_DATASETS",
    "build_dataset",
    "class_folder_names",
    "flip_where",
    "image_folder",
    "image_statistics",
    "make_dataloader",
    "scan_image_folder",
    "seed_for",
    "skipped_note",
    "spread_indices",
]


# ---------------------------------------------------------------------------------------------
# Seeds. Python-int splitmix64 (Steele et al. 2014) turns a tuple of ints into one 64-bit seed, so
# (seed, index) pairs never collide the way ``seed * K + index`` does once index reaches K, and
# the result is the same in every process and on every platform.

_MASK64 = (1 << 64) - 1
_TAG_SHAPES = 1  # keeps the shapes' per-image seeds apart from the sampler's per-epoch seeds
_TAG_EPOCH = 2


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seed_for(*keys: int) -> int:
    """A 64-bit seed that is a fixed function of the ints ``keys`` (negative ints allowed)."""
    h = 0
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h


# ---------------------------------------------------------------------------------------------
# Built-in data set: coloured shapes, generated from a seed.

_SHAPE_NAMES = ["circle", "square", "triangle", "cross"]
# Saturated colours that stay distinct at 32x32 and against the dark backgrounds (RGB in 0..1).
_PALETTE = torch.tensor([
    [0.92, 0.12, 0.12],  # red
    [1.00, 0.55, 0.00],  # orange
    [0.98, 0.88, 0.10],  # yellow
    [0.10, 0.80, 0.20],  # green
    [0.00, 0.80, 0.90],  # cyan
    [0.15, 0.35, 1.00],  # blue
    [0.85, 0.20, 0.85],  # magenta
    [0.95, 0.95, 0.95],  # white
])
# channels=1: luma would make blue or red shapes nearly vanish on black, so each palette entry
# gets its own light grey instead.
_GREYS = torch.linspace(0.45, 1.0, len(_PALETTE))
_BACKGROUNDS = torch.tensor([
    [0.00, 0.00, 0.00],  # black
    [0.10, 0.10, 0.12],  # charcoal
    [0.04, 0.06, 0.18],  # navy
])
_BACKGROUND_GREYS = torch.tensor([0.0, 0.10, 0.08])
_MIN_SIZE, _MAX_SIZE = 0.40, 0.75  # shape extent as a fraction of the image side


class BuiltinShapes(Dataset):
    """Coloured shapes on dark backgrounds, generated on the fly (no files, no download).

    Image ``i`` shows one solid, axis-aligned shape (class ``i % 4``: circle, square, upward
    triangle, plus-shaped cross) in one of 8 saturated colours (light greys when ``channels=1``),
    40-75% of the image wide, placed anywhere it fits whole, on one of 3 dark backgrounds.
    Colour, background, size and position come from a generator seeded by (seed, i), so an item
    is the same in every process and call. Edges are antialiased analytically: a pixel's
    coverage is ``clamp(0.5 - d, 0, 1)`` with ``d`` the signed distance (in pixels) from its
    centre to the shape's edge, which is exact box filtering along straight edges.

    ``__getitems__`` renders a whole batch in one set of vectorised ops (the DataLoader uses it),
    a few milliseconds for 64 images at 32x32.
    """

    def __init__(self, size: int, image_size: int, channels: int, seed: int = 0) -> None:
        if size < 1 or image_size < 1 or channels not in (1, 3):
            raise ValueError(f"BuiltinShapes needs size >= 1, image_size >= 1 and channels 1 or 3, "
                             f"got {size}, {image_size}, {channels}")
        self.size = size
        self.image_size = image_size
        self.channels = channels
        self.seed = seed
        self.num_classes: int | None = len(_SHAPE_NAMES)
        self.class_names: list[str] | None = list(_SHAPE_NAMES)
        self.skipped: list[str] = []
        s = image_size
        self._coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s  # pixel centres in [0, 1]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        images, labels = self.render([index])
        return images[0], int(labels[0])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        images, labels = self.render(indices)
        return [(images[k], int(labels[k])) for k in range(len(indices))]

    def render(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Images (B, C, S, S) float32 in [-1, 1] and labels (B,) int64 for these indices."""
        idx = [int(i) for i in indices]
        for i in idx:
            if not 0 <= i < self.size:
                raise IndexError(f"index {i} out of range for BuiltinShapes of size {self.size}")
        b, s = len(idx), self.image_size
        # Five uniforms per image from the image's own generator: colour, background, size, x, y.
        u = torch.empty(b, 5)
        gen = torch.Generator()
        for k, i in enumerate(idx):
            gen.manual_seed(seed_for(_TAG_SHAPES, self.seed, i))
            u[k] = torch.rand(5, generator=gen)
        labels = torch.tensor(idx, dtype=torch.int64) % len(_SHAPE_NAMES)
        colour = (u[:, 0] * len(_PALETTE)).long()
        background = (u[:, 1] * len(_BACKGROUNDS)).long()
        half = 0.5 * (_MIN_SIZE + (_MAX_SIZE - _MIN_SIZE) * u[:, 2])  # half-extent, image units
        margin = half + 1.0 / s  # keep the whole shape, plus a pixel, inside the image
        cx = margin + (1.0 - 2.0 * margin) * u[:, 3]
        cy = margin + (1.0 - 2.0 * margin) * u[:, 4]

        dx = self._coords.view(1, 1, s) - cx.view(b, 1, 1)  # (B, 1, S): x to the right
        dy = self._coords.view(1, s, 1) - cy.view(b, 1, 1)  # (B, S, 1): y downwards
        h = half.view(b, 1, 1)
        dist = torch.empty(b, s, s)  # signed distance to the edge (negative inside), image units
        for c in range(len(_SHAPE_NAMES)):
            m = labels == c
            if not bool(m.any()):
                continue
            dist[m] = self._distance(c, dx[m], dy[m], h[m])
        coverage = (0.5 - dist * s).clamp(0.0, 1.0).unsqueeze(1)  # (B, 1, S, S)

        if self.channels == 3:
            fg = _PALETTE[colour].view(b, 3, 1, 1)
            bg = _BACKGROUNDS[background].view(b, 3, 1, 1)
        else:
            fg = _GREYS[colour].view(b, 1, 1, 1)
            bg = _BACKGROUND_GREYS[background].view(b, 1, 1, 1)
        images = bg + (fg - bg) * coverage  # (B, C, S, S) in [0, 1]
        return images * 2.0 - 1.0, labels

    @staticmethod
    def _distance(shape: int, dx: Tensor, dy: Tensor, h: Tensor) -> Tensor:
        """Signed distance (image units) from each pixel to the edge of a shape of half-extent h.

        Exact along edges (all that antialiasing needs); polygon corners use max/min of the edge
        distances, which is slightly short of the true distance outside a corner.
        """
        if shape == 0:  # circle of radius h
            return torch.sqrt(dx * dx + dy * dy) - h
        if shape == 1:  # square; 0.85 so its area is close to the circle's
            return torch.maximum(dx.abs(), dy.abs()) - 0.85 * h
        if shape == 2:  # equilateral triangle, apex up, side 2h, its bounding box centred
            side = 2.0 * h
            r_in = side / (2.0 * math.sqrt(3.0))  # inradius
            py = dy - side * (math.sqrt(3.0) / 12.0)  # centroid sits height/6 below box centre
            c, sn = math.sqrt(3.0) / 2.0, 0.5  # outward normals (0, 1) and (+-cos30, -sin30)
            d = torch.maximum(c * dx - sn * py, -c * dx - sn * py)  # broadcasts to (n, S, S)
            return torch.maximum(d, py) - r_in
        # plus-shaped cross: union of two bars, arm half-length h, half-thickness 0.36 h
        t = 0.36 * h
        ax, ay = dx.abs(), dy.abs()
        return torch.minimum(torch.maximum(ax - h, ay - t), torch.maximum(ax - t, ay - h))


# ---------------------------------------------------------------------------------------------
# Image folder.


def _walk_images(root: Path) -> tuple[list[Path], list[str]]:
    """Files with an image extension under ``root`` (relative paths, in no particular order)
    and the sub-folders that could not be listed.

    Iterative (a folder nested thousands of levels deep is no recursion), hidden names
    skipped, and symlinks to folders followed only inside ``root`` (compared by real path) and
    only once per folder (by device and inode), so ``up -> ..``, ``self -> .`` or a link to
    ``/`` cannot make the walk loop or wander the file system.
    """
    real_root = os.path.realpath(root)
    inside = real_root.rstrip(os.sep) + os.sep
    files: list[Path] = []
    unreadable: list[str] = []
    st = os.stat(root)
    seen = {(st.st_dev, st.st_ino)}
    todo = [Path()]
    while todo:
        rel = todo.pop()
        here = root / rel
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            unreadable.append(str(here))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:  # a dangling or looping link: not a folder; a file check skips it
                is_dir = False
            if is_dir:
                try:
                    if entry.is_symlink():
                        real = os.path.realpath(entry.path)
                        if real != real_root and not real.startswith(inside):
                            continue  # a link out of the data folder
                    info = entry.stat(follow_symlinks=True)
                except OSError:
                    unreadable.append(entry.path)
                    continue
                key = (info.st_dev, info.st_ino)
                if key not in seen:  # a folder reached twice (through links) is walked once
                    seen.add(key)
                    todo.append(rel / entry.name)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(rel / entry.name)
    return files, unreadable


def scan_image_folder(root: Path, image_size: int = 0) -> tuple[list[Path], list[str], list[str]]:
    """Image files under ``root`` (recursive, sorted) whose header PIL can read, the rest, and
    the readable ones whose shorter side is below ``image_size``.

    Hidden files and folders (".name": .ipynb_checkpoints, macOS "._x.jpg" forks) are ignored.
    Symlinked folders are followed once each and only inside ``root``. The rest ("skipped")
    holds the files that are not images (or not regular files: a FIFO named x.png), images
    larger than :func:`~diffunet.images.max_image_pixels` (``DIFFUNET_MAX_IMAGE_PIXELS``), and
    sub-folders that could not be listed (no permission).
    """
    root = Path(root)
    max_image_pixels()  # a bad DIFFUNET_MAX_IMAGE_PIXELS is an error, not every file skipped
    candidates, skipped = _walk_images(root)
    # determinism: the OS lists files in any order, and which of two paths to a linked folder
    # is walked depends on the order the walk met them
    candidates.sort(key=lambda p: p.parts)

    readable: list[Path] = []
    small: list[str] = []
    for rel in candidates:
        path = root / rel
        try:
            # Header only (format, size): cheap. A file whose pixel data is damaged still
            # passes; FolderImages.__getitem__ reports it. A FIFO or device named like an
            # image is refused on the open descriptor, never read (image_header): reading one
            # would block or never end.
            with image_header(path) as im:
                size = im.size
                ok = size[0] > 0 and size[1] > 0
        except Exception:  # not an image, not a regular file, over the pixel limit, ...
            ok = False
        if ok:
            readable.append(rel)
            if min(size) < image_size:
                small.append(str(path))
        else:
            skipped.append(str(path))
    return readable, skipped, small


def image_folder(root: str | os.PathLike, key: str = "data.path", image_size: int = 0
                 ) -> tuple[list[Path], list[str], list[str]]:
    """:func:`scan_image_folder` of the folder a config key names, with a missing folder, a
    file, or a folder without one readable image as a one-line :class:`DataError` naming
    ``key``. Reads headers only (``--dry-run`` checks a data folder with it)."""
    root = Path(root).expanduser()  # "~/images" from a TOML file is not shell-expanded
    if not root.exists():
        raise DataError(f"{key}: {root} does not exist; point {key} at a folder of images")
    if not root.is_dir():
        raise DataError(f"{key}: {root} is a file, not a folder; point {key} at the folder "
                        "that holds the images")
    files, skipped, small = scan_image_folder(root, image_size)
    if not files:
        if skipped:
            raise DataError(f"{key}: no readable image under {root}: {len(skipped)} file(s) or "
                            f"folder(s) skipped ({SKIPPED_NOTE}, at most "
                            f"{max_image_pixels():,} pixels), e.g. {skipped[0]}; check that "
                            "they are valid images")
        raise DataError(f"{key}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}; "
                        f"put images there or point {key} at an image folder")
    return files, skipped, small


SKIPPED_NOTE = ("not images, unreadable, not regular files, or larger than "
                f"{MAX_IMAGE_PIXELS_VARIABLE}")
"""What a "skipped N file(s)" note says the skipped entries are."""


def skipped_note(skipped: Sequence[str], where: str) -> str:
    """The one-line note for the entries a folder scan skipped (:func:`scan_image_folder`)."""
    return (f"skipped {len(skipped)} file(s) or folder(s) in {where} ({SKIPPED_NOTE}), "
            f"e.g. {skipped[0]}")


def class_folder_names(files: Sequence[Path], root: str | os.PathLike) -> list[str]:
    """The classes of an image folder read with ``data.class_folders``: the first-level
    sub-folders of ``root`` that hold one of ``files`` (the readable images, relative to
    ``root``, as :func:`image_folder` lists them), sorted by name; label k is the k-th. An
    image directly in ``root`` belongs to no class: a one-line :class:`DataError`."""
    loose = [rel for rel in files if len(rel.parts) == 1]
    if loose:
        raise DataError(f"data.path: {len(loose)} image(s) directly in {root} (e.g. "
                        f"{loose[0]}) belong to no class folder; move them into a "
                        "sub-folder or set data.class_folders=false")
    return sorted({rel.parts[0] for rel in files})


class FolderImages(Dataset):
    """Every readable image under a folder (recursive, sorted by path), via :func:`prepare_image`.

    ``skipped`` lists the files with an image extension whose header PIL cannot read;
    ``upscaled`` the images whose shorter side is below ``image_size`` (not an error: like every
    image they are centre-cropped and resized, here upwards, which blurs them). With
    ``class_folders`` each first-level sub-folder is a class (sorted by name; only folders holding
    images count) and an image directly in ``root`` is an error rather than silently dropped.
    A file that passed the header check but fails to decode raises :class:`DataError` naming the
    file when it is loaded: substituting another image would silently change the data set.
    """

    def __init__(self, root: str | os.PathLike, image_size: int, channels: int,
                 class_folders: bool = False, key: str = "data.path") -> None:
        self.root = Path(root).expanduser()  # "~/images" from a TOML file is not shell-expanded
        self.image_size = image_size
        self.channels = channels
        files, self.skipped, self.upscaled = image_folder(self.root, key, image_size)
        self.files: list[Path] = [self.root / rel for rel in files]
        self.num_classes: int | None = None
        self.class_names: list[str] | None = None
        self.labels: list[int] = [-1] * len(files)
        if class_folders:
            self.class_names = class_folder_names(files, self.root)
            index = {name: k for k, name in enumerate(self.class_names)}
            self.num_classes = len(self.class_names)
            self.labels = [index[rel.parts[0]] for rel in files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path = self.files[index]
        try:
            img = open_image(path, self.image_size)
            image = prepare_image(img, self.image_size, self.channels)
        except NotRegularFileError:  # swapped for a FIFO or device since the scan: never read
            raise DataError(f"{path} is no longer a regular file (a FIFO, socket, device or "
                            "folder now; it was an image when the folder was scanned); put the "
                            "image back or remove the name, then rerun") from None
        except Exception as e:
            raise DataError(f"cannot decode {path} ({first_line(e)}); delete or repair the file "
                            "(only headers are checked when the folder is scanned)") from None
        return image, self.labels[index]


def pair_by_name(primary: Sequence[Path], secondary: Sequence[Path], *, where: str,
                 noun: str, primary_noun: str, primary_where: str | os.PathLike) -> list[int]:
    """For each of the ``primary`` relative paths, the index in ``secondary`` of the one with
    its relative path without the extension (``a/cat.jpg`` with ``a/cat.png``): every primary
    needs exactly one, every secondary a primary. Otherwise one :class:`DataError` line: two
    secondaries (or two primaries) of one name, a primary without a secondary, a secondary
    without a primary. ``where`` names the secondary side in the message (``"--mask DIR"``),
    ``noun`` one of its files ("mask"); ``primary_noun`` and ``primary_where``, the other side.
    (``diffunet sample``'s mask folders and the paired task's inputs pair this way; ``segment
    train`` pairs masks more loosely, by stem too.)"""
    by_key: dict[str, int] = {}
    for k, rel in enumerate(secondary):
        key = rel.with_suffix("").as_posix()
        if key in by_key:
            raise DataError(f"{where}: {secondary[by_key[key]].name} and {rel.name} are both "
                            f"the {noun} of {key}; keep one")
        by_key[key] = k
    order: list[int] = []
    seen: set[str] = set()
    for rel in primary:
        key = rel.with_suffix("").as_posix()
        if key in seen:
            raise DataError(f"{primary_where}: two {primary_noun}s are named {key} (another "
                            f"extension); keep one")
        seen.add(key)
        if key not in by_key:
            raise DataError(f"{where} has no {noun} for the {primary_noun} {rel} ({noun}s pair "
                            f"with {primary_noun}s by name: {key}.png)")
        order.append(by_key.pop(key))
    if by_key:
        extra = sorted(by_key)[0]
        raise DataError(f"{where}: the {noun} {extra} has no {primary_noun} of the same name in "
                        f"{primary_where}; {noun}s pair with {primary_noun}s by name")
    return order


class PairedFolders(Dataset):
    """``data.task = "paired"``: the targets under ``root`` and the inputs under ``cond_root``,
    paired by relative path without the extension (as ``diffunet segment train`` pairs images
    and masks), each read as :class:`FolderImages` reads it (``channels``, centre-cropped and
    resized to ``image_size``). Item: (target and input stacked on the channels (2C, S, S),
    -1), so a flip or any transform of the item applies to both alike. A target without an
    input, an input without a target, and two files of one name are one-line
    :class:`DataError`s naming a file."""

    def __init__(self, root: str | os.PathLike, cond_root: str | os.PathLike, image_size: int,
                 channels: int) -> None:
        self.targets = FolderImages(root, image_size, channels)
        self.inputs = FolderImages(cond_root, image_size, channels, key="data.cond_path")
        self.num_classes: int | None = None
        self.class_names: list[str] | None = None
        self.skipped = self.targets.skipped + self.inputs.skipped
        self.upscaled = self.targets.upscaled + self.inputs.upscaled
        self.pairs = pair_by_name(
            [p.relative_to(self.targets.root) for p in self.targets.files],
            [p.relative_to(self.inputs.root) for p in self.inputs.files],
            where=f"data.cond_path {cond_root}", noun="input", primary_noun="target",
            primary_where=f"data.path {root}")
        """For each target, the index of its input."""

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        target, _ = self.targets[index]
        given, _ = self.inputs[self.pairs[index]]
        return torch.cat([target, given]), -1


# ---------------------------------------------------------------------------------------------
# torchvision data sets.


def _tv_mnist_family(cls_name: str) -> Callable[[str, bool], Any]:
    def make(root: str, download: bool) -> Any:
        import torchvision.datasets as tvd
        return getattr(tvd, cls_name)(root, train=True, download=download)
    return make


def _tv_cifar10(root: str, download: bool) -> Any:
    import torchvision.datasets as tvd
    return tvd.CIFAR10(root, train=True, download=download)


def _tv_cifar100(root: str, download: bool) -> Any:
    import torchvision.datasets as tvd
    return tvd.CIFAR100(root, train=True, download=download)


def _tv_svhn(root: str, download: bool) -> Any:
    import torchvision.datasets as tvd
    return tvd.SVHN(root, split="train", download=download)


def _tv_stl10(root: str, download: bool) -> Any:
    import torchvision.datasets as tvd
    return tvd.STL10(root, split="train", download=download)


def _tv_stl10_unlabeled(root: str, download: bool) -> Any:
    import torchvision.datasets as tvd
    return tvd.STL10(root, split="train+unlabeled", download=download)


def _tv_celeba(root: str, download: bool) -> Any:
    import torchvision.datasets as tvd
    return tvd.CelebA(root, split="train", target_type=[], download=download)


def _tv_flowers102(root: str, download: bool) -> Any:
    import torchvision.datasets as tvd
    return tvd.Flowers102(root, split="train", download=download)


# name (as the user writes it, minus case, '-', '_' and spaces) -> (display name, constructor,
# labelled, where the files go under the root). Each entry is one explicit train split.
TORCHVISION_DATASETS: dict[str, tuple[str, Callable[[str, bool], Any], bool, str]] = {
    "mnist": ("mnist", _tv_mnist_family("MNIST"), True, "MNIST/raw"),
    "fashionmnist": ("fashion_mnist", _tv_mnist_family("FashionMNIST"), True, "FashionMNIST/raw"),
    "kmnist": ("kmnist", _tv_mnist_family("KMNIST"), True, "KMNIST/raw"),
    "cifar10": ("cifar10", _tv_cifar10, True, "cifar-10-batches-py"),
    "cifar100": ("cifar100", _tv_cifar100, True, "cifar-100-python"),
    "svhn": ("svhn", _tv_svhn, True, "train_32x32.mat"),
    "stl10": ("stl10", _tv_stl10, True, "stl10_binary"),
    "stl10unlabeled": ("stl10_unlabeled", _tv_stl10_unlabeled, False, "stl10_binary"),
    "celeba": ("celeba", _tv_celeba, False, "celeba"),
    "flowers102": ("flowers102", _tv_flowers102, True, "flowers-102"),
}


def _normalise_name(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in "-_ ")


class TorchvisionImages(Dataset):
    """A torchvision data set's images through :func:`prepare_image`, with its class labels."""

    def __init__(self, base: Any, image_size: int, channels: int, labelled: bool) -> None:
        self.base = base
        self.image_size = image_size
        self.channels = channels
        self.skipped: list[str] = []
        self.num_classes: int | None = None
        self.class_names: list[str] | None = None
        self._labelled = labelled
        if labelled:
            names = getattr(base, "classes", None)
            if names:
                self.class_names = [str(n) for n in names]
            else:  # SVHN, STL10 without its class file: digits / indices
                self.class_names = [str(k) for k in range(10)]
            self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img, target = self.base[index]
        label = int(target) if self._labelled and target is not None else -1
        return prepare_image(img, self.image_size, self.channels), label


def _build_torchvision(cfg: DataConfig) -> TorchvisionImages:
    assert cfg.name is not None  # DataConfig requires it for source='torchvision'
    key = _normalise_name(cfg.name)
    if key not in TORCHVISION_DATASETS:
        known = [entry[0] for entry in TORCHVISION_DATASETS.values()]
        close = difflib.get_close_matches(key, list(TORCHVISION_DATASETS), n=1, cutoff=0.6)
        hint = f"did you mean {TORCHVISION_DATASETS[close[0]][0]!r}? " if close else ""
        raise DataError(f"data.name: unknown torchvision data set {cfg.name!r}; {hint}"
                        f"known: {', '.join(known)}")
    display, make, labelled, where = TORCHVISION_DATASETS[key]
    root = os.path.expanduser(cfg.path or "./data")
    try:
        base = make(root, cfg.download)
    except ImportError as e:  # SVHN and Flowers102 read .mat files with scipy; CelebA uses gdown
        missing = getattr(e, "name", None) or "a package"
        raise DataError(f"{display} needs the Python package {missing!r}; "
                        f"pip install {missing.split('.')[0]}") from None
    except Exception as e:
        if not cfg.download and isinstance(e, RuntimeError):
            # torchvision's "Dataset not found or corrupted" (it also checks md5 sums)
            raise DataError(f"{display} is not under {root} (looked for {where}, complete and "
                            "uncorrupted); set data.download=true or point data.path at it"
                            ) from None
        if cfg.download:
            raise DataError(f"could not download {display} into {root} ({first_line(e)}); check "
                            f"the network, or download it by hand into {root}") from None
        raise DataError(f"cannot read {display} from {root} ({first_line(e)}); delete it and "
                        "set data.download=true to fetch it again") from None
    return TorchvisionImages(base, cfg.image_size, cfg.channels, labelled)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets (the ``hf`` extra), by Hub name or local folder.


def _hf_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _load_hf(cfg: DataConfig) -> Any:
    """The ``datasets.Dataset`` of ``cfg.name`` and ``cfg.split`` (a one-line error otherwise);
    with ``cfg.streaming`` an ``IterableDataset`` (a folder saved by ``save_to_disk`` is read
    from disk and iterated as a stream, which is what the tests use)."""
    ds = _open_hf(cfg)
    if cfg.streaming and hasattr(ds, "to_iterable_dataset"):
        ds = ds.to_iterable_dataset()
    return ds


def _irregular_file(root: Path) -> str | None:
    """The first entry under ``root`` (a local Hugging Face data set) that is neither a folder
    nor a regular file, also through a link: a FIFO, socket or device. ``datasets`` opens its
    files (arrow, parquet, state.json, ...) with a plain ``open()``, which blocks on a FIFO
    forever. Iterative; linked folders are not entered (nothing outside ``root`` is walked)."""
    todo = [root]
    while todo:
        try:
            with os.scandir(todo.pop()) as it:
                entries = list(it)
        except OSError:  # unlistable: datasets says so itself
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    todo.append(Path(entry.path))
                    continue
                mode = os.stat(entry.path).st_mode  # what a link names
            except OSError:  # dangling link, no permission: datasets says so itself
                continue
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                return entry.path
    return None


def _open_hf(cfg: DataConfig) -> Any:
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError('data.source = "hf" needs the optional package datasets; '
                                     'pip install "diffunet[hf]"') from None
    name = str(cfg.name)
    local = Path(name).expanduser()
    cache_dir = os.path.expanduser(cfg.path) if cfg.path else None
    if local.is_dir():
        bad = _irregular_file(local)
        if bad is not None:
            raise DataError(f"data.name: {bad} in the data set folder {local} is not a regular "
                            "file (a FIFO, socket or device), which datasets would block or "
                            "never end reading; remove it or point data.name at a clean copy")
        saved = any((local / f).is_file() for f in ("state.json", "dataset_dict.json"))
        try:
            if not saved:  # a folder of data files (images, parquet, csv, ...): a builder reads it
                return datasets.load_dataset(str(local), split=cfg.split, cache_dir=cache_dir,
                                             streaming=cfg.streaming)
            ds = datasets.load_from_disk(str(local))
        except Exception as e:
            raise DataError(f"data.name: cannot read the data set in {local} "
                            f"({first_line(e)})") from None
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise DataError(f"data.split: {local} has no split {cfg.split!r}; its splits: "
                                f"{', '.join(ds)}")
            ds = ds[cfg.split]
        return ds
    if name.startswith(("/", ".", "~")) or "\\" in name or local.exists():
        # A path, not a Hub name ("user/name" never starts so): say so without asking the Hub.
        raise DataError(f"data.name: {name} is not a folder; point data.name at a folder written "
                        "by Dataset.save_to_disk or holding data files, or give a Hub name")
    try:
        return datasets.load_dataset(name, split=cfg.split, cache_dir=cache_dir,
                                     streaming=cfg.streaming)
    except Exception as e:
        how = ("HF_DATASETS_OFFLINE=1 is set, so only the local cache was tried"
               if _hf_offline() else "nor could it be loaded from the Hub or the local cache")
        raise DataError(f"data.name: {name!r} is not a local folder, {how} "
                        f"({first_line(e)})") from None


def hf_name(cfg: DataConfig) -> str:
    """How messages name the Hugging Face data set of ``cfg``."""
    return f"the Hugging Face data set {cfg.name} (split {cfg.split})"


def hf_columns(features: Any, image_column: str | None, label_column: str | None) -> str:
    """The image column of a Hugging Face data set with ``features`` (``image_column``, else
    the first column of Image type, else "image" or "img"), after checking that both columns
    exist; a one-line :class:`DataError` listing the columns otherwise."""
    import datasets
    columns = list(features)
    shown = ", ".join(columns) or "none"
    if image_column is None:
        found = [c for c in columns if isinstance(features[c], datasets.Image)]
        found += [c for c in ("image", "img") if c in columns]
        if not found:
            raise DataError(f"data.image_column: no column of Image type, nor 'image' or "
                            f"'img'; the columns: {shown}")
        image_column = found[0]
    for key, col in (("image_column", image_column), ("label_column", label_column)):
        if col is not None and col not in columns:
            raise DataError(f"data.{key}: no column {col!r}; the columns: {shown}")
    return image_column


MAX_CLASSES = 1_000_000
"""The most classes a label column may imply (largest plain-integer label + 1): far above any
data set's (ImageNet-21k has 21,841), and each class is a name in memory (and, conditioned on,
a row of the network's class embedding), so a stray label of 4,000,000,000 is refused before
4e9 names are made."""


class HFImages(Dataset):
    """A Hugging Face ``datasets.Dataset``'s images through :func:`prepare_image`, with labels.

    ``image_column`` unset: the first column of Image type, else "image" or "img";
    ``label_column`` unset: unlabelled (-1). A ClassLabel column gives ``class_names``; plain
    integer labels are named "0" .. "K-1" (K = largest + 1, at most :data:`MAX_CLASSES`).
    ``name`` says which data set in messages. An Image column is read undecoded and decoded
    here (:func:`hf_image`): within the pixel limit, its files opened without blocking.
    """

    def __init__(self, ds: Any, image_size: int, channels: int, image_column: str | None = None,
                 label_column: str | None = None, name: str | None = None) -> None:
        import datasets
        features = ds.features
        image_column = hf_columns(features, image_column, label_column)
        self.image_column, self.label_column = image_column, label_column
        self.image_size = image_size
        self.channels = channels
        self.name = name or "the Hugging Face data set"
        self.skipped: list[str] = []
        self.num_classes: int | None = None
        self.class_names: list[str] | None = None
        self.labels: list[int] | None = None
        if label_column is not None:
            feature = features[label_column]
            self.labels = _class_indices(ds[label_column], label_column, feature, self.name)
            if isinstance(feature, datasets.ClassLabel):
                self.class_names = [str(n) for n in feature.names]
            else:
                self.class_names = [str(k) for k in range(max(self.labels, default=-1) + 1)]
            self.num_classes = len(self.class_names)
        ds = ds.select_columns([image_column])  # decode only the images
        if isinstance(features[image_column], datasets.Image):
            # Undecoded ({"bytes", "path"}): datasets' own decoder would open a path that is a
            # FIFO and block, and raise PIL's DecompressionBombError as a traceback.
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = hf_image(self.ds[int(index)][self.image_column], self.image_size, self.channels,
                         f"item {index} of {self.image_column!r} in {self.name}")
        return image, (self.labels[index] if self.labels is not None else -1)


def _class_indices(values: Sequence[Any], column: str, feature: Any, where: str) -> list[int]:
    """A label column's values as class indices, checked before anything is sized by them:
    each an integer from 0, below the ClassLabel's number of names, or (plain integers) below
    :data:`MAX_CLASSES`; else a one-line :class:`DataError` naming the item."""
    import datasets
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    bound = len(names) if names is not None else MAX_CLASSES
    for i, v in enumerate(values):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise DataError(f"data.label_column: item {i} of {column!r} in {where} is "
                            f"{_shown(v)}; labels must be class indices (integers from 0), "
                            f"the column is {feature}")
        if v >= bound:
            if names is not None:
                raise DataError(f"data.label_column: item {i} of {column!r} in {where} is "
                                f"label {v}, but the column's ClassLabel names {len(names)} "
                                f"classes (0..{len(names) - 1}); fix the labels")
            raise DataError(f"data.label_column: item {i} of {column!r} in {where} is label "
                            f"{v:,}, which would make {v + 1:,} classes, more than the "
                            f"{MAX_CLASSES:,} diffunet allows; labels must be class indices "
                            "0..K-1: renumber them (or use a ClassLabel column)")
    return [int(v) for v in values]


def _shown(value: Any) -> str:
    """A value in a message: its type and a short repr."""
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    kind = type(value).__name__
    article = "an" if kind[0] in "aeiou" else "a"
    return "None" if value is None else f"{article} {kind} ({text})"


def hf_image(value: Any, image_size: int, channels: int, where: str) -> Tensor:
    """One value of a Hugging Face image column through :func:`prepare_image`: an undecoded
    Image feature (``{"bytes", "path"}``; the file opened without blocking, checked to be a
    regular file), encoded image bytes, a PIL image, or an array of 8-bit values ((H, W) or
    (H, W, C)). Every image is checked against the pixel limit before it is decoded. Anything
    else (a string, a number, a dict without bytes or path, an unreadable file) is a one-line
    :class:`DataError` naming ``where`` (e.g. "item 3 of 'img' in the Hugging Face data set
    x (split train)")."""
    from PIL import Image
    import numpy as np
    path = None
    try:
        source: Any = None
        if isinstance(value, dict):  # an undecoded Image feature: its bytes, or a path
            data, path = value.get("bytes"), value.get("path")
            if isinstance(data, (bytes, bytearray)) and data:
                source = io.BytesIO(data)
            elif isinstance(path, str) and path:
                source = path
            else:
                raise DataError(f"data.image_column: {where} is a dict without image 'bytes' or "
                                f"a 'path' (keys: {', '.join(map(str, value)) or 'none'}), not "
                                f"an image; {_IMAGE_VALUES}")
        elif isinstance(value, (bytes, bytearray)) and value:  # a binary column: encoded bytes
            source = io.BytesIO(value)
        if source is not None:
            with image_header(source, name=f"data.image_column: {where}") as img:
                img.load()
                return prepare_image(img, image_size, channels)
        if isinstance(value, Image.Image):
            return prepare_image(value, image_size, channels)
        if isinstance(value, (list, tuple, np.ndarray)):
            return prepare_image(_array_image(np.asarray(value), where), image_size, channels)
        raise DataError(f"data.image_column: {where} is {_shown(value)}, not an image; "
                        f"{_IMAGE_VALUES}")
    except DataError:
        raise
    except NotRegularFileError as e:
        kind = "a folder" if e.is_folder else "not a regular file (a FIFO, socket or device)"
        raise DataError(f"data.image_column: {where} names {path}, which is {kind}; point it "
                        "at an image file") from None
    except Exception as e:
        raise DataError(f"data.image_column: {where} is not a readable image "
                        f"({first_line(e)})") from None


_IMAGE_VALUES = ("an image column holds images (an Image feature, encoded image bytes, or "
                 "arrays (H, W) or (H, W, C) of 0..255); point data.image_column at one")


def _array_image(arr: Any, where: str) -> Any:
    """An array value of an image column as a PIL image: 8-bit values, (H, W) or (H, W, C)
    with C 1, 3 or 4, within the pixel limit; else a one-line :class:`DataError`."""
    from PIL import Image
    import numpy as np
    shape_ok = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))
    if not shape_ok or arr.dtype.kind not in "biu" or arr.size == 0:
        raise DataError(f"data.image_column: {where} is an array of shape {tuple(arr.shape)} "
                        f"({arr.dtype}), not an image; {_IMAGE_VALUES}")
    check_pixels(arr.shape[1], arr.shape[0], f"data.image_column: {where}")
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise DataError(f"data.image_column: {where} is an array with values outside "
                            f"0..255 ({int(arr.min())}..{int(arr.max())}), not an 8-bit image; "
                            "scale it to 0..255")
        arr = arr.astype(np.uint8)
    return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)


class HFStream:
    """A streamed Hugging Face data set (``data.streaming = true``) as an endless stream of
    training batches, for data sets that do not fit on disk.

    The order: epoch 0 of the stream shuffled (``IterableDataset.shuffle``: shard order plus a
    buffer of ``shuffle_buffer`` examples) with a seed from ``(seed, 0)``, then epoch 1 with a
    seed from ``(seed, 1)``, ... without a seam; global step ``s`` is examples ``[s*B, (s+1)*B)``
    of that stream and process ``rank`` decodes its own contiguous ``B // world`` of them, as
    :class:`GlobalBatchSampler` does for indexed data. Every process reads the whole stream
    (images undecoded) and so sees the same global batches; resuming at step ``s`` skips the
    first ``s*B`` examples without decoding them, which gives exactly the batches of an
    uninterrupted run (the price: the skipped part is read again).

    There is no length: ``len()`` is not defined. Labels: a ClassLabel column gives the class
    names; plain integer labels need ``num_classes`` (the stream cannot be counted ahead).
    """

    def __init__(self, cfg: DataConfig, num_classes: int | None = None,
                 shuffle_buffer: int = 1000) -> None:
        import datasets
        ds = _load_hf(cfg)
        features = ds.features
        if features is None:
            raise DataError(f"data.streaming: the stream of {cfg.name} does not say its columns' "
                            "types; stream a data set with features (parquet, Image columns) or "
                            "set data.streaming=false")
        self.image_column = hf_columns(features, cfg.image_column, cfg.label_column)
        self.label_column = cfg.label_column
        self.image_size, self.channels = int(cfg.image_size or 0), int(cfg.channels or 0)
        self.shuffle_buffer = shuffle_buffer
        self.skipped: list[str] = []
        self.num_classes: int | None = None
        self.class_names: list[str] | None = None
        if self.label_column is not None:
            feature = features[self.label_column]
            if isinstance(feature, datasets.ClassLabel):
                self.class_names = [str(n) for n in feature.names]
            elif num_classes is not None:
                self.class_names = [str(k) for k in range(num_classes)]
            else:
                raise DataError(f"data.label_column: {self.label_column!r} holds plain integers "
                                f"({feature}) and a stream cannot be counted ahead; set "
                                "unet.num_classes")
            self.num_classes = len(self.class_names)
        columns = [self.image_column] + ([self.label_column] if self.label_column else [])
        ds = ds.select_columns(columns)
        if isinstance(features[self.image_column], datasets.Image):
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        self.ds = ds
        self.name = f"{cfg.name} (split {cfg.split})"
        self.where = f"in the stream of {hf_name(cfg)}"  # for messages about one example

    def _label(self, value: Any, where: str) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or not 0 <= value < (self.num_classes or 0):
            raise DataError(f"data.label_column: {where} has label {_shown(value)}, not a "
                            f"class index in [0, {self.num_classes})")
        return int(value)

    def batches(self, global_batch_size: int, *, seed: int, start_step: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """This process's ``(images (b, C, S, S), labels (b,))`` for each step from
        ``start_step`` on, b = ``global_batch_size // world_size`` (labels -1 if unlabelled)."""
        local = global_batch_size // world_size
        skip = start_step * global_batch_size
        pos = 0  # position in the endless stream
        pending: list[dict[str, Any]] = []
        for epoch in itertools.count():
            stream = self.ds.shuffle(seed=seed_for(_TAG_EPOCH, seed, epoch) % 2**32,
                                     buffer_size=self.shuffle_buffer)
            seen = 0
            for example in stream:
                seen += 1
                pos += 1
                if pos <= skip:
                    continue
                pending.append(example)
                if len(pending) < global_batch_size:
                    continue
                mine = pending[rank * local:(rank + 1) * local]
                first = pos - global_batch_size + rank * local
                images = torch.stack([hf_image(ex[self.image_column], self.image_size,
                                               self.channels, f"example {first + i} of "
                                               f"{self.image_column!r} {self.where}")
                                      for i, ex in enumerate(mine)])
                labels = torch.tensor(
                    [self._label(ex[self.label_column], f"example {first + i} of "
                                 f"{self.label_column!r} {self.where}")
                     if self.label_column else -1 for i, ex in enumerate(mine)],
                    dtype=torch.int64)
                pending = []
                yield images, labels
            if seen == 0:
                raise DataError(f"data.name: the stream of {self.name} is empty")


def build_dataset(cfg: DataConfig) -> Dataset:
    """The training data set ``cfg`` describes; items ``(image (C, S, S) in [-1, 1], label)``
    (``task = "paired"``: the target and its input stacked, (2C, S, S), label -1).

    The built-in shapes always use seed 0 (the data set is fixed, like a downloaded one; the
    training seed only changes the order, through :class:`GlobalBatchSampler`).
    """
    for name in ("image_size", "channels"):
        if getattr(cfg, name) is None:
            raise ConfigError(f"data.{name} is unset; a DataConfig on its own needs image_size "
                              "and channels (a RunConfig fills them in from its unet)")
    if cfg.streaming:
        raise DataError("data.streaming=true streams a data set for training only; this command "
                        "reads it by index: set data.streaming=false (downloads it) or point "
                        "data.name at a local copy")
    if cfg.source == "builtin":  # rendered in vectorised ops: faster than any cache
        return BuiltinShapes(cfg.builtin_size, cfg.image_size, cfg.channels, seed=0)
    channels = cfg.channels  # of an item: a paired item stacks the target and its input
    if cfg.task == "paired":
        assert cfg.path is not None and cfg.cond_path is not None  # DataConfig requires them
        base: Dataset = PairedFolders(cfg.path, cfg.cond_path, cfg.image_size, cfg.channels)
        channels *= 2
    elif cfg.source == "folder":
        assert cfg.path is not None  # DataConfig requires it for source='folder'
        base = FolderImages(cfg.path, cfg.image_size, cfg.channels, cfg.class_folders)
    elif cfg.source == "torchvision":
        base = _build_torchvision(cfg)
    elif cfg.source == "hf":
        base = HFImages(_load_hf(cfg), cfg.image_size, cfg.channels, cfg.image_column,
                        cfg.label_column, name=hf_name(cfg))
    else:  # pragma: no cover - DataConfig rejects it first
        raise DataError(f"data.source: unknown source {cfg.source!r}; use builtin, folder, "
                        "torchvision or hf")
    size = len(base) * channels * cfg.image_size ** 2  # bytes, as uint8
    if cfg.cache or (cfg.cache is None and size <= CACHE_AUTO_BYTES):
        return DecodedCache(base, cfg.image_size, channels)
    return base


class ImageStats(NamedTuple):
    """What :func:`image_statistics` measured: over ``images`` images, the ``mean`` and
    (population) ``std`` of each channel's values; ``std_all``, the std of every value of every
    channel (for [-1, 1] images: EDM's sigma_data, the data's std in its preconditioning,
    Karras et al. 2022, Table 1), and ``rms_all``, their root mean square, sqrt(std_all^2 +
    mean^2): the scale the preconditioning's c_skip = s^2 / (sigma^2 + s^2) is optimal for when
    the data is not centred (it shrinks x towards 0, not towards the data's mean), which equals
    ``std_all`` only for zero-mean data."""

    images: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    std_all: float
    rms_all: float


def spread_indices(n: int, k: int | None) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (``i n // k`` for i < k), all of them when
    ``k`` is None or at least ``n``: a fixed sample that reaches every part of a data set (an
    image folder is sorted by path, so its first images are often one class)."""
    if k is None or k >= n:
        return list(range(n))
    return [i * n // k for i in range(k)]


def image_statistics(dataset: Dataset, indices: Sequence[int] | None = None,
                     batch_size: int = 64) -> ImageStats:
    """Per-channel mean and std, and the std over all channels, of the images of ``dataset``
    (items ``(image (C, H, W), ...)``) at ``indices`` (every item when None), in float64.

    Batches are merged with Chan et al.'s pairwise update (one pass, exact where
    E[x^2] - E[x]^2 would cancel); every channel has as many values, so the overall variance is
    the mean of the channel variances plus the variance of the channel means. A data set with
    ``__getitems__`` (the built-in shapes) gives each batch in one call."""
    picked = list(range(len(dataset))) if indices is None else list(indices)  # type: ignore[arg-type]
    if not picked:
        raise DataError("image_statistics: no images to measure; give at least one")
    count = 0
    mean: Tensor | None = None
    m2: Tensor | None = None
    batch_of = getattr(dataset, "__getitems__", None)
    for start in range(0, len(picked), batch_size):
        chunk = picked[start:start + batch_size]
        items = batch_of(chunk) if batch_of is not None else [dataset[i] for i in chunk]
        x = torch.stack([item[0] for item in items])
        x = x.to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)  # (C, values)
        nb = x.shape[1]
        mb = x.mean(dim=1)
        m2b = ((x - mb[:, None]) ** 2).sum(dim=1)
        if mean is None or m2 is None:
            mean, m2 = mb, m2b
        else:
            delta = mb - mean
            total = count + nb
            mean = mean + delta * (nb / total)
            m2 = m2 + m2b + delta ** 2 * (count * nb / total)
        count += nb
    assert mean is not None and m2 is not None
    var = m2 / count
    var_all = var.mean() + ((mean - mean.mean()) ** 2).mean()
    return ImageStats(len(picked), tuple(float(v) for v in mean),
                      tuple(float(v) for v in var.sqrt()), float(var_all.sqrt()),
                      float((var_all + mean.mean() ** 2).sqrt()))


def _shared_memory_room() -> int:
    """Free bytes of /dev/shm, where PyTorch puts shared tensors on Linux (0 if unknown)."""
    try:
        st = os.statvfs("/dev/shm")
    except (OSError, AttributeError):
        return 0
    return st.f_bavail * st.f_frsize


CACHE_AUTO_BYTES = 4 << 30
"""``data.cache`` unset: decoded images are cached when they take at most this much memory."""


class DecodedCache(Dataset):
    """An image data set whose items are decoded and resized once, then kept as uint8.

    Items are a pure function of their index, so a cached item is exactly the item: every image
    whose values lie on the 256-level grid (``v / 127.5 - 1``, all 8-bit sources) is stored as
    its uint8 levels and given back bit for bit; one that does not (16-bit or float images) is
    decoded again each time. The cache fills as the items are first read, in shared memory so
    that DataLoader worker processes fill and read one copy (where shared memory is too small,
    e.g. a container's /dev/shm, each process keeps its own). The wrapped set's attributes
    (``num_classes``, ``skipped``, ...) are this set's.
    """

    def __init__(self, base: Dataset, image_size: int, channels: int) -> None:
        self.base = base
        n = len(base)  # type: ignore[arg-type]
        size = n * channels * image_size ** 2
        try:
            self.pixels = torch.empty((n, channels, image_size, image_size), dtype=torch.uint8)
        except RuntimeError:  # the allocator said no: say what it would take
            raise DataError(f"data.cache: the {n} decoded images would take "
                            f"{size / 2**30:.1f} GiB; set data.cache=false") from None
        self.labels = torch.zeros(n, dtype=torch.int64)
        self.state = torch.zeros(n, dtype=torch.uint8)  # 0 new, 1 cached, 2 not cacheable
        # Shared (before the workers fork) only where the shared-memory file system has room:
        # pages of a shared tensor beyond it would kill the process (SIGBUS) when first written.
        if _shared_memory_room() > 2 * size:
            try:
                for t in (self.pixels, self.labels, self.state):
                    t.share_memory_()
            except RuntimeError:  # per-process caches, then
                pass

    def __getattr__(self, name: str) -> Any:
        if name == "base":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        state = int(self.state[index])
        if state == 1:
            return self.pixels[index].to(torch.float32) / 127.5 - 1.0, int(self.labels[index])
        image, label = self.base[index]
        if state == 0:
            levels = ((image + 1.0) * 127.5).round()
            if torch.equal(levels / 127.5 - 1.0, image):  # on the grid: exact as uint8
                self.pixels[index] = levels.to(torch.uint8)
                self.labels[index] = label
                self.state[index] = 1
            else:
                self.state[index] = 2
        return image, label


# ---------------------------------------------------------------------------------------------
# Augmentation and batching.


def flip_where(x: Tensor, flip: Tensor, dim: int = -1) -> Tensor:
    """Mirror the items of a batch ``x`` (B, ...) along ``dim`` where ``flip`` (B,) bool is True;
    returns the same shape. ``flip`` may live on another device than ``x``.

    The coins are drawn by the trainers for the *global* batch from their explicit generator and
    sliced to a process's share (``(torch.rand(B, generator=g) < 0.5)[mine]``), so the flips do
    not depend on the number of processes and a resumed run draws the same ones.
    """
    if flip.ndim != 1 or flip.shape[0] != x.shape[0]:
        raise ValueError(f"flip must be (B,) for x of shape {tuple(x.shape)}, got "
                         f"{tuple(flip.shape)}")
    mask = flip.to(x.device).view(-1, *([1] * (x.ndim - 1)))
    return torch.where(mask, x.flip(dim), x)


class GlobalBatchSampler(Sampler[list[int]]):
    """An endless stream of index batches, one per training step, independent of world size.

    The data order is epoch 0's permutation, then epoch 1's, ... (epoch ``e`` shuffled by a
    generator seeded from ``(seed, e)``). Global step ``s`` is positions ``[s*B, (s+1)*B)`` of that
    stream, running across epoch boundaries without a seam, and process ``rank`` gets the
    ``rank``-th contiguous ``B // world_size`` of them. Starting at ``start_step`` computes the
    batches arithmetically, so nothing before it is loaded.
    """

    def __init__(self, num_items: int, global_batch_size: int, *, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if num_items < 1:
            raise DataError("the data set is empty; give it at least one image")
        if global_batch_size < 1:
            raise ConfigError(f"train.batch_size: must be a positive integer, "
                              f"got {global_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if global_batch_size % world_size:
            raise ConfigError(f"train.batch_size: {global_batch_size} is not divisible by the "
                              f"{world_size} processes; use a multiple of {world_size}")
        if start_step < 0:
            raise ValueError(f"start_step must be 0 or more, got {start_step}")
        self.num_items = num_items
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self._perms: dict[int, Tensor] = {}

    def epoch_permutation(self, epoch: int) -> Tensor:
        """The order of epoch ``epoch``: a permutation of range(num_items), int64 (N,)."""
        perm = self._perms.get(epoch)
        if perm is None:
            gen = torch.Generator().manual_seed(seed_for(_TAG_EPOCH, self.seed, epoch))
            perm = torch.randperm(self.num_items, generator=gen)
            if len(self._perms) >= 2:  # a batch spans at most a few epochs; keep memory flat
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def batch_at(self, step: int) -> list[int]:
        """This process's indices for global step ``step``."""
        start = step * self.global_batch_size + self.rank * self.local_batch_size
        stop = start + self.local_batch_size
        out: list[int] = []
        pos = start
        while pos < stop:  # loops more than once only where the slice crosses an epoch boundary
            epoch, offset = divmod(pos, self.num_items)
            take = min(stop - pos, self.num_items - offset)
            out.extend(self.epoch_permutation(epoch)[offset:offset + take].tolist())
            pos += take
        return out

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.batch_at(step)
            step += 1


def _worker_init(worker_id: int) -> None:
    # One intra-op thread per worker: each worker renders or decodes a whole batch on its own,
    # and several workers each starting a thread per core would oversubscribe the CPU. Nothing
    # is seeded: data sets are deterministic and flips are drawn in the training process.
    torch.set_num_threads(1)


class _Failure:
    """A batch that a worker process could not load: the :class:`DiffunetError`'s type name and
    its one-line message (torch would raise it again in the main process with the worker's whole
    traceback inside the message)."""

    def __init__(self, error: DiffunetError) -> None:
        self.kind, self.message = type(error).__name__, str(error)

    def raise_again(self) -> None:
        cls = getattr(errors, self.kind, None)
        if not (isinstance(cls, type) and issubclass(cls, DiffunetError)):
            cls = DataError
        raise cls(self.message)


class _Reporting(Dataset):
    """``base`` for a worker process: a batch whose loading raises a :class:`DiffunetError`
    (an unreadable file, a hostile item) comes back as a :class:`_Failure`."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.base[index]

    def __getitems__(self, indices: Sequence[int]) -> Any:
        try:
            many = getattr(self.base, "__getitems__", None)  # what torch's fetcher would use
            return many(indices) if many else [self.base[i] for i in indices]
        except DiffunetError as e:
            return _Failure(e)


class _Collate:
    """``collate`` for batches that loaded; a :class:`_Failure` passes through (a class, not a
    lambda: a loader that spawns its workers pickles it)."""

    def __init__(self, collate: Callable[[Any], Any]) -> None:
        self.collate = collate

    def __call__(self, batch: Any) -> Any:
        return batch if isinstance(batch, _Failure) else self.collate(batch)


class Loader(DataLoader):
    """A ``DataLoader`` whose worker processes report a :class:`DiffunetError` as its one-line
    self: the same error raised in the main process, not torch's "Caught DataError in
    DataLoader worker process 0" with the worker's traceback inside the message. Every loader
    of user data is one of these (a damaged image is one line with or without workers)."""

    def __init__(self, dataset: Dataset, *args: Any, num_workers: int = 0,
                 collate_fn: Callable[[Any], Any] | None = None, **kwargs: Any) -> None:
        if num_workers > 0:
            from torch.utils.data import default_collate
            dataset = _Reporting(dataset)
            collate_fn = _Collate(collate_fn or default_collate)
        super().__init__(dataset, *args, num_workers=num_workers, collate_fn=collate_fn,
                         **kwargs)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            if isinstance(batch, _Failure):
                batch.raise_again()
            yield batch


def make_dataloader(dataset: Dataset, batch_sampler: Sampler[list[int]], num_workers: int = 0,
                    pin_memory: bool = False) -> DataLoader:
    """A :class:`Loader` yielding ``(images (b, C, S, S), labels (b,) int64)`` per sampler
    batch.

    Workers persist across the (endless) iteration and keep 4 batches each in flight.
    """
    workers = num_workers > 0
    return Loader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        # pinning needs an accelerator; without one torch only warns, so skip it quietly
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=workers,
        prefetch_factor=4 if workers else None,
        worker_init_fn=_worker_init if workers else None,
        # The loader draws its workers' base seed from this generator; a private one keeps it
        # from consuming the global RNG (house rule 3).
        generator=torch.Generator().manual_seed(0),
    )
