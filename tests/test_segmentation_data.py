"""Segmentation data: built-in shapes with masks, paired folders, joint flips, statistics and
mask files (CPU, no network, small images)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from diffunet.data import BuiltinShapes
from diffunet.errors import DataError
from diffunet.images import IGNORE_INDEX, class_palette, normalize, overlay, save_mask, to_uint8
from diffunet.segmentation.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BuiltinSegShapes,
    PairedFolders,
    ShapeSpec,
    class_pixel_counts,
    compute_mean_std,
    default_mean_std,
    joint_flip,
    split_indices,
)
from diffunet.segmentation.data import _signed_distance

# ---------------------------------------------------------------------------------------------
# Built-in shapes


def test_builtin_is_a_pure_function_of_seed_and_index() -> None:
    a = BuiltinSegShapes(50, 32, 3, seed=0)
    b = BuiltinSegShapes(50, 32, 3, seed=0)
    x0, m0 = a[7]
    x1, m1 = b[7]
    assert torch.equal(x0, x1) and torch.equal(m0, m1)
    assert not torch.equal(a[7][0], a[8][0])
    assert not torch.equal(a[7][0], BuiltinSegShapes(50, 32, 3, seed=1)[7][0])


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [32, 64])
def test_builtin_shapes_dtypes_and_ranges(channels: int, size: int) -> None:
    ds = BuiltinSegShapes(20, size, channels)
    assert len(ds) == 20 and ds.num_classes == 4 and ds.skipped == []
    assert ds.class_names == ("background", "circle", "square", "triangle")
    for i in range(5):
        x, m = ds[i]
        assert x.shape == (channels, size, size) and x.dtype == torch.float32
        assert m.shape == (size, size) and m.dtype == torch.int64
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert set(m.unique().tolist()) <= {0, 1, 2, 3}
        assert (m == 0).any() and (m > 0).any()
    with pytest.raises(IndexError):
        ds[20]
    with pytest.raises(ValueError):
        BuiltinSegShapes(10, 64, channels=2)


def test_builtin_every_class_appears() -> None:
    ds = BuiltinSegShapes(12, 32, 3)
    seen = set()
    for i in range(12):
        seen |= set(ds[i][1].unique().tolist())
    assert seen == {0, 1, 2, 3}


def _inside(spec: ShapeSpec, x: np.ndarray, y: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """An independent rasterisation of a shape (float64), its size times ``scale``."""
    h = spec.half * scale
    dx, dy = x - spec.cx, y - spec.cy
    if spec.label == 1:  # circle of radius h
        return dx * dx + dy * dy < h * h
    if spec.label == 2:  # square of half-side 0.85 h
        return np.maximum(np.abs(dx), np.abs(dy)) < 0.85 * h
    # triangle, apex up, side 2h, its bounding box centred on (cx, cy): three half-planes
    height = math.sqrt(3.0) * h
    verts = [(0.0, -height / 2), (h, height / 2), (-h, height / 2)]  # clockwise on screen
    inside = np.ones(np.broadcast(dx, dy).shape, dtype=bool)
    for (ax, ay), (bx, by) in zip(verts, verts[1:] + verts[:1]):
        inside &= (bx - ax) * (dy - ay) - (by - ay) * (dx - ax) > 0
    return inside


@pytest.mark.parametrize("channels", [1, 3])
def test_builtin_mask_is_the_geometry_and_aligned_with_the_image(channels: int) -> None:
    s = 48
    ds = BuiltinSegShapes(10, s, channels, seed=3)
    c = (np.arange(s) + 0.5) / s
    x, y = c[None, :], c[:, None]
    for i in range(10):
        image, mask = ds[i]
        specs = ds.shapes(i)
        assert 1 <= len(specs) <= 3
        top = np.full((s, s), -1)
        unsure = np.zeros((s, s), dtype=bool)  # pixel centres within 1e-4 of an edge
        for k, spec in enumerate(specs):
            assert 0.15 - 1e-9 <= 2 * spec.half <= 0.40 + 1e-9 and len(spec.colour) == channels
            top[_inside(spec, x, y)] = k
            unsure |= _inside(spec, x, y, 1.0001) != _inside(spec, x, y, 0.9999)
        labels = np.array([0] + [sp.label for sp in specs])[top + 1]
        sure = ~unsure
        assert np.array_equal(mask.numpy()[sure], labels[sure])
        # Away from every edge (a pixel's distance to each shape's edge above ~1 pixel; scaling
        # about the centre moves an edge by at least inradius * (scale - 1) >= 0.5 h (scale - 1))
        # the image is the top shape's colour, plus noise of std 0.04.
        near = np.zeros((s, s), dtype=bool)
        for spec in specs:
            d = 2.0 / (s * spec.half)
            near |= _inside(spec, x, y, 1 + d) != _inside(spec, x, y, 1 - d)
        for k, spec in enumerate(specs):
            region = ~near & (top == k)
            if region.any():
                colour = torch.tensor(spec.colour, dtype=torch.float32).view(-1, 1)
                pixels = image.reshape(channels, -1)[:, torch.from_numpy(region.ravel())]
                dev = (pixels - colour).abs()
                assert dev.max() < 0.2  # 5 sigma
                assert dev.shape[1] < 20 or dev.mean() < 0.05  # E|N(0, 0.04)| = 0.032


def test_builtin_geometry_is_data_builtin_shapes_geometry() -> None:
    # seg_data's numpy distance is a twin of data.BuiltinShapes._distance (torch): same shapes
    c = (np.arange(32, dtype=np.float32) + 0.5) / 32
    dx, dy, h = c[None, :] - 0.4, c[:, None] - 0.55, 0.13
    for label in (1, 2, 3):
        ours = _signed_distance(label, dx, dy, h)
        theirs = BuiltinShapes._distance(label - 1, torch.from_numpy(dx), torch.from_numpy(dy), h)
        assert np.allclose(ours, theirs.numpy(), atol=1e-6)


def test_builtin_shape_colours_contrast_with_the_background() -> None:
    ds = BuiltinSegShapes(30, 32, 3, seed=0)
    gaps = []
    for i in range(30):
        image, mask = ds[i]
        bg = image[:, mask == 0].mean(dim=1)  # the gradient's average colour
        for spec in ds.shapes(i):
            gaps.append(float((torch.tensor(spec.colour) - bg).norm()))
    assert np.median(gaps) > 0.4 and min(gaps) > 0.15


# ---------------------------------------------------------------------------------------------
# Paired folders


def _save(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr)
    if mode == "P":
        img = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.astype(np.uint8).tobytes())
        img.putpalette([v for c in class_palette(256) for v in c])
    elif mode is not None:
        img = img.convert(mode)
    img.save(path)


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_paired_matching_by_relative_path_and_unique_stem(tmp_path: Path) -> None:
    imgs, masks = tmp_path / "images", tmp_path / "masks"
    m = np.zeros((12, 12), dtype=np.uint8)
    _save(imgs / "a" / "x.jpg", _rgb(12, 12))
    _save(masks / "a" / "x.png", m)           # same relative path, other extension
    _save(imgs / "b" / "y.png", _rgb(12, 12))
    _save(masks / "y.png", m + 1)              # bare stem, unique on both sides
    _save(imgs / "c" / "z.png", _rgb(12, 12))  # no mask
    _save(imgs / "d" / "z.png", _rgb(12, 12))
    _save(masks / "other" / "z.png", m)        # stem z is not unique among images: no match
    _save(masks / "w.png", m)                  # no image
    (imgs / "broken.png").write_bytes(b"not an image")
    ds = PairedFolders(imgs, masks, image_size=8, channels=3, num_classes=2)
    assert [(p.relative_to(imgs).as_posix(), q.relative_to(masks).as_posix())
            for p, q in ds.pairs] == [("a/x.jpg", "a/x.png"), ("b/y.png", "y.png")]
    assert sorted(Path(p).relative_to(imgs).as_posix() for p in ds.unmatched_images) == \
        ["c/z.png", "d/z.png"]
    assert sorted(Path(p).relative_to(masks).as_posix() for p in ds.unmatched_masks) == \
        ["other/z.png", "w.png"]
    assert ds.skipped == [str(imgs / "broken.png")]
    assert ds.class_names == ("background", "class_1") and ds.num_classes == 2
    x, y = ds[1]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    assert y.shape == (8, 8) and y.dtype == torch.int64 and torch.all(y == 1)


def test_paired_image_is_in_unit_range_exactly(tmp_path: Path) -> None:
    arr = _rgb(8, 8)
    _save(tmp_path / "i" / "a.png", arr)
    _save(tmp_path / "m" / "a.png", np.zeros((8, 8), np.uint8))
    x, _ = PairedFolders(tmp_path / "i", tmp_path / "m", 8, 3, 2)[0]
    assert torch.allclose(x, torch.from_numpy(arr).permute(2, 0, 1).float() / 255, atol=1e-6)
    g, _ = PairedFolders(tmp_path / "i", tmp_path / "m", 8, 1, 2)[0]
    assert g.shape == (1, 8, 8)


@pytest.mark.parametrize("mode,k,values,expected", [
    ("P", 4, [0, 1, 2, 3, 255], [0, 1, 2, 3, 255]),  # palette indices, 255 = ignore
    ("L", 4, [0, 1, 2, 3, 255], [0, 1, 2, 3, 255]),  # grey values
    ("L", 2, [0, 255], [0, 1]),                      # binary 0/255 mask -> 0/1
    ("L", 2, [0, 1, 255], [0, 1, 255]),              # 0/1 labels with void
    ("P", 2, [0, 255], [0, 255]),                    # palette index 255 stays ignore
    ("1", 2, [0, 255], [0, 1]),                      # bilevel
    ("I;16", 3, [0, 2, 255], [0, 2, 255]),           # 16-bit PNG
])
def test_paired_mask_modes(tmp_path: Path, mode: str, k: int, values: list[int],
                           expected: list[int]) -> None:
    labels = np.array(values)[np.arange(100).reshape(10, 10) % len(values)]
    arr = labels.astype(np.uint16 if mode == "I;16" else np.uint8)
    _save(tmp_path / "m" / "a.png", arr, None if mode == "I;16" else mode)
    _save(tmp_path / "i" / "a.png", _rgb(10, 10))
    with Image.open(tmp_path / "m" / "a.png") as im:
        assert im.mode.startswith("I") if mode == "I;16" else im.mode == mode
    ds = PairedFolders(tmp_path / "i", tmp_path / "m", 10, 3, k)
    want = np.array(expected)[np.arange(100).reshape(10, 10) % len(values)]
    assert np.array_equal(ds[0][1].numpy(), want)


def test_paired_resize_is_aligned_and_keeps_labels(tmp_path: Path) -> None:
    # Vertical stripes of labels 0, 1, 255 under a band of 2; the image's grey is a function of
    # the label. Landscape PNG: cropped left and right. Portrait JPEG: cropped top and bottom,
    # and decoded at 1/8 size (data._open_image's draft, 300 not a multiple of 8), which the
    # mask's crop box must follow.
    grey = {0: 0, 1: 80, 2: 160, 255: 240}
    for name, (w, h), ext in [("small", (40, 30), "png"), ("big", (300, 400), "jpg")]:
        lab = np.array([0, 1, 255])[np.arange(w) * 3 // w][None, :].repeat(h, 0)
        lab[: h // 3] = 2
        _save(tmp_path / name / "i" / f"a.{ext}", np.vectorize(grey.get)(lab).astype(np.uint8))
        _save(tmp_path / name / "m" / "a.png", lab.astype(np.uint8))
        ds = PairedFolders(tmp_path / name / "i", tmp_path / name / "m", 16, 1, 3)
        x, m = ds[0]
        mm = m.numpy()
        assert set(mm.ravel().tolist()) == {0, 1, 2, 255}
        # Where the 5x5 neighbourhood has one label (the bicubic kernel's reach), the image is
        # that label's grey: image and mask were cropped and scaled alike.
        pad = np.pad(mm, 2, mode="edge")
        uniform = np.ones_like(mm, dtype=bool)
        for dy in range(5):
            for dx in range(5):
                uniform &= pad[dy:dy + 16, dx:dx + 16] == mm
        expect = np.vectorize(grey.get)(mm) / 255.0
        err = np.abs(x[0].numpy() - expect)[uniform]
        assert uniform.sum() > 20 and err.max() < 0.05, (name, uniform.sum(), err.max())
        # and the label boundaries are where the geometry puts them (nearest, same box)
        side = min(w, h)
        centres = (np.arange(16) + 0.5) * side / 16
        cols = np.floor((w - side) / 2 + centres).astype(int)
        rows = np.floor((h - side) / 2 + centres).astype(int)
        if ext == "png":
            assert np.array_equal(mm, lab[rows[:, None], cols[None, :]])


def test_paired_rgb_mask_is_an_error(tmp_path: Path) -> None:
    _save(tmp_path / "i" / "a.png", _rgb(8, 8))
    _save(tmp_path / "m" / "a.png", _rgb(8, 8))
    with pytest.raises(DataError, match=r"grayscale or palette.*got RGB.*a\.png; convert"):
        PairedFolders(tmp_path / "i", tmp_path / "m", 8, 3, 2)


def test_paired_out_of_range_label_is_an_error(tmp_path: Path) -> None:
    _save(tmp_path / "i" / "a.png", _rgb(8, 8))
    lab = np.zeros((8, 8), np.uint8)
    lab[0, :3] = [1, 7, 255]
    _save(tmp_path / "m" / "a.png", lab)
    ds = PairedFolders(tmp_path / "i", tmp_path / "m", 8, 3, 3)
    with pytest.raises(DataError, match=r"a\.png has values \{0, 1, 7, 255\}.*num_classes is 3"):
        ds[0]
    # 0/255 is only read as binary when there are two classes; with three, 255 is ignore
    lab2 = np.where(lab > 0, 255, 0).astype(np.uint8)
    _save(tmp_path / "m" / "a.png", lab2)
    assert set(PairedFolders(tmp_path / "i", tmp_path / "m", 8, 3, 3)[0][1].unique().tolist()) \
        == {0, 255}


def test_paired_matching_with_a_mask_suffix(tmp_path: Path) -> None:
    imgs, masks = tmp_path / "images", tmp_path / "masks"
    m = np.zeros((12, 12), dtype=np.uint8)
    _save(imgs / "a" / "x.jpg", _rgb(12, 12))
    _save(masks / "a" / "x_mask.png", m)        # x_mask is x's mask
    _save(imgs / "y.png", _rgb(12, 12))
    _save(masks / "y.png", m)                   # an exact name wins over a suffixed one
    _save(masks / "y_label.png", m + 1)
    _save(imgs / "b" / "z.png", _rgb(12, 12))
    _save(masks / "c" / "z_gt.png", m)          # suffixed and unique stem, other folder
    ds = PairedFolders(imgs, masks, image_size=8, channels=3, num_classes=2)
    assert sorted((p.relative_to(imgs).as_posix(), q.relative_to(masks).as_posix())
                  for p, q in ds.pairs) == [("a/x.jpg", "a/x_mask.png"),
                                            ("b/z.png", "c/z_gt.png"), ("y.png", "y.png")]
    assert [Path(p).name for p in ds.unmatched_masks] == ["y_label.png"]


def test_jpeg_masks_get_a_save_as_png_hint(tmp_path: Path) -> None:
    m = np.zeros((16, 16), np.uint8)
    m[4:12, 4:12] = 255
    _save(tmp_path / "i" / "a.png", _rgb(16, 16))
    (tmp_path / "m").mkdir()
    Image.fromarray(m).save(tmp_path / "m" / "a.jpg", quality=50)
    ds = PairedFolders(tmp_path / "i", tmp_path / "m", 8, 3, 2)
    with pytest.raises(DataError, match="save masks as PNG"):
        ds[0]


def test_paired_size_mismatch_is_an_error(tmp_path: Path) -> None:
    _save(tmp_path / "i" / "a.png", _rgb(20, 16))
    _save(tmp_path / "m" / "a.png", np.zeros((18, 16), np.uint8))
    with pytest.raises(DataError, match=r"a\.png is 16x20 but its mask .*a\.png is 16x18"):
        PairedFolders(tmp_path / "i", tmp_path / "m", 8, 3, 2)


def test_paired_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    with pytest.raises(DataError, match="found images 0 in"):
        PairedFolders(tmp_path / "i", tmp_path / "m", 8, 3, 2)
    _save(tmp_path / "i" / "a.png", _rgb(8, 8))
    _save(tmp_path / "m" / "b.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"no image has a mask: found images 1 .*\(e\.g\. a\.png\)"
                                        r" and masks 1 .*relative path"):
        PairedFolders(tmp_path / "i", tmp_path / "m", 8, 3, 2)
    with pytest.raises(DataError, match="does not exist"):
        PairedFolders(tmp_path / "nope", tmp_path / "m", 8, 3, 2)
    with pytest.raises(DataError, match="own folder"):
        PairedFolders(tmp_path / "i", tmp_path / "i", 8, 3, 2)
    with pytest.raises(DataError, match="class_names"):
        PairedFolders(tmp_path / "i", tmp_path / "m", 8, 3, 3, class_names=("bg", "a"))
    with pytest.raises(DataError, match="num_classes"):
        PairedFolders(tmp_path / "i", tmp_path / "m", 8, 3, 1)


def test_paired_masks_folder_inside_images_folder(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _rgb(8, 8))
    _save(tmp_path / "masks" / "a.png", np.ones((8, 8), np.uint8))
    ds = PairedFolders(tmp_path, tmp_path / "masks", 8, 3, 2, class_names=["bg", "fg"])
    assert len(ds) == 1 and ds.unmatched_images == [] and ds.class_names == ("bg", "fg")


# ---------------------------------------------------------------------------------------------
# Splits, flips, normalisation, statistics


def test_split_indices() -> None:
    tr, va = split_indices(100, 0.2, seed=0)
    assert (tr, va) == split_indices(100, 0.2, seed=0)
    assert len(va) == 20 and not set(tr) & set(va) and sorted(tr + va) == list(range(100))
    assert va != split_indices(100, 0.2, seed=1)[1]
    assert split_indices(5, 0.01, 0)[1] != [] and len(split_indices(2, 0.9, 0)[0]) == 1
    assert split_indices(10, 0.0, 0) == (list(range(10)), [])
    assert split_indices(1, 0.5, 0) == ([0], [])
    with pytest.raises(DataError):
        split_indices(10, 1.0, 0)


def test_joint_flip_keeps_alignment_and_is_reproducible() -> None:
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 5, (16, 6, 7), generator=g)
    images = torch.stack([masks.float(), torch.rand(16, 6, 7, generator=g)], dim=1)
    coins = torch.rand(2, 16, generator=torch.Generator().manual_seed(1)) < 0.5
    x, m = joint_flip(images, masks, coins[0], coins[1])
    assert torch.equal(x[:, 0], m.float())  # image and mask flipped together
    for b in range(16):  # exactly the chosen axes, sample by sample
        want = masks[b]
        want = want.flip(-1) if coins[0, b] else want
        want = want.flip(-2) if coins[1, b] else want
        assert torch.equal(m[b], want)
    changed = [not torch.equal(m[b], masks[b]) for b in range(16)]
    assert any(changed) and not all(changed)
    assert torch.equal(x[:, 1][~torch.tensor(changed)], images[:, 1][~torch.tensor(changed)])
    x_only_v, _ = joint_flip(images, masks, None, coins[1])  # None leaves an axis alone
    assert all(torch.equal(x_only_v[b], images[b].flip(-2) if coins[1, b] else images[b])
               for b in range(16))
    with pytest.raises(ValueError):
        joint_flip(images, masks[:, :5], coins[0])


def test_normalize_and_default_mean_std() -> None:
    assert default_mean_std(3) == (IMAGENET_MEAN, IMAGENET_STD)
    (m1,), (s1,) = default_mean_std(1)
    assert abs(m1 - 0.449) < 1e-6 and abs(s1 - 0.226) < 1e-6
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    y = normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    assert y.dtype == torch.float64 and y.shape == x.shape
    assert torch.allclose(y[:, 1], (x[:, 1] - 0.456) / 0.224)
    with pytest.raises(ValueError):
        normalize(x, (0.5,), (0.5,))


class _ListSet(Dataset):
    def __init__(self, items: list, num_classes: int) -> None:
        self.items, self.num_classes = items, num_classes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def test_compute_mean_std_matches_torch() -> None:
    g = torch.Generator().manual_seed(0)
    items = [(torch.rand(3, 5, 6, generator=g) * (k + 1) / 10, torch.zeros(5, 6))
             for k in range(10)]
    mean, std = compute_mean_std(_ListSet(items, 2), max_items=7, batch_size=3)
    x = torch.stack([im for im, _ in items[:7]]).double().transpose(0, 1).reshape(3, -1)
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), x.mean(1), atol=1e-12)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), x.std(1, unbiased=False),
                          atol=1e-12)
    assert len(compute_mean_std(BuiltinSegShapes(4, 16, 1))[0]) == 1


def test_class_pixel_counts() -> None:
    masks = [torch.tensor([[0, 1], [2, 255]]), torch.tensor([[1, 1], [1, 1]]),
             torch.tensor([[2, 2], [0, 255]]), torch.tensor([[1, 0], [0, 0]])]
    ds = _ListSet([(torch.zeros(1, 2, 2), m) for m in masks], 3)
    counts = class_pixel_counts(ds)
    assert counts.dtype == torch.int64 and counts.tolist() == [5, 6, 3]
    assert class_pixel_counts(ds, max_items=2).tolist() == [2, 1, 3]  # items 0 and 2
    assert class_pixel_counts(BuiltinSegShapes(8, 16), max_items=4).sum() == 4 * 16 * 16


# ---------------------------------------------------------------------------------------------
# Masks as images


def test_palette() -> None:
    pal = class_palette(5)
    assert pal[0] == (0, 0, 0) and len(set(pal)) == 5
    assert class_palette(256)[255] == (224, 224, 192)  # VOC's void colour


def test_save_mask_round_trips_through_paired_folders(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 5, (12, 12), generator=g)
    mask[0, :4] = IGNORE_INDEX
    save_mask(mask, tmp_path / "m" / "x.png", 5)
    binary = torch.zeros(12, 12, dtype=torch.int64)
    binary[::2] = IGNORE_INDEX
    save_mask(binary, tmp_path / "m2" / "x.png", 2)
    with Image.open(tmp_path / "m" / "x.png") as im:
        assert im.mode == "P" and im.getpalette()[3:6] == list(class_palette(2)[1])
    _save(tmp_path / "i" / "x.png", _rgb(12, 12))
    assert torch.equal(PairedFolders(tmp_path / "i", tmp_path / "m", 12, 3, 5)[0][1], mask)
    # a palette index 255 stays "ignore" even with two classes (only grey 0/255 is binary)
    assert torch.equal(PairedFolders(tmp_path / "i", tmp_path / "m2", 12, 3, 2)[0][1], binary)
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["x.png"]  # no temporary left
    with pytest.raises(DataError, match=r"\.png"):
        save_mask(mask, tmp_path / "x.jpg", 5)
    with pytest.raises(ValueError):
        save_mask(mask, tmp_path / "y.png", 3)


@pytest.mark.parametrize("channels", [1, 3])
def test_overlay(channels: int) -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(channels, 6, 5, generator=g)
    mask = torch.randint(0, 4, (6, 5), generator=g)
    mask[0, 0], mask[0, 1], mask[0, 2] = 0, IGNORE_INDEX, 1
    out = overlay(image, mask, 4)
    assert out.shape == (6, 5, 3) and out.dtype == torch.uint8
    base = to_uint8(image * 2 - 1).expand(-1, -1, 3)
    keep = (mask == 0) | (mask == IGNORE_INDEX)
    assert torch.equal(out[keep], base[keep])
    assert not torch.equal(out[~keep], base[~keep])
    full = overlay(image, mask, 4, alpha=1.0)
    assert full[0, 2].tolist() == list(class_palette(4)[1])
