"""``diffunet import DIR OUT``: a diffusers UNet2DModel folder as a diffunet model file."""

from __future__ import annotations

import argparse

from .common import out, say

DESCRIPTION = ("Read a diffusers pipeline folder (unet/ and scheduler/, and a latent model's "
               "AutoencoderKL in vqvae/ or vae/, as LDMPipeline saves it) or a "
               "UNet2DModel.save_pretrained folder, or a Hugging Face Hub model id such as "
               "google/ddpm-cifar10-32 (its JSON and safetensors files only), into one "
               "diffunet model file. Weights must be safetensors (a .bin is a pickle and "
               "refused); a setting diffunet's UNet cannot express is refused, naming it.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", metavar="DIR|REPO",
                   help="a local folder, else a Hub model id (owner/name)")
    p.add_argument("--revision", help="with a Hub model id: the branch, tag or commit")
    p.add_argument("model", metavar="OUT.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import UsageError
    from ..interop import download_from_hub, import_diffusers, looks_like_repo_id, pipeline_inputs
    from ..output_files import claim_file

    folder = Path(args.folder)
    from_hub = not folder.exists() and looks_like_repo_id(args.folder)
    if args.revision is not None and not from_hub:
        raise UsageError("--revision is for a Hub model id; "
                         f"{args.folder} is a local folder")
    # OUT is claimed before any download or read (diffunet/output_files.py)
    with claim_file(args.model, flag="OUT", example="model.safetensors",
                    overwrite=args.overwrite, inputs=pipeline_inputs(folder)) as claim:
        if from_hub:
            say(f"diffunet import: no folder {args.folder} here; fetching it from the Hugging "
                "Face Hub (JSON and safetensors files only)")
            folder = download_from_hub(args.folder, revision=args.revision)
        r = import_diffusers(folder, claim, source=args.folder,
                             hub=(args.folder, args.revision) if from_hub else None)
    if r.scheduler is None:
        say(f"diffunet import: {args.folder} has no scheduler/scheduler_config.json; using "
            "DDPM's schedule (linear 1e-4..0.02, 1000 steps, epsilon)")
    s = r.sample
    out(f"wrote {r.out_file} (from {r.unet_folder}; sample with {s['sampler']}, spacing "
        f"{s['spacing']}, clip_x0 {str(s['clip_x0']).lower()})")
    if r.vae is not None:
        v = r.vae
        where = v["path"] + (f" ({v['subfolder']}/)" if v["subfolder"] else "")
        out(f"latent model: {v['latent_channels']}-channel latents of the AutoencoderKL {where}, "
            f"x0 = (z - {v['shift_factor']:g}) x {v['scaling_factor']:g}; diffunet sample "
            "decodes through it (--vae PATH if it moves)")
    return 0
