"""``diffunet sample MODEL``: draw images from a model file into a folder (resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import guidance_interval_arg, say

DESCRIPTION = ("Draw images from a model file: 000000.png, ... (image i from seed + i, the same "
               "whatever the batch size or number of processes), grid.png and manifest.json. "
               "Rerunning the same command resumes an interrupted run. Under `accelerate launch "
               "-m diffunet sample ...` the work is split across processes. How to sample "
               "(sampler, steps, eta, sigma grid, spacing, guidance, clipping) defaults to the "
               "model file's own [sample] settings, the ones its training previews used. "
               "--init-image edits images instead (SDEdit), --mask inpaints (white = repaint, "
               "black = keep).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from typing import get_args

    from ..config import SampleConfig
    from ..sampling import DEFAULT_NUM_SAMPLES, IMG2IMG_STRENGTH, PRECISIONS, SampleOptions
    from ..samplers import MULTISTEP_SAMPLERS, SAMPLERS, SPACINGS, SigmaGrid

    d, s = SampleOptions, SampleConfig  # the defaults live in the dataclasses (house rule 5)
    model_or = "default: the model's [sample] setting, else"
    p.add_argument("model", metavar="MODEL.safetensors")
    p.add_argument("--num-samples", type=int, default=d.num_samples, metavar="N",
                   help=f"images to draw (default {DEFAULT_NUM_SAMPLES}; with an --init-image "
                        "folder, one per image in it)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, metavar="B",
                   help="images per forward pass, per process (default: 64 on a CPU; on a GPU "
                        "as many as its free memory holds)")
    p.add_argument("--sampler", metavar="|".join(SAMPLERS),
                   help=f"step rule ({model_or} {s.sampler}); dpmpp-2m needs only 10-20 steps "
                        "(docs/samplers.md compares them per network call)")
    p.add_argument("--steps", type=int, dest="num_steps", metavar="S",
                   help=f"sampling steps, 1 to the model's training timesteps ({model_or} "
                        f"{s.num_steps})")
    p.add_argument("--eta", type=float,
                   help="step noise: 0 deterministic ... 1 ancestral (ddim, euler-ancestral, "
                        f"dpmpp-2m-sde; {model_or} 0 for ddim, 1 for the other two)")
    p.add_argument("--sigmas", metavar="|".join(get_args(SigmaGrid)),
                   help=f"noise-level grid: karras (Karras et al. eq. 5, with --rho), "
                        f"exponential, or uniform (the model's own: a VP model's training "
                        f"timesteps --spacing picks, a flow model's shifted t as diffusers "
                        f"spaces it) ({model_or} uniform for the samplers the model runs "
                        f"natively there, ddpm/ddim on VP and all but dpmpp-2m on flow, karras "
                        f"for the rest; docs/samplers.md, \"Which grid runs\")")
    p.add_argument("--rho", type=float,
                   help=f"the karras grid's exponent ({model_or} {s.rho})")
    p.add_argument("--sigma-max", type=float, dest="sigma_max", metavar="SIGMA",
                   help=f"karras/exponential: the grid's highest noise level, where sampling "
                        f"starts ({model_or} the model's largest capped at 160, EDM's own "
                        f"sigma_max; up to the model's largest when set)")
    p.add_argument("--sigma-min", type=float, dest="sigma_min", metavar="SIGMA",
                   help=f"karras/exponential: the grid's lowest noise level before the last "
                        f"step to 0 ({model_or} the model's smallest)")
    p.add_argument("--spacing", metavar="|".join(SPACINGS),
                   help=f"which training timesteps a VP model's uniform grid visits "
                        f"({model_or} {s.spacing})")
    p.add_argument("--s-churn", type=float, dest="s_churn", metavar="S",
                   help=f"heun: EDM's stochasticity S_churn, 0 = deterministic ({model_or} "
                        f"{s.s_churn})")
    p.add_argument("--s-tmin", type=float, dest="s_tmin", metavar="SIGMA",
                   help=f"heun: add churn noise only at sigma >= this ({model_or} {s.s_tmin})")
    p.add_argument("--s-tmax", type=float, dest="s_tmax", metavar="SIGMA",
                   help=f"heun: ... and sigma <= this ({model_or} inf)")
    p.add_argument("--s-noise", type=float, dest="s_noise", metavar="S",
                   help=f"heun: scale of the churn noise ({model_or} {s.s_noise})")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                   help=f"clip each step's x0 estimate to [-1, 1] ({model_or} "
                        f"{'yes' if s.clip_x0 else 'no'})")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"image i is drawn from seed + i (default {d.seed})")
    p.add_argument("--class-label", metavar="K|NAME|K1,NAME2,...|all",
                   help="class-conditional models: one label, a list cycled over the images, "
                        "or all (image i gets class i mod num_classes; grid.png shows one class "
                        "per row); a label is an index or a class name of the model file "
                        "(diffunet info lists them)")
    p.add_argument("--guidance-scale", type=float, metavar="W",
                   help="guidance weight: autoguidance by the guide the model file carries "
                        "(default: its recorded weight, sample.guide_scale = "
                        f"{s.guide_scale:g}) or by --guide-model, else classifier-free guidance "
                        f"with --class-label ({model_or} {s.guidance_scale}, i.e. none); 1 "
                        "switches guidance off")
    p.add_argument("--guide-model", metavar="WEAK.safetensors",
                   help="autoguidance (Karras et al. 2024): D_weak + W (D - D_weak), for "
                        "conditional and unconditional models; WEAK is a weaker model of the "
                        "same formulation, schedule, image shape and classes (an early "
                        "snapshot of the run, a smaller net); replaces a carried guide; needs "
                        "--guidance-scale W > 1")
    p.add_argument("--no-guide", action="store_true",
                   help="do not autoguide with the guide the model file carries (the run's "
                        "own earlier EMA, train.guide_at); a class-conditional model then "
                        "takes classifier-free guidance with --class-label and --guidance-scale")
    p.add_argument("--guidance-interval", type=guidance_interval_arg, metavar="LO,HI",
                   help="guide only at noise levels sigma in [LO, HI] (Kynkaanniemi et al. "
                        "2024; e.g. 0.3,5); the other steps run the model alone, without the "
                        "guide or unconditional evaluation (default: every step)")
    p.add_argument("--init-image", metavar="PATH_OR_FOLDER",
                   help="edit instead of drawing from noise (SDEdit): each image starts from "
                        "this image noised to --strength; a folder gives image i its i-th "
                        "image in sorted order (cycled when there are more images to draw). "
                        "Images must be the model's size and mode (RGB or grayscale); they are "
                        "not resized")
    p.add_argument("--strength", type=float, metavar="S",
                   help=f"editing: how far the init image is noised, in (0, 1]; 1 = all the "
                        f"way (little of it survives), small = close to it; runs the last "
                        f"int(steps x S) steps (default {IMG2IMG_STRENGTH}, 1 with --mask)")
    p.add_argument("--mask", metavar="MASK_OR_FOLDER",
                   help="inpainting, with --init-image: white (255) = repaint, black (0) = keep "
                        "the init image's pixel (diffusers' convention; grey is binarised at "
                        "128). One file for every init image, or a folder paired with the "
                        "init-image folder by file name; single-channel (L or 1) or grey RGB, "
                        "the model's size")
    p.add_argument("--resample", type=int, default=d.resample, metavar="R",
                   help="inpainting: do each step R times, re-noising in between (RePaint; "
                        f"default {d.resample}; not with {', '.join(MULTISTEP_SAMPLERS)})")
    p.add_argument("--cond-image", metavar="PATH_OR_FOLDER",
                   help="a model with a condition image (trained with data.task): its inputs, "
                        "a file or a folder (sorted); a superres model takes low-resolution "
                        "images (its size / superres_factor), a colorize model grayscale ones "
                        "of its size; nothing else is resized. --guidance-scale W guides "
                        "classifier-free on it")
    p.add_argument("--per-input", type=int, default=d.per_input, metavar="N",
                   help="with --cond-image: images drawn from each input (image i from input "
                        f"i // N, seed + i; default {d.per_input})")
    p.add_argument("--vae", metavar="FOLDER",
                   help="a latent model: a local copy of the VAE its file records (the same "
                        "VAE, checked by the SHA-256 of its config and weights; default: the "
                        "VAE where training found it)")
    p.add_argument("--save-latents", action="store_true",
                   help="a latent model: also write each image's latent (000000.safetensors, "
                        "tensor 'latent': the unscaled z the VAE decodes)")
    p.add_argument("--out-dir", help="output folder (default: samples/<run>_<step> for a model "
                                     "file in a run's weights/ folder, else samples/<file name>)")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=d.grid,
                   help="write grid.png (default: yes)")
    p.add_argument("--precision", default=d.precision, metavar="|".join(PRECISIONS),
                   help="network precision (default: bf16 on a GPU, fp32 elsewhere; fp16 needs "
                        "a GPU)")
    p.add_argument("--compile", action="store_true", default=d.compile,
                   help="torch.compile the network (the first batch waits for the compiler)")
    p.add_argument("--channels-last", action="store_true", default=d.channels_last,
                   help="channels-last weights and activations (faster convolutions on GPUs)")
    p.add_argument("--device", default=d.device,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the samples (from other settings) that its manifest.json lists "
                        "in --out-dir; other files there are kept, never written over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def default_out_dir(model: str | Path) -> Path:
    """``samples/<run>_<step>`` for a model file in a run folder's ``weights/`` (e.g.
    ``runs/foo/weights/model_step0001000.safetensors`` -> ``samples/foo_step0001000``), so runs
    do not share a folder; otherwise ``samples/<file stem>``."""
    path = Path(model)
    stem = path.stem
    if path.parent.name == "weights" and (path.parent.parent / "config.json").is_file():
        run_name = path.resolve().parent.parent.name
        return Path("samples") / f"{run_name}_{stem.removeprefix('model_')}"
    return Path("samples") / stem


def run(args: argparse.Namespace) -> int:
    from ..sampling import SampleOptions, generate, parse_class_labels

    options = SampleOptions(
        num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
        class_labels=parse_class_labels(args.class_label), grid=args.grid,
        precision=args.precision, device=args.device, overwrite=args.overwrite,
        compile=args.compile, channels_last=args.channels_last,
        sampler=args.sampler, num_steps=args.num_steps, eta=args.eta, spacing=args.spacing,
        sigmas=args.sigmas, rho=args.rho, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
        s_churn=args.s_churn, s_tmin=args.s_tmin,
        s_tmax=args.s_tmax, s_noise=args.s_noise,
        guidance_scale=args.guidance_scale, guidance_interval=args.guidance_interval,
        guide_model=args.guide_model, no_guide=args.no_guide, clip_x0=args.clip_x0,
        init_image=args.init_image, mask=args.mask, strength=args.strength,
        resample=args.resample, vae=args.vae, save_latents=args.save_latents,
        cond_image=args.cond_image, per_input=args.per_input)
    out_dir = Path(args.out_dir) if args.out_dir else default_out_dir(args.model)
    generate(args.model, out_dir, options, progress=not args.no_progress, say=say)
    return 0
