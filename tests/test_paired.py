"""The paired task (issue 26): a folder of targets and a folder of inputs paired by name
(``data.task = "paired"``, ``data.cond_path``), flips applied to both, a training run that
resumes exactly, ``diffunet sample --cond-image`` and ``eval paired`` on held-out pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffunet.data import BuiltinShapes, PairedFolders
from diffunet.errors import DataError
from helpers import tiny_run


def _pairs(root, count: int, size: int = 16, start: int = 0, input_ext: str = ".png"):
    """``root/targets`` (built-in shapes, in a sub-folder for odd i) and ``root/inputs`` (each
    target's negative, under the same relative name, with ``input_ext``)."""
    images, _ = BuiltinShapes(start + count, size, 3, seed=2).render(range(start, start + count))
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    for i, p in enumerate(pixels.numpy()):
        rel = f"odd/p{start + i}" if i % 2 else f"p{start + i}"
        for folder, arr, ext in (("targets", p, ".png"), ("inputs", 255 - p, input_ext)):
            path = root / folder / (rel + ext)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
    return root / "targets", root / "inputs"


def test_paired_folders_pair_by_name_and_stack_target_and_input(tmp_path) -> None:
    targets, inputs = _pairs(tmp_path, 4, input_ext=".bmp")
    data = PairedFolders(targets, inputs, 16, 3)
    assert len(data) == 4
    item, label = data[1]
    assert item.shape == (6, 16, 16) and label == -1
    # the input is the target's negative: a pair, not two unrelated images
    torch.testing.assert_close(item[3:], -item[:3], atol=1 / 127.5, rtol=0)


@pytest.mark.parametrize("case, words", [
    ("target-alone", "has no input for the target p4"),
    ("input-alone", "the input p4 has no target of the same name"),
    ("two-inputs", "are both the input of p0"),
])
def test_unpaired_folders_are_one_line(case, words, tmp_path) -> None:
    targets, inputs = _pairs(tmp_path, 4)
    if case == "target-alone":
        _pairs(tmp_path / "more", 1, start=4)
        (tmp_path / "more" / "targets" / "p4.png").rename(targets / "p4.png")
    elif case == "input-alone":
        _pairs(tmp_path / "more", 1, start=4)
        (tmp_path / "more" / "inputs" / "p4.png").rename(inputs / "p4.png")
    else:
        Image.open(inputs / "p0.png").save(inputs / "p0.bmp")
    with pytest.raises(DataError, match=words):
        PairedFolders(targets, inputs, 16, 3)


@pytest.mark.parametrize("overrides, words", [
    (["data.task=paired"], "data.task: paired pairs two folders by name"),
    (["data.cond_path=x"], "data.cond_path: is the input folder of data.task = 'paired', but "
                           "data.task is unset"),
    (["data.task=paired", "data.source=folder", "data.path=same", "data.cond_path=same"],
     "data.cond_path: same is data.path itself"),
    (["data.task=paired", "data.source=folder", "data.path=t", "data.cond_path=i",
      "unet.cond_channels=1"], "unet.cond_channels: 1 does not fit data.task = 'paired'"),
], ids=["no-folders", "cond-path-alone", "same-folder", "channels"])
def test_paired_settings_that_do_not_fit_are_one_line(overrides, words, capsys) -> None:
    from diffunet import cli

    assert cli.main(["train", *overrides, "--out-dir", "unused"]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.splitlines()) == 1, err


def test_a_paired_step_flips_the_input_with_its_target_on_any_number_of_processes() -> None:
    from diffunet.config import load_config
    from diffunet.data_space import PixelSpace
    from diffunet.formulations import make_schedule
    from diffunet.training import _step_inputs

    cfg = load_config(None, ["data.task=paired", "data.source=folder", "data.path=t",
                             "data.cond_path=i", "train.batch_size=8", "train.label_dropout=0"])
    assert cfg.unet.cond_channels == 3
    schedule = make_schedule(cfg.schedule)
    target = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    batch = torch.cat([target, -target], 1)  # each item: the target and its input

    def run(mine: slice):
        gen = torch.Generator().manual_seed(5)
        return _step_inputs(cfg, schedule, PixelSpace(), gen, batch[mine],
                            torch.zeros(8, dtype=torch.long)[mine], mine)

    x0, noise, _, cond = run(slice(0, 8))
    assert x0.shape == noise.shape == (8, 3, 32, 32)
    torch.testing.assert_close(cond["cond_image"], -x0)  # flipped alike, row by row
    flipped = [not torch.equal(x0[b], target[b]) for b in range(8)]
    assert 0 < sum(flipped) < 8  # some rows were flipped, some not
    halves = [run(slice(0, 4)), run(slice(4, 8))]
    assert torch.equal(torch.cat([h[3]["cond_image"] for h in halves]), cond["cond_image"])


def _train(cfg_items, out, resume: bool = False):
    from diffunet.config import load_config
    from diffunet.training import train

    messages: list[str] = []
    train(load_config(None, cfg_items), out, resume=resume, progress=False,
          say=messages.append)
    return messages


def test_a_paired_run_trains_resumes_exactly_samples_and_is_judged(tmp_path, capsys,
                                                                  cpu_accelerate) -> None:
    from diffunet import cli
    from diffunet.checkpoint import read_metadata
    from diffunet.paired_eval import psnr

    targets, inputs = _pairs(tmp_path / "train", 8)
    common = [*tiny_run(), "data.source=folder", f"data.path={targets}", "data.task=paired",
              f"data.cond_path={inputs}", "train.save_every=2", "train.sample_every=4",
              "train.label_dropout=0.5"]
    messages = _train([*common, "train.max_steps=4"], tmp_path / "full")
    assert any(m.startswith("task: paired: each image's input of the same name") for m in
               messages)
    model = tmp_path / "full" / "weights" / "model_step0000004.safetensors"
    assert read_metadata(model)["task"] == {"name": "paired"}
    grid = Image.open(tmp_path / "full" / "samples" / "step0000004.png")
    assert grid.size == (6 * 18 + 2, 2 * 18 + 2)  # 4 (input | sample | target) triples
    # two steps, then two more: the same weights as four in one go
    _train([*common, "train.max_steps=2"], tmp_path / "half")
    _train([*common, "train.max_steps=4"], tmp_path / "half", resume=True)
    again = tmp_path / "half" / "weights" / "model_step0000004.safetensors"
    from safetensors.torch import load_file
    a, b = load_file(model), load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # sample: one output per input image
    out = tmp_path / "s"
    assert cli.main(["sample", str(model), "--cond-image", str(inputs), "--out-dir", str(out),
                     "--steps", "2", "--no-progress"]) == 0
    assert "conditional: 8 inputs (16x16 RGB input images)" in capsys.readouterr().err
    assert len(list(out.glob("0*.png"))) == 8

    # eval paired on held-out pairs: the baseline is the input itself
    held_t, held_i = _pairs(tmp_path / "held", 4, start=100)
    assert cli.main(["eval", "paired", str(model), f"data.path={held_t}",
                     f"data.cond_path={held_i}", "--num-images", "4", "--steps", "2",
                     "--json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| the input image itself |" in text and "recognisable" not in text
    r = json.loads((tmp_path / "r.json").read_text())
    pairs = PairedFolders(held_t, held_i, 16, 3)
    stacked = torch.stack([pairs[i][0] for i in range(4)])
    want = float(psnr(stacked[:, 3:], stacked[:, :3]).mean())
    assert r["rows"]["baseline"]["psnr"] == pytest.approx(want)
    assert np.isfinite(r["rows"]["samples"]["psnr"])


def test_a_missing_input_folder_is_one_line_naming_its_key(tmp_path, capsys,
                                                         cpu_accelerate) -> None:
    from diffunet import cli

    targets, _ = _pairs(tmp_path, 2)
    args = ["train", *tiny_run(), "data.source=folder", f"data.path={targets}",
            "data.task=paired", f"data.cond_path={tmp_path / 'nowhere'}"]
    assert cli.main([*args, "--out-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    assert cli.main([*args, "--dry-run", "--out-dir", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("data.cond_path: " in ln and "does not exist" in ln
                                   for ln in lines), lines
    assert not (tmp_path / "run" / "state").exists()


def test_pair_by_name_orders_the_secondaries_and_refuses_every_unpaired_name() -> None:
    """The one pairing of --mask folders and the paired task's inputs."""
    from pathlib import Path

    from diffunet.data import pair_by_name

    def pair(primary, secondary):
        return pair_by_name([Path(p) for p in primary], [Path(s) for s in secondary],
                            where="--mask M", noun="mask", primary_noun="init image",
                            primary_where="I")

    assert pair(["b.jpg", "a/x.png"], ["a/x.bmp", "b.png"]) == [1, 0]
    for primary, secondary, words in [
        (["a.png"], ["a.png", "a.jpg"], "--mask M: a.png and a.jpg are both the mask of a"),
        (["a.png", "a.jpg"], ["a.png"], "I: two init images are named a"),
        (["a.png", "b.png"], ["a.png"], "--mask M has no mask for the init image b.png"),
        (["a.png"], ["a.png", "c/d.png"], "--mask M: the mask c/d has no init image of the "
                                          "same name in I"),
    ]:
        with pytest.raises(DataError, match=words):
            pair(primary, secondary)
