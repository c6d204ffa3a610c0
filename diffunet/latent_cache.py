"""The latent cache: a data set encoded once through a VAE (:class:`~diffunet.data_space.LatentSpace`)
into sharded safetensors files of the posterior's mean and std, so that latent training never
runs the encoder.

A cache folder holds :data:`MANIFEST` (JSON) and shards ``shard-00000.safetensors``, ... of
:data:`SHARD_SIZE` images each. A shard holds ``mean`` and ``std``, each (n, c, h, w) float16,
unscaled (the VAE's own latents), ``labels`` (n,) int64 (-1: unlabelled), and with
``data.random_flip`` also ``mean_flip`` and ``std_flip``: the posterior of the mirrored image. A latent's mirror is not the mirrored image's
latent (the encoder is not equivariant to flips), so flipping a cached latent would train on
latents the VAE never produces.

The manifest names what the cache was made from (:func:`cache_record`: the data, the VAE by its
id and the hashes of its ``config.json`` and weights, the scaling, the flip setting, the shard
size) and each finished shard's name, image range and SHA-256. A folder whose manifest names
anything else is never reused or written over (one line naming the first difference); a shard
whose bytes do not hash to the manifest's (damaged, truncated, swapped) is refused in one line.

The folder follows the output-folder rule (:func:`~diffunet.outputs.claim_folder`): locked while
encoding, a folder holding files of the user's is refused, every shard written atomically, and
the manifest rewritten after each shard, so a killed encode loses no finished shard and a re-run
encodes only the shards still missing.

Training draws z = mean + std * noise (:meth:`LatentCache.draw`) from the caller's generator, so
resume stays exact.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .checkpoint import read_tensor_file, tensor_file_bytes
from .config import DataConfig, RunConfig, VaeConfig
from .data import build_dataset, image_folder
from .data_space import DataSpace, LatentSpace, vae_identity
from .errors import FolderError, ModelFileError, UsageError, reported_error
from .evaluation import default_cache_dir
from .fileio import first_line, read_json, regular_file_sha256
from .outputs import OutputFolder, claim_folder, join_folder
from .runs import gather_objects

__all__ = ["SHARD_SIZE", "MANIFEST", "FORMAT", "FORMAT_VERSION", "shard_name", "cache_record",
           "cache_folder", "encode_dataset", "LatentCache"]

SHARD_SIZE = 1024
"""Images per shard: at 256x256 with an 8x VAE a shard is 1024 x 4 x 32 x 32 x 2 bytes x 2
tensors = 16 MiB (x2 with flips), small enough to hash and load at once."""
MANIFEST = "latent_cache.json"
FORMAT = "diffunet-latent-cache"
FORMAT_VERSION = 1
_LABEL = "data.latent_cache"
_MAX_MANIFEST_BYTES = 64 << 20  # about 150 bytes a shard: room for 400k shards


def shard_name(k: int) -> str:
    """The file name of shard ``k`` (images k * SHARD_SIZE onwards)."""
    return f"shard-{k:05d}.safetensors"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint(value: Any) -> str:
    return _sha256_bytes(json.dumps(value, sort_keys=True).encode())


# ---------------------------------------------------------------------------------------------
# What a cache is made from


def _data_record(data: DataConfig, num_images: int) -> dict[str, Any]:
    """What decides the images: the settings build_dataset reads, and for a folder the image
    files' relative paths and sizes (so added, removed or replaced images are other data)."""
    settings: dict[str, Any] = {"source": data.source, "image_size": data.image_size,
                                "channels": data.channels}
    if data.source == "builtin":
        settings["builtin_size"] = data.builtin_size
    elif data.source == "folder":
        assert data.path is not None
        root = Path(data.path).expanduser().resolve()
        files = image_folder(root, "data.path", data.image_size or 0)[0]
        settings.update(path=str(root), class_folders=data.class_folders,
                        files=_fingerprint([[str(p), (root / p).stat().st_size] for p in files]))
    else:  # torchvision / hf: a named set, read from wherever its cache is
        settings.update(name=data.name, split=data.split, image_column=data.image_column,
                        label_column=data.label_column)
    return {**{k: v for k, v in settings.items() if k != "files"}, "num_images": num_images,
            "fingerprint": _fingerprint(settings)}


def cache_record(data: DataConfig, vae: VaeConfig, space: LatentSpace, num_images: int,
                 class_names: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """What a cache of ``num_images`` images of ``data`` (labelled with ``class_names``, None:
    unlabelled) encoded by ``space`` (loaded from ``vae``) is made from: ``data``, ``vae`` and
    ``settings`` (the scaling, the flips, the shard size, the latent shape). Two caches are
    interchangeable iff their records are equal."""
    assert data.image_size is not None and data.channels is not None, "a RunConfig's data"
    c, h, w = space.state_shape(data.channels, data.image_size)
    settings = {"scaling_factor": space.scaling_factor, "shift_factor": space.shift_factor,
                "random_flip": data.random_flip, "shard_size": SHARD_SIZE,
                "dtype": "float16", "latent_shape": [c, h, w]}
    record = _data_record(data, num_images)
    record["class_names"] = None if class_names is None else [str(n) for n in class_names]
    return {"data": record, "vae": vae_identity(vae),
            "settings": settings}


def cache_folder(data: DataConfig, record: dict[str, Any]) -> Path:
    """Where the cache of ``record`` lives: ``data.latent_cache`` when set; else beside an image
    folder (``<folder>.latents-<key>``) or, for a named set, under the user cache
    (``~/.cache/diffunet/latents/<key>``), where ``key`` is the record's fingerprint, so a
    default folder made from other data or another VAE is another folder."""
    if data.latent_cache is not None:
        return Path(data.latent_cache).expanduser()
    key = _fingerprint(record)[:16]
    if data.source == "folder":
        assert data.path is not None
        root = Path(data.path).expanduser().resolve()
        return root.parent / f"{root.name}.latents-{key}"
    return default_cache_dir() / "latents" / key


def _difference(old: dict[str, Any], new: dict[str, Any], where: str = "") -> Optional[str]:
    """The first key (dotted) whose value differs between two records, with both values."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _difference(a, b, f"{where}{key}.")
            if found:
                return found
        elif a != b:
            return f"{where}{key} is {_short(a)} there, {_short(b)} here"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------
# Checking a cache folder's manifest and shards


_ENTRY_KEYS = {"name": str, "start": int, "stop": int, "sha256": str}


def _check_manifest(doc: Any, folder: Path) -> dict[str, Any]:
    """The manifest ``doc`` of ``folder`` if it has the cache's shape, else one line."""
    def bad(problem: str) -> FolderError:
        return FolderError(f"{_LABEL}: {folder / MANIFEST} is not a readable latent cache "
                           f"manifest ({problem}); move the folder away, or choose another "
                           f"{_LABEL}")

    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    if doc.get("format") != FORMAT or not isinstance(doc.get("format_version"), int):
        raise bad(f"format {_short(doc.get('format'))}")
    if doc["format_version"] > FORMAT_VERSION:
        raise FolderError(f"{_LABEL}: {folder} was written by a newer diffunet (cache format "
                          f"{doc['format_version']}, this one reads {FORMAT_VERSION}); upgrade")
    for key in ("data", "vae", "settings"):
        if not isinstance(doc.get(key), dict):
            raise bad(f"no {key} record")
    shards = doc.get("shards")
    if not isinstance(shards, list):
        raise bad("no shard list")
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict) or any(not isinstance(entry.get(k), t)
                                              for k, t in _ENTRY_KEYS.items()):
            raise bad(f"shards[{i}] is not {{name, start, stop, sha256}}")
    return doc


def _shard_problem(path: Path, entry: dict[str, Any]) -> Optional[str]:
    """Why the shard file at ``path`` is not the one ``entry`` records, or None."""
    try:
        digest = regular_file_sha256(path, follow_symlinks=False)
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError) as e:  # a link, a folder, a FIFO, unreadable
        return f"cannot be read ({first_line(e)})"
    if digest != entry["sha256"]:
        return ("does not hash to the SHA-256 the manifest records (damaged, truncated or "
                "replaced)")
    return None


def _refuse_shard(path: Path, problem: str) -> ModelFileError:
    return ModelFileError(f"{_LABEL}: {path} {problem}; remove it and encode again (only that "
                          "shard is re-encoded)")


def _expected_entries(num_images: int) -> list[tuple[str, int, int]]:
    """(name, start, stop) of every shard of a cache of ``num_images`` images."""
    return [(shard_name(k), k * SHARD_SIZE, min(num_images, (k + 1) * SHARD_SIZE))
            for k in range(math.ceil(num_images / SHARD_SIZE))]


# ---------------------------------------------------------------------------------------------
# Encoding


def _claim(folder: Path, names: list[str]) -> OutputFolder:
    # the cache's config key in every refusal, and no --overwrite: a cache never writes beside
    # the user's files
    return claim_folder(folder, command="latent cache", manifest=MANIFEST, format=FORMAT,
                        planned=names, format_version=FORMAT_VERSION, noun="latent cache files",
                        label=_LABEL, can_overwrite=False)


def _encode_images(space: LatentSpace, dataset: Dataset, start: int, stop: int,
                   flip: bool) -> dict[str, Tensor]:
    """Images start..stop-1 -> the shard's tensors, each (n, c, h, w) float16 on the CPU."""
    items = [dataset[i] for i in range(start, stop)]
    images = torch.stack([image for image, _ in items])  # (n, C, S, S)
    mean, std = space.posterior(images)
    out = {"mean": mean, "std": std}
    labels = torch.tensor([int(label) for _, label in items], dtype=torch.int64)  # -1: none
    if flip:  # the mirrored images' own posterior (see the module docstring)
        out["mean_flip"], out["std_flip"] = space.posterior(images.flip(-1))
    return {**{k: v.to("cpu", torch.float16).contiguous() for k, v in out.items()},
            "labels": labels}


def _gather(state: Any, item: Any) -> list[Any]:
    """``item`` of every process, in rank order (one process: ``[item]``)."""
    if state is None or state.num_processes == 1:
        return [item]
    return gather_objects(item)


def _same_outcome(state: Any, error: Optional[BaseException]) -> None:
    """Raise on every process if ``error`` happened on any: the failing process its own, the
    others the same type and message."""
    reports = _gather(state, None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    for report in reports:
        if report is not None:
            raise reported_error(*report)


def _recorded_shards(out: OutputFolder, folder: Path, record: dict[str, Any],
                     entries: list[tuple[str, int, int]]) -> dict[str, dict[str, Any]]:
    """The finished shards a previous encode recorded in ``out``'s manifest and left intact;
    a manifest of another record or a damaged recorded shard is one line."""
    done: dict[str, dict[str, Any]] = {}
    if out.previous is None:
        return done
    previous = _check_manifest(out.previous, folder)
    diff = _difference({k: previous[k] for k in record}, record)
    if diff is not None:
        raise FolderError(f"{_LABEL}: {folder} holds a latent cache of other data, another VAE "
                          f"or other settings ({diff}); it is never reused or written over: "
                          f"choose another {_LABEL}, or remove it")
    expected = {name: (a, b) for name, a, b in entries}
    for entry in previous["shards"]:
        if expected.get(entry["name"]) != (entry["start"], entry["stop"]):
            raise _refuse_shard(folder / entry["name"], "is not a shard of this cache's layout")
        if entry["name"] not in out.present:
            continue  # removed by the user: encoded again
        problem = _shard_problem(folder / entry["name"], entry)
        if problem:
            raise _refuse_shard(folder / entry["name"], problem)
        done[entry["name"]] = entry
    return done


def encode_dataset(cfg: RunConfig, space: LatentSpace, *, dataset: Optional[Dataset] = None,
                   on_shard: Optional[Callable[[int], None]] = None,
                   on_start: Optional[Callable[[Path, int, int], None]] = None,
                   state: Any = None) -> Path:
    """Encode ``cfg.data``'s data set (``dataset``: it, already built) through ``space``
    (loaded from ``cfg.vae``) into its cache folder (:func:`cache_folder`), resuming a
    cache of the same record, and return the folder. ``on_shard(k)`` is called (main process)
    after shard k is written and recorded (progress; a test's simulated kill), and
    ``on_start(folder, missing, total)`` (main process) once it knows how many of the
    ``total`` shards it must encode.

    ``state`` (an Accelerate ``PartialState``, under ``accelerate launch``) splits the shards
    across its processes: the main process claims the folder and keeps the manifest, each
    process encodes and writes every ``num_processes``-th missing shard, and the main process
    records each round's shards once all of them are written (a kill loses only the round in
    flight). Every process must call it, with the same data.

    Refused in one line (on every process): a folder holding other files of the user's, a
    manifest of another record (naming the first difference), a recorded shard that fails its
    hash."""
    data = cfg.data
    if dataset is None:
        dataset = build_dataset(data)
    n = len(dataset)  # type: ignore[arg-type]
    if n < 1:
        raise UsageError("data: the data set is empty; there is nothing to encode")
    record = cache_record(data, cfg.vae, space, n, getattr(dataset, "class_names", None))
    folder = cache_folder(data, record)
    entries = _expected_entries(n)
    names = [name for name, _, _ in entries]
    main = state is None or state.is_main_process
    rank, world = (0, 1) if state is None else (state.process_index, state.num_processes)
    out: Optional[OutputFolder] = None
    done: dict[str, dict[str, Any]] = {}

    def write_manifest() -> None:
        assert out is not None
        shards = [done[name] for name in names if name in done]
        out.write_manifest({"format": FORMAT, "format_version": FORMAT_VERSION, **record,
                            "shards": shards}, names)

    plan: Any = None
    error: Optional[BaseException] = None
    if main:
        try:
            out = _claim(folder, names)
            done = _recorded_shards(out, folder, record, entries)
            out.remove_leftovers()  # temporaries of a killed write
            write_manifest()  # lists every shard name before the first is written (output rule)
            plan = (out.identity, [k for k, name in enumerate(names) if name not in done])
            if on_start is not None:
                on_start(folder, len(plan[1]), len(names))
        except Exception as e:  # raised on every process by _same_outcome
            error = e
    try:
        _same_outcome(state, error)
        identity, todo = _gather(state, plan)[0]
        writer = out if main else join_folder(folder, identity, names)
        try:
            for first in range(0, len(todo), world):
                k = todo[first + rank] if first + rank < len(todo) else None
                entry, failed = None, None
                if k is not None:
                    name, start, stop = entries[k]
                    try:
                        tensors = _encode_images(space, dataset, start, stop, data.random_flip)
                        # no metadata: safetensors writes a metadata map in hash order, and the
                        # same images should give the same bytes (and SHA-256) on every machine
                        # and run; the image range is the manifest's
                        blob = tensor_file_bytes(tensors, {})
                        writer.write_file(name, blob, durable=True)  # atomic: a kill leaves a
                        entry = {"name": name, "start": start, "stop": stop,  # temporary
                                 "sha256": _sha256_bytes(blob)}
                    except Exception as e:  # raised on every process below
                        failed = e
                _same_outcome(state, failed)
                for got in _gather(state, (k, entry)):
                    if got[0] is not None and main:
                        done[got[1]["name"]] = got[1]
                if main:
                    write_manifest()  # only now are the round's shards finished
                    if on_shard is not None:
                        for got_k in todo[first:first + world]:
                            on_shard(got_k)
        finally:
            if writer is not out:
                writer.close()
    finally:
        if out is not None:
            out.close()
    return folder


def training_set(cfg: RunConfig, space: DataSpace, dataset: Dataset,
                 on_main: Callable[[Callable[[], Any]], Any],
                 say: Callable[[str], None] = lambda msg: None
                 ) -> tuple[Dataset, Optional[str]]:
    """The data set a run of ``cfg`` trains on in the data ``space``, made from the images'
    ``dataset``, and a line for the run header saying what was done (None: nothing to say).
    Pixels: the images themselves. Latents: the data set's latent cache, which the main process
    encodes where it is missing or unfinished (reusing a finished cache of this data, VAE and
    settings; one line refusing a cache of anything else); then every process opens it.
    ``on_main(fn)`` runs ``fn`` on the main process only and returns its result everywhere;
    ``say`` hears, before an encode starts, what it will encode (it can take minutes)."""
    if not isinstance(space, LatentSpace):
        return dataset, None

    def encode() -> tuple[Path, int]:
        written: list[int] = []
        def started(folder: Path, missing: int, total: int) -> None:
            if missing:
                say(f"latent cache: encoding {missing} of {total} shards of {len(dataset):,} "
                    f"images through {cfg.vae.path} into {folder} (once: later runs reuse it)")

        where = encode_dataset(cfg, space, dataset=dataset, on_shard=written.append,
                               on_start=started)
        return where, len(written)

    began = time.perf_counter()
    folder, count = on_main(encode)
    seconds = time.perf_counter() - began
    record = cache_record(cfg.data, cfg.vae, space, len(dataset),  # type: ignore[arg-type]
                          getattr(dataset, "class_names", None))
    cache = LatentCache(folder, record)
    c, h, w = record["settings"]["latent_shape"]
    shards = len(cache.manifest["shards"])
    done = f"encoded {count} of {shards} shards in {seconds:.0f} s" if count else "reused"
    mirrors = " and their mirrors" if cache.flips else ""
    return cache, (f"latents: {c}x{h}x{w} from {cfg.vae.path} (x0 = (z - "
                   f"{space.shift_factor:g}) x {space.scaling_factor:g}); latent cache "
                   f"{folder} ({len(cache):,} images{mirrors}): {done}")


# ---------------------------------------------------------------------------------------------
# Reading


class LatentCache(Dataset):
    """A finished cache folder, read-only, and a training data set (:meth:`__getitem__`): the posterior of image ``index`` by :meth:`get` (a
    batch by :meth:`batch`), a latent drawn from it by :meth:`draw`. Each shard is hash-checked
    when first loaded and then kept in memory (the cache's size on disk: training reads in
    random order, which would reload a shard per image otherwise)."""

    in_memory = True
    """Its shards are held in memory once read: a training loader reads it in its own process
    (a worker would hold another copy)."""

    def __init__(self, folder: str | Path, record: Optional[dict[str, Any]] = None) -> None:
        """Open ``folder``; with ``record`` (:func:`cache_record` of the run), refuse a cache
        made from anything else, in one line naming the difference."""
        self.folder = Path(folder).expanduser()
        try:
            doc = read_json(self.folder / MANIFEST, _MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            raise FolderError(f"{_LABEL}: {self.folder} holds no {MANIFEST}; encode the data "
                              "set first") from None
        except (OSError, ValueError) as e:
            raise FolderError(f"{_LABEL}: {self.folder / MANIFEST} cannot be read "
                              f"({first_line(e)})") from None
        self.manifest = _check_manifest(doc, self.folder)
        if record is not None:
            diff = _difference({k: self.manifest[k] for k in record}, record)
            if diff is not None:
                raise FolderError(f"{_LABEL}: {self.folder} holds a latent cache of other data, "
                                  f"another VAE or other settings ({diff}); encode this run's "
                                  f"into another {_LABEL}")
        settings = self.manifest["settings"]
        self.num_images = int(self.manifest["data"]["num_images"])
        self.scaling_factor = float(settings["scaling_factor"])
        self.shift_factor = float(settings["shift_factor"])
        self.flips = bool(settings["random_flip"])
        self.shard_size = int(settings["shard_size"])
        names = self.manifest["data"].get("class_names")
        self.class_names: Optional[list[str]] = (
            [str(n) for n in names] if isinstance(names, list) and names else None)
        """The data's class names (labels 0..K-1), None when unlabelled (as the data sets')."""
        self.num_classes: Optional[int] = None if self.class_names is None else len(
            self.class_names)
        shards = self.manifest["shards"]
        expected = _expected_entries(self.num_images)
        if [(e["name"], e["start"], e["stop"]) for e in shards] != expected:
            raise FolderError(f"{_LABEL}: {self.folder} is an unfinished latent cache "
                              f"({len(shards)} of {len(expected)} shards); encode again to "
                              "finish it")
        self._shards = shards
        self._loaded: dict[int, dict[str, Tensor]] = {}

    def __len__(self) -> int:
        return self.num_images

    def _shard(self, k: int) -> dict[str, Tensor]:
        if k not in self._loaded:
            entry = self._shards[k]
            path = self.folder / entry["name"]
            problem = _shard_problem(path, entry)
            if problem:
                raise _refuse_shard(path, problem)
            tensors = read_tensor_file(path)[0]
            problem = self._layout_problem(tensors, entry["stop"] - entry["start"])
            if problem:
                raise _refuse_shard(path, problem)
            self._loaded[k] = tensors
        return self._loaded[k]

    def _layout_problem(self, tensors: dict[str, Tensor], n: int) -> Optional[str]:
        """Why a shard's tensors are not n images of this cache's layout, or None (a shard and
        manifest swapped in together hash-check but need not fit)."""
        c, h, w = (int(v) for v in self.manifest["settings"]["latent_shape"])
        wanted = {"mean": ((n, c, h, w), torch.float16), "std": ((n, c, h, w), torch.float16),
                  "labels": ((n,), torch.int64)}
        if self.flips:
            wanted.update(mean_flip=wanted["mean"], std_flip=wanted["std"])
        for key, (shape, dtype) in wanted.items():
            got = tensors.get(key)
            if got is None or tuple(got.shape) != shape or got.dtype != dtype:
                return (f"does not hold {key} as {list(shape)} {str(dtype)[6:]} (the layout "
                        "its manifest records)")
        return None

    def get(self, index: int, flipped: bool = False) -> tuple[Tensor, Tensor]:
        """The posterior (mean, std) of image ``index`` (of its mirror with ``flipped``), each
        (c, h, w) float32, unscaled."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"image {index} is outside the cache's {self.num_images}")
        if flipped and not self.flips:
            raise UsageError(f"{_LABEL}: {self.folder} was encoded with data.random_flip = "
                             "false: it holds no mirrored images")
        tensors = self._shard(index // self.shard_size)
        i, suffix = index % self.shard_size, "_flip" if flipped else ""
        return tensors["mean" + suffix][i].float(), tensors["std" + suffix][i].float()

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Image ``index`` as a training loader item: its posterior (2, c, h, w) float32 (mean,
        std), or (4, c, h, w) with its mirror's (mean, std) after it when the cache holds
        mirrors, and its label (-1: none). :meth:`LatentSpace.training_x0
        <diffunet.data_space.LatentSpace.training_x0>` draws the latent from it."""
        parts = list(self.get(index))
        if self.flips:
            parts += self.get(index, flipped=True)
        label = int(self._shard(index // self.shard_size)["labels"][index % self.shard_size])
        return torch.stack(parts), label

    def batch(self, indices: Sequence[int], flipped: Optional[Sequence[bool]] = None
              ) -> tuple[Tensor, Tensor]:
        """The posteriors of images ``indices`` (B,) (``flipped[b]``: of image b's mirror, the
        caller's flip draw), as (mean, std), each (B, c, h, w) float32 on the CPU."""
        flips = [False] * len(indices) if flipped is None else list(flipped)
        if len(flips) != len(indices):
            raise ValueError(f"{len(indices)} indices but {len(flips)} flip flags")
        pairs = [self.get(int(i), bool(f)) for i, f in zip(indices, flips)]
        return torch.stack([m for m, _ in pairs]), torch.stack([s for _, s in pairs])

    def draw(self, mean: Tensor, std: Tensor, generator: torch.Generator) -> Tensor:
        """A latent z = mean + std * noise from the posterior (mean, std) (any shape, e.g. (B,
        c, h, w)), the noise drawn from ``generator`` (the caller's: resume stays exact; it
        must be on ``mean``'s device), scaled into the state x0 = (z - shift) * scaling."""
        noise = torch.randn(mean.shape, generator=generator, device=mean.device,
                            dtype=mean.dtype)
        return (mean + std * noise - self.shift_factor) * self.scaling_factor
