"""Losses, output-layer initialisation and metrics for semantic segmentation on the UNet backbone.

Conventions (shared by every function here):

- ``logits`` (B, K_out, H, W); ``target`` (B, H, W) integer class indices in ``[0, K)``, where
  class 0 is background, and ``ignore_index`` (default 255) marks void pixels that count in
  neither the loss nor the metrics.
- A binary problem (K = 2) uses ONE output channel, the foreground logit, with sigmoid / binary
  cross-entropy; K > 2 uses K_out = K channels with softmax / cross-entropy
  (:func:`output_channels`). Two-channel logits are therefore refused by the losses: under this
  convention they mean the network was built with the wrong number of outputs.
- Functions follow their inputs' device; losses are computed in at least float32 (half-precision
  logits, e.g. under autocast, are upcast for the reductions) and returned in that dtype.
- Targets are checked to hold only valid classes or ``ignore_index``: one host sync per call,
  worth it, as an out-of-range index would otherwise be a CUDA device assert (cross-entropy) or a
  silently wrong count (one-hot, bincount).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The binary-vs-multi-class output convention lives with the config that sizes the network,
# the logits-to-labels rule with the mask images.
from ..config import segmentation_output_channels as output_channels
from ..images import predict_labels

__all__ = ["confusion_matrix", "dice_iou", "dice_loss", "init_output_bias_", "mean_foreground",
           "output_bias_from_prior", "output_channels", "predict_labels", "segmentation_loss"]

_PRIOR_EPS = 1e-4  # class frequencies are clamped to [eps, 1 - eps]: an absent class gets a
# finite bias (logit(1e-4) ~ -9.2) rather than -inf, and the net can still learn to predict it.


def dice_loss(logits: Tensor, target: Tensor, *, ignore_index: int = 255,
              smooth: float = 1.0) -> Tensor:
    """Soft Dice loss (Milletari et al. 2016, "V-Net", eq. 1, with additive smoothing), a scalar.

    For each class c, with p_c the predicted probabilities and g_c the one-hot target::

        loss_c = 1 - (2 * sum(p_c * g_c) + smooth) / (sum(p_c) + sum(g_c) + smooth)

    the sums running over the batch and all pixels together (one Dice per class for the whole
    batch, not per image), with ignored pixels removed from both p and g.

    - One channel (K = 2): p = sigmoid(logit), and only the foreground class is scored (the
      background term would mostly repeat it, and the standard binary soft Dice is foreground
      only).
    - K channels: p = softmax over channels, and the loss is the mean over ALL K classes,
      background included. With ``smooth > 0`` a class absent from both the target and the
      prediction scores ~0 loss rather than 0/0, so including every class is well defined, and
      the loss does not depend on which classes happen to appear in the batch.

    ``smooth`` (> 0) keeps the ratio finite when a class is absent; it also makes the loss exactly
    0 for exactly one-hot predictions equal to the target, and exactly 0 (with a gradient graph)
    when every pixel is ignored. logits (B, K_out, H, W); target (B, H, W).
    """
    if smooth < 0:
        raise ValueError(f"smooth must be >= 0, got {smooth}")
    return _dice(*_prepare(logits, target, ignore_index), smooth)


def segmentation_loss(logits: Tensor, target: Tensor, *, dice_weight: float = 1.0,
                      ignore_index: int = 255) -> Tensor:
    """Per-pixel classification loss plus ``dice_weight`` times :func:`dice_loss`, a scalar.

    One channel: binary cross-entropy with logits; K channels: cross-entropy. Either is the mean
    over the non-ignored pixels of the whole batch. If every pixel is ignored the loss is exactly
    0 (not NaN, as ``F.cross_entropy``'s 0/0 would be) and still has a gradient graph, so a batch
    of void crops does not break the training step. logits (B, K_out, H, W); target (B, H, W).
    """
    if dice_weight < 0:
        raise ValueError(f"dice_weight must be >= 0, got {dice_weight}")
    logits_f, target_l, valid = _prepare(logits, target, ignore_index)
    # Sum over valid pixels, then divide by their count clamped to 1: the mean, or 0 if none.
    count = valid.sum().clamp(min=1).to(logits_f.dtype)
    if logits_f.shape[1] == 1:
        # Ignored pixels get target 0 only so the elementwise loss is defined; they are dropped.
        fg = torch.where(valid, target_l, torch.zeros_like(target_l)).to(logits_f.dtype)
        per_pixel = F.binary_cross_entropy_with_logits(logits_f[:, 0], fg, reduction="none")
        per_pixel = torch.where(valid, per_pixel, torch.zeros_like(per_pixel))
        loss = per_pixel.sum() / count
    else:
        loss = F.cross_entropy(logits_f, target_l, ignore_index=ignore_index,
                               reduction="sum") / count
    if dice_weight:
        loss = loss + dice_weight * _dice(logits_f, target_l, valid, smooth=1.0)
    return loss


def output_bias_from_prior(class_counts: Tensor | Sequence[float]) -> Tensor:
    """Output-conv bias (K_out,) that makes an untrained net predict the class frequencies.

    The "prior" initialisation of the focal-loss paper (Lin et al. 2017, "Focal Loss for Dense
    Object Detection", sec. 4.1, b = -log((1 - pi) / pi)): with the head's weights zero (or
    small), the output is the bias, so the initial loss is the entropy of the class distribution
    rather than a large loss dominated by the frequent background.

    ``class_counts`` (K,) pixel counts (or frequencies) per class, K >= 2; p = counts / sum,
    clamped to [1e-4, 1 - 1e-4] so an absent class gets a finite bias.

    - K = 2 (one channel): [logit(p_1)] = [log(p_1 / (1 - p_1))], so sigmoid(bias) = p_1.
    - K > 2: log(p_k), so softmax(bias) = p (up to the clamping, which softmax renormalises).

    Returned in the counts' floating dtype (the default dtype for integer counts or a list) on
    their device; computed in float64 on the CPU (some devices, e.g. MPS, have no float64).
    """
    counts = torch.as_tensor(class_counts)
    if counts.ndim != 1 or counts.numel() < 2:
        raise ValueError(f"class_counts must have shape (K,) with K >= 2 classes, "
                         f"got shape {tuple(counts.shape)}")
    out_dtype = counts.dtype if counts.is_floating_point() else torch.get_default_dtype()
    c = counts.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(c).all()) or bool((c < 0).any()) or not bool(c.sum() > 0):
        raise ValueError(f"class_counts must be finite, non-negative and not all zero, "
                         f"got {counts.tolist()}")
    p = (c / c.sum()).clamp(_PRIOR_EPS, 1 - _PRIOR_EPS)
    if c.numel() == 2:
        bias = torch.log(p[1:] / (1 - p[1:]))  # (1,): the foreground logit
    else:
        bias = torch.log(p)
    return bias.to(device=counts.device, dtype=out_dtype)


def init_output_bias_(conv: nn.Conv2d, class_counts: Tensor | Sequence[float]) -> nn.Conv2d:
    """Set ``conv.bias`` in place to :func:`output_bias_from_prior` (``class_counts``) and return
    ``conv``. ``conv`` must have a bias and ``output_channels(len(class_counts))`` outputs.

    The UNet's ``conv_out`` is zero-initialised, so ``init_output_bias_(net.conv_out, counts)``
    makes the untrained net output exactly the prior at every pixel.
    """
    bias = output_bias_from_prior(class_counts)
    if conv.bias is None:
        raise ValueError("the output conv has no bias (build it with bias=True)")
    if conv.bias.shape != bias.shape:
        raise ValueError(f"the output conv has {conv.bias.numel()} output channels, but "
                         f"{bias.numel()} are needed for {len(torch.as_tensor(class_counts))} "
                         f"classes (see output_channels)")
    with torch.no_grad():
        conv.bias.copy_(bias)  # copy_ casts to the bias's dtype and device
    return conv


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int,
                     ignore_index: int = 255) -> Tensor:
    """Confusion matrix (K, K) int64 on the inputs' device: entry [i, j] counts the pixels of
    target class i predicted as class j (rows = target, columns = prediction).

    pred, target (B, H, W) (any matching shape) integer labels; pixels where the target is
    ``ignore_index`` are left out. Accumulate over batches by adding the matrices.
    """
    output_channels(num_classes)  # validates K >= 2
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have "
                         f"the same shape")
    if pred.is_floating_point() or pred.is_complex():
        raise ValueError(f"pred must hold integer labels (see predict_labels), got {pred.dtype}")
    _check_target_dtype(target)
    valid = target != ignore_index
    t, p = target[valid].long(), pred[valid].long()
    # One host sync: bincount would silently put an out-of-range label in another cell.
    if bool(((t < 0) | (t >= num_classes) | (p < 0) | (p >= num_classes)).any()):
        raise ValueError(f"labels must be in [0, {num_classes}) or, in the target, the "
                         f"ignore_index {ignore_index}")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).view(num_classes,
                                                                              num_classes)


def dice_iou(confusion: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class Dice and IoU (K,) float64 from a (K, K) :func:`confusion_matrix`.

    With TP the diagonal, FP = column sum - TP and FN = row sum - TP::

        dice_c = 2 TP / (2 TP + FP + FN)        iou_c = TP / (TP + FP + FN)

    A class absent from both the prediction and the target (TP + FP + FN = 0) gets NaN rather
    than 0 or 1: there is nothing to score, so it is left out of nan-means
    (:func:`mean_foreground`) instead of dragging them towards either end.
    """
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square (K, K) matrix, got shape "
                         f"{tuple(confusion.shape)}")
    cm = confusion.to(torch.float64)
    tp = cm.diagonal()
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    # 0 / 0 = NaN for an absent class, exactly what is wanted (float division, no exception).
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


def mean_foreground(values: Tensor) -> float:
    """Mean of per-class ``values`` (K,) over the foreground classes 1..K-1, ignoring NaN (absent
    classes). For K = 2 this is class 1's value. NaN if every foreground class is NaN."""
    if values.ndim != 1 or values.numel() < 2:
        raise ValueError(f"values must have shape (K,) with K >= 2, got {tuple(values.shape)}")
    return float(values[1:].to(torch.float64).nanmean())


# ---------------------------------------------------------------------------------------------
# Input checks shared by the losses.


def _check_logits_shape(logits: Tensor) -> None:
    if logits.ndim != 4 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape (B, K_out, H, W), got {tuple(logits.shape)}")


def _check_target_dtype(target: Tensor) -> None:
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")


def _prepare(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Check logits (B, K_out, H, W) and target (B, H, W); return the logits in at least float32,
    the target as int64 and the valid-pixel mask (B, H, W) bool."""
    _check_logits_shape(logits)
    k_out = logits.shape[1]
    if k_out == 2:
        raise ValueError("logits have 2 channels: a binary problem uses one foreground-logit "
                         "channel with sigmoid (output_channels(2) == 1)")
    b, _, h, w = logits.shape
    if target.shape != (b, h, w):
        raise ValueError(f"target must have shape (B, H, W) = {(b, h, w)} to match logits "
                         f"{tuple(logits.shape)}, got {tuple(target.shape)}")
    _check_target_dtype(target)
    target = target.long()
    valid = target != ignore_index
    num_classes = 2 if k_out == 1 else k_out
    # One host sync: see the module docstring.
    if bool((valid & ((target < 0) | (target >= num_classes))).any()):
        raise ValueError(f"target values must be in [0, {num_classes}) or the ignore_index "
                         f"{ignore_index}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return logits.to(dtype), target, valid


def _dice(logits: Tensor, target: Tensor, valid: Tensor, smooth: float) -> Tensor:
    """:func:`dice_loss` on already-checked inputs (see :func:`_prepare`)."""
    if logits.shape[1] == 1:
        # Foreground only: p (B, 1, H, W), g = (target == 1).
        probs = torch.sigmoid(logits)
        onehot = (target == 1).unsqueeze(1)
    else:
        probs = torch.softmax(logits, dim=1)
        classes = torch.arange(logits.shape[1], device=target.device).view(1, -1, 1, 1)
        onehot = target.unsqueeze(1) == classes  # (B, K, H, W); ignored pixels are masked below
    valid = valid.unsqueeze(1)
    # torch.where rather than multiplying by the mask: a non-finite probability on a void pixel
    # (softmax of an inf logit) cannot turn the sums into NaN (0 * NaN = NaN).
    probs = torch.where(valid, probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
    onehot = (onehot & valid).to(probs.dtype)
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)  # (K_out,)
    denominator = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    return (1 - dice).mean()
