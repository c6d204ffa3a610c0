"""Segmentation losses, prior bias initialisation and metrics, against numbers worked out by hand.

Logits are chosen so the probabilities are exact fractions: sigmoid(+-ln 3) = 3/4, 1/4,
sigmoid(0) = 1/2, and softmax(ln 2, 0, 0) = (1/2, 1/4, 1/4).
"""

from __future__ import annotations

import math

import pytest
import torch

from diffunet.segmentation.losses import (confusion_matrix, dice_iou, dice_loss,
                                          init_output_bias_, mean_foreground,
                                          output_bias_from_prior, output_channels,
                                          predict_labels, segmentation_loss)

LN2, LN3 = math.log(2), math.log(3)
F64 = torch.float64


def binary_example(dtype=F64):
    """1x1x2x2 logits -> p = [[3/4, 1/2], [1/4, 1/4]]; target [[1, 0], [1, 0]]."""
    logits = torch.tensor([[[[LN3, 0.0], [-LN3, -LN3]]]], dtype=dtype, requires_grad=True)
    target = torch.tensor([[[1, 0], [1, 0]]])
    return logits, target


# BCE per pixel: -ln(3/4), -ln(1/2), -ln(1/4), -ln(3/4)
BINARY_BCE = (2 * math.log(4 / 3) + LN2 + math.log(4)) / 4
# Dice (foreground): sum pg = 3/4 + 1/4 = 1, sum p = 7/4, sum g = 2 -> (2 + 1) / (7/4 + 2 + 1)
BINARY_DICE_LOSS = 1 - 3 / 4.75  # = 7/19


def multiclass_example(dtype=F64):
    """1x3x1x2 logits -> pixel A p = (1/2, 1/4, 1/4), target 0; pixel B p = (1/4, 1/4, 1/2),
    target 1."""
    logits = torch.tensor([[[[LN2, 0.0]], [[0.0, 0.0]], [[0.0, LN2]]]], dtype=dtype,
                          requires_grad=True)
    target = torch.tensor([[[0, 1]]])
    return logits, target


MULTI_CE = (LN2 + math.log(4)) / 2  # -ln(1/2), -ln(1/4)
# class 0: pg = 1/2, sum p = 3/4, sum g = 1 -> 1 - 2/2.75 = 3/11
# class 1: pg = 1/4, sum p = 1/2, sum g = 1 -> 1 - 1.5/2.5 = 2/5
# class 2: pg = 0,   sum p = 3/4, sum g = 0 -> 1 - 1/1.75 = 3/7
MULTI_DICE_LOSS = (3 / 11 + 2 / 5 + 3 / 7) / 3


def test_output_channels():
    assert output_channels(2) == 1
    assert output_channels(3) == 3 and output_channels(21) == 21
    for bad in (1, 0, -3, 2.0, True):
        with pytest.raises(ValueError):
            output_channels(bad)


def test_predict_labels_binary_and_multiclass():
    one = torch.tensor([[[[0.1, -0.1], [0.0, 5.0]]]])
    labels = predict_labels(one)
    assert labels.dtype == torch.int64 and labels.shape == (1, 2, 2)
    assert labels.tolist() == [[[1, 0], [0, 1]]]  # logit 0 is p = 0.5, not > 0.5: background
    multi = torch.tensor([[[[3.0, 0.0]], [[1.0, 0.0]], [[2.0, 9.0]]]])  # (1, 3, 1, 2)
    assert predict_labels(multi).tolist() == [[[0, 2]]]


def test_bce_dice_binary_hand_computed():
    logits, target = binary_example()
    assert dice_loss(logits, target).item() == pytest.approx(7 / 19, abs=1e-12)
    assert BINARY_DICE_LOSS == pytest.approx(7 / 19)
    loss = segmentation_loss(logits, target)
    assert loss.dtype == F64 and loss.ndim == 0
    assert loss.item() == pytest.approx(BINARY_BCE + BINARY_DICE_LOSS, abs=1e-12)
    half = segmentation_loss(logits, target, dice_weight=0.5)
    assert half.item() == pytest.approx(BINARY_BCE + 0.5 * BINARY_DICE_LOSS, abs=1e-12)
    assert segmentation_loss(logits, target, dice_weight=0).item() == pytest.approx(BINARY_BCE)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_ce_dice_multiclass_hand_computed():
    logits, target = multiclass_example()
    assert dice_loss(logits, target).item() == pytest.approx(MULTI_DICE_LOSS, abs=1e-12)
    loss = segmentation_loss(logits, target)
    assert loss.item() == pytest.approx(MULTI_CE + MULTI_DICE_LOSS, abs=1e-12)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("example", [binary_example, multiclass_example])
def test_ignored_pixels_change_nothing(example):
    logits, target = example()
    expected = segmentation_loss(logits, target).item()
    # Append a column of void pixels, with arbitrary (even huge) logits there.
    b, k, h, _ = logits.shape
    for fill in (0.0, 7.0, -1e4):
        extra = torch.full((b, k, h, 1), fill, dtype=F64)
        padded = torch.cat([logits.detach(), extra], dim=3).requires_grad_()
        padded_target = torch.cat([target, torch.full((b, h, 1), 255)], dim=2)
        loss = segmentation_loss(padded, padded_target)
        assert loss.item() == pytest.approx(expected, abs=1e-12)
        loss.backward()
        assert torch.isfinite(padded.grad).all() and (padded.grad[..., -1] == 0).all()
    # A different ignore_index works the same way.
    other = torch.cat([target, torch.full((b, h, 1), -1)], dim=2)
    padded = torch.cat([logits.detach(), torch.ones(b, k, h, 1, dtype=F64)], dim=3)
    assert segmentation_loss(padded, other, ignore_index=-1).item() == pytest.approx(expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_all_ignored_is_zero_with_gradient(channels):
    logits = torch.randn(2, channels, 2, 2, generator=torch.Generator().manual_seed(0),
                         requires_grad=True)
    target = torch.full((2, 2, 2), 255)
    loss = segmentation_loss(logits, target)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (logits.grad == 0).all()
    assert dice_loss(logits, target).item() == 0.0


def test_perfect_prediction_dice_is_zero():
    # +-100 saturates sigmoid / softmax to exactly 0 and 1 in float32, so with smooth the ratio
    # is (2n + 1) / (2n + 1) = 1 exactly; an absent class scores (0 + 1) / (0 + 1) = 1.
    target = torch.tensor([[[1, 0], [0, 1]]])
    binary = (target.float() * 200 - 100).unsqueeze(1)
    assert dice_loss(binary, target).item() == 0.0
    target3 = torch.tensor([[[0, 1], [1, 0]]])  # class 2 absent from target and prediction
    multi = torch.nn.functional.one_hot(target3, 3).permute(0, 3, 1, 2).float() * 200 - 100
    assert dice_loss(multi, target3).item() == 0.0
    # Confident (not saturated) and correct: near 0.
    assert dice_loss(binary / 10, target).item() < 1e-4


@pytest.mark.parametrize("channels", [1, 3])
def test_gradients_finite_at_extreme_logits(channels):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, channels, 3, 3, generator=g) * 1e4).requires_grad_()
    target = torch.randint(0, max(channels, 2), (2, 3, 3), generator=g)
    target[0, 0, 0] = 255
    loss = segmentation_loss(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_half_precision_logits_reduce_in_float32():
    logits, target = binary_example(torch.bfloat16)
    loss = segmentation_loss(logits, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(BINARY_BCE + BINARY_DICE_LOSS, abs=1e-2)


def test_bad_inputs_are_value_errors():
    logits, target = multiclass_example()
    with pytest.raises(ValueError, match="target values"):
        segmentation_loss(logits, torch.tensor([[[0, 3]]]))
    with pytest.raises(ValueError, match="shape"):
        segmentation_loss(logits, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="integer"):
        segmentation_loss(logits, target.float())
    with pytest.raises(ValueError, match="2 channels"):
        dice_loss(torch.zeros(1, 2, 1, 2), target)
    bin_logits, _ = binary_example()
    with pytest.raises(ValueError, match="target values"):
        segmentation_loss(bin_logits, torch.tensor([[[1, 2], [0, 0]]]))


def test_output_bias_from_prior_binary():
    bias = output_bias_from_prior(torch.tensor([30, 10]))  # p_fg = 1/4
    assert bias.shape == (1,) and bias.dtype == torch.float32
    assert bias.item() == pytest.approx(-LN3)  # logit(1/4) = ln((1/4) / (3/4))
    assert torch.sigmoid(bias).item() == pytest.approx(0.25)
    absent = output_bias_from_prior([5, 0])
    assert torch.isfinite(absent).all()
    assert torch.sigmoid(absent).item() == pytest.approx(1e-4, rel=1e-4)


def test_output_bias_from_prior_multiclass():
    bias = output_bias_from_prior(torch.tensor([1.0, 2.0, 5.0], dtype=F64))
    assert bias.dtype == F64
    assert bias.tolist() == pytest.approx([math.log(1 / 8), math.log(2 / 8), math.log(5 / 8)])
    assert torch.softmax(bias, 0).tolist() == pytest.approx([1 / 8, 2 / 8, 5 / 8])
    absent = output_bias_from_prior([10, 0, 10])
    assert torch.isfinite(absent).all()
    assert torch.softmax(absent, 0).tolist() == pytest.approx([0.5, 1e-4, 0.5], abs=1e-4)
    for bad in ([3], [[1, 2], [3, 4]], [1, -1, 2], [0, 0, 0], [1.0, float("nan"), 1.0]):
        with pytest.raises(ValueError):
            output_bias_from_prior(bad)


@pytest.mark.parametrize("counts, probs", [([30, 10], None), ([1, 2, 5], [1 / 8, 2 / 8, 5 / 8])])
def test_init_output_bias_gives_prior_from_zero_weight_head(counts, probs):
    conv = torch.nn.Conv2d(4, output_channels(len(counts)), 3, padding=1)
    torch.nn.init.zeros_(conv.weight)
    assert init_output_bias_(conv, counts) is conv
    assert conv.bias.is_leaf and conv.bias.requires_grad  # still a trainable parameter
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(2))
    out = conv(x)
    if probs is None:
        assert torch.allclose(torch.sigmoid(out), torch.full_like(out, 0.25), atol=1e-6)
    else:
        got = torch.softmax(out, dim=1).permute(0, 2, 3, 1).reshape(-1, 3)
        assert torch.allclose(got, torch.tensor(probs).expand_as(got), atol=1e-6)
    with pytest.raises(ValueError, match="output channels"):
        init_output_bias_(torch.nn.Conv2d(4, 3, 1), [30, 10])
    with pytest.raises(ValueError, match="bias"):
        init_output_bias_(torch.nn.Conv2d(4, 1, 1, bias=False), [30, 10])


def test_confusion_matrix_and_dice_iou_hand_computed():
    target = torch.tensor([[[0, 0, 1], [2, 255, 1]]])
    pred = torch.tensor([[[0, 1, 1], [0, 2, 1]]])  # the 2 under the void pixel is not counted
    # (target, pred) pairs: (0,0) (0,1) (1,1) (2,0) (1,1)
    cm = confusion_matrix(pred, target, num_classes=4)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    dice, iou = dice_iou(cm)
    assert dice.dtype == F64 and iou.dtype == F64
    # class 0: TP 1, FP 1, FN 1;  class 1: TP 2, FP 1, FN 0;  class 2: TP 0, FP 0, FN 1;
    # class 3: absent from both -> NaN
    assert dice[:3].tolist() == pytest.approx([2 / 4, 4 / 5, 0.0])
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert math.isnan(dice[3]) and math.isnan(iou[3])
    assert mean_foreground(dice) == pytest.approx((4 / 5 + 0.0) / 2)  # NaN left out
    assert mean_foreground(iou) == pytest.approx(1 / 3)
    assert mean_foreground(torch.tensor([0.9, 0.6])) == pytest.approx(0.6)  # K = 2: class 1


def test_confusion_matrix_matches_predict_labels_and_checks_labels():
    logits, target = binary_example()
    cm = confusion_matrix(predict_labels(logits), target, num_classes=2)
    # preds [[1, 0], [0, 0]] (logit 0 is background) vs target [[1, 0], [1, 0]]
    assert cm.tolist() == [[2, 0], [1, 1]]
    with pytest.raises(ValueError, match="labels"):
        confusion_matrix(torch.tensor([[0, 3]]), torch.tensor([[0, 1]]), num_classes=3)
    with pytest.raises(ValueError, match="labels"):
        confusion_matrix(torch.tensor([[0, 1]]), torch.tensor([[0, 5]]), num_classes=3)
