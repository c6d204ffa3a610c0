"""Post-hoc EMA snapshot files, and a run's EMA of any length rebuilt from them.

Training (``train.phema_sigma_rels``) writes, every ``train.phema_every`` steps and at the last
step, one file per profile into the run folder's ``phema/`` (through the run harness: at the
folder's descriptor, atomically and durably, so a kill loses no snapshot already written and
a half-written one is a ``.*.tmp`` leftover the next start removes)::

    phema/step0000100-sr0.05.safetensors    the sigma_rel 0.05 profile after step 100
    phema/step0000100-sr0.1.safetensors     ...

Each is a safetensors file of the profile's fp32 tensors (the names and shapes of the run's
``UNet.state_dict()``) that describes itself in its metadata: ``format``
(``diffunet.phema_snapshot``), ``format_version``, ``step``, ``sigma_rel``, ``gamma``, the
``run_id`` of the run that wrote it (random, made when the run starts, kept in its training
state), the ``unet_config``, and ``sha256``: the SHA-256 of those fields (canonical JSON) and
of the tensor bytes. So a snapshot from another run, one renamed to another step or profile,
one truncated or changed is refused in one line naming it (:func:`read_snapshot`,
:func:`load_snapshot`), never mixed into a reconstruction.

Storage rule: snapshots are never pruned (``train.keep_last`` prunes ``state/`` only): a
reconstruction at step S uses every snapshot up to S. A resumed run checks the snapshots up to
its state's step and removes those past it, which belong to steps it trains again (and
writes again), as ``log.jsonl`` is trimmed (:func:`check_for_resume`, :func:`trim_after`).

:func:`plan` fits a sigma_rel at a step from the snapshots' headers alone (the least squares
of :mod:`diffunet.phema`), refusing what the stored profiles cannot rebuild; :func:`rebuild`
then reads the snapshots it uses and sums them with the fit's weights (float64), and
:func:`model_bytes` makes an ordinary model file of the result.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (CarriedGuide, TensorFileHeader, first_nonfinite, load_model_file,
                         model_file_bytes, read_checked_tensor_file, read_metadata,
                         read_tensor_file_header, tensor_file_bytes)
from .config import RunConfig, UNetConfig, from_dict, run_config_from_dict, to_dict
from .errors import ConfigError, ModelFileError, UsageError
from .fileio import parse_json, read_json
from .formulations import make_schedule
from .phema import RESIDUAL_LIMIT, SIGMA_REL_MAX, gamma_of, reconstructable_range, solve_weights
from .resources import parameter_shapes
from .state import Folder, newest_state, state_name
from .unet import UNet
from .version import __version__

__all__ = ["FORMAT", "FORMAT_VERSION", "Plan", "SUBFOLDER", "Snapshot", "check_for_resume",
           "check_sigma_rel", "describe_storage", "find_snapshots", "load_snapshot",
           "model_bytes", "parse_name", "plan", "read_run", "read_snapshot", "rebuild",
           "run_guide",
           "snapshot_bytes", "snapshot_name", "trim_after"]

SUBFOLDER = "phema"
"""The run folder's sub-folder of snapshots."""
FORMAT = "diffunet.phema_snapshot"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step(?P<step>[0-9]{7,})-sr(?P<sr>[0-9][0-9.e-]{0,30})\.safetensors$")
_MAX_CONFIG = 1 << 20  # bytes of a run's config.json diffunet reads (it writes a few KB)
_GAMMA_TOLERANCE = 1e-9
_MAX_STEP = 2**63 - 1


def snapshot_name(step: int, sigma_rel: float) -> str:
    """``step0000100-sr0.05.safetensors``: the file of profile ``sigma_rel`` after ``step``."""
    return f"{state_name(step)}-sr{float(sigma_rel)!r}.safetensors"


def parse_name(name: str) -> tuple[int, float] | None:
    """(step, sigma_rel) of a snapshot's file name, None for any other name (leftovers of
    interrupted writes start with a dot and are not snapshots)."""
    m = _NAME.match(name)
    if m is None:
        return None
    try:
        sigma_rel = float(m["sr"])
    except ValueError:
        return None
    if f"{sigma_rel!r}" != m["sr"] or int(m["step"]) > _MAX_STEP:
        return None
    return int(m["step"]), sigma_rel


def _content(step: int, sigma_rel: float, gamma: float, run_id: str,
             unet: dict[str, Any]) -> bytes:
    return json.dumps({"step": step, "sigma_rel": sigma_rel, "gamma": gamma, "run_id": run_id,
                       "unet_config": unet}, sort_keys=True).encode("utf-8")


def _digest(content: bytes, data_sha256: str) -> str:
    return hashlib.sha256(content + b"\n" + data_sha256.encode("ascii")).hexdigest()


def snapshot_bytes(profile: dict[str, torch.Tensor], *, step: int, sigma_rel: float,
                   gamma: float, run_id: str, unet: UNetConfig) -> bytes:
    """The bytes of the snapshot file of ``profile`` (name -> fp32 tensor, the network's
    state-dict names) after ``step`` (see the module doc for its metadata)."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in profile.items()}
    unet_dict = to_dict(unet)
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
            "diffunet_version": __version__, "step": json.dumps(step),
            "sigma_rel": json.dumps(float(sigma_rel)), "gamma": json.dumps(float(gamma)),
            "run_id": json.dumps(run_id), "unet_config": json.dumps(unet_dict)}
    # the data region (the tensor bytes) does not depend on the metadata: serialise once to
    # hash it, then again with the digest in the metadata
    first = tensor_file_bytes(tensors, meta)
    n = struct.unpack("<Q", first[:8])[0]
    data_sha = hashlib.sha256(memoryview(first)[8 + n:]).hexdigest()
    del first
    meta["sha256"] = json.dumps(_digest(_content(step, float(sigma_rel), float(gamma), run_id,
                                                 unet_dict), data_sha))
    return tensor_file_bytes(tensors, meta)


def describe_storage(sigma_rels: Sequence[float], every: int, per_snapshot: int) -> str:
    """The run header's line: the profiles, the interval and what they cost on disk
    (``per_snapshot``: bytes of one profile's snapshot file)."""
    per_1000 = per_snapshot * len(sigma_rels) * 1000 / every
    shown = ", ".join(f"{s:g}" for s in sigma_rels)
    gammas = ", ".join(f"{gamma_of(s):.2f}" for s in sigma_rels)
    when = "every step" if every == 1 else f"every {every} steps and at the last"
    return (f"post-hoc EMA: sigma_rel {shown} (gamma {gammas}); a snapshot of each {when} "
            f"into {SUBFOLDER}/, {_size(per_snapshot)} each, {_size(per_1000)} per 1,000 steps")


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} bytes"


# ---------------------------------------------------------------------------------------------
# Reading a snapshot (anyone may have put a file there: checked like a model file)


@dataclass(frozen=True)
class Snapshot:
    """A snapshot file whose header was checked (:func:`read_snapshot`)."""

    path: Path
    step: int
    sigma_rel: float
    gamma: float
    run_id: str
    unet_config: dict[str, Any]
    sha256: str
    """The digest its metadata records (of the fields above and the tensor bytes)."""


def _fix(path: Path) -> str:
    return (f"move it out of {path.parent} (a reconstruction then does without it), or run "
            "diffunet ema on the run that wrote it")


def _damaged(path: Path, problem: str) -> ModelFileError:
    return ModelFileError(f"{path}: {problem}; the post-hoc EMA snapshot is damaged or not "
                          f"this run's: {_fix(path)}")


def _rewrap(path: Path, e: ModelFileError) -> ModelFileError:
    """A model-file reader's refusal of a snapshot, with the snapshot's own fix."""
    text = str(e).rsplit("; ", 1)[0]
    text = text.removeprefix(f"{path}: ").removeprefix(f"{path} ")
    return _damaged(path, text)


_META_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "step": int, "sigma_rel": (int, float), "gamma": (int, float), "run_id": str,
    "unet_config": dict, "sha256": str}


def _meta(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    """The checked metadata of a snapshot's header."""
    if raw.get("format") != FORMAT:
        raise _damaged(path, f"it is not a post-hoc EMA snapshot (its metadata has no format "
                             f"{FORMAT!r})")
    version = raw.get("format_version", "")
    if not re.fullmatch(r"[0-9]{1,9}", version):
        raise _damaged(path, f"malformed format_version {version[:20]!r}")
    if int(version) > FORMAT_VERSION:
        raise ModelFileError(f"{path} has snapshot format version {version}, newer than this "
                             f"diffunet {__version__} reads ({FORMAT_VERSION}); upgrade diffunet")
    meta: dict[str, Any] = {}
    for key, kind in _META_SCHEMA.items():
        if key not in raw:
            raise _damaged(path, f"its metadata has no {key}")
        try:
            value = parse_json(raw[key])
        except (ValueError, UnicodeError, RecursionError):
            raise _damaged(path, f"metadata {key} is not valid JSON") from None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _damaged(path, f"metadata {key} is not a {getattr(kind, '__name__', 'number')}")
        meta[key] = value
    if not 1 <= meta["step"] <= _MAX_STEP:
        raise _damaged(path, f"metadata step {meta['step']} is not a step (1 or more)")
    s, g = float(meta["sigma_rel"]), float(meta["gamma"])
    if not (math.isfinite(s) and 0 < s <= SIGMA_REL_MAX and math.isfinite(g)):
        raise _damaged(path, f"sigma_rel {s} / gamma {g} are no power-function profile")
    if abs(g - gamma_of(s)) > _GAMMA_TOLERANCE * (1 + abs(g)):
        raise _damaged(path, f"its gamma {g} is not sigma_rel {s}'s ({gamma_of(s)})")
    if not re.fullmatch(r"[0-9a-f]{1,64}", meta["run_id"]):
        raise _damaged(path, "its run_id is not a run id")
    if not re.fullmatch(r"[0-9a-f]{64}", meta["sha256"]):
        raise _damaged(path, "its sha256 is not a SHA-256 digest")
    return meta


def _fit_problem(header: TensorFileHeader, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """How a snapshot's tensors differ from the network's (fp32, same names and shapes)."""
    have = header.tensors
    missing = sorted(set(shapes) - set(have))
    unexpected = sorted(set(have) - set(shapes))
    wrong = [f"{k} {list(have[k][1])} vs {list(v)}" for k, v in shapes.items()
             if k in have and have[k][1] != v]
    dtypes = sorted({str(d).removeprefix("torch.") for d, _ in have.values()} - {"float32"})
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0][:60]!r})")
    if wrong:
        parts.append(f"wrong shape {len(wrong)} (e.g. {wrong[0]})")
    if dtypes:
        parts.append(f"dtype {dtypes[0]} where snapshots are float32")
    return "; ".join(parts) or None


def _check(path: Path, header: TensorFileHeader, shapes: dict[str, tuple[int, ...]]
           ) -> dict[str, Any]:
    meta = _meta(path, header.metadata)
    named = parse_name(path.name)
    if named is None or named != (meta["step"], float(meta["sigma_rel"])):
        said = f"step {meta['step']}, sigma_rel {float(meta['sigma_rel'])!r}"
        raise _damaged(path, f"its name does not say what its metadata does ({said}: renamed? "
                             f"it would be {snapshot_name(meta['step'], meta['sigma_rel'])})")
    problem = _fit_problem(header, shapes)
    if problem:
        raise _damaged(path, f"its tensors do not fit the run's network: {problem}")
    return meta


def read_snapshot(path: str | Path, shapes: dict[str, tuple[int, ...]]) -> Snapshot:
    """Read and check a snapshot's header (no tensor byte is read): a safetensors file of
    this format whose metadata is whole and consistent (gamma is sigma_rel's; its name says
    its step and sigma_rel) and whose tensors are the fp32 tensors ``shapes`` names (the run's
    network). Anything else is one :class:`ModelFileError` line naming the file."""
    path = Path(path)
    try:
        header = read_tensor_file_header(path)
    except ModelFileError as e:
        raise _rewrap(path, e) from None
    meta = _check(path, header, shapes)
    return Snapshot(path, meta["step"], float(meta["sigma_rel"]), float(meta["gamma"]),
                    meta["run_id"], meta["unet_config"], meta["sha256"])


def load_snapshot(snap: Snapshot, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors of a checked snapshot, read once and checked against its recorded digest
    (a file changed since :func:`read_snapshot` read its header is refused too)."""
    path = snap.path

    def check(header: TensorFileHeader) -> None:
        meta = _check(path, header, shapes)
        if meta["sha256"] != snap.sha256 or meta["run_id"] != snap.run_id:
            raise _damaged(path, "it changed while being read")

    try:
        tensors, _, data_sha = read_checked_tensor_file(path, check)
    except ModelFileError as e:
        if "post-hoc EMA snapshot" in str(e):
            raise
        raise _rewrap(path, e) from None
    content = _content(snap.step, snap.sigma_rel, snap.gamma, snap.run_id, snap.unet_config)
    if _digest(content, data_sha) != snap.sha256:
        raise _damaged(path, "its content does not match the SHA-256 it records (changed or "
                             "corrupted since it was written)")
    return tensors


def find_snapshots(folder: Path, upto: int | None = None) -> list[tuple[int, float, Path]]:
    """(step, sigma_rel, path) of every file named as a snapshot in ``folder`` (none if it
    does not exist), oldest first; ``upto``: only those of steps up to it."""
    try:
        names = [p.name for p in folder.iterdir()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        parsed = parse_name(name)
        if parsed is not None and (upto is None or parsed[0] <= upto):
            found.append((*parsed, folder / name))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# Training: resume


def check_for_resume(folder: Path, run_id: str, unet: UNetConfig, step: int) -> int:
    """Before a resumed run writes anything: check every snapshot in ``folder`` (the run's
    ``phema/``) up to ``step``, the state's, as :func:`load_snapshot` does (header, this run's
    ``run_id``, the digest), so damage is refused in one line now rather than found by a later
    ``diffunet ema``. Returns how many were checked."""
    shapes = parameter_shapes(unet)
    found = find_snapshots(folder, step)
    for _, _, path in found:
        snap = read_snapshot(path, shapes)
        if snap.run_id != run_id:
            raise _another_run(path, snap.run_id, run_id)
        load_snapshot(snap, shapes)
    return len(found)


def trim_after(folder: Folder, step: int) -> list[str]:
    """Remove from the open ``phema/`` folder the snapshots of steps past ``step`` (a resumed
    run trains them again and writes them again; a fresh start in the folder: all of them), at
    the folder's descriptor. Returns their names."""
    gone = []
    for name in sorted(folder.names()):
        parsed = parse_name(name)
        if parsed is not None and parsed[0] > step:
            folder.remove(name)
            gone.append(name)
    return gone


def _another_run(path: Path, theirs: str, ours: str) -> ModelFileError:
    return ModelFileError(f"{path} was written by another run (run id {theirs}, this run's is "
                          f"{ours}); {_fix(path)}")


# ---------------------------------------------------------------------------------------------
# Rebuilding an EMA of any length


@dataclass(frozen=True)
class Plan:
    """A reconstruction decided from the snapshots' headers: the EMA of ``sigma_rel``
    (exponent ``gamma``) at ``step``, as ``sum_i weights[i] * snapshots[i]``, whose profile is
    the target's within the relative ``residual``."""

    run_dir: Path
    config: RunConfig
    run_id: str
    sigma_rel: float
    gamma: float
    step: int
    snapshots: tuple[Snapshot, ...]
    weights: tuple[float, ...]
    residual: float

    def used(self) -> list[dict[str, Any]]:
        """Each snapshot's step, sigma_rel and weight (for messages and metadata)."""
        return [{"step": s.step, "sigma_rel": s.sigma_rel, "weight": w}
                for s, w in zip(self.snapshots, self.weights)]


def read_run(run_dir: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    """A training run's config (its ``config.json``) and that file's plain data; a path that
    is not a run folder is one :class:`UsageError` line."""
    run = Path(run_dir)
    if not run.exists():
        raise UsageError(f"{run} does not exist; give the folder of a `diffunet train` run (its "
                         "--out-dir)")
    if not run.is_dir():
        raise UsageError(f"{run} is a file, not a run folder; give the folder of a `diffunet "
                         "train` run (its --out-dir)")
    path = run / "config.json"
    if not path.exists():
        raise UsageError(f"{run} is not a run folder (it has no config.json); give the folder of "
                         "a `diffunet train` run (its --out-dir)")
    try:
        data = read_json(path, _MAX_CONFIG)
    except (OSError, ValueError, RecursionError) as e:
        raise ModelFileError(f"{path} cannot be read ({' '.join(str(e).split())[:160]}); it is "
                             "not a diffunet run's config") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} is not a JSON object; it is not a diffunet run's config")
    try:
        return run_config_from_dict(data), data
    except ConfigError as e:
        raise ModelFileError(f"{path} is not a diffusion run's config ({e})") from None


def _state_run_id(run: Path) -> str | None:
    """The run id the newest training state records (None: no state, or none recorded)."""
    state = newest_state(run / "state")
    if state is None:
        return None
    try:
        data = read_json(state / "trainer.json", 64 << 20)
    except (OSError, ValueError, RecursionError):
        return None
    value = data.get("run_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def _no_snapshots(run: Path, cfg: RunConfig, raw: dict[str, Any]) -> UsageError:
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    if "phema_sigma_rels" not in train:
        why = "it was trained by a diffunet without post-hoc EMA"
    elif not cfg.train.phema_sigma_rels:
        why = "it was trained with train.phema_sigma_rels = []"
    else:
        why = (f"it wrote none yet (the first comes at step {cfg.train.phema_every}), or they "
               f"were moved out of {run / SUBFOLDER}")
    return UsageError(f"{run} has no post-hoc EMA snapshots ({why}); a run trained with "
                      "train.phema_sigma_rels (the default [0.05, 0.10]) keeps them")


def check_sigma_rel(sigma_rel: float) -> float:
    """``sigma_rel`` as a float in (0, :data:`~diffunet.phema.SIGMA_REL_MAX`], else one
    :class:`UsageError` line."""
    try:
        value = float(sigma_rel)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= SIGMA_REL_MAX):
        raise UsageError(f"sigma_rel {sigma_rel} is no EMA length: a power-function EMA's "
                         f"sigma_rel is a number in (0, {SIGMA_REL_MAX:.4f}] (the width of its "
                         "profile relative to the training time, e.g. 0.05)")
    return value


def plan(run_dir: str | Path, sigma_rels: Sequence[float], step: int | None = None
         ) -> list[Plan]:
    """Fit each of ``sigma_rels`` at ``step`` (None: the newest snapshot's; else the newest
    snapshot at or before it) from the snapshots' headers, all before any tensor is read:
    a run folder without snapshots, a step no snapshot reaches, a snapshot that is damaged,
    foreign or renamed, and a sigma_rel the stored profiles cannot rebuild within
    :data:`~diffunet.phema.RESIDUAL_LIMIT` (the message gives the range they can) are each
    one line (:class:`UsageError` / :class:`ModelFileError`)."""
    values = [check_sigma_rel(s) for s in sigma_rels]
    if step is not None and (isinstance(step, bool) or not 0 <= step <= _MAX_STEP):
        raise UsageError(f"step {step} is not a training step (a non-negative integer)")
    run = Path(run_dir)
    cfg, raw = read_run(run)
    folder = run / SUBFOLDER
    every = find_snapshots(folder)
    if not every:
        raise _no_snapshots(run, cfg, raw)
    found = [f for f in every if step is None or f[0] <= step]
    if not found:
        raise UsageError(f"no post-hoc EMA snapshot of {run} is at or before step {step} (the "
                         f"first is of step {every[0][0]}); ask for step {every[0][0]} or later")
    shapes = parameter_shapes(cfg.unet)
    snaps = [read_snapshot(path, shapes) for _, _, path in found]
    expected = _state_run_id(run)
    if expected is None:  # no state (a run killed before its first save): the usual id
        counts = collections.Counter(s.run_id for s in snaps)
        top = max(counts.values())
        expected = next(s.run_id for s in reversed(snaps) if counts[s.run_id] == top)
    for s in snaps:
        if s.run_id != expected:
            raise _another_run(s.path, s.run_id, expected)
        try:  # a snapshot of an earlier release lacks later fields: their defaults fill them
            same = from_dict(UNetConfig, s.unet_config, "unet") == cfg.unet
        except ConfigError:
            same = False
        if not same:
            raise _damaged(s.path, "its network config is not the run's")
    target = max(s.step for s in snaps)
    points = [(s.gamma, s.step) for s in snaps]
    used = snaps
    plans = []
    for value in values:
        gamma = gamma_of(value)
        exact = [i for i, s in enumerate(used) if s.step == target and s.sigma_rel == value]
        if exact:  # a stored profile: itself, bit for bit
            weights = tuple(1.0 if i == exact[0] else 0.0 for i in range(len(used)))
            residual = 0.0
        else:
            fit = solve_weights(points, gamma, target)
            weights, residual = fit.weights, fit.residual
        if residual > RESIDUAL_LIMIT:
            span = reconstructable_range(points, target)
            can = (f"these rebuild sigma_rel {span[0]:.3f} to {span[1]:.3f}" if span else
                   "these rebuild no sigma_rel")
            stored = ", ".join(f"{s:g}" for s in sorted({s.sigma_rel for s in used}))
            raise UsageError(
                f"sigma_rel {value:g} cannot be rebuilt at step {target} from the {len(used)} "
                f"snapshots of sigma_rel {stored} up to it (the fit is {residual:.1%} off its "
                f"profile, over the {RESIDUAL_LIMIT:.0%} limit); {can} (snapshots closer "
                "together, a smaller train.phema_every, widen the range)")
        plans.append(Plan(run, cfg, expected, value, gamma, target, tuple(used), weights,
                          residual))
    return plans


def rebuild(p: Plan) -> dict[str, torch.Tensor]:
    """The weights ``p`` describes: each snapshot it uses read once (checked against its
    digest) and summed with its weight in float64, returned as fp32 in the network's
    order. Weights that come out non-finite are one :class:`ModelFileError` line."""
    shapes = parameter_shapes(p.config.unet)
    total = {k: torch.zeros(v, dtype=torch.float64) for k, v in shapes.items()}
    for snap, weight in zip(p.snapshots, p.weights):
        if weight == 0.0:
            continue
        tensors = load_snapshot(snap, shapes)
        for k in total:
            total[k].add_(tensors[k].double(), alpha=weight)
        del tensors
    out = {k: v.float() for k, v in total.items()}
    bad = first_nonfinite(out)
    if bad is not None:
        raise ModelFileError(f"the reconstruction of sigma_rel {p.sigma_rel:g} at step "
                             f"{p.step} holds non-finite weights ({bad[0]}): a snapshot holds "
                             "NaN or inf (a diverged run?); ask for an earlier --step")
    return out


_MODEL_FILE = re.compile(r"model_step([0-9]{1,18})\.safetensors")


def run_guide(p: Plan) -> tuple[CarriedGuide, Path] | None:
    """The guide the run's rebuilt EMA of ``p`` carries, and the model file it is read from:
    the carried guide (``train.guide_at``: the run's classic EMA of an earlier step) of the
    newest ``RUN/weights/model_step*.safetensors`` at or before ``p.step`` that carries one;
    None when none does. Its step is always before ``p.step`` (a model file carries the guide
    only after the guide's own step), so the rebuilt EMA is never its own guide. The file is
    read as any model file is (a damaged or swapped guide is one :class:`ModelFileError`
    line), and a guide of another network than the run's is refused."""
    folder = p.run_dir / "weights"
    try:
        names = [e.name for e in os.scandir(folder)]
    except (FileNotFoundError, NotADirectoryError):
        return None
    steps = sorted(((int(m.group(1)), name) for name in names
                    if (m := _MODEL_FILE.fullmatch(name)) and int(m.group(1)) <= p.step),
                   reverse=True)
    for _, name in steps:
        path = folder / name
        if "guide" not in read_metadata(path):
            continue
        guide = load_model_file(path).guide
        assert guide is not None
        if guide.net.config != p.config.unet or guide.step >= p.step:
            raise ModelFileError(f"{path}: its carried guide (the EMA of step {guide.step}) is "
                                 "not this run's earlier network; the weights/ folder is "
                                 "damaged or holds another run's file")
        return guide, path
    return None


def model_bytes(p: Plan, weights: dict[str, torch.Tensor],
                guide: CarriedGuide | None = None) -> bytes:
    """An ordinary model file (:func:`diffunet.checkpoint.model_file_bytes`, as the run's
    ``weights/*.safetensors``) of the rebuilt ``weights``, its metadata saying how it was made:
    ``step``, ``run_config``, ``class_names`` (from the run's newest model file, when it has
    them) and ``phema`` (sigma_rel, gamma, step, residual, run id, the snapshots used); with
    ``guide`` (:func:`run_guide`) it carries that guide."""
    net = UNet(p.config.unet)
    net.load_state_dict(weights)
    extra: dict[str, Any] = {"step": p.step, "run_config": to_dict(p.config)}
    names = _class_names(p.run_dir)
    if names:
        extra["class_names"] = names
    extra["phema"] = {"sigma_rel": p.sigma_rel, "gamma": p.gamma, "step": p.step,
                      "residual": p.residual, "run_id": p.run_id,
                      "snapshots": [[u["step"], u["sigma_rel"], u["weight"]] for u in p.used()]}
    return model_file_bytes(net, make_schedule(p.config.schedule), extra=extra, guide=guide)


def _class_names(run: Path) -> list[str] | None:
    files = sorted((run / "weights").glob("model_step*.safetensors"))
    if not files:
        return None
    try:
        names = read_metadata(files[-1]).get("class_names")
    except ModelFileError:
        return None
    return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None
