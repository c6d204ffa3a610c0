"""Model files: round trips, atomic writes, and every way a file can be wrong."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import diffunet
from diffunet import NoiseSchedule, ScheduleConfig, UNet, UNetConfig, load_model, save_model
from diffunet.checkpoint import FORMAT_VERSION, PLAIN_FORMAT_VERSION, read_metadata
from diffunet.errors import ModelFileError
from helpers import perturbed, tiny_net

TINY = UNetConfig(**tiny_net(base_channels=16, num_groups=8))


def _model(cfg: UNetConfig = TINY, seed: int = 0) -> UNet:
    torch.manual_seed(seed)  # the initial weights too
    net = perturbed(UNet(cfg), seed=seed)  # no zero layer left: the round trip is a real check
    return net.eval()


def _saved(tmp_path: Path, **kw) -> Path:
    path = tmp_path / "model.safetensors"
    save_model(path, _model(), NoiseSchedule(ScheduleConfig(beta_schedule="cosine",
                                                            prediction_type="v")), **kw)
    return path


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    net = _model()
    schedule = NoiseSchedule(ScheduleConfig(num_train_timesteps=500, beta_schedule="cosine",
                                            prediction_type="v"))
    path = tmp_path / "m.safetensors"
    save_model(path, net, schedule, extra={"step": 123, "note": {"a": [1, 2]}})
    net2, schedule2, meta = load_model(path)
    assert net2.config == net.config and schedule2.config == schedule.config
    assert meta["step"] == 123 and meta["note"] == {"a": [1, 2]}
    assert meta["format_version"] == PLAIN_FORMAT_VERSION  # 2 only for a file with a guide
    assert meta["diffunet_version"] == diffunet.__version__
    assert len(meta["sha256"]) == 64
    assert not net2.training
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 400])
    with torch.no_grad():
        assert torch.equal(net(x, t), net2(x, t))
    assert torch.equal(schedule.alphas_cumprod, schedule2.alphas_cumprod)


def test_metadata_is_plain_json_in_the_header(tmp_path: Path) -> None:
    meta = read_metadata(_saved(tmp_path))
    assert meta["unet_config"]["channel_mults"] == [1, 2]
    assert meta["schedule_config"]["prediction_type"] == "v"


def test_wrapped_model_saves_the_bare_weights(tmp_path: Path) -> None:
    class Wrapper(torch.nn.Module):  # what DDP / Accelerate hand back
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    net = _model()
    path = tmp_path / "w.safetensors"
    save_model(path, Wrapper(net), NoiseSchedule())
    net2, _, _ = load_model(path)
    assert set(net2.state_dict()) == set(net.state_dict())


def test_write_is_atomic_and_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    path = _saved(tmp_path)
    old = path.read_bytes()
    # At the moment the new file takes the name, the whole new file is already written beside
    # it and the old one is still whole: a reader never sees a partial model file.
    real_replace, seen = os.replace, []

    def watching(src, dst):
        seen.append((Path(dst).read_bytes() == old, load_model(src)[0] is not None))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", watching)
    save_model(path, _model(seed=1), NoiseSchedule())
    monkeypatch.undo()
    assert seen == [(True, True)]
    assert path.read_bytes() != old
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp files left
    assert load_model(path)[1].config == ScheduleConfig()

    # A write cut short (here: the disk fills up half-way through) leaves the old file and no
    # temporary file.
    import diffunet.fileio as fileio

    class HalfWritten:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            raise OSError(28, "No space left on device")

    before = path.read_bytes()
    monkeypatch.setattr(fileio, "open", lambda *a, **kw: HalfWritten(open(*a, **kw)),
                        raising=False)
    with pytest.raises(OSError, match="No space"):
        save_model(path, _model(seed=2), NoiseSchedule())
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_extra_cannot_override_reserved_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        save_model(tmp_path / "x.safetensors", _model(), NoiseSchedule(),
                   extra={"unet_config": {}})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "nope.safetensors")


def test_folder_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="is a folder"):
        load_model(tmp_path)


def test_pickle_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for name, writer in [("evil.pt", lambda f: pickle.dump(Evil(), f)),
                         ("evil.ckpt", lambda f: torch.save({"x": Evil()}, f))]:
        path = tmp_path / name
        with open(path, "wb") as f:
            writer(f)
        with pytest.raises(ModelFileError, match="never unpickles"):
            load_model(path)
    assert not marker.exists()


def test_not_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"hello, this is not a model file at all")
    with pytest.raises(ModelFileError, match="not a safetensors model file"):
        load_model(path)


def test_truncated_file(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(path)
    path.write_bytes(data[:20])
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(path)


def test_foreign_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(ModelFileError, match="not a diffunet model file"):
        load_model(path)


def _rewrite_metadata(path: Path, change) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    change(header["__metadata__"])
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])


def test_newer_format_version(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    _rewrite_metadata(path, lambda m: m.update(format_version=str(FORMAT_VERSION + 1)))
    with pytest.raises(ModelFileError, match="newer than this diffunet"):
        load_model(path)


@pytest.mark.parametrize("change, words", [
    (lambda m: m.pop("unet_config"), "'unet_config' is missing"),
    (lambda m: m.update(schedule_config="{not json"), "not valid JSON"),
    (lambda m: m.update(format_version="one"), "malformed format_version"),
    (lambda m: m.update(unet_config=json.dumps({"base_channel": 16})), "stored config is invalid"),
])
def test_malformed_metadata(tmp_path: Path, change, words: str) -> None:
    path = _saved(tmp_path)
    _rewrite_metadata(path, change)
    with pytest.raises(ModelFileError, match=words):
        load_model(path)


def test_weights_that_do_not_fit_the_config(tmp_path: Path) -> None:
    path = _saved(tmp_path)

    def widen(m: dict) -> None:
        cfg = json.loads(m["unet_config"])
        cfg["base_channels"] = 32
        m["unet_config"] = json.dumps(cfg)

    _rewrite_metadata(path, widen)
    with pytest.raises(ModelFileError, match="do not fit.*wrong shape"):
        load_model(path)


def test_info_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from diffunet.cli import main

    path = _saved(tmp_path, extra={"step": 42})
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    n = sum(p.numel() for p in _model().parameters())
    assert f"{n:,}" in out and "training step    42" in out and "sha256" in out
    assert main(["info", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == n


def test_info_on_a_bad_file_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 4)
    proc = subprocess.run([sys.executable, "-m", "diffunet", "info", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "not a safetensors model file" in proc.stderr


def test_files_get_the_usual_permissions(tmp_path: Path) -> None:
    """Atomic writes must not leave model files owner-only (a temp file's 0600 mode)."""
    import os

    from diffunet.fileio import atomic_save_image, atomic_write_bytes
    from PIL import Image

    umask = os.umask(0o022)
    try:
        path = _saved(tmp_path)
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        atomic_save_image(Image.new("RGB", (2, 2)), tmp_path / "b.png")
    finally:
        os.umask(umask)
    for p in (path, tmp_path / "a.json", tmp_path / "b.png"):
        assert p.stat().st_mode & 0o777 == 0o644, p
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_fifo_named_like_a_model_file_is_refused_without_blocking(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    with pytest.raises(ModelFileError, match="is not a regular file"):
        load_model(fifo)


@pytest.mark.parametrize("overrides", [
    {},
    {"num_classes": 5, "scale_shift_norm": True},
    {"channel_mults": (1, 2, 3), "num_res_blocks": 2, "image_size": 16, "attn_resolutions": (8, 4),
     "head_channels": 8, "upsample": "transposed", "downsample": "avgpool"},
    {"time_conditioning": False, "out_channels": 4, "attn_resolutions": ()},
])
def test_parameter_count_matches_the_built_network(overrides) -> None:
    from diffunet.resources import parameter_count, parameter_shapes

    cfg = UNetConfig(**tiny_net(**overrides))
    net = UNet(cfg)
    assert parameter_count(cfg) == net.num_parameters()
    assert parameter_shapes(cfg) == {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_parameter_count_of_a_huge_config_allocates_nothing() -> None:
    from diffunet.resources import parameter_count

    assert parameter_count(UNetConfig(base_channels=100_000, num_groups=4)) > 10 ** 13


def test_sha256_is_the_whole_file_and_metadata_cannot_replace_it(tmp_path: Path) -> None:
    import hashlib

    path = _saved(tmp_path)
    _rewrite_metadata(path, lambda m: m.update(sha256=json.dumps("0" * 64)))
    assert load_model(path)[2]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_non_finite_weights_name_the_first_bad_tensor(tmp_path: Path) -> None:
    from diffunet.checkpoint import load_model_file

    net = _model()
    names = list(net.state_dict())
    with torch.no_grad():
        net.state_dict()[names[4]].view(-1)[0] = float("nan")
        net.state_dict()[names[2]].view(-1)[1] = float("inf")
    path = tmp_path / "nan.safetensors"
    save_model(path, net, NoiseSchedule())
    with pytest.raises(ModelFileError, match=f"tensor {names[2]} holds 1 non-finite"):
        load_model(path)
    loaded = load_model_file(path, check_finite=False)
    assert loaded.nonfinite == (names[2], 1, net.state_dict()[names[2]].numel())


def test_metadata_is_checked_before_the_tensor_bytes_are_read(tmp_path: Path) -> None:
    # read_metadata reads the header only; a header whose offsets run past the end is refused
    # from the header alone.
    path = _saved(tmp_path)
    size = path.stat().st_size
    assert read_metadata(path)["unet_config"]["base_channels"] == 16
    with open(path, "r+b") as f:
        f.truncate(size - 4)
    with pytest.raises(ModelFileError, match="is truncated"):
        read_metadata(path)


def test_a_symlink_to_a_device_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "model.safetensors"
    link.symlink_to("/dev/zero")
    with pytest.raises(ModelFileError, match="is not a regular file"):
        load_model(link)


def test_the_memory_check_uses_what_the_address_space_limit_leaves() -> None:
    import resource

    from diffunet.resources import available_bytes

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    assert available_bytes("cpu") > 0
    if soft == resource.RLIM_INFINITY:
        pid = os.fork()
        if pid == 0:  # in a child: the limit cannot be raised back
            code = 1
            try:
                used = int(next(line for line in open("/proc/self/status")
                                if line.startswith("VmSize:")).split()[1]) * 1024
                resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), hard))
                code = 0 if available_bytes("cpu") <= 1 << 30 else 1
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
