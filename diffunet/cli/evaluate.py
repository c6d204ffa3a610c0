"""``diffunet eval bpd|fid``: bits/dim of a model on a data set, FID/KID of generated images."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .common import guidance_interval_arg, out, seed_arg

if TYPE_CHECKING:
    from ..output_files import OutputFile

DESCRIPTION = ("Evaluate a model: `eval bpd` (negative log-likelihood bound), `eval fid` (FID "
               "and KID of a folder of generated images), `eval nfe` (quality per network "
               "call, every sampler), `eval ema` (a run's post-hoc EMA lengths) or `eval "
               "train-judge` (the built-in quality judge).")


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
    from ..judge import (ALL_GRIDS, ALL_SAMPLERS, DEFAULT_BUDGETS, NFE_IMAGES, REFERENCE_IMAGES,
                         JudgeTraining)
    from ..likelihood import LIKELIHOOD_VARIANCES

    sub = p.add_subparsers(dest="eval_command",
                           metavar="{bpd,fid,nfe,ema,paired,train-judge,train-vae}")
    sub.required = True

    def common(q: argparse.ArgumentParser, batch: int) -> None:
        q.add_argument("--batch-size", type=int, default=batch, metavar="B",
                       help=f"network inputs per forward pass (default {batch})")
        q.add_argument("--seed", type=seed_arg, default=0, help="seed for noise / subsets (0)")
        q.add_argument("--device", help="cpu, cuda, cuda:1, mps, ... (default: cuda if "
                                        "available, else cpu)")
        q.add_argument("--json", metavar="PATH", help=JSON_HELP)
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
        "paired", help="an image-conditioned model (data.task) on held-out pairs: PSNR, "
                       "SSIM, LPIPS, the judge's recognisable fraction and FID, against the "
                       "baseline",
        description="Sample each held-out image's condition (superres: the image downscaled "
                    "and upscaled back; colorize: its luminance; inpaint: the image with a "
                    "hole drawn from --seed, and the mask; paired: its input) once and compare "
                    "the sample with the image: PSNR, SSIM, LPIPS (where the lpips package and "
                    "its AlexNet weights are present), and on 32x32 RGB built-in models the "
                    "built-in judge's recognisable fraction and FID; the same for the "
                    "baseline (bicubic upscaling; the grey image; the holed image; the input). "
                    "Held-out: the built-in shapes of seed 1 (training uses seed 0), or "
                    "CONFIG.toml's data with data.key=value overrides (paired: data.path="
                    "TARGETS data.cond_path=INPUTS).")
    q.add_argument("model", metavar="MODEL.safetensors")
    q.add_argument("items", nargs="*", metavar="[CONFIG.toml] [data.key=value ...]")
    q.add_argument("--num-images", type=int, default=256, metavar="N",
                   help="held-out pairs (default 256)")
    q.add_argument("--steps", type=int, dest="num_steps", metavar="S",
                   help="sampling steps (default: the model file's [sample] num_steps)")
    q.add_argument("--cache-dir", help="where the judge's reference statistics are cached")
    common(q, 64)

    q = sub.add_parser(
        "fid", help="FID and KID of generated images against a reference set",
        description="FID and KID between a folder of generated images (e.g. `diffunet "
                    "sample`'s output) and a reference set, with the standard FID "
                    "Inception-v3 (needs: pip install \"diffunet[eval]\"), or with the "
                    "built-in quality judge (--features builtin: models of the built-in data, "
                    "offline). Reference statistics are cached in $DIFFUNET_CACHE (default "
                    "~/.cache/diffunet), per feature network.")
    q.add_argument("generated", metavar="GENERATED_FOLDER")
    q.add_argument("items", nargs="*", metavar="[CONFIG.toml] [data.key=value ...]",
                   help="the reference data set, when --reference is not a folder")
    q.add_argument("--reference", metavar="FOLDER|CONFIG.toml",
                   help="reference images: a folder, or a config whose [data] is the set")
    q.add_argument("--features", choices=("inception", "builtin"), default="inception",
                   help="inception: the standard FID Inception-v3 (default); builtin: the "
                        "built-in quality judge, a classifier of the built-in shapes shipped "
                        "with diffunet (32x32, no extra package, no download; without a "
                        "reference it compares with the built-in data set and also prints "
                        "the class histogram of the generated images)")
    q.add_argument("--feature-weights", metavar="PATH",
                   help="--features builtin: a judge weights file from `diffunet eval "
                        "train-judge` (default: the shipped one); inception: the "
                        "local pytorch-fid weights file pt_inception-2015-12-05-6726825d.pth "
                        "(default: the cache, downloaded once from pytorch-fid's release)")
    q.add_argument("--image-size", type=int, metavar="S",
                   help="load both sets at SxS (default: the generated images' size)")
    q.add_argument("--max-reference", type=int, metavar="N",
                   help="use the first N reference images only (--features builtin "
                        f"without a reference: default {REFERENCE_IMAGES})")
    q.add_argument("--kid-subset-size", type=int, default=1000, metavar="N",
                   help="KID subset size (default 1000, capped at the smaller set)")
    q.add_argument("--kid-subsets", type=int, default=100, metavar="N",
                   help="number of KID subsets (default 100)")
    q.add_argument("--no-cache", action="store_true",
                   help="neither read nor write cached reference statistics")
    common(q, 50)

    q = sub.add_parser(
        "nfe", help="quality per network call: every sampler and sigma grid, judged offline",
        description="Sample --num-images images (image i from seed + i, as `diffunet sample`) "
                    "for each sampler, sigma grid and network-evaluation budget (the most "
                    "steps that fit it), judge them with the built-in judge (FID and KID "
                    "against the built-in data, recognisable fraction, class entropy) and "
                    "print a markdown table with the sampling time per image. For models of "
                    "the built-in data at 32x32 RGB. A long benchmark: run it on a quiet "
                    "machine.")
    q.add_argument("model", metavar="MODEL.safetensors")
    q.add_argument("--num-images", type=int, default=NFE_IMAGES, metavar="N",
                   help=f"images per combination (default {NFE_IMAGES})")
    q.add_argument("--nfe", type=_int_list, default=list(DEFAULT_BUDGETS), metavar="N,N,...",
                   help="network-evaluation budgets (default "
                        f"{','.join(map(str, DEFAULT_BUDGETS))})")
    q.add_argument("--samplers", type=_word_list, default=list(ALL_SAMPLERS),
                   metavar="NAME,...", help=f"default all: {','.join(ALL_SAMPLERS)}")
    q.add_argument("--grids", type=_word_list, default=list(ALL_GRIDS), metavar="GRID,...",
                   help=f"sigma grids (default {','.join(ALL_GRIDS)}; uniform is skipped for "
                        "an EDM model)")
    q.add_argument("--num-reference", type=int, default=REFERENCE_IMAGES, metavar="N",
                   help=f"built-in reference images (seed 0) for FID/KID (default "
                        f"{REFERENCE_IMAGES})")
    q.add_argument("--judge-weights", metavar="PATH",
                   help="a judge from `diffunet eval train-judge` (default: the shipped one)")
    q.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                   help="clip x0_hat to [-1, 1] (default: the model file's [sample] setting)")
    q.add_argument("--sigma-max", type=float, metavar="SIGMA",
                   help="the karras and exponential grids' highest level (default: the "
                        "model's capped at 160, EDM's own); the uniform grid is then skipped")
    q.add_argument("--sigma-min", type=float, metavar="SIGMA",
                   help="the karras and exponential grids' lowest level (default: the model's)")
    q.add_argument("--guidance-scale", type=float, metavar="W",
                   help="guidance weight: autoguidance by the guide the model file carries "
                        "(default: its recorded weight) or by --guide-model, else "
                        "classifier-free guidance for a class-conditional model (labels i mod "
                        "num_classes) (default 1, none)")
    q.add_argument("--vae", metavar="FOLDER",
                   help="a latent model: a local copy of the VAE its file records (checked by "
                        "its hashes; default: where training found it)")
    q.add_argument("--no-guide", action="store_true",
                   help="do not autoguide with the guide the model file carries")
    q.add_argument("--guide-model", metavar="WEAK.safetensors",
                   help="autoguidance (Karras et al. 2024) by this weaker model of the same "
                        "formulation, schedule, image shape and classes; the table then counts "
                        "the guided calls, which also evaluate it")
    q.add_argument("--guidance-interval", type=guidance_interval_arg, metavar="LO,HI",
                   help="guide only at noise levels sigma in [LO, HI] (Kynkaanniemi et al. "
                        "2024; default: every call)")
    q.add_argument("--no-cache", action="store_true",
                   help="neither read nor write cached reference statistics")
    common(q, 128)

    from ..phema_eval import EMA_IMAGES
    from .ema import step_arg

    q = sub.add_parser(
        "ema", help="a run's post-hoc EMA lengths, each rebuilt, sampled and judged",
        description="Rebuild the run's EMA of each --sigma-rel from its post-hoc EMA snapshots "
                    "(as `diffunet ema`), sample --num-images images of each with the run's "
                    "[sample] settings (image i from seed + i: every length sees the same "
                    "noise) and print FID and KID per length and the best: with the built-in "
                    "judge against the built-in data when the run trained on it, else against "
                    "--reference.")
    q.add_argument("run_dir", metavar="RUN", help="the run folder (the --out-dir of train)")
    q.add_argument("--sigma-rel", type=_sigma_rel_list, required=True, metavar="S,S,...",
                   help="EMA lengths as sigma_rel, e.g. 0.02,0.05,0.1,0.2")
    q.add_argument("--step", type=step_arg, metavar="N",
                   help="rebuild at the newest snapshot at or before step N (default: the "
                        "newest)")
    q.add_argument("--num-images", type=int, default=EMA_IMAGES, metavar="N",
                   help=f"images per length (default {EMA_IMAGES})")
    q.add_argument("--steps", type=int, metavar="S",
                   help="sampling steps (default: the run's sample.num_steps)")
    q.add_argument("--reference", metavar="FOLDER|CONFIG.toml",
                   help="reference images for FID: a folder, or a config whose [data] is the set "
                        "(default: the built-in data, for a run trained on it)")
    q.add_argument("items", nargs="*", metavar="[data.key=value ...]",
                   help="data.key=value overrides of a --reference CONFIG.toml")
    q.add_argument("--features", choices=("inception", "builtin"),
                   help="--reference's feature network: inception (default; needs pip install "
                        "\"diffunet[eval]\") or builtin (the built-in judge, 32x32)")
    q.add_argument("--feature-weights", metavar="PATH",
                   help="a judge file from `diffunet eval train-judge`, or the local pytorch-fid "
                        "Inception weights (default: the shipped judge / the cache)")
    q.add_argument("--num-reference", type=int, metavar="N",
                   help=f"reference images (default: {REFERENCE_IMAGES} built-in ones, or all "
                        "of --reference)")
    q.add_argument("--no-cache", action="store_true",
                   help="neither read nor write cached reference statistics")
    common(q, 128)

    q = sub.add_parser(
        "train-judge", help="train the built-in quality judge (CPU, seconds)",
        description="Train the quality judge behind `--features builtin` and `eval nfe` "
                    "from fresh built-in images, deterministically, on the CPU, and write it "
                    "as a self-describing .safetensors file (architecture, training settings, "
                    "held-out accuracy, sha256). The shipped judge is diffunet/judge.safetensors "
                    "with its sha256 in diffunet/judge.py (JUDGE_SHA256).")
    q.add_argument("--out", required=True, metavar="PATH.safetensors", help="where to write it")
    q.add_argument("--steps", type=int, metavar="N",
                   help=f"training steps (default {JudgeTraining().steps})")
    q.add_argument("--seed", type=seed_arg, metavar="S",
                   help="seed of the initialisation and the outlier images (default "
                        f"{JudgeTraining().seed})")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    q.add_argument("--json", metavar="PATH", help=JSON_HELP)
    q.set_defaults(func=run)

    q = sub.add_parser(
        "train-vae", help="train the built-in shapes' VAE (CPU, about 15 minutes)",
        description="Train the small AutoencoderKL behind vae.path = \"builtin-shapes\" (latent "
                    "runs with nothing downloaded) on the built-in shapes at 64x64, "
                    "deterministically on the CPU, and write it as a diffusers model folder "
                    "(config.json, float16 safetensors weights) with training.json, its "
                    "settings and held-out reconstruction error. The shipped one is "
                    "diffunet/vae_shapes/.")
    q.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    q.add_argument("--steps", type=int, metavar="N",
                   help="training steps (default: the shipped VAE's)")
    q.add_argument("--seed", type=seed_arg, metavar="S",
                   help="seed of the initialisation and the batches (default 0)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace the files an earlier train-vae wrote into --out")
    q.set_defaults(func=run)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive integers like 5,10,25, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 5,10,25, got {text!r}")
    return values


def _sigma_rel_list(text: str) -> list[float]:
    from .ema import sigma_rel_arg

    values = [sigma_rel_arg(v.strip()) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected sigma_rel values like 0.02,0.05,0.1, got "
                                         f"{text!r}")
    return values


def _word_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected names separated by commas, got {text!r}")
    return values


JSON_HELP = ("also write the results as JSON (an existing PATH is replaced only if it is an "
             "earlier diffunet eval result)")
_WRITTEN_BY = "diffunet eval"
"""The ``written_by`` entry of every ``--json`` result: an existing file without it is the
user's, and is never replaced."""


def _claim_json(path: str | None) -> OutputFile | None:
    """Before any work: ``--json PATH`` (the output-file rule, diffunet/output_files.py), which
    may replace only an earlier ``diffunet eval`` result."""
    if path is None:
        return None
    from ..output_files import claim_file, written_by

    return claim_file(path, flag="--json", example="result.json", ours=written_by(_WRITTEN_BY),
                      noun="a diffunet eval result")


def _write_json(out: OutputFile | None, result: dict[str, Any]) -> None:
    if out is not None:
        result = {"written_by": _WRITTEN_BY, **result}
        out.write((json.dumps(result, indent=2) + "\n").encode("utf-8"))


def _bpd(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import load_diffusion_model
    from ..data import build_dataset
    from ..evaluation import bpd_data_config, dataset_bits_per_dim, describe_data
    from ..likelihood import require_vp_bound
    from ..runs import pick_device

    device = pick_device(args.device)
    net, schedule, meta = load_diffusion_model(args.model, device=device)
    if meta.get("vae") is not None:
        raise UsageError(f"{args.model} is a latent model (trained on a VAE's latents): its "
                         "bits/dim would measure latents, not images, and the VAE's own "
                         "likelihood is not part of it; judge it by eval fid or eval nfe on "
                         "decoded images instead")
    require_vp_bound(schedule)  # before any data is read
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
    _write_json(args.json_out, {"model": str(args.model), "data": {
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
    judge, items, max_reference = None, args.items, args.max_reference
    if args.features == "builtin":
        from ..judge import REFERENCE_IMAGES, load_judge

        judge = load_judge(args.feature_weights, device=device)
        size = judge.config.image_size
        if image_size != size:
            raise UsageError(f"--features builtin: the judge reads {size}x{size} images and "
                             f"these are {image_size}x{image_size}; give --image-size {size} "
                             "to resize them, or use --features inception")
        if args.reference is None and not items:  # the built-in data `diffunet train` uses
            items = ["data.source=builtin"]
            max_reference = max_reference or REFERENCE_IMAGES
    reference = reference_images(args.reference, items, image_size)
    network = (judge.feature_network() if judge is not None else
               load_inception(args.feature_weights, device=device))
    result = fid_kid(generated, reference, network,
                     cache_dir=None if args.no_cache else default_cache_dir(),
                     max_reference=max_reference, batch_size=args.batch_size,
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
    extra: dict[str, Any] = {}
    if judge is not None:
        report = judge.class_report(generated)
        out(f"features         built-in judge, {judge.config.feature_dim}-d (sha256 "
            f"{judge.sha256[:16]}...)"
            + ("; reference: the built-in data set (seed 0)" if items != args.items else "")
            + "\n" + report.describe())
        extra = {"features": "builtin", "judge": report.summary()}
    _write_json(args.json_out, {"generated": str(args.generated), "image_size": image_size,
                            **result.summary(), **extra})
    return 0


def _nfe(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from ..evaluation import default_cache_dir
    from ..judge import ALL_SAMPLERS, format_nfe_table, load_judge, quality_per_nfe
    from ..runs import pick_device
    from .common import say

    unknown = [name for name in args.samplers if name not in ALL_SAMPLERS]
    if unknown:
        raise UsageError(f"--samplers: unknown sampler {unknown[0]!r}; use some of "
                         f"{','.join(ALL_SAMPLERS)}")
    device = pick_device(args.device)
    judge = load_judge(args.judge_weights, device=device)
    result = quality_per_nfe(args.model, judge=judge, num_images=args.num_images,
                             seed=args.seed, budgets=args.nfe, samplers=args.samplers,
                             grids=args.grids, batch_size=args.batch_size, device=device,
                             num_reference=args.num_reference,
                             cache_dir=None if args.no_cache else default_cache_dir(),
                             clip_x0=args.clip_x0, sigma_min=args.sigma_min,
                             sigma_max=args.sigma_max, guidance_scale=args.guidance_scale,
                             guide_model=args.guide_model,
                             guidance_interval=args.guidance_interval,
                             no_guide=args.no_guide, vae=args.vae,
                             names={"sigma_min": "--sigma-min", "sigma_max": "--sigma-max",
                                    "guidance_scale": "--guidance-scale",
                                    "guide_model": "--guide-model",
                                    "guidance_interval": "--guidance-interval"},
                             progress=None if args.no_progress else say)
    command = " ".join(shlex.quote(a) for a in ([sys.executable] if sys.argv[0].endswith(".py")
                                                  else []) + sys.argv)
    out(format_nfe_table(result) + f"\ncommand: {command}; model sha256 {result.model_sha256}; "
        f"judge sha256 {result.judge_sha256}")
    _write_json(args.json_out, {"model": str(args.model), "model_sha256": result.model_sha256,
                            "judge_sha256": result.judge_sha256, "command": command,
                            "num_images": result.num_images, "seed": result.seed,
                            "reference_fid": result.reference_fid,
                            "rows": [dataclasses.asdict(r) for r in result.rows],
                            "skipped": result.skipped, **result.options})
    return 0


def _ema(args: argparse.Namespace) -> int:
    from ..evaluation import default_cache_dir
    from ..phema_eval import format_ema_table, judge_ema_lengths
    from ..runs import pick_device
    from .common import say

    device = pick_device(args.device)
    result = judge_ema_lengths(args.run_dir, args.sigma_rel, step=args.step,
                               num_images=args.num_images, seed=args.seed,
                               num_steps=args.steps, batch_size=args.batch_size, device=device,
                               reference=args.reference, reference_items=args.items,
                               features=args.features, feature_weights=args.feature_weights,
                               num_reference=args.num_reference,
                               cache_dir=None if args.no_cache else default_cache_dir(),
                               progress=None if args.no_progress else say)
    out(format_ema_table(result))
    _write_json(args.json_out, {"run": result.run, "step": result.step,
                                "num_images": result.num_images, "seed": result.seed,
                                "features": result.features, "reference": result.reference,
                                "num_reference": result.num_reference,
                                "floor_fid": result.floor_fid,
                                "best_sigma_rel": result.best.sigma_rel,
                                "rows": [dataclasses.asdict(r) for r in result.rows],
                                **result.options})
    return 0


def _paired(args: argparse.Namespace) -> int:
    from ..paired_eval import evaluate_paired, format_paired
    from ..runs import pick_device
    from .common import say

    result = evaluate_paired(args.model, args.items, num_images=args.num_images,
                             seed=args.seed, num_steps=args.num_steps,
                             batch_size=args.batch_size, device=pick_device(args.device),
                             cache_dir=args.cache_dir,
                             progress=None if args.no_progress else say)
    out(format_paired(result))
    _write_json(args.json_out, {"model": str(args.model), "task": result.task,
                                "data": result.data, "num_images": result.num_images,
                                "seed": result.seed, "rows": result.rows,
                                "baseline": result.baseline,
                                "seconds_per_image": result.seconds_per_image,
                                "notes": result.notes, **result.options})
    return 0


def _train_judge(args: argparse.Namespace) -> int:
    import time

    from ..judge import JudgeTraining, save_judge, train_judge

    path = Path(args.out)
    given = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    training = dataclasses.replace(JudgeTraining(), **given)
    t0 = time.perf_counter()
    judge = train_judge(training=training)
    seconds = time.perf_counter() - t0
    sha = save_judge(judge, args.out_file)
    h = judge.held_out
    out(f"trained the judge in {seconds:.1f} s ({training.steps} steps of "
        f"{training.batch_size} built-in images, seed {training.seed}): held-out accuracy "
        f"{h['accuracy']:.2%}, recognisable {h['recognisable']:.1%} on {h['images']} images "
        f"of seed {h['seed']}\n"
        f"wrote {path} ({path.stat().st_size:,} bytes; sha256 of its weights and metadata "
        f"{sha})\n"
        f"to ship it: copy it to diffunet/judge.safetensors and set JUDGE_SHA256 = "
        f"\"{sha}\" in diffunet/judge.py")
    _write_json(args.json_out, {"out": str(path), "sha256": sha, "seconds": seconds,
                            "held_out": h, "training": dataclasses.asdict(training)})
    return 0


def _train_vae(args: argparse.Namespace) -> int:
    from ..data_space import VAE_WEIGHTS
    from ..outputs import claim_folder
    from ..shapes_vae import VaeTraining, train_shapes_vae
    from .common import say

    given = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    how = dataclasses.replace(VaeTraining(), **given)
    if how.steps < 1:
        raise UsageError(f"--steps must be a positive integer, got {how.steps}")
    names = ["config.json", VAE_WEIGHTS]
    # claimed before the training: a folder of the user's files is refused now, not later
    with claim_folder(args.out, command="eval train-vae", manifest="training.json",
                      format="diffunet-shapes-vae", planned=names,
                      overwrite=args.overwrite, noun="VAE files") as folder:
        files, record = train_shapes_vae(how, say=say)
        if args.overwrite:
            folder.remove(folder.listed)
        folder.write_manifest({"format": "diffunet-shapes-vae", "format_version": 1,
                               **record}, names)
        for name in names:
            folder.write_file(name, files[name], durable=True)
    out(f"trained the VAE in {record['seconds']:.0f} s ({how.steps} steps of {how.batch_size} "
        f"{how.crop}x{how.crop} crops, seed {how.seed}; {record['parameters']:,} parameters): "
        f"held-out reconstruction MSE {record['held_out_mse']:.6f} (PSNR "
        f"{record['held_out_psnr_db']:.2f} dB) on {how.eval_images} images of seed 1; "
        f"scaling_factor {record['scaling_factor']}\nwrote {args.out} (to ship it: copy "
        "config.json, its weights and training.json to diffunet/vae_shapes/)")
    return 0


def run(args: argparse.Namespace) -> int:
    """``diffunet eval bpd|fid``: a short table of results on stdout (and ``--json``)."""
    if getattr(args, "batch_size", 1) < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
    from ..output_files import check_distinct, claim_file

    commands = {"bpd": _bpd, "fid": _fid, "nfe": _nfe, "ema": _ema, "paired": _paired,
                "train-judge": _train_judge,
                "train-vae": _train_vae}
    with contextlib.ExitStack() as claims:  # a command that fails leaves no temporary file
        args.json_out = _claim_json(getattr(args, "json", None))
        if args.json_out is not None:
            claims.enter_context(args.json_out)
        if args.eval_command == "train-judge":  # --out too, before the training
            args.out_file = claims.enter_context(claim_file(
                args.out, flag="--out", example="judge.safetensors", overwrite=args.overwrite))
            check_distinct(args.out_file, args.json_out)
        return commands[args.eval_command](args)
