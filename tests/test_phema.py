"""Post-hoc EMA (Karras et al. 2024, sec. 3.1 and appendix C): the math of diffunet/phema.py,
the snapshots training keeps (diffunet/phema_files.py) and ``diffunet ema`` / ``eval ema``.

The math is checked against what it claims: gamma and sigma_rel invert each other, the closed-form
inner product is the integral, the per-step update gives each step exactly the profile's weight,
a stored profile is rebuilt as itself, and a rebuilt EMA of a synthetic weight trajectory is
the EMA tracked directly within the error the fit's residual allows. Training keeps the
profiles in its state (exact resume) and their snapshots in ``RUN/phema/``. The bad inputs of
``diffunet ema`` are rows of the hostile suite (tests/test_hostile_runs.py).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffunet import cli, load_model
from diffunet.checkpoint import read_tensor_file_header
from diffunet.config import load_config
from diffunet.phema import (RESIDUAL_LIMIT, SIGMA_REL_MAX, PowerEMA, gamma_of, inner_product,
                            reconstructable_range, sigma_rel_of, solve_weights)
from diffunet.phema_files import plan, rebuild, snapshot_name
from diffunet.training import train
from helpers import tiny_run

SIGMA_RELS = (0.05, 0.10)


# ---------------------------------------------------------------------------------------------
# 1. The math


@pytest.mark.parametrize("sigma_rel", [1e-3, 0.01, 0.03, 0.05, 0.1, 0.2, 0.28, SIGMA_REL_MAX])
def test_gamma_and_sigma_rel_invert_each_other(sigma_rel: float) -> None:
    g = gamma_of(sigma_rel)
    assert sigma_rel_of(g) == pytest.approx(sigma_rel, rel=1e-12)
    # the largest real root of s g^3 + 7 s g^2 + (16 s - 1) g + (12 s - 1)
    s = sigma_rel ** 2
    assert abs(s * g**3 + 7 * s * g**2 + (16 * s - 1) * g + 12 * s - 1) < 1e-9 * max(1, g**3 * s)
    assert all(sigma_rel_of(h) < sigma_rel for h in (g + 0.5, g + 5))  # the decreasing branch


def test_the_papers_profiles_have_their_gammas() -> None:
    # Karras et al. 2024, sec. 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.005)
    assert gamma_of(0.10) == pytest.approx(6.94, abs=0.005)
    with pytest.raises(ValueError):
        gamma_of(SIGMA_REL_MAX * 1.001)  # no power function is wider
    with pytest.raises(ValueError):
        gamma_of(0.0)


@pytest.mark.parametrize("ga, ta, gb, tb", [(16.97, 1000, 6.94, 1000), (6.94, 300, 16.97, 1000),
                                            (46.99, 2000, 1.83, 700), (0.5, 50, 0.0, 80)])
def test_the_closed_form_inner_product_is_the_integral(ga: float, ta: float, gb: float,
                                                       tb: float) -> None:
    def profile(g: float, t: float, tau: torch.Tensor) -> torch.Tensor:
        return (g + 1) * tau ** g / t ** (g + 1)

    m = min(ta, tb)
    tau = torch.linspace(0, m, 400_001, dtype=torch.float64)
    numeric = torch.trapezoid(profile(ga, ta, tau) * profile(gb, tb, tau), tau).item()
    assert inner_product(ga, ta, gb, tb) == pytest.approx(numeric, rel=1e-6)
    assert inner_product(ga, ta, gb, tb) == pytest.approx(inner_product(gb, tb, ga, ta), rel=1e-14)


def test_each_step_gets_exactly_the_profiles_weight() -> None:
    # theta(s) = e_s: after t steps the profile holds each step's weight, which must be the
    # integral of (g + 1) tau^g / t^(g + 1) over [s - 1, s] (module doc of diffunet.phema)
    t = 40
    m = torch.nn.Linear(t, 1, bias=False)
    ema = PowerEMA(m, SIGMA_RELS)
    for s in range(1, t + 1):
        with torch.no_grad():
            m.weight.zero_()
            m.weight[0, s - 1] = 1.0
        ema.update(m, s)
    for g, profile in zip(ema.gammas, ema.profiles):
        steps = torch.arange(1, t + 1, dtype=torch.float64)
        want = (steps ** (g + 1) - (steps - 1) ** (g + 1)) / t ** (g + 1)
        torch.testing.assert_close(profile["weight"][0].double(), want, rtol=1e-5, atol=1e-7)
        assert profile["weight"].sum().item() == pytest.approx(1.0, abs=1e-5)


def test_a_skipped_step_leaves_the_profiles_as_they_are() -> None:
    m = torch.nn.Linear(3, 2)
    ema = PowerEMA(m, SIGMA_RELS)
    ema.update(m, 1)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m, 2, keep=torch.tensor(False))
    assert all(torch.equal(before[k], v) for k, v in ema.state_dict().items())
    ema.update(m, 2, keep=torch.tensor(True))
    assert not all(torch.equal(before[k], v) for k, v in ema.state_dict().items())


def _grid(every: int, last: int) -> list[tuple[float, float]]:
    return [(gamma_of(s), t) for t in range(every, last + 1, every) for s in SIGMA_RELS]


def test_a_stored_profile_is_rebuilt_as_itself() -> None:
    snaps = _grid(100, 2000)
    fit = solve_weights(snaps, gamma_of(0.05), 2000)
    i = snaps.index((gamma_of(0.05), 2000))
    assert fit.weights[i] == pytest.approx(1.0, abs=1e-6)
    assert max(abs(w) for j, w in enumerate(fit.weights) if j != i) < 1e-6
    assert fit.residual < 1e-6


def test_the_default_snapshots_rebuild_the_documented_range() -> None:
    # docs/training.md: every 100 steps of 2,000 rebuild sigma_rel 0.025 to 0.243 within the
    # 5% residual limit; the fit depends on the steps relative to the last only
    lo, hi = reconstructable_range(_grid(100, 2000), 2000)
    assert (round(lo, 3), round(hi, 3)) == (0.025, 0.243)
    assert reconstructable_range(_grid(1, 20), 20) == (lo, hi)
    lo2, hi2 = reconstructable_range(_grid(200, 2000), 2000)
    assert lo < lo2 and hi2 < hi  # sparser snapshots rebuild less
    assert RESIDUAL_LIMIT == 0.05


def test_a_rebuilt_ema_of_a_synthetic_trajectory_is_the_ema_tracked_directly() -> None:
    # theta(s): a drift to a level, an oscillation and step noise (as SGD gives), 256 weights;
    # the 0.05/0.10 profiles snapshotted every 5% of the run rebuild other lengths, compared
    # with the same lengths tracked step by step
    d, last, every = 256, 200, 10
    g = torch.Generator().manual_seed(0)
    a, tau = torch.randn(d, generator=g), 20 + 200 * torch.rand(d, generator=g)
    b, om = 0.3 * torch.randn(d, generator=g), 5 + 50 * torch.rand(d, generator=g)
    targets = (0.03, 0.07, 0.15, 0.2)
    m = torch.nn.Linear(d, 1, bias=False)
    stored, direct = PowerEMA(m, SIGMA_RELS), PowerEMA(m, targets)
    snaps, tensors = [], []
    for s in range(1, last + 1):
        with torch.no_grad():
            m.weight[0] = (a * (1 - torch.exp(-s / tau)) + b * torch.sin(s / om)
                           + 0.3 * torch.randn(d, generator=g))
        stored.update(m, s)
        direct.update(m, s)
        if s % every == 0:
            for gamma, profile in zip(stored.gammas, stored.profiles):
                snaps.append((gamma, s))
                tensors.append(profile["weight"][0].double().clone())
    for k, sigma_rel in enumerate(targets):
        fit = solve_weights(snaps, gamma_of(sigma_rel), last)
        rebuilt = sum(w * v for w, v in zip(fit.weights, tensors))
        want = direct.profiles[k]["weight"][0].double()
        err = (rebuilt - want).norm() / want.norm()
        # measured: 2.8e-3, 1.7e-4, 3.0e-4, 1.1e-3 at residuals 2.6%, 0.25%, 0.6%, 1.5%: the
        # weights' error stays well under the profile's (a tenth or less of it)
        assert fit.residual <= RESIDUAL_LIMIT
        assert err < 0.2 * fit.residual, (sigma_rel, err, fit.residual)
        # and far under the difference the EMA length makes (0.05 against the target)
        assert (rebuilt - want).norm() < 0.1 * (want - stored.profiles[0]["weight"][0]).norm()


# ---------------------------------------------------------------------------------------------
# 2. Training keeps the profiles and their snapshots

def _cfg(*extra: str, image_size: int = 16):
    return load_config(None, tiny_run(*extra, image_size=image_size))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _snapshots(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "phema").iterdir())


@pytest.mark.usefixtures("cpu_accelerate")
def test_resume_keeps_the_profiles_bit_for_bit(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    n = 6
    common = ["unet.dropout=0.3", "train.phema_every=1", "train.save_every=3",
              "train.sample_every=100"]
    full, half = tmp_path / "full", tmp_path / "half"
    train(_cfg(*common, f"train.max_steps={n}"), full, progress=False)
    train(_cfg(*common, f"train.max_steps={n // 2}"), half, progress=False)
    spare = tmp_path / "spare"
    shutil.copytree(half, spare)
    train(_cfg(*common, f"train.max_steps={n}"), half, resume=True, progress=False)
    state = f"state/step{n:07d}/phema.safetensors"
    a, b = _tensors(full / state), _tensors(half / state)
    assert a.keys() == b.keys() and len(a) == 2 * len(_tensors(full / f"state/step{n:07d}/"
                                                               "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _snapshots(full) == _snapshots(half) == sorted(
        snapshot_name(s, r) for s in range(1, n + 1) for r in SIGMA_RELS)
    for name in _snapshots(full):
        x, y = _tensors(full / "phema" / name), _tensors(half / "phema" / name)
        assert all(torch.equal(x[k], y[k]) for k in x), name
    # the check has teeth: a resume that does not put the profiles back differs
    monkeypatch.setattr(PowerEMA, "load_state_dict", lambda self, tensors: None)
    train(_cfg(*common, f"train.max_steps={n}"), spare, resume=True, progress=False)
    c = _tensors(spare / state)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.usefixtures("cpu_accelerate")
def test_snapshots_every_interval_and_at_the_last_step_are_never_pruned(tmp_path: Path) -> None:
    run = tmp_path / "run"
    said: list[str] = []
    train(_cfg("train.max_steps=7", "train.phema_every=3", "train.save_every=2",
               "train.keep_last=1", "train.sample_every=100"), run, progress=False,
          say=said.append)
    assert _snapshots(run) == sorted(snapshot_name(s, r) for s in (3, 6, 7) for r in SIGMA_RELS)
    assert [p.name for p in (run / "state").iterdir()] == ["step0000007"]  # pruned to one
    size = (run / "phema" / snapshot_name(3, 0.05)).stat().st_size
    line = next(m for m in said if m.startswith("post-hoc EMA: "))
    assert line == (f"post-hoc EMA: sigma_rel 0.05, 0.1 (gamma 16.97, 6.94); a snapshot of each "
                    f"every 3 steps and at the last into phema/, {size / 1e3:.1f} kB each, "
                    f"{size * 2 * 1000 / 3 / 1e6:.1f} MB per 1,000 steps")
    # each snapshot says what it is; the classic EMA is apart (weights/ holds it)
    meta = read_tensor_file_header(run / "phema" / snapshot_name(6, 0.1)).metadata
    assert meta["format"] == "diffunet.phema_snapshot"
    assert (json.loads(meta["step"]), json.loads(meta["sigma_rel"])) == (6, 0.1)
    assert json.loads(meta["gamma"]) == pytest.approx(gamma_of(0.1), rel=1e-12)
    assert json.loads(meta["run_id"]) == json.loads(
        (run / "state" / "step0000007" / "trainer.json").read_text())["run_id"]


@pytest.mark.usefixtures("cpu_accelerate")
def test_resume_redoes_the_snapshots_past_its_state_and_cleans_half_written_ones(
        tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["train.phema_every=1", "train.save_every=2", "train.keep_last=3",
              "train.sample_every=100"]
    train(_cfg(*common, "train.max_steps=4"), run, progress=False)
    first = {n: _tensors(run / "phema" / n) for n in _snapshots(run)}
    # as after a kill between the snapshots of steps 3, 4 and the state of step 4, with a
    # snapshot cut short by the kill
    shutil.rmtree(run / "state" / "step0000004")
    leftover = run / "phema" / ".diffunet-step0000005-sr0.05.safetensors.99999.0123abcd.tmp"
    leftover.write_bytes(b"half")
    said: list[str] = []
    train(_cfg(*common, "train.max_steps=4"), run, resume=True, progress=False,
          say=said.append)
    assert any(m.startswith("note: removed 4 post-hoc EMA snapshot(s) past step 2") for m in said)
    assert not leftover.exists()
    assert _snapshots(run) == sorted(first)
    for name, tensors in first.items():  # written again, the same
        again = _tensors(run / "phema" / name)
        assert all(torch.equal(tensors[k], again[k]) for k in tensors), name


@pytest.mark.usefixtures("cpu_accelerate")
def test_a_damaged_snapshot_is_refused_on_resume_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    args = tiny_run("train.max_steps=2", "train.phema_every=1", "train.sample_every=100")
    assert cli.main(["train", *args, "--out-dir", str(run), "--no-progress"]) == 0
    victim = run / "phema" / snapshot_name(1, 0.1)
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF  # a bit flip in the tensor bytes
    victim.write_bytes(bytes(data))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    capsys.readouterr()
    assert cli.main(["train", *args, "train.max_steps=3", "--out-dir", str(run), "--resume",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"diffunet train: error: {victim}: its content does not match the "
                          "SHA-256 it records"), err
    assert "move it out of" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


@pytest.mark.usefixtures("cpu_accelerate")
def test_a_run_resumed_from_a_state_without_profiles_goes_on_without_them(
        tmp_path: Path) -> None:
    # a state written by a diffunet before post-hoc EMA: its config has no phema keys
    run = tmp_path / "run"
    train(_cfg("train.max_steps=2", "train.phema_sigma_rels=[]", "train.sample_every=100"), run,
          progress=False)
    trainer = run / "state" / "step0000002" / "trainer.json"
    data = json.loads(trainer.read_text())
    for key in ("phema_sigma_rels", "phema_every"):
        del data["config"]["train"][key]
    del data["run_id"]
    trainer.write_text(json.dumps(data))
    said: list[str] = []
    train(_cfg("train.max_steps=3", "train.sample_every=100"), run, resume=True,
          progress=False, say=said.append)
    assert any("was saved by a diffunet without post-hoc EMA" in m for m in said)
    assert json.loads((run / "config.json").read_text())["train"]["phema_sigma_rels"] == []
    assert not (run / "phema").exists()


# ---------------------------------------------------------------------------------------------
# 3. diffunet ema


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with a snapshot of both profiles after each of its 10 steps."""
    import os

    from processes import reset_accelerate_state

    run = tmp_path_factory.mktemp("phema") / "run"
    before = torch.get_num_threads()
    os.environ["ACCELERATE_USE_CPU"] = "1"
    torch.set_num_threads(1)
    reset_accelerate_state()
    try:
        train(_cfg("train.max_steps=10", "train.phema_every=1", "train.save_every=5",
                   "train.sample_every=100"), run, progress=False)
    finally:
        reset_accelerate_state()
        torch.set_num_threads(before)
        os.environ.pop("ACCELERATE_USE_CPU", None)
    return run


def test_ema_of_a_stored_length_is_that_snapshot_as_a_model_file(
        ema_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "m.safetensors"
    assert cli.main(["ema", str(ema_run), "--sigma-rel", "0.05", "--step", "7", "--out",
                     str(out)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("sigma_rel 0.05 (gamma 16.972) at step 7 from 14 "
                                           "snapshot(s)")
    assert "the fit is 0.00% off" in text and "step         7  sigma_rel 0.05    weight +1.000000" \
        in text
    net, _, meta = load_model(out)
    stored = _tensors(ema_run / "phema" / snapshot_name(7, 0.05))
    assert all(torch.equal(v, stored[k]) for k, v in net.state_dict().items())
    assert meta["step"] == 7 and meta["phema"]["sigma_rel"] == 0.05
    assert meta["run_config"]["train"]["phema_every"] == 1


def test_ema_reads_the_snapshots_of_an_earlier_release(ema_run: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshots written before a UNetConfig field existed (here cond_channels) record a
    network config without it: the field's default fills it, and the run's EMA rebuilds."""
    from safetensors import safe_open

    from diffunet import phema_files
    from diffunet.config import UNetConfig

    run = tmp_path / "run"
    shutil.copytree(ema_run, run)
    unet = load_model(next((run / "weights").iterdir()))[0].config
    real = phema_files.to_dict

    def without_the_new_field(obj):
        out = real(obj)
        if isinstance(obj, UNetConfig):
            out.pop("cond_channels")
        return out

    shapes = phema_files.parameter_shapes(unet)
    monkeypatch.setattr(phema_files, "to_dict", without_the_new_field)
    for path in sorted((run / "phema").iterdir()):  # rewritten as the earlier release wrote them
        snap = phema_files.read_snapshot(path, shapes)
        path.write_bytes(phema_files.snapshot_bytes(
            load_file(str(path)), step=snap.step, sigma_rel=snap.sigma_rel, gamma=snap.gamma,
            run_id=snap.run_id, unet=unet))
    monkeypatch.undo()
    with safe_open(str(run / "phema" / snapshot_name(7, 0.05)), "pt") as f:
        assert "cond_channels" not in json.loads(f.metadata()["unet_config"])
    out = tmp_path / "m.safetensors"
    assert cli.main(["ema", str(run), "--sigma-rel", "0.05", "--step", "7", "--out",
                     str(out)]) == 0
    stored = _tensors(ema_run / "phema" / snapshot_name(7, 0.05))
    net = load_model(out)[0]
    assert all(torch.equal(v, stored[k]) for k, v in net.state_dict().items())


def test_ema_of_another_length_says_its_fit_and_is_a_model_of_the_run(
        ema_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "m.safetensors"
    assert cli.main(["ema", str(ema_run), "--sigma-rel", "0.07", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    p = plan(ema_run, [0.07])[0]
    assert p.step == 10 and 0 < p.residual < RESIDUAL_LIMIT
    assert f"the fit is {p.residual:.2%} off the asked profile" in text
    net, schedule, meta = load_model(out)
    rebuilt = rebuild(p)
    assert all(torch.equal(v, rebuilt[k]) for k, v in net.state_dict().items())
    assert [tuple(s) for s in meta["phema"]["snapshots"]] == [
        (u["step"], u["sigma_rel"], u["weight"]) for u in p.used()]
    assert sum(meta["phema"]["snapshots"][i][2] for i in range(20)) == pytest.approx(1, abs=0.01)
    # between the two stored lengths: between their weights
    a = _tensors(ema_run / "phema" / snapshot_name(10, 0.05))
    b = _tensors(ema_run / "phema" / snapshot_name(10, 0.1))
    k = next(iter(a))
    assert (rebuilt[k] - a[k]).norm() < (b[k] - a[k]).norm()


def test_ema_refuses_a_length_the_snapshots_cannot_rebuild_naming_the_range(
        ema_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "m.safetensors"
    assert cli.main(["ema", str(ema_run), "--sigma-rel", "0.01", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and not out.exists()
    lo, hi = reconstructable_range(_grid(1, 10), 10)
    assert err.startswith("diffunet ema: error: sigma_rel 0.01 cannot be rebuilt at step 10 "
                          "from the 20 snapshots of sigma_rel 0.05, 0.1 up to it (the fit is ")
    assert f"these rebuild sigma_rel {lo:.3f} to {hi:.3f}" in err
    assert math.isclose(lo, 0.034, abs_tol=0.001)


# ---------------------------------------------------------------------------------------------
# 4. diffunet eval ema


@pytest.mark.usefixtures("cpu_accelerate")
def test_eval_ema_judges_each_length_and_names_the_best(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from diffunet.data import BuiltinShapes
    from diffunet.images import to_uint8

    run = tmp_path / "run"  # 32x32 RGB on the built-in data: what the judge reads
    train(_cfg("train.max_steps=6", "train.phema_every=1", "train.sample_every=100",
               "sample.num_steps=2", image_size=32), run, progress=False)
    out = tmp_path / "ema.json"
    argv = ["eval", "ema", str(run), "--sigma-rel", "0.05,0.07", "--num-images", "8",
            "--num-reference", "64", "--no-cache", "--no-progress", "--batch-size", "4"]
    assert cli.main([*argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["sigma_rel"] for r in rows] == [0.05, 0.07]
    assert rows[0]["residual"] == 0 and 0 < rows[1]["residual"] < RESIDUAL_LIMIT
    assert all(math.isfinite(r["fid"]) and r["fid"] > 0 and 0 <= r["recognisable"] <= 1
               for r in rows)
    best = min(rows, key=lambda r: r["fid"])
    assert result["best_sigma_rel"] == best["sigma_rel"] and result["step"] == 6
    assert result["num_reference"] == 64 and result["floor_fid"] > 0
    assert text.splitlines()[0].startswith("| sigma_rel | fit residual | FID | KID | "
                                           "recognisable |")
    assert f"best: sigma_rel {best['sigma_rel']:g} (FID {best['fid']:.2f}); write it with " \
           f"diffunet ema {run} --sigma-rel {best['sigma_rel']:g} --step 6" in text
    # the same numbers again (image i from seed + i, the reference fixed)
    again = tmp_path / "again.json"
    assert cli.main([*argv, "--json", str(again)]) == 0
    capsys.readouterr()
    assert [{k: v for k, v in r.items() if k != "seconds_per_image"} for r in rows] == [
        {k: v for k, v in r.items() if k != "seconds_per_image"}
        for r in json.loads(again.read_text())["rows"]]

    # against a folder of reference images, through the judge's features
    ref = tmp_path / "ref"
    ref.mkdir()
    shapes = BuiltinShapes(16, 32, 3, seed=5)
    for i in range(16):
        Image.fromarray(to_uint8(shapes[i][0]).numpy()).save(ref / f"{i}.png")
    assert cli.main(["eval", "ema", str(run), "--sigma-rel", "0.05", "--num-images", "8",
                     "--reference", str(ref), "--features", "builtin", "--no-cache",
                     "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"against {ref} (16 images)" in text and "floor" not in text  # no built-in floor
