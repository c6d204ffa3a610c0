"""One conditioning input (issue 26, first part): the condition mapping's null value, training
dropout and guidance doubling (diffunet/conditioning.py), the UNet's condition image
(``unet.cond_channels``), classifier-free guidance on it through ``sample(cond=...)``, its
model file and its diffusers export as wider input channels."""

from __future__ import annotations

import math

import pytest
import torch

import diffunet
from diffunet import UNet, UNetConfig
from diffunet.checkpoint import load_model_file
from diffunet.conditioning import doubled, make_condition, null_condition, with_dropout
from diffunet.config import ScheduleConfig
from diffunet.errors import ConfigError, UsageError
from diffunet.formulations import make_schedule
from diffunet.resources import network_size
from helpers import perturbed, tiny_net


def _net(cond_channels: int = 2, **overrides) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(**tiny_net(8, cond_channels=cond_channels, **overrides))).eval()


def test_a_new_conditional_unet_ignores_its_condition_image() -> None:
    net = _net()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 500, 999])
    net = perturbed(net, seed=1)  # every weight but the condition's input weights
    with torch.no_grad():
        net.conv_in.weight[:, 3:].zero_()
        plain = net(x, t)
        assert torch.equal(net(x, t, cond_image=torch.randn(3, 2, 8, 8)), plain)
        net.conv_in.weight[:, 3:].normal_()
        assert not torch.allclose(net(x, t, cond_image=torch.randn(3, 2, 8, 8)), plain)
        # None is the null condition: a zero image
        assert torch.equal(net(x, t), net(x, t, cond_image=torch.zeros(3, 2, 8, 8)))
    assert _net().conv_in.weight[:, 3:].abs().max() == 0  # zero at initialisation


def test_the_condition_image_is_checked() -> None:
    net, x, t = _net(), torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"cond_image must have shape \(2, 2, 8, 8\)"):
        net(x, t, cond_image=torch.zeros(2, 3, 8, 8))
    with pytest.raises(ConfigError, match="unet.cond_channels"):
        _net(0)(x, t, cond_image=torch.zeros(2, 2, 8, 8))
    with pytest.raises(ConfigError, match="unet.cond_channels: must be 0"):
        UNetConfig(cond_channels=-1)


def test_the_parameter_count_and_the_model_file_know_the_condition_channels(tmp_path) -> None:
    net = _net(3)
    assert network_size(net.config).parameters == sum(p.numel() for p in net.parameters())
    schedule = make_schedule(ScheduleConfig(formulation="flow"))
    diffunet.save_model(tmp_path / "m.safetensors", perturbed(net), schedule)
    loaded = load_model_file(tmp_path / "m.safetensors")
    assert loaded.net.config.cond_channels == 3
    x, t, c = torch.randn(2, 3, 8, 8), torch.tensor([5, 900]), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.net(x, t, cond_image=c), net(x, t, cond_image=c))


def test_dropout_and_doubling_take_the_null_of_every_key() -> None:
    cond = {"class_labels": torch.tensor([0, 1, 2]), "cond_image": torch.ones(3, 2, 4, 4)}
    drop = torch.tensor([False, True, False])
    out = with_dropout(cond, drop, lambda: 7)
    assert out["class_labels"].tolist() == [0, 7, 2]
    assert out["cond_image"][1].abs().max() == 0 and torch.equal(out["cond_image"][0],
                                                                 cond["cond_image"][0])
    both = doubled(cond, lambda: 7)
    assert both["class_labels"].tolist() == [0, 1, 2, 7, 7, 7]
    assert torch.equal(both["cond_image"][:3], cond["cond_image"])
    assert both["cond_image"][3:].abs().max() == 0
    # the null label is asked for only where there are labels
    assert null_condition({"cond_image": cond["cond_image"]}, lambda: 1 / 0)["cond_image"].sum() == 0


def test_a_condition_is_one_mapping_of_known_keys() -> None:
    labels = torch.tensor([1, 2], dtype=torch.int32)
    assert make_condition(None, labels)["class_labels"].dtype == torch.int64
    with pytest.raises(UsageError, match="unknown key"):
        make_condition({"text": torch.zeros(2)})
    with pytest.raises(UsageError, match="given twice"):
        make_condition({"class_labels": labels}, labels)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m"])
def test_guidance_on_a_condition_image_is_the_hand_written_combination(sampler: str) -> None:
    """sample(cond={"cond_image": c}, guidance_scale=w) = the same sampler on the network
    F_null + w (F_c - F_null), F_null the network with a zero image."""
    net = perturbed(_net(), seed=2)
    with torch.no_grad():
        net.conv_in.weight[:, 3:].normal_(std=0.3)
    schedule = make_schedule(ScheduleConfig(formulation="vp", prediction_type="v"))
    c = torch.randn(2, 2, 8, 8)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    w = 2.5

    def by_hand(x, t, class_labels=None):
        with_c, without = net(x, t, cond_image=c), net(x, t)
        return without + w * (with_c - without)

    with torch.no_grad():
        ours = diffunet.sample(net, schedule, x_T, sampler=sampler, num_steps=5,
                               cond={"cond_image": c}, guidance_scale=w)
        theirs = diffunet.sample(by_hand, schedule, x_T, sampler=sampler, num_steps=5)
        unguided = diffunet.sample(net, schedule, x_T, sampler=sampler, num_steps=5,
                                   cond={"cond_image": c})
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, unguided, atol=1e-3)


def test_a_conditional_unet_exports_as_wider_input_channels(tmp_path) -> None:
    """diffusers' UNet2DModel holds the concatenation as in_channels = 3 + 2: fed [x, c] it is
    the same function as net(x, t, cond_image=c)."""
    diffusers = pytest.importorskip("diffusers")
    from diffunet.interop import export_diffusers

    net = perturbed(_net(), seed=4)
    diffunet.save_model(tmp_path / "m.safetensors", net,
                        make_schedule(ScheduleConfig(prediction_type="v")))
    export_diffusers(tmp_path / "m.safetensors", tmp_path / "pipe")
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "pipe", subfolder="unet").eval()
    assert (theirs.config.in_channels, theirs.config.out_channels) == (5, 3)
    x, c, t = torch.randn(2, 3, 8, 8), torch.randn(2, 2, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        torch.testing.assert_close(theirs(torch.cat([x, c], 1), t).sample,
                                   net(x, t, cond_image=c), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("formulation", ["vp", "edm", "flow"])
def test_every_formulations_loss_gives_the_network_the_whole_condition(formulation: str) -> None:
    seen: dict = {}

    def net(x, t, class_labels=None, cond_image=None):
        seen.update(class_labels=class_labels, cond_image=cond_image)
        return torch.zeros_like(x)

    schedule = make_schedule(ScheduleConfig(formulation=formulation))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 8, 8, generator=g)
    levels = schedule.sample_levels(2, g)
    cond = {"class_labels": torch.tensor([1, 0]), "cond_image": torch.randn(2, 2, 8, 8)}
    schedule.loss(net, x0, torch.randn_like(x0), levels, cond=cond)
    assert seen["class_labels"] is cond["class_labels"] and seen["cond_image"] is cond["cond_image"]
    schedule.loss(net, x0, torch.randn_like(x0), levels, class_labels=cond["class_labels"])
    assert seen["cond_image"] is None and seen["class_labels"] is cond["class_labels"]
    with pytest.raises(UsageError, match="given twice"):
        schedule.loss(net, x0, torch.randn_like(x0), levels, cond=cond,
                      class_labels=cond["class_labels"])


# ---------------------------------------------------------------------------------------------
# Tasks as data transforms (diffunet/tasks.py) and their training runs


def test_superres_condition_is_the_image_down_and_up_again() -> None:
    import torch.nn.functional as F

    from diffunet.tasks import condition_image, downscale

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    low = F.interpolate(x, size=(4, 4), mode="bicubic", antialias=True).clamp(-1, 1)
    assert torch.allclose(downscale(x, 4), low)
    c = condition_image("superres", x, 4)
    assert c.shape == x.shape and c.abs().max() <= 1
    up = F.interpolate(low, size=(16, 16), mode="bicubic").clamp(-1, 1)
    assert torch.allclose(c, up)
    # flips commute with it: a flipped image's condition is the flipped condition
    assert torch.allclose(condition_image("superres", x.flip(-1), 4), c.flip(-1), atol=1e-6)
    # a constant image is its own low-resolution version
    flat = torch.full((1, 3, 16, 16), 0.25)
    assert torch.allclose(condition_image("superres", flat, 4), flat, atol=1e-6)


def test_colorize_condition_is_the_bt601_luminance() -> None:
    from diffunet.tasks import condition_image

    x = torch.zeros(1, 3, 2, 2)
    x[0, 0], x[0, 1], x[0, 2] = 1.0, -1.0, 0.5
    y = condition_image("colorize", x)
    assert y.shape == (1, 1, 2, 2)
    assert torch.allclose(y, torch.full_like(y, 0.299 - 0.587 + 0.114 * 0.5))
    with pytest.raises(ValueError, match="RGB"):
        condition_image("colorize", torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("overrides, words", [
    (["data.task=superres", "unet.cond_channels=1"],
     "unet.cond_channels: 1 does not fit data.task = 'superres'"),
    (["unet.cond_channels=2"], "unet.cond_channels: 2 condition-image channels, but data.task is "
                               "unset"),
    (["data.task=superres", "data.superres_factor=3"], "data.superres_factor: 3 does not divide"),
    (["data.task=superres", "data.superres_factor=1"], "data.superres_factor: must be in [2, 16]"),
    (["data.task=colorize", "unet.in_channels=1"], "colorize needs RGB images"),
    (["data.task=deblur"], "data.task"),
], ids=["channels", "no-task", "factor", "factor-range", "colorize-grey", "unknown"])
def test_task_settings_that_do_not_fit_are_one_line(overrides, words, capsys) -> None:
    from diffunet import cli

    assert cli.main(["train", *overrides, "--out-dir", "unused"]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.splitlines()) == 1, err


def test_the_unet_follows_the_task_and_a_latent_task_is_refused(tmp_path) -> None:
    from diffunet.config import load_config

    assert load_config(None, ["data.task=superres"]).unet.cond_channels == 3
    assert load_config(None, ["data.task=colorize"]).unet.cond_channels == 1
    with pytest.raises(ConfigError, match="on a latent run"):
        load_config(None, ["data.task=superres", "vae.path=builtin-shapes",
                           "data.image_size=64", "unet.image_size=16", "unet.in_channels=4"])


def test_a_task_steps_inputs_are_the_same_on_any_number_of_processes() -> None:
    """The condition images and their dropout are drawn for the global batch and sliced, so two
    processes' halves are one process's whole (exact resume: tests/test_training.py)."""
    from diffunet.config import load_config
    from diffunet.data_space import PixelSpace
    from diffunet.training import _step_inputs

    cfg = load_config(None, ["data.task=superres", "train.batch_size=8", "unet.num_classes=4",
                             "train.label_dropout=0.5"])
    schedule = make_schedule(cfg.schedule)
    batch = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.arange(8) % 4

    def run(mine: slice):
        gen = torch.Generator().manual_seed(5)
        return _step_inputs(cfg, schedule, PixelSpace(), gen, batch[mine], labels[mine], mine)

    whole = run(slice(0, 8))
    halves = [run(slice(0, 4)), run(slice(4, 8))]
    for key in ("cond_image", "class_labels"):
        assert torch.equal(torch.cat([h[3][key] for h in halves]), whole[3][key])
    x0, cond = whole[0], whole[3]
    dropped = cond["class_labels"] == 4
    assert 0 < int(dropped.sum()) < 8  # label_dropout 0.5 dropped some rows, not all
    # a dropped row loses its whole condition; a kept row's condition is its (flipped) image's
    assert cond["cond_image"][dropped].abs().max() == 0
    from diffunet.tasks import condition_image
    assert torch.allclose(cond["cond_image"][~dropped], condition_image("superres", x0)[~dropped])


@pytest.fixture(scope="module")
def superres_run(tmp_path_factory):
    """A 2-step superres run of the tiny net at 16x16 (4x4 inputs), its messages."""
    from processes import reset_accelerate_state

    from diffunet.config import load_config
    from diffunet.training import train
    from helpers import tiny_run

    out = tmp_path_factory.mktemp("superres") / "run"
    cfg = load_config(None, [*tiny_run(), "data.task=superres", "train.max_steps=2",
                             "train.sample_every=2", "sample.num_images=4", "sample.num_steps=2"])
    messages: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELERATE_USE_CPU", "1")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        reset_accelerate_state()
        try:
            train(cfg, out, progress=False, say=messages.append)
        finally:
            reset_accelerate_state()
            torch.set_num_threads(threads)
    return out, messages


def test_a_superres_run_previews_condition_sample_and_target(superres_run) -> None:
    from PIL import Image

    out, messages = superres_run
    assert any(m.startswith("task: superres x4: each image downscaled to 4x4") for m in messages)
    grid = Image.open(out / "samples" / "step0000002.png")
    # 4 images as (condition | sample | target) triples, 2 triples a row: 6 x 2 tiles of 16 px
    assert grid.size == (6 * 18 + 2, 2 * 18 + 2)
    model = out / "weights" / "model_step0000002.safetensors"
    assert load_model_file(model).net.config.cond_channels == 3
    from diffunet.checkpoint import read_metadata
    assert read_metadata(model)["task"] == {"name": "superres", "superres_factor": 4}


def _inputs(folder, size: int, count: int, mode: str = "RGB"):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.random.RandomState(i).randint(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(folder / f"in{i}.png")
    return folder


def _sample_cli(*args: str) -> int:
    from diffunet import cli

    return cli.main(["sample", *args, "--no-progress", "--steps", "2"])


def test_sample_draws_per_input_images_from_each_condition_and_resumes(superres_run, tmp_path,
                                                                         capsys,
                                                                         cpu_accelerate) -> None:
    import json

    from PIL import Image

    model = str(superres_run[0] / "weights" / "model_step0000002.safetensors")
    low = _inputs(tmp_path / "low", 4, 3)
    out = tmp_path / "s"
    assert _sample_cli(model, "--cond-image", str(low), "--per-input", "2", "--out-dir",
                       str(out)) == 0
    assert "conditional: 3 inputs (4x4 low-resolution RGB images" in capsys.readouterr().err
    names = sorted(p.name for p in out.glob("0*.png"))
    assert names == [f"{i:06d}.png" for i in range(6)]
    assert Image.open(out / "000005.png").size == (16, 16)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["settings"]["cond_images"]) == 3 and manifest["settings"]["per_input"] == 2
    # the same inputs and seeds draw the same images; a rerun resumes
    again = tmp_path / "again"
    assert _sample_cli(model, "--cond-image", str(low), "--per-input", "2", "--out-dir",
                       str(again)) == 0
    assert all((out / n).read_bytes() == (again / n).read_bytes() for n in names)
    assert _sample_cli(model, "--cond-image", str(low), "--per-input", "2", "--out-dir",
                       str(out)) == 0
    assert "6 were already there" in capsys.readouterr().err
    # another input under the same name is another run
    _inputs(tmp_path / "other", 4, 4)
    (low / "in0.png").write_bytes((tmp_path / "other" / "in3.png").read_bytes())
    assert _sample_cli(model, "--cond-image", str(low), "--per-input", "2", "--out-dir",
                       str(out)) == 2
    assert "condition image 0 sha256" in capsys.readouterr().err


def test_the_condition_reaches_the_samples(tmp_path, cpu_accelerate) -> None:
    """A superres x2 model file (8x8, its condition weights non-zero): two inputs, the same
    seed, other images; the same input twice, the same image."""
    from PIL import Image
    import numpy as np

    net = perturbed(_net(3), seed=6)
    with torch.no_grad():
        net.conv_in.weight[:, 3:].normal_(std=0.5)
    model = tmp_path / "sr.safetensors"
    diffunet.save_model(model, net, make_schedule(ScheduleConfig(formulation="flow")),
                        extra={"task": {"name": "superres", "superres_factor": 2}})
    low = _inputs(tmp_path / "low", 4, 2)
    for name in ("in0", "in1"):
        assert _sample_cli(str(model), "--cond-image", str(low / f"{name}.png"), "--out-dir",
                           str(tmp_path / name)) == 0
    a, b = (np.asarray(Image.open(tmp_path / n / "000000.png"), dtype=float) for n in ("in0", "in1"))
    assert a.shape == (8, 8, 3) and np.abs(a - b).max() > 10
    assert _sample_cli(str(model), "--cond-image", str(low), "--out-dir",
                       str(tmp_path / "both")) == 0  # the folder: input 0 then input 1
    assert (tmp_path / "both" / "000000.png").read_bytes() == \
        (tmp_path / "in0" / "000000.png").read_bytes()


@pytest.mark.parametrize("case", ["no-cond", "unconditional", "size", "mode", "num-samples",
                                  "per-input-alone", "out-dir-is-the-inputs", "empty-folder"])
def test_bad_condition_input_is_one_line(case, superres_run, tmp_path, capsys,
                                         cpu_accelerate) -> None:
    model = str(superres_run[0] / "weights" / "model_step0000002.safetensors")
    low = _inputs(tmp_path / "low", 4, 2)
    args = {
        "no-cond": [model],
        "unconditional": [str(_plain_model(tmp_path)), "--cond-image", str(low)],
        "size": [model, "--cond-image", str(_inputs(tmp_path / "big", 16, 1))],
        "mode": [model, "--cond-image", str(_inputs(tmp_path / "grey", 4, 1, "L"))],
        "num-samples": [model, "--cond-image", str(low), "--num-samples", "4"],
        "per-input-alone": [model, "--per-input", "2"],
        "out-dir-is-the-inputs": [model, "--cond-image", str(low), "--out-dir", str(low)],
        "empty-folder": [model, "--cond-image", str(tmp_path / "empty")],
    }[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    if "--out-dir" not in args:
        args += ["--out-dir", str(tmp_path / "s")]
    before = sorted(p.name for p in low.iterdir())
    assert _sample_cli(*args) == 2
    err = capsys.readouterr().err
    words = {"no-cond": "give --cond-image", "unconditional": "takes no condition image",
             "size": "is 16x16 pixels; this model takes 4x4", "mode": "is a mode L image",
             "num-samples": "drop --num-samples", "per-input-alone": "--per-input needs",
             "out-dir-is-the-inputs": "holds files diffunet did not write",
             "empty-folder": "no image"}[case]
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()
    assert sorted(p.name for p in low.iterdir()) == before


def _plain_model(tmp_path):
    net = perturbed(_net(0), seed=5)
    path = tmp_path / "plain.safetensors"
    diffunet.save_model(path, net, make_schedule(ScheduleConfig(formulation="flow")))
    return path


# ---------------------------------------------------------------------------------------------
# eval paired (diffunet/paired_eval.py)


def test_psnr_and_ssim_are_the_textbook_numbers() -> None:
    from diffunet.paired_eval import psnr, ssim

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 1.6 - 0.8
    # +0.2 in [-1, 1] is +0.1 on [0, 1] pixels: MSE 0.01, 20 dB
    torch.testing.assert_close(psnr(x + 0.2, x), torch.full((2,), 20.0, dtype=torch.float64))
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    # an exact match is 8-bit rounding's PSNR, 10 log10(12 * 255^2) = 58.9 dB, not inf
    assert float(psnr(x, x)[0]) == pytest.approx(10 * math.log10(12 * 255 ** 2))
    # constant images a, b on [0, 1]: no variance, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.25, 0.75
    flat_a, flat_b = torch.full((1, 1, 16, 16), 2 * a - 1), torch.full((1, 1, 16, 16), 2 * b - 1)
    want = (2 * a * b + 1e-4) / (a * a + b * b + 1e-4)
    assert float(ssim(flat_a, flat_b)) == pytest.approx(want, rel=1e-9)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    noisier = (x + 0.6 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert (ssim(noisier, x) < ssim(noisy, x)).all() and (ssim(noisy, x) < 1).all()


def test_eval_paired_scores_samples_and_the_bicubic_baseline(tmp_path, capsys,
                                                             cpu_accelerate) -> None:
    import json

    from diffunet import cli

    net = perturbed(_net(3), seed=7)
    model = tmp_path / "sr.safetensors"
    diffunet.save_model(model, net, make_schedule(ScheduleConfig(formulation="flow")),
                        extra={"task": {"name": "superres", "superres_factor": 2}})
    assert cli.main(["eval", "paired", str(model), "--num-images", "6", "--steps", "2",
                     "--json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| bicubic upscaling |" in text and "superres x2: 6 built-in images of seed 1" in text
    r = json.loads((tmp_path / "r.json").read_text())
    from diffunet.data import BuiltinShapes
    from diffunet.paired_eval import psnr
    from diffunet.tasks import condition_image
    truth, _ = BuiltinShapes(6, 8, 3, seed=1).render(range(6))
    want = float(psnr(condition_image("superres", truth, 2), truth).mean())
    assert r["rows"]["baseline"]["psnr"] == pytest.approx(want)
    assert 0 < r["rows"]["samples"]["ssim"] < 1 and r["num_steps"] == 2
    # a model without a task
    assert cli.main(["eval", "paired", str(_plain_model(tmp_path)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "has no task" in err and len(err.strip().splitlines()) == 1


def test_eval_nfe_and_eval_ema_send_a_conditional_model_to_eval_paired(superres_run, capsys,
                                                                       cpu_accelerate) -> None:
    from diffunet import cli

    run = superres_run[0]
    assert cli.main(["eval", "nfe", str(run / "weights" / "model_step0000002.safetensors"),
                     "--num-images", "4", "--nfe", "2", "--no-progress"]) == 2
    assert cli.main(["eval", "ema", str(run), "--sigma-rel", "0.05", "--num-images", "4",
                     "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("eval paired" in line for line in lines), lines


@pytest.mark.parametrize("record", [{"name": "superres", "superres_factor": 10**12},
                                    {"name": "superres", "superres_factor": "4"},
                                    {"name": "superres", "superres_factor": 3},
                                    {"name": "deblur"}, "superres"],
                         ids=["huge-factor", "string-factor", "factor-not-dividing",
                              "unknown-task", "not-a-table"])
def test_a_damaged_task_record_is_one_line_for_sample_and_eval_paired(record, tmp_path, capsys,
                                                                      cpu_accelerate) -> None:
    from diffunet import cli

    model = tmp_path / "m.safetensors"
    diffunet.save_model(model, perturbed(_net(3)), make_schedule(ScheduleConfig(formulation="flow")),
                        extra={"task": record})
    low = _inputs(tmp_path / "low", 4, 1)
    assert _sample_cli(str(model), "--cond-image", str(low), "--out-dir", str(tmp_path / "s")) == 2
    assert cli.main(["eval", "paired", str(model), "--num-images", "2", "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("task record is damaged" in line for line in lines), lines
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flags, words", [(["--batch-size", "0"], "--batch-size must be"),
                                          (["--num-images", "1"], "--num-images must be in [2"),
                                          (["--num-images", str(10**12)], "--num-images must be")])
def test_eval_paired_refuses_sizes_it_cannot_run(flags, words, tmp_path, capsys) -> None:
    from diffunet import cli

    model = tmp_path / "sr.safetensors"
    diffunet.save_model(model, perturbed(_net(3)), make_schedule(ScheduleConfig(formulation="flow")),
                        extra={"task": {"name": "superres", "superres_factor": 2}})
    assert cli.main(["eval", "paired", str(model), *flags, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err


def test_eval_paired_reports_lpips_where_it_is_installed_and_says_why_not_otherwise(
        tmp_path, capsys, monkeypatch, cpu_accelerate) -> None:
    """Without the lpips package (or its AlexNet weights, which this machine cannot download)
    the table says why; with it, each row's mean LPIPS is the network's per-image distance."""
    import json
    import sys
    import types

    from diffunet import cli

    model = tmp_path / "sr.safetensors"
    diffunet.save_model(model, perturbed(_net(3)), make_schedule(ScheduleConfig(formulation="flow")),
                        extra={"task": {"name": "superres", "superres_factor": 2}})
    args = ["eval", "paired", str(model), "--num-images", "4", "--steps", "2", "--no-progress",
            "--json", str(tmp_path / "r.json")]
    monkeypatch.setitem(sys.modules, "lpips", None)  # not installed
    assert cli.main(args) == 0
    assert "LPIPS not computed: pip install lpips" in capsys.readouterr().out
    assert "lpips" not in json.loads((tmp_path / "r.json").read_text())["rows"]["samples"]

    class FakeLPIPS(torch.nn.Module):  # the mean absolute difference stands in for AlexNet
        def __init__(self, net: str, verbose: bool) -> None:
            super().__init__()
            assert net == "alex"

        def forward(self, a, b):
            assert a.shape[1] == 3
            return (a - b).abs().mean((1, 2, 3), keepdim=True)

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    assert cli.main(args) == 0
    assert "AlexNet's weights are not at" in capsys.readouterr().out
    from torchvision.models import AlexNet_Weights
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / AlexNet_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]).write_bytes(b"")
    assert cli.main(args) == 0
    assert "| LPIPS |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    from diffunet.data import BuiltinShapes
    from diffunet.tasks import condition_image
    truth, _ = BuiltinShapes(4, 8, 3, seed=1).render(range(4))
    want = float((condition_image("superres", truth, 2) - truth).abs().mean((1, 2, 3)).mean())
    assert rows["baseline"]["lpips"] == pytest.approx(want, rel=1e-5)
    assert rows["samples"]["lpips"] > 0
