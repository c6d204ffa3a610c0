"""The model file: one ``.safetensors`` that describes itself.

Layout (safetensors, https://github.com/huggingface/safetensors): the UNet's state dict as
tensors, and string metadata

=====================  ==================================================================
``format``             ``"diffunet.model"``
``format_version``     ``"1"`` (files newer than :data:`FORMAT_VERSION` are refused)
``diffunet_version``   the version that wrote the file
``unet_config``        JSON of :class:`~diffunet.config.UNetConfig`
``schedule_config``    JSON of :class:`~diffunet.config.ScheduleConfig` (absent for a model with
                       no noise schedule, e.g. a segmentation UNet; ``load_model`` then returns
                       ``None`` for the schedule)
anything else          JSON values given to ``save_model(..., extra=...)`` (e.g. ``step``)
=====================  ==================================================================

Loading reads the header itself (so a truncated or foreign file gets a precise message) and
never unpickles anything: a pickled ``.pt``/``.ckpt`` is recognised and refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .config import ScheduleConfig, UNetConfig, from_dict, to_dict
from .diffusion import NoiseSchedule
from .errors import ConfigError, ModelFileError
from .fileio import atomic_write_bytes
from .unet import UNet
from .version import __version__

FORMAT = "diffunet.model"
FORMAT_VERSION = 1
_RESERVED = {"format", "format_version", "diffunet_version", "unet_config", "schedule_config"}
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


def save_model(path: str | os.PathLike, model: torch.nn.Module, schedule: NoiseSchedule | None,
               *, extra: dict[str, Any] | None = None) -> None:
    """Write ``model``'s weights and configs to one self-describing ``.safetensors``.

    ``model`` may be wrapped (``torch.compile``, DDP); the bare UNet's state dict is stored, on
    the CPU, in the dtype the weights have. ``schedule`` is None for a network that is not a
    diffusion model (e.g. a segmentation UNet). ``extra`` adds JSON-serialisable metadata (for
    example ``{"step": 1000}``). The write is atomic.
    """
    net = unwrap_model(model)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "diffunet_version": __version__,
        "unet_config": json.dumps(to_dict(net.config)),
    }
    if schedule is not None:
        metadata["schedule_config"] = json.dumps(to_dict(schedule.config))
    for key, value in (extra or {}).items():
        if key in _RESERVED:
            raise ValueError(f"extra metadata key {key!r} is reserved")
        metadata[key] = json.dumps(value)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(path, save_safetensors_bytes(tensors, metadata=metadata))


def _looks_pickled(data: bytes) -> bool:
    # torch.save writes a zip archive ("PK\x03\x04"); plain pickles start with PROTO 2-5.
    return data[:4] == b"PK\x03\x04" or (data[:1] == b"\x80" and data[1:2] in b"\x02\x03\x04\x05")


def _read_header(path: Path, data: bytes) -> dict[str, Any]:
    """Parse and sanity-check the safetensors header of ``data`` (the bytes of ``path``)."""
    header = None
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    if 8 <= 8 + n <= len(data) and n <= _MAX_HEADER:
        try:
            header = json.loads(data[8:8 + n].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if header is None and _looks_pickled(data):
        raise ModelFileError(
            f"{path} is a pickled PyTorch checkpoint (.pt/.ckpt); diffunet never unpickles files "
            "because that can run code. Load it yourself with torch.load(..., weights_only=True), "
            "put the state dict in a UNet, and write it with diffunet.save_model")
    if len(data) < 8:
        raise ModelFileError(f"{path} is not a safetensors model file (only {len(data)} bytes); "
                             "re-save or re-download it")
    if n > _MAX_HEADER or 8 + n > len(data):
        raise ModelFileError(f"{path} is not a safetensors model file or is truncated (header "
                             f"says {n} bytes, file has {len(data)}); re-save or re-download it")
    if header is None:
        raise ModelFileError(f"{path} is not a safetensors model file (its header is not JSON)")
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} is not a safetensors model file (malformed header)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise ModelFileError(f"{path}: malformed safetensors entry for tensor {name!r}; the "
                                 "file is damaged, re-save or re-download it")
    if 8 + n + end > len(data):
        raise ModelFileError(f"{path} is truncated ({len(data)} bytes, its header needs "
                             f"{8 + n + end}); re-save or re-download it")
    return header


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Check that ``path`` is a diffunet model file and return its parsed metadata.

    Values are decoded from JSON; ``unet_config`` and ``schedule_config`` stay plain dicts.
    """
    return _parse(Path(path), _read_bytes(Path(path)))[0]


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder; give the path of a .safetensors model file")
    if not path.is_file():  # reading a FIFO would wait forever, a device might never end
        raise ModelFileError(f"{path} is not a regular file (a FIFO, socket or device); give "
                             "the path of a .safetensors model file")
    return path.read_bytes()


def _parse(path: Path, data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    header = _read_header(path, data)
    raw = header.get("__metadata__") or {}
    if raw.get("format") != FORMAT:
        raise ModelFileError(f"{path} is a safetensors file but not a diffunet model file (its "
                             "metadata has no format 'diffunet.model'); write one with "
                             "diffunet.save_model")
    try:
        version = int(raw.get("format_version", ""))
    except ValueError:
        raise ModelFileError(f"{path}: malformed format_version {raw.get('format_version')!r}; "
                             "the file is damaged, re-save or re-download it")
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{path} has model format version {version}, newer than this "
                             f"diffunet {__version__} reads ({FORMAT_VERSION}); upgrade diffunet")
    meta: dict[str, Any] = {"format_version": version}
    for key, value in raw.items():
        if key in ("format", "format_version"):
            continue
        if key == "diffunet_version":
            meta[key] = value
            continue
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ModelFileError(f"{path}: metadata {key!r} is not valid JSON; the file is damaged")
    for key in ("unet_config", "schedule_config"):
        if key == "schedule_config" and key not in meta:
            continue  # a model with no noise schedule (e.g. segmentation)
        if not isinstance(meta.get(key), dict):
            raise ModelFileError(f"{path}: metadata {key!r} is missing or not a JSON object; "
                                 "the file is damaged or was not written by diffunet.save_model")
    return meta, header


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
               ) -> tuple[UNet, NoiseSchedule | None, dict[str, Any]]:
    """Rebuild the UNet (in eval mode) and noise schedule stored in a model file.

    Returns ``(net, schedule, meta)`` where ``meta`` holds the file's other metadata
    (``format_version``, ``diffunet_version``, ``step`` if saved, ...) and ``sha256``;
    ``schedule`` is None for a file with no noise schedule (a segmentation model).
    Never unpickles; raises :class:`~diffunet.errors.ModelFileError` with a one-line reason.
    """
    path = Path(path)
    data = _read_bytes(path)
    meta, _ = _parse(path, data)
    try:
        unet_cfg = from_dict(UNetConfig, meta["unet_config"], "unet")
        sched_cfg = (from_dict(ScheduleConfig, meta["schedule_config"], "schedule")
                     if "schedule_config" in meta else None)
    except ConfigError as e:
        raise ModelFileError(f"{path}: its stored config is invalid ({e})") from None
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as e:  # safetensors raises its own error type for damaged data
        raise ModelFileError(f"{path}: cannot read its tensors ({e}); the file is damaged")
    net = UNet(unet_cfg)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
             for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"wrong shape {len(wrong)} (e.g. {wrong[0]})")
        raise ModelFileError(f"{path}: the weights do not fit the stored unet config: "
                             + "; ".join(parts))
    net.load_state_dict(tensors)
    net.to(device).eval()
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    return net, (NoiseSchedule(sched_cfg) if sched_cfg is not None else None), meta


def load_diffusion_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                         ) -> tuple[UNet, NoiseSchedule, dict[str, Any]]:
    """:func:`load_model` for commands that need a diffusion model (sample, eval): a file with
    no noise schedule (a segmentation model) is a :class:`ModelFileError` saying what to use."""
    net, schedule, meta = load_model(path, device=device)
    if schedule is None:
        raise ModelFileError(f"{path} is not a diffusion model (it has no noise schedule; a "
                             "segmentation model?); use `diffunet segment predict` with it")
    return net, schedule, meta


def write_tensor_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str]) -> None:
    """Write any tensors with string metadata as one safetensors file, atomically (for files
    that are not models, e.g. cached FID reference statistics)."""
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save_safetensors_bytes(data, metadata=metadata))


def read_tensor_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and string metadata of a safetensors file (never unpickles); a missing,
    damaged or foreign file is a :class:`ModelFileError`."""
    path = Path(path)
    data = _read_bytes(path)
    header = _read_header(path, data)
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as e:  # safetensors raises its own error type for damaged data
        raise ModelFileError(f"{path}: cannot read its tensors ({e}); the file is damaged")
    return tensors, dict(header.get("__metadata__") or {})
