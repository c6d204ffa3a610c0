"""The latent cache (diffunet/latent_cache.py): a data set encoded once through a tiny
``AutoencoderKL`` built and saved by the test itself, into hash-checked shards (the shard size
made 2 here so that 5 images make 3 shards): content equal to direct encoding, the manifest,
reuse, refusal of other data / another VAE / other settings, resume after a killed encode,
damaged shards, flips, a folder of the user's, and where a cache lives by default."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffunet import latent_cache
from diffunet.config import DataConfig, RunConfig, may_change_on_resume
from diffunet.data import build_dataset
from diffunet.data_space import LatentSpace, load_run_config, load_space
from diffunet.errors import ConfigError, FolderError, ModelFileError
from diffunet.latent_cache import MANIFEST, LatentCache, encode_dataset, shard_name

from helpers import save_tiny_vae

diffusers = pytest.importorskip("diffusers")

_SMALL = "[unet]\nbase_channels = 8\nchannel_mults = [1, 2]\nattn_resolutions = []\n" \
         "num_groups = 4\n"
NAMES = [shard_name(k) for k in range(3)]


def _save_vae(folder: Path, seed: int) -> Path:
    return save_tiny_vae(folder, seed)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny AutoencoderKL (downsampling 2, 4 latent channels), safetensors only."""
    return _save_vae(tmp_path_factory.mktemp("vae") / "tiny-vae", 0)


@pytest.fixture(autouse=True)
def small_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latent_cache, "SHARD_SIZE", 2)


def _images(folder: Path, n: int = 5, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    pixels = torch.randint(0, 256, (start + n, 16, 16, 3), generator=g, dtype=torch.uint8)
    for i in range(start, start + n):
        Image.fromarray(pixels[i].numpy()).save(folder / f"img{i}.png")
    return folder


def _cfg(tmp_path: Path, vae: Path, *overrides: str, cache: str | None = "cache") -> RunConfig:
    text = (_SMALL + f"[vae]\npath = {json.dumps(str(vae))}\n[data]\nsource = \"folder\"\n"
            f"path = {json.dumps(str(tmp_path / 'images'))}\nimage_size = 16\n")
    if cache is not None:
        text += f"latent_cache = {json.dumps(str(tmp_path / cache))}\n"
    path = tmp_path / "run.toml"
    path.write_text(text)
    return load_run_config(str(path), list(overrides))


def _space(cfg: RunConfig) -> LatentSpace:
    space = load_space(cfg.vae)
    assert isinstance(space, LatentSpace)
    return space


def _stats(folder: Path) -> dict[str, tuple[int, int]]:
    return {n: (os.stat(folder / n).st_ino, os.stat(folder / n).st_mtime_ns) for n in NAMES}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_content_manifest_and_flips(vae_dir: Path, tmp_path: Path) -> None:
    _images(tmp_path / "images")
    cfg = _cfg(tmp_path, vae_dir)
    space = _space(cfg)
    folder = encode_dataset(cfg, space)
    assert folder == tmp_path / "cache"
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST, *NAMES])
    # the content is the posterior of each image (and of its mirror), in float16
    images = torch.stack([build_dataset(cfg.data)[i][0] for i in range(5)])
    mean, std = space.posterior(images)
    mean_f, std_f = space.posterior(images.flip(-1))
    cache = LatentCache(folder)
    assert len(cache) == 5 and cache.flips
    for i in range(5):
        m, s = cache.get(i)
        assert m.shape == s.shape == (4, 8, 8) and m.dtype == torch.float32
        assert torch.equal(m, mean[i].half().float()) and torch.equal(s, std[i].half().float())
        mf, sf = cache.get(i, flipped=True)
        assert torch.equal(mf, mean_f[i].half().float()) and torch.equal(sf, std_f[i].half().float())
    # a latent's mirror is not the mirror's latent: that is why the mirrors are encoded
    assert not torch.allclose(mean_f, mean.flip(-1), atol=1e-3)
    # the manifest names the data, the VAE, the settings and each shard
    doc = json.loads((folder / MANIFEST).read_text())
    data = doc["data"]
    assert (data["source"], data["path"], data["image_size"], data["channels"],
            data["num_images"]) == ("folder", str((tmp_path / "images").resolve()), 16, 3, 5)
    assert len(data["fingerprint"]) == 64
    assert doc["vae"] == {"path": str(vae_dir), "revision": None, "subfolder": None,
                          "config_sha256": _sha(vae_dir / "config.json"),
                          "weights_sha256": _sha(vae_dir / "diffusion_pytorch_model.safetensors")}
    assert doc["settings"] == {"scaling_factor": 0.18215, "shift_factor": 0.0, "random_flip": True,
                               "shard_size": 2, "dtype": "float16", "latent_shape": [4, 8, 8]}
    assert [(e["name"], e["start"], e["stop"]) for e in doc["shards"]] == \
        [(NAMES[0], 0, 2), (NAMES[1], 2, 4), (NAMES[2], 4, 5)]
    assert all(e["sha256"] == _sha(folder / e["name"]) for e in doc["shards"])
    assert doc["files"] == NAMES


def test_draw_uses_the_callers_generator(vae_dir: Path, tmp_path: Path) -> None:
    _images(tmp_path / "images")
    cfg = _cfg(tmp_path, vae_dir, "vae.scaling_factor=0.5", "vae.shift_factor=0.25")
    cache = LatentCache(encode_dataset(cfg, _space(cfg)))
    mean, std = cache.batch([0, 3, 4], [False, True, False])  # (3, 4, 8, 8)
    assert mean.shape == std.shape == (3, 4, 8, 8)
    assert torch.equal(mean[1], cache.get(3, flipped=True)[0])
    assert torch.equal(std[2], cache.get(4)[1])
    x0 = cache.draw(mean, std, torch.Generator().manual_seed(5))
    again = cache.draw(mean, std, torch.Generator().manual_seed(5))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(x0, again) and torch.equal(x0, (mean + std * noise - 0.25) * 0.5)


def test_a_finished_cache_is_reused(vae_dir: Path, tmp_path: Path) -> None:
    _images(tmp_path / "images")
    cfg = _cfg(tmp_path, vae_dir)
    folder = encode_dataset(cfg, _space(cfg))
    before, manifest = _stats(folder), (folder / MANIFEST).read_bytes()
    written: list[int] = []
    assert encode_dataset(cfg, _space(cfg), on_shard=written.append) == folder
    assert written == [] and _stats(folder) == before
    assert json.loads((folder / MANIFEST).read_text())["shards"] == \
        json.loads(manifest)["shards"]


class _Killed(Exception):
    pass


def test_a_killed_encode_resumes(vae_dir: Path, tmp_path: Path) -> None:
    _images(tmp_path / "images")
    cfg = _cfg(tmp_path, vae_dir)

    def kill_after_shard_1(k: int) -> None:
        if k == 1:
            raise _Killed

    with pytest.raises(_Killed):
        encode_dataset(cfg, _space(cfg), on_shard=kill_after_shard_1)
    folder = tmp_path / "cache"
    doc = json.loads((folder / MANIFEST).read_text())
    assert [e["name"] for e in doc["shards"]] == NAMES[:2]  # both finished shards recorded
    with pytest.raises(FolderError, match=r"unfinished latent cache \(2 of 3 shards\)"):
        LatentCache(folder)
    kept = {n: (os.stat(folder / n).st_ino, os.stat(folder / n).st_mtime_ns) for n in NAMES[:2]}
    written: list[int] = []
    encode_dataset(cfg, _space(cfg), on_shard=written.append)
    assert written == [2]  # only the missing shard
    assert {n: (os.stat(folder / n).st_ino, os.stat(folder / n).st_mtime_ns)
            for n in NAMES[:2]} == kept
    # the same bytes as an encode that was never killed (shards are deterministic)
    whole = encode_dataset(_cfg(tmp_path, vae_dir, cache="whole"), _space(cfg))
    assert all((folder / n).read_bytes() == (whole / n).read_bytes() for n in NAMES)


def test_another_data_vae_or_settings_is_refused(vae_dir: Path, tmp_path: Path) -> None:
    _images(tmp_path / "images")
    cfg = _cfg(tmp_path, vae_dir)
    folder = encode_dataset(cfg, _space(cfg))
    before, manifest = _stats(folder), (folder / MANIFEST).read_bytes()
    other_vae = shutil.copytree(vae_dir, tmp_path / "vae2")
    retrained = _save_vae(tmp_path / "vae3", 1)
    cases = [(_cfg(tmp_path, vae_dir, "data.random_flip=false"),
              "settings.random_flip is true there, false here"),
             (_cfg(tmp_path, vae_dir, "vae.scaling_factor=0.5"),
              "settings.scaling_factor is 0.18215 there, 0.5 here"),
             (_cfg(tmp_path, other_vae), "vae.path is "),
             (_cfg(tmp_path, retrained), "vae.path is ")]
    for other, difference in cases:
        with pytest.raises(FolderError) as e:
            encode_dataset(other, _space(other))
        assert str(e.value).startswith(f"data.latent_cache: {folder} holds a latent cache of "
                                       "other data, another VAE or other settings (")
        assert difference in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(FolderError, match="other data, another VAE or other settings"):
            LatentCache(folder, latent_cache.cache_record(other.data, other.vae, _space(other), 5))
    # other images in the data folder are other data
    _images(tmp_path / "images", n=1, start=5)
    with pytest.raises(FolderError, match=r"\(data\.fingerprint is "):
        encode_dataset(cfg, _space(cfg))
    assert _stats(folder) == before and (folder / MANIFEST).read_bytes() == manifest


def test_weights_replaced_under_the_same_path_are_another_vae(vae_dir: Path,
                                                               tmp_path: Path) -> None:
    _images(tmp_path / "images")
    vae = shutil.copytree(vae_dir, tmp_path / "vae")
    cfg = _cfg(tmp_path, vae)
    folder = encode_dataset(cfg, _space(cfg))
    retrained = _save_vae(tmp_path / "retrained", 1)
    shutil.copyfile(retrained / "diffusion_pytorch_model.safetensors",
                    vae / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FolderError, match=r"\(vae\.weights_sha256 is "):
        encode_dataset(cfg, _space(cfg))
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST, *NAMES])


@pytest.mark.parametrize("damage", ["byte", "truncated", "swapped"])
def test_a_damaged_shard_is_refused(vae_dir: Path, tmp_path: Path, damage: str) -> None:
    _images(tmp_path / "images")
    cfg = _cfg(tmp_path, vae_dir)
    folder = encode_dataset(cfg, _space(cfg))
    one = folder / NAMES[1]
    data = one.read_bytes()
    if damage == "byte":
        one.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    elif damage == "truncated":
        one.write_bytes(data[: len(data) // 2])
    else:
        zero = folder / NAMES[0]
        first = zero.read_bytes()
        zero.write_bytes(data)
        one.write_bytes(first)
    bad = NAMES[0] if damage == "swapped" else NAMES[1]
    message = (f"data.latent_cache: {folder / bad} does not hash to the SHA-256 the manifest "
               "records (damaged, truncated or replaced); remove it and encode again (only that "
               "shard is re-encoded)")
    with pytest.raises(ModelFileError) as e:
        encode_dataset(cfg, _space(cfg))
    assert str(e.value) == message
    with pytest.raises(ModelFileError) as e:
        LatentCache(folder).get(0 if damage == "swapped" else 2)
    assert str(e.value) == message
    # removed, they are encoded again, to the same bytes as before (the recorded SHA-256)
    recorded = json.loads((folder / MANIFEST).read_text())["shards"]
    for name in NAMES[:2] if damage == "swapped" else [bad]:
        (folder / name).unlink()
    encode_dataset(cfg, _space(cfg))
    assert [_sha(folder / n) for n in NAMES] == [e["sha256"] for e in recorded]
    LatentCache(folder).get(3)


def test_without_flips_no_mirrors_are_stored(vae_dir: Path, tmp_path: Path) -> None:
    _images(tmp_path / "images")
    cfg = _cfg(tmp_path, vae_dir, "data.random_flip=false")
    cache = LatentCache(encode_dataset(cfg, _space(cfg)))
    assert not cache.flips and cache.get(4)[0].shape == (4, 8, 8)
    with pytest.raises(ValueError, match="holds no mirrored images"):
        cache.get(0, flipped=True)


def test_a_folder_of_the_users_is_refused(vae_dir: Path, tmp_path: Path) -> None:
    _images(tmp_path / "images")
    cfg = _cfg(tmp_path, vae_dir)
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FolderError) as e:
        encode_dataset(cfg, _space(cfg))
    assert str(e.value) == (f"data.latent_cache {folder} holds files diffunet did not write (e.g. "
                            "notes.txt); move them away, or choose another data.latent_cache")
    (folder / "notes.txt").unlink()
    (folder / NAMES[0]).write_text("also mine")  # a name the cache would write
    with pytest.raises(FolderError) as e:
        encode_dataset(cfg, _space(cfg))
    assert str(e.value) == (f"{folder} already holds latent cache files but no {MANIFEST}, so "
                            f"diffunet cannot tell they are its own (e.g. {NAMES[0]}, which this "
                            "run would write); it never replaces them: move them away, or "
                            "choose another data.latent_cache")
    assert (folder / NAMES[0]).read_text() == "also mine"
    assert sorted(p.name for p in folder.iterdir()) == [NAMES[0]]


def test_where_a_cache_lives_by_default(vae_dir: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _images(tmp_path / "images")
    cfg = _cfg(tmp_path, vae_dir, cache=None)
    folder = encode_dataset(cfg, _space(cfg))  # a folder: beside it, keyed by the record
    assert folder.parent == tmp_path and folder.name.startswith("images.latents-")
    flipless = _cfg(tmp_path, vae_dir, "data.random_flip=false", cache=None)
    assert encode_dataset(flipless, _space(flipless)) != folder  # other settings: other folder
    monkeypatch.setenv("DIFFUNET_CACHE", str(tmp_path / "user-cache"))
    named = _cfg(tmp_path, vae_dir, "data.source=builtin", "data.path=none",
                 "data.builtin_size=3", cache=None)
    where = encode_dataset(named, _space(named))  # a named set: under the user cache
    assert where.parent == tmp_path / "user-cache" / "latents" and len(LatentCache(where)) == 3


def test_a_manifest_that_is_not_a_caches_is_refused(vae_dir: Path, tmp_path: Path) -> None:
    _images(tmp_path / "images")
    cfg = _cfg(tmp_path, vae_dir)
    folder = encode_dataset(cfg, _space(cfg))
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(FolderError, match=r"^data\.latent_cache: .*latent_cache\.json cannot be "
                       r"read"):
        LatentCache(folder)
    with pytest.raises(FolderError, match=r"latent_cache\.json is not a readable diffunet latent "
                       r"cache manifest .*choose another data\.latent_cache$"):
        encode_dataset(cfg, _space(cfg))
    assert (folder / MANIFEST).read_text() == "{not json"  # never replaced


def test_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.latent_cache: is empty"):
        load_run_config(None, ["data.latent_cache= "])
    # where the cache lives may change on resume: its identity is checked, not its place
    assert may_change_on_resume(DataConfig, "latent_cache")
    assert load_run_config(None, ["data.latent_cache=~/c"]).data.latent_cache == "~/c"
