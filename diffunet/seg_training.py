"""``train_segmentation(cfg, out_dir)``: the UNet as a segmentation network, top to bottom.

The same :class:`~diffunet.unet.UNet`, built with ``time_conditioning=False`` and one output per
class (one logit for a binary problem), trained on image/mask pairs:

- data: the built-in shapes with their masks, or two folders matched by file name
  (:mod:`diffunet.seg_data`); a held-out validation split (or separate validation folders);
  images normalised with ``data.mean``/``data.std`` (ImageNet's by default); random flips applied
  to image and mask together;
- loss: cross-entropy (BCE-with-logits for binary) + soft Dice (:mod:`diffunet.seg_losses`), with
  the output bias initialised from the class frequencies so the first predictions are not all
  background;
- AdamW with a one-cycle learning rate (Smith & Topin 2019), gradient clipping, optional EMA of
  the weights, mixed precision and several processes through Accelerate;
- after every epoch: Dice and IoU per class on the validation split, one line in ``log.jsonl``,
  ``weights/last.safetensors`` and, when the mean foreground Dice improved,
  ``weights/best.safetensors`` (model files carry the normalisation and class names, so
  ``diffunet segment predict`` needs nothing else), and the training state in ``state/``, so
  ``--resume`` continues after the last finished epoch exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from . import state as st
from .checkpoint import save_model, unwrap_model
from .config import SegRunConfig, to_dict
from .data import GlobalBatchSampler, make_dataloader
from .errors import ConfigError, DataError
from .seg_data import (IGNORE_INDEX, BuiltinSegShapes, PairedFolders, class_pixel_counts,
                       default_mean_std, joint_flip, normalize, split_indices)
from .seg_losses import (confusion_matrix, dice_iou, init_output_bias_, mean_foreground,
                         predict_labels, segmentation_loss)
from .training import (EMA, _write_failed, load_state_into, open_run_folder, prepare_out_dir,
                       state_must_fit)
from .unet import UNet


@dataclass
class SegTrainResult:
    """What a finished segmentation run left behind."""

    epochs: int
    best_path: Path | None
    last_path: Path | None
    best_epoch: int | None
    best_dice: float | None
    """Mean foreground Dice of the best model on the validation split."""


@dataclass
class SegData:
    """The resolved data of a run: training and validation sets and how to read them."""

    train: Dataset
    val: Dataset
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    notes: list[str]
    """One-line remarks for people (skipped files, unmatched names)."""


def _folder_notes(ds: Any, images: str, masks: str) -> list[str]:
    notes = []
    if getattr(ds, "skipped", None):
        notes.append(f"skipped {len(ds.skipped)} unreadable file(s) in {images}, "
                     f"e.g. {ds.skipped[0]}")
    if getattr(ds, "unmatched_images", None):
        notes.append(f"{len(ds.unmatched_images)} image(s) in {images} have no mask of the same "
                     f"name in {masks} and are left out, e.g. {ds.unmatched_images[0]}")
    if getattr(ds, "unmatched_masks", None):
        notes.append(f"{len(ds.unmatched_masks)} mask(s) in {masks} have no image and are left "
                     f"out, e.g. {ds.unmatched_masks[0]}")
    return notes


def build_segmentation_data(cfg: SegRunConfig) -> SegData:
    """The training and validation sets ``cfg.data`` describes (items: image (C,S,S) in [0, 1],
    mask (S,S) int64)."""
    d = cfg.data
    K = d.classes
    notes: list[str] = []
    if d.source == "builtin":
        base: Dataset = BuiltinSegShapes(d.builtin_size, image_size=d.image_size,
                                         channels=d.channels, seed=0)
    else:
        base = PairedFolders(d.images, d.masks, d.image_size, d.channels, K,
                             class_names=d.class_names or None)
        notes += _folder_notes(base, str(d.images), str(d.masks))
    if d.val_images is not None:
        val: Dataset = PairedFolders(d.val_images, d.val_masks, d.image_size, d.channels, K,
                                     class_names=d.class_names or None)
        notes += _folder_notes(val, str(d.val_images), str(d.val_masks))
        train: Dataset = base
    else:
        train_idx, val_idx = split_indices(len(base), d.val_fraction, cfg.train.seed)
        train, val = Subset(base, train_idx), Subset(base, val_idx)
    names = tuple(d.class_names) or tuple(getattr(base, "class_names", None) or
                                          [f"class{k}" for k in range(K)])
    mean, std = default_mean_std(d.channels)
    return SegData(train=train, val=val, num_classes=K, class_names=names,
                   mean=tuple(d.mean) if d.mean is not None else tuple(mean),
                   std=tuple(d.std) if d.std is not None else tuple(std), notes=notes)


def segmentation_metadata(cfg: SegRunConfig, data: SegData) -> dict[str, Any]:
    """What ``diffunet segment predict`` needs to use a model file: stored under the
    ``segmentation`` key of its metadata."""
    return {"num_classes": data.num_classes, "class_names": list(data.class_names),
            "mean": list(data.mean), "std": list(data.std), "image_size": cfg.data.image_size,
            "channels": cfg.data.channels, "ignore_index": IGNORE_INDEX}


_STATE_KEYS: dict[str, type] = {"config": dict, "optimizer": dict, "scheduler": dict,
                                "epoch": int, "best": dict}
# Settings that change how a run executes, not what it computes: free to differ on resume.
_EXECUTION_ONLY = {("data", "num_workers"), ("data", "images"), ("data", "masks"),
                   ("data", "val_images"), ("data", "val_masks"), ("train", "log_every")}


def check_resume_compatible(saved: dict[str, Any], cfg: SegRunConfig) -> None:
    """Resuming must not change what the run computes (the one-cycle schedule spans all epochs,
    so train.epochs is fixed too); folders may move."""
    now = to_dict(cfg)
    for section, table in saved.items():
        for key, value in table.items():
            if (section, key) in _EXECUTION_ONLY:
                continue
            if now.get(section, {}).get(key) != value:
                raise ConfigError(
                    f"{section}.{key}: the run being resumed used {value!r}, this config says "
                    f"{now.get(section, {}).get(key)!r}; resume with the same settings or start "
                    "a new --out-dir")


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, num_classes: int, mean: tuple[float, ...],
             std: tuple[float, ...], device: torch.device,
             autocast: Callable[[], Any]) -> torch.Tensor:
    """The (K, K) confusion matrix (rows: truth, columns: prediction) of ``model`` over
    ``loader``'s (image, mask) batches."""
    model.eval()
    cm = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
    for images, masks in loader:
        images = normalize(images.to(device), mean, std)
        with autocast():
            logits = model(images)
        cm += confusion_matrix(predict_labels(logits.float()), masks.to(device), num_classes,
                               ignore_index=IGNORE_INDEX)
    return cm


def _fmt(values: list[float]) -> str:
    return "nan" if not values else " ".join("nan" if math.isnan(v) else f"{v:.3f}" for v in values)


def train_segmentation(cfg: SegRunConfig, out_dir: str | Path, *, resume: bool = False,
                       say: Callable[[str], None] = lambda msg: None,
                       progress: bool = True) -> SegTrainResult:
    """Train a segmentation UNet as ``cfg`` says, writing everything into ``out_dir``.

    ``say`` receives one-line messages for people (one per epoch with the validation Dice);
    ``progress`` shows a tqdm bar. Without ``resume`` a non-empty ``out_dir`` is refused; with
    it the run continues after the newest saved epoch (or starts fresh, saying so). Raises
    :class:`~diffunet.errors.DiffunetError` subclasses for bad input.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    t = cfg.train
    try:
        accelerator = Accelerator(mixed_precision=t.mixed_precision)
    except ValueError as e:
        raise ConfigError(f"train.mixed_precision={t.mixed_precision!r} cannot run here ({e}); "
                          "use 'bf16' or 'no' on a CPU") from None
    rank, world, main = (accelerator.process_index, accelerator.num_processes,
                         accelerator.is_main_process)
    device = accelerator.device
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size: {t.batch_size} is not divisible by {world} "
                          "processes")
    resume_from = prepare_out_dir(out_dir, resume)  # without resume: refuses a non-empty folder
    saved: dict[str, Any] = {}
    if resume_from is not None:
        saved = st.read_trainer(resume_from, _STATE_KEYS)
        check_resume_compatible(saved["config"], cfg)
        if main:
            say(f"resuming from {resume_from} (epoch {saved['epoch']} of {t.epochs})")
    elif resume and main:
        say(f"no saved state in {out_dir / 'state'}; starting a fresh run")
    accelerator.wait_for_everyone()

    # --- data -----------------------------------------------------------------------------
    data = build_segmentation_data(cfg)
    K = data.num_classes
    n_train = len(data.train)
    if n_train < t.batch_size:
        raise ConfigError(f"train.batch_size: {t.batch_size} is more than the {n_train} "
                          "training pairs; lower it or add data")
    if len(data.val) == 0:
        raise ConfigError("data.val_fraction: the validation split is empty; set "
                          "data.val_fraction > 0 or give data.val_images/val_masks")
    if main:
        for note in data.notes:
            say(note)
    steps_per_epoch = n_train // t.batch_size  # whole global batches: every step the same size
    total_steps = steps_per_epoch * t.epochs
    start_step = int(saved.get("step", 0))
    sampler = GlobalBatchSampler(n_train, t.batch_size, seed=t.seed, start_step=start_step,
                                 rank=rank, world_size=world)
    batches = iter(make_dataloader(data.train, sampler, cfg.data.num_workers,
                                   pin_memory=device.type == "cuda"))
    # Validation: each process takes every world-th item (no padding), and the confusion
    # matrices are summed, so the metrics are exact for any number of processes.
    val_part = Subset(data.val, list(range(rank, len(data.val), world)))
    val_loader = DataLoader(val_part, batch_size=max(1, min(64, 2 * t.batch_size)),
                            num_workers=cfg.data.num_workers)
    mean, std = data.mean, data.std

    # --- model, optimizer, schedule ---------------------------------------------------------
    set_seed(t.seed)  # identical initial weights on every process
    net_cfg = cfg.net_config
    model = UNet(net_cfg)
    counts = class_pixel_counts(data.train, num_classes=K)
    if int(counts[1:].sum()) == 0:
        raise DataError("the training masks hold no foreground pixels (every label is 0 or "
                        "255); check data.masks and data.num_classes")
    # Bias from the class prior (Lin et al. 2017, sec. 4.1): the untrained net predicts the
    # class frequencies rather than an arbitrary split, so early Dice is not stuck at 0.
    init_output_bias_(model.conv_out, counts)
    ema = EMA(model, t.ema_decay, warmup=True) if t.ema_decay is not None else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                                  fused=True if device.type in ("cuda", "cpu") else None)
    if total_steps < 4:
        raise ConfigError(f"train.epochs: {t.epochs} epoch(s) of {steps_per_epoch} step(s) is "
                          f"{total_steps} steps; the one-cycle schedule needs at least 4 (more "
                          "epochs, more data or a smaller train.batch_size)")
    # OneCycleLR divides by each phase's length in steps: keep both phases at least 2 steps
    # long in very short runs (this only changes runs of fewer than 2 / pct_start steps).
    pct = min(max(t.pct_start, 2 / total_steps), 1 - 2 / total_steps)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=t.lr,
                                                    total_steps=total_steps, pct_start=pct)
    flip_gen = torch.Generator().manual_seed(t.seed * 1000 + rank + 1)  # explicit randomness
    if resume_from is not None:
        with state_must_fit(resume_from):
            load_state_into(resume_from, saved, model, ema.model if ema is not None else None,
                            optimizer)
            scheduler.load_state_dict(saved["scheduler"])
            rng_file = resume_from / f"rng_rank{rank}.safetensors"
            if rng_file.is_file():  # absent if resumed on more processes than it had
                rng = st.load_tensors(rng_file)
                flip_gen.set_state(rng.pop("flip_gen"))
                st.set_rng_states(rng)
    if ema is not None:
        ema.model.to(device)
    model, optimizer = accelerator.prepare(model, optimizer)
    net = unwrap_model(model)

    meta = segmentation_metadata(cfg, data)
    if main:
        open_run_folder(out_dir, ("weights", "state"), cfg,
                        start_step if resume_from is not None else None)
        say(f"{n_train} training / {len(data.val)} validation pairs, {K} classes "
            f"({', '.join(data.class_names)}); {steps_per_epoch} steps per epoch; "
            f"{net.num_parameters():,} parameters")
    accelerator.wait_for_everyone()

    def write(record: dict[str, Any]) -> None:
        try:
            with open(out_dir / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise _write_failed(e, "writing log.jsonl", out_dir) from None

    def save(name: str, epoch: int, metrics: dict[str, Any]) -> Path:
        path = out_dir / "weights" / name
        try:
            save_model(path, ema.model if ema is not None else net, None,
                       extra={"segmentation": meta, "epoch": epoch, "metrics": metrics,
                              "run_config": to_dict(cfg)})
        except OSError as e:
            raise _write_failed(e, f"saving {name}", out_dir) from None
        return path

    def save_state(at: int, epoch: int, best: dict[str, Any]) -> None:
        """Everything the next epoch needs, as ``state/step<at>`` (atomic; the newest kept)."""
        accelerator.wait_for_everyone()
        tmp = out_dir / "state" / f".tmp-{st.state_name(at)}"
        if main:
            st.begin_state(out_dir / "state", at)
        accelerator.wait_for_everyone()
        st.save_tensors(tmp / f"rng_rank{rank}.safetensors",
                        {**st.rng_states(), "flip_gen": flip_gen.get_state()})
        if main:
            st.save_tensors(tmp / "model.safetensors", net.state_dict())
            if ema is not None:
                st.save_tensors(tmp / "ema.safetensors", ema.model.state_dict())
            opt_tensors, opt_plain = st.split_optimizer_state(optimizer.state_dict())
            st.save_tensors(tmp / "optimizer.safetensors", opt_tensors)
            st.write_json(tmp / "trainer.json", {
                "format_version": st.STATE_FORMAT_VERSION, "step": at, "epoch": epoch,
                "world_size": world, "best": best, "optimizer": opt_plain,
                "scheduler": scheduler.state_dict(), "config": to_dict(cfg)})
        accelerator.wait_for_everyone()
        if main:
            st.commit_state(tmp, keep_last=1)
        accelerator.wait_for_everyone()

    # --- the loop ---------------------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=start_step, disable=not (main and progress),
               dynamic_ncols=True, unit="step", smoothing=0.05)

    def tell(msg: str) -> None:
        if main:
            with tqdm.external_write_mode():  # keep the bar intact below the message
                say(msg)

    best = saved.get("best", {})
    best_dice = best.get("dice") if best.get("dice") is not None else -math.inf
    best_epoch = best.get("epoch")
    best_path = out_dir / "weights" / "best.safetensors" if best_epoch is not None else None
    last_path = out_dir / "weights" / "last.safetensors" if resume_from is not None else None
    step, run_start = start_step, time.perf_counter()
    epoch = int(saved.get("epoch", 0))
    if epoch >= t.epochs:
        tell(f"the run already finished its {t.epochs} epochs; nothing to do")
    try:
        for epoch in range(epoch + 1, t.epochs + 1):
            model.train()
            epoch_loss = torch.zeros((), device=device)
            interval_loss = torch.zeros((), device=device)
            for _ in range(steps_per_epoch):
                images, masks = next(batches)
                if cfg.data.random_flip or cfg.data.vertical_flip:
                    images, masks = joint_flip(images, masks, flip_gen,
                                               horizontal=cfg.data.random_flip,
                                               vertical=cfg.data.vertical_flip)
                images = normalize(images.to(device, non_blocking=True), mean, std)
                masks = masks.to(device, non_blocking=True)
                with accelerator.autocast():
                    logits = model(images)
                loss = segmentation_loss(logits.float(), masks, dice_weight=t.dice_weight,
                                         ignore_index=IGNORE_INDEX)
                accelerator.backward(loss)
                if t.grad_clip is not None:
                    accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(net, step)
                step += 1
                epoch_loss += loss.detach()
                interval_loss += loss.detach()
                bar.update(1)
                if step % t.log_every == 0:
                    # The loss is read on the host only here, not every step.
                    mean_loss = accelerator.reduce(interval_loss, "mean") / t.log_every
                    if main:
                        record = {"step": step, "epoch": epoch, "loss": round(mean_loss.item(), 6),
                                  "lr": scheduler.get_last_lr()[0],
                                  "elapsed_s": round(time.perf_counter() - run_start, 2)}
                        write(record)
                        bar.set_postfix(epoch=epoch, loss=f"{record['loss']:.4f}",
                                        lr=f"{record['lr']:.2e}")
                    interval_loss.zero_()

            if not torch.isfinite(epoch_loss):
                raise ConfigError(f"the loss became non-finite in epoch {epoch}; try a lower "
                                  "train.lr or train.mixed_precision='no'")
            eval_model = ema.model if ema is not None else net
            cm = evaluate(eval_model, val_loader, K, mean, std, device, accelerator.autocast)
            if world > 1:
                cm = accelerator.reduce(cm, "sum")
            dice, iou = dice_iou(cm.cpu())
            mean_dice = mean_foreground(dice)
            mean_iou = mean_foreground(iou)
            train_loss = (accelerator.reduce(epoch_loss, "mean") / steps_per_epoch).item()
            is_best = not math.isnan(mean_dice) and mean_dice > best_dice
            metrics = {"val_dice": [None if math.isnan(v) else round(float(v), 6) for v in dice],
                       "val_iou": [None if math.isnan(v) else round(float(v), 6) for v in iou],
                       "val_mean_dice": None if math.isnan(mean_dice) else round(mean_dice, 6),
                       "val_mean_iou": None if math.isnan(mean_iou) else round(mean_iou, 6)}
            if main:
                last_path = save("last.safetensors", epoch, metrics)
                if is_best:
                    best_path = save("best.safetensors", epoch, metrics)
                write({"step": step, "epoch": epoch, "train_loss": round(train_loss, 6),
                       **metrics, "best": is_best,
                       "elapsed_s": round(time.perf_counter() - run_start, 2)})
                per_class = ", ".join(f"{name} {_fmt([float(v)])}" for name, v in
                                      zip(data.class_names[1:], dice[1:].tolist()))
                tell(f"epoch {epoch}/{t.epochs}: loss {train_loss:.4f}, validation Dice "
                     f"{_fmt([mean_dice])} ({per_class}), IoU {_fmt([mean_iou])}"
                     + (" [best]" if is_best else ""))
            if is_best:
                best_dice, best_epoch = mean_dice, epoch
            try:
                save_state(step, epoch, {"dice": best_dice if best_epoch is not None else None,
                                         "epoch": best_epoch})
            except OSError as e:
                if main:
                    st.clear_leftovers(out_dir)
                raise _write_failed(e, f"saving state {st.state_name(step)}", out_dir) from None
    except KeyboardInterrupt:
        tell(f"interrupted in epoch {epoch}; " + (
            f"the state after epoch {epoch - 1} is saved, continue with --resume"
            if epoch > 1 else "no epoch had finished, nothing to resume"))
        raise
    finally:
        bar.close()
    if main and best_path is not None and step > start_step:
        write({"step": step, "best_epoch": best_epoch, "best_mean_dice": round(best_dice, 6),
               "best_model": str(best_path)})
    return SegTrainResult(epochs=t.epochs, best_path=best_path, last_path=last_path,
                          best_epoch=best_epoch,
                          best_dice=None if best_epoch is None else best_dice)
