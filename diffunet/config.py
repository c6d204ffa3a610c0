"""Configuration: one frozen, typed dataclass per component, each validating itself.

Defaults live only here and in the ``[schedule]`` section, :class:`ScheduleConfig`, which lives
beside the formulations that read it (:mod:`diffunet.formulations.settings`; re-exported here).
Rules that belong to a formulation or a sampler are asked of them: which keys a formulation
reads and how they relate (its class), which grid a sampler runs
(:func:`~diffunet.samplers.default_grid`) and every sampling setting's rule
(:func:`~diffunet.samplers.check_sampling`). ``from_dict`` builds a config from plain data (a
TOML table, a model file's JSON metadata) and turns an unknown key or a wrong type into a
one-line :class:`~diffunet.errors.ConfigError` that names the key (with a "did you mean" where
one is close). ``to_dict`` is its inverse, used for the JSON written into model files and run
folders.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from .checks import INT_LIMIT, shown
from .checks import check_finite as _check_finite
from .checks import fail as _fail
from .errors import ConfigError, DiffunetError
from .fileio import first_line, read_regular_file
from .formulations import FORMULATIONS, ScheduleConfig, formulation_class
from .phema import SIGMA_REL_MAX
from .samplers import (PREVIEW_GRIDS, SAMPLER_TABLE, SamplerName, SigmaGrid, Spacing,
                       check_sampling, preview_grid)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

C = TypeVar("C")

SEED_LIMIT = 2**32
"""Seeds are integers in [0, 2**32): what NumPy's seeding (and so Accelerate's ``set_seed``,
which every run calls) accepts. ``diffunet sample --seed`` draws with torch alone and allows
more (below 2**63 - num_samples)."""


def check_seed(key: str, seed: Any, error: type[DiffunetError] = ConfigError) -> None:
    """Refuse a seed outside [0, 2**32) (:data:`SEED_LIMIT`) with one line naming ``key``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise error(f"{key}: must be an integer with 0 <= seed < 2**32 (what NumPy's seeding "
                    f"accepts), got {shown(seed)}")


def free_on_resume(default: Any) -> Any:
    """A config field that a resumed run may change: it says how the run executes or how long it
    goes on, not what the saved state computed (``--resume`` compares every other field with the
    run's saved config and refuses a change, naming the key). Use as the field's default."""
    return dataclasses.field(default=default, metadata={"resume": "free"})


def may_change_on_resume(cls: type, name: str) -> bool:
    """Whether field ``name`` of the config dataclass ``cls`` is :func:`free_on_resume`."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("resume") == "free"
    return True  # a key this version no longer has constrains nothing


@dataclass(frozen=True)
class UNetConfig:
    """The residual/attention UNet (Ho et al. 2020; Nichol & Dhariwal 2021).

    The defaults are the DDPM CIFAR-10 network (35.7M parameters).
    """

    image_size: int = 32
    """Height and width of the square input, in pixels."""
    in_channels: int = 3
    out_channels: int | None = None
    """Output channels; ``None`` means the same as ``in_channels`` (a noise predictor)."""
    cond_channels: int = 0
    """Channels of a condition image concatenated to x_t at the input (SR3, Saharia et al.
    2021; Palette, 2022): ``net(x, t, cond_image=c)`` with c (B, cond_channels, H, W) at the
    network's resolution. Their input weights start at zero, so a new model is the
    unconditional one. 0: none."""
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)
    """Channel multiplier per resolution level; the image halves between levels."""
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    """Pixel resolutions (e.g. 16 for the 16x16 level) that get self-attention."""
    dropout: float = 0.1
    num_heads: int = 1
    """Attention heads; the channels are split across them. Ignored if ``head_channels`` is set."""
    head_channels: int | None = None
    """Channels per attention head; when set, heads = channels // head_channels at each level."""
    num_groups: int = 32
    """GroupNorm groups, the same number at every level; every level's channel count must be
    divisible by it. Unused (leave it at 32) when ``group_channels`` is set."""
    group_channels: int | None = None
    """Channels per GroupNorm group instead: a norm over C channels has C // group_channels
    groups, so groups are equally wide at every level (with base_channels 32, 32 groups are one
    channel each at the first level). Every level's channel count must be divisible by it."""
    scale_shift_norm: bool = False
    """AdaGN: the time embedding scales and shifts the second GroupNorm (improved-diffusion)."""
    downsample: Literal["conv", "avgpool"] = "conv"
    upsample: Literal["nearest", "transposed"] = "nearest"
    num_classes: int | None = None
    """Class-conditional when set; label index ``num_classes`` means "no label" (for CFG)."""
    gradient_checkpointing: bool = free_on_resume(False)
    """Recompute block activations in the backward pass to save memory while training."""
    time_conditioning: bool = True
    """False: no timestep input at all, ``net(x)`` (a plain UNet for segmentation and the like);
    ``out_channels`` is then e.g. the number of mask classes."""
    # The published DDPM checkpoints (google/ddpm-cifar10-32 and its siblings, ported from DDPM's
    # TensorFlow code) differ from the defaults in these four; diffunet.interop maps them.
    norm_eps: float = 1e-5
    """GroupNorm epsilon, every norm of the network (DDPM's TensorFlow code: 1e-6)."""
    time_embed_order: Literal["cos_sin", "sin_cos"] = "cos_sin"
    """Halves of the sinusoidal timestep embedding (DDPM's TensorFlow code: sin first)."""
    time_embed_freq_shift: int = 0
    """Frequencies 10000 ** (-i / (base_channels // 2 - shift)) (DDPM's TensorFlow code: 1)."""
    downsample_padding: Literal["symmetric", "bottom_right"] = "symmetric"
    """``downsample = "conv"``: pad 1 on every side, or only one row/column at the bottom/right
    (TensorFlow's "SAME" padding, as in DDPM's TensorFlow code)."""

    def __post_init__(self) -> None:
        _check_finite(self, "unet")
        p = "unet."
        if not 0.0 < self.norm_eps < 1.0:
            _fail(p + "norm_eps", f"must be in (0, 1), got {self.norm_eps}")
        if not 0 <= self.time_embed_freq_shift < max(1, self.base_channels // 2):
            _fail(p + "time_embed_freq_shift", f"must be in [0, base_channels // 2 = "
                  f"{self.base_channels // 2}) (0 or 1 in practice), got "
                  f"{self.time_embed_freq_shift}")
        if self.downsample_padding != "symmetric" and self.downsample != "conv":
            _fail(p + "downsample_padding", f"{self.downsample_padding!r} needs downsample = "
                  f"'conv' (average pooling has no padding), got {self.downsample!r}")
        if not self.time_conditioning:
            if self.num_classes is not None:
                _fail(p + "num_classes", "class conditioning enters through the time embedding; "
                      "it needs time_conditioning = true (or leave num_classes unset)")
            if self.scale_shift_norm:
                _fail(p + "scale_shift_norm", "needs the time embedding; set it to false when "
                      "time_conditioning = false")
        for name in ("image_size", "in_channels", "base_channels", "num_res_blocks", "num_heads",
                     "num_groups"):
            if getattr(self, name) < 1:
                _fail(p + name, f"must be a positive integer, got {getattr(self, name)}")
        if self.cond_channels < 0:
            _fail(p + "cond_channels", f"must be 0 (no condition image) or more, got "
                  f"{self.cond_channels}")
        for name in ("out_channels", "head_channels", "num_classes", "group_channels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                _fail(p + name, f"must be a positive integer or unset, got {value}")
        if not self.channel_mults:
            _fail(p + "channel_mults", "needs at least one level, e.g. [1, 2, 2, 2]")
        if any(m < 1 for m in self.channel_mults):
            _fail(p + "channel_mults", f"entries must be positive, got {list(self.channel_mults)}")
        if not 0.0 <= self.dropout < 1.0:
            _fail(p + "dropout", f"must be in [0, 1), got {self.dropout}")
        if len(self.channel_mults) > self.image_size.bit_length():  # 2**(levels-1) > image
            _fail(p + "channel_mults", f"{len(self.channel_mults):,} levels halve an image of "
                  f"{shown(self.image_size)} pixels below one pixel (at most "
                  f"{self.image_size.bit_length()} levels)")
        factor = 2 ** (len(self.channel_mults) - 1)
        if self.image_size % factor:
            _fail(p + "image_size", f"{self.image_size} is not divisible by {factor} "
                  f"(2^(levels-1) for {len(self.channel_mults)} levels); use a multiple of "
                  f"{factor} or fewer channel_mults")
        if self.group_channels is not None and self.num_groups != _DEFAULT_GROUPS:
            _fail(p + "group_channels", f"{self.group_channels} and num_groups "
                  f"{self.num_groups} both size the GroupNorm groups; set one: leave "
                  f"num_groups at {_DEFAULT_GROUPS} (unused) or unset group_channels")
        for m in self.channel_mults:
            ch = self.base_channels * m
            if self.group_channels is not None and ch % self.group_channels:
                _fail(p + "group_channels", f"{ch} channels (base_channels "
                      f"{self.base_channels} x mult {m}) are not divisible into groups of "
                      f"{self.group_channels}; pick group_channels dividing every level's "
                      "channels or change base_channels")
            if self.group_channels is None and ch % self.num_groups:
                _fail(p + "num_groups", f"{ch} channels (base_channels {self.base_channels} x "
                      f"mult {m}) are not divisible by {self.num_groups} groups; pick num_groups "
                      f"dividing every level's channels or change base_channels")
        resolutions = self.resolutions
        for r in self.attn_resolutions:
            if r not in resolutions:
                _fail(p + "attn_resolutions", f"{r} names no level; the levels are "
                      f"{list(resolutions)} pixels")
        for level, r in enumerate(resolutions):
            if r in self.attn_resolutions or level == len(resolutions) - 1:  # middle block too
                ch = self.base_channels * self.channel_mults[level]
                self.heads_at(ch)  # raises if the channels cannot be split

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Pixel resolution of each level, e.g. (32, 16, 8, 4)."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mults)))

    @property
    def output_channels(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels

    @property
    def time_embed_dim(self) -> int | None:
        """Width of the timestep embedding MLP (4 x base_channels, as in DDPM); None when the
        network has no time conditioning."""
        return 4 * self.base_channels if self.time_conditioning else None

    def heads_at(self, channels: int) -> int:
        """Number of attention heads for a block of ``channels`` channels (validated)."""
        if self.head_channels is not None:
            if channels % self.head_channels:
                _fail("unet.head_channels", f"{channels} channels are not divisible by "
                      f"head_channels {self.head_channels}")
            return channels // self.head_channels
        if channels % self.num_heads:
            _fail("unet.num_heads", f"{channels} channels are not divisible by {self.num_heads} "
                  "heads; pick a divisor of every attention level's channels")
        return self.num_heads


_DEFAULT_GROUPS: int = UNetConfig.__dataclass_fields__["num_groups"].default
"""``unet.num_groups`` of ``UNetConfig()`` (32): its value when ``group_channels`` sizes the
groups instead."""


# ---------------------------------------------------------------------------------------------
# Plain data <-> config dataclasses, with errors that name the key.


_UNSET_WORDS = ("none", "unset")
"""Strings that unset an optional number or list in TOML and on the command line."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("unset" if a is type(None) else _type_name(a) for a in get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples.

    Integers are accepted where a float is expected; nothing else is converted silently.
    """
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value in choices and type(value) is type(choices[0]):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        _fail(key, f"{shown(value)} is not one of {', '.join(repr(c) for c in choices)}{hint}")
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        if (type(None) in args and str not in args and isinstance(value, str)
                and value.strip().lower() in _UNSET_WORDS):
            return None  # TOML has no null: `min_snr_gamma = "none"` unsets a number
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(key, value, a)
            except ConfigError:
                pass
        _fail(key, f"expected {_type_name(tp)}, got {shown(value)}")
    if origin is tuple:
        inner = get_args(tp)[0]
        if inner is str and isinstance(value, str):  # train.trackers=tensorboard,wandb
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            _fail(key, f"expected a list, got {shown(value)}")
        return tuple(coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -INT_LIMIT < value < INT_LIMIT:
                _fail(key, f"{shown(value)} is out of range for any integer setting")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, int) and not -INT_LIMIT < value < INT_LIMIT:
                _fail(key, f"{shown(value)} is out of range for a number setting")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this module does not know yet
        raise TypeError(f"unsupported config field type {tp!r} for {key}")
    _fail(key, f"expected {_type_name(tp)}, got {shown(value)}")


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def unknown_key(key: str, name: str, known: list[str], what: str = "key") -> ConfigError:
    """The error for an unknown config key (or section), with a "did you mean" when close."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
    return ConfigError(f"{key}: unknown {what}{hint}")


def from_dict(cls: type[C], data: dict[str, Any], section: str) -> C:
    """Build the config dataclass ``cls`` from plain data, naming ``section.key`` on errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{section}: expected a table of keys, got {data!r}")
    types_ = field_types(cls)
    kwargs = {}
    for name, value in data.items():
        if name not in types_:
            raise unknown_key(f"{section}.{name}", name, list(types_))
        kwargs[name] = coerce(f"{section}.{name}", value, types_[name])
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON/TOML-ready data for a config dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


# ---------------------------------------------------------------------------------------------
# The run: data, training and preview sampling, composed into RunConfig.


@dataclass(frozen=True)
class DataConfig:
    """Where training images come from and how they are prepared (values end in [-1, 1])."""

    source: Literal["builtin", "folder", "torchvision", "hf"] = "builtin"
    """``builtin``: coloured shapes generated from a seed (no download); ``folder``: a folder of
    images (recursive); ``torchvision``: a torchvision data set by ``name``; ``hf``: a Hugging
    Face ``datasets`` data set by ``name`` (needs the ``hf`` extra)."""
    path: str | None = free_on_resume(None)
    """The image folder, or the torchvision download/cache root (default ``./data``), or the
    Hugging Face datasets cache folder (default: theirs, ``~/.cache/huggingface/datasets``)."""
    name: str | None = None
    """torchvision data set: cifar10, cifar100, mnist, fashion_mnist, celeba, stl10, ...;
    ``hf``: a Hub name ("cifar10", "user/name"), or a local folder written by
    ``Dataset.save_to_disk`` or holding data files (images, parquet, ...)."""
    split: str = "train"
    """``hf`` only: the split to train on (e.g. "train", "train+test", "train[:1000]")."""
    image_column: str | None = None
    """``hf`` only: the column holding the images; unset: the first column of Image type, else
    "image" or "img"."""
    label_column: str | None = None
    """``hf`` only: the column of integer class labels (for class-conditional models, with
    ``unet.num_classes``); unset: no labels."""
    streaming: bool = False
    """``hf`` only: stream the data set instead of downloading it (for ones that do not fit on
    disk): shuffled through a buffer, epoch after epoch; resume skips what was already seen,
    so it gives the batches of an uninterrupted run. Training only (eval reads by index)."""
    image_size: int | None = None
    """Side of the square training images; unset: the UNet's ``unet.image_size`` (in a
    :class:`RunConfig`; when set it must equal it)."""
    channels: int | None = None
    """1 (grayscale) or 3 (RGB); unset: the UNet's ``unet.in_channels`` (when set it must equal
    it)."""
    random_flip: bool = True
    """Random horizontal flips (off for digits and text)."""
    class_folders: bool = False
    """``folder`` only: each sub-folder of ``path`` is a class, labelled in sorted order."""
    download: bool = free_on_resume(True)
    """``torchvision`` only: download the data set if it is not under ``path`` yet."""
    builtin_size: int = 50000
    """``builtin`` only: number of distinct generated images (one epoch)."""
    num_workers: int | None = free_on_resume(None)
    """DataLoader worker processes (0 loads in the training process); unset: 0 on a CPU, on a
    GPU up to 8 per process (the CPUs shared among the processes)."""
    cache: bool | None = free_on_resume(None)
    """Keep ``folder``, ``torchvision`` and ``hf`` images decoded (as uint8, exactly the same
    items) after their first read; unset: when they take at most 4 GiB."""
    task: Literal["superres", "colorize", "inpaint", "paired"] | None = None
    """An image-conditioned task (:mod:`diffunet.tasks`): each image's condition image, which
    the UNet takes through ``unet.cond_channels``: ``superres``, the image downscaled by
    ``superres_factor`` and upscaled back (its channels); ``colorize``, its luminance (1
    channel); ``inpaint``, the image with a hole drawn from the run's generator (a box or
    free-form strokes) and the mask (its channels + 1); ``paired``, the image of the same name
    in ``cond_path`` (its channels; ``source = "folder"``). Unset: none."""
    superres_factor: int = 4
    """``task = "superres"``: how many times smaller the low-resolution input is (2 to 16)."""
    cond_path: str | None = free_on_resume(None)
    """``task = "paired"``: the folder of input images, each paired with the target of the same
    relative path without the extension in ``path`` (``a/cat.jpg`` with ``a/cat.png``), read
    with the targets' channels and cropped and resized as they are."""
    latent_cache: str | None = free_on_resume(None)
    """A latent run's (``[vae]``) cache folder of the encoded data set (the VAE posterior's
    mean and std, :mod:`diffunet.latent_cache`); unset: beside the image folder
    (``<data.path>.latents-<key>``) for ``folder``, else under the user cache
    (``~/.cache/diffunet/latents/<key>``), ``key`` naming the data, the VAE and the settings.
    A folder holding another cache or other files is refused, never written over."""

    def __post_init__(self) -> None:
        _check_finite(self, "data")
        p = "data."
        if self.source == "folder" and not self.path:
            _fail(p + "path", "is required with data.source = 'folder' (the image folder)")
        if self.source == "torchvision" and not self.name:
            _fail(p + "name", "is required with data.source = 'torchvision' (e.g. 'cifar10')")
        if self.source == "hf" and not self.name:
            _fail(p + "name", "is required with data.source = 'hf' (a Hub name like 'cifar10' "
                  "or a local folder)")
        if self.streaming and self.source != "hf":
            _fail(p + "streaming", f"is for data.source = 'hf' (Hugging Face datasets), not "
                  f"{self.source!r}; remove it")
        _check_image_shape(self.image_size, self.channels)
        if not 1 <= self.builtin_size <= MAX_BUILTIN_SIZE:
            _fail(p + "builtin_size", f"must be a positive integer of at most "
                  f"{MAX_BUILTIN_SIZE:,} (each epoch's order is held in memory, 8 bytes an "
                  f"image), got {self.builtin_size}")
        if self.num_workers is not None and self.num_workers < 0:
            _fail(p + "num_workers", f"must be 0 or more or unset, got {self.num_workers}")
        if self.task == "paired" and (self.source != "folder" or not self.cond_path):
            _fail(p + "task", "paired pairs two folders by name: set data.source = 'folder', "
                  "data.path = the targets and data.cond_path = the inputs")
        if self.cond_path is not None and self.task != "paired":
            task = "unset" if self.task is None else repr(self.task)
            _fail(p + "cond_path", f"is the input folder of data.task = 'paired', but data.task "
                  f"is {task}; set data.task=paired or remove data.cond_path")
        if (self.cond_path is not None and self.path is not None
                and os.path.realpath(os.path.expanduser(self.cond_path))
                == os.path.realpath(os.path.expanduser(self.path))):
            _fail(p + "cond_path", f"{self.cond_path} is data.path itself: the inputs would be "
                  "their own targets; point it at the folder of inputs")
        if not 2 <= self.superres_factor <= 16:
            _fail(p + "superres_factor", f"must be in [2, 16], got {shown(self.superres_factor)}")
        if self.latent_cache is not None and not self.latent_cache.strip():
            _fail(p + "latent_cache", "is empty; give a folder, or leave it unset (the default "
                  "place beside the data or under the user cache)")


MAX_BUILTIN_SIZE = 10_000_000
"""The most images the built-in data set generates per epoch (its shuffled order is an int64
tensor of that length: 80 MB here; CIFAR-10 has 50,000)."""


def _check_image_shape(image_size: int | None, channels: int | None) -> None:
    if image_size is not None and image_size < 1:
        _fail("data.image_size", f"must be a positive integer or unset, got {image_size}")
    if channels is not None and channels not in (1, 3):
        _fail("data.channels", f"must be 1 (grayscale) or 3 (RGB), got {channels}")


TRACKERS = ("tensorboard", "wandb")
"""The experiment trackers ``train.trackers`` may name (the harness drives each itself)."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, EMA, logging and checkpointing. ``batch_size`` is global (all processes).

    A resumed run may change any of these but ``batch_size`` (the data stream is cut into global
    batches): a longer ``max_steps``, another ``lr``, other save or log intervals.
    """

    max_steps: int = free_on_resume(2000)
    batch_size: int = 32
    lr: float = free_on_resume(1e-3)
    warmup_steps: int = free_on_resume(100)
    lr_schedule: Literal["constant", "cosine", "linear"] = free_on_resume("constant")
    """After warm-up: keep ``lr``, or decay it to 0 at ``max_steps``, along a half cosine or a
    straight line (the last optimizer step, ``max_steps - 1``, still has a small positive lr:
    ``diffunet.training.lr_at``)."""
    weight_decay: float = free_on_resume(0.0)
    adam_betas: tuple[float, ...] = free_on_resume((0.9, 0.999))
    grad_clip: float | None = free_on_resume(1.0)
    """Clip the global gradient norm to this (unset: no clipping)."""
    grad_accum_steps: int = free_on_resume(1)
    mixed_precision: Literal["no", "fp16", "bf16"] = free_on_resume("no")
    ema_decay: float = free_on_resume(0.995)
    ema_warmup: bool = free_on_resume(False)
    """Ramp the EMA decay as min(ema_decay, (1 + step) / (10 + step))."""
    min_snr_gamma: float | None = free_on_resume(5.0)
    """Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is the paper's choice); "none" for the
    plain loss of the DDPM paper."""
    label_dropout: float = free_on_resume(0.1)
    """Conditional models: the fraction of training images whose whole condition (class label,
    condition image) is replaced by the null one ("no label", a zero image), so that one
    network learns the unconditional prediction too (classifier-free guidance)."""
    seed: int = free_on_resume(0)
    log_every: int = free_on_resume(50)
    sample_every: int = free_on_resume(250)
    save_every: int = free_on_resume(500)
    keep_last: int = free_on_resume(2)
    """Training states kept in ``state/`` (model files in ``weights/`` and post-hoc EMA
    snapshots in ``phema/`` are all kept)."""
    phema_sigma_rels: tuple[float, ...] = (0.05, 0.10)
    """Post-hoc EMA (Karras et al. 2024, sec. 3.1): the power-function EMA profiles training
    keeps, by relative width sigma_rel (the paper's two; each in (0, 0.2879]), whose snapshots
    ``diffunet ema`` turns into an EMA of any length afterwards; ``[]`` keeps none. Fixed for a
    run: a resumed run continues the same profiles (``train.ema_decay``, the classic EMA the
    previews and model files use, is apart)."""
    guide_at: float = free_on_resume(0.5)
    """The carried guide (autoguidance, Karras et al. 2024, "Guiding a Diffusion Model with a
    Bad Version of Itself": a weaker model of the same run guides it): at step
    :attr:`guide_step` (``round(guide_at * max_steps)``, at least 1) training keeps a copy of
    the classic EMA weights (``ema_decay``; exactly what that step's model file holds), and
    every model file written after that step carries it, so ``diffunet sample MODEL`` and the
    later previews autoguide with weight ``sample.guide_scale`` by default. In [0, 1); 0
    carries no guide. 0.5, the EMA of half the run, measured best (docs/samplers.md,
    "Autoguidance and the guidance interval"). ``--resume`` re-takes the guide where its step
    is still ahead (a longer ``max_steps`` moves it; exact as an uninterrupted run) and refuses
    a changed ``guide_at`` whose step has passed (docs/training.md, "The carried guide")."""
    phema_every: int = free_on_resume(50)
    """Steps between post-hoc EMA snapshots (written into ``RUN/phema/``, and at the last step):
    50 gives 40 of each profile in the default 2,000-step run (every 2.5% of it, as the presets'
    ``max_steps / 40``), enough to rebuild sigma_rel from 0.016 to 0.264 within the 5% fit
    limit (docs/training.md, "Post-hoc EMA"). Scale it with ``max_steps``: what matters is
    the snapshots' spacing relative to the step rebuilt."""
    max_nonfinite: int = free_on_resume(20)
    """Stop after this many consecutive steps with a non-finite loss."""
    trackers: tuple[str, ...] = free_on_resume(())
    """Experiment trackers to log to as well as ``log.jsonl``: ``tensorboard`` (event files in
    ``RUN/tensorboard/``) and/or ``wandb`` (Weights & Biases; its files in ``RUN/wandb/``).
    On the command line ``train.trackers=tensorboard,wandb`` (or ``[tensorboard]``)."""
    tracker_project: str | None = free_on_resume(None)
    """The W&B project the run logs to (unset: the run folder's name); give every run of one
    study the same project to compare them on one page."""
    run_name: str | None = free_on_resume(None)
    """The run's name in the trackers (unset: the run folder's name)."""
    channels_last: bool = free_on_resume(False)
    """Store the weights channels-last, so a GPU's convolutions and the attention run on
    channels-last activations (on a CPU the UNet uses channels-last activations anyway).
    Changes how the run executes, not what it computes."""
    compile: bool = free_on_resume(False)
    """``torch.compile`` the training forward/backward (fuses GroupNorm, SiLU and the other
    element-wise work). The first steps are slow while it compiles; needs a C++ compiler on
    a CPU. Changes how the run executes, not what it computes (up to float rounding)."""

    def __post_init__(self) -> None:
        _check_finite(self, "train")
        p = "train."
        for name in ("max_steps", "batch_size", "grad_accum_steps", "log_every", "sample_every",
                     "save_every", "keep_last", "max_nonfinite", "phema_every"):
            if getattr(self, name) < 1:
                _fail(p + name, f"must be a positive integer, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            _fail(p + "warmup_steps", f"must be 0 or more, got {self.warmup_steps}")
        if not self.lr > 0:
            _fail(p + "lr", f"must be positive, got {self.lr}")
        if self.weight_decay < 0:
            _fail(p + "weight_decay", f"must be 0 or more, got {self.weight_decay}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            _fail(p + "adam_betas", f"must be two numbers in [0, 1), got {list(self.adam_betas)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            _fail(p + "grad_clip", f"must be positive or unset, got {self.grad_clip}")
        if not 0 <= self.ema_decay < 1:
            _fail(p + "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.guide_at < 1:
            _fail(p + "guide_at", f"must be in [0, 1) (the fraction of max_steps at which the "
                  f"EMA is kept as the carried guide; 0 keeps none), got {self.guide_at}")
        _check_phema(self.phema_sigma_rels)
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            _fail(p + "min_snr_gamma", f"must be positive or unset, got {self.min_snr_gamma}")
        if not 0 <= self.label_dropout < 1:
            _fail(p + "label_dropout", f"must be in [0, 1), got {self.label_dropout}")
        check_seed(p + "seed", self.seed)
        if self.batch_size % self.grad_accum_steps:
            _fail(p + "batch_size", f"{self.batch_size} is not divisible by grad_accum_steps "
                  f"{self.grad_accum_steps}")
        for t in self.trackers:
            if t not in TRACKERS:
                close = difflib.get_close_matches(t, TRACKERS, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                _fail(p + "trackers", f"unknown tracker {t!r}; {hint}use tensorboard, wandb "
                      "or both, e.g. train.trackers=tensorboard,wandb")
        if len(set(self.trackers)) != len(self.trackers):
            _fail(p + "trackers", f"names a tracker twice: {list(self.trackers)}")
        for name in ("tracker_project", "run_name"):
            value = getattr(self, name)
            if value is not None and (not value.strip() or len(value) > 128
                                      or not value.isprintable()):
                _fail(p + name, f"must be 1 to 128 printable characters or unset, got {value!r}")
        if self.tracker_project is not None and any(c in self.tracker_project
                                                    for c in "/\\#?%:"):
            _fail(p + "tracker_project", f"{self.tracker_project!r} may not hold any of "
                  "/ \\ # ? % : (W&B project names cannot)")


    @property
    def guide_step(self) -> int | None:
        """The step whose classic EMA weights become the carried guide: ``round(guide_at *
        max_steps)``, at least 1; None when ``guide_at`` is 0 (no guide)."""
        if self.guide_at == 0:
            return None
        return max(1, round(self.guide_at * self.max_steps))


MAX_PHEMA_PROFILES = 8
"""The most post-hoc EMA profiles a run keeps: each is one more fp32 copy of the weights on
every process (the paper keeps two)."""


def _check_phema(sigma_rels: tuple[float, ...]) -> None:
    key = "train.phema_sigma_rels"
    if len(sigma_rels) > MAX_PHEMA_PROFILES:
        _fail(key, f"{len(sigma_rels)} profiles; at most {MAX_PHEMA_PROFILES} (each is a copy of "
              "the weights; the paper keeps two, 0.05 and 0.10)")
    for s in sigma_rels:
        if not 0 < s <= SIGMA_REL_MAX:
            _fail(key, f"{s} is no power-function EMA width; each sigma_rel must be in (0, "
                  f"{SIGMA_REL_MAX:.4f}], e.g. [0.05, 0.10] (or [] to keep none)")
    if len(set(sigma_rels)) != len(sigma_rels):
        _fail(key, f"names a sigma_rel twice: {list(sigma_rels)}")


MAX_PREVIEW_IMAGES = 256
"""The most images a preview grid may hold: a 16x16 grid is as much as one can look at, and
the preview is sampled in one batch on the training device, next to the model, its optimizer
and the EMA (``diffunet sample`` draws any number, batch by batch)."""


@dataclass(frozen=True)
class SampleConfig:
    """How to sample a model: the one set of sampling settings, used by the preview grids written
    while training and by ``diffunet sample`` (whose defaults are the ``[sample]`` table stored
    in the model file, else these). Every field may change on resume."""

    sampler: SamplerName = free_on_resume("dpmpp-2m")
    """The step rule; the default, DPM-Solver++(2M) on the karras grid from the default range's
    top (at most 160), halves DDIM's judge FID at 25 network calls and stays sound at every step
    count from 5 to 50 (docs/samplers.md, "Quality per network call", "The default grid's
    range")."""
    num_steps: int = free_on_resume(25)
    eta: float | None = free_on_resume(None)
    """The step noise of the samplers that have one: 0 deterministic ... 1 ancestral (DDPM-like)
    for ``ddim``, ``euler-ancestral`` and ``dpmpp-2m-sde``; unset: 0 for ``ddim``, 1 for the
    other two (k-diffusion's and diffusers' choice; at 0 they are plain Euler and DPM++ 2M)."""
    spacing: Spacing = free_on_resume("trailing")
    """Which training timesteps the ``uniform`` grid visits (VP models)."""
    sigmas: SigmaGrid | None = free_on_resume(None)
    """The noise levels the sampler steps through: ``karras`` (Karras et al. 2022, eq. 5, with
    ``rho``), ``exponential`` (log-uniform) or ``uniform`` (the model's own grid: a VP model's
    training timesteps ``spacing`` picks, a flow model's shifted t as diffusers' flow
    schedulers space it; EDM has none); unset: :func:`~diffunet.samplers.default_grid` (the
    uniform grid for the samplers the model runs natively there: ddpm and ddim on VP, every
    sampler on flow; karras otherwise), except DPM++ 2M, which runs the karras grid here
    (:data:`~diffunet.samplers.PREVIEW_GRIDS`: the one place these settings and the library's
    ``sample()`` differ)."""
    rho: float = free_on_resume(7.0)
    """The ``karras`` grid's exponent (eq. 5; 7 is the paper's choice)."""
    sigma_min: float | None = free_on_resume(None)
    """The ``karras``/``exponential`` grid's lowest noise level; unset: the model's (VP: sigma
    at t = 0; EDM: its ``schedule.sigma_min``; flow: its shifted grid's lowest level)."""
    sigma_max: float | None = free_on_resume(None)
    """The ``karras``/``exponential`` grid's highest noise level, where sampling starts; unset:
    the formulation's default range
    (:meth:`~diffunet.formulations.base.Formulation.default_range`): the model's highest level
    capped at 160 (:data:`~diffunet.formulations.base.DEFAULT_SIGMA_MAX`; EDM: its own
    ``schedule.sigma_max``, 80 by default). From the cosine schedule's own 2 x 10^4 DPM++ 2M
    fell off a cliff below 15 steps; a set value reaches the model's whole range
    (docs/samplers.md, "The default grid's range")."""
    s_churn: float = free_on_resume(0.0)
    """``heun`` only: EDM's stochasticity S_churn (Algorithm 2; 0 is the deterministic sampler)."""
    s_tmin: float = free_on_resume(0.0)
    """``heun``: noise is added only at noise levels sigma in [s_tmin, s_tmax] (S_tmin)."""
    s_tmax: float | None = free_on_resume(None)
    """``heun``: the top of that range (S_tmax); unset: no upper limit (infinity)."""
    s_noise: float = free_on_resume(1.0)
    """``heun``: the scale of the added noise (S_noise; EDM used 1.003 to 1.007 on ImageNet)."""
    guidance_scale: float = free_on_resume(1.0)
    """The guidance weight w (1 = no guidance): classifier-free guidance for class-conditional
    models (Ho & Salimans 2022), or autoguidance with ``guide_model``."""
    guidance_interval: tuple[float, ...] | None = free_on_resume(None)
    """``[lo, hi]``: guide only the network calls whose noise level sigma (x = x0 + sigma n) is
    in [lo, hi] (Kynkaanniemi et al. 2024; e.g. ``[0.3, 5]``), the others run the model alone
    with no guide evaluation; unset: every call. Needs ``guidance_scale`` other than 1."""
    guide_scale: float = free_on_resume(2.0)
    """The autoguidance weight w of the carried guide (``train.guide_at``: the run's own EMA of
    an earlier step), D_guide + w (D - D_guide) (Karras et al. 2024, eq. 2): what the previews
    after the guide step use, recorded in every model file that carries the guide as its
    default weight (``diffunet sample --guidance-scale W`` overrides it; ``--no-guide`` drops
    the guide), eased at fewer than 25 steps (:func:`diffunet.guidance.carried_guide_weight`:
    half the guidance at 10, none at 5 or fewer). 2 measured best at 25 steps
    (docs/recipes.md); 1 leaves the carried guide unused.
    ``guidance_scale`` is the weight of the other guidances (classifier-free, ``guide_model``)."""
    guide_model: str | None = free_on_resume(None)
    """Previews: a model file that guides the model (autoguidance, Karras et al. 2024,
    D_guide + w (D - D_guide) with w = ``guidance_scale``): a weaker model of the same
    formulation and schedule, image shape and classes (an earlier run's snapshot, a smaller
    net), checked when the run starts. ``diffunet sample`` takes ``--guide-model`` instead; a
    model file's stored one is not used."""
    clip_x0: bool = free_on_resume(True)
    """Clip each step's x0 estimate to the data range [-1, 1] (diffusers' clip_sample)."""
    num_images: int = free_on_resume(64)
    """Images in each preview grid (``diffunet sample`` has ``--num-samples`` instead)."""

    def __post_init__(self) -> None:
        if self.s_tmax == math.inf:
            _fail("sample.s_tmax", 'inf is the default: leave it unset (or "none") for no '
                  "upper limit")
        _check_finite(self, "sample")
        names = {f.name: f"sample.{f.name}" for f in dataclasses.fields(self)}
        check_sampling(names, sampler=self.sampler, num_steps=self.num_steps, eta=self.eta,
                       spacing=self.spacing, guidance_scale=self.guidance_scale,
                       guidance_interval=self.guidance_interval,
                       sigmas=self.sigmas, rho=self.rho, s_churn=self.s_churn,
                       s_tmin=self.s_tmin, s_tmax=self.s_tmax, s_noise=self.s_noise,
                       sigma_min=self.sigma_min, sigma_max=self.sigma_max)
        if self.guide_model is not None and not self.guide_model.strip():
            _fail("sample.guide_model", "is an empty path; give a model file or leave it unset")
        if self.guide_model is not None and self.guidance_scale == 1.0:
            _fail("sample.guide_model", "with sample.guidance_scale 1 changes nothing (D_guide + "
                  "1 (D - D_guide) = D); set sample.guidance_scale above 1 (Karras et al. 2024 "
                  "use 2 to 3) or leave guide_model unset")
        if self.guidance_interval is not None and self.guidance_scale == 1.0 and \
                self.guide_scale == 1.0:
            _fail("sample.guidance_interval", "limits guidance, and sample.guidance_scale 1 is "
                  "none (and sample.guide_scale 1 leaves the carried guide unused); set one of "
                  "them or leave guidance_interval unset")
        if not self.guide_scale >= 0:
            _fail("sample.guide_scale", f"must be 0 or more (the carried guide's autoguidance "
                  f"weight; 1 = unused, Karras et al. 2024 use 2 to 3), got {self.guide_scale}")
        if not 1 <= self.num_images <= MAX_PREVIEW_IMAGES:
            _fail("sample.num_images", f"must be in [1, {MAX_PREVIEW_IMAGES}] (a preview is "
                  f"one grid, sampled in one batch beside the training run), got "
                  f"{self.num_images}; draw more with diffunet sample --num-samples")

    @property
    def resolved_eta(self) -> float:
        """``eta`` with unset filled in from the sampler table: 1 for ``euler-ancestral`` and
        ``dpmpp-2m-sde``, 0 for ``ddim`` (and 0 for the samplers without one)."""
        if self.eta is not None:
            return float(self.eta)
        return float(SAMPLER_TABLE[self.sampler].eta or 0.0)

    def grid_for(self, formulation: Any) -> str:
        """The grid these settings run on a model of ``formulation`` (a formulation or its
        class): ``sigmas``, else :data:`~diffunet.samplers.PREVIEW_GRIDS`, else
        :func:`~diffunet.samplers.default_grid`."""
        return preview_grid(formulation, self.sampler, self.sigmas)

    def sample_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`diffunet.samplers.sample` these settings stand for
        (unset ``eta`` and ``s_tmax`` resolved; an unset ``sigmas`` stays unset, for
        :func:`~diffunet.samplers.default_grid` to resolve, except where
        :data:`~diffunet.samplers.PREVIEW_GRIDS` says otherwise), the one translation previews
        and ``diffunet sample`` share."""
        sigmas = self.sigmas or PREVIEW_GRIDS.get(self.sampler)
        return dict(sampler=self.sampler, num_steps=self.num_steps, eta=self.resolved_eta,
                    spacing=self.spacing, sigmas=sigmas, rho=self.rho,
                    sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                    s_churn=self.s_churn, s_tmin=self.s_tmin,
                    s_tmax=math.inf if self.s_tmax is None else self.s_tmax,
                    s_noise=self.s_noise, guidance_scale=self.guidance_scale,
                    guidance_interval=None if self.guidance_interval is None
                    else (self.guidance_interval[0], self.guidance_interval[1]),
                    clip_x0=self.clip_x0)


@dataclass(frozen=True)
class VaeConfig:
    """The data space (:mod:`diffunet.data_space`): unset ``path`` trains on pixels in [-1, 1];
    set, on the latents of a pretrained diffusers ``AutoencoderKL`` (Rombach et al. 2022), whose
    shape then decides the UNet's ``in_channels``/``out_channels``/``image_size``
    (:func:`diffunet.data_space.load_run_config`). Only safetensors weights are read."""

    path: str | None = None
    """A Hub id (``stabilityai/sd-vae-ft-mse``), a local folder holding the VAE's
    ``config.json`` and ``diffusion_pytorch_model.safetensors``, or ``builtin-shapes`` (the small
    VAE diffunet ships, trained on the built-in shapes at 64x64); unset: pixel space."""
    revision: str | None = None
    """Hub ids only: a branch, tag or commit (pin a commit for reproducible runs)."""
    subfolder: str | None = None
    """The VAE's folder inside ``path`` (``vae`` for a whole pipeline repository)."""
    scaling_factor: float | None = None
    """Latents are (z - shift_factor) * scaling_factor; unset: the VAE config's own (0.18215
    for Stable Diffusion's, which scales its latents to about unit std)."""
    shift_factor: float | None = None
    """Unset: the VAE config's own (none, i.e. 0, for most VAEs)."""
    encode_batch_size: int = free_on_resume(32)
    """Images per VAE encode or decode call (memory, not results)."""

    def __post_init__(self) -> None:
        _check_finite(self, "vae")
        p = "vae."
        if self.path is not None and not self.path.strip():
            _fail(p + "path", "is an empty path; give a Hub id or a VAE folder, or leave it "
                  "unset for pixel space")
        if self.path is None:
            for name in ("revision", "subfolder", "scaling_factor", "shift_factor"):
                if getattr(self, name) is not None:
                    _fail(p + name, "needs vae.path (the VAE it applies to); set vae.path or "
                          f"drop vae.{name}")
        if self.subfolder is not None:
            parts = Path(self.subfolder).parts
            if not parts or Path(self.subfolder).is_absolute() or ".." in parts:
                _fail(p + "subfolder", f"must be a folder inside vae.path (like 'vae'), got "
                      f"{self.subfolder!r}")
        if self.scaling_factor is not None and not self.scaling_factor > 0:
            _fail(p + "scaling_factor", f"must be positive, got {self.scaling_factor}")
        if not 1 <= self.encode_batch_size <= 1 << 16:
            _fail(p + "encode_batch_size", f"must be in [1, 65536], got "
                  f"{shown(self.encode_batch_size)}")


def _fit_data_to_unet(cfg: Any) -> None:
    """Fill an unset ``data.image_size``/``data.channels`` from the UNet (the images a run loads
    are the ones its network takes), or check a set one against it. ``cfg`` is a composed config
    with ``data`` and ``unet`` sections, still being built (hence ``object.__setattr__``)."""
    data, unet = cfg.data, cfg.unet
    if data.image_size is not None and data.image_size != unet.image_size:
        _fail("data.image_size", f"{data.image_size} does not match unet.image_size "
              f"{unet.image_size}; leave data.image_size unset (it follows the UNet) or set both "
              "to the same value")
    if data.channels is not None and data.channels != unet.in_channels:
        _fail("data.channels", f"{data.channels} does not match unet.in_channels "
              f"{unet.in_channels}; leave data.channels unset (it follows the UNet) or set both "
              "to the same value")
    object.__setattr__(cfg, "data", dataclasses.replace(
        data, image_size=unet.image_size, channels=unet.in_channels))


def _check_task(cfg: Any) -> None:
    """``unet.cond_channels`` follows ``data.task`` (the condition image's channels) where it is
    left at 0, and is checked against it where set; a task needs pixels. ``cfg`` is a
    composed config still being built (hence ``object.__setattr__``)."""
    task, c, u = cfg.data.task, cfg.unet.cond_channels, cfg.unet
    if task is None:
        if c:
            _fail("unet.cond_channels", f"{c} condition-image channels, but data.task is unset, "
                  "so training has no condition image to give; set data.task (superres, "
                  "colorize, inpaint, paired) or leave unet.cond_channels at 0")
        return
    if cfg.vae.path is not None:
        _fail("data.task", f"{task} on a latent run ([vae]) is not built yet (the condition "
              "would have to be encoded too); train it in pixel space (drop [vae])")
    # the condition's channels (tasks.task_channels, a layer above this one)
    need = {"colorize": 1, "inpaint": u.in_channels + 1}.get(task, u.in_channels)  # paired: C
    if task == "colorize" and u.in_channels != 3:
        _fail("data.task", f"colorize needs RGB images, and unet.in_channels is {u.in_channels}")
    if c == 0:  # unset: the UNet follows the task
        object.__setattr__(cfg, "unet", dataclasses.replace(u, cond_channels=need))
    elif c != need:
        what = {"colorize": "the luminance", "inpaint": "the image with its hole, and the mask",
                "paired": "the input image, read with the targets' channels"
                }.get(task, "the low-resolution image")
        _fail("unet.cond_channels", f"{c} does not fit data.task = {task!r}, whose condition "
              f"image has {need} channel(s) ({what}); leave unet.cond_channels unset (it follows "
              f"the task) or set it to {need}")
    f = cfg.data.superres_factor
    if task == "superres" and u.image_size % f:
        _fail("data.superres_factor", f"{f} does not divide the image size {u.image_size}; use a "
              "factor that does (e.g. 4 for 32x32: 8x8 inputs)")


SMALL_UNET = UNetConfig(base_channels=32, channel_mults=(1, 2, 2, 2), num_res_blocks=1,
                        attn_resolutions=(8,), dropout=0.0)
"""The small network of the default runs (1.5M parameters at 32x32): ``diffunet train`` trains it
at 32x32, ``diffunet segment train`` (without its timestep input) at 64x64. ``UNetConfig()``
itself is the DDPM paper's 35.7M-parameter CIFAR-10 network."""


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs; written to ``config.json`` in the run folder."""

    unet: UNetConfig = SMALL_UNET
    # Flow matching with logit-normal time draws: at the default budget it beat VP's
    # v-prediction on the cosine schedule with min-SNR-5 (the recipe before it) with each one's
    # best sampler at 10 and 25 network calls on both seed sets (docs/samplers.md, "Flow matching
    # vs the default recipe"). VP's keys keep that earlier recipe, so
    # `schedule.formulation=vp` trains it (v on the cosine schedule: the x0 estimate stays
    # bounded at the noisiest steps, where eps on the linear schedule gives coloured blobs).
    schedule: ScheduleConfig = ScheduleConfig(formulation="flow", beta_schedule="cosine",
                                              prediction_type="v")
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    vae: VaeConfig = VaeConfig()

    def __post_init__(self) -> None:
        if self.vae.path is None:
            _fit_data_to_unet(self)
        # else the VAE decides the UNet's shape from the images' (data.image_size, which may
        # still be unset here): diffunet.data_space.fit_to_vae reads the VAE's config and
        # fills or checks both sections; nothing here can, without reading it.
        if self.vae.path is not None and self.data.streaming:
            _fail("data.streaming", "a latent run ([vae]) encodes the whole data set once into "
                  "its latent cache, which a stream cannot give; set data.streaming = false")
        _check_task(self)
        if not self.unet.time_conditioning:
            _fail("unet.time_conditioning", "a diffusion model needs the timestep input; set it "
                  "to true (time-less UNets are for `diffunet segment train`)")
        if (self.sample.guidance_scale != 1.0 and self.unet.num_classes is None
                and self.sample.guide_model is None):
            _fail("sample.guidance_scale", f"{self.sample.guidance_scale} needs a class-conditional "
                  "model; set unet.num_classes (classifier-free guidance), set sample.guide_model "
                  "(autoguidance) or leave guidance_scale at 1")
        if (self.sample.guidance_interval is not None and self.sample.guidance_scale == 1.0
                and self.train.guide_at == 0):
            _fail("sample.guidance_interval", "limits guidance, and sample.guidance_scale 1 is "
                  "none (train.guide_at 0 carries no guide for sample.guide_scale); set "
                  "sample.guidance_scale or train.guide_at, or leave guidance_interval unset")
        form = formulation_class(self.schedule.formulation)
        if form.discrete_timesteps and self.sample.num_steps > self.schedule.num_train_timesteps:
            _fail("sample.num_steps", f"{self.sample.num_steps} is more than "
                  f"schedule.num_train_timesteps {self.schedule.num_train_timesteps}")
        s = self.sample  # which grid runs depends on the model: checked here, not in [sample]
        grid = s.grid_for(form)
        if grid == "uniform" and not form.uniform_grid:
            _fail("sample.sigmas", f"uniform picks the model's own levels, which {form.article} "
                  f"{form.title} model does not have; use karras or exponential")
        if grid == "uniform":
            for name in ("sigma_min", "sigma_max"):
                if getattr(s, name) is not None:
                    _fail(f"sample.{name}", f"only applies to the karras and exponential grids "
                          f"and {s.sampler} runs on its uniform timesteps unless "
                          f"sample.sigmas is set; set sample.sigmas = \"karras\" or drop "
                          f"sample.{name}")


# ---------------------------------------------------------------------------------------------
# Segmentation: the same UNet without time conditioning, trained on image/mask pairs.


@dataclass(frozen=True)
class SegDataConfig:
    """Image/mask pairs for segmentation; images are normalised with ``mean``/``std``."""

    source: Literal["builtin", "folder"] = "builtin"
    """``builtin``: shapes with their masks generated from a seed (no download); ``folder``:
    images under ``images`` with masks of the same name under ``masks``."""
    images: str | None = free_on_resume(None)
    """``folder``: the image folder (recursive)."""
    masks: str | None = free_on_resume(None)
    """``folder``: the mask folder: grayscale or palette PNGs whose values are class indices
    (255 = ignore); a 0/255 mask is read as binary when ``num_classes`` is 2."""
    val_images: str | None = free_on_resume(None)
    """Optional separate validation images (with ``val_masks``); else ``val_fraction`` is held
    out of the training pairs."""
    val_masks: str | None = free_on_resume(None)
    val_fraction: float = 0.1
    num_classes: int | None = None
    """Classes including background (2 = binary: one output channel, BCE). ``builtin``: 4."""
    class_names: tuple[str, ...] = ()
    image_size: int | None = None
    """Side of the square training images; unset: ``unet.image_size``."""
    channels: int | None = None
    """1 or 3; unset: ``unet.in_channels``."""
    mean: tuple[float, ...] | None = None
    """Per-channel mean of [0, 1] images; unset: ImageNet's. `diffunet segment stats` computes
    the data set's own."""
    std: tuple[float, ...] | None = None
    random_flip: bool = True
    """Random horizontal flips, applied to image and mask together."""
    vertical_flip: bool = False
    builtin_size: int = 2000
    """``builtin``: number of generated image/mask pairs (before the validation split)."""
    num_workers: int = free_on_resume(0)

    def __post_init__(self) -> None:
        _check_finite(self, "data")
        p = "data."
        if self.source == "folder":
            for name in ("images", "masks"):
                if not getattr(self, name):
                    _fail(p + name, "is required with data.source = 'folder'")
            if self.num_classes is None:
                _fail(p + "num_classes", "is required with data.source = 'folder' (classes "
                      "including background; 2 for binary masks)")
        if (self.val_images is None) != (self.val_masks is None):
            _fail(p + "val_masks" if self.val_masks is None else p + "val_images",
                  "set val_images and val_masks together (or neither)")
        if self.source == "builtin" and self.val_images is not None:
            _fail(p + "val_images", "is for data.source = 'folder'; the built-in set holds out "
                  "val_fraction of its pairs")
        if self.source == "builtin" and self.num_classes not in (None, 4):
            _fail(p + "num_classes", f"the built-in set has 4 classes (background, circle, "
                  f"square, triangle), got {self.num_classes}; leave it unset")
        if self.num_classes is not None and not 2 <= self.num_classes <= 255:
            _fail(p + "num_classes", f"must be in [2, 255] (background counts), "
                  f"got {self.num_classes}")
        if self.class_names and self.num_classes is not None \
                and len(self.class_names) != self.num_classes:
            _fail(p + "class_names", f"{len(self.class_names)} names for num_classes "
                  f"{self.num_classes}")
        if not 0 <= self.val_fraction < 1:
            _fail(p + "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        _check_image_shape(self.image_size, self.channels)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) not in ((self.channels,) if self.channels
                                                        else (1, 3)):
                _fail(p + name, f"needs one value per channel ({self.channels or '1 or 3'}), "
                      f"got {list(value)}")
        if self.std is not None and not all(v > 0 for v in self.std):
            _fail(p + "std", f"must be positive, got {list(self.std)}")
        if self.builtin_size < 2:
            _fail(p + "builtin_size", f"must be at least 2, got {self.builtin_size}")
        if self.num_workers < 0:
            _fail(p + "num_workers", f"must be 0 or more, got {self.num_workers}")

    @property
    def classes(self) -> int:
        """The number of classes, including background (the built-in set's 4 when unset)."""
        return self.num_classes if self.num_classes is not None else 4


@dataclass(frozen=True)
class SegTrainConfig:
    """Segmentation training: AdamW with a one-cycle learning rate, cross-entropy/BCE + Dice.

    The one-cycle schedule spans all epochs, so a resumed run keeps every setting here but
    ``log_every``."""

    epochs: int = 8
    batch_size: int = 16
    """Global batch size (split across processes)."""
    lr: float = 3e-3
    """Peak learning rate of the one-cycle schedule (Smith & Topin 2019)."""
    pct_start: float = 0.25
    """Fraction of the steps spent warming up to ``lr`` (OneCycleLR's pct_start)."""
    weight_decay: float = 1e-4
    dice_weight: float = 1.0
    """Loss = cross-entropy (BCE for binary) + dice_weight x soft Dice loss."""
    grad_clip: float | None = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights (e.g. 0.99), used for validation and
    the saved model files; unset: no EMA."""
    seed: int = 0
    log_every: int = free_on_resume(20)

    def __post_init__(self) -> None:
        _check_finite(self, "train")
        p = "train."
        for name in ("epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                _fail(p + name, f"must be a positive integer, got {getattr(self, name)}")
        if not self.lr > 0:
            _fail(p + "lr", f"must be positive, got {self.lr}")
        if not 0 < self.pct_start < 1:
            _fail(p + "pct_start", f"must be in (0, 1), got {self.pct_start}")
        if self.weight_decay < 0:
            _fail(p + "weight_decay", f"must be 0 or more, got {self.weight_decay}")
        if self.dice_weight < 0:
            _fail(p + "dice_weight", f"must be 0 or more, got {self.dice_weight}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            _fail(p + "grad_clip", f"must be positive or unset, got {self.grad_clip}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            _fail(p + "ema_decay", f"must be in (0, 1) or unset, got {self.ema_decay}")
        check_seed(p + "seed", self.seed)


def segmentation_output_channels(num_classes: int) -> int:
    """Output channels K_out of a segmentation head for ``num_classes`` K (background included):
    1 for K = 2 (one foreground logit, sigmoid), K otherwise (softmax)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (background included), "
                         f"got {num_classes!r}")
    return 1 if num_classes == 2 else num_classes


@dataclass(frozen=True)
class SegRunConfig:
    """A segmentation run (`diffunet segment train`); written to ``config.json``.

    ``unet.out_channels`` follows from ``data.num_classes`` (1 for binary, else the number of
    classes) when unset.
    """

    unet: UNetConfig = dataclasses.replace(SMALL_UNET, image_size=64, time_conditioning=False)
    data: SegDataConfig = SegDataConfig()
    train: SegTrainConfig = SegTrainConfig()

    def __post_init__(self) -> None:
        if self.unet.time_conditioning:
            _fail("unet.time_conditioning", "must be false for segmentation (the network "
                  "takes no timestep)")
        _fit_data_to_unet(self)
        for name in ("mean", "std"):
            value = getattr(self.data, name)
            if value is not None and len(value) != self.data.channels:
                _fail(f"data.{name}", f"needs one value per channel ({self.data.channels}), "
                      f"got {list(value)}")
        want = self.output_channels
        if self.unet.out_channels is not None and self.unet.out_channels != want:
            _fail("unet.out_channels", f"{self.unet.out_channels} does not fit "
                  f"data.num_classes {self.data.classes} (needs {want}: one logit for binary, "
                  "else one per class); leave it unset")

    @property
    def output_channels(self) -> int:
        """Network outputs: 1 (binary, BCE) or one logit per class (cross-entropy)."""
        return segmentation_output_channels(self.data.classes)

    @property
    def net_config(self) -> UNetConfig:
        """``unet`` with ``out_channels`` filled in."""
        return dataclasses.replace(self.unet, out_channels=self.output_channels)


def _sections(root: type) -> dict[str, type]:
    """Section name -> config dataclass, for a composed config such as :class:`RunConfig`."""
    return dict(field_types(root))


def config_from_dict(root: type[C], data: dict[str, Any]) -> C:
    """Build the composed config ``root`` (e.g. :class:`RunConfig`) from nested plain data.

    Sections absent from ``data`` keep ``root``'s defaults; a section that is present starts
    from that default and overrides the keys it names.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"expected a table of sections, got {data!r}")
    sections = _sections(root)
    # Each section starts from its declared default, not from root()'s resolved one (whose
    # derived fields, e.g. data.image_size, followed the default UNet).
    defaults = {f.name: f.default for f in dataclasses.fields(root)}
    parts: dict[str, Any] = {}
    for section, table in data.items():
        if section not in sections:
            raise unknown_key(section, section, list(sections), "section")
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table of keys, got {table!r}")
        base = to_dict(defaults[section])
        given = {k: v for k, v in table.items() if base.get(k, v) != v}
        base.update(table)
        parts[section] = from_dict(sections[section], base, section)
        if isinstance(parts[section], ScheduleConfig):
            _check_schedule_keys(parts[section], given)
    return root(**parts)


def _check_schedule_keys(schedule: ScheduleConfig, given: dict[str, Any]) -> None:
    """Refuse a ``[schedule]`` key the config sets away from the run's default that the
    resolved formulation does not read: ``ScheduleConfig`` lets VP's keys pass under another
    formulation (the default run sets them), which would silently drop, say,
    ``schedule.prediction_type = "epsilon"`` written for a VP run without naming the
    formulation."""
    used = schedule.used_fields()
    for key, value in given.items():
        if key in used:
            continue
        owner = next((cls for cls in FORMULATIONS.values() if key in cls.config_fields), None)
        if owner is not None:
            _fail("schedule." + key, f"{value} is {owner.article} {owner.title} setting, unused "
                  f"with formulation {schedule.formulation!r}; set "
                  f"schedule.formulation={owner.name} or drop it")


def stored_config(data: dict[str, Any]) -> dict[str, Any]:
    """A config diffunet stored (a run folder's ``config.json``), made ready to build: such a
    file states every key its version had, so a ``[schedule]`` without ``formulation`` was
    written before formulations existed and is ``ScheduleConfig``'s own default (VP), like a
    model file's ``schedule_config``, not the run default (flow). ``data`` is changed in place
    and returned."""
    table = data.get("schedule")
    if isinstance(table, dict) and "formulation" not in table:
        table["formulation"] = ScheduleConfig().formulation
    return data


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from a stored config (a run folder's ``config.json``, see
    :func:`stored_config`); missing keys keep their defaults."""
    return config_from_dict(RunConfig, stored_config(copy.deepcopy(data)))


def parse_value(text: str) -> Any:
    """A command-line value: TOML syntax (numbers, true/false, [lists], "strings"), else a
    bare string, so ``data.path=/tmp/images`` needs no quotes; a list may hold bare words too
    (``train.trackers=[tensorboard, wandb]``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if text.startswith("[") and text.endswith("]") and "[" not in text[1:-1]:
            return [parse_value(item.strip()) for item in text[1:-1].split(",") if item.strip()]
        return text


def _value_problem(e: BaseException) -> str:
    """Why a value could not be read, in a few words."""
    if "integer string conversion" in str(e):
        return "a number of more than 4,300 digits; no setting is that large"
    return first_line(e)


MAX_CONFIG_BYTES = 4 << 20
"""The largest CONFIG.toml read: a config is a few kilobytes; a larger file is not one."""


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                *, base: dict[str, Any] | None = None, root: type[C] = RunConfig) -> C:
    """Read a TOML config (or start from ``base``, else the defaults) and apply
    ``section.key=value`` overrides; ``root`` is the composed config to build
    (:class:`RunConfig`, or :class:`SegRunConfig` for segmentation).

    Errors (a TOML syntax error with its line, an unknown section or key, a wrong type, an
    impossible value) raise :class:`ConfigError` with one line that names the key.
    """
    return config_from_dict(root, read_config_data(path, overrides, base=base, root=root))


def read_config_data(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                     *, base: dict[str, Any] | None = None, root: type = RunConfig
                     ) -> dict[str, Any]:
    """The plain data :func:`load_config` builds ``root`` from: the TOML file (or ``base``)
    with the overrides applied, before any default is filled in, so a caller can tell a key
    the user set from one left unset (:func:`diffunet.data_space.load_run_config` does: the
    UNet's shape follows a VAE where unset). Errors as :func:`load_config`'s."""
    data: dict[str, Any] = copy.deepcopy(base) if base is not None else {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:  # read as a stranger's file: a regular file (a FIFO never blocks), size bounded
            text = read_regular_file(p, MAX_CONFIG_BYTES).decode("utf-8")
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: TOML syntax error: {e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not a UTF-8 text file; give a .toml config") from None
        except RecursionError:
            raise ConfigError(f"{p}: nested too deep to be a config (arrays or tables within "
                              "each other hundreds of levels deep)") from None
        except (OSError, ValueError) as e:  # too large, not a regular file, a number of
            # thousands of digits (Python's integer-string limit)
            raise ConfigError(f"{p}: cannot be read as a config ({_value_problem(e)})"
                              ) from None
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r}: expected section.key=value, "
                              "e.g. train.max_steps=500")
        sections = _sections(root)
        if section not in sections:
            raise unknown_key(section, section, list(sections), "section")
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table of keys, got {table!r}")
        try:
            table[name] = parse_value(text.strip())
        except RecursionError:
            raise ConfigError(f"{key.strip()}: the value is nested too deep to be a "
                              "setting") from None
        except ValueError as e:  # a number of thousands of digits (the integer-string limit)
            raise ConfigError(f"{key.strip()}: cannot read the value ({_value_problem(e)})"
                              ) from None
    return data


def to_toml(cfg: Any) -> str:
    """The resolved config as TOML text that loads back to ``cfg``. An unset value is a comment
    where unset is the default, else ``key = "none"`` (TOML has no null). A schedule field its
    formulation does not use (:meth:`ScheduleConfig.used_fields`) says so in a comment."""
    lines = []
    defaults = to_dict(type(cfg)())
    for section, table in to_dict(cfg).items():
        lines.append(f"[{section}]")
        part = getattr(cfg, section)
        used = part.used_fields() if isinstance(part, ScheduleConfig) else tuple(table)
        for key, value in table.items():
            if value is None and defaults[section].get(key) is not None:
                lines.append(f'{key} = "none"')
            elif value is None:
                lines.append(f"# {key} is unset")
            else:  # JSON scalars and lists of them are valid TOML values
                note = "" if key in used else f"  # unused with formulation {part.formulation!r}"
                lines.append(f"{key} = {json.dumps(value)}{note}")
        lines.append("")
    return "\n".join(lines)
