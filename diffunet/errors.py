"""The errors diffunet raises for bad input.

Every message is one line that names the problem and the fix; the command line prints it and
exits with code 2 (no traceback). Each subclass also derives from the builtin a library user
would expect (``ValueError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class DiffunetError(Exception):
    """Base class: a user-facing problem with a one-line message."""


class ConfigError(DiffunetError, ValueError):
    """A config key, type or value that cannot work (the message names the key)."""


class ModelFileError(DiffunetError, ValueError):
    """A model file that is missing, not a diffunet file, too new, or does not fit its config."""


class DataError(DiffunetError, ValueError):
    """A data source that cannot be read (missing path, no readable image, ...)."""
