"""Reverse-process step rules (DDPM ancestral, DDIM), timestep respacing and the sampling loop.

Everything here is a pure function of its arguments (house rule 3): no scheduler objects with
state, and all randomness comes through an explicit ``torch.Generator`` or a ``noise=`` tensor.
When a step needs noise and neither is given, it draws from a freshly created generator seeded
from OS entropy (``torch.Generator.seed()``), so the result is random but the global RNG is never
touched. A generator may live on another device than ``xt``: the noise is drawn on the
generator's device, in ``xt``'s dtype, and then moved to ``xt``'s device, so a CPU generator
gives the same images on any accelerator.

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

from typing import Any, Callable, Literal, Optional, Union

import torch
from torch import Tensor

from .diffusion import NoiseSchedule, Timesteps
from .errors import ConfigError

Spacing = Literal["leading", "trailing", "linspace"]
SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")
VARIANCES: tuple[str, ...] = ("fixed_small", "fixed_large")

StepCallback = Callable[[int, int, Tensor, Tensor], Any]


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
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    if T < 1:
        raise ConfigError(f"num_train_timesteps must be positive, got {T}")
    if not 1 <= n <= T:
        raise ConfigError(f"num_steps must be between 1 and num_train_timesteps ({T}), got {n}")
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
        raise ConfigError(f"unknown timestep spacing {spacing!r}; choose one of "
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


def _gaussian(like: Tensor, noise: Tensor | None, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``like``, on its device and in its dtype."""
    if noise is not None:
        if noise.shape != like.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(like.shape)}")
        return noise.to(device=like.device, dtype=like.dtype)
    if generator is None:
        generator = _fresh_generator(like.device)
    z = torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype)
    return z.to(like.device)


def _check_randomness(noise: Tensor | None, generator: torch.Generator | None) -> None:
    if noise is not None and generator is not None:
        raise ConfigError("pass either noise= or generator=, not both")


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
        raise ConfigError(f"t_prev must be smaller than t (t_prev = -1 for the last step), got "
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
            raise ConfigError(f"dynamic_threshold must be a percentile in (0, 1], e.g. 0.995, "
                              f"got {dynamic_threshold}")
        return _dynamic_threshold(x0_hat, dynamic_threshold), True
    if clip_x0:
        return x0_hat.clamp(-1.0, 1.0), True
    return x0_hat, False


# ---------------------------------------------------------------------------------------------
# Step rules


def ddpm_step(schedule: NoiseSchedule, out: Tensor, t: Timesteps, t_prev: Timesteps, xt: Tensor,
              *, noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
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
        noise: the step's standard normal noise (B, C, H, W); else drawn from ``generator``
            (else from a fresh OS-seeded generator). Not drawn at all on the last step.
        variance: ``fixed_small`` = the posterior variance beta~ (DDPM eq. 7), ``fixed_large`` =
            beta' (DDPM sec. 3.2's sigma^2 = beta).
        clip_x0: clamp x0_hat to [-1, 1] before forming the posterior mean (as the DDPM code).
        dynamic_threshold: a percentile such as 0.995 to use Imagen's dynamic thresholding
            instead of static clipping.

    Returns:
        (x_prev, x0_hat), both (B, C, H, W), x0_hat after clipping/thresholding.
    """
    if variance not in VARIANCES:
        raise ConfigError(f"unknown DDPM variance {variance!r}; choose one of "
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
              generator: Optional[torch.Generator] = None, clip_x0: bool = False,
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
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like), "
                          f"got {eta}")
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


# ---------------------------------------------------------------------------------------------
# The sampling loop


def _resolve_null_label(model: Callable[..., Tensor], null_label: int | None) -> int:
    if null_label is not None:
        return int(null_label)
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    if isinstance(num_classes, int) and not isinstance(num_classes, bool):
        return num_classes
    raise ConfigError("classifier-free guidance needs the 'no label' class index: pass "
                      "null_label=..., or use a model whose config.num_classes is set")


def sample(model: Callable[..., Tensor], schedule: NoiseSchedule, x_T: Tensor, *,
           sampler: Literal["ddpm", "ddim"] = "ddim", num_steps: int = 50, eta: float = 0.0,
           spacing: Spacing = "trailing", class_labels: Optional[Tensor] = None,
           guidance_scale: float = 1.0, null_label: Optional[int] = None,
           clip_x0: Optional[bool] = None, generator: Optional[torch.Generator] = None,
           callback: Optional[StepCallback] = None) -> Tensor:
    """Run the reverse process from ``x_T`` (B, C, H, W) and return the sample x0 (B, C, H, W).

    Args:
        model: ``model(x, t)`` or, with labels, ``model(x, t, class_labels=y)``; ``t`` is an int64
            (B,) tensor on ``x``'s device holding original-scale training timesteps.
        schedule: the schedule the model was trained with.
        x_T: the start noise, usually ``torch.randn``; its device and dtype are used throughout.
        sampler: ``"ddim"`` (:func:`ddim_step` with ``eta``) or ``"ddpm"`` (respaced ancestral
            :func:`ddpm_step` with fixed_small variance; ``eta`` is ignored).
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
            does not).
        generator: source of all noise (DDPM, or DDIM with eta > 0). If None, a fresh generator
            seeded from OS entropy is created once for the whole run.
        callback: called as ``callback(i, t, x_prev, x0_hat)`` after step i (t a Python int).

    Returns:
        The x_prev of the last step. That step goes to t_prev = -1 (alpha_bar = 1), where both
        rules return x0_hat itself, so the result lies in [-1, 1] exactly when x0 was clipped
        (ddpm by default); it is not clamped otherwise.
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of "
                          f"{', '.join(repr(s) for s in SAMPLERS)}")
    timesteps = make_timesteps(schedule.num_train_timesteps, num_steps, spacing).tolist()
    guided = guidance_scale != 1.0
    if guided and class_labels is None:
        raise ConfigError(f"guidance_scale={guidance_scale} needs class_labels (classifier-free "
                          "guidance mixes conditional and unconditional predictions); use "
                          "guidance_scale=1 for an unconditional model")
    if sampler == "ddim" and not 0.0 <= eta <= 1.0:
        raise ConfigError(f"eta must be in [0, 1], got {eta}")

    B = x_T.shape[0]
    labels = None if class_labels is None else class_labels.to(x_T.device, torch.long)
    if labels is not None and guided:
        null = torch.full_like(labels, _resolve_null_label(model, null_label))
        labels = torch.cat([labels, null])
    if generator is None and (sampler == "ddpm" or eta > 0):
        generator = _fresh_generator(x_T.device)

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
            else:
                x, x0_hat = ddim_step(schedule, out, t, t_prev, x, eta=eta,
                                      generator=generator if eta > 0 else None,
                                      clip_x0=False if clip_x0 is None else clip_x0)
            if callback is not None:
                callback(i, t, x, x0_hat)
    return x
