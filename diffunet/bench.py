"""``diffunet bench``: how fast a UNet config trains and samples here, and how much memory a
training step takes, optionally against diffusers' ``UNet2DModel`` at the same configuration.

What is measured, for each model, interleaved (diffunet, diffusers, diffunet, ...) so that drift
on a shared machine hits both alike:

- ``train``: one optimisation step on a fixed batch of noised images: forward (under bf16
  autocast with fp32 weights when ``precision="bf16"``), MSE loss against the noise, backward,
  AdamW (fused where PyTorch has it, the same optimizer for both models). Data loading, EMA and
  logging are not part of it.
- ``sample``: deterministic DDIM (eta 0) from fresh Gaussian noise, ``sample_steps`` network
  calls plus step updates, ending with the images on the CPU. diffunet runs
  :func:`~diffunet.samplers.sample`; diffusers runs its ``DDIMPipeline``. Every DDIM step
  costs the same, so "DDIM-50 images/s" is ``batch / (50 x time per step)`` also when fewer
  steps are timed (the CPU default, 5).

Each number is the median of ``repeats`` timings after ``warmup`` untimed ones (the warm-up also
absorbs ``torch.compile``). On a GPU the timings come from CUDA events. Peak memory is the peak of
live tensor memory during one step above what was allocated before it (activations, gradients,
workspaces; the weights and optimizer state are there before and are the same size for both
models): ``torch.cuda.max_memory_allocated`` on a GPU, and on a CPU the running sum of
``torch.profiler``'s allocation/free events (PyTorch's own CPU allocator accounting; the resident
set size would also count what glibc keeps after a free). Model FLOPs utilisation (GPU) counts
3 x the nominal forward FLOPs per training image (12.4 GFLOP at 32x32 for the DDPM CIFAR-10 net)
against the device's dense bf16 peak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .config import (SMALL_UNET, ScheduleConfig, UNetConfig, from_dict, load_config, parse_value,
                     to_dict)
from .formulations.vp import NoiseSchedule
from .errors import MissingDependencyError, UsageError
from .interop import unet_to_diffusers
from .nn import Upsample
from .output_files import OutputFile, claim_file, starts_with
from .runs import pick_device
from .samplers import sample
from .unet import UNet
from .version import __version__

__all__ = ["BenchOptions", "PRESETS", "TRACE_MARK", "benchmark", "claim_traces", "forward_flops",
           "format_table", "guidance_pair", "resolve_unet"]

PRESETS: dict[str, Callable[[], UNetConfig]] = {
    "ddpm-cifar10": UNetConfig,  # UNetConfig's defaults: 35.7M parameters, 12.4 GFLOP/image
    "default": lambda: SMALL_UNET,  # what `diffunet train` with no CONFIG trains
    "tiny": lambda: UNetConfig(image_size=16, base_channels=16, channel_mults=(1, 2),
                               num_res_blocks=1, attn_resolutions=(8,), num_groups=8,
                               dropout=0.0),
}
"""Named network configs for ``--config``; a path to a TOML run config works too."""

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s. The first name
# contained in the device name wins, so the specific entries come first.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0))

_FLOPS_IMAGE = "per image, one forward pass"


@dataclass(frozen=True)
class BenchOptions:
    """What to benchmark. ``None`` batch sizes and ``sample_steps`` take the device's default:
    128 / 1024 / 50 on a GPU, 16 / 64 / 5 on a CPU."""

    unet: UNetConfig = dataclasses.field(default_factory=UNetConfig)
    config_name: str = "ddpm-cifar10"
    batch_size: int | None = None
    """Training batch."""
    sample_batch_size: int | None = None
    sample_steps: int | None = None
    """DDIM steps actually run per timed sampling pass."""
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    channels_last: bool = False
    """Store both models' weights channels-last (diffunet's CPU activations are channels-last
    either way)."""
    device: str | None = None
    """cpu, cuda, cuda:N; default cuda if available, else cpu."""
    threads: int | None = None
    """CPU threads (``torch.set_num_threads``); default: PyTorch's choice."""
    repeats: int = 5
    warmup: int = 2
    what: tuple[str, ...] = ("train", "sample")
    compare_diffusers: bool = False
    diffusers_eager: bool = False
    """Run diffusers without ``torch.compile`` even when ``compile`` is on."""
    memory: bool = True
    peak_tflops: float | None = None
    """The device's bf16 peak for MFU; default: looked up from the GPU's name."""
    profile: str | None = None
    """Also profile one train step and one sampling pass of diffunet: the top operators go into
    the results, Chrome traces to ``{profile}.train.json`` / ``{profile}.sample.json``."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "sample_batch_size", "sample_steps", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, "
                                 f"got {value}")
        if self.repeats < 1 or self.warmup < 0:
            raise UsageError(f"--repeats must be at least 1 and --warmup at least 0, got "
                             f"{self.repeats} and {self.warmup}")
        if self.precision not in ("fp32", "bf16"):
            raise UsageError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        if not self.what or any(w not in ("train", "sample") for w in self.what):
            raise UsageError(f"--only must be train or sample, got {','.join(self.what)}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise UsageError(f"--peak-tflops must be positive, got {self.peak_tflops}")


# ---------------------------------------------------------------------------------------------
# Building the configs and models


def resolve_unet(config: str, overrides: Sequence[str] = ()) -> UNetConfig:
    """A preset name (:data:`PRESETS`) or a TOML run config's ``[unet]``, then ``unet.key=value``
    overrides."""
    if config in PRESETS:
        base = to_dict(PRESETS[config]())
    elif config.endswith(".toml") or Path(config).is_file():
        base = to_dict(load_config(config).unet)
    else:
        raise UsageError(f"--config {config!r}: not a preset ({', '.join(PRESETS)}) or a "
                         "TOML file")
    for item in overrides:
        key, sep, text = item.partition("=")
        section, _, name = key.strip().partition(".")
        if not sep or section != "unet" or not name:
            raise UsageError(f"override {item!r}: diffunet bench takes unet.key=value "
                             "overrides, e.g. unet.base_channels=64")
        base[name] = parse_value(text.strip())
    return from_dict(UNetConfig, base, "unet")


def diffusers_unet(cfg: UNetConfig) -> torch.nn.Module:
    """diffusers' ``UNet2DModel`` computing the same function as ``UNet(cfg)`` (the DDPM
    ``google/ddpm-cifar10-32`` family), freshly initialised. Needs the ``bench`` extra."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise MissingDependencyError("--compare-diffusers needs diffusers: pip install "
                                     "'diffunet[bench]'") from None
    try:
        config = unet_to_diffusers(cfg)
    except UsageError as e:
        raise UsageError(f"--compare-diffusers: {e}") from None
    return UNet2DModel(**config)


def forward_flops(cfg: UNetConfig) -> tuple[float, float]:
    """(nominal, executed) FLOPs of one forward pass of ``UNet(cfg)`` on one image.

    Counted by ``torch.utils.flop_counter`` on the meta device (convolutions, matmuls, the
    attention matmuls). *Nominal* is the architecture's count, the one MFU uses: the
    nearest-upsample convolutions counted as 3x3 convs on the upsampled image, which is how
    :class:`~diffunet.nn.Upsample` is defined; *executed* is what diffunet runs (it folds that
    pair into a transposed conv with 16 instead of 36 multiply-adds per output pixel).
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = UNet(cfg)
    saved = []  # 2 x MACs the folded upsampling skips, per call
    hooks = [m.register_forward_pre_hook(
        lambda m, args: saved.append(2 * 20 * args[0].shape[0] * args[0].shape[1]
                                     * m.conv.out_channels * args[0].shape[2] * args[0].shape[3]))
        for m in model.modules() if isinstance(m, Upsample) and m.kind == "nearest"]
    x = torch.empty(1, cfg.in_channels, cfg.image_size, cfg.image_size, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t)
    for h in hooks:
        h.remove()
    executed = float(counter.get_total_flops())
    return executed + sum(saved), executed


def bf16_peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of a known GPU (:data:`BF16_PEAK_TFLOPS`), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


# ---------------------------------------------------------------------------------------------
# Timing and memory


class _Timer:
    """Times a callable: CUDA events on a GPU (one sync after the call), perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Seconds ``fn`` took."""
        if self.cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        start_s = time.perf_counter()
        fn()
        return time.perf_counter() - start_s


def guidance_pair(cfg: UNetConfig, batch_size: int, device: torch.device, *,
                  precision: str = "bf16", repeats: int = 5) -> dict[str, Any]:
    """Autoguidance's two networks of one architecture (``cfg``, two random initialisations)
    at one guided call on ``batch_size`` images: two calls against one batched call
    (:class:`~diffunet.guidance.StackedNetworks`), each the median of ``repeats`` timings after
    one untimed, under ``precision`` autocast; with the largest difference between the two
    paths' outputs. What :data:`~diffunet.guidance.STACKED_DEVICES` is decided by."""
    import warnings

    from .guidance import StackedNetworks

    gen = torch.Generator().manual_seed(0)
    nets = []
    for _ in range(2):
        net = UNet(cfg).eval()
        with torch.no_grad():  # take the zeros out of the output layers: the outputs differ
            for p in net.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        nets.append(net.to(device))
    a, b = nets
    pair = StackedNetworks(a, b)
    x = torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size,
                    generator=gen).to(device)
    t = torch.full((batch_size,), 500.0, device=device)
    timer = _Timer(device)
    runs = {"two_calls": lambda: (a(x, t), b(x, t)), "batched": lambda: pair(x, t)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad(), _autocast(device, precision), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")  # sdpa's vmap fallback
        for fn in runs.values():
            fn()
        for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
            for name, fn in runs.items():
                times[name].append(timer(fn))
        (ga, gb), ra, rb = pair(x, t), a(x, t), b(x, t)
    two, one = statistics.median(times["two_calls"]), statistics.median(times["batched"])
    return {"batch_size": batch_size, "precision": precision, "two_calls_s": two,
            "batched_s": one, "ratio": one / two,
            "max_diff": max(float((ga - ra).abs().max()), float((gb - rb).abs().max()))}


@contextlib.contextmanager
def _stderr_silenced() -> Any:
    """Silence file descriptor 2 (the profiler's C++ start/stop chatter) for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w", encoding="utf-8") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_growth_bytes(fn: Callable[[], Any]) -> int:
    """Peak of live tensor bytes allocated on the CPU while ``fn`` runs, above the start.

    From ``torch.profiler``'s memory events: every allocation and free through PyTorch's CPU
    allocator, in time order (what ``torch.cuda.max_memory_allocated`` is for a GPU).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                     profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == DeviceType.CPU),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


TRACE_MARK = b'{"written_by": "diffunet bench --profile"'
"""How every Chrome trace of ``--profile`` begins (a first entry the trace viewers ignore): an
existing ``PREFIX.train.json`` that does not is the user's, and is never replaced."""


def claim_traces(opts: BenchOptions, claims: contextlib.ExitStack) -> dict[str, OutputFile]:
    """Claim ``{profile}.{what}.json`` for each measured ``what`` (the output-file rule,
    diffunet/output_files.py), closed with ``claims``; {} without ``opts.profile``."""
    if not opts.profile:
        return {}
    return {what: claims.enter_context(claim_file(
        f"{opts.profile}.{what}.json", flag="--profile", example="trace", ours=starts_with(
            TRACE_MARK), noun="a diffunet bench trace", fix="give another --profile PREFIX"))
        for what in opts.what}


def _copy_marked(src: Any, dst: Any) -> None:
    """Copy a Chrome trace (a JSON object) with :data:`TRACE_MARK` as its first entry, streamed."""
    head = src.read(1 << 16)
    body = head.lstrip()
    if body[:1] != b"{":  # not an object: copied as it is
        dst.write(head)
    else:
        rest = body[1:]
        dst.write(TRACE_MARK + (b"" if rest.lstrip()[:1] == b"}" else b", ") + rest)
    shutil.copyfileobj(src, dst, 1 << 20)


def _profile(fn: Callable[[], Any], device: torch.device, trace: OutputFile,
             top: int = 15) -> list[dict[str, Any]]:
    """Run ``fn`` once under ``torch.profiler``; write a Chrome trace to the claimed ``trace``
    and return the ``top`` operators by self time on the device (CUDA time on a GPU, CPU time
    on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with _stderr_silenced(), profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    # torch writes a trace only by path: into a private folder of its own, then copied (marked)
    # through the claimed file
    with tempfile.TemporaryDirectory(prefix="diffunet-trace-") as tmp:
        raw = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as src, trace.open() as dst:
            _copy_marked(src, dst)
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1.0
    rows = sorted(events, key=lambda e: -getattr(e, key))[:top]
    return [{"op": e.key, "self_ms": getattr(e, key) / 1000, "share": getattr(e, key) / total,
             "calls": e.count} for e in rows]


def _peak_growth_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory growth while ``fn`` runs, in MiB (None where it cannot be measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if device.type != "cpu":
        return None
    try:
        return _cpu_peak_growth_bytes(fn) / 2**20
    except (AttributeError, RuntimeError, OSError):  # a profiler without these events
        return None


# ---------------------------------------------------------------------------------------------
# The measured work


@dataclass
class _Subject:
    """One model under test: its train step and sampling pass as zero-argument callables."""

    name: str
    parameters: int
    train: Callable[[], Any] | None = None
    sample: Callable[[], Any] | None = None


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    fused = True if device.type in ("cuda", "cpu") else None  # as diffunet.training uses
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)


def _make_subject(name: str, cfg: UNetConfig, opts: BenchOptions, device: torch.device,
                  batch: int, sample_batch: int, steps: int) -> _Subject:
    torch.manual_seed(opts.seed)
    is_diffusers = name == "diffusers"
    net = diffusers_unet(cfg) if is_diffusers else UNet(cfg)
    net = net.to(device)
    fmt = torch.channels_last if opts.channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    compile_it = opts.compile and not (is_diffusers and opts.diffusers_eager)
    subject = _Subject(name, sum(p.numel() for p in net.parameters()))
    C, H = cfg.in_channels, cfg.image_size
    g = torch.Generator().manual_seed(opts.seed)

    if "train" in opts.what:
        optimizer = _optimizer(net, device)
        schedule = NoiseSchedule(ScheduleConfig())
        x0 = torch.rand((batch, C, H, H), generator=g) * 2 - 1
        noise = torch.randn((batch, C, H, H), generator=g)
        t = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=g)
        xt = schedule.add_noise(x0, noise, t).to(device, memory_format=fmt)
        noise, t = noise.to(device, memory_format=fmt), t.to(device)

        def objective(xt: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
            out = net(xt, t)
            out = out.sample if is_diffusers else out
            return F.mse_loss(out.float(), noise)

        # --compile: the whole objective (forward and loss) as one graph, as train.compile does
        loss_fn = torch.compile(objective) if compile_it else objective

        def train_step() -> None:
            net.train()
            with _autocast(device, opts.precision):
                loss = loss_fn(xt, t, noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        subject.train = train_step

    if "sample" in opts.what:
        # CUDA graphs for the fixed-shape sampling loop (mode "reduce-overhead").
        mode = "reduce-overhead" if device.type == "cuda" else None
        sample_net = torch.compile(net, mode=mode) if compile_it else net
        shape = (sample_batch, C, H, H)
        if is_diffusers:
            from diffusers import DDIMPipeline, DDIMScheduler

            pipe = DDIMPipeline(unet=sample_net, scheduler=DDIMScheduler(
                num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                timestep_spacing="trailing"))
            pipe.set_progress_bar_config(disable=True)

            def sample_pass() -> None:
                net.eval()
                with _autocast(device, opts.precision):
                    pipe(batch_size=sample_batch, num_inference_steps=steps, eta=0.0,
                         output_type="np", generator=torch.Generator(device).manual_seed(1))
        else:
            schedule = NoiseSchedule(ScheduleConfig())

            def sample_pass() -> None:
                net.eval()
                x_T = torch.randn(shape, generator=torch.Generator(device).manual_seed(1),
                                  device=device).contiguous(memory_format=fmt)
                with _autocast(device, opts.precision):
                    x0 = sample(sample_net, schedule, x_T, sampler="ddim", num_steps=steps)
                (x0.float() / 2 + 0.5).clamp(0, 1).cpu()  # as the pipeline's output_type="np"

        subject.sample = sample_pass
    return subject


def benchmark(opts: BenchOptions, say: Callable[[str], None] = lambda msg: None, *,
              traces: dict[str, OutputFile] | None = None) -> dict[str, Any]:
    """Run the benchmark ``opts`` describes; returns the results as JSON-ready data.

    ``say`` receives progress lines. ``traces``: the claimed trace files of ``opts.profile``
    (:func:`claim_traces`; claimed here, before any work, when not given). Raises
    :class:`~diffunet.errors.DiffunetError` subclasses for bad input (an unknown device, a
    config diffusers cannot express, diffusers missing, a trace path that is taken).
    """
    with contextlib.ExitStack() as claims:
        if traces is None:
            traces = claim_traces(opts, claims)
        return _benchmark(opts, say, traces)


def _benchmark(opts: BenchOptions, say: Callable[[str], None],
               traces: dict[str, OutputFile]) -> dict[str, Any]:
    device = pick_device(opts.device)
    gpu = device.type == "cuda"
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    if gpu:
        torch.set_float32_matmul_precision("high")  # TF32, as diffunet.training sets it
    batch = opts.batch_size or (128 if gpu else 16)
    sample_batch = opts.sample_batch_size or (1024 if gpu else 64)
    steps = opts.sample_steps or (50 if gpu else 5)
    cfg = opts.unet

    names = ["diffunet", "diffusers"] if opts.compare_diffusers else ["diffunet"]
    say(f"building {' and '.join(names)} ({opts.config_name}) on {device}")
    subjects = [_make_subject(n, cfg, opts, device, batch, sample_batch, steps) for n in names]
    nominal, executed = forward_flops(cfg)
    timer = _Timer(device)

    rows: list[dict[str, Any]] = []
    for what in opts.what:
        times: dict[str, list[float]] = {s.name: [] for s in subjects}
        total = opts.warmup + opts.repeats
        for i in range(total):
            say(f"{what}: {'warm-up' if i < opts.warmup else 'repeat'} "
                f"{i + 1 - (opts.warmup if i >= opts.warmup else 0)}/"
                f"{opts.repeats if i >= opts.warmup else opts.warmup}"
                + (" (compiling)" if opts.compile and i == 0 else ""))
            for s in subjects:  # interleaved: drift hits every model alike
                seconds = timer(getattr(s, what))
                if i >= opts.warmup:
                    times[s.name].append(seconds)
        for s in subjects:
            per_pass = statistics.median(times[s.name])
            n = batch if what == "train" else sample_batch
            per_step = per_pass if what == "train" else per_pass / steps
            row = {"model": s.name, "what": what, "batch_size": n,
                   "ms_per_step": 1000 * per_step,
                   "images_per_s": n / per_step if what == "train" else n / (50 * per_step),
                   "seconds_all": [round(v, 6) for v in times[s.name]],
                   "peak_step_mb": None, "mfu": None}
            if what == "sample":
                row["timed_steps"] = steps
            rows.append(row)

    memory_method = None
    if opts.memory:
        memory_method = ("torch.cuda.max_memory_allocated growth over one step" if gpu else
                         "peak live tensor bytes over one step, from torch.profiler memory events")
        for row in rows:
            subject = next(s for s in subjects if s.name == row["model"])
            say(f"{row['what']}: peak memory of {subject.name}")
            row["peak_step_mb"] = _peak_growth_mb(getattr(subject, row["what"]), device)

    peak = opts.peak_tflops or bf16_peak_tflops(device)
    for row in rows:
        if row["what"] == "train" and peak:
            row["mfu"] = 3 * nominal * row["images_per_s"] / (peak * 1e12)

    profiles = {}
    if opts.profile:
        ours = subjects[0]
        for what in opts.what:
            say(f"{what}: profiling diffunet")
            trace = traces[what]
            profiles[what] = {"trace": str(trace.path),
                              "top_ops": _profile(getattr(ours, what), device, trace)}

    ratios = {}
    if opts.compare_diffusers:
        for what in opts.what:
            ours, theirs = (next(r for r in rows if r["model"] == m and r["what"] == what)
                            for m in ("diffunet", "diffusers"))
            ratios[what] = {"time": ours["ms_per_step"] / theirs["ms_per_step"],
                            "speedup": theirs["ms_per_step"] / ours["ms_per_step"]}
            if ours["peak_step_mb"] and theirs["peak_step_mb"]:
                ratios[what]["memory"] = ours["peak_step_mb"] / theirs["peak_step_mb"]
    return {
        "diffunet_version": __version__, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if gpu else _cpu_name(),
        "device_type": device.type, "threads": torch.get_num_threads(),
        "config": opts.config_name, "unet": to_dict(cfg),
        "parameters": {s.name: s.parameters for s in subjects},
        "precision": opts.precision, "compile": opts.compile,
        "channels_last": opts.channels_last, "diffusers_eager": opts.diffusers_eager,
        "repeats": opts.repeats, "warmup": opts.warmup,
        "flops": {"nominal": nominal, "executed": executed, "unit": _FLOPS_IMAGE},
        "peak_bf16_tflops": peak, "memory_method": memory_method,
        "results": rows, "ratios": ratios, "profiles": profiles,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"


def format_table(result: dict[str, Any]) -> str:
    """The results as a fixed-width text table (plus ratio lines when diffusers ran)."""
    head = (f"{result['config']} ({result['parameters']['diffunet'] / 1e6:.1f}M parameters, "
            f"{result['flops']['nominal'] / 1e9:.2f} GFLOP/image forward), {result['precision']}"
            f"{', compiled' if result['compile'] else ''}"
            f"{', channels-last weights' if result['channels_last'] else ''}; "
            f"{result['device']}, {result['threads']} threads, torch {result['torch']}; "
            f"median of {result['repeats']}")
    lines = [head, "",
             f"{'model':<10} {'measure':<16} {'batch':>6} {'ms/step':>10} {'images/s':>10} "
             f"{'peak MB':>9} {'MFU':>6}"]
    for r in result["results"]:
        what = "train step" if r["what"] == "train" else "sample DDIM-50"
        mem = "-" if r["peak_step_mb"] is None else f"{r['peak_step_mb']:.0f}"
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"{r['model']:<10} {what:<16} {r['batch_size']:>6} "
                     f"{r['ms_per_step']:>10.1f} {r['images_per_s']:>10.1f} {mem:>9} {mfu:>6}")
    for what, ratio in result["ratios"].items():
        mem = (f", peak memory {ratio['memory']:.2f}x" if "memory" in ratio else "")
        lines.append(f"diffunet/diffusers {what}: time {ratio['time']:.3f}x "
                     f"({ratio['speedup']:.2f}x as fast){mem}")
    for what, prof in result.get("profiles", {}).items():
        lines.append(f"profile of one diffunet {what} pass (self time; trace {prof['trace']}):")
        for op in prof["top_ops"]:
            lines.append(f"  {op['self_ms']:10.1f} ms {100 * op['share']:5.1f}% "
                         f"{op['calls']:6d}x  {op['op'][:70]}")
    if any(r["what"] == "sample" for r in result["results"]):
        steps = next(r["timed_steps"] for r in result["results"] if r["what"] == "sample")
        lines.append(f"(sampling: {steps} DDIM steps timed per pass; ms/step is per network "
                     "call + update, images/s is for 50 steps)")
    return "\n".join(lines)
