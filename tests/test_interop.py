"""diffusers, both ways (diffunet.interop, ``diffunet export`` / ``diffunet import``).

Tiny random UNet2DModels (8x8 or 16x16, block_out_channels (8, 16), 4 groups) in each layout
diffunet can express (with and without attention, several heads with AdaGN, the published DDPM
checkpoints' layout), saved by diffusers, imported, and sampled by diffunet's DDIM against
diffusers' DDIMPipeline from the same generator; the reverse from diffunet model files, loaded
by DDIMPipeline/DDPMPipeline.from_pretrained; round trips; one line for each setting one side
cannot express; the two commands' exit codes.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import perturbed, tiny_net
from processes import cpu_env

import diffunet
from diffunet import NoiseSchedule, ScheduleConfig, UNet, UNetConfig
from diffunet.cli import main
from diffunet.config import from_dict, to_dict
from diffunet.formulations.vp import make_betas
from diffunet.errors import ConfigError, FolderError, ModelFileError, UsageError
from diffunet.interop import (
    export_diffusers,
    import_diffusers,
    schedule_from_diffusers,
    scheduler_to_diffusers,
    state_from_diffusers,
    state_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
)
from diffunet.nn import timestep_embedding

diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()

LAYOUTS = {
    "attention": dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None),
    "no-attention": dict(down_block_types=("DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D"), attention_head_dim=None),
    # google/ddpm-cifar10-32 and its CelebA-HQ/church/bedroom siblings (DDPM's TensorFlow code).
    "ddpm-checkpoint": dict(down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "AttnUpBlock2D"), attention_head_dim=None,
                            flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
                            downsample_padding=0),
    "heads-adagn": dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
                        resnet_time_scale_shift="scale_shift", attn_norm_num_groups=4),
}


def tiny_diffusers(layout: str, sample_size: int = 8, seed: int = 0, **overrides):
    """A random tiny UNet2DModel (every weight perturbed: no zero layer hides a mismatch)."""
    torch.manual_seed(seed)
    m = diffusers.UNet2DModel(sample_size=sample_size, block_out_channels=(8, 16),
                              norm_num_groups=4, layers_per_block=1,
                              **{**LAYOUTS[layout], **overrides})
    return perturbed(m, seed=seed).eval()


def to_images(x: torch.Tensor) -> np.ndarray:
    """diffunet's samples as the pipelines' ``output_type="np"`` images (B, H, W, C) in [0, 1]."""
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def pipeline_images(pipe, steps: int, seed: int, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    return pipe(batch_size=2, generator=g, num_inference_steps=steps, output_type="np",
                **kwargs).images


def diffunet_images(net, schedule, size: int, steps: int, seed: int, **kwargs) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(2, net.config.in_channels, size, size, generator=g)  # as the pipelines draw
    with torch.no_grad():
        return to_images(diffunet.sample(net, schedule, x_T, num_steps=steps, generator=g,
                                         **kwargs))


def assert_images_close(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Equal to 1e-4, and mostly not clamped (else agreement would be cheap)."""
    inside = ((theirs > 0) & (theirs < 1)).mean()
    assert inside > 0.3, f"only {inside:.0%} of the pixels are inside (0, 1)"
    diff = float(np.abs(ours - theirs).max())
    assert diff < 1e-4, diff
    return diff


# ---------------------------------------------------------------------------------------------
# Import: diffusers -> diffunet


@pytest.mark.parametrize("layout", LAYOUTS)
def test_imported_unet_is_the_same_function(layout, tmp_path, one_thread):
    theirs = tiny_diffusers(layout, sample_size=16)
    theirs.save_pretrained(tmp_path / "unet")
    r = import_diffusers(tmp_path / "unet", tmp_path / "m.safetensors")
    assert r.scheduler is None  # a bare UNet folder: DDPM's schedule
    net, _, _ = diffunet.load_model(tmp_path / "m.safetensors")
    assert net.num_parameters() == sum(p.numel() for p in theirs.parameters())
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([3, 917])
    with torch.no_grad():
        diff = (net(x, t) - theirs(x, t).sample).abs().max().item()
    assert diff < 1e-5, diff


SCHEDULERS = {
    "v-cosine-trailing": dict(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2",
                              timestep_spacing="trailing", clip_sample=False),
    "x0-linear-leading-clip": dict(prediction_type="sample", timestep_spacing="leading",
                                   clip_sample=True),
    # eps: x0_hat = (x - sqrt(1 - ab) eps) / sqrt(ab) leaves [-1, 1] unless ab_T stays near 1.
    "eps-scaled-linear": dict(prediction_type="epsilon", beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012, num_train_timesteps=20,
                              timestep_spacing="trailing", clip_sample=False),
}


@pytest.mark.parametrize("layout,sched", [("attention", "v-cosine-trailing"),
                                          ("no-attention", "x0-linear-leading-clip"),
                                          ("ddpm-checkpoint", "v-cosine-trailing"),
                                          ("heads-adagn", "eps-scaled-linear")])
def test_import_samples_as_ddim_pipeline(layout, sched, tmp_path, one_thread):
    unet = tiny_diffusers(layout)
    pipe = diffusers.DDIMPipeline(unet, diffusers.DDIMScheduler(**SCHEDULERS[sched]))
    pipe.save_pretrained(tmp_path / "pipe")
    r = import_diffusers(tmp_path / "pipe", tmp_path / "m.safetensors")
    net, schedule, meta = diffunet.load_model(tmp_path / "m.safetensors")
    s = meta["run_config"]["sample"]
    assert (s["sampler"], s["spacing"], s["clip_x0"]) == (
        "ddim", SCHEDULERS[sched]["timestep_spacing"], SCHEDULERS[sched]["clip_sample"])
    assert r.scheduler is not None
    theirs = pipeline_images(pipe, 10, seed=1, use_clipped_model_output=True)
    ours = diffunet_images(net, schedule, 8, 10, seed=1, sampler="ddim", spacing=s["spacing"],
                           clip_x0=s["clip_x0"])
    assert_images_close(ours, theirs)


def test_import_ddpm_scheduler_samples_as_ddpm_pipeline(tmp_path, one_thread):
    """The published DDPM checkpoints' scheduler: DDPMScheduler, fixed_small, clip_sample."""
    unet = tiny_diffusers("ddpm-checkpoint")
    sched = diffusers.DDPMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                    beta_schedule="squaredcos_cap_v2")
    pipe = diffusers.DDPMPipeline(unet, sched)
    pipe.save_pretrained(tmp_path / "pipe")
    import_diffusers(tmp_path / "pipe", tmp_path / "m.safetensors")
    net, schedule, meta = diffunet.load_model(tmp_path / "m.safetensors")
    assert meta["run_config"]["sample"]["sampler"] == "ddpm"
    theirs = pipeline_images(pipe, 10, seed=2)
    ours = diffunet_images(net, schedule, 8, 10, seed=2, sampler="ddpm", spacing="trailing",
                           clip_x0=True)
    assert_images_close(ours, theirs)


# ---------------------------------------------------------------------------------------------
# Export: diffunet -> diffusers


def model_file(path, sample: dict | None = None, **net_overrides):
    cfg = UNetConfig(**tiny_net(8, **net_overrides))
    net = perturbed(UNet(cfg), seed=3).eval()
    schedule = NoiseSchedule(ScheduleConfig(beta_schedule="cosine", prediction_type="v"))
    diffunet.save_model(path, net, schedule, extra=None if sample is None else
                        {"run_config": {"sample": sample}})
    return net, schedule


@pytest.mark.parametrize("net_overrides", [{}, {"time_embed_order": "sin_cos",
                                                 "time_embed_freq_shift": 1, "norm_eps": 1e-6,
                                                 "downsample_padding": "bottom_right"},
                                           {"head_channels": 4, "scale_shift_norm": True}],
                         ids=["default", "ddpm-checkpoint", "heads-adagn"])
def test_export_loads_in_both_pipelines(net_overrides, tmp_path, one_thread):
    net, schedule = model_file(tmp_path / "m.safetensors", {"spacing": "trailing",
                                                             "clip_x0": False}, **net_overrides)
    r = export_diffusers(tmp_path / "m.safetensors", tmp_path / "out")
    assert r["pipeline"] == "DDIMPipeline"
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    ours = diffunet_images(net, schedule, 8, 10, seed=4, sampler="ddim", spacing="trailing",
                           clip_x0=False)
    for cls in (diffusers.DDIMPipeline, diffusers.DDPMPipeline):
        pipe = cls.from_pretrained(tmp_path / "out")
        assert type(pipe.scheduler).__name__ == "DDIMScheduler"
        assert pipe.scheduler.config.prediction_type == "v_prediction"
        assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
        assert_images_close(ours, pipeline_images(pipe, 10, seed=4))


@pytest.mark.parametrize("clip", [False, True])
def test_export_ddpm_sampler_is_a_ddpm_pipeline(clip, tmp_path, one_thread):
    net, schedule = model_file(tmp_path / "m.safetensors",
                               {"sampler": "ddpm", "spacing": "trailing", "clip_x0": clip})
    r = export_diffusers(tmp_path / "m.safetensors", tmp_path / "out")
    assert (r["pipeline"], r["scheduler"]) == ("DDPMPipeline", "DDPMScheduler")
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "out")
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert pipe.scheduler.config.clip_sample is clip
    ours = diffunet_images(net, schedule, 8, 10, seed=5, sampler="ddpm", spacing="trailing",
                           clip_x0=clip)
    assert_images_close(ours, pipeline_images(pipe, 10, seed=5))
    # The same folder in DDIMPipeline: the scheduler becomes a DDIMScheduler of the same schedule.
    ddim = diffusers.DDIMPipeline.from_pretrained(tmp_path / "out")
    ours = diffunet_images(net, schedule, 8, 10, seed=5, sampler="ddim", spacing="trailing",
                           clip_x0=clip)
    assert_images_close(ours, pipeline_images(ddim, 10, seed=5, use_clipped_model_output=True))


def test_round_trips_are_identical(tmp_path):
    model_file(tmp_path / "m.safetensors", {"spacing": "leading", "clip_x0": True},
               head_channels=4, time_embed_order="sin_cos", time_embed_freq_shift=1,
               norm_eps=1e-6, downsample_padding="bottom_right")
    export_diffusers(tmp_path / "m.safetensors", tmp_path / "out")
    import_diffusers(tmp_path / "out", tmp_path / "back.safetensors")
    a, sa, _ = diffunet.load_model(tmp_path / "m.safetensors")
    b, sb, mb = diffunet.load_model(tmp_path / "back.safetensors")
    assert a.config == b.config and sa.config == sb.config
    assert mb["run_config"]["sample"]["spacing"] == "leading"
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    # ... and diffusers -> diffunet -> diffusers.
    unet = tiny_diffusers("ddpm-checkpoint")
    unet.save_pretrained(tmp_path / "d" / "unet")
    import_diffusers(tmp_path / "d" / "unet", tmp_path / "d.safetensors")
    export_diffusers(tmp_path / "d.safetensors", tmp_path / "d2")
    again = diffusers.UNet2DModel.from_pretrained(tmp_path / "d2" / "unet")
    for k, v in unet.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    def plain(config):
        return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))

    assert plain(again.config) == {**plain(unet.config), "attn_norm_num_groups": 4}


def test_state_mapping_matches_diffusers_names():
    cfg = UNetConfig(**tiny_net(8, channel_mults=(1, 2, 2), num_res_blocks=2))
    ours = perturbed(UNet(cfg))
    theirs = diffusers.UNet2DModel(**unet_to_diffusers(cfg))
    theirs.load_state_dict(state_to_diffusers(ours.state_dict(), cfg), strict=True)
    back = state_from_diffusers(theirs.state_dict(), cfg)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_pre_015_attention_names_are_read():
    """The original DDPM checkpoints' files name attention weights query/key/value/proj_attn."""
    cfg = UNetConfig(**tiny_net(8))
    sd = state_to_diffusers(perturbed(UNet(cfg)).state_dict(), cfg)
    old = {}
    for k, v in sd.items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                            ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{legacy}.")
        old[k] = v
    assert any(".proj_attn." in k for k in old)
    back = state_from_diffusers(old, cfg)
    assert all(torch.equal(back[k], v) for k, v in state_from_diffusers(sd, cfg).items())


# ---------------------------------------------------------------------------------------------
# Schedules


def test_cosine_is_squaredcos_cap_v2_and_sigmoid_exports_as_its_table():
    ours = make_betas(ScheduleConfig(beta_schedule="cosine"))
    theirs = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2").betas.double()
    assert (ours - theirs).abs().max() < 1e-7  # the same formula, float32 there
    sig = ScheduleConfig(beta_schedule="sigmoid", beta_start=1e-4, beta_end=0.02)
    config = scheduler_to_diffusers(sig)
    ddim = diffusers.DDIMScheduler.from_config(config)
    ddpm = diffusers.DDPMScheduler(beta_schedule="sigmoid", beta_start=1e-4, beta_end=0.02)
    assert (ddim.betas.double() - ddpm.betas.double()).abs().max() < 1e-7
    assert schedule_from_diffusers(config)[0] == sig


def test_published_ddpm_configs_import_with_their_parameter_counts():
    """google/ddpm-cifar10-32's and google/ddpm-church-256's unet/config.json (as published)."""
    common = {"_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu",
              "attention_head_dim": None, "center_input_sample": False,
              "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1,
              "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
              "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3,
              "time_embedding_type": "positional"}
    cifar = {**common, "sample_size": 32, "block_out_channels": [128, 256, 256, 256],
             "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
    church = {**common, "sample_size": 256, "block_out_channels": [128, 128, 256, 256, 512, 512],
              "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4}
    for config, n in ((cifar, 35_746_307), (church, None)):
        cfg = unet_from_diffusers(config)
        assert (cfg.norm_eps, cfg.time_embed_order, cfg.time_embed_freq_shift,
                cfg.downsample_padding) == (1e-6, "sin_cos", 1, "bottom_right")
        with torch.device("meta"):
            ours = UNet(cfg).num_parameters()
            theirs = sum(p.numel() for p in diffusers.UNet2DModel(
                **{k: v for k, v in config.items() if not k.startswith("_")}).parameters())
        assert ours == theirs == (n or theirs)
    assert unet_from_diffusers(cifar).attn_resolutions == (16,)
    assert unet_from_diffusers(church).attn_resolutions == (16,)


# ---------------------------------------------------------------------------------------------
# What one side cannot express: one line naming the field and its value


BASE = {"sample_size": 8, "block_out_channels": [8, 16], "norm_num_groups": 4,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": None}

UNREPRESENTABLE = [
    ({"act_fn": "gelu"}, "act_fn = \"gelu\""),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]},
     "down_block_types[1] = \"CrossAttnDownBlock2D\""),
    ({"down_block_types": ["SkipDownBlock2D", "AttnDownBlock2D"]},
     "down_block_types[0] = \"SkipDownBlock2D\""),
    ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}, "up_block_types = "),
    ({"up_block_types": ["AttnUpBlock2D", "ResnetUpsampleBlock2D"]},
     "up_block_types[1] = \"ResnetUpsampleBlock2D\""),
    ({"upsample_type": "resnet"}, "upsample_type = \"resnet\""),
    ({"downsample_type": "resnet"}, "downsample_type = \"resnet\""),
    ({"downsample_padding": 2}, "downsample_padding = 2"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type = \"fourier\""),
    ({"time_embedding_dim": 64}, "time_embedding_dim = 64"),
    ({"center_input_sample": True}, "center_input_sample = true"),
    ({"mid_block_scale_factor": 1.414}, "mid_block_scale_factor = 1.414"),
    ({"mid_block_type": None}, "mid_block_type = null"),
    ({"add_attention": False}, "add_attention = false"),
    ({"resnet_time_scale_shift": "scale_shift"}, "attn_norm_num_groups = null"),
    ({"resnet_time_scale_shift": "spatial"}, "resnet_time_scale_shift = \"spatial\""),
    ({"attn_norm_num_groups": 2}, "attn_norm_num_groups = 2"),
    ({"norm_num_groups": None}, "norm_num_groups = null"),
    ({"num_class_embeds": 10}, "num_class_embeds = 10"),
    ({"class_embed_type": "timestep"}, "class_embed_type = \"timestep\""),
    ({"sample_size": [8, 16]}, "sample_size = [8, 16]"),
    ({"block_out_channels": [8, 12], "norm_num_groups": 4}, "block_out_channels = [8, 12]"),
    ({"attention_head_dim": 3}, "head_channels"),
    ({"norm_eps": "tiny"}, "norm_eps: expected"),
    ({"_class_name": "UNet2DConditionModel"}, "_class_name = \"UNet2DConditionModel\""),
]


@pytest.mark.parametrize("change,named", UNREPRESENTABLE,
                         ids=[next(iter(c)) + f"-{i}" for i, (c, _) in enumerate(UNREPRESENTABLE)])
def test_unrepresentable_unet_setting_is_one_line(change, named):
    with pytest.raises(ModelFileError) as info:
        unet_from_diffusers({**BASE, **change})
    message = str(info.value)
    assert "\n" not in message and named in message, message


SCHED_UNREPRESENTABLE = [
    ({"_class_name": "PNDMScheduler"}, "_class_name = \"PNDMScheduler\""),
    ({"prediction_type": "flow"}, "prediction_type = \"flow\""),
    ({"beta_schedule": "laplace"}, "beta_schedule = \"laplace\""),
    ({"steps_offset": 1}, "steps_offset = 1"),
    ({"thresholding": True}, "thresholding = true"),
    ({"clip_sample_range": 2.0}, "clip_sample_range = 2.0"),
    ({"set_alpha_to_one": False}, "set_alpha_to_one = false"),
    ({"_class_name": "DDPMScheduler", "variance_type": "learned_range"},
     "variance_type = \"learned_range\""),
    ({"trained_betas": [0.01] * 1000}, "trained_betas"),
    ({"num_train_timesteps": 1}, "num_train_timesteps"),
]


@pytest.mark.parametrize("change,named", SCHED_UNREPRESENTABLE,
                         ids=[f"{next(iter(c))}-{i}"
                              for i, (c, _) in enumerate(SCHED_UNREPRESENTABLE)])
def test_unrepresentable_scheduler_setting_is_one_line(change, named):
    with pytest.raises(ModelFileError) as info:
        schedule_from_diffusers({"_class_name": "DDIMScheduler", **change})
    message = str(info.value)
    assert "\n" not in message and named in message, message


@pytest.mark.parametrize("change,named", [
    ({"downsample": "avgpool"}, "unet.downsample = 'avgpool'"),
    ({"upsample": "transposed"}, "unet.upsample = 'transposed'"),
    ({"num_classes": 10}, "unet.num_classes = 10"),
    ({"time_conditioning": False, "out_channels": 2}, "unet.time_conditioning = false"),
    ({"num_heads": 2, "channel_mults": (1, 2, 4), "attn_resolutions": (8,)}, "unet.num_heads = 2"),
    ({"num_groups": 32, "group_channels": 4}, "unet.group_channels = 4"),
])
def test_export_refuses_what_unet2dmodel_cannot_express(change, named):
    with pytest.raises(UsageError) as info:
        unet_to_diffusers(UNetConfig(**tiny_net(16, **change)))
    message = str(info.value)
    assert "\n" not in message and named in message, message


def test_pickled_weights_are_refused_with_a_hint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"PK\x03\x04 not to be unpickled")
    with pytest.raises(ModelFileError) as info:
        import_diffusers(tmp_path, tmp_path / "m.safetensors")
    message = str(info.value)
    assert "\n" not in message and "pickle" in message and "safe_serialization" in message
    assert not (tmp_path / "m.safetensors").exists()


def test_folders_and_files_are_not_overwritten(tmp_path):
    model_file(tmp_path / "m.safetensors")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FolderError, match="not empty"):
        export_diffusers(tmp_path / "m.safetensors", tmp_path / "full")
    export_diffusers(tmp_path / "m.safetensors", tmp_path / "full", overwrite=True)
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    with pytest.raises(UsageError, match="exists"):
        import_diffusers(tmp_path / "full", tmp_path / "m.safetensors")
    with pytest.raises(ModelFileError, match="neither unet/config.json nor config.json"):
        import_diffusers(tmp_path, tmp_path / "x.safetensors")


# ---------------------------------------------------------------------------------------------
# The commands


def test_export_and_import_commands(tmp_path, capsys, cpu_accelerate):
    model_file(tmp_path / "m.safetensors")
    out = tmp_path / "pipe"
    assert main(["export", str(tmp_path / "m.safetensors"), str(out)]) == 0
    assert "DDIMPipeline" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "m.safetensors"), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "diffunet export: error:" in err and "not empty" in err
    assert main(["export", str(tmp_path / "m.safetensors"), str(out), "--overwrite"]) == 0
    capsys.readouterr()

    assert main(["import", str(out), str(tmp_path / "back.safetensors")]) == 0
    assert "sample with ddim" in capsys.readouterr().out
    assert main(["import", str(out), str(tmp_path / "back.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists" in err and "--overwrite" in err
    assert main(["import", str(out), str(tmp_path / "back.safetensors"), "--overwrite"]) == 0
    capsys.readouterr()
    # diffunet samples the imported file as usual.
    assert main(["sample", str(tmp_path / "back.safetensors"), "--num-samples", "2",
                 "--steps", "2", "--out-dir", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "000001.png").is_file()
    capsys.readouterr()

    config = json.loads((out / "unet" / "config.json").read_text())
    (out / "unet" / "config.json").write_text(json.dumps({**config, "act_fn": "mish"}))
    assert main(["import", str(out), str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "act_fn = \"mish\"" in err
    model_file(tmp_path / "avg.safetensors", downsample="avgpool")
    assert main(["export", str(tmp_path / "avg.safetensors"), str(tmp_path / "p2")]) == 2
    assert "unet.downsample = 'avgpool'" in capsys.readouterr().err
    assert not (tmp_path / "p2").exists()


# ---------------------------------------------------------------------------------------------
# The UNetConfig fields the DDPM checkpoints need


@pytest.mark.parametrize("order,shift", [("cos_sin", 0), ("sin_cos", 1), ("sin_cos", 0)])
def test_timestep_embedding_matches_diffusers(order, shift):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 999])
    ours = timestep_embedding(t, 64, order=order, freq_shift=shift)
    theirs = get_timestep_embedding(t, 64, flip_sin_to_cos=order == "cos_sin",
                                    downscale_freq_shift=shift)
    assert (ours - theirs).abs().max() < 1e-6


@pytest.mark.parametrize("change,named", [
    ({"norm_eps": 0.0}, "unet.norm_eps"),
    ({"time_embed_freq_shift": 4}, "unet.time_embed_freq_shift"),
    ({"time_embed_freq_shift": -1}, "unet.time_embed_freq_shift"),
    ({"downsample": "avgpool", "downsample_padding": "bottom_right"}, "unet.downsample_padding"),
])
def test_new_unet_fields_are_validated(change, named):
    with pytest.raises(ConfigError) as info:
        UNetConfig(**tiny_net(16, **change))
    assert "\n" not in str(info.value) and str(info.value).startswith(named)


def test_new_unet_fields_default_to_todays_network():
    cfg = UNetConfig()
    assert (cfg.norm_eps, cfg.time_embed_order, cfg.time_embed_freq_shift,
            cfg.downsample_padding) == (1e-5, "cos_sin", 0, "symmetric")
    old = {k: v for k, v in to_dict(UNetConfig(**tiny_net(8))).items()
           if k not in ("norm_eps", "time_embed_order", "time_embed_freq_shift",
                        "downsample_padding")}
    assert from_dict(UNetConfig, old, "unet") == UNetConfig(**tiny_net(8))  # older model files


# ---------------------------------------------------------------------------------------------
# The Hugging Face Hub, offline: a local folder laid out as huggingface_hub's cache stands in
# for the Hub (import), and upload_folder is pointed at such a folder (export --push-to-hub)


def hub_cache_put(cache, repo_id: str, folder) -> None:
    """Place ``folder`` in the huggingface_hub cache ``cache`` as repo ``repo_id``'s main."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """huggingface_hub offline, its cache a folder of this test."""
    import huggingface_hub

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_import_from_a_hub_repo_id(tmp_path, offline_hub, capsys, cpu_accelerate):
    unet = tiny_diffusers("ddpm-checkpoint")
    pipe = diffusers.DDPMPipeline(unet, diffusers.DDPMScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"PK\x03\x04")
    hub_cache_put(offline_hub, "someone/tiny-ddpm", tmp_path / "pipe")
    assert main(["import", "someone/tiny-ddpm", str(tmp_path / "m.safetensors")]) == 0
    assert "sample with ddpm" in capsys.readouterr().out
    net, _, meta = diffunet.load_model(tmp_path / "m.safetensors")
    assert meta["imported_from"]["diffusers"] == "someone/tiny-ddpm"
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([5])
    with torch.no_grad():
        assert (net(x, t) - unet(x, t).sample).abs().max() < 1e-5
    # A repo id the (offline) Hub does not have: one line, exit 2.
    assert main(["import", "someone/nothing", str(tmp_path / "n.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Hugging Face Hub download failed" in err[-1] and "someone/nothing" in err[-1]


def test_load_model_takes_a_hub_repo_id_or_a_diffusers_folder(tmp_path, offline_hub):
    unet = tiny_diffusers("ddpm-checkpoint")
    diffusers.DDPMPipeline(unet, diffusers.DDPMScheduler(num_train_timesteps=50)
                           ).save_pretrained(tmp_path / "pipe")
    hub_cache_put(offline_hub, "someone/tiny-ddpm", tmp_path / "pipe")
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([5])
    for source in ("someone/tiny-ddpm", tmp_path / "pipe"):
        net, schedule, meta = diffunet.load_model(source)
        assert meta["imported_from"]["diffusers"] == str(source)
        assert schedule.num_train_timesteps == 50
        with torch.no_grad():
            assert (net(x, t) - unet(x, t).sample).abs().max() < 1e-5
    assert not list(tmp_path.glob("**/diffunet-import-*"))  # the temporary file is gone
    with pytest.raises(UsageError, match="Hugging Face Hub download failed"):
        diffunet.load_model("someone/nothing")
    with pytest.raises(UsageError, match="revision= is for a Hub model id"):
        diffunet.load_model(tmp_path / "pipe", revision="main")


def test_export_push_to_hub(tmp_path, offline_hub, monkeypatch, capsys, cpu_accelerate):
    import huggingface_hub

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create", repo_id, kwargs.get("private")))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(("upload", repo_id))
        hub_cache_put(offline_hub, repo_id, folder_path)
        return "https://huggingface.co/me/tiny/commit/0123456"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    net, schedule = model_file(tmp_path / "m.safetensors", {"spacing": "trailing",
                                                             "clip_x0": False})
    assert main(["export", str(tmp_path / "m.safetensors"), str(tmp_path / "out"),
                 "--push-to-hub", "me/tiny", "--private"]) == 0
    assert "pushed to me/tiny" in capsys.readouterr().out
    assert calls == [("create", "me/tiny", True), ("upload", "me/tiny")]
    # What was pushed is a pipeline: loaded from the (local) Hub copy by diffusers and diffunet.
    snapshot = huggingface_hub.snapshot_download("me/tiny", local_files_only=True)
    pipe = diffusers.DDIMPipeline.from_pretrained(snapshot)
    ours = diffunet_images(net, schedule, 8, 5, seed=6, sampler="ddim", spacing="trailing",
                           clip_x0=False)
    assert_images_close(ours, pipeline_images(pipe, 5, seed=6))
    assert main(["import", "me/tiny", str(tmp_path / "back.safetensors")]) == 0
    assert main(["export", str(tmp_path / "m.safetensors"), str(tmp_path / "o2"),
                 "--push-to-hub", "not a repo"]) == 2
    assert "not a Hub repository id" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def _readme_commands(section: str) -> list[str]:
    """The shell commands of the first ```bash block under README heading ``section``, with
    backslash continuations joined and comments dropped."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    body = readme.split(f"## {section}\n", 1)[1]
    block = body.split("```bash\n", 1)[1].split("\n```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        line = line.rstrip()
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        line = (current + line).strip()
        current = ""
        if line and not line.startswith("#"):
            # a trailing "# comment" outside quotes (the commands have no '#' of their own)
            commands.append(line.split("   #")[0].strip())
    return commands


def test_the_readme_coming_from_diffusers_commands_run(tmp_path):
    # Every command of the README's section, as written, on a tiny model at the path it names.
    # The two that need the network (a Hub push, the published CIFAR-10 model) are exercised
    # offline by test_export_push_to_hub and test_import_from_a_hub_repo_id; the sample line then
    # samples the file imported from the local export instead. The train line runs as --dry-run
    # (its config is checked); a tiny VP model file stands in for the weights it would write.
    commands = _readme_commands("Coming from diffusers")
    assert [c.split()[:2] for c in commands] == [
        ["diffunet", "train"], ["diffunet", "export"], ["python", "-c"], ["diffunet", "export"],
        ["diffunet", "import"], ["diffunet", "import"], ["diffunet", "sample"]]
    for command in commands:
        if "--push-to-hub" in command or "google/" in command:
            continue
        if command.startswith("diffunet train"):
            command += " --dry-run"
        argv = shlex.split(command.replace("cifar10.safetensors", "back.safetensors"))
        exe = [sys.executable, "-m", "diffunet"] if argv[0] == "diffunet" else [sys.executable]
        r = subprocess.run([*exe, *argv[1:]], cwd=tmp_path, env=cpu_env(), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, (command, r.stderr)
        if argv[1] == "train":
            assert 'formulation = "vp"' in r.stdout, r.stdout  # what the export below needs
            (tmp_path / "runs/shapes/weights").mkdir(parents=True)
            model_file(tmp_path / "runs/shapes/weights/model_step0002000.safetensors",
                       {"spacing": "trailing", "clip_x0": True})
    assert (tmp_path / "shapes-pipeline" / "model_index.json").is_file()
    with Image.open(tmp_path / "x.png") as img:
        assert img.size == (8, 8)
    assert (tmp_path / "back.safetensors").is_file()
    assert len(list((tmp_path / "samples" / "back").glob("0*.png"))) == 16
