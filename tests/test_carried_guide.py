"""The carried guide (``train.guide_at``): the run's own classic EMA of an earlier step, kept by
training and carried in every later model file, so that ``diffunet sample MODEL`` autoguides
with it (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself").

One tiny 6-step run (guide step 3, a state and a model file at every step) is shared by the
tests that read it; the resume tests copy it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffunet
from diffunet import cli
from diffunet.checkpoint import (GUIDE_PREFIX, guide_digest, load_model_file, model_file_bytes,
                                 read_model)
from diffunet.config import TrainConfig, load_config
from diffunet.errors import ConfigError
from diffunet.training import train
from helpers import tiny_net, tiny_run
from processes import reset_accelerate_state

N, G = 6, 3  # steps of the shared run, and its guide step (round(0.5 x 6))
ARGS = (*tiny_run(), f"train.max_steps={N}", "train.save_every=1", "train.keep_last=10",
        "train.sample_every=3", "train.phema_every=2", "train.log_every=1")


def _train(out: Path, *extra: str, resume: bool = False, say=lambda m: None) -> None:
    with pytest.MonkeyPatch.context() as mp:  # as the cpu_accelerate fixture, for any scope
        mp.setenv("ACCELERATE_USE_CPU", "1")
        reset_accelerate_state()
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train(load_config(None, [*ARGS, *extra]), out, resume=resume, progress=False,
                  say=say)
        finally:
            torch.set_num_threads(before)
            reset_accelerate_state()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("carried") / "run"
    _train(out)
    return out


def _model(run: Path, step: int) -> Path:
    return run / "weights" / f"model_step{step:07d}.safetensors"


def _state(run: Path, step: int) -> Path:
    return run / "state" / f"step{step:07d}"


def _cli(args: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs"


# ---------------------------------------------------------------------------------------------
# Config


def test_guide_at_is_checked_and_gives_the_guide_step() -> None:
    assert TrainConfig().guide_at == 0.5 and TrainConfig().guide_step == 1000
    assert TrainConfig(guide_at=0.0).guide_step is None
    assert TrainConfig(guide_at=0.1, max_steps=3).guide_step == 1  # at least 1
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"train.guide_at: must be in \[0, 1\)"):
            TrainConfig(guide_at=bad)
    with pytest.raises(ConfigError, match="sample.guide_scale: must be 0 or more"):
        load_config(None, ["sample.guide_scale=-1"])
    # an interval may limit the carried guide's autoguidance, but not nothing at all
    load_config(None, ["sample.guidance_interval=[0.5, 2]"])
    with pytest.raises(ConfigError, match="sample.guidance_interval: limits guidance"):
        load_config(None, ["sample.guidance_interval=[0.5, 2]", "train.guide_at=0"])


# ---------------------------------------------------------------------------------------------
# Training: captured at its step, carried after it, part of the state


def test_the_guide_is_the_ema_of_its_step_and_carried_after_it(run: Path) -> None:
    guide_file = _model(run, G)
    for step in range(1, N + 1):
        meta = read_model(_model(run, step))[2]
        tensors = load_file(str(_model(run, step)))
        if step <= G:  # before the guide step, and the guide's own file (it IS the guide)
            assert "guide" not in meta and meta["format_version"] == 1
            assert not any(k.startswith(GUIDE_PREFIX) for k in tensors)
            continue
        assert meta["format_version"] == 2
        assert {k: v for k, v in meta["guide"].items() if k != "sha256"} == {"step": G,
                                                                            "scale": 2.0}
        own = load_file(str(guide_file))
        for k, v in own.items():  # bit for bit the model file of the guide step
            assert torch.equal(tensors[GUIDE_PREFIX + k], v), k
        assert meta["guide"]["sha256"] == guide_digest(own)
    for step in range(1, N + 1):
        record = json.loads((_state(run, step) / "trainer.json").read_text())
        has = (_state(run, step) / "guide.safetensors").exists()
        assert has == (step >= G) and record.get("guide_step") == (G if step >= G else None)
    loaded = load_model_file(_model(run, N))
    assert loaded.guide is not None and (loaded.guide.step, loaded.guide.scale) == (G, 2.0)


@pytest.mark.parametrize("at", [2, G, 4], ids=["before", "at", "after"])
def test_resume_across_the_guide_step_is_exact(run: Path, tmp_path: Path, at: int) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for step in range(at + 1, N + 1):  # as if the run had been killed after step `at`
        shutil.rmtree(_state(copy, step))
        _model(copy, step).unlink()
    _train(copy, resume=True)
    _assert_same_tensors(_model(run, N), _model(copy, N))
    _assert_same_tensors(_state(run, N) / "guide.safetensors",
                         _state(copy, N) / "guide.safetensors")
    assert read_model(_model(run, N))[2]["guide"] == read_model(_model(copy, N))[2]["guide"]


def test_a_longer_run_takes_the_guide_at_its_new_step(run: Path, tmp_path: Path) -> None:
    # 3 steps (guide at step 2), then resumed to 6: the guide moves to step 3, as in the
    # uninterrupted 6-step run
    short = tmp_path / "short"
    _train(short, "train.max_steps=3")
    assert load_model_file(_model(short, 3)).guide.step == 2
    said: list[str] = []
    _train(short, resume=True, say=said.append)
    assert any("moves from the EMA of step 2 to that of step 3" in m for m in said)
    _assert_same_tensors(_model(run, N), _model(short, N))


def test_resume_refuses_a_guide_at_whose_step_has_passed(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for step in (5, 6):
        shutil.rmtree(_state(copy, step))
    with pytest.raises(ConfigError, match=r"train.guide_at: the run being resumed used 0.5; "
                                          r"0.2 would keep the EMA of step 1"):
        _train(copy, "train.guide_at=0.2", resume=True)
    # a step still ahead is fine, and so is switching the guide off
    said: list[str] = []
    _train(copy, "train.guide_at=0", resume=True, say=said.append)
    assert any("is dropped" in m for m in said)
    assert load_model_file(_model(copy, N)).guide is None


def test_a_state_from_before_carried_guides_resumes_without_one(run: Path,
                                                                tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for step in (5, 6):
        shutil.rmtree(_state(copy, step))
    state = _state(copy, 4)
    (state / "guide.safetensors").unlink()
    record = json.loads((state / "trainer.json").read_text())
    del record["files"]["guide.safetensors"], record["guide_step"]
    del record["config"]["train"]["guide_at"], record["config"]["sample"]["guide_scale"]
    (state / "trainer.json").write_text(json.dumps(record))
    said: list[str] = []
    _train(copy, resume=True, say=said.append)
    assert any("without carried guides" in m for m in said)
    assert load_model_file(_model(copy, N)).guide is None


# ---------------------------------------------------------------------------------------------
# Sampling: the carried guide is the default


def test_sample_autoguides_with_the_carried_guide_by_default(run: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture
                                                             ) -> None:
    model = _model(run, N)
    common = ["sample", model, "--num-samples", 3, "--steps", 3, "--no-progress", "--grid"]
    outs = {}
    # at 8 steps the recorded weight 2 runs eased to 1.3 (guidance.carried_guide_weight)
    common = ["sample", model, "--num-samples", 3, "--steps", 8, "--no-progress", "--grid"]
    for name, flags in {"default": [], "explicit": ["--guide-model", _model(run, G),
                                                    "--guidance-scale", 1.3],
                        "no-guide": ["--no-guide"], "scale-1": ["--guidance-scale", 1],
                        "w3": ["--guidance-scale", 3]}.items():
        outs[name] = tmp_path / name
        code, _, err = _cli([*common, *flags, "--out-dir", outs[name]], capsys)
        assert code == 0, err

    def pngs(name: str) -> list[bytes]:
        return [(outs[name] / f"{i:06d}.png").read_bytes() for i in range(3)]

    assert pngs("default") == pngs("explicit")
    assert pngs("no-guide") == pngs("scale-1")
    assert pngs("default") != pngs("no-guide") and pngs("w3") != pngs("default")
    manifest = json.loads((outs["default"] / "manifest.json").read_text())
    assert manifest["settings"]["guidance_scale"] == pytest.approx(1.3)
    assert manifest["guide_model"]["step"] == G
    assert manifest["settings"]["guide_model_sha256"] == read_model(model)[2]["guide"]["sha256"]
    off = json.loads((outs["no-guide"] / "manifest.json").read_text())
    assert off["guide_model"] is None and off["settings"]["guidance_scale"] == 1.0
    # the library, explicitly: the loaded file's guide and weight
    loaded = load_model_file(model)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(sampler="euler", num_steps=2)
    a = diffunet.sample(loaded.net, loaded.schedule, x, guide_model=loaded.guide.net,
                        guidance_scale=loaded.guide.scale, **kwargs)
    weak = diffunet.load_model(_model(run, G))[0]
    b = diffunet.sample(loaded.net, loaded.schedule, x, guide_model=weak, guidance_scale=2.0,
                        **kwargs)
    assert torch.equal(a, b)


def test_guidance_scale_without_guidance_still_needs_one(run: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    code, _, err = _cli(["sample", _model(run, 2), "--guidance-scale", 2, "--no-progress",
                         "--out-dir", tmp_path / "o"], capsys)
    assert code == 2 and "needs --class-label" in err and "carries a guide" in err
    assert not (tmp_path / "o").exists()
    code, _, err = _cli(["sample", _model(run, N), "--guide-model", _model(run, N),
                         "--guidance-scale", 2, "--no-progress", "--out-dir", tmp_path / "o"],
                        capsys)
    assert code == 2 and "is the model itself" in err


# ---------------------------------------------------------------------------------------------
# Hostile files: a damaged or swapped guide is one line, exit 2, nothing written


def _rewrite(src: Path, dst: Path, edit) -> Path:
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _guide_of(tensors: dict) -> dict:
    return {k[len(GUIDE_PREFIX):]: v for k, v in tensors.items() if k.startswith(GUIDE_PREFIX)}


def _set_hash(tensors: dict, meta: dict) -> None:
    guide = json.loads(meta["guide"])
    guide["sha256"] = guide_digest(_guide_of(tensors))
    meta["guide"] = json.dumps(guide)


def _first_guide(tensors: dict) -> str:
    return next(k for k in tensors if k.startswith(GUIDE_PREFIX) and k.endswith("weight"))


def _damage(tensors, meta):
    tensors[_first_guide(tensors)] = tensors[_first_guide(tensors)] + 1e-3


def _swap(tensors, meta):  # the guide replaced by the model itself, its hash left as it was
    for k in list(tensors):
        if not k.startswith(GUIDE_PREFIX):
            tensors[GUIDE_PREFIX + k] = tensors[k].clone()


def _wrong_hash(tensors, meta):
    guide = json.loads(meta["guide"])
    guide["sha256"] = "0" * 64
    meta["guide"] = json.dumps(guide)


def _extra_key(tensors, meta):
    tensors[GUIDE_PREFIX + "extra.weight"] = torch.zeros(2)
    _set_hash(tensors, meta)


def _wrong_shape(tensors, meta):
    k = _first_guide(tensors)
    tensors[k] = torch.zeros(tensors[k].numel() + 1)
    _set_hash(tensors, meta)


def _nan(tensors, meta):
    k = _first_guide(tensors)
    tensors[k] = tensors[k].clone()
    tensors[k].view(-1)[0] = float("nan")
    _set_hash(tensors, meta)


def _no_metadata(tensors, meta):
    del meta["guide"]


def _bad_metadata(tensors, meta):
    meta["guide"] = json.dumps({"step": 3, "sha256": "x", "scale": 2.0})


def _old_format(tensors, meta):
    meta["format_version"] = "1"


@pytest.mark.parametrize("edit,message", [
    (_damage, "does not match the sha256 the file records for it"),
    (_swap, "does not match the sha256 the file records for it"),
    (_wrong_hash, "does not match the sha256 the file records for it"),
    (_extra_key, "unexpected 1 (e.g. guide.extra.weight)"),
    (_wrong_shape, "wrong shape 1"),
    (_nan, "non-finite value(s)"),
    (_no_metadata, "unexpected"),
    (_bad_metadata, "its carried guide's metadata is damaged (sha256 'x' is not 64 hex"),
    (_old_format, "a format version 1 file carries no guide"),
], ids=lambda v: getattr(v, "__name__", "")[1:] or None)
def test_a_damaged_guide_is_refused_in_one_line(run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture, edit,
                                                message: str) -> None:
    bad = _rewrite(_model(run, N), tmp_path / "bad.safetensors", edit)
    for command in (["sample", bad, "--no-progress", "--out-dir", tmp_path / "out"],
                    ["info", bad]):
        code, _, err = _cli(command, capsys)
        assert len(err.strip().splitlines()) == 1 and message in err, err
        # info reports non-finite weights (the guide's too) as a warning, as it always has
        assert code == (0 if edit is _nan and command[0] == "info" else 2), err
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_files_without_a_guide_are_unchanged(tmp_path: Path) -> None:
    net = diffunet.UNet(diffunet.UNetConfig(**tiny_net(8)))
    schedule = diffunet.make_schedule(diffunet.ScheduleConfig())
    path = tmp_path / "plain.safetensors"
    diffunet.save_model(path, net, schedule, extra={"step": 5})
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format_version"] == "1" and "guide" not in f.metadata()
    loaded = load_model_file(path)
    assert loaded.guide is None and "guide" not in loaded.metadata
    # a guide must be the model's own network
    other = diffunet.UNet(diffunet.UNetConfig(**tiny_net(8, base_channels=16)))
    from diffunet.checkpoint import CarriedGuide
    with pytest.raises(ValueError, match="the model's own config"):
        model_file_bytes(net, schedule, guide=CarriedGuide(other, 1, 2.0))


# ---------------------------------------------------------------------------------------------
# info, export, ema


def test_info_shows_the_carried_guide(run: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _cli(["info", _model(run, N)], capsys)
    assert code == 0 and f"carried guide    the EMA of step {G}, weight 2" in out
    code, out, _ = _cli(["info", _model(run, 2)], capsys)
    assert code == 0 and "carried guide" not in out
    code, out, _ = _cli(["info", "--json", _model(run, N)], capsys)
    assert json.loads(out)["guide"]["step"] == G


def test_export_drops_the_guide_with_a_note(run: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    code, out, err = _cli(["export", _model(run, N), tmp_path / "pipe"], capsys)
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and f"(the EMA of step {G}) is not exported" in notes[0]
    weights = load_file(str(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not any(k.startswith(GUIDE_PREFIX) for k in weights)


def test_ema_carries_the_runs_guide(run: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ema.safetensors"
    code, text, err = _cli(["ema", run, "--sigma-rel", "0.05", "--out", out], capsys)
    assert code == 0, err
    assert f"carries the run's guide, the EMA of step {G} (weight 2)" in text
    _assert_same_tensors_guide(out, _model(run, N))
    early = tmp_path / "early.safetensors"
    code, text, err = _cli(["ema", run, "--sigma-rel", "0.05", "--step", "2", "--out", early],
                           capsys)
    assert code == 0, err
    assert "it carries no guide" in text and load_model_file(early).guide is None


def _assert_same_tensors_guide(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    ga, gb = _guide_of(ta), _guide_of(tb)
    assert ga.keys() == gb.keys() and ga
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> Iterator[None]:
    yield


def test_which_guidance_and_weight_a_carrying_file_samples_with() -> None:
    from diffunet.config import SampleConfig, to_dict
    from diffunet.sampling import SampleOptions, guidance_kind, sample_settings

    # a class-conditional run's file: CFG weight 3 in its [sample], an interval, and a guide
    meta = {"run_config": {"sample": {**to_dict(SampleConfig()), "guidance_scale": 3.0,
                                      "guidance_interval": [0.2, 1.0]}},
            "guide": {"step": 3, "sha256": "0" * 64, "scale": 2.5}}

    def how(**options):
        o = SampleOptions(**options)
        s = sample_settings(meta, o)
        return guidance_kind(meta, o), s.guidance_scale, s.guidance_interval

    assert how() == ("carried", 2.5, (0.2, 1.0))
    assert how(class_labels=1) == ("carried", 2.5, (0.2, 1.0))  # autoguidance comes first
    assert how(guidance_scale=4.0) == ("carried", 4.0, (0.2, 1.0))
    with pytest.raises(Exception, match="--guidance-scale for the carried guide must be 0 or more"):
        how(guidance_scale=-1.0)  # as sample.guide_scale refuses it
    assert how(guidance_scale=1.0) == ("carried", 1.0, None)  # off, with its interval
    assert how(no_guide=True) == (None, 1.0, None)
    assert how(no_guide=True, class_labels=1) == ("cfg", 3.0, (0.2, 1.0))
    # another guide replaces the carried one at the carried weight
    assert how(guide_model="weak.safetensors") == ("auto", 2.5, None)
    assert how(guide_model="weak.safetensors", guidance_scale=2.0) == ("auto", 2.0, None)
    # the recorded weight is eased at few steps (none at 5: the interval goes with it); a
    # weight given is taken as it is, and so is the recorded one for a --guide-model
    assert how(num_steps=10) == ("carried", 1.75, (0.2, 1.0))
    assert how(num_steps=8)[1] == pytest.approx(1 + 1.5 * 0.3)
    assert how(num_steps=5) == ("carried", 1.0, None)
    assert how(num_steps=16)[1] == pytest.approx(1 + 1.5 * (0.5 + 0.5 * 6 / 15))
    assert how(num_steps=50)[1] == 2.5
    assert how(num_steps=10, guidance_scale=2.5)[1] == 2.5
    assert how(guide_model="weak.safetensors", num_steps=5)[1] == 2.5
    with pytest.raises(Exception, match="--guide-model with guidance scale 1"):
        how(guide_model="weak.safetensors", guidance_scale=1.0)


def test_the_carried_weight_follows_the_step_count() -> None:
    from diffunet.guidance import carried_guide_weight
    assert [carried_guide_weight(2.0, n) for n in (1, 5, 10, 25, 50)] == [1.0, 1.0, 1.5, 2.0,
                                                                           2.0]
    assert carried_guide_weight(2.0, 8) == pytest.approx(1.3)
    assert carried_guide_weight(2.0, 15) == pytest.approx(1.5 + 0.5 / 3)
    assert carried_guide_weight(3.0, 10) == 2.0
    assert carried_guide_weight(1.0, 10) == 1.0 and carried_guide_weight(0.5, 5) == 0.5
