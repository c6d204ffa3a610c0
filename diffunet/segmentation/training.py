"""``train_segmentation(cfg, out_dir)``: the UNet as a segmentation network, top to bottom.

The same :class:`~diffunet.unet.UNet`, built with ``time_conditioning=False`` and one output per
class (one logit for a binary problem), trained on image/mask pairs on the run harness
(:class:`~diffunet.runs.Run`: Accelerate, the run folder and its lock, resume, states,
signals, the log):

- data: the built-in shapes with their masks, or two folders matched by file name
  (:mod:`diffunet.segmentation.data`); a held-out validation split (or separate validation
  folders); images normalised with ``data.mean``/``data.std`` (ImageNet's by default); random
  flips applied to image and mask together, drawn for the global batch so they do not depend on
  the number of processes;
- loss: cross-entropy (BCE-with-logits for binary) + soft Dice
  (:mod:`diffunet.segmentation.losses`), with the output bias initialised from the class
  frequencies so the first predictions are not all background;
- AdamW with a one-cycle learning rate (Smith & Topin 2019), gradient clipping, optional EMA of
  the weights, mixed precision and several processes through Accelerate;
- after every epoch: Dice and IoU per class on the validation split, one line in ``log.jsonl``,
  ``weights/last.safetensors`` and, when the mean foreground Dice improved,
  ``weights/best.safetensors`` (model files carry the normalisation and class names, so
  ``diffunet segment predict`` needs nothing else), and the training state in ``state/``.
  Ctrl-C or SIGTERM saves the state mid-epoch and stops; ``--resume`` continues from the newest
  state exactly as an uninterrupted run would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from ..checkpoint import model_file_bytes, unwrap_model
from ..config import SegRunConfig, to_dict
from ..data import GlobalBatchSampler, Loader, make_dataloader
from ..errors import ConfigError, DataError, TrainingError
from ..images import IGNORE_INDEX, normalize
from ..runs import EMA, Run, state_must_fit
from ..training import describe_run
from ..unet import UNet
from .data import SegData, build_segmentation_data, class_pixel_counts, joint_flip
from .losses import (confusion_matrix, dice_iou, init_output_bias_, mean_foreground,
                     predict_labels, segmentation_loss)

__all__ = ["SegTrainResult", "evaluate", "segmentation_metadata", "train_segmentation"]

STATE_KEYS: dict[str, type] = {"config": dict, "optimizer": dict, "scheduler": dict,
                               "epoch": int, "best": dict}
"""What a segmentation state's ``trainer.json`` must hold (``epoch``: epochs finished)."""


@dataclass
class SegTrainResult:
    """What a finished (or stopped) segmentation run left behind."""

    epochs: int
    best_path: Path | None
    last_path: Path | None
    best_epoch: int | None
    best_dice: float | None
    """Mean foreground Dice of the best model on the validation split."""
    interrupted: bool = False
    """Stopped by SIGINT/SIGTERM (its state saved) before the last epoch finished."""


def segmentation_metadata(cfg: SegRunConfig, data: SegData) -> dict[str, Any]:
    """What ``diffunet segment predict`` needs to use a model file: stored under the
    ``segmentation`` key of its metadata."""
    return {"num_classes": data.num_classes, "class_names": list(data.class_names),
            "mean": list(data.mean), "std": list(data.std), "image_size": cfg.data.image_size,
            "channels": cfg.data.channels, "ignore_index": IGNORE_INDEX}


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


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3f}"


def _rounded(values: Any) -> list[float | None]:
    return [None if math.isnan(v) else round(float(v), 6) for v in values]


def _one_cycle(optimizer: torch.optim.Optimizer, cfg: SegRunConfig, total_steps: int) -> Any:
    t = cfg.train
    if total_steps < 4:
        raise ConfigError(f"train.epochs: {t.epochs} epoch(s) of {total_steps // t.epochs} "
                          f"step(s) is {total_steps} steps; the one-cycle schedule needs at least "
                          "4 (more epochs, more data or a smaller train.batch_size)")
    # OneCycleLR divides by each phase's length in steps: keep both phases at least 2 steps
    # long in very short runs (this only changes runs of fewer than 2 / pct_start steps).
    pct = min(max(t.pct_start, 2 / total_steps), 1 - 2 / total_steps)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=t.lr, total_steps=total_steps,
                                               pct_start=pct)


def _steps_per_epoch(cfg: SegRunConfig, data: SegData) -> int:
    """Whole global batches per epoch (every step the same size); the data must allow one."""
    b, n_train = cfg.train.batch_size, len(data.train)
    if n_train < b:
        raise ConfigError(f"train.batch_size: {b} is more than the {n_train} training pairs; "
                          "lower it or add data")
    if len(data.val) == 0:
        raise ConfigError("data.val_fraction: the validation split is empty; set "
                          "data.val_fraction > 0 or give data.val_images/val_masks")
    return n_train // b


@dataclass(frozen=True)
class _EpochScore:
    loss: float
    """The epoch's mean training loss over every process."""
    mean_dice: float
    metrics: dict[str, Any]
    """What the log line and the model files record: Dice and IoU per class and their means."""
    text: str
    """The epoch's line for people (without the epoch number)."""


def _score_epoch(run: Run, model: torch.nn.Module, val_loader: Any, data: SegData,
                 mean_loss: torch.Tensor, epoch: int) -> _EpochScore:
    """Validate ``model`` on every process's share of the split and sum the confusion
    matrices: exact Dice and IoU for any number of processes."""
    if not torch.isfinite(mean_loss):
        raise TrainingError(f"the loss became non-finite in epoch {epoch}; try a lower "
                            "train.lr or train.mixed_precision='no'")
    acc = run.accelerator
    cm = evaluate(model, val_loader, data.num_classes, data.mean, data.std, run.device,
                  acc.autocast)
    dice, iou = dice_iou((acc.reduce(cm, "sum") if run.world > 1 else cm).cpu())
    mean_dice, mean_iou = mean_foreground(dice), mean_foreground(iou)
    loss = (acc.reduce(mean_loss, "mean") if run.world > 1 else mean_loss).item()
    per_class = ", ".join(f"{name} {_fmt(float(v))}"
                          for name, v in zip(data.class_names[1:], dice[1:].tolist()))
    return _EpochScore(loss=loss, mean_dice=mean_dice, metrics={
        "val_dice": _rounded(dice), "val_iou": _rounded(iou),
        "val_mean_dice": _rounded([mean_dice])[0], "val_mean_iou": _rounded([mean_iou])[0]},
        text=f"loss {loss:.4f}, validation Dice {_fmt(mean_dice)} ({per_class}), IoU "
             f"{_fmt(mean_iou)}")


def _loaders(cfg: SegRunConfig, data: SegData, run: Run) -> tuple[Iterator[Any], DataLoader]:
    """This process's training batches from the run's step on (the global batch's share, the
    same order for any number of processes) and its share of the validation split: every
    world-th item, no padding, so the summed confusion matrices are exact."""
    t = cfg.train
    batches = iter(make_dataloader(
        data.train, GlobalBatchSampler(len(data.train), t.batch_size, seed=t.seed,
                                       start_step=run.start_step, rank=run.rank,
                                       world_size=run.world),
        cfg.data.num_workers, pin_memory=run.device.type == "cuda"))
    val = Loader(Subset(data.val, list(range(run.rank, len(data.val), run.world))),
                     batch_size=max(1, min(64, 2 * t.batch_size)),
                     num_workers=cfg.data.num_workers)
    return batches, val


def _network(cfg: SegRunConfig, data: SegData) -> UNet:
    """The time-less UNet with its output bias at the class prior (Lin et al. 2017, sec. 4.1):
    the untrained net predicts the class frequencies rather than an arbitrary split, so early
    Dice is not stuck at 0."""
    model = UNet(cfg.net_config)
    counts = class_pixel_counts(data.train, num_classes=data.num_classes)
    if int(counts[1:].sum()) == 0:
        raise DataError("the training masks hold no foreground pixels (every label is 0 or "
                        "255); check data.masks and data.num_classes")
    init_output_bias_(model.conv_out, counts)
    return model


def _train_step(run: Run, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any, cfg: SegRunConfig, data: SegData, images: torch.Tensor,
                masks: torch.Tensor) -> torch.Tensor:
    """One optimisation step on this process's (image, mask) batch; returns the loss (0-d)."""
    t, acc, device = cfg.train, run.accelerator, run.device
    model.train()
    with acc.autocast():
        logits = model(normalize(images.to(device, non_blocking=True), data.mean, data.std))
    loss = segmentation_loss(logits.float(), masks.to(device, non_blocking=True),
                             dice_weight=t.dice_weight, ignore_index=IGNORE_INDEX)
    acc.backward(loss)
    if t.grad_clip is not None:
        acc.clip_grad_norm_(model.parameters(), t.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _header(run: Run, cfg: SegRunConfig, data: SegData, net: UNet, steps_per_epoch: int
            ) -> list[str]:
    """What a run is about to do, in five lines before its first step."""
    d, u, t = cfg.data, cfg.unet, cfg.train
    where = (f"{d.images} + {d.masks}" if d.source == "folder" else "shapes with masks "
             "(generated)")
    kind = {1: "grayscale", 3: "RGB"}.get(u.in_channels, f"{u.in_channels}-channel")
    n = net.num_parameters()
    return [f"data: {d.source} {where}, {len(data.train):,} training / {len(data.val):,} "
            f"validation pairs, {data.num_classes} classes ({', '.join(data.class_names)}), "
            f"{u.image_size}x{u.image_size} {kind}",
            f"model: UNet without timestep input, {n:,} parameters ({n / 1e6:.2f}M; "
            f"base_channels {u.base_channels}, channel_mults {tuple(u.channel_mults)})",
            *describe_run(run, t.mixed_precision, t.batch_size, 1,
                          f"{t.epochs} epochs of {steps_per_epoch} steps (steps {run.start_step} "
                          f"-> {steps_per_epoch * t.epochs}), scored and saved every epoch")]


def train_segmentation(cfg: SegRunConfig, out_dir: str | Path, *, resume: bool = False,
                       say: Callable[[str], None] = lambda msg: None,
                       progress: bool = True, config_source: str | None = None
                       ) -> SegTrainResult:
    """Train a segmentation UNet as ``cfg`` says, writing everything into ``out_dir``
    (``config_source``: the header's first line, as :func:`diffunet.training.train`'s).

    ``say`` receives one-line messages for people (one per epoch with the validation Dice);
    ``progress`` shows a tqdm bar. Without ``resume`` a non-empty ``out_dir`` is refused; with
    it the run continues from the newest saved state (or starts fresh, saying so). Raises
    :class:`~diffunet.errors.DiffunetError` subclasses for bad input.
    """
    t = cfg.train
    with Run(cfg, out_dir, resume=resume, command="segment train", batch_size=t.batch_size,
             mixed_precision=t.mixed_precision, state_keys=STATE_KEYS, static_graph=True,
             image_shape=(cfg.unet.in_channels, cfg.unet.image_size), net=cfg.net_config,
             say=say, progress=progress) as run:
        saved, step, device = run.saved, run.start_step, run.device
        data = build_segmentation_data(cfg)
        steps_per_epoch = _steps_per_epoch(cfg, data)
        total = steps_per_epoch * t.epochs
        if run.resume_from is not None:
            into = step - saved["epoch"] * steps_per_epoch
            run.tell(f"resuming from {run.resume_from} (epoch {saved['epoch']} of {t.epochs}"
                     + (f", {into} steps into epoch {saved['epoch'] + 1})" if into else ")"))
        for note in data.notes:
            run.tell(note)
        batches, val_loader = _loaders(cfg, data, run)

        # --- model, optimizer, schedule, and the saved state when resuming -------------------
        run.seed_everything(t.seed)  # identical initial weights on every process
        model = _network(cfg, data)
        ema = EMA(model, t.ema_decay, warmup=True) if t.ema_decay is not None else None
        optimizer = run.adamw(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        scheduler = _one_cycle(optimizer, cfg, total)
        flip_gen = torch.Generator().manual_seed(t.seed)  # the same on every process
        own = run.restore(model, optimizer, ema=ema.model if ema else None,
                          generators={"flip_gen": flip_gen})
        if run.resume_from is not None:
            with state_must_fit(run.resume_from):
                scheduler.load_state_dict(saved["scheduler"])
        if ema is not None:
            ema.model.to(device)
        model, optimizer = run.prepare(model, optimizer, t.seed)
        net = unwrap_model(model)
        run.open_folder(("weights", "state"))
        if step < total:
            for line in [*([config_source] if config_source else []),
                         *_header(run, cfg, data, net, steps_per_epoch)]:
                run.tell(line)
        meta = segmentation_metadata(cfg, data)

        def save_model_file(name: str, epoch: int, metrics: dict[str, Any]) -> Path:
            # into the run's weights/, relative to its descriptor (never through a link)
            return run.write(f"saving {name}", lambda: run.write_file("weights", name,
                             model_file_bytes(ema.model if ema is not None else net, None, extra={
                                 "segmentation": meta, "epoch": epoch, "metrics": metrics,
                                 "run_config": to_dict(cfg)})))

        # --- the loop: global steps; an epoch ends every steps_per_epoch ---------------------
        best = saved.get("best", {})
        best_dice = best["dice"] if best.get("dice") is not None else -math.inf
        best_epoch = best.get("epoch")
        best_path = run.out_dir / "weights" / "best.safetensors" if best_epoch is not None else None
        last_path = run.out_dir / "weights" / "last.safetensors" if run.resume_from else None
        # This process's loss sums so far in the epoch and since the last log line.
        sums = {k: own.get(k, torch.zeros(())).to(device) for k in ("epoch_loss", "interval")}
        per_process = t.batch_size // run.world
        mine = slice(run.rank * per_process, (run.rank + 1) * per_process)
        run.progress(total)
        if step >= total:
            run.tell(f"the run already finished its {t.epochs} epochs; nothing to do")
        run_start, stopping = time.perf_counter(), False
        while step < total:
            epoch = step // steps_per_epoch + 1
            images, masks = next(batches)
            coins = [(torch.rand(t.batch_size, generator=flip_gen) < 0.5)[mine] for _ in "hv"]
            images, masks = joint_flip(images, masks, coins[0] if cfg.data.random_flip else None,
                                       coins[1] if cfg.data.vertical_flip else None)
            loss = _train_step(run, model, optimizer, scheduler, cfg, data, images, masks)
            if ema is not None:
                ema.update(net, step)
            step += 1
            for v in sums.values():
                v += loss
            run.bar.update(1)
            stopping = run.should_stop(step % t.log_every == 0 or step % steps_per_epoch == 0)
            if step % t.log_every == 0:  # the loss is read on the host only here
                interval = run.accelerator.reduce(sums["interval"], "mean") / t.log_every
                mean_loss = round(interval.item(), 6)
                run.log({"step": step, "epoch": epoch, "loss": mean_loss,
                         "lr": scheduler.get_last_lr()[0],
                         "elapsed_s": round(time.perf_counter() - run_start, 2)},
                        postfix={"epoch": epoch, "loss": f"{mean_loss:.4f}",
                                 "lr": f"{scheduler.get_last_lr()[0]:.2e}"})
                sums["interval"].zero_()
            if step % steps_per_epoch == 0:  # the epoch is over: score it, save, report
                score = _score_epoch(run, ema.model if ema is not None else net, val_loader,
                                     data, sums["epoch_loss"] / steps_per_epoch, epoch)
                sums["epoch_loss"].zero_()
                is_best = not math.isnan(score.mean_dice) and score.mean_dice > best_dice
                last_path = save_model_file("last.safetensors", epoch, score.metrics)
                if is_best:
                    best_path = save_model_file("best.safetensors", epoch, score.metrics)
                    best_dice, best_epoch = score.mean_dice, epoch
                run.log({"step": step, "epoch": epoch, "train_loss": round(score.loss, 6),
                         **score.metrics, "best": is_best,
                         "elapsed_s": round(time.perf_counter() - run_start, 2)})
                run.tell(f"epoch {epoch}/{t.epochs}: {score.text}" + (" [best]" if is_best else ""))
            if step % steps_per_epoch == 0 or stopping:
                run.save_state(step, tensors={"model": net.state_dict(), **(
                    {"ema": ema.model.state_dict()} if ema is not None else {})},
                    optimizer=optimizer, generators={"flip_gen": flip_gen}, keep_last=1,
                    rank_tensors=sums, trainer={
                        "epoch": step // steps_per_epoch, "scheduler": scheduler.state_dict(),
                        "best": {"dice": best_dice if best_epoch is not None else None,
                                 "epoch": best_epoch}})
            if stopping:
                run.tell(f"stopped by {run.stop_signal or 'a signal'} at step {step} (epoch "
                         f"{epoch} of {t.epochs}); state saved in {run.out_dir / 'state'}; "
                         "continue with --resume")
                break
        if step == total and step > run.start_step and best_path is not None:
            run.log({"step": step, "best_epoch": best_epoch, "best_mean_dice": round(best_dice, 6),
                     "best_model": str(best_path)})
    return SegTrainResult(epochs=t.epochs, best_path=best_path, last_path=last_path,
                          best_epoch=best_epoch, interrupted=stopping,
                          best_dice=None if best_epoch is None else best_dice)
