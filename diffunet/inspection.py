"""Feature visualisation: look inside a UNet the way people debug one.

``diffunet inspect MODEL.safetensors`` runs one input through the network with a forward hook on
every block (``conv_in``, each residual / attention / down- and upsampling block, the middle
block's three, ``norm_out``, ``conv_out``), and writes into ``--out-dir``:

=====================  ==========================================================================
``input.png``          the input image (x0, in the model's size and channels)
``noised.png``         diffusion models: what the network sees at timestep t (VP x_t; flow
                       x_t at t / T), noise from ``--seed``
``prediction.png``     segmentation models: the predicted mask, one colour per class
``NN_<block>.png``     the block's feature maps (NN = execution index), one tile per channel,
                       each channel min-max scaled on its own; magenta marks NaN/inf pixels
``stats.json``         the input and per-block activation statistics (see :func:`activation_stats`),
                       and ``files``: every file of the run's (the folder's manifest, written
                       before them; see :mod:`diffunet.outputs`)
``stats.txt``          the same statistics as an aligned table
=====================  ==========================================================================

It works for diffusion models (``net(x_t, t[, class_labels])``, t defaults to T // 2) and for
time-less segmentation UNets (``net(x)``, the image normalised with the model file's mean/std).

:func:`capture_activations`, :func:`activation_stats`, :func:`feature_grid` and
:func:`inspect_model` return values; the command (:mod:`diffunet.cli.inspect`) prints them.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import read_model
from .data import BuiltinShapes
from .errors import FolderError, ModelFileError, UsageError
from .outputs import claim_folder
from .runs import pick_device
from .images import (class_palette, load_image, normalize, pil_from_hwc, predict_labels,
                     tensor_image)

__all__ = [
    "InspectResult",
    "activation_stats",
    "block_names",
    "capture_activations",
    "feature_grid",
    "format_stats_table",
    "inspect_model",
]

_FORMAT = "diffunet.inspect"
_FORMAT_VERSION = 1

# The block-level modules of a UNet (see the state-dict layout in unet.py), not their inner layers.
_BLOCK_RE = re.compile(
    r"^(?:conv_in|norm_out|conv_out|mid\.(?:res1|attn|res2)"
    r"|(?:down|up)\.\d+\.(?:res\.\d+|attn\.\d+|downsample|upsample))$")

# The manifest of an inspect output folder (:mod:`diffunet.outputs`): the statistics file, whose
# ``files`` lists every file of the run's, written first (``complete: false``) and last.
MANIFEST = "stats.json"

_NONFINITE_RGB = (255, 0, 255)  # magenta: absent from a grey ramp, so NaN/inf pixels stand out
_PAD_RGB = (40, 60, 110)  # dark blue between tiles: distinct from both black and white tiles


# ---------------------------------------------------------------------------------------------
# Activations


def block_names(net: nn.Module) -> list[str]:
    """The names of ``net``'s block-level modules (``conv_in``, ``down.0.res.0``, ...,
    ``conv_out``), in ``named_modules()`` order (not necessarily execution order)."""
    return [name for name, _ in net.named_modules() if _BLOCK_RE.match(name)]


def capture_activations(net: nn.Module, x: Tensor, t: Tensor | int | float | None = None,
                        class_labels: Tensor | int | None = None,
                        ) -> list[tuple[str, Tensor]]:
    """Run ``net`` once on ``x`` and return every block's output, in the order they ran.

    ``x`` (B, C, H, W) on the network's device; ``t`` (B,) or a scalar for a time-conditioned
    UNet (``net(x, t, class_labels=...)``), None for a time-less one (``net(x)``). Returns
    ``[(name, activation (B, C_block, H_block, W_block) float32 CPU), ...]``, names as in
    :func:`block_names`. Runs under ``torch.no_grad()`` in the network's current mode (call
    ``net.eval()`` first for dropout-free, repeatable activations). The hooks are always removed.
    Each activation is copied when captured, so later in-place work in the network cannot
    change it.
    """
    names = set(block_names(net))
    if not names:
        raise ValueError(f"{type(net).__name__} has no UNet blocks (conv_in, down.*, mid.*, "
                         "up.*, conv_out) to capture")
    captured: list[tuple[str, Tensor]] = []

    def make_hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            # clone: the UNet applies SiLU in place to norm_out's output under no_grad
            captured.append((name, out.detach().to("cpu", torch.float32)
                             .clone(memory_format=torch.contiguous_format)))
        return hook

    handles = []
    try:
        for name, module in net.named_modules():
            if name in names:
                handles.append(module.register_forward_hook(make_hook(name)))
        with torch.no_grad():
            if t is None and class_labels is None:
                net(x)
            elif class_labels is None:
                net(x, t)
            else:
                net(x, t, class_labels=class_labels)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def activation_stats(activations: Sequence[tuple[str, Tensor]], *, zero_tol: float = 1e-6,
                     ) -> list[dict[str, Any]]:
    """Summary statistics of each ``(name, activation (B, C, H, W))``, as JSON-ready dicts.

    Keys: ``index`` (execution order), ``name``, ``shape``, ``mean``, ``std`` (population, i.e.
    correction 0), ``min``, ``max``, ``mean_abs`` (all over the finite values; None when there
    are none), ``frac_zero`` (exactly 0), ``frac_near_zero`` (``|x| <= zero_tol``),
    ``nonfinite`` (count of NaN/inf values) and ``constant_channels`` (channels, dim 1, whose
    finite values are all equal over batch and space: dead or saturated features).
    """
    stats = []
    for index, (name, act) in enumerate(activations):
        a = act.detach().to("cpu", torch.float64)
        finite = torch.isfinite(a)
        vals = a[finite]
        n, nf = a.numel(), int(vals.numel())
        entry: dict[str, Any] = {"index": index, "name": name, "shape": list(act.shape)}
        if nf:
            entry.update(mean=float(vals.mean()), std=float(vals.std(correction=0)),
                         min=float(vals.min()), max=float(vals.max()),
                         mean_abs=float(vals.abs().mean()))
        else:
            entry.update(mean=None, std=None, min=None, max=None, mean_abs=None)
        entry["frac_zero"] = float((a == 0).sum()) / n if n else 0.0
        entry["frac_near_zero"] = float((a.abs() <= zero_tol).sum()) / n if n else 0.0
        entry["nonfinite"] = n - nf
        constant = 0
        if a.ndim >= 2 and n:
            per_ch = a.transpose(0, 1).reshape(a.shape[1], -1)  # (C, B*H*W)
            fin = finite.transpose(0, 1).reshape(a.shape[1], -1)
            hi = torch.where(fin, per_ch, -math.inf).amax(dim=1)
            lo = torch.where(fin, per_ch, math.inf).amin(dim=1)
            constant = int((~(hi > lo)).sum())  # also channels with no finite value at all
        entry["constant_channels"] = constant
        for key in ("mean", "std", "min", "max", "mean_abs"):
            if entry[key] is not None:
                entry[key] = _finite_or_none(entry[key])  # float64 overflow -> None, not inf
        stats.append(entry)
    return stats


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_stats_table(stats: Sequence[dict[str, Any]]) -> str:
    """:func:`activation_stats` output as an aligned plain-text table (one row per block)."""
    header = ["#", "block", "shape", "mean", "std", "min", "max", "mean|x|", "zero%",
              "~zero%", "const.ch", "non-finite"]
    rows = [[str(s["index"]), s["name"], "x".join(str(d) for d in s["shape"]),
             _fmt(s["mean"]), _fmt(s["std"]), _fmt(s["min"]), _fmt(s["max"]), _fmt(s["mean_abs"]),
             f"{100 * s['frac_zero']:.1f}", f"{100 * s['frac_near_zero']:.1f}",
             str(s["constant_channels"]), str(s["nonfinite"])] for s in stats]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {1, 2}  # text columns left-aligned, numbers right-aligned

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# ---------------------------------------------------------------------------------------------
# Pictures


def feature_grid(act: Tensor, max_channels: int = 64, *, min_tile: int = 32, padding: int = 2,
                 ) -> np.ndarray:
    """Tile the first ``max_channels`` channels of one activation (C, H, W) into an RGB image.

    Returns uint8 (rows * (h + padding) + padding, cols * (w + padding) + padding, 3), a
    near-square grid (cols = ceil(sqrt(n))) read row by row in channel order. Each channel is
    min-max scaled to 0..255 over its own finite values (black = its minimum, white = its
    maximum); a constant channel is mid grey (128), NaN/inf pixels are magenta. Tiles are
    enlarged by an integer factor (nearest neighbour) so the shorter side is at least
    ``min_tile`` pixels: a 4x4 map becomes 32x32. Padding is dark blue.
    """
    if act.ndim != 3:
        raise ValueError(f"feature_grid takes one activation (C, H, W), got {tuple(act.shape)}")
    if max_channels < 1:
        raise ValueError(f"max_channels must be a positive integer, got {max_channels}")
    a = act[:max_channels].detach().to("cpu", torch.float64)
    n, h, w = a.shape
    if n == 0 or h == 0 or w == 0:
        raise ValueError(f"feature_grid needs a non-empty activation, got {tuple(act.shape)}")
    finite = torch.isfinite(a)
    lo = torch.where(finite, a, math.inf).amin(dim=(1, 2), keepdim=True)   # (n, 1, 1)
    hi = torch.where(finite, a, -math.inf).amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    varies = torch.isfinite(span) & (span > 0)
    # float64 keeps (a - lo) / span finite for any float32 input; constant channels -> 0.5
    norm = torch.where(varies, (a - lo) / torch.where(varies, span, 1.0), 0.5)
    grey = (norm.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)  # (n, h, w)
    rgb = grey.unsqueeze(-1).expand(n, h, w, 3).clone()  # (n, h, w, 3)
    rgb[~finite] = torch.tensor(_NONFINITE_RGB, dtype=torch.uint8)
    scale = max(1, math.ceil(min_tile / min(h, w)))
    if scale > 1:
        rgb = rgb.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    th, tw = h * scale, w * scale
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.empty((rows * (th + padding) + padding, cols * (tw + padding) + padding, 3),
                      dtype=np.uint8)
    canvas[:] = _PAD_RGB
    tiles = rgb.numpy()
    for k in range(n):
        r, c = divmod(k, cols)
        y, x = padding + r * (th + padding), padding + c * (tw + padding)
        canvas[y:y + th, x:x + tw] = tiles[k]
    return canvas


def _mask_image(logits: Tensor) -> np.ndarray:
    """Mask logits (K, H, W) -> uint8 (H, W, 3): the predicted class of each pixel (as
    ``diffunet segment predict`` decides it) in the colours of its mask PNGs."""
    labels = predict_labels(torch.nan_to_num(logits.float(), nan=-math.inf)[None])[0]
    num_classes = 2 if logits.shape[0] == 1 else logits.shape[0]
    palette = np.array(class_palette(num_classes), dtype=np.uint8)
    return palette[labels.cpu().numpy()]


# ---------------------------------------------------------------------------------------------
# The whole inspection


@dataclass(frozen=True)
class InspectResult:
    """What :func:`inspect_model` did: ``out_dir``, the ``files`` written there (in order),
    ``kind`` (``"diffusion"`` or ``"segmentation"``), ``input`` (how the input was made) and
    ``blocks`` (:func:`activation_stats` of every block, plus each one's ``file``)."""

    out_dir: Path
    files: list[Path]
    kind: str
    input: dict[str, Any]
    blocks: list[dict[str, Any]]


def _load_input(image: str | os.PathLike | None, size: int, channels: int) -> tuple[Tensor, str]:
    """The input image (C, S, S) in [-1, 1] and a description of where it came from."""
    if channels not in (1, 3):
        raise UsageError(f"this model takes {channels}-channel input; inspect can only make "
                         "1- or 3-channel images (grey or RGB)")
    if image is not None:
        return load_image(image, size, channels), str(image)
    shapes = BuiltinShapes(1, size, channels, seed=0)
    assert shapes.class_names is not None
    return shapes[0][0], f"built-in shapes, image 0 ({shapes.class_names[0]})"


def inspect_model(model_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                  image: str | os.PathLike | None = None, t: int | None = None, seed: int = 0,
                  class_label: int | None = None, max_channels: int = 64,
                  overwrite: bool = False, device: str | torch.device | None = None,
                  ) -> InspectResult:
    """Capture every block's activations for one input and write pictures and statistics.

    The input is ``image`` (any image file, resized and centre-cropped to the model's size and
    channels) or image 0 of the built-in shapes. A diffusion model sees x_t = add_noise(x0,
    noise, t) with ``t`` in [0, T) (default T // 2) and noise from ``torch.Generator`` seeded
    with ``seed``; ``class_label`` (conditional models only; default "no label"). A
    segmentation model sees the image in [0, 1] normalised with its file's mean/std and must
    not be given ``t``. ``max_channels`` caps the tiles per block picture. ``out_dir`` must be
    new, empty or a previous inspect output (whose files, listed in its ``stats.json``, are
    replaced) unless ``overwrite``, which writes beside other files and keeps them; a file
    ``stats.json`` does not list is never written over (:mod:`diffunet.outputs`). ``device``:
    default cuda if available, else cpu. Bad input raises :class:`~diffunet.errors.DiffunetError`.
    """
    if max_channels < 1:
        raise UsageError(f"--max-channels must be a positive integer, got {max_channels}")
    dev = device if isinstance(device, torch.device) else pick_device(device)
    net, schedule, meta = read_model(model_path, device=dev)
    cfg = net.config
    out_dir = Path(out_dir)
    info: dict[str, Any] = {"model": str(model_path), "sha256": meta.get("sha256")}

    if cfg.time_conditioning:
        kind = "diffusion"
        if schedule is None:
            raise ModelFileError(f"{model_path}: the network needs a timestep but the file has "
                                 "no noise schedule; re-save it with diffunet.save_model")
        if not schedule.timestep_inputs:
            raise UsageError(f"{model_path} is {schedule.article} {schedule.title} model "
                             f"(schedule.formulation = '{schedule.name}'): it has no training "
                             "timesteps for --t; inspect takes VP and flow-matching models")
        T = schedule.config.num_train_timesteps
        if t is None:
            t = T // 2
        if not 0 <= t < T:
            raise UsageError(f"--t must be in [0, {T - 1}] (the model has {T} training "
                             f"timesteps), got {t}")
        if class_label is not None:
            if cfg.num_classes is None:
                raise UsageError("--class-label: this model is unconditional (no "
                                 "unet.num_classes); drop --class-label")
            if not 0 <= class_label < cfg.num_classes:
                raise UsageError(f"--class-label must be in [0, {cfg.num_classes - 1}] (the "
                                 f"model has {cfg.num_classes} classes), got {class_label}")
    else:
        kind = "segmentation"
        if t is not None:
            raise UsageError("--t: segmentation models have no timestep; drop --t")
        if class_label is not None:
            raise UsageError("--class-label: segmentation models take no class label; "
                             "drop --class-label")

    x0, source = _load_input(image, cfg.image_size, cfg.in_channels)  # (C, S, S) in [-1, 1]
    if out_dir.exists() and not out_dir.is_dir():  # before the work; claimed after it
        raise FolderError(f"--out-dir {out_dir} is a file, not a folder; choose another --out-dir")
    x0 = x0.unsqueeze(0)  # (1, C, S, S)
    info.update(kind=kind, image=source, image_size=cfg.image_size, channels=cfg.in_channels)

    pictures: list[tuple[str, np.ndarray | Tensor]] = [("input.png", x0[0])]
    if kind == "diffusion":
        assert schedule is not None and t is not None
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(x0.shape, generator=gen)  # drawn on the CPU: same on every device
        # what the network sees at timestep t: VP x_t and t; flow x_t at t / T and t itself
        xt, time_in = schedule.network_input(x0, noise, schedule.level_of_timestep(t))
        info.update(t=t, num_train_timesteps=schedule.config.num_train_timesteps, seed=seed,
                    class_label=class_label)
        labels = None
        if cfg.num_classes is not None:
            labels = torch.tensor([cfg.num_classes if class_label is None else class_label],
                                  device=dev)
        acts = capture_activations(net, xt.to(dev), time_in.to(dev), labels)
        pictures.append(("noised.png", xt[0]))
    else:
        seg = meta.get("segmentation")
        mean = std = None
        if isinstance(seg, dict) and seg.get("mean") is not None and seg.get("std") is not None:
            mean, std = list(seg["mean"]), list(seg["std"])
            if len(mean) != cfg.in_channels or len(std) != cfg.in_channels:
                raise ModelFileError(f"{model_path}: segmentation mean/std have {len(mean)}/"
                                     f"{len(std)} entries for a {cfg.in_channels}-channel model")
        x = (x0 + 1.0) / 2.0  # [0, 1]
        if mean is not None and std is not None:
            x = normalize(x, mean, std)
        info.update(normalisation={"mean": mean, "std": std} if mean is not None else
                    "none (the file has no segmentation mean/std; image in [0, 1])")
        if isinstance(seg, dict) and seg.get("class_names") is not None:
            info["class_names"] = seg["class_names"]
        acts = capture_activations(net, x.to(dev))
        pictures.append(("prediction.png", _mask_image(acts[-1][1][0])))

    stats = activation_stats(acts)
    width = max(2, len(str(len(acts) - 1)))
    for s, (name, act) in zip(stats, acts):
        s["file"] = f"{s['index']:0{width}d}_{name}.png"
        s["channels_shown"] = min(max_channels, act.shape[1])
        pictures.append((s["file"], feature_grid(act[0], max_channels)))

    # Everything is computed; only now touch the folder.
    names = [name for name, _ in pictures] + [MANIFEST, "stats.txt"]
    inputs = [model_path] + ([image] if image is not None else [])
    doc = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "complete": False,
           "input": info, "blocks": stats}
    with claim_folder(out_dir, command="inspect", manifest=MANIFEST, format=_FORMAT,
                      format_version=_FORMAT_VERSION, planned=names, inputs=inputs,
                      overwrite=overwrite,
                      schema={"complete?": bool, "input?": dict, "blocks?": list}) as folder:
        # listed first: what is left of the previous output (removed next) and the new files
        folder.write_manifest(doc, [n for n in folder.listed if n in folder.present] + names)
        # a previous run's output that this one does not rewrite (e.g. another model's blocks)
        folder.remove([n for n in folder.listed if n not in names])
        folder.remove_leftovers()
        for name, pic in pictures:  # relative to the folder's descriptor, never via a link
            folder.save_image(name, tensor_image(pic) if isinstance(pic, Tensor)
                              else pil_from_hwc(pic))
        text = "\n".join(f"# {k}: {v}" for k, v in info.items()) + "\n" + format_stats_table(stats)
        folder.write_file("stats.txt", (text + "\n").encode(), durable=True)
        folder.write_manifest({**doc, "complete": True}, names)
    files = [out_dir / name for name in names]
    return InspectResult(out_dir=out_dir, files=files, kind=kind, input=info, blocks=stats)
