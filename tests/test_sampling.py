"""`diffunet sample` (diffunet.sampling.generate and the CLI) on tiny CPU models.

Batch-size independence: image i is drawn from its own generator (seed + i) for its start noise
and its step noise, so only float rounding inside the network could make the batch size matter.
On the CPU the tiny models here give bit-identical images for batch sizes 1, 3 and 8 (observed);
the tests still allow what could legitimately differ elsewhere: 1e-5 on float outputs and 1/255
on PNG pixels.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffunet
from diffunet import NoiseSchedule, ScheduleConfig, UNet, UNetConfig
from diffunet.cli import main
from diffunet.config import SampleConfig, to_dict
from diffunet.errors import FolderError, UsageError
from diffunet.sampling import GRID, MANIFEST, SampleOptions, generate, image_name
from diffunet.samplers import sample
from processes import clean_env, cpu_env, launch_two

T = 100  # training timesteps of the tiny models (keeps "steps > T" cheap to test)


# These models are tiny: threads only add contention (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(path: Path, *, channels: int = 3, num_classes: int | None = None,
               prediction_type: str = "epsilon", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = UNet(UNetConfig(image_size=8, in_channels=channels, base_channels=16,
                          channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                          dropout=0.0, num_groups=8, num_classes=num_classes))
    with torch.no_grad():  # a fresh UNet's zero-initialised output layer predicts eps = 0 only
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    schedule = NoiseSchedule(ScheduleConfig(num_train_timesteps=T, prediction_type=prediction_type))
    diffunet.save_model(path, net, schedule)
    return path


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("models") / "rgb.safetensors")


@pytest.fixture(scope="module")
def gray_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("models") / "gray.safetensors", channels=1,
                      prediction_type="v")


@pytest.fixture(scope="module")
def cond_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("models") / "cond.safetensors", num_classes=5)


def pixels(folder: Path, n: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / image_name(i))).astype(np.int16)
                     for i in range(n)])


def opts(**kw) -> SampleOptions:
    base = dict(num_samples=6, batch_size=4, num_steps=4)
    return SampleOptions(**{**base, **kw})


def run_cli(args: list, capsys) -> tuple[int, str]:
    """``diffunet sample ARGS --no-progress`` in this process: (exit code, stderr)."""
    try:
        code = main(["sample", *map(str, args), "--no-progress"])
    except SystemExit as e:  # argparse's own errors exit (code 2) from inside main()
        code = e.code
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5), ("dpmpp-2m", 0.0)])
def test_images_do_not_depend_on_the_batch_size(rgb_model, tmp_path, sampler, eta):
    # float level: the per-image computation generate() does, batched three ways
    net, schedule, _ = diffunet.load_model(rgb_model)

    def floats(batch_size: int) -> torch.Tensor:
        outs = []
        for start in range(0, 8, batch_size):
            gens = [torch.Generator().manual_seed(10 + i)
                    for i in range(start, min(8, start + batch_size))]
            x_T = torch.stack([torch.randn((3, 8, 8), generator=g) for g in gens])
            outs.append(sample(net, schedule, x_T, sampler=sampler, eta=eta, num_steps=5,
                               clip_x0=False, generator=gens))
        return torch.cat(outs)

    ref = floats(1)
    for b in (3, 8):
        torch.testing.assert_close(floats(b), ref, rtol=0, atol=1e-5)
    # file level, through generate()
    arrays = []
    for b in (1, 3, 8):
        out = tmp_path / f"b{b}"
        generate(rgb_model, out, opts(num_samples=8, batch_size=b, sampler=sampler, eta=eta,
                                      num_steps=5, seed=10))
        arrays.append(pixels(out, 8))
    for other in arrays[1:]:
        assert np.abs(other - arrays[0]).max() <= 1
    assert len({a.tobytes() for a in arrays[0]}) == 8  # and the 8 images are all different




def _launch(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return launch_two(["sample", *args], env)


@pytest.mark.slow
def test_two_processes_give_the_same_images_as_one(rgb_model, tmp_path):
    common = ["--num-samples", "7", "--batch-size", "2", "--sampler", "ddpm", "--steps", "4",
              "--seed", "3", "--no-progress"]
    two = tmp_path / "two"
    proc = _launch([str(rgb_model), "--out-dir", str(two), *common], cpu_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((two / MANIFEST).read_text())
    assert manifest["complete"] and manifest["num_processes"] == 2
    assert proc.stderr.count("wrote 7 image(s)") == 1  # only the main process talks
    one = tmp_path / "one"
    assert main(["sample", str(rgb_model), "--out-dir", str(one), *common]) == 0
    a, b = pixels(one, 7), pixels(two, 7)
    assert np.abs(a - b).max() <= 1  # identical in practice
    assert np.array_equal(np.asarray(Image.open(one / GRID)), np.asarray(Image.open(two / GRID)))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs this launch is a real 2-GPU run")
def test_two_processes_without_cpu_flag_are_refused(rgb_model, tmp_path):
    out = tmp_path / "out"
    proc = _launch([str(rgb_model), "--out-dir", str(out), "--num-samples", "2"], clean_env())
    assert proc.returncode != 0
    assert proc.stderr.count("diffunet sample: error: launched as 2 processes") == 1
    assert "ACCELERATE_USE_CPU=1" in proc.stderr and not out.exists()


# ---------------------------------------------------------------------------------------------
# Resume


def test_resume_draws_only_the_missing_images(rgb_model, tmp_path):
    ref = tmp_path / "ref"
    generate(rgb_model, ref, opts(sampler="ddpm"))
    out = tmp_path / "out"
    first = generate(rgb_model, out, opts(sampler="ddpm"))
    assert first.drawn == tuple(range(6)) and first.already_done == 0
    for i in (1, 4):
        (out / image_name(i)).unlink()
    stale = out / ".000001.png.123.abcd1234.tmp"  # what a killed atomic write leaves behind
    stale.write_bytes(b"half a png")
    mtimes = {i: (out / image_name(i)).stat().st_mtime_ns for i in (0, 2, 3, 5)}
    second = generate(rgb_model, out, opts(sampler="ddpm", batch_size=1))
    assert second.drawn == (1, 4) and second.already_done == 4
    assert {i: (out / image_name(i)).stat().st_mtime_ns for i in mtimes} == mtimes
    assert not stale.exists()
    assert np.array_equal(pixels(out, 6), pixels(ref, 6))
    assert np.array_equal(np.asarray(Image.open(out / GRID)), np.asarray(Image.open(ref / GRID)))


def test_an_interrupted_run_resumes_where_it_stopped(rgb_model, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    generate(rgb_model, ref, opts(sampler="ddim", eta=1.0))
    import diffunet.sampling as sampling

    draws = []

    def dying_sample(*args, **kwargs):
        draws.append(1)
        if len(draws) == 2:
            raise KeyboardInterrupt  # the run is killed while it draws the second batch
        return sample(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample", dying_sample)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        generate(rgb_model, out, opts(sampler="ddim", eta=1.0, batch_size=2))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] is False and not (out / GRID).exists()
    # the first batch, handed to the background writer, is on disk in full
    assert sorted(p.name for p in out.glob("*.png")) == [image_name(i) for i in range(2)]
    # the manifest, written first, already lists every file the run would have written
    assert manifest["files"] == [image_name(i) for i in range(6)] + [GRID]
    assert {p.name for p in out.iterdir()} - {MANIFEST} <= set(manifest["files"])
    calls = []
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: calls.append(a[2].shape[0])
                        or sample(*a, **k))
    result = generate(rgb_model, out, opts(sampler="ddim", eta=1.0, batch_size=2))
    assert result.drawn == (2, 3, 4, 5) and calls == [2, 2]  # only the missing four are drawn
    assert json.loads((out / MANIFEST).read_text())["complete"] is True
    assert np.array_equal(pixels(out, 6), pixels(ref, 6))


def test_a_failed_png_write_in_the_background_stops_the_run(rgb_model, tmp_path, monkeypatch):
    import diffunet.sampling as sampling

    def full_disk(folder, name, image):
        raise OSError(28, "No space left on device", name)

    monkeypatch.setattr(sampling, "_save", full_disk)
    with pytest.raises(OSError, match="No space"):
        generate(rgb_model, tmp_path / "out", opts(batch_size=2))
    assert not (tmp_path / "out" / GRID).exists()


def test_other_settings_are_refused_unless_overwrite(rgb_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli([rgb_model, "--out-dir", out, "--num-samples", 3, "--steps", 3], capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    before = pixels(out, 3)
    code, err = run_cli([rgb_model, "--out-dir", out, "--num-samples", 3, "--steps", 3,
                         "--seed", 7], capsys)
    assert code == 2 and "other settings" in err and "seed 0 there, 7 now" in err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert np.array_equal(pixels(out, 3), before)  # nothing touched
    # more images with the same settings is a resume, not a conflict
    assert run_cli([rgb_model, "--out-dir", out, "--num-samples", 4, "--steps", 3], capsys)[0] == 0
    assert np.array_equal(pixels(out, 3), before)
    # --overwrite replaces this command's files only
    code, err = run_cli([rgb_model, "--out-dir", out, "--num-samples", 2, "--steps", 3,
                         "--seed", 7, "--overwrite"], capsys)
    assert code == 0 and "removed 6" in err  # 4 PNGs, grid, manifest
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", GRID, MANIFEST,
                                                     "notes.txt"]
    assert json.loads((out / MANIFEST).read_text())["settings"]["seed"] == 7
    # images without a manifest cannot be resumed safely
    (out / MANIFEST).unlink()
    code, err = run_cli([rgb_model, "--out-dir", out, "--num-samples", 2, "--steps", 3,
                         "--seed", 7], capsys)
    assert code == 2 and "no manifest.json" in err
    # nor can a different model file
    other = make_model(tmp_path / "other.safetensors", channels=1)
    out2 = tmp_path / "out2"
    assert run_cli([rgb_model, "--out-dir", out2, "--num-samples", 1, "--steps", 2], capsys)[0] == 0
    code, err = run_cli([other, "--out-dir", out2, "--num-samples", 1, "--steps", 2], capsys)
    assert code == 2 and "sha256" in err


# ---------------------------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize("sampler,extra", [("ddpm", []), ("ddim", ["--eta", "0.3"]),
                                           ("dpmpp-2m", ["--precision", "bf16"])])
def test_each_sampler_through_the_cli(rgb_model, tmp_path, capsys, sampler, extra):
    out = tmp_path / "out"
    code, err = run_cli([rgb_model, "--out-dir", out, "--num-samples", 5, "--batch-size", 2,
                         "--sampler", sampler, "--steps", 6, "--seed", 4, *extra], capsys)
    assert code == 0, err
    assert f"wrote 5 image(s) to {out}" in err
    names = sorted(p.name for p in out.iterdir())
    assert names == [image_name(i) for i in range(5)] + [GRID, MANIFEST]
    imgs = [Image.open(out / image_name(i)) for i in range(5)]
    assert all(im.mode == "RGB" and im.size == (8, 8) for im in imgs)
    grid = Image.open(out / GRID)
    assert grid.mode == "RGB" and grid.size == (3 * 10 + 2, 2 * 10 + 2)  # 3x2 tiles, 2 px gaps
    m = json.loads((out / MANIFEST).read_text())
    assert m["complete"] is True and m["num_samples"] == 5
    assert m["model"]["sha256"] == hashlib.sha256(rgb_model.read_bytes()).hexdigest()
    assert m["unet_config"]["image_size"] == 8 and m["schedule_config"]["num_train_timesteps"] == T
    s = m["settings"]
    assert (s["sampler"], s["num_steps"], s["seed"], s["guidance_scale"]) == (sampler, 6, 4, 1.0)
    assert s["eta"] == (0.3 if sampler == "ddim" else 0.0) and s["spacing"] == "trailing"
    assert s["precision"] == ("bf16" if sampler == "dpmpp-2m" else "fp32")
    if sampler == "dpmpp-2m":  # the command's default grid for it: karras (6 levels and 0)
        assert s["sigmas"] == "karras" and len(m["sigma_grid"]) == 7 and "timesteps" not in m
    else:
        assert s["sigmas"] == "uniform"
        assert m["timesteps"] == diffunet.make_timesteps(T, 6).tolist()
    assert "seed + i" in m["image_seeds"] and m["labels"] is None
    assert m["diffunet_version"] == diffunet.__version__


def test_grayscale_model_writes_mode_l_and_defaults(gray_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["sample", str(gray_model), "--num-samples", "3", "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 0, err
    out = tmp_path / "samples" / "gray"  # default --out-dir: samples/<model file stem>
    assert all(Image.open(out / image_name(i)).mode == "L" for i in range(3))
    assert Image.open(out / GRID).mode == "L"
    assert "3/3" in err  # the progress bar counts images
    m = json.loads((out / MANIFEST).read_text())
    assert (m["settings"]["sampler"], m["settings"]["num_steps"], m["batch_size"]) == (
        "dpmpp-2m", 2, 64)
    assert m["settings"]["sigmas"] == "karras"  # the default sampler's default grid
    code, err = run_cli([gray_model, "--out-dir", tmp_path / "nogrid", "--num-samples", 2,
                         "--steps", 2, "--no-grid"], capsys)
    assert code == 0 and not (tmp_path / "nogrid" / GRID).exists()


def test_class_labels(cond_model, tmp_path, capsys):
    def labels_run(name: str, spec: str, *extra) -> tuple[np.ndarray, list]:
        out = tmp_path / name
        code, err = run_cli([cond_model, "--out-dir", out, "--num-samples", 6, "--steps", 3,
                             "--class-label", spec, *extra], capsys)
        assert code == 0, err
        return pixels(out, 6), json.loads((out / MANIFEST).read_text())

    one, m1 = labels_run("one", "1")
    two, m2 = labels_run("two", "1,4")
    every, m3 = labels_run("all", "all")
    assert m1["labels"] == [1] * 6 and m1["settings"]["class_labels"] == [1]
    assert m2["labels"] == [1, 4, 1, 4, 1, 4] and m2["settings"]["class_labels"] == [1, 4]
    assert m3["labels"] == [0, 1, 2, 3, 4, 0] and m3["settings"]["class_labels"] == "all"
    # the labels reach the model: same seed + same label = same image, another label differs
    assert np.array_equal(one[0::2], two[0::2]) and not np.array_equal(one[1::2], two[1::2])
    assert np.array_equal(every[1], one[1])
    guided, mg = labels_run("guided", "1", "--guidance-scale", "3")
    assert mg["settings"]["guidance_scale"] == 3.0 and not np.array_equal(guided, one)
    # a conditional model without labels samples with its "no label" class
    code, err = run_cli([cond_model, "--out-dir", tmp_path / "none", "--num-samples", 2,
                         "--steps", 2], capsys)
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, no traceback


def test_bad_input_in_a_subprocess(rgb_model, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffunet", "sample", str(rgb_model),
                           "--sampler", "eulr", "--out-dir", str(tmp_path / "x")],
                          capture_output=True, text=True, env=clean_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "diffunet sample: error: unknown sampler 'eulr'; use --sampler with one of ddpm, ddim, "
        "dpmpp-2m, euler, heun, euler-ancestral, dpmpp-2m-sde"]
    assert proc.stdout == "" and not (tmp_path / "x").exists()


def test_bad_input_in_process(rgb_model, cond_model, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    four = make_model(tmp_path / "four.safetensors", channels=4)
    cases = [
        ([rgb_model, "--steps", 0], "--steps must be a positive integer"),
        ([rgb_model, "--steps", T + 1], f"more than this model's {T} training timesteps"),
        ([rgb_model, "--num-samples", -3], "--num-samples must be a positive integer"),
        ([rgb_model, "--num-samples", 0], "--num-samples must be a positive integer"),
        ([rgb_model, "--batch-size", 0], "--batch-size must be a positive integer"),
        ([rgb_model, "--num-samples", "many"], "invalid int value: 'many'"),
        ([rgb_model, "--spacing", "uniform"], "unknown timestep spacing 'uniform'"),
        ([rgb_model, "--eta", 2], "--eta must be in [0, 1]"),
        ([rgb_model, "--sampler", "dpmpp-2m", "--eta", 0.5], "--eta only applies to"),
        ([rgb_model, "--seed", -1], "--seed must be a non-negative integer"),
        ([rgb_model, "--precision", "fp8"], "unknown precision 'fp8'"),
        ([rgb_model, "--precision", "fp16", "--device", "cpu"], "use --precision bf16 or fp32"),
        ([rgb_model, "--device", "tpu9"], "unknown --device 'tpu9'"),
        ([rgb_model, "--out-dir", a_file], "is a file, not a folder"),
        ([rgb_model, "--class-label", "2"], "this model is unconditional"),
        ([rgb_model, "--guidance-scale", 2], "needs --class-label"),
        ([cond_model, "--class-label", "5"], "class label 5 is out of range"),
        ([cond_model, "--class-label", "1,-1"], "class label -1 is out of range"),
        ([cond_model, "--class-label", "cats"], "--class-label: expected a class index"),
        ([tmp_path / "missing.safetensors"], "model file not found"),
        ([a_file], "not a safetensors model file"),
        ([four], "4-channel images"),
    ]
    for args, message in cases:
        if "--out-dir" not in args:
            args = [*args, "--out-dir", tmp_path / "out"]
        code, err = run_cli(args, capsys)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and message in err, (args, err)
        assert err.startswith("diffunet sample: error: ") and "Traceback" not in err
        assert not (tmp_path / "out").exists(), args  # nothing written for bad input


def test_library_errors_are_config_errors(rgb_model, tmp_path):
    with pytest.raises(UsageError, match="--batch-size"):
        SampleOptions(batch_size=-1)
    # a guidance scale with nothing to guide: known without the model file only with
    # --no-guide (a file may carry a guide; sample_settings checks it with the file)
    with pytest.raises(UsageError, match="needs --class-label"):
        SampleOptions(guidance_scale=2.0, no_guide=True)
    with pytest.raises(UsageError, match="positive"):
        SampleOptions(num_samples=True)  # a bool is not a count


# ---------------------------------------------------------------------------------------------
# One set of sampling settings: the model file's [sample], what its previews used


def _with_run_config(src: Path, dst: Path, **sample: object) -> Path:
    """A copy of the model file ``src`` whose metadata carries a training run's [sample]."""
    net, schedule, _ = diffunet.load_model(src)
    diffunet.save_model(dst, net, schedule,
                        extra={"run_config": {"sample": {**to_dict(SampleConfig()), **sample}}})
    return dst


def test_sample_uses_the_model_files_own_sample_settings(rgb_model, tmp_path):
    from diffunet.sampling import sample_settings

    trained = _with_run_config(rgb_model, tmp_path / "trained.safetensors", sampler="ddpm",
                               num_steps=3, clip_x0=False, spacing="leading")
    out = tmp_path / "defaults"
    generate(trained, out, SampleOptions(num_samples=2, batch_size=2))
    settings = json.loads((out / MANIFEST).read_text())["settings"]
    assert (settings["sampler"], settings["num_steps"], settings["clip_x0"],
            settings["spacing"]) == ("ddpm", 3, False, "leading")
    # the pixels are those of sample() with exactly these settings
    net, schedule, _ = diffunet.load_model(trained)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x_T = torch.stack([torch.randn((3, 8, 8), generator=g) for g in gens])
    ref = sample(net, schedule, x_T, sampler="ddpm", num_steps=3, spacing="leading",
                 clip_x0=False, generator=gens)
    expected = ((ref.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).to(torch.int16)
    assert np.abs(pixels(out, 2) - expected.numpy()).max() <= 1

    # a flag replaces one setting; the others stay the model's
    how = sample_settings(diffunet.load_model(trained)[2], SampleOptions(num_steps=5))
    assert (how.sampler, how.num_steps, how.clip_x0) == ("ddpm", 5, False)
    # switching to ddim does not inherit a DDIM eta the model never had; a stored ddim eta is
    # dropped when another sampler is asked for
    eta_model = _with_run_config(rgb_model, tmp_path / "eta.safetensors", sampler="ddim",
                                 eta=0.5)
    meta = diffunet.load_model(eta_model)[2]
    assert sample_settings(meta, SampleOptions()).eta == 0.5
    assert sample_settings(meta, SampleOptions(sampler="dpmpp-2m")).resolved_eta == 0.0
    # a file without a training run's settings samples with SampleConfig's defaults
    plain = sample_settings(diffunet.load_model(rgb_model)[2], SampleOptions())
    assert plain == SampleConfig()


def test_a_stored_guidance_scale_needs_labels_to_apply(cond_model, tmp_path):
    from diffunet.sampling import sample_settings

    guided = _with_run_config(cond_model, tmp_path / "g.safetensors", guidance_scale=3.0)
    meta = diffunet.load_model(guided)[2]
    assert sample_settings(meta, SampleOptions()).guidance_scale == 1.0  # unconditional
    assert sample_settings(meta, SampleOptions(class_labels=2)).guidance_scale == 3.0
    with pytest.raises(UsageError, match="--guidance-scale 2.0 needs --class-label"):
        sample_settings(meta, SampleOptions(guidance_scale=2.0))


def test_clip_x0_flag_reaches_the_manifest(rgb_model, tmp_path, capsys):
    out = tmp_path / "noclip"
    code, err = run_cli([rgb_model, "--num-samples", "1", "--steps", "2", "--no-clip-x0",
                         "--out-dir", out], capsys)
    assert code == 0, err
    assert json.loads((out / MANIFEST).read_text())["settings"]["clip_x0"] is False


def test_cpu_defaults_are_fp32_and_a_batch_of_64(rgb_model, tmp_path):
    out = tmp_path / "defaults"
    generate(rgb_model, out, SampleOptions(num_samples=2, num_steps=2))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["settings"]["precision"] == "fp32" and manifest["batch_size"] == 64


@pytest.mark.slow
def test_compiled_channels_last_sampling_gives_the_same_images(rgb_model, tmp_path):
    # The denoiser compiled (Inductor, ~30 s here) on channels-last weights: the same pixels to
    # float rounding; the files record the same settings, so either run resumes the other.
    plain, fast = tmp_path / "plain", tmp_path / "fast"
    generate(rgb_model, plain, opts(sampler="ddpm", num_samples=3, num_steps=3))
    generate(rgb_model, fast, opts(sampler="ddpm", num_samples=3, num_steps=3, compile=True,
                                   channels_last=True))
    assert np.abs(pixels(fast, 3) - pixels(plain, 3)).max() <= 1
    settings = [json.loads((d / MANIFEST).read_text())["settings"] for d in (plain, fast)]
    assert settings[0] == settings[1]


def test_a_planted_fifo_manifest_is_refused_without_blocking(rgb_model, tmp_path):
    import os

    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / MANIFEST)
    with pytest.raises(FolderError, match="is not a readable diffunet sample manifest"):
        generate(rgb_model, out, opts(num_samples=1))


def test_more_samples_than_one_folder_holds_are_refused():
    from diffunet.sampling import MAX_SAMPLES

    with pytest.raises(UsageError, match="--num-samples 10000001 is more than 10,000,000"):
        SampleOptions(num_samples=MAX_SAMPLES + 1)


def test_a_folder_in_use_by_another_run_is_refused(rgb_model, tmp_path):
    import os

    from diffunet.runs import FolderLock

    out = tmp_path / "out"
    out.mkdir()
    lock = FolderLock(out)  # held as a second `diffunet sample` would hold it
    try:
        with pytest.raises(FolderError, match=f"in use by another diffunet run "
                                              f"\\(process {os.getpid()}\\)"):
            generate(rgb_model, out, opts(num_samples=1))
    finally:
        lock.close()
    assert list(out.iterdir()) == []
    generate(rgb_model, out, opts(num_samples=1))  # free again


def test_progress_bar_counts_sampling_steps(rgb_model, tmp_path, monkeypatch):
    # The bar moves with every sampling step (steps x batches), not once per finished batch.
    import tqdm.auto

    bars = []

    class Recorder(tqdm.auto.tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **{**kw, "disable": True})
            self.kw = kw
            self.updates, self.postfixes = [], []
            bars.append(self)

        def update(self, k=1):
            self.updates.append(k)
            self.n += k

        def set_postfix_str(self, s="", refresh=True):
            self.postfixes.append(s)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    generate(rgb_model, tmp_path / "out", opts(num_samples=6, batch_size=4, num_steps=3),
             progress=True)
    (bar,) = bars
    assert bar.kw["total"] == 3 * 2 and bar.kw["unit"] == "step"  # 3 steps x 2 batches
    assert bar.updates[:6] == [1] * 6 and bar.n == 6
    assert bar.postfixes[0] == "0/6 img" and bar.postfixes[-1] == "6/6 img"
    assert "4/6 img" in bar.postfixes


def test_default_folder_is_named_after_the_run(tmp_path, monkeypatch):
    from diffunet.cli.sample import default_out_dir

    run = tmp_path / "runs" / "foo"
    (run / "weights").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    model = run / "weights" / "model_step0001000.safetensors"
    assert default_out_dir(model) == Path("samples/foo_step0001000")
    monkeypatch.chdir(run)  # relative paths too
    assert default_out_dir("weights/model_step0000040.safetensors") == Path(
        "samples/foo_step0000040")
    assert default_out_dir(tmp_path / "mine.safetensors") == Path("samples/mine")
    # a weights/ folder that is not a run's keeps the file's own name
    (tmp_path / "weights").mkdir()
    assert default_out_dir(tmp_path / "weights" / "model_step0000001.safetensors") == Path(
        "samples/model_step0000001")


def test_class_names_and_all_grid_rows(tmp_path, capsys):
    from diffunet.sampling import class_rows, parse_class_labels, resolve_class_labels

    assert parse_class_labels("cat") == "cat" and parse_class_labels("cat, 2") == ("cat", 2)
    assert parse_class_labels("ALL") == "all" and parse_class_labels("-1") == -1
    names = ["cat", "dog", "fish"]
    assert resolve_class_labels("dog", names) == 1
    assert resolve_class_labels(("fish", 0), names) == (2, 0)
    assert resolve_class_labels((1, 2), None) == (1, 2)
    with pytest.raises(UsageError, match=r"no class 'Dog'; did you mean 'dog'\? its classes "
                                         r"are cat, dog, fish \(or give an index 0 to 2\)$"):
        resolve_class_labels("Dog", names)
    with pytest.raises(UsageError, match="expected a class index, got 'dog': this model file "
                                         "has no class names"):
        resolve_class_labels("dog", None)
    with pytest.raises(UsageError):
        parse_class_labels("cat,,dog")
    # --class-label all: one class per grid row, short rows filled with blank tiles
    images = [torch.full((1, 2, 2), i / 8) for i in range(5)]
    tiles, width = class_rows(images, [i % 2 for i in range(5)])
    assert width == 3 and [float(t[0, 0, 0]) * 8 for t in tiles] == [0, 2, 4, 1, 3, 0]


def test_all_labels_grid_has_a_row_per_class(cond_model, tmp_path, capsys):
    out = tmp_path / "all"
    code, err = run_cli([cond_model, "--out-dir", out, "--num-samples", 7, "--steps", 2,
                         "--class-label", "all"], capsys)
    assert code == 0, err
    k = json.loads((out / MANIFEST).read_text())["unet_config"]["num_classes"]
    grid = Image.open(out / GRID)
    # 8x8 tiles with 2 px padding: k rows (one per class) of ceil(7 / k) tiles
    assert grid.size == (2 + -(-7 // k) * 10, 2 + k * 10)


# ---------------------------------------------------------------------------------------------
# Autoguidance and the guidance interval (the library: test_guidance.py; bad input:
# test_bad_input.py)


@pytest.fixture(scope="module")
def weak_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("models") / "weak.safetensors", seed=1)


def test_guide_model_through_the_cli_draws_the_library_images(rgb_model, weak_model, tmp_path,
                                                              capsys):
    out = tmp_path / "guided"
    args = [rgb_model, "--guide-model", weak_model, "--guidance-scale", 2.5,
            "--guidance-interval", "0.2,1", "--num-samples", 3, "--batch-size", 2,
            "--steps", 4, "--seed", 5, "--out-dir", out]
    code, err = run_cli(args, capsys)
    assert code == 0, err
    net, schedule, _ = diffunet.load_model(rgb_model)
    guide, _, _ = diffunet.load_model(weak_model)

    def library(**guided) -> np.ndarray:
        gens = [torch.Generator().manual_seed(5 + i) for i in range(3)]
        x_T = torch.stack([torch.randn((3, 8, 8), generator=g) for g in gens])
        kw = SampleConfig(num_steps=4, **guided).sample_kwargs()
        ref = sample(net, schedule, x_T, generator=gens,
                     guide_model=guide if guided else None, **kw)
        return ((ref.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).to(
            torch.int16).numpy()

    expected = library(guidance_scale=2.5, guidance_interval=(0.2, 1.0))
    assert np.abs(pixels(out, 3) - expected).max() <= 1
    assert np.abs(library() - expected).max() > 10  # the guide changed the images
    manifest = json.loads((out / MANIFEST).read_text())
    sha = hashlib.sha256(weak_model.read_bytes()).hexdigest()
    assert manifest["guide_model"] == {"path": str(weak_model.resolve()), "sha256": sha,
                                       "step": None}
    settings = manifest["settings"]
    assert (settings["guide_model_sha256"], settings["guidance_interval"],
            settings["guidance_scale"]) == (sha, [0.2, 1.0], 2.5)
    # another guide (or none) is other settings: the folder is not mixed
    other = make_model(tmp_path / "other_weak.safetensors", seed=2)
    code, err = run_cli([*args[:2], other, *args[3:]], capsys)
    assert code == 2 and "guide_model_sha256" in err
    code, err = run_cli([rgb_model, "--num-samples", 3, "--steps", 4, "--seed", 5,
                         "--out-dir", out], capsys)
    assert code == 2 and "guidance_scale 2.5 there, 1.0 now" in err


def test_the_stored_guidance_applies_only_to_guidance_of_its_kind(rgb_model, cond_model,
                                                                  weak_model, tmp_path):
    from diffunet.sampling import sample_settings

    auto = _with_run_config(rgb_model, tmp_path / "auto.safetensors",
                            guide_model="/elsewhere/weak.safetensors", guidance_scale=2.5,
                            guidance_interval=[0.2, 1.0])
    meta = diffunet.load_model(auto)[2]
    plain = sample_settings(meta, SampleOptions())
    assert (plain.guidance_scale, plain.guidance_interval, plain.guide_model) == (1.0, None, None)
    guided = sample_settings(meta, SampleOptions(guide_model=weak_model))
    assert (guided.guidance_scale, guided.guidance_interval, guided.guide_model) == (
        2.5, (0.2, 1.0), None)  # the stored path is never used
    assert sample_settings(meta, SampleOptions(guide_model=weak_model, guidance_scale=3.0,
                                               guidance_interval=(0.5, 2.0))).guidance_interval \
        == (0.5, 2.0)
    cfg = _with_run_config(cond_model, tmp_path / "cfg.safetensors", guidance_scale=3.0,
                           guidance_interval=[0.2, 1.0])
    meta = diffunet.load_model(cfg)[2]
    assert sample_settings(meta, SampleOptions(class_labels=1)).guidance_interval == (0.2, 1.0)
    off = sample_settings(meta, SampleOptions(class_labels=1, guidance_scale=1.0))
    assert (off.guidance_scale, off.guidance_interval) == (1.0, None)  # off, with its interval
    with pytest.raises(UsageError, match="--guide-model with guidance scale 1 changes nothing"):
        sample_settings(meta, SampleOptions(class_labels=1, guide_model=weak_model))
    with pytest.raises(UsageError, match="--guidance-interval limits guidance"):
        sample_settings(meta, SampleOptions(guidance_interval=(0.2, 1.0)))
    with pytest.raises(UsageError, match="--guidance-interval limits guidance"):
        SampleOptions(class_labels=1, guidance_scale=1.0, guidance_interval=(0.2, 1.0))
    assert SampleOptions(guidance_scale=2.0, guide_model=weak_model).guidance_scale == 2.0
