"""The ``lcm`` command line: one small module per command. Arguments are parsed and validated here, and nowhere
below: each command turns its flags into the typed configs of the library."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lcm import __version__
from lcm.cli import cache, consistency, demo, evaluate, merge, pairs, sample, serve, timesteps, train_teacher
from lcm.models.formats import ALLOW_PICKLE_ENV

COMMANDS = (demo, train_teacher, sample, merge, serve, consistency, cache, pairs, evaluate, timesteps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcm",
        description="Latent Consistency Models: distil a latent diffusion model into a 1-4 step generator.",
    )
    parser.add_argument("--version", action="version", version=f"lcm {__version__}")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load pickled model weights (.bin), which can run code when loaded; by default only .safetensors",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _quiet_library_progress() -> None:
    """transformers draws a bar for every local weight load; ours (training, sampling) are the ones that matter."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _quiet_library_progress()
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if args.allow_pickle:
        os.environ[ALLOW_PICKLE_ENV] = "1"
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # bad input, missing files: one line the user can act on
        print(f"lcm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
