"""Segmentation with the same UNet, without its timestep input.

==============  ==============================================================================
``data``        built-in shapes with masks, paired image/mask folders, splits, joint flips,
                statistics, the data of a run
``losses``      cross-entropy/BCE + soft Dice, the prior output bias, confusion matrix, Dice/IoU
``training``    ``train_segmentation``: the loop, on the run harness (:mod:`diffunet.runs`)
``predict``     ``predict_masks``: mask PNGs and overlays for images at any size
==============  ==============================================================================

The command line is ``diffunet segment train|predict|stats`` (:mod:`diffunet.cli.segment`).
"""
