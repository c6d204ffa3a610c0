"""Files on disk: writing them so that a crash never leaves a half-written one (the one home of
atomic writes), and reading the JSON that diffunet wrote, or that a stranger planted, within
bounds (:func:`read_json`, :func:`parse_json`, :func:`schema_problem`).

Every file diffunet writes by path inside a folder it owns (run folders: model files, configs,
logs rewritten on resume; the cache: downloads) goes through :func:`atomic_writer` (or
:func:`atomic_write_bytes`, built on it); a single output file a user names (``--json``,
``--out``, ``import``'s OUT, ...) goes through :mod:`diffunet.output_files`, which claims it
first, and an output folder's files (sample PNGs, masks, manifests, inspection output) through
:mod:`diffunet.outputs`, relative to the folder's descriptor. Here the bytes go to
``.<name>.<pid>.<random>.tmp`` in the same folder, which is then renamed over the target
(``os.replace`` is atomic on POSIX and Windows). Cleanup code elsewhere recognises leftovers of
interrupted writes by that ``.<name>.*.tmp`` pattern.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import stat
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from .errors import DataError, NotRegularFileError

__all__ = ["atomic_save_image", "atomic_write_bytes", "atomic_writer", "encode_image",
           "first_line", "fsync_dir",
           "MAX_JSON_DEPTH", "NotRegularFileError", "open_regular_file", "parse_json", "read_json",
           "read_regular_file", "regular_file_sha256", "schema_problem"]

MAX_JSON_DEPTH = 32
"""Deepest nesting of ``[`` and ``{`` accepted in any JSON diffunet reads. Its own files nest
at most 4 levels; Python's parser recurses per level, so a planted ``[[[[...`` of some thousand
levels would end in a RecursionError instead of a clear message."""


def first_line(e: BaseException) -> str:
    """An exception as one short line (messages must stay on one line; some span several)."""
    text = " ".join(str(e).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the platform allows."""
    try:  # make a rename durable; not possible on every platform
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, *, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write that appears at ``path`` only when the ``with`` block succeeds:
    a crash, an exception or an interrupt leaves the old file (or none), never a partial one.

    The bytes go to ``.<name>.<pid>.<random>.tmp`` in the same folder, renamed over ``path`` at
    the end (``os.replace`` is atomic on POSIX and Windows). ``durable``: flush the file and the
    folder to disk (fsync) before and after the rename, so a power cut cannot leave an empty file
    either; sample images skip it (one fsync per image would dominate a large sampling run, and
    a rerun redraws what a power cut lost). The file gets the usual permissions (0666 minus the
    umask), as a plain ``open`` would give it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one
    (:func:`atomic_writer`)."""
    with atomic_writer(path, durable=durable) as f:
        f.write(data)


def encode_image(img: Image.Image, path: str | os.PathLike) -> bytes:
    """A PIL image's file bytes in the format ``path``'s extension names (only the name is
    used). An unknown extension is a :class:`~diffunet.errors.DataError`."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"cannot write {path}: unknown image extension {path.suffix!r}; use .png")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def atomic_save_image(img: Image.Image, path: str | os.PathLike) -> None:
    """Save a PIL image atomically (not fsynced), in the format its extension names; creates
    the folder. An unknown extension is a :class:`~diffunet.errors.DataError`."""
    data = encode_image(img, path)  # encoded first, so a failed encode leaves nothing behind
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data, durable=False)


_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def parse_json(data: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with a bound on nesting (:data:`MAX_JSON_DEPTH`) and strict UTF-8.

    Raises ``ValueError`` (``json.JSONDecodeError`` and ``UnicodeDecodeError`` are subclasses)
    with a short reason for text that is not UTF-8, not JSON, nested too deep, or holding an
    integer longer than Python reads (4,300 digits). NaN and
    Infinity are accepted, as Python writes them (a non-finite loss in ``log.jsonl``).
    """
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") > max_depth:  # only then can it nest too deep
        depth = 0
        for m in _JSON_TOKENS.finditer(raw):
            tok = m.group()
            if tok in (b"[", b"{"):
                depth += 1
                if depth > max_depth:
                    raise ValueError(f"JSON nested more than {max_depth} levels deep")
            elif tok in (b"]", b"}"):
                depth -= 1
    text = raw.decode("utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError:  # Python's integer-string limit: its own message names a setter
        raise ValueError(f"an integer of more than {sys.get_int_max_str_digits():,} "
                         "digits") from None


@contextlib.contextmanager
def open_regular_file(path: str | os.PathLike, *, dir_fd: int | None = None,
                      follow_symlinks: bool = True) -> Iterator[tuple[BinaryIO, int]]:
    """``path`` opened for binary reading, and its size, refusing what is not a regular file
    (a FIFO would block the read, a device like /dev/zero never ends; symlinks are followed to
    what they name, unless ``follow_symlinks`` is False: then a link is refused too) with
    :class:`NotRegularFileError`. Opened without blocking and checked on the open descriptor,
    so there is no window between a check and the open in which the name could be swapped for
    a FIFO. ``dir_fd``: ``path`` is a name inside that open folder. ``OSError`` from the open
    passes through."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, **({} if dir_fd is None else {"dir_fd": dir_fd}))
    except OSError as e:
        if e.errno == errno.ELOOP and not follow_symlinks:
            raise NotRegularFileError(False, is_link=True) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(stat.S_ISDIR(st.st_mode))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f, st.st_size


def regular_file_sha256(path: str | os.PathLike, *, follow_symlinks: bool = True) -> str:
    """SHA-256 hex of the regular file ``path``, read in 1 MiB chunks through
    :func:`open_regular_file` (a FIFO, device or folder is :class:`NotRegularFileError`; a link
    too unless ``follow_symlinks``)."""
    h = hashlib.sha256()
    with open_regular_file(path, follow_symlinks=follow_symlinks) as (f, _):
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_regular_file(path: str | os.PathLike, max_bytes: int, *, dir_fd: int | None = None,
                      follow_symlinks: bool = True) -> bytes:
    """The bytes of ``path`` (:func:`open_regular_file`, with its ``dir_fd`` and
    ``follow_symlinks``), refusing a file larger than ``max_bytes``. Raises ``OSError`` or
    ``ValueError`` with a short reason."""
    with open_regular_file(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks) as (f, size):
        if size > max_bytes:
            raise ValueError(f"{size:,} bytes, more than the {max_bytes:,} such a file "
                             "can have")
        data = f.read(max_bytes + 1)  # unbuffered: one read returns at most what is there
        while len(data) <= max_bytes:
            more = f.read(max_bytes + 1 - len(data))
            if not more:
                break
            data += more
    if len(data) > max_bytes:  # grew while being read
        raise ValueError(f"more than the {max_bytes:,} bytes such a file can have")
    return data


def read_json(path: str | os.PathLike, max_bytes: int = 16 << 20, *, dir_fd: int | None = None,
              follow_symlinks: bool = True) -> Any:
    """Parse the JSON file ``path`` within bounds (:func:`read_regular_file`, with its
    ``dir_fd`` and ``follow_symlinks``, and :func:`parse_json`). Raises ``OSError`` or
    ``ValueError`` with a short reason."""
    return parse_json(read_regular_file(path, max_bytes, dir_fd=dir_fd,
                                        follow_symlinks=follow_symlinks))


def schema_problem(value: Any, schema: Any, where: str = "") -> str | None:
    """What is wrong with ``value`` against ``schema``, or None if it fits.

    A schema is a type or a tuple of types (``bool`` is not an ``int`` here, ``int`` is a
    ``float``), a dict ``{key: schema}`` (a JSON object with at least these keys; a key written
    ``"name?"`` may be missing), or a one-element list ``[schema]`` (a JSON array of such items).
    The answer names the offending place, e.g. ``"optimizer.step: expected int, got 'x'"``.
    """
    here = where or "the top level"
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{here}: expected a JSON object, got {_kind(value)}"
        for key, sub in schema.items():
            optional = key.endswith("?")
            name = key.rstrip("?")
            if name not in value:
                if optional:
                    continue
                return f"{where + '.' if where else ''}{name}: missing"
            problem = schema_problem(value[name], sub, f"{where + '.' if where else ''}{name}")
            if problem:
                return problem
        return None
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"{here}: expected a JSON array, got {_kind(value)}"
        for i, item in enumerate(value):
            problem = schema_problem(item, schema[0], f"{where}[{i}]")
            if problem:
                return problem
        return None
    types = schema if isinstance(schema, tuple) else (schema,)
    if float in types and int not in types:
        types = (*types, int)
    if isinstance(value, bool) and bool not in types:
        return f"{here}: expected {_names(types)}, got {_kind(value)}"
    if not isinstance(value, types):
        return f"{here}: expected {_names(types)}, got {_kind(value)}"
    return None


def _names(types: tuple[type, ...]) -> str:
    names = {dict: "a JSON object", list: "a JSON array", type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types if
                                     not (t is int and float in types)))


def _kind(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "a JSON object" if isinstance(value, dict) else "a JSON array"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
