"""Model files written by the previous release (commit 2765a3e, before the formulations moved to
``diffunet.formulations``) load unchanged and sample bit for bit as that release sampled them.

The fixtures in ``data/previous_release/`` were made by that release (``make_fixtures.py``
there says how): three tiny model files (VP v/cosine class-conditional, VP eps/linear, EDM) and
what ``diffunet.sample`` returned for 56 cases: every sampler, the uniform, karras and
exponential grids, a set sigma_max, clipping, labels and classifier-free guidance, SDEdit,
inpainting and RePaint. Sampling runs on one thread, as the fixtures were made (the thread count
moves float rounding inside the network). One intentional change: the karras and exponential
grids' default top moved (issue 24, docs/samplers.md "The default grid's range"), so the cosine
VP cases on those grids with no range set name the previous default, the model's top, as
``sigma_max``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffunet
from diffunet.samplers import default_grid

DATA = Path(__file__).parent / "data" / "previous_release"
CASES = json.loads((DATA / "cases.json").read_text())
GUIDED_SIGMA_PATH = {c["name"] for c in CASES
                     if c["guided"] and c["kwargs"].get("sigmas") not in (None, "uniform")}
"""Guidance on the sigma path now combines the network's outputs (once, for every path) where
the previous release combined the denoiser's x0 estimates: the same affine map, so these match
to float rounding, not bit for bit."""


def _moved_default(case: dict, schedule) -> bool:
    """The case ran a karras/exponential grid with its range unset on a model whose default
    range has since moved (issue 24: the top is capped at DEFAULT_SIGMA_MAX; the previous
    release started at the model's own top, 2 x 10^4 on the cosine schedule)."""
    kw = case["kwargs"]
    grid = kw.get("sigmas") or default_grid(schedule, kw.get("sampler", "ddim"))
    return grid in ("karras", "exponential") and "sigma_max" not in kw and \
        schedule.default_range() != schedule.grid_range()


def _previous_range(case: dict, schedule) -> dict:
    """The case's arguments, with the previous release's default range named where the default
    has moved: its images stay reachable, bit for bit, with an explicit sigma_max."""
    kw = dict(case["kwargs"])
    if _moved_default(case, schedule):
        kw["sigma_max"] = schedule.grid_range()[1]
    return kw


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "expected.safetensors"))


@pytest.fixture(scope="module")
def models() -> dict[str, tuple]:
    return {name: diffunet.load_model(DATA / name)[:2]
            for name in sorted({c["model"] for c in CASES})}


def test_the_previous_release_model_files_load_with_their_formulations(models) -> None:
    kinds = {name: type(schedule).__name__ for name, (_, schedule) in models.items()}
    assert kinds == {"edm.safetensors": "EDMSchedule",
                     "vp_eps_linear.safetensors": "NoiseSchedule",
                     "vp_v_cosine_cond.safetensors": "NoiseSchedule"}
    assert len(CASES) == 56


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_an_old_model_file_samples_as_the_previous_release_did(case, models, expected,
                                                                one_thread) -> None:
    net, schedule = models[case["model"]]
    x_T = expected["input/x_T"]
    extra = {}
    if case["edit"] is not None:
        extra["init_image"] = expected["input/init"]
    if case["edit"] == "inpaint":
        extra["mask"] = expected["input/mask"]
    labels = None if case["labels"] is None else torch.tensor(case["labels"])
    gens = [torch.Generator().manual_seed(100 + b) for b in range(x_T.shape[0])]
    got = diffunet.sample(net, schedule, x_T, generator=gens, class_labels=labels,
                          **extra, **_previous_range(case, schedule))
    want = expected[case["name"]]
    if case["name"] in GUIDED_SIGMA_PATH:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.equal(got, torch.zeros_like(got))
    else:
        assert torch.equal(got, want), (got - want).abs().max()


def test_the_cases_whose_default_range_moved_are_the_cosine_karras_and_exponential_ones(
        models, expected, one_thread) -> None:
    """Issue 24 moved the default top of the karras/exponential grids (the one intentional
    change here): exactly the cosine-schedule VP cases on those grids without a sigma_max
    (the linear schedule's top, 157, is below the cap), and with no range set they now give
    other images (from sigma 160, not the model's top)."""
    moved = [c for c in CASES if _moved_default(c, models[c["model"]][1])]
    assert {c["model"] for c in moved} == {"vp_v_cosine_cond.safetensors"}
    assert len(moved) == 11
    for case in moved[:2]:
        net, schedule = models[case["model"]]
        x_T = expected["input/x_T"]
        labels = None if case["labels"] is None else torch.tensor(case["labels"])
        gens = [torch.Generator().manual_seed(100 + b) for b in range(x_T.shape[0])]
        got = diffunet.sample(net, schedule, x_T, generator=gens, class_labels=labels,
                              **case["kwargs"])
        assert not torch.equal(got, expected[case["name"]]), case["name"]
