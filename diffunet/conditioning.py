"""One conditioning input: what a model is conditioned on, as one mapping, and what
classifier-free guidance needs of it, written once for every kind of condition.

A condition is a mapping of the network's keyword inputs (:data:`CONDITION_KEYS`):

- ``class_labels``: (B,) int64 labels in [0, num_classes]; ``num_classes`` is "no label";
- ``cond_image``: (B, cond_channels, H, W), an image the UNet concatenates to x_t (SR3,
  Saharia et al. 2021; Palette, Saharia et al. 2022); zeros are "no image".

It goes to the network unchanged, as ``net(x, t, **cond)``. Classifier-free guidance (Ho &
Salimans 2022) needs three things of it, and they live here for every key alike:

- the null condition (:func:`null_condition`): the "no label" index, a zero image;
- training dropout (:func:`with_dropout`): the rows a run's generator drew replaced by the null
  condition, so one network learns both the conditional and the unconditional prediction;
- the guidance batch (:func:`doubled`): [cond; null] on the doubled batch [x; x], one forward
  pass for both predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from .errors import UsageError

__all__ = ["CONDITION_KEYS", "Condition", "make_condition", "network_kwargs",
           "resolve_null_label", "null_condition", "with_dropout", "doubled", "bind"]

CONDITION_KEYS = ("class_labels", "cond_image")
"""The conditions diffunet's UNet takes, by the keyword it takes them with."""

Condition = Mapping[str, Tensor]
"""``{key: tensor}`` for some of :data:`CONDITION_KEYS`, each with the batch first."""


def make_condition(cond: Optional[Mapping[str, Any]] = None,
                   class_labels: Optional[Tensor] = None,
                   device: Optional[torch.device] = None) -> dict[str, Tensor]:
    """``cond`` with ``class_labels`` (the older keyword) merged in, on ``device``: labels as
    int64, images as they are. A key diffunet does not know, or labels given both ways, is a
    :class:`UsageError`."""
    out = dict(cond or {})
    unknown = sorted(set(out) - set(CONDITION_KEYS))
    if unknown:
        raise UsageError(f"cond: unknown key(s) {', '.join(map(repr, unknown))}; a condition "
                         f"holds {', '.join(CONDITION_KEYS)}")
    if class_labels is not None:
        if "class_labels" in out:
            raise UsageError("class labels were given twice (class_labels= and "
                             "cond['class_labels']); give them once")
        out["class_labels"] = class_labels
    for key, value in list(out.items()):
        if value is None:
            del out[key]
            continue
        value = torch.as_tensor(value)
        if key == "class_labels":
            value = value.long()
        out[key] = value if device is None else value.to(device)
    return out


def network_kwargs(cond: Optional[Condition], class_labels: Optional[Tensor] = None
                   ) -> dict[str, Optional[Tensor]]:
    """The keywords of a network call with condition ``cond`` (or the ``class_labels`` alone):
    ``class_labels`` always (None where there are none: how the formulations have always
    called the network), then the rest of the mapping."""
    if cond and class_labels is not None:
        raise UsageError("class labels were given twice (class_labels= and cond); give the "
                         "condition once")
    return {"class_labels": class_labels, **(cond or {})}


def resolve_null_label(model: Any, null_label: Optional[int]) -> int:
    """The "no label" class index of classifier-free guidance: ``null_label``, else
    ``model.config.num_classes`` (the UNet's convention)."""
    if null_label is not None:
        return int(null_label)
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    if isinstance(num_classes, int) and not isinstance(num_classes, bool):
        return num_classes
    raise UsageError("classifier-free guidance needs the 'no label' class index: pass "
                     "null_label=..., or use a model whose config.num_classes is set")


def _null(key: str, value: Tensor, null_label: Callable[[], int]) -> Tensor:
    if key == "class_labels":
        return torch.full_like(value, null_label())
    return torch.zeros_like(value)  # cond_image: no image


def null_condition(cond: Condition, null_label: Callable[[], int]) -> dict[str, Tensor]:
    """The null value of each entry of ``cond``, same shapes: ``null_label()`` for labels (asked
    only where there are labels), zeros for a condition image."""
    return {key: _null(key, value, null_label) for key, value in cond.items()}


def with_dropout(cond: Condition, drop: Tensor, null_label: Callable[[], int]
                 ) -> dict[str, Tensor]:
    """``cond`` with the rows where ``drop`` (B,) bool is true replaced by the null condition:
    classifier-free guidance's training dropout (the draw is the caller's, from its run's
    generator, so a resumed run drops the same rows)."""
    out = {}
    for key, value in cond.items():
        keep = drop.to(value.device).view(-1, *([1] * (value.ndim - 1)))
        out[key] = torch.where(keep, _null(key, value, null_label), value)
    return out


def doubled(cond: Condition, null_label: Callable[[], int]) -> dict[str, Tensor]:
    """[cond; null] along the batch: the condition of classifier-free guidance's one forward
    pass on [x; x], whose two halves are the conditional and the unconditional prediction."""
    return {key: torch.cat([value, _null(key, value, null_label)])
            for key, value in cond.items()}


def bind(model: Callable[..., Tensor], cond: Condition) -> Callable[..., Tensor]:
    """``model`` as ``net(x, t)`` with ``cond`` bound in (empty: ``model`` itself). The bound
    network takes no condition of its own: a sampler's ``class_labels=None`` passes through,
    anything else is a :class:`UsageError` (give the condition to ``sample()``)."""
    if not cond:
        return model

    def bound(x: Tensor, t: Tensor, class_labels: None = None) -> Tensor:
        no_condition(class_labels)
        return model(x, t, **cond)

    return bound


def no_condition(class_labels: Any) -> None:
    """Refuse a condition passed to a network that has its condition bound in."""
    if class_labels is not None:  # a denoiser passes class_labels=None through
        raise UsageError("the guided network has its condition bound in; pass class_labels "
                         "(or cond) to sample(), not to the network")
