"""Output folders: the one rule every command that writes files into a folder follows
(``diffunet sample``, ``diffunet inspect``, ``diffunet segment predict``).

A command knows exactly which files it wrote: a manifest of its own in the folder (a JSON object
with ``format``, ``format_version`` and ``files``, the exact names it wrote or is about to write;
never a name pattern). The manifest is written atomically *before* the files it lists, so a kill
at any moment never leaves a file of the command's that no manifest lists. Then:

- a folder holding anything its manifest does not list (a user's photos, notes, another tool's
  files) is refused unless ``overwrite``; with ``overwrite`` the command writes beside those
  files and keeps them. A folder whose manifest is this command's own is already the command's:
  files the user put beside its output are kept there (never removed, never written over)
  without asking again;
- it never writes over an input (resolved paths: links, hard links and the output folder being
  the input folder included), and never over a file its manifest does not list, not even with
  ``overwrite`` (one line naming the file);
- it removes only files its manifest lists (and its own interrupted-write temporaries,
  ``.diffunet-<listed name>.<pid>.<hex>.tmp``, or ``.<listed name>.<pid>.<hex>.tmp`` of older
  versions), by name inside the folder: ``unlink`` never follows a link, so a planted link is
  removed and its target kept; a listed name with a ``/``, ``..`` or an absolute path makes the
  manifest unreadable rather than a removal outside the folder;
- planned output names are checked against each other before the first is written
  (:func:`check_unique_outputs`);
- a manifest that cannot be read (damaged, a FIFO or device, nested too deep, wrong types, a
  newer format) is one line, and the folder is refused: a file diffunet cannot tell is its own
  is not replaced;
- the folder is locked (:class:`~diffunet.runs.FolderLock`) from the check to the end of the
  command, so two commands never write into one folder at once;
- the folder is opened once (:func:`~diffunet.output_files.open_folder`; a link given as
  ``--out-dir`` is followed there, and only there): the lock, the checks, the manifest and every
  file the command writes, reads back or removes work relative to that descriptor
  (:class:`FolderWriter`), never through a link, so a folder swapped for a link to another
  folder while the command runs is never written through.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Optional

from PIL import Image

from .errors import FolderError, UsageError
from .fileio import encode_image, first_line, schema_problem
from .output_files import OpenFolder, is_temporary_of, open_folder
from .runs import FolderLock, lock_folder

__all__ = ["MANIFEST_MAX_BYTES", "FolderWriter", "OutputFolder", "check_unique_outputs",
           "claim_folder", "join_folder"]

MANIFEST_MAX_BYTES = 16 << 20
"""Largest manifest read by default (a sample manifest, which lists every image, allows more)."""

_CASE_FOLDING = sys.platform in ("darwin", "win32")  # file names there ignore case by default


def _fold(name: str) -> str:
    return name.casefold() if _CASE_FOLDING else name


def check_unique_outputs(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """The output names of ``(name, what writes it)`` pairs, in order, after checking that no
    two sources write the same name (also names that differ only in case where the file system
    ignores case). Raises :class:`~diffunet.errors.UsageError` naming both sources."""
    seen: dict[str, tuple[str, str]] = {}
    names = []
    for name, source in pairs:
        key = _fold(name)
        if key in seen and seen[key][1] != source:
            raise UsageError(f"{seen[key][1]} and {source} would both write {name} in "
                             "--out-dir; rename one of them, or write them into different "
                             "--out-dir folders")
        if key not in seen:
            seen[key] = (name, source)
            names.append(name)
    return names


def _name_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot be a file a command wrote into its folder, or None."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name or len(name) > 255:
        return f"{name[:60]!r} is not a file name in the folder"
    return None


class FolderWriter:
    """The files of an output folder opened once (:class:`~diffunet.output_files.OpenFolder`):
    every file is written, read back, checked and removed relative to the folder's descriptor,
    never through a link, so a folder renamed, or swapped for a link to another folder, while
    the command runs is never followed. It writes only the names it was given (``names``: what
    the manifest lists). One per process (:func:`join_folder` for the processes that did not
    claim the folder)."""

    def __init__(self, folder: OpenFolder, names: Iterable[str]) -> None:
        self.folder = folder.path
        """The folder as given (for messages)."""
        self._dir = folder
        self._names = set(names)

    @property
    def identity(self) -> tuple[int, int]:
        """(device, inode) of the folder opened."""
        return self._dir.identity()

    def is_plain_file(self, name: str) -> bool:
        """``name`` is a regular file itself (not a link, folder or FIFO)."""
        st = self._dir.lstat(name)
        return st is not None and stat.S_ISREG(st.st_mode)

    def write_file(self, name: str, data: bytes, *, durable: bool = False) -> None:
        """Write ``data`` as ``name`` (atomically; ``durable``: flushed to disk, which one
        fsync per sample image would make slow; a rerun redraws what a power cut lost)."""
        if name not in self._names:
            raise ValueError(f"{name} is not a file this command listed in its manifest")
        self._dir.write_file(name, data, durable=durable)

    def save_image(self, name: str, image: Image.Image) -> None:
        """Write a PIL image as ``name``, in the format its extension names (encoded first, so
        a failed encode leaves nothing behind)."""
        self.write_file(name, encode_image(image, name))

    def open_file(self, name: str) -> contextlib.AbstractContextManager[tuple[BinaryIO, int]]:
        """``name`` opened for reading and its size, never through a link, never blocking."""
        return self._dir.open_regular(name)

    def close(self) -> None:
        """Let go of the folder."""
        self._dir.close()

    def __enter__(self) -> "FolderWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class OutputFolder(FolderWriter):
    """An output folder claimed by one command (:func:`claim_folder`): locked, checked, with
    what its previous manifest says. Use it as a context manager (or call :meth:`close`)."""

    def __init__(self, folder: OpenFolder, manifest: str, previous: Optional[dict[str, Any]],
                 listed: list[str], present: set[str], leftovers: list[str],
                 foreign: list[str], lock: Optional[FolderLock]) -> None:
        super().__init__(folder, listed)
        self.manifest = manifest
        self.manifest_path = folder.path / manifest
        self.previous = previous
        """The previous manifest (checked against the command's schema), or None."""
        self.listed = listed
        """Every name the manifest lists (present or not), in its order."""
        self.present = present
        """Listed names that are in the folder now (files or links, never folders)."""
        self.leftovers = leftovers
        """Temporary files of this command's interrupted writes."""
        self.foreign = foreign
        """Everything else in the folder: kept, never written over."""
        self._lock = lock

    def remove(self, names: Iterable[str]) -> int:
        """Unlink those of ``names`` that are this command's (present and listed, or
        leftovers), by name inside the folder (a link is removed, never followed). Returns how
        many were removed."""
        names = list(names)
        ours = self.present | set(self.leftovers)
        removed = 0
        for name in names:
            if name not in ours:
                continue
            try:
                self._dir.unlink(name)
                removed += 1
            except FileNotFoundError:
                pass
            self.present.discard(name)
        gone = set(names)
        self.leftovers = [n for n in self.leftovers if n not in gone]
        return removed

    def remove_leftovers(self) -> int:
        """Remove the temporary files of this command's interrupted writes."""
        return self.remove(list(self.leftovers))

    def write_manifest(self, doc: dict[str, Any], files: Sequence[str]) -> None:
        """Write ``doc`` with ``files`` (exact names, deduplicated in order) as the manifest,
        atomically and durably. Call it before writing any file it newly lists: from then on
        those are the names :meth:`write_file` writes."""
        names = list(dict.fromkeys(files))
        data = {**doc, "files": names}
        self._dir.write_file(self.manifest, (json.dumps(data, indent=2) + "\n").encode())
        self.listed = names
        self._names = set(names)

    def close(self) -> None:
        """Release the folder (its lock)."""
        super().close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "OutputFolder":
        return self


def join_folder(out_dir: str | os.PathLike, identity: tuple[int, int],
                names: Iterable[str]) -> FolderWriter:
    """Open, in a process that did not claim it, the output folder another process of the same
    command claimed (:func:`claim_folder`; ``identity``: that folder's), to write ``names``
    there. A path that names another folder here (another file system on another node, or a
    folder swapped meanwhile) is one :class:`~diffunet.errors.FolderError`."""
    folder = open_folder(out_dir, label="--out-dir")
    if folder.identity() != tuple(identity):
        folder.close()
        raise FolderError(f"--out-dir {out_dir} is not the folder the main process claimed "
                          "(another file system on this node, or it was moved or replaced "
                          "meanwhile); give an --out-dir every process sees as one folder")
    return FolderWriter(folder, names)


def _read_manifest(folder: OpenFolder, name: str, command: str, fmt: str, version: int,
                   schema: dict[str, Any],
                   legacy_files: Optional[Callable[[dict[str, Any]], list[str]]],
                   max_bytes: int, label: str = "--out-dir") -> tuple[dict[str, Any], list[str]]:
    """The manifest ``name`` in ``folder`` (never read through a link) and the names it lists;
    any problem is one FolderError."""
    path = folder.path / name

    def refuse(reason: str) -> FolderError:
        return FolderError(f"{path} is not a readable diffunet {command} manifest ({reason}); "
                           "diffunet does not replace a file it cannot tell is its own: move it "
                           f"away, or choose another {label}")

    try:
        doc = folder.read_json(name, max_bytes)
    except (OSError, ValueError) as e:
        raise refuse(first_line(e) if isinstance(e, OSError) else str(e)) from None
    problem = schema_problem(doc, {"format": str, "format_version": int})
    if problem:
        raise refuse(problem)
    if doc["format"] != fmt:
        raise refuse(f"its format is {doc['format'][:40]!r}, not {fmt!r}")
    if doc["format_version"] > version:
        raise FolderError(f"{path} was written by a newer diffunet (format version "
                          f"{doc['format_version']}, this one reads {version}); upgrade "
                          f"diffunet, or choose another {label}")
    full = {**schema, "files" if legacy_files is None else "files?": [str]}
    problem = schema_problem(doc, full)
    if problem:
        raise refuse(problem)
    if "files" in doc:
        names = doc["files"]
    else:
        assert legacy_files is not None
        try:
            names = legacy_files(doc)
        except ValueError as e:
            raise refuse(str(e)) from None
    for i, name in enumerate(names):
        problem = _name_problem(name)
        if problem:
            raise refuse(f"files[{i}]: {problem}")
    return doc, names


def claim_folder(out_dir: str | os.PathLike, *, command: str, manifest: str, format: str,
                 planned: Sequence[str], inputs: Iterable[str | os.PathLike] = (),
                 overwrite: bool = False, format_version: int = 1,
                 schema: Optional[dict[str, Any]] = None,
                 legacy_files: Optional[Callable[[dict[str, Any]], list[str]]] = None,
                 noun: str = "files", max_bytes: int = MANIFEST_MAX_BYTES,
                 label: str = "--out-dir", can_overwrite: bool = True) -> OutputFolder:
    """Create (if needed), lock and check ``out_dir`` for a command that will write the files
    ``planned`` (names inside it, checked unique by the caller) and ``manifest``.

    ``label`` is what the user named the folder with (an option, or a config key such as
    ``data.latent_cache``), said in every refusal; ``can_overwrite`` False: the command has no
    ``--overwrite``, so no refusal suggests it (nor does ``overwrite`` apply).

    Refuses, each in one line (:class:`~diffunet.errors.FolderError`): a file or a dangling link
    given as the folder, a folder in use by another diffunet process, a planned name that is one
    of ``inputs`` (resolved: links and hard links too), a manifest that cannot be read (see
    :func:`_read_manifest`; ``schema`` is the command's :func:`~diffunet.fileio.schema_problem`
    schema for it, ``legacy_files`` lists the files of a manifest from before manifests listed
    them, raising ``ValueError``), a planned name taken by a file the manifest does not list
    (even with ``overwrite``), and, unless ``overwrite``, a folder without this command's
    manifest that holds anything else. The caller decides what to remove (only the returned
    folder's own files can be) and writes the new manifest before its files.
    """
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise FolderError(f"{label} {folder} is a file, not a folder; choose another {label}")
    if os.path.islink(folder) and not folder.exists():
        raise FolderError(f"{label} {folder} is a link to a missing folder; create its "
                          f"target, or choose another {label}")
    # opened once (a link the user gave as --out-dir is followed here, and only here): the
    # lock, the checks and every later write are relative to this descriptor
    opened = open_folder(folder, label=label, create=True)
    lock = None
    try:
        lock = lock_folder(folder, opened.fileno())
        return _check(opened, lock, command=command, manifest=manifest, fmt=format,
                      planned=planned, inputs=inputs, overwrite=overwrite and can_overwrite,
                      version=format_version, schema=schema or {}, legacy_files=legacy_files,
                      noun=noun, max_bytes=max_bytes, label=label,
                      can_overwrite=can_overwrite)
    except BaseException:
        if lock is not None:
            lock.close()
        opened.close()
        raise


def _check(opened: OpenFolder, lock: Optional[FolderLock], *, command: str, manifest: str,
           fmt: str, planned: Sequence[str], inputs: Iterable[str | os.PathLike],
           overwrite: bool, version: int, schema: dict[str, Any],
           legacy_files: Optional[Callable[[dict[str, Any]], list[str]]], noun: str,
           max_bytes: int, label: str, can_overwrite: bool) -> OutputFolder:
    folder = opened.path
    even = ", even if you pass --overwrite" if can_overwrite else ""
    entries = {name: opened.lstat(name) for name in opened.names()}
    entries = {name: st for name, st in entries.items() if st is not None}
    wanted = {_fold(n): n for n in (*planned, manifest)}
    # 1. never over an input: any entry a planned name would replace that is an input's file
    ids: dict[tuple[int, int], str] = {}
    for item in inputs:
        try:
            st = os.stat(item)
            ids[(st.st_dev, st.st_ino)] = str(item)
        except OSError:
            continue
    if ids:
        for name, entry in entries.items():
            if _fold(name) not in wanted:
                continue
            try:
                st = opened.stat(name) if stat.S_ISLNK(entry.st_mode) else entry  # a link: what
                key = (st.st_dev, st.st_ino)                                      # it names
            except OSError:
                continue
            if key in ids:
                raise FolderError(f"{label} {folder}: writing {name} there would replace the "
                                  f"input {ids[key]}; choose another {label}")
    # 2. the previous manifest, if any
    previous, listed = None, []
    if manifest in entries:
        previous, listed = _read_manifest(opened, manifest, command, fmt, version, schema,
                                          legacy_files, max_bytes, label)
    listed_set = set(listed) - {manifest}
    present, leftovers, foreign = set(), [], []
    for name, entry in entries.items():
        if name == manifest:
            continue
        is_dir = stat.S_ISDIR(entry.st_mode)
        if name in listed_set and not is_dir:
            present.add(name)
        elif (is_temporary_of(name, listed_set | {manifest})
              and stat.S_ISREG(entry.st_mode)):
            leftovers.append(name)
        else:
            foreign.append(name)
    foreign.sort()
    # 3. never over a file the manifest does not list, even with --overwrite
    for name in foreign:
        target = wanted.get(_fold(name))
        if target is None:
            continue
        if target != name:  # differs in case: only a clash where the file system folds case
            try:
                a, b = opened.stat(target), opened.stat(name)
                if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                    continue
            except OSError:
                continue
        if previous is None:
            raise FolderError(f"{folder} already holds {noun} but no {manifest}, so diffunet "
                              f"cannot tell they are its own (e.g. {name}, which this run would "
                              f"write); it never replaces them{even}: move them away, or "
                              f"choose another {label}")
        raise FolderError(f"{folder / name} is not listed in {manifest}, so diffunet did not "
                          f"write it and never replaces it{even}: move it away, or choose "
                          f"another {label}")
    # 4. a folder that is not this command's: only where the user says so
    if foreign and previous is None and not overwrite:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        fix = ("pass --overwrite to write beside them (they are kept), or" if can_overwrite
               else "move them away, or")
        raise FolderError(f"{label} {folder} holds files diffunet did not write (e.g. "
                          f"{foreign[0]}{more}); {fix} choose another {label}")
    return OutputFolder(opened, manifest, previous, listed, present, leftovers, foreign, lock)
