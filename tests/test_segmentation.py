"""The segmentation recipe: the time-less UNet, its config, model files, `diffunet segment`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import diffunet
from diffunet import UNet, UNetConfig
from diffunet.cli import main
from diffunet.config import SegRunConfig, load_config
from diffunet.errors import ConfigError, ModelFileError
from helpers import tiny_net, unet_overrides
from processes import clean_env, launch_two, reset_accelerate_state

TINY = tiny_net()
# A tiny run: 16x16 built-in shapes, 2 epochs of 4 steps (38 training pairs, batch 8).
TINY_RUN = [*unet_overrides(TINY), "data.builtin_size=48", "data.val_fraction=0.2",
            "train.epochs=2", "train.batch_size=8", "train.log_every=2"]
# Each `diffunet segment train` below runs in this process, from a fresh Accelerate state.
pytestmark = pytest.mark.usefixtures("cpu_accelerate")


def test_timeless_unet_shapes_and_keys() -> None:
    net = UNet(UNetConfig(**TINY, time_conditioning=False, out_channels=5))
    x = torch.randn(2, 3, 16, 16)
    out = net(x)
    assert out.shape == (2, 5, 16, 16)
    keys = net.state_dict().keys()
    assert not any(k.startswith("time_embed") or ".emb_proj." in k for k in keys)
    timed = UNet(UNetConfig(**TINY, out_channels=5))
    # Exactly the time MLP and the per-block projections are gone.
    extra = {k for k in timed.state_dict() if k not in keys}
    assert extra and all(k.startswith("time_embed") or ".emb_proj." in k for k in extra)
    assert set(keys) < set(timed.state_dict())


def test_timeless_unet_rejects_t_and_timed_unet_needs_t() -> None:
    net = UNet(UNetConfig(**TINY, time_conditioning=False))
    with pytest.raises(ValueError, match="no timestep input"):
        net(torch.randn(1, 3, 16, 16), torch.tensor([3]))
    timed = UNet(UNetConfig(**TINY))
    with pytest.raises(ValueError, match="time-conditioned"):
        timed(torch.randn(1, 3, 16, 16))


def test_timeless_unet_is_a_function_of_x_only_and_trains() -> None:
    torch.manual_seed(0)
    net = UNet(UNetConfig(**TINY, time_conditioning=False, out_channels=2))
    x = torch.randn(2, 3, 16, 16)
    target = torch.randint(0, 2, (2, 16, 16))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(net(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    net.eval()
    assert torch.equal(net(x), net(x))


@pytest.mark.parametrize("overrides, key", [
    (["unet.time_conditioning=true"], "unet.time_conditioning"),
    (["unet.out_channels=3"], "unet.out_channels"),
    (["data.source=folder", "data.images=a", "data.masks=b"], "data.num_classes"),
    (["data.source=folder", "data.masks=b", "data.num_classes=2"], "data.images"),
    (["data.mean=[0.5]"], "data.mean"),
    (["data.std=[1, 0, 1]"], "data.std"),
    (["data.num_classes=3"], "data.num_classes"),
    (["data.val_images=a"], "data.val_masks"),
    (["train.ema_decay=1.5"], "train.ema_decay"),
    (["train.pct_start=0"], "train.pct_start"),
    (["data.image_size=32"], "data.image_size"),
    (["trian.epochs=3"], "trian"),
])
def test_seg_config_errors_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides, root=SegRunConfig)


def test_seg_config_output_channels() -> None:
    assert SegRunConfig().net_config.out_channels == 4  # built-in: 4 classes
    cfg = load_config(None, ["data.source=folder", "data.images=a", "data.masks=b",
                             "data.num_classes=2"], root=SegRunConfig)
    assert cfg.net_config.out_channels == 1  # binary: one logit
    # a diffusion run refuses a time-less UNet
    with pytest.raises(ConfigError, match="unet.time_conditioning"):
        load_config(None, ["unet.time_conditioning=false"])


def test_segment_toml_preset_is_the_default() -> None:
    preset = load_config(Path(__file__).parents[1] / "configs" / "segment.toml", root=SegRunConfig)
    assert preset == SegRunConfig()


def test_model_file_without_schedule(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    net = UNet(UNetConfig(**TINY, time_conditioning=False, out_channels=4))
    path = tmp_path / "seg.safetensors"
    diffunet.save_model(path, net, None, extra={"segmentation": {"num_classes": 4}})
    net2, schedule, meta = diffunet.load_model(path)
    assert schedule is None and meta["segmentation"] == {"num_classes": 4}
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(net.eval()(x), net2(x))
    assert main(["info", str(path)]) == 0
    assert "[segmentation]" in capsys.readouterr().out
    # diffusion commands refuse it with one line
    assert main(["sample", str(path), "--num-samples", "1", "--out-dir",
                 str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a diffusion model" in err and "segment predict" in err and "\n" not in err
    with pytest.raises(ModelFileError, match="not a diffusion model"):
        diffunet.checkpoint.load_diffusion_model(path)


def _train(tmp_path: Path, name: str, extra: list[str] = ()) -> Path:
    out = tmp_path / name
    assert main(["segment", "train", *TINY_RUN, *extra, "--out-dir", str(out),
                 "--no-progress"]) == 0
    return out


def test_segment_train_end_to_end_and_deterministic(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    out = _train(tmp_path, "a")
    for f in ("config.json", "log.jsonl", "weights/best.safetensors", "weights/last.safetensors"):
        assert (out / f).is_file(), f
    lines = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    epochs = [ln for ln in lines if "val_dice" in ln]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        assert len(e["val_dice"]) == 4 and len(e["val_iou"]) == 4
        assert all(v is None or 0 <= v <= 1 for v in e["val_dice"] + e["val_iou"])
    assert any(e["best"] for e in epochs)
    assert [ln["step"] for ln in lines if "loss" in ln] == [2, 4, 6, 8]  # 38 pairs // 8 = 4 steps per epoch
    net, schedule, meta = diffunet.load_model(out / "weights" / "best.safetensors")
    assert schedule is None and not net.config.time_conditioning
    seg = meta["segmentation"]
    assert seg["num_classes"] == 4 and seg["class_names"][0] == "background"
    assert seg["mean"] == pytest.approx([0.485, 0.456, 0.406])
    best = max(epochs, key=lambda e: e["val_mean_dice"] if e["val_mean_dice"] is not None else -1)
    assert meta["epoch"] == best["epoch"]
    capsys.readouterr()
    assert main(["info", str(out / "weights" / "best.safetensors")]) == 0
    assert f"training epoch   {best['epoch']} (validation mean Dice" in capsys.readouterr().out
    # the same seed gives the same weights
    again = _train(tmp_path, "b")
    a = load_file(out / "weights" / "last.safetensors")
    b = load_file(again / "weights" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a non-empty run folder is refused, its files untouched
    before = (out / "log.jsonl").read_bytes()
    assert main(["segment", "train", *TINY_RUN, "--out-dir", str(out), "--no-progress"]) == 2
    assert (out / "log.jsonl").read_bytes() == before


def test_output_bias_starts_at_the_class_prior(tmp_path: Path) -> None:
    out = _train(tmp_path, "prior", ["train.epochs=1", "train.lr=1e-9"])
    net, _, _ = diffunet.load_model(out / "weights" / "last.safetensors")
    probs = torch.softmax(net.conv_out.bias.detach(), 0)
    assert probs[0] > 0.5  # background is the most frequent class
    assert torch.all(probs[1:] > 0.02)  # and no class starts at zero


def test_segment_train_bf16_runs_in_bf16_and_saves_the_ema_weights(tmp_path: Path) -> None:
    out = _train(tmp_path, "bf16", ["train.mixed_precision=bf16", "train.ema_decay=0.9",
                                    "train.epochs=1"])
    reset_accelerate_state()  # Accelerate pins the first run's mixed precision process-wide
    fp32 = _train(tmp_path, "fp32", ["train.ema_decay=0.9", "train.epochs=1"])
    last = load_file(out / "weights" / "last.safetensors")
    state = next((out / "state").iterdir())
    ema, raw = load_file(state / "ema.safetensors"), load_file(state / "model.safetensors")
    # The model file holds the EMA weights (fp32), not the raw ones they trail.
    assert all(torch.equal(last[k], ema[k]) for k in last)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    assert all(v.dtype == torch.float32 for v in last.values())

    # bf16 autocast really ran: the same seed gives other (bf16-rounded) losses than fp32,
    # and close ones.
    def losses(run: Path) -> list[float]:
        rows = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    a, b = losses(out), losses(fp32)
    assert a != b and a == pytest.approx(b, rel=0.1)


def _write_folder_data(root: Path, n: int = 24, size: int = 20) -> tuple[Path, Path]:
    """Binary data: bright squares on dark noise; masks as 0/255 grayscale PNGs."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(0, size - 8, 2)
        img[y:y + 8, x:x + 8] = 220
        mask[y:y + 8, x:x + 8] = 255
        Image.fromarray(img).save(images / f"im{i:02d}.jpg" if i % 2 else images / f"im{i:02d}.png")
        Image.fromarray(mask).save(masks / f"im{i:02d}.png")
    return images, masks


def test_segment_folder_binary_train_predict_stats(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    images, masks = _write_folder_data(tmp_path / "data")
    folder = ["data.source=folder", f"data.images={images}", f"data.masks={masks}",
              "data.num_classes=2"]
    out = _train(tmp_path, "bin", folder + ["train.epochs=3", "train.lr=0.01"])
    model = out / "weights" / "best.safetensors"
    net, _, meta = diffunet.load_model(model)
    assert net.config.out_channels == 1 and meta["segmentation"]["num_classes"] == 2

    # predict: a mask (class indices) and an overlay at the input's own size (not square)
    Image.fromarray(np.full((24, 40, 3), 30, np.uint8)).save(tmp_path / "wide.png")
    pred = tmp_path / "pred"
    assert main(["segment", "predict", str(model), str(images / "im00.png"),
                 str(tmp_path / "wide.png"), "--out-dir", str(pred), "--no-progress"]) == 0
    m = np.asarray(Image.open(pred / "wide.png"))
    assert m.shape == (24, 40) and set(np.unique(m)) <= {0, 1}
    assert Image.open(pred / "wide_overlay.png").size == (40, 24)
    assert Image.open(pred / "im00.png").mode == "P"
    assert sorted(json.loads((pred / "masks.json").read_text())["files"]) == [
        "im00.png", "im00_overlay.png", "wide.png", "wide_overlay.png"]
    # a camera photo stored sideways with an EXIF "rotate" tag is predicted upright, as the
    # training data is read
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(np.full((24, 40, 3), 30, np.uint8)).save(tmp_path / "cam.jpg", exif=exif)
    assert main(["segment", "predict", str(model), str(tmp_path / "cam.jpg"),
                 "--out-dir", str(pred), "--no-progress"]) == 0
    assert np.asarray(Image.open(pred / "cam.png")).shape == (40, 24)
    assert Image.open(pred / "cam_overlay.png").size == (24, 40)
    # existing outputs are not replaced without --overwrite
    before = (pred / "wide.png").read_bytes()
    assert main(["segment", "predict", str(model), str(tmp_path / "wide.png"),
                 "--out-dir", str(pred), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (pred / "wide.png").read_bytes() == before

    # stats: the images' mean/std as config lines
    capsys.readouterr()
    assert main(["segment", "stats", *folder, "unet.image_size=16",
                 "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert len(stats["mean"]) == 3 and all(0 < v < 1 for v in stats["mean"])


def test_segment_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    diff = tmp_path / "diff.safetensors"
    diffunet.save_model(diff, UNet(UNetConfig(**TINY)), diffunet.NoiseSchedule(
        diffunet.ScheduleConfig()))
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    cases = [
        (["segment", "predict", str(diff), str(img)], "not a segmentation model"),
        (["segment", "predict", str(tmp_path / "none.safetensors"), str(img)], "not found"),
        (["segment", "train", "train.epochs=0", "--dry-run"], "train.epochs"),
        (["segment", "train", "data.source=folder", f"data.images={tmp_path}/nope",
          f"data.masks={tmp_path}/nope", "data.num_classes=2", "--out-dir",
          str(tmp_path / "r")], "nope"),
        (["segment", "train", *TINY_RUN, "train.batch_size=64", "--out-dir",
          str(tmp_path / "r2")], "train.batch_size"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err and "Traceback" not in err, (argv, err)


@pytest.mark.slow
def test_two_processes_share_the_work_report_exact_metrics_and_train_the_one_process_model(
        tmp_path: Path) -> None:
    """`accelerate launch` with 2 CPU processes: one log, one set of files, validation metrics
    over the whole split (each process scores its share; the counts are summed), and, with the
    Dice term off (cross-entropy over equal shards averages to the global batch's), the model of
    one process: flips are drawn for the global batch, so they do not depend on the world size."""
    import contextlib

    from diffunet.segmentation.data import build_segmentation_data
    from diffunet.segmentation.losses import dice_iou
    from diffunet.segmentation.training import evaluate, train_segmentation

    out = tmp_path / "two"
    # 11 validation pairs: an odd count, so the two processes score different numbers of them
    run = [*TINY_RUN, "data.builtin_size=55", "train.dice_weight=0", "data.vertical_flip=true"]
    r = launch_two(["segment", "train", *run, "--out-dir", str(out), "--no-progress"],
                   clean_env(ACCELERATE_USE_CPU="1"), timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("epoch 2/2") == 1  # only the main process talks
    epochs = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()
              if "val_dice" in json.loads(ln)]
    assert [e["epoch"] for e in epochs] == [1, 2]

    cfg = load_config(None, run, root=SegRunConfig)
    data = build_segmentation_data(cfg)
    assert len(data.val) == 11
    net, _, _ = diffunet.load_model(out / "weights" / "last.safetensors")
    loader = torch.utils.data.DataLoader(data.val, batch_size=4)
    cm = evaluate(net, loader, 4, data.mean, data.std, torch.device("cpu"),
                  contextlib.nullcontext)
    dice, _ = dice_iou(cm)
    expected = [None if torch.isnan(v) else round(float(v), 6) for v in dice]
    assert epochs[-1]["val_dice"] == pytest.approx(expected, abs=1e-6)

    one = tmp_path / "one"
    train_segmentation(cfg, one, progress=False)
    a, b = (load_file(d / "weights" / "last.safetensors") for d in (out, one))
    moved = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved < 1e-4, moved


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs this launch is a real 2-GPU run")
def test_two_processes_without_cpu_flag_are_refused(tmp_path: Path) -> None:
    # Without ACCELERATE_USE_CPU and without a GPU, Accelerate gives each process a world of
    # one: two lone runs writing one folder. The harness refuses before touching the folder.
    out = tmp_path / "run"
    env = clean_env()
    r = launch_two(["segment", "train", *TINY_RUN, "--out-dir", str(out), "--no-progress"], env,
                   timeout=180)
    assert r.returncode != 0
    assert r.stderr.count("diffunet segment: error: launched as 2 processes") == 1
    assert "ACCELERATE_USE_CPU=1" in r.stderr
    assert not out.exists()


def _assert_same_model_files(a: Path, b: Path) -> None:
    for name in ("last", "best"):
        ta = load_file(a / "weights" / f"{name}.safetensors")
        tb = load_file(b / "weights" / f"{name}.safetensors")
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name


def _records(out: Path) -> list[dict]:
    """The run's log lines without their timings."""
    rows = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "best_model")} for r in rows]


class _SignalAtItem(torch.utils.data.Dataset):
    """A training set that raises SIGTERM (as `kill` would) when item ``at`` is read."""

    def __init__(self, base: torch.utils.data.Dataset, at: int) -> None:
        self.base, self.at, self.reads = base, at, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        self.reads += 1
        if self.reads == self.at:
            import signal

            signal.raise_signal(signal.SIGTERM)
        return self.base[index]


def test_sigterm_mid_epoch_saves_and_resume_matches_an_uninterrupted_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffunet.segmentation import training as seg_training

    cfg = load_config(None, [*TINY_RUN, "train.epochs=3", "train.ema_decay=0.9",
                             "train.log_every=3", "data.random_flip=true",
                             "data.vertical_flip=true"], root=SegRunConfig)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    seg_training.train_segmentation(cfg, whole, progress=False)

    real = seg_training.build_segmentation_data

    def signalling(c: SegRunConfig):
        data = real(c)
        # class_pixel_counts reads the (38) training items first, then every step 8: the
        # signal comes while step 6 (epoch 2 of 3, 4 steps each) loads its batch.
        data.train = _SignalAtItem(data.train, at=len(data.train) + 5 * 8 + 1)
        return data

    monkeypatch.setattr(seg_training, "build_segmentation_data", signalling)
    said: list[str] = []
    result = seg_training.train_segmentation(cfg, cut, say=said.append, progress=False)
    monkeypatch.undo()
    assert result.interrupted
    assert said[-1] == (f"stopped by SIGTERM at step 6 (epoch 2 of 3); state saved in "
                        f"{cut / 'state'}; continue with --resume")
    assert [p.name for p in (cut / "state").iterdir()] == ["step0000006"]
    assert (cut / "weights" / "best.safetensors").is_file()  # epoch 1's, the best so far

    said.clear()
    seg_training.train_segmentation(cfg, cut, resume=True, say=said.append, progress=False)
    assert said[0] == (f"resuming from {cut / 'state' / 'step0000006'} (epoch 1 of 3, "
                       "2 steps into epoch 2)")
    _assert_same_model_files(whole, cut)

    assert _records(cut) == _records(whole)  # mid-epoch loss sums included


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    from diffunet.runs import lock_folder

    out = tmp_path / "run"
    out.mkdir()
    held = lock_folder(out)  # another run, as far as the lock is concerned
    try:
        assert main(["segment", "train", *TINY_RUN, "--out-dir", str(out), "--resume",
                     "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"diffunet segment: error: {out} is in use by another diffunet run "
                       f"(process {os.getpid()}); wait for it to finish or stop it, or choose "
                       "another --out-dir")
    finally:
        held.close()
    assert not (out / "state").exists()  # nothing was written while it was held
    assert main(["segment", "train", *TINY_RUN, "train.epochs=1", "--out-dir", str(out),
                 "--resume", "--no-progress"]) == 0


def test_resume_after_an_interrupt_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    from diffunet.segmentation.training import train_segmentation

    cfg = load_config(None, [*TINY_RUN, "train.epochs=3", "train.ema_decay=0.9",
                             "data.random_flip=true", "data.vertical_flip=true"],
                      root=SegRunConfig)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train_segmentation(cfg, whole, progress=False)

    def stop_after_epoch_2(msg: str) -> None:  # Ctrl-C right after epoch 2 was reported
        if msg.startswith("epoch 2/3"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_segmentation(cfg, cut, say=stop_after_epoch_2, progress=False)
    # The interrupt came before epoch 2's state was saved: the newest is epoch 1's.
    assert [p.name for p in (cut / "state").iterdir()] == ["step0000004"]
    said: list[str] = []
    result = train_segmentation(cfg, cut, resume=True, say=said.append, progress=False)
    assert said[0].startswith("resuming from") and "epoch 1 of 3" in said[0]
    assert [m[:9] for m in said if m.startswith("epoch")] == ["epoch 2/3", "epoch 3/3"]
    _assert_same_model_files(whole, cut)

    assert _records(cut) == _records(whole)
    assert result.best_epoch == json.loads((whole / "log.jsonl").read_text().splitlines()[-1])[
        "best_epoch"]
    # resuming a finished run does nothing and says so
    said.clear()
    train_segmentation(cfg, cut, resume=True, say=said.append, progress=False)
    assert any("nothing to do" in m for m in said)
    assert _records(cut) == _records(whole)


def test_resume_refuses_a_changed_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = _train(tmp_path, "run", ["train.epochs=1"])
    capsys.readouterr()
    assert main(["segment", "train", *TINY_RUN, "train.epochs=1", "train.lr=0.5",
                 "--out-dir", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.lr" in err and "\n" not in err
    # with no CONFIG, --resume starts from the run's own config.json
    assert main(["segment", "train", "--out-dir", str(out), "--resume", "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().err


def test_train_segmentation_script_is_the_command() -> None:
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "scripts" / "train_segmentation.py"
    r = subprocess.run([sys.executable, str(script), "train.epochs=3", "--dry-run"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "epochs = 3" in r.stdout and "time_conditioning = false" in r.stdout
