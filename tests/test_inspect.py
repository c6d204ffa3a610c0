"""diffunet inspect: activation capture, statistics, feature pictures and the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffunet import NoiseSchedule, ScheduleConfig, UNet, UNetConfig, save_model
from diffunet.cli import main
from diffunet.images import load_image
from diffunet.errors import FolderError
from diffunet.inspection import (_mask_image, activation_stats, block_names, capture_activations,
                                 feature_grid, format_stats_table, inspect_model)

T = 10


def _tiny(**kw: object) -> UNet:
    """A tiny UNet with random (not zero-initialised) weights, so every block does something."""
    cfg = dict(image_size=8, in_channels=3, base_channels=8, channel_mults=(1, 2),
               num_res_blocks=1, attn_resolutions=(4,), num_groups=4, dropout=0.0)
    cfg.update(kw)
    net = UNet(UNetConfig(**cfg))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return net.eval()


def _schedule() -> NoiseSchedule:
    return NoiseSchedule(ScheduleConfig(num_train_timesteps=T))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    paths = {k: root / f"{k}.safetensors" for k in ("diff", "cond", "seg")}
    save_model(paths["diff"], _tiny(), _schedule())
    save_model(paths["cond"], _tiny(num_classes=3, in_channels=1), _schedule())
    seg = _tiny(time_conditioning=False, out_channels=3)
    save_model(paths["seg"], seg, None, extra={"segmentation": {
        "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3], "num_classes": 3,
        "class_names": ["background", "a", "b"], "image_size": 8, "channels": 3}})
    return paths


EXPECTED_ORDER = [
    "conv_in", "down.0.res.0", "down.0.downsample", "down.1.res.0", "down.1.attn.0",
    "mid.res1", "mid.attn", "mid.res2",
    "up.1.res.0", "up.1.attn.0", "up.1.res.1", "up.1.attn.1", "up.1.upsample",
    "up.0.res.0", "up.0.res.1", "norm_out", "conv_out",
]


# ---------------------------------------------------------------------------------------------
# capture_activations


def test_capture_every_block_in_execution_order() -> None:
    net = _tiny()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    acts = capture_activations(net, x, torch.tensor([3, 7]))
    names = [n for n, _ in acts]
    assert names == EXPECTED_ORDER
    assert set(names) == set(block_names(net))
    shapes = dict((n, tuple(a.shape)) for n, a in acts)
    assert shapes["conv_in"] == (2, 8, 8, 8)
    assert shapes["down.0.downsample"] == (2, 8, 4, 4)
    assert shapes["mid.attn"] == (2, 16, 4, 4)
    assert shapes["up.1.upsample"] == (2, 16, 8, 8)
    assert shapes["conv_out"] == (2, 3, 8, 8)
    for _, a in acts:
        assert a.dtype == torch.float32 and a.device.type == "cpu" and a.is_contiguous()
    with torch.no_grad():
        out = net(x, torch.tensor([3, 7]))
        norm = net.norm_out(acts[-3][1])  # from up.0.res.0's captured output
    torch.testing.assert_close(acts[-1][1], out)
    # norm_out's output as it left the block, before the network's in-place SiLU
    torch.testing.assert_close(acts[-2][1], norm)
    assert all(not m._forward_hooks for m in net.modules())


def test_capture_time_less_and_hooks_removed_on_error() -> None:
    net = _tiny(time_conditioning=False, out_channels=2)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    acts = capture_activations(net, x)
    assert [n for n, _ in acts] == EXPECTED_ORDER
    with torch.no_grad():
        torch.testing.assert_close(acts[-1][1], net(x))
    with pytest.raises(ValueError):  # a timestep given to a time-less UNet
        capture_activations(net, x, 5)
    assert all(not m._forward_hooks for m in net.modules())


# ---------------------------------------------------------------------------------------------
# statistics and pictures


def test_activation_stats_match_torch() -> None:
    a = torch.tensor([[[[0.0, 1.0], [-2.0, 5e-7]], [[3.0, 3.0], [3.0, 3.0]]]])  # (1, 2, 2, 2)
    b = a.clone()
    b[0, 0, 0, 1] = math.nan
    b[0, 1, 1, 1] = math.inf
    s_a, s_b = activation_stats([("x", a), ("y", b)])
    v = a.double().flatten()
    assert s_a["index"] == 0 and s_a["name"] == "x" and s_a["shape"] == [1, 2, 2, 2]
    assert s_a["mean"] == pytest.approx(float(v.mean()))
    assert s_a["std"] == pytest.approx(float(v.std(correction=0)))
    assert s_a["min"] == -2.0 and s_a["max"] == 3.0
    assert s_a["mean_abs"] == pytest.approx(float(v.abs().mean()))
    assert s_a["frac_zero"] == pytest.approx(1 / 8)
    assert s_a["frac_near_zero"] == pytest.approx(2 / 8)
    assert s_a["nonfinite"] == 0 and s_a["constant_channels"] == 1
    finite = b.double().flatten()[torch.isfinite(b.flatten())]
    assert s_b["nonfinite"] == 2
    assert s_b["mean"] == pytest.approx(float(finite.mean()))
    assert s_b["max"] == 3.0
    table = format_stats_table([s_a, s_b]).splitlines()
    assert len(table) == 4 and len({len(row) for row in table[:2]}) == 1
    json.dumps([s_a, s_b], allow_nan=False)  # strict JSON: no NaN/inf values


def test_feature_grid_layout_and_special_values() -> None:
    act = torch.arange(5 * 16, dtype=torch.float32).view(5, 4, 4)
    act[1] = 7.0  # constant channel
    act[2, 0, 0] = math.nan
    grid = feature_grid(act, min_tile=32, padding=2)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3)  # 3 columns, 2 rows of 32x32 tiles
    tile = lambda k: grid[2 + (k // 3) * 34:2 + (k // 3) * 34 + 32,  # noqa: E731
                          2 + (k % 3) * 34:2 + (k % 3) * 34 + 32]
    assert tile(0).min() == 0 and tile(0).max() == 255
    assert (tile(0)[:8, :8] == 0).all()  # nearest upscaling: pixel (0, 0) is an 8x8 block
    assert (tile(1) == 128).all()
    assert (tile(2)[:8, :8] == [255, 0, 255]).all()  # NaN highlighted
    assert tile(2)[8:, 8:].max() == 255  # the rest still scaled over the finite values
    assert feature_grid(act, max_channels=2, padding=0).shape == (32, 64, 3)
    assert feature_grid(torch.zeros(1, 64, 64)).shape == (68, 68, 3)  # no upscaling needed


def test_mask_image_argmax_and_sigmoid() -> None:
    logits = torch.tensor([[[5.0, -1.0]], [[0.0, 2.0]]])  # (2, 1, 2): classes 0, 1
    m = _mask_image(logits)
    assert m.shape == (1, 2, 3) and (m[0, 0] == 0).all() and m[0, 1].any()
    one = _mask_image(torch.tensor([[[-3.0, 3.0]]]))  # (1, 1, 2): sigmoid > 0.5
    assert (one[0, 0] == 0).all() and one[0, 1].any()


# ---------------------------------------------------------------------------------------------
# the command


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["inspect", *map(str, argv), "--device", "cpu"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_diffusion_model(models: dict[str, Path], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "in.png"
    Image.fromarray(np.arange(12 * 12 * 3, dtype=np.uint8).reshape(12, 12, 3)).save(img)
    out_dir = tmp_path / "out"
    rc, out, err = _run(capsys, models["diff"], "--image", img, "--t", 4, "--out-dir", out_dir)
    assert rc == 0, err
    doc = json.loads((out_dir / "stats.json").read_text())
    assert doc["input"]["t"] == 4 and doc["input"]["kind"] == "diffusion"
    assert [b["name"] for b in doc["blocks"]] == EXPECTED_ORDER
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == sorted(doc["files"])
    assert "00_conv_in.png" in files and "16_conv_out.png" in files
    assert "noised.png" in files and "stats.txt" in files
    for name in files:
        if name.endswith(".png"):
            with Image.open(out_dir / name) as im:
                im.load()
                assert im.size[0] >= 8
    with Image.open(out_dir / "input.png") as im:
        expected = ((load_image(img, 8, 3) + 1) * 127.5).round().permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(np.asarray(im), expected.astype(np.uint8))
    assert "mid.attn" in out and "conv_out" in out and "stats.json" in out
    assert "mid.attn" in (out_dir / "stats.txt").read_text()


def test_cli_segmentation_model(models: dict[str, Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "seg"
    rc, out, err = _run(capsys, models["seg"], "--out-dir", out_dir, "--max-channels", 4)
    assert rc == 0, err
    doc = json.loads((out_dir / "stats.json").read_text())
    assert doc["input"]["kind"] == "segmentation" and "t" not in doc["input"]
    assert doc["input"]["normalisation"]["mean"] == [0.4, 0.5, 0.6]
    assert [b["name"] for b in doc["blocks"]] == EXPECTED_ORDER
    assert (out_dir / "prediction.png").is_file() and not (out_dir / "noised.png").exists()
    with Image.open(out_dir / "prediction.png") as im:
        assert im.size == (8, 8) and im.mode == "RGB"
    with Image.open(out_dir / "03_down.1.res.0.png") as im:  # 16 channels, 4 shown: 2x2 tiles
        assert im.size == (2 * 34 + 2, 2 * 34 + 2)


def test_same_seed_same_stats(models: dict[str, Path], tmp_path: Path) -> None:
    a = inspect_model(models["diff"], tmp_path / "a", seed=3, device="cpu")
    b = inspect_model(models["diff"], tmp_path / "b", seed=3, device="cpu")
    c = inspect_model(models["diff"], tmp_path / "c", seed=4, device="cpu")
    assert a.blocks == b.blocks and a.input["t"] == T // 2
    assert a.blocks != c.blocks
    assert (tmp_path / "a" / "stats.json").read_bytes() == (tmp_path / "b" / "stats.json"
                                                            ).read_bytes()


def test_class_conditional_label(models: dict[str, Path], tmp_path: Path) -> None:
    r0 = inspect_model(models["cond"], tmp_path / "a", class_label=0, device="cpu")
    r2 = inspect_model(models["cond"], tmp_path / "b", class_label=2, device="cpu")
    assert r0.input["class_label"] == 0 and r0.input["channels"] == 1
    assert r0.blocks[0] == r2.blocks[0]  # conv_in does not see the label
    assert r0.blocks[-1] != r2.blocks[-1]


@pytest.mark.parametrize("model, extra, needle", [
    ("missing", [], "not found"),
    ("diff", ["--t", str(T)], "--t"),
    ("diff", ["--t", "-1"], "--t"),
    ("diff", ["--image", "no-such.png"], "no-such.png"),
    ("diff", ["--class-label", "0"], "--class-label"),
    ("cond", ["--class-label", "3"], "--class-label"),
    ("seg", ["--t", "3"], "no timestep"),
    ("diff", ["--max-channels", "0"], "--max-channels"),
])
def test_bad_input_is_one_line_exit_2(models: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str], model: str,
                                      extra: list[str], needle: str) -> None:
    path = models.get(model, tmp_path / "missing.safetensors")
    out_dir = tmp_path / "out"
    rc, out, err = _run(capsys, path, "--out-dir", out_dir, *extra)
    assert rc == 2
    assert err.startswith("diffunet inspect: error: ") and err.count("\n") == 1
    assert needle in err and "Traceback" not in err
    assert not out_dir.exists()


def test_non_empty_out_dir_refused_and_untouched(models: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    (out_dir / "input.png").write_bytes(b"my own picture")
    rc, out, err = _run(capsys, models["diff"], "--out-dir", out_dir)
    assert rc == 2 and "--overwrite" in err and err.count("\n") == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["input.png", "notes.txt"]
    assert (out_dir / "input.png").read_bytes() == b"my own picture"

    # --overwrite writes beside the user's files, but never over one of them
    rc, out, err = _run(capsys, models["diff"], "--out-dir", out_dir, "--overwrite")
    assert rc == 2 and "input.png" in err and "even if you pass --overwrite" in err
    assert err.count("\n") == 1
    assert (out_dir / "input.png").read_bytes() == b"my own picture"
    (out_dir / "input.png").rename(tmp_path / "input.png")
    rc, out, err = _run(capsys, models["diff"], "--out-dir", out_dir, "--overwrite")
    assert rc == 0, err
    assert (out_dir / "notes.txt").read_text() == "keep me"
    assert (out_dir / "stats.json").is_file()
    # a rerun (the folder is inspect's now) replaces its own files and keeps the user's
    rc, out, err = _run(capsys, models["seg"], "--out-dir", out_dir)
    assert rc == 0, err
    assert (out_dir / "notes.txt").read_text() == "keep me"
    assert not (out_dir / "noised.png").exists()
    with pytest.raises(FolderError, match="is a file"):
        inspect_model(models["diff"], out_dir / "notes.txt", device="cpu")


def test_rerun_replaces_previous_output(models: dict[str, Path], tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    inspect_model(models["diff"], out_dir, device="cpu")
    (out_dir / "99_stale.block.png").write_bytes(b"mine")  # looks like inspect's, is not
    r = inspect_model(models["seg"], out_dir, device="cpu")  # no --overwrite needed
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == sorted([p.name for p in r.files] + ["99_stale.block.png"])
    assert "noised.png" not in names and "prediction.png" in names
    assert (out_dir / "99_stale.block.png").read_bytes() == b"mine"
    doc = json.loads((out_dir / "stats.json").read_text())
    assert doc["complete"] is True and sorted(doc["files"]) == sorted(p.name for p in r.files)
