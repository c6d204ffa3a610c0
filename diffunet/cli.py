"""The ``diffunet`` command line: argument parsing and the subcommands.

This is the only module that prints for people. Bad input raises a
:class:`~diffunet.errors.DiffunetError`; :func:`main` prints its one-line message and returns
exit code 2 without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from . import __version__
from .config import RunConfig, load_config, to_toml
from .errors import ConfigError, DiffunetError

C = TypeVar("C")


def _cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import load_model

    net, schedule, meta = load_model(args.model)
    n_params = sum(p.numel() for p in net.parameters())
    if args.json:
        print(json.dumps({"path": str(args.model), "parameters": n_params, **meta}, indent=2))
        return 0
    print(f"model file       {args.model}")
    print(f"format version   {meta['format_version']} (written by diffunet "
          f"{meta.get('diffunet_version', '?')})")
    if "step" in meta:
        print(f"training step    {meta['step']}")
    if "epoch" in meta:
        metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
        dice, iou = metrics.get("val_mean_dice"), metrics.get("val_mean_iou")
        print(f"training epoch   {meta['epoch']}" + (
            f" (validation mean Dice {dice:.4f}, IoU {iou:.4f})"
            if isinstance(dice, (int, float)) and isinstance(iou, (int, float)) else ""))
    print(f"parameters       {n_params:,} ({n_params / 1e6:.2f}M)")
    print(f"sha256           {meta['sha256']}")
    for section in ("unet_config", "schedule_config", "segmentation"):
        if section not in meta:
            continue
        print(f"[{section.removesuffix('_config')}]")
        for key, value in meta[section].items():
            print(f"  {key} = {json.dumps(value)}")
    return 0


def _is_main_process() -> bool:
    # Under `accelerate launch` every process runs this; only rank 0 talks to people.
    return os.environ.get("RANK", "0") == "0"


def say(msg: str) -> None:
    """Print a one-line message for people on stderr, from the main process only."""
    if _is_main_process():
        print(msg, file=sys.stderr, flush=True)


def resolve_run_config(items: Sequence[str], out_dir: str | None, resume: bool, *,
                       root: type[C], default_name: str) -> tuple[C, Path]:
    """``[CONFIG.toml] [section.key=value ...]`` -> (config of type ``root``, run folder).

    The run folder is ``out_dir``, else ``runs/<CONFIG name>`` (``runs/<default_name>``). With
    ``resume`` and no CONFIG, the run folder's own config.json is the starting point, so
    ``--resume train.max_steps=N`` extends a run.
    """
    config_path = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config_path is None:
            config_path = item
        else:
            raise ConfigError(f"two config files given ({config_path}, {item}); give one, then "
                              "section.key=value overrides")
    sections = [f.name for f in dataclasses.fields(root)]
    if (config_path is not None and not Path(config_path).is_file()
            and not config_path.endswith(".toml")
            and config_path.partition(".")[0] in sections):  # "train.max_steps" without "=N"
        raise ConfigError(f"{config_path}: not a config file, and an override needs a value; "
                          f"write {config_path}=VALUE (e.g. train.max_steps=500)")
    stem = Path(config_path).stem if config_path else default_name
    run_dir = Path(out_dir) if out_dir else Path("runs") / stem
    base = None
    saved = run_dir / "config.json"
    if resume and config_path is None and saved.is_file():
        try:
            base = json.loads(saved.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{saved} is damaged ({e}); give the run's CONFIG.toml and "
                              "overrides along with --resume") from None
    return load_config(config_path, overrides, base=base, root=root), run_dir


def _cmd_train(args: argparse.Namespace) -> int:
    cfg, out_dir = resolve_run_config(args.items, args.out_dir, args.resume, root=RunConfig,
                                      default_name="default")
    if args.dry_run:
        from .unet import UNet

        n_params = sum(p.numel() for p in UNet(cfg.unet).parameters())
        print(to_toml(cfg))
        print(f"# UNet parameters: {n_params:,} ({n_params / 1e6:.2f}M)")
        print(f"# output folder: {out_dir}")
        return 0
    from .training import train

    result = train(cfg, out_dir, resume=args.resume, say=say, progress=not args.no_progress)
    if result.model_path is not None:
        say(f"step {result.step}: model file {result.model_path}")
    if result.nonfinite_skipped:
        say(f"skipped {result.nonfinite_skipped} step(s) with a non-finite loss")
    if not result.interrupted and result.model_path is not None:
        say(f"sample from it with: diffunet sample {result.model_path}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from .sampling import SampleOptions, generate, parse_class_labels

    options = SampleOptions(
        num_samples=args.num_samples, batch_size=args.batch_size, sampler=args.sampler,
        num_steps=args.steps, eta=args.eta, spacing=args.spacing, seed=args.seed,
        class_labels=parse_class_labels(args.class_label), guidance_scale=args.guidance_scale,
        grid=args.grid, precision=args.precision, device=args.device, overwrite=args.overwrite)
    out_dir = Path(args.out_dir) if args.out_dir else Path("samples") / Path(args.model).stem
    generate(args.model, out_dir, options, progress=not args.no_progress, say=say)
    return 0


def _one_line_error(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` report bad arguments as one line (no usage dump), exit code 2."""

    def error(message: str) -> None:
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = error  # type: ignore[method-assign]


def _add_sample_parser(sub: Any) -> None:
    from .sampling import PRECISIONS, SampleOptions
    from .schedulers import SAMPLERS, SPACINGS

    d = SampleOptions  # the defaults live in the options dataclass (house rule 5)
    p = sub.add_parser(
        "sample", help="draw images from a model file into a folder (resumable)",
        description="Draw images from a model file: 000000.png, ... (image i from seed + i, "
                    "the same whatever the batch size or number of processes), grid.png and "
                    "manifest.json. Rerunning the same command resumes an interrupted run. "
                    "Under `accelerate launch -m diffunet sample ...` the work is split across "
                    "processes.")
    p.add_argument("model", metavar="MODEL.safetensors")
    p.add_argument("--num-samples", type=int, default=d.num_samples, metavar="N",
                   help=f"images to draw (default {d.num_samples})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, metavar="B",
                   help=f"images per forward pass, per process (default {d.batch_size})")
    p.add_argument("--sampler", default=d.sampler, metavar="|".join(SAMPLERS),
                   help=f"step rule (default {d.sampler}); dpmpp-2m needs only 10-20 steps")
    p.add_argument("--steps", type=int, default=d.num_steps, metavar="S",
                   help=f"sampling steps, 1 to the model's training timesteps "
                        f"(default {d.num_steps})")
    p.add_argument("--eta", type=float, default=d.eta,
                   help="DDIM noise: 0 deterministic ... 1 DDPM-like (ddim only; default 0)")
    p.add_argument("--spacing", default=d.spacing, metavar="|".join(SPACINGS),
                   help=f"which training timesteps to visit (default {d.spacing})")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"image i is drawn from seed + i (default {d.seed})")
    p.add_argument("--class-label", metavar="K|K1,K2,...|all",
                   help="class-conditional models: one label, a list cycled over the images, "
                        "or all (image i gets class i mod num_classes)")
    p.add_argument("--guidance-scale", type=float, default=d.guidance_scale, metavar="W",
                   help="classifier-free guidance scale, needs --class-label (default 1: none)")
    p.add_argument("--out-dir", help="output folder (default samples/<model file name>)")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=d.grid,
                   help="write grid.png (default: yes)")
    p.add_argument("--precision", default=d.precision, metavar="|".join(PRECISIONS),
                   help="network precision (default fp32; fp16 needs a GPU, bf16 works on CPU)")
    p.add_argument("--device", default=d.device,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace samples from other settings in --out-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sample)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffunet",
        description="Train and sample diffusion models built on the residual/attention UNet.")
    parser.add_argument("--version", action="version", version=f"diffunet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="print a model file's configs, size and checksum")
    p.add_argument("model", metavar="MODEL.safetensors")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "train", help="train a model (with no CONFIG: the built-in shapes data set on the CPU)",
        description="Train a diffusion UNet. Settings come from CONFIG.toml (optional) and "
                    "section.key=value overrides, e.g. train.max_steps=500 unet.dropout=0.1.")
    p.add_argument("items", nargs="*", metavar="[CONFIG.toml] [section.key=value ...]")
    p.add_argument("--out-dir", help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest saved state in --out-dir (fresh if none)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and model size, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    _add_sample_parser(sub)

    from .evaluation import add_eval_parser

    add_eval_parser(sub)

    from .bench import add_bench_parser

    add_bench_parser(sub)

    from .inspection import add_inspect_parser

    add_inspect_parser(sub)

    from .segment import add_segment_parser

    add_segment_parser(sub)
    _one_line_errors(parser)
    return parser


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """:func:`_one_line_error` for ``parser`` and every sub-command parser below it."""
    _one_line_error(parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _one_line_errors(child)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code (2 for bad input)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "items"):  # overrides after the options: train --out-dir X key=value
        args.items += [e for e in extra if not e.startswith("-")]
        extra = [e for e in extra if e.startswith("-")]
    if extra:  # reported by the sub-command's parser, so the message names the command
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except DiffunetError as e:
        if _is_main_process():
            print(f"diffunet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `diffunet info MODEL | head`
        sys.stderr.close()
        return 0
    except OSError as e:  # the file system said no (full, read-only, ...): one line, no traceback
        if _is_main_process():
            where = f": {e.filename}" if e.filename else ""
            print(f"diffunet {args.command}: error: {(e.strerror or str(e)).lower()}{where}; "
                  "check the path, free space and permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffunet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
