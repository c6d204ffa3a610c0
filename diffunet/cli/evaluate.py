"""``diffunet eval bpd|fid``: bits/dim of a model on a data set, FID/KID of generated images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .common import out

DESCRIPTION = ("Evaluate a model: `eval bpd` (negative log-likelihood bound) or `eval fid` (FID "
               "and KID of a folder of generated images).")


def _timesteps_arg(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'all' or a positive integer, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..likelihood import LIKELIHOOD_VARIANCES

    sub = p.add_subparsers(dest="eval_command", metavar="{bpd,fid}")
    sub.required = True

    def common(q: argparse.ArgumentParser, batch: int) -> None:
        q.add_argument("--batch-size", type=int, default=batch, metavar="B",
                       help=f"network inputs per forward pass (default {batch})")
        q.add_argument("--seed", type=int, default=0, help="seed for noise / subsets (0)")
        q.add_argument("--device", help="cpu, cuda, cuda:1, mps, ... (default: cuda if "
                                        "available, else cpu)")
        q.add_argument("--json", metavar="PATH", help="also write the results as JSON")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        q.set_defaults(func=run)

    q = sub.add_parser(
        "bpd", help="negative log-likelihood (variational bound) in bits/dim",
        description="The DDPM variational bound (Ho et al. 2020, sec. 3.3) in bits per "
                    "dimension, on the model's training data (stored in model files written "
                    "by `diffunet train`; else the built-in set) or on CONFIG.toml's data "
                    "with data.key=value overrides.")
    q.add_argument("model", metavar="MODEL.safetensors")
    q.add_argument("items", nargs="*", metavar="[CONFIG.toml] [data.key=value ...]")
    q.add_argument("--max-images", type=int, metavar="N",
                   help="evaluate the first N images only (default: all)")
    q.add_argument("--timesteps", type=_timesteps_arg, default=None, metavar="all|N",
                   help="all: every timestep (the bound, T network calls per image); N: N "
                        "random KL timesteps per image, an unbiased estimate (default all)")
    q.add_argument("--variance", choices=LIKELIHOOD_VARIANCES, default="fixed_large",
                   help="fixed reverse variance: beta_t (fixed_large, default) or the "
                        "posterior variance (fixed_small)")
    q.add_argument("--no-clip", action="store_true", help="do not clip x0_hat to [-1, 1]")
    common(q, 256)

    q = sub.add_parser(
        "fid", help="FID and KID of generated images against a reference set",
        description="FID and KID between a folder of generated images (e.g. `diffunet "
                    "sample`'s output) and a reference set, with the standard FID "
                    "Inception-v3 (needs: pip install \"diffunet[eval]\"). Reference statistics "
                    "are cached in $DIFFUNET_CACHE (default ~/.cache/diffunet).")
    q.add_argument("generated", metavar="GENERATED_FOLDER")
    q.add_argument("items", nargs="*", metavar="[CONFIG.toml] [data.key=value ...]",
                   help="the reference data set, when --reference is not a folder")
    q.add_argument("--reference", metavar="FOLDER|CONFIG.toml",
                   help="reference images: a folder, or a config whose [data] is the set")
    q.add_argument("--feature-weights", metavar="PATH",
                   help="local pytorch-fid weights file pt_inception-2015-12-05-6726825d.pth "
                        "(default: the cache, downloaded once from pytorch-fid's release)")
    q.add_argument("--image-size", type=int, metavar="S",
                   help="load both sets at SxS (default: the generated images' size)")
    q.add_argument("--max-reference", type=int, metavar="N",
                   help="use the first N reference images only")
    q.add_argument("--kid-subset-size", type=int, default=1000, metavar="N",
                   help="KID subset size (default 1000, capped at the smaller set)")
    q.add_argument("--kid-subsets", type=int, default=100, metavar="N",
                   help="number of KID subsets (default 100)")
    q.add_argument("--no-cache", action="store_true",
                   help="neither read nor write cached reference statistics")
    common(q, 50)


def _write_json(path: str | None, result: dict[str, Any]) -> None:
    if path:
        from ..fileio import atomic_write_bytes

        atomic_write_bytes(Path(path), (json.dumps(result, indent=2) + "\n").encode("utf-8"))


def _bpd(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import load_diffusion_model
    from ..data import build_dataset
    from ..evaluation import bpd_data_config, dataset_bits_per_dim, describe_data
    from ..runs import pick_device

    device = pick_device(args.device)
    net, schedule, meta = load_diffusion_model(args.model, device=device)
    data_cfg = bpd_data_config(meta, args.items, args.model)
    dataset = build_dataset(data_cfg)
    result = dataset_bits_per_dim(net, schedule, dataset,
                                  max_images=args.max_images, batch_size=args.batch_size,
                                  num_timesteps=args.timesteps, variance=args.variance,
                                  clip_x0=not args.no_clip, device=device,
                                  generator=torch.Generator().manual_seed(args.seed),
                                  num_workers=data_cfg.num_workers or 0,
                                  progress=not args.no_progress)
    s = result.summary()
    T = s["num_train_timesteps"]
    var_text = "beta_t" if s["variance"] == "fixed_large" else "posterior beta~_t"
    steps = (f"all {T} timesteps" if s["timesteps"] == "all" else
             f"{s['timesteps']} random KL timesteps of {T - 1} per image (unbiased estimate)")
    out(f"bits/dim         {s['bpd']:.4f} +- {s['bpd_stderr']:.4f} (standard error, "
        f"{s['num_images']} images)\n"
        f"  prior L_T      {s['prior_bpd']:.4f}\n"
        f"  KL L_1..L_T-1  {s['kl_bpd']:.4f}\n"
        f"  decoder L_0    {s['decoder_bpd']:.4f}\n"
        f"{steps}; fixed variance {s['variance']} ({var_text}); x0_hat "
        f"{'clipped to [-1, 1]' if s['clip_x0'] else 'not clipped'}\n"
        f"data: {describe_data(data_cfg, dataset)}")
    _write_json(args.json, {"model": str(args.model), "data": {
        "source": data_cfg.source, "path": data_cfg.path, "name": data_cfg.name,
        "images": len(dataset)}, **s})
    return 0


def _fid(args: argparse.Namespace) -> int:
    import torch

    from ..evaluation import (default_cache_dir, fid_kid, generated_images, load_inception,
                              reference_images)
    from ..runs import pick_device

    device = pick_device(args.device)
    generated, image_size = generated_images(args.generated, args.image_size)
    reference = reference_images(args.reference, args.items, image_size)
    network = load_inception(args.feature_weights, device=device)
    result = fid_kid(generated, reference, network,
                     cache_dir=None if args.no_cache else default_cache_dir(),
                     max_reference=args.max_reference, batch_size=args.batch_size,
                     device=device, kid_subset_size=args.kid_subset_size,
                     kid_num_subsets=args.kid_subsets,
                     generator=torch.Generator().manual_seed(args.seed),
                     progress=not args.no_progress)
    where = ("from cache" if result.reference_from_cache else
             "computed" + (", cached" if result.reference_cache else ""))
    out(f"FID              {result.fid:.3f}\n"
        f"KID              {result.kid:.5f} +- {result.kid_std:.5f} ({result.kid_num_subsets} "
        f"subsets of {result.kid_subset_size})\n"
        f"images           {result.num_generated} generated, {result.num_reference} "
        f"reference, at {image_size}x{image_size}\n"
        f"reference stats  {where}"
        + (f": {result.reference_cache}" if result.reference_cache else ""))
    _write_json(args.json, {"generated": str(args.generated), "image_size": image_size,
                            **result.summary()})
    return 0


def run(args: argparse.Namespace) -> int:
    """``diffunet eval bpd|fid``: a short table of results on stdout (and ``--json``)."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
    return _bpd(args) if args.eval_command == "bpd" else _fid(args)
