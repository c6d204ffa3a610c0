"""Guidance, written once for every formulation, sampler and grid: classifier-free guidance
(Ho & Salimans 2022), autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad
Version of Itself") and the guidance interval (Kynkaanniemi et al. 2024, "Applying Guidance in
a Limited Interval Improves Sample and Distribution Quality in Diffusion Models").

Both guidances extrapolate from a weaker prediction towards the model's own,

    D_w(x; sigma) = D_weak(x; sigma) + w (D_main(x; sigma) - D_weak(x; sigma)),

where D_weak is the same network's unconditional prediction (classifier-free guidance, Ho &
Salimans eq. 6 with s = w) or a weaker network's prediction with the same labels (autoguidance,
Karras et al. 2024 eq. 2; it needs no labels, so it guides unconditional models too). The
combination is taken on the network outputs F: every formulation's denoiser is affine in its
network's output, D = a(x, sigma) + b(sigma) F with a and b depending only on x and the level
(VP: the eps/v/x0 conversion; EDM: c_skip x + c_out F; flow: x_t - t v), so combining the two
F's equals combining the two D's. Guidance is therefore a wrapper around the network,
``net(x, t)``, that every path (native or sigma space) calls (:func:`guided_network`).

The guidance interval (Kynkaanniemi et al. 2024, sec. 3) guides only the network calls whose
noise level sigma (the denoiser view's, x = x0 + sigma n, read from the network's time input by
:meth:`~diffunet.formulations.base.Formulation.sigma_of_time_input`) lies in [lo, hi];
elsewhere the main network runs alone, with no unconditional or weak evaluation: that is its
saving as well as its gain.

Where the main and the guide network share one architecture (same type and config, same
parameter shapes), a guided call on a device in :data:`STACKED_DEVICES` evaluates both in ONE
batched call (:class:`StackedNetworks`); elsewhere it makes two calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .conditioning import bind, doubled, make_condition, no_condition, resolve_null_label
from .errors import UsageError
from .formulations.base import Formulation

__all__ = ["NetworkCount", "StackedNetworks", "STACKED_DEVICES", "INTERVAL_RTOL",
           "carried_guide_weight", "FULL_WEIGHT_STEPS", "HALF_WEIGHT_STEPS", "UNGUIDED_STEPS",
           "guided_network", "guide_mismatch", "stackable", "resolve_null_label"]

Network = Callable[..., Tensor]

INTERVAL_RTOL = 1e-4
"""A call whose sigma is within this relative distance of an interval end counts as on it (the
ends are inclusive): the level is read back from the network's time input, which is float32
(flow's t x T, EDM's ln(sigma) / 4, VP's interpolated timestep), so a grid level typed in as an
end comes back rounded by up to ~5e-5."""

STACKED_DEVICES: tuple[str, ...] = ("cuda",)
"""Device types where two networks of one architecture run as one batched call. Not the CPU:
there the vmapped call (grouped convolutions, attention looped over the pair) measured 1.3 to
1.6 times slower than two calls (docs/samplers.md, "Autoguidance and the guidance interval");
``diffunet bench --gpu-check`` times it on a GPU (:func:`diffunet.bench.guidance_pair`)."""


FULL_WEIGHT_STEPS = 25
"""From this many sampling steps on, the carried guide runs at its recorded weight w."""
HALF_WEIGHT_STEPS = 10
"""At this many steps it runs at half its guidance, 1 + (w - 1) / 2."""
UNGUIDED_STEPS = 5
"""At this many steps and fewer it does not run (weight 1: unguided, the guide not evaluated)."""


def carried_guide_weight(scale: float, num_steps: int) -> float:
    """The autoguidance weight the carried guide (``train.guide_at``) runs at when nobody gave
    one, from its recorded ``scale`` w (``sample.guide_scale``) and the step count: w at
    :data:`FULL_WEIGHT_STEPS` steps or more, 1 + (w - 1) / 2 at :data:`HALF_WEIGHT_STEPS`, 1
    (unguided) at :data:`UNGUIDED_STEPS` or fewer, linear in the step count between. Fitted to
    the judge on the default run (docs/recipes.md): at 25 and 50 steps w 2 wins; at 10 steps w
    1.5 beat w 2 on two runs and both seed sets; at 8 steps w 1.5 was level with unguided and
    w 2 far worse; at 5 steps unguided beat w 1.5 and w 2 (14.96 against 21.58 and 28.75). A
    coarse step overshoots by more at the same weight. A weight of 1 or less is kept as it
    is."""
    if scale <= 1.0:
        return scale
    if num_steps <= HALF_WEIGHT_STEPS:
        share = 0.5 * max(0.0, (num_steps - UNGUIDED_STEPS) / (HALF_WEIGHT_STEPS - UNGUIDED_STEPS))
    else:
        share = 0.5 + 0.5 * min(1.0, (num_steps - HALF_WEIGHT_STEPS)
                                / (FULL_WEIGHT_STEPS - HALF_WEIGHT_STEPS))
    return 1.0 + (scale - 1.0) * share


@dataclass
class NetworkCount:
    """Network evaluations of sampling runs, added up by the guidance wrapper
    (``sample(..., network_count=...)``): the honest NFE of a guided run."""

    calls: int = 0
    """Calls of the main network, each one forward pass over the batch: per sampling run, what
    :func:`diffunet.samplers.network_calls` says (RePaint repeats add theirs)."""
    guided: int = 0
    """Of those, the calls that also evaluated the guide: classifier-free guidance's
    unconditional branch (the same forward pass on a doubled batch) or, with autoguidance, the
    guide network (a second network evaluation; batched with the main one where they share an
    architecture). Outside the guidance interval a call is not guided."""


_SHAPES = (("in_channels", "image channels"), ("output_channels", "output channels"),
           ("image_size", "image size"), ("num_classes", "classes (num_classes)"),
           ("cond_channels", "condition-image channels (cond_channels)"))


def guide_mismatch(model: Any, guide: Any) -> Optional[str]:
    """Why ``guide`` cannot guide ``model``, read from their ``config`` (a UNetConfig or any
    object with the same attributes): another number of image or output channels, another image
    size, other classes; None when they agree (or either has no config: a plain callable is the
    caller's business). The architecture may differ (a smaller network guides well)."""
    a, b = getattr(model, "config", None), getattr(guide, "config", None)
    if a is None or b is None:
        return None
    for attr, what in _SHAPES:
        mine, theirs = getattr(a, attr, None), getattr(b, attr, None)
        if mine != theirs:
            return f"its {what} {theirs}, the model's {mine}"
    return None


def stackable(a: Any, b: Any) -> bool:
    """Whether networks ``a`` and ``b`` can run as one batched call (:class:`StackedNetworks`):
    two modules of one type and one config (the forward pass is ``a``'s, so everything it
    depends on must agree), in eval mode, not compiled, with the same parameter and buffer
    names, shapes, dtypes and devices."""
    if not (isinstance(a, torch.nn.Module) and isinstance(b, torch.nn.Module)) or a is b:
        return False
    if type(a) is not type(b) or hasattr(a, "_orig_mod") or a.training or b.training:
        return False
    config = getattr(a, "config", None)
    if config is None or config != getattr(b, "config", None):
        return False

    def layout(m: torch.nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype, str]]:
        return [(n, tuple(t.shape), t.dtype, str(t.device))
                for n, t in [*m.named_parameters(), *m.named_buffers()]]

    return layout(a) == layout(b)


class StackedNetworks:
    """Two networks of one architecture (:func:`stackable`) evaluated in one batched call:
    ``(x, t, class_labels=None) -> (out_a, out_b)``, each (B, C, H, W), equal to ``a(x, t)``
    and ``b(x, t)`` up to float rounding.

    Their parameters and buffers are stacked along a new first dimension
    (``torch.func.stack_module_state``, a copy taken when this object is built) and ``a``'s
    forward pass is vmapped over the stack (``torch.func.functional_call``): each convolution
    runs once for both networks (as a grouped convolution), each kernel launch serves both.
    """

    def __init__(self, a: torch.nn.Module, b: torch.nn.Module) -> None:
        if not stackable(a, b):
            raise UsageError("StackedNetworks needs two networks of one type and config with "
                             "the same parameter shapes, in eval mode (see guidance.stackable)")
        from torch.func import functional_call, stack_module_state

        params, buffers = stack_module_state([a, b])
        self._state = ({k: v.detach() for k, v in params.items()},
                       {k: v.detach() for k, v in buffers.items()})

        def one(p: dict, bufs: dict, x: Tensor, t: Tensor, cond: dict) -> Tensor:
            return functional_call(a, (p, bufs), (x, t), cond)

        self._vmapped = torch.vmap(one, in_dims=(0, 0, None, None, None))

    def __call__(self, x: Tensor, t: Tensor, class_labels: Optional[Tensor] = None,
                 cond: Optional[dict[str, Tensor]] = None) -> tuple[Tensor, Tensor]:
        """Both networks on ``x`` (B, C, H, W) at ``t`` with one condition (``cond``, or the
        ``class_labels`` alone)."""
        cond = make_condition(cond, class_labels)
        out = self._vmapped(*self._state, x, t, cond)  # (2, B, C, H, W)
        return out[0], out[1]


class _Guided:
    """The guidance wrapper ``net(x, t)``; see :func:`guided_network`."""

    def __init__(self, main: Network, pair: Optional[Callable[[Tensor, Tensor],
                                                              tuple[Tensor, Tensor]]],
                 scale: float, schedule: Formulation,
                 interval: Optional[tuple[float, float]],
                 count: Optional[NetworkCount]) -> None:
        self.main, self.pair, self.scale = main, pair, scale
        self.schedule, self.interval, self.count = schedule, interval, count

    def _inside(self, x: Tensor, t: Tensor) -> tuple[int, Optional[Tensor]]:
        """How many images of the call are in the guidance interval, and their (B,) mask (None
        when all are: no interval, or every level inside it)."""
        if self.interval is None:
            return x.shape[0], None
        lo, hi = self.interval
        tt = t.reshape(-1).expand(x.shape[0]) if t.ndim == 0 else t
        sigma = self.schedule.sigma_of_time_input(tt)
        ok = (sigma >= lo * (1 - INTERVAL_RTOL)) & (sigma <= hi * (1 + INTERVAL_RTOL))
        # One host read per network call, only with an interval. The sampling paths call the
        # network with one level for the whole batch, so it is all or nothing there.
        n = int(ok.sum())
        return n, (None if n == ok.numel() else ok)

    def __call__(self, x: Tensor, t: Tensor, class_labels: None = None) -> Tensor:
        no_condition(class_labels)
        if self.count is not None:
            self.count.calls += 1
        if self.pair is None:
            return self.main(x, t)
        n, inside = self._inside(x, t)
        if n == 0:
            return self.main(x, t)  # outside the interval: no guide evaluation at all
        if self.count is not None:
            self.count.guided += 1
        main, weak = self.pair(x, t)
        out = weak + self.scale * (main - weak)  # Ho & Salimans eq. 6; Karras et al. 2024 eq. 2
        if inside is not None:  # a batch of mixed levels: guide only the images inside
            out = torch.where(inside.to(out.device).reshape(-1, *([1] * (out.ndim - 1))),
                              out, main)
        return out


def guided_network(model: Network, schedule: Formulation, *, labels: Optional[Tensor] = None,
                   guidance_scale: float = 1.0, null_label: Optional[int] = None,
                   guide_model: Optional[Network] = None,
                   interval: Optional[tuple[float, float]] = None,
                   count: Optional[NetworkCount] = None,
                   cond: Optional[dict[str, Tensor]] = None) -> Network:
    """``model`` as the network ``net(x, t)`` every sampling path calls: the condition bound in
    (``cond``, a :mod:`diffunet.conditioning` mapping: class labels (B,), a condition image;
    ``labels`` is the class labels alone), and guidance with weight ``guidance_scale`` = w
    where it is not 1:

    - with ``guide_model`` (autoguidance): F_guide + w (F_main - F_guide), the guide called with
      the same condition; the null condition is not used. One batched call where the two share
      an architecture on a device in :data:`STACKED_DEVICES`, else two calls.
    - else, with a condition (classifier-free guidance): ONE forward pass on the doubled batch
      [x, x] with the condition [cond, null] (:func:`diffunet.conditioning.doubled`: the null
      label ``null_label``, default ``model.config.num_classes``; a zero image),
      F_uncond + w (F_cond - F_uncond).

    ``interval`` = (lo, hi): guide only calls whose sigma (``schedule.sigma_of_time_input(t)``)
    is in [lo, hi] (within :data:`INTERVAL_RTOL`); the others call the main network alone.
    ``count``: a :class:`NetworkCount` each call adds to. With w = 1 (or no condition and no
    guide) there is no guidance: the main network alone, exactly.
    """
    condition = make_condition(cond, labels)
    main = bind(model, condition)
    pair: Optional[Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] = None
    if guidance_scale != 1.0 and guide_model is not None:
        weak = bind(guide_model, condition)
        stacks: dict[torch.device, StackedNetworks] = {}
        can_stack = stackable(model, guide_model)

        def autoguided(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            if can_stack and x.device.type in STACKED_DEVICES:
                if x.device not in stacks:  # built once per run, on the first guided call
                    stacks[x.device] = StackedNetworks(model, guide_model)
                return stacks[x.device](x, t, cond=condition)
            return main(x, t), weak(x, t)

        pair = autoguided
    elif guidance_scale != 1.0 and condition:
        both_cond = doubled(condition, lambda: resolve_null_label(model, null_label))

        def classifier_free(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            both = model(torch.cat([x, x]), torch.cat([t, t]), **both_cond)
            cond_out, uncond = both.chunk(2)
            return cond_out, uncond

        pair = classifier_free
    if pair is None and count is None:
        return main
    return _Guided(main, pair, float(guidance_scale), schedule, interval, count)
