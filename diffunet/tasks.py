"""Image-conditioned tasks as data transforms (``data.task``): what a training image's condition
image is, so that the UNet (``unet.cond_channels``) learns p(image | condition).

- ``superres`` (SR3, Saharia et al. 2021): the image downscaled by ``data.superres_factor`` f
  (bicubic, antialiased: every output pixel averages its f x f block's neighbourhood, as a
  camera's sensor does, rather than picking one pixel) and upscaled back (bicubic), so the
  condition has the target's size and the network sees it pixel for pixel beside x_t.
- ``colorize`` (Palette, Saharia et al. 2022): the image's luminance, Y = 0.299 R + 0.587 G +
  0.114 B (ITU-R BT.601), one channel.
- ``inpaint`` (Palette): the image with a hole (its pixels set to 0, the grey of [-1, 1]) and
  the keep mask as one more channel (+1 kept, -1 to fill; 0, the dropped condition's value,
  is then no mask at all). The holes are drawn from the run's generator
  (:func:`random_keep_masks`): half boxes, half free-form strokes, as Palette trains.
- ``paired`` (Palette's image-to-image): the input image of the same name in another folder
  (``data.cond_path``; :class:`~diffunet.data.PairedFolders` stacks each target and its input
  on the channels, so flips apply to both), with the target's channels.

A condition is a pure function of the (already flipped) image and, for inpaint, of masks drawn
for the global batch from the step's generator (for paired: the input, flipped with its
target): flips apply to both, and a resumed or multi-process run sees the same pairs as an
uninterrupted one-process run.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ModelFileError

__all__ = ["TASKS", "Task", "task_channels", "condition_image", "drawn_condition",
           "shown_condition", "split_given", "finished", "random_keep_masks", "downscale",
           "upscale", "recorded_task"]

Task = Literal["superres", "colorize", "inpaint", "paired"]
TASKS: tuple[str, ...] = ("superres", "colorize", "inpaint", "paired")

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def task_channels(task: Optional[str], image_channels: int) -> int:
    """The condition image's channels for ``task`` on ``image_channels``-channel images (0: no
    task): superres, the image's own; colorize, 1 (the luminance); inpaint, the image's own and
    the mask; paired, the image's own (the input is read with the target's channels)."""
    if task is None:
        return 0
    return {"colorize": 1, "inpaint": image_channels + 1}.get(task, image_channels)


def downscale(images: Tensor, factor: int) -> Tensor:
    """Images (B, C, S, S) -> (B, C, S/f, S/f), bicubic with antialiasing, clamped to [-1, 1]
    (bicubic overshoots at edges)."""
    size = images.shape[-1] // factor
    return F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True,
                         align_corners=False).clamp(-1, 1).to(images.dtype)


def upscale(images: Tensor, size: int) -> Tensor:
    """Images (B, C, s, s) -> (B, C, size, size), bicubic, clamped to [-1, 1]: the low-resolution
    input at the model's size (and the bicubic baseline super-resolution is judged against)."""
    return F.interpolate(images.float(), size=(size, size), mode="bicubic",
                         align_corners=False).clamp(-1, 1).to(images.dtype)


def condition_image(task: str, images: Tensor, factor: int = 4,
                    keep: Optional[Tensor] = None) -> Tensor:
    """The condition of ``task`` for ``images`` (B, C, S, S) in [-1, 1]: (B, task_channels, S,
    S) in [-1, 1], on their device and in their dtype. ``keep`` (B, 1, S, S), inpaint's masks:
    1 where the pixel is kept, 0 where it is to be filled."""
    if task == "inpaint":
        if keep is None or keep.shape != (images.shape[0], 1, *images.shape[2:]):
            raise ValueError(f"inpaint needs keep masks of shape ({images.shape[0]}, 1, "
                             f"{images.shape[2]}, {images.shape[3]}), got "
                             f"{None if keep is None else tuple(keep.shape)}")
        keep = keep.to(device=images.device, dtype=images.dtype)
        return torch.cat([images * keep, 2 * keep - 1], dim=1)
    if task == "superres":
        return upscale(downscale(images, factor), images.shape[-1])
    if task == "colorize":
        if images.shape[1] != 3:
            raise ValueError(f"colorize needs RGB images, got {images.shape[1]} channel(s)")
        w = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images * w).sum(dim=1, keepdim=True)
    raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")


def split_given(task: Optional[str], batch: Tensor, channels: int
                ) -> tuple[Tensor, Optional[Tensor]]:
    """A loader batch (b, C', S, S) as (images (b, C, S, S), the given inputs or None):
    ``paired`` items stack each target (its first ``channels``) and its input; every other
    task's items are the images alone."""
    if task != "paired":
        return batch, None
    return batch[:, :channels], batch[:, channels:]


def drawn_condition(task: str, images: Tensor, factor: int, generator: torch.Generator,
                    global_batch: Optional[int] = None, rows: slice = slice(None),
                    given: Optional[Tensor] = None) -> Tensor:
    """The condition of ``task`` for ``images`` (b, C, S, S), drawing what it needs (inpaint's
    keep masks) from ``generator``: for a ``global_batch`` of B images of which ``images`` are
    rows ``rows`` (one process's share), so every process, and any number of them, draws the
    masks an unsplit batch would (B: ``images``' own count by default). ``paired``: the
    ``given`` inputs (:func:`split_given`) themselves."""
    if task == "paired":
        if given is None or given.shape != images.shape:
            raise ValueError(f"paired needs the given inputs, shaped as the images "
                             f"{tuple(images.shape)}, got "
                             f"{None if given is None else tuple(given.shape)}")
        return given.to(device=images.device, dtype=images.dtype)
    keep = None
    if task == "inpaint":
        B = images.shape[0] if global_batch is None else global_batch
        keep = random_keep_masks(B, images.shape[-1], generator)[rows]
    return condition_image(task, images, factor, keep)


def shown_condition(task: str, cond: Tensor, channels: int) -> Tensor:
    """A condition (B, task_channels, S, S) as the ``channels``-channel image it stands for,
    to show beside a sample or to score as the task's baseline: the upscaled low-resolution
    image, the luminance in every channel, the image with grey holes (the mask dropped), the
    paired input."""
    if task == "inpaint":
        return cond[:, :channels]
    return cond.expand(-1, channels, -1, -1) if cond.shape[1] == 1 else cond


def finished(task: Optional[str], samples: Tensor, cond: Tensor) -> Tensor:
    """A task model's samples (B, C, S, S) as the task's output, given their conditions (B,
    task_channels, S, S): inpaint keeps the input's pixels where its mask keeps them (the model
    redraws the whole image; only the hole is its to fill), every other task the samples."""
    if task != "inpaint":
        return samples
    keep = cond[:, -1:].to(samples.dtype) > 0  # the mask channel: +1 kept, -1 to fill
    return torch.where(keep, cond[:, :-1].to(samples), samples)


# Inpaint's training masks (Palette, Saharia et al. 2022, trains on boxes and free-form
# strokes). Every call draws the same number of uniforms per image (_MASK_DRAWS) whichever
# kind each image gets, so the generator's state after a step does not depend on the masks.
_STROKES, _VERTICES = 3, 5  # at most 3 strokes of 4 segments each
_PER_STROKE = 2 + 2 * (_VERTICES - 1) + 2  # start, (angle, length) per segment, width, active
_MASK_DRAWS = 1 + 4 + _STROKES * _PER_STROKE


def random_keep_masks(batch: int, size: int, generator: torch.Generator) -> Tensor:
    """``batch`` keep masks (B, 1, size, size) float32 on the generator's device: 1 kept, 0 to
    fill. Half are one box (each side 25-60% of the image's), half 1-3 free-form strokes (a
    random walk of 4 segments, each 15-35% of the side long, 6-16% of it thick)."""
    u = torch.rand((batch, _MASK_DRAWS), generator=generator, device=generator.device)
    centres = (torch.arange(size, device=u.device, dtype=torch.float32) + 0.5) / size
    y, x = centres.view(1, size, 1), centres.view(1, 1, size)
    # a box: side lengths, then its corner where it fits
    w, h = 0.25 + 0.35 * u[:, 1], 0.25 + 0.35 * u[:, 2]
    x0, y0 = u[:, 3] * (1 - w), u[:, 4] * (1 - h)
    box = ((x >= x0.view(-1, 1, 1)) & (x <= (x0 + w).view(-1, 1, 1))
           & (y >= y0.view(-1, 1, 1)) & (y <= (y0 + h).view(-1, 1, 1)))
    # strokes: thick polylines, a pixel is in one where its centre is within half the width of
    # a segment (the distance to a segment: project onto it, clamp to its ends)
    stroke = torch.zeros_like(box)
    for k in range(_STROKES):
        v = u[:, 5 + k * _PER_STROKE: 5 + (k + 1) * _PER_STROKE]
        point = 0.1 + 0.8 * v[:, 0:2]  # (B, 2) the start, as (x, y)
        half = (0.06 + 0.10 * v[:, -2]).view(-1, 1, 1) / 2
        active = (v[:, -1] < 0.5) | (k == 0)  # the first stroke always, the others by chance
        for j in range(_VERTICES - 1):
            angle = 2 * math.pi * v[:, 2 + 2 * j]
            length = 0.15 + 0.2 * v[:, 3 + 2 * j]
            step = torch.stack([torch.cos(angle), torch.sin(angle)], 1) * length[:, None]
            end = (point + step).clamp(0, 1)
            d = end - point
            ax, ay = point[:, 0].view(-1, 1, 1), point[:, 1].view(-1, 1, 1)
            dx, dy = d[:, 0].view(-1, 1, 1), d[:, 1].view(-1, 1, 1)
            t = (((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy).clamp_min(1e-12)
                 ).clamp(0, 1)
            near = (x - ax - t * dx) ** 2 + (y - ay - t * dy) ** 2 <= half ** 2
            stroke |= near & active.view(-1, 1, 1)
            point = end
    hole = torch.where((u[:, 0] < 0.5).view(-1, 1, 1), box, stroke)
    return (~hole).float().unsqueeze(1)


def recorded_task(meta: dict[str, Any], image_size: int) -> Optional[tuple[str, int]]:
    """The task a model file's metadata ``meta`` records (``task``, written by ``diffunet
    train``) for its ``image_size`` network: ``(name, superres_factor)``, or None for a model
    trained without one. A record that is not one (an unknown task, a factor that is not an
    integer from 2 dividing the image size) is one :class:`ModelFileError` line."""
    task = meta.get("task")
    if task is None:
        return None
    name = task.get("name") if isinstance(task, dict) else None
    factor = task.get("superres_factor") if isinstance(task, dict) else None
    ok_factor = (isinstance(factor, int) and not isinstance(factor, bool) and 2 <= factor
                 <= image_size and image_size % factor == 0)
    if name not in TASKS or (name == "superres" and not ok_factor):
        raise ModelFileError(f"the model file's task record is damaged ({task!r:.80}); use the "
                             "model file training wrote")
    return name, factor if ok_factor else 1
