"""The built-in quality judge: the shipped weights (accuracy on unseen seeds, sha256, tampering),
its FID features and class report, `eval fid --features builtin`, deterministic retraining, and
the quality-per-network-call benchmark on a tiny model."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffunet import NoiseSchedule, ScheduleConfig, UNet, UNetConfig, save_model
from diffunet import judge as jd
from diffunet.checkpoint import read_tensor_file, write_tensor_file
from diffunet.data import BuiltinShapes
from diffunet.errors import DiffunetError, ModelFileError, UsageError
from diffunet.evaluation import (FeatureNetwork, dataset_fingerprint, fid_kid,
                                 reference_statistics)
from diffunet.images import save_image
from diffunet.judge import (JUDGE_FILE, JUDGE_SHA256, JudgeTraining, class_report, file_sha256,
                            load_judge, steps_for_budget, train_judge)
from diffunet.formulations import make_schedule
from helpers import perturbed, tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions on busy cores (conftest)


@pytest.fixture(scope="module")
def judge() -> jd.Judge:
    return load_judge()


def _blur(x: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Gaussian blur (B, C, H, W), reflect-padded, 9 taps."""
    r = torch.arange(-4, 5, dtype=x.dtype)
    k = torch.exp(-r**2 / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (4, 4, 0, 0), mode="reflect"), k.view(1, 1, 1, 9).repeat(c, 1, 1, 1),
                 groups=c)
    return F.conv2d(F.pad(x, (0, 0, 4, 4), mode="reflect"), k.view(1, 1, 9, 1).repeat(c, 1, 1, 1),
                    groups=c)


def _as_dataset(images: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    return [(img, -1) for img in images]


# ---------------------------------------------------------------------------------------------
# The shipped weights


def test_shipped_judge_classifies_unseen_seeds_with_at_least_95_percent_accuracy(judge):
    assert judge.training.data_seed not in (0, 99) and judge.held_out["seed"] != 99
    x, y = BuiltinShapes(400, 32, 3, seed=99).render(range(400))
    _, probs = judge.judge(x)
    assert float((probs.argmax(dim=1) == y).double().mean()) >= 0.95
    assert judge.held_out["accuracy"] >= 0.95 and judge.held_out["images"] >= 1000


def test_shipped_judge_matches_its_recorded_sha256_and_describes_itself(judge):
    assert JUDGE_FILE.stat().st_size < 1_000_000
    tensors, meta = read_tensor_file(JUDGE_FILE)  # safetensors: nothing is unpickled
    assert meta["format"] == "diffunet.judge" and meta["sha256"] == JUDGE_SHA256 == judge.sha256
    assert json.loads(meta["judge_config"])["class_names"] == ["circle", "square", "triangle",
                                                                "cross"]
    assert json.loads(meta["training"])["steps"] == judge.training.steps
    assert json.loads(meta["held_out"])["accuracy"] == judge.held_out["accuracy"]
    assert sum(t.numel() for t in tensors.values()) < 100_000
    assert judge.sha256 in judge.feature_network().identity
    assert not any(p.requires_grad for p in judge.net.parameters()) and not judge.net.training


def test_pyproject_ships_the_judge_weights_as_package_data():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert JUDGE_FILE.name in section and JUDGE_FILE.parent.name == "diffunet"


def test_tampered_judge_weights_are_refused_in_one_line(tmp_path, monkeypatch):
    tampered = tmp_path / "judge.safetensors"
    shutil.copy(JUDGE_FILE, tampered)
    data = bytearray(tampered.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    tampered.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="do not match the sha256") as info:
        load_judge(tampered)
    assert "\n" not in str(info.value) and "train-judge" in str(info.value)
    # the shipped path is checked against JUDGE_SHA256 itself
    monkeypatch.setattr(jd, "JUDGE_FILE", tampered)
    with pytest.raises(ModelFileError, match="not the shipped judge's") as info:
        load_judge()
    assert "\n" not in str(info.value)
    # metadata changed but the recorded hash kept: refused too
    tensors, meta = read_tensor_file(JUDGE_FILE)
    held = json.loads(meta["held_out"])
    forged = tmp_path / "forged.safetensors"
    write_tensor_file(forged, tensors, {**meta, "held_out": json.dumps({**held, "accuracy": 1})})
    with pytest.raises(ModelFileError, match="do not match the sha256"):
        load_judge(forged)
    # a diffusion model file is not a judge
    model = tmp_path / "model.safetensors"
    save_model(model, UNet(UNetConfig(**tiny_net(8))), NoiseSchedule())
    with pytest.raises(ModelFileError, match="not a judge weights file"):
        load_judge(model)


# ---------------------------------------------------------------------------------------------
# Features and classes


def test_judge_fid_is_small_between_builtin_seeds_and_large_for_noise_and_blur(judge):
    net = judge.feature_network()
    reference = BuiltinShapes(400, 32, 3, seed=0)
    same = BuiltinShapes(200, 32, 3, seed=5)
    x = same.render(range(200))[0]
    noise = torch.randn(200, 3, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    scores = {name: fid_kid(data, reference, net, batch_size=200, kid_subset_size=200,
                            kid_num_subsets=10)
              for name, data in [("same", same), ("noise", _as_dataset(noise)),
                                 ("blur", _as_dataset(_blur(x)))]}
    assert scores["same"].fid < 5
    assert scores["blur"].fid > 5 * scores["same"].fid and scores["blur"].fid > 10
    assert scores["noise"].fid > 100 * scores["same"].fid
    assert scores["noise"].kid > scores["blur"].kid > abs(scores["same"].kid)


def test_class_report_of_a_one_class_set_flags_low_diversity(judge):
    shapes = BuiltinShapes(800, 32, 3, seed=7)
    circles = judge.class_report(_as_dataset(shapes.render(range(0, 800, 4))[0]))
    assert circles.low_diversity and circles.entropy < 0.05
    assert circles.counts[0] == 200 and circles.recognisable > 0.9
    assert "low diversity: " in circles.describe()
    balanced = judge.class_report(shapes.render(range(200))[0])
    assert not balanced.low_diversity and balanced.entropy > 0.99
    assert balanced.recognisable > 0.9 and "low diversity" not in balanced.describe()
    noise = torch.randn(200, 3, 32, 32, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    assert judge.class_report(noise).recognisable < 0.1
    # the pure function: exact numbers
    probs = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.08, 0.92], [0.2, 0.8]])
    r = class_report(probs, ["a", "b"])
    assert r.counts == (2, 2) and r.entropy == pytest.approx(1.0) and r.recognisable == 0.5
    assert class_report(probs[:2], ["a", "b"]).entropy == 0.0


def test_judge_refuses_other_sizes_and_channels_in_one_line(judge):
    net = judge.feature_network().net
    for shape in [(2, 3, 16, 16), (2, 1, 32, 32), (3, 32, 32)]:
        with pytest.raises(UsageError, match="reads RGB 32x32 images") as info:
            net(torch.zeros(shape))
        assert "\n" not in str(info.value) and "--image-size 32" in str(info.value)


def test_builtin_and_inception_reference_caches_never_mix(judge, tmp_path):
    reference = BuiltinShapes(40, 32, 3, seed=0)
    builtin = judge.feature_network()
    calls = []
    inception_like = FeatureNetwork(net=lambda x: calls.append(len(x)) or x.mean(dim=(2, 3)),
                                    identity="fid-inception-v3-pool3/bilinear299/sha256:0")
    assert dataset_fingerprint(reference, builtin) != dataset_fingerprint(reference,
                                                                          inception_like)
    stats, path, hit = reference_statistics(reference, builtin, cache_dir=tmp_path)
    assert not hit and stats.mu.shape == (judge.config.feature_dim,)
    other, other_path, hit = reference_statistics(reference, inception_like, cache_dir=tmp_path)
    assert not hit and other_path != path and other.mu.shape == (3,) and sum(calls) == 40
    assert reference_statistics(reference, builtin, cache_dir=tmp_path)[2]  # its own entry


# ---------------------------------------------------------------------------------------------
# The command


def _parse(argv: list[str]) -> argparse.Namespace:
    from diffunet.cli import build_parser

    return build_parser(["eval"]).parse_args(argv)


def _write_pngs(folder: Path, images: torch.Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        save_image(img, folder / f"{i:06d}.png")
    return folder


def test_eval_fid_features_builtin_runs_offline_and_prints_fid_kid_and_classes(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFUNET_CACHE", str(tmp_path / "cache"))
    gen = _write_pngs(tmp_path / "gen", BuiltinShapes(16, 32, 3, seed=3).render(range(16))[0])
    out = tmp_path / "fid.json"
    argv = ["eval", "fid", str(gen), "--features", "builtin", "--max-reference", "100",
            "--kid-subsets", "5", "--device", "cpu", "--json", str(out), "--no-progress"]
    args = _parse(argv)
    assert args.func(args) == 0
    text = capsys.readouterr().out
    for word in ("FID", "KID", "built-in judge", "reference: the built-in data set",
                 "classes          circle", "recognisable", "computed, cached"):
        assert word in text
    result = json.loads(out.read_text())
    assert result["features"] == "builtin" and result["num_reference"] == 100
    assert result["judge"]["num_images"] == 16 and not result["judge"]["low_diversity"]
    assert result["fid"] < 50 and "diffunet-judge" in result["feature_network"]
    assert args.func(_parse(argv)) == 0
    assert "from cache" in capsys.readouterr().out
    # other sizes: one line that says how to resize
    small = _write_pngs(tmp_path / "small", torch.zeros(3, 3, 16, 16))
    with pytest.raises(DiffunetError, match=r"reads 32x32 images and these are 16x16; give "
                                            r"--image-size 32") as info:
        args = _parse(["eval", "fid", str(small), "--features", "builtin", "--no-progress"])
        args.func(args)
    assert "\n" not in str(info.value)


def test_train_judge_command_writes_a_judge_that_loads(tmp_path, capsys):
    path = tmp_path / "j.safetensors"
    args = _parse(["eval", "train-judge", "--out", str(path), "--steps", "2", "--seed", "3"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    loaded = load_judge(path)
    assert "held-out accuracy" in text and "JUDGE_SHA256" in text and loaded.sha256 in text
    assert loaded.training.steps == 2 and loaded.training.seed == 3
    with pytest.raises(DiffunetError, match="--overwrite"):
        args.func(args)


# ---------------------------------------------------------------------------------------------
# Training


def test_retraining_with_the_same_seed_gives_the_same_weights():
    tiny = JudgeTraining(steps=2, batch_size=8, outliers=4, held_out_images=8)
    a, b = train_judge(training=tiny), train_judge(training=tiny)
    for name, tensor in a.net.state_dict().items():
        assert torch.equal(tensor, b.net.state_dict()[name]), name
    assert a.sha256 == b.sha256 and a.held_out == b.held_out
    c = train_judge(training=JudgeTraining(steps=2, batch_size=8, outliers=4, held_out_images=8,
                                           seed=1))
    assert not torch.equal(c.net.head.weight, a.net.head.weight) and c.sha256 != a.sha256


def test_saved_judge_round_trips(tmp_path):
    trained = train_judge(training=JudgeTraining(steps=1, batch_size=4, outliers=2,
                                                 held_out_images=4))
    path = tmp_path / "j.safetensors"
    assert jd.save_judge(trained, path) == trained.sha256
    loaded = load_judge(path)
    assert loaded.sha256 == trained.sha256 and loaded.held_out == trained.held_out
    x = BuiltinShapes(4, 32, 3, seed=1).render(range(4))[0]
    torch.testing.assert_close(loaded.judge(x)[0], trained.judge(x)[0])


def test_bad_judge_training_settings_are_refused():
    with pytest.raises(DiffunetError, match="data_seed"):
        JudgeTraining(data_seed=0)
    with pytest.raises(DiffunetError, match="steps"):
        JudgeTraining(steps=0)


# ---------------------------------------------------------------------------------------------
# Quality per network call


def test_steps_for_budget_is_the_most_steps_within_the_network_calls():
    assert steps_for_budget("ddim", 5) == 5 and steps_for_budget("euler", 1) == 1
    assert steps_for_budget("heun", 5) == 3 and steps_for_budget("heun", 10) == 5  # 2N - 1
    assert steps_for_budget("heun", 1) == 1


def _tiny_model(tmp_path: Path, image_size: int = 32, **schedule) -> Path:
    net = perturbed(UNet(UNetConfig(**tiny_net(image_size, channel_mults=(1,),
                                                attn_resolutions=()))))
    cfg = ScheduleConfig(num_train_timesteps=50, **schedule)
    path = tmp_path / f"m{image_size}{cfg.formulation}.safetensors"
    save_model(path, net, make_schedule(cfg))
    return path


def test_quality_per_nfe_smoke_run_on_a_tiny_model(tmp_path, judge):
    model = _tiny_model(tmp_path)
    result = jd.quality_per_nfe(model, judge=judge, num_images=8, budgets=(3,),
                                samplers=("ddim", "heun"), grids=("uniform", "karras"),
                                num_reference=50, batch_size=4)
    got = {(r.sampler, r.grid, r.budget): r for r in result.rows}
    assert set(got) == {(s, g, 3) for s in ("ddim", "heun") for g in ("uniform", "karras")}
    assert got["heun", "karras", 3].num_steps == 2 and got["heun", "karras", 3].nfe == 3
    for r in result.rows:
        assert math.isfinite(r.fid) and r.fid > 0 and r.seconds_per_image > 0
        assert 0 <= r.recognisable <= 1 and 0 <= r.class_entropy <= 1
    assert result.model_sha256 == file_sha256(model) and result.num_reference == 50
    table = jd.format_nfe_table(result)
    assert table.startswith("| sampler | grid |") and table.count("\n| ddim |") == 2
    # image i is drawn from seed + i, whatever the batch size
    again = jd.quality_per_nfe(model, judge=judge, num_images=8, budgets=(3,),
                               samplers=("ddim",), grids=("uniform",), num_reference=50,
                               batch_size=8)
    assert again.rows[0].fid == pytest.approx(got["ddim", "uniform", 3].fid, rel=1e-4)


def test_quality_per_nfe_skips_what_cannot_run_and_refuses_other_models(tmp_path, judge):
    edm = _tiny_model(tmp_path, formulation="edm")
    result = jd.quality_per_nfe(edm, judge=judge, num_images=4, budgets=(2,),
                                samplers=("euler",), grids=("uniform", "karras"),
                                num_reference=20)
    assert [(r.sampler, r.grid) for r in result.rows] == [("euler", "karras")]
    assert any("uniform grid" in note and "EDM" in note for note in result.skipped)
    with pytest.raises(UsageError, match=r"judge reads RGB 32x32 images \(or larger ones it "
                                         r"downscales: 64x64, ...\) and this model makes 3x16x16"):
        jd.quality_per_nfe(_tiny_model(tmp_path, 16), judge=judge, num_images=4)
    with pytest.raises(UsageError, match="sigma grid"):
        jd.quality_per_nfe(edm, judge=judge, grids=("linear",))


def test_quality_per_nfe_runs_a_flow_model_on_its_uniform_grid_too(tmp_path, judge):
    # a flow model has a uniform grid (diffusers' shifted t): nothing is skipped
    flow = _tiny_model(tmp_path, formulation="flow")
    result = jd.quality_per_nfe(flow, judge=judge, num_images=4, budgets=(3,),
                                samplers=("euler", "dpmpp-2m"), grids=("uniform", "karras"),
                                num_reference=20)
    assert {(r.sampler, r.grid) for r in result.rows} == {
        (s, g) for s in ("euler", "dpmpp-2m") for g in ("uniform", "karras")}
    assert result.skipped == [] and all(math.isfinite(r.fid) for r in result.rows)


def test_eval_nfe_command_prints_the_table_and_refuses_unknown_names(tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setenv("DIFFUNET_CACHE", str(tmp_path / "cache"))
    model = _tiny_model(tmp_path)
    args = _parse(["eval", "nfe", str(model), "--num-images", "4", "--nfe", "2",
                   "--samplers", "euler", "--grids", "karras", "--num-reference", "20",
                   "--device", "cpu", "--no-progress"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "| euler | karras | 2 | 2 | 2 |" in text
    assert f"model sha256 {file_sha256(model)}" in text and "command: " in text
    with pytest.raises(UsageError, match=r"^--sigma-max 1e\+06 is outside this model's noise"):
        args = _parse(["eval", "nfe", str(model), "--sigma-max", "1e6", "--num-reference", "20",
                       "--device", "cpu", "--no-progress"])
        args.func(args)
    with pytest.raises(DiffunetError, match="unknown sampler 'bogus'"):
        args = _parse(["eval", "nfe", str(model), "--samplers", "ddim,bogus"])
        args.func(args)
    with pytest.raises(SystemExit):
        _parse(["eval", "nfe", str(model), "--nfe", "0"])


def test_eval_nfe_with_a_guide_model_counts_the_guided_calls(tmp_path, capsys, monkeypatch):
    # autoguidance in the benchmark: NFE stays the model's calls, "guided" counts the calls
    # that also evaluated the guide (fewer with an interval)
    monkeypatch.setenv("DIFFUNET_CACHE", str(tmp_path / "cache"))
    model = _tiny_model(tmp_path)
    weak = tmp_path / "weak.safetensors"
    save_model(weak, perturbed(UNet(UNetConfig(**tiny_net(32, channel_mults=(1,),
                                                          attn_resolutions=()))), seed=3),
               make_schedule(ScheduleConfig(num_train_timesteps=50)))
    base = ["eval", "nfe", str(model), "--num-images", "4", "--nfe", "4", "--samplers", "euler",
            "--grids", "karras", "--num-reference", "20", "--device", "cpu", "--no-progress",
            "--guide-model", str(weak), "--guidance-scale", "2"]
    args = _parse(base)
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "| sampler | grid | NFE budget | steps | NFE | guided | FID |" in text
    assert "| euler | karras | 4 | 4 | 4 | 4 |" in text and f"autoguidance by {weak}" in text
    args = _parse([*base, "--guidance-interval", "0.5,20"])
    assert args.func(args) == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("| euler |"))
    guided = int(row.split("|")[6])
    assert 0 < guided < 4
    with pytest.raises(UsageError, match="--guide-model .* is the model itself"):
        args = _parse([*base[:-4], "--guide-model", str(model), "--guidance-scale", "2"])
        args.func(args)
    with pytest.raises(UsageError, match="--guide-model with guidance scale 1 changes nothing"):
        args = _parse([*base[:-2]])
        args.func(args)


def test_a_budget_that_would_never_end_is_one_line(tmp_path, judge):
    model = _tiny_model(tmp_path)
    with pytest.raises(UsageError, match=r"budgets must be in \[1, 10000\], got 1000000000000"):
        jd.quality_per_nfe(model, judge=judge, num_images=4, budgets=(10**12,),
                           samplers=("ddim",), grids=("uniform",), num_reference=10)


def test_quality_per_nfe_with_a_sigma_max_skips_the_uniform_grid_and_records_it(tmp_path, judge):
    model = _tiny_model(tmp_path)
    result = jd.quality_per_nfe(model, judge=judge, num_images=4, budgets=(2,),
                                samplers=("ddim", "euler"), grids=("uniform", "karras"),
                                num_reference=20, sigma_max=0.5)
    assert [(r.sampler, r.grid) for r in result.rows] == [("ddim", "karras"), ("euler", "karras")]
    assert any("uniform grid" in note and "sigma_min/sigma_max" in note
               for note in result.skipped)
    assert result.options["sigma_max"] == 0.5
    assert "with sigma_max 0.5 (the rest the model's)" in jd.format_nfe_table(result)
    with pytest.raises(UsageError, match="sigma_max 1e\\+06 is outside"):
        jd.quality_per_nfe(model, judge=judge, num_images=4, budgets=(2,), sigma_max=1e6)
