"""Flow matching (rectified flow; Liu et al. 2022, Lipman et al. 2022, Esser et al. 2024): the
formulation's maths, its config rules, sampling on a flow model with every sampler, conformance
with diffusers' flow schedulers, a tiny flow run through train, load, sample, info, eval and
inspect, and export to / import from diffusers.

Conformance with diffusers is checked on the SAME model outputs, in float32 as diffusers' flow
schedulers compute: a fixed, deterministic fake velocity model (which ignores its time input)
drives both our sampler and diffusers' stateful scheduler from the same x_T; the time inputs
our native path hands the model are recorded and compared with the scheduler's ``timesteps``.
Below t = 1 the native rules are also checked, in float64, against the sigma-space rules of
:mod:`diffunet.samplers` on the flow denoiser (the same exponential-integrator steps).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import diffunet
from diffunet import cli, load_model
from diffunet.config import ScheduleConfig, load_config
from diffunet.errors import ConfigError, ModelFileError
from diffunet.formulations import FlowPath, FlowSchedule, flow_grid, make_schedule
from diffunet.formulations.base import StepOptions
from diffunet.formulations.flow import NATIVE_SAMPLERS, shift_time
from diffunet.interop import export_diffusers, import_diffusers, schedule_from_diffusers
from diffunet.samplers import (SAMPLERS, default_grid, make_sigmas, network_calls, sample_dpmpp_2m,
                               sample_dpmpp_2m_sde, sample_euler, sample_euler_ancestral)
from diffunet.training import train
from diffunet.unet import UNet, UNetConfig
from helpers import perturbed, tiny_net, tiny_run

SHAPE = (2, 3, 4, 4)
CLOSE = dict(rtol=1e-5, atol=1e-5)  # float32 on both sides (measured: <= 7.2e-7)


def flow(**kw: Any) -> FlowSchedule:
    schedule = make_schedule(ScheduleConfig(formulation="flow", **kw))
    assert isinstance(schedule, FlowSchedule)
    return schedule


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def fake_velocity(x: torch.Tensor, t: Any, class_labels: Any = None) -> torch.Tensor:
    """A deterministic stand-in velocity network; ignores t (diffusers hands it a 0-d tensor,
    our paths a (B,) one), so both sides get the same outputs for the same x."""
    return 0.3 * x + 0.2 * torch.tanh(x) - 0.1


class Recorder:
    """A model (default fake_velocity) that records the x and the time input of every call."""

    def __init__(self, model: Callable[..., torch.Tensor] = fake_velocity) -> None:
        self.model = model
        self.xs: list[torch.Tensor] = []
        self.times: list[torch.Tensor] = []

    def __call__(self, x, t, class_labels=None):
        self.xs.append(x.clone())
        self.times.append(t.clone())
        return self.model(x, t)

    def time_per_call(self) -> torch.Tensor:
        """One time per call (every image of a call gets the same one)."""
        for t in self.times:
            assert t.shape == (SHAPE[0],) and (t == t[0]).all()
        return torch.stack([t[0] for t in self.times])


@pytest.fixture
def diffusers():
    d = pytest.importorskip("diffusers")
    d.utils.logging.set_verbosity_error()
    return d


# ---------------------------------------------------------------------------------------------
# Conformance with diffusers' flow schedulers, same model outputs, float32


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_train_timesteps", [1000, 500])
@pytest.mark.parametrize("n", [1, 2, 4, 12])
def test_flow_grid_is_flow_match_euler_sigmas_exactly(diffusers, shift, num_train_timesteps, n):
    sch = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps,
                                                    shift=shift)
    sch.set_timesteps(n)
    ours = torch.tensor(flow_grid(n, num_train_timesteps, shift), dtype=torch.float32)
    assert torch.equal(ours, sch.sigmas[:-1]) and sch.sigmas[-1] == 0
    # the uniform sigma grid is the same t as sigma = t / (1 - t), inf at t = 1
    sig = flow(shift=shift, num_train_timesteps=num_train_timesteps).uniform_sigmas(n, "trailing")
    assert math.isinf(sig[0]) and sig[-1] == 0
    torch.testing.assert_close((sig[1:-1] / (1 + sig[1:-1])).float(), ours[1:], rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", [2, 4, 12])
def test_flow_grid_small_end_is_shifted_twice_as_diffusers_does(diffusers, n):
    # FlowMatchEulerDiscreteScheduler shifts the training grid at construction (t_min =
    # s(1/T)) and set_timesteps shifts its linspace again: the last level is s(s(1/T)).
    s, T = 3.0, 1000
    last = flow_grid(n, T, s)[-1]
    assert last == pytest.approx(shift_time(shift_time(1 / T, s), s), rel=1e-6)
    assert last != pytest.approx(shift_time(1 / T, s), rel=1e-2)
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=s)
    sch.set_timesteps(n)
    assert float(sch.sigmas[-2]) == last
    assert flow_grid(n, T, s)[0] == 1.0  # the top, t = 1, is a fixed point of the shift


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 4, 12])
def test_euler_matches_flow_match_euler_and_hands_the_model_its_timesteps(diffusers, shift, n):
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(n)
    x_T = randn(*SHAPE, seed=0)
    x, expected = x_T.clone(), []
    for t in sch.timesteps:
        x = sch.step(fake_velocity(x, t), t, x).prev_sample
        expected.append(x)
    model, states = Recorder(), []
    result = diffunet.sample(model, flow(shift=shift), x_T, sampler="euler", num_steps=n,
                             sigmas="uniform", clip_x0=False,
                             callback=lambda i, level, x_, x0: states.append(x_))
    assert len(states) == len(expected) == n
    for a, b in zip(states, expected):
        torch.testing.assert_close(a, b, **CLOSE)
    torch.testing.assert_close(result, expected[-1], **CLOSE)
    # t x T as float32, the very numbers diffusers' timesteps hold
    assert model.times[0].dtype == torch.float32
    assert torch.equal(model.time_per_call(), sch.timesteps)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 4, 12])
def test_heun_matches_flow_match_heun_with_2n_minus_1_model_calls(diffusers, shift, n):
    sch = diffusers.FlowMatchHeunDiscreteScheduler(shift=shift)
    sch.set_timesteps(n)
    assert len(sch.timesteps) == 2 * n - 1  # the corrector's level listed twice, none at 0
    x_T = randn(*SHAPE, seed=1)
    x = x_T.clone()
    for t in sch.timesteps:
        x = sch.step(fake_velocity(x, t), t, x).prev_sample
    model = Recorder()
    result = diffunet.sample(model, flow(shift=shift), x_T, sampler="heun", num_steps=n,
                             sigmas="uniform", clip_x0=False)
    torch.testing.assert_close(result, x, **CLOSE)
    assert len(model.times) == 2 * n - 1 == network_calls("heun", n)
    assert torch.equal(model.time_per_call(), sch.timesteps)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 4, 12])
@pytest.mark.parametrize("algorithm_type, sampler", [("dpmsolver++", "dpmpp-2m"),
                                                     ("sde-dpmsolver++", "dpmpp-2m-sde")])
def test_dpmpp_2m_and_sde_match_dpm_solver_multistep_with_flow_sigmas(diffusers, shift, n,
                                                                      algorithm_type, sampler):
    # DPMSolverMultistepScheduler(use_flow_sigmas=True): alpha_t = 1 - t, sigma_t = t. Its grid
    # spans 1 - t linearly from s(1 - 1/T), not from t = 1, so our rule runs on its grid.
    sch = diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift,
        algorithm_type=algorithm_type, solver_order=2, solver_type="midpoint")
    sch.set_timesteps(n)
    levels = [float(v) for v in sch.sigmas[:-1]]
    assert levels[0] == pytest.approx(shift_time(1 - 1 / 1000, shift), rel=1e-6)
    assert levels[0] < 1 and sch.sigmas[-1] == 0
    x_T = randn(*SHAPE, seed=2)
    # our SDE draws one randn per step but the last from its generator; diffusers one per step
    # call (its last, after ours, is multiplied by t = 0): the same numbers
    g = torch.Generator().manual_seed(11)
    x, expected = x_T.clone(), []
    for t in sch.timesteps:
        x = sch.step(fake_velocity(x, t), t, x, generator=g).prev_sample
        expected.append(x)
    eta = 1.0 if sampler == "dpmpp-2m-sde" else 0.0  # the step noise of each rule
    path = FlowPath(fake_velocity, flow(shift=shift), StepOptions(sampler, n, eta=eta),
                    torch.Generator().manual_seed(11), levels=levels)
    x = x_T.clone()
    for i in range(n):
        x, _ = path.step(x, i)
        torch.testing.assert_close(x, expected[i], **CLOSE)
    if sampler == "dpmpp-2m-sde" and n > 1:  # the noise is there: another seed, other images
        other = FlowPath(fake_velocity, flow(shift=shift), StepOptions(sampler, n, eta=eta),
                         torch.Generator().manual_seed(12), levels=levels)
        y = x_T.clone()
        for i in range(n):
            y, _ = other.step(y, i)
        assert (y - x).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# Sampling a flow model


@pytest.mark.parametrize("sampler", NATIVE_SAMPLERS)
def test_the_native_path_starts_at_t_1_from_x_T_itself(sampler):
    model = Recorder()
    x_T = randn(*SHAPE, seed=3)
    diffunet.sample(model, flow(shift=3.0), x_T, sampler=sampler, num_steps=3,
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.xs[0], x_T)
    assert model.times[0].tolist() == [1000.0, 1000.0]


def test_every_sampler_defaults_to_the_uniform_grid_on_a_flow_model():
    schedule = flow()
    assert set(SAMPLERS) == set(NATIVE_SAMPLERS)
    for sampler in SAMPLERS:
        assert default_grid(schedule, sampler) == "uniform", sampler
        assert default_grid(FlowSchedule, sampler) == "uniform", sampler


def test_the_denoiser_view_is_x_t_minus_t_v_at_x_t_equal_x_over_1_plus_sigma():
    # x = x0 + sigma n is x_t / (1 - t) with sigma = t / (1 - t): D(x; sigma) = x_t - t v
    schedule = flow(shift=3.0)
    model = Recorder()
    x = randn(*SHAPE, seed=5).double()
    sigma = torch.tensor([0.25, 9.0], dtype=torch.float64)
    d = schedule.denoiser(model)(x, sigma)
    t = (sigma / (1 + sigma)).view(-1, 1, 1, 1)  # 0.2 and 0.9
    x_t = x * (1 - t)
    torch.testing.assert_close(model.xs[0], x_t, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(model.times[0], torch.tensor([200.0, 900.0], dtype=torch.float64),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(d, x_t - t * fake_velocity(x_t, None), rtol=1e-12, atol=1e-12)


SIGMA_RULES = {  # sampler: (its sigma-space function, its keywords, the native path's eta)
    "euler": (sample_euler, {}, 0.0),
    "ddim": (sample_euler_ancestral, {"eta": 0.5}, 0.5),
    "euler-ancestral": (sample_euler_ancestral, {"eta": 1.0}, 1.0),
    "ddpm": (sample_euler_ancestral, {"eta": 1.0}, 1.0),
    "dpmpp-2m": (sample_dpmpp_2m, {}, 0.0),
    "dpmpp-2m-sde": (sample_dpmpp_2m_sde, {"eta": 1.0}, 1.0),
}


@pytest.mark.parametrize("sampler", SIGMA_RULES)
def test_native_rules_below_t_1_are_the_sigma_space_rules_on_the_flow_denoiser(sampler):
    # DDIM (= Euler at eta 0) and DPM-Solver++ are exponential integrators, the same step in
    # any scaling: in t on x_t = (1 - t) x (native) and in sigma = t / (1 - t) on x (Karras).
    schedule, n = flow(shift=3.0), 6
    levels = flow_grid(n + 1, 1000, 3.0)[1:]  # below t = 1, where the sigma grid is finite
    sigmas = torch.tensor([t / (1 - t) for t in levels] + [0.0], dtype=torch.float64)
    fn, kw, eta = SIGMA_RULES[sampler]
    x_t = randn(*SHAPE, seed=6).double()
    path = FlowPath(fake_velocity, schedule, StepOptions(sampler, n, eta=eta),
                    torch.Generator().manual_seed(3), levels=levels)
    ours, x = [], x_t
    for i in range(n):
        x, _ = path.step(x, i)
        ours.append(x)
    noise = {} if eta == 0 else {"generator": torch.Generator().manual_seed(3)}
    theirs = []
    result = fn(schedule.denoiser(fake_velocity), x_t / (1 - levels[0]), sigmas,
                callback=lambda i, x_, x0: theirs.append(x_), **noise, **kw)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        t_next = levels[i + 1] if i + 1 < n else 0.0
        torch.testing.assert_close(a, b * (1 - t_next), rtol=0, atol=1e-12)
    torch.testing.assert_close(x, result, rtol=0, atol=1e-12)


def _oracle(schedule: FlowSchedule, c: torch.Tensor):
    """The ideal velocity network of the one-image data set {c}."""
    return lambda x, t, class_labels=None: schedule.ideal_output(x, t, c.expand_as(x))


@pytest.mark.parametrize("grid", [None, "uniform", "karras", "exponential"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_on_every_grid_recovers_a_one_image_data_set(sampler, grid):
    schedule = flow(shift=3.0)
    c = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = diffunet.sample(_oracle(schedule, c), schedule, randn(*SHAPE, seed=4),
                          sampler=sampler, num_steps=5, sigmas=grid,
                          generator=torch.Generator().manual_seed(2))
    assert out.shape == SHAPE
    assert (out - c).abs().max() < 1e-3


def test_heun_with_churn_takes_the_sigma_path_and_still_recovers_the_image():
    schedule = flow(shift=3.0)
    c = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(5)) * 2 - 1
    oracle = _oracle(schedule, c)
    churn = StepOptions("heun", 5, s_churn=1.0)
    assert schedule.native_path(oracle, churn, "uniform", None) is None
    assert schedule.native_levels(churn, "uniform") is None
    assert isinstance(schedule.native_path(oracle, StepOptions("heun", 5), "uniform", None),
                      FlowPath)
    model = Recorder(oracle)
    out = diffunet.sample(model, schedule, randn(*SHAPE, seed=6), sampler="heun", num_steps=5,
                          sigmas="uniform", s_churn=1.0, generator=torch.Generator().manual_seed(7))
    assert (out - c).abs().max() < 1e-3
    # the sigma path starts from the largest finite level, sigma = s (T - 1), below t = 1,
    # churned up by 1 + gamma, gamma = S_churn / N (Karras et al. Algorithm 2, lines 4-5)
    sigma_hat = (1 + 1.0 / 5) * schedule.grid_range()[1]
    assert schedule.grid_range()[1] == pytest.approx(3.0 * 999)
    assert model.times[0][0].item() == pytest.approx(1000 * sigma_hat / (1 + sigma_hat), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The formulation's maths


def test_add_noise_is_the_straight_line_from_x0_to_noise():
    schedule = flow()
    g = torch.Generator().manual_seed(8)
    x0 = torch.rand(3, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    xt = schedule.add_noise(x0, noise, t)
    want = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(xt, want, rtol=1e-15, atol=0)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], noise[2])
    torch.testing.assert_close(schedule.add_noise(x0, noise, 0.25), 0.75 * x0 + 0.25 * noise,
                               rtol=1e-15, atol=0)


@pytest.mark.parametrize("num_train_timesteps", [1000, 500])
def test_loss_is_the_velocity_mse_and_the_network_gets_t_times_T(num_train_timesteps):
    # Conditional flow matching (Lipman et al. eq. 9) on the straight path: target noise - x0.
    schedule = flow(num_train_timesteps=num_train_timesteps)
    g = torch.Generator().manual_seed(9)
    x0 = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    out = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0.05, 0.3, 0.5, 0.97])
    seen = {}

    def net(x, time_in, class_labels=None):
        seen["x"], seen["t"] = x, time_in
        return out

    loss = schedule.loss(net, x0, noise, t)
    assert loss.shape == (4,) and loss.dtype == torch.float32
    want = (out.double() - (noise.double() - x0.double())).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(seen["x"], schedule.add_noise(x0, noise, t), rtol=0, atol=0)
    assert seen["t"].is_floating_point()
    torch.testing.assert_close(seen["t"], t * num_train_timesteps, rtol=1e-7, atol=0)
    # ... and 0 at the ideal output
    ideal = schedule.loss(lambda x, ti, class_labels=None: schedule.ideal_output(x, ti, x0),
                          x0, noise, t)
    assert ideal.abs().max() < 1e-10


def test_cosmap_multiplies_the_loss_by_2_over_pi_times_1_minus_2t_plus_2t2():
    # Esser et al. 2024 sec. 3.1: w(t) = 2 / (pi (1 - 2t + 2t^2)); 4 / pi at t = 1/2.
    g = torch.Generator().manual_seed(10)
    x0 = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    out = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0.5, 0.1, 0.8, 0.99])

    def net(x, time_in, class_labels=None):
        return out

    plain = flow().loss(net, x0, noise, t)
    cosmap = flow(loss_weighting="cosmap").loss(net, x0, noise, t)
    ratio = (cosmap / plain).double()
    assert ratio[0].item() == pytest.approx(4 / math.pi, rel=1e-6)
    tt = t.double()
    torch.testing.assert_close(ratio, 2 / (math.pi * (1 - 2 * tt + 2 * tt * tt)), rtol=1e-6,
                               atol=0)


def _levels(n: int = 4000, seed: int = 0, **kw: Any) -> torch.Tensor:
    return flow(**kw).sample_levels(n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw", [{"time_density": "uniform"}, {}, {"time_density": "mode"},
                                {"time_density": "uniform", "shift": 3.0}],
                         ids=["uniform", "logit_normal", "mode", "uniform-shift3"])
def test_training_times_follow_the_generator_and_stay_in_0_1(kw):
    before = torch.get_rng_state()
    t = _levels(**kw)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    assert t.shape == (4000,) and t.dtype == torch.float32
    assert (t >= 0).all() and (t <= 1).all()
    assert torch.equal(_levels(**kw), t)
    assert not torch.equal(_levels(seed=1, **kw), t)


def test_training_time_densities_have_their_statistics():
    # uniform: mean 1/2; logit-normal(m, s): median sigmoid(m) (Esser et al. eq. 19)
    assert _levels(time_density="uniform").mean().item() == pytest.approx(0.5, abs=0.03)
    assert _levels().median().item() == pytest.approx(0.5, abs=0.03)
    assert _levels(logit_mean=1.0).median().item() == pytest.approx(1 / (1 + math.exp(-1)),
                                                                     abs=0.03)
    # the shift moves the median of uniform t from 1/2 to s(1/2) = 3/4 (s = 3)
    shifted = _levels(time_density="uniform", shift=3.0)
    assert shifted.median().item() == pytest.approx(shift_time(0.5, 3.0), abs=0.03)
    assert shift_time(0.5, 3.0) == 0.75
    # mode sampling (Esser et al. eq. 20): f(u) = 1 - u at scale 0, i.e. uniform ...
    u = _levels(time_density="uniform")
    flat = _levels(time_density="mode", mode_scale=0.0)
    torch.testing.assert_close(flat, 1 - u, rtol=0, atol=1e-7)

    def middle(x: torch.Tensor) -> float:
        return ((x > 0.25) & (x < 0.75)).float().mean().item()

    assert middle(flat) == pytest.approx(0.5, abs=0.03)
    # ... and at 1.29 heavier in the middle than uniform
    assert middle(_levels(time_density="mode", mode_scale=1.29)) > 0.6


# ---------------------------------------------------------------------------------------------
# Config


def test_the_default_run_takes_formulation_flow_without_resetting_vp_fields():
    default = load_config(None, []).schedule
    cfg = load_config(None, ["schedule.formulation=flow"]).schedule
    assert cfg.formulation == "flow"
    for key in ("beta_schedule", "prediction_type", "beta_start", "beta_end"):
        assert getattr(cfg, key) == getattr(default, key), key
    assert cfg.used_fields() == ("formulation", "num_train_timesteps", "shift", "time_density",
                                 "logit_mean", "logit_std", "mode_scale", "loss_weighting")
    assert ScheduleConfig(formulation="flow").used_fields() == cfg.used_fields()
    assert cfg.table_timesteps is None
    assert isinstance(make_schedule(cfg), FlowSchedule)
    assert "flow matching" in cfg.describe()
    assert "cosmap" in ScheduleConfig(formulation="flow", loss_weighting="cosmap").describe()
    shifted = load_config(None, ["schedule.formulation=flow", "schedule.shift=3"]).schedule
    assert shifted.shift == 3.0 and make_schedule(shifted).shift == 3.0


@pytest.mark.parametrize("override, key, words", [
    ("schedule.shift=0", "schedule.shift", "positive"),
    ("schedule.shift=-2", "schedule.shift", "positive"),
    ("schedule.logit_std=0", "schedule.logit_std", "positive"),
    ("schedule.mode_scale=2", "schedule.mode_scale", "[-1, 1.7519]"),
    ("schedule.time_density=logitnormal", "schedule.time_density", "did you mean 'logit_normal'"),
])
def test_bad_flow_values_are_one_line_errors_naming_the_key(override, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["schedule.formulation=flow", override])
    msg = str(info.value)
    assert msg.startswith(f"{key}: ") and "\n" not in msg and words in msg, msg


@pytest.mark.parametrize("override, key", [
    ("schedule.shift=3", "schedule.shift"),
    ("schedule.loss_weighting=cosmap", "schedule.loss_weighting"),
    ("schedule.time_density=uniform", "schedule.time_density"),
])
def test_a_flow_field_under_vp_is_a_one_line_error_naming_it(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["schedule.formulation=vp", override])
    msg = str(info.value)
    assert msg.startswith(f"{key}: ") and "\n" not in msg
    assert "schedule.formulation=flow" in msg


@pytest.mark.parametrize("override, key", [
    ("schedule.prediction_type=epsilon", "schedule.prediction_type"),
    ("schedule.beta_schedule=linear", "schedule.beta_schedule"),
    ("schedule.rescale_zero_terminal_snr=true", "schedule.rescale_zero_terminal_snr"),
])
def test_a_vp_field_set_without_the_formulation_is_refused_under_the_flow_default(override, key):
    """The default run is flow: a VP key set away from the run's value, the formulation not
    named, would be unused; it is a one-line error saying to name VP (with it, it loads)."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert msg.startswith(f"{key}: ") and "\n" not in msg
    assert "unused with formulation 'flow'" in msg and "schedule.formulation=vp" in msg
    assert load_config(None, ["schedule.formulation=vp", override]).schedule.formulation == "vp"


def test_the_default_run_is_flow_and_vp_is_the_earlier_recipe():
    """``diffunet train`` with no schedule settings trains flow with logit-normal t; naming VP
    gives the earlier default (v on the cosine schedule), and a VP key stated at the run's own
    value (as configs/default.toml does) is accepted under flow."""
    cfg = load_config(None, [])
    assert (cfg.schedule.formulation, cfg.schedule.time_density) == ("flow", "logit_normal")
    vp = load_config(None, ["schedule.formulation=vp"]).schedule
    assert (vp.prediction_type, vp.beta_schedule) == ("v", "cosine")
    assert load_config(None, ["schedule.beta_schedule=cosine"]).schedule.formulation == "flow"


# ---------------------------------------------------------------------------------------------
# A tiny flow run, end to end


def test_flow_training_run_loads_samples_and_describes_itself(
        tmp_path: Path, cpu_accelerate: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = [*tiny_run(image_size=8), "schedule.formulation=flow", "train.max_steps=3",
            "train.sample_every=3", "train.save_every=3", "train.log_every=1",
            "train.min_snr_gamma=3"]
    said: list[str] = []
    train(load_config(None, args), out, progress=False, say=said.append)
    header = said[1]
    assert "flow matching (rectified flow)" in header
    # set away from the default, min-SNR (a VP weighting) is named as unused
    assert "train.min_snr_gamma is unused" in header
    assert "timesteps" not in header and "cosine" not in header
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()
              if "loss" in line]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert (out / "samples" / "step0000003.png").is_file()  # the preview sampled the flow model

    (model_file,) = sorted((out / "weights").glob("*.safetensors"))
    net, schedule, meta = load_model(model_file)
    assert isinstance(schedule, FlowSchedule) and schedule.shift == 1.0
    assert meta["schedule_config"]["formulation"] == "flow"
    capsys.readouterr()

    assert cli.main(["info", str(model_file)]) == 0
    shown = capsys.readouterr().out
    assert "flow matching" in shown
    assert '  formulation = "flow"' in shown and "  shift = 1.0" in shown
    assert "beta_schedule" not in shown and "prediction_type" not in shown

    assert cli.main(["eval", "bpd", str(model_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "flow" in err

    native = tmp_path / "native"
    assert cli.main(["sample", str(model_file), "--num-samples", "2", "--steps", "3",
                     "--sampler", "euler", "--out-dir", str(native)]) == 0
    manifest = json.loads((native / "manifest.json").read_text())
    assert manifest["settings"]["sigmas"] == "uniform" and "sigma_grid" not in manifest
    assert manifest["flow_t"] == flow_grid(3, 1000, 1.0)
    assert (native / "000001.png").is_file()

    karras = tmp_path / "karras"
    assert cli.main(["sample", str(model_file), "--num-samples", "2", "--steps", "3",
                     "--sigmas", "karras", "--out-dir", str(karras)]) == 0
    manifest = json.loads((karras / "manifest.json").read_text())
    assert "flow_t" not in manifest
    assert manifest["sigma_grid"] == make_sigmas(schedule, 3, "karras").tolist()
    capsys.readouterr()

    inspected = tmp_path / "inspect"
    assert cli.main(["inspect", str(model_file), "--out-dir", str(inspected),
                     "--device", "cpu"]) == 0, capsys.readouterr().err
    stats = json.loads((inspected / "stats.json").read_text())
    assert stats["input"]["kind"] == "diffusion" and (inspected / "noised.png").is_file()


# ---------------------------------------------------------------------------------------------
# diffusers interop


def _flow_model_file(path: Path, shift: float = 3.0,
                     num_train_timesteps: int = 500) -> tuple[UNet, FlowSchedule]:
    net = perturbed(UNet(UNetConfig(**tiny_net(8))), seed=3).eval()
    schedule = flow(shift=shift, num_train_timesteps=num_train_timesteps)
    diffunet.save_model(path, net, schedule)
    return net, schedule


def test_export_runs_in_the_diffusers_flow_loop_and_imports_back(diffusers, tmp_path: Path,
                                                                 one_thread: None) -> None:
    net, schedule = _flow_model_file(tmp_path / "m.safetensors")
    folder = tmp_path / "out"
    r = export_diffusers(tmp_path / "m.safetensors", folder)
    assert r["pipeline"] is None and r["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert not (folder / "model_index.json").exists()  # diffusers has no flow pipeline class
    assert (folder / "unet" / "config.json").is_file()
    written = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert written["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert (written["shift"], written["num_train_timesteps"]) == (3.0, 500)

    # the plain diffusers loop (README) on the exported components: the same images
    unet = diffusers.UNet2DModel.from_pretrained(folder, subfolder="unet")
    sch = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    n = 5
    sch.set_timesteps(n)
    x_T = randn(2, 3, 8, 8, seed=4)
    x = x_T.clone()
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(unet(x, t).sample, t, x).prev_sample
        ours = diffunet.sample(net, schedule, x_T, sampler="euler", sigmas="uniform",
                               num_steps=n, clip_x0=False)
    assert x.std() > 0.1  # a real image, not a collapsed one
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)

    # ... and back: the same flow schedule and weights, sampled as diffusers does
    back = import_diffusers(folder, tmp_path / "back.safetensors")
    assert back.schedule_config.formulation == "flow"
    b, sb, mb = load_model(tmp_path / "back.safetensors")
    assert isinstance(sb, FlowSchedule) and sb.config == schedule.config
    assert (sb.shift, sb.num_train_timesteps) == (3.0, 500)
    sd_a, sd_b = net.state_dict(), b.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    stored = mb["run_config"]["sample"]
    assert (stored["sampler"], stored["sigmas"], stored["clip_x0"]) == ("euler", "uniform", False)


def test_the_readme_diffusers_flow_loop_runs_and_gives_diffunets_images(
        diffusers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    # The README's loop ("Coming from diffusers"), as written, on a tiny exported flow model.
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Coming from diffusers\n", 1)[1].split("\n## ", 1)[0]
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S)
                if "FlowMatchEulerDiscreteScheduler" in b]
    net, schedule = _flow_model_file(tmp_path / "m.safetensors")
    export_diffusers(tmp_path / "m.safetensors", tmp_path / "flow-export")
    monkeypatch.chdir(tmp_path)
    env: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), env)  # noqa: S102 - our own README
    images = env["images"]
    assert images.shape == (4, 3, 8, 8) and 0 <= float(images.min()) <= float(images.max()) <= 1
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = diffunet.sample(net, schedule, x_T, sampler="euler", sigmas="uniform",
                               num_steps=25, clip_x0=False)
    torch.testing.assert_close((ours.clamp(-1, 1) + 1) / 2, images, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key", ["use_dynamic_shifting", "use_karras_sigmas"])
def test_a_flow_scheduler_config_diffunet_cannot_sample_is_refused_naming_the_key(
        tmp_path: Path, key: str) -> None:
    _flow_model_file(tmp_path / "m.safetensors")
    folder = tmp_path / "out"
    export_diffusers(tmp_path / "m.safetensors", folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: True}))
    with pytest.raises(ModelFileError) as info:
        import_diffusers(folder, tmp_path / "bad.safetensors")
    msg = str(info.value)
    assert "\n" not in msg and f"{key} = true" in msg, msg
    assert not (tmp_path / "bad.safetensors").exists()


def test_a_flow_match_heun_config_imports_as_heun_on_the_uniform_grid() -> None:
    sc, sample = schedule_from_diffusers({"_class_name": "FlowMatchHeunDiscreteScheduler",
                                          "num_train_timesteps": 1000, "shift": 2.0})
    assert (sc.formulation, sc.shift) == ("flow", 2.0)
    assert sample == {"sampler": "heun", "sigmas": "uniform", "clip_x0": False}


def test_an_edm_model_is_refused_by_export_in_one_line(tmp_path: Path) -> None:
    net = UNet(UNetConfig(**tiny_net(8)))
    diffunet.save_model(tmp_path / "e.safetensors", net,
                        make_schedule(ScheduleConfig(formulation="edm")))
    with pytest.raises(ModelFileError) as info:
        export_diffusers(tmp_path / "e.safetensors", tmp_path / "out")
    msg = str(info.value)
    assert "\n" not in msg and "EDM model" in msg and "formulation = 'edm'" in msg, msg
    assert not (tmp_path / "out").exists()
