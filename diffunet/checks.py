"""The checks every config dataclass shares: a one-line :class:`~diffunet.errors.ConfigError`
that names the key, and finite numbers (used by :mod:`diffunet.config` and by the ``[schedule]``
section that lives beside the formulations, :mod:`diffunet.formulations.settings`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NoReturn

from .errors import ConfigError

__all__ = ["fail", "check_finite", "shown", "INT_LIMIT", "looks_like_repo_id"]

INT_LIMIT = 10**60
"""No setting is an integer this large or larger (in absolute value): nothing diffunet holds
comes near (PyTorch and NumPy hold 64-bit integers; each setting's own check says its range),
and Python cannot even print an integer of more than 4,300 digits in decimal, which a TOML hex
literal can make."""


def shown(value: object) -> str:
    """``repr(value)`` for a message, except an integer too long to print (a TOML hex literal
    can make one of any size): then how long it is."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= INT_LIMIT:
        return f"an integer of about {int(abs(value).bit_length() * 0.30103) + 1:,} digits"
    return repr(value)


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


def looks_like_repo_id(text: str) -> bool:
    """``owner/name`` as the Hub spells repository ids (one slash, no leading dot or slash);
    here so that every layer that takes "a folder or a Hub id" (an imported UNet, a VAE) tells
    them apart the same way."""
    owner, slash, name = str(text).partition("/")
    ok = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return (bool(slash) and bool(owner) and bool(name) and set(owner + name) <= ok
            and not owner.startswith(".") and not name.startswith("."))
