"""``train(cfg, out_dir)``: the whole training run, top to bottom, on Hugging Face Accelerate.

One function owns the loop so it can be read in one sitting. What makes it exact:

- Every random draw of a step (timesteps, noise, flips, label dropout) comes from one
  ``torch.Generator`` seeded from ``train.seed``, drawn for the *global* batch on every process,
  and sliced to this process's share. So a run gives the same batches whatever the number of
  processes, and its state is one generator state.
- The data order comes from :class:`~diffunet.data.GlobalBatchSampler`: resuming at step s starts
  the stream at step s without reading the skipped images.
- The saved state holds everything that changes while training (weights, EMA, optimizer, grad
  scaler, generators, every process's RNG, counters), so N steps and N/2 + resume + N/2 steps
  give identical weights on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import state as st
from .checkpoint import save_model, unwrap_model
from .config import RunConfig, to_dict
from .data import GlobalBatchSampler, build_dataset, make_dataloader, save_grid
from .diffusion import NoiseSchedule, diffusion_loss
from .errors import ConfigError, DiffunetError, ModelFileError
from .fileio import atomic_write_bytes
from .schedulers import sample
from .unet import UNet


class TrainingError(DiffunetError):
    """Training cannot go on (e.g. the loss stays non-finite); the message says what to try."""


@dataclass
class TrainResult:
    """What a finished (or interrupted) run left behind."""

    step: int
    model_path: Path | None
    state_path: Path | None
    interrupted: bool
    nonfinite_skipped: int


class EMA:
    """Exponential moving average of the weights, kept in fp32 (Polyak averaging).

    Every process updates its own copy from the same synchronised weights, so the copies stay
    identical without communication.
    """

    def __init__(self, model: UNet, decay: float, warmup: bool) -> None:
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup

    def decay_at(self, step: int) -> float:
        """The decay used after optimizer step ``step`` (0-based); ramps up when warming up."""
        if self.warmup:
            return min(self.decay, (1 + step) / (10 + step))
        return self.decay

    @torch.no_grad()
    def update(self, model: UNet, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        # One multi-tensor lerp (a few kernels on a GPU, not one per parameter); same numbers.
        torch._foreach_lerp_(list(self.model.parameters()),
                             [p.detach().float() for p in model.parameters()], weight)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def lr_at(cfg: RunConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then constant or a
    cosine decay to zero at ``train.max_steps``."""
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "cosine":
        span = max(1, t.max_steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return t.lr


# Settings that change how a run executes, not what it computes: free to differ on resume.
_EXECUTION_ONLY = {("unet", "gradient_checkpointing"), ("data", "num_workers"),
                   ("data", "download"), ("data", "path")}


def check_resume_compatible(saved: dict[str, Any], cfg: RunConfig) -> None:
    """A resumed run may change training settings (e.g. ``max_steps``), not the model or data."""
    now = to_dict(cfg)
    for section in ("unet", "schedule", "data"):
        for key, value in saved.get(section, {}).items():
            if (section, key) in _EXECUTION_ONLY:
                continue
            if now[section].get(key) != value:
                raise ConfigError(
                    f"{section}.{key}: the run being resumed used {value!r}, this config says "
                    f"{now[section].get(key)!r}; resume with the same {section} settings or "
                    "start a new --out-dir")
    if saved.get("train", {}).get("batch_size") != cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size: the run being resumed used {saved['train']['batch_size']}, this "
            f"config says {cfg.train.batch_size}; resuming needs the same global batch size")


def prepare_out_dir(out_dir: Path, resume: bool) -> Path | None:
    """Check ``out_dir`` and return the state to resume from (None: start fresh).

    Without ``resume`` a non-empty folder is refused, never overwritten.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out-dir {out_dir} is a file; give a folder path")
    if not resume:
        if out_dir.is_dir() and any(out_dir.iterdir()):
            raise ConfigError(f"--out-dir {out_dir} is not empty; pass --resume to continue that "
                              "run, or choose another --out-dir")
        return None
    return st.newest_state(out_dir / "state")


_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_READ_ONLY = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied"}


def _write_failed(e: OSError, doing: str, out_dir: Path) -> TrainingError:
    """One line for a write that failed: the problem, the fix, and the newest state, which the
    atomic writes left intact."""
    if e.errno in _DISK_FULL:
        problem, fix = _DISK_FULL[e.errno], "free space or choose another --out-dir"
    elif e.errno in _READ_ONLY:
        problem, fix = _READ_ONLY[e.errno], "make it writable or choose another --out-dir"
    elif e.errno == errno.EFBIG:
        problem, fix = "file too large", ("choose another --out-dir (its file system or a "
                                          "ulimit -f caps file sizes)")
    else:
        problem, fix = (e.strerror or str(e)).lower(), "check the disk or choose another --out-dir"
    newest = st.newest_state(out_dir / "state")
    kept = (f"the previous checkpoint {newest.name} is intact (--resume continues from it)"
            if newest is not None else "no checkpoint had been saved yet")
    return TrainingError(f"{problem} while {doing} to {out_dir}; {fix}; {kept}")


def _logged_step(line: str) -> float:
    """The step of a ``log.jsonl`` line; inf for a blank or torn one (cut short by a crash)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def open_run_folder(out_dir: Path, subdirs: tuple[str, ...], cfg: Any,
                    resumed_at: int | None) -> None:
    """Make the run folder's sub-folders, remove what interrupted writes left, write the
    resolved ``config.json`` and, for a resumed run, trim ``log.jsonl`` to step ``resumed_at``.
    Main process only."""
    for sub in subdirs:
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    st.clear_leftovers(out_dir)  # temporary files of writes a crash cut short
    atomic_write_bytes(out_dir / "config.json",
                       (json.dumps(to_dict(cfg), indent=2) + "\n").encode("utf-8"))
    if resumed_at is not None:
        trim_log(out_dir / "log.jsonl", resumed_at)


def trim_log(log_path: Path, step: int) -> None:
    """Drop the ``log.jsonl`` lines past ``step`` (those of the work a resumed run redoes, and a
    torn last line), so the log ends as an uninterrupted run's would."""
    if log_path.exists():
        kept = [ln for ln in log_path.read_text().splitlines() if _logged_step(ln) <= step]
        atomic_write_bytes(log_path, "".join(ln + "\n" for ln in kept).encode("utf-8"))


def _install_stop_handlers(flag: dict[str, Any]) -> Callable[[], None]:
    """On SIGINT/SIGTERM, ask the loop to save and stop after the current step."""
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        flag["signal"] = signal.Signals(signum).name

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass

    def restore() -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)

    return restore


def _match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter state tensor (Adam's moments) its parameter's memory layout.

    Saved states load as contiguous tensors. The fused AdamW kernel walks a parameter and its
    moments as flat arrays, so a channels-last weight with contiguous moments would be updated
    with permuted moments (silently wrong); the values are kept, only the layout changes.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if (isinstance(value, torch.Tensor) and value.shape == p.shape
                        and value.stride() != p.stride()):
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def load_state_into(folder: Path, saved: dict[str, Any], model: torch.nn.Module,
                    ema_model: torch.nn.Module | None, optimizer: torch.optim.Optimizer) -> None:
    """Load a saved state's weights, EMA weights and optimizer state into a fresh run (before
    ``accelerator.prepare``); ``saved`` is its checked ``trainer.json``."""
    model.load_state_dict(st.load_tensors(folder / "model.safetensors"))
    if ema_model is not None:
        ema_model.load_state_dict(st.load_tensors(folder / "ema.safetensors"))
    optimizer.load_state_dict(st.join_optimizer_state(
        st.load_tensors(folder / "optimizer.safetensors"), saved["optimizer"]))
    _match_param_layout(optimizer)


@contextlib.contextmanager
def state_must_fit(folder: Path) -> Iterator[None]:
    """Turn an error from loading a readable state that does not fit this run (other shapes,
    keys, schedule) into a one-line :class:`ModelFileError` that says what to do."""
    try:
        yield
    except ModelFileError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError) as e:  # readable, but not ours
        raise ModelFileError(
            f"{folder} does not fit this run ({' '.join(str(e).split())[:200]}); delete it to "
            "resume from the state before it, or start a new --out-dir") from None


def _forever(loader: Any) -> Iterator[Any]:
    while True:  # the batch sampler is infinite; this only guards against a finite one
        yield from loader


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False,
          say: Callable[[str], None] = lambda msg: None, progress: bool = True) -> TrainResult:
    """Train a UNet as ``cfg`` says, writing everything into ``out_dir``.

    ``say`` receives one-line messages for people (the command line prints them on the main
    process); ``progress`` shows a tqdm bar. Returns where the last model file and state went.
    Raises :class:`~diffunet.errors.DiffunetError` subclasses for bad input.
    """
    from accelerate import Accelerator  # the one heavy import lives here (and in the cli)
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    t = cfg.train
    try:
        accelerator = Accelerator(mixed_precision=t.mixed_precision,
                                  log_with=list(t.trackers) or None, project_dir=str(out_dir))
    except ValueError as e:
        raise ConfigError(f"train.mixed_precision={t.mixed_precision!r} cannot run here ({e}); "
                          "use 'bf16' or 'no' on a CPU") from None
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    if launched > 1 and world == 1:  # no GPU, not told to use the CPU: N lone runs, one folder
        raise ConfigError(
            f"launched as {launched} processes, but Accelerate found no GPU for them and was not "
            f"told to use the CPU, so each would train alone into {out_dir}; to train on "
            f"{launched} CPU processes, launch with ACCELERATE_USE_CPU=1 accelerate launch "
            f"--multi_gpu --num_processes {launched} ...")
    if (world == 1 and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ
            and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")):
        # `accelerate launch --cpu --num_processes N` runs ONE process unless MPI is configured.
        say("note: `accelerate launch --cpu` started one process (Accelerate needs mpirun for "
            "several CPU processes); training in one process, which gives the same model. For N "
            "CPU processes use: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
            "--num_processes N -m diffunet train ...")
    if t.batch_size % (world * t.grad_accum_steps):
        raise ConfigError(f"train.batch_size: {t.batch_size} is not divisible by {world} "
                          f"processes x {t.grad_accum_steps} grad_accum_steps")
    per_process = t.batch_size // world
    micro = per_process // t.grad_accum_steps
    device = accelerator.device
    tell = say if main else (lambda msg: None)

    # --- where we start: fresh, or the newest complete state ------------------------------
    resume_from = prepare_out_dir(out_dir, resume)
    if resume_from is not None:
        saved = st.read_trainer(resume_from)  # checked: never a damaged or foreign state
        check_resume_compatible(saved["config"], cfg)
        tell(f"resuming from {resume_from} (step {saved['step']})")
        if saved["step"] >= t.max_steps:
            tell(f"the run is already at step {saved['step']} of train.max_steps={t.max_steps}; "
                 "nothing to do (raise train.max_steps to train on)")
    elif resume:
        tell(f"no saved state in {out_dir / 'state'}; starting a fresh run")
    accelerator.wait_for_everyone()

    # --- data, model, EMA, optimizer ---------------------------------------------------------
    set_seed(t.seed)  # identical initial weights on every process
    with accelerator.main_process_first():  # one process downloads, the others then read
        dataset = build_dataset(cfg.data)
    num_classes = cfg.unet.num_classes
    if num_classes is not None and dataset.num_classes != num_classes:
        have = "no class labels" if dataset.num_classes is None else f"{dataset.num_classes} classes"
        raise ConfigError(f"unet.num_classes is {num_classes} but the data set has {have}; set "
                          f"unet.num_classes to match or unset it for an unconditional model")
    schedule = NoiseSchedule(cfg.schedule)
    if device.type == "cuda":
        # TF32 tensor cores for the fp32 matmuls (cuDNN convolutions use them by default).
        torch.set_float32_matmul_precision("high")
    model = UNet(cfg.unet)
    if t.channels_last:  # before the EMA copy, so previews run channels-last too
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, t.ema_decay, t.ema_warmup)
    # The fused AdamW is one kernel for all parameters (CPU and CUDA): ~3.5x faster on a CPU
    # than the multi-tensor default for the DDPM CIFAR-10 net.
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.adam_betas),
                                  weight_decay=t.weight_decay, eps=1e-8,
                                  fused=True if device.type in ("cuda", "cpu") else None)
    step_gen = torch.Generator().manual_seed(t.seed)
    step, nonfinite_total, nonfinite_streak = 0, 0, 0

    if resume_from is not None:
        with state_must_fit(resume_from):
            load_state_into(resume_from, saved, model, ema.model, optimizer)
            step_gen.set_state(st.load_tensors(resume_from / "rng.safetensors")["step_gen"])
        step, nonfinite_total = saved["step"], saved["nonfinite_total"]
        nonfinite_streak = saved["nonfinite_streak"]

    ema.model.to(device)
    model, optimizer = accelerator.prepare(model, optimizer)
    net = unwrap_model(model)
    if t.compile:  # after prepare: compiling the DDP-wrapped model lets it bucket gradients
        model = torch.compile(model)
    if resume_from is not None:
        if accelerator.scaler is not None and saved.get("scaler"):
            accelerator.scaler.load_state_dict(saved["scaler"])
        rng_file = resume_from / f"rng_rank{rank}.safetensors"
        if rng_file.is_file():  # absent if the run is resumed on more processes than it had
            st.set_rng_states(st.load_tensors(rng_file))

    if main:
        open_run_folder(out_dir, ("samples", "weights", "state"), cfg,
                        step if resume_from is not None else None)
        if t.trackers:
            accelerator.init_trackers(out_dir.name, config={
                f"{s}.{k}": json.dumps(v) for s, sec in to_dict(cfg).items() for k, v in sec.items()})
    accelerator.wait_for_everyone()
    if main and getattr(dataset, "skipped", None):
        tell(f"skipped {len(dataset.skipped)} unreadable file(s) in {cfg.data.path}, "
             f"e.g. {dataset.skipped[0]}")
    if main and getattr(dataset, "upscaled", None):
        tell(f"note: {len(dataset.upscaled)} of {len(dataset)} images in {cfg.data.path} are "
             f"smaller than data.image_size={cfg.data.image_size} and are upscaled (e.g. "
             f"{dataset.upscaled[0]}), which blurs them; a smaller image_size avoids that")

    sampler = GlobalBatchSampler(len(dataset), t.batch_size, seed=t.seed, start_step=step,
                                 rank=rank, world_size=world)
    loader = make_dataloader(dataset, sampler, cfg.data.num_workers,
                             pin_memory=device.type == "cuda")
    batches = _forever(loader)

    # Preview grids always start from the same noise (and labels), so they are comparable.
    C, H = cfg.unet.in_channels, cfg.unet.image_size
    preview_gen = torch.Generator().manual_seed(t.seed + 1)
    preview_noise = torch.randn((cfg.sample.num_images, C, H, H), generator=preview_gen)
    preview_labels = (torch.arange(cfg.sample.num_images) % num_classes
                      if num_classes is not None else None)

    def save_preview(at: int) -> None:
        x_T = preview_noise.to(device)
        labels = preview_labels.to(device) if preview_labels is not None else None
        with accelerator.autocast():
            images = sample(ema.model, schedule, x_T, sampler=cfg.sample.sampler,
                            num_steps=cfg.sample.num_steps, eta=cfg.sample.eta,
                            spacing=cfg.sample.spacing, class_labels=labels,
                            guidance_scale=cfg.sample.guidance_scale,
                            clip_x0=cfg.sample.clip_x0, generator=torch.Generator().manual_seed(t.seed + 2))
        try:
            save_grid(images.float().cpu(), out_dir / "samples" / f"{st.state_name(at)}.png")
        except OSError as e:
            raise _write_failed(e, f"writing preview {st.state_name(at)}.png", out_dir) from None

    def save_checkpoint(at: int) -> tuple[Path | None, Path | None]:
        try:
            return write_checkpoint(at)
        except OSError as e:  # a full disk, a read-only folder: say so, leave no partial state
            if main:
                st.clear_leftovers(out_dir)
            raise _write_failed(e, f"saving state {st.state_name(at)}", out_dir) from None

    def write_checkpoint(at: int) -> tuple[Path | None, Path | None]:
        accelerator.wait_for_everyone()
        tmp = out_dir / "state" / f".tmp-{st.state_name(at)}"
        if main:
            st.begin_state(out_dir / "state", at)
        accelerator.wait_for_everyone()
        st.save_tensors(tmp / f"rng_rank{rank}.safetensors", st.rng_states())
        model_path = state_path = None
        if main:
            st.save_tensors(tmp / "model.safetensors", net.state_dict())
            st.save_tensors(tmp / "ema.safetensors", ema.model.state_dict())
            opt_tensors, opt_plain = st.split_optimizer_state(optimizer.state_dict())
            st.save_tensors(tmp / "optimizer.safetensors", opt_tensors)
            st.save_tensors(tmp / "rng.safetensors", {"step_gen": step_gen.get_state()})
            st.write_json(tmp / "trainer.json", {
                "format_version": st.STATE_FORMAT_VERSION, "step": at, "world_size": world,
                "nonfinite_total": nonfinite_total, "nonfinite_streak": nonfinite_streak,
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler else None,
                "optimizer": opt_plain, "config": to_dict(cfg)})
            model_path = out_dir / "weights" / f"model_{st.state_name(at)}.safetensors"
            save_model(model_path, ema.model, schedule,
                       extra={"step": at, "run_config": to_dict(cfg)})
        accelerator.wait_for_everyone()
        if main:
            state_path = st.commit_state(tmp, t.keep_last)
        accelerator.wait_for_everyone()
        return model_path, state_path

    # --- the loop ------------------------------------------------------------------------------
    stop: dict[str, Any] = {}
    restore_signals = _install_stop_handlers(stop)
    bar = tqdm(total=t.max_steps, initial=step, disable=not (main and progress),
               dynamic_ncols=True, unit="step", smoothing=0.05)
    T = cfg.schedule.num_train_timesteps
    mine = slice(rank * per_process, (rank + 1) * per_process)
    interval_loss = torch.zeros((), device=device)
    interval_steps, interval_start, run_start = 0, time.perf_counter(), time.perf_counter()
    model_path = state_path = None
    try:
        while step < t.max_steps:
            images, labels = next(batches)
            # Draw for the global batch on every process, then keep this process's share.
            timesteps = torch.randint(0, T, (t.batch_size,), generator=step_gen)[mine]
            noise = torch.randn((t.batch_size, C, H, H), generator=step_gen)[mine]
            if cfg.data.random_flip:
                flip = (torch.rand(t.batch_size, generator=step_gen) < 0.5)[mine]
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            if num_classes is not None:
                drop = (torch.rand(t.batch_size, generator=step_gen) < t.label_dropout)[mine]
                labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
            x0 = images.to(device, non_blocking=True)
            noise, timesteps = noise.to(device), timesteps.to(device)
            labels = labels.to(device) if num_classes is not None else None

            model.train()
            step_loss = torch.zeros((), device=device)
            for k in range(t.grad_accum_steps):
                mb = slice(k * micro, (k + 1) * micro)
                sync = k == t.grad_accum_steps - 1
                with (contextlib.nullcontext() if sync else accelerator.no_sync(model)):
                    with accelerator.autocast():
                        xt = schedule.add_noise(x0[mb], noise[mb], timesteps[mb])
                        out = model(xt, timesteps[mb],
                                    class_labels=labels[mb] if labels is not None else None)
                    loss = diffusion_loss(schedule, out.float(), x0[mb], noise[mb], timesteps[mb],
                                          min_snr_gamma=t.min_snr_gamma).mean()
                    accelerator.backward(loss / t.grad_accum_steps)
                step_loss += loss.detach() / t.grad_accum_steps

            # Every process must agree on skipping a non-finite step and on stopping.
            flags = torch.tensor([0.0 if torch.isfinite(step_loss) else 1.0,
                                  1.0 if stop else 0.0], device=device)
            flags = accelerator.reduce(flags, "sum") if world > 1 else flags
            # The one host-device sync of a step (the loss is only read at log intervals): the
            # skip and the stop must be decided on the host, the same on every process.
            bad, stopping = (flags > 0).tolist()
            if bad:
                optimizer.zero_grad(set_to_none=True)
                nonfinite_total += 1
                nonfinite_streak += 1
                if nonfinite_streak >= t.max_nonfinite:
                    raise TrainingError(
                        f"the loss was non-finite for {nonfinite_streak} steps in a row (step "
                        f"{step + 1}); try a lower train.lr, train.grad_clip=1.0, or "
                        "train.mixed_precision='no'/'bf16' instead of 'fp16'")
            else:
                nonfinite_streak = 0
                if t.grad_clip is not None:
                    accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(cfg, step)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if not accelerator.optimizer_step_was_skipped:
                    ema.update(net, step)
                interval_loss += step_loss
                interval_steps += 1
            step += 1
            bar.update(1)

            if step % t.log_every == 0 or step == t.max_steps or stopping:
                mean_loss = accelerator.reduce(interval_loss, "mean") if world > 1 else interval_loss
                now = time.perf_counter()
                record = {"step": step,
                          "loss": (mean_loss.item() / interval_steps) if interval_steps else None,
                          "lr": lr_at(cfg, step - 1),
                          "images_per_s": round(t.batch_size * max(1, interval_steps)
                                                / max(now - interval_start, 1e-9), 2),
                          "nonfinite_skipped": nonfinite_total,
                          "elapsed_s": round(now - run_start, 2)}
                if main:
                    try:
                        with open(out_dir / "log.jsonl", "a", encoding="utf-8") as f:
                            f.write(json.dumps(record) + "\n")
                    except OSError as e:
                        raise _write_failed(e, "writing log.jsonl", out_dir) from None
                    bar.set_postfix(loss="nan" if record["loss"] is None else f"{record['loss']:.4f}",
                                    lr=f"{record['lr']:.2e}", img_s=record["images_per_s"])
                    if t.trackers:
                        accelerator.log({k: v for k, v in record.items() if v is not None},
                                        step=step)
                interval_loss.zero_()
                interval_steps, interval_start = 0, now

            if step % t.sample_every == 0 and main:
                save_preview(step)
            if step % t.save_every == 0 or step == t.max_steps or stopping:
                model_path, state_path = save_checkpoint(step)
            if stopping:
                tell(f"stopped by {stop.get('signal', 'a signal')} at step {step}; state saved "
                     f"in {state_path or out_dir / 'state'}; continue with --resume")
                break
    finally:
        bar.close()
        restore_signals()
        if t.trackers:
            accelerator.end_training()
    return TrainResult(step=step, model_path=model_path, state_path=state_path,
                       interrupted=bool(stop), nonfinite_skipped=nonfinite_total)
