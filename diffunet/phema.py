"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", section 3.1 and appendix C): choose the EMA length after training.

Training keeps a few *power-function* EMA profiles of the weights and writes snapshots of them
into the run folder at a fixed interval; afterwards any EMA length up to a step is rebuilt as a
linear combination of the stored snapshots, by least squares over their profiles.

The math (every formula here is the paper's, written from it):

- A power-function EMA of exponent gamma averages the trajectory theta(tau) with the weight
  ``p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on [0, t] (eq. 3 of the paper's section
  3.1); its width relative to t is ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))``
  (appendix C.1): :func:`sigma_rel_of` and, inverting it (the largest real root of a cubic),
  :func:`gamma_of`.
- Step by step (appendix C.1, eq. 12), after optimizer step t (1-based):
  ``theta_hat(t) = beta(t) theta_hat(t - 1) + (1 - beta(t)) theta(t)`` with
  ``beta(t) = (1 - 1/t)^(gamma + 1)`` (:class:`PowerEMA`). The weight this gives step s at step t
  is ``(s^(gamma+1) - (s-1)^(gamma+1)) / t^(gamma+1)``, the integral of p over [s - 1, s]: the
  continuous profile applied to the piecewise-constant trajectory theta(tau) = theta(ceil(tau)),
  exactly. So the continuous inner products below are exact for the stored snapshots.
- A snapshot i (exponent g_i, step t_i) is the profile p_i; the target (g_r, t_r) is p_r. The
  weights x minimise ``|| sum_i x_i p_i - p_r ||`` in L2 (appendix C.2): the normal equations
  ``A x = b`` with ``A_ij = <p_i, p_j>``, ``b_i = <p_i, p_r>`` and the closed form (eq. 14)
  ``<p_a, p_b> = (g_a+1)(g_b+1) min(t_a,t_b)^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1))``,
  solved in float64 by least squares (:func:`solve_weights`), with the fit's relative residual
  ``|| sum_i x_i p_i - p_r || / || p_r ||`` computed from the same inner products.

The profiles' shape depends on tau / t only, so the fit depends only on the snapshot steps
relative to the target step: snapshots every 100 steps of a 2,000-step run reconstruct what
snapshots every step of a 20-step run do.

This module is the math only (torch and numpy, nothing else of diffunet's): the snapshot files
in a run folder and the reconstruction of a run's weights are :mod:`diffunet.phema_files`;
docs/training.md, "Post-hoc EMA", is the user's guide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Fit", "PowerEMA", "RESIDUAL_LIMIT", "SIGMA_REL_MAX", "gamma_of", "inner_product",
           "reconstructable_range", "sigma_rel_of", "solve_weights"]


# ---------------------------------------------------------------------------------------------
# Profiles: sigma_rel <-> gamma


def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the power-function profile of exponent ``gamma``
    (> -1): ``sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))`` (Karras et al. 2024, C.1)."""
    g = float(gamma)
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def _widest_gamma() -> float:
    """The exponent of the widest profile: where d/dg log((g+1)/((g+2)^2 (g+3))) =
    1/(g+1) - 2/(g+2) - 1/(g+3) vanishes, i.e. 2 g^2 + 6 g + 3 = 0 (its root above -1)."""
    return (-3 + math.sqrt(3)) / 2


SIGMA_REL_MAX = sigma_rel_of(_widest_gamma())
"""The widest profile a power function has (sigma_rel 0.2887 at gamma -0.634): no EMA of this
family is longer. (gamma = 0, the plain average of all steps, is 0.2887 to four places too.)"""


def gamma_of(sigma_rel: float) -> float:
    """The exponent gamma whose profile has ``sigma_rel``: the largest real root of
    ``sigma_rel^2 (g + 2)^2 (g + 3) - (g + 1) = 0``, i.e. of the cubic
    ``s g^3 + 7 s g^2 + (16 s - 1) g + (12 s - 1)`` with ``s = sigma_rel^2`` (the paper's
    choice of root, C.1: the branch on which a longer EMA has a smaller gamma). ``sigma_rel`` must
    be in (0, :data:`SIGMA_REL_MAX`]."""
    import numpy as np

    s_rel = float(sigma_rel)
    if not 0 < s_rel <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}], got {sigma_rel}")
    s = s_rel * s_rel
    roots = np.roots([s, 7 * s, 16 * s - 1, 12 * s - 1])
    real = [r.real for r in roots if abs(r.imag) <= 1e-7 * max(1.0, abs(r.real))]
    g = max(real) if real else _widest_gamma()  # a double root at the widest profile
    g = max(g, _widest_gamma())
    # two Newton steps on sigma_rel_of(g)^2 = s polish the root np.roots gives (1e-12 or so)
    for _ in range(2):
        f = (g + 1) / ((g + 2) ** 2 * (g + 3)) - s
        df = (g + 2) ** -2 / (g + 3) * (1 - (g + 1) * (2 / (g + 2) + 1 / (g + 3)))
        if df == 0:
            break
        step = f / df
        if not math.isfinite(step) or g - step < _widest_gamma():
            break
        g -= step
    return float(g)


# ---------------------------------------------------------------------------------------------
# The update during training


class PowerEMA:
    """Power-function EMA profiles of a model's weights, kept in fp32, one per ``sigma_rels``
    entry (each with its exponent ``gammas[k]``).

    :meth:`update` after optimizer step ``t`` (1-based) sets every profile k to
    ``beta_k(t) profile + (1 - beta_k(t)) weights`` with ``beta_k(t) = (1 - 1/t)^(gamma_k + 1)``
    (Karras et al. 2024, C.1, eq. 12): at t = 1 the profile is the weights themselves. Like
    :class:`diffunet.runs.EMA`, every process updates its own copy from the same synchronised
    weights, with one multi-tensor lerp and no host sync.
    """

    def __init__(self, model: torch.nn.Module, sigma_rels: Sequence[float]) -> None:
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(gamma_of(s) for s in self.sigma_rels)
        self.profiles = [{k: v.detach().float().clone() for k, v in model.state_dict().items()}
                         for _ in self.sigma_rels]

    def to(self, device: torch.device | str) -> PowerEMA:
        """Move the profiles to ``device``; returns self."""
        self.profiles = [{k: v.to(device) for k, v in p.items()} for p in self.profiles]
        return self

    def weight_at(self, t: int) -> list[float]:
        """``1 - beta_k(t)`` of every profile after optimizer step ``t`` (1-based): how much of
        the new weights enters each."""
        if t < 1:
            raise ValueError(f"t is the 1-based optimizer step, got {t}")
        return [1.0 - (1.0 - 1.0 / t) ** (g + 1) for g in self.gammas]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, t: int, keep: torch.Tensor | None = None) -> None:
        """Move every profile towards ``model``'s weights after optimizer step ``t`` (1-based);
        where ``keep`` (a 0-d bool tensor on the device) is False, leave them exactly as they
        are (a skipped step), with no host sync."""
        if not self.profiles:
            return
        params = dict(model.named_parameters())
        names = [k for k in self.profiles[0] if k in params]
        src = [params[k].detach().float() for k in names]
        for profile, weight in zip(self.profiles, self.weight_at(t)):
            dst = [profile[k] for k in names]
            if keep is None:
                torch._foreach_lerp_(dst, src, weight)
            else:
                w = keep.to(device=dst[0].device, dtype=torch.float32) * weight  # 0-d
                # one weight tensor per parameter keeps it on the device (as runs.EMA does)
                torch._foreach_lerp_(dst, src, [w] * len(dst))
        buffers = dict(model.named_buffers())
        for profile in self.profiles:
            for k, b in buffers.items():
                if k in profile:
                    profile[k].copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every profile's tensors, as ``"<k>.<name>"`` (k the profile's index)."""
        return {f"{i}.{k}": v for i, p in enumerate(self.profiles) for k, v in p.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put back what :meth:`state_dict` gave: every key must be there with its shape (a
        ``KeyError``/``ValueError`` otherwise), nothing else."""
        want = self.state_dict()
        if set(tensors) != set(want):
            missing = sorted(set(want) - set(tensors))
            extra = sorted(set(tensors) - set(want))
            raise KeyError(f"post-hoc EMA profiles: missing {missing[:1]}, unexpected "
                           f"{extra[:1]}")
        for key, dst in want.items():
            if tensors[key].shape != dst.shape:
                raise ValueError(f"post-hoc EMA profiles: {key} has shape "
                                 f"{tuple(tensors[key].shape)}, expected {tuple(dst.shape)}")
            dst.copy_(tensors[key])


# ---------------------------------------------------------------------------------------------
# The least-squares reconstruction


def inner_product(gamma_a: float, t_a: float, gamma_b: float, t_b: float) -> float:
    """``<p_a, p_b>``, the L2 inner product of two power-function profiles (exponent gamma, end
    step t) in closed form (Karras et al. 2024, C.2, eq. 14), computed in log space so that no
    power overflows: ``(g_a+1)(g_b+1) min(t_a,t_b)^(g_a+g_b+1) /
    ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1))``."""
    ga, gb, ta, tb = float(gamma_a), float(gamma_b), float(t_a), float(t_b)
    m = min(ta, tb)
    log = ((ga + gb + 1) * math.log(m) - (ga + 1) * math.log(ta) - (gb + 1) * math.log(tb))
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * math.exp(log)


@dataclass(frozen=True)
class Fit:
    """A reconstruction's weights: ``weights[i]`` multiplies snapshot i; ``residual`` is
    ``|| sum_i x_i p_i - p_r || / || p_r ||``, the fit's relative error in L2."""

    weights: tuple[float, ...]
    residual: float


def solve_weights(snapshots: Sequence[tuple[float, float]], gamma: float, t: float) -> Fit:
    """The least-squares weights that turn the stored profiles ``snapshots`` (``(gamma_i,
    t_i)``) into the profile of exponent ``gamma`` ending at step ``t``, and the fit's relative
    residual (Karras et al. 2024, C.2): ``A x = b`` with ``A_ij = <p_i, p_j>`` and ``b_i =
    <p_i, p_r>`` (:func:`inner_product`), solved in float64 by least squares (a minimum-norm
    solution where A is singular, e.g. a snapshot stored twice). Times are taken relative to
    ``t`` (the profiles are scale-free) so the numbers stay near 1."""
    if not snapshots:
        raise ValueError("no snapshots to reconstruct from")
    rel = [(float(g), float(ti) / float(t)) for g, ti in snapshots]
    n = len(rel)
    A = torch.empty((n, n), dtype=torch.float64)
    b = torch.empty(n, dtype=torch.float64)
    for i, (gi, ti) in enumerate(rel):
        b[i] = inner_product(gi, ti, gamma, 1.0)
        for j in range(i, n):
            gj, tj = rel[j]
            A[i, j] = A[j, i] = inner_product(gi, ti, gj, tj)
    # scale rows and columns to a unit diagonal: the solution is the same, the conditioning of
    # the matrix lstsq sees much better (profiles of very different gamma have norms far apart)
    d = A.diagonal().rsqrt()
    As = A * d[:, None] * d[None, :]
    y = torch.linalg.lstsq(As, (b * d)[:, None], driver="gelsd").solution[:, 0]
    x = y * d
    rr = inner_product(gamma, 1.0, gamma, 1.0)
    err2 = float(x @ A @ x - 2 * x @ b + rr)
    residual = math.sqrt(max(err2, 0.0) / rr)
    return Fit(tuple(float(v) for v in x), residual)


RESIDUAL_LIMIT = 0.05
"""The largest relative residual :func:`solve_weights` may leave for a reconstruction to be
used (see docs/training.md, "Post-hoc EMA": where the reconstructed weights stay close to the
EMA tracked directly)."""


def reconstructable_range(snapshots: Sequence[tuple[float, float]], t: float,
                          limit: float = RESIDUAL_LIMIT, points: int = 200
                          ) -> tuple[float, float] | None:
    """The sigma_rel range whose reconstruction at step ``t`` from ``snapshots`` leaves a
    relative residual within ``limit``: the smallest and largest such value on a logarithmic
    grid of ``points`` values in [0.001, :data:`SIGMA_REL_MAX`] (None when none does)."""
    lo, hi = math.log(1e-3), math.log(SIGMA_REL_MAX)
    good = [s for s in (math.exp(lo + (hi - lo) * i / (points - 1)) for i in range(points))
            if solve_weights(snapshots, gamma_of(min(s, SIGMA_REL_MAX)), t).residual <= limit]
    return (min(good), max(good)) if good else None

