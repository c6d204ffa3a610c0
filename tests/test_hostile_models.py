"""Hostile model files: every way a stranger's ``.safetensors`` can lie, as a table of cases.

Each case builds one hostile file in its own folder from a tiny good model file (a diffusion
model, or a segmentation model) and runs ``info``, ``sample``, ``inspect`` or ``segment
predict`` on it. A refusal is one line naming the file and the problem, exit code 2, nothing
written; the machinery (forked runs under a time bound and an address-space cap, so a terabyte
allocation fails the case instead of the machine) is in ``hostile.py``.

Before this suite (main at 4755a21): a list or string ``__metadata__`` and a non-string
metadata value were tracebacks, an integer ``format_version`` was safetensors' own long message,
``[0, Infinity]`` offsets an OverflowError, deep nesting a RecursionError, a 2.8 MB file with
``base_channels = 1000000`` tried to allocate terabytes, ``num_train_timesteps = 10**9`` 8 GB, a
6 GB file was read whole (MemoryError), ``info --json`` printed the file's own ``path`` and
``parameters``, and a NaN weight was sampled into grey images.

Round two (issue 23) adds diffusers folders for ``import`` (before: ``layers_per_block =
10**6`` grew for minutes, ``block_out_channels = [10**12]``, NaN/Infinity ``freq_shift`` and
float8 weights were tracebacks, ``num_train_timesteps = 10**9`` allocated 7.5 GiB, and
``sample_size = 10**30`` wrote a file ``info`` refused) and a stored config counted exactly
rather than built.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffunet
from diffunet import NoiseSchedule, ScheduleConfig, UNet, UNetConfig
from diffunet.resources import parameter_shapes
from hostile import Case, check, run_cases

T = 20  # the tiny diffusion model's training timesteps
TINY = dict(image_size=8, base_channels=8, channel_mults=(1,), num_res_blocks=1,
            attn_resolutions=(), dropout=0.0, num_groups=4)
SEG = {"num_classes": 3, "class_names": ["background", "a", "b"], "mean": [0.5, 0.5, 0.5],
       "std": [0.25, 0.25, 0.25], "image_size": 8, "channels": 3, "ignore_index": 255}
M = "m.safetensors"  # each case's hostile file, in its own folder


# ---------------------------------------------------------------------------------------------
# The shared good inputs, and how a case makes its hostile file from them


def _shared(shared: Path) -> None:
    torch.manual_seed(0)
    diffunet.save_model(shared / "good.safetensors", UNet(UNetConfig(**TINY)),
                        NoiseSchedule(ScheduleConfig(num_train_timesteps=T)))
    seg_net = UNet(UNetConfig(**TINY, out_channels=3, time_conditioning=False))
    diffunet.save_model(shared / "seg.safetensors", seg_net, None,
                        extra={"segmentation": SEG, "epoch": 1, "metrics": {}})
    Image.new("RGB", (8, 8), (90, 120, 200)).save(shared / "img.png")
    diffunet.save_model(shared / "edm.safetensors", UNet(UNetConfig(**TINY)),
                        diffunet.make_schedule(ScheduleConfig(formulation="edm")))
    from diffunet.interop import export_diffusers

    export_diffusers(shared / "good.safetensors", shared / "pipe")  # what import cases edit


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict | bytes, rest: bytes) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + rest


def edit(change: Callable[[dict], None], src: str = "good") -> Callable[[Path, Path], None]:
    """A builder: the shared ``src`` model file with its JSON header changed by ``change``."""
    def build(c: Path, shared: Path) -> None:
        header, rest = _split((shared / f"{src}.safetensors").read_bytes())
        change(header)
        (c / M).write_bytes(_join(header, rest))
    return build


def meta(key: str, value, src: str = "good") -> Callable[[Path, Path], None]:
    """A builder: metadata ``key`` set to the raw (JSON) ``value``; None removes it."""
    def change(header: dict) -> None:
        if value is None:
            header["__metadata__"].pop(key)
        else:
            header["__metadata__"][key] = value
    return edit(change, src)


def section(key: str, src: str = "good", **changes) -> Callable[[Path, Path], None]:
    """A builder: the JSON metadata value ``key`` (a config) with ``changes`` applied."""
    def change(header: dict) -> None:
        value = json.loads(header["__metadata__"][key])
        value.update(changes)
        header["__metadata__"][key] = json.dumps(value)
    return edit(change, src)


def tensors(change: Callable[[list[tuple[str, dict]]], None],
            src: str = "good") -> Callable[[Path, Path], None]:
    """A builder: ``change`` gets the tensor entries (name, entry) sorted by offset."""
    def on_header(header: dict) -> None:
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"])
        change(entries)
        metadata = header["__metadata__"]
        header.clear()
        header["__metadata__"] = metadata
        header.update(entries)
    return edit(on_header, src)


def raw_header(text: bytes, rest: bytes = b"") -> Callable[[Path, Path], None]:
    def build(c: Path, shared: Path) -> None:
        (c / M).write_bytes(_join(text, rest))
    return build


def raw_file(data: bytes) -> Callable[[Path, Path], None]:
    def build(c: Path, shared: Path) -> None:
        (c / M).write_bytes(data)
    return build


def big_image(side: int) -> Callable[[Path, Path], None]:
    """A builder: ``big.png``, a black ``side`` x ``side`` RGB image (small on disk, large
    decoded: 4 bytes x 3 channels x side**2 as float32)."""
    def build(c: Path, shared: Path) -> None:
        Image.new("RGB", (side, side)).save(c / "big.png")
    return build


def sparse(size: int, src: str | None = None) -> Callable[[Path, Path], None]:
    """A builder: a sparse file of ``size`` bytes (the shared ``src`` model file at its start)."""
    def build(c: Path, shared: Path) -> None:
        if src is not None:
            shutil.copy(shared / f"{src}.safetensors", c / M)
        with open(c / M, "ab") as f:
            f.truncate(size)
    return build


def poisoned(*names_values: tuple[int, float], src: str = "good") -> Callable[[Path, Path], None]:
    """A builder: the tensors at these indices (in the network's order) get one bad value."""
    def build(c: Path, shared: Path) -> None:
        path = shared / f"{src}.safetensors"
        weights = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        order = list(UNet(UNetConfig(**json.loads(metadata["unet_config"]))).state_dict())
        for index, value in names_values:
            weights[order[index]].view(-1)[0] = value
        save_file(weights, str(c / M), metadata=metadata)
    return build


def consistent_but_huge(c: Path, shared: Path) -> None:
    """A header that exactly fits a 700M-parameter config, on a sparse file of that size."""
    header, _ = _split((shared / "good.safetensors").read_bytes())
    cfg = {**json.loads(header["__metadata__"]["unet_config"]), "base_channels": 2048,
           "num_groups": 32}
    new, pos = {"__metadata__": {**header["__metadata__"], "unet_config": json.dumps(cfg)}}, 0
    for name, shape in parameter_shapes(UNetConfig(**cfg)).items():
        n = math.prod(shape) * 4
        new[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    head = _join(new, b"")
    with open(c / M, "wb") as f:
        f.write(head)
        f.truncate(len(head) + pos)


class Raw(str):
    """A value written into a JSON config as raw text: ``Raw("NaN")``, ``Raw("1e999")``."""


def pipe(unet: dict | None = None, scheduler: dict | None = None,
         weights: Callable[[dict], dict] | None = None) -> Callable[[Path, Path], None]:
    """A builder: the shared diffusers pipeline folder as ``pipe/``, with keys of
    ``unet/config.json`` and ``scheduler/scheduler_config.json`` set (a :class:`Raw` value as
    raw JSON text) and its weights changed by ``weights``."""
    def build(c: Path, shared: Path) -> None:
        shutil.copytree(shared / "pipe", c / "pipe")
        for rel, changes in (("unet/config.json", unet), ("scheduler/scheduler_config.json",
                                                          scheduler)):
            if changes:
                path = c / "pipe" / rel
                config = json.loads(path.read_text())
                config.update({k: f"@{k}@" if isinstance(v, Raw) else v
                               for k, v in changes.items()})
                text = json.dumps(config)
                for key, value in changes.items():
                    if isinstance(value, Raw):
                        text = text.replace(f'"@{key}@"', value)
                path.write_text(text)
        if weights is not None:
            path = c / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"
            save_file(weights(load_file(str(path))), str(path), metadata={"format": "pt"})
    return build


def as_dtype(dtype: torch.dtype, nan: bool = False) -> Callable[[dict], dict]:
    def change(tensors: dict) -> dict:
        out = {k: v.to(dtype) for k, v in tensors.items()}
        if nan:
            first = sorted(out)[0]
            out[first] = out[first].float().fill_(float("nan")).to(dtype)
        return out
    return change


def link_to(target: str) -> Callable[[Path, Path], None]:
    def build(c: Path, shared: Path) -> None:
        (c / M).symlink_to(target)
    return build


def fifo(c: Path, shared: Path) -> None:
    os.mkfifo(c / M)


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def _offsets(index: int, value) -> Callable[[list], None]:
    def change(entries: list) -> None:
        entries[index][1]["data_offsets"] = value
    return change


def _entry(index: int, **fields) -> Callable[[list], None]:
    def change(entries: list) -> None:
        entries[index][1].update(fields)
    return change


def _overlap(entries: list) -> None:
    # Two tensors of the same size (e.g. two biases) made to share one place.
    size = {}
    for name, e in entries:
        b, end = e["data_offsets"]
        if (end - b) in size and end > b:
            e["data_offsets"] = list(entries[size[end - b]][1]["data_offsets"])
            return
        size[end - b] = next(i for i, (n, _) in enumerate(entries) if n == name)
    raise AssertionError("no two tensors of one size")


def _rename(index: int, new: str) -> Callable[[list], None]:
    def change(entries: list) -> None:
        entries[index] = (new, entries[index][1])
    return change


# ---------------------------------------------------------------------------------------------
# The table

M_ = "{c}/" + M
SAMPLE = ["sample", M_, "--num-samples", "2", "--steps", "2", "--out-dir", "{out}"]
INFO = ["info", M_]
INSPECT = ["inspect", M_, "--out-dir", "{out}"]
IMPORT = ["import", "{c}/pipe", "{out}"]  # {out} is never written unless the case says so
NOT_FINITE = "not a finite number; the config is damaged"
PREDICT = ["segment", "predict", M_, "{shared}/img.png", "--out-dir", "{out}"]
GUIDE = ["sample", "{shared}/good.safetensors", "--guide-model", M_, "--guidance-scale", "2",
         "--num-samples", "2", "--steps", "2", "--out-dir", "{out}"]
DAMAGED = "the file is damaged"

CASES = [
    # -- the metadata block is not a JSON object of strings
    Case("metadata-is-a-list", INFO, [M, "its safetensors metadata is a JSON array, not a "
                                      "JSON object of strings", DAMAGED],
         edit(lambda h: h.update(__metadata__=["format", "diffunet.model"]))),
    Case("metadata-is-a-string", SAMPLE, [M, "its safetensors metadata is the string"],
         edit(lambda h: h.update(__metadata__="diffunet.model"))),
    Case("metadata-value-a-number", INFO, [M, "metadata 'unet_config' is the JSON number 5, "
                                           "not a string"], meta("unet_config", 5)),
    Case("metadata-value-an-object", SAMPLE, [M, "metadata 'step' is a JSON object, not a "
                                              "string"], meta("step", {"a": 1})),
    Case("format-version-an-integer", SAMPLE, [M, "metadata 'format_version' is the JSON "
                                               "number 1, not a string"],
         meta("format_version", 1)),
    Case("format-version-unicode-digits", INFO, [M, "malformed format_version"],
         meta("format_version", "\u0661")),
    Case("metadata-key-absurdly-long", INFO, [M, "a metadata key is 100,000 characters long"],
         meta("k" * 100_000, "1")),
    Case("metadata-value-lone-surrogate", INFO, [M, "metadata 'note' is not valid UTF-8"],
         raw_header(b'{"__metadata__": {"format": "diffunet.model", "note": "\\ud800"}}')),
    Case("diffunet-version-multiline", INFO, [M, "malformed diffunet_version"],
         meta("diffunet_version", "1.0\nfake line")),
    # -- JSON nesting (RecursionError before)
    Case("header-nested-100000-deep", INFO, [M, "its header is not JSON: JSON nested more "
                                             "than 32 levels deep"],
         raw_header(b'{"__x": ' + _deep(100_000).encode() + b"}")),
    Case("unet-config-nested-100000-deep", SAMPLE, [M, "metadata 'unet_config' is refused "
                                                    "(JSON nested more than 32 levels deep"],
         meta("unet_config", _deep(100_000))),
    Case("segmentation-nested-deep", PREDICT, [M, "metadata 'segmentation' is refused"],
         meta("segmentation", json.dumps({"mean": json.loads(_deep(40))}), "seg")),
    # -- the header itself
    Case("header-length-past-the-end", INFO, [M, "is not a safetensors model file or is "
                                              "truncated (header says 1000000 bytes"],
         raw_file(struct.pack("<Q", 1_000_000) + b"{}" + b" " * 100)),
    Case("header-length-2-to-the-63", SAMPLE, [M, "is not a safetensors model file or is "
                                               "truncated"],
         raw_file(struct.pack("<Q", 1 << 63) + b"{}" + b" " * 100)),
    Case("header-only-length", INFO, [M, "header says 16 bytes, file has 8"],
         raw_file(struct.pack("<Q", 16))),
    Case("header-not-an-object", INFO, [M, "malformed header: a JSON array"],
         raw_header(b"[1, 2, 3]")),
    Case("header-duplicate-key", INFO, [M, "the key '__metadata__' appears twice"],
         raw_header(b'{"__metadata__": {}, "__metadata__": {"format": "diffunet.model"}}')),
    Case("header-not-utf8", INFO, [M, "its header is not JSON"], raw_header(b'{"\xff": 1}')),
    # -- tensor entries
    Case("offsets-infinity", INFO, [M, "malformed safetensors entry for tensor", "data_offsets "
                                    "must be two increasing non-negative integers, got [0, "
                                    "Infinity]", DAMAGED],
         tensors(_offsets(0, [0, float("inf")]))),
    Case("offsets-nan", SAMPLE, [M, "data_offsets must be two increasing"],
         tensors(_offsets(0, [float("nan"), 16]))),
    Case("offsets-float", SAMPLE, [M, "data_offsets must be two increasing"],
         tensors(_offsets(0, [0, 2.5e3]))),
    Case("offsets-negative", INFO, [M, "data_offsets must be two increasing"],
         tensors(_offsets(0, [-16, 0]))),
    Case("offsets-reversed", INFO, [M, "data_offsets must be two increasing"],
         tensors(_offsets(-1, [10_000, 16]))),
    Case("offsets-three", INFO, [M, "data_offsets must be two"], tensors(_offsets(0, [0, 1, 2]))),
    Case("offsets-far-past-the-end", SAMPLE, [M, "is truncated", "its header needs"],
         tensors(_offsets(-1, [0, 10 ** 30]))),
    Case("offsets-overlap", INFO, [M, "cannot read its tensors (tensors", "overlap at byte",
                                   DAMAGED], tensors(_overlap)),
    Case("offsets-span-wrong-size", SAMPLE, [M, "F32 [1000000] is 4,000,000 bytes but its "
                                             "data_offsets span"],
         tensors(_entry(0, dtype="F32", shape=[1_000_000]))),
    Case("dtype-unknown", INFO, [M, "dtype 'F12' is not one safetensors knows"],
         tensors(_entry(0, dtype="F12"))),
    Case("dtype-not-a-string", INFO, [M, "dtype '7' is not one safetensors knows"],
         tensors(_entry(0, dtype=7))),
    Case("dtype-halved", SAMPLE, [M, "F16", "bytes but its data_offsets span"],
         tensors(_entry(0, dtype="F16"))),
    Case("shape-negative", INFO, [M, "shape must be a list of at most 16 non-negative integers, "
                                  "got [-1, 8]"], tensors(_entry(0, shape=[-1, 8]))),
    Case("shape-float", INFO, [M, "shape must be a list"], tensors(_entry(0, shape=[8.0]))),
    Case("shape-boolean", INFO, [M, "shape must be a list"], tensors(_entry(0, shape=[True]))),
    Case("shape-product-enormous", SAMPLE, [M, "bytes but its data_offsets span"],
         tensors(_entry(0, shape=[10 ** 10, 10 ** 10]))),
    Case("shape-too-many-dims", INFO, [M, "shape must be a list of at most 16"],
         tensors(_entry(0, shape=[1] * 40))),
    Case("entry-unknown-key", INFO, [M, "unknown key 'evil'"], tensors(_entry(0, evil=1))),
    Case("entry-not-an-object", INFO, [M, "it is a JSON array, not a JSON object"],
         edit(lambda h: h.update({next(k for k in h if k != "__metadata__"): [1]}))),
    Case("tensor-name-absurdly-long", INFO, [M, "a tensor name is 10,000 characters long"],
         tensors(_rename(0, "x" * 10_000))),
    Case("tensor-renamed", SAMPLE, [M, "the weights do not fit the stored unet config: "
                                    "missing 1", "unexpected 1 (e.g. evil\\n)"],
         tensors(_rename(0, "evil\n"))),
    Case("bytes-after-the-last-tensor", SAMPLE, [M, "cannot read its tensors (1,000 bytes after "
                                                 "the last tensor)", DAMAGED],
         lambda c, s: (c / M).write_bytes((s / "good.safetensors").read_bytes()
                                          + b"\0" * 1000)),
    # -- resources claimed by the config (terabytes before)
    Case("base-channels-a-million", INFO, [M, "the weights do not fit the stored unet config",
                                           "wrong shape", "its config implies "
                                           "156,000,112,000,003 parameters but it holds 10,883"],
         section("unet_config", base_channels=1_000_000)),
    Case("base-channels-a-trillion", SAMPLE, [M, "its config implies "
                                              "156,000,000,000,112,000,000,000,003 parameters "
                                              "but it holds 10,883"],
         section("unet_config", base_channels=10 ** 12)),
    Case("res-blocks-a-million", INFO, [M, "its config implies 22,000,048 tensors but it holds "
                                        "70"],
         section("unet_config", num_res_blocks=10 ** 6)),
    Case("timesteps-a-billion", SAMPLE, [M, "this model (one image at a time) needs",
                                         "GiB of schedule tables (schedule.num_train_timesteps "
                                         "= 1000000000)",
                                         "use a machine with more memory"],
         section("schedule_config", num_train_timesteps=10 ** 9)),
    # counted exactly before building: a few hundred tensors past the file are built (cheap)
    # so the line names one missing; ten thousand past it are refused unbuilt (a header of a
    # million with a config of millions more would build for minutes)
    Case("res-blocks-past-the-file", INFO, [M, "the weights do not fit the stored unet config: "
                                            "missing 352 (e.g. "],
         section("unet_config", num_res_blocks=17)),
    Case("res-blocks-far-past-the-file", INFO, [M, "its config implies 22,048 tensors but it "
                                                "holds 70"],
         section("unet_config", num_res_blocks=1000)),
    Case("image-size-40000", INFO, [M, "this model (one image at a time) needs", "of "
                                    "activations (unet.image_size = 40000), more than the"],
         section("unet_config", image_size=40_000)),
    Case("sample-batch-beyond-memory", ["sample", "{shared}/good.safetensors", "--batch-size",
                                        "10000000", "--num-samples", "10000000", "--steps", "2",
                                        "--out-dir", "{out}"],
         ["--batch-size 10000000 at 8x8 needs", "of activations, more than the",
          "lower --batch-size"]),
    Case("image-size-googol", INSPECT, [M, "unet.image_size", "about 101 digits", "out of range"],
         section("unet_config", image_size=10 ** 100)),
    Case("image-size-billion", INSPECT, [M, "of activations (unet.image_size = 1073741824), "
                                         "more than the"],
         section("unet_config", image_size=2 ** 30)),
    Case("consistent-but-700m-parameters", SAMPLE, [M, "this model (one image at a time) needs",
                                                    "GiB of weights (unet.base_channels = 2048",
                                                    "more than the"],
         consistent_but_huge),
    Case("unet-config-wrong-type", SAMPLE, [M, "its stored config is invalid", "unet.image_size"],
         section("unet_config", image_size="8")),
    Case("unet-config-list", INFO, [M, "metadata 'unet_config' is missing or not a JSON object"],
         meta("unet_config", "[8, 8]")),
    # -- files that are not model files at all, read whole before
    Case("sparse-6gb-not-a-model", INFO, [M, "is not a safetensors model file (its header is "
                                          "not JSON)"], sparse(6 << 30)),
    Case("sparse-6gb-after-a-model", SAMPLE, [M, "cannot read its tensors", "bytes after the "
                                              "last tensor"], sparse(6 << 30, "good")),
    Case("symlink-to-dev-zero", INFO, [M, "is not a regular file"], link_to("/dev/zero")),
    Case("fifo", SAMPLE, [M, "is not a regular file"], fifo, timeout=20),
    # -- segmentation metadata that does not fit the network
    Case("seg-classes-vs-out-channels", PREDICT, [M, "segmentation metadata does not fit its "
                                                  "network (num_classes 5 needs 5 network "
                                                  "output channel(s) but the unet has 3)"],
         section("segmentation", "seg", num_classes=5, class_names=list("abcde"))),
    Case("seg-huge-num-classes", PREDICT, [M, "num_classes is 1000000000, not 2 to 255"],
         section("segmentation", "seg", num_classes=10 ** 9)),
    Case("seg-one-class", INSPECT, [M, "num_classes is 1, not 2 to 255"],
         section("segmentation", "seg", num_classes=1)),
    Case("seg-mean-length", PREDICT, [M, "mean has 1 entries for a 3-channel model"],
         section("segmentation", "seg", mean=[0.5])),
    Case("seg-std-length-inspect", INSPECT, [M, "std has 4 entries for a 3-channel model"],
         section("segmentation", "seg", std=[0.2] * 4)),
    Case("seg-std-zero", PREDICT, [M, "has an entry that is not positive"],
         section("segmentation", "seg", std=[0.2, 0.0, 0.2])),
    Case("seg-mean-nan", PREDICT, [M, "mean [NaN, 0.5, 0.5] is not finite"],
         section("segmentation", "seg", mean=[float("nan"), 0.5, 0.5])),
    # -- no check foresaw it: running out of memory is still one line (the CLI's last net)
    Case("predict-runs-out-of-memory", ["segment", "predict", "{shared}/seg.safetensors",
                                        "{c}/big.png", "--out-dir", "{out}"],
         ["error: out of memory", "use smaller inputs"], big_image(5000), out_created=True,
         memory=256 << 20),
    Case("seg-channels", PREDICT, [M, "channels 1 but the unet takes 3"],
         section("segmentation", "seg", channels=1)),
    Case("seg-image-size-40000", PREDICT, [M, "image_size 40000 but the unet's is 8"],
         section("segmentation", "seg", image_size=40_000)),
    Case("seg-class-names-count", PREDICT, [M, "2 class_names for 3 classes"],
         section("segmentation", "seg", class_names=["a", "b"])),
    Case("seg-num-classes-a-string", PREDICT, [M, "its segmentation metadata is damaged "
                                               "(segmentation.num_classes: expected int, got "
                                               "'3')"],
         section("segmentation", "seg", num_classes="3")),
    Case("seg-mean-strings", INFO, [M, "segmentation.mean[0]: expected float"],
         section("segmentation", "seg", mean=["a", "b", "c"])),
    Case("seg-missing-std", PREDICT, [M, "its segmentation metadata is damaged ('std')"],
         edit(lambda h: h["__metadata__"].update(segmentation=json.dumps(
             {k: v for k, v in SEG.items() if k != "std"})), "seg")),
    Case("seg-not-an-object", PREDICT, [M, "segmentation: expected a JSON object, got a JSON "
                                        "array"], meta("segmentation", "[]", "seg")),
    # -- weights that are not finite (grey images before)
    Case("nan-weight-sample", SAMPLE, [M, "holds 1 non-finite value(s) (NaN or inf)",
                                       "use an earlier model file"],
         poisoned((3, float("nan")), (1, float("nan")))),
    Case("inf-weight-inspect", INSPECT, [M, "non-finite"], poisoned((0, float("inf")))),
    Case("nan-weight-predict", PREDICT, [M, "non-finite"], poisoned((2, float("nan")),
                                                                     src="seg")),
    Case("nan-weight-info", INFO, [M, "warning", "non-finite value(s)"],
         poisoned((1, float("nan"))), code=0),
    # -- the same lies in a --guide-model file (issue 24): the same reader refuses them
    Case("guide-nan-weight", GUIDE, [M, "holds 1 non-finite value(s) (NaN or inf)"],
         poisoned((2, float("nan")))),
    Case("guide-header-length-2-to-the-63", GUIDE, [M, "is not a safetensors model file or is "
                                                    "truncated"],
         raw_file(struct.pack("<Q", 1 << 63) + b"{}" + b" " * 100)),
    Case("guide-700m-parameters", GUIDE, [M, "this model (one image at a time) needs",
                                          "GiB of weights (unet.base_channels = 2048"],
         consistent_but_huge),
    Case("guide-a-segmentation-model", ["sample", "{shared}/good.safetensors", "--guide-model",
                                        "{shared}/seg.safetensors", "--guidance-scale", "2",
                                        "--steps", "2", "--out-dir", "{out}"],
         ["seg.safetensors is not a diffusion model"]),
    # -- round two (issue 23): sizes and numbers no run can have, before any work
    Case("edm-a-billion-steps", ["sample", "{shared}/edm.safetensors", "--steps", "1000000000",
                                 "--num-samples", "1", "--out-dir", "{out}"],
         ["--steps 1000000000 is more than 100,000 steps"]),
    Case("class-label-of-5000-digits", ["sample", "{shared}/good.safetensors", "--class-label",
                                        "9" * 5000, "--out-dir", "{out}"],
         ["--class-label", "(5000 digits) is no class index"]),
    *[Case(f"{label}-seed-{name}", [*cmd, "--seed", seed],
           ["argument --seed", "is not a seed (an integer from 0 to 2**63 - 1)"])
      for name, seed in (("25-digits", "1" * 25), ("negative", "-1"))
      for label, cmd in (("inspect", ["inspect", "{shared}/good.safetensors", "--out-dir",
                                      "{out}"]),
                         ("eval-bpd", ["eval", "bpd", "{shared}/good.safetensors"]),
                         ("eval-fid", ["eval", "fid", "{c}"]))],
    *[Case(f"eval-nfe-a-trillion-{what}", ["eval", "nfe", "{shared}/good.safetensors",
                                          f"--num-{what}", "1000000000000"],
           [f"num_{what}", "is more than", "use fewer"])
      for what in ("images", "reference")],
    # -- diffusers folders to import (issue 23): priced from the configs before anything is
    # read or built (30,000 layers took 2.5 GB and 70 s, 10**6 never ended), numbers checked
    *[Case(f"import-{name}", IMPORT, ["pipe: importing this model, then loading it one image "
                                      "at a time, needs", *parts, "more than the",
                                      "nothing was written"], pipe(**changes))
      for name, parts, changes in (
          ("layers-per-block-a-million", ["GiB of weights (unet/config.json",
                                          "layers_per_block = 1000000"],
           {"unet": {"layers_per_block": 10 ** 6}}),
          ("block-out-channels-a-trillion", ["GiB of weights", "block_out_channels = "
                                             "[1000000000000]"],
           {"unet": {"block_out_channels": [10 ** 12]}}),
          ("in-channels-a-trillion", ["in_channels = 1000000000000"],
           {"unet": {"in_channels": 10 ** 12}}),
          ("timesteps-a-billion", ["GiB of schedule tables (scheduler/scheduler_config.json: "
                                   "num_train_timesteps = 1000000000)"],
           {"scheduler": {"num_train_timesteps": 10 ** 9}}),
          ("sample-size-10-to-the-30", ["of activations (unet/config.json: sample_size = 1"
                                        + "0" * 30 + ")"],
           {"unet": {"sample_size": 10 ** 30}}),
          ("sample-size-pair-of-a-billion", ["of activations", "sample_size = 1000000000"],
           {"unet": {"sample_size": [10 ** 9, 10 ** 9]}}))],
    Case("import-layers-per-block-300-for-weights-of-one", IMPORT,
         ["holds 74 tensors, but the UNet2DModel its config.json describes has at least 6,648",
          "layers_per_block = 300", "the weights do not fit it"],
         pipe(unet={"layers_per_block": 300})),
    Case("import-100000-levels", IMPORT, ["block_out_channels has 100,000 levels; a sample_size "
                                          "of 8 is halved below one pixel after 4"],
         pipe(unet={"block_out_channels": [8] * 100_000,
                    "down_block_types": ["DownBlock2D"] * 100_000,
                    "up_block_types": ["UpBlock2D"] * 100_000})),
    Case("import-channels-of-61-digits", IMPORT, ["block_out_channels[0] = an integer of about "
                                                  "61 digits: out of range for any setting"],
         pipe(unet={"block_out_channels": [10 ** 60]})),
    Case("import-trained-betas-for-a-billion-steps", IMPORT,
         ["trained_betas holds 3 betas for num_train_timesteps = 1000000000"],
         pipe(scheduler={"num_train_timesteps": 10 ** 9, "trained_betas": [0.1, 0.2, 0.3]})),
    *[Case(f"import-{key}-{value.lower()}", IMPORT, [f"{where}: {key} = {value}: {NOT_FINITE}"],
           pipe(**{"unet" if where == "unet/config.json" else "scheduler":
                   {key: Raw(value)}}))
      for where, key, value in (("unet/config.json", "freq_shift", "NaN"),
                                ("unet/config.json", "freq_shift", "Infinity"),
                                ("unet/config.json", "norm_eps", "-Infinity"),
                                ("unet/config.json", "dropout", "NaN"),
                                ("scheduler/scheduler_config.json", "beta_start", "NaN"),
                                ("scheduler/scheduler_config.json", "clip_sample_range",
                                 "Infinity"))],
    Case("import-flow-shift-nan", IMPORT, ["scheduler_config.json: shift = NaN: " + NOT_FINITE],
         pipe(scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler",
                         "shift": Raw("NaN"), "num_train_timesteps": 20})),
    Case("import-trained-beta-nan", IMPORT, ["trained_betas[1] = NaN: " + NOT_FINITE],
         pipe(scheduler={"num_train_timesteps": 3,
                         "trained_betas": Raw("[0.1, NaN, 0.3]")})),
    Case("import-freq-shift-1e999", IMPORT, ["freq_shift = Infinity: " + NOT_FINITE],
         pipe(unet={"freq_shift": Raw("1e999")})),  # Python's parser reads 1e999 as inf
    # weights: float8 is imported as the model-file reader takes it; what is not a float, or
    # not finite (float8's NaN too), is one line
    Case("import-float8-weights", IMPORT, [],
         pipe(weights=as_dtype(torch.float8_e4m3fn)), code=0, out_created=True),
    Case("import-float8-nan-weight", IMPORT, ["tensor conv_in.bias holds 8 non-finite value(s) "
                                              "(NaN or inf) of 8", "damaged"],
         pipe(weights=as_dtype(torch.float8_e5m2, nan=True))),
    Case("import-int64-weights", IMPORT, ["is int64; UNet2DModel's weights are floating point"],
         pipe(weights=as_dtype(torch.int64))),
    Case("import-nan-weight", IMPORT, ["tensor conv_in.bias holds 8 non-finite", "damaged"],
         pipe(weights=as_dtype(torch.float32, nan=True))),
    # -- the file's metadata may not stand in for what the file is
    Case("info-json-planted-path", ["info", "--json", M_], [],
         edit(lambda h: h["__metadata__"].update(
             path=json.dumps("/etc/passwd"), parameters="7", sha256=json.dumps("0" * 64),
             weights_finite="true", metadata=json.dumps({"x": 1}))), code=0),
]


def test_the_imported_float8_model_loads(results) -> None:
    # float8 weights became float32 ones in a model file that info and sample take
    from diffunet.cli import main

    _, root, _ = results
    out = root / "import-float8-weights" / "out"
    assert results[0]["import-float8-weights"].stdout.startswith(f"wrote {out} ")
    net, schedule, _ = diffunet.load_model(out)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())
    assert main(["info", str(out)]) == 0


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    shared = tmp_path_factory.mktemp("shared")
    _shared(shared)
    root = tmp_path_factory.mktemp("hostile_models") / "cases"
    return run_cases(CASES, root, shared), root, shared


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_model_file(results, case: Case) -> None:
    check(case, results[0][case.id])


def test_the_good_files_work(results, tmp_path: Path) -> None:
    # The shared inputs the table edits are themselves fine (so each refusal is its one edit).
    from diffunet.cli import main

    _, _, shared = results
    assert main(["info", str(shared / "good.safetensors")]) == 0
    assert main(["info", str(shared / "seg.safetensors")]) == 0


def test_the_first_bad_tensor_is_named(results) -> None:
    _, root, _ = results
    r = results[0]["nan-weight-sample"]
    order = list(UNet(UNetConfig(**TINY)).state_dict())
    assert f"tensor {order[1]} holds" in r.stderr  # index 1 comes before index 3
    info = results[0]["nan-weight-info"]
    assert f"NOT FINITE: tensor {order[1]} holds 1 NaN/inf" in info.stdout


def test_info_json_reports_the_real_file(results) -> None:
    _, root, _ = results
    r = results[0]["info-json-planted-path"]
    shown = json.loads(r.stdout)
    path = root / "info-json-planted-path" / M
    assert shown["path"] == str(path)
    assert shown["parameters"] == UNet(UNetConfig(**TINY)).num_parameters()
    import hashlib
    assert shown["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert shown["weights_finite"] is True and shown["nonfinite_tensor"] is None
    # The file's own values are kept, under its metadata.
    assert shown["metadata"]["path"] == "/etc/passwd" and shown["metadata"]["parameters"] == 7
    assert shown["metadata"]["metadata"] == {"x": 1}
    assert shown["unet_config"]["base_channels"] == 8  # other keys stay where they were
