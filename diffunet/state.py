"""Resumable training state on disk: one folder per saved step, written atomically.

``state/step0001000/`` holds

- ``model.safetensors``, ``ema.safetensors``: the raw and EMA weights (fp32);
- ``optimizer.safetensors`` + the ``optimizer`` entry of ``trainer.json``: the optimizer's
  tensors and its plain values, so nothing is ever pickled;
- ``trainer.json``: step, LR schedule, grad scaler, counters, world size, the run config;
- ``rng.safetensors``: the step generator (noise, timesteps, flips, label dropout);
- ``rng_rank{r}.safetensors``: process r's torch RNG states (dropout), one file per process.

A state is written into ``state/.tmp-step0001000/`` and renamed to its final name only when
every file is on disk, so a folder named ``step*`` is always complete: a crash at any moment
leaves the previous states whole, and :func:`newest_state` never sees a partial one. Old states
leave the same way: renamed out of the ``step*`` names first, then deleted.

Reading a state never unpickles: :func:`read_trainer` and :func:`load_tensors` read JSON and
safetensors and turn a damaged or foreign file into a one-line
:class:`~diffunet.errors.ModelFileError`. ``trainer.json`` is read within bounds
(:func:`diffunet.fileio.read_json`: size, nesting, UTF-8) and every field checked against
:data:`TRAINER_SCHEMA`. Its ``files`` entry records the size and SHA-256 of every other file of
the state when it is committed; :func:`verify_files` checks them before a resume, so a file
removed, truncated, replaced (by another safetensors file, a symlink, ...) or added is refused
instead of resumed silently into a run that is no longer exact. States written before the
``files`` entry existed have none: they are resumed unverified, with a note saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import ModelFileError
from .fileio import fsync_dir, read_json as read_bounded_json, schema_problem

STATE_FORMAT_VERSION = 1
_NAME = re.compile(r"^step(\d{7,})$")
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors reports a failed write


def state_name(step: int) -> str:
    """``step0001000``: a state's folder name, made from a non-negative int and nothing else."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"a state's step must be a non-negative int, got {step!r}")
    return f"step{step:07d}"


def complete_states(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete state under ``root``, oldest first: every
    ``step*`` folder (states are committed by one rename, so one without a readable
    ``trainer.json`` was damaged afterwards, and :func:`read_trainer` says so rather than the
    resume silently falling back to an older state or a fresh start)."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def newest_state(root: Path) -> Path | None:
    states = complete_states(root)
    return states[-1][1] if states else None


def begin_state(root: Path, step: int) -> Path:
    """Create (afresh) the temporary folder a state for ``step`` is written into."""
    tmp = root / f".tmp-{state_name(step)}"
    _remove(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _remove(path: Path) -> None:
    """Delete a file, folder or symlink (a link is unlinked, never followed); errors ignored."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def discard(path: Path) -> None:
    """Delete a state folder so that no crash can leave it half-deleted under a ``step*``
    name: rename it to ``.tmp-<name>.old`` (atomic), then delete that."""
    stale = path.with_name(f".tmp-{path.name}.old")
    _remove(stale)
    try:
        os.rename(path, stale)
    except FileNotFoundError:
        return
    _remove(stale)


def clear_leftovers(out_dir: Path) -> None:
    """Remove what writes that a crash cut short left in a run folder: ``state/.tmp-*``
    folders and the ``.<name>.<random>.tmp`` files of atomic writes in ``weights/``,
    ``samples/`` and the run folder itself."""
    for leftover in (out_dir / "state").glob(".tmp-*"):
        _remove(leftover)
    for folder in (out_dir, out_dir / "weights", out_dir / "samples"):
        for leftover in folder.glob(".*.tmp"):
            _remove(leftover)


def file_digest(path: Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file, as ``trainer.json`` records it."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def record_files(folder: Path) -> None:
    """Add to ``folder/trainer.json`` the ``files`` entry: the size and SHA-256 of every other
    file of the state (:func:`verify_files` checks them on resume)."""
    path = folder / "trainer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["files"] = {f.name: file_digest(f) for f in sorted(folder.iterdir())
                     if f.name != "trainer.json"}
    write_json(path, data)


def commit_state(tmp: Path, keep_last: int) -> Path:
    """Record every file's size and hash in ``trainer.json`` (:func:`record_files`), flush
    every file in ``tmp``, rename it to its final name, then prune old states."""
    record_files(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    final = tmp.parent / tmp.name.removeprefix(".tmp-")
    if final.exists() or final.is_symlink():  # re-saving a step (e.g. over a damaged state)
        discard(final)
    os.rename(tmp, final)
    fsync_dir(tmp.parent)
    for _, old in complete_states(tmp.parent)[:-keep_last]:
        discard(old)
    return final


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:197] + "..." if len(text) > 200 else text or type(e).__name__


def _damaged(folder: Path, problem: str) -> ModelFileError:
    return ModelFileError(f"{problem}; delete {folder} to resume from the state before it, or "
                          "start a new --out-dir")


_TRAINER_KEYS: dict[str, type] = {"config": dict, "optimizer": dict, "nonfinite_total": int,
                                  "nonfinite_streak": int}

TRAINER_SCHEMA: dict[str, Any] = {
    "format_version": int, "step": int, "world_size": int, "scaler?": (dict, type(None)),
    "optimizer": {"state": dict, "param_groups": [{"params": [int]}]}, "config": dict,
    "files?": dict}
"""What every state's ``trainer.json`` holds (:func:`diffunet.fileio.schema_problem`), besides
the trainer's own keys; ``files`` is missing only in states written before it was recorded."""
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors$")
_MAX_STEP = 2**63 - 1
_MAX_TRAINER_BYTES = 64 << 20


def read_trainer(folder: Path, kinds: dict[str, type] | None = None) -> dict[str, Any]:
    """The checked ``trainer.json`` of the state ``folder`` (a :class:`ModelFileError` naming
    the problem if it is damaged, from a newer diffunet, or not this folder's). ``kinds``: the
    keys it must hold and their JSON types (default: those of diffusion training), checked
    with :data:`TRAINER_SCHEMA`."""
    path = folder / "trainer.json"
    try:
        data = read_bounded_json(path, _MAX_TRAINER_BYTES)
    except (OSError, ValueError, RecursionError) as e:
        raise _damaged(folder, f"{path} cannot be read ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise _damaged(folder, f"{path} is not a JSON object")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _damaged(folder, f"{path} has no valid format_version")
    if version > STATE_FORMAT_VERSION:
        raise ModelFileError(f"{folder} has newer state format version {version} than this "
                             f"diffunet reads ({STATE_FORMAT_VERSION}); upgrade diffunet")
    m = _NAME.match(folder.name)
    step = data.get("step")
    if m is None or not isinstance(step, int) or isinstance(step, bool) or step != int(m[1]) \
            or not 0 <= step <= _MAX_STEP:
        raise _damaged(folder, f"{path}: its step {_short(step)} does not match the folder name")
    schema = {**(kinds if kinds is not None else _TRAINER_KEYS), **TRAINER_SCHEMA}
    problem = schema_problem(data, schema)
    if problem is None and not 1 <= data["world_size"] <= 1 << 20:
        problem = f"world_size: {data['world_size']} is not a number of processes"
    if problem is None and not all(isinstance(k, str) and k.isdigit() and isinstance(v, dict)
                                   for k, v in data["optimizer"]["state"].items()):
        problem = "optimizer.state: expected parameter indices mapping to objects"
    if problem is None and "files" in data:
        problem = _files_problem(data["files"])
    if problem is not None:
        raise _damaged(folder, f"{path}: {problem}")
    return data


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _files_problem(files: dict[str, Any]) -> str | None:
    for name, entry in files.items():
        if not _FILE_NAME.match(name):
            return f"files: {_short(name)} is not the name of a state file"
        problem = schema_problem(entry, {"size": int, "sha256": str}, f"files.{name}")
        if problem is not None:
            return problem
        if not (0 <= entry["size"] and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            return f"files.{name}: not a size and a SHA-256 digest"
    return None


def verify_files(folder: Path, trainer: dict[str, Any]) -> str | None:
    """Check every file of the state ``folder`` against the sizes and SHA-256 digests its
    ``trainer`` (:func:`read_trainer`) recorded: a file missing, not a regular file (a symlink,
    a folder), of another size or content, or a safetensors file it did not record is a
    one-line :class:`ModelFileError`. Returns a note for a state written before digests were
    recorded (resumed unverified), else None."""
    files = trainer.get("files")
    if files is None:
        return (f"note: {folder} was written by an older diffunet that did not record its "
                "files' digests; resuming from it unverified")
    for name, want in files.items():
        path = folder / name
        try:
            info = os.lstat(path)
        except OSError:
            raise _damaged(folder, f"{path} is missing") from None
        if not stat.S_ISREG(info.st_mode):
            raise _damaged(folder, f"{path} is not a regular file (a symlink or folder)")
        if info.st_size != want["size"]:
            raise _damaged(folder, f"{path} has {info.st_size:,} bytes where the state recorded "
                           f"{want['size']:,}")
        try:
            digest = file_digest(path)["sha256"]
        except OSError as e:
            raise _damaged(folder, f"{path} cannot be read ({_one_line(e)})") from None
        if digest != want["sha256"]:
            raise _damaged(folder, f"{path} is not the file the state recorded (its SHA-256 "
                           "differs)")
    try:
        extra = sorted(p.name for p in folder.iterdir()
                       if p.name != "trainer.json" and p.name not in files)
    except OSError as e:
        raise _damaged(folder, f"{folder} cannot be listed ({_one_line(e)})") from None
    if extra:
        raise _damaged(folder, f"{folder / extra[0]} is not a file the state recorded")
    return None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file; a failed write raises OSError (errno, filename) like open()."""
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
    except Exception as e:  # safetensors raises SafetensorError("... (os error 28)")
        m = _OS_ERROR.search(str(e))
        if m is None:
            raise
        code = int(m[1])
        raise OSError(code, os.strerror(code), str(path)) from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a state's safetensors file (never unpickles; damage is a ModelFileError)."""
    try:
        return load_file(str(path))
    except Exception as e:  # missing, truncated, not safetensors (e.g. a pickle), ...
        raise _damaged(path.parent, f"{path} cannot be read ({_one_line(e)})") from None


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer ``state_dict`` as (tensors, plain JSON values), so it needs no pickle."""
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        plain_state[str(idx)] = {}
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                plain_state[str(idx)][key] = value
    return tensors, {"state": plain_state, "param_groups": state["param_groups"]}


def join_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`split_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def rng_states() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU and, where present, every CUDA device)."""
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"torch_cuda{i}"] = s
    return states


def set_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch_cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("torch_cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
