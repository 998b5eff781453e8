"""The `llava-sgg` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _sgg_example(args: argparse.Namespace) -> int:
    from .sgg_example import run

    run(Path(args.output), steps=args.steps, optimizers=args.optimizers, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-sgg", description=__doc__)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"llava-sgg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    example = commands.add_parser(
        "sgg-example", help="train a badly scaled toy network with each base optimizer and its SGG version")
    example.add_argument("--output", default="runs/sgg-example", help="folder for the plots and JSON")
    example.add_argument("--steps", type=int, default=200, help="training steps per run")
    example.add_argument("--optimizers", nargs="+", default=["adamw", "adafactor", "lamb"],
                         choices=["adamw", "adafactor", "lamb"], help="base optimizers to compare")
    example.add_argument("--seed", type=int, default=0)
    example.set_defaults(func=_sgg_example)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "steps", 1) < 1:
        print("llava-sgg: --steps must be >= 1", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
