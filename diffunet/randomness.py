"""Explicit randomness for the step rules and the sampling loop (house rule 3).

Every draw comes from a ``torch.Generator`` the caller passes, or from a ``noise=`` tensor; when
neither is given, a fresh generator seeded from OS entropy is made (``torch.Generator.seed()``),
so the result is random but the global RNG is never touched. A generator may live on another
device than the tensor it draws for: the noise is drawn on the generator's device, in the
tensor's dtype, and then moved, so a CPU generator gives the same numbers on any accelerator.
Wherever a generator is accepted, a list of B generators (one per image, as diffusers allows) is
accepted too: image b's noise is then drawn from ``generator[b]`` alone, so an image does not
depend on which batch it was drawn in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from .errors import UsageError

__all__ = ["Generators", "fresh_generator", "gaussian", "check_generator_count",
           "check_randomness"]

Generators = Union[torch.Generator, Sequence[torch.Generator]]
"""One generator for the whole batch, or a list of B generators, one per image."""


def fresh_generator(device: torch.device) -> torch.Generator:
    """A generator seeded from OS entropy, on ``device`` where that device supports one."""
    try:
        g = torch.Generator(device=device)
    except RuntimeError:  # a backend without its own generators: draw on the CPU, then move
        g = torch.Generator()
    g.seed()
    return g


def check_generator_count(generator: Optional[Generators], batch: int) -> None:
    """Refuse a list of generators that is not one ``torch.Generator`` per image."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if len(generator) != batch or not all(isinstance(g, torch.Generator) for g in generator):
        raise UsageError(f"generator must be one torch.Generator or a list of one per image "
                         f"({batch}), got a list of {len(generator)}")


def check_randomness(noise: Optional[Tensor], generator: Optional[Generators]) -> None:
    """Refuse ``noise=`` and ``generator=`` together (the step would use only one of them)."""
    if noise is not None and generator is not None:
        raise UsageError("pass either noise= or generator=, not both")


def gaussian(like: Tensor, noise: Optional[Tensor], generator: Optional[Generators]) -> Tensor:
    """Standard normal noise shaped like ``like`` (B, ...), on its device and in its dtype:
    ``noise`` itself when given, else drawn from ``generator`` (else a fresh one).

    With a list of B generators, sample b's noise is ``randn(like.shape[1:])`` from
    ``generator[b]``: the same numbers a batch of one drawing from that generator gets.
    """
    if noise is not None:
        if noise.shape != like.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(like.shape)}")
        return noise.to(device=like.device, dtype=like.dtype)
    if generator is None:
        generator = fresh_generator(like.device)
    if isinstance(generator, torch.Generator):
        z = torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype)
        return z.to(like.device)
    check_generator_count(generator, like.shape[0])
    one = (1, *like.shape[1:])
    draws = [torch.randn(one, generator=g, device=g.device, dtype=like.dtype) for g in generator]
    if len({g.device for g in generator}) > 1:
        return torch.cat([z.to(like.device) for z in draws])
    # One copy for the batch, not one per image; from pinned memory it does not block the host.
    z = torch.cat(draws)
    if z.device.type == "cpu" and like.device.type == "cuda":
        z = z.pin_memory()
    return z.to(like.device, non_blocking=True)
