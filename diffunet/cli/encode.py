"""``diffunet encode [CONFIG.toml] [section.key=value ...]``: build a latent run's latent cache
ahead of training (:mod:`diffunet.latent_cache`), resumably."""

from __future__ import annotations

import argparse

from ..config import RunConfig
from .common import resolve_run_config, say

DESCRIPTION = ("Encode the data set a latent run's config names ([vae]) through its VAE into "
               "the latent cache that `diffunet train` then reuses: sharded safetensors of the "
               "posterior's mean and std (and the mirrored images' with data.random_flip), in "
               "data.latent_cache (default: beside an image folder, or under the user cache "
               "for a named set). Resumable: a killed encode keeps every finished shard and a "
               "rerun encodes only the rest; a finished cache is reused as it is.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="*", metavar="[CONFIG.toml] [section.key=value ...]")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N for the VAE (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time
    from tqdm.auto import tqdm

    from ..data import build_dataset
    from ..data_space import LatentSpace, load_space
    from ..errors import UsageError
    from ..latent_cache import MANIFEST, SHARD_SIZE, encode_dataset
    from ..runs import process_state

    cfg, _ = resolve_run_config(args.items, None, False, root=RunConfig, default_name="default")
    if cfg.vae.path is None:
        raise UsageError("encode: the config names no VAE ([vae] path); a pixel run trains on "
                         "the images themselves and has nothing to encode: set vae.path")
    # under `accelerate launch` the processes split the shards (ACCELERATE_USE_CPU=1 or
    # --device cpu joins them on the CPU, as `diffunet sample` does)
    state, device = process_state(args.device, "encode every shard alone", "encode")
    space = load_space(cfg.vae, device=device)
    assert isinstance(space, LatentSpace)
    dataset = build_dataset(cfg.data)
    n = len(dataset)
    bar = tqdm(total=-(-n // SHARD_SIZE), unit="shard",
               disable=args.no_progress or not state.is_main_process, dynamic_ncols=True)
    written: list[int] = []

    def on_shard(k: int) -> None:
        written.append(k)
        bar.update(1)

    began = time.perf_counter()
    try:
        folder = encode_dataset(cfg, space, dataset=dataset, on_shard=on_shard,
                                state=state if state.num_processes > 1 else None)
    finally:
        bar.close()
    seconds = time.perf_counter() - began
    if written:
        images = sum(min(n, (k + 1) * SHARD_SIZE) - k * SHARD_SIZE for k in written)
        flips = " and their mirrors" if cfg.data.random_flip else ""
        on = f"{device}" + (f", {state.num_processes} processes" if state.num_processes > 1
                            else "")
        say(f"encoded {images:,} of {n:,} images{flips} ({len(written)} shards) in "
            f"{seconds:.1f} s ({images / max(seconds, 1e-9):.1f} images/s on {on}) into "
            f"{folder} ({MANIFEST})")
    else:
        say(f"{folder} already holds this data set's finished latent cache; nothing to encode")
    say(f"train on it with: diffunet train {' '.join(args.items)}".rstrip())
    return 0
