"""Single output files: the one rule every command follows for a file it writes under a name the
user gives (``bench --json`` and ``--profile``, ``eval ... --json``, ``eval train-judge --out``,
``plot --out``, ``import DIR OUT``), under a default name in the working folder or a folder the
user gives (``bench``'s ``bench.json``, ``plot``'s ``RUN/plot.png``, ``bench --gpu-check DIR``'s
result files), and for the files ``export MODEL DIR`` writes into its pipeline folder. Output
*folders* of many files (sample, inspect, segment predict) follow :mod:`diffunet.outputs`.

:func:`claim_file` claims the path before any work and refuses, in one line
(:class:`~diffunet.errors.UsageError`; a folder that cannot be written in:
:class:`~diffunet.errors.FolderError`):

- an empty path; ``.``, ``..``, a path ending in a separator and an existing folder (each names a
  folder, not a file); a path whose folder does not exist or is not a folder;
- a symbolic link at the path, dangling or not: diffunet never writes through a link, nor
  replaces one it did not create;
- a FIFO, socket or device at the path (never opened: a FIFO would block the command);
- an input of the command (``inputs``; links and hard links too), even with ``--overwrite``;
- an existing regular file, unless the command recognises it by its content as its own earlier
  output (``ours``: a ``written_by`` marker, a PNG's ``Software`` text) or the user passed the
  command's ``--overwrite`` (``overwrite=True``).

Claiming opens the file's folder once: every later step (the checks, the temporary file, the
rename) works relative to that descriptor, so a folder swapped for a link meanwhile is never
followed. It removes the stale temporary files of earlier interrupted writes of the same name
(:func:`remove_stale_temporaries`) and creates the new one, ``.diffunet-<name>.<pid>.<hex>.tmp``
(``O_CREAT | O_EXCL | O_NOFOLLOW``, under an ``flock`` while it lives), so a read-only or full
folder is found before the work too. :meth:`OutputFile.write` (or :meth:`OutputFile.open`)
fills it, flushes it to disk (fsync) and puts it in place: a new file by a hard link that fails
if anything appeared under the name meanwhile, an earlier file by a rename over it after checking
it is still the claimed file; then the folder is flushed. A failure, an interrupt, or a claim
closed without a write removes the temporary file; a kill leaves it, and the next claim of the
name removes it (its lock is free and its process gone; a temporary whose writer still runs is
kept). Where the platform has no ``dir_fd`` or ``flock`` (Windows) names are joined to the
folder's path and stale temporaries are kept.

``tests/test_layout.py`` checks that no command writes a file any other way: an AST scan of the
package for every way to write a file, each accepted only where its ``WRITERS`` table names
the module and the kind, with the reason (this module, output folders, the run folder, caches).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Optional

from .errors import FolderError, UsageError
from .fileio import open_regular_file, parse_json, read_json

__all__ = ["OpenFolder", "OutputFile", "Recognizer", "TMP_PREFIX", "check_distinct",
           "claim_file", "is_temporary_of", "open_folder", "open_subfolder",
           "remove_stale_temporaries", "starts_with", "temporary_name", "written_by"]

TMP_PREFIX = ".diffunet-"
"""How every temporary file of this writer's names begins (``.diffunet-<name>.<pid>.<8 hex>.tmp``);
the cleaner never touches anything else."""

Recognizer = Callable[[BinaryIO, int], bool]
"""``ours(f, size)``: whether the open regular file ``f`` of ``size`` bytes is the command's own
earlier output (read what is needed, within bounds; an exception counts as "no")."""

_TMP_RE = re.compile(r"\.diffunet-(?P<stem>.+)\.(?P<pid>[0-9]{1,10})\.[0-9a-f]{8}\.tmp")
# fileio.atomic_writer's temporaries (".<name>.<pid>.<8 hex>.tmp"): what export left before it
# wrote through this module; removed only for the names a caller owns, and only when stale
_LEGACY_TMP_RE = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]{1,10})\.[0-9a-f]{8}\.tmp")
_NAME_MAX = 255
_STEM_MAX = 200  # a temporary's name adds at most 40 bytes to the stem: under NAME_MAX
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_AT = all(f in os.supports_dir_fd for f in (os.open, os.stat, os.unlink, os.link, os.mkdir))

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, no stale-temporary removal
    fcntl = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------
# A folder opened once


class OpenFolder:
    """A folder opened once: names inside it are opened, checked, linked, renamed and removed
    relative to its descriptor (by path only where the platform has no ``dir_fd``)."""

    def __init__(self, path: Path, fd: Optional[int]) -> None:
        self.path = path
        """The folder as given (for messages)."""
        self._fd = fd

    def _at(self, name: str) -> tuple[str, dict[str, Any]]:
        if _AT and self._fd is not None:
            return name, {"dir_fd": self._fd}
        return os.path.join(self.path, name), {}  # pragma: no cover - no dir_fd

    def open(self, name: str, flags: int, mode: int = 0o666) -> int:
        """``os.open`` of ``name`` inside the folder."""
        where, kw = self._at(name)
        return os.open(where, flags | _CLOEXEC, mode, **kw)

    def lstat(self, name: str) -> Optional[os.stat_result]:
        """``name``'s own status (a link is not followed), or None when nothing is there."""
        where, kw = self._at(name)
        try:
            return os.stat(where, follow_symlinks=False, **kw)
        except FileNotFoundError:
            return None

    def stat(self, name: str) -> os.stat_result:
        """``name``'s status, following a link (what it names); ``OSError`` if none."""
        where, kw = self._at(name)
        return os.stat(where, **kw)

    def unlink(self, name: str) -> None:
        where, kw = self._at(name)
        os.unlink(where, **kw)

    def remove(self, name: str) -> None:
        """Remove ``name``, whatever it is, without following a link: a file or a link is
        unlinked, a folder removed with everything in it (``shutil.rmtree`` at the folder's
        descriptor, which never follows a link inside it either). Nothing there: nothing to do."""
        st = self.lstat(name)
        if st is None:
            return
        if not stat.S_ISDIR(st.st_mode):
            with contextlib.suppress(FileNotFoundError):
                self.unlink(name)
            return
        where, kw = self._at(name)
        shutil.rmtree(where, **kw)

    def subfolder(self, name: str, *, fix: str, create: bool = True) -> "OpenFolder":
        """:func:`open_subfolder` of ``name`` in this folder (never through a link)."""
        return open_subfolder(self, name, fix=fix, create=create)

    def open_regular(self, name: str) -> contextlib.AbstractContextManager[tuple[BinaryIO, int]]:
        """``name`` opened for reading, and its size, never through a link and never blocking
        (:func:`~diffunet.fileio.open_regular_file`: a link, folder, FIFO or device is a
        :class:`~diffunet.errors.NotRegularFileError`)."""
        where, kw = self._at(name)
        return open_regular_file(where, follow_symlinks=False, **kw)

    def read_json(self, name: str, max_bytes: int) -> Any:
        """The JSON document ``name`` within bounds (:func:`~diffunet.fileio.read_json`), never
        through a link. Raises ``OSError`` or ``ValueError`` with a short reason."""
        where, kw = self._at(name)
        return read_json(where, max_bytes, follow_symlinks=False, **kw)

    def write_file(self, name: str, data: bytes, *, durable: bool = True) -> None:
        """Put ``data`` in place as ``name``, atomically: a new temporary file beside it
        (``O_EXCL | O_NOFOLLOW``: never anything that was there) renamed over the name, so a
        file or a link there is replaced itself, never followed. ``durable``: flush the file
        and the folder to disk. The caller has checked that ``name`` is its own to replace
        (:mod:`diffunet.outputs`: a name its manifest lists)."""
        with self.writer(name, durable=durable) as f:
            f.write(data)

    @contextlib.contextmanager
    def writer(self, name: str, *, durable: bool = True) -> Iterator[BinaryIO]:
        """:meth:`write_file` written piece by piece (a file too large to hold in memory): the
        temporary file to write, put in place as ``name`` when the block ends without an error
        (an error removes it and leaves ``name`` as it was)."""
        tmp = temporary_name(name)
        fd = self.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            self.replace(tmp, name)
        except BaseException:
            with contextlib.suppress(OSError):
                self.unlink(tmp)
            raise
        if durable:
            self.fsync()

    def link(self, src: str, dst: str) -> None:
        """Hard-link ``src`` as ``dst``; ``FileExistsError`` if ``dst`` exists (never replaces)."""
        (s, ks), (d, kd) = self._at(src), self._at(dst)
        os.link(s, d, **({"src_dir_fd": ks["dir_fd"], "dst_dir_fd": kd["dir_fd"]} if ks else {}))

    def replace(self, src: str, dst: str) -> None:
        """Rename ``src`` over ``dst`` (atomic)."""
        (s, ks), (d, kd) = self._at(src), self._at(dst)
        os.replace(s, d, **({"src_dir_fd": ks["dir_fd"], "dst_dir_fd": kd["dir_fd"]} if ks
                            else {}))

    def names(self) -> list[str]:
        """The names in the folder now."""
        return [e.name for e in os.scandir(self._fd if _AT and self._fd is not None
                                           else self.path)]

    def fileno(self) -> Optional[int]:
        """The folder's descriptor (None where the platform has no ``dir_fd``)."""
        return self._fd

    def identity(self) -> tuple[int, int]:
        """(device, inode) of the folder itself."""
        st = os.fstat(self._fd) if self._fd is not None else os.stat(self.path)
        return st.st_dev, st.st_ino

    def fsync(self) -> None:
        """Flush the folder's entries (a rename into it) to disk, where the platform allows."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OpenFolder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _reason(e: OSError) -> str:
    return (e.strerror or type(e).__name__).lower()


def open_folder(path: str | os.PathLike, *, label: str, create: bool = False) -> OpenFolder:
    """Open the folder ``path`` (links in the path the user gave are followed; ``create``:
    make it and its parents first). ``label`` starts every one-line refusal: a missing folder,
    a file or a dangling link where the folder should be, a folder that cannot be opened."""
    path = Path(path)
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            pass  # a file or a dangling link: the open below says which
        except OSError as e:
            raise FolderError(f"{label}: cannot create the folder {path} ({_reason(e)}); give a "
                              "path in a folder you can write to") from None
    try:
        fd = os.open(path, os.O_RDONLY | _DIRECTORY | _NONBLOCK | _CLOEXEC)
    except FileNotFoundError:
        if os.path.islink(path):
            raise UsageError(f"{label}: {path} is a link to a missing folder; create its target, "
                             "or give a path in an existing folder") from None
        raise UsageError(f"{label}: the folder {path} does not exist; create it, or give a path "
                         "in an existing folder") from None
    except NotADirectoryError:
        raise UsageError(f"{label}: {path} is not a folder; give a path in an existing "
                         "folder") from None
    except OSError as e:
        raise FolderError(f"{label}: the folder {path} cannot be opened ({_reason(e)}); give a "
                          "path in a folder you can write to") from None
    if not _AT:  # pragma: no cover - no dir_fd: names are joined to the path
        os.close(fd)
        return OpenFolder(path, None)
    return OpenFolder(path, fd)


def open_subfolder(parent: OpenFolder, name: str, *, fix: str,
                   create: bool = True) -> OpenFolder:
    """Open the sub-folder ``name`` of ``parent`` (``create``: make it first if need be)
    without following a link: a link there (to anyone's folder) or a file is refused in one
    line ending in ``fix`` (:class:`~diffunet.errors.FolderError`)."""
    shown = parent.path / name
    if create:
        where, kw = parent._at(name)
        with contextlib.suppress(FileExistsError):
            os.mkdir(where, **kw)
    st = parent.lstat(name)
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise FolderError(f"{shown} is a symbolic link; diffunet never writes through a link it "
                          f"did not create: {fix}")
    try:
        fd = parent.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:  # swapped for a link since the check
            raise FolderError(f"{shown} is a symbolic link; diffunet never writes through a "
                              f"link it did not create: {fix}") from None
        if e.errno == errno.ENOTDIR:
            raise FolderError(f"{shown} is not a folder; {fix}") from None
        raise FolderError(f"{shown} cannot be opened ({_reason(e)}); {fix}") from None
    if not _AT:  # pragma: no cover
        os.close(fd)
        return OpenFolder(shown, None)
    return OpenFolder(shown, fd)


# ---------------------------------------------------------------------------------------------
# Temporary files: created, locked, and removed when stale


def _stem(name: str) -> str:
    """``name`` as it appears in its temporary's name (long names shortened, with a hash)."""
    raw = os.fsencode(name)
    if len(raw) <= _STEM_MAX:
        return name
    return os.fsdecode(raw[:_STEM_MAX - 13]).rstrip("\udcff") + "~" + \
        hashlib.sha256(raw).hexdigest()[:12]


def temporary_name(name: str) -> str:
    """A new temporary file's name for a write of ``name``: ``.diffunet-<name>.<pid>.<8 hex>.tmp``
    (long names shortened)."""
    return f"{TMP_PREFIX}{_stem(name)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def is_temporary_of(entry: str, names: Iterable[str]) -> bool:
    """Whether ``entry`` is named as a temporary file of a write of one of ``names`` (this
    writer's ``.diffunet-<name>.<pid>.<hex>.tmp``, or fileio's ``.<name>.<pid>.<hex>.tmp``)."""
    names = set(names)
    m = _TMP_RE.fullmatch(entry)
    if m is not None and m["stem"] in {_stem(n) for n in names}:
        return True
    m = _LEGACY_TMP_RE.fullmatch(entry)
    return m is not None and m["name"] in names


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` may exist (only a certain "no" lets a temporary be removed)."""
    if fcntl is None or pid == os.getpid():
        return True  # never signal on Windows (os.kill ends the process there)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:
        return False  # no process has such a number
    except OSError:
        return True  # e.g. EPERM: someone else's live process
    return True


def _try_lock(fd: int) -> bool:
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def remove_stale_temporaries(folder: OpenFolder, names: Iterable[str], *,
                             legacy: bool = False) -> list[str]:
    """Remove the temporary files that interrupted writes of ``names`` left in ``folder``:
    only regular files named ``.diffunet-<name>.<pid>.<hex>.tmp`` (``legacy``: also
    :func:`diffunet.fileio.atomic_writer`'s ``.<name>.<pid>.<hex>.tmp``) whose process is gone
    and whose lock is free; a link with such a name is not followed and kept. Returns the names
    removed."""
    names = list(names)
    stems = {_stem(n) for n in names}
    wanted = set(names)
    removed = []
    for entry in folder.names():
        m = _TMP_RE.fullmatch(entry)
        if m is None or m["stem"] not in stems:
            m = _LEGACY_TMP_RE.fullmatch(entry) if legacy else None
            if m is None or m["name"] not in wanted:
                continue
        if _alive(int(m["pid"])):
            continue
        try:
            fd = folder.open(entry, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
        except OSError:
            continue  # a link (ELOOP), gone, or unreadable: not removed
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or not _try_lock(fd):
                continue  # not a file this writer made, or its writer still holds it
            now = folder.lstat(entry)
            if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                continue
            with contextlib.suppress(FileNotFoundError):
                folder.unlink(entry)
                removed.append(entry)
        finally:
            os.close(fd)
    return removed


# ---------------------------------------------------------------------------------------------
# Recognising a command's own earlier output


def written_by(marker: str, *, legacy: Optional[Callable[[Any], bool]] = None,
               max_bytes: int = 16 << 20) -> Recognizer:
    """A recognizer of a JSON object whose ``written_by`` entry starts with ``marker`` (or, from
    before the marker, that ``legacy(document)`` accepts), read within ``max_bytes`` and the
    nesting bound of :func:`~diffunet.fileio.parse_json`."""
    def recognise(f: BinaryIO, size: int) -> bool:
        if size > max_bytes:
            return False
        doc = parse_json(f.read(max_bytes + 1))
        by = doc.get("written_by") if isinstance(doc, dict) else None
        if isinstance(by, str) and by.startswith(marker):
            return True
        return legacy is not None and bool(legacy(doc))
    return recognise


def starts_with(prefix: bytes) -> Recognizer:
    """A recognizer of a file whose bytes begin with ``prefix`` (e.g. a large trace whose first
    entry is a ``written_by`` marker: nothing past the prefix is read)."""
    def recognise(f: BinaryIO, size: int) -> bool:
        return f.read(len(prefix)) == prefix
    return recognise


def _is_ours(folder: OpenFolder, name: str, key: tuple[int, int], ours: Recognizer) -> bool:
    try:  # opened as what it is: never a link, never blocking on a FIFO swapped in
        fd = folder.open(name, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != key:
            return False
        os.set_blocking(fd, True)
        try:
            return bool(ours(f, st.st_size))
        except (OSError, ValueError, RecursionError, EOFError, UnicodeError):
            return False


# ---------------------------------------------------------------------------------------------
# The claim and the writer


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


class OutputFile:
    """An output file claimed by :func:`claim_file`: write it once with :meth:`write` or
    :meth:`open`; use it as a context manager (or call :meth:`close`) so that a command that
    fails before writing leaves nothing behind."""

    def __init__(self, path: Path, label: str, folder: OpenFolder, owns_folder: bool, name: str,
                 tmp: str, fd: int, previous: Optional[tuple[int, int]]) -> None:
        self.path = path
        """The path as given."""
        self.label = label
        """How messages name it (``--json bench.json``)."""
        self.replaces = previous is not None
        """An earlier file is there and will be replaced (the command's own, or --overwrite)."""
        self._folder, self._owns_folder, self._name = folder, owns_folder, name
        self._tmp: Optional[str] = tmp
        self._fd: Optional[int] = fd
        self._previous = previous

    @property
    def identity(self) -> tuple[int, int, str]:
        """(device, inode) of its folder and its name: two claims of one file are equal."""
        return (*self._folder.identity(), self._name)

    def write(self, data: bytes) -> None:
        """Write ``data`` as the file (atomically and durably, see the module doc). (Not named
        ``write_bytes``: tests/test_layout.py takes that for ``Path.write_bytes``, a write by
        path.)"""
        with self.open() as f:
            f.write(data)

    @contextlib.contextmanager
    def open(self) -> Iterator[BinaryIO]:
        """The file to write, put in place when the ``with`` block ends without an error;
        an error or an interrupt removes it and leaves whatever was at the path."""
        if self._fd is None:
            raise ValueError(f"{self.label}: already written or closed")
        try:
            # a duplicate descriptor: closing the file keeps the lock on the temporary held
            # until it is in place, so no cleaner can take it for a stale one meanwhile
            with os.fdopen(os.dup(self._fd), "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            self._place()
        finally:
            self.close()

    def _place(self) -> None:
        folder, name, tmp = self._folder, self._name, self._tmp
        assert tmp is not None
        now = folder.lstat(name)
        if self._previous is not None and now is not None:
            if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != self._previous:
                raise UsageError(f"{self.label} was replaced by something else while diffunet "
                                 "ran; it is left as it is and the result was not written: run "
                                 "again with a new file name")
            folder.replace(tmp, name)
        else:
            try:
                folder.link(tmp, name)  # fails if anything appeared there meanwhile
            except FileExistsError:
                raise UsageError(f"{self.label} appeared while diffunet ran; it is left as it is "
                                 "and the result was not written: run again with a new file "
                                 "name") from None
            except OSError:  # a file system without hard links: check, then rename
                if folder.lstat(name) is not None:
                    raise UsageError(f"{self.label} appeared while diffunet ran; it is left as "
                                     "it is and the result was not written: run again with a "
                                     "new file name") from None
                folder.replace(tmp, name)
            else:
                folder.unlink(tmp)
        self._tmp = None
        folder.fsync()

    def close(self) -> None:
        """Remove the temporary file if it was never put in place, and let go of the folder."""
        if self._fd is not None:
            if self._tmp is not None:
                with contextlib.suppress(OSError):
                    self._folder.unlink(self._tmp)
                self._tmp = None
            os.close(self._fd)
            self._fd = None
        if self._owns_folder:
            self._folder.close()
            self._owns_folder = False

    def __enter__(self) -> "OutputFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _exists_message(label: str, noun: Optional[str], fix: Optional[str],
                    overwrite: Optional[bool]) -> str:
    if fix is None:
        fix = "give a new file name" + (", or --overwrite to replace it" if overwrite is False
                                        else "")
    if noun:
        return f"{label} exists and is not {noun}; {fix} (it is left as it is)"
    return f"{label} exists; {fix}" + ("" if overwrite is False else " (it is left as it is)")


def claim_file(path: str | os.PathLike, *, flag: str = "", example: str = "out.json",
               ours: Optional[Recognizer] = None, noun: Optional[str] = None,
               fix: Optional[str] = None, overwrite: Optional[bool] = None,
               inputs: Iterable[str | os.PathLike] = (),
               folder: Optional[OpenFolder] = None) -> OutputFile:
    """Claim the output file ``path`` before any work (the module doc lists what is refused).

    ``flag`` names the path in messages (``--json``; ``""``: the path alone), ``example`` is a
    file name a fix suggests. An existing regular file is replaced only if ``ours`` recognises
    it as the command's own earlier output (then ``noun``, e.g. ``"a diffunet eval result"``,
    names what it is not) or ``overwrite`` is True; ``overwrite`` is None for a command without
    ``--overwrite``, False when it has one that was not given. ``fix`` replaces the advice of
    the "exists" refusal. ``inputs`` are never replaced, even with ``overwrite``. ``folder``:
    the file's folder, already open (``path``'s last part is then the name inside it, and the
    claim does not close it). Returns the claim, holding its temporary file.
    """
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    label = f"{flag} {text}" if flag else text
    what = flag or "the output file"
    if text == "":
        raise UsageError(f"{what} is empty; give a file path such as {example}")
    if "\0" in text:
        raise UsageError(f"{what} {text[:60]!r} holds a NUL character; give a file path such as "
                         f"{example}")
    name = os.path.basename(text)
    seps = tuple(s for s in (os.sep, os.altsep) if s)
    if text.endswith(seps) or name in ("", ".", ".."):
        raise UsageError(f"{label} names a folder, not a file; give a file path such as "
                         f"{os.path.join(text, example)}")
    if len(os.fsencode(name)) > _NAME_MAX:
        raise UsageError(f"{what}: the file name {name[:40]}... is longer than {_NAME_MAX} "
                         "bytes; give a shorter name")
    owns = folder is None
    if folder is None:
        folder = open_folder(os.path.dirname(text) or os.curdir, label=label)
    try:
        return _claim(Path(text), label, folder, owns, name, example=example, ours=ours,
                      noun=noun, fix=fix, overwrite=overwrite, inputs=inputs)
    except BaseException:
        if owns:
            folder.close()
        raise


def _claim(path: Path, label: str, folder: OpenFolder, owns: bool, name: str, *, example: str,
           ours: Optional[Recognizer], noun: Optional[str], fix: Optional[str],
           overwrite: Optional[bool], inputs: Iterable[str | os.PathLike]) -> OutputFile:
    previous = None
    st = folder.lstat(name)
    if st is not None:
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            raise UsageError(f"{label} is a symbolic link; diffunet never writes through a link "
                             "or replaces one: remove the link, or give another path")
        if stat.S_ISDIR(mode):
            raise UsageError(f"{label} is a folder; give a file path such as "
                             f"{path / example}")
        if not stat.S_ISREG(mode):
            raise UsageError(f"{label} exists and is {_kind(mode)}, not a regular file; give a "
                             "new file name (it is left as it is)")
        key = (st.st_dev, st.st_ino)
        for item in inputs:
            try:
                ist = os.stat(item)
            except (OSError, ValueError):
                continue
            if (ist.st_dev, ist.st_ino) == key:
                raise UsageError(f"{label} is the input {item}; writing there would replace "
                                 "it, even with --overwrite: give a new file name")
        if overwrite or (ours is not None and _is_ours(folder, name, key, ours)):
            previous = key
        else:
            raise UsageError(_exists_message(label, noun, fix, overwrite))
    remove_stale_temporaries(folder, [name])
    tmp = temporary_name(name)
    try:
        fd = folder.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW)
    except OSError as e:
        raise FolderError(f"{label}: cannot write in {folder.path} ({_reason(e)}); give a path "
                          "in a folder you can write to") from None
    _try_lock(fd)  # a new file: nobody else holds it
    return OutputFile(path, label, folder, owns, name, tmp, fd, previous)


def check_distinct(*files: Optional[OutputFile]) -> None:
    """Refuse two claims of one file (``--out x --json x``) in one line, before any work."""
    seen: dict[tuple[int, int, str], OutputFile] = {}
    for f in files:
        if f is None:
            continue
        key = f.identity
        if key in seen:
            raise UsageError(f"{seen[key].label} and {f.label} name the same file; give "
                             "different paths")
        seen[key] = f

