"""Configuration: one frozen, typed dataclass per component, each validating itself.

Defaults live only here. ``from_dict`` builds a config from plain data (a TOML table, a model
file's JSON metadata) and turns an unknown key or a wrong type into a one-line
:class:`~diffunet.errors.ConfigError` that names the key (with a "did you mean" where one is
close). ``to_dict`` is its inverse, used for the JSON written into model files and run folders.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args, get_origin

from .errors import ConfigError

C = TypeVar("C")

BetaSchedule = Literal["linear", "scaled_linear", "cosine", "sigmoid"]
PredictionType = Literal["epsilon", "v", "x0"]


def _fail(key: str, problem: str) -> None:
    raise ConfigError(f"{key}: {problem}")


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
    """GroupNorm groups; every level's channel count must be divisible by it."""
    scale_shift_norm: bool = False
    """AdaGN: the time embedding scales and shifts the second GroupNorm (improved-diffusion)."""
    downsample: Literal["conv", "avgpool"] = "conv"
    upsample: Literal["nearest", "transposed"] = "nearest"
    num_classes: int | None = None
    """Class-conditional when set; label index ``num_classes`` means "no label" (for CFG)."""
    gradient_checkpointing: bool = False
    """Recompute block activations in the backward pass to save memory while training."""

    def __post_init__(self) -> None:
        p = "unet."
        for name in ("image_size", "in_channels", "base_channels", "num_res_blocks", "num_heads",
                     "num_groups"):
            if getattr(self, name) < 1:
                _fail(p + name, f"must be a positive integer, got {getattr(self, name)}")
        for name in ("out_channels", "head_channels", "num_classes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                _fail(p + name, f"must be a positive integer or unset, got {value}")
        if not self.channel_mults:
            _fail(p + "channel_mults", "needs at least one level, e.g. [1, 2, 2, 2]")
        if any(m < 1 for m in self.channel_mults):
            _fail(p + "channel_mults", f"entries must be positive, got {list(self.channel_mults)}")
        if not 0.0 <= self.dropout < 1.0:
            _fail(p + "dropout", f"must be in [0, 1), got {self.dropout}")
        factor = 2 ** (len(self.channel_mults) - 1)
        if self.image_size % factor:
            _fail(p + "image_size", f"{self.image_size} is not divisible by {factor} "
                  f"(2^(levels-1) for {len(self.channel_mults)} levels); use a multiple of "
                  f"{factor} or fewer channel_mults")
        for m in self.channel_mults:
            ch = self.base_channels * m
            if ch % self.num_groups:
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
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding MLP (4 x base_channels, as in DDPM)."""
        return 4 * self.base_channels

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


@dataclass(frozen=True)
class ScheduleConfig:
    """The forward noising process q(x_t | x_0) and what the network is trained to predict."""

    num_train_timesteps: int = 1000
    beta_schedule: BetaSchedule = "linear"
    beta_start: float = 0.0001
    """First beta for ``linear``/``scaled_linear``/``sigmoid`` (DDPM: 1e-4)."""
    beta_end: float = 0.02
    """Last beta for ``linear``/``scaled_linear``/``sigmoid`` (DDPM: 0.02)."""
    prediction_type: PredictionType = "epsilon"
    rescale_zero_terminal_snr: bool = False
    """Rescale betas so the last step is pure noise (Lin et al. 2023, Algorithm 1)."""

    def __post_init__(self) -> None:
        p = "schedule."
        if self.num_train_timesteps < 2:
            _fail(p + "num_train_timesteps", f"must be at least 2, got {self.num_train_timesteps}")
        if not 0.0 < self.beta_start < 1.0:
            _fail(p + "beta_start", f"must be in (0, 1), got {self.beta_start}")
        if not 0.0 < self.beta_end < 1.0:
            _fail(p + "beta_end", f"must be in (0, 1), got {self.beta_end}")
        if self.beta_start > self.beta_end:
            _fail(p + "beta_start", f"{self.beta_start} is larger than beta_end {self.beta_end}")


# ---------------------------------------------------------------------------------------------
# Plain data <-> config dataclasses, with errors that name the key.


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
        _fail(key, f"{value!r} is not one of {', '.join(repr(c) for c in choices)}{hint}")
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(key, value, a)
            except ConfigError:
                pass
        _fail(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(key, f"expected a list, got {value!r}")
        inner = get_args(tp)[0]
        return tuple(coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this module does not know yet
        raise TypeError(f"unsupported config field type {tp!r} for {key}")
    _fail(key, f"expected {_type_name(tp)}, got {value!r}")


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def unknown_key(key: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"{key}: unknown key{hint}")


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
