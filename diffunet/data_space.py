"""The data space: where the diffusion state x0 lives, as its own axis beside the data.

A model is trained and sampled in one data space:

- :class:`PixelSpace` (no ``[vae]``, today's behaviour): x0 is the image itself, float (B, C, S,
  S) in [-1, 1], and ``clip_x0`` clips x0 estimates to that range.
- :class:`LatentSpace` (``vae.path`` set): x0 is a pretrained diffusers ``AutoencoderKL``'s latent
  of the image (Rombach et al. 2022), (B, c, S/f, S/f) with c its ``latent_channels`` and f =
  2^(len(block_out_channels) - 1) its downsampling, scaled as (z - shift_factor) *
  scaling_factor so that the state is about unit-variance. Latents have no clip range: clipping
  them to [-1, 1] would cut off most of their values, so ``clip_x0`` is off.

This module owns encoding, decoding, the scaling, the clip range and the latent shape. Nothing
else asks which space is in use: the UNet sees channels and a size, the formulations and samplers
see tensors and a ``clip_x0`` flag (:data:`~diffunet.formulations.base.CLIP_RANGE` is the one
range that flag clips to). :func:`space_class` is the one place a config's ``[vae]`` is turned
into a space; :func:`load_run_config` makes the UNet's shape follow the VAE.

A VAE is read as a stranger's files: its ``config.json`` within bounds (size, nesting, types,
values) before diffusers sees it, its weights from safetensors only (a pickled ``.bin`` is never
loaded: it can run code). diffusers is an optional extra, imported only when a VAE is loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from .checks import fail, looks_like_repo_id
from .config import RunConfig, VaeConfig, config_from_dict, read_config_data
from .data import flip_where
from .errors import ConfigError, MissingDependencyError, ModelFileError, UsageError
from .fileio import (first_line, parse_json, read_regular_file, regular_file_sha256,
                     schema_problem)
from .formulations.base import CLIP_RANGE

__all__ = ["BUILTIN_VAE", "DataSpace", "PixelSpace", "LatentSpace", "LatentShape", "space_class", "load_space",
           "vae_folder", "vae_identity", "recorded_vae", "folder_record", "vae_files", "model_space", "read_vae_config", "latent_shape", "fit_to_vae", "load_run_config",
           "VAE_WEIGHTS", "MAX_VAE_CONFIG_BYTES"]

BUILTIN_VAE = "builtin-shapes"
"""``vae.path`` of the small AutoencoderKL diffunet ships (trained on the built-in shapes at
64x64 by ``scripts/train_shapes_vae.py``: 4x down, 4 latent channels), so a latent run needs no
download (``configs/latent_shapes.toml``)."""
BUILTIN_VAE_FOLDER = Path(__file__).resolve().parent / "vae_shapes"
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
"""The weights file of a diffusers model folder, the only one read."""
_PICKLED_WEIGHTS = "diffusion_pytorch_model.bin"
MAX_VAE_CONFIG_BYTES = 64 << 10
"""The largest VAE ``config.json`` read: diffusers writes about 1 KB."""
_MAX_VAE_CONFIG_DEPTH = 4
"""An AutoencoderKL config nests 2 levels (an object of lists); deeper is not one."""
_MAX_WIDTH = 4096
"""The most channels a VAE level may have (Stable Diffusion's widest has 512): a config may not
make diffusers allocate an arbitrarily large network."""
_MAX_LEVELS = 8
_MAX_LAYERS = 8
_MAX_LATENT_CHANNELS = 256

# The keys of config.json read here, with their JSON types (fileio.schema_problem); the others
# are diffusers' business. "?" marks a key diffusers has a default for.
_SCHEMA = {"_class_name": str, "in_channels": int, "out_channels": int, "latent_channels": int,
           "block_out_channels": [int], "layers_per_block?": int, "norm_num_groups?": int,
           "scaling_factor?": float, "shift_factor?": (float, type(None))}


class DataSpace:
    """Where a model's diffusion state lives (see the module docstring). Subclasses set
    :attr:`clip_range` and implement the maps between images and states."""

    clip_range: ClassVar[Optional[tuple[float, float]]]
    """The range ``clip_x0`` may clip x0 estimates to; None: the state has none (latents)."""

    @classmethod
    def clip_x0(cls, requested: Optional[bool]) -> Optional[bool]:
        """The ``clip_x0`` to sample with when ``requested`` was asked for (None: the sampler's
        default): unchanged where the space has a clip range, else False (never clip)."""
        return requested if cls.clip_range is not None else False

    def state_shape(self, channels: int, image_size: int) -> tuple[int, int, int]:
        """The state's (C', S', S') for images of ``channels`` x ``image_size`` x
        ``image_size``."""
        raise NotImplementedError

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, C, S, S) in [-1, 1] -> the states x0 (B, C', S', S') (latents: the
        posterior mean, scaled), on the images' device, in their dtype."""
        raise NotImplementedError

    def decode(self, states: Tensor) -> Tensor:
        """States (B, C', S', S') -> images (B, C, S, S), about [-1, 1] (not clipped: making
        pixels of them is :mod:`diffunet.images`' job), on the states' device and dtype."""
        raise NotImplementedError

    def record(self) -> Optional[dict[str, Any]]:
        """What a model file says of its data space (None: pixels, nothing to record)."""
        return None

    def image_shape(self, state_shape: Sequence[int]) -> tuple[int, int, int]:
        """The images' (C, S, S) that states of ``state_shape`` (C', S', S') decode to."""
        raise NotImplementedError

    def state_mask(self, keep: Tensor) -> Tensor:
        """An image keep mask (B, 1, S, S) (1: keep, 0: repaint) on the state grid."""
        raise NotImplementedError

    # --- training: what the data loader yields -> the states x0 ---------------------------

    @staticmethod
    def batch_state_shape(batch: Tensor) -> tuple[int, ...]:
        """The state shape (C', S', S') of one item of a training ``batch``."""
        return tuple(batch.shape[1:])

    def training_x0(self, batch: Tensor, flip: Optional[Tensor], generator: torch.Generator,
                    mine: slice, global_batch: int) -> Tensor:
        """A training step's states x0 (b, C', S', S') from the loader's ``batch`` (b, ...),
        mirrored where ``flip`` (b,) bool says (None: no flips). Any draw comes from
        ``generator`` for the ``global_batch`` and is sliced to this process's rows ``mine``
        (the trainers' rule: any number of processes sees the same global batch)."""
        return batch if flip is None else flip_where(batch, flip)


class PixelSpace(DataSpace):
    """The images themselves, in [-1, 1]: encode and decode are the identity."""

    clip_range = CLIP_RANGE

    def state_shape(self, channels: int, image_size: int) -> tuple[int, int, int]:
        return (channels, image_size, image_size)

    def encode(self, images: Tensor) -> Tensor:
        return images

    def decode(self, states: Tensor) -> Tensor:
        return states

    def image_shape(self, state_shape: Sequence[int]) -> tuple[int, int, int]:
        c, h, w = state_shape
        return (c, h, w)

    def state_mask(self, keep: Tensor) -> Tensor:
        return keep


@dataclass(frozen=True)
class LatentShape:
    """What a VAE's config says about its latents (read without loading its weights)."""

    image_channels: int
    """The images it encodes and decodes: 1 or 3 channels (its ``in_channels``)."""
    latent_channels: int
    levels: int
    """len(block_out_channels): every level but the last halves the image."""

    @property
    def factor(self) -> int:
        """The downsampling f: a latent is the image's side / f."""
        return 2 ** (self.levels - 1)


def space_class(vae: VaeConfig) -> type[DataSpace]:
    """The space a ``[vae]`` section names, without loading anything (for its
    :meth:`~DataSpace.clip_x0`): the one place that tells pixel runs from latent ones."""
    return PixelSpace if vae.path is None else LatentSpace


def load_space(vae: VaeConfig, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> DataSpace:
    """The data space of ``vae``: :class:`PixelSpace`, or the VAE loaded onto ``device``."""
    if space_class(vae) is PixelSpace:
        return PixelSpace()
    return LatentSpace.load(vae, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Finding and checking a VAE folder


def vae_folder(vae: VaeConfig, *, weights: bool = True) -> Path:
    """The local folder holding ``vae``'s ``config.json`` (and, with ``weights``, its
    safetensors weights): ``vae.path`` (/ ``vae.subfolder``) when it is a folder, else the Hub
    id fetched into huggingface_hub's cache (``HF_HUB_OFFLINE=1`` reads a filled cache). One
    line for a path that is neither, or a download that fails."""
    assert vae.path is not None, "pixel space has no VAE folder"
    if vae.path == BUILTIN_VAE:  # the VAE shipped in the package (a local folder of that name:
        for key in ("revision", "subfolder"):  # give it as ./builtin-shapes)
            if getattr(vae, key) is not None:
                fail(f"vae.{key}", f"is for a Hub id or a folder; {BUILTIN_VAE} is diffunet's "
                     f"own VAE (drop vae.{key})")
        return BUILTIN_VAE_FOLDER
    path = Path(vae.path).expanduser()
    sub = vae.subfolder
    if path.exists():
        if not path.is_dir():
            fail("vae.path", f"{vae.path} is a file; give the VAE's folder (holding config.json "
                 f"and {VAE_WEIGHTS}) or a Hub id")
        if vae.revision is not None:
            fail("vae.revision", f"is for a Hub id; {vae.path} is a local folder (drop "
                 "vae.revision)")
        folder = path / sub if sub else path
        if not folder.is_dir():
            fail("vae.subfolder", f"{sub!r} is not a folder in {vae.path}")
        return folder
    if not looks_like_repo_id(vae.path):
        fail("vae.path", f"{vae.path} is neither a folder nor a Hub id (owner/name)")
    try:
        import huggingface_hub
    except ImportError:
        raise MissingDependencyError("vae.path names a Hub id, which needs huggingface_hub: pip "
                                     "install diffusers (it brings huggingface_hub)") from None
    prefix = f"{sub.strip('/')}/" if sub else ""
    wanted = [f"{prefix}config.json"] + ([f"{prefix}{VAE_WEIGHTS}"] if weights else [])
    try:  # safetensors and the config only: a .bin is never downloaded, let alone loaded
        snapshot = huggingface_hub.snapshot_download(vae.path, revision=vae.revision,
                                                     allow_patterns=wanted)
    except (OSError, ValueError) as e:  # HfHubHTTPError is an OSError: offline, missing,
        # gated, no such revision
        raise ConfigError(f"vae.path: the Hub download of {vae.path} failed "
                          f"({first_line(e)})") from None
    return Path(snapshot) / sub if sub else Path(snapshot)


def vae_identity(vae: VaeConfig, folder: Optional[Path] = None) -> dict[str, Any]:
    """The VAE by where it came from (``path``, ``revision``, ``subfolder``) and by content
    (the SHA-256 of its config.json and weights): a folder replaced by another VAE of the same
    name is another VAE. ``folder``: :func:`vae_folder` of ``vae``, if already found."""
    folder = vae_folder(vae) if folder is None else folder
    hashes = {}
    for key, name in (("config_sha256", "config.json"), ("weights_sha256", VAE_WEIGHTS)):
        try:
            # links followed: the Hub's cache links each file to its blob
            hashes[key] = regular_file_sha256(folder / name)
        except (OSError, ValueError) as e:  # missing, a folder, a FIFO, unreadable
            raise _refuse(folder, f"its {name} cannot be read ({first_line(e)}); give the "
                          f"folder of a diffusers AutoencoderKL (config.json and "
                          f"{VAE_WEIGHTS})") from None
    return {"path": vae.path, "revision": vae.revision, "subfolder": vae.subfolder, **hashes}


def _refuse(where: Path, problem: str) -> ModelFileError:
    return ModelFileError(f"vae.path: {where}: {problem}")


def read_vae_config(folder: Path, content: Optional[bytes] = None) -> dict[str, Any]:
    """``folder``'s ``config.json``, checked to describe a usable ``AutoencoderKL`` before
    diffusers reads it: a regular file of at most :data:`MAX_VAE_CONFIG_BYTES`, nested at most
    4 levels, of the class AutoencoderKL, its shape keys of the right JSON types and within
    bounds (so a hostile file cannot make diffusers build a huge network). One
    :class:`~diffunet.errors.ModelFileError` line naming the problem and the fix otherwise.
    ``content``: the file's bytes, already read (and hashed) by the caller: parsed instead of
    reading the file again."""
    path = folder / "config.json"
    try:
        raw = read_regular_file(path, MAX_VAE_CONFIG_BYTES) if content is None else content
        data = parse_json(raw, _MAX_VAE_CONFIG_DEPTH)
    except FileNotFoundError:
        raise _refuse(folder, "holds no config.json; give a diffusers AutoencoderKL folder "
                      "(save_pretrained writes config.json beside its weights)") from None
    except (OSError, ValueError, RecursionError) as e:  # too large, too deep, not JSON, a FIFO
        raise _refuse(path, f"cannot be read as a VAE config ({first_line(e)}); give the "
                      "config.json diffusers wrote for the AutoencoderKL") from None
    if not isinstance(data, dict) or data.get("_class_name") != "AutoencoderKL":
        name = data.get("_class_name") if isinstance(data, dict) else None
        raise _refuse(path, f"describes {name!r}, not an AutoencoderKL; give the folder of a "
                      "diffusers AutoencoderKL (a pipeline's vae/ subfolder: set "
                      "vae.subfolder = \"vae\")")
    problem = schema_problem(data, _SCHEMA)
    if problem is not None:
        raise _refuse(path, f"{problem}; not the config diffusers writes for an "
                      "AutoencoderKL")
    for key in ("in_channels", "out_channels"):
        if data[key] not in (1, 3):
            raise _refuse(path, f"{key} = {data[key]}; diffunet's images have 1 or 3 channels")
    if data["out_channels"] != data["in_channels"]:
        raise _refuse(path, f"out_channels {data['out_channels']} differs from in_channels "
                      f"{data['in_channels']}; the VAE must decode the images it encodes")
    bounds = {"latent_channels": (data["latent_channels"], _MAX_LATENT_CHANNELS),
              "layers_per_block": (data.get("layers_per_block", 1), _MAX_LAYERS),
              "norm_num_groups": (data.get("norm_num_groups", 1), _MAX_WIDTH),
              "len(block_out_channels)": (len(data["block_out_channels"]), _MAX_LEVELS)}
    bounds.update({f"block_out_channels[{i}]": (w, _MAX_WIDTH)
                   for i, w in enumerate(data["block_out_channels"])})
    for key, (value, most) in bounds.items():
        if not 1 <= value <= most:
            raise _refuse(path, f"{key} = {value} is outside [1, {most:,}]; not a VAE "
                          "diffunet loads")
    for key in ("scaling_factor", "shift_factor"):
        value = data.get(key)
        if value is not None and not math.isfinite(value):
            raise _refuse(path, f"{key} = {value} is not a finite number")
    if data.get("scaling_factor", 1.0) <= 0:
        raise _refuse(path, f"scaling_factor = {data['scaling_factor']} must be positive")
    return data


def latent_shape(vae: VaeConfig) -> LatentShape:
    """The latent shape of ``vae``'s VAE, from its checked ``config.json`` alone."""
    data = read_vae_config(vae_folder(vae, weights=False))
    return LatentShape(image_channels=data["in_channels"],
                       latent_channels=data["latent_channels"],
                       levels=len(data["block_out_channels"]))


# ---------------------------------------------------------------------------------------------
# The latent space


class LatentSpace(DataSpace):
    """Latents of a diffusers ``AutoencoderKL`` ``vae`` (in eval mode, frozen), scaled as x0 =
    (z - shift_factor) * scaling_factor. Build it with :meth:`load`."""

    clip_range = None  # latents are unbounded: clipping them to [-1, 1] would destroy them

    def __init__(self, vae: torch.nn.Module, shape: LatentShape, *, scaling_factor: float,
                 shift_factor: float, batch_size: int = 32,
                 identity: Optional[dict[str, Any]] = None) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.shape = shape
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self.batch_size = batch_size
        self.identity = identity
        """Where the VAE came from and its files' hashes (:func:`vae_identity`; None for a VAE
        built in memory)."""

    @classmethod
    def load(cls, vae: VaeConfig, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> "LatentSpace":
        """Load ``vae``'s AutoencoderKL (checked folder, safetensors only) onto ``device``;
        unset ``scaling_factor``/``shift_factor`` take the VAE config's own."""
        folder = vae_folder(vae)
        data = read_vae_config(folder)
        if not (folder / VAE_WEIGHTS).is_file():
            if (folder / _PICKLED_WEIGHTS).exists():
                raise _refuse(folder, f"holds {_PICKLED_WEIGHTS} only, a pickle, which diffunet "
                              "never loads (loading one can run code); convert it where you "
                              "trust it: AutoencoderKL.from_pretrained(...).save_pretrained(..., "
                              "safe_serialization=True)")
            raise _refuse(folder, f"holds no {VAE_WEIGHTS} (the VAE's weights)")
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise MissingDependencyError("vae.path: a VAE's latents need diffusers (its "
                                         "AutoencoderKL): pip install diffusers") from None
        try:
            model = AutoencoderKL.from_pretrained(folder, use_safetensors=True,
                                                  local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise _refuse(folder, f"diffusers cannot load it as an AutoencoderKL "
                          f"({first_line(e)})") from None
        own = model.config  # the config diffusers resolved: its defaults for absent keys
        scaling = vae.scaling_factor if vae.scaling_factor is not None else own.scaling_factor
        shift = vae.shift_factor if vae.shift_factor is not None else \
            getattr(own, "shift_factor", None)
        shape = LatentShape(data["in_channels"], data["latent_channels"],
                            len(data["block_out_channels"]))
        return cls(model.to(device), shape, scaling_factor=scaling,
                   shift_factor=0.0 if shift is None else shift,
                   batch_size=vae.encode_batch_size, identity=vae_identity(vae, folder))

    def record(self) -> dict[str, Any]:
        """The model file's ``vae`` record: the VAE by where it came from and by content (so
        ``diffunet sample`` finds it, and refuses another VAE given in its place), the scaling
        and the latent shape."""
        return {**(self.identity or {}), "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor, "image_channels": self.shape.image_channels,
                "latent_channels": self.shape.latent_channels, "factor": self.shape.factor}

    def image_shape(self, state_shape: Sequence[int]) -> tuple[int, int, int]:
        _, h, w = state_shape
        f = self.shape.factor
        return (self.shape.image_channels, h * f, w * f)

    def state_mask(self, keep: Tensor) -> Tensor:
        """A latent cell is kept only where all its f x f pixels are (min-pooled): whatever
        touches the repainted region is repainted. Approximate, as diffusers' latent inpainting
        is: the decoder mixes neighbouring cells, so kept pixels near the border change too."""
        f = self.shape.factor
        return -torch.nn.functional.max_pool2d(-keep, kernel_size=f, stride=f)

    @staticmethod
    def batch_state_shape(batch: Tensor) -> tuple[int, ...]:
        return tuple(batch.shape[2:])  # (b, 2 or 4, c, h, w): posterior mean, std [, mirrored]

    def training_x0(self, batch: Tensor, flip: Optional[Tensor], generator: torch.Generator,
                    mine: slice, global_batch: int) -> Tensor:
        """``batch`` (b, 2 or 4, c, h, w) holds each image's posterior (mean, std) and, with
        flips, its mirror's (the latent cache's layout: :meth:`LatentCache.__getitem__
        <diffunet.latent_cache.LatentCache.__getitem__>`); a flipped row takes its mirror's
        posterior (a latent's mirror is not the mirror's latent). z = mean + std * noise with
        the noise drawn from ``generator`` for the global batch, scaled into x0."""
        mean, std = batch[:, 0], batch[:, 1]
        if flip is not None:
            if batch.shape[1] < 4:
                raise ValueError("flips asked of a batch without its mirrors' posteriors")
            keep = flip.to(batch.device).view(-1, 1, 1, 1)
            mean, std = torch.where(keep, batch[:, 2], mean), torch.where(keep, batch[:, 3], std)
        noise = torch.randn((global_batch, *mean.shape[1:]), generator=generator,
                            device=generator.device, dtype=mean.dtype)[mine]
        return self.scale(mean + std * noise.to(mean.device))

    def state_shape(self, channels: int, image_size: int) -> tuple[int, int, int]:
        f = self.shape.factor
        if channels != self.shape.image_channels or image_size % f or image_size < 1:
            raise UsageError(f"{channels}-channel images of side {image_size} do not fit this "
                             f"VAE: it takes {self.shape.image_channels}-channel images whose "
                             f"side is a multiple of its downsampling {f}")
        return (self.shape.latent_channels, image_size // f, image_size // f)

    def scale(self, z: Tensor) -> Tensor:
        """VAE latents z (B, c, h, w) -> states x0 = (z - shift_factor) * scaling_factor."""
        return (z - self.shift_factor) * self.scaling_factor

    def unscale(self, x0: Tensor) -> Tensor:
        """States x0 (B, c, h, w) -> VAE latents z = x0 / scaling_factor + shift_factor."""
        return x0 / self.scaling_factor + self.shift_factor

    def _batches(self, x: Tensor) -> Sequence[Tensor]:
        param = next(self.vae.parameters())
        return [b.to(param.device, param.dtype) for b in x.split(self.batch_size)]

    def posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, C, S, S) in [-1, 1] -> the VAE posterior's mean and std, each (B, c,
        S/f, S/f), unscaled (what a latent cache stores: z = mean + std * noise), on the
        images' device and in their dtype; encoded ``batch_size`` images at a time."""
        if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
            raise UsageError(f"images must be (B, C, S, S), got {tuple(images.shape)}")
        self.state_shape(images.shape[1], images.shape[-1])  # refuses what the VAE cannot take
        means, stds = [], []
        with torch.no_grad():
            for batch in self._batches(images):
                dist = self.vae.encode(batch).latent_dist
                means.append(dist.mean.to(images.device, images.dtype))
                stds.append(dist.std.to(images.device, images.dtype))
        return torch.cat(means), torch.cat(stds)

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, C, S, S) -> states (B, c, S/f, S/f): the posterior mean, scaled (the
        deterministic encoding; training draws from the posterior instead)."""
        return self.scale(self.posterior(images)[0])

    def decode(self, states: Tensor) -> Tensor:
        """States (B, c, h, w) -> images (B, C, h f, w f), unclipped."""
        out = []
        with torch.no_grad():
            for batch in self._batches(self.unscale(states)):
                out.append(self.vae.decode(batch).sample.to(states.device, states.dtype))
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# A model file's data space


_RECORD = {"path": str, "revision": (str, type(None)), "subfolder": (str, type(None)),
           "config_sha256": str, "weights_sha256": str, "scaling_factor": float,
           "shift_factor": float, "image_channels": int, "latent_channels": int, "factor": int}


def recorded_vae(meta: dict[str, Any], vae_path: Optional[str] = None, *,
                 where: str = "the model file") -> Optional[tuple[VaeConfig, Path, dict[str, Any]]]:
    """The VAE a model file's metadata ``meta`` records (``vae``), found and checked without
    loading it: ``(its VaeConfig, its local folder, the record)``, or None for a pixel model.
    ``vae_path`` (``--vae``) is a local copy, which must be the same VAE by content. One line
    each for a record that is not one, a VAE that is not there, and another VAE given in its
    place."""
    record = meta.get("vae")
    if record is None:
        if vae_path is not None:
            raise UsageError(f"--vae: {where} is a pixel model (trained without a VAE); drop "
                             "--vae")
        return None
    problem = schema_problem(record, _RECORD) if isinstance(record, dict) else "not an object"
    if problem is not None:
        raise ModelFileError(f"{where}: its vae record is damaged ({problem}); use the model "
                             "file training wrote")
    name = record["path"]
    if vae_path is not None:
        vae = VaeConfig(path=vae_path, scaling_factor=record["scaling_factor"],
                        shift_factor=record["shift_factor"])
    else:
        vae = VaeConfig(path=name, revision=record["revision"], subfolder=record["subfolder"],
                        scaling_factor=record["scaling_factor"],
                        shift_factor=record["shift_factor"])
    try:
        folder = vae_folder(vae)
    except ConfigError as e:
        raise UsageError(f"{where} was trained on the latents of the VAE {name}, which cannot be "
                         f"found here ({e}); pass --vae PATH, a local copy of it") from None
    identity = vae_identity(vae, folder)
    for key, what in (("config_sha256", "config.json"), ("weights_sha256", "weights")):
        if identity[key] != record[key]:
            given = f"--vae {vae_path}" if vae_path is not None else f"the VAE at {folder}"
            raise UsageError(f"{given} is not the VAE {where} was trained with (its {what} "
                             f"differ: SHA-256 {identity[key][:12]}..., the model records "
                             f"{record[key][:12]}...); give a copy of {name}")
    data = read_vae_config(folder)
    if (data["in_channels"], data["latent_channels"], 2 ** (len(data["block_out_channels"]) - 1)
            ) != (record["image_channels"], record["latent_channels"], record["factor"]):
        raise ModelFileError(f"{where}: its vae record's shape does not match {name}'s config")
    return vae, folder, record


DIFFUSERS_SCALING_FACTOR = 0.18215
"""An AutoencoderKL's ``scaling_factor`` when its config.json has none (diffusers' default,
Stable Diffusion 1's)."""

_MAX_VAE_WEIGHTS_BYTES = 8 << 30  # SD's VAE is 335 MB in float32; no AutoencoderKL is near this


def folder_record(vae: VaeConfig, folder: Path) -> dict[str, Any]:
    """The model file's ``vae`` record (what :meth:`LatentSpace.record` writes) of the
    AutoencoderKL in ``folder``, found for ``vae``, scaled as its own config.json says: what
    ``diffunet import`` records for a pipeline's VAE. Reads the config and hashes the files;
    loads nothing."""
    data = read_vae_config(folder)
    scaling, shift = data.get("scaling_factor"), data.get("shift_factor")
    return {**vae_identity(vae, folder),
            "scaling_factor": float(DIFFUSERS_SCALING_FACTOR if scaling is None else scaling),
            "shift_factor": float(shift or 0.0), "image_channels": data["in_channels"],
            "latent_channels": data["latent_channels"],
            "factor": 2 ** (len(data["block_out_channels"]) - 1)}


def vae_files(meta: dict[str, Any], vae_path: Optional[str] = None, *,
              where: str = "the model file") -> Optional[tuple[bytes, bytes, dict[str, Any]]]:
    """The VAE a latent model file records (:func:`recorded_vae`) as the files of a diffusers
    folder: ``(its config.json, its safetensors weights, the record)`` as bytes; None for a
    pixel model. The config is the VAE's own, byte for byte (so its hash, and a re-import's
    record, stay the same), unless the model was trained with another scaling than the
    config's: then the model's ``scaling_factor`` and ``shift_factor`` are written into it.
    Both files are checked against the record's SHA-256 after they are read (a file swapped
    since the check is refused)."""
    found = recorded_vae(meta, vae_path, where=where)
    if found is None:
        return None
    _, folder, record = found
    files = []
    for name, limit, key in (("config.json", MAX_VAE_CONFIG_BYTES, "config_sha256"),
                             (VAE_WEIGHTS, _MAX_VAE_WEIGHTS_BYTES, "weights_sha256")):
        try:
            data = read_regular_file(folder / name, limit)
        except (OSError, ValueError) as e:
            raise _refuse(folder, f"its {name} cannot be read ({first_line(e)})") from None
        if hashlib.sha256(data).hexdigest() != record[key]:
            raise UsageError(f"{folder / name} changed while it was read (its SHA-256 is no "
                             f"longer the one {where} records); nothing was written")
        files.append(data)
    config = read_vae_config(folder, files[0])  # the bytes hashed above, not a second read
    own = (config.get("scaling_factor", DIFFUSERS_SCALING_FACTOR),
           config.get("shift_factor") or 0.0)
    if own != (record["scaling_factor"], record["shift_factor"]):
        config = {**config, "scaling_factor": record["scaling_factor"]}
        if record["shift_factor"] != 0.0 or config.get("shift_factor") is not None:
            config["shift_factor"] = record["shift_factor"]
        files[0] = (json.dumps(config, indent=2) + "\n").encode()
    return files[0], files[1], record


def model_space(meta: dict[str, Any], vae_path: Optional[str] = None,
                device: str | torch.device = "cpu", *, where: str = "the model file",
                dtype: torch.dtype = torch.float32) -> DataSpace:
    """The data space a model file's metadata ``meta`` records (``vae``; none: pixels), loaded
    onto ``device``: the VAE :func:`recorded_vae` finds and checks."""
    found = recorded_vae(meta, vae_path, where=where)
    if found is None:
        return PixelSpace()
    vae, folder, record = found
    space = LatentSpace.load(vae, device=device, dtype=dtype)
    space.identity = {**(space.identity or {}), "path": record["path"],
                      "revision": record["revision"],
                      "subfolder": record["subfolder"]}  # the record travels unchanged
    return space


# ---------------------------------------------------------------------------------------------
# The UNet's shape follows the VAE


_FOLLOWING = ("image_size", "in_channels")
"""The ``[unet]`` keys a latent run fills from the VAE where its config leaves them unset
(``out_channels`` is unset as None: the same as ``in_channels``)."""


def fit_to_vae(cfg: RunConfig, shape: LatentShape, named: Collection[str]) -> RunConfig:
    """``cfg`` (a latent run) with the UNet's and the images' shape made to fit the VAE's
    ``shape``: the images are ``data.image_size`` pixels (unset: ``unet.image_size`` x f, when
    ``named`` holds ``image_size``), the UNet's ``image_size`` = that / f, its ``in_channels``
    (and ``out_channels``) the latent channels, ``data.channels`` the VAE's image channels.
    Each fact is stated once: a key ``named`` (the ``[unet]`` keys the config sets) or set
    (``data.*``, ``unet.out_channels``) is checked against the VAE, one ConfigError line that
    names it and the value that fits."""
    d, u, f = cfg.data, cfg.unet, shape.factor
    c = shape.latent_channels
    if d.image_size is not None:
        pixels = d.image_size
    elif "image_size" in named:
        pixels = u.image_size * f
    else:
        fail("data.image_size", f"a latent run ([vae]) needs the images' side in pixels: set "
             f"data.image_size (the UNet's then follows: it is / {f}, the VAE's downsampling)")
    if pixels % f:
        fail("data.image_size", f"{pixels} is not divisible by the VAE's downsampling {f} "
             f"(2^({shape.levels}-1) for its {shape.levels} block_out_channels), so its latents "
             f"cannot cover the image; use a multiple of {f}, e.g. "
             f"{max(f, pixels // f * f)}")
    size = pixels // f
    if "image_size" in named and u.image_size != size:
        fail("unet.image_size", f"{u.image_size} does not fit the VAE's latents of "
             f"data.image_size {pixels} ({pixels} / {f} = {size}); leave unet.image_size unset "
             f"(it follows the VAE) or set it to {size}")
    if "in_channels" in named and u.in_channels != c:
        fail("unet.in_channels", f"{u.in_channels} does not fit the VAE's {c} latent channels; "
             f"leave unet.in_channels unset (it follows the VAE) or set it to {c}")
    if u.out_channels is not None and u.out_channels != c:
        fail("unet.out_channels", f"{u.out_channels} does not fit the VAE's {c} latent "
             f"channels; leave unet.out_channels unset (it follows the VAE) or set it to {c}")
    if d.channels is not None and d.channels != shape.image_channels:
        fail("data.channels", f"{d.channels} does not fit the VAE, which encodes "
             f"{shape.image_channels}-channel images; leave data.channels unset or set it to "
             f"{shape.image_channels}")
    try:
        unet = dataclasses.replace(u, image_size=size, in_channels=c)
    except ConfigError as e:  # e.g. too many levels for the latent size
        raise ConfigError(f"{e} (unet.image_size follows the VAE: data.image_size {pixels} / "
                          f"{f} = {size})") from None
    data = dataclasses.replace(d, image_size=pixels, channels=shape.image_channels)
    return dataclasses.replace(cfg, unet=unet, data=data)


def load_run_config(path: Optional[str] = None, overrides: Sequence[str] = (), *,
                    base: Optional[dict[str, Any]] = None) -> RunConfig:
    """:func:`diffunet.config.load_config` for a training run, with the data space resolved: a
    ``[vae]`` run's UNet shape follows the VAE (:func:`fit_to_vae`; the ``[unet]`` keys the
    config leaves unset follow, the ones it sets are checked). Reads the VAE's config.json
    (fetching it for a Hub id), never its weights."""
    data = read_config_data(path, overrides, base=base, root=RunConfig)
    cfg = config_from_dict(RunConfig, data)
    if cfg.vae.path is None:
        return cfg
    table = data.get("unet", {})
    named = {key for key in _FOLLOWING if key in table}
    return fit_to_vae(cfg, latent_shape(cfg.vae), named)
