"""``diffunet export MODEL DIR``: a model file as a diffusers pipeline folder."""

from __future__ import annotations

import argparse

from .common import out

DESCRIPTION = ("Write a diffunet model file as a diffusers pipeline folder (model_index.json, "
               "unet/, scheduler/) that DDIMPipeline.from_pretrained(DIR) and "
               "DDPMPipeline.from_pretrained(DIR) load. The scheduler is DDPMScheduler when the "
               "file's [sample] sampler is ddpm, else DDIMScheduler, with its spacing and "
               "clipping. A flow-matching model writes unet/ and a "
               "FlowMatchEulerDiscreteScheduler in scheduler/ (diffusers has no pipeline class "
               "for it; the README shows the loop). A latent model also writes its "
               "AutoencoderKL (in vqvae/ under an LDMPipeline for a VP model, in vae/ for a "
               "flow one), with the model's scaling in its scaling_factor.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL.safetensors")
    p.add_argument("folder", metavar="DIR", help="the pipeline folder to write (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a DIR that holds files (the pipeline's files are replaced, "
                        "others kept)")
    p.add_argument("--vae", metavar="PATH",
                   help="a latent model: a local copy of the VAE it was trained with (refused "
                        "unless its files are the same, by SHA-256)")
    p.add_argument("--push-to-hub", metavar="REPO",
                   help="then upload DIR to the Hugging Face Hub model REPO (owner/name; "
                        "created if need be; log in first: hf auth login)")
    p.add_argument("--private", action="store_true",
                   help="with --push-to-hub: create REPO private")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..interop import export_diffusers, looks_like_repo_id, push_to_hub

    if args.push_to_hub is not None and not looks_like_repo_id(args.push_to_hub):
        raise UsageError(f"--push-to-hub {args.push_to_hub!r}: not a Hub repository id "
                         "(owner/name)")
    r = export_diffusers(args.model, args.folder, overwrite=args.overwrite, vae_path=args.vae)
    what = r["pipeline"] or ("UNet2DModel + scheduler" + (" + AutoencoderKL" if r["vae"] else "")
                             + ", no pipeline class")
    out(f"wrote {r['folder']} ({what}, {r['scheduler']}): {', '.join(r['files'])}")
    if r["guide_dropped"] is not None:
        out(f"note: the guide {args.model} carries (the EMA of step {r['guide_dropped']}) is "
            "not exported: a diffusers pipeline has no place for it; sample with diffunet to "
            "autoguide")
    if args.push_to_hub is not None:
        url = push_to_hub(r["folder"], args.push_to_hub, private=args.private or None)
        out(f"pushed to {args.push_to_hub}: {url}")
    return 0
