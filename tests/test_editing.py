"""Image editing through `diffunet sample` (``--init-image``, ``--strength``, ``--mask``,
``--resample``) and the sampler/sigma-grid options of the command line, on a tiny CPU model.

Mask convention (diffusers' inpainting): white (255) = repaint, black (0) = keep.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import diffunet
from diffunet.errors import UsageError
from diffunet import NoiseSchedule, ScheduleConfig, UNet, UNetConfig
from diffunet.cli import main
from diffunet.config import SampleConfig, load_config, to_dict
from diffunet.errors import ConfigError
from diffunet.sampling import MANIFEST, SampleOptions, image_name, sample_settings

T = 100
S = 8  # image side

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """A tiny RGB model and the input images: three init images in a folder, one mask per
    init image in a folder of the same names, one mask file (left half keep, right half
    repaint)."""
    d = tmp_path_factory.mktemp("editing")
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=S, in_channels=3, base_channels=8, channel_mults=(1, 2),
                          num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_groups=4))
    with torch.no_grad():  # a fresh UNet's zero output layer predicts eps = 0 only
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = d / "model.safetensors"
    diffunet.save_model(model, net, NoiseSchedule(ScheduleConfig(num_train_timesteps=T)))
    rng = np.random.default_rng(0)
    inits = d / "inits"
    inits.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (S, S, 3), dtype=np.uint8)).save(inits / f"{name}.png")
    half = np.zeros((S, S), dtype=np.uint8)
    half[:, S // 2:] = 255  # right half white: repaint
    mask = d / "mask.png"
    Image.fromarray(half).save(mask)
    masks = d / "masks"
    masks.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(half).save(masks / f"{name}.png")
    return SimpleNamespace(d=d, model=model, inits=inits, init=inits / "a.png", mask=mask,
                           masks=masks, keep=half == 0)


def run_cli(args: list, capsys) -> tuple[int, str]:
    try:
        code = main(["sample", *map(str, args), "--no-progress"])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def pixels(folder: Path, n: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / image_name(i))).astype(np.int16)
                     for i in range(n)])


def png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Image-to-image


def test_img2img_folder_gives_one_image_per_input_independent_of_batch_size(world, tmp_path,
                                                                             capsys):
    common = [world.model, "--init-image", world.inits, "--strength", 0.6, "--steps", 5,
              "--sampler", "ddim", "--eta", 1.0]
    one = tmp_path / "one"
    code, err = run_cli([*common, "--out-dir", one, "--batch-size", 1], capsys)
    assert code == 0, err
    assert "wrote 3 image(s)" in err  # --num-samples defaults to the folder's 3 images
    m = json.loads((one / MANIFEST).read_text())
    names = sorted(world.inits.iterdir())
    assert m["num_samples"] == 3
    assert m["settings"]["init_images"] == [sha(p) for p in names]
    assert m["settings"]["masks"] is None and m["settings"]["strength"] == 0.6
    assert [e["init"] for e in m["edit"]["inputs"]] == [str(p) for p in names]
    assert m["edit"]["steps_run"] == 3 and m["edit"]["steps_skipped"] == 2  # int(5 x 0.6) = 3
    three = tmp_path / "three"
    code, err = run_cli([*common, "--out-dir", three, "--batch-size", 3], capsys)
    assert code == 0, err
    assert np.abs(pixels(one, 3) - pixels(three, 3)).max() <= 1  # batch size changes nothing
    # the same seed gives the same files; rerunning the same command resumes (nothing drawn)
    before = {i: (one / image_name(i)).read_bytes() for i in range(3)}
    code, err = run_cli([*common, "--out-dir", one], capsys)
    assert code == 0 and "wrote 0 image(s)" in err
    assert {i: (one / image_name(i)).read_bytes() for i in range(3)} == before
    # more images than inputs cycle through them: image 3 is input 0 with seed + 3
    cycled = tmp_path / "cycled"
    code, err = run_cli([*common, "--out-dir", cycled, "--num-samples", 4], capsys)
    assert code == 0, err
    m = json.loads((cycled / MANIFEST).read_text())
    assert m["num_samples"] == 4 and "inputs[i mod 3]" in m["edit"]["rule"]
    assert np.array_equal(pixels(cycled, 3), pixels(one, 3))


def test_small_strength_stays_close_to_the_init_image(world, tmp_path, capsys):
    init = np.asarray(Image.open(world.init)).astype(np.int16)
    dist = {}
    for strength in (0.1, 1.0):
        out = tmp_path / f"s{strength}"
        code, err = run_cli([world.model, "--init-image", world.init, "--strength", strength,
                             "--steps", 10, "--num-samples", 2, "--out-dir", out], capsys)
        assert code == 0, err
        dist[strength] = np.abs(pixels(out, 2) - init).mean()
    assert dist[0.1] < 0.25 * dist[1.0], dist


# ---------------------------------------------------------------------------------------------
# Inpainting


@pytest.mark.parametrize("sampler,resample", [("ddpm", 1), ("heun", 2)])
def test_inpainting_keeps_the_known_pixels_exactly(world, tmp_path, capsys, sampler, resample):
    out = tmp_path / "out"
    code, err = run_cli([world.model, "--init-image", world.init, "--mask", world.mask,
                         "--sampler", sampler, "--resample", resample, "--steps", 4,
                         "--num-samples", 2, "--out-dir", out], capsys)
    assert code == 0, err
    init = np.asarray(Image.open(world.init)).astype(np.int16)
    got = pixels(out, 2)
    assert (got[:, world.keep] == init[world.keep]).all()  # exactly, in every image
    assert np.abs(got[:, ~world.keep] - init[~world.keep]).mean() > 10  # the rest is generated
    assert not np.array_equal(got[0], got[1])  # each image its own seed
    m = json.loads((out / MANIFEST).read_text())
    assert m["settings"]["masks"] == [sha(world.mask)]
    assert m["settings"]["strength"] == 1.0 and m["settings"]["resample"] == resample
    assert m["edit"]["mask_convention"].startswith("white (255) = repaint")


def test_mask_folder_pairs_by_name(world, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli([world.model, "--init-image", world.inits, "--mask", world.masks,
                         "--steps", 3, "--out-dir", out], capsys)
    assert code == 0, err
    m = json.loads((out / MANIFEST).read_text())
    assert [Path(e["mask"]).name for e in m["edit"]["inputs"]] == ["a.png", "b.png", "c.png"]
    for i, name in enumerate("abc"):
        init = np.asarray(Image.open(world.inits / f"{name}.png")).astype(np.int16)
        assert np.array_equal(pixels(out, 3)[i][world.keep], init[world.keep])


# ---------------------------------------------------------------------------------------------
# Resume and the inputs


def test_resume_with_other_inputs_is_refused(world, tmp_path, capsys):
    inits = tmp_path / "inits"
    inits.mkdir()
    for p in world.inits.iterdir():
        (inits / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    args = [world.model, "--init-image", inits, "--steps", 2, "--out-dir", out]
    assert run_cli(args, capsys)[0] == 0
    before = pixels(out, 3)
    png(inits / "b.png", np.zeros((S, S, 3), dtype=np.uint8))
    code, err = run_cli(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "other settings (init image 1 sha256" in err and "--overwrite" in err
    code, err = run_cli([world.model, "--steps", 2, "--num-samples", 3, "--out-dir", out], capsys)
    assert code == 2 and "3 init image(s) there, no init images now" in err
    assert np.array_equal(pixels(out, 3), before)


def test_outputs_never_replace_an_init_image(world, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    victim = out / image_name(0)
    victim.write_bytes(world.init.read_bytes())
    code, err = run_cli([world.model, "--init-image", victim, "--steps", 2, "--num-samples", 1,
                         "--out-dir", out, "--overwrite"], capsys)
    assert code == 2 and "would replace the input" in err
    assert victim.read_bytes() == world.init.read_bytes()


# ---------------------------------------------------------------------------------------------
# Samplers and sigma grids on the command line


def test_heun_on_karras_sigmas_through_the_cli(world, tmp_path, capsys):
    out = tmp_path / "out"
    args = [world.model, "--sampler", "heun", "--sigmas", "karras", "--steps", 3,
            "--num-samples", 2, "--s-churn", 10, "--s-noise", 1.003, "--out-dir", out]
    code, err = run_cli(args, capsys)
    assert code == 0, err
    m = json.loads((out / MANIFEST).read_text())
    s = m["settings"]
    assert (s["sampler"], s["sigmas"], s["rho"], s["s_churn"], s["s_noise"]) == (
        "heun", "karras", 7.0, 10.0, 1.003)
    assert s["s_tmin"] == 0.0 and s["s_tmax"] is None and s["init_images"] is None
    grid = m["sigma_grid"]
    assert len(grid) == 4 and grid[-1] == 0.0 and grid == sorted(grid, reverse=True)
    code, err = run_cli([*args, "--rho", 5], capsys)  # another grid is another set of images
    assert code == 2 and "rho 7.0 there, 5.0 now" in err


def test_sigma_max_starts_the_grid_and_is_part_of_what_resumes(world, tmp_path, capsys):
    out = tmp_path / "out"
    args = [world.model, "--sigmas", "exponential", "--sigma-max", 1.25, "--steps", 3,
            "--num-samples", 2, "--out-dir", out]
    code, err = run_cli(args, capsys)
    assert code == 0, err
    m = json.loads((out / MANIFEST).read_text())
    assert m["settings"]["sigma_max"] == 1.25 and m["settings"]["sigma_min"] is None
    assert m["sigma_grid"][0] == pytest.approx(1.25) and len(m["sigma_grid"]) == 4
    code, err = run_cli([*args[:4], 1.0, *args[5:]], capsys)  # another start: other images
    assert code == 2 and "sigma_max 1.25 there, 1.0 now" in err


def test_diffunet_sample_starts_at_the_default_top_and_sigma_max_reaches_the_models(
        world, tmp_path, capsys):
    """No flags: DPM++ 2M on the karras grid from the default top (160) of a cosine-schedule
    model whose own top is far higher; --sigma-max reaches that top; a folder drawn on an
    earlier release's default grid (the whole range) is not resumed with the new one."""
    from diffunet.formulations.base import DEFAULT_SIGMA_MAX
    from diffunet.samplers import make_sigmas

    net = diffunet.load_model(world.model)[0]
    cosine = tmp_path / "cosine.safetensors"
    schedule = NoiseSchedule(ScheduleConfig(num_train_timesteps=T, beta_schedule="cosine"))
    diffunet.save_model(cosine, net, schedule)
    top = schedule.grid_range()[1]
    assert top > 10 * DEFAULT_SIGMA_MAX
    out = tmp_path / "out"
    args = [cosine, "--steps", 3, "--num-samples", 1, "--out-dir", out]
    code, err = run_cli(args, capsys)
    assert code == 0, err
    m = json.loads((out / MANIFEST).read_text())
    assert (m["settings"]["sampler"], m["settings"]["sigmas"], m["settings"]["sigma_max"]) == (
        "dpmpp-2m", "karras", None)
    assert m["sigma_grid"][0] == pytest.approx(DEFAULT_SIGMA_MAX, rel=1e-12)
    assert m["sigma_grid"][-2] == pytest.approx(schedule.sigma_min, rel=1e-12)
    m["sigma_grid"] = make_sigmas(schedule, 3, sigma_max=top).tolist()  # the old default
    (out / MANIFEST).write_text(json.dumps(m))
    code, err = run_cli(args, capsys)
    assert code == 2 and "other settings (sigma_grid [" in err
    assert "an earlier release's default grid" in err and "\n" not in err.strip()
    full = tmp_path / "full"
    code, err = run_cli([cosine, "--steps", 3, "--num-samples", 1, "--sigma-max", top,
                         "--out-dir", full], capsys)
    assert code == 0, err
    assert json.loads((full / MANIFEST).read_text())["sigma_grid"][0] == pytest.approx(
        top, rel=1e-12)


def test_stored_sigma_range_is_used_and_dropped_with_a_uniform_grid(world, tmp_path):
    net, schedule, _ = diffunet.load_model(world.model)
    stored = tmp_path / "stored.safetensors"
    diffunet.save_model(stored, net, schedule, extra={"run_config": {"sample": {
        **to_dict(SampleConfig()), "sigmas": "karras", "sigma_max": 20.0}}})
    meta = diffunet.load_model(stored)[2]
    assert sample_settings(meta, SampleOptions()).sigma_max == 20.0
    assert sample_settings(meta, SampleOptions(sigmas="uniform")).sigma_max is None
    assert sample_settings(meta, SampleOptions(sampler="ddim")).sigma_max is None
    assert sample_settings(meta, SampleOptions(sigma_max=5.0)).sample_kwargs()["sigma_max"] == 5.0
    ddim = tmp_path / "ddim.safetensors"  # a file whose previews used ddim (uniform timesteps)
    diffunet.save_model(ddim, net, schedule, extra={"run_config": {"sample": {
        **to_dict(SampleConfig()), "sampler": "ddim"}}})
    with pytest.raises(UsageError, match=r"--sigma-max only applies to the karras and exponential "
                       r"grids, and ddim \(this model file's \[sample\] sampler\) runs on"):
        sample_settings(diffunet.load_model(ddim)[2], SampleOptions(sigma_max=5.0))


def test_ddim_takes_a_sigma_range_on_an_edm_model_where_it_runs_the_karras_grid(world,
                                                                                tmp_path, capsys):
    from diffunet.formulations import make_schedule

    net = diffunet.load_model(world.model)[0]
    edm = tmp_path / "edm.safetensors"
    diffunet.save_model(edm, net, make_schedule(ScheduleConfig(formulation="edm")))
    how = sample_settings(diffunet.load_model(edm)[2], SampleOptions(sampler="ddim",
                                                                     sigma_max=40.0))
    assert how.sigma_max == 40.0 and how.sample_kwargs()["sigma_max"] == 40.0
    out = tmp_path / "out"
    code, err = run_cli([edm, "--sampler", "ddim", "--sigma-max", 40, "--steps", 2,
                         "--num-samples", 1, "--out-dir", out], capsys)
    assert code == 0, err
    m = json.loads((out / MANIFEST).read_text())
    assert m["settings"]["sigmas"] == "karras" and m["sigma_grid"][0] == pytest.approx(40.0)
    cfg = load_config(None, ["schedule.formulation=edm", "sample.sampler=ddim",
                             "sample.sigma_max=40"])
    assert cfg.sample.sigma_max == 40.0


def test_a_preview_range_the_schedule_lacks_is_refused_before_training(tmp_path):
    from helpers import tiny_run

    from diffunet.training import train

    cfg = load_config(None, tiny_run("schedule.formulation=vp", "sample.sigma_max=1e9",
                                     "train.max_steps=1"))
    with pytest.raises(ConfigError, match=r"^sample\.sigma_max 1e\+09 is outside this model's "
                                          r"noise levels") as e:
        train(cfg, tmp_path / "run", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "run" / "weights").exists()


def test_sampler_settings_from_the_model_file_and_flags(world, tmp_path):
    net, schedule, _ = diffunet.load_model(world.model)
    stored = tmp_path / "stored.safetensors"
    diffunet.save_model(stored, net, schedule, extra={"run_config": {"sample": {
        **to_dict(SampleConfig()), "sampler": "heun", "s_churn": 40.0, "s_tmax": 50.0,
        "sigmas": "karras", "rho": 5.0}}})
    meta = diffunet.load_model(stored)[2]
    how = sample_settings(meta, SampleOptions())
    assert (how.sampler, how.s_churn, how.s_tmax, how.rho) == ("heun", 40.0, 50.0, 5.0)
    # another sampler drops the stored heun-only settings; another grid the stored rho
    how = sample_settings(meta, SampleOptions(sampler="euler-ancestral", sigmas="exponential"))
    assert (how.s_churn, how.s_tmax, how.rho, how.resolved_eta) == (0.0, None, 7.0, 1.0)
    assert sample_settings(meta, SampleOptions(s_tmax=math.inf)).s_tmax is None
    assert SampleConfig(sampler="ddim").resolved_eta == 0.0


def test_previews_pass_the_sample_settings_through(monkeypatch, tmp_path):
    import diffunet.training as training
    from diffunet.data_space import PixelSpace

    seen = {}
    monkeypatch.setattr(training, "sample", lambda *a, **kw: seen.update(kw) or a[2])
    cfg = load_config(None, ["sample.sampler=heun", "sample.sigmas=exponential",
                             "sample.s_churn=5", "sample.s_noise=1.01", "sample.num_images=2",
                             "sample.sigma_max=50"])
    from contextlib import nullcontext

    run = SimpleNamespace(accelerator=SimpleNamespace(autocast=nullcontext),
                          device=torch.device("cpu"), out_dir=tmp_path, log_image=lambda *a: None,
                          write=lambda what, fn: fn(),
                          write_file=lambda sub, name, data, durable: seen.update(
                              written=(sub, name, data[:8])))
    ema = SimpleNamespace(model=None)
    training._preview_fn(cfg, ema, None, run, PixelSpace())(1)
    assert (seen["sampler"], seen["sigmas"], seen["s_churn"], seen["s_noise"]) == (
        "heun", "exponential", 5.0, 1.01)
    assert seen["s_tmax"] == math.inf and seen["rho"] == 7.0
    assert seen["sigma_max"] == 50.0 and seen["sigma_min"] is None
    assert seen["written"] == ("samples", "step0000001.png", b"\x89PNG\r\n\x1a\n")


def test_bad_sampler_settings_in_the_config_are_one_line():
    cases = [(["sample.rho=0"], r"^sample\.rho must be a positive number"),
             (["sample.sigmas=karras", "sample.rho=nan"], r"^sample\.rho: must be a finite"),
             (["sample.s_noise=0"], r"^sample\.s_noise must be a positive number"),
             (["sample.sampler=heun", "sample.s_tmin=2", "sample.s_tmax=1"],
              r"^sample\.s_tmin 2\.0 is larger than sample\.s_tmax 1\.0"),
             (["sample.s_churn=1"], r"^sample\.s_churn only applies to sample\.sampler heun"),
             (["sample.sigmas=uniform", "sample.rho=3"], r"^sample\.rho only applies to"),
             (["sample.s_tmax=inf"], r"^sample\.s_tmax: inf is the default: leave it unset"),
             (["sample.sigmas=karas"], r"^sample\.sigmas: expected 'karras'"),
             (["sample.sigma_max=-1"], r"^sample\.sigma_max must be a positive noise level"),
             (["sample.sampler=ddim", "sample.sigma_max=80"],
              r"^sample\.sigma_max: only applies to the karras and exponential grids and ddim"),
             (["sample.sigmas=karras", "sample.sigma_min=2", "sample.sigma_max=1"],
              r"^sample\.sigma_min 2\.0 must be below sample\.sigma_max 1\.0")]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            load_config(None, overrides)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written


def test_bad_editing_input_is_one_line(world, tmp_path, capsys):
    d = tmp_path
    rgb = np.zeros((S, S, 3), dtype=np.uint8)
    big = png(d / "big.png", np.zeros((2 * S, 2 * S, 3), dtype=np.uint8))
    gray = png(d / "gray.png", np.zeros((S, S), dtype=np.uint8))
    rgba = png(d / "rgba.png", np.zeros((S, S, 4), dtype=np.uint8))
    coloured = rgb.copy()
    coloured[0, 0] = (255, 0, 0)
    colour_mask = png(d / "colour_mask.png", coloured)
    big_mask = png(d / "big_mask.png", np.zeros((2 * S, 2 * S), dtype=np.uint8))
    text = d / "text.png"
    text.write_text("not an image")
    broken = d / "broken"
    broken.mkdir()
    png(broken / "a.png", rgb)
    (broken / "b.png").write_text("not an image")
    empty = d / "empty"
    empty.mkdir()
    unpaired = d / "unpaired"
    unpaired.mkdir()
    png(unpaired / "a.png", rgb[..., 0])
    fifo = d / "fifo.png"
    os.mkfifo(fifo)
    m, init, mask = world.model, world.init, world.mask
    cases = [
        ([m, "--init-image", init, "--strength", 0], "--strength must be in (0, 1]"),
        ([m, "--init-image", init, "--strength", 1.5], "--strength must be in (0, 1]"),
        ([m, "--init-image", init, "--strength", "nan"], "--strength must be in (0, 1]"),
        ([m, "--mask", mask], "--mask needs --init-image"),
        ([m, "--strength", 0.5], "--strength needs --init-image"),
        ([m, "--init-image", init, "--mask", mask, "--resample", 0],
         "--resample must be a positive integer"),
        ([m, "--init-image", init, "--mask", mask, "--resample", 2, "--sampler", "dpmpp-2m"],
         "--resample 2 needs a one-step sampler"),
        ([m, "--init-image", init, "--resample", 2], "--resample 2 repeats inpainting steps"),
        ([m, "--init-image", init, "--strength", 0.1, "--steps", 4], "leaves no step to run"),
        ([m, "--init-image", d / "missing.png"], "--init-image " + str(d / "missing.png")
         + " does not exist"),
        ([m, "--init-image", big], f"{big} is 16x16 pixels; this model takes 8x8 images"),
        ([m, "--init-image", gray], f"{gray} is a mode L image; this model makes RGB"),
        ([m, "--init-image", rgba], f"{rgba} has transparency (mode RGBA)"),
        ([m, "--init-image", text], f"--init-image: cannot read image {text}"),
        ([m, "--init-image", fifo], f"--init-image {fifo} is not a regular file"),
        ([m, "--init-image", broken], f"cannot use {broken / 'b.png'}"),
        ([m, "--init-image", empty], "no image files"),
        ([m, "--init-image", init, "--mask", big_mask], f"{big_mask} is 16x16 pixels"),
        ([m, "--init-image", init, "--mask", colour_mask], "has colours (its R, G and B differ)"),
        ([m, "--init-image", init, "--mask", rgba], "has mode RGBA; a mask is single-channel"),
        ([m, "--init-image", init, "--mask", world.masks], "is a folder but --init-image"),
        ([m, "--init-image", world.inits, "--mask", unpaired],
         "has no mask for the init image b.png"),
        ([m, "--sigmas", "karas"], "unknown sigma grid 'karas'; did you mean 'karras'?"),
        ([m, "--rho", 0], "--rho must be a positive number"),
        ([m, "--sigmas", "uniform", "--rho", 3], "--rho only applies to --sigmas karras"),
        ([m, "--s-churn", 1], "--s-churn only applies to --sampler heun"),
        ([m, "--sampler", "euler", "--s-noise", 1.003], "--s-noise only applies to --sampler heun"),
        ([m, "--sampler", "heun", "--s-noise", 0], "--s-noise must be a positive number"),
        ([m, "--sampler", "heun", "--s-tmin", 5, "--s-tmax", 1],
         "--s-tmin 5.0 is larger than --s-tmax 1.0"),
        ([m, "--sampler", "ddim", "--sigma-max", 10],
         "--sigma-max only applies to the karras and exponential grids, and ddim runs on "
         "uniform timesteps here; add --sigmas karras"),
        ([m, "--sigmas", "uniform", "--sigma-min", 0.1],
         "--sigma-min only applies to --sigmas karras or exponential"),
        ([m, "--sigma-max", 0], "--sigma-max must be a positive noise level"),
        ([m, "--sigma-max", "nan"], "--sigma-max must be a positive noise level"),
        ([m, "--sigma-min", 5, "--sigma-max", 3], "--sigma-min 5.0 must be below --sigma-max 3.0"),
        ([m, "--sigma-max", 1e9], "--sigma-max 1e+09 is outside this model's noise levels"),
    ]
    for args, message in cases:
        code, err = run_cli([*args, "--out-dir", d / "out"], capsys)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and message in err, (args, err)
        assert err.startswith("diffunet sample: error: ") and "Traceback" not in err
        assert not (d / "out").exists(), args


def test_a_resample_count_that_would_never_end_is_one_line() -> None:
    import torch

    from diffunet.samplers import MAX_RESAMPLE
    from diffunet.sampling import SampleOptions

    with pytest.raises(UsageError, match=f"more than {MAX_RESAMPLE} repeats"):
        SampleOptions(init_image="x.png", mask="m.png", resample=10**12)
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(UsageError, match=f"resample={10**12} is more than {MAX_RESAMPLE}"):
        diffunet.sample(lambda x, t: x, diffunet.NoiseSchedule(), x, init_image=x,
                        mask=torch.ones_like(x), resample=10**12, sampler="ddpm", num_steps=2)
