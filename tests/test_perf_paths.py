"""The speed paths compute the same numbers as the plain ones: channels-last activations, the
folded nearest-upsample convolution, in-place work without autograd, the attention fallback,
bf16 autocast, torch.compile; plus the benchmark end to end and its FLOP count."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffunet.bench import BenchOptions, benchmark, forward_flops, format_table, resolve_unet
from diffunet.config import ScheduleConfig, UNetConfig, load_config
from diffunet.formulations.vp import NoiseSchedule
from diffunet.errors import ConfigError, UsageError
from diffunet.nn import AttentionBlock, ResidualBlock, Upsample, _math_attention, attention
from diffunet.unet import UNet
from helpers import perturbed, tiny_net, tiny_run
from processes import clean_env, reset_accelerate_state

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_net(base_channels=16, num_groups=8)
TOL = dict(rtol=1e-4, atol=1e-5)


def run(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Output, input gradient and parameter gradients of a squared-output loss."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x, t)
    out.square().mean().backward()
    return out.detach(), x.grad, {n.removeprefix("_orig_mod."): p.grad.clone()
                                  for n, p in model.named_parameters()}


def assert_same_run(a: tuple, b: tuple) -> None:
    torch.testing.assert_close(a[0], b[0], **TOL)
    torch.testing.assert_close(a[1], b[1], **TOL)
    for name, grad in a[2].items():
        torch.testing.assert_close(grad, b[2][name], **TOL, msg=name)


# ---------------------------------------------------------------------------------------------
# Memory format


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("overrides", [{}, dict(scale_shift_norm=True, num_heads=2),
                                       dict(in_channels=1, image_size=8, attn_resolutions=(4,))],
                         ids=["tiny", "adagn-2heads", "gray-8px"])
def test_channels_last_matches_plain_path(overrides):
    cfg = UNetConfig(**{**TINY, **overrides})
    model = perturbed(UNet(cfg)).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    # The plain path: no oneDNN, NCHW activations, PyTorch's own convolutions.
    with torch.backends.mkldnn.flags(enabled=False):
        plain = run(model, x, t)
    default = run(model, x, t)  # on a CPU: channels-last activations through oneDNN
    assert_same_run(plain, default)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    cl = run(cl_model, x.contiguous(memory_format=torch.channels_last), t)
    assert_same_run(plain, cl)
    # NCHW in, NCHW out; channels-last in, channels-last out.
    assert default[0].is_contiguous()
    assert cl[0].is_contiguous(memory_format=torch.channels_last)


def test_fp64_and_no_grad_paths_match():
    cfg = UNetConfig(**TINY)
    model = perturbed(UNet(cfg)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
    with torch.no_grad():  # in-place SiLU and adds
        fast = model(x, t)
    slow = model(x, t)  # autograd on: no in-place SiLU
    assert torch.equal(fast, slow.detach())
    ref = copy.deepcopy(model).double()(x.double(), t)
    torch.testing.assert_close(fast, ref.float(), **TOL)


def test_residual_block_in_place_work_leaves_its_input_alone():
    block = perturbed(ResidualBlock(8, 8, emb_dim=12, num_groups=2)).eval()
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 12)
    x_before, emb_before = x.clone(), emb.clone()
    with torch.no_grad():
        out = block(x, emb)
    assert torch.equal(x, x_before) and torch.equal(emb, emb_before)
    assert torch.equal(out, block(x, emb).detach())


# ---------------------------------------------------------------------------------------------
# The folded nearest-upsample convolution


@pytest.mark.parametrize("shape", [(2, 6, 4, 4), (1, 5, 5, 3), (3, 8, 1, 7)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_equals_nearest_then_conv(shape, channels_last):
    torch.manual_seed(0)
    up = Upsample(shape[1], "nearest")
    x = torch.randn(shape)
    if channels_last:
        up = up.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = up(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = F.conv2d(F.interpolate(ref_x, scale_factor=2.0, mode="nearest"), up.conv.weight,
                   up.conv.bias, padding=1)
    torch.testing.assert_close(out, ref, **TOL)
    grad = torch.randn_like(ref)
    w_grad, b_grad = torch.autograd.grad(out, (up.conv.weight, up.conv.bias), grad,
                                         retain_graph=True)
    (x_grad,) = torch.autograd.grad(out, x, grad)
    ref_w, ref_b, ref_xg = torch.autograd.grad(ref, (up.conv.weight, up.conv.bias, ref_x), grad)
    torch.testing.assert_close(w_grad, ref_w, **TOL)
    torch.testing.assert_close(b_grad, ref_b, **TOL)
    torch.testing.assert_close(x_grad, ref_xg, **TOL)


# ---------------------------------------------------------------------------------------------
# Attention: the SDPA path and the fallback


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in float64, (B, heads, N, d)."""
    q, k, v = q.double(), k.double(), v.double()
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


@pytest.mark.parametrize("head_dim", [12, 20, 64, 3])
def test_attention_and_fallback_match_softmax_attention(head_dim):
    g = torch.Generator().manual_seed(head_dim)
    q, k, v = (torch.randn(2, 3, 17, head_dim, generator=g) for _ in range(3))
    expected = reference_attention(q, k, v).float()
    torch.testing.assert_close(attention(q, k, v), expected, **TOL)
    torch.testing.assert_close(_math_attention(q, k, v), expected, **TOL)
    # No allowed kernel takes CPU inputs: SDPA refuses, attention() falls back.
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        with pytest.raises(RuntimeError):
            F.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(attention(q, k, v), expected, **TOL)


def test_attention_fallback_keeps_gradients_and_dtype():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 20, generator=g, requires_grad=True) for _ in range(3))
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        out = attention(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = torch.autograd.grad(reference_attention(q, k, v).sum(), (q, k, v))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b.float(), **TOL)
    half = _math_attention(*(z.detach().bfloat16() for z in (q, k, v)))
    assert half.dtype == torch.bfloat16


@pytest.mark.parametrize("channels, heads", [(24, 2), (40, 2), (16, 4)],
                         ids=["head12", "head20", "head4"])
def test_attention_block_odd_head_sizes(channels, heads):
    torch.manual_seed(0)
    block = perturbed(AttentionBlock(channels, num_heads=heads, num_groups=4))
    x = torch.randn(2, channels, 5, 3)
    b, c, h, w = x.shape
    d = c // heads
    tokens = block.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
    q, k, v = (tokens @ block.qkv.weight.T + block.qkv.bias).split(c, dim=-1)
    q, k, v = (z.reshape(b, h * w, heads, d).transpose(1, 2) for z in (q, k, v))
    attn = reference_attention(q, k, v).float().transpose(1, 2).reshape(b, h * w, c)
    expected = x + (attn @ block.proj.weight.T + block.proj.bias).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, **TOL)
    torch.testing.assert_close(block(x.contiguous(memory_format=torch.channels_last)), expected,
                               **TOL)


# ---------------------------------------------------------------------------------------------
# bf16 autocast and torch.compile


def test_bf16_autocast_forward_is_close_to_fp32():
    cfg = UNetConfig(**TINY)
    model = perturbed(UNet(cfg)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t)
    assert low.shape == ref.shape
    err = (low.float() - ref).norm() / ref.norm()
    assert err < 3e-2, float(err)


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@pytest.mark.slow
@pytest.mark.skipif(not _has_cxx(), reason="torch.compile on a CPU needs a C++ compiler")
@pytest.mark.slow
def test_compiled_training_step_gives_the_eager_model(tmp_path, cpu_accelerate):
    # ~1-2 minutes on 2 cores from a cold cache: Inductor compiles the objective (noising,
    # forward, loss) and its backward. Same data, noise and updates: the same weights. (No
    # dropout: compiled code draws its masks from another random stream than eager code.)
    from safetensors.torch import load_file

    from diffunet.training import train

    runs = []
    for flag in ("false", "true"):
        reset_accelerate_state()
        out = tmp_path / flag
        train(load_config(None, tiny_run("train.max_steps=2", "train.warmup_steps=0",
                                         "train.lr=1e-2", f"train.compile={flag}")), out,
              progress=False)
        runs.append(load_file(str(out / "state" / "step0000002" / "model.safetensors")))
    eager, compiled = runs
    # Two Adam steps at lr 1e-2 move the weights by ~2e-2; float rounding in the fused kernels,
    # normalised by Adam where a gradient is near 0, leaves them within 1e-4 of each other.
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-3, atol=1e-4, msg=key)


# ---------------------------------------------------------------------------------------------
# One graph: nothing in the network or the objective breaks torch.compile's trace


def _one_graph_configs() -> dict[str, UNetConfig]:
    from diffunet.config import SMALL_UNET, SegRunConfig

    return {"default": SMALL_UNET, "ddpm-cifar10": UNetConfig(),
            "class-conditional": dataclasses.replace(SMALL_UNET, num_classes=10),
            "segmentation": SegRunConfig().net_config,
            "adagn-heads-checkpointing": dataclasses.replace(
                SMALL_UNET, scale_shift_norm=True, head_channels=16, num_classes=3,
                gradient_checkpointing=True)}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(_one_graph_configs()))
def test_the_unet_is_one_graph(name, mode):
    import torch._dynamo as dynamo

    cfg = _one_graph_configs()[name]
    net = getattr(UNet(cfg), mode)()
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    args = (x, torch.tensor([3, 900])) if cfg.time_conditioning else (x,)
    kwargs = {"class_labels": torch.tensor([1, cfg.num_classes])} if cfg.num_classes else {}
    dynamo.reset()
    report = dynamo.explain(net)(*args, **kwargs)
    assert (report.graph_count, report.graph_break_count) == (1, 0), report.break_reasons
    assert report.op_count > 100


@pytest.mark.parametrize("conditional", [False, True])
def test_the_training_objective_is_one_graph(conditional):
    import torch._dynamo as dynamo

    from diffunet.config import SMALL_UNET
    from diffunet.training import step_loss

    cfg = dataclasses.replace(SMALL_UNET, num_classes=4 if conditional else None)
    net = UNet(cfg).train()
    schedule = NoiseSchedule(ScheduleConfig(beta_schedule="cosine", prediction_type="v"))
    x0 = torch.randn(2, 3, 32, 32)
    cond = {"class_labels": torch.tensor([1, 4])} if conditional else {}
    dynamo.reset()
    report = dynamo.explain(step_loss)(net, schedule, x0, torch.randn_like(x0),
                                       torch.tensor([0, 999]), cond, 5.0)
    assert (report.graph_count, report.graph_break_count) == (1, 0), report.break_reasons


# ---------------------------------------------------------------------------------------------
# The benchmark


def test_forward_flops_of_the_ddpm_network():
    nominal, executed = forward_flops(UNetConfig())
    assert nominal == pytest.approx(12.44e9, rel=0.005)  # the "12.4 GFLOP per 32x32 image"
    assert executed < nominal - 0.8e9  # the folded upsampling skips ~0.88 GFLOP


def test_bench_config_resolution():
    assert resolve_unet("ddpm-cifar10") == UNetConfig()
    assert resolve_unet("tiny", ["unet.base_channels=8", "unet.num_groups=4"]).base_channels == 8
    toml = resolve_unet(str(ROOT / "configs" / "mnist.toml"))
    assert toml == load_config(ROOT / "configs" / "mnist.toml").unet
    with pytest.raises(UsageError, match="not a preset"):
        resolve_unet("nope")
    with pytest.raises(UsageError, match="unet.key=value"):
        resolve_unet("tiny", ["train.batch_size=4"])
    with pytest.raises(ConfigError, match="unet.base_chanels"):
        resolve_unet("tiny", ["unet.base_chanels=8"])
    with pytest.raises(UsageError, match="--repeats"):
        BenchOptions(repeats=0)


def test_bench_in_process_tiny(tmp_path):
    opts = BenchOptions(unet=resolve_unet("tiny"), config_name="tiny", batch_size=2,
                        sample_batch_size=2, sample_steps=2, repeats=1, warmup=0,
                        device="cpu", profile=str(tmp_path / "prof"))
    result = benchmark(opts)
    for what in ("train", "sample"):
        assert result["profiles"][what]["top_ops"]
        assert (tmp_path / f"prof.{what}.json").is_file()
    rows = {(r["model"], r["what"]): r for r in result["results"]}
    assert set(rows) == {("diffunet", "train"), ("diffunet", "sample")}
    for r in rows.values():
        assert r["ms_per_step"] > 0 and r["images_per_s"] > 0
        assert r["peak_step_mb"] is None or r["peak_step_mb"] > 0
        assert r["mfu"] is None  # no GPU peak on a CPU
    assert "diffunet" in format_table(result)
    json.dumps(result)  # JSON-ready


def _bench_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--config", "tiny", "--repeats", "2",
         "--warmup", "1", "--batch-size", "4", "--sample-batch-size", "4", "--sample-steps", "2",
         "--threads", "1", *args], capture_output=True, text=True, timeout=300)


def test_bench_script_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    r = _bench_script("unet.base_channels=8", "unet.num_groups=4", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train step" in r.stdout and "sample DDIM-50" in r.stdout
    data = json.loads(out.read_text())
    assert data["unet"]["base_channels"] == 8
    assert [(x["model"], x["what"]) for x in data["results"]] == [("diffunet", "train"),
                                                                   ("diffunet", "sample")]
    assert data["flops"]["nominal"] >= data["flops"]["executed"] > 0


@pytest.mark.slow
def test_bench_script_compares_with_diffusers(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "bench.json"
    r = _bench_script("--compare-diffusers", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "diffunet/diffusers train: time" in r.stdout
    data = json.loads(out.read_text())
    assert {(x["model"], x["what"]) for x in data["results"]} == {
        (m, w) for m in ("diffunet", "diffusers") for w in ("train", "sample")}
    assert data["parameters"]["diffunet"] == data["parameters"]["diffusers"]
    assert set(data["ratios"]) == {"train", "sample"}


def test_bench_script_reports_bad_input_in_one_line():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--config", "nope",
                        "--json", ""], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not a preset" in r.stderr


# ---------------------------------------------------------------------------------------------
# The training-side flags


def test_train_flags_are_validated():
    cfg = load_config(None, ["train.channels_last=true", "train.compile=false"])
    assert cfg.train.channels_last and not cfg.train.compile
    with pytest.raises(ConfigError, match=r"train\.compile"):
        load_config(None, ["train.compile=1"])


def test_train_channels_last_gives_the_same_model(tmp_path, cpu_accelerate):
    from accelerate.utils import set_seed
    from safetensors.torch import load_file

    from diffunet.training import train

    tiny = tiny_run("data.builtin_size=16", "train.max_steps=3", "train.lr=1e-2",
                    "train.warmup_steps=0", "sample.num_images=2")
    weights = []
    for flag in ("false", "true"):
        reset_accelerate_state()
        out = tmp_path / flag
        train(load_config(None, [*tiny, f"train.channels_last={flag}"]), out, progress=False)
        weights.append(load_file(str(out / "state" / "step0000003" / "model.safetensors")))
    set_seed(0)  # what train() does before building the network: its initial weights
    init = UNet(load_config(None, tiny).unet).state_dict()
    a, b = weights
    # The weights moved far more than the tolerance they are compared at ...
    moved = sorted(float((a[k] - init[k]).abs().max()) for k in a)
    assert moved[len(moved) // 10] > 1e-3, moved[:5]
    # ... and both memory layouts moved them to the same place.
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-6, msg=key)


# ---------------------------------------------------------------------------------------------
# GPU (skipped without one): the bf16 / channels-last / flash-attention path


@pytest.mark.gpu
def test_gpu_bf16_channels_last_matches_fp32():
    cfg = UNetConfig(**TINY)
    ref_model = perturbed(UNet(cfg)).eval()
    model = copy.deepcopy(ref_model).cuda().to(memory_format=torch.channels_last)
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1, 10, 500, 999])
    with torch.no_grad():
        ref = ref_model(x, t)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x.cuda(), t.cuda())
    err = (out.float().cpu() - ref).norm() / ref.norm()
    assert err < 3e-2, float(err)


@pytest.mark.gpu
def test_gpu_bench_bf16_channels_last_compiled(tmp_path):
    opts = BenchOptions(unet=resolve_unet("tiny"), config_name="tiny", batch_size=8,
                        sample_batch_size=8, sample_steps=3, repeats=1, warmup=2,
                        device="cuda", precision="bf16", channels_last=True, compile=True,
                        peak_tflops=100.0, profile=str(tmp_path / "prof"))
    result = benchmark(opts)
    for r in result["results"]:
        assert r["ms_per_step"] > 0 and r["peak_step_mb"] > 0
    assert next(r for r in result["results"] if r["what"] == "train")["mfu"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [12, 20, 256])
def test_gpu_attention_never_fails(dtype, head_dim):
    q, k, v = (torch.randn(2, 2, 64, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    expected = reference_attention(q, k, v)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(attention(q, k, v).double(), expected, **tol)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # fp32 / odd sizes: flash refuses, we fall back
        torch.testing.assert_close(attention(q, k, v).double(), expected, **tol)


def test_train_channels_last_resume_is_exact(tmp_path, cpu_accelerate):
    # Saved optimizer moments load contiguous; the fused AdamW needs them in the (channels-last)
    # weights' layout, or the resumed steps would silently use permuted moments.
    from safetensors.torch import load_file

    from diffunet.training import train

    tiny = tiny_run("data.builtin_size=16", "sample.num_images=2", "train.channels_last=true",
                    "train.save_every=2", "train.warmup_steps=0", "train.lr=1e-2")

    def run_to(steps: int, out: Path, resume: bool = False) -> None:
        reset_accelerate_state()
        train(load_config(None, [*tiny, f"train.max_steps={steps}"]), out, resume=resume,
              progress=False)

    run_to(2, tmp_path / "split")
    run_to(4, tmp_path / "split", resume=True)
    run_to(4, tmp_path / "whole")
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a = load_file(str(tmp_path / "split" / "state" / "step0000004" / name))
        b = load_file(str(tmp_path / "whole" / "state" / "step0000004" / name))
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key}"


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu(tmp_path):
    # scripts/gpu_check.sh --device cpu --quick: every part of the check, at tiny sizes
    # (~40 s here), so that the one call on a lent GPU does not fail on a typo.
    env = {**clean_env(), "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu",
                        "--quick"], env=env, capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [v["variant"] for v in result["train"]] == ["fp32", "bf16", "bf16 + channels-last"]
    assert result["syncs"]["between_check_points"] == {}
    assert result["recipe_train"]["returncode"] == 0 and result["recipe_train"]["images_per_s"]
    assert result["sample_command"]["returncode"] == 0
    assert any("scaled_dot_product" in k for k in result["sdpa_kernels"])
    pair = result["guidance_pair"]
    assert pair["two_calls_s"] > 0 and pair["batched_s"] > 0 and pair["max_diff"] < 0.1
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| train step, bf16 + channels-last |" in table and "DDIM-50 sampling" in table
    assert "- autoguidance pair, batch 4, bf16: two calls" in table


def test_the_gpu_check_refuses_a_folder_holding_files(tmp_path, capsys):
    from diffunet.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    assert main(["bench", "--gpu-check", str(tmp_path), "--quick", "--device", "cpu"]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
