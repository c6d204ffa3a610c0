"""The GPU check: what to measure when an accelerator is at hand, in one short run.

``diffunet bench --gpu-check DIR`` (``scripts/gpu_check.sh``) writes ``DIR/gpu_check.json`` and
``DIR/gpu_check.md`` with, in under 8 minutes on one H100/H200:

- the training step of the DDPM CIFAR-10 network at batch 128 in fp32, bf16, bf16 +
  channels-last and bf16 + compile, each against diffusers' ``UNet2DModel`` in the same process
  (eager, same precision), with MFU;
- DDIM-50 sampling at batch 1024 in bf16 against diffusers' ``DDIMPipeline``;
- the host syncs of the training loop between check points (:func:`count_step_syncs`: a
  dispatch-mode count on the CPU, ``torch.cuda.set_sync_debug_mode`` warnings on a GPU);
- which ``scaled_dot_product_attention`` kernel the network's attention runs;
- autoguidance's pair of networks (the default run's network, batch 64, bf16): two calls
  against one batched call (:func:`~diffunet.bench.guidance_pair`), which decides
  ``diffunet.guidance.STACKED_DEVICES``;
- a 300-step ``diffunet train`` with the GPU recipe (``configs/cifar10_ddpm.toml`` on the
  built-in data, which needs no download) and its images/s against the bench's;
- ``diffunet sample`` of 2048 images (DDIM-50): the whole command, PNGs included, against the
  bench's sampling rate.

``quick`` shrinks every part (a tiny network, a few steps, small batches, no compiler) so that
the check itself is tested on the CPU (``--device cpu --quick``). Nothing here prints; the
command line does.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .bench import PRESETS, BenchOptions, benchmark, guidance_pair
from .config import SMALL_UNET, RunConfig, load_config
from .errors import FolderError
from .output_files import claim_file, open_folder
from .runs import cpu_requested, pick_device
from .unet import UNet

__all__ = ["SYNCING_OPS", "StepSyncs", "count_step_syncs", "gpu_check", "markdown",
           "sdpa_kernels"]

SYNCING_OPS = frozenset({"_local_scalar_dense", "nonzero", "is_nonzero", "equal",
                         "masked_select", "_unique2", "unique_consecutive", "unique_dim"})
"""The aten operations whose result the host must wait for (``.item()``, ``bool()``,
``int()`` go through ``_local_scalar_dense``); with ``Tensor.tolist``, what a step must avoid."""

_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "cifar10_ddpm.toml"


# ---------------------------------------------------------------------------------------------
# Host syncs of the training loop


@dataclass
class StepSyncs:
    """What :func:`count_step_syncs` saw: per step (1-based), the syncing operations run in it
    outside data loading."""

    steps: int
    syncs: Counter = field(default_factory=Counter)
    names: dict[int, set[str]] = field(default_factory=dict)

    def between(self, checks: set[int]) -> dict[int, set[str]]:
        """The steps other than ``checks`` that synced, with what they ran."""
        return {s: self.names.get(s, set()) for s in range(1, self.steps + 1)
                if s not in checks and self.syncs[s]}


@contextlib.contextmanager
def _counted_steps(found: StepSyncs) -> Iterator[Callable[[str], None]]:
    """Patch the training loop's batch stream so that each batch taken starts the next step
    (data loading itself is not counted); yields the recorder."""
    from . import training

    real_forever = training._forever
    loading = {"now": False}

    def record(name: str) -> None:
        if not loading["now"]:
            found.syncs[found.steps] += 1
            found.names.setdefault(found.steps, set()).add(name)

    def batches(loader: Any) -> Iterator[Any]:
        stream = real_forever(loader)
        while True:
            loading["now"] = True
            item = next(stream)
            loading["now"] = False
            found.steps += 1
            yield item

    training._forever = batches
    try:
        yield record
    finally:
        training._forever = real_forever


def count_step_syncs(cfg: RunConfig, out_dir: str | Path) -> StepSyncs:
    """Train ``cfg`` into ``out_dir`` and count, step by step, what makes the host wait for the
    device: on the CPU the :data:`SYNCING_OPS` (under a dispatch mode) and ``Tensor.tolist``; on
    a GPU what ``torch.cuda.set_sync_debug_mode("warn")`` reports."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from .training import train

    found = StepSyncs(steps=0)
    with _counted_steps(found) as record:
        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore
                if func.overloadpacket.__name__ in SYNCING_OPS:
                    record(func.overloadpacket.__name__)
                return func(*args, **(kwargs or {}))

        real_tolist = torch.Tensor.tolist

        def tolist(self: torch.Tensor) -> Any:
            record("tolist")
            return real_tolist(self)

        if _trains_on_cuda():
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    train(cfg, out_dir, progress=False)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            for w in caught:  # the warnings carry no step; count them on the last one
                record(f"cuda sync: {str(w.message)[:60]}")
        else:
            torch.Tensor.tolist = tolist  # type: ignore[method-assign]
            try:
                with Count():
                    train(cfg, out_dir, progress=False)
            finally:
                torch.Tensor.tolist = real_tolist  # type: ignore[method-assign]
    return found


def _trains_on_cuda() -> bool:
    """Whether ``train()`` here runs on a GPU (Accelerate's choice)."""
    return torch.cuda.is_available() and not cpu_requested()


# ---------------------------------------------------------------------------------------------
# Attention kernels


def sdpa_kernels(net: torch.nn.Module, device: torch.device, precision: str) -> list[str]:
    """The attention kernels one forward pass of ``net`` runs (profiler op names), e.g.
    ``aten::_scaled_dot_product_flash_attention``."""
    from torch.profiler import ProfilerActivity, profile

    cfg = net.config
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.tensor([1, 500], device=device)
    dtype = torch.bfloat16 if precision == "bf16" else None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            net(x, t)
    names = {e.key for e in prof.key_averages()}
    keys = ("scaled_dot_product", "flash", "efficient_attention", "cudnn_attention")
    return sorted(n for n in names if any(k in n for k in keys))


# ---------------------------------------------------------------------------------------------
# The whole check


@contextlib.contextmanager
def _cpu_if(cpu: bool) -> Iterator[None]:
    """Accelerate on the CPU for in-process training, when the check is asked to use it."""
    before = os.environ.get("ACCELERATE_USE_CPU")
    if cpu:
        os.environ["ACCELERATE_USE_CPU"] = "1"
    try:
        yield
    finally:
        if cpu:
            if before is None:
                os.environ.pop("ACCELERATE_USE_CPU", None)
            else:
                os.environ["ACCELERATE_USE_CPU"] = before


def _run(cmd: list[str], cwd: Path, cpu: bool) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, **({"ACCELERATE_USE_CPU": "1"} if cpu else {})}
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, r


def gpu_check(out_dir: str | Path, *, device: str | None = None, quick: bool = False,
              say: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Run the check (see the module doc) and write ``gpu_check.json`` and ``gpu_check.md``
    into ``out_dir``; returns the results."""
    out = Path(out_dir).resolve()  # the commands below run with it as their working folder
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FolderError(f"--gpu-check {out} is not an empty folder; give a new one (the "
                          "check writes gpu_check.json, gpu_check.md, train/, samples/ and "
                          "sync_run/ there)")
    with contextlib.ExitStack() as claims:  # the result files, claimed before the work
        folder = claims.enter_context(open_folder(out, label=f"--gpu-check {out}", create=True))
        files = {name: claims.enter_context(claim_file(out / name, flag="--gpu-check",
                                                      example=name, folder=folder))
                 for name in ("gpu_check.json", "gpu_check.md")}
        result = _check(out, device, quick, say)
        files["gpu_check.json"].write((json.dumps(result, indent=2) + "\n").encode())
        files["gpu_check.md"].write((markdown(result) + "\n").encode())
    return result


def _check(out: Path, device: str | None, quick: bool, say: Callable[[str], None]
           ) -> dict[str, Any]:
    dev = pick_device(device)
    unet = PRESETS["tiny"]() if quick else PRESETS["ddpm-cifar10"]()
    size = dict(batch_size=4, sample_batch_size=8, sample_steps=2, repeats=2, warmup=1) \
        if quick else dict(batch_size=128, sample_batch_size=1024, sample_steps=50, repeats=3,
                           warmup=1)
    try:
        import diffusers  # noqa: F401
        compare = True
    except ImportError:
        compare = False
    result: dict[str, Any] = {"device": str(dev), "quick": quick, "train": [], "notes": []}
    if not compare:
        result["notes"].append("diffusers is not installed: no comparison (pip install "
                               "'diffunet[bench]')")

    variants = [("fp32", False, False), ("bf16", False, False), ("bf16", True, False),
                ("bf16", False, True)]
    if quick:  # the compiler alone would take minutes on a CPU; compiling is tested elsewhere
        variants = variants[:3]
        result["notes"].append("quick: the bf16 + compile row is left out")
    for precision, channels_last, compiled in variants:
        name = precision + (" + channels-last" if channels_last else "") + (
            " + compile" if compiled else "")
        say(f"gpu check: training step, {name}")
        r = benchmark(BenchOptions(unet=unet, config_name="tiny" if quick else "ddpm-cifar10",
                                   precision=precision, channels_last=channels_last,
                                   compile=compiled, diffusers_eager=True, device=str(dev),
                                   what=("train",), compare_diffusers=compare, memory=False,
                                   **size))
        result["train"].append({"variant": name, "rows": r["results"], "ratio": r["ratios"]})

    say("gpu check: DDIM sampling, bf16")
    r = benchmark(BenchOptions(unet=unet, config_name="tiny" if quick else "ddpm-cifar10",
                               precision="bf16", device=str(dev), what=("sample",),
                               compare_diffusers=compare, memory=False, **size))
    result["sample"] = {"rows": r["results"], "ratio": r["ratios"]}
    bench_sample = next(x for x in r["results"] if x["model"] == "diffunet")["images_per_s"]

    say("gpu check: host syncs of the training loop")
    tiny = ["unet.base_channels=16", "unet.num_groups=8", "unet.channel_mults=[1,2]",
            "unet.num_res_blocks=1", "unet.attn_resolutions=[8]", "unet.image_size=16",
            "data.builtin_size=64", "train.batch_size=8", "train.max_steps=10",
            "train.log_every=4", "train.save_every=1000", "train.sample_every=1000",
            "train.max_nonfinite=1000"]
    with _cpu_if(dev.type == "cpu"):
        syncs = count_step_syncs(load_config(None, tiny), out / "sync_run")
    result["syncs"] = {"steps": syncs.steps, "check_points": [4, 8, 10],
                       "between_check_points": {str(k): sorted(v) for k, v
                                                in syncs.between({4, 8, 10}).items()}}

    say("gpu check: attention kernels")
    net = UNet(unet).to(dev).eval()
    result["sdpa_kernels"] = sdpa_kernels(net, dev, "bf16")

    say("gpu check: autoguidance's pair of networks, two calls against one batched call")
    result["guidance_pair"] = guidance_pair(unet if quick else SMALL_UNET, 4 if quick else 64,
                                            dev, repeats=2 if quick else 5)

    say("gpu check: diffunet train with the GPU recipe")
    steps = 6 if quick else 300
    recipe = [str(_RECIPE), "data.source=builtin", "data.builtin_size=50000",
              f"train.max_steps={steps}", f"train.log_every={max(1, steps // 6)}",
              f"train.save_every={steps}", "train.sample_every=100000"]
    if quick:  # a tiny network, no compiler: the check of the check, in seconds on a CPU
        recipe += [f"unet.{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}"
                   for k, v in (("base_channels", 16), ("channel_mults", (1, 2)),
                                ("num_res_blocks", 1), ("attn_resolutions", (16,)),
                                ("num_groups", 8), ("dropout", 0.0))] + [
            "train.batch_size=8", "train.compile=false", "train.mixed_precision=no",
            "train.channels_last=false"]
    if dev.type == "cpu":
        recipe += ["train.compile=false"]
    run_dir = out / "train"
    seconds, r = _run([sys.executable, "-m", "diffunet", "train", *recipe, "--out-dir",
                       str(run_dir), "--no-progress"], out, dev.type == "cpu")
    log = [json.loads(ln) for ln in (run_dir / "log.jsonl").read_text().splitlines()] \
        if (run_dir / "log.jsonl").is_file() else []
    rates = [rec["images_per_s"] for rec in log[1:]] or [rec["images_per_s"] for rec in log]
    bench_train = next((row["images_per_s"] for v in result["train"]
                        if v["variant"] == "bf16 + channels-last" for row in v["rows"]
                        if row["model"] == "diffunet"), None)
    result["recipe_train"] = {"returncode": r.returncode, "steps": steps, "seconds": seconds,
                              "images_per_s": statistics.median(rates) if rates else None,
                              "bench_images_per_s": bench_train,
                              "error": r.stderr[-500:] if r.returncode else None}

    say("gpu check: diffunet sample")
    n, sample_steps = (16, 2) if quick else (2048, 50)
    model = run_dir / "weights" / f"model_step{steps:07d}.safetensors"
    seconds, r = _run([sys.executable, "-m", "diffunet", "sample", str(model), "--num-samples",
                       str(n), "--sampler", "ddim", "--steps", str(sample_steps), "--out-dir",
                       str(out / "samples"), "--no-progress", *(
                           ["--device", "cpu"] if dev.type == "cpu" else [])], out,
                    dev.type == "cpu")
    result["sample_command"] = {"returncode": r.returncode, "images": n,
                                "steps": sample_steps, "seconds": seconds,
                                "images_per_s": n / seconds if r.returncode == 0 else None,
                                "bench_images_per_s_at_50_steps": bench_sample,
                                "error": r.stderr[-500:] if r.returncode else None}
    return result


def markdown(result: dict[str, Any]) -> str:
    """The check's results as a markdown table (for docs/performance.md)."""
    lines = [f"GPU check on {result['device']}" + (" (quick)" if result["quick"] else ""), "",
             "| measure | diffunet | diffusers | diffunet speed-up | MFU |",
             "|---|---|---|---|---|"]
    for v in result["train"]:
        rows = {r["model"]: r for r in v["rows"]}
        ours, theirs = rows["diffunet"], rows.get("diffusers")
        mfu = f"{100 * ours['mfu']:.1f}%" if ours.get("mfu") else "-"
        lines.append(f"| train step, {v['variant']} | {ours['images_per_s']:.0f} img/s | "
                     + (f"{theirs['images_per_s']:.0f} img/s | "
                        f"{v['ratio']['train']['speedup']:.2f}x" if theirs else "- | -")
                     + f" | {mfu} |")
    rows = {r["model"]: r for r in result["sample"]["rows"]}
    ours, theirs = rows["diffunet"], rows.get("diffusers")
    lines.append(f"| DDIM-50 sampling, bf16, batch {ours['batch_size']} | "
                 f"{ours['images_per_s']:.0f} img/s | "
                 + (f"{theirs['images_per_s']:.0f} img/s | "
                    f"{result['sample']['ratio']['sample']['speedup']:.2f}x" if theirs
                    else "- | -") + " | - |")
    rt, sc, sy = result["recipe_train"], result["sample_command"], result["syncs"]
    lines += ["",
              f"- `diffunet train` with the recipe, {rt['steps']} steps: "
              + (f"{rt['images_per_s']:.0f} img/s (bench: {rt['bench_images_per_s']:.0f})"
                 if rt["images_per_s"] and rt["bench_images_per_s"] else
                 f"failed (exit {rt['returncode']}): {rt['error'] or 'no log.jsonl'}"),
              f"- `diffunet sample` of {sc['images']} images, DDIM-{sc['steps']}: "
              + (f"{sc['images_per_s']:.1f} img/s with PNGs, {sc['seconds']:.1f} s"
                 if sc["images_per_s"] else f"failed (exit {sc['returncode']}): {sc['error']}"),
              f"- host syncs between check points in {sy['steps']} training steps: "
              f"{len(sy['between_check_points'])} step(s)"
              + (f" ({sy['between_check_points']})" if sy["between_check_points"] else ""),
              f"- attention kernels: {', '.join(result['sdpa_kernels']) or 'none seen'}"]
    gp = result.get("guidance_pair")
    if gp:
        lines.append(f"- autoguidance pair, batch {gp['batch_size']}, {gp['precision']}: two "
                     f"calls {1e3 * gp['two_calls_s']:.1f} ms, one batched call "
                     f"{1e3 * gp['batched_s']:.1f} ms ({gp['ratio']:.2f}x; outputs within "
                     f"{gp['max_diff']:.1e})")
    lines += [f"- note: {n}" for n in result["notes"]]
    return "\n".join(lines)
