"""The errors diffunet raises for bad input, each used for what its name says.

Every message is one line that names the problem and the fix; the command line prints it and
exits with code 2 (no traceback). Each subclass also derives from the builtin a library user
would expect (``ValueError``, or ``ImportError`` for a missing extra), so ``except ValueError``
keeps working.

==========================  ===================================================================
:class:`ConfigError`        a config key, type or value that cannot work (names ``section.key``)
:class:`UsageError`         a command-line option or function argument that cannot work (names
                            the ``--flag``), or a launch that cannot run as asked
:class:`FolderError`        an output or run folder that cannot be used as asked: a file, not
                            empty, in use by another run, holding other settings' files
:class:`DataError`          a data source or input image that cannot be read
:class:`ModelFileError`     a model file or training state that is missing, damaged, foreign,
                            too new, or does not fit
:class:`TrainingError`      training cannot go on (the loss stays non-finite, a write failed)
:class:`MissingDependencyError`  an optional extra is not installed (says what to install)
:class:`NotRegularFileError`     a folder, FIFO or device where a file must be (a ValueError;
                                each reader words its own message)
:class:`Stopped`            SIGINT or SIGTERM stopped the command (a KeyboardInterrupt, so no
                            ``except Exception`` swallows it; :mod:`diffunet.stopping`)
:class:`StopRequested`      internal: a preview gave up for a stop request (never shown)
==========================  ===================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["DiffunetError", "ConfigError", "UsageError", "FolderError", "DataError",
           "ModelFileError", "TrainingError", "MissingDependencyError", "NotRegularFileError",
           "Stopped", "StopRequested", "require"]


class DiffunetError(Exception):
    """Base class: a user-facing problem with a one-line message."""


class ConfigError(DiffunetError, ValueError):
    """A config key, type or value that cannot work (the message names the key)."""


class UsageError(DiffunetError, ValueError):
    """A command-line option or function argument that cannot work (the message names the
    flag), or a launch (``accelerate launch``, torchrun) that cannot run as asked."""


class FolderError(DiffunetError, ValueError):
    """An output or run folder that cannot be used as asked (a file, not empty, in use by
    another run, holding files from other settings)."""


class ModelFileError(DiffunetError, ValueError):
    """A model file or training state that is missing, not diffunet's, damaged, too new, or
    does not fit its config."""


class DataError(DiffunetError, ValueError):
    """A data source that cannot be read (missing path, no readable image, ...)."""


class TrainingError(DiffunetError):
    """Training cannot go on (e.g. the loss stays non-finite, or a write failed); the message
    says what to try and what was kept."""


class MissingDependencyError(DiffunetError, ImportError):
    """An optional dependency (an extra such as ``eval``) is not installed."""


class NotRegularFileError(ValueError):
    """A path names a folder, FIFO, socket or device where a regular file must be (raised by
    :func:`diffunet.fileio.open_regular_file`; ``is_folder`` says which kind). Not a message for
    the user by itself: each reader turns it into its own one-line error."""

    def __init__(self, is_folder: bool, is_link: bool = False) -> None:
        super().__init__("not a regular file (a symbolic link, which is not followed there)"
                         if is_link else "not a regular file (a folder, FIFO, socket or device)")
        self.is_folder = is_folder
        self.is_link = is_link


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a command before it finished (raised in the main thread by
    :mod:`diffunet.stopping`). A ``KeyboardInterrupt``, so ``except Exception`` never swallows
    it and code that cleans up after Ctrl-C does so. ``signal`` names the signal, ``signum`` is
    its number (the command line exits with 128 + it), ``why`` says why now (empty: at once,
    as asked); the message is one line and a run adds what it kept."""

    def __init__(self, signal: str, signum: int, why: str = "", kept: str = "") -> None:
        self.signal, self.signum, self.why, self.kept = signal, signum, why, kept
        text = f"stopped by {signal}" + (f" ({why})" if why else "") + (f"; {kept}" if kept
                                                                        else "")
        super().__init__(text)


class StopRequested(Exception):
    """A long piece of work (a training preview) gave up because SIGINT/SIGTERM asked the run
    to stop; the code that started it catches it and goes on to save. Never shown to anyone."""


def require(ok: Any, error: type[Exception], message: Callable[[], str]) -> None:
    """Check ``ok``, a 0-d bool tensor, without a host sync: ``torch._assert_async``, which on an
    accelerator (and under ``torch.compile``) fails as a device-side assert rather than waiting
    for the value. On the CPU it fails at once, and then ``error(message())`` is raised, the
    one-line message built only then (it may read the offending values)."""
    import torch

    if torch.compiler.is_compiling() or ok.device.type != "cpu":
        torch._assert_async(ok, error.__name__)
        return
    try:
        torch._assert_async(ok, error.__name__)
    except RuntimeError:
        raise error(message()) from None


def reported_error(kind: str, message: str) -> Exception:
    """Another process's error (its type's name and message), to raise in this one too: the
    same diffunet error type, else RuntimeError naming it."""
    cls = globals().get(kind)
    if isinstance(cls, type) and issubclass(cls, DiffunetError):
        return cls(message)
    return RuntimeError(f"another process failed: {kind}: {message}")
