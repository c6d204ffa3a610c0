"""The ``diffunet`` command line: the only layer that parses arguments and prints.

One module per command group (``train``, ``sample``, ``eval``, ``ema``, ``info``,
``inspect``, ``bench``, ``segment``, ``stats``, ...), each with ``add_arguments(parser)`` and
the function that runs it; :mod:`.common` holds what they share. Only the command being run is imported and
given its arguments (``diffunet info`` loads neither evaluation nor segmentation), and each
command imports its library modules when it runs. Library code returns results and raises
:class:`~diffunet.errors.DiffunetError`; :func:`main` prints its one-line message and returns
exit code 2 without a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from ..errors import DiffunetError, Stopped
from ..stopping import handling_signals
from ..version import __version__
from .common import did_you_mean, is_main_process, one_line_errors

__all__ = ["build_parser", "main"]


def _train() -> ModuleType:
    from . import train
    return train


def _sample() -> ModuleType:
    from . import sample
    return sample


def _eval() -> ModuleType:
    from . import evaluate
    return evaluate


def _info() -> ModuleType:
    from . import info
    return info


def _inspect() -> ModuleType:
    from . import inspect
    return inspect


def _bench() -> ModuleType:
    from . import bench
    return bench


def _segment() -> ModuleType:
    from . import segment
    return segment


def _export() -> ModuleType:
    from . import export
    return export


def _import() -> ModuleType:
    from . import import_
    return import_


def _plot() -> ModuleType:
    from . import plot
    return plot


def _stats() -> ModuleType:
    from . import stats
    return stats


def _ema() -> ModuleType:
    from . import ema
    return ema


def _encode() -> ModuleType:
    from . import encode
    return encode


COMMANDS: dict[str, tuple[str, Callable[[], ModuleType]]] = {
    "info": ("print a model file's configs, size and checksum", _info),
    "train": ("train a model (with no CONFIG: the built-in shapes data set on the CPU)", _train),
    "sample": ("draw images from a model file into a folder (resumable)", _sample),
    "eval": ("bits/dim of a model on a data set, or FID/KID of generated images", _eval),
    "bench": ("time a training step and DDIM sampling (optionally against diffusers)", _bench),
    "inspect": ("picture every block's feature maps for one input (and their stats)", _inspect),
    "segment": ("segmentation with the same UNet: train, predict masks, data stats", _segment),
    "export": ("write a model file as a diffusers pipeline folder (DDIM/DDPMPipeline)",
               _export),
    "import": ("read a diffusers UNet2DModel folder into a model file", _import),
    "plot": ("draw a run's log.jsonl: loss (raw, smoothed), learning rate, gradient norm, "
             "images/s", _plot),
    "stats": ("the training images' std (EDM's schedule.sigma_data) and per-channel mean/std",
              _stats),
    "ema": ("rebuild a run's EMA of any length from its post-hoc EMA snapshots, as a model "
            "file", _ema),
    "encode": ("encode a latent run's data set through its VAE into the latent cache "
               "(resumable)", _encode),
}
"""Each command: its one-line help (for ``diffunet --help``) and its module, imported only when
the command is the one given."""


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``diffunet`` parser. Every command is listed; only those named in ``argv`` (every one
    when ``argv`` is None) get their arguments, so their modules are imported only then."""
    parser = argparse.ArgumentParser(
        prog="diffunet",
        description="Train and sample diffusion models built on the residual/attention UNet.")
    parser.add_argument("--version", action="version", version=f"diffunet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = set(COMMANDS) if argv is None else set(argv)
    for name, (help_text, module) in COMMANDS.items():
        if name not in wanted:
            sub.add_parser(name, help=help_text)
            continue
        mod = module()
        p = sub.add_parser(name, help=help_text, description=getattr(mod, "DESCRIPTION", None))
        mod.add_arguments(p)
    one_line_errors(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code (2 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The command is the first argument that names one (options come only after it).
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser([command] if command else [])
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "items"):  # overrides after the options: train --out-dir X key=value
        args.items += [e for e in extra if not e.startswith("-")]
        extra = [e for e in extra if e.startswith("-")]
    if extra:  # reported by the sub-command's parser, so the message names the command
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}"
                                        + did_you_mean(args.command, extra))
    # SIGINT/SIGTERM stop every command within seconds, also one blocked in a read
    with handling_signals(f"diffunet {args.command}"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Run the parsed command; a DiffunetError, a refusal of the file system, running out of
    memory and a signal are one line on stderr (no traceback) and an exit code."""
    try:
        return args.func(args)
    except DiffunetError as e:
        if is_main_process():
            print(f"diffunet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `diffunet info MODEL | head`
        sys.stderr.close()
        return 0
    except OSError as e:  # the file system said no (full, read-only, ...): one line, no traceback
        if is_main_process():
            where = f": {e.filename}" if e.filename else ""
            print(f"diffunet {args.command}: error: {(e.strerror or str(e)).lower()}{where}; "
                  "check the path, free space and permissions", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        # The last net for what no earlier check foresaw (e.g. a 100-megapixel image on a small
        # machine): running out of memory is one line. Any other RuntimeError is a bug: raise.
        text = str(e)
        if not (isinstance(e, MemoryError) or _out_of_memory(text)):
            raise
        if is_main_process():
            asked = re.search(r"allocate ([0-9]+) bytes", text)
            size = f" (an allocation of {int(asked[1]) / 2**30:,.1f} GiB failed)" if asked else ""
            print(f"diffunet {args.command}: error: out of memory{size}; use smaller inputs "
                  "(images, --batch-size) or a machine with more memory", file=sys.stderr)
        return 2
    except Stopped as e:  # SIGINT/SIGTERM (diffunet.stopping): the line says what was kept
        if is_main_process():
            print(f"diffunet {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"diffunet {args.command}: interrupted", file=sys.stderr)
        return 130


def _out_of_memory(message: str) -> bool:
    """Whether a RuntimeError's message is PyTorch's "no memory" (CPU or GPU allocator)."""
    return ("can't allocate memory" in message or "CUDA out of memory" in message
            or "out of memory" in message.lower())


if __name__ == "__main__":
    raise SystemExit(main())
