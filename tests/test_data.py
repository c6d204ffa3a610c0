"""Data sets, transforms, flips, the global batch sampler and image files (CPU, no network)."""

from __future__ import annotations

import dataclasses
import itertools
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from diffunet.config import DataConfig
from diffunet.errors import DataError
from diffunet.data import (BuiltinShapes, GlobalBatchSampler, build_dataset, flip_where,
                           make_dataloader)
from diffunet.images import load_image, make_grid_image, save_grid, save_image, to_uint8

# ---------------------------------------------------------------------------------------------
# Built-in shapes


def test_builtin_is_a_pure_function_of_the_index() -> None:
    a = BuiltinShapes(100, 32, 3, seed=0)
    b = BuiltinShapes(100, 32, 3, seed=0)
    x0, y0 = a[7]
    x1, y1 = b[7]
    assert torch.equal(x0, x1) and y0 == y1
    assert not torch.equal(a[7][0], a[8][0])
    assert not torch.equal(a[7][0], BuiltinShapes(100, 32, 3, seed=1)[7][0])
    # the DataLoader's batched path renders exactly what single items render
    batch = a.__getitems__([3, 7, 50, 99])
    for k, i in enumerate([3, 7, 50, 99]):
        assert torch.equal(batch[k][0], a[i][0]) and batch[k][1] == a[i][1]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [16, 32, 64])
def test_builtin_shapes_range_and_labels(channels: int, size: int) -> None:
    ds = build_dataset(DataConfig(source="builtin", image_size=size, channels=channels,
                                  builtin_size=200))
    assert isinstance(ds, BuiltinShapes) and len(ds) == 200
    assert ds.num_classes == 4 and ds.class_names == ["circle", "square", "triangle", "cross"]
    images, labels = ds.render(range(64))
    assert images.shape == (64, channels, size, size) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert set(labels.tolist()) == {0, 1, 2, 3}
    x, y = ds[5]
    assert x.shape == (channels, size, size) and isinstance(y, int) and 0 <= y < 4
    # a solid shape on a plain background: the brightest pixel is far above the darkest one,
    # and antialiasing produces intermediate values on the edges
    flat = images.flatten(1)
    assert bool(((flat.max(1).values - flat.min(1).values) > 0.6).all())
    assert bool(((flat > -0.75) & (flat < 0.8)).any(1).all())


def test_builtin_rejects_out_of_range_index() -> None:
    with pytest.raises(IndexError):
        BuiltinShapes(10, 16, 3)[10]


# ---------------------------------------------------------------------------------------------
# Image folders


def _write_text(path: Path, text: str = "not an image\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    Image.fromarray(gray).save(root / "a_gray.png")
    Image.fromarray(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)).save(root / "b_rgb.jpg")
    # fully transparent: composited onto white
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(root / "c_rgba.png")
    Image.new("RGB", (33, 17), (255, 0, 0)).convert("P").save(root / "d_palette.gif")
    Image.fromarray(np.full((24, 24), 65535, dtype=np.uint16)).save(root / "sub" / "e_16bit.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(root / "g_upper.BMP")
    if features.check("webp"):
        Image.new("RGB", (40, 40), (0, 255, 0)).save(root / "sub" / "deeper" / "f.webp",
                                                     lossless=True)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    _write_text(root / "notes.png")
    _write_text(root / "readme.txt")        # not an image extension: ignored, not "skipped"
    _write_text(root / ".hidden.png")       # hidden: ignored
    return root


def test_folder_reads_every_mode_and_skips_unreadable(mixed_folder: Path) -> None:
    ds = build_dataset(DataConfig(channels=3, source="folder", path=str(mixed_folder),
                                  image_size=16))
    names = [p.name for p in ds.files]
    expected = ["a_gray.png", "b_rgb.jpg", "c_rgba.png", "d_palette.gif", "g_upper.BMP",
                "e_16bit.png"] + (["f.webp"] if features.check("webp") else [])
    assert sorted(names) == sorted(expected)
    rel_parts = [p.relative_to(mixed_folder).parts for p in ds.files]
    assert rel_parts == sorted(rel_parts)  # deterministic order
    assert sorted(Path(s).name for s in ds.skipped) == ["corrupt.jpg", "notes.png"]
    assert ds.num_classes is None and ds.class_names is None
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == -1
        assert x.min() >= -1.0 and x.max() <= 1.0
    by_name = {p.name: ds[i][0] for i, p in enumerate(ds.files)}
    assert torch.equal(by_name["c_rgba.png"], torch.ones(3, 16, 16))       # transparent -> white
    assert torch.equal(by_name["e_16bit.png"], torch.ones(3, 16, 16))      # 65535 -> 1, not clipped
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16)
    assert torch.allclose(by_name["d_palette.gif"], red, atol=0.02)
    assert torch.allclose(by_name["g_upper.BMP"][:, 8, 8], torch.tensor([-1.0, -1.0, 1.0]))


def test_folder_grayscale_and_16bit_midtones(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "mid16.png")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    ds = build_dataset(DataConfig(source="folder", path=str(tmp_path), image_size=8, channels=1))
    mid, red = ds[0][0], ds[1][0]
    assert mid.shape == (1, 8, 8) and abs(float(mid.mean())) < 0.01         # half of 16-bit range
    assert torch.allclose(red, torch.full((1, 8, 8), 76 / 127.5 - 1))      # ITU-R 601 luma of red


def test_resize_shorter_side_then_centre_crop(tmp_path: Path) -> None:
    arr = np.zeros((32, 64, 3), dtype=np.uint8)
    arr[:, :16] = (255, 0, 0)
    arr[:, 16:48] = (0, 255, 0)   # the centred 32x32 square
    arr[:, 48:] = (0, 0, 255)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 16, 3)
    assert x.shape == (3, 16, 16)
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1)
    assert torch.allclose(x[:, :, 2:14], green.expand(3, 16, 12), atol=1e-6)
    assert float((x - green).abs().max()) < 0.3  # only a bicubic fringe from the cropped bands


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((20, 40), dtype=np.uint8)
    arr[:, 20:] = 255  # stored: left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(arr).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    x = load_image(tmp_path / "photo.jpg", 20, 1)
    assert x[0, :8].mean() < -0.9 and x[0, 12:].mean() > 0.9  # upright: black above white


def test_load_image_matches_the_folder_data_set(mixed_folder: Path) -> None:
    ds = build_dataset(DataConfig(source="folder", path=str(mixed_folder), image_size=24,
                                  channels=1))
    for i in (0, 1):
        assert torch.equal(load_image(ds.files[i], 24, 1), ds[i][0])
    with pytest.raises(DataError, match="not found"):
        load_image(mixed_folder / "nope.png", 24, 1)
    with pytest.raises(DataError, match="notes.png"):
        load_image(mixed_folder / "notes.png", 24, 1)


def test_damaged_pixel_data_raises_naming_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[:200])  # header intact, pixel data cut off
    ds = build_dataset(DataConfig(channels=3, source="folder", path=str(tmp_path), image_size=8))
    assert len(ds) == 2 and ds.skipped == []  # the scan reads headers only
    ds[0]
    with pytest.raises(DataError, match="truncated.png"):
        ds[1]


def test_class_folders(tmp_path: Path) -> None:
    for rel in ["cat/x.png", "cat/nested/y.png", "dog/z.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 12), (200, 100, 0)).save(tmp_path / rel)
    (tmp_path / "empty").mkdir()
    _write_text(tmp_path / "zebra" / "fake.png")  # unreadable only: no class
    cfg = DataConfig(channels=3, source="folder", path=str(tmp_path), image_size=8,
                     class_folders=True)
    ds = build_dataset(cfg)
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert [(p.relative_to(tmp_path).as_posix(), ds[i][1]) for i, p in enumerate(ds.files)] == [
        ("cat/nested/y.png", 0), ("cat/x.png", 0), ("dog/z.jpg", 1)]
    assert [Path(s).name for s in ds.skipped] == ["fake.png"]
    Image.new("RGB", (10, 12)).save(tmp_path / "loose.png")
    with pytest.raises(DataError, match="loose.png.*class_folders=false"):
        build_dataset(cfg)


def test_folder_errors(tmp_path: Path) -> None:
    def build(path: Path) -> object:
        return build_dataset(DataConfig(channels=3, image_size=32, source="folder", path=str(path)))

    with pytest.raises(DataError, match="does not exist"):
        build(tmp_path / "missing")
    _write_text(tmp_path / "file.png")
    with pytest.raises(DataError, match="is a file"):
        build(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        build(tmp_path / "empty")
    _write_text(tmp_path / "bad" / "a.png")
    (tmp_path / "bad" / "b.jpg").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match="no readable image under .*: 2 file"):
        build(tmp_path / "bad")


# ---------------------------------------------------------------------------------------------
# torchvision data sets, from small fake files in each data set's own on-disk format


def _write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's IDX format: big-endian magic (0, 0, type 0x08 = ubyte, ndim), dims, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root: Path, folder: str, n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    # torchvision 0.29 reads the unzipped raw files ROOT/<Class>/raw/{train,t10k}-*-ubyte and
    # only checks that all four exist (no md5 on the extracted files).
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 10
    raw = root / folder / "raw"
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte", images)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    return images, labels


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("Fashion-MNIST", "FashionMNIST"),
                                         ("fashion_mnist", "FashionMNIST")])
def test_torchvision_mnist_family(tmp_path: Path, name: str, folder: str) -> None:
    images, labels = _fake_mnist(tmp_path, folder)
    cfg = DataConfig(source="torchvision", name=name, path=str(tmp_path), download=False,
                     image_size=28, channels=1)
    ds = build_dataset(cfg)
    assert len(ds) == 12 and ds.num_classes == 10 and len(ds.class_names) == 10
    for i in (0, 5, 11):
        x, y = ds[i]
        assert y == labels[i]
        # 28 -> 28 is no resample at all: exactly v / 127.5 - 1
        assert torch.equal(x, torch.from_numpy(images[i]).float().div(127.5).sub(1).unsqueeze(0))
    rgb = build_dataset(DataConfig(source="torchvision", name=name, path=str(tmp_path),
                                   download=False, image_size=32, channels=3))
    x, _ = rgb[3]
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_torchvision_cifar10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    # torchvision checks each CIFAR file's md5 against the real download; fake files cannot
    # match, so for this test the check only asks that the file exists.
    monkeypatch.setattr(tv_cifar, "check_integrity",
                        lambda fpath, md5=None: Path(fpath).is_file())
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = []
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch"]:
        data = rng.integers(0, 256, (4, 3 * 32 * 32), dtype=np.uint8)  # rows: R plane, G, B
        labels = rng.integers(0, 10, 4).tolist()
        batches.append((data, labels))
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)

    ds = build_dataset(DataConfig(channels=3, image_size=32, source="torchvision",
                                  name="CIFAR-10", path=str(tmp_path),
                                  download=False))
    assert len(ds) == 20 and ds.num_classes == 10 and ds.class_names == names
    x, y = ds[6]  # second training batch, row 2
    data, labels = batches[1]
    assert y == labels[2]
    expected = torch.from_numpy(data[2].reshape(3, 32, 32)).float() / 127.5 - 1
    assert torch.equal(x, expected)


def test_torchvision_missing_and_unknown(tmp_path: Path) -> None:
    cfg = DataConfig(channels=3, image_size=32, source="torchvision", name="cifar10",
                     path=str(tmp_path / "nothing"),
                     download=False)
    with pytest.raises(DataError, match=r"cifar10 is not under .*nothing.*data\.download=true"):
        build_dataset(cfg)
    with pytest.raises(DataError, match="mnist is not under"):
        build_dataset(DataConfig(channels=3, image_size=32, source="torchvision", name="mnist",
                                 path=str(tmp_path),
                                 download=False))
    with pytest.raises(DataError, match=r"did you mean 'cifar10'\?.*known: .*fashion_mnist"):
        build_dataset(DataConfig(channels=3, image_size=32, source="torchvision", name="cifar",
                                 download=False))
    with pytest.raises(DataError, match="did you mean 'mnist'"):
        build_dataset(DataConfig(channels=3, image_size=32, source="torchvision", name="minst",
                                 download=False))


# ---------------------------------------------------------------------------------------------
# Flips


def test_flip_where_mirrors_exactly_the_chosen_items() -> None:
    images = torch.randn(6, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    flip = torch.tensor([True, False, False, True, True, False])
    out = flip_where(images, flip)
    for i in range(6):  # each image is either exactly mirrored left-right or untouched
        assert torch.equal(out[i], images[i].flip(-1) if flip[i] else images[i])
    masks = torch.arange(6 * 4 * 5).reshape(6, 4, 5)  # other ranks and axes too
    top_bottom = flip_where(masks, flip, dim=-2)
    assert torch.equal(top_bottom[0], masks[0].flip(0)) and torch.equal(top_bottom[1], masks[1])
    with pytest.raises(ValueError, match="flip must be"):
        flip_where(images, flip[:5])


def test_flip_coins_for_the_global_batch_do_not_depend_on_the_world_size() -> None:
    # What both trainers do: draw for the global batch, keep this process's rows.
    def coins(rank: int, world: int) -> torch.Tensor:
        per = 8 // world
        return (torch.rand(8, generator=torch.Generator().manual_seed(3)) < 0.5)[
            rank * per:(rank + 1) * per]

    assert torch.equal(torch.cat([coins(0, 2), coins(1, 2)]), coins(0, 1))
    assert torch.equal(torch.cat([coins(r, 4) for r in range(4)]), coins(0, 1))


# ---------------------------------------------------------------------------------------------
# Global batch sampler


def _take(sampler: GlobalBatchSampler, steps: int) -> list[list[int]]:
    return list(itertools.islice(iter(sampler), steps))


def test_sampler_epochs_are_permutations_and_cross_boundaries() -> None:
    n, b = 10, 4
    stream = [i for batch in _take(GlobalBatchSampler(n, b, seed=3), 10) for i in batch]
    assert len(stream) == 40
    for e in range(4):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n:2 * n]  # a fresh order each epoch
    # step 2 covers positions 8..11: the last two of epoch 0 and the first two of epoch 1
    s = GlobalBatchSampler(n, b, seed=3)
    expected = s.epoch_permutation(0)[8:].tolist() + s.epoch_permutation(1)[:2].tolist()
    assert s.batch_at(2) == expected
    # a batch larger than the data set spans several epochs
    big = GlobalBatchSampler(3, 8, seed=0).batch_at(0)
    assert sorted(big[:3]) == [0, 1, 2] and sorted(big[3:6]) == [0, 1, 2]
    assert GlobalBatchSampler(n, b, seed=4).batch_at(0) != s.batch_at(0)


def test_sampler_same_global_batches_for_any_world_size() -> None:
    n, b, steps = 23, 8, 12
    single = _take(GlobalBatchSampler(n, b, seed=5), steps)
    for world in (2, 4):
        ranks = [_take(GlobalBatchSampler(n, b, seed=5, rank=r, world_size=world), steps)
                 for r in range(world)]
        for step in range(steps):
            assert sum((ranks[r][step] for r in range(world)), []) == single[step]
            assert all(len(ranks[r][step]) == b // world for r in range(world))
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchSampler(n, 6, seed=0, world_size=4)


def test_sampler_resume_equals_uninterrupted_tail() -> None:
    n, b = 17, 5
    full = _take(GlobalBatchSampler(n, b, seed=9), 20)
    for start in (1, 3, 7, 13):
        assert _take(GlobalBatchSampler(n, b, seed=9, start_step=start), 20 - start) == full[start:]
        resumed = _take(GlobalBatchSampler(n, b, seed=9, start_step=start, rank=1, world_size=5), 4)
        assert [batch[0] for batch in resumed] == [full[start + k][1] for k in range(4)]


def test_dataloader_batches_builtin(tmp_path: Path) -> None:
    ds = BuiltinShapes(50, 16, 3)
    sampler = GlobalBatchSampler(len(ds), 8, seed=0)
    loader = make_dataloader(ds, sampler, num_workers=0, pin_memory=False)
    images, labels = next(iter(loader))
    expected, expected_labels = ds.render(sampler.batch_at(0))
    assert torch.equal(images, expected) and torch.equal(labels, expected_labels)
    # a worker process renders bit-identical images
    loader = make_dataloader(ds, GlobalBatchSampler(len(ds), 8, seed=0, start_step=3),
                             num_workers=1, pin_memory=False)
    it = iter(loader)
    images, labels = next(it)
    del it, loader
    assert torch.equal(images, ds.render(sampler.batch_at(3))[0])


# ---------------------------------------------------------------------------------------------
# Tensor <-> image files


def test_to_uint8_inverts_the_transform() -> None:
    v = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16)
    x = v.float() / 127.5 - 1
    assert torch.equal(to_uint8(x, channels_last=False), v)
    assert to_uint8(x).shape == (2, 16, 16, 3)
    assert to_uint8(torch.tensor([[[[-5.0, 5.0, float("nan")]]]]), channels_last=False).tolist() \
        == [[[[0, 255, 128]]]]


@pytest.mark.parametrize("channels", [1, 3])
def test_save_image_and_grid_round_trip(tmp_path: Path, channels: int) -> None:
    g = torch.Generator().manual_seed(channels)
    images = (torch.randint(0, 256, (5, channels, 6, 7), generator=g).float() / 127.5 - 1)
    save_image(images[0], tmp_path / "one.png")
    with Image.open(tmp_path / "one.png") as im:
        assert im.mode == ("L" if channels == 1 else "RGB")
        back = torch.from_numpy(np.array(im)).reshape(6, 7, channels).permute(2, 0, 1)
    assert torch.equal(back, to_uint8(images[0], channels_last=False))

    save_grid(images, tmp_path / "out" / "grid.png")  # creates the folder
    with Image.open(tmp_path / "out" / "grid.png") as im:
        grid = np.array(im).reshape(im.size[1], im.size[0], channels)
    # 5 images -> 3 per row, 2 rows, 2px padding between and around
    assert grid.shape[:2] == (2 * (6 + 2) + 2, 3 * (7 + 2) + 2)
    u8 = to_uint8(images).numpy()
    for k in range(5):
        r, q = divmod(k, 3)
        y, x = 2 + r * 8, 2 + q * 9
        assert np.array_equal(grid[y:y + 6, x:x + 7], u8[k])
    assert make_grid_image(images, nrow=5).size == (5 * 9 + 2, 10)
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_save_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "keep.png"
    save_image(torch.zeros(3, 4, 4), target)
    before = target.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_image(torch.ones(3, 4, 4), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.png"]
    with pytest.raises(DataError, match="unknown image extension"):
        save_image(torch.ones(3, 4, 4), tmp_path / "x.notanimage")


# ---------------------------------------------------------------------------------------------
# The decoded cache


def test_the_decoded_cache_gives_exactly_the_items_and_decodes_each_once(tmp_path: Path) -> None:
    from diffunet.data import DecodedCache, FolderImages

    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "mid16.png")
    cfg = DataConfig(channels=3, image_size=8, source="folder", path=str(tmp_path))
    cached = build_dataset(cfg)
    assert isinstance(cached, DecodedCache) and cached.files == cached.base.files
    plain = FolderImages(tmp_path, 8, 3)
    decodes = []
    real = cached.base.__class__.__getitem__
    cached.base.__class__.__getitem__ = lambda self, i: (
        decodes.append(i) if self is cached.base else None) or real(self, i)
    try:
        for _ in range(2):  # two epochs
            for i in range(len(plain)):
                x, y = cached[i]
                assert torch.equal(x, plain[i][0]) and y == plain[i][1]  # bit for bit
    finally:
        cached.base.__class__.__getitem__ = real
    mid = [p.name for p in plain.files].index("mid16.png")
    # 8-bit images are decoded once; the 16-bit mid-tone is off the 256-level grid, so it is
    # never stored (a uint8 copy would not be the same item) and is decoded each time
    assert sorted(decodes) == sorted([*range(len(plain)), mid])
    assert cached.state.tolist() == [2 if i == mid else 1 for i in range(len(plain))]
    assert not isinstance(build_dataset(dataclasses.replace(cfg, cache=False)), DecodedCache)


def test_the_decoded_cache_is_shared_with_loader_workers(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
    ds = build_dataset(DataConfig(channels=3, image_size=8, source="folder",
                                  path=str(tmp_path)))
    if not ds.pixels.is_shared():
        pytest.skip("no shared memory here: each worker keeps its own cache")
    sampler = GlobalBatchSampler(len(ds), 2, seed=0)
    loader = iter(make_dataloader(ds, sampler, num_workers=2))
    first = [next(loader)[0] for _ in range(3)]  # one epoch, decoded by the two workers
    assert ds.state.tolist() == [1] * 6  # ...and filled into this process's cache
    assert torch.equal(torch.cat(first).sort(dim=0).values,
                       torch.stack([ds[i][0] for i in sampler.batch_at(0) + sampler.batch_at(1)
                                    + sampler.batch_at(2)]).sort(dim=0).values)


def test_a_fifo_in_an_image_folder_is_skipped_unopened(tmp_path: Path) -> None:
    import os

    Image.new("RGB", (12, 12), (9, 9, 9)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")  # opening it would block the scan
    ds = build_dataset(DataConfig(channels=3, image_size=8, source="folder",
                                  path=str(tmp_path), cache=False))
    assert [p.name for p in ds.files] == ["a.png"]
    assert [Path(s).name for s in ds.skipped] == ["b.png"]


def test_a_cache_that_cannot_be_allocated_is_one_line(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (12, 12), (9, 9, 9)).save(tmp_path / "a.png")
    real_empty = torch.empty

    def refused(*args, **kwargs):
        if kwargs.get("dtype") is torch.uint8:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", refused)
    with pytest.raises(DataError, match=r"^data\.cache: the 1 decoded images would take .* GiB; "
                                        r"set data\.cache=false$"):
        build_dataset(DataConfig(channels=3, image_size=8, source="folder", path=str(tmp_path),
                                 cache=True))


# ---------------------------------------------------------------------------------------------
# Hostile folders and images (issue 14; the command-line cases are in test_hostile_runs.py)


def test_an_unlistable_sub_folder_is_skipped_and_counted(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from diffunet.data import scan_image_folder

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "locked").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "locked" / "b.png")
    real = os.scandir

    def scandir(path):  # what chmod 0 does to anyone but root
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    files, skipped, _ = scan_image_folder(tmp_path)
    assert files == [Path("a.png")] and skipped == [str(tmp_path / "locked")]


def test_links_are_followed_once_and_never_out_of_the_folder(tmp_path: Path) -> None:
    from diffunet.data import scan_image_folder

    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "x.png")
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "sub" / "b.png")
    for name, target in (("up", ".."), ("self", "."), ("again", "sub"), ("out", str(outside))):
        (root / name).symlink_to(target)
    files, skipped, _ = scan_image_folder(root)
    assert files == [Path("again/b.png")] and skipped == []  # "again" sorts first


def test_images_over_the_pixel_limit_are_refused_from_the_header(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    from diffunet.data import scan_image_folder
    from diffunet.errors import UsageError
    from diffunet.images import open_image

    Image.new("L", (100, 50)).save(tmp_path / "a.png")
    Image.new("L", (10, 10)).save(tmp_path / "b.png")
    monkeypatch.setenv("DIFFUNET_MAX_IMAGE_PIXELS", "4999")
    with pytest.raises(DataError, match=r"100x50 = 5,000 pixels, more than the 4,999 .*"
                                        r"DIFFUNET_MAX_IMAGE_PIXELS=5000$"):
        open_image(tmp_path / "a.png", None)
    files, skipped, _ = scan_image_folder(tmp_path)
    assert files == [Path("b.png")] and skipped == [str(tmp_path / "a.png")]
    monkeypatch.setenv("DIFFUNET_MAX_IMAGE_PIXELS", "5000")
    assert open_image(tmp_path / "a.png", None).size == (100, 50)
    monkeypatch.setenv("DIFFUNET_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(UsageError, match="DIFFUNET_MAX_IMAGE_PIXELS='lots' is not a positive"):
        scan_image_folder(tmp_path)
    # PIL's own bomb check (a warning above ~89M pixels) is replaced by ours, and put back
    monkeypatch.setenv("DIFFUNET_MAX_IMAGE_PIXELS", "200000000")
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert open_image(tmp_path / "a.png", None).size == (100, 50)
    finally:
        assert Image.MAX_IMAGE_PIXELS == 1000
        Image.MAX_IMAGE_PIXELS = before


@pytest.fixture
def no_blocking() -> Iterator[None]:
    """Fail (instead of hanging) if a read blocks: SIGALRM interrupts the blocked open()."""
    import signal

    def hung(signum: int, frame: object) -> None:
        raise AssertionError("a read of user data blocked")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("swap", ["fifo", "device", "folder"])
def test_an_image_swapped_after_the_scan_is_refused_unread(tmp_path: Path, swap: str,
                                                           no_blocking: None) -> None:
    """Issue 23: a folder image that becomes a FIFO (or a device, or a folder) after the
    start-up scan is refused on the open descriptor, in one line naming it; never read."""
    import os

    from diffunet.data import FolderImages

    for name in ("a.png", "b.png"):
        Image.new("RGB", (12, 12), (9, 9, 9)).save(tmp_path / name)
    ds = FolderImages(tmp_path, 8, 3)
    assert len(ds) == 2
    (tmp_path / "b.png").unlink()
    if swap == "fifo":
        os.mkfifo(tmp_path / "b.png")  # nobody writes: a blocking open() would never return
    elif swap == "device":
        (tmp_path / "b.png").symlink_to("/dev/zero")  # a read would never end
    else:
        (tmp_path / "b.png").mkdir()
    assert ds[0][0].shape == (3, 8, 8)
    with pytest.raises(DataError) as e:
        ds[1]
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "b.png") in msg
    assert "is no longer a regular file" in msg and "when the folder was scanned" in msg


def test_every_image_reader_refuses_a_fifo_or_device(tmp_path: Path, no_blocking: None) -> None:
    """load_image (inspect --image), load_image_full (segment predict), open_image (previews,
    masks) and the folder scan: a FIFO or device is one line, never opened for reading."""
    import os

    from diffunet.data import scan_image_folder
    from diffunet.images import image_header, load_image_full, open_image

    os.mkfifo(tmp_path / "f.png")
    (tmp_path / "z.png").symlink_to("/dev/zero")
    for path in (tmp_path / "f.png", tmp_path / "z.png", Path("/dev/zero")):
        for read in (lambda p: load_image(p, 8, 3), lambda p: load_image_full(p, 3)):
            with pytest.raises(DataError, match=r"is not a regular file \(a FIFO, socket or "
                                                r"device\); give an image file$"):
                read(path)
        with pytest.raises(ValueError, match="not a regular file"):
            open_image(path, None)
        with pytest.raises(ValueError, match="not a regular file"):
            with image_header(path):
                pass
    with pytest.raises(DataError, match="is a folder; give an image file"):
        load_image(tmp_path, 8, 3)
    with pytest.raises(DataError, match="image file not found"):
        load_image(tmp_path / "missing.png", 8, 3)
    files, skipped, _ = scan_image_folder(tmp_path)
    assert files == [] and sorted(Path(s).name for s in skipped) == ["f.png", "z.png"]


def test_a_worker_process_reports_a_bad_image_in_one_line(tmp_path: Path,
                                                          no_blocking: None) -> None:
    """With DataLoader workers (the default on a GPU) an image that cannot be read is the same
    one-line DataError as without, not torch's "Caught DataError in DataLoader worker process"
    with the worker's traceback inside the message."""
    import os

    from diffunet.data import FolderImages

    for name in ("a.png", "b.png"):
        Image.new("RGB", (12, 12), (9, 9, 9)).save(tmp_path / name)
    ds = FolderImages(tmp_path, 8, 3)
    (tmp_path / "b.png").unlink()
    os.mkfifo(tmp_path / "b.png")  # swapped after the scan
    sampler = GlobalBatchSampler(len(ds), 2, seed=0)
    with pytest.raises(DataError) as e:
        next(iter(make_dataloader(ds, sampler, num_workers=1)))
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg and "DataLoader worker" not in msg
    assert msg.startswith(f"{tmp_path / 'b.png'} is no longer a regular file")
    (tmp_path / "b.png").unlink()
    Image.new("RGB", (12, 12), (9, 9, 9)).save(tmp_path / "b.png")
    images, labels = next(iter(make_dataloader(ds, sampler, num_workers=1)))
    assert images.shape == (2, 3, 8, 8) and labels.tolist() == [-1, -1]


# ---------------------------------------------------------------------------------------------
# Image statistics (diffunet stats: EDM's sigma_data)


def test_image_statistics_are_the_exact_moments() -> None:
    from diffunet.data import image_statistics

    g = torch.Generator().manual_seed(0)
    images = torch.rand(37, 3, 5, 5, generator=g) * torch.tensor([2.0, 1.0, 0.5])[:, None, None] - 0.8
    dataset = [(x, 0) for x in images]
    stats = image_statistics(dataset, batch_size=8)  # 5 batches merged
    every = images.to(torch.float64)
    assert stats.images == 37
    want_mean = every.mean(dim=(0, 2, 3))
    want_std = every.transpose(0, 1).reshape(3, -1).std(dim=1, unbiased=False)
    torch.testing.assert_close(torch.tensor(stats.mean, dtype=torch.float64), want_mean)
    torch.testing.assert_close(torch.tensor(stats.std, dtype=torch.float64), want_std)
    assert stats.std_all == pytest.approx(float(every.std(unbiased=False)), rel=1e-12)
    assert stats.rms_all == pytest.approx(float(every.pow(2).mean().sqrt()), rel=1e-12)
    some = image_statistics(dataset, [0, 5, 9])
    assert some.images == 3 and some.std_all == pytest.approx(
        float(every[[0, 5, 9]].std(unbiased=False)), rel=1e-12)
    with pytest.raises(DataError):
        image_statistics(dataset, [])


def test_spread_indices_reach_the_whole_data_set() -> None:
    from diffunet.data import spread_indices

    assert spread_indices(10, None) == list(range(10)) == spread_indices(10, 50)
    assert spread_indices(10, 4) == [0, 2, 5, 7]
    assert spread_indices(50_000, 1000)[-1] == 49_950


def test_stats_prints_sigma_data_of_the_configs_images(capsys: pytest.CaptureFixture) -> None:
    import json

    from diffunet import cli
    from diffunet.config import load_config
    from diffunet.data import image_statistics, spread_indices
    from helpers import tiny_run

    run = tiny_run()
    assert cli.main(["stats", *run, "--max-images", "16"]) == 0
    printed = capsys.readouterr()
    cfg = load_config(None, run)
    dataset = build_dataset(cfg.data)
    stats = image_statistics(dataset, spread_indices(len(dataset), 16))
    lines = printed.out.strip().splitlines()
    assert lines[-1] == f"schedule.sigma_data = {round(stats.std_all, 4)}"
    assert lines[0].startswith("# 16 of 64 images (spread evenly)")
    assert "schedule.formulation=edm schedule.sigma_data=" in printed.err
    assert cli.main(["stats", *run, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    every = image_statistics(dataset)
    assert got["images"] == got["of"] == 64 and got["sigma_data"] == round(every.std_all, 4)
    assert got["mean"] == [round(v, 4) for v in every.mean] and len(got["std"]) == 3
