"""Image-conditioned tasks as data transforms (``data.task``): what a training image's condition
image is, so that the UNet (``unet.cond_channels``) learns p(image | condition).

- ``superres`` (SR3, Saharia et al. 2021): the image downscaled by ``data.superres_factor`` f
  (bicubic, antialiased: every output pixel averages its f x f block's neighbourhood, as a
  camera's sensor does, rather than picking one pixel) and upscaled back (bicubic), so the
  condition has the target's size and the network sees it pixel for pixel beside x_t.
- ``colorize`` (Palette, Saharia et al. 2022): the image's luminance, Y = 0.299 R + 0.587 G +
  0.114 B (ITU-R BT.601), one channel.

A condition is a pure function of the (already flipped) image: flips apply to both, and a
resumed or multi-process run sees the same pairs as an uninterrupted one-process run.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ModelFileError

__all__ = ["TASKS", "Task", "task_channels", "condition_image", "downscale", "upscale",
           "recorded_task"]

Task = Literal["superres", "colorize"]
TASKS: tuple[str, ...] = ("superres", "colorize")

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def task_channels(task: Optional[str], image_channels: int) -> int:
    """The condition image's channels for ``task`` on ``image_channels``-channel images (0: no
    task): superres, the image's own; colorize, 1 (the luminance)."""
    if task is None:
        return 0
    return 1 if task == "colorize" else image_channels


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


def condition_image(task: str, images: Tensor, factor: int = 4) -> Tensor:
    """The condition of ``task`` for ``images`` (B, C, S, S) in [-1, 1]: (B, task_channels, S,
    S) in [-1, 1], on their device and in their dtype."""
    if task == "superres":
        return upscale(downscale(images, factor), images.shape[-1])
    if task == "colorize":
        if images.shape[1] != 3:
            raise ValueError(f"colorize needs RGB images, got {images.shape[1]} channel(s)")
        w = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images * w).sum(dim=1, keepdim=True)
    raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")


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
