"""diffusers, both ways: diffunet's model file <-> a diffusers ``UNet2DModel`` pipeline folder.

diffunet's :class:`~diffunet.unet.UNet` computes the same function as diffusers'
``UNet2DModel`` with ``DownBlock2D``/``AttnDownBlock2D`` levels (the DDPM architecture); this
module holds the mapping between the two, in both directions:

- configs: :func:`unet_to_diffusers` / :func:`unet_from_diffusers` (``UNetConfig`` <->
  ``UNet2DModel``'s config), :func:`scheduler_to_diffusers` / :func:`schedule_from_diffusers`
  (``ScheduleConfig`` + the ``[sample]`` settings <-> a scheduler config: the
  ``DDIMScheduler``/``DDPMScheduler`` of a VP model, the ``FlowMatchEulerDiscreteScheduler``
  of a flow-matching one; which family a model exports to is its formulation's
  ``diffusers_scheduler``);
- weights: :func:`state_to_diffusers` / :func:`state_from_diffusers` (q/k/v are one Linear
  here, three in diffusers; diffusers numbers its up blocks from the lowest resolution);
- folders: :func:`export_diffusers` writes ``model_index.json``, ``unet/config.json``,
  ``unet/diffusion_pytorch_model.safetensors`` and ``scheduler/scheduler_config.json``, which
  ``DDIMPipeline.from_pretrained`` and ``DDPMPipeline.from_pretrained`` load;
  :func:`import_diffusers` reads such a folder (or a bare ``UNet2DModel.save_pretrained``
  folder) into a diffunet model file. A flow-matching model exports ``unet/`` and
  ``scheduler/`` only: diffusers has no unconditional flow pipeline class, so it is sampled with
  the short loop the README shows (``UNet2DModel`` + ``FlowMatchEulerDiscreteScheduler``).

Schedules: diffunet's ``cosine`` is diffusers' ``squaredcos_cap_v2`` (the same formula:
``alpha_bar(u) = cos((u + 0.008) / 1.008 * pi/2)^2``, ``beta_i = min(1 - alpha_bar((i+1)/T) /
alpha_bar(i/T), 0.999)``); ``sigmoid`` exists only in ``DDPMScheduler``, so it is exported as
``trained_betas``. diffusers keeps its tables in float32, diffunet in float64: the numbers agree
to float32 rounding.

What one side cannot express is refused in one line naming the field and its value
(:class:`~diffunet.errors.UsageError` on export, :class:`~diffunet.errors.ModelFileError` on
import). diffusers itself is not needed: everything here is JSON and safetensors. Nothing is
ever unpickled; a folder with only ``diffusion_pytorch_model.bin`` is refused with a hint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import stat
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import checkpoint
from .checkpoint import (first_nonfinite, load_model_file, model_file_bytes, read_tensor_file,
                         tensor_file_bytes)
from .checks import INT_LIMIT, looks_like_repo_id, shown
from .config import SampleConfig, ScheduleConfig, UNetConfig, VaeConfig, from_dict, to_dict
from .data_space import folder_record, vae_files
from .formulations import formulation_class
from .formulations import make_schedule
from .formulations.vp import make_betas
from .errors import (
    ConfigError,
    FolderError,
    MissingDependencyError,
    ModelFileError,
    UsageError,
)
from .fileio import first_line, read_json, schema_problem
from .output_files import (OpenFolder, OutputFile, claim_file, open_folder, open_subfolder,
                           remove_stale_temporaries)
from .resources import (Cost, activation_bytes, check_fits, network_size, parameter_shapes,
                        schedule_bytes, weight_bytes)
from .unet import UNet

__all__ = [
    "HUB_FILES",
    "UNET2D_DEFAULTS",
    "ImportResult",
    "download_from_hub",
    "export_diffusers",
    "import_diffusers",
    "load_model",
    "looks_like_repo_id",
    "pipeline_inputs",
    "push_to_hub",
    "schedule_from_diffusers",
    "scheduler_to_diffusers",
    "state_from_diffusers",
    "state_to_diffusers",
    "unet_from_diffusers",
    "unet_to_diffusers",
]

DIFFUSERS_VERSION = "0.30.0"
"""``_diffusers_version`` written into the exported configs when diffusers is not installed
(the format of these files has not changed since well before it)."""

WEIGHTS = "diffusion_pytorch_model.safetensors"

UNET2D_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2,
    "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8,
    "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}
"""``UNet2DModel.__init__``'s defaults (diffusers 0.2x-0.4x): what a key missing from a
``config.json`` means."""

_UNET2D_SCHEMA: dict[str, Any] = {
    "sample_size": (int, list, type(None)), "in_channels": int, "out_channels": int,
    "center_input_sample": bool, "time_embedding_type": str,
    "time_embedding_dim": (int, type(None)), "freq_shift": (int, float), "flip_sin_to_cos": bool,
    "down_block_types": [str], "mid_block_type": (str, type(None)), "up_block_types": [str],
    "block_out_channels": [int], "layers_per_block": int,
    "mid_block_scale_factor": (int, float), "downsample_padding": int, "downsample_type": str,
    "upsample_type": str, "dropout": (int, float), "act_fn": str,
    "attention_head_dim": (int, type(None)), "norm_num_groups": (int, type(None)),
    "attn_norm_num_groups": (int, type(None)), "norm_eps": (int, float),
    "resnet_time_scale_shift": str, "add_attention": bool, "class_embed_type": (str, type(None)),
    "num_class_embeds": (int, type(None)),
}

_PREDICTION_TO = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}
_PREDICTION_FROM = {v: k for k, v in _PREDICTION_TO.items()}
_BETAS_TO = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
_BETAS_FROM = {v: k for k, v in _BETAS_TO.items()}
_SCHEDULERS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}
_FLOW_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler": "euler",
                    "FlowMatchHeunDiscreteScheduler": "heun"}
_FLOW_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False,
    "invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False,
    "use_exponential_sigmas": False, "use_beta_sigmas": False, "stochastic_sampling": False,
}
"""``FlowMatchEulerDiscreteScheduler`` defaults for the keys diffunet reads (the Heun one has
only the first two)."""
_FLOW_SCHEMA: dict[str, Any] = {
    "num_train_timesteps": int, "shift": (int, float), "use_dynamic_shifting": bool,
    "invert_sigmas": bool, "shift_terminal": (int, float, type(None)),
    "use_karras_sigmas": bool, "use_exponential_sigmas": bool, "use_beta_sigmas": bool,
    "stochastic_sampling": bool,
}

_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
    "prediction_type": "epsilon", "thresholding": False, "clip_sample_range": 1.0,
    "timestep_spacing": "leading", "rescale_betas_zero_snr": False, "variance_type": "fixed_small",
}
"""``DDIMScheduler``/``DDPMScheduler`` defaults for the keys diffunet reads."""

_SCHEDULER_SCHEMA: dict[str, Any] = {
    "num_train_timesteps": int, "beta_start": float, "beta_end": float, "beta_schedule": str,
    "trained_betas": (list, type(None)), "clip_sample": bool, "set_alpha_to_one": bool,
    "steps_offset": int, "prediction_type": str, "thresholding": bool,
    "clip_sample_range": float, "timestep_spacing": str, "rescale_betas_zero_snr": bool,
    "variance_type": (str, type(None)),
}


def _diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return DIFFUSERS_VERSION


# ---------------------------------------------------------------------------------------------
# Configs


def _attention_head_dim(cfg: UNetConfig) -> int | None:
    """UNet2DModel's ``attention_head_dim`` (channels per head, one value for every level; None:
    one head of all the channels), or a UsageError when the levels' head widths differ."""
    if cfg.head_channels is None and cfg.num_heads == 1:
        return None
    attn_chs = {cfg.base_channels * m for m, r in zip(cfg.channel_mults, cfg.resolutions)
                if r in cfg.attn_resolutions} | {cfg.base_channels * cfg.channel_mults[-1]}
    widths = sorted({ch // cfg.heads_at(ch) for ch in attn_chs})
    if len(widths) > 1:
        field = "unet.head_channels" if cfg.head_channels is not None else "unet.num_heads"
        value = cfg.head_channels if cfg.head_channels is not None else cfg.num_heads
        raise UsageError(f"{field} = {value}: gives heads of {widths} channels at the attention "
                         "levels; UNet2DModel has one attention_head_dim for all levels (set "
                         "unet.head_channels instead)")
    return widths[0]


def unet_to_diffusers(cfg: UNetConfig) -> dict[str, Any]:
    """The ``UNet2DModel`` config (``UNet2DModel(**it)``) computing the same function as
    ``UNet(cfg)``; a field UNet2DModel cannot express is a :class:`UsageError` naming it."""
    if not cfg.time_conditioning:
        raise UsageError("unet.time_conditioning = false: UNet2DModel always takes a timestep")
    if cfg.num_classes is not None:
        raise UsageError(f"unet.num_classes = {cfg.num_classes}: diffunet's class-conditional "
                         "UNet has a 'no label' row for guidance, and DDIMPipeline/DDPMPipeline "
                         "pass no labels; export an unconditional model")
    if cfg.downsample != "conv":
        raise UsageError(f"unet.downsample = {cfg.downsample!r}: UNet2DModel's DownBlock2D "
                         "always downsamples with a strided conv")
    if cfg.upsample != "nearest":
        raise UsageError(f"unet.upsample = {cfg.upsample!r}: UNet2DModel's UpBlock2D always "
                         "upsamples nearest-neighbour + conv")
    if cfg.group_channels is not None:
        raise UsageError(f"unet.group_channels = {cfg.group_channels}: UNet2DModel has one "
                         "number of GroupNorm groups for every norm (norm_num_groups), not "
                         "groups of a fixed width; export a model trained with unet.num_groups")
    attn = [r in cfg.attn_resolutions for r in cfg.resolutions]
    return {
        # a condition image is concatenated to x_t: diffusers sees wider input channels
        "sample_size": cfg.image_size, "in_channels": cfg.in_channels + cfg.cond_channels,
        "out_channels": cfg.output_channels, "center_input_sample": False,
        "time_embedding_type": "positional", "time_embedding_dim": None,
        "freq_shift": cfg.time_embed_freq_shift,
        "flip_sin_to_cos": cfg.time_embed_order == "cos_sin",
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mults],
        "layers_per_block": cfg.num_res_blocks, "mid_block_scale_factor": 1,
        "downsample_padding": 1 if cfg.downsample_padding == "symmetric" else 0,
        "downsample_type": "conv", "upsample_type": "conv", "dropout": cfg.dropout,
        "act_fn": "silu", "attention_head_dim": _attention_head_dim(cfg),
        "norm_num_groups": cfg.num_groups,
        # Explicit: with scale_shift and no attn_norm_num_groups the mid attention has no norm.
        "attn_norm_num_groups": cfg.num_groups, "norm_eps": cfg.norm_eps,
        "resnet_time_scale_shift": "scale_shift" if cfg.scale_shift_norm else "default",
        "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
        "num_train_timesteps": None,
    }


def _known(where: str, key: str, value: Any, allowed: tuple[Any, ...], why: str = "",
           who: str = "diffunet's UNet") -> None:
    if value not in allowed or isinstance(value, bool) is not isinstance(allowed[0], bool):
        shown = ", ".join(json.dumps(a) for a in allowed)
        raise ModelFileError(f"{where}: {key} = {json.dumps(value)}: {who} cannot "
                             f"express it (it takes {shown}){why}")


def _numbers_problem(c: dict[str, Any], where: str) -> None:
    """Refuse a number no setting can have, before any is used: NaN or +-Infinity (JSON
    literals Python's parser accepts; a NaN passes every range check unnoticed) and integers
    of :data:`~diffunet.checks.INT_LIMIT` or more (they would size allocations, or take
    seconds to print), at the top level of the config ``c`` or in one of its lists."""
    for key, value in c.items():
        for i, v in enumerate(value if isinstance(value, list) else [value]):
            name = f"{key}[{i}]" if isinstance(value, list) else key
            if isinstance(v, float) and not math.isfinite(v):
                raise ModelFileError(f"{where}: {name} = {json.dumps(v)}: not a finite "
                                     "number; the config is damaged, fix or re-download it")
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= INT_LIMIT:
                raise ModelFileError(f"{where}: {name} = {shown(v)}: out of range for any "
                                     "setting; the config is damaged, fix or re-download it")


def unet_from_diffusers(config: dict[str, Any], where: str = "unet/config.json") -> UNetConfig:
    """The :class:`UNetConfig` of the diffunet UNet computing the same function as
    ``UNet2DModel(**config)`` (keys diffusers ignores are ignored here too); a setting diffunet
    cannot express is a :class:`ModelFileError` naming ``where``, the key and its value."""
    if not isinstance(config, dict):
        raise ModelFileError(f"{where}: expected a JSON object, got {type(config).__name__}")
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ModelFileError(f"{where}: _class_name = {json.dumps(name)}: diffunet imports "
                             "UNet2DModel only (the unconditional DDPM-style UNet)")
    c = {**UNET2D_DEFAULTS, **{k: v for k, v in config.items() if k in UNET2D_DEFAULTS}}
    problem = schema_problem(c, _UNET2D_SCHEMA)
    if problem:
        raise ModelFileError(f"{where}: {problem}")
    _numbers_problem(c, where)
    size = c["sample_size"]
    if isinstance(size, list):
        if len(size) != 2 or size[0] != size[1] or not all(isinstance(s, int) for s in size):
            raise ModelFileError(f"{where}: sample_size = {json.dumps(size)}: diffunet's UNet "
                                 "takes square images (one integer)")
        size = size[0]
    if size is None:
        raise ModelFileError(f"{where}: sample_size is unset; diffunet needs the image size")
    _known(where, "center_input_sample", c["center_input_sample"], (False,))
    _known(where, "time_embedding_type", c["time_embedding_type"], ("positional",))
    _known(where, "mid_block_type", c["mid_block_type"], ("UNetMidBlock2D",))
    _known(where, "mid_block_scale_factor", c["mid_block_scale_factor"], (1, 1.0))
    _known(where, "downsample_padding", c["downsample_padding"], (1, 0))
    _known(where, "downsample_type", c["downsample_type"], ("conv",))
    _known(where, "upsample_type", c["upsample_type"], ("conv",))
    _known(where, "act_fn", c["act_fn"], ("silu", "swish"))
    _known(where, "resnet_time_scale_shift", c["resnet_time_scale_shift"],
           ("default", "scale_shift"))
    _known(where, "add_attention", c["add_attention"], (True,),
           " (its middle block always has attention)")
    _known(where, "class_embed_type", c["class_embed_type"], (None,))
    if c["num_class_embeds"] is not None:
        raise ModelFileError(f"{where}: num_class_embeds = {c['num_class_embeds']}: diffunet "
                             "imports unconditional UNet2DModels only (its class-conditional UNet "
                             "has an extra 'no label' row diffusers' has not)")
    freq_shift = c["freq_shift"]
    if freq_shift != int(freq_shift):
        raise ModelFileError(f"{where}: freq_shift = {freq_shift}: diffunet takes an integer")
    blocks = c["block_out_channels"]
    if not blocks:
        raise ModelFileError(f"{where}: block_out_channels is empty")
    if isinstance(size, int) and size > 0 and size.bit_length() < len(blocks):
        # each level halves the image: below one pixel it is no network (and 2**levels is a
        # number of as many bits as there are levels, for each level)
        raise ModelFileError(f"{where}: block_out_channels has {len(blocks):,} levels; a "
                             f"sample_size of {size} is halved below one pixel after "
                             f"{size.bit_length()}")
    base = blocks[0]
    if c["time_embedding_dim"] not in (None, 4 * base):
        raise ModelFileError(f"{where}: time_embedding_dim = {c['time_embedding_dim']}: "
                             f"diffunet's time embedding is 4 x block_out_channels[0] = {4 * base}")
    if any(b % base for b in blocks):
        raise ModelFileError(f"{where}: block_out_channels = {json.dumps(blocks)}: diffunet's "
                             "levels are multiples of the first level's channels")
    down, up = c["down_block_types"], c["up_block_types"]
    for key, types, plain, with_attn in (("down_block_types", down, "DownBlock2D",
                                          "AttnDownBlock2D"),
                                         ("up_block_types", up, "UpBlock2D", "AttnUpBlock2D")):
        if len(types) != len(blocks):
            raise ModelFileError(f"{where}: {key} has {len(types)} entries, block_out_channels "
                                 f"{len(blocks)}")
        for i, t in enumerate(types):
            _known(where, f"{key}[{i}]", t, (plain, with_attn))
    attn = [t == "AttnDownBlock2D" for t in down]
    if [t == "AttnUpBlock2D" for t in reversed(up)] != attn:
        matching = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
        raise ModelFileError(f"{where}: up_block_types = {json.dumps(up)}: diffunet has "
                             "attention at the same resolutions going down and up, i.e. "
                             f"{json.dumps(matching)} for down_block_types = {json.dumps(down)}")
    groups = c["norm_num_groups"]
    if groups is None:
        raise ModelFileError(f"{where}: norm_num_groups = null: diffunet needs one GroupNorm "
                             "group count")
    attn_groups = c["attn_norm_num_groups"]
    if attn_groups is None and c["resnet_time_scale_shift"] != "default":
        raise ModelFileError(f"{where}: attn_norm_num_groups = null with resnet_time_scale_shift "
                             "= \"scale_shift\": the middle attention has no GroupNorm there; "
                             "diffunet's always has one")
    if attn_groups is not None and attn_groups != groups:
        raise ModelFileError(f"{where}: attn_norm_num_groups = {attn_groups}: diffunet uses "
                             f"norm_num_groups ({groups}) for every norm")
    head_dim = c["attention_head_dim"]
    resolutions = [size // 2**i for i in range(len(blocks))]
    try:
        return UNetConfig(
            image_size=size, in_channels=c["in_channels"],
            out_channels=None if c["out_channels"] == c["in_channels"] else c["out_channels"],
            base_channels=base, channel_mults=tuple(b // base for b in blocks),
            num_res_blocks=c["layers_per_block"],
            attn_resolutions=tuple(r for r, a in zip(resolutions, attn) if a),
            dropout=float(c["dropout"]), num_heads=1, head_channels=head_dim, num_groups=groups,
            scale_shift_norm=c["resnet_time_scale_shift"] == "scale_shift",
            norm_eps=float(c["norm_eps"]),
            time_embed_order="cos_sin" if c["flip_sin_to_cos"] else "sin_cos",
            time_embed_freq_shift=int(freq_shift),
            downsample_padding="symmetric" if c["downsample_padding"] == 1 else "bottom_right")
    except ConfigError as e:
        raise ModelFileError(f"{where}: diffunet's UNet cannot express this UNet2DModel: "
                             f"{e}") from None


def scheduler_to_diffusers(schedule: ScheduleConfig, sample: SampleConfig | None = None
                           ) -> dict[str, Any]:
    """The diffusers scheduler config (with ``_class_name``) for ``schedule`` sampled as
    ``sample`` says. A VP model: ``DDPMScheduler`` for the ``ddpm`` sampler, else
    ``DDIMScheduler``, ``clip_sample`` and ``timestep_spacing`` from ``sample`` (default
    :class:`SampleConfig`). A flow-matching model: ``FlowMatchEulerDiscreteScheduler`` with its
    ``num_train_timesteps`` and ``shift`` (its grid is the flow model's uniform grid; it never
    clips). A formulation diffusers has no scheduler for is a :class:`UsageError`."""
    family = formulation_class(schedule.formulation).diffusers_scheduler
    if family == "FlowMatchEulerDiscreteScheduler":
        return {"_class_name": family, **_FLOW_DEFAULTS,
                "num_train_timesteps": schedule.num_train_timesteps, "shift": schedule.shift}
    if family is None:
        raise UsageError(f"schedule.formulation = {schedule.formulation!r}: diffusers has no "
                         "scheduler for it")
    sample = sample if sample is not None else SampleConfig()
    out: dict[str, Any] = {
        "_class_name": "DDPMScheduler" if sample.sampler == "ddpm" else "DDIMScheduler",
        "num_train_timesteps": schedule.num_train_timesteps,
        "beta_start": schedule.beta_start, "beta_end": schedule.beta_end,
        "beta_schedule": _BETAS_TO.get(schedule.beta_schedule, "linear"),
        # sigmoid is DDPMScheduler-only; as the table itself both schedulers read it.
        "trained_betas": (make_betas(schedule).tolist() if schedule.beta_schedule == "sigmoid"
                          else None),
        "prediction_type": _PREDICTION_TO[schedule.prediction_type],
        "rescale_betas_zero_snr": schedule.rescale_zero_terminal_snr,
        "clip_sample": sample.clip_x0, "clip_sample_range": 1.0, "thresholding": False,
        "timestep_spacing": sample.spacing, "steps_offset": 0,
    }
    if sample.sampler == "ddpm":
        out["variance_type"] = "fixed_small"
    else:
        out["set_alpha_to_one"] = True
    return out


def schedule_from_diffusers(config: dict[str, Any], where: str = "scheduler/scheduler_config.json"
                            ) -> tuple[ScheduleConfig, dict[str, Any]]:
    """(the :class:`ScheduleConfig`, the ``[sample]`` settings) a ``DDPMScheduler`` or
    ``DDIMScheduler`` config describes; what diffunet cannot express is a
    :class:`ModelFileError` naming ``where``, the key and its value."""
    if not isinstance(config, dict):
        raise ModelFileError(f"{where}: expected a JSON object, got {type(config).__name__}")
    name = config.get("_class_name", "DDPMScheduler")
    if name in _FLOW_SCHEDULERS:
        return _flow_schedule_from_diffusers(config, name, where)
    if name not in _SCHEDULERS:
        raise ModelFileError(f"{where}: _class_name = {json.dumps(name)}: diffunet imports the "
                             f"schedule of {', '.join([*_SCHEDULERS, *_FLOW_SCHEDULERS])} "
                             "configs")
    c = {**_SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if k in _SCHEDULER_DEFAULTS}}
    problem = schema_problem(c, _SCHEDULER_SCHEMA) or (
        c["trained_betas"] is not None
        and schema_problem(c["trained_betas"], [float], "trained_betas"))
    if problem:
        raise ModelFileError(f"{where}: {problem}")
    _numbers_problem(c, where)
    if c["trained_betas"] is not None and len(c["trained_betas"]) != c["num_train_timesteps"]:
        # before diffunet's own table is made to compare with: its size is the file's word
        raise ModelFileError(f"{where}: trained_betas holds {len(c['trained_betas']):,} betas "
                             f"for num_train_timesteps = {c['num_train_timesteps']}")
    _known(where, "prediction_type", c["prediction_type"], tuple(_PREDICTION_FROM))
    _known(where, "timestep_spacing", c["timestep_spacing"], ("leading", "trailing", "linspace"))
    _known(where, "steps_offset", c["steps_offset"], (0,))
    _known(where, "thresholding", c["thresholding"], (False,))
    _known(where, "clip_sample_range", c["clip_sample_range"], (1, 1.0))
    if name == "DDIMScheduler":
        _known(where, "set_alpha_to_one", c["set_alpha_to_one"], (True,),
               " (its last step always goes to alpha_bar = 1)")
    else:
        _known(where, "variance_type", c["variance_type"], ("fixed_small",))
    fields = {"num_train_timesteps": c["num_train_timesteps"],
              "beta_start": float(c["beta_start"]), "beta_end": float(c["beta_end"]),
              "prediction_type": _PREDICTION_FROM[c["prediction_type"]],
              "rescale_zero_terminal_snr": c["rescale_betas_zero_snr"]}
    try:
        if c["trained_betas"] is not None:
            # The one table diffunet can take is its own sigmoid (how it exports that schedule).
            sc = ScheduleConfig(**fields, beta_schedule="sigmoid")
            table = torch.tensor(c["trained_betas"], dtype=torch.float64)
            if table.shape != (sc.num_train_timesteps,) or not torch.allclose(
                    table, make_betas(sc), rtol=0, atol=1e-7):
                raise ModelFileError(f"{where}: trained_betas: a table of {table.numel()} betas "
                                     "that is none of diffunet's schedules (linear, "
                                     "scaled_linear, cosine, sigmoid)")
        else:
            if c["beta_schedule"] not in _BETAS_FROM and c["beta_schedule"] != "sigmoid":
                _known(where, "beta_schedule", c["beta_schedule"], (*_BETAS_FROM, "sigmoid"))
            sc = ScheduleConfig(**fields, beta_schedule=_BETAS_FROM.get(c["beta_schedule"],
                                                                        "sigmoid"))
    except ConfigError as e:
        raise ModelFileError(f"{where}: diffunet cannot express this schedule: {e}") from None
    sample = {"sampler": _SCHEDULERS[name], "spacing": c["timestep_spacing"],
              "clip_x0": c["clip_sample"]}
    return sc, sample


def _flow_schedule_from_diffusers(config: dict[str, Any], name: str, where: str
                                  ) -> tuple[ScheduleConfig, dict[str, Any]]:
    """:func:`schedule_from_diffusers` for a ``FlowMatchEulerDiscreteScheduler`` or
    ``FlowMatchHeunDiscreteScheduler`` config: a flow-matching schedule with its
    ``num_train_timesteps`` and ``shift``, sampled with Euler (Heun) on the uniform grid,
    unclipped, as diffusers samples it. The static-shift grid is all diffunet's flow grid is."""
    c = {**_FLOW_DEFAULTS, **{k: v for k, v in config.items() if k in _FLOW_DEFAULTS}}
    problem = schema_problem(c, _FLOW_SCHEMA)
    if problem:
        raise ModelFileError(f"{where}: {problem}")
    _numbers_problem(c, where)
    for key in ("use_dynamic_shifting", "invert_sigmas", "use_karras_sigmas",
                "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling"):
        _known(where, key, c[key], (False,), " (its flow grid is the static-shift one)",
               who="diffunet's flow sampling")
    _known(where, "shift_terminal", c["shift_terminal"], (None,), who="diffunet's flow sampling")
    try:
        sc = ScheduleConfig(formulation="flow", num_train_timesteps=c["num_train_timesteps"],
                            shift=float(c["shift"]))
    except ConfigError as e:
        raise ModelFileError(f"{where}: diffunet cannot express this schedule: {e}") from None
    return sc, {"sampler": _FLOW_SCHEDULERS[name], "sigmas": "uniform", "clip_x0": False}


# ---------------------------------------------------------------------------------------------
# Weights


def _pairs(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """(kind, diffunet prefix, diffusers prefix) of every module whose weights map: kind
    ``plain`` (same tensors), ``res`` (a residual block) or ``attn`` (an attention block)."""
    n = len(cfg.channel_mults)
    attn = [r in cfg.attn_resolutions for r in cfg.resolutions]
    out = [("plain", "time_embed.0", "time_embedding.linear_1"),
           ("plain", "time_embed.2", "time_embedding.linear_2"),
           ("plain", "conv_in", "conv_in"), ("plain", "norm_out", "conv_norm_out"),
           ("plain", "conv_out", "conv_out")]
    for level in range(n):
        for i in range(cfg.num_res_blocks):
            out.append(("res", f"down.{level}.res.{i}", f"down_blocks.{level}.resnets.{i}"))
            if attn[level]:
                out.append(("attn", f"down.{level}.attn.{i}",
                            f"down_blocks.{level}.attentions.{i}"))
        if level != n - 1:
            out.append(("plain", f"down.{level}.downsample.conv",
                        f"down_blocks.{level}.downsamplers.0.conv"))
    out += [("res", "mid.res1", "mid_block.resnets.0"),
            ("attn", "mid.attn", "mid_block.attentions.0"),
            ("res", "mid.res2", "mid_block.resnets.1")]
    for level in range(n):
        j = n - 1 - level  # diffusers numbers its up blocks from the lowest resolution
        for i in range(cfg.num_res_blocks + 1):
            out.append(("res", f"up.{level}.res.{i}", f"up_blocks.{j}.resnets.{i}"))
            if attn[level]:
                out.append(("attn", f"up.{level}.attn.{i}", f"up_blocks.{j}.attentions.{i}"))
        if level != 0:
            out.append(("plain", f"up.{level}.upsample.conv",
                        f"up_blocks.{j}.upsamplers.0.conv"))
    return out


_RES = (("norm1", "norm1"), ("conv1", "conv1"), ("emb_proj", "time_emb_proj"), ("norm2", "norm2"),
        ("conv2", "conv2"), ("skip", "conv_shortcut"))
_LEGACY_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
"""Attention weight names of diffusers before 0.15 (the original DDPM checkpoints' files)."""


def state_to_diffusers(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """diffunet's UNet state dict -> ``UNet2DModel``'s (for ``unet_to_diffusers(cfg)``)."""
    out: dict[str, torch.Tensor] = {}
    for kind, ours, theirs in _pairs(cfg):
        for p in ("weight", "bias"):
            if kind == "plain":
                out[f"{theirs}.{p}"] = state[f"{ours}.{p}"]
            elif kind == "res":
                for a, b in _RES:
                    if f"{ours}.{a}.{p}" in state:
                        out[f"{theirs}.{b}.{p}"] = state[f"{ours}.{a}.{p}"]
            else:
                out[f"{theirs}.group_norm.{p}"] = state[f"{ours}.norm.{p}"]
                for name, part in zip(("to_q", "to_k", "to_v"), state[f"{ours}.qkv.{p}"].chunk(3)):
                    out[f"{theirs}.{name}.{p}"] = part
                out[f"{theirs}.to_out.0.{p}"] = state[f"{ours}.proj.{p}"]
    return {k: v.contiguous() for k, v in out.items()}


def state_from_diffusers(state: dict[str, torch.Tensor], cfg: UNetConfig,
                         where: str = "unet weights") -> dict[str, torch.Tensor]:
    """``UNet2DModel``'s state dict (today's or the pre-0.15 attention names) -> diffunet's for
    ``UNet(cfg)``. A missing, extra or misshapen tensor is a :class:`ModelFileError`."""
    taken: set[str] = set()

    def get(name: str) -> torch.Tensor:
        prefix, _, leaf = name.rpartition(".")
        for cand in (name, *(f"{prefix.removesuffix(new)}{old}.{leaf}"
                             for new, old in _LEGACY_ATTN.items() if prefix.endswith(new))):
            if cand in state:
                taken.add(cand)
                return state[cand]
        raise ModelFileError(f"{where}: tensor {name} is missing (the weights do not fit the "
                             "UNet2DModel its config.json describes)")

    out: dict[str, torch.Tensor] = {}
    shapes = parameter_shapes(cfg)
    for kind, ours, theirs in _pairs(cfg):
        for p in ("weight", "bias"):
            if kind == "plain":
                out[f"{ours}.{p}"] = get(f"{theirs}.{p}")
            elif kind == "res":
                for a, b in _RES:
                    if f"{ours}.{a}.{p}" in shapes:
                        out[f"{ours}.{a}.{p}"] = get(f"{theirs}.{b}.{p}")
            else:
                out[f"{ours}.norm.{p}"] = get(f"{theirs}.group_norm.{p}")
                qkv = [get(f"{theirs}.{n}.{p}") for n in ("to_q", "to_k", "to_v")]
                if p == "weight":  # pre-0.15 files may hold 1x1 conv-shaped (C, C, 1, 1) weights
                    qkv = [w.reshape(w.shape[0], -1) for w in qkv]
                out[f"{ours}.qkv.{p}"] = torch.cat(qkv)
                w = get(f"{theirs}.to_out.0.{p}")
                out[f"{ours}.proj.{p}"] = w.reshape(w.shape[0], -1) if p == "weight" else w
    extra = sorted(set(state) - taken)
    if extra:
        raise ModelFileError(f"{where}: tensor {extra[0]} has no place in the UNet2DModel its "
                             f"config.json describes ({len(extra)} such tensor(s))")
    for k, v in out.items():
        if tuple(v.shape) != shapes[k]:
            raise ModelFileError(f"{where}: a tensor mapped to {k} has shape {list(v.shape)}, "
                                 f"the config.json needs {list(shapes[k])}")
    return out


# ---------------------------------------------------------------------------------------------
# Folders


def _json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


def _sample_settings(meta: dict[str, Any]) -> SampleConfig:
    """The model file's ``[sample]`` settings (what ``diffunet train`` stored), else defaults."""
    stored = meta.get("run_config")
    stored = stored.get("sample") if isinstance(stored, dict) else None
    if isinstance(stored, dict):
        try:
            return from_dict(SampleConfig, stored, "sample")
        except ConfigError:
            pass
    return SampleConfig()


PIPELINE_FILES: dict[str, tuple[str, ...]] = {
    "": ("model_index.json",), "unet": ("config.json", WEIGHTS),
    "scheduler": ("scheduler_config.json",), "vqvae": ("config.json", WEIGHTS),
    "vae": ("config.json", WEIGHTS)}
"""The files :func:`export_diffusers` writes, by sub-folder of the pipeline folder (a latent
model's VAE goes into ``vqvae/``, the name ``LDMPipeline`` gives it, or ``vae/``)."""

_NOT_A_LINK = "remove it, or choose another DIR"


def _pipeline_folder(folder: Path, overwrite: bool, stack: contextlib.ExitStack,
                     subs: tuple[str, ...] = ("unet", "scheduler")) -> dict[str, OpenFolder]:
    """Open (and make) the pipeline folder and its sub-folders ``subs`` (``unet/``,
    ``scheduler/``, a VAE's), each once and never through a link, after the checks: a file, a
    link to a missing folder, a sub-folder that is a link or a file (even with ``overwrite``),
    and, unless ``overwrite``,
    a folder holding anything but empty sub-folders and export's own stale temporary files
    (an interrupted export's leftovers, removed here). Closed with ``stack``."""
    if folder.exists() and not folder.is_dir():
        raise FolderError(f"{folder} is a file, not a folder; give a folder to write the "
                          "diffusers pipeline into")
    if os.path.islink(folder) and not folder.exists():
        raise FolderError(f"{folder} is a link to a missing folder; create its target, or "
                          "choose another DIR")
    root = stack.enter_context(open_folder(folder, label=str(folder), create=True))
    for sub in subs:
        st = root.lstat(sub)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise FolderError(f"{folder / sub} is a symbolic link; diffunet never writes "
                              f"through a link it did not create: {_NOT_A_LINK}")
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise FolderError(f"{folder / sub} is not a folder; {_NOT_A_LINK}")
    folders = {"": root}
    remove_stale_temporaries(root, PIPELINE_FILES[""], legacy=True)
    busy = [name for name in root.names() if name not in subs]
    for sub in subs:
        if root.lstat(sub) is not None:
            folders[sub] = stack.enter_context(open_subfolder(root, sub, fix=_NOT_A_LINK,
                                                              create=False))
            remove_stale_temporaries(folders[sub], PIPELINE_FILES[sub], legacy=True)
            busy += [f"{sub}/{name}" for name in folders[sub].names()]
    if busy and not overwrite:
        raise FolderError(f"{folder} is not empty; give a new or empty folder, or --overwrite "
                          "to write the pipeline files over what is there")
    for sub in subs:
        if sub not in folders:
            folders[sub] = stack.enter_context(open_subfolder(root, sub, fix=_NOT_A_LINK))
    return folders


def export_diffusers(model_file: str | os.PathLike, folder: str | os.PathLike, *,
                     overwrite: bool = False, vae_path: str | None = None) -> dict[str, Any]:
    """Write the diffunet model file ``model_file`` as a diffusers pipeline folder.

    ``folder`` gets ``model_index.json`` (a VP model: a ``DDPMPipeline`` when the file's
    ``[sample]`` sampler is ``ddpm``, else a ``DDIMPipeline``; a flow-matching model has no
    pipeline class in diffusers and gets none), ``unet/config.json``,
    ``unet/diffusion_pytorch_model.safetensors`` (float32 as stored) and
    ``scheduler/scheduler_config.json`` (:func:`scheduler_to_diffusers`), each written
    atomically. A latent model (one whose file records a VAE) also gets its AutoencoderKL, the
    very files it was trained with (``vae_path``: a local copy of it, checked by its hashes;
    the model's scaling written into the config's ``scaling_factor`` and ``shift_factor`` only
    where it differs from the config's own, :func:`~diffunet.data_space.vae_files`):
    in ``vqvae/`` under an ``LDMPipeline`` (diffusers' unconditional latent pipeline, which
    divides by ``scaling_factor`` before it decodes) where that pipeline runs it (a VP model,
    no shift), else in ``vae/`` with no pipeline class (flow matching; a shifted scaling,
    which LDMPipeline does not undo); its DDPM/DDIM scheduler never clips (latents are not in
    [-1, 1]). A model whose formulation diffusers has no scheduler for (EDM) is refused. A
    non-empty ``folder`` is a :class:`FolderError` unless ``overwrite`` (an interrupted
    export's temporary files do not count: they are removed); a sub-folder that is a link is
    refused even with it, and so is a link, folder or FIFO under a file's name (each file is
    written through diffunet/output_files.py, relative to its folder opened once, never
    through a link). A guide the file carries (``train.guide_at``) is not exported: a diffusers
    pipeline has no place for a second network. Returns what was written: ``{"folder",
    "pipeline" (None where diffusers has no pipeline class for it), "scheduler", "files",
    "guide_dropped" (the step of the carried guide left out, or None), "vae" (the VAE's
    sub-folder, None for a pixel model)}``.
    """
    folder = Path(folder)
    loaded = load_model_file(model_file)
    if loaded.schedule is None:
        raise ModelFileError(f"{model_file} has no noise schedule (a segmentation model?); only "
                             "diffusion models export to a diffusers pipeline")
    schedule = loaded.schedule
    if schedule.diffusers_scheduler is None:
        raise ModelFileError(f"{model_file} is {schedule.article} {schedule.title} model "
                             f"(schedule.formulation = '{schedule.name}'); diffusers has no "
                             "scheduler for it (VP models export as DDPM/DDIM pipelines, "
                             "flow-matching ones with FlowMatchEulerDiscreteScheduler)")
    cfg = loaded.net.config
    unet_config = unet_to_diffusers(cfg)  # refuses before anything is written
    sample = _sample_settings(loaded.metadata)
    # the VAE's files, read and checked against the file's record before anything is written
    vae = vae_files(loaded.metadata, vae_path, where=str(model_file))
    if vae is not None:
        sample = dataclasses.replace(sample, clip_x0=False)  # latents are unbounded
    scheduler = scheduler_to_diffusers(schedule.config, sample)
    version = _diffusers_version()
    scheduler_name = scheduler.pop("_class_name")
    # diffusers has pipelines for DDPM/DDIM, and LDMPipeline for them on latents; a flow model
    # is its components (README's loop)
    pipeline = {"DDPMScheduler": "DDPMPipeline", "DDIMScheduler": "DDIMPipeline"}.get(
        scheduler_name)
    vae_sub = None
    if vae is not None:
        shifted = vae[2]["shift_factor"] != 0.0
        pipeline = "LDMPipeline" if pipeline is not None and not shifted else None
        vae_sub = "vqvae" if pipeline == "LDMPipeline" else "vae"
    files = ["unet/config.json", f"unet/{WEIGHTS}", "scheduler/scheduler_config.json"]
    if vae_sub is not None:
        files += [f"{vae_sub}/config.json", f"{vae_sub}/{WEIGHTS}"]
    if pipeline is not None:
        files.insert(0, "model_index.json")
    subs = ("unet", "scheduler") + ((vae_sub,) if vae_sub is not None else ())
    with contextlib.ExitStack() as stack:
        folders = _pipeline_folder(folder, overwrite, stack, subs)
        # every file claimed before the first is written (diffunet/output_files.py): a link,
        # a folder or a FIFO under a pipeline name is refused, even with --overwrite
        out = {rel: stack.enter_context(claim_file(
            folder / rel, folder=folders[os.path.dirname(rel)], example=os.path.basename(rel),
            overwrite=True if overwrite else False, fix="choose another DIR, or pass "
            "--overwrite")) for rel in files}
        tensors = state_to_diffusers(loaded.net.state_dict(), cfg)
        out[f"unet/{WEIGHTS}"].write(tensor_file_bytes(tensors, {"format": "pt"}))
        del tensors
        out["unet/config.json"].write(_json_bytes(
            {"_class_name": "UNet2DModel", "_diffusers_version": version, **unet_config}))
        out["scheduler/scheduler_config.json"].write(_json_bytes(
            {"_class_name": scheduler_name, "_diffusers_version": version, **scheduler}))
        index = {"scheduler": ["diffusers", scheduler_name], "unet": ["diffusers", "UNet2DModel"]}
        if vae is not None:
            vae_config, vae_weights, _ = vae
            out[f"{vae_sub}/{WEIGHTS}"].write(vae_weights)
            out[f"{vae_sub}/config.json"].write(vae_config)
            index[vae_sub] = ["diffusers", "AutoencoderKL"]
        if pipeline is not None:
            out["model_index.json"].write(_json_bytes(
                {"_class_name": pipeline, "_diffusers_version": version, **index}))
    return {"folder": folder, "pipeline": pipeline, "scheduler": scheduler_name, "files": files,
            "guide_dropped": None if loaded.guide is None else loaded.guide.step,
            "vae": vae_sub}


class ImportResult(NamedTuple):
    """What :func:`import_diffusers` did."""

    out_file: Path
    unet_folder: Path
    unet_config: UNetConfig
    schedule_config: ScheduleConfig
    sample: dict[str, Any]
    """The ``[sample]`` settings stored in the model file."""
    scheduler: Path | None
    """The scheduler config read; None: the folder had none, DDPM's schedule was used."""
    vae: dict[str, Any] | None = None
    """The model file's ``vae`` record of the pipeline's VAE; None: a pixel model."""


def _read_config(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path}: cannot be read as JSON ({e})") from None


def pipeline_inputs(folder: str | os.PathLike) -> list[Path]:
    """The files :func:`import_diffusers` may read from ``folder`` (never its output)."""
    folder = Path(folder)
    return [folder / rel for rel in ("config.json", WEIGHTS, "unet/config.json",
                                     f"unet/{WEIGHTS}", "scheduler/scheduler_config.json",
                                     "model_index.json", *(f"{sub}/{name}" for sub in VAE_SUBFOLDERS
                                                           for name in ("config.json", WEIGHTS)))]


def _check_import_fits(folder: Path, unet_dir: Path, cfg: UNetConfig,
                       schedule_cfg: ScheduleConfig, weights: Path) -> None:
    """Price the import before anything is read or built, from the configs alone
    (:mod:`diffunet.resources`): the weights file, three float32 copies of the weights (the
    mapped tensors, the network, the model file's bytes) with the network's Python objects, the
    schedule's tables; and one image's activations, so that a model ``info`` and ``sample``
    would refuse to load here is refused before its file is written. One
    :class:`ModelFileError` line naming the settings that size the largest part."""
    try:
        file_bytes = max(weights.stat().st_size, 0)
    except OSError:
        file_bytes = 0  # read_tensor_file says what is wrong with it
    timesteps = schedule_cfg.table_timesteps
    cost = Cost(weight_bytes(network_size(cfg), copies=3) + file_bytes,
                schedule_bytes(timesteps) if timesteps else 0, activation_bytes(cfg, 1))
    unet_json = os.path.relpath(unet_dir / "config.json", folder)
    blocks = [cfg.base_channels * m for m in cfg.channel_mults]
    fields = {"parameters": f"{unet_json}: block_out_channels = {blocks}, layers_per_block "
                            f"= {cfg.num_res_blocks}, in_channels = {cfg.in_channels}",
              "schedule": f"scheduler/scheduler_config.json: num_train_timesteps = {timesteps}",
              "activations": f"{unet_json}: sample_size = {cfg.image_size}"}
    check_fits(cost, "cpu", f"{folder}: importing this model, then loading it one image at a "
               "time,", "nothing was written; check those settings, or import on a machine "
               "with more memory", ModelFileError, fields)


def _check_weights(tensors: dict[str, torch.Tensor], cfg: UNetConfig, weights: Path) -> None:
    """Refuse weights that cannot be ``cfg``'s before the network is built to map them: fewer
    tensors than it has (diffusers' files hold at least as many: its attention keeps q, k and v
    apart), a tensor that is not floating point, or one holding NaN or inf (float8 too)."""
    need = network_size(cfg).tensors
    if len(tensors) < need:
        raise ModelFileError(f"{weights}: holds {len(tensors):,} tensors, but the UNet2DModel "
                             f"its config.json describes has at least {need:,} "
                             f"(layers_per_block = {cfg.num_res_blocks}); the weights do not "
                             "fit it")
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ModelFileError(f"{weights}: tensor {name} is {str(t.dtype).split('.')[-1]}; "
                                 "UNet2DModel's weights are floating point")
    bad = first_nonfinite(tensors)
    if bad is not None:
        name, count, total = bad
        raise ModelFileError(f"{weights}: tensor {name} holds {count:,} non-finite value(s) "
                             f"(NaN or inf) of {total:,}; the weights are damaged")


def import_diffusers(folder: str | os.PathLike, out_file: str | os.PathLike | OutputFile, *,
                     overwrite: bool = False, source: str | None = None,
                     hub: tuple[str, str | None] | None = None) -> ImportResult:
    """Read a diffusers folder into the diffunet model file ``out_file``.

    ``folder`` is a pipeline folder (``unet/`` and, optionally, ``scheduler/``, as
    ``DDPMPipeline.save_pretrained`` writes it) or a bare ``UNet2DModel.save_pretrained``
    folder (``config.json`` + ``diffusion_pytorch_model.safetensors``; the schedule is then
    diffusers' and DDPM's default, linear 1e-4..0.02 over 1000 steps, epsilon). The weights must
    be safetensors (a ``.bin`` is a pickle and refused). The scheduler's sampler, spacing and
    clipping become the file's ``[sample]`` settings (``run_config.sample`` in its metadata, as
    ``diffunet sample`` reads it). A folder with a VAE beside the UNet (``vqvae/``, as
    ``LDMPipeline`` saves it, or ``vae/``) is a latent model: the VAE must be an
    AutoencoderKL with safetensors weights whose latent channels are the UNet's, and the file
    records it (:func:`~diffunet.data_space.folder_record`: where it is, its hashes, its
    config's ``scaling_factor``) so that ``diffunet sample`` decodes through it: by the
    folder's absolute path, or, ``hub`` = (repo id, revision) for a Hub download, by its id.
    ``out_file`` is claimed (diffunet/output_files.py) before
    the weights are read, or comes claimed (``diffunet import`` claims it before a download):
    an existing ``out_file`` is a :class:`UsageError` unless ``overwrite``, and a link, a
    folder, a FIFO or one of the folder's own files always. ``source`` (default: the folder's name, e.g. a Hub repo id) is recorded as
    ``imported_from.diffusers`` in the file's metadata.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FolderError(f"{folder}: not a folder; give a diffusers pipeline or UNet2DModel "
                          "folder (with model_index.json or config.json)")
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if not (unet_dir / "config.json").is_file():
        raise ModelFileError(f"{folder}: has neither unet/config.json nor config.json; not a "
                             "diffusers pipeline or UNet2DModel folder")
    with contextlib.ExitStack() as stack:
        if not isinstance(out_file, OutputFile):
            out_file = stack.enter_context(claim_file(
                out_file, example="model.safetensors", overwrite=overwrite,
                inputs=pipeline_inputs(folder)))
        return _import(folder, unet_dir, out_file, source, hub)


VAE_SUBFOLDERS = ("vqvae", "vae")
"""Where a pipeline folder holds its VAE: ``LDMPipeline``'s name for it, and everyone else's."""


def _pipeline_vae(folder: Path, unet_dir: Path, cfg: UNetConfig,
                  hub: tuple[str, str | None] | None) -> dict[str, Any] | None:
    """The model file's ``vae`` record for the VAE of the pipeline ``folder``, or None (a pixel
    model). One :class:`ModelFileError` line for a VAE that is not an AutoencoderKL (an
    ``LDMPipeline``'s VQModel), has pickled weights only, or whose latents the UNet does not
    take."""
    if unet_dir == folder:
        return None
    found = [sub for sub in VAE_SUBFOLDERS if (folder / sub / "config.json").is_file()]
    if not found:
        return None
    sub = found[0]
    vae_dir = folder / sub
    config = _read_config(vae_dir / "config.json")
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name != "AutoencoderKL":
        raise ModelFileError(f"{vae_dir / 'config.json'}: the pipeline's VAE is {name!r}, not an "
                             "AutoencoderKL; diffunet's latent models decode through an "
                             "AutoencoderKL (a VQModel, as in CompVis' LDM checkpoints, is not "
                             "supported)")
    if not (vae_dir / WEIGHTS).is_file():
        raise ModelFileError(f"{vae_dir}: {WEIGHTS} is missing (a .bin is a pickle, which "
                             "diffunet never loads); save the VAE with safe_serialization=True")
    if hub is not None:
        vae = VaeConfig(path=hub[0], revision=hub[1], subfolder=sub)
    else:
        vae = VaeConfig(path=str(folder.resolve()), subfolder=sub)
    record = folder_record(vae, vae_dir)
    latent = record["latent_channels"]
    for key, value in (("in_channels", cfg.in_channels), ("out_channels", cfg.out_channels)):
        if value is not None and value != latent:
            raise ModelFileError(f"{unet_dir / 'config.json'}: {key} = {value}, but the "
                                 f"pipeline's VAE ({sub}/) makes {latent}-channel latents; the "
                                 "UNet does not fit its VAE")
    return record


def _import(folder: Path, unet_dir: Path, out_file: OutputFile, source: str | None,
            hub: tuple[str, str | None] | None = None) -> ImportResult:
    cfg = unet_from_diffusers(_read_config(unet_dir / "config.json"),
                              str(unet_dir / "config.json"))
    sched_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_config(sched_path) if unet_dir != folder and sched_path.is_file() else None
    if scheduler is not None:
        schedule_cfg, sample = schedule_from_diffusers(scheduler, str(sched_path))
    else:
        schedule_cfg, sample = ScheduleConfig(), {"sampler": "ddpm", "spacing": "leading",
                                                  "clip_x0": True}
    weights = unet_dir / WEIGHTS
    if not weights.is_file():
        pickles = sorted(p.name for p in unet_dir.glob("*.bin"))
        hint = (f"it holds only {pickles[0]}, a pickle, which diffunet never loads; convert it "
                "in a Python you trust: UNet2DModel.from_pretrained(DIR).save_pretrained(DIR, "
                "safe_serialization=True)" if pickles else "no weights file there")
        raise ModelFileError(f"{unet_dir}: {WEIGHTS} is missing; {hint}")
    vae_record = _pipeline_vae(folder, unet_dir, cfg, hub)
    if vae_record is not None:
        sample["clip_x0"] = False  # latents are unbounded
    _check_import_fits(folder, unet_dir, cfg, schedule_cfg, weights)
    tensors, _ = read_tensor_file(weights)
    _check_weights(tensors, cfg, weights)
    state = state_from_diffusers(tensors, cfg, str(weights))
    net = UNet(cfg)
    net.load_state_dict(state, strict=True)
    del tensors, state
    sample_settings = to_dict(SampleConfig(**sample))
    out_file.write(model_file_bytes(net, make_schedule(schedule_cfg), extra={
        "run_config": {"sample": sample_settings},
        "imported_from": {"diffusers": source or os.path.basename(os.path.abspath(folder)),
                          "scheduler": None if scheduler is None
                          else scheduler.get("_class_name", "DDPMScheduler")},
        **({"vae": vae_record} if vae_record is not None else {})}))
    return ImportResult(out_file=out_file.path, unet_folder=unet_dir, unet_config=cfg,
                        schedule_config=schedule_cfg, sample=sample_settings,
                        scheduler=None if scheduler is None else sched_path, vae=vae_record)


# ---------------------------------------------------------------------------------------------
# The Hugging Face Hub (huggingface_hub, installed with diffusers)

HUB_FILES = ["model_index.json", "config.json", WEIGHTS, "unet/config.json", f"unet/{WEIGHTS}",
             "scheduler/scheduler_config.json",
             *(f"{sub}/{name}" for sub in ("vqvae", "vae") for name in ("config.json", WEIGHTS))]
"""The files :func:`download_from_hub` fetches: JSON configs and safetensors weights only (a
pickled ``.bin`` is never downloaded)."""


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise MissingDependencyError("the Hugging Face Hub needs huggingface_hub: pip install "
                                     "huggingface_hub (it comes with diffusers)") from None
    return huggingface_hub


def download_from_hub(repo_id: str, *, revision: str | None = None,
                      cache_dir: str | os.PathLike | None = None,
                      local_files_only: bool = False) -> Path:
    """The local snapshot folder of the Hub model ``repo_id`` (:data:`HUB_FILES` only, into
    huggingface_hub's cache); what :func:`import_diffusers` then reads. A repository that cannot
    be fetched (offline, missing, gated) is one :class:`UsageError` line."""
    hub = _hub()
    try:
        path = hub.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES,
                                     cache_dir=cache_dir, local_files_only=local_files_only)
    except (OSError, ValueError) as e:  # huggingface_hub's errors (HfHubHTTPError is an OSError):
        # network, missing repo or revision, gated, offline
        raise UsageError(f"{repo_id}: no such local folder, and the Hugging Face Hub download "
                         f"failed ({first_line(e)})") from None
    return Path(path)


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                token: str | None = None) -> str:
    """Upload the exported pipeline ``folder`` to the Hub model ``repo_id`` (created if need
    be); returns the commit's URL. A failed upload is one :class:`UsageError` line."""
    hub = _hub()
    try:
        api = hub.HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message="diffunet export",
                                 allow_patterns=["model_index.json", "unet/*", "scheduler/*",
                                                 "vqvae/*", "vae/*"])
    except (OSError, ValueError) as e:  # huggingface_hub's errors: not logged in, no access,
        # network
        raise UsageError(f"--push-to-hub {repo_id}: the upload failed ({first_line(e)}); the "
                         f"pipeline is in {folder}") from None
    return str(getattr(info, "commit_url", info))


def load_model(source: str | os.PathLike, *, device: str | torch.device = "cpu",
               revision: str | None = None, cache_dir: str | os.PathLike | None = None,
               local_files_only: bool = False) -> tuple[UNet, Any, dict[str, Any]]:
    """``diffunet.load_model``: a diffunet model file, a diffusers folder, or a Hugging Face
    Hub repo id (``google/ddpm-cifar10-32``), as ``(net, schedule, meta)``.

    A model file is read by :func:`diffunet.checkpoint.read_model` (never unpickled). A
    diffusers folder, or a Hub model (fetched by :func:`download_from_hub` into
    huggingface_hub's cache, so ``HF_HUB_OFFLINE=1`` and a filled cache work without network),
    is converted as ``diffunet import`` converts it, through a temporary model file, so the
    result is exactly what loading the imported file gives; ``meta["imported_from"]`` names the
    source. ``revision`` (a branch, tag or commit) is for Hub ids only."""
    path = Path(source)
    diffusers_folder = path.is_dir() and any(
        (path / name).is_file() for name in ("model_index.json", "unet/config.json",
                                             "config.json"))
    if diffusers_folder or (not path.exists() and looks_like_repo_id(str(source))):
        if diffusers_folder:
            if revision is not None:
                raise UsageError(f"revision= is for a Hub model id; {source} is a local folder")
            folder = path
        else:
            folder = download_from_hub(str(source), revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="diffunet-import-") as tmp:
            converted = Path(tmp) / "model.safetensors"
            import_diffusers(folder, converted, source=str(source))
            return checkpoint.read_model(converted, device=device)
    if revision is not None:
        raise UsageError(f"revision= is for a Hub model id; {source} is a local file")
    return checkpoint.read_model(source, device=device)
