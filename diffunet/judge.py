"""The quality judge: a small classifier of the built-in shapes that the project runs offline.

The built-in data set (:class:`~diffunet.data.BuiltinShapes`) has labels: each image is one
circle, square, triangle or cross, in one of 8 colours on one of 3 dark backgrounds, 40-75% of
the image wide, anywhere it fits. :class:`JudgeNet`, a four-convolution network (about 69k
parameters) trained on those labels, judges images drawn by a model of that data:

- its penultimate-layer features (:meth:`Judge.feature_network`, 128-d) replace Inception-v3
  for FID and KID against built-in reference images (``diffunet eval fid --features builtin``),
  with no extra package and no download;
- its class predictions give a diversity check (:func:`class_report`): the class histogram,
  its entropy, and the fraction of *recognisable* images (top class probability at least 0.9).

Training (:func:`train_judge`, ``diffunet eval train-judge --out PATH``) is deterministic and
takes seconds on a CPU: 500 Adam steps of 64 fresh built-in images (seed 16; the diffusion
models and the FID reference use seed 0) plus 32 synthetic outliers (white noise and smooth
colour noise) whose target is the uniform distribution ("outlier exposure", Hendrycks et al.
2019, eq. 1 with lambda = 0.5), so that noise is not confidently called a shape. The trained
judge ships with the package as ``diffunet/judge.safetensors`` (about 280 kB): its metadata
holds the architecture, the training settings, the held-out accuracy and the SHA-256 of its
tensors and metadata, checked on every load; for the shipped file it must also be
:data:`JUDGE_SHA256`. (The hash covers content, not bytes: safetensors writes its metadata in
no fixed order, so a retrained judge has the same hash but not the same file bytes.) Loading
never unpickles.

:func:`quality_per_nfe` is the benchmark behind ``diffunet eval nfe`` (and
``scripts/quality_per_nfe.py``): quality (judge FID/KID, recognisable fraction, class entropy)
against the number of network evaluations, for every sampler and sigma grid.

Everything here returns values; nothing prints.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from .checkpoint import first_nonfinite, read_tensor_file, tensor_file_bytes
from .config import SampleConfig, from_dict, to_dict
from .data import BuiltinShapes
from .data_space import model_space
from .errors import ConfigError, DataError, ModelFileError, UsageError
from .evaluation import (FeatureNetwork, FeatureStats, frechet_distance,
                         kernel_inception_distance, reference_statistics)
from .fileio import first_line
from .output_files import OutputFile, claim_file
from .guidance import (FULL_WEIGHT_STEPS, HALF_WEIGHT_STEPS, UNGUIDED_STEPS,
                       carried_guide_weight)
from .samplers import (SAMPLERS, SIGMA_GRIDS, NetworkCount, check_sampling, check_sigma_range,
                       network_calls, sample)
from .version import __version__

__all__ = [
    "ALL_GRIDS",
    "ALL_SAMPLERS",
    "judge_scores",
    "start_noise",
    "ClassReport",
    "DEFAULT_BUDGETS",
    "JUDGE_FILE",
    "JUDGE_SHA256",
    "Judge",
    "JudgeConfig",
    "JudgeNet",
    "JudgeTraining",
    "NFERow",
    "NFEResult",
    "NFE_IMAGES",
    "REFERENCE_IMAGES",
    "RECOGNISABLE_THRESHOLD",
    "class_report",
    "file_sha256",
    "format_nfe_table",
    "load_judge",
    "quality_per_nfe",
    "save_judge",
    "steps_for_budget",
    "train_judge",
]

JUDGE_FILE = Path(__file__).with_name("judge.safetensors")
"""The trained judge shipped with the package (package data)."""
JUDGE_SHA256 = "e35bb91080a95e2c328e2d754f1457f39c4108a9311607799830f8d14a52e193"
"""SHA-256 of the shipped judge's tensors and metadata (see :func:`save_judge`); ``diffunet eval
train-judge`` prints the value for a new one."""
RECOGNISABLE_THRESHOLD = 0.9
"""An image is recognisable when the judge gives its top class at least this probability."""
_FORMAT = "diffunet.judge"
_FORMAT_VERSION = 1
_HASH_KEY = "sha256"


# ---------------------------------------------------------------------------------------------
# The network


@dataclass(frozen=True)
class JudgeConfig:
    """The judge's architecture (stored in its weights file)."""

    channels: tuple[int, ...] = (16, 32, 64)
    """Widths of the stride-2 3x3 convolutions (32x32 -> 16 -> 8 -> 4); one more 3x3 at the
    last width follows, then global average pooling."""
    feature_dim: int = 128
    """Width of the penultimate layer: the FID/KID features."""
    num_classes: int = 4
    image_size: int = 32
    """The size it reads (the built-in data set's default); other sizes are refused."""
    class_names: tuple[str, ...] = ("circle", "square", "triangle", "cross")

    def __post_init__(self) -> None:
        if not self.channels or any(c < 1 for c in self.channels):
            raise ConfigError(f"judge.channels must be positive widths, got {self.channels}")
        for key in ("feature_dim", "num_classes", "image_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"judge.{key} must be a positive integer, got "
                                  f"{getattr(self, key)}")
        if len(self.class_names) != self.num_classes:
            raise ConfigError(f"judge.class_names has {len(self.class_names)} names for "
                              f"{self.num_classes} classes")


@dataclass(frozen=True)
class JudgeTraining:
    """How :func:`train_judge` trains (stored in the weights file)."""

    seed: int = 0
    """Seeds the weight initialisation and the outlier images."""
    data_seed: int = 16
    """:class:`~diffunet.data.BuiltinShapes` seed of the training images (0 is the diffusion
    models' training set and the FID reference)."""
    steps: int = 500
    batch_size: int = 64
    """Built-in images per step, each seen once."""
    outliers: int = 32
    """Outlier images per step (half white noise, half smooth colour noise)."""
    outlier_weight: float = 0.5
    """lambda of outlier exposure (Hendrycks et al. 2019, eq. 1)."""
    lr: float = 3e-3
    """Adam's learning rate, cosine-annealed to 0."""
    held_out_seed: int = 17
    held_out_images: int = 2000

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "held_out_images"):
            if getattr(self, key) < 1:
                raise ConfigError(f"judge training {key} must be a positive integer, got "
                                  f"{getattr(self, key)}")
        if self.outliers < 0 or self.outlier_weight < 0 or not self.lr > 0:
            raise ConfigError("judge training outliers and outlier_weight must be >= 0 and "
                              "lr > 0")
        if self.data_seed in (0, self.held_out_seed):
            raise ConfigError(f"judge training data_seed {self.data_seed} must differ from 0 "
                              "(the FID reference) and from held_out_seed")


class JudgeNet(nn.Module):
    """(B, 3, 32, 32) images in [-1, 1] -> class logits (B, K); :meth:`features` gives the
    penultimate layer (B, D)."""

    def __init__(self, config: JudgeConfig = JudgeConfig()) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c = 3
        for width in config.channels:
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1), nn.ReLU()]
            c = width
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                   nn.Flatten(), nn.Linear(c, config.feature_dim), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def check_input(self, x: Tensor) -> None:
        """A one-line :class:`UsageError` unless ``x`` is (B, 3, S, S) at the judge's S."""
        s = self.config.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            got = "x".join(str(d) for d in x.shape[1:]) if x.ndim == 4 else str(tuple(x.shape))
            raise UsageError(f"the built-in judge reads RGB {s}x{s} images (the built-in data "
                             f"set's size), got {got} (channels x height x width); load them "
                             f"at {s}x{s} (--image-size {s}) or use --features inception")

    def features(self, x: Tensor) -> Tensor:  # (B, 3, S, S) -> (B, D)
        self.check_input(x)
        return self.trunk(x)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, S, S) -> (B, K)
        return self.head(self.features(x))


def _build(config: JudgeConfig, generator: torch.Generator | None) -> JudgeNet:
    """A JudgeNet on the CPU, float32, initialised as PyTorch initialises Conv2d/Linear
    (Kaiming-uniform with a = sqrt(5), uniform biases) but from ``generator`` (None: zeros, to
    be loaded), so the global RNG is never read."""
    with torch.device("meta"):
        net = JudgeNet(config)
    net = net.to_empty(device="cpu").float()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if generator is None:
                    m.weight.zero_()
                    m.bias.zero_()
                    continue
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                bound = 1 / math.sqrt(m.weight[0].numel())
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
    return net


# ---------------------------------------------------------------------------------------------
# What the judge says about a set of images


@dataclass(frozen=True)
class ClassReport:
    """The judge's verdict on a set of images (see :func:`class_report`)."""

    class_names: tuple[str, ...]
    counts: tuple[int, ...]
    """Images whose top class is each class (all images, recognisable or not)."""
    recognisable: float
    """Fraction of images whose top class probability is at least ``threshold``."""
    threshold: float
    entropy: float
    """Entropy of the class histogram over log K: 1 when balanced (the built-in data set is),
    0 when every image is one class."""

    @property
    def num_images(self) -> int:
        return sum(self.counts)

    @property
    def fractions(self) -> tuple[float, ...]:
        n = max(self.num_images, 1)
        return tuple(c / n for c in self.counts)

    @property
    def low_diversity(self) -> bool:
        """Whether some class has less than half its share (1 / 2K) of the images."""
        return min(self.fractions) < 0.5 / len(self.counts)

    def summary(self) -> dict[str, Any]:
        return {"num_images": self.num_images, "recognisable": self.recognisable,
                "threshold": self.threshold, "class_entropy": self.entropy,
                "low_diversity": self.low_diversity,
                "classes": {name: {"count": c, "fraction": f} for name, c, f in
                            zip(self.class_names, self.counts, self.fractions)}}

    def describe(self) -> str:
        """Two lines for people: the histogram and entropy, then the recognisable fraction."""
        hist = ", ".join(f"{name} {f:.1%}" for name, f in zip(self.class_names, self.fractions))
        text = (f"classes          {hist} (entropy {self.entropy:.3f} of 1)\n"
                f"recognisable     {self.recognisable:.1%} (top class probability >= "
                f"{self.threshold:g})")
        if self.low_diversity:
            name, f = min(zip(self.class_names, self.fractions), key=lambda t: t[1])
            text += (f"\nlow diversity: {name} is {f:.1%} of the images (a balanced set has "
                     f"{1 / len(self.counts):.0%} each)")
        return text


def class_report(probabilities: Tensor, class_names: Sequence[str], *,
                 threshold: float = RECOGNISABLE_THRESHOLD) -> ClassReport:
    """The class histogram, its normalised entropy and the recognisable fraction of images
    whose class probabilities (N, K) (rows summing to 1) are given."""
    if probabilities.ndim != 2 or probabilities.shape[0] < 1:
        raise DataError("class_report needs class probabilities (N, K) of at least one image")
    k = probabilities.shape[1]
    p = probabilities.detach().to("cpu", torch.float64)
    counts = torch.bincount(p.argmax(dim=1), minlength=k)
    frac = counts.double() / counts.sum()
    nz = frac[frac > 0]
    entropy = max(0.0, float(-(nz * nz.log()).sum() / math.log(k))) if k > 1 else 0.0
    recognisable = float((p.max(dim=1).values >= threshold).double().mean())
    return ClassReport(class_names=tuple(class_names), counts=tuple(int(c) for c in counts),
                       recognisable=recognisable, threshold=threshold, entropy=entropy)


@dataclass(frozen=True)
class Judge:
    """A trained judge: the network (eval mode, no gradients), how it was trained, its
    held-out scores, and the SHA-256 of its weights (part of the FID cache key)."""

    net: JudgeNet
    training: JudgeTraining
    held_out: dict[str, Any]
    sha256: str
    path: Path | None = None

    @property
    def config(self) -> JudgeConfig:
        return self.net.config

    def feature_network(self) -> FeatureNetwork:
        """The penultimate features (B, D) as a :class:`~diffunet.evaluation.FeatureNetwork`
        for :func:`~diffunet.evaluation.fid_kid`; other sizes than 32x32 RGB are refused."""
        c = self.config
        return FeatureNetwork(net=self.net.features,
                              identity=f"diffunet-judge/{c.image_size}px/{c.feature_dim}d/"
                                       f"sha256:{self.sha256}")

    def judge(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Features (B, D) and class probabilities (B, K) of images (B, 3, 32, 32) in [-1, 1]
        (on the judge's device)."""
        with torch.no_grad():
            feats = self.net.features(images)
            return feats, self.net.head(feats).softmax(dim=1)

    def judge_dataset(self, dataset: Dataset, *, batch_size: int = 256,
                      max_images: int | None = None,
                      device: str | torch.device | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`judge` over a data set (items ``(image, label)``): features (N, D) and
        probabilities (N, K), float32 on the CPU."""
        device = torch.device(device) if device is not None else _device(self.net)
        n = len(dataset) if max_images is None else min(max_images, len(dataset))
        feats, probs = [], []
        for images, _ in DataLoader(Subset(dataset, range(n)), batch_size=batch_size):
            f, p = self.judge(images.to(device))
            feats.append(f.float().cpu())
            probs.append(p.float().cpu())
        if not feats:
            raise DataError("no images to judge")
        return torch.cat(feats), torch.cat(probs)

    def class_report(self, images: Tensor | Dataset, *,
                     threshold: float = RECOGNISABLE_THRESHOLD) -> ClassReport:
        """:func:`class_report` of images (N, 3, 32, 32) or of a data set."""
        if isinstance(images, Tensor):
            probs = self.judge(images.to(_device(self.net)))[1]
        else:
            probs = self.judge_dataset(images)[1]
        return class_report(probs, self.config.class_names, threshold=threshold)


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


# ---------------------------------------------------------------------------------------------
# Training


def _outliers(n: int, size: int, generator: torch.Generator) -> Tensor:
    """(n, 3, size, size) images that are no shape: white noise of a random amplitude (first
    half) and smooth colour noise, bilinearly upsampled from 4x4 (second half), in [-1, 1]."""
    a = n // 2
    white = torch.randn(a, 3, size, size, generator=generator)
    white = white * 2 * torch.rand(a, 1, 1, 1, generator=generator)
    smooth = F.interpolate(torch.randn(n - a, 3, 4, 4, generator=generator), size=(size, size),
                           mode="bilinear", align_corners=False)
    return torch.cat([white, smooth]).clamp(-1, 1)


def train_judge(config: JudgeConfig = JudgeConfig(), training: JudgeTraining = JudgeTraining(),
                *, callback: Callable[[int, float], None] | None = None) -> Judge:
    """Train a judge on the CPU from fresh built-in images; the same arguments give the same
    weights (one generator seeded with ``training.seed``; the images are a function of their
    index; one intra-op thread, set for the call and restored after it, so that neither the
    machine's core count nor a busy machine changes the float sums, or the time: these tiny
    convolutions run several times slower on two busy threads than on one).
    ``callback(step, loss)`` is called after each step. The held-out scores are measured on
    ``training.held_out_images`` images of seed ``training.held_out_seed``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(config, training, callback)
    finally:
        torch.set_num_threads(threads)


def _train(config: JudgeConfig, t: JudgeTraining,
           callback: Callable[[int, float], None] | None) -> Judge:
    g = torch.Generator().manual_seed(t.seed)
    net = _build(config, g).train()
    data = BuiltinShapes(t.steps * t.batch_size, config.image_size, 3, seed=t.data_seed)
    opt = torch.optim.Adam(net.parameters(), lr=t.lr)
    log_k = math.log(config.num_classes)
    for step in range(t.steps):
        x, y = data.render(range(step * t.batch_size, (step + 1) * t.batch_size))
        if t.outliers:
            x = torch.cat([x, _outliers(t.outliers, config.image_size, g)])
        for group in opt.param_groups:  # cosine annealing (Loshchilov & Hutter 2017), to 0
            group["lr"] = t.lr * 0.5 * (1 + math.cos(math.pi * step / t.steps))
        logits = net(x)
        loss = F.cross_entropy(logits[:t.batch_size], y)
        if t.outliers:  # cross-entropy to the uniform distribution, minus its minimum log K
            oe = -F.log_softmax(logits[t.batch_size:], dim=1).mean(dim=1) - log_k
            loss = loss + t.outlier_weight * oe.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if callback is not None:
            callback(step, float(loss.detach()))
    net.eval().requires_grad_(False)
    judge = Judge(net=net, training=t, held_out={}, sha256="")
    held = BuiltinShapes(t.held_out_images, config.image_size, 3, seed=t.held_out_seed)
    x, y = held.render(range(t.held_out_images))
    probs = judge.judge(x)[1]
    scores = {"seed": t.held_out_seed, "images": t.held_out_images,
              "accuracy": float((probs.argmax(dim=1) == y).double().mean()),
              "recognisable": class_report(probs, config.class_names).recognisable}
    return Judge(net=net, training=t, held_out=scores, sha256=_digest(_metadata(judge, scores),
                                                                      net.state_dict()))


# ---------------------------------------------------------------------------------------------
# The weights file


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _metadata(judge: Judge, held_out: dict[str, Any]) -> dict[str, str]:
    return {"format": _FORMAT, "format_version": str(_FORMAT_VERSION),
            "judge_config": json.dumps(to_dict(judge.config), sort_keys=True),
            "training": json.dumps(to_dict(judge.training), sort_keys=True),
            "held_out": json.dumps(held_out, sort_keys=True),
            "diffunet_version": __version__, "torch_version": torch.__version__}


def _digest(metadata: dict[str, str], tensors: dict[str, Tensor]) -> str:
    """SHA-256 of the metadata (but the hash itself) and of each tensor's name, dtype, shape and
    bytes, in name order: what a weights file's ``sha256`` entry records."""
    h = hashlib.sha256()
    meta = {k: v for k, v in metadata.items() if k != _HASH_KEY}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"\n{name}:{t.dtype}:{list(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_judge(judge: Judge, path: str | os.PathLike | OutputFile) -> str:
    """Write ``judge`` as a self-describing safetensors file (atomically); returns the SHA-256
    of its tensors and metadata, recorded in it (the value :data:`JUDGE_SHA256` holds for the
    shipped file). ``path`` is a claimed output file (``eval train-judge --out``), or a path,
    claimed here as a replaceable file (:func:`~diffunet.output_files.claim_file`: never a
    link, a folder or a FIFO)."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in judge.net.state_dict().items()}
    meta = _metadata(judge, judge.held_out)
    meta[_HASH_KEY] = _digest(meta, tensors)
    data = tensor_file_bytes(tensors, meta)
    if isinstance(path, OutputFile):
        path.write(data)
    else:
        with claim_file(path, example="judge.safetensors", overwrite=True) as out:
            out.write(data)
    return meta[_HASH_KEY]


def _refuse(path: Path, why: str) -> ModelFileError:
    return ModelFileError(f"judge weights {path}: {why}; reinstall diffunet for the shipped "
                          "judge, or retrain one with `diffunet eval train-judge --out PATH`")


def _parse_json(path: Path, meta: dict[str, str], key: str) -> Any:
    try:
        return json.loads(meta[key])
    except (KeyError, ValueError):
        raise _refuse(path, f"its metadata has no valid {key}") from None


def load_judge(path: str | os.PathLike | None = None, *,
               device: str | torch.device = "cpu") -> Judge:
    """The judge in ``path`` (default: the shipped :data:`JUDGE_FILE`, whose tensors and
    metadata must hash to :data:`JUDGE_SHA256`), on ``device``, in eval mode. Every file's
    tensors and metadata must match the SHA-256 its metadata records. Each refusal is one
    :class:`ModelFileError` line; nothing is unpickled."""
    shipped = path is None
    p = JUDGE_FILE if path is None else Path(path).expanduser()
    if shipped and not p.is_file():
        raise _refuse(p, "the shipped judge is missing from the installation")
    tensors, meta = read_tensor_file(p)
    if meta.get("format") != _FORMAT:
        raise _refuse(p, f"not a judge weights file (format {meta.get('format')!r}, expected "
                         f"{_FORMAT!r})")
    version = meta.get("format_version", "")
    if not version.isdigit() or int(version) > _FORMAT_VERSION:
        raise _refuse(p, f"format version {version!r} is not one this diffunet reads "
                         f"(<= {_FORMAT_VERSION})")
    recorded, digest = meta.get(_HASH_KEY), _digest(meta, tensors)
    if shipped and digest != JUDGE_SHA256:
        raise _refuse(p, f"its weights and metadata hash to sha256 {digest[:16]}..., not the "
                         f"shipped judge's {JUDGE_SHA256[:16]}... (the file was modified or "
                         "damaged)")
    if recorded != digest:
        raise _refuse(p, "its weights or metadata do not match the sha256 its metadata "
                         "records (the file was modified or damaged)")
    try:
        config = from_dict(JudgeConfig, _parse_json(p, meta, "judge_config"), "judge")
        training = from_dict(JudgeTraining, _parse_json(p, meta, "training"), "training")
    except ConfigError as e:
        raise _refuse(p, f"its configuration is not valid ({first_line(e)})") from None
    held_out = _parse_json(p, meta, "held_out")
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise _refuse(p, f"tensor {bad[0]} holds {bad[1]} non-finite values")
    net = _build(config, None)
    try:
        net.load_state_dict(tensors)
    except RuntimeError as e:
        raise _refuse(p, f"its tensors do not fit its architecture ({first_line(e)})") from None
    net = net.to(device).eval().requires_grad_(False)
    return Judge(net=net, training=training,
                 held_out=held_out if isinstance(held_out, dict) else {},
                 sha256=str(recorded), path=p)


# ---------------------------------------------------------------------------------------------
# Quality per network call


ALL_SAMPLERS: tuple[str, ...] = SAMPLERS
ALL_GRIDS: tuple[str, ...] = SIGMA_GRIDS
DEFAULT_BUDGETS = (5, 10, 15, 25, 50, 100)
NFE_IMAGES = 512
"""Images per combination of :func:`quality_per_nfe` by default."""
REFERENCE_IMAGES = 10000
"""Built-in reference images (seed 0) of the judge's FID/KID by default."""


MAX_NFE = 10_000
MAX_NFE_IMAGES = 100_000
"""The most images ``eval nfe`` draws per cell (FID is usually taken on 10,000 to 50,000)."""
MAX_REFERENCE_IMAGES = 1_000_000
"""The most built-in reference images ``eval nfe`` computes statistics of."""
"""The largest network-evaluation budget :func:`quality_per_nfe` takes (10x the usual 1,000
training timesteps); a larger one is a one-line error rather than a benchmark that never ends."""


def steps_for_budget(sampler: str, budget: int) -> int | None:
    """The most steps whose network evaluations (:func:`diffunet.samplers.network_calls`) fit
    in ``budget``; None when even one step does not."""
    best = None
    for n in range(1, budget + 1):
        if network_calls(sampler, n) <= budget:
            best = n
        else:
            break
    return best


@dataclass(frozen=True)
class NFERow:
    """One (sampler, grid, budget) of :func:`quality_per_nfe`."""

    sampler: str
    grid: str
    budget: int
    num_steps: int
    nfe: int
    fid: float
    kid: float
    recognisable: float
    class_entropy: float
    seconds_per_image: float
    guided_nfe: int = 0
    """Of the ``nfe`` calls, those that also evaluated the guide (the guide network with
    autoguidance, the unconditional branch with classifier-free guidance; fewer with a guidance
    interval): the work per image is ``nfe`` main evaluations plus these."""


@dataclass(frozen=True)
class NFEResult:
    """The rows, the combinations skipped (each with why), and what was measured."""

    rows: list[NFERow]
    skipped: list[str]
    num_images: int
    seed: int
    model_sha256: str
    num_reference: int
    judge_sha256: str
    reference_fid: float
    """The judge FID of built-in images (seed 1, as many as generated) against the reference:
    the floor a perfect model would reach with this many images."""
    options: dict[str, Any] = field(default_factory=dict)


def start_noise(seed: int, indices: Sequence[int], shape: tuple[int, int, int]
                 ) -> tuple[Tensor, list[torch.Generator]]:
    """Image i's start noise from ``torch.Generator().manual_seed(seed + i)``, as ``diffunet
    sample`` draws it, and the generators (which then give its step noise)."""
    gens = [torch.Generator().manual_seed(seed + i) for i in indices]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]), gens


def judge_scores(judge: Judge, feats: Tensor, probs: Tensor, ref: FeatureStats
                 ) -> tuple[float, ...]:
    """(FID, KID, recognisable fraction, class entropy) of generated images' judge
    features (N, D) and class probabilities (N, K) against the reference ``ref``."""
    gen = FeatureStats.from_features(feats)
    fid = frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma)
    kid, _ = kernel_inception_distance(feats, ref.features, subset_size=1000, num_subsets=50)
    report = class_report(probs, judge.config.class_names)
    return fid, kid, report.recognisable, report.entropy


def quality_per_nfe(model_path: str | os.PathLike, *, judge: Judge | None = None,
                    num_images: int = NFE_IMAGES, seed: int = 0,
                    budgets: Sequence[int] = DEFAULT_BUDGETS,
                    samplers: Sequence[str] = ALL_SAMPLERS, grids: Sequence[str] = ALL_GRIDS,
                    batch_size: int = 128, device: str | torch.device = "cpu",
                    num_reference: int = REFERENCE_IMAGES,
                    cache_dir: str | os.PathLike | None = None,
                    clip_x0: bool | None = None, sigma_min: float | None = None,
                    sigma_max: float | None = None, names: dict[str, str] | None = None,
                    guidance_scale: float | None = None,
                    guide_model: str | os.PathLike | None = None,
                    guidance_interval: tuple[float, float] | None = None,
                    no_guide: bool = False, vae: str | os.PathLike | None = None,
                    progress: Callable[[str], None] | None = None) -> NFEResult:
    """Sample ``num_images`` images (image i from seed + i, as ``diffunet sample``) from the
    model file for each sampler, sigma grid and network-evaluation budget, with the most steps
    that fit the budget, and judge them: FID and KID of the judge's features against
    ``num_reference`` built-in images (seed 0, the default training set; statistics cached in
    ``cache_dir``), the recognisable fraction and the class entropy; with the wall time per
    image of the sampling. ``sigma_min``/``sigma_max`` set the karras and exponential grids'
    range (None: the model's; a bad one is a one-line error naming them as ``names`` spells
    them, e.g. the command line's flags). A uniform grid on an EDM model, a budget below a
    sampler's one step, and a combination ``sample`` refuses (the uniform grid with a set
    range) are skipped, each with a note. ``guidance_scale`` w, ``guide_model`` (a model file:
    autoguidance, checked against the model as ``diffunet sample --guide-model`` does) and
    ``guidance_interval`` guide every combination as :func:`~diffunet.samplers.sample` does
    (a class-conditional model's images get labels i mod num_classes, and w is then
    classifier-free guidance's without a guide); each row then also counts the calls that
    evaluated the guide. A model file that carries a guide (``train.guide_at``) is autoguided
    by it, as ``diffunet sample`` does, unless ``guide_model`` replaces it or ``no_guide``;
    ``guidance_scale`` None is then its recorded weight (else 1, no guidance).
    ``progress(text)`` is called before each combination."""
    from .checkpoint import load_diffusion_file

    if num_images < 2:
        raise UsageError(f"num_images must be at least 2 (FID needs a covariance), got "
                         f"{num_images}")
    for name, value, most in (("num_images", num_images, MAX_NFE_IMAGES),
                              ("num_reference", num_reference, MAX_REFERENCE_IMAGES)):
        if value > most:  # each is drawn and judged: more is a run that never ends
            raise UsageError(f"{name} {value} is more than {most:,} images; use fewer")
    if batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size}")
    for b in budgets:
        if not 1 <= int(b) <= MAX_NFE:
            raise UsageError(f"network-evaluation budgets must be in [1, {MAX_NFE}], got {b}")
    for g in grids:
        if g not in ALL_GRIDS:
            raise UsageError(f"unknown sigma grid {g!r}; use {', '.join(ALL_GRIDS)}")
    device = torch.device(device)
    judge = judge if judge is not None else load_judge(device=device)
    loaded = load_diffusion_file(model_path, device=device)
    net, schedule, meta = loaded.net, loaded.schedule, loaded.metadata
    assert schedule is not None
    cfg = net.config
    if getattr(cfg, "cond_channels", 0):
        raise UsageError(f"{model_path} draws from a condition image (unet.cond_channels "
                         f"{cfg.cond_channels}); judging its unconditional draws says nothing: "
                         "judge it on held-out pairs with `diffunet eval paired`")
    flag = dict(names or {}).get
    guide, carried = None, None
    follow = None  # the carried guide's recorded weight, eased per step count as sample does
    if guide_model is None and not no_guide and loaded.guide is not None:
        carried = loaded.guide  # the run's own earlier EMA, as diffunet sample uses it
        if guidance_scale is None:
            follow, guidance_scale = carried.scale, carried.scale
        guide = carried.net if guidance_scale != 1.0 else None
    guidance_scale = 1.0 if guidance_scale is None else guidance_scale
    del loaded
    if guide_model is not None:
        from .checkpoint import load_guide_model

        guide, _ = load_guide_model(guide_model, net, schedule, model_path=model_path,
                                    model_meta=meta, device=device,
                                    name=flag("guide_model", "guide_model"))
    flags = {"guidance_scale": flag("guidance_scale", "guidance_scale"),
             "guidance_interval": flag("guidance_interval", "guidance_interval")}
    check_sampling(flags, guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                   error=UsageError)
    if guidance_scale != 1.0 and guide is None and getattr(cfg, "num_classes", None) is None:
        raise UsageError(f"{flags['guidance_scale']} {guidance_scale} needs a class-conditional "
                         f"model (classifier-free guidance) or a "
                         f"{flag('guide_model', 'guide_model')} (autoguidance)")
    if guidance_scale == 1.0 and (guide_model is not None or guidance_interval is not None):
        what = "guide_model" if guide is not None else "guidance_interval"
        raise UsageError(f"{flag(what, what)} with guidance scale 1 changes nothing; give "
                         f"{flags['guidance_scale']} W above 1 or drop {flag(what, what)}")
    size = judge.config.image_size
    # a latent model's states are decoded by its VAE (``vae``: a local copy of it), and images
    # larger than the judge's are downscaled to it (area: the mean of each block of pixels)
    space = model_space(meta, None if vae is None else str(vae), device,
                        where=str(model_path))
    pixels = space.image_shape((cfg.in_channels, cfg.image_size, cfg.image_size))
    if pixels[0] != 3 or pixels[1] < size or pixels[1] % size:
        raise UsageError(f"the judge reads RGB {size}x{size} images (or larger ones it "
                         f"downscales: {2 * size}x{2 * size}, ...) and this model makes "
                         f"{pixels[0]}x{pixels[1]}x{pixels[2]}; quality per network call is "
                         "measured on models of the built-in data")
    if clip_x0 is None:  # as `diffunet sample` does: the model's stored [sample] setting
        stored = (meta.get("run_config") or {}).get("sample") or {}
        clip_x0 = stored.get("clip_x0")
        clip_x0 = clip_x0 if isinstance(clip_x0, bool) else SampleConfig().clip_x0
    clip_x0 = space.clip_x0(clip_x0)  # latents: never clipped
    check_sigma_range(schedule, sigma_min, sigma_max, names)  # one line, before any work
    network = judge.feature_network()
    reference = BuiltinShapes(num_reference, size, 3, seed=0)
    ref, _, _ = reference_statistics(reference, network, cache_dir=cache_dir,
                                     batch_size=256, device=device)
    floor = BuiltinShapes(num_images, size, 3, seed=1)
    floor_fid = judge_scores(judge, *judge.judge_dataset(floor, device=device), ref)[0]
    num_classes = getattr(cfg, "num_classes", None)
    labels = (torch.arange(num_images) % num_classes) if isinstance(num_classes, int) else None
    rows: list[NFERow] = []
    skipped: list[str] = []
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    for sampler in samplers:
        for grid in grids:
            if grid == "uniform" and not schedule.uniform_grid:
                skipped.append(f"{sampler} on the uniform grid: the model is {schedule.title} "
                               "(no training timesteps to space uniformly)")
                continue
            for budget in budgets:
                steps = steps_for_budget(sampler, int(budget))
                if steps is None:
                    skipped.append(f"{sampler} at {budget} network calls: one step needs "
                                   f"{network_calls(sampler, 1)}")
                    continue
                if progress is not None:
                    progress(f"{sampler} {grid} {budget} NFE ({steps} steps)")
                try:
                    images, seconds, guided = [], 0.0, 0
                    for start in range(0, num_images, batch_size):
                        idx = list(range(start, min(start + batch_size, num_images)))
                        x_T, gens = start_noise(seed, idx, shape)
                        y = None if labels is None else labels[idx].to(device)
                        count = NetworkCount()
                        t0 = time.perf_counter()
                        with torch.no_grad():
                            out = sample(net, schedule, x_T.to(device), sampler=sampler,
                                         num_steps=steps, sigmas=grid, clip_x0=clip_x0,
                                         sigma_min=sigma_min, sigma_max=sigma_max,
                                         class_labels=y, generator=gens,
                                         guidance_scale=guidance_scale if follow is None
                                         else carried_guide_weight(follow, steps),
                                         guide_model=guide,
                                         guidance_interval=guidance_interval,
                                         network_count=count)
                            out = space.decode(out)  # a latent model's VAE: part of the time
                        out = out.float().cpu()  # waits for the device: part of the time
                        seconds += time.perf_counter() - t0
                        if out.shape[-1] != size:
                            out = torch.nn.functional.interpolate(out, size=(size, size),
                                                                  mode="area")
                        images.append(out.clamp(-1, 1))
                        guided = max(guided, count.guided)  # every batch makes the same calls
                except UsageError as e:
                    why = " ".join(str(e).split())
                    skipped.append(f"{sampler} on the {grid} grid at {steps} steps: {why}")
                    continue
                feats, probs = judge.judge(torch.cat(images).to(device))
                fid, kid, rec, ent = judge_scores(judge, feats.float().cpu(), probs, ref)
                rows.append(NFERow(sampler=sampler, grid=grid, budget=int(budget),
                                   num_steps=steps, nfe=network_calls(sampler, steps),
                                   fid=fid, kid=kid, recognisable=rec, class_entropy=ent,
                                   seconds_per_image=seconds / num_images,
                                   guided_nfe=guided))
    return NFEResult(rows=rows, skipped=skipped, num_images=num_images, seed=seed,
                     model_sha256=file_sha256(model_path), num_reference=ref.features.shape[0],
                     judge_sha256=judge.sha256, reference_fid=floor_fid,
                     options={"clip_x0": clip_x0, "sigma_min": sigma_min,
                              "sigma_max": sigma_max, "batch_size": batch_size,
                              "device": str(device), "guidance_scale": guidance_scale,
                              "guide_model": (str(guide_model) if guide_model is not None
                                              else None if guide is None else "carried"),
                              "guide_model_sha256": (file_sha256(guide_model)
                                                     if guide_model is not None else
                                                     None if guide is None or carried is None
                                                     else meta["guide"]["sha256"]),
                              "guide_step": None if guide is None or carried is None
                              else carried.step,
                              "guidance_interval": None if guidance_interval is None
                              else list(guidance_interval),
                              "weight_follows_steps": follow is not None})


def format_nfe_table(result: NFEResult) -> str:
    """:func:`quality_per_nfe`'s result as a markdown table (one row per sampler, grid and
    budget), then the skipped combinations."""
    guided = result.options.get("guidance_scale", 1.0) != 1.0
    lines = ["| sampler | grid | NFE budget | steps | NFE | " + ("guided | " if guided else "")
             + "FID | KID | recognisable | class entropy | s / image |",
             "|---|---|---:|---:|---:|" + ("---:|" if guided else "")
             + "---:|---:|---:|---:|---:|"]
    for r in result.rows:
        lines.append(f"| {r.sampler} | {r.grid} | {r.budget} | {r.num_steps} | {r.nfe} | "
                     + (f"{r.guided_nfe} | " if guided else "")
                     + f"{r.fid:.2f} | {r.kid:.4g} | {r.recognisable:.1%} | "
                     f"{r.class_entropy:.3f} | {r.seconds_per_image:.4f} |")
    last = result.seed + result.num_images - 1
    lines.append("")
    lines.append(f"{result.num_images} images (seeds {result.seed}..{last}); judge FID/KID "
                 f"against {result.num_reference} built-in images (seed 0); "
                 f"{result.num_images} built-in images of seed 1 score FID "
                 f"{result.reference_fid:.2f} (the floor at this many images)")
    ends = [f"{k} {result.options[k]:g}" for k in ("sigma_max", "sigma_min")
            if result.options.get(k) is not None]
    if ends:
        lines.append(f"karras and exponential grids with {' and '.join(ends)} (the rest the "
                     "model's)")
    if guided:
        o = result.options
        how = ((f"autoguidance by the carried guide (the EMA of step {o.get('guide_step')})"
                if o.get("guide_model") == "carried" else
                f"autoguidance by {o.get('guide_model')}") if o.get("guide_model")
               else "classifier-free guidance")
        interval = o.get("guidance_interval")
        w = o["guidance_scale"]
        eased = (f" at {FULL_WEIGHT_STEPS} steps or more, "
                 f"{carried_guide_weight(w, HALF_WEIGHT_STEPS):g} at {HALF_WEIGHT_STEPS}, 1 "
                 f"(unguided) at {UNGUIDED_STEPS} or fewer, linear between (as diffunet sample)"
                 if o.get("weight_follows_steps") else "")
        lines.append(f"{how}, weight {w:g}{eased}"
                     + (f", at sigma in [{interval[0]:g}, {interval[1]:g}]" if interval else "")
                     + "; NFE counts the model's network calls, guided those that also "
                     "evaluated the guide" + (" network" if o.get("guide_model") else
                                              " (the unconditional half of a doubled batch)"))
    for note in result.skipped:
        lines.append(f"skipped: {note}")
    return "\n".join(lines)
