"""The inpaint task (issue 26): masks drawn from the run's generator (boxes and free-form
strokes), the condition (the image with its hole, and the mask), a training run, ``diffunet
sample --cond-image IMAGE --mask MASK`` and ``eval paired`` on an inpaint model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import diffunet
from diffunet import UNet, UNetConfig
from diffunet.config import ScheduleConfig
from diffunet.formulations import make_schedule
from diffunet.tasks import condition_image, drawn_condition, random_keep_masks, shown_condition
from helpers import perturbed, tiny_net


def _hole_is_a_box(keep: torch.Tensor) -> bool:
    """Whether a keep mask (S, S)'s hole is exactly its bounding box."""
    hole = keep == 0
    rows, cols = hole.any(1).nonzero(), hole.any(0).nonzero()
    box = hole[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return bool(box.all())


def test_masks_are_boxes_and_strokes_drawn_from_the_generator() -> None:
    masks = random_keep_masks(200, 32, torch.Generator().manual_seed(0))
    assert masks.shape == (200, 1, 32, 32) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    holes = (1 - masks).mean((1, 2, 3))
    # every mask has a hole and keeps most of the image
    assert (holes > 0.01).all() and (holes < 0.5).all(), (holes.min(), holes.max())
    boxes = sum(_hole_is_a_box(m[0]) for m in masks)
    assert 70 < boxes < 130  # about half are boxes, the rest strokes (never a filled box)
    again = random_keep_masks(200, 32, torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)
    assert not torch.equal(masks, random_keep_masks(200, 32, torch.Generator().manual_seed(1)))


def test_masks_move_the_generator_by_the_same_amount_whatever_they_draw() -> None:
    """The step's later draws (dropout) must not depend on which kinds of masks were drawn."""
    for seed in range(3):  # seeds whose 5 masks mix boxes and strokes differently
        g = torch.Generator().manual_seed(seed)
        random_keep_masks(5, 16, g)
        ref = torch.Generator().manual_seed(seed)
        torch.rand((5, 1 + 4 + 3 * 12), generator=ref)  # a kind, a box, three strokes
        assert torch.equal(g.get_state(), ref.get_state())


def test_the_inpaint_condition_is_the_holed_image_and_the_mask() -> None:
    g = torch.Generator().manual_seed(3)
    images = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    keep = random_keep_masks(4, 16, g)
    cond = condition_image("inpaint", images, keep=keep)
    assert cond.shape == (4, 4, 16, 16)
    kept = keep.expand(-1, 3, -1, -1) == 1
    assert torch.equal(cond[:, :3][kept], images[kept])
    assert (cond[:, :3][~kept] == 0).all()  # the hole is grey, nothing of the image leaks
    assert torch.equal(cond[:, 3:], 2 * keep - 1)  # +1 kept, -1 to fill (0 is no condition)
    assert torch.equal(shown_condition("inpaint", cond, 3), cond[:, :3])
    with pytest.raises(ValueError, match="keep masks"):
        condition_image("inpaint", images)
    # drawn_condition draws the masks of a global batch and keeps its rows
    whole = drawn_condition("inpaint", images, 4, torch.Generator().manual_seed(9))
    half = drawn_condition("inpaint", images[2:], 4, torch.Generator().manual_seed(9),
                           global_batch=4, rows=slice(2, 4))
    assert torch.equal(whole[2:], half)


def test_inpaint_steps_inputs_are_the_same_on_any_number_of_processes() -> None:
    from diffunet.config import load_config
    from diffunet.data_space import PixelSpace
    from diffunet.training import _step_inputs

    cfg = load_config(None, ["data.task=inpaint", "train.batch_size=8",
                             "train.label_dropout=0.5"])
    assert cfg.unet.cond_channels == 4
    schedule = make_schedule(cfg.schedule)
    batch = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.zeros(8, dtype=torch.long)

    def run(mine: slice):
        gen = torch.Generator().manual_seed(5)
        return _step_inputs(cfg, schedule, PixelSpace(), gen, batch[mine], labels[mine], mine)

    whole = run(slice(0, 8))
    halves = [run(slice(0, 4)), run(slice(4, 8))]
    assert torch.equal(torch.cat([h[3]["cond_image"] for h in halves]), whole[3]["cond_image"])
    cond = whole[3]["cond_image"]
    dropped = cond.flatten(1).abs().amax(1) == 0
    assert 0 < int(dropped.sum()) < 8  # dropout 0.5 dropped some conditions, not all
    masks = cond[~dropped, 3:]
    assert set(masks.unique().tolist()) == {-1.0, 1.0}  # each kept row has a hole and a mask


@pytest.mark.parametrize("overrides, words", [
    (["data.task=inpaint", "unet.cond_channels=3"],
     "unet.cond_channels: 3 does not fit data.task = 'inpaint', whose condition image has 4"),
], ids=["channels"])
def test_inpaint_settings_that_do_not_fit_are_one_line(overrides, words, capsys) -> None:
    from diffunet import cli

    assert cli.main(["train", *overrides, "--out-dir", "unused"]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.splitlines()) == 1, err


def test_an_inpaint_run_records_its_task_and_previews_holed_sample_and_target(
        tmp_path, cpu_accelerate) -> None:
    from diffunet.checkpoint import read_metadata
    from diffunet.config import load_config
    from diffunet.training import train
    from helpers import tiny_run

    out = tmp_path / "run"
    cfg = load_config(None, [*tiny_run(), "data.task=inpaint", "train.max_steps=2",
                             "train.sample_every=2"])
    messages: list[str] = []
    train(cfg, out, progress=False, say=messages.append)
    assert any(m.startswith("task: inpaint: each image with a hole") for m in messages)
    model = out / "weights" / "model_step0000002.safetensors"
    assert read_metadata(model)["task"] == {"name": "inpaint"}
    grid = Image.open(out / "samples" / "step0000002.png")
    assert grid.size == (6 * 18 + 2, 2 * 18 + 2)  # 4 (holed | sample | target) triples


def _inpaint_model(tmp_path, seed: int = 6):
    """An inpaint model file of 8x8 RGB images whose condition weights are not zero."""
    torch.manual_seed(0)
    net = perturbed(UNet(UNetConfig(**tiny_net(8, cond_channels=4))).eval(), seed=seed)
    with torch.no_grad():
        net.conv_in.weight[:, 3:].normal_(std=0.5)
    model = tmp_path / "inpaint.safetensors"
    diffunet.save_model(model, net, make_schedule(ScheduleConfig(formulation="flow")),
                        extra={"task": {"name": "inpaint"}})
    return model


def _images(folder, count: int, size: int = 8, mode: str = "RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.random.RandomState(i).randint(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(folder / f"in{i}.png")
    return folder


def _masks(folder, count: int, size: int = 8):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        m = np.zeros((size, size), dtype=np.uint8)
        m[i: i + 3, 2:6] = 255  # white = fill, at another place for each input
        Image.fromarray(m).save(folder / f"in{i}.png")
    return folder


def _sample(*args: str) -> int:
    from diffunet import cli

    return cli.main(["sample", *args, "--no-progress", "--steps", "2"])


def test_sample_fills_the_holes_each_mask_marks_keeps_the_rest_and_resumes(tmp_path, capsys,
                                                           cpu_accelerate) -> None:
    model = str(_inpaint_model(tmp_path))
    images, masks = _images(tmp_path / "in", 2), _masks(tmp_path / "masks", 2)
    out = tmp_path / "s"
    assert _sample(model, "--cond-image", str(images), "--mask", str(masks), "--out-dir",
                   str(out), "--per-input", "2") == 0
    assert "conditional: 2 inputs (8x8 RGB images, and --mask" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{i:06d}.png" for i in range(4)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["settings"]["cond_masks"]) == 2
    assert manifest["cond_images"]["masks"][1].endswith("in1.png")
    # the mask reaches the samples: one input and seed, two masks, two images
    one = _masks(tmp_path / "m0", 1)
    other = tmp_path / "m1"
    other.mkdir()
    m = np.zeros((8, 8), dtype=np.uint8)
    m[4:, :] = 255
    Image.fromarray(m).save(other / "in0.png")
    for name, mask in (("a", one), ("b", other)):
        assert _sample(model, "--cond-image", str(images / "in0.png"), "--mask",
                       str(mask / "in0.png"), "--out-dir", str(tmp_path / name)) == 0
    a, b = (np.asarray(Image.open(tmp_path / n / "000000.png"), dtype=float) for n in "ab")
    assert np.abs(a - b).max() > 10
    # the pixels a mask keeps are the input's, exactly; the hole is the model's
    source = np.asarray(Image.open(images / "in0.png"), dtype=float)
    kept = np.asarray(Image.open(other / "in0.png")) == 0
    assert np.array_equal(b[kept], source[kept]) and np.abs(b[~kept] - source[~kept]).max() > 10
    # a rerun resumes; another mask under the same name is another run
    assert _sample(model, "--cond-image", str(images), "--mask", str(masks), "--out-dir",
                   str(out), "--per-input", "2") == 0
    assert "4 were already there" in capsys.readouterr().err
    (masks / "in1.png").write_bytes((other / "in0.png").read_bytes())
    assert _sample(model, "--cond-image", str(images), "--mask", str(masks), "--out-dir",
                   str(out), "--per-input", "2") == 2
    assert "condition mask 1 sha256" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["no-mask", "mask-on-superres", "unpaired-mask",
                                  "mask-of-another-size", "resample"])
def test_bad_inpaint_input_is_one_line(case, tmp_path, capsys, cpu_accelerate) -> None:
    model = str(_inpaint_model(tmp_path))
    images, masks = _images(tmp_path / "in", 2), _masks(tmp_path / "masks", 2)
    sr = tmp_path / "sr.safetensors"
    torch.manual_seed(0)
    diffunet.save_model(sr, perturbed(UNet(UNetConfig(**tiny_net(8, cond_channels=3)))),
                        make_schedule(ScheduleConfig(formulation="flow")),
                        extra={"task": {"name": "superres", "superres_factor": 2}})
    lone = _masks(tmp_path / "lone", 3)
    big = _masks(tmp_path / "big", 1, size=16)
    args = {
        "no-mask": [model, "--cond-image", str(images)],
        "mask-on-superres": [str(sr), "--cond-image", str(_images(tmp_path / "low", 1, 4)),
                             "--mask", str(masks / "in0.png")],
        "unpaired-mask": [model, "--cond-image", str(images), "--mask", str(lone)],
        "mask-of-another-size": [model, "--cond-image", str(images), "--mask",
                                 str(big / "in0.png")],
        "resample": [model, "--cond-image", str(images), "--mask", str(masks), "--resample",
                     "2"],
    }[case]
    before = {p.name: p.read_bytes() for p in [*images.iterdir(), *masks.iterdir()]}
    assert _sample(*args, "--out-dir", str(tmp_path / "s")) == 2
    err = capsys.readouterr().err
    words = {"no-mask": "give --mask MASK_OR_FOLDER", "mask-on-superres": "takes no mask",
             "unpaired-mask": "has no condition image of the same name",
             "mask-of-another-size": "is 16x16 pixels", "resample": "--resample 2"}[case]
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()
    assert {p.name: p.read_bytes() for p in [*images.iterdir(), *masks.iterdir()]} == before


def test_finished_inpaint_samples_keep_the_inputs_kept_pixels() -> None:
    from diffunet.tasks import finished

    g = torch.Generator().manual_seed(4)
    images, samples = (torch.rand(3, 3, 8, 8, generator=g) * 2 - 1 for _ in range(2))
    keep = random_keep_masks(3, 8, g)
    cond = condition_image("inpaint", images, keep=keep)
    out = finished("inpaint", samples, cond)
    assert torch.equal(out, keep * images + (1 - keep) * samples)
    assert finished("superres", samples, cond[:, :3]) is samples


def test_eval_paired_scores_an_inpaint_model_against_the_holed_images(tmp_path, capsys,
                                                                     cpu_accelerate) -> None:
    from diffunet import cli
    from diffunet.data import BuiltinShapes
    from diffunet.paired_eval import psnr

    model = _inpaint_model(tmp_path, seed=7)
    assert cli.main(["eval", "paired", str(model), "--num-images", "6", "--steps", "2",
                     "--json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    assert "| the image with grey holes |" in capsys.readouterr().out
    r = json.loads((tmp_path / "r.json").read_text())
    truth, _ = BuiltinShapes(6, 8, 3, seed=1).render(range(6))
    holed = drawn_condition("inpaint", truth, 4, torch.Generator().manual_seed(0))[:, :3]
    assert r["rows"]["baseline"]["psnr"] == pytest.approx(float(psnr(holed, truth).mean()))


def test_train_ends_by_naming_the_flags_an_inpaint_model_samples_with(tmp_path, capsys,
                                                                      cpu_accelerate) -> None:
    from diffunet import cli
    from helpers import tiny_run

    assert cli.main(["train", *tiny_run(), "data.task=inpaint", "train.max_steps=1",
                     "train.sample_every=10", "--out-dir", str(tmp_path / "run"),
                     "--no-progress"]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("sample from it with: diffunet sample ")
    assert last.endswith(" --cond-image IMAGES --mask MASKS")
