"""Timestep spacing, the DDPM/DDIM step rules and the sampling loop.

diffusers (a dev dependency) is the reference implementation the step rules are compared with.
Two kinds of comparison are made:

- float64: diffusers' float32 tables are swapped for ours (float64), so both sides do the same
  maths in float64 and must agree to ~1e-10; this checks the formulas themselves, at every
  respacing including all 1000 steps.
- float32, as diffusers ships: agreement to float32 rounding for respaced sampling (50 steps).
  With all 1000 steps diffusers' float32 ``1 - ab_t / ab_prev`` keeps only ~3 digits of the tiny
  per-step beta at small t (we form it in float64), so there the float32 results differ by up
  to ~3e-4; that case is covered by the float64 comparison instead.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffunet.config import ScheduleConfig
from diffunet.diffusion import NoiseSchedule
from diffunet.errors import ConfigError
from diffunet.schedulers import ddim_step, ddpm_step, make_timesteps, sample

DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}
SHAPE = (2, 3, 4, 4)


def make(prediction_type: str = "epsilon", **kw) -> NoiseSchedule:
    return NoiseSchedule(ScheduleConfig(prediction_type=prediction_type, **kw))


def pairs(timesteps: list[int]) -> list[tuple[int, int]]:
    """(t, t_prev) for each step of a descending timestep list; t_prev = -1 on the last step."""
    return list(zip(timesteps, timesteps[1:] + [-1]))


def randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# make_timesteps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_make_timesteps_matches_diffusers(spacing):
    diffusers = pytest.importorskip("diffusers")
    cases = [(1000, n) for n in (1, 2, 3, 7, 10, 20, 25, 50, 64, 100, 250, 999, 1000)]
    cases += [(100, n) for n in (1, 3, 10, 33, 50, 100)] + [(37, 5), (37, 37)]
    for T, n in cases:
        ours = make_timesteps(T, n, spacing)
        assert ours.dtype == torch.int64 and ours.shape == (n,)
        for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
            ref = cls(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=0)
            ref.set_timesteps(n)
            assert ours.tolist() == ref.timesteps.tolist(), (cls.__name__, T, n)


def test_make_timesteps_shapes_and_ranges():
    for T, n in [(1000, 50), (1000, 1000), (10, 3), (2, 1)]:
        for spacing in ("leading", "trailing", "linspace"):
            ts = make_timesteps(T, n, spacing).tolist()
            assert len(ts) == n and ts == sorted(set(ts), reverse=True)  # strictly descending
            assert 0 <= ts[-1] and ts[0] <= T - 1
        assert make_timesteps(T, n, "trailing")[0] == T - 1
        assert make_timesteps(T, n, "leading")[-1] == 0
    assert make_timesteps(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert make_timesteps(1000, 4, "leading").tolist() == [750, 500, 250, 0]
    assert make_timesteps(1000, 4, "linspace").tolist() == [999, 666, 333, 0]
    assert make_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))


def test_make_timesteps_is_exact_where_diffusers_float_rounding_is_not():
    # Intentional difference: diffusers computes these in floating point. For T=100, n=29 its
    # trailing arange overshoots and returns 30 steps; for linspace T=1000, n=27 the midpoint
    # 13 * 999 / 26 = 499.5 is a tie that rounds half-to-even to 500 (diffusers gets 499).
    ts = make_timesteps(100, 29, "trailing")
    assert ts.shape == (29,) and ts[0] == 99
    assert make_timesteps(1000, 27, "linspace")[13] == 500


def test_make_timesteps_errors():
    for n in (0, -1, 1001):
        with pytest.raises(ConfigError, match="num_steps must be between 1 and"):
            make_timesteps(1000, n)
    with pytest.raises(ConfigError, match="spacing 'uniform'.*'leading', 'trailing', 'linspace'"):
        make_timesteps(1000, 10, "uniform")
    with pytest.raises(ConfigError):
        make_timesteps(1000, 2.5)
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        make_timesteps(1000, 0)


# ---------------------------------------------------------------------------------------------
# DDPM step vs diffusers


def _ddpm_ref(diffusers, schedule, prediction_type, clip, spacing, n, dtype,
              variance="fixed_small"):
    ref = diffusers.DDPMScheduler(prediction_type=DIFFUSERS_PREDICTION[prediction_type],
                                  clip_sample=clip, timestep_spacing=spacing, steps_offset=0,
                                  variance_type=variance)
    ref.set_timesteps(n)
    if dtype == torch.float64:  # same maths in float64: swap in our tables
        ref.alphas_cumprod = schedule.alphas_cumprod.clone()
        ref.one = torch.tensor(1.0, dtype=torch.float64)
    return ref


STEP_CASES = [(50, "trailing", torch.float32), (50, "leading", torch.float32),
              (50, "trailing", torch.float64), (1000, "trailing", torch.float64)]


@pytest.mark.parametrize("n,spacing,dtype", STEP_CASES)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
def test_ddpm_step_matches_diffusers(prediction_type, clip, n, spacing, dtype):
    diffusers = pytest.importorskip("diffusers")
    s = make(prediction_type)
    ref = _ddpm_ref(diffusers, s, prediction_type, clip, spacing, n, dtype)
    steps = pairs(ref.timesteps.tolist())
    if n == 1000:
        steps = steps[:3] + steps[500:502] + steps[-3:]
    tol = dict(rtol=0, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5)
    for k, (t, t_prev) in enumerate(steps):
        xt, out = randn(*SHAPE, seed=2 * k, dtype=dtype), randn(*SHAPE, seed=2 * k + 1, dtype=dtype)
        out = out * 3  # large enough that clipping x0_hat matters
        # diffusers draws randn(shape, generator) when t > 0: reproduce that draw as noise=.
        expected = ref.step(out, t, xt, generator=torch.Generator().manual_seed(k))
        z = randn(*SHAPE, seed=k, dtype=dtype)
        x_prev, x0_hat = ddpm_step(s, out, t, t_prev, xt, noise=z, clip_x0=clip)
        assert x_prev.dtype == dtype
        torch.testing.assert_close(x0_hat, expected.pred_original_sample, **tol)
        # (diffusers adds 1e-10 * z at a respaced last step with t > 0; we add none: within tol)
        torch.testing.assert_close(x_prev, expected.prev_sample, **tol)


def test_ddpm_fixed_large_matches_diffusers_except_respaced_last_step():
    diffusers = pytest.importorskip("diffusers")
    s = make()
    for spacing in ("leading", "trailing"):
        ref = _ddpm_ref(diffusers, s, "epsilon", True, spacing, 20, torch.float64, "fixed_large")
        for k, (t, t_prev) in enumerate(pairs(ref.timesteps.tolist())):
            xt, out = randn(*SHAPE, seed=k, dtype=torch.float64), randn(*SHAPE, seed=99 + k,
                                                                          dtype=torch.float64)
            expected = ref.step(out, t, xt, generator=torch.Generator().manual_seed(k)).prev_sample
            x_prev, x0_hat = ddpm_step(s, out, t, t_prev, xt, variance="fixed_large",
                                       noise=randn(*SHAPE, seed=k, dtype=torch.float64))
            if t_prev == -1 and t > 0:
                # Intentional difference: diffusers adds noise whenever t > 0, so with trailing
                # spacing (last t = 49 here) its fixed_large last step adds sqrt(1 - ab_t) z.
                # DDPM's last step is noiseless (Algorithm 2); ours returns x0_hat.
                assert spacing == "trailing"
                torch.testing.assert_close(x_prev, x0_hat, rtol=0, atol=0)
                assert not torch.allclose(expected, x_prev)
            else:
                torch.testing.assert_close(x_prev, expected, rtol=0, atol=1e-9)


def test_dynamic_threshold_matches_diffusers_and_imagen():
    diffusers = pytest.importorskip("diffusers")
    s = make()
    # diffusers caps s at sample_max_value (default 1.0, which makes it static clipping); Imagen
    # has no cap, so lift it out of the way.
    ref = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9,
                                  sample_max_value=1e6)
    ref.alphas_cumprod = s.alphas_cumprod.clone()
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    xt = randn(*SHAPE, seed=0, dtype=torch.float64)
    out = randn(*SHAPE, seed=1, dtype=torch.float64) * 4
    t = 700  # x0_hat = (xt - sqrt(1-ab) out)/sqrt(ab) reaches |x0_hat| >> 1 here
    expected = ref.step(out, t, xt, generator=torch.Generator().manual_seed(5))
    z = randn(*SHAPE, seed=5, dtype=torch.float64)
    x_prev, x0_hat = ddpm_step(s, out, t, t - 1, xt, noise=z, dynamic_threshold=0.9)
    torch.testing.assert_close(x0_hat, expected.pred_original_sample, rtol=0, atol=1e-12)
    torch.testing.assert_close(x_prev, expected.prev_sample, rtol=0, atol=1e-12)
    # by hand: per sample, s = 90th percentile of |x0|; result in [-1, 1]; a sample already
    # inside [-1, 1] (s clamped to 1) is untouched.
    raw, _ = s.split_output(xt, t, out)
    q = torch.quantile(raw.reshape(2, -1).abs(), 0.9, dim=1).clamp(min=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(x0_hat, raw.clamp(-q, q) / q)
    assert x0_hat.abs().max() <= 1
    small = torch.full(SHAPE, 0.5, dtype=torch.float64)
    _, x0 = ddim_step(make("x0"), small, 10, 5, xt, dynamic_threshold=0.995)
    torch.testing.assert_close(x0, small, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="dynamic_threshold"):
        ddpm_step(s, out, t, t - 1, xt, dynamic_threshold=99.5)


# ---------------------------------------------------------------------------------------------
# DDIM step vs diffusers


@pytest.mark.parametrize("n,spacing,dtype", STEP_CASES)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
def test_ddim_step_matches_diffusers(prediction_type, clip, n, spacing, dtype):
    diffusers = pytest.importorskip("diffusers")
    s = make(prediction_type)
    ref = diffusers.DDIMScheduler(prediction_type=DIFFUSERS_PREDICTION[prediction_type],
                                  clip_sample=clip, set_alpha_to_one=True,
                                  timestep_spacing=spacing, steps_offset=0)
    ref.set_timesteps(n)
    if dtype == torch.float64:
        ref.alphas_cumprod = s.alphas_cumprod.clone()
        ref.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    # diffusers' DDIM takes t_prev = t - T // n: the same as our pairs for these spacings with
    # T divisible by n (it is not for trailing with, e.g., n = 3, where diffusers' own
    # set_timesteps gives 999, 666, 332 but its step goes 999 -> 666 -> 333).
    steps = pairs(ref.timesteps.tolist())
    assert all(t - tp == 1000 // n for t, tp in steps[:-1]) and steps[-1][0] - 1000 // n < 0
    if n == 1000:
        steps = steps[:3] + steps[500:502] + steps[-3:]
    tol = dict(rtol=0, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5)
    for eta in (0.0, 0.5, 1.0):
        for k, (t, t_prev) in enumerate(steps):
            xt = randn(*SHAPE, seed=k, dtype=dtype)
            out = 3 * randn(*SHAPE, seed=50 + k, dtype=dtype)
            z = randn(*SHAPE, seed=100 + k, dtype=dtype)
            # We re-derive eps from the clipped x0 (diffusers' use_clipped_model_output=True).
            expected = ref.step(out, t, xt, eta=eta, variance_noise=z,
                                use_clipped_model_output=clip)
            x_prev, x0_hat = ddim_step(s, out, t, t_prev, xt, eta=eta, noise=z, clip_x0=clip)
            torch.testing.assert_close(x0_hat, expected.pred_original_sample, **tol)
            torch.testing.assert_close(x_prev, expected.prev_sample, **tol)


# ---------------------------------------------------------------------------------------------
# Relations between the rules


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
def test_ddim_eta_one_is_ddpm_fixed_small(prediction_type, clip):
    s = make(prediction_type)
    # step level, respaced and unrespaced, the same explicit noise
    for t, t_prev in [(999, 979), (500, 499), (20, 0), (1, 0), (0, -1), (19, -1)]:
        xt = randn(*SHAPE, seed=t, dtype=torch.float64)
        out = 3 * randn(*SHAPE, seed=t + 1, dtype=torch.float64)
        z = randn(*SHAPE, seed=t + 2, dtype=torch.float64)
        a = ddpm_step(s, out, t, t_prev, xt, noise=z, clip_x0=clip)
        b = ddim_step(s, out, t, t_prev, xt, eta=1.0, noise=z, clip_x0=clip)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("clip", [True, False])
def test_full_ddim_eta_one_sampling_is_ddpm_sampling(clip):
    """All T steps, same generator seed: DDIM(eta=1) and DDPM(fixed_small) give the same images."""
    s = make()

    def model(x, t):  # deterministic but t- and x-dependent "noise prediction"
        return torch.sin(3 * x + t.view(-1, 1, 1, 1) / 250)

    x_T = randn(*SHAPE, seed=0, dtype=torch.float64)
    a = sample(model, s, x_T, sampler="ddpm", num_steps=1000, clip_x0=clip,
               generator=torch.Generator().manual_seed(1))
    b = sample(model, s, x_T, sampler="ddim", eta=1.0, num_steps=1000, clip_x0=clip,
               generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_ddim_eta_zero_is_deterministic_and_draws_nothing():
    s = make()
    xt, out = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1)
    a = ddim_step(s, out, 500, 480, xt, noise=randn(*SHAPE, seed=2))
    b = ddim_step(s, out, 500, 480, xt, noise=randn(*SHAPE, seed=3))
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    c = ddim_step(s, out, 500, 480, xt, generator=g)
    assert torch.equal(g.get_state(), state)
    for other in (b, c):
        assert torch.equal(a[0], other[0]) and torch.equal(a[1], other[1])


@pytest.mark.parametrize("rule", [ddpm_step, ddim_step])
def test_last_step_returns_x0_hat_without_noise(rule):
    s = make("v")
    xt, out = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    kw = {"eta": 1.0} if rule is ddim_step else {}
    x_prev, x0_hat = rule(s, out, 37, -1, xt, generator=g, **kw)
    assert torch.equal(g.get_state(), state)  # nothing drawn
    torch.testing.assert_close(x_prev, x0_hat, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rule", [ddpm_step, ddim_step])
def test_batched_timesteps_equal_per_sample_steps(rule):
    s = make("x0")
    xt, out, z = randn(3, 2, 4, 4, seed=0), randn(3, 2, 4, 4, seed=1), randn(3, 2, 4, 4, seed=2)
    t, t_prev = torch.tensor([999, 500, 3]), torch.tensor([979, 400, -1])
    kw = {"eta": 0.7} if rule is ddim_step else {}
    x_prev, x0_hat = rule(s, out, t, t_prev, xt, noise=z, **kw)
    for i in range(3):
        a, b = rule(s, out[i:i + 1], int(t[i]), int(t_prev[i]), xt[i:i + 1], noise=z[i:i + 1], **kw)
        torch.testing.assert_close(x_prev[i:i + 1], a, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x0_hat[i:i + 1], b, rtol=1e-6, atol=1e-6)
    # 0-d tensors work like ints
    a = rule(s, out, torch.tensor(500), torch.tensor(480), xt, noise=z, **kw)
    b = rule(s, out, 500, 480, xt, noise=z, **kw)
    assert torch.equal(a[0], b[0])


def test_step_rule_argument_errors():
    s = make()
    xt, out = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1)
    with pytest.raises(ConfigError, match="variance"):
        ddpm_step(s, out, 10, 9, xt, variance="learned")
    with pytest.raises(ConfigError, match="eta"):
        ddim_step(s, out, 10, 9, xt, eta=1.5)
    with pytest.raises(ConfigError, match="not both"):
        ddpm_step(s, out, 10, 9, xt, noise=out, generator=torch.Generator())
    with pytest.raises(ConfigError, match="t_prev"):
        ddim_step(s, out, 10, 10, xt)
    with pytest.raises(ValueError, match="noise has shape"):
        ddpm_step(s, out, 10, 9, xt, noise=out[:1])


# ---------------------------------------------------------------------------------------------
# Randomness, devices and dtypes


def test_cpu_generator_with_float64_input():
    s = make()
    xt, out = randn(*SHAPE, seed=0, dtype=torch.float64), randn(*SHAPE, seed=1, dtype=torch.float64)
    x_prev, x0_hat = ddpm_step(s, out, 10, 9, xt, generator=torch.Generator().manual_seed(7))
    assert x_prev.dtype == x0_hat.dtype == torch.float64
    expected, _ = ddpm_step(s, out, 10, 9, xt, noise=randn(*SHAPE, seed=7, dtype=torch.float64))
    assert torch.equal(x_prev, expected)
    x32, _ = ddim_step(s, out.float(), 10, 9, xt.float(), eta=1.0,
                       generator=torch.Generator().manual_seed(7))
    assert x32.dtype == torch.float32
    x64 = sample(lambda x, t: torch.tanh(x), s, xt, sampler="ddpm", num_steps=4,
                 generator=torch.Generator().manual_seed(0))
    assert x64.dtype == torch.float64


def test_no_generator_uses_fresh_entropy_and_leaves_global_rng_alone():
    s = make()
    xt, out = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1)
    state = torch.get_rng_state()
    a, _ = ddpm_step(s, out, 10, 9, xt)
    b, _ = ddpm_step(s, out, 10, 9, xt)
    c = sample(lambda x, t: torch.zeros_like(x), s, xt, sampler="ddpm", num_steps=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(a, b)
    assert c.shape == xt.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_with_cpu_generator_match_cpu():
    s = make("v")
    xt, out = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1)
    t, t_prev = torch.tensor([500, 20]), torch.tensor([480, -1])
    a, _ = ddpm_step(s, out, t, t_prev, xt, generator=torch.Generator().manual_seed(3))
    b, _ = ddpm_step(s, out.cuda(), t.cuda(), t_prev.cuda(), xt.cuda(),
                     generator=torch.Generator().manual_seed(3))  # noise drawn on CPU, moved
    assert b.device.type == "cuda"
    torch.testing.assert_close(b.cpu(), a)
    torch.testing.assert_close(s.add_noise(xt.cuda(), out.cuda(), t.cuda()).cpu(),
                               s.add_noise(xt, out, t))
    model = Recorder()
    c = sample(model, s, xt.cuda(), sampler="ddpm", num_steps=5,
               generator=torch.Generator().manual_seed(0))
    d = sample(Recorder(), s, xt, sampler="ddpm", num_steps=5,
               generator=torch.Generator().manual_seed(0))
    assert c.device.type == "cuda" and all(k["t"].device.type == "cuda" for k in model.calls)
    torch.testing.assert_close(c.cpu(), d, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# sample()


class Recorder:
    """A fake model: records each call, returns a fixed function of (x, t, labels)."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, x, t, **kw):
        self.calls.append({"x": x.clone(), "t": t.clone(), **kw})
        return 0.1 * torch.tanh(x) + (t.view(-1, 1, 1, 1).to(x.dtype) / 1000)


def test_sample_is_reproducible_with_seeded_generators():
    s = make()
    x_T = randn(*SHAPE, seed=0)
    for sampler, eta in (("ddpm", 0.0), ("ddim", 0.5)):
        runs = [sample(Recorder(), s, x_T, sampler=sampler, eta=eta, num_steps=10,
                       generator=torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)]
        assert torch.equal(runs[0], runs[1]), sampler
        assert not torch.allclose(runs[0], runs[2]), sampler
    assert torch.equal(x_T, randn(*SHAPE, seed=0))  # the start noise is not modified


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_sample_calls_model_with_original_timesteps_and_callback(spacing):
    s = make()
    model = Recorder()
    seen = []
    x_T = randn(*SHAPE, seed=0)
    out = sample(model, s, x_T, num_steps=7, spacing=spacing,
                 callback=lambda i, t, x, x0: seen.append((i, t, x.shape, x0.shape)))
    expected = make_timesteps(1000, 7, spacing).tolist()
    assert [c["t"].tolist() for c in model.calls] == [[t, t] for t in expected]
    assert all(c["t"].dtype == torch.int64 and "class_labels" not in c for c in model.calls)
    assert seen == [(i, t, x_T.shape, x_T.shape) for i, t in enumerate(expected)]
    assert out.shape == x_T.shape and out.dtype == x_T.dtype


def test_sample_passes_labels_without_guidance_at_scale_one():
    s = make()
    model = Recorder()
    y = torch.tensor([3, 5])
    sample(model, s, randn(*SHAPE, seed=0), num_steps=4, class_labels=y)
    assert len(model.calls) == 4
    assert all(c["x"].shape[0] == 2 and torch.equal(c["class_labels"], y) for c in model.calls)


@pytest.mark.parametrize("how", ["argument", "model_config"])
def test_classifier_free_guidance_one_doubled_forward(how):
    s = make()
    scale, null = 3.0, 10
    y = torch.tensor([3, 5])

    class LabelModel(Recorder):
        config = type("Config", (), {"num_classes": null})()

        def __call__(self, x, t, class_labels=None):
            super().__call__(x, t, class_labels=class_labels)
            return x * 0 + class_labels.view(-1, 1, 1, 1).to(x.dtype) / 10  # cond 0.3/0.5, uncond 1

    model = LabelModel()
    x_T = randn(*SHAPE, seed=0)
    kw = {"null_label": null} if how == "argument" else {}
    result = sample(model, s, x_T, num_steps=1, class_labels=y, guidance_scale=scale, **kw)
    assert len(model.calls) == 1
    call = model.calls[0]
    assert call["x"].shape[0] == 4 and torch.equal(call["x"], torch.cat([x_T, x_T]))
    assert call["class_labels"].tolist() == [3, 5, null, null]
    assert call["t"].tolist() == [999] * 4
    cond, uncond = torch.tensor([0.3, 0.5]).view(-1, 1, 1, 1), 1.0
    guided = (uncond + scale * (cond - uncond)).expand(SHAPE)  # Ho & Salimans eq. 6
    expected, _ = ddim_step(s, guided, 999, -1, x_T)
    torch.testing.assert_close(result, expected)


def test_guidance_errors():
    s = make()
    x_T = randn(*SHAPE, seed=0)
    with pytest.raises(ConfigError, match="class_labels"):
        sample(Recorder(), s, x_T, num_steps=2, guidance_scale=2.0)
    with pytest.raises(ConfigError, match="null_label"):
        sample(Recorder(), s, x_T, num_steps=2, guidance_scale=2.0,
               class_labels=torch.tensor([0, 1]))


def test_unknown_sampler_names_the_valid_ones():
    with pytest.raises(ConfigError, match="'ddpm', 'ddim'"):
        sample(Recorder(), make(), randn(*SHAPE, seed=0), sampler="euler")


def test_sample_result_is_clipped_only_when_the_rule_clips():
    s = make("x0")
    x_T = randn(*SHAPE, seed=0)

    def big(x, t):  # predicts x0 = 3 everywhere
        return torch.full_like(x, 3.0)

    assert sample(big, s, x_T, sampler="ddpm", num_steps=5, generator=torch.Generator()).max() == 1
    torch.testing.assert_close(sample(big, s, x_T, sampler="ddim", num_steps=5),
                               torch.full(SHAPE, 3.0))
    assert sample(big, s, x_T, sampler="ddim", num_steps=5, clip_x0=True).max() == 1


def _exact_moments(schedule, timesteps, mu, sd, sampler):
    """Mean and std of the sampler's output for data N(mu, sd^2) and x_T ~ N(0, 1), exactly.

    With the optimal predictor every step is affine in x, x_prev = A x + c (+ sigma z), so the
    mean and variance propagate in closed form. Written from the papers' formulas (DDIM eq. 12,
    DDPM eq. 7), independently of the code under test.
    """
    m, v = 0.0, 1.0
    for t, tp in pairs(timesteps):
        a = schedule.alphas_cumprod[t].item()
        ap = schedule.alphas_cumprod[tp].item() if tp >= 0 else 1.0
        den = a * sd**2 + 1 - a
        k, e = math.sqrt(a) * sd**2 / den, math.sqrt(1 - a) / den  # slopes of x0_hat, eps_hat
        x0_c = mu - k * math.sqrt(a) * mu  # x0_hat = k x + x0_c;  eps_hat = e (x - sqrt(a) mu)
        if sampler == "ddim":
            A = math.sqrt(ap) * k + math.sqrt(1 - ap) * e
            c = math.sqrt(ap) * x0_c - math.sqrt(1 - ap) * e * math.sqrt(a) * mu
            var = 0.0
        else:
            beta = 1 - a / ap
            c_x0, c_xt = math.sqrt(ap) * beta / (1 - a), math.sqrt(a / ap) * (1 - ap) / (1 - a)
            A, c, var = c_x0 * k + c_xt, c_x0 * x0_c, beta * (1 - ap) / (1 - a)
        m, v = A * m + c, A * A * v + var
    return m, math.sqrt(v)


@pytest.mark.parametrize("sampler,num_steps", [("ddim", 50), ("ddpm", 100)])
def test_sampling_gaussian_data_with_the_optimal_predictor(sampler, num_steps):
    """For x0 ~ N(mu, sd^2) the optimal eps predictor is known in closed form:

    x_t ~ N(sqrt(ab) mu, ab sd^2 + 1 - ab), so
    E[eps | x_t] = Cov(eps, x_t) / Var(x_t) (x_t - E x_t)
                 = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab sd^2 + 1 - ab).
    Sampling with it must give mean ~ mu and std ~ sd.
    """
    mu, sd, N = 0.3, 0.5, 4000
    s = make(beta_schedule="cosine")

    def oracle(x, t):
        ab = s.alpha_bar(t, like=x)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * sd**2 + 1 - ab)

    x_T = randn(N, 1, 1, 1, seed=0, dtype=torch.float64)
    out = sample(oracle, s, x_T, sampler=sampler, num_steps=num_steps, clip_x0=False,
                 generator=torch.Generator().manual_seed(1))
    mean, std = out.mean().item(), out.std().item()
    m_ref, sd_ref = _exact_moments(s, make_timesteps(1000, num_steps).tolist(), mu, sd, sampler)
    # 1) The samples have exactly the moments this discretisation implies, up to sampling error:
    #    standard errors sd/sqrt(N) = 0.008 (mean) and sd/sqrt(2N) = 0.0056 (std); allow 4.5 of
    #    them (false-failure odds ~1e-5; the seeds make the test deterministic anyway). A wrong
    #    coefficient anywhere in the loop would shift these by far more.
    assert abs(mean - m_ref) < 4.5 * sd / math.sqrt(N)
    assert abs(std - sd_ref) < 4.5 * sd / math.sqrt(2 * N)
    # 2) ... and those moments are the data's, up to the samplers' known discretisation bias:
    #    both underestimate the spread with few steps (DDIM 50: -3.1%, DDPM 100: -3.5% here;
    #    each shrinks towards 0 as the step count grows, checked at 1000 steps).
    assert abs(m_ref - mu) < 1e-3 and abs(sd_ref / sd - 1) < 0.05
    assert abs(mean - mu) < 4.5 * sd / math.sqrt(N) + 1e-3
    assert abs(std / sd - 1) < 0.05 + 4.5 / math.sqrt(2 * N)
    m_1000, sd_1000 = _exact_moments(s, list(range(999, -1, -1)), mu, sd, sampler)
    assert abs(m_1000 - mu) < 1e-3 and abs(sd_1000 / sd - 1) < 0.005
