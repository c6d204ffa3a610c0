"""The samplers: timestep respacing, the reverse-process step rules (DDPM ancestral, DDIM,
DPM-Solver++(2M)) and the sampling loop :func:`sample`.

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

from collections.abc import Sequence
from typing import Any, Callable, Literal, Optional, Union, get_args

import torch
from torch import Tensor

from .config import SamplerName, Spacing, check_sampling
from .diffusion import NoiseSchedule, Timesteps
from .errors import UsageError

__all__ = ["SAMPLERS", "SPACINGS", "VARIANCES", "Generators", "Spacing", "StepCallback",
           "ddim_step", "ddpm_step", "dpmpp_2m_step", "make_timesteps", "sample"]

SPACINGS: tuple[str, ...] = get_args(Spacing)
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
VARIANCES: tuple[str, ...] = ("fixed_small", "fixed_large")

StepCallback = Callable[[int, int, Tensor, Tensor], Any]
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
# The sampling loop


def _resolve_null_label(model: Callable[..., Tensor], null_label: int | None) -> int:
    if null_label is not None:
        return int(null_label)
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    if isinstance(num_classes, int) and not isinstance(num_classes, bool):
        return num_classes
    raise UsageError("classifier-free guidance needs the 'no label' class index: pass "
                      "null_label=..., or use a model whose config.num_classes is set")


def sample(model: Callable[..., Tensor], schedule: NoiseSchedule, x_T: Tensor, *,
           sampler: SamplerName = "ddim", num_steps: int = 50,
           eta: float = 0.0, spacing: Spacing = "trailing", class_labels: Optional[Tensor] = None,
           guidance_scale: float = 1.0, null_label: Optional[int] = None,
           clip_x0: Optional[bool] = None, generator: Optional[Generators] = None,
           callback: Optional[StepCallback] = None) -> Tensor:
    """Run the reverse process from ``x_T`` (B, C, H, W) and return the sample x0 (B, C, H, W).

    Args:
        model: ``model(x, t)`` or, with labels, ``model(x, t, class_labels=y)``; ``t`` is an int64
            (B,) tensor on ``x``'s device holding original-scale training timesteps.
        schedule: the schedule the model was trained with.
        x_T: the start noise, usually ``torch.randn``; its device and dtype are used throughout.
        sampler: ``"ddim"`` (:func:`ddim_step` with ``eta``), ``"ddpm"`` (respaced ancestral
            :func:`ddpm_step` with fixed_small variance; ``eta`` is ignored) or ``"dpmpp-2m"``
            (:func:`dpmpp_2m_step`, deterministic; ``eta`` is ignored; 10-20 steps suffice).
        num_steps, spacing: which training timesteps to visit (:func:`make_timesteps`).
        class_labels: (B,) int labels for a class-conditional model.
        guidance_scale: classifier-free guidance (Ho & Salimans 2022, eq. 6 with s = 1 + w):
            when not 1, each step makes ONE forward pass on the doubled batch [x, x] with labels
            [class_labels, null_label] and uses out = uncond + s (cond - uncond). Needs
            ``class_labels``.
        null_label: the label index meaning "no label" (what the model was trained on when
            labels were dropped). If None, ``model.config.num_classes`` is used when the model
            has one (the diffunet UNet reserves index ``num_classes`` for "no label"); an
            explicit argument keeps ``sample`` usable with any callable (a wrapped or compiled
            net, a lambda), the fallback keeps the common case short.
        clip_x0: override the rule's clipping of x0_hat (default: ddpm clips to [-1, 1], ddim
            and dpmpp-2m do not).
        generator: source of all noise (DDPM, or DDIM with eta > 0): one generator, or a list
            of B generators where image b's noise comes from ``generator[b]`` only (so image b
            is the same whatever else is in the batch). If None, a fresh generator seeded from
            OS entropy is created once for the whole run.
        callback: called as ``callback(i, t, x_prev, x0_hat)`` after step i (t a Python int).

    Returns:
        The x_prev of the last step. That step goes to t_prev = -1 (alpha_bar = 1), where all
        rules return x0_hat itself, so the result lies in [-1, 1] exactly when x0 was clipped
        (ddpm by default); it is not clamped otherwise.
    """
    # eta is DDIM's alone; the other rules ignore it (as documented above)
    check_sampling({k: k for k in ("sampler", "num_steps", "eta", "spacing", "guidance_scale")},
                   sampler=sampler, num_steps=num_steps, eta=eta if sampler == "ddim" else 0.0,
                   spacing=spacing, guidance_scale=guidance_scale, error=UsageError)
    timesteps = make_timesteps(schedule.num_train_timesteps, num_steps, spacing).tolist()
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
    stochastic = sampler == "ddpm" or (sampler == "ddim" and eta > 0)
    _check_generator_count(generator, B)
    if generator is None and stochastic:
        generator = _fresh_generator(x_T.device)
    prev_x0_hat: Optional[Tensor] = None  # dpmpp-2m's memory of the previous step
    prev_t: Optional[int] = None

    x = x_T
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            t_batch = torch.full((B,), t, dtype=torch.long, device=x.device)
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
                x, x0_hat = ddpm_step(schedule, out, t, t_prev, x, generator=generator,
                                      clip_x0=True if clip_x0 is None else clip_x0)
            elif sampler == "dpmpp-2m":
                x, x0_hat = dpmpp_2m_step(schedule, out, t, t_prev, x, prev_x0_hat=prev_x0_hat,
                                          prev_t=prev_t, clip_x0=bool(clip_x0))
                prev_x0_hat, prev_t = x0_hat, t
            else:
                x, x0_hat = ddim_step(schedule, out, t, t_prev, x, eta=eta,
                                      generator=generator if eta > 0 else None,
                                      clip_x0=False if clip_x0 is None else clip_x0)
            if callback is not None:
                callback(i, t, x, x0_hat)
    return x
