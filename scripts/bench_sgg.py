#!/usr/bin/env python
"""Kept for old links: the benchmark now lives in `llava_sgg.bench`, run as `llava-sgg bench`.

  python scripts/bench_sgg.py optim --params 1b --optimizers adamw,adamw_sgg
  python scripts/bench_sgg.py cluster --elements 11183104
  python scripts/bench_sgg.py train
"""

import sys

from llava_sgg.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
