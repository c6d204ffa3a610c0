"""The checks every config dataclass shares: a one-line :class:`~diffunet.errors.ConfigError`
that names the key, and finite numbers (used by :mod:`diffunet.config` and by the ``[schedule]``
section that lives beside the formulations, :mod:`diffunet.formulations.settings`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NoReturn

from .errors import ConfigError

__all__ = ["fail", "check_finite"]


def fail(key: str, problem: str) -> NoReturn:
    """Raise the one-line ``ConfigError`` "key: problem"."""
    raise ConfigError(f"{key}: {problem}")


def check_finite(cfg: Any, section: str) -> None:
    """Every float of the config dataclass ``cfg`` (also inside a tuple) must be finite, unless
    its field's metadata says ``allow_inf`` (then +-inf, never NaN): an ``inf`` learning rate
    trains into NaN, a NaN passes every ``<`` range check unnoticed."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        items = value if isinstance(value, tuple) else (value,)
        for x in items:
            if isinstance(x, float) and not math.isfinite(x) and not (
                    f.metadata.get("allow_inf") and not math.isnan(x)):
                shown = list(value) if isinstance(value, tuple) else value
                fail(f"{section}.{f.name}", f"must be a finite number, got {shown}")
