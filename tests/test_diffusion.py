"""NoiseSchedule (tables, forward process, prediction-type conversions) and the training loss."""

from __future__ import annotations

import math

import pytest
import torch

from diffunet.config import ScheduleConfig
from diffunet.formulations.vp import NoiseSchedule, diffusion_loss
from diffunet.errors import ConfigError, UsageError

PREDICTION_TYPES = ("epsilon", "v", "x0")
# our beta_schedule -> diffusers' name, with the (beta_start, beta_end) each is normally used with
DIFFUSERS_SCHEDULES = {
    "linear": ("linear", 1e-4, 0.02),
    "scaled_linear": ("scaled_linear", 0.00085, 0.012),
    "cosine": ("squaredcos_cap_v2", 1e-4, 0.02),
    "sigmoid": ("sigmoid", 1e-4, 0.02),
}


def make(prediction_type: str = "epsilon", **kw) -> NoiseSchedule:
    return NoiseSchedule(ScheduleConfig(prediction_type=prediction_type, **kw))


# ---------------------------------------------------------------------------------------------
# Tables


def test_tables_are_float64_cpu_tensors_and_not_a_module():
    s = make()
    assert not isinstance(s, torch.nn.Module)
    assert s.config == ScheduleConfig()
    for name in ("betas", "alphas", "alphas_cumprod", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "snr_table"):
        table = getattr(s, name)
        assert table.dtype == torch.float64 and table.device.type == "cpu", name
        assert table.shape == (1000,), name
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))
    assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())


@pytest.mark.parametrize("ours", list(DIFFUSERS_SCHEDULES))
def test_betas_match_diffusers(ours):
    diffusers = pytest.importorskip("diffusers")
    name, b0, b1 = DIFFUSERS_SCHEDULES[ours]
    ref = diffusers.DDPMScheduler(beta_schedule=name, beta_start=b0, beta_end=b1)
    s = make(beta_schedule=ours, beta_start=b0, beta_end=b1)
    # diffusers stores float32 tables: betas agree to float32 rounding; its alphas_cumprod is a
    # float32 cumprod of 1000 factors, whose relative error can grow to ~1000 x 6e-8.
    torch.testing.assert_close(s.betas, ref.betas.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(s.alphas_cumprod, ref.alphas_cumprod.double(), rtol=6e-5, atol=0)


def test_cosine_schedule_follows_improved_ddpm_eq17():
    s = make(beta_schedule="cosine")
    T = 1000

    def f(t):
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (0, 1, 10, 500, 900):  # alpha_bar_t = f(t+1)/f(0) in 0-based indexing, before the cap
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-12)
    assert s.betas.max().item() == pytest.approx(0.999)  # capped near t = T


@pytest.mark.parametrize("ours", list(DIFFUSERS_SCHEDULES))
def test_rescale_zero_terminal_snr(ours):
    diffusers = pytest.importorskip("diffusers")
    name, b0, b1 = DIFFUSERS_SCHEDULES[ours]
    s = make(beta_schedule=ours, beta_start=b0, beta_end=b1, rescale_zero_terminal_snr=True)
    plain = make(beta_schedule=ours, beta_start=b0, beta_end=b1)
    assert abs(s.alphas_cumprod[-1].item()) < 1e-15
    assert s.betas[-1].item() == pytest.approx(1.0)
    assert s.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12)
    ref = diffusers.DDPMScheduler(beta_schedule=name, beta_start=b0, beta_end=b1,
                                  rescale_betas_zero_snr=True)
    # diffusers does Algorithm 1 in float32: shifting sqrt(alpha_bar) cancels most digits near
    # t = T (where alpha_bar ~ 1e-8), and betas = 1 - ab[t]/ab[t-1] loses ~1e-7 absolute for the
    # small betas; so compare absolutely, at the level those float32 steps allow.
    torch.testing.assert_close(s.betas, ref.betas.double(), rtol=0, atol=2e-5)
    torch.testing.assert_close(s.alphas_cumprod, ref.alphas_cumprod.double(), rtol=0, atol=1e-6)


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="beta_schedule"):
        make(beta_schedule="quadratic")
    with pytest.raises(ConfigError, match="prediction_type"):
        make(prediction_type="sample")


# ---------------------------------------------------------------------------------------------
# Gathering


def test_alpha_bar_gathering_shapes_dtype_and_t_minus_one():
    s = make()
    x = torch.zeros(3, 2, 4, 4)
    t = torch.tensor([0, 5, 999])
    ab = s.alpha_bar(t, like=x)
    assert ab.shape == (3, 1, 1, 1) and ab.dtype == torch.float32
    torch.testing.assert_close(ab.flatten(), s.alphas_cumprod[t].float())
    assert s.alpha_bar(7, like=x).shape == ()  # scalar t broadcasts
    assert s.alpha_bar(torch.tensor(7), like=x).shape == ()
    assert s.alpha_bar(t).dtype == torch.float64 and s.alpha_bar(t).shape == (3,)
    assert s.alpha_bar(-1).item() == 1.0
    assert s.alpha_bar(torch.tensor([-1, 0]), like=x.double()).flatten().tolist() == [
        1.0, s.alphas_cumprod[0].item()]
    assert s.alpha_bar(t, like=torch.zeros(3)).shape == (3,)
    snr = s.snr(t)
    torch.testing.assert_close(snr, s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t]))


def test_bad_timesteps_are_rejected():
    s = make()
    x = torch.zeros(2, 1)
    with pytest.raises(UsageError):
        s.alpha_bar(1000, like=x)
    with pytest.raises(UsageError):
        s.alpha_bar(-2, like=x)
    with pytest.raises(UsageError):
        s.alpha_bar(torch.tensor([3, 1000]), like=x)
    with pytest.raises(TypeError):
        s.alpha_bar(torch.tensor([0.5, 1.0]), like=x)


# ---------------------------------------------------------------------------------------------
# Forward process and conversions


def _data(B=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, 3, 5, 5, generator=g, dtype=dtype) * 2 - 1
    noise = torch.randn(B, 3, 5, 5, generator=g, dtype=dtype)
    return x0, noise


def test_add_noise_is_ddpm_eq4_and_matches_diffusers():
    s = make()
    x0, noise = _data()
    t = torch.tensor([0, 1, 500, 999])
    ab = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(s.add_noise(x0, noise, t), ab.sqrt() * x0 + (1 - ab).sqrt() * noise,
                               rtol=0, atol=1e-14)
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler().add_noise(x0.float(), noise.float(), t)
    # diffusers takes sqrt(1 - ab) of float32 ab: at t = 0, 1 - 0.9999 keeps ~3 digits (relative
    # error ~6e-4 on a coefficient of 0.01), hence ~1e-5 absolute.
    torch.testing.assert_close(s.add_noise(x0.float(), noise.float(), t), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_target_matches_definitions(prediction_type):
    s = make(prediction_type)
    x0, noise = _data()
    t = torch.tensor([0, 10, 500, 999])
    ab = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = {"epsilon": noise, "x0": x0,
                "v": ab.sqrt() * noise - (1 - ab).sqrt() * x0}[prediction_type]
    torch.testing.assert_close(s.target(x0, noise, t), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_split_output_inverts_add_noise(prediction_type, rescale):
    if rescale and prediction_type == "epsilon":
        pytest.skip("epsilon cannot recover x0 at SNR 0 (documented); tested below without T-1")
    s = make(prediction_type, rescale_zero_terminal_snr=rescale)
    x0, noise = _data()
    for t in (torch.tensor([0, 1, 500, 999]), 0, 999, torch.tensor(250)):
        xt = s.add_noise(x0, noise, t)
        x0_hat, eps_hat = s.split_output(xt, t, s.target(x0, noise, t))
        # float64 throughout; x0 -> eps divides by sqrt(1 - ab) ~ 0.01 at t = 0.
        torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-10)
        torch.testing.assert_close(eps_hat, noise, rtol=0, atol=1e-10)


def test_split_output_epsilon_with_zero_terminal_snr_below_last_step():
    s = make("epsilon", rescale_zero_terminal_snr=True)
    x0, noise = _data()
    t = torch.tensor([0, 1, 500, 998])
    x0_hat, eps_hat = s.split_output(s.add_noise(x0, noise, t), t, noise)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-8)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_split_output_float32_follows_dtype(prediction_type):
    s = make(prediction_type)
    x0, noise = _data(dtype=torch.float32)
    t = torch.tensor([3, 999, 400, 20])
    xt = s.add_noise(x0, noise, t)
    assert xt.dtype == torch.float32
    x0_hat, eps_hat = s.split_output(xt, t, s.target(x0, noise, t))
    assert x0_hat.dtype == eps_hat.dtype == torch.float32
    # float32: eps recovered from x0-prediction at t=3 amplifies rounding by 1/sqrt(1-ab) ~ 40,
    # x0 from epsilon-prediction at t=999 by 1/sqrt(ab) ~ 160.
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-4)
    torch.testing.assert_close(eps_hat, noise, rtol=0, atol=1e-4)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_split_output_agrees_with_diffusers_x0(prediction_type):
    """The x0 estimate matches diffusers' pred_original_sample (DDIM step, no clipping)."""
    diffusers = pytest.importorskip("diffusers")
    name = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}[prediction_type]
    ref = diffusers.DDIMScheduler(prediction_type=name, clip_sample=False)
    ref.set_timesteps(50)
    s = make(prediction_type)
    g = torch.Generator().manual_seed(1)
    xt, out = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    for t in (ref.timesteps[0].item(), ref.timesteps[25].item(), ref.timesteps[-1].item()):
        expected = ref.step(out, t, xt).pred_original_sample
        torch.testing.assert_close(s.split_output(xt, t, out)[0], expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Loss


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_oracle_model_has_zero_loss(prediction_type):
    s = make(prediction_type)
    x0, noise = _data(B=6)
    t = torch.tensor([0, 1, 2, 500, 998, 999])
    out = s.target(x0, noise, t)  # a perfect model
    loss = diffusion_loss(s, out, x0, noise, t)
    assert loss.shape == (6,) and loss.dtype == torch.float64
    assert loss.abs().max().item() == 0.0
    assert diffusion_loss(s, out, x0, noise, t, min_snr_gamma=5.0).abs().max().item() == 0.0


def test_loss_is_per_sample_mse():
    s = make("v")
    x0, noise = _data(B=3, dtype=torch.float32)
    t = torch.tensor([5, 50, 500])
    out = torch.randn_like(x0)
    loss = diffusion_loss(s, out, x0, noise, t)
    assert loss.shape == (3,) and loss.dtype == torch.float32
    expected = ((out - s.target(x0, noise, t)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected)
    # half-precision outputs are reduced in float32
    assert diffusion_loss(s, out.half(), x0, noise, t).dtype == torch.float32


def test_min_snr_weights_hand_checked():
    gamma = 5.0
    t = torch.tensor([0, 999])
    # linear schedule: alpha_bar_0 = 1 - 1e-4 -> SNR 9999 (> gamma); at t=999, SNR ~ 4e-5 (< gamma)
    snr0 = 0.9999 / 1e-4
    snr_last = make().snr(999).item()
    assert make().snr(0).item() == pytest.approx(snr0, rel=1e-9)
    assert snr_last == pytest.approx(4.0358e-5, rel=1e-4)
    expected = {
        "epsilon": [gamma / snr0, 1.0],  # min(snr, g) / snr
        "v": [gamma / (snr0 + 1), snr_last / (snr_last + 1)],  # min(snr, g) / (snr + 1) = 5e-4
        "x0": [gamma, snr_last],  # min(snr, g)
    }
    for p, values in expected.items():
        w = make(p).loss_weight(t, gamma)
        assert w.dtype == torch.float64
        assert w.tolist() == pytest.approx(values, rel=1e-9), p
    assert make("v").loss_weight(0, gamma).item() == pytest.approx(5e-4, rel=1e-9)
    # SNR 0 (zero terminal SNR): the epsilon weight is 1, not 0/0
    assert make(rescale_zero_terminal_snr=True).loss_weight(999, gamma).item() == 1.0
    with pytest.raises(UsageError):
        make().loss_weight(t, 0.0)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_weighted_loss_is_weight_times_mse(prediction_type):
    s = make(prediction_type)
    x0, noise = _data(B=4, dtype=torch.float32)
    t = torch.tensor([0, 100, 600, 999])
    out = torch.randn_like(x0)
    plain = diffusion_loss(s, out, x0, noise, t)
    weighted = diffusion_loss(s, out, x0, noise, t, min_snr_gamma=5.0)
    assert weighted.shape == (4,)
    torch.testing.assert_close(weighted, plain * s.loss_weight(t, 5.0).float())


def test_loss_has_gradient_to_output():
    s = make()
    x0, noise = _data(B=2, dtype=torch.float32)
    out = torch.zeros_like(x0, requires_grad=True)
    diffusion_loss(s, out, x0, noise, torch.tensor([3, 7])).mean().backward()
    torch.testing.assert_close(out.grad, -2 * noise / noise[0].numel() / 2)


# ---------------------------------------------------------------------------------------------
# Training timestep densities (schedule.timestep_density)

N_DRAWS = 200_000
KS_LIMIT = 1.63 / math.sqrt(N_DRAWS)  # Kolmogorov-Smirnov, 1% level: ~0.0036


def _draws(seed: int = 0, **kw) -> torch.Tensor:
    return make("v", beta_schedule="cosine", **kw).sample_levels(
        N_DRAWS, torch.Generator().manual_seed(seed))


def _ks_distance(t: torch.Tensor, cdf: torch.Tensor) -> float:
    """The largest gap between the empirical CDF of the timesteps ``t`` and ``cdf`` (T,),
    P(t <= k) for k = 0..T-1."""
    counts = torch.bincount(t, minlength=cdf.numel()).to(torch.float64)
    return float((counts.cumsum(0) / t.numel() - cdf).abs().max())


def test_the_default_timestep_draw_is_unchanged_uniform():
    # bit for bit the draw of DDPM Algorithm 1 before the densities existed
    s = make("v", beta_schedule="cosine")
    assert s.config.timestep_density == "uniform"
    got = s.sample_levels(1000, torch.Generator().manual_seed(7))
    want = torch.randint(0, 1000, (1000,), generator=torch.Generator().manual_seed(7))
    assert got.dtype == torch.int64 and torch.equal(got, want)


def test_logit_normal_timesteps_follow_their_law():
    # P(t <= k) = P(u < (k + 1) / T) = Phi((logit((k + 1) / T) - m) / s)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    for m, s in ((0.0, 1.0), (-0.5, 0.7)):
        t = _draws(timestep_density="logit_normal", logit_mean=m, logit_std=s)
        assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= 999
        edges = torch.arange(1, 1001, dtype=torch.float64) / 1000
        cdf = normal.cdf((torch.logit(edges.clamp(max=1 - 1e-15)) - m) / s)
        cdf[-1] = 1.0
        assert _ks_distance(t, cdf) < KS_LIMIT
        uniform = torch.arange(1, 1001, dtype=torch.float64) / 1000
        assert _ks_distance(t, uniform) > 20 * KS_LIMIT  # the check has teeth


@pytest.mark.parametrize("mu, b", [(0.0, 0.5), (1.0, 2.0)])
def test_laplace_timesteps_follow_the_log_snr_law(mu, b):
    # t <= k exactly when lambda is at least the midpoint of log SNR_k and log SNR_{k+1} (the
    # nearest table entry); the Laplace CDF F gives P(t <= k) = 1 - F(midpoint).
    sched = make("v", beta_schedule="cosine")
    t = _draws(timestep_density="laplace", laplace_mean=mu, laplace_scale=b)
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= 999
    log_snr = sched.snr_table.log()
    mid = (log_snr[:-1] + log_snr[1:]) / 2
    laplace_cdf = torch.where(mid < mu, 0.5 * ((mid - mu) / b).exp(),
                              1 - 0.5 * (-(mid - mu) / b).exp())
    cdf = torch.cat([1 - laplace_cdf, torch.ones(1, dtype=torch.float64)])
    assert _ks_distance(t, cdf) < KS_LIMIT
    # the median timestep's log SNR is the centre mu (up to the table's spacing)
    assert float(log_snr[t.median()]) == pytest.approx(mu, abs=0.05)
    other = torch.cat([1 - torch.where(mid < mu + 1, 0.5 * ((mid - mu - 1) / b).exp(),
                                       1 - 0.5 * (-(mid - mu - 1) / b).exp()),
                       torch.ones(1, dtype=torch.float64)])
    assert _ks_distance(t, other) > 20 * KS_LIMIT  # the check has teeth


def test_densities_follow_the_generator_and_leave_the_global_rng_alone():
    for density in ("logit_normal", "laplace"):
        before = torch.get_rng_state()
        a = _draws(3, timestep_density=density)
        assert torch.equal(torch.get_rng_state(), before)
        assert torch.equal(a, _draws(3, timestep_density=density))
        assert not torch.equal(a, _draws(4, timestep_density=density))


def test_laplace_under_zero_terminal_snr_stays_in_range():
    s = make("v", beta_schedule="cosine", rescale_zero_terminal_snr=True,
             timestep_density="laplace", laplace_scale=20.0)
    t = s.sample_levels(50_000, torch.Generator().manual_seed(0))
    # the last log SNR is -inf: every finite lambda is nearer to T-2's
    assert int(t.min()) == 0 and int(t.max()) == 998


@pytest.mark.parametrize("key, value, words", [
    ("timestep_density", "laplce", "did you mean 'laplace'"),
    ("timestep_density", "mode", "is not one of 'uniform', 'logit_normal', 'laplace'"),
    ("laplace_scale", 0, "must be positive"),
    ("laplace_scale", -1.0, "must be positive"),
    ("logit_std", 0, "must be positive"),
    ("laplace_mean", "nan", "finite"),
])
def test_bad_timestep_densities_are_one_line_errors_naming_the_key(key, value, words):
    from diffunet.config import load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, ["schedule.formulation=vp", f"schedule.{key}={value}"])
    msg = str(info.value)
    assert msg.startswith(f"schedule.{key}: ") and "\n" not in msg and words in msg, msg


@pytest.mark.parametrize("key, value", [("timestep_density", "laplace"),
                                        ("laplace_scale", 1.0)])
def test_a_vp_density_key_under_flow_or_edm_is_refused_naming_vp(key, value):
    from diffunet.config import load_config

    for formulation in ("flow", "edm"):
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"schedule.formulation={formulation}", f"schedule.{key}={value}"])
        msg = str(info.value)
        assert msg.startswith(f"schedule.{key}: ") and "schedule.formulation=vp" in msg, msg


def test_a_density_round_trips_through_a_model_file(tmp_path):
    import diffunet
    from diffunet.unet import UNet, UNetConfig

    schedule = make("v", beta_schedule="cosine", timestep_density="laplace", laplace_mean=-1.0,
                    laplace_scale=0.8)
    net = UNet(UNetConfig(image_size=8, base_channels=8, num_groups=4, channel_mults=(1,),
                          attn_resolutions=()))
    diffunet.save_model(tmp_path / "m.safetensors", net, schedule)
    _, loaded, meta = diffunet.load_model(tmp_path / "m.safetensors")
    assert loaded.config == schedule.config
    assert meta["schedule_config"]["timestep_density"] == "laplace"
    g = torch.Generator().manual_seed(1)
    assert torch.equal(loaded.sample_levels(64, g), schedule.sample_levels(
        64, torch.Generator().manual_seed(1)))
    assert "Laplace log-SNR t (-1.0, 0.8)" in loaded.config.describe()
