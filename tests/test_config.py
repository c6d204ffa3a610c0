"""Config loading, overrides, and every config error (one line naming the key)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffunet.config import (DataConfig, RunConfig, ScheduleConfig, TrainConfig, UNetConfig,
                             from_dict, load_config, run_config_from_dict, to_dict, to_toml)
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


@pytest.mark.parametrize("name", ["default", "cifar10_ddpm", "mnist", "celeba64", "folder"])
def test_presets_load(name: str) -> None:
    load_config(ROOT / "configs" / f"{name}.toml")


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
    (["sample.num_steps=5000"], "sample.num_steps", "num_train_timesteps"),
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
