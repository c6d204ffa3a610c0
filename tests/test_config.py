"""Config loading, overrides, and every config error (one line naming the key)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from diffunet.config import (SMALL_UNET, DataConfig, RunConfig, SampleConfig, ScheduleConfig,
                             SegRunConfig, SegTrainConfig, TrainConfig, UNetConfig,
                             check_sampling, from_dict, load_config, may_change_on_resume,
                             run_config_from_dict, to_dict, to_toml)
from diffunet.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_roundtrip_through_dict_and_toml(tmp_path: Path) -> None:
    cfg = RunConfig()
    assert run_config_from_dict(to_dict(cfg)) == cfg
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


def test_default_preset_is_the_dataclass_defaults() -> None:
    # `diffunet train` with no CONFIG uses RunConfig(); configs/default.toml documents the same.
    assert load_config(ROOT / "configs" / "default.toml") == RunConfig()


@pytest.mark.parametrize("name", ["default", "cifar10_ddpm", "mnist", "celeba64", "folder",
                                  "superres_shapes", "superres_celeba", "colorize"])
def test_presets_load(name: str) -> None:
    load_config(ROOT / "configs" / f"{name}.toml")


@pytest.mark.parametrize("name, task, channels, size", [
    ("superres_shapes", "superres", 3, 32), ("superres_celeba", "superres", 3, 64),
    ("colorize", "colorize", 1, 32)])
def test_task_presets_give_the_unet_its_condition_channels(name, task, channels, size) -> None:
    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    assert (cfg.data.task, cfg.unet.cond_channels, cfg.unet.image_size) == (task, channels, size)


def test_cifar10_preset_is_the_ddpm_recipe() -> None:
    cfg = load_config(ROOT / "configs" / "cifar10_ddpm.toml")
    assert cfg.unet == UNetConfig()  # the DDPM CIFAR-10 network is UNetConfig's default
    assert cfg.schedule == ScheduleConfig(num_train_timesteps=1000, beta_schedule="linear",
                                          beta_start=1e-4, beta_end=0.02)
    t = cfg.train
    assert (t.lr, t.warmup_steps, t.grad_clip, t.batch_size, t.max_steps, t.ema_decay) == (
        2e-4, 5000, 1.0, 128, 800_000, 0.9999)
    assert t.min_snr_gamma is None  # the paper's unweighted loss, although the default has 5
    assert cfg.data.random_flip and cfg.data.name == "cifar10"


def test_overrides_are_typed() -> None:
    cfg = load_config(None, ["train.max_steps=10", "train.lr=1e-3", "data.path=/tmp/images",
                             "unet.channel_mults=[1, 2]", "unet.attn_resolutions=[]",
                             "train.grad_clip=2", 'sample.sampler="ddpm"', "unet.dropout=0"])
    assert cfg.train.max_steps == 10 and cfg.train.lr == 1e-3
    assert cfg.data.path == "/tmp/images"
    assert cfg.unet.channel_mults == (1, 2) and cfg.unet.attn_resolutions == ()
    assert cfg.train.grad_clip == 2.0 and isinstance(cfg.train.grad_clip, float)
    assert cfg.sample.sampler == "ddpm"


def test_overrides_apply_on_top_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[train]\nmax_steps = 7\nlr = 0.001\n")
    cfg = load_config(path, ["train.lr=0.5"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 0.5
    assert cfg.unet == RunConfig().unet  # sections not named keep their defaults


@pytest.mark.parametrize("overrides, key, words", [
    (["trian.max_steps=1"], "trian", "did you mean 'train'"),
    (["train.max_step=1"], "train.max_step", "did you mean 'max_steps'"),
    (["train.lr=abc"], "train.lr", "expected float"),
    (["train.max_steps=1.5"], "train.max_steps", "expected int"),
    (["train.random_flip=true"], "train.random_flip", "unknown key"),
    (["data.random_flip=1"], "data.random_flip", "expected bool"),
    (["train.max_steps=0"], "train.max_steps", "positive"),
    (["train.lr=-1"], "train.lr", "positive"),
    (["train.max_steps"], "override", "section.key=value"),
    (["sample.sampler=dpm"], "sample.sampler", "did you mean 'ddpm'"),
    (["schedule.beta_schedule=cosin"], "schedule.beta_schedule", "did you mean 'cosine'"),
    (["schedule.prediction_type=eps"], "schedule.prediction_type", "not one of"),
    (["data.image_size=64"], "data.image_size", "unet.image_size"),
    (["data.channels=1"], "data.channels", "unet.in_channels"),
    (["data.source=folder"], "data.path", "required"),
    (["unet.image_size=30"], "unet.image_size", "divisible"),
    (["unet.attn_resolutions=[12]"], "unet.attn_resolutions", "names no level"),
    (["unet.base_channels=48"], "unet.num_groups", "divisible"),
    (["unet.num_heads=3"], "unet.num_heads", "divisible"),
    (["unet.channel_mults=[]"], "unet.channel_mults", "at least one level"),
    (["unet.dropout=1.5"], "unet.dropout", "[0, 1)"),
    (["train.batch_size=10", "train.grad_accum_steps=3"], "train.batch_size", "divisible"),
    (["schedule.formulation=vp", "sample.num_steps=5000"], "sample.num_steps",
     "num_train_timesteps"),
    (["train.trackers=['tensorbord']"], "train.trackers", "unknown tracker"),
])
def test_config_errors_name_the_key(overrides: list[str], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(key), msg
    assert words in msg, msg


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nmax_steps = 10\nlr = = 2\n")
    with pytest.raises(ConfigError, match="line 3"):
        load_config(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("train = 3\n")
    with pytest.raises(ConfigError, match="^train: expected a table"):
        load_config(path)


def test_component_configs_are_frozen() -> None:
    cfg = UNetConfig()
    with pytest.raises(AttributeError):
        cfg.base_channels = 3  # type: ignore[misc]


def test_from_dict_converts_lists_and_ints() -> None:
    cfg = from_dict(TrainConfig, {"adam_betas": [0.9, 0.99], "lr": 1}, "train")
    assert cfg.adam_betas == (0.9, 0.99) and cfg.lr == 1.0
    assert from_dict(DataConfig, {}, "data") == DataConfig()


def test_none_unsets_an_optional_number_and_to_toml_round_trips() -> None:
    import tomllib

    cfg = load_config(None, ["train.min_snr_gamma=none", "train.grad_clip=unset"])
    assert cfg.train.min_snr_gamma is None and cfg.train.grad_clip is None
    text = to_toml(cfg)
    assert 'min_snr_gamma = "none"' in text  # the default is 5, so unset must be written out
    assert "# out_channels is unset" in text  # unset is the default: a comment
    assert load_config(None, [], base=tomllib.loads(text)) == cfg
    # a string field keeps the word as a value (a folder may be called "none")
    assert load_config(None, ["data.path=none"]).data.path == "none"
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(None, ["train.max_steps=none"])  # not optional


# ---------------------------------------------------------------------------------------------
# Each fact once: the data's image size and channels follow the UNet


def test_data_image_size_and_channels_follow_the_unet_unless_set() -> None:
    cfg = load_config(None, ["unet.image_size=16", "unet.in_channels=1", "data.builtin_size=9"])
    assert (cfg.data.image_size, cfg.data.channels) == (16, 1)  # derived, not repeated
    same = load_config(None, ["unet.image_size=16", "data.image_size=16"])
    assert same.data.image_size == 16  # set, and checked
    with pytest.raises(ConfigError, match=r"^data\.channels: 3 does not match unet\.in_channels 1"):
        load_config(None, ["unet.in_channels=1", "data.channels=3"])
    assert DataConfig().image_size is None and DataConfig().channels is None
    assert load_config(ROOT / "configs" / "mnist.toml").data.channels == 1  # the preset's unet
    seg = load_config(None, ["unet.image_size=32"], root=SegRunConfig)
    assert seg.data.image_size == 32
    with pytest.raises(ConfigError, match=r"^data\.image_size"):
        load_config(None, ["data.image_size=48"], root=SegRunConfig)


def test_the_small_default_network_is_stated_once() -> None:
    assert RunConfig().unet == SMALL_UNET
    assert SegRunConfig().unet == dataclasses.replace(SMALL_UNET, image_size=64,
                                                      time_conditioning=False)
    assert UNetConfig() != SMALL_UNET  # UNetConfig() is the DDPM paper's network


# ---------------------------------------------------------------------------------------------
# What a resumed run may change: declared once per field


def test_resume_rules_are_field_metadata() -> None:
    assert may_change_on_resume(TrainConfig, "max_steps")
    assert may_change_on_resume(TrainConfig, "lr")
    assert not may_change_on_resume(TrainConfig, "batch_size")
    assert may_change_on_resume(UNetConfig, "gradient_checkpointing")
    assert not may_change_on_resume(UNetConfig, "base_channels")
    assert may_change_on_resume(DataConfig, "num_workers")
    assert not may_change_on_resume(DataConfig, "random_flip")
    assert all(may_change_on_resume(SampleConfig, f.name)
               for f in dataclasses.fields(SampleConfig))
    # segmentation: the one-cycle schedule spans the run, so only the log interval may change
    assert [f.name for f in dataclasses.fields(SegTrainConfig)
            if may_change_on_resume(SegTrainConfig, f.name)] == ["log_every"]


def test_check_resume_compatible_names_the_first_changed_key() -> None:
    from diffunet.runs import check_resume_compatible

    saved = to_dict(RunConfig())
    check_resume_compatible(saved, load_config(None, ["train.max_steps=9000", "train.lr=1e-4",
                                                      "sample.num_steps=50",
                                                      "data.num_workers=2"]))
    with pytest.raises(ConfigError, match=r"^data\.random_flip: the run being resumed used "
                                          r"True, this config says False"):
        check_resume_compatible(saved, load_config(None, ["data.random_flip=false"]))
    with pytest.raises(ConfigError, match=r"^train\.batch_size"):
        check_resume_compatible(saved, load_config(None, ["train.batch_size=64"]))
    # a key an older diffunet did not write constrains nothing; one it wrote that is gone too
    older = {**saved, "train": {k: v for k, v in saved["train"].items() if k != "seed"}}
    older["unet"] = {**older["unet"], "removed_field": 1}
    check_resume_compatible(older, RunConfig())
    seg = to_dict(SegRunConfig())
    check_resume_compatible(seg, load_config(None, ["train.log_every=5"], root=SegRunConfig))
    with pytest.raises(ConfigError, match=r"^train\.lr"):
        check_resume_compatible(seg, load_config(None, ["train.lr=0.1"], root=SegRunConfig))


# ---------------------------------------------------------------------------------------------
# One set of sampling settings: one rule set for config keys, flags and arguments


def test_sampling_rules_are_stated_once_and_name_what_the_caller_wrote() -> None:
    from diffunet.errors import UsageError

    with pytest.raises(ConfigError, match=r"^sample\.eta only applies to sample\.sampler ddim"):
        load_config(None, ["sample.sampler=ddpm", "sample.eta=0.5"])
    with pytest.raises(UsageError, match=r"^--eta only applies to --sampler ddim"):
        check_sampling({"sampler": "--sampler", "eta": "--eta"}, sampler="dpmpp-2m", eta=0.3,
                       error=UsageError)
    with pytest.raises(ConfigError, match=r"^sample\.num_steps must be a positive integer"):
        SampleConfig(num_steps=0)
    check_sampling({}, sampler=None, eta=None)  # nothing given: nothing to check


# Issue 14: seeds, non-finite floats and the preview size are one-line errors naming the key.


@pytest.mark.parametrize("root", [RunConfig, SegRunConfig])
@pytest.mark.parametrize("seed", ["-1", "4294967296", "18446744073709551616"])
def test_seeds_outside_numpys_range_are_refused(root: type, seed: str) -> None:
    with pytest.raises(ConfigError, match=r"^train\.seed: must be an integer with "
                                          r"0 <= seed < 2\*\*32 .*got -?\d+$"):
        load_config(None, [f"train.seed={seed}"], root=root)
    assert load_config(None, ["train.seed=4294967295"], root=root).train.seed == 2**32 - 1


@pytest.mark.parametrize("item", ["train.lr=inf", "train.weight_decay=nan", "train.ema_decay=nan",
                                  "train.adam_betas=[0.9, nan]", "train.grad_clip=inf",
                                  "train.min_snr_gamma=inf", "unet.dropout=nan",
                                  "schedule.beta_start=nan", "sample.eta=nan",
                                  "sample.guidance_scale=-inf"])
def test_every_float_must_be_finite(item: str) -> None:
    key = item.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}: must be a finite number"):
        load_config(None, [item])


@pytest.mark.parametrize("item", ["train.lr=nan", "data.std=[1, inf, 1]", "data.mean=[nan]",
                                  "data.val_fraction=nan", "train.dice_weight=inf"])
def test_segmentation_floats_must_be_finite(item: str) -> None:
    with pytest.raises(ConfigError, match=r"must be a finite number"):
        load_config(None, [item], root=SegRunConfig)


def test_preview_grids_are_capped() -> None:
    assert load_config(None, ["sample.num_images=256"]).sample.num_images == 256
    with pytest.raises(ConfigError, match=r"^sample\.num_images: must be in \[1, 256\] .*"
                                          r"1000000000; draw more with diffunet sample"):
        load_config(None, ["sample.num_images=1000000000"])


@pytest.mark.parametrize("item, words", [
    ("train.phema_sigma_rels=[0.3]", "0.3 is no power-function EMA width; each sigma_rel must "
                                     "be in (0, 0.2879]"),
    ("train.phema_sigma_rels=[0]", "0 is no power-function EMA width"),
    ("train.phema_sigma_rels=[-0.05]", "-0.05 is no power-function EMA width"),
    ("train.phema_sigma_rels=[0.05, 0.05]", "names a sigma_rel twice"),
    ("train.phema_sigma_rels=[0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09]",
     "9 profiles; at most 8"),
    ("train.phema_sigma_rels=[nan]", "must be a finite number"),
    ("train.phema_every=0", "must be a positive integer"),
])
def test_post_hoc_ema_settings_are_checked(item: str, words: str) -> None:
    key = item.partition("=")[0]
    with pytest.raises(ConfigError) as info:
        load_config(None, [item])
    assert str(info.value).startswith(key + ": ") and words in str(info.value), str(info.value)


def test_post_hoc_ema_profiles_are_fixed_on_resume_and_the_interval_is_not() -> None:
    # the profiles are part of what the state computed; the snapshot interval only says when
    # they are written (a reconstruction takes snapshots at any steps)
    assert not may_change_on_resume(TrainConfig, "phema_sigma_rels")
    assert may_change_on_resume(TrainConfig, "phema_every")
    assert TrainConfig().phema_sigma_rels == (0.05, 0.10)
    assert load_config(None, ["train.phema_sigma_rels=[]"]).train.phema_sigma_rels == ()
