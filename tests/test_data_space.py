"""The data space (diffunet/data_space.py): pixels as today, or a VAE's latents, with a tiny
``AutoencoderKL`` built and saved by the test itself (no download): encode/decode shapes, the
scaling, the latent shape, the clip rule, the ``[vae]`` config and the UNet shape that follows
it, and every bad VAE folder refused with one line."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffunet.config import RunConfig, VaeConfig, config_from_dict, load_config, to_dict
from diffunet.data_space import (LatentShape, LatentSpace, PixelSpace, latent_shape,
                                 load_run_config, load_space, space_class)
from diffunet.errors import ConfigError, MissingDependencyError, ModelFileError
from diffunet.formulations.base import CLIP_RANGE, clip_estimate
from processes import clean_env

from helpers import save_tiny_vae

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny AutoencoderKL (2 levels: downsampling 2, 4 latent channels) saved as diffusers
    saves one, safetensors only."""
    folder = save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae", 0, sample_size=32)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json",
                                                        "diffusion_pytorch_model.safetensors"]
    return folder


def _copy(vae_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "vae"
    shutil.copytree(vae_dir, folder)
    return folder


def _edit_config(folder: Path, **changes: object) -> None:
    data = json.loads((folder / "config.json").read_text())
    data.update(changes)
    (folder / "config.json").write_text(json.dumps(data))


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# Pixel space: today's behaviour


def test_pixel_space_is_todays_behaviour() -> None:
    assert space_class(VaeConfig()) is PixelSpace and space_class(RunConfig().vae) is PixelSpace
    space = load_space(VaeConfig())
    assert isinstance(space, PixelSpace)
    assert space.clip_range == CLIP_RANGE == (-1.0, 1.0)
    for asked in (True, False, None):  # the flag passes through unchanged
        assert PixelSpace.clip_x0(asked) is asked
    x = torch.randn(2, 3, 8, 8) * 3
    assert space.encode(x) is x and space.decode(x) is x
    assert space.state_shape(3, 8) == (3, 8, 8)
    # The one clip of an x0 estimate is the [-1, 1] clamp it always was, bit for bit.
    clipped, changed = clip_estimate(x, True)
    assert changed and torch.equal(clipped, x.clamp(-1.0, 1.0))
    assert clip_estimate(x, False)[0] is x


def test_a_pixel_config_loads_as_before(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[unet]\nimage_size = 16\n[data]\nrandom_flip = false\n")
    assert load_run_config(str(path), ["train.max_steps=5"]) == \
        load_config(path, ["train.max_steps=5"])
    assert load_run_config() == load_config() == RunConfig()


def test_importing_diffunet_does_not_import_diffusers() -> None:
    code = ("import sys, diffunet, diffunet.data_space, diffunet.config, diffunet.training; "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(
        PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Latent space


def test_latent_shape_from_the_config_alone(vae_dir: Path) -> None:
    shape = latent_shape(VaeConfig(path=str(vae_dir)))
    assert shape == LatentShape(image_channels=3, latent_channels=4, levels=2)
    assert shape.factor == 2  # 2 ** (len(block_out_channels) - 1)


def test_encode_decode_shapes_and_the_vaes_own_scaling(vae_dir: Path) -> None:
    space = load_space(VaeConfig(path=str(vae_dir), encode_batch_size=3))
    assert isinstance(space, LatentSpace) and space_class(VaeConfig(path="x/y")) is LatentSpace
    assert (space.scaling_factor, space.shift_factor) == (0.18215, 0.0)  # the config's own
    assert space.clip_range is None
    for asked in (True, False, None):  # latents are never clipped, whatever was asked
        assert LatentSpace.clip_x0(asked) is False
    assert space.state_shape(3, 32) == (4, 16, 16)
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, std = space.posterior(images)
    assert mean.shape == std.shape == (5, 4, 16, 16)
    assert mean.dtype == images.dtype and bool((std > 0).all())
    # batches of 3 then 2 encode as one batch would (eval mode: no batch statistics)
    whole = LatentSpace(space.vae, space.shape, scaling_factor=space.scaling_factor,
                        shift_factor=0.0, batch_size=64).posterior(images)[0]
    torch.testing.assert_close(mean, whole, rtol=1e-5, atol=1e-6)
    x0 = space.encode(images)
    assert torch.equal(x0, space.scale(mean))
    decoded = space.decode(x0)
    assert decoded.shape == images.shape and decoded.dtype == images.dtype
    ref = space.vae.decode(mean).sample  # decode undoes the scaling before the VAE sees it
    torch.testing.assert_close(decoded, ref, rtol=1e-4, atol=1e-5)


def test_the_scaling_round_trip_is_exact(vae_dir: Path) -> None:
    space = load_space(VaeConfig(path=str(vae_dir), scaling_factor=0.5, shift_factor=0.25))
    assert (space.scaling_factor, space.shift_factor) == (0.5, 0.25)  # set: not the VAE's
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    x0 = space.scale(z)
    assert torch.equal(x0, (z - 0.25) * 0.5) and torch.equal(space.unscale(x0), x0 / 0.5 + 0.25)
    # The inverse is exact wherever the arithmetic is (values on a dyadic grid, a power-of-two
    # scale) ...
    grid = torch.randint(-64, 64, (2, 4, 16, 16), generator=torch.Generator().manual_seed(3)) / 16
    assert torch.equal(space.unscale(space.scale(grid)), grid)
    # ... and otherwise off by float32 rounding alone (Stable Diffusion's 0.18215, a shift).
    sd = load_space(VaeConfig(path=str(vae_dir), shift_factor=0.1159))
    assert sd.scaling_factor == 0.18215
    torch.testing.assert_close(sd.unscale(sd.scale(z)), z, rtol=0, atol=1e-6)


def test_images_the_vae_cannot_take_are_refused(vae_dir: Path) -> None:
    space = load_space(VaeConfig(path=str(vae_dir)))
    with pytest.raises(ValueError, match=r"^1-channel images of side 32 do not fit this VAE: it "
                       r"takes 3-channel images whose side is a multiple of its downsampling 2$"):
        space.posterior(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="side 31"):
        space.state_shape(3, 31)


# ---------------------------------------------------------------------------------------------
# The [vae] config and the UNet shape that follows it

_SMALL = "[unet]\nbase_channels = 8\nchannel_mults = [1, 2]\nattn_resolutions = []\n" \
         "num_groups = 4\n"


def test_the_unet_follows_the_vae(vae_dir: Path, tmp_path: Path) -> None:
    path = _toml(tmp_path, _SMALL + f"[vae]\npath = {json.dumps(str(vae_dir))}\n"
                 "[data]\nimage_size = 32\n")
    cfg = load_run_config(str(path))
    assert (cfg.unet.image_size, cfg.unet.in_channels, cfg.unet.output_channels) == (16, 4, 4)
    assert (cfg.data.image_size, cfg.data.channels) == (32, 3)
    assert cfg.vae == VaeConfig(path=str(vae_dir))
    # set and fitting: checked, accepted; the images' size may follow the UNet's instead
    same = load_run_config(str(path), ["unet.in_channels=4", "unet.out_channels=4",
                                       "unet.image_size=16", "data.channels=3"])
    assert same.unet == dataclasses.replace(cfg.unet, out_channels=4)
    path2 = _toml(tmp_path, _SMALL + f"image_size = 16\n[vae]\npath = "
                  f"{json.dumps(str(vae_dir))}\n")
    assert load_run_config(str(path2)).data.image_size == 32
    # a stored config (every key set, the resolved values) loads to the same config
    assert load_run_config(base=to_dict(cfg)) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["unet.in_channels=3"], "unet.in_channels: 3 does not fit the VAE's 4 latent channels; "
     "leave unet.in_channels unset (it follows the VAE) or set it to 4"),
    (["unet.out_channels=3"], "unet.out_channels: 3 does not fit the VAE's 4 latent channels; "
     "leave unet.out_channels unset (it follows the VAE) or set it to 4"),
    (["unet.image_size=8"], "unet.image_size: 8 does not fit the VAE's latents of "
     "data.image_size 32 (32 / 2 = 16); leave unet.image_size unset (it follows the VAE) or "
     "set it to 16"),
    (["data.channels=1"], "data.channels: 1 does not fit the VAE, which encodes 3-channel "
     "images; leave data.channels unset or set it to 3"),
    # the latent shape does not divide the image size
    (["data.image_size=33"], "data.image_size: 33 is not divisible by the VAE's downsampling 2 "
     "(2^(2-1) for its 2 block_out_channels), so its latents cannot cover the image; use a "
     "multiple of 2, e.g. 32"),
    (["data.image_size=none"], "data.image_size: a latent run ([vae]) needs the images' side "
     "in pixels: set data.image_size (the UNet's then follows: it is / 2, the VAE's "
     "downsampling)"),
    # the latents too small for the UNet's levels: said with where the size came from
    (["data.image_size=12", "unet.channel_mults=[1, 2, 2]"], "unet.image_size: 6 is not "
     "divisible by 4 (2^(levels-1) for 3 levels); use a multiple of 4 or fewer channel_mults "
     "(unet.image_size follows the VAE: data.image_size 12 / 2 = 6)"),
])
def test_a_config_that_does_not_fit_the_vae_is_one_line(vae_dir: Path, tmp_path: Path,
                                                        overrides: list[str],
                                                        message: str) -> None:
    path = _toml(tmp_path, _SMALL + f"[vae]\npath = {json.dumps(str(vae_dir))}\n"
                 "[data]\nimage_size = 32\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(str(path), overrides)
    assert str(e.value) == message


@pytest.mark.parametrize("table, message", [
    ({"path": " "}, "vae.path: is an empty path; give a Hub id or a VAE folder, or leave it "
     "unset for pixel space"),
    ({"revision": "main"}, "vae.revision: needs vae.path (the VAE it applies to); set vae.path "
     "or drop vae.revision"),
    ({"path": "a/b", "subfolder": "../vae"}, "vae.subfolder: must be a folder inside vae.path "
     "(like 'vae'), got '../vae'"),
    ({"path": "a/b", "scaling_factor": 0}, "vae.scaling_factor: must be positive, got 0.0"),
    ({"path": "a/b", "shift_factor": float("nan")}, "vae.shift_factor: must be a finite "
     "number, got nan"),
    ({"path": "a/b", "encode_batch_size": 0}, "vae.encode_batch_size: must be in [1, 65536], "
     "got 0"),
    ({"path": "a/b", "scaling_factor": "big"}, "vae.scaling_factor: expected float or unset, "
     "got 'big'"),
    ({"paht": "a/b"}, "vae.paht: unknown key; did you mean 'path'?"),
])
def test_the_vae_section_checks_itself(table: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(RunConfig, {"vae": table})
    assert str(e.value) == message


# ---------------------------------------------------------------------------------------------
# Bad VAE folders: one line each, naming the problem and the fix


def _load_error(folder: Path | str, **settings: object) -> str:
    with pytest.raises((ConfigError, ModelFileError, MissingDependencyError)) as e:
        load_space(VaeConfig(path=str(folder), **settings))
    text = str(e.value)
    assert "\n" not in text
    return text


def test_a_folder_that_is_not_an_autoencoderkl(vae_dir: Path, tmp_path: Path) -> None:
    folder = _copy(vae_dir, tmp_path)
    _edit_config(folder, _class_name="UNet2DModel")
    assert _load_error(folder) == (
        f"vae.path: {folder}/config.json: describes 'UNet2DModel', not an AutoencoderKL; give "
        "the folder of a diffusers AutoencoderKL (a pipeline's vae/ subfolder: set "
        "vae.subfolder = \"vae\")")
    (folder / "config.json").unlink()
    assert _load_error(folder) == (
        f"vae.path: {folder}: holds no config.json; give a diffusers AutoencoderKL folder "
        "(save_pretrained writes config.json beside its weights)")


def test_a_pickled_bin_is_never_loaded(vae_dir: Path, tmp_path: Path) -> None:
    folder = _copy(vae_dir, tmp_path)
    (folder / "diffusion_pytorch_model.safetensors").rename(
        folder / "diffusion_pytorch_model.bin")  # its bytes do not matter: it is never opened
    assert _load_error(folder) == (
        f"vae.path: {folder}: holds diffusion_pytorch_model.bin only, a pickle, which diffunet "
        "never loads (loading one can run code); convert it where you trust it: "
        "AutoencoderKL.from_pretrained(...).save_pretrained(..., safe_serialization=True)")
    (folder / "diffusion_pytorch_model.bin").unlink()
    assert _load_error(folder) == (
        f"vae.path: {folder}: holds no diffusion_pytorch_model.safetensors (the VAE's weights)")


def _deep(levels: int) -> object:
    value: object = 8
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize("changes, problem", [
    ({"block_out_channels": _deep(40)}, "cannot be read as a VAE config (ValueError: JSON "
     "nested more than 4 levels deep); give the config.json diffusers wrote for the "
     "AutoencoderKL"),
    ({"padding": "x" * (70 << 10)}, "cannot be read as a VAE config (ValueError: {size:,} "
     "bytes, more than the 65,536 such a file can have); give the config.json diffusers wrote "
     "for the AutoencoderKL"),
    ({"latent_channels": "4"}, "latent_channels: expected int, got '4'; not the config "
     "diffusers writes for an AutoencoderKL"),
    ({"block_out_channels": 16}, "block_out_channels: expected a JSON array, got 16; not the "
     "config diffusers writes for an AutoencoderKL"),
    ({"block_out_channels": [8, True]}, "block_out_channels[1]: expected int, got True; not "
     "the config diffusers writes for an AutoencoderKL"),
    ({"in_channels": None}, "in_channels: expected int, got None; not the config diffusers "
     "writes for an AutoencoderKL"),
    ({"block_out_channels": [8, 10**9]}, "block_out_channels[1] = 1000000000 is outside "
     "[1, 4,096]; not a VAE diffunet loads"),
    ({"latent_channels": 0}, "latent_channels = 0 is outside [1, 256]; not a VAE diffunet "
     "loads"),
    ({"in_channels": 4, "out_channels": 4}, "in_channels = 4; diffunet's images have 1 or 3 "
     "channels"),
    ({"out_channels": 1}, "out_channels 1 differs from in_channels 3; the VAE must decode the "
     "images it encodes"),
    ({"scaling_factor": float("nan")}, "scaling_factor = nan is not a finite number"),
    ({"scaling_factor": -1.0}, "scaling_factor = -1.0 must be positive"),
])
def test_a_hostile_config_json_is_refused_before_diffusers_reads_it(
        vae_dir: Path, tmp_path: Path, changes: dict, problem: str) -> None:
    folder = _copy(vae_dir, tmp_path)
    _edit_config(folder, **changes)
    text = _load_error(folder)
    size = (folder / "config.json").stat().st_size
    assert text == f"vae.path: {folder}/config.json: {problem.format(size=size)}"
    with pytest.raises(ModelFileError):  # the shape is read from the same checked file
        latent_shape(VaeConfig(path=str(folder)))


def test_a_path_that_is_no_vae(vae_dir: Path, tmp_path: Path) -> None:
    assert _load_error(tmp_path / "missing") == (
        f"vae.path: {tmp_path}/missing is neither a folder nor a Hub id (owner/name)")
    (tmp_path / "file").write_text("x")
    assert _load_error(tmp_path / "file") == (
        f"vae.path: {tmp_path}/file is a file; give the VAE's folder (holding config.json and "
        "diffusion_pytorch_model.safetensors) or a Hub id")
    assert _load_error(vae_dir, revision="main") == (
        f"vae.revision: is for a Hub id; {vae_dir} is a local folder (drop vae.revision)")
    assert _load_error(vae_dir, subfolder="vae") == (
        f"vae.subfolder: 'vae' is not a folder in {vae_dir}")


def test_a_pipeline_folder_with_a_vae_subfolder(vae_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(vae_dir, tmp_path / "pipe" / "vae")
    space = load_space(VaeConfig(path=str(tmp_path / "pipe"), subfolder="vae"))
    assert space.state_shape(3, 8) == (4, 4, 4)


def test_diffusers_missing_is_one_line(vae_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    assert _load_error(vae_dir) == ("vae.path: a VAE's latents need diffusers (its "
                                    "AutoencoderKL): pip install diffusers")
    # the shape needs no diffusers: the config alone
    assert latent_shape(VaeConfig(path=str(vae_dir))).latent_channels == 4


def test_the_command_line_says_it_in_one_line_and_exits_2(vae_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from diffunet.cli import main
    folder = _copy(vae_dir, tmp_path)
    _edit_config(folder, latent_channels="4")
    out = tmp_path / "run"
    cases = {  # a hostile VAE (its config is read to size the UNet, even for --dry-run) ...
        (f"vae.path={folder}", "data.image_size=32", "--dry-run"):
            f"vae.path: {folder}/config.json: latent_channels: expected int, got '4'; not the "
            "config diffusers writes for an AutoencoderKL",
        # ... a shape that does not fit it, and a stream (a latent run caches the whole set)
        (f"vae.path={vae_dir}", "data.image_size=33"): "data.image_size: 33 is not divisible "
            "by the VAE's downsampling 2 (2^(2-1) for its 2 block_out_channels), so its latents "
            "cannot cover the image; use a multiple of 2, e.g. 32",
        (f"vae.path={vae_dir}", "data.image_size=32", "data.source=hf", "data.name=a/b",
         "data.streaming=true"): "data.streaming: a latent run ([vae]) encodes the whole data "
            "set once into its latent cache, which a stream cannot give; set data.streaming = "
            "false",
    }
    for args, message in cases.items():
        assert main(["train", *args, "--out-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == f"diffunet train: error: {message}\n"
    assert not out.exists()
