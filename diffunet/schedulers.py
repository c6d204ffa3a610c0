"""Deprecated: the step rules and ``sample()`` live in :mod:`diffunet.samplers`.

``import diffunet.schedulers`` keeps working for this release (with a DeprecationWarning) and
gives the same objects; it will be removed in the next one.
"""

from __future__ import annotations

import warnings

from .samplers import *  # noqa: F401,F403  (the deprecated names, re-exported as they were)
from .samplers import __all__  # noqa: F401

warnings.warn("diffunet.schedulers is deprecated; import from diffunet.samplers (or the "
              "diffunet package) instead", DeprecationWarning, stacklevel=2)
