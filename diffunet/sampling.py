"""``diffunet sample``: draw images from a model file into a folder, resumably, on 1..N processes.

Layout of the output folder (nothing else is ever written there, and only files its manifest
lists are ever removed: :mod:`diffunet.outputs`, the rule every output folder follows):

==================  ==========================================================================
``000000.png`` ...  image i (6 digits, more past 999999), grayscale or RGB as the model's
                    channels say; each written atomically (temporary file + rename)
``grid.png``        the first :data:`MAX_GRID_IMAGES` images tiled, built from the files on disk
``manifest.json``   what made the images: model file + SHA-256, its configs, the settings that
                    decide the pixels, the labels, the versions, and ``files``: the exact names
                    of every file of this command's in the folder (written atomically, before
                    the files it lists)
==================  ==========================================================================

Reproducibility: image i depends only on the model, the settings in the manifest and ``seed + i``.
Its start noise x_T is drawn on the CPU from ``torch.Generator().manual_seed(seed + i)`` (so the
device does not change it) and the same generator then supplies that image's step noise (ddpm,
ddim with eta > 0; :func:`~diffunet.samplers.sample` takes one generator per image). The batch
size and the number of processes therefore only decide which images are computed together,
which can move results by float rounding inside the network, never by a different draw.

Editing (``--init-image``, ``--mask``): image i also starts from init image ``i mod K`` (the K
images of a folder in sorted order, or one file) noised to ``--strength``, and keeps its pixels
where mask i is black (white = repaint: :data:`MASK_CONVENTION`). Inputs are read through the
regular-file opener, must be the model's size and mode (nothing is resized), and are recorded
in the manifest with their SHA-256 (``settings.init_images``/``settings.masks``: resuming with
other inputs is refused) and registered as inputs of the folder (never written over). Each batch
reads its inputs again and checks them against those hashes.

Resume: a run locks the folder, then writes ``manifest.json`` (``complete: false``), then the
images. Rerunning the same command skips images whose PNG exists; a folder with images from
other settings is refused unless ``overwrite`` (which removes the files the old manifest lists
first). A folder holding files no manifest lists is refused unless ``overwrite`` (then they are
kept beside the samples), and such a file under a name this run would write is never replaced.

Several processes (``accelerate launch``, via Accelerate's ``PartialState``): every process runs
the same checks, the main process prepares the folder, the images still to draw are dealt out
round-robin by index, each process writes its own PNGs, and the main process waits for all of
them, then writes the grid and the final manifest.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch

from . import errors
from .checkpoint import load_diffusion_file, load_guide_model, tensor_file_bytes
from .config import SampleConfig, ScheduleConfig, from_dict, to_dict
from .data_space import DataSpace, PixelSpace, model_space
from .editing import IMG2IMG_STRENGTH, MASK_CONVENTION, EditInputs, load_edit_inputs
from .errors import ConfigError, DataError, FolderError, UsageError
from .formulations import Formulation, StepOptions, formulation_class
from .images import image_header, make_grid_image, tensor_image
from .outputs import FolderWriter, OutputFolder, claim_folder, join_folder
from .resources import check_fits, network_cost
from .runs import cpu_requested, pick_device, refuse_lone_processes
from .guidance import carried_guide_weight
from .tasks import condition_image, finished, recorded_task, upscale
from .samplers import (MAX_RESAMPLE, MULTISTEP_SAMPLERS, ONE_STEP_SAMPLERS, check_sampling,
                       check_sigma_range, make_sigmas, preview_grid, sample)
from .version import __version__

__all__ = ["SampleOptions", "SampleResult", "EditInputs", "generate", "load_edit_inputs",
           "parse_class_labels", "resolve_class_labels", "class_rows", "image_name",
           "sample_settings", "guidance_kind", "MANIFEST", "GRID", "MAX_GRID_IMAGES",
           "MAX_SAMPLES", "PRECISIONS",
           "DEFAULT_NUM_SAMPLES", "MASK_CONVENTION", "IMG2IMG_STRENGTH"]

MANIFEST = "manifest.json"
GRID = "grid.png"
DEFAULT_NUM_SAMPLES = 64
"""Images drawn when ``--num-samples`` is not given (and no folder of init images sets it)."""
MAX_SAMPLES = 10_000_000
"""Images one run draws into one folder at most (each is a file the run checks and lists)."""
MAX_GRID_IMAGES = 1024
"""The grid shows at most this many images (the first ones): 1024 64x64 tiles are ~2100 px."""
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
MANIFEST_FORMAT = "diffunet.samples"
MANIFEST_VERSION = 1

ClassLabels = Union[None, int, str, tuple[Union[int, str], ...], Literal["all"]]
"""None, a class index or name, a tuple of them, or ``"all"`` (names are the model file's
``class_names``; :func:`generate` turns them into indices)."""


def latent_name(image: str) -> str:
    """The latent file written beside image file ``image`` (``--save-latents``)."""
    return image.removesuffix(".png") + ".safetensors"


def image_name(i: int) -> str:
    """File name of image i: ``000000.png``, ``000001.png``, ..."""
    return f"{i:06d}.png"


def parse_class_labels(text: str | None) -> ClassLabels:
    """Parse ``--class-label``: ``"3"`` -> 3, ``"1,4,7"`` -> (1, 4, 7), ``"all"`` -> "all",
    ``"cat"`` -> "cat", ``"cat,2"`` -> ("cat", 2). A part that is an integer is a class index
    (also where a class folder is named by a number); any other is a class name, looked up in
    the model file when sampling (:func:`resolve_class_labels`)."""
    if text is None:
        return None
    text = text.strip()
    if text.lower() == "all":
        return "all"
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise UsageError(f"--class-label: expected a class index or name, a comma-separated list "
                         f"such as 1,4,7 or cat,dog, or 'all'; got {text!r}")
    for p in parts:  # an index of thousands of digits is no class (and int() refuses it)
        if re.fullmatch(r"[+-]?[0-9]+", p) and len(p.lstrip("+-")) > 18:
            raise UsageError(f"--class-label: {p[:12]}... ({len(p)} digits) is no class index")
    values = tuple(int(p) if re.fullmatch(r"[+-]?[0-9]+", p) else p for p in parts)
    return values[0] if len(values) == 1 else values


def resolve_class_labels(spec: ClassLabels, class_names: Any) -> ClassLabels:
    """``spec`` with every class name replaced by its index in ``class_names`` (a model file's
    ``class_names`` metadata: label k is the k-th name); a single label becomes an int. An
    unknown name is a one-line :class:`UsageError` with a did-you-mean and the names."""
    if spec is None or spec == "all":
        return spec
    values = (spec,) if not isinstance(spec, tuple) else spec
    if all(_is_int(v) for v in values):
        return spec
    names = (list(class_names) if isinstance(class_names, list)
             and all(isinstance(n, str) for n in class_names) else None)
    out: list[int] = []
    for v in values:
        if _is_int(v):
            out.append(v)
            continue
        if not names:
            raise UsageError(f"--class-label: expected a class index, got {v!r}: this model "
                             "file has no class names (models trained on class folders have "
                             "them)")
        if v not in names:
            close = difflib.get_close_matches(v, names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)"
                                             if len(names) > 20 else "")
            raise UsageError(f"--class-label: this model has no class {v!r}; {hint}its classes "
                             f"are {shown} (or give an index 0 to {len(names) - 1})")
        out.append(names.index(v))
    return out[0] if len(out) == 1 else tuple(out)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_FLAGS = {"sampler": "--sampler", "num_steps": "--steps", "eta": "--eta",
          "spacing": "--spacing", "guidance_scale": "--guidance-scale",
          "guidance_interval": "--guidance-interval", "sigmas": "--sigmas",
          "rho": "--rho", "sigma_min": "--sigma-min", "sigma_max": "--sigma-max",
          "s_churn": "--s-churn", "s_tmin": "--s-tmin", "s_tmax": "--s-tmax",
          "s_noise": "--s-noise"}
_RANGE = ("sigma_min", "sigma_max")
_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")


@dataclass(frozen=True)
class SampleOptions:
    """Settings of one ``diffunet sample`` run; the command line's defaults are these.

    How to sample (``sampler``, ``num_steps``, ``eta``, ``spacing``, ``sigmas``, ``rho``,
    ``sigma_min``, ``sigma_max``, ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``,
    ``guidance_scale``, ``clip_x0``): None takes the model file's own ``[sample]`` settings, the
    ones its preview grids were drawn with (a file without them:
    :class:`~diffunet.config.SampleConfig`'s defaults); see
    :func:`sample_settings`. ``s_tmax`` may be ``math.inf`` (no upper limit).
    ``num_samples``: None = :data:`DEFAULT_NUM_SAMPLES`, or one image per init image when
    ``init_image`` is a folder.

    Editing: ``init_image`` (a file, or a folder whose sorted images are inputs 0..K-1; output
    image i uses input ``i % K``) starts each image from that image noised to ``strength``
    (SDEdit; None = :data:`IMG2IMG_STRENGTH`, or 1 with a mask); ``mask`` (a file for every
    init image, or a folder paired by file name) keeps the init image where the mask is black
    and generates where it is white (:data:`MASK_CONVENTION`); ``resample`` > 1 repeats each
    inpainting step that many times (RePaint; one-step samplers only).

    Guidance (:func:`guidance_kind`): a model file that carries a guide (the run's own
    earlier EMA, ``train.guide_at``) is autoguided by it with its recorded weight unless
    ``no_guide``; ``guide_model`` (a model file of the same formulation, schedule, image shape
    and classes: an early snapshot, a smaller net) replaces it; otherwise ``class_labels`` give
    classifier-free guidance. ``guidance_scale`` is the weight w of the guidance that runs
    (None: the carried guide's own, or the model file's ``[sample]`` setting; 1 = none);
    ``guidance_interval`` = (lo, hi) guides only at noise levels sigma in [lo, hi] (None: the
    model file's setting where its guidance is the same kind, else every level).

    ``class_labels``: None (unconditional; a
    class-conditional model then gets its "no label" class), one label for every image, a tuple
    cycled over the images (image i gets ``labels[i % len]``), or ``"all"`` (image i gets class
    ``i % num_classes``). ``device``: None = CUDA when available (each process its own GPU), else
    the CPU. ``precision``: the network runs under ``torch.autocast`` in fp16/bf16 (the step
    rules and the start noise stay float32); None = bf16 on a GPU, fp32 elsewhere.
    ``batch_size``: None = 64 on the CPU; on a GPU as many images as its free memory holds
    (measured with one small forward pass). ``compile``: ``torch.compile`` the network;
    ``channels_last``: run it on channels-last weights and activations.

    A latent model (trained with ``[vae]``) is sampled in its VAE's latent space and decoded to
    images by the VAE its file records (``vae``: a local copy of that same VAE, checked by its
    hashes); ``save_latents`` also writes each image's latent (``000000.safetensors``, the
    unscaled z the VAE decodes). Init images are encoded and masks min-pooled to the latent grid
    (:meth:`~diffunet.data_space.LatentSpace.state_mask`).

    A model with a condition image (``unet.cond_channels``; trained with ``data.task``) needs
    ``cond_image``: a file, or a folder whose sorted images are inputs 0..K-1, each drawn
    ``per_input`` times (image i from input ``i // per_input``, seed + i). A superres model
    takes its low-resolution inputs (side / ``superres_factor``, upscaled bicubically as in
    training), a colorize model grayscale images of its size; nothing else is resized.
    ``guidance_scale`` is then classifier-free guidance on the condition (it drops the image).
    """

    num_samples: Optional[int] = None
    batch_size: Optional[int] = None
    seed: int = 0
    class_labels: ClassLabels = None
    grid: bool = True
    precision: Optional[str] = None
    device: Optional[str] = None
    overwrite: bool = False
    compile: bool = False
    channels_last: bool = False
    sampler: Optional[str] = None
    num_steps: Optional[int] = None
    eta: Optional[float] = None
    spacing: Optional[str] = None
    sigmas: Optional[str] = None
    rho: Optional[float] = None
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmin: Optional[float] = None
    s_tmax: Optional[float] = None
    s_noise: Optional[float] = None
    guidance_scale: Optional[float] = None
    guidance_interval: Optional[tuple[float, float]] = None
    guide_model: Optional[Union[str, os.PathLike]] = None
    no_guide: bool = False
    clip_x0: Optional[bool] = None
    init_image: Optional[Union[str, os.PathLike]] = None
    mask: Optional[Union[str, os.PathLike]] = None
    strength: Optional[float] = None
    resample: int = 1
    vae: Optional[Union[str, os.PathLike]] = None
    save_latents: bool = False
    cond_image: Optional[Union[str, os.PathLike]] = None
    per_input: int = 1

    def __post_init__(self) -> None:
        for name, flag in (("num_samples", "--num-samples"), ("batch_size", "--batch-size")):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise UsageError(f"{flag} must be a positive integer, got {value!r}")
        _check_count(self.num_samples or DEFAULT_NUM_SAMPLES)
        check_sampling(_FLAGS, sampler=self.sampler, num_steps=self.num_steps, eta=self.eta,
                       spacing=self.spacing, guidance_scale=self.guidance_scale,
                       guidance_interval=self.guidance_interval, sigmas=self.sigmas, rho=self.rho, s_churn=self.s_churn,
                       s_tmin=self.s_tmin, s_tmax=self.s_tmax, s_noise=self.s_noise,
                       sigma_min=self.sigma_min, sigma_max=self.sigma_max, error=UsageError)
        _check_seed(self.seed, self.num_samples or DEFAULT_NUM_SAMPLES)
        self._check_editing()
        self._check_condition()
        labels = self.class_labels
        def one(v: Any) -> bool:
            return _is_int(v) or (isinstance(v, str) and bool(v))

        ok = (labels is None or one(labels)
              or (isinstance(labels, tuple) and labels and all(one(v) for v in labels)))
        if not ok:
            raise UsageError(f"--class-label must be a class index or name, a list of them or "
                             f"'all', got {labels!r}")
        if self.guidance_scale not in (None, 1.0) and labels is None and \
                self.guide_model is None and self.no_guide and self.cond_image is None:
            raise UsageError(_NEEDS_GUIDANCE.format(self.guidance_scale))
        if not isinstance(self.no_guide, bool):
            raise UsageError(f"no_guide must be True or False, got {self.no_guide!r}")
        if self.guide_model is not None and self.guidance_scale == 1.0:
            raise UsageError(_POINTLESS_GUIDE)
        if self.guidance_interval is not None and self.guidance_scale == 1.0:
            raise UsageError(_POINTLESS_INTERVAL)
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}; use --precision with one of "
                             f"{', '.join(PRECISIONS)}")

    def _check_editing(self) -> None:
        if self.init_image is None:
            # (--mask with --cond-image: the holes an inpaint model fills, _cond_settings)
            for name, flag in (("mask", "--mask"), ("strength", "--strength")):
                if getattr(self, name) is not None and not (name == "mask"
                                                            and self.cond_image is not None):
                    raise UsageError(f"{flag} needs --init-image (the image to edit); give "
                                     f"--init-image PATH_OR_FOLDER or drop {flag}")
        s = self.strength
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))
                              or not 0.0 < s <= 1.0):
            raise UsageError(f"--strength must be in (0, 1] (how much of the noise schedule the "
                             f"init image is noised through; 1 = all of it), got {s!r}")
        r = self.resample
        if not _is_int(r) or r < 1:
            raise UsageError(f"--resample must be a positive integer (1 = no resampling), got "
                             f"{r!r}")
        if r > MAX_RESAMPLE:
            raise UsageError(f"--resample {r} is more than {MAX_RESAMPLE} repeats of each step "
                             "(each one more network call per step; RePaint used 10)")
        if r > 1 and (self.mask is None or self.init_image is None):
            raise UsageError(f"--resample {r} repeats inpainting steps (RePaint); it needs "
                             "--mask (and --init-image)")
        _check_resample(r, self.sampler)

    def _check_condition(self) -> None:
        p = self.per_input
        if not _is_int(p) or not 1 <= p <= MAX_SAMPLES:
            raise UsageError(f"--per-input must be a positive integer (images drawn from each "
                             f"--cond-image input), got {p!r}")
        if self.cond_image is None:
            if p != 1:
                raise UsageError("--per-input needs --cond-image (the inputs to draw from); "
                                 "give --cond-image PATH_OR_FOLDER or drop --per-input")
            return
        if self.num_samples is not None:
            raise UsageError("--num-samples with --cond-image: a conditional run draws "
                             "--per-input N images from each input; drop --num-samples")
        if self.init_image is not None:
            raise UsageError("--init-image with --cond-image: editing a conditional model's "
                             "samples is not built yet; drop one of them")

    @property
    def resolved_strength(self) -> float:
        """``strength``, or its default: :data:`IMG2IMG_STRENGTH`, 1 with a mask."""
        if self.strength is not None:
            return float(self.strength)
        return 1.0 if self.mask is not None else IMG2IMG_STRENGTH


_NEEDS_GUIDANCE = ("--guidance-scale {} needs --class-label (classifier-free guidance steers "
                   "towards a class), --guide-model (autoguidance) or a model file that "
                   "carries a guide (diffunet info shows it); give one or use --guidance-scale 1")
_POINTLESS_GUIDE = ("--guide-model with guidance scale 1 changes nothing (D_guide + 1 (D - "
                    "D_guide) = D); give --guidance-scale W above 1 (Karras et al. 2024 use 2 "
                    "to 3) or drop --guide-model")
_POINTLESS_INTERVAL = ("--guidance-interval limits guidance, and guidance scale 1 is none; give "
                       "--guidance-scale W (with --class-label or --guide-model) or drop "
                       "--guidance-interval")


def _check_count(n: int) -> None:
    if n > MAX_SAMPLES:
        raise UsageError(f"--num-samples {n} is more than {MAX_SAMPLES:,} images for one folder; "
                         "draw them into several --out-dir folders (with --seed offsets)")


def _check_seed(seed: Any, n: int) -> None:
    if not _is_int(seed) or not 0 <= seed < 2**63 - n:
        raise UsageError(f"--seed must be a non-negative integer below 2**63 - num_samples, "
                         f"got {seed!r}")


def _check_resample(resample: int, sampler: Optional[str]) -> None:
    if resample > 1 and sampler in MULTISTEP_SAMPLERS:
        raise UsageError(f"--resample {resample} needs a one-step sampler "
                         f"({', '.join(ONE_STEP_SAMPLERS)}); {sampler} builds each step on the "
                         "ones before it (RePaint cannot repeat one alone)")


GuidanceKind = Literal["auto", "carried", "cfg"]


def guidance_kind(meta: dict[str, Any], options: SampleOptions) -> Optional[GuidanceKind]:
    """Which guidance ``diffunet sample`` runs on the model file whose metadata is ``meta``:
    ``"auto"``, autoguidance by ``options.guide_model``; else ``"carried"``, autoguidance by the
    guide the file carries (its ``guide`` metadata: the run's own earlier EMA, Karras et al.
    2024) unless ``options.no_guide``; else ``"cfg"``, classifier-free guidance, with class
    labels; else None. Autoguidance comes before classifier-free guidance: a
    class-conditional model that carries a guide autoguides (with its labels) unless
    ``no_guide``."""
    if options.guide_model is not None:
        return "auto"
    if isinstance(meta.get("guide"), dict) and not options.no_guide:
        return "carried"
    return ("cfg" if options.class_labels is not None or options.cond_image is not None
            else None)


def sample_settings(meta: dict[str, Any], options: SampleOptions) -> SampleConfig:
    """How ``diffunet sample`` samples the model file whose metadata is ``meta``: the file's
    ``[sample]`` settings (written by ``diffunet train``: what its previews used; else
    :class:`~diffunet.config.SampleConfig`'s defaults) with the ones ``options`` gives in their
    place. ``guidance_scale`` comes out as the weight of the guidance that runs
    (:func:`guidance_kind`): a carried guide's is its recorded ``scale`` unless
    ``options.guidance_scale`` is given, eased at few steps
    (:func:`~diffunet.guidance.carried_guide_weight`: half the guidance at 10 steps, none at 5),
    and that of a ``guide_model`` that replaces it is the recorded ``scale`` as it is.
    The stored guidance (scale and interval) applies only to guidance of the same kind:
    classifier-free (the file's ``guide_model`` unset and no carried guide) with class labels,
    the carried guide's interval with the carried guide, autoguidance (``guide_model`` set)
    with ``guide_model``; the file's own ``guide_model`` path is never used. Another sampler
    than the stored one drops the stored ``eta`` and S_churn settings (they were the other
    sampler's), another grid than ``karras`` the stored ``rho``, a uniform grid the stored
    ``sigma_min``/``sigma_max``."""
    stored = meta.get("run_config")
    stored = stored.get("sample") if isinstance(stored, dict) else None
    try:
        base = from_dict(SampleConfig, stored, "sample") if isinstance(stored, dict) else None
    except ConfigError:
        base = None  # informational metadata from another diffunet version: use the defaults
    settings = to_dict(base if base is not None else SampleConfig())
    carried = meta.get("guide") if isinstance(meta.get("guide"), dict) else None
    # the stored guidance_scale is classifier-free guidance's, or guide_model's when that is
    # set; the stored interval limited the previews' guidance, whichever ran: guide_model's,
    # else the carried guide's (train.guide_at) or classifier-free guidance's
    auto = settings["guide_model"] is not None
    kind = guidance_kind(meta, options)
    if kind != ("auto" if auto else "cfg"):  # the stored weight is another kind's
        settings["guidance_scale"] = 1.0
    if kind is None or (kind == "auto") != auto:  # the stored interval too
        settings["guidance_interval"] = None
    if kind == "carried":
        assert carried is not None
        settings["guidance_scale"] = float(carried["scale"])  # the file's own weight for it
    elif kind == "auto" and carried is not None and not auto:
        # --guide-model replaces the carried guide, not its weight
        settings["guidance_scale"] = float(carried["scale"])
    settings["guide_model"] = None  # a path from the training machine: never used here
    given = {k: getattr(options, k) for k in (*_FLAGS, "clip_x0")
             if getattr(options, k) is not None}
    if kind == "carried" and carried is not None and "guidance_scale" not in given:
        # the recorded weight, eased at few steps (5 or fewer: 1, unguided;
        # guidance.carried_guide_weight); a --guide-model in its place keeps it as it is
        settings["guidance_scale"] = carried_guide_weight(
            float(carried["scale"]), given.get("num_steps", settings["num_steps"]))
    if kind is None and given.get("guidance_scale", 1.0) != 1.0:
        raise UsageError(_NEEDS_GUIDANCE.format(given["guidance_scale"]))
    if kind == "carried" and given.get("guidance_scale", 1.0) < 0:
        # the carried guide's weight obeys sample.guide_scale's rule, whichever sets it
        raise UsageError(f"--guidance-scale for the carried guide must be 0 or more (1 = "
                         f"unguided, Karras et al. 2024 use 2 to 3), got {given['guidance_scale']}")
    if given.get("s_tmax") == math.inf:
        given["s_tmax"] = None  # no upper limit
    if given.get("guidance_scale", settings["guidance_scale"]) == 1.0 and \
            "guidance_interval" not in given:
        settings["guidance_interval"] = None  # guidance switched off: its stored interval too
    if options.guide_model is not None and given.get("guidance_scale",
                                                     settings["guidance_scale"]) == 1.0:
        raise UsageError(_POINTLESS_GUIDE)
    defaults = to_dict(SampleConfig())
    if given.get("sampler", settings["sampler"]) != settings["sampler"]:
        for key in ("eta", "sigmas", *_CHURN):  # the stored sampler's, not the new one's
            if key not in given:
                settings[key] = defaults[key]
    if given.get("sigmas", "karras") != "karras" and "rho" not in given:
        settings["rho"] = defaults["rho"]
    settings.update(given)
    uniform = preview_grid(_stored_formulation(meta), settings["sampler"],
                           settings["sigmas"]) == "uniform"
    for key in _RANGE:
        if uniform and key in given:
            whose = "" if "sampler" in given else " (this model file's [sample] sampler)"
            raise UsageError(f"{_FLAGS[key]} only applies to the karras and exponential grids, "
                             f"and {settings['sampler']}{whose} runs on uniform timesteps here; "
                             f"add --sigmas karras (or exponential) or drop {_FLAGS[key]}")
        if uniform:
            settings[key] = None  # the stored range was for the stored grid
    check_sampling(_FLAGS, **{k: settings[k] for k in ("sampler", "eta", "sigmas", "rho",
                                                       *_RANGE, *_CHURN)}, error=UsageError)
    if settings["guidance_interval"] is not None:
        if settings["guidance_scale"] == 1.0:
            raise UsageError(_POINTLESS_INTERVAL)
        settings["guidance_interval"] = tuple(float(v) for v in settings["guidance_interval"])
    return SampleConfig(**settings)


def _stored_formulation(meta: dict[str, Any]) -> type[Formulation]:
    """The formulation class of the model file whose metadata is ``meta`` (a file without a
    readable schedule config is taken as the default, VP, as older files are)."""
    stored = meta.get("schedule_config")
    try:
        cfg = from_dict(ScheduleConfig, stored, "schedule") if isinstance(stored, dict) \
            else ScheduleConfig()
    except ConfigError:
        cfg = ScheduleConfig()
    return formulation_class(cfg.formulation)


@dataclass(frozen=True)
class SampleResult:
    """What :func:`generate` did (as seen from the calling process)."""

    out_dir: Path
    num_samples: int
    drawn: tuple[int, ...]
    """Indices of the images this process drew in this call."""
    already_done: int
    """Images that were on disk before this call (skipped by every process)."""
    grid_path: Optional[Path]
    manifest_path: Path
    files: tuple[Path, ...] = field(default=(), repr=False)
    """All ``num_samples`` image paths, in order."""


# ---------------------------------------------------------------------------------------------
# Helpers


def _fill_batch(net: torch.nn.Module, shape: tuple[int, int, int], device: torch.device,
                autocast: Any, guided: bool, cap: int) -> int:
    """How many images a sampling batch on GPU ``device`` should hold: its free memory over
    what one image's forward pass takes (measured on a batch of 4; twice that with guidance),
    with a margin, as a power of two from 1 to 4096, at most ``cap``."""
    probe = 4
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    x = torch.zeros((probe * (2 if guided else 1), *shape), device=device)
    t = torch.zeros(x.shape[0], dtype=torch.long, device=device)
    with torch.no_grad(), autocast:
        net(x, t) if net.config.num_classes is None else net(x, t, class_labels=t)
    per_image = max(1, (torch.cuda.max_memory_allocated(device) - base) // probe)
    free, _ = torch.cuda.mem_get_info(device)
    fits = max(1, int(0.6 * free) // per_image)
    return max(1, min(cap, 4096, 2 ** (fits.bit_length() - 1)))


def _save(folder: FolderWriter, name: str, image: torch.Tensor) -> None:
    folder.save_image(name, tensor_image(image))


def _save_latent(folder: FolderWriter, name: str, latent: torch.Tensor) -> None:
    folder.write_file(name, tensor_file_bytes({"latent": latent.contiguous()}, {}))


class _Writer:
    """PNG encoding and writing off the critical path: a few threads (zlib releases the GIL)
    write the images of one batch into ``folder`` while the device draws the next. At most two
    batches wait; a failed write is raised at the next batch or at :meth:`close`."""

    def __init__(self, folder: FolderWriter) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._folder = folder
        self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
        self._pending: list[Any] = []

    def submit(self, images: torch.Tensor, names: list[str],
               latents: Optional[torch.Tensor] = None) -> None:
        """Write ``images`` (B, C, H, W) in [-1, 1] on the CPU as ``names`` in the folder (and
        ``latents`` (B, c, h, w) beside them, as :func:`latent_name` of each)."""
        jobs = [self._pool.submit(_save, self._folder, name, im)
                for im, name in zip(images, names)]
        if latents is not None:
            jobs += [self._pool.submit(_save_latent, self._folder, latent_name(name), z)
                     for z, name in zip(latents, names)]
        self._pending.append(jobs)
        while len(self._pending) > 2:
            for future in self._pending.pop(0):
                future.result()

    def close(self) -> None:
        try:
            for batch in self._pending:
                for future in batch:
                    future.result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _autocast(precision: str, device: torch.device) -> Any:
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type == "cpu":
        raise UsageError("--precision fp16 is not supported on the CPU; use --precision bf16 or "
                         "fp32 there (or a CUDA --device)")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def _image_labels(spec: ClassLabels, num_classes: Optional[int], n: int) -> Optional[list[int]]:
    """Per-image labels for images 0..n-1, or None (unconditional)."""
    if spec is None:
        return None
    if num_classes is None:
        raise UsageError("--class-label was given but this model is unconditional (its "
                         "unet.num_classes is not set); drop --class-label")
    if spec == "all":
        return [i % num_classes for i in range(n)]
    values = (spec,) if _is_int(spec) else tuple(spec)
    for v in values:
        if not 0 <= v < num_classes:
            raise UsageError(f"class label {v} is out of range: this model has {num_classes} "
                             f"classes, 0 to {num_classes - 1}")
    return [values[i % len(values)] for i in range(n)]


def class_rows(images: list[torch.Tensor], labels: list[int]) -> tuple[torch.Tensor, int]:
    """Grid tiles (N, C, H, W) with one class per row and the row length: ``images`` (each
    (C, H, W)) grouped by their ``labels``, classes in index order, each row in file order,
    shorter rows filled with blank tiles (0.0, the grid's grey). ``--class-label all`` grids."""
    rows: dict[int, list[torch.Tensor]] = {}
    for image, k in zip(images, labels):
        rows.setdefault(k, []).append(image)
    width = max(len(row) for row in rows.values())
    blank = torch.zeros_like(images[0])
    tiles = [tile for k in sorted(rows) for tile in rows[k] + [blank] * (width - len(rows[k]))]
    return torch.stack(tiles), width


def _labels_spec(spec: ClassLabels) -> Any:
    """The labels setting as JSON (what identifies the run; per-image labels are derived)."""
    if spec is None or spec == "all":
        return spec
    return [spec] if _is_int(spec) else list(spec)


_SETTINGS_BEFORE = {"sigmas": "uniform", "rho": 7.0, "sigma_min": None, "sigma_max": None,
                    "guide_model_sha256": None, "guidance_interval": None,
                    "s_churn": 0.0, "s_tmin": 0.0,
                    "s_tmax": None, "s_noise": 1.0, "init_images": None, "masks": None,
                    "strength": None, "resample": 1, "vae_weights_sha256": None,
                    "cond_images": None, "per_input": 1, "cond_masks": None}
"""What a manifest written before these settings existed drew its images with (so such a
folder still resumes)."""


def _inputs_difference(key: str, was: Any, now: Any) -> str:
    """One line for a change of the ``init_images``/``masks`` SHA-256 lists."""
    what = {"init_images": "init image", "masks": "mask", "cond_masks": "condition mask"
            }.get(key, "condition image")
    if not isinstance(was, list) or not isinstance(now, list):
        def count(v: Any) -> str:
            return f"{len(v)} {what}(s)" if isinstance(v, list) else f"no {what}s"
        return f"{count(was)} there, {count(now)} now"
    if len(was) != len(now):
        return f"{len(was)} {what}(s) there, {len(now)} now"
    i = next(i for i, (a, b) in enumerate(zip(was, now)) if a != b)
    return f"{what} {i} sha256 {str(was[i])[:12]}... there, {str(now[i])[:12]}... now"


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between the identifying parts of two manifests."""
    diffs = []
    old_sha = (old.get("model") or {}).get("sha256")
    if old_sha != new["model"]["sha256"]:
        diffs.append(f"model file sha256 {str(old_sha)[:12]}... there, "
                     f"{new['model']['sha256'][:12]}... now")
    old_settings = old.get("settings") or {}
    for key, value in new["settings"].items():
        was = old_settings.get(key, _SETTINGS_BEFORE.get(key, "<missing>"))
        if was == value:
            continue
        if key in ("init_images", "masks", "cond_images", "cond_masks"):
            diffs.append(_inputs_difference(key, was, value))
        else:
            diffs.append(f"{key} {json.dumps(was)} there, {json.dumps(value)} now")
    # the same settings on another release's default grid (an unset sigma_max under a later
    # default range) are other levels, so other images
    was, now = old.get("sigma_grid"), new.get("sigma_grid")
    if not diffs and isinstance(was, list) and not _same_levels(was, now):
        diffs.append(f"sigma_grid {_levels(was)} there, {_levels(now)} now: the same "
                     "settings on an earlier release's default grid")
    return diffs


def _same_levels(was: list, now: Any) -> bool:
    """The two grids' levels agree (to 1e-9 relative: float rounding of another machine)."""
    return isinstance(now, list) and len(was) == len(now) and all(
        isinstance(a, (int, float)) and not isinstance(a, bool)
        and math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0) for a, b in zip(was, now))


def _levels(levels: list) -> str:
    """A manifest's sigma grid in a few characters: its first two levels and its length."""
    head = ", ".join(f"{v:.6g}" if isinstance(v, (int, float)) else "?" for v in levels[:2])
    return f"[{head}, ...] ({len(levels)} levels)"


_MANIFEST_SCHEMA = {"model": {"sha256": str}, "settings": dict}
# A manifest lists every image: ~25 bytes each with its label, at most MAX_SAMPLES of them.
_MANIFEST_MAX_BYTES = (16 << 20) + 32 * MAX_SAMPLES


def _legacy_files(old: dict[str, Any]) -> list[str]:
    """The files a manifest from before manifests listed them stands for: its images, grid."""
    n = old.get("num_samples")
    if not _is_int(n) or not 0 <= n <= MAX_SAMPLES:
        raise ValueError(f"num_samples: expected an integer from 0 to {MAX_SAMPLES:,}")
    return [image_name(i) for i in range(n)] + [GRID]


def _claim(out_dir: Path, manifest: dict[str, Any], inputs: list[str | os.PathLike], n: int,
           options: SampleOptions, tell: Callable[[str], None]) -> OutputFolder:
    """Lock and check ``out_dir`` (:func:`~diffunet.outputs.claim_folder`; ``inputs``, the
    model file and any init images and masks, are never written over), refuse samples from
    other settings unless overwrite (which then removes this command's earlier files), and
    write the manifest listing every file this run may write. Main process only."""
    planned = [image_name(i) for i in range(n)] + ([GRID] if options.grid else []) + (
        [latent_name(image_name(i)) for i in range(n)] if options.save_latents else [])
    claim = claim_folder(out_dir, command="sample", manifest=MANIFEST, format=MANIFEST_FORMAT,
                         format_version=MANIFEST_VERSION, planned=planned, inputs=inputs,
                         overwrite=options.overwrite, schema=_MANIFEST_SCHEMA,
                         legacy_files=_legacy_files, noun="sample images",
                         max_bytes=_MANIFEST_MAX_BYTES)
    try:
        if claim.previous is not None and not options.overwrite:
            diffs = _differences(claim.previous, manifest)
            if diffs:
                raise FolderError(f"{out_dir} holds samples made with other settings ("
                                  + "; ".join(diffs[:3]) + "); rerun with those settings to "
                                  "resume, pass --overwrite to replace them, or choose another "
                                  "--out-dir")
        claim.remove_leftovers()  # of writes that a killed run never finished
        if options.overwrite:
            removed = claim.remove(claim.listed) + (claim.previous is not None)
            if removed:
                tell(f"--overwrite: removed {removed} earlier output file(s) from {out_dir}")
        # what is kept of an earlier run with the same settings (e.g. more images) stays listed
        kept = [name for name in claim.listed if name in claim.present]
        claim.write_manifest(manifest, kept + planned)
    except BaseException:
        claim.close()
        raise
    return claim


def _same_outcome(state: Any, error: Optional[BaseException]) -> None:
    """Raise on every process if the main process's folder claim failed (and the main
    process's own error there): the others would otherwise wait for it forever."""
    if state.num_processes == 1:
        if error is not None:
            raise error
        return
    from accelerate.utils import gather_object

    reports = gather_object([None if error is None else (type(error).__name__, str(error))])
    if error is not None:
        raise error
    for report in reports:
        if report is not None:
            cls = getattr(errors, report[0], None)
            if isinstance(cls, type) and issubclass(cls, errors.DiffunetError):
                raise cls(report[1])
            raise RuntimeError(f"the main process failed: {report[0]}: {report[1]}")


def _load_png(folder: FolderWriter, name: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """A PNG written by this command into ``folder`` back as a (C, H, W) float tensor in
    [-1, 1] (exact), read relative to the folder's descriptor (never through a link)."""
    c, h, w = shape
    path = folder.folder / name
    wrong = DataError(f"{path} is not a {w}x{h} {'grayscale' if c == 1 else 'RGB'} image as "
                      "this model makes; delete it and rerun the same command to redraw it")
    try:
        with folder.open_file(name) as (f, _), image_header(f, name=str(path)) as img:
            if img.size != (w, h):  # checked before decoding: a planted file may be huge
                raise wrong
            arr = np.asarray(img)
    except DataError:
        raise
    except Exception as e:  # PIL raises several types for damaged files
        raise DataError(f"cannot read {path} ({e}); delete it and rerun the same command to "
                        "draw it again") from None
    arr = arr[..., None] if arr.ndim == 2 else arr
    if arr.shape != (h, w, c) or arr.dtype != np.uint8:
        raise wrong
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# The command


@dataclass(frozen=True)
class _Edit:
    """An editing run's inputs and settings, as :func:`_draw_batch` needs them."""

    inputs: EditInputs
    strength: float
    resample: int


def _draw_batch(network: Any, schedule: Any, how: SampleConfig, idx: list[int], seed: int,
                shape: tuple[int, int, int], labels: Optional[list[int]], device: torch.device,
                autocast: Any, writer: _Writer, on_step: Optional[Callable[[int], None]] = None,
                edit: Optional[_Edit] = None, guide: Any = None,
                space: DataSpace = PixelSpace(), save_latents: bool = False,
                condition: Optional[_Condition] = None) -> None:
    """Draw images ``idx`` together and hand them to ``writer``. One CPU generator per image
    gives its start noise and then its step noise (see the module doc); an editing run's image
    i also starts from init image ``i % K`` (and its mask). ``on_step(i)`` is called after each
    sampling step i (it drives the progress bar); ``guide``: the autoguidance network. The
    states are decoded to images by the data ``space`` (latents: the VAE, also saved with
    ``save_latents``)."""
    gens = [torch.Generator().manual_seed(seed + i) for i in idx]
    x_T = torch.stack([torch.randn(shape, generator=g) for g in gens])
    y = None if labels is None else torch.tensor([labels[i] for i in idx], device=device)
    kwargs = how.sample_kwargs()
    if edit is not None:
        init, keep = edit.inputs.batch(idx)  # pixels: the states' by the data space
        kwargs.update(init_image=space.encode(init.to(device)), strength=edit.strength,
                      mask=None if keep is None else space.state_mask(keep.to(device)),
                      resample=edit.resample)
    with autocast:
        cond = {} if condition is None else {"cond_image": condition.batch(idx).to(device)}
        states = sample(network, schedule, x_T.to(device), class_labels=y, cond=cond,
                        generator=gens,
                        callback=None if on_step is None else lambda i, *_: on_step(i),
                        guide_model=guide, **kwargs)
        images = space.decode(states)
        if condition is not None:  # inpaint: the input's kept pixels as they are
            images = finished(condition.task, images, cond["cond_image"])
    latents = space.unscale(states.float()).cpu() if save_latents else None
    writer.submit(images.float().cpu(), [image_name(i) for i in idx], latents)


def _edit_settings(o: SampleOptions, how: SampleConfig, shape: tuple[int, int, int]
                   ) -> tuple[Optional[_Edit], str]:
    """An editing run's checked inputs and settings (None without ``--init-image``) and the line
    that says what it will do."""
    if o.init_image is None:
        return None, ""
    _check_resample(o.resample, how.sampler)  # the sampler may be the model file's
    strength = o.resolved_strength
    if int(how.num_steps * strength) < 1:
        raise UsageError(f"--strength {strength} with {how.num_steps} steps leaves no step "
                         f"to run (int({how.num_steps} x {strength}) = 0); raise --strength "
                         "or --steps")
    edit = _Edit(load_edit_inputs(o.init_image, o.mask, channels=shape[0], size=shape[1]),
                 strength, o.resample)
    k, run = edit.inputs.count, int(how.num_steps * strength)
    masks = "" if o.mask is None else (", inpainting (white = repaint, black = keep"
                                        + (f", resample {o.resample})" if o.resample > 1
                                           else ")"))
    return edit, (f"editing {k} init image{'s' if k > 1 else ''}: strength {strength}, the "
                  f"last {run} of {how.num_steps} steps{masks}")


@dataclass(frozen=True)
class _Condition:
    """A conditional run's condition images (``--cond-image``), as :func:`_draw_batch` needs
    them: output image i is drawn from input ``i // per_input``."""

    inputs: EditInputs
    per_input: int
    task: Optional[str]
    size: int
    """The model's image side: a superres input is upscaled to it."""

    def batch(self, idx: list[int]) -> torch.Tensor:
        """The condition images (B, cond_channels, S, S) in [-1, 1] of output images ``idx``."""
        images, keep = self.inputs.batch([i // self.per_input for i in idx])
        if self.task == "inpaint":  # the image with its holes, and the mask (tasks.py)
            return condition_image("inpaint", images, keep=keep)
        return upscale(images, self.size) if images.shape[-1] != self.size else images


def _cond_settings(o: SampleOptions, cfg: Any, meta: dict[str, Any], space: DataSpace
                   ) -> tuple[Optional[_Condition], str]:
    """A conditional run's checked condition images (None for a model without them) and the
    line that says what it will do. One line for a conditional model without ``--cond-image``,
    ``--cond-image`` on a model without a condition, and inputs of another size or mode."""
    c, size = cfg.cond_channels, cfg.image_size
    name, factor = recorded_task(meta, size) or (None, 1)
    low = size // factor if name == "superres" else size
    what = {"superres": f"{low}x{low} low-resolution {'RGB' if c == 3 else 'grayscale'} images "
                        f"(it upscales them x{factor})",
            "colorize": f"{size}x{size} grayscale images (it colours them)",
            "inpaint": f"{size}x{size} {'RGB' if c == 4 else 'grayscale'} images, and --mask "
                       "(white = fill)",
            "paired": f"{size}x{size} {'RGB' if c == 3 else 'grayscale'} input images"}.get(
                name or "", f"{size}x{size} {c}-channel condition images")
    if not c:
        if o.cond_image is not None:
            raise UsageError("--cond-image: this model takes no condition image "
                             "(unet.cond_channels is 0); drop --cond-image")
        return None, ""
    if o.cond_image is None:
        raise UsageError(f"this model draws from a condition image (unet.cond_channels {c}"
                         + (f", task {name}" if name else "") + f"): give --cond-image "
                         f"PATH_OR_FOLDER, {what}")
    if space.record() is not None:
        raise UsageError("--cond-image on a latent model is not built yet")
    if name == "inpaint" and o.mask is None:
        raise UsageError(f"this inpaint model fills the holes a mask marks: give --mask "
                         f"MASK_OR_FOLDER ({size}x{size}, white = fill, black = keep) with "
                         "--cond-image")
    if name != "inpaint" and o.mask is not None:
        raise UsageError(f"--mask: this model's task is {name or 'unrecorded'}, which takes no "
                         "mask (only an inpaint model does); drop --mask")
    inputs = load_edit_inputs(o.cond_image, o.mask, channels=c - (name == "inpaint"),
                              size=low, flag="--cond-image")
    k = inputs.count
    note = (f"conditional: {k} input{'s' if k > 1 else ''} ({what}), {o.per_input} "
            f"image{'s' if o.per_input > 1 else ''} from each")
    return _Condition(inputs, o.per_input, name, size), note


def generate(model_path: str | os.PathLike, out_dir: str | os.PathLike,
             options: SampleOptions = SampleOptions(), *, progress: bool = False,
             say: Optional[Callable[[str], None]] = None) -> SampleResult:
    """Draw ``options.num_samples`` images from the model file into ``out_dir`` (or edit the
    ``options.init_image`` images: see :class:`SampleOptions`).

    Writes ``000000.png`` ..., ``grid.png`` (unless ``options.grid`` is False) and
    ``manifest.json``; skips images already on disk from the same settings (resume). Under
    ``accelerate launch`` the images are split across the processes. ``progress`` shows a tqdm
    bar of images (main process); ``say`` receives one-line status messages (main process).
    Raises :class:`~diffunet.errors.DiffunetError` subclasses for bad input.
    """
    from accelerate import PartialState  # Accelerate's other home is the run harness

    # As Accelerator does, ACCELERATE_USE_CPU=1 (set by `accelerate launch --cpu`) joins the
    # processes on the CPU (gloo); so does asking for the CPU outright.
    state = PartialState(cpu=cpu_requested() or options.device == "cpu")
    main = state.is_main_process
    refuse_lone_processes(state.num_processes, "draw every image alone", "sample")
    tell = say if (say is not None and main) else (lambda msg: None)
    out_dir = Path(out_dir)
    o = options
    if out_dir.exists() and not out_dir.is_dir():
        raise FolderError(f"--out-dir {out_dir} is a file, not a folder; choose another --out-dir")
    # Under `accelerate launch --cpu` (or ACCELERATE_USE_CPU=1) the processes share the CPU.
    device = (torch.device("cpu") if o.device is None and state.device.type == "cpu"
              else pick_device(o.device, state.local_process_index))
    precision = o.precision or ("bf16" if device.type == "cuda" else "fp32")
    autocast = _autocast(precision, device)

    loaded = load_diffusion_file(model_path)
    net, schedule, meta = loaded.net, loaded.schedule, loaded.metadata
    assert schedule is not None
    # pixels, or the VAE the file records (loaded now: a missing or other VAE is one line
    # before the folder is touched)
    space = model_space(meta, None if o.vae is None else str(o.vae), device)
    how = sample_settings(meta, o)
    how = dataclasses.replace(how, clip_x0=space.clip_x0(how.clip_x0))  # latents: no clip
    kind = guidance_kind(meta, o)
    T = schedule.config.num_train_timesteps
    if schedule.discrete_timesteps and how.num_steps > T:
        raise UsageError(f"--steps {how.num_steps} is more than this model's {T} training "
                         f"timesteps; use 1 to {T}")
    grid_name = how.grid_for(schedule)
    if grid_name == "uniform" and not schedule.uniform_grid:
        raise UsageError(f"--sigmas uniform picks training timesteps, which this "
                         f"{schedule.title} model does not have (its noise level is "
                         "continuous); use --sigmas karras or exponential")
    check_sigma_range(schedule, how.sigma_min, how.sigma_max, _FLAGS)
    shape = (net.config.in_channels, net.config.image_size, net.config.image_size)  # states
    pixels = space.image_shape(shape)
    if pixels[0] not in (1, 3):
        raise UsageError(f"this model makes {pixels[0]}-channel images; diffunet sample writes "
                         "PNGs, which need 1 (grayscale) or 3 (RGB) channels")
    if o.save_latents and space.record() is None:
        raise UsageError("--save-latents: this is a pixel model (trained without a VAE); it "
                         "has no latents to save: drop --save-latents")
    edit, edit_note = _edit_settings(o, how, pixels)
    condition, cond_note = _cond_settings(o, net.config, meta, space)
    n = o.num_samples
    if n is None:
        folder = edit is not None and Path(o.init_image).is_dir()
        n = edit.inputs.count if folder else DEFAULT_NUM_SAMPLES
        if condition is not None:
            n = condition.inputs.count * condition.per_input
        _check_count(n)
        _check_seed(o.seed, n)
    native = schedule.native_levels(StepOptions(how.sampler, how.num_steps, spacing=how.spacing,
                                                s_churn=how.s_churn), grid_name)
    if native is not None:  # the formulation's own path and levels (VP: its timesteps)
        grid_record: dict[str, Any] = {native[0]: native[1]}
    else:
        grid_record = {"sigma_grid": make_sigmas(schedule, how.num_steps, grid_name,
                                                 rho=how.rho, spacing=how.spacing,
                                                 sigma_min=how.sigma_min,
                                                 sigma_max=how.sigma_max).tolist()}
    spec = resolve_class_labels(o.class_labels, meta.get("class_names")) \
        if net.config.num_classes is not None else o.class_labels
    labels = _image_labels(spec, net.config.num_classes, n)
    guide, guide_meta = None, None
    if o.guide_model is not None:  # refused here, before the folder is touched
        guide, guide_meta = load_guide_model(o.guide_model, net, schedule, model_path=model_path,
                                             model_meta=meta)
    elif kind == "carried" and how.guidance_scale != 1.0 and loaded.guide is not None:
        # the run's own earlier EMA, carried in the file (train.guide_at), verified on loading
        guide = loaded.guide.net
        guide_meta = {"sha256": meta["guide"]["sha256"], "step": loaded.guide.step,
                      "carried": True}
    del loaded
    net.to(device)
    if o.channels_last:
        net.to(memory_format=torch.channels_last)
    if guide is not None:
        guide.to(device)
        if o.channels_last:
            guide.to(memory_format=torch.channels_last)
    if o.batch_size is not None:
        batch_size = o.batch_size
        # A batch of images the device cannot hold must be one line, not an exhausted machine.
        per_call = min(batch_size, n) * (2 if how.guidance_scale != 1.0 else 1)
        check_fits(network_cost(net.config, schedule.config.table_timesteps, per_call), device,
                   f"--batch-size {batch_size} at {shape[1]}x{shape[2]}",
                   "lower --batch-size", UsageError)
    elif device.type == "cuda":
        batch_size = _fill_batch(net, shape, device, autocast, how.guidance_scale != 1.0, cap=n)
    else:
        batch_size = 64
    network = torch.compile(net, dynamic=False) if o.compile else net
    if guide is not None and o.compile:
        guide = torch.compile(guide, dynamic=False)

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "diffunet_version": __version__,
        "complete": False,
        "model": {"path": str(Path(model_path).resolve()), "sha256": meta["sha256"],
                  "step": meta.get("step")},
        "guide_model": None if guide_meta is None else {
            "path": (str(Path(o.guide_model).resolve()) if o.guide_model is not None
                     else "carried by the model file"),
            "sha256": guide_meta["sha256"], "step": guide_meta.get("step")},
        "unet_config": to_dict(net.config),
        "vae": space.record(),  # None: a pixel model
        "schedule_config": to_dict(schedule.config),
        # Everything that decides the pixels; a rerun must match it to resume.
        "settings": {"sampler": how.sampler, "num_steps": how.num_steps,
                     "eta": how.resolved_eta, "spacing": how.spacing, "sigmas": grid_name,
                     "rho": float(how.rho),
                     "sigma_min": None if how.sigma_min is None else float(how.sigma_min),
                     "sigma_max": None if how.sigma_max is None else float(how.sigma_max),
                     "s_churn": float(how.s_churn),
                     "s_tmin": float(how.s_tmin),
                     "s_tmax": None if how.s_tmax is None else float(how.s_tmax),
                     "s_noise": float(how.s_noise), "seed": o.seed,
                     "class_labels": _labels_spec(spec),
                     "guidance_scale": float(how.guidance_scale),
                     "guide_model_sha256": None if guide_meta is None else guide_meta["sha256"],
                     "guidance_interval": None if how.guidance_interval is None
                     else [float(v) for v in how.guidance_interval],
                     "precision": precision,
                     "clip_x0": how.clip_x0,
                     "init_images": None if edit is None else list(edit.inputs.init_sha256),
                     "masks": None if edit is None or not edit.inputs.mask_paths
                     else list(edit.inputs.mask_sha256),
                     "strength": None if edit is None else edit.strength,
                     "resample": 1 if edit is None else edit.resample,
                     "cond_images": None if condition is None
                     else list(condition.inputs.init_sha256),
                     "cond_masks": None if condition is None or not condition.inputs.mask_paths
                     else list(condition.inputs.mask_sha256),
                     "per_input": 1 if condition is None else condition.per_input,
                     # the VAE decodes the pixels: another one is other samples
                     "vae_weights_sha256": (space.record() or {}).get("weights_sha256")},
        **grid_record,
        "num_samples": n,
        "image_seeds": "image i (file i as 6 digits + .png) is drawn from seed + i",
        "edit": None if edit is None else _edit_record(edit, o, how.num_steps),
        "cond_images": None if condition is None else {
            "path": str(Path(o.cond_image).resolve()), "task": condition.task,
            "files": [str(p) for p in condition.inputs.init_paths],
            "masks": [str(p) for p in condition.inputs.mask_paths] or None,
            "per_input": condition.per_input,
            "image_inputs": "image i is drawn from input i // per_input"},
        "labels": labels,
        "grid": GRID if o.grid else None,
        "grid_images": min(n, MAX_GRID_IMAGES) if o.grid else 0,
        # informational only (they change float rounding, not the draws):
        "batch_size": batch_size,
        "device": device.type,
        "num_processes": state.num_processes,
    }
    # The main process locks and checks the folder and writes the manifest (listing every file
    # this run may write) before any image; the others learn whether that worked.
    claim: Optional[OutputFolder] = None
    error: Optional[BaseException] = None
    if main:
        try:
            inputs = [model_path] + ([] if o.guide_model is None else [o.guide_model]) + (
                [] if edit is None else [*edit.inputs.init_paths, *edit.inputs.mask_paths]) + (
                [] if condition is None else list(condition.inputs.init_paths))
            claim = _claim(out_dir, manifest, inputs, n, o, tell)
        except Exception as e:  # raised on every process by _same_outcome
            error = e
    _same_outcome(state, error)
    folder = None
    try:
        folder = _folder_on_every_process(state, claim, out_dir, n, o.grid)
        if edit is not None:
            tell(edit_note)  # once the folder is claimed: bad input stays a single line
        if condition is not None:
            tell(cond_note)
        return _draw_all(state, main, out_dir, manifest, claim, folder, n, o, how, network,
                         schedule, shape, labels, device, autocast, batch_size, progress, tell,
                         edit, guide, space, condition)
    finally:
        if folder is not None and folder is not claim:
            folder.close()
        if claim is not None:
            claim.close()


def _folder_on_every_process(state: Any, claim: Optional[OutputFolder], out_dir: Path, n: int,
                             grid: bool) -> FolderWriter:
    """The claimed output folder as each process writes into it: the main process's claim; the
    others open ``out_dir`` themselves and check it is the very folder the main process claimed
    (:func:`~diffunet.outputs.join_folder`). A process that cannot is an error on every one."""
    if state.num_processes == 1:
        assert claim is not None
        return claim
    from accelerate.utils import gather_object

    identity = gather_object([claim.identity if claim is not None else None])[0]
    folder: Optional[FolderWriter] = claim
    error: Optional[BaseException] = None
    if claim is None:
        try:
            folder = join_folder(out_dir, identity, [image_name(i) for i in range(n)]
                                 + ([GRID] if grid else []))
        except Exception as e:  # raised on every process by _same_outcome
            error = e
    try:
        _same_outcome(state, error)
    except BaseException:
        if folder is not None and folder is not claim:
            folder.close()
        raise
    assert folder is not None
    return folder


def _edit_record(edit: _Edit, o: SampleOptions, num_steps: int) -> dict[str, Any]:
    """The manifest's account of an editing run: which file made which image (the SHA-256s
    that must match to resume are in ``settings``)."""
    e = edit.inputs
    skipped = num_steps - int(num_steps * edit.strength)
    return {
        "init_image": str(Path(o.init_image).resolve()),
        "mask": None if o.mask is None else str(Path(o.mask).resolve()),
        "inputs": [{"init": str(p), "init_sha256": h,
                    **({"mask": str(e.mask_paths[k]), "mask_sha256": e.mask_sha256[k]}
                       if e.mask_paths else {})}
                   for k, (p, h) in enumerate(zip(e.init_paths, e.init_sha256))],
        "rule": f"image i starts from inputs[i mod {e.count}], noised with seed + i",
        "mask_convention": MASK_CONVENTION,
        "strength": edit.strength,
        "steps_run": num_steps - skipped,
        "steps_skipped": skipped,
        "resample": edit.resample,
    }


def _draw_all(state: Any, main: bool, out_dir: Path, manifest: dict[str, Any],
              claim: Optional[OutputFolder], folder: FolderWriter, n: int, o: SampleOptions,
              how: SampleConfig,
              network: Any, schedule: Any, shape: tuple[int, int, int],
              labels: Optional[list[int]], device: torch.device, autocast: Any,
              batch_size: int, progress: bool, tell: Callable[[str], None],
              edit: Optional[_Edit] = None, guide: Any = None,
              space: DataSpace = PixelSpace(),
              condition: Optional[_Condition] = None) -> SampleResult:
    """Draw the images not yet in the claimed folder, then the grid and the final manifest
    (the main process's ``claim``), every file through this process's ``folder``."""
    from tqdm.auto import tqdm

    manifest_path = out_dir / MANIFEST
    state.wait_for_everyone()
    names = [image_name(i) for i in range(n)]
    # a planted link under an image's name is redrawn (the write replaces the link itself)
    todo = [i for i in range(n) if not folder.is_plain_file(names[i]) or (
        o.save_latents and not folder.is_plain_file(latent_name(names[i])))]
    done_before = n - len(todo)
    # Every process has its to-do list before any of them writes an image: otherwise a fast
    # one's new files would shorten a slow one's list and the round-robin deal would differ.
    state.wait_for_everyone()
    if done_before:
        tell(f"resuming: {done_before} of {n} images are already in {out_dir}")
    mine = todo[state.process_index::state.num_processes]
    # The bar counts the main process's sampling steps (steps x its batches), so it moves and
    # shows an ETA from the first batch on; the postfix counts the images of every process.
    # an edit runs the last int(steps x strength) steps of the grid (diffusers' img2img rule)
    steps = how.num_steps if edit is None else int(how.num_steps * edit.strength)
    bar = tqdm(total=steps * math.ceil(len(mine) / batch_size),
               disable=not (progress and main), unit="step", dynamic_ncols=True)
    bar.set_postfix_str(f"{done_before}/{n} img")
    drawn: list[int] = []
    writer = _Writer(folder)
    try:
        for start in range(0, len(mine), batch_size):
            idx = mine[start:start + batch_size]
            _draw_batch(network, schedule, how, idx, o.seed, shape, labels, device, autocast,
                        writer, on_step=lambda i: bar.update(1), edit=edit, guide=guide,
                        space=space, save_latents=o.save_latents, condition=condition)
            drawn.extend(idx)
            done = min(n, done_before + len(drawn) * state.num_processes)
            bar.set_postfix_str(f"{done}/{n} img", refresh=False)
    finally:
        writer.close()
    state.wait_for_everyone()
    bar.update(bar.total - bar.n)
    bar.set_postfix_str(f"{n}/{n} img")
    bar.close()

    grid_path = out_dir / GRID if o.grid else None
    if main:
        assert claim is not None
        missing = [name for name in names if not folder.is_plain_file(name)]
        if missing:
            raise FolderError(f"{len(missing)} image(s) are missing from {out_dir} (e.g. "
                              f"{missing[0]}); rerun the same command to draw them")
        if grid_path is not None:
            pixels = space.image_shape(shape)
            shown = [_load_png(folder, name, pixels) for name in names[:MAX_GRID_IMAGES]]
            if o.class_labels == "all" and labels is not None:
                tiles, width = class_rows(shown, labels[:len(shown)])
                folder.save_image(GRID, make_grid_image(tiles, nrow=width))
            else:
                folder.save_image(GRID, make_grid_image(torch.stack(shown)))
        manifest["complete"] = True
        claim.write_manifest(manifest, claim.listed)
        tell(f"wrote {n - done_before} image(s) to {out_dir}"
             + (f" ({done_before} were already there)" if done_before else "")
             + (f", grid {grid_path}" if grid_path is not None else ""))
    state.wait_for_everyone()
    return SampleResult(out_dir=out_dir, num_samples=n, drawn=tuple(drawn),
                        already_done=done_before, grid_path=grid_path,
                        manifest_path=manifest_path,
                        files=tuple(out_dir / name for name in names))
