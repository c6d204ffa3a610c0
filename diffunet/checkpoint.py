"""The model file: one ``.safetensors`` that describes itself.

Layout (safetensors, https://github.com/huggingface/safetensors): the UNet's state dict as
tensors, and string metadata

=====================  ==================================================================
``format``             ``"diffunet.model"``
``format_version``     ``"1"`` (files newer than :data:`FORMAT_VERSION` are refused)
``diffunet_version``   the version that wrote the file
``unet_config``        JSON of :class:`~diffunet.config.UNetConfig`
``schedule_config``    JSON of :class:`~diffunet.config.ScheduleConfig`, the keys its formulation
                       reads (older files hold every key; absent for a model with
                       no noise schedule, e.g. a segmentation UNet; ``read_model`` then returns
                       ``None`` for the schedule); its ``formulation`` ("vp" when absent, as in
                       older files) names the formulation it loads as
                       (``diffunet.make_schedule``)
``guide``              only in a file that carries a guide: ``{"step", "sha256", "scale"}``
                       (below)
anything else          JSON values given to ``save_model(..., extra=...)`` (e.g. ``step``)
=====================  ==================================================================

The carried guide (autoguidance by the run's own earlier EMA, Karras et al. 2024, "Guiding a
Diffusion Model with a Bad Version of Itself"): a file written by ``diffunet train`` after step
``train.guide_at x max_steps`` also holds that step's EMA weights, the same network's tensors
under the prefix ``guide.`` (:data:`GUIDE_PREFIX`), and ``guide`` metadata: the ``step`` they
are from, the ``sha256`` of those tensors (:func:`guide_digest`) and ``scale``, the
autoguidance weight sampling uses by default. Such a file has ``format_version`` 2 (an older
diffunet then says to upgrade instead of refusing unknown tensors); a file without a guide
stays version 1, as before. The reader holds the guide to the same checks as the weights
(names and shapes against the stored config, finite) and to its recorded hash.

Loading treats the file as a stranger's: it opens it as the regular file it must be (a FIFO or
a device is refused on the open descriptor), reads the 8-byte length and the header (at most
100 MiB), checks everything in the header against one schema (tensor entries with dtypes
safetensors knows, integer shapes, contiguous in-bounds offsets whose byte count is dtype x
shape, metadata a JSON object of strings with short keys, each JSON value nested at most
:data:`~diffunet.fileio.MAX_JSON_DEPTH` deep, segmentation metadata that fits the network),
compares the tensor names and shapes with the network the stored config builds (counted on the
meta device), checks that the network, its schedule and one image fit in memory, and only then
reads exactly the tensor bytes. Weights that are not finite are refused, naming the first such
tensor. Every problem is one :class:`~diffunet.errors.ModelFileError` line; nothing is ever
unpickled: a pickled ``.pt``/``.ckpt`` is recognised and refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch
from safetensors.torch import save as save_safetensors_bytes

from .config import (ScheduleConfig, UNetConfig, from_dict, segmentation_output_channels,
                     to_dict)
from .errors import ConfigError, ModelFileError, NotRegularFileError
from .fileio import (atomic_write_bytes, first_line, open_regular_file, parse_json,
                     schema_problem)
from .formulations import Formulation, make_schedule
from .resources import (Cost, activation_bytes, check_fits, network_size, parameter_shapes,
                        schedule_bytes, weight_bytes)
from .unet import UNet
from .version import __version__

FORMAT = "diffunet.model"
FORMAT_VERSION = 2
"""The newest model-file format this diffunet reads and writes: 2 for a file that carries a
guide, 1 (:data:`PLAIN_FORMAT_VERSION`) for one that does not."""
PLAIN_FORMAT_VERSION = 1
GUIDE_PREFIX = "guide."
"""The carried guide's tensor names: the guide network's state-dict names behind this."""
_RESERVED = {"format", "format_version", "diffunet_version", "unet_config", "schedule_config",
             "guide"}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def unwrap_model(model: torch.nn.Module) -> UNet:
    """The bare :class:`UNet` inside ``torch.compile`` / DDP / Accelerate wrappers."""
    while not isinstance(model, UNet):
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module"):  # DistributedDataParallel and friends
            model = model.module
        else:
            raise TypeError(f"save_model needs a diffunet UNet, got {type(model).__name__}")
    return model


class CarriedGuide(NamedTuple):
    """The guide a model file carries: ``net``, the same run's EMA network of training step
    ``step`` (the model's own architecture), and ``scale``, the autoguidance weight w that
    sampling uses with it by default, D_guide + w (D - D_guide) (Karras et al. 2024, eq. 2).
    ``sample(net, schedule, x_T, guide_model=guide.net, guidance_scale=guide.scale)``."""

    net: torch.nn.Module
    step: int
    scale: float


def guide_digest(tensors: dict[str, torch.Tensor]) -> str:
    """The SHA-256 (hex) a model file records for its carried guide's ``tensors`` (state-dict
    names without :data:`GUIDE_PREFIX`): over each tensor in name order, its name, dtype and
    shape, then its bytes as stored. A damaged or swapped guide does not match it."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{t.dtype}\0{list(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_model(path: str | os.PathLike, model: torch.nn.Module, schedule: Formulation | None,
               *, extra: dict[str, Any] | None = None, guide: CarriedGuide | None = None
               ) -> None:
    """Write ``model``'s weights and configs to one self-describing ``.safetensors``
    (:func:`model_file_bytes`) at ``path``, atomically. A command writing to a path a user
    gave claims it first and writes :func:`model_file_bytes` through the claim
    (:mod:`diffunet.output_files`)."""
    atomic_write_bytes(path, model_file_bytes(model, schedule, extra=extra, guide=guide))


def model_file_bytes(model: torch.nn.Module, schedule: Formulation | None, *,
                     extra: dict[str, Any] | None = None,
                     guide: CarriedGuide | None = None) -> bytes:
    """The bytes of the model file of ``model`` and ``schedule``.

    ``model`` may be wrapped (``torch.compile``, DDP); the bare UNet's state dict is stored, on
    the CPU, in the dtype the weights have. ``schedule`` is None for a network that is not a
    diffusion model (e.g. a segmentation UNet). ``extra`` adds JSON-serialisable metadata (for
    example ``{"step": 1000}``). ``guide``: the carried guide (a network of the model's own
    config), stored under :data:`GUIDE_PREFIX` with its ``guide`` metadata (format version 2).
    """
    net = unwrap_model(model)
    guide_tensors: dict[str, torch.Tensor] = {}
    if guide is not None:
        if schedule is None:
            raise ValueError("a carried guide needs a diffusion model (a noise schedule)")
        guide_net = unwrap_model(guide.net)
        if guide_net.config != net.config:
            raise ValueError("the carried guide must be a network of the model's own config "
                             "(the same run's earlier EMA)")
        if isinstance(guide.step, bool) or not isinstance(guide.step, int) or guide.step < 1 \
                or not (math.isfinite(guide.scale) and guide.scale >= 0):
            raise ValueError(f"a carried guide needs a step >= 1 and a finite scale >= 0, got "
                             f"{guide.step!r}, {guide.scale!r}")
        guide_tensors = {k: v.detach().to("cpu").contiguous()
                         for k, v in guide_net.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION if guide is not None else PLAIN_FORMAT_VERSION),
        "diffunet_version": __version__,
        "unet_config": json.dumps(to_dict(net.config)),
    }
    if schedule is not None:
        # its formulation's keys only: what it means, and what an older diffunet can read
        stored = to_dict(schedule.config)
        metadata["schedule_config"] = json.dumps(
            {key: stored[key] for key in schedule.config.used_fields()})
    for key, value in (extra or {}).items():
        if key in _RESERVED:
            raise ValueError(f"extra metadata key {key!r} is reserved")
        metadata[key] = json.dumps(value)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    if guide is not None:
        metadata["guide"] = json.dumps({"step": guide.step, "sha256": guide_digest(guide_tensors),
                                        "scale": float(guide.scale)})
        tensors.update({GUIDE_PREFIX + k: v for k, v in guide_tensors.items()})
    return save_safetensors_bytes(tensors, metadata=metadata)


def _looks_pickled(data: bytes) -> bool:
    # torch.save writes a zip archive ("PK\x03\x04"); plain pickles start with PROTO 2-5.
    return data[:4] == b"PK\x03\x04" or (data[:1] == b"\x80" and data[1:2] in b"\x02\x03\x04\x05")


# ---------------------------------------------------------------------------------------------
# Reading a file that may have been written by anyone: open it as what it is, read the 8-byte
# length and the header, check everything the header says, and only then read the tensor bytes.

_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1),
    "U16": (torch.uint16, 2), "U32": (torch.uint32, 4), "U64": (torch.uint64, 8),
    "BOOL": (torch.bool, 1),
}
"""safetensors dtype names (whole bytes per element) -> torch dtype and bytes per element."""
_MAX_NAME = 256  # characters of a tensor name or metadata key (diffunet's are under 80)
_MAX_DIMS = 16
_MAX_VERSION = 64  # characters of the diffunet_version string
_CHUNK = 16 << 20


def _q(text: str) -> str:
    """``repr`` of a name from the file, short enough for a one-line message."""
    r = repr(text)
    return r if len(r) <= 60 else r[:50] + "...'"


def _kind(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return f"the JSON value {json.dumps(value)}"
    if isinstance(value, (int, float)):
        return f"the JSON number {_q(str(value))[1:-1]}"
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        return "a JSON array"
    return f"the string {_q(value)}" if isinstance(value, str) else type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Header(NamedTuple):
    header: dict[str, Any]
    head: bytes  # the 8-byte length and the header bytes, as in the file
    size: int  # bytes of the whole file
    tensors: list[tuple[str, str, tuple[int, ...], int, int]]  # name, dtype, shape, begin, end


@contextlib.contextmanager
def _open(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    """``path`` opened for reading as the regular file it must be, and its size
    (:func:`~diffunet.fileio.open_regular_file`), with each refusal as its one-line
    :class:`ModelFileError`."""
    with contextlib.ExitStack() as stack:
        try:
            f, size = stack.enter_context(open_regular_file(path))
        except FileNotFoundError:
            raise ModelFileError(f"model file not found: {path}") from None
        except (IsADirectoryError, NotRegularFileError) as e:  # IsADirectoryError: Windows
            if isinstance(e, IsADirectoryError) or e.is_folder:
                raise ModelFileError(f"{path} is a folder; give the path of a .safetensors "
                                     "model file") from None
            raise ModelFileError(f"{path} is not a regular file (a FIFO, socket or device); "
                                 "give the path of a .safetensors model file") from None
        except OSError as e:
            raise ModelFileError(f"{path} cannot be opened ({(e.strerror or str(e)).lower()}); "
                                 "check its permissions or give another model file") from None
        yield f, size


def _read_exactly(f: BinaryIO, n: int) -> bytes:
    parts, left = [], n
    while left > 0:
        chunk = f.read(min(left, _CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _entry_problem(info: Any) -> str | None:
    """What is wrong with one tensor entry of a safetensors header, or None."""
    if not isinstance(info, dict):
        return f"it is {_kind(info)}, not a JSON object"
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            return f"no {key}"
    extra = sorted(set(info) - {"dtype", "shape", "data_offsets"})
    if extra:
        return f"unknown key {_q(extra[0])}"
    shape, offsets = info["shape"], info["data_offsets"]
    if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
            or not all(_is_int(d) and d >= 0 for d in shape)):
        return (f"shape must be a list of at most {_MAX_DIMS} non-negative integers, got "
                f"{_q(json.dumps(shape))[1:-1]}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        return ("data_offsets must be two increasing non-negative integers, got "
                f"{_q(json.dumps(offsets))[1:-1]}")
    return None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {_q(dup)} appears twice")
    return d


def _read_header(path: Path, f: BinaryIO, size: int) -> _Header:
    """Read and check the safetensors header of the open file ``f`` (``size`` bytes), leaving
    ``f`` at the first tensor byte. One schema check of everything in the header: tensor entries
    with dtypes safetensors knows, integer shapes, in-bounds contiguous offsets whose byte
    count is dtype x shape, metadata a JSON object of strings."""
    first = _read_exactly(f, 8)
    n = struct.unpack("<Q", first)[0] if len(first) == 8 else 0
    header, why = None, ""
    raw = b""
    if len(first) == 8 and n <= _MAX_HEADER and 8 + n <= size:
        raw = _read_exactly(f, n)
        try:
            header = parse_json(raw)
            if isinstance(header, dict):
                header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except ValueError as e:  # not UTF-8, not JSON, nested too deep, a duplicate key
            header = None
            if not isinstance(e, json.JSONDecodeError | UnicodeDecodeError):
                why = f": {e}"
    if header is None and _looks_pickled(first):
        raise ModelFileError(
            f"{path} is a pickled PyTorch checkpoint (.pt/.ckpt); diffunet never unpickles files "
            "because that can run code. Load it yourself with torch.load(..., weights_only=True), "
            "put the state dict in a UNet, and write it with diffunet.save_model")
    if len(first) < 8:
        raise ModelFileError(f"{path} is not a safetensors model file (only {size} bytes); "
                             "re-save or re-download it")
    if n > _MAX_HEADER or 8 + n > size:
        raise ModelFileError(f"{path} is not a safetensors model file or is truncated (header "
                             f"says {n} bytes, file has {size}); re-save or re-download it")
    if len(raw) < n:
        raise ModelFileError(f"{path} is truncated (it shrank while being read); re-save or "
                             "re-download it")
    if header is None:
        raise ModelFileError(f"{path} is not a safetensors model file (its header is not "
                             f"JSON{why})")
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} is not a safetensors model file (malformed header: "
                             f"{_kind(header)}, not a JSON object)")
    damaged = "the file is damaged, re-save or re-download it"
    meta = header.get("__metadata__")
    if meta is not None:
        if not isinstance(meta, dict):
            raise ModelFileError(f"{path}: its safetensors metadata is {_kind(meta)}, not a "
                                 f"JSON object of strings; {damaged}")
        for key, value in meta.items():
            if len(key) > _MAX_NAME:
                raise ModelFileError(f"{path}: a metadata key is {len(key):,} characters long "
                                     f"(at most {_MAX_NAME}: {_q(key)}); {damaged}")
            if not isinstance(value, str):
                raise ModelFileError(f"{path}: metadata {_q(key)} is {_kind(value)}, not a "
                                     "string (safetensors metadata holds only strings); "
                                     f"{damaged}")
            try:
                key.encode("utf-8"), value.encode("utf-8")
            except UnicodeEncodeError:
                raise ModelFileError(f"{path}: metadata {_q(key)} is not valid UTF-8; "
                                     f"{damaged}") from None
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if len(name) > _MAX_NAME:
            raise ModelFileError(f"{path}: a tensor name is {len(name):,} characters long (at "
                                 f"most {_MAX_NAME}: {_q(name)}); {damaged}")
        problem = _entry_problem(info)
        if problem is None and info["dtype"] not in _DTYPES:
            problem = (f"dtype {_q(str(info['dtype']))} is not one safetensors knows (one of "
                       f"{', '.join(_DTYPES)})")
        if problem is None:
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                problem = "its name is not valid UTF-8"
        if problem is not None:
            raise ModelFileError(f"{path}: malformed safetensors entry for tensor {_q(name)} "
                                 f"({problem}); {damaged}")
        begin, end = info["data_offsets"]
        tensors.append((name, info["dtype"], tuple(info["shape"]), begin, end))
    data_len = size - 8 - n
    needed = max((end for *_, end in tensors), default=0)
    if needed > data_len:
        raise ModelFileError(f"{path} is truncated ({size} bytes, its header needs "
                             f"{8 + n + needed}); re-save or re-download it")
    for name, dtype, shape, begin, end in tensors:
        want = math.prod(shape) * _DTYPES[dtype][1]
        if end - begin != want:
            raise ModelFileError(f"{path}: malformed safetensors entry for tensor {_q(name)} "
                                 f"({dtype} {list(shape)} is {want:,} bytes but its "
                                 f"data_offsets span {end - begin:,}); {damaged}")
    pos, prev = 0, None
    for name, _, _, begin, end in sorted(tensors, key=lambda t: (t[3], t[4])):
        if begin < pos:
            raise ModelFileError(f"{path}: cannot read its tensors (tensors {_q(prev)} and "
                                 f"{_q(name)} overlap at byte {begin:,}); {damaged}")
        if begin > pos:
            raise ModelFileError(f"{path}: cannot read its tensors (no tensor holds data bytes "
                                 f"{pos:,} to {begin:,}); {damaged}")
        pos, prev = end, name
    if pos != data_len:
        raise ModelFileError(f"{path}: cannot read its tensors ({data_len - pos:,} bytes "
                             f"after the last tensor); {damaged}")
    return _Header(header, first + raw, size, tensors)


def _read_tensors(path: Path, f: BinaryIO, h: _Header, digest: Any) -> dict[str, torch.Tensor]:
    """The tensors of the checked header ``h``: exactly the data region of ``f``, read (and
    hashed into ``digest``) in chunks into one buffer, each tensor a view of it."""
    data_len = h.size - len(h.head)
    buf = bytearray(data_len)
    view, pos = memoryview(buf), 0
    while pos < data_len:
        got = f.readinto(view[pos:pos + _CHUNK])
        if not got:
            raise ModelFileError(f"{path} is truncated (it shrank while being read); re-save "
                                 "or re-download it")
        digest.update(view[pos:pos + got])
        pos += got
    if f.read(1):
        raise ModelFileError(f"{path} grew while being read; read it again when it is written")
    tensors = {}
    for name, dtype, shape, begin, end in h.tensors:
        tdtype = _DTYPES[dtype][0]
        if end == begin:
            tensors[name] = torch.empty(shape, dtype=tdtype)
        else:
            tensors[name] = torch.frombuffer(buf, dtype=tdtype, count=math.prod(shape),
                                             offset=begin).reshape(shape)
    return tensors


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Check that ``path`` is a diffunet model file and return its parsed metadata.

    Values are decoded from JSON; ``unet_config`` and ``schedule_config`` stay plain dicts.
    Only the header is read (the tensor bytes are checked for extent, not read).
    """
    path = Path(path)
    with _open(path) as (f, size):
        return _parse(path, _read_header(path, f, size))


_SEGMENTATION_SCHEMA = {"num_classes?": int, "class_names?": [str], "mean?": [float],
                        "std?": [float], "image_size?": int, "channels?": int,
                        "ignore_index?": int}
"""What ``diffunet segment train`` writes under the ``segmentation`` key (see
:func:`diffunet.segmentation.training.segmentation_metadata`): each key is checked when it is
there (a missing one is for the command that needs it to name)."""


def _parse(path: Path, h: _Header) -> dict[str, Any]:
    raw = h.header.get("__metadata__") or {}
    if raw.get("format") != FORMAT:
        raise ModelFileError(f"{path} is a safetensors file but not a diffunet model file (its "
                             "metadata has no format 'diffunet.model'); write one with "
                             "diffunet.save_model")
    text = raw.get("format_version", "")
    if not re.fullmatch(r"[0-9]{1,9}", text):
        raise ModelFileError(f"{path}: malformed format_version {_q(text)}; the file is "
                             "damaged, re-save or re-download it")
    version = int(text)
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{path} has model format version {version}, newer than this "
                             f"diffunet {__version__} reads ({FORMAT_VERSION}); upgrade diffunet")
    meta: dict[str, Any] = {"format_version": version}
    for key, value in raw.items():
        if key in ("format", "format_version"):
            continue
        if key == "diffunet_version":
            if len(value) > _MAX_VERSION or not value.isprintable():
                raise ModelFileError(f"{path}: malformed diffunet_version {_q(value)}; the "
                                     "file is damaged, re-save or re-download it")
            meta[key] = value
            continue
        try:
            meta[key] = parse_json(value)
        except (json.JSONDecodeError, UnicodeError):
            raise ModelFileError(f"{path}: metadata {_q(key)} is not valid JSON; the file is "
                                 "damaged, re-save or re-download it") from None
        except ValueError as e:  # nested too deep (diffunet writes at most 4), or an integer
            # of thousands of digits
            raise ModelFileError(f"{path}: metadata {_q(key)} is refused ({e}); the file is "
                                 "damaged or not diffunet's") from None
    for key in ("unet_config", "schedule_config"):
        if key == "schedule_config" and key not in meta:
            continue  # a model with no noise schedule (e.g. segmentation)
        if not isinstance(meta.get(key), dict):
            raise ModelFileError(f"{path}: metadata {key!r} is missing or not a JSON object; "
                                 "the file is damaged or was not written by diffunet.save_model")
    if "guide" in meta:
        problem = _guide_problem(meta["guide"], version, "schedule_config" in meta)
        if problem:
            raise ModelFileError(f"{path}: its carried guide's metadata is damaged ({problem}); "
                                 "re-save the model file")
    if "segmentation" in meta:
        problem = schema_problem(meta["segmentation"], _SEGMENTATION_SCHEMA, "segmentation")
        if problem:
            raise ModelFileError(f"{path}: its segmentation metadata is damaged ({problem}); "
                                 "re-save it with `diffunet segment train`")
    return meta


_GUIDE_SCHEMA = {"step": int, "sha256": str, "scale": float}


def _guide_problem(guide: Any, version: int, diffusion: bool) -> str | None:
    """What is wrong with a file's ``guide`` metadata (None: it is well formed)."""
    problem = schema_problem(guide, _GUIDE_SCHEMA, "guide")
    if problem:
        return problem
    extra = sorted(set(guide) - {"step", "sha256", "scale"})
    if extra:
        return f"unknown key {_q(extra[0])}"
    if version < FORMAT_VERSION:
        return f"a format version {version} file carries no guide"
    if not diffusion:
        return "a model without a noise schedule carries no guide"
    if not 1 <= guide["step"] < 1 << 62:
        return f"step {guide['step']} is not a training step"
    if not re.fullmatch(r"[0-9a-f]{64}", guide["sha256"]):
        return f"sha256 {_q(guide['sha256'])} is not 64 hex digits"
    if not (math.isfinite(guide["scale"]) and guide["scale"] >= 0):
        return f"scale {guide['scale']} is not a finite number >= 0"
    return None


def _segmentation_problem(seg: dict[str, Any], cfg: UNetConfig) -> str | None:
    """What in the (schema-checked) segmentation metadata does not fit the network ``cfg``."""
    k = seg.get("num_classes")
    if k is not None:
        if not 2 <= k <= 255:  # a mask PNG holds labels 0..254 (255 is "ignore")
            return f"num_classes is {k}, not 2 to 255"
        out = cfg.out_channels if cfg.out_channels is not None else cfg.in_channels
        want = segmentation_output_channels(k)
        if out != want:
            return (f"num_classes {k} needs {want} network output channel(s) but the unet has "
                    f"{out}")
        if "class_names" in seg and len(seg["class_names"]) != k:
            return f"{len(seg['class_names'])} class_names for {k} classes"
    if any(len(name) > _MAX_NAME for name in seg.get("class_names", ())):
        return f"a class name is longer than {_MAX_NAME} characters"
    if seg.get("channels", cfg.in_channels) != cfg.in_channels:
        return f"channels {seg['channels']} but the unet takes {cfg.in_channels}"
    if seg.get("image_size", cfg.image_size) != cfg.image_size:
        return f"image_size {seg['image_size']} but the unet's is {cfg.image_size}"
    for name in ("mean", "std"):
        values = seg.get(name)
        if values is None:
            continue
        if len(values) != cfg.in_channels:
            return (f"{name} has {len(values)} entries for a {cfg.in_channels}-channel "
                    "model")
        if not all(math.isfinite(v) for v in values):
            return f"{name} {_q(json.dumps(values))[1:-1]} is not finite"
    if not all(v > 0 for v in seg.get("std", ())):
        return f"std {seg['std']} has an entry that is not positive"
    return None


def _fit_problem(h: _Header, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """How the file's tensors differ from the network's ``shapes`` (None: they fit)."""
    have = {name: shape for name, _, shape, _, _ in h.tensors}
    missing = sorted(set(shapes) - set(have))
    unexpected = sorted(set(have) - set(shapes))
    wrong = [f"{k} {have[k]} vs {v}" for k, v in shapes.items() if k in have and have[k] != v]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} (e.g. {_q(unexpected[0])[1:-1]})")
    if wrong:
        parts.append(f"wrong shape {len(wrong)} (e.g. {wrong[0]})")
    if not parts:
        return None
    implied = sum(math.prod(s) for s in shapes.values())
    held = sum(math.prod(s) for s in have.values())
    if implied != held:
        parts.append(f"its config implies {implied:,} parameters but it holds {held:,}")
    return "; ".join(parts)


_BUILD_SLACK = 10_000
"""Tensors a stored config may imply beyond the file's before it is refused unbuilt: a
meta build of that many takes well under a second, and then the refusal names what is missing
(``missing 1 (e.g. ...)``) instead of only counting."""


def _too_big_to_build(h: _Header, cfg: UNetConfig) -> str | None:
    """A config whose network has far more tensors than the file holds, or more weights than torch
    can count, found without building it (:func:`~diffunet.resources.network_size`: a million
    residual blocks would take minutes to build even on the meta device; a trillion channels
    would overflow torch's element counts). What is left to build has at most as many tensors
    as the file's header, which was read whole already."""
    size = network_size(cfg)
    held = sum(math.prod(shape) for _, _, shape, _, _ in h.tensors)
    # a few tensors short is built (on the meta device, cheaply) so the refusal can name them
    if size.tensors > len(h.tensors) + _BUILD_SLACK:
        return f"its config implies {size.tensors:,} tensors but it holds {len(h.tensors):,}"
    if size.parameters >= 1 << 62:  # past torch's int64 element counts: not even countable
        return f"its config implies {size.parameters:,} parameters but it holds {held:,}"
    return None


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """The first floating tensor (in ``tensors``' order) holding NaN or inf: its name, how many
    such entries and how many entries it has; None when every value is finite."""
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel():
            if t.element_size() == 1:  # float8: isfinite is not implemented for it everywhere
                t = t.float()
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return name, bad, t.numel()
    return None


class LoadedModel(NamedTuple):
    """What :func:`load_model_file` found: the network (eval mode), the noise schedule (None
    for a segmentation model), the file's own metadata (JSON decoded; ``format_version`` the
    integer), its sha256, the first tensor with non-finite values (None: all finite; a carried
    guide's tensors are named with :data:`GUIDE_PREFIX`) and the guide the file carries (None:
    none; its network in eval mode on the model's device)."""

    net: UNet
    schedule: Formulation | None
    metadata: dict[str, Any]
    sha256: str
    nonfinite: tuple[str, int, int] | None
    guide: CarriedGuide | None = None


def load_model_file(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    check_finite: bool = True) -> LoadedModel:
    """:func:`read_model` with the file's metadata kept apart from what the loader found.

    Everything is checked before anything large is allocated: the header (schema, offsets,
    bounds), the metadata (JSON nesting, schema, segmentation metadata against the network),
    the configs, the tensor names and shapes against the network the config builds (counted
    on the meta device), and the memory the network, its schedule and one image need. Only
    then are the tensor bytes read, exactly the data region. ``check_finite``: a NaN or inf in
    any weight is a :class:`ModelFileError` (else it is reported in ``nonfinite``).
    """
    path = Path(path)
    with _open(path) as (f, size):
        h = _read_header(path, f, size)
        meta = _parse(path, h)
        try:
            unet_cfg = from_dict(UNetConfig, meta["unet_config"], "unet")
            sched_cfg = (from_dict(ScheduleConfig, meta["schedule_config"], "schedule")
                         if "schedule_config" in meta else None)
        except ConfigError as e:
            raise ModelFileError(f"{path}: its stored config is invalid ({e})") from None
        if "segmentation" in meta:
            problem = _segmentation_problem(meta["segmentation"], unet_cfg)
            if problem:
                raise ModelFileError(f"{path}: its segmentation metadata does not fit its "
                                     f"network ({problem}); the file is damaged, re-save it "
                                     "with `diffunet segment train`")
        carries = "guide" in meta
        fit = _too_big_to_build(h, unet_cfg)
        if fit is None:
            try:
                shapes = parameter_shapes(unet_cfg)
            except (RuntimeError, ValueError, OverflowError, MemoryError) as e:
                raise ModelFileError(f"{path}: its stored unet config describes a network that "
                                     f"cannot be built ({first_line(e)})") from None
            # a file that carries a guide holds the network twice (the guide under its prefix);
            # a guide tensor in a file without guide metadata is as unexpected as any other
            fit = _fit_problem(h, {**shapes, **({GUIDE_PREFIX + k: v for k, v in shapes.items()}
                                                if carries else {})})
        if fit:
            raise ModelFileError(f"{path}: the weights do not fit the stored unet config: "
                                 f"{fit}")
        data_bytes = size - len(h.head)
        on_cpu = torch.device(device).type == "cpu"
        nets = 2 if carries else 1
        cost = Cost(nets * weight_bytes(network_size(unet_cfg)) + (data_bytes if on_cpu else 0),
                    schedule_bytes(sched_cfg.table_timesteps or 0) if sched_cfg else 0,
                    activation_bytes(unet_cfg, 1))
        fix = "use a machine with more memory, or a smaller model"
        fields = {"parameters": f"unet.base_channels = {unet_cfg.base_channels}, "
                                f"unet.channel_mults = {list(unet_cfg.channel_mults)}, "
                                f"unet.num_res_blocks = {unet_cfg.num_res_blocks}",
                  "activations": f"unet.image_size = {unet_cfg.image_size}"}
        if sched_cfg is not None:
            fields["schedule"] = f"schedule.num_train_timesteps = {sched_cfg.num_train_timesteps}"
        check_fits(cost, device, f"{path}: this model (one image at a time)", fix,
                   ModelFileError, fields)
        if not on_cpu:
            check_fits(Cost(data_bytes, 0, 0), "cpu", f"{path}: reading its weights", fix,
                       ModelFileError)
        digest = hashlib.sha256(h.head)
        tensors = _read_tensors(path, f, h, digest)
    ordered = {name: tensors[name] for name in shapes}  # the network's order
    guided = {name: tensors[GUIDE_PREFIX + name] for name in shapes} if carries else {}
    bad = first_nonfinite(ordered)
    if bad is None and carries:
        bad = first_nonfinite({GUIDE_PREFIX + k: v for k, v in guided.items()})
    if bad is not None and check_finite:
        name, count, total = bad
        raise ModelFileError(f"{path}: tensor {name} holds {count:,} non-finite value(s) (NaN "
                             f"or inf) of {total:,}; the weights are damaged (a diverged "
                             "training run?), use an earlier model file")
    guide = None
    if carries:
        info = meta["guide"]
        if guide_digest(guided) != info["sha256"]:
            raise ModelFileError(f"{path}: its carried guide (the EMA of step {info['step']}) "
                                 f"does not match the sha256 the file records for it "
                                 f"({info['sha256'][:12]}...): the guide is damaged or was "
                                 "swapped; re-save the model file or use another one")
        guide_net = UNet(unet_cfg)
        guide_net.load_state_dict(guided)
        guide = CarriedGuide(guide_net.to(device).eval(), info["step"], float(info["scale"]))
    net = UNet(unet_cfg)
    net.load_state_dict(ordered)
    del tensors, ordered, guided
    net.to(device).eval()
    schedule = make_schedule(sched_cfg) if sched_cfg is not None else None
    return LoadedModel(net, schedule, meta, digest.hexdigest(), bad, guide)


def read_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
               ) -> tuple[UNet, Formulation | None, dict[str, Any]]:
    """Rebuild the UNet (in eval mode) and noise schedule stored in a model file: the model-file
    reader (``diffunet.load_model`` takes any source: this, a diffusers folder or a Hub id).

    Returns ``(net, schedule, meta)`` where ``meta`` holds the file's other metadata
    (``format_version``, ``diffunet_version``, ``step`` if saved, ...) and ``sha256`` (the
    file's real checksum, whatever its metadata says); ``schedule`` is None for a file with no
    noise schedule (a segmentation model), else the formulation its ``schedule.formulation``
    names (a ``NoiseSchedule``, ``EDMSchedule`` or ``FlowSchedule``). Never
    unpickles, never reads more than the header before checking it (see
    :func:`load_model_file`); raises
    :class:`~diffunet.errors.ModelFileError` with a one-line reason, also for weights that are
    not finite.
    """
    loaded = load_model_file(path, device=device)
    return loaded.net, loaded.schedule, {**loaded.metadata, "sha256": loaded.sha256}


def load_diffusion_file(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                        ) -> LoadedModel:
    """:func:`load_model_file` for commands that need a diffusion model (sample, eval), with
    the carried guide (``.guide``) and ``sha256`` also in ``.metadata`` (as
    :func:`read_model`'s): a file with no noise schedule (a segmentation model) is a
    :class:`ModelFileError` saying what to use."""
    loaded = load_model_file(path, device=device)
    if loaded.schedule is None:
        raise ModelFileError(f"{path} is not a diffusion model (it has no noise schedule; a "
                             "segmentation model?); use `diffunet segment predict` with it")
    return loaded._replace(metadata={**loaded.metadata, "sha256": loaded.sha256})


def load_diffusion_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                         ) -> tuple[UNet, Formulation, dict[str, Any]]:
    """:func:`load_diffusion_file` as ``(net, schedule, meta)`` (a carried guide's metadata is
    ``meta["guide"]``; its network is :func:`load_diffusion_file`'s)."""
    loaded = load_diffusion_file(path, device=device)
    assert loaded.schedule is not None
    return loaded.net, loaded.schedule, loaded.metadata


def load_guide_model(path: str | os.PathLike, net: Any, schedule: Formulation, *,
                     model_path: str | os.PathLike | None = None,
                     model_meta: dict[str, Any] | None = None,
                     device: str | torch.device = "cpu",
                     name: str = "--guide-model") -> tuple[UNet, dict[str, Any]]:
    """Read the model file ``path`` (:func:`load_diffusion_model`: a hostile file is refused
    there) as the guide of ``net``/``schedule`` (autoguidance, Karras et al. 2024) and return
    ``(guide_net, meta)``; ``net`` is the model's UNet (or anything whose ``config`` is its
    UNetConfig). Refused, in one :class:`UsageError` line that names ``name`` and the
    difference: the model's own file (``model_path``, or the same content: the ``sha256`` of
    ``model_meta``, the model file's metadata): a model guiding itself changes nothing; another
    formulation, or another value of a schedule key that decides what the network's input and
    output mean (:attr:`~diffunet.formulations.base.Formulation.network_fields`); other image
    channels or size; other classes (``num_classes``, or the ``class_names`` both files carry).
    Another architecture is fine: a smaller network guides well."""
    from .errors import UsageError
    from .guidance import guide_mismatch

    fix = "give a weaker model (an early snapshot of the run, or a smaller network)"
    if model_path is not None:
        try:
            same = os.path.samefile(path, model_path)
        except OSError:  # a missing file: the reader below names it
            same = False
        if same:
            raise UsageError(f"{name} {path} is the model itself: a model guiding itself "
                             f"changes nothing (D + w (D - D) = D); {fix}")
    try:
        guide, guide_schedule, meta = load_diffusion_model(path, device=device)
    except ModelFileError as e:  # the reader's one line, said to be about the guide
        raise ModelFileError(f"{name}: {e}") from None
    model_meta = model_meta or {}
    if model_meta.get("sha256") is not None and meta["sha256"] == model_meta["sha256"]:
        raise UsageError(f"{name} {path} holds the model's own weights (sha256 "
                         f"{meta['sha256'][:12]}...): a model guiding itself changes nothing "
                         f"(D + w (D - D) = D); {fix}")
    problem = schedule.network_difference(guide_schedule)
    if problem is not None:
        raise UsageError(f"{name} {path} cannot guide this model: {problem}, so their "
                         "networks' outputs mean different things; give a guide of the same "
                         "formulation and schedule")
    problem = guide_mismatch(net, guide)
    if problem is not None:
        raise UsageError(f"{name} {path} cannot guide this model: {problem}; the guide must "
                         "make the same images (channels, size) with the same classes")
    names, guide_names = model_meta.get("class_names"), meta.get("class_names")
    if isinstance(names, list) and isinstance(guide_names, list) and names != guide_names:
        shown = [", ".join(map(str, n[:4])) + (", ..." if len(n) > 4 else "")
                 for n in (guide_names, names)]
        raise UsageError(f"{name} {path} has the classes {shown[0]} and the model {shown[1]}: "
                         "label k must mean the same class to both; give a guide trained on "
                         "the same classes")
    return guide, meta


def write_tensor_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str]) -> None:
    """Write any tensors with string metadata as one safetensors file, atomically (for files
    that are not models, e.g. cached FID reference statistics)."""
    atomic_write_bytes(path, tensor_file_bytes(tensors, metadata))


def tensor_file_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The bytes of a safetensors file of ``tensors`` (on the CPU) and string ``metadata``."""
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save_safetensors_bytes(data, metadata=metadata)


class TensorFileHeader(NamedTuple):
    """What a safetensors file's checked header says: its string ``metadata``, each tensor's
    torch dtype and shape (in the header's order) and the file's ``size`` in bytes."""

    metadata: dict[str, str]
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    size: int


def _header_of(h: _Header) -> TensorFileHeader:
    return TensorFileHeader(dict(h.header.get("__metadata__") or {}),
                            {name: (_DTYPES[dtype][0], shape)
                             for name, dtype, shape, _, _ in h.tensors}, h.size)


def read_tensor_file_header(path: str | os.PathLike) -> TensorFileHeader:
    """The checked header of any safetensors file (the checks of :func:`read_tensor_file`;
    no tensor byte is read): a missing, damaged or foreign file is a :class:`ModelFileError`."""
    path = Path(path)
    with _open(path) as (f, size):
        return _header_of(_read_header(path, f, size))


def read_checked_tensor_file(path: str | os.PathLike,
                             check: Callable[[TensorFileHeader], None]
                             ) -> tuple[dict[str, torch.Tensor], TensorFileHeader, str]:
    """:func:`read_tensor_file` with a veto before the tensor bytes are read: ``check(header)``
    raises to refuse the file (e.g. tensors that do not fit a network), after the header's own
    checks and before anything large is allocated. Returns the tensors, the header and the
    SHA-256 (hex) of the file's data region (the tensor bytes, as stored)."""
    path = Path(path)
    with _open(path) as (f, size):
        h = _read_header(path, f, size)
        header = _header_of(h)
        check(header)
        check_fits(Cost(size, 0, 0), "cpu", f"{path}: reading it", "use a machine with more "
                   "memory", ModelFileError)
        digest = hashlib.sha256()
        tensors = _read_tensors(path, f, h, digest)
    return tensors, header, digest.hexdigest()


def read_tensor_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and string metadata of a safetensors file (never unpickles; the header is
    checked before the tensor bytes are read); a missing, damaged or foreign file is a
    :class:`ModelFileError`."""
    path = Path(path)
    with _open(path) as (f, size):
        h = _read_header(path, f, size)
        check_fits(Cost(size, 0, 0), "cpu", f"{path}: reading it", "use a machine with more "
                   "memory", ModelFileError)
        tensors = _read_tensors(path, f, h, hashlib.sha256())
    return tensors, dict(h.header.get("__metadata__") or {})
