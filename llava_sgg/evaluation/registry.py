"""Benchmark key -> scorer module, for `llava-sgg score <benchmark>` (an explicit table, no discovery)."""

from __future__ import annotations

import importlib

# key: (module in llava_sgg.evaluation, keyword arguments of its add_arguments)
SCORERS = {
    "vqav2": ("vqa", {"benchmark": "vqav2"}),
    "gqa": ("gqa", {}),
    "vizwiz": ("vqa", {"benchmark": "vizwiz"}),
    "sqa": ("sqa", {}),
    "textvqa": ("vqa", {"benchmark": "textvqa"}),
    "pope": ("pope", {}),
    "mmbench": ("mmbench", {"benchmark": "mmbench"}),
    "mmbench_cn": ("mmbench", {"benchmark": "mmbench_cn"}),
    "mme": ("mme", {}),
    "seed": ("seed", {}),
}


def scorer(key: str):
    if key not in SCORERS:
        raise ValueError(f"unknown benchmark {key!r}; choose one of: {', '.join(SCORERS)}")
    module, options = SCORERS[key]
    return importlib.import_module(f"llava_sgg.evaluation.{module}"), options


def add_score_commands(subparsers) -> None:
    for key in SCORERS:
        module, options = scorer(key)
        parser = subparsers.add_parser(key, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(parser, **options)
        parser.set_defaults(func=module.run, benchmark=key)


def score(key: str, argv: list[str]) -> dict:
    """Run a scorer as its command line would (used by the demo)."""
    import argparse

    module, options = scorer(key)
    parser = argparse.ArgumentParser(prog=f"llava-sgg score {key}")
    module.add_arguments(parser, **options)
    return module.run(parser.parse_args(argv))
