"""The samplers: timestep respacing and sigma grids, the reverse-process step rules (DDPM
ancestral, DDIM, DPM-Solver++(2M) on integer timesteps; Euler, Heun, Euler ancestral, DPM++ 2M
and DPM++ 2M SDE on the denoiser D(x; sigma) of Karras et al. 2022) and the sampling loop
:func:`sample`, with classifier-free guidance and editing (SDEdit, inpainting, RePaint).

Everything here is a pure function of its arguments (house rule 3): no scheduler objects with
state, and all randomness comes through an explicit ``torch.Generator`` or a ``noise=`` tensor.
When a step needs noise and neither is given, it draws from a freshly created generator seeded
from OS entropy (``torch.Generator.seed()``), so the result is random but the global RNG is never
touched. A generator may live on another device than ``xt``: the noise is drawn on the
generator's device, in ``xt``'s dtype, and then moved to ``xt``'s device, so a CPU generator
gives the same images on any accelerator. Wherever a generator is accepted, a list of B
generators (one per image, as diffusers allows) is accepted too: image b's noise is then drawn
from ``generator[b]`` alone, so an image does not depend on which batch it was sampled in.

The model is any callable ``model(x, t)`` / ``model(x, t, class_labels=y)`` returning a tensor
shaped like ``x``; what that output means (eps, v or x0) is the schedule's business
(:meth:`NoiseSchedule.split_output`, house rule 2). Respacing picks a subset of the training
timesteps and the model always sees original-scale ``t`` (house rule 4). Coefficients are
computed in float64 from the schedule's tables and cast to ``xt``'s dtype at the end.

Notation: ``ab_t`` = alpha_bar at t, ``ab_prev`` = alpha_bar at t_prev (1 when t_prev = -1, the
last step). For a respaced chain the effective per-step quantities are
``alpha'_t = ab_t / ab_prev`` and ``beta'_t = 1 - alpha'_t`` (Nichol & Dhariwal 2021, sec. 4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable, Literal, Optional, Union, get_args

import torch
from torch import Tensor

from .config import (ETA_ONE_SAMPLERS, ETA_SAMPLERS, SamplerName, SigmaGrid, Spacing,
                     check_sampling)
from .diffusion import NoiseSchedule, Timesteps, VPDenoiser, coefficient_dtype
from .errors import UsageError

__all__ = ["SAMPLERS", "SPACINGS", "VARIANCES", "SIGMA_GRIDS", "INTEGER_SAMPLERS",
           "MULTISTEP_SAMPLERS", "Generators", "Spacing", "SigmaGrid", "StepCallback",
           "SigmaCallback", "Denoiser", "ddim_step", "ddpm_step", "dpmpp_2m_step",
           "make_timesteps", "make_sigmas", "network_calls", "sample_euler", "sample_heun",
           "sample_euler_ancestral", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample"]

SPACINGS: tuple[str, ...] = get_args(Spacing)
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
VARIANCES: tuple[str, ...] = ("fixed_small", "fixed_large")

StepCallback = Callable[[int, Any, Tensor, Tensor], Any]
"""``callback(i, level, x, x0_hat)`` of :func:`sample` (level: t, or sigma on the sigma path)."""
Generators = Union[torch.Generator, Sequence[torch.Generator]]
"""One generator for the whole batch, or a list of B generators, one per image."""


# ---------------------------------------------------------------------------------------------
# Timestep spacing


def _round_half_even(num: int, den: int) -> int:
    """num / den rounded to the nearest integer, ties to even (as numpy's ``round``), exactly."""
    q, r = divmod(num, den)
    if 2 * r > den or (2 * r == den and q % 2):
        q += 1
    return q


def make_timesteps(num_train_timesteps: int, num_steps: int,
                   spacing: Spacing = "trailing") -> Tensor:
    """The ``num_steps`` training timesteps a sampler visits, descending, as an int64 (n,) tensor.

    The meanings are those of diffusers' ``timestep_spacing`` with ``steps_offset=0`` (Lin et al.
    2023, Table 2), for T = ``num_train_timesteps`` and n = ``num_steps``:

    - ``leading``:  ``arange(0, n) * (T // n)``, reversed (DDIM's original choice; never visits
      T-1, so it starts from a not-quite-pure-noise level).
    - ``trailing``: ``round(arange(T, 0, -T/n)) - 1``: always starts at T-1 (recommended).
    - ``linspace``: ``round(linspace(0, T-1, n))``, reversed.

    The values are computed with exact integer arithmetic (round half to even). diffusers does
    the same in floating point, which breaks a few exact .5 ties the other way (e.g. linspace
    with T=1000, n=27) and, for ``trailing``, sometimes returns n+1 steps (e.g. T=100, n=29);
    for all common step counts the two agree exactly.
    """
    T, n = num_train_timesteps, num_steps
    for name, value in (("num_train_timesteps", T), ("num_steps", n)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{name} must be an integer, got {value!r}")
    if T < 1:
        raise UsageError(f"num_train_timesteps must be positive, got {T}")
    if not 1 <= n <= T:
        raise UsageError(f"num_steps must be between 1 and num_train_timesteps ({T}), got {n}")
    if spacing == "leading":
        values = [i * (T // n) for i in range(n)][::-1]
    elif spacing == "trailing":
        values = [_round_half_even(T * (n - i), n) - 1 for i in range(n)]  # T - i*T/n, minus 1
    elif spacing == "linspace":
        if n == 1:
            values = [0]
        else:
            values = [_round_half_even(i * (T - 1), n - 1) for i in range(n)][::-1]
    else:
        raise UsageError(f"unknown timestep spacing {spacing!r}; choose one of "
                         f"{', '.join(repr(s) for s in SPACINGS)}")
    return torch.tensor(values, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the step rules


def _fresh_generator(device: torch.device) -> torch.Generator:
    """A generator seeded from OS entropy, on ``device`` where that device supports one."""
    try:
        g = torch.Generator(device=device)
    except RuntimeError:  # a backend without its own generators: draw on the CPU, then move
        g = torch.Generator()
    g.seed()
    return g


def _gaussian(like: Tensor, noise: Tensor | None, generator: Generators | None) -> Tensor:
    """Standard normal noise shaped like ``like``, on its device and in its dtype.

    With a list of B generators, sample b's noise is ``randn(like.shape[1:])`` from
    ``generator[b]``: the same numbers a batch of one drawing from that generator gets.
    """
    if noise is not None:
        if noise.shape != like.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(like.shape)}")
        return noise.to(device=like.device, dtype=like.dtype)
    if generator is None:
        generator = _fresh_generator(like.device)
    if isinstance(generator, torch.Generator):
        z = torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype)
        return z.to(like.device)
    _check_generator_count(generator, like.shape[0])
    one = (1, *like.shape[1:])
    draws = [torch.randn(one, generator=g, device=g.device, dtype=like.dtype) for g in generator]
    if len({g.device for g in generator}) > 1:
        return torch.cat([z.to(like.device) for z in draws])
    # One copy for the batch, not one per image; from pinned memory it does not block the host.
    z = torch.cat(draws)
    if z.device.type == "cpu" and like.device.type == "cuda":
        z = z.pin_memory()
    return z.to(like.device, non_blocking=True)


def _check_generator_count(generator: Generators | None, batch: int) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    if len(generator) != batch or not all(isinstance(g, torch.Generator) for g in generator):
        raise UsageError(f"generator must be one torch.Generator or a list of one per image "
                         f"({batch}), got a list of {len(generator)}")


def _check_randomness(noise: Tensor | None, generator: Generators | None) -> None:
    if noise is not None and generator is not None:
        raise UsageError("pass either noise= or generator=, not both")


def _coef(c: Tensor, like: Tensor) -> Union[float, Tensor]:
    """A float64 coefficient (0-d or (B,)) ready to multiply ``like`` (B, ...).

    A 0-d coefficient becomes a Python float (no device copy); a (B,) one becomes a
    (B, 1, ..., 1) tensor on ``like``'s device and dtype.
    """
    if c.ndim == 0:
        return float(c)
    return c.reshape(-1, *([1] * (like.ndim - 1))).to(device=like.device, dtype=like.dtype)


def _alpha_bars(schedule: NoiseSchedule, t: Timesteps, t_prev: Timesteps) -> tuple[Tensor, Tensor]:
    """(ab_t, ab_prev) as float64 CPU tensors (0-d or (B,)), after checking t_prev < t."""
    tt = torch.as_tensor(t).cpu()
    tp = torch.as_tensor(t_prev).cpu()
    if bool((tp >= tt).any()):
        raise UsageError(f"t_prev must be smaller than t (t_prev = -1 for the last step), got "
                         f"t={tt.tolist()}, t_prev={tp.tolist()}")
    return schedule.alpha_bar(t), schedule.alpha_bar(t_prev)


def _dynamic_threshold(x0_hat: Tensor, percentile: float) -> Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3) of x0_hat (B, ...).

    s = max(1, percentile of |x0_hat| per sample); x0_hat = clamp(x0_hat, -s, s) / s. With s = 1
    this is static clipping to [-1, 1]. (diffusers additionally caps s at ``sample_max_value``.)
    """
    compute = x0_hat.dtype if x0_hat.dtype in (torch.float32, torch.float64) else torch.float32
    flat = x0_hat.reshape(x0_hat.shape[0], -1).to(compute)
    s = torch.quantile(flat.abs(), percentile, dim=1).clamp(min=1.0)
    s = s.reshape(-1, *([1] * (x0_hat.ndim - 1)))
    return (flat.reshape(x0_hat.shape).clamp(-s, s) / s).to(x0_hat.dtype)


def _clip(x0_hat: Tensor, clip_x0: bool, dynamic_threshold: float | None) -> tuple[Tensor, bool]:
    """Clip or threshold x0_hat; also says whether it may have changed."""
    if dynamic_threshold is not None:
        if not 0.0 < dynamic_threshold <= 1.0:
            raise UsageError(f"dynamic_threshold must be a percentile in (0, 1], e.g. 0.995, "
                             f"got {dynamic_threshold}")
        return _dynamic_threshold(x0_hat, dynamic_threshold), True
    if clip_x0:
        return x0_hat.clamp(-1.0, 1.0), True
    return x0_hat, False


# ---------------------------------------------------------------------------------------------
# Step rules


def ddpm_step(schedule: NoiseSchedule, out: Tensor, t: Timesteps, t_prev: Timesteps, xt: Tensor,
              *, noise: Optional[Tensor] = None, generator: Optional[Generators] = None,
              variance: Literal["fixed_small", "fixed_large"] = "fixed_small",
              clip_x0: bool = True, dynamic_threshold: Optional[float] = None,
              ) -> tuple[Tensor, Tensor]:
    """One ancestral DDPM step x_t -> x_{t_prev}, sampling the posterior q(x_prev | x_t, x0_hat).

    Args:
        out: the model output at (xt, t), (B, C, H, W), in the schedule's parametrisation.
        t, t_prev: current and previous timestep (Python int or 0-d tensor, or (B,) int tensors);
            ``t_prev`` need not be ``t - 1`` (respaced sampling); ``t_prev = -1`` is the last
            step, which returns the posterior mean (= x0_hat) without noise.
        xt: (B, C, H, W) current sample.
        noise: the step's standard normal noise (B, C, H, W); else drawn from ``generator`` (one
            generator, or a list of B, one per sample), else from a fresh OS-seeded generator.
            Not drawn at all on the last step.
        variance: ``fixed_small`` = the posterior variance beta~ (DDPM eq. 7), ``fixed_large`` =
            beta' (DDPM sec. 3.2's sigma^2 = beta).
        clip_x0: clamp x0_hat to [-1, 1] before forming the posterior mean (as the DDPM code).
        dynamic_threshold: a percentile such as 0.995 to use Imagen's dynamic thresholding
            instead of static clipping.

    Returns:
        (x_prev, x0_hat), both (B, C, H, W), x0_hat after clipping/thresholding.
    """
    if variance not in VARIANCES:
        raise UsageError(f"unknown DDPM variance {variance!r}; choose one of "
                          f"{', '.join(repr(v) for v in VARIANCES)}")
    _check_randomness(noise, generator)
    ab_t, ab_prev = _alpha_bars(schedule, t, t_prev)
    alpha_step = ab_t / ab_prev  # alpha'_t of the (possibly respaced) chain
    beta_step = 1 - alpha_step  # beta'_t

    x0_hat, _ = schedule.split_output(xt, t, out)
    x0_hat, _ = _clip(x0_hat, clip_x0, dynamic_threshold)

    # Posterior q(x_prev | x_t, x0) = N(mean, beta~ I), DDPM eq. 6-7 with beta' for beta:
    # mean = sqrt(ab_prev) beta' / (1 - ab_t) x0 + sqrt(alpha') (1 - ab_prev) / (1 - ab_t) x_t.
    c_x0 = ab_prev.sqrt() * beta_step / (1 - ab_t)
    c_xt = alpha_step.sqrt() * (1 - ab_prev) / (1 - ab_t)
    x_prev = _coef(c_x0, xt) * x0_hat + _coef(c_xt, xt) * xt

    if variance == "fixed_small":
        var = beta_step * (1 - ab_prev) / (1 - ab_t)  # beta~ (DDPM eq. 7); 0 at t_prev = -1
    else:
        var = beta_step.clone()
    # The last step (t_prev = -1) adds no noise, whatever the variance choice (DDPM Algorithm 2:
    # "z = 0 if t = 1"). diffusers instead tests t > 0, so for a respaced last step with t > 0 it
    # adds sqrt(beta') z under fixed_large (and 1e-10 z under fixed_small).
    var = torch.where(torch.as_tensor(t_prev).cpu() == -1, torch.zeros_like(var), var)
    if bool((var > 0).any()):
        z = _gaussian(xt, noise, generator)
        x_prev = x_prev + _coef(var.sqrt(), xt) * z
    return x_prev, x0_hat


def ddim_step(schedule: NoiseSchedule, out: Tensor, t: Timesteps, t_prev: Timesteps, xt: Tensor,
              *, eta: float = 0.0, noise: Optional[Tensor] = None,
              generator: Optional[Generators] = None, clip_x0: bool = False,
              dynamic_threshold: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12).

    x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma z, with
    sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev) (eq. 16). ``eta = 0``
    is the deterministic DDIM sampler (``noise``/``generator`` are then ignored and no noise is
    drawn); ``eta = 1`` is exactly the DDPM ancestral step with ``fixed_small`` variance. When
    x0_hat is clipped or thresholded, eps_hat is re-derived from x_t and the clipped x0_hat (as
    diffusers' ``use_clipped_model_output=True``), which keeps that eta = 1 identity.

    Args:
        out: the model output at (xt, t), (B, C, H, W).
        t, t_prev: Python ints or 0-d tensors, or (B,) int tensors; t_prev = -1 on the last step.
        xt: (B, C, H, W). eta: in [0, 1]. noise / generator: as :func:`ddpm_step`.
        clip_x0: clamp x0_hat to [-1, 1]. dynamic_threshold: Imagen percentile, replaces clipping.

    Returns:
        (x_prev, x0_hat), both (B, C, H, W).
    """
    check_sampling({"eta": "eta"}, eta=eta, error=UsageError)
    _check_randomness(noise, generator)
    ab_t, ab_prev = _alpha_bars(schedule, t, t_prev)

    x0_hat, eps_hat = schedule.split_output(xt, t, out)
    x0_hat, clipped = _clip(x0_hat, clip_x0, dynamic_threshold)
    if clipped:
        eps_hat = schedule.eps_from_x0(xt, t, x0_hat)

    # eq. 16; zero on the last step, where ab_prev = 1.
    sigma = eta * ((1 - ab_prev) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_prev).sqrt()
    # eq. 12: "predicted x0" + "direction pointing to x_t" (+ random noise). Clamped at 0 against
    # rounding: 1 - ab_prev - sigma^2 = (1 - ab_prev)(1 - eta^2 beta' / (1 - ab_t)) >= 0.
    c_dir = (1 - ab_prev - sigma**2).clamp(min=0).sqrt()
    x_prev = _coef(ab_prev.sqrt(), xt) * x0_hat + _coef(c_dir, xt) * eps_hat
    if bool((sigma > 0).any()):
        z = _gaussian(xt, noise, generator)
        x_prev = x_prev + _coef(sigma, xt) * z
    return x_prev, x0_hat


def _half_log_snr(ab: Tensor) -> Tensor:
    """lambda = log(alpha / sigma) = (log(ab) - log(1 - ab)) / 2 for float64 ``ab``.

    +inf at ab = 1 (t = -1, no noise), -inf at ab = 0 (zero terminal SNR).
    """
    return 0.5 * (torch.log(ab) - torch.log1p(-ab))


def dpmpp_2m_step(schedule: NoiseSchedule, out: Tensor, t: Timesteps, t_prev: Timesteps,
                  xt: Tensor, *, prev_x0_hat: Optional[Tensor] = None,
                  prev_t: Optional[Timesteps] = None, clip_x0: bool = False,
                  dynamic_threshold: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """One DPM-Solver++(2M) step x_t -> x_{t_prev} (Lu et al. 2022, "DPM-Solver++", Algorithm 2).

    The multistep second-order solver of the diffusion ODE in its data-prediction form, in
    terms of lambda = log(alpha / sigma), alpha = sqrt(ab), sigma = sqrt(1 - ab). With
    h = lambda_prev - lambda_t and, when the previous step's estimate is given,
    r = (lambda_t - lambda_{prev_t}) / h:

        D      = (1 + 1/(2r)) x0_hat - 1/(2r) prev_x0_hat
        x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (exp(-h) - 1) D

    Without ``prev_x0_hat`` (the first step) D = x0_hat: the first-order DPM-Solver++ step,
    which is exactly DDIM with eta = 0 (:func:`ddim_step`). The last step (``t_prev = -1``,
    sigma_prev = 0, h = inf) is always first order and returns x0_hat itself; the second-order
    correction has no limit there (it grows like h). This is diffusers'
    ``final_sigmas_type="zero"`` (which forces ``lower_order_final``).

    A pure function (house rule 3): the caller carries the previous step's x0_hat and timestep
    from one call to the next (:func:`sample` does). It draws no noise.

    Args:
        out: the model output at (xt, t), (B, C, H, W).
        t, t_prev: current and target timestep (ints, 0-d or (B,) int tensors); t_prev = -1 on
            the last step.
        xt: (B, C, H, W) current sample.
        prev_x0_hat: the x0_hat returned by the previous step (at ``prev_t``), or None.
        prev_t: the previous step's timestep (> t); required with ``prev_x0_hat``.
        clip_x0, dynamic_threshold: as :func:`ddim_step`; applied to x0_hat (diffusers'
            ``thresholding``), so the returned, clipped x0_hat is what the next step uses.

    Returns:
        (x_prev, x0_hat), both (B, C, H, W). Coefficients are computed in float64 and cast to
        ``xt``'s dtype.
    """
    if (prev_x0_hat is None) != (prev_t is None):
        raise UsageError("dpmpp_2m_step: pass prev_x0_hat and prev_t together (both None on "
                          "the first step)")
    ab_t, ab_prev = _alpha_bars(schedule, t, t_prev)

    x0_hat, _ = schedule.split_output(xt, t, out)
    x0_hat, _ = _clip(x0_hat, clip_x0, dynamic_threshold)

    lam_t, lam_prev = _half_log_snr(ab_t), _half_log_snr(ab_prev)
    h = lam_prev - lam_t  # > 0; inf on the last step or when starting from ab_t = 0
    ratio = ((1 - ab_prev) / (1 - ab_t)).sqrt()  # sigma_prev / sigma_t; 0 on the last step
    c_d = ab_prev.sqrt() * -torch.expm1(-h)  # -alpha_prev (exp(-h) - 1), 1 on the last step
    x_prev = _coef(ratio, xt) * xt
    if prev_x0_hat is None:
        return x_prev + _coef(c_d, xt) * x0_hat, x0_hat

    tt = torch.as_tensor(t).cpu()
    tp = torch.as_tensor(prev_t).cpu()
    if bool((tp <= tt).any()):
        raise UsageError(f"prev_t must be larger than t (the previous step was noisier), got "
                          f"prev_t={tp.tolist()}, t={tt.tolist()}")
    if prev_x0_hat.shape != x0_hat.shape:
        raise ValueError(f"prev_x0_hat has shape {tuple(prev_x0_hat.shape)}, expected "
                         f"{tuple(x0_hat.shape)}")
    h0 = lam_t - _half_log_snr(schedule.alpha_bar(prev_t))  # the previous step's h, > 0
    half_inv_r = 0.5 * h / h0  # 1/(2r); 0 when the previous step started from ab = 0 (h0 = inf)
    last = torch.as_tensor(t_prev).cpu() == -1
    # On the last step the correction is dropped (lower order final): D = x0_hat.
    c_x0 = torch.where(last, c_d, c_d * (1 + half_inv_r))
    c_prev = torch.where(last, torch.zeros_like(c_d), -c_d * half_inv_r)
    x_prev = x_prev + _coef(c_x0, xt) * x0_hat
    if bool((c_prev != 0).any()):
        x_prev = x_prev + _coef(c_prev, xt) * prev_x0_hat.to(xt.dtype)
    return x_prev, x0_hat


# ---------------------------------------------------------------------------------------------
# Sigma grids and the Karras family: samplers of the denoiser D(x; sigma)
#
# Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models") write
# every diffusion model as a denoiser D(x; sigma) on x = x0 + sigma n ("VE scaling"); the
# probability-flow ODE is then dx/dsigma = (x - D(x; sigma)) / sigma (their eq. 1 with
# sigma(t) = t, s(t) = 1, and eq. 3). The samplers below step that ODE (or an SDE with the same
# marginals) along a descending grid sigma_0 > ... > sigma_{N-1} > sigma_N = 0. A VP model's
# denoiser is :class:`~diffunet.diffusion.VPDenoiser` (``NoiseSchedule.denoiser(model)``); any
# object with ``denoiser(model)``, ``sigma_min`` and ``sigma_max`` works the same way.
# Grid values and step coefficients are float64 (Python floats); each step's arithmetic on x is
# in x's dtype. Every step to sigma = 0 returns the denoiser's x0_hat itself.

Denoiser = Callable[..., Tensor]
"""``D(x, sigma, class_labels=None) -> x0_hat``: x (B, C, H, W) in VE scaling, sigma (B,)."""
SigmaCallback = Callable[[int, Tensor, Tensor], Any]
"""``callback(i, x, x0_hat)`` after step i of a sigma-space sampler (x: the state after it)."""

SIGMA_GRIDS: tuple[str, ...] = get_args(SigmaGrid)
INTEGER_SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "dpmpp-2m")
"""The rules with an exact integer-timestep form for VP models (:func:`ddpm_step`, ...)."""
MULTISTEP_SAMPLERS: tuple[str, ...] = ("dpmpp-2m", "dpmpp-2m-sde")
"""The rules that carry the previous step's estimate (no RePaint resampling with them)."""


def _vp_schedule(obj: Any) -> Optional[NoiseSchedule]:
    """The NoiseSchedule behind ``obj`` (a schedule or its denoiser), or None (e.g. EDM)."""
    if isinstance(obj, NoiseSchedule):
        return obj
    if isinstance(obj, VPDenoiser):
        return obj.schedule
    return None


def _sigma_range(obj: Any) -> tuple[float, float]:
    """(sigma_min, sigma_max) for the grids: the largest *finite* sigma where sigma_max = inf."""
    try:
        lo, hi = float(obj.sigma_min), float(obj.sigma_max)
    except (AttributeError, TypeError, ValueError):
        raise UsageError(f"make_sigmas needs a schedule or denoiser with float sigma_min and "
                         f"sigma_max, got {type(obj).__name__}") from None
    if hi == math.inf:
        vp = _vp_schedule(obj)
        if vp is None:
            raise UsageError(f"{type(obj).__name__} has sigma_max = inf and no table of finite "
                             "noise levels to start the grid from")
        finite = vp.sigmas[torch.isfinite(vp.sigmas)]
        hi = float(finite.max())
    if not (0 < lo < hi < math.inf):
        raise UsageError(f"the noise levels must satisfy 0 < sigma_min < sigma_max < inf, got "
                         f"sigma_min={lo}, sigma_max={hi}")
    return lo, hi


def _grid_range(obj: Any, sigma_min: Optional[float], sigma_max: Optional[float],
                names: Optional[dict[str, str]] = None, error: type[Exception] = UsageError
                ) -> tuple[float, float]:
    """The karras/exponential grid's (lowest, highest) level: the model's range
    (:func:`_sigma_range`) with ``sigma_min``/``sigma_max`` in its place where given. A bad
    range is one ``error`` naming the two as ``names`` spells them (default: as here)."""
    n = names or {"sigma_min": "sigma_min", "sigma_max": "sigma_max"}
    lo, hi = _sigma_range(obj)
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < math.inf):
            raise error(f"{n[name]} must be a positive finite noise level, got {value!r}")
    if _vp_schedule(obj) is not None:  # the denoiser clamps levels outside the table
        for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
            # a printed range end typed back in (1e-4 relative) counts as that end
            if value is not None and not lo * (1 - 1e-4) <= value <= hi * (1 + 1e-4):
                raise error(f"{n[name]} {value:g} is outside this model's noise levels "
                            f"[{lo:.6g}, {hi:.6g}] (sigma at t = 0 and the largest finite "
                            f"one); use a level in that range")
        sigma_min = None if sigma_min is None else min(max(sigma_min, lo), hi)
        sigma_max = None if sigma_max is None else min(max(sigma_max, lo), hi)
    lo = lo if sigma_min is None else float(sigma_min)
    hi = hi if sigma_max is None else float(sigma_max)
    if not lo < hi:
        raise error(f"the grid needs {n['sigma_min']} < {n['sigma_max']}, got "
                    f"{n['sigma_min']}={lo:g}, {n['sigma_max']}={hi:g}")
    return lo, hi


def check_sigma_range(schedule: Any, sigma_min: Optional[float], sigma_max: Optional[float],
                      names: Optional[dict[str, str]] = None,
                      error: type[Exception] = UsageError) -> None:
    """Refuse a ``sigma_min``/``sigma_max`` that :func:`make_sigmas` would refuse for
    ``schedule``, as one ``error`` that names them as ``names`` spells them (``--sigma-max``,
    ``sample.sigma_max``; default: as here): for callers that check settings before any work."""
    if sigma_min is not None or sigma_max is not None:
        _grid_range(schedule, sigma_min, sigma_max, names, error)


def make_sigmas(denoiser_or_schedule: Any, num_steps: int, grid: SigmaGrid = "karras", *,
                rho: float = 7.0, spacing: Spacing = "trailing",
                sigma_min: Optional[float] = None, sigma_max: Optional[float] = None) -> Tensor:
    """The noise levels of an ``num_steps``-step sampler: a (num_steps + 1,) float64 CPU tensor,
    descending, last entry 0.

    - ``karras``: Karras et al. 2022 eq. 5, sigma_i = (sigma_max^(1/rho) + i/(N-1)
      (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for i < N (rho = 7 in the paper).
    - ``exponential``: log-uniform from sigma_max to sigma_min (N points).
    - ``uniform``: the sigmas of the training timesteps ``make_timesteps(T, N, spacing)`` visits
      (VP models only; sigma_t = sqrt((1 - ab_t) / ab_t)).

    ``denoiser_or_schedule``: anything with ``sigma_min``/``sigma_max`` (a NoiseSchedule, a
    denoiser, an EDM schedule). Where sigma_max = inf (a zero-terminal-SNR VP schedule) the grid
    starts from the largest finite sigma of the table instead (``uniform``: that value replaces
    the inf entry).

    ``sigma_min``/``sigma_max`` (karras and exponential only): the grid's lowest and highest
    level instead of the model's, as k-diffusion's ``get_sigmas_karras(n, sigma_min,
    sigma_max)``. On a VP model they must lie within its table (the denoiser clamps levels
    outside it to t = 0 or T-1); an EDM model's range is only its sampling default, so any
    positive level goes.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise UsageError(f"num_steps must be a positive integer, got {num_steps!r}")
    n, f64 = num_steps, torch.float64
    if grid == "uniform" and (sigma_min is not None or sigma_max is not None):
        raise UsageError("sigma_min/sigma_max set the karras and exponential grids' range; "
                         "the uniform grid is the training timesteps' own levels (use sigmas "
                         "'karras' or 'exponential', or drop sigma_min/sigma_max)")
    if grid == "uniform":
        vp = _vp_schedule(denoiser_or_schedule)
        if vp is None:
            raise UsageError(f"sigmas 'uniform' picks training timesteps and needs a VP model "
                             f"(a NoiseSchedule), not {type(denoiser_or_schedule).__name__}; "
                             "use 'karras' or 'exponential'")
        levels = vp.sigmas[make_timesteps(vp.num_train_timesteps, n, spacing)]
        levels = torch.where(torch.isinf(levels), torch.tensor(_sigma_range(vp)[1], dtype=f64),
                             levels)
        if n > 1 and levels[0] == levels[1]:
            raise UsageError(f"sigmas 'uniform' with {n} steps visits t = T-1 and T-2, which "
                             "are the same level here (zero terminal SNR: sigma_{T-1} = inf is "
                             "replaced by sigma_{T-2}); use fewer steps or sigmas 'karras'")
    elif grid in ("karras", "exponential"):
        lo, hi = _grid_range(denoiser_or_schedule, sigma_min, sigma_max)
        if grid == "karras":
            if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho < math.inf:
                raise UsageError(f"rho must be a positive number (7 in Karras et al.), got {rho!r}")
            ramp = torch.linspace(0, 1, n, dtype=f64)
            a, b = hi ** (1 / rho), lo ** (1 / rho)
            levels = (a + ramp * (b - a)) ** rho  # eq. 5
        else:
            levels = torch.linspace(math.log(hi), math.log(lo), n, dtype=f64).exp()
    else:
        raise UsageError(f"unknown sigma grid {grid!r}; choose one of "
                         f"{', '.join(repr(g) for g in SIGMA_GRIDS)}")
    return torch.cat([levels, torch.zeros(1, dtype=f64)])


def network_calls(sampler: SamplerName, num_steps: int) -> int:
    """Network evaluations (NFE) of ``num_steps`` steps of ``sampler``: one forward pass over
    the batch each (the doubled classifier-free-guidance batch counts as one). Heun makes two
    per step except its last, to sigma = 0, which is a plain Euler step (2 N - 1); every other
    sampler makes one per step. RePaint resampling (``resample = r``) repeats steps on top."""
    check_sampling({"sampler": "sampler", "num_steps": "num_steps"}, sampler=sampler,
                   num_steps=num_steps, error=UsageError)
    return 2 * num_steps - 1 if sampler == "heun" else num_steps


def _check_sigmas(sigmas: Tensor) -> list[float]:
    """The grid as Python floats, after checking it is a descending grid ending at 0."""
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise UsageError("sigmas must be a 1-D tensor of at least 2 noise levels (make_sigmas "
                         "gives one)")
    levels = sigmas.detach().cpu().to(torch.float64).tolist()
    if levels[-1] != 0 or not all(math.isfinite(s) for s in levels) or \
            any(a <= b for a, b in zip(levels, levels[1:])):
        raise UsageError(f"sigmas must be finite, strictly decreasing and end with 0, got "
                         f"{[round(s, 6) for s in levels[:4]]}...{levels[-1]}")
    return levels


def _check_eta(eta: float) -> None:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise UsageError(f"eta must be in [0, 1] (0: deterministic), got {eta!r}")


def _denoise(denoiser: Denoiser, x: Tensor, sigma: float, labels: Optional[Tensor]) -> Tensor:
    """D(x; sigma) with sigma broadcast to a (B,) tensor on x's device (float64 where it can)."""
    s = torch.full((x.shape[0],), sigma, dtype=coefficient_dtype(x.device), device=x.device)
    return denoiser(x, s) if labels is None else denoiser(x, s, class_labels=labels)


class _Step:
    """What a sigma-space step sees: the denoiser, labels, the generator, the grid's step count
    ``n`` (Heun's churn is S_churn / N) and the previous step's (x0_hat, h) for the multistep
    rules. Passed explicitly from one step to the next (house rule 3); not part of the API."""

    def __init__(self, denoiser: Denoiser, labels: Optional[Tensor],
                 generator: Optional[Generators], n: int) -> None:
        self.denoiser, self.labels, self.generator, self.n = denoiser, labels, generator, n
        self.prev: Optional[tuple[Tensor, float]] = None

    def d(self, x: Tensor, sigma: float) -> Tensor:
        return _denoise(self.denoiser, x, sigma, self.labels)

    def noise(self, like: Tensor) -> Tensor:
        return _gaussian(like, None, self.generator)


def _euler_step(st: _Step, x: Tensor, s: float, s_next: float) -> tuple[Tensor, Tensor]:
    """Euler on dx/dsigma = (x - D) / sigma (Karras et al. eq. 3; Algorithm 1 without Heun)."""
    x0 = st.d(x, s)
    if s_next == 0:
        return x0, x0
    return x + (s_next - s) * ((x - x0) / s), x0


def _heun_step(st: _Step, x: Tensor, s: float, s_next: float, *, s_churn: float, s_tmin: float,
               s_tmax: float, s_noise: float) -> tuple[Tensor, Tensor]:
    """One step of Karras et al. 2022, Algorithm 2 (stochastic Heun).

    gamma = min(S_churn / N, sqrt(2) - 1) if sigma in [S_tmin, S_tmax] else 0; raise the level
    to sigma_hat = (1 + gamma) sigma by adding sqrt(sigma_hat^2 - sigma^2) S_noise z; an Euler
    step to sigma_next; then, unless sigma_next = 0, the trapezoidal (Heun) correction with the
    slope at sigma_next. Returns the x0_hat of the first evaluation (at sigma_hat).
    """
    gamma = min(s_churn / st.n, math.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
    s_hat = s * (1 + gamma)
    if gamma > 0:
        x = x + (math.sqrt(s_hat**2 - s**2) * s_noise) * st.noise(x)
    x0 = st.d(x, s_hat)
    d = (x - x0) / s_hat
    if s_next == 0:
        return x0, x0  # Algorithm 2: the last step is first order (x + (0 - s_hat) d = x0)
    x_next = x + (s_next - s_hat) * d
    d_next = (x_next - st.d(x_next, s_next)) / s_next
    return x + (s_next - s_hat) * (0.5 * d + 0.5 * d_next), x0


def _ancestral_step(st: _Step, x: Tensor, s: float, s_next: float, *,
                    eta: float) -> tuple[Tensor, Tensor]:
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise up to sigma_next.

    sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
    sigma_down = sqrt(sigma_next^2 - sigma_up^2) (k-diffusion's ``get_ancestral_step``). This is
    DDIM's eq. 12/16 in sigma space: eta = 1 is the DDPM posterior step, eta = 0 plain Euler.
    """
    x0 = st.d(x, s)
    if s_next == 0:
        return x0, x0
    s_up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
    s_down = math.sqrt(s_next**2 - s_up**2)
    x_next = x + (s_down - s) * ((x - x0) / s)
    if s_up > 0:
        x_next = x_next + s_up * st.noise(x)
    return x_next, x0


def _dpmpp_2m_sigma_step(st: _Step, x: Tensor, s: float, s_next: float) -> tuple[Tensor, Tensor]:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in sigma space: lambda = -log(sigma),
    h = log(sigma / sigma_next), r = h_prev / h, D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev,
    x_next = (sigma_next / sigma) x - expm1(-h) D; first order on the first step; the step to
    sigma = 0 returns x0_hat (diffusers' ``final_sigmas_type="zero"``)."""
    x0 = st.d(x, s)
    if s_next == 0:
        return x0, x0
    h = math.log(s) - math.log(s_next)
    dd = x0
    if st.prev is not None:
        prev_x0, h_prev = st.prev
        half_inv_r = 0.5 * h / h_prev
        dd = (1 + half_inv_r) * x0 - half_inv_r * prev_x0
    st.prev = (x0, h)
    return (s_next / s) * x - math.expm1(-h) * dd, x0


def _dpmpp_2m_sde_step(st: _Step, x: Tensor, s: float, s_next: float, *,
                       eta: float) -> tuple[Tensor, Tensor]:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 5 / appendix), midpoint form, with k-diffusion's
    ``eta`` (the fraction of the step taken as fresh noise; 1 = the SDE, 0 = DPM++ 2M):

        x_next = (sigma_next / sigma) e^{-eta h} x + (1 - e^{-(1+eta) h}) x0_hat
                 + 1/(2r) (1 - e^{-(1+eta) h}) (x0_hat - x0_hat_prev)
                 + sigma_next sqrt(1 - e^{-2 eta h}) z,
    h = log(sigma / sigma_next), r = h_prev / h (no correction on the first step; the step to
    sigma = 0 returns x0_hat, as diffusers' ``final_sigmas_type="zero"``)."""
    x0 = st.d(x, s)
    if s_next == 0:
        return x0, x0
    h = math.log(s) - math.log(s_next)
    eta_h = eta * h
    c = -math.expm1(-h - eta_h)
    x_next = (s_next / s * math.exp(-eta_h)) * x + c * x0
    if st.prev is not None:
        prev_x0, h_prev = st.prev
        x_next = x_next + (0.5 * c * h / h_prev) * (x0 - prev_x0)
    st.prev = (x0, h)
    if eta > 0:
        x_next = x_next + (s_next * math.sqrt(-math.expm1(-2 * eta_h))) * st.noise(x)
    return x_next, x0


StepFn = Callable[[_Step, Tensor, float, float], tuple[Tensor, Tensor]]


def _chain(step: StepFn, denoiser: Denoiser, x: Tensor, levels: Sequence[float], *,
           class_labels: Optional[Tensor], generator: Optional[Generators],
           callback: Optional[SigmaCallback], stochastic: bool, n: Optional[int] = None,
           after: Optional[Callable[[Tensor, float], Tensor]] = None,
           resample: int = 1) -> Tensor:
    """Run ``step`` along ``levels`` (descending, last 0) from x at levels[0].

    ``after(x, sigma_next)`` post-processes each step's result (inpainting's known region);
    ``resample = r`` repeats each step but the last r times, re-noising from sigma_next back to
    sigma (VE forward process: x + sqrt(sigma^2 - sigma_next^2) z) between repeats (RePaint).
    ``n``: the full grid's step count (Heun's S_churn / N), default len(levels) - 1.
    """
    _check_generator_count(generator, x.shape[0])
    if generator is None and stochastic:
        generator = _fresh_generator(x.device)
    st = _Step(denoiser, class_labels, generator, len(levels) - 1 if n is None else n)
    for i, (s, s_next) in enumerate(zip(levels, levels[1:])):
        repeats = resample if s_next > 0 else 1
        for r in range(repeats):
            x_next, x0_hat = step(st, x, s, s_next)
            if after is not None:
                x_next = after(x_next, s_next)
            if r + 1 < repeats:
                x = x_next + math.sqrt(s**2 - s_next**2) * st.noise(x_next)
        x = x_next
        if callback is not None:
            callback(i, x, x0_hat)
    return x


def sample_euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *,
                 class_labels: Optional[Tensor] = None, generator: Optional[Generators] = None,
                 callback: Optional[SigmaCallback] = None) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, eq. 3), deterministic.

    Args:
        denoiser: ``D(x, sigma, class_labels=None) -> x0_hat`` (e.g. ``schedule.denoiser(net)``).
        x: (B, C, H, W) start at sigmas[0], i.e. ``sigmas[0] * x_T`` for standard normal x_T.
        sigmas: (N + 1,) descending grid ending at 0 (:func:`make_sigmas`).
        class_labels: (B,) labels passed to the denoiser. generator: unused (no noise).
        callback: ``callback(i, x, x0_hat)`` after each step i.

    Returns:
        x at sigma = 0 (the last step returns its x0_hat), (B, C, H, W).
    """
    return _chain(_euler_step, denoiser, x, _check_sigmas(sigmas), class_labels=class_labels,
                  generator=generator, callback=callback, stochastic=False)


def _check_churn(s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> None:
    for name, v in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_tmax", s_tmax),
                    ("s_noise", s_noise)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
            raise UsageError(f"{name} must be a number >= 0, got {v!r}")
    if s_tmin > s_tmax:
        raise UsageError(f"s_tmin ({s_tmin}) is larger than s_tmax ({s_tmax})")


def sample_heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *,
                class_labels: Optional[Tensor] = None, generator: Optional[Generators] = None,
                callback: Optional[SigmaCallback] = None, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = math.inf,
                s_noise: float = 1.0) -> Tensor:
    """Karras et al. 2022, Algorithm 2: Heun's 2nd-order method with optional churn.

    ``s_churn`` = 0 (default) is their deterministic Algorithm 1; with s_churn > 0, steps whose
    sigma lies in [s_tmin, s_tmax] first add noise to raise it by gamma = min(s_churn / N,
    sqrt(2) - 1), scaled by ``s_noise``, drawn from ``generator`` (one, or one per image).
    2 N - 1 network calls (the last step to 0 is Euler). Arguments and result as
    :func:`sample_euler`.
    """
    _check_churn(s_churn, s_tmin, s_tmax, s_noise)

    def step(st: _Step, x: Tensor, s: float, s_next: float) -> tuple[Tensor, Tensor]:
        return _heun_step(st, x, s, s_next, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                          s_noise=s_noise)
    return _chain(step, denoiser, x, _check_sigmas(sigmas), class_labels=class_labels,
                  generator=generator, callback=callback, stochastic=s_churn > 0)


def sample_euler_ancestral(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *,
                           class_labels: Optional[Tensor] = None,
                           generator: Optional[Generators] = None,
                           callback: Optional[SigmaCallback] = None, eta: float = 1.0) -> Tensor:
    """Euler ancestral: each step goes down to sigma_down by Euler and adds fresh noise of std
    sigma_up (see the step's formula; eta = 1 is DDPM's ancestral step in sigma space, eta = 0
    plain Euler). Noise from ``generator``. Arguments and result as :func:`sample_euler`."""
    _check_eta(eta)

    def step(st: _Step, x: Tensor, s: float, s_next: float) -> tuple[Tensor, Tensor]:
        return _ancestral_step(st, x, s, s_next, eta=eta)
    return _chain(step, denoiser, x, _check_sigmas(sigmas), class_labels=class_labels,
                  generator=generator, callback=callback, stochastic=eta > 0)


def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *,
                    class_labels: Optional[Tensor] = None, generator: Optional[Generators] = None,
                    callback: Optional[SigmaCallback] = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) on any sigma grid, deterministic: the
    sigma-space form of :func:`dpmpp_2m_step`. Arguments and result as :func:`sample_euler`."""
    return _chain(_dpmpp_2m_sigma_step, denoiser, x, _check_sigmas(sigmas),
                  class_labels=class_labels, generator=generator, callback=callback,
                  stochastic=False)


def sample_dpmpp_2m_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *,
                        class_labels: Optional[Tensor] = None,
                        generator: Optional[Generators] = None,
                        callback: Optional[SigmaCallback] = None, eta: float = 1.0) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022), midpoint form (diffusers' default
    ``solver_type``), with ``eta`` the share of fresh noise (1: the SDE solver, as diffusers'
    ``algorithm_type="sde-dpmsolver++"``; 0: exactly :func:`sample_dpmpp_2m`). Noise from
    ``generator``. Arguments and result as :func:`sample_euler`."""
    _check_eta(eta)

    def step(st: _Step, x: Tensor, s: float, s_next: float) -> tuple[Tensor, Tensor]:
        return _dpmpp_2m_sde_step(st, x, s, s_next, eta=eta)
    return _chain(step, denoiser, x, _check_sigmas(sigmas), class_labels=class_labels,
                  generator=generator, callback=callback, stochastic=eta > 0)


# ---------------------------------------------------------------------------------------------
# The sampling loop


def _resolve_null_label(model: Callable[..., Tensor], null_label: int | None) -> int:
    if null_label is not None:
        return int(null_label)
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    if isinstance(num_classes, int) and not isinstance(num_classes, bool):
        return num_classes
    raise UsageError("classifier-free guidance needs the 'no label' class index: pass "
                      "null_label=..., or use a model whose config.num_classes is set")


MAX_RESAMPLE = 100
"""The most RePaint repeats of a step: each multiplies the network calls (Lugmayr et al. 2022
used 10); a larger count is a one-line error rather than a run that never ends."""


def _check_editing(x_T: Tensor, init_image: Optional[Tensor], strength: float,
                   mask: Optional[Tensor], resample: int,
                   sampler: str) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Validate the editing arguments of :func:`sample`; return (init, mask) on x_T's device
    and dtype (mask broadcastable to x_T)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or \
            not 0.0 < strength <= 1.0:
        raise UsageError(f"strength must be in (0, 1] (1: start from pure noise), got "
                         f"{strength!r}")
    if isinstance(resample, bool) or not isinstance(resample, int) or resample < 1:
        raise UsageError(f"resample must be an integer >= 1 (1: no RePaint resampling), got "
                         f"{resample!r}")
    if resample > MAX_RESAMPLE:
        raise UsageError(f"resample={resample} is more than {MAX_RESAMPLE} repeats of each step "
                         "(each one more network call per step; RePaint used 10)")
    if init_image is None:
        for name, given in (("strength", strength != 1.0), ("mask", mask is not None),
                            ("resample", resample != 1)):
            if given:
                raise UsageError(f"{name} needs init_image (the image to edit)")
        return None, None
    if not isinstance(init_image, Tensor) or tuple(init_image.shape) != tuple(x_T.shape):
        got = tuple(init_image.shape) if isinstance(init_image, Tensor) else type(init_image)
        raise UsageError(f"init_image must be a tensor shaped like x_T {tuple(x_T.shape)}, "
                         f"got {got}")
    init = init_image.to(device=x_T.device, dtype=x_T.dtype)
    lo, hi = float(init.min()), float(init.max())
    if not (-1.0 - 1e-4 <= lo and hi <= 1.0 + 1e-4):
        raise UsageError(f"init_image must hold values in [-1, 1] (images scaled as the model's "
                         f"data), got values in [{lo:.4g}, {hi:.4g}]")
    if resample > 1 and mask is None:
        raise UsageError("resample > 1 is RePaint's inpainting: it needs mask=")
    if resample > 1 and sampler in MULTISTEP_SAMPLERS:
        raise UsageError(f"resample={resample} needs a one-step sampler (ddpm, ddim, euler, "
                         f"euler-ancestral, heun), not the multistep {sampler}")
    if mask is None:
        return init, None
    B, C, H, W = x_T.shape
    if not isinstance(mask, Tensor) or mask.ndim != 4 or \
            tuple(mask.shape) not in ((B, 1, H, W), (B, C, H, W)):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask)
        raise UsageError(f"mask must be shaped ({B}, 1, {H}, {W}) or ({B}, {C}, {H}, {W}) "
                         f"(1 = keep the init_image pixel, 0 = generate), got {got}")
    m = mask.to(device=x_T.device, dtype=x_T.dtype)
    lo, hi = float(m.min()), float(m.max())
    if not (0.0 <= lo and hi <= 1.0):
        raise UsageError(f"mask must hold values in [0, 1] (1 = keep, 0 = generate), got "
                         f"values in [{lo:.4g}, {hi:.4g}]")
    return init, m


def _keep(mask: Tensor, known: Tensor, x: Tensor) -> Tensor:
    """The known region from ``known``, the rest from ``x`` (mask 1 = known; exact at 0 and 1)."""
    return mask * known + (1 - mask) * x


def sample(model: Callable[..., Tensor], schedule: Any, x_T: Tensor, *,
           sampler: SamplerName = "ddim", num_steps: int = 50, eta: Optional[float] = None,
           spacing: Spacing = "trailing", sigmas: Optional[SigmaGrid] = None, rho: float = 7.0,
           sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
           s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
           s_noise: float = 1.0, class_labels: Optional[Tensor] = None,
           guidance_scale: float = 1.0, null_label: Optional[int] = None,
           clip_x0: Optional[bool] = None, generator: Optional[Generators] = None,
           callback: Optional[StepCallback] = None, init_image: Optional[Tensor] = None,
           strength: float = 1.0, mask: Optional[Tensor] = None, resample: int = 1) -> Tensor:
    """Run the reverse process from ``x_T`` (B, C, H, W) and return the sample x0 (B, C, H, W).

    Two kinds of path, chosen from ``sampler``, ``sigmas`` and the schedule:

    - **integer timesteps** (VP models, ``sampler`` ddpm/ddim/dpmpp-2m with ``sigmas`` None or
      ``"uniform"``): :func:`ddpm_step`, :func:`ddim_step` or :func:`dpmpp_2m_step` over
      ``make_timesteps(T, num_steps, spacing)``, starting from x_T itself.
    - **sigma space** (everything else: euler, heun, euler-ancestral, dpmpp-2m-sde, any
      sampler on a ``karras``/``exponential`` grid, and every sampler on a model whose schedule
      is not a NoiseSchedule but has ``denoiser(model)``, ``sigma_min`` and ``sigma_max``, such
      as an EDM model): the sampler functions above on ``make_sigmas(schedule, num_steps,
      sigmas, rho=rho, spacing=spacing, sigma_min=sigma_min, sigma_max=sigma_max)`` with the
      denoiser ``schedule.denoiser(model)``,
      starting from ``sigmas[0] * x_T``. There ddim runs as Euler ancestral with the same eta
      (eta 0 = Euler), ddpm as Euler ancestral with eta 1 and x0 clipping, dpmpp-2m as
      :func:`sample_dpmpp_2m`: their exact sigma-space equivalents.

    Args:
        model: ``model(x, t)`` or, with labels, ``model(x, t, class_labels=y)``. On the integer
            path ``t`` is an int64 (B,) tensor of original-scale training timesteps; on the
            sigma path with a VP schedule a float (B,) tensor (interpolated timesteps).
        schedule: the schedule the model was trained with (a NoiseSchedule, or e.g. an
            ``EDMSchedule``).
        x_T: standard normal start noise; its device and dtype are used throughout.
        sampler: one of :data:`SAMPLERS` (see docs/samplers.md for the table).
        num_steps: sampler steps (not network calls: :func:`network_calls`).
        eta: step noise of ddim, euler-ancestral and dpmpp-2m-sde in [0, 1]; None: 0 for ddim,
            1 for the other two. Ignored by the samplers without one.
        spacing: which training timesteps the integer path and the ``uniform`` grid visit.
        sigmas: the sigma grid (``karras``, ``exponential``, ``uniform``); None: ``uniform``
            for ddpm/ddim/dpmpp-2m on a VP schedule, ``karras`` otherwise. rho: karras' rho.
        sigma_min, sigma_max: the karras/exponential grid's lowest and highest level (None:
            the model's; see :func:`make_sigmas`).
        s_churn, s_tmin, s_tmax, s_noise: Heun's stochasticity (Karras et al. Algorithm 2).
        class_labels: (B,) int labels for a class-conditional model.
        guidance_scale: classifier-free guidance (Ho & Salimans 2022, eq. 6 with s = 1 + w):
            when not 1, each network call is ONE forward pass on the doubled batch [x, x] with
            labels [class_labels, null_label], combined as uncond + s (cond - uncond) (on the
            model output, or on the denoiser's x0_hat on the sigma path: the same thing, as
            x0_hat is affine in the output). Needs ``class_labels``.
        null_label: the "no label" index; None: ``model.config.num_classes`` when it exists.
        clip_x0: clamp each x0_hat to [-1, 1] (None: only ddpm does).
        generator: source of all noise: one generator, or a list of B where image b's noise
            comes from ``generator[b]`` only. None: a fresh OS-seeded one (when needed).
        callback: ``callback(i, level, x, x0_hat)`` after step i (0-based; once per step
            whatever the network calls per step); ``level`` is the step's timestep t (int) on
            the integer path and its starting sigma (float) on the sigma path; x is the state
            after the step (VP scaling, resp. VE scaling x0 + sigma n).
        init_image: (B, C, H, W) in [-1, 1]: edit this image (SDEdit, Meng et al. 2022). The
            first ``num_steps - int(num_steps * strength)`` steps of the full grid are skipped
            (diffusers' img2img rule) and sampling starts from init_image noised to the first
            kept level with x_T as the noise. strength: in (0, 1].
        mask: (B, 1, H, W) or (B, C, H, W) in [0, 1], 1 = keep the init_image pixel, 0 =
            generate (inpainting). After every step to a level, the known region is replaced by
            init_image noised to that level with fresh noise from ``generator`` (VP:
            sqrt(ab) x0 + sqrt(1 - ab) z; sigma space: x0 + sigma z); at the end it is
            init_image itself.
        resample: RePaint (Lugmayr et al. 2022): each step but the last is done ``resample``
            times, re-noising from its target level back to its start level in between
            (one-step samplers only; needs mask).

    Returns:
        The result of the last step, which returns x0_hat itself (to t = -1, alpha_bar = 1, or
        to sigma = 0): in [-1, 1] exactly when x0_hat was clipped; not clamped otherwise.
    """
    eta_sampler = sampler in ETA_SAMPLERS
    if eta is None:
        eta = 1.0 if sampler in ETA_ONE_SAMPLERS else 0.0
    # eta belongs to three samplers; the others ignore it (as documented above)
    check_sampling({k: k for k in ("sampler", "num_steps", "eta", "spacing", "guidance_scale")},
                   sampler=sampler, num_steps=num_steps, eta=eta if eta_sampler else 0.0,
                   spacing=spacing, guidance_scale=guidance_scale, error=UsageError)
    if not eta_sampler:
        eta = 0.0
    if sigmas is not None and sigmas not in SIGMA_GRIDS:
        raise UsageError(f"unknown sigma grid {sigmas!r}; choose one of "
                         f"{', '.join(repr(g) for g in SIGMA_GRIDS)}")
    _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    if s_churn != 0 and sampler != "heun":
        raise UsageError(f"s_churn only applies to sampler='heun' (got s_churn={s_churn} with "
                         f"{sampler!r})")
    vp = isinstance(schedule, NoiseSchedule)
    if not vp and not all(hasattr(schedule, a) for a in ("denoiser", "sigma_min", "sigma_max")):
        raise UsageError(f"schedule must be a NoiseSchedule or have denoiser(model), sigma_min "
                         f"and sigma_max (an EDM schedule), got {type(schedule).__name__}")
    grid = sigmas if sigmas is not None else (
        "uniform" if vp and sampler in INTEGER_SAMPLERS else "karras")
    if grid == "uniform" and (sigma_min is not None or sigma_max is not None):
        raise UsageError(f"sigma_min/sigma_max set the karras and exponential grids' range; "
                         f"{sampler} runs on uniform training timesteps here (pass "
                         f"sigmas='karras' or 'exponential', or drop sigma_min/sigma_max)")
    init, m = _check_editing(x_T, init_image, strength, mask, resample, sampler)
    guided = guidance_scale != 1.0
    if guided and class_labels is None:
        raise UsageError(f"guidance_scale={guidance_scale} needs class_labels (classifier-free "
                          "guidance mixes conditional and unconditional predictions); use "
                          "guidance_scale=1 for an unconditional model")
    B = x_T.shape[0]
    labels = None if class_labels is None else class_labels.to(x_T.device, torch.long)
    if labels is not None and guided:
        null = torch.full_like(labels, _resolve_null_label(model, null_label))
        labels = torch.cat([labels, null])
    _check_generator_count(generator, B)
    stochastic = (sampler == "ddpm" or eta > 0 or s_churn > 0 or m is not None)
    if generator is None and stochastic:
        generator = _fresh_generator(x_T.device)
    kept = num_steps if init is None else int(num_steps * strength)
    if kept < 1:
        raise UsageError(f"strength={strength} with num_steps={num_steps} keeps no step "
                         f"(int(num_steps * strength) = 0); raise strength or num_steps")
    with torch.no_grad():
        if vp and sampler in INTEGER_SAMPLERS and grid == "uniform":
            return _sample_timesteps(model, schedule, x_T, sampler=sampler, num_steps=num_steps,
                                     kept=kept, eta=eta, spacing=spacing, labels=labels,
                                     guidance_scale=guidance_scale, clip_x0=clip_x0,
                                     generator=generator, callback=callback, init=init, mask=m,
                                     resample=resample)
        return _sample_sigmas(model, schedule, x_T, sampler=sampler, num_steps=num_steps,
                              kept=kept, eta=eta, grid=grid, rho=rho, spacing=spacing,
                              sigma_range=(sigma_min, sigma_max),
                              churn=(s_churn, s_tmin, s_tmax, s_noise), labels=labels,
                              guidance_scale=guidance_scale, clip_x0=clip_x0,
                              generator=generator, callback=callback, init=init, mask=m,
                              resample=resample)


def _sample_timesteps(model: Callable[..., Tensor], schedule: NoiseSchedule, x_T: Tensor, *,
                      sampler: str, num_steps: int, kept: int, eta: float, spacing: Spacing,
                      labels: Optional[Tensor], guidance_scale: float, clip_x0: Optional[bool],
                      generator: Optional[Generators], callback: Optional[StepCallback],
                      init: Optional[Tensor], mask: Optional[Tensor], resample: int) -> Tensor:
    """:func:`sample`'s integer-timestep path (VP models; ddpm, ddim, dpmpp-2m)."""
    timesteps = make_timesteps(schedule.num_train_timesteps, num_steps, spacing).tolist()
    timesteps = timesteps[num_steps - kept:]
    guided = guidance_scale != 1.0
    B = x_T.shape[0]
    prev_x0_hat: Optional[Tensor] = None  # dpmpp-2m's memory of the previous step
    prev_t: Optional[int] = None

    x = x_T if init is None else schedule.add_noise(init, x_T, timesteps[0])
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        t_batch = torch.full((B,), t, dtype=torch.long, device=x.device)
        repeats = resample if t_prev != -1 else 1
        for r in range(repeats):
            if guided:
                both = model(torch.cat([x, x]), torch.cat([t_batch, t_batch]),
                             class_labels=labels)
                cond, uncond = both.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            elif labels is not None:
                out = model(x, t_batch, class_labels=labels)
            else:
                out = model(x, t_batch)
            if sampler == "ddpm":
                x_next, x0_hat = ddpm_step(schedule, out, t, t_prev, x, generator=generator,
                                           clip_x0=True if clip_x0 is None else clip_x0)
            elif sampler == "dpmpp-2m":
                x_next, x0_hat = dpmpp_2m_step(schedule, out, t, t_prev, x,
                                               prev_x0_hat=prev_x0_hat, prev_t=prev_t,
                                               clip_x0=bool(clip_x0))
                prev_x0_hat, prev_t = x0_hat, t
            else:
                x_next, x0_hat = ddim_step(schedule, out, t, t_prev, x, eta=eta,
                                           generator=generator if eta > 0 else None,
                                           clip_x0=False if clip_x0 is None else clip_x0)
            if mask is not None:
                assert init is not None
                known = init if t_prev == -1 else \
                    schedule.add_noise(init, _gaussian(x, None, generator), t_prev)
                x_next = _keep(mask, known, x_next)
            if r + 1 < repeats:
                # back from t_prev to t: q(x_t | x_t_prev) = N(sqrt(a') x, (1 - a') I),
                # a' = ab_t / ab_prev (DDPM eq. 2 for the respaced chain; RePaint eq. 8)
                a_step = schedule.alpha_bar(t) / schedule.alpha_bar(t_prev)
                z = _gaussian(x_next, None, generator)
                x = _coef(a_step.sqrt(), x_next) * x_next + _coef((1 - a_step).sqrt(), z) * z
        x = x_next
        if callback is not None:
            callback(i, t, x, x0_hat)
    return x


def _sample_sigmas(model: Callable[..., Tensor], schedule: Any, x_T: Tensor, *, sampler: str,
                   num_steps: int, kept: int, eta: float, grid: str, rho: float,
                   spacing: Spacing, sigma_range: tuple[Optional[float], Optional[float]],
                   churn: tuple[float, float, float, float],
                   labels: Optional[Tensor], guidance_scale: float, clip_x0: Optional[bool],
                   generator: Optional[Generators], callback: Optional[StepCallback],
                   init: Optional[Tensor], mask: Optional[Tensor], resample: int) -> Tensor:
    """:func:`sample`'s sigma-space path (every sampler; any schedule with a denoiser)."""
    levels = make_sigmas(schedule, num_steps, grid, rho=rho, spacing=spacing,
                         sigma_min=sigma_range[0], sigma_max=sigma_range[1]).tolist()
    levels = levels[num_steps - kept:]
    base = schedule.denoiser(model)
    clip = sampler == "ddpm" if clip_x0 is None else bool(clip_x0)
    guided = guidance_scale != 1.0

    def denoiser(x: Tensor, sigma: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        # class_labels is the caller's (B,) labels; with guidance the doubled labels are used
        if guided:
            both = base(torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=labels)
            cond, uncond = both.chunk(2)
            x0_hat = uncond + guidance_scale * (cond - uncond)
        else:
            x0_hat = base(x, sigma) if labels is None else base(x, sigma, class_labels=labels)
        return x0_hat.clamp(-1.0, 1.0) if clip else x0_hat

    if sampler == "heun":
        s_churn, s_tmin, s_tmax, s_noise = churn

        def step(st: _Step, x: Tensor, s: float, s_next: float) -> tuple[Tensor, Tensor]:
            return _heun_step(st, x, s, s_next, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                              s_noise=s_noise)
    elif sampler in ("dpmpp-2m", "dpmpp-2m-sde"):
        def step(st: _Step, x: Tensor, s: float, s_next: float) -> tuple[Tensor, Tensor]:
            if sampler == "dpmpp-2m" or eta == 0:
                return _dpmpp_2m_sigma_step(st, x, s, s_next)
            return _dpmpp_2m_sde_step(st, x, s, s_next, eta=eta)
    else:  # euler; ddim = euler ancestral with its eta; ddpm = euler ancestral with eta 1
        a_eta = {"euler": 0.0, "ddpm": 1.0}.get(sampler, eta)

        def step(st: _Step, x: Tensor, s: float, s_next: float) -> tuple[Tensor, Tensor]:
            if a_eta == 0:
                return _euler_step(st, x, s, s_next)
            return _ancestral_step(st, x, s, s_next, eta=a_eta)

    after = None
    if mask is not None:
        assert init is not None
        gen = generator

        def after(x: Tensor, s_next: float) -> Tensor:
            known = init if s_next == 0 else init + s_next * _gaussian(x, None, gen)
            return _keep(mask, known, x)

    x = levels[0] * x_T if init is None else init + levels[0] * x_T
    sig_cb = None if callback is None else \
        (lambda i, x, x0_hat: callback(i, levels[i], x, x0_hat))
    return _chain(step, denoiser, x, levels, class_labels=None, generator=generator,
                  callback=sig_cb, stochastic=generator is not None, n=num_steps,
                  after=after, resample=resample)
