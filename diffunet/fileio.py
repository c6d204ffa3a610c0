"""Writing files so that a crash never leaves a half-written one (the one home of atomic writes).

Every file diffunet writes (model files, configs, logs rewritten on resume, sample PNGs, mask
PNGs, manifests, inspection output, downloads) goes through :func:`atomic_writer` (or
:func:`atomic_write_bytes`, built on it): the bytes go to
``.<name>.<pid>.<random>.tmp`` in the same folder, which is then renamed over the target
(``os.replace`` is atomic on POSIX and Windows). Cleanup code elsewhere recognises leftovers of
interrupted writes by that ``.<name>.*.tmp`` pattern.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from .errors import DataError

__all__ = ["atomic_save_image", "atomic_write_bytes", "atomic_writer", "first_line", "fsync_dir"]


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


def atomic_save_image(img: Image.Image, path: str | os.PathLike) -> None:
    """Save a PIL image atomically (not fsynced), in the format its extension names; creates
    the folder. An unknown extension is a :class:`~diffunet.errors.DataError`."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"cannot write {path}: unknown image extension {path.suffix!r}; use .png")
    buf = io.BytesIO()
    img.save(buf, format=fmt)  # encoded first, so a failed encode leaves nothing behind
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue(), durable=False)
