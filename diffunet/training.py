"""``train(cfg, out_dir)``: the diffusion training loop, top to bottom, on the run harness.

:class:`~diffunet.runs.Run` owns what every run shares (Accelerate, the run folder and its lock,
resume, the state protocol, signals, the log and progress); this module is the loop itself.
What makes it exact:

- Every random draw of a step (the formulation's levels, noise, flips, label dropout) comes
  from one ``torch.Generator`` seeded from ``train.seed``, drawn for the *global* batch on every
  process, and sliced to this process's share. So a run gives the same batches whatever the
  number of processes, and its state is one generator state.
- The data order comes from :class:`~diffunet.data.GlobalBatchSampler`: resuming at step s starts
  the stream at step s without reading the skipped images.
- The saved state holds everything that changes while training (weights, EMA, the post-hoc
  EMA profiles, optimizer, grad scaler, generators, every process's RNG, counters), so N steps
  and N/2 + resume + N/2 steps give identical weights on the CPU.

The carried guide (autoguidance by the run's own earlier EMA, Karras et al. 2024, "Guiding a
Diffusion Model with a Bad Version of Itself"): at step ``train.guide_step`` the classic EMA is
copied and kept (part of the state, ``guide.safetensors``); every model file written after that
step carries it (:class:`~diffunet.checkpoint.CarriedGuide`) and the previews after it
autoguide with it (``sample.guide_scale``).

Post-hoc EMA (:mod:`diffunet.phema`): the ``train.phema_sigma_rels`` profiles are updated after
every optimizer step (skipped steps leave them as they are, like the classic EMA) and written
as snapshots into ``RUN/phema/`` every ``train.phema_every`` steps, at the last step and at a
stop (:mod:`diffunet.phema_files`), before the state of that step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from . import phema_files
from . import state as st
from .checkpoint import CarriedGuide, load_guide_model, model_file_bytes, unwrap_model
from .config import RunConfig, TrainConfig, to_dict
from .data import (GlobalBatchSampler, HFStream, build_dataset, flip_where, make_dataloader,
                   skipped_note)
from .conditioning import with_dropout
from .data_space import DataSpace, load_space
from .tasks import drawn_condition, finished, shown_condition, split_given
from .latent_cache import training_set
from .errors import ConfigError, StopRequested, TrainingError
from .formulations import Formulation, make_schedule
from .fileio import encode_image
from .images import make_grid_image
from .phema import PowerEMA
from .runs import EMA, Run, state_must_fit
from .guidance import carried_guide_weight
from .samplers import check_sigma_range, sample
from .unet import UNet

__all__ = ["EMA", "GuideKeeper", "TrainResult", "fit_classes_to_data", "lr_at", "preview_guide",
           "train"]

STATE_KEYS: dict[str, type] = {"config": dict, "optimizer": dict, "nonfinite_total": int,
                               "nonfinite_streak": int, "run_id?": str, "guide_step?": int}
"""What a diffusion state's ``trainer.json`` must hold (besides the harness's own keys)."""


@dataclass
class TrainResult:
    """What a finished (or interrupted) run left behind."""

    step: int
    model_path: Path | None
    state_path: Path | None
    interrupted: bool
    nonfinite_skipped: int


def lr_at(cfg: RunConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up to ``train.lr`` over
    ``train.warmup_steps``, then constant, or a cosine or linear decay that reaches zero at
    step ``train.max_steps``: the decay's progress p = (step - warmup) / (max_steps - warmup)
    gives lr (1 + cos(pi p)) / 2 or lr (1 - p). The last optimizer step, ``max_steps - 1``,
    therefore still moves the weights (linear: lr / (max_steps - warmup)); a step at lr 0
    would be wasted."""
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    if t.lr_schedule == "cosine":
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return t.lr * (1.0 - progress)


def _dataset_notes(dataset: Any, cfg: RunConfig) -> list[str]:
    """What people should know about an image folder: unreadable and upscaled files."""
    notes, where = [], cfg.data.path
    if getattr(dataset, "skipped", None):
        notes.append(skipped_note(dataset.skipped, str(where)))
    if getattr(dataset, "upscaled", None):
        notes.append(f"note: {len(dataset.upscaled)} of {len(dataset)} images in {where} are "
                     f"smaller than data.image_size={cfg.data.image_size} and are upscaled (e.g. "
                     f"{dataset.upscaled[0]}), which blurs them; a smaller image_size avoids that")
    return notes


def fit_classes_to_data(cfg: RunConfig, class_names: Sequence[str] | None) -> RunConfig:
    """``cfg`` with ``unet.num_classes`` set from an image folder's class folders.

    With ``data.source = 'folder'`` and ``data.class_folders = true``, ``class_names`` are the
    class sub-folders (:func:`~diffunet.data.class_folder_names`): an unset ``unet.num_classes``
    becomes their number (so config.json and every model file say it), and a set one that
    differs is a one-line :class:`ConfigError`. Any other data: ``cfg`` unchanged (built-in and
    torchvision labels need an explicit ``unet.num_classes``).
    """
    d, k = cfg.data, cfg.unet.num_classes
    if d.source != "folder" or not d.class_folders or class_names is None:
        return cfg
    n = len(class_names)
    if k is None:
        return dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, num_classes=n))
    if k != n:
        shown = ", ".join(class_names[:8]) + (", ..." if n > 8 else "")
        raise ConfigError(f"unet.num_classes is {k} but data.path {d.path} has {n} class "
                          f"folders ({shown}) with data.class_folders=true; set "
                          f"unet.num_classes={n} or leave it unset (it follows the folders)")
    return cfg


def _class_names(cfg: RunConfig, dataset: Any) -> list[str] | None:
    """The names of a class-conditional model's labels 0..K-1, for its model files (None when
    the model is unconditional or the data set names no classes that fit)."""
    names = getattr(dataset, "class_names", None)
    k = cfg.unet.num_classes
    return list(names) if k is not None and names and len(names) == k else None


def _check_labels(cfg: RunConfig, dataset: Any) -> None:
    k = cfg.unet.num_classes
    if k is not None and dataset.num_classes != k:
        have = ("no class labels" if dataset.num_classes is None
                else f"{dataset.num_classes} classes")
        raise ConfigError(f"unet.num_classes is {k} but the data set has {have}; set "
                          "unet.num_classes to match or unset it for an unconditional model")


def _log(run: Run, cfg: RunConfig, step: int, loss_sum: Tensor, grad_sums: Tensor, steps: int,
         seconds: float, elapsed: float, nonfinite: int) -> None:
    """One ``log.jsonl`` line for the ``steps`` good steps since the last (the sums are read on
    the host only here, in one all-reduce and one read): step, mean loss over every process,
    lr, images/s, counters, and the gradient's global norm before clipping: its mean over the
    interval (``grad_norm``) and, with ``train.grad_clip`` set, the fraction of the steps it
    exceeded it, i.e. that were clipped (``grad_clipped``). ``grad_sums`` (2,) holds the two
    sums (:func:`_grad_sums`); the gradients are all-reduced before the norm, so it is the same
    on every process, and the mean over the processes leaves it as it is."""
    sums = torch.cat([loss_sum.reshape(1), grad_sums.to(loss_sum.dtype)])
    if run.world > 1:
        sums = run.accelerator.reduce(sums, "mean")
    loss_total, norm_total, clipped = sums.tolist()
    loss, norm, share = ((loss_total / steps, norm_total / steps, clipped / steps) if steps
                         else (None, None, None))
    lr = lr_at(cfg, step - 1)
    rate = round(cfg.train.batch_size * max(1, steps) / max(seconds, 1e-9), 2)
    record = {"step": step, "loss": loss, "lr": lr, "images_per_s": rate,
              "nonfinite_skipped": nonfinite, "elapsed_s": round(elapsed, 2), "grad_norm": norm}
    if cfg.train.grad_clip is not None:
        record["grad_clipped"] = share
    run.log(record, postfix={"loss": "nan" if loss is None else f"{loss:.4f}", "lr": f"{lr:.2e}",
                             "img_s": rate})


def _grad_sums(norm: Tensor, bad: Tensor, clip: float | None) -> Tensor:
    """A step's share of the interval's gradient sums, (2,) float32 on the device: its global
    gradient norm before clipping and whether it exceeded ``clip`` (0 or 1), both 0 for a
    skipped (non-finite) step. No host sync."""
    norm = norm.float()
    clipped = norm > clip if clip is not None else torch.zeros_like(bad)
    return torch.where(bad, 0.0, torch.stack([norm, clipped.float()]))


def _step_inputs(cfg: RunConfig, schedule: Formulation, space: DataSpace, gen: torch.Generator,
                 batch: Tensor, labels: Tensor, mine: slice
                 ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """A step's randomness, drawn on the generator's device for the GLOBAL batch B and sliced
    to this process's rows ``mine`` (so every process, and any number of them, sees the same
    global batch): the noise levels (b,), noise (b, C, H, W), flips, the data space's own draw
    (a latent from each posterior), label dropout. ``batch`` (the loader's: images (b, C, H,
    W), or the latent cache's posteriors) and ``labels`` (b,) are on that device. Returns x0,
    noise, levels and the condition (:mod:`diffunet.conditioning`: ``{"class_labels": (b,)}``
    after dropout for a class-conditional model, empty for an unconditional one).

    The levels are the formulation's own draw
    (:meth:`~diffunet.formulations.base.Formulation.sample_levels`: VP's integer timesteps,
    EDM's log-normal sigmas, flow's shifted t); the formulations differ in a training step only
    there and in the objective (:func:`step_loss`), so ``train()`` has no branch and every
    formulation shares the generator (hence exact resume), noise, flips, labels and
    micro-batching."""
    B, dev = cfg.train.batch_size, gen.device
    # a paired task's items stack the target and its input (tasks.split_given)
    batch, given = split_given(cfg.data.task, batch, cfg.unet.in_channels)
    levels = schedule.sample_levels(B, gen)[mine]
    noise = torch.randn((B, *space.batch_state_shape(batch)), generator=gen, device=dev)[mine]
    flips = ((torch.rand(B, generator=gen, device=dev) < 0.5)[mine] if cfg.data.random_flip
             else None)
    x0 = space.training_x0(batch, flips, gen, mine, B)
    k = cfg.unet.num_classes
    cond = {} if k is None else {"class_labels": labels}
    if cfg.data.task is not None:  # the condition image: a function of the (flipped) image
        if given is not None and flips is not None:  # paired: the input flips with its target
            given = flip_where(given, flips)
        cond["cond_image"] = drawn_condition(cfg.data.task, x0, cfg.data.superres_factor, gen,
                                             B, mine, given)  # (and of inpaint's masks)
    if not cond:
        return x0, noise, levels, cond
    # classifier-free guidance's training dropout (diffunet/conditioning.py): the dropped rows
    # take the null condition (the "no label" index k, a zero image)
    drop = (torch.rand(B, generator=gen, device=dev) < cfg.train.label_dropout)[mine]
    return x0, noise, levels, with_dropout(cond, drop, lambda: k)


def step_loss(model: Callable[..., Tensor], schedule: Formulation, x0: Tensor, noise: Tensor,
              t: Tensor, cond: dict[str, Tensor], min_snr_gamma: float | None) -> Tensor:
    """The training objective of a (micro-)batch, a 0-d tensor: the mean of the formulation's
    per-image loss (:meth:`~diffunet.formulations.base.Formulation.loss`: noising ``x0``
    (b, C, H, W) with ``noise`` to the levels ``t`` (b,), the network call and the weighted
    loss) under the condition ``cond`` (:mod:`diffunet.conditioning`, empty for none). This is
    what ``train.compile`` compiles (one graph, forward and loss).
    ``min_snr_gamma`` applies where the formulation takes it (VP); the training header says when
    it does not."""
    return schedule.loss(model, x0, noise, t, cond=cond, min_snr_gamma=min_snr_gamma).mean()


def _backward(run: Run, model: torch.nn.Module, loss_fn: Callable[..., Tensor],
              schedule: Formulation, cfg: RunConfig, x0: Tensor, noise: Tensor, t: Tensor,
              cond: dict[str, Tensor]) -> Tensor:
    """Forward and backward over the process's batch in ``grad_accum_steps`` micro-batches
    (gradients synchronised on the last one); returns the mean loss, a 0-d device tensor."""
    acc, k = run.accelerator, cfg.train.grad_accum_steps
    micro = x0.shape[0] // k
    total = torch.zeros((), device=run.device)
    for i in range(k):
        mb = slice(i * micro, (i + 1) * micro)
        with contextlib.nullcontext() if i == k - 1 else acc.no_sync(model):
            with acc.autocast():
                loss = loss_fn(model, schedule, x0[mb], noise[mb], t[mb],
                               {key: value[mb] for key, value in cond.items()},
                               cfg.train.min_snr_gamma)
            acc.backward(loss / k)
        total += loss.detach() / k
    return total


def _grad_norm(parameters: Any) -> Tensor:
    """The global L2 norm of the gradients (0-d, on their device), without a host sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _update(run: Run, cfg: RunConfig, model: torch.nn.Module, optimizer: Any, ema: EMA,
            net: torch.nn.Module, step: int, loss: Tensor, phema: PowerEMA | None = None
            ) -> tuple[Tensor, Tensor]:
    """Clip, take the optimizer step and update the EMA and the post-hoc EMA profiles, unless
    the step went non-finite (its loss or gradients) on any process: returns that flag, a 0-d
    bool device tensor, and the gradients' global norm before clipping (0-d, on the device, for
    the log).

    The skip is decided on the device, with no host sync: the fused AdamW skips through its
    ``found_inf`` (what the grad scaler uses; with fp16 the scaler's own takes its place) and
    the averages through a zero weight, so all stay exactly as they were. An optimizer without
    ``found_inf`` support decides on the host (one sync)."""
    t = cfg.train
    if t.grad_clip is not None:
        norm = run.accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
    else:  # fp16: the true gradients' norm, unscaled as clipping would (a no-op otherwise)
        run.accelerator.unscale_gradients()
        norm = _grad_norm(model.parameters())
    bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
    if run.world > 1:  # a device all-reduce, no host read: every process skips alike
        bad = run.accelerator.reduce(bad.float(), "sum") > 0
    for group in optimizer.param_groups:
        group["lr"] = lr_at(cfg, step)
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds it
    if inner.param_groups[0].get("fused"):
        inner.found_inf = bad.float()
        optimizer.step()
        inner.__dict__.pop("found_inf", None)
    elif not bool(bad):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema.update(net, step, keep=~bad)
    if phema is not None:
        phema.update(net, step + 1, keep=~bad)  # t: the 1-based step just taken
    return bad, norm


def preview_guide(cfg: RunConfig) -> UNet | None:
    """The network ``sample.guide_model`` names (autoguidance of the previews), read and checked
    against the run's formulation, schedule, image shape and classes (one line if it cannot
    guide them), on the CPU in eval mode; None without one. Called before a run starts."""
    if cfg.sample.guide_model is None:
        return None
    like = SimpleNamespace(config=cfg.unet)  # the run's network, not built yet
    guide, _ = load_guide_model(cfg.sample.guide_model, like, make_schedule(cfg.schedule),
                                name="sample.guide_model")
    return guide.eval()


class GuideKeeper:
    """The carried guide while training: the step whose classic EMA becomes it (``at``; None:
    no guide) and, once taken, a detached copy of that EMA network (``net``, on the EMA's
    device, eval mode) and the step it is of (``step``: ``at``, or an earlier step a resumed
    state kept when a longer ``train.max_steps`` moved ``at`` past the resumed step)."""

    def __init__(self, at: int | None, scale: float) -> None:
        self.at, self.scale = at, scale
        self.net: UNet | None = None
        self.step: int | None = None

    def take(self, ema: EMA, step: int) -> None:
        """Keep the EMA network as it is after step ``step`` (a copy: training goes on)."""
        self.net = copy.deepcopy(ema.model).eval().requires_grad_(False)
        self.step = step

    def due(self, step: int) -> bool:
        """Whether the EMA after ``step`` is the guide and not yet taken."""
        return self.at == step and self.step != step

    def after(self, step: int) -> CarriedGuide | None:
        """The guide a model file (or a preview) of step ``step`` carries: the kept one, for
        steps after its own (the file of its own step IS it: a model guiding itself changes
        nothing, D + w (D - D) = D)."""
        if self.net is None or self.step is None or step <= self.step:
            return None
        return CarriedGuide(self.net, self.step, self.scale)


def _guide_on_resume(run: Run, cfg: RunConfig) -> tuple[int | None, bool]:
    """Which step's EMA is the carried guide of this (maybe resumed) run, and whether the state
    being resumed holds it already. The guide is the EMA of ``train.guide_step`` of this config
    wherever that step is still ahead (or is the resumed one), as an uninterrupted run with
    this config would have it: a longer ``max_steps`` re-takes it there (saying so). Where it
    has passed, the state's guide is kept if it is that step's, or if only ``max_steps`` moved
    the step (saying so); a changed ``train.guide_at`` whose step has passed is refused (its
    EMA is gone); a state from before carried guides, or one whose guide step passed without
    one, continues with no guide, saying so. Returns ``(step or None, held)``."""
    g = cfg.train.guide_step
    if run.resume_from is None:
        return g, False
    at, saved = run.start_step, run.saved
    held = saved.get("guide_step")
    if g is None:
        if held is not None:
            run.tell(f"note: train.guide_at = 0: the guide {run.resume_from} holds (the EMA of "
                     f"step {held}) is dropped; model files from now on carry none")
        return None, False
    if g >= at:
        if held is not None and held != g:
            run.tell(f"note: the carried guide moves from the EMA of step {held} to that of "
                     f"step {g} (train.guide_at {cfg.train.guide_at:g} x train.max_steps "
                     f"{cfg.train.max_steps})")
        return g, held == g
    if held == g:
        return g, True
    was = (saved.get("config") or {}).get("train", {}).get("guide_at")
    if was is None:
        run.tell(f"note: {run.resume_from} was saved by a diffunet without carried guides, "
                 f"after step {g} (train.guide_at x train.max_steps) whose EMA would be the "
                 "guide; this run's model files carry none (a new run does)")
        return None, False
    if was != cfg.train.guide_at:
        raise ConfigError(
            f"train.guide_at: the run being resumed used {was!r}; {cfg.train.guide_at!r} would "
            f"keep the EMA of step {g} as the carried guide, which this run passed (it is at "
            f"step {at}) and no longer has; resume with train.guide_at={was!r}, or at least "
            f"{at / cfg.train.max_steps:.4g} (a step still ahead), or start a new --out-dir")
    if held is not None:
        run.tell(f"note: the carried guide stays the EMA of step {held}: train.guide_at x "
                 f"train.max_steps is now step {g}, which this run passed (it is at step {at})")
        return held, True
    run.tell(f"note: no carried guide: train.guide_at x train.max_steps is now step {g}, which "
             f"this run passed without keeping its EMA (it is at step {at}); this run's model "
             "files carry none")
    return None, False


def _preview_targets(cfg: RunConfig, dataset: Any) -> Tensor | None:
    """A task run's preview images (the first ``sample.num_images`` of the data set, (N, C, S,
    S) in [-1, 1]; a paired run's stacked with their inputs, (N, 2C, S, S)), whose condition
    images the previews are sampled from; None without a task."""
    if cfg.data.task is None:
        return None
    n = cfg.sample.num_images
    if isinstance(dataset, HFStream):  # no indexing: the first images of the first epoch
        return next(dataset.batches(n, seed=cfg.train.seed, start_step=0, rank=0,
                                    world_size=1))[0]
    return torch.stack([dataset[i % len(dataset)][0] for i in range(n)])


def _preview_fn(cfg: RunConfig, ema: EMA, schedule: Formulation, run: Run, space: DataSpace,
                guide: UNet | None = None, carried: GuideKeeper | None = None,
                targets: Tensor | None = None) -> Callable[[int], None]:
    """The preview grid writer: the EMA model sampled with ``cfg.sample`` (guided by ``guide``
    where ``sample.guide_model`` names one, else, after the guide step, by the ``carried``
    guide with weight ``sample.guide_scale``) from the same noise (and labels) every time, so
    the grids are comparable, and decoded to images by the data ``space``. A task run
    (``targets``: :func:`_preview_targets`) samples from their condition images and shows each
    as condition | sample | target side by side."""
    s, seed, k = cfg.sample, cfg.train.seed, cfg.unet.num_classes
    if guide is not None:
        guide.to(run.device)
    C, H = cfg.unet.in_channels, cfg.unet.image_size
    x_T = torch.randn((s.num_images, C, H, H), generator=torch.Generator().manual_seed(seed + 1))
    labels = torch.arange(s.num_images) % k if k is not None else None
    cond: dict[str, Tensor] = {}
    if targets is not None:
        assert cfg.data.task is not None
        targets, given = split_given(cfg.data.task, targets, C)
        cond["cond_image"] = drawn_condition(cfg.data.task, targets, cfg.data.superres_factor,
                                             torch.Generator().manual_seed(seed + 3),
                                             given=given)

    base_kwargs = s.sample_kwargs()
    base_kwargs["clip_x0"] = space.clip_x0(base_kwargs["clip_x0"])  # latents: no clip
    drawn: dict[str, Any] = {}  # the newest grid (main process), for the trackers

    def cut(*_: Any) -> None:
        if run.stop_signal is not None:
            raise StopRequested  # a preview can take minutes

    def draw_and_save(name: str, step: int) -> bool:
        kwargs, weak = dict(base_kwargs), guide  # a fresh copy: the guide may set its weight
        own = carried.after(step) if carried is not None and guide is None else None
        if own is not None and s.guide_scale != 1.0:  # autoguidance comes before CFG
            weak = own.net  # at the weight diffunet sample gives it at this many steps
            kwargs["guidance_scale"] = carried_guide_weight(s.guide_scale, s.num_steps)
        elif weak is None and s.guidance_scale == 1.0:
            kwargs["guidance_interval"] = None  # for the carried guide, not taken yet
        try:
            with run.accelerator.autocast():
                images = space.decode(sample(
                    ema.model, schedule, x_T.to(run.device),
                    class_labels=None if labels is None else labels.to(run.device),
                    cond={key: value.to(run.device) for key, value in cond.items()},
                    generator=torch.Generator().manual_seed(seed + 2), callback=cut,
                    guide_model=weak, **kwargs))
        except StopRequested:  # a signal asked the run to stop: no grid, the loop saves next
            return False
        images, nrow = images.float().cpu(), None
        if targets is not None:  # condition | sample | target, image by image
            images = finished(cfg.data.task, images, cond["cond_image"])
            shown_cond = shown_condition(cfg.data.task, cond["cond_image"], images.shape[1])
            images = torch.stack([shown_cond, images, targets.float()], 1).flatten(0, 1)
            nrow = 3 * math.ceil(math.sqrt(s.num_images))
        drawn["grid"] = make_grid_image(images, nrow=nrow)
        # into the run's samples/, relative to its descriptor (never through a link); a
        # preview need not survive a power cut
        run.write_file("samples", name, encode_image(drawn["grid"], name), durable=False)
        return True

    def write(step: int) -> None:  # the main process samples; the others wait for it
        name = f"{st.state_name(step)}.png"
        if run.write(f"writing preview {name}", lambda: draw_and_save(name, step)):
            run.log_image("preview", drawn.pop("grid", None), step)  # to the trackers (main)

    return write


def _describe_data(dataset: Any, source: str, where: str, images: str) -> str:
    """The header's data line: ``source`` (and ``where`` it is read from), how many ``images``
    (e.g. "16x16 RGB") and which classes (their names, the first few)."""
    text = f"data: {source}" + (f" {where}" if where else "")
    text += (f", streamed, images of {images}" if isinstance(dataset, HFStream)
             else f", {len(dataset):,} images of {images}")
    names = getattr(dataset, "class_names", None)
    if names:
        shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
        text += f", {len(names)} classes ({shown})"
    return text


def describe_run(run: Run, precision: str, batch_size: int, grad_accum_steps: int,
                 plan: str) -> list[str]:
    """The header lines every training command shares: device, precision and processes; the
    global and per-process batch, then ``plan`` (how long, how often it saves); the run folder
    and the state it resumed from."""
    world, per = run.world, batch_size // run.world
    micro = (f" in {grad_accum_steps} micro-batches of {per // grad_accum_steps}"
             if grad_accum_steps > 1 else "")
    resumed = (f"resumed from {run.resume_from} at step {run.start_step}"
               if run.resume_from is not None else "a fresh run")
    return [f"device: {run.device}, precision {'fp32' if precision == 'no' else precision}, "
            f"{world} process{'es' if world > 1 else ''}",
            f"batch: {batch_size} global, {per} per process{micro}; {plan}",
            f"out-dir: {run.out_dir}, {resumed}"]


_DEFAULT_MIN_SNR = TrainConfig().min_snr_gamma
"""min-SNR-gamma of the default run, a VP setting: the header notes it unused only when set to
another value (the default flow run leaves it at this)."""


def _header(run: Run, cfg: RunConfig, dataset: Any, net: UNet, schedule: Formulation,
            phema_line: str | None = None, space_line: str | None = None) -> list[str]:
    """What a run is about to do, in five lines before its first step (one more each with post-hoc
    EMA, ``phema_line``, and in a latent space, ``space_line``)."""
    d, u, s, t = cfg.data, cfg.unet, cfg.schedule, cfg.train
    where = {"folder": d.path or "",
             "torchvision": f"{d.name} ({d.path or './data'})",
             "hf": f"{d.name} (Hugging Face datasets, split {d.split})",
             }.get(d.source, "shapes (generated)")
    n = net.num_parameters()
    size, channels = d.image_size or u.image_size, d.channels or u.in_channels  # the images'
    kind = {1: "grayscale", 3: "RGB"}.get(channels, f"{channels}-channel")
    unused = ("; the labels are unused: unet.num_classes is unset"
              if getattr(dataset, "class_names", None) and u.num_classes is None else "")
    task = {"superres": f"task: superres x{d.superres_factor}: each image downscaled to "
                        f"{size // d.superres_factor}x{size // d.superres_factor} and upscaled "
                        f"back is the UNet's {u.cond_channels}-channel condition image",
            "colorize": "task: colorize: each image's luminance is the UNet's 1-channel "
                        "condition image",
            "inpaint": "task: inpaint: each image with a hole (a box or free-form strokes, "
                       "drawn from the run's generator) and its mask are the UNet's "
                       f"{u.cond_channels}-channel condition image",
            "paired": f"task: paired: each image's input of the same name in {d.cond_path} is "
                      f"the UNet's {u.cond_channels}-channel condition image"}.get(d.task or "")
    return [_describe_data(dataset, d.source, where, f"{size}x{size} {kind}") + unused,
            *([space_line] if space_line else []), *([task] if task else []),
            f"model: UNet, {n:,} parameters ({n / 1e6:.2f}M; base_channels {u.base_channels}, "
            f"channel_mults {tuple(u.channel_mults)}); {s.describe()}" + (
                f"; train.min_snr_gamma is unused ({schedule.own_weighting})"
                if not schedule.min_snr_weighting and t.min_snr_gamma not in (
                    None, _DEFAULT_MIN_SNR) else ""),
            *describe_run(run, t.mixed_precision, t.batch_size, t.grad_accum_steps,
                          f"steps {run.start_step} -> {t.max_steps}, preview every "
                          f"{t.sample_every}, save every {t.save_every} and at the last step"
                          + (f"; carried guide: the EMA of step {t.guide_step}"
                             if t.guide_step is not None else "")),
            *([phema_line] if phema_line else [])]


def _post_hoc_ema(run: Run, cfg: RunConfig, model: torch.nn.Module
                  ) -> tuple[RunConfig, PowerEMA | None, str]:
    """The post-hoc EMA profiles of ``train.phema_sigma_rels`` (None: none) and the run's id
    (random for a fresh run, the state's when resumed), the id every snapshot records. A state
    written by a diffunet without post-hoc EMA has no profiles to continue: the run goes on
    without them, saying so, and ``cfg`` (returned, and the run's) says so too."""
    saved = run.saved
    run_id = saved.get("run_id") or run.collective(lambda: secrets.token_hex(8))
    sigma_rels = cfg.train.phema_sigma_rels
    if not sigma_rels:
        return cfg, None, run_id
    train_saved = saved.get("config", {}).get("train", {}) if saved else {}
    if saved and "phema_sigma_rels" not in train_saved:
        run.tell(f"note: {run.resume_from} was saved by a diffunet without post-hoc EMA, so "
                 "this run continues without its profiles (train.phema_sigma_rels = []; a new "
                 "run keeps them)")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                 phema_sigma_rels=()))
        run.cfg = cfg
        return cfg, None, run_id
    return cfg, PowerEMA(model, sigma_rels), run_id


def _phema_line(run: Run, cfg: RunConfig, phema: PowerEMA | None, run_id: str) -> str | None:
    """The header's post-hoc EMA line (main process: it measures a snapshot's size)."""
    if phema is None or not run.main:
        return None
    size = len(phema_files.snapshot_bytes(phema.profiles[0], step=1, sigma_rel=phema.sigma_rels[0],
                                          gamma=phema.gammas[0], run_id=run_id, unet=cfg.unet))
    return phema_files.describe_storage(phema.sigma_rels, cfg.train.phema_every, size)


def _forever(loader: Any) -> Iterator[Any]:
    while True:  # the batch sampler is infinite; this only guards against a finite one
        yield from loader


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False,
          say: Callable[[str], None] = lambda msg: None, progress: bool = True,
          config_source: str | None = None) -> TrainResult:
    """Train a UNet as ``cfg`` says, writing everything into ``out_dir``.

    ``config_source``, if given, is the header's first line: where the settings came from (the
    command line passes which CONFIG.toml and overrides).

    ``say`` receives one-line messages for people (the command line prints them on the main
    process); ``progress`` shows a tqdm bar. Returns where the last model file and state went.
    Raises :class:`~diffunet.errors.DiffunetError` subclasses for bad input.
    """
    dataset = None
    if cfg.data.source == "folder" and cfg.data.class_folders:
        # The class folders decide unet.num_classes, which the run folder's checks (resume,
        # memory) and config.json need: read the folder before the run starts.
        dataset = build_dataset(cfg.data)
        cfg = fit_classes_to_data(cfg, dataset.class_names)
    guide = preview_guide(cfg)  # a guide that cannot guide this run: refused before it starts
    t = cfg.train
    with Run(cfg, out_dir, resume=resume, command="train", mixed_precision=t.mixed_precision,
             batch_size=t.batch_size, batch_divisor=t.grad_accum_steps, trackers=t.trackers,
             tracker_project=t.tracker_project, run_name=t.run_name,
             image_shape=(cfg.unet.in_channels, cfg.unet.image_size), state_keys=STATE_KEYS,
             net=cfg.unet, timesteps=cfg.schedule.table_timesteps,
             static_graph=t.grad_accum_steps == 1 and not t.compile,
             say=say, progress=progress) as run:
        step = run.start_step
        if run.resume_from is not None:
            run.tell(f"resuming from {run.resume_from} (step {step})")
            if step >= t.max_steps:
                run.tell(f"the run is already at step {step} of train.max_steps={t.max_steps}; "
                         "nothing to do (raise train.max_steps to train on)")

        # --- data, model, EMA, optimizer, and the saved state when resuming ------------------
        run.seed_everything(t.seed)  # identical initial weights on every process
        if dataset is None:
            with run.accelerator.main_process_first():  # one process downloads, the others read
                dataset = (HFStream(cfg.data, cfg.unet.num_classes) if cfg.data.streaming
                           else build_dataset(cfg.data))
        # the data space: pixels, or a VAE's latents (the loader then reads the latent cache,
        # which the main process builds or reuses here)
        space = load_space(cfg.vae, device=run.device)
        dataset, space_line = training_set(cfg, space, dataset, run.collective, run.tell)
        _check_labels(cfg, dataset)
        names = _class_names(cfg, dataset)
        schedule = make_schedule(cfg.schedule)
        # a preview range the model does not have: refused now, not at the first preview
        check_sigma_range(schedule, cfg.sample.sigma_min, cfg.sample.sigma_max,
                          {k: f"sample.{k}" for k in ("sigma_min", "sigma_max")}, ConfigError)
        model = UNet(cfg.unet)
        if t.channels_last:  # before the EMA copy, so previews run channels-last too
            model = model.to(memory_format=torch.channels_last)
        ema = EMA(model, t.ema_decay, t.ema_warmup)
        cfg, phema, run_id = _post_hoc_ema(run, cfg, model)
        optimizer = run.adamw(model.parameters(), lr=t.lr, betas=tuple(t.adam_betas),
                              weight_decay=t.weight_decay, eps=1e-8)
        step_gen = run.generator(t.seed)  # on the device: same draws on every process
        run.restore(model, optimizer, ema=ema.model, generators={"step_gen": step_gen})
        if phema is not None and run.resume_from is not None:
            with state_must_fit(run.resume_from):
                phema.load_state_dict(st.load_tensors(run.resume_from / "phema.safetensors"))
        guide_at, held = _guide_on_resume(run, cfg)
        carried = GuideKeeper(guide_at, cfg.sample.guide_scale)
        if held:
            assert run.resume_from is not None and guide_at is not None
            with state_must_fit(run.resume_from):
                kept = copy.deepcopy(ema.model)
                kept.load_state_dict(st.load_tensors(run.resume_from / "guide.safetensors"))
            carried.net, carried.step = kept.eval().requires_grad_(False), guide_at
        counts = {key: int(run.saved.get(key, 0)) for key in ("nonfinite_total",
                                                              "nonfinite_streak")}
        ema.model.to(run.device)
        if carried.net is not None:
            carried.net.to(run.device)
        elif carried.due(step):  # resumed at the guide step itself: its EMA is the state's
            carried.take(ema, step)
        if phema is not None:
            phema.to(run.device)
            folder, at = run.out_dir / phema_files.SUBFOLDER, run.start_step
            # before anything is written: damaged snapshots are refused now, in one line
            run.collective(lambda: phema_files.check_for_resume(folder, run_id, cfg.unet, at))
        model, optimizer = run.prepare(model, optimizer, t.seed)
        net = unwrap_model(model)
        # Compiled: the whole objective (noising, forward, loss) as one graph; the DDP-wrapped
        # model is traced through, so its gradient buckets still overlap the backward.
        loss_fn = torch.compile(step_loss) if t.compile else step_loss
        run.open_folder(("samples", "weights", "state")
                        + ((phema_files.SUBFOLDER,) if phema is not None else ()))
        if phema is not None:
            gone = run.write("removing post-hoc EMA snapshots past the resumed step",
                             lambda: phema_files.trim_after(
                                 run.subfolder(phema_files.SUBFOLDER), run.start_step))
            if gone:
                run.tell(f"note: removed {len(gone)} post-hoc EMA snapshot(s) past step "
                         f"{run.start_step} from {run.out_dir / phema_files.SUBFOLDER} (this "
                         "run trains those steps again and writes them again)")
        for note in _dataset_notes(dataset, cfg):
            run.tell(note)
        if isinstance(dataset, HFStream):
            batches = dataset.batches(t.batch_size, seed=t.seed, start_step=step,
                                      rank=run.rank, world_size=run.world)
        else:
            batches = _forever(make_dataloader(
                dataset, GlobalBatchSampler(len(dataset), t.batch_size, seed=t.seed,
                                            start_step=step, rank=run.rank,
                                            world_size=run.world),
                # a data set held in memory (the latent cache) would be copied into each worker
                0 if getattr(dataset, "in_memory", False) else run.workers(cfg.data.num_workers),
                pin_memory=run.device.type == "cuda"))
        preview = _preview_fn(cfg, ema, schedule, run, space, guide, carried,
                              _preview_targets(cfg, dataset))
        space_record = {"vae": space.record()} if space.record() is not None else {}
        if cfg.data.task is not None:  # what `diffunet sample --cond-image` makes of its inputs
            space_record["task"] = {"name": cfg.data.task}
            if cfg.data.task == "superres":
                space_record["task"]["superres_factor"] = cfg.data.superres_factor

        def save(at: int) -> tuple[Path, Path]:
            model_path = run.out_dir / "weights" / f"model_{st.state_name(at)}.safetensors"
            kept = ({"guide": carried.net.state_dict()} if carried.net is not None else {})
            state_path = run.save_state(
                at, tensors={"model": net.state_dict(), "ema": ema.model.state_dict(),
                             **({"phema": phema.state_dict()} if phema is not None else {}),
                             **kept},
                optimizer=optimizer, trainer={**counts, "run_id": run_id,
                                              **({"guide_step": carried.step} if kept else {})},
                generators={"step_gen": step_gen},
                keep_last=t.keep_last, before_commit=lambda: run.write_file(
                    "weights", model_path.name, model_file_bytes(
                        ema.model, schedule, extra={"step": at, "run_config": to_dict(cfg),
                                                    **({"class_names": names} if names
                                                       else {}), **space_record},
                        guide=carried.after(at))))
            return model_path, state_path

        def snapshot(at: int) -> None:
            """Write every profile's snapshot of step ``at`` (main process), durably."""
            assert phema is not None

            def on_main() -> None:
                for s, g, profile in zip(phema.sigma_rels, phema.gammas, phema.profiles):
                    run.write_file(phema_files.SUBFOLDER, phema_files.snapshot_name(at, s),
                                   phema_files.snapshot_bytes(profile, step=at, sigma_rel=s,
                                                              gamma=g, run_id=run_id,
                                                              unet=cfg.unet))

            run.write(f"writing the post-hoc EMA snapshots of step {at}", on_main)

        # --- the loop: no host sync between check points (log lines, saves, the non-finite
        # limit), so an accelerator is never kept waiting by the host -----------------------
        if step < t.max_steps:
            for line in [*([config_source] if config_source else []),
                         *_header(run, cfg, dataset, net, schedule,
                                  _phema_line(run, cfg, phema, run_id), space_line)]:
                run.tell(line)
        run.progress(t.max_steps)
        per_process = t.batch_size // run.world
        mine = slice(run.rank * per_process, (run.rank + 1) * per_process)
        zero = torch.zeros((), dtype=torch.int64, device=run.device)
        nonfinite = {k: zero + v for k, v in counts.items()}  # device counters, read at checks
        interval_loss, interval_good = torch.zeros((), device=run.device), zero.clone()
        interval_grad = torch.zeros(2, device=run.device)  # _grad_sums over the interval
        interval_start = run_start = time.perf_counter()
        model_path = state_path = None
        stopping = False
        while step < t.max_steps:
            images, labels = next(batches)
            x0, noise, levels, cond = _step_inputs(
                cfg, schedule, space, step_gen, images.to(run.device, non_blocking=True),
                labels.to(run.device, non_blocking=True), mine)
            model.train()
            loss = _backward(run, model, loss_fn, schedule, cfg, x0, noise, levels, cond)
            bad, norm = _update(run, cfg, model, optimizer, ema, net, step, loss, phema)
            nonfinite["nonfinite_total"] += bad
            nonfinite["nonfinite_streak"] = (nonfinite["nonfinite_streak"] + 1) * bad
            interval_loss += torch.where(bad, 0.0, loss)
            interval_good += ~bad
            interval_grad += _grad_sums(norm, bad, t.grad_clip)
            step += 1
            run.bar.update(1)
            if carried.due(step):  # a copy of the EMA, no host sync
                carried.take(ema, step)
            check = (step % t.log_every == 0 or step % t.max_nonfinite == 0
                     or step % t.save_every == 0 or step == t.max_steps)
            stopping = run.should_stop(check)
            if check or stopping:  # read the device counters (a host sync) only here
                counts = {k: int(v) for k, v in nonfinite.items()}
                if counts["nonfinite_streak"] >= t.max_nonfinite:
                    raise TrainingError(
                        f"the loss was non-finite for {counts['nonfinite_streak']} steps in a "
                        f"row (step {step}); try a lower train.lr, train.grad_clip=1.0, or "
                        "train.mixed_precision='no'/'bf16' instead of 'fp16'")
            if step % t.log_every == 0 or step == t.max_steps or stopping:
                now = time.perf_counter()
                _log(run, cfg, step, interval_loss, interval_grad, int(interval_good),
                     now - interval_start, now - run_start, counts["nonfinite_total"])
                interval_loss.zero_()
                interval_grad.zero_()
                interval_good.zero_()
                interval_start = now
            if (step % t.sample_every == 0 or step == t.max_steps) and not stopping:
                run.bar.set_description_str(f"preview at step {step}")  # sampling takes a while
                preview(step)
                run.bar.set_description_str("")
            if phema is not None and (step % t.phema_every == 0 or step == t.max_steps
                                      or stopping):
                snapshot(step)  # before the state: a state implies its snapshots are written
            if step % t.save_every == 0 or step == t.max_steps or stopping:
                model_path, state_path = save(step)
            if stopping:
                run.tell(f"stopped by {run.stop_signal or 'a signal'} at step {step}; state "
                         f"saved in {state_path}; continue with --resume")
                break
    return TrainResult(step=step, model_path=model_path, state_path=state_path,
                       interrupted=stopping, nonfinite_skipped=counts["nonfinite_total"])
