"""The formulation contract, checked for every registered formulation (docs/design.md, "The
formulation contract"): a fourth formulation gets all of this by registering in
``diffunet.formulations.FORMULATIONS``.

For each: the denoiser's boundary condition D(x0 + sigma n; sigma -> 0) -> x0 for any network;
the loss is zero at the ideal output (``ideal_output``, the one-image data set's perfect
network); a model file round-trips; a delta distribution is recovered by ``sample()`` with that
oracle for every sampler and grid; the training objective is one compiled graph; the time
input of every network call reads back as its sigma (``sigma_of_time_input``, the guidance
interval's); ``network_fields`` are exactly the keys that change a network's denoiser; and each
capability attribute agrees with what the commands do.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import get_args

import pytest
import torch

import diffunet
from diffunet.config import RunConfig, ScheduleConfig, UNetConfig, load_config
from diffunet.errors import ConfigError, ModelFileError, UsageError
from diffunet.formulations.base import DEFAULT_SIGMA_MAX
from diffunet.formulations import (FORMULATIONS, Formulation, FormulationName, StepOptions,
                                   make_schedule)
from diffunet.samplers import SAMPLERS, SIGMA_GRIDS, default_grid, make_sigmas, sample
from diffunet.unet import UNet
from helpers import perturbed, tiny_net

NAMES = list(FORMULATIONS)
SHAPE = (2, 3, 8, 8)


def _schedule(name: str, **fields) -> Formulation:
    return make_schedule(ScheduleConfig(formulation=name, **fields))


def _oracle(schedule: Formulation, c: torch.Tensor):
    """The perfect network for the one-image data set {c}."""
    return lambda x, t, class_labels=None: schedule.ideal_output(x, t, c.expand_as(x))


def _image(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, *SHAPE[1:], generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_the_registry_holds_every_formulation_name_the_config_accepts() -> None:
    assert tuple(FORMULATIONS) == get_args(FormulationName) == ("vp", "edm", "flow")
    for name, cls in FORMULATIONS.items():
        assert cls.name == name and issubclass(cls, Formulation)
        assert isinstance(make_schedule(ScheduleConfig(formulation=name)), cls)


def test_every_schedule_key_belongs_to_a_formulation() -> None:
    claimed = {f for cls in FORMULATIONS.values() for f in cls.config_fields}
    keys = {f.name for f in dataclasses.fields(ScheduleConfig)} - {"formulation"}
    assert claimed == keys
    for name, cls in FORMULATIONS.items():
        assert ScheduleConfig(formulation=name).used_fields() == ("formulation",
                                                                  *cls.config_fields)


@pytest.mark.parametrize("name", NAMES)
def test_another_formulations_key_is_refused_naming_it(name: str) -> None:
    cls = FORMULATIONS[name]
    default = FORMULATIONS[ScheduleConfig().formulation]
    for other in FORMULATIONS.values():
        for key in set(other.config_fields) - set(cls.config_fields) - set(default.config_fields):
            value = getattr(ScheduleConfig(), key)
            changed = (not value) if isinstance(value, bool) else (
                value * 1.5 + 0.25 if isinstance(value, (int, float)) else None)
            if changed is None:
                continue
            with pytest.raises(ConfigError) as e:
                load_config(None, [f"schedule.formulation={name}", f"schedule.{key}={changed}"])
            msg = str(e.value)
            assert msg.startswith(f"schedule.{key}: ") and "\n" not in msg
            assert f"schedule.formulation={other.name}" in msg


@pytest.mark.parametrize("name", NAMES)
def test_the_denoiser_tends_to_the_data_as_sigma_goes_to_zero_for_any_network(name: str) -> None:
    # Karras et al. 2022, sec. 2: D(x; sigma) -> x as sigma -> 0; x = x0 + sigma n.
    schedule = _schedule(name)
    net = perturbed(UNet(UNetConfig(**tiny_net(8)))).eval()
    d = schedule.denoiser(net)
    x0, n = _image(1).expand(*SHAPE), torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    errors = []
    with torch.no_grad():
        for sigma in (1e-1, 1e-2, 1e-3, 1e-4):
            errors.append(float((d(x0 + sigma * n, torch.full((2,), sigma)) - x0).abs().max()))
    assert errors[-1] < 1e-3 and errors[-1] < errors[0], errors


@pytest.mark.parametrize("name", NAMES)
def test_the_loss_is_zero_at_the_ideal_output(name: str) -> None:
    schedule = _schedule(name)
    g = torch.Generator().manual_seed(3)
    c = _image(4)
    x0 = c.expand(*SHAPE).clone()
    noise = torch.randn(SHAPE, generator=g)
    levels = schedule.sample_levels(2, g)
    loss = schedule.loss(_oracle(schedule, c), x0, noise, levels, min_snr_gamma=5.0)
    assert loss.shape == (2,) and float(loss.max()) < 1e-8
    wrong = schedule.loss(lambda x, t, class_labels=None: torch.zeros_like(x), x0, noise, levels)
    assert float(wrong.min()) > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_a_model_file_round_trips_its_formulation(name: str, tmp_path: Path) -> None:
    schedule = _schedule(name)
    net = perturbed(UNet(UNetConfig(**tiny_net(8))))
    diffunet.save_model(tmp_path / "m.safetensors", net, schedule)
    net2, schedule2, meta = diffunet.load_model(tmp_path / "m.safetensors")
    assert type(schedule2) is type(schedule) and schedule2.config == schedule.config
    assert set(meta["schedule_config"]) == set(schedule.config.used_fields())
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                 net2.state_dict().values()))


@pytest.mark.parametrize("name", NAMES)
def test_sample_recovers_a_delta_distribution_with_the_oracle_for_every_sampler(
        name: str) -> None:
    schedule = _schedule(name)
    c = _image(5)
    grids = [None, *(g for g in SIGMA_GRIDS if g != "uniform" or schedule.uniform_grid)]
    for sampler in SAMPLERS:
        for grid in grids:
            g = torch.Generator().manual_seed(6)
            x_T = torch.randn(SHAPE, generator=g)
            out = sample(_oracle(schedule, c), schedule, x_T, sampler=sampler, num_steps=6,
                         sigmas=grid, generator=g, clip_x0=False)
            err = float((out - c).abs().max())
            assert err < 1e-3, (sampler, grid, err)


@pytest.mark.parametrize("condition", ["none", "image"])
@pytest.mark.parametrize("name", NAMES)
def test_the_training_objective_is_one_graph(name: str, condition: str) -> None:
    import torch._dynamo as dynamo

    from diffunet.training import step_loss

    schedule = _schedule(name)
    net = UNet(UNetConfig(**tiny_net(8, cond_channels=2 if condition == "image" else 0))).train()
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(SHAPE, generator=g)
    levels = schedule.sample_levels(2, g)
    cond = {"cond_image": torch.randn(2, 2, 8, 8, generator=g)} if condition == "image" else {}
    dynamo.reset()
    report = dynamo.explain(step_loss)(net, schedule, x0, torch.randn_like(x0), levels, cond,
                                       5.0)
    assert (report.graph_count, report.graph_break_count) == (1, 0), report.break_reasons


@pytest.mark.parametrize("name", NAMES)
def test_sigma_of_time_input_reads_back_the_level_of_every_network_call(name: str) -> None:
    # The guidance interval sees only the network's inputs: the time input of every way the
    # network is called must read back as the sigma of the denoiser view, x = x0 + sigma n.
    schedule = _schedule(name)
    times: list[torch.Tensor] = []

    def net(x, t, class_labels=None):
        times.append(t)
        return 0.5 * x

    def read(t: torch.Tensor) -> list[float]:
        got = schedule.sigma_of_time_input(t)
        assert got.shape == t.shape and got.dtype == torch.float64
        return got.tolist()

    def close(got: list[float], want: list[float]) -> bool:
        return len(got) == len(want) and all(
            g == w or math.isclose(g, w, rel_tol=1e-4) for g, w in zip(got, want))

    # training: what network_input feeds it; sigma = add_noise(0, 1) / add_noise(1, 0), since
    # every formulation's noised image is c (x0 + sigma n)
    levels = schedule.sample_levels(64, torch.Generator().manual_seed(9))
    ones = torch.ones(64, 1, 1, 1)
    _, time_in = schedule.network_input(0 * ones, ones, levels)
    want = (schedule.add_noise(0 * ones, ones, levels) / schedule.add_noise(ones, 0 * ones, levels))
    assert close(read(time_in), want.double().flatten().tolist())
    # sampling in sigma space: the denoiser at grid levels, float32 and float64 images
    sigmas = make_sigmas(schedule, 12, "karras")[:-1].tolist()
    for dtype in (torch.float32, torch.float64):
        times.clear()
        d = schedule.denoiser(net)
        for s in sigmas:
            d(torch.zeros(2, 3, 4, 4, dtype=dtype), torch.full((2,), s, dtype=torch.float64))
        assert close([read(t)[0] for t in times], sigmas), dtype
    # the native paths, where a formulation has them, at their own levels (inf: pure noise)
    for sampler in schedule.native_samplers:
        times.clear()
        sample(net, schedule, torch.zeros(2, 3, 4, 4), sampler=sampler, num_steps=6,
               sigmas="uniform", generator=torch.Generator().manual_seed(0))
        levels = schedule.uniform_sigmas(6, "trailing")[:-1].tolist()
        assert all(any(g == v or math.isclose(g, v, rel_tol=1e-4) for v in levels)
                   for t in times for g in read(t)), sampler


def _another_value(key: str, value):
    """A valid other value of a ``[schedule]`` key (None where none is found)."""
    import typing

    from diffunet.config import field_types

    tp = field_types(ScheduleConfig)[key]
    if isinstance(value, bool):
        return not value
    if typing.get_origin(tp) is typing.Literal:
        return next(c for c in typing.get_args(tp) if c != value)
    if isinstance(value, int):
        return value + 7
    return value * 1.1 + 0.05


@pytest.mark.parametrize("name", NAMES)
def test_network_fields_are_the_keys_that_change_what_the_network_predicts(name: str) -> None:
    # autoguidance combines two networks' outputs when their formulations agree on
    # network_fields: every other key must leave a given network's denoiser exactly as it was,
    # and every one of them must change it
    cls = FORMULATIONS[name]
    keys = cls.config_fields if cls.network_fields is None else cls.network_fields
    assert set(keys) <= set(cls.config_fields)
    base = ScheduleConfig(formulation=name)
    schedule = make_schedule(base)
    net = perturbed(UNet(UNetConfig(**tiny_net(8)))).eval()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    tried = 0
    with torch.no_grad():
        ref = [schedule.denoiser(net)(x * s, torch.full((2,), s)) for s in (0.3, 2.0)]
        for key in cls.config_fields:
            try:
                other = make_schedule(dataclasses.replace(
                    base, **{key: _another_value(key, getattr(base, key))}))
            except ConfigError:
                continue
            tried += 1
            same = all(torch.equal(r, other.denoiser(net)(x * s, torch.full((2,), s)))
                       for r, s in zip(ref, (0.3, 2.0)))
            assert same == (key not in keys), key
            problem = schedule.network_difference(other)
            assert (problem is None) == same, key
            if problem is not None:
                assert problem.startswith(f"its schedule.{key} is ")
    assert tried >= len(cls.config_fields) - 1
    other = next(n for n in NAMES if n != name)
    assert schedule.network_difference(_schedule(other)).startswith("it is ")


# ---------------------------------------------------------------------------------------------
# The capabilities say what the commands do


@pytest.mark.parametrize("name", NAMES)
def test_discrete_timesteps_is_what_caps_the_step_count(name: str) -> None:
    cls = FORMULATIONS[name]
    # T = 10 where the formulation reads it (setting a key it does not read is refused)
    small_t = "num_train_timesteps" in cls.config_fields
    steps = 11 if small_t else ScheduleConfig().num_train_timesteps + 1
    over = [f"schedule.formulation={name}", f"sample.num_steps={steps}", "sample.sigmas=karras",
            *(["schedule.num_train_timesteps=10"] if small_t else [])]
    if cls.discrete_timesteps:
        with pytest.raises(ConfigError, match=f"sample.num_steps: {steps} is more than"):
            load_config(None, over)
    else:
        assert load_config(None, over).sample.num_steps == steps


@pytest.mark.parametrize("name", NAMES)
def test_uniform_grid_is_what_make_sigmas_uniform_accepts(name: str) -> None:
    schedule = _schedule(name)
    if schedule.uniform_grid:
        grid = make_sigmas(schedule, 5, "uniform")
        assert grid.shape == (6,) and grid[-1] == 0 and torch.isfinite(grid).all()
        assert bool((grid[:-1] > grid[1:]).all())
    else:
        with pytest.raises(UsageError, match="uniform"):
            make_sigmas(schedule, 5, "uniform")
        with pytest.raises(ConfigError, match="sample.sigmas"):
            load_config(None, [f"schedule.formulation={name}", "sample.sigmas=uniform"])


@pytest.mark.parametrize("name", NAMES)
def test_native_samplers_are_the_ones_with_a_native_path_and_default_to_uniform(
        name: str) -> None:
    schedule = _schedule(name)
    net = lambda x, t: x  # noqa: E731 - never called here
    for sampler in SAMPLERS:
        native = schedule.native_path(net, StepOptions(sampler, 4), "uniform", None)
        assert (native is not None) == (sampler in schedule.native_samplers), sampler
        assert default_grid(schedule, sampler) == ("uniform" if native else "karras")
        for grid in ("karras", "exponential"):
            assert schedule.native_path(net, StepOptions(sampler, 4), grid, None) is None


@pytest.mark.parametrize("name", NAMES)
def test_variational_bound_is_what_eval_bpd_accepts(name: str) -> None:
    from diffunet.likelihood import require_vp_bound

    schedule = _schedule(name)
    if schedule.variational_bound:
        require_vp_bound(schedule)
    else:
        with pytest.raises(UsageError, match="bits/dim is implemented") as e:
            require_vp_bound(schedule)
        assert f"schedule.formulation = '{name}'" in str(e.value)


@pytest.mark.parametrize("name", NAMES)
def test_diffusers_scheduler_is_what_export_writes(name: str, tmp_path: Path) -> None:
    from diffunet.interop import export_diffusers
    from diffunet.fileio import read_json

    schedule = _schedule(name)
    model = tmp_path / "m.safetensors"
    diffunet.save_model(model, UNet(UNetConfig(**tiny_net(8))), schedule)
    if schedule.diffusers_scheduler is None:
        with pytest.raises(ModelFileError, match=f"schedule.formulation = '{name}'"):
            export_diffusers(model, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    else:
        r = export_diffusers(model, tmp_path / "out")
        written = read_json(tmp_path / "out" / "scheduler" / "scheduler_config.json")
        # (a VP file whose [sample] sampler is ddpm writes its sibling, DDPMScheduler)
        assert written["_class_name"] == r["scheduler"] == schedule.diffusers_scheduler


@pytest.mark.parametrize("name", NAMES)
def test_timestep_inputs_is_what_inspect_accepts(name: str, tmp_path: Path) -> None:
    from diffunet.inspection import inspect_model

    schedule = _schedule(name)
    model = tmp_path / "m.safetensors"
    diffunet.save_model(model, perturbed(UNet(UNetConfig(**tiny_net(8)))), schedule)
    if schedule.timestep_inputs:
        result = inspect_model(model, tmp_path / "out", t=3, device="cpu")
        assert result.input["t"] == 3 and (tmp_path / "out" / "noised.png").is_file()
    else:
        with pytest.raises(UsageError, match="no training timesteps for --t"):
            inspect_model(model, tmp_path / "out", t=3, device="cpu")


@pytest.mark.parametrize("name", NAMES)
def test_min_snr_weighting_is_whether_the_loss_takes_min_snr_gamma(name: str) -> None:
    schedule = _schedule(name)
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(SHAPE, generator=g)
    noise = torch.randn(SHAPE, generator=g)
    levels = schedule.sample_levels(2, g)
    net = lambda x, t, class_labels=None: 0.5 * x  # noqa: E731
    plain = schedule.loss(net, x0, noise, levels)
    weighted = schedule.loss(net, x0, noise, levels, min_snr_gamma=0.5)
    assert torch.equal(plain, weighted) != schedule.min_snr_weighting
    if not schedule.min_snr_weighting:
        assert schedule.own_weighting  # what the training header says instead


def test_a_run_config_of_each_formulation_describes_itself() -> None:
    for name, cls in FORMULATIONS.items():
        cfg = load_config(None, [f"schedule.formulation={name}"])
        assert isinstance(cfg, RunConfig) and cfg.schedule.describe() == cls.describe(
            cfg.schedule)
        assert (cfg.schedule.table_timesteps or 0) == cls.table_entries(cfg.schedule)
        schedule = make_schedule(cfg.schedule)
        assert math.isfinite(schedule.grid_range()[1])
        # the grids' default range lies within the model's whole range and starts no higher
        # than the cap unless the formulation states its own (EDM)
        (lo, hi), (full_lo, full_hi) = schedule.default_range(), schedule.grid_range()
        assert full_lo <= lo < hi <= full_hi
        assert hi <= DEFAULT_SIGMA_MAX or (lo, hi) == (full_lo, full_hi)
