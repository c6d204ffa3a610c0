"""Guidance (diffunet/guidance.py, through ``sample()``): autoguidance equals the hand-written
D_weak + w (D_main - D_weak) on every sampler and grid of every formulation, w = 1 is the main
model exactly, the guidance interval switches exactly at its ends (for autoguidance and
classifier-free guidance, on sigma-space and native paths), the batched pair of networks equals
two calls, the network count is honest, and a guide that cannot guide is refused.

The command line (``diffunet sample --guide-model``) is checked against the library in
test_sampling.py; its bad input in test_bad_input.py and the hostile suite.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import diffunet
from diffunet import guidance
from diffunet.config import ScheduleConfig, UNetConfig
from diffunet.errors import UsageError
from diffunet.formulations import FORMULATIONS, Formulation, make_schedule
from diffunet.guidance import (INTERVAL_RTOL, NetworkCount, StackedNetworks, guided_network,
                               stackable)
from diffunet.samplers import SAMPLERS, SIGMA_GRIDS, make_sigmas, network_calls, sample
from diffunet.unet import UNet
from helpers import perturbed, tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = list(FORMULATIONS)
SHAPE = (2, 3, 8, 8)


def _schedule(name: str) -> Formulation:
    return make_schedule(ScheduleConfig(formulation=name))


def _net(seed: int, image_size: int = 8, **overrides) -> UNet:
    return perturbed(UNet(UNetConfig(**tiny_net(image_size, **overrides))), seed).eval()


def _small(seed: int) -> UNet:
    """A smaller network of the same images: another architecture (two calls)."""
    return _net(seed, base_channels=4, num_groups=2, attn_resolutions=())


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _grids(schedule: Formulation) -> list:
    return [None, *(g for g in SIGMA_GRIDS if g != "uniform" or schedule.uniform_grid)]


class Recorder:
    """A fake network: a fixed smooth function of (x, t, labels); records the t of each call."""

    def __init__(self, scale: float) -> None:
        self.scale, self.times = scale, []

    def __call__(self, x, t, class_labels=None):
        self.times.append(t.clone())
        y = 0.0 if class_labels is None else class_labels.view(-1, 1, 1, 1).to(x.dtype) / 10
        return self.scale * torch.tanh(x) + y


# ---------------------------------------------------------------------------------------------
# Autoguidance = D_weak + w (D_main - D_weak), written once for every path


@pytest.mark.parametrize("name", NAMES)
def test_autoguidance_is_the_hand_written_combination_on_every_sampler_and_grid(
        name: str) -> None:
    schedule = _schedule(name)
    main, weak, w = _net(1), _small(2), 2.5

    def by_hand(x, t, class_labels=None):
        return weak(x, t) + w * (main(x, t) - weak(x, t))

    for sampler in SAMPLERS:
        for grid in _grids(schedule):
            kw = dict(sampler=sampler, num_steps=3, sigmas=grid)
            got = sample(main, schedule, _noise(), guide_model=weak, guidance_scale=w,
                         generator=torch.Generator().manual_seed(7), **kw)
            want = sample(by_hand, schedule, _noise(), generator=torch.Generator().manual_seed(7),
                          **kw)
            assert torch.equal(got, want), (sampler, grid)
    # and guidance changed something: the unguided sample is another one
    plain = sample(main, schedule, _noise(), num_steps=3)
    assert not torch.allclose(plain, sample(main, schedule, _noise(), num_steps=3,
                                            guide_model=weak, guidance_scale=w))


def test_a_conditional_guide_gets_the_same_labels_and_no_null_label() -> None:
    schedule = _schedule("edm")  # EDM's denoiser passes class_labels=None through the wrapper
    main, weak = _net(1, num_classes=3), _net(2, num_classes=3, base_channels=4, num_groups=2)
    y, w = torch.tensor([0, 2]), 2.0

    def by_hand(x, t, class_labels=None):
        a, b = main(x, t, class_labels=class_labels), weak(x, t, class_labels=class_labels)
        return b + w * (a - b)

    got = sample(main, schedule, _noise(), num_steps=3, class_labels=y, guide_model=weak,
                 guidance_scale=w)
    want = sample(by_hand, schedule, _noise(), num_steps=3, class_labels=y)
    assert torch.equal(got, want)


def test_class_conditional_edm_samples_with_labels() -> None:
    # Before: the label-binding wrapper refused the class_labels=None an EDM denoiser passes
    # on, so a conditional EDM model could not be sampled with labels at all (TypeError).
    schedule, net, y = _schedule("edm"), _net(1, num_classes=3), torch.tensor([0, 2])
    for scale in (1.0, 2.0):
        out = sample(net, schedule, _noise(), num_steps=2, class_labels=y, guidance_scale=scale)
        assert out.shape == SHAPE and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_weight_one_is_the_main_model_exactly_and_never_calls_the_guide(name: str) -> None:
    schedule, main = _schedule(name), _net(1)

    def guide(*args, **kwargs):
        raise AssertionError("the guide was called at w = 1")

    for sampler in ("dpmpp-2m", "heun"):
        got = sample(main, schedule, _noise(), sampler=sampler, num_steps=3, guide_model=guide,
                     guidance_scale=1.0, guidance_interval=(0.1, 10.0))
        assert torch.equal(got, sample(main, schedule, _noise(), sampler=sampler, num_steps=3))


# ---------------------------------------------------------------------------------------------
# The guidance interval


def _paths(schedule: Formulation) -> list[tuple[str, str, list[float]]]:
    """(sampler, grid, the sigma of each step's call) of a sigma-space path and, where the
    formulation has one, a native path (its levels as sigma; inf at pure noise)."""
    n = 6
    found = [("euler", "karras", make_sigmas(schedule, n, "karras")[:-1].tolist())]
    if schedule.native_samplers:
        sampler = "ddim" if "ddim" in schedule.native_samplers else schedule.native_samplers[0]
        found.append((sampler, "uniform", schedule.uniform_sigmas(n, "trailing")[:-1].tolist()))
    return found


def _guided_levels(schedule: Formulation, times: list[torch.Tensor]) -> list[float]:
    return [float(schedule.sigma_of_time_input(t)[0]) for t in times]


def _same_levels(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and all(
        g == w or math.isclose(g, w, rel_tol=INTERVAL_RTOL) for g, w in zip(got, want))


@pytest.mark.parametrize("name", NAMES)
def test_the_interval_switches_autoguidance_exactly_at_its_ends(name: str) -> None:
    schedule = _schedule(name)
    for sampler, grid, levels in _paths(schedule):
        finite = [s for s in levels if math.isfinite(s)]
        hi, lo = finite[1], finite[4]  # grid levels themselves: the ends are inclusive
        for ends, inside in (((lo, hi), finite[1:5]),
                             ((lo * 1.001, hi * 0.999), finite[2:4]),  # just inside both ends
                             ((0.0, finite[-1] * 0.999), [])):  # below every level: none
            main, weak = Recorder(0.1), Recorder(0.3)
            w = 3.0
            out = sample(main, schedule, _noise(), sampler=sampler, sigmas=grid, num_steps=6,
                         guide_model=weak, guidance_scale=w, guidance_interval=ends)
            assert _same_levels(_guided_levels(schedule, weak.times), inside), (sampler, ends)
            assert len(main.times) == 6  # the main network runs at every call, guided or not

            def by_hand(x, t, class_labels=None):  # guided exactly at the listed levels
                s = float(schedule.sigma_of_time_input(t)[0])
                a, b = main(x, t), weak(x, t)
                return b + w * (a - b) if any(math.isclose(s, v, rel_tol=INTERVAL_RTOL)
                                              for v in inside) else a

            assert torch.equal(out, sample(by_hand, schedule, _noise(), sampler=sampler,
                                           sigmas=grid, num_steps=6))


@pytest.mark.parametrize("name", NAMES)
def test_the_interval_limits_classifier_free_guidance_to_a_doubled_batch_inside_it(
        name: str) -> None:
    schedule = _schedule(name)
    sampler, grid, levels = _paths(schedule)[-1]  # the native path where there is one
    finite = [s for s in levels if math.isfinite(s)]
    model = Recorder(0.2)
    sample(model, schedule, _noise(), sampler=sampler, sigmas=grid, num_steps=6,
           class_labels=torch.tensor([1, 2]), guidance_scale=2.0, null_label=5,
           guidance_interval=(finite[4], finite[1]))
    doubled = [len(t) == 2 * SHAPE[0] for t in model.times]
    got = [s for s, d in zip(_guided_levels(schedule, model.times), doubled) if d]
    assert len(model.times) == 6 and _same_levels(got, finite[1:5])


def test_a_batch_of_mixed_levels_guides_only_the_images_inside() -> None:
    # sampling calls share one level per step; a caller with per-image levels still gets each
    # image guided by its own level
    schedule = _schedule("edm")
    main, weak = Recorder(0.1), Recorder(0.4)
    net = guided_network(main, schedule, guidance_scale=2.0, guide_model=weak,
                         interval=(0.5, 2.0))
    x = _noise()
    t = torch.log(torch.tensor([1.0, 10.0])) / 4  # EDM's c_noise of sigma 1 (inside), 10
    out = net(x, t)
    guided = 0.4 * torch.tanh(x) + 2.0 * (0.1 - 0.4) * torch.tanh(x)
    torch.testing.assert_close(out[0], guided[0])
    torch.testing.assert_close(out[1], (0.1 * torch.tanh(x))[1])


# ---------------------------------------------------------------------------------------------
# Two networks of one architecture in one batched call


@pytest.mark.parametrize("num_classes", [None, 3])
def test_the_batched_pair_equals_two_calls(num_classes) -> None:
    a, b = _net(1, num_classes=num_classes), _net(2, num_classes=num_classes)
    x = _noise(3)
    y = None if num_classes is None else torch.tensor([0, 3])  # 3: the "no label" class
    with torch.no_grad():
        for t in (torch.tensor([5, 700]), torch.tensor([0.25, -1.5])):
            kw = {} if y is None else {"class_labels": y}
            got_a, got_b = StackedNetworks(a, b)(x, t, y)
            torch.testing.assert_close(got_a, a(x, t, **kw), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_b, b(x, t, **kw), rtol=1e-5, atol=1e-6)
            assert not torch.allclose(got_a, got_b)


@pytest.mark.parametrize("name", NAMES)
def test_sampling_through_the_batched_pair_equals_two_calls(name: str, monkeypatch) -> None:
    schedule, a, b = _schedule(name), _net(1), _net(2)
    kw = dict(sampler="dpmpp-2m", num_steps=4, guide_model=b, guidance_scale=2.0,
              guidance_interval=(0.2, 50.0))
    two = sample(a, schedule, _noise(), **kw)
    batched = []
    real = StackedNetworks.__call__

    def spy(self, *args, **kwargs):
        batched.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(guidance, "STACKED_DEVICES", ("cpu",))
    monkeypatch.setattr(StackedNetworks, "__call__", spy)
    one = sample(a, schedule, _noise(), **kw)
    assert batched  # it ran
    torch.testing.assert_close(one, two, rtol=0, atol=2e-4)


def test_only_one_architecture_in_eval_mode_stacks() -> None:
    a = _net(1)
    assert stackable(a, _net(2))
    assert not stackable(a, _small(2))  # another config
    assert not stackable(a, _net(2, num_heads=2))  # same shapes, another forward pass
    assert not stackable(a, a)
    assert not stackable(a, _net(2).train())
    assert not stackable(a, lambda x, t: x)
    with pytest.raises(UsageError, match="one type and config"):
        StackedNetworks(a, _small(2))


# ---------------------------------------------------------------------------------------------
# Counting network evaluations


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "heun"])
def test_the_network_count_is_every_call_and_the_guided_ones(sampler: str) -> None:
    schedule, main, weak = _schedule("edm"), Recorder(0.1), Recorder(0.3)
    count = NetworkCount()
    sample(main, schedule, _noise(), sampler=sampler, num_steps=5, guide_model=weak,
           guidance_scale=2.0, network_count=count)
    n = network_calls(sampler, 5)
    assert count == NetworkCount(calls=n, guided=n) and len(weak.times) == n
    count, weak.times = NetworkCount(), []
    sample(main, schedule, _noise(), sampler=sampler, num_steps=5, guide_model=weak,
           guidance_scale=2.0, guidance_interval=(0.5, 5.0), network_count=count)
    assert count.calls == n and 0 < count.guided == len(weak.times) < n
    count = NetworkCount()  # classifier-free guidance: the doubled batch is one call
    sample(Recorder(0.1), schedule, _noise(), sampler=sampler, num_steps=5,
           class_labels=torch.tensor([0, 1]), guidance_scale=2.0, null_label=3,
           network_count=count)
    assert count == NetworkCount(calls=n, guided=n)


# ---------------------------------------------------------------------------------------------
# Refusals


def test_a_guide_that_cannot_guide_is_refused_in_one_line() -> None:
    schedule, main = _schedule("vp"), _net(1)
    for guide, match in ((main, "a model guiding itself changes nothing"),
                         (_net(2, image_size=16), "its image size 16, the model's 8"),
                         (_net(2, num_classes=3), r"its classes \(num_classes\) 3, the "
                                                  "model's None"),
                         (perturbed(UNet(UNetConfig(**tiny_net(8, in_channels=1)))),
                          "its image channels 1, the model's 3"),
                         ("weak.safetensors", "guide_model must be a network")):
        with pytest.raises(UsageError, match=match) as e:
            sample(main, schedule, _noise(), num_steps=2, guide_model=guide, guidance_scale=2.0)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("interval, match", [
    ((1.0,), "must be two finite noise levels"),
    ((1.0, 2.0, 3.0), "must be two finite noise levels"),
    ("0.3,5", "must be two finite noise levels"),
    ((0.0, math.inf), "must be two finite noise levels"),
    ((math.nan, 1.0), "must be two finite noise levels"),
    ((-1.0, 2.0), "must be noise levels >= 0"),
    ((2.0, 2.0), "needs LO < HI"),
    ((5.0, 1.0), "needs LO < HI"),
])
def test_a_malformed_interval_is_refused(interval, match: str) -> None:
    with pytest.raises(UsageError, match=f"guidance_interval {match}"):
        sample(_net(1), _schedule("flow"), _noise(), num_steps=2, guide_model=_small(2),
               guidance_scale=2.0, guidance_interval=interval)


def test_guidance_without_labels_or_a_guide_is_still_refused() -> None:
    with pytest.raises(UsageError, match="needs class_labels .* or a guide_model"):
        sample(_net(1), _schedule("vp"), _noise(), num_steps=2, guidance_scale=2.0)


# ---------------------------------------------------------------------------------------------
# Model files: load_guide_model


def test_a_guide_model_file_is_checked_against_the_model(tmp_path: Path) -> None:
    from diffunet.checkpoint import load_guide_model

    def save(name: str, net: UNet, formulation: str = "flow", **fields) -> Path:
        path = tmp_path / f"{name}.safetensors"
        diffunet.save_model(path, net, make_schedule(ScheduleConfig(formulation=formulation,
                                                                    **fields)))
        return path

    main_path = save("main", _net(1))
    net, schedule, meta = diffunet.load_model(main_path)
    ok = save("weak", _small(2), shift=3.0, time_density="uniform")  # training keys may differ
    guide, guide_meta = load_guide_model(ok, net, schedule, model_path=main_path, model_meta=meta)
    assert guide.config.base_channels == 4 and guide_meta["sha256"] != meta["sha256"]
    (tmp_path / "copy.safetensors").write_bytes(main_path.read_bytes())
    for path, match in (
            (main_path, "is the model itself: a model guiding itself changes nothing"),
            (tmp_path / "copy.safetensors", "holds the model's own weights"),
            (save("vp", _net(2), "vp"), "it is a VP model, the model a flow-matching one"),
            (save("t500", _net(2), num_train_timesteps=500),
             "its schedule.num_train_timesteps is 500, the model's 1000"),
            (save("big", _net(2, image_size=16)), "its image size 16, the model's 8")):
        with pytest.raises(UsageError, match=match) as e:
            load_guide_model(path, net, schedule, model_path=main_path, model_meta=meta,
                             name="--guide-model")
        assert str(e.value).startswith(f"--guide-model {path}") and "\n" not in str(e.value)
    named = {**meta, "class_names": ["cat", "dog", "eel"]}
    cond = save("cond", _net(1, num_classes=3))
    cnet, csched, _ = diffunet.load_model(cond)
    diffunet.save_model(tmp_path / "other.safetensors", _net(2, num_classes=3), csched,
                        extra={"class_names": ["ant", "bee", "cow"]})
    with pytest.raises(UsageError, match="has the classes ant, bee, cow and the model cat"):
        load_guide_model(tmp_path / "other.safetensors", cnet, csched, model_meta=named)


# ---------------------------------------------------------------------------------------------
# Previews


def test_previews_are_drawn_with_the_guide_model_and_interval(tmp_path: Path,
                                                               cpu_accelerate) -> None:
    from diffunet.config import RunConfig, load_config
    from diffunet.training import train
    from helpers import tiny_run

    guide_path = tmp_path / "weak.safetensors"
    diffunet.save_model(guide_path, perturbed(UNet(UNetConfig(**tiny_net(16, base_channels=4,
                                                                          num_groups=2)))),
                        make_schedule(RunConfig().schedule))
    cfg = load_config(None, tiny_run("train.max_steps=2", "train.sample_every=2",
                                     "train.save_every=2", f"sample.guide_model={guide_path}",
                                     "sample.guidance_scale=2", "sample.guidance_interval=[0.5,5]"))
    calls = []
    real = guidance.guided_network

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    import diffunet.samplers as samplers
    mp = pytest.MonkeyPatch()
    mp.setattr(samplers, "guided_network", spy)
    try:
        train(cfg, tmp_path / "run", progress=False)
    finally:
        mp.undo()
    assert (tmp_path / "run" / "samples" / "step0000002.png").is_file()
    assert calls and calls[-1]["interval"] == (0.5, 5.0) and calls[-1]["guidance_scale"] == 2.0
    assert calls[-1]["guide_model"].config.base_channels == 4
