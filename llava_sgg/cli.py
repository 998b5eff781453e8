"""The `llava-sgg` command line: train, merge, and the SGG example."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _sgg_example(args: argparse.Namespace) -> int:
    if args.steps < 1:
        print("llava-sgg: --steps must be >= 1", file=sys.stderr)
        return 2
    from .sgg_example import run

    run(Path(args.output), steps=args.steps, optimizers=args.optimizers, seed=args.seed)
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train.config import load_run_config
    from .train.run import train

    cfg = load_run_config(args.config, optim=args.optim, overrides=args.set)
    output = train(cfg)
    print(f"wrote {output}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .model.loading import merge_lora

    print(f"wrote {merge_lora(args.model, args.output)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="llava-sgg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"llava-sgg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune LLaVA-v1.5 (full, LoRA or QLoRA) with any optimizer")
    train.add_argument("--config", action="append", required=True, metavar="FILE",
                       help="YAML run config; repeat to merge several, later ones win")
    train.add_argument("--optim", metavar="FILE", help="YAML file with an optimizer section (replaces the config's)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one key, value parsed as YAML (e.g. train.max_steps=10)")
    train.set_defaults(func=_train)

    merge = commands.add_parser("merge", help="fold a LoRA output folder into a full HF checkpoint")
    merge.add_argument("--model", required=True, help="a LoRA output folder of `llava-sgg train`")
    merge.add_argument("--output", required=True, help="folder for the merged checkpoint")
    merge.set_defaults(func=_merge)

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
    try:
        return args.func(args)
    except ValueError as error:  # ConfigError, DataError, ModelError: the message names the file and key
        print(f"llava-sgg {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
