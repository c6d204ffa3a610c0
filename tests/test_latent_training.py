"""Training on a VAE's latents (issue 25): the run reads the latent cache, draws each latent from
its posterior with the run's generator (exact resume, 1 and 2 processes alike), previews and
model files are decoded images and a VAE record."""

from __future__ import annotations

import hashlib
import math
import os
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffunet import cli, latent_cache
from diffunet.checkpoint import read_metadata
from diffunet.config import RunConfig, VaeConfig, load_config
from diffunet.data_space import LatentShape, LatentSpace, load_run_config, vae_identity
from diffunet.errors import ConfigError, FolderError
from diffunet.training import train
from helpers import save_tiny_vae, tiny_run
from processes import cpu_env, launch_two

diffusers = pytest.importorskip("diffusers")

_RUN = """[unet]
base_channels = 8
channel_mults = [1, 2]
attn_resolutions = []
num_groups = 4
[data]
builtin_size = 24
image_size = 16
[train]
batch_size = 4
lr_schedule = "constant"
log_every = 1
save_every = 2
sample_every = 2
[sample]
num_steps = 3
num_images = 4
"""


def _save_vae(folder: Path, seed: int) -> Path:
    return save_tiny_vae(folder, seed)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny AutoencoderKL (downsampling 2, 4 latent channels), safetensors only."""
    return _save_vae(tmp_path_factory.mktemp("vae") / "tiny-vae", 0)


def _write_config(tmp_path: Path, vae: Path, cache: str = "cache") -> Path:
    path = tmp_path / "run.toml"
    text = _RUN.replace("[data]\n", f"[data]\nlatent_cache = {json.dumps(str(tmp_path / cache))}\n")
    path.write_text(text + f"[vae]\npath = {json.dumps(str(vae))}\n")
    return path


def _cfg(tmp_path: Path, vae: Path, *overrides: str, cache: str = "cache") -> RunConfig:
    return load_run_config(str(_write_config(tmp_path, vae, cache)), list(overrides))


def _model(out: Path, step: int) -> Path:
    return out / "weights" / f"model_step{step:07d}.safetensors"


def _same_file(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_the_unet_follows_the_vae_and_the_run_trains_on_latents(vae_dir: Path,
                                                                  tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, vae_dir, "train.max_steps=2")
    assert (cfg.unet.image_size, cfg.unet.in_channels) == (8, 4)  # 16 px / 2, 4 channels
    said: list[str] = []
    result = train(cfg, tmp_path / "out", progress=False, say=said.append)
    assert result.step == 2
    assert any(m.startswith("latent cache: encoding 1 of 1 shards of 24 images") for m in said)
    line = next(m for m in said if m.startswith("latents: "))
    assert "4x8x8" in line and "encoded 1 of 1 shards" in line and "24 images and their " \
        "mirrors" in line
    assert "data: builtin" in said[0] + said[1] and "16x16 RGB" in "\n".join(said)
    # the preview grid holds decoded images: 4 of 16x16 pixels, not 8x8 latents
    grid = Image.open(tmp_path / "out" / "samples" / "step0000002.png")
    assert grid.size == (2 + 2 * 18, 2 + 2 * 18)
    # the model file records the VAE by where it came from and by content, and the scaling
    meta = read_metadata(_model(tmp_path / "out", 2))
    record = meta["vae"]
    assert record == {**vae_identity(cfg.vae), "scaling_factor": pytest.approx(0.18215),
                      "shift_factor": 0.0, "image_channels": 3, "latent_channels": 4,
                      "factor": 2}
    # a second run reuses the cache, and says so
    said.clear()
    train(cfg, tmp_path / "again", progress=False, say=said.append)
    assert next(m for m in said if m.startswith("latents: ")).endswith(": reused")


@pytest.mark.parametrize("variant", [[], ["unet.num_classes=4", "train.label_dropout=0.5"]],
                         ids=["unconditional", "class-conditional"])
def test_latent_resume_is_exact(vae_dir: Path, tmp_path: Path, variant: list[str]) -> None:
    n = 4
    variant = [*variant, "train.sample_every=100"]  # no previews: their decoding is tested above
    full, half = tmp_path / "full", tmp_path / "half"
    train(_cfg(tmp_path, vae_dir, *variant, f"train.max_steps={n}"), full, progress=False)
    train(_cfg(tmp_path, vae_dir, *variant, f"train.max_steps={n // 2}"), half, progress=False)
    spare = tmp_path / "spare"
    shutil.copytree(half, spare)
    train(_cfg(tmp_path, vae_dir, *variant, f"train.max_steps={n}"), half, resume=True,
          progress=False)
    assert _same_file(_model(full, n), _model(half, n))
    assert [r["loss"] for r in _log(full)] == [r["loss"] for r in _log(half)]
    # the check has teeth: the latents are drawn from the state's generator; another draw
    # (the step generator's state taken from another step) gives another model
    state = spare / "state" / f"step{n // 2:07d}" / "rng.safetensors"
    other = full / "state" / f"step{n:07d}" / "rng.safetensors"
    shutil.copyfile(other, state)
    record = json.loads((state.parent / "trainer.json").read_text())
    record["files"]["rng.safetensors"] = {  # the state records its files: as if it were its own
        "size": state.stat().st_size, "sha256": hashlib.sha256(state.read_bytes()).hexdigest()}
    (state.parent / "trainer.json").write_text(json.dumps(record))
    train(_cfg(tmp_path, vae_dir, *variant, f"train.max_steps={n}"), spare, resume=True,
          progress=False)
    assert not _same_file(_model(full, n), _model(spare, n))


def test_training_x0_takes_the_mirrors_posterior_and_the_global_draw() -> None:
    space = LatentSpace(torch.nn.Conv2d(1, 1, 1), LatentShape(3, 2, 2), scaling_factor=2.0,
                        shift_factor=0.5)
    B = 4
    batch = torch.zeros(B, 4, 2, 3, 3)
    batch[:, 0], batch[:, 1] = 1.0, 0.0  # the image: mean 1, no spread
    batch[:, 2], batch[:, 3] = -1.0, 0.0  # its mirror: mean -1
    flips = torch.tensor([False, True, False, True])
    x0 = space.training_x0(batch, flips, torch.Generator().manual_seed(0), slice(0, B), B)
    assert torch.equal(x0[:, 0, 0, 0], torch.tensor([1.0, -3.0, 1.0, -3.0]))  # (m - .5) x 2
    # with a spread, the noise is the global batch's, sliced: two halves make the whole
    batch[:, 1] = batch[:, 3] = 0.5
    whole = space.training_x0(batch, flips, torch.Generator().manual_seed(3), slice(0, B), B)
    halves = [space.training_x0(batch[s], flips[s], torch.Generator().manual_seed(3), s, B)
              for s in (slice(0, 2), slice(2, 4))]
    assert torch.equal(whole, torch.cat(halves))
    noise = torch.randn((B, 2, 3, 3), generator=torch.Generator().manual_seed(3))
    mean = torch.where(flips.view(-1, 1, 1, 1), -1.0, 1.0)
    assert torch.allclose(whole, (mean + 0.5 * noise - 0.5) * 2.0)


def test_a_cache_of_another_vae_is_refused_before_training(vae_dir: Path, tmp_path: Path
                                                            ) -> None:
    train(_cfg(tmp_path, vae_dir, "train.max_steps=1"), tmp_path / "one", progress=False)
    other = _save_vae(tmp_path / "other-vae", 1)
    with pytest.raises(FolderError, match=r"^data.latent_cache: .* another VAE .*vae.config_"
                       r"sha256|^data.latent_cache: .*another VAE"):
        train(_cfg(tmp_path, other, "train.max_steps=1"), tmp_path / "two", progress=False)
    assert not (tmp_path / "two" / "weights").exists()


def test_a_streamed_latent_run_is_refused(vae_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data.streaming: .*set data.streaming = false"):
        _cfg(tmp_path, vae_dir, "data.source=hf", "data.name=owner/set", "data.streaming=true")


@pytest.mark.slow
def test_two_processes_match_one_on_latents(vae_dir: Path, tmp_path: Path) -> None:
    config = _write_config(tmp_path, vae_dir)
    overrides = ["train.max_steps=2", "unet.dropout=0.0"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(load_run_config(str(config), overrides), one, progress=False)  # builds the cache
    r = launch_two(["train", str(config), *overrides, "--out-dir", str(two), "--no-progress"],
                   cpu_env(), timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reused" in r.stderr and r.stderr.count("latents: ") == 1
    a, b = load_file(str(_model(one, 2))), load_file(str(_model(two, 2)))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert [x["loss"] for x in _log(one)] == pytest.approx([x["loss"] for x in _log(two)],
                                                           abs=1e-5)
    assert latent_cache.MANIFEST in {p.name for p in (tmp_path / "cache").iterdir()}


# ---------------------------------------------------------------------------------------------
# Sampling a latent model: decoded images, the VAE it records, latents on request


@pytest.fixture(scope="module")
def latent_model(vae_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A latent model file of 2 steps (16x16 RGB images as 4x8x8 latents)."""
    tmp = tmp_path_factory.mktemp("latent-run")
    out = tmp / "out"
    train(_cfg(tmp, vae_dir, "train.max_steps=2", "train.guide_at=0"), out, progress=False)
    return _model(out, 2)


def _sample(*args: str) -> int:
    return cli.main(["sample", *args, "--no-progress"])


def test_sampling_decodes_to_pixels_and_saves_latents(latent_model: Path, vae_dir: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "s"
    assert _sample(str(latent_model), "--num-samples", "3", "--out-dir", str(out),
                   "--save-latents") == 0
    image = Image.open(out / "000001.png")
    assert image.size == (16, 16) and image.mode == "RGB"
    z = load_file(str(out / "000001.safetensors"))["latent"]
    assert z.shape == (4, 8, 8)
    # the saved latent is the one the PNG was decoded from
    space = LatentSpace.load(load_run_config(str(_write_config(tmp_path, vae_dir))).vae)
    decoded = space.decode(space.scale(z[None]))[0]
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()
    assert (pixels - ((decoded.clamp(-1, 1) + 1) * 127.5)).abs().max() <= 1.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vae"]["weights_sha256"] == vae_identity(VaeConfig(path=str(vae_dir)))[
        "weights_sha256"]
    # a rerun resumes (nothing drawn again); the same seeds give the same images
    again = tmp_path / "again"
    assert _sample(str(latent_model), "--num-samples", "2", "--out-dir", str(again)) == 0
    assert (again / "000001.png").read_bytes() == (out / "000001.png").read_bytes()


def test_a_local_copy_of_the_vae_is_accepted_and_another_refused(
        latent_model: Path, vae_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(vae_dir, copy)
    assert _sample(str(latent_model), "--num-samples", "1", "--out-dir", str(tmp_path / "a"),
                   "--vae", str(copy)) == 0
    other = _save_vae(tmp_path / "other", 3)
    capsys.readouterr()
    assert _sample(str(latent_model), "--num-samples", "1", "--out-dir", str(tmp_path / "b"),
                   "--vae", str(other)) == 2
    err = capsys.readouterr().err
    assert "is not the VAE" in err and "give a copy of" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_a_vae_that_is_gone_is_one_line(latent_model: Path, vae_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    moved = tmp_path / "moved"
    shutil.move(str(vae_dir), str(moved))
    try:
        assert _sample(str(latent_model), "--num-samples", "1", "--out-dir",
                       str(tmp_path / "c")) == 2
    finally:
        shutil.move(str(moved), str(vae_dir))
    err = capsys.readouterr().err
    assert "cannot be found here" in err and "--vae PATH" in err and len(err.splitlines()) == 1


def test_pixel_models_refuse_vae_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pixel"
    train(load_config(None, [*tiny_run(), "train.max_steps=1"]), out, progress=False)
    for flag in (["--save-latents"], ["--vae", str(tmp_path)]):
        assert _sample(str(_model(out, 1)), "--num-samples", "1", "--out-dir",
                       str(tmp_path / "d"), *flag) == 2
        err = capsys.readouterr().err
        assert "pixel model" in err and len(err.splitlines()) == 1


def test_inpainting_a_latent_model_encodes_the_init_image(latent_model: Path, tmp_path: Path
                                                           ) -> None:
    init = np.zeros((16, 16, 3), np.uint8)
    init[4:12, 4:12] = (200, 50, 50)
    Image.fromarray(init).save(tmp_path / "init.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255  # repaint the right half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "e"
    assert _sample(str(latent_model), "--num-samples", "2", "--out-dir", str(out),
                   "--init-image", str(tmp_path / "init.png"), "--mask",
                   str(tmp_path / "mask.png")) == 0
    assert Image.open(out / "000000.png").size == (16, 16)


def test_the_mask_on_the_latent_grid_keeps_only_whole_cells() -> None:
    space = LatentSpace(torch.nn.Conv2d(1, 1, 1), LatentShape(3, 4, 2), scaling_factor=1.0,
                        shift_factor=0.0)
    keep = torch.ones(1, 1, 4, 4)
    keep[0, 0, 0, 1] = 0  # one repainted pixel in the top-left cell
    assert torch.equal(space.state_mask(keep), torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]]))


# ---------------------------------------------------------------------------------------------
# diffunet encode


def test_encode_builds_the_cache_that_train_then_reuses(vae_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    config = str(_write_config(tmp_path, vae_dir))
    assert cli.main(["encode", config, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "encoded 24 of 24 images and their mirrors (1 shards)" in err and "images/s" in err
    assert cli.main(["encode", config, "--no-progress"]) == 0
    assert "nothing to encode" in capsys.readouterr().err
    said: list[str] = []
    train(_cfg(tmp_path, vae_dir, "train.max_steps=1"), tmp_path / "out", progress=False,
          say=said.append)
    assert next(m for m in said if m.startswith("latents: ")).endswith(": reused")


def test_encode_refuses_a_pixel_config_and_a_users_folder(tmp_path: Path, vae_dir: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["encode", "data.builtin_size=8", "--no-progress"]) == 2
    assert "names no VAE" in capsys.readouterr().err
    mine = tmp_path / "cache"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert cli.main(["encode", str(_write_config(tmp_path, vae_dir)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "data.latent_cache" in err and "--overwrite" not in err and len(err.splitlines()) == 1
    assert (mine / "notes.txt").read_text() == "mine" and len(list(mine.iterdir())) == 1


@pytest.mark.slow
def test_two_processes_split_the_encode_and_write_the_same_cache(
        vae_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = str(_write_config(tmp_path, vae_dir))
    # 3 shards of 1,024 (the last of one image): two rounds of two processes; 8x8 images and
    # no mirrors keep it cheap
    size = ["data.builtin_size=2049", "data.image_size=8", "data.random_flip=false"]
    r = launch_two(["encode", config, *size, "data.latent_cache=" + str(tmp_path / "two"),
                    "--no-progress"], cpu_env(), timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("encoded 2,049 of 2,049 images") == 1 and "2 processes" in r.stderr
    assert cli.main(["encode", config, *size, "data.latent_cache=" + str(tmp_path / "one"),
                     "--no-progress"]) == 0
    one = json.loads((tmp_path / "one" / latent_cache.MANIFEST).read_text())
    two = json.loads((tmp_path / "two" / latent_cache.MANIFEST).read_text())
    assert len(two["shards"]) == 3
    assert [e["sha256"] for e in two["shards"]] == [e["sha256"] for e in one["shards"]]


def test_eval_nfe_and_eval_ema_judge_decoded_images(vae_dir: Path, tmp_path: Path) -> None:
    from diffunet.judge import quality_per_nfe
    from diffunet.phema_eval import judge_ema_lengths
    # 64x64 images as 4x32x32 latents: decoded, then downscaled to the judge's 32x32
    cfg = _cfg(tmp_path, vae_dir, "data.image_size=64", "train.max_steps=2",
               "train.guide_at=0", "train.sample_every=100", "unet.channel_mults=[1]",
               "data.random_flip=false")
    train(cfg, tmp_path / "run", progress=False)
    nfe = quality_per_nfe(_model(tmp_path / "run", 2), num_images=4, budgets=[2],
                          samplers=["euler"], grids=["karras"], num_reference=8, batch_size=4,
                          cache_dir=None)
    assert len(nfe.rows) == 1 and math.isfinite(nfe.rows[0].fid)
    ema = judge_ema_lengths(tmp_path / "run", [0.1], num_images=4, num_steps=2,
                            num_reference=8, batch_size=4)
    assert len(ema.rows) == 1 and math.isfinite(ema.rows[0].fid)


def test_info_names_the_vae_and_the_image_size(latent_model: Path, vae_dir: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["info", str(latent_model)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("data space"))
    assert f"latents of the VAE {vae_dir}: 4x8x8 states, 16x16 images" in line
    assert vae_identity(VaeConfig(path=str(vae_dir)))["weights_sha256"] in line


# ---------------------------------------------------------------------------------------------
# Export and import with the VAE


def _latent_file(path: Path, vae: Path, formulation: str, scaling: float | None = None,
                 sample: dict | None = None) -> tuple[torch.nn.Module, object]:
    """A latent model file (4x8x8 latents of ``vae``, 16x16 images) of a perturbed tiny UNet,
    recording ``vae`` scaled by ``scaling`` (default: its config's)."""
    import diffunet
    from diffunet import ScheduleConfig, UNet, UNetConfig
    from diffunet.data_space import folder_record
    from diffunet.formulations import make_schedule
    from helpers import perturbed, tiny_net

    record = folder_record(VaeConfig(path=str(vae)), vae)
    if scaling is not None:
        record["scaling_factor"] = scaling
    net = perturbed(UNet(UNetConfig(**tiny_net(8, in_channels=4))), seed=3).eval()
    schedule = make_schedule(ScheduleConfig(formulation=formulation))
    diffunet.save_model(path, net, schedule, extra={"vae": record, "run_config": {
        "sample": sample or {}}})
    return net, schedule


def _decoded(states: torch.Tensor, vae: Path, scaling: float) -> np.ndarray:
    space = LatentSpace.load(VaeConfig(path=str(vae), scaling_factor=scaling))
    return (space.decode(states) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("scaling", [None, 0.7], ids=["vae-scaling", "own-scaling"])
def test_a_vp_latent_model_exports_as_an_ldm_pipeline_that_samples_the_same_images(
        vae_dir: Path, tmp_path: Path, scaling: float | None) -> None:
    import diffunet
    from diffunet.interop import export_diffusers

    torch.set_num_threads(1)
    net, schedule = _latent_file(tmp_path / "m.safetensors", vae_dir, "vp", scaling,
                                 {"spacing": "trailing", "clip_x0": True})
    r = export_diffusers(tmp_path / "m.safetensors", tmp_path / "pipe")
    assert (r["pipeline"], r["scheduler"], r["vae"]) == ("LDMPipeline", "DDIMScheduler", "vqvae")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["vqvae"] == ["diffusers", "AutoencoderKL"]
    assert (tmp_path / "pipe" / "vqvae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (vae_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    # the VAE's own config byte for byte where the model used its scaling; else the model's in it
    same = (tmp_path / "pipe" / "vqvae" / "config.json").read_bytes() == \
        (vae_dir / "config.json").read_bytes()
    assert same is (scaling is None)
    diffusers.utils.logging.set_verbosity_error()
    pipe = diffusers.LDMPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.clip_sample is False  # latents are not in [-1, 1]
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(4),
                  num_inference_steps=10, output_type="np").images
    g = torch.Generator().manual_seed(4)
    x_T = torch.randn(2, 4, 8, 8, generator=g)  # as LDMPipeline draws
    with torch.no_grad():
        states = diffunet.sample(net, schedule, x_T, num_steps=10, sampler="ddim",
                                 spacing="trailing", clip_x0=False, generator=g)
    ours = _decoded(states, vae_dir, 0.18215 if scaling is None else scaling)
    assert theirs.shape == (2, 16, 16, 3)
    assert ((theirs > 0) & (theirs < 1)).mean() > 0.3
    assert float(np.abs(ours - theirs).max()) < 1e-4


def test_a_flow_latent_model_exports_its_vae_beside_the_unet_and_imports_back(
        vae_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from diffunet.checkpoint import load_model_file

    _latent_file(tmp_path / "m.safetensors", vae_dir, "flow")
    assert cli.main(["export", str(tmp_path / "m.safetensors"), str(tmp_path / "pipe")]) == 0
    assert "UNet2DModel + scheduler + AutoencoderKL, no pipeline class" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "pipe").iterdir()) == ["scheduler", "unet", "vae"]
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "pipe", subfolder="vae")
    assert vae.config.latent_channels == 4
    assert cli.main(["import", str(tmp_path / "pipe"), str(tmp_path / "back.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "latent model: 4-channel latents of the AutoencoderKL" in out
    original = read_metadata(tmp_path / "m.safetensors")["vae"]
    back = read_metadata(tmp_path / "back.safetensors")["vae"]
    assert back["path"] == str((tmp_path / "pipe").resolve()) and back["subfolder"] == "vae"
    same = ("config_sha256", "weights_sha256", "scaling_factor", "shift_factor",
            "latent_channels", "factor")
    assert {k: back[k] for k in same} == {k: original[k] for k in same}
    a, b = load_model_file(tmp_path / "m.safetensors"), load_model_file(tmp_path / "back.safetensors")
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert cli.main(["info", str(tmp_path / "back.safetensors")]) == 0
    assert f"latents of the VAE {(tmp_path / 'pipe').resolve()} (subfolder vae)" in \
        capsys.readouterr().out
    # the imported file samples through the exported VAE, to 16x16 images
    assert _sample(str(tmp_path / "back.safetensors"), "--num-samples", "1", "--steps", "2",
                   "--out-dir", str(tmp_path / "s")) == 0
    assert Image.open(tmp_path / "s" / "000000.png").size == (16, 16)


def test_exporting_a_latent_model_refuses_another_vae_or_a_lost_one(
        vae_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _latent_file(tmp_path / "m.safetensors", vae_dir, "vp")
    other = _save_vae(tmp_path / "other-vae", 1)
    assert cli.main(["export", str(tmp_path / "m.safetensors"), str(tmp_path / "pipe"),
                     "--vae", str(other)]) == 2
    err = capsys.readouterr().err
    assert "is not the VAE" in err and len(err.splitlines()) == 1
    moved = tmp_path / "moved"
    shutil.copytree(vae_dir, moved)
    record = read_metadata(tmp_path / "m.safetensors")
    _latent_file(tmp_path / "gone.safetensors", moved, "vp")
    shutil.rmtree(moved)
    assert cli.main(["export", str(tmp_path / "gone.safetensors"), str(tmp_path / "pipe")]) == 2
    err = capsys.readouterr().err
    assert "pass --vae PATH" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "pipe").exists()
    assert record["vae"]["path"] == str(vae_dir)
    # the VAE given back by --vae: exported
    assert cli.main(["export", str(tmp_path / "gone.safetensors"), str(tmp_path / "pipe"),
                     "--vae", str(vae_dir)]) == 0


def test_importing_a_pipeline_whose_vae_does_not_fit_is_one_line(
        vae_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _latent_file(tmp_path / "m.safetensors", vae_dir, "vp")
    assert cli.main(["export", str(tmp_path / "m.safetensors"), str(tmp_path / "pipe")]) == 0
    config = tmp_path / "pipe" / "vqvae" / "config.json"
    text = config.read_text()
    cases = {
        "vq": (text.replace('"AutoencoderKL"', '"VQModel"'), "not an AutoencoderKL"),
        "channels": (text.replace('"latent_channels": 4', '"latent_channels": 3'),
                     "the UNet does not fit its VAE"),
    }
    for name, (changed, words) in cases.items():
        config.write_text(changed)
        assert cli.main(["import", str(tmp_path / "pipe"), str(tmp_path / f"{name}.safetensors")]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.splitlines()) == 1, (name, err)
        assert not (tmp_path / f"{name}.safetensors").exists()
    config.write_text(text)
    weights = tmp_path / "pipe" / "vqvae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    assert cli.main(["import", str(tmp_path / "pipe"), str(tmp_path / "bin.safetensors")]) == 2
    assert "never loads" in capsys.readouterr().err


def test_the_latent256_preset_trains_sd_vae_latents_of_256_pixel_images(tmp_path: Path) -> None:
    """configs/latent256.toml with a local folder holding the config.json of Stable Diffusion's
    VAE (its shape only: load_run_config reads no weights): 256x256 images as 4x32x32 latents,
    the UNet's shape checked against the VAE's."""
    sd_vae = tmp_path / "sd-vae"
    sd_vae.mkdir()
    (sd_vae / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
        "norm_num_groups": 32, "sample_size": 256, "scaling_factor": 0.18215}))
    preset = Path(__file__).parents[1] / "configs" / "latent256.toml"
    cfg = load_run_config(str(preset), [f"vae.path={sd_vae}"])
    assert (cfg.unet.image_size, cfg.unet.in_channels, cfg.data.image_size) == (32, 4, 256)
    assert cfg.train.mixed_precision == "bf16" and cfg.data.source == "folder"
    assert load_config(preset).vae.path == "stabilityai/sd-vae-ft-mse"
    with pytest.raises(ConfigError, match="data.image_size: 260 is not divisible"):
        load_run_config(str(preset), [f"vae.path={sd_vae}", "data.image_size=260"])


# ---------------------------------------------------------------------------------------------
# The shipped VAE of the built-in shapes


def test_the_shapes_vae_training_is_deterministic_and_loads(tmp_path: Path) -> None:
    from diffunet.shapes_vae import VaeTraining, train_shapes_vae
    how = VaeTraining(steps=2, batch_size=2, image_size=16, crop=8, eval_images=4,
                      std_images=8)
    files, record = train_shapes_vae(how)
    again, _ = train_shapes_vae(how)
    assert files == again  # the same bytes: config and weights
    assert record["settings"]["steps"] == 2 and math.isfinite(record["held_out_psnr_db"])
    folder = tmp_path / "vae"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    space = LatentSpace.load(VaeConfig(path=str(folder)))
    assert space.scaling_factor == record["scaling_factor"] and space.shape.factor == 4
    assert space.encode(torch.zeros(1, 3, 16, 16)).shape == (1, 4, 4, 4)


def test_the_shipped_vae_is_what_its_record_says() -> None:
    from diffunet.data_space import BUILTIN_VAE, BUILTIN_VAE_FOLDER, latent_shape
    record = json.loads((BUILTIN_VAE_FOLDER / "training.json").read_text())
    shape = latent_shape(VaeConfig(path=BUILTIN_VAE))
    assert (shape.image_channels, shape.latent_channels, shape.factor) == (3, 4, 4)
    config = json.loads((BUILTIN_VAE_FOLDER / "config.json").read_text())
    assert config["scaling_factor"] == record["scaling_factor"]
    assert record["held_out_psnr_db"] > 30  # what docs/latent.md quotes


def test_train_vae_refuses_a_folder_of_the_users(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    mine = tmp_path / "out"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert cli.main(["eval", "train-vae", "--out", str(mine), "--steps", "1"]) == 2
    assert "holds files diffunet did not write" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_vae_folder_with_a_fifo_or_no_weights_is_one_line(latent_model: Path, vae_dir: Path,
                                                            tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    fifo, empty = tmp_path / "fifo", tmp_path / "empty"
    for folder in (fifo, empty):
        folder.mkdir()
        shutil.copyfile(vae_dir / "config.json", folder / "config.json")
    os.mkfifo(fifo / "diffusion_pytorch_model.safetensors")  # a read would block forever
    for folder in (fifo, empty):
        assert _sample(str(latent_model), "--num-samples", "1", "--out-dir",
                       str(tmp_path / "out"), "--vae", str(folder)) == 2
        err = capsys.readouterr().err
        assert "diffusion_pytorch_model.safetensors cannot be read" in err
        assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
