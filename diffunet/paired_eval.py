"""``diffunet eval paired``: an image-conditioned model (``data.task``) judged on held-out pairs.

Each held-out image's condition (:func:`diffunet.tasks.condition_image`: the downscaled and
upscaled image for ``superres``, the luminance for ``colorize``, the holed image and its mask
for ``inpaint``) is sampled from once (image i from seed + i, as ``diffunet sample`` draws it)
and the sample compared with the image:

- **PSNR** (dB, on [0, 1] pixels: 10 log10(1 / MSE), the MSE at least 8-bit rounding's
  variance, so an exact match scores 58.9 dB, not inf), per image, then the mean;
- **SSIM** (Wang et al. 2004: an 11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, on
  [0, 1] pixels, the mean over the valid windows and the channels), per image, then the mean;
- **LPIPS** (Zhang et al. 2018, the AlexNet variant; lower is closer), per image, then the
  mean, where the optional ``lpips`` package (the ``eval`` extra) and torchvision's AlexNet
  weights (downloaded once into the torch hub cache) are present; the result says why not
  otherwise (nothing is downloaded here);
- with the built-in judge (32x32 RGB models of the built-in data): the recognisable fraction
  and FID of the samples against the judge's 10,000-image reference.

The same numbers are given for the **baseline** the task starts from: the bicubic upscaling
for ``superres``, the grey image (its luminance in every channel) for ``colorize``, the image
with its holes grey for ``inpaint`` (whose holes are drawn from the generator of ``seed``, the
same for every model judged with it), the input itself for ``paired`` (whose held-out pairs
are ``data.path=TARGETS data.cond_path=INPUTS``). Held-out:
the built-in shapes of seed 1 (training uses seed 0) unless a CONFIG or ``data.*`` overrides
name other data.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import load_diffusion_file
from .config import SampleConfig
from .data import BuiltinShapes, build_dataset
from .errors import UsageError
from .evaluation import bpd_data_config, describe_data
from .judge import start_noise
from .samplers import sample
from .tasks import drawn_condition, finished, recorded_task, shown_condition, split_given

__all__ = ["psnr", "ssim", "lpips_distance", "PairedResult", "evaluate_paired",
           "PAIRED_IMAGES"]

PAIRED_IMAGES = 256
"""Held-out pairs ``eval paired`` samples by default."""


def _unit(x: Tensor) -> Tensor:
    return ((x.double() + 1) / 2).clamp(0, 1)  # [-1, 1] -> [0, 1]


MSE_FLOOR = 1 / (12 * 255 ** 2)
"""The smallest MSE :func:`psnr` counts (on [0, 1] pixels): the variance of 8-bit rounding,
(1/255)^2 / 12, so two images closer than 8 bits can tell apart score 58.9 dB, not inf (a grey
baseline equals a grey target exactly, and one inf would make the mean inf)."""


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """PSNR in dB of images ``a`` against ``b`` (B, C, H, W) in [-1, 1], per image (B,), on
    [0, 1] pixels: 10 log10(1 / MSE), the MSE at least :data:`MSE_FLOOR` (at most 58.9 dB)."""
    mse = (_unit(a) - _unit(b)).pow(2).flatten(1).mean(1).clamp_min(MSE_FLOOR)
    return 10 * torch.log10(1 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2)
                  / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size), sums to 1


def ssim(a: Tensor, b: Tensor, window: int = 11) -> Tensor:
    """SSIM (Wang et al. 2004, eq. 13) of images ``a`` against ``b`` (B, C, H, W) in [-1, 1],
    per image (B,): local means, variances and covariance under an ``window`` x ``window``
    Gaussian (sigma 1.5) on [0, 1] pixels, C1 = (0.01)^2, C2 = (0.03)^2, averaged over the
    valid windows and the channels. Images smaller than the window use a window of their
    size."""
    x, y = _unit(a), _unit(b)
    c = x.shape[1]
    size = min(window, x.shape[-1], x.shape[-2])
    w = _gaussian_window(size).to(x.device).expand(c, 1, size, size)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, w, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def lpips_distance(device: str | torch.device
                   ) -> tuple[Optional[Callable[[Tensor, Tensor], Tensor]], str]:
    """LPIPS (AlexNet, v0.1) as a function of two image batches (B, C, H, W) in [-1, 1] -> (B,)
    (grayscale repeated to RGB), and ``""``; or None and the reason it is not available: the
    ``lpips`` package is not installed, or the AlexNet weights it builds on are not in the
    torch hub cache (checked first, so no download is attempted)."""
    try:
        import lpips
    except ImportError:
        return None, "LPIPS not computed: pip install lpips (or diffunet[eval])"
    from torchvision.models import AlexNet_Weights

    url = AlexNet_Weights.IMAGENET1K_V1.url
    weights = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not weights.is_file():
        return None, (f"LPIPS not computed: AlexNet's weights are not at {weights}; "
                      f"download {url} there")
    net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()

    def distance(a: Tensor, b: Tensor) -> Tensor:
        a, b = (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x for x in (a, b))
        with torch.no_grad():
            return net(a.to(device).float(), b.to(device).float()).flatten().double().cpu()
    return distance, ""


@dataclass
class PairedResult:
    """What :func:`evaluate_paired` measured."""

    task: str
    num_images: int
    seed: int
    data: str
    rows: dict[str, dict[str, float]]
    """``{"samples": {...}, "baseline": {...}}``: ``psnr``, ``ssim`` (means), ``lpips`` (the
    mean, where it is available) and, with the judge, ``recognisable``, ``fid`` and ``kid``
    (as ``eval nfe`` computes them)."""
    baseline: str
    seconds_per_image: float
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Why a metric is missing (LPIPS without its package or weights)."""


def _held_out(meta: dict[str, Any], items: Sequence[str], model_path: str | os.PathLike,
              n: int, size: int, channels: int) -> tuple[Tensor, str, bool]:
    """The first ``n`` held-out images (n, C, S, S) in [-1, 1] (a paired model's stacked with
    their inputs, (n, 2C, S, S)), where they came from, and whether they are built-in shapes
    (the judge's data: only then do its FID and recognisable fraction mean anything)."""
    stored = (meta.get("run_config") or {}).get("data") or {}
    if not items and stored.get("source", "builtin") == "builtin":
        images, _ = BuiltinShapes(n, size, channels, seed=1).render(range(n))
        return images, f"{n} built-in images of seed 1 (training used seed 0)", True
    data_cfg = bpd_data_config(meta, items, model_path)
    dataset = build_dataset(data_cfg)
    if len(dataset) < 1:
        raise UsageError("eval paired: the data set has no images")
    n = min(n, len(dataset))
    images = torch.stack([dataset[i][0] for i in range(n)])
    return (images, f"the first {n} images of {describe_data(data_cfg, dataset)}",
            data_cfg.source == "builtin")


def evaluate_paired(model_path: str | os.PathLike, items: Sequence[str] = (), *,
                    num_images: int = PAIRED_IMAGES, seed: int = 0,
                    num_steps: Optional[int] = None, batch_size: int = 64,
                    device: str | torch.device = "cpu", judge: Any = None,
                    cache_dir: str | os.PathLike | None = None,
                    progress: Optional[Callable[[str], None]] = None) -> PairedResult:
    """Sample the held-out conditions of the model file's task once each (its ``[sample]``
    sampler and steps, ``num_steps`` in their place; unguided) and score samples and baseline
    (see the module doc). ``judge``: the built-in judge, or None to load it where it applies
    (32x32 RGB, held out from the built-in shapes), ``False`` for none. A model without a task
    is one :class:`UsageError` line."""
    loaded = load_diffusion_file(model_path)
    net, schedule, meta = loaded.net, loaded.schedule, loaded.metadata
    assert schedule is not None
    cfg = net.config
    size = cfg.image_size
    task = recorded_task(meta, size)  # a damaged record is one line
    if task is None:
        raise UsageError(f"eval paired: {model_path} has no task (it was not trained with "
                         "data.task = superres, colorize, inpaint or paired); judge it with "
                         "eval nfe")
    if meta.get("vae") is not None:
        raise UsageError("eval paired: a latent model's tasks are not built yet")
    if not 2 <= num_images <= 100_000:  # FID needs a covariance
        raise UsageError(f"--num-images must be in [2, 100000], got {num_images}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {batch_size}")
    name, factor = task
    targets, where, shapes = _held_out(meta, items, model_path, num_images, size,
                                       cfg.in_channels)
    targets, given = split_given(name, targets, cfg.in_channels)  # paired: and the inputs
    n = targets.shape[0]
    stored = (meta.get("run_config") or {}).get("sample") or {}
    how = SampleConfig(**{k: v for k, v in stored.items() if k in ("sampler", "num_steps",
                                                                  "sigmas", "rho", "eta")})
    steps = num_steps or how.num_steps
    net.to(device).eval()
    # (n, C_c, S, S); inpaint's holes drawn from the seed, the same for every model judged
    cond = drawn_condition(name, targets, factor, torch.Generator().manual_seed(seed),
                           given=given)
    samples, seconds = [], 0.0
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        x_T, gens = start_noise(seed, idx, tuple(targets.shape[1:]))  # as diffunet sample
        if progress is not None:
            progress(f"images {start}..{idx[-1]} of {n}")
        t0 = time.perf_counter()
        with torch.no_grad():
            out = sample(net, schedule, x_T.to(device), sampler=how.sampler, num_steps=steps,
                         sigmas=how.sigmas, cond={"cond_image": cond[idx].to(device)},
                         generator=gens, clip_x0=True)
        samples.append(finished(name, out.float().cpu().clamp(-1, 1), cond[idx]))
        seconds += time.perf_counter() - t0
    made = torch.cat(samples)
    base = shown_condition(name, cond, targets.shape[1])
    rows = {"samples": {"psnr": float(psnr(made, targets).mean()),
                        "ssim": float(ssim(made, targets).mean())},
            "baseline": {"psnr": float(psnr(base, targets).mean()),
                         "ssim": float(ssim(base, targets).mean())}}
    distance, why = lpips_distance(device)
    if distance is not None:
        for key, images in (("samples", made), ("baseline", base)):
            rows[key]["lpips"] = float(torch.cat([
                distance(images[i:i + batch_size], targets[i:i + batch_size])
                for i in range(0, n, batch_size)]).mean())
    if judge is None and targets.shape[1] == 3 and size == 32 and shapes:
        from .judge import load_judge
        judge = load_judge()
    if judge:
        from .evaluation import reference_statistics
        from .judge import REFERENCE_IMAGES, judge_scores
        ref, _, _ = reference_statistics(BuiltinShapes(REFERENCE_IMAGES, 32, 3, seed=0),
                                         judge.feature_network(), cache_dir=cache_dir,
                                         batch_size=256, device=device)
        for key, images in (("samples", made), ("baseline", base)):
            feats, probs = judge.judge(images.to(device))
            fid, kid, recognisable, _ = judge_scores(judge, feats.float().cpu(), probs, ref)
            rows[key].update(fid=float(fid), kid=float(kid), recognisable=recognisable)
    return PairedResult(task=f"{name} x{factor}" if name == "superres" else name,
                        num_images=n, seed=seed, data=where, rows=rows,
                        baseline={"superres": "bicubic upscaling",
                                  "inpaint": "the image with grey holes",
                                  "paired": "the input image itself"}.get(
                                      name, "the grey image (luminance in every channel)"),
                        seconds_per_image=seconds / n,
                        options={"sampler": how.sampler, "num_steps": steps,
                                 "sigmas": how.sigmas, "guidance": "none"},
                        notes=[why] if why else [])


def format_paired(result: PairedResult) -> str:
    """The result as a Markdown table and its notes."""
    judged = "fid" in result.rows["samples"]
    perceptual = "lpips" in result.rows["samples"]
    head = ("| | PSNR (dB) | SSIM |" + (" LPIPS |" if perceptual else "")
            + (" recognisable | FID |" if judged else ""))
    lines = [head, "|---|---:|---:|" + ("---:|" if perceptual else "")
             + ("---:|---:|" if judged else "")]
    for key, label in (("samples", "samples"), ("baseline", result.baseline)):
        r = result.rows[key]
        line = f"| {label} | {r['psnr']:.2f} | {r['ssim']:.4f} |"
        if perceptual:
            line += f" {r['lpips']:.4f} |"
        if judged:
            line += f" {r['recognisable']:.1%} | {r['fid']:.2f} |"
        lines.append(line)
    o = result.options
    lines.append("")
    lines.append(f"{result.task}: {result.data}; one sample each (seeds {result.seed}.."
                 f"{result.seed + result.num_images - 1}), {o['sampler']} {o['num_steps']} "
                 f"steps, unguided; {result.seconds_per_image:.4f} s / image"
                 + ("; FID against the judge's 10,000 built-in images" if judged else ""))
    lines.extend(result.notes)
    return "\n".join(lines)

