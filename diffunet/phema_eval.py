"""``diffunet eval ema``: which EMA length samples best, judged per post-hoc EMA reconstruction.

For each sigma_rel, the run's EMA of that length is rebuilt from its snapshots
(:mod:`diffunet.phema_files`: every sigma_rel is fitted, and refused in one line if the stored
profiles cannot rebuild it, before anything is sampled), ``num_images`` images are drawn with
the run's ``[sample]`` settings (image i from seed + i, as ``diffunet sample`` draws it, so every
length sees the same noise) and their FID and KID are taken against a reference set: the
built-in quality judge against the built-in data set (seed 0) when the run trained on it, or
``reference`` (a folder or a config's data set) through the Inception network (or the judge).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .config import RunConfig
from .data import BuiltinShapes
from .data_space import DataSpace, load_space
from .errors import ConfigError, UsageError
from .evaluation import (FeatureNetwork, FeatureStats, frechet_distance,
                         kernel_inception_distance, load_inception, reference_images,
                         reference_statistics)
from .formulations import make_schedule
from .judge import (MAX_NFE_IMAGES, MAX_REFERENCE_IMAGES, REFERENCE_IMAGES, class_report,
                    load_judge)
from .phema_files import Plan, plan, rebuild
from .samplers import sample
from .unet import UNet

__all__ = ["EMA_IMAGES", "EMARow", "EMAResult", "format_ema_table", "judge_ema_lengths"]

EMA_IMAGES = 1000
"""Images per EMA length by default: FID at 256 images is biased and noisy (issue 24)."""


@dataclass(frozen=True)
class EMARow:
    """One EMA length: its fit, FID and KID, the judge's recognisable fraction and class
    entropy (None without the built-in judge), and the sampling time per image."""

    sigma_rel: float
    residual: float
    fid: float
    kid: float
    recognisable: float | None
    class_entropy: float | None
    seconds_per_image: float


@dataclass(frozen=True)
class EMAResult:
    """The rows, the step the lengths were rebuilt at, and what was measured."""

    rows: list[EMARow]
    run: str
    step: int
    num_images: int
    seed: int
    features: str
    reference: str
    num_reference: int
    floor_fid: float | None
    """Built-in judge only: the FID of as many built-in images (seed 1) as generated against
    the reference, the floor a perfect model would reach with this many images."""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> EMARow:
        """The row of the lowest FID."""
        return min(self.rows, key=lambda r: r.fid)


def _sample_config(cfg: RunConfig, num_steps: int | None) -> dict[str, Any]:
    if num_steps is None:
        return cfg.sample.sample_kwargs()
    try:  # the run's settings, checked again with the new step count (RunConfig's rules too)
        changed = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample,
                                                                      num_steps=num_steps))
    except ConfigError as e:
        raise UsageError(f"--steps {num_steps}: {e}") from None
    return changed.sample.sample_kwargs()


def _draw(p: Plan, kwargs: dict[str, Any], num_images: int, seed: int, batch_size: int,
          device: torch.device, space: DataSpace, size: int) -> tuple[Tensor, float]:
    """``num_images`` images (N, 3, size, size) in [-1, 1] on the CPU from the EMA ``p``
    rebuilds (image i from seed + i, its start noise then its step noise), decoded by the data
    ``space`` and downscaled to ``size`` where larger, and the sampling seconds."""
    cfg = p.config
    net = UNet(cfg.unet)
    net.load_state_dict(rebuild(p))
    net.to(device).eval()
    schedule = make_schedule(cfg.schedule)
    k = cfg.unet.num_classes
    shape = (cfg.unet.in_channels, cfg.unet.image_size, cfg.unet.image_size)
    images, seconds = [], 0.0
    for start in range(0, num_images, batch_size):
        idx = range(start, min(start + batch_size, num_images))
        gens = [torch.Generator().manual_seed(seed + i) for i in idx]
        x_T = torch.stack([torch.randn(shape, generator=g) for g in gens])
        labels = torch.tensor([i % k for i in idx], device=device) if k is not None else None
        t0 = time.perf_counter()
        with torch.no_grad():
            out = space.decode(sample(net, schedule, x_T.to(device), class_labels=labels,
                                      generator=gens, **kwargs))
        out = out.float().cpu()  # waits for the device: part of the time
        seconds += time.perf_counter() - t0
        if out.shape[-1] != size:
            out = torch.nn.functional.interpolate(out, size=(size, size), mode="area")
        images.append(out.clamp(-1, 1))
    x = torch.cat(images)
    if x.shape[1] == 1:  # grayscale: the feature networks read RGB
        x = x.expand(-1, 3, -1, -1)
    return x, seconds


def _features(network: FeatureNetwork, images: Tensor, batch_size: int,
              device: torch.device) -> Tensor:
    with torch.no_grad():
        return torch.cat([network.net(images[i:i + batch_size].to(device)).reshape(
            min(batch_size, len(images) - i), -1).float().cpu()
            for i in range(0, len(images), batch_size)])


def judge_ema_lengths(run_dir: str | os.PathLike, sigma_rels: Sequence[float], *,
                      step: int | None = None, num_images: int = EMA_IMAGES, seed: int = 0,
                      num_steps: int | None = None, batch_size: int = 128,
                      device: str | torch.device = "cpu", reference: str | None = None,
                      reference_items: Sequence[str] = (), features: str | None = None,
                      feature_weights: str | None = None, num_reference: int | None = None,
                      cache_dir: str | os.PathLike | None = None,
                      progress: Callable[[str], None] | None = None) -> EMAResult:
    """Rebuild the run's EMA of each of ``sigma_rels`` at ``step`` (None: its newest
    snapshot), sample ``num_images`` images of each with the run's ``[sample]`` settings
    (``num_steps`` in place of its steps) and score them: without ``reference``, with the
    built-in judge against ``num_reference`` built-in images (seed 0, default
    :data:`~diffunet.judge.REFERENCE_IMAGES`; the run must have trained on the built-in data);
    with ``reference`` (a folder, or a CONFIG.toml, plus ``reference_items`` overrides, as
    ``diffunet eval fid`` takes it), through ``features`` (``inception``, the default, or
    ``builtin``), its first ``num_reference`` images. ``feature_weights``: a judge file, or the
    Inception weights file. Every refusal (a sigma_rel the snapshots cannot rebuild, a run with
    none, a reference that does not fit) comes before any sampling. ``progress(text)`` is called
    before each length."""
    if num_images < 2:
        raise UsageError(f"num_images must be at least 2 (FID needs a covariance), got "
                         f"{num_images}")
    if num_images > MAX_NFE_IMAGES:
        raise UsageError(f"num_images {num_images} is more than {MAX_NFE_IMAGES:,}; use fewer")
    if num_reference is not None and not 2 <= num_reference <= MAX_REFERENCE_IMAGES:
        raise UsageError(f"num_reference must be in [2, {MAX_REFERENCE_IMAGES:,}], got "
                         f"{num_reference}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size}")
    if not sigma_rels:
        raise UsageError("no sigma_rel to judge; give one or more, e.g. 0.02,0.05,0.1,0.2")
    plans = plan(run_dir, sigma_rels, step)
    cfg = plans[0].config
    if cfg.unet.cond_channels:
        raise UsageError(f"{run_dir} trained a model with a condition image (data.task = "
                         f"{cfg.data.task}); eval ema judges unconditional draws: rebuild a "
                         "length with `diffunet ema` and judge it with `diffunet eval paired`")
    kwargs = _sample_config(cfg, num_steps)
    device = torch.device(device)
    # a latent run's samples are decoded by its VAE (and never clipped as latents)
    space = load_space(cfg.vae, device=device)
    kwargs["clip_x0"] = space.clip_x0(kwargs.get("clip_x0"))
    size = space.image_shape((cfg.unet.in_channels, cfg.unet.image_size,
                              cfg.unet.image_size))[1]
    builtin_data = reference is None and not reference_items
    if builtin_data and cfg.data.source != "builtin":
        raise UsageError(f"{run_dir} trained on data.source={cfg.data.source}, not the built-in "
                         "set the built-in judge knows; give --reference FOLDER (or a "
                         "CONFIG.toml) of images to take the FID against")
    kind = "builtin" if builtin_data else (features or "inception")
    if kind not in ("builtin", "inception"):
        raise UsageError(f"unknown features {kind!r}; use inception or builtin")
    judge = None
    if kind == "builtin":
        judge = load_judge(feature_weights, device=device)
        jsize = judge.config.image_size
        if size < jsize or size % jsize:
            raise UsageError(f"the built-in judge reads {jsize}x{jsize} images (or larger ones "
                             f"it downscales: {2 * jsize}x{2 * jsize}, ...) and this run's are "
                             f"{size}x{size}; give --reference with --features inception")
        size = jsize  # larger samples are downscaled to it (area: the mean of each block)
        network = judge.feature_network()
    else:
        network = load_inception(feature_weights, device=device)
    if builtin_data:
        n_ref = num_reference or REFERENCE_IMAGES
        ref_set: Any = BuiltinShapes(n_ref, size, 3, seed=0)
        described = f"{n_ref:,} built-in images (seed 0)"
    else:
        ref_set = reference_images(reference, reference_items, size)
        described = str(reference or " ".join(reference_items))
    ref, _, _ = reference_statistics(ref_set, network, cache_dir=cache_dir,
                                     max_images=num_reference, batch_size=256, device=device)
    floor = None
    if judge is not None and builtin_data:
        floor_feats, _ = judge.judge_dataset(BuiltinShapes(num_images, size, 3, seed=1),
                                             device=device)
        stats = FeatureStats.from_features(floor_feats)
        floor = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
    rows = []
    for p in plans:
        if progress is not None:
            progress(f"sigma_rel {p.sigma_rel:g}: sampling {num_images} images")
        images, seconds = _draw(p, kwargs, num_images, seed, batch_size, device, space, size)
        recognisable = entropy = None
        if judge is not None:
            feats, probs = judge.judge(images.to(device))
            feats = feats.float().cpu()
            report = class_report(probs.float().cpu(), judge.config.class_names)
            recognisable, entropy = report.recognisable, report.entropy
        else:
            feats = _features(network, images, batch_size, device)
        gen = FeatureStats.from_features(feats)
        fid = frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma)
        kid, _ = kernel_inception_distance(feats, ref.features, subset_size=1000,
                                           num_subsets=50)
        rows.append(EMARow(sigma_rel=p.sigma_rel, residual=p.residual, fid=fid, kid=kid,
                           recognisable=recognisable, class_entropy=entropy,
                           seconds_per_image=seconds / num_images))
    return EMAResult(rows=rows, run=str(run_dir), step=plans[0].step, num_images=num_images,
                     seed=seed, features=network.identity, reference=described,
                     num_reference=int(ref.features.shape[0]), floor_fid=floor,
                     options={"sample": {k: v for k, v in kwargs.items()
                                         if isinstance(v, (int, float, str, bool, type(None)))},
                              "batch_size": batch_size, "device": str(device)})


def format_ema_table(result: EMAResult) -> str:
    """:func:`judge_ema_lengths`'s result as a markdown table, then what was measured and the
    best length."""
    judged = any(r.recognisable is not None for r in result.rows)
    head = "| sigma_rel | fit residual | FID | KID |" + (
        " recognisable | class entropy |" if judged else "") + " s / image |"
    lines = [head, "|" + "|".join(["---:"] * (head.count("|") - 1)) + "|"]
    for r in result.rows:
        extra = (f" {r.recognisable:.1%} | {r.class_entropy:.3f} |" if judged and
                 r.recognisable is not None and r.class_entropy is not None else "")
        lines.append(f"| {r.sigma_rel:g} | {r.residual:.2%} | {r.fid:.2f} | {r.kid:.4g} |"
                     f"{extra} {r.seconds_per_image:.4f} |")
    last = result.seed + result.num_images - 1
    lines.append("")
    lines.append(f"EMA lengths rebuilt at step {result.step} of {result.run}; "
                 f"{result.num_images} images each (seeds {result.seed}..{last}), FID/KID "
                 f"against {result.reference} ({result.num_reference:,} images)"
                 + (f"; {result.num_images} built-in images of seed 1 score FID "
                    f"{result.floor_fid:.2f} (the floor at this many images)"
                    if result.floor_fid is not None else ""))
    best = result.best
    lines.append(f"best: sigma_rel {best.sigma_rel:g} (FID {best.fid:.2f}); write it with "
                 f"diffunet ema {result.run} --sigma-rel {best.sigma_rel:g} --step {result.step} "
                 "--out model.safetensors")
    return "\n".join(lines)
