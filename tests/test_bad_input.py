"""Bad input at the command line: one line naming the problem and the fix, exit code 2, no
traceback, nothing written. Plus the security guarantees: nothing from a stranger's file is
unpickled, and no path taken from a config or a model file leads a write out of its folder.

Every case runs the real command line in a process of its own. Starting Python and importing
torch takes over a second per process on the 2-core CI machine, so the cases are forked from one
interpreter that has imported diffunet once (:data:`hostile.RUNNER`): the child runs
``cli.main`` exactly as ``python -m diffunet`` does (an uncaught exception prints its traceback
and exits 1), with its own stdout, stderr, exit code and file system effects. A few cases also
go through the real ``python -m diffunet`` and the ``diffunet`` console script to show the two
agree.

The inputs (configs, image folders, damaged model files and run folders) are built once per
module; phase 1 runs the few commands that must succeed to make run folders to damage, phase 2
runs every bad-input case. Each case is then one parametrized test that checks its result.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
import pickle
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffunet
from diffunet import ScheduleConfig, UNet, UNetConfig
from diffunet.checkpoint import FORMAT_VERSION
from diffunet.sampling import image_name
from diffunet.state import state_name
from helpers import RUN_HEADER, tiny_run
from hostile import RUNNER
from processes import cpu_env

# A tiny valid run; each config case adds one problem to it.
SMALLER = ("data.builtin_size=16", "train.batch_size=2", "train.max_steps=2",
           "train.save_every=2", "sample.num_images=2")
TINY = tiny_run(*SMALLER, image_size=8)
FOLDER16 = tiny_run(*SMALLER, "data.source=folder", image_size=16)
T = 20  # the tiny model's training timesteps


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def run_forked(argvs: list[list[str]], cwd: Path, logs: Path) -> list[Result]:
    """Run each ``diffunet`` argv in its own forked process; results in order."""
    logs.mkdir(parents=True, exist_ok=True)
    cases = [{"argv": argv, "cwd": str(cwd), "stdout": str(logs / f"{i}.out"),
              "stderr": str(logs / f"{i}.err")} for i, argv in enumerate(argvs)]
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(cases), env=cpu_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    return [Result(code, Path(c["stdout"]).read_text(), Path(c["stderr"]).read_text())
            for code, c in zip(codes, cases)]


def run_real(argv: list[str], cwd: Path, console_script: bool = False) -> Result:
    """``python -m diffunet ARGV`` (or the ``diffunet`` console script) in a fresh process."""
    script = Path(sys.executable).with_name("diffunet")  # where pip puts the console script
    exe = [str(script)] if console_script and script.exists() else [
        sys.executable, "-m", "diffunet"]
    proc = subprocess.run([*exe, *argv], cwd=cwd, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
    return Result(proc.returncode, proc.stdout, proc.stderr)


# ---------------------------------------------------------------------------------------------
# Inputs


def _tiny_model(path: Path, seed: int = 0, schedule: ScheduleConfig | None = None,
                **overrides) -> Path:
    torch.manual_seed(seed)
    cfg = dict(image_size=8, base_channels=8, channel_mults=(1,), num_res_blocks=1,
               attn_resolutions=(), dropout=0.0, num_groups=4)
    net = UNet(UNetConfig(**{**cfg, **overrides}))
    diffunet.save_model(path, net, diffunet.make_schedule(
        schedule or ScheduleConfig(num_train_timesteps=T)))
    return path


def _rewrite_header(path: Path, change) -> None:
    """Edit the JSON header of a safetensors file in place (keeping the tensor bytes)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    change(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])


def _meta(key: str, value) -> Callable[[dict], None]:
    def change(header: dict) -> None:
        if value is None:
            header["__metadata__"].pop(key)
        else:
            header["__metadata__"][key] = value
    return change


class Payload:
    """Unpickling this creates the file ``marker``: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _model_files(d: Path) -> None:
    m = d / "models"
    m.mkdir()
    good = _tiny_model(m / "good.safetensors")
    data = good.read_bytes()
    (m / "truncated.safetensors").write_bytes(data[:len(data) - 500])
    (m / "header_cut.safetensors").write_bytes(data[:40])
    (m / "empty.safetensors").write_bytes(b"")
    (m / "text.safetensors").write_text("these are not the weights you are looking for\n")
    Image.new("RGB", (8, 8)).save(m / "image.safetensors", format="PNG")
    torch.save({"state_dict": Payload(d / "PWNED_pt")}, m / "model.pt")
    with open(m / "model.ckpt", "wb") as f:
        pickle.dump({"state_dict": Payload(d / "PWNED_ckpt")}, f, protocol=4)
    save_file({"w": torch.zeros(2)}, str(m / "foreign.safetensors"))
    for name, change in [
        ("newer", _meta("format_version", str(FORMAT_VERSION + 1))),
        ("bad_version", _meta("format_version", "1.0-beta")),
        ("no_unet_config", _meta("unet_config", None)),
        ("bad_json", _meta("schedule_config", "{'num_train_timesteps': 20")),
        ("bad_config", _meta("unet_config", json.dumps({"image_size": 8, "base_chanels": 8}))),
        ("impossible_config", _meta("unet_config", json.dumps({"image_size": 8, "num_groups": 0}))),
        ("wrong_shape", _meta("unet_config", json.dumps(
            {"image_size": 8, "base_channels": 16, "channel_mults": [1], "num_res_blocks": 1,
             "attn_resolutions": [], "num_groups": 4}))),
        ("offsets_gone", lambda h: h.pop(next(k for k in h if k != "__metadata__"))),
        ("damaged_offsets", lambda h: h.update({next(k for k in h if k != "__metadata__"):
                                                {"dtype": "F32", "shape": [1]}})),
    ]:
        path = m / f"{name}.safetensors"
        shutil.copy(good, path)
        _rewrite_header(path, change)
    # A well-formed file that lacks one of the network's tensors.
    tensors = load_file(str(good))
    with safe_open(str(good), framework="pt") as f:
        metadata = f.metadata()
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(m / "missing_tensor.safetensors"), metadata=metadata)
    (m / "folder.safetensors").mkdir()
    _tiny_model(m / "cond.safetensors", num_classes=3)
    # guide models (autoguidance): a good one, and one per way a guide can differ
    _tiny_model(m / "weak.safetensors", seed=1, base_channels=4, num_groups=2)
    _tiny_model(m / "edm.safetensors", seed=1, schedule=ScheduleConfig(formulation="edm"))
    _tiny_model(m / "t10.safetensors", seed=1, schedule=ScheduleConfig(num_train_timesteps=10))
    _tiny_model(m / "size16.safetensors", seed=1, image_size=16)
    _tiny_model(m / "gray.safetensors", seed=1, in_channels=1)
    shutil.copy(good, m / "good_copy.safetensors")
    # A stranger's model file whose metadata is full of paths: none of them may matter.
    path = m / "paths.safetensors"
    shutil.copy(good, path)
    _rewrite_header(path, lambda h: h["__metadata__"].update(
        step=json.dumps("../../../escaped"), out_dir=json.dumps(str(d / "escaped")),
        run_config=json.dumps({"data": {"source": "folder", "path": "../../.."}}),
        path=json.dumps("/etc/passwd")))


def _configs(d: Path) -> None:
    c = d / "cfg"
    c.mkdir()
    (c / "unknown_section.toml").write_text("[trian]\nmax_steps = 10\n")
    (c / "unknown_key.toml").write_text("[unet]\nbase_channel = 8\n")
    (c / "wrong_type.toml").write_text('[train]\nmax_steps = "ten"\n')
    (c / "syntax.toml").write_text("[train]\nmax_steps = 10\nlr = = 2e-4\n")
    (c / "not_utf8.toml").write_bytes(b"[train]\nlr = \xff\xfe\n")


def _images(d: Path) -> None:
    img = d / "images"
    (img / "empty").mkdir(parents=True)
    (img / "unreadable").mkdir()
    (img / "unreadable" / "a.png").write_text("not a png")
    (img / "unreadable" / "b.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    (img / "a_file.png").write_bytes(b"x")
    # A mix of sizes and modes, some smaller than the 16x16 the run asks for: all fine.
    mixed = img / "mixed"
    (mixed / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(mixed / "big.jpg")
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(mixed / "small_gray.png")
    Image.new("RGBA", (12, 20), (255, 0, 0, 128)).save(mixed / "sub" / "small_rgba.png")
    Image.new("P", (64, 10)).save(mixed / "sub" / "palette.gif")
    Image.fromarray(np.full((24, 24), 40000, dtype=np.uint16)).save(mixed / "sixteen_bit.png")
    # A file whose header reads fine but whose pixel data is cut off.
    broken = img / "broken"
    broken.mkdir()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(broken / "ok.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(broken / "cut.png")
    (broken / "cut.png").write_bytes((broken / "cut.png").read_bytes()[:200])


# (id, argv with {d} for the inputs folder and {out} for a fresh output path, expected message
# parts). Every case must exit 2 with exactly one line on stderr that starts with
# "diffunet <command>: error: " and contains every part, and must not create {out}.
CASES: list[tuple[str, list[str], list[str]]] = [
    # -- config ---------------------------------------------------------------------------------
    ("config-unknown-section", ["train", "{d}/cfg/unknown_section.toml", "--out-dir", "{out}"],
     ["trian: unknown section; did you mean 'train'?"]),
    ("config-unknown-section-override", ["train", *TINY, "tran.lr=1", "--out-dir", "{out}"],
     ["tran: unknown section; did you mean 'train'?"]),
    ("config-unknown-key", ["train", "{d}/cfg/unknown_key.toml", "--out-dir", "{out}"],
     ["unet.base_channel: unknown key; did you mean 'base_channels'?"]),
    ("config-unknown-key-override", ["train", *TINY, "train.max_step=5", "--out-dir", "{out}"],
     ["train.max_step: unknown key; did you mean 'max_steps'?"]),
    ("config-wrong-type", ["train", "{d}/cfg/wrong_type.toml", "--out-dir", "{out}"],
     ["train.max_steps: expected int, got 'ten'"]),
    ("config-wrong-type-override", ["train", *TINY, "train.lr=fast", "--out-dir", "{out}"],
     ["train.lr: expected float, got 'fast'"]),
    ("config-wrong-choice", ["train", *TINY, "schedule.beta_schedule=cosin", "--out-dir", "{out}"],
     ["schedule.beta_schedule: 'cosin' is not one of", "did you mean 'cosine'?"]),
    ("config-out-of-range", ["train", *TINY, "train.ema_decay=1.5", "--out-dir", "{out}"],
     ["train.ema_decay: must be in [0, 1), got 1.5"]),
    ("config-negative-count", ["train", *TINY, "train.batch_size=-4", "--out-dir", "{out}"],
     ["train.batch_size: must be a positive integer, got -4"]),
    ("config-channels", ["train", *TINY, "data.channels=2", "--out-dir", "{out}"],
     ["data.channels: must be 1 (grayscale) or 3 (RGB), got 2"]),
    ("config-image-size-vs-levels", ["train", *TINY, "unet.image_size=9",
                                     "--out-dir", "{out}"],
     ["unet.image_size: 9 is not divisible by 2", "fewer channel_mults"]),
    ("config-data-vs-unet-size", ["train", *TINY, "data.image_size=16", "--out-dir", "{out}"],
     ["data.image_size: 16 does not match unet.image_size 8; leave data.image_size unset (it "
      "follows the UNet) or set both to the same value"]),
    ("config-groupnorm-groups", ["train", *TINY, "unet.base_channels=6", "--out-dir", "{out}"],
     ["unet.num_groups: 6 channels", "not divisible by 4 groups"]),
    ("config-group-channels", ["train", *TINY, "unet.num_groups=32", "unet.group_channels=3",
                               "--out-dir", "{out}"],
     ["unet.group_channels: 8 channels", "not divisible into groups of 3"]),
    ("config-group-channels-and-groups", ["train", *TINY, "unet.group_channels=4",
                                          "--out-dir", "{out}"],
     ["unet.group_channels: 4 and num_groups 4 both size the GroupNorm groups; set one"]),
    ("config-timestep-density", ["train", *TINY, "schedule.formulation=vp",
                                 "schedule.timestep_density=laplase", "--out-dir", "{out}"],
     ["schedule.timestep_density: 'laplase' is not one of", "did you mean 'laplace'?"]),
    ("config-laplace-scale", ["train", *TINY, "schedule.formulation=vp",
                              "schedule.timestep_density=laplace", "schedule.laplace_scale=0",
                              "--out-dir", "{out}"],
     ["schedule.laplace_scale: must be positive, got 0.0"]),
    ("config-lr-schedule", ["train", *TINY, "train.lr_schedule=liner", "--out-dir", "{out}"],
     ["train.lr_schedule: 'liner' is not one of", "did you mean 'linear'?"]),
    ("config-heads", ["train", *TINY, "unet.num_heads=3", "--out-dir", "{out}"],
     ["unet.num_heads: 16 channels are not divisible by 3 heads"]),
    ("config-head-channels", ["train", *TINY, "unet.head_channels=5", "--out-dir", "{out}"],
     ["unet.head_channels: 16 channels are not divisible by head_channels 5"]),
    ("config-attention-level", ["train", *TINY, "unet.attn_resolutions=[2]", "--out-dir", "{out}"],
     ["unet.attn_resolutions: 2 names no level; the levels are [8, 4] pixels"]),
    ("config-guidance-unconditional", ["train", *TINY, "sample.guidance_scale=3",
                                       "--out-dir", "{out}"],
     ["sample.guidance_scale: 3.0 needs a class-conditional model; set unet.num_classes"]),
    ("config-classes-without-labels", ["train", *FOLDER16, "data.path={d}/images/mixed",
                                       "unet.num_classes=4", "--out-dir", "{out}"],
     ["unet.num_classes is 4 but the data set has no class labels"]),
    ("config-steps-above-T", ["train", *TINY, "schedule.formulation=vp",
                              "schedule.num_train_timesteps=10",
                              "sample.num_steps=11", "--out-dir", "{out}"],
     ["sample.num_steps: 11 is more than schedule.num_train_timesteps 10"]),
    ("config-toml-syntax", ["train", "{d}/cfg/syntax.toml", "--out-dir", "{out}"],
     ["syntax.toml: TOML syntax error", "line 3"]),
    ("config-not-utf8", ["train", "{d}/cfg/not_utf8.toml", "--out-dir", "{out}"],
     ["not_utf8.toml: not a UTF-8 text file"]),
    ("config-missing-file", ["train", "{d}/cfg/nope.toml", "--out-dir", "{out}"],
     ["config file not found"]),
    ("config-bad-override", ["train", *TINY, "train.max_steps", "--out-dir", "{out}"],
     ["train.max_steps: not a config file, and an override needs a value; write "
      "train.max_steps=VALUE"]),
    ("config-bad-override-syntax", ["train", *TINY, "trainmax_steps=4", "--out-dir", "{out}"],
     ["override 'trainmax_steps=4': expected section.key=value"]),
    ("stats-max-images", ["stats", *TINY, "--max-images", "0"],
     ["--max-images must be a positive integer, got 0"]),
    ("stats-streaming", ["stats", *TINY, "data.source=hf", "data.name=cifar10",
                         "data.streaming=true"],
     ["data.streaming=true streams a data set for training only", "data.streaming=false"]),
    ("stats-unknown-key", ["stats", *TINY, "data.sorce=folder"],
     ["data.sorce: unknown key; did you mean 'source'?"]),
    # -- data -----------------------------------------------------------------------------------
    ("data-missing-path", ["train", *FOLDER16, "data.path={d}/images/nope", "--out-dir", "{out}"],
     ["data.path:", "does not exist; point data.path at a folder of images"]),
    ("data-path-is-a-file", ["train", *FOLDER16, "data.path={d}/images/a_file.png",
                             "--out-dir", "{out}"],
     ["is a file, not a folder"]),
    ("data-empty-folder", ["train", *FOLDER16, "data.path={d}/images/empty", "--out-dir", "{out}"],
     ["data.path: no image files", "put images there"]),
    ("data-no-readable-image", ["train", *FOLDER16, "data.path={d}/images/unreadable",
                                "--out-dir", "{out}"],
     ["no readable image under", "2 file(s)", "check that they are valid images"]),
    ("data-broken-pixels", ["train", *FOLDER16, "data.path={d}/images/broken",
                            "--out-dir", "{out}", "--no-progress"],
     ["cannot decode", "cut.png", "delete or repair the file"]),
    ("data-torchvision-not-downloaded", ["train", *TINY, "data.source=torchvision",
                                         "data.name=cifar10", "data.path={d}/nothing",
                                         "data.download=false", "--out-dir", "{out}"],
     ["cifar10 is not under", "set data.download=true or point data.path at it"]),
    ("data-torchvision-unknown", ["train", *TINY, "data.source=torchvision", "data.name=cifar",
                                  "data.download=false", "--out-dir", "{out}"],
     ["unknown torchvision data set 'cifar'", "did you mean 'cifar10'?"]),
    # -- model files ----------------------------------------------------------------------------
    ("model-missing", ["sample", "{d}/models/nope.safetensors", "--out-dir", "{out}"],
     ["model file not found"]),
    ("model-folder", ["sample", "{d}/models/folder.safetensors", "--out-dir", "{out}"],
     ["is a folder; give the path of a .safetensors model file"]),
    ("model-truncated", ["sample", "{d}/models/truncated.safetensors", "--out-dir", "{out}"],
     ["is truncated", "re-save or re-download it"]),
    ("model-header-cut", ["sample", "{d}/models/header_cut.safetensors", "--out-dir", "{out}"],
     ["is not a safetensors model file or is truncated"]),
    ("model-empty", ["sample", "{d}/models/empty.safetensors", "--out-dir", "{out}"],
     ["is not a safetensors model file (only 0 bytes)"]),
    ("model-text", ["sample", "{d}/models/text.safetensors", "--out-dir", "{out}"],
     ["is not a safetensors model file"]),
    ("model-image", ["sample", "{d}/models/image.safetensors", "--out-dir", "{out}"],
     ["is not a safetensors model file"]),
    ("model-pickle-pt", ["sample", "{d}/models/model.pt", "--out-dir", "{out}"],
     ["model.pt is a pickled PyTorch checkpoint", "never unpickles",
      "torch.load(..., weights_only=True)", "diffunet.save_model"]),
    ("model-pickle-ckpt", ["sample", "{d}/models/model.ckpt", "--out-dir", "{out}"],
     ["model.ckpt is a pickled PyTorch checkpoint", "never unpickles"]),
    ("model-pickle-info", ["info", "{d}/models/model.pt"], ["is a pickled PyTorch checkpoint"]),
    ("model-foreign-safetensors", ["sample", "{d}/models/foreign.safetensors",
                                   "--out-dir", "{out}"],
     ["is a safetensors file but not a diffunet model file", "diffunet.save_model"]),
    ("model-newer-version", ["sample", "{d}/models/newer.safetensors", "--out-dir", "{out}"],
     [f"has model format version {FORMAT_VERSION + 1}, newer than", "upgrade diffunet"]),
    ("model-bad-version", ["info", "{d}/models/bad_version.safetensors"],
     ["malformed format_version '1.0-beta'"]),
    ("model-metadata-missing", ["sample", "{d}/models/no_unet_config.safetensors",
                                "--out-dir", "{out}"],
     ["metadata 'unet_config' is missing or not a JSON object"]),
    ("model-metadata-not-json", ["sample", "{d}/models/bad_json.safetensors",
                                 "--out-dir", "{out}"],
     ["metadata 'schedule_config' is not valid JSON; the file is damaged"]),
    ("model-metadata-unknown-key", ["sample", "{d}/models/bad_config.safetensors",
                                    "--out-dir", "{out}"],
     ["its stored config is invalid", "unet.base_chanels: unknown key"]),
    ("model-metadata-impossible", ["info", "{d}/models/impossible_config.safetensors"],
     ["its stored config is invalid", "unet.num_groups: must be a positive integer"]),
    ("model-tensors-wrong-shape", ["sample", "{d}/models/wrong_shape.safetensors",
                                   "--out-dir", "{out}"],
     ["the weights do not fit the stored unet config", "wrong shape"]),
    ("model-tensor-missing", ["info", "{d}/models/missing_tensor.safetensors"],
     ["the weights do not fit the stored unet config: missing 1"]),
    ("model-damaged-offsets", ["sample", "{d}/models/damaged_offsets.safetensors",
                               "--out-dir", "{out}"],
     ["malformed safetensors entry for tensor"]),
    ("model-tensor-entry-gone", ["sample", "{d}/models/offsets_gone.safetensors",
                                 "--out-dir", "{out}"],
     ["cannot read its tensors", "the file is damaged"]),
    # -- autoguidance and the guidance interval -------------------------------------------------
    ("guide-other-formulation", ["sample", "{d}/models/good.safetensors", "--guide-model",
                                 "{d}/models/edm.safetensors", "--guidance-scale", "2",
                                 "--steps", "2", "--out-dir", "{out}"],
     ["--guide-model", "edm.safetensors cannot guide this model: it is an EDM model, the model "
      "a VP one", "give a guide of the same formulation and schedule"]),
    ("guide-other-schedule", ["sample", "{d}/models/good.safetensors", "--guide-model",
                              "{d}/models/t10.safetensors", "--guidance-scale", "2",
                              "--steps", "2", "--out-dir", "{out}"],
     ["its schedule.num_train_timesteps is 10, the model's 20"]),
    ("guide-other-size", ["sample", "{d}/models/good.safetensors", "--guide-model",
                          "{d}/models/size16.safetensors", "--guidance-scale", "2",
                          "--steps", "2", "--out-dir", "{out}"],
     ["cannot guide this model: its image size 16, the model's 8"]),
    ("guide-other-channels", ["sample", "{d}/models/good.safetensors", "--guide-model",
                              "{d}/models/gray.safetensors", "--guidance-scale", "2",
                              "--steps", "2", "--out-dir", "{out}"],
     ["its image channels 1, the model's 3"]),
    ("guide-other-classes", ["sample", "{d}/models/good.safetensors", "--guide-model",
                             "{d}/models/cond.safetensors", "--guidance-scale", "2",
                             "--steps", "2", "--out-dir", "{out}"],
     ["its classes (num_classes) 3, the model's None"]),
    ("guide-same-file", ["sample", "{d}/models/good.safetensors", "--guide-model",
                         "{d}/models/good.safetensors", "--guidance-scale", "2",
                         "--steps", "2", "--out-dir", "{out}"],
     ["is the model itself: a model guiding itself changes nothing"]),
    ("guide-same-content", ["sample", "{d}/models/good.safetensors", "--guide-model",
                            "{d}/models/good_copy.safetensors", "--guidance-scale", "2",
                            "--steps", "2", "--out-dir", "{out}"],
     ["good_copy.safetensors holds the model's own weights", "a model guiding itself"]),
    ("guide-pickle", ["sample", "{d}/models/good.safetensors", "--guide-model",
                      "{d}/models/model.pt", "--guidance-scale", "2", "--steps", "2", "--out-dir", "{out}"],
     ["--guide-model: ", "model.pt is a pickled PyTorch checkpoint", "never unpickles"]),
    ("guide-truncated", ["sample", "{d}/models/good.safetensors", "--guide-model",
                         "{d}/models/truncated.safetensors", "--guidance-scale", "2",
                         "--steps", "2", "--out-dir", "{out}"],
     ["truncated.safetensors is truncated"]),
    ("guide-missing", ["sample", "{d}/models/good.safetensors", "--guide-model",
                       "{d}/models/nope.safetensors", "--guidance-scale", "2",
                       "--steps", "2", "--out-dir", "{out}"],
     ["--guide-model: model file not found"]),
    ("guide-scale-one", ["sample", "{d}/models/good.safetensors", "--guide-model",
                         "{d}/models/weak.safetensors", "--guidance-scale", "1",
                         "--steps", "2", "--out-dir", "{out}"],
     ["--guide-model with guidance scale 1 changes nothing", "give --guidance-scale W above 1"]),
    ("guide-no-scale", ["sample", "{d}/models/good.safetensors", "--guide-model",
                        "{d}/models/weak.safetensors", "--steps", "2", "--out-dir", "{out}"],
     ["--guide-model with guidance scale 1 changes nothing"]),
    ("interval-one-number", ["sample", "{d}/models/good.safetensors", "--guidance-interval",
                             "0.5", "--steps", "2", "--out-dir", "{out}"],
     ["argument --guidance-interval: expected two noise levels LO,HI", "got '0.5'"]),
    ("interval-not-numbers", ["sample", "{d}/models/good.safetensors", "--guidance-interval",
                              "low,high", "--steps", "2", "--out-dir", "{out}"],
     ["argument --guidance-interval: expected two noise levels LO,HI"]),
    ("interval-reversed", ["sample", "{d}/models/good.safetensors", "--guide-model",
                           "{d}/models/weak.safetensors", "--guidance-scale", "2",
                           "--guidance-interval", "5,0.5", "--steps", "2", "--out-dir", "{out}"],
     ["--guidance-interval needs LO < HI", "got 5.0, 0.5"]),
    ("interval-negative", ["sample", "{d}/models/good.safetensors", "--guide-model",
                           "{d}/models/weak.safetensors", "--guidance-scale", "2",
                           "--guidance-interval=-1,2", "--steps", "2", "--out-dir", "{out}"],
     ["--guidance-interval must be noise levels >= 0"]),
    ("interval-infinite", ["sample", "{d}/models/good.safetensors", "--guide-model",
                           "{d}/models/weak.safetensors", "--guidance-scale", "2",
                           "--guidance-interval", "0.5,inf", "--steps", "2", "--out-dir", "{out}"],
     ["--guidance-interval must be two finite noise levels"]),
    ("interval-nan", ["sample", "{d}/models/good.safetensors", "--guide-model",
                      "{d}/models/weak.safetensors", "--guidance-scale", "2",
                      "--guidance-interval", "nan,2", "--steps", "2", "--out-dir", "{out}"],
     ["--guidance-interval must be two finite noise levels"]),
    ("interval-without-guidance", ["sample", "{d}/models/good.safetensors",
                                   "--guidance-interval", "0.5,2", "--steps", "2", "--out-dir", "{out}"],
     ["--guidance-interval limits guidance, and guidance scale 1 is none"]),
    ("eval-nfe-guide-same-file", ["eval", "nfe", "{d}/models/good.safetensors", "--guide-model",
                                  "{d}/models/good.safetensors", "--guidance-scale", "2"],
     ["--guide-model", "is the model itself"]),
    ("eval-nfe-interval-reversed", ["eval", "nfe", "{d}/models/good.safetensors",
                                    "--guide-model", "{d}/models/weak.safetensors",
                                    "--guidance-scale", "2", "--guidance-interval", "3,1"],
     ["--guidance-interval needs LO < HI"]),
    ("config-guide-model-other-formulation", ["train", *TINY,
                                              "sample.guide_model={d}/models/good.safetensors",
                                              "sample.guidance_scale=2", "--out-dir", "{out}"],
     ["sample.guide_model", "cannot guide this model: it is a VP model, the model a "
      "flow-matching one"]),
    ("config-guide-model-pickle", ["train", *TINY, "sample.guide_model={d}/models/model.pt",
                                   "sample.guidance_scale=2", "--out-dir", "{out}"],
     ["sample.guide_model: ", "model.pt is a pickled PyTorch checkpoint"]),
    ("config-guide-model-scale-one", ["train", *TINY,
                                      "sample.guide_model={d}/models/weak.safetensors",
                                      "--out-dir", "{out}"],
     ["sample.guide_model: with sample.guidance_scale 1 changes nothing"]),
    ("config-guidance-interval-reversed", ["train", *TINY, "sample.guidance_interval=[3, 1]",
                                           "sample.guidance_scale=2",
                                           "sample.guide_model={d}/models/weak.safetensors",
                                           "--out-dir", "{out}"],
     ["sample.guidance_interval needs LO < HI"]),
    # (with the default train.guide_at the interval limits the carried guide's autoguidance)
    ("config-guidance-interval-unguided", ["train", *TINY, "sample.guidance_interval=[0.5, 2]",
                                           "train.guide_at=0", "--out-dir", "{out}"],
     ["sample.guidance_interval: limits guidance, and sample.guidance_scale 1 is none"]),
    # -- command line ---------------------------------------------------------------------------
    ("cli-unknown-sampler", ["sample", "{d}/models/good.safetensors", "--sampler", "eulr",
                             "--out-dir", "{out}"],
     ["unknown sampler 'eulr'; use --sampler with one of ddpm, ddim, dpmpp-2m, euler, heun, "
      "euler-ancestral, dpmpp-2m-sde"]),
    ("cli-unknown-sigma-grid", ["sample", "{d}/models/good.safetensors", "--sigmas", "karas",
                                "--out-dir", "{out}"],
     ["unknown sigma grid 'karas'; did you mean 'karras'? use --sigmas with one of"]),
    ("cli-init-image-wrong-size", ["sample", "{d}/models/good.safetensors", "--init-image",
                                   "{d}/images/mixed/big.jpg", "--steps", "2", "--out-dir",
                                   "{out}"],
     ["big.jpg is 30x40 pixels; this model takes 8x8 images (diffunet does not resize"]),
    ("cli-init-image-wrong-mode", ["sample", "{d}/models/good.safetensors", "--init-image",
                                   "{d}/images/mixed/small_gray.png", "--steps", "2",
                                   "--out-dir", "{out}"],
     ["small_gray.png is a mode L image; this model makes RGB images"]),
    ("cli-init-image-not-an-image", ["sample", "{d}/models/good.safetensors", "--init-image",
                                     "{d}/images/a_file.png", "--steps", "2", "--out-dir",
                                     "{out}"],
     ["--init-image: cannot read image", "a_file.png"]),
    ("cli-mask-without-init-image", ["sample", "{d}/models/good.safetensors", "--mask",
                                     "{d}/images/mixed/small_gray.png", "--steps", "2",
                                     "--out-dir", "{out}"],
     ["--mask needs --init-image"]),
    ("cli-strength-out-of-range", ["sample", "{d}/models/good.safetensors", "--init-image",
                                   "{d}/images/mixed/small_gray.png", "--strength", "1.5",
                                   "--steps", "2", "--out-dir", "{out}"],
     ["--strength must be in (0, 1]"]),
    ("cli-steps-zero", ["sample", "{d}/models/good.safetensors", "--steps", "0",
                        "--out-dir", "{out}"],
     ["--steps must be a positive integer", "got 0"]),
    ("cli-steps-above-T", ["sample", "{d}/models/good.safetensors", "--steps", str(T + 1),
                           "--out-dir", "{out}"],
     [f"--steps {T + 1} is more than this model's {T} training timesteps; use 1 to {T}"]),
    ("cli-negative-samples", ["sample", "{d}/models/good.safetensors", "--num-samples", "-3",
                              "--out-dir", "{out}"],
     ["--num-samples must be a positive integer, got -3"]),
    ("cli-negative-batch", ["sample", "{d}/models/good.safetensors", "--batch-size", "-1",
                            "--out-dir", "{out}"],
     ["--batch-size must be a positive integer, got -1"]),
    ("cli-negative-seed", ["sample", "{d}/models/good.safetensors", "--seed", "-1",
                           "--out-dir", "{out}"],
     ["--seed must be a non-negative integer"]),
    ("cli-not-a-number", ["sample", "{d}/models/good.safetensors", "--num-samples", "many",
                          "--out-dir", "{out}"],
     ["argument --num-samples: invalid int value: 'many'"]),
    ("cli-unknown-option", ["sample", "{d}/models/good.safetensors", "--frobnicate", "3",
                            "--out-dir", "{out}"],
     ["unrecognized arguments"]),
    # diffusers' example-script flags: what diffunet takes instead
    ("diffusers-out", ["train", *TINY, "--output_dir", "{out}"], ["mean --out-dir DIR for"]),
    ("diffusers-n", ["sample", "{d}/models/good.safetensors", "--num_samples", "4"], ["ples N"]),
    ("diffusers-batch", ["train", *TINY, "--train_batch_size=16"], ["train.batch_size=16 for"]),
    ("diffusers-epochs", ["train", *TINY, "--num_epochs", "3"], ["max_steps=N for --num_epochs"]),
    ("diffusers-res", ["train", *TINY, "--resolution", "64"], ["image_size=N for --resolution"]),
    ("diffusers-data", ["train", *TINY, "--dataset_name=cifar10"], ["data.name=cifar10 for"]),
    ("diffusers-fp", ["train", *TINY, "--mixed_precision", "bf16"], ["mixed_precision=P for"]),
    ("cli-class-label-unconditional", ["sample", "{d}/models/good.safetensors",
                                       "--class-label", "1", "--steps", "2", "--out-dir", "{out}"],
     ["--class-label was given but this model is unconditional", "drop --class-label"]),
    ("cli-class-label-out-of-range", ["sample", "{d}/models/cond.safetensors",
                                      "--class-label", "3", "--steps", "2", "--out-dir", "{out}"],
     ["class label 3 is out of range: this model has 3 classes, 0 to 2"]),
    ("cli-sample-out-dir-is-a-file", ["sample", "{d}/models/good.safetensors", "--steps", "2",
                                      "--out-dir", "{d}/images/a_file.png"],
     ["--out-dir", "is a file, not a folder; choose another --out-dir"]),
    ("cli-train-out-dir-is-a-file", ["train", *TINY, "--out-dir", "{d}/images/a_file.png"],
     ["--out-dir", "is a file; give a folder path"]),
    ("cli-sample-out-dir-under-a-file", ["sample", "{d}/models/good.safetensors", "--steps", "2",
                                        "--out-dir", "{d}/images/a_file.png/samples"],
     ["--out-dir: cannot create the folder", "a_file.png/samples (not a directory)"]),
    ("cli-train-out-dir-under-a-file", ["train", *TINY, "--out-dir", "{d}/images/a_file.png/run"],
     ["--out-dir: cannot create the folder", "a_file.png/run (not a directory)"]),
    ("cli-sample-other-settings", ["sample", "{d}/models/good.safetensors", "--num-samples", "2",
                                   "--steps", "3", "--out-dir", "{d}/runs/samples"],
     ["holds samples made with other settings", "num_steps 2 there, 3 now",
      "pass --overwrite to replace them, or choose another --out-dir"]),
    ("cli-sample-no-manifest", ["sample", "{d}/models/good.safetensors", "--num-samples", "2",
                                "--steps", "2", "--out-dir", "{d}/runs/loose_pngs"],
     ["already holds sample images but no manifest.json", "pass --overwrite"]),
    ("cli-train-existing-run", ["train", *TINY, "--out-dir", "{d}/runs/trained"],
     ["--out-dir", "is not empty; pass --resume to continue that run, or choose another"]),
    # -- training state and run folders from elsewhere ------------------------------------------
    ("state-trainer-json-damaged", ["train", *TINY, "train.max_steps=4", "--resume",
                                    "--out-dir", "{d}/runs/damaged_json"],
     ["trainer.json cannot be read", "delete", "step0000002", "to resume from the state before "
      "it, or start a new --out-dir"]),
    ("state-step-is-a-path", ["train", *TINY, "train.max_steps=4", "--resume",
                              "--out-dir", "{d}/runs/path_step"],
     ["its step '../../../escaped' does not match the folder name"]),
    ("state-newer-format", ["train", *TINY, "train.max_steps=4", "--resume",
                            "--out-dir", "{d}/runs/newer_state"],
     ["newer state format version 99", "upgrade diffunet"]),
    ("state-tensors-truncated", ["train", *TINY, "train.max_steps=4", "--resume",
                                 "--out-dir", "{d}/runs/truncated_state"],
     ["model.safetensors has", "bytes where the state recorded",
      "to resume from the state before it"]),
    ("state-tensors-pickled", ["train", *TINY, "train.max_steps=4", "--resume",
                               "--out-dir", "{d}/runs/pickled_state"],
     ["optimizer.safetensors", "to resume from the state before it"]),
    ("state-config-json-damaged", ["train", "train.max_steps=4", "--resume",
                                   "--out-dir", "{d}/runs/damaged_config"],
     ["config.json", "is damaged", "give the run's CONFIG.toml"]),
]

# Scanning a folder reads only image headers (fast for 100k files), so an image whose pixel data
# is damaged is found when a batch first loads it, after the run folder has been set up.
FOUND_WHILE_TRAINING = {"data-broken-pixels"}

# Cases that succeed, with what they must print.
GOOD: list[tuple[str, list[str], list[str]]] = [
    ("data-mixed-sizes-and-modes", ["train", *FOLDER16, "data.path=images/mixed",
                                    "train.max_steps=1", "train.batch_size=4",
                                    "--out-dir", "runs/mixed", "--no-progress"],
     ["note: 3 of 5 images in images/mixed are smaller than data.image_size=16 and are "
      "upscaled (e.g. ", "step 1: model file runs/mixed/weights/model_step0000001.safetensors"]),
    ("model-metadata-with-paths", ["sample", "{d}/models/paths.safetensors", "--num-samples",
                                   "2", "--steps", "2", "--out-dir", "runs/from_paths",
                                   "--no-progress"],
     ["wrote 2 image(s) to runs/from_paths"]),
    ("model-info-with-paths", ["info", "{d}/models/paths.safetensors"], []),
    ("sample-guided", ["sample", "{d}/models/good.safetensors", "--guide-model",
                       "{d}/models/weak.safetensors", "--guidance-scale", "2",
                       "--guidance-interval", "0.1,1", "--num-samples", "2", "--steps", "2",
                       "--out-dir", "runs/guided", "--no-progress"],
     ["wrote 2 image(s) to runs/guided"]),
    ("sample-resume-with-a-planted-manifest", ["sample", "{d}/models/good.safetensors",
                                               "--num-samples", "3", "--steps", "2",
                                               "--out-dir", "runs/planted", "--no-progress"],
     ["resuming: 2 of 3 images are already in runs/planted", "wrote 1 image(s)"]),
    ("sample-overwrite-with-a-planted-link", ["sample", "{d}/models/good.safetensors",
                                              "--num-samples", "2", "--steps", "3",
                                              "--out-dir", "{d}/runs/linked", "--overwrite",
                                              "--no-progress"],
     ["--overwrite: removed 4 earlier output file(s)", "wrote 2 image(s)"]),
]


def _fill(argv: list[str], d: Path, out: Path | None = None) -> list[str]:
    return [a.replace("{d}", str(d)).replace("{out}", str(out)) for a in argv]


def _damage_states(runs: Path) -> None:
    """Copies of a finished 2-step run, each damaged one way."""
    trained = runs / "trained"
    state = "state/" + state_name(2)

    def copy(name: str) -> Path:
        shutil.copytree(trained, runs / name)
        return runs / name / state

    copy("damaged_json").joinpath("trainer.json").write_text('{"step": 2, "conf')
    s = copy("path_step")
    data = json.loads((s / "trainer.json").read_text())
    (s / "trainer.json").write_text(json.dumps({**data, "step": "../../../escaped"}))
    s = copy("newer_state")
    (s / "trainer.json").write_text(json.dumps({**data, "format_version": 99}))
    s = copy("truncated_state")
    (s / "model.safetensors").write_bytes((s / "model.safetensors").read_bytes()[:1000])
    s = copy("pickled_state")
    torch.save({"exp_avg": Payload(runs.parent / "PWNED_state")}, s / "optimizer.safetensors")
    copy("damaged_config")
    (runs / "damaged_config" / "config.json").write_text('{"unet": {"image_size": 8,')


@dataclass
class World:
    d: Path
    results: dict[str, Result]
    outs: dict[str, Path]
    before: dict[str, dict]
    after: dict[str, dict]


def _tree(folder: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` (except under ``skip``) with its size and mtime (files)."""
    found = {}
    for p in sorted(folder.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        st = p.lstat()  # a folder's own mtime changes with its entries: compare those instead
        found[str(p.relative_to(folder))] = (0, 0) if p.is_dir() else (st.st_size, st.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    d = tmp_path_factory.mktemp("bad_input")
    _model_files(d)
    _configs(d)
    _images(d)
    runs = d / "runs"
    runs.mkdir()
    (runs / "loose_pngs").mkdir()
    Image.new("RGB", (8, 8)).save(runs / "loose_pngs" / "000000.png")
    good = str(d / "models" / "good.safetensors")
    # Phase 1: the runs that later cases damage or conflict with.
    setup = [["train", *TINY, "--out-dir", str(runs / "trained"), "--no-progress"],
             ["sample", good, "--num-samples", "2", "--steps", "2", "--out-dir",
              str(runs / "samples"), "--no-progress"],
             ["sample", good, "--num-samples", "2", "--steps", "2", "--out-dir",
              str(runs / "linked"), "--no-progress"]]
    for r in run_forked(setup, d, d / "logs" / "setup"):
        assert r.code == 0, r.stderr
    _damage_states(runs)
    # A manifest whose paths point elsewhere (the settings match, so the run resumes).
    shutil.copytree(runs / "samples", runs / "planted")
    manifest = json.loads((runs / "planted" / "manifest.json").read_text())
    manifest["grid"] = "../escaped_grid.png"
    manifest["model"]["path"] = str(d / "escaped")
    manifest["out_dir"] = str(d / "escaped")
    (runs / "planted" / "manifest.json").write_text(json.dumps(manifest))
    victim = d / "victim.png"
    victim.write_bytes(b"someone else's file")
    (runs / "linked" / image_name(1)).unlink()
    (runs / "linked" / image_name(1)).symlink_to(victim)

    # Phase 2: every case, each in its own process.
    outs = {cid: d / "out" / cid for cid, _, _ in CASES}
    argvs = [_fill(argv, d, outs[cid]) for cid, argv, _ in CASES]
    argvs += [_fill(argv, d) for _, argv, _ in GOOD]
    before = {"all": _tree(d, skip=d / "logs")}
    results = run_forked(argvs, d, d / "logs" / "cases")
    after = {"all": _tree(d, skip=d / "logs")}
    ids = [cid for cid, _, _ in CASES] + [cid for cid, _, _ in GOOD]
    return World(d, dict(zip(ids, results)), outs, before, after)


# ---------------------------------------------------------------------------------------------
# The cases


@pytest.mark.parametrize("cid, argv, parts", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(world: World, cid: str, argv: list[str],
                                      parts: list[str]) -> None:
    r = world.results[cid]
    command = argv[0]
    # A resumed run names the state it found before it finds that state damaged, and a run
    # that fails while training (an image it cannot decode) printed its header first.
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith(RUN_HEADER)]
    assert r.code == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"diffunet {command}: error: "), lines[0]
    for part in parts:
        assert part in lines[0], (part, lines[0])
    assert r.stdout == ""
    if cid in FOUND_WHILE_TRAINING:  # the folder is set up, but holds no state or model file
        assert list((world.outs[cid] / "state").iterdir()) == []
        assert list((world.outs[cid] / "weights").iterdir()) == []
    else:
        assert not world.outs[cid].exists(), "bad input must not create the output folder"


def test_bad_input_leaves_every_input_untouched(world: World) -> None:
    # Phase 2 wrote only what the succeeding cases were asked to write: no damaged run folder,
    # model file or image folder changed, nothing appeared outside the asked-for output folders.
    before, after = world.before["all"], world.after["all"]
    changed = {k for k in before.keys() & after.keys() if before[k] != after[k]}
    added = after.keys() - before.keys()
    removed = before.keys() - after.keys()
    own = ("runs/mixed", "runs/from_paths", "runs/linked", "runs/planted", "runs/guided",
           *(f"out/{cid}" for cid in FOUND_WHILE_TRAINING))
    unexpected = sorted(k for k in changed | added | removed
                        if not k.startswith(own) and k != "out")
    assert unexpected == []
    for marker in ("PWNED_pt", "PWNED_ckpt", "PWNED_state"):  # nothing was unpickled
        assert not (world.d / marker).exists()
    assert not (world.d / "escaped").exists()
    assert sorted(p.name for p in (world.d / "runs" / "planted").iterdir()) == [
        "000000.png", "000001.png", "000002.png", "grid.png", "manifest.json"]


@pytest.mark.parametrize("cid, argv, parts", GOOD, ids=[c[0] for c in GOOD])
def test_inputs_that_are_fine(world: World, cid: str, argv: list[str], parts: list[str]) -> None:
    r = world.results[cid]
    assert r.code == 0, r.stderr
    assert "Traceback" not in r.stderr
    for part in parts:
        assert part in r.stderr, (part, r.stderr)


def test_mixed_sizes_and_modes_load_at_the_configured_shape(world: World) -> None:
    from diffunet.config import DataConfig
    from diffunet.data import build_dataset

    folder = world.d / "images" / "mixed"
    ds = build_dataset(DataConfig(channels=3, source="folder", path=str(folder), image_size=16))
    assert len(ds) == 5 and ds.skipped == []
    assert sorted(Path(p).name for p in ds.upscaled) == ["palette.gif", "small_gray.png",
                                                         "small_rgba.png"]
    for i in range(len(ds)):
        x, _ = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert -1.0 <= x.min() and x.max() <= 1.0
    gray = build_dataset(DataConfig(source="folder", path=str(folder), image_size=8, channels=1))
    assert all(gray[i][0].shape == (1, 8, 8) for i in range(len(gray)))
    assert gray.upscaled == []  # nothing is smaller than 8x8


def test_model_file_paths_do_not_leak(world: World) -> None:
    out = world.d / "runs" / "from_paths"
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "grid.png",
                                                     "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["step"] == "../../../escaped"  # recorded as data, used for nothing
    info = world.results["model-info-with-paths"].stdout
    assert "training step    ../../../escaped" in info


def test_overwrite_removes_a_planted_link_not_its_target(world: World) -> None:
    linked = world.d / "runs" / "linked"
    assert (world.d / "victim.png").read_bytes() == b"someone else's file"
    assert not (linked / image_name(1)).is_symlink()
    assert sorted(p.name for p in linked.iterdir()) == ["000000.png", "000001.png", "grid.png",
                                                        "manifest.json"]


def test_the_real_entry_points_agree_with_the_forked_runner(world: World) -> None:
    for cid, console_script in (("model-pickle-pt", False), ("config-toml-syntax", True),
                                ("cli-unknown-sampler", False)):
        argv = _fill(next(a for c, a, _ in CASES if c == cid), world.d, world.d / "real" / cid)
        real = run_real(argv, world.d, console_script=console_script)
        forked = world.results[cid]
        assert real.code == forked.code == 2
        assert real.stderr.replace(str(world.d / "real"), str(world.d / "out")) == forked.stderr
    assert not (world.d / "PWNED_pt").exists()


# ---------------------------------------------------------------------------------------------
# Security: no unpickling, names from integers only


PACKAGE = Path(diffunet.__file__).parent
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve",
                  "marshal"}
UNPICKLING_CALLS = ("load_state", "torch.serialization.load", "pickle.load", "pickle.loads",
                    "Unpickler", "torch.jit.load")


def _unpickling(source: str, name: str) -> list[str]:
    """Every place in ``source`` that imports a pickle module, calls ``torch.load`` without
    ``weights_only=True``, ``numpy.load`` with ``allow_pickle``, or an unpickling loader
    (Accelerate's ``load_state`` included)."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = ({a.name.split(".")[0] for a in node.names} if isinstance(node, ast.Import)
                       else {(node.module or "").split(".")[0]})
            imported = {a.name for a in node.names}
            if modules & PICKLE_MODULES or (modules == {"torch"} and "load" in imported):
                problems.append(f"{name}:{node.lineno} imports {ast.unparse(node)!r}")
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        kwargs = {k.arg: k.value for k in node.keywords}

        def is_const(key: str, value: bool) -> bool:
            return isinstance(kwargs.get(key), ast.Constant) and kwargs[key].value is value

        if func.endswith("torch.load") and not is_const("weights_only", True):
            problems.append(f"{name}:{node.lineno} calls {func} without weights_only=True")
        if func.endswith(("np.load", "numpy.load")) and "allow_pickle" in kwargs \
                and not is_const("allow_pickle", False):
            problems.append(f"{name}:{node.lineno} calls {func} with allow_pickle")
        if func.endswith(UNPICKLING_CALLS):
            problems.append(f"{name}:{node.lineno} calls {func}")
    return problems


def test_the_package_never_unpickles() -> None:
    # Model files, training states, sample manifests and cached statistics are safetensors and
    # JSON; the one torch.load (a local FID weights file) passes weights_only=True.
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 10
    problems = [p for f in files for p in _unpickling(f.read_text(encoding="utf-8"), f.name)]
    assert problems == []
    # The scan has teeth.
    bad = ("import pickle\nfrom torch import load\nimport torch, numpy as np\n"
           "a = torch.load(p)\nb = torch.load(p, weights_only=False)\n"
           "c = np.load(p, allow_pickle=True)\naccelerator.load_state(d)\n")
    assert len(_unpickling(bad, "bad.py")) == 6
    good = "import torch\nx = torch.load(p, map_location='cpu', weights_only=True)\n"
    assert _unpickling(good, "good.py") == []


def test_state_and_image_names_come_from_integers_only() -> None:
    assert state_name(1000) == "step0001000" and state_name(12345678) == "step12345678"
    assert image_name(7) == "000007.png" and image_name(1234567) == "1234567.png"
    for bad in ("../x", "1", 1.5, None, -1, True):
        with pytest.raises((TypeError, ValueError)):
            state_name(bad)  # type: ignore[arg-type]
    for bad in ("../x", 1.5, None):
        with pytest.raises((TypeError, ValueError)):
            image_name(bad)  # type: ignore[arg-type]
