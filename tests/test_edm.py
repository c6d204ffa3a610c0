"""The EDM formulation (Karras et al. 2022): Table 1's preconditioning, the log-normal training
noise levels, the loss weight, the config rules, and a tiny EDM run through train, load,
sample, info and eval bpd.

The reference values are the paper's formulas evaluated in Python floats, not anyone's code.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffunet
from diffunet import cli, load_model
from diffunet.config import RunConfig, ScheduleConfig, load_config, run_config_from_dict, to_dict
from diffunet.formulations.vp import NoiseSchedule
from diffunet.formulations import EDMDenoiser, EDMSchedule, edm_loss, make_schedule
from diffunet.errors import ConfigError, UsageError
from diffunet.likelihood import bits_per_dim
from diffunet.training import train
from diffunet.unet import UNet, UNetConfig
from helpers import perturbed, tiny_net, tiny_run

SIGMAS = [0.002, 0.05, 0.5, 1.0, 7.5, 80.0]
EDM = ScheduleConfig(formulation="edm")


def _table_1(sigma: float, sd: float) -> tuple[float, float, float, float]:
    """Karras et al. 2022, Table 1, "Network and preconditioning" (EDM column)."""
    return (sd**2 / (sigma**2 + sd**2), sigma * sd / math.sqrt(sigma**2 + sd**2),
            1 / math.sqrt(sigma**2 + sd**2), math.log(sigma) / 4)


# ---------------------------------------------------------------------------------------------
# Preconditioning, noising, the denoiser


@pytest.mark.parametrize("sd", [0.5, 1.3])
def test_preconditioning_equals_table_1(sd: float) -> None:
    schedule = EDMSchedule(ScheduleConfig(formulation="edm", sigma_data=sd))
    like = torch.zeros(len(SIGMAS), 3, 2, 2, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = schedule.preconditioning(
        torch.tensor(SIGMAS, dtype=torch.float64), like)
    assert c_skip.shape == c_out.shape == c_in.shape == (len(SIGMAS), 1, 1, 1)
    assert c_noise.shape == (len(SIGMAS),)
    want = torch.tensor([_table_1(s, sd) for s in SIGMAS], dtype=torch.float64)
    got = torch.stack([c_skip.flatten(), c_out.flatten(), c_in.flatten(), c_noise], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_small_sigma_gives_the_identity_and_large_sigma_the_scaled_network() -> None:
    schedule = EDMSchedule(EDM)
    like = torch.zeros(3, 1, 1, 1, dtype=torch.float64)
    c_skip, c_out, c_in, _ = schedule.preconditioning(
        torch.tensor([0.0, 1e-9, 1e9], dtype=torch.float64), like)
    assert c_skip.flatten().tolist()[:1] == [1.0] and c_out.flatten().tolist()[:1] == [0.0]
    torch.testing.assert_close(c_skip.flatten()[1:], torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(c_out.flatten()[1:], torch.tensor([0.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(c_in.flatten()[:2], torch.tensor([2.0, 2.0], dtype=torch.float64))

    # D(x; sigma -> 0) = x whatever the network says; exactly x at sigma = 0.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    wild = EDMDenoiser(lambda inp, t, class_labels=None: 1e3 * torch.randn(
        inp.shape, generator=g), schedule)
    assert torch.equal(wild(x, torch.zeros(2)), x)
    torch.testing.assert_close(wild(x, torch.full((2,), 1e-8)), x, rtol=0, atol=1e-4)


def test_denoiser_feeds_the_network_c_in_x_and_ln_sigma_over_4() -> None:
    schedule = EDMSchedule(EDM)
    seen = {}

    def net(inp, t, class_labels=None):
        seen.update(inp=inp, t=t, labels=class_labels)
        return torch.ones_like(inp)

    denoiser = schedule.denoiser(net)
    assert isinstance(denoiser, EDMDenoiser)
    assert (denoiser.sigma_min, denoiser.sigma_max) == (0.002, 80.0)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 20.0], dtype=torch.float64)  # float64 sigma, float32 x
    labels = torch.tensor([1, 0])
    out = denoiser(x, sigma, class_labels=labels)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert seen["labels"] is labels and seen["t"].shape == (2,)
    assert seen["t"].dtype.is_floating_point
    for b, s in enumerate(sigma.tolist()):
        c_skip, c_out, c_in, c_noise = _table_1(s, 0.5)
        torch.testing.assert_close(seen["inp"][b], c_in * x[b])
        assert seen["t"][b].item() == pytest.approx(c_noise, rel=1e-6)
        torch.testing.assert_close(out[b], c_skip * x[b] + c_out)
    # One sigma for the batch (a float) gives a (B,) c_noise too.
    denoiser(x, 2.0)
    assert seen["t"].shape == (2,)


def test_add_noise_is_x0_plus_sigma_noise_and_bad_sigma_shapes_are_refused() -> None:
    schedule = EDMSchedule(EDM)
    x0, noise = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    xt = schedule.add_noise(x0, noise, torch.tensor([0.5, 3.0]))
    assert xt[:, 0, 0, 0].tolist() == [2.0, 7.0]
    with pytest.raises(UsageError, match=r"sigma must be a scalar or a \(B,\) tensor"):
        schedule.add_noise(x0, noise, torch.ones(3))


# ---------------------------------------------------------------------------------------------
# Training noise levels and the loss


def test_log_normal_sigmas_have_the_configured_statistics_and_follow_the_generator() -> None:
    schedule = EDMSchedule(EDM)
    before = torch.get_rng_state()
    sigmas = schedule.sample_sigmas(20000, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    assert sigmas.shape == (20000,) and (sigmas > 0).all()
    log = sigmas.log()
    assert log.mean().item() == pytest.approx(-1.2, abs=0.03)
    assert log.std().item() == pytest.approx(1.2, abs=0.03)
    assert torch.equal(schedule.sample_sigmas(20000, torch.Generator().manual_seed(3)), sigmas)
    assert not torch.equal(schedule.sample_sigmas(20000, torch.Generator().manual_seed(4)),
                           sigmas)
    other = EDMSchedule(ScheduleConfig(formulation="edm", p_mean=0.5, p_std=0.25))
    log = other.sample_sigmas(20000, torch.Generator().manual_seed(3)).log()
    assert log.mean().item() == pytest.approx(0.5, abs=0.01)
    assert log.std().item() == pytest.approx(0.25, abs=0.01)


def test_edm_loss_equals_the_lambda_weighted_denoiser_error() -> None:
    schedule = EDMSchedule(EDM)
    g = torch.Generator().manual_seed(5)
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    x0 = torch.rand(len(SIGMAS), 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    out = torch.randn(x0.shape, generator=g, dtype=torch.float64)  # any network output F
    # lambda(sigma) c_out(sigma)^2 = 1 (eq. 8)
    _, c_out, _, _ = schedule.preconditioning(sigma, x0)
    torch.testing.assert_close(schedule.loss_weight(sigma) * c_out.flatten() ** 2,
                               torch.ones_like(sigma), rtol=1e-12, atol=0)
    # The unit-weighted F-space loss is lambda ||D - x0||^2 with D from the same output.
    x = schedule.add_noise(x0, noise, sigma)
    d = schedule.denoiser(lambda inp, t, class_labels=None: out)(x, sigma)
    weighted = schedule.loss_weight(sigma) * (d - x0).square().mean(dim=(1, 2, 3))
    loss = edm_loss(schedule, out, x0, noise, sigma)
    assert loss.shape == (len(SIGMAS),)
    torch.testing.assert_close(loss, weighted, rtol=1e-8, atol=0)
    # The closed-form target is (x0 - c_skip x) / c_out.
    c_skip, c_out, _, _ = schedule.preconditioning(sigma, x0)
    torch.testing.assert_close(schedule.training_target(x0, noise, sigma),
                               (x0 - c_skip * x) / c_out, rtol=1e-9, atol=1e-9)
    # Half-precision outputs are reduced in float32.
    assert edm_loss(schedule, out.half(), x0.float(), noise.float(), sigma.float()).dtype \
        == torch.float32


# ---------------------------------------------------------------------------------------------
# Config


def test_the_default_run_takes_formulation_edm_without_resetting_vp_fields() -> None:
    cfg = load_config(None, ["schedule.formulation=edm"])
    assert cfg.schedule.formulation == "edm" and cfg.schedule.prediction_type == "v"
    assert cfg.schedule.used_fields() == ("formulation", "sigma_data", "sigma_min", "sigma_max",
                                          "p_mean", "p_std")
    assert cfg.schedule.table_timesteps is None
    assert isinstance(make_schedule(cfg.schedule), EDMSchedule)
    # A config.json (or model file) written before formulations existed is VP, though the
    # run default is flow now: run_config_from_dict reads stored configs.
    old = to_dict(RunConfig())
    for key in ("formulation", "sigma_data", "sigma_min", "sigma_max", "p_mean", "p_std"):
        del old["schedule"][key]
    assert run_config_from_dict(old).schedule.formulation == "vp"
    assert isinstance(make_schedule(run_config_from_dict(old).schedule), NoiseSchedule)


def test_a_model_file_from_before_formulations_loads_as_vp(tmp_path: Path) -> None:
    path = tmp_path / "old.safetensors"
    diffunet.save_model(path, UNet(UNetConfig(**tiny_net(8))), NoiseSchedule(ScheduleConfig(
        beta_schedule="cosine")))
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    stored = json.loads(header["__metadata__"]["schedule_config"])
    for key in ("formulation", "sigma_data", "sigma_min", "sigma_max", "p_mean", "p_std"):
        stored.pop(key, None)  # what an older diffunet wrote (a new one writes VP's keys only)
    header["__metadata__"]["schedule_config"] = json.dumps(stored)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])
    _, schedule, _ = load_model(path)
    assert isinstance(schedule, NoiseSchedule) and schedule.config.formulation == "vp"
    assert schedule.config.beta_schedule == "cosine"


@pytest.mark.parametrize("override, key", [
    ("schedule.sigma_data=0.3", "schedule.sigma_data"),
    ("schedule.p_std=2.0", "schedule.p_std"),
])
def test_an_edm_field_under_vp_is_a_one_line_error_naming_it(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert msg.startswith(f"{key}: ") and "\n" not in msg
    assert "schedule.formulation=edm" in msg


@pytest.mark.parametrize("overrides, key", [
    (["schedule.sigma_max=0.001"], "schedule.sigma_max"),
    (["schedule.sigma_data=0"], "schedule.sigma_data"),
    (["schedule.p_std=-1"], "schedule.p_std"),
    (["schedule.sigma_min=nan"], "schedule.sigma_min"),
])
def test_bad_edm_values_are_one_line_errors_naming_the_key(overrides: list[str],
                                                           key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["schedule.formulation=edm", *overrides])
    assert str(info.value).startswith(f"{key}: ") and "\n" not in str(info.value)


def test_each_schedule_class_refuses_the_other_formulation() -> None:
    with pytest.raises(ConfigError, match="schedule.formulation: NoiseSchedule is the discrete"):
        NoiseSchedule(EDM)
    with pytest.raises(ConfigError, match="schedule.formulation: EDMSchedule needs 'edm'"):
        EDMSchedule(ScheduleConfig())
    with pytest.raises(UsageError, match="bits/dim is implemented for the discrete VP bound"):
        bits_per_dim(lambda x, t, class_labels=None: x, EDMSchedule(EDM), torch.zeros(1, 3, 4, 4))


# ---------------------------------------------------------------------------------------------
# A tiny EDM run, end to end


def _model_files(out: Path) -> list[Path]:
    return sorted((out / "weights").glob("*.safetensors"))


def test_edm_training_run_loads_samples_and_describes_itself(
        tmp_path: Path, cpu_accelerate: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = [*tiny_run(image_size=8), "schedule.formulation=edm", "train.max_steps=3",
            "train.sample_every=3", "train.save_every=3", "train.log_every=1"]
    said: list[str] = []
    train(load_config(None, args), out, progress=False, say=said.append)
    header = said[1]
    assert "EDM formulation (Karras et al. 2022): sigma_data 0.5, sigma 0.002 to 80.0" in header
    # left at the default run's value, the VP weighting is not mentioned (the default flow run
    # would print it every time); set, it is (tests/test_flow.py)
    assert "min_snr_gamma" not in header and "timesteps" not in header
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()
              if "loss" in line]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert (out / "samples" / "step0000003.png").is_file()  # the preview sampled the EDM model

    (model_file,) = _model_files(out)
    net, schedule, meta = load_model(model_file)
    assert isinstance(schedule, EDMSchedule) and schedule.sigma_data == 0.5
    assert meta["schedule_config"]["formulation"] == "edm"
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images = diffunet.sample(net, schedule, x_T, sampler="heun", num_steps=4,
                             generator=torch.Generator().manual_seed(1))
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()

    assert cli.main(["info", str(model_file)]) == 0
    shown = capsys.readouterr().out
    assert "schedule         EDM formulation (Karras et al. 2022)" in shown
    assert '  formulation = "edm"' in shown and "  sigma_data = 0.5" in shown
    assert "beta_schedule" not in shown and "prediction_type" not in shown

    assert cli.main(["eval", "bpd", str(model_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bits/dim is implemented for the discrete VP bound" in err
    assert "EDM model" in err


def test_edm_resume_equals_the_uninterrupted_run(tmp_path: Path, cpu_accelerate: None) -> None:
    common = [*tiny_run(image_size=8), "schedule.formulation=edm", "train.sample_every=100",
              "train.save_every=2", "unet.dropout=0.3"]
    full, half = tmp_path / "full", tmp_path / "half"
    train(load_config(None, [*common, "train.max_steps=4"]), full, progress=False)
    train(load_config(None, [*common, "train.max_steps=2"]), half, progress=False)
    train(load_config(None, [*common, "train.max_steps=4"]), half, resume=True, progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(full / "state" / "step0000004" / name))
        b = load_file(str(half / "state" / "step0000004" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_unet_trained_under_edm_is_still_a_plain_network() -> None:
    # The network knows nothing about noise: the same UNet class, called with a float level.
    net = perturbed(UNet(UNetConfig(**tiny_net(8))))
    schedule = EDMSchedule(EDM)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        d = schedule.denoiser(net)(x, torch.tensor([0.1, 10.0]))
    assert d.shape == x.shape and torch.isfinite(d).all()


def test_the_edm_training_objective_is_one_graph() -> None:
    # What train.compile compiles: noising, preconditioning, forward and loss, no graph break.
    import torch._dynamo as dynamo

    from diffunet.training import step_loss

    net = UNet(UNetConfig(**tiny_net(8))).train()
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    dynamo.reset()
    report = dynamo.explain(step_loss)(net, EDMSchedule(EDM), x0, torch.randn_like(x0),
                                       torch.tensor([0.1, 5.0]), {}, 5.0)
    assert (report.graph_count, report.graph_break_count) == (1, 0), report.break_reasons
