"""The denoiser view, sigma grids and the Karras sampler family (issue 16).

Conformance with diffusers is checked on the SAME model outputs: a fixed, deterministic fake
model (a smooth function of x and t) drives both our sampler and diffusers' stateful scheduler,
in float64. diffusers computes its sigma table in float32 and casts the sample to float32 inside
``step()``; the float64 comparisons therefore (a) check diffusers' own grid against ours to
float32 rounding, then hand it our float64 sigmas and timesteps, and (b) run its scheduler module
with ``torch.float32`` standing for float64 (:class:`F64Torch`), so both sides do the same maths
in float64 and must agree to ~1e-10. Each convention difference found is named in
docs/samplers.md ("Conventions vs diffusers").
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from diffunet.config import ScheduleConfig
from diffunet.formulations import Formulation
from diffunet.formulations.base import DEFAULT_SIGMA_MAX
from diffunet.formulations.vp import NoiseSchedule, VPDenoiser
from diffunet.errors import UsageError
from diffunet.samplers import (PREVIEW_GRIDS, SAMPLERS, make_sigmas, make_timesteps, network_calls, sample,
                               sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_euler,
                               sample_euler_ancestral, sample_heun)

F64 = torch.float64
SHAPE = (2, 3, 4, 4)
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}
TIGHT = dict(rtol=0, atol=1e-10)


def make(prediction_type: str = "epsilon", **kw: Any) -> NoiseSchedule:
    return NoiseSchedule(ScheduleConfig(prediction_type=prediction_type, **kw))


def randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def fake_model(x: torch.Tensor, t: torch.Tensor, class_labels: Any = None) -> torch.Tensor:
    """A deterministic stand-in network: smooth in x and in (float or int) t."""
    tt = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    out = 0.6 * x * torch.cos(tt / 400) + 0.2 * torch.sin(3 * x + tt / 150)
    if class_labels is not None:
        out = out + 0.05 * class_labels.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return out


class Counter:
    """fake_model that counts its calls and records the batch size and labels of each."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, Any]] = []

    def __call__(self, x, t, class_labels=None):
        self.calls.append((x.shape[0], None if class_labels is None else class_labels.clone()))
        return fake_model(x, t, class_labels)


class F64Torch:
    """Stands in for ``torch`` inside one diffusers scheduler module, with float32 meaning
    float64: its ``sample.to(torch.float32)`` upcasts then leave float64 samples alone."""

    float32 = torch.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@pytest.fixture
def diffusers(monkeypatch):
    d = pytest.importorskip("diffusers")

    def float64_module(scheduler_cls):
        import sys
        monkeypatch.setattr(sys.modules[scheduler_cls.__module__], "torch", F64Torch())
        return scheduler_cls
    d.float64_module = float64_module
    return d


# ---------------------------------------------------------------------------------------------
# The denoiser view


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
def test_sigma_table_and_timestep_round_trip(prediction_type):
    s = make(prediction_type, beta_schedule="cosine")
    ab = s.alphas_cumprod
    torch.testing.assert_close(s.sigmas, ((1 - ab) / ab).sqrt(), rtol=1e-15, atol=0)
    assert s.sigmas.dtype == F64 and s.sigmas.shape == (1000,)
    assert s.sigma_min == float(s.sigmas[0]) and s.sigma_max == float(s.sigmas[-1])
    assert float(s.timestep_to_sigma(-1)) == 0.0
    torch.testing.assert_close(s.timestep_to_sigma(torch.tensor([0, 500, 999])),
                               s.sigmas[[0, 500, 999]], rtol=0, atol=0)
    ts = torch.arange(1000, dtype=F64)
    assert torch.equal(s.sigma_to_timestep(s.sigmas), ts)  # table entries map back exactly
    assert torch.equal(s.sigma_to_timestep(s.sigmas, "nearest"), ts.long())
    # below sigma_min clamps to 0, above sigma_max to T-1 (k-diffusion / diffusers)
    assert s.sigma_to_timestep(torch.tensor([0.0, 1e-9, 1e9])).tolist() == [0, 0, 999]


def test_sigma_to_timestep_interpolates_as_diffusers(diffusers):
    s = make()
    ref = diffusers.EulerDiscreteScheduler()
    sig = torch.exp(torch.linspace(math.log(0.005), math.log(300.0), 97, dtype=F64))
    # diffusers' _sigma_to_t on OUR float64 log-sigma table: the same interpolation rule
    expected = torch.from_numpy(ref._sigma_to_t(sig.numpy(), s.sigmas.log().numpy()))
    torch.testing.assert_close(s.sigma_to_timestep(sig), expected, rtol=0, atol=1e-9)
    # nearest = the nearest entry in log-sigma = the interpolated timestep rounded
    near = s.sigma_to_timestep(sig, "nearest")
    assert near.dtype == torch.int64 and torch.equal(near, expected.round().long())
    log_dist = (sig.log()[:, None] - s.sigmas.log()[None, :]).abs()
    assert torch.equal(near, log_dist.argmin(dim=1))
    with pytest.raises(UsageError, match="mode"):
        s.sigma_to_timestep(sig, "floor")


def test_zero_terminal_snr_sigma_view():
    s = make("v", rescale_zero_terminal_snr=True)
    assert s.sigma_max == math.inf and math.isfinite(float(s.sigmas[-2]))
    t = s.sigma_to_timestep(torch.tensor([float(s.sigmas[-2]), 1e12, math.inf]))
    assert t.tolist() == [998, 998, 999]
    # the model's finite range tops at sigma_{T-2}: an explicit sigma_max reaches it, the
    # default grid starts at the cap
    assert s.grid_range()[1] == float(s.sigmas[-2])
    assert float(make_sigmas(s, 6)[0]) == pytest.approx(DEFAULT_SIGMA_MAX, rel=1e-12)
    grid = make_sigmas(s, 6, sigma_max=s.grid_range()[1])
    assert float(grid[0]) == pytest.approx(float(s.sigmas[-2]), rel=1e-12)
    uniform = make_sigmas(s, 6, "uniform")
    assert torch.isfinite(uniform).all() and float(uniform[0]) == float(s.sigmas[-2])
    with pytest.raises(UsageError, match="same level"):
        make_sigmas(s, 1000, "uniform")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
@pytest.mark.parametrize("mode", ["nearest", "interpolate"])
def test_vp_denoiser_is_split_output_at_the_table_sigma(prediction_type, mode):
    s = make(prediction_type)
    seen = []

    def model(x, t, class_labels=None):
        seen.append(t)
        return fake_model(x, t)
    d = s.denoiser(model, timestep=mode)
    assert isinstance(d, VPDenoiser) and (d.sigma_min, d.sigma_max) == (s.sigma_min, s.sigma_max)
    t = torch.tensor([3, 640])
    xt = randn(*SHAPE, seed=0)
    x = xt / s.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1)  # VE scaling: x0 + sigma eps
    x0_hat = d(x, s.sigmas[t])
    expected = s.split_output(xt, t, fake_model(xt, t))[0]
    torch.testing.assert_close(x0_hat, expected, rtol=1e-12, atol=1e-12)
    assert seen[0].tolist() == [3, 640]
    assert seen[0].dtype == (torch.int64 if mode == "nearest" else F64)
    # float32 follows x's dtype and gets float32 (or int64) timesteps
    x0_32 = d(x.float(), s.sigmas[t])
    assert x0_32.dtype == torch.float32 and seen[-1].dtype in (torch.int64, torch.float32)
    torch.testing.assert_close(x0_32, expected.float(), rtol=1e-5, atol=1e-5)


def test_vp_denoiser_epsilon_is_x_minus_sigma_eps():
    s = make("epsilon")
    x, sig = randn(*SHAPE, seed=1), torch.tensor([0.3, 12.0], dtype=F64)
    t = s.sigma_to_timestep(sig)
    xt = x / (1 + sig**2).sqrt().reshape(-1, 1, 1, 1)
    expected = x - sig.reshape(-1, 1, 1, 1) * fake_model(xt, t)  # Karras et al. Table 1, VP
    torch.testing.assert_close(s.denoiser(fake_model)(x, sig), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(UsageError, match="timestep"):
        VPDenoiser(fake_model, s, timestep="round")


# ---------------------------------------------------------------------------------------------
# Sigma grids


def test_make_sigmas_shapes_and_formulas():
    s = make()
    for grid in ("karras", "exponential", "uniform"):
        for n in (1, 2, 7, 50):
            g = make_sigmas(s, n, grid)
            assert g.dtype == F64 and g.shape == (n + 1,) and g[-1] == 0
            assert bool((g[:-1] > g[1:]).all()), (grid, n)
    lo, hi = s.default_range()
    assert (lo, hi) == (s.sigma_min, min(s.sigma_max, DEFAULT_SIGMA_MAX))
    rho, n = 3.0, 9
    i = torch.arange(n, dtype=F64)
    eq5 = (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    torch.testing.assert_close(make_sigmas(s, n, rho=rho)[:-1], eq5, rtol=1e-13, atol=0)
    expo = make_sigmas(s, n, "exponential")[:-1]
    torch.testing.assert_close(expo.log().diff(), expo.log().diff()[:1].expand(n - 1),
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(make_sigmas(s, 10, "uniform", spacing="leading")[:-1],
                               s.sigmas[make_timesteps(1000, 10, "leading")], rtol=0, atol=0)


def assert_float32_sigmas_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """diffusers forms sigma = sqrt((1 - ab) / ab) from a float32 alpha_bar: 1 - ab loses
    ~6e-8 absolute, so sigma is off by up to ~3e-8 / (1 - ab) relative (3e-4 at t = 0 of the
    linear schedule). Ours is float64; allow exactly that error model."""
    one_m_ab = ours**2 / (1 + ours**2)
    bound = ours * (1e-6 + 1e-7 / one_m_ab.clamp(min=1e-12))
    assert bool(((ours - theirs.double()).abs() <= bound).all()), (ours, theirs)


@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading"])
def test_make_sigmas_matches_diffusers_grids(diffusers, spacing):
    s = make()
    # diffusers' Euler schedulers keep linspace's fractional timesteps (749.25 for n = 5) and
    # interpolate sigma linearly in t; ours are integers (make_timesteps, rounded as diffusers'
    # DDIM does). They agree where (T - 1) / (n - 1) is a whole number.
    for n in ((4, 10, 28) if spacing == "linspace" else (5, 10, 25)):
        ref = diffusers.EulerDiscreteScheduler(timestep_spacing=spacing)
        ref.set_timesteps(n)
        assert_float32_sigmas_close(make_sigmas(s, n, "uniform", spacing=spacing), ref.sigmas)
    for grid, flag in (("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas")):
        # diffusers' Euler/Heun take sigma_min and sigma_max from the sigmas of the spacing's
        # timesteps: the whole table (as ours with sigma_max at its top; the default grid
        # stops at DEFAULT_SIGMA_MAX) only with linspace, which visits 0 and T-1.
        # From its float32 table sigma_min is 3e-4 off (see above) and the grid with it.
        top = s.grid_range()[1]
        for cls, kw in ((diffusers.EulerDiscreteScheduler, dict(timestep_spacing="linspace")),
                        (diffusers.DPMSolverMultistepScheduler, dict(timestep_spacing=spacing))):
            ref = cls(**kw, **{flag: True})
            ref.set_timesteps(12)
            torch.testing.assert_close(ref.sigmas.double(),
                                       make_sigmas(s, 12, grid, sigma_max=top),
                                       rtol=4e-4, atol=0)
            # with float64 tables the same formula: equal to its final float32 rounding
            ref = diffusers.float64_module(cls)(**kw, **{flag: True})
            ref.set_timesteps(12)
            torch.testing.assert_close(ref.sigmas.double(),
                                       make_sigmas(s, 12, grid, sigma_max=top),
                                       rtol=1e-7, atol=0)


class FakeEDMSchedule(Formulation):
    """A formulation without integer timesteps or a uniform grid, defined here and never
    registered (as EDM's): the samplers need only the contract's denoiser and grid range. Its
    denoiser D(x; sigma) = c_skip x + c_out model(c_in x, sigma)."""

    name, title, config_fields = "fake-edm", "fake EDM", ()
    sigma_min, sigma_max, sigma_data = 0.002, 80.0, 0.5

    def __init__(self) -> None:
        self.config = None
        self.seen: list[torch.Tensor] = []

    @classmethod
    def describe(cls, config):
        return "a fake EDM"

    def sample_levels(self, n, generator):
        raise NotImplementedError("sampling only")

    add_noise = network_input = loss = ideal_output = sample_levels

    def grid_range(self):
        return self.sigma_min, self.sigma_max

    def denoiser(self, model):
        sd = self.sigma_data

        def d(x, sigma, class_labels=None):
            self.seen.append(sigma.clone())
            s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
            c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
            return c_skip * x + c_out * model(x / (s**2 + sd**2).sqrt(), s.log().flatten() / 4)
        d.sigma_min, d.sigma_max = self.sigma_min, self.sigma_max
        return d

    def sigma_of_time_input(self, time_in):
        return (4 * time_in.double()).exp()  # the network sees ln(sigma) / 4


def test_make_sigmas_errors():
    s = make()
    with pytest.raises(UsageError, match="uniform.*fake EDM model does not have"):
        make_sigmas(FakeEDMSchedule(), 10, "uniform")
    with pytest.raises(UsageError, match="unknown sigma grid 'polyexp'"):
        make_sigmas(s, 10, "polyexp")
    with pytest.raises(UsageError, match="rho"):
        make_sigmas(s, 10, rho=0.0)
    with pytest.raises(UsageError, match="num_steps"):
        make_sigmas(s, 0)
    with pytest.raises(UsageError, match="expected a schedule"):
        make_sigmas(object(), 10)
    g = make_sigmas(FakeEDMSchedule(), 4)
    assert float(g[0]) == pytest.approx(80.0) and float(g[-2]) == pytest.approx(0.002)


# ---------------------------------------------------------------------------------------------
# Conformance with diffusers, same model outputs, float64


def _drive(ref, x, model, noises=None):
    """Run a diffusers scheduler over its timesteps with ``model``; the states after each
    ``step`` (and the number of model calls)."""
    states = []
    for k, t in enumerate(ref.timesteps):
        out = model(ref.scale_model_input(x, t), t.reshape(1).expand(x.shape[0]))
        kw = {} if noises is None else {"variance_noise": noises[k]}
        x = ref.step(out, t, x, **kw).prev_sample
        states.append(x)
    return states


def _our_timesteps(s: NoiseSchedule, grid: torch.Tensor, mode: str = "interpolate"):
    return s.sigma_to_timestep(grid[:-1], mode)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
def test_euler_matches_diffusers_euler_discrete_karras(diffusers, prediction_type):
    s = make(prediction_type)
    n = 10
    grid = make_sigmas(s, n, "karras", sigma_max=s.sigma_max)  # diffusers': the whole table
    ref = diffusers.float64_module(diffusers.EulerDiscreteScheduler)(
        use_karras_sigmas=True, timestep_spacing="linspace",
        prediction_type=DIFFUSERS_PREDICTION[prediction_type])
    ref.set_timesteps(n)
    # diffusers' own grid and timesteps: ours to float32 rounding
    torch.testing.assert_close(ref.sigmas.double(), grid, rtol=2e-6, atol=0)
    torch.testing.assert_close(ref.timesteps.double(), _our_timesteps(s, grid), rtol=0,
                               atol=2e-3)
    ref.sigmas, ref.timesteps = grid.clone(), _our_timesteps(s, grid)
    x_T = randn(*SHAPE, seed=0)
    expected = _drive(ref, x_T * ref.init_noise_sigma, fake_model)
    ours = []
    result = sample_euler(s.denoiser(fake_model), x_T * grid[0].item(), grid,
                          callback=lambda i, x, x0: ours.append(x))
    for a, b in zip(ours[:-1], expected[:-1]):
        torch.testing.assert_close(a, b, **TIGHT)
    torch.testing.assert_close(result, expected[-1], **TIGHT)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
def test_heun_matches_diffusers_heun_discrete_karras(diffusers, prediction_type):
    s = make(prediction_type)
    n = 8
    grid = make_sigmas(s, n, "karras", sigma_max=s.sigma_max)  # diffusers': the whole table
    ref = diffusers.float64_module(diffusers.HeunDiscreteScheduler)(
        use_karras_sigmas=True, timestep_spacing="linspace",
        prediction_type=DIFFUSERS_PREDICTION[prediction_type])
    ref.set_timesteps(n)
    ts = _our_timesteps(s, grid)
    # diffusers' Heun lists each inner level twice (the corrector's second evaluation)
    ref.sigmas = torch.cat([grid[:1], grid[1:-1].repeat_interleave(2), grid[-1:]])
    ref.timesteps = torch.cat([ts[:1], ts[1:].repeat_interleave(2)])
    x_T = randn(*SHAPE, seed=1)
    expected = _drive(ref, x_T * grid[0].item(), fake_model)
    model = Counter()
    result = sample_heun(s.denoiser(model), x_T * grid[0].item(), grid)
    torch.testing.assert_close(result, expected[-1], **TIGHT)
    assert len(model.calls) == len(ref.timesteps) == network_calls("heun", n) == 2 * n - 1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])  # diffusers: no x0 here
def test_euler_ancestral_matches_diffusers_with_the_same_noise(diffusers, prediction_type):
    s = make(prediction_type)
    n = 10
    grid = make_sigmas(s, n, "uniform", spacing="trailing")
    ref = diffusers.float64_module(diffusers.EulerAncestralDiscreteScheduler)(
        timestep_spacing="trailing", prediction_type=DIFFUSERS_PREDICTION[prediction_type])
    ref.set_timesteps(n)
    torch.testing.assert_close(ref.sigmas.double(), grid, rtol=2e-6, atol=0)
    ref.sigmas = grid.clone()
    assert ref.timesteps.tolist() == make_timesteps(1000, n).tolist()
    x_T = randn(*SHAPE, seed=2)
    # the same generator seed on both sides: diffusers draws randn(shape, generator, float64)
    # once per step as we do (it also draws on the last step, where sigma_up = 0, after us)
    g = torch.Generator().manual_seed(7)
    expected = []
    x = x_T * ref.init_noise_sigma
    for t in ref.timesteps:
        out = fake_model(ref.scale_model_input(x, t), t.reshape(1).expand(2))
        x = ref.step(out, t, x, generator=g).prev_sample
        expected.append(x)
    result = sample_euler_ancestral(s.denoiser(fake_model), x_T * grid[0].item(), grid,
                                    generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(result, expected[-1], **TIGHT)


def _dpm_ref(diffusers, prediction_type, algorithm_type, n):
    ref = diffusers.float64_module(diffusers.DPMSolverMultistepScheduler)(
        use_karras_sigmas=True, algorithm_type=algorithm_type, solver_order=2,
        solver_type="midpoint", final_sigmas_type="zero",
        prediction_type=DIFFUSERS_PREDICTION[prediction_type])
    ref.set_timesteps(n)
    return ref


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
def test_dpmpp_2m_and_sde_match_diffusers_with_karras_sigmas(diffusers, prediction_type,
                                                             algorithm_type):
    s = make(prediction_type)
    n = 10
    grid = make_sigmas(s, n, "karras", sigma_max=s.sigma_max)  # diffusers': the whole table
    ref = _dpm_ref(diffusers, prediction_type, algorithm_type, n)
    torch.testing.assert_close(ref.sigmas.double(), grid, rtol=2e-6, atol=0)
    # diffusers rounds the Karras timesteps it gives the model: our "nearest" mode
    nearest = _our_timesteps(s, grid, "nearest")
    assert ref.timesteps.tolist() == nearest.tolist()
    ref.sigmas = grid.clone()
    x_T = randn(*SHAPE, seed=3)
    sde = algorithm_type == "sde-dpmsolver++"
    # our SDE draws one float64 randn per step but the last, from the generator; diffusers
    # takes the same numbers as variance_noise (and multiplies its last one by sigma = 0)
    g = torch.Generator().manual_seed(11)
    noises = [torch.randn(SHAPE, generator=g, dtype=F64) for _ in range(n - 1)]
    noises.append(torch.zeros(SHAPE, dtype=F64))
    # diffusers' DPM-Solver works on VP samples and starts from x_T itself (init_noise_sigma 1)
    expected = _drive(ref, x_T, fake_model, noises if sde else None)
    d = s.denoiser(fake_model, timestep="nearest")
    start = x_T * math.sqrt(1 + grid[0].item() ** 2)  # = x_T in VP scaling
    ours = []
    kw = dict(generator=torch.Generator().manual_seed(11)) if sde else {}
    fn = sample_dpmpp_2m_sde if sde else sample_dpmpp_2m
    result = fn(d, start, grid, callback=lambda i, x, x0: ours.append(x), **kw)
    for i, (a, b) in enumerate(zip(ours[:-1], expected[:-1])):
        torch.testing.assert_close(a / math.sqrt(1 + grid[i + 1].item() ** 2), b, **TIGHT)
    torch.testing.assert_close(result, expected[-1], **TIGHT)


# ---------------------------------------------------------------------------------------------
# Exact identities with the integer-timestep rules


def _vp_start(s: NoiseSchedule, x_T: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """x_T as the integer path starts (VP scaling at t = T-1) in VE scaling."""
    return x_T * math.sqrt(1 + grid[0].item() ** 2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
def test_euler_on_the_uniform_grid_is_ddim_eta_zero(prediction_type):
    s = make(prediction_type)
    grid = make_sigmas(s, 12, "uniform")
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-6)):
        x_T = randn(*SHAPE, seed=4, dtype=dtype)
        ddim = sample(fake_model, s, x_T, sampler="ddim", num_steps=12)
        euler = sample_euler(s.denoiser(fake_model, timestep="nearest"), _vp_start(s, x_T, grid),
                             grid)
        torch.testing.assert_close(euler, ddim, rtol=tol, atol=tol)


@pytest.mark.parametrize("eta", [1.0, 0.4])
def test_euler_ancestral_on_the_uniform_grid_is_ddim_eta_and_ddpm(eta):
    s = make("v")
    grid = make_sigmas(s, 10, "uniform")
    x_T = randn(*SHAPE, seed=5)
    d = s.denoiser(fake_model, timestep="nearest")
    ours = sample_euler_ancestral(d, _vp_start(s, x_T, grid), grid, eta=eta,
                                  generator=torch.Generator().manual_seed(3))
    ddim = sample(fake_model, s, x_T, sampler="ddim", eta=eta, num_steps=10,
                  generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, ddim, **TIGHT)
    if eta == 1.0:  # the DDPM posterior step with fixed_small variance, the same noise
        ddpm = sample(fake_model, s, x_T, sampler="ddpm", clip_x0=False, num_steps=10,
                      generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(ours, ddpm, **TIGHT)


@pytest.mark.parametrize("prediction_type", ["epsilon", "x0"])
def test_dpmpp_2m_sigma_path_on_the_uniform_grid_is_the_integer_chain(prediction_type):
    s = make(prediction_type, beta_schedule="cosine")
    grid = make_sigmas(s, 15, "uniform")
    x_T = randn(*SHAPE, seed=6)
    integer = sample(fake_model, s, x_T, sampler="dpmpp-2m", num_steps=15)
    d = s.denoiser(fake_model, timestep="nearest")
    sigma_path = sample_dpmpp_2m(d, _vp_start(s, x_T, grid), grid)
    torch.testing.assert_close(sigma_path, integer, **TIGHT)
    # and the SDE variant with eta = 0 is exactly that ODE solver
    sde0 = sample_dpmpp_2m_sde(d, _vp_start(s, x_T, grid), grid, eta=0.0)
    torch.testing.assert_close(sde0, sigma_path, rtol=1e-13, atol=1e-13)


def test_sample_dispatches_to_the_sigma_path_and_keeps_the_integer_path():
    s = make("v")
    x_T = randn(*SHAPE, seed=7)
    karras = make_sigmas(s, 8, "karras")
    d = s.denoiser(fake_model)
    # ddim on a karras grid = euler; ddpm = euler ancestral eta 1 with x0 clipping
    torch.testing.assert_close(sample(fake_model, s, x_T, sampler="ddim", num_steps=8,
                                      sigmas="karras"),
                               sample_euler(d, x_T * karras[0].item(), karras), rtol=0, atol=0)
    clipped = s.denoiser(lambda x, t: fake_model(x, t))
    got = sample(fake_model, s, x_T, sampler="ddpm", num_steps=8, sigmas="karras",
                 generator=torch.Generator().manual_seed(1))
    ref = sample_euler_ancestral(lambda x, sg: clipped(x, sg).clamp(-1, 1),
                                 x_T * karras[0].item(), karras, eta=1.0,
                                 generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert got.abs().max() <= 1
    # new samplers default to karras; sigmas="uniform" keeps ddim on the integer path
    torch.testing.assert_close(sample(fake_model, s, x_T, sampler="euler", num_steps=8),
                               sample_euler(d, x_T * karras[0].item(), karras), rtol=0, atol=0)
    model = Counter()
    sample(lambda x, t: model(x, t) if t.dtype == torch.int64 else 1 / 0, s, x_T,
           sampler="ddim", sigmas="uniform", num_steps=4)
    assert len(model.calls) == 4


def test_a_schedule_without_timesteps_goes_down_the_sigma_path():
    edm = FakeEDMSchedule()
    x_T = randn(*SHAPE, seed=8)
    for sampler in SAMPLERS:
        edm.seen.clear()
        out = sample(fake_model, edm, x_T, sampler=sampler, num_steps=5,
                     generator=torch.Generator().manual_seed(0))
        grid = make_sigmas(edm, 5, "karras")
        assert torch.isfinite(out).all() and out.shape == x_T.shape
        assert float(edm.seen[0][0]) == pytest.approx(80.0), sampler
        assert len(edm.seen) == network_calls(sampler, 5), sampler
        if sampler != "heun":
            torch.testing.assert_close(torch.stack([v[0] for v in edm.seen]), grid[:-1])
    with pytest.raises(UsageError, match="uniform"):
        sample(fake_model, edm, x_T, sampler="ddim", sigmas="uniform", num_steps=5)
    with pytest.raises(UsageError, match="schedule must be a formulation"):
        sample(fake_model, object(), x_T)


# ---------------------------------------------------------------------------------------------
# Heun's churn, NFE, callbacks, guidance, generators


def test_heun_churn_follows_algorithm_2():
    s = make()
    grid = make_sigmas(s, 6, "karras")
    seen: list[float] = []

    def d(x, sigma, class_labels=None):
        seen.append(float(sigma[0]))
        return 0.5 * x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()
    x = randn(*SHAPE, seed=9) * grid[0].item()
    s_churn, s_tmin, s_tmax = 40.0, 0.5, 20.0
    gamma = min(s_churn / 6, math.sqrt(2) - 1)
    sample_heun(d, x, grid, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=1.003,
                generator=torch.Generator().manual_seed(0))
    firsts = seen[0::2]  # each step's first evaluation (at sigma_hat), then the corrector's
    for s_i, got in zip(grid[:-1].tolist(), firsts):
        want = s_i * (1 + gamma) if s_tmin <= s_i <= s_tmax else s_i
        assert got == pytest.approx(want, rel=1e-12)
    # no level in range: exactly the deterministic sampler, drawing nothing
    a = sample_heun(d, x, grid, s_churn=s_churn, s_tmin=1e6, s_tmax=2e6)
    b = sample_heun(d, x, grid)
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_network_calls_counts_the_forward_passes_and_callback_once_per_step(sampler):
    s = make("v")
    model = Counter()
    steps = []
    sample(model, s, randn(*SHAPE, seed=10), sampler=sampler, num_steps=6,
           generator=torch.Generator().manual_seed(0),
           callback=lambda i, level, x, x0: steps.append((i, level, x.shape, x0.shape)))
    assert len(model.calls) == network_calls(sampler, 6)
    assert [c[0] for c in steps] == list(range(6))
    assert all(c[2] == c[3] == SHAPE for c in steps)
    with pytest.raises(UsageError, match="unknown sampler"):
        network_calls("lms", 6)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp-2m-sde"])
def test_guidance_on_the_sigma_path_is_one_doubled_pass(sampler):
    s = make("epsilon")
    model = Counter()
    x_T = randn(*SHAPE, seed=11)
    y = torch.tensor([1, 2])
    g = 3.0
    got = sample(model, s, x_T, sampler=sampler, num_steps=5, class_labels=y,
                 guidance_scale=g, null_label=9, generator=torch.Generator().manual_seed(0))
    assert len(model.calls) == network_calls(sampler, 5)
    assert all(b == 4 and c.tolist() == [1, 2, 9, 9] for b, c in model.calls)
    base = s.denoiser(fake_model)

    def guided(x, sigma, class_labels=None):  # by hand, two separate calls
        cond = base(x, sigma, class_labels=y)
        uncond = base(x, sigma, class_labels=torch.full_like(y, 9))
        return uncond + g * (cond - uncond)
    grid = make_sigmas(s, 5)
    fn = {"euler": sample_euler, "heun": sample_heun, "dpmpp-2m-sde": sample_dpmpp_2m_sde}
    ref = fn[sampler](guided, x_T * grid[0].item(), grid,
                      generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampler,extra", [
    ("euler-ancestral", {}), ("dpmpp-2m-sde", {}), ("heun", {"s_churn": 10.0}),
    ("ddim", {"eta": 0.7, "sigmas": "exponential"}),
])
def test_per_image_generators_make_images_batch_independent(sampler, extra):
    s = make("v")
    x_T = randn(3, 3, 4, 4, seed=12)
    gens = [torch.Generator().manual_seed(100 + b) for b in range(3)]
    together = sample(fake_model, s, x_T, sampler=sampler, num_steps=6, generator=gens,
                      **extra)
    for b in range(3):
        alone = sample(fake_model, s, x_T[b:b + 1], sampler=sampler, num_steps=6,
                       generator=[torch.Generator().manual_seed(100 + b)], **extra)
        torch.testing.assert_close(together[b:b + 1], alone, rtol=1e-12, atol=1e-12)
    other = sample(fake_model, s, x_T, sampler=sampler, num_steps=6,
                   generator=[torch.Generator().manual_seed(5 + b) for b in range(3)], **extra)
    assert not torch.allclose(other, together)


@pytest.mark.parametrize("prediction_type", ["v", "x0"])
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp-2m-sde", "dpmpp-2m"])
def test_zero_terminal_snr_works_on_the_sigma_path(prediction_type, sampler):
    s = make(prediction_type, rescale_zero_terminal_snr=True)
    out = sample(fake_model, s, randn(*SHAPE, seed=13), sampler=sampler, num_steps=6,
                 sigmas="karras", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()


def test_clip_x0_on_the_sigma_path_clips_the_denoiser_estimate():
    s = make("epsilon")
    seen = []
    out = sample(lambda x, t: 5 * fake_model(x, t), s, randn(*SHAPE, seed=14), sampler="heun",
                 num_steps=5, clip_x0=True, callback=lambda i, lv, x, x0: seen.append(x0))
    assert all(x0.abs().max() <= 1 for x0 in seen) and out.abs().max() <= 1
    free = sample(lambda x, t: 5 * fake_model(x, t), s, randn(*SHAPE, seed=14), sampler="heun",
                  num_steps=5)
    assert free.abs().max() > 1


def test_sampler_argument_errors():
    s = make()
    x = randn(*SHAPE, seed=15)
    d = s.denoiser(fake_model)
    grid = make_sigmas(s, 4)
    with pytest.raises(UsageError, match="strictly decreasing and end with 0"):
        sample_euler(d, x, grid.flip(0))
    with pytest.raises(UsageError, match="1-D tensor"):
        sample_euler(d, x, [1.0, 0.0])
    with pytest.raises(UsageError, match="eta"):
        sample_euler_ancestral(d, x, grid, eta=1.5)
    with pytest.raises(UsageError, match="s_tmin"):
        sample_heun(d, x, grid, s_tmin=5.0, s_tmax=1.0)
    with pytest.raises(UsageError, match="s_churn only applies"):
        sample(fake_model, s, x, sampler="euler", s_churn=1.0)
    with pytest.raises(UsageError, match="unknown sigma grid"):
        sample(fake_model, s, x, sampler="euler", sigmas="cosine")
    with pytest.raises(UsageError, match="eta"):
        sample(fake_model, s, x, sampler="euler-ancestral", eta=2.0)
    with pytest.raises(UsageError, match="generator"):
        sample(fake_model, s, x, sampler="euler-ancestral",
               generator=[torch.Generator()])


# ---------------------------------------------------------------------------------------------
# Editing: SDEdit, inpainting, RePaint


def _init(seed: int = 20) -> torch.Tensor:
    return torch.tanh(randn(*SHAPE, seed=seed))


def test_strength_one_without_mask_is_plain_sampling_up_to_the_leak():
    x_T, init = randn(*SHAPE, seed=16), _init()
    # zero terminal SNR: sqrt(ab_{T-1}) = 0, the noised init is x_T exactly
    z = make("v", rescale_zero_terminal_snr=True)
    assert torch.equal(sample(fake_model, z, x_T, num_steps=6, init_image=init),
                       sample(fake_model, z, x_T, num_steps=6))
    # otherwise init leaks in with weight sqrt(ab_{T-1}) (6e-3 for linear betas)
    s = make("v")
    leak = float(s.sqrt_alphas_cumprod[-1])
    for sampler in ("ddim", "euler"):
        a = sample(fake_model, s, x_T, sampler=sampler, num_steps=6, init_image=init)
        b = sample(fake_model, s, x_T, sampler=sampler, num_steps=6)
        assert 0 < (a - b).abs().max() < 20 * leak


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp-2m"])
def test_strength_skips_the_first_steps_of_the_full_grid(sampler):
    s = make()
    seen: list[float] = []

    def model(x, t, class_labels=None):
        seen.append(float(t[0]))
        return fake_model(x, t)
    x_T, init = randn(*SHAPE, seed=17), _init()
    steps = []
    sample(model, s, x_T, sampler=sampler, num_steps=10, init_image=init, strength=0.35,
           callback=lambda i, lv, x, x0: steps.append(i))
    assert steps == [0, 1, 2] and len(seen) == 3  # int(10 * 0.35) = 3 steps kept
    if sampler == "euler":
        grid = make_sigmas(s, 10)
        assert seen[0] == pytest.approx(float(s.sigma_to_timestep(grid[7])))
    else:
        assert seen == make_timesteps(1000, 10).tolist()[7:]
    with pytest.raises(UsageError, match="keeps no step"):
        sample(model, s, x_T, sampler=sampler, num_steps=10, init_image=init, strength=0.05)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler", "heun", "dpmpp-2m-sde"])
def test_a_mask_of_ones_returns_init_image_exactly(sampler):
    s = make("v")
    init = _init()
    out = sample(fake_model, s, randn(*SHAPE, seed=18), sampler=sampler, num_steps=5,
                 init_image=init, strength=0.8, mask=torch.ones(2, 1, 4, 4),
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, init)


@pytest.mark.parametrize("sampler,resample", [("ddim", 1), ("euler-ancestral", 1),
                                              ("ddpm", 3), ("heun", 2)])
def test_a_mask_keeps_the_known_pixels_and_fills_the_rest(sampler, resample):
    s = make("epsilon")
    init = _init()
    mask = torch.zeros(2, 1, 4, 4)
    mask[..., :2] = 1
    model = Counter()
    out = sample(model, s, randn(*SHAPE, seed=19), sampler=sampler, num_steps=5,
                 init_image=init, mask=mask, resample=resample,
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[..., :2], init[..., :2])
    assert not torch.allclose(out[..., 2:], init[..., 2:])
    # RePaint: every step but the last (one call, to sigma = 0) is repeated `resample` times
    assert len(model.calls) == (network_calls(sampler, 5) - 1) * resample + 1


def test_inpainting_with_per_image_generators_is_batch_independent():
    s = make("v")
    init, x_T = _init(), randn(*SHAPE, seed=21)
    mask = (randn(2, 1, 4, 4, seed=22) > 0).double()
    kw = dict(sampler="euler", num_steps=5, strength=0.9, resample=2)
    together = sample(fake_model, s, x_T, init_image=init, mask=mask,
                      generator=[torch.Generator().manual_seed(b) for b in range(2)], **kw)
    for b in range(2):
        alone = sample(fake_model, s, x_T[b:b + 1], init_image=init[b:b + 1],
                       mask=mask[b:b + 1], generator=[torch.Generator().manual_seed(b)], **kw)
        torch.testing.assert_close(together[b:b + 1], alone, rtol=1e-12, atol=1e-12)


def test_editing_argument_errors():
    s = make()
    x, init = randn(*SHAPE, seed=23), _init()
    ones = torch.ones(2, 1, 4, 4)
    cases = [
        (dict(init_image=init, mask=torch.ones(2, 2, 4, 4)), r"mask must be shaped \(2, 1, 4, 4\)"),
        (dict(init_image=init, mask=torch.ones(2, 1, 8, 8)), "mask must be shaped"),
        (dict(init_image=init, mask=2 * ones), r"mask must hold values in \[0, 1\]"),
        (dict(mask=ones), "mask needs init_image"),
        (dict(strength=0.5), "strength needs init_image"),
        (dict(init_image=init, strength=0.0), r"strength must be in \(0, 1\]"),
        (dict(init_image=init, strength=1.5), r"strength must be in \(0, 1\]"),
        (dict(init_image=init[:1]), "init_image must be a tensor shaped like x_T"),
        (dict(init_image=3 * init), r"init_image must hold values in \[-1, 1\]"),
        (dict(init_image=init, mask=ones, resample=0), "resample must be an integer >= 1"),
        (dict(init_image=init, resample=2), "resample > 1 .* needs mask"),
        (dict(init_image=init, mask=ones, resample=2, sampler="dpmpp-2m"),
         "one-step sampler .* not the multistep dpmpp-2m"),
        (dict(init_image=init, mask=ones, resample=2, sampler="dpmpp-2m-sde"),
         "not the multistep dpmpp-2m-sde"),
    ]
    for kw, match in cases:
        with pytest.raises(UsageError, match=match):
            sample(fake_model, s, x, num_steps=4, **kw)


@pytest.mark.gpu
def test_sigma_path_on_cuda_with_cpu_generators_matches_cpu():
    s = make("v")
    x_T, init = randn(*SHAPE, seed=30, dtype=torch.float32), _init().float()
    mask = torch.zeros(2, 1, 4, 4)
    mask[..., :2] = 1
    for sampler, extra in (("euler-ancestral", {}), ("heun", {"s_churn": 5.0}),
                           ("dpmpp-2m-sde", {}), ("euler", {"init_image": init, "mask": mask})):
        def run(device):
            kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
            return sample(fake_model, s, x_T.to(device), sampler=sampler, num_steps=6,
                          generator=[torch.Generator().manual_seed(b) for b in range(2)], **kw)
        torch.testing.assert_close(run("cuda").cpu(), run("cpu"), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The grid's range: sigma_min / sigma_max (k-diffusion's get_sigmas_karras(n, lo, hi))


def test_sigma_max_and_sigma_min_set_the_karras_and_exponential_ends():
    s = make(beta_schedule="cosine")
    n, rho, lo, hi = 6, 7.0, 0.05, 80.0
    i = torch.arange(n, dtype=F64)
    eq5 = (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    torch.testing.assert_close(make_sigmas(s, n, sigma_min=lo, sigma_max=hi)[:-1], eq5,
                               rtol=1e-13, atol=0)
    expo = make_sigmas(s, n, "exponential", sigma_max=hi)
    assert expo[0] == pytest.approx(hi, rel=1e-12)
    assert expo[-2] == pytest.approx(s.sigma_min, rel=1e-12)
    # sigma_min alone keeps the default top; sigma_max reaches the model's whole range
    assert make_sigmas(s, n, sigma_min=lo)[0] == pytest.approx(DEFAULT_SIGMA_MAX, rel=1e-12)
    assert make_sigmas(s, n, sigma_max=s.sigma_max)[0] == pytest.approx(s.sigma_max, rel=1e-12)
    # a range end printed to 6 digits and typed back counts as that end
    assert make_sigmas(s, n, sigma_max=float(f"{s.sigma_max:.6g}"))[0] == s.sigma_max
    # an EDM-style model's range is only its sampling default: any positive level goes
    assert make_sigmas(FakeEDMSchedule(), 4, sigma_max=500.0)[0] == pytest.approx(500.0, rel=1e-12)


def test_sample_starts_from_the_given_sigma_max():
    s = make("v", beta_schedule="cosine")
    x_T = randn(*SHAPE, seed=11)
    got = {}
    for top in (40.0, s.sigma_max):  # below the default top, and the model's whole range
        grid = make_sigmas(s, 6, "karras", sigma_max=top)
        assert grid[0].item() == pytest.approx(top, rel=1e-12)
        got[top] = sample(fake_model, s, x_T, sampler="dpmpp-2m", num_steps=6, sigmas="karras",
                          sigma_max=top)
        torch.testing.assert_close(got[top], sample_dpmpp_2m(s.denoiser(fake_model),
                                                             grid[0].item() * x_T, grid),
                                   rtol=0, atol=0)
    default = sample(fake_model, s, x_T, sampler="dpmpp-2m", num_steps=6, sigmas="karras")
    assert torch.equal(default, sample(fake_model, s, x_T, sampler="dpmpp-2m", num_steps=6,
                                       sigmas="karras", sigma_max=DEFAULT_SIGMA_MAX))
    assert not torch.equal(default, got[40.0]) and not torch.equal(default, got[s.sigma_max])


def test_a_bad_sigma_range_is_one_line():
    s = make(beta_schedule="cosine")
    x_T = randn(*SHAPE, seed=12)
    cases = [(dict(sigma_max=1e6), r"sigma_max 1e\+06 is outside this model's noise levels"),
             (dict(sigma_min=1e-9), r"sigma_min 1e-09 is outside"),
             (dict(sigma_max=0.0), "sigma_max must be a positive finite noise level"),
             (dict(sigma_max=math.nan), "sigma_max must be a positive finite"),
             (dict(sigma_min=5.0, sigma_max=3.0), "needs sigma_min < sigma_max")]
    for kw, message in cases:
        with pytest.raises(UsageError, match=message) as e:
            make_sigmas(s, 5, "karras", **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="the uniform grid is the training timesteps"):
        make_sigmas(s, 5, "uniform", sigma_max=10.0)
    # ddim with sigmas unset runs its uniform timesteps: a range there is refused, not ignored
    with pytest.raises(UsageError, match="ddim runs on uniform training timesteps"):
        sample(fake_model, s, x_T, sampler="ddim", num_steps=5, sigma_max=10.0)
    # sigma_min alone above the default top: one line that says how to reach higher
    with pytest.raises(UsageError, match=r"sigma_max=160 \(the default top; set sigma_max up "
                       r"to this model's 20291"):
        make_sigmas(s, 5, "karras", sigma_min=200.0)


# ---------------------------------------------------------------------------------------------
# The default range: what a user gets with no sigma_min/sigma_max (docs/samplers.md, "The
# default grid's range")


def _schedule(**config: Any) -> Formulation:
    from diffunet.formulations import make_schedule
    return make_schedule(ScheduleConfig(**config))


@pytest.mark.parametrize("config, top", [
    (dict(formulation="vp", beta_schedule="cosine"), DEFAULT_SIGMA_MAX),  # 2.03e4, capped
    (dict(formulation="vp", beta_schedule="linear"), None),  # 157: below the cap
    (dict(formulation="vp", prediction_type="v", rescale_zero_terminal_snr=True),
     DEFAULT_SIGMA_MAX),  # inf at T-1, sigma_{T-2} = 1.5e4, capped
    (dict(formulation="edm"), 80.0),                                # its own range
    (dict(formulation="edm", sigma_max=200.0), 200.0),              # its own, uncapped
    (dict(formulation="flow"), DEFAULT_SIGMA_MAX),                  # s (T - 1) = 999, capped
    (dict(formulation="flow", shift=3.0), DEFAULT_SIGMA_MAX),       # 2997, capped
], ids=["vp-cosine", "vp-linear", "vp-zero-snr", "edm", "edm-200", "flow",
        "flow-shift3"])
def test_the_default_grid_spans_the_formulations_default_range(config, top):
    s = _schedule(**config)
    lo, full_top = s.grid_range()
    top = full_top if top is None else top  # a model whose levels stop below the cap
    assert s.default_range() == (lo, top)
    for n in (5, 8, 10, 15, 25, 50):  # the step counts the judge measured (docs/samplers.md)
        for grid in ("karras", "exponential"):
            levels = make_sigmas(s, n, grid)  # what sample() runs with the range unset
            assert levels[0].item() == pytest.approx(top, rel=1e-12), (grid, n)
            assert levels[-2].item() == pytest.approx(lo, rel=1e-12), (grid, n)
    # an explicit sigma_max still reaches the model's whole range, and the default equals
    # naming the default top
    assert make_sigmas(s, 10, sigma_max=full_top)[0].item() == pytest.approx(full_top, rel=1e-12)
    assert torch.equal(make_sigmas(s, 10), make_sigmas(s, 10, sigma_max=top))


def test_the_command_lines_default_first_level_is_the_default_top():
    """What previews and ``diffunet sample`` run with no flags (SampleConfig's settings) starts
    at the default top on a cosine-schedule VP model, and ``sample.sigma_max`` (the stored
    key, or the flag) reaches the model's whole range."""
    from diffunet.config import SampleConfig

    s = _schedule(formulation="vp", beta_schedule="cosine", prediction_type="v")
    kw = SampleConfig().sample_kwargs()
    assert (kw["sampler"], kw["num_steps"], kw["sigmas"], kw["sigma_max"]) == (
        "dpmpp-2m", 25, "karras", None)
    seen = []

    def model(x, t, class_labels=None):
        seen.append(float(t.flatten()[0]))
        return fake_model(x, t)
    x_T = randn(*SHAPE, seed=13)
    sample(model, s, x_T, **kw)
    first = s.sigma_to_timestep(torch.tensor(DEFAULT_SIGMA_MAX, dtype=F64)).item()
    # on the cosine schedule the levels above 160 are the last four timesteps (t > 995)
    assert len(seen) == 25 and seen[0] == pytest.approx(first, abs=1e-9) and first < 998
    full = SampleConfig(sigma_max=s.grid_range()[1]).sample_kwargs()
    seen.clear()
    sample(model, s, x_T, **full)
    assert seen[0] == pytest.approx(999, abs=1e-6)  # t = T - 1: the model's top


def test_the_documented_defaults_are_the_stored_ones():
    """docs/samplers.md's defaults table states what SampleConfig (previews, diffunet sample)
    and the library's sample() default to."""
    import inspect
    from pathlib import Path

    from diffunet.config import SampleConfig

    text = (Path(__file__).parents[1] / "docs" / "samplers.md").read_text()
    rows = {}
    for line in text.split("## Defaults", 1)[1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("setting", "---"):
            rows[cells[0]] = cells[1:]
    cfg, lib = SampleConfig(), inspect.signature(sample).parameters
    assert rows["sampler"] == [cfg.sampler, lib["sampler"].default]
    assert rows["steps"] == [str(cfg.num_steps), str(lib["num_steps"].default)]
    assert rows["rho"] == [f"{cfg.rho:g}", f"{lib['rho'].default:g}"]
    assert cfg.sigmas is None and lib["sigmas"].default is None
    assert rows["grid"][0].startswith(PREVIEW_GRIDS[cfg.sampler])
    assert cfg.sigma_max is None and lib["sigma_max"].default is None
    cap = f"{DEFAULT_SIGMA_MAX:g}"  # 160
    assert all(f"min(model's top, {cap})" in cell for cell in rows["karras/exponential top"])
