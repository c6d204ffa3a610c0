"""Evaluation: bits/dim on a data set, and FID / KID between generated and reference images.

- :func:`dataset_bits_per_dim` runs :func:`diffunet.likelihood.bits_per_dim` (the DDPM variational
  bound, section 3.3) over a data set with a progress bar and an image limit.
- :func:`fid_kid` compares two image sets through a feature network: the Frechet distance between
  Gaussians fitted to the features (FID, Heusel et al. 2017) and the kernel inception distance
  (KID, Binkowski et al. 2018, unbiased MMD^2 with a cubic polynomial kernel, over subsets).
  The reference set's features and statistics are cached (safetensors, never pickle) under a
  fingerprint of the reference files, image size and feature network.
- The feature network is pluggable (:class:`FeatureNetwork`); :func:`load_inception` builds the
  standard FID Inception-v3 from the optional ``pytorch-fid`` package (``pip install
  "diffunet[eval]"``) and loads its weights from a local file or a once-downloaded cache.
  :meth:`diffunet.judge.Judge.feature_network` is the offline one for models of the built-in
  shapes (``--features builtin``); its identity (weights hash) keeps its cache entries apart.
- :func:`bpd_data_config`, :func:`generated_images` and :func:`reference_images` resolve what
  ``diffunet eval bpd|fid`` evaluates on (:mod:`diffunet.cli.evaluate` parses and prints).

Everything here returns values; nothing prints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from .checkpoint import read_tensor_file, write_tensor_file
from .config import DataConfig, load_config, parse_value, to_dict
from .data import BuiltinShapes, FolderImages, Loader, TorchvisionImages, build_dataset
from .formulations.vp import NoiseSchedule
from .errors import (ConfigError, DataError, MissingDependencyError, ModelFileError,
                     UsageError)
from .fileio import atomic_writer, first_line, open_regular_file
from .images import image_header
from .likelihood import LIKELIHOOD_VARIANCES, bits_per_dim, require_vp_bound

__all__ = [
    "BPDResult",
    "FIDResult",
    "FeatureNetwork",
    "FeatureStats",
    "INCEPTION_WEIGHTS_URL",
    "LIKELIHOOD_VARIANCES",
    "INCEPTION_WEIGHTS_FILE",
    "INSTALL_HINT",
    "bpd_data_config",
    "dataset_bits_per_dim",
    "dataset_fingerprint",
    "describe_data",
    "default_cache_dir",
    "extract_features",
    "fid_kid",
    "frechet_distance",
    "kernel_inception_distance",
    "load_inception",
    "generated_images",
    "reference_images",
    "reference_statistics",
    "split_data_items",
]

INCEPTION_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                         "pt_inception-2015-12-05-6726825d.pth")
"""pytorch-fid's port of the TensorFlow FID Inception (2015-12-05), the network every FID uses."""
INCEPTION_WEIGHTS_FILE = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[1]
INSTALL_HINT = 'pip install "diffunet[eval]"'
"""How to get the FID feature network's package (the ``eval`` extra)."""
_CACHE_FORMAT = "diffunet.fid_reference"
_CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Bits per dimension over a data set


@dataclass(frozen=True)
class BPDResult:
    """The variational bound of each evaluated image, in bits/dim (float64 CPU (N,) tensors).

    ``bpd = prior + decoder + kl``; ``num_timesteps`` is the number of KL terms evaluated per
    image (None: all T - 1, the exact bound; an int: the unbiased subset estimate).
    """

    bpd: Tensor
    prior: Tensor
    decoder: Tensor
    kl: Tensor
    num_train_timesteps: int
    num_timesteps: int | None
    variance: str
    clip_x0: bool

    def summary(self) -> dict[str, Any]:
        """Means (and the standard error of the mean bpd) as plain JSON-ready numbers."""
        n = int(self.bpd.numel())
        stderr = float(self.bpd.std() / math.sqrt(n)) if n > 1 else float("nan")
        return {
            "bpd": float(self.bpd.mean()), "bpd_stderr": stderr, "num_images": n,
            "prior_bpd": float(self.prior.mean()), "decoder_bpd": float(self.decoder.mean()),
            "kl_bpd": float(self.kl.mean()), "num_train_timesteps": self.num_train_timesteps,
            "timesteps": "all" if self.num_timesteps is None else self.num_timesteps,
            "variance": self.variance, "clip_x0": self.clip_x0,
        }


def _default_device(model: Callable[..., Tensor]) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def dataset_bits_per_dim(model: Callable[..., Tensor], schedule: NoiseSchedule, dataset: Dataset,
                         *, max_images: int | None = None, batch_size: int = 256,
                         num_timesteps: int | None = None, variance: str = "fixed_large",
                         clip_x0: bool = True, device: str | torch.device | None = None,
                         generator: torch.Generator | None = None, num_workers: int = 0,
                         progress: bool = False) -> BPDResult:
    """Bits/dim (:func:`diffunet.likelihood.bits_per_dim`) of the first ``max_images`` images of
    ``dataset`` (items ``(image (C, H, W) in [-1, 1], label)``), in data set order.

    ``batch_size`` is the number of network inputs per call; each image needs T (or
    ``num_timesteps`` + 1) of them, so images go in groups of max(1, batch_size // that).
    A class-conditional model (``model.config.num_classes`` set) gets each image's label, or its
    "no label" index where the data set has none. ``progress`` shows a tqdm bar (stderr).
    ``generator`` (on CPU, or on ``device``) draws the noise and timestep subsets; default seed 0.
    """
    from tqdm.auto import tqdm

    if max_images is not None and max_images < 1:
        raise UsageError(f"max_images must be a positive integer, got {max_images}")
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    if n < 1:
        raise DataError("the data set is empty; give it at least one image")
    device = torch.device(device) if device is not None else _default_device(model)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    require_vp_bound(schedule)
    T = schedule.num_train_timesteps
    exact = num_timesteps is None or num_timesteps >= T - 1
    evals = T if exact else num_timesteps + 1
    per_step = max(1, batch_size // evals)
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    loader = Loader(Subset(dataset, range(n)), batch_size=per_step, shuffle=False,
                        num_workers=num_workers)
    parts: dict[str, list[Tensor]] = {"bpd": [], "prior": [], "decoder": [], "kl": []}
    with tqdm(total=n, unit="img", desc="bits/dim", disable=not progress) as bar:
        for images, labels in loader:
            x0 = images.to(device)
            class_labels = None
            if isinstance(num_classes, int):
                labels = torch.as_tensor(labels, dtype=torch.long)
                class_labels = torch.where(labels >= 0, labels, num_classes).to(device)
            r = bits_per_dim(model, schedule, x0, class_labels=class_labels,
                             num_timesteps=None if exact else num_timesteps, variance=variance,
                             clip_x0=clip_x0, batch_size=batch_size, generator=generator)
            for key in parts:
                parts[key].append(getattr(r, key).detach().to("cpu", torch.float64))
            bar.update(len(x0))
    return BPDResult(**{k: torch.cat(v) for k, v in parts.items()}, num_train_timesteps=T,
                     num_timesteps=None if exact else num_timesteps, variance=variance,
                     clip_x0=clip_x0)


# ---------------------------------------------------------------------------------------------
# Feature networks


@dataclass(frozen=True)
class FeatureNetwork:
    """A feature network for FID and KID.

    ``net`` maps images (B, 3, H, W) in [-1, 1] on the device they are given on to features
    (B, D). ``identity`` names the network and its weights (e.g. a weights-file hash): it is part
    of the reference-statistics cache key, so two different networks must never share one.
    """

    net: Callable[[Tensor], Tensor]
    identity: str


class _FIDInception(nn.Module):
    """The FID Inception-v3 up to its 2048-d pool3 features, for inputs in [-1, 1].

    Bilinear resize to 299x299 (no antialiasing), then the network: the same computation as
    pytorch-fid's ``InceptionV3([3])`` on inputs in [0, 1] (its ``2x - 1`` rescaling commutes
    with the resize), so features match pytorch-fid's.
    """

    def __init__(self, inception: nn.Module) -> None:
        super().__init__()
        names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                 "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                 "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b",
                 "Mixed_7c", "avgpool"]
        self.layers = nn.Sequential(*(getattr(inception, name) for name in names))

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) in [-1, 1] -> (B, 2048)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers(x).flatten(1)


def _import_pytorch_fid() -> Any:
    try:
        import pytorch_fid.inception as fid_inception
    except ImportError:
        raise MissingDependencyError(f"FID and KID need the optional package pytorch-fid; "
                                     f"install it with: {INSTALL_HINT}") from None
    return fid_inception


def build_fid_inception() -> nn.Module:
    """The FID Inception-v3 network (pytorch-fid's blocks on torchvision's Inception3),
    uninitialised: (B, 1008) logits network with the FID-specific Mixed blocks. Needs the
    ``eval`` extra. Load pytorch-fid's weights into it with ``load_state_dict``."""
    fid = _import_pytorch_fid()
    from torchvision.models import inception_v3

    # pytorch-fid's fid_inception_v3() builds the same network but always fetches the weights
    # from a URL (and unpickles them without restriction); building it here lets the weights
    # come from a local file, read with weights_only=True.
    net = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    for name, block in [("Mixed_5b", fid.FIDInceptionA(192, pool_features=32)),
                        ("Mixed_5c", fid.FIDInceptionA(256, pool_features=64)),
                        ("Mixed_5d", fid.FIDInceptionA(288, pool_features=64)),
                        ("Mixed_6b", fid.FIDInceptionC(768, channels_7x7=128)),
                        ("Mixed_6c", fid.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6d", fid.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6e", fid.FIDInceptionC(768, channels_7x7=192)),
                        ("Mixed_7b", fid.FIDInceptionE_1(1280)),
                        ("Mixed_7c", fid.FIDInceptionE_2(2048))]:
        setattr(net, name, block)
    return net


def default_cache_dir() -> Path:
    """``$DIFFUNET_CACHE``, else ``$XDG_CACHE_HOME/diffunet``, else ``~/.cache/diffunet``."""
    if os.environ.get("DIFFUNET_CACHE"):
        return Path(os.environ["DIFFUNET_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "diffunet"


def _download(url: str, path: Path, timeout: float = 30.0) -> None:
    """Fetch ``url`` to ``path`` atomically (:func:`~diffunet.fileio.atomic_writer`), so a failed
    or interrupted download leaves nothing under ``path``. ``timeout`` (seconds) bounds each
    connect and read, so a machine whose network silently drops packets fails instead of
    hanging (torch.hub's downloader has no timeout)."""
    import shutil
    import urllib.request

    from tqdm.auto import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as f, urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm.wrapattr(f, "write", total=total, desc=path.name, unit="B",
                           unit_scale=True) as out:
            shutil.copyfileobj(response, out, length=1 << 20)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular_file(path) as (f, _):  # a FIFO swapped in is refused, never read
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _how_to_supply(cache: Path) -> str:
    return (f"download {INCEPTION_WEIGHTS_URL} on a machine with internet and pass it with "
            f"--feature-weights PATH (load_inception(weights=PATH)), or copy it to {cache} "
            f"(the cache folder is $DIFFUNET_CACHE, default ~/.cache/diffunet)")


def inception_weights_path(weights: str | os.PathLike | None = None, *,
                           cache_dir: str | os.PathLike | None = None,
                           download: bool = True) -> Path:
    """Where the FID Inception weights are: ``weights`` if given (it must exist), else the
    cache file ``<cache_dir>/pt_inception-2015-12-05-6726825d.pth``, downloaded once from
    :data:`INCEPTION_WEIGHTS_URL` when missing (and ``download``). Raises ModelFileError with
    how to supply the file when it cannot be had."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelFileError(f"FID Inception weights file not found: {path}; download "
                                 f"{INCEPTION_WEIGHTS_URL} and give its path")
        return path
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache / INCEPTION_WEIGHTS_FILE
    if path.is_file():
        return path
    if not download:
        raise ModelFileError(f"the FID Inception weights are not in {path}; "
                             + _how_to_supply(path))
    try:
        _download(INCEPTION_WEIGHTS_URL, path)
    except Exception as e:  # URLError, HTTPError, OSError, timeouts, ...
        raise ModelFileError(f"the FID Inception weights are not in {path} and could not be "
                             f"downloaded ({first_line(e)}); " + _how_to_supply(path)) from None
    return path


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from a .safetensors file, or a torch.save file read with weights_only=True
    (tensors only: nothing in it can run code)."""
    try:
        if path.suffix == ".safetensors":
            return read_tensor_file(path)[0]
        with open_regular_file(path) as (f, _):  # not blocking on a FIFO
            state = torch.load(io.BufferedReader(f), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelFileError(f"cannot read the FID Inception weights {path} ({first_line(e)}); "
                             f"delete it and download {INCEPTION_WEIGHTS_URL} again") from None
    if not isinstance(state, dict):
        raise ModelFileError(f"{path} does not hold a state dict; expected pytorch-fid's "
                             f"{INCEPTION_WEIGHTS_FILE}")
    return state


def load_inception(weights: str | os.PathLike | None = None, *,
                   cache_dir: str | os.PathLike | None = None, download: bool = True,
                   device: str | torch.device = "cpu") -> FeatureNetwork:
    """The standard FID feature network: Inception-v3 pool3 features (B, 2048), eval mode.

    Needs the ``eval`` extra (pytorch-fid), else :class:`MissingDependencyError`. The weights
    (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, or the same state dict as
    ``.safetensors``) come from ``weights`` or the cache (see :func:`inception_weights_path`).
    The identity records the weights file's SHA-256.
    """
    _import_pytorch_fid()  # the missing-extra error comes first
    path = inception_weights_path(weights, cache_dir=cache_dir, download=download)
    state = _read_state_dict(path)
    inception = build_fid_inception()
    try:
        inception.load_state_dict(state)
    except RuntimeError as e:
        raise ModelFileError(f"{path} is not the FID Inception weights file "
                             f"({first_line(e)}); use pytorch-fid's {INCEPTION_WEIGHTS_FILE}"
                             ) from None
    net = _FIDInception(inception).to(device).eval().requires_grad_(False)
    return FeatureNetwork(net=net, identity=f"fid-inception-v3-pool3/bilinear299/"
                                            f"sha256:{_sha256(path)}")


# ---------------------------------------------------------------------------------------------
# Features, statistics and the two distances


def extract_features(network: FeatureNetwork, dataset: Dataset, *, batch_size: int = 50,
                     max_images: int | None = None, device: str | torch.device = "cpu",
                     num_workers: int = 0, progress: bool = False, desc: str = "features",
                     ) -> Tensor:
    """Features (N, D) float32 on the CPU of the first ``max_images`` images of ``dataset``
    (items ``(image (3, H, W) in [-1, 1], label)``), computed on ``device`` in batches."""
    from tqdm.auto import tqdm

    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    loader = Loader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    out = []
    with torch.no_grad(), tqdm(total=n, unit="img", desc=desc, disable=not progress) as bar:
        for images, _ in loader:
            feats = network.net(images.to(device))
            out.append(feats.reshape(len(images), -1).to("cpu", torch.float32))
            bar.update(len(images))
    if not out:
        raise DataError("no images to compute features of")
    return torch.cat(out)


@dataclass(frozen=True)
class FeatureStats:
    """Features (N, D) float32 and their mean (D,) and covariance (D, D), float64 (unbiased,
    N - 1, as numpy's ``cov``)."""

    features: Tensor
    mu: Tensor
    sigma: Tensor

    @staticmethod
    def from_features(features: Tensor) -> "FeatureStats":
        if features.ndim != 2 or features.shape[0] < 2:
            raise DataError(f"FID needs at least 2 images (a covariance), got "
                            f"{features.shape[0] if features.ndim else 0}")
        x = features.to(torch.float64)
        mu = x.mean(dim=0)
        xc = x - mu
        sigma = xc.T @ xc / (x.shape[0] - 1)
        return FeatureStats(features=features, mu=mu, sigma=sigma)


def _sqrt_psd(a: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigh)."""
    evals, evecs = torch.linalg.eigh(a)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982):
    ``|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``; mu (D,), sigma (D, D).

    Computed in float64 without a general matrix square root: sigma1 sigma2 is similar to the
    symmetric PSD matrix M = sigma1^(1/2) sigma2 sigma1^(1/2), so Tr((sigma1 sigma2)^(1/2)) =
    sum sqrt(eigvalsh(M)). Two symmetric eigendecompositions are backward stable and stay real
    for singular covariances (fewer images than dimensions), where ``scipy.linalg.sqrtm`` of the
    non-symmetric product returns complex noise and needs pytorch-fid's eps * I fallback.
    """
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    s1, s2 = sigma1.to(torch.float64), sigma2.to(torch.float64)
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2  # exact symmetry for eigh
    root1 = _sqrt_psd(s1)
    m = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


def kernel_inception_distance(features_a: Tensor, features_b: Tensor, *,
                              subset_size: int = 1000, num_subsets: int = 100,
                              generator: torch.Generator | None = None,
                              device: str | torch.device = "cpu") -> tuple[float, float]:
    """KID: the unbiased MMD^2 between two feature sets (N_a, D), (N_b, D) with the kernel
    k(x, y) = (x.y / D + 1)^3 (Binkowski et al. 2018), averaged over ``num_subsets`` random
    subsets of ``subset_size`` (capped at the smaller set) drawn without replacement from each.

    Returns (mean, standard deviation over subsets). Computed in float64 on ``device``;
    ``generator`` (CPU) draws the subsets (default seed 0).
    """
    m = min(subset_size, features_a.shape[0], features_b.shape[0])
    if m < 2:
        raise DataError(f"KID needs at least 2 images in each set, got {features_a.shape[0]} "
                        f"and {features_b.shape[0]}")
    if num_subsets < 1:
        raise UsageError(f"num_subsets must be a positive integer, got {num_subsets}")
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    d = features_a.shape[1]
    a = features_a.to(device, torch.float64)
    b = features_b.to(device, torch.float64)
    values = []
    for _ in range(num_subsets):
        x = a[torch.randperm(a.shape[0], generator=generator)[:m].to(device)]
        y = b[torch.randperm(b.shape[0], generator=generator)[:m].to(device)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        # Unbiased MMD^2 (Gretton et al. 2012, eq. 3): the within-set sums leave out i = j.
        within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum())
        values.append(within / (m * (m - 1)) - 2 * kxy.mean())
    v = torch.stack(values)
    return float(v.mean()), float(v.std(unbiased=False))


# ---------------------------------------------------------------------------------------------
# Reference statistics, cached by fingerprint


def _describe_dataset(dataset: Dataset) -> dict[str, Any]:
    """What identifies a data set's images, for the cache key (raises DataError if unknown)."""
    if isinstance(dataset, FolderImages):
        files = []
        for path in dataset.files:
            st = path.stat()
            files.append([path.relative_to(dataset.root).as_posix(), st.st_size, st.st_mtime_ns])
        return {"source": "folder", "root": str(dataset.root.resolve()), "files": files}
    if isinstance(dataset, BuiltinShapes):
        return {"source": "builtin", "size": dataset.size, "seed": dataset.seed}
    if isinstance(dataset, TorchvisionImages):
        base = dataset.base
        return {"source": "torchvision", "class": type(base).__name__, "len": len(base),
                "split": str(getattr(base, "split", getattr(base, "train", "")))}
    raise DataError(f"cannot fingerprint a {type(dataset).__name__} for the reference cache; "
                    "pass fingerprint=... or cache_dir=None")


def dataset_fingerprint(dataset: Dataset, network: FeatureNetwork,
                        max_images: int | None = None) -> str:
    """SHA-256 hex of what determines a reference set's features: its files (sorted relative
    paths, sizes and modification times) or data set description, image size and channels,
    the image limit, and the feature network's identity."""
    key = {
        "version": _CACHE_VERSION,
        "data": _describe_dataset(dataset),
        "image_size": getattr(dataset, "image_size", None),
        "channels": getattr(dataset, "channels", None),
        "max_images": max_images,
        "feature_network": network.identity,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _load_cached(path: Path, fingerprint: str) -> FeatureStats | None:
    """The statistics in cache file ``path``, or None if it is absent, damaged or foreign."""
    if not path.is_file():
        return None
    try:
        tensors, meta = read_tensor_file(path)
        if meta.get("format") != _CACHE_FORMAT or meta.get("fingerprint") != fingerprint:
            return None
        return FeatureStats(features=tensors["features"], mu=tensors["mu"],
                            sigma=tensors["sigma"])
    except (ModelFileError, KeyError):  # a damaged cache entry is recomputed, never an error
        return None


def _save_cached(path: Path, stats: FeatureStats, fingerprint: str, summary: dict[str, Any],
                 ) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": _CACHE_FORMAT, "format_version": str(_CACHE_VERSION),
                "fingerprint": fingerprint, "summary": json.dumps(summary)}
    write_tensor_file(path, {"features": stats.features, "mu": stats.mu, "sigma": stats.sigma},
                      metadata)


def reference_statistics(dataset: Dataset, network: FeatureNetwork, *,
                         cache_dir: str | os.PathLike | None = None,
                         max_images: int | None = None, batch_size: int = 50,
                         device: str | torch.device = "cpu", num_workers: int = 0,
                         progress: bool = False) -> tuple[FeatureStats, Path | None, bool]:
    """The reference set's :class:`FeatureStats`, from ``<cache_dir>/fid_stats/<fingerprint>``
    when there (see :func:`dataset_fingerprint`), else computed and written there.

    ``cache_dir=None`` computes without caching. Returns (stats, cache file or None, whether it
    came from the cache). A changed, added or removed reference file changes the fingerprint,
    so stale statistics are never used.
    """
    path = None
    if cache_dir is not None:
        fingerprint = dataset_fingerprint(dataset, network, max_images)
        path = Path(cache_dir).expanduser() / "fid_stats" / f"{fingerprint[:32]}.safetensors"
        cached = _load_cached(path, fingerprint)
        if cached is not None:
            return cached, path, True
    feats = extract_features(network, dataset, batch_size=batch_size, max_images=max_images,
                             device=device, num_workers=num_workers, progress=progress,
                             desc="reference")
    stats = FeatureStats.from_features(feats)
    if path is not None:
        summary = {"num_images": feats.shape[0], "feature_network": network.identity,
                   "image_size": getattr(dataset, "image_size", None)}
        _save_cached(path, stats, fingerprint, summary)
    return stats, path, False


@dataclass(frozen=True)
class FIDResult:
    """FID and KID of a generated set against a reference set (see :func:`fid_kid`)."""

    fid: float
    kid: float
    kid_std: float
    kid_subset_size: int
    kid_num_subsets: int
    num_generated: int
    num_reference: int
    feature_network: str
    reference_cache: str | None
    reference_from_cache: bool

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fid_kid(generated: Dataset, reference: Dataset, network: FeatureNetwork, *,
            cache_dir: str | os.PathLike | None = None, max_reference: int | None = None,
            batch_size: int = 50, device: str | torch.device = "cpu",
            kid_subset_size: int = 1000, kid_num_subsets: int = 100,
            generator: torch.Generator | None = None, num_workers: int = 0,
            progress: bool = False) -> FIDResult:
    """FID and KID between two image data sets (items ``(image (3, S, S) in [-1, 1], label)``,
    both at the same size S), through ``network``.

    The reference statistics are cached under ``cache_dir`` (None: not cached); the generated
    set's never are. ``generator`` draws the KID subsets (default seed 0).
    """
    ref, path, hit = reference_statistics(reference, network, cache_dir=cache_dir,
                                          max_images=max_reference, batch_size=batch_size,
                                          device=device, num_workers=num_workers,
                                          progress=progress)
    gen = FeatureStats.from_features(
        extract_features(network, generated, batch_size=batch_size, device=device,
                         num_workers=num_workers, progress=progress, desc="generated"))
    if gen.mu.shape != ref.mu.shape:
        raise DataError(f"feature sizes differ: {gen.mu.shape[0]} vs {ref.mu.shape[0]} in the "
                        "cached reference statistics")
    fid = frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma)
    kid, kid_std = kernel_inception_distance(gen.features, ref.features,
                                             subset_size=kid_subset_size,
                                             num_subsets=kid_num_subsets, generator=generator,
                                             device=device)
    return FIDResult(fid=fid, kid=kid, kid_std=kid_std,
                     kid_subset_size=min(kid_subset_size, gen.features.shape[0],
                                         ref.features.shape[0]),
                     kid_num_subsets=kid_num_subsets, num_generated=gen.features.shape[0],
                     num_reference=ref.features.shape[0], feature_network=network.identity,
                     reference_cache=None if path is None else str(path),
                     reference_from_cache=hit)


# ---------------------------------------------------------------------------------------------
# What `diffunet eval` evaluates on


def split_data_items(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG.toml] [data.key=value ...]`` -> (config path or None, data overrides)."""
    config_path, overrides = None, []
    for item in items:
        if "=" in item:
            if not item.strip().startswith("data."):
                raise UsageError(f"override {item!r}: diffunet eval takes only data.key=value "
                                 "overrides (the data set to evaluate on); the model file "
                                 "fixes unet.* and schedule.*")
            overrides.append(item)
        elif config_path is None:
            config_path = item
        else:
            raise UsageError(f"two config files given ({config_path}, {item}); give one, then "
                             "data.key=value overrides")
    return config_path, overrides


_SHAPE_KEYS = {"image_size": "image_size", "channels": "in_channels"}
"""The data keys that must match the model (data key -> UNet key)."""


def _run_folder(model_path: str | os.PathLike | None) -> Path | None:
    """The run folder a model file sits in (``RUN/weights/model_*.safetensors`` with
    ``RUN/config.json``), else None."""
    if model_path is None:
        return None
    weights = Path(model_path).absolute().parent
    run = weights.parent
    return run if weights.name == "weights" and (run / "config.json").is_file() else None


_LOCAL_KEY = {"folder": "path", "torchvision": "path", "hf": "name"}
"""The data key that may hold a path relative to where training ran, per source (for ``hf``,
``data.name`` is a local data set folder or else a Hub name)."""


def _stored_path(data: dict[str, Any], model_path: str | os.PathLike | None) -> dict[str, Any]:
    """``data`` with a relative stored ``path`` (``name`` for a local Hugging Face data set)
    found again: training resolved it against the folder it ran in, which is usually the run
    folder's parent's parent (``runs/NAME``), so the run folder and its parents are tried, then
    the current folder. If none holds a ``folder`` path, a ConfigError names the places tried
    and the override that sets it; a torchvision path not found is downloaded there as in
    training, and an ``hf`` name not found is a Hub name."""
    key = _LOCAL_KEY.get(str(data.get("source")))
    path = data.get(key) if key else None
    if not isinstance(path, str) or not path or Path(path).is_absolute():
        return data
    run = _run_folder(model_path)
    places = ([run, *list(run.parents)[:3]] if run is not None else []) + [Path.cwd()]
    places = list(dict.fromkeys(places))  # once each, in order
    for place in places:
        if (place / path).exists():
            return {**data, key: str(place / path)}
    if data.get("source") != "folder":  # torchvision: downloaded into ./PATH; hf: a Hub name
        return data
    tried = ", ".join(str(place / path) for place in places)
    raise ConfigError(f"data.path: the model was trained on {path!r} (relative to where "
                      f"training ran) and it is not at {tried}; give data.path=/path/to/images")


def bpd_data_config(meta: dict[str, Any], items: Sequence[str],
                    model_path: str | os.PathLike | None = None) -> DataConfig:
    """The data set ``diffunet eval bpd`` scores a model on: ``items`` (``[CONFIG.toml]
    [data.key=value ...]``) over the data section of the run config stored in the model file
    (``meta``, from :func:`~diffunet.checkpoint.read_model`), else the built-in set, always at
    the model's image size and channels (a CONFIG's own ``[unet]`` is not used; a
    ``data.image_size``/``data.channels`` override that differs is a :class:`ConfigError`).

    A relative ``data.path`` stored in the model is looked for next to the run folder the file
    at ``model_path`` sits in (see :func:`_stored_path`)."""
    unet = meta["unet_config"]
    config_path, overrides = split_data_items(items)
    for item in overrides:
        key, _, text = item.partition("=")
        name = key.strip().removeprefix("data.")
        if name in _SHAPE_KEYS and parse_value(text.strip()) not in (
                unet[_SHAPE_KEYS[name]], "none"):
            raise ConfigError(f"{key.strip()}: {text.strip()} does not match the model's "
                              f"{_SHAPE_KEYS[name]} {unet[_SHAPE_KEYS[name]]}; leave it unset "
                              "(eval bpd reads the data at the model's size and channels)")
    if config_path is not None:  # only its [data]: the shape follows the model
        data = to_dict(load_config(config_path).data)
        data = {k: v for k, v in data.items() if k not in _SHAPE_KEYS}
    else:
        stored = meta.get("run_config")
        data = stored.get("data") if isinstance(stored, dict) else None
        data = dict(data) if isinstance(data, dict) else {}
        overridden = {o.partition("=")[0].strip() for o in overrides}
        if not overridden & {"data.path", "data.name", "data.source"}:
            data = _stored_path(data, model_path)
    # The model's own configs complete the RunConfig (so its checks compare the data with this
    # model); eval samples nothing, hence num_steps 1.
    base = {"unet": unet, "schedule": meta["schedule_config"], "sample": {"num_steps": 1},
            "data": data}
    return load_config(None, overrides, base=base).data


def describe_data(cfg: DataConfig, dataset: Dataset) -> str:
    """What a data set is, in a few words: its source, where it is read from, its size."""
    what = {"folder": f"folder {cfg.path}",
            "torchvision": f"torchvision {cfg.name} ({cfg.path or './data'})",
            "hf": f"Hugging Face data set {cfg.name} (split {cfg.split})"}.get(
        cfg.source, "built-in shapes")
    return f"{what}, {len(dataset):,} images at {cfg.image_size}x{cfg.image_size}"


def generated_images(folder: str | os.PathLike, image_size: int | None = None
                     ) -> tuple[FolderImages, int]:
    """The generated images of ``diffunet eval fid`` as RGB at ``image_size`` (default: the
    shorter side of the first file in sorted order, ``000000.png`` of ``diffunet sample``)."""
    generated = FolderImages(folder, 1, 3)
    if image_size is None:
        with image_header(generated.files[0]) as im:
            image_size = min(im.size)
    generated.image_size = image_size  # the folder was scanned before the size was known
    return generated, image_size


def reference_images(reference: str | None, items: Sequence[str], image_size: int) -> Dataset:
    """The reference set of ``diffunet eval fid``: ``reference`` is a folder of images or a
    CONFIG.toml whose ``[data]`` is the set (``items``: more ``data.key=value`` overrides, or a
    CONFIG.toml), loaded as RGB at ``image_size``."""
    config_path, overrides = split_data_items(items)
    if reference is not None and Path(reference).expanduser().is_dir():
        if config_path or overrides:
            raise UsageError("--reference is a folder: CONFIG.toml and data.key=value "
                             "overrides do not apply to it")
        return FolderImages(reference, image_size, 3)
    if reference is not None:
        if config_path is not None:
            raise UsageError(f"two reference configs given ({reference}, {config_path})")
        if not Path(reference).expanduser().is_file():
            raise DataError(f"--reference {reference}: no such folder or config file; give a "
                            "folder of images or a CONFIG.toml")
        config_path = reference
    if config_path is None and not overrides:
        raise UsageError("no reference set: give --reference FOLDER or CONFIG.toml, or "
                         "data.key=value overrides (e.g. data.source=builtin)")
    # The size is image_size (the generated images'), the channels RGB: overrides of either
    # would only be checked against the config's UNet, then replaced.
    overrides = [o for o in overrides if not o.strip().startswith(("data.image_size",
                                                                   "data.channels"))]
    data_cfg: DataConfig = load_config(config_path, overrides).data
    return build_dataset(dataclasses.replace(data_cfg, image_size=image_size, channels=3))
