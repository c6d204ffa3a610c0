"""The run harness: what every training run shares, so each trainer is only its loop.

:class:`Run` owns, for ``diffunet train`` and ``diffunet segment train`` alike:

- **Accelerate and the launch**: the :class:`accelerate.Accelerator` (mixed precision with a
  one-line error where it cannot run), the "launched as N processes but Accelerate
  sees one" refusal, the ``accelerate launch --cpu`` note, the global batch's divisibility.
- **The run folder**: a non-empty folder is refused without ``--resume``; one writer at a time
  (an OS lock on the folder held for the whole run, released by the kernel even after a
  SIGKILL, and the second run told which process holds it); leftovers of interrupted writes cleared;
  ``config.json`` written; ``log.jsonl`` trimmed to the resumed step.
- **Resume**: the newest complete state, checked (:func:`diffunet.state.read_trainer`), and the
  config compared field by field with the one it was saved with: a field declared
  :func:`~diffunet.config.free_on_resume` may change, any other change is refused naming the key.
- **The state protocol**: every process writes its RNG file, the main process the rest, the
  folder is committed by one rename (:mod:`diffunet.state`), all relative to the ``state/``
  folder each process opened once (checked to be the main process's); loading puts it all back.
- **Signals**: SIGINT/SIGTERM ask the loop to save and stop after the current step, every
  process agreeing on when (:meth:`Run.should_stop`); a second signal, or a step that does not
  end within seconds (blocked), stops the run there and then (:mod:`diffunet.stopping`).
- **Progress and logs**: the tqdm bar, one-line messages that keep it intact, ``log.jsonl`` lines
  and the trackers (TensorBoard in ``RUN/tensorboard/``, W&B in ``RUN/wandb/``; a missing
  package refused before anything starts).
- **Write failures**: a full disk, a read-only folder, a file-size limit become one line naming
  the problem, the fix and the newest intact state (:func:`write_failed`).

Work that only the main process does (the lock, the folder, the log, states) runs through
:meth:`Run.collective`, so when it fails every process raises instead of the others waiting at
the next barrier forever.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import importlib
import io
import json
import os
import re
import secrets
import socket
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch

from . import errors, resources, stopping
from . import state as st
from .config import UNetConfig, may_change_on_resume, to_dict
from .data import seed_for
from .errors import (ConfigError, FolderError, MissingDependencyError, ModelFileError, Stopped,
                     TrainingError, UsageError)
from .fileio import atomic_write_bytes, open_regular_file, parse_json, read_regular_file
from .output_files import OpenFolder, open_subfolder
from .output_files import open_folder as open_output_folder

__all__ = ["EMA", "FolderLock", "LogRecord", "Run", "TensorBoardTracker", "WANDB_ID_FILE",
           "WandbTracker", "check_log", "check_resume_compatible", "check_trackers",
           "check_training_fits", "cpu_requested", "lock_folder", "not_a_run_yet", "pick_device",
           "read_log", "tracker_config", "refuse_lone_processes", "state_must_fit",
           "training_cost", "trim_log", "write_failed"]

R = TypeVar("R")
RUN_SUBFOLDERS = ("samples", "weights", "state", "phema", "tensorboard", "wandb")
"""The run folder's sub-folders diffunet writes into: each is opened once, without following a
link, and a link under any of these names is refused before the run starts."""
_TAG_DROPOUT = 3  # keeps the per-process RNG seeds apart from data.py's streams (tags 1, 2)


# ---------------------------------------------------------------------------------------------
# Small pieces every trainer (and command) uses


def cpu_requested() -> bool:
    """Whether Accelerate is told to use the CPU (``ACCELERATE_USE_CPU``, which ``accelerate
    launch --cpu`` sets) even where a GPU is."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def refuse_lone_processes(world: int, alone: str, doing: str) -> None:
    """Refuse a launch of N processes that Accelerate runs as N worlds of one (no GPU, and not
    told to use the CPU): each would ``alone`` (e.g. "train alone into runs/x"). ``doing`` is the
    verb for the fix ("train", "sample")."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    if launched > 1 and world == 1:
        raise UsageError(
            f"launched as {launched} processes, but Accelerate found no GPU for them and was not "
            f"told to use the CPU, so each would {alone}; to {doing} on {launched} CPU "
            f"processes, launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
            f"--num_processes {launched} ...")


def training_cost(net: UNetConfig | None, timesteps: int | None, batch: int,
                  per_process: int, channels: int, side: int) -> tuple[resources.Cost, int]:
    """What one training step needs on each process, before anything is built: four copies of
    the weights (weights, gradients, AdamW's two moments), the schedule's tables, the
    activations of the process's ``per_process`` images (a lower bound) and four float32 copies
    of the *global* ``batch`` (images, noise, noised inputs, targets: the step's randomness is
    drawn for the global batch on every process). Returns the cost and the parameter count
    (0 when ``net`` is None: only the batch is counted)."""
    inputs = 4 * 4 * batch * channels * side * side
    if net is None:
        return resources.Cost(0, 0, inputs), 0
    n = resources.parameter_count(net)
    return resources.Cost(4 * 4 * n, resources.schedule_bytes(timesteps) if timesteps else 0,
                          resources.activation_bytes(net, per_process) + inputs), n


def check_training_fits(net: UNetConfig | None, timesteps: int | None, batch: int,
                        per_process: int, channels: int, side: int,
                        device: torch.device | str) -> int:
    """Refuse, with one :class:`ConfigError` line, a run whose network, schedule and step
    batch (:func:`training_cost`) cannot fit ``device``'s memory, before anything is built:
    such a run would not fail cleanly, it would exhaust the machine. Returns the UNet's
    parameter count."""
    cost, n = training_cost(net, timesteps, batch, per_process, channels, side)
    what = (f"training a UNet of {n:,} parameters (weights, gradients and AdamW's two moments) "
            if n else "training ") + (f"on train.batch_size={batch} images of "
                                      f"{channels}x{side}x{side}")
    fix = ("lower unet.base_channels, unet.channel_mults or unet.num_res_blocks, or "
           "train.batch_size (or unet.image_size)" if n else
           "lower train.batch_size (or unet.image_size)")
    resources.check_fits(cost, device, what, fix, ConfigError)
    return n


def process_state(requested: str | None, alone: str, doing: str) -> tuple[Any, torch.device]:
    """For a command that splits its work across ``accelerate launch``'s processes (``diffunet
    encode``): Accelerate's ``PartialState`` (``ACCELERATE_USE_CPU=1`` or ``--device cpu``
    joins the processes on the CPU) and this process's device (its ``--device``,
    ``requested``). A launch of lone processes is refused (:func:`refuse_lone_processes`)."""
    from accelerate import PartialState

    state = PartialState(cpu=cpu_requested() or requested == "cpu")
    refuse_lone_processes(state.num_processes, alone, doing)
    device = (torch.device("cpu") if requested is None and state.device.type == "cpu"
              else pick_device(requested, state.local_process_index))
    return state, device


def gather_objects(item: Any) -> list[Any]:
    """``item`` of every process of the launch, in rank order (a collective: every process
    calls it)."""
    from accelerate.utils import gather_object

    return gather_object([item])


def pick_device(requested: str | None, local_index: int = 0) -> torch.device:
    """The device a command runs on, from its ``--device``: None is this process's GPU where
    CUDA is available, else the CPU; a bare ``cuda`` is this process's GPU (``local_index``, the
    process's index on its machine, modulo the GPU count). An unknown device, or a GPU that is
    not there, is a one-line :class:`UsageError`."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested is None:
        return torch.device("cuda", local_index % count) if count else torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"unknown --device {requested!r}: diffunet runs on cpu, cuda or cuda:N"
                         + ("" if count else " (no CUDA device here: use cpu)"))
    if device.type == "cuda":
        if not count:
            raise UsageError(f"--device {requested}: CUDA is not available here; use --device "
                             "cpu")
        if device.index is None:
            return torch.device("cuda", local_index % count)
        if device.index >= count:
            raise UsageError(f"--device {requested}: this machine has {count} CUDA device(s)")
    return device


class EMA:
    """Exponential moving average of the weights, kept in fp32 (Polyak averaging).

    Every process updates its own copy from the same synchronised weights, so the copies stay
    identical without communication.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool) -> None:
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup

    def decay_at(self, step: int) -> float:
        """The decay used after optimizer step ``step`` (0-based); ramps up when warming up."""
        if self.warmup:
            return min(self.decay, (1 + step) / (10 + step))
        return self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, keep: torch.Tensor | None = None) -> None:
        """Move the average towards ``model``'s weights; where ``keep`` (a 0-d bool tensor on
        the device) is False, leave it exactly as it is (a skipped step), with no host sync."""
        weight = 1.0 - self.decay_at(step)
        ema = list(self.model.parameters())
        src = [p.detach().float() for p in model.parameters()]
        # One multi-tensor lerp (a few kernels on a GPU, not one per parameter); same numbers.
        if keep is None:
            torch._foreach_lerp_(ema, src, weight)
        else:
            w = keep.to(device=ema[0].device, dtype=torch.float32) * weight  # 0-d: weight or 0
            # One weight tensor per parameter: a lone tensor weight is read as a Python scalar
            # (a host sync); this list keeps it on the device.
            torch._foreach_lerp_(ema, src, [w] * len(ema))
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_READ_ONLY = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied"}


_LINK_FIX = "remove the link (its target is kept), or choose another --out-dir"


def write_failed(e: OSError, doing: str, out_dir: Path) -> TrainingError:
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


_MAX_LOG_BYTES = 1 << 30  # a log line is ~200 bytes: millions of lines fit
_MAX_LOG_LINE = 1 << 20  # bytes of one line: diffunet writes a few hundred
_MAX_STEP = 2**63  # a step is a 64-bit integer wherever it goes (trackers, tensors, plots)


class LogRecord(NamedTuple):
    """One line of ``log.jsonl``: its 1-based line ``number``, its ``step``, the JSON object
    and the line's bytes (without the newline)."""

    number: int
    step: int
    record: dict[str, Any]
    line: bytes


def _parse_log_line(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """One ``log.jsonl`` line as (its JSON object, None), or (None, what is wrong with it):
    not UTF-8, not JSON, not an object, no integer step in [0, 2**63)."""
    try:
        record = parse_json(line)
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except (ValueError, RecursionError) as e:
        return None, str(e).split("\n")[0][:120] or "not JSON"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < _MAX_STEP:
        return None, "no non-negative integer step (below 2**63)"
    return record, None


def read_log(log_path: Path) -> Iterator[LogRecord] | None:
    """The records of ``log.jsonl`` (None if there is none), one :class:`LogRecord` at a time,
    read line by line within bounds and checked, so that memory is one line's whatever the
    log's size (a log may hold millions of lines; reading it whole took 10-40 times its size).

    Every line must be a JSON object with a non-negative integer ``step``, except a last line
    cut short by a crash (no newline after it), which is dropped, and blank lines. Anything
    else (not a regular file, over 1 GiB, a line over 1 MiB or not UTF-8, a line that is not
    such an object) is a one-line :class:`FolderError` naming the file, the line and the fix,
    raised when the iteration reaches it."""
    if not (log_path.exists() or log_path.is_symlink()):
        return None
    return _log_records(log_path)


def _log_records(log_path: Path) -> Iterator[LogRecord]:
    def damaged(problem: str) -> FolderError:
        return FolderError(f"{log_path} is damaged ({problem}); move it away or delete it (it "
                           "is only the run's log; the training state is apart), then run again")

    with contextlib.ExitStack() as stack:
        try:
            raw, size = stack.enter_context(open_regular_file(log_path))
        except (OSError, ValueError) as e:
            raise damaged(" ".join(str(e).split())[:160]) from None
        if size > _MAX_LOG_BYTES:
            raise damaged(f"{size:,} bytes, more than the {_MAX_LOG_BYTES:,} such a file can "
                          "have")
        f = io.BufferedReader(raw, 1 << 16)
        number = read = 0
        while True:
            try:
                line = f.readline(_MAX_LOG_LINE + 1)
            except OSError as e:
                raise damaged(" ".join(str(e).split())[:160]) from None
            if not line:
                return
            number += 1
            read += len(line)
            if read > _MAX_LOG_BYTES:
                raise damaged(f"more than the {_MAX_LOG_BYTES:,} bytes such a file can have")
            if not line.endswith(b"\n"):
                if len(line) > _MAX_LOG_LINE:
                    raise damaged(f"line {number} is longer than {_MAX_LOG_LINE:,} bytes")
                return  # a torn last line (no newline after it): dropped
            line = line[:-1]
            if not line.strip():
                continue
            record, problem = _parse_log_line(line)
            if record is None:
                raise damaged(f"line {number} is {problem}" if problem == "not UTF-8 text"
                              else f"line {number}: {problem}")
            yield LogRecord(number, record["step"], record, line)


def check_log(log_path: Path) -> None:
    """Read ``log.jsonl`` through (:func:`read_log`): a damaged log is a :class:`FolderError`."""
    for _ in read_log(log_path) or ():
        pass


def trim_log(log_path: Path, step: int, folder: OpenFolder) -> None:
    """Drop the ``log.jsonl`` lines past ``step`` (those of the work a resumed run redoes, and a
    torn last line), so the log ends as an uninterrupted run's would; checked by
    :func:`read_log` as it is copied, one line at a time. ``step`` 0 (no state) leaves an
    empty log. ``folder``: the run folder, open (the log is rewritten relative to its
    descriptor, never through a link)."""
    records = read_log(log_path)
    if records is None:
        return
    # a damaged line leaves the old log as it was
    with folder.writer(log_path.name) as out:
        for r in records:
            if step > 0 and r.step <= step:
                out.write(r.line + b"\n")


def check_resume_compatible(saved: dict[str, Any], cfg: Any) -> None:
    """Refuse resuming with a config that changes what the saved run computed.

    ``saved`` is the config the state was written with (plain data), ``cfg`` the composed config
    of this run. Every field is compared unless its dataclass declares it
    :func:`~diffunet.config.free_on_resume`; keys the saved config lacks (written by an older
    diffunet) constrain nothing.
    """
    now = to_dict(cfg)
    for section in now:
        cls = type(getattr(cfg, section))
        table = saved.get(section)
        if not isinstance(table, dict):
            continue
        for key, value in table.items():
            if key not in now[section] or may_change_on_resume(cls, key):
                continue
            if now[section][key] != value:
                raise ConfigError(
                    f"{section}.{key}: the run being resumed used {value!r}, this config says "
                    f"{now[section][key]!r}; resume with the same {section}.{key} or start a "
                    "new --out-dir")


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


_RUN_SUBFOLDERS = ("samples", "weights", "state", "phema")


def not_a_run_yet(folder: Path, root: type) -> bool:
    """Whether ``folder`` holds nothing but what a start that failed before its first state
    left: diffunet's own ``config.json`` (a JSON object of ``root``'s sections and keys), a
    valid ``log.jsonl`` and empty ``samples/``, ``weights/``, ``state/``, ``phema/`` folders,
    and the trackers that config names: TensorBoard's ``tensorboard/`` holding only event
    files, W&B's ``wandb/`` folder and ``wandb_run_id.txt``. Such a folder is not a run yet: a
    new start may use it as if it were empty (new event files go beside the old; a fresh start
    takes a new W&B run id). Anything else (a state, a model file, a preview, a snapshot, any
    other file, a symlink) makes it a run, or someone else's."""
    from .config import field_types

    try:
        entries = {p.name: p for p in folder.iterdir()}
        if "config.json" not in entries:
            return False
        data = parse_json(read_regular_file(folder / "config.json", 16 << 20))
        if not isinstance(data, dict) or not data:
            return False
        train = data.get("train")
        trackers = train.get("trackers") if isinstance(train, dict) else None
        trackers = ({t for t in trackers if isinstance(t, str)} if isinstance(trackers, list)
                    else set())
        for name, p in entries.items():
            info = os.lstat(p)
            if name in _RUN_SUBFOLDERS:
                if not stat.S_ISDIR(info.st_mode) or any(p.iterdir()):
                    return False
            elif name == "log.jsonl":
                if not stat.S_ISREG(info.st_mode):
                    return False
                check_log(p)
            elif name == "tensorboard" and "tensorboard" in trackers:
                if not stat.S_ISDIR(info.st_mode) or not all(
                        e.name.startswith("events.out.tfevents.")
                        and stat.S_ISREG(os.lstat(e).st_mode) for e in p.iterdir()):
                    return False
            elif name == "wandb" and "wandb" in trackers:
                if not stat.S_ISDIR(info.st_mode):
                    return False
            elif name == WANDB_ID_FILE and "wandb" in trackers:
                text = read_regular_file(p, 1024).decode("ascii", "replace").strip()
                if not re.fullmatch(r"[a-z0-9]{1,64}", text):
                    return False
            elif name != "config.json" or not stat.S_ISREG(info.st_mode):
                return False
        sections = field_types(root)
        for section, table in data.items():
            if section not in sections or not isinstance(table, dict):
                return False
            keys = {f.name for f in dataclasses.fields(sections[section])}
            if not set(table) <= keys:
                return False
    except (OSError, ValueError, RecursionError, FolderError):
        return False
    return True


class FolderLock:
    """An exclusive ``flock`` on a run folder itself (the directory, so nothing is written into
    it): held while the run lasts, released by :meth:`close` or, whatever happens, by the kernel
    when the process ends, so a SIGKILL never leaves a stale lock."""

    def __init__(self, folder: Path, dir_fd: int | None = None) -> None:
        import fcntl

        self.folder = folder
        # dir_fd: the folder already open (the lock is then on that very folder, whatever its
        # path names now); a descriptor of its own, so closing it releases the lock
        self._fd: int | None = (os.open(folder, os.O_RDONLY) if dir_fd is None
                                else os.open(".", os.O_RDONLY, dir_fd=dir_fd))
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            inode = os.fstat(self._fd).st_ino
            os.close(self._fd)
            self._fd = None
            holder = _lock_holder(inode)
            raise FolderError(f"{folder} is in use by another diffunet run (process "
                              f"{holder}); wait for it to finish or stop it, or choose another "
                              "--out-dir") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _lock_holder(inode: int) -> str:
    """The PID holding a flock on the folder ``inode``, from Linux's /proc/locks; else
    "unknown"."""
    try:
        with open("/proc/locks", encoding="ascii") as f:
            for line in f:  # "1: FLOCK  ADVISORY  WRITE 6285 00:2f:1234 0 EOF"
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and \
                        fields[5].rsplit(":", 1)[-1] == str(inode):
                    return fields[4]
    except (OSError, ValueError):
        pass
    return "unknown"


def lock_folder(folder: Path, dir_fd: int | None = None) -> FolderLock | None:
    """Take ``folder``'s run lock (:class:`FolderLock`; ``dir_fd``: the folder already open);
    another holder is a :class:`FolderError` naming its process. Where the OS has no ``flock``
    (Windows) nothing is locked and None is returned."""
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover - Windows
        return None
    return FolderLock(folder, dir_fd)


# ---------------------------------------------------------------------------------------------
# Experiment trackers: TensorBoard and W&B, driven here (not through Accelerate's trackers,
# which put TensorBoard's files into RUN/NAME/, W&B's into the working directory and make every
# run its own W&B project). Each is created on the main process only.


WANDB_ID_FILE = "wandb_run_id.txt"
"""The run folder's record of its W&B run id, so a resumed run continues the same W&B run."""


def check_trackers(trackers: Sequence[str], out_dir: str | os.PathLike | None = None,
                   names: Sequence[str] = ()) -> None:
    """A one-line :class:`MissingDependencyError` naming what to install for a tracker whose
    package is missing; the harness checks before anything starts (no folder, no Accelerate).
    With ``out_dir`` (and the project and run ``names`` a tracker gets, by default the folder's
    name), a run folder whose path is not UTF-8 (a name of bytes like ``run\\xff``) is a
    one-line :class:`FolderError`: the trackers store paths and names as UTF-8 and would fail
    with a traceback after the start."""
    for name in trackers:
        if name not in ("tensorboard", "wandb"):
            raise UsageError(f"unknown tracker {name!r}; use tensorboard and/or wandb")
        try:
            importlib.import_module(name)
        except ImportError:
            raise MissingDependencyError(
                f'train.trackers: {name} is not installed; pip install "diffunet[{name}]" (or '
                f"drop {name} from train.trackers)") from None
    if not trackers or out_dir is None:
        return
    for text in (os.fspath(out_dir), *names):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(os.fspath(out_dir)).decode("utf-8", "backslashreplace")
            raise FolderError(f"--out-dir {shown}: its path is not UTF-8, and "
                              f"train.trackers=[{', '.join(trackers)}] store paths and run "
                              "names as UTF-8; choose an --out-dir whose path is UTF-8 (or drop "
                              "train.trackers)") from None


def tracker_config(cfg: Any) -> dict[str, Any]:
    """The run's config for a tracker's hyperparameter table: ``{"train.lr": 0.001, ...}``
    (lists as JSON text, unset values as ``"none"``)."""
    flat = {}
    for section, table in to_dict(cfg).items():
        for key, value in table.items():
            flat[f"{section}.{key}"] = (value if isinstance(value, (bool, int, float, str))
                                        else "none" if value is None else json.dumps(value))
    return flat


class TensorBoardTracker:
    """Event files in ``folder`` (the run's ``tensorboard/``): the logged numbers as scalars,
    the preview grids as images, the config as text."""

    def __init__(self, folder: Path, config: dict[str, Any], start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides what an interrupted run logged past the state this run
        # resumes from, as log.jsonl is trimmed (everything, for a fresh start in the folder).
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1)
        text = "\n".join(f"    {k} = {v}" for k, v in config.items())  # markdown code block
        self.writer.add_text("config", text, global_step=start_step)
        self.writer.flush()

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def log_image(self, name: str, image: Any, step: int) -> None:
        """``image``: a uint8 (H, W, C) array."""
        self.writer.add_image(name, image, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run: its files in ``out_dir/wandb/`` (none in the working directory),
    in ``project`` under ``name``; its id is kept in ``out_dir/wandb_run_id.txt`` so that a
    resumed run (``resumed``) logs on into the same W&B run. ``WANDB_MODE=offline`` keeps it all
    local (``wandb sync RUN/wandb/offline-run-*`` uploads it later)."""

    def __init__(self, out_dir: Path, config: dict[str, Any], project: str, name: str,
                 resumed: bool) -> None:
        import wandb

        id_path = out_dir / WANDB_ID_FILE
        run_id = None
        if resumed and id_path.is_file():
            with contextlib.suppress(OSError, ValueError):
                text = read_regular_file(id_path, 1024).decode("ascii").strip()
                run_id = text if re.fullmatch(r"[a-z0-9]{1,64}", text) else None
        if run_id is None:
            run_id = secrets.token_hex(8)  # W&B ids: lower-case letters and digits
            atomic_write_bytes(id_path, (run_id + "\n").encode())
        try:
            self.run = wandb.init(project=project, name=name, id=run_id, resume="allow",
                                  dir=str(out_dir), config=config)
        except Exception as e:  # no login, no network, a bad project: one line, not a trace
            reason = " ".join(str(e).split())[:200]
            raise TrainingError(f"W&B could not start ({type(e).__name__}: {reason}); run "
                                "`wandb login`, or set WANDB_MODE=offline to keep the run's W&B "
                                "files in the run folder and `wandb sync` them later") from None

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_image(self, name: str, image: Any, step: int) -> None:
        import wandb

        self.run.log({name: wandb.Image(image, caption=f"step {step}")}, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


# ---------------------------------------------------------------------------------------------
# The run


class Run:
    """One training run's shared machinery; use it as a context manager around the loop.

    Creating it sets up Accelerate, checks the launch and the batch, claims the run folder
    (refusing a non-empty one without ``resume``, taking the lock) and, with ``resume``, reads
    and checks the newest state: afterwards ``resume_from`` is that state (None: a fresh run),
    ``saved`` its ``trainer.json`` and ``start_step`` its step. Then the trainer builds its
    model and calls :meth:`restore`, :meth:`prepare`, :meth:`open_folder` and, in its loop,
    :meth:`should_stop`, :meth:`log`, :meth:`save_state`; leaving the ``with`` block closes the bar,
    ends the trackers, restores the signal handlers and releases the lock.

    ``command`` names the command in messages (``"train"``, ``"segment train"``);
    ``trackers`` (``tensorboard``, ``wandb``) get the logged numbers and the images of
    :meth:`log_image`, under ``tracker_project`` and ``run_name`` (unset: the folder's name);
    a tracker whose package is missing is refused first, before anything starts.
    ``batch_size`` must split into ``batch_divisor`` parts per process and, with images of
    ``image_shape`` (channels, side), the network ``net`` and a schedule of ``timesteps``,
    fit the device (:func:`check_training_fits`, before anything is built); ``state_keys`` are the
    keys (and JSON types) a state's ``trainer.json`` must hold; ``say`` receives one-line
    messages (main process only); ``progress`` shows a tqdm bar.
    """

    def __init__(self, cfg: Any, out_dir: str | Path, *, resume: bool, command: str,
                 mixed_precision: str, batch_size: int, image_shape: tuple[int, int],
                 batch_divisor: int = 1, trackers: Sequence[str] = (),
                 tracker_project: str | None = None, run_name: str | None = None,
                 state_keys: dict[str, type] | None = None, net: UNetConfig | None = None,
                 timesteps: int | None = None,
                 static_graph: bool = False, say: Callable[[str], None] = lambda msg: None,
                 progress: bool = True) -> None:
        from accelerate import Accelerator  # the heavy import lives here (and in sampling)
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg, self.out_dir, self.command = cfg, Path(out_dir), command
        self._say, self._show_progress = say, progress
        self.trackers = tuple(trackers)
        folder_name = self.out_dir.resolve().name or "diffunet"
        self.tracker_project = tracker_project or folder_name
        self.run_name = run_name or folder_name
        # before the folder is claimed or Accelerate started
        check_trackers(self.trackers, self.out_dir, (self.tracker_project, self.run_name))
        self._trackers: list[Any] = []  # the started ones (main process)
        self.bar: Any = None
        self._lock: Any = None
        self._folder: OpenFolder | None = None  # the run folder, opened once (main process)
        self._subfolders: dict[str, OpenFolder] = {}
        self._created = self._opened = False
        self._stopper: stopping.Stopper | None = None
        self._signals = contextlib.ExitStack()
        self._last_state: Path | None = None  # the newest state this run saved
        self._rank_rng: dict[str, torch.Tensor] = {}
        try:
            # DDP: gradients written straight into the all-reduce buckets (no copy, less
            # memory); a static graph (same parameters used every step) lets DDP skip its
            # per-step search for unused ones and overlap more of the communication.
            ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True,
                                                static_graph=static_graph)
            self.accelerator = Accelerator(mixed_precision=mixed_precision,
                                           project_dir=str(self.out_dir), kwargs_handlers=[ddp])
        except ValueError as e:
            raise ConfigError(f"train.mixed_precision={mixed_precision!r} cannot run here ({e}); "
                              "use 'bf16' or 'no' on a CPU") from None
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.main, self.device = acc.is_main_process, acc.device
        self._check_launch()
        if batch_size % (self.world * batch_divisor):
            by = f"{self.world} processes" + (f" x {batch_divisor} grad_accum_steps"
                                              if batch_divisor > 1 else "")
            raise ConfigError(f"train.batch_size: {batch_size} is not divisible by {by}")
        check_training_fits(net, timesteps, batch_size, batch_size // self.world, *image_shape,
                            self.device)
        if self.device.type == "cuda":
            # TF32 tensor cores for the fp32 matmuls (cuDNN convolutions use them by default);
            # the shapes never change, so cuDNN may time its algorithms once and keep the best.
            torch.set_float32_matmul_precision("high")
            torch.backends.cudnn.benchmark = True
        try:
            self.resume_from: Path | None = self.collective(lambda: self._claim_folder(resume))
            if self.world > 1:
                self._check_shared_folder()
            self.saved: dict[str, Any] = {}
            if self.resume_from is not None:
                self.saved = st.read_trainer(self.resume_from, state_keys)
                folder = self.resume_from
                note = self.collective(lambda: st.verify_files(folder, self.saved))
                if note:
                    self.tell(note)
                check_resume_compatible(self.saved["config"], cfg)
            elif resume:
                self.tell(f"no saved state in {self.out_dir / 'state'}; starting a fresh run")
            acc.wait_for_everyone()
        except BaseException:
            self._release()
            raise
        self.start_step: int = int(self.saved.get("step", 0))

    # -- set-up --------------------------------------------------------------------------------

    def _check_launch(self) -> None:
        refuse_lone_processes(self.world, f"train alone into {self.out_dir}", "train")
        if (self.world == 1 and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ
                and cpu_requested()):
            # `accelerate launch --cpu --num_processes N` runs ONE process unless MPI is set up.
            self.tell("note: `accelerate launch --cpu` started one process (Accelerate needs "
                      "mpirun for several CPU processes); training in one process, which gives "
                      "the same model. For N CPU processes use: ACCELERATE_USE_CPU=1 accelerate "
                      f"launch --multi_gpu --num_processes N -m diffunet {self.command} ...")

    def _claim_folder(self, resume: bool) -> Path | None:
        """Main process: open the folder once, check it, take its lock, find the state to
        resume from."""
        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise FolderError(f"--out-dir {out} is a file; give a folder path")
        self._created = not out.exists()
        # opened once (a link given as --out-dir is followed here, and only here): the lock,
        # the sub-folders and the files written into them are relative to this descriptor
        self._folder = open_output_folder(out, label="--out-dir", create=True)
        for sub in RUN_SUBFOLDERS:  # before anything is read from them or written
            found = self._folder.lstat(sub)
            if found is not None and stat.S_ISLNK(found.st_mode):
                raise FolderError(f"{out / sub} is a symbolic link; diffunet never writes "
                                  f"through a link it did not create: {_LINK_FIX}")
        if not resume and not self._created and self._folder.names():
            if not not_a_run_yet(out, type(self.cfg)):
                raise FolderError(f"--out-dir {out} is not empty; pass --resume to continue "
                                  "that run, or choose another --out-dir")
            self.tell(f"note: {out} holds only the config.json (and log) of a run that never "
                      "saved a state; starting afresh in it")
        if resume and not self._created:
            check_log(out / "log.jsonl")  # a damaged log is refused before anything is written
        self._lock = lock_folder(out, self._folder.fileno())
        return st.newest_state(out / "state") if resume else None

    def _check_shared_folder(self) -> None:
        """Every process writes its own part of a state into the run folder, so every node
        must see it: the main process puts a marker there and each process looks for it."""
        def put() -> Path:
            path = self.out_dir / f".shared-{secrets.token_hex(8)}"
            path.touch()
            return path

        marker = self.collective(put)  # the main process's name, on every process
        try:

            def visible() -> None:
                if not marker.exists():
                    raise FolderError(
                        f"--out-dir {self.out_dir} is not the same folder for process "
                        f"{self.rank} on {socket.gethostname()} as for the main process: every "
                        "node writes its part of the training state there; give an --out-dir "
                        "on a file system all nodes share")

            self.collective(visible, main_only=False)
        finally:
            if self.main:
                marker.unlink(missing_ok=True)

    def _release(self) -> None:
        """Release the lock and the folder; a folder this run created and never wrote to goes
        again (bad input leaves nothing behind)."""
        if self._created and self.main and not self._opened:
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()  # only if still empty
        for folder in self._subfolders.values():
            folder.close()
        self._subfolders = {}
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self._folder is not None:
            self._folder.close()
            self._folder = None

    def seed_everything(self, seed: int) -> None:
        """Seed Python, NumPy and torch (every device) the same on every process."""
        from accelerate.utils import set_seed

        set_seed(seed)

    def generator(self, seed: int) -> torch.Generator:
        """A generator on this run's device seeded with ``seed``, for randomness that must be
        the same on every process (it is saved in the state); the CPU's where the device has
        none of its own."""
        try:
            gen = torch.Generator(device=self.device)
        except RuntimeError:
            gen = torch.Generator()
        return gen.manual_seed(seed)

    def workers(self, requested: int | None) -> int:
        """DataLoader worker processes: ``requested``, else 0 on a CPU (the training process
        has the cores) and on a GPU up to 8, the machine's CPUs shared among its processes."""
        if requested is not None:
            return requested
        if self.device.type != "cuda":
            return 0
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return max(1, min(8, (os.cpu_count() or 1) // local - 1))

    def adamw(self, params: Any, **kwargs: Any) -> torch.optim.AdamW:
        """AdamW, fused where PyTorch has the kernel for this device: one kernel for all
        parameters (~3.5x faster on a CPU than the multi-tensor default for the DDPM net)."""
        fused = True if self.device.type in ("cuda", "cpu") else None
        return torch.optim.AdamW(params, fused=fused, **kwargs)

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                ema: torch.nn.Module | None = None,
                generators: dict[str, torch.Generator] | None = None) -> dict[str, torch.Tensor]:
        """Load the state being resumed (nothing for a fresh run) into the bare ``model``, its
        ``ema`` copy and ``optimizer`` (before :meth:`prepare`) and set the shared
        ``generators`` (same on every process). Returns this process's own saved tensors (the
        ``rank_tensors`` of :meth:`save_state`); its RNG states are set by :meth:`prepare`."""
        folder = self.resume_from
        if folder is None:
            return {}
        with state_must_fit(folder):
            model.load_state_dict(st.load_tensors(folder / "model.safetensors"))
            if ema is not None:
                ema.load_state_dict(st.load_tensors(folder / "ema.safetensors"))
            optimizer.load_state_dict(st.join_optimizer_state(
                st.load_tensors(folder / "optimizer.safetensors"), self.saved["optimizer"]))
            _match_param_layout(optimizer)
            if generators:
                shared = st.load_tensors(folder / "rng.safetensors")
                for name, gen in generators.items():
                    gen.set_state(shared[name])
            own: dict[str, torch.Tensor] = {}
            rank_file = folder / f"rng_rank{self.rank}.safetensors"
            if rank_file.is_file():  # absent if resumed on more processes than it had
                for key, value in st.load_tensors(rank_file).items():
                    (self._rank_rng if key.startswith("torch_") else own)[key] = value
                cpu = self._rank_rng.get("torch_cpu")
                like = torch.get_rng_state()
                if not all(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.ndim == 1
                           for v in self._rank_rng.values()) or cpu is None \
                        or cpu.shape != like.shape:
                    raise ModelFileError(
                        f"{rank_file} holds no valid torch RNG state; delete {folder} to resume "
                        "from the state before it, or start a new --out-dir")
        return own

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int
                ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """``accelerator.prepare`` the model and optimizer (device, DDP, mixed precision), then
        put back the resumed grad scaler and, last, this process's RNG (dropout): seeded from
        ``seed`` and the process's rank, so each process draws its own masks (as k-diffusion and
        EDM do), or, resumed, the saved states."""
        model, optimizer = self.accelerator.prepare(model, optimizer)
        scaler = self.accelerator.scaler
        if scaler is not None and self.saved.get("scaler"):
            scaler.load_state_dict(self.saved["scaler"])
        if self._rank_rng:
            st.set_rng_states(self._rank_rng)
        else:
            torch.manual_seed(seed_for(_TAG_DROPOUT, seed, self.rank))  # every device too
        return model, optimizer

    def open_folder(self, subdirs: Sequence[str]) -> None:
        """Make and open the run folder's sub-folders (each once, never through a link: see
        :data:`RUN_SUBFOLDERS`), remove what interrupted writes left, write the resolved
        ``config.json``, trim ``log.jsonl`` for a resumed run, start the trackers."""
        def on_main() -> None:
            self._opened = True
            assert self._folder is not None
            try:
                for sub in subdirs:
                    if sub not in self._subfolders:
                        self._subfolders[sub] = open_subfolder(self._folder, sub, fix=_LINK_FIX)
                self._clear_leftovers()  # temporary files of writes a crash cut short
                self._folder.write_file("config.json", (json.dumps(
                    to_dict(self.cfg), indent=2) + "\n").encode())
                # resumed: the lines past the state's step go (all of them without a state, as
                # in a folder that is not a run yet)
                trim_log(self.out_dir / "log.jsonl", self.start_step, self._folder)
            except OSError as e:
                raise write_failed(e, "preparing the run folder", self.out_dir) from None
            self._start_trackers()

        self.collective(on_main)
        if self.world > 1 and "state" in subdirs:
            self._join_state_folder()

    def _join_state_folder(self) -> None:
        """Every process writes its part of a state: each other process opens ``state/`` once
        too (never through a link) and checks it is the folder the main process opened (the
        same device and inode), so no later swap can redirect its writes."""
        identity = self.collective(lambda: self._subfolders["state"].identity())

        def join() -> None:
            if self.main:
                return
            with open_output_folder(self.out_dir, label="--out-dir") as run:
                folder = open_subfolder(run, "state", fix=_LINK_FIX, create=False)
            if folder.identity() != tuple(identity):
                folder.close()
                raise FolderError(
                    f"{self.out_dir / 'state'} is not the folder the main process opened for "
                    f"process {self.rank} on {socket.gethostname()} (another file system, or "
                    "it was moved or replaced meanwhile); give an --out-dir every process "
                    "sees as one folder")
            self._subfolders["state"] = folder

        self.collective(join, main_only=False)

    def _clear_leftovers(self) -> None:
        """Remove what interrupted writes left in the folders this process opened (the run
        folder and ``weights/``, ``samples/``, ``phema/`` on the main process; ``state/``'s
        ``.tmp-*``)."""
        others = [self._subfolders[s] for s in ("weights", "samples", "phema")
                  if s in self._subfolders]
        st.clear_leftovers(self._subfolders.get("state"),
                           [self._folder, *others] if self._folder is not None else others)

    def _start_trackers(self) -> None:
        config = tracker_config(self.cfg)
        for name in self.trackers:
            try:
                if name == "tensorboard":
                    assert self._folder is not None
                    # made and checked here (never a link); TensorBoard writes by path
                    open_subfolder(self._folder, "tensorboard", fix=_LINK_FIX).close()
                    folder = self.out_dir / "tensorboard"
                    self._trackers.append(TensorBoardTracker(folder, config, self.start_step))
                    self.tell(f"tensorboard: event files in {folder} (view them with "
                              f"`tensorboard --logdir {self.out_dir.parent}`)")
                else:
                    tracker = WandbTracker(self.out_dir, config, self.tracker_project,
                                           self.run_name, resumed=self.resume_from is not None)
                    self._trackers.append(tracker)
                    self.tell(f"wandb: project {self.tracker_project}, run {self.run_name} (id "
                              f"{tracker.run.id}), files in {self.out_dir / 'wandb'}")
            except OSError as e:
                raise write_failed(e, f"starting {name}", self.out_dir) from None

    # -- while the loop runs -------------------------------------------------------------------

    def __enter__(self) -> Run:
        # A first SIGINT/SIGTERM asks the loop to stop after its step (should_stop); a second,
        # or a step that does not get there within seconds, raises Stopped (diffunet.stopping).
        self._stopper = self._signals.enter_context(stopping.graceful())
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.bar is not None:
                self.bar.close()
            self._signals.close()
            self._close_trackers(failed=exc[0] is not None)
        finally:
            self._release()
        if isinstance(exc[1], Stopped) and not exc[1].kept:
            # the one line says what the run kept (the lock is released by now)
            e, state = exc[1], self._last_state or self.resume_from
            kept = (f"nothing was saved after {state} (--resume continues from it)"
                    if state is not None else "no state was saved yet (the same command "
                    "starts the run again)")
            raise Stopped(e.signal, e.signum, e.why, kept) from None

    def _close_trackers(self, failed: bool) -> None:
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            try:
                tracker.close(failed)
            except Exception:
                if not failed:  # never hide the error the run stops for
                    raise

    def progress(self, total: int) -> Any:
        """The tqdm bar of the run's steps (shown on the main process when asked for)."""
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=self.start_step, disable=not (
            self.main and self._show_progress), dynamic_ncols=True, unit="step", smoothing=0.05)
        return self.bar

    def tell(self, msg: str) -> None:
        """A one-line message for people, from the main process, above the progress bar."""
        if not self.main:
            return
        if self.bar is None:
            self._say(msg)
            return
        from tqdm.auto import tqdm

        with tqdm.external_write_mode():  # keep the bar intact below the message
            self._say(msg)

    @property
    def stop_signal(self) -> str | None:
        """The name of the signal that asked this process to stop (None: not asked)."""
        return self._stopper.requested if self._stopper is not None else None

    def should_stop(self, check_point: bool) -> bool:
        """Whether the loop stops after this step because of SIGINT/SIGTERM, the same answer on
        every process. One process answers at once from its host flag; several agree (one small
        all-reduce, a host sync) only at the loop's ``check_point`` steps, so the steps between
        never wait for the host. A True answer tells the signal handler the stop is under way
        (else a step that has not got here within seconds of the signal is stopped where it
        is, :mod:`diffunet.stopping`)."""
        if self._stopper is not None:
            self._stopper.step_done()
        if self.world == 1:
            stop = self.stop_signal is not None
        elif not check_point:
            if self._stopper is not None:
                self._stopper.progress()  # alive: the next check point will answer
            return False
        else:
            flag = torch.tensor(float(self.stop_signal is not None), device=self.device)
            stop = bool(self.accelerator.reduce(flag, "sum") > 0)
        if stop and self._stopper is not None:
            self._stopper.acknowledge()
        return stop

    def collective(self, fn: Callable[[], R], *, main_only: bool = True) -> R:
        """Run ``fn`` on the main process (or, with ``main_only=False``, on every process) and
        return the main process's result everywhere. If it raises anywhere, every process
        raises: the failing one its own error, the others the same type and message."""
        result: Any = None
        error: Exception | None = None
        if self.main or not main_only:
            try:
                result = fn()
            except Exception as e:  # re-raised below, on every process
                error = e
        if self.world == 1:
            if error is not None:
                raise error
            return result
        from accelerate.utils import gather_object

        mine = (result if self.main else None,
                None if error is None else (type(error).__name__, str(error)))
        reports = gather_object([mine])
        if error is not None:
            raise error
        for _, report in reports:
            if report is not None:
                raise errors.reported_error(*report)
        return reports[0][0]

    def log(self, record: dict[str, Any], postfix: dict[str, Any] | None = None) -> None:
        """Append ``record`` to ``log.jsonl`` (main process), show ``postfix`` on the bar and
        send the numbers to the trackers. Called by every process."""
        def on_main() -> None:
            assert self._folder is not None
            try:  # appended relative to the run folder's descriptor, never through a link
                fd = self._folder.open("log.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                       | getattr(os, "O_NOFOLLOW", 0))
                with os.fdopen(fd, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise write_failed(e, "writing log.jsonl", self.out_dir) from None
            if postfix and self.bar is not None:
                self.bar.set_postfix(**postfix)
            step = record.get("step")
            numbers = {k: v for k, v in record.items() if k != "step" and isinstance(
                v, (int, float)) and not isinstance(v, bool)}
            if isinstance(step, int) and numbers:
                for tracker in self._trackers:
                    tracker.log(numbers, step)

        self.collective(on_main)

    def log_image(self, name: str, image: Any, step: int) -> None:
        """Send an image to the trackers (none: nothing to do), e.g. a preview grid: a PIL
        image, a PNG's path, or a (C, H, W) tensor in [-1, 1] (C = 1 or 3); what the main
        process gives is sent. Called by every process."""
        if not self.trackers:
            return

        def on_main() -> None:
            import numpy as np
            from PIL import Image

            from .images import open_image, to_uint8

            if isinstance(image, torch.Tensor):
                arr = to_uint8(image).cpu().numpy()
            elif isinstance(image, Image.Image):
                arr = np.asarray(image.convert("RGB"))
            else:
                with open_image(image, None) as img:
                    arr = np.asarray(img.convert("RGB"))
            for tracker in self._trackers:
                tracker.log_image(name, arr, step)

        self.collective(on_main)

    def _check_still_opened(self, sub: str) -> None:
        """Main process: refuse in one line if ``--out-dir/sub`` no longer names the sub-folder
        :meth:`open_folder` opened (a link or another folder swapped in meanwhile): the state is
        written into the folder opened, wherever it now is, where a resume would not find it."""
        opened = self._subfolders.get(sub)
        if opened is None:
            return
        path = self.out_dir / sub
        try:
            now = os.lstat(path)
            same = not stat.S_ISLNK(now.st_mode) and (now.st_dev, now.st_ino) == \
                opened.identity()
        except OSError:
            same = False
        if not same:
            raise FolderError(f"{path} is no longer the folder this run opened (a link or "
                              "another folder was put there while it ran); diffunet never "
                              f"writes through it: put the run's {sub}/ back, then --resume")

    def write_file(self, subfolder: str, name: str, data: bytes, *,
                   durable: bool = True) -> Path:
        """Write ``data`` as ``name`` in the run's ``subfolder`` (one of those
        :meth:`open_folder` opened), atomically and relative to that folder's descriptor, never
        through a link; returns its path (for messages). Main process, inside :meth:`write`.
        ``durable``: flushed to disk (a preview grid need not be)."""
        self._subfolders[subfolder].write_file(name, data, durable=durable)
        return self.out_dir / subfolder / name

    def subfolder(self, name: str) -> OpenFolder:
        """The run's sub-folder ``name`` as :meth:`open_folder` opened it (main process): to
        list or remove files in it at its descriptor, never through a link."""
        return self._subfolders[name]

    def write(self, doing: str, fn: Callable[[], R]) -> R:
        """Run a main-process write ``fn`` (a preview, a model file); a failed write is the
        one-line :func:`write_failed` message on every process."""
        def on_main() -> R:
            try:
                return fn()
            except OSError as e:
                raise write_failed(e, doing, self.out_dir) from None

        return self.collective(on_main)

    def save_state(self, step: int, *, tensors: dict[str, dict[str, torch.Tensor]],
                   optimizer: torch.optim.Optimizer, trainer: dict[str, Any],
                   generators: dict[str, torch.Generator] | None = None,
                   rank_tensors: dict[str, torch.Tensor] | None = None, keep_last: int,
                   before_commit: Callable[[], Any] | None = None) -> Path:
        """Write ``state/step<step>/`` atomically, keeping the newest ``keep_last``.

        ``tensors``: file stem -> state dict, written by the main process (``model``, ``ema``);
        ``optimizer`` split into tensors and JSON; ``trainer``: the loop's own counters, beside
        the step, world size, grad scaler and config the harness adds; ``generators``: shared
        generators (``rng.safetensors``); ``rank_tensors``: this process's own tensors, saved
        with its RNG states in ``rng_rank<r>.safetensors``. ``before_commit`` runs on the main
        process once every file is written, before the rename (e.g. the inference model file).
        A failed write removes the partial state and raises the :func:`write_failed` line.
        """
        name = st.state_name(step)
        self.collective(lambda: self._check_still_opened("state"))
        # every write below is relative to the state/ folder each process opened once (and the
        # temporary folder opened in it), never by path: a swap after the check above cannot
        # redirect a write; the run writes on into the folder it opened
        root = self._subfolders["state"]
        tmp: st.Folder | None = None

        def failed(e: OSError) -> TrainingError:
            with contextlib.suppress(OSError):
                self._clear_leftovers()
            return write_failed(e, f"saving state {name}", self.out_dir)

        def begin() -> tuple[int, int]:
            nonlocal tmp
            try:
                tmp = st.begin_state(root, step)
            except OSError as e:
                raise failed(e) from None
            return tmp.identity()

        def join(identity: tuple[int, int]) -> st.Folder:
            """The temporary folder the main process made, opened in this one (no link) and
            checked to be that folder."""
            shown = root.path / st.temporary_name(step)
            folder = root.subfolder(shown.name, fix="run again with --resume", create=False)
            if folder.identity() != tuple(identity):
                folder.close()
                raise FolderError(f"{shown} was replaced while state {name} was being saved; "
                                  "diffunet never writes into a folder it did not make: run "
                                  "again with --resume")
            return folder

        def write_files(identity: tuple[int, int]) -> None:
            nonlocal tmp
            if not self.main:  # one exchange less than a collective of its own
                tmp = join(identity)
            assert tmp is not None
            try:
                st.write_tensors(tmp, f"rng_rank{self.rank}.safetensors",
                                 {**st.rng_states(), **(rank_tensors or {})})
                if not self.main:
                    return
                for stem, state_dict in tensors.items():
                    st.write_tensors(tmp, f"{stem}.safetensors", state_dict)
                opt_tensors, opt_plain = st.split_optimizer_state(optimizer.state_dict())
                st.write_tensors(tmp, "optimizer.safetensors", opt_tensors)
                if generators:
                    st.write_tensors(tmp, "rng.safetensors",
                                     {k: g.get_state() for k, g in generators.items()})
                scaler = self.accelerator.scaler
                st.write_json(tmp, "trainer.json", {
                    "format_version": st.STATE_FORMAT_VERSION, "step": step,
                    "world_size": self.world, **trainer,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "optimizer": opt_plain, "config": to_dict(self.cfg)})
                if before_commit is not None:
                    before_commit()
            except OSError as e:
                raise failed(e) from None

        def commit() -> Path:
            assert tmp is not None
            try:
                return root.path / st.commit_state(root, tmp, keep_last)
            except OSError as e:
                raise failed(e) from None

        # a first signal waits for the save (bounded by the disk); a second cuts it short, and
        # the half-written folder goes as every interrupted write's does
        with self._stopper.critical() if self._stopper is not None else contextlib.nullcontext():
            try:
                identity = self.collective(begin)
                self.collective(lambda: write_files(identity), main_only=False)
                self._last_state = self.collective(commit)
            except Stopped:
                if self.main:
                    with contextlib.suppress(OSError):
                        self._clear_leftovers()
                raise
            finally:
                if tmp is not None:
                    tmp.close()
        return self._last_state
