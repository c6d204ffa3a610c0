"""The ``diffunet`` command line: argument parsing and the subcommands.

This is the only module that prints for people. Bad input raises a
:class:`~diffunet.errors.DiffunetError`; :func:`main` prints its one-line message and returns
exit code 2 without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import RunConfig, load_config, to_toml
from .errors import ConfigError, DiffunetError


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
    print(f"parameters       {n_params:,} ({n_params / 1e6:.2f}M)")
    print(f"sha256           {meta['sha256']}")
    for section in ("unet_config", "schedule_config"):
        print(f"[{section.removesuffix('_config')}]")
        for key, value in meta[section].items():
            print(f"  {key} = {json.dumps(value)}")
    return 0


def _is_main_process() -> bool:
    # Under `accelerate launch` every process runs this; only rank 0 talks to people.
    return os.environ.get("RANK", "0") == "0"


def _say(msg: str) -> None:
    if _is_main_process():
        print(msg, file=sys.stderr, flush=True)


def _resolve_train_config(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """CONFIG and overrides -> (RunConfig, out_dir). With --resume and no CONFIG, the run
    folder's own config.json is the starting point, so `--resume train.max_steps=N` extends it."""
    config_path = None
    overrides = []
    for item in args.items:
        if "=" in item:
            overrides.append(item)
        elif config_path is None:
            config_path = item
        else:
            raise ConfigError(f"two config files given ({config_path}, {item}); give one, then "
                              "section.key=value overrides")
    stem = Path(config_path).stem if config_path else "default"
    out_dir = Path(args.out_dir) if args.out_dir else Path("runs") / stem
    base = None
    saved = out_dir / "config.json"
    if args.resume and config_path is None and saved.is_file():
        base = json.loads(saved.read_text(encoding="utf-8"))
    return load_config(config_path, overrides, base=base), out_dir


def _cmd_train(args: argparse.Namespace) -> int:
    cfg, out_dir = _resolve_train_config(args)
    if args.dry_run:
        from .unet import UNet

        n_params = sum(p.numel() for p in UNet(cfg.unet).parameters())
        print(to_toml(cfg))
        print(f"# UNet parameters: {n_params:,} ({n_params / 1e6:.2f}M)")
        print(f"# output folder: {out_dir}")
        return 0
    from .training import train

    result = train(cfg, out_dir, resume=args.resume, say=_say, progress=not args.no_progress)
    if result.model_path is not None:
        _say(f"step {result.step}: model file {result.model_path}")
    if result.nonfinite_skipped:
        _say(f"skipped {result.nonfinite_skipped} step(s) with a non-finite loss")
    if not result.interrupted and result.model_path is not None:
        _say(f"sample from it with: diffunet sample {result.model_path}")
    return 0


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code (2 for bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DiffunetError as e:
        if _is_main_process():
            print(f"diffunet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffunet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
