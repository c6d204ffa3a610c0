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

Nothing is written by path: every process hands in the ``state/`` folder it opened once (a
:class:`Folder`; the harness checks that each process's is the main process's), the temporary
folder is made and opened relative to it (never through a link), each file is serialised in
memory and put in place at that folder's descriptor, and the hashing, flushing, commit rename
and pruning all work relative to the descriptors, so ``state/`` swapped for a link while a run
saves never redirects a write: the state goes on into the folder the run opened.

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

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch
from safetensors.torch import load_file
from safetensors.torch import save as tensors_to_bytes  # in memory: no path written

from .errors import ModelFileError
from .fileio import read_json as read_bounded_json, schema_problem

STATE_FORMAT_VERSION = 1
_NAME = re.compile(r"^step(\d{7,})$")


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


class Folder(Protocol):
    """A folder opened once (:class:`diffunet.output_files.OpenFolder`, which the harness hands
    in: this module sits below it): every name is opened, written, renamed and removed relative
    to its descriptor, never through a link."""

    path: Path

    def names(self) -> list[str]: ...
    def lstat(self, name: str) -> os.stat_result | None: ...
    def open_regular(self, name: str) -> AbstractContextManager[tuple[BinaryIO, int]]: ...
    def read_json(self, name: str, max_bytes: int) -> Any: ...
    def write_file(self, name: str, data: bytes, *, durable: bool = True) -> None: ...
    def replace(self, src: str, dst: str) -> None: ...
    def remove(self, name: str) -> None: ...
    def subfolder(self, name: str, *, fix: str, create: bool = True) -> Folder: ...
    def identity(self) -> tuple[int, int]: ...
    def fsync(self) -> None: ...
    def close(self) -> None: ...


def temporary_name(step: int) -> str:
    """``.tmp-step0001000``: the folder a state for ``step`` is written into before its commit."""
    return f".tmp-{state_name(step)}"


_TMP_FIX = "remove it, then run again with --resume"


def begin_state(root: Folder, step: int) -> Folder:
    """Create (afresh) and open, inside the open ``state/`` folder ``root``, the temporary
    folder a state for ``step`` is written into (made at ``root``'s descriptor, then opened
    without following a link). The caller closes it."""
    name = temporary_name(step)
    root.remove(name)  # an earlier try's (a link there is unlinked, never followed)
    tmp = root.subfolder(name, fix=_TMP_FIX, create=True)
    if tmp.names():  # put there between the removal and the mkdir: not this save's folder
        tmp.close()
        raise FileExistsError(errno.EEXIST, "appeared while the state was being saved",
                              str(root.path / name))
    return tmp


def _remove(folder: Folder, name: str) -> None:
    """Delete a file, folder or symlink in ``folder`` (a link is unlinked, never followed);
    errors ignored (what is left is a leftover the next run removes)."""
    with contextlib.suppress(OSError):
        folder.remove(name)


def discard(root: Folder, name: str) -> None:
    """Delete the state folder ``name`` of ``root`` so that no crash can leave it half-deleted
    under a ``step*`` name: rename it to ``.tmp-<name>.old`` (atomic), then delete that."""
    stale = f".tmp-{name}.old"
    _remove(root, stale)
    try:
        root.replace(name, stale)
    except FileNotFoundError:
        return
    _remove(root, stale)


def clear_leftovers(root: Folder | None, others: Iterable[Folder] = ()) -> None:
    """Remove what writes that a crash cut short left in a run folder: the ``.tmp-*`` folders
    of the open ``state/`` folder ``root`` and the ``.<name>.<random>.tmp`` files of atomic
    writes in ``others`` (the run folder, ``weights/``, ``samples/``), each relative to its
    folder's descriptor."""
    if root is not None:
        for name in root.names():
            if name.startswith(".tmp-"):
                _remove(root, name)
    for folder in others:
        for name in folder.names():
            if name.startswith(".") and name.endswith(".tmp"):
                _remove(folder, name)


def _digest(f: BinaryIO) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    while chunk := f.read(1 << 20):
        h.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def file_digest(path: Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file, as ``trainer.json`` records it."""
    with open(path, "rb") as f:
        return _digest(f)


@contextlib.contextmanager
def _open_state_file(folder: Folder, name: str) -> Iterator[BinaryIO]:
    """A file of a state being written, opened for reading without following a link: anything
    but a regular file (put there by someone else) is an ``OSError`` naming it."""
    with contextlib.ExitStack() as stack:
        try:
            f, _ = stack.enter_context(folder.open_regular(name))
        except ValueError:  # NotRegularFileError: a link, folder, FIFO or device
            raise OSError(errno.EINVAL, "not a regular file", str(folder.path / name)) from None
        yield f


def record_files(folder: Folder) -> None:
    """Add to ``trainer.json`` of the open state ``folder`` the ``files`` entry: the size and
    SHA-256 of every other file of the state (:func:`verify_files` checks them on resume)."""
    try:
        data = folder.read_json("trainer.json", _MAX_TRAINER_BYTES)
    except ValueError as e:
        raise OSError(errno.EINVAL, str(e), str(folder.path / "trainer.json")) from None
    files = {}
    for name in sorted(folder.names()):
        if name != "trainer.json":
            with _open_state_file(folder, name) as f:
                files[name] = _digest(f)
    write_json(folder, "trainer.json", {**data, "files": files})


def commit_state(root: Folder, tmp: Folder, keep_last: int) -> str:
    """Record every file's size and hash in ``trainer.json`` (:func:`record_files`), flush
    every file in the open temporary folder ``tmp``, rename it (at the descriptor of the open
    ``state/`` folder ``root``) to its final name, then prune old states. Returns that name."""
    record_files(tmp)
    for name in tmp.names():
        with _open_state_file(tmp, name) as f:
            os.fsync(f.fileno())
    tmp.fsync()
    final = tmp.path.name.removeprefix(".tmp-")
    if root.lstat(final) is not None:  # re-saving a step (e.g. over a damaged state)
        discard(root, final)
    root.replace(tmp.path.name, final)
    root.fsync()
    for old in _state_names(root)[:-keep_last]:
        discard(root, old)
    return final


def _state_names(root: Folder) -> list[str]:
    """The ``step*`` folders (not links) of the open ``state/`` folder ``root``, oldest first."""
    found = []
    for name in root.names():
        m = _NAME.match(name)
        info = root.lstat(name) if m else None
        if m and info is not None and stat.S_ISDIR(info.st_mode):
            found.append((int(m.group(1)), name))
    return [name for _, name in sorted(found)]


def write_json(folder: Folder, name: str, data: dict[str, Any]) -> None:
    """Write ``data`` as the JSON file ``name`` in the open state ``folder``."""
    # not flushed here: commit_state flushes every file of the state, then the folder
    folder.write_file(name, json.dumps(data, indent=1).encode("utf-8"), durable=False)


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


def write_tensors(folder: Folder, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write the safetensors file ``name`` in the open state ``folder``: serialised in memory
    (for a moment the process holds its tensors twice: the price of a write that never goes
    by path), then put in place at the folder's descriptor."""
    data = tensors_to_bytes({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    folder.write_file(name, data, durable=False)  # commit_state flushes it


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
